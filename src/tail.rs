//! Reads walbridge's topics back and decodes them through the registry: `walbridge tail`, the
//! demo's "what arrived" view, `walbridge dlq`, and the test suite's way of checking what is in
//! Kafka.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use avro::RegistryClient;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

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

const QUIET: Duration = Duration::from_secs(1);
const FIRST_FETCH: Duration = Duration::from_secs(4);

/// Reads every message of `topics` from the beginning and decodes them. Partitions are assigned
/// directly (no consumer group, so no rebalance to wait for). Reading goes at least to the high
/// watermark each partition reports and then on until the partitions have been quiet for
/// `QUIET`: tansu 0.6.0's ListOffsets answers are unreliable (seen here: a high watermark of 20 on
/// a partition holding 959 records), so the watermark alone cannot say where the end is.
pub async fn read_all(
    kafka: &ClientConfig,
    registry: &RegistryClient,
    topics: &[String],
    deadline: Duration,
) -> anyhow::Result<Vec<Event>> {
    let consumer: BaseConsumer = kafka
        .clone()
        .set("group.id", "walbridge-tail")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("isolation.level", "read_uncommitted")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("creating the Kafka consumer")?;
    let mut assignment = TopicPartitionList::new();
    let mut remaining: HashMap<(String, i32), i64> = HashMap::new();
    for topic in topics {
        let md = tokio::task::block_in_place(|| {
            consumer.fetch_metadata(Some(topic), Duration::from_secs(10))
        })
        .with_context(|| format!("reading metadata of {topic}"))?;
        for t in md.topics() {
            for p in t.partitions() {
                let (low, high) = tokio::task::block_in_place(|| {
                    consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                })
                .with_context(|| format!("reading offsets of {topic}/{}", p.id()))?;
                // Every partition is read, also one that reports no data (see QUIET below).
                // From offset 0, not `low`: tansu's low watermark is not reliable either. Where
                // retention has removed the start, auto.offset.reset moves to the earliest.
                assignment.add_partition_offset(topic, p.id(), Offset::Offset(0))?;
                if high > low {
                    remaining.insert((topic.clone(), p.id()), high);
                }
            }
        }
    }
    let mut raw = Vec::new();
    if assignment.count() > 0 {
        consumer
            .assign(&assignment)
            .context("assigning partitions")?;
    }
    let start = Instant::now();
    // Until the first message, allow for assignment and the first fetch round.
    let mut last_message = Instant::now() + FIRST_FETCH;
    while !remaining.is_empty() || (assignment.count() > 0 && last_message.elapsed() < QUIET) {
        anyhow::ensure!(
            start.elapsed() < deadline,
            "reading {} partition(s) did not reach their end in {deadline:?}",
            remaining.len()
        );
        let m = tokio::task::block_in_place(|| consumer.poll(Duration::from_millis(100)));
        let m = match m {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "consumer poll");
                continue;
            }
            None => continue,
        };
        last_message = Instant::now();
        let part = (m.topic().to_owned(), m.partition());
        if remaining
            .get(&part)
            .is_some_and(|high| m.offset() + 1 >= *high)
        {
            remaining.remove(&part);
        }
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
            part.0,
            part.1,
            m.offset(),
            m.key().map(<[u8]>::to_vec),
            m.payload().map(<[u8]>::to_vec),
            headers,
        ));
    }
    let mut events = Vec::with_capacity(raw.len());
    for (topic, partition, offset, key, payload, headers) in raw {
        let key = match key {
            // Business events are keyed by their aggregate id as plain text (see
            // crate::events); registry framing starts with a zero byte.
            Some(k) if k.first() != Some(&0) => Some(serde_json::Value::String(
                String::from_utf8_lossy(&k).into_owned(),
            )),
            Some(k) => Some(
                registry
                    .decode(&k)
                    .await
                    .with_context(|| format!("decoding a key in {topic}"))?,
            ),
            None => None,
        };
        let value = match payload {
            // walbridge's own JSON records (the dead-letter topic, see crate::dlq); registry
            // framing starts with a zero byte, never `{`.
            Some(p) if p.first() == Some(&b'{') => Some(
                serde_json::from_slice(&p)
                    .with_context(|| format!("reading a JSON value in {topic}@{offset}"))?,
            ),
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
pub fn topics_with_prefix(kafka: &ClientConfig, prefix: &str) -> anyhow::Result<Vec<String>> {
    let consumer: BaseConsumer = kafka.create().context("creating the Kafka client")?;
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .with_context(|| {
            format!(
                "listing topics on {}",
                kafka.get("bootstrap.servers").unwrap_or("?")
            )
        })?;
    let mut names: Vec<String> = md
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    Ok(names)
}
