//! The Kafka sink: an idempotent rdkafka producer with `acks=all`.
//!
//! Durability: a delivery report from librdkafka with success means the partition leader has
//! written the message and all in-sync replicas have it (`acks=all`); only then is the change
//! acked upstream. Idempotence makes librdkafka's own retries safe (no duplicates, no
//! reordering within a partition), which keeps per-key order: a key always maps to one partition
//! (`murmur2_random`, the Java client's partitioner, so other producers agree on placement).
//!
//! `message.timeout.ms = 0` (never give up): with a broker that is down, messages wait in
//! librdkafka's bounded queue rather than failing; when the queue is full `send` waits, which
//! stops the pipeline and, behind it, the replication reader. Memory stays bounded by
//! `queue.buffering.max.kbytes`.
//!
//! [`SinkStats`] counts what an operator watches (messages awaiting their delivery report,
//! delivery failures) with plain atomics, since they are touched once per message.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use cdc::progress::Progress;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message};

/// librdkafka's config error carries the property's value, which may be a secret
/// (`sasl.password`, `ssl.key.password`): keep the value only for properties that cannot hold one.
fn create_error(e: KafkaError) -> KafkaSinkError {
    KafkaSinkError::Create(match e {
        KafkaError::ClientConfig(code, desc, key, value) if is_secret_property(&key) => {
            let desc = if value.is_empty() {
                desc
            } else {
                desc.replace(&value, "***")
            };
            KafkaError::ClientConfig(code, desc, key, "***".to_owned())
        }
        e => e,
    })
}

/// librdkafka properties that may hold a credential or key material.
/// A config for an admin client: the brokers, and of a producer's extra properties only those
/// that say how to connect (`security.*`, `sasl.*`, `ssl.*`); the rest are producer-only and
/// would make an admin client refuse to start.
pub fn admin_config(brokers: &str, extra: &[(String, String)]) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers);
    for (k, v) in extra {
        if k.starts_with("security.") || k.starts_with("sasl.") || k.starts_with("ssl.") {
            cfg.set(k, v);
        }
    }
    cfg
}

/// Creates the topics that do not exist yet (one that exists already is fine) and logs each one
/// created. On failure: the topic (or all of them, comma-separated) and the broker's reason.
pub async fn create_topics(
    admin: &ClientConfig,
    topics: &[String],
    partitions: i32,
    replication_factor: i32,
    config: &[(&str, &str)],
) -> Result<(), (String, String)> {
    let admin: AdminClient<DefaultClientContext> = admin.create().map_err(|e| {
        (
            topics.join(","),
            format!("cannot create an admin client: {e}"),
        )
    })?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            config.iter().fold(
                NewTopic::new(t, partitions, TopicReplication::Fixed(replication_factor)),
                |n, (k, v)| n.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new, &opts)
        .await
        .map_err(|e| (topics.join(","), e.to_string()))?;
    for r in results {
        match r {
            Ok(t) => tracing::info!(topic = %t, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err((topic, code.to_string())),
        }
    }
    Ok(())
}

pub fn is_secret_property(key: &str) -> bool {
    [
        "password",
        "secret",
        "sasl.jaas",
        "oauthbearer.config",
        ".pem",
    ]
    .iter()
    .any(|s| key.contains(s))
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    #[error(
        "kafka: cannot create the producer: {0} (check the librdkafka properties in kafka.producer)"
    )]
    Create(KafkaError),
    #[error(
        "kafka: cannot create topic {topic} on {brokers}: {reason}; check that kafka.brokers is reachable from here \
         and that walbridge may create topics (or create them yourself, with kafka.partitions partitions)"
    )]
    Topic {
        topic: String,
        brokers: String,
        reason: String,
    },
    #[error(
        "kafka: cannot read the partition count of topic {topic} from {brokers}: {reason} (needed to route it by kafka.partition_by); check that kafka.brokers is reachable"
    )]
    Metadata {
        topic: String,
        brokers: String,
        reason: String,
    },
    #[error("kafka: producing to {topic} failed: {source}")]
    Produce { topic: String, source: KafkaError },
    #[error("kafka: flush did not finish in {0:?}; {1} message(s) still in flight")]
    FlushTimeout(Duration, i32),
}

/// Settings the sink needs; extra librdkafka properties pass through.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// Bound of the producer's queue in bytes.
    pub max_queue_bytes: usize,
    /// Producers (so broker connections) the topics are spread over; a topic always goes
    /// through the same one, which keeps its order. More than one lets a broker that serves a
    /// connection's requests one at a time (tansu) work on two topics' batches side by side.
    pub connections: usize,
    pub extra: Vec<(String, String)>,
}

/// Live counts of a sink, shared with whoever reports them; they outlive the sink so that a
/// restarted pipeline keeps counting where the last one stopped.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Messages handed to librdkafka whose delivery report has not arrived (its
    /// `in_flight_count`, kept here so a reader needs no handle on the producer).
    pub in_flight: AtomicI64,
    /// Delivery reports with an error, since the stats were created.
    pub delivery_errors: AtomicU64,
}

struct AckContext {
    progress: Progress,
    stats: Arc<SinkStats>,
}

impl ClientContext for AckContext {
    /// librdkafka's client-level errors. A refused SASL login is retried by librdkafka (the
    /// credentials may be fixed on the broker), so it is only logged, with the settings to check.
    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
                tracing::error!(
                    target: "librdkafka",
                    %reason,
                    "Kafka refused walbridge's login: check security.protocol, sasl.mechanisms, sasl.username and sasl.password in kafka.producer (retrying until the login succeeds or walbridge is stopped)"
                );
            }
            _ => tracing::error!(target: "librdkafka", "librdkafka: {error}: {reason}"),
        }
    }
}

impl ProducerContext for AckContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(_) => self.progress.ack(seq as u64),
            Err((e, msg)) => {
                // With infinite message timeout only permanent errors arrive here (message too
                // large, topic deleted, authorization). Progress stops; the change is streamed
                // again after a restart.
                // A purge is the producer being dropped with messages left (a pipeline
                // restart), not a delivery that failed.
                let purged = matches!(
                    e,
                    KafkaError::MessageProduction(
                        RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight
                    )
                );
                if purged {
                    tracing::debug!(
                        topic = msg.topic(),
                        "unsent message dropped with the producer"
                    );
                } else {
                    self.stats.delivery_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(topic = msg.topic(), error = %e, "kafka delivery failed");
                }
                self.progress
                    .fail(format!("delivery to {} failed: {e}", msg.topic()));
            }
        }
    }
}

/// One message to produce.
pub struct Record<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub headers: &'a [(&'a str, &'a [u8])],
    /// The progress entry this message belongs to.
    pub seq: u64,
    /// The partition, when the caller chose it ([`partition_for`]); else librdkafka's
    /// partitioner picks one from the key.
    pub partition: Option<i32>,
}

/// The Java client's default partition for `data` (murmur2, made positive, modulo the
/// partitions), which librdkafka's `murmur2_random` partitioner also computes for a key. So a
/// record routed by a value lands where another client producing that value as its key would.
pub fn partition_for(data: &[u8], partitions: i32) -> i32 {
    ((murmur2(data) & 0x7fff_ffff) % partitions.max(1) as u32) as i32
}

/// MurmurHash2, 32 bit, with the seed Kafka's clients use.
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h = 0x9747_b28c_u32 ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, b) in tail.iter().enumerate().rev() {
            h ^= u32::from(*b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

pub struct KafkaSink {
    producers: Vec<ThreadedProducer<AckContext>>,
    /// Which producer each topic seen so far goes through, given out in turn on first use
    /// (not by hash, so that up to `connections` topics never share one).
    routes: std::sync::RwLock<std::collections::HashMap<String, usize>>,
    settings: KafkaSettings,
    stats: Arc<SinkStats>,
}

impl KafkaSink {
    pub fn new(settings: KafkaSettings, progress: Progress) -> Result<Self, KafkaSinkError> {
        Self::with_stats(settings, progress, Arc::default())
    }

    /// [`new`](Self::new), counting into `stats`. The in-flight count starts from zero: messages
    /// of an earlier sink are gone with it.
    pub fn with_stats(
        settings: KafkaSettings,
        progress: Progress,
        stats: Arc<SinkStats>,
    ) -> Result<Self, KafkaSinkError> {
        stats.in_flight.store(0, Ordering::Relaxed);
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &settings.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "0")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .set("batch.size", "1000000")
            .set(
                "queue.buffering.max.kbytes",
                (settings.max_queue_bytes / 1024).max(1024).to_string(),
            )
            .set("queue.buffering.max.messages", "1000000");
        for (k, v) in &settings.extra {
            cfg.set(k, v);
        }
        let producers = (0..settings.connections.max(1))
            .map(|_| {
                cfg.create_with_context(AckContext {
                    progress: progress.clone(),
                    stats: stats.clone(),
                })
                .map_err(create_error)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(KafkaSink {
            producers,
            routes: Default::default(),
            settings,
            stats,
        })
    }

    /// Creates the topics that do not exist yet (existing ones are left as they are).
    pub async fn ensure_topics(&self, topics: &[String]) -> Result<(), KafkaSinkError> {
        if topics.is_empty() {
            return Ok(());
        }
        create_topics(
            &admin_config(&self.settings.brokers, &self.settings.extra),
            topics,
            self.settings.partitions,
            self.settings.replication_factor,
            &[],
        )
        .await
        .map_err(|(topic, reason)| KafkaSinkError::Topic {
            topic,
            brokers: self.settings.brokers.clone(),
            reason,
        })?;
        Ok(())
    }

    /// The producer of `topic`.
    fn producer(&self, topic: &str) -> &ThreadedProducer<AckContext> {
        if self.producers.len() == 1 {
            return &self.producers[0];
        }
        let known = self
            .routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
            .copied();
        let i = known.unwrap_or_else(|| {
            let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
            let next = routes.len() % self.producers.len();
            *routes.entry(topic.to_owned()).or_insert(next)
        });
        &self.producers[i]
    }

    /// Hands one message to the producer, waiting while its queue is full.
    pub async fn send(&self, r: &Record<'_>) -> Result<(), KafkaSinkError> {
        let producer = self.producer(r.topic);
        let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
        for (k, v) in r.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(r.topic, r.seq as usize).headers(headers);
        if let Some(k) = r.key {
            record = record.key(k);
        }
        if let Some(p) = r.partition {
            record = record.partition(p);
        }
        if let Some(p) = r.payload {
            record = record.payload(p);
        }
        let mut wait = Duration::from_millis(1);
        // Counted before the send: the delivery report may arrive before `send` returns.
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        loop {
            match producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), rec)) => {
                    // Backpressure: librdkafka's queue is at its byte bound. Wait for deliveries.
                    record = rec;
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(50));
                }
                Err((e, _)) => {
                    self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                    return Err(KafkaSinkError::Produce {
                        topic: r.topic.to_owned(),
                        source: e,
                    });
                }
            }
        }
    }

    /// How many partitions `topic` has, as the broker reports it.
    pub async fn partition_count(&self, topic: &str) -> Result<i32, KafkaSinkError> {
        let cfg = admin_config(&self.settings.brokers, &self.settings.extra);
        let name = topic.to_owned();
        // A blocking metadata request on a client of its own (once per table mapping), kept off
        // the async workers.
        let md = tokio::task::spawn_blocking(move || {
            use rdkafka::consumer::Consumer as _;
            let client: rdkafka::consumer::BaseConsumer = cfg.create()?;
            client.fetch_metadata(Some(&name), Duration::from_secs(30))
        })
        .await
        .map_err(|e| KafkaSinkError::Metadata {
            topic: topic.to_owned(),
            brokers: self.settings.brokers.clone(),
            reason: format!("the metadata request panicked: {e}"),
        })?
        .map_err(|e| KafkaSinkError::Metadata {
            topic: topic.to_owned(),
            brokers: self.settings.brokers.clone(),
            reason: format!("reading its partition count: {e}"),
        })?;
        match md.topics().iter().find(|t| t.name() == topic) {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                Ok(t.partitions().len() as i32)
            }
            _ => Err(KafkaSinkError::Metadata {
                topic: topic.to_owned(),
                brokers: self.settings.brokers.clone(),
                reason: "the broker reports no partitions for it".to_owned(),
            }),
        }
    }

    /// Waits until every queued message is delivered (or `timeout` passes).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaSinkError> {
        let deadline = std::time::Instant::now() + timeout;
        for p in &self.producers {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if p.flush(left).is_err() {
                let in_flight = self.producers.iter().map(|p| p.in_flight_count()).sum();
                return Err(KafkaSinkError::FlushTimeout(timeout, in_flight));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_agree_with_the_java_client() {
        // Kafka's own murmur2 test vectors (the clients' UtilsTest), as signed 32-bit values.
        for (data, want) in [
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            ("abc", 479470107),
        ] {
            assert_eq!(murmur2(data.as_bytes()) as i32, want, "{data}");
        }
        let p = partition_for(b"SKU-000123", 3);
        assert!((0..3).contains(&p));
        assert_eq!(p, partition_for(b"SKU-000123", 3), "deterministic");
    }
}
