//! The live views (issue 5): after a workload, every view the processors keep equals the same
//! view computed by plain SQL on the legacy database; a processor killed with `kill -9` in the
//! middle of the stream and restarted ends with the same views.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::harness::{TestDb, signal};

fn config(db: &TestDb, checkpoint_ms: u64) -> (PathBuf, walbridge::config::Config) {
    let yaml = db.config_yaml()
        + &format!(
            "processors:\n  group_id: views\n  checkpoint_dir: \"{}\"\n  epoch_interval_ms: 50\n  checkpoint_interval_ms: {checkpoint_ms}\n  safety_stock:\n    default: 1\n    categories: {{ apparel: 3, home: 2 }}\n    skus: {{ SKU-000001: 100000 }}\n",
            db.dir.join("processors").display()
        );
    let path = db.dir.join("views.yaml");
    std::fs::write(&path, yaml).unwrap();
    let cfg = walbridge::config::load(&path).expect("config with processors");
    (path, cfg)
}

struct Processor(Child);

impl Processor {
    fn start(config: &PathBuf, log: &PathBuf) -> Processor {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_walbridge"))
            .args(["process", "-c"])
            .arg(config)
            .env("RUST_LOG", "info,rdkafka=warn")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start walbridge process");
        Processor(child)
    }

    fn stop(mut self) {
        signal(self.0.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "processor did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            self.0.try_wait().unwrap().unwrap().success(),
            "processor failed"
        );
    }

    fn kill9(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

/// A failing test must not leave its processor running (and polling) after the run.
impl Drop for Processor {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

async fn workload(db: &TestDb, seed: u64, transactions: u64, rate: f64) {
    let opts = legacy_fixtures::SimulateOptions {
        seed,
        rate,
        duration: Duration::from_secs(120),
        profile: legacy_fixtures::Profile::Steady,
        max_transactions: Some(transactions),
    };
    legacy_fixtures::simulate(&db.client, &opts)
        .await
        .expect("simulate");
}

/// Runs `walbridge process -c path`, asserts it fails, and returns its stderr.
fn process_refused(path: &Path, what: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_walbridge"))
        .args(["process", "-c"])
        .arg(path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{what} must be refused:\n{err}");
    err
}

async fn check(db: &TestDb, cfg: &walbridge::config::Config) -> transforms::check::Report {
    let pc = cfg.processor_config().unwrap();
    let report = transforms::check::check(
        &pc,
        &cfg.source.pg_config(),
        &db.name,
        Duration::from_secs(90),
    )
    .await
    .unwrap_or_else(|e| panic!("views check: {e}"));
    assert!(
        report.equal(),
        "views differ from SQL:\n{}",
        report.render()
    );
    for v in &report.views {
        assert!(
            v.rows_sql > 0 || v.view == "reconciliation_diffs",
            "{} is empty in SQL too: the test proves nothing",
            v.view
        );
    }
    report
}

/// SKUs of the alerts in the alert topic, and the order ids of the order_on_unavailable_sku ones.
fn alerted_skus(brokers: &str, topic: &str) -> (BTreeSet<String>, BTreeSet<i64>) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "views-test")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut skus = BTreeSet::new();
    let mut orders = BTreeSet::new();
    let mut last = Instant::now() + Duration::from_secs(3);
    while last.elapsed() < Duration::from_secs(1) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            last = Instant::now();
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
            assert_eq!(
                v["sku"].as_str(),
                Some(key.as_str()),
                "alerts are keyed by sku"
            );
            if v["kind"] == "order_on_unavailable_sku" {
                orders.insert(v["order_id"].as_i64().expect("order_id"));
            }
            skus.insert(key);
        }
    }
    (skus, orders)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_equal_sql_on_the_source_after_a_workload() {
    let mut db = TestDb::new("views_golden").await;
    db.snapshot = "initial";
    let (path, cfg) = config(&db, 200);
    let mut wb = db.start().await;
    let p = Processor::start(&path, &db.dir.join("process.log"));
    let orders_before: i64 = db
        .client
        .query_one("SELECT coalesce(max(id), 0) FROM oms.orders", &[])
        .await
        .unwrap()
        .get(0);
    workload(&db, 7, 600, 3000.0).await;
    db.wait_caught_up(&mut wb).await;

    // The stream (checkpoint + topics) equals SQL at one LSN.
    check(&db, &cfg).await;
    // The running processor's own state, as its final checkpoint holds it, equals SQL too.
    p.stop();
    let report = check(&db, &cfg).await;
    assert_eq!(
        report.applied_after_checkpoint,
        0,
        "the processor's final checkpoint was behind the topics:\n{}",
        report.render()
    );

    // Every SKU whose available-to-promise ended below zero raised an oversell alert.
    let pc = cfg.processor_config().unwrap();
    let state = transforms::runtime::load_checkpoint(&pc).unwrap();
    let below: BTreeSet<String> = state
        .view("stock_availability_by_sku")
        .unwrap()
        .rows()
        .filter(|r| matches!(r[5], transforms::table::Cell::Int(v) if v < 0))
        .map(|r| match &r[0] {
            transforms::table::Cell::Text(s) => s.to_string(),
            _ => unreachable!(),
        })
        .collect();
    assert!(
        !below.is_empty(),
        "safety stock 100000 on SKU-000001 puts it below zero"
    );
    let (alerted, alerted_orders) = alerted_skus(&db.brokers, &pc.alerts_topic);
    let silent: Vec<&String> = below.difference(&alerted).collect();
    assert!(silent.is_empty(), "below zero without an alert: {silent:?}");
    // Orders the snapshot read were placed before walbridge looked: no alert for them.
    let old: Vec<&i64> = alerted_orders
        .iter()
        .filter(|o| **o <= orders_before)
        .collect();
    assert!(
        old.is_empty(),
        "order_on_unavailable_sku alerts for orders of the snapshot: {old:?}"
    );
    wb.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_killed_mid_stream_ends_with_the_same_views() {
    let mut db = TestDb::new("views_kill9").await;
    db.snapshot = "initial";
    let (path, cfg) = config(&db, 100);
    let mut wb = db.start().await;
    let log = db.dir.join("process.log");
    let p = Processor::start(&path, &log);
    let ckpt = cfg.processor_config().unwrap().checkpoint_path();

    // First part of the workload, then kill -9 once a checkpoint exists and more is in flight.
    workload(&db, 7, 400, 2000.0).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ckpt.exists() {
        assert!(
            Instant::now() < deadline,
            "no checkpoint after 60 s:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before_kill = std::fs::read(&ckpt).unwrap();
    p.kill9();
    // More changes while it is down, and the restart catches up in the middle of them.
    workload(&db, 8, 300, 2000.0).await;
    let p = Processor::start(&path, &log);
    workload(&db, 9, 300, 2000.0).await;
    db.wait_caught_up(&mut wb).await;
    check(&db, &cfg).await;
    p.stop();
    assert_ne!(
        std::fs::read(&ckpt).unwrap(),
        before_kill,
        "the restart checkpointed its progress"
    );
    let report = check(&db, &cfg).await;
    assert_eq!(
        report.applied_after_checkpoint,
        0,
        "the restarted processor's final checkpoint was behind the topics:\n{}",
        report.render()
    );
    wb.stop();
}

/// A value as text that every sink can be brought to: integers and text as such, decimals with
/// their scale, timestamps as microseconds, floats to 9 places.
fn canon(col: &dyn datafusion::arrow::array::Array, i: usize) -> String {
    use datafusion::arrow::array::{AsArray, types};
    use datafusion::arrow::datatypes::{DataType, TimeUnit};
    if col.is_null(i) {
        return "null".into();
    }
    match col.data_type() {
        DataType::Utf8 => col.as_string::<i32>().value(i).to_owned(),
        DataType::Int64 => col.as_primitive::<types::Int64Type>().value(i).to_string(),
        DataType::Float64 => format!("{:.9}", col.as_primitive::<types::Float64Type>().value(i)),
        DataType::Decimal128(_, s) => {
            let v = col.as_primitive::<types::Decimal128Type>().value(i);
            let scale = 10i128.pow(u32::from(*s as u8));
            let sign = if v < 0 { "-" } else { "" };
            format!(
                "{sign}{}.{:0width$}",
                v.abs() / scale,
                v.abs() % scale,
                width = *s as usize
            )
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => col
            .as_primitive::<types::TimestampMicrosecondType>()
            .value(i)
            .to_string(),
        other => panic!("no canonical form for {other}"),
    }
}

type ViewRows = BTreeMap<Vec<String>, Vec<String>>;

/// Rows of `batches` by key, every column canonical; `key` indexes the key columns.
fn canon_rows(batches: &[datafusion::arrow::array::RecordBatch], key: &[usize]) -> ViewRows {
    let mut out = ViewRows::new();
    for b in batches {
        for i in 0..b.num_rows() {
            let row: Vec<String> = b.columns().iter().map(|c| canon(c.as_ref(), i)).collect();
            out.insert(key.iter().map(|k| row[*k].clone()).collect(), row);
        }
    }
    out
}

/// Every view as the final checkpoint holds it (which `check` proved equal to SQL).
fn checkpoint_views(cfg: &walbridge::config::Config) -> BTreeMap<String, ViewRows> {
    state_views(&transforms::runtime::load_checkpoint(&cfg.processor_config().unwrap()).unwrap())
}

/// Every view of a processor state, canonical.
fn state_views(state: &transforms::state::State) -> BTreeMap<String, ViewRows> {
    state
        .views()
        .iter()
        .map(|v| {
            (
                v.def.name.clone(),
                canon_rows(&v.batches().unwrap(), &v.def.key),
            )
        })
        .collect()
}

/// The read model's `reconciliation_summary_total` view: its rows as scope and the five counts.
async fn postgres_summary_total(dsn: &str, schema: &str) -> Vec<Vec<String>> {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let sql = format!(
        "SELECT scope, diffs::text, missing_in_oms::text, missing_in_wms::text, mismatches::text, \
         units_at_risk::text FROM \"{schema}\".reconciliation_summary_total"
    );
    client
        .query(&sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| (0..6).map(|i| r.get::<_, String>(i)).collect())
        .collect()
}

/// The read-model tables of a postgres sink, brought to the same canonical text.
async fn postgres_sink_views(dsn: &str, schema: &str) -> BTreeMap<String, ViewRows> {
    use datafusion::arrow::datatypes::DataType;
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut out = BTreeMap::new();
    for def in transforms::state::view_defs() {
        let cols: Vec<String> = def
            .schema
            .fields()
            .iter()
            .map(|f| {
                let c = format!("\"{}\"", f.name());
                match f.data_type() {
                    DataType::Utf8 | DataType::Int64 | DataType::Decimal128(..) => {
                        format!("{c}::text")
                    }
                    DataType::Float64 => format!("trim(to_char({c}, 'FM999999990.000000000'))"),
                    DataType::Timestamp(..) => {
                        format!("(extract(epoch from {c}) * 1000000)::bigint::text")
                    }
                    other => panic!("no canonical form for {other}"),
                }
            })
            .collect();
        let sql = format!(
            "SELECT {} FROM \"{schema}\".\"{}\"",
            cols.join(", "),
            def.name
        );
        let mut rows = ViewRows::new();
        for r in client
            .query(&sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
        {
            let row: Vec<String> = (0..cols.len())
                .map(|i| {
                    r.get::<_, Option<String>>(i)
                        .unwrap_or_else(|| "null".into())
                })
                .collect();
            rows.insert(def.key.iter().map(|k| row[*k].clone()).collect(), row);
        }
        out.insert(def.name.clone(), rows);
    }
    out
}

/// A parquet sink's changelog files replayed in name order, applied by key.
fn parquet_sink_views(dir: &std::path::Path) -> BTreeMap<String, ViewRows> {
    use datafusion::arrow::array::AsArray;
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut out = BTreeMap::new();
    for def in transforms::state::view_defs() {
        let mut files: Vec<PathBuf> = Vec::new();
        let view_dir = dir.join(&def.name);
        for day in std::fs::read_dir(&view_dir).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(day.path()).unwrap().flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.starts_with("part-") && name.ends_with(".parquet") {
                    files.push(f.path());
                }
            }
        }
        files.sort_by_key(|p| p.file_name().unwrap().to_owned());
        let mut rows = ViewRows::new();
        let width = def.schema.fields().len();
        for f in files {
            let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&f).unwrap())
                .unwrap()
                .build()
                .unwrap();
            for b in reader {
                let b = b.unwrap();
                let op = b.column_by_name("_op").unwrap().as_string::<i32>().clone();
                for i in 0..b.num_rows() {
                    let row: Vec<String> =
                        (0..width).map(|c| canon(b.column(c).as_ref(), i)).collect();
                    let key: Vec<String> = def.key.iter().map(|k| row[*k].clone()).collect();
                    match op.value(i) {
                        "upsert" => {
                            rows.insert(key, row);
                        }
                        "delete" => {
                            rows.remove(&key);
                        }
                        other => panic!("unknown _op {other} in {}", f.display()),
                    }
                }
            }
        }
        out.insert(def.name.clone(), rows);
    }
    out
}

/// The compacted view topics of a kafka sink: the last value per key, tombstones remove it.
/// Values are JSON; compared by key set and, for the stock view, by `available`.
fn kafka_sink_keys(brokers: &str, prefix: &str, view: &str) -> BTreeMap<String, serde_json::Value> {
    let topic = format!("{prefix}.view.{view}");
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "views-sink-test")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut last: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut quiet = Instant::now() + Duration::from_secs(3);
    while quiet.elapsed() < Duration::from_secs(1) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            quiet = Instant::now();
            let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
            match m.payload() {
                Some(v) => {
                    last.insert(key, serde_json::from_slice(v).unwrap());
                }
                None => {
                    last.remove(&key);
                }
            }
        }
    }
    last
}

fn sinks_config(
    db: &TestDb,
    rm_dsn: &str,
    late: bool,
    metrics_port: u16,
) -> (PathBuf, walbridge::config::Config) {
    let mut yaml = db.config_yaml()
        + &format!(
            "processors:\n  metrics_listen: \"127.0.0.1:{metrics_port}\"\n  group_id: views\n  checkpoint_dir: \"{}\"\n  epoch_interval_ms: 50\n  checkpoint_interval_ms: 3000\n  sql: {{ listen: \"127.0.0.1:0\", user: analyst, password: pw }}\n  sinks:\n    - {{ kind: postgres, name: rm, dsn: \"{rm_dsn}\", schema: views_rm }}\n    - {{ kind: parquet, name: lake, dir: \"{}\" }}\n    - {{ kind: kafka, name: topics, topic_prefix: {}vt }}\n",
            db.dir.join("processors").display(),
            db.dir.join("lake").display(),
            db.name,
        );
    if late {
        yaml += &format!(
            "    - {{ kind: parquet, name: late, dir: \"{}\" }}\n",
            db.dir.join("late").display()
        );
    }
    let path = db.dir.join(if late {
        "sinks-late.yaml"
    } else {
        "sinks.yaml"
    });
    std::fs::write(&path, yaml).unwrap();
    let cfg = walbridge::config::load(&path).expect("config with sinks");
    (path, cfg)
}

fn assert_views_equal(
    what: &str,
    got: &BTreeMap<String, ViewRows>,
    want: &BTreeMap<String, ViewRows>,
) {
    for (view, rows) in want {
        let g = got.get(view).cloned().unwrap_or_default();
        let missing: Vec<_> = rows
            .iter()
            .filter(|(k, v)| g.get(*k) != Some(v))
            .take(5)
            .collect();
        let extra: Vec<_> = g
            .keys()
            .filter(|k| !rows.contains_key(*k))
            .take(5)
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{what}: view {view} differs from the processors' views ({} rows vs {}); wrong or missing: {missing:?}; extra keys: {extra:?}",
            g.len(),
            rows.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinks_fed_by_a_processor_killed_mid_stream_hold_exactly_its_views() {
    let mut db = TestDb::new("views_sinks").await;
    db.snapshot = "initial";
    let rm_db = format!("{}_rm", db.name);
    db.exec(&[&format!("CREATE DATABASE {rm_db}")]).await;
    let rm_dsn = db
        .dsn
        .replace(&format!("dbname={}", db.name), &format!("dbname={rm_db}"));
    assert_ne!(rm_dsn, db.dsn, "the test's dsn names its database");
    let port = walbridge::stack::free_port();
    let (path, cfg) = sinks_config(&db, &rm_dsn, false, port);
    let mut wb = db.start().await;
    let log = db.dir.join("process.log");
    let p = Processor::start(&path, &log);
    let ckpt = cfg.processor_config().unwrap().checkpoint_path();

    // A second instance of the same group is refused while the first runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("sql endpoint ready")
    {
        assert!(Instant::now() < deadline, "processor did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = process_refused(&path, "a second processor of one group");
    assert!(
        err.contains("already runs the processors of group views"),
        "{err}"
    );

    // The checkpoint (every 3 s) lags the sinks (every 50 ms epoch): at the kill the sinks
    // hold epochs past it, so the restart must cut its replay where they stand.
    workload(&db, 7, 400, 2000.0).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ckpt.exists() {
        assert!(
            Instant::now() < deadline,
            "no checkpoint after 60 s:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    workload(&db, 8, 300, 2000.0).await;
    p.kill9();
    workload(&db, 9, 200, 2000.0).await;
    let p = Processor::start(&path, &log);
    workload(&db, 10, 200, 2000.0).await;
    db.wait_caught_up(&mut wb).await;
    check(&db, &cfg).await;
    processor_metrics_show_progress(port, &cfg).await;
    p.stop();
    let report = check(&db, &cfg).await;
    assert_eq!(
        report.applied_after_checkpoint,
        0,
        "final checkpoint behind:\n{}",
        report.render()
    );
    let want = checkpoint_views(&cfg);
    let rm_schema = "views_rm";
    assert_views_equal(
        "postgres sink",
        &postgres_sink_views(&rm_dsn, rm_schema).await,
        &want,
    );
    assert_views_equal(
        "parquet sink",
        &parquet_sink_views(&db.dir.join("lake")),
        &want,
    );
    for view in ["stock_availability", "customer_360"] {
        let topics = kafka_sink_keys(&db.brokers, &format!("{}vt", db.name), view);
        let want_keys = want[view].len();
        assert_eq!(
            topics.len(),
            want_keys,
            "kafka sink: {view} has {} keys, the view {want_keys}",
            topics.len()
        );
    }
    let stock = kafka_sink_keys(&db.brokers, &format!("{}vt", db.name), "stock_availability");
    for row in want["stock_availability"].values() {
        let k = format!(
            "{{\"sku\":\"{}\",\"location_code\":\"{}\"}}",
            row[0], row[1]
        );
        let got = stock.get(&k).unwrap_or_else(|| {
            panic!(
                "kafka sink lacks key {k}; has e.g. {:?}",
                stock.keys().next()
            )
        });
        assert_eq!(
            got["available"].to_string(),
            row[5],
            "kafka sink: available of {k}"
        );
    }

    // A sink added later gets every view in full, then the epochs after it.
    let (late_path, _) = sinks_config(&db, &rm_dsn, true, port);
    let p = Processor::start(&late_path, &log);
    workload(&db, 11, 100, 2000.0).await;
    db.wait_caught_up(&mut wb).await;
    check(&db, &cfg).await;
    p.stop();
    let want = checkpoint_views(&cfg);
    assert_views_equal(
        "late parquet sink",
        &parquet_sink_views(&db.dir.join("late")),
        &want,
    );
    assert_views_equal(
        "postgres sink after more",
        &postgres_sink_views(&rm_dsn, rm_schema).await,
        &want,
    );

    // Left out of the config while the views moved on, it is refused, not silently wrong.
    let p = Processor::start(&path, &log);
    workload(&db, 12, 100, 2000.0).await;
    db.wait_caught_up(&mut wb).await;
    check(&db, &cfg).await;
    p.stop();
    let err = process_refused(&late_path, "a sink behind the checkpoint");
    assert!(
        err.contains("view sink late")
            && err.contains("missed the epochs")
            && err.contains(&db.dir.join("late").display().to_string()),
        "says which sink, why, and how to rebuild it:\n{err}"
    );
    wb.stop();
}

/// The processor's metrics endpoint, once it caught up: messages folded, every partition's lag
/// reported, every change's age as read and as visible, no epoch waiting for the sinks, a
/// recent checkpoint, healthy.
async fn processor_metrics_show_progress(port: u16, cfg: &walbridge::config::Config) {
    let base = format!("http://127.0.0.1:{port}");
    let topic = format!("{}.wms.stock_levels", cfg.kafka.topic_prefix);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (text, samples) = scrape(port).await;
        let v = |name: &str| samples.iter().find(|s| s.name == name).map(|s| s.value);
        let lags: Vec<f64> = samples
            .iter()
            .filter(|s| {
                s.name == "walbridge_processor_consumer_lag_messages"
                    && s.labels.get("topic") == Some(&topic)
            })
            .map(|s| s.value)
            .collect();
        let ok = v("walbridge_processor_messages_total").is_some_and(|n| n > 0.0)
            && v("walbridge_processor_epochs_total").is_some_and(|n| n > 0.0)
            && v("walbridge_processor_sink_backlog_epochs") == Some(0.0)
            && v("walbridge_processor_checkpoint_age_ms")
                .is_some_and(|a| (0.0..10_000.0).contains(&a))
            && v("walbridge_processor_source_lag_ms").is_some_and(|a| a >= 0.0)
            // Every change read is in SQL once caught up, and its age was taken both times.
            && v("walbridge_processor_event_visible_age_seconds_count").is_some_and(|n| n > 0.0)
            && v("walbridge_processor_event_visible_age_seconds_count")
                == v("walbridge_processor_event_read_age_seconds_count")
            && v("walbridge_processor_up") == Some(1.0)
            && lags.len() == cfg.kafka.partitions as usize
            && lags.iter().all(|l| *l >= 0.0);
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processor metrics did not show progress:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let health = reqwest::get(format!("{base}/health")).await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
}

/// A checkpoint's offset can lie inside the topic's last record batch: the processor was
/// stopped between two messages of one fetch. tansu answers a fetch from there with nothing
/// (it lists batches from the offset asked on), so a restarted processor used to wait, without
/// the rest of that batch, until more changes came. Here ten messages after the checkpoint
/// sit in the one batch of a quiet partition; every one of them must be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_inside_the_last_record_batch_reads_the_rest_of_it() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

    let db = TestDb::new("views_mid_batch").await;
    let (_, cfg) = config(&db, 200);
    let pc = cfg.processor_config().unwrap();
    let topic = format!("{}.wms.stock_levels", pc.topic_prefix);
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", &db.brokers)
        .create()
        .unwrap();
    admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    // One produce request: a long linger puts the twenty messages in one batch.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &db.brokers)
        .set("linger.ms", "500")
        .create()
        .unwrap();
    let payloads: Vec<String> = (0..20).map(|i| format!("not a change {i}")).collect();
    let sends: Vec<_> = payloads
        .iter()
        .map(|p| producer.send_result(FutureRecord::<(), _>::to(&topic).partition(0).payload(p)))
        .collect();
    for s in sends {
        s.unwrap().await.unwrap().unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    // A checkpoint after the first ten.
    let mut saved = transforms::state::State::new(pc.safety_stock.clone()).save(&pc.topic_prefix);
    saved.offsets = vec![(topic.clone(), 0, 10)];
    std::fs::create_dir_all(&pc.checkpoint_dir).unwrap();
    std::fs::write(pc.checkpoint_path(), serde_json::to_vec(&saved).unwrap()).unwrap();

    let running = transforms::run(pc.clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let read = loop {
        let skipped = running
            .stats
            .undecodable
            .load(std::sync::atomic::Ordering::Relaxed);
        if skipped >= 10 || Instant::now() > deadline {
            break skipped;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    running.stop().await.unwrap();
    // The messages are not changes, so each read one counts as undecodable: exactly the ten
    // after the checkpoint, none before it twice.
    assert_eq!(
        read, 10,
        "messages after the checkpoint read by the processor"
    );
    let after = transforms::runtime::load_checkpoint(&pc).unwrap();
    assert_eq!(after.offsets.0.get(&(topic.clone(), 0)), Some(&20));
}

/// `processors:` for instances that share the partitions (`instances: group`), with an SQL
/// endpoint on `sql_port`, a read model at `rm_dsn` and view topics `<prefix>gvt.view.*`.
fn group_config(
    db: &TestDb,
    name: &str,
    sql_port: u16,
    metrics_port: u16,
    rm_dsn: &str,
) -> (PathBuf, walbridge::config::Config) {
    let yaml = db.config_yaml()
        + &format!(
            "processors:\n  metrics_listen: \"127.0.0.1:{metrics_port}\"\n  group_id: views_group\n  instances: group\n  checkpoint_dir: \"{}\"\n  epoch_interval_ms: 50\n  checkpoint_interval_ms: 200\n  sql: {{ listen: \"127.0.0.1:{sql_port}\", user: analyst, password: pw }}\n  safety_stock:\n    default: 1\n    categories: {{ apparel: 3, home: 2 }}\n    skus: {{ SKU-000001: 100000 }}\n  sinks:\n    - {{ kind: postgres, name: rm, dsn: \"{rm_dsn}\", schema: views_group_rm }}\n    - {{ kind: kafka, name: topics, topic_prefix: {}gvt }}\n    - {{ kind: parquet, name: lake, dir: \"{}\" }}\n",
            db.dir.join("processors-group").display(),
            db.name,
            db.dir.join("group-lake").display()
        );
    let path = db.dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    let cfg = walbridge::config::load(&path).expect("config with a processor group");
    (path, cfg)
}

/// Moves orders to a customer in another partition and back: some within one transaction,
/// some in two, some only away.
async fn move_orders(db: &TestDb) {
    let part = |c: i64| sinks::kafka::partition_for(c.to_string().as_bytes(), 3);
    let rows = db
        .client
        .query(
            "SELECT id, customer_id FROM oms.orders ORDER BY id LIMIT 9",
            &[],
        )
        .await
        .unwrap();
    let customers: Vec<i64> = db
        .client
        .query("SELECT id FROM oms.customers ORDER BY id LIMIT 500", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(rows.len() == 9 && !customers.is_empty());
    for (n, r) in rows.iter().enumerate() {
        let (order, from): (i64, i64) = (r.get(0), r.get(1));
        let to = *customers
            .iter()
            .find(|c| part(**c) != part(from))
            .expect("a customer in another partition");
        let away = format!("UPDATE oms.orders SET customer_id = {to} WHERE id = {order}");
        let back = format!("UPDATE oms.orders SET customer_id = {from} WHERE id = {order}");
        let sql = match n % 3 {
            0 => format!("BEGIN; {away}; {back}; COMMIT"),
            1 => format!("{away}; {back}"),
            _ => away,
        };
        db.client.batch_execute(&sql).await.unwrap();
    }
}

/// How many lines of the log at `path` contain `needle`.
fn log_count(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

async fn wait_log(path: &Path, needle: &str, more_than: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while log_count(path, needle) <= more_than {
        assert!(
            Instant::now() < deadline,
            "{what} within 90 s:\n{}",
            std::fs::read_to_string(path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every view of a group's shards, merged, as their final checkpoints hold them.
fn group_views(cfg: &walbridge::config::Config) -> BTreeMap<String, ViewRows> {
    state_views(&transforms::runtime::load_merged(&cfg.processor_config().unwrap()).unwrap())
}

/// Two instances in one consumer group (scale-out): one joins mid-stream and takes a share of
/// the SKU and customer partitions, then leaves and the other takes them back. While the
/// units are split, each member's SQL endpoint serves exactly the one instance's views (the
/// other member's units read from the view topics). Together they end with exactly the views
/// of one instance reading everything, the SQL endpoint of a member serves the whole views
/// (the reconciliation summary merged from its shards), and the group's checkpoints equal SQL
/// on the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processor_instances_in_one_group_hold_the_views_of_one() {
    let mut db = TestDb::new("views_group").await;
    db.snapshot = "initial";
    db.exec(&[
        "ALTER TABLE oms.order_lines REPLICA IDENTITY FULL",
        "ALTER TABLE oms.orders REPLICA IDENTITY FULL",
    ])
    .await;
    // Orders by customer too: an order whose customer changes moves between partitions, and
    // the fold puts its changes back in source order.
    db.kafka_extra = "  partition_by:\n    oms.products: [sku]\n    oms.order_lines: [sku]\n    oms.inventory_cache: [sku]\n    wms.stock_levels: [sku]\n    oms.customers: [id]\n    oms.orders: [customer_id]\n".into();
    let (one_path, one_cfg) = config(&db, 200);
    // The one instance serves SQL too, as the reference for the members' endpoints.
    let one_sql = walbridge::stack::free_port();
    let mut yaml = std::fs::read_to_string(&one_path).unwrap();
    yaml += &format!("  sql: {{ listen: \"127.0.0.1:{one_sql}\", user: analyst, password: pw }}\n");
    std::fs::write(&one_path, yaml).unwrap();
    let rm_db = format!("{}_rm", db.name);
    db.exec(&[&format!("CREATE DATABASE {rm_db}")]).await;
    let rm_dsn = db
        .dsn
        .replace(&format!("dbname={}", db.name), &format!("dbname={rm_db}"));
    let sql_port = walbridge::stack::free_port();
    let (a_metrics, b_metrics) = (walbridge::stack::free_port(), walbridge::stack::free_port());
    let (a_path, group_cfg) = group_config(&db, "member-a", sql_port, a_metrics, &rm_dsn);
    let b_sql = walbridge::stack::free_port();
    let (b_path, _) = group_config(&db, "member-b", b_sql, b_metrics, &rm_dsn);
    let mut wb = db.start().await;
    // Topics cut into units with unequal partition counts: partition i would not hold the same
    // SKUs and customers in each, so a member refuses to start.
    let odd = format!("{}odd", db.name);
    let admin = sinks::kafka::admin_config(&db.brokers, &[]);
    for (table, partitions) in [("wms.stock_levels", 3), ("oms.orders", 2)] {
        sinks::kafka::create_topics(&admin, &[format!("{odd}.{table}")], partitions, 1, &[])
            .await
            .expect("create a topic");
    }
    let odd_path = db.dir.join("member-odd.yaml");
    std::fs::write(
        &odd_path,
        std::fs::read_to_string(&a_path).unwrap().replace(
            &format!("topic_prefix: {}\n", db.name),
            &format!("topic_prefix: {odd}\n"),
        ),
    )
    .unwrap();
    let err = process_refused(
        &odd_path,
        "a member over topics with unequal partition counts",
    );
    assert!(
        err.contains(&format!("{odd}.wms.stock_levels: 3, {odd}.oms.orders: 2"))
            && err.contains("equal partition counts"),
        "{err}"
    );
    let one = Processor::start(&one_path, &db.dir.join("one.log"));
    let (a_log, b_log) = (db.dir.join("member-a.log"), db.dir.join("member-b.log"));
    let a = Processor::start(&a_path, &a_log);
    wait_log(
        &a_log,
        "unit started",
        5,
        "the first member started all six units",
    )
    .await;
    // A one-instance process for the same group would fold the same units: refused.
    let single = db.dir.join("single-in-group.yaml");
    std::fs::write(
        &single,
        std::fs::read_to_string(&a_path)
            .unwrap()
            .replace("instances: group", "instances: single"),
    )
    .unwrap();
    let err = process_refused(&single, "a single instance beside the group's members");
    assert!(
        err.contains("with processors.instances: group, every member does"),
        "{err}"
    );
    workload(&db, 11, 300, 2000.0).await;

    // B joins: the group rebalances, A stops its units with a final checkpoint, B gets some.
    let b = Processor::start(&b_path, &b_log);
    wait_log(&b_log, "unit started", 0, "the second member got units").await;
    workload(&db, 12, 300, 2000.0).await;
    move_orders(&db).await;
    assert!(
        log_count(&a_log, "units revoked") > 0,
        "A gave units up when B joined"
    );
    // Incremental rebalancing: the units A kept folded on, none was restarted.
    assert_eq!(
        log_count(&a_log, "unit started"),
        6,
        "A restarted units it kept:\n{}",
        std::fs::read_to_string(&a_log).unwrap_or_default()
    );

    // While the units are split, each member's SQL endpoint serves the whole views: its own
    // units live, the other member's from the view topics. Both equal the one instance's.
    db.wait_caught_up(&mut wb).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reference = sql_views(one_sql).await;
        let (on_a, on_b) = (sql_views(sql_port).await, sql_views(b_sql).await);
        if on_a == reference && on_b == reference {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the members' SQL endpoints did not reach the one instance's views within 60 s: {}",
            sql_views_diff(&reference, &[("A", &on_a), ("B", &on_b)])
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        log_count(
            &b_log,
            "the other members' units are read from the view topics"
        ) > 0,
        "B read A's units from the view topics"
    );
    // Each member's metrics: its own units, its sinks caught up, the other units read.
    let mut units = 0.0;
    for port in [a_metrics, b_metrics] {
        units += member_metrics_settle(port).await;
    }
    assert_eq!(units, 6.0, "the members fold the six units between them");

    // B leaves cleanly: A takes its units back from B's final checkpoints.
    let a_started = log_count(&a_log, "unit started");
    b.stop();
    wait_log(&a_log, "unit started", a_started, "A took the units back").await;
    workload(&db, 13, 200, 2000.0).await;
    db.wait_caught_up(&mut wb).await;

    // The one-instance reference.
    check(&db, &one_cfg).await;
    one.stop();
    let report = check(&db, &one_cfg).await;
    assert_eq!(report.applied_after_checkpoint, 0, "{}", report.render());
    let want = checkpoint_views(&one_cfg);

    // A's SQL endpoint serves the whole views from its four units.
    let client = analyst(sql_port).await;
    let summary = &want["reconciliation_summary"];
    assert_eq!(summary.len(), 1);
    let want_summary: Vec<String> = summary.values().next().unwrap()[1..6].to_vec();
    // Customer-360's segments: each customer unit draws the top 5 % over all customers from
    // the others' rank shares.
    let mut want_segments: BTreeMap<String, i64> = BTreeMap::new();
    for row in want["customer_360"].values() {
        *want_segments.entry(row[10].clone()).or_default() += 1;
    }
    assert!(want_segments.contains_key("top_5pct"), "{want_segments:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut got = Vec::new();
        for view in want.keys() {
            let n: i64 = client
                .query_one(&format!("SELECT count(*) FROM {view}"), &[])
                .await
                .unwrap()
                .get(0);
            got.push((view.clone(), n as usize));
        }
        let row = client
            .query_one(
                "SELECT diffs, missing_in_oms, missing_in_wms, mismatches, units_at_risk FROM reconciliation_summary",
                &[],
            )
            .await
            .unwrap();
        let got_summary: Vec<String> = (0..5).map(|i| row.get::<_, i64>(i).to_string()).collect();
        let got_segments: BTreeMap<String, i64> = client
            .query(
                "SELECT segment, count(*) FROM customer_360 GROUP BY segment",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let want_counts: Vec<(String, usize)> =
            want.iter().map(|(v, r)| (v.clone(), r.len())).collect();
        if got == want_counts && got_summary == want_summary && got_segments == want_segments {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the member's SQL views {got:?} with summary {got_summary:?} and segments {got_segments:?} did not reach one instance's {want_counts:?} with {want_summary:?} and {want_segments:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The group's final checkpoints: equal to SQL, and to the one instance's views row by row.
    a.stop();
    let report = check(&db, &group_cfg).await;
    assert_eq!(
        report.applied_after_checkpoint,
        0,
        "the group's final checkpoints were behind the topics:\n{}",
        report.render()
    );
    // `since` is when a diff opened as this reader saw it: stock levels and the inventory
    // cache are separate topics, so two readers interleave them differently and a diff can
    // open (or heal for a moment) at different changes. `views check` skips it for the same
    // reason.
    assert_views_equal(
        "two instances in one group",
        &without_event_times(group_views(&group_cfg)),
        &without_event_times(want.clone()),
    );

    // The sinks every unit fed, whichever member ran it: the read model and the lake hold the
    // views of one instance, with the summary as one row per shard that adds up to the whole.
    let mut whole = without_event_times(want);
    let want_summary = whole.remove("reconciliation_summary").unwrap();
    let rm = postgres_sink_views(&rm_dsn, "views_group_rm").await;
    let lake = parquet_sink_views(&db.dir.join("group-lake"));
    for (what, views) in [("the group's read model", rm), ("the group's lake", lake)] {
        let mut views = without_event_times(views);
        let parts = views.remove("reconciliation_summary").unwrap();
        assert_views_equal(what, &views, &whole);
        let scopes: Vec<&String> = parts.keys().map(|k| &k[0]).collect();
        assert_eq!(
            scopes,
            [
                "customers-0",
                "customers-1",
                "customers-2",
                "skus-0",
                "skus-1",
                "skus-2"
            ],
            "{what}: a summary row per shard"
        );
        let sums: Vec<String> = (1..6)
            .map(|c| {
                parts
                    .values()
                    .map(|r| r[c].parse::<i64>().unwrap())
                    .sum::<i64>()
                    .to_string()
            })
            .collect();
        assert_eq!(sums, want_summary.values().next().unwrap()[1..6], "{what}");
    }
    // The read model's total view adds the shards' rows up into the one instance's row.
    let mut want_total = vec!["all".to_owned()];
    want_total.extend_from_slice(&want_summary.values().next().unwrap()[1..6]);
    assert_eq!(
        postgres_summary_total(&rm_dsn, "views_group_rm").await,
        [want_total.clone()],
        "the group's read model: reconciliation_summary_total"
    );
    // The view topics: the latest record per key is every row of the view, tombstones applied.
    for (view, rows) in &whole {
        let keys = kafka_sink_keys(&db.brokers, &format!("{}gvt", db.name), view);
        assert_eq!(keys.len(), rows.len(), "view topic {view}");
    }

    // Back to one instance over the same sinks (a switch of processors.instances starts from
    // no checkpoint): the group's lake is refused, and the read model and the view topics end
    // with one summary row, `all`, holding the whole view's counts, not it beside the shards'.
    let fresh = db.dir.join("processors-switch");
    let switch = |lake: bool| -> PathBuf {
        let yaml = std::fs::read_to_string(&a_path)
            .unwrap()
            .replace("instances: group", "instances: single")
            .replace(
                &db.dir.join("processors-group").display().to_string(),
                &fresh.display().to_string(),
            );
        let yaml: String = yaml
            .lines()
            .filter(|l| lake || !l.contains("kind: parquet"))
            .map(|l| format!("{l}\n"))
            .collect();
        let path = db.dir.join(format!("switch-lake-{lake}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        path
    };
    let err = process_refused(&switch(true), "one instance over the group's lake");
    assert!(
        err.contains("written with processors.instances: group"),
        "{err}"
    );
    let single = Processor::start(&switch(false), &db.dir.join("switch.log"));
    let want_counts = want_summary.values().next().unwrap()[1..6].to_vec();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rm = postgres_sink_views(&rm_dsn, "views_group_rm").await;
        let rows = &rm["reconciliation_summary"];
        let topic = kafka_sink_keys(
            &db.brokers,
            &format!("{}gvt", db.name),
            "reconciliation_summary",
        );
        let scopes: Vec<&String> = rows.keys().map(|k| &k[0]).collect();
        if scopes == ["all"]
            && rows.values().next().unwrap()[1..6] == want_counts
            && topic.len() == 1
        {
            // And the total view reads the same over the one row as over the shards' rows.
            assert_eq!(
                postgres_summary_total(&rm_dsn, "views_group_rm").await,
                [want_total],
                "one instance's read model: reconciliation_summary_total"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the switch the read model's summary is {rows:?} and the topic's keys {:?}",
            topic.keys().collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    single.stop();
    wb.stop();
}

/// A processor's `/metrics` page, as text and as samples.
async fn scrape(port: u16) -> (String, Vec<walbridge::status::Sample>) {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let samples = walbridge::status::parse(&text);
    (text, samples)
}

/// Waits until a group member's metrics show it settled (its units' sinks hold every epoch,
/// the other members' units read from the view topics with no write held back) and returns
/// how many units it folds.
async fn member_metrics_settle(port: u16) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (text, samples) = scrape(port).await;
        let v = |name: &str| samples.iter().find(|s| s.name == name).map(|s| s.value);
        let units = v("walbridge_processor_units").unwrap_or(0.0);
        if units > 0.0
            && v("walbridge_processor_sink_backlog_epochs") == Some(0.0)
            && v("walbridge_processor_remote_ready") == Some(1.0)
            && v("walbridge_processor_remote_units") == Some(6.0)
            && v("walbridge_processor_remote_pending_writes") == Some(0.0)
            && v("walbridge_processor_remote_records_total").is_some_and(|n| n > 0.0)
            && v("walbridge_processor_remote_skipped_total") == Some(0.0)
            && v("walbridge_processor_remote_age_ms").is_some_and(|a| a >= 0.0)
            && v("walbridge_processor_up") == Some(1.0)
        {
            return units;
        }
        assert!(
            Instant::now() < deadline,
            "the member's metrics on port {port} did not settle:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A connection to the SQL endpoint on `port` as the tests' analyst.
async fn analyst(port: u16) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=analyst password=pw dbname=walbridge"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap_or_else(|e| panic!("connect to the SQL endpoint on port {port}: {e}"));
    tokio::spawn(conn);
    client
}

/// Every view as a SQL endpoint serves it (text rows, sorted), without the event-time columns
/// (when a diff opened depends on how a reader interleaved the topics).
async fn sql_views(port: u16) -> BTreeMap<String, Vec<Vec<String>>> {
    let client = analyst(port).await;
    let mut out = BTreeMap::new();
    for def in transforms::state::view_defs() {
        let cols: Vec<String> = def
            .schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .filter(|n| n != "since" && n != "oldest_since")
            .collect();
        let q = format!("SELECT {} FROM {}", cols.join(", "), def.name);
        let mut rows: Vec<Vec<String>> = client
            .simple_query(&q)
            .await
            .unwrap()
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("null").to_owned())
                        .collect(),
                ),
                _ => None,
            })
            .collect();
        rows.sort();
        out.insert(def.name.clone(), rows);
    }
    out
}

/// Per endpoint and view: how many rows differ from the reference, and the first of them.
fn sql_views_diff(
    reference: &BTreeMap<String, Vec<Vec<String>>>,
    got: &[(&str, &BTreeMap<String, Vec<Vec<String>>>)],
) -> String {
    let mut out = String::new();
    for (who, views) in got {
        for (view, want) in reference {
            let have = &views[view];
            let missing: Vec<_> = want.iter().filter(|r| !have.contains(r)).collect();
            let extra: Vec<_> = have.iter().filter(|r| !want.contains(r)).collect();
            if !missing.is_empty() || !extra.is_empty() {
                out += &format!(
                    "\n{who} {view}: {} rows vs {}, {} missing (first {:?}), {} extra (first {:?})",
                    have.len(),
                    want.len(),
                    missing.len(),
                    missing.first(),
                    extra.len(),
                    extra.first()
                );
            }
        }
    }
    out
}

/// The views without their event-time columns (`since`, `oldest_since`).
fn without_event_times(views: BTreeMap<String, ViewRows>) -> BTreeMap<String, ViewRows> {
    let defs = transforms::state::view_defs();
    views
        .into_iter()
        .map(|(name, rows)| {
            let def = defs.iter().find(|d| d.name == name).expect("a view");
            let keep: Vec<usize> = (0..def.schema.fields().len())
                .filter(|&i| {
                    !matches!(
                        def.schema.field(i).name().as_str(),
                        "since" | "oldest_since"
                    )
                })
                .collect();
            let rows = rows
                .into_iter()
                .map(|(k, r)| (k, keep.iter().map(|&i| r[i].clone()).collect()))
                .collect();
            (name, rows)
        })
        .collect()
}
