//! The change events the processors read, decoded from walbridge's change topics.
//!
//! Only the columns the views need are kept (a projection per table). A change is the row's
//! primary key and its new projection (`None`: the row is gone); the old row comes from the
//! processors' own last-row-per-key state, see the crate docs for why.

use std::collections::HashMap;

use apache_avro::Schema;
use apache_avro::types::Value;

/// Tables the processors read, as `schema.table`.
pub const TABLES: [&str; 7] = [
    "oms.products",
    "oms.customers",
    "oms.orders",
    "oms.order_lines",
    "oms.returns",
    "oms.inventory_cache",
    "wms.stock_levels",
];

/// The primary-key columns of each of [`TABLES`] (legacy-fixtures/sql/schema.sql). The fold keeps
/// the last row per primary key and reads each key's changes in one partition's order, so an
/// input routed by other columns (`kafka.partition_by`, which then moves rows between
/// partitions) is refused until the fold orders a key's changes by source position (scale-out
/// step 2 in the crate doc).
pub const KEYS: [&[&str]; 7] = [
    &["sku"],
    &["id"],
    &["id"],
    &["order_id", "line_no"],
    &["id"],
    &["sku", "location_code"],
    &["sku", "location_code"],
];

/// Tables of [`TABLES`] whose rows the fold does not keep (only new order lines count), so
/// routing them by any column is safe: a line that moves partitions arrives as a delete, which
/// changes nothing, and a create, which counts as a line landing on its new SKU.
pub const ROWS_NOT_KEPT: [&str; 1] = ["oms.order_lines"];

/// Tables of [`TABLES`] the fold orders by source position, so they may be routed by a column
/// outside their key: a row that moves between partitions is put back in source order
/// (`State::apply_at`).
pub const ORDERED_BY_POSITION: [&str; 1] = ["oms.orders"];

/// The index in its transaction from a `walbridge.event_id` (`<commit LSN>:<index>`).
pub fn event_index(event_id: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(event_id).ok()?;
    text.rsplit_once(':')?.1.parse().ok()
}

pub type SkuLoc = (String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stock {
    pub on_hand: i64,
    pub reserved: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Order {
    pub customer_id: i64,
    pub status: String,
    /// `total` in cents (numeric(12,2)).
    pub total_cents: i128,
    /// Microseconds since the epoch, UTC.
    pub placed_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Product {
        sku: String,
        category: Option<String>,
    },
    Customer {
        id: i64,
        exists: bool,
    },
    Order {
        id: i64,
        row: Option<Order>,
    },
    /// Only new lines matter (the oversell alert); updates and deletes of lines are ignored.
    OrderLineAdded {
        order_id: i64,
        sku: String,
    },
    Return {
        id: i64,
        order_id: Option<i64>,
    },
    InventoryCache {
        key: SkuLoc,
        available: Option<i64>,
    },
    StockLevel {
        key: SkuLoc,
        row: Option<Stock>,
    },
    /// TRUNCATE of one of [`TABLES`] (by index).
    Truncate(usize),
}

/// One change with where it came from in the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub change: Change,
    /// `source.lsn` (0 when absent).
    pub lsn: u64,
    /// `source.ts_ms`: when the source committed the change.
    pub ts_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not an Avro datum of its writer schema: {0}")]
    Avro(String),
    #[error(
        "field {0} is missing or has an unexpected type (is the table's shape the one in legacy-fixtures/sql/schema.sql?)"
    )]
    Field(&'static str),
}

fn record_field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    let v = unwrap_union(v);
    match v {
        Value::Record(fields) => fields.iter().find(|(n, _)| n == name).map(|(_, v)| v),
        _ => None,
    }
}

fn unwrap_union(v: &Value) -> &Value {
    match v {
        Value::Union(_, inner) => inner,
        v => v,
    }
}

fn row<'a>(env: &'a Value, which: &str) -> Option<&'a Value> {
    let r = record_field(env, which)?;
    match unwrap_union(r) {
        Value::Null => None,
        r => Some(r),
    }
}

fn text(r: &Value, name: &'static str) -> Result<String, DecodeError> {
    match record_field(r, name).map(unwrap_union) {
        Some(Value::String(s)) | Some(Value::Enum(_, s)) => Ok(s.clone()),
        _ => Err(DecodeError::Field(name)),
    }
}

fn int(r: &Value, name: &'static str) -> Result<i64, DecodeError> {
    match record_field(r, name).map(unwrap_union) {
        Some(Value::Int(v)) => Ok(i64::from(*v)),
        Some(Value::Long(v)) => Ok(*v),
        _ => Err(DecodeError::Field(name)),
    }
}

fn micros(r: &Value, name: &'static str) -> Result<i64, DecodeError> {
    match record_field(r, name).map(unwrap_union) {
        Some(Value::TimestampMicros(v)) | Some(Value::LocalTimestampMicros(v)) => Ok(*v),
        Some(Value::Long(v)) => Ok(*v),
        _ => Err(DecodeError::Field(name)),
    }
}

/// Unscaled value of a decimal (scale as declared by the column: numeric(12,2) here).
fn decimal(r: &Value, name: &'static str) -> Result<i128, DecodeError> {
    let bytes: Vec<u8> = match record_field(r, name).map(unwrap_union) {
        Some(Value::Decimal(d)) => d.try_into().map_err(|_| DecodeError::Field(name))?,
        Some(Value::Bytes(b)) => b.clone(),
        _ => return Err(DecodeError::Field(name)),
    };
    if bytes.is_empty() || bytes.len() > 16 {
        return Err(DecodeError::Field(name));
    }
    let neg = bytes[0] & 0x80 != 0;
    let mut buf = [if neg { 0xFF } else { 0 }; 16];
    buf[16 - bytes.len()..].copy_from_slice(&bytes);
    Ok(i128::from_be_bytes(buf))
}

/// Decodes one change-topic message of `table` (an index into [`TABLES`]). `Ok(vec![])` for
/// messages that carry nothing for the views (e.g. updates of order lines).
pub fn decode(table: usize, writer: &Schema, mut datum: &[u8]) -> Result<Vec<Event>, DecodeError> {
    // The 0.22 replacement (GenericDatumReader) decodes the same; this keeps one call.
    #[allow(deprecated)]
    let env = apache_avro::from_avro_datum(writer, &mut datum, None)
        .map_err(|e| DecodeError::Avro(e.to_string()))?;
    let op = text(&env, "op")?;
    let source = record_field(&env, "source").ok_or(DecodeError::Field("source"))?;
    let lsn = int(source, "lsn").unwrap_or(0).max(0) as u64;
    let ts_ms = int(source, "ts_ms").unwrap_or(0);
    let at = |change| Event { change, lsn, ts_ms };
    if op == "t" {
        return Ok(vec![at(Change::Truncate(table))]);
    }
    let before = row(&env, "before");
    let after = row(&env, "after");
    // The row's key before and after; an update that moves the key is a delete plus an upsert.
    let mut out = Vec::with_capacity(2);
    let key = |r: &Value| -> Result<Key, DecodeError> { Key::of(table, r) };
    let new_key = after.map(key).transpose()?;
    if let Some(b) = before {
        let old = key(b)?;
        if new_key.as_ref() != Some(&old)
            && let Some(c) = old.gone()
        {
            out.push(at(c));
        }
    }
    if let (Some(a), Some(k)) = (after, new_key) {
        // Only a live insert is a new order line: a snapshot row (op r) is an order placed
        // before walbridge looked, and alerting on it would flood the alert topic at start.
        if let Some(c) = k.upsert(a, op == "c")? {
            out.push(at(c));
        }
    }
    Ok(out)
}

#[derive(Debug, PartialEq, Eq)]
enum Key {
    Sku(String),
    Id(i64),
    SkuLoc(SkuLoc),
    Line(i64),
    Stock(SkuLoc),
    Return(i64),
    Customer(i64),
}

impl Key {
    fn of(table: usize, r: &Value) -> Result<Key, DecodeError> {
        Ok(match TABLES[table] {
            "oms.products" => Key::Sku(text(r, "sku")?),
            "oms.customers" => Key::Customer(int(r, "id")?),
            "oms.orders" => Key::Id(int(r, "id")?),
            "oms.order_lines" => Key::Line(int(r, "order_id")? * 1000 + int(r, "line_no")?),
            "oms.returns" => Key::Return(int(r, "id")?),
            "oms.inventory_cache" => Key::SkuLoc((text(r, "sku")?, text(r, "location_code")?)),
            _ => Key::Stock((text(r, "sku")?, text(r, "location_code")?)),
        })
    }

    fn gone(self) -> Option<Change> {
        Some(match self {
            Key::Sku(sku) => Change::Product {
                sku,
                category: None,
            },
            Key::Customer(id) => Change::Customer { id, exists: false },
            Key::Id(id) => Change::Order { id, row: None },
            // A deleted order line changes no view (see Change::OrderLineAdded).
            Key::Line(_) => return None,
            Key::Return(id) => Change::Return { id, order_id: None },
            Key::SkuLoc(key) => Change::InventoryCache {
                key,
                available: None,
            },
            Key::Stock(key) => Change::StockLevel { key, row: None },
        })
    }

    fn upsert(self, a: &Value, insert: bool) -> Result<Option<Change>, DecodeError> {
        Ok(Some(match self {
            Key::Sku(sku) => Change::Product {
                sku,
                category: Some(text(a, "category")?),
            },
            Key::Customer(id) => Change::Customer { id, exists: true },
            Key::Id(id) => Change::Order {
                id,
                row: Some(Order {
                    customer_id: int(a, "customer_id")?,
                    status: text(a, "status")?,
                    total_cents: decimal(a, "total")?,
                    placed_at: micros(a, "placed_at")?,
                    updated_at: micros(a, "updated_at")?,
                }),
            },
            Key::Line(_) if insert => Change::OrderLineAdded {
                order_id: int(a, "order_id")?,
                sku: text(a, "sku")?,
            },
            Key::Line(_) => return Ok(None),
            Key::Return(id) => Change::Return {
                id,
                order_id: Some(int(a, "order_id")?),
            },
            Key::SkuLoc(key) => Change::InventoryCache {
                key,
                available: Some(int(a, "available")?),
            },
            Key::Stock(key) => Change::StockLevel {
                key,
                row: Some(Stock {
                    on_hand: int(a, "on_hand")?,
                    reserved: int(a, "reserved")?,
                }),
            },
        }))
    }
}

/// Writer schemas by registry id, fetched once each.
#[derive(Debug, Default)]
pub struct Schemas {
    by_id: HashMap<u32, Schema>,
}

impl Schemas {
    pub fn get(&self, id: u32) -> Option<&Schema> {
        self.by_id.get(&id)
    }

    pub fn insert(&mut self, id: u32, schema: Schema) {
        self.by_id.insert(id, schema);
    }
}
