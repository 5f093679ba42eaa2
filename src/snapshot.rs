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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use avro::Op;
use cdc::Lsn;
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
pub(crate) async fn initial(
    p: &mut Pipeline,
    first: tokio_postgres::Client,
    snapshot_name: &str,
    tables: &[String],
    at: Lsn,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let ranges = cdc::snapshot::supports_block_ranges(&first).await?;
    let chunk_pages = (p.cfg.source.snapshot_chunk_bytes / 8192).max(1) as u32;
    let mut states: Vec<Arc<TableState>> = Vec::with_capacity(tables.len());
    let mut progress: Vec<TableProgress> = Vec::with_capacity(tables.len());
    let mut queue = VecDeque::new();
    for (i, table) in tables.iter().enumerate() {
        let (schema, name) = table.split_once('.').unwrap_or(("public", table));
        let (rel, types) = cdc::snapshot::catalog_relation(&first, schema, name).await?;
        for t in &types {
            p.types.insert(t);
        }
        let (pages, estimate) = cdc::snapshot::table_size(&first, &rel).await?;
        let rel_id = rel.id;
        p.relation(rel).await?;
        let state = p
            .tables
            .get(&rel_id)
            .cloned()
            .ok_or_else(|| anyhow!("{table} was not mapped"))?;
        let chunks = if ranges {
            cdc::snapshot::plan_chunks(pages, chunk_pages)
        } else {
            vec![BlockRange { lo: 0, hi: None }]
        };
        progress.push(TableProgress {
            name: table.clone(),
            estimate: estimate.max(0.0) as u64,
            rows: AtomicU64::new(0),
            chunks: chunks.len() as u32,
            chunks_read: AtomicU64::new(0),
        });
        for (index, range) in chunks.into_iter().enumerate() {
            queue.push_back(Chunk {
                table: i,
                index: index as u32,
                range,
            });
        }
        states.push(state);
    }
    let total_chunks = queue.len();
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
        clients.push(crate::pipeline::open_snapshot(&p.cfg, snapshot_name).await?);
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

    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    let mut unacked: Vec<ChunkRead> = Vec::new();
    let mut acked = 0usize;
    loop {
        tokio::select! {
            joined = set.join_next() => match joined {
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => { set.abort_all(); return Err(e); }
                Some(Err(e)) => { set.abort_all(); return Err(anyhow!("a snapshot worker panicked: {e}")); }
                None => break,
            },
            Some(read) = done_rx.recv() => unacked.push(read),
            _ = tick.tick() => {
                acked += settle(&shared, &mut unacked);
                report(&shared, started, acked, total_chunks);
            }
        }
    }
    while let Ok(read) = done_rx.try_recv() {
        unacked.push(read);
    }
    acked += settle(&shared, &mut unacked);
    let total: u64 = shared
        .progress
        .iter()
        .map(|t| t.rows.load(Ordering::Relaxed))
        .sum();
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(rows = total, tables = tables.len(), chunks = total_chunks, chunks_acked = acked, secs = format!("{secs:.2}"), rows_per_sec = (total as f64 / secs.max(1e-6)) as u64, consistent_point = %at, "initial snapshot read; streaming from its consistent point");
    Ok(())
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

/// Retires the read chunks that the sinks have fully acked; returns how many.
fn settle(shared: &Shared, unacked: &mut Vec<ChunkRead>) -> usize {
    let before = unacked.len();
    unacked.retain(|r| {
        let done = shared.out.progress.is_done(r.seq);
        if done {
            tracing::debug!(
                table = %shared.progress[r.chunk.table].name,
                chunk = r.chunk.index,
                "snapshot chunk acked"
            );
        }
        !done
    });
    before - unacked.len()
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
        while let Some(row) = rows.next().await? {
            let n = rows.rows();
            em.id(format_args!(
                "snapshot:{}:{}:{}:{n}",
                shared.at_text, tp.name, chunk.index
            ));
            em.emit(&shared.out, t, &meta, Op::Read, None, Some(&row))
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
        tp.rows.fetch_add(rows.rows() - counted, Ordering::Relaxed);
        tp.chunks_read.fetch_add(1, Ordering::Relaxed);
        shared.out.progress.commit(seq, shared.at);
        let _ = done.send(ChunkRead { chunk, seq });
    }
    // The transaction only read; ending it lets go of the imported snapshot.
    cdc::snapshot::finish(&client)
        .await
        .context("ending a snapshot transaction")?;
    Ok(())
}
