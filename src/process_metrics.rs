//! What `walbridge process` tells an operator: `/metrics`, `/health` and `/ready` on
//! `processors.metrics_listen`, in the same text format and registry as `walbridge run`'s.
//!
//! The processor thread keeps its counts in [`ProcessorStats`] (relaxed atomics); everything here
//! is read when scraped. Consumer lag per partition is the broker's high watermark minus the
//! processor's position as of its last epoch, read with a metadata-only consumer of its own (the
//! processor's consumer belongs to its thread). Watermarks are the broker's word: tansu 0.6
//! sometimes reports stale ones (see `tail`), so lag there can read low; `source_lag_ms`
//! (now minus the commit time of the newest change folded) does not depend on them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use transforms::{ProcessorStats, SinkGate};

use crate::metrics::{Counter, Gauge, Histogram, LATENCY_BUCKETS, Registry, TaskGuard, now_ms};

/// Per input partition; registered when the processor has a position there.
pub const CONSUMER_LAG: &str = "walbridge_processor_consumer_lag_messages";

pub struct ProcessMetrics {
    registry: Registry,
    stats: Arc<ProcessorStats>,
    gate: Arc<SinkGate>,
    sinks: bool,
    consumer: BaseConsumer,
    messages: Arc<Counter>,
    undecodable: Arc<Counter>,
    epochs: Arc<Counter>,
    checkpoints: Arc<Counter>,
    checkpoint_age_ms: Arc<Gauge>,
    source_lag_ms: Arc<Gauge>,
    sink_backlog: Arc<Gauge>,
    units: Arc<Gauge>,
    read_age: Arc<Histogram>,
    visible_age: Arc<Histogram>,
    up: Arc<Gauge>,
    /// Set when the processor ended (why, if with an error).
    ended: std::sync::Mutex<Option<String>>,
}

impl ProcessMetrics {
    pub fn new(
        kafka: &ClientConfig,
        stats: Arc<ProcessorStats>,
        gate: Arc<SinkGate>,
        sinks: bool,
    ) -> anyhow::Result<Arc<ProcessMetrics>> {
        let consumer: BaseConsumer = kafka
            .clone()
            .set("group.id", "walbridge-process-metrics")
            .set("enable.auto.commit", "false")
            .create()
            .context("creating the metrics consumer")?;
        let registry = Registry::default();
        let r = &registry;
        Ok(Arc::new(ProcessMetrics {
            messages: r.counter(
                "walbridge_processor_messages_total",
                "Change messages folded into the views.",
                &[],
            ),
            undecodable: r.counter(
                "walbridge_processor_undecodable_total",
                "Change messages skipped because they could not be decoded (logged with their offsets).",
                &[],
            ),
            epochs: r.counter(
                "walbridge_processor_epochs_total",
                "Epochs closed (views published, epoch sent to the sinks).",
                &[],
            ),
            checkpoints: r.counter(
                "walbridge_processor_checkpoints_total",
                "Checkpoints written by this process.",
                &[],
            ),
            checkpoint_age_ms: r.gauge(
                "walbridge_processor_checkpoint_age_ms",
                "Milliseconds since this process last wrote a checkpoint (-1: none yet).",
                &[],
            ),
            source_lag_ms: r.gauge(
                "walbridge_processor_source_lag_ms",
                "Now minus the source commit time of the newest change folded (-1: none yet).",
                &[],
            ),
            sink_backlog: r.gauge(
                "walbridge_processor_sink_backlog_epochs",
                "Epochs closed that not every view sink has stored yet (in a group member, the most of any unit).",
                &[],
            ),
            units: r.gauge(
                "walbridge_processor_units",
                "Units folded here: 1 for one processor over everything, the member's shards in a group.",
                &[],
            ),
            read_age: r.histogram(
                "walbridge_processor_event_read_age_seconds",
                "Per change folded: now minus the record's CreateTime (when the pipeline produced it) as the processor reads it.",
                LATENCY_BUCKETS,
            ),
            visible_age: r.histogram(
                "walbridge_processor_event_visible_age_seconds",
                "Per change folded: now minus the record's CreateTime once the epoch holding it is published to SQL.",
                LATENCY_BUCKETS,
            ),
            up: r.gauge(
                "walbridge_processor_up",
                "1 while the processor runs, 0 once it ended.",
                &[],
            ),
            registry,
            stats,
            gate,
            sinks,
            consumer,
            ended: std::sync::Mutex::new(None),
        }))
    }

    /// The processor ended; `error` says why when it failed.
    pub fn ended(&self, error: Option<String>) {
        *self.ended.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(error.unwrap_or_else(|| "stopped".into()));
    }

    fn render(&self) -> String {
        let s = &self.stats;
        self.messages.mirror(s.messages.load(Ordering::Relaxed));
        self.undecodable
            .mirror(s.undecodable.load(Ordering::Relaxed));
        self.epochs.mirror(s.epochs.load(Ordering::Relaxed));
        self.checkpoints
            .mirror(s.checkpoints.load(Ordering::Relaxed));
        let now = now_ms();
        let age = |t: i64| if t > 0 { (now - t).max(0) } else { -1 };
        self.checkpoint_age_ms
            .set(age(s.last_checkpoint_ms.load(Ordering::Relaxed)));
        self.source_lag_ms
            .set(age(s.newest_source_ms.load(Ordering::Relaxed)));
        // Per unit (each has its own sinks' gate; one processor over everything has one).
        let backlog = if self.sinks { s.sink_backlog() } else { 0 };
        self.sink_backlog.set(backlog as i64);
        let units = s.units.lock().unwrap_or_else(|e| e.into_inner()).len();
        self.units.set(units as i64);
        if s.remote.enabled.load(Ordering::Relaxed) {
            self.render_remote(&s.remote, now);
        }
        for (h, ages) in [
            (&self.read_age, s.read_age.snapshot()),
            (&self.visible_age, s.visible_age.snapshot()),
        ] {
            h.mirror(
                &ages.buckets(h.bounds()),
                Duration::from_millis(ages.sum_ms()),
            );
        }
        self.up.set(i64::from(self.health().is_ok()));
        for ((topic, partition), pos) in &s.positions().0 {
            let lag = match self.consumer.fetch_watermarks(
                topic,
                *partition,
                Duration::from_millis(500),
            ) {
                Ok((_, high)) => (high - pos).max(0),
                Err(e) => {
                    tracing::debug!(topic, partition, error = %e, "watermarks for the lag metric");
                    continue;
                }
            };
            let part = partition.to_string();
            self.registry
                .gauge(
                    CONSUMER_LAG,
                    "Messages in the partition after the processor's position (broker high watermark minus position).",
                    &[("topic", topic), ("partition", &part)],
                )
                .set(lag);
        }
        self.registry.render()
    }

    /// The reader of the other members' units, in a group member with a Kafka view sink.
    fn render_remote(&self, r: &transforms::remote::RemoteStats, now: i64) {
        let g = |name: &'static str, help: &'static str| self.registry.gauge(name, help, &[]);
        g(
            "walbridge_processor_remote_ready",
            "1 once the other members' units were read from the view topics and the SQL endpoint serves them.",
        )
        .set(i64::from(r.ready.load(Ordering::Relaxed)));
        g(
            "walbridge_processor_remote_units",
            "Units read from the view topics (this member's own included; the live ones are served instead).",
        )
        .set(r.units.load(Ordering::Relaxed) as i64);
        g(
            "walbridge_processor_remote_pending_writes",
            "Writes of other members' units held back until all their records arrive.",
        )
        .set(r.pending_writes.load(Ordering::Relaxed) as i64);
        let newest = r.newest_ms.load(Ordering::Relaxed);
        g(
            "walbridge_processor_remote_age_ms",
            "Now minus the CreateTime of the newest view record read from the view topics (-1: none yet).",
        )
        .set(if newest > 0 { (now - newest).max(0) } else { -1 });
        self.registry
            .counter(
                "walbridge_processor_remote_records_total",
                "View records read from the view topics.",
                &[],
            )
            .mirror(r.records.load(Ordering::Relaxed));
        self.registry
            .counter(
                "walbridge_processor_remote_skipped_total",
                "View records skipped: without walbridge's unit and write headers, or not a row of the view (logged with their offsets).",
                &[],
            )
            .mirror(r.skipped.load(Ordering::Relaxed));
    }

    #[cfg(test)]
    pub(crate) fn render_for_test(&self) -> String {
        self.render()
    }

    fn health(&self) -> Result<(), String> {
        if let Some(f) = self.gate.failure().or_else(|| self.stats.sink_failure()) {
            return Err(f);
        }
        match &*self.ended.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(why) => Err(format!("the processor ended: {why}")),
            None => Ok(()),
        }
    }
}

/// Serves `/metrics`, `/health` and `/ready` until the guard is dropped.
pub async fn serve(m: Arc<ProcessMetrics>, listen: SocketAddr) -> anyhow::Result<TaskGuard> {
    use axum::Router;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| {
            format!(
                "binding the processors' metrics server to {listen} (processors.metrics_listen)"
            )
        })?;
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/health", get(health_page))
        .route("/ready", get(health_page))
        .with_state(m);
    tracing::info!(listen = %listen, "processor metrics server listening");
    Ok(TaskGuard(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "processor metrics server stopped");
        }
    })))
}

type State = axum::extract::State<Arc<ProcessMetrics>>;

async fn metrics_page(axum::extract::State(m): State) -> axum::response::Response {
    use axum::response::IntoResponse;
    // Watermark reads block on the network.
    let text = tokio::task::spawn_blocking(move || m.render())
        .await
        .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn health_page(axum::extract::State(m): State) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    match m.health() {
        Ok(()) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({ "status": "ok" })),
        )
            .into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "status": "failed", "reason": reason })),
        )
            .into_response(),
    }
}
