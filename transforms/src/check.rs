//! The self-check: every view as the stream computed it, against the same view computed by
//! plain SQL on the legacy database at a known LSN.
//!
//! 1. In one REPEATABLE READ transaction, run the reference queries and read
//!    `pg_current_wal_insert_lsn()` (L): the queries see exactly the commits before L.
//! 2. Wait until the replication slot confirms L: every change before L is in Kafka.
//! 3. Restore the processors' checkpoint (if any) and fold the topics from its offsets until
//!    they are quiet, without side effects.
//! 4. If the fold saw a change after L (its highest `source.lsn` is past L), the source was not
//!    quiescent and the comparison would be unsound: say so instead of reporting diffs.
//!    Otherwise compare view by view and name the differing keys.
//!
//! `since` and `oldest_since` are event times the database cannot reproduce; they are not
//! compared.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::DataType;

use crate::runtime::{self, ProcessError, ProcessorConfig};
use crate::state::{self, SafetyStock, State};
use crate::table::{Cell, Row};
use crate::view::Offsets;

/// Columns the check does not compare (see the module doc).
const UNCHECKED: [&str; 2] = ["since", "oldest_since"];

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("source database: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(
        "slot {slot} did not confirm {lsn} within {wait:?}: is `walbridge run` running and caught up?"
    )]
    NotCaughtUp {
        slot: String,
        lsn: String,
        wait: Duration,
    },
    #[error(
        "the source changed after the reference queries ran (the stream reached LSN {seen:X}, past {at}); run the check while the source is quiet"
    )]
    NotQuiescent { seen: u64, at: String },
}

#[derive(Debug, Clone)]
pub struct ViewReport {
    pub view: String,
    pub rows_stream: usize,
    pub rows_sql: usize,
    /// Keys the SQL has and the stream lacks.
    pub missing: Vec<String>,
    /// Keys the stream has and the SQL lacks.
    pub extra: Vec<String>,
    /// Keys in both whose rows differ, with both rows.
    pub differing: Vec<String>,
}

impl ViewReport {
    pub fn equal(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.differing.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    /// The LSN the reference queries saw.
    pub lsn: String,
    pub views: Vec<ViewReport>,
    /// Changes folded after the checkpoint (0: the checkpoint alone was up to date).
    pub applied_after_checkpoint: u64,
    pub undecodable: u64,
    /// Reading rounds (each ends at a quiet period) and where the last one stopped: the next
    /// offset of every partition read, to tell a short read from a wrong fold.
    pub rounds: u32,
    pub positions: Offsets,
}

impl Report {
    pub fn equal(&self) -> bool {
        self.views.iter().all(ViewReport::equal)
    }

    pub fn render(&self) -> String {
        let mut s = format!(
            "views at LSN {} ({} changes folded after the checkpoint)\n",
            self.lsn, self.applied_after_checkpoint
        );
        if !self.equal() {
            s += &format!("read in {} rounds, stopped at:", self.rounds);
            for ((topic, partition), next) in &self.positions.0 {
                s += &format!(" {topic}[{partition}]={next}");
            }
            s.push('\n');
        }
        for v in &self.views {
            let verdict = if v.equal() { "equal" } else { "DIFFERENT" };
            s += &format!(
                "{:<28} {verdict:<9} stream {} rows, sql {} rows\n",
                v.view, v.rows_stream, v.rows_sql
            );
            for (what, keys) in [
                ("missing", &v.missing),
                ("extra", &v.extra),
                ("differs", &v.differing),
            ] {
                for k in keys.iter().take(20) {
                    s += &format!("  {what} {k}\n");
                }
                if keys.len() > 20 {
                    s += &format!("  … {} more {what}\n", keys.len() - 20);
                }
            }
        }
        s
    }
}

/// Reference SQL of every view, columns in the view's order and cast to what [`read_rows`]
/// expects: decimals as unscaled int8, timestamps as int8 microseconds. $1 = safety stock per
/// SKU (jsonb), $2 = per category (jsonb), $3 = default.
fn reference_sql(view: &str) -> &'static str {
    const AVAIL: &str = "select s.sku::text as sku, s.location_code::text as location_code, s.on_hand::int8 as on_hand, s.reserved::int8 as reserved, \
        coalesce(($1::text::jsonb ->> s.sku::text)::int8, ($2::text::jsonb ->> p.category::text)::int8, $3::int8) as safety_stock \
        from wms.stock_levels s left join oms.products p on p.sku = s.sku";
    const DIFFS: &str = "select coalesce(s.sku, c.sku)::text as sku, coalesce(s.location_code, c.location_code)::text as location_code, \
        case when c.sku is null then 'missing_in_oms' when s.sku is null then 'missing_in_wms' else 'mismatch' end as kind, \
        c.available::int8 as oms, (s.on_hand - s.reserved)::int8 as wms, \
        abs(coalesce(c.available, 0) - coalesce(s.on_hand - s.reserved, 0))::int8 as magnitude \
        from wms.stock_levels s full join oms.inventory_cache c on c.sku = s.sku and c.location_code = s.location_code \
        where c.sku is null or s.sku is null or c.available <> s.on_hand - s.reserved";
    match view {
        state::STOCK_AVAILABILITY => {
            static Q: std::sync::OnceLock<String> = std::sync::OnceLock::new();
            Q.get_or_init(|| format!("select sku, location_code, on_hand, reserved, safety_stock, on_hand - reserved - safety_stock from ({AVAIL}) a"))
        }
        state::STOCK_BY_SKU => {
            static Q: std::sync::OnceLock<String> = std::sync::OnceLock::new();
            Q.get_or_init(|| format!("select sku, count(*)::int8, sum(on_hand)::int8, sum(reserved)::int8, sum(safety_stock)::int8, \
                sum(on_hand - reserved - safety_stock)::int8 from ({AVAIL}) a group by sku"))
        }
        state::RECON_DIFFS => {
            static Q: std::sync::OnceLock<String> = std::sync::OnceLock::new();
            Q.get_or_init(|| format!("select sku, location_code, kind, oms, wms, magnitude, 0::int8 from ({DIFFS}) d \
                where $1::text::jsonb is not null and $2::text::jsonb is not null and $3::int8 is not null"))
        }
        state::RECON_SUMMARY => {
            static Q: std::sync::OnceLock<String> = std::sync::OnceLock::new();
            Q.get_or_init(|| format!("select 'all'::text, count(*)::int8, count(*) filter (where kind = 'missing_in_oms')::int8, \
                count(*) filter (where kind = 'missing_in_wms')::int8, count(*) filter (where kind = 'mismatch')::int8, \
                coalesce(sum(magnitude), 0)::int8, null::int8 from ({DIFFS}) d \
                where $1::text::jsonb is not null and $2::text::jsonb is not null and $3::int8 is not null"))
        }
        _ => {
            "with o as (\
               select o.*, (select count(*) from oms.returns r where r.order_id = o.id) as nret from oms.orders o), \
             a as (\
               select c.id, \
                 count(o.id) filter (where o.status <> 'cancelled') as orders, \
                 coalesce(sum(o.total) filter (where o.status <> 'cancelled'), 0) as ltv, \
                 min(o.placed_at) filter (where o.status <> 'cancelled') as first_at, \
                 max(o.placed_at) filter (where o.status <> 'cancelled') as last_at, \
                 max(o.updated_at) as activity, \
                 coalesce(sum(o.nret), 0) as returns, \
                 count(o.id) filter (where o.status <> 'cancelled' and o.nret > 0) as returned, \
                 count(o.id) filter (where o.status in ('pending', 'paid', 'shipped')) as open \
               from oms.customers c left join o on o.customer_id = c.id group by c.id), \
             k as (select (count(*) * 5 + 99) / 100 as k from a where orders > 0), \
             t as (select ltv as threshold from a where orders > 0 order by ltv desc offset greatest((select k from k) - 1, 0) limit 1) \
             select a.id::int8, a.orders::int8, (a.ltv * 100)::int8, \
               case when a.orders > 0 then (round(a.ltv / a.orders, 2) * 100)::int8 end, \
               (extract(epoch from a.first_at) * 1000000)::int8, (extract(epoch from a.last_at) * 1000000)::int8, \
               (extract(epoch from a.activity) * 1000000)::int8, a.returns::int8, \
               case when a.orders > 0 then a.returned::float8 / a.orders end, a.open::int8, \
               case when a.orders = 0 then 'prospect' \
                    when a.ltv >= (select threshold from t) then 'top_5pct' \
                    when a.orders = 1 then 'new' else 'regular' end \
             from a where $1::text::jsonb is not null and $2::text::jsonb is not null and $3::int8 is not null"
        }
    }
}

fn read_rows(rows: &[tokio_postgres::Row], types: &[DataType]) -> Vec<Row> {
    rows.iter()
        .map(|r| {
            types
                .iter()
                .enumerate()
                .map(|(i, t)| match t {
                    DataType::Utf8 => r
                        .get::<_, Option<String>>(i)
                        .map_or(Cell::Null, |s| Cell::text(&s)),
                    DataType::Float64 => r.get::<_, Option<f64>>(i).map_or(Cell::Null, Cell::Float),
                    DataType::Decimal128(..) => r
                        .get::<_, Option<i64>>(i)
                        .map_or(Cell::Null, |v| Cell::Dec(i128::from(v))),
                    DataType::Timestamp(..) => {
                        r.get::<_, Option<i64>>(i).map_or(Cell::Null, Cell::Ts)
                    }
                    _ => r.get::<_, Option<i64>>(i).map_or(Cell::Null, Cell::Int),
                })
                .collect()
        })
        .collect()
}

fn json_map(m: &std::collections::HashMap<String, i64>) -> serde_json::Value {
    serde_json::Value::Object(
        m.iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(*v)))
            .collect(),
    )
}

/// Runs the check (see the module doc). `source` connects to the legacy database (no TLS);
/// `slot` is the pipeline's replication slot.
pub async fn check(
    config: &ProcessorConfig,
    source: &tokio_postgres::Config,
    slot: &str,
    wait: Duration,
) -> Result<Report, CheckError> {
    let (mut client, conn) = source.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let defs = state::view_defs();
    let safety: &SafetyStock = &config.safety_stock;
    let (skus, cats) = (
        json_map(&safety.skus).to_string(),
        json_map(&safety.categories).to_string(),
    );
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let lsn: String = tx
        .query_one("select pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    let mut expected = BTreeMap::new();
    for d in &defs {
        let rows = tx
            .query(reference_sql(&d.name), &[&skus, &cats, &safety.default])
            .await?;
        let types: Vec<DataType> = d
            .schema
            .fields()
            .iter()
            .map(|f| f.data_type().clone())
            .collect();
        expected.insert(d.name.clone(), read_rows(&rows, &types));
    }
    tx.commit().await?;
    let lsn_num = parse_lsn(&lsn);
    let deadline = Instant::now() + wait;
    loop {
        let confirmed: Option<String> = client
            .query_opt(
                "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
                &[&slot],
            )
            .await?
            .and_then(|r| r.get(0));
        if confirmed
            .as_deref()
            .map(parse_lsn)
            .is_some_and(|c| c >= lsn_num)
        {
            break;
        }
        if Instant::now() > deadline {
            return Err(CheckError::NotCaughtUp {
                slot: slot.to_owned(),
                lsn,
                wait,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cfg = config.clone();
    let mut state = tokio::task::spawn_blocking(move || runtime::load_merged(&cfg))
        .await
        .map_err(|_| ProcessError::Panicked)??;
    let mut undecodable = 0;
    // The topics' end is a quiet second (tansu's watermarks are unreliable); a fetch that
    // stalls longer under load ends a round early, so a differing result is read on from where
    // it stopped, as long as rounds still find changes. (Longer quiet periods, tried in session
    // 6, made the views tests fail more often, for a reason not yet understood.)
    let mut views;
    let mut round: u32 = 0;
    loop {
        let cfg = config.clone();
        let before = state.applied;
        let quiet = Duration::from_secs(1);
        let (s, u) = tokio::task::spawn_blocking(move || {
            let (mut s, u) = runtime::catch_up(&cfg, state, quiet)?;
            s.finish_epoch()?;
            Ok::<_, ProcessError>((s, u))
        })
        .await
        .map_err(|_| ProcessError::Panicked)??;
        state = s;
        undecodable += u;
        if state.max_lsn > lsn_num {
            return Err(CheckError::NotQuiescent {
                seen: state.max_lsn,
                at: lsn,
            });
        }
        views = compare(&state, &expected);
        round += 1;
        if views.iter().all(ViewReport::equal) || state.applied == before || round >= 5 {
            break;
        }
        tracing::info!(round, "views differ after a quiet second; reading on");
    }
    Ok(Report {
        lsn,
        views,
        applied_after_checkpoint: state.applied,
        undecodable,
        rounds: round,
        positions: state.offsets.clone(),
    })
}

fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap_or(("0", "0"));
    (u64::from_str_radix(hi, 16).unwrap_or(0) << 32) | u64::from_str_radix(lo, 16).unwrap_or(0)
}

fn compare(state: &State, expected: &BTreeMap<String, Vec<Row>>) -> Vec<ViewReport> {
    let defs = state::view_defs();
    let mut views = Vec::new();
    for d in &defs {
        let unchecked: Vec<usize> = d
            .schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| UNCHECKED.contains(&f.name().as_str()))
            .map(|(i, _)| i)
            .collect();
        let key = |r: &[Cell]| -> Row { d.key.iter().map(|&i| r[i].clone()).collect() };
        let show = |k: &Row| {
            k.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let stream: BTreeMap<Row, Row> = state
            .view(&d.name)
            .map(|v| v.rows().map(|r| (key(r), r.to_vec())).collect())
            .unwrap_or_default();
        let sql: BTreeMap<Row, Row> = expected[&d.name]
            .iter()
            .map(|r| (key(r), r.clone()))
            .collect();
        let mut rep = ViewReport {
            view: d.name.clone(),
            rows_stream: stream.len(),
            rows_sql: sql.len(),
            missing: Vec::new(),
            extra: Vec::new(),
            differing: Vec::new(),
        };
        for (k, want) in &sql {
            match stream.get(k) {
                None => rep.missing.push(show(k)),
                Some(got) => {
                    let same = got
                        .iter()
                        .zip(want)
                        .enumerate()
                        .all(|(i, (g, w))| unchecked.contains(&i) || g.close_to(w));
                    if !same {
                        rep.differing.push(format!(
                            "{} stream=[{}] sql=[{}]",
                            show(k),
                            show(got),
                            show(want)
                        ));
                    }
                }
            }
        }
        rep.extra = stream
            .keys()
            .filter(|k| !sql.contains_key(*k))
            .map(show)
            .collect();
        views.push(rep);
    }
    views
}
