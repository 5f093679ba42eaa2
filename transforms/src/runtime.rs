//! The processor loop: Kafka in, state folded, epochs and alerts out, checkpoints on disk.
//!
//! One thread owns the consumer and the [`State`]; nothing else touches the state, so the fold
//! needs no locks. It closes an epoch as soon as it has read everything the consumer holds
//! (at most one per [`MIN_EPOCH_GAP`]), or after `epoch_interval` while messages keep coming:
//! views are brought up to date, changed views are published to the [`Catalog`] and the
//! [`Epoch`] is sent to the channel. A full channel (a slow sink) does not stop the fold or
//! the SQL views: epochs wait in the processor and are merged once `MAX_UNSENT` queue up, so
//! memory is bounded by the views' size. Every `checkpoint_interval` the state is written,
//! by a thread of its own ([`crate::checkpoint`]), with the offsets it reflects, once the
//! alerts produced so far are acked and the sinks stored its epoch (temp file, fsync,
//! rename: a crash leaves the old or the new checkpoint, never a torn one). On start the checkpoint is restored and the consumer
//! is positioned at its offsets, so after `kill -9` the changes after the checkpoint are read
//! and folded again, exactly once into the state.
//!
//! "Read again" must mean *every* change after the checkpoint, and a broker may not deliver
//! them from an offset inside a record batch: tansu 0.6 answers such a fetch with the next batch
//! (skipping the rest of this one) or, in the partition's last batch, with nothing. So reading
//! starts one message before each stored offset and a partition counts as aligned only once the
//! broker returned that message or an earlier one (those are dropped); a later first message, or
//! silence, seeks further back. Change topics are contiguous (idempotent, non-transactional
//! producer), so the same check on every message catches a skip mid-stream too
//! (`Processor::gap_check`).
//!
//! With view sinks ([`run_with`]) two more rules keep every sink exact across a crash:
//!
//! - **A checkpoint never gets ahead of the sinks.** For each one, the processor closes the
//!   epoch (so the checkpoint's offsets are an epoch boundary) and hands it to the sinks; the
//!   checkpoint writer writes the file only once the sinks report that epoch stored
//!   ([`SinkGate`]), while the fold goes on. Epochs whose views did not change are still
//!   sent, so a sink's stored offsets follow the input even through quiet stretches. A sink
//!   is therefore at or ahead of the checkpoint after any crash; one that is behind missed
//!   epochs (it was reset or left out of the config) and the caller refuses to start it.
//! - **Replay is cut where the sinks stand.** A sink ahead of the checkpoint holds the view as of
//!   its stored offsets `Y`. Replaying from the checkpoint `X`, an epoch spanning `Y` would carry
//!   the net change from `X` to its end, which misses a key that moved after `X` and came back
//!   before the end (the sink would keep its value at `Y`). So the sinks' positions ahead of the
//!   checkpoint become *cuts*: a message at or past a cut's offset for its partition is held
//!   back (not folded) until every partition of the cut has reached it, the epoch is closed
//!   exactly there (the state now equals the state at `Y`, which the sink skips as held), and
//!   the held messages are folded after it. A cut that cannot be reached within
//!   [`CUT_PATIENCE`] (the topic lost those offsets) is given up with a warning.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

pub use crate::group::Unit;
use crate::input::{self, Schemas, TABLES};
use crate::state::{Alert, RankShare, SafetyStock, Saved, State};
use crate::view::{Catalog, Epoch, Offsets, Snapshot, ViewDef};

/// How long replay waits to reach a sink's position before giving the cut up.
pub const CUT_PATIENCE: Duration = Duration::from_secs(30);

/// The shortest time between two epochs closed because the input was drained. Closing on
/// drain, not on a timer, is what keeps a change's way into SQL short (a timer adds half its
/// period on average); the gap bounds the epoch rate when changes trickle in one by one.
pub const MIN_EPOCH_GAP: Duration = Duration::from_millis(5);

/// Epochs held back while the sinks' channel is full before they are merged into one.
const MAX_UNSENT: usize = 64;

/// How long a stopping processor waits for the sinks before it exits without a final checkpoint
/// (the next start replays from the previous one).
pub(crate) const STOP_SINK_PATIENCE: Duration = Duration::from_secs(10);

/// What the view sinks report back to the processor: the last epoch all of them stored, or why
/// they cannot go on.
#[derive(Debug, Default)]
pub struct SinkGate {
    delivered: AtomicU64,
    failure: Mutex<Option<String>>,
    /// The epoch a checkpoint waits for: sinks that gather epochs into larger writes store it
    /// now rather than at their next turn.
    wanted: AtomicU64,
    wake: tokio::sync::Notify,
    /// The last epoch the processor closed (each goes to the sinks).
    closed: AtomicU64,
}

impl SinkGate {
    /// The processor closed `epoch`.
    pub fn closed(&self, epoch: u64) {
        self.closed.fetch_max(epoch, Ordering::SeqCst);
    }

    /// Epochs closed that not every sink has stored yet.
    pub fn backlog(&self) -> u64 {
        self.closed
            .load(Ordering::SeqCst)
            .saturating_sub(self.delivered_epoch())
    }

    /// Number of the last epoch every sink stored.
    pub fn delivered_epoch(&self) -> u64 {
        self.delivered.load(Ordering::SeqCst)
    }

    /// Every sink stored every epoch up to `epoch`.
    pub fn delivered(&self, epoch: u64) {
        self.delivered.fetch_max(epoch, Ordering::SeqCst);
    }

    /// A checkpoint waits for `epoch` to be stored.
    pub fn want(&self, epoch: u64) {
        if self.wanted.fetch_max(epoch, Ordering::SeqCst) < epoch {
            self.wake.notify_one();
        }
    }

    /// The last epoch a checkpoint asked for.
    pub fn wanted(&self) -> u64 {
        self.wanted.load(Ordering::SeqCst)
    }

    /// Returns when a checkpoint asks for a later epoch (at once if it did since the last call).
    pub async fn wanted_changed(&self) {
        self.wake.notified().await
    }

    /// The sinks cannot store epochs any more; the processor stops with this reason.
    pub fn fail(&self, reason: String) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        f.get_or_insert(reason);
    }

    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What a running processor has done, for its metrics endpoint. Updated with relaxed atomics on
/// the processor thread (a counter add per message, a lock per epoch for the positions).
#[derive(Debug, Default)]
pub struct ProcessorStats {
    /// Change messages folded.
    pub messages: AtomicU64,
    /// Messages skipped because they could not be decoded (logged with their offsets).
    pub undecodable: AtomicU64,
    pub epochs: AtomicU64,
    /// Number of the last epoch closed.
    pub epoch: AtomicU64,
    pub checkpoints: AtomicU64,
    /// Unix ms of the last checkpoint written (0: none yet by this process).
    pub last_checkpoint_ms: AtomicI64,
    /// Source commit time (Unix ms) of the newest change folded.
    pub newest_source_ms: AtomicI64,
    /// Next offset per partition as of the last epoch.
    pub positions: Mutex<Offsets>,
    /// Per change folded: its age (now minus its CreateTime) when the processor read it.
    pub read_age: crate::freshness::AgeHistogram,
    /// Per change folded: its age once the epoch holding it was published to SQL.
    pub visible_age: crate::freshness::AgeHistogram,
    /// The units whose processors run here now (`all` for one processor over everything).
    pub units: Mutex<std::collections::BTreeSet<String>>,
    /// The sink gate of each unit running here that feeds view sinks.
    pub gates: Mutex<std::collections::BTreeMap<String, Arc<SinkGate>>>,
    /// The reader of other members' units ([`crate::remote`]), in a group member.
    pub remote: crate::remote::RemoteStats,
}

impl ProcessorStats {
    /// The most epochs any unit's sinks are behind.
    pub fn sink_backlog(&self) -> u64 {
        let gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        gates.values().map(|g| g.backlog()).max().unwrap_or(0)
    }

    /// Why a unit's sinks cannot go on, if one's cannot.
    pub fn sink_failure(&self) -> Option<String> {
        let gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        gates.values().find_map(|g| g.failure())
    }

    pub fn positions(&self) -> Offsets {
        self.positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The view sinks a processor feeds (see the module doc).
#[derive(Debug)]
pub struct SinkFeed {
    /// Each sink's stored offsets (empty for a sink that holds nothing yet).
    pub positions: Vec<Offsets>,
    pub gate: Arc<SinkGate>,
}

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
    /// `fetch.wait.max.ms` of the consumers that read the input: how long the broker may
    /// hold a fetch that finds nothing new.
    pub fetch_wait: Duration,
    pub safety_stock: SafetyStock,
    /// Where oversell alerts go (default `<prefix>.alerts.oversell`).
    pub alerts_topic: String,
    pub alerts_partitions: i32,
    /// How to connect (`security.*`, `sasl.*`, `ssl.*` librdkafka properties), for every
    /// client the processor makes.
    pub kafka_properties: Vec<(String, String)>,
    /// The share of the input this processor reads ([`Unit::All`] unless instances share the
    /// partitions, see [`crate::group`]).
    pub unit: Unit,
    /// The topic prefix of the Kafka view sink (`<prefix>.view.<name>`), when one is
    /// configured: a group member serves the units other members fold from there
    /// ([`crate::remote`]).
    pub view_topic_prefix: Option<String>,
}

impl ProcessorConfig {
    /// A librdkafka config with the brokers and the connection properties.
    pub(crate) fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.kafka_properties {
            c.set(k, v);
        }
        c
    }

    pub fn checkpoint_path(&self) -> PathBuf {
        self.unit_checkpoint_path(self.unit)
    }

    /// Where the processor of `unit` keeps its checkpoint.
    pub fn unit_checkpoint_path(&self, unit: Unit) -> PathBuf {
        let name = match unit {
            Unit::All => format!("{}.checkpoint.json", self.group_id),
            u => format!("{}.{}.checkpoint.json", self.group_id, u.name()),
        };
        self.checkpoint_dir.join(name)
    }

    /// Checkpoints of shard processors in the checkpoint directory (of any shard count).
    pub fn shard_checkpoints(&self) -> Vec<PathBuf> {
        let Ok(dir) = std::fs::read_dir(&self.checkpoint_dir) else {
            return Vec::new();
        };
        let prefix = format!("{}.", self.group_id);
        let mut found: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix(&prefix))
                    .and_then(|n| n.strip_suffix(".checkpoint.json"))
                    .is_some_and(|u| Unit::parse(u).is_some_and(|u| u != Unit::All))
            })
            .collect();
        found.sort();
        found
    }

    fn topic(&self, table: &str) -> String {
        format!("{}.{}", self.topic_prefix, table)
    }

    /// The compacted topic where the customer units of a group exchange their
    /// [`RankShare`]s: `<topic_prefix>.processors.<group_id>.customer-ranks`.
    pub fn rank_topic(&self) -> String {
        self.topic(&crate::group::rank_table(&self.group_id))
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
    #[error("{0}")]
    Sink(String),
    #[error("{0}")]
    Refused(String),
}

fn kafka(what: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> ProcessError {
    let what = what.into();
    move |source| ProcessError::Kafka { what, source }
}

/// A running processor: the live views and the epoch stream.
pub struct Running {
    pub catalog: Arc<Catalog>,
    /// The offsets of the checkpoint the processor started from (empty without one).
    pub restored: Offsets,
    pub stats: Arc<ProcessorStats>,
    /// Every epoch, in order. Drain it (a full channel pauses the processor) or drop it.
    pub epochs: mpsc::Receiver<Epoch>,
    worker: Worker,
}

impl Running {
    /// Stops at the next poll, closing the epoch and writing a final checkpoint.
    pub async fn stop(self) -> Result<(), ProcessError> {
        self.worker.stop().await
    }

    /// Waits for the processor to end (only an error ends it without [`Running::stop`]).
    pub async fn join(self) -> Result<(), ProcessError> {
        self.worker.join().await
    }

    pub fn stopper(&self) -> Arc<AtomicBool> {
        self.worker.stop.clone()
    }

    /// [`Running::stop`] from a thread outside the async runtime.
    pub fn stop_blocking(self) -> Result<(), ProcessError> {
        self.worker.stop.store(true, Ordering::SeqCst);
        self.worker
            .thread
            .join()
            .map_err(|_| ProcessError::Panicked)?
    }

    /// True once the processor thread ended (an error, or a stop).
    pub fn finished(&self) -> bool {
        self.worker.thread.is_finished()
    }
}

/// A thread that runs until its stop flag is set or it fails.
pub(crate) struct Worker {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) thread: std::thread::JoinHandle<Result<(), ProcessError>>,
}

impl Worker {
    pub(crate) async fn stop(self) -> Result<(), ProcessError> {
        self.stop.store(true, Ordering::SeqCst);
        self.join().await
    }

    pub(crate) async fn join(self) -> Result<(), ProcessError> {
        let t = self.thread;
        tokio::task::spawn_blocking(move || t.join())
            .await
            .map_err(|_| ProcessError::Panicked)?
            .map_err(|_| ProcessError::Panicked)?
    }
}

/// Starts the processors (call inside a tokio runtime): restores the checkpoint, publishes the
/// restored views, then consumes the change topics until stopped.
pub fn run(config: ProcessorConfig) -> Result<Running, ProcessError> {
    run_with(config, None)
}

/// [`run`], feeding view sinks: replay is cut at their positions and checkpoints wait for them
/// (see the module doc). Epochs whose views did not change are sent too.
pub fn run_with(config: ProcessorConfig, sinks: Option<SinkFeed>) -> Result<Running, ProcessError> {
    run_into(config, sinks, Catalog::new(), Arc::default())
}

/// [`run_with`], publishing into `catalog` (under the unit's source) and counting into `stats`,
/// which other processors of this instance may share.
pub fn run_into(
    config: ProcessorConfig,
    sinks: Option<SinkFeed>,
    catalog: Arc<Catalog>,
    stats: Arc<ProcessorStats>,
) -> Result<Running, ProcessError> {
    let (tx, rx) = mpsc::channel(64);
    let stop = Arc::new(AtomicBool::new(false));
    let state = load_checkpoint(&config)?;
    publish_all(&state, &catalog, &config.unit.source())?;
    let restored = state.offsets.clone();
    let mut cuts: Vec<Offsets> = sinks
        .iter()
        .flat_map(|s| s.positions.iter())
        .filter(|p| !p.0.is_empty() && !restored.covers(p))
        .cloned()
        .collect();
    // Positions of one run's epochs are ordered component-wise; the sum orders them the same.
    cuts.sort_by_key(|c| c.0.values().sum::<i64>());
    cuts.dedup();
    if !cuts.is_empty() {
        tracing::info!(
            cuts = cuts.len(),
            "replay will close epochs where the view sinks stand"
        );
    }
    let gate = sinks.map(|s| s.gate);
    // The sinks hold the restored epoch (a checkpoint is never ahead of them), so a backlog
    // counts only the epochs after it.
    if let Some(g) = &gate {
        g.delivered(state.epoch);
        g.closed(state.epoch);
    }
    stats
        .positions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .advance(&restored);
    stats.epoch.store(state.epoch, Ordering::Relaxed);
    // What the metrics endpoint reads per unit, until the unit's processor ends.
    let unit = config.unit.name();
    lock_stats(&stats.units).insert(unit.clone());
    if let Some(g) = &gate {
        lock_stats(&stats.gates).insert(unit.clone(), g.clone());
    }
    let st = stats.clone();
    let handle = tokio::runtime::Handle::current();
    let (c, s, cat) = (config.clone(), stop.clone(), catalog.clone());
    let thread = std::thread::Builder::new()
        .name(format!("walbridge-processors-{}", config.unit.name()))
        .spawn(move || {
            let stats = st.clone();
            let run = || {
                let mut p = Processor::new(c, handle, state, Until::Stopped(s))?;
                p.catalog = Some(cat);
                p.epochs = Some(tx);
                p.alerts = true;
                p.checkpoints = true;
                p.cuts = cuts.into();
                p.gate = gate;
                p.stats = st;
                p.run()
            };
            let done = run();
            lock_stats(&stats.units).remove(&unit);
            lock_stats(&stats.gates).remove(&unit);
            done
        })
        .map_err(|e| ProcessError::Checkpoint {
            path: PathBuf::new(),
            what: format!("cannot start the processor thread: {e}"),
        })?;
    Ok(Running {
        catalog,
        restored,
        stats,
        epochs: rx,
        worker: Worker { stop, thread },
    })
}

fn lock_stats<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads the checkpoint, or a fresh state when there is none.
pub fn load_checkpoint(config: &ProcessorConfig) -> Result<State, ProcessError> {
    let path = config.checkpoint_path();
    // One processor over everything and shard processors each hold the input they read; a
    // start in the other mode would read some of it twice or not at all.
    let other = match config.unit {
        Unit::All => config.shard_checkpoints().into_iter().next(),
        _ => Some(config.unit_checkpoint_path(Unit::All)).filter(|p| p.exists()),
    };
    if let Some(other) = other {
        return Err(ProcessError::Checkpoint {
            path: other,
            what: format!(
                "was written by processors of group {} running with processors.instances: {}; \
                 set it back, or move the group's checkpoints away to rebuild the views from the topics",
                config.group_id,
                if config.unit == Unit::All {
                    "group"
                } else {
                    "single"
                }
            ),
        });
    }
    // Before the customer side sharded, one unit `customers` read all of it.
    let unsharded = config
        .checkpoint_dir
        .join(format!("{}.customers.checkpoint.json", config.group_id));
    if matches!(config.unit, Unit::Customers(_)) && unsharded.exists() {
        return Err(ProcessError::Checkpoint {
            path: unsharded,
            what: "is the checkpoint of the unsharded customer unit of an earlier walbridge; \
                   the customer side now runs as units customers-<partition>, which rebuild \
                   their views from the topics once this file is moved away"
                .into(),
        });
    }
    let scope = config.unit.summary_scope();
    let Some(saved) = read_saved(config, &path)? else {
        return Ok(State::new_as(config.safety_stock.clone(), &scope));
    };
    let state = State::restore_as(saved, config.safety_stock.clone(), &scope)?;
    tracing::info!(path = %path.display(), epoch = state.epoch, partitions = state.offsets.0.len(), "checkpoint restored");
    Ok(state)
}

/// The state of the whole group: its one checkpoint, or the union of its shards' checkpoints
/// when its instances share the partitions (for `walbridge views check`).
pub fn load_merged(config: &ProcessorConfig) -> Result<State, ProcessError> {
    let shards = config.shard_checkpoints();
    if shards.is_empty() {
        return load_checkpoint(config);
    }
    let mut all: Option<Saved> = None;
    for path in shards {
        if let Some(saved) = read_saved(config, &path)? {
            match &mut all {
                Some(a) => a.absorb(saved),
                None => all = Some(saved),
            }
        }
    }
    match all {
        Some(mut saved) => {
            // The rank shares' positions: no change topic, and each shard's own.
            let ranks = config.rank_topic();
            saved.offsets.retain(|(t, _, _)| *t != ranks);
            Ok(State::restore(saved, config.safety_stock.clone())?)
        }
        None => Ok(State::new(config.safety_stock.clone())),
    }
}

/// A checkpoint file, or `None` when there is none.
fn read_saved(config: &ProcessorConfig, path: &Path) -> Result<Option<Saved>, ProcessError> {
    let err = |what: String| ProcessError::Checkpoint {
        path: path.to_owned(),
        what,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
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
    Ok(Some(saved))
}

pub(crate) fn write_checkpoint(path: &Path, saved: &Saved) -> Result<(), ProcessError> {
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

fn publish_all(state: &State, catalog: &Catalog, source: &str) -> Result<(), ProcessError> {
    catalog.publish_epoch(
        source,
        state.views().iter().map(|v| snapshot_of(state, v)),
        &state.offsets,
    );
    Ok(())
}

/// A view as the state holds it now, to publish.
fn snapshot_of<'a>(state: &State, v: &'a crate::table::ViewTable) -> (&'a ViewDef, Snapshot) {
    (
        &v.def,
        Snapshot {
            epoch: state.epoch,
            offsets: state.offsets.clone(),
            rows: v.published(),
        },
    )
}

/// The end of a partition as the consumer last heard it from the broker (every fetch answer
/// carries it), without asking the broker again: `None` before an answer for the partition.
/// rdkafka 0.38 exposes only the asking variant (a round trip per partition, too slow for the
/// fold's thread), so librdkafka's cached value is read directly.
fn high_watermark(consumer: &BaseConsumer, topic: &str, partition: i32) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client handle lives as long as `consumer`, the topic is a NUL-terminated
    // string that outlives the call, and librdkafka only writes the two integers.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

/// A message's value and the index of its change in the source transaction.
type Payload = (Vec<u8>, Option<u32>);

/// The index in its transaction of the change a message carries: the part after the last `:`
/// of its `walbridge.event_id` header (`<commit LSN>:<index>`), see `State::apply_at`.
fn event_index(m: &rdkafka::message::BorrowedMessage<'_>) -> Option<u32> {
    use rdkafka::message::Headers;
    let headers = m.headers()?;
    headers
        .iter()
        .find(|h| h.key == "walbridge.event_id")
        .and_then(|h| h.value)
        .and_then(input::event_index)
}

/// How long a re-read partition may stay silent before it is read from further back.
const CHASE_PATIENCE: Duration = Duration::from_millis(300);

/// A partition being read again until the broker answers at or before `want`.
#[derive(Clone, Copy, Debug)]
struct Chase {
    /// The next offset to fold.
    want: i64,
    /// Where this re-read started.
    from: i64,
    /// A message before `want` came since: the read is aligned.
    seen_before: bool,
    sought: Instant,
}

impl Chase {
    fn new(want: i64, from: i64) -> Chase {
        Chase {
            want,
            from,
            seen_before: false,
            sought: Instant::now(),
        }
    }
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
    /// A group unit's processor has read its input to the end once and told the catalog
    /// ([`Catalog::reached_end`]); one processor over everything has nothing to tell, so the
    /// read loop never asks.
    reached_end: bool,
    /// The partitions of the orders topic this processor reads.
    orders_parts: Vec<i32>,
    catalog: Option<Arc<Catalog>>,
    epochs: Option<mpsc::Sender<Epoch>>,
    alerts: bool,
    checkpoints: bool,
    producer: Option<FutureProducer>,
    pending_alerts: Vec<(String, rdkafka::producer::DeliveryFuture)>,
    pub(crate) undecodable: u64,
    /// Messages folded since the last epoch closed.
    since_epoch: u64,
    /// Sink positions ahead of the checkpoint, in order: replay closes an epoch at each.
    cuts: VecDeque<Offsets>,
    /// Messages at or past the first cut, waiting until every partition reached it.
    held: Vec<(String, i32, i64, Option<Payload>)>,
    cut_since: Option<Instant>,
    /// Partitions being read again after a gap or from a stored offset, until the broker
    /// answered at or before the offset wanted (see [`Self::gap_check`]).
    gap_chase: std::collections::HashMap<(String, i32), Chase>,
    gate: Option<Arc<SinkGate>>,
    /// Number of the last epoch sent to the sinks.
    last_sent: u64,
    /// Epochs closed while the sinks' channel was full, oldest first (see [`Self::send_epochs`]).
    unsent: Vec<Epoch>,
    /// Writes checkpoints off this thread (when checkpointing; see [`crate::checkpoint`]).
    writer: Option<crate::checkpoint::Writer>,
    stats: Arc<ProcessorStats>,
    /// CreateTimes (Unix ms) of the changes read since the last epoch closed, for
    /// [`ProcessorStats::visible_age`].
    epoch_created: Vec<i64>,
    /// A customer unit's producer of its rank shares, and the last share it sent.
    ranks: Option<(
        rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
        Option<RankShare>,
    )>,
}

/// The table index standing for the rank shares topic in [`Processor::topics`].
const RANKS: usize = usize::MAX;
/// The orders' index in [`TABLES`].
const ORDERS: usize = 2;

/// A rank share as the topic carries it (the shard's name travels in the value too, so the
/// fold needs no message key).
#[derive(serde::Serialize, serde::Deserialize)]
struct RankMessage {
    shard: String,
    share: RankShare,
}

impl Processor {
    pub(crate) fn new(
        config: ProcessorConfig,
        handle: tokio::runtime::Handle,
        state: State,
        until: Until,
    ) -> Result<Processor, ProcessError> {
        let consumer: BaseConsumer = config
            .client()
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("allow.auto.create.topics", "false")
            // tansu holds every fetch for the whole wait, data or not, so this is part of the
            // delay before a change is read; a Kafka broker answers as soon as data arrives and
            // the value only sets how often an idle consumer asks.
            .set(
                "fetch.wait.max.ms",
                config.fetch_wait.as_millis().to_string(),
            )
            .create()
            .map_err(kafka("creating the consumer"))?;
        let registry = RegistryClient::new(&config.registry_url)?;
        let all = config.unit == Unit::All;
        debug_assert_eq!(TABLES[ORDERS], "oms.orders");
        let mut topics: Vec<(String, usize)> = TABLES
            .iter()
            .enumerate()
            .filter(|(_, t)| config.unit.reads(t))
            .map(|(i, t)| (config.topic(t), i))
            .collect();
        if matches!(config.unit, Unit::Customers(_)) {
            topics.push((config.rank_topic(), RANKS));
        }
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
            reached_end: all,
            orders_parts: Vec::new(),
            catalog: None,
            epochs: None,
            alerts: false,
            checkpoints: false,
            producer: None,
            pending_alerts: Vec::new(),
            undecodable: 0,
            since_epoch: 0,
            cuts: VecDeque::new(),
            held: Vec::new(),
            cut_since: None,
            gap_chase: Default::default(),
            gate: None,
            last_sent: 0,
            unsent: Vec::new(),
            writer: None,
            stats: Arc::default(),
            epoch_created: Vec::new(),
            ranks: None,
        })
    }

    /// Assigns every partition of the change topics that exist, at the state's offsets (the
    /// beginning for partitions the state has not seen). Returns how many partitions.
    fn assign(&mut self) -> Result<usize, ProcessError> {
        let parts = partitions_of(&self.consumer, &self.topics)?;
        self.assign_partitions(&parts)
    }

    fn assign_partitions(&mut self, parts: &[(String, i32)]) -> Result<usize, ProcessError> {
        let mut tpl = TopicPartitionList::new();
        let mut chase = std::collections::HashMap::new();
        let unit = self.config.unit;
        let prefix = format!("{}.", self.config.topic_prefix);
        let read = |t: &str, p: i32| unit.reads_partition(t.strip_prefix(&prefix).unwrap_or(t), p);
        for (topic, p) in parts.iter().filter(|(t, p)| read(t, *p)) {
            // A stored offset may lie inside a record batch, which tansu answers with the next
            // batch, or with nothing when it is the partition's last: the tail would be lost
            // until more changes come. So reading starts one message early, and the partition
            // is chased back until the broker answers with that message or an earlier one.
            let at = match self.state.offsets.0.get(&(topic.clone(), *p)) {
                Some(&o) if o > 0 => {
                    chase.insert((topic.clone(), *p), Chase::new(o, o - 1));
                    Offset::Offset(o - 1)
                }
                Some(&o) => Offset::Offset(o),
                None => Offset::Beginning,
            };
            tpl.add_partition_offset(topic, *p, at)
                .map_err(kafka("building the assignment"))?;
        }
        let orders = self.config.topic("oms.orders");
        self.orders_parts = parts
            .iter()
            .filter(|(t, p)| *t == orders && read(t, *p))
            .map(|(_, p)| *p)
            .collect();
        let n = tpl.count();
        if n != self.assigned {
            self.consumer
                .assign(&tpl)
                .map_err(kafka("assigning partitions"))?;
            self.gap_chase = chase;
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
        if self.checkpoints && matches!(self.config.unit, Unit::Customers(_)) {
            let producer = self.rank_producer()?;
            self.ranks = Some((producer, None));
            // A share from before this start (or from an earlier run) is replaced at once.
            self.send_rank_share();
        }
        if self.checkpoints && self.writer.is_none() {
            // The writer's replica starts from the whole state (once); after that the
            // checkpoints hand over only what changed.
            let replica =
                crate::checkpoint::Replica::new(self.state.save(&self.config.topic_prefix));
            self.state.track_checkpoint_changes(true);
            let alerts = self.alerts.then(|| crate::checkpoint::Alerts {
                handle: self.handle.clone(),
                topic: self.config.alerts_topic.clone(),
            });
            let stop = match &self.until {
                Until::Stopped(s) => Some(s.clone()),
                Until::Quiet(_) => None,
            };
            self.writer = Some(crate::checkpoint::Writer::start(
                self.config.checkpoint_path(),
                replica,
                self.stats.clone(),
                alerts,
                stop,
            )?);
        }
        self.assign()?;
        let started = Instant::now();
        let mut last_message = Instant::now();
        let mut next_epoch = Instant::now() + self.config.epoch_interval;
        // The earliest time an epoch may close because the input is drained.
        let mut next_drain_close = Instant::now();
        // When a group unit's processor next asks whether it has read its input to the end.
        let mut next_end_check = Instant::now();
        let mut next_checkpoint = Instant::now() + self.config.checkpoint_interval;
        // When the checkpoint now put off first fell due.
        let mut checkpoint_due: Option<Instant> = None;
        // Partitions that appear later (a topic created after the start, more partitions) are
        // found by a thread of its own: a metadata request takes tens of milliseconds, which
        // would delay every change in flight if the fold waited for it.
        let watch = MetadataWatch::start(&self.config, self.topics.clone())?;
        let mut saved_offsets = self.state.offsets.clone();
        loop {
            if self.stopped() {
                break;
            }
            if !self.unsent.is_empty() {
                self.send_epochs(false)?;
            }
            if !self.gap_chase.is_empty() {
                self.chase_silent()?;
            }
            if let Until::Quiet(q) = self.until
                && started.elapsed() > Duration::from_secs(4)
                && last_message.elapsed() > q
                && !self.chasing()
            {
                break;
            }
            let now = Instant::now();
            if let Some(parts) = watch.latest() {
                self.assign_partitions(&parts)?;
            }
            // With changes folded and not yet published, only wait until a close on drain is
            // allowed; otherwise until the timer.
            let wait = if self.since_epoch > 0 {
                next_drain_close.saturating_duration_since(now)
            } else {
                next_epoch.saturating_duration_since(now)
            }
            .min(Duration::from_millis(100));
            let mut drained = false;
            match self.consumer.poll(wait) {
                None => drained = true,
                Some(m) => match m {
                    Ok(m) => {
                        last_message = Instant::now();
                        let (topic, part, off) = (m.topic().to_owned(), m.partition(), m.offset());
                        let created = m.timestamp().to_millis();
                        // Copied so the message's borrow of the consumer ends before the fold.
                        let payload = m.payload().map(|p| (p.to_vec(), event_index(&m)));
                        drop(m);
                        let taken = self.since_epoch;
                        self.take(topic, part, off, payload)?;
                        // Timed when folded now: not a duplicate dropped while aligning, nor
                        // one held back at a replay's cut (folded later, untimed).
                        if let Some(created) = created
                            && self.since_epoch > taken
                        {
                            self.stats.read_age.observe_ms(unix_ms() - created);
                            self.epoch_created.push(created);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "processor consumer poll"),
                },
            }
            if !self.cuts.is_empty() {
                self.at_cuts()?;
            }
            let now = Instant::now();
            if drained && !self.reached_end && now >= next_end_check {
                next_end_check = now + Duration::from_millis(100);
                self.check_reached_end();
            }
            let on_drain = drained && self.since_epoch > 0 && now >= next_drain_close;
            if now >= next_epoch || on_drain {
                if self.since_epoch > 0 {
                    self.close_epoch()?;
                }
                // While a backlog is folded (no drain), epochs stretch so that closing them takes
                // at most a fifth of the time. A close on drain does not stretch the next one:
                // the backlog that made it large is gone, and time spent closing while caught up
                // costs no throughput (falling behind ends the drains, and the stretch is back).
                let cost = now.elapsed();
                next_epoch = Instant::now() + self.config.epoch_interval.max(cost * 4);
                next_drain_close = Instant::now() + MIN_EPOCH_GAP;
            }
            if self.checkpoints && now >= next_checkpoint {
                // The writer's failure (a sink, an alert, the disk) stops the processor even
                // while no checkpoint is due for lack of input.
                if let Some(w) = &self.writer {
                    w.failure()?;
                }
                // A checkpoint's epoch goes to the sinks first. While their channel is full
                // (a first full copy, a slow transaction) it is put off, so the views keep
                // moving; put off too long, it waits for room.
                let due = *checkpoint_due.get_or_insert(now);
                let may_put_off = due.elapsed() < self.config.checkpoint_interval * 5;
                if self.state.offsets == saved_offsets {
                    checkpoint_due = None;
                    next_checkpoint = now + self.config.checkpoint_interval;
                } else if self.checkpoint(may_put_off)? {
                    saved_offsets = self.state.offsets.clone();
                    checkpoint_due = None;
                    next_checkpoint = now + self.config.checkpoint_interval;
                } else {
                    next_checkpoint = now + Duration::from_millis(50);
                }
            }
        }
        // Held messages stay unfolded: their offsets were not advanced, so they are read again.
        if self.since_epoch > 0 {
            self.close_epoch()?;
        }
        if self.checkpoints && self.state.offsets != saved_offsets {
            self.checkpoint(false)?;
        }
        // The last share is out before the unit can move to another member.
        if let Some((producer, _)) = &self.ranks
            && let Err(e) = rdkafka::producer::Producer::flush(producer, Duration::from_secs(10))
        {
            tracing::warn!(error = %e, "the last rank share was not acknowledged; the unit's next owner sends it again");
        }
        // The last checkpoint is on disk when the processor returns.
        if let Some(w) = self.writer.take() {
            // Stopping, the sinks get a bounded time to store the last epochs; a run that
            // ended because its input went quiet waits for them.
            w.finish(self.stopped().then_some(STOP_SINK_PATIENCE))?;
        }
        Ok(())
    }

    /// Change topics are contiguous (walbridge's producer is idempotent, not transactional), so
    /// a message past the next offset expected means the broker skipped some. tansu 0.6 does:
    /// it answers a fetch from inside a record batch with the *next* batch (its dynostore lists
    /// batches by base offset `>=` the offset asked), and under concurrent produce requests a
    /// fetch can also see a later batch before an earlier one. Either way the skipped messages
    /// would be lost to the views without a trace. So the partition is sought back (twice as
    /// far each time) until a message at or before the expected offset comes, and what lies
    /// before it is dropped. A gap that stays after messages before it were seen is real (a
    /// compacted topic), and so is one that reaches the partition's start: it is accepted.
    /// Returns true when the message is to be dropped.
    fn gap_check(&mut self, key: &(String, i32), off: i64) -> Result<bool, ProcessError> {
        if let Some(&Chase {
            want,
            from,
            seen_before,
            ..
        }) = self.gap_chase.get(key)
        {
            if off < want {
                if let Some(c) = self.gap_chase.get_mut(key) {
                    c.seen_before = true;
                }
                return Ok(true);
            }
            if off == want || seen_before || from == 0 {
                if off > want {
                    tracing::warn!(topic = %key.0, partition = key.1, expected = want, first = off, "messages missing in the topic (compacted or deleted); going on from the next one");
                }
                self.gap_chase.remove(key);
                return Ok(false);
            }
            return self.seek_back(key, want, from, off);
        }
        let Some(&expected) = self.state.offsets.0.get(key) else {
            return Ok(false);
        };
        if off < expected {
            // Already folded (read again after a seek).
            return Ok(true);
        }
        if off == expected || self.held.iter().any(|h| h.0 == key.0 && h.1 == key.1) {
            return Ok(false);
        }
        self.seek_back(key, expected, expected, off)
    }

    fn seek_back(
        &mut self,
        key: &(String, i32),
        want: i64,
        from: i64,
        got: i64,
    ) -> Result<bool, ProcessError> {
        // Twice as far back as last time (at least 64 messages).
        let dist = (want - from).max(got - want).max(32);
        let back = (want - 2 * dist).max(0);
        tracing::info!(
            topic = %key.0,
            partition = key.1,
            wanted = want,
            got = (got != want).then_some(got),
            from = back,
            "the broker answered past the offset expected, or not at all; reading the partition again from further back"
        );
        self.consumer
            .seek(&key.0, key.1, Offset::Offset(back), Duration::from_secs(10))
            .map_err(kafka("seeking back to the offset expected"))?;
        self.gap_chase.insert(key.clone(), Chase::new(want, back));
        Ok(true)
    }

    /// A chased partition the broker has not answered for [`CHASE_PATIENCE`] is read from
    /// further back: its read starts inside the partition's last batch (see
    /// [`Self::assign_partitions`]).
    fn chase_silent(&mut self) -> Result<(), ProcessError> {
        let silent: Vec<((String, i32), Chase)> = self
            .gap_chase
            .iter()
            .filter(|(_, c)| !c.seen_before && c.sought.elapsed() >= CHASE_PATIENCE)
            .map(|(k, c)| (k.clone(), *c))
            .collect();
        for (key, c) in silent {
            if c.from == 0 {
                // The whole partition was asked for and nothing came: nothing to align with.
                self.gap_chase.remove(&key);
            } else {
                self.seek_back(&key, c.want, c.from, c.want)?;
            }
        }
        Ok(())
    }

    /// Whether every assigned partition has been folded up to the end the consumer last
    /// heard of from the broker (its high watermark; unknown before a fetch answered it).
    fn read_to_end(&self) -> bool {
        let Ok(assignment) = self.consumer.assignment() else {
            return false;
        };
        let parts = assignment.elements();
        !parts.is_empty()
            && parts.iter().all(|e| {
                high_watermark(&self.consumer, e.topic(), e.partition()).is_some_and(|high| {
                    let key = (e.topic().to_owned(), e.partition());
                    self.state.offsets.0.get(&key).copied().unwrap_or(0) >= high
                })
            })
    }

    /// A group unit's processor that has folded and published its input to the end tells the
    /// catalog once, so a copy of the unit from the view topics that claims offsets past that
    /// end is not served in its place (see `Published::choose` in [`crate::view`]).
    fn check_reached_end(&mut self) {
        let Some(catalog) = &self.catalog else {
            return;
        };
        if self.reached_end || self.since_epoch > 0 || !self.cuts.is_empty() || self.chasing() {
            return;
        }
        if self.read_to_end() {
            self.reached_end = true;
            catalog.reached_end(&self.config.unit.source());
            tracing::debug!(unit = %self.config.unit.name(), "unit read to the end of its input");
        }
    }

    /// True while a partition still waits for the broker to answer at or before its offset.
    fn chasing(&self) -> bool {
        self.gap_chase.values().any(|c| !c.seen_before)
    }

    /// Folds a message, or holds it back when it lies at or past the first cut.
    fn take(
        &mut self,
        topic: String,
        part: i32,
        off: i64,
        payload: Option<Payload>,
    ) -> Result<(), ProcessError> {
        let key = (topic, part);
        if self.gap_check(&key, off)? {
            return Ok(());
        }
        self.take_checked(key.0, part, off, payload)
    }

    fn take_checked(
        &mut self,
        topic: String,
        part: i32,
        off: i64,
        payload: Option<Payload>,
    ) -> Result<(), ProcessError> {
        if let Some(cut) = self.cuts.front()
            && cut.0.get(&(topic.clone(), part)).is_some_and(|t| off >= *t)
        {
            self.held.push((topic, part, off, payload));
            return Ok(());
        }
        if let Some((payload, index)) = payload {
            self.fold(&topic, part, off, &payload, index)?;
        }
        self.state.offsets.0.insert((topic, part), off + 1);
        self.since_epoch += 1;
        self.stats.messages.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Closes the epoch at each cut every partition has reached, then folds what was held.
    fn at_cuts(&mut self) -> Result<(), ProcessError> {
        while let Some(cut) = self.cuts.front() {
            let reached = cut.0.iter().all(|(tp, t)| {
                self.state.offsets.0.get(tp).is_some_and(|o| o >= t)
                    || self.held.iter().any(|h| h.0 == tp.0 && h.1 == tp.1)
            });
            if !reached {
                let since = *self.cut_since.get_or_insert_with(Instant::now);
                if since.elapsed() < CUT_PATIENCE {
                    return Ok(());
                }
                tracing::warn!(
                    waited_s = CUT_PATIENCE.as_secs(),
                    "replay did not reach a view sink's position (the topics no longer hold those offsets?); going on without the cut, so that sink may keep a value that changed and changed back until its key changes again"
                );
            } else if self.since_epoch > 0 {
                self.close_epoch()?;
            }
            self.cuts.pop_front();
            self.cut_since = None;
            for (topic, part, off, payload) in std::mem::take(&mut self.held) {
                self.take(topic, part, off, payload)?;
            }
        }
        Ok(())
    }

    fn fold(
        &mut self,
        topic: &str,
        part: i32,
        off: i64,
        payload: &[u8],
        index: Option<u32>,
    ) -> Result<(), ProcessError> {
        let Some(table) = self
            .topics
            .iter()
            .find(|(n, _)| n == topic)
            .map(|(_, i)| *i)
        else {
            return Ok(());
        };
        if table == RANKS {
            match serde_json::from_slice::<RankMessage>(payload) {
                Ok(m) if m.shard != self.config.unit.name() => {
                    self.state.set_rank_share(&m.shard, Some(m.share));
                }
                Ok(_) => {}
                Err(e) => {
                    self.undecodable += 1;
                    self.stats.undecodable.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(topic, partition = part, offset = off, error = %e, "rank share skipped: not a walbridge rank share");
                }
            }
            return Ok(());
        }
        let (id, datum) = match avro::wire::unframe(payload) {
            Ok(x) => x,
            Err(e) => {
                self.undecodable += 1;
                self.stats.undecodable.fetch_add(1, Ordering::Relaxed);
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
                    if table == ORDERS && ev.lsn > 0 {
                        self.state.read_orders_at(part, ev.lsn);
                    }
                    self.state.apply_at(ev, index);
                    self.stats
                        .newest_source_ms
                        .fetch_max(ev.ts_ms, Ordering::Relaxed);
                }
            }
            Err(e) => {
                self.undecodable += 1;
                self.stats.undecodable.fetch_add(1, Ordering::Relaxed);
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
        self.since_epoch = 0;
        let t = Instant::now();
        let out = self.state.finish_epoch()?;
        tracing::trace!(
            epoch = self.state.epoch,
            views = out.changes.len(),
            ms = t.elapsed().as_millis() as u64,
            "processor epoch closed"
        );
        self.stats.epochs.fetch_add(1, Ordering::Relaxed);
        self.stats.epoch.store(self.state.epoch, Ordering::Relaxed);
        if let Some(gate) = &self.gate {
            gate.closed(self.state.epoch);
        }
        self.stats
            .positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .advance(&self.state.offsets);
        if self.alerts {
            for a in &out.alerts {
                self.send_alert(a)?;
            }
        }
        self.send_rank_share();
        // A quiet epoch moves the position too: the views reflect the offsets read since.
        if let Some(catalog) = &self.catalog {
            let state = &self.state;
            catalog.publish_epoch(
                &self.config.unit.source(),
                out.changes
                    .iter()
                    .filter_map(|c| Some(snapshot_of(state, state.view(&c.view)?))),
                &state.offsets,
            );
        }
        // Sinks get quiet epochs too: their stored offsets must keep up with the checkpoint.
        if out.changes.is_empty() && self.gate.is_none() {
            self.observe_published();
            return Ok(());
        }
        self.observe_published();
        if self.epochs.is_some() {
            self.unsent.push(Epoch {
                number: self.state.epoch,
                offsets: self.state.offsets.clone(),
                changes: out.changes,
            });
            self.send_epochs(false)?;
        }
        Ok(())
    }

    /// The changes of the epoch just closed are in SQL now (an epoch that changed no view
    /// leaves SQL as right as it was).
    fn observe_published(&mut self) {
        let now = unix_ms();
        for created in self.epoch_created.drain(..) {
            self.stats.visible_age.observe_ms(now - created);
        }
    }

    /// Hands the closed epochs to the sinks' channel. When it is full (a sink is slower than
    /// the epochs, or busy with a first full copy), the epochs wait here and the processor goes
    /// on folding and publishing to SQL, so a query's freshness never waits for a sink. Past
    /// `MAX_UNSENT` they are merged into one ([`crate::view::coalesce`], exact for every
    /// sink), so memory stays bounded by the views' size, not by how long the sink is slow.
    /// `block`: wait for room instead (before a checkpoint, which must not pass the sinks).
    fn send_epochs(&mut self, block: bool) -> Result<(), ProcessError> {
        let Some(tx) = &self.epochs else {
            self.unsent.clear();
            return Ok(());
        };
        let mut sent = 0;
        let mut closed = false;
        for epoch in self.unsent.iter() {
            let res = if block {
                tx.blocking_send(epoch.clone()).map_err(|_| ())
            } else {
                match tx.try_reserve() {
                    Ok(permit) => {
                        permit.send(epoch.clone());
                        Ok(())
                    }
                    Err(mpsc::error::TrySendError::Full(())) => break,
                    Err(mpsc::error::TrySendError::Closed(())) => Err(()),
                }
            };
            if res.is_err() {
                closed = true;
                break;
            }
            self.last_sent = epoch.number;
            sent += 1;
        }
        self.unsent.drain(..sent);
        if closed {
            if let Some(g) = &self.gate {
                return Err(ProcessError::Sink(g.failure().unwrap_or_else(|| {
                    "the view sinks stopped taking epochs".to_owned()
                })));
            }
            // Without sinks a dropped receiver means nobody wants epochs: views go on.
            self.epochs = None;
            self.unsent.clear();
            return Ok(());
        }
        if self.unsent.len() >= MAX_UNSENT {
            let merged = crate::view::coalesce(std::mem::take(&mut self.unsent))?;
            self.unsent.push(merged);
        }
        Ok(())
    }

    fn alert_producer(&self) -> Result<FutureProducer, ProcessError> {
        let producer: FutureProducer = self
            .config
            .client()
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create()
            .map_err(kafka("creating the alert producer"))?;
        self.ensure_topic(
            &self.config.alerts_topic,
            self.config.alerts_partitions,
            &[],
        )?;
        Ok(producer)
    }

    /// A customer unit's producer of rank shares, after creating their topic: compacted (the
    /// latest share per shard is all a reader needs), one partition (every customer unit
    /// reads all shares), and kept a week before compaction, so that a replay from a
    /// checkpoint finds the shares it read before (see [`crate::group`]).
    fn rank_producer(
        &self,
    ) -> Result<
        rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
        ProcessError,
    > {
        self.ensure_topic(
            &self.config.rank_topic(),
            1,
            &[
                ("cleanup.policy", "compact"),
                ("min.compaction.lag.ms", "604800000"),
            ],
        )?;
        self.config
            .client()
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            // Never given up: a share that waits for the broker is still the latest one.
            .set("message.timeout.ms", "0")
            .create()
            .map_err(kafka("creating the rank share producer"))
    }

    /// Sends this unit's rank share when it changed since the last one sent. Enqueued, not
    /// awaited: shares of one unit go in order to one partition, so the latest wins. One that
    /// cannot be enqueued (librdkafka's queue is full while the broker is away, or the share
    /// outgrew the broker's message size) is logged and tried again at the next epoch; the
    /// other units keep drawing the line from this unit's last share meanwhile.
    fn send_rank_share(&mut self) {
        let Some((producer, last)) = &mut self.ranks else {
            return;
        };
        let share = self.state.rank_share();
        if last.as_ref() == Some(&share) {
            return;
        }
        let shard = self.config.unit.name();
        let value = serde_json::to_vec(&RankMessage {
            shard: shard.clone(),
            share: share.clone(),
        })
        .expect("a rank share serializes");
        let topic = self.config.rank_topic();
        let record = rdkafka::producer::BaseRecord::to(&topic)
            .key(&shard)
            .payload(&value);
        match producer.send(record) {
            Ok(()) => *last = Some(share),
            Err((e, _)) => {
                tracing::warn!(unit = %shard, topic, bytes = value.len(), error = %e, "the rank share was not sent; trying again at the next epoch");
            }
        }
    }

    /// Creates `name` unless it exists.
    fn ensure_topic(
        &self,
        name: &str,
        partitions: i32,
        configs: &[(&str, &str)],
    ) -> Result<(), ProcessError> {
        let admin: AdminClient<_> = self
            .config
            .client()
            .create()
            .map_err(kafka("creating the admin client"))?;
        let topic = configs.iter().fold(
            NewTopic::new(name, partitions, TopicReplication::Fixed(1)),
            |t, (k, v)| t.set(k, v),
        );
        let res = self
            .handle
            .block_on(admin.create_topics([&topic], &AdminOptions::new()))
            .map_err(kafka(format!("creating topic {name}")))?;
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
        Ok(())
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

    /// Hands a checkpoint to the writer, which writes it once every alert produced so far is
    /// acked and the sinks stored its epoch: an alert or a sink is never behind a checkpoint
    /// that covers its change (at least once, duplicates carry one id). False when it was put
    /// off (`may_put_off` and the sinks' channel is full).
    fn checkpoint(&mut self, may_put_off: bool) -> Result<bool, ProcessError> {
        let mut sinks = None;
        if let Some(gate) = self.gate.clone() {
            if let Some(f) = gate.failure() {
                return Err(ProcessError::Sink(f));
            }
            // The checkpoint's offsets must be an epoch boundary handed to the sinks; the
            // writer waits until they stored it (see [`crate::checkpoint`]).
            if self.since_epoch > 0 {
                self.close_epoch()?;
            }
            if may_put_off {
                self.send_epochs(false)?;
                if !self.unsent.is_empty() {
                    return Ok(false);
                }
            } else {
                self.send_epochs(true)?;
            }
            gate.want(self.last_sent);
            sinks = Some((gate, self.last_sent));
        }
        let t = Instant::now();
        let forgotten = self.state.forget_order_positions(&self.orders_parts);
        if forgotten > 0 {
            tracing::debug!(
                forgotten,
                held = self.state.order_positions(),
                "order positions no change to come can be before, dropped"
            );
        }
        let delta = self.state.take_delta();
        let delta_ms = t.elapsed().as_millis() as u64;
        let pending = crate::checkpoint::Pending {
            delta,
            sinks,
            alerts: std::mem::take(&mut self.pending_alerts),
        };
        match &mut self.writer {
            Some(w) => {
                if !w.send(pending)? {
                    return Ok(false);
                }
            }
            None => {
                return Err(ProcessError::Checkpoint {
                    path: self.config.checkpoint_path(),
                    what: "no checkpoint writer (a bug: checkpoints were not set up)".into(),
                });
            }
        }
        // Also in the consumer group, so lag tools show where the processors are. The
        // checkpoint, not the group, is what a restart resumes from.
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &self.state.offsets.0 {
            let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "committing processor offsets to the group");
        }
        tracing::trace!(
            epoch = self.state.epoch,
            delta_ms,
            "processor checkpoint handed to the writer"
        );
        Ok(true)
    }
}

/// The change topics' partitions as the broker reports them.
fn partitions_of(
    consumer: &BaseConsumer,
    topics: &[(String, usize)],
) -> Result<Vec<(String, i32)>, ProcessError> {
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(kafka("reading topic metadata"))?;
    let mut parts = Vec::new();
    for t in md.topics() {
        if topics.iter().any(|(n, _)| n == t.name()) {
            parts.extend(t.partitions().iter().map(|p| (t.name().to_owned(), p.id())));
        }
    }
    Ok(parts)
}

/// Now, in milliseconds since the Unix epoch (0 before it).
pub(crate) fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Every (topic, partition) of the change topics.
type Partitions = Vec<(String, i32)>;

/// Reads the change topics' partitions every 2 s on a thread of its own; the processor picks
/// up the newest list without waiting. The thread ends when the watch is dropped.
struct MetadataWatch {
    latest: Arc<Mutex<Option<Partitions>>>,
    stop: Arc<AtomicBool>,
}

impl MetadataWatch {
    fn start(config: &ProcessorConfig, topics: Vec<(String, usize)>) -> Result<Self, ProcessError> {
        let consumer: BaseConsumer = config
            .client()
            .create()
            .map_err(kafka("creating the metadata client"))?;
        let latest = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (out, stopped) = (latest.clone(), stop.clone());
        // A thread that cannot start leaves the assignment as it is: no new partitions.
        let started = std::thread::Builder::new()
            .name("processor-metadata".into())
            .spawn(move || {
                loop {
                    for _ in 0..20 {
                        std::thread::sleep(Duration::from_millis(100));
                        if stopped.load(Ordering::Relaxed) {
                            return;
                        }
                    }
                    match partitions_of(&consumer, &topics) {
                        Ok(parts) => *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(parts),
                        Err(e) => tracing::warn!(error = %e, "processor metadata refresh"),
                    }
                }
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot start the processor's metadata thread; new partitions are not picked up");
        }
        Ok(MetadataWatch { latest, stop })
    }

    /// The list read since the last call, if any.
    fn latest(&self) -> Option<Vec<(String, i32)>> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Drop for MetadataWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A processor config for tests: topic prefix `t`, group `g`, checkpoints in `dir`, and a
    /// broker and registry nobody listens at (nothing connects until it is used).
    pub(crate) fn config(dir: &Path, unit: Unit) -> ProcessorConfig {
        ProcessorConfig {
            brokers: "127.0.0.1:1".into(),
            topic_prefix: "t".into(),
            registry_url: "http://127.0.0.1:1".into(),
            group_id: "g".into(),
            checkpoint_dir: dir.to_owned(),
            epoch_interval: Duration::from_millis(50),
            checkpoint_interval: Duration::from_secs(1),
            fetch_wait: Duration::from_millis(10),
            safety_stock: Default::default(),
            alerts_topic: String::new(),
            alerts_partitions: 1,
            kafka_properties: Vec::new(),
            unit,
            view_topic_prefix: None,
        }
    }

    /// A group unit's processor with no broker behind it.
    fn processor(rt: &tokio::runtime::Runtime, unit: Unit) -> Processor {
        let config = config(&std::env::temp_dir(), unit);
        let state = State::new_as(SafetyStock::default(), &unit.name());
        Processor::new(
            config,
            rt.handle().clone(),
            state,
            Until::Quiet(Duration::ZERO),
        )
        .unwrap()
    }

    #[test]
    fn a_quiet_epoch_moves_the_units_position_so_it_takes_over_from_the_topics() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut p = processor(&rt, Unit::Skus(0));
        let catalog = Catalog::new();
        p.catalog = Some(catalog.clone());
        let view = crate::state::STOCK_BY_SKU;
        let def = crate::state::view_defs()
            .into_iter()
            .find(|d| d.name == view)
            .unwrap();
        // The former owner's last write, as read from the view topics: past the checkpoint.
        let ahead = Offsets(std::collections::BTreeMap::from([(
            ("t.wms.stock_levels".to_owned(), 0),
            40,
        )]));
        let rows = crate::table::ViewTable::new(def.clone()).published();
        catalog.publish_epoch(
            &crate::remote::remote_source("skus-0"),
            [(
                &def,
                Snapshot {
                    epoch: 9,
                    offsets: ahead.clone(),
                    rows,
                },
            )],
            &ahead,
        );
        // The processor starts from its checkpoint (here: nothing read yet).
        publish_all(&p.state, &catalog, &Unit::Skus(0).source()).unwrap();
        let restored = p.state.epoch;
        let served = || catalog.snapshots(view)[0].epoch;
        assert_eq!(
            served(),
            9,
            "the topics' copy while the processor is behind"
        );
        // A first epoch publishes what a fresh state holds (the unit's summary row); the next
        // one has nothing to publish.
        p.close_epoch().unwrap();
        assert_eq!(served(), 9);
        // It reads up to the former owner's position; no view changes (e.g. only other SKUs'
        // updates that left the numbers as they were), so the epoch publishes no rows.
        p.state.offsets = ahead;
        p.close_epoch().unwrap();
        assert_eq!(
            served(),
            restored,
            "the processor's copy (its last published rows) once its position got there"
        );
    }
}
