//! `walbridge process`: the stream processors with their SQL endpoint and view sinks, from the
//! `processors:` section of the config.
//!
//! The processor thread folds the change topics into the views and sends an epoch per step
//! (see `transforms::runtime`). One task here hands every epoch to every configured sink, in
//! order, and reports back through a [`SinkGate`] which epoch all of them stored; the processor
//! never checkpoints past that. Together with the replay cuts at the sinks' positions this is
//! what keeps each sink exact after `kill -9` (the argument is in the runtime's module doc).
//!
//! With `processors.instances: group` every unit a member folds has this whole arrangement of
//! its own ([`start_fed`]): its processor, its sinks opened at their stored offsets of the
//! unit's partitions, its task and gate (see `transforms::group` for why the shards' writes do
//! not collide).
//!
//! Where a sink's position comes from: Postgres and Parquet sinks store their offsets with
//! their data. The Kafka sink cannot, so after each epoch it stored this task writes its
//! position to `<checkpoint_dir>/<group_id>.sink.<name>.json` (temp file, fsync, rename). The
//! file is written only after the epoch's records were acknowledged, so it never claims more
//! than the topic holds; a crash between the two replays that epoch (at-least-once, equal
//! records, compaction keeps the last).
//!
//! Starting positions: a sink that holds nothing (new, or emptied on purpose) while the
//! checkpoint holds views first gets every view's full content, then the epochs after it. A
//! sink behind the checkpoint missed epochs (it was left out of the config for a while, or part
//! of its data was removed): it is refused with the way to rebuild it, since applying later
//! epochs would leave it silently wrong.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use sinks::views::ViewSink;
use tokio::sync::mpsc;
use transforms::arrow::array::RecordBatch;
use transforms::arrow::compute::concat_batches;
use transforms::view::{Catalog, Epoch, Offsets, ViewChanges};
use transforms::{SinkFeed, SinkGate};

use crate::config::{Config, ViewSinkConfig};

/// How many times a sink's write of one epoch is tried (reopening the sink in between) before
/// the processor stops with the error.
const WRITE_ATTEMPTS: u32 = 6;

/// A running `walbridge process`.
pub struct Process {
    pub catalog: Arc<Catalog>,
    /// Where the SQL endpoint listens, when `processors.sql` is set.
    pub sql_addr: Option<SocketAddr>,
    stopper: Arc<std::sync::atomic::AtomicBool>,
    running: Runner,
    driver: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _lock: Option<std::fs::File>,
    _sql: Option<transforms::sql::ServerHandle>,
    _metrics: Option<crate::metrics::TaskGuard>,
}

/// The processors of this instance: one over everything, or the units of a group member.
enum Runner {
    One(transforms::Running),
    Group(transforms::group::Member),
}

impl Process {
    /// The processor's live counters.
    pub fn stats(&self) -> Arc<transforms::ProcessorStats> {
        match &self.running {
            Runner::One(r) => r.stats.clone(),
            Runner::Group(m) => m.stats.clone(),
        }
    }

    /// Stops the processor (final epoch, sinks, checkpoint) and waits for it and the sinks.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stopper
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.join().await
    }

    /// Waits until the processor ends (only an error, or [`Process::stop`], ends it).
    pub async fn join(self) -> anyhow::Result<()> {
        let processed = match self.running {
            Runner::One(r) => r.join().await,
            Runner::Group(m) => m.join().await,
        };
        let driven = match self.driver {
            Some(d) => d
                .await
                .map_err(|_| anyhow!("the view sink task panicked"))?,
            None => Ok(()),
        };
        // The sinks' own error says more than the processor's "sinks stopped".
        driven?;
        processed?;
        Ok(())
    }

    /// A flag that stops the processor when set (for signal handlers).
    pub fn stopper(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.stopper.clone()
    }
}

/// One configured sink and where it stands.
struct Slot {
    /// The summary rows are still to be put in this mode's shape
    /// ([`summary_reshape`]), once the replay reaches the sink's position.
    reshape: bool,
    cfg: ViewSinkConfig,
    /// The share of the views this sink gets (a unit of a group, or all).
    unit: transforms::group::Unit,
    sink: Box<dyn ViewSink>,
    position: Offsets,
    /// The file keeping the position of a sink that stores none itself.
    marker: Option<PathBuf>,
    /// How long epochs may gather before this sink writes them as one (zero: every epoch at
    /// once); a checkpoint waiting for an epoch ends the wait early.
    gather: Duration,
    /// Epochs received and not yet written, merged ([`transforms::view::coalesce`]) when
    /// written, or whenever [`MAX_COALESCED`] gathered (merging each one into the rest would
    /// copy the whole pending change set per epoch).
    pending: Vec<Epoch>,
    /// Number of the last epoch this sink stored (or held already).
    stored: u64,
    last_write: Instant,
}

/// Starts the processors, the SQL endpoint and the sinks the config names.
pub async fn start(cfg: &Config) -> anyhow::Result<Process> {
    let pc = cfg.processor_config().context(
        "the config has no processors section; add processors: { group_id: walbridge_views }",
    )?;
    let pcfg = cfg
        .processors
        .as_ref()
        .expect("processor_config checked it");
    let group = pcfg.instances == crate::config::Instances::Group;
    // Members of a group share the group's lock; a single instance holds it alone, so the two
    // modes never fold the same group at once.
    let lock = lock_group(&pc, group)?;
    if group {
        return start_member(cfg, pc, lock).await;
    }

    let fed = start_fed(cfg, &pc, Catalog::new(), Arc::default()).await?;
    let running = fed.running;
    let stopper = running.stopper();
    let catalog = running.catalog.clone();
    let metrics = serve_metrics(cfg, running.stats.clone(), fed.gate.clone()).await?;
    let sql = serve_sql(cfg, &catalog).await?;
    Ok(Process {
        catalog,
        sql_addr: sql.as_ref().map(|s| s.local_addr()),
        stopper,
        running: Runner::One(running),
        driver: fed.driver,
        _lock: Some(lock),
        _sql: sql,
        _metrics: metrics,
    })
}

/// One processor (over everything, or one unit of a group) and the view sinks it feeds.
struct Fed {
    running: transforms::Running,
    driver: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    gate: Arc<SinkGate>,
}

/// Opens the configured sinks, starts the processor of `pc`'s unit at their positions (of the
/// unit's partitions) and the task that hands them its epochs.
async fn start_fed(
    cfg: &Config,
    pc: &transforms::ProcessorConfig,
    catalog: Arc<Catalog>,
    stats: Arc<transforms::ProcessorStats>,
) -> anyhow::Result<Fed> {
    let pcfg = cfg.processors.as_ref().expect("processors configured");
    let mut slots = Vec::new();
    for s in &pcfg.sinks {
        let sink = open_sink(cfg, s, pc.unit).await?;
        let marker = sink
            .committed_offsets()
            .is_none()
            .then(|| marker_path(pc, s.name()));
        let position = match (sink.committed_offsets(), &marker) {
            (Some(o), _) => o.clone(),
            (None, Some(m)) => read_marker(m)?,
            (None, None) => Offsets::default(),
        };
        // A sink stores the offsets of every unit of a group; this processor is one of them.
        let position = transforms::group::share_of(&position, &pc.topic_prefix, pc.unit);
        tracing::info!(
            sink = s.name(),
            unit = %pc.unit.name(),
            partitions = position.0.len(),
            "view sink opened"
        );
        // One Parquet file per changed view and write: epochs gather up to a checkpoint
        // interval, so the lake gets a file per view per checkpoint, not one per epoch.
        let gather = match s {
            ViewSinkConfig::Parquet { .. } => pc.checkpoint_interval,
            _ => Duration::ZERO,
        };
        slots.push(Slot {
            cfg: s.clone(),
            unit: pc.unit,
            sink,
            position,
            marker,
            gather,
            pending: Vec::new(),
            stored: 0,
            last_write: Instant::now(),
            reshape: false,
        });
    }

    let gate = Arc::new(SinkGate::default());
    let feed = (!slots.is_empty()).then(|| SinkFeed {
        positions: slots.iter().map(|s| s.position.clone()).collect(),
        gate: gate.clone(),
    });
    let mut running = transforms::runtime::run_into(pc.clone(), feed, catalog, stats)?;
    let stopper = running.stopper();
    let catalog = running.catalog.clone();
    let epochs = std::mem::replace(&mut running.epochs, mpsc::channel(1).1);

    // A sink behind the checkpoint missed epochs: refuse it before it takes any.
    let mut first = Vec::new();
    for slot in &slots {
        if running.restored.0.is_empty() || slot.position.covers(&running.restored) {
            first.push(None);
        } else if slot.position.0.is_empty() {
            first.push(Some(full_epoch(
                &catalog,
                &pc.unit.source(),
                &running.restored,
            )?));
        } else {
            // Nobody will drive the sinks: the processor must not wait for them on its way out.
            gate.fail("the processors stopped at start: a view sink was refused".into());
            stopper.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = running.join().await;
            bail!(
                "view sink {} holds the views as of offsets older than the processors' checkpoint {}: it missed the epochs in between \
                 (it was left out of the config, or some of its data was removed). Empty it so it gets a full copy \
                 ({}), or move the checkpoint away to rebuild every view and sink from the topics",
                slot.cfg.name(),
                pc.checkpoint_path().display(),
                how_to_empty(&slot.cfg, pc)
            );
        }
    }
    // After a switch of processors.instances the sinks that key rows hold the other mode's
    // summary rows: they get them in this mode's shape once the replay is where they stand.
    // On every start, since a stop during the switch's replay may have checkpointed already
    // (a Parquet lake refuses the switch when it opens instead: its changelog cannot take
    // back another mode's rows).
    for slot in &mut slots {
        slot.reshape = !matches!(slot.cfg, ViewSinkConfig::Parquet { .. });
    }
    let driver = (!slots.is_empty()).then(|| {
        let (cfg, catalog) = (cfg.clone(), catalog.clone());
        let gate = gate.clone();
        tokio::spawn(async move {
            let r = drive(&cfg, &catalog, slots, first, epochs, &gate).await;
            if let Err(e) = &r {
                gate.fail(format!("{e:#}"));
            }
            r
        })
    });
    Ok(Fed {
        running,
        driver,
        gate,
    })
}

/// `processors.instances: group`: joins the group and folds the units it is given, each unit
/// feeding the view sinks with its share.
async fn start_member(
    cfg: &Config,
    pc: transforms::ProcessorConfig,
    lock: std::fs::File,
) -> anyhow::Result<Process> {
    // Each unit's processor gets the configured sinks of its own (their driving task ends
    // with the processor's epochs).
    let start: Option<transforms::group::StartUnit> =
        (!cfg.processors.as_ref().is_some_and(|p| p.sinks.is_empty())).then(|| {
            let cfg = cfg.clone();
            let handle = tokio::runtime::Handle::current();
            Arc::new(
                move |pc: transforms::ProcessorConfig,
                      catalog: Arc<Catalog>,
                      stats: Arc<transforms::ProcessorStats>| {
                    let fed = handle
                        .block_on(start_fed(&cfg, &pc, catalog, stats))
                        .map_err(|e| transforms::ProcessError::Sink(format!("{e:#}")))?;
                    // The member waits for the sinks' task when it stops the unit, before the
                    // unit (and its sinks' files) can go to another member.
                    let sinks = fed.driver.map(|d| {
                        handle.spawn(async move {
                            match d.await {
                                Ok(r) => r.map_err(|e| format!("{e:#}")),
                                Err(_) => Err("the view sink task panicked".to_owned()),
                            }
                        })
                    });
                    Ok((fed.running, sinks))
                },
            ) as transforms::group::StartUnit
        });
    let member = transforms::group::join(pc.clone(), start)
        .with_context(|| format!("joining the processors' consumer group {}", pc.group_id))?;
    let catalog = member.catalog.clone();
    let metrics = serve_metrics(cfg, member.stats.clone(), Arc::new(SinkGate::default())).await?;
    let sql = serve_sql(cfg, &catalog).await?;
    if sql.is_some() && pc.view_topic_prefix.is_none() {
        tracing::warn!(
            "no view sink of kind kafka is configured: this member's SQL endpoint serves only the units it folds; \
             add one (processors.sinks: - {{ kind: kafka, name: topics }}) so that every member serves the whole views"
        );
    }
    Ok(Process {
        catalog,
        sql_addr: sql.as_ref().map(|s| s.local_addr()),
        stopper: member.stopper(),
        running: Runner::Group(member),
        driver: None,
        _lock: Some(lock),
        _sql: sql,
        _metrics: metrics,
    })
}

async fn serve_metrics(
    cfg: &Config,
    stats: Arc<transforms::ProcessorStats>,
    gate: Arc<SinkGate>,
) -> anyhow::Result<Option<crate::metrics::TaskGuard>> {
    let pcfg = cfg.processors.as_ref().expect("processors configured");
    Ok(match pcfg.metrics_listen {
        None => None,
        Some(listen) => {
            let m = crate::process_metrics::ProcessMetrics::new(
                &cfg.kafka.client(),
                stats,
                gate,
                !pcfg.sinks.is_empty(),
            )?;
            Some(crate::process_metrics::serve(m, listen).await?)
        }
    })
}

async fn serve_sql(
    cfg: &Config,
    catalog: &Arc<Catalog>,
) -> anyhow::Result<Option<transforms::sql::ServerHandle>> {
    let pcfg = cfg.processors.as_ref().expect("processors configured");
    let sql = match &pcfg.sql {
        None => None,
        Some(q) => {
            let handle = transforms::sql::serve(
                catalog.clone(),
                transforms::sql::SqlOptions {
                    listen: q.listen.to_string(),
                    user: q.credentials.user.clone(),
                    password: q.credentials.password.clone(),
                    tls: q.tls.clone(),
                    max_connections: q.max_connections,
                },
            )
            .await
            .with_context(|| format!("starting the SQL endpoint on {}", q.listen))?;
            tracing::info!(listen = %handle.local_addr(), user = %q.credentials.user, "sql endpoint ready");
            Some(handle)
        }
    };
    Ok(sql)
}

async fn open_sink(
    cfg: &Config,
    s: &ViewSinkConfig,
    unit: transforms::group::Unit,
) -> anyhow::Result<Box<dyn ViewSink>> {
    Ok(match s {
        ViewSinkConfig::Kafka { name, topic_prefix } => {
            let mut sink = sinks::views::kafka::KafkaViewSink::new(
                name,
                sinks::views::kafka::KafkaViewSettings {
                    brokers: cfg.kafka.bootstrap_servers(),
                    topic_prefix: topic_prefix
                        .clone()
                        .unwrap_or_else(|| cfg.kafka.topic_prefix.clone()),
                    partitions: cfg.kafka.partitions,
                    replication_factor: i32::from(cfg.kafka.replication_factor),
                    unit: unit.name(),
                    extra: cfg
                        .kafka
                        .producer
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                },
            )?;
            let defs = transforms::state::view_defs();
            let views: Vec<&str> = defs.iter().map(|d| d.name.as_str()).collect();
            // Not fatal here: the first write of each view tries again (and retries).
            if let Err(e) = sink.create_topics(&views).await {
                tracing::warn!(sink = %name, error = %e, "creating the view topics failed; each view's first write tries again");
            }
            Box::new(sink)
        }
        ViewSinkConfig::Postgres { name, dsn, schema } => Box::new(
            sinks::views::postgres::PostgresViewSink::open(
                name,
                &sinks::views::postgres::PostgresViewSettings {
                    dsn: dsn.expose().to_owned(),
                    schema: schema.clone(),
                },
            )
            .await
            .with_context(|| format!("opening view sink {name} at {}", dsn.redacted()))?,
        ),
        ViewSinkConfig::Parquet { name, dir } => Box::new(
            sinks::views::parquet::ParquetViewSink::open_shard(
                name,
                dir,
                (unit != transforms::group::Unit::All)
                    .then(|| unit.name())
                    .as_deref(),
            )
            .with_context(|| format!("opening view sink {name} in {}", dir.display()))?,
        ),
    })
}

fn how_to_empty(s: &ViewSinkConfig, pc: &transforms::ProcessorConfig) -> String {
    match s {
        ViewSinkConfig::Kafka { name, .. } => format!(
            "delete its view topics and {}",
            marker_path(pc, name).display()
        ),
        ViewSinkConfig::Postgres { name, schema, .. } => format!(
            "drop its view tables in schema {schema} and DELETE FROM {schema}.walbridge_offsets WHERE sink = '{name}'"
        ),
        ViewSinkConfig::Parquet { dir, .. } => match pc.unit {
            transforms::group::Unit::All => format!("remove {}", dir.display()),
            u => format!(
                "remove {}/_walbridge_offsets.{}.json and its files {}/*/date=*/part-{}-*.parquet (the other shards' files stay)",
                dir.display(),
                u.name(),
                dir.display(),
                u.name()
            ),
        },
    }
}

/// The other mode's summary rows deleted (see `transforms::group::other_mode_scopes`) and
/// this processor's own upserted, as its latest snapshot holds it: what a sink the other
/// `processors.instances` mode fed needs once the replay reached its position, where the
/// epochs it already held were skipped and so never wrote the summary in this mode's shape.
/// No offsets, so every sink writes it and none moves its position.
fn summary_reshape(
    catalog: &Catalog,
    unit: transforms::group::Unit,
    partitions: i32,
) -> anyhow::Result<Epoch> {
    let def = transforms::state::view_defs()
        .into_iter()
        .find(|d| d.name == transforms::state::RECON_SUMMARY)
        .context("the summary view is defined")?;
    let key_schema = Arc::new(def.schema.project(&def.key)?);
    let scopes = transforms::group::other_mode_scopes(unit, partitions);
    let deletes = RecordBatch::try_new(
        key_schema,
        vec![Arc::new(transforms::arrow::array::StringArray::from(
            scopes,
        ))],
    )?;
    let own = match catalog.snapshot_from(&unit.source(), &def.name) {
        Some(s) => concat_batches(&def.schema, &s.rows.batches()?)?,
        None => RecordBatch::new_empty(def.schema.clone()),
    };
    Ok(Epoch {
        number: 0,
        offsets: Offsets::default(),
        changes: vec![ViewChanges {
            view: def.name.clone(),
            upserts: own,
            deletes,
        }],
    })
}

/// Every row of every view at the restored checkpoint, as one epoch of upserts.
fn full_epoch(catalog: &Catalog, source: &str, at: &Offsets) -> anyhow::Result<Epoch> {
    let mut changes = Vec::new();
    let mut number = 0;
    for def in catalog.views() {
        let Some(snap) = catalog.snapshot_from(source, &def.name) else {
            continue;
        };
        number = number.max(snap.epoch);
        let upserts = concat_batches(&def.schema, &snap.rows.batches()?)?;
        let key_schema = Arc::new(def.schema.project(&def.key)?);
        changes.push(ViewChanges {
            view: def.name.clone(),
            upserts,
            deletes: RecordBatch::new_empty(key_schema),
        });
    }
    Ok(Epoch {
        number,
        offsets: at.clone(),
        changes,
    })
}

/// At most this many queued epochs go to the sinks as one.
const MAX_COALESCED: usize = 256;

/// Hands every epoch to every sink in order; tells the gate which epoch all of them stored.
async fn drive(
    cfg: &Config,
    catalog: &Catalog,
    mut slots: Vec<Slot>,
    first: Vec<Option<Epoch>>,
    mut epochs: mpsc::Receiver<Epoch>,
    gate: &SinkGate,
) -> anyhow::Result<()> {
    for (slot, epoch) in slots.iter_mut().zip(first) {
        if let Some(e) = epoch {
            tracing::info!(
                sink = slot.cfg.name(),
                views = e.changes.len(),
                "view sink holds nothing yet; writing every view in full"
            );
            deliver(cfg, slot, &e).await?;
        }
    }
    let mut open = true;
    let mut latest = 0;
    while open || slots.iter().any(|s| !s.pending.is_empty()) {
        let due = slots
            .iter()
            .filter(|s| !s.pending.is_empty())
            .map(|s| s.last_write + s.gather)
            .min();
        if open {
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                got = epochs.recv() => match got {
                    Some(first) => {
                        // Sinks slower than the epochs (a Postgres transaction, fsyncs) would
                        // fall further and further behind: what queued up meanwhile goes as one.
                        let mut queued = vec![first];
                        while queued.len() < MAX_COALESCED {
                            match epochs.try_recv() {
                                Ok(e) => queued.push(e),
                                Err(_) => break,
                            }
                        }
                        let epoch = transforms::view::coalesce(queued)?;
                        latest = epoch.number;
                        for slot in &mut slots {
                            if slot.reshape && epoch.offsets.covers(&slot.position) {
                                // Topics created by hand may have more partitions than
                                // kafka.partitions; every shard of them goes.
                                let parts = epoch
                                    .offsets
                                    .0
                                    .keys()
                                    .map(|(_, p)| p + 1)
                                    .max()
                                    .unwrap_or(0)
                                    .max(cfg.kafka.partitions);
                                let e = summary_reshape(catalog, slot.unit, parts)?;
                                deliver(cfg, slot, &e).await?;
                                slot.reshape = false;
                            }
                            if !epoch.offsets.0.is_empty() && slot.position.covers(&epoch.offsets) {
                                continue;
                            }
                            if slot.gather.is_zero() {
                                deliver(cfg, slot, &epoch).await?;
                                slot.stored = epoch.number;
                                continue;
                            }
                            slot.pending.push(epoch.clone());
                            if slot.pending.len() >= MAX_COALESCED {
                                let all = std::mem::take(&mut slot.pending);
                                slot.pending.push(transforms::view::coalesce(all)?);
                            }
                        }
                    }
                    None => open = false,
                },
                _ = tokio::time::sleep_until(due.unwrap_or(far).into()) => {}
                _ = gate.wanted_changed() => {}
            }
        }
        let wanted = gate.wanted();
        for slot in &mut slots {
            let Some(last) = slot.pending.last().map(|e| e.number) else {
                continue;
            };
            let asked = wanted > slot.stored && last >= wanted;
            if !open || asked || slot.last_write.elapsed() >= slot.gather {
                let e = transforms::view::coalesce(std::mem::take(&mut slot.pending))?;
                deliver(cfg, slot, &e).await?;
                slot.stored = e.number;
                slot.last_write = Instant::now();
            }
        }
        // Every sink stored, or holds nothing pending up to, the smallest of these.
        let done = slots
            .iter()
            .map(|s| {
                if !s.pending.is_empty() {
                    s.stored
                } else {
                    latest
                }
            })
            .min()
            .unwrap_or(latest);
        gate.delivered(done);
    }
    Ok(())
}

/// Writes one epoch to one sink, reopening it and trying again on errors (a write is
/// idempotent by offsets, so a retry after an unknown outcome is safe).
async fn deliver(cfg: &Config, slot: &mut Slot, epoch: &Epoch) -> anyhow::Result<()> {
    // The offsets under the names the sink stores them by (topics that several units read).
    let stored = Epoch {
        offsets: transforms::group::to_sink(&epoch.offsets, &cfg.kafka.topic_prefix, slot.unit),
        ..epoch.clone()
    };
    let mut delay = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        match slot.sink.write(&stored).await {
            Ok(_) => break,
            Err(e) if attempt < WRITE_ATTEMPTS => {
                tracing::warn!(sink = slot.cfg.name(), epoch = epoch.number, attempt, error = %e, "view sink write failed; reopening the sink and trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(8));
                attempt += 1;
                match open_sink(cfg, &slot.cfg, slot.unit).await {
                    Ok(s) => slot.sink = s,
                    Err(e) => {
                        tracing::warn!(sink = slot.cfg.name(), error = %format!("{e:#}"), "reopening the view sink failed")
                    }
                }
            }
            Err(e) => {
                return Err(anyhow!(e).context(format!(
                    "view sink {} could not store epoch {} after {WRITE_ATTEMPTS} attempts; the processors stop so that no epoch is skipped (a restart resumes from the last checkpoint)",
                    slot.cfg.name(),
                    epoch.number
                )));
            }
        }
    }
    sinks::views::advance(&mut slot.position, &epoch.offsets);
    if let Some(m) = &slot.marker {
        // An fsync per epoch: off the runtime's workers, which serve SQL queries.
        let at = transforms::group::to_sink(&slot.position, &cfg.kafka.topic_prefix, slot.unit);
        let m = m.clone();
        tokio::task::spawn_blocking(move || write_marker(&m, &at))
            .await
            .context("the marker-writing thread failed")??;
    }
    Ok(())
}

/// One processor per group: two would write the same checkpoint and the same sinks. The lock
/// is the kernel's (`flock`), so it goes with the process however it ends.
fn lock_group(pc: &transforms::ProcessorConfig, member: bool) -> anyhow::Result<std::fs::File> {
    let path = pc.checkpoint_dir.join(format!("{}.lock", pc.group_id));
    let held = transforms::group::lock_file(&path, member)
        .with_context(|| format!("taking the lock {}", path.display()))?;
    if let Some(file) = held {
        return Ok(file);
    }
    if member {
        bail!(
            "a walbridge process with processors.instances: single runs the processors of group {} (it holds {}); \
             stop it before starting members of the group",
            pc.group_id,
            path.display()
        );
    }
    bail!(
        "another walbridge process already runs the processors of group {} (it holds {}; with processors.instances: group, every member does); \
         with processors.instances: single one instance runs per group: stop the other one, give this one its own group_id and checkpoint_dir, \
         or set processors.instances: group to share the partitions",
        pc.group_id,
        path.display()
    );
}

fn marker_path(pc: &transforms::ProcessorConfig, sink: &str) -> PathBuf {
    let name = match pc.unit {
        transforms::group::Unit::All => format!("{}.sink.{sink}.json", pc.group_id),
        u => format!("{}.{}.sink.{sink}.json", pc.group_id, u.name()),
    };
    pc.checkpoint_dir.join(name)
}

fn read_marker(path: &std::path::Path) -> anyhow::Result<Offsets> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Offsets::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let list: Vec<(String, i32, i64)> = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{} is not a walbridge sink position; remove it (the sink then gets every view in full)",
            path.display()
        )
    })?;
    Ok(Offsets(
        list.into_iter().map(|(t, p, o)| ((t, p), o)).collect(),
    ))
}

fn write_marker(path: &std::path::Path, at: &Offsets) -> anyhow::Result<()> {
    use std::io::Write;
    let list: Vec<(&str, i32, i64)> =
        at.0.iter()
            .map(|((t, p), o)| (t.as_str(), *p, *o))
            .collect();
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("json.tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&serde_json::to_vec(&list)?)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use transforms::arrow::array::{Int64Array, StringArray};
    use transforms::arrow::datatypes::{DataType, Field, Schema};

    /// Epoch `n` upserts key `k<n % 5>` with value `n` in view `v`.
    fn epoch(n: u64) -> Epoch {
        let rows = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("value", DataType::Int64, false),
        ]));
        let keys = Arc::new(Schema::new(vec![Field::new("k", DataType::Utf8, false)]));
        Epoch {
            number: n,
            offsets: Offsets([(("t".to_owned(), 0), n as i64)].into_iter().collect()),
            changes: vec![ViewChanges {
                view: "v".into(),
                upserts: RecordBatch::try_new(
                    rows,
                    vec![
                        Arc::new(StringArray::from(vec![format!("k{}", n % 5)])),
                        Arc::new(Int64Array::from(vec![n as i64])),
                    ],
                )
                .unwrap(),
                deletes: RecordBatch::new_empty(keys),
            }],
        }
    }

    fn files(dir: &std::path::Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for date in std::fs::read_dir(dir.join("v")).into_iter().flatten() {
            for f in std::fs::read_dir(date.unwrap().path()).unwrap() {
                let p = f.unwrap().path();
                if p.extension().is_some_and(|e| e == "parquet") {
                    out.push(p);
                }
            }
        }
        out
    }

    /// A Parquet sink writes the epochs that gathered when a checkpoint asks for one (and at
    /// the end), not one file per epoch; the gate reports an epoch stored only once it is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gathering_sink_writes_once_per_checkpoint_not_per_epoch() {
        let cfg = crate::config::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines.yaml"),
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!("walbridge-gather-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sink_cfg = ViewSinkConfig::Parquet {
            name: "lake".into(),
            dir: dir.clone(),
        };
        let slot = Slot {
            sink: open_sink(&cfg, &sink_cfg, transforms::group::Unit::All)
                .await
                .unwrap(),
            cfg: sink_cfg,
            unit: transforms::group::Unit::All,
            position: Offsets::default(),
            marker: None,
            gather: Duration::from_secs(3600),
            pending: Vec::new(),
            stored: 0,
            last_write: Instant::now(),
            reshape: false,
        };
        let gate = Arc::new(SinkGate::default());
        let (tx, rx) = mpsc::channel(64);
        let driver = {
            let gate = gate.clone();
            tokio::spawn(async move {
                drive(&cfg, &Catalog::new(), vec![slot], vec![None], rx, &gate).await
            })
        };
        for n in 1..=10 {
            tx.send(epoch(n)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            files(&dir).is_empty(),
            "nothing asked for yet: {:?}",
            files(&dir)
        );
        assert_eq!(gate.delivered_epoch(), 0, "no epoch stored yet");
        gate.want(10);
        let deadline = Instant::now() + Duration::from_secs(10);
        while gate.delivered_epoch() < 10 {
            assert!(
                Instant::now() < deadline,
                "epoch 10 not stored after the checkpoint asked"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            files(&dir).len(),
            1,
            "ten epochs, one file: {:?}",
            files(&dir)
        );
        for n in 11..=20 {
            tx.send(epoch(n)).await.unwrap();
        }
        drop(tx);
        driver.await.unwrap().unwrap();
        assert_eq!(gate.delivered_epoch(), 20);
        assert_eq!(
            files(&dir).len(),
            2,
            "the rest at the end: {:?}",
            files(&dir)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
