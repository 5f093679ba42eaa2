//! The published content of one view, kept as rows by key, and the Arrow batches built from it.
//!
//! A processor decides per epoch which keys it touched and what each key's row is now; the
//! table compares that with what it last published and records only real changes, so an
//! [`Epoch`](crate::view::Epoch) carries upserts for rows whose value moved and deletes for
//! keys that left, never no-op rewrites.
//!
//! Rows sit in slots, in the order their keys first came (a freed slot goes to the next new
//! key), so a scan returns them in no key order, like a table; [`ViewTable::rows`] sorts for
//! the self-check. Hashing uses fixed seeds, so the same changes give the same epochs and
//! batches run after run.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock};

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
impl Hash for Cell {
    /// Consistent with `Eq`: equal cells have the same variant and value (floats by bits,
    /// which is what `total_cmp` equality means).
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.rank().hash(state);
        match self {
            Cell::Null => {}
            Cell::Int(v) | Cell::Ts(v) => v.hash(state),
            Cell::Text(s) => s.hash(state),
            Cell::Dec(v) => v.hash(state),
            Cell::Float(v) => v.to_bits().hash(state),
        }
    }
}
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

/// A stored row: shared, so copying a chunk (see [`Chunk`]) copies pointers, not rows.
type Stored = Arc<[Cell]>;

/// Rows per chunk. Small enough that an epoch touching a few keys rebuilds a few hundred
/// rows, large enough that a whole view stays a few hundred batches.
const CHUNK_ROWS: usize = 512;
// Positions in a chunk's index are u16.
const _: () = assert!(CHUNK_ROWS <= 1 << 16);

/// The hasher of view keys: fixed seeds, so the order changes come out in depends only on the
/// order they were made in (tests and sinks see the same epochs run after run).
pub(crate) fn hasher() -> ahash::RandomState {
    ahash::RandomState::with_seeds(0x7761_6c62, 0x7269_6467, 0x6520_7669, 0x6577_7321)
}

/// The hash of a row's leading key column in [`Chunk::lead`].
fn lead_hash(cell: &Cell) -> u64 {
    hasher().hash_one(cell)
}

/// A range of slots of a view's rows, its index by leading key column, and its Arrow batch
/// once somebody read it.
///
/// Chunks are shared between the table and the snapshots it published: the table changes a
/// chunk through `Arc::make_mut`, which copies it only while a snapshot still holds it, and
/// the copy starts without a batch. So a published snapshot never changes, and a chunk's batch
/// is built at most once per content, by the first reader.
///
/// The index is kept by the writer, with the rows, so every snapshot has one without building
/// it: a point lookup on the leading key column (`where sku = …`) probes each chunk's index
/// instead of comparing every row. Scanning rows cost 2 ms per lookup at the demo's 40,000
/// stock rows, paid by every analyst query while the epochs keep the chunks changing.
#[derive(Debug, Default)]
pub struct Chunk {
    /// `None`: a free slot (its key left the view).
    rows: Vec<Option<Stored>>,
    /// `(lead_hash(leading key cell), position in rows)` of every live row, sorted. Keys keep
    /// their slot while they stay, so only a key that comes or leaves changes it.
    lead: Vec<(u64, u16)>,
    batch: OnceLock<RecordBatch>,
}

impl Clone for Chunk {
    fn clone(&self) -> Self {
        Self {
            rows: self.rows.clone(),
            lead: self.lead.clone(),
            batch: OnceLock::new(),
        }
    }
}

impl Chunk {
    fn live(&self) -> impl Iterator<Item = &[Cell]> {
        self.rows.iter().flatten().map(|r| &r[..])
    }

    fn index(&mut self, hash: u64, pos: u16) {
        let at = self.lead.partition_point(|e| *e < (hash, pos));
        self.lead.insert(at, (hash, pos));
    }

    fn unindex(&mut self, hash: u64, pos: u16) {
        if let Ok(at) = self.lead.binary_search(&(hash, pos)) {
            self.lead.remove(at);
        }
    }

    /// The live rows whose leading key cell hashes to `hash` (a superset of those equal to it).
    fn led_by(&self, hash: u64) -> impl Iterator<Item = &[Cell]> {
        let from = self.lead.partition_point(|e| e.0 < hash);
        self.lead[from..]
            .iter()
            .take_while(move |e| e.0 == hash)
            .filter_map(|&(_, p)| self.rows[p as usize].as_deref())
    }

    fn batch(&self, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
        if let Some(b) = self.batch.get() {
            return Ok(b.clone());
        }
        let rows: Vec<&[Cell]> = self.live().collect();
        let b = build_batch(schema, &rows)?;
        // Two readers may race to build the same chunk; either result is the same.
        Ok(self.batch.get_or_init(|| b).clone())
    }
}

/// A view's rows at one epoch, as published. Cheap to take (the chunks are shared); the Arrow
/// batches are built when first read, chunk by chunk, and kept with the chunk.
#[derive(Debug, Clone)]
pub struct ViewRows {
    schema: SchemaRef,
    chunks: Arc<[Arc<Chunk>]>,
    /// The column the chunks are indexed by (the view's first key column).
    lead: Option<usize>,
    /// Batches given as they are (snapshots built outside a processor, e.g. in tests).
    given: Vec<RecordBatch>,
}

impl ViewRows {
    pub fn from_batches(schema: SchemaRef, batches: Vec<RecordBatch>) -> Self {
        Self {
            schema,
            chunks: Arc::from(Vec::new()),
            lead: None,
            given: batches,
        }
    }

    /// Every row, in batches of the view's schema (in no particular order, like a table).
    pub fn batches(&self) -> Result<Vec<RecordBatch>, ArrowError> {
        let mut out = self.given.clone();
        for c in self.chunks.iter() {
            let b = c.batch(&self.schema)?;
            if b.num_rows() > 0 {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// Every row that may have `cell` in each `(column, cell)` of `equal`, and no row that has
    /// them is left out (a superset: the query still applies its filter).
    ///
    /// With a condition on the leading key column, each chunk's index gives the candidate rows
    /// and only the matches are built, into one batch: the cost follows the number of chunks
    /// and matches, not rows. Otherwise a chunk whose batch was built is given whole; one that
    /// changed since the last reader gives only its matching rows, built into a small batch of
    /// their own, and stays unbuilt. Either way a lookup does not build the chunks the epochs
    /// touched, which under a steady stream of changes is most of them.
    pub fn batches_where(&self, equal: &[(usize, Cell)]) -> Result<Vec<RecordBatch>, ArrowError> {
        let mut out = self.given.clone();
        let matches = |r: &&[Cell]| equal.iter().all(|(i, v)| r.get(*i) == Some(v));
        let led = self
            .lead
            .and_then(|lead| equal.iter().find(|(i, _)| *i == lead));
        if let Some((_, cell)) = led {
            let hash = lead_hash(cell);
            let rows: Vec<&[Cell]> = self
                .chunks
                .iter()
                .flat_map(|c| c.led_by(hash))
                .filter(matches)
                .collect();
            if !rows.is_empty() {
                out.push(build_batch(&self.schema, &rows)?);
            }
            return Ok(out);
        }
        for c in self.chunks.iter() {
            if let Some(b) = c.batch.get() {
                if b.num_rows() > 0 {
                    out.push(b.clone());
                }
                continue;
            }
            let rows: Vec<&[Cell]> = c.live().filter(matches).collect();
            if !rows.is_empty() {
                out.push(build_batch(&self.schema, &rows)?);
            }
        }
        Ok(out)
    }

    pub fn num_rows(&self) -> usize {
        self.chunks.iter().map(|c| c.live().count()).sum::<usize>()
            + self.given.iter().map(RecordBatch::num_rows).sum::<usize>()
    }
}

/// A view's rows by key, plus the changes since the last [`ViewTable::take_changes`].
///
/// Rows live in slots: a hash index maps each key to its slot, slot `s` is row `s % 512` of
/// chunk `s / 512` (see [`Chunk`]), and a key that leaves frees its slot for the next new key.
/// A write costs one hash lookup and touches one chunk, whatever the view's size (an ordered
/// map paid a cache miss per key comparison, which dominated the fold); publishing shares the
/// chunks, so its cost follows the number of chunks, not rows, and a reader rebuilds only the
/// chunks that changed since the last read.
///
/// Changes are recorded as slot numbers (upserts: the slot's row at [`Self::take_changes`]
/// is the key's last value) and keys (deletes), not as a map of keys, so recording a write
/// costs no hashing and taking the changes reads slots in order.
#[derive(Debug)]
pub struct ViewTable {
    pub def: ViewDef,
    index: HashMap<Row, u32, ahash::RandomState>,
    chunks: Vec<Arc<Chunk>>,
    free: Vec<u32>,
    /// Slots written since the last take, once each (`is_dirty` per slot).
    dirty: Vec<u32>,
    is_dirty: Vec<bool>,
    /// Keys that left since the last take and did not come back.
    deleted: HashSet<Row, ahash::RandomState>,
}

impl ViewTable {
    pub fn new(def: ViewDef) -> Self {
        Self {
            def,
            index: HashMap::with_hasher(hasher()),
            chunks: Vec::new(),
            free: Vec::new(),
            dirty: Vec::new(),
            is_dirty: Vec::new(),
            deleted: HashSet::with_hasher(hasher()),
        }
    }

    #[cfg(debug_assertions)]
    fn key_of(&self, row: &Row) -> Row {
        self.def.key.iter().map(|&i| row[i].clone()).collect()
    }

    fn slot(&self, s: u32) -> &Option<Stored> {
        let s = s as usize;
        &self.chunks[s / CHUNK_ROWS].rows[s % CHUNK_ROWS]
    }

    /// The slot for writing: its chunk is copied if a snapshot still reads it, and loses its
    /// old batch.
    fn slot_mut(&mut self, s: u32) -> &mut Option<Stored> {
        let s = s as usize;
        let c = Arc::make_mut(&mut self.chunks[s / CHUNK_ROWS]);
        c.batch.take();
        &mut c.rows[s % CHUNK_ROWS]
    }

    /// Adds slot `s` to, or removes it from, its chunk's index, by `row`'s cell in the first key
    /// column: the cell lookups compare. (A row's key, so that cell, stays while the key does.)
    fn lead_index(&mut self, s: u32, row: &[Cell], change: fn(&mut Chunk, u64, u16)) {
        let Some(lead) = self.def.key.first().and_then(|&i| row.get(i)) else {
            return;
        };
        let s = s as usize;
        let hash = lead_hash(lead);
        change(
            Arc::make_mut(&mut self.chunks[s / CHUNK_ROWS]),
            hash,
            (s % CHUNK_ROWS) as u16,
        );
    }

    fn new_slot(&mut self) -> u32 {
        if let Some(s) = self.free.pop() {
            return s;
        }
        let n = self.chunks.last().map_or(CHUNK_ROWS, |c| c.rows.len());
        if n == CHUNK_ROWS {
            self.chunks.push(Arc::new(Chunk {
                rows: Vec::with_capacity(CHUNK_ROWS),
                lead: Vec::with_capacity(CHUNK_ROWS),
                batch: OnceLock::new(),
            }));
        }
        let ci = self.chunks.len() - 1;
        let c = Arc::make_mut(&mut self.chunks[ci]);
        c.batch.take();
        c.rows.push(None);
        self.is_dirty.push(false);
        (ci * CHUNK_ROWS + c.rows.len() - 1) as u32
    }

    /// Sets the row of `key` (`None`: the key leaves the view). No-op writes are not recorded.
    pub fn set(&mut self, key: Row, row: Option<Row>) {
        let at = self.index.get(&key).copied();
        match (row, at) {
            (Some(row), at) => {
                #[cfg(debug_assertions)]
                debug_assert_eq!(self.key_of(&row), key);
                let s = match at {
                    Some(s) if self.slot(s).as_deref() == Some(&row[..]) => return,
                    Some(s) => s,
                    None => {
                        let s = self.new_slot();
                        self.lead_index(s, &row, Chunk::index);
                        self.index.insert(key.clone(), s);
                        s
                    }
                };
                *self.slot_mut(s) = Some(Stored::from(row));
                if !std::mem::replace(&mut self.is_dirty[s as usize], true) {
                    self.dirty.push(s);
                }
                if !self.deleted.is_empty() {
                    self.deleted.remove(&key);
                }
            }
            (None, Some(s)) => {
                // The slot may stay dirty: it is empty at the take, or holds the next new key.
                if let Some(old) = self.slot_mut(s).take() {
                    self.lead_index(s, &old, Chunk::unindex);
                }
                self.free.push(s);
                self.index.remove(&key);
                self.deleted.insert(key);
            }
            (None, None) => {}
        }
    }

    pub fn get(&self, key: &Row) -> Option<&[Cell]> {
        self.index.get(key).and_then(|&s| self.slot(s).as_deref())
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Every row, in key order (sorts: for checks and tests, not per epoch).
    pub fn rows(&self) -> impl Iterator<Item = &[Cell]> {
        let mut keyed: Vec<(&Row, u32)> = self.index.iter().map(|(k, &s)| (k, s)).collect();
        keyed.sort_unstable_by(|a, b| a.0.cmp(b.0));
        keyed
            .into_iter()
            .filter_map(move |(_, s)| self.slot(s).as_deref())
    }

    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty() || !self.deleted.is_empty()
    }

    /// The changes recorded since the last call, as Arrow batches, and forgets them.
    pub fn take_changes(&mut self) -> Result<ViewChanges, ArrowError> {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        for &s in &dirty {
            self.is_dirty[s as usize] = false;
        }
        let deleted = std::mem::replace(&mut self.deleted, HashSet::with_hasher(hasher()));
        let rows: Vec<&[Cell]> = dirty
            .iter()
            .filter_map(|&s| self.slot(s).as_deref())
            .collect();
        let mut keys: Vec<&[Cell]> = deleted.iter().map(|k| &k[..]).collect();
        keys.sort_unstable();
        let upserts = build_batch(&self.def.schema, &rows)?;
        let key_schema = Arc::new(self.def.schema.project(&self.def.key)?);
        let deletes = build_batch(&key_schema, &keys)?;
        Ok(ViewChanges {
            view: self.def.name.clone(),
            upserts,
            deletes,
        })
    }

    /// Forgets the changes recorded since the last take, for a table whose changes nobody
    /// takes (one kept only to be published).
    pub fn forget_changes(&mut self) {
        for s in self.dirty.drain(..) {
            self.is_dirty[s as usize] = false;
        }
        self.deleted.clear();
    }

    /// The rows as they are now, to publish: shares the chunks, builds nothing.
    pub fn published(&self) -> ViewRows {
        ViewRows {
            schema: self.def.schema.clone(),
            chunks: Arc::from(self.chunks.as_slice()),
            lead: self.def.key.first().copied(),
            given: Vec::new(),
        }
    }

    /// Every row, in batches of the view's schema (one empty batch when there are no rows).
    pub fn batches(&self) -> Result<Vec<RecordBatch>, ArrowError> {
        let out = self.published().batches()?;
        if out.is_empty() {
            return Ok(vec![RecordBatch::new_empty(self.def.schema.clone())]);
        }
        Ok(out)
    }
}

/// Row `i` of `batch` as cells, the inverse of [`build_batch`] for the column types views use.
pub fn row_of(batch: &RecordBatch, i: usize) -> Result<Row, ArrowError> {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{
        Decimal128Type, Float64Type, Int64Type, TimestampMicrosecondType,
    };
    batch
        .columns()
        .iter()
        .map(|c| {
            if c.is_null(i) {
                return Ok(Cell::Null);
            }
            Ok(match c.data_type() {
                DataType::Int64 => Cell::Int(c.as_primitive::<Int64Type>().value(i)),
                DataType::Utf8 => Cell::text(c.as_string::<i32>().value(i)),
                DataType::Float64 => Cell::Float(c.as_primitive::<Float64Type>().value(i)),
                DataType::Decimal128(..) => Cell::Dec(c.as_primitive::<Decimal128Type>().value(i)),
                DataType::Timestamp(TimeUnit::Microsecond, _) => {
                    Cell::Ts(c.as_primitive::<TimestampMicrosecondType>().value(i))
                }
                other => {
                    return Err(ArrowError::NotYetImplemented(format!(
                        "a view column of type {other}"
                    )));
                }
            })
        })
        .collect()
}

/// Builds one batch of `schema` from rows whose cells follow the schema's column types.
pub fn build_batch<'a>(schema: &SchemaRef, rows: &[&'a [Cell]]) -> Result<RecordBatch, ArrowError> {
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (i, field) in schema.fields().iter().enumerate() {
        let cell = |r: &'a [Cell]| r.get(i).unwrap_or(&Cell::Null);
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
                        Cell::Int(v) => b.append_value(*v),
                        Cell::Null => b.append_null(),
                        c => return Err(wrong(c)),
                    }
                }
                Arc::new(b.finish())
            }
            DataType::Utf8 => {
                let mut b = StringBuilder::with_capacity(rows.len(), rows.len() * 12);
                for r in rows {
                    match cell(r) {
                        Cell::Text(v) => b.append_value(&**v),
                        Cell::Null => b.append_null(),
                        c => return Err(wrong(c)),
                    }
                }
                Arc::new(b.finish())
            }
            DataType::Float64 => {
                let mut b = Float64Builder::with_capacity(rows.len());
                for r in rows {
                    match cell(r) {
                        Cell::Float(v) => b.append_value(*v),
                        Cell::Null => b.append_null(),
                        c => return Err(wrong(c)),
                    }
                }
                Arc::new(b.finish())
            }
            DataType::Decimal128(p, s) => {
                let mut b = Decimal128Builder::with_capacity(rows.len());
                for r in rows {
                    match cell(r) {
                        Cell::Dec(v) => b.append_value(*v),
                        Cell::Null => b.append_null(),
                        c => return Err(wrong(c)),
                    }
                }
                Arc::new(b.finish().with_precision_and_scale(*p, *s)?)
            }
            DataType::Timestamp(TimeUnit::Microsecond, tz) => {
                let mut b = TimestampMicrosecondBuilder::with_capacity(rows.len());
                for r in rows {
                    match cell(r) {
                        Cell::Ts(v) => b.append_value(*v),
                        Cell::Null => b.append_null(),
                        c => return Err(wrong(c)),
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
            merge: None,
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

    fn value(b: &RecordBatch, i: usize) -> i64 {
        use datafusion::arrow::array::{Array, Int64Array};
        let col = b.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
        assert!(!col.is_null(i));
        col.value(i)
    }

    #[test]
    fn slots_are_reused_and_the_table_holds_the_same_rows_as_a_map() {
        let mut t = table();
        let mut model = std::collections::BTreeMap::new();
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut peak = 0;
        // What a sink holds after applying every epoch's changes.
        let mut replica = std::collections::BTreeMap::new();
        // A snapshot taken before each round, and the rows it must answer with.
        let (mut old, mut old_model) = (t.published(), model.clone());
        // A point lookup through a snapshot gives exactly the key's row, or nothing.
        let lookup = |snap: &ViewRows, k: &str| -> Option<i64> {
            let bs = snap.batches_where(&[(0, Cell::text(k))]).unwrap();
            let n: usize = bs.iter().map(RecordBatch::num_rows).sum();
            assert!(n <= 1, "{n} rows for key {k}");
            bs.iter().find(|b| b.num_rows() == 1).map(|b| value(b, 0))
        };
        for round in 0..40 {
            for _ in 0..2000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let k = format!("k{:05}", x % 6000);
                // Early rounds mostly insert, later ones mostly delete, then insert again.
                let delete = (x >> 32) % 40 < round.min(34);
                let key = vec![Cell::text(&k)];
                if delete {
                    t.set(key, None);
                    model.remove(&k);
                } else {
                    let v = (x >> 40) as i64 % 1000;
                    t.set(key, Some(vec![Cell::text(&k), Cell::Int(v)]));
                    model.insert(k, v);
                }
            }
            let c = t.take_changes().unwrap();
            assert!(!t.has_changes());
            let text = |b: &RecordBatch, i: usize| {
                use datafusion::arrow::array::{Array, StringArray};
                let col = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
                col.value(i).to_string()
            };
            // A key that came and went within one epoch is sent as a delete too: sinks
            // delete idempotently, and knowing it was never sent would cost a lookup.
            for i in 0..c.deletes.num_rows() {
                replica.remove(&text(&c.deletes, i));
            }
            for i in 0..c.upserts.num_rows() {
                replica.insert(text(&c.upserts, i), value(&c.upserts, i));
            }
            assert_eq!(replica, model, "round {round}: the changes do not add up");
            let got: Vec<(String, i64)> = t
                .rows()
                .map(|r| match (&r[0], &r[1]) {
                    (Cell::Text(k), Cell::Int(v)) => (k.to_string(), *v),
                    other => panic!("unexpected row {other:?}"),
                })
                .collect();
            let want: Vec<(String, i64)> = model.iter().map(|(k, v)| (k.clone(), *v)).collect();
            assert_eq!(got, want, "round {round}");
            assert_eq!(t.len(), model.len());
            peak = peak.max(model.len());
            assert!(
                t.chunks.len() <= peak.div_ceil(CHUNK_ROWS),
                "{} chunks for at most {peak} rows: freed slots were not reused",
                t.chunks.len()
            );
            let rows: usize = t.batches().unwrap().iter().map(RecordBatch::num_rows).sum();
            assert_eq!(rows, model.len());
            if let Some((k, v)) = model.iter().next() {
                let row = t.get(&vec![Cell::text(k)]).expect("first key found");
                assert!(matches!(row[1], Cell::Int(g) if g == *v));
            }
            for (ci, c) in t.chunks.iter().enumerate() {
                let mut indexed: Vec<(u64, u16)> = c
                    .rows
                    .iter()
                    .enumerate()
                    .filter_map(|(p, r)| Some((lead_hash(&r.as_ref()?[0]), p as u16)))
                    .collect();
                indexed.sort_unstable();
                assert_eq!(c.lead, indexed, "round {round}: chunk {ci}'s index");
            }
            let now = t.published();
            for i in (0..6000).step_by(37) {
                let k = format!("k{i:05}");
                assert_eq!(
                    lookup(&now, &k),
                    model.get(&k).copied(),
                    "round {round}, {k}"
                );
                assert_eq!(
                    lookup(&old, &k),
                    old_model.get(&k).copied(),
                    "round {round}, {k} in the snapshot before the round"
                );
            }
            (old, old_model) = (now, model.clone());
        }
        assert!(
            model.len() < peak / 2,
            "the deletes won ({} rows)",
            model.len()
        );
    }

    /// Key `k{i:05}` gets the value `v`.
    fn set(t: &mut ViewTable, i: usize, v: i64) {
        let k = Cell::text(&format!("k{i:05}"));
        t.set(vec![k.clone()], Some(vec![k, Cell::Int(v)]));
    }

    #[test]
    fn a_published_snapshot_never_changes_and_unchanged_chunks_are_built_once() {
        let mut t = table();
        for i in 0..3000 {
            set(&mut t, i, 1);
        }
        let first = t.published();
        let before = first.batches().unwrap();
        assert!(before.len() > 2, "3000 rows make several chunks");
        // Change one row in the last chunk, after publishing.
        set(&mut t, 2999, 2);
        let second = t.published();
        let after = second.batches().unwrap();
        let last = |bs: &[RecordBatch]| {
            let b = bs.last().unwrap().clone();
            let n = b.num_rows();
            value(&b, n - 1)
        };
        assert_eq!(last(&first.batches().unwrap()), 1, "the old snapshot moved");
        assert_eq!(last(&after), 2);
        assert_eq!(first.num_rows(), 3000);
        assert_eq!(second.num_rows(), 3000);
        // The first chunk did not change: both snapshots read the very same batch.
        assert!(Arc::ptr_eq(before[0].column(1), after[0].column(1)));
        assert!(!Arc::ptr_eq(
            before.last().unwrap().column(1),
            after.last().unwrap().column(1)
        ));
    }

    #[test]
    fn a_point_lookup_reads_only_the_matching_rows_of_changed_chunks() {
        let mut t = table();
        for i in 0..3000 {
            set(&mut t, i, 1);
        }
        t.published().batches().unwrap();
        // k00007 (first chunk) and k02999 (last chunk) change after the chunks were built.
        set(&mut t, 7, 5);
        set(&mut t, 2999, 5);
        let snap = t.published();
        let rows = |bs: &[RecordBatch]| bs.iter().map(RecordBatch::num_rows).sum::<usize>();
        // On the key, the chunks' index gives just the match, built or not.
        let hit = snap.batches_where(&[(0, Cell::text("k02999"))]).unwrap();
        assert_eq!(rows(&hit), 1);
        assert_eq!(value(&hit[0], 0), 5);
        let built = snap.batches_where(&[(0, Cell::text("k01000"))]).unwrap();
        assert_eq!((rows(&built), value(&built[0], 0)), (1, 1));
        let miss = snap.batches_where(&[(0, Cell::text("nope"))]).unwrap();
        assert_eq!(rows(&miss), 0);
        let both = snap
            .batches_where(&[(1, Cell::Int(5)), (0, Cell::text("k00007"))])
            .unwrap();
        assert_eq!((rows(&both), value(&both[0], 0)), (1, 5));
        let neither = snap
            .batches_where(&[(0, Cell::text("k00007")), (1, Cell::Int(1))])
            .unwrap();
        assert_eq!(rows(&neither), 0);
        // On another column: six chunks of 512 slots, the four built ones in between come
        // whole, the two that changed only with their match.
        let other = snap.batches_where(&[(1, Cell::Int(5))]).unwrap();
        assert_eq!(rows(&other), 4 * 512 + 2);
        // The lookup built nothing: a full read still sees every row, changed ones as now.
        assert_eq!(rows(&snap.batches().unwrap()), 3000);
        assert_eq!(snap.num_rows(), 3000);
    }
}
