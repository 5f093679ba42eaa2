//! Live views downstream of the processors (issue 5): the SQL endpoint as analysts reach it
//! (psql, psycopg, tokio-postgres' extended protocol) and the view sinks after a crash (real
//! Postgres, real tansu broker, Parquet files on disk).
//!
//! The views and epochs are built here by hand (a real `ViewDef`, Arrow batches), so these tests
//! check the endpoint and the sinks on their own, whatever the processors compute.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Decimal128Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema, TimeUnit};
use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use sinks::views::kafka::{KafkaViewSettings, KafkaViewSink};
use sinks::views::parquet::ParquetViewSink;
use sinks::views::postgres::{PostgresViewSettings, PostgresViewSink};
use sinks::views::{ViewSink, Written};
use transforms::sql::{SqlOptions, serve};
use transforms::table::{Cell, ViewTable};
use transforms::view::{Catalog, Epoch, Offsets, Snapshot, ViewChanges, ViewDef, ViewRows};

use crate::harness::{scratch, shared};

const USER: &str = "analyst";
const PASSWORD: &str = "s3cret pass";

fn stock_def() -> ViewDef {
    ViewDef {
        name: "stock_availability".into(),
        schema: Arc::new(Schema::new(vec![
            Field::new("sku", DataType::Utf8, false),
            Field::new("warehouse", DataType::Utf8, false),
            Field::new("available", DataType::Int64, false),
        ])),
        key: vec![0, 1],
        doc: "sellable stock per sku and warehouse".into(),

        merge: None,
    }
}

fn stock_rows(rows: &[(&str, &str, i64)]) -> RecordBatch {
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
    ];
    RecordBatch::try_new(stock_def().schema, cols).expect("stock rows")
}

fn stock_keys(keys: &[(&str, &str)]) -> RecordBatch {
    let schema = Arc::new(stock_def().schema.project(&[0, 1]).expect("key schema"));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(keys.iter().map(|k| k.0))),
        Arc::new(StringArray::from_iter_values(keys.iter().map(|k| k.1))),
    ];
    RecordBatch::try_new(schema, cols).expect("stock keys")
}

fn customer_def() -> ViewDef {
    ViewDef {
        name: "customer_360".into(),
        schema: Arc::new(Schema::new(vec![
            Field::new("customer_id", DataType::Int64, false),
            Field::new("email", DataType::Utf8, true),
            Field::new("lifetime_value", DataType::Decimal128(12, 2), false),
            Field::new(
                "last_order_at",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                true,
            ),
        ])),
        key: vec![0],
        doc: "one row per customer".into(),
        merge: None,
    }
}

/// (id, email, lifetime value in cents, last order as Unix microseconds)
type Customer = (i64, Option<&'static str>, i128, Option<i64>);

fn customer_rows(rows: &[Customer]) -> RecordBatch {
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
        Arc::new(StringArray::from_iter(rows.iter().map(|r| r.1))),
        Arc::new(
            Decimal128Array::from_iter_values(rows.iter().map(|r| r.2))
                .with_precision_and_scale(12, 2)
                .expect("decimal"),
        ),
        Arc::new(TimestampMicrosecondArray::from_iter(
            rows.iter().map(|r| r.3),
        )),
    ];
    RecordBatch::try_new(customer_def().schema, cols).expect("customer rows")
}

fn customer_keys(ids: &[i64]) -> RecordBatch {
    let schema = Arc::new(customer_def().schema.project(&[0]).expect("key schema"));
    RecordBatch::try_new(
        schema,
        vec![Arc::new(Int64Array::from_iter_values(ids.iter().copied()))],
    )
    .expect("customer keys")
}

fn offsets(v: &[(i32, i64)]) -> Offsets {
    Offsets(
        v.iter()
            .map(|(p, o)| (("shop.oms.orders".to_owned(), *p), *o))
            .collect(),
    )
}

const T1: i64 = 1_700_000_000_000_000; // 2023-11-14 22:13:20
const T2: i64 = 1_700_086_400_000_000; // 2023-11-15 22:13:20

/// Three epochs of two views. After all three: stock (A,W1,-1), (D,W2,-7); customer 2 only.
fn epochs() -> Vec<Epoch> {
    vec![
        Epoch {
            number: 1,
            offsets: offsets(&[(0, 10)]),
            changes: vec![
                ViewChanges {
                    view: "stock_availability".into(),
                    upserts: stock_rows(&[("A", "W1", 5), ("B", "W1", -2), ("C", "W2", 0)]),
                    deletes: stock_keys(&[]),
                },
                ViewChanges {
                    view: "customer_360".into(),
                    upserts: customer_rows(&[
                        (1, Some("ada@example.com"), 1234, Some(T1)),
                        (2, None, 0, None),
                    ]),
                    deletes: customer_keys(&[]),
                },
            ],
        },
        Epoch {
            number: 2,
            offsets: offsets(&[(0, 20)]),
            changes: vec![
                ViewChanges {
                    view: "stock_availability".into(),
                    upserts: stock_rows(&[("A", "W1", -1)]),
                    deletes: stock_keys(&[("C", "W2")]),
                },
                ViewChanges {
                    view: "customer_360".into(),
                    upserts: customer_rows(&[(2, Some("bob@example.com"), 500, Some(T2))]),
                    deletes: customer_keys(&[]),
                },
            ],
        },
        Epoch {
            number: 3,
            offsets: offsets(&[(0, 30), (1, 4)]),
            changes: vec![
                ViewChanges {
                    view: "stock_availability".into(),
                    upserts: stock_rows(&[("D", "W2", -7)]),
                    deletes: stock_keys(&[("B", "W1")]),
                },
                ViewChanges {
                    view: "customer_360".into(),
                    upserts: customer_rows(&[]),
                    deletes: customer_keys(&[1]),
                },
            ],
        },
    ]
}

const FINAL_STOCK: &[(&str, &str, i64)] = &[("A", "W1", -1), ("D", "W2", -7)];

// --- SQL endpoint ------------------------------------------------------------------------------

fn catalog_with_stock(rows: &[(&str, &str, i64)]) -> Arc<Catalog> {
    let catalog = Catalog::new();
    catalog.publish(
        &stock_def(),
        Snapshot {
            epoch: 1,
            offsets: offsets(&[(0, 10)]),
            rows: ViewRows::from_batches(stock_def().schema, vec![stock_rows(rows)]),
        },
    );
    catalog
}

fn psql(port: u16, password: &str, sql: &str) -> std::process::Output {
    psql_with(port, password, sql, &[])
}

fn psql_with(port: u16, password: &str, sql: &str, env: &[(&str, &str)]) -> std::process::Output {
    Command::new("psql")
        .envs(env.iter().copied())
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", USER])
        .args([
            "-d",
            "walbridge",
            "-X",
            "-A",
            "-t",
            "-F",
            ",",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .args(["-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("run psql")
}

fn sql_opts() -> SqlOptions {
    SqlOptions {
        listen: "127.0.0.1:0".into(),
        user: USER.into(),
        password: PASSWORD.into(),
        tls: None,
        max_connections: 8,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_queries_the_live_views_with_a_password_and_cannot_write() {
    let catalog = catalog_with_stock(&[("A", "W1", 5), ("B", "W1", -2), ("C", "W2", -9)]);
    let server = serve(catalog.clone(), sql_opts()).await.expect("serve");
    let port = server.local_addr().port();

    let out = tokio::task::spawn_blocking(move || {
        psql(
            port,
            PASSWORD,
            "select * from stock_availability where available < 0 order by sku",
        )
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "B,W1,-2\nC,W2,-9\n");

    // A view published after the server started is there too.
    catalog.publish(
        &customer_def(),
        Snapshot {
            epoch: 1,
            offsets: offsets(&[(0, 10)]),
            rows: ViewRows::from_batches(
                customer_def().schema,
                vec![customer_rows(&[(7, Some("x@example.com"), 990, Some(T1))])],
            ),
        },
    );
    let out = tokio::task::spawn_blocking(move || {
        psql(
            port,
            PASSWORD,
            "select customer_id, lifetime_value from customer_360",
        )
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "7,9.90\n", "{out:?}");

    let out = tokio::task::spawn_blocking(move || psql(port, "wrong", "select 1"))
        .await
        .unwrap();
    assert!(!out.status.success(), "a wrong password was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.to_lowercase()
            .contains("password authentication failed"),
        "{err}"
    );

    for sql in [
        "create table t (a int)",
        "insert into stock_availability values ('Z', 'W9', 1)",
        "copy stock_availability to '/tmp/walbridge-copy-test.csv'",
    ] {
        let out = tokio::task::spawn_blocking(move || psql(port, PASSWORD, sql))
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("read-only"),
            "{sql}: {err}"
        );
    }
    let out = tokio::task::spawn_blocking(move || {
        psql(port, PASSWORD, "select count(*) from stock_availability")
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "3\n");
    assert!(!Path::new("/tmp/walbridge-copy-test.csv").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_extended_protocol_and_a_query_racing_publishes_sees_one_snapshot() {
    // Several chunks of a processor's view table, each copied on write while queries read it.
    const ROWS: usize = 3000;
    let catalog = catalog_with_stock(&[]);
    let server = serve(catalog.clone(), sql_opts()).await.expect("serve");
    let port = server.local_addr().port();
    let dsn =
        format!("host=127.0.0.1 port={port} user={USER} password='{PASSWORD}' dbname=walbridge");
    let (client, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
        .await
        .expect("connect with tokio-postgres");
    tokio::spawn(conn);

    // Every epoch sets all rows' `available` to the epoch number: a query that mixed two
    // epochs would see min != max.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (catalog, stop) = (catalog.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut epoch = 0u64;
            let mut table = ViewTable::new(stock_def());
            while !stop.load(Ordering::Relaxed) {
                epoch += 1;
                for i in 0..ROWS {
                    let (sku, w) = (Cell::text(&format!("S{i:04}")), Cell::text("W1"));
                    let row = vec![sku.clone(), w.clone(), Cell::Int(epoch as i64)];
                    table.set(vec![sku, w], Some(row));
                }
                catalog.publish(
                    &stock_def(),
                    Snapshot {
                        epoch,
                        offsets: offsets(&[(0, epoch as i64)]),
                        rows: table.published(),
                    },
                );
                // Pace the publishes so queries see several epochs while this runs.
                std::thread::sleep(Duration::from_millis(5));
            }
            epoch
        })
    };
    // Queries start once the publisher's first epoch is there (before it the view is empty).
    let first = Instant::now();
    while catalog
        .snapshot("stock_availability")
        .is_none_or(|s| s.rows.num_rows() < ROWS)
    {
        assert!(
            first.elapsed() < Duration::from_secs(30),
            "no epoch published"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stmt = client
        .prepare("select min(available), max(available), count(*) from stock_availability where available >= $1")
        .await
        .expect("prepare (extended protocol)");
    let mut seen = Vec::new();
    for _ in 0..40 {
        let row = client.query_one(&stmt, &[&0i64]).await.expect("query");
        let (min, max, n): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(min, max, "one query saw two epochs");
        assert_eq!(n, ROWS as i64);
        seen.push(min);
    }
    stop.store(true, Ordering::Relaxed);
    let last = publisher.join().expect("publisher");
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "queries went back in time: {seen:?}"
    );
    assert!(
        seen.first() < seen.last(),
        "publishes were not seen: {seen:?} (last epoch {last})"
    );

    // Parameters of other types, through the extended protocol.
    let rows = client
        .query(
            "select sku from stock_availability where sku = $1",
            &[&"S0007"],
        )
        .await
        .expect("text parameter");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), "S0007");
    let err = client
        .execute(
            "insert into stock_availability values ($1, 'W1', 1)",
            &[&"X"],
        )
        .await
        .expect_err("insert through the extended protocol");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_connects_and_queries() {
    let python = std::env::var("WALBRIDGE_PYTHON").unwrap_or_else(|_| "python3".into());
    let catalog = catalog_with_stock(&[("A", "W1", 5), ("B", "W1", -2), ("C", "W2", -9)]);
    let server = serve(catalog, sql_opts()).await.expect("serve");
    let port = server.local_addr().port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/sql_endpoint.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args(["--port", &port.to_string(), "--user", USER])
            .env("PGPASSWORD", PASSWORD)
            .output()
            .expect("run the psycopg script")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "psycopg script failed (is psycopg installed? run tests/install-prereqs.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        got,
        serde_json::json!({"negative": [["B", "W1", -2], ["C", "W2", -9]], "count": 3})
    );
}

// --- view sinks --------------------------------------------------------------------------------

async fn write_all(sink: &mut dyn ViewSink, epochs: &[Epoch]) -> Vec<Written> {
    let mut out = Vec::new();
    for e in epochs {
        out.push(sink.write(e).await.expect("write epoch"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sink_after_a_crash_holds_each_epoch_once() {
    let pg = &shared().pg;
    pg.create_database("viewsink").await.expect("create db");
    let dsn = pg.dsn("viewsink");
    let settings = PostgresViewSettings {
        dsn: dsn.clone(),
        schema: "read_model".into(),
    };
    let (check, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let all = epochs();

    let mut sink = PostgresViewSink::open("views", &settings)
        .await
        .expect("open");
    assert_eq!(sink.committed_offsets(), Some(&Offsets::default()));
    assert_eq!(
        write_all(&mut sink, &all[..2]).await,
        vec![Written::Stored, Written::Stored]
    );
    // Crash in the middle of epoch 3: the sink's connection is cut, its transaction is lost.
    check
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = 'viewsink' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(
        sink.write(&all[2]).await.is_err(),
        "write on a dead connection"
    );
    drop(sink);

    // Restart: the stored offsets are epoch 2's; the runtime replays from the start.
    let mut sink = PostgresViewSink::open("views", &settings)
        .await
        .expect("reopen");
    assert_eq!(sink.committed_offsets(), Some(&all[1].offsets));
    assert_eq!(
        write_all(&mut sink, &all).await,
        vec![Written::AlreadyHeld, Written::AlreadyHeld, Written::Stored]
    );

    let stock: Vec<(String, String, i64)> = check
        .query(
            "SELECT sku, warehouse, available FROM read_model.stock_availability ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let want: Vec<(String, String, i64)> = FINAL_STOCK
        .iter()
        .map(|(s, w, a)| (s.to_string(), w.to_string(), *a))
        .collect();
    assert_eq!(stock, want);
    let customers: Vec<(i64, Option<String>, String, Option<String>)> = check
        .query(
            "SELECT customer_id, email, lifetime_value::text, last_order_at::text
             FROM read_model.customer_360 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        customers,
        vec![(
            2,
            Some("bob@example.com".into()),
            "5.00".into(),
            Some("2023-11-15 22:13:20".into())
        )]
    );
    // Typed columns and the view key as primary key.
    let types: Vec<String> = check
        .query(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = 'read_model.customer_360'::regclass AND attnum > 0 ORDER BY attnum",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        types,
        [
            "bigint",
            "text",
            "numeric(12,2)",
            "timestamp without time zone"
        ]
    );
    let stored: Vec<(String, i32, i64)> = check
        .query(
            "SELECT topic, partition, next_offset FROM read_model.walbridge_offsets
             WHERE sink = 'views' ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        stored,
        vec![
            ("shop.oms.orders".into(), 0, 30),
            ("shop.oms.orders".into(), 1, 4)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sink_replayed_after_a_restart_compacts_to_the_view() {
    let broker = walbridge::stack::Broker::start().expect("start tansu");
    let settings = KafkaViewSettings {
        brokers: broker.bootstrap(),
        topic_prefix: "shop".into(),
        partitions: 2,
        replication_factor: 1,
        extra: vec![],
        unit: "all".into(),
    };
    let all = epochs();
    let mut sink = KafkaViewSink::new("views", settings.clone()).expect("sink");
    write_all(&mut sink, &all[..2]).await;
    drop(sink); // crash before the runtime committed epoch 2's offsets
    // Restart: at-least-once replay from the last commit (epoch 1's), so epoch 2 comes twice.
    let mut sink = KafkaViewSink::new("views", settings.clone()).expect("sink");
    assert_eq!(sink.committed_offsets(), None);
    write_all(&mut sink, &all[1..]).await;
    assert_eq!(sink.committed_offsets(), Some(&all[2].offsets));

    // records: epoch 1 = 3 + 2, epoch 2 = 2 + 1 (twice), epoch 3 = 2 + 1
    let stock = consume(
        &broker.bootstrap(),
        "shop.view.stock_availability",
        3 + 2 + 2 + 2,
    )
    .await;
    let customers = consume(&broker.bootstrap(), "shop.view.customer_360", 2 + 1 + 1 + 1).await;

    let latest = |records: &[(String, Option<String>)]| {
        // Keyed by the key's bytes, as compaction does.
        let mut m: BTreeMap<String, Option<serde_json::Value>> = BTreeMap::new();
        for (k, v) in records {
            m.insert(
                k.clone(),
                v.as_deref()
                    .map(|v| serde_json::from_str(v).expect("json value")),
            );
        }
        m
    };
    let stock = latest(&stock);
    let want: BTreeMap<String, Option<serde_json::Value>> = [
        ("A", "W1", Some(-1)),
        ("B", "W1", None),
        ("C", "W2", None),
        ("D", "W2", Some(-7)),
    ]
    .into_iter()
    .map(|(s, w, a)| {
        (
            format!(r#"{{"sku":"{s}","warehouse":"{w}"}}"#),
            a.map(|a| serde_json::json!({"sku": s, "warehouse": w, "available": a})),
        )
    })
    .collect();
    assert_eq!(stock, want);
    let customers = latest(&customers);
    assert_eq!(customers.len(), 2);
    assert_eq!(customers[r#"{"customer_id":1}"#], None);
    let c2 = customers[r#"{"customer_id":2}"#]
        .as_ref()
        .expect("customer 2 present");
    assert_eq!(c2["email"], "bob@example.com");
    assert_eq!(c2["customer_id"], 2);
}

/// Reads `expect` records of `topic` from the beginning: (key, value or None for tombstones), in
/// partition order (per key the order they were produced in).
async fn consume(brokers: &str, topic: &str, expect: usize) -> Vec<(String, Option<String>)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("views-test-{topic}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < expect {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("{topic}: only {} of {expect} records", out.len()))
            .expect("consume");
        let key = String::from_utf8(m.key().expect("keyed").to_vec()).unwrap();
        let value = m.payload().map(|v| String::from_utf8(v.to_vec()).unwrap());
        out.push((key, value));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_sink_after_a_crash_leaves_whole_files_with_each_epoch_once() {
    let dir = scratch("parquet-views").join("lake");
    let all = epochs();
    let mut sink = ParquetViewSink::open("lake", &dir).expect("open");
    write_all(&mut sink, &all[..1]).await;
    let offsets_after_1 = std::fs::read(dir.join("_walbridge_offsets.json")).unwrap();
    write_all(&mut sink, &all[1..2]).await;
    drop(sink);
    // Crash after epoch 2's data files, before its offsets: the offsets file is epoch 1's.
    // And a torn file of a write that never finished.
    std::fs::write(dir.join("_walbridge_offsets.json"), offsets_after_1).unwrap();
    let any_date = std::fs::read_dir(dir.join("stock_availability"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let torn = any_date.join(".part-00000000000000000099.parquet.tmp");
    std::fs::write(&torn, b"PAR1 half a file").unwrap();

    let mut sink = ParquetViewSink::open("lake", &dir).expect("reopen");
    assert!(!torn.exists(), "the torn temp file is still there");
    assert_eq!(sink.committed_offsets(), Some(&all[0].offsets));
    assert_eq!(
        write_all(&mut sink, &all).await,
        vec![Written::AlreadyHeld, Written::Stored, Written::Stored]
    );

    // Files: one per epoch that changed the view, in epoch order, no duplicate of epoch 2.
    let stock_files = parquet_files(&dir.join("stock_availability"));
    assert_eq!(stock_files.len(), 3, "{stock_files:?}");
    assert_eq!(parquet_files(&dir.join("customer_360")).len(), 3);

    // Replaying the changelog gives the view.
    let mut view: BTreeMap<(String, String), i64> = BTreeMap::new();
    for f in &stock_files {
        let file = std::fs::File::open(f).unwrap();
        let reader =
            datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                file,
            )
            .expect("a whole parquet file")
            .build()
            .unwrap();
        for batch in reader {
            let b = batch.unwrap();
            let sku = b.column_by_name("sku").unwrap().as_string::<i32>();
            let wh = b.column_by_name("warehouse").unwrap().as_string::<i32>();
            let avail = b
                .column_by_name("available")
                .unwrap()
                .as_primitive::<Int64Type>();
            let op = b.column_by_name("_op").unwrap().as_string::<i32>();
            for i in 0..b.num_rows() {
                let key = (sku.value(i).to_owned(), wh.value(i).to_owned());
                match op.value(i) {
                    "upsert" => {
                        view.insert(key, avail.value(i));
                    }
                    "delete" => {
                        assert!(avail.is_null(i), "a delete carries only the key");
                        view.remove(&key);
                    }
                    other => panic!("unknown _op {other}"),
                }
            }
        }
    }
    let want: BTreeMap<(String, String), i64> = FINAL_STOCK
        .iter()
        .map(|(s, w, a)| ((s.to_string(), w.to_string()), *a))
        .collect();
    assert_eq!(view, want);
}

/// `part-*.parquet` files under `view_dir/date=*/`, sorted by file name (= epoch order).
fn parquet_files(view_dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for d in std::fs::read_dir(view_dir).unwrap() {
        let d = d.unwrap().path();
        assert!(
            d.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("date="),
            "{d:?}"
        );
        for f in std::fs::read_dir(&d).unwrap() {
            let f = f.unwrap().path();
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            assert!(!name.ends_with(".tmp"), "temp file left: {f:?}");
            files.push(f);
        }
    }
    files.sort_by_key(|f| f.file_name().map(|n| n.to_owned()));
    files
}

/// With a certificate the endpoint speaks TLS: psql verifies it (verify-full against the CA) and
/// queries; a client that does not ask for TLS is refused with what to do. Past
/// max_connections a client is refused with SQLSTATE 53300, and one gets in again once another
/// left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_required_when_configured_and_connections_are_limited() {
    let dir = scratch("sql-tls");
    let (cert, key, ca, _) = crate::tls::make_certs(&dir.join("certs"));
    let catalog = catalog_with_stock(&[("A", "W1", 5), ("B", "W1", -2)]);
    let mut opts = sql_opts();
    opts.tls = Some(transforms::sql::SqlTls { cert, key });
    let server = serve(catalog.clone(), opts).await.expect("serve");
    let port = server.local_addr().port();
    let ca = ca.display().to_string();
    let out = tokio::task::spawn_blocking(move || {
        psql_with(
            port,
            PASSWORD,
            "select sku from stock_availability where available < 0",
            &[("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", &ca)],
        )
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "B\n");
    let out = tokio::task::spawn_blocking(move || {
        psql_with(port, PASSWORD, "select 1", &[("PGSSLMODE", "disable")])
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a plain connection was served");
    assert!(
        err.contains("accepts TLS connections only") && err.contains("sslmode=require"),
        "{err}"
    );
    drop(server);

    let mut opts = sql_opts();
    opts.max_connections = 2;
    let server = serve(catalog, opts).await.expect("serve");
    let dsn = format!(
        "host=127.0.0.1 port={} user={USER} password='{PASSWORD}' dbname=walbridge",
        server.local_addr().port()
    );
    let connect = || async {
        let (c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok::<_, tokio_postgres::Error>(c)
    };
    let a = connect().await.expect("first");
    let _b = connect().await.expect("second");
    let e = connect()
        .await
        .err()
        .expect("a third connection over the limit");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS),
        "{e}"
    );
    let msg = e
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(msg.contains("max_connections"), "{msg}");
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match connect().await {
            Ok(c) => {
                let n: i64 = c
                    .query_one("select count(*) from stock_availability", &[])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(n, 2);
                break;
            }
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no slot freed after a client left: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// psql's Ctrl-C and psycopg's `cancel()` send a cancel request on a connection of its own. It
/// ends the running query with 57014, in the simple and the extended protocol, and the
/// connection goes on serving queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_ends_a_long_query_and_the_connection_goes_on() {
    use tokio_postgres::error::SqlState;
    let catalog = catalog_with_stock(&[("A", "W1", 5), ("B", "W1", -2)]);
    let server = serve(catalog, sql_opts()).await.expect("serve");
    let port = server.local_addr().port();
    let dsn =
        format!("host=127.0.0.1 port={port} user={USER} password='{PASSWORD}' dbname=walbridge");
    let (client, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let client = Arc::new(client);
    // Hours of work for DataFusion (a sum, so no statistics shortcut).
    const LONG: &str = "select sum(value) from range(0, 100000000000)";

    for extended in [false, true] {
        let token = client.cancel_token();
        let c = client.clone();
        let query = tokio::spawn(async move {
            if extended {
                c.query(LONG, &[]).await.map(|_| ())
            } else {
                c.simple_query(LONG).await.map(|_| ())
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!query.is_finished(), "the long query ended on its own");
        token
            .cancel_query(tokio_postgres::NoTls)
            .await
            .expect("send the cancel request");
        let ended = tokio::time::timeout(Duration::from_secs(30), query)
            .await
            .unwrap_or_else(|_| {
                panic!("query (extended: {extended}) still runs 30 s after its cancel")
            })
            .unwrap();
        let err = ended.expect_err("a canceled query fails");
        assert_eq!(
            err.code(),
            Some(&SqlState::QUERY_CANCELED),
            "extended: {extended}: {err:?}"
        );
        // The same connection answers the next query.
        let n: i64 = client
            .query_one("select count(*) from stock_availability", &[])
            .await
            .expect("the connection goes on after a cancel")
            .get(0);
        assert_eq!(n, 2);
    }

    // A cancel with a key no connection has changes nothing.
    let other = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(other.1);
    let idle_token = other.0.cancel_token();
    drop(other.0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = idle_token.cancel_query(tokio_postgres::NoTls).await;
    let n: i64 = client
        .query_one("select count(*) from stock_availability", &[])
        .await
        .expect("query after a stray cancel")
        .get(0);
    assert_eq!(n, 2);
}
