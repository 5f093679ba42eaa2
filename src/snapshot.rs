//! The initial snapshot, copied in parallel chunks (see `cdc::snapshot` for why its rows meet
//! the stream exactly).
//!
//! ```text
//!  plan (on the first connection, inside the exported snapshot):
//!     per table: register schemas, size in blocks → ctid chunks [lo, hi)
//!  workers 1..N (each its own connection, each importing the same exported snapshot):
//!     pop a chunk → COPY its blocks → decode → encode → sink      (one progress entry per chunk)
//!  coordinator (this task): counts rows, logs progress and ETA, records acked chunks
//! ```
//!
//! Why parallel chunks are still one consistent snapshot: every worker's transaction imports the
//! same exported snapshot, so all of them read the state as of the slot's consistent point, and
//! the chunks' block ranges partition each table (the last range is open-ended), so every row
//! is read exactly once. Rows of different chunks interleave in Kafka, which is harmless: a key
//! appears in a snapshot once, and the stream starts only after every chunk has been read.
//!
//! Each chunk has its own progress entry ending at the consistent point, so no streamed change
//! (all commit after that point) can be confirmed before every snapshot row is acked, and the
//! coordinator can tell which chunks are safely in Kafka ([`Progress::is_done`]); those are
//! written to the snapshot's state file as they complete (see [`SnapshotState`]).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use avro::Op;
use cdc::Lsn;
use cdc::position::Position;
use cdc::progress::Seq;
use cdc::snapshot::BlockRange;
use tokio::sync::{mpsc, watch};

use crate::emit::{Emitter, EventMeta, Out, TableState};
use crate::pipeline::{Pipeline, now_ms};

/// One ctid range of one table.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    table: usize,
    index: u32,
    range: BlockRange,
}

/// A table being copied, for progress reports.
struct TableProgress {
    name: String,
    /// Postgres's estimate (`reltuples`); 0 when unknown.
    estimate: u64,
    rows: AtomicU64,
    chunks: u32,
    chunks_read: AtomicU64,
}

/// A chunk whose rows have all been handed to the sink.
struct ChunkRead {
    chunk: Chunk,
    seq: Seq,
}

/// Copies `tables` as of the consistent point `at`: `first` is a connection whose transaction
/// already reads the exported snapshot `snapshot_name`; more workers import it too.
///
/// Returns `false` when stopped before the end: the chunks not yet acked stay in `file`, and
/// the next start copies them (see [`Points`]).
pub(crate) async fn initial(
    p: &mut Pipeline,
    (first, snapshot_name): (tokio_postgres::Client, String),
    tables: &[String],
    at: Lsn,
    stop: &watch::Receiver<bool>,
    file: &PendingFile,
    identity: &Position,
) -> anyhow::Result<bool> {
    let started = Instant::now();
    let ranges = cdc::snapshot::supports_block_ranges(&first).await?;
    let chunk_pages = (p.cfg.source.snapshot_chunk_bytes / 8192).max(1) as u32;
    let mut states: Vec<Arc<TableState>> = Vec::with_capacity(tables.len());
    let mut progress: Vec<TableProgress> = Vec::with_capacity(tables.len());
    let mut queue = VecDeque::new();
    let mut pending = Pending {
        system_identifier: identity.system_identifier.clone(),
        database: identity.database.clone(),
        slot: identity.slot.clone(),
        ..Pending::default()
    };
    for (i, table) in tables.iter().enumerate() {
        let (state, pages, estimate) = p.table_for_copy(&first, table).await?;
        let chunks = plan(pages, chunk_pages, ranges);
        progress.push(TableProgress {
            name: table.clone(),
            estimate: estimate.max(0.0) as u64,
            rows: AtomicU64::new(0),
            chunks: chunks.len() as u32,
            chunks_read: AtomicU64::new(0),
        });
        pending.tables.push(PendingTable {
            table: table.clone(),
            ranges: Some(chunks.iter().map(|r| (r.lo, r.hi)).collect()),
        });
        for range in chunks {
            queue.push_back(Chunk {
                table: i,
                index: range.lo,
                range,
            });
        }
        states.push(state);
    }
    let total_chunks = queue.len();
    file.store(&pending)?;
    let workers = p.cfg.source.snapshot_workers.clamp(1, total_chunks.max(1));
    tracing::info!(tables = tables.len(), chunks = total_chunks, workers, consistent_point = %at, "initial snapshot planned");

    let shared = Arc::new(Shared {
        queue: Mutex::new(queue),
        states,
        progress,
        out: p.out.clone(),
        at,
        at_text: at.to_string(),
        started_ms: now_ms(),
    });
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<ChunkRead>();
    let mut set = tokio::task::JoinSet::new();
    let mut clients = vec![first];
    for _ in 1..workers {
        clients.push(crate::pipeline::open_snapshot(&p.cfg, &snapshot_name).await?);
    }
    for client in clients {
        set.spawn(worker(
            client,
            shared.clone(),
            done_tx.clone(),
            stop.clone(),
        ));
    }
    drop(done_tx);

    // Acked chunks are recorded a few times a second (a crash repeats at most that much work);
    // progress is logged every few seconds.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_report = Instant::now();
    let mut unacked: Vec<ChunkRead> = Vec::new();
    let mut acked = 0usize;
    let failed = loop {
        tokio::select! {
            joined = set.join_next() => match joined {
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => break Some(e),
                Some(Err(e)) => break Some(anyhow!("a snapshot worker panicked: {e}")),
                None => break None,
            },
            Some(read) = done_rx.recv() => unacked.push(read),
            _ = tick.tick() => {
                acked += settle(&shared, &mut unacked, &mut pending, file)?;
                export_rows(p, &shared);
                draw_bar(&shared, started, false);
                if last_report.elapsed() >= Duration::from_secs(5) {
                    last_report = Instant::now();
                    report(&shared, started, acked, total_chunks);
                }
            }
        }
    };
    set.abort_all();
    draw_bar(&shared, started, true);
    while let Ok(read) = done_rx.try_recv() {
        unacked.push(read);
    }
    let stopped = failed.is_some() && *stop.borrow();
    if let Some(e) = failed {
        // Keep what is done: deliver what was handed to the sink, record the acked chunks,
        // leave the slot. The next start copies the rest (see `Points`).
        let sink = shared.out.sink.clone();
        let _ = tokio::task::spawn_blocking(move || sink.flush(Duration::from_secs(60))).await;
        settle(&shared, &mut unacked, &mut pending, file)?;
        let left: usize = pending
            .tables
            .iter()
            .map(|t| t.ranges.as_ref().map_or(1, Vec::len))
            .sum();
        if stopped {
            tracing::info!(chunks_left = left, file = %file.path.display(), "stopped during the initial snapshot; the next start copies the chunks left");
            return Ok(false);
        }
        tracing::warn!(chunks_left = left, file = %file.path.display(), "initial snapshot interrupted; the next attempt copies the chunks left");
        return Err(e);
    }
    // Every chunk is read; the snapshot is finished once the sinks have acked them all.
    while !unacked.is_empty() {
        if let Some(f) = shared.out.progress.failure() {
            bail!("a sink failed during the snapshot: {f}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        acked += settle(&shared, &mut unacked, &mut pending, file)?;
    }
    pending.tables.clear();
    file.store(&pending)?;
    export_rows(p, &shared);
    let total: u64 = shared
        .progress
        .iter()
        .map(|t| t.rows.load(Ordering::Relaxed))
        .sum();
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(rows = total, tables = tables.len(), chunks = total_chunks, chunks_acked = acked, secs = format!("{secs:.2}"), rows_per_sec = (total as f64 / secs.max(1e-6)) as u64, consistent_point = %at, "initial snapshot delivered; streaming from its consistent point");
    Ok(true)
}

struct Shared {
    queue: Mutex<VecDeque<Chunk>>,
    states: Vec<Arc<TableState>>,
    progress: Vec<TableProgress>,
    out: Out,
    at: Lsn,
    at_text: String,
    /// The envelope's `source.ts_ms` for snapshot rows: when the snapshot started.
    started_ms: i64,
}

/// Exports the rows copied so far per table (the `walbridge_snapshot_rows_copied` gauge).
fn export_rows(p: &Pipeline, shared: &Shared) {
    for t in &shared.progress {
        p.metrics
            .table(&t.name)
            .snapshot_rows
            .set(t.rows.load(Ordering::Relaxed) as i64);
    }
}

/// Retires the read chunks that the sinks have fully acked, recording them in `file`; returns
/// how many.
fn settle(
    shared: &Shared,
    unacked: &mut Vec<ChunkRead>,
    pending: &mut Pending,
    file: &PendingFile,
) -> anyhow::Result<usize> {
    let before = unacked.len();
    unacked.retain(|r| {
        let done = shared.out.progress.is_done(r.seq);
        if done {
            pending.remove(&shared.progress[r.chunk.table].name, r.chunk.range.lo);
        }
        !done
    });
    let n = before - unacked.len();
    if n > 0 {
        file.store(pending)?;
    }
    Ok(n)
}

/// Whether a snapshot progress line is on the terminal; [`LogWriter`] clears it before a log
/// line so the two do not run into each other.
static BAR_SHOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// stderr for the log subscriber: first clears the snapshot progress line, if one is shown.
pub struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        if BAR_SHOWN.swap(false, Ordering::Relaxed) {
            err.write_all(b"\r\x1b[K")?;
        }
        err.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// On a terminal: one line redrawn in place with a bar, rows, rows/s and ETA per table still
/// being copied. Elsewhere nothing (progress is logged and exported as a metric).
fn draw_bar(shared: &Shared, started: Instant, finished: bool) {
    use std::io::{IsTerminal, Write};
    let mut err = std::io::stderr();
    if !err.is_terminal() {
        return;
    }
    if finished {
        if BAR_SHOWN.swap(false, Ordering::Relaxed) {
            let _ = err.write_all(b"\r\x1b[K");
        }
        return;
    }
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    let mut line = String::new();
    for t in &shared.progress {
        if t.chunks_read.load(Ordering::Relaxed) == u64::from(t.chunks) {
            continue;
        }
        let rows = t.rows.load(Ordering::Relaxed);
        let rate = rows as f64 / secs;
        let frac = if t.estimate > 0 {
            (rows as f64 / t.estimate as f64).min(1.0)
        } else {
            0.0
        };
        let filled = (frac * 10.0).round() as usize;
        let eta = if t.estimate > rows && rate > 0.0 {
            let s = ((t.estimate - rows) as f64 / rate) as u64;
            format!("ETA {}:{:02}", s / 60, s % 60)
        } else {
            "ETA ?".to_owned()
        };
        if !line.is_empty() {
            line.push_str("  ");
        }
        line.push_str(&format!(
            "{} [{}{}] {:>3.0}% {rows} rows {:.0}/s {eta}",
            t.name,
            "#".repeat(filled),
            "-".repeat(10 - filled),
            frac * 100.0,
            rate
        ));
    }
    if line.chars().count() > 200 {
        line = line.chars().take(197).collect::<String>() + "...";
    }
    let _ = write!(err, "\r\x1b[K{line}");
    BAR_SHOWN.store(true, Ordering::Relaxed);
}

/// Logs rows, rate and ETA per table still being copied.
fn report(shared: &Shared, started: Instant, acked: usize, chunks: usize) {
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    for t in &shared.progress {
        let read = t.chunks_read.load(Ordering::Relaxed);
        if read == u64::from(t.chunks) {
            continue;
        }
        let rows = t.rows.load(Ordering::Relaxed);
        let rate = rows as f64 / secs;
        let eta =
            (t.estimate > rows && rate > 0.0).then(|| ((t.estimate - rows) as f64 / rate) as u64);
        tracing::info!(table = %t.name, rows, estimate = t.estimate, rows_per_sec = rate as u64, eta_secs = eta, chunks_read = read, chunks = t.chunks, "snapshot progress");
    }
    tracing::debug!(acked, chunks, "snapshot chunks acked");
}

/// Copies chunks until the queue is empty, then ends its snapshot transaction.
async fn worker(
    client: tokio_postgres::Client,
    shared: Arc<Shared>,
    done: mpsc::UnboundedSender<ChunkRead>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut em = Emitter::default();
    loop {
        let Some(chunk) = shared
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop_front()
        else {
            break;
        };
        let t = &shared.states[chunk.table];
        let tp = &shared.progress[chunk.table];
        let seq = shared.out.progress.begin();
        let mut rows = cdc::snapshot::copy_table(&client, &t.rel, Some(chunk.range)).await?;
        let mut meta = EventMeta {
            seq,
            commit_lsn: shared.at,
            xid: 0,
            commit_ms: shared.started_ms,
            now_ms: now_ms(),
            lsn_text: &shared.at_text,
            xid_text: "0",
            snapshot: true,
        };
        let mut counted = 0;
        let mut n = 0;
        while let Some(row) = rows.next().await? {
            n += 1;
            if em.prepaid() == 0 {
                em.prepay(&shared.out.progress, seq, 1024);
            }
            em.id(format_args!(
                "snapshot:{}:{}:{}:{n}",
                shared.at_text, tp.name, chunk.index
            ));
            em.emit(&shared.out, t, &meta, Op::Read, None, Some(row))
                .await?;
            if n % 4096 == 0 {
                // The clock, the stop flag and the counters once per few thousand rows: per
                // row they were measurable in the profile.
                meta.now_ms = now_ms();
                tp.rows.fetch_add(n - counted, Ordering::Relaxed);
                counted = n;
                if *stop.borrow() {
                    bail!("stopped during the initial snapshot of {}", tp.name);
                }
                if let Some(f) = shared.out.progress.failure() {
                    bail!("a sink failed during the snapshot of {}: {f}", tp.name);
                }
            }
        }
        tp.rows.fetch_add(n - counted, Ordering::Relaxed);
        tp.chunks_read.fetch_add(1, Ordering::Relaxed);
        em.settle(&shared.out.progress, seq);
        shared.out.progress.commit(seq, shared.at);
        let _ = done.send(ChunkRead { chunk, seq });
    }
    // The transaction only read; ending it lets go of the imported snapshot.
    cdc::snapshot::finish(&client)
        .await
        .context("ending a snapshot transaction")?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Pending snapshot work, kept on disk.

/// Snapshot work not yet safely in the sinks: per table, the block ranges still to copy.
/// Stored as `<state_dir>/<slot>.snapshot.json` whenever it changes, and removed when empty, so
/// that a crash or a stop in the middle of a snapshot resumes from the finished chunks.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Pending {
    pub system_identifier: String,
    pub database: String,
    pub slot: String,
    pub tables: Vec<PendingTable>,
    /// Ids of the snapshot signals already queued: a signal re-delivered after a restart is not
    /// queued twice.
    #[serde(default)]
    pub signals: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct PendingTable {
    pub table: String,
    /// Ranges `[lo, hi)` still to copy (`hi` null: to the end); `None`: the whole table, planned
    /// when its turn comes.
    pub ranges: Option<Vec<(u32, Option<u32>)>>,
}

impl Pending {
    fn remove(&mut self, table: &str, lo: u32) {
        for t in &mut self.tables {
            if t.table == table
                && let Some(r) = &mut t.ranges
            {
                r.retain(|(l, _)| *l != lo);
            }
        }
        self.tables
            .retain(|t| t.ranges.as_ref().is_none_or(|r| !r.is_empty()));
    }
}

#[derive(Debug, Clone)]
pub(crate) struct PendingFile {
    path: PathBuf,
}

impl PendingFile {
    pub fn new(state_dir: &std::path::Path, slot: &str) -> PendingFile {
        PendingFile {
            path: state_dir.join(format!("{slot}.snapshot.json")),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The pending work recorded for this source, if any; an error when the file names another
    /// server, database or slot (see `cdc::position` for why that must stop walbridge).
    pub fn load(&self, identity: &Position) -> anyhow::Result<Option<Pending>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        let p: Pending = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a walbridge snapshot record; move it away to start without it",
                self.path.display()
            )
        })?;
        if (&p.system_identifier, &p.database, &p.slot)
            != (
                &identity.system_identifier,
                &identity.database,
                &identity.slot,
            )
        {
            bail!(
                "{} was written for system {} database {:?} slot {:?}, not this source; move it away",
                self.path.display(),
                p.system_identifier,
                p.database,
                p.slot
            );
        }
        Ok(Some(p))
    }

    /// Writes `p` atomically (temporary file, fsync, rename), or removes the file when nothing
    /// is pending.
    pub fn store(&self, p: &Pending) -> anyhow::Result<()> {
        if p.tables.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("removing {}", self.path.display()))
                }
                _ => Ok(()),
            };
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &serde_json::to_vec_pretty(p)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().with_context(|| format!("writing {}", self.path.display()))
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshots placed at a point of the running stream: the rest of an interrupted initial
// snapshot, and tables re-snapshotted on request (`walbridge snapshot --table`).

/// Prefix of the logical messages that ask a running pipeline for a snapshot.
pub const SIGNAL_PREFIX: &str = "walbridge.signal";

/// The body of a snapshot signal.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Signal {
    pub id: String,
    pub slot: String,
    pub snapshot: Vec<String>,
}

/// An exported snapshot at `at`, imported by `clients`, not yet copied.
struct Prepared {
    at: Lsn,
    clients: Vec<tokio_postgres::Client>,
}

/// Copies pending tables while the main slot streams, each batch of chunks at an exact point
/// of the stream.
///
/// How a point is made: a temporary slot created with `SNAPSHOT 'export'` on a second
/// replication connection has a consistent point `P` and an exported snapshot that sees exactly
/// the transactions committed before `P` (the same guarantee as the initial snapshot; see
/// `cdc::snapshot`). The pipeline handles the main stream in commit order; it copies the chunks
/// through that snapshot right before the first item of the stream at or after `P` (a
/// transaction committing at or after `P`, or a keepalive or heartbeat position past it). So
/// every transaction before the copied rows in Kafka is one the rows already reflect, and every
/// one after them is one they do not: per key, the stream's order is kept, with the snapshot
/// row placed exactly where its state belongs. No deduplication window is needed, unlike
/// watermark-based incremental snapshots, because the copy is not concurrent with the stream
/// position it is placed at. If the pipeline had already passed `P` when the snapshot became
/// ready, the point is thrown away and a new one made.
///
/// The stream waits while a batch of chunks is copied (one chunk per connection), which bounds
/// the pause to about one chunk's copy time; the reader's bounded channel holds the replication
/// stream meanwhile. A batch's ranges leave the pending file only once the sinks acked every
/// row, and the next batch starts after that.
///
/// Rows that move between blocks while a table is copied point by point (an UPDATE writing the
/// new row version into an already copied block) are not lost: the UPDATE itself is in the
/// stream after the earlier point. Only its unchanged TOAST values are then marked unavailable,
/// as for any streamed update.
pub(crate) struct Points {
    file: PendingFile,
    pending: Pending,
    pg: tokio_postgres::Config,
    tls: cdc::tls::PgTls,
    slot: String,
    workers: usize,
    chunk_pages: u32,
    /// Tables the pipeline captures (`schema.table`): signals for others are refused.
    captured: Vec<String>,
    preparing: Option<tokio::sync::oneshot::Receiver<anyhow::Result<Prepared>>>,
    ready: Option<Prepared>,
    /// Chunks of the last batch not yet acked: (seq, table, first block).
    in_flight: Vec<(Seq, String, u32)>,
    /// After a point could not be made (no free slot or walsender, say): not before this.
    retry_at: Option<Instant>,
    /// Commit LSN of the last transaction handled: a point at or before it came too late.
    /// (Keepalive and heartbeat positions past a point do not spoil it: they carry no rows, and
    /// confirming them early is safe because the chunks stay in the pending record until acked.)
    last_commit: Lsn,
}

impl Points {
    pub fn new(
        cfg: &crate::config::Config,
        file: PendingFile,
        pending: Pending,
        captured: Vec<String>,
        start: Lsn,
    ) -> Points {
        Points {
            file,
            pending,
            pg: cfg.source.pg_config(),
            tls: cfg.source.tls(),
            slot: cfg.source.slot.clone(),
            workers: cfg.source.snapshot_workers,
            chunk_pages: (cfg.source.snapshot_chunk_bytes / 8192).max(1) as u32,
            captured,
            preparing: None,
            ready: None,
            in_flight: Vec::new(),
            retry_at: None,
            last_commit: start,
        }
    }

    /// A table seen in the stream (e.g. created after the start in a `schema.*` publication)
    /// may be asked for too.
    pub fn captured(&mut self, table: &str) {
        if !self.captured.iter().any(|t| t == table) {
            self.captured.push(table.to_owned());
        }
    }

    /// Queues the tables of a snapshot signal.
    pub fn signal(&mut self, body: &[u8]) -> anyhow::Result<()> {
        let sig: Signal = match serde_json::from_slice(body) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a malformed snapshot signal");
                return Ok(());
            }
        };
        if sig.slot != self.slot || self.pending.signals.contains(&sig.id) {
            return Ok(());
        }
        for table in sig.snapshot {
            if !self.captured.contains(&table) {
                tracing::warn!(table = %table, signal = %sig.id, "snapshot requested for a table this pipeline does not capture; ignored");
                continue;
            }
            tracing::info!(table = %table, signal = %sig.id, "snapshot of a table requested while streaming");
            self.pending.tables.push(PendingTable {
                table,
                ranges: None,
            });
        }
        self.pending.signals.push(sig.id);
        let n = self.pending.signals.len();
        if n > 100 {
            self.pending.signals.drain(..n - 100);
        }
        self.file.store(&self.pending)
    }

    /// Between batches: retire acked chunks, and prepare the next point when there is work.
    pub fn poll(&mut self, progress: &cdc::progress::Progress) -> anyhow::Result<()> {
        if !self.in_flight.is_empty() && self.in_flight.iter().all(|(s, ..)| progress.is_done(*s)) {
            for (_, table, lo) in std::mem::take(&mut self.in_flight) {
                self.pending.remove(&table, lo);
            }
            self.file.store(&self.pending)?;
            if self.pending.tables.is_empty() {
                tracing::info!("snapshot work finished");
            }
        }
        if self.in_flight.is_empty()
            && self.preparing.is_none()
            && self.ready.is_none()
            && !self.pending.tables.is_empty()
            && self.retry_at.is_none_or(|t| Instant::now() >= t)
        {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let (pg, tls, slot, n) = (
                self.pg.clone(),
                self.tls.clone(),
                self.slot.clone(),
                self.workers,
            );
            tokio::spawn(async move {
                let _ = tx.send(prepare(&pg, &tls, &slot, n).await);
            });
            self.preparing = Some(rx);
        }
        Ok(())
    }

    /// Called with the position of each stream item before it is handled (`commit`: the item
    /// begins a transaction committing at `pos`): `Some(prepared)` when the chunks must be
    /// copied now, before this item.
    fn due(&mut self, pos: Lsn, commit: bool) -> anyhow::Result<Option<Prepared>> {
        if let Some(rx) = &mut self.preparing {
            match rx.try_recv() {
                Ok(Err(e)) => {
                    // Streaming must not stop because a copy cannot start: say why, try later.
                    self.preparing = None;
                    self.retry_at = Some(Instant::now() + Duration::from_secs(30));
                    tracing::warn!(error = %format!("{e:#}"), retry_in_secs = 30, "cannot start copying pending snapshot chunks; streaming goes on");
                }
                Ok(Ok(prepared)) => {
                    self.preparing = None;
                    if self.last_commit >= prepared.at {
                        tracing::debug!(point = %prepared.at, passed = %self.last_commit, "the stream passed the snapshot point; making a new one");
                    } else {
                        self.ready = Some(prepared);
                    }
                }
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => self.preparing = None,
            }
        }
        let due = self.ready.as_ref().is_some_and(|r| pos >= r.at);
        if commit {
            self.last_commit = self.last_commit.max(pos);
        }
        Ok(if due { self.ready.take() } else { None })
    }
}

/// Makes a point: a temporary slot's exported snapshot, imported by `n` connections.
async fn prepare(
    pg: &tokio_postgres::Config,
    tls: &cdc::tls::PgTls,
    slot: &str,
    n: usize,
) -> anyhow::Result<Prepared> {
    let mut repl = cdc::conn::ReplicationConnection::connect(pg, tls)
        .await
        .context("opening a replication connection for a snapshot point")?;
    // Unique per process and point; a temporary slot disappears with its connection.
    let name = format!(
        "{}_snap_{}_{}",
        slot.chars().take(40).collect::<String>(),
        std::process::id(),
        now_ms()
    );
    let created = cdc::slot::create_temporary_slot_with_snapshot(&mut repl, &name)
        .await
        .context(
            "creating a temporary slot for a snapshot point (it needs one free max_replication_slots \
             entry and one free max_wal_senders connection while a batch of chunks is copied)",
        )?;
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let (client, conn) = pg
            .connect(tls.clone())
            .await
            .context("opening a snapshot connection")?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::warn!(error = %e, "snapshot connection ended");
            }
        });
        cdc::snapshot::import(&client, &created.snapshot_name).await?;
        clients.push(client);
    }
    // Every connection has imported the snapshot; the temporary slot can go. A heartbeat after
    // the point lets an idle stream reach it now rather than at the next heartbeat.
    drop(repl);
    let (hb, conn) = pg
        .connect(tls.clone())
        .await
        .context("opening a connection for a heartbeat")?;
    tokio::spawn(conn);
    hb.execute(
        "SELECT pg_logical_emit_message(false, $1, '')",
        &[&crate::pipeline::HEARTBEAT_PREFIX],
    )
    .await
    .context("writing a heartbeat after a snapshot point")?;
    Ok(Prepared {
        at: created.consistent_point,
        clients,
    })
}

/// Block ranges of a table of `pages` blocks: chunks when the server scans ctid ranges, else
/// the whole table at once.
fn plan(pages: u32, chunk_pages: u32, ranges: bool) -> Vec<BlockRange> {
    if ranges {
        cdc::snapshot::plan_chunks(pages, chunk_pages)
    } else {
        vec![BlockRange { lo: 0, hi: None }]
    }
}

impl Pipeline {
    /// A table about to be copied through `client`'s snapshot: mapped as of that snapshot
    /// (schemas registered), with its size in blocks and Postgres's row estimate.
    async fn table_for_copy(
        &mut self,
        client: &tokio_postgres::Client,
        table: &str,
    ) -> anyhow::Result<(Arc<TableState>, u32, f64)> {
        let (schema, name) = table.split_once('.').unwrap_or(("public", table));
        let (rel, types) = cdc::snapshot::catalog_relation(client, schema, name).await?;
        for t in &types {
            self.types.insert(t);
        }
        let (pages, estimate) = cdc::snapshot::table_size(client, &rel).await?;
        let rel_id = rel.id;
        self.relation(rel).await?;
        let state = self
            .tables
            .get(&rel_id)
            .cloned()
            .ok_or_else(|| anyhow!("{table} was not mapped"))?;
        Ok((state, pages, estimate))
    }

    /// Before a stream item at `pos`: copies the next batch of pending chunks if its point is
    /// due (see [`Points`]).
    pub(crate) async fn snapshot_point(&mut self, pos: Lsn, commit: bool) -> anyhow::Result<()> {
        let Some(prepared) = self.points.due(pos, commit)? else {
            return Ok(());
        };
        let Prepared { at, clients } = prepared;
        // Up to one chunk per connection, from the front of the pending tables.
        let mut batch: VecDeque<Chunk> = VecDeque::new();
        let mut states = Vec::new();
        let mut progress = Vec::new();
        let mut i = 0;
        while batch.len() < clients.len() && i < self.points.pending.tables.len() {
            let table = self.points.pending.tables[i].table.clone();
            let first = &clients[0];
            let (state, pages, _) = match self.table_for_copy(first, &table).await {
                Err(e)
                    if e.downcast_ref::<cdc::snapshot::SnapshotError>()
                        .is_some_and(|e| {
                            matches!(e, cdc::snapshot::SnapshotError::MissingTable(_))
                        }) =>
                {
                    // Dropped since it was requested: nothing left to copy.
                    tracing::warn!(table = %table, "a table waiting for its snapshot no longer exists; skipped");
                    self.points.pending.tables.remove(i);
                    self.points.file.store(&self.points.pending)?;
                    continue;
                }
                other => other?,
            };
            let ranges = match self.points.pending.tables[i].ranges.clone() {
                Some(r) => r,
                None => {
                    let ranges = cdc::snapshot::supports_block_ranges(first).await?;
                    let planned: Vec<(u32, Option<u32>)> =
                        plan(pages, self.points.chunk_pages, ranges)
                            .iter()
                            .map(|r| (r.lo, r.hi))
                            .collect();
                    self.points.pending.tables[i].ranges = Some(planned.clone());
                    self.points.file.store(&self.points.pending)?;
                    planned
                }
            };
            states.push(state);
            let take = clients.len() - batch.len();
            for &(lo, hi) in ranges.iter().take(take) {
                batch.push_back(Chunk {
                    table: progress.len(),
                    index: lo,
                    range: BlockRange { lo, hi },
                });
            }
            progress.push(TableProgress {
                name: table,
                estimate: 0,
                rows: AtomicU64::new(0),
                chunks: ranges.len().min(take) as u32,
                chunks_read: AtomicU64::new(0),
            });
            i += 1;
        }
        let chunks = batch.len();
        let shared = Arc::new(Shared {
            queue: Mutex::new(batch),
            states,
            progress,
            out: self.out.clone(),
            at,
            at_text: at.to_string(),
            started_ms: now_ms(),
        });
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<ChunkRead>();
        let (_never, stop) = watch::channel(false);
        let mut set = tokio::task::JoinSet::new();
        for client in clients {
            set.spawn(worker(
                client,
                shared.clone(),
                done_tx.clone(),
                stop.clone(),
            ));
        }
        drop(done_tx);
        while let Some(joined) = set.join_next().await {
            joined.map_err(|e| anyhow!("a snapshot worker panicked: {e}"))??;
        }
        while let Ok(read) = done_rx.try_recv() {
            let table = shared.progress[read.chunk.table].name.clone();
            self.points
                .in_flight
                .push((read.seq, table, read.chunk.range.lo));
        }
        let rows: u64 = shared
            .progress
            .iter()
            .map(|t| t.rows.load(Ordering::Relaxed))
            .sum();
        let tables: Vec<&str> = shared.progress.iter().map(|t| t.name.as_str()).collect();
        tracing::info!(tables = %tables.join(","), point = %at, chunks, rows, "snapshot chunks copied at a point of the stream");
        Ok(())
    }
}

/// `walbridge snapshot --table …`: asks the pipeline streaming `cfg`'s slot to copy `tables`
/// again, by writing a signal into the source's WAL (a transactional logical message), which
/// the pipeline reads in stream order. It works whether or not the pipeline is running right
/// now: a stopped one finds the signal when it starts. Returns the signal id.
pub async fn request(cfg: &crate::config::Config, tables: &[String]) -> anyhow::Result<String> {
    let (client, conn) = cfg
        .source
        .pg_config()
        .connect(cfg.source.tls())
        .await
        .with_context(|| format!("connecting to the source {}", cfg.source.dsn.redacted()))?;
    tokio::spawn(conn);
    let slot_exists = client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.source.slot],
        )
        .await?
        .is_some();
    if !slot_exists {
        bail!(
            "slot {:?} does not exist: no pipeline streams this source yet. Start `walbridge run` first \
             (its initial snapshot copies every table)",
            cfg.source.slot
        );
    }
    let published: Vec<String> = client
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
            &[&cfg.source.publication],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let unknown: Vec<&String> = tables.iter().filter(|t| !published.contains(t)).collect();
    if !unknown.is_empty() {
        bail!(
            "not captured by publication {:?}: {}. Name tables as schema.table; captured are: {}",
            cfg.source.publication,
            unknown
                .iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            published.join(", ")
        );
    }
    let id = format!("{}-{}", now_ms(), std::process::id());
    let body = serde_json::to_string(&Signal {
        id: id.clone(),
        slot: cfg.source.slot.clone(),
        snapshot: tables.to_vec(),
    })?;
    client
        .execute(
            "SELECT pg_logical_emit_message(true, $1, convert_to($2, 'UTF8'))",
            &[&SIGNAL_PREFIX, &body],
        )
        .await
        .context("writing the snapshot signal")?;
    Ok(id)
}
