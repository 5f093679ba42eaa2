//! The test harness: real Postgres, real tansu broker, walbridge's own registry, and walbridge
//! itself as a subprocess (so tests can SIGTERM and `kill -9` it as an operator would).
//!
//! One Postgres and one registry serve the whole test process; each test gets its own database,
//! slot, publication, topic prefix and broker, so tests run in parallel without seeing each other.
//!
//! A broker per test keeps tests from sharing anything a test may pause or that another test's
//! load could slow down; tansu starts in a fraction of a second.
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
    pub registry_url: String,
    _registry: Child,
    _dir: PathBuf,
}

// Drop does not run for statics: the shared Postgres and registry are stopped by an exit hook
// (`stop_shared`), so a test run leaves no servers behind. The temp dir is under target/ and
// cleaned by the next run.
static SHARED: OnceLock<Shared> = OnceLock::new();

extern "C" fn stop_shared() {
    if let Some(s) = SHARED.get() {
        s.pg.stop_at_exit();
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        unsafe {
            libc::kill(s._registry.id() as libc::pid_t, libc::SIGKILL);
        }
    }
}

pub fn shared() -> &'static Shared {
    SHARED.get_or_init(|| {
        let dir = scratch("shared");
        let pg = Postgres::start(&dir).expect("start postgres");
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
        // SAFETY: registers a plain extern "C" function, once (inside get_or_init).
        unsafe {
            libc::atexit(stop_shared);
        }
        Shared {
            pg,
            registry_url: format!("http://127.0.0.1:{port}"),
            _registry: registry,
            _dir: dir,
        }
    })
}

/// A fresh directory under target/ for one test. A run's directories stay after it (to read
/// after a failure) until the next run starts, which removes those of runs no longer alive, so
/// repeated runs do not fill the disk (one run leaves a few GB: databases, broker data).
pub fn scratch(name: &str) -> PathBuf {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(sweep_old_scratch);
    let d =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// Removes the scratch directories (`e2e-<name>-<pid>`) of test processes that have ended.
fn sweep_old_scratch() {
    let Ok(entries) = std::fs::read_dir(env!("CARGO_TARGET_TMPDIR")) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.starts_with("e2e-"))
            .and_then(|n| n.rsplit_once('-'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
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
    pub broker: Broker,
    /// A Postgres of the test's own, for tests that restart it.
    own_pg: Option<Postgres>,
    /// `source.snapshot` for walbridge: `never` unless a test is about the snapshot, so that
    /// tests see only the changes they make.
    pub snapshot: &'static str,
    /// More `source` settings, as YAML lines indented by two spaces.
    pub source_extra: String,
    /// More `registry` settings, as YAML lines indented by two spaces.
    pub registry_extra: String,
    /// More `kafka` settings, as YAML lines indented by two spaces.
    pub kafka_extra: String,
    /// `metrics.listen` for walbridge (`ip:port`); no metrics section when `None`.
    pub metrics_listen: Option<String>,
    /// More top-level sections (e.g. `telemetry:`), as YAML appended to the config.
    pub extra_sections: String,
    /// Environment variables for the walbridge child (e.g. `SSL_CERT_FILE`).
    pub child_env: Vec<(String, String)>,
}

impl TestDb {
    /// A database on the shared Postgres.
    pub async fn new(name: &str) -> TestDb {
        Self::create(name, false).await
    }

    /// A database on a Postgres of its own, which the test may restart.
    pub async fn with_own_postgres(name: &str) -> TestDb {
        Self::create(name, true).await
    }

    async fn create(name: &str, own: bool) -> TestDb {
        let s = shared();
        let dir = scratch(name);
        let own_pg = own.then(|| Postgres::start(&dir.join("pg")).expect("start own postgres"));
        let pg = own_pg.as_ref().unwrap_or(&s.pg);
        let broker = Broker::start().expect("start tansu broker");
        pg.create_database(name).await.expect("create database");
        let dsn = pg.dsn(name);
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
            dir,
            brokers: broker.bootstrap(),
            registry_url: s.registry_url.clone(),
            broker,
            own_pg,
            snapshot: "never",
            source_extra: String::new(),
            registry_extra: String::new(),
            kafka_extra: String::new(),
            metrics_listen: None,
            extra_sections: String::new(),
            child_env: Vec::new(),
        }
    }

    /// Restarts the test's own Postgres (`pg_ctl restart -m fast`: every connection is cut) and
    /// reconnects the test's client.
    pub async fn restart_postgres(&mut self) {
        let mut pg = self
            .own_pg
            .take()
            .expect("restart_postgres needs with_own_postgres");
        let pg = tokio::task::spawn_blocking(move || {
            pg.restart().expect("restart postgres");
            pg
        })
        .await
        .unwrap();
        self.own_pg = Some(pg);
        let (client, conn) = tokio_postgres::connect(&self.dsn, tokio_postgres::NoTls)
            .await
            .expect("reconnect");
        tokio::spawn(conn);
        self.client = client;
    }

    pub fn config_yaml(&self) -> String {
        let metrics = self
            .metrics_listen
            .as_ref()
            .map_or(String::new(), |l| format!("metrics:\n  listen: \"{l}\"\n"));
        metrics
            + &format!(
                "source:\n  dsn: \"{}\"\n  publication: {n}\n  slot: {n}\n  tables: [\"oms.*\", \"wms.*\"]\n  status_interval_ms: 100\n  heartbeat_interval_ms: 1000\n  state_dir: \"{state}\"\n  snapshot: {snapshot}\n{extra}\
             kafka:\n  brokers: \"{}\"\n  topic_prefix: {n}\n  partitions: 3\n{kafka_extra}\
             registry:\n  url: \"{}\"\n{registry_extra}",
                self.dsn,
                self.brokers,
                self.registry_url,
                n = self.name,
                state = self.dir.join("state").display(),
                snapshot = self.snapshot,
                extra = self.source_extra,
                registry_extra = self.registry_extra,
                kafka_extra = self.kafka_extra
            )
            + &self.extra_sections
    }

    pub fn write_config(&self) -> PathBuf {
        let p = self.dir.join("pipelines.yaml");
        std::fs::write(&p, self.config_yaml()).expect("write config");
        p
    }

    /// Starts walbridge and waits until a walsender streams its slot. Changes committed before
    /// the slot's consistent point are not streamed (that is the snapshot's job), so tests write
    /// only after this. The slot's `active` flag, or a walsender holding it, is not enough: both
    /// are there while `CREATE_REPLICATION_SLOT` waits for its consistent point, and a change
    /// made in that window lies before it. A walsender in state `streaming` (or `catchup`) has
    /// run `START_REPLICATION`.
    pub async fn start(&self) -> Walbridge {
        let mut wb = Walbridge::start_with_env(
            &self.write_config(),
            &self.dir.join("walbridge.log"),
            &self.child_env,
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let streaming = self
                .client
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
                     WHERE s.slot_name = $1 AND r.state IN ('streaming', 'catchup')",
                    &[&self.name],
                )
                .await
                .unwrap()
                .is_some();
            if streaming {
                return wb;
            }
            if let Some(status) = wb.try_exit() {
                panic!(
                    "walbridge exited ({status}) before streaming; log:\n{}",
                    wb.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "walbridge not streaming after 60 s; log:\n{}",
                wb.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs each statement on its own, so DDL and DML do not share a transaction (a statement
    /// may still say BEGIN … COMMIT itself).
    pub async fn exec(&self, sqls: &[&str]) {
        for sql in sqls {
            self.client
                .batch_execute(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        }
    }

    /// The WAL insert position: at or past the end of every transaction committed so far. (Not
    /// `pg_current_wal_lsn()`, the write position: with `synchronous_commit = off`, as the test
    /// cluster runs, a commit can return before its WAL is written.)
    pub async fn current_lsn(&self) -> Lsn {
        let s: String = self
            .client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
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

    /// Waits until everything committed so far is confirmed by the slot.
    pub async fn wait_caught_up(&self, wb: &mut Walbridge) {
        let end = self.current_lsn().await;
        self.wait_confirmed(end, wb).await;
    }

    /// Waits until walbridge's position record holds at least `lsn`.
    pub async fn wait_position_file(&self, lsn: Lsn, wb: &mut Walbridge) {
        let file = self
            .dir
            .join("state")
            .join(format!("{}.position", self.name));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let stored = std::fs::read_to_string(&file).ok().and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("confirmed_lsn="))
                    .and_then(|v| v.parse::<Lsn>().ok())
            });
            if stored.is_some_and(|s| s >= lsn) {
                return;
            }
            assert!(
                wb.try_exit().is_none(),
                "walbridge exited; log:\n{}",
                wb.log()
            );
            assert!(
                Instant::now() < deadline,
                "position file did not reach {lsn}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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

    /// What `walbridge verify` reports for `tables` (`schema.table`), through the same library
    /// function. walbridge must be running: verify first waits for it to catch up.
    pub async fn verify(&self, tables: &[&str]) -> walbridge::verify::Report {
        let cfg = walbridge::config::load(&self.write_config()).expect("load config");
        let opts = walbridge::verify::Options {
            tables: tables.iter().map(|t| (*t).to_owned()).collect(),
            wait: Duration::from_secs(90),
            read_deadline: Duration::from_secs(120),
        };
        walbridge::verify::verify(&cfg, &opts)
            .await
            .unwrap_or_else(|e| panic!("verify: {e:#}"))
    }

    /// Every event of this test's topics, decoded through the registry: reads the topics until `complete` holds for what was read, or 60 s pass (then returns the
    /// last read, and the test's assertions say what is missing). Needed because the reader's
    /// only end signal with tansu is a quiet period (see `tail::read_all`), which a slow fetch
    /// under load can outlast.
    pub async fn events_until(&self, complete: impl Fn(&[Event]) -> bool) -> Vec<Event> {
        let registry = avro::RegistryClient::new(&self.registry_url).unwrap();
        let mut kafka = rdkafka::ClientConfig::new();
        kafka.set("bootstrap.servers", &self.brokers);
        let topics = tail::topics_with_prefix(&kafka, &format!("{}.", self.name)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let events = tail::read_all(&kafka, &registry, &topics, Duration::from_secs(120))
                .await
                .unwrap();
            if complete(&events) || Instant::now() > deadline {
                return events;
            }
        }
    }
}

/// walbridge running as a child process.
pub struct Walbridge {
    child: Child,
    log: PathBuf,
}

impl Walbridge {
    pub fn start(config: &Path, log: &Path) -> Walbridge {
        Self::start_with_env(config, log, &[])
    }

    pub fn start_with_env(config: &Path, log: &Path, env: &[(String, String)]) -> Walbridge {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_walbridge"))
            .args(["run", "-c"])
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("WALBRIDGE_TEST_LOG").unwrap_or_else(|_| "info,rdkafka=warn".into()),
            )
            .envs(env.iter().map(|(k, v)| (k, v)))
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

    pub fn pid(&self) -> u32 {
        self.child.id()
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

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
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

/// A schema registry of one test's own (`walbridge registry` as a process), which the test may
/// take down and bring back on the same port with the same data.
pub struct Registry {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Registry {
    pub fn start(dir: &Path) -> Registry {
        let mut r = Registry {
            child: None,
            port: walbridge::stack::free_port(),
            dir: dir.to_owned(),
        };
        r.up();
        r
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the registry: connections are refused until [`Registry::up`].
    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the registry (again) on its port, with the data it had.
    pub fn up(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_walbridge"))
            .args([
                "registry",
                "--listen",
                &format!("127.0.0.1:{}", self.port),
                "--data-dir",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start registry");
        self.child = Some(child);
        wait_port(self.port);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.down();
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM` …).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
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
    event_position(e).0
}

/// (commit LSN, index in transaction) from the event id: the change's place in commit order.
pub fn event_position(e: &Event) -> (Lsn, u32) {
    let id = e.event_id().expect("event id");
    let (lsn, idx) = id.split_once(':').expect("event id is <lsn>:<index>");
    (lsn.parse().expect("lsn"), idx.parse().expect("index"))
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

/// Asserts that `ids` (deduplicated, any order) are exactly `want`, naming what is missing or
/// unexpected rather than printing both lists.
pub fn assert_same_ids(ids: &[i64], want: std::ops::Range<i64>, what: &str) {
    let got: std::collections::BTreeSet<i64> = ids.iter().copied().collect();
    let missing: Vec<i64> = want.clone().filter(|i| !got.contains(i)).collect();
    let extra: Vec<&i64> = got.iter().filter(|i| !want.contains(i)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: {} missing {:?}{}, {} unexpected {:?}",
        missing.len(),
        &missing[..missing.len().min(20)],
        if missing.len() > 20 { " …" } else { "" },
        extra.len(),
        &extra[..extra.len().min(20)]
    );
}

/// True when every id of `want` was inserted (op `c`) on `topic`.
pub fn has_inserts(events: &[Event], topic: &str, want: std::ops::Range<i64>) -> bool {
    let got: std::collections::HashSet<i64> = events
        .iter()
        .filter(|e| e.topic == topic && e.op() == Some("c"))
        .filter_map(|e| field(e, "after", "id")?.as_i64())
        .collect();
    want.into_iter().all(|i| got.contains(&i))
}
