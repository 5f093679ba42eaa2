//! Live views: what a processor publishes and what the SQL endpoint and the sinks read.
//!
//! A processor folds a batch of input records into its keyed state, then publishes one
//! [`Epoch`]: for each view, the rows whose value changed (upserts) and the keys that left
//! (deletes), tagged with the Kafka offsets the epoch reflects. The [`Catalog`] keeps the latest
//! immutable [`Snapshot`] of every view; publishing swaps whole snapshots under a short lock, so
//! a query that took a snapshot sees one epoch of that view, never a half-applied batch.
//!
//! Offsets are the *next* offset to consume per topic partition (Kafka's committed-offset
//! convention), so a sink that stored an epoch's offsets can tell after a crash which epochs it
//! already holds.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;

pub use crate::table::ViewRows;

/// Next offset to consume, per (topic, partition).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offsets(pub BTreeMap<(String, i32), i64>);

impl Offsets {
    /// True when every partition of `other` is at or behind this one (a partition this one does
    /// not name counts as not covered).
    pub fn covers(&self, other: &Offsets) -> bool {
        other
            .0
            .iter()
            .all(|(tp, o)| self.0.get(tp).is_some_and(|s| s >= o))
    }
}

/// A view's name, shape and key.
#[derive(Debug, Clone)]
pub struct ViewDef {
    /// SQL name, e.g. `stock_availability`.
    pub name: String,
    /// Every column of the view.
    pub schema: SchemaRef,
    /// Indices into `schema` of the key columns (a row per key).
    pub key: Vec<usize>,
    /// One line for `\d`-style listings and the docs.
    pub doc: String,
}

/// The whole content of one view as of one epoch. Immutable once published.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub epoch: u64,
    pub offsets: Offsets,
    /// Rows of the view (`rows.batches()` builds what no reader built yet).
    pub rows: ViewRows,
}

/// What changed in one view during one epoch.
#[derive(Debug, Clone)]
pub struct ViewChanges {
    pub view: String,
    /// Full rows (the view's schema) whose key is new or whose value changed.
    pub upserts: RecordBatch,
    /// Key columns only (the key's schema, in key order) of rows that left the view.
    pub deletes: RecordBatch,
}

/// One step of a processor: the changes of every view it keeps, and the offsets they reflect.
#[derive(Debug, Clone)]
pub struct Epoch {
    pub number: u64,
    pub offsets: Offsets,
    pub changes: Vec<ViewChanges>,
}

/// The latest snapshot of every published view.
#[derive(Debug, Default)]
pub struct Catalog {
    views: RwLock<BTreeMap<String, (ViewDef, Arc<Snapshot>)>>,
}

impl Catalog {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Replaces the view's snapshot as a whole (registering the view the first time).
    pub fn publish(&self, def: &ViewDef, snapshot: Snapshot) {
        let snapshot = Arc::new(snapshot);
        let mut views = self.views.write().unwrap_or_else(|e| e.into_inner());
        match views.get_mut(&def.name) {
            Some(slot) => slot.1 = snapshot,
            None => {
                views.insert(def.name.clone(), (def.clone(), snapshot));
            }
        }
    }

    /// The latest snapshot of a view, consistent on its own.
    pub fn snapshot(&self, view: &str) -> Option<Arc<Snapshot>> {
        let views = self.views.read().unwrap_or_else(|e| e.into_inner());
        views.get(view).map(|(_, s)| s.clone())
    }

    /// Definitions of every published view, by name.
    pub fn views(&self) -> Vec<ViewDef> {
        let views = self.views.read().unwrap_or_else(|e| e.into_inner());
        views.values().map(|(d, _)| d.clone()).collect()
    }
}
