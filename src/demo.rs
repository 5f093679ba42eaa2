//! `walbridge demo`: the whole path on one machine, as a person would watch it.
//!
//! A throwaway legacy database (ports and paths as in the repo's `pipelines.yaml`), the tansu
//! broker, the embedded registry, the pipeline, and the workload generator; then per-topic
//! counts and one decoded event.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use avro::RegistryClient;

use crate::config::Config;
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
    let (client, conn) = tokio_postgres::connect(&pg.dsn(&db), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    println!("▶ loading the legacy OMS/WMS fixtures (seeded)");
    let report = legacy_fixtures::init(&client, &legacy_fixtures::InitOptions::default()).await?;
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

    println!(
        "▶ running the workload: {rate} tx/s for {seconds:?}, spike profile (a sale's first hour)"
    );
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
    // Read back while the pipeline (and its embedded registry) still runs.
    let shown = print_tail(&cfg, Some("oms.orders"), 1).await;
    let _ = stop_tx.send(());
    pipeline.await??;
    shown?;
    println!("\n▶ done. The stack stops now; `walbridge demo` starts a fresh one each time.");
    drop(client);
    drop(pg);
    Ok(())
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
        match e.op() {
            Some("r") => c.0 += 1,
            Some(_) => c.1 += 1,
            None => c.2 += 1,
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
