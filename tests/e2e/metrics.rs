//! `walbridge run`'s metrics endpoint and `walbridge status`, against the real stack: the numbers
//! an operator reads must match what the database and the slot say.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use cdc::Lsn;
use walbridge::status::{Sample, parse};

use crate::harness::{TestDb, Walbridge};

async fn get(url: &str) -> Option<(u16, String)> {
    let resp = reqwest::get(url).await.ok()?;
    let code = resp.status().as_u16();
    Some((code, resp.text().await.ok()?))
}

async fn scrape(base: &str) -> Vec<Sample> {
    let (code, text) = get(&format!("{base}/metrics")).await.expect("scrape");
    assert_eq!(code, 200, "{text}");
    parse(&text)
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples
        .iter()
        .find(|s| s.name == name && want.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| s.value)
}

/// Polls until `check` holds for a scrape, or fails after 30 s with the last scrape.
async fn wait_for_scrape(
    base: &str,
    wb: &mut Walbridge,
    what: &str,
    check: impl Fn(&[Sample]) -> bool,
) -> Vec<Sample> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let samples = scrape(base).await;
        if check(&samples) {
            return samples;
        }
        assert!(
            wb.try_exit().is_none(),
            "walbridge exited; log:\n{}",
            wb.log()
        );
        assert!(
            Instant::now() < deadline,
            "{what} not seen in 30 s; last scrape: {samples:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_the_rows_written_and_the_slot_and_status_shows_them() {
    let mut db = TestDb::new("metrics").await;
    let port = walbridge::stack::free_port();
    db.metrics_listen = Some(format!("127.0.0.1:{port}"));
    let base = format!("http://127.0.0.1:{port}");
    let mut wb = db.start().await;

    // Ready once streaming; healthy throughout.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((200, body)) = get(&format!("{base}/ready")).await {
            assert!(body.contains("\"ready\""), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/ready not 200 in 30 s; log:\n{}",
            wb.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(&format!("{base}/health")).await.unwrap().0, 200);

    // 25 inserts in 5 transactions, then 7 updates of another table in one.
    for tx in 0..5 {
        let values: Vec<String> = (0..5)
            .map(|i| {
                let id = 920_000 + tx * 5 + i;
                format!("({id}, 'm{id}@example.com', 'M', 'N', 0)")
            })
            .collect();
        db.exec(&[&format!(
            "INSERT INTO oms.customers (id, email, first_name, last_name, loyalty_points) VALUES {}",
            values.join(", ")
        )])
        .await;
    }
    db.exec(&["UPDATE oms.customers SET loyalty_points = 1 WHERE id BETWEEN 920000 AND 920006"])
        .await;
    db.wait_caught_up(&mut wb).await;

    let samples = scrape(&base).await;
    let events = |op: &str| {
        value(
            &samples,
            "walbridge_events_total",
            &[("table", "oms.customers"), ("op", op)],
        )
    };
    assert_eq!(events("c"), Some(25.0), "inserts counted per table and op");
    assert_eq!(events("u"), Some(7.0), "updates counted per table and op");
    assert!(
        value(
            &samples,
            "walbridge_produced_bytes_total",
            &[("table", "oms.customers")]
        )
        .is_some_and(|b| b > 32.0 * 100.0),
        "32 Avro events of ~100+ bytes each"
    );
    assert!(
        value(&samples, "walbridge_commit_to_ack_seconds_count", &[]).is_some_and(|n| n >= 6.0),
        "every confirmed transaction is timed"
    );
    assert_eq!(
        value(&samples, "walbridge_kafka_delivery_errors_total", &[]),
        Some(0.0)
    );

    // The confirmed-LSN gauge agrees with the slot. Heartbeats keep both moving (the gauge a
    // status interval ahead of the slot), so compare until one read of each matches.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let slot = db.confirmed().await.expect("slot exists");
        let samples = scrape(&base).await;
        let gauge = value(&samples, "walbridge_confirmed_flush_lsn", &[]).map(|v| Lsn(v as u64));
        let received = value(&samples, "walbridge_received_lsn", &[]).map(|v| Lsn(v as u64));
        if gauge == Some(slot) {
            assert!(
                received >= gauge,
                "received {received:?} < confirmed {gauge:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "confirmed gauge {gauge:?} never matched the slot's confirmed_flush_lsn {slot}"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    // Retained WAL comes from the slot poller (every 5 s); the slot holds at most the WAL of
    // this test's small writes and the heartbeats.
    let samples = wait_for_scrape(&base, &mut wb, "slot facts", |s| {
        value(s, "walbridge_slot_wal_status", &[("status", "reserved")]) == Some(1.0)
    })
    .await;
    let retained = value(&samples, "walbridge_slot_retained_wal_bytes", &[]).unwrap();
    assert!(
        retained > 0.0 && retained < 256.0 * 1024.0 * 1024.0,
        "retained WAL {retained} bytes"
    );

    // The status command shows the slot and the table's line.
    let out = Command::new(env!("CARGO_BIN_EXE_walbridge"))
        .args(["status", "--url", &base])
        .output()
        .expect("run walbridge status");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("slot") && l.contains(&db.name)),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("ready") && l.contains("yes")),
        "{stdout}"
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("oms.customers "))
        .unwrap_or_else(|| panic!("no oms.customers row:\n{stdout}"));
    assert_eq!(
        row.split_whitespace().nth(2),
        Some("32"),
        "events column: {row}"
    );

    assert!(wb.stop().success());

    // Gone: status says so and fails.
    let out = Command::new(env!("CARGO_BIN_EXE_walbridge"))
        .args(["status", "--url", &base])
        .output()
        .expect("run walbridge status");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach walbridge at"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_progress_counts_every_copied_row() {
    let mut db = TestDb::new("metricsnap").await;
    db.snapshot = "initial";
    let port = walbridge::stack::free_port();
    db.metrics_listen = Some(format!("127.0.0.1:{port}"));
    let base = format!("http://127.0.0.1:{port}");
    let mut wb = db.start().await;
    db.wait_caught_up(&mut wb).await;
    let rows: i64 = db
        .client
        .query_one("SELECT count(*) FROM oms.customers", &[])
        .await
        .unwrap()
        .get(0);
    let samples = scrape(&base).await;
    let table = [("table", "oms.customers")];
    assert_eq!(
        value(&samples, "walbridge_snapshot_rows_copied", &table),
        Some(rows as f64)
    );
    assert_eq!(
        value(
            &samples,
            "walbridge_events_total",
            &[("table", "oms.customers"), ("op", "r")]
        ),
        Some(rows as f64)
    );
    assert!(
        value(&samples, "walbridge_snapshot_rows_estimate", &table).is_some(),
        "the planner's estimate is exported"
    );
    assert_eq!(value(&samples, "walbridge_ready", &[]), Some(1.0));
    assert!(wb.stop().success());
}
