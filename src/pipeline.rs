//! `walbridge run`: wires the stages together and nothing more.
//!
//! ```text
//!  reader thread (current-thread runtime)          main runtime
//!  ┌──────────────────────────┐  Batch (bounded)  ┌───────────────────────────────┐
//!  │ WAL → frame → pgoutput   │ ────────────────▶ │ relations → Avro schemas      │
//!  │ status updates (flush ◀──┼── watch<Lsn> ◀──┐ │ encode → KafkaSink.send(seq)  │
//!  └──────────────────────────┘                 │ └───────────────────────────────┘
//!                                    Progress ◀─┴── delivery callbacks (librdkafka thread)
//! ```
//!
//! Event ids: every message carries `walbridge.event_id` = `<commit LSN>:<index in transaction>`.
//! Postgres re-sends a transaction with the same commit LSN and the same change order after a
//! restart, so a re-delivered change has the same id (invariant 2).
//!
//! Keys: the primary key (from the catalog, so REPLICA IDENTITY FULL tables still get a proper
//! key); a table without one gets the replica identity columns, or no key at all. One key always
//! lands on one partition, in commit order (invariant 3). An UPDATE that changes the key is sent
//! as a delete of the old key followed by a create of the new one, as Debezium does, so each key's
//! history stays complete on its own partition.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use avro::{Change, Op, RegistryClient, Source, TableSchema, TypeNames};
use cdc::Lsn;
use cdc::conn::ReplicationConnection;
use cdc::pgoutput::{Message, OldTuple, Relation, ReplicaIdentity, Tuple, Value, pg_ts_to_unix_ms};
use cdc::progress::{Progress, Seq};
use cdc::slot;
use cdc::source::{Batch, Phase, ReaderOptions, SourceItem};
use sinks::kafka::{KafkaSettings, KafkaSink, Record};
use tokio::sync::{mpsc, watch};

use crate::config::{Config, SnapshotMode};
use crate::metrics::{Metrics, SnapshotProgress, TableCounters};

/// Prefix of the heartbeat messages walbridge writes with `pg_logical_emit_message`.
pub const HEARTBEAT_PREFIX: &str = "walbridge.heartbeat";
const MAX_BATCH_BYTES: usize = 1 << 20;

/// A table as the pipeline knows it after its Relation message.
struct TableState {
    rel: Relation,
    topic: String,
    schema: TableSchema,
    key_id: Option<u32>,
    value_id: u32,
    counters: TableCounters,
}

struct OpenTx {
    seq: Seq,
    commit_lsn: Lsn,
    xid: u32,
    commit_ms: i64,
    index: u32,
    /// Header texts that are the same for every change of the transaction.
    lsn_text: String,
    xid_text: String,
    /// Set while the initial snapshot runs: the table being copied (`schema.table`), which
    /// goes into the event id since snapshot rows have no commit of their own.
    snapshot_of: Option<String>,
}

pub struct Pipeline {
    cfg: Config,
    db: String,
    meta: tokio_postgres::Client,
    registry: RegistryClient,
    sink: KafkaSink,
    progress: Progress,
    types: TypeNames,
    tables: HashMap<u32, TableState>,
    /// Topics known to exist: created at start for the tables published then, and on the first
    /// Relation message of a table that joined the publication later (see `relation`).
    topics: HashSet<String>,
    tx: Option<OpenTx>,
    key_buf: Vec<u8>,
    val_buf: Vec<u8>,
    key_frame: Vec<u8>,
    val_frame: Vec<u8>,
    event_id: String,
    /// Processing time for the envelope's `ts_ms`, read once per batch (or per 4096 snapshot
    /// rows) rather than once per change: a clock read per change was 4 % of the profile.
    now_ms: i64,
    metrics: Arc<Metrics>,
    snapshot_progress: SnapshotProgress,
}

/// Runs the pipeline until `shutdown` resolves, then drains: everything read is delivered and
/// confirmed before returning.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_observed(cfg, shutdown, None).await
}

/// First wait after a transient failure; doubles up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// An attempt that ran this long was healthy: the next failure starts the backoff afresh.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// [`run`], also handing out a receiver of the confirmed LSN (benchmarks time commit → ack with
/// it; tests wait on it instead of sleeping).
///
/// Resilience: the pipeline runs in attempts. An attempt that fails with a transient error (the
/// source restarted, a connection dropped, the registry did not answer) is torn down and a new one
/// starts after a backoff, exactly as if the process had been restarted: new connections, and
/// progress from the slot's confirmed LSN. Nothing more is needed for correctness, because what
/// the failed attempt had not confirmed is streamed again (at-least-once; re-sent changes keep
/// their event ids). A definite error (bad config for this source, a sink rejecting a record)
/// stops the process instead, since retrying cannot fix it.
pub async fn run_observed(
    cfg: Config,
    shutdown: impl Future<Output = ()>,
    observer: Option<tokio::sync::oneshot::Sender<watch::Receiver<Lsn>>>,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopper = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        std::future::pending::<()>().await
    };
    tokio::pin!(stopper);

    // The embedded registry outlives attempts: a reconnect to the source must not take it down.
    let _embedded = match &cfg.registry.embedded {
        Some(e) => {
            let server = avro::RegistryServer::open(&e.data_dir).with_context(|| {
                format!("opening the registry store in {}", e.data_dir.display())
            })?;
            let listener = tokio::net::TcpListener::bind(e.listen)
                .await
                .with_context(|| format!("binding the embedded registry to {}", e.listen))?;
            Some(server.spawn(listener)?)
        }
        None => None,
    };
    let (confirmed_tx, confirmed_rx) = watch::channel(Lsn::ZERO);
    if let Some(o) = observer {
        let _ = o.send(confirmed_rx);
    }
    // Metrics outlive attempts too, so counts continue across restarts.
    let metrics = Metrics::new(&cfg.source);
    let _confirmed_gauge = metrics.follow_confirmed(confirmed_tx.subscribe());
    let _metrics_server = match &cfg.metrics {
        Some(m) => Some((
            crate::metrics::serve(metrics.clone(), m.listen).await?,
            crate::metrics::spawn_slot_poller(metrics.clone(), &cfg),
        )),
        None => None,
    };

    let mut backoff = MIN_BACKOFF;
    let mut attempt = 0u32;
    loop {
        let started = std::time::Instant::now();
        metrics.attempt_started();
        let result = tokio::select! {
            r = run_attempt(&cfg, stop_rx.clone(), &confirmed_tx, &metrics) => r,
            _ = &mut stopper => unreachable!("the stopper never completes"),
        };
        let err = match result {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if *stop_rx.borrow() || !is_transient(&err, attempt > 0) {
            metrics.fatal(&err);
            return Err(err);
        }
        metrics.transient_failure(&err);
        if started.elapsed() >= HEALTHY_RUN {
            backoff = MIN_BACKOFF;
        }
        let wait = jittered(backoff);
        tracing::warn!(error = %format!("{err:#}"), retry_in_ms = wait.as_millis() as u64, attempt, "transient failure; restarting the pipeline");
        let mut stop = stop_rx.clone();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
            _ = &mut stopper => unreachable!("the stopper never completes"),
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        attempt += 1;
    }
}

/// Full jitter in [d/2, d], so that many walbridge instances do not retry in lockstep.
fn jittered(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let frac = 0.5 + f64::from(nanos % 1000) / 2000.0;
    d.mul_f64(frac)
}

/// Whether retrying can help. Connection-level failures and a server that is shutting down or
/// starting up are transient; so is a slot still held by our own previous connection (`retrying`)
/// while the server notices that connection is gone. Everything else is definite.
fn is_transient(err: &anyhow::Error, retrying: bool) -> bool {
    fn transient_sqlstate(code: &str) -> bool {
        // 08: connection exception; 57P01-03: admin/crash shutdown, cannot connect now;
        // 53: insufficient resources; 55006: object in use (a slot still held by a dying walsender).
        code.starts_with("08")
            || code.starts_with("57P")
            || code.starts_with("53")
            || code == "55006"
    }
    fn conn_transient(e: &cdc::conn::ConnError) -> bool {
        use cdc::conn::ConnError;
        match e {
            ConnError::Server { code, .. } => transient_sqlstate(code),
            ConnError::Auth(_) | ConnError::Protocol(_) => false,
            ConnError::Connect { .. } | ConnError::Io(_) | ConnError::Closed => true,
        }
    }
    err.chain().any(|cause| {
        if cause.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        // SourceError::Conn is transparent: its source() skips the ConnError, so look inside.
        if let Some(e) = cause.downcast_ref::<cdc::source::SourceError>() {
            return match e {
                cdc::source::SourceError::Conn(c) => conn_transient(c),
                cdc::source::SourceError::Decode { .. } => false,
            };
        }
        if let Some(e) = cause.downcast_ref::<cdc::conn::ConnError>() {
            return conn_transient(e);
        }
        if let Some(e) = cause.downcast_ref::<tokio_postgres::Error>() {
            return e.is_closed() || e.code().is_some_and(|c| transient_sqlstate(c.code()));
        }
        if let Some(slot::SlotError::InUse { .. }) = cause.downcast_ref::<slot::SlotError>() {
            return retrying;
        }
        if let Some(e) = cause.downcast_ref::<avro::RegistryError>() {
            return e.is_transient();
        }
        false
    })
}

/// One attempt: connect, check the source, stream until stopped or failed, drain.
async fn run_attempt(
    cfg: &Config,
    mut stop: watch::Receiver<bool>,
    confirmed_out: &watch::Sender<Lsn>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<()> {
    let pg = cfg.source.pg_config();
    let (meta, conn) = pg
        .connect(tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to the source {}", cfg.source.dsn.redacted()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "metadata connection ended");
        }
    });
    let tables =
        slot::ensure_publication(&meta, &cfg.source.publication, &cfg.source.tables).await?;
    let existing = slot::check_slot(&meta, &cfg.source.slot).await?;
    let mut repl_conn = ReplicationConnection::connect(&pg).await.with_context(|| {
        format!(
            "opening the replication connection to {}",
            cfg.source.dsn.redacted()
        )
    })?;
    // A new slot exports its snapshot, which lives only while `repl_conn` stays idle: import it
    // at once; the copy itself runs later in that transaction (see cdc::snapshot).
    let slot_existed = existing.is_some();
    // Check walbridge's own position record against this server before creating anything.
    let slot_confirmed = existing.as_ref().map_or(Lsn::ZERO, |s| s.confirmed_flush);
    let mut resume = crate::resume::resume_point(&meta, &cfg.source, slot_confirmed).await?;
    if slot_existed && cfg.source.snapshot == SnapshotMode::Initial && resume.stored.is_none() {
        // The slot exists but walbridge has no record of ever confirming anything from it: its
        // initial snapshot may not have finished (a crash mid-snapshot leaves the slot behind).
        // Streaming from it would silently skip the rows the snapshot did not deliver.
        bail!(
            "slot {:?} exists but {} does not: walbridge cannot tell whether the slot's initial snapshot finished. \
             To take a new snapshot, drop the slot (SELECT pg_drop_replication_slot('{}')); to stream without one, set source.snapshot: never",
            cfg.source.slot,
            resume.file.path().display(),
            cfg.source.slot
        );
    }
    let (start, snapshot) = match existing {
        Some(s) => (s.confirmed_flush, None),
        None => {
            let created = slot::create_slot_with_snapshot(&mut repl_conn, &cfg.source.slot).await?;
            let snap = match cfg.source.snapshot {
                SnapshotMode::Initial => match open_snapshot(cfg, &created.snapshot_name).await {
                    Ok(client) => Some(client),
                    Err(e) => {
                        abandon_slot(&mut repl_conn, &cfg.source.slot).await;
                        return Err(e);
                    }
                },
                SnapshotMode::Never => None,
            };
            (created.consistent_point, snap)
        }
    };
    // A new slot starts at its consistent point; an existing one where the later record is.
    let start = if slot_existed { resume.start } else { start };
    if let (false, None, Some(stored)) = (slot_existed, &snapshot, resume.stored) {
        // walbridge streamed from a slot of this name before, and it is gone: what was committed
        // between the record and the new slot is not in the stream, and no snapshot covers it.
        tracing::warn!(
            slot = %cfg.source.slot,
            recorded = %stored,
            new_start = %start,
            "the slot was created anew without a snapshot: changes committed between the recorded position and the new slot are not streamed; set source.snapshot: initial and recreate the slot to copy the tables"
        );
    }
    resume.start = start;
    tracing::info!(slot = %cfg.source.slot, start = %start, snapshot = snapshot.is_some(), tables = tables.len(), "source ready");

    let registry = RegistryClient::new(cfg.registry.url.as_str())?;

    let (progress, flushed_rx) = Progress::new(start);
    let progress = metrics.track(progress);
    let position_writer = crate::resume::spawn_position_writer(
        &resume,
        flushed_rx.clone(),
        cfg.source.status_interval,
    );
    // Observers see one confirmed LSN across attempts, never moving backwards.
    let forward = {
        let mut rx = flushed_rx.clone();
        let out = confirmed_out.clone();
        tokio::spawn(async move {
            loop {
                let v = *rx.borrow_and_update();
                out.send_if_modified(|cur| {
                    let newer = v > *cur;
                    if newer {
                        *cur = v;
                    }
                    newer
                });
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    };
    let sink = KafkaSink::with_stats(
        KafkaSettings {
            brokers: cfg.kafka.bootstrap_servers(),
            partitions: cfg.kafka.partitions,
            replication_factor: i32::from(cfg.kafka.replication_factor),
            max_queue_bytes: cfg.kafka.max_in_flight_bytes as usize,
            extra: cfg
                .kafka
                .producer
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        },
        progress.clone(),
        metrics.sink_stats.clone(),
    )?;
    let topics: Vec<String> = tables
        .iter()
        .map(|t| {
            let (s, n) = t.split_once('.').unwrap_or(("public", t));
            cfg.kafka.topic_for(s, n)
        })
        .collect();
    sink.ensure_topics(&topics).await?;

    // The reader runs on its own thread with a current-thread runtime (see cdc::source).
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(8);
    let (phase_tx, phase_rx) = watch::channel(Phase::Run);
    let reader_opts = ReaderOptions {
        slot: cfg.source.slot.clone(),
        publication: cfg.source.publication.clone(),
        start,
        status_interval: cfg.source.status_interval,
        max_batch_bytes: MAX_BATCH_BYTES,
    };
    let db = pg.get_dbname().unwrap_or("postgres").to_owned();
    let mut p = Pipeline {
        cfg: cfg.clone(),
        db,
        meta,
        registry,
        sink,
        progress,
        types: TypeNames::new(),
        tables: HashMap::new(),
        topics: topics.into_iter().collect(),
        tx: None,
        key_buf: Vec::with_capacity(256),
        val_buf: Vec::with_capacity(4096),
        key_frame: Vec::with_capacity(256),
        val_frame: Vec::with_capacity(4096),
        event_id: String::with_capacity(32),
        now_ms: now_ms(),
        metrics: metrics.clone(),
        snapshot_progress: metrics.snapshot_progress(),
    };
    if let Some(client) = snapshot {
        metrics.not_ready("initial snapshot in progress");
        metrics.estimate_snapshot(&p.meta, &tables).await;
        let copied = p.snapshot(&client, &tables, start, &stop).await;
        if copied.is_ok() {
            // The snapshot's transaction only read; ending it releases the exported snapshot.
            let _ = client.batch_execute("COMMIT").await;
        }
        drop(client);
        if let Err(e) = copied {
            // Leave no slot behind: it would make the next start stream from the consistent
            // point without the rows this snapshot did not deliver. The next start takes a new
            // snapshot (rows already in Kafka arrive again, under the new snapshot's event ids).
            abandon_slot(&mut repl_conn, &cfg.source.slot).await;
            forward.abort();
            position_writer.abort();
            if *stop.borrow() {
                tracing::info!("stopped during the initial snapshot; it starts over next time");
                return Ok(());
            }
            return Err(e);
        }
    }
    let reader = std::thread::Builder::new()
        .name("cdc-reader".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(cdc::source::run_reader(
                repl_conn,
                reader_opts,
                batch_tx,
                flushed_rx,
                phase_rx,
            ))
            .map_err(anyhow::Error::from)
        })?;

    let heartbeat = spawn_heartbeat(cfg);
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    metrics.streaming();
    let outcome = p.process(batch_rx, stopped, &phase_tx).await;
    metrics.not_ready("stopping");
    heartbeat.abort();

    // Drain: deliver what was handed to Kafka, let the confirmed LSN catch up, tell the server.
    let _ = phase_tx.send(Phase::Drain);
    let drained = tokio::task::block_in_place(|| p.sink.flush(Duration::from_secs(60)));
    let _ = phase_tx.send(Phase::Done);
    let reader_result = tokio::task::spawn_blocking(move || reader.join())
        .await?
        .map_err(|_| anyhow!("the replication reader thread panicked"))?;
    tracing::info!(confirmed = %p.progress.confirmed(), "pipeline stopped");
    forward.abort();
    position_writer.abort();
    resume.store_final(p.progress.confirmed());
    outcome?;
    drained?;
    if let Some(f) = p.progress.failure() {
        bail!("a sink failed: {f}");
    }
    reader_result
}

/// A connection whose open transaction reads the slot's exported snapshot.
async fn open_snapshot(
    cfg: &Config,
    snapshot_name: &str,
) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = cfg
        .source
        .pg_config()
        .connect(tokio_postgres::NoTls)
        .await
        .with_context(|| {
            format!(
                "opening the snapshot connection to {}",
                cfg.source.dsn.redacted()
            )
        })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "snapshot connection ended");
        }
    });
    cdc::snapshot::import(&client, snapshot_name).await?;
    Ok(client)
}

/// Drops a slot whose initial snapshot did not complete, so the next start takes a new one.
async fn abandon_slot(conn: &mut ReplicationConnection, slot: &str) {
    if let Err(e) = slot::drop_slot(conn, slot).await {
        tracing::error!(slot, error = %e, fix = %format!("SELECT pg_drop_replication_slot('{slot}')"), "could not drop the slot of an unfinished snapshot; drop it by hand, or the next start streams without the snapshot's rows");
    }
}

fn spawn_heartbeat(cfg: &Config) -> tokio::task::JoinHandle<()> {
    let pg = cfg.source.pg_config();
    let every = cfg.source.heartbeat_interval;
    tokio::spawn(async move {
        // A non-transactional logical message moves the WAL and reaches the slot even when only
        // unpublished tables change, so the slot can be advanced (invariant 6).
        let Ok((client, conn)) = pg.connect(tokio_postgres::NoTls).await else {
            tracing::warn!("heartbeat connection failed; the slot advances on keepalives only");
            return;
        };
        tokio::spawn(conn);
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if let Err(e) = client
                .execute(
                    "SELECT pg_logical_emit_message(false, $1, '')",
                    &[&HEARTBEAT_PREFIX],
                )
                .await
            {
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
    })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Pipeline {
    async fn process(
        &mut self,
        mut rx: mpsc::Receiver<Batch>,
        shutdown: impl Future<Output = ()>,
        phase: &watch::Sender<Phase>,
    ) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let mut stopping = false;
        loop {
            let batch = tokio::select! {
                b = rx.recv() => b,
                _ = &mut shutdown, if !stopping => {
                    tracing::info!("shutdown requested; draining");
                    stopping = true;
                    let _ = phase.send(Phase::Drain);
                    continue;
                }
            };
            let Some(batch) = batch else { return Ok(()) };
            self.now_ms = now_ms();
            if let Some(last) = batch.items.last() {
                self.metrics.received(match last {
                    SourceItem::Data {
                        msg: Message::Commit(c),
                        ..
                    } => c.end_lsn,
                    SourceItem::Data { lsn, .. } | SourceItem::Idle(lsn) => *lsn,
                });
            }
            for item in batch.items {
                self.item(item).await?;
            }
            if let Some(f) = self.progress.failure() {
                bail!("a sink failed: {f}");
            }
        }
    }

    async fn item(&mut self, item: SourceItem) -> anyhow::Result<()> {
        let msg = match item {
            SourceItem::Idle(lsn) => {
                tracing::debug!(lsn = %lsn, "idle position");
                self.progress.mark(lsn);
                return Ok(());
            }
            SourceItem::Data { msg, .. } => msg,
        };
        match msg {
            Message::Begin(b) => {
                let commit_ms = pg_ts_to_unix_ms(b.commit_ts);
                let seq = self.progress.begin_at(commit_ms);
                self.tx = Some(OpenTx {
                    seq,
                    commit_lsn: b.final_lsn,
                    xid: b.xid,
                    commit_ms,
                    index: 0,
                    lsn_text: b.final_lsn.to_string(),
                    xid_text: b.xid.to_string(),
                    snapshot_of: None,
                });
            }
            Message::Commit(c) => {
                let tx = self
                    .tx
                    .take()
                    .ok_or_else(|| anyhow!("commit without begin at {}", c.commit_lsn))?;
                tracing::debug!(commit = %c.commit_lsn, end = %c.end_lsn, changes = tx.index, "commit");
                self.progress.commit(tx.seq, c.end_lsn);
            }
            Message::Relation(rel) => self.relation(rel).await?,
            Message::Type(t) => self.types.insert(&t),
            Message::Insert(i) => {
                self.change(i.relation_id, Op::Create, None, Some(&i.new))
                    .await?
            }
            Message::Update(u) => {
                let old = u.old.as_ref().map(OldTuple::tuple);
                self.update(u.relation_id, old, &u.new).await?
            }
            Message::Delete(d) => {
                self.change(d.relation_id, Op::Delete, Some(d.old.tuple()), None)
                    .await?
            }
            Message::Truncate(t) => {
                for rel in t.relation_ids {
                    self.change(rel, Op::Truncate, None, None).await?;
                }
            }
            Message::Message(m) => {
                if !m.transactional && m.prefix == HEARTBEAT_PREFIX {
                    tracing::debug!(lsn = %m.lsn, "heartbeat position");
                    self.progress.mark(m.lsn);
                }
            }
            Message::Origin { .. } => {}
            Message::StreamStart { .. }
            | Message::StreamStop
            | Message::StreamCommit { .. }
            | Message::StreamAbort { .. } => {
                bail!("streamed transaction messages arrived but protocol version 1 was requested")
            }
        }
        Ok(())
    }

    /// The initial snapshot: every row of `tables` as of the consistent point `at`, as `r`
    /// events, read through `client`'s snapshot transaction (see cdc::snapshot).
    ///
    /// All rows share one progress entry that ends at `at`, so no streamed transaction (they
    /// all commit after `at`) is confirmed before every snapshot row is acked. Rows are sent
    /// one by one as COPY yields them; the sink's queue bound is the backpressure.
    async fn snapshot(
        &mut self,
        client: &tokio_postgres::Client,
        tables: &[String],
        at: Lsn,
        stop: &watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let seq = self.progress.begin();
        self.tx = Some(OpenTx {
            seq,
            commit_lsn: at,
            xid: 0,
            commit_ms: now_ms(),
            index: 0,
            lsn_text: at.to_string(),
            xid_text: "0".to_owned(),
            snapshot_of: None,
        });
        let mut total = 0u64;
        for table in tables {
            let (schema, name) = table.split_once('.').unwrap_or(("public", table));
            let (rel, types) = cdc::snapshot::catalog_relation(client, schema, name).await?;
            for t in &types {
                self.types.insert(t);
            }
            let rel_id = rel.id;
            self.relation(rel).await?;
            let rel = &self
                .tables
                .get(&rel_id)
                .ok_or_else(|| anyhow!("{table} was not mapped"))?
                .rel;
            let mut rows = cdc::snapshot::copy_table(client, rel).await?;
            if let Some(tx) = self.tx.as_mut() {
                tx.index = 0;
                tx.snapshot_of = Some(table.clone());
            }
            while let Some(row) = rows.next().await? {
                if rows.rows() % 4096 == 0 {
                    self.now_ms = now_ms();
                }
                self.change(rel_id, Op::Read, None, Some(&row)).await?;
                self.snapshot_progress.set(table, rows.rows());
                if *stop.borrow() {
                    bail!("stopped during the initial snapshot of {table}");
                }
                if let Some(f) = self.progress.failure() {
                    bail!("a sink failed during the snapshot of {table}: {f}");
                }
            }
            tracing::info!(table = %table, rows = rows.rows(), "table snapshot read");
            total += rows.rows();
        }
        cdc::snapshot::finish(client).await?;
        self.tx = None;
        self.progress.commit(seq, at);
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(rows = total, tables = tables.len(), secs = format!("{secs:.2}"), rows_per_sec = (total as f64 / secs.max(1e-6)) as u64, consistent_point = %at, "initial snapshot read; streaming from its consistent point");
        Ok(())
    }

    /// A Relation message: (re)build the table's schemas and register them.
    ///
    /// pgoutput sends one before a table's first change in the session and again before the
    /// first change after any DDL on it (ADD/DROP/RENAME COLUMN, a type change), always ahead of
    /// the rows written under the new shape. So rebuilding here, in stream order, encodes every
    /// row with the schema of its own time, and the registry gets a new subject version. Value
    /// fields are nullable with default null, so adding or dropping a column stays backward
    /// compatible; a rename is a drop plus an add; widening (int → bigint) is an Avro promotion.
    async fn relation(&mut self, rel: Relation) -> anyhow::Result<()> {
        if self
            .tables
            .get(&rel.id)
            .is_some_and(|known| known.rel == rel)
        {
            return Ok(());
        }
        let topic = self.cfg.kafka.topic_for(&rel.namespace, &rel.name);
        if !self.topics.contains(&topic) {
            // A table created (or added to the publication) while streaming: the broker may not
            // auto-create topics (tansu does not), and librdkafka fails a produce to a missing
            // topic after 30 s, which stops the pipeline. Rare, so one admin round-trip is fine.
            self.sink
                .ensure_topics(std::slice::from_ref(&topic))
                .await?;
            tracing::info!(table = %format!("{}.{}", rel.namespace, rel.name), topic = %topic, "new table joined the stream");
            self.topics.insert(topic.clone());
        }
        let pk = primary_key(&self.meta, &rel).await?;
        let schema = if !pk.is_empty() {
            let cols: Vec<&str> = pk.iter().map(String::as_str).collect();
            TableSchema::with_key(&topic, &rel, &self.types, &cols)?
        } else if rel.replica_identity == ReplicaIdentity::Full {
            // No primary key and every column is "identity": no usable key.
            TableSchema::with_key(&topic, &rel, &self.types, &[])?
        } else {
            TableSchema::new(&topic, &rel, &self.types)?
        };
        let key_id = if schema.has_key() {
            Some(
                self.registry
                    .register(&format!("{topic}-key"), schema.key_schema_json())
                    .await?,
            )
        } else {
            None
        };
        let value_id = self
            .registry
            .register(&format!("{topic}-value"), schema.value_schema_json())
            .await?;
        let table = format!("{}.{}", rel.namespace, rel.name);
        tracing::info!(table = %table, topic = %topic, value_schema_id = value_id, "table mapped");
        self.tables.insert(
            rel.id,
            TableState {
                counters: self.metrics.table(&table),
                rel,
                topic,
                schema,
                key_id,
                value_id,
            },
        );
        Ok(())
    }

    async fn update(
        &mut self,
        rel_id: u32,
        old: Option<&Tuple>,
        new: &Tuple,
    ) -> anyhow::Result<()> {
        let key_changed = match (old, self.tables.get(&rel_id)) {
            (Some(old), Some(t)) => {
                t.schema.has_key() && {
                    let mut a = Vec::new();
                    let mut b = Vec::new();
                    t.schema.encode_key(old, &mut a)?;
                    t.schema.encode_key(new, &mut b)?;
                    a != b
                }
            }
            _ => false,
        };
        if key_changed {
            self.change(rel_id, Op::Delete, old, None).await?;
            // The create has no `before` to take unchanged TOAST values from, so take them from
            // the old row here (REPLICA IDENTITY FULL sends it whole). Key changes are rare;
            // the copy is of `Bytes` handles only.
            let filled: Option<Tuple> =
                old.filter(|_| new.contains(&Value::UnchangedToast))
                    .map(|old| {
                        new.iter()
                            .zip(old)
                            .map(|(n, o)| match (n, o) {
                                (Value::UnchangedToast, Value::Text(_) | Value::Binary(_)) => {
                                    o.clone()
                                }
                                _ => n.clone(),
                            })
                            .collect()
                    });
            self.change(
                rel_id,
                Op::Create,
                None,
                Some(filled.as_ref().unwrap_or(new)),
            )
            .await
        } else {
            self.change(rel_id, Op::Update, old, Some(new)).await
        }
    }

    async fn change(
        &mut self,
        rel_id: u32,
        op: Op,
        before: Option<&Tuple>,
        after: Option<&Tuple>,
    ) -> anyhow::Result<()> {
        let tx = self
            .tx
            .as_mut()
            .ok_or_else(|| anyhow!("row change outside a transaction"))?;
        let t = self
            .tables
            .get(&rel_id)
            .ok_or_else(|| anyhow!("change for relation {rel_id} before its Relation message"))?;
        let index = tx.index;
        tx.index += 1;
        let (seq, commit_lsn, xid, commit_ms) = (tx.seq, tx.commit_lsn, tx.xid, tx.commit_ms);
        self.event_id.clear();
        {
            use std::fmt::Write;
            let _ = match &tx.snapshot_of {
                Some(table) => write!(self.event_id, "snapshot:{}:{table}:{index}", tx.lsn_text),
                None => write!(self.event_id, "{}:{index}", tx.lsn_text),
            };
        }
        let snapshot = tx.snapshot_of.is_some();

        let change = Change {
            op,
            before,
            after,
            source: Source {
                name: &self.cfg.kafka.topic_prefix,
                db: &self.db,
                schema: &t.rel.namespace,
                table: &t.rel.name,
                ts_ms: commit_ms,
                tx_id: xid,
                lsn: commit_lsn.0,
                snapshot,
            },
            ts_ms: self.now_ms,
        };
        self.val_buf.clear();
        t.schema.encode_value(&change, &mut self.val_buf)?;
        self.val_frame.clear();
        avro::frame(t.value_id, &self.val_buf, &mut self.val_frame);
        let key_row = after.or(before);
        let has_key = match (t.key_id, key_row) {
            (Some(kid), Some(row)) => {
                self.key_buf.clear();
                t.schema.encode_key(row, &mut self.key_buf)?;
                self.key_frame.clear();
                avro::frame(kid, &self.key_buf, &mut self.key_frame);
                true
            }
            _ => false,
        };
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| anyhow!("row change outside a transaction"))?;
        let headers: [(&str, &[u8]); 4] = [
            ("walbridge.event_id", self.event_id.as_bytes()),
            ("walbridge.lsn", tx.lsn_text.as_bytes()),
            ("walbridge.txid", tx.xid_text.as_bytes()),
            ("walbridge.op", op.code().as_bytes()),
        ];
        let key = has_key.then_some(self.key_frame.as_slice());
        // Expect before send: the ack may arrive before `send` even returns.
        let tombstone = op == Op::Delete && has_key;
        self.progress.expect(seq, if tombstone { 2 } else { 1 });
        let topic = t.topic.as_str();
        self.sink
            .send(&Record {
                topic,
                key,
                payload: Some(&self.val_frame),
                headers: &headers,
                seq,
            })
            .await?;
        if tombstone {
            // Debezium's tombstone: lets a compacted topic forget the deleted key.
            self.sink
                .send(&Record {
                    topic,
                    key,
                    payload: None,
                    headers: &headers,
                    seq,
                })
                .await?;
        }
        let key_len = key.map_or(0, <[u8]>::len);
        let bytes = key_len * (1 + usize::from(tombstone)) + self.val_frame.len();
        t.counters.produced(op, bytes);
        Ok(())
    }
}

/// The table's primary key columns, in key order.
async fn primary_key(meta: &tokio_postgres::Client, rel: &Relation) -> anyhow::Result<Vec<String>> {
    let rows = meta
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1::oid AND i.indisprimary \
             ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&rel.id],
        )
        .await
        .with_context(|| format!("reading the primary key of {}.{}", rel.namespace, rel.name))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
