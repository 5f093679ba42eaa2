//! The processor loop: Kafka in, state folded, epochs and alerts out, checkpoints on disk.
//!
//! One thread owns the consumer and the [`State`]; nothing else touches the state, so the fold
//! needs no locks. Every `epoch_interval` it closes an epoch: views are brought up to date,
//! changed views are published to the [`Catalog`] and the [`Epoch`] is sent to the channel
//! (which blocks when the receiver is full: a slow sink slows the processor, it does not grow
//! memory). Every `checkpoint_interval` the alerts produced so far are flushed and the state is
//! written with the offsets it reflects (temp file, fsync, rename: a crash leaves the old or
//! the new checkpoint, never a torn one). On start the checkpoint is restored and the consumer
//! is positioned at its offsets, so after `kill -9` the changes after the checkpoint are read
//! and folded again, exactly once into the state.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use avro::RegistryClient;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::input::{self, Schemas, TABLES};
use crate::state::{Alert, SafetyStock, Saved, State};
use crate::view::{Catalog, Epoch, Snapshot};

/// What a processor needs to run (built from the `processors:` section of pipelines.yaml).
#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    pub brokers: String,
    /// The change topics' prefix (`kafka.topic_prefix`).
    pub topic_prefix: String,
    pub registry_url: String,
    pub group_id: String,
    /// The checkpoint is `<checkpoint_dir>/<group_id>.checkpoint.json`.
    pub checkpoint_dir: PathBuf,
    pub epoch_interval: Duration,
    pub checkpoint_interval: Duration,
    pub safety_stock: SafetyStock,
    /// Where oversell alerts go (default `<prefix>.alerts.oversell`).
    pub alerts_topic: String,
    pub alerts_partitions: i32,
}

impl ProcessorConfig {
    pub fn checkpoint_path(&self) -> PathBuf {
        self.checkpoint_dir
            .join(format!("{}.checkpoint.json", self.group_id))
    }

    fn topic(&self, table: &str) -> String {
        format!("{}.{}", self.topic_prefix, table)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("kafka: {what}: {source}")]
    Kafka {
        what: String,
        source: rdkafka::error::KafkaError,
    },
    #[error("checkpoint {path}: {what}")]
    Checkpoint { path: PathBuf, what: String },
    #[error("building view batches: {0}")]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
    #[error(
        "alert {id} was not delivered to {topic}: {reason}; the checkpoint stays before it and a restart raises it again"
    )]
    AlertUndelivered {
        id: String,
        topic: String,
        reason: String,
    },
    #[error("registry: {0}")]
    Registry(#[from] avro::RegistryError),
    #[error("the processor thread panicked")]
    Panicked,
}

fn kafka(what: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> ProcessError {
    let what = what.into();
    move |source| ProcessError::Kafka { what, source }
}

/// A running processor: the live views and the epoch stream.
pub struct Running {
    pub catalog: Arc<Catalog>,
    /// Every epoch, in order. Drain it (a full channel pauses the processor) or drop it.
    pub epochs: mpsc::Receiver<Epoch>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<(), ProcessError>>,
}

impl Running {
    /// Stops at the next poll, closing the epoch and writing a final checkpoint.
    pub async fn stop(self) -> Result<(), ProcessError> {
        self.stop.store(true, Ordering::SeqCst);
        self.join().await
    }

    /// Waits for the processor to end (only an error ends it without [`Running::stop`]).
    pub async fn join(self) -> Result<(), ProcessError> {
        let t = self.thread;
        tokio::task::spawn_blocking(move || t.join())
            .await
            .map_err(|_| ProcessError::Panicked)?
            .map_err(|_| ProcessError::Panicked)?
    }

    pub fn stopper(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }
}

/// Starts the processors (call inside a tokio runtime): restores the checkpoint, publishes the
/// restored views, then consumes the change topics until stopped.
pub fn run(config: ProcessorConfig) -> Result<Running, ProcessError> {
    let catalog = Catalog::new();
    let (tx, rx) = mpsc::channel(64);
    let stop = Arc::new(AtomicBool::new(false));
    let state = load_checkpoint(&config)?;
    publish_all(&state, &catalog)?;
    let handle = tokio::runtime::Handle::current();
    let (c, s, cat) = (config.clone(), stop.clone(), catalog.clone());
    let thread = std::thread::Builder::new()
        .name("walbridge-processors".into())
        .spawn(move || {
            let mut p = Processor::new(c, handle, state, Until::Stopped(s))?;
            p.catalog = Some(cat);
            p.epochs = Some(tx);
            p.alerts = true;
            p.checkpoints = true;
            p.run()
        })
        .map_err(|e| ProcessError::Checkpoint {
            path: PathBuf::new(),
            what: format!("cannot start the processor thread: {e}"),
        })?;
    Ok(Running {
        catalog,
        epochs: rx,
        stop,
        thread,
    })
}

/// Reads the checkpoint, or a fresh state when there is none.
pub fn load_checkpoint(config: &ProcessorConfig) -> Result<State, ProcessError> {
    let path = config.checkpoint_path();
    let err = |what: String| ProcessError::Checkpoint {
        path: path.clone(),
        what,
    };
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(State::new(config.safety_stock.clone()));
        }
        Err(e) => return Err(err(format!("cannot read it: {e}"))),
    };
    let saved: Saved = serde_json::from_slice(&bytes)
        .map_err(|e| err(format!("is not a walbridge checkpoint ({e}); move it away to start from the beginning of the topics")))?;
    if saved.version != crate::state::CHECKPOINT_VERSION {
        return Err(err(format!(
            "has version {} but this walbridge reads {}; move it away to rebuild from the topics",
            saved.version,
            crate::state::CHECKPOINT_VERSION
        )));
    }
    if saved.topic_prefix != config.topic_prefix {
        return Err(err(format!(
            "belongs to topic prefix {:?}, not {:?}; give this pipeline its own processors.group_id or checkpoint_dir",
            saved.topic_prefix, config.topic_prefix
        )));
    }
    let state = State::restore(saved, config.safety_stock.clone())?;
    tracing::info!(path = %path.display(), epoch = state.epoch, partitions = state.offsets.0.len(), "checkpoint restored");
    Ok(state)
}

fn write_checkpoint(path: &Path, saved: &Saved) -> Result<(), ProcessError> {
    use std::io::Write;
    let err = |what: String| ProcessError::Checkpoint {
        path: path.to_owned(),
        what,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create its directory: {e}")))?;
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(saved).map_err(|e| err(format!("cannot serialize: {e}")))?;
    let mut f = std::fs::File::create(&tmp)
        .map_err(|e| err(format!("cannot create {}: {e}", tmp.display())))?;
    f.write_all(&bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| err(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| err(format!("cannot rename the temp file: {e}")))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn publish_all(state: &State, catalog: &Catalog) -> Result<(), ProcessError> {
    for v in state.views() {
        catalog.publish(
            &v.def,
            Snapshot {
                epoch: state.epoch,
                offsets: state.offsets.clone(),
                batches: v.batches()?,
            },
        );
    }
    Ok(())
}

/// When the loop ends.
pub(crate) enum Until {
    Stopped(Arc<AtomicBool>),
    /// No message for this long (after a first fetch round): the topics' end, as far as a
    /// reader can tell (tansu's watermarks are not reliable, see walbridge's `tail`).
    Quiet(Duration),
}

pub(crate) struct Processor {
    config: ProcessorConfig,
    handle: tokio::runtime::Handle,
    pub(crate) state: State,
    until: Until,
    consumer: BaseConsumer,
    registry: RegistryClient,
    schemas: Schemas,
    topics: Vec<(String, usize)>,
    assigned: usize,
    catalog: Option<Arc<Catalog>>,
    epochs: Option<mpsc::Sender<Epoch>>,
    alerts: bool,
    checkpoints: bool,
    producer: Option<FutureProducer>,
    pending_alerts: Vec<(String, rdkafka::producer::DeliveryFuture)>,
    pub(crate) undecodable: u64,
}

impl Processor {
    pub(crate) fn new(
        config: ProcessorConfig,
        handle: tokio::runtime::Handle,
        state: State,
        until: Until,
    ) -> Result<Processor, ProcessError> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("allow.auto.create.topics", "false")
            .set("fetch.wait.max.ms", "50")
            .create()
            .map_err(kafka("creating the consumer"))?;
        let registry = RegistryClient::new(&config.registry_url)?;
        let topics = TABLES
            .iter()
            .enumerate()
            .map(|(i, t)| (config.topic(t), i))
            .collect();
        Ok(Processor {
            config,
            handle,
            state,
            until,
            consumer,
            registry,
            schemas: Schemas::default(),
            topics,
            assigned: 0,
            catalog: None,
            epochs: None,
            alerts: false,
            checkpoints: false,
            producer: None,
            pending_alerts: Vec::new(),
            undecodable: 0,
        })
    }

    /// Assigns every partition of the change topics that exist, at the state's offsets (the
    /// beginning for partitions the state has not seen). Returns how many partitions.
    fn assign(&mut self) -> Result<usize, ProcessError> {
        let md = self
            .consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .map_err(kafka("reading topic metadata"))?;
        let mut tpl = TopicPartitionList::new();
        for t in md.topics() {
            if !self.topics.iter().any(|(n, _)| n == t.name()) {
                continue;
            }
            for p in t.partitions() {
                let at = match self.state.offsets.0.get(&(t.name().to_owned(), p.id())) {
                    Some(o) => Offset::Offset(*o),
                    None => Offset::Beginning,
                };
                tpl.add_partition_offset(t.name(), p.id(), at)
                    .map_err(kafka("building the assignment"))?;
            }
        }
        let n = tpl.count();
        if n != self.assigned {
            self.consumer
                .assign(&tpl)
                .map_err(kafka("assigning partitions"))?;
            tracing::info!(partitions = n, "processor partitions assigned");
            self.assigned = n;
        }
        Ok(n)
    }

    fn stopped(&self) -> bool {
        matches!(&self.until, Until::Stopped(s) if s.load(Ordering::SeqCst))
    }

    pub(crate) fn run(&mut self) -> Result<(), ProcessError> {
        if self.alerts {
            self.producer = Some(self.alert_producer()?);
        }
        self.assign()?;
        let started = Instant::now();
        let mut last_message = Instant::now();
        let mut next_epoch = Instant::now() + self.config.epoch_interval;
        let mut next_checkpoint = Instant::now() + self.config.checkpoint_interval;
        let mut next_metadata = Instant::now() + Duration::from_secs(2);
        let mut saved_offsets = self.state.offsets.clone();
        let mut since_epoch = 0u64;
        loop {
            if self.stopped() {
                break;
            }
            if let Until::Quiet(q) = self.until
                && started.elapsed() > Duration::from_secs(4)
                && last_message.elapsed() > q
            {
                break;
            }
            let now = Instant::now();
            if now >= next_metadata {
                self.assign()?;
                next_metadata = now + Duration::from_secs(2);
            }
            let wait = next_epoch
                .saturating_duration_since(now)
                .min(Duration::from_millis(100));
            if let Some(m) = self.consumer.poll(wait) {
                match m {
                    Ok(m) => {
                        last_message = Instant::now();
                        let (topic, part, off) = (m.topic().to_owned(), m.partition(), m.offset());
                        // Copied so the message's borrow of the consumer ends before the fold.
                        let payload = m.payload().map(<[u8]>::to_vec);
                        drop(m);
                        if let Some(payload) = payload {
                            self.fold(&topic, part, off, &payload)?;
                        }
                        self.state.offsets.0.insert((topic, part), off + 1);
                        since_epoch += 1;
                    }
                    Err(e) => tracing::warn!(error = %e, "processor consumer poll"),
                }
            }
            let now = Instant::now();
            if now >= next_epoch {
                if since_epoch > 0 {
                    self.close_epoch()?;
                    since_epoch = 0;
                }
                next_epoch = now + self.config.epoch_interval;
            }
            if self.checkpoints && now >= next_checkpoint {
                if self.state.offsets != saved_offsets {
                    self.checkpoint()?;
                    saved_offsets = self.state.offsets.clone();
                }
                next_checkpoint = now + self.config.checkpoint_interval;
            }
        }
        if since_epoch > 0 {
            self.close_epoch()?;
        }
        if self.checkpoints && self.state.offsets != saved_offsets {
            self.checkpoint()?;
        }
        Ok(())
    }

    fn fold(
        &mut self,
        topic: &str,
        part: i32,
        off: i64,
        payload: &[u8],
    ) -> Result<(), ProcessError> {
        let Some(table) = self
            .topics
            .iter()
            .find(|(n, _)| n == topic)
            .map(|(_, i)| *i)
        else {
            return Ok(());
        };
        let (id, datum) = match avro::wire::unframe(payload) {
            Ok(x) => x,
            Err(e) => {
                self.undecodable += 1;
                tracing::warn!(topic, partition = part, offset = off, error = %e, "change skipped: not in registry framing");
                return Ok(());
            }
        };
        if self.schemas.get(id).is_none() {
            let schema = self.fetch_schema(id)?;
            self.schemas.insert(id, schema);
        }
        let schema = self.schemas.get(id).expect("inserted above");
        match input::decode(table, schema, datum) {
            Ok(events) => {
                for ev in &events {
                    self.state.apply(ev);
                }
            }
            Err(e) => {
                self.undecodable += 1;
                tracing::warn!(topic, partition = part, offset = off, error = %e, "change skipped: cannot decode it for the views");
            }
        }
        Ok(())
    }

    /// Fetches a writer schema, retrying while the registry is unreachable (transient).
    fn fetch_schema(&self, id: u32) -> Result<apache_avro::Schema, ProcessError> {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.handle.block_on(self.registry.schema_by_id(id)) {
                Ok(s) => return Ok(s),
                Err(e) if !self.stopped() => {
                    tracing::warn!(id, error = %e, "fetching a writer schema failed; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub(crate) fn close_epoch(&mut self) -> Result<(), ProcessError> {
        let out = self.state.finish_epoch()?;
        if self.alerts {
            for a in &out.alerts {
                self.send_alert(a)?;
            }
        }
        if out.changes.is_empty() {
            return Ok(());
        }
        if let Some(catalog) = &self.catalog {
            for c in &out.changes {
                if let Some(v) = self.state.view(&c.view) {
                    catalog.publish(
                        &v.def,
                        Snapshot {
                            epoch: self.state.epoch,
                            offsets: self.state.offsets.clone(),
                            batches: v.batches()?,
                        },
                    );
                }
            }
        }
        if let Some(tx) = &self.epochs {
            let epoch = Epoch {
                number: self.state.epoch,
                offsets: self.state.offsets.clone(),
                changes: out.changes,
            };
            // A dropped receiver means nobody wants epochs: the views still go on.
            if tx.blocking_send(epoch).is_err() {
                self.epochs = None;
            }
        }
        Ok(())
    }

    fn alert_producer(&self) -> Result<FutureProducer, ProcessError> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.config.brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create()
            .map_err(kafka("creating the alert producer"))?;
        let admin: AdminClient<_> = ClientConfig::new()
            .set("bootstrap.servers", &self.config.brokers)
            .create()
            .map_err(kafka("creating the admin client"))?;
        let topic = NewTopic::new(
            &self.config.alerts_topic,
            self.config.alerts_partitions,
            TopicReplication::Fixed(1),
        );
        let res = self
            .handle
            .block_on(admin.create_topics([&topic], &AdminOptions::new()))
            .map_err(kafka(format!(
                "creating topic {}",
                self.config.alerts_topic
            )))?;
        for r in res {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(ProcessError::Kafka {
                        what: format!("creating topic {t}"),
                        source: rdkafka::error::KafkaError::AdminOp(code),
                    });
                }
            }
        }
        Ok(producer)
    }

    fn send_alert(&mut self, a: &Alert) -> Result<(), ProcessError> {
        let Some(p) = &self.producer else {
            return Ok(());
        };
        let payload = serde_json::to_vec(a).unwrap_or_default();
        let mut record = FutureRecord::to(&self.config.alerts_topic)
            .key(a.sku.as_bytes())
            .payload(&payload);
        loop {
            match p.send_result(record) {
                Ok(f) => {
                    self.pending_alerts.push((a.id.clone(), f));
                    return Ok(());
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                    r,
                )) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(kafka(format!("producing alert {}", a.id))(e)),
            }
        }
    }

    /// Waits for every alert produced so far, then writes the checkpoint: an alert is never
    /// behind a checkpoint that covers its change (at least once, duplicates carry one id).
    fn checkpoint(&mut self) -> Result<(), ProcessError> {
        for (id, f) in std::mem::take(&mut self.pending_alerts) {
            let res = self.handle.block_on(f);
            let reason = match res {
                Ok(Ok(_)) => continue,
                Ok(Err((e, _))) => e.to_string(),
                Err(_) => "the producer was dropped".to_owned(),
            };
            return Err(ProcessError::AlertUndelivered {
                id,
                topic: self.config.alerts_topic.clone(),
                reason,
            });
        }
        let path = self.config.checkpoint_path();
        write_checkpoint(&path, &self.state.save(&self.config.topic_prefix))?;
        // Also in the consumer group, so lag tools show where the processors are. The
        // checkpoint, not the group, is what a restart resumes from.
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &self.state.offsets.0 {
            let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "committing processor offsets to the group");
        }
        tracing::debug!(epoch = self.state.epoch, "processor checkpoint written");
        Ok(())
    }
}

/// Folds the change topics from `state`'s offsets until they are quiet, with no side effects
/// (no checkpoint, no alerts, no epochs): the self-check's way of reading the views.
pub(crate) fn catch_up(
    config: &ProcessorConfig,
    state: State,
    quiet: Duration,
) -> Result<(State, u64), ProcessError> {
    let handle = tokio::runtime::Handle::current();
    let mut p = Processor::new(config.clone(), handle, state, Until::Quiet(quiet))?;
    p.run()?;
    Ok((p.state, p.undecodable))
}
