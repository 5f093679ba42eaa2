//! Stream processors and the live views they keep (issue 5).
//!
//! [`view`] is the contract between the processors (which fold change events into keyed state
//! and publish epochs), the SQL endpoint (which serves the latest snapshot of each view) and the
//! view sinks (which apply each epoch's changes downstream).
//!
//! ```text
//!  <prefix>.oms.* / wms.stock_levels ──poll──▶ input::decode ──Event──▶ State::apply (fold)
//!        ▲ seek to checkpoint offsets                                     │ every epoch_interval
//!        │                                          ┌─────────────────────┤
//!  checkpoint (rows by key + offsets) ◀── every checkpoint_interval       ▼
//!                                       Catalog (Snapshot per view) + Epoch channel + alerts topic
//! ```
//!
//! # Weighted rows, and where the old row comes from
//!
//! Every change is "retract the old row, add the new one" (insert +1, delete −1, update −old
//! +new). The old row is taken from the processors' own last-row-per-primary-key state
//! ([`state`]), not from the envelope's `before`. Why: `before` is complete only under
//! `REPLICA IDENTITY FULL`, and the design promises the legacy team at most an optional
//! `ALTER TABLE`; the per-key rows are needed anyway for the joins (order → customer for
//! returns, product → category for safety stock, stock ↔ inventory cache for reconciliation);
//! and they are the checkpoint, from which every aggregate is rebuilt on restore by the same
//! code that folds live changes. Cost: memory for a projection of the input rows (a few tens of
//! bytes per stock level, order, return), which is what Materialize holds too once it joins.
//!
//! # Views (schemas in [`state::view_defs`])
//!
//! - `stock_availability` (sku, location_code): on_hand, reserved, safety_stock,
//!   available = on_hand − reserved − safety_stock. Safety stock per (sku, location) from
//!   `processors.safety_stock`: the SKU's own value, else its category's (oms.products), else
//!   the default.
//! - `stock_availability_by_sku` (sku): sums over locations; `available` is the
//!   available-to-promise. When it goes from ≥ 0 (or absent) to < 0, an `available_below_zero`
//!   alert goes to `<prefix>.alerts.oversell` (JSON, keyed by SKU); a new order line on a SKU
//!   whose available-to-promise is ≤ 0 at the end of the epoch raises
//!   `order_on_unavailable_sku`. Alerts are at least once, with a deterministic `id`.
//! - `reconciliation_diffs` (sku, location_code): oms.inventory_cache.available vs wms
//!   on_hand − reserved; kind missing_in_oms / missing_in_wms / mismatch, both values,
//!   magnitude = |oms − wms| (missing side counts 0), `since` = source commit time of the change
//!   that opened the diff (kept while the diff stays open, whatever its kind becomes). A diff
//!   that heals is deleted from the view.
//! - `reconciliation_summary` (scope = 'all'): diffs by kind, units at risk (Σ magnitude),
//!   oldest `since` (an ordered multiset, so healing the oldest diff moves it).
//! - `customer_360` (customer_id, one row per oms.customers row): orders, lifetime_value,
//!   avg_order_value (rounded half away from zero to cents), first/last_order_at count every
//!   order except **cancelled** ones (never paid, or refunded in full); returned orders still
//!   count (a return refunds one line and its amount is not in the source).
//!   last_activity_at = latest updated_at of any order, cancelled ones included.
//!   returns_count = oms.returns rows of the customer's orders; return_rate = share of counted
//!   orders with a return. open_orders = pending, paid or shipped. segment: `prospect` (no
//!   orders), `top_5pct` (LTV ≥ the k-th largest LTV among customers with orders,
//!   k = ⌈5 % of them⌉; kept in an ordered set, and only customers between the old and the new
//!   threshold are re-evaluated when it moves), `new` (one order), else `regular`. No expiry.
//!
//! # Consistency
//!
//! Topics are read independently, so between epochs a view can reflect, say, a stock level but
//! not yet the inventory-cache row of the same transaction. Once the source is quiet and every
//! partition is read, every view equals the SQL definition; [`check`] proves it against the
//! database at one LSN (`walbridge views check`).
//!
//! # Restart
//!
//! The checkpoint holds the per-key rows, the open diffs' `since`, and the next offset of every
//! partition, written atomically (temp + fsync + rename). On start the state is rebuilt from it
//! and the consumer is assigned at its offsets: changes after the checkpoint are folded again,
//! exactly once into the state. Alerts between the checkpoint and a crash are produced again
//! (at least once, same ids). View sinks stay exact: checkpoints wait until the sinks stored the
//! epoch they end at, and the replay closes epochs exactly where each sink stands (see
//! [`runtime`]'s module doc for the argument; `walbridge process` wires the sinks).
//!
//! # Scale-out
//!
//! By default (`processors.instances: single`) one processor instance reads *every* partition
//! of its input topics (it assigns them itself, under `group_id` only for lag reporting). With
//! `processors.instances: group` the instances share the partitions through a consumer group
//! ([`group`]). The views are keyed by SKU or customer while the
//! change topics are keyed by each table's primary key, so splitting partitions among instances
//! would split a SKU's stock levels, or a customer's orders, across instances and make every
//! aggregate wrong. Sharing the work needs co-partitioning. The plan (session 8), and why:
//!
//! 1. **Co-partition at the source, not through a repartition topic.** A repartition stage
//!    (consume, re-key, produce, consume again) puts a second trip through the broker on every
//!    change's way into SQL. Measured with `walbridge views bench --floors-only` on the
//!    2-core test machine at the demo's load, the WAL alone already takes p99 83 ms and one trip
//!    through tansu p50 12–21 / p99 21–90 ms, against a 100 ms p99 budget. So the change
//!    producer routes chosen tables by a column (`kafka.partition_by`, Debezium's
//!    `PartitionRouting`): murmur2 of the column's text, modulo the topic's partitions. By SKU:
//!    products, stock levels, inventory cache, order lines; by customer: customers (id) and
//!    orders (customer_id). Topics routed together must have equal partition counts (checked
//!    when a group member starts, as Kafka Streams does; since session 13). Per-key order still holds, since a key keeps its
//!    partition while its routing value stays. **Built** for primary-key columns (session 8;
//!    the demo routes products, stock levels and inventory cache by SKU) and for order lines by
//!    SKU (session 9: the fold keeps no line rows, so a moved line is only a new line on its new
//!    SKU, [`input::ROWS_NOT_KEPT`]) and orders by customer_id (step 2).
//! 2. **A routing value that changes moves the row.** The producer sends a delete (and
//!    tombstone) to the old partition and a create to the new one, each with an event id of its
//!    own. The old value is known only if the column is in the replica identity or the table is
//!    `REPLICA IDENTITY FULL`, so any other `partition_by` is refused at start with that
//!    `ALTER TABLE` as the fix (orders by customer_id needs FULL). **Built** in the producer
//!    (session 8) and, for orders, in the fold (session 9): it must accept one primary key in
//!    two partitions, read in either order. Matching a delete's `before` against the row held is
//!    not enough: a row moved A → B and back B → A gives A: delete v0, create v2 and B: create
//!    v1, delete v1, and reading A first ends with v1 instead of v2. So the fold keeps, per
//!    order, the source position (commit LSN, index in the transaction from
//!    `walbridge.event_id`) of the change it holds, deleted orders too (dropped once every
//!    partition it reads is past them, [`state::State::forget_order_positions`]), and drops any
//!    change at or before it
//!    ([`state::State::apply_at`]). Other inputs whose rows the fold keeps are still refused a
//!    non-key routing.
//! 3. **Returns carry no customer.** The plan was a global order_id → customer_id table, from
//!    the orders topic read whole by every instance. Not needed, it turned out (session 12): the
//!    fold keeps a count of returns per order id and applies it when the order comes, in
//!    whichever order the two arrive. So every customer unit reads the *returns* topic whole
//!    and counts every return (16 bytes each); the returns of other units' orders are never
//!    used. **Built.** The returns are the one input that does not scale out; view sinks store
//!    each unit's positions in it under `<topic>@<unit>` ([`group::to_sink`]).
//! 4. **Instances share the partitions in one consumer group.** **Built** for the stock side
//!    (session 9, [`group`]): partition *i* of the four SKU-routed topics is a *unit* with a
//!    processor and a checkpoint of its own, given to one member; the customer topics are one
//!    unit, until steps 2, 3 and 5 let them shard too; **built** since session 12: partition *i*
//!    of the customer topics is unit `customers-<i>`, given along with `skus-<i>`. Checkpoints
//!    are files in a shared directory with a lock per unit, not yet a table in a store every
//!    instance reaches.
//! 5. **Global parts are merged from partials.** The reconciliation summary (counts, units at
//!    risk, oldest `since`) and the top-5 % LTV threshold (each partition's k largest LTVs) are
//!    published per partition to a compacted internal topic; every instance merges all partials,
//!    and re-segments its own customers when the threshold moves. **Built** for the threshold
//!    (session 12): each customer unit sends its [`state::RankShare`] (its ranked count and its
//!    k largest LTVs) to the compacted topic `<prefix>.processors.<group_id>.customer-ranks`
//!    when it changes, and reads every other unit's shares as an input like the change topics
//!    (offsets checkpointed, so an epoch that only moved the line still advances the sinks'
//!    offsets and reaches them). For the summary, within one instance
//!    ([`state::merge_summaries`], applied by the SQL endpoint over the instance's units); the
//!    readers of the sinks add its rows up, and the Postgres read model does it for them in
//!    the view `reconciliation_summary_total` (session 14).
//! 6. **SQL over all shards.** Each instance serves the whole view by also reading the other
//!    instances' epochs from the Kafka view sink's compacted topics (which exist already).
//!    **Built** (session 13, [`remote`]): the sink tags each record with its unit and write,
//!    a member keeps every unit's rows from the topics and applies a write once all its
//!    records arrived, and its catalog hides a unit's remote rows while it folds the unit.
//!    Since session 14 the records also carry the write's input offsets, and a unit that
//!    moved to a member is served from the topics until its processor has caught up with
//!    them, so it never steps back ([`view::Catalog`]).
//!
//! What tansu 0.6 (the broker the tests run on) allows, read in its sources (session 7): classic
//! consumer groups assign partitions and rebalance on a clean `LeaveGroup` (at least 3 s per
//! rebalance), but a member that dies without leaving is noticed only on another member's
//! heartbeat and its partitions, or the leadership, are not handed on; there is no `EndTxn`, so
//! no transactional producer. So a two-instance test can cover a clean join and leave on tansu,
//! but not a kill -9 failover.
//!
//! Missing today: the summary's part of 5 in the view topics and the lake (every view sink
//! runs per unit with `instances: group`, so they hold a summary row per unit to add up; a
//! changelog reader aggregates anyway). Without a Kafka
//! view sink step 6 has nothing to read, and each member's SQL endpoint serves the units *it*
//! folds.

pub mod bench;
pub mod check;
pub mod checkpoint;
pub mod freshness;
pub mod group;
pub mod input;
pub mod multiset;
pub mod remote;
pub mod runtime;
pub mod sql;
pub mod state;
pub mod table;
pub mod view;

/// Arrow as the views use it, for crates that handle view batches without DataFusion itself.
pub use datafusion::arrow;
pub use runtime::{
    ProcessError, ProcessorConfig, ProcessorStats, Running, SinkFeed, SinkGate, run, run_with,
};
pub use state::SafetyStock;
