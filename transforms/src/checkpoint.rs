//! Checkpoints written off the fold's thread.
//!
//! A checkpoint is the whole input state (every row by key) with the offsets it reflects.
//! Copying and serializing all of it on the processor's thread took 60–200 ms at the demo's
//! size, and every change that arrived meanwhile waited: the tail of "commit → visible in SQL".
//! So the processor hands over only a [`Delta`] (the current row of each key that changed since
//! the last one, [`State::take_delta`](crate::state::State::take_delta)), and a writer thread keeps a [`Replica`] of the saved
//! state, applies the deltas in order and writes full checkpoint files (temp, fsync, rename),
//! the same format [`crate::runtime::load_checkpoint`] reads.
//!
//! Why the file equals what [`State::save`](crate::state::State::save) would have written at the delta's epoch: the
//! replica starts from a full save, and each delta names every input key whose row changed
//! since the previous one, with its value at the moment the delta was taken; the offsets,
//! epoch and LSN are taken at that same moment. So after applying deltas 1..n the replica holds,
//! for every key, its row as of delta n (keys not named kept their value, which did not change).
//! A unit test checks this against `save` on a random workload.
//!
//! Ordering with the sinks and alerts: a checkpoint may not get ahead of either (see
//! [`crate::runtime`]). The processor takes the delta at an epoch boundary it has handed to the
//! sinks, and gives the writer, with the delta, that epoch and the delivery receipts of the
//! alerts raised so far ([`Pending`]). The *writer* waits until the sinks report the epoch
//! stored and the broker acked every alert, and only then writes the file. So a crash still
//! finds a checkpoint at or behind what the sinks hold and with no alert after it lost, while
//! the fold never stops for the sinks: waiting on the fold's thread (up to 20 ms, every
//! checkpoint interval, longer while a Parquet sink compressed and fsynced its gathered
//! epochs) was the tail of "event produced → visible in SQL". The queue holds a few
//! checkpoints; sinks further behind than that make the fold wait at the next one, which bounds
//! memory. A write error, a sink failure or an undelivered alert stops the processor at its
//! next checkpoint or at exit.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::producer::DeliveryFuture;

use crate::input::{Order, SkuLoc, Stock};
use crate::runtime::{ProcessError, ProcessorStats, STOP_SINK_PATIENCE, SinkGate};
use crate::state::{CHECKPOINT_VERSION, Delta, RankShare, Saved};

/// The checkpointed state, kept by the writer thread.
#[derive(Debug, Default)]
pub struct Replica {
    topic_prefix: String,
    epoch: u64,
    max_lsn: u64,
    offsets: Vec<(String, i32, i64)>,
    products: BTreeMap<String, String>,
    customers: BTreeSet<i64>,
    orders: BTreeMap<i64, Order>,
    order_positions: BTreeMap<i64, (u64, u32)>,
    orders_floor: Option<(u64, u32)>,
    returns: BTreeMap<i64, i64>,
    cache: BTreeMap<SkuLoc, i64>,
    stock: BTreeMap<SkuLoc, Stock>,
    since: BTreeMap<SkuLoc, i64>,
    rank_shares: BTreeMap<String, RankShare>,
}

fn put<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, value: Option<V>) {
    match value {
        Some(v) => {
            map.insert(key, v);
        }
        None => {
            map.remove(&key);
        }
    }
}

impl Replica {
    pub fn new(saved: Saved) -> Replica {
        Replica {
            topic_prefix: saved.topic_prefix,
            epoch: saved.epoch,
            max_lsn: saved.max_lsn,
            offsets: saved.offsets,
            products: saved.products.into_iter().collect(),
            customers: saved.customers.into_iter().collect(),
            orders: saved.orders.into_iter().collect(),
            order_positions: saved
                .order_positions
                .into_iter()
                .map(|(k, l, i)| (k, (l, i)))
                .collect(),
            orders_floor: saved.orders_floor,
            returns: saved.returns.into_iter().collect(),
            cache: saved.cache.into_iter().collect(),
            stock: saved.stock.into_iter().collect(),
            since: saved.since.into_iter().collect(),
            rank_shares: saved.rank_shares.into_iter().collect(),
        }
    }

    pub fn apply(&mut self, d: Delta) {
        self.epoch = d.epoch;
        self.max_lsn = d.max_lsn;
        self.offsets = d.offsets;
        for (k, v) in d.products {
            put(&mut self.products, k, v);
        }
        for (k, exists) in d.customers {
            if exists {
                self.customers.insert(k);
            } else {
                self.customers.remove(&k);
            }
        }
        for (k, v) in d.orders {
            put(&mut self.orders, k, v);
        }
        for (k, v) in d.order_positions {
            put(&mut self.order_positions, k, v);
        }
        self.orders_floor = d.orders_floor;
        for (k, v) in d.returns {
            put(&mut self.returns, k, v);
        }
        for (k, v) in d.cache {
            put(&mut self.cache, k, v);
        }
        for (k, v) in d.stock {
            put(&mut self.stock, k, v);
        }
        for (k, v) in d.since {
            put(&mut self.since, k, v);
        }
        for (k, v) in d.rank_shares {
            put(&mut self.rank_shares, k, v);
        }
    }

    pub fn to_saved(&self) -> Saved {
        Saved {
            version: CHECKPOINT_VERSION,
            topic_prefix: self.topic_prefix.clone(),
            epoch: self.epoch,
            max_lsn: self.max_lsn,
            offsets: self.offsets.clone(),
            products: self
                .products
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            customers: self.customers.iter().copied().collect(),
            orders: self.orders.iter().map(|(k, v)| (*k, v.clone())).collect(),
            order_positions: self
                .order_positions
                .iter()
                .map(|(k, (l, i))| (*k, *l, *i))
                .collect(),
            orders_floor: self.orders_floor,
            returns: self.returns.iter().map(|(k, v)| (*k, *v)).collect(),
            cache: self.cache.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            stock: self.stock.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            since: self.since.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            rank_shares: self
                .rank_shares
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

/// One checkpoint for the writer: the delta, and what must be durable before its file may
/// appear.
pub struct Pending {
    pub delta: Delta,
    /// The view sinks and the epoch they must have stored (the delta's epoch boundary).
    pub sinks: Option<(Arc<SinkGate>, u64)>,
    /// Alerts raised before the delta was taken, by id, with their delivery receipts.
    pub alerts: Vec<(String, DeliveryFuture)>,
}

#[cfg(test)]
impl Pending {
    /// A delta with nothing to wait for.
    pub fn bare(delta: Delta) -> Pending {
        Pending {
            delta,
            sinks: None,
            alerts: Vec::new(),
        }
    }
}

/// Checkpoints that may wait for the sinks at once before the fold waits too.
const QUEUED: usize = 4;

/// Why a pending checkpoint is not written.
enum NotReady {
    /// The processor is gone, or stopping and the sinks took too long: the previous file stays
    /// and the next start replays from it.
    GaveUp,
    Failed(ProcessError),
}

/// The writer thread and its queue.
pub struct Writer {
    tx: Option<SyncSender<Pending>>,
    thread: Option<JoinHandle<()>>,
    failed: Arc<Mutex<Option<ProcessError>>>,
    give_up: Arc<GiveUp>,
    /// The processor's stop request, when it has one: a hand-off that waits for room in the
    /// queue gives up [`STOP_SINK_PATIENCE`] after it.
    stop: Option<Arc<AtomicBool>>,
    path: PathBuf,
}

/// When the writer stops waiting for the sinks: set when the processor stops (a bounded wait
/// for the last epochs) or fails (none).
#[derive(Default)]
struct GiveUp {
    at: Mutex<Option<Instant>>,
    /// The processor failed: giving up is not the sinks' fault, so it is not logged as theirs.
    failed: AtomicBool,
}

impl GiveUp {
    /// Gives up at `at` at the latest.
    fn by(&self, at: Instant) {
        let mut g = self.at.lock().unwrap_or_else(|e| e.into_inner());
        *g = Some(g.map_or(at, |old| old.min(at)));
    }

    fn due(&self) -> bool {
        self.at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| Instant::now() >= at)
    }
}

/// Where the writer sends alerts' receipts to be awaited, and under which topic name to
/// report one that failed.
pub struct Alerts {
    pub handle: tokio::runtime::Handle,
    pub topic: String,
}

impl Writer {
    pub fn start(
        path: PathBuf,
        mut replica: Replica,
        stats: Arc<ProcessorStats>,
        alerts: Option<Alerts>,
        stop: Option<Arc<AtomicBool>>,
    ) -> Result<Writer, ProcessError> {
        let (tx, rx) = sync_channel::<Pending>(QUEUED);
        let failed = Arc::new(Mutex::new(None));
        let give_up = Arc::new(GiveUp::default());
        let (fail, gu, file) = (failed.clone(), give_up.clone(), path.clone());
        let thread = std::thread::Builder::new()
            .name("processor-checkpoint".into())
            .spawn(move || {
                for mut p in rx {
                    match ready(&mut p, alerts.as_ref(), &gu) {
                        Ok(()) => {}
                        Err(NotReady::GaveUp) => return,
                        Err(NotReady::Failed(e)) => {
                            *fail.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                            return;
                        }
                    }
                    let t = Instant::now();
                    let epoch = p.delta.epoch;
                    replica.apply(p.delta);
                    if let Err(e) = crate::runtime::write_checkpoint(&file, &replica.to_saved()) {
                        let e = ProcessError::Checkpoint {
                            path: file.clone(),
                            what: format!("writing it failed: {e}"),
                        };
                        *fail.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        return;
                    }
                    stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                    stats
                        .last_checkpoint_ms
                        .store(crate::runtime::unix_ms(), Ordering::Relaxed);
                    tracing::debug!(
                        epoch,
                        ms = t.elapsed().as_millis() as u64,
                        "processor checkpoint written"
                    );
                }
            })
            .map_err(|e| ProcessError::Checkpoint {
                path: path.clone(),
                what: format!("cannot start the checkpoint thread: {e}"),
            })?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
            failed,
            give_up,
            stop,
            path,
        })
    }

    /// The writer's failure, if it had one (a failed write, a sink failure, an undelivered
    /// alert): the processor stops with it.
    pub fn failure(&self) -> Result<(), ProcessError> {
        match self.failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Queues a checkpoint; waits while the queue is full (the sinks are that far behind),
    /// but once the processor is asked to stop, for [`STOP_SINK_PATIENCE`] at most. False:
    /// not queued (stopping, and the sinks did not make room in time).
    pub fn send(&mut self, pending: Pending) -> Result<bool, ProcessError> {
        let mut item = pending;
        loop {
            self.failure()?;
            match self.tx.as_ref().map(|tx| tx.try_send(item)) {
                Some(Ok(())) => return Ok(true),
                Some(Err(TrySendError::Full(p))) => item = p,
                Some(Err(TrySendError::Disconnected(_))) | None => {
                    self.failure()?;
                    return Err(ProcessError::Checkpoint {
                        path: self.path.clone(),
                        what: "the checkpoint thread stopped".into(),
                    });
                }
            }
            if self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
                self.give_up.by(Instant::now() + STOP_SINK_PATIENCE);
            }
            if self.give_up.due() {
                tracing::warn!(
                    "view sinks did not store the last epochs in time; exiting without a final checkpoint (the next start replays them)"
                );
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits until every queued checkpoint is written, or until the sinks have had `patience`
    /// (`None`: as long as they take) to store what the queued ones wait for (the rest is then
    /// not written).
    pub fn finish(mut self, patience: Option<Duration>) -> Result<(), ProcessError> {
        self.end(patience.unwrap_or(Duration::from_secs(1 << 30)));
        self.failure()
    }

    fn end(&mut self, patience: Duration) {
        self.give_up.by(Instant::now() + patience);
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Writer {
    /// Without [`Writer::finish`] (the processor failed): what is written is written, and no
    /// checkpoint waits for the sinks any more.
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.give_up.failed.store(true, Ordering::SeqCst);
        }
        self.end(Duration::ZERO);
    }
}

/// Waits until `p`'s alerts are acked and its epoch is stored by the sinks.
fn ready(p: &mut Pending, alerts: Option<&Alerts>, give_up: &GiveUp) -> Result<(), NotReady> {
    if let Some((gate, epoch)) = &p.sinks {
        let started = Instant::now();
        while gate.delivered_epoch() < *epoch {
            if let Some(f) = gate.failure() {
                return Err(NotReady::Failed(ProcessError::Sink(f)));
            }
            if give_up.due() {
                if give_up.failed.load(Ordering::SeqCst) {
                    return Err(NotReady::GaveUp);
                }
                tracing::warn!(
                    epoch,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "view sinks did not store the last epochs in time; exiting without a final checkpoint (the next start replays them)"
                );
                return Err(NotReady::GaveUp);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    if p.alerts.is_empty() {
        return Ok(());
    }
    let Some(a) = alerts else {
        return Err(NotReady::Failed(ProcessError::Checkpoint {
            path: PathBuf::new(),
            what: "alerts without an alert producer (a bug)".into(),
        }));
    };
    for (id, f) in std::mem::take(&mut p.alerts) {
        let reason = match a.handle.block_on(f) {
            Ok(Ok(_)) => continue,
            Ok(Err((e, _))) => e.to_string(),
            Err(_) => "the producer was dropped".to_owned(),
        };
        return Err(NotReady::Failed(ProcessError::AlertUndelivered {
            id,
            topic: a.topic.clone(),
            reason,
        }));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{Change, Event};
    use crate::state::{SafetyStock, State};

    /// A small deterministic generator (no rand dependency for one test).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    fn change(r: &mut Lcg) -> Change {
        let sku = format!("S{}", r.next(30));
        let loc = format!("L{}", r.next(4));
        let gone = r.next(5) == 0;
        match r.next(7) {
            0 => Change::Product {
                sku,
                category: (!gone).then(|| format!("c{}", r.next(3))),
            },
            1 => Change::Customer {
                id: r.next(40) as i64,
                exists: !gone,
            },
            2 => Change::Order {
                id: r.next(80) as i64,
                row: (!gone).then(|| Order {
                    customer_id: r.next(40) as i64,
                    status: ["pending", "paid", "cancelled"][r.next(3) as usize].into(),
                    total_cents: r.next(10_000) as i128,
                    placed_at: r.next(1000) as i64,
                    updated_at: r.next(1000) as i64,
                }),
            },
            3 => Change::Return {
                id: r.next(30) as i64,
                order_id: (!gone).then(|| r.next(80) as i64),
            },
            4 => Change::InventoryCache {
                key: (sku, loc),
                available: (!gone).then(|| r.next(50) as i64),
            },
            _ => Change::StockLevel {
                key: (sku, loc),
                row: (!gone).then(|| Stock {
                    on_hand: r.next(50) as i64,
                    reserved: r.next(10) as i64,
                }),
            },
        }
    }

    /// `Saved` with every list sorted, so two saves of equal states compare equal.
    fn normal(s: Saved) -> String {
        let mut v = serde_json::to_value(&s).unwrap();
        for (_, list) in v.as_object_mut().unwrap().iter_mut() {
            if let Some(a) = list.as_array_mut() {
                a.sort_by_key(|x| x.to_string());
            }
        }
        v.to_string()
    }

    #[test]
    fn deltas_applied_in_order_give_the_full_save() {
        let mut r = Lcg(7);
        let mut state = State::new(SafetyStock::default());
        for i in 0..300 {
            state.apply(&Event {
                change: change(&mut r),
                lsn: i,
                ts_ms: i as i64,
            });
        }
        state.finish_epoch().unwrap();
        let mut replica = Replica::new(state.save("p"));
        state.track_checkpoint_changes(true);
        for round in 0..40u64 {
            for i in 0..r.next(60) {
                // With source positions, so the orders' positions are checkpointed too.
                state.apply_at(
                    &Event {
                        change: change(&mut r),
                        lsn: 1000 + round * 100 + i,
                        ts_ms: (round * 1000 + i) as i64,
                    },
                    Some(i as u32),
                );
            }
            state.finish_epoch().unwrap();
            state.offsets.0.insert(("t".into(), 0), round as i64);
            replica.apply(state.take_delta());
            assert!(round == 0 || !replica.order_positions.is_empty());
            assert_eq!(
                normal(replica.to_saved()),
                normal(state.save("p")),
                "round {round}"
            );
        }
    }

    #[test]
    fn a_checkpoint_appears_only_once_the_sinks_stored_its_epoch() {
        let dir = std::env::temp_dir().join(format!("wb-ckpt-gate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut state = State::new(SafetyStock::default());
        state.track_checkpoint_changes(true);
        let path = dir.join("views.json");
        let mut w = Writer::start(
            path.clone(),
            Replica::new(state.save("p")),
            Arc::default(),
            None,
            None,
        )
        .unwrap();
        let gate = Arc::new(SinkGate::default());
        gate.delivered(3);
        w.send(Pending {
            delta: state.take_delta(),
            sinks: Some((gate.clone(), 5)),
            alerts: Vec::new(),
        })
        .unwrap();
        // The sinks hold epoch 3 of 5: a file now would be ahead of them after a crash.
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !path.exists(),
            "checkpoint written before the sinks stored its epoch"
        );
        gate.delivered(5);
        w.finish(None).unwrap();
        assert!(
            path.exists(),
            "checkpoint not written once the sinks stored its epoch"
        );

        // Sinks that fail: no checkpoint, and the processor hears why.
        let _ = std::fs::remove_file(&path);
        let mut w =
            Writer::start(path.clone(), Replica::default(), Arc::default(), None, None).unwrap();
        let gate = Arc::new(SinkGate::default());
        w.send(Pending {
            delta: Delta::default(),
            sinks: Some((gate.clone(), 1)),
            alerts: Vec::new(),
        })
        .unwrap();
        gate.fail("read_model: connection refused".into());
        let e = w.finish(None).unwrap_err().to_string();
        assert!(e.contains("connection refused"), "{e}");
        assert!(!path.exists());

        // Stopping while the sinks stay behind: no checkpoint after the patience, no error.
        let w = {
            let mut w = Writer::start(path.clone(), Replica::default(), Arc::default(), None, None)
                .unwrap();
            w.send(Pending {
                delta: Delta::default(),
                sinks: Some((Arc::new(SinkGate::default()), 1)),
                alerts: Vec::new(),
            })
            .unwrap();
            w
        };
        let t = Instant::now();
        w.finish(Some(Duration::from_millis(100))).unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_writer_writes_the_replica_and_reports_a_bad_path() {
        let dir = std::env::temp_dir().join(format!("wb-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut state = State::new(SafetyStock::default());
        state.track_checkpoint_changes(true);
        let replica = Replica::new(state.save("p"));
        let path = dir.join("views.json");
        let mut w = Writer::start(path.clone(), replica, Arc::default(), None, None).unwrap();
        state.apply(&Event {
            change: Change::Customer {
                id: 9,
                exists: true,
            },
            lsn: 5,
            ts_ms: 5,
        });
        w.send(Pending::bare(state.take_delta())).unwrap();
        w.finish(None).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let saved: Saved = serde_json::from_str(&text).unwrap();
        assert_eq!(normal(saved), normal(state.save("p")));

        // A file where the directory should be: the write fails and the processor hears it.
        let blocked = dir.join("views.json").join("x.json");
        let mut w = Writer::start(blocked, Replica::default(), Arc::default(), None, None).unwrap();
        w.send(Pending::bare(Delta::default())).unwrap();
        let e = w.finish(None).unwrap_err().to_string();
        assert!(e.contains("x.json"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
