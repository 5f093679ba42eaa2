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
use avro::{Op, RegistryClient, TableSchema, TypeNames};
use cdc::Lsn;
use cdc::conn::ReplicationConnection;
use cdc::pgoutput::{Message, OldTuple, Relation, ReplicaIdentity, Tuple, Value, pg_ts_to_unix_ms};
use cdc::progress::{Progress, Seq};
use cdc::slot;
use cdc::source::{Batch, Phase, ReaderOptions, SourceItem};
use sinks::kafka::{KafkaSettings, KafkaSink};
use tokio::sync::{mpsc, watch};

use crate::config::{Config, DeadLetter, SnapshotMode};
use crate::emit::{DeadLetterTarget, Emitter, EventMeta, Out, Sink, TableState};
use crate::events::On;
use crate::metrics::Metrics;
use crate::snapshot::{Pending, PendingFile};

/// Prefix of the heartbeat messages walbridge writes with `pg_logical_emit_message`.
pub const HEARTBEAT_PREFIX: &str = "walbridge.heartbeat";
const MAX_BATCH_BYTES: usize = 1 << 20;

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
    /// What the transaction's span needs; only when traces are exported (see crate::telemetry).
    trace: Option<TxTrace>,
}

/// A transaction's span while it is open: when it began and which tables it touched.
struct TxTrace {
    start_unix_nanos: u64,
    tables: Vec<u32>,
}

pub struct Pipeline {
    pub(crate) cfg: Config,
    pub(crate) meta: tokio_postgres::Client,
    registry: RegistryClient,
    pub(crate) out: Out,
    pub(crate) progress: Progress,
    pub(crate) types: TypeNames,
    pub(crate) tables: HashMap<u32, Arc<TableState>>,
    /// Topics known to exist: created at start for the tables published then, and on the first
    /// Relation message of a table that joined the publication later (see `relation`).
    topics: HashSet<String>,
    tx: Option<OpenTx>,
    emitter: Emitter,
    pub(crate) points: crate::snapshot::Points,
    /// Processing time for the envelope's `ts_ms`, read once per batch (or per 4096 snapshot
    /// rows) rather than once per change: a clock read per change was 4 % of the profile.
    pub(crate) now_ms: i64,
    pub(crate) metrics: Arc<Metrics>,
    /// Business events (`events:`); `None` leaves the row path exactly as without them.
    events: Option<crate::events::Engine>,
    /// One span per source transaction when `telemetry` is configured.
    tracer: Option<crate::telemetry::Tracer>,
}

/// Runs the pipeline until `shutdown` resolves, then drains: everything read is delivered and
/// confirmed before returning.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_observed(cfg, shutdown, Observe::default()).await
}

/// What an in-process caller (benchmark, demo) wants from [`run_observed`].
#[derive(Default)]
pub struct Observe {
    /// Receives a watch of the confirmed LSN once the pipeline starts.
    pub confirmed: Option<tokio::sync::oneshot::Sender<watch::Receiver<Lsn>>>,
    /// Encode everything but send nothing, acking at once (benchmarks of walbridge's own cost).
    pub discard: bool,
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
    observe: Observe,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopper = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
        std::future::pending::<()>().await
    };
    tokio::pin!(stopper);

    // A state_dir that cannot be a directory is a config mistake: say so before connecting
    // anywhere (later, a failing write there is retried as transient).
    std::fs::create_dir_all(&cfg.source.state_dir).with_context(|| {
        format!(
            "source.state_dir {}: cannot create the directory; point source.state_dir at a directory walbridge may write",
            cfg.source.state_dir.display()
        )
    })?;
    // The embedded registry outlives attempts: a reconnect to the source must not take it down.
    let _embedded = match &cfg.registry.embedded {
        Some(e) => {
            let server = avro::RegistryServer::open(&e.data_dir).with_context(|| {
                format!("opening the registry store in {}", e.data_dir.display())
            })?;
            let server = match &e.write_auth {
                Some(c) => server.with_write_auth(&c.user, &c.password),
                None => server,
            };
            let listener = tokio::net::TcpListener::bind(e.listen)
                .await
                .with_context(|| {
                    format!(
                        "binding the embedded registry to {} (registry.embedded.listen); stop what uses the port or choose another in registry.embedded.listen and registry.url",
                        e.listen
                    )
                })?;
            Some(server.spawn(listener)?)
        }
        None => None,
    };
    let tracer = cfg.telemetry.as_ref().map(crate::telemetry::Tracer::start);
    let (confirmed_tx, confirmed_rx) = watch::channel(Lsn::ZERO);
    if let Some(o) = observe.confirmed {
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
    let result = async { loop {
        let started = std::time::Instant::now();
        metrics.attempt_started();
        // A stop must end the process within the shutdown timeout also while an attempt is still
        // starting (topic creation against a broker it cannot reach waits up to a minute); a
        // streaming attempt drains within the timeout by itself, so this only fires after it.
        let mut stop_seen = stop_rx.clone();
        let limit = cfg.source.shutdown_timeout;
        let result = tokio::select! {
            r = run_attempt(&cfg, stop_rx.clone(), &confirmed_tx, observe.discard, &metrics, tracer.clone()) => r,
            _ = async {
                let _ = stop_seen.wait_for(|s| *s).await;
                tokio::time::sleep(limit + Duration::from_secs(2)).await;
            } => Err(anyhow::anyhow!(
                "shutdown did not finish within source.shutdown_timeout_ms ({} ms): walbridge was still starting or reconnecting. \
                 Nothing was confirmed to the source past what Kafka acknowledged, so nothing is lost",
                limit.as_millis()
            )),
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
    } }
    .await;
    // The spans of the last transactions are still queued: send them before exiting.
    if let Some(t) = tracer {
        t.shutdown(Duration::from_secs(5)).await;
    }
    result
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
            // A certificate or name that does not match stays wrong: only network trouble
            // during the handshake is retried.
            ConnError::Tls(t) => matches!(t, cdc::tls::TlsError::Io { .. }),
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
                // Disk full or a permission problem in state_dir: retry with backoff while
                // the operator fixes it; the slot keeps the transaction meanwhile.
                cdc::source::SourceError::Spill { .. } => true,
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

/// What to check when the source cannot be reached or refuses the connection.
pub(crate) fn source_hint(e: &tokio_postgres::Error) -> &'static str {
    if std::error::Error::source(e).is_some_and(|s| s.is::<cdc::tls::TlsError>()) {
        return "check sslmode, sslrootcert, sslcert and sslkey in source.dsn";
    }
    // pg_hba.conf lets this client in over TLS only (a hostssl line).
    if e.code().map(|c| c.code()) == Some("28000")
        && e.as_db_error()
            .is_some_and(|d| d.message().contains("no encryption"))
    {
        return "the server accepts this user only over TLS: set sslmode=require, or verify-full with sslrootcert, in source.dsn";
    }
    match e.code().map(|c| c.code()) {
        Some("28P01") => "check the password in source.dsn",
        Some("28000") => {
            "check user= in source.dsn: the role must exist and pg_hba.conf must let it in"
        }
        Some("3D000") => "check dbname= in source.dsn",
        Some(_) => "check source.dsn",
        None => "is Postgres running and reachable at the host and port of source.dsn?",
    }
}

/// One attempt: connect, check the source, stream until stopped or failed, drain.
async fn run_attempt(
    cfg: &Config,
    mut stop: watch::Receiver<bool>,
    confirmed_out: &watch::Sender<Lsn>,
    discard: bool,
    metrics: &Arc<Metrics>,
    tracer: Option<crate::telemetry::Tracer>,
) -> anyhow::Result<()> {
    let pg = cfg.source.pg_config();
    let (meta, conn) = pg.connect(cfg.source.tls()).await.map_err(|e| {
        let hint = source_hint(&e);
        anyhow::Error::new(e).context(format!(
            "connecting to the source {} ({hint})",
            cfg.source.dsn.redacted()
        ))
    })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "metadata connection ended");
        }
    });
    // A slot that can never be ours (another plugin, another database, in use) is refused
    // before anything is created for this pipeline.
    let mut facts = slot::slot_facts(&meta, &cfg.source.slot).await?;
    if let Some(f) = &facts {
        f.ours()?;
    }
    check_partition_by(cfg, &meta).await?;
    let tables =
        slot::ensure_publication(&meta, &cfg.source.publication, &cfg.source.tables).await?;
    let server_version: i32 = meta
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .context("reading the source's server version")?
        .get(0);
    let mode = cfg.source.snapshot;
    let mut repl_conn = ReplicationConnection::connect(&pg, &cfg.source.tls()).await.map_err(|e| {
        // A user that may connect but not replicate is the usual first-day mistake.
        let hint = match e.code() {
            Some("42501") => format!(
                " (the source user needs the REPLICATION attribute: as a superuser, ALTER ROLE {} REPLICATION)",
                pg.get_user().unwrap_or("<user>")
            ),
            _ => String::new(),
        };
        anyhow::Error::new(e).context(format!(
            "opening the replication connection to {}{hint}",
            cfg.source.dsn.redacted()
        ))
    })?;
    // Check walbridge's own position record against this server before creating anything.
    let slot_confirmed = facts
        .as_ref()
        .and_then(|f| f.confirmed_flush.as_deref())
        .and_then(|l| l.parse().ok())
        .unwrap_or(Lsn::ZERO);
    let mut resume = crate::resume::resume_point(&meta, &cfg.source, slot_confirmed).await?;
    // Snapshot work an earlier run did not finish (see crate::snapshot::Points).
    let pending_file = PendingFile::new(&cfg.source.state_dir, &cfg.source.slot);
    let mut pending = pending_file.load(&resume.identity)?;
    if let Some(f) = &facts {
        // The slot exists but walbridge has no record of ever confirming anything from it: its
        // initial snapshot may not have finished (a crash mid-snapshot leaves the slot behind).
        // Streaming from it would silently skip the rows the snapshot did not deliver.
        // With a pending-snapshot record the rest is known and is copied while streaming.
        let unfinished = resume.stored.is_none() && pending.is_none();
        let lost = f.wal_status.as_deref() == Some("lost");
        match mode {
            SnapshotMode::WhenNeeded
                if (unfinished || lost)
                    && !f.active
                    && f.database.as_deref() == Some(f.current_database.as_str()) =>
            {
                tracing::warn!(slot = %cfg.source.slot, lost, unfinished_snapshot = unfinished, "the slot cannot be streamed from without missing rows; dropping it and taking a new snapshot (source.snapshot: when_needed)");
                slot::drop_slot(&mut repl_conn, &cfg.source.slot).await?;
                facts = None;
            }
            SnapshotMode::Initial if unfinished => bail!(
                "slot {:?} exists but {} does not: walbridge cannot tell whether the slot's initial snapshot finished. \
                 To take a new snapshot, drop the slot (SELECT pg_drop_replication_slot('{}')) or set source.snapshot: when_needed; \
                 to stream without one, set source.snapshot: never",
                cfg.source.slot,
                resume.file.path().display(),
                cfg.source.slot
            ),
            SnapshotMode::InitialOnly => bail!(
                "slot {:?} exists; source.snapshot: initial_only copies the tables through a new slot and drops it afterwards. \
                 Choose another source.slot, or drop this one (SELECT pg_drop_replication_slot('{}'))",
                cfg.source.slot,
                cfg.source.slot
            ),
            _ => {}
        }
    }
    let existing = facts.map(|f| f.usable()).transpose()?;
    if existing.is_none() && pending.take().is_some() {
        // The record belongs to a slot that is gone; a new slot starts with a new snapshot.
        pending_file.store(&Pending::default())?;
    }
    if let Some(p) = &pending {
        let left: usize = p
            .tables
            .iter()
            .map(|t| t.ranges.as_ref().map_or(1, Vec::len))
            .sum();
        tracing::info!(tables = p.tables.len(), chunks = left, file = %pending_file.path().display(), "resuming an unfinished snapshot while streaming");
    }
    // A new slot exports its snapshot, which lives only while `repl_conn` stays idle: import it
    // at once; the copy itself runs later in that transaction (see cdc::snapshot).
    let slot_existed = existing.is_some();
    let (start, snapshot) = match existing {
        Some(s) => (s.confirmed_flush, None),
        None => {
            let created = slot::create_slot_with_snapshot(&mut repl_conn, &cfg.source.slot).await?;
            let snap = if mode == SnapshotMode::Never {
                None
            } else {
                match open_snapshot(cfg, &created.snapshot_name).await {
                    Ok(client) => Some((client, created.snapshot_name.clone())),
                    Err(e) => {
                        abandon_slot(&mut repl_conn, &cfg.source.slot).await;
                        return Err(e);
                    }
                }
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
    let sink = if discard {
        Sink::Discard(progress.clone())
    } else {
        Sink::Kafka(KafkaSink::with_stats(
            kafka_settings(cfg),
            progress.clone(),
            metrics.sink_stats.clone(),
        )?)
    };
    let mut topics: Vec<String> = tables
        .iter()
        .map(|t| {
            let (s, n) = t.split_once('.').unwrap_or(("public", t));
            cfg.kafka.topic_for(s, n)
        })
        .collect();
    let dead_letter = (cfg.kafka.dead_letter == DeadLetter::Topic).then(|| DeadLetterTarget {
        topic: cfg.kafka.dead_letter_topic().into(),
        counter: metrics.dead_letters.clone(),
    });
    if let Some(d) = &dead_letter {
        topics.push(d.topic.to_string());
    }
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
        // In-progress transactions are streamed by Postgres 14 and later (see cdc::source).
        streaming: server_version >= 140_000,
        spill_dir: cfg.source.state_dir.join("spill").join(&cfg.source.slot),
    };
    let db = pg.get_dbname().unwrap_or("postgres");
    let mut p = Pipeline {
        cfg: cfg.clone(),
        meta,
        registry,
        out: Out {
            sink: Arc::new(sink),
            progress: progress.clone(),
            name: cfg.kafka.topic_prefix.as_str().into(),
            db: db.into(),
            dead_letter,
        },
        progress,
        types: TypeNames::new(),
        tables: HashMap::new(),
        topics: topics.into_iter().collect(),
        tx: None,
        emitter: Emitter::default(),
        points: crate::snapshot::Points::new(
            cfg,
            pending_file.clone(),
            pending.unwrap_or_else(|| Pending {
                system_identifier: resume.identity.system_identifier.clone(),
                database: resume.identity.database.clone(),
                slot: cfg.source.slot.clone(),
                ..Pending::default()
            }),
            tables.clone(),
            start,
        ),
        now_ms: now_ms(),
        metrics: metrics.clone(),
        events: None,
        tracer,
    };
    if let Some(ev) = &cfg.events {
        // Refuses before anything is copied or streamed when a mapping cannot be served.
        p.events = Some(
            crate::events::Engine::start(
                ev.clone(),
                &p.meta,
                cfg.registry.url.as_str(),
                &p.out,
                db,
            )
            .await?,
        );
    }
    if let Some(first) = snapshot {
        metrics.not_ready("initial snapshot in progress");
        metrics.estimate_snapshot(&p.meta, &tables).await;
        let copied = crate::snapshot::initial(
            &mut p,
            first,
            &tables,
            start,
            &stop,
            &pending_file,
            &resume.identity,
        )
        .await;
        if mode == SnapshotMode::InitialOnly && !matches!(copied, Ok(true)) {
            // Nothing would stream the rest: start over next time.
            abandon_slot(&mut repl_conn, &cfg.source.slot).await;
            pending_file.store(&Pending::default())?;
        }
        if !matches!(copied, Ok(true)) {
            // The slot and the pending record stay: the next start copies the chunks left
            // while streaming from the consistent point.
            forward.abort();
            position_writer.abort();
        }
        match copied {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    if mode == SnapshotMode::InitialOnly {
        // Nothing streams after the copy: wait for every row to be acked, then give the slot
        // back so it holds no WAL for nobody.
        tokio::task::block_in_place(|| p.out.sink.flush(Duration::from_secs(600)))?;
        if let Some(f) = p.progress.failure() {
            bail!("a sink failed during the snapshot: {f}");
        }
        forward.abort();
        position_writer.abort();
        slot::drop_slot(&mut repl_conn, &cfg.source.slot).await?;
        tracing::info!(slot = %cfg.source.slot, "initial_only: snapshot delivered; slot dropped, not streaming");
        return Ok(());
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
    // A stop must finish within source.shutdown_timeout_ms, counted from the signal: also when
    // the pipeline is blocked handing a change to a full producer queue (broker down).
    let limit = cfg.source.shutdown_timeout;
    // Whichever branch below sees the stop first records when it came: `process` may return
    // before the timer branch is polled again, and the drain's budget and the exit message both
    // depend on knowing that this was a requested stop.
    let stop_at_cell = std::sync::OnceLock::new();
    let stop_at = &stop_at_cell;
    let mut stop_seen = stop.clone();
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
        let _ = stop_at.set(std::time::Instant::now());
    };
    metrics.streaming();
    let (outcome, overdue) = tokio::select! {
        r = p.process(batch_rx, stopped, &phase_tx) => (r, false),
        _ = async {
            let _ = stop_seen.wait_for(|s| *s).await;
            let _ = stop_at.set(std::time::Instant::now());
            tokio::time::sleep(limit).await;
        } => (Ok(()), true),
    };
    metrics.not_ready("stopping");
    heartbeat.abort();

    // Drain: deliver what was handed to Kafka, let the confirmed LSN catch up, tell the server.
    let _ = phase_tx.send(Phase::Drain);
    let left = stop_at
        .get()
        .map_or(limit, |t| limit.saturating_sub(t.elapsed()));
    let drained =
        tokio::task::block_in_place(|| p.out.sink.flush(left.max(Duration::from_millis(100))));
    let _ = phase_tx.send(Phase::Done);
    let reader_result = tokio::task::spawn_blocking(move || reader.join())
        .await?
        .map_err(|_| anyhow!("the replication reader thread panicked"))?;
    tracing::info!(confirmed = %p.progress.confirmed(), "pipeline stopped");
    forward.abort();
    position_writer.abort();
    resume.store_final(p.progress.confirmed());
    let flush_timed_out = matches!(drained, Err(sinks::kafka::KafkaSinkError::FlushTimeout(..)));
    if stop_at.get().is_some() && (overdue || flush_timed_out) {
        let n = match &drained {
            Err(sinks::kafka::KafkaSinkError::FlushTimeout(_, n)) => *n,
            _ => 0,
        };
        tracing::error!(
            in_flight = n,
            timeout_ms = limit.as_millis() as u64,
            "shutdown timed out"
        );
        bail!(
            "shutdown did not finish within source.shutdown_timeout_ms ({} ms): {n} message(s) still in flight to Kafka. \
             The slot was not confirmed past them (confirmed {}), so they are sent again on the next start; nothing is lost",
            limit.as_millis(),
            p.progress.confirmed()
        );
    }
    outcome?;
    drained?;
    if let Some(f) = p.progress.failure() {
        bail!("a sink failed: {f}");
    }
    reader_result
}

/// A connection whose open transaction reads the slot's exported snapshot.
pub(crate) async fn open_snapshot(
    cfg: &Config,
    snapshot_name: &str,
) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = cfg
        .source
        .pg_config()
        .connect(cfg.source.tls())
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
    let tls = cfg.source.tls();
    let every = cfg.source.heartbeat_interval;
    tokio::spawn(async move {
        // A non-transactional logical message moves the WAL and reaches the slot even when only
        // unpublished tables change, so the slot can be advanced (invariant 6).
        let Ok((client, conn)) = pg.connect(tls).await else {
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

pub(crate) fn now_ms() -> i64 {
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
            self.points.poll(&self.progress)?;
            if let Some(f) = self.progress.failure() {
                bail!("a sink failed: {f}");
            }
        }
    }

    async fn item(&mut self, item: SourceItem) -> anyhow::Result<()> {
        // Stream positions between transactions, where a snapshot point may be due.
        let pos = match &item {
            SourceItem::Idle(lsn) => Some((*lsn, false)),
            SourceItem::Data {
                msg: Message::Begin(b),
                ..
            } => Some((b.final_lsn, true)),
            SourceItem::Data {
                msg: Message::Message(m),
                ..
            } if !m.transactional => Some((m.lsn, false)),
            SourceItem::Data { .. } => None,
        };
        if let Some((pos, commit)) = pos {
            self.snapshot_point(pos, commit).await?;
        }
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
                    trace: self.tracer.as_ref().map(|_| TxTrace {
                        start_unix_nanos: crate::telemetry::unix_nanos(),
                        tables: Vec::new(),
                    }),
                });
            }
            Message::Commit(c) => {
                let tx = self
                    .tx
                    .take()
                    .ok_or_else(|| anyhow!("commit without begin at {}", c.commit_lsn))?;
                tracing::debug!(commit = %c.commit_lsn, end = %c.end_lsn, changes = tx.index, "commit");
                if let Some(ev) = self.events.as_mut().filter(|e| e.has_pending()) {
                    let meta = EventMeta {
                        seq: tx.seq,
                        commit_lsn: tx.commit_lsn,
                        xid: tx.xid,
                        commit_ms: tx.commit_ms,
                        now_ms: self.now_ms,
                        lsn_text: &tx.lsn_text,
                        xid_text: &tx.xid_text,
                        snapshot: false,
                    };
                    ev.commit(&self.out, &meta).await?;
                }
                self.progress.commit(tx.seq, c.end_lsn);
                if let (Some(tracer), Some(trace)) = (&self.tracer, tx.trace) {
                    tracer.record(self.tx_span(
                        &tx.lsn_text,
                        &tx.xid_text,
                        tx.commit_lsn,
                        tx.xid,
                        tx.index,
                        trace,
                    ));
                }
            }
            Message::Relation(rel) => self.relation(rel).await?,
            Message::Type(t) => self.types.insert(&t),
            Message::Insert(i) if self.events.is_some() => {
                self.mapped(i.relation_id, On::Insert, None, Some(&i.new))
                    .await?
            }
            Message::Update(u) if self.events.is_some() => {
                let old = u.old.as_ref().map(OldTuple::tuple);
                self.mapped(u.relation_id, On::Update, old, Some(&u.new))
                    .await?
            }
            Message::Delete(d) if self.events.is_some() => {
                self.mapped(d.relation_id, On::Delete, Some(d.old.tuple()), None)
                    .await?
            }
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
                if m.transactional && m.prefix == crate::snapshot::SIGNAL_PREFIX {
                    self.points.signal(&m.content)?;
                }
                if !m.transactional && m.prefix == HEARTBEAT_PREFIX {
                    tracing::debug!(lsn = %m.lsn, "heartbeat position");
                    self.progress.mark(m.lsn);
                }
                if let Some(ev) = &mut self.events {
                    match &self.tx {
                        Some(tx) if m.transactional => {
                            ev.message(&m.prefix, &m.content, tx.index)
                                .with_context(|| {
                                    format!("transaction {} (commit LSN {})", tx.xid, tx.lsn_text)
                                })?;
                        }
                        None if !m.transactional && ev.message(&m.prefix, &m.content, 0)? => {
                            // A message outside any transaction: its own progress entry, so
                            // the slot passes it only once its event is acked.
                            let seq = self.progress.begin_at(self.now_ms);
                            let (lsn_text, xid_text) = (m.lsn.to_string(), "0".to_owned());
                            let meta = EventMeta {
                                seq,
                                commit_lsn: m.lsn,
                                xid: 0,
                                commit_ms: self.now_ms,
                                now_ms: self.now_ms,
                                lsn_text: &lsn_text,
                                xid_text: &xid_text,
                                snapshot: false,
                            };
                            ev.commit(&self.out, &meta).await?;
                            self.progress.commit(seq, m.lsn);
                        }
                        _ => {}
                    }
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

    /// A Relation message: (re)build the table's schemas and register them.
    ///
    /// pgoutput sends one before a table's first change in the session and again before the
    /// first change after any DDL on it (ADD/DROP/RENAME COLUMN, a type change), always ahead of
    /// the rows written under the new shape. So rebuilding here, in stream order, encodes every
    /// row with the schema of its own time, and the registry gets a new subject version. Value
    /// fields are nullable with default null, so adding or dropping a column stays backward
    /// compatible; a rename is a drop plus an add; widening (int → bigint) is an Avro promotion.
    pub(crate) async fn relation(&mut self, rel: Relation) -> anyhow::Result<()> {
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
            self.out
                .sink
                .ensure_topics(std::slice::from_ref(&topic))
                .await?;
            tracing::info!(table = %format!("{}.{}", rel.namespace, rel.name), topic = %topic, "new table joined the stream");
            self.topics.insert(topic.clone());
        }
        let qualified = format!("{}.{}", rel.namespace, rel.name);
        self.points.captured(&qualified);
        let state = map_relation(
            &self.cfg,
            &self.meta,
            &self.registry,
            &self.metrics,
            &self.types,
            &self.out.sink,
            rel,
            topic,
        )
        .await?;
        tracing::info!(table = %qualified, topic = %state.topic, value_schema_id = state.value_id, "table mapped");
        if let Some(ev) = &mut self.events {
            ev.relation(&state.rel)?;
        }
        self.tables.insert(state.rel.id, Arc::new(state));
        Ok(())
    }

    /// A row change when business events are configured: the row record (none for the outbox
    /// table, whose rows only become events), then the event stage.
    async fn mapped(
        &mut self,
        rel_id: u32,
        on: On,
        old: Option<&Tuple>,
        new: Option<&Tuple>,
    ) -> anyhow::Result<()> {
        let index = self.tx.as_ref().map_or(0, |t| t.index);
        let outbox = self.events.as_ref().is_some_and(|e| e.is_outbox(rel_id));
        match (on, outbox) {
            (_, true) => {
                if let Some(tx) = &mut self.tx {
                    tx.index += 1;
                }
            }
            (On::Insert, false) => self.change(rel_id, Op::Create, None, new).await?,
            (On::Update, false) => {
                let new = new.ok_or_else(|| anyhow!("update without a new row"))?;
                self.update(rel_id, old, new).await?
            }
            (On::Delete, false) => self.change(rel_id, Op::Delete, old, None).await?,
        }
        // The event's causation id names the row change's event id: `<commit LSN>:<index>`.
        if let Some(ev) = &mut self.events {
            let tx = self.tx.as_ref();
            ev.change(rel_id, on, old, new, index)
                .with_context(|| match tx {
                    Some(tx) => format!("transaction {} (commit LSN {})", tx.xid, tx.lsn_text),
                    None => "a change outside a transaction".into(),
                })?;
        }
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
                    // A key that does not encode is dead-lettered (or stops) as an update.
                    t.schema.encode_key(old, &mut a).is_ok()
                        && t.schema.encode_key(new, &mut b).is_ok()
                        && a != b
                }
            }
            _ => false,
        };
        // `kafka.partition_by` on a FULL table: a routing value that changed moves the row.
        // Only FULL tables send the old row without a key change, so only they get here.
        let moved = !key_changed
            && match (old, self.tables.get(&rel_id).and_then(|t| t.route.as_ref())) {
                (Some(old), Some(r)) => {
                    let mut buf = Vec::new();
                    let from = r.partition(old, &mut buf);
                    let to = r.partition(new, &mut buf);
                    // An unchanged TOASTed routing value has no partition here: it did not move.
                    from.is_some() && to.is_some() && from != to
                }
                _ => false,
            };
        if key_changed || moved {
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

    /// The span of a committed transaction (see crate::telemetry): its ids are those of the
    /// `traceparent` header of its records.
    fn tx_span(
        &self,
        lsn_text: &str,
        xid_text: &str,
        commit_lsn: Lsn,
        xid: u32,
        events: u32,
        trace: TxTrace,
    ) -> crate::telemetry::TxSpan {
        crate::telemetry::TxSpan {
            trace_id: crate::emit::trace_id(commit_lsn, xid),
            span_id: crate::emit::tx_span_id(commit_lsn, xid),
            start_unix_nanos: trace.start_unix_nanos,
            end_unix_nanos: crate::telemetry::unix_nanos(),
            correlation_id: format!("{xid_text}:{lsn_text}"),
            commit_lsn: lsn_text.to_owned(),
            txid: xid,
            tables: trace
                .tables
                .iter()
                .filter_map(|id| self.tables.get(id))
                .map(|t| format!("{}.{}", t.rel.namespace, t.rel.name))
                .collect(),
            event_count: u64::from(events),
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
        if let Some(trace) = &mut tx.trace
            && trace.tables.last() != Some(&rel_id)
            && !trace.tables.contains(&rel_id)
        {
            trace.tables.push(rel_id);
        }
        match &tx.snapshot_of {
            Some(table) => self
                .emitter
                .id(format_args!("snapshot:{}:{table}:{index}", tx.lsn_text)),
            None => self.emitter.id(format_args!("{}:{index}", tx.lsn_text)),
        }
        let meta = EventMeta {
            seq: tx.seq,
            commit_lsn: tx.commit_lsn,
            xid: tx.xid,
            commit_ms: tx.commit_ms,
            now_ms: self.now_ms,
            lsn_text: &tx.lsn_text,
            xid_text: &tx.xid_text,
            snapshot: tx.snapshot_of.is_some(),
        };
        self.emitter
            .emit(&self.out, t, &meta, op, before, after)
            .await
    }
}

/// The settings of walbridge's Kafka sink, from the config.
pub(crate) fn kafka_settings(cfg: &Config) -> KafkaSettings {
    KafkaSettings {
        brokers: cfg.kafka.bootstrap_servers(),
        partitions: cfg.kafka.partitions,
        replication_factor: i32::from(cfg.kafka.replication_factor),
        max_queue_bytes: cfg.kafka.max_in_flight_bytes as usize,
        connections: cfg.kafka.connections,
        extra: cfg
            .kafka
            .producer
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// Maps a table's shape to its Avro schemas and registers them (after the
/// `registry.on_incompatible` check): the key is the primary key; without one, none, also under
/// FULL (every column would be "identity"); otherwise the replica identity's columns.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn map_relation(
    cfg: &Config,
    meta: &tokio_postgres::Client,
    registry: &RegistryClient,
    metrics: &Metrics,
    types: &TypeNames,
    sink: &Sink,
    rel: Relation,
    topic: String,
) -> anyhow::Result<TableState> {
    let pk = primary_key(meta, &rel).await?;
    let route = route_of(cfg, sink, &rel, &pk, &topic).await?;
    let schema = if !pk.is_empty() {
        let cols: Vec<&str> = pk.iter().map(String::as_str).collect();
        TableSchema::with_key(&topic, &rel, types, &cols)?
    } else if rel.replica_identity == ReplicaIdentity::Full {
        TableSchema::with_key(&topic, &rel, types, &[])?
    } else {
        TableSchema::new(&topic, &rel, types)?
    };
    let qualified = format!("{}.{}", rel.namespace, rel.name);
    let mut ids = [None, None];
    let mut refused = None;
    for (i, (subject, json)) in [
        (
            format!("{topic}-key"),
            schema.has_key().then(|| schema.key_schema_json()),
        ),
        (format!("{topic}-value"), Some(schema.value_schema_json())),
    ]
    .into_iter()
    .enumerate()
    {
        let Some(json) = json else { continue };
        match crate::contract::admit(
            cfg.registry.url.as_str(),
            &subject,
            json,
            &qualified,
            cfg.registry.on_incompatible,
        )
        .await?
        {
            crate::contract::Admission::Register => {
                ids[i] = Some(registry.register(&subject, json).await?);
            }
            crate::contract::Admission::Refused(why) => refused = Some(why),
        }
    }
    Ok(TableState {
        counters: metrics.table(&qualified),
        rel,
        topic,
        key_id: ids[0].filter(|_| refused.is_none()),
        value_id: match (&refused, ids[1]) {
            (Some(_), _) => 0,
            (None, Some(id)) => id,
            (None, None) => bail!("no value schema id for {qualified}"),
        },
        incompatible: refused,
        schema,
        route,
    })
}

/// Refuses, before anything is created for the pipeline, a `kafka.partition_by` entry for a
/// table walbridge does not stream or with a column outside the table's primary key
/// ([`route_columns_allowed`]).
async fn check_partition_by(cfg: &Config, meta: &tokio_postgres::Client) -> anyhow::Result<()> {
    for (table, cols) in &cfg.kafka.partition_by {
        let (schema, name) = table.split_once('.').unwrap_or(("public", table));
        let streamed = cfg
            .source
            .tables
            .iter()
            .any(|sel| sel.schema() == schema && sel.table().is_none_or(|t| t == name));
        let exists: bool = meta
            .query_one(
                "SELECT to_regclass(quote_ident($1) || '.' || quote_ident($2)) IS NOT NULL",
                &[&schema, &name],
            )
            .await
            .with_context(|| format!("looking up {table}"))?
            .get(0);
        if !streamed || !exists {
            bail!(
                "kafka.partition_by.{table}: walbridge does not stream {table} ({}); remove the \
                 entry or fix the table name",
                if streamed {
                    "it does not exist in the source database"
                } else {
                    "source.tables does not match it"
                }
            );
        }
        let pk: Vec<String> = meta
            .query(
                "SELECT a.attname::text FROM pg_index i \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indrelid = (quote_ident($1) || '.' || quote_ident($2))::regclass \
                 AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)",
                &[&schema, &name],
            )
            .await
            .with_context(|| format!("reading the primary key of {table}"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let full: bool = meta
            .query_one(
                "SELECT relreplident = 'f' FROM pg_class \
                 WHERE oid = (quote_ident($1) || '.' || quote_ident($2))::regclass",
                &[&schema, &name],
            )
            .await
            .with_context(|| format!("reading the replica identity of {table}"))?
            .get(0);
        route_columns_allowed(table, &pk, cols, full)?;
    }
    Ok(())
}

/// Routing columns must be primary-key columns, or the table must be `REPLICA IDENTITY FULL`.
/// With key columns, a key's routing value never changes without the key changing too, so one
/// key never has records in two partitions. With FULL, every change carries the old row, so a
/// change of the routing value can move the row: a delete (and tombstone) to the old partition,
/// then a create in the new one ([`Pipeline::update`]), as for a key change. Without either, the
/// old value is unknown and the row's records would be split over two partitions silently.
fn route_columns_allowed(
    table: &str,
    pk: &[String],
    cols: &[String],
    full: bool,
) -> anyhow::Result<()> {
    if full {
        return Ok(());
    }
    let fix = format!(
        "route by primary-key columns, or run ALTER TABLE {table} REPLICA IDENTITY FULL so that a \
         change of the column can move the row (a delete to the old partition, a create to the new one)"
    );
    if pk.is_empty() {
        bail!("kafka.partition_by.{table}: {table} has no primary key; {fix}");
    }
    for c in cols {
        if !pk.contains(c) {
            bail!(
                "kafka.partition_by.{table}: {c:?} is not a primary-key column of {table} (its \
                 primary key: {}); {fix}",
                pk.join(", ")
            );
        }
    }
    Ok(())
}

/// The routing of a table named in `kafka.partition_by`: its columns' positions and the topic's
/// partition count (read from the broker: an existing topic may have more than
/// `kafka.partitions`).
async fn route_of(
    cfg: &Config,
    sink: &Sink,
    rel: &Relation,
    pk: &[String],
    topic: &str,
) -> anyhow::Result<Option<crate::emit::Route>> {
    let qualified = format!("{}.{}", rel.namespace, rel.name);
    let Some(cols) = cfg.kafka.partition_by.get(&qualified) else {
        return Ok(None);
    };
    route_columns_allowed(
        &qualified,
        pk,
        cols,
        rel.replica_identity == ReplicaIdentity::Full,
    )?;
    let mut columns = Vec::with_capacity(cols.len());
    for c in cols {
        let i = rel
            .columns
            .iter()
            .position(|col| &col.name == c)
            .ok_or_else(|| {
                anyhow!("kafka.partition_by.{qualified}: {qualified} has no column {c:?}")
            })?;
        // A delete carries the replica identity's columns only: a routing column outside it
        // would be missing there, and the delete would go to another partition.
        if rel.replica_identity != ReplicaIdentity::Full && !rel.columns[i].key {
            bail!(
                "kafka.partition_by.{qualified}: {c:?} is not in the replica identity of \
                 {qualified}, so its deletes would not carry it; use REPLICA IDENTITY DEFAULT \
                 (the primary key) or FULL"
            );
        }
        columns.push(i);
    }
    let partitions = sink.partition_count(topic, cfg.kafka.partitions).await?;
    Ok(Some(crate::emit::Route {
        columns,
        partitions,
    }))
}

/// The table's primary key columns, in key order.
pub(crate) async fn primary_key(
    meta: &tokio_postgres::Client,
    rel: &Relation,
) -> anyhow::Result<Vec<String>> {
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
