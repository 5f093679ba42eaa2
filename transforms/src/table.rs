//! The published content of one view, kept as rows by key, and the Arrow batches built from it.
//!
//! A processor decides per epoch which keys it touched and what each key's row is now; the
//! table compares that with what it last published and records only real changes, so an
//! [`Epoch`](crate::view::Epoch) carries upserts for rows whose value moved and deletes for
//! keys that left, never no-op rewrites. Rows are kept sorted by key, so a snapshot's batch
//! order is deterministic (tests and the self-check compare them as they are).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, Decimal128Builder, Float64Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;

use crate::view::{ViewChanges, ViewDef};

/// One value of a view row. Decimals are unscaled (`12.30` at scale 2 is `1230`); timestamps
/// are microseconds since the Unix epoch, UTC.
#[derive(Debug, Clone)]
pub enum Cell {
    Null,
    Int(i64),
    Text(Arc<str>),
    Dec(i128),
    Float(f64),
    Ts(i64),
}

impl Cell {
    pub fn text(s: &str) -> Cell {
        Cell::Text(Arc::from(s))
    }

    fn rank(&self) -> u8 {
        match self {
            Cell::Null => 0,
            Cell::Int(_) => 1,
            Cell::Text(_) => 2,
            Cell::Dec(_) => 3,
            Cell::Float(_) => 4,
            Cell::Ts(_) => 5,
        }
    }

    /// Equal for the self-check: floats within a relative 1e-9 (SQL and Rust may round the
    /// last bit differently), everything else exactly.
    pub fn close_to(&self, other: &Cell) -> bool {
        match (self, other) {
            (Cell::Float(a), Cell::Float(b)) => {
                a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
            }
            _ => self == other,
        }
    }
}

impl PartialEq for Cell {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for Cell {}
impl PartialOrd for Cell {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Cell {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (self, other) {
            (Cell::Int(a), Cell::Int(b)) | (Cell::Ts(a), Cell::Ts(b)) => a.cmp(b),
            (Cell::Text(a), Cell::Text(b)) => a.cmp(b),
            (Cell::Dec(a), Cell::Dec(b)) => a.cmp(b),
            (Cell::Float(a), Cell::Float(b)) => a.total_cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cell::Null => f.write_str("NULL"),
            Cell::Int(v) | Cell::Ts(v) => write!(f, "{v}"),
            Cell::Text(s) => write!(f, "{s:?}"),
            Cell::Dec(v) => write!(f, "{v}e-2"),
            Cell::Float(v) => write!(f, "{v}"),
        }
    }
}

pub type Row = Vec<Cell>;

/// A view's rows by key, plus the changes since the last [`ViewTable::take_changes`].
#[derive(Debug)]
pub struct ViewTable {
    pub def: ViewDef,
    rows: BTreeMap<Row, Row>,
    upserted: BTreeSet<Row>,
    deleted: BTreeSet<Row>,
}

impl ViewTable {
    pub fn new(def: ViewDef) -> Self {
        Self {
            def,
            rows: BTreeMap::new(),
            upserted: BTreeSet::new(),
            deleted: BTreeSet::new(),
        }
    }

    fn key_of(&self, row: &Row) -> Row {
        self.def.key.iter().map(|&i| row[i].clone()).collect()
    }

    /// Sets the row of `key` (`None`: the key leaves the view). No-op writes are not recorded.
    pub fn set(&mut self, key: Row, row: Option<Row>) {
        match row {
            Some(row) => {
                debug_assert_eq!(self.key_of(&row), key);
                if self.rows.get(&key) == Some(&row) {
                    return;
                }
                self.deleted.remove(&key);
                self.upserted.insert(key.clone());
                self.rows.insert(key, row);
            }
            None => {
                if self.rows.remove(&key).is_some() {
                    self.upserted.remove(&key);
                    self.deleted.insert(key);
                }
            }
        }
    }

    pub fn get(&self, key: &Row) -> Option<&Row> {
        self.rows.get(key)
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn rows(&self) -> impl Iterator<Item = &Row> {
        self.rows.values()
    }

    pub fn has_changes(&self) -> bool {
        !self.upserted.is_empty() || !self.deleted.is_empty()
    }

    /// The changes recorded since the last call, as Arrow batches, and forgets them.
    pub fn take_changes(&mut self) -> Result<ViewChanges, ArrowError> {
        let upserted = std::mem::take(&mut self.upserted);
        let deleted = std::mem::take(&mut self.deleted);
        let rows: Vec<&Row> = upserted.iter().filter_map(|k| self.rows.get(k)).collect();
        let upserts = build_batch(&self.def.schema, &rows)?;
        let key_schema = Arc::new(self.def.schema.project(&self.def.key)?);
        let keys: Vec<&Row> = deleted.iter().collect();
        let deletes = build_batch(&key_schema, &keys)?;
        Ok(ViewChanges {
            view: self.def.name.clone(),
            upserts,
            deletes,
        })
    }

    /// Every row, in key order, in batches of at most 8192 rows.
    pub fn batches(&self) -> Result<Vec<RecordBatch>, ArrowError> {
        let rows: Vec<&Row> = self.rows.values().collect();
        if rows.is_empty() {
            return Ok(vec![RecordBatch::new_empty(self.def.schema.clone())]);
        }
        rows.chunks(8192)
            .map(|c| build_batch(&self.def.schema, c))
            .collect()
    }
}

/// Builds one batch of `schema` from rows whose cells follow the schema's column types.
pub fn build_batch(schema: &SchemaRef, rows: &[&Row]) -> Result<RecordBatch, ArrowError> {
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (i, field) in schema.fields().iter().enumerate() {
        let cell = |r: &&Row| r.get(i).cloned().unwrap_or(Cell::Null);
        let wrong = |c: &Cell| {
            ArrowError::InvalidArgumentError(format!(
                "column {} ({}) got a {c:?} cell: a processor built a row that does not match the view's schema",
                field.name(),
                field.data_type()
            ))
        };
        let col: ArrayRef = match field.data_type() {
            DataType::Int64 => {
                let mut b = Int64Builder::with_capacity(rows.len());
                for r in rows {
                    match cell(r) {
                        Cell::Int(v) => b.append_value(v),
                        Cell::Null => b.append_null(),
                        c => return Err(wrong(&c)),
                    }
                }
                Arc::new(b.finish())
            }
            DataType::Utf8 => {
                let mut b = StringBuilder::with_capacity(rows.len(), rows.len() * 12);
                for r in rows {
                    match cell(r) {
                        Cell::Text(v) => b.append_value(&*v),
                        Cell::Null => b.append_null(),
                        c => return Err(wrong(&c)),
                    }
                }
                Arc::new(b.finish())
            }
            DataType::Float64 => {
                let mut b = Float64Builder::with_capacity(rows.len());
                for r in rows {
                    match cell(r) {
                        Cell::Float(v) => b.append_value(v),
                        Cell::Null => b.append_null(),
                        c => return Err(wrong(&c)),
                    }
                }
                Arc::new(b.finish())
            }
            DataType::Decimal128(p, s) => {
                let mut b = Decimal128Builder::with_capacity(rows.len());
                for r in rows {
                    match cell(r) {
                        Cell::Dec(v) => b.append_value(v),
                        Cell::Null => b.append_null(),
                        c => return Err(wrong(&c)),
                    }
                }
                Arc::new(b.finish().with_precision_and_scale(*p, *s)?)
            }
            DataType::Timestamp(TimeUnit::Microsecond, tz) => {
                let mut b = TimestampMicrosecondBuilder::with_capacity(rows.len());
                for r in rows {
                    match cell(r) {
                        Cell::Ts(v) => b.append_value(v),
                        Cell::Null => b.append_null(),
                        c => return Err(wrong(&c)),
                    }
                }
                Arc::new(b.finish().with_timezone_opt(tz.clone()))
            }
            other => {
                return Err(ArrowError::NotYetImplemented(format!(
                    "view column type {other}"
                )));
            }
        };
        cols.push(col);
    }
    RecordBatch::try_new(schema.clone(), cols)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::{Field, Schema};

    fn table() -> ViewTable {
        ViewTable::new(ViewDef {
            name: "t".into(),
            schema: Arc::new(Schema::new(vec![
                Field::new("k", DataType::Utf8, false),
                Field::new("v", DataType::Int64, true),
            ])),
            key: vec![0],
            doc: String::new(),
        })
    }

    #[test]
    fn only_real_changes_reach_the_epoch() {
        let mut t = table();
        let k = vec![Cell::text("a")];
        t.set(k.clone(), Some(vec![Cell::text("a"), Cell::Int(1)]));
        let c = t.take_changes().unwrap();
        assert_eq!((c.upserts.num_rows(), c.deletes.num_rows()), (1, 0));
        t.set(k.clone(), Some(vec![Cell::text("a"), Cell::Int(1)]));
        assert!(!t.has_changes(), "rewriting the same row is no change");
        // Upsert then delete in one epoch: only the delete goes out.
        t.set(k.clone(), Some(vec![Cell::text("a"), Cell::Int(2)]));
        t.set(k.clone(), None);
        let c = t.take_changes().unwrap();
        assert_eq!((c.upserts.num_rows(), c.deletes.num_rows()), (0, 1));
        assert_eq!(
            c.deletes.num_columns(),
            1,
            "deletes carry the key columns only"
        );
        // A key that never was there: deleting it is no change.
        t.set(vec![Cell::text("b")], None);
        assert!(!t.has_changes());
    }
}
