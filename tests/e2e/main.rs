//! End-to-end tests: the legacy database, walbridge as a process, the tansu broker and the
//! registry, all real. See `harness.rs` for how the stack is shared and how tests wait.

mod bad_input;
mod confluent_client;
mod dlq;
mod doctor;
mod events;
mod faults;
mod harness;
mod metrics;
mod replication;
mod sasl;
mod schema_change;
mod snapshot;
mod sql_sinks;
mod streaming;
mod telemetry;
mod tls;
mod types;
mod views;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Command;
use std::time::Duration;

use harness::{TestDb, event_commit_lsn, field, shared};
use walbridge::tail::Event;

fn topic(db: &TestDb, table: &str) -> String {
    format!("{}.{table}", db.name)
}

fn on<'a>(events: &'a [Event], topic: &str) -> Vec<&'a Event> {
    events
        .iter()
        .filter(|e| e.topic == topic && e.value.is_some())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_updates_deletes_and_truncates_arrive_with_before_and_after() {
    let db = TestDb::new("changes").await;
    let mut wb = db.start().await;
    db.client
        .batch_execute(
            "INSERT INTO oms.customers (id, email, first_name, last_name, loyalty_points)
               VALUES (900001, 'ada@example.com', 'Ada', 'Lovelace', 10);
             UPDATE oms.customers SET loyalty_points = 25, city = 'London' WHERE id = 900001;
             UPDATE oms.customers SET id = 900002 WHERE id = 900001;
             DELETE FROM oms.customers WHERE id = 900002;
             UPDATE oms.prices SET price = 12.34 WHERE sku = (SELECT min(sku) FROM oms.prices) AND currency = 'EUR';
             TRUNCATE wms.stock_movements;",
        )
        .await
        .unwrap();
    db.wait_caught_up(&mut wb).await;
    // Complete when the last change of each table is there.
    let (tc, tm) = (
        topic(&db, "oms.customers"),
        topic(&db, "wms.stock_movements"),
    );
    let events = db
        .events_until(|ev| {
            ev.iter().any(|e| e.topic == tm && e.op() == Some("t"))
                && ev.iter().any(|e| e.topic == tc && e.value.is_none())
                && ev.iter().any(|e| e.topic.ends_with("oms.prices"))
        })
        .await;

    // Two keys (900001, 900002) live on different partitions; commit order across them is the
    // event id's order (commit LSN, then position in the transaction).
    let mut customers: Vec<&Event> = on(&events, &topic(&db, "oms.customers"))
        .into_iter()
        .filter(|e| {
            [field(e, "before", "id"), field(e, "after", "id")]
                .iter()
                .flatten()
                .any(|v| v.as_i64().is_some_and(|id| id >= 900001))
        })
        .collect();
    customers.sort_by_key(|e| harness::event_position(e));
    let ops: Vec<&str> = customers.iter().map(|e| e.op().unwrap()).collect();
    // insert, update, key change (delete old key + create new key), delete
    assert_eq!(ops, ["c", "u", "d", "c", "d"], "ops in commit order");
    let c = customers[0];
    assert_eq!(field(c, "after", "email").unwrap(), "ada@example.com");
    assert!(
        field(c, "before", "id").is_none(),
        "an insert has no before"
    );
    let u = customers[1];
    assert_eq!(field(u, "after", "loyalty_points").unwrap(), 25);
    assert_eq!(field(u, "after", "city").unwrap(), "London");
    assert_eq!(
        field(customers[2], "before", "id").unwrap(),
        900001,
        "old key deleted"
    );
    assert_eq!(
        field(customers[3], "after", "id").unwrap(),
        900002,
        "new key created"
    );
    let d = customers[4];
    assert_eq!(field(d, "before", "id").unwrap(), 900002);
    assert!(field(d, "after", "id").is_none(), "a delete has no after");
    assert_eq!(d.value.as_ref().unwrap()["source"]["table"], "customers");
    assert_eq!(d.value.as_ref().unwrap()["source"]["schema"], "oms");
    // The key is the primary key, as Avro.
    assert_eq!(d.key.as_ref().unwrap()["id"], 900002);
    // Headers: the source transaction (one batch, one transaction), a W3C trace per
    // transaction with its one span, the value's schema id, and the event type.
    let tx = format!(
        "{}:{}",
        c.headers["walbridge.txid"], c.headers["walbridge.lsn"]
    );
    let traces: Vec<Vec<&str>> = customers
        .iter()
        .map(|e| e.headers["traceparent"].split('-').collect())
        .collect();
    for (e, t) in customers.iter().zip(&traces) {
        assert_eq!(e.headers["walbridge.correlation_id"], tx);
        assert_eq!(e.headers["walbridge.causation_id"], tx);
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        assert!(
            t.len() == 4 && t[0] == "00" && hex(t[1], 32) && hex(t[2], 16) && t[3] == "01",
            "traceparent {:?}",
            e.headers["traceparent"]
        );
        assert_eq!(t[1], traces[0][1], "one trace id per transaction");
    }
    let spans: HashSet<&str> = traces.iter().map(|t| t[2]).collect();
    assert_eq!(
        spans.len(),
        1,
        "one span per transaction (the one OTLP exports)"
    );
    let types: Vec<&str> = customers
        .iter()
        .map(|e| e.headers["walbridge.event_type"].as_str())
        .collect();
    assert_eq!(
        types,
        [
            "oms.customers.c",
            "oms.customers.u",
            "oms.customers.d",
            "oms.customers.c",
            "oms.customers.d"
        ]
    );
    let latest: serde_json::Value = serde_json::from_str(
        &reqwest::get(format!(
            "{}/subjects/{}-value/versions/latest",
            db.registry_url,
            topic(&db, "oms.customers")
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap(),
    )
    .unwrap();
    assert_eq!(c.headers["walbridge.schema_id"], latest["id"].to_string());
    // Debezium tombstone after a delete, same key.
    let tomb = events.iter().find(|e| {
        e.topic == topic(&db, "oms.customers")
            && e.value.is_none()
            && e.key.as_ref().is_some_and(|k| k["id"] == 900002)
    });
    assert!(tomb.is_some(), "tombstone after delete");

    let price = on(&events, &topic(&db, "oms.prices"));
    assert_eq!(price.len(), 1);
    assert_eq!(field(price[0], "after", "price").unwrap(), "12.34");
    let trunc = on(&events, &topic(&db, "wms.stock_movements"));
    assert_eq!(
        trunc.iter().map(|e| e.op().unwrap()).collect::<Vec<_>>(),
        ["t"]
    );

    // Event ids are unique and carry the commit LSN.
    let ids: HashSet<&str> = events
        .iter()
        .filter(|e| e.value.is_some())
        .map(|e| e.event_id().unwrap())
        .collect();
    assert_eq!(
        ids.len(),
        events.iter().filter(|e| e.value.is_some()).count()
    );
    assert!(wb.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_of_one_key_stay_in_commit_order() {
    let mut db = TestDb::new("keyorder").await;
    // Topics spread over three producers (kafka.connections): each topic keeps its own, so its
    // keys stay in order even though the two tables' changes share every transaction.
    db.kafka_extra = "  connections: 3\n".into();
    let mut wb = db.start().await;
    // 20 customers and 20 products, each updated 15 times, interleaved across transactions.
    for round in 1..=15 {
        db.client
            .batch_execute(&format!(
                "BEGIN; UPDATE oms.customers SET loyalty_points = {round} WHERE id <= 20; \
                 UPDATE oms.products SET weight_grams = {round} \
                 WHERE sku IN (SELECT sku FROM oms.products ORDER BY sku LIMIT 20); COMMIT"
            ))
            .await
            .unwrap();
    }
    db.wait_caught_up(&mut wb).await;
    let (t, tp) = (topic(&db, "oms.customers"), topic(&db, "oms.products"));
    let events = db
        .events_until(|ev| {
            ev.iter().filter(|e| e.topic == t).count() >= 300
                && ev.iter().filter(|e| e.topic == tp).count() >= 300
        })
        .await;
    let mut per_key: BTreeMap<String, Vec<(i32, i64, i64)>> = BTreeMap::new();
    for (table, col) in [
        ("oms.customers", "loyalty_points"),
        ("oms.products", "weight_grams"),
    ] {
        for e in on(&events, &topic(&db, table)) {
            let key = format!("{table} {}", e.key.as_ref().unwrap());
            let v = field(e, "after", col).unwrap().as_i64().unwrap();
            per_key
                .entry(key)
                .or_default()
                .push((e.partition, e.offset, v));
        }
    }
    assert_eq!(per_key.len(), 40, "{:?}", per_key.keys());
    for (id, seen) in per_key {
        let partitions: HashSet<i32> = seen.iter().map(|s| s.0).collect();
        assert_eq!(
            partitions.len(),
            1,
            "key {id} spread over partitions {partitions:?}"
        );
        let mut by_offset = seen.clone();
        by_offset.sort_by_key(|s| s.1);
        let values: Vec<i64> = by_offset.iter().map(|s| s.2).collect();
        assert_eq!(
            values,
            (1..=15).collect::<Vec<i64>>(),
            "key {id} out of commit order"
        );
    }
    assert!(wb.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_by_puts_every_record_of_a_sku_in_one_partition_across_tables() {
    let mut db = TestDb::new("routing").await;
    db.snapshot = "initial";
    db.kafka_extra = "  partition_by:\n    wms.stock_levels: [sku]\n    oms.inventory_cache: [sku]\n    oms.products: [sku]\n".into();
    let mut wb = db.start().await;
    // Streamed changes (the snapshot copied every row before them), a delete among them.
    db.client
        .batch_execute(
            "UPDATE wms.stock_levels SET on_hand = on_hand + 1 \
               WHERE sku IN (SELECT sku FROM oms.products ORDER BY sku LIMIT 30); \
             UPDATE oms.inventory_cache SET available = available + 1 \
               WHERE sku IN (SELECT sku FROM oms.products ORDER BY sku LIMIT 30); \
             UPDATE oms.products SET weight_grams = 1 \
               WHERE sku IN (SELECT sku FROM oms.products ORDER BY sku LIMIT 30); \
             DELETE FROM wms.stock_levels \
               WHERE (sku, location_code) IN (SELECT sku, location_code FROM wms.stock_levels ORDER BY 1, 2 LIMIT 1)",
        )
        .await
        .unwrap();
    db.wait_caught_up(&mut wb).await;
    let topics = [
        topic(&db, "wms.stock_levels"),
        topic(&db, "oms.inventory_cache"),
        topic(&db, "oms.products"),
    ];
    let updates = |ev: &[Event], t: &str| {
        ev.iter()
            .filter(|e| e.topic == t && e.op() == Some("u"))
            .count()
    };
    let tombstone = |ev: &[Event]| ev.iter().any(|e| e.topic == topics[0] && e.value.is_none());
    let events = db
        .events_until(|ev| {
            topics.iter().all(|t| updates(ev, t) > 0)
                && updates(ev, &topics[2]) >= 30
                && tombstone(ev)
        })
        .await;
    assert!(wb.stop().success());
    // sku -> (partition, where it was seen)
    let mut placed: BTreeMap<String, (i32, String)> = BTreeMap::new();
    let mut checked = 0;
    for e in events.iter().filter(|e| topics.contains(&e.topic)) {
        let sku = e.key.as_ref().unwrap()["sku"].as_str().unwrap().to_owned();
        let seen = format!("{} offset {} op {:?}", e.topic, e.offset, e.op());
        let want = sinks::kafka::partition_for(sku.as_bytes(), 3);
        assert_eq!(
            e.partition, want,
            "{seen}: sku {sku} is in partition {} but routes to {want}",
            e.partition
        );
        if let Some((p, first)) = placed.get(&sku) {
            assert_eq!(
                *p, e.partition,
                "sku {sku}: {first} and {seen} in different partitions"
            );
        } else {
            placed.insert(sku, (e.partition, seen));
        }
        checked += 1;
    }
    let used: HashSet<i32> = placed.values().map(|(p, _)| *p).collect();
    assert_eq!(used.len(), 3, "200 SKUs spread over all 3 partitions");
    assert!(
        checked > 1000,
        "snapshot and stream records checked: {checked}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_by_a_non_key_column_moves_the_row_with_a_delete_and_a_create() {
    let mut db = TestDb::new("routemove").await;
    db.exec(&["ALTER TABLE oms.orders REPLICA IDENTITY FULL"])
        .await;
    db.kafka_extra = "  partition_by:\n    oms.orders: [customer_id]\n".into();
    let mut wb = db.start().await;
    let part = |customer: i64| sinks::kafka::partition_for(customer.to_string().as_bytes(), 3);
    let row = db
        .client
        .query_one(
            "SELECT id, customer_id FROM oms.orders ORDER BY id LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    let (order, from): (i64, i64) = (row.get(0), row.get(1));
    let to = (1..=300)
        .find(|c| part(*c) != part(from))
        .expect("a customer routed elsewhere");
    // An update that keeps the customer stays an update; one that changes it moves the row.
    db.client
        .batch_execute(&format!(
            "UPDATE oms.orders SET channel = 'phone' WHERE id = {order}; \
             UPDATE oms.orders SET customer_id = {to} WHERE id = {order}"
        ))
        .await
        .unwrap();
    db.wait_caught_up(&mut wb).await;
    let t = topic(&db, "oms.orders");
    let mine =
        |e: &&Event| e.topic == t && e.key.as_ref().and_then(|k| k["id"].as_i64()) == Some(order);
    let events = db
        .events_until(|ev| ev.iter().filter(mine).count() >= 4)
        .await;
    assert!(wb.stop().success());
    let mut seen: Vec<&Event> = events.iter().filter(mine).collect();
    // Partitions are read side by side: order by commit position, then offset.
    seen.sort_by_key(|e| (harness::event_position(e), e.offset, e.value.is_none()));
    let shape: Vec<(Option<&str>, i32)> = seen.iter().map(|e| (e.op(), e.partition)).collect();
    assert_eq!(
        shape,
        [
            (Some("u"), part(from)),
            (Some("d"), part(from)),
            (None, part(from)),
            (Some("c"), part(to)),
        ],
        "update, then delete + tombstone in the old partition, then create in the new one"
    );
    assert_eq!(
        field(seen[1], "before", "customer_id").and_then(|v| v.as_i64()),
        Some(from)
    );
    assert_eq!(
        field(seen[3], "after", "customer_id").and_then(|v| v.as_i64()),
        Some(to)
    );
    assert_ne!(
        seen[1].event_id(),
        seen[3].event_id(),
        "the delete and the create are two events"
    );
}

/// Inserts `n` customers with ids from `first`, one transaction each.
async fn insert_customers(db: &TestDb, first: i64, n: i64) {
    for id in first..first + n {
        db.client
            .execute(
                "INSERT INTO oms.customers (id, email, first_name, last_name) VALUES ($1, 'x@example.com', 'X', 'Y')",
                &[&id],
            )
            .await
            .unwrap();
    }
}

fn inserted_ids(events: &[Event], topic: &str) -> Vec<i64> {
    events
        .iter()
        .filter(|e| e.topic == topic && e.op() == Some("c"))
        .filter_map(|e| field(e, "after", "id")?.as_i64())
        .filter(|id| *id >= 1_000_000)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_stop_and_restart_loses_nothing_and_duplicates_nothing() {
    let db = TestDb::new("restart").await;
    let mut wb = db.start().await;
    insert_customers(&db, 1_000_000, 200).await;
    db.wait_caught_up(&mut wb).await;
    assert!(wb.stop().success(), "SIGTERM exits 0");
    // Written while walbridge is down.
    insert_customers(&db, 1_000_200, 200).await;
    let mut wb = db.start().await;
    db.wait_caught_up(&mut wb).await;
    assert!(wb.stop().success());

    let t = topic(&db, "oms.customers");
    let events = db
        .events_until(|e| harness::has_inserts(e, &t, 1_000_000..1_000_400))
        .await;
    let mut ids = inserted_ids(&events, &t);
    let n = ids.len();
    ids.sort();
    ids.dedup();
    harness::assert_same_ids(&ids, 1_000_000..1_000_400, "every change arrived");
    assert_eq!(n, 400, "no change arrived twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing_and_duplicates_only_unacked_changes() {
    let db = TestDb::new("kill9").await;
    let mut wb = db.start().await;
    insert_customers(&db, 1_000_000, 50).await;
    let first = db.current_lsn().await;
    db.wait_confirmed(first, &mut wb).await;
    // Keep writing while walbridge is killed.
    let writer = {
        let dsn = db.dsn.clone();
        tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            for id in 1_000_050..1_003_000i64 {
                c.execute(
                    "INSERT INTO oms.customers (id, email, first_name, last_name) VALUES ($1, 'k@example.com', 'K', 'L')",
                    &[&id],
                )
                .await
                .unwrap();
            }
        })
    };
    // Kill once the writer is well under way and walbridge has confirmed some of it.
    loop {
        let c = db.confirmed().await.unwrap();
        if c > first {
            break;
        }
        if let Some(s) = wb.try_exit() {
            panic!("walbridge exited early: {s}\n{}", wb.log());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wb.kill9();
    let confirmed_at_kill = db.confirmed().await.unwrap();
    writer.await.unwrap();

    let mut wb = db.start().await;
    db.wait_caught_up(&mut wb).await;
    assert!(wb.stop().success());

    let t = topic(&db, "oms.customers");
    let events = db
        .events_until(|e| harness::has_inserts(e, &t, 1_000_000..1_003_000))
        .await;
    let mut ids = inserted_ids(&events, &t);
    ids.sort();
    let total = ids.len();
    ids.dedup();
    harness::assert_same_ids(&ids, 1_000_000..1_003_000, "no change lost");
    let mut seen: HashMap<&str, &Event> = HashMap::new();
    let mut dups = 0;
    for e in events.iter().filter(|e| e.topic == t && e.value.is_some()) {
        if let Some(prev) = seen.insert(e.event_id().unwrap(), e) {
            dups += 1;
            assert!(
                event_commit_lsn(e) > confirmed_at_kill,
                "event {} was confirmed ({confirmed_at_kill}) before the kill yet delivered twice \
                 (partition {} offsets {} and {})",
                e.event_id().unwrap(),
                e.partition,
                prev.offset,
                e.offset
            );
            assert_eq!(prev.key, e.key, "a duplicate is the same change");
            assert_eq!(field(prev, "after", "id"), field(e, "after", "id"));
        }
    }
    assert_eq!(
        total - ids.len(),
        dups,
        "every duplicate is recognisable by its event id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_broker_holds_back_the_slot_and_nothing_is_lost() {
    let db = TestDb::new("paused").await;
    let broker = &db.broker;
    let mut wb = db.start().await;
    insert_customers(&db, 1_000_000, 20).await;
    let before = db.current_lsn().await;
    db.wait_confirmed(before, &mut wb).await;

    broker.pause().unwrap();
    insert_customers(&db, 1_000_020, 100).await;
    let end = db.current_lsn().await;
    // For a few status intervals (100 ms each), the slot must not pass the un-acked changes.
    for _ in 0..30 {
        let c = db.confirmed().await.unwrap();
        assert!(
            c < end,
            "slot confirmed {c} while the broker was paused (end {end})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.resume().unwrap();
    db.wait_confirmed(end, &mut wb).await;
    assert!(wb.stop().success());
    let t = topic(&db, "oms.customers");
    let events = db
        .events_until(|e| harness::has_inserts(e, &t, 1_000_000..1_000_120))
        .await;
    let mut ids = inserted_ids(&events, &t);
    ids.sort();
    ids.dedup();
    harness::assert_same_ids(&ids, 1_000_000..1_000_120, "all arrived after resume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_is_refused_before_anything_starts() {
    let s = shared();
    let broker = walbridge::stack::Broker::start().expect("start tansu broker");
    let db_dsn = s.pg.dsn("postgres");
    let dir = harness::scratch("badcfg");
    let good = format!(
        "source:\n  dsn: \"{db_dsn}\"\n  publication: badcfg\n  slot: badcfg_slot\n  tables: [oms.orders]\n\
         kafka:\n  brokers: \"{}\"\n  topic_prefix: badcfg\n\
         registry:\n  url: \"{}\"\n",
        broker.bootstrap(),
        s.registry_url
    );
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown key",
            good.replace("topic_prefix", "topic_prefx"),
            "topic_prefx",
        ),
        (
            "bad broker list",
            good.replace(&broker.bootstrap(), "localhost"),
            "kafka.brokers",
        ),
        (
            "bad table name",
            good.replace("[oms.orders]", "[orders]"),
            "source.tables",
        ),
        (
            "missing registry",
            good.split("registry:").next().unwrap().to_owned(),
            "registry",
        ),
        ("not yaml", "source: [unclosed\n".to_owned(), "bad.yaml:1:"),
    ];
    for (what, yaml, needle) in cases {
        let path = dir.join("bad.yaml");
        std::fs::write(&path, yaml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_walbridge"))
            .args(["run", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: exit status {}", out.status);
        assert!(
            stderr.contains(needle),
            "{what}: stderr does not name {needle:?}:\n{stderr}"
        );
        assert!(
            stderr.contains("bad.yaml"),
            "{what}: stderr does not name the file:\n{stderr}"
        );
    }
    // Nothing was started: no slot was created.
    let (c, conn) = tokio_postgres::connect(&db_dsn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'badcfg_slot'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "a bad config must not create a slot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_stream_reconnects_and_loses_nothing() {
    let mut db = TestDb::with_own_postgres("pgrestart").await;
    let mut wb = db.start().await;
    insert_customers(&db, 1_000_000, 100).await;
    db.wait_caught_up(&mut wb).await;
    let confirmed_before = db.confirmed().await.unwrap();
    db.wait_position_file(confirmed_before, &mut wb).await;
    // Committed but not necessarily confirmed when Postgres goes down.
    insert_customers(&db, 1_000_100, 100).await;
    db.restart_postgres().await;
    insert_customers(&db, 1_000_200, 100).await;
    // walbridge must reconnect by itself: wait_caught_up fails if it exits.
    db.wait_caught_up(&mut wb).await;
    assert!(
        wb.log().contains("restarting the pipeline"),
        "the log says what happened:\n{}",
        wb.log()
    );
    assert!(wb.stop().success());
    let t = topic(&db, "oms.customers");
    let events = db
        .events_until(|e| harness::has_inserts(e, &t, 1_000_000..1_000_300))
        .await;
    let mut ids = inserted_ids(&events, &t);
    ids.sort();
    let first_batch = ids.iter().filter(|id| **id < 1_000_100).count();
    ids.dedup();
    harness::assert_same_ids(&ids, 1_000_000..1_000_300, "all changes across the restart");
    // Postgres 15 rewinds the slot on restart (confirmed_flush is not persisted); walbridge's own
    // position record keeps what was confirmed before the restart from being sent again.
    assert_eq!(
        first_batch, 100,
        "changes confirmed before the restart were sent again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_record_of_another_server_is_refused() {
    let db = TestDb::new("otherserver").await;
    let state = db.dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let file = state.join("otherserver.position");
    std::fs::write(
        &file,
        "system_identifier=1\ndatabase=otherserver\nslot=otherserver\nconfirmed_lsn=0/0\n",
    )
    .unwrap();
    let mut wb = harness::Walbridge::start(&db.write_config(), &db.dir.join("walbridge.log"));
    let status = wb.wait(Duration::from_secs(60));
    assert!(
        !status.success(),
        "walbridge must refuse another server's position"
    );
    let log = wb.log();
    assert!(log.contains("not the one walbridge streamed from"), "{log}");
    assert!(
        log.contains("otherserver.position"),
        "names the file:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_advances_when_only_unpublished_tables_change() {
    let db = TestDb::new("idleslot").await;
    db.client
        .batch_execute("CREATE TABLE public.churn (id int PRIMARY KEY, n int)")
        .await
        .unwrap();
    db.client
        .batch_execute("INSERT INTO public.churn VALUES (1, 0)")
        .await
        .unwrap();
    let mut wb = db.start().await;
    let before = db.confirmed().await.unwrap();
    for _ in 0..2000 {
        db.client
            .execute("UPDATE public.churn SET n = n + 1", &[])
            .await
            .unwrap();
    }
    let churned = db.current_lsn().await;
    assert!(churned > before);
    // No published table changed, yet the slot must move past the churn (heartbeats and
    // keepalives), or Postgres would keep all that WAL for ever.
    db.wait_confirmed(churned, &mut wb).await;
    assert!(wb.stop().success());
    let events = db.events_until(|_| true).await;
    assert!(
        events.is_empty(),
        "nothing of public.churn is published: {} events",
        events.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_table_is_refused_so_the_legacy_app_keeps_working() {
    let db = TestDb::new("noident").await;
    db.client
        .batch_execute("CREATE TABLE oms.audit_log (at timestamptz, line text)")
        .await
        .unwrap();
    db.client
        .batch_execute("INSERT INTO oms.audit_log VALUES (now(), 'a')")
        .await
        .unwrap();
    let mut wb = harness::Walbridge::start(&db.write_config(), &db.dir.join("walbridge.log"));
    let status = wb.wait(Duration::from_secs(60));
    assert!(!status.success(), "walbridge must refuse to start");
    let log = wb.log();
    assert!(log.contains("oms.audit_log"), "names the table:\n{log}");
    assert!(
        log.contains("REPLICA IDENTITY FULL"),
        "says how to fix it:\n{log}"
    );
    // Nothing was published, so the monolith's UPDATE on the table still works.
    let pubs: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_publication WHERE pubname = 'noident'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pubs, 0);
    db.client
        .batch_execute("UPDATE oms.audit_log SET line = 'b'")
        .await
        .expect("the legacy application's UPDATE still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_without_a_finished_snapshot_is_refused() {
    // As a crash in the middle of the initial snapshot would leave it: the slot, and no record
    // of anything confirmed from it.
    let mut db = TestDb::new("halfsnap").await;
    db.snapshot = "initial";
    db.client
        .batch_execute("SELECT pg_create_logical_replication_slot('halfsnap', 'pgoutput')")
        .await
        .unwrap();
    let mut wb = harness::Walbridge::start(&db.write_config(), &db.dir.join("walbridge.log"));
    let status = wb.wait(Duration::from_secs(60));
    assert!(
        !status.success(),
        "streaming from it would skip the rows never copied"
    );
    let log = wb.log();
    assert!(
        log.contains("cannot tell whether the slot's initial snapshot finished"),
        "{log}"
    );
    assert!(
        log.contains("pg_drop_replication_slot('halfsnap')"),
        "says how to fix it:\n{log}"
    );
    assert!(
        log.contains("snapshot: never"),
        "and the alternative:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_slot_without_snapshot_is_called_out() {
    let db = TestDb::new("recreated").await;
    let mut wb = db.start().await;
    insert_customers(&db, 1_000_000, 5).await;
    db.wait_caught_up(&mut wb).await;
    assert!(wb.stop().success());
    // Someone drops the slot; what is committed now is in no slot's stream.
    db.client
        .batch_execute("SELECT pg_drop_replication_slot('recreated')")
        .await
        .unwrap();
    insert_customers(&db, 1_000_005, 5).await;
    let wb = db.start().await;
    let log = wb.log();
    assert!(
        log.contains("the slot was created anew without a snapshot"),
        "the gap is named, not silent:\n{log}"
    );
    assert!(wb.stop().success());
}
