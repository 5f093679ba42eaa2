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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::error::ArrowError;
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

    /// Moved forward by `other`: per partition the larger offset (progress never goes back).
    pub fn advance(&mut self, other: &Offsets) {
        for (tp, next) in &other.0 {
            let e = self.0.entry(tp.clone()).or_insert(*next);
            *e = (*e).max(*next);
        }
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
    /// How the rows of several processors' partial views combine into the view's rows, for a
    /// view that is not keyed by what the processors shard by (see [`Catalog`]). `None`: the
    /// partial views hold disjoint keys and their union is the view.
    pub merge: Option<MergeFn>,
}

/// Combines the batches of several partial views (each with the view's schema) into the view.
pub type MergeFn = fn(&[RecordBatch]) -> Result<RecordBatch, ArrowError>;

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

/// The latest snapshot of every published view, per *source*: the processor that published it.
/// One processor publishes every view under one source. Instances that share the partitions
/// (`processors.instances: group`) run one processor per shard they own, each over its own
/// keys, so a view is the union of its sources' snapshots (or their [`ViewDef::merge`]).
/// Each snapshot is consistent on its own; a query over several sources sees each at its own
/// latest epoch.
///
/// A unit a group member folds may also be here as read back from the view topics
/// ([`crate::remote`]), and exactly one of the two copies is served ([`Catalog::snapshots`]).
/// Each source's *position* (the input offsets its views reflect as a whole, quiet epochs
/// included) is set with its views, under the same lock ([`Catalog::publish_epoch`]), and the
/// choice between the copies is made there too ([`Published::choose`]), so a query never
/// pairs a copy's rows with a position they have not reached.
#[derive(Debug, Default)]
pub struct Catalog {
    inner: RwLock<Published>,
}

#[derive(Debug, Default)]
struct Published {
    #[allow(clippy::type_complexity)]
    views: BTreeMap<String, (ViewDef, BTreeMap<String, Arc<Snapshot>>)>,
    positions: BTreeMap<String, Offsets>,
    /// Units folded here whose copy from the view topics is served instead.
    remote_served: BTreeSet<String>,
    /// Units folded here whose processor has read every partition of its input to the end.
    at_end: BTreeSet<String>,
}

impl Published {
    fn set_position(&mut self, source: &str, position: &Offsets) {
        let first = match self.positions.get_mut(source) {
            Some(p) => {
                p.clone_from(position);
                false
            }
            None => {
                self.positions.insert(source.to_owned(), position.clone());
                true
            }
        };
        let unit = match source.strip_prefix(crate::remote::REMOTE_PREFIX) {
            Some(unit) => unit.to_owned(),
            None => {
                // A processor starting here takes over from the topics' copy, if it was served.
                if first
                    && self
                        .positions
                        .contains_key(&crate::remote::remote_source(source))
                {
                    self.remote_served.insert(source.to_owned());
                }
                source.to_owned()
            }
        };
        self.choose(&unit);
    }

    /// Which copy of `unit` is served while both are here. The choice only ever moves to the
    /// copy that stands at or past the other on every partition of the unit's input, so no
    /// row a query saw is taken back to an older state:
    ///
    /// - A unit that moved here restarts from its checkpoint, behind what its former owner
    ///   wrote to the topics (and this member served): the remote copy stays served until the
    ///   processor's position covers it.
    /// - A processor that started before the topics were read (this member's own start) is
    ///   served at once; when the remote copy appears strictly ahead of it on every partition,
    ///   that one is served until the processor catches up. Positions neither of which covers
    ///   the other leave the choice as it is.
    /// - Once the processor has read its input to the end, the topics can hold nothing it has
    ///   not folded (a remote position past that names offsets the input no longer has, e.g.
    ///   from topics deleted and created again), so it is served from then on.
    ///
    /// In a unit's steady state the remote copy is this processor's own writes, made after it
    /// published them, so it never pulls ahead again.
    fn choose(&mut self, unit: &str) {
        let (Some(local), Some(remote)) = (
            self.positions.get(unit),
            self.positions.get(&crate::remote::remote_source(unit)),
        ) else {
            return;
        };
        if self.remote_served.contains(unit) {
            if local.covers(remote) || self.at_end.contains(unit) {
                self.remote_served.remove(unit);
            }
        } else if remote.covers(local) && remote != local && !self.at_end.contains(unit) {
            self.remote_served.insert(unit.to_owned());
        }
    }
}

impl Catalog {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Replaces the view's snapshot as a whole (registering the view the first time), for the
    /// catalog's only source.
    pub fn publish(&self, def: &ViewDef, snapshot: Snapshot) {
        self.publish_from("", def, snapshot)
    }

    /// Replaces `source`'s snapshot of the view as a whole.
    pub fn publish_from(&self, source: &str, def: &ViewDef, snapshot: Snapshot) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        Self::put(&mut inner.views, source, def, snapshot);
    }

    /// Replaces `source`'s snapshots of these views (the ones an epoch changed, possibly none)
    /// and sets its position, the input offsets all its views now reflect, in one step.
    pub fn publish_epoch<'a>(
        &self,
        source: &str,
        views: impl IntoIterator<Item = (&'a ViewDef, Snapshot)>,
        position: &Offsets,
    ) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        for (def, snapshot) in views {
            Self::put(&mut inner.views, source, def, snapshot);
        }
        inner.set_position(source, position);
    }

    /// Says that `source`'s processor has read every partition of its input to the end (at
    /// its current position), see [`Published::choose`].
    pub fn reached_end(&self, source: &str) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner.at_end.insert(source.to_owned());
        inner.choose(source);
    }

    #[allow(clippy::type_complexity)]
    fn put(
        views: &mut BTreeMap<String, (ViewDef, BTreeMap<String, Arc<Snapshot>>)>,
        source: &str,
        def: &ViewDef,
        snapshot: Snapshot,
    ) {
        let snapshot = Arc::new(snapshot);
        match views.get_mut(&def.name) {
            Some(slot) => {
                slot.1.insert(source.to_owned(), snapshot);
            }
            None => {
                views.insert(
                    def.name.clone(),
                    (def.clone(), BTreeMap::from([(source.to_owned(), snapshot)])),
                );
            }
        }
    }

    /// Drops every snapshot `source` published (its shard moved to another instance).
    pub fn withdraw(&self, source: &str) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        for (_, snaps) in inner.views.values_mut() {
            snaps.remove(source);
        }
        inner.positions.remove(source);
        inner.remote_served.remove(source);
        inner.at_end.remove(source);
    }

    /// The latest snapshot of a view from the first source (the only one, unless the instances
    /// share partitions), consistent on its own.
    pub fn snapshot(&self, view: &str) -> Option<Arc<Snapshot>> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .views
            .get(view)
            .and_then(|(_, s)| s.values().next().cloned())
    }

    /// The latest snapshot `source` published of a view.
    pub fn snapshot_from(&self, source: &str, view: &str) -> Option<Arc<Snapshot>> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .views
            .get(view)
            .and_then(|(_, s)| s.get(source).cloned())
    }

    /// The latest snapshot of a view from every source, each unit once: of a unit that is
    /// both folded here and read from the view topics ([`crate::remote`]), the copy
    /// [`Published::choose`] picked.
    pub fn snapshots(&self, view: &str) -> Vec<Arc<Snapshot>> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .views
            .get(view)
            .map(|(_, s)| {
                s.iter()
                    .filter(
                        |(source, _)| match source.strip_prefix(crate::remote::REMOTE_PREFIX) {
                            Some(unit) => {
                                !s.contains_key(unit) || inner.remote_served.contains(unit)
                            }
                            None => {
                                !(s.contains_key(&crate::remote::remote_source(source))
                                    && inner.remote_served.contains(source.as_str()))
                            }
                        },
                    )
                    .map(|(_, snap)| snap.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Definitions of every published view, by name.
    pub fn views(&self) -> Vec<ViewDef> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.views.values().map(|(d, _)| d.clone()).collect()
    }
}

/// Consecutive epochs as one: per view and key the last change wins (within an epoch deletes
/// come before upserts, as the sinks apply them), offsets are the last epoch's.
///
/// Why this is exact for every sink, also one whose position lies inside the span: the rows are
/// absolute (whole rows, whole-key deletes), so the result names every key that changed in any
/// of the epochs with its value at the end. A sink holding the first epochs gets some keys again
/// with the value it already has, and every key that changed after its position with the right
/// value; what a net diff across its position would miss (a key changed and changed back) is
/// not lost here, since each epoch was computed from the state at its own start.
pub fn coalesce(mut epochs: Vec<Epoch>) -> Result<Epoch, ArrowError> {
    use datafusion::arrow::array::{Array, ArrayRef, RecordBatchOptions};
    use datafusion::arrow::compute::interleave;
    use datafusion::arrow::row::{RowConverter, SortField};
    use std::collections::HashMap;

    if epochs.len() == 1 {
        return Ok(epochs.pop().expect("one epoch"));
    }
    let last = epochs.last().expect("not empty");
    let (number, mut offsets) = (last.number, last.offsets.clone());
    for e in &epochs {
        offsets.advance(&e.offsets);
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
         -> Result<RecordBatch, ArrowError> {
            let schema = batches[0].schema();
            let columns = (0..schema.fields().len())
                .map(|c| {
                    let arrays: Vec<&dyn Array> =
                        batches.iter().map(|b| b.column(c).as_ref()).collect();
                    interleave(&arrays, at)
                })
                .collect::<Result<Vec<_>, _>>()?;
            RecordBatch::try_new_with_options(
                schema,
                columns,
                &RecordBatchOptions::new().with_row_count(Some(at.len())),
            )
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

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

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

    #[test]
    fn a_view_is_the_snapshots_of_every_source_until_one_is_withdrawn() {
        let def = crate::state::view_defs().remove(0);
        let snap = |epoch| Snapshot {
            epoch,
            offsets: Offsets::default(),
            rows: crate::table::ViewTable::new(def.clone()).published(),
        };
        let c = Catalog::new();
        c.publish_from("skus-0", &def, snap(1));
        c.publish_from("skus-1", &def, snap(2));
        c.publish_from("skus-0", &def, snap(3));
        let epochs =
            |c: &Catalog| -> Vec<u64> { c.snapshots(&def.name).iter().map(|s| s.epoch).collect() };
        assert_eq!(epochs(&c), [3, 2], "one snapshot per source, the latest");
        c.withdraw("skus-0");
        assert_eq!(epochs(&c), [2], "a shard that moved away leaves the view");
        assert_eq!(c.views().len(), 1);
    }

    fn epoch(n: u64, next: i64, c: ViewChanges) -> Epoch {
        Epoch {
            number: n,
            offsets: Offsets([(("t".to_owned(), 0), next)].into_iter().collect()),
            changes: vec![c],
        }
    }

    fn contents(c: &ViewChanges) -> (Vec<(String, i64)>, Vec<String>) {
        use datafusion::arrow::array::AsArray;
        use datafusion::arrow::datatypes::Int64Type;
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
