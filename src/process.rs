//! `walbridge process`: the stream processors with their SQL endpoint and view sinks, from the
//! `processors:` section of the config.
//!
//! The processor thread folds the change topics into the views and sends an epoch per step
//! (see `transforms::runtime`). One task here hands every epoch to every configured sink, in
//! order, and reports back through a [`SinkGate`] which epoch all of them stored; the processor
//! never checkpoints past that. Together with the replay cuts at the sinks' positions this is
//! what keeps each sink exact after `kill -9` (the argument is in the runtime's module doc).
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
use std::time::Duration;

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
    running: transforms::Running,
    driver: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _lock: std::fs::File,
    _sql: Option<transforms::sql::ServerHandle>,
    _metrics: Option<crate::metrics::TaskGuard>,
}

impl Process {
    /// Stops the processor (final epoch, sinks, checkpoint) and waits for it and the sinks.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stopper
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.join().await
    }

    /// Waits until the processor ends (only an error, or [`Process::stop`], ends it).
    pub async fn join(self) -> anyhow::Result<()> {
        let processed = self.running.join().await;
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
    cfg: ViewSinkConfig,
    sink: Box<dyn ViewSink>,
    position: Offsets,
    /// The file keeping the position of a sink that stores none itself.
    marker: Option<PathBuf>,
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
    let lock = lock_group(&pc)?;

    let mut slots = Vec::new();
    for s in &pcfg.sinks {
        let sink = open_sink(cfg, s).await?;
        let marker = sink
            .committed_offsets()
            .is_none()
            .then(|| marker_path(&pc, s.name()));
        let position = match (sink.committed_offsets(), &marker) {
            (Some(o), _) => o.clone(),
            (None, Some(m)) => read_marker(m)?,
            (None, None) => Offsets::default(),
        };
        tracing::info!(
            sink = s.name(),
            partitions = position.0.len(),
            "view sink opened"
        );
        slots.push(Slot {
            cfg: s.clone(),
            sink,
            position,
            marker,
        });
    }

    let gate = Arc::new(SinkGate::default());
    let feed = (!slots.is_empty()).then(|| SinkFeed {
        positions: slots.iter().map(|s| s.position.clone()).collect(),
        gate: gate.clone(),
    });
    let mut running = transforms::run_with(pc.clone(), feed)?;
    let stopper = running.stopper();
    let catalog = running.catalog.clone();
    let epochs = std::mem::replace(&mut running.epochs, mpsc::channel(1).1);

    // A sink behind the checkpoint missed epochs: refuse it before it takes any.
    let mut first = Vec::new();
    for slot in &slots {
        if running.restored.0.is_empty() || slot.position.covers(&running.restored) {
            first.push(None);
        } else if slot.position.0.is_empty() {
            first.push(Some(full_epoch(&catalog, &running.restored)?));
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
                how_to_empty(&slot.cfg, &pc)
            );
        }
    }
    let driver = (!slots.is_empty()).then(|| {
        let cfg = cfg.clone();
        let gate = gate.clone();
        tokio::spawn(async move {
            let r = drive(&cfg, slots, first, epochs, &gate).await;
            if let Err(e) = &r {
                gate.fail(format!("{e:#}"));
            }
            r
        })
    });

    let metrics = match pcfg.metrics_listen {
        None => None,
        Some(listen) => {
            let m = crate::process_metrics::ProcessMetrics::new(
                &cfg.kafka.client(),
                running.stats.clone(),
                gate.clone(),
                !pcfg.sinks.is_empty(),
            )?;
            Some(crate::process_metrics::serve(m, listen).await?)
        }
    };
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
    Ok(Process {
        catalog,
        sql_addr: sql.as_ref().map(|s| s.local_addr()),
        stopper,
        running,
        driver,
        _lock: lock,
        _sql: sql,
        _metrics: metrics,
    })
}

async fn open_sink(cfg: &Config, s: &ViewSinkConfig) -> anyhow::Result<Box<dyn ViewSink>> {
    Ok(match s {
        ViewSinkConfig::Kafka { name, topic_prefix } => {
            Box::new(sinks::views::kafka::KafkaViewSink::new(
                name,
                sinks::views::kafka::KafkaViewSettings {
                    brokers: cfg.kafka.bootstrap_servers(),
                    topic_prefix: topic_prefix
                        .clone()
                        .unwrap_or_else(|| cfg.kafka.topic_prefix.clone()),
                    partitions: cfg.kafka.partitions,
                    replication_factor: i32::from(cfg.kafka.replication_factor),
                    extra: cfg
                        .kafka
                        .producer
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                },
            )?)
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
            sinks::views::parquet::ParquetViewSink::open(name, dir)
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
        ViewSinkConfig::Parquet { dir, .. } => format!("remove {}", dir.display()),
    }
}

/// Every row of every view at the restored checkpoint, as one epoch of upserts.
fn full_epoch(catalog: &Catalog, at: &Offsets) -> anyhow::Result<Epoch> {
    let mut changes = Vec::new();
    let mut number = 0;
    for def in catalog.views() {
        let Some(snap) = catalog.snapshot(&def.name) else {
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

/// Consecutive epochs as one: per view and key the last change wins (within an epoch deletes
/// come before upserts, as the sinks apply them), offsets are the last epoch's.
///
/// Why this is exact for every sink, also one whose position lies inside the span: the rows are
/// absolute (whole rows, whole-key deletes), so the result names every key that changed in any
/// of the epochs with its value at the end. A sink holding the first epochs gets some keys again
/// with the value it already has, and every key that changed after its position with the right
/// value; what a net diff across its position would miss (a key changed and changed back) is
/// not lost here, since each epoch was computed from the state at its own start.
fn coalesce(mut epochs: Vec<Epoch>) -> anyhow::Result<Epoch> {
    use std::collections::HashMap;
    use transforms::arrow::array::ArrayRef;
    use transforms::arrow::compute::interleave;
    use transforms::arrow::row::{RowConverter, SortField};

    if epochs.len() == 1 {
        return Ok(epochs.pop().expect("one epoch"));
    }
    let last = epochs.last().expect("not empty");
    let (number, mut offsets) = (last.number, last.offsets.clone());
    for e in &epochs {
        sinks::views::advance(&mut offsets, &e.offsets);
    }
    // Views in order of first appearance, each with its epochs' (upserts, deletes) in order.
    let mut views: Vec<(String, Vec<(&RecordBatch, &RecordBatch)>)> = Vec::new();
    for e in &epochs {
        for c in &e.changes {
            match views.iter_mut().find(|(v, _)| *v == c.view) {
                Some((_, list)) => list.push((&c.upserts, &c.deletes)),
                None => views.push((c.view.clone(), vec![(&c.upserts, &c.deletes)])),
            }
        }
    }
    let mut changes = Vec::with_capacity(views.len());
    for (view, parts) in views {
        let key_schema = parts[0].1.schema();
        let row_schema = parts[0].0.schema();
        let key_idx: Vec<usize> = key_schema
            .fields()
            .iter()
            .map(|f| row_schema.index_of(f.name()))
            .collect::<Result<_, _>>()?;
        let converter = RowConverter::new(
            key_schema
                .fields()
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )?;
        // Last change per key: (is upsert, part, row), in first-seen order of the keys.
        let mut slot_of: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut last: Vec<(bool, usize, usize)> = Vec::new();
        let mut record = |key: &[u8], change: (bool, usize, usize)| match slot_of.get(key) {
            Some(i) => last[*i] = change,
            None => {
                slot_of.insert(key.to_vec(), last.len());
                last.push(change);
            }
        };
        for (p, (upserts, deletes)) in parts.iter().enumerate() {
            let rows = converter.convert_columns(deletes.columns())?;
            for r in 0..deletes.num_rows() {
                record(rows.row(r).as_ref(), (false, p, r));
            }
            let keys: Vec<ArrayRef> = key_idx.iter().map(|i| upserts.column(*i).clone()).collect();
            let rows = converter.convert_columns(&keys)?;
            for r in 0..upserts.num_rows() {
                record(rows.row(r).as_ref(), (true, p, r));
            }
        }
        let pick = |upsert: bool| -> Vec<(usize, usize)> {
            last.iter()
                .filter(|(u, _, _)| *u == upsert)
                .map(|(_, p, r)| (*p, *r))
                .collect()
        };
        let gather = |batches: Vec<&RecordBatch>,
                      at: &[(usize, usize)]|
         -> anyhow::Result<RecordBatch> {
            let schema = batches[0].schema();
            let columns = (0..schema.fields().len())
                .map(|c| {
                    let arrays: Vec<&dyn transforms::arrow::array::Array> =
                        batches.iter().map(|b| b.column(c).as_ref()).collect();
                    interleave(&arrays, at)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(RecordBatch::try_new_with_options(
                schema,
                columns,
                &transforms::arrow::array::RecordBatchOptions::new().with_row_count(Some(at.len())),
            )?)
        };
        changes.push(ViewChanges {
            view,
            upserts: gather(parts.iter().map(|p| p.0).collect(), &pick(true))?,
            deletes: gather(parts.iter().map(|p| p.1).collect(), &pick(false))?,
        });
    }
    Ok(Epoch {
        number,
        offsets,
        changes,
    })
}

/// Hands every epoch to every sink in order; tells the gate which epoch all of them stored.
async fn drive(
    cfg: &Config,
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
    while let Some(first) = epochs.recv().await {
        // Sinks slower than the epochs (a Postgres transaction, fsyncs) would fall further and
        // further behind: what queued up meanwhile goes as one epoch.
        let mut queued = vec![first];
        while queued.len() < MAX_COALESCED {
            match epochs.try_recv() {
                Ok(e) => queued.push(e),
                Err(_) => break,
            }
        }
        let epoch = coalesce(queued)?;
        for slot in &mut slots {
            if !epoch.offsets.0.is_empty() && slot.position.covers(&epoch.offsets) {
                continue;
            }
            deliver(cfg, slot, &epoch).await?;
        }
        gate.delivered(epoch.number);
    }
    Ok(())
}

/// Writes one epoch to one sink, reopening it and trying again on errors (a write is
/// idempotent by offsets, so a retry after an unknown outcome is safe).
async fn deliver(cfg: &Config, slot: &mut Slot, epoch: &Epoch) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        match slot.sink.write(epoch).await {
            Ok(_) => break,
            Err(e) if attempt < WRITE_ATTEMPTS => {
                tracing::warn!(sink = slot.cfg.name(), epoch = epoch.number, attempt, error = %e, "view sink write failed; reopening the sink and trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(8));
                attempt += 1;
                match open_sink(cfg, &slot.cfg).await {
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
        write_marker(m, &slot.position)?;
    }
    Ok(())
}

/// One processor per group: two would write the same checkpoint and the same sinks. The lock
/// is the kernel's (`flock`), so it goes with the process however it ends.
fn lock_group(pc: &transforms::ProcessorConfig) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(&pc.checkpoint_dir)
        .with_context(|| format!("creating {}", pc.checkpoint_dir.display()))?;
    let path = pc.checkpoint_dir.join(format!("{}.lock", pc.group_id));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        bail!(
            "another walbridge process already runs the processors of group {} (it holds {}); \
             one instance per processors.group_id for now: stop the other one, or give this one its own group_id and checkpoint_dir",
            pc.group_id,
            path.display()
        );
    }
    Ok(file)
}

fn marker_path(pc: &transforms::ProcessorConfig, sink: &str) -> PathBuf {
    pc.checkpoint_dir
        .join(format!("{}.sink.{sink}.json", pc.group_id))
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

    fn changes(upserts: &[(&str, i64)], deletes: &[&str]) -> ViewChanges {
        let rows = Arc::new(Schema::new(vec![
            Field::new("sku", DataType::Utf8, false),
            Field::new("available", DataType::Int64, false),
        ]));
        let keys = Arc::new(Schema::new(vec![Field::new("sku", DataType::Utf8, false)]));
        ViewChanges {
            view: "v".into(),
            upserts: RecordBatch::try_new(
                rows,
                vec![
                    Arc::new(StringArray::from_iter_values(upserts.iter().map(|u| u.0))),
                    Arc::new(Int64Array::from_iter_values(upserts.iter().map(|u| u.1))),
                ],
            )
            .unwrap(),
            deletes: RecordBatch::try_new(
                keys,
                vec![Arc::new(StringArray::from_iter_values(
                    deletes.iter().copied(),
                ))],
            )
            .unwrap(),
        }
    }

    fn epoch(n: u64, next: i64, c: ViewChanges) -> Epoch {
        Epoch {
            number: n,
            offsets: Offsets([(("t".to_owned(), 0), next)].into_iter().collect()),
            changes: vec![c],
        }
    }

    fn contents(c: &ViewChanges) -> (Vec<(String, i64)>, Vec<String>) {
        use transforms::arrow::array::AsArray;
        use transforms::arrow::datatypes::Int64Type;
        let u = &c.upserts;
        let ups = (0..u.num_rows())
            .map(|i| {
                (
                    u.column(0).as_string::<i32>().value(i).to_owned(),
                    u.column(1).as_primitive::<Int64Type>().value(i),
                )
            })
            .collect();
        let d = &c.deletes;
        let dels = (0..d.num_rows())
            .map(|i| d.column(0).as_string::<i32>().value(i).to_owned())
            .collect();
        (ups, dels)
    }

    #[test]
    fn coalesced_epochs_keep_the_last_change_of_every_key() {
        let merged = coalesce(vec![
            epoch(1, 10, changes(&[("a", 1), ("b", 2)], &["x"])),
            // a leaves, b changes, c arrives, x comes back
            epoch(2, 20, changes(&[("b", 3), ("c", 4), ("x", 5)], &["a"])),
            // c leaves and comes back within one epoch: deletes first, so it stays
            epoch(3, 30, changes(&[("c", 6)], &["c"])),
        ])
        .unwrap();
        assert_eq!(merged.number, 3);
        assert_eq!(merged.offsets.0[&("t".to_owned(), 0)], 30);
        let (mut ups, dels) = contents(&merged.changes[0]);
        ups.sort();
        assert_eq!(ups, [("b".into(), 3), ("c".into(), 6), ("x".into(), 5)]);
        assert_eq!(dels, ["a"]);
    }
}
