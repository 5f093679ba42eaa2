//! The units other members fold, for this member's SQL endpoint (scale-out step 6).
//!
//! With `processors.instances: group` a member folds only the units the group gave it. So that
//! its SQL endpoint serves the whole views, it also reads the Kafka view sink's compacted
//! topics (`<prefix>.view.<name>`), which every unit of the group writes, and keeps each unit's
//! rows from them as the catalog source `remote:<unit>`. The catalog hides a unit's remote rows
//! while the member folds that unit itself ([`Catalog::snapshots`]): a query reads every unit
//! once, live from the fold when it is here, from the topics when another member has it. A
//! member without a Kafka view sink serves its own units only, and says so at start.
//!
//! # Which unit wrote a record
//!
//! The sink tags every record with headers ([`write_headers`]): the unit
//! (`walbridge.unit`); the write (`walbridge.write`: `<run>.<number>`, where the run is the
//! moment the unit's sink opened, in ms since the Unix epoch, and the number counts the
//! run's writes); how many records the write has over all views
//! (`walbridge.write.records`); and, for a group's unit, the input offsets the write
//! reflects (`walbridge.write.offsets`: `<topic>:<partition>:<next offset>`, comma-separated,
//! named as the sink stores them). Records of a one-instance processor (unit `all`) belong to
//! no group and are skipped, as are records without the first three headers.
//!
//! # Why a query sees whole writes
//!
//! One write of a unit (an epoch, or epochs the sink coalesced) is spread over the topics'
//! partitions, which this reader consumes at their own paces. Its records are held back until
//! all of them have arrived, then applied at once ([`Assembler`]), so a remote unit moves from
//! write to write as a local unit moves from epoch to epoch. A write may never be complete:
//! compaction removed some of its records (a later write overwrote those keys), or the sink's
//! process died during it (the next run writes every key it held again, see
//! [`crate::view::coalesce`]). Either way a later write of the unit comes, and when that one is
//! complete the earlier ones are applied first, as far as they came. Records of a write
//! already applied are applied as they come: a key's records share a partition, so a record
//! that comes late is never older than the row the key holds.
//!
//! At start the topics are read as they are up to the ends they had (their compacted history
//! holds no whole writes), and the remote units appear once every partition was read that far,
//! or gave no record for [`IDLE_END`] (a partition whose last record compaction removed never
//! reaches its old end).
//!
//! Order per key: a key's records are all in one partition, read in order, and a record is
//! applied only if it is later there than the one the key holds ([`Assembler`] keeps the
//! offset per key). So letting a held-back write go after later ones, whatever order the
//! write ids say (runs are numbered by their owners' clocks), never takes a row back.
//!
//! A remote unit lags its owner by the sink's write (an epoch, acknowledged by the broker)
//! and one fetch. Runs are ordered by their start time, so owners on machines whose clocks
//! disagree by more than the time a unit takes to move lose the whole-write grouping (never
//! a row's order) for the writes that overlap.
//!
//! # A unit that moves here
//!
//! Its processor starts from the unit's last checkpoint, which may be behind what the former
//! owner wrote to the topics (and this member served). So each remote unit keeps its
//! *position*: the offsets of the latest write it applied (the largest per partition, so a
//! write let go late never lowers it). The catalog serves the remote copy until the local
//! processor's position covers it, then the local one (the rules, also for a processor that
//! started before the topics were read, are at `Published::choose` in [`crate::view`]): the
//! unit never steps back to an older state in this member's SQL. Records written before the
//! offsets header existed give no position, and the local copy is served at once, as before.
//!
//! Limit: the position only grows. A new owner that writes epochs again below it (the Kafka
//! view sink is at-least-once: its owner died after the broker's ack and before the sink's
//! position was stored) moves this copy's rows back while the position stays, so for that
//! moment the copy is served as if it were ahead. The rows are the owner's own, and they move
//! forward again with its next writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::json::reader::{Decoder, ReaderBuilder};
use datafusion::arrow::json::writer::{LineDelimited, WriterBuilder};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::table::{Row, ViewTable, row_of};
use crate::view::{Catalog, Offsets, Snapshot, ViewDef};

/// Header naming the unit that wrote a view record.
pub const UNIT_HEADER: &str = "walbridge.unit";
/// Header naming the write a view record belongs to: `<run>.<number>`.
pub const WRITE_HEADER: &str = "walbridge.write";
/// Header with the number of records of the write, over every view.
pub const RECORDS_HEADER: &str = "walbridge.write.records";
/// Header with the input offsets a group unit's write reflects.
pub const OFFSETS_HEADER: &str = "walbridge.write.offsets";

/// The catalog source under which a unit's rows read from the view topics are published.
pub fn remote_source(unit: &str) -> String {
    format!("{REMOTE_PREFIX}{unit}")
}

pub(crate) const REMOTE_PREFIX: &str = "remote:";

/// A partition that gave no record for this long during the first reading of the topics
/// counts as read to its end.
pub const IDLE_END: Duration = Duration::from_secs(5);

/// The headers of every record of one write. `offsets` (the epoch's, as the sink stores them)
/// go along for a group's unit only: nobody reads a one-instance processor's back, and the
/// demo's topics stay lean.
pub fn write_headers(
    unit: &str,
    run: u64,
    number: u64,
    records: u64,
    offsets: &Offsets,
) -> OwnedHeaders {
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: UNIT_HEADER,
            value: Some(unit),
        })
        .insert(Header {
            key: WRITE_HEADER,
            value: Some(&format!("{run}.{number}")),
        })
        .insert(Header {
            key: RECORDS_HEADER,
            value: Some(&records.to_string()),
        });
    if unit == crate::group::Unit::All.name() || offsets.0.is_empty() {
        return headers;
    }
    let text = offsets
        .0
        .iter()
        .map(|((t, p), o)| format!("{t}:{p}:{o}"))
        .collect::<Vec<_>>()
        .join(",");
    headers.insert(Header {
        key: OFFSETS_HEADER,
        value: Some(&text),
    })
}

/// The offsets of an offsets header, under the topics' own names: a topic several units read
/// whole is stored as `<topic>@<unit>` ([`crate::group::to_sink`]), and the local processor
/// names it plainly. `None` if the text is not such a list.
fn parse_offsets(text: &str) -> Option<Offsets> {
    let mut out = Offsets::default();
    for part in text.split(',') {
        let mut it = part.rsplitn(3, ':');
        let (o, p, t) = (it.next()?, it.next()?, it.next()?);
        let t = t.rsplit_once('@').map_or(t, |(t, _)| t);
        out.0
            .insert((t.to_owned(), p.parse().ok()?), o.parse().ok()?);
    }
    Some(out)
}

/// One JSON object per row, in the batch's column order, nulls explicit: what the Kafka view
/// sink writes as keys and values, and what [`Assembler`] reads back.
pub fn json_lines(batch: &RecordBatch) -> Result<Vec<String>, ArrowError> {
    if batch.num_rows() == 0 {
        return Ok(Vec::new());
    }
    let mut w = WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, LineDelimited>(Vec::new());
    w.write(batch)?;
    w.finish()?;
    let text =
        String::from_utf8(w.into_inner()).map_err(|e| ArrowError::JsonError(e.to_string()))?;
    // JSON escapes newlines inside strings, so every line is one row.
    Ok(text.lines().map(str::to_owned).collect())
}

/// What the reader has done, for the metrics endpoint (relaxed atomics).
#[derive(Debug, Default)]
pub struct RemoteStats {
    /// The member reads other members' units (it has a Kafka view sink).
    pub enabled: AtomicBool,
    /// The topics' history is read: the remote units are served.
    pub ready: AtomicBool,
    pub records: AtomicU64,
    /// Records skipped: without walbridge's headers, or not a row of the view.
    pub skipped: AtomicU64,
    /// Writes held back until all their records arrive.
    pub pending_writes: AtomicU64,
    /// CreateTime (Unix ms) of the newest record read.
    pub newest_ms: AtomicI64,
    /// Units read from the topics (this member's own included).
    pub units: AtomicU64,
}

/// A write: (run, number), ordered as the unit's writes were made.
pub type WriteId = (u64, u64);

/// What one view record says, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Index of the view in the assembler's definitions.
    pub view: usize,
    pub key: Row,
    /// `None`: the key left the view (a tombstone).
    pub row: Option<Row>,
    /// The record's offset in its partition (every record of a key is in one partition).
    pub at: i64,
}

/// A write whose records are still arriving.
#[derive(Debug, Default)]
struct Pending {
    expected: u64,
    changes: Vec<Change>,
    offsets: Offsets,
}

/// One remote unit's rows and the writes not yet applied.
#[derive(Debug)]
struct UnitRows {
    tables: Vec<ViewTable>,
    /// Per view and key, the offset of the record its row comes from (tombstones' too).
    applied_at: Vec<HashMap<Row, i64>>,
    applied: WriteId,
    pending: BTreeMap<WriteId, Pending>,
    changed: bool,
    /// The input offsets the applied writes reflect, the largest per partition.
    position: Offsets,
}

impl UnitRows {
    /// Applies a record unless the key holds a later one: a write held back and let go after
    /// later records of the same keys (see [`Assembler::offer`]) must not take them back.
    fn apply(&mut self, c: Change) {
        match self.applied_at[c.view].get_mut(&c.key) {
            Some(at) if *at >= c.at => return,
            Some(at) => *at = c.at,
            None => {
                self.applied_at[c.view].insert(c.key.clone(), c.at);
            }
        }
        self.tables[c.view].set(c.key, c.row);
        self.changed = true;
    }
}

/// Puts the records of the view topics together into every remote unit's views, a whole write
/// at a time (see the module doc). Kafka-free, so the rules are tested on their own.
pub struct Assembler {
    defs: Vec<ViewDef>,
    units: BTreeMap<String, UnitRows>,
    /// False while the topics' history is read: records are applied as they come.
    live: bool,
}

impl Assembler {
    pub fn new(defs: Vec<ViewDef>) -> Self {
        Self {
            defs,
            units: BTreeMap::new(),
            live: false,
        }
    }

    /// From now on, writes are applied whole.
    pub fn go_live(&mut self) {
        self.live = true;
    }

    /// Takes one record of `unit`'s write `write`, which has `records` records in all and
    /// reflects the input `offsets` (empty if unknown).
    pub fn offer(
        &mut self,
        unit: &str,
        write: WriteId,
        records: u64,
        offsets: &Offsets,
        change: Change,
    ) {
        let defs = &self.defs;
        let u = self
            .units
            .entry(unit.to_owned())
            .or_insert_with(|| UnitRows {
                tables: defs.iter().cloned().map(ViewTable::new).collect(),
                applied_at: defs.iter().map(|_| HashMap::new()).collect(),
                applied: (0, 0),
                pending: BTreeMap::new(),
                changed: false,
                position: Offsets::default(),
            });
        if !self.live || write <= u.applied {
            u.apply(change);
            u.applied = u.applied.max(write);
            u.position.advance(offsets);
            return;
        }
        let p = u.pending.entry(write).or_default();
        p.expected = records;
        p.changes.push(change);
        p.offsets.advance(offsets);
        if (p.changes.len() as u64) < p.expected {
            return;
        }
        // Complete: it and every earlier write still held go in, in order.
        let later = u.pending.split_off(&(write.0, write.1.saturating_add(1)));
        for (_, p) in std::mem::replace(&mut u.pending, later) {
            for c in p.changes {
                u.apply(c);
            }
            u.position.advance(&p.offsets);
        }
        u.applied = write;
    }

    /// Publishes the views of every unit that changed since the last call (nothing before
    /// [`Self::go_live`]).
    pub fn publish(&mut self, catalog: &Catalog) {
        if !self.live {
            return;
        }
        for (unit, u) in self.units.iter_mut().filter(|(_, u)| u.changed) {
            let (epoch, position) = (u.applied.1, &u.position);
            catalog.publish_epoch(
                &remote_source(unit),
                self.defs
                    .iter()
                    .zip(u.tables.iter_mut())
                    .map(|(def, table)| {
                        table.forget_changes();
                        (
                            def,
                            Snapshot {
                                epoch,
                                offsets: position.clone(),
                                rows: table.published(),
                            },
                        )
                    }),
                position,
            );
            u.changed = false;
        }
    }

    /// Writes held back, over every unit (for logs and tests).
    pub fn pending_writes(&self) -> usize {
        self.units.values().map(|u| u.pending.len()).sum()
    }
}

/// Decodes one view's record keys and values (JSON objects, see [`json_lines`]).
struct ViewCodec {
    keys: Decoder,
    rows: Decoder,
    key_of_row: Vec<usize>,
    def: ViewDef,
}

impl ViewCodec {
    fn new(def: &ViewDef) -> Result<Self, ArrowError> {
        let key_schema = Arc::new(def.schema.project(&def.key)?);
        Ok(Self {
            keys: ReaderBuilder::new(key_schema).build_decoder()?,
            rows: ReaderBuilder::new(def.schema.clone()).build_decoder()?,
            key_of_row: def.key.clone(),
            def: def.clone(),
        })
    }

    fn one(decoder: &mut Decoder, json: &[u8]) -> Result<Row, ArrowError> {
        let read = decoder.decode(json)?;
        if read < json.len() {
            // A second object in one record: not a view record.
            decoder.flush()?;
            return Err(ArrowError::JsonError(
                "more than one JSON object in the record".into(),
            ));
        }
        match decoder.flush()? {
            Some(b) if b.num_rows() == 1 => row_of(&b, 0),
            _ => Err(ArrowError::JsonError("no JSON object in the record".into())),
        }
    }

    /// The change a record says: the row's own key for an upsert (the record key is the same
    /// columns), the record key for a tombstone. After an error the decoders start afresh: a
    /// decoder that failed keeps part of the bad record and would fail every record after it.
    fn decode(
        &mut self,
        view: usize,
        key: &[u8],
        value: Option<&[u8]>,
        at: i64,
    ) -> Result<Change, ArrowError> {
        let decoded = self.decode_once(view, key, value, at);
        if decoded.is_err() {
            *self = Self::new(&self.def)?;
        }
        decoded
    }

    fn decode_once(
        &mut self,
        view: usize,
        key: &[u8],
        value: Option<&[u8]>,
        at: i64,
    ) -> Result<Change, ArrowError> {
        match value {
            Some(v) => {
                let row = Self::one(&mut self.rows, v)?;
                let key = self.key_of_row.iter().map(|&i| row[i].clone()).collect();
                Ok(Change {
                    view,
                    key,
                    row: Some(row),
                    at,
                })
            }
            None => Ok(Change {
                view,
                key: Self::one(&mut self.keys, key)?,
                row: None,
                at,
            }),
        }
    }
}

/// What a record's headers say of its write.
#[derive(Debug, PartialEq)]
struct Tags {
    unit: String,
    write: WriteId,
    records: u64,
    /// Empty when the record has no (readable) offsets header.
    offsets: Offsets,
}

/// The unit, write, record count and offsets a record's headers name; `None` without the
/// first three.
fn tags<H: Headers>(headers: Option<&H>) -> Option<Tags> {
    let h = headers?;
    let text = |name: &str| {
        h.iter()
            .find(|x| x.key == name)
            .and_then(|x| x.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned)
    };
    let unit = text(UNIT_HEADER)?;
    let write = text(WRITE_HEADER)?;
    let (run, number) = write.split_once('.')?;
    let records = text(RECORDS_HEADER)?.parse().ok()?;
    let offsets = text(OFFSETS_HEADER)
        .and_then(|t| parse_offsets(&t))
        .unwrap_or_default();
    Some(Tags {
        unit,
        write: (run.parse().ok()?, number.parse().ok()?),
        records,
        offsets,
    })
}

/// Reads the view topics under `topic_prefix` into `catalog` until `stop` is set (runs on a
/// thread of its own). Trouble is logged, never fatal: the member's own units go on either
/// way.
pub(crate) fn read(
    client: ClientConfig,
    topic_prefix: String,
    catalog: Arc<Catalog>,
    stats: Arc<crate::ProcessorStats>,
    stop: Arc<AtomicBool>,
) {
    stats.remote.enabled.store(true, Ordering::Relaxed);
    if let Err(e) = read_until(client, &topic_prefix, &catalog, &stats.remote, &stop) {
        tracing::error!(error = %e, prefix = %topic_prefix, "reading the other members' units from the view topics stopped; this member's SQL endpoint serves its own units only");
    }
}

fn read_until(
    mut client: ClientConfig,
    topic_prefix: &str,
    catalog: &Catalog,
    stats: &RemoteStats,
    stop: &AtomicBool,
) -> Result<(), String> {
    let defs = crate::state::view_defs();
    let topics: HashMap<String, usize> = defs
        .iter()
        .enumerate()
        .map(|(i, d)| (format!("{topic_prefix}.view.{}", d.name), i))
        .collect();
    let consumer: BaseConsumer = client
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(|e| format!("cannot create the consumer: {e}"))?;
    // The topics appear when the first unit's sink opens.
    let started = Instant::now();
    let mut said = false;
    let ends = loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        match ends_of(&consumer, &topics) {
            Ok(Some(ends)) => break ends,
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "reading the view topics' metadata"),
        }
        if !said && started.elapsed() > Duration::from_secs(30) {
            said = true;
            tracing::info!(prefix = %topic_prefix, "waiting for the view topics to exist (the Kafka view sink creates them)");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut tpl = TopicPartitionList::new();
    for (t, p) in ends.keys() {
        tpl.add_partition_offset(t, *p, Offset::Beginning)
            .map_err(|e| e.to_string())?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| format!("assigning the view topics: {e}"))?;

    let mut codecs = defs
        .iter()
        .map(ViewCodec::new)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let mut assembler = Assembler::new(defs);
    // Partitions not yet read to the end they had at start, and when each last gave a record.
    let assigned = Instant::now();
    let mut behind: HashMap<(String, i32), (i64, Instant)> = ends
        .into_iter()
        .filter(|(_, end)| *end > 0)
        .map(|(tp, end)| (tp, (end, assigned)))
        .collect();
    let (mut untagged, mut undecodable) = (0u64, 0u64);
    let mut last_error: Option<Instant> = None;
    let began = Instant::now();
    let mut records = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let mut wait = Duration::from_millis(100);
        for _ in 0..10_000 {
            let Some(m) = consumer.poll(wait) else { break };
            wait = Duration::ZERO;
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        last_error = Some(Instant::now());
                        tracing::warn!(error = %e, "reading the view topics");
                    }
                    break;
                }
            };
            records += 1;
            stats.records.fetch_add(1, Ordering::Relaxed);
            if let Some(ms) = m.timestamp().to_millis() {
                stats.newest_ms.fetch_max(ms, Ordering::Relaxed);
            }
            if !behind.is_empty() {
                let at = (m.topic().to_owned(), m.partition());
                if let Some((end, seen)) = behind.get_mut(&at) {
                    *seen = Instant::now();
                    if m.offset() + 1 >= *end {
                        behind.remove(&at);
                    }
                }
            }
            let Some(&view) = topics.get(m.topic()) else {
                continue;
            };
            let Some(tags) = tags(m.headers()) else {
                untagged += 1;
                stats.skipped.fetch_add(1, Ordering::Relaxed);
                if untagged == 1 {
                    tracing::warn!(
                        topic = m.topic(),
                        partition = m.partition(),
                        offset = m.offset(),
                        "a view record without walbridge's unit and write headers (written by another producer, or by a walbridge before 2026-11-22); skipped"
                    );
                }
                continue;
            };
            if tags.unit == crate::group::Unit::All.name() {
                continue;
            }
            match codecs[view].decode(view, m.key().unwrap_or_default(), m.payload(), m.offset()) {
                Ok(change) => {
                    assembler.offer(&tags.unit, tags.write, tags.records, &tags.offsets, change)
                }
                Err(e) => {
                    undecodable += 1;
                    stats.skipped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), error = %e, undecodable, "a view record that is not a row of the view; skipped (this member's SQL misses it until the key is written again)");
                }
            }
        }
        // A partition whose last records compaction removed never reaches its old end: one
        // that gave nothing for a while is as far as it goes.
        behind.retain(|_, (_, seen)| seen.elapsed() < IDLE_END);
        if !assembler.live && behind.is_empty() {
            assembler.go_live();
            tracing::info!(
                records,
                elapsed_ms = began.elapsed().as_millis() as u64,
                units = assembler.units.len(),
                "the other members' units are read from the view topics; the SQL endpoint serves them"
            );
        }
        assembler.publish(catalog);
        stats.ready.store(assembler.live, Ordering::Relaxed);
        stats
            .pending_writes
            .store(assembler.pending_writes() as u64, Ordering::Relaxed);
        stats
            .units
            .store(assembler.units.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// The end offset of each view topic partition.
type Ends = HashMap<(String, i32), i64>;

/// Every partition of the view topics with its end offset now; `None` while a topic is
/// missing.
fn ends_of(
    consumer: &BaseConsumer,
    topics: &HashMap<String, usize>,
) -> Result<Option<Ends>, String> {
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let mut ends = HashMap::new();
    for name in topics.keys() {
        let Some(t) = md
            .topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
        else {
            return Ok(None);
        };
        for p in t.partitions() {
            let (_, high) = consumer
                .fetch_watermarks(name, p.id(), Duration::from_secs(10))
                .map_err(|e| format!("{name} [{}]: {e}", p.id()))?;
            ends.insert((name.clone(), p.id()), high);
        }
    }
    Ok(Some(ends))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::Cell;

    /// Offsets for the records the tests make, in the order they make them.
    static NEXT: AtomicI64 = AtomicI64::new(0);

    fn assembler() -> (Assembler, Vec<ViewDef>) {
        let defs = crate::state::view_defs();
        (Assembler::new(defs.clone()), defs)
    }

    /// A `stock_availability_by_sku` row: sku, locations, on_hand, reserved, safety, available.
    fn by_sku(defs: &[ViewDef], sku: &str, available: Option<i64>) -> Change {
        let view = defs
            .iter()
            .position(|d| d.name == "stock_availability_by_sku")
            .unwrap();
        let key = vec![Cell::text(sku)];
        let row = available.map(|a| {
            let mut r = vec![Cell::text(sku)];
            r.extend([1, a, 0, 0, a].map(Cell::Int));
            r
        });
        // Offsets in the order the test makes the records, as one partition would hold them.
        let at = NEXT.fetch_add(1, Ordering::Relaxed);
        Change { view, key, row, at }
    }

    /// A record of a write whose input offsets are not known (records from before the offsets
    /// header, or tests about whole writes alone).
    fn offer(a: &mut Assembler, unit: &str, write: WriteId, records: u64, change: Change) {
        a.offer(unit, write, records, &Offsets::default(), change)
    }

    /// What SQL would read of `stock_availability_by_sku` now: (sku, available) per source.
    fn seen(c: &Catalog) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        for s in c.snapshots("stock_availability_by_sku") {
            for b in s.rows.batches().unwrap() {
                for i in 0..b.num_rows() {
                    let r = row_of(&b, i).unwrap();
                    let (Cell::Text(sku), Cell::Int(a)) = (&r[0], &r[5]) else {
                        panic!("{r:?}")
                    };
                    out.push((sku.to_string(), *a));
                }
            }
        }
        out.sort();
        out
    }

    fn rows(v: &[(&str, i64)]) -> Vec<(String, i64)> {
        v.iter().map(|(s, a)| (s.to_string(), *a)).collect()
    }

    #[test]
    fn a_remote_unit_moves_from_whole_write_to_whole_write() {
        let (mut a, defs) = assembler();
        let c = Catalog::new();
        // History: applied as read, published only once live.
        offer(&mut a, "skus-1", (7, 1), 2, by_sku(&defs, "A", Some(5)));
        offer(&mut a, "skus-1", (7, 1), 2, by_sku(&defs, "B", Some(6)));
        a.publish(&c);
        assert!(seen(&c).is_empty(), "nothing before the history is read");
        a.go_live();
        a.publish(&c);
        assert_eq!(seen(&c), rows(&[("A", 5), ("B", 6)]));

        // Write 2 has three records; two came (other partitions lag): not visible yet.
        offer(&mut a, "skus-1", (7, 2), 3, by_sku(&defs, "A", Some(4)));
        offer(&mut a, "skus-1", (7, 2), 3, by_sku(&defs, "B", None));
        a.publish(&c);
        assert_eq!(
            seen(&c),
            rows(&[("A", 5), ("B", 6)]),
            "half a write is never seen"
        );
        offer(&mut a, "skus-1", (7, 2), 3, by_sku(&defs, "C", Some(1)));
        a.publish(&c);
        assert_eq!(seen(&c), rows(&[("A", 4), ("C", 1)]));
        assert_eq!(a.pending_writes(), 0);

        // Write 3 lost a record to compaction and never completes; write 4 does, and takes
        // write 3's records in first. A straggler of write 3 then applies as it comes.
        offer(&mut a, "skus-1", (7, 3), 3, by_sku(&defs, "A", Some(3)));
        offer(&mut a, "skus-1", (7, 3), 3, by_sku(&defs, "D", Some(9)));
        offer(&mut a, "skus-1", (7, 4), 1, by_sku(&defs, "A", Some(2)));
        a.publish(&c);
        assert_eq!(seen(&c), rows(&[("A", 2), ("C", 1), ("D", 9)]));
        offer(&mut a, "skus-1", (7, 3), 3, by_sku(&defs, "E", Some(8)));
        a.publish(&c);
        assert_eq!(seen(&c), rows(&[("A", 2), ("C", 1), ("D", 9), ("E", 8)]));

        // The unit's next run (its owner died mid-write): its first complete write releases
        // the dead run's partial write before it.
        offer(&mut a, "skus-1", (7, 5), 2, by_sku(&defs, "F", Some(7)));
        offer(&mut a, "skus-1", (9, 1), 1, by_sku(&defs, "F", Some(6)));
        a.publish(&c);
        assert_eq!(
            seen(&c),
            rows(&[("A", 2), ("C", 1), ("D", 9), ("E", 8), ("F", 6)])
        );
        assert_eq!(a.pending_writes(), 0);
    }

    #[test]
    fn a_write_let_go_late_never_takes_a_key_back() {
        let (mut a, defs) = assembler();
        let c = Catalog::new();
        a.go_live();
        offer(&mut a, "skus-0", (10, 1), 1, by_sku(&defs, "A", Some(1)));
        // Write 2 of run 10 is cut short (its owner died): A = 2 waits.
        offer(&mut a, "skus-0", (10, 2), 2, by_sku(&defs, "A", Some(2)));
        // The next owner's clock is behind: its run numbers lower, so its writes apply as
        // they come. A = 3 is later in the partition than A = 2.
        offer(&mut a, "skus-0", (8, 1), 1, by_sku(&defs, "A", Some(3)));
        // A later run's first write lets run 10's held write go: A stays 3.
        offer(&mut a, "skus-0", (11, 1), 1, by_sku(&defs, "B", Some(4)));
        a.publish(&c);
        assert_eq!(seen(&c), rows(&[("A", 3), ("B", 4)]));
        assert_eq!(a.pending_writes(), 0);
    }

    #[test]
    fn a_unit_folded_here_hides_its_remote_rows() {
        let (mut a, defs) = assembler();
        let c = Catalog::new();
        a.go_live();
        offer(&mut a, "skus-0", (1, 1), 1, by_sku(&defs, "A", Some(1)));
        offer(&mut a, "skus-1", (1, 1), 1, by_sku(&defs, "B", Some(2)));
        a.publish(&c);
        assert_eq!(seen(&c), rows(&[("A", 1), ("B", 2)]));
        // This member folds skus-0 now: its live rows, not the topic's.
        let def = &defs[1];
        assert_eq!(def.name, "stock_availability_by_sku");
        let mut local = ViewTable::new(def.clone());
        let ch = by_sku(&defs, "A", Some(3));
        local.set(ch.key, ch.row);
        c.publish_from(
            "skus-0",
            def,
            Snapshot {
                epoch: 1,
                offsets: Offsets::default(),
                rows: local.published(),
            },
        );
        assert_eq!(seen(&c), rows(&[("A", 3), ("B", 2)]));
        // It moved to another member: the topic's rows again.
        c.withdraw("skus-0");
        assert_eq!(seen(&c), rows(&[("A", 1), ("B", 2)]));
    }

    #[test]
    fn every_view_row_reads_back_from_its_record_as_written() {
        use datafusion::arrow::array::RecordBatch;
        let defs = crate::state::view_defs();
        let mut codecs: Vec<ViewCodec> = defs.iter().map(|d| ViewCodec::new(d).unwrap()).collect();
        for (v, def) in defs.iter().enumerate() {
            // A row with every column's type, a negative decimal, a fraction and a null where
            // the schema allows one.
            let row: Row = def
                .schema
                .fields()
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    use datafusion::arrow::datatypes::DataType::*;
                    match f.data_type() {
                        _ if f.is_nullable() && i % 2 == 0 => Cell::Null,
                        Utf8 => Cell::text("SKU \"7\"\nx"),
                        Int64 => Cell::Int(-42 - i as i64),
                        Float64 => Cell::Float(1.0 / 3.0),
                        Decimal128(..) => Cell::Dec(-123_456_789),
                        Timestamp(..) => Cell::Ts(1_763_800_000_123_456),
                        other => panic!("{other}"),
                    }
                })
                .collect();
            let batch: RecordBatch = crate::table::build_batch(&def.schema, &[&row[..]]).unwrap();
            let value = &json_lines(&batch).unwrap()[0];
            let key_batch = batch.project(&def.key).unwrap();
            let key = &json_lines(&key_batch).unwrap()[0];
            let want_key: Row = def.key.iter().map(|&i| row[i].clone()).collect();

            let up = codecs[v]
                .decode(v, key.as_bytes(), Some(value.as_bytes()), 1)
                .unwrap();
            assert_eq!(up.row.as_ref(), Some(&row), "{}: {value}", def.name);
            assert_eq!(up.key, want_key, "{}", def.name);
            let gone = codecs[v].decode(v, key.as_bytes(), None, 2).unwrap();
            assert_eq!(
                (gone.key, gone.row),
                (want_key, None),
                "{}: {key}",
                def.name
            );
        }
        // A bad record is skipped, and the records after it still decode.
        let good = {
            let def = &defs[0];
            let row: Row = def
                .schema
                .fields()
                .iter()
                .map(|f| match f.data_type() {
                    datafusion::arrow::datatypes::DataType::Utf8 => Cell::text("A"),
                    _ => Cell::Int(1),
                })
                .collect();
            let batch = crate::table::build_batch(&def.schema, &[&row[..]]).unwrap();
            json_lines(&batch).unwrap().remove(0)
        };
        for bad in [
            &b"not json"[..],
            b"{} {}",
            b"{\"sku\": 1",
            b"{\"sku\": \"A\"}",
        ] {
            assert!(codecs[0].decode(0, b"{}", Some(bad), 3).is_err());
            let ok = codecs[0].decode(0, b"{}", Some(good.as_bytes()), 4);
            assert!(
                ok.is_ok(),
                "after {:?}: {ok:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Input offsets `next` of partition 0 of one SKU topic, and `other` of partition 1.
    fn at(next: i64, other: i64) -> Offsets {
        let tp = |p| ("t.wms.stock_levels".to_owned(), p);
        Offsets(BTreeMap::from([(tp(0), next), (tp(1), other)]))
    }

    /// An epoch of this member's processor of `skus-0`: `stock_availability_by_sku` with A at
    /// `available` (or no view changed, a quiet epoch), at `position`.
    fn publish_local(
        c: &Catalog,
        defs: &[ViewDef],
        available: i64,
        position: Offsets,
        views: bool,
    ) {
        let def = &defs[1];
        assert_eq!(def.name, "stock_availability_by_sku");
        let mut t = ViewTable::new(def.clone());
        let ch = by_sku(defs, "A", Some(available));
        t.set(ch.key, ch.row);
        let snap = Snapshot {
            epoch: 1,
            offsets: position.clone(),
            rows: t.published(),
        };
        c.publish_epoch("skus-0", views.then_some((def, snap)), &position);
    }

    #[test]
    fn a_unit_that_moved_here_is_served_from_the_topics_until_it_catches_up() {
        let (mut a, defs) = assembler();
        let c = Catalog::new();
        a.go_live();
        // The former owner's last write: A = 5 at input offsets (20, 20).
        a.offer(
            "skus-0",
            (1, 1),
            1,
            &at(20, 20),
            by_sku(&defs, "A", Some(5)),
        );
        a.publish(&c);
        assert_eq!(seen(&c), rows(&[("A", 5)]));

        // The unit moves here and restarts from its checkpoint, at (12, 12) where A was 3.
        let def = &defs[1];
        let local = |available: i64, position: Offsets, views: bool| {
            publish_local(&c, &defs, available, position, views)
        };
        local(3, at(12, 12), true);
        assert_eq!(
            seen(&c),
            rows(&[("A", 5)]),
            "no step back to the checkpoint"
        );
        // Ahead on one partition and behind on the other is not caught up either.
        local(4, at(25, 19), true);
        assert_eq!(seen(&c), rows(&[("A", 5)]));
        // Past the former owner on every partition: the live rows.
        local(6, at(25, 21), true);
        assert_eq!(seen(&c), rows(&[("A", 6)]));
        // Its own writes come back through the topics, behind it: the local copy stays.
        a.offer(
            "skus-0",
            (2, 1),
            1,
            &at(25, 21),
            by_sku(&defs, "A", Some(6)),
        );
        a.publish(&c);
        local(7, at(26, 21), true);
        assert_eq!(seen(&c), rows(&[("A", 7)]));

        // Another move: the checkpoint is at (30, 30) and the former owner wrote up to (40, 40).
        c.withdraw("skus-0");
        a.offer(
            "skus-0",
            (3, 1),
            1,
            &at(40, 40),
            by_sku(&defs, "A", Some(8)),
        );
        a.publish(&c);
        local(8, at(30, 30), true);
        assert_eq!(c.snapshots(&def.name)[0].offsets, at(40, 40));
        // Quiet epochs (no view changed) carry the local position past the topics' too.
        local(8, at(41, 41), false);
        assert_eq!(seen(&c), rows(&[("A", 8)]));
        assert_eq!(
            c.snapshots(&def.name)[0].offsets,
            at(30, 30),
            "the local copy, with its rows of the last epoch that changed them"
        );
    }

    #[test]
    fn a_unit_folded_here_before_the_topics_were_read_is_never_taken_back() {
        let (mut a, defs) = assembler();
        let c = Catalog::new();
        let local =
            |available: i64, position: Offsets| publish_local(&c, &defs, available, position, true);
        let remote = |a: &mut Assembler, write, available, position: Offsets| {
            a.offer(
                "skus-0",
                (1, write),
                1,
                &position,
                by_sku(&defs, "A", Some(available)),
            );
            a.publish(&c);
        };
        a.go_live();

        // This member starts with the unit at its checkpoint; the topics are not read yet.
        local(3, at(12, 12));
        assert_eq!(seen(&c), rows(&[("A", 3)]));
        // The topics show the former owner's later write, ahead on every partition: served.
        remote(&mut a, 1, 5, at(20, 20));
        assert_eq!(seen(&c), rows(&[("A", 5)]));
        // Until the processor gets there.
        local(4, at(19, 25));
        assert_eq!(seen(&c), rows(&[("A", 5)]));
        local(6, at(20, 25));
        assert_eq!(seen(&c), rows(&[("A", 6)]));

        // Served already, the processor is not replaced by a copy it is ahead of on some
        // partition, even if that copy is ahead on another.
        c.withdraw("skus-0");
        local(7, at(30, 30));
        remote(&mut a, 2, 8, at(29, 40));
        assert_eq!(seen(&c), rows(&[("A", 7)]));

        // A copy from before the input topics were made again names offsets the input no
        // longer has: once the processor has read its input to the end, it is served.
        c.withdraw("skus-0");
        remote(&mut a, 3, 9, at(50_000, 50_000));
        local(1, at(10, 10));
        assert_eq!(seen(&c), rows(&[("A", 9)]));
        c.reached_end("skus-0");
        assert_eq!(seen(&c), rows(&[("A", 1)]));
        remote(&mut a, 4, 9, at(60_000, 60_000));
        assert_eq!(seen(&c), rows(&[("A", 1)]), "and stays served");
    }

    #[test]
    fn a_customer_units_offsets_read_back_as_its_processor_names_them() {
        use crate::group::Unit;
        // Everything a customer unit reads: its partition of the customer topics, the returns
        // and the rank shares whole.
        let unit = Unit::Customers(1);
        let t = |name: &str, p: i32, o: i64| ((format!("t.{name}"), p), o);
        let state = Offsets(BTreeMap::from([
            t("oms.customers", 1, 11),
            t("oms.orders", 1, 12),
            t("oms.returns", 0, 3),
            t("oms.returns", 1, 4),
            t("oms.returns", 2, 5),
            t("processors.g.customer-ranks", 0, 6),
        ]));
        let stored = crate::group::to_sink(&state, "t", unit);
        assert_ne!(stored, state, "the returns are stored per unit");
        let h = write_headers(&unit.name(), 1, 1, 1, &stored);
        assert_eq!(tags(Some(&h)).map(|t| t.offsets), Some(state));
    }

    #[test]
    fn headers_name_the_unit_the_write_its_size_and_its_offsets() {
        let stored = Offsets(BTreeMap::from([
            (("t.oms.returns@customers-2".to_owned(), 1), 40),
            (("t.oms.orders".to_owned(), 2), 7),
        ]));
        let h = write_headers("customers-2", 1_763_800_000_000, 17, 3, &stored);
        assert_eq!(
            tags(Some(&h)),
            Some(Tags {
                unit: "customers-2".into(),
                write: (1_763_800_000_000, 17),
                records: 3,
                offsets: Offsets(BTreeMap::from([
                    (("t.oms.returns".to_owned(), 1), 40),
                    (("t.oms.orders".to_owned(), 2), 7),
                ])),
            })
        );
        // A one-instance processor's records are never read back: no offsets.
        let h = write_headers("all", 1, 1, 1, &stored);
        assert!(h.iter().all(|x| x.key != OFFSETS_HEADER));
        // Offsets that do not parse are unknown, the rest of the tags stand.
        let h = OwnedHeaders::new()
            .insert(Header {
                key: UNIT_HEADER,
                value: Some("skus-0"),
            })
            .insert(Header {
                key: WRITE_HEADER,
                value: Some("5.6"),
            })
            .insert(Header {
                key: RECORDS_HEADER,
                value: Some("2"),
            })
            .insert(Header {
                key: OFFSETS_HEADER,
                value: Some("t.wms.stock_levels:0"),
            });
        assert_eq!(tags(Some(&h)).map(|t| t.offsets), Some(Offsets::default()));
        assert_eq!(tags::<OwnedHeaders>(None), None);
        let partial = OwnedHeaders::new().insert(Header {
            key: UNIT_HEADER,
            value: Some("skus-0"),
        });
        assert_eq!(tags(Some(&partial)), None);
    }
}
