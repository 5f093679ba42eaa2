//! OpenTelemetry traces: one span per source transaction, exported as OTLP/HTTP (JSON) to
//! `telemetry.otlp_endpoint`. Off unless the `telemetry` section is in the config.
//!
//! The span's trace id and span id are the ones in the `traceparent` header of every record the
//! transaction produced (see [`crate::emit`]), so a consumer that continues the trace from a
//! record's header hangs its spans under this one. Attributes carry the correlation id (the
//! `walbridge.correlation_id` header), the commit LSN, the txid, the tables and the event count.
//! The span runs from BEGIN read off the stream to the last record handed to the producer.
//!
//! Why not the `opentelemetry-otlp` crates: their HTTP exporter brings reqwest 0.12 next to our
//! 0.13 (a second hyper/http stack) plus prost and the SDK's batch processor, for what is here
//! one JSON document per batch over the reqwest client walbridge already has. OTLP/HTTP with
//! JSON is part of the OTLP spec; every collector (OpenTelemetry Collector, Jaeger, Tempo)
//! accepts it on port 4318.
//!
//! Cost: nothing per row. With telemetry off the pipeline checks one `Option` per transaction.
//! With it on, finished spans go through a bounded channel to an exporter task that posts a
//! batch every second (or per 512 spans); when the channel is full (a collector that cannot
//! keep up) spans are dropped and counted rather than slowing the stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::sync::mpsc;

/// `telemetry` in the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// Base URL of an OTLP/HTTP receiver (`http://collector:4318`); spans go to `/v1/traces`.
    pub otlp_endpoint: String,
    /// `service.name` of the exported resource.
    pub service_name: String,
}

impl TelemetryConfig {
    /// The traces URL: the endpoint as given when it already names `/v1/traces`.
    pub fn traces_url(&self) -> String {
        let base = self.otlp_endpoint.trim_end_matches('/');
        if base.ends_with("/v1/traces") {
            base.to_owned()
        } else {
            format!("{base}/v1/traces")
        }
    }
}

/// One finished source transaction.
#[derive(Debug, Clone)]
pub struct TxSpan {
    pub trace_id: u128,
    pub span_id: u64,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub correlation_id: String,
    pub commit_lsn: String,
    pub txid: u32,
    /// `schema.table` of every table with a change in the transaction, in first-seen order.
    pub tables: Vec<String>,
    pub event_count: u64,
}

const QUEUE: usize = 8192;
const BATCH: usize = 512;
const EXPORT_EVERY: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Hands finished spans to the exporter task. Cheap to clone.
#[derive(Clone)]
pub struct Tracer {
    tx: mpsc::Sender<TxSpan>,
    dropped: Arc<AtomicU64>,
    done: Arc<tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Tracer {
    /// Starts the exporter task (on the current runtime).
    pub fn start(cfg: &TelemetryConfig) -> Tracer {
        let (tx, rx) = mpsc::channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let handle = tokio::spawn(export_loop(cfg.clone(), rx, dropped.clone()));
        tracing::info!(endpoint = %cfg.traces_url(), service = %cfg.service_name, "exporting traces over OTLP/HTTP");
        Tracer {
            tx,
            dropped,
            done: Arc::new(tokio::sync::Mutex::new(Some(handle))),
        }
    }

    /// Queues a span; never waits (a full queue drops it and counts it).
    pub fn record(&self, span: TxSpan) {
        if self.tx.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends what is queued and stops the exporter; waits at most `limit`.
    pub async fn shutdown(self, limit: Duration) {
        let Tracer { tx, done, .. } = self;
        drop(tx);
        // Other clones (a pipeline attempt still being torn down) may hold senders: the task
        // ends when the last one is gone, or we stop waiting at the limit.
        if let Some(handle) = done.lock().await.take()
            && tokio::time::timeout(limit, handle).await.is_err()
        {
            tracing::warn!(
                limit_ms = limit.as_millis() as u64,
                "trace exporter did not finish in time; the last spans may be lost"
            );
        }
    }
}

/// Nanoseconds since the Unix epoch, for span times.
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

async fn export_loop(
    cfg: TelemetryConfig,
    mut rx: mpsc::Receiver<TxSpan>,
    dropped: Arc<AtomicU64>,
) {
    let url = cfg.traces_url();
    let client = match reqwest::Client::builder().timeout(EXPORT_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the OTLP HTTP client; traces are not exported");
            return;
        }
    };
    let mut batch = Vec::with_capacity(BATCH);
    let mut tick = tokio::time::interval(EXPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_warning: Option<Instant> = None;
    loop {
        let room = BATCH - batch.len();
        tokio::select! {
            n = rx.recv_many(&mut batch, room) => {
                // 0 only when every sender is gone: send the rest and stop.
                if n == 0 {
                    if !batch.is_empty() {
                        export(&client, &url, &cfg, &mut batch, &dropped, &mut last_warning).await;
                    }
                    return;
                }
                if batch.len() >= BATCH {
                    export(&client, &url, &cfg, &mut batch, &dropped, &mut last_warning).await;
                }
            }
            _ = tick.tick() => {
                if !batch.is_empty() {
                    export(&client, &url, &cfg, &mut batch, &dropped, &mut last_warning).await;
                }
            }
        }
    }
}

async fn export(
    client: &reqwest::Client,
    url: &str,
    cfg: &TelemetryConfig,
    batch: &mut Vec<TxSpan>,
    dropped: &AtomicU64,
    last_warning: &mut Option<Instant>,
) {
    let body = match serde_json::to_vec(&request(cfg, batch)) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode spans; dropping them");
            batch.clear();
            return;
        }
    };
    let n = batch.len();
    batch.clear();
    let result = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status);
    if let Err(e) = result {
        // One warning a minute: a collector that is down must not flood the log.
        if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            *last_warning = Some(Instant::now());
            tracing::warn!(endpoint = %url, error = %e, spans = n, dropped_before = dropped.load(Ordering::Relaxed), "could not export spans to the OTLP collector; dropping them (is telemetry.otlp_endpoint right and the collector up?)");
        }
        dropped.fetch_add(n as u64, Ordering::Relaxed);
    }
}

fn string_attr(key: &str, v: &str) -> Value {
    json!({ "key": key, "value": { "stringValue": v } })
}

fn int_attr(key: &str, v: u64) -> Value {
    // OTLP/JSON carries 64-bit integers as decimal strings.
    json!({ "key": key, "value": { "intValue": v.to_string() } })
}

/// An OTLP `ExportTraceServiceRequest` in its JSON form (ids in lower-case hex).
fn request(cfg: &TelemetryConfig, spans: &[TxSpan]) -> Value {
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let tables: Vec<Value> = s
                .tables
                .iter()
                .map(|t| json!({ "stringValue": t }))
                .collect();
            json!({
                "traceId": format!("{:032x}", s.trace_id),
                "spanId": format!("{:016x}", s.span_id),
                "name": "walbridge.transaction",
                // SPAN_KIND_PRODUCER: the span produced the transaction's Kafka records.
                "kind": 4,
                "startTimeUnixNano": s.start_unix_nanos.to_string(),
                "endTimeUnixNano": s.end_unix_nanos.to_string(),
                "attributes": [
                    string_attr("walbridge.correlation_id", &s.correlation_id),
                    string_attr("walbridge.lsn", &s.commit_lsn),
                    int_attr("walbridge.txid", u64::from(s.txid)),
                    json!({ "key": "walbridge.tables", "value": { "arrayValue": { "values": tables } } }),
                    int_attr("walbridge.event_count", s.event_count),
                    int_attr("messaging.batch.message_count", s.event_count),
                    string_attr("messaging.system", "kafka"),
                    string_attr("db.system", "postgresql"),
                ],
                "status": {},
            })
        })
        .collect();
    json!({
        "resourceSpans": [{
            "resource": { "attributes": [string_attr("service.name", &cfg.service_name)] },
            "scopeSpans": [{
                "scope": { "name": "walbridge", "version": env!("CARGO_PKG_VERSION") },
                "spans": spans,
            }],
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_otlp_json_with_hex_ids_and_the_correlation_id() {
        let cfg = TelemetryConfig {
            otlp_endpoint: "http://c:4318/".into(),
            service_name: "wb".into(),
        };
        assert_eq!(cfg.traces_url(), "http://c:4318/v1/traces");
        let r = request(
            &cfg,
            &[TxSpan {
                trace_id: 0xabc,
                span_id: 0x12,
                start_unix_nanos: 1,
                end_unix_nanos: 2,
                correlation_id: "750:0/16B3748".into(),
                commit_lsn: "0/16B3748".into(),
                txid: 750,
                tables: vec!["oms.orders".into()],
                event_count: 3,
            }],
        );
        let span = &r["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"], format!("{:032x}", 0xabc));
        assert_eq!(span["spanId"], "0000000000000012");
        assert_eq!(
            span["attributes"][0]["value"]["stringValue"],
            "750:0/16B3748"
        );
        assert_eq!(
            r["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
            "wb"
        );
    }
}
