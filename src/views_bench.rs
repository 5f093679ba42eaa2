//! `walbridge views bench --latency-seconds N`: how long a change in the legacy database takes
//! to show in a SQL query on the live views, under the demo's load.
//!
//! The stack is the demo's, throwaway: a Postgres with the demo's shop (`demo::DEMO_SHOP`:
//! 2,000 products at 20 locations, 10,000 customers), tansu, the pipeline
//! (with the config's business-event mappings) and `walbridge process` (the config's processors
//! and view sinks, an epoch every 50 ms at most, the SQL endpoint on a free port). While the
//! fixture workload runs at `--rate` with the spike profile (`walbridge demo`'s load: the first
//! 20 % of the run at 5x the rate), probes run one after the other:
//!
//! ```text
//! probe i: UPDATE wms.stock_levels SET on_hand = i  (sku WB-PROBE, no product: the workload never picks it)
//!   t0 = the UPDATE returns (simple query protocol: the server commits before it answers)
//!   ├─ Kafka ack:      walbridge's confirmed LSN passes the probe's commit LSN
//!   ├─ Kafka visible:  a consumer of legacy.wms.stock_levels receives the probe's record
//!   ├─ WAL alone:      with --wal-floor, pg_recvlogical (test_decoding, a slot of its own)
//!   │                  receives the probe's UPDATE (the floor for the change-capture part;
//!   │                  a second decoder of the same WAL, so the other figures get slower)
//!   ├─ broker alone:   a plain producer's record sent at t0 reaches a plain consumer (the
//!   │                  floor: no part of walbridge is in it, the load is the same)
//!   └─ SQL visible:    `select on_hand from stock_availability where sku = 'WB-PROBE' …`
//!                      on the SQL endpoint returns i (polled every --poll-ms)
//! then a pause of --probe-gap-ms, and the next probe.
//! ```
//!
//! "Produced" is the commit in the legacy database, as the client sees it: stricter than the
//! moment the change is produced to Kafka, since it includes the WAL decoding, walbridge's
//! encoding and the broker's ack. The Kafka ack is walbridge's own commit → ack latency (what
//! `walbridge bench` measures with pg_recvlogical as the limit), the physical reference for the
//! part before the processor; the printed ratio says what the processor path adds to it. The
//! commit LSN comes from the record's `walbridge.lsn` header, so the ack time of a probe whose
//! record the consumer missed is unknown (counted, not guessed).
//!
//! The bench judges the target on both starts: the issue's "event produced" (the probe
//! record's CreateTime, when walbridge handed it to its producer, to the SQL answer, per probe)
//! and the stricter commit. The first is what walbridge's processors, sinks and SQL endpoint
//! add once an event exists; the second adds the WAL's own decoding, whose floor at this load
//! `--floors-only` measures.
//!
//! Resolution: SQL visibility is sampled every `--poll-ms` (and one query's own time), so a
//! figure is late by up to that much; the consumer uses the processors' `fetch.wait.max.ms`
//! (`processors.fetch_wait_ms`), which tansu holds in full on every fetch, so its figure, like
//! the processors', includes up to that much. Probes are sequential, a few per second: the
//! p99 of a 60 s run rests on a few hundred probes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use cdc::Lsn;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::{Config, Dsn, ViewSinkConfig};
use crate::stack::{Broker, Postgres};

/// The probe row's SKU: not in oms.products, so the workload never picks it.
const PROBE_SKU: &str = "WB-PROBE";
/// How long one probe may take before it counts as lost.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the processors may take to read the initial snapshot from the topics.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(600);

/// What to run.
pub struct LatencyOptions {
    /// The pipeline config whose events and processors sections are used (`pipelines.yaml`);
    /// addresses, ports and directories are replaced by the throwaway stack's.
    pub config: PathBuf,
    pub duration: Duration,
    /// The workload's transactions per second (spike profile).
    pub rate: f64,
    pub poll: Duration,
    pub probe_gap: Duration,
    /// Time the WAL alone too (see [`WalProbe`]); it adds a second decoder of the same WAL.
    pub wal_floor: bool,
    /// Run no part of walbridge: time only the WAL alone and the broker alone, so the WAL
    /// floor is measured with its decoder the only one.
    pub floors_only: bool,
}

/// One probe's times from the commit.
#[derive(Default, Clone, Copy)]
struct Probe {
    /// Seconds into the workload when it started.
    at: f64,
    ack: Option<Duration>,
    /// When walbridge handed the record to its producer: the record's CreateTime (whole ms,
    /// wall clock), so this splits commit → Kafka into walbridge's part and the broker's.
    produced: Option<Duration>,
    kafka: Option<Duration>,
    sql: Option<Duration>,
    /// The WAL alone: when pg_recvlogical, on a slot of its own, received the probe's change.
    wal: Option<Duration>,
    /// The broker alone under the same load: a record sent by a plain producer at t0 (linger
    /// 0), received by a plain consumer (see [`BrokerProbe`]).
    broker: Option<Duration>,
}

pub async fn run(opts: LatencyOptions) -> anyhow::Result<()> {
    let base = crate::config::load(&opts.config)
        .map_err(|e| anyhow::anyhow!("invalid config {}:\n{e}", opts.config.display()))?;
    anyhow::ensure!(
        base.processors.is_some(),
        "{} has no processors section; the latency bench needs one (see pipelines.yaml)",
        opts.config.display()
    );
    let dir = std::env::temp_dir().join(format!("walbridge-views-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = run_in(&opts, base, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(opts: &LatencyOptions, base: Config, dir: &Path) -> anyhow::Result<()> {
    println!("load average before: {}", loadavg());
    let pg = Postgres::start(dir)?;
    pg.create_database("legacy").await?;
    pg.create_database("analytics").await?;
    let client = pg.connect("legacy").await?;
    let report = legacy_fixtures::init(&client, &crate::demo::DEMO_SHOP).await?;
    println!(
        "legacy fixtures: {} rows in {:.1?}",
        report.total_rows(),
        report.elapsed
    );
    if let Some(ev) = &base.events {
        for need in crate::events::needs_full(&client, ev).await? {
            client.batch_execute(&need.fix()).await?;
        }
    }
    let location: String = client
        .query_one(
            "SELECT code::text FROM wms.locations ORDER BY code LIMIT 1",
            &[],
        )
        .await?
        .get(0);
    client
        .execute(
            "INSERT INTO wms.stock_levels (sku, location_code, on_hand, reserved) VALUES ($1, $2, 0, 0)",
            &[&PROBE_SKU, &location],
        )
        .await?;
    // Production's default: the commit's WAL is flushed (and the walsender woken) before the
    // client hears of it (the throwaway cluster runs with it off).
    client.batch_execute("SET synchronous_commit = on").await?;

    let broker = Broker::start()?;
    // The bench's consumers wait as the processors' do, so the broker hop they time is the
    // processors' (tansu holds every fetch for the whole wait).
    let fetch_wait = base
        .processors
        .as_ref()
        .map_or(Duration::from_millis(10), |p| p.fetch_wait);
    if opts.floors_only {
        return floors_only(opts, &pg, &client, &broker, fetch_wait).await;
    }
    let cfg = stack_config(base, &pg, &broker, dir)?;
    let pc = cfg
        .processor_config()
        .context("processors section vanished")?;
    let topic = cfg.kafka.topic_for("wms", "stock_levels");

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
    let confirmed = obs_rx.await.context("the pipeline did not start")?;
    let acks = AckHistory::record(confirmed.clone());
    // The snapshot is done once a change committed after the slot's creation is confirmed.
    let t = Instant::now();
    while client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.source.slot],
        )
        .await?
        .is_none()
    {
        anyhow::ensure!(
            t.elapsed() < CATCH_UP_TIMEOUT,
            "the pipeline did not create its slot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = current_lsn(&client).await?;
    client
        .execute(
            "UPDATE wms.stock_levels SET updated_at = now() WHERE sku = $1",
            &[&PROBE_SKU],
        )
        .await?;
    wait_confirmed(confirmed.clone(), Lsn(before.0 + 1), CATCH_UP_TIMEOUT)
        .await
        .context("the pipeline did not finish the initial snapshot")?;
    println!("pipeline: snapshot in Kafka after {:.1?}", t.elapsed());

    let consumer = ProbeConsumer::start(&pc.brokers, &topic, fetch_wait)?;
    let broker_probe = BrokerProbe::start(&pc.brokers, fetch_wait).await?;
    let wal_probe = match opts.wal_floor {
        true => Some(WalProbe::start(&pg, &client).await?),
        false => None,
    };
    let process = crate::process::start(&cfg).await?;
    let sql_addr = process.sql_addr.context("the SQL endpoint did not start")?;
    let sql = cfg
        .processors
        .as_ref()
        .and_then(|p| p.sql.as_ref())
        .context("processors.sql is not set")?;
    let (sql_client, conn) = tokio_postgres::connect(
        &format!(
            "host={} port={} user={} password='{}' dbname=walbridge",
            sql_addr.ip(),
            sql_addr.port(),
            sql.credentials.user,
            sql.credentials.password.replace('\'', "\\'")
        ),
        tokio_postgres::NoTls,
    )
    .await
    .context("connecting to the SQL endpoint")?;
    tokio::spawn(conn);
    let query = format!(
        "select on_hand from stock_availability where sku = '{PROBE_SKU}' and location_code = '{location}'"
    );

    // First probe: the processors read everything the snapshot put into the topics first.
    let t = Instant::now();
    let mut prober = Prober {
        client: &client,
        sql: &sql_client,
        query: &query,
        poll: opts.poll,
        consumer,
        broker: broker_probe,
        wal: wal_probe,
        acks: &acks,
        marker: 0,
        query_times: Vec::new(),
        // Past the snapshot, so the probe row's snapshot record is not taken for a probe.
        before: current_lsn(&client).await?,
    };
    let first = prober.probe(CATCH_UP_TIMEOUT).await?;
    anyhow::ensure!(
        first.sql.is_some(),
        "the first probe did not show in stock_availability within {CATCH_UP_TIMEOUT:?}: the processors \
         did not catch up with the snapshot's ~900k changes (each epoch rebuilds every changed view in full; a debug \
         build is slower still)"
    );
    // The probe row can show before the rest of the snapshot is read (topics are read side
    // by side): wait until the processors have read everything, so the probes under the
    // workload measure the live path, not the catch-up.
    let stats = process.stats();
    let mut last = stats.messages.load(std::sync::atomic::Ordering::Relaxed);
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(1) && t.elapsed() < CATCH_UP_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = stats.messages.load(std::sync::atomic::Ordering::Relaxed);
        if now != last {
            (last, quiet_since) = (now, Instant::now());
        }
    }
    println!(
        "processors caught up with the snapshot ({last} changes) in {:.1?}; probing for {:?} under the workload",
        t.elapsed().saturating_sub(Duration::from_secs(1)),
        opts.duration
    );

    let spike_secs = opts.duration.as_secs_f64() * 0.2;
    // Every change's age as the processors read it and once it is in SQL, over the workload:
    // snapshots at its start, at the spike's end and at its end.
    let ages = || (stats.read_age.snapshot(), stats.visible_age.snapshot());
    let at_start = ages();
    let mut at_spike_end = None;
    prober.query_times.clear();
    let workload = start_workload(opts, &pg).await?;
    let started = Instant::now();
    let mut probes = Vec::new();
    while started.elapsed() < opts.duration && !workload.is_finished() {
        let at = started.elapsed().as_secs_f64();
        if at >= spike_secs && at_spike_end.is_none() {
            at_spike_end = Some(ages());
        }
        let mut p = prober.probe(PROBE_TIMEOUT).await?;
        p.at = at;
        probes.push(p);
        tokio::time::sleep(opts.probe_gap).await;
    }
    let sim = workload.await.context("the workload task panicked")??;
    let at_end = ages();
    println!("load average after:  {}", loadavg());
    process.stop().await?;
    prober.consumer.stop();
    let _ = stop_tx.send(());
    pipeline.await.context("the pipeline task panicked")??;

    println!(
        "\nworkload: {} transactions at {:.0} tx/s achieved ({} tx/s offered, spike profile: the first 20 % at 5x)",
        sim.transactions, sim.achieved_rate, opts.rate
    );
    print_figures(&probes, spike_secs, opts.poll, opts.wal_floor);
    let at_spike_end = at_spike_end.unwrap_or_else(|| at_end.clone());
    print_ages(
        [&at_start, &at_spike_end, &at_end],
        spike_secs,
        &prober.query_times,
    );
    // Kafka clients first: a broker gone under them logs errors that read like a failure.
    drop(prober);
    drop(broker);
    drop(pg);
    Ok(())
}

/// The demo's workload (spike profile, `--rate`, `--latency-seconds`) on a connection of its own.
async fn start_workload(
    opts: &LatencyOptions,
    pg: &Postgres,
) -> anyhow::Result<
    tokio::task::JoinHandle<Result<legacy_fixtures::SimulateReport, legacy_fixtures::FixtureError>>,
> {
    let client = pg.connect("legacy").await?;
    let sim = legacy_fixtures::SimulateOptions {
        seed: 7,
        rate: opts.rate,
        duration: opts.duration,
        profile: legacy_fixtures::Profile::Spike,
        max_transactions: None,
    };
    Ok(tokio::spawn(async move {
        legacy_fixtures::simulate(&client, &sim).await
    }))
}

/// The floors alone, walbridge stopped: the same workload and probe updates, timed by
/// pg_recvlogical (the WAL's only decoder) and by the broker probe.
async fn floors_only(
    opts: &LatencyOptions,
    pg: &Postgres,
    client: &tokio_postgres::Client,
    broker: &Broker,
    fetch_wait: Duration,
) -> anyhow::Result<()> {
    let mut wal = WalProbe::start(pg, client).await?;
    let mut broker_probe = BrokerProbe::start(&broker.bootstrap(), fetch_wait).await?;
    println!(
        "walbridge is not running; probing the floors for {:?} under the workload",
        opts.duration
    );
    let workload = start_workload(opts, pg).await?;
    let started = Instant::now();
    let mut probes = Vec::new();
    let mut marker = 0;
    while started.elapsed() < opts.duration && !workload.is_finished() {
        let at = started.elapsed().as_secs_f64();
        marker += 1;
        client
            .simple_query(&format!(
                "UPDATE wms.stock_levels SET on_hand = {marker}, updated_at = now() WHERE sku = '{PROBE_SKU}'"
            ))
            .await
            .context("probe update")?;
        let t0 = Instant::now();
        let deadline = t0 + PROBE_TIMEOUT;
        let (w, b) = tokio::join!(
            wal.wait(marker, deadline),
            broker_probe.round_trip(marker, t0, deadline)
        );
        probes.push(Probe {
            at,
            wal: w.map(|at| at.saturating_duration_since(t0)),
            broker: b,
            ..Probe::default()
        });
        tokio::time::sleep(opts.probe_gap).await;
    }
    let sim = workload.await.context("the workload task panicked")??;
    println!("load average after:  {}", loadavg());
    println!(
        "\nworkload: {} transactions at {:.0} tx/s achieved ({} tx/s offered, spike profile: the first 20 % at 5x)",
        sim.transactions, sim.achieved_rate, opts.rate
    );
    let all = |f: fn(&Probe) -> Option<Duration>| {
        let v: Vec<Duration> = probes.iter().filter_map(f).collect();
        let missing = probes.len() - v.len();
        summary(v, missing).0
    };
    println!(
        "\nfloors, walbridge not running, {} sequential probes:",
        probes.len()
    );
    println!(
        "  the WAL alone (pg_recvlogical, test_decoding): {}",
        all(|p| p.wal)
    );
    println!(
        "  the broker alone (plain producer → consumer): {}",
        all(|p| p.broker)
    );
    Ok(())
}

/// The config with the throwaway stack's addresses and directories.
fn stack_config(
    mut cfg: Config,
    pg: &Postgres,
    broker: &Broker,
    dir: &Path,
) -> anyhow::Result<Config> {
    cfg.source.dsn = Dsn::parse(&pg.dsn("legacy")).map_err(|e| anyhow::anyhow!(e))?;
    cfg.source.state_dir = dir.join("state");
    cfg.kafka.brokers = vec![broker.bootstrap()];
    let port = crate::stack::free_port();
    cfg.registry.url = format!("http://127.0.0.1:{port}").parse()?;
    let listen = format!("127.0.0.1:{port}").parse()?;
    match &mut cfg.registry.embedded {
        Some(e) => {
            e.listen = listen;
            e.data_dir = dir.join("registry");
        }
        None => anyhow::bail!("the latency bench runs the embedded registry; the config has none"),
    }
    cfg.metrics = None;
    cfg.telemetry = None;
    let p = cfg
        .processors
        .as_mut()
        .context("the config has no processors section")?;
    p.checkpoint_dir = dir.join("processors");
    p.epoch_interval = p.epoch_interval.min(Duration::from_millis(50));
    match &mut p.sql {
        Some(s) => s.listen = "127.0.0.1:0".parse()?,
        None => anyhow::bail!("the latency bench queries processors.sql; the config has none"),
    }
    for s in &mut p.sinks {
        match s {
            ViewSinkConfig::Kafka { .. } => {}
            ViewSinkConfig::Postgres { dsn, .. } => {
                *dsn = Dsn::parse(&pg.dsn("analytics")).map_err(|e| anyhow::anyhow!(e))?;
            }
            ViewSinkConfig::Parquet { name, dir: d } => *d = dir.join(format!("lake-{name}")),
        }
    }
    Ok(cfg)
}

struct Prober<'a> {
    client: &'a tokio_postgres::Client,
    sql: &'a tokio_postgres::Client,
    query: &'a str,
    poll: Duration,
    consumer: ProbeConsumer,
    broker: BrokerProbe,
    wal: Option<WalProbe>,
    acks: &'a AckHistory,
    marker: i64,
    /// The WAL insert position after the previous probe's commit: this probe's commit is after it.
    before: Lsn,
    /// How long each SQL query of the probes took, answer included.
    query_times: Vec<Duration>,
}

impl Prober<'_> {
    /// One probe: commit a new marker, then wait for it in Kafka and in SQL.
    async fn probe(&mut self, timeout: Duration) -> anyhow::Result<Probe> {
        self.marker += 1;
        let marker = self.marker;
        // Simple query protocol: the server commits before it sends CommandComplete (the
        // extended protocol commits at Sync, after it), so t0 is after the commit.
        self.client
            .simple_query(&format!(
                "UPDATE wms.stock_levels SET on_hand = {marker}, updated_at = now() WHERE sku = '{PROBE_SKU}'"
            ))
            .await
            .context("probe update")?;
        let t0 = Instant::now();
        let t0_wall = std::time::SystemTime::now();
        let after = current_lsn(self.client).await?;
        let (before, deadline) = (self.before, t0 + timeout);
        self.before = after;

        let kafka = self.consumer.wait(before, after, deadline);
        // The floors never wait longer than a probe may take, also while catching up.
        let floor_deadline = deadline.min(t0 + PROBE_TIMEOUT);
        let broker = self.broker.round_trip(marker, t0, floor_deadline);
        let wal = async {
            match self.wal.as_mut() {
                Some(w) => w.wait(marker, floor_deadline).await,
                None => None,
            }
        };
        let query_times = &mut self.query_times;
        let sql = async {
            loop {
                let asked = Instant::now();
                let rows = self.sql.simple_query(self.query).await?;
                query_times.push(asked.elapsed());
                let seen = rows.iter().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse::<i64>().ok(),
                    _ => None,
                });
                if seen == Some(marker) {
                    return Ok::<_, anyhow::Error>(Some(t0.elapsed()));
                }
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                tokio::time::sleep(self.poll).await;
            }
        };
        let (kafka, sql, broker, wal) = tokio::join!(kafka, sql, broker, wal);
        let wal = wal.map(|at| at.saturating_duration_since(t0));
        let sql = sql.context("querying the SQL endpoint")?;
        let produced = kafka.and_then(|(_, _, created)| {
            let created = std::time::UNIX_EPOCH + Duration::from_millis(created?);
            // Whole milliseconds: a record stamped in t0's millisecond counts as 0.
            Some(created.duration_since(t0_wall).unwrap_or_default())
        });
        let (kafka, ack) = match kafka {
            Some((seen, commit, _)) => (
                Some(seen.saturating_duration_since(t0)),
                self.acks
                    .first_past(commit, deadline)
                    .await
                    .map(|at| at.saturating_duration_since(t0)),
            ),
            None => (None, None),
        };
        Ok(Probe {
            at: 0.0,
            ack,
            produced,
            kafka,
            sql,
            broker,
            wal,
        })
    }
}

/// The WAL's own latency under the same load, the floor for the change-capture part: Postgres'
/// `test_decoding` on a slot of its own, drained by pg_recvlogical, reports each probe UPDATE
/// (`on_hand[integer]:<probe number>`) as its line arrives. Same walsender work per commit as
/// walbridge's pgoutput slot (decoding every table in commit order), without any of walbridge.
struct WalProbe {
    rx: mpsc::UnboundedReceiver<(Instant, i64)>,
    child: std::process::Child,
}

impl WalProbe {
    const SLOT: &'static str = "walbridge_bench_wal_floor";

    async fn start(pg: &Postgres, client: &tokio_postgres::Client) -> anyhow::Result<WalProbe> {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
                &[&Self::SLOT],
            )
            .await
            .context("creating the WAL floor's test_decoding slot")?;
        let mut child =
            std::process::Command::new(crate::stack::postgres_bin_dir()?.join("pg_recvlogical"))
                .args([
                    "-d",
                    &pg.dsn("legacy"),
                    "--slot",
                    Self::SLOT,
                    "--start",
                    "-f",
                    "-",
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("starting pg_recvlogical")?;
        let out = child.stdout.take().context("pg_recvlogical's stdout")?;
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                if !line.contains(PROBE_SKU) {
                    continue;
                }
                // The last value is the new tuple's (under REPLICA IDENTITY FULL the old row
                // comes first).
                let marker = line.rsplit_once("on_hand[integer]:").and_then(|(_, rest)| {
                    rest.split(|c: char| !c.is_ascii_digit())
                        .next()?
                        .parse()
                        .ok()
                });
                if let Some(m) = marker
                    && tx.send((at, m)).is_err()
                {
                    break;
                }
            }
        });
        Ok(WalProbe { rx, child })
    }

    async fn wait(&mut self, marker: i64, deadline: Instant) -> Option<Instant> {
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let (at, m) = tokio::time::timeout(left, self.rx.recv()).await.ok()??;
            if m == marker {
                return Some(at);
            }
        }
    }
}

impl Drop for WalProbe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The broker's own latency under the same load, the floor for everything that goes through
/// it: at each probe's commit a plain producer (linger 0, acks all) sends the probe's number to
/// a one-partition side topic, and a plain consumer (fetch.wait.max.ms as the processors')
/// reports when it arrives.
struct BrokerProbe {
    producer: rdkafka::producer::FutureProducer,
    topic: String,
    consumer: ProbeConsumer,
}

impl BrokerProbe {
    const TOPIC: &'static str = "walbridge.bench.broker_probe";

    async fn start(brokers: &str, fetch_wait: Duration) -> anyhow::Result<BrokerProbe> {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<_> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .context("creating an admin client")?;
        admin
            .create_topics(
                &[NewTopic::new(Self::TOPIC, 1, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await
            .context("creating the broker probe topic")?;
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "0")
            .set("acks", "all")
            .create()
            .context("creating the broker probe producer")?;
        let consumer = ProbeConsumer::start_with(brokers, Self::TOPIC, fetch_wait, |m| {
            let marker = std::str::from_utf8(m.payload()?)
                .ok()?
                .parse::<u64>()
                .ok()?;
            Some((Lsn(marker), None))
        })?;
        Ok(BrokerProbe {
            producer,
            topic: Self::TOPIC.to_owned(),
            consumer,
        })
    }

    /// Sends `marker` and waits for it to come back: the time from `t0`.
    async fn round_trip(
        &mut self,
        marker: i64,
        t0: Instant,
        deadline: Instant,
    ) -> Option<Duration> {
        let payload = marker.to_string();
        let sent = self
            .producer
            .send_result(
                rdkafka::producer::FutureRecord::<(), _>::to(&self.topic).payload(&payload),
            )
            .ok()?;
        let m = Lsn(marker as u64);
        let (got, _) = tokio::join!(self.consumer.wait(Lsn(m.0 - 1), m, deadline), sent);
        got.map(|(at, _, _)| at.saturating_duration_since(t0))
    }
}

/// Every change of walbridge's confirmed LSN with the time it was seen.
struct AckHistory {
    seen: Arc<std::sync::Mutex<Vec<(Instant, Lsn)>>>,
    changed: tokio::sync::watch::Receiver<Lsn>,
}

impl AckHistory {
    fn record(mut confirmed: tokio::sync::watch::Receiver<Lsn>) -> AckHistory {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let changed = confirmed.clone();
        let log = seen.clone();
        tokio::spawn(async move {
            while confirmed.changed().await.is_ok() {
                let l = *confirmed.borrow_and_update();
                if let Ok(mut v) = log.lock() {
                    v.push((Instant::now(), l));
                }
            }
        });
        AckHistory { seen, changed }
    }

    /// When the confirmed LSN first passed `commit` (the commit record's start, so the
    /// transaction is acked once the confirmed end LSN is beyond it).
    async fn first_past(&self, commit: Lsn, deadline: Instant) -> Option<Instant> {
        let mut changed = self.changed.clone();
        loop {
            let hit = self.seen.lock().ok().and_then(|v| {
                // Entries are in time order with the LSN never going back: the first past it.
                let i = v.partition_point(|(_, l)| *l <= commit);
                v.get(i).map(|(t, _)| *t)
            });
            if hit.is_some() {
                return hit;
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            // The recorder task may not have logged the newest value yet; look again soon.
            let _ =
                tokio::time::timeout(left.min(Duration::from_millis(5)), changed.changed()).await;
        }
    }
}

/// A consumer of the stock_levels change topic reporting the probe row's records: the time it
/// received each and its commit LSN (`walbridge.lsn`).
struct ProbeConsumer {
    rx: mpsc::UnboundedReceiver<(Instant, Lsn, Option<u64>)>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProbeConsumer {
    fn start(brokers: &str, topic: &str, fetch_wait: Duration) -> anyhow::Result<ProbeConsumer> {
        let key = PROBE_SKU.as_bytes();
        Self::start_with(brokers, topic, fetch_wait, move |m| {
            // The key is the Avro of (sku, location_code): the SKU's bytes appear as is.
            if !m
                .key()
                .is_some_and(|k| k.windows(key.len()).any(|w| w == key))
            {
                return None;
            }
            let lsn = m.headers().and_then(|h| {
                h.iter()
                    .find(|hd| hd.key == "walbridge.lsn")
                    .and_then(|hd| std::str::from_utf8(hd.value?).ok()?.parse::<Lsn>().ok())
            })?;
            let created = match m.timestamp() {
                rdkafka::Timestamp::CreateTime(ms) => u64::try_from(ms).ok(),
                _ => None,
            };
            Some((lsn, created))
        })
    }

    /// A consumer reporting the records `pick` recognizes, with their position and CreateTime.
    fn start_with(
        brokers: &str,
        topic: &str,
        fetch_wait: Duration,
        pick: impl Fn(&rdkafka::message::BorrowedMessage<'_>) -> Option<(Lsn, Option<u64>)>
        + Send
        + 'static,
    ) -> anyhow::Result<ProbeConsumer> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "walbridge-views-bench")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", fetch_wait.as_millis().to_string())
            .set("auto.offset.reset", "earliest")
            .create()
            .context("creating the probe consumer")?;
        let mut tpl = TopicPartitionList::new();
        let t = Instant::now();
        // A topic created a moment ago may not be in the broker's metadata yet.
        while tpl.count() == 0 {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(30),
                "topic {topic} has no partitions"
            );
            let md = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .with_context(|| format!("reading metadata of {topic}"))?;
            for t in md.topics() {
                for p in t.partitions() {
                    tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
                }
            }
            if tpl.count() == 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        consumer.assign(&tpl).context("assigning the probe topic")?;
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let m = match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "probe consumer poll");
                        continue;
                    }
                    None => continue,
                };
                let at = Instant::now();
                if let Some((l, created)) = pick(&m)
                    && tx.send((at, l, created)).is_err()
                {
                    break;
                }
            }
        });
        Ok(ProbeConsumer {
            rx,
            stop,
            thread: Some(thread),
        })
    }

    /// The probe record committed between `before` and `after`: when it arrived, its commit
    /// LSN, and its CreateTime (Unix ms).
    async fn wait(
        &mut self,
        before: Lsn,
        after: Lsn,
        deadline: Instant,
    ) -> Option<(Instant, Lsn, Option<u64>)> {
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let (at, lsn, created) = tokio::time::timeout(left, self.rx.recv()).await.ok()??;
            if lsn > before && lsn <= after {
                return Some((at, lsn, created));
            }
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ProbeConsumer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn current_lsn(client: &tokio_postgres::Client) -> anyhow::Result<Lsn> {
    let l: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    Ok(l.parse()?)
}

async fn wait_confirmed(
    mut confirmed: tokio::sync::watch::Receiver<Lsn>,
    lsn: Lsn,
    timeout: Duration,
) -> anyhow::Result<()> {
    tokio::time::timeout(timeout, confirmed.wait_for(|c| *c >= lsn))
        .await
        .with_context(|| format!("not confirmed within {timeout:?}"))?
        .context("the pipeline stopped")?;
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| {
            let f: Vec<&str> = s.split_whitespace().take(3).collect();
            (f.len() == 3).then(|| format!("{} {} {} (1, 5, 15 min)", f[0], f[1], f[2]))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// p50, p99 and max of the durations present, and how many are missing.
fn summary(mut d: Vec<Duration>, missing: usize) -> (String, Option<(Duration, Duration)>) {
    d.sort();
    if d.is_empty() {
        return (format!("no samples ({missing} missing)"), None);
    }
    // Nearest rank: the smallest value with at least p of the samples at or below it.
    let rank = |p: f64| d[((p * d.len() as f64).ceil() as usize).clamp(1, d.len()) - 1];
    let (p50, p99, max) = (rank(0.50), rank(0.99), d[d.len() - 1]);
    let mut s = format!(
        "p50 {:>7.1} ms   p99 {:>7.1} ms   max {:>7.1} ms   ({} probes",
        ms(p50),
        ms(p99),
        ms(max),
        d.len()
    );
    if missing > 0 {
        s.push_str(&format!(", {missing} not seen within {PROBE_TIMEOUT:?}"));
    }
    s.push(')');
    (s, Some((p50, p99)))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print_figures(probes: &[Probe], spike_secs: f64, poll: Duration, wal_floor: bool) {
    let pick = |f: fn(&Probe) -> Option<Duration>, keep: &dyn Fn(&Probe) -> bool| {
        let kept: Vec<&Probe> = probes.iter().filter(|p| keep(p)).collect();
        let vals: Vec<Duration> = kept.iter().filter_map(|p| f(p)).collect();
        let missing = kept.len() - vals.len();
        summary(vals, missing)
    };
    let all = |_: &Probe| true;
    println!(
        "\nevent produced (commit in the legacy database) → visible, {} sequential probes",
        probes.len()
    );
    let (ack, ack_p) = pick(|p| p.ack, &all);
    let (produced, _) = pick(|p| p.produced, &all);
    let (kafka, _) = pick(|p| p.kafka, &all);
    let (broker, broker_p) = pick(|p| p.broker, &all);
    let (wal, wal_p) = pick(|p| p.wal, &all);
    let (sql, sql_p) = pick(|p| p.sql, &all);
    // The issue's own measure: from the event's production (the record handed to Kafka) to
    // the query that sees it, per probe; the commit → SQL figures above include the WAL's
    // decoding and walbridge's capture, which come before the event exists.
    let from_event = |p: &Probe| Some(p.sql?.saturating_sub(p.produced?));
    let (event_sql, event_sql_p) = pick(from_event, &all);
    if wal_floor {
        println!("  the WAL alone (pg_recvlogical, test_decoding): {wal}");
    }
    println!("  handed to Kafka (record CreateTime, ±1 ms):   {produced}");
    println!("  acked by Kafka (walbridge's confirmed LSN):   {ack}");
    println!("  received by a Kafka consumer of the topic:    {kafka}");
    println!("  the broker alone (plain producer → consumer): {broker}");
    println!(
        "  in SQL on stock_availability (polled every {} ms): {sql}",
        poll.as_millis()
    );
    let (spike, _) = pick(|p| p.sql, &|p: &Probe| p.at < spike_secs);
    let (steady, _) = pick(|p| p.sql, &|p: &Probe| p.at >= spike_secs);
    println!("    during the spike (first {spike_secs:.0} s):      {spike}");
    println!("    after it:                                 {steady}");
    println!("  event handed to Kafka → in SQL, per probe:   {event_sql}");
    let (spike, _) = pick(from_event, &|p: &Probe| p.at < spike_secs);
    let (steady, _) = pick(from_event, &|p: &Probe| p.at >= spike_secs);
    println!("    during the spike (first {spike_secs:.0} s):      {spike}");
    println!("    after it:                                 {steady}");
    // The same span in two parts, per probe, with the bench's own consumer of the topic
    // standing in for the processors' (same broker, same fetch wait): the broker hop, and
    // what the processors, the epoch close and the SQL endpoint add after it.
    let (hop, _) = pick(|p| Some(p.kafka?.saturating_sub(p.produced?)), &all);
    let (rest, _) = pick(|p| Some(p.sql?.saturating_sub(p.kafka?)), &all);
    println!("    of which handed → a consumer has it:      {hop}");
    println!("    of which a consumer has it → in SQL:      {rest}");
    // tansu lists every batch a partition holds on each fetch, so its hop grows with the
    // topic; the same span by third of the run shows that growth apart from the spike.
    let end = probes.iter().map(|p| p.at).fold(0.0, f64::max);
    for third in 0..3 {
        let (lo, hi) = (end * third as f64 / 3.0, end * (third + 1) as f64 / 3.0);
        let keep = |p: &Probe| p.at >= lo && (p.at < hi || third == 2);
        let (hop, _) = pick(|p| Some(p.kafka?.saturating_sub(p.produced?)), &keep);
        let (ev, _) = pick(from_event, &keep);
        println!("    {lo:>3.0}–{hi:<3.0} s: hop {hop}");
        println!("             to SQL {ev}");
    }
    let verdict = |p: Option<(Duration, Duration)>| match p {
        Some((_, p99)) if p99 <= Duration::from_millis(100) => "met",
        Some(_) => "NOT met",
        None => "not measured",
    };
    println!(
        "  target p99 ≤ 100 ms, event produced (handed to Kafka) → SQL: {}",
        verdict(event_sql_p)
    );
    println!(
        "  stricter, commit in the legacy database → SQL:             {}",
        verdict(sql_p)
    );
    if let (Some((a50, a99)), Some((s50, s99))) = (ack_p, sql_p) {
        println!(
            "  ratio SQL-visible / Kafka-ack:                p50 {:.1}x   p99 {:.1}x",
            s50.as_secs_f64() / a50.as_secs_f64().max(1e-6),
            s99.as_secs_f64() / a99.as_secs_f64().max(1e-6)
        );
        if let Some((w50, w99)) = wal_p.filter(|_| wal_floor) {
            println!(
                "  ratio SQL-visible / WAL alone:                p50 {:.1}x   p99 {:.1}x",
                s50.as_secs_f64() / w50.as_secs_f64().max(1e-6),
                s99.as_secs_f64() / w99.as_secs_f64().max(1e-6)
            );
        }
        if let Some((b50, b99)) = broker_p {
            println!(
                "  ratio SQL-visible / broker alone:             p50 {:.1}x   p99 {:.1}x",
                s50.as_secs_f64() / b50.as_secs_f64().max(1e-6),
                s99.as_secs_f64() / b99.as_secs_f64().max(1e-6)
            );
        }
    }
}

/// The processors' own figures over the workload, from every change they read (thousands, where
/// the probes are hundreds): the record's age when read and once in SQL
/// ([`transforms::freshness`]), then what a query adds.
fn print_ages(
    [start, spike_end, end]: [&(transforms::freshness::Ages, transforms::freshness::Ages); 3],
    spike_secs: f64,
    query_times: &[Duration],
) {
    let line = |a: &transforms::freshness::Ages| match (a.quantile(0.5), a.quantile(0.99)) {
        (Some(p50), Some(p99)) => format!(
            "p50 {p50:>5} ms     p99 {p99:>5} ms     max {:>5} ms     ({} changes)",
            a.quantile(1.0).unwrap_or(p99),
            a.count()
        ),
        _ => "no changes".to_owned(),
    };
    println!("\nevery change the processors read during the workload, from its CreateTime (±1 ms)");
    println!(
        "  read by the processors:             {}",
        line(&end.0.since(&start.0))
    );
    println!(
        "  published to SQL (epoch closed):    {}",
        line(&end.1.since(&start.1))
    );
    println!(
        "    during the spike (first {spike_secs:.0} s):    {}",
        line(&spike_end.1.since(&start.1))
    );
    println!(
        "    after it:                         {}",
        line(&end.1.since(&spike_end.1))
    );
    let (q, _) = summary(query_times.to_vec(), 0);
    println!(
        "  one probe query on the SQL endpoint: {}",
        q.replace("probes", "queries")
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn percentiles_are_nearest_rank_and_missing_probes_are_reported() {
        let d: Vec<Duration> = (1..=200).map(Duration::from_millis).collect();
        let (text, p) = super::summary(d, 3);
        assert_eq!(
            p,
            Some((Duration::from_millis(100), Duration::from_millis(198)))
        );
        assert!(text.contains("3 not seen"), "{text}");
    }
}
