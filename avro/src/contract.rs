//! Business-event contracts: the `.avsc` files under `avro/contracts/` and the encoder that
//! holds every mapped or outbox event to its contract.
//!
//! A contract is one Avro record schema, namespaced (`walbridge.retail.v1`), with a `doc` on the
//! record and on every field: the loader refuses an undocumented field, since the file is the
//! only documentation a consuming team gets. Every contract starts with the same metadata
//! fields, filled in by walbridge and never by a mapping ([`METADATA_FIELDS`]): `event_id`,
//! `occurred_at` (commit time) and `source` (system, db, table, lsn, txid).
//!
//! Values are checked against the contract while they are encoded ([`Contract::encode`]), so a
//! record is either valid and produced, or refused with a [`Violation`] naming the field path and
//! what is wrong (the caller sends it to the dead-letter topic). Nothing is coerced silently:
//! a decimal that would lose digits at the contract's scale, an `int` out of range, a null in a
//! non-nullable field, a string that is not one of an enum's symbols are all violations.
//!
//! Only the Avro subset contracts need is supported: primitives, `decimal` (bytes),
//! `timestamp-millis`/`-micros`, `date`, `uuid`, enums, arrays, nested records, and unions of
//! `null` with one other type.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::binary::{put_bool, put_bytes, put_double, put_float, put_long, put_union_branch};

/// Fields every contract carries and walbridge fills in itself.
pub const METADATA_FIELDS: [&str; 3] = ["event_id", "occurred_at", "source"];

/// The Avro type of one field, as far as contracts use Avro.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    Null,
    Boolean,
    Int,
    Long,
    Float,
    Double,
    String,
    Bytes,
    Uuid,
    Decimal {
        precision: u32,
        scale: u32,
    },
    TimestampMillis,
    TimestampMicros,
    Date,
    Enum {
        name: String,
        symbols: Vec<String>,
    },
    Array(Box<Shape>),
    Record(Record),
    /// `["null", T]` or `[T, "null"]`; `null_first` says which branch index null has.
    Nullable {
        inner: Box<Shape>,
        null_first: bool,
    },
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shape::Null => f.write_str("null"),
            Shape::Boolean => f.write_str("boolean"),
            Shape::Int => f.write_str("int"),
            Shape::Long => f.write_str("long"),
            Shape::Float => f.write_str("float"),
            Shape::Double => f.write_str("double"),
            Shape::String => f.write_str("string"),
            Shape::Bytes => f.write_str("bytes"),
            Shape::Uuid => f.write_str("string (uuid)"),
            Shape::Decimal { precision, scale } => write!(f, "decimal({precision},{scale})"),
            Shape::TimestampMillis => f.write_str("timestamp-millis"),
            Shape::TimestampMicros => f.write_str("timestamp-micros"),
            Shape::Date => f.write_str("date"),
            Shape::Enum { name, .. } => write!(f, "enum {name}"),
            Shape::Array(i) => write!(f, "array<{i}>"),
            Shape::Record(r) => write!(f, "record {}", r.name),
            Shape::Nullable { inner, .. } => write!(f, "{inner} or null"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Full name, `namespace.Name`.
    pub name: String,
    pub fields: Vec<Field>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub name: String,
    pub doc: String,
    pub shape: Shape,
}

impl Record {
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }
}

/// One contract file.
#[derive(Debug, Clone)]
pub struct Contract {
    /// The record's short name, e.g. `OrderPlaced`: what mappings and outbox rows name.
    pub name: String,
    /// `walbridge.retail.v1.OrderPlaced`.
    pub full_name: String,
    /// The schema as registered (the file's JSON, compacted).
    pub schema_json: String,
    pub root: Record,
    pub path: PathBuf,
}

/// A value to encode under a contract. Built by the mapping expressions or from an outbox
/// row's JSON payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Datum {
    Null,
    Bool(bool),
    Long(i64),
    Double(f64),
    Str(String),
    /// `unscaled / 10^scale`.
    Decimal {
        unscaled: i128,
        scale: u32,
    },
    /// Microseconds since the Unix epoch, UTC.
    TimestampMicros(i64),
    /// Days since 1970-01-01.
    Date(i32),
    Array(Vec<Datum>),
    Record(Vec<(String, Datum)>),
}

impl Datum {
    /// What kind of value this is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Datum::Null => "null",
            Datum::Bool(_) => "boolean",
            Datum::Long(_) => "integer",
            Datum::Double(_) => "double",
            Datum::Str(_) => "string",
            Datum::Decimal { .. } => "decimal",
            Datum::TimestampMicros(_) => "timestamp",
            Datum::Date(_) => "date",
            Datum::Array(_) => "array",
            Datum::Record(_) => "record",
        }
    }
}

/// Why a value does not fit its contract: the field path (`lines[3].qty`) and what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("field {path}: {message}")]
pub struct Violation {
    pub path: String,
    pub message: String,
}

/// A contract file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("contract {path}: {message}")]
pub struct ContractError {
    pub path: PathBuf,
    pub message: String,
}

/// Loads every `*.avsc` of `dir`, sorted by file name.
pub fn load_dir(dir: &Path) -> Result<Vec<Contract>, ContractError> {
    let err = |message: String| ContractError {
        path: dir.to_owned(),
        message,
    };
    let entries = std::fs::read_dir(dir).map_err(|e| {
        err(format!(
            "cannot read the contracts directory: {e}; point events.contracts_dir at the folder holding the .avsc files"
        ))
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "avsc"))
        .collect();
    paths.sort();
    let mut out: Vec<Contract> = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(&p).map_err(|e| ContractError {
            path: p.clone(),
            message: format!("cannot read: {e}"),
        })?;
        let c = Contract::parse(&text, &p)?;
        if let Some(other) = out.iter().find(|o| o.name == c.name) {
            return Err(ContractError {
                path: p,
                message: format!(
                    "defines {} which {} defines too; names must be unique",
                    c.name,
                    other.path.display()
                ),
            });
        }
        out.push(c);
    }
    Ok(out)
}

impl Contract {
    /// Parses and checks one contract (see the module doc for what is required).
    pub fn parse(text: &str, path: &Path) -> Result<Contract, ContractError> {
        let err = |message: String| ContractError {
            path: path.to_owned(),
            message,
        };
        let json: Json =
            serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        // apache-avro is the reference for "is this a valid Avro schema at all".
        apache_avro::Schema::parse_str(text)
            .map_err(|e| err(format!("not a valid Avro schema: {e}")))?;
        let mut named = HashMap::new();
        let shape = parse_shape(&json, "", &mut named, "").map_err(err)?;
        let Shape::Record(root) = shape else {
            return Err(err("the top level must be a record".into()));
        };
        if json
            .get("doc")
            .and_then(Json::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(err(format!(
                "record {} has no doc; say what the event means",
                root.name
            )));
        }
        for m in METADATA_FIELDS {
            if root.field(m).is_none() {
                return Err(err(format!(
                    "{} lacks the metadata field {m}; every contract starts with event_id, occurred_at and source (see avro/contracts/README.md)",
                    root.name
                )));
            }
        }
        let name = root
            .name
            .rsplit('.')
            .next()
            .unwrap_or(&root.name)
            .to_owned();
        if !root.name.contains('.') {
            return Err(err(format!(
                "record {name} has no namespace; give it one such as walbridge.retail.v1"
            )));
        }
        Ok(Contract {
            name,
            full_name: root.name.clone(),
            schema_json: json.to_string(),
            root,
            path: path.to_owned(),
        })
    }

    /// Encodes `fields` (the root record's fields by name) as an Avro datum into `out`, checking
    /// every value against the contract. On error `out` holds garbage.
    pub fn encode(&self, fields: &[(String, Datum)], out: &mut Vec<u8>) -> Result<(), Violation> {
        encode_record(&self.root, fields, "", out)
    }
}

fn parse_shape(
    j: &Json,
    ns: &str,
    named: &mut HashMap<String, Shape>,
    at: &str,
) -> Result<Shape, String> {
    match j {
        Json::String(s) => primitive(s).or_else(|| {
            let full = if s.contains('.') || ns.is_empty() {
                s.clone()
            } else {
                format!("{ns}.{s}")
            };
            named.get(&full).or_else(|| named.get(s)).cloned()
        }),
        Json::Array(branches) => {
            let null_at = branches.iter().position(|b| b == "null");
            match (branches.len(), null_at) {
                (2, Some(i)) => {
                    let inner = parse_shape(&branches[1 - i], ns, named, at)?;
                    return Ok(Shape::Nullable {
                        inner: Box::new(inner),
                        null_first: i == 0,
                    });
                }
                _ => {
                    return Err(format!(
                        "{at}: only unions of null and one other type are supported"
                    ));
                }
            }
        }
        Json::Object(o) => {
            let ty = o.get("type").ok_or_else(|| format!("{at}: no type"))?;
            let logical = o.get("logicalType").and_then(Json::as_str);
            match (ty.as_str(), logical) {
                (Some("bytes"), Some("decimal")) => {
                    let precision = o.get("precision").and_then(Json::as_u64).unwrap_or(0) as u32;
                    let scale = o.get("scale").and_then(Json::as_u64).unwrap_or(0) as u32;
                    return Ok(Shape::Decimal { precision, scale });
                }
                (Some("long"), Some("timestamp-millis")) => return Ok(Shape::TimestampMillis),
                (Some("long"), Some("timestamp-micros")) => return Ok(Shape::TimestampMicros),
                (Some("int"), Some("date")) => return Ok(Shape::Date),
                (Some("string"), Some("uuid")) => return Ok(Shape::Uuid),
                (Some("record"), _) => {
                    let name = o.get("name").and_then(Json::as_str).unwrap_or_default();
                    let ns = o.get("namespace").and_then(Json::as_str).unwrap_or(ns);
                    let full = if name.contains('.') || ns.is_empty() {
                        name.to_owned()
                    } else {
                        format!("{ns}.{name}")
                    };
                    let mut fields = Vec::new();
                    for fj in o.get("fields").and_then(Json::as_array).into_iter().flatten() {
                        let fname = fj.get("name").and_then(Json::as_str).unwrap_or_default();
                        let path = if at.is_empty() {
                            fname.to_owned()
                        } else {
                            format!("{at}.{fname}")
                        };
                        let doc = fj.get("doc").and_then(Json::as_str).unwrap_or_default();
                        if doc.trim().is_empty() {
                            return Err(format!(
                                "field {path} of {full} has no doc; document every field (what it means, its unit)"
                            ));
                        }
                        let ft = fj
                            .get("type")
                            .ok_or_else(|| format!("field {path}: no type"))?;
                        fields.push(Field {
                            name: fname.to_owned(),
                            doc: doc.to_owned(),
                            shape: parse_shape(ft, ns, named, &path)?,
                        });
                    }
                    let shape = Shape::Record(Record {
                        name: full.clone(),
                        fields,
                    });
                    named.insert(full, shape.clone());
                    return Ok(shape);
                }
                (Some("enum"), _) => {
                    let name = o.get("name").and_then(Json::as_str).unwrap_or_default();
                    let symbols = o
                        .get("symbols")
                        .and_then(Json::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect();
                    let shape = Shape::Enum {
                        name: name.to_owned(),
                        symbols,
                    };
                    named.insert(name.to_owned(), shape.clone());
                    return Ok(shape);
                }
                (Some("array"), _) => {
                    let items = o.get("items").ok_or_else(|| format!("{at}: no items"))?;
                    return Ok(Shape::Array(Box::new(parse_shape(items, ns, named, at)?)));
                }
                _ => {}
            }
            return parse_shape(ty, ns, named, at);
        }
        _ => None,
    }
    .ok_or_else(|| format!("{at}: unsupported or unknown type {j}"))
}

fn primitive(s: &str) -> Option<Shape> {
    Some(match s {
        "null" => Shape::Null,
        "boolean" => Shape::Boolean,
        "int" => Shape::Int,
        "long" => Shape::Long,
        "float" => Shape::Float,
        "double" => Shape::Double,
        "string" => Shape::String,
        "bytes" => Shape::Bytes,
        _ => return None,
    })
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn encode_record(
    r: &Record,
    fields: &[(String, Datum)],
    path: &str,
    out: &mut Vec<u8>,
) -> Result<(), Violation> {
    if let Some((extra, _)) = fields.iter().find(|(n, _)| r.field(n).is_none()) {
        return Err(Violation {
            path: join(path, extra),
            message: format!("{} has no such field", r.name),
        });
    }
    for f in &r.fields {
        let p = join(path, &f.name);
        let v = fields
            .iter()
            .find(|(n, _)| *n == f.name)
            .map(|(_, v)| v)
            .unwrap_or(&Datum::Null);
        encode(&f.shape, v, &p, out)?;
    }
    Ok(())
}

fn bad(path: &str, shape: &Shape, v: &Datum) -> Violation {
    let message = match v {
        Datum::Null => format!("is null but the contract requires {shape}"),
        _ => format!("expected {shape}, got {} {}", v.kind(), short(v)),
    };
    Violation {
        path: path.to_owned(),
        message,
    }
}

/// A value for a message; long strings are cut (they may be user data).
fn short(v: &Datum) -> String {
    match v {
        Datum::Str(s) if s.chars().count() > 40 => {
            format!("{:?}…", s.chars().take(40).collect::<String>())
        }
        Datum::Str(s) => format!("{s:?}"),
        Datum::Long(n) => n.to_string(),
        Datum::Double(d) => d.to_string(),
        Datum::Bool(b) => b.to_string(),
        Datum::Decimal { unscaled, scale } => decimal_text(*unscaled, *scale),
        _ => String::new(),
    }
}

/// `unscaled / 10^scale` as decimal text.
pub fn decimal_text(unscaled: i128, scale: u32) -> String {
    let digits = unscaled.unsigned_abs().to_string();
    let sign = if unscaled < 0 { "-" } else { "" };
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let s = scale as usize;
    let padded = format!("{digits:0>width$}", width = s + 1);
    let (i, f) = padded.split_at(padded.len() - s);
    format!("{sign}{i}.{f}")
}

/// Rescales a decimal; `None` when digits would be lost or it overflows.
pub fn rescale(unscaled: i128, from: u32, to: u32) -> Option<i128> {
    if to >= from {
        unscaled.checked_mul(10i128.checked_pow(to - from)?)
    } else {
        let d = 10i128.checked_pow(from - to)?;
        (unscaled % d == 0).then(|| unscaled / d)
    }
}

fn encode(shape: &Shape, v: &Datum, path: &str, out: &mut Vec<u8>) -> Result<(), Violation> {
    match (shape, v) {
        (Shape::Nullable { null_first, .. }, Datum::Null) => {
            put_union_branch(out, if *null_first { 0 } else { 1 });
            Ok(())
        }
        (Shape::Nullable { inner, null_first }, _) => {
            put_union_branch(out, if *null_first { 1 } else { 0 });
            encode(inner, v, path, out)
        }
        (Shape::Null, Datum::Null) => Ok(()),
        (Shape::Boolean, Datum::Bool(b)) => {
            put_bool(out, *b);
            Ok(())
        }
        (Shape::Int, Datum::Long(n)) => {
            if i32::try_from(*n).is_err() {
                return Err(Violation {
                    path: path.to_owned(),
                    message: format!("{n} is out of range for int"),
                });
            }
            put_long(out, *n);
            Ok(())
        }
        (Shape::Long, Datum::Long(n)) => {
            put_long(out, *n);
            Ok(())
        }
        (Shape::Int | Shape::Long, Datum::Decimal { unscaled, scale }) => {
            match rescale(*unscaled, *scale, 0).and_then(|n| i64::try_from(n).ok()) {
                Some(n) => encode(shape, &Datum::Long(n), path, out),
                None => Err(bad(path, shape, v)),
            }
        }
        (Shape::Float, Datum::Double(d)) => {
            put_float(out, *d as f32);
            Ok(())
        }
        (Shape::Double, Datum::Double(d)) => {
            put_double(out, *d);
            Ok(())
        }
        (Shape::Float | Shape::Double, Datum::Long(n)) => {
            encode(shape, &Datum::Double(*n as f64), path, out)
        }
        (Shape::Float | Shape::Double, Datum::Decimal { unscaled, scale }) => encode(
            shape,
            &Datum::Double(*unscaled as f64 / 10f64.powi(*scale as i32)),
            path,
            out,
        ),
        (Shape::String | Shape::Uuid, Datum::Str(s)) => {
            put_bytes(out, s.as_bytes());
            Ok(())
        }
        (Shape::Bytes, Datum::Str(s)) => {
            put_bytes(out, s.as_bytes());
            Ok(())
        }
        (Shape::Enum { symbols, name }, Datum::Str(s)) => match symbols.iter().position(|x| x == s)
        {
            Some(i) => {
                put_long(out, i as i64);
                Ok(())
            }
            None => Err(Violation {
                path: path.to_owned(),
                message: format!(
                    "{s:?} is not a symbol of enum {name} ({})",
                    symbols.join(", ")
                ),
            }),
        },
        (Shape::Decimal { precision, scale }, Datum::Decimal { .. } | Datum::Long(_)) => {
            let (u, s) = match v {
                Datum::Decimal { unscaled, scale } => (*unscaled, *scale),
                Datum::Long(n) => (i128::from(*n), 0),
                _ => unreachable!("matched above"),
            };
            let Some(at) = rescale(u, s, *scale) else {
                return Err(Violation {
                    path: path.to_owned(),
                    message: format!(
                        "{} has more fractional digits than decimal({precision},{scale}) keeps",
                        decimal_text(u, s)
                    ),
                });
            };
            if *precision > 0
                && at.unsigned_abs().to_string().len() > *precision as usize
                && at != 0
            {
                return Err(Violation {
                    path: path.to_owned(),
                    message: format!(
                        "{} does not fit decimal({precision},{scale})",
                        decimal_text(u, s)
                    ),
                });
            }
            let bytes = at.to_be_bytes();
            // Minimal two's complement: drop leading bytes that only repeat the sign.
            let mut start = 0;
            while start < 15 {
                let (b, next) = (bytes[start], bytes[start + 1]);
                if (b == 0 && next & 0x80 == 0) || (b == 0xff && next & 0x80 != 0) {
                    start += 1;
                } else {
                    break;
                }
            }
            put_bytes(out, &bytes[start..]);
            Ok(())
        }
        (Shape::TimestampMillis, Datum::TimestampMicros(us)) => {
            put_long(out, us.div_euclid(1000));
            Ok(())
        }
        (Shape::TimestampMicros, Datum::TimestampMicros(us)) => {
            put_long(out, *us);
            Ok(())
        }
        (Shape::Date, Datum::Date(d)) => {
            put_long(out, i64::from(*d));
            Ok(())
        }
        (Shape::Array(item), Datum::Array(items)) => {
            if !items.is_empty() {
                put_long(out, items.len() as i64);
                for (i, it) in items.iter().enumerate() {
                    encode(item, it, &format!("{path}[{i}]"), out)?;
                }
            }
            put_long(out, 0);
            Ok(())
        }
        (Shape::Record(r), Datum::Record(fields)) => encode_record(r, fields, path, out),
        _ => Err(bad(path, shape, v)),
    }
}

/// Builds a [`Datum`] for `shape` from JSON (an outbox payload), so that it can be checked and
/// encoded like a mapped event. Decimals may be JSON numbers or strings ("12.50"); timestamps are
/// epoch milliseconds; dates are days since the epoch or "YYYY-MM-DD".
pub fn datum_from_json(shape: &Shape, j: &Json, path: &str) -> Result<Datum, Violation> {
    let bad = |what: &str| Violation {
        path: path.to_owned(),
        message: format!("expected {what}, got JSON {}", json_kind(j)),
    };
    Ok(match (shape, j) {
        (_, Json::Null) => Datum::Null,
        (Shape::Nullable { inner, .. }, _) => datum_from_json(inner, j, path)?,
        (Shape::Boolean, Json::Bool(b)) => Datum::Bool(*b),
        (Shape::Int | Shape::Long, Json::Number(n)) => {
            Datum::Long(n.as_i64().ok_or_else(|| bad("an integer"))?)
        }
        (Shape::Float | Shape::Double, Json::Number(n)) => {
            Datum::Double(n.as_f64().ok_or_else(|| bad("a number"))?)
        }
        (Shape::String | Shape::Uuid | Shape::Enum { .. } | Shape::Bytes, Json::String(s)) => {
            Datum::Str(s.clone())
        }
        (Shape::Decimal { .. }, Json::Number(n)) => {
            parse_decimal(&n.to_string()).ok_or_else(|| bad("a decimal"))?
        }
        (Shape::Decimal { .. }, Json::String(s)) => {
            parse_decimal(s).ok_or_else(|| bad("a decimal such as \"12.50\""))?
        }
        (Shape::TimestampMillis | Shape::TimestampMicros, Json::Number(n)) => {
            Datum::TimestampMicros(
                n.as_i64()
                    .and_then(|ms| ms.checked_mul(1000))
                    .ok_or_else(|| bad("epoch milliseconds"))?,
            )
        }
        (Shape::Date, Json::Number(n)) => Datum::Date(
            n.as_i64()
                .and_then(|d| i32::try_from(d).ok())
                .ok_or_else(|| bad("days since 1970-01-01"))?,
        ),
        (Shape::Date, Json::String(s)) => Datum::Date(
            crate::pgtext::date(s.as_bytes()).map_err(|_| bad("a date \"YYYY-MM-DD\""))?,
        ),
        (Shape::Array(item), Json::Array(items)) => Datum::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, it)| datum_from_json(item, it, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        (Shape::Record(r), Json::Object(o)) => {
            if let Some(k) = o.keys().find(|k| r.field(k).is_none()) {
                return Err(Violation {
                    path: join(path, k),
                    message: format!("{} has no such field", r.name),
                });
            }
            Datum::Record(
                r.fields
                    .iter()
                    .filter_map(|f| {
                        let v = o.get(&f.name)?;
                        Some(
                            datum_from_json(&f.shape, v, &join(path, &f.name))
                                .map(|d| (f.name.clone(), d)),
                        )
                    })
                    .collect::<Result<_, _>>()?,
            )
        }
        _ => return Err(bad(&shape.to_string())),
    })
}

/// Postgres `timestamp` (`tz` false, read as UTC) or `timestamptz` text → microseconds since the
/// Unix epoch, UTC; `None` when it does not parse (or is infinity).
pub fn pg_timestamp_micros(text: &[u8], tz: bool) -> Option<i64> {
    crate::pgtext::timestamp(text, tz).ok()
}

/// Postgres `date` text → days since 1970-01-01.
pub fn pg_date_days(text: &[u8]) -> Option<i32> {
    crate::pgtext::date(text).ok()
}

fn json_kind(j: &Json) -> &'static str {
    match j {
        Json::Null => "null",
        Json::Bool(_) => "boolean",
        Json::Number(_) => "number",
        Json::String(_) => "string",
        Json::Array(_) => "array",
        Json::Object(_) => "object",
    }
}

/// Parses `-12.340` into (unscaled, scale); `None` when it is not a plain decimal.
pub fn parse_decimal(s: &str) -> Option<Datum> {
    let (neg, rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (i, f) = rest.split_once('.').unwrap_or((rest, ""));
    if (i.is_empty() && f.is_empty())
        || !i.bytes().all(|b| b.is_ascii_digit())
        || !f.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let mut u: i128 = 0;
    for b in i.bytes().chain(f.bytes()) {
        u = u.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
    }
    Some(Datum::Decimal {
        unscaled: if neg { -u } else { u },
        scale: f.len() as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contracts() -> Vec<Contract> {
        load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("contracts")).unwrap()
    }

    #[test]
    // GenericDatumReader needs a reader schema too; the plain function is enough here.
    #[allow(deprecated)]
    fn the_shipped_contracts_load_and_decode_with_apache_avro() {
        let all = contracts();
        assert_eq!(all.len(), 12);
        let c = all.iter().find(|c| c.name == "StockAdjusted").unwrap();
        assert_eq!(c.full_name, "walbridge.retail.v1.StockAdjusted");
        let source = Datum::Record(vec![
            ("system".into(), Datum::Str("legacy".into())),
            ("db".into(), Datum::Str("legacy".into())),
            ("table".into(), Datum::Str("wms.stock_levels".into())),
            ("lsn".into(), Datum::Str("0/16B3748".into())),
            ("txid".into(), Datum::Long(750)),
        ]);
        let fields = vec![
            ("event_id".into(), Datum::Str("0/16B3748:0:stock".into())),
            (
                "occurred_at".into(),
                Datum::TimestampMicros(1_700_000_000_123_456),
            ),
            ("source".into(), source),
            ("sku".into(), Datum::Str("SKU-1".into())),
            ("location_code".into(), Datum::Str("DC1".into())),
            ("delta".into(), Datum::Long(-3)),
            ("reason".into(), Datum::Str("pick".into())),
            ("on_hand".into(), Datum::Long(7)),
            ("previous_on_hand".into(), Datum::Long(10)),
        ];
        let mut out = Vec::new();
        c.encode(&fields, &mut out).unwrap();
        let schema = apache_avro::Schema::parse_str(&c.schema_json).unwrap();
        let v = apache_avro::from_avro_datum(&schema, &mut &out[..], None).unwrap();
        let apache_avro::types::Value::Record(got) = v else {
            panic!("{v:?}")
        };
        assert_eq!(got[5].1, apache_avro::types::Value::Int(-3));
        assert_eq!(
            got[1].1,
            apache_avro::types::Value::TimestampMillis(1_700_000_000_123)
        );
    }

    #[test]
    fn violations_name_the_field_and_the_problem() {
        let all = contracts();
        let c = all.iter().find(|c| c.name == "PriceChanged").unwrap();
        let mut out = Vec::new();
        let e = c
            .encode(
                &[("new_price".into(), parse_decimal("12.345").unwrap())],
                &mut out,
            )
            .unwrap_err();
        assert_eq!(e.path, "event_id", "metadata is checked first: {e}");
        let e = encode(
            &Shape::Decimal {
                precision: 12,
                scale: 2,
            },
            &parse_decimal("12.345").unwrap(),
            "new_price",
            &mut out,
        )
        .unwrap_err();
        assert!(e.message.contains("fractional digits"), "{e}");
        let e = encode(&Shape::Int, &Datum::Long(1 << 40), "qty", &mut out).unwrap_err();
        assert!(e.message.contains("out of range"), "{e}");
        let e = encode(&Shape::Long, &Datum::Null, "order_id", &mut out).unwrap_err();
        assert_eq!(
            e.to_string(),
            "field order_id: is null but the contract requires long"
        );
    }

    #[test]
    fn decimals_encode_as_minimal_twos_complement() {
        for (text, want) in [
            ("0.00", vec![0u8]),
            ("1.27", vec![127]),
            ("1.28", vec![0, 128]),
            ("-1.28", vec![128]),
            ("-1.29", vec![255, 127]),
        ] {
            let mut out = Vec::new();
            encode(
                &Shape::Decimal {
                    precision: 12,
                    scale: 2,
                },
                &parse_decimal(text).unwrap(),
                "x",
                &mut out,
            )
            .unwrap();
            assert_eq!(out[1..], want[..], "{text}");
        }
        assert_eq!(decimal_text(-5, 2), "-0.05");
        assert_eq!(decimal_text(1234, 2), "12.34");
    }

    #[test]
    fn an_undocumented_field_is_refused() {
        let text = r#"{"type":"record","name":"X","namespace":"a.b","doc":"d","fields":[{"name":"event_id","type":"string"}]}"#;
        let e = Contract::parse(text, Path::new("X.avsc")).unwrap_err();
        assert!(e.message.contains("event_id of a.b.X has no doc"), "{e}");
    }
}
