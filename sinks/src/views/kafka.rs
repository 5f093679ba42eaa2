//! Views as compacted Kafka topics: `<prefix>.view.<name>`, one record per changed key.
//!
//! An upsert is a record keyed by the row's key columns with the whole row as value; a delete is
//! a tombstone (the key, no value). Topics that walbridge creates get `cleanup.policy=compact`,
//! so the log converges to the view: the latest value per key, keys that left disappear.
//!
//! Encoding: JSON objects (`{"sku":"A-1","warehouse":"W1"}` → `{"sku":…,"available":3,…}`),
//! columns in the view's order, nulls explicit. A view's shape belongs to processor code and
//! changes with it; JSON keeps these topics readable by any consumer (and by a person with a
//! console consumer) without a registry subject per view, and the key encoding is deterministic,
//! which compaction needs (equal keys must be equal bytes). The raw change and business-event
//! topics stay Avro under versioned contracts.
//!
//! Headers: every record names the unit that wrote it, the write (the sink's run and the
//! write's number in it), the write's record count over all views and, in group mode, the
//! input offsets the write reflects ([`transforms::remote::write_headers`]), so a group member
//! can read other members' units back a whole write at a time for its SQL endpoint, and tell
//! whether a unit that moved to it has caught up with them ([`transforms::remote`]).
//!
//! Guarantee: at-least-once. `write` returns after every record of the epoch has its delivery
//! report (`acks=all`, idempotent producer, so librdkafka's retries neither duplicate nor
//! reorder). A key always goes to the same partition (`murmur2_random`), so records of a key
//! stay in epoch order. After a crash the runtime replays epochs from the position `walbridge
//! process` keeps for this sink (written after each epoch's deliveries); the records written
//! again are equal to the ones already there, and compaction keeps the last. The sink stores no
//! offsets of its own (`committed_offsets` is `None` until this process has written an epoch).

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use transforms::view::{Epoch, Offsets, ViewChanges};

use super::{ViewSink, ViewSinkError, Written, advance, indices, key_names};

/// Settings of the Kafka view sink.
#[derive(Debug, Clone)]
pub struct KafkaViewSettings {
    pub brokers: String,
    /// Topics are `<prefix>.view.<view>`.
    pub topic_prefix: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// More librdkafka properties (security, tuning), passed through.
    pub extra: Vec<(String, String)>,
    /// The unit whose epochs this sink writes (`all` for a processor over everything), named
    /// in every record's headers ([`transforms::remote`]).
    pub unit: String,
}

pub struct KafkaViewSink {
    name: String,
    settings: KafkaViewSettings,
    producer: FutureProducer,
    /// Topics known to exist (created or found) by this process.
    topics: std::collections::HashSet<String>,
    offsets: Option<Offsets>,
    /// This run of the sink (its opening, in ms since the Unix epoch) and its writes so far:
    /// the `walbridge.write` header.
    run: u64,
    writes: u64,
}

impl KafkaViewSink {
    pub fn new(name: &str, settings: KafkaViewSettings) -> Result<Self, ViewSinkError> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &settings.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5");
        for (k, v) in &settings.extra {
            cfg.set(k, v);
        }
        let producer = cfg.create().map_err(|e| ViewSinkError::Kafka {
            sink: name.to_owned(),
            reason: format!("cannot create the producer: {e}"),
        })?;
        Ok(Self {
            name: name.to_owned(),
            settings,
            producer,
            topics: Default::default(),
            offsets: None,
            run: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            writes: 0,
        })
    }

    /// The topic a view goes to.
    pub fn topic(&self, view: &str) -> String {
        format!("{}.view.{view}", self.settings.topic_prefix)
    }

    fn err(&self, reason: String) -> ViewSinkError {
        ViewSinkError::Kafka {
            sink: self.name.clone(),
            reason,
        }
    }

    /// Creates the topics of these views (or finds them) in one request. Called when the sink
    /// opens, so that the first epochs do not wait for topic creation (seconds on some brokers)
    /// while the processor's epochs queue up behind them.
    pub async fn create_topics(&mut self, views: &[&str]) -> Result<(), ViewSinkError> {
        let topics: Vec<String> = views.iter().map(|v| self.topic(v)).collect();
        self.ensure_topics(&topics).await
    }

    async fn ensure_topic(&mut self, topic: &str) -> Result<(), ViewSinkError> {
        if self.topics.contains(topic) {
            return Ok(());
        }
        self.ensure_topics(&[topic.to_owned()]).await
    }

    async fn ensure_topics(&mut self, topics: &[String]) -> Result<(), ViewSinkError> {
        let brokers = self.settings.brokers.clone();
        crate::kafka::create_topics(
            &crate::kafka::admin_config(&brokers, &self.settings.extra),
            topics,
            self.settings.partitions,
            self.settings.replication_factor,
            &[("cleanup.policy", "compact")],
        )
        .await
        .map_err(|(topic, reason)| {
            self.err(format!(
                "cannot create topic {topic} on {brokers}: {reason}; check that the brokers are reachable and \
                 that walbridge may create topics (or create it yourself with cleanup.policy=compact)"
            ))
        })?;
        self.topics.extend(topics.iter().cloned());
        Ok(())
    }

    async fn write_view(
        &mut self,
        changes: &ViewChanges,
        headers: &OwnedHeaders,
    ) -> Result<usize, ViewSinkError> {
        let topic = self.topic(&changes.view);
        self.ensure_topic(&topic).await?;
        let arrow_err = |source| ViewSinkError::Arrow {
            sink: self.name.clone(),
            view: changes.view.clone(),
            source,
        };
        let keys = key_names(changes);
        let key_idx = indices(&self.name, &changes.view, &changes.upserts, &keys)?;
        let upsert_keys =
            transforms::remote::json_lines(&changes.upserts.project(&key_idx).map_err(arrow_err)?)
                .map_err(arrow_err)?;
        let upsert_values = transforms::remote::json_lines(&changes.upserts).map_err(arrow_err)?;
        let delete_keys = transforms::remote::json_lines(&changes.deletes).map_err(arrow_err)?;

        // Deletes first, then upserts: should a key be in both, the row stays (last wins).
        let records = delete_keys
            .iter()
            .map(|k| (k, None))
            .chain(upsert_keys.iter().zip(upsert_values.iter().map(Some)));
        let mut pending = VecDeque::new();
        let mut n = 0;
        for (key, value) in records {
            let mut record = FutureRecord::<String, String>::to(&topic)
                .key(key)
                .headers(headers.clone());
            if let Some(v) = value {
                record = record.payload(v);
            }
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push_back(delivery);
                        break;
                    }
                    // librdkafka's queue is full (an epoch larger than the queue): wait for the
                    // oldest delivery, then try again. Memory stays bounded by the queue.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        match pending.pop_front() {
                            Some(d) => self.delivered(&topic, d).await?,
                            None => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                    Err((e, _)) => return Err(self.err(format!("producing to {topic}: {e}"))),
                }
            }
            n += 1;
        }
        for d in pending {
            self.delivered(&topic, d).await?;
        }
        Ok(n)
    }

    async fn delivered(&self, topic: &str, d: DeliveryFuture) -> Result<(), ViewSinkError> {
        match d.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(self.err(format!("delivery to {topic} failed: {e}"))),
            Err(_) => Err(self.err(format!("delivery to {topic} was cancelled"))),
        }
    }
}

#[async_trait]
impl ViewSink for KafkaViewSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn committed_offsets(&self) -> Option<&Offsets> {
        self.offsets.as_ref()
    }

    async fn write(&mut self, epoch: &Epoch) -> Result<Written, ViewSinkError> {
        // Every record names the write and its size, so a reader can apply the write whole.
        self.writes += 1;
        let total: usize = epoch
            .changes
            .iter()
            .map(|c| c.upserts.num_rows() + c.deletes.num_rows())
            .sum();
        let headers = transforms::remote::write_headers(
            &self.settings.unit,
            self.run,
            self.writes,
            total as u64,
            &epoch.offsets,
        );
        let mut records = 0;
        for changes in &epoch.changes {
            records += self.write_view(changes, &headers).await?;
        }
        advance(
            self.offsets.get_or_insert_with(Offsets::default),
            &epoch.offsets,
        );
        tracing::debug!(sink = %self.name, epoch = epoch.number, records, "view epoch produced");
        Ok(Written::Stored)
    }
}
