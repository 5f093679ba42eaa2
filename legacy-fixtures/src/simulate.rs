//! The workload generator: drives the monolith the way its old app does.
//!
//! Only the monolith's own SQL is used: `oms.place_order`, `oms.bulk_reprice`,
//! `oms.refresh_inventory_cache`, and the plain INSERT/UPDATE statements of the app. Each
//! scheduled slot is one transaction.
//!
//! Determinism: every choice comes from one seeded stream plus the database's own (deterministic)
//! answers, and every timestamp written comes from a simulated clock (the latest timestamp in the
//! data, plus each slot's scheduled offset), never from `now()`. So one seed on one initial state
//! issues the same statements in the same order and leaves byte-identical tables, as long as the
//! run is bounded by `max_transactions` rather than by wall-clock time. Pacing only decides *when*
//! a slot runs, never *what* it does: the spike phase is defined by slot index, not by time.
//!
//! Constraints: the simulator keeps `0 <= reserved <= on_hand` and the movement ledger
//! (`sum(stock_movements.qty) = on_hand`) by capping quantities to what is available and skipping
//! operations that have nothing to act on, instead of letting a statement fail.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime};

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use crate::error::FixtureError;
use crate::rng::SplitMix64;
use crate::vocab::*;
use crate::{OpKind, Profile, SimulateOptions, SimulateReport};

/// Share of the run's duration that the spike takes, and its rate multiplier.
const SPIKE_FRACTION: f64 = 0.2;
const SPIKE_RATE_MULTIPLIER: f64 = 5.0;
/// The cache refresh job runs every 75..=125 transactions: it lags on purpose.
const REFRESH_EVERY: (i64, i64) = (75, 125);

/// Mix weights (per mille) in `OpKind::MIX` order.
/// Steady: roughly balanced order flow (placed ≈ paid ≈ shipped ≈ delivered), so backlogs grow
/// slowly; the spike places far more orders than it ships.
const STEADY_MIX: [u32; 14] = [220, 200, 170, 150, 25, 20, 50, 25, 15, 40, 10, 40, 20, 15];
const SPIKE_MIX: [u32; 14] = [560, 200, 60, 30, 40, 5, 30, 5, 5, 10, 0, 20, 35, 0];

/// When each slot is due, relative to the start of the run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schedule {
    rate: f64,
    duration_secs: f64,
    spike_slots: u64,
    spike_secs: f64,
    spike_rate: f64,
}

impl Schedule {
    pub(crate) fn new(profile: Profile, rate: f64, duration: Duration) -> Self {
        let duration_secs = duration.as_secs_f64();
        match profile {
            Profile::Steady => Self {
                rate,
                duration_secs,
                spike_slots: 0,
                spike_secs: 0.0,
                spike_rate: rate,
            },
            Profile::Spike => {
                let spike_secs = duration_secs * SPIKE_FRACTION;
                let spike_rate = rate * SPIKE_RATE_MULTIPLIER;
                // `as` saturates, which is what an unbounded duration wants.
                let spike_slots = (spike_secs * spike_rate).ceil() as u64;
                Self {
                    rate,
                    duration_secs,
                    spike_slots,
                    spike_secs,
                    spike_rate,
                }
            }
        }
    }

    pub(crate) fn offset_secs(&self, slot: u64) -> f64 {
        if slot < self.spike_slots {
            slot as f64 / self.spike_rate
        } else {
            self.spike_secs
                .max(self.spike_slots as f64 / self.spike_rate)
                + (slot - self.spike_slots) as f64 / self.rate
        }
    }

    pub(crate) fn in_spike(&self, slot: u64) -> bool {
        slot < self.spike_slots
    }

    /// Whether the slot is due before the end of the run.
    pub(crate) fn contains(&self, slot: u64) -> bool {
        self.offset_secs(slot) < self.duration_secs
    }
}

/// What one slot did.
enum Outcome {
    Done(OpKind),
    Skipped(OpKind),
}

struct Stmts {
    check_stock: Statement,
    place_order: Statement,
    pay_insert: Statement,
    order_status: Statement,
    order_lines: Statement,
    ship_insert: Statement,
    ship_line_insert: Statement,
    stock_pick: Statement,
    stock_release: Statement,
    stock_delta: Statement,
    stock_lock: Statement,
    movement_insert: Statement,
    deliver_shipments: Statement,
    refund_payment: Statement,
    return_insert: Statement,
    price_update: Statement,
    bulk_reprice: Statement,
    customer_update: Statement,
    customer_insert: Statement,
    product_update: Statement,
    refresh: Statement,
}

impl Stmts {
    async fn prepare(client: &Client) -> Result<Self, FixtureError> {
        let p = |sql: &'static str| async move {
            client.prepare(sql).await.map_err(FixtureError::sql(format!(
                "prepare simulator statement `{sql}`"
            )))
        };
        Ok(Self {
            check_stock: p("select sku::text, max(on_hand - reserved)::int4 from wms.stock_levels \
                            where sku = any($1::text[]) group by sku")
            .await?,
            place_order: p("select oms.place_order($1::int8, $2::text::jsonb, $3::timestamptz, $4::text::uuid)").await?,
            pay_insert: p("insert into oms.payments (order_id, amount, currency, method, status, psp_reference, authorized_at) \
                           select id, total, currency, $2, $3, $4, $5 from oms.orders where id = $1")
            .await?,
            order_status: p("update oms.orders set status = $2::text::oms.order_status, updated_at = $3 where id = $1")
                .await?,
            order_lines: p("select line_no, sku::text, qty, reserved_location::text from oms.order_lines \
                            where order_id = $1 order by line_no")
            .await?,
            ship_insert: p("insert into wms.shipments (order_id, location_code, carrier, tracking_no, shipped_at) \
                            values ($1, $2, $3, $4, $5) returning id")
            .await?,
            ship_line_insert: p("insert into wms.shipment_lines (shipment_id, line_no, sku, qty) values ($1, $2, $3, $4)")
                .await?,
            stock_pick: p("update wms.stock_levels set on_hand = on_hand - $3, reserved = reserved - $3, updated_at = $4 \
                           where sku = $1 and location_code = $2")
            .await?,
            stock_release: p("update wms.stock_levels set reserved = reserved - $3, updated_at = $4 \
                              where sku = $1 and location_code = $2")
            .await?,
            stock_delta: p("update wms.stock_levels set on_hand = on_hand + $3, updated_at = $4 \
                            where sku = $1 and location_code = $2")
            .await?,
            stock_lock: p("select on_hand, reserved from wms.stock_levels where sku = $1 and location_code = $2 for update")
                .await?,
            movement_insert: p("insert into wms.stock_movements (sku, location_code, kind, qty, ref_order_id, created_at) \
                                values ($1, $2, $3, $4, $5, $6)")
            .await?,
            deliver_shipments: p("update wms.shipments set delivered_at = $2 where order_id = $1 and delivered_at is null")
                .await?,
            refund_payment: p("update oms.payments set status = 'refunded' where order_id = $1 and status = 'authorized'")
                .await?,
            return_insert: p("insert into oms.returns (order_id, sku, qty, reason, created_at) values ($1, $2, $3, $4, $5)")
                .await?,
            price_update: p("update oms.prices set price = greatest(round(price * $2::text::numeric, 2), 0.01), \
                             valid_from = ($3::timestamptz at time zone 'UTC')::date, updated_at = $3 \
                             where sku = $1 and currency = 'EUR'")
            .await?,
            bulk_reprice: p("select oms.bulk_reprice($1::text, $2::text::numeric, $3::timestamptz)").await?,
            customer_update: p("update oms.customers set email = coalesce($2, email), phone = coalesce($3, phone), \
                                street = coalesce($4, street), city = coalesce($5, city), \
                                postcode = coalesce($6, postcode), marketing_opt_in = coalesce($7, marketing_opt_in), \
                                updated_at = $8 where id = $1")
            .await?,
            customer_insert: p("insert into oms.customers (email, first_name, last_name, phone, street, city, postcode, \
                                country, marketing_opt_in, loyalty_points, created_at, updated_at) \
                                values ($1, $2, $3, $4, $5, $6, $7, 'GB', $8, 0, $9, $9) returning id")
            .await?,
            product_update: p("update oms.products set tags = $2::text[], \
                               attributes = attributes || jsonb_build_object('color', $3::text), updated_at = $4 \
                               where sku = $1")
            .await?,
            refresh: p("select oms.refresh_inventory_cache($1::timestamptz)").await?,
        })
    }
}

struct OrderLine {
    sku: String,
    qty: i32,
    location: Option<String>,
}

/// The simulator's view of the monolith: reference data plus order ids by lifecycle state.
struct Sim<'a> {
    client: &'a Client,
    st: Stmts,
    rng: SplitMix64,
    skus: Vec<String>,
    locations: Vec<String>,
    categories: Vec<String>,
    max_customer: i64,
    pending: Vec<i64>,
    paid: Vec<i64>,
    shipped: Vec<i64>,
    delivered: Vec<i64>,
}

fn take(rng: &mut SplitMix64, ids: &mut Vec<i64>) -> Option<i64> {
    if ids.is_empty() {
        None
    } else {
        Some(ids.swap_remove(rng.index(ids.len())))
    }
}

impl<'a> Sim<'a> {
    async fn load(client: &'a Client, seed: u64) -> Result<Self, FixtureError> {
        let q = |sql: &'static str, step: &'static str| async move {
            client
                .query(sql, &[])
                .await
                .map_err(FixtureError::sql(step))
        };
        let skus = q(
            "select sku::text from oms.products order by sku",
            "simulate: load skus",
        )
        .await?;
        let locations = q(
            "select code::text from wms.locations order by code",
            "simulate: load locations",
        )
        .await?;
        let categories = q(
            "select distinct category::text from oms.products order by 1",
            "simulate: load categories",
        )
        .await?;
        let max_customer = q(
            "select coalesce(max(id), 0) from oms.customers",
            "simulate: load customers",
        )
        .await?;
        let orders = q(
            "select id, status::text from oms.orders where status in ('pending', 'paid', 'shipped', 'delivered') order by id",
            "simulate: load open orders",
        )
        .await?;
        let skus: Vec<String> = skus.iter().map(|r| r.get(0)).collect();
        let locations: Vec<String> = locations.iter().map(|r| r.get(0)).collect();
        if skus.is_empty() || locations.is_empty() {
            return Err(FixtureError::InvalidOptions(
                "the database has no products or no locations: run legacy_fixtures::init first"
                    .into(),
            ));
        }
        let mut sim = Self {
            st: Stmts::prepare(client).await?,
            client,
            rng: SplitMix64::new(seed).fork(0x5157),
            skus,
            locations,
            categories: categories.iter().map(|r| r.get(0)).collect(),
            max_customer: max_customer.first().map(|r| r.get(0)).unwrap_or(0),
            pending: Vec::new(),
            paid: Vec::new(),
            shipped: Vec::new(),
            delivered: Vec::new(),
        };
        for row in orders {
            let id: i64 = row.get(0);
            match row.get::<_, &str>(1) {
                "pending" => sim.pending.push(id),
                "paid" => sim.paid.push(id),
                "shipped" => sim.shipped.push(id),
                _ => sim.delivered.push(id),
            }
        }
        Ok(sim)
    }

    async fn exec(
        &self,
        st: &Statement,
        params: &[&(dyn ToSql + Sync)],
        step: &str,
    ) -> Result<u64, FixtureError> {
        self.client
            .execute(st, params)
            .await
            .map_err(FixtureError::sql(format!("simulate: {step}")))
    }

    async fn query(
        &self,
        st: &Statement,
        params: &[&(dyn ToSql + Sync)],
        step: &str,
    ) -> Result<Vec<tokio_postgres::Row>, FixtureError> {
        self.client
            .query(st, params)
            .await
            .map_err(FixtureError::sql(format!("simulate: {step}")))
    }

    /// Falls back to placing an order when the chosen operation has nothing to act on.
    fn feasible(&self, kind: OpKind) -> OpKind {
        let ok = match kind {
            OpKind::PayOrder => !self.pending.is_empty(),
            OpKind::ShipOrder => !self.paid.is_empty(),
            OpKind::DeliverOrder => !self.shipped.is_empty(),
            OpKind::CancelOrder => !self.pending.is_empty() || !self.paid.is_empty(),
            OpKind::ReturnOrder => !self.delivered.is_empty(),
            OpKind::BulkReprice => !self.categories.is_empty(),
            OpKind::EditCustomer => self.max_customer > 0,
            _ => true,
        };
        if ok { kind } else { OpKind::PlaceOrder }
    }

    /// Runs one slot as one transaction.
    async fn run(&mut self, kind: OpKind, at: SystemTime) -> Result<Outcome, FixtureError> {
        let kind = self.feasible(kind);
        self.client
            .batch_execute("begin")
            .await
            .map_err(FixtureError::sql("simulate: begin"))?;
        let result = self.op(kind, at).await;
        match result {
            Ok(done) => {
                self.client
                    .batch_execute("commit")
                    .await
                    .map_err(FixtureError::sql(format!(
                        "simulate: commit {}",
                        kind.as_str()
                    )))?;
                Ok(if done {
                    Outcome::Done(kind)
                } else {
                    Outcome::Skipped(kind)
                })
            }
            Err(e) => {
                // Best effort: the original error is the one worth reporting.
                let _ = self.client.batch_execute("rollback").await;
                Err(e)
            }
        }
    }

    /// Returns false when the operation was skipped to respect a constraint.
    async fn op(&mut self, kind: OpKind, at: SystemTime) -> Result<bool, FixtureError> {
        match kind {
            OpKind::PlaceOrder => self.place_order(at).await,
            OpKind::PayOrder => self.pay_order(at).await,
            OpKind::ShipOrder => self.ship_order(at).await,
            OpKind::DeliverOrder => self.deliver_order(at).await,
            OpKind::CancelOrder => self.cancel_order(at).await,
            OpKind::ReturnOrder => self.return_order(at).await,
            OpKind::ReceiveStock => self.receive_stock(at).await,
            OpKind::AdjustStock => self.adjust_stock(at, false).await,
            OpKind::DamageStock => self.adjust_stock(at, true).await,
            OpKind::ChangePrice => self.change_price(at).await,
            OpKind::BulkReprice => {
                let pct = *self.rng.pick(&[-20, -10, -5, 5, 10, 12]).unwrap_or(&5);
                self.bulk_reprice(pct, at).await
            }
            OpKind::EditCustomer => self.edit_customer(at).await,
            OpKind::SignupCustomer => self.signup_customer(at).await,
            OpKind::EditProduct => self.edit_product(at).await,
            OpKind::RefreshInventoryCache => {
                let rows = self
                    .query(&self.st.refresh, &[&at], "refresh inventory cache")
                    .await?;
                let _: i32 = rows.first().map(|r| r.get(0)).unwrap_or(0);
                Ok(true)
            }
        }
    }

    async fn place_order(&mut self, at: SystemTime) -> Result<bool, FixtureError> {
        // Mostly small baskets, sometimes a 50-line business order.
        let n = if self.rng.chance(20) {
            50
        } else {
            1 + self.rng.below(8).min(self.rng.below(8)) as usize
        };
        let n = n.min(self.skus.len());
        let mut picked: Vec<(usize, i32)> = Vec::with_capacity(n);
        let mut attempts = 0;
        while picked.len() < n && attempts < 4 * n {
            attempts += 1;
            let p = self.rng.index(self.skus.len());
            if picked.iter().any(|(q, _)| *q == p) {
                continue;
            }
            let qty = if self.rng.chance(800) {
                1
            } else {
                self.rng.between(2, 4) as i32
            };
            picked.push((p, qty));
        }
        // The storefront checks availability before checkout; cap to what one location has.
        let skus: Vec<&str> = picked.iter().map(|(p, _)| self.skus[*p].as_str()).collect();
        let rows = self
            .query(&self.st.check_stock, &[&skus], "check stock for order")
            .await?;
        let available: HashMap<String, i32> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let mut json = String::from("[");
        let mut lines = 0;
        for (p, qty) in &picked {
            let sku = &self.skus[*p];
            let qty = (*qty).min(available.get(sku).copied().unwrap_or(0));
            if qty <= 0 {
                continue;
            }
            if lines > 0 {
                json.push(',');
            }
            json.push_str(&format!(r#"{{"sku":"{sku}","qty":{qty}}}"#));
            lines += 1;
        }
        json.push(']');
        let customer = self.rng.between(1, self.max_customer.max(1));
        let uuid = self.rng.uuid_v4();
        if lines == 0 {
            return Ok(false);
        }
        let rows = self
            .query(
                &self.st.place_order,
                &[&customer, &json, &at, &uuid],
                "place order",
            )
            .await?;
        if let Some(id) = rows.first().map(|r| r.get::<_, i64>(0)) {
            self.pending.push(id);
        }
        Ok(true)
    }

    async fn pay_order(&mut self, at: SystemTime) -> Result<bool, FixtureError> {
        let Some(id) = take(&mut self.rng, &mut self.pending) else {
            return Ok(false);
        };
        let method = *self.rng.pick(PAYMENT_METHODS).unwrap_or(&"card");
        let declined = self.rng.chance(40);
        let status = if declined { "declined" } else { "authorized" };
        let psp = format!("psp_{:016x}", self.rng.next_u64());
        self.exec(
            &self.st.pay_insert,
            &[&id, &method, &status, &psp, &at],
            "insert payment",
        )
        .await?;
        if declined {
            self.pending.push(id);
        } else {
            self.exec(
                &self.st.order_status,
                &[&id, &"paid", &at],
                "mark order paid",
            )
            .await?;
            self.paid.push(id);
        }
        Ok(true)
    }

    async fn lines(&self, order: i64) -> Result<Vec<OrderLine>, FixtureError> {
        let rows = self
            .query(&self.st.order_lines, &[&order], "load order lines")
            .await?;
        Ok(rows
            .iter()
            .map(|r| OrderLine {
                sku: r.get(1),
                qty: r.get(2),
                location: r.get(3),
            })
            .collect())
    }

    async fn movement(
        &self,
        sku: &str,
        loc: &str,
        kind: &str,
        qty: i32,
        order: Option<i64>,
        at: SystemTime,
    ) -> Result<(), FixtureError> {
        self.exec(
            &self.st.movement_insert,
            &[&sku, &loc, &kind, &qty, &order, &at],
            "insert stock movement",
        )
        .await?;
        Ok(())
    }

    async fn ship_order(&mut self, at: SystemTime) -> Result<bool, FixtureError> {
        let Some(id) = take(&mut self.rng, &mut self.paid) else {
            return Ok(false);
        };
        let lines = self.lines(id).await?;
        // One shipment per location that holds the reservations (split shipments).
        let mut by_loc: BTreeMap<String, Vec<&OrderLine>> = BTreeMap::new();
        for l in &lines {
            if let Some(loc) = &l.location {
                by_loc.entry(loc.clone()).or_default().push(l);
            }
        }
        for (loc, ls) in &by_loc {
            let carrier = *self.rng.pick(CARRIERS).unwrap_or(&"dpd");
            let tracking = format!(
                "{}{:012}",
                carrier.to_uppercase(),
                self.rng.below(1_000_000_000_000)
            );
            let rows = self
                .query(
                    &self.st.ship_insert,
                    &[&id, loc, &carrier, &tracking, &at],
                    "insert shipment",
                )
                .await?;
            let Some(shipment) = rows.first().map(|r| r.get::<_, i64>(0)) else {
                continue;
            };
            for (n, l) in ls.iter().enumerate() {
                let line_no = (n + 1) as i16;
                self.exec(
                    &self.st.ship_line_insert,
                    &[&shipment, &line_no, &l.sku, &l.qty],
                    "insert shipment line",
                )
                .await?;
                self.exec(
                    &self.st.stock_pick,
                    &[&l.sku, loc, &l.qty, &at],
                    "pick stock",
                )
                .await?;
                self.movement(&l.sku, loc, "pick", -l.qty, Some(id), at)
                    .await?;
            }
        }
        self.exec(
            &self.st.order_status,
            &[&id, &"shipped", &at],
            "mark order shipped",
        )
        .await?;
        self.shipped.push(id);
        Ok(true)
    }

    async fn deliver_order(&mut self, at: SystemTime) -> Result<bool, FixtureError> {
        let Some(id) = take(&mut self.rng, &mut self.shipped) else {
            return Ok(false);
        };
        self.exec(
            &self.st.deliver_shipments,
            &[&id, &at],
            "mark shipments delivered",
        )
        .await?;
        self.exec(
            &self.st.order_status,
            &[&id, &"delivered", &at],
            "mark order delivered",
        )
        .await?;
        self.delivered.push(id);
        Ok(true)
    }

    async fn cancel_order(&mut self, at: SystemTime) -> Result<bool, FixtureError> {
        let from_paid = self.pending.is_empty() || (!self.paid.is_empty() && self.rng.chance(250));
        let list = if from_paid {
            &mut self.paid
        } else {
            &mut self.pending
        };
        let Some(id) = take(&mut self.rng, list) else {
            return Ok(false);
        };
        for l in self.lines(id).await? {
            if let Some(loc) = &l.location {
                self.exec(
                    &self.st.stock_release,
                    &[&l.sku, loc, &l.qty, &at],
                    "release reservation",
                )
                .await?;
            }
        }
        if from_paid {
            self.exec(&self.st.refund_payment, &[&id], "refund payment")
                .await?;
        }
        self.exec(
            &self.st.order_status,
            &[&id, &"cancelled", &at],
            "mark order cancelled",
        )
        .await?;
        Ok(true)
    }

    async fn return_order(&mut self, at: SystemTime) -> Result<bool, FixtureError> {
        let Some(id) = take(&mut self.rng, &mut self.delivered) else {
            return Ok(false);
        };
        let lines = self.lines(id).await?;
        let Some(line) = self.rng.pick(&lines) else {
            return Ok(false);
        };
        let qty = self.rng.between(1, i64::from(line.qty)) as i32;
        let reason = *self.rng.pick(RETURN_REASONS).unwrap_or(&"changed mind");
        self.exec(
            &self.st.return_insert,
            &[&id, &line.sku, &qty, &reason, &at],
            "insert return",
        )
        .await?;
        if let Some(loc) = &line.location {
            self.exec(
                &self.st.stock_delta,
                &[&line.sku, loc, &qty, &at],
                "restock return",
            )
            .await?;
            self.movement(&line.sku, loc, "return", qty, Some(id), at)
                .await?;
        }
        self.exec(
            &self.st.order_status,
            &[&id, &"returned", &at],
            "mark order returned",
        )
        .await?;
        Ok(true)
    }

    fn random_stock_key(&mut self) -> (String, String) {
        let sku = self.skus[self.rng.index(self.skus.len())].clone();
        let loc = self.locations[self.rng.index(self.locations.len())].clone();
        (sku, loc)
    }

    async fn receive_stock(&mut self, at: SystemTime) -> Result<bool, FixtureError> {
        let (sku, loc) = self.random_stock_key();
        let qty = self.rng.between(1, 20) as i32 * 10;
        if self
            .exec(
                &self.st.stock_delta,
                &[&sku, &loc, &qty, &at],
                "receive stock",
            )
            .await?
            == 0
        {
            return Ok(false);
        }
        self.movement(&sku, &loc, "receipt", qty, None, at).await?;
        Ok(true)
    }

    /// A stock count correction (either sign) or damaged goods written off (negative). Never
    /// takes on_hand below what is reserved.
    async fn adjust_stock(&mut self, at: SystemTime, damage: bool) -> Result<bool, FixtureError> {
        let (sku, loc) = self.random_stock_key();
        let wanted = if damage {
            -(self.rng.between(1, 3) as i32)
        } else {
            match self.rng.between(-5, 4) as i32 {
                0 => 5,
                d => d,
            }
        };
        let rows = self
            .query(&self.st.stock_lock, &[&sku, &loc], "lock stock level")
            .await?;
        let Some((on_hand, reserved)) = rows
            .first()
            .map(|r| (r.get::<_, i32>(0), r.get::<_, i32>(1)))
        else {
            return Ok(false);
        };
        let delta = wanted.max(reserved - on_hand);
        if delta == 0 {
            return Ok(false);
        }
        let kind = if damage { "damage" } else { "adjustment" };
        self.exec(
            &self.st.stock_delta,
            &[&sku, &loc, &delta, &at],
            "adjust stock",
        )
        .await?;
        self.movement(&sku, &loc, kind, delta, None, at).await?;
        Ok(true)
    }

    async fn change_price(&mut self, at: SystemTime) -> Result<bool, FixtureError> {
        let sku = self.skus[self.rng.index(self.skus.len())].clone();
        let pct = match self.rng.between(-15, 15) {
            0 => 5,
            p => p,
        };
        let factor = 100 + pct;
        let factor = format!("{}.{:02}", factor / 100, factor % 100);
        Ok(self
            .exec(&self.st.price_update, &[&sku, &factor, &at], "change price")
            .await?
            > 0)
    }

    async fn bulk_reprice(&mut self, pct: i64, at: SystemTime) -> Result<bool, FixtureError> {
        let Some(category) = self.rng.pick(&self.categories).cloned() else {
            return Ok(false);
        };
        let pct = pct.to_string();
        let rows = self
            .query(
                &self.st.bulk_reprice,
                &[&category, &pct, &at],
                "bulk reprice",
            )
            .await?;
        Ok(rows.first().map(|r| r.get::<_, i32>(0)).unwrap_or(0) > 0)
    }

    async fn edit_customer(&mut self, at: SystemTime) -> Result<bool, FixtureError> {
        let id = self.rng.between(1, self.max_customer);
        let (mut email, mut phone, mut street, mut city, mut postcode, mut opt_in) =
            (None, None, None, None, None, None);
        match self.rng.below(4) {
            0 => {
                phone = Some(format!(
                    "+44 7{:03} {:06}",
                    self.rng.below(1000),
                    self.rng.below(1_000_000)
                ))
            }
            1 => {
                street = Some(format!(
                    "{} {}",
                    self.rng.between(1, 250),
                    self.rng.pick(STREETS).unwrap_or(&"Mill Lane")
                ));
                city = Some(self.rng.pick(CITIES).unwrap_or(&"York").to_string());
                postcode = Some(format!(
                    "YO{} {}AB",
                    self.rng.between(1, 30),
                    self.rng.between(1, 9)
                ));
            }
            2 => {
                email = Some(format!(
                    "customer{id}.{}@example.net",
                    self.rng.below(10_000)
                ))
            }
            _ => opt_in = Some(self.rng.chance(500)),
        }
        let n = self
            .exec(
                &self.st.customer_update,
                &[&id, &email, &phone, &street, &city, &postcode, &opt_in, &at],
                "edit customer",
            )
            .await?;
        Ok(n > 0)
    }

    async fn signup_customer(&mut self, at: SystemTime) -> Result<bool, FixtureError> {
        let first = *self.rng.pick(FIRST_NAMES).unwrap_or(&"Alex");
        let last = *self.rng.pick(LAST_NAMES).unwrap_or(&"Smith");
        let email = format!(
            "{}.{}.{}@example.org",
            first.to_lowercase(),
            last.to_lowercase(),
            self.rng.below(1_000_000)
        );
        let phone = format!(
            "+44 7{:03} {:06}",
            self.rng.below(1000),
            self.rng.below(1_000_000)
        );
        let street = format!(
            "{} {}",
            self.rng.between(1, 250),
            self.rng.pick(STREETS).unwrap_or(&"High Street")
        );
        let city = *self.rng.pick(CITIES).unwrap_or(&"Leeds");
        let postcode = format!("LS{} {}QT", self.rng.between(1, 30), self.rng.between(1, 9));
        let opt_in = self.rng.chance(500);
        let rows = self
            .query(
                &self.st.customer_insert,
                &[
                    &email, &first, &last, &phone, &street, &city, &postcode, &opt_in, &at,
                ],
                "sign up customer",
            )
            .await?;
        if let Some(id) = rows.first().map(|r| r.get::<_, i64>(0)) {
            self.max_customer = self.max_customer.max(id);
        }
        Ok(true)
    }

    /// Touches tags and attributes but not the (possibly TOASTed) description.
    async fn edit_product(&mut self, at: SystemTime) -> Result<bool, FixtureError> {
        let sku = self.skus[self.rng.index(self.skus.len())].clone();
        let mut tags: Vec<String> = Vec::new();
        for _ in 0..self.rng.below(4) {
            let t = self.rng.pick(TAGS).unwrap_or(&"new").to_string();
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
        let color = *self.rng.pick(COLORS).unwrap_or(&"black");
        Ok(self
            .exec(
                &self.st.product_update,
                &[&sku, &tags, &color, &at],
                "edit product",
            )
            .await?
            > 0)
    }
}

pub(crate) async fn simulate(
    client: &Client,
    opts: &SimulateOptions,
) -> Result<SimulateReport, FixtureError> {
    if !(opts.rate.is_finite() && opts.rate > 0.0) {
        return Err(FixtureError::InvalidOptions(format!(
            "rate must be a positive number of transactions per second, got {}",
            opts.rate
        )));
    }
    let schedule = Schedule::new(opts.profile, opts.rate, opts.duration);
    let mut sim = Sim::load(client, opts.seed).await?;
    let mut cadence = SplitMix64::new(opts.seed).fork(0xCAC4E);
    // The simulated clock starts just after the newest timestamp in the data.
    let base: SystemTime = client
        .query_one(
            "select greatest((select max(updated_at) from oms.orders), \
                             (select max(created_at) from wms.stock_movements), \
                             (select max(updated_at) from oms.prices), \
                             (select max(updated_at) from oms.customers), \
                             timestamptz '2025-01-01 00:00:00+00') + interval '1 second'",
            &[],
        )
        .await
        .map_err(FixtureError::sql("simulate: read simulated clock start"))?
        .get(0);

    let mut counts: BTreeMap<OpKind, u64> = BTreeMap::new();
    let mut skipped = 0u64;
    let mut slot = 0u64;
    let mut refresh_in = cadence.between(1, REFRESH_EVERY.1);
    let start = Instant::now();
    tracing::info!(seed = opts.seed, rate = opts.rate, profile = ?opts.profile, "simulation started");
    loop {
        if opts.max_transactions.is_some_and(|max| slot >= max) || !schedule.contains(slot) {
            break;
        }
        if start.elapsed() >= opts.duration {
            break;
        }
        let due = Duration::try_from_secs_f64(schedule.offset_secs(slot)).unwrap_or(Duration::MAX);
        if let Some(deadline) = start.checked_add(due) {
            tokio::time::sleep_until(deadline.into()).await;
        }
        let at = base.checked_add(due).unwrap_or(base);

        refresh_in -= 1;
        let kind = if opts.profile == Profile::Spike && slot == 0 {
            // The sale starts: a category goes 20% off in one big transaction.
            None
        } else if refresh_in <= 0 {
            refresh_in = cadence.between(REFRESH_EVERY.0, REFRESH_EVERY.1);
            Some(OpKind::RefreshInventoryCache)
        } else {
            let mix = if schedule.in_spike(slot) {
                &SPIKE_MIX
            } else {
                &STEADY_MIX
            };
            Some(
                sim.rng
                    .weighted(mix)
                    .map(|i| OpKind::MIX[i])
                    .unwrap_or(OpKind::PlaceOrder),
            )
        };
        let outcome = match kind {
            Some(kind) => sim.run(kind, at).await?,
            None => {
                sim.client
                    .batch_execute("begin")
                    .await
                    .map_err(FixtureError::sql("simulate: begin"))?;
                let r = sim.bulk_reprice(-20, at).await;
                let done = match r {
                    Ok(done) => done,
                    Err(e) => {
                        let _ = sim.client.batch_execute("rollback").await;
                        return Err(e);
                    }
                };
                sim.client
                    .batch_execute("commit")
                    .await
                    .map_err(FixtureError::sql("simulate: commit sale start"))?;
                if done {
                    Outcome::Done(OpKind::BulkReprice)
                } else {
                    Outcome::Skipped(OpKind::BulkReprice)
                }
            }
        };
        match outcome {
            Outcome::Done(kind) => {
                *counts.entry(kind).or_default() += 1;
                tracing::trace!(slot, op = kind.as_str(), "transaction done");
            }
            Outcome::Skipped(kind) => {
                skipped += 1;
                tracing::debug!(
                    slot,
                    op = kind.as_str(),
                    "transaction skipped to respect constraints"
                );
            }
        }
        slot += 1;
    }
    let elapsed = start.elapsed();
    let achieved_rate = if elapsed.is_zero() {
        0.0
    } else {
        slot as f64 / elapsed.as_secs_f64()
    };
    tracing::info!(
        transactions = slot,
        skipped,
        elapsed_ms = elapsed.as_millis() as u64,
        achieved_rate,
        "simulation finished"
    );
    Ok(SimulateReport {
        counts,
        transactions: slot,
        skipped,
        elapsed,
        achieved_rate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spike_runs_first_fifth_at_five_times_the_rate() {
        let s = Schedule::new(Profile::Spike, 10.0, Duration::from_secs(10));
        // 2 s at 50/s = 100 slots, then 8 s at 10/s = 80 slots.
        assert!(s.in_spike(99) && !s.in_spike(100));
        assert!((s.offset_secs(50) - 1.0).abs() < 1e-9);
        assert!((s.offset_secs(100) - 2.0).abs() < 1e-9);
        assert!((s.offset_secs(110) - 3.0).abs() < 1e-9);
        let slots = (0..1000).take_while(|i| s.contains(*i)).count();
        assert_eq!(slots, 180);
    }

    #[test]
    fn steady_is_evenly_paced() {
        let s = Schedule::new(Profile::Steady, 4.0, Duration::from_secs(2));
        assert!(!s.in_spike(0));
        assert_eq!((0..100).take_while(|i| s.contains(*i)).count(), 8);
        assert!((s.offset_secs(3) - 0.75).abs() < 1e-9);
    }

    #[test]
    fn mixes_cover_their_operations() {
        assert_eq!(STEADY_MIX.iter().sum::<u32>(), 1000);
        assert_eq!(SPIKE_MIX.iter().sum::<u32>(), 1000);
        assert!(
            STEADY_MIX.iter().all(|w| *w > 0),
            "steady mix must reach every operation"
        );
        // The spike is heavy on orders.
        assert!(SPIKE_MIX[0] >= 2 * STEADY_MIX[0]);
    }
}
