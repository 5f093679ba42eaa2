//! `walbridge views bench`: processor throughput in events per second on one core.
//!
//! The fold figure feeds pre-decoded stock changes (the availability and reconciliation
//! processors' input) through the same `State::apply` and epoch close as production, closing an
//! epoch every 10,000 events and publishing every changed view's full snapshot to a catalog,
//! on one thread. The end-to-end figure reads the configured change topics from the beginning
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

/// Events per second of the fold with epoch close and catalog publish, on this thread.
pub fn fold(n: u64) -> Result<f64, ProcessError> {
    let evs = events(n);
    let safety = SafetyStock {
        default: 2,
        ..Default::default()
    };
    let mut state = State::new(safety);
    let catalog = Catalog::new();
    let start = Instant::now();
    for (i, ev) in evs.iter().enumerate() {
        state.apply(ev);
        if (i as u64 + 1) % EPOCH_EVENTS == 0 {
            publish(&mut state, &catalog)?;
        }
    }
    publish(&mut state, &catalog)?;
    Ok(evs.len() as f64 / start.elapsed().as_secs_f64())
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
                    batches: v.batches()?,
                },
            );
        }
    }
    Ok(())
}

/// Prints the figures.
pub async fn run(events: u64, config: Option<ProcessorConfig>) -> Result<(), ProcessError> {
    let rate = tokio::task::spawn_blocking(move || fold(events))
        .await
        .map_err(|_| ProcessError::Panicked)??;
    println!(
        "fold + epoch + publish, pre-decoded: {:.0} events/s on one core ({events} events, epochs of {EPOCH_EVENTS})",
        rate
    );
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
        let rate = super::fold(2_000_000).unwrap();
        println!("fold + epoch + publish, pre-decoded: {rate:.0} events/s on one core");
    }
}
