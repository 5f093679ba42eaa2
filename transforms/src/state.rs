//! The processors' keyed state: the last row of every input key, the incremental aggregates
//! built on it, and the views they publish.
//!
//! Every change is applied as "retract the old contribution, add the new one": the old row is
//! the one kept per primary key here, the new one is the change's `after`. Aggregates are sums
//! and counts (which retract by subtraction) and ordered multisets (min/max and the LTV rank,
//! which retract by removing one copy). Nothing expires by time.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::arrow::error::ArrowError;

use crate::input::{Change, Event, Order, SkuLoc, Stock, TABLES};
use crate::multiset::MultiSet;
use crate::table::{Cell, Row, ViewTable, hasher};

/// Hash maps for the per-event state: ordered maps cost a cache miss per key comparison,
/// which dominated the fold. Fixed seeds keep epochs deterministic.
type Map<K, V> = HashMap<K, V, ahash::RandomState>;
type Set<K> = HashSet<K, ahash::RandomState>;
use crate::view::{MergeFn, Offsets, ViewChanges, ViewDef};

/// Safety stock per SKU: a SKU's own setting, else its product category's, else the default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SafetyStock {
    pub default: i64,
    pub categories: HashMap<String, i64>,
    pub skus: HashMap<String, i64>,
}

impl SafetyStock {
    pub fn of(&self, sku: &str, category: Option<&str>) -> i64 {
        self.skus
            .get(sku)
            .or_else(|| category.and_then(|c| self.categories.get(c)))
            .copied()
            .unwrap_or(self.default)
    }
}

/// An oversell alert, published as JSON keyed by SKU.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Alert {
    /// Deterministic: `<source lsn>:<sku>:<kind>`, so consumers can drop the duplicates a
    /// restart replays.
    pub id: String,
    /// `available_below_zero` or `order_on_unavailable_sku`.
    pub kind: &'static str,
    pub sku: String,
    /// Available-to-promise of the SKU (all locations, after safety stock).
    pub available: i64,
    pub order_id: Option<i64>,
    /// Commit time in the source of the change that raised it.
    pub ts_ms: i64,
    pub source_lsn: u64,
}

pub const STOCK_AVAILABILITY: &str = "stock_availability";
pub const STOCK_BY_SKU: &str = "stock_availability_by_sku";
pub const RECON_DIFFS: &str = "reconciliation_diffs";
pub const RECON_SUMMARY: &str = "reconciliation_summary";
pub const CUSTOMER_360: &str = "customer_360";

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// Every view the processors keep, in publishing order.
pub fn view_defs() -> Vec<ViewDef> {
    let f = |n: &str, t: DataType, null: bool| Field::new(n, t, null);
    let def = |name: &str, fields: Vec<Field>, key: Vec<usize>, doc: &str| ViewDef {
        name: name.into(),
        schema: Arc::new(Schema::new(fields)),
        key,
        doc: doc.into(),
        merge: (name == RECON_SUMMARY).then_some(merge_summaries as MergeFn),
    };
    let money = DataType::Decimal128(20, 2);
    vec![
        def(
            STOCK_AVAILABILITY,
            vec![
                f("sku", DataType::Utf8, false),
                f("location_code", DataType::Utf8, false),
                f("on_hand", DataType::Int64, false),
                f("reserved", DataType::Int64, false),
                f("safety_stock", DataType::Int64, false),
                f("available", DataType::Int64, false),
            ],
            vec![0, 1],
            "per sku and location: on_hand - reserved - safety_stock (wms.stock_levels)",
        ),
        def(
            STOCK_BY_SKU,
            vec![
                f("sku", DataType::Utf8, false),
                f("locations", DataType::Int64, false),
                f("on_hand", DataType::Int64, false),
                f("reserved", DataType::Int64, false),
                f("safety_stock", DataType::Int64, false),
                f("available", DataType::Int64, false),
            ],
            vec![0],
            "per sku: sums over locations; available is the available-to-promise",
        ),
        def(
            RECON_DIFFS,
            vec![
                f("sku", DataType::Utf8, false),
                f("location_code", DataType::Utf8, false),
                f("kind", DataType::Utf8, false),
                f("oms_available", DataType::Int64, true),
                f("wms_available", DataType::Int64, true),
                f("magnitude", DataType::Int64, false),
                f("since", ts(), false),
            ],
            vec![0, 1],
            "where oms.inventory_cache.available and wms on_hand - reserved disagree; kind is missing_in_oms, missing_in_wms or mismatch",
        ),
        def(
            RECON_SUMMARY,
            vec![
                f("scope", DataType::Utf8, false),
                f("diffs", DataType::Int64, false),
                f("missing_in_oms", DataType::Int64, false),
                f("missing_in_wms", DataType::Int64, false),
                f("mismatches", DataType::Int64, false),
                f("units_at_risk", DataType::Int64, false),
                f("oldest_since", ts(), true),
            ],
            vec![0],
            "one row (scope 'all'): number of diffs by kind, sum of magnitudes, oldest open diff",
        ),
        def(
            CUSTOMER_360,
            vec![
                f("customer_id", DataType::Int64, false),
                f("orders", DataType::Int64, false),
                f("lifetime_value", money.clone(), false),
                f("avg_order_value", money, true),
                f("first_order_at", ts(), true),
                f("last_order_at", ts(), true),
                f("last_activity_at", ts(), true),
                f("returns_count", DataType::Int64, false),
                f("return_rate", DataType::Float64, true),
                f("open_orders", DataType::Int64, false),
                f("segment", DataType::Utf8, false),
            ],
            vec![0],
            "per customer: orders and lifetime value without cancelled orders, returns, open orders, segment (top_5pct, regular, new, prospect)",
        ),
    ]
}

/// The reconciliation summary of several shards' partial summaries (each shard's processor
/// summarises the diffs of its own SKUs): counts and units add up, the oldest `since` is the
/// smallest.
pub fn merge_summaries(parts: &[RecordBatch]) -> Result<RecordBatch, ArrowError> {
    let schema = view_defs()
        .into_iter()
        .find(|d| d.name == RECON_SUMMARY)
        .expect("the summary is a view")
        .schema;
    let mut sums = [0i64; 5];
    let mut oldest: Option<i64> = None;
    for b in parts {
        for (i, sum) in sums.iter_mut().enumerate() {
            let col = b
                .column(i + 1)
                .as_any()
                .downcast_ref::<Int64Array>()
                .ok_or_else(|| ArrowError::SchemaError("summary count is not Int64".into()))?;
            *sum += col.iter().flatten().sum::<i64>();
        }
        let since = b
            .column(6)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .ok_or_else(|| ArrowError::SchemaError("summary since is not a timestamp".into()))?;
        for v in since.iter().flatten() {
            oldest = Some(oldest.map_or(v, |o| o.min(v)));
        }
    }
    let mut cols: Vec<ArrayRef> = vec![Arc::new(StringArray::from(vec!["all"]))];
    cols.extend(
        sums.iter()
            .map(|&v| Arc::new(Int64Array::from(vec![v])) as ArrayRef),
    );
    cols.push(Arc::new(
        TimestampMicrosecondArray::from(vec![oldest]).with_timezone("UTC"),
    ));
    RecordBatch::try_new(schema, cols)
}

/// The name of the SQL view over a table of `reconciliation_summary` rows that gives the
/// whole summary in one row (`scope` = `all`): what [`merge_summaries`] computes, for stores
/// that hold one row per shard (the Postgres read model in group mode).
pub const RECON_SUMMARY_TOTAL: &str = "reconciliation_summary_total";

/// The query behind [`RECON_SUMMARY_TOTAL`] over `table` (a quoted, qualified name): counts
/// added up, the oldest `since`, one row even when the table is empty, as [`merge_summaries`].
/// The same in either `processors.instances` mode, so readers need not know which one runs.
pub fn summary_total_sql(table: &str) -> String {
    let sum = |c: &str| format!("coalesce(sum({c}), 0)::bigint AS {c}");
    format!(
        "SELECT 'all'::text AS scope, {}, {}, {}, {}, {}, min(oldest_since) AS oldest_since FROM {table}",
        sum("diffs"),
        sum("missing_in_oms"),
        sum("missing_in_wms"),
        sum("mismatches"),
        sum("units_at_risk"),
    )
}

#[derive(Debug, Clone, Copy, Default)]
struct SkuSums {
    locations: i64,
    on_hand: i64,
    reserved: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiffKind {
    MissingInOms,
    MissingInWms,
    Mismatch,
}

impl DiffKind {
    fn name(self) -> &'static str {
        match self {
            DiffKind::MissingInOms => "missing_in_oms",
            DiffKind::MissingInWms => "missing_in_wms",
            DiffKind::Mismatch => "mismatch",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Diff {
    kind: DiffKind,
    oms: Option<i64>,
    wms: Option<i64>,
    magnitude: i64,
    /// Microseconds: source commit time of the change that opened the diff.
    since: i64,
}

#[derive(Debug, Clone, Default)]
struct CustomerAgg {
    orders: i64,
    ltv_cents: i128,
    open_orders: i64,
    returns: i64,
    returned_orders: i64,
    placed: MultiSet<i64>,
    activity: MultiSet<i64>,
    /// The LTV under which this customer sits in the rank set, if it is ranked.
    ranked: Option<i128>,
}

/// Which orders count toward orders, lifetime value and first/last order: all but cancelled
/// ones (a cancelled order was never paid for, or was refunded in full). Returned orders count:
/// a return refunds one line, and the refund amount is not in the source.
fn counts(o: &Order) -> bool {
    o.status != "cancelled"
}

fn is_open(o: &Order) -> bool {
    matches!(o.status.as_str(), "pending" | "paid" | "shipped")
}

/// Share of customers (with orders) in the top segment, in percent.
const TOP_PERCENT: usize = 5;

/// One shard's part of the LTV ranking, which the customer shards of a group exchange so that
/// each draws the top segment's line over all customers (scale-out step 5): how many customers
/// it ranks and its largest LTVs, largest first, as many as the top segment could hold of it.
///
/// Why that many suffice: the line is the k-th largest LTV of all, k = ceil(5 % of every shard's
/// `ranked`). Fewer than k values lie above it, so each shard's k largest hold all of its values
/// above the line and enough copies of the line itself; the k-th largest of the union of every
/// shard's k largest is the line. A shard that knows a smaller total than the others sends
/// fewer, and sends again when its total grows: once the shares stop changing, every shard
/// draws the same line as one processor over all customers.
///
/// Cost: 5 % of all customers' LTVs per share, about 10 bytes each as the topic carries them,
/// sent at most once per epoch while it changes. So a share passes Kafka's default 1 MB
/// message size at about 2 million customers; past that, raise the topic's and the broker's
/// limits (a sketch instead of the exact values is the way to lift it for good).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RankShare {
    pub ranked: u64,
    pub top: Vec<i128>,
}

/// What one epoch produced.
#[derive(Debug, Default)]
pub struct EpochOut {
    pub changes: Vec<ViewChanges>,
    pub alerts: Vec<Alert>,
}

pub struct State {
    safety: SafetyStock,
    // Input rows by primary key (projections).
    products: HashMap<String, String>,
    customers: HashSet<i64>,
    orders: HashMap<i64, Order>,
    /// Source position (commit LSN, index in the transaction) of the last change applied per
    /// order id, deleted orders included (see [`State::apply_at`]).
    order_pos: HashMap<i64, (u64, u32)>,
    /// Position of the last TRUNCATE of the orders: every order change at or before it is
    /// older than the truncate (see [`State::apply_at`]).
    orders_floor: Option<(u64, u32)>,
    /// The highest commit LSN read so far per partition of the orders topic, this run (see
    /// [`State::forget_order_positions`]).
    orders_read: BTreeMap<i32, u64>,
    returns: HashMap<i64, i64>,
    returns_per_order: HashMap<i64, i64>,
    cache: Map<SkuLoc, i64>,
    stock: Map<SkuLoc, Stock>,
    /// The locations of each SKU's stock levels (a product change moves all of them).
    locations: Map<String, Vec<String>>,
    // Aggregates.
    by_sku: Map<String, SkuSums>,
    diffs: Map<SkuLoc, Diff>,
    diff_since: MultiSet<i64>,
    diff_units: i64,
    diff_kinds: [i64; 3],
    cust: HashMap<i64, CustomerAgg>,
    ltv_rank: BTreeSet<(i128, i64)>,
    threshold: Option<i128>,
    /// The other customer shards' [`RankShare`]s by shard name (empty outside a group), and
    /// their `top` values as one multiset.
    rank_shares: BTreeMap<String, RankShare>,
    foreign_top: MultiSet<i128>,
    foreign_ranked: u64,
    // Keys touched this epoch (with the source position of the last change, for alerts).
    dirty_stock: Set<SkuLoc>,
    dirty_sku: Map<String, (u64, i64)>,
    dirty_diffs: Set<SkuLoc>,
    dirty_customers: BTreeSet<i64>,
    new_lines: Vec<(String, i64, u64, i64)>,
    /// Input keys changed since the last checkpoint delta (when tracking is on).
    ckpt: Option<CkptDirty>,
    // Published views.
    views: Vec<ViewTable>,
    pub offsets: Offsets,
    pub epoch: u64,
    /// Highest `source.lsn` applied.
    pub max_lsn: u64,
    /// Changes applied since start or restore.
    pub applied: u64,
    quiet_alerts: bool,
    /// The key of this state's `reconciliation_summary` row: `all`, or the shard's name when
    /// it summarises one shard's diffs (see [`merge_summaries`]).
    scope: String,
}

impl State {
    pub fn new(safety: SafetyStock) -> State {
        State {
            safety,
            products: HashMap::new(),
            customers: HashSet::new(),
            orders: HashMap::new(),
            order_pos: HashMap::new(),
            orders_floor: None,
            orders_read: BTreeMap::new(),
            returns: HashMap::new(),
            returns_per_order: HashMap::new(),
            cache: Map::with_hasher(hasher()),
            stock: Map::with_hasher(hasher()),
            locations: Map::with_hasher(hasher()),
            by_sku: Map::with_hasher(hasher()),
            diffs: Map::with_hasher(hasher()),
            diff_since: MultiSet::new(),
            diff_units: 0,
            diff_kinds: [0; 3],
            cust: HashMap::new(),
            ltv_rank: BTreeSet::new(),
            threshold: None,
            rank_shares: BTreeMap::new(),
            foreign_top: MultiSet::new(),
            foreign_ranked: 0,
            dirty_stock: Set::with_hasher(hasher()),
            dirty_sku: Map::with_hasher(hasher()),
            dirty_diffs: Set::with_hasher(hasher()),
            dirty_customers: BTreeSet::new(),
            new_lines: Vec::new(),
            ckpt: None,
            views: view_defs().into_iter().map(ViewTable::new).collect(),
            offsets: Offsets::default(),
            epoch: 0,
            max_lsn: 0,
            applied: 0,
            quiet_alerts: false,
            scope: "all".to_owned(),
        }
    }

    pub fn views(&self) -> &[ViewTable] {
        &self.views
    }

    /// A fresh state for a shard whose summary row is keyed `scope` (`all`: not a shard).
    pub fn new_as(safety: SafetyStock, scope: &str) -> State {
        let mut s = State::new(safety);
        s.scope = scope.to_owned();
        s
    }

    pub fn view(&self, name: &str) -> Option<&ViewTable> {
        self.views.iter().find(|v| v.def.name == name)
    }

    fn view_mut(&mut self, name: &str) -> &mut ViewTable {
        let i = self
            .views
            .iter()
            .position(|v| v.def.name == name)
            .unwrap_or(0);
        &mut self.views[i]
    }

    /// Notes that an order change at commit LSN `lsn` was read from `partition` of the orders
    /// topic.
    pub fn read_orders_at(&mut self, partition: i32, lsn: u64) {
        let at = self.orders_read.entry(partition).or_insert(lsn);
        *at = (*at).max(lsn);
    }

    /// Drops the positions of deleted orders that no change still to come can be at or
    /// before, and returns how many. `partitions` are the orders topic's partitions this
    /// processor reads.
    ///
    /// Why that is safe: within one partition the producer writes changes in commit order, so
    /// once partition *q* gave a change at commit LSN *L*, every later change read from *q* is
    /// at *L* or after. With *F* the least such *L* over every partition read, no change to
    /// come is before *F*, so a position before *F* would drop nothing more and can go. A
    /// partition that gave no order change yet this run (e.g. right after a restore) holds
    /// everything back.
    ///
    /// The exception is a pipeline restart, which sends again the changes after its confirmed
    /// position (at-least-once): re-sent changes are older than *F*. That is why only deleted
    /// orders lose their position. A re-send carries, per partition, everything after a point,
    /// in order. An order that is present keeps its position, so every stale copy stays
    /// dropped. For a deleted order, the last change in every partition it was ever in is a
    /// delete (a move out of a partition sends one there), and each of those comes again after
    /// any re-sent create from the same partition, so the order ends deleted. On the way a
    /// re-sent create may show it again for a moment, as a re-send already does for the other
    /// tables.
    ///
    /// Without this, every order ever deleted (an archive job purging old orders, say) would
    /// keep its position for good, in memory and in every checkpoint.
    pub fn forget_order_positions(&mut self, partitions: &[i32]) -> usize {
        let floor = partitions
            .iter()
            .map(|p| self.orders_read.get(p).copied())
            .min()
            .flatten();
        let Some(floor) = floor.filter(|_| !partitions.is_empty()) else {
            return 0;
        };
        let before = self.order_pos.len();
        let (ckpt, orders) = (&mut self.ckpt, &self.orders);
        self.order_pos.retain(|id, (lsn, _)| {
            let keep = *lsn >= floor || orders.contains_key(id);
            if !keep && let Some(c) = ckpt {
                c.orders.insert(*id);
            }
            keep
        });
        before - self.order_pos.len()
    }

    /// Order positions held (for metrics and tests).
    pub fn order_positions(&self) -> usize {
        self.order_pos.len()
    }

    /// Folds one change into the state.
    pub fn apply(&mut self, ev: &Event) {
        self.apply_at(ev, None)
    }

    /// Applies a change read from a topic, with its index in its transaction (`walbridge.event_id`;
    /// `None`: unknown).
    ///
    /// Orders may be routed by `customer_id` (`kafka.partition_by`), so an order whose customer
    /// changes moves to another partition as a delete in the old one and a create in the new
    /// one, and partitions are read side by side: the changes of one order can arrive out of
    /// source order. Matching a delete against the row held is not enough (an order moved A → B
    /// → A, read A first, would end with B's stale copy), so the last change applied keeps its
    /// source position, deleted orders too, and a change at or before it is dropped. Positions
    /// are unique per change (commit LSN, index in the transaction) and, per order, grow in
    /// source order (a row's changes are ordered by the commits that made them), so in a single
    /// partition nothing is ever dropped. Positions that can no longer matter are dropped
    /// ([`State::forget_order_positions`]).
    pub fn apply_at(&mut self, ev: &Event, index: Option<u32>) {
        self.applied += 1;
        self.max_lsn = self.max_lsn.max(ev.lsn);
        match &ev.change {
            Change::StockLevel { key, row } => self.stock_level(key, *row, ev),
            Change::InventoryCache { key, available } => {
                if let Some(c) = &mut self.ckpt {
                    c.cache.mark(key);
                }
                match (available, self.cache.get_mut(key)) {
                    (Some(a), Some(v)) => *v = *a,
                    (Some(a), None) => {
                        self.cache.insert(key.clone(), *a);
                    }
                    (None, _) => {
                        self.cache.remove(key);
                    }
                }
                self.reconcile(key, ev.ts_ms);
            }
            Change::Product { sku, category } => {
                if let Some(c) = &mut self.ckpt {
                    c.products.mark(sku);
                }
                let old = match category {
                    Some(c) => self.products.insert(sku.clone(), c.clone()),
                    None => self.products.remove(sku),
                };
                if old.as_ref() != category.as_ref() {
                    // Safety stock follows the category: every location of the SKU moves.
                    let locs = self.locations.get(sku).into_iter().flatten();
                    self.dirty_stock
                        .extend(locs.map(|l| (sku.clone(), l.clone())));
                    self.dirty_sku.insert(sku.clone(), (ev.lsn, ev.ts_ms));
                }
            }
            Change::Customer { id, exists } => {
                if let Some(c) = &mut self.ckpt {
                    c.customers.insert(*id);
                }
                let changed = if *exists {
                    self.customers.insert(*id)
                } else {
                    self.customers.remove(id)
                };
                if changed {
                    self.dirty_customers.insert(*id);
                }
            }
            Change::Order { id, row } => {
                if let Some(i) = index
                    && ev.lsn > 0
                {
                    let pos = (ev.lsn, i);
                    if self.order_pos.get(id).is_some_and(|held| pos <= *held)
                        || self.orders_floor.is_some_and(|f| pos <= f)
                    {
                        return;
                    }
                    self.order_pos.insert(*id, pos);
                }
                if let Some(c) = &mut self.ckpt {
                    c.orders.insert(*id);
                }
                let nret = self.returns_per_order.get(id).copied().unwrap_or(0);
                if let Some(old) = self.orders.remove(id) {
                    self.contribute(&old, nret, -1);
                }
                if let Some(new) = row {
                    self.contribute(new, nret, 1);
                    self.orders.insert(*id, new.clone());
                }
            }
            Change::Return { id, order_id } => {
                if let Some(c) = &mut self.ckpt {
                    c.returns.insert(*id);
                }
                let old = match order_id {
                    Some(o) => self.returns.insert(*id, *o),
                    None => self.returns.remove(id),
                };
                if old != *order_id {
                    if let Some(o) = old {
                        self.returns_changed(o, -1);
                    }
                    if let Some(o) = order_id {
                        self.returns_changed(*o, 1);
                    }
                }
            }
            Change::OrderLineAdded { order_id, sku } => {
                self.new_lines
                    .push((sku.clone(), *order_id, ev.lsn, ev.ts_ms));
            }
            Change::Truncate(table) => self.truncate(*table, ev, index),
        }
    }

    fn stock_level(&mut self, key: &SkuLoc, row: Option<Stock>, ev: &Event) {
        if let Some(c) = &mut self.ckpt {
            c.stock.mark(key);
        }
        // The hot path: look up before inserting, so a known key costs no String copies.
        let old = match (row, self.stock.get_mut(key)) {
            (Some(r), Some(s)) => Some(std::mem::replace(s, r)),
            (Some(r), None) => {
                self.locations
                    .entry(key.0.clone())
                    .or_default()
                    .push(key.1.clone());
                self.stock.insert(key.clone(), r)
            }
            (None, _) => {
                let old = self.stock.remove(key);
                if old.is_some()
                    && let Some(locs) = self.locations.get_mut(&key.0)
                {
                    locs.retain(|l| *l != key.1);
                    if locs.is_empty() {
                        self.locations.remove(&key.0);
                    }
                }
                old
            }
        };
        if old == row {
            return;
        }
        if !self.by_sku.contains_key(&key.0) {
            self.by_sku.insert(key.0.clone(), SkuSums::default());
        }
        let sums = self.by_sku.get_mut(&key.0).expect("inserted above");
        if let Some(o) = old {
            sums.locations -= 1;
            sums.on_hand -= o.on_hand;
            sums.reserved -= o.reserved;
        }
        if let Some(n) = row {
            sums.locations += 1;
            sums.on_hand += n.on_hand;
            sums.reserved += n.reserved;
        }
        if !self.dirty_stock.contains(key) {
            self.dirty_stock.insert(key.clone());
        }
        match self.dirty_sku.get_mut(&key.0) {
            Some(at) => *at = (ev.lsn, ev.ts_ms),
            None => {
                self.dirty_sku.insert(key.0.clone(), (ev.lsn, ev.ts_ms));
            }
        }
        self.reconcile(key, ev.ts_ms);
    }

    /// Re-derives the diff of one (sku, location) right at the change, so `since` is the commit
    /// time of exactly the change that opened it.
    fn reconcile(&mut self, key: &SkuLoc, ts_ms: i64) {
        let wms = self.stock.get(key).map(|s| s.on_hand - s.reserved);
        let oms = self.cache.get(key).copied();
        let kind = match (oms, wms) {
            (None, None) => None,
            (None, Some(_)) => Some(DiffKind::MissingInOms),
            (Some(_), None) => Some(DiffKind::MissingInWms),
            (Some(a), Some(b)) if a != b => Some(DiffKind::Mismatch),
            _ => None,
        };
        let old = self.diffs.get(key).copied();
        let new = kind.map(|kind| Diff {
            kind,
            oms,
            wms,
            magnitude: (oms.unwrap_or(0) - wms.unwrap_or(0)).abs(),
            since: old.map_or(ts_ms.saturating_mul(1000), |d| d.since),
        });
        if old == new {
            return;
        }
        if let Some(o) = old {
            self.diff_since.update(&o.since, -1);
            self.diff_units -= o.magnitude;
            self.diff_kinds[o.kind as usize] -= 1;
        }
        match (new, self.diffs.get_mut(key)) {
            (Some(n), Some(d)) => *d = n,
            (Some(n), None) => {
                self.diffs.insert(key.clone(), n);
            }
            (None, _) => {
                self.diffs.remove(key);
            }
        }
        if let Some(c) = &mut self.ckpt {
            c.since.mark(key);
        }
        if let Some(n) = new {
            self.diff_since.update(&n.since, 1);
            self.diff_units += n.magnitude;
            self.diff_kinds[n.kind as usize] += 1;
        }
        if !self.dirty_diffs.contains(key) {
            self.dirty_diffs.insert(key.clone());
        }
    }

    fn contribute(&mut self, o: &Order, nret: i64, w: i64) {
        let a = self.cust.entry(o.customer_id).or_default();
        if counts(o) {
            a.orders += w;
            a.ltv_cents += i128::from(w) * o.total_cents;
            a.placed.update(&o.placed_at, w);
            if nret > 0 {
                a.returned_orders += w;
            }
        }
        if is_open(o) {
            a.open_orders += w;
        }
        a.returns += w * nret;
        a.activity.update(&o.updated_at, w);
        self.dirty_customers.insert(o.customer_id);
    }

    fn returns_changed(&mut self, order_id: i64, w: i64) {
        let n = self.returns_per_order.get(&order_id).copied().unwrap_or(0);
        let order = self.orders.get(&order_id).cloned();
        if let Some(o) = &order {
            self.contribute(o, n, -1);
        }
        let n = n + w;
        if n == 0 {
            self.returns_per_order.remove(&order_id);
        } else {
            self.returns_per_order.insert(order_id, n);
        }
        if let Some(o) = &order {
            self.contribute(o, n, 1);
        }
    }

    fn truncate(&mut self, table: usize, ev: &Event, index: Option<u32>) {
        let gone: Vec<Change> = match TABLES.get(table).copied() {
            Some("oms.products") => self
                .products
                .keys()
                .map(|sku| Change::Product {
                    sku: sku.clone(),
                    category: None,
                })
                .collect(),
            Some("oms.customers") => self
                .customers
                .iter()
                .map(|&id| Change::Customer { id, exists: false })
                .collect(),
            Some("oms.orders") => {
                // A TRUNCATE is one message in one partition, while orders may be routed by
                // customer over several: an order changed after it (read already from another
                // partition) stays, and one changed before it (still unread) is dropped when it
                // comes, by the floor.
                let at = index.filter(|_| ev.lsn > 0).map(|i| (ev.lsn, i));
                if let Some(at) = at {
                    self.orders_floor = Some(self.orders_floor.map_or(at, |f| f.max(at)));
                    let below: Vec<i64> = self
                        .order_pos
                        .iter()
                        .filter(|(_, p)| **p <= at)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in below {
                        self.order_pos.remove(&id);
                        if let Some(c) = &mut self.ckpt {
                            c.orders.insert(id);
                        }
                    }
                }
                self.orders
                    .keys()
                    .filter(|id| at.is_none() || !self.order_pos.contains_key(id))
                    .map(|&id| Change::Order { id, row: None })
                    .collect()
            }
            Some("oms.returns") => self
                .returns
                .keys()
                .map(|&id| Change::Return { id, order_id: None })
                .collect(),
            Some("oms.inventory_cache") => self
                .cache
                .keys()
                .map(|k| Change::InventoryCache {
                    key: k.clone(),
                    available: None,
                })
                .collect(),
            Some("wms.stock_levels") => self
                .stock
                .keys()
                .map(|k| Change::StockLevel {
                    key: k.clone(),
                    row: None,
                })
                .collect(),
            _ => Vec::new(),
        };
        for change in gone {
            self.apply(&Event {
                change,
                lsn: ev.lsn,
                ts_ms: ev.ts_ms,
            });
        }
    }

    fn safety_of(&self, sku: &str) -> i64 {
        self.safety
            .of(sku, self.products.get(sku).map(String::as_str))
    }

    /// Brings every view up to date with the changes applied since the last epoch and returns
    /// what changed (and the alerts raised).
    pub fn finish_epoch(&mut self) -> Result<EpochOut, ArrowError> {
        let mut alerts = Vec::new();
        // stock_availability
        let dirty: Vec<SkuLoc> = self.dirty_stock.drain().collect();
        for key in dirty {
            // One allocation per key cell, shared by the key and the row.
            let (sku, loc) = (Cell::text(&key.0), Cell::text(&key.1));
            let row = self.stock.get(&key).map(|s| {
                let safety = self.safety_of(&key.0);
                vec![
                    sku.clone(),
                    loc.clone(),
                    Cell::Int(s.on_hand),
                    Cell::Int(s.reserved),
                    Cell::Int(safety),
                    Cell::Int(s.on_hand - s.reserved - safety),
                ]
            });
            let k = vec![sku, loc];
            self.view_mut(STOCK_AVAILABILITY).set(k, row);
        }
        // stock_availability_by_sku and the below-zero alert
        let dirty: Vec<(String, (u64, i64))> = self.dirty_sku.drain().collect();
        for (sku, (lsn, ts_ms)) in dirty {
            let sums = self.by_sku.get(&sku).copied().unwrap_or_default();
            let k = vec![Cell::text(&sku)];
            let row = if sums.locations > 0 {
                let safety = sums.locations * self.safety_of(&sku);
                let available = sums.on_hand - sums.reserved - safety;
                let before = self
                    .view_mut(STOCK_BY_SKU)
                    .get(&k)
                    .and_then(|r| match r[5] {
                        Cell::Int(v) => Some(v),
                        _ => None,
                    });
                if available < 0 && before.is_none_or(|b| b >= 0) {
                    alerts.push(Alert {
                        id: format!("{lsn}:{sku}:available_below_zero"),
                        kind: "available_below_zero",
                        sku: sku.clone(),
                        available,
                        order_id: None,
                        ts_ms,
                        source_lsn: lsn,
                    });
                }
                Some(vec![
                    k[0].clone(),
                    Cell::Int(sums.locations),
                    Cell::Int(sums.on_hand),
                    Cell::Int(sums.reserved),
                    Cell::Int(safety),
                    Cell::Int(available),
                ])
            } else {
                self.by_sku.remove(&sku);
                None
            };
            self.view_mut(STOCK_BY_SKU).set(k, row);
        }
        // In SKU order, whatever order the SKUs changed in.
        alerts.sort_by(|a: &Alert, b: &Alert| a.sku.cmp(&b.sku));
        // Order lines that landed on a SKU with nothing left to promise.
        for (sku, order_id, lsn, ts_ms) in std::mem::take(&mut self.new_lines) {
            let k = vec![Cell::text(&sku)];
            let available = match self.view_mut(STOCK_BY_SKU).get(&k).map(|r| &r[5]) {
                Some(Cell::Int(v)) => *v,
                _ => 0,
            };
            if available <= 0 {
                alerts.push(Alert {
                    id: format!("{lsn}:{sku}:order_on_unavailable_sku:{order_id}"),
                    kind: "order_on_unavailable_sku",
                    sku,
                    available,
                    order_id: Some(order_id),
                    ts_ms,
                    source_lsn: lsn,
                });
            }
        }
        // reconciliation
        let summary_dirty = !self.dirty_diffs.is_empty() || self.epoch == 0;
        let dirty: Vec<SkuLoc> = self.dirty_diffs.drain().collect();
        for key in dirty {
            let (sku, loc) = (Cell::text(&key.0), Cell::text(&key.1));
            let row = self.diffs.get(&key).map(|d| {
                let opt = |v: Option<i64>| v.map_or(Cell::Null, Cell::Int);
                vec![
                    sku.clone(),
                    loc.clone(),
                    Cell::text(d.kind.name()),
                    opt(d.oms),
                    opt(d.wms),
                    Cell::Int(d.magnitude),
                    Cell::Ts(d.since),
                ]
            });
            let k = vec![sku, loc];
            self.view_mut(RECON_DIFFS).set(k, row);
        }
        if summary_dirty {
            let row = vec![
                Cell::text(&self.scope),
                Cell::Int(self.diffs.len() as i64),
                Cell::Int(self.diff_kinds[DiffKind::MissingInOms as usize]),
                Cell::Int(self.diff_kinds[DiffKind::MissingInWms as usize]),
                Cell::Int(self.diff_kinds[DiffKind::Mismatch as usize]),
                Cell::Int(self.diff_units),
                self.diff_since.min().map_or(Cell::Null, |&s| Cell::Ts(s)),
            ];
            let key = vec![row[0].clone()];
            self.view_mut(RECON_SUMMARY).set(key, Some(row));
        }
        self.finish_customers();
        if self.quiet_alerts {
            alerts.clear();
        }
        let mut changes = Vec::new();
        for v in &mut self.views {
            if v.has_changes() {
                changes.push(v.take_changes()?);
            }
        }
        self.epoch += 1;
        Ok(EpochOut { changes, alerts })
    }

    fn finish_customers(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty_customers);
        for id in &dirty {
            let exists = self.customers.contains(id);
            let Some(a) = self.cust.get_mut(id) else {
                continue;
            };
            let want = (exists && a.orders > 0).then_some(a.ltv_cents);
            if a.ranked != want {
                if let Some(old) = a.ranked {
                    self.ltv_rank.remove(&(old, *id));
                }
                if let Some(new) = want {
                    self.ltv_rank.insert((new, *id));
                }
                a.ranked = want;
            }
        }
        // The top segment starts at the k-th largest LTV, k = ceil(5 % of ranked customers),
        // over this state's customers and the other shards' shares.
        let k = self.top_count();
        let threshold = if k == 0 {
            None
        } else {
            let own = self.ltv_rank.iter().rev().map(|(v, _)| *v);
            let foreign = self
                .foreign_top
                .iter_desc()
                .flat_map(|(v, n)| std::iter::repeat_n(*v, n as usize));
            merge_desc(own, foreign).nth(k - 1)
        };
        if threshold != self.threshold {
            // Everyone whose LTV lies between the old and the new threshold may change segment.
            let (lo, hi) = match (self.threshold, threshold) {
                (Some(a), Some(b)) => (a.min(b), a.max(b)),
                _ => (i128::MIN, i128::MAX),
            };
            dirty.extend(
                self.ltv_rank
                    .range((lo, i64::MIN)..=(hi, i64::MAX))
                    .map(|(_, id)| *id),
            );
            self.threshold = threshold;
        }
        for id in dirty {
            let row = self.customers.contains(&id).then(|| self.customer_row(id));
            self.view_mut(CUSTOMER_360).set(vec![Cell::Int(id)], row);
        }
    }

    /// How many customers the top segment holds: ceil(5 % of all ranked ones).
    fn top_count(&self) -> usize {
        let n = self.ltv_rank.len() + self.foreign_ranked as usize;
        (n * TOP_PERCENT).div_ceil(100)
    }

    /// This shard's [`RankShare`] for the others (see there why it holds that many values).
    pub fn rank_share(&self) -> RankShare {
        RankShare {
            ranked: self.ltv_rank.len() as u64,
            top: self
                .ltv_rank
                .iter()
                .rev()
                .take(self.top_count())
                .map(|(v, _)| *v)
                .collect(),
        }
    }

    /// Takes another customer shard's latest [`RankShare`] (`None`: the shard has none any
    /// more). The line of the top segment is drawn again at the next epoch's end.
    pub fn set_rank_share(&mut self, shard: &str, share: Option<RankShare>) {
        if let Some(c) = &mut self.ckpt {
            c.rank_shares.insert(shard.to_owned());
        }
        let old = match share {
            Some(s) => self.rank_shares.insert(shard.to_owned(), s),
            None => self.rank_shares.remove(shard),
        };
        if let Some(old) = old {
            self.foreign_ranked -= old.ranked;
            for v in &old.top {
                self.foreign_top.update(v, -1);
            }
        }
        if let Some(new) = self.rank_shares.get(shard) {
            self.foreign_ranked += new.ranked;
            for v in &new.top {
                self.foreign_top.update(v, 1);
            }
        }
    }

    fn customer_row(&self, id: i64) -> Row {
        let empty = CustomerAgg::default();
        let a = self.cust.get(&id).unwrap_or(&empty);
        let ts = |v: Option<&i64>| v.map_or(Cell::Null, |&t| Cell::Ts(t));
        let segment = if a.orders <= 0 {
            "prospect"
        } else if self.threshold.is_some_and(|t| a.ltv_cents >= t) {
            "top_5pct"
        } else if a.orders == 1 {
            "new"
        } else {
            "regular"
        };
        vec![
            Cell::Int(id),
            Cell::Int(a.orders),
            Cell::Dec(a.ltv_cents),
            if a.orders > 0 {
                Cell::Dec(div_round(a.ltv_cents, i128::from(a.orders)))
            } else {
                Cell::Null
            },
            ts(a.placed.min()),
            ts(a.placed.max()),
            ts(a.activity.max()),
            Cell::Int(a.returns),
            if a.orders > 0 {
                Cell::Float(a.returned_orders as f64 / a.orders as f64)
            } else {
                Cell::Null
            },
            Cell::Int(a.open_orders),
            Cell::text(segment),
        ]
    }
}

/// Two descending sequences as one descending sequence.
fn merge_desc(
    a: impl Iterator<Item = i128>,
    b: impl Iterator<Item = i128>,
) -> impl Iterator<Item = i128> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if x >= y => a.next(),
        (Some(_), Some(_)) | (None, Some(_)) => b.next(),
        (Some(_), None) => a.next(),
        (None, None) => None,
    })
}

/// `n / d` rounded half away from zero (Postgres' `round(numeric)`).
fn div_round(n: i128, d: i128) -> i128 {
    let q = n / d;
    let r = n % d;
    if 2 * r.abs() >= d.abs() {
        q + if (n < 0) != (d < 0) { -1 } else { 1 }
    } else {
        q
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoint: the input rows by key and the offsets they reflect. Aggregates are rebuilt from
// the rows on restore (the same code path as live changes, so restore cannot drift from the
// live fold); only `since` is history that the rows cannot tell, so it is saved too.

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Saved {
    pub version: u32,
    pub topic_prefix: String,
    pub epoch: u64,
    pub max_lsn: u64,
    pub offsets: Vec<(String, i32, i64)>,
    pub(crate) products: Vec<(String, String)>,
    pub(crate) customers: Vec<i64>,
    pub(crate) orders: Vec<(i64, Order)>,
    /// `order_pos` (absent in checkpoints from before it existed).
    #[serde(default)]
    pub(crate) order_positions: Vec<(i64, u64, u32)>,
    #[serde(default)]
    pub(crate) orders_floor: Option<(u64, u32)>,
    pub(crate) returns: Vec<(i64, i64)>,
    pub(crate) cache: Vec<(SkuLoc, i64)>,
    pub(crate) stock: Vec<(SkuLoc, Stock)>,
    pub(crate) since: Vec<(SkuLoc, i64)>,
    /// The other customer shards' [`RankShare`]s (absent in checkpoints from before them).
    #[serde(default)]
    pub(crate) rank_shares: Vec<(String, RankShare)>,
}

pub const CHECKPOINT_VERSION: u32 = 1;

impl Saved {
    /// Adds another shard's checkpoint: shards hold disjoint keys and partitions, so the union
    /// of their rows and offsets is the checkpoint one processor over all of them would hold.
    /// Two exceptions. Every customer shard reads the returns whole: a return and a partition
    /// offset held by several shards are taken once, the lowest offset (the merged state is
    /// behind no shard). And the merged state ranks every customer itself, so the shards'
    /// [`RankShare`]s of one another are dropped.
    pub fn absorb(&mut self, other: Saved) {
        self.epoch = self.epoch.max(other.epoch);
        self.max_lsn = self.max_lsn.max(other.max_lsn);
        let mut offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for (t, p, o) in self.offsets.drain(..).chain(other.offsets) {
            offsets
                .entry((t, p))
                .and_modify(|held| *held = (*held).min(o))
                .or_insert(o);
        }
        self.offsets = offsets.into_iter().map(|((t, p), o)| (t, p, o)).collect();
        self.products.extend(other.products);
        self.customers.extend(other.customers);
        self.orders.extend(other.orders);
        self.order_positions.extend(other.order_positions);
        self.orders_floor = self.orders_floor.max(other.orders_floor);
        let returns: BTreeMap<i64, i64> = self.returns.drain(..).chain(other.returns).collect();
        self.returns = returns.into_iter().collect();
        self.rank_shares.clear();
        self.cache.extend(other.cache);
        self.stock.extend(other.stock);
        self.since.extend(other.since);
    }
}

/// A set of keys that clones a key only the first time it is marked (the fold's hot path).
#[derive(Debug)]
struct Marks<K: std::hash::Hash + Eq>(Set<K>);

impl<K: std::hash::Hash + Eq> Default for Marks<K> {
    fn default() -> Self {
        Marks(Set::with_hasher(hasher()))
    }
}

impl<K: std::hash::Hash + Eq + Clone> Marks<K> {
    fn mark<Q>(&mut self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if !self.0.contains(key) {
            self.0.insert(key.to_owned());
        }
    }
}

impl<K: std::hash::Hash + Eq> IntoIterator for Marks<K> {
    type Item = K;
    type IntoIter = std::collections::hash_set::IntoIter<K>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// Input keys changed since the last checkpoint delta.
#[derive(Debug, Default)]
struct CkptDirty {
    products: Marks<String>,
    customers: BTreeSet<i64>,
    orders: BTreeSet<i64>,
    returns: BTreeSet<i64>,
    cache: Marks<SkuLoc>,
    stock: Marks<SkuLoc>,
    since: Marks<SkuLoc>,
    rank_shares: BTreeSet<String>,
}

/// The change of the checkpointed state since the previous delta (see [`State::take_delta`]).
#[derive(Debug, Clone, Default)]
pub struct Delta {
    pub epoch: u64,
    pub max_lsn: u64,
    pub offsets: Vec<(String, i32, i64)>,
    pub products: Vec<(String, Option<String>)>,
    pub customers: Vec<(i64, bool)>,
    pub orders: Vec<(i64, Option<Order>)>,
    pub order_positions: Vec<(i64, Option<(u64, u32)>)>,
    pub orders_floor: Option<(u64, u32)>,
    pub returns: Vec<(i64, Option<i64>)>,
    pub cache: Vec<(SkuLoc, Option<i64>)>,
    pub stock: Vec<(SkuLoc, Option<Stock>)>,
    pub since: Vec<(SkuLoc, Option<i64>)>,
    pub rank_shares: Vec<(String, Option<RankShare>)>,
}

impl State {
    pub fn save(&self, topic_prefix: &str) -> Saved {
        let mut orders: Vec<(i64, Order)> =
            self.orders.iter().map(|(k, v)| (*k, v.clone())).collect();
        orders.sort_by_key(|(k, _)| *k);
        Saved {
            version: CHECKPOINT_VERSION,
            topic_prefix: topic_prefix.to_owned(),
            epoch: self.epoch,
            max_lsn: self.max_lsn,
            offsets: self
                .offsets
                .0
                .iter()
                .map(|((t, p), o)| (t.clone(), *p, *o))
                .collect(),
            products: self
                .products
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            customers: self.customers.iter().copied().collect(),
            orders,
            order_positions: self
                .order_pos
                .iter()
                .map(|(k, (l, i))| (*k, *l, *i))
                .collect(),
            orders_floor: self.orders_floor,
            returns: self.returns.iter().map(|(k, v)| (*k, *v)).collect(),
            cache: self.cache.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            stock: self.stock.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            since: self
                .diffs
                .iter()
                .map(|(k, d)| (k.clone(), d.since))
                .collect(),
            rank_shares: self
                .rank_shares
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// Starts (or stops) recording which input keys change, for [`State::take_delta`]. What
    /// was recorded before is dropped: the caller has just taken a full [`State::save`].
    pub fn track_checkpoint_changes(&mut self, on: bool) {
        self.ckpt = on.then(CkptDirty::default);
    }

    /// What changed since the last delta (or since tracking started): the current row of every
    /// input key that changed (`None`: gone) and the position. Applied in order to the
    /// [`Saved`] the tracking started from, the deltas give exactly [`State::save`] (see
    /// `crate::checkpoint`). Costs in proportion to the keys changed, not to the state.
    pub fn take_delta(&mut self) -> Delta {
        let c = self.ckpt.replace(CkptDirty::default()).unwrap_or_default();
        Delta {
            epoch: self.epoch,
            max_lsn: self.max_lsn,
            offsets: self
                .offsets
                .0
                .iter()
                .map(|((t, p), o)| (t.clone(), *p, *o))
                .collect(),
            products: c
                .products
                .into_iter()
                .map(|k| {
                    let v = self.products.get(&k).cloned();
                    (k, v)
                })
                .collect(),
            customers: c
                .customers
                .into_iter()
                .map(|k| (k, self.customers.contains(&k)))
                .collect(),
            orders_floor: self.orders_floor,
            order_positions: c
                .orders
                .iter()
                .map(|k| (*k, self.order_pos.get(k).copied()))
                .collect(),
            orders: c
                .orders
                .into_iter()
                .map(|k| (k, self.orders.get(&k).cloned()))
                .collect(),
            returns: c
                .returns
                .into_iter()
                .map(|k| (k, self.returns.get(&k).copied()))
                .collect(),
            cache: c
                .cache
                .into_iter()
                .map(|k| {
                    let v = self.cache.get(&k).copied();
                    (k, v)
                })
                .collect(),
            stock: c
                .stock
                .into_iter()
                .map(|k| {
                    let v = self.stock.get(&k).copied();
                    (k, v)
                })
                .collect(),
            since: c
                .since
                .into_iter()
                .map(|k| {
                    let v = self.diffs.get(&k).map(|d| d.since);
                    (k, v)
                })
                .collect(),
            rank_shares: c
                .rank_shares
                .into_iter()
                .map(|k| {
                    let v = self.rank_shares.get(&k).cloned();
                    (k, v)
                })
                .collect(),
        }
    }

    /// The state a checkpoint describes, with every view built (no alerts: they were raised
    /// before the checkpoint was taken).
    pub fn restore(saved: Saved, safety: SafetyStock) -> Result<State, ArrowError> {
        Self::restore_as(saved, safety, "all")
    }

    /// [`State::restore`] for a shard whose summary row is keyed `scope`.
    pub fn restore_as(saved: Saved, safety: SafetyStock, scope: &str) -> Result<State, ArrowError> {
        let mut s = State::new(safety);
        s.scope = scope.to_owned();
        let ev = |change| Event {
            change,
            lsn: 0,
            ts_ms: 0,
        };
        for (sku, category) in saved.products {
            s.apply(&ev(Change::Product {
                sku,
                category: Some(category),
            }));
        }
        for id in saved.customers {
            s.apply(&ev(Change::Customer { id, exists: true }));
        }
        for (id, o) in saved.orders {
            s.apply(&ev(Change::Order { id, row: Some(o) }));
        }
        for (id, o) in saved.returns {
            s.apply(&ev(Change::Return {
                id,
                order_id: Some(o),
            }));
        }
        for (key, a) in saved.cache {
            s.apply(&ev(Change::InventoryCache {
                key,
                available: Some(a),
            }));
        }
        for (key, row) in saved.stock {
            s.apply(&ev(Change::StockLevel {
                key,
                row: Some(row),
            }));
        }
        for (shard, share) in saved.rank_shares {
            s.set_rank_share(&shard, Some(share));
        }
        for (key, since) in saved.since {
            if let Some(d) = s.diffs.get_mut(&key) {
                s.diff_since.update(&d.since, -1);
                d.since = since;
                s.diff_since.update(&since, 1);
            }
        }
        s.order_pos = saved
            .order_positions
            .into_iter()
            .map(|(k, l, i)| (k, (l, i)))
            .collect();
        s.orders_floor = saved.orders_floor;
        s.quiet_alerts = true;
        s.finish_epoch()?;
        s.quiet_alerts = false;
        s.epoch = saved.epoch;
        s.max_lsn = saved.max_lsn;
        s.applied = 0;
        s.offsets = Offsets(
            saved
                .offsets
                .into_iter()
                .map(|(t, p, o)| ((t, p), o))
                .collect(),
        );
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_positions_go_once_every_partition_read_is_past_them_and_moves_still_resolve() {
        // Order 7 moves A → B → A as in the test below (A = partition 0, B = partition 1);
        // order 9 is created and purged in A. Positions are dropped after every read, as far
        // as the two partitions allow, in every read order: the order still ends as its last
        // change, and only positions a change to come could be at or before stay.
        let o = |c: i64, total: i128| Some(order(c, "paid", total, 1_000));
        let at = |id: i64, lsn: u64, index: u32, row: Option<Order>| {
            (
                Event {
                    change: Change::Order { id, row },
                    lsn,
                    ts_ms: 1,
                },
                index,
            )
        };
        let first = [
            at(7, 10, 0, o(1, 100)),
            at(9, 12, 0, o(3, 900)),
            at(9, 14, 0, None),
        ];
        let a = [at(7, 20, 0, None), at(7, 30, 1, o(1, 300))];
        let b = [at(7, 20, 1, o(2, 200)), at(7, 30, 0, None)];
        for (name, reads) in [
            ("A then B", [(0, &a[0]), (0, &a[1]), (1, &b[0]), (1, &b[1])]),
            ("B then A", [(1, &b[0]), (1, &b[1]), (0, &a[0]), (0, &a[1])]),
            (
                "interleaved",
                [(1, &b[0]), (0, &a[0]), (1, &b[1]), (0, &a[1])],
            ),
        ] {
            let mut s = State::new(SafetyStock::default());
            for (ev, i) in &first {
                s.read_orders_at(0, ev.lsn);
                s.apply_at(ev, Some(*i));
            }
            assert_eq!(
                s.forget_order_positions(&[0, 1]),
                0,
                "{name}: partition 1 gave nothing yet, so nothing can go"
            );
            let saved = s.save("t");
            s.track_checkpoint_changes(true);
            for (p, (ev, i)) in reads {
                s.read_orders_at(p, ev.lsn);
                s.apply_at(ev, Some(*i));
                s.forget_order_positions(&[0, 1]);
            }
            assert_eq!(s.orders[&7].customer_id, 1, "{name}");
            assert_eq!(s.orders[&7].total_cents, 300, "{name}");
            assert!(!s.orders.contains_key(&9), "{name}");
            // Both partitions are at LSN 30: the purged order's position went; the moved
            // order is present, so its position stays (a re-sent stale copy stays dropped).
            assert_eq!(s.order_pos.keys().collect::<Vec<_>>(), [&7], "{name}");
            s.read_orders_at(0, 40);
            s.read_orders_at(1, 41);
            assert_eq!(s.forget_order_positions(&[0, 1]), 0, "{name}");
            // Order 7 is deleted at (42, 0); both partitions go past it: its position goes.
            s.read_orders_at(0, 42);
            s.apply_at(&at(7, 42, 0, None).0, Some(0));
            assert_eq!(
                s.forget_order_positions(&[0, 1]),
                0,
                "{name}: partition 1 is at 41"
            );
            s.read_orders_at(1, 50);
            assert_eq!(
                s.forget_order_positions(&[0, 1]),
                0,
                "{name}: partition 0 is at the delete itself"
            );
            s.read_orders_at(0, 45);
            assert_eq!(s.forget_order_positions(&[0, 1]), 1, "{name}");
            assert_eq!(s.order_positions(), 0, "{name}");
            // A pipeline restart sends partition 0 again from LSN 30: the re-sent create and
            // then the delete come, and the order ends deleted.
            for (ev, i) in [&a[1], &at(7, 42, 0, None)] {
                s.read_orders_at(0, ev.lsn);
                s.apply_at(ev, Some(*i));
                s.forget_order_positions(&[0, 1]);
            }
            assert!(!s.orders.contains_key(&7), "{name}: after a re-send");
            // The checkpoint's deltas drop them too.
            let mut replica = crate::checkpoint::Replica::new(saved);
            replica.apply(s.take_delta());
            assert_eq!(
                replica.to_saved().order_positions.len(),
                s.order_positions(),
                "{name}"
            );
            assert!(replica.to_saved().orders.is_empty(), "{name}");
        }
        let mut s = State::new(SafetyStock::default());
        s.read_orders_at(2, 15);
        s.apply_at(&first[1].0, Some(0));
        s.apply_at(&first[2].0, Some(0));
        assert_eq!(
            s.forget_order_positions(&[2]),
            1,
            "one partition read, past LSN 14"
        );
        assert_eq!(
            s.forget_order_positions(&[]),
            0,
            "no orders partition: nothing known"
        );
    }

    #[test]
    fn an_order_moved_away_and_back_ends_as_its_last_change_in_any_read_order() {
        // Order 7 moves from customer 1 (partition A) to 2 (B) and back, as the producer
        // sends it: A: delete v0, create v2; B: create v1, delete v1. Positions are (commit
        // LSN, index in the transaction); the second move is one transaction at LSN 30.
        let o = |c: i64, total: i128| Some(order(c, "paid", total, 1_000));
        let at = |lsn: u64, index: u32, row: Option<Order>| {
            (
                Event {
                    change: Change::Order { id: 7, row },
                    lsn,
                    ts_ms: 1,
                },
                index,
            )
        };
        let first = at(10, 0, o(1, 100));
        let a = [at(20, 0, None), at(30, 1, o(1, 300))];
        let b = [at(20, 1, o(2, 200)), at(30, 0, None)];
        let ltv = |s: &State| -> Vec<(i64, i128)> {
            let mut v: Vec<_> = s
                .cust
                .iter()
                .filter(|(_, a)| a.orders > 0)
                .map(|(c, a)| (*c, a.ltv_cents))
                .collect();
            v.sort();
            v
        };
        for (name, reads) in [
            ("A then B", [&a[0], &a[1], &b[0], &b[1]]),
            ("B then A", [&b[0], &b[1], &a[0], &a[1]]),
            ("interleaved", [&b[0], &a[0], &b[1], &a[1]]),
        ] {
            let mut s = State::new(SafetyStock::default());
            s.apply_at(&first.0, Some(first.1));
            for (ev, i) in reads {
                s.apply_at(ev, Some(*i));
            }
            assert_eq!(s.orders[&7].customer_id, 1, "{name}");
            assert_eq!(ltv(&s), [(1, 300)], "{name}");
            // A restore keeps the positions: a stale change read again is still dropped.
            let mut r = State::restore(s.save("t"), SafetyStock::default()).unwrap();
            r.apply_at(&b[0].0, Some(b[0].1));
            assert_eq!(ltv(&r), [(1, 300)], "{name}, after a restore");
        }
        // A TRUNCATE at (50, 0), read after a later create from another partition and before
        // an earlier one: it keeps the later order and the earlier one never comes back.
        let mut s = State::new(SafetyStock::default());
        s.apply_at(&first.0, Some(0));
        let later = Event {
            change: Change::Order {
                id: 8,
                row: o(2, 800),
            },
            lsn: 60,
            ts_ms: 1,
        };
        let earlier = Event {
            change: Change::Order {
                id: 9,
                row: o(3, 900),
            },
            lsn: 45,
            ts_ms: 1,
        };
        let truncate = Event {
            change: Change::Truncate(2),
            lsn: 50,
            ts_ms: 1,
        };
        assert_eq!(TABLES[2], "oms.orders");
        s.apply_at(&later, Some(0));
        s.apply_at(&truncate, Some(0));
        let mut s = State::restore(s.save("t"), SafetyStock::default()).unwrap();
        s.apply_at(&earlier, Some(0));
        assert_eq!(
            ltv(&s),
            [(2, 800)],
            "only the order made after the truncate"
        );

        // Two updates of one order in one transaction differ by their index.
        let mut s = State::new(SafetyStock::default());
        s.apply_at(&first.0, Some(0));
        s.apply_at(&at(40, 0, o(1, 400)).0, Some(0));
        s.apply_at(&at(40, 1, o(1, 500)).0, Some(1));
        assert_eq!(ltv(&s), [(1, 500)]);
    }

    #[test]
    fn shard_summaries_merge_into_the_summary_of_all_diffs() {
        // Two shards with diffs of their own SKUs, and one shard (the customers') without any.
        let mut a = State::new(SafetyStock::default());
        let mut b = State::new(SafetyStock::default());
        let c = State::new(SafetyStock::default());
        let mut whole = State::new(SafetyStock::default());
        let cache = |sku: &str, v: i64, ts_ms: i64| Event {
            change: Change::InventoryCache {
                key: (sku.into(), "DC1".into()),
                available: Some(v),
            },
            lsn: 1,
            ts_ms,
        };
        for (s, evs) in [
            (&mut a, vec![cache("A", 5, 2_000), stock("A", "DC1", 3, 0)]),
            (&mut b, vec![cache("B", 1, 1_000), cache("C", 7, 3_000)]),
        ] {
            for e in &evs {
                s.apply(e);
                whole.apply(e);
            }
        }
        let mut parts = Vec::new();
        for s in [&mut a, &mut b, &mut whole] {
            s.finish_epoch().unwrap();
        }
        let mut c = c;
        c.finish_epoch().unwrap();
        for s in [&a, &b, &c] {
            parts.extend(s.view(RECON_SUMMARY).unwrap().batches().unwrap());
        }
        let merged = merge_summaries(&parts).unwrap();
        let want = whole.view(RECON_SUMMARY).unwrap().batches().unwrap();
        assert_eq!(merged.num_rows(), 1);
        assert_eq!(
            merged, want[0],
            "3 diffs (1 mismatch, 2 missing in wms), 2 + 1 + 7 units, oldest at 1 s"
        );
    }

    fn ev(change: Change) -> Event {
        Event {
            change,
            lsn: 1,
            ts_ms: 1_000,
        }
    }

    fn stock(sku: &str, loc: &str, on_hand: i64, reserved: i64) -> Event {
        ev(Change::StockLevel {
            key: (sku.into(), loc.into()),
            row: Some(Stock { on_hand, reserved }),
        })
    }

    fn cells(s: &State, view: &str) -> Vec<Row> {
        s.view(view).unwrap().rows().map(<[Cell]>::to_vec).collect()
    }

    fn order(customer_id: i64, status: &str, total_cents: i128, at: i64) -> Order {
        Order {
            customer_id,
            status: status.into(),
            total_cents,
            placed_at: at,
            updated_at: at,
        }
    }

    #[test]
    fn updates_retract_the_old_row_from_sums() {
        let mut s = State::new(SafetyStock {
            default: 1,
            categories: HashMap::from([("toys".into(), 4)]),
            skus: HashMap::new(),
        });
        s.apply(&ev(Change::Product {
            sku: "A".into(),
            category: Some("toys".into()),
        }));
        s.apply(&stock("A", "L1", 10, 2));
        s.apply(&stock("A", "L2", 5, 0));
        s.apply(&stock("A", "L1", 8, 3)); // update: -(10,2) +(8,3)
        s.finish_epoch().unwrap();
        assert_eq!(
            cells(&s, STOCK_BY_SKU),
            vec![vec![
                Cell::text("A"),
                Cell::Int(2),
                Cell::Int(13),
                Cell::Int(3),
                Cell::Int(8),
                Cell::Int(2)
            ]]
        );
        // The category changes: safety stock of every location follows.
        s.apply(&ev(Change::Product {
            sku: "A".into(),
            category: Some("books".into()),
        }));
        s.apply(&ev(Change::StockLevel {
            key: ("A".into(), "L2".into()),
            row: None,
        }));
        let out = s.finish_epoch().unwrap();
        let rows = cells(&s, STOCK_AVAILABILITY);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0][4], Cell::Int(1), "default safety stock now");
        assert_eq!(rows[0][5], Cell::Int(8 - 3 - 1));
        let deleted: usize = out
            .changes
            .iter()
            .filter(|c| c.view == STOCK_AVAILABILITY)
            .map(|c| c.deletes.num_rows())
            .sum();
        assert_eq!(deleted, 1, "L2 left the view");
    }

    #[test]
    fn going_below_zero_alerts_once() {
        let mut s = State::new(SafetyStock {
            default: 2,
            ..Default::default()
        });
        s.apply(&stock("A", "L1", 5, 0));
        assert!(s.finish_epoch().unwrap().alerts.is_empty());
        s.apply(&stock("A", "L1", 5, 4));
        let a = s.finish_epoch().unwrap().alerts;
        assert_eq!(a.len(), 1);
        assert_eq!((a[0].kind, a[0].available), ("available_below_zero", -1));
        s.apply(&stock("A", "L1", 5, 5));
        assert!(s.finish_epoch().unwrap().alerts.is_empty(), "already below");
        s.apply(&ev(Change::OrderLineAdded {
            order_id: 7,
            sku: "A".into(),
        }));
        let a = s.finish_epoch().unwrap().alerts;
        assert_eq!(a[0].kind, "order_on_unavailable_sku");
        assert_eq!(a[0].order_id, Some(7));
    }

    #[test]
    fn diffs_open_with_their_commit_time_and_retract_when_healed() {
        let mut s = State::new(SafetyStock::default());
        let key: SkuLoc = ("A".into(), "L1".into());
        s.apply(&Event {
            ts_ms: 5,
            ..stock("A", "L1", 10, 0)
        });
        s.apply(&Event {
            ts_ms: 6,
            ..ev(Change::InventoryCache {
                key: key.clone(),
                available: Some(10),
            })
        });
        s.finish_epoch().unwrap();
        assert!(cells(&s, RECON_DIFFS).is_empty());
        s.apply(&Event {
            ts_ms: 7,
            ..stock("A", "L1", 10, 3)
        });
        s.apply(&Event {
            ts_ms: 9,
            ..stock("A", "L1", 10, 4)
        });
        s.finish_epoch().unwrap();
        let d = cells(&s, RECON_DIFFS);
        assert_eq!(d[0][2], Cell::text("mismatch"));
        assert_eq!(d[0][5], Cell::Int(4));
        assert_eq!(d[0][6], Cell::Ts(7_000), "since the change that opened it");
        let sum = cells(&s, RECON_SUMMARY);
        assert_eq!(sum[0][5], Cell::Int(4));
        s.apply(&ev(Change::InventoryCache {
            key,
            available: Some(6),
        }));
        let out = s.finish_epoch().unwrap();
        assert!(cells(&s, RECON_DIFFS).is_empty(), "healed");
        assert!(
            out.changes
                .iter()
                .any(|c| c.view == RECON_DIFFS && c.deletes.num_rows() == 1)
        );
        assert_eq!(cells(&s, RECON_SUMMARY)[0][6], Cell::Null);
    }

    #[test]
    fn cancelling_retracts_from_ltv_and_first_order() {
        let mut s = State::new(SafetyStock::default());
        s.apply(&ev(Change::Customer {
            id: 1,
            exists: true,
        }));
        s.apply(&ev(Change::Order {
            id: 10,
            row: Some(order(1, "paid", 1000, 100)),
        }));
        s.apply(&ev(Change::Order {
            id: 11,
            row: Some(order(1, "pending", 501, 200)),
        }));
        s.finish_epoch().unwrap();
        let r = &cells(&s, CUSTOMER_360)[0];
        assert_eq!(
            (&r[1], &r[2], &r[3]),
            (&Cell::Int(2), &Cell::Dec(1501), &Cell::Dec(751))
        );
        assert_eq!((&r[4], &r[5]), (&Cell::Ts(100), &Cell::Ts(200)));
        s.apply(&ev(Change::Order {
            id: 10,
            row: Some(Order {
                updated_at: 300,
                ..order(1, "cancelled", 1000, 100)
            }),
        }));
        s.finish_epoch().unwrap();
        let r = &cells(&s, CUSTOMER_360)[0];
        assert_eq!((&r[1], &r[2]), (&Cell::Int(1), &Cell::Dec(501)));
        assert_eq!(r[4], Cell::Ts(200), "min moved past the retracted order");
        assert_eq!(r[6], Cell::Ts(300), "cancelling is activity");
        assert_eq!(
            r[10],
            Cell::text("top_5pct"),
            "the only customer with orders is the top"
        );
    }

    #[test]
    fn top_segment_follows_the_ltv_distribution() {
        let mut s = State::new(SafetyStock::default());
        for id in 1..=40 {
            s.apply(&ev(Change::Customer { id, exists: true }));
            s.apply(&ev(Change::Order {
                id,
                row: Some(order(id, "paid", i128::from(id) * 100, id)),
            }));
        }
        s.finish_epoch().unwrap();
        let top = |s: &State| -> Vec<i64> {
            cells(s, CUSTOMER_360)
                .iter()
                .filter(|r| r[10] == Cell::text("top_5pct"))
                .map(|r| match r[0] {
                    Cell::Int(v) => v,
                    _ => 0,
                })
                .collect()
        };
        assert_eq!(top(&s), vec![39, 40], "k = ceil(40 * 5 %) = 2");
        // Customer 40 cancels: 39 and 38 are now the top two.
        s.apply(&ev(Change::Order {
            id: 40,
            row: Some(order(40, "cancelled", 4000, 40)),
        }));
        s.finish_epoch().unwrap();
        assert_eq!(top(&s), vec![38, 39]);
    }

    /// Customers split over three shards, which pass their rank shares around until none
    /// changes: every shard's customer rows, segments included, are the whole state's rows of
    /// its customers; a restored shard keeps the shares it was given.
    #[test]
    fn customer_shards_exchanging_rank_shares_segment_as_one_state() {
        let mut whole = State::new(SafetyStock::default());
        let mut shards: Vec<State> = (0..3)
            .map(|i| State::new_as(SafetyStock::default(), &format!("customers-{i}")))
            .collect();
        // Skewed on purpose: shard 0 holds most of the high LTVs, and ties at the line.
        let ltv = |id: i64| i128::from(if id % 3 == 0 { id * 7 } else { id }) * 100 / 2 * 2;
        for id in 1..=157 {
            for s in std::iter::once(&mut whole).chain(shards.get_mut((id % 3) as usize)) {
                s.apply(&ev(Change::Customer { id, exists: true }));
                s.apply(&ev(Change::Order {
                    id,
                    row: Some(order(id, "paid", ltv(id) - ltv(id) % 700, id)),
                }));
            }
        }
        whole.finish_epoch().unwrap();
        let exchange = |shards: &mut Vec<State>| {
            for _ in 0..10 {
                for s in shards.iter_mut() {
                    s.finish_epoch().unwrap();
                }
                let shares: Vec<(String, RankShare)> = shards
                    .iter()
                    .map(|s| (s.scope.clone(), s.rank_share()))
                    .collect();
                let mut changed = false;
                for s in shards.iter_mut() {
                    for (name, share) in &shares {
                        if *name != s.scope && s.rank_shares.get(name) != Some(share) {
                            s.set_rank_share(name, Some(share.clone()));
                            changed = true;
                        }
                    }
                }
                if !changed {
                    return;
                }
            }
            panic!("the rank shares did not settle");
        };
        let rows = |shards: &[State]| -> Vec<Row> {
            let mut all: Vec<Row> = shards.iter().flat_map(|s| cells(s, CUSTOMER_360)).collect();
            all.sort_by(|a, b| format!("{:?}", a[0]).cmp(&format!("{:?}", b[0])));
            all
        };
        let mut want = cells(&whole, CUSTOMER_360);
        want.sort_by(|a, b| format!("{:?}", a[0]).cmp(&format!("{:?}", b[0])));
        // Alone, each shard draws its own line: not the whole state's segments.
        for s in shards.iter_mut() {
            s.finish_epoch().unwrap();
        }
        assert_ne!(rows(&shards), want, "the test must need the exchange");
        exchange(&mut shards);
        assert_eq!(rows(&shards), want);
        let tops = want
            .iter()
            .filter(|r| r[10] == Cell::text("top_5pct"))
            .count();
        assert!(tops >= 8, "ceil(157 * 5 %) = 8 and ties: {tops}");

        // The whole state changes (a top customer cancels): the shards follow.
        let gone = Change::Order {
            id: 153,
            row: Some(order(153, "cancelled", 0, 153)),
        };
        whole.apply(&ev(gone.clone()));
        whole.finish_epoch().unwrap();
        shards[0].apply(&ev(gone));
        exchange(&mut shards);
        let mut want = cells(&whole, CUSTOMER_360);
        want.sort_by(|a, b| format!("{:?}", a[0]).cmp(&format!("{:?}", b[0])));
        assert_eq!(rows(&shards), want);

        // A restored shard keeps the others' shares, so it segments as before at once.
        let saved = shards[1].save("t");
        let restored = State::restore_as(saved, SafetyStock::default(), "customers-1").unwrap();
        assert_eq!(
            cells(&restored, CUSTOMER_360),
            cells(&shards[1], CUSTOMER_360)
        );
    }

    #[test]
    fn restore_rebuilds_the_same_views() {
        let mut s = State::new(SafetyStock::default());
        s.apply(&stock("A", "L1", 3, 1));
        s.apply(&Event {
            ts_ms: 42,
            ..ev(Change::InventoryCache {
                key: ("B".into(), "L1".into()),
                available: Some(4),
            })
        });
        s.apply(&ev(Change::Customer {
            id: 1,
            exists: true,
        }));
        s.apply(&ev(Change::Order {
            id: 5,
            row: Some(order(1, "paid", 250, 9)),
        }));
        s.apply(&ev(Change::Return {
            id: 1,
            order_id: Some(5),
        }));
        s.finish_epoch().unwrap();
        let text = serde_json::to_string(&s.save("p")).unwrap();
        let r =
            State::restore(serde_json::from_str(&text).unwrap(), SafetyStock::default()).unwrap();
        for v in s.views() {
            assert_eq!(
                cells(&s, &v.def.name),
                cells(&r, &v.def.name),
                "view {}",
                v.def.name
            );
        }
        assert_eq!(cells(&r, RECON_DIFFS).len(), 2);
        assert_eq!(cells(&r, CUSTOMER_360)[0][7], Cell::Int(1), "one return");
    }

    #[test]
    fn rounding_is_half_away_from_zero() {
        assert_eq!(div_round(5, 2), 3);
        assert_eq!(div_round(-5, 2), -3);
        assert_eq!(div_round(4, 3), 1);
        assert_eq!(div_round(1501, 2), 751);
    }
}
