//! `walbridge bench`: walbridge against the physical limit, side by side in one run.
//!
//! 1. Throughput. N rows are inserted in 10k-row transactions into a fresh table while two slots
//!    hold the same WAL. `pg_recvlogical` (pgoutput, to /dev/null) drains one slot, walbridge
//!    drains the other into Kafka through the registry. Printed: rows/s of each and the ratio.
//!    walbridge's time runs from start until the confirmed LSN reaches the end of the load, so it
//!    includes start-up (topic creation, schema registration) and the wait for Kafka's acks.
//! 2. Latency. Single-row transactions at a fixed offered rate while walbridge runs; for each, the
//!    time from the client seeing COMMIT return to walbridge's confirmed LSN passing it (every
//!    change of the transaction acked by Kafka). Printed: p50, p99, max.
//! 4. Snapshot (`--snapshot-rows`). One table copied by walbridge's initial snapshot into Kafka,
//!    against `COPY (SELECT * FROM t) TO STDOUT` of the same table; printed: rows/s and ratio.
//! 3. Memory (`--big-tx-rows`). One transaction of that many rows, streamed into Kafka; printed:
//!    the time and the process's peak RSS while draining it (VmHWM, reset just before).

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use cdc::Lsn;

use crate::stack::{Broker, Postgres};

const TX_ROWS: u64 = 10_000;

/// A pipeline config for one bench table. The throughput and latency runs create their slots
/// themselves, before the load, so that both readers see the same WAL: those stream without a
/// snapshot. The snapshot run lets walbridge create its slot and snapshot the table.
/// Which bench pipeline a config is for.
struct Target<'a> {
    slot: &'a str,
    publication: &'a str,
    table: &'a str,
    snapshot: &'a str,
    /// Encode everything, send nothing (walbridge's own cost, without the broker's).
    discard: bool,
}

fn config_yaml(
    dsn: &str,
    t: &Target<'_>,
    brokers: &str,
    registry_port: u16,
    data_dir: &Path,
) -> String {
    let Target {
        slot,
        publication,
        table,
        snapshot,
        ..
    } = t;
    let state_dir = data_dir.with_file_name(format!("state-{slot}"));
    format!(
        "source:\n  dsn: \"{dsn}\"\n  heartbeat_interval_ms: 100\n  publication: {publication}\n  slot: {slot}\n  tables: [public.{table}]\n  state_dir: \"{}\"\n  snapshot: {snapshot}\n\
         kafka:\n  brokers: \"{brokers}\"\n  topic_prefix: {slot}\n  partitions: 3\n\
         registry:\n  url: \"http://127.0.0.1:{registry_port}\"\n  embedded:\n    listen: \"127.0.0.1:{registry_port}\"\n    data_dir: \"{}\"\n",
        state_dir.display(),
        data_dir.display()
    )
}

pub async fn run(
    rows: u64,
    latency_rate: f64,
    latency_for: Duration,
    big_tx_rows: u64,
    snapshot_rows: u64,
) -> anyhow::Result<()> {
    let dir = tempdir()?;
    let pg = Postgres::start(&dir)?;
    pg.create_database("bench").await?;
    let broker = Broker::start()?;
    let dsn = pg.dsn("bench");
    let (client, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    // The throwaway cluster runs with synchronous_commit=off; production's default is on, under
    // which a commit's WAL is flushed (and the walsender woken) at once. Measure that.
    client.batch_execute("SET synchronous_commit = on").await?;
    // One statement per call: a slot cannot be created in a transaction that has written.
    for sql in [
        "CREATE TABLE bench (id bigint PRIMARY KEY, sku text NOT NULL, qty int NOT NULL, \
         price numeric(12,2) NOT NULL, at timestamptz NOT NULL DEFAULT now(), note text)",
        "CREATE PUBLICATION bench FOR TABLE bench",
        "SELECT pg_create_logical_replication_slot('recv', 'pgoutput')",
        "SELECT pg_create_logical_replication_slot('wb', 'pgoutput')",
        "SELECT pg_create_logical_replication_slot('recv2', 'pgoutput')",
        "SELECT pg_create_logical_replication_slot('wbbig', 'pgoutput')",
        "SELECT pg_create_logical_replication_slot('wbnull', 'pgoutput')",
    ] {
        client
            .batch_execute(sql)
            .await
            .with_context(|| format!("bench set-up: {sql}"))?;
    }

    println!("loading {rows} rows in {TX_ROWS}-row transactions ...");
    let mut done = 0;
    while done < rows {
        let n = TX_ROWS.min(rows - done);
        client
            .execute(
                "INSERT INTO bench (id, sku, qty, price, note) \
                 SELECT g, 'SKU-' || (g % 10000), (g % 50)::int, (g % 1000) / 7.0, 'row ' || g \
                 FROM generate_series($1::bigint, $2::bigint) g",
                &[&(done as i64 + 1), &((done + n) as i64)],
            )
            .await?;
        done += n;
    }
    let end: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    let end_lsn: Lsn = end.parse()?;

    // pg_recvlogical: the physical limit of one walsender on this WAL. It runs once before and
    // once after walbridge, so a warm or cold cache favours neither side.
    let recv_secs = recv_logical(&dsn, "recv", &end)?;
    // walbridge into Kafka.
    let t = Instant::now();
    let mut running = Running::start(
        &dsn,
        &Target {
            slot: "wb",
            publication: "bench",
            table: "bench",
            snapshot: "never",
            discard: false,
        },
        &broker,
        &dir.join("registry"),
    )
    .await?;
    running.wait_for(end_lsn).await?;
    let confirmed = &mut running.confirmed;
    let wb_secs = t.elapsed().as_secs_f64();
    let recv_secs = recv_secs.min(recv_logical(&dsn, "recv2", &end)?);
    // walbridge into the null sink: everything up to the producer, without the broker's cost.
    let t = Instant::now();
    let null = Running::start(
        &dsn,
        &Target {
            slot: "wbnull",
            publication: "bench",
            table: "bench",
            snapshot: "never",
            discard: true,
        },
        &broker,
        &dir.join("registry-null"),
    )
    .await?;
    null.wait_for(end_lsn).await?;
    let null_secs = t.elapsed().as_secs_f64();
    null.stop().await?;
    let recv_rate = rows as f64 / recv_secs;
    let wb_rate = rows as f64 / wb_secs;
    let null_rate = rows as f64 / null_secs;
    println!("\nthroughput ({rows} rows, {TX_ROWS}-row transactions)");
    println!(
        "  pg_recvlogical (best of 2 runs):        {recv_secs:>7.2} s  {recv_rate:>10.0} rows/s"
    );
    println!("  walbridge (pgoutput → Avro → Kafka):   {wb_secs:>7.2} s  {wb_rate:>10.0} rows/s");
    println!(
        "  walbridge (pgoutput → Avro → null):    {null_secs:>7.2} s  {null_rate:>10.0} rows/s"
    );
    println!(
        "  ratio walbridge / pg_recvlogical:      {:>7.2} (Kafka)  {:>7.2} (null sink)",
        wb_rate / recv_rate,
        null_rate / recv_rate
    );

    // Latency at a fixed offered rate of single-row transactions.
    let period = Duration::from_secs_f64(1.0 / latency_rate);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut waiting: VecDeque<(Lsn, Instant)> = VecDeque::new();
    let mut lat: Vec<Duration> = Vec::new();
    let stmt = client
        .prepare("INSERT INTO bench (id, sku, qty, price) VALUES ($1, 'SKU-L', 1, 1.00) RETURNING pg_current_wal_insert_lsn()::text")
        .await?;
    let t = Instant::now();
    let mut id = rows as i64 + 1;
    let drain = |waiting: &mut VecDeque<(Lsn, Instant)>, lat: &mut Vec<Duration>, c: Lsn| {
        while waiting.front().is_some_and(|(l, _)| *l <= c) {
            let (_, at) = waiting.pop_front().unwrap_or((Lsn::ZERO, Instant::now()));
            lat.push(at.elapsed());
        }
    };
    while t.elapsed() < latency_for {
        tokio::select! {
            _ = tick.tick() => {
                let r = client.query_one(&stmt, &[&id]).await?;
                let at = Instant::now();
                let l: String = r.get(0);
                waiting.push_back((l.parse()?, at));
                id += 1;
            }
            _ = confirmed.changed() => {}
        }
        drain(&mut waiting, &mut lat, *confirmed.borrow());
    }
    let offered = (id - rows as i64 - 1) as f64 / t.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !waiting.is_empty() && Instant::now() < deadline {
        let _ = tokio::time::timeout(Duration::from_millis(200), confirmed.changed()).await;
        drain(&mut waiting, &mut lat, *confirmed.borrow());
    }
    running.stop().await?;
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "\ncommit → Kafka ack latency ({} single-row transactions at {offered:.0} tx/s offered)",
        lat.len()
    );
    println!(
        "  p50 {:>8.1?}   p99 {:>8.1?}   max {:>8.1?}",
        pct(0.50),
        pct(0.99),
        lat.last().copied().unwrap_or_default()
    );
    if big_tx_rows > 0 {
        big_transaction(&client, &dsn, &broker, &dir, id, big_tx_rows).await?;
    }
    if snapshot_rows > 0 {
        snapshot_vs_copy(&client, &dsn, &broker, &dir, snapshot_rows).await?;
    }
    drop(broker);
    drop(pg);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One transaction of `n` rows through walbridge, with the process's peak RSS while it drains.
/// The slot `wbbig` was created before any load, so it skips the earlier (already measured)
/// transactions quickly and then has the big one to stream.
async fn big_transaction(
    client: &tokio_postgres::Client,
    dsn: &str,
    broker: &Broker,
    dir: &Path,
    first_id: i64,
    n: u64,
) -> anyhow::Result<()> {
    println!("\nloading one transaction of {n} rows ...");
    let t = Instant::now();
    client
        .execute(
            "INSERT INTO bench (id, sku, qty, price, note) \
             SELECT g, 'SKU-' || (g % 10000), (g % 50)::int, (g % 1000) / 7.0, 'big ' || g \
             FROM generate_series($1::bigint, $2::bigint) g",
            &[&first_id, &(first_id + n as i64 - 1)],
        )
        .await?;
    println!("  loaded in {:.1?}", t.elapsed());
    let end: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    let end_lsn: Lsn = end.parse()?;
    let rss_before = proc_status_kib("VmRSS:");
    // Reset the kernel's peak-RSS counter (VmHWM) so it covers only the drain.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let t = Instant::now();
    let running = Running::start(
        dsn,
        &Target {
            slot: "wbbig",
            publication: "bench",
            table: "bench",
            snapshot: "never",
            discard: false,
        },
        broker,
        &dir.join("registry-big"),
    )
    .await?;
    running.wait_for(end_lsn).await?;
    let secs = t.elapsed().as_secs_f64();
    let peak = proc_status_kib("VmHWM:");
    running.stop().await?;
    println!("one {n}-row transaction through walbridge into Kafka");
    println!(
        "  {secs:.1} s, {:.0} rows/s (includes the server decoding the whole transaction)",
        n as f64 / secs
    );
    println!(
        "  peak RSS of the walbridge process while draining: {:.0} MiB (before: {:.0} MiB)",
        peak.unwrap_or(0) as f64 / 1024.0,
        rss_before.unwrap_or(0) as f64 / 1024.0
    );
    Ok(())
}

/// The initial snapshot of one table against `COPY (SELECT * FROM t) TO STDOUT` of the same table.
/// walbridge's time runs from start until its first confirmed LSN, which is the snapshot's
/// consistent point: every snapshot row has been acked by Kafka then.
async fn snapshot_vs_copy(
    client: &tokio_postgres::Client,
    dsn: &str,
    broker: &Broker,
    dir: &Path,
    n: u64,
) -> anyhow::Result<()> {
    println!("\nloading {n} rows into snap_bench ...");
    client
        .batch_execute(
            "CREATE TABLE snap_bench (id bigint PRIMARY KEY, sku text NOT NULL, qty int NOT NULL, \
             price numeric(12,2) NOT NULL, at timestamptz NOT NULL DEFAULT now(), note text)",
        )
        .await?;
    client
        .execute(
            "INSERT INTO snap_bench (id, sku, qty, price, note) \
             SELECT g, 'SKU-' || (g % 10000), (g % 50)::int, (g % 1000) / 7.0, 'row ' || g \
             FROM generate_series(1, $1::bigint) g",
            &[&(n as i64)],
        )
        .await?;
    client.batch_execute("VACUUM ANALYZE snap_bench").await?;

    // COPY runs once before and once after walbridge; the faster counts, so a cold or warm
    // cache favours neither side (as for pg_recvlogical above).
    let (first_secs, bytes) = copy_all(client).await?;

    let kafka_secs = snapshot_run(client, dsn, broker, dir, "wbsnap", false).await?;
    let null_secs = snapshot_run(client, dsn, broker, dir, "wbsnapnull", true).await?;
    let copy_secs = first_secs.min(copy_all(client).await?.0);
    // The broker's own limit on this machine: the same number of records of the size
    // walbridge produced for the snapshot (with the same headers), pre-encoded, through the
    // same producer settings.
    let record_bytes = {
        let row = client
            .query_one(
                "SELECT avg(pg_column_size(s.*))::float8 FROM snap_bench s",
                &[],
            )
            .await?;
        // The envelope adds the source block (names, LSN, timestamps) to the row's Avro.
        row.get::<_, f64>(0) as usize + 80
    };
    let raw_secs = raw_produce(broker, n, record_bytes).await?;
    let (copy_rate, kafka_rate, null_rate, raw_rate) = (
        n as f64 / copy_secs,
        n as f64 / kafka_secs,
        n as f64 / null_secs,
        n as f64 / raw_secs,
    );
    println!(
        "\nsnapshot of {n} rows ({:.0} MiB as COPY text)",
        bytes as f64 / (1024.0 * 1024.0)
    );
    println!(
        "  COPY (SELECT * FROM t) TO STDOUT (best of 2): {copy_secs:>5.2} s  {copy_rate:>10.0} rows/s"
    );
    println!(
        "  walbridge snapshot → Avro → Kafka:      {kafka_secs:>7.2} s  {kafka_rate:>10.0} rows/s"
    );
    println!(
        "  walbridge snapshot → Avro → null:       {null_secs:>7.2} s  {null_rate:>10.0} rows/s"
    );
    println!(
        "  ratio walbridge / COPY:                 {:>7.2} (Kafka)  {:>7.2} (null sink)",
        kafka_rate / copy_rate,
        null_rate / copy_rate
    );
    println!(
        "  broker limit: {n} pre-encoded {record_bytes}-byte records: {raw_secs:>5.2} s  {raw_rate:>10.0} rows/s"
    );
    println!(
        "  ratio walbridge → Kafka / broker limit: {:>7.2}",
        kafka_rate / raw_rate
    );
    Ok(())
}

/// Produces `n` records of `bytes` bytes to a fresh topic through walbridge's Kafka sink (same
/// settings: idempotent, acks=all, linger 5 ms) and waits for every ack; returns the seconds.
async fn raw_produce(broker: &Broker, n: u64, bytes: usize) -> anyhow::Result<f64> {
    let (progress, _confirmed) = cdc::progress::Progress::new(Lsn::ZERO);
    let sink = sinks::kafka::KafkaSink::new(
        sinks::kafka::KafkaSettings {
            brokers: broker.bootstrap(),
            partitions: 3,
            replication_factor: 1,
            max_queue_bytes: 64 << 20,
            connections: 1,
            extra: Vec::new(),
        },
        progress.clone(),
    )?;
    let topic = "bench.raw".to_owned();
    sink.ensure_topics(std::slice::from_ref(&topic)).await?;
    let payload = vec![7u8; bytes];
    let t = Instant::now();
    let seq = progress.begin();
    progress.expect(seq, n);
    // Headers like walbridge's, so the records are the same size on the wire.
    let mut id = String::with_capacity(48);
    for i in 0..n {
        use std::fmt::Write;
        let key = i.to_be_bytes();
        id.clear();
        let _ = write!(
            id,
            "snapshot:0/1A2B3C4D:public.snap_bench:{}:{i}",
            i / 100_000
        );
        let headers: [(&str, &[u8]); 4] = [
            ("walbridge.event_id", id.as_bytes()),
            ("walbridge.lsn", b"0/1A2B3C4D"),
            ("walbridge.txid", b"0"),
            ("walbridge.op", b"r"),
        ];
        sink.send(&sinks::kafka::Record {
            topic: &topic,
            key: Some(&key),
            payload: Some(&payload),
            headers: &headers,
            seq,
            partition: None,
        })
        .await?;
    }
    progress.commit(seq, Lsn(1));
    tokio::task::block_in_place(|| sink.flush(Duration::from_secs(300)))?;
    anyhow::ensure!(progress.confirmed() == Lsn(1), "not every record was acked");
    Ok(t.elapsed().as_secs_f64())
}

/// `COPY (SELECT * FROM snap_bench) TO STDOUT`, read to the end: seconds and bytes.
async fn copy_all(client: &tokio_postgres::Client) -> anyhow::Result<(f64, usize)> {
    use futures_util::StreamExt;
    let t = Instant::now();
    let stream = client
        .copy_out("COPY (SELECT * FROM snap_bench) TO STDOUT")
        .await?;
    futures_util::pin_mut!(stream);
    let mut bytes = 0usize;
    while let Some(chunk) = stream.next().await {
        bytes += chunk?.len();
    }
    Ok((t.elapsed().as_secs_f64(), bytes))
}

/// One walbridge initial snapshot of snap_bench through a new slot; returns the seconds from
/// start until walbridge confirms a position past the slot's consistent point, which is when
/// every snapshot row has been acked (a heartbeat after the snapshot; every 100 ms here).
async fn snapshot_run(
    client: &tokio_postgres::Client,
    dsn: &str,
    broker: &Broker,
    dir: &Path,
    slot: &str,
    discard: bool,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    let running = Running::start(
        dsn,
        &Target {
            slot,
            publication: "pub_snap",
            table: "snap_bench",
            snapshot: "initial",
            discard,
        },
        broker,
        &dir.join(format!("registry-{slot}")),
    )
    .await?;
    let consistent_point: Lsn = loop {
        let row = client
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?;
        if let Some(Some(l)) = row.map(|r| r.get::<_, Option<String>>(0)) {
            break l.parse()?;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    running.wait_for(Lsn(consistent_point.0 + 1)).await?;
    let secs = t.elapsed().as_secs_f64();
    running.stop().await?;
    Ok(secs)
}

/// walbridge's pipeline running in this process for one bench target.
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    confirmed: tokio::sync::watch::Receiver<Lsn>,
}

impl Running {
    async fn start(
        dsn: &str,
        target: &Target<'_>,
        broker: &Broker,
        registry_dir: &Path,
    ) -> anyhow::Result<Running> {
        let yaml = config_yaml(
            dsn,
            target,
            &broker.bootstrap(),
            crate::stack::free_port(),
            registry_dir,
        );
        let cfg = crate::config::from_str(&yaml, "bench").map_err(|e| anyhow::anyhow!("{e}"))?;
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (obs_tx, obs_rx) = tokio::sync::oneshot::channel();
        let handle = tokio::spawn(crate::pipeline::run_observed(
            cfg,
            async move {
                let _ = stop_rx.await;
            },
            crate::pipeline::Observe {
                confirmed: Some(obs_tx),
                discard: target.discard,
            },
        ));
        let confirmed = obs_rx.await.context("pipeline did not start")?;
        Ok(Running {
            stop,
            handle,
            confirmed,
        })
    }

    /// Waits until the pipeline has confirmed `lsn`.
    async fn wait_for(&self, lsn: Lsn) -> anyhow::Result<()> {
        let mut confirmed = self.confirmed.clone();
        while *confirmed.borrow_and_update() < lsn {
            confirmed
                .changed()
                .await
                .context("pipeline stopped before reaching the end of the load")?;
        }
        Ok(())
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.handle.await?
    }
}

/// A `/proc/self/status` field in KiB.
fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Drains `slot` up to `end` with pg_recvlogical; returns the seconds it took.
fn recv_logical(dsn: &str, slot: &str, end: &str) -> anyhow::Result<f64> {
    let t = Instant::now();
    let status =
        std::process::Command::new(crate::stack::postgres_bin_dir()?.join("pg_recvlogical"))
            .args([
                "-d",
                dsn,
                "--slot",
                slot,
                "--start",
                "-o",
                "proto_version=1",
                "-o",
            ])
            .arg("publication_names=bench")
            .args(["--endpos", end, "-f", "/dev/null", "--no-loop"])
            .status()
            .context("running pg_recvlogical")?;
    anyhow::ensure!(status.success(), "pg_recvlogical failed: {status}");
    Ok(t.elapsed().as_secs_f64())
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("walbridge-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
