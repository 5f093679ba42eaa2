//! View sinks: where the processors' live views go besides the SQL endpoint.
//!
//! A processor emits [`Epoch`]s (per view: full rows that are new or changed, keys that left,
//! and the input offsets the epoch reflects). A [`ViewSink`] applies them downstream:
//!
//! | sink | where | guarantee |
//! |---|---|---|
//! | [`kafka::KafkaViewSink`] | compacted topic `<prefix>.view.<name>` | at-least-once; compaction keeps the right latest value per key |
//! | [`postgres::PostgresViewSink`] | a table per view + `walbridge_offsets` | effectively once: changes and offsets commit in one transaction |
//! | [`parquet::ParquetViewSink`] | `<dir>/<view>/date=YYYY-MM-DD/part-….parquet` changelog files | at-least-once per epoch file; torn files never visible |
//!
//! How `walbridge process` drives them (`src/process.rs`, `transforms::runtime`): every epoch
//! goes to every sink in order, a sink skips the epochs it already holds
//! ([`Written::AlreadyHeld`]), and the processor checkpoints only offsets that every sink
//! stored, so after a crash each sink is at or ahead of the checkpoint. The replay from the
//! checkpoint closes an epoch exactly at each sink's stored offsets, so the epochs a sink is
//! given start where it stands: an epoch carries net changes, and one that straddled a sink's
//! position would miss a key that changed and changed back inside it. A sink that stores no
//! offsets itself (Kafka) has its position kept in a file next to the checkpoint. A failed
//! `write` is retried (the sink reopened); when it keeps failing the processor stops without
//! checkpointing past the epoch, and the restart resumes there.

pub mod kafka;
pub mod parquet;
pub mod postgres;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::error::ArrowError;
use transforms::view::{Epoch, Offsets, ViewChanges};

/// What a sink did with an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Durably stored; `committed_offsets` now returns the epoch's offsets.
    Stored,
    /// The sink already held this epoch (from before a restart); nothing was written.
    AlreadyHeld,
}

#[derive(Debug, thiserror::Error)]
pub enum ViewSinkError {
    #[error("view sink {sink}: kafka: {reason}")]
    Kafka { sink: String, reason: String },
    #[error("view sink {sink}: postgres: {what}: {source}")]
    Postgres {
        sink: String,
        what: String,
        source: tokio_postgres::Error,
    },
    #[error("view sink {sink}: parquet: {what} ({path}): {reason}")]
    Parquet {
        sink: String,
        path: String,
        what: String,
        reason: String,
    },
    #[error("view sink {sink}: view {view}: {reason}")]
    View {
        sink: String,
        view: String,
        reason: String,
    },
    #[error("view sink {sink}: view {view}: cannot encode rows: {source}")]
    Arrow {
        sink: String,
        view: String,
        source: ArrowError,
    },
}

/// A place views go. Contract: `write` returns only once the epoch is durably stored (or is
/// known to be held already); epochs are given in order; per key, the last write wins.
#[async_trait]
pub trait ViewSink: Send {
    /// Name used in logs, errors and the offsets the sink stores.
    fn name(&self) -> &str;

    /// The offsets of the last epoch this sink holds durably, if it stores them itself.
    fn committed_offsets(&self) -> Option<&Offsets>;

    async fn write(&mut self, epoch: &Epoch) -> Result<Written, ViewSinkError>;
}

/// True when `stored` covers every offset of `epoch`: the sink already holds that epoch.
/// An epoch without offsets is never held (nothing tells where it stands).
pub fn holds(stored: &Offsets, epoch: &Offsets) -> bool {
    !epoch.0.is_empty()
        && epoch
            .0
            .iter()
            .all(|(tp, next)| stored.0.get(tp).is_some_and(|s| s >= next))
}

/// `stored` moved forward by `epoch` (per partition the larger offset: progress never goes back).
pub fn advance(stored: &mut Offsets, epoch: &Offsets) {
    stored.advance(epoch);
}

/// Names of a view's key columns: the `deletes` batch holds exactly them, in key order.
fn key_names(changes: &ViewChanges) -> Vec<String> {
    changes
        .deletes
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect()
}

/// Indices of `names` in `batch`'s schema.
fn indices(
    sink: &str,
    view: &str,
    batch: &RecordBatch,
    names: &[String],
) -> Result<Vec<usize>, ViewSinkError> {
    names
        .iter()
        .map(|n| {
            batch.schema().index_of(n).map_err(|_| ViewSinkError::View {
                sink: sink.to_owned(),
                view: view.to_owned(),
                reason: format!(
                    "key column {n} is not a column of the view's rows (a processor bug)"
                ),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offs(v: &[(&str, i32, i64)]) -> Offsets {
        Offsets(
            v.iter()
                .map(|(t, p, o)| ((t.to_string(), *p), *o))
                .collect(),
        )
    }

    #[test]
    fn an_epoch_is_held_when_every_partition_is_at_or_past_it() {
        let stored = offs(&[("a", 0, 10), ("a", 1, 5)]);
        assert!(holds(&stored, &offs(&[("a", 0, 10), ("a", 1, 5)])));
        assert!(holds(&stored, &offs(&[("a", 0, 3)])));
        assert!(!holds(&stored, &offs(&[("a", 0, 11), ("a", 1, 5)])));
        assert!(!holds(&stored, &offs(&[("b", 0, 1)])));
        assert!(!holds(&stored, &Offsets::default()));
        let mut s = stored.clone();
        advance(&mut s, &offs(&[("a", 0, 7), ("b", 0, 2)]));
        assert_eq!(s, offs(&[("a", 0, 10), ("a", 1, 5), ("b", 0, 2)]));
    }
}
