//! `walbridge views bench`: processor throughput in events per second on one core.
//!
//! The fold figures feed pre-decoded stock changes (the availability and reconciliation
//! processors' input) through the same `State::apply` and epoch close as production, publishing
//! every changed view to a catalog, on one thread: once closing an epoch every 10,000 events,
//! once closing them as the runtime does while catching up (see [`Epochs::Adaptive`]). The
//! first says what a close costs when epochs are small; the second is the processor's
//! throughput when it has a backlog. The end-to-end figure reads the configured change topics from the beginning
//! (Kafka fetch, Avro decode, fold, epochs) with a fresh state.

use std::time::{Duration, Instant};

use crate::input::{Change, Event, Stock};
use crate::runtime::{self, ProcessError, ProcessorConfig};
use crate::state::{SafetyStock, State};
use crate::view::{Catalog, Snapshot};

const EPOCH_EVENTS: u64 = 10_000;

/// Deterministic stock changes over 5,000 SKUs x 4 locations, with a product row per SKU.
fn events(n: u64) -> Vec<Event> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(n as usize + 5000);
    for i in 0..5000u64 {
        out.push(Event {
            change: Change::Product {
                sku: format!("SKU-{i:06}"),
                category: Some(format!("cat{}", i % 12)),
            },
            lsn: i,
            ts_ms: 0,
        });
    }
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let sku = format!("SKU-{:06}", x % 5000);
        let loc = format!("L{}", (x >> 20) % 4);
        let on_hand = ((x >> 32) % 100) as i64;
        let reserved = ((x >> 40) % 100) as i64 % (on_hand + 1);
        let change = if i % 7 == 0 {
            Change::InventoryCache {
                key: (sku, loc),
                available: Some(on_hand - reserved),
            }
        } else {
            Change::StockLevel {
                key: (sku, loc),
                row: Some(Stock { on_hand, reserved }),
            }
        };
        out.push(Event {
            change,
            lsn: 5000 + i,
            ts_ms: i as i64,
        });
    }
    out
}

/// How the bench closes epochs.
#[derive(Debug, Clone, Copy)]
pub enum Epochs {
    /// Every this many events.
    Every(u64),
    /// As `walbridge process` does while catching up: after `interval`, or after four times
    /// the last close's cost when that is longer (so closing takes at most a fifth of the time).
    Adaptive { interval: Duration },
}

/// One fold run's figures.
#[derive(Debug, Clone, Copy)]
pub struct FoldFigures {
    pub events_per_s: f64,
    pub epochs: u64,
    /// Share of the time spent closing epochs (view updates, change batches, publish).
    pub closing: f64,
}

/// The fold with epoch close and catalog publish, on this thread.
pub fn fold(n: u64, epochs: Epochs) -> Result<FoldFigures, ProcessError> {
    let evs = events(n);
    let safety = SafetyStock {
        default: 2,
        ..Default::default()
    };
    let mut state = State::new(safety);
    let catalog = Catalog::new();
    let start = Instant::now();
    let mut closing = Duration::ZERO;
    let mut closed = 0u64;
    let mut next = match epochs {
        Epochs::Adaptive { interval } => start + interval,
        Epochs::Every(_) => start,
    };
    for (i, ev) in evs.iter().enumerate() {
        state.apply(ev);
        let due = match epochs {
            Epochs::Every(k) => (i as u64 + 1).is_multiple_of(k),
            // Checking the clock every 256 events, as the runtime does per polled batch.
            Epochs::Adaptive { .. } => i % 256 == 255 && Instant::now() >= next,
        };
        if due {
            let t = Instant::now();
            publish(&mut state, &catalog)?;
            let cost = t.elapsed();
            closing += cost;
            closed += 1;
            if let Epochs::Adaptive { interval } = epochs {
                next = Instant::now() + interval.max(cost * 4);
            }
        }
    }
    let t = Instant::now();
    publish(&mut state, &catalog)?;
    closing += t.elapsed();
    let total = start.elapsed();
    Ok(FoldFigures {
        events_per_s: evs.len() as f64 / total.as_secs_f64(),
        epochs: closed + 1,
        closing: closing.as_secs_f64() / total.as_secs_f64(),
    })
}

/// Both ways of closing epochs, printed.
fn fold_report(events: u64) -> Result<(), ProcessError> {
    let fixed = fold(events, Epochs::Every(EPOCH_EVENTS))?;
    println!(
        "fold + epoch + publish, pre-decoded, an epoch every {EPOCH_EVENTS} events: {:.0} events/s on one core ({} epochs, {:.0} % of the time closing them)",
        fixed.events_per_s,
        fixed.epochs,
        fixed.closing * 100.0
    );
    let interval = Duration::from_millis(50);
    let adaptive = fold(events, Epochs::Adaptive { interval })?;
    println!(
        "fold + epoch + publish, pre-decoded, epochs as `walbridge process` closes them (50 ms, or 4x the close cost): {:.0} events/s on one core ({} epochs, {:.0} % of the time closing them)",
        adaptive.events_per_s,
        adaptive.epochs,
        adaptive.closing * 100.0
    );
    Ok(())
}

fn publish(state: &mut State, catalog: &Catalog) -> Result<(), ProcessError> {
    let out = state.finish_epoch()?;
    for c in &out.changes {
        if let Some(v) = state.view(&c.view) {
            catalog.publish(
                &v.def,
                Snapshot {
                    epoch: state.epoch,
                    offsets: state.offsets.clone(),
                    rows: v.published(),
                },
            );
        }
    }
    Ok(())
}

/// Prints the figures.
pub async fn run(events: u64, config: Option<ProcessorConfig>) -> Result<(), ProcessError> {
    tokio::task::spawn_blocking(move || fold_report(events))
        .await
        .map_err(|_| ProcessError::Panicked)??;
    if let Some(cfg) = config {
        let quiet = Duration::from_secs(1);
        let (applied, secs) = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            let (state, _) = runtime::catch_up(&cfg, State::new(cfg.safety_stock.clone()), quiet)?;
            // The loop ends after a quiet second with nothing to read: not work.
            let secs = (start.elapsed() - quiet).as_secs_f64();
            Ok::<_, ProcessError>((state.applied, secs))
        })
        .await
        .map_err(|_| ProcessError::Panicked)??;
        println!(
            "end to end from Kafka (fetch, Avro decode, fold, epochs): {:.0} events/s ({applied} events in {secs:.2} s, one processor thread)",
            applied as f64 / secs
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// `cargo test --release -p transforms -- --ignored --nocapture fold_throughput`: the fold
    /// figure without building the whole binary in release.
    #[test]
    #[ignore = "a measurement, not a test; run it in release"]
    fn fold_throughput() {
        super::fold_report(2_000_000).unwrap();
    }
}
