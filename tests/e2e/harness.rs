//! The test harness: real Postgres, real tansu broker, walbridge's own registry, and walbridge
//! itself as a subprocess (so tests can SIGTERM and `kill -9` it as an operator would).
//!
//! One Postgres, one broker and one registry serve the whole test process; each test gets its own
//! database, slot, publication and topic prefix, so tests run in parallel without seeing each
//! other. A test that pauses the broker starts its own.
//!
//! Waiting is done on observable state (the slot's `confirmed_flush_lsn`, a process exit) with a
//! deadline, never with a fixed sleep.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cdc::Lsn;
use walbridge::stack::{Broker, Postgres};
use walbridge::tail::{self, Event};

pub struct Shared {
    pub pg: Postgres,
    pub broker: Broker,
    pub registry_url: String,
    _registry: Child,
    _dir: PathBuf,
}

// The processes are killed when the test binary exits (Drop does not run for statics, so the
// children are started with a parent-death signal where the stack supports it; the temp dir is
// under target/ and cleaned by the next run).
static SHARED: OnceLock<Shared> = OnceLock::new();

pub fn shared() -> &'static Shared {
    SHARED.get_or_init(|| {
        let dir = scratch("shared");
        let pg = Postgres::start(&dir).expect("start postgres");
        let broker = Broker::start().expect("start tansu broker");
        let port = walbridge::stack::free_port();
        let registry = Command::new(env!("CARGO_BIN_EXE_walbridge"))
            .args([
                "registry",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(dir.join("registry"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start registry");
        wait_port(port);
        Shared {
            pg,
            broker,
            registry_url: format!("http://127.0.0.1:{port}"),
            _registry: registry,
            _dir: dir,
        }
    })
}

/// A fresh directory under target/ for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

pub fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on port {port} after 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One test's slice of the stack: its own database (with the legacy fixtures at a small scale),
/// slot, publication and topic prefix.
pub struct TestDb {
    pub name: String,
    pub dsn: String,
    pub client: tokio_postgres::Client,
    pub dir: PathBuf,
    pub brokers: String,
    pub registry_url: String,
}

impl TestDb {
    pub async fn new(name: &str) -> TestDb {
        Self::with_broker(name, &shared().broker.bootstrap()).await
    }

    pub async fn with_broker(name: &str, brokers: &str) -> TestDb {
        let s = shared();
        s.pg.create_database(name).await.expect("create database");
        let dsn = s.pg.dsn(name);
        let (client, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        let opts = legacy_fixtures::InitOptions {
            seed: 1,
            products: 200,
            customers: 300,
            locations: 4,
        };
        legacy_fixtures::init(&client, &opts)
            .await
            .expect("load fixtures");
        TestDb {
            name: name.to_owned(),
            dsn,
            client,
            dir: scratch(name),
            brokers: brokers.to_owned(),
            registry_url: s.registry_url.clone(),
        }
    }

    pub fn config_yaml(&self) -> String {
        format!(
            "source:\n  dsn: \"{}\"\n  publication: {n}\n  slot: {n}\n  tables: [\"oms.*\", \"wms.*\"]\n  status_interval_ms: 100\n  heartbeat_interval_ms: 1000\n\
             kafka:\n  brokers: \"{}\"\n  topic_prefix: {n}\n  partitions: 3\n\
             registry:\n  url: \"{}\"\n",
            self.dsn,
            self.brokers,
            self.registry_url,
            n = self.name
        )
    }

    pub fn write_config(&self) -> PathBuf {
        let p = self.dir.join("pipelines.yaml");
        std::fs::write(&p, self.config_yaml()).expect("write config");
        p
    }

    pub fn start(&self) -> Walbridge {
        Walbridge::start(&self.write_config(), &self.dir.join("walbridge.log"))
    }

    pub async fn current_lsn(&self) -> Lsn {
        let s: String = self
            .client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        s.parse().unwrap()
    }

    pub async fn confirmed(&self) -> Option<Lsn> {
        let row = self
            .client
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.name],
            )
            .await
            .unwrap()?;
        row.get::<_, Option<String>>(0).map(|s| s.parse().unwrap())
    }

    /// Waits until the slot has confirmed `lsn` (everything up to it is acked by Kafka).
    pub async fn wait_confirmed(&self, lsn: Lsn, wb: &mut Walbridge) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if self.confirmed().await.is_some_and(|c| c >= lsn) {
                return;
            }
            if let Some(status) = wb.try_exit() {
                panic!(
                    "walbridge exited ({status}) before confirming {lsn}; log:\n{}",
                    wb.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "slot did not confirm {lsn} in 90 s; log:\n{}",
                wb.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every event of this test's topics, decoded through the registry.
    pub async fn events(&self) -> Vec<Event> {
        let registry = avro::RegistryClient::new(&self.registry_url).unwrap();
        let topics = tail::topics_with_prefix(&self.brokers, &format!("{}.", self.name)).unwrap();
        tail::read_all(
            &self.brokers,
            &registry,
            &topics,
            Duration::from_secs(2),
            Duration::from_secs(120),
        )
        .await
        .unwrap()
    }
}

/// walbridge running as a child process.
pub struct Walbridge {
    child: Child,
    log: PathBuf,
}

impl Walbridge {
    pub fn start(config: &Path, log: &Path) -> Walbridge {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_walbridge"))
            .args(["run", "-c"])
            .arg(config)
            .env("RUST_LOG", "info,rdkafka=warn")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start walbridge");
        Walbridge {
            child,
            log: log.to_owned(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then wait for the exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        signal(self.child.id(), "TERM");
        self.wait(Duration::from_secs(60))
    }

    /// `kill -9`.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.try_exit() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "walbridge did not exit in {limit:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Walbridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid} failed");
}

/// The commit LSN in an event id (`<commit LSN>:<index>`).
pub fn event_commit_lsn(e: &Event) -> Lsn {
    e.event_id()
        .and_then(|id| id.split(':').next())
        .and_then(|l| l.parse().ok())
        .expect("event id")
}

/// Field `name` of the envelope's `before` or `after` row (`which`); `None` when that row is
/// null or lacks the field.
pub fn field<'a>(e: &'a Event, which: &str, name: &str) -> Option<&'a serde_json::Value> {
    let row = e.value.as_ref()?.get(which)?;
    if row.is_null() {
        return None;
    }
    row.get(name)
}
