//! The live views (issue 5): after a workload, every view the processors keep equals the same
//! view computed by plain SQL on the legacy database; a processor killed with `kill -9` in the
//! middle of the stream and restarted ends with the same views.

use std::collections::BTreeSet;
use std::path::PathBuf;
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

/// SKUs of the alerts in the alert topic.
fn alerted_skus(brokers: &str, topic: &str) -> BTreeSet<String> {
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
            skus.insert(key);
        }
    }
    skus
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_equal_sql_on_the_source_after_a_workload() {
    let mut db = TestDb::new("views_golden").await;
    db.snapshot = "initial";
    let (path, cfg) = config(&db, 200);
    let mut wb = db.start().await;
    let p = Processor::start(&path, &db.dir.join("process.log"));
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
    let alerted = alerted_skus(&db.brokers, &pc.alerts_topic);
    let silent: Vec<&String> = below.difference(&alerted).collect();
    assert!(silent.is_empty(), "below zero without an alert: {silent:?}");
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
