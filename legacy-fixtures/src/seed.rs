//! Seed data for `init`: generated in memory from the seed, loaded with `COPY FROM STDIN`.
//!
//! The data is consistent the way the simulator relies on:
//! - `stock_levels.reserved` equals the quantity of open (pending/paid) order lines reserved at
//!   that location, and `reserved <= on_hand`;
//! - one opening `adjustment` movement per stock level (a stock take), so that the sum of
//!   `stock_movements.qty` per (sku, location) equals `on_hand`;
//! - no wall-clock values: every timestamp derives from the seed and lies before 2025-01-01, so two
//!   inits with one seed are byte-identical.
//!
//! Everything is generated before the first COPY, so a failure in generation never leaves half a
//! schema behind; `init` runs in one transaction anyway.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::InitOptions;
use crate::rng::SplitMix64;
use crate::vocab::*;

/// 2019-01-01T00:00:00Z, first customer and product.
const EPOCH_2019: i64 = 1_546_300_800;
/// 2023-01-01T00:00:00Z, first historical order.
const EPOCH_2023: i64 = 1_672_531_200;
/// 2024-12-20T00:00:00Z, last historical order.
const ORDERS_END: i64 = 1_734_652_800;
/// 2024-12-31T22:00:00Z, the stock take that produced the opening movements.
const STOCK_TAKE: i64 = 1_735_682_400;
/// 2024-12-31T23:00:00Z, the last inventory cache refresh before the fixture starts.
const CACHE_REFRESH: i64 = 1_735_686_000;
const DAY: i64 = 86_400;

/// One table's COPY payload.
pub(crate) struct TableData {
    pub name: &'static str,
    pub columns: &'static str,
    pub rows: u64,
    pub text: String,
}

/// Tables whose `bigserial` ids we wrote explicitly; their sequences must be moved past them.
pub(crate) const SERIAL_TABLES: &[&str] = &[
    "oms.customers",
    "oms.orders",
    "oms.payments",
    "oms.returns",
    "wms.shipments",
];

/// Builds a table in COPY text format, escaping as the format requires.
struct CopyText {
    text: String,
    rows: u64,
    at_row_start: bool,
}

impl CopyText {
    fn with_capacity(bytes: usize) -> Self {
        Self {
            text: String::with_capacity(bytes),
            rows: 0,
            at_row_start: true,
        }
    }

    fn sep(&mut self) {
        if !self.at_row_start {
            self.text.push('\t');
        }
        self.at_row_start = false;
    }

    fn str(&mut self, s: &str) -> &mut Self {
        self.sep();
        for c in s.chars() {
            match c {
                '\\' => self.text.push_str("\\\\"),
                '\t' => self.text.push_str("\\t"),
                '\n' => self.text.push_str("\\n"),
                '\r' => self.text.push_str("\\r"),
                c => self.text.push(c),
            }
        }
        self
    }

    /// Values whose text form needs no escaping (numbers, booleans, our timestamps).
    fn val(&mut self, v: impl std::fmt::Display) -> &mut Self {
        self.sep();
        // Writing into a String cannot fail.
        let _ = write!(self.text, "{v}");
        self
    }

    fn null(&mut self) -> &mut Self {
        self.sep();
        self.text.push_str("\\N");
        self
    }

    fn opt_str(&mut self, v: Option<&str>) -> &mut Self {
        match v {
            Some(s) => self.str(s),
            None => self.null(),
        }
    }

    fn end(&mut self) {
        self.text.push('\n');
        self.rows += 1;
        self.at_row_start = true;
    }

    fn finish(self, name: &'static str, columns: &'static str) -> TableData {
        TableData {
            name,
            columns,
            rows: self.rows,
            text: self.text,
        }
    }
}

/// Proleptic Gregorian (year, month, day) for days since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn date(epoch_secs: i64) -> String {
    let (y, m, d) = civil_from_days(epoch_secs.div_euclid(DAY));
    format!("{y:04}-{m:02}-{d:02}")
}

/// `timestamp` text (no zone) for the UTC instant.
fn ts_local(epoch_secs: i64) -> String {
    let secs = epoch_secs.rem_euclid(DAY);
    format!(
        "{} {:02}:{:02}:{:02}",
        date(epoch_secs),
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// `timestamptz` text for the UTC instant.
fn ts(epoch_secs: i64) -> String {
    format!("{}+00", ts_local(epoch_secs))
}

fn money(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

fn location_code(i: usize) -> (String, &'static str) {
    let kind = if i.is_multiple_of(8) {
        "dc"
    } else if i.is_multiple_of(3) {
        "warehouse"
    } else {
        "store"
    };
    let prefix = match kind {
        "dc" => "DC",
        "warehouse" => "WH",
        _ => "ST",
    };
    (format!("{prefix}{:03}", i + 1), kind)
}

pub(crate) fn sku(i: usize) -> String {
    format!("SKU-{:06}", i + 1)
}

fn words(r: &mut SplitMix64, n: usize, out: &mut String) {
    for w in 0..n {
        if w > 0 {
            out.push(' ');
        }
        // Numbers every few words keep long texts from compressing under the TOAST threshold.
        if r.chance(200) {
            let _ = write!(out, "{}", r.below(1_000_000));
        } else {
            out.push_str(r.pick(DESCRIPTION_WORDS).unwrap_or(&"item"));
        }
    }
    out.push('.');
}

#[derive(Clone, Copy, PartialEq)]
enum Status {
    Pending,
    Paid,
    Shipped,
    Delivered,
    Cancelled,
    Returned,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Paid => "paid",
            Status::Shipped => "shipped",
            Status::Delivered => "delivered",
            Status::Cancelled => "cancelled",
            Status::Returned => "returned",
        }
    }
}

struct Line {
    product: usize,
    qty: i32,
    location: usize,
}

/// Generates every seeded table in load order (parents before children).
pub(crate) fn generate(opts: &InitOptions) -> Vec<TableData> {
    let n_products = opts.products as usize;
    let n_customers = opts.customers as usize;
    let n_locations = opts.locations as usize;
    let mut root = SplitMix64::new(opts.seed);
    let mut tables = Vec::with_capacity(12);

    // Locations.
    let mut r = root.fork(1);
    let mut locations = CopyText::with_capacity(n_locations * 80);
    let mut codes = Vec::with_capacity(n_locations);
    for i in 0..n_locations {
        let (code, kind) = location_code(i);
        let city = CITIES[i % CITIES.len()];
        let label = match kind {
            "dc" => "Distribution Centre",
            "warehouse" => "Warehouse",
            _ => "Store",
        };
        locations
            .str(&code)
            .str(&format!("{city} {label}"))
            .str(kind)
            .str(city)
            .val(true)
            .val(date(EPOCH_2019 - r.between(0, 15 * 365) * DAY));
        locations.end();
        codes.push(code);
    }
    tables.push(locations.finish(
        "wms.locations",
        "code, name, kind, city, is_active, opened_on",
    ));

    // Products and prices.
    let mut r = root.fork(2);
    let mut rp = root.fork(3);
    let mut products = CopyText::with_capacity(n_products * 600);
    let mut prices = CopyText::with_capacity(n_products * 70);
    let mut eur_cents = Vec::with_capacity(n_products);
    let mut desc = String::new();
    for i in 0..n_products {
        let sku = sku(i);
        let category = *r.pick(CATEGORIES).unwrap_or(&"home");
        let name = format!(
            "{} {} {}",
            r.pick(ADJECTIVES).unwrap_or(&"Classic"),
            r.pick(NOUNS).unwrap_or(&"Item"),
            r.between(100, 999)
        );
        desc.clear();
        // Every 20th product has a long description that Postgres stores out of line (TOAST):
        // updates that leave it untouched exercise pgoutput's "unchanged toast" marker.
        let n_words = if i % 20 == 7 {
            r.between(1500, 2200)
        } else {
            r.between(15, 60)
        };
        words(&mut r, n_words as usize, &mut desc);
        let attributes = format!(
            r#"{{"color": "{}", "size": "{}", "origin": "{}", "care": {{"wash_c": {}}}}}"#,
            r.pick(COLORS).unwrap_or(&"black"),
            r.pick(SIZES).unwrap_or(&"M"),
            r.pick(ORIGINS).unwrap_or(&"GB"),
            r.pick(&[30, 40, 60]).unwrap_or(&30)
        );
        let mut tags: Vec<&str> = Vec::new();
        for _ in 0..r.below(4) {
            let t = *r.pick(TAGS).unwrap_or(&"new");
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
        let created = EPOCH_2019 + r.between(0, 5 * 365 * DAY);
        let updated = created + r.between(0, 180 * DAY);
        products
            .str(&sku)
            .str(&name)
            .str(&desc)
            .str(category)
            .str(&attributes)
            .str(&format!("{{{}}}", tags.join(",")))
            .val(r.between(50, 25_000))
            .val(!r.chance(30))
            .val(ts(created))
            .val(ts(updated));
        products.end();

        let cents = rp.between(1, 299) * 100 + [99, 49, 0][rp.index(3)];
        eur_cents.push(cents);
        let valid_from = date(EPOCH_2023 + rp.between(0, 700) * DAY);
        let updated = ts(EPOCH_2023 + rp.between(0, 700) * DAY);
        prices
            .str(&sku)
            .str("EUR")
            .val(money(cents))
            .val(&valid_from)
            .val(&updated);
        prices.end();
        if rp.chance(300) {
            prices
                .str(&sku)
                .str("GBP")
                .val(money((cents * 86 / 100).max(1)))
                .val(&valid_from)
                .val(&updated);
            prices.end();
        }
    }
    tables.push(products.finish(
        "oms.products",
        "sku, name, description, category, attributes, tags, weight_grams, active, created_at, updated_at",
    ));
    tables.push(prices.finish("oms.prices", "sku, currency, price, valid_from, updated_at"));

    // Customers.
    let mut r = root.fork(4);
    let mut customers = CopyText::with_capacity(n_customers * 220);
    for id in 1..=n_customers {
        let first = *r.pick(FIRST_NAMES).unwrap_or(&"Alex");
        let last = *r.pick(LAST_NAMES).unwrap_or(&"Smith");
        let created = EPOCH_2019 + r.between(0, 2160 * DAY);
        let updated = created + r.between(0, 30 * DAY);
        let birth = if r.chance(300) {
            None
        } else {
            Some(date(r.between(-20 * 365, 35 * 365) * DAY))
        };
        customers
            .val(id)
            .str(&format!(
                "{}.{}{id}@example.com",
                first.to_lowercase(),
                last.to_lowercase()
            ))
            .str(first)
            .str(last)
            .str(&format!(
                "+44 7{:03} {:06}",
                r.below(1000),
                r.below(1_000_000)
            ))
            .str(&format!(
                "{} {}",
                r.between(1, 250),
                r.pick(STREETS).unwrap_or(&"High Street")
            ))
            .str(r.pick(CITIES).unwrap_or(&"London"))
            .str(&format!(
                "{}{} {}{}",
                ["N", "SW", "M", "LS", "B", "EH"][r.index(6)],
                r.between(1, 20),
                r.between(1, 9),
                ["AB", "XY", "QT", "RJ"][r.index(4)]
            ))
            .str(if r.chance(850) {
                "GB"
            } else {
                ["IE", "PT", "NL"][r.index(3)]
            })
            .opt_str(birth.as_deref())
            .val(r.chance(400))
            .val(r.between(0, 5000))
            .val(ts(created))
            .val(ts(updated));
        customers.end();
    }
    tables.push(customers.finish(
        "oms.customers",
        "id, email, first_name, last_name, phone, street, city, postcode, country, birth_date, \
         marketing_opt_in, loyalty_points, created_at, updated_at",
    ));

    // Stock on hand, before historical reservations.
    let mut r = root.fork(5);
    let mut on_hand = vec![0i32; n_products * n_locations];
    let mut reserved = vec![0i32; n_products * n_locations];
    for v in on_hand.iter_mut() {
        *v = if r.chance(50) {
            0
        } else {
            r.between(5, 400) as i32
        };
    }

    // Historical orders with their payments, shipments and returns.
    let mut r = root.fork(6);
    let n_orders = n_customers / 2;
    let open_from = n_orders.saturating_sub((n_orders / 50).max(1));
    let mut orders = CopyText::with_capacity(n_orders * 120);
    let mut order_lines = CopyText::with_capacity(n_orders * 3 * 50);
    let mut payments = CopyText::with_capacity(n_orders * 100);
    let mut shipments = CopyText::with_capacity(n_orders * 90);
    let mut shipment_lines = CopyText::with_capacity(n_orders * 3 * 30);
    let mut returns = CopyText::with_capacity(n_orders / 10 * 60);
    let (mut payment_id, mut shipment_id, mut return_id) = (0u64, 0u64, 0u64);
    let step = (ORDERS_END - EPOCH_2023) / n_orders.max(1) as i64;
    for i in 0..n_orders {
        let id = i as u64 + 1;
        let placed = EPOCH_2023 + step * i as i64 + r.below(step.max(1) as u64) as i64;
        let customer = r.between(1, n_customers as i64);
        let mut status = if i >= open_from {
            [Status::Pending, Status::Paid, Status::Shipped][r.index(3)]
        } else {
            match r.below(100) {
                0..=87 => Status::Delivered,
                88..=95 => Status::Cancelled,
                _ => Status::Returned,
            }
        };
        let n_lines = 1 + r.below(5).min(r.below(5)) as usize;
        let mut lines: Vec<Line> = Vec::with_capacity(n_lines);
        for _ in 0..n_lines {
            let product = r.index(n_products);
            if lines.iter().any(|l| l.product == product) {
                continue;
            }
            let qty = if r.chance(800) {
                1
            } else {
                r.between(2, 3) as i32
            };
            lines.push(Line {
                product,
                qty,
                location: r.index(n_locations),
            });
        }
        if matches!(status, Status::Pending | Status::Paid) {
            // Open orders hold reservations, like place_order would have made them.
            let choice: Option<Vec<usize>> = lines
                .iter()
                .map(|l| {
                    (0..n_locations).find(|loc| {
                        let k = l.product * n_locations + loc;
                        on_hand[k] - reserved[k] >= l.qty
                    })
                })
                .collect();
            match choice {
                Some(locs) => {
                    for (l, loc) in lines.iter_mut().zip(locs) {
                        l.location = loc;
                        reserved[l.product * n_locations + loc] += l.qty;
                    }
                }
                None => status = Status::Cancelled,
            }
        }
        let total: i64 = lines
            .iter()
            .map(|l| i64::from(l.qty) * eur_cents[l.product])
            .sum();
        let updated = placed
            + match status {
                Status::Pending => 0,
                Status::Paid => 600,
                Status::Shipped => DAY,
                Status::Delivered => 3 * DAY,
                Status::Cancelled => 7200,
                Status::Returned => 10 * DAY,
            };
        orders
            .val(id)
            .val(r.uuid_v4())
            .val(customer)
            .val(status.as_str())
            .val("EUR")
            .val(money(total))
            .val(["web", "web", "web", "store", "phone"][r.index(5)])
            .val(ts(placed))
            .val(ts(updated));
        orders.end();
        for (n, l) in lines.iter().enumerate() {
            order_lines
                .val(id)
                .val(n + 1)
                .str(&sku(l.product))
                .val(l.qty)
                .val(money(eur_cents[l.product]))
                .str(&codes[l.location]);
            order_lines.end();
        }

        let pay_status = match status {
            Status::Pending => None,
            Status::Paid => Some("authorized"),
            Status::Shipped | Status::Delivered => Some("captured"),
            Status::Returned => Some("refunded"),
            Status::Cancelled => r.chance(300).then_some("voided"),
        };
        if let Some(pay_status) = pay_status {
            payment_id += 1;
            payments
                .val(payment_id)
                .val(id)
                .val(money(total))
                .val("EUR")
                .str(r.pick(PAYMENT_METHODS).unwrap_or(&"card"))
                .str(pay_status)
                .val(format!("psp_{:016x}", r.next_u64()))
                .val(ts_local(placed + 300));
            payments.end();
        }

        if matches!(
            status,
            Status::Shipped | Status::Delivered | Status::Returned
        ) {
            // One shipment per location the lines were picked at.
            let mut by_loc: BTreeMap<&str, Vec<&Line>> = BTreeMap::new();
            for l in &lines {
                by_loc
                    .entry(codes[l.location].as_str())
                    .or_default()
                    .push(l);
            }
            for (loc, ls) in by_loc {
                shipment_id += 1;
                let carrier = *r.pick(CARRIERS).unwrap_or(&"dpd");
                shipments
                    .val(shipment_id)
                    .val(id)
                    .str(loc)
                    .str(carrier)
                    .val(format!(
                        "{}{:012}",
                        carrier.to_uppercase(),
                        r.below(1_000_000_000_000)
                    ))
                    .val(ts(placed + DAY));
                if status == Status::Shipped {
                    shipments.null();
                } else {
                    shipments.val(ts(placed + 3 * DAY));
                }
                shipments.end();
                for (n, l) in ls.iter().enumerate() {
                    shipment_lines
                        .val(shipment_id)
                        .val(n + 1)
                        .str(&sku(l.product))
                        .val(l.qty);
                    shipment_lines.end();
                }
            }
        }

        if status == Status::Returned
            && let Some(l) = r.pick(&lines)
        {
            return_id += 1;
            returns
                .val(return_id)
                .val(id)
                .str(&sku(l.product))
                .val(r.between(1, i64::from(l.qty)))
                .str(r.pick(RETURN_REASONS).unwrap_or(&"changed mind"))
                .val(ts_local(placed + 10 * DAY));
            returns.end();
        }
    }

    // Stock levels after reservations, and the stock take that explains on_hand.
    let mut stock = CopyText::with_capacity(on_hand.len() * 60);
    let mut cache = CopyText::with_capacity(on_hand.len() * 50);
    let mut movements = CopyText::with_capacity(on_hand.len() * 70);
    let mut r = root.fork(7);
    for p in 0..n_products {
        let sku = sku(p);
        for (l, code) in codes.iter().enumerate() {
            let k = p * n_locations + l;
            stock
                .str(&sku)
                .str(code)
                .val(on_hand[k])
                .val(reserved[k])
                .val(ts(STOCK_TAKE - r.between(0, 90 * DAY)));
            stock.end();
            // What the cache job copied at CACHE_REFRESH; the simulator makes it drift.
            cache
                .str(&sku)
                .str(code)
                .val((on_hand[k] - reserved[k]).max(0))
                .val(ts(CACHE_REFRESH));
            cache.end();
            if on_hand[k] > 0 {
                movements
                    .str(&sku)
                    .str(code)
                    .val("adjustment")
                    .val(on_hand[k])
                    .null()
                    .val(ts(STOCK_TAKE));
                movements.end();
            }
        }
    }

    let cached = cache.rows;
    tables.push(stock.finish(
        "wms.stock_levels",
        "sku, location_code, on_hand, reserved, updated_at",
    ));
    tables.push(cache.finish(
        "oms.inventory_cache",
        "sku, location_code, available, refreshed_at",
    ));
    let mut jobs = CopyText::with_capacity(80);
    jobs.str("refresh_inventory_cache")
        .val(ts(CACHE_REFRESH))
        .val(cached);
    jobs.end();
    tables.push(jobs.finish("oms.batch_jobs", "job, last_run_at, last_rows"));
    tables.push(orders.finish(
        "oms.orders",
        "id, order_uuid, customer_id, status, currency, total, channel, placed_at, updated_at",
    ));
    tables.push(order_lines.finish(
        "oms.order_lines",
        "order_id, line_no, sku, qty, unit_price, reserved_location",
    ));
    tables.push(payments.finish(
        "oms.payments",
        "id, order_id, amount, currency, method, status, psp_reference, authorized_at",
    ));
    tables.push(shipments.finish(
        "wms.shipments",
        "id, order_id, location_code, carrier, tracking_no, shipped_at, delivered_at",
    ));
    tables.push(shipment_lines.finish("wms.shipment_lines", "shipment_id, line_no, sku, qty"));
    tables.push(returns.finish("oms.returns", "id, order_id, sku, qty, reason, created_at"));
    tables.push(movements.finish(
        "wms.stock_movements",
        "sku, location_code, kind, qty, ref_order_id, created_at",
    ));
    tables
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_as_utc() {
        assert_eq!(ts(0), "1970-01-01 00:00:00+00");
        assert_eq!(ts(STOCK_TAKE), "2024-12-31 22:00:00+00");
        assert_eq!(date(EPOCH_2019), "2019-01-01");
        assert_eq!(date(951_782_400), "2000-02-29");
        assert_eq!(date(-DAY), "1969-12-31");
    }

    #[test]
    fn copy_text_escapes_special_characters() {
        let mut c = CopyText::with_capacity(0);
        c.str("a\tb\\c\nd").null().val(3);
        c.end();
        assert_eq!(c.text, "a\\tb\\\\c\\nd\t\\N\t3\n");
    }

    #[test]
    fn generation_is_deterministic_and_seed_dependent() {
        let opts = InitOptions {
            seed: 9,
            products: 40,
            customers: 400,
            locations: 3,
        };
        let a = generate(&opts);
        let b = generate(&opts);
        let c = generate(&InitOptions { seed: 10, ..opts });
        for ((x, y), z) in a.iter().zip(&b).zip(&c) {
            assert_eq!(x.text, y.text, "table {} differs for one seed", x.name);
            assert!(!x.text.is_empty(), "table {} is empty", x.name);
            // The job bookkeeping row is the same for any seed of one size.
            if x.name != "oms.batch_jobs" {
                assert_ne!(x.text, z.text, "table {} ignores the seed", x.name);
            }
        }
    }

    #[test]
    fn generation_honours_requested_sizes() {
        let tables = generate(&InitOptions {
            seed: 1,
            products: 40,
            customers: 60,
            locations: 3,
        });
        let rows = |name: &str| tables.iter().find(|t| t.name == name).map(|t| t.rows);
        assert_eq!(rows("oms.products"), Some(40));
        assert_eq!(rows("oms.customers"), Some(60));
        assert_eq!(rows("wms.locations"), Some(3));
        assert_eq!(rows("wms.stock_levels"), Some(120));
        assert_eq!(rows("oms.orders"), Some(30));
        let lines = tables
            .iter()
            .find(|t| t.name == "oms.order_lines")
            .map(|t| t.text.as_str())
            .unwrap_or("");
        assert_eq!(
            lines.lines().count() as u64,
            rows("oms.order_lines").unwrap_or(0)
        );
    }
}
