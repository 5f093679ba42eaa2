//! Postgres relation → Avro schemas, and the per-row encoder for the Debezium-style envelope.
//!
//! On every pgoutput `Relation` message the pipeline builds a [`TableSchema`]: the key record
//! `<topic>.Key`, and the value `<topic>.Envelope` shaped like Debezium's Postgres connector
//! (`before`, `after`, `source`, `op`, `ts_ms`, `transaction`) so existing Debezium consumers
//! read our topics unchanged. Building it also compiles a *column plan* — one [`Kind`] per
//! column — so encoding a row is a walk over the plan writing Avro binary straight into the
//! output buffer, with no `apache_avro::types::Value` per row. apache-avro only parses (and so
//! validates) the generated schemas; the tests decode our bytes with it to prove they agree.
//!
//! # Type mapping (pgoutput text output → Avro)
//!
//! | Postgres | Avro |
//! |---|---|
//! | `bool` | `boolean` |
//! | `int2`, `int4` | `int` |
//! | `int8`, `oid` | `long` |
//! | `float4` / `float8` | `float` / `double` (NaN and ±Infinity kept) |
//! | `numeric(p,s)` | `bytes`, logicalType `decimal` (p, s) |
//! | `numeric` (no typmod, or negative scale) | `string` — no fixed scale exists, and Avro `decimal` needs one; the text is lossless, whereas `double` would round |
//! | `text`, `varchar`, `bpchar`, `name`, `char` | `string` |
//! | `bytea` | `bytes` |
//! | `date` | `int`, logicalType `date` |
//! | `time` | `long`, logicalType `time-micros` |
//! | `timestamp` | `long`, logicalType `local-timestamp-micros` |
//! | `timestamptz` | `long`, logicalType `timestamp-micros` (UTC) |
//! | `timetz` | `string` (Postgres text output, `12:34:56+05:30`) |
//! | `interval` | `string`, ISO 8601 duration (`P1Y2M3DT4H5M6.789S`: the cdc connection sets `IntervalStyle=iso_8601`) |
//! | `uuid` | `string`, logicalType `uuid` |
//! | `json`, `jsonb` | `string`, `connect.name` = `io.debezium.data.Json` |
//! | one-dimensional arrays of the above | `array` of `["null", item]` |
//! | domains over the types above | as the base type (pgoutput names a domain by its base type and does not send the base's typmod, so a domain over `numeric(p,s)` is an unconstrained `numeric`) |
//! | anything else (enums, extension types, domains over those) | `string`, with `pg.type` naming the type |
//!
//! Value fields are all `["null", T]` with default null: pgoutput does not say which columns
//! are NOT NULL. Key fields are not nullable. Dates and timestamps BC are encoded (negative
//! values); `infinity` has no Avro form and is an [`EncodeError`].
//!
//! # Unchanged TOAST values
//!
//! When an UPDATE leaves a TOASTed (large, stored out of line) value alone, pgoutput does not
//! send it: the column arrives as `u` ([`Value::UnchangedToast`]). walbridge never invents a
//! value for it, neither a placeholder string (Debezium's `__debezium_unavailable_value`, which
//! a consumer can mistake for data) nor a silent null. Instead:
//!
//! - If the old row carries the value (`REPLICA IDENTITY FULL`: Postgres writes the whole old
//!   row to the WAL with every TOASTed value inlined), the unchanged new value *is* the old one,
//!   so `after` gets it from `before` and the event is complete.
//! - Otherwise the field is null in `after`, and its Avro field name is listed in the envelope's
//!   top-level `unavailable_columns` (`["null", {"type": "array", "items": "string"}]`, null
//!   when every value is present). A consumer tests membership in that list to tell "not sent,
//!   keep the value you have" from a real NULL. An old tuple with a `u` (which Postgres does not
//!   produce, since it inlines TOASTed values in the old row) is treated the same way: null in
//!   `before`, and listed.
//!
//! The field comes last and defaults to null, so the envelope stays backward compatible with
//! schemas registered before it existed, and Debezium consumers that do not know it ignore it.
//! Filling and listing happen while encoding, with no allocation.
//!
//! # Limitations
//!
//! - Values in pgoutput binary format are rejected: walbridge uses text mode.
//! - Arrays of user-defined types and multi-dimensional arrays: the former are sent as their
//!   array literal string, the latter are an [`EncodeError`].

use std::collections::HashMap;

use apache_avro::Schema;
use cdc::pgoutput::{Relation, Tuple, TypeInfo, Value};
use serde_json::{Value as Json, json};

use crate::binary::{put_bool, put_bytes, put_double, put_float, put_long, put_union_branch};
use crate::pgtext;

/// What is written in `source.version`.
const CONNECTOR_VERSION: &str = concat!("walbridge-", env!("CARGO_PKG_VERSION"));

/// Names of user-defined types, learned from pgoutput `Type` messages (sent before the first
/// `Relation` that uses a non-builtin type).
#[derive(Debug, Clone, Default)]
pub struct TypeNames {
    names: HashMap<u32, (String, String)>,
}

impl TypeNames {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, info: &TypeInfo) {
        self.names
            .insert(info.oid, (info.namespace.clone(), info.name.clone()));
    }

    /// `(namespace, name)` of a type seen in a `Type` message.
    pub fn get(&self, oid: u32) -> Option<(&str, &str)> {
        self.names
            .get(&oid)
            .map(|(ns, n)| (ns.as_str(), n.as_str()))
    }
}

/// Debezium's `op` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Update,
    Delete,
    /// A row read by the snapshot.
    Read,
    Truncate,
}

impl Op {
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
        }
    }
}

/// The `source` block of the envelope: where and when the change happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source<'a> {
    /// Topic prefix (Debezium's logical server name).
    pub name: &'a str,
    pub db: &'a str,
    pub schema: &'a str,
    pub table: &'a str,
    /// Commit time, milliseconds since the Unix epoch.
    pub ts_ms: i64,
    pub tx_id: u32,
    /// Commit LSN.
    pub lsn: u64,
    pub snapshot: bool,
}

/// One row change to encode as an envelope.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Change<'a> {
    pub op: Op,
    pub before: Option<&'a Tuple>,
    pub after: Option<&'a Tuple>,
    pub source: Source<'a>,
    /// When walbridge processed the change, milliseconds since the Unix epoch.
    pub ts_ms: i64,
}

/// Why a table's schema could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "columns {first:?} and {second:?} of table {table} both become Avro field {field:?} \
         (characters other than letters, digits and _ are replaced by _); rename one column"
    )]
    FieldNameClash {
        table: String,
        first: String,
        second: String,
        field: String,
    },
    #[error("key column {column:?} given for table {table} is not a column of the table")]
    UnknownKeyColumn { table: String, column: String },
    #[error(
        "generated Avro {which} schema for table {table} is invalid (a walbridge bug, please \
         report it): {source}"
    )]
    Invalid {
        table: String,
        which: &'static str,
        #[source]
        source: Box<apache_avro::Error>,
    },
}

/// Why one value could not be encoded. Never carries the value itself: only its type and length.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeReason {
    #[error(
        "the row has {got} column(s) but the relation message announced {expected}; \
         the schema is stale"
    )]
    ColumnCount { expected: usize, got: usize },
    #[error("key column is null or an unchanged TOAST value; every key column needs a value")]
    NullKey,
    #[error(
        "value arrived in pgoutput binary format; walbridge needs text format (binary = false)"
    )]
    BinaryFormat,
    #[error("text of {len} byte(s) is not valid UTF-8; the database must use UTF-8")]
    NotUtf8 { len: usize },
    #[error("cannot parse text of {len} byte(s) as {expected}")]
    Malformed { expected: &'static str, len: usize },
    #[error("value is out of range for {target}")]
    OutOfRange { target: &'static str },
    #[error("{what} has no Avro {target} representation")]
    Unrepresentable {
        what: &'static str,
        target: &'static str,
    },
    #[error("value does not fit numeric({precision},{scale})")]
    PrecisionExceeded { precision: u32, scale: u32 },
    #[error("multi-dimensional arrays are not supported")]
    MultiDimArray,
    /// The table's shape is not encodable for its topic at all (registry.on_incompatible:
    /// dead_letter), whatever the row holds.
    #[error("the table's new shape is incompatible with the schemas registered for its topic: {0}")]
    IncompatibleShape(String),
}

/// A change that cannot be encoded. Definite: it belongs to this record (dead-letter it), and
/// retrying will not help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode column {column:?} ({pg_type}) of table {table}: {reason}")]
pub struct EncodeError {
    pub table: String,
    /// Postgres column name, or `source.<field>` for the envelope's own fields.
    pub column: String,
    pub pg_type: String,
    pub reason: EncodeReason,
}

/// How one column is encoded; chosen once per relation.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Boolean,
    Int {
        target: &'static str,
    },
    Long {
        target: &'static str,
    },
    Float,
    Double,
    Decimal {
        precision: u32,
        scale: u32,
    },
    /// Any text sent through unchanged (also `uuid`, `json`, user types).
    String,
    Bytes,
    Date,
    TimeMicros,
    LocalTimestampMicros,
    TimestampMicros,
    Array(Box<Kind>),
}

#[derive(Debug, Clone)]
struct ColumnPlan {
    name: String,
    /// Avro field name (`name` sanitized), as listed in `unavailable_columns`.
    field: String,
    pg_type: String,
    kind: Kind,
}

/// Avro schemas and the encoding plan for one table (one pgoutput relation).
#[derive(Debug, Clone)]
pub struct TableSchema {
    /// `namespace.name`, for error messages.
    table: String,
    columns: Vec<ColumnPlan>,
    key_columns: Vec<usize>,
    key_schema: Schema,
    value_schema: Schema,
    key_json: String,
    value_json: String,
}

impl TableSchema {
    /// Builds the schemas for `rel`, keyed by the columns pgoutput flags as replica identity.
    ///
    /// With `REPLICA IDENTITY FULL` pgoutput flags *every* column; use [`TableSchema::with_key`]
    /// with the primary key read from the catalog to get a usable Kafka key for such tables.
    pub fn new(topic: &str, rel: &Relation, types: &TypeNames) -> Result<TableSchema, SchemaError> {
        let key: Vec<usize> = rel
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.key)
            .map(|(i, _)| i)
            .collect();
        Self::build(topic, rel, types, key)
    }

    /// Like [`TableSchema::new`] but keyed by the named columns, in the given order.
    pub fn with_key(
        topic: &str,
        rel: &Relation,
        types: &TypeNames,
        key_columns: &[&str],
    ) -> Result<TableSchema, SchemaError> {
        let key = key_columns
            .iter()
            .map(|name| {
                rel.columns
                    .iter()
                    .position(|c| c.name == *name)
                    .ok_or_else(|| SchemaError::UnknownKeyColumn {
                        table: qualified(rel),
                        column: (*name).to_owned(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::build(topic, rel, types, key)
    }

    fn build(
        topic: &str,
        rel: &Relation,
        types: &TypeNames,
        key_columns: Vec<usize>,
    ) -> Result<TableSchema, SchemaError> {
        let table = qualified(rel);
        let namespace = avro_namespace(topic);

        let mut columns = Vec::with_capacity(rel.columns.len());
        let mut value_fields = Vec::with_capacity(rel.columns.len());
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, col) in rel.columns.iter().enumerate() {
            let field = avro_name(&col.name);
            if let Some(&other) = seen.get(&field) {
                return Err(SchemaError::FieldNameClash {
                    table,
                    first: rel.columns[other].name.clone(),
                    second: col.name.clone(),
                    field,
                });
            }
            seen.insert(field.clone(), i);
            let (kind, pg_type, avro_type) = map_type(col.type_oid, col.type_modifier, types);
            value_fields.push(json!({
                "name": field,
                "type": ["null", avro_type],
                "default": null,
            }));
            columns.push(ColumnPlan {
                name: col.name.clone(),
                field,
                pg_type,
                kind,
            });
        }
        let key_fields: Vec<Json> = key_columns
            .iter()
            .map(|&i| {
                let col = &rel.columns[i];
                let (_, _, avro_type) = map_type(col.type_oid, col.type_modifier, types);
                json!({ "name": columns[i].field, "type": avro_type })
            })
            .collect();

        let key_name = format!("{namespace}.Key");
        let value_name = format!("{namespace}.Value");
        let envelope_name = format!("{namespace}.Envelope");
        let key_json = json!({
            "type": "record",
            "name": key_name,
            "fields": key_fields,
            "connect.name": key_name,
        })
        .to_string();
        let value_record = json!({
            "type": "record",
            "name": value_name,
            "fields": value_fields,
            "connect.name": value_name,
        });
        let value_json = json!({
            "type": "record",
            "name": envelope_name,
            "fields": [
                { "name": "before", "type": ["null", value_record], "default": null },
                // A named type is defined once; later uses refer to it by full name.
                { "name": "after", "type": ["null", value_name], "default": null },
                { "name": "source", "type": source_schema() },
                { "name": "op", "type": "string" },
                { "name": "ts_ms", "type": ["null", "long"], "default": null },
                { "name": "transaction", "type": ["null", transaction_schema()], "default": null },
                // Last and defaulted, so adding it kept the envelope backward compatible.
                {
                    "name": "unavailable_columns",
                    "type": ["null", { "type": "array", "items": "string" }],
                    "default": null,
                },
            ],
            "connect.name": envelope_name,
        })
        .to_string();

        let parse = |which: &'static str, text: &str| {
            Schema::parse_str(text).map_err(|e| SchemaError::Invalid {
                table: table.clone(),
                which,
                source: Box::new(e),
            })
        };
        let key_schema = parse("key", &key_json)?;
        let value_schema = parse("value", &value_json)?;
        Ok(TableSchema {
            table,
            columns,
            key_columns,
            key_schema,
            value_schema,
            key_json,
            value_json,
        })
    }

    /// JSON of the key schema, as registered under `<topic>-key`. Generated deterministically,
    /// so an unchanged table yields the same text (and the registry the same id) every time.
    pub fn key_schema_json(&self) -> &str {
        &self.key_json
    }

    /// JSON of the envelope schema, as registered under `<topic>-value`.
    pub fn value_schema_json(&self) -> &str {
        &self.value_json
    }

    pub fn key_schema(&self) -> &Schema {
        &self.key_schema
    }

    pub fn value_schema(&self) -> &Schema {
        &self.value_schema
    }

    /// False when the relation has no key columns (`REPLICA IDENTITY NOTHING`, or DEFAULT without
    /// a primary key). Such rows get a null Kafka key; do not register or encode a key for them.
    pub fn has_key(&self) -> bool {
        !self.key_columns.is_empty()
    }

    /// `namespace.table` as in Postgres.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Appends the Avro datum of the key record (key columns of `row`) to `out`. On error `out`
    /// is left as it was.
    pub fn encode_key(&self, row: &Tuple, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        let result = self.check_width(row).and_then(|()| {
            for &i in &self.key_columns {
                let col = &self.columns[i];
                let res = match &row[i] {
                    Value::Text(text) => encode_kind(&col.kind, text, out),
                    Value::Null | Value::UnchangedToast => Err(EncodeReason::NullKey),
                    Value::Binary(_) => Err(EncodeReason::BinaryFormat),
                };
                res.map_err(|reason| self.error(col, reason))?;
            }
            Ok(())
        });
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    /// Appends the Avro datum of the envelope for `change` to `out`. On error `out` is left as
    /// it was.
    pub fn encode_value(&self, change: &Change<'_>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        let result = self.encode_envelope(change, out);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn encode_envelope(&self, change: &Change<'_>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        // `after` may take unchanged TOAST values from `before` (see the module doc).
        for (row, fill) in [(change.before, None), (change.after, change.before)] {
            match row {
                None => put_union_branch(out, 0),
                Some(row) => {
                    put_union_branch(out, 1);
                    self.encode_row(row, fill, out)?;
                }
            }
        }
        let s = &change.source;
        put_bytes(out, CONNECTOR_VERSION.as_bytes());
        put_bytes(out, b"postgresql");
        put_bytes(out, s.name.as_bytes());
        put_long(out, s.ts_ms);
        put_bytes(out, if s.snapshot { b"true" } else { b"false" });
        put_bytes(out, s.db.as_bytes());
        put_union_branch(out, 0); // sequence
        put_bytes(out, s.schema.as_bytes());
        put_bytes(out, s.table.as_bytes());
        put_union_branch(out, 1);
        put_long(out, i64::from(s.tx_id));
        let lsn = i64::try_from(s.lsn).map_err(|_| EncodeError {
            table: self.table.clone(),
            column: "source.lsn".to_owned(),
            pg_type: "pg_lsn".to_owned(),
            reason: EncodeReason::OutOfRange { target: "long" },
        })?;
        put_union_branch(out, 1);
        put_long(out, lsn);
        put_union_branch(out, 0); // xmin
        put_bytes(out, change.op.code().as_bytes());
        put_union_branch(out, 1);
        put_long(out, change.ts_ms);
        put_union_branch(out, 0); // transaction
        self.encode_unavailable(change.before, change.after, out);
        Ok(())
    }

    /// Writes `row`; an unchanged TOAST value is taken from `fill` (the old row) when that has
    /// it, and is null otherwise.
    fn encode_row(
        &self,
        row: &Tuple,
        fill: Option<&Tuple>,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        self.check_width(row)?;
        for (i, (col, value)) in self.columns.iter().zip(row).enumerate() {
            let value = match value {
                Value::UnchangedToast => match fill.and_then(|f| f.get(i)) {
                    Some(old @ (Value::Text(_) | Value::Binary(_))) => old,
                    _ => value,
                },
                _ => value,
            };
            match value {
                Value::Null | Value::UnchangedToast => put_union_branch(out, 0),
                Value::Text(text) => {
                    put_union_branch(out, 1);
                    encode_kind(&col.kind, text, out).map_err(|r| self.error(col, r))?;
                }
                Value::Binary(_) => return Err(self.error(col, EncodeReason::BinaryFormat)),
            }
        }
        Ok(())
    }

    /// The `unavailable_columns` field: Avro names of the columns that `encode_row` left null
    /// because pgoutput did not send their value. Both rows were width-checked already.
    fn encode_unavailable(&self, before: Option<&Tuple>, after: Option<&Tuple>, out: &mut Vec<u8>) {
        let unavailable = |i: usize| {
            let old = before.and_then(|t| t.get(i));
            let new = after.and_then(|t| t.get(i));
            match (old, new) {
                (Some(Value::UnchangedToast), _) => true,
                (Some(Value::Text(_) | Value::Binary(_)), Some(Value::UnchangedToast)) => false,
                (_, Some(Value::UnchangedToast)) => true,
                _ => false,
            }
        };
        // Counting first keeps this allocation-free: the array's block length comes first.
        let count = (0..self.columns.len()).filter(|&i| unavailable(i)).count();
        if count == 0 {
            put_union_branch(out, 0);
            return;
        }
        put_union_branch(out, 1);
        put_long(out, count as i64);
        for (i, col) in self.columns.iter().enumerate() {
            if unavailable(i) {
                put_bytes(out, col.field.as_bytes());
            }
        }
        put_long(out, 0);
    }

    fn check_width(&self, row: &Tuple) -> Result<(), EncodeError> {
        if row.len() == self.columns.len() {
            return Ok(());
        }
        Err(EncodeError {
            table: self.table.clone(),
            column: String::new(),
            pg_type: "row".to_owned(),
            reason: EncodeReason::ColumnCount {
                expected: self.columns.len(),
                got: row.len(),
            },
        })
    }

    fn error(&self, col: &ColumnPlan, reason: EncodeReason) -> EncodeError {
        EncodeError {
            table: self.table.clone(),
            column: col.name.clone(),
            pg_type: col.pg_type.clone(),
            reason,
        }
    }
}

fn qualified(rel: &Relation) -> String {
    format!("{}.{}", rel.namespace, rel.name)
}

fn encode_kind(kind: &Kind, text: &[u8], out: &mut Vec<u8>) -> Result<(), EncodeReason> {
    match kind {
        Kind::Boolean => put_bool(out, pgtext::parse_bool(text)?),
        Kind::Int { target } => put_long(out, i64::from(pgtext::parse_i32(text, target)?)),
        Kind::Long { target } => put_long(out, pgtext::parse_i64(text, target)?),
        Kind::Float => put_float(out, pgtext::parse_f32(text)?),
        Kind::Double => put_double(out, pgtext::parse_f64(text)?),
        Kind::Decimal { precision, scale } => {
            // The length prefix comes first but is known only after conversion: reserve one
            // byte, which holds any length below 64 (151 digits), and patch it.
            let at = out.len();
            out.push(0);
            pgtext::decimal_unscaled(text, *precision, *scale, out)?;
            let len = out.len() - at - 1;
            if len < 64 {
                out[at] = (len as u8) << 1;
            } else {
                let unscaled = out.split_off(at + 1);
                out.truncate(at);
                put_bytes(out, &unscaled);
            }
        }
        Kind::String => {
            if std::str::from_utf8(text).is_err() {
                return Err(EncodeReason::NotUtf8 { len: text.len() });
            }
            put_bytes(out, text);
        }
        Kind::Bytes => match text.strip_prefix(b"\\x") {
            // Hex output (the default) says its decoded length up front.
            Some(hex) => {
                put_long(out, (hex.len() / 2) as i64);
                pgtext::bytea(text, out)?;
            }
            None => {
                let mut buf = Vec::with_capacity(text.len());
                pgtext::bytea(text, &mut buf)?;
                put_bytes(out, &buf);
            }
        },
        Kind::Date => put_long(out, i64::from(pgtext::date(text)?)),
        Kind::TimeMicros => put_long(out, pgtext::time(text)?),
        Kind::LocalTimestampMicros => put_long(out, pgtext::timestamp(text, false)?),
        Kind::TimestampMicros => put_long(out, pgtext::timestamp(text, true)?),
        Kind::Array(item) => {
            let items = pgtext::array_elements(text)?;
            // One block holding every item, then the empty block that ends the array.
            if !items.is_empty() {
                put_long(out, items.len() as i64);
                for element in &items {
                    match element {
                        None => put_union_branch(out, 0),
                        Some(element) => {
                            put_union_branch(out, 1);
                            encode_kind(item, element, out)?;
                        }
                    }
                }
            }
            put_long(out, 0);
        }
    }
    Ok(())
}

/// Chooses the encoding, a readable type name for errors, and the Avro type JSON of a column.
fn map_type(oid: u32, typmod: i32, types: &TypeNames) -> (Kind, String, Json) {
    if let Some(mapped) = map_builtin(oid, typmod) {
        return mapped;
    }
    match types.get(oid) {
        Some((ns, name)) => {
            // pgoutput writes the pg_catalog namespace as "", and names a domain by its base
            // type: a domain over a builtin is encoded as that builtin (its text output is the
            // base type's). The base's typmod is not sent, so a domain over numeric(p,s) is an
            // unconstrained numeric.
            let ns = if ns.is_empty() { "pg_catalog" } else { ns };
            if ns == "pg_catalog"
                && let Some(mapped) = builtin_oid(name).and_then(|b| map_builtin(b, -1))
            {
                return mapped;
            }
            let qualified = format!("{ns}.{name}");
            let avro = json!({ "type": "string", "pg.type": qualified });
            (Kind::String, qualified, avro)
        }
        None => (Kind::String, format!("type oid {oid}"), json!("string")),
    }
}

/// Builtin scalars and one-dimensional arrays of them.
fn map_builtin(oid: u32, typmod: i32) -> Option<(Kind, String, Json)> {
    if let Some((item, elem_name)) = array_element(oid) {
        let (kind, pg_type, avro) = map_scalar(item, typmod)
            .unwrap_or_else(|| (Kind::String, elem_name.to_owned(), json!("string")));
        return Some((
            Kind::Array(Box::new(kind)),
            format!("{pg_type}[]"),
            json!({ "type": "array", "items": ["null", avro] }),
        ));
    }
    map_scalar(oid, typmod)
}

/// Oid of a pg_catalog type that [`map_builtin`] knows, by its `typname` (arrays are `_name`).
fn builtin_oid(name: &str) -> Option<u32> {
    if let Some(elem) = name.strip_prefix('_') {
        let elem = builtin_oid(elem)?;
        return ARRAY_ELEMENTS
            .iter()
            .find(|(_, item, _)| *item == elem)
            .map(|(array, _, _)| *array);
    }
    Some(match name {
        "bool" => 16,
        "int2" => 21,
        "int4" => 23,
        "int8" => 20,
        "oid" => 26,
        "float4" => 700,
        "float8" => 701,
        "numeric" => 1700,
        "text" => 25,
        "varchar" => 1043,
        "bpchar" => 1042,
        "name" => 19,
        "char" => 18,
        "bytea" => 17,
        "date" => 1082,
        "time" => 1083,
        "timestamp" => 1114,
        "timestamptz" => 1184,
        "timetz" => 1266,
        "interval" => 1186,
        "uuid" => 2950,
        "json" => 114,
        "jsonb" => 3802,
        _ => return None,
    })
}

fn map_scalar(oid: u32, typmod: i32) -> Option<(Kind, String, Json)> {
    let simple = |kind: Kind, name: &str, avro: Json| Some((kind, name.to_owned(), avro));
    match oid {
        16 => simple(Kind::Boolean, "bool", json!("boolean")),
        21 => simple(Kind::Int { target: "int2" }, "int2", json!("int")),
        23 => simple(Kind::Int { target: "int4" }, "int4", json!("int")),
        20 => simple(Kind::Long { target: "int8" }, "int8", json!("long")),
        26 => simple(Kind::Long { target: "oid" }, "oid", json!("long")),
        700 => simple(Kind::Float, "float4", json!("float")),
        701 => simple(Kind::Double, "float8", json!("double")),
        1700 => Some(map_numeric(typmod)),
        25 => simple(Kind::String, "text", json!("string")),
        1043 => simple(Kind::String, "varchar", json!("string")),
        1042 => simple(Kind::String, "bpchar", json!("string")),
        19 => simple(Kind::String, "name", json!("string")),
        18 => simple(Kind::String, "char", json!("string")),
        17 => simple(Kind::Bytes, "bytea", json!("bytes")),
        1082 => simple(
            Kind::Date,
            "date",
            json!({ "type": "int", "logicalType": "date" }),
        ),
        1083 => simple(
            Kind::TimeMicros,
            "time",
            json!({ "type": "long", "logicalType": "time-micros" }),
        ),
        1114 => simple(
            Kind::LocalTimestampMicros,
            "timestamp",
            json!({ "type": "long", "logicalType": "local-timestamp-micros" }),
        ),
        1184 => simple(
            Kind::TimestampMicros,
            "timestamptz",
            json!({ "type": "long", "logicalType": "timestamp-micros" }),
        ),
        1266 => simple(Kind::String, "timetz", json!("string")),
        1186 => simple(Kind::String, "interval", json!("string")),
        2950 => simple(
            Kind::String,
            "uuid",
            json!({
                "type": "string",
                "logicalType": "uuid",
                "connect.version": 1,
                "connect.name": "io.debezium.data.Uuid",
            }),
        ),
        114 | 3802 => simple(
            Kind::String,
            if oid == 114 { "json" } else { "jsonb" },
            json!({
                "type": "string",
                "connect.version": 1,
                "connect.name": "io.debezium.data.Json",
            }),
        ),
        _ => None,
    }
}

/// `numeric(p,s)` → Avro decimal; unconstrained `numeric` (or a scale Avro cannot express:
/// negative, or above the precision, both allowed since Postgres 15) → lossless string.
fn map_numeric(typmod: i32) -> (Kind, String, Json) {
    // atttypmod = ((precision << 16) | scale) + VARHDRSZ, scale an 11-bit signed field.
    if typmod >= 4 {
        let t = typmod - 4;
        let precision = ((t >> 16) & 0xffff) as u32;
        let scale = (((t & 0x7ff) ^ 1024) - 1024) as i64;
        let name = format!("numeric({precision},{scale})");
        if precision >= 1 && scale >= 0 && scale as u32 <= precision {
            let scale = scale as u32;
            let avro = json!({
                "type": "bytes",
                "logicalType": "decimal",
                "precision": precision,
                "scale": scale,
                "connect.name": "org.apache.kafka.connect.data.Decimal",
                "connect.parameters": {
                    "scale": scale.to_string(),
                    "connect.decimal.precision": precision.to_string(),
                },
            });
            return (Kind::Decimal { precision, scale }, name, avro);
        }
        return (Kind::String, name, json!("string"));
    }
    (Kind::String, "numeric".to_owned(), json!("string"))
}

/// Builtin array types: (array oid, element oid, element name).
const ARRAY_ELEMENTS: &[(u32, u32, &str)] = &[
    (1000, 16, "bool"),
    (1005, 21, "int2"),
    (1007, 23, "int4"),
    (1016, 20, "int8"),
    (1028, 26, "oid"),
    (1021, 700, "float4"),
    (1022, 701, "float8"),
    (1231, 1700, "numeric"),
    (1009, 25, "text"),
    (1015, 1043, "varchar"),
    (1014, 1042, "bpchar"),
    (1003, 19, "name"),
    (1002, 18, "char"),
    (1001, 17, "bytea"),
    (1182, 1082, "date"),
    (1183, 1083, "time"),
    (1115, 1114, "timestamp"),
    (1185, 1184, "timestamptz"),
    (1270, 1266, "timetz"),
    (1187, 1186, "interval"),
    (2951, 2950, "uuid"),
    (199, 114, "json"),
    (3807, 3802, "jsonb"),
];

/// Element type of the builtin array types.
fn array_element(oid: u32) -> Option<(u32, &'static str)> {
    ARRAY_ELEMENTS
        .iter()
        .find(|(array, _, _)| *array == oid)
        .map(|(_, item, name)| (*item, *name))
}

/// The Source record, as Debezium's Postgres connector declares it.
fn source_schema() -> Json {
    json!({
        "type": "record",
        "name": "Source",
        "namespace": "io.debezium.connector.postgresql",
        "fields": [
            { "name": "version", "type": "string" },
            { "name": "connector", "type": "string" },
            { "name": "name", "type": "string" },
            { "name": "ts_ms", "type": "long" },
            {
                "name": "snapshot",
                "type": {
                    "type": "string",
                    "connect.version": 1,
                    "connect.parameters": { "allowed": "true,last,false,incremental" },
                    "connect.default": "false",
                    "connect.name": "io.debezium.data.Enum",
                },
                "default": "false",
            },
            { "name": "db", "type": "string" },
            { "name": "sequence", "type": ["null", "string"], "default": null },
            { "name": "schema", "type": "string" },
            { "name": "table", "type": "string" },
            { "name": "txId", "type": ["null", "long"], "default": null },
            { "name": "lsn", "type": ["null", "long"], "default": null },
            { "name": "xmin", "type": ["null", "long"], "default": null },
        ],
        "connect.name": "io.debezium.connector.postgresql.Source",
    })
}

/// Debezium's transaction metadata block; walbridge always writes null for now.
fn transaction_schema() -> Json {
    json!({
        "type": "record",
        "name": "block",
        "namespace": "event",
        "fields": [
            { "name": "id", "type": "string" },
            { "name": "total_order", "type": "long" },
            { "name": "data_collection_order", "type": "long" },
        ],
        "connect.name": "event.block",
    })
}

/// An Avro name (`[A-Za-z_][A-Za-z0-9_]*`): other characters become `_`, a leading digit gets a
/// `_` prefix. Same rule as Debezium's `field.name.adjustment.mode=avro`.
pub fn avro_name(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 1);
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
        out.push('_');
    }
    out.extend(s.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' {
            c
        } else {
            '_'
        }
    }));
    out
}

/// A topic as an Avro namespace: each dot-separated part made a valid name.
pub fn avro_namespace(topic: &str) -> String {
    topic
        .split('.')
        .map(avro_name)
        .collect::<Vec<_>>()
        .join(".")
}
