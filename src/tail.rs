//! Reads walbridge's topics back and decodes them through the registry: `walbridge tail`, the
//! demo's "what arrived" view, and the test suite's way of checking what is in Kafka.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use avro::RegistryClient;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};

/// One decoded Kafka message.
#[derive(Debug, Clone)]
pub struct Event {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<serde_json::Value>,
    /// `None` for a tombstone.
    pub value: Option<serde_json::Value>,
    pub headers: BTreeMap<String, String>,
}

impl Event {
    pub fn event_id(&self) -> Option<&str> {
        self.headers.get("walbridge.event_id").map(String::as_str)
    }
    /// `op` of the envelope (`c`, `u`, `d`, `t`, `r`); `None` for tombstones.
    pub fn op(&self) -> Option<&str> {
        self.value.as_ref()?.get("op")?.as_str()
    }
}

/// Reads every message of `topics` from the beginning until `idle` passes with nothing new (or
/// `deadline` passes), and decodes them.
pub async fn read_all(
    brokers: &str,
    registry: &RegistryClient,
    topics: &[String],
    idle: Duration,
    deadline: Duration,
) -> anyhow::Result<Vec<Event>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("walbridge-tail-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("creating the Kafka consumer")?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names).context("subscribing")?;
    let mut raw = Vec::new();
    let start = Instant::now();
    let mut last = Instant::now();
    while last.elapsed() < idle && start.elapsed() < deadline {
        // Blocking poll on a worker-friendly thread: short timeout, loop.
        let m = tokio::task::block_in_place(|| consumer.poll(Duration::from_millis(200)));
        match m {
            Some(Ok(m)) => {
                last = Instant::now();
                let mut headers = BTreeMap::new();
                if let Some(h) = m.headers() {
                    for hd in h.iter() {
                        let v = hd
                            .value
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                            .unwrap_or_default();
                        headers.insert(hd.key.to_owned(), v);
                    }
                }
                raw.push((
                    m.topic().to_owned(),
                    m.partition(),
                    m.offset(),
                    m.key().map(<[u8]>::to_vec),
                    m.payload().map(<[u8]>::to_vec),
                    headers,
                ));
            }
            Some(Err(e)) => tracing::debug!(error = %e, "consumer poll"),
            None => {}
        }
    }
    let mut events = Vec::with_capacity(raw.len());
    for (topic, partition, offset, key, payload, headers) in raw {
        let key = match key {
            Some(k) => Some(
                registry
                    .decode(&k)
                    .await
                    .with_context(|| format!("decoding a key in {topic}"))?,
            ),
            None => None,
        };
        let value = match payload {
            Some(p) => Some(
                registry
                    .decode(&p)
                    .await
                    .with_context(|| format!("decoding a value in {topic}@{offset}"))?,
            ),
            None => None,
        };
        events.push(Event {
            topic,
            partition,
            offset,
            key,
            value,
            headers,
        });
    }
    Ok(events)
}

/// The broker's topics whose names start with `prefix`, sorted.
pub fn topics_with_prefix(brokers: &str, prefix: &str) -> anyhow::Result<Vec<String>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating the Kafka client")?;
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .with_context(|| format!("listing topics on {brokers}"))?;
    let mut names: Vec<String> = md
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    Ok(names)
}
