//! OpenTelemetry traces: walbridge exports one span per source transaction over OTLP/HTTP, and
//! the span's ids are the ones in the `traceparent` header of the transaction's Kafka records,
//! so a consumer can continue the trace. The collector here is a mock (a small HTTP server that
//! accepts OTLP/HTTP JSON and keeps what it got); everything else is real.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{self, TestDb};

/// A mock OTLP/HTTP collector: keeps every span posted to `/v1/traces`, with its resource's
/// `service.name`.
struct MockCollector {
    url: String,
    spans: Arc<Mutex<Vec<(String, Value)>>>,
}

impl MockCollector {
    async fn start() -> MockCollector {
        let spans: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
        let keep = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |axum::Json(req): axum::Json<Value>| {
                let keep = keep.clone();
                async move {
                    for rs in req["resourceSpans"].as_array().into_iter().flatten() {
                        let service = attr(&rs["resource"], "service.name")
                            .and_then(|v| v["stringValue"].as_str())
                            .unwrap_or_default()
                            .to_owned();
                        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                            for span in ss["spans"].as_array().into_iter().flatten() {
                                keep.lock().unwrap().push((service.clone(), span.clone()));
                            }
                        }
                    }
                    axum::Json(serde_json::json!({}))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        MockCollector { url, spans }
    }

    fn spans(&self) -> Vec<(String, Value)> {
        self.spans.lock().unwrap().clone()
    }
}

fn attr<'a>(holder: &'a Value, key: &str) -> Option<&'a Value> {
    holder["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_transaction_is_one_exported_span_with_the_records_trace_ids() {
    let collector = MockCollector::start().await;
    let mut db = TestDb::new("otel").await;
    db.extra_sections = format!(
        "telemetry:\n  otlp_endpoint: \"{}\"\n  service_name: walbridge-e2e\n",
        collector.url
    );
    let mut wb = db.start().await;
    db.exec(&[
        "BEGIN; INSERT INTO oms.customers (id, email, first_name, last_name) VALUES \
         (970001, 'a@example.com', 'A', 'A'), (970002, 'b@example.com', 'B', 'B'); COMMIT",
        "INSERT INTO oms.customers (id, email, first_name, last_name) VALUES (970003, 'c@example.com', 'C', 'C')",
    ])
    .await;
    let topic = format!("{}.oms.customers", db.name);
    let events = db
        .events_until(|ev| harness::has_inserts(ev, &topic, 970001..970004))
        .await;
    // traceparent and the number of records, per correlation id.
    let mut records: BTreeMap<String, (String, usize)> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e.topic == topic && e.value.is_some())
    {
        let r = records
            .entry(e.headers["walbridge.correlation_id"].clone())
            .or_insert_with(|| (e.headers["traceparent"].clone(), 0));
        assert_eq!(
            r.0, e.headers["traceparent"],
            "one traceparent per transaction"
        );
        r.1 += 1;
    }
    assert_eq!(records.len(), 2, "two transactions: {records:?}");

    // The exporter posts once a second: wait until both transactions' spans are in.
    let deadline = Instant::now() + Duration::from_secs(30);
    let by_correlation: HashMap<String, (String, Value)> = loop {
        let got: HashMap<String, (String, Value)> = collector
            .spans()
            .into_iter()
            .filter_map(|(service, span)| {
                let c = attr(&span, "walbridge.correlation_id")?["stringValue"]
                    .as_str()?
                    .to_owned();
                Some((c, (service, span)))
            })
            .collect();
        if records.keys().all(|c| got.contains_key(c)) {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "spans of {records:?} not exported after 30 s; got {got:?}; log:\n{}",
            wb.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (correlation, (traceparent, n)) in &records {
        let (service, span) = &by_correlation[correlation];
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(span["traceId"], parts[1], "trace id of {correlation}");
        assert_eq!(span["spanId"], parts[2], "span id of {correlation}");
        assert_eq!(service, "walbridge-e2e");
        assert_eq!(
            attr(span, "walbridge.event_count").unwrap()["intValue"],
            n.to_string(),
            "event count of {correlation}"
        );
        let lsn = correlation.split_once(':').unwrap().1;
        assert_eq!(attr(span, "walbridge.lsn").unwrap()["stringValue"], lsn);
        assert_eq!(
            attr(span, "walbridge.tables").unwrap()["arrayValue"]["values"][0]["stringValue"],
            "oms.customers"
        );
    }
    db.wait_caught_up(&mut wb).await;
    assert!(wb.stop().success());
}
