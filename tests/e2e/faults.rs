//! Fault injection: walbridge killed at random points, a broker that stalls (also through a
//! SIGTERM), a registry that goes away, and captured tables that sit idle while others churn.
//!
//! Every test ends with the check `walbridge verify` runs ([`walbridge::verify`], through
//! `TestDb::verify`): the state folded from the topic equals the table, every change arrived
//! (distinct event ids = changes written), and an id delivered twice carried the same change.
//!
//! Sizes are tuned so that the module takes about two to three minutes on 2 cores in a debug
//! build. Sleeps here are the faults' schedule (how long the broker stays stopped, when to kill),
//! never a wait for a result: results are waited for on the slot and on process exits.

use std::time::{Duration, Instant};

use crate::harness::{self, TestDb, proc_status_kib, signal};

/// splitmix64: a seeded sequence, so a failing kill schedule can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn assert_equal(report: &walbridge::verify::Report) {
    assert!(
        report.equal,
        "Kafka differs from the source:\n{}",
        report.render()
    );
}

/// Waits until the slot has no walsender, so that the confirmed position read next is the
/// last one the killed process reported (and the next start can take the slot).
async fn wait_slot_released(db: &TestDb) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let active: bool = db
            .client
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.name],
            )
            .await
            .unwrap()
            .get(0);
        if !active {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "slot still active 30 s after the kill"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Transactions of the kill test's workload: transaction `t` inserts 60 rows, updates 30 rows
/// of the previous transaction's and deletes 10 of the one before (ranges that always exist),
/// so the number of changes is known exactly.
const ITEMS_DDL: &str = "CREATE TABLE oms.fault_items (id bigint PRIMARY KEY, n int NOT NULL, \
     note text, amount numeric(12,2), flag bool, at timestamptz NOT NULL DEFAULT now())";

fn items_tx(t: i64) -> (String, u64) {
    let mut sql = format!(
        "BEGIN; INSERT INTO oms.fault_items (id, n, note, amount, flag) \
         SELECT g, 0, 'item ' || g, g * 0.25, g % 3 = 0 FROM generate_series({}, {}) g;",
        60 * t,
        60 * t + 59
    );
    let mut changes = 60;
    if t >= 1 {
        let base = 60 * (t - 1);
        sql += &format!(
            " UPDATE oms.fault_items SET n = n + 1, note = note || '+', amount = amount + 1, flag = NOT flag \
             WHERE id BETWEEN {} AND {};",
            base + 15,
            base + 44
        );
        changes += 30;
    }
    if t >= 2 {
        let base = 60 * (t - 2);
        sql += &format!(
            " DELETE FROM oms.fault_items WHERE id BETWEEN {base} AND {};",
            base + 9
        );
        changes += 10;
    }
    sql += " COMMIT;";
    (sql, changes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_loses_nothing_and_resends_only_unconfirmed_changes() {
    const TRANSACTIONS: i64 = 1002; // 100,150 changes
    const KILLS: usize = 10;
    let db = TestDb::new("fkill").await;
    db.exec(&[ITEMS_DDL]).await;
    let mut wb = db.start().await;
    let started = Instant::now();

    // The application: paced so that the kills fall in the middle of it.
    let writer = {
        let dsn = db.dsn.clone();
        tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            let start = tokio::time::Instant::now();
            let mut changes = 0;
            for t in 0..TRANSACTIONS {
                tokio::time::sleep_until(start + Duration::from_millis(22) * t as u32).await;
                let (sql, n) = items_tx(t);
                c.batch_execute(&sql).await.unwrap();
                changes += n;
            }
            changes
        })
    };

    let mut rng = Rng(0x5eed_fa17);
    let mut confirmed_at_kill = Vec::new();
    for _ in 0..KILLS {
        // Anywhere from just after START_REPLICATION to 2.5 s into streaming.
        tokio::time::sleep(Duration::from_millis(rng.next() % 2500)).await;
        if let Some(s) = wb.try_exit() {
            panic!("walbridge exited by itself ({s}):\n{}", wb.log());
        }
        wb.kill9();
        wait_slot_released(&db).await;
        confirmed_at_kill.push(db.confirmed().await.unwrap());
        wb = db.start().await;
    }
    let killing = started.elapsed();
    let written = writer.await.unwrap();
    assert!(written >= 100_000, "the workload made {written} changes");
    let report = db.verify(&["oms.fault_items"]).await;
    assert!(wb.stop().success());
    assert_equal(&report);
    let t = &report.tables[0];
    assert_eq!(
        t.distinct_event_ids, written,
        "every change arrived once or more"
    );
    let rows: i64 = db
        .client
        .query_one("SELECT count(*) FROM oms.fault_items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(t.rows, rows as u64);
    // A change is sent again only by a restart that found it unconfirmed: at most once per kill
    // whose confirmed position had not passed it. (Confirmed positions are commit ends, so
    // "not passed" is confirmed <= the commit's LSN.)
    for d in &t.duplicates.ids {
        let unconfirmed_at = confirmed_at_kill
            .iter()
            .filter(|c| **c <= d.commit_lsn)
            .count();
        assert!(
            (d.deliveries as usize) <= 1 + unconfirmed_at,
            "event {} delivered {} times, but only {unconfirmed_at} kill(s) found it unconfirmed (confirmed at kills: {confirmed_at_kill:?})",
            d.id,
            d.deliveries
        );
    }
    eprintln!(
        "kill -9 x{KILLS} over {killing:?}: {written} changes, {} duplicate deliveries of {} ids, total {:?}",
        t.duplicates.count,
        t.duplicates.ids.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_stalled_for_30_s_loses_nothing_and_memory_stays_bounded() {
    const ROWS: i64 = 1500;
    // 100 KiB of incompressible text per row: 150 MiB written while the broker is stopped,
    // far more than the bound below, so a pipeline that buffered without limit would exceed it.
    const ROW_KIB: i64 = 100;
    let mut db = TestDb::new("fstall").await;
    db.kafka_extra = "  max_in_flight_bytes: 16777216\n".into();
    db.exec(&[
        "CREATE TABLE oms.fault_blobs (id bigint PRIMARY KEY, body text)",
        // Stored as is, so the WAL and the messages carry the full size.
        "ALTER TABLE oms.fault_blobs ALTER COLUMN body SET STORAGE EXTERNAL",
    ])
    .await;
    let started = Instant::now();
    let insert = |from: i64, to: i64| {
        format!(
            "INSERT INTO oms.fault_blobs SELECT g, \
             (SELECT string_agg(md5(random()::text || i || g), '') FROM generate_series(1, {}) i) \
             FROM generate_series({from}, {to}) g",
            ROW_KIB * 32
        )
    };
    let mut wb = db.start().await;
    // Warm up: every code path that runs later has run once.
    db.exec(&[&insert(0, 19)]).await;
    db.wait_caught_up(&mut wb).await;
    let baseline_kib = proc_status_kib(wb.pid(), "VmRSS");

    db.broker.pause().unwrap();
    let paused = Instant::now();
    let writer = {
        let dsn = db.dsn.clone();
        let sql: Vec<String> = (0..ROWS / 10)
            .map(|i| insert(20 + i * 10, 29 + i * 10))
            .collect();
        tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            for s in sql {
                c.batch_execute(&s).await.unwrap();
            }
        })
    };
    let mut peak_kib = baseline_kib;
    while paused.elapsed() < Duration::from_secs(30) {
        if let Some(s) = wb.try_exit() {
            panic!(
                "walbridge exited while the broker was stopped ({s}):\n{}",
                wb.log()
            );
        }
        peak_kib = peak_kib.max(proc_status_kib(wb.pid(), "VmRSS"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writer.await.unwrap();
    db.broker.resume().unwrap();
    let report = db.verify(&["oms.fault_blobs"]).await;
    // The high-water mark covers the catch-up after the resume too.
    let hwm_kib = proc_status_kib(wb.pid(), "VmHWM");
    assert!(wb.stop().success());
    assert_equal(&report);
    assert_eq!(report.tables[0].rows, (ROWS + 20) as u64);
    assert_eq!(report.tables[0].distinct_event_ids, (ROWS + 20) as u64);
    // The bound: librdkafka's queue holds at most max_in_flight_bytes (16 MiB) of messages, and
    // may hold their bytes twice while building produce requests (32 MiB); the reader hands
    // over at most 8 batches of 1 MiB, each decoded row holding its WAL bytes (8 MiB); 8 MiB
    // for the row being encoded and allocator slack. 48 MiB above the idle process (measured:
    // about 19 MiB), against 150 MiB written behind the stalled broker.
    let growth_mib = (hwm_kib.max(peak_kib) - baseline_kib) / 1024;
    eprintln!(
        "broker stalled 30 s: RSS baseline {} MiB, peak while stalled {} MiB, high-water mark {} MiB; total {:?}",
        baseline_kib / 1024,
        peak_kib / 1024,
        hwm_kib / 1024,
        started.elapsed()
    );
    assert!(
        hwm_kib.max(peak_kib) < 256 * 1024,
        "walbridge's RSS reached {} MiB",
        hwm_kib.max(peak_kib) / 1024
    );
    assert!(
        growth_mib < 48,
        "walbridge's RSS grew by {growth_mib} MiB while {} MiB were written behind a stalled broker",
        ROWS * ROW_KIB / 1024
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_outage_during_a_new_table_is_retried_and_loses_nothing() {
    let started = Instant::now();
    let mut db = TestDb::new("fregistry").await;
    let mut registry = harness::Registry::start(&db.dir.join("registry"));
    db.registry_url = registry.url();
    db.exec(&[
        "CREATE TABLE oms.fault_orders (id bigint PRIMARY KEY, total numeric(12,2), placed date)",
    ])
    .await;
    let mut wb = db.start().await;
    let orders = |from: i64, n: i64| {
        format!(
            "INSERT INTO oms.fault_orders SELECT g, g * 1.5, date '2024-01-01' + (g % 300)::int \
             FROM generate_series({from}, {}) g",
            from + n - 1
        )
    };
    db.exec(&[&orders(0, 100)]).await;
    db.wait_caught_up(&mut wb).await;

    registry.down();
    // Changes of a known table, then a table walbridge has to register a schema for.
    db.exec(&[
        &orders(100, 100),
        "CREATE TABLE oms.fault_new (id bigint PRIMARY KEY, label text)",
        "INSERT INTO oms.fault_new SELECT g, 'new ' || g FROM generate_series(1, 200) g",
        &orders(200, 100),
    ])
    .await;
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(10) {
        if let Some(s) = wb.try_exit() {
            panic!(
                "walbridge gave up while the registry was down ({s}):\n{}",
                wb.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    registry.up();
    let report = db.verify(&["oms.fault_orders", "oms.fault_new"]).await;
    let log = wb.log();
    assert!(wb.stop().success());
    let retries = log
        .matches("transient failure; restarting the pipeline")
        .count();
    assert!(
        retries >= 2,
        "expected retries with backoff while the registry was down, saw {retries}:\n{log}"
    );
    // The retries say where to look (tests/bad-input.md case 71).
    assert!(
        log.contains("check registry.url and that the registry is up"),
        "the retries do not say what to check:\n{log}"
    );
    assert_equal(&report);
    assert_eq!(report.tables[0].distinct_event_ids, 300);
    assert_eq!(report.tables[1].distinct_event_ids, 200);
    eprintln!(
        "registry down 10 s: {retries} retries; total {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublished_churn_does_not_make_the_idle_slot_retain_wal() {
    // 120 MiB of WAL, paced at about 2.5 MiB/s. Postgres moves a slot's restart_lsn only at a
    // running-transactions record, and when a transaction is open at that record, only back to
    // the record before it. The background writer logs one every 15 s, so on its own a slot
    // confirmed up to its last heartbeat still retains up to about 30 s of WAL (75 MiB here,
    // seen on CI). A CHECKPOINT also logs one, so the test issues one every 8 MiB, between its
    // own transactions: then a slot that keeps up retains about 16 MiB, and one held back
    // retains everything written. 64 MiB tells the two apart with room for a slow machine.
    const TOTAL_MIB: u64 = 120;
    const MIB_PER_S: f64 = 2.5;
    let started = Instant::now();
    let db = TestDb::with_own_postgres("fchurn").await;
    db.exec(&["CREATE TABLE public.churn (id int, pad text)"])
        .await;
    let mut wb = db.start().await;
    let begin = db.current_lsn().await;
    let t0 = Instant::now();
    let mut max_retained = 0u64;
    let mut step = 0;
    let mut next_checkpoint = 8u64 << 20;
    loop {
        let written = db.current_lsn().await.0 - begin.0;
        if written >= TOTAL_MIB << 20 {
            break;
        }
        if written >= next_checkpoint {
            db.exec(&["CHECKPOINT"]).await;
            next_checkpoint = written + (8 << 20);
        }
        // Pace: no more than MIB_PER_S on average.
        let due = Duration::from_secs_f64(written as f64 / f64::from(1 << 20) / MIB_PER_S);
        if let Some(wait) = due.checked_sub(t0.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        db.exec(&["INSERT INTO public.churn SELECT g, repeat(md5(g::text), 16) FROM generate_series(1, 1000) g"])
            .await;
        step += 1;
        if step % 20 == 0 {
            db.exec(&["TRUNCATE public.churn"]).await;
        }
        let retained: i64 = db
            .client
            .query_one(
                "SELECT (pg_current_wal_lsn() - restart_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.name],
            )
            .await
            .unwrap()
            .get(0);
        max_retained = max_retained.max(retained as u64);
        if let Some(s) = wb.try_exit() {
            panic!("walbridge exited ({s}):\n{}", wb.log());
        }
    }
    let end = db.current_lsn().await;
    db.wait_confirmed(end, &mut wb).await;
    assert!(wb.stop().success());
    eprintln!(
        "unpublished churn: {} MiB of WAL in {:?}, slot retained at most {} MiB; total {:?}",
        (end.0 - begin.0) >> 20,
        t0.elapsed(),
        max_retained >> 20,
        started.elapsed()
    );
    assert!(
        max_retained < 64 << 20,
        "the slot retained {} MiB of WAL while only an unpublished table changed",
        max_retained >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_behind_a_stalled_broker_exits_within_the_shutdown_timeout_and_loses_nothing() {
    let started = Instant::now();
    let mut db = TestDb::new("fstop").await;
    db.source_extra = "  shutdown_timeout_ms: 3000\n".into();
    db.exec(&["CREATE TABLE oms.fault_stop (id bigint PRIMARY KEY, note text)"])
        .await;
    let mut wb = db.start().await;
    db.exec(&["INSERT INTO oms.fault_stop SELECT g, 'before' FROM generate_series(1, 10) g"])
        .await;
    db.wait_caught_up(&mut wb).await;

    db.broker.pause().unwrap();
    for i in 11..=110 {
        db.exec(&[&format!(
            "INSERT INTO oms.fault_stop VALUES ({i}, 'stalled')"
        )])
        .await;
    }
    // walbridge has read them (its reported write position passed them): they are in flight.
    let end = db.current_lsn().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let received: Option<String> = db
            .client
            .query_one(
                "SELECT max(write_lsn)::text FROM pg_stat_replication r JOIN pg_replication_slots s \
                 ON s.active_pid = r.pid WHERE s.slot_name = $1",
                &[&db.name],
            )
            .await
            .unwrap()
            .get(0);
        if received
            .and_then(|r| r.parse::<cdc::Lsn>().ok())
            .is_some_and(|r| r >= end)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "walbridge did not read the changes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let term = Instant::now();
    signal(wb.pid(), "TERM");
    let status = wb.wait(Duration::from_secs(3 + 10));
    let took = term.elapsed();
    let log = wb.log();
    assert!(
        !status.success(),
        "an unfinished drain must not exit 0:\n{log}"
    );
    assert!(
        log.contains("still in flight to Kafka") && log.contains("sent again on the next start"),
        "the exit says what was left and what happens to it:\n{log}"
    );
    assert!(
        log.contains("source.shutdown_timeout_ms (3000 ms)"),
        "names the setting:\n{log}"
    );

    db.broker.resume().unwrap();
    let wb = db.start().await;
    let report = db.verify(&["oms.fault_stop"]).await;
    assert!(wb.stop().success());
    assert_equal(&report);
    assert_eq!(report.tables[0].distinct_event_ids, 110);
    eprintln!(
        "SIGTERM behind a stalled broker: exited {status} after {took:?}; total {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_rows_that_a_recreated_slot_never_streamed() {
    let db = TestDb::new("fverify").await;
    db.exec(&["CREATE TABLE oms.fault_gap (id bigint PRIMARY KEY, qty int, price numeric, tags text[], seen timestamp)"])
        .await;
    let mut wb = db.start().await;
    db.exec(&[
        "INSERT INTO oms.fault_gap SELECT g, g, g / 7.0, ARRAY['a', 'b ' || g], timestamp '2024-05-01' + g * interval '1 minute' \
         FROM generate_series(1, 50) g",
        "UPDATE oms.fault_gap SET qty = qty * 2 WHERE id <= 10",
    ])
    .await;
    db.wait_caught_up(&mut wb).await;
    let config = db.write_config();
    let verify = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_walbridge"))
            .args(["verify", "-c"])
            .arg(&config)
            .args(["--table", "oms.fault_gap"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = tokio::task::block_in_place(|| verify(&[]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Kafka matches the source"), "{stdout}");
    assert!(wb.stop().success());

    // The slot is dropped and recreated without a snapshot: what was committed in between
    // reaches no topic. verify names it.
    db.exec(&[
        &format!("SELECT pg_drop_replication_slot('{}')", db.name),
        "INSERT INTO oms.fault_gap VALUES (51, 1, 1, '{}', now())",
        "UPDATE oms.fault_gap SET qty = -1 WHERE id = 3",
        "DELETE FROM oms.fault_gap WHERE id = 4",
    ])
    .await;
    let wb = db.start().await;
    let out = tokio::task::block_in_place(|| verify(&["--json"]));
    let human = tokio::task::block_in_place(|| verify(&[]));
    assert!(wb.stop().success());
    let text = String::from_utf8_lossy(&human.stdout);
    eprintln!("{text}");
    assert_eq!(human.status.code(), Some(1), "{text}");
    for needle in [
        "DIFFERENT",
        "1 key(s) in the table but not in Kafka: {\"id\":51}",
        "1 key(s) in Kafka but not in the table: {\"id\":4}",
        "{\"id\":3}: qty",
    ] {
        assert!(text.contains(needle), "{needle:?} not in:\n{text}");
    }
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    let t = &json["tables"][0];
    assert_eq!(json["equal"], false);
    assert_eq!(t["lost"]["count"], 1);
    assert_eq!(t["lost"]["sample"][0]["id"], 51);
    assert_eq!(t["extra"]["count"], 1);
    assert_eq!(t["extra"]["sample"][0]["id"], 4);
    assert_eq!(t["mismatched"]["count"], 1);
    assert_eq!(t["mismatched"]["sample"][0]["key"]["id"], 3);
    assert_eq!(
        t["mismatched"]["sample"][0]["columns"],
        serde_json::json!(["qty"])
    );
    assert_eq!(
        t["not_compared"],
        serde_json::json!([]),
        "every column type here is compared"
    );
}
