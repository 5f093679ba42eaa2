//! A legacy retail monolith in one Postgres database, for walbridge's tests, demos and benchmarks.
//!
//! walbridge exists because an old OMS/WMS app cannot change. To test it honestly we need that
//! app: its schema (`oms` and `wms`, see [`SCHEMA_SQL`]), a realistic amount of seed data, and its
//! write habits — plpgsql functions doing multi-table work in one transaction, bulk updates, a
//! lagging batch job that copies WMS stock into an OMS cache. This crate provides all three:
//!
//! - [`init`] drops and recreates both schemas and loads seed data with `COPY` in one transaction;
//! - [`simulate`] drives the monolith only through its own SQL at a given rate, deterministically
//!   for a seed (see the `simulate` module docs for what "deterministic" covers).
//!
//! Randomness comes from [`rng::SplitMix64`] so a seed means the same data forever.

mod error;
pub mod rng;
mod seed;
mod simulate;
mod vocab;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::SinkExt;
use tokio_postgres::Client;

pub use error::FixtureError;

/// The legacy schema: `oms` and `wms`, their tables, enum, and plpgsql functions. Creates only;
/// [`init`] drops the schemas first.
pub const SCHEMA_SQL: &str = include_str!("../sql/schema.sql");

/// Tables created by [`SCHEMA_SQL`], parents first.
pub const TABLES: &[&str] = &[
    "oms.customers",
    "oms.products",
    "oms.prices",
    "oms.orders",
    "oms.order_lines",
    "oms.payments",
    "oms.returns",
    "oms.inventory_cache",
    "oms.batch_jobs",
    "wms.locations",
    "wms.stock_levels",
    "wms.stock_movements",
    "wms.shipments",
    "wms.shipment_lines",
];

/// Size and seed of the initial data. Historical orders are derived: one per two customers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitOptions {
    pub seed: u64,
    pub products: u32,
    pub customers: u32,
    pub locations: u32,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            seed: 42,
            products: 10_000,
            customers: 50_000,
            locations: 20,
        }
    }
}

/// What [`init`] loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct InitReport {
    /// Rows per table, keyed by qualified name (`oms.orders`), for every table in [`TABLES`].
    pub rows: BTreeMap<String, u64>,
    pub elapsed: Duration,
}

impl InitReport {
    /// Rows loaded into `table` (qualified name), 0 for unknown tables.
    pub fn rows(&self, table: &str) -> u64 {
        self.rows.get(table).copied().unwrap_or(0)
    }

    pub fn total_rows(&self) -> u64 {
        self.rows.values().sum()
    }
}

/// Shape of the offered load over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    /// The configured rate and the everyday mix for the whole run.
    #[default]
    Steady,
    /// A sale's first hour, compressed: the first 20 % of the duration runs at 5x the rate with a
    /// mix heavy on orders, opened by a 20 % bulk price cut; then the steady rate and mix.
    Spike,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SimulateOptions {
    pub seed: u64,
    /// Transactions per second (positive, finite). Slots run as fast as possible when behind.
    pub rate: f64,
    /// Wall-clock bound of the run.
    pub duration: Duration,
    pub profile: Profile,
    /// Stop after this many transactions; bound a run by this when you need determinism.
    pub max_transactions: Option<u64>,
}

impl Default for SimulateOptions {
    fn default() -> Self {
        Self {
            seed: 42,
            rate: 100.0,
            duration: Duration::from_secs(60),
            profile: Profile::Steady,
            max_transactions: None,
        }
    }
}

/// The operations the simulator performs; each is one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    /// `oms.place_order`: header, 1..8 lines (sometimes 50), stock reserved.
    PlaceOrder,
    /// Payment row (authorized, sometimes declined) and order marked paid.
    PayOrder,
    /// Shipment per reserving location, lines, stock picked, pick movements, order shipped.
    ShipOrder,
    /// Shipments and order marked delivered.
    DeliverOrder,
    /// Reservations released, payment refunded if there was one, order cancelled.
    CancelOrder,
    /// Return row for one line, stock put back with a return movement, order returned.
    ReturnOrder,
    /// Goods received at a location (receipt movement).
    ReceiveStock,
    /// Stock count correction, either sign (adjustment movement).
    AdjustStock,
    /// Damaged stock written off (damage movement).
    DamageStock,
    /// One product's EUR price changed in place.
    ChangePrice,
    /// `oms.bulk_reprice` on one category.
    BulkReprice,
    /// A customer's phone, address, email or marketing consent changed.
    EditCustomer,
    /// A new customer.
    SignupCustomer,
    /// A product's tags and attributes changed; its description (maybe TOASTed) untouched.
    EditProduct,
    /// `oms.refresh_inventory_cache`, the lagging batch job (every ~100 transactions).
    RefreshInventoryCache,
}

impl OpKind {
    pub const ALL: [OpKind; 15] = [
        OpKind::PlaceOrder,
        OpKind::PayOrder,
        OpKind::ShipOrder,
        OpKind::DeliverOrder,
        OpKind::CancelOrder,
        OpKind::ReturnOrder,
        OpKind::ReceiveStock,
        OpKind::AdjustStock,
        OpKind::DamageStock,
        OpKind::ChangePrice,
        OpKind::BulkReprice,
        OpKind::EditCustomer,
        OpKind::SignupCustomer,
        OpKind::EditProduct,
        OpKind::RefreshInventoryCache,
    ];

    /// Operations drawn from the random mix: all but the refresh job, which is last in `ALL`
    /// and runs on its own cadence.
    pub(crate) const MIX: [OpKind; 14] = {
        let mut mix = [OpKind::PlaceOrder; 14];
        let mut i = 0;
        while i < mix.len() {
            mix[i] = Self::ALL[i];
            i += 1;
        }
        mix
    };

    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::PlaceOrder => "place_order",
            OpKind::PayOrder => "pay_order",
            OpKind::ShipOrder => "ship_order",
            OpKind::DeliverOrder => "deliver_order",
            OpKind::CancelOrder => "cancel_order",
            OpKind::ReturnOrder => "return_order",
            OpKind::ReceiveStock => "receive_stock",
            OpKind::AdjustStock => "adjust_stock",
            OpKind::DamageStock => "damage_stock",
            OpKind::ChangePrice => "change_price",
            OpKind::BulkReprice => "bulk_reprice",
            OpKind::EditCustomer => "edit_customer",
            OpKind::SignupCustomer => "signup_customer",
            OpKind::EditProduct => "edit_product",
            OpKind::RefreshInventoryCache => "refresh_inventory_cache",
        }
    }
}

/// What [`simulate`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulateReport {
    /// Committed operations per kind.
    pub counts: BTreeMap<OpKind, u64>,
    /// Slots run, including skipped ones.
    pub transactions: u64,
    /// Slots whose operation was skipped to respect a constraint (e.g. nothing left to damage).
    pub skipped: u64,
    pub elapsed: Duration,
    /// `transactions / elapsed` in transactions per second.
    pub achieved_rate: f64,
}

impl SimulateReport {
    pub fn count(&self, kind: OpKind) -> u64 {
        self.counts.get(&kind).copied().unwrap_or(0)
    }
}

/// COPY payloads are sent in chunks of about this size, split on row boundaries.
const COPY_CHUNK_BYTES: usize = 1 << 20;

/// Drops and recreates schemas `oms` and `wms`, loads seed data with COPY (the inventory cache as
/// its batch job last left it, in sync with stock) and runs ANALYZE, all in one transaction.
pub async fn init(client: &Client, opts: &InitOptions) -> Result<InitReport, FixtureError> {
    if opts.products == 0 || opts.customers == 0 || opts.locations == 0 {
        return Err(FixtureError::InvalidOptions(format!(
            "products, customers and locations must each be at least 1, got {opts:?}"
        )));
    }
    if opts.locations > 999 {
        return Err(FixtureError::InvalidOptions(format!(
            "at most 999 locations are supported (codes have three digits), got {}",
            opts.locations
        )));
    }
    let started = Instant::now();
    let tables = seed::generate(opts);
    client
        .batch_execute("begin")
        .await
        .map_err(FixtureError::sql("init: begin"))?;
    match load(client, tables).await {
        Ok(mut rows) => {
            client
                .batch_execute("commit")
                .await
                .map_err(FixtureError::sql("init: commit"))?;
            for t in TABLES {
                rows.entry((*t).to_string()).or_insert(0);
            }
            let elapsed = started.elapsed();
            tracing::info!(
                seed = opts.seed,
                rows = rows.values().sum::<u64>(),
                elapsed_ms = elapsed.as_millis() as u64,
                "legacy fixture initialised"
            );
            Ok(InitReport { rows, elapsed })
        }
        Err(e) => {
            // Best effort: the original error is the one worth reporting.
            let _ = client.batch_execute("rollback").await;
            Err(e)
        }
    }
}

async fn load(
    client: &Client,
    tables: Vec<seed::TableData>,
) -> Result<BTreeMap<String, u64>, FixtureError> {
    client
        .batch_execute("drop schema if exists oms cascade; drop schema if exists wms cascade")
        .await
        .map_err(FixtureError::sql("init: drop schemas oms and wms"))?;
    client
        .batch_execute(SCHEMA_SQL)
        .await
        .map_err(FixtureError::sql("init: create schema (sql/schema.sql)"))?;

    let mut rows = BTreeMap::new();
    for t in tables {
        let step = || format!("init: copy into {}", t.name);
        let sink = client
            .copy_in::<_, Bytes>(&format!("copy {} ({}) from stdin", t.name, t.columns))
            .await
            .map_err(FixtureError::sql(step()))?;
        let mut sink = std::pin::pin!(sink);
        let data = Bytes::from(t.text.into_bytes());
        let mut from = 0;
        while from < data.len() {
            let mut to = (from + COPY_CHUNK_BYTES).min(data.len());
            // Extend to the end of the row so no message splits a row (not required, tidier).
            while to < data.len() && data[to - 1] != b'\n' {
                to += 1;
            }
            sink.send(data.slice(from..to))
                .await
                .map_err(FixtureError::sql(step()))?;
            from = to;
        }
        let copied = sink
            .as_mut()
            .finish()
            .await
            .map_err(FixtureError::sql(step()))?;
        tracing::debug!(
            table = t.name,
            rows = copied,
            generated = t.rows,
            "copied seed rows"
        );
        rows.insert(t.name.to_string(), copied);
    }

    for table in seed::SERIAL_TABLES {
        client
            .batch_execute(&format!(
                "select setval(pg_get_serial_sequence('{table}', 'id'), coalesce(max(id), 0) + 1, false) from {table}"
            ))
            .await
            .map_err(FixtureError::sql(format!("init: advance id sequence of {table}")))?;
    }
    client
        .batch_execute(&format!("analyze {}", TABLES.join(", ")))
        .await
        .map_err(FixtureError::sql("init: analyze"))?;
    Ok(rows)
}

/// Drives the monolith through its own SQL; see [`SimulateOptions`] and [`OpKind`].
pub async fn simulate(
    client: &Client,
    opts: &SimulateOptions,
) -> Result<SimulateReport, FixtureError> {
    simulate::simulate(client, opts).await
}
