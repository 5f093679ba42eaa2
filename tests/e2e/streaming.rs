//! Large transactions that Postgres streams while they are in progress (pgoutput protocol 2):
//! walbridge spills them and hands them on at commit, in commit order; aborted transactions
//! and rolled-back subtransactions leave nothing in Kafka.

use std::collections::HashSet;

use crate::harness::{self, TestDb, event_commit_lsn, field};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_transactions_arrive_whole_at_commit_and_aborted_ones_never() {
    let mut db = TestDb::new("streamtx").await;
    // A tiny decoding budget for walbridge's walsender, so a few thousand rows are streamed
    // as in-progress transactions (the default, 64 MB, would need millions).
    db.dsn = format!("{} options='-c logical_decoding_work_mem=64kB'", db.dsn);
    let wb = db.start().await;
    let connect = || async {
        let (c, conn) = tokio_postgres::connect(&db.dsn, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c
    };
    let (a, b) = (connect().await, connect().await);
    let insert = |from: i64, n: i64| {
        format!(
            "INSERT INTO oms.customers (id, email, first_name, last_name, loyalty_points) \
             SELECT g, 's' || g || '@example.com', repeat('F', 30), repeat('L', 30), 0 \
             FROM generate_series({from}, {}) g",
            from + n - 1
        )
    };
    // A: big, with a rolled-back savepoint in the middle; stays open while others commit.
    a.batch_execute(&format!(
        "BEGIN; {}; SAVEPOINT s; {}; ROLLBACK TO SAVEPOINT s; {}",
        insert(3_000_000, 5_000),
        insert(3_100_000, 2_000),
        insert(3_200_000, 1_000)
    ))
    .await
    .unwrap();
    // A small transaction commits while A is open: it must come first.
    b.batch_execute(&insert(5_000_000, 1)).await.unwrap();
    // B: big and aborted.
    b.batch_execute(&format!("BEGIN; {}; ROLLBACK", insert(4_000_000, 5_000)))
        .await
        .unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    let mut wb = wb;
    db.wait_caught_up(&mut wb).await;

    let topic = format!("{}.oms.customers", db.name);
    let events = db
        .events_until(|ev| {
            harness::has_inserts(ev, &topic, 3_000_000..3_005_000)
                && harness::has_inserts(ev, &topic, 3_200_000..3_201_000)
                && harness::has_inserts(ev, &topic, 5_000_000..5_000_001)
        })
        .await;
    let streamed: i64 = db
        .client
        .query_one(
            "SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(wb.stop().success());
    assert!(
        streamed >= 2,
        "Postgres streamed {streamed} transactions; the test needs A and B streamed"
    );

    let creates: Vec<_> = events
        .iter()
        .filter(|e| e.topic == topic && e.op() == Some("c"))
        .collect();
    let id = |e: &walbridge::tail::Event| field(e, "after", "id").and_then(|v| v.as_i64()).unwrap();
    let rolled_back: Vec<i64> = creates
        .iter()
        .map(|e| id(e))
        .filter(|i| (3_100_000..3_102_000).contains(i) || (4_000_000..4_005_000).contains(i))
        .collect();
    assert!(
        rolled_back.is_empty(),
        "rows of an aborted transaction or a rolled-back savepoint reached Kafka: {:?}",
        &rolled_back[..rolled_back.len().min(10)]
    );
    // A arrives as one transaction: one commit LSN, indexes 0..6000 each once, after the
    // small transaction that committed before it.
    let a_rows: Vec<_> = creates
        .iter()
        .filter(|e| (3_000_000..3_300_000).contains(&id(e)))
        .collect();
    assert_eq!(a_rows.len(), 6_000);
    let a_lsns: HashSet<_> = a_rows.iter().map(|e| event_commit_lsn(e)).collect();
    assert_eq!(a_lsns.len(), 1, "A's rows carry one commit LSN");
    let indexes: HashSet<u32> = a_rows
        .iter()
        .map(|e| harness::event_position(e).1)
        .collect();
    assert_eq!(
        indexes,
        (0..6_000).collect(),
        "A's rows keep their order in the transaction"
    );
    let small = creates.iter().find(|e| id(e) == 5_000_000).unwrap();
    assert!(event_commit_lsn(small) < *a_lsns.iter().next().unwrap());
}
