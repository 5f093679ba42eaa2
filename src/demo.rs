//! `walbridge demo`: the whole path on one machine, as a person would watch it.
//!
//! A throwaway legacy database (ports and paths as in the repo's `pipelines.yaml`), the tansu
//! broker, the embedded registry, the pipeline, the stream processors with their SQL endpoint
//! and view sinks, and the workload generator. While the workload runs, a line per second shows
//! the live views as an analyst reads them: through the SQL endpoint (the Postgres protocol),
//! not the in-memory catalog, so the demo exercises the analysts' path. At the end: the views'
//! self-check against SQL on the legacy database, a few queries, where the sinks wrote, per-topic
//! counts and one decoded event.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use avro::RegistryClient;

use tokio_postgres::SimpleQueryMessage;
use transforms::view::Catalog;

use crate::config::{Config, ViewSinkConfig};
use crate::process::Process;
use crate::stack::{Broker, Postgres};
use crate::tail;

pub async fn run(seconds: Duration, rate: f64) -> anyhow::Result<()> {
    let cfg = crate::config::load(Path::new("pipelines.yaml"))
        .map_err(|e| anyhow::anyhow!("invalid pipelines.yaml:\n{e}"))?;
    let base = Path::new(".walbridge/demo");
    if base.exists() {
        std::fs::remove_dir_all(base).context("clearing .walbridge/demo")?;
    }
    std::fs::create_dir_all(base)?;
    let pg_cfg = cfg.source.pg_config();
    let pg_port = pg_cfg.get_ports().first().copied().unwrap_or(5432);
    let db = pg_cfg.get_dbname().unwrap_or("legacy").to_owned();
    println!("▶ starting a throwaway legacy Postgres on port {pg_port} (wal_level=logical)");
    let pg = Postgres::start_on(base, pg_port)?;
    pg.create_database(&db).await?;
    // The postgres view sinks that point at this server get their database (a separate one, so
    // the legacy database stays untouched).
    for s in cfg.processors.iter().flat_map(|p| &p.sinks) {
        if let ViewSinkConfig::Postgres { dsn, .. } = s {
            let sink: tokio_postgres::Config = dsn.expose().parse()?;
            if sink.get_ports().first() == Some(&pg_port)
                && let Some(name) = sink.get_dbname()
                && name != db
            {
                pg.create_database(name).await?;
            }
        }
    }
    let (client, conn) = tokio_postgres::connect(&pg.dsn(&db), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    println!(
        "▶ loading the legacy OMS/WMS fixtures (seeded; {} products at {} locations, {} customers)",
        DEMO_SHOP.products, DEMO_SHOP.locations, DEMO_SHOP.customers
    );
    let report = legacy_fixtures::init(&client, &DEMO_SHOP).await?;
    println!("  {} rows in {:.1?}", report.total_rows(), report.elapsed);
    if let Some(ev) = &cfg.events {
        // The one change the legacy team makes for business events: old values logged for the
        // tables whose mappings read them (what `walbridge doctor` would tell them).
        for need in crate::events::needs_full(&client, ev).await? {
            println!("  {} (business events read its old values)", need.fix());
            client.batch_execute(&need.fix()).await?;
        }
    }

    let broker_port: u16 = cfg.kafka.brokers[0]
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("kafka.brokers[0] has no port")?;
    println!("▶ starting the tansu broker on port {broker_port}");
    let _broker = Broker::start_on(broker_port)?;
    if let Some(e) = &cfg.registry.embedded {
        let _ = std::fs::remove_dir_all(&e.data_dir);
    }

    println!(
        "▶ starting walbridge (registry embedded at {}): it snapshots the existing rows (op r), then streams",
        cfg.registry.url
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (obs_tx, obs_rx) = tokio::sync::oneshot::channel();
    let pipeline = tokio::spawn(crate::pipeline::run_observed(
        cfg.clone(),
        async move {
            let _ = stop_rx.await;
        },
        crate::pipeline::Observe {
            confirmed: Some(obs_tx),
            discard: false,
        },
    ));
    let mut confirmed = obs_rx.await.context("the pipeline did not start")?;

    println!("▶ starting the stream processors, their SQL endpoint and view sinks");
    let process = crate::process::start(&cfg).await?;
    let sql = sql_config(&cfg, &process)?;
    println!(
        "  query the live views alongside: PGPASSWORD={} psql \"host={} port={} user={} dbname=walbridge\"",
        sql.get_password()
            .map(String::from_utf8_lossy)
            .unwrap_or_default(),
        process
            .sql_addr
            .map(|a| a.ip().to_string())
            .unwrap_or_default(),
        sql.get_ports().first().copied().unwrap_or_default(),
        sql.get_user().unwrap_or_default(),
    );

    // The live lines should start from views that hold the whole shop: wait until the snapshot
    // is in Kafka and the processors folded it.
    println!("▶ waiting for the snapshot to reach Kafka and the processors to fold it");
    let t = Instant::now();
    let marker = snapshot_marker(&client, &cfg.source.slot, SNAPSHOT_LIMIT).await?;
    while *confirmed.borrow() < marker && t.elapsed() < SNAPSHOT_LIMIT {
        let _ = tokio::time::timeout(Duration::from_secs(1), confirmed.changed()).await;
    }
    anyhow::ensure!(
        *confirmed.borrow() >= marker,
        "the initial snapshot did not reach Kafka within {SNAPSHOT_LIMIT:?}"
    );
    let settled = settle(&process.catalog, SETTLE_QUIET, SETTLE_LIMIT).await;
    println!(
        "  snapshot delivered and {} in {:.0?}",
        if settled {
            "folded"
        } else {
            "still being folded"
        },
        t.elapsed()
    );
    let baseline = async {
        let c = sql_client(&sql).await?;
        live_line(&c, Instant::now(), None).await
    };
    let base_atp = match baseline.await {
        Ok((line, atp)) => {
            println!("{line}");
            atp
        }
        Err(e) => {
            println!("  reading the SQL endpoint failed: {e:#}");
            None
        }
    };

    println!(
        "▶ running the workload: {rate} tx/s for {seconds:?}, spike profile (a sale's first hour: \
         the first fifth at 5x the rate); oms.refresh_inventory_cache, a lagging batch job, \
         copies the warehouse's stock into the storefront's cache now and then"
    );
    let started = Instant::now();
    let (live_stop, live_stopped) = tokio::sync::oneshot::channel::<()>();
    let live = tokio::spawn(live_lines(sql.clone(), started, base_atp, live_stopped));
    let sim = legacy_fixtures::simulate(
        &client,
        &legacy_fixtures::SimulateOptions {
            seed: 7,
            rate,
            duration: seconds,
            profile: legacy_fixtures::Profile::Spike,
            max_transactions: None,
        },
    )
    .await?;
    println!(
        "  {} transactions at {:.0} tx/s",
        sim.transactions, sim.achieved_rate
    );
    let end: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    let end: cdc::Lsn = end.parse()?;
    let t = Instant::now();
    while *confirmed.borrow() < end && t.elapsed() < Duration::from_secs(60) {
        let _ = tokio::time::timeout(Duration::from_secs(1), confirmed.changed()).await;
    }
    println!(
        "▶ all changes acked by Kafka and confirmed to Postgres (flush LSN {})",
        *confirmed.borrow()
    );
    // The live lines go on while the processors fold what is left.
    let settled = settle(&process.catalog, SETTLE_QUIET, SETTLE_LIMIT).await;
    let _ = live_stop.send(());
    let _ = live.await;
    if settled {
        println!("▶ the processors caught up (no view changed for {SETTLE_QUIET:?})");
    } else {
        println!(
            "▶ the views still changed after {SETTLE_LIMIT:?}; going on (the check below reads the topics itself)"
        );
    }

    let pc = cfg
        .processor_config()
        .context("pipelines.yaml has no processors section")?;
    println!(
        "\n▶ views check (`walbridge views check`): every view from the checkpoint and the topics, against the same SQL on the legacy database at one LSN"
    );
    let verdict = match transforms::check::check(
        &pc,
        &cfg.source.pg_config(),
        &cfg.source.slot,
        Duration::from_secs(60),
    )
    .await
    {
        Ok(report) => {
            print!("{}", report.render());
            if report.equal() {
                println!("  verdict: equal");
                Ok(())
            } else {
                println!("  verdict: DIFFERENT (keys above)");
                Err(anyhow::anyhow!(
                    "the stream's views differ from SQL on the legacy database (see above)"
                ))
            }
        }
        Err(e) => {
            println!("  the check could not run: {e}");
            Err(anyhow::anyhow!(e).context("views check"))
        }
    };

    let shown = show_views(&sql).await;
    if let Err(e) = &shown {
        println!("  reading the SQL endpoint failed: {e:#}");
    }
    print_sinks(&cfg).await?;

    // Read back while the pipeline (and its embedded registry) still runs.
    let tail = print_tail(&cfg, Some("oms.orders"), 1).await;
    // The processors read the pipeline's topics: they stop first.
    process.stop().await.context("stopping the processors")?;
    let _ = stop_tx.send(());
    pipeline.await??;
    tail?;
    shown?;
    verdict?;
    println!("\n▶ done. The stack stops now; `walbridge demo` starts a fresh one each time.");
    drop(client);
    drop(pg);
    Ok(())
}

/// The demo's shop: a fifth of the fixtures' default catalogue and customers, so the snapshot
/// and its fold take seconds (also in a debug build), and a spike's orders move the
/// availability of a catalogue this size visibly.
pub(crate) const DEMO_SHOP: legacy_fixtures::InitOptions = legacy_fixtures::InitOptions {
    seed: 42,
    products: 2_000,
    customers: 10_000,
    locations: 20,
};

/// How long the initial snapshot may take to reach Kafka.
const SNAPSHOT_LIMIT: Duration = Duration::from_secs(600);

/// Writes a heartbeat message once the pipeline's slot exists and returns its LSN: the pipeline
/// streams (and so confirms past its consistent point) only after the snapshot is delivered.
async fn snapshot_marker(
    client: &tokio_postgres::Client,
    slot: &str,
    limit: Duration,
) -> anyhow::Result<cdc::Lsn> {
    let t = Instant::now();
    while client
        .query_opt(
            "select 1 from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await?
        .is_none()
    {
        anyhow::ensure!(
            t.elapsed() < limit,
            "the pipeline did not create slot {slot} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lsn: String = client
        .query_one(
            "select pg_logical_emit_message(false, $1, '')::text",
            &[&crate::pipeline::HEARTBEAT_PREFIX],
        )
        .await?
        .get(0);
    Ok(lsn.parse()?)
}

/// No view changed for this long after the source went quiet: the processors caught up.
const SETTLE_QUIET: Duration = Duration::from_secs(3);
/// How long the demo waits for that.
const SETTLE_LIMIT: Duration = Duration::from_secs(90);

/// The SQL endpoint's client config (address from the running process, user and password from
/// `processors.sql`).
fn sql_config(cfg: &Config, process: &Process) -> anyhow::Result<tokio_postgres::Config> {
    let q = cfg
        .processors
        .as_ref()
        .and_then(|p| p.sql.as_ref())
        .context("pipelines.yaml has no processors.sql; the demo reads the views through it")?;
    let addr = process.sql_addr.context("the SQL endpoint did not start")?;
    let mut c = tokio_postgres::Config::new();
    c.host(addr.ip().to_string())
        .port(addr.port())
        .user(&q.credentials.user)
        .password(&q.credentials.password)
        .dbname("walbridge")
        .connect_timeout(Duration::from_secs(5));
    Ok(c)
}

async fn sql_client(sql: &tokio_postgres::Config) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = sql
        .connect(tokio_postgres::NoTls)
        .await
        .context("connecting to the SQL endpoint")?;
    tokio::spawn(conn);
    Ok(client)
}

/// Rows of a query as text (the simple protocol, as psql sends it), with the column names.
async fn query_text(
    client: &tokio_postgres::Client,
    sql: &str,
) -> anyhow::Result<(Vec<String>, Vec<Vec<String>>)> {
    let mut names = Vec::new();
    let mut rows = Vec::new();
    for m in client
        .simple_query(sql)
        .await
        .with_context(|| format!("running {sql}"))?
    {
        match m {
            SimpleQueryMessage::RowDescription(cols) => {
                names = cols.iter().map(|c| c.name().to_owned()).collect();
            }
            SimpleQueryMessage::Row(r) => {
                if names.is_empty() {
                    names = r.columns().iter().map(|c| c.name().to_owned()).collect();
                }
                rows.push(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("").to_owned())
                        .collect(),
                );
            }
            _ => {}
        }
    }
    Ok((names, rows))
}

/// The first row's cells of a query (empty when it has no rows).
async fn first_row(client: &tokio_postgres::Client, sql: &str) -> anyhow::Result<Vec<String>> {
    Ok(query_text(client, sql)
        .await?
        .1
        .into_iter()
        .next()
        .unwrap_or_default())
}

/// One line of the live views, as read through the SQL endpoint. `base_atp`: the
/// available-to-promise before the workload, to show how far it moved.
async fn live_line(
    client: &tokio_postgres::Client,
    started: Instant,
    base_atp: Option<i64>,
) -> anyhow::Result<(String, Option<i64>)> {
    let stock = first_row(
        client,
        "select sum(available), sum(reserved) from stock_availability_by_sku",
    )
    .await?;
    let below = first_row(
        client,
        "select count(*) from stock_availability where available < 0",
    )
    .await?;
    let recon = first_row(
        client,
        "select diffs, units_at_risk, cast(date_part('epoch', oldest_since) as bigint) \
         from reconciliation_summary",
    )
    .await?;
    let cust = first_row(
        client,
        "select sum(case when orders > 0 then 1 else 0 end), sum(orders), \
         sum(case when segment = 'top_5pct' then 1 else 0 end) from customer_360",
    )
    .await?;
    let num = |r: &[String], i: usize| r.get(i).and_then(|c| c.parse::<i64>().ok());
    let show = |v: Option<i64>| v.map_or_else(|| "-".into(), grouped);
    let atp = num(&stock, 0);
    let moved = match (atp, base_atp) {
        (Some(a), Some(b)) => format!(" ({}{})", if a >= b { "+" } else { "" }, grouped(a - b)),
        _ => String::new(),
    };
    // `since` is the source's commit time: its age on this machine's clock.
    let oldest = num(&recon, 2)
        .and_then(|since| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?
                .as_secs();
            Some(format!("{}s", (now as i64 - since).max(0)))
        })
        .unwrap_or_else(|| "-".into());
    let line = format!(
        "  t+{:>3}s │ ATP {}{moved}, reserved {}, {} sku@location below 0 │ diffs {} ({} units, oldest {oldest}) │ {} customers with {} orders, top_5pct {}",
        started.elapsed().as_secs(),
        show(atp),
        show(num(&stock, 1)),
        show(num(&below, 0)),
        show(num(&recon, 0).or(Some(0))),
        show(num(&recon, 1).or(Some(0))),
        show(num(&cust, 0)),
        show(num(&cust, 1)),
        show(num(&cust, 2)),
    );
    Ok((line, atp))
}

/// 1234567 → "1,234,567".
fn grouped(v: i64) -> String {
    let digits = v.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0 { format!("-{out}") } else { out }
}

/// Prints a live line about once per second until `stop` fires.
async fn live_lines(
    sql: tokio_postgres::Config,
    started: Instant,
    base_atp: Option<i64>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut client = None;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        if client.is_none() {
            match sql_client(&sql).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    println!("  t+{:>3}s │ {e:#}", started.elapsed().as_secs());
                    continue;
                }
            }
        }
        let Some(c) = &client else { continue };
        match live_line(c, started, base_atp).await {
            Ok((line, _)) => println!("{line}"),
            Err(e) => {
                println!("  t+{:>3}s │ {e:#}", started.elapsed().as_secs());
                // Reconnect on the next tick.
                client = None;
            }
        }
    }
}

/// Waits until no view has published a new epoch for `quiet` (true), or `limit` passed (false).
async fn settle(catalog: &Catalog, quiet: Duration, limit: Duration) -> bool {
    let latest = || {
        catalog
            .views()
            .iter()
            .filter_map(|v| catalog.snapshot(&v.name).map(|s| s.epoch))
            .max()
    };
    let start = Instant::now();
    let mut seen = latest();
    let mut since = Instant::now();
    while start.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = latest();
        if now != seen {
            seen = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return true;
        }
    }
    false
}

/// A few queries an analyst would run, through the SQL endpoint.
async fn show_views(sql: &tokio_postgres::Config) -> anyhow::Result<()> {
    let client = sql_client(sql).await?;
    for q in [
        "select * from stock_availability where available < 0 order by available limit 5",
        "select * from reconciliation_summary",
        "select customer_id, orders, lifetime_value, avg_order_value, returns_count, segment \
         from customer_360 order by lifetime_value desc limit 5",
    ] {
        println!("\nwalbridge=> {q};");
        let (names, rows) = query_text(&client, q).await?;
        print_table(&names, &rows);
    }
    Ok(())
}

fn print_table(names: &[String], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = names.iter().map(|n| n.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = width.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!(" {c:<w$} "))
            .collect::<Vec<_>>()
            .join("|")
    };
    println!("{}", line(names));
    println!(
        "{}",
        width
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("+")
    );
    for r in rows {
        println!("{}", line(r));
    }
    println!("({} rows)", rows.len());
}

/// Where each view sink wrote, with a count a person can check.
async fn print_sinks(cfg: &Config) -> anyhow::Result<()> {
    let Some(p) = &cfg.processors else {
        return Ok(());
    };
    println!("\n▶ where the view sinks wrote");
    for s in &p.sinks {
        match s {
            ViewSinkConfig::Kafka { name, topic_prefix } => {
                let prefix = format!(
                    "{}.view.",
                    topic_prefix.as_deref().unwrap_or(&cfg.kafka.topic_prefix)
                );
                let topics = tail::topics_with_prefix(&cfg.kafka.client(), &prefix)?;
                println!("  {name} (kafka): compacted topics {}", topics.join(", "));
            }
            ViewSinkConfig::Postgres { name, dsn, schema } => {
                let pg: tokio_postgres::Config = dsn.expose().parse()?;
                let (client, conn) = pg.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                let tables: Vec<String> = client
                    .query(
                        "select table_name::text from information_schema.tables \
                         where table_schema = $1 order by 1",
                        &[schema],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let mut counts = Vec::new();
                for t in &tables {
                    let n: i64 = client
                        .query_one(&format!("select count(*) from \"{schema}\".\"{t}\""), &[])
                        .await?
                        .get(0);
                    counts.push(format!("{t} {n}"));
                }
                println!(
                    "  {name} (postgres): database {}, schema {schema}, rows: {}",
                    pg.get_dbname().unwrap_or("?"),
                    counts.join(", ")
                );
            }
            ViewSinkConfig::Parquet { name, dir } => {
                println!(
                    "  {name} (parquet): {} files under {}",
                    count_files(dir, "parquet"),
                    dir.display()
                );
            }
        }
    }
    Ok(())
}

fn count_files(dir: &Path, ext: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                count_files(&p, ext)
            } else {
                usize::from(p.extension().is_some_and(|x| x == ext))
            }
        })
        .sum()
}

/// Per-topic counts, then the last `limit` events of `table` (or of all topics) as JSON.
pub async fn print_tail(cfg: &Config, table: Option<&str>, limit: usize) -> anyhow::Result<()> {
    let registry = RegistryClient::new(cfg.registry.url.as_str())?;
    let kafka = cfg.kafka.client();
    let topics = tail::topics_with_prefix(&kafka, &format!("{}.", cfg.kafka.topic_prefix))?;
    let events = tail::read_all(&kafka, &registry, &topics, Duration::from_secs(120)).await?;
    // Per topic: snapshot rows (op r), streamed changes, tombstones.
    let mut counts: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
    for e in &events {
        let c = counts.entry(e.topic.as_str()).or_default();
        match (&e.value, e.op()) {
            (None, _) => c.2 += 1,
            (Some(_), Some("r")) => c.0 += 1,
            // Changes, events, and the views' own records (no envelope).
            (Some(_), _) => c.1 += 1,
        }
    }
    println!(
        "\n{:<36} {:>10} {:>10} {:>11}",
        "topic", "snapshot", "changes", "tombstones"
    );
    for (topic, (r, n, t)) in &counts {
        println!("{topic:<36} {r:>10} {n:>10} {t:>11}");
    }
    let wanted = table.map(|t| format!("{}.{t}", cfg.kafka.topic_prefix));
    let chosen: Vec<&tail::Event> = events
        .iter()
        .filter(|e| {
            e.value.is_some()
                && e.op() != Some("r")
                && wanted.as_deref().is_none_or(|w| e.topic == w)
        })
        .collect();
    for e in chosen.iter().rev().take(limit).rev() {
        println!(
            "\n{} partition {} offset {} event_id {}",
            e.topic,
            e.partition,
            e.offset,
            e.event_id().unwrap_or("?")
        );
        println!(
            "key:   {}",
            e.key
                .as_ref()
                .map(|k| k.to_string())
                .unwrap_or_else(|| "null".into())
        );
        println!(
            "value: {}",
            serde_json::to_string_pretty(&e.value).unwrap_or_default()
        );
    }
    Ok(())
}
