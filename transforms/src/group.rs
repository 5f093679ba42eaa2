//! Instances that share the partitions (`processors.instances: group`): scale-out steps 1 to 5
//! (see the crate doc).
//!
//! # Units
//!
//! The input is cut into *units*, each folded by a processor of its own ([`crate::runtime`],
//! unchanged) with its own checkpoint file:
//!
//! - `skus-<i>`: partition *i* of the four topics routed by SKU (`oms.products`,
//!   `oms.order_lines`, `oms.inventory_cache`, `wms.stock_levels`). The producer routes all
//!   four by the SKU (`kafka.partition_by`), over equal partition counts, so a unit holds every
//!   row of its SKUs and nothing of the others: its stock views and diffs are exactly the
//!   rows of those SKUs in the one-processor views, and its reconciliation summary is their
//!   part of the whole ([`crate::state::merge_summaries`] adds the parts up).
//! - `customers-<i>`: partition *i* of `oms.customers` and `oms.orders`, routed by the customer
//!   (`[id]`, `[customer_id]`), and every partition of `oms.returns`, which name an order, not
//!   a customer: the unit counts every return by order id and uses the counts of its own
//!   orders. The top-5 % segment ranks all customers, so the customer units exchange their
//!   [`crate::state::RankShare`]s through a compacted topic ([`rank_table`]), which each reads
//!   whole as one more input; once no share changes, every unit draws the line one processor
//!   would. A share is sent when it changes, so a unit's segments may lag the others' changes
//!   by one round trip through the broker.
//!
//! # Who folds which unit
//!
//! Every instance joins the Kafka consumer group `processors.group_id`, subscribed to
//! `wms.stock_levels` with the cooperative-sticky assignor: owning partition *i* means folding
//! `skus-<i>` and `customers-<i>` (subscribing to a customer topic as well made the assignor
//! balance partition counts, which gave one member every SKU unit and the other only the
//! customers). The member consumer itself reads nothing (its
//! partitions are paused). The rebalancing is incremental: a member revokes only the units that
//! move to another one, and its other units fold on through the rebalance.
//!
//! # Why a unit is never folded twice, nor lost
//!
//! A unit's checkpoint is its whole state, so a unit can move to another instance as long as
//! the new owner starts from the old owner's *last* checkpoint. Two rules keep that:
//!
//! - On a revocation the old owner stops the unit's processor, which closes its epoch and
//!   writes a final checkpoint, before the rebalance callback returns, that is before the member
//!   rejoins the group and so before anyone can be given the unit.
//! - A processor runs a unit only while holding the unit's lock file (`flock`) in the shared
//!   checkpoint directory. A broker that hands the unit on early (or an instance the broker
//!   thinks dead but that still runs) makes the new owner wait for the lock, not read a
//!   checkpoint still being written.
//!
//! A unit's processor that is killed (`kill -9` of its instance) leaves its last periodic
//! checkpoint; the next owner replays from there, exactly once into the state, as after any
//! restart. (tansu 0.6 hands a dead member's partitions on only after a clean leave of
//! another member; a Kafka broker does so after `session.timeout.ms`.)
//!
//! The checkpoint directory must be one every instance sees (a shared volume when they run on
//! several machines) and `flock` must work on it.
//!
//! # View sinks
//!
//! Each unit's processor feeds the configured sinks itself ([`StartUnit`]), with the same
//! exactness argument as one processor (see [`crate::runtime`]), restricted to its partitions:
//! a sink's stored offsets cover every unit of the group, and a unit compares only its own
//! share of them ([`share_of`]) with its checkpoint. The topics several units read whole (the
//! returns, the rank shares) are stored per unit as `<topic>@<unit>` ([`to_sink`]). Units hold disjoint keys, so their
//! upserts and deletes never touch one another's rows; the summary is the exception, so each
//! unit's summary row is keyed by the unit's name (`scope`), and a reader adds the rows up
//! (the SQL endpoint does it, and the read model's view `reconciliation_summary_total`). A Parquet sink keeps an offsets
//! file and file names per unit in the shared directory (`sinks::views::parquet`).
//!
//! A switch of `processors.instances` starts from no checkpoint over sinks the other mode fed.
//! [`share_of`] finds the other mode's positions of the topics read whole, so the replay still
//! closes an epoch exactly where each sink stands, and the sinks that key rows get the other
//! mode's summary rows replaced ([`other_mode_scopes`]) once the replay is there.
//!
//! # SQL
//!
//! A member's catalog holds the units it folds and, with a Kafka view sink configured, every
//! unit as read back from the sink's topics ([`crate::remote`]). Of a unit folded here only
//! one copy is served: the topics' while they stand further along its input than its
//! processor (a unit that moved here restarts from its checkpoint), the processor's from when
//! it has caught up. So each member's SQL endpoint serves the whole views, and a unit never
//! steps back in it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};

use crate::runtime::{ProcessError, ProcessorConfig, ProcessorStats, Running, Worker, run_into};
use crate::view::Catalog;

/// The tables routed by SKU whose partition *i* make up unit `skus-<i>`.
pub const SKU_TABLES: [&str; 4] = [
    "oms.products",
    "oms.order_lines",
    "oms.inventory_cache",
    "wms.stock_levels",
];

/// The tables of the `customers-<i>` units: partition *i* of the first two, routed by customer
/// (`oms.customers: [id]`, `oms.orders: [customer_id]`), and every partition of the returns.
pub const CUSTOMER_TABLES: [&str; 3] = ["oms.customers", "oms.orders", "oms.returns"];

/// The tables a customer unit reads whole: the returns (they name an order, not a customer).
pub const READ_WHOLE: [&str; 1] = ["oms.returns"];

/// The "table" part (after the topic prefix) of the topic where the customer units of group
/// `group_id` exchange their rank shares.
pub fn rank_table(group_id: &str) -> String {
    format!("processors.{group_id}.customer-ranks")
}

fn is_rank_table(t: &str) -> bool {
    t.starts_with("processors.") && t.ends_with(".customer-ranks")
}

/// The share of the input one processor folds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Unit {
    /// Every partition of every input (one instance per group).
    #[default]
    All,
    /// Partition `i` of the SKU-routed topics.
    Skus(i32),
    /// Partition `i` of the topics routed by customer, every partition of the returns.
    Customers(i32),
}

impl Unit {
    /// The unit's name in file names and logs.
    pub fn name(&self) -> String {
        match self {
            Unit::All => "all".into(),
            Unit::Skus(i) => format!("skus-{i}"),
            Unit::Customers(i) => format!("customers-{i}"),
        }
    }

    pub fn parse(s: &str) -> Option<Unit> {
        let index = |rest: &str| rest.parse().ok().filter(|i: &i32| *i >= 0);
        match s {
            "all" => Some(Unit::All),
            _ => {
                if let Some(rest) = s.strip_prefix("skus-") {
                    index(rest).map(Unit::Skus)
                } else {
                    s.strip_prefix("customers-")
                        .and_then(index)
                        .map(Unit::Customers)
                }
            }
        }
    }

    /// The source the unit's views are published under in a [`Catalog`].
    pub fn source(&self) -> String {
        match self {
            Unit::All => String::new(),
            u => u.name(),
        }
    }

    /// The key of the unit's `reconciliation_summary` row: `all` for the one processor over
    /// everything, else the unit's name (each shard summarises its own diffs).
    pub fn summary_scope(&self) -> String {
        match self {
            Unit::All => "all".into(),
            u => u.name(),
        }
    }

    /// Whether the unit reads table `table` (`schema.table`, or the rank shares' topic after
    /// the prefix).
    pub fn reads(&self, table: &str) -> bool {
        match self {
            Unit::All => true,
            Unit::Skus(_) => SKU_TABLES.contains(&table),
            Unit::Customers(_) => CUSTOMER_TABLES.contains(&table) || is_rank_table(table),
        }
    }

    /// Whether the unit reads partition `p` of `table`, one it reads.
    pub fn reads_partition(&self, table: &str, p: i32) -> bool {
        match self {
            Unit::All => true,
            Unit::Skus(i) => *i == p,
            Unit::Customers(i) => *i == p || self.reads_whole(table),
        }
    }

    /// Whether the unit reads every partition of `table`, as other units of the group do too.
    pub fn reads_whole(&self, table: &str) -> bool {
        matches!(self, Unit::Customers(_)) && (READ_WHOLE.contains(&table) || is_rank_table(table))
    }
}

/// The `reconciliation_summary` scopes the *other* mode writes to the view sinks: `all` for a
/// unit of a group, every unit of `partitions` partitions for one processor over everything.
/// A processor that starts afresh (as after a switch of `processors.instances`) deletes them
/// from the sinks it feeds, which would otherwise keep the old mode's rows and count every
/// diff twice for a reader that adds the rows up.
pub fn other_mode_scopes(unit: Unit, partitions: i32) -> Vec<String> {
    match unit {
        Unit::All => (0..partitions)
            .flat_map(|i| [Unit::Skus(i).name(), Unit::Customers(i).name()])
            .collect(),
        _ => vec![Unit::All.summary_scope()],
    }
}

/// How long a unit may wait for its lock before the wait is logged (it keeps trying).
const LOCK_WARN: Duration = Duration::from_secs(10);

/// One instance of a group that shares the partitions: the units it owns now, each folded by a
/// processor of its own, publishing into one catalog.
pub struct Member {
    pub catalog: Arc<Catalog>,
    /// Counters of every unit this instance ran (the positions of units it gave away are
    /// dropped).
    pub stats: Arc<ProcessorStats>,
    worker: Worker,
    /// The reader of the other members' units ([`crate::remote`]), with the member's stop flag.
    remote: Option<std::thread::JoinHandle<()>>,
}

impl Member {
    /// Stops every unit (final epochs and checkpoints) and leaves the group.
    pub async fn stop(self) -> Result<(), ProcessError> {
        self.worker.stop.store(true, Ordering::SeqCst);
        self.join().await
    }

    /// Waits until the member ends (only an error, or [`Member::stop`], ends it).
    pub async fn join(self) -> Result<(), ProcessError> {
        let stop = self.worker.stop.clone();
        let done = self.worker.join().await;
        stop.store(true, Ordering::SeqCst);
        if let Some(remote) = self.remote {
            let _ = tokio::task::spawn_blocking(move || remote.join()).await;
        }
        done
    }

    pub fn stopper(&self) -> Arc<AtomicBool> {
        self.worker.stop.clone()
    }
}

/// Starts the processor of one unit (its config names the unit), publishing into the member's
/// catalog and counting into its stats, and the task feeding its view sinks, if any (it ends
/// after the processor, with the sinks' error); called on the member's thread, outside the
/// runtime.
pub type StartUnit = Arc<
    dyn Fn(
            ProcessorConfig,
            Arc<Catalog>,
            Arc<ProcessorStats>,
        ) -> Result<(Running, Option<SinkTask>), ProcessError>
        + Send
        + Sync,
>;

/// The task feeding a unit's view sinks.
pub type SinkTask = tokio::task::JoinHandle<Result<(), String>>;

/// A unit's processor without view sinks: nobody takes its epochs, the views go on.
fn start_plain(
    config: ProcessorConfig,
    catalog: Arc<Catalog>,
    stats: Arc<ProcessorStats>,
) -> Result<(Running, Option<SinkTask>), ProcessError> {
    let mut running = run_into(config, None, catalog, stats)?;
    drop(std::mem::replace(
        &mut running.epochs,
        tokio::sync::mpsc::channel(1).1,
    ));
    Ok((running, None))
}

/// Joins the consumer group `config.group_id` and folds the units it is given, until stopped
/// (call inside a tokio runtime). `start` starts a unit's processor (with its view sinks);
/// `None`: processors without sinks.
pub fn join(config: ProcessorConfig, start: Option<StartUnit>) -> Result<Member, ProcessError> {
    let catalog = Catalog::new();
    let stats = Arc::new(ProcessorStats::default());
    let units = Arc::new(Mutex::new(Units {
        stock_topic: format!("{}.wms.stock_levels", config.topic_prefix),
        base: config.clone(),
        catalog: catalog.clone(),
        stats: stats.clone(),
        handle: tokio::runtime::Handle::current(),
        start: start.unwrap_or_else(|| Arc::new(start_plain)),
        running: BTreeMap::new(),
        wanted: BTreeSet::new(),
        waiting: BTreeMap::new(),
        failed: None,
    }));
    let consumer: BaseConsumer<MemberContext> = config
        .client()
        .set("group.id", &config.group_id)
        // Incremental rebalancing: a member gives up only the units that move, and the units it
        // keeps go on folding through the rebalance.
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("allow.auto.create.topics", "false")
        // A member started before the pipeline created the topics finds them within
        // seconds, not at librdkafka's default refresh of five minutes.
        .set("topic.metadata.refresh.interval.ms", "2000")
        .create_with_context(MemberContext {
            units: units.clone(),
        })
        .map_err(|source| ProcessError::Kafka {
            what: "creating the group member consumer".into(),
            source,
        })?;
    check_copartitioned(&consumer, &config.topic_prefix)?;
    let topic = lock(&units).stock_topic.clone();
    consumer
        .subscribe(&[&topic])
        .map_err(|source| ProcessError::Kafka {
            what: format!("joining consumer group {}", config.group_id),
            source,
        })?;
    tracing::info!(group = %config.group_id, "joined the processors' consumer group");
    let stop = Arc::new(AtomicBool::new(false));
    let remote = match &config.view_topic_prefix {
        Some(prefix) => {
            // librdkafka wants a group for any consumer; this one never commits nor joins.
            let mut client = config.client();
            client
                .set("group.id", format!("{}.remote-units", config.group_id))
                // How often a quiet view topic is asked again (tansu holds a fetch this long):
                // the other members' units' freshness here, beside the broker's own.
                .set(
                    "fetch.wait.max.ms",
                    config.fetch_wait.as_millis().to_string(),
                );
            let (prefix, c, st, s) = (prefix.clone(), catalog.clone(), stats.clone(), stop.clone());
            Some(
                std::thread::Builder::new()
                    .name("walbridge-remote-units".into())
                    .spawn(move || crate::remote::read(client, prefix, c, st, s))
                    .map_err(|e| ProcessError::Checkpoint {
                        path: PathBuf::new(),
                        what: format!("cannot start the thread reading the view topics: {e}"),
                    })?,
            )
        }
        None => None,
    };
    let (s, u) = (stop.clone(), units.clone());
    let thread = std::thread::Builder::new()
        .name("walbridge-group-member".into())
        .spawn(move || member_loop(consumer, u, s))
        .map_err(|e| ProcessError::Checkpoint {
            path: PathBuf::new(),
            what: format!("cannot start the group member thread: {e}"),
        })?;
    Ok(Member {
        catalog,
        stats,
        worker: Worker { stop, thread },
        remote,
    })
}

/// Refuses to start when the topics that units are cut from have unequal partition counts:
/// partition *i* of each must hold the same SKUs (or customers), which holds only when the
/// producer took every routing value modulo the same count. Topics that do not exist yet are
/// left to the pipeline, which creates them all with `kafka.partitions`.
fn check_copartitioned<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    prefix: &str,
) -> Result<(), ProcessError> {
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|source| ProcessError::Kafka {
            what: "reading the change topics' partition counts".into(),
            source,
        })?;
    let counts: Vec<(String, usize)> = SKU_TABLES
        .iter()
        .chain(&CUSTOMER_TABLES[..2])
        .filter_map(|t| {
            let name = format!("{prefix}.{t}");
            md.topics()
                .iter()
                .find(|m| m.name() == name && m.error().is_none() && !m.partitions().is_empty())
                .map(|m| (name, m.partitions().len()))
        })
        .collect();
    copartition_error(&counts).map_or(Ok(()), |e| Err(ProcessError::Refused(e)))
}

/// The refusal for topics routed together with unequal partition counts, if they are.
fn copartition_error(counts: &[(String, usize)]) -> Option<String> {
    let first = counts.first()?;
    if counts.iter().all(|(_, n)| *n == first.1) {
        return None;
    }
    let list: Vec<String> = counts.iter().map(|(t, n)| format!("{t}: {n}")).collect();
    Some(format!(
        "processors.instances: group needs the topics it cuts into units to have equal partition counts, so that \
         partition i of each holds the same SKUs and customers; they have {}. Give them all the same count: \
         recreate the odd ones with kafka.partitions partitions and stream them again from a snapshot (adding \
         partitions in place sends keys to other partitions and breaks the order of their changes), or run \
         processors.instances: single",
        list.join(", ")
    ))
}

fn lock(units: &Mutex<Units>) -> std::sync::MutexGuard<'_, Units> {
    units.lock().unwrap_or_else(|e| e.into_inner())
}

fn member_loop(
    consumer: BaseConsumer<MemberContext>,
    units: Arc<Mutex<Units>>,
    stop: Arc<AtomicBool>,
) -> Result<(), ProcessError> {
    let result = loop {
        if stop.load(Ordering::SeqCst) {
            break Ok(());
        }
        // Rebalances are served inside poll (MemberContext). Messages fetched before the
        // pause took effect are not wanted here: the units' processors read the data.
        if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
            tracing::warn!(error = %e, "group member poll");
        }
        let mut u = lock(&units);
        u.start_wanted();
        if let Some(e) = u.reap() {
            break Err(e);
        }
    };
    // Final checkpoints first, then the clean leave (dropping the consumer): the units are
    // free for the other members by the time they hear of the rebalance.
    let stopped = lock(&units).stop_all();
    drop(consumer);
    result.and(stopped)
}

struct MemberContext {
    units: Arc<Mutex<Units>>,
}

impl rdkafka::ClientContext for MemberContext {}

impl ConsumerContext for MemberContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut u = lock(&self.units);
        let gone = match rebalance {
            Rebalance::Revoke(tpl) => u.units_of(tpl),
            // librdkafka unassigns everything after a rebalance error: so does the member.
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error; stopping every unit");
                u.running.keys().copied().collect()
            }
            Rebalance::Assign(_) => BTreeSet::new(),
        };
        if matches!(rebalance, Rebalance::Error(_)) {
            u.wanted.clear();
        }
        // Only units running here are worth saying (a member that stops has stopped them).
        if gone.iter().any(|g| u.running.contains_key(g)) {
            tracing::info!(units = ?gone.iter().map(Unit::name).collect::<Vec<_>>(), "units revoked; stopping them with a final checkpoint");
        }
        for unit in gone {
            u.wanted.remove(&unit);
            u.stop_unit(unit);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Error(_) = rebalance {
            // Incremental rebalancing unassigns only what the event names: the partitions still
            // assigned are this member's, and their units start again.
            let mut u = lock(&self.units);
            if let Ok(all) = consumer.assignment() {
                u.wanted = u.units_of(&all);
            }
        }
        if let Rebalance::Assign(tpl) = rebalance {
            if let Err(e) = consumer.pause(tpl) {
                tracing::warn!(error = %e, "pausing the member's partitions (their messages are dropped)");
            }
            let mut u = lock(&self.units);
            // The whole assignment: with incremental rebalancing `tpl` holds only what was added.
            u.wanted = match consumer.assignment() {
                Ok(all) => u.units_of(&all),
                Err(_) => u.units_of(tpl),
            };
            // A unit running here that the assignment no longer names (it should have been
            // revoked first, but never fold what the group gave someone else).
            let stale: Vec<Unit> = u
                .running
                .keys()
                .filter(|k| !u.wanted.contains(k))
                .copied()
                .collect();
            for unit in stale {
                u.stop_unit(unit);
            }
            tracing::info!(units = ?u.wanted.iter().map(Unit::name).collect::<Vec<_>>(), "units assigned");
        }
    }
}

struct Units {
    stock_topic: String,
    base: ProcessorConfig,
    catalog: Arc<Catalog>,
    stats: Arc<ProcessorStats>,
    handle: tokio::runtime::Handle,
    start: StartUnit,
    /// Units folded now, with their sinks' task and the lock that makes them this instance's.
    running: BTreeMap<Unit, (Running, Option<SinkTask>, std::fs::File)>,
    /// Units the group gave this instance.
    wanted: BTreeSet<Unit>,
    /// Wanted units whose lock another instance still holds, since when.
    waiting: BTreeMap<Unit, (Instant, bool)>,
    failed: Option<ProcessError>,
}

impl Units {
    /// Stock-levels partition *i* is units `skus-<i>` and `customers-<i>`.
    fn units_of(&self, tpl: &rdkafka::TopicPartitionList) -> BTreeSet<Unit> {
        let mut units = BTreeSet::new();
        for e in tpl.elements() {
            if e.topic() == self.stock_topic {
                units.insert(Unit::Skus(e.partition()));
                units.insert(Unit::Customers(e.partition()));
            }
        }
        units
    }

    fn start_wanted(&mut self) {
        let todo: Vec<Unit> = self
            .wanted
            .iter()
            .filter(|u| !self.running.contains_key(u))
            .copied()
            .collect();
        for unit in todo {
            let file = match try_lock(&self.base, unit) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    let (since, said) = self.waiting.entry(unit).or_insert((Instant::now(), false));
                    if !*said && since.elapsed() > LOCK_WARN {
                        *said = true;
                        tracing::warn!(unit = %unit.name(), "another instance still holds the unit's lock; waiting for it to stop the unit");
                    }
                    continue;
                }
                Err(e) => {
                    self.failed.get_or_insert(e);
                    return;
                }
            };
            self.waiting.remove(&unit);
            let mut config = self.base.clone();
            config.unit = unit;
            let _enter = self.handle.enter();
            match (self.start)(config, self.catalog.clone(), self.stats.clone()) {
                Ok((running, sinks)) => {
                    tracing::info!(unit = %unit.name(), "unit started");
                    self.running.insert(unit, (running, sinks, file));
                }
                Err(e) => {
                    self.failed.get_or_insert(e);
                    return;
                }
            }
        }
    }

    fn stop_unit(&mut self, unit: Unit) {
        self.waiting.remove(&unit);
        if let Some((running, sinks, file)) = self.running.remove(&unit) {
            if let Err(e) = running.stop_blocking() {
                self.failed.get_or_insert(e);
            }
            // The sinks' last writes are done before the unit can move (a new owner reopens
            // the same files and rows).
            if let Some(task) = sinks {
                let done = self.handle.block_on(task);
                if let Some(e) = match done {
                    Ok(r) => r.err(),
                    Err(_) => Some("the view sink task panicked".to_owned()),
                } {
                    self.failed.get_or_insert(ProcessError::Sink(e));
                }
            }
            self.catalog.withdraw(&unit.source());
            // The positions of partitions another member folds now are not this one's lag.
            forget_positions(
                &mut self
                    .stats
                    .positions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
                &self.base.topic_prefix,
                unit,
            );
            tracing::info!(unit = %unit.name(), "unit stopped");
            // The lock goes only now, after the final checkpoint is on disk.
            drop(file);
        }
    }

    /// The first error of a unit: a processor that ended by itself, a failed start or stop.
    fn reap(&mut self) -> Option<ProcessError> {
        let ended: Vec<Unit> = self
            .running
            .iter()
            .filter(|(_, (r, _, _))| r.finished())
            .map(|(u, _)| *u)
            .collect();
        for unit in ended {
            if let Some((running, _, _)) = self.running.remove(&unit) {
                let e = running.stop_blocking().err().unwrap_or_else(|| {
                    ProcessError::Sink(format!("unit {} stopped by itself", unit.name()))
                });
                self.failed.get_or_insert(e);
            }
        }
        self.failed.take()
    }

    fn stop_all(&mut self) -> Result<(), ProcessError> {
        let all: Vec<Unit> = self.running.keys().copied().collect();
        for unit in all {
            self.stop_unit(unit);
        }
        self.wanted.clear();
        self.failed.take().map_or(Ok(()), Err)
    }
}

/// The positions of the partitions `unit` reads, of a view sink's stored offsets `positions`
/// (they cover every unit of the group; a unit's processor compares its own with them), under
/// the topics' own names (see [`to_sink`]).
///
/// A sink the other `processors.instances` mode fed stores a topic read whole under the other
/// names, and its position must still be found, or the replay could not close an epoch exactly
/// there and would write epochs that straddle it over rows the sink holds at a later state.
/// Both namings may be there, one of them frozen where the mode that wrote it stopped, and the
/// sink holds at least the later one, so the larger counts:
/// - one processor over everything takes the unsharded position, or the least of the units'
///   (each unit read all of it; from there the replay writes every row that changed since),
///   whichever is larger; the rank shares' topic is not its input;
/// - a unit takes its own position or the unsharded one, whichever is larger.
pub fn share_of(
    positions: &crate::view::Offsets,
    topic_prefix: &str,
    unit: Unit,
) -> crate::view::Offsets {
    let prefix = format!("{topic_prefix}.");
    let mut share = crate::view::Offsets::default();
    // Topics read whole: the unsharded position, and the units' (least over units for one
    // processor over everything, the unit's own for a unit).
    let mut plain = crate::view::Offsets::default();
    let mut per_unit = crate::view::Offsets::default();
    for ((stored, p), o) in &positions.0 {
        let (topic, owner) = match stored.rsplit_once('@') {
            Some((t, owner)) => (t, Some(owner)),
            None => (stored.as_str(), None),
        };
        let Some(t) = topic.strip_prefix(&prefix) else {
            continue;
        };
        let key = (topic.to_owned(), *p);
        let whole = READ_WHOLE.contains(&t) || is_rank_table(t);
        match (unit, owner) {
            (Unit::All, Some(_)) if !is_rank_table(t) => {
                let e = per_unit.0.entry(key).or_insert(*o);
                *e = (*e).min(*o);
            }
            (Unit::All, None) => {
                if whole {
                    plain.0.insert(key, *o);
                } else {
                    share.0.insert(key, *o);
                }
            }
            (Unit::All, Some(_)) => {}
            (u, Some(owner)) if whole && owner == u.name() => {
                per_unit.0.insert(key, *o);
            }
            (u, None) if u.reads(t) && u.reads_partition(t, *p) => {
                if u.reads_whole(t) {
                    plain.0.insert(key, *o);
                } else {
                    share.0.insert(key, *o);
                }
            }
            _ => {}
        }
    }
    for (key, o) in plain.0.into_iter().chain(per_unit.0) {
        let e = share.0.entry(key).or_insert(o);
        *e = (*e).max(o);
    }
    share
}

/// `offsets` of `unit` as a view sink stores them: a topic that several units read whole is
/// stored as `<topic>@<unit>`, so that units sharing one store (the Postgres read model's
/// `walbridge_offsets`) each keep their own position in it.
pub fn to_sink(
    offsets: &crate::view::Offsets,
    topic_prefix: &str,
    unit: Unit,
) -> crate::view::Offsets {
    let prefix = format!("{topic_prefix}.");
    let name = unit.name();
    crate::view::Offsets(
        offsets
            .0
            .iter()
            .map(|((topic, p), o)| {
                let whole = topic
                    .strip_prefix(&prefix)
                    .is_some_and(|t| unit.reads_whole(t));
                let stored = if whole {
                    format!("{topic}@{name}")
                } else {
                    topic.clone()
                };
                ((stored, *p), *o)
            })
            .collect(),
    )
}

/// Drops the positions of the partitions `unit` reads from `positions`, but for topics it
/// reads whole: the member's other units may read them too.
fn forget_positions(positions: &mut crate::view::Offsets, topic_prefix: &str, unit: Unit) {
    let prefix = format!("{topic_prefix}.");
    positions.0.retain(|(topic, p), _| {
        !topic
            .strip_prefix(&prefix)
            .is_some_and(|t| unit.reads(t) && unit.reads_partition(t, *p) && !unit.reads_whole(t))
    });
}

/// The unit's lock file, held while a processor of this instance folds it; `None` while
/// another instance holds it.
fn try_lock(config: &ProcessorConfig, unit: Unit) -> Result<Option<std::fs::File>, ProcessError> {
    let path = config
        .checkpoint_dir
        .join(format!("{}.{}.lock", config.group_id, unit.name()));
    lock_file(&path, false).map_err(|e| ProcessError::Checkpoint {
        path: path.clone(),
        what: format!("cannot take the unit's lock: {e}"),
    })
}

/// Takes the lock file at `path` (creating it and its directory), exclusive or `shared`, and
/// holds it as long as the returned file is open; `None` while another process holds it in a
/// mode that excludes this one. (`flock`: released by the kernel when the process dies.)
pub fn lock_file(path: &std::path::Path, shared: bool) -> std::io::Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    let how = if shared { libc::LOCK_SH } else { libc::LOCK_EX };
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } == 0 {
        return Ok(Some(file));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path, unit: Unit) -> ProcessorConfig {
        crate::runtime::tests::config(dir, unit)
    }

    #[test]
    fn a_fresh_start_removes_the_other_modes_summary_rows() {
        assert_eq!(
            other_mode_scopes(Unit::All, 2),
            ["skus-0", "customers-0", "skus-1", "customers-1"]
        );
        assert_eq!(other_mode_scopes(Unit::Customers(1), 3), ["all"]);
        for u in [Unit::All, Unit::Skus(0)] {
            assert!(!other_mode_scopes(u, 3).contains(&u.summary_scope()));
        }
    }

    #[test]
    fn topics_cut_into_units_must_have_equal_partition_counts() {
        let counts = |v: &[(&str, usize)]| -> Vec<(String, usize)> {
            v.iter().map(|(t, n)| (t.to_string(), *n)).collect()
        };
        assert_eq!(copartition_error(&[]), None);
        assert_eq!(
            copartition_error(&counts(&[("p.oms.products", 3), ("p.oms.orders", 3)])),
            None
        );
        let e = copartition_error(&counts(&[
            ("p.oms.products", 3),
            ("p.wms.stock_levels", 3),
            ("p.oms.orders", 6),
        ]))
        .expect("refused");
        assert!(
            e.contains("p.oms.products: 3, p.wms.stock_levels: 3, p.oms.orders: 6"),
            "{e}"
        );
        assert!(e.contains("recreate the odd ones"), "{e}");
    }

    #[test]
    fn unit_names_round_trip_and_pick_their_partitions() {
        for u in [
            Unit::All,
            Unit::Skus(0),
            Unit::Skus(11),
            Unit::Customers(0),
            Unit::Customers(7),
        ] {
            assert_eq!(Unit::parse(&u.name()), Some(u));
        }
        // The unsharded customer unit of earlier versions is no unit now.
        for bad in ["skus--1", "customers", "customers-x"] {
            assert_eq!(Unit::parse(bad), None, "{bad}");
        }
        let (s2, c2) = (Unit::Skus(2), Unit::Customers(2));
        assert!(s2.reads("wms.stock_levels") && !s2.reads("oms.orders"));
        assert!(
            s2.reads_partition("wms.stock_levels", 2) && !s2.reads_partition("wms.stock_levels", 1)
        );
        assert!(c2.reads("oms.returns") && !c2.reads("oms.products"));
        assert!(c2.reads_partition("oms.orders", 2) && !c2.reads_partition("oms.orders", 1));
        // Returns name no customer: every customer unit reads all of them, and the shares.
        assert!(c2.reads_partition("oms.returns", 0) && c2.reads_whole("oms.returns"));
        let ranks = rank_table("g");
        assert!(c2.reads(&ranks) && c2.reads_whole(&ranks) && !s2.reads(&ranks));
        // Every input table belongs to exactly one unit of a group.
        for t in crate::input::TABLES {
            assert_eq!(
                SKU_TABLES.contains(&t) as u8 + CUSTOMER_TABLES.contains(&t) as u8,
                1,
                "{t}"
            );
        }
    }

    #[test]
    fn a_member_forgets_the_positions_of_a_unit_it_gave_away() {
        let mut o = crate::view::Offsets::default();
        for (t, p) in [
            ("t.wms.stock_levels", 0),
            ("t.wms.stock_levels", 1),
            ("t.oms.products", 1),
            ("t.oms.orders", 1),
        ] {
            o.0.insert((t.to_owned(), p), 10);
        }
        let share = share_of(&o, "t", Unit::Skus(1));
        let shared: Vec<_> = share.0.keys().map(|(t, p)| format!("{t}-{p}")).collect();
        assert_eq!(shared, ["t.oms.products-1", "t.wms.stock_levels-1"]);
        assert_eq!(share_of(&o, "t", Unit::All), o);
        forget_positions(&mut o, "t", Unit::Skus(1));
        let left: Vec<_> = o.0.keys().map(|(t, p)| format!("{t}-{p}")).collect();
        assert_eq!(left, ["t.oms.orders-1", "t.wms.stock_levels-0"]);
        forget_positions(&mut o, "t", Unit::Customers(1));
        assert_eq!(o.0.len(), 1);
    }

    /// Two customer units store their positions in the returns under names of their own in a
    /// store they share, and each gets back its own.
    #[test]
    fn units_reading_a_topic_whole_keep_their_own_sink_positions() {
        let of = |unit: Unit, at: i64| {
            let mut o = crate::view::Offsets::default();
            o.0.insert(("t.oms.returns".to_owned(), 0), at);
            o.0.insert(("t.oms.returns".to_owned(), 1), at + 1);
            if let Unit::Customers(i) = unit {
                o.0.insert(("t.oms.orders".to_owned(), i), at + 2);
            }
            o
        };
        let (c0, c1) = (Unit::Customers(0), Unit::Customers(1));
        let mut store = crate::view::Offsets::default();
        for (u, at) in [(c0, 10), (c1, 20)] {
            store.0.extend(to_sink(&of(u, at), "t", u).0);
        }
        assert!(
            store
                .0
                .contains_key(&("t.oms.returns@customers-1".to_owned(), 1))
        );
        assert_eq!(share_of(&store, "t", c0), of(c0, 10));
        assert_eq!(share_of(&store, "t", c1), of(c1, 20));
        // Nothing of it is a SKU unit's.
        assert!(share_of(&store, "t", Unit::Skus(0)).0.is_empty());

        // A switch of processors.instances finds the other mode's positions: one processor
        // over everything reads the units' least (their rank shares are not its input) ...
        store
            .0
            .insert(("t.processors.g.customer-ranks@customers-0".into(), 0), 5);
        let all = share_of(&store, "t", Unit::All);
        assert_eq!(all.0[&("t.oms.returns".to_owned(), 0)], 10);
        assert_eq!(all.0[&("t.oms.returns".to_owned(), 1)], 11);
        assert_eq!(all.0[&("t.oms.orders".to_owned(), 1)], 22);
        assert!(
            all.0
                .keys()
                .all(|(t, _)| !t.contains('@') && !t.contains("ranks"))
        );
        // ... and a unit reads one processor's position of a topic it reads whole.
        let single = to_sink(&of(Unit::All, 30), "t", Unit::All);
        assert_eq!(
            share_of(&single, "t", c1).0[&("t.oms.returns".to_owned(), 1)],
            31
        );
        // Switched back and forth: the naming the mode that stopped last wrote is frozen, the
        // other one is where the sink stands.
        let returns = |o: &crate::view::Offsets, u: Unit| {
            share_of(o, "t", u).0[&("t.oms.returns".to_owned(), 1)]
        };
        let mut both = single.clone();
        both.0.extend(to_sink(&of(c1, 40), "t", c1).0);
        assert_eq!(returns(&both, c1), 41);
        assert_eq!(returns(&both, Unit::All), 41);
        let mut later = to_sink(&of(c1, 40), "t", c1);
        later
            .0
            .extend(to_sink(&of(Unit::All, 50), "t", Unit::All).0);
        assert_eq!(returns(&later, c1), 51);
        assert_eq!(returns(&later, Unit::All), 51);
    }

    #[test]
    fn checkpoints_of_the_other_mode_are_refused_and_shards_merge_for_the_check() {
        let dir = std::env::temp_dir().join(format!("walbridge-group-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let shard = config(&dir, Unit::Skus(1));
        let mut state = crate::state::State::new(Default::default());
        state.apply(&crate::input::Event {
            change: crate::input::Change::InventoryCache {
                key: ("SKU-1".into(), "DC1".into()),
                available: Some(4),
            },
            lsn: 1,
            ts_ms: 1,
        });
        crate::runtime::write_checkpoint(&shard.checkpoint_path(), &state.save("t")).unwrap();
        assert!(
            shard
                .checkpoint_path()
                .ends_with("g.skus-1.checkpoint.json")
        );

        let single = config(&dir, Unit::All);
        let err = crate::runtime::load_checkpoint(&single)
            .err()
            .expect("refused");
        assert!(
            err.to_string()
                .contains("running with processors.instances: group"),
            "{err}"
        );
        let merged = crate::runtime::load_merged(&single).unwrap();
        assert_eq!(
            merged
                .view(crate::state::RECON_DIFFS)
                .unwrap()
                .rows()
                .count(),
            1
        );

        crate::runtime::write_checkpoint(&single.checkpoint_path(), &state.save("t")).unwrap();
        let err = crate::runtime::load_checkpoint(&config(&dir, Unit::Customers(0)))
            .err()
            .expect("refused");
        assert!(
            err.to_string().contains("processors.instances: single"),
            "{err}"
        );
        // The unsharded customer unit of an earlier walbridge: its customer units refuse to
        // start beside it (they would rebuild the same customers a second time).
        std::fs::remove_file(single.checkpoint_path()).unwrap();
        std::fs::write(dir.join("g.customers.checkpoint.json"), b"{}").unwrap();
        let err = crate::runtime::load_checkpoint(&config(&dir, Unit::Customers(2)))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("unsharded customer unit"), "{err}");
        crate::runtime::load_checkpoint(&config(&dir, Unit::Skus(2))).expect("a SKU unit starts");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
