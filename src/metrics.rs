//! What `walbridge run` tells an operator: metrics in the Prometheus text format (0.0.4), and
//! `/health` and `/ready` for orchestrators, served over HTTP when `metrics.listen` is set.
//!
//! ```text
//!  pipeline (per event: one relaxed atomic add      scrape (GET /metrics)
//!  on a handle resolved when the table appeared) ─▶ Registry ─▶ refresh scrape-time values
//!  Progress hook (per confirmed commit)           ─▶ (lag, Kafka queue) ─▶ text 0.0.4
//!  slot poller (own connection, every 5 s)        ─▶
//! ```
//!
//! Why our own registry rather than a crate: we need counters, gauges, one histogram and the
//! 0.0.4 text format. `prometheus-client` writes OpenMetrics text and brings a derive macro and
//! parking_lot; `prometheus` brings protobuf. Three atomic types and a renderer are about 250
//! lines that compile in a second.
//!
//! Cost on the hot path: a table's counters are `Arc<Counter>` handles the pipeline resolves
//! once, when the table's Relation message arrives; an event is then one relaxed `fetch_add`.
//! The registry's lock is taken only to add a series (a new table) and to render a scrape.
//! Values that are cheaper to read than to keep current (lag, Kafka queue depth) are read when
//! scraped.
//!
//! Nothing here carries a secret or a row value: labels are table names, ops, slot and
//! publication names, and fixed error categories.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use avro::Op;
use cdc::Lsn;
use cdc::progress::Progress;
use sinks::kafka::SinkStats;
use tokio::sync::watch;

use crate::config::{Config, SourceConfig};

/// A value that only goes up.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    /// For counters kept elsewhere (the sink's) and copied in at scrape time.
    pub fn mirror(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Observations in cumulative buckets (upper bounds in seconds), with their sum and count.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative; summed when rendered), plus one for +Inf.
    counts: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Takes over the counts of a histogram kept elsewhere: `counts` per bucket of these
    /// bounds, then +Inf (not cumulative), as [`Counter::mirror`] does for a count.
    pub fn mirror(&self, counts: &[u64], sum: Duration) {
        for (c, v) in self.counts.iter().zip(counts) {
            c.store(*v, Ordering::Relaxed);
        }
        self.sum_micros
            .store(sum.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn bounds(&self) -> &'static [f64] {
        self.bounds
    }
}

/// Commit→ack latency buckets: a healthy pipeline acks in milliseconds; a stalled one in minutes.
pub(crate) const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Clone)]
enum Series {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    Histogram(Arc<Histogram>),
}

struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    /// (rendered labels such as `table="oms.orders",op="c"`, series), in registration order.
    series: Vec<(String, Series)>,
}

/// Named metric families; asking twice for the same name and labels gives the same handle, so
/// counts continue across pipeline restarts.
#[derive(Default)]
pub struct Registry {
    families: Mutex<Vec<Family>>,
}

impl Registry {
    pub fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
    ) -> Arc<Counter> {
        match self.series(name, help, Kind::Counter, labels, || {
            Series::Counter(Arc::default())
        }) {
            Series::Counter(c) => c,
            _ => unreachable!("series() checks the kind"),
        }
    }

    pub fn gauge(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
    ) -> Arc<Gauge> {
        match self.series(name, help, Kind::Gauge, labels, || {
            Series::Gauge(Arc::default())
        }) {
            Series::Gauge(g) => g,
            _ => unreachable!("series() checks the kind"),
        }
    }

    pub fn histogram(
        &self,
        name: &'static str,
        help: &'static str,
        bounds: &'static [f64],
    ) -> Arc<Histogram> {
        match self.series(name, help, Kind::Histogram, &[], || {
            Series::Histogram(Arc::new(Histogram::new(bounds)))
        }) {
            Series::Histogram(h) => h,
            _ => unreachable!("series() checks the kind"),
        }
    }

    /// Replaces every series of an info gauge (value 1) with one carrying `labels`.
    pub fn set_info(&self, name: &'static str, help: &'static str, labels: &[(&str, &str)]) {
        let mut fams = self.lock();
        let rendered = render_labels(labels);
        let series = vec![(rendered, Series::Gauge(Arc::new(Gauge(AtomicI64::new(1)))))];
        match fams.iter_mut().find(|f| f.name == name) {
            Some(f) => f.series = series,
            None => fams.push(Family {
                name,
                help,
                kind: Kind::Gauge,
                series,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Family>> {
        // Families only grow; a panic mid-push leaves nothing half-written worth refusing.
        self.families.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn series(
        &self,
        name: &'static str,
        help: &'static str,
        kind: Kind,
        labels: &[(&str, &str)],
        make: impl FnOnce() -> Series,
    ) -> Series {
        let rendered = render_labels(labels);
        let mut fams = self.lock();
        let fam = match fams.iter().position(|f| f.name == name) {
            Some(i) => &mut fams[i],
            None => {
                fams.push(Family {
                    name,
                    help,
                    kind,
                    series: Vec::new(),
                });
                fams.last_mut().expect("just pushed")
            }
        };
        // A kind mismatch is a programming error in this file; keep serving the first kind
        // registered rather than panicking in a running pipeline.
        if fam.kind == kind
            && let Some((_, s)) = fam.series.iter().find(|(l, _)| *l == rendered)
        {
            return s.clone();
        }
        let s = make();
        if fam.kind == kind {
            fam.series.push((rendered, s.clone()));
        }
        s
    }

    /// The text exposition format, version 0.0.4.
    pub fn render(&self) -> String {
        let fams = self.lock();
        let mut out = String::with_capacity(4096);
        for f in fams.iter() {
            let kind = match f.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(out, "# TYPE {} {kind}", f.name);
            for (labels, s) in &f.series {
                let braces = |extra: &str| -> String {
                    match (labels.is_empty(), extra.is_empty()) {
                        (true, true) => String::new(),
                        (true, false) => format!("{{{extra}}}"),
                        (false, true) => format!("{{{labels}}}"),
                        (false, false) => format!("{{{labels},{extra}}}"),
                    }
                };
                match s {
                    Series::Counter(c) => {
                        let _ = writeln!(out, "{}{} {}", f.name, braces(""), c.get());
                    }
                    Series::Gauge(g) => {
                        let _ = writeln!(out, "{}{} {}", f.name, braces(""), g.get());
                    }
                    Series::Histogram(h) => {
                        let mut cumulative = 0u64;
                        for (i, c) in h.counts.iter().enumerate() {
                            cumulative += c.load(Ordering::Relaxed);
                            let le = h
                                .bounds
                                .get(i)
                                .map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
                            let _ = writeln!(
                                out,
                                "{}_bucket{} {cumulative}",
                                f.name,
                                braces(&format!("le=\"{le}\""))
                            );
                        }
                        let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
                        let _ = writeln!(out, "{}_sum{} {sum}", f.name, braces(""));
                        let _ = writeln!(out, "{}_count{} {cumulative}", f.name, braces(""));
                    }
                }
            }
        }
        out
    }
}

fn render_labels(labels: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out
}

// ---------------------------------------------------------------------------------------------
// walbridge's metrics.

/// `wal_status` values of `pg_replication_slots`, each a series of `walbridge_slot_wal_status`.
const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

/// How often the slot poller reads `pg_replication_slots`.
const SLOT_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Whether the pipeline is streaming, and if not, why (for `/ready`).
#[derive(Debug, Clone)]
struct Status {
    ready: Result<(), String>,
    /// Set once a fatal error stopped the pipeline (for `/health`).
    fatal: Option<String>,
    slot_lost: bool,
    /// The current attempt's tracker, for the lag at scrape time.
    progress: Option<Progress>,
}

/// Every metric `walbridge run` exports, with the handles the pipeline increments.
pub struct Metrics {
    registry: Registry,
    pub attempts: Arc<Counter>,
    pub confirmed_lsn: Arc<Gauge>,
    pub received_lsn: Arc<Gauge>,
    pub commit_to_ack: Arc<Histogram>,
    pub dead_letters: Arc<Counter>,
    lag_ms: Arc<Gauge>,
    ready: Arc<Gauge>,
    slot_retained: Arc<Gauge>,
    slot_wal_status: Vec<(&'static str, Arc<Gauge>)>,
    kafka_queue: Arc<Gauge>,
    delivery_errors: Arc<Counter>,
    last_error_at: Arc<Gauge>,
    /// The Kafka sink counts into this; it outlives each attempt's sink.
    pub sink_stats: Arc<SinkStats>,
    status: Mutex<Status>,
}

/// One table's counters, resolved once when the table appears in the stream.
#[derive(Clone)]
pub struct TableCounters {
    /// Indexed by [`op_index`].
    events: [Arc<Counter>; 5],
    bytes: Arc<Counter>,
    pub(crate) snapshot_rows: Arc<Gauge>,
}

fn op_index(op: Op) -> usize {
    match op {
        Op::Create => 0,
        Op::Update => 1,
        Op::Delete => 2,
        Op::Read => 3,
        Op::Truncate => 4,
    }
}

impl TableCounters {
    /// One event of `op`, `bytes` of key and value (tombstones included), handed to Kafka.
    pub fn produced(&self, op: Op, bytes: usize) {
        self.events[op_index(op)].inc();
        self.bytes.add(bytes as u64);
    }
}

impl Metrics {
    pub fn new(source: &SourceConfig) -> Arc<Metrics> {
        let r = Registry::default();
        r.set_info(
            "walbridge_info",
            "The slot and publication this walbridge streams from (value always 1).",
            &[
                ("slot", &source.slot),
                ("publication", &source.publication),
                ("version", env!("CARGO_PKG_VERSION")),
            ],
        );
        let m = Metrics {
            ready: r.gauge(
                "walbridge_ready",
                "1 while streaming (source connected, slot usable, snapshot finished), else 0.",
                &[],
            ),
            attempts: r.counter(
                "walbridge_pipeline_attempts_total",
                "Pipeline attempts started; more than one means the pipeline restarted after transient failures.",
                &[],
            ),
            confirmed_lsn: r.gauge(
                "walbridge_confirmed_flush_lsn",
                "The LSN confirmed to Postgres (everything before it is durably in Kafka), as a number.",
                &[],
            ),
            received_lsn: r.gauge(
                "walbridge_received_lsn",
                "The last WAL position received from the replication stream, as a number.",
                &[],
            ),
            lag_ms: r.gauge(
                "walbridge_lag_milliseconds",
                "Age of the oldest source commit not yet acked by Kafka (0 when everything received is acked).",
                &[],
            ),
            commit_to_ack: r.histogram(
                "walbridge_commit_to_ack_seconds",
                "Time from a transaction's commit in Postgres to the ack of its last change by Kafka.",
                LATENCY_BUCKETS,
            ),
            slot_retained: r.gauge(
                "walbridge_slot_retained_wal_bytes",
                "WAL the replication slot keeps on the source's disk (pg_current_wal_lsn() - restart_lsn).",
                &[],
            ),
            slot_wal_status: WAL_STATUSES
                .iter()
                .map(|s| {
                    (
                        *s,
                        r.gauge(
                            "walbridge_slot_wal_status",
                            "1 for the slot's current wal_status in pg_replication_slots; lost means the slot is unusable.",
                            &[("status", s)],
                        ),
                    )
                })
                .collect(),
            kafka_queue: r.gauge(
                "walbridge_kafka_queue_messages",
                "Messages handed to the Kafka producer and not yet acknowledged (librdkafka in-flight count).",
                &[],
            ),
            delivery_errors: r.counter(
                "walbridge_kafka_delivery_errors_total",
                "Messages Kafka refused for good (the pipeline stops and restreams them after a restart).",
                &[],
            ),
            dead_letters: r.counter(
                "walbridge_dead_letters_total",
                "Changes sent to the dead-letter topic because they could not be encoded or mapped.",
                &[],
            ),
            last_error_at: r.gauge(
                "walbridge_last_error_timestamp_seconds",
                "When the pipeline last failed (Unix seconds; 0 if never).",
                &[],
            ),
            registry: r,
            sink_stats: Arc::default(),
            status: Mutex::new(Status {
                ready: Err("starting".into()),
                fatal: None,
                slot_lost: false,
                progress: None,
            }),
        };
        Arc::new(m)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The counters of `table` (`schema.table`).
    pub fn table(&self, table: &str) -> TableCounters {
        let r = &self.registry;
        let event = |op: &str| {
            r.counter(
                "walbridge_events_total",
                "Change events handed to Kafka, per table and op (c, u, d, r = snapshot read, t).",
                &[("table", table), ("op", op)],
            )
        };
        TableCounters {
            events: ["c", "u", "d", "r", "t"].map(event),
            bytes: r.counter(
                "walbridge_produced_bytes_total",
                "Bytes of keys and values handed to Kafka, per table.",
                &[("table", table)],
            ),
            snapshot_rows: r.gauge(
                "walbridge_snapshot_rows_copied",
                "Rows the initial snapshot has copied, per table.",
                &[("table", table)],
            ),
        }
    }

    /// Sets the planner's row estimate of each table the snapshot copies (`pg_class.reltuples`,
    /// as fresh as the last ANALYZE). Best effort: a failure only leaves the estimate out.
    pub async fn estimate_snapshot(&self, client: &tokio_postgres::Client, tables: &[String]) {
        let rows = client
            .query(
                "SELECT n.nspname || '.' || c.relname, greatest(c.reltuples, 0)::bigint \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname || '.' || c.relname = ANY($1)",
                &[&tables],
            )
            .await;
        match rows {
            Ok(rows) => {
                for row in rows {
                    let (table, estimate): (String, i64) = (row.get(0), row.get(1));
                    self.registry
                        .gauge(
                            "walbridge_snapshot_rows_estimate",
                            "Rows the initial snapshot expects to copy, per table (planner estimate).",
                            &[("table", &table)],
                        )
                        .set(estimate);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot estimate the snapshot's row count"),
        }
    }

    /// Wraps an attempt's tracker: confirmed commits feed the latency histogram, and scrapes read
    /// the lag from it.
    pub fn track(self: &Arc<Self>, progress: Progress) -> Progress {
        let hist = self.commit_to_ack.clone();
        let progress = progress.on_confirm(move |commit_ms| {
            let ms = now_ms().saturating_sub(commit_ms).max(0);
            hist.observe(Duration::from_millis(ms as u64));
        });
        self.lock().progress = Some(progress.clone());
        progress
    }

    /// Records the position of the last item of a batch the pipeline took from the reader.
    pub fn received(&self, lsn: Lsn) {
        self.received_lsn.set(lsn.0 as i64);
    }

    pub fn attempt_started(&self) {
        self.attempts.inc();
        self.not_ready("connecting to the source");
    }

    pub fn not_ready(&self, reason: &str) {
        self.lock().ready = Err(reason.to_owned());
    }

    pub fn streaming(&self) {
        self.lock().ready = Ok(());
    }

    /// An attempt failed and another follows.
    pub fn transient_failure(&self, err: &anyhow::Error) {
        let reason = error_reason(err);
        self.error_seen(reason);
        self.not_ready(&format!("restarting after a transient failure ({reason})"));
    }

    /// The pipeline stopped for good; `/health` reports it until the process exits.
    pub fn fatal(&self, err: &anyhow::Error) {
        let reason = error_reason(err);
        self.error_seen(reason);
        let mut s = self.lock();
        s.fatal = Some(format!("the pipeline stopped: {reason}"));
        s.ready = Err(format!("failed ({reason})"));
    }

    fn error_seen(&self, reason: &str) {
        self.registry.set_info(
            "walbridge_last_error_info",
            "The category of the pipeline's last failure (value always 1; see the log for details).",
            &[("reason", reason)],
        );
        self.last_error_at.set(now_ms() / 1000);
    }

    fn slot_facts(&self, facts: Option<&cdc::slot::SlotFacts>) {
        let status = facts.and_then(|f| f.wal_status.as_deref());
        for (s, g) in &self.slot_wal_status {
            g.set(i64::from(status == Some(*s)));
        }
        self.slot_retained
            .set(facts.and_then(|f| f.retained_bytes).unwrap_or(0));
        self.lock().slot_lost = status == Some("lost");
    }

    /// `Ok` while streaming, else why not.
    pub fn readiness(&self) -> Result<(), String> {
        let s = self.lock();
        if s.slot_lost {
            return Err("the slot has lost WAL it needs (wal_status = lost)".into());
        }
        s.ready.clone()
    }

    pub fn health(&self) -> Result<(), String> {
        match &self.lock().fatal {
            Some(f) => Err(f.clone()),
            None => Ok(()),
        }
    }

    /// The exposition text, with scrape-time values brought up to date.
    pub fn render(&self) -> String {
        let (progress, ready) = {
            let s = self.lock();
            (s.progress.clone(), s.ready.is_ok() && !s.slot_lost)
        };
        let lag = progress
            .and_then(|p| p.oldest_pending_commit_ms())
            .map_or(0, |ms| now_ms().saturating_sub(ms).max(0));
        self.lag_ms.set(lag);
        self.ready.set(i64::from(ready));
        self.kafka_queue
            .set(self.sink_stats.in_flight.load(Ordering::Relaxed).max(0));
        self.delivery_errors
            .mirror(self.sink_stats.delivery_errors.load(Ordering::Relaxed));
        self.registry.render()
    }

    /// Keeps the confirmed-LSN gauge on the pipeline's confirmed LSN (across attempts).
    pub fn follow_confirmed(self: &Arc<Self>, mut rx: watch::Receiver<Lsn>) -> TaskGuard {
        let gauge = self.confirmed_lsn.clone();
        TaskGuard(tokio::spawn(async move {
            loop {
                gauge.set(rx.borrow_and_update().0 as i64);
                if rx.changed().await.is_err() {
                    return;
                }
            }
        }))
    }
}

/// A fixed category for an error, safe as a label: no DSN, no row value, no free text.
pub fn error_reason(err: &anyhow::Error) -> &'static str {
    use cdc::conn::ConnError;
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<cdc::source::SourceError>() {
            return match e {
                cdc::source::SourceError::Decode { .. } => "pgoutput_decode",
                cdc::source::SourceError::Spill { .. } => "spill",
                cdc::source::SourceError::Conn(ConnError::Server { .. }) => "source_server_error",
                cdc::source::SourceError::Conn(ConnError::Auth(_)) => "source_auth",
                cdc::source::SourceError::Conn(_) => "source_connection",
            };
        }
        if let Some(e) = cause.downcast_ref::<ConnError>() {
            return match e {
                ConnError::Server { .. } => "source_server_error",
                ConnError::Auth(_) => "source_auth",
                _ => "source_connection",
            };
        }
        if let Some(e) = cause.downcast_ref::<cdc::slot::SlotError>() {
            return match e {
                cdc::slot::SlotError::InUse { .. } => "slot_in_use",
                _ => "slot",
            };
        }
        if cause.downcast_ref::<avro::RegistryError>().is_some() {
            return "schema_registry";
        }
        if cause
            .downcast_ref::<sinks::kafka::KafkaSinkError>()
            .is_some()
        {
            return "kafka";
        }
        if let Some(e) = cause.downcast_ref::<tokio_postgres::Error>() {
            // Only an answer from the server carries a SQLSTATE.
            return if e.code().is_some() {
                "source_query"
            } else {
                "source_connection"
            };
        }
        if cause.downcast_ref::<std::io::Error>().is_some() {
            return "io";
        }
    }
    if err.to_string().starts_with("a sink failed") {
        return "kafka_delivery";
    }
    "other"
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Aborts its task when dropped, so background work ends with `walbridge run`.
pub struct TaskGuard(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Background work: the HTTP server and the slot poller.

/// Serves `/metrics`, `/health` and `/ready` on `listen` until the guard is dropped.
pub async fn serve(metrics: Arc<Metrics>, listen: SocketAddr) -> anyhow::Result<TaskGuard> {
    use axum::Router;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the metrics server to {listen} (metrics.listen)"))?;
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/health", get(health_page))
        .route("/ready", get(ready_page))
        .with_state(metrics);
    tracing::info!(listen = %listen, "metrics server listening");
    Ok(TaskGuard(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    })))
}

type State = axum::extract::State<Arc<Metrics>>;

async fn metrics_page(axum::extract::State(m): State) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
}

fn verdict(r: Result<(), String>, ok: &str, bad: &str) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    match r {
        Ok(()) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({ "status": ok })),
        )
            .into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "status": bad, "reason": reason })),
        )
            .into_response(),
    }
}

async fn health_page(axum::extract::State(m): State) -> axum::response::Response {
    verdict(m.health(), "ok", "failed")
}

async fn ready_page(axum::extract::State(m): State) -> axum::response::Response {
    verdict(m.readiness(), "ready", "not_ready")
}

/// Reads the slot's retained WAL and `wal_status` every few seconds on a connection of its own
/// (the pipeline's connections are busy or mid-restart exactly when this matters most).
pub fn spawn_slot_poller(metrics: Arc<Metrics>, cfg: &Config) -> TaskGuard {
    let pg = cfg.source.pg_config();
    let tls = cfg.source.tls();
    let slot = cfg.source.slot.clone();
    TaskGuard(tokio::spawn(async move {
        let mut client: Option<tokio_postgres::Client> = None;
        let mut warned = false;
        let mut tick = tokio::time::interval(SLOT_POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = match pg.connect(tls.clone()).await {
                    Ok((c, conn)) => {
                        tokio::spawn(conn);
                        Some(c)
                    }
                    Err(e) => {
                        if !warned {
                            tracing::warn!(error = %e, "slot metrics: cannot connect to the source; retrying");
                            warned = true;
                        }
                        None
                    }
                };
            }
            let Some(c) = &client else { continue };
            match cdc::slot::slot_facts(c, &slot).await {
                Ok(facts) => {
                    warned = false;
                    metrics.slot_facts(facts.as_ref());
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "slot metrics: cannot read pg_replication_slots");
                        warned = true;
                    }
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format_with_escaped_labels() {
        let r = Registry::default();
        let c = r.counter("x_total", "Things.", &[("table", "a\"b\\c\nd")]);
        c.add(3);
        // Same name and labels: the same handle.
        r.counter("x_total", "Things.", &[("table", "a\"b\\c\nd")])
            .inc();
        r.gauge("y", "A level.", &[]).set(-2);
        let text = r.render();
        assert_eq!(
            text,
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total{table=\"a\\\"b\\\\c\\nd\"} 4\n\
             # HELP y A level.\n# TYPE y gauge\ny -2\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let r = Registry::default();
        let h = r.histogram("lat_seconds", "Latency.", &[0.01, 0.1]);
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(2));
        let text = r.render();
        assert!(
            text.contains("lat_seconds_bucket{le=\"0.01\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_bucket{le=\"0.1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("lat_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("lat_seconds_sum 2.055\n"), "{text}");
        assert!(text.contains("lat_seconds_count 3\n"), "{text}");
        assert_eq!(h.count(), 3);
    }

    #[test]
    fn info_series_is_replaced_not_accumulated() {
        let r = Registry::default();
        r.set_info("e_info", "Last.", &[("reason", "kafka")]);
        r.set_info("e_info", "Last.", &[("reason", "slot")]);
        let text = r.render();
        assert!(text.contains("e_info{reason=\"slot\"} 1"), "{text}");
        assert!(!text.contains("kafka"), "{text}");
    }

    #[test]
    fn the_dashboard_uses_only_metrics_walbridge_exports() {
        let yaml = "source:\n  dsn: host=h user=u\n  publication: p\n  slot: s\n  tables: [a.*]\nkafka:\n  brokers: h:1\n  topic_prefix: t\nregistry:\n  url: http://r:1\n";
        let cfg = crate::config::from_str(yaml, "test.yaml").unwrap();
        let m = Metrics::new(&cfg.source);
        m.table("a.b").produced(Op::Create, 10);
        m.registry
            .gauge("walbridge_snapshot_rows_estimate", "x", &[("table", "a.b")]);
        let mut exported: std::collections::HashSet<String> = crate::status::parse(&m.render())
            .into_iter()
            .map(|s| s.name)
            .collect();
        // `walbridge process` serves its own: every family it registers up front, plus the
        // per-partition lag, which appears once a partition is assigned.
        let mut kafka = rdkafka::ClientConfig::new();
        kafka.set("bootstrap.servers", "127.0.0.1:1");
        let pm = crate::process_metrics::ProcessMetrics::new(
            &kafka,
            std::sync::Arc::default(),
            std::sync::Arc::default(),
            true,
        )
        .unwrap();
        exported.extend(
            crate::status::parse(&pm.render_for_test())
                .into_iter()
                .map(|s| s.name),
        );
        exported.insert(crate::process_metrics::CONSUMER_LAG.to_owned());
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("grafana-dashboard.json")).unwrap();
        let mut used = 0;
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for name in expr
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| w.starts_with("walbridge_"))
                {
                    used += 1;
                    assert!(
                        exported.contains(name),
                        "panel {:?} uses {name}, which walbridge does not export",
                        panel["title"]
                    );
                }
            }
        }
        assert!(used >= 20, "{used}");
    }

    #[test]
    fn error_reasons_are_fixed_categories() {
        let e = anyhow::Error::new(std::io::Error::other("password=secret"))
            .context("connecting to host=db password=secret");
        assert_eq!(error_reason(&e), "io");
        assert_eq!(
            error_reason(&anyhow::anyhow!("a sink failed: delivery to t failed")),
            "kafka_delivery"
        );
    }
}
