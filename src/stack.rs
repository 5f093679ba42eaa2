//! The local stack for tests and the demo: a throwaway Postgres cluster and a tansu Kafka broker,
//! run as real processes.
//!
//! Each [`Postgres`] is its own cluster (initdb into a fresh directory, a free port, the unix
//! socket beside the data), so tests run in parallel without sharing state; give each test its
//! own database with [`Postgres::create_database`]. When the test process runs as root, the
//! server runs as the `postgres` OS user, because Postgres refuses to run as root.
//!
//! Both types clean up on `Drop` (Postgres: `pg_ctl stop -m immediate` and the directory is
//! removed; the broker: killed). A process killed with SIGKILL cannot run `Drop`, so such a run can
//! leave a server behind; its directory name (`pg-<pid>-<n>`) tells which run it belonged to.
//!
//! Readiness is polled against a deadline, never assumed after a fixed sleep.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tracing::{info, warn};

const INSTALL_HINT: &str = "run tests/install-prereqs.sh";
const PG_DEFAULT_BIN: &str = "/usr/lib/postgresql/15/bin";
const PG_OS_USER: &str = "postgres";
const START_ATTEMPTS: usize = 4;
const BROKER_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// What went wrong while starting or driving the local stack, and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("{what} not found (looked in {looked}): {INSTALL_HINT}")]
    NotInstalled { what: &'static str, looked: String },
    #[error(
        "running as root, but there is no `{PG_OS_USER}` OS user to run Postgres as: install postgresql-15 ({INSTALL_HINT})"
    )]
    NoPostgresUser,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} failed ({status}); last log lines:\n{log_tail}")]
    Failed {
        what: String,
        status: String,
        log_tail: String,
    },
    #[error("127.0.0.1:{port} is already in use: stop what listens there or choose another port")]
    PortInUse { port: u16 },
    #[error("{what} did not accept connections within {}s; last log lines:\n{log_tail}", .waited.as_secs())]
    NotReady {
        what: String,
        waited: Duration,
        log_tail: String,
    },
    #[error("{what}: {source}")]
    Sql {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("invalid database name {0:?}: use [a-z_][a-z0-9_]*, at most 63 bytes")]
    InvalidName(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StackError {
    let what = what.into();
    move |source| StackError::Io { what, source }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (another process may still take it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        // No loopback to bind on: any port will fail later with a clear error.
        .unwrap_or(1)
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A fresh directory `<base>/<prefix>-<pid>-<n>` that did not exist before.
fn fresh_dir(base: &Path, prefix: &str) -> Result<PathBuf, StackError> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    fs::create_dir_all(base).map_err(io_err(format!("create {}", base.display())))?;
    let base = base
        .canonicalize()
        .map_err(io_err(format!("resolve {}", base.display())))?;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("{prefix}-{}-{n}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            // Left over from an earlier run whose pid was the same: take the next number.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(format!("create {}", dir.display()))(e)),
        }
    }
}

/// The last `lines` lines of a log file (best effort: a missing log gives a note instead).
fn log_tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    let read = File::open(path).and_then(|mut f| {
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        text = String::from_utf8_lossy(&buf).into_owned();
        Ok(())
    });
    if let Err(e) = read {
        return format!("(no log at {}: {e})", path.display());
    }
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    format!("{tail}\n(full log: {})", path.display())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// uid and gid of an OS user, from /etc/passwd.
fn os_user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut f = line.split(':');
        if f.next()? != name {
            return None;
        }
        let _password = f.next()?;
        Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
    })
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

// ---------------------------------------------------------------------------------------------

/// A throwaway Postgres 15 cluster with `wal_level=logical`, listening on 127.0.0.1.
pub struct Postgres {
    root: PathBuf,
    data: PathBuf,
    log: PathBuf,
    commands_log: PathBuf,
    bin: PathBuf,
    port: u16,
    run_as_postgres: bool,
    running: bool,
    /// Set when starting failed, so the logs named in the error survive the drop.
    keep_dir: bool,
}

impl Postgres {
    /// Creates and starts a cluster in a new directory under `base_dir`, on a free port.
    pub fn start(base_dir: &Path) -> Result<Postgres, StackError> {
        let mut pg = Postgres::init(base_dir)?;
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            // Between picking a port and binding it another process may take it: retry.
            match pg.start_server(free_port()) {
                Ok(()) => return Ok(pg),
                Err(e) if pg.lost_port_race() => last = Some(e),
                Err(e) => {
                    pg.keep_dir = true;
                    return Err(e);
                }
            }
        }
        pg.keep_dir = true;
        Err(last.unwrap_or(StackError::PortInUse { port: pg.port }))
    }

    /// Like [`Postgres::start`], on a fixed port (for the demo).
    pub fn start_on(base_dir: &Path, port: u16) -> Result<Postgres, StackError> {
        if !port_is_free(port) {
            return Err(StackError::PortInUse { port });
        }
        let mut pg = Postgres::init(base_dir)?;
        if let Err(e) = pg.start_server(port) {
            pg.keep_dir = true;
            return Err(e);
        }
        Ok(pg)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A libpq connection string for database `db` (trust authentication, no password).
    pub fn dsn(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            self.port
        )
    }

    /// The cluster's data directory (removed on drop).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The server log, for diagnosing a failing test.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Connects to `db`; the connection runs on a spawned tokio task.
    pub async fn connect(&self, db: &str) -> Result<tokio_postgres::Client, StackError> {
        let (client, connection) = tokio_postgres::connect(&self.dsn(db), tokio_postgres::NoTls)
            .await
            .map_err(|source| StackError::Sql {
                what: format!("connect to database {db} on port {}", self.port),
                source,
            })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                warn!(error = %e, "test postgres connection ended with an error");
            }
        });
        Ok(client)
    }

    /// Creates database `name` (one per test keeps tests independent).
    pub async fn create_database(&self, name: &str) -> Result<(), StackError> {
        let valid = name.len() <= 63
            && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(StackError::InvalidName(name.to_string()));
        }
        let client = self.connect("postgres").await?;
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .map_err(|source| StackError::Sql {
                what: format!("create database {name}"),
                source,
            })
    }

    /// Restarts the server (`pg_ctl restart -m fast`), e.g. to test reconnects.
    pub fn restart(&mut self) -> Result<(), StackError> {
        let log = self.log.display().to_string();
        let data = self.data.display().to_string();
        self.pg_ctl(
            "restart postgres",
            &[
                "-D", &data, "-l", &log, "-m", "fast", "-w", "-t", "60", "restart",
            ],
        )?;
        self.running = true;
        Ok(())
    }

    /// Stops the server at once from a shared reference (for a server held in a static, which
    /// is never dropped: test harnesses call it when the process exits).
    pub fn stop_at_exit(&self) {
        let data = self.data.display().to_string();
        let _ = self.pg_ctl("stop postgres", &["-D", &data, "-m", "immediate", "stop"]);
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`); also done on drop.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let data = self.data.display().to_string();
        match self.pg_ctl(
            "stop postgres",
            &["-D", &data, "-m", "immediate", "-w", "-t", "30", "stop"],
        ) {
            Ok(()) => self.running = false,
            Err(e) => warn!(error = %e, "could not stop test postgres"),
        }
    }

    fn init(base_dir: &Path) -> Result<Postgres, StackError> {
        let bin = postgres_bin_dir()?;
        let run_as_postgres = is_root();
        let root = fresh_dir(base_dir, "pg")?;
        let mut pg = Postgres {
            data: root.join("data"),
            log: root.join("postgres.log"),
            commands_log: root.join("commands.log"),
            root,
            bin,
            port: 0,
            run_as_postgres,
            running: false,
            keep_dir: false,
        };
        if run_as_postgres {
            let (uid, gid) = os_user_ids(PG_OS_USER).ok_or(StackError::NoPostgresUser)?;
            std::os::unix::fs::chown(&pg.root, Some(uid), Some(gid)).map_err(io_err(format!(
                "chown {} to {PG_OS_USER}",
                pg.root.display()
            )))?;
            // initdb would fail later with a vaguer message when a parent is not traversable.
            let root = pg.root.display().to_string();
            if pg
                .command("test", &["-w", &root])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| !s.success())
                .unwrap_or(true)
            {
                return Err(StackError::Failed {
                    what: format!("giving the `{PG_OS_USER}` OS user access to {root}"),
                    status: "directory not writable by that user".to_string(),
                    log_tail: "choose a base_dir whose parents every user may enter, e.g. /tmp"
                        .to_string(),
                });
            }
        }
        let data = pg.data.display().to_string();
        let initdb = pg.bin.join("initdb").display().to_string();
        pg.keep_dir = true;
        pg.run(
            "initdb",
            &initdb,
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
        )?;
        let settings = format!(
            "\n# walbridge test cluster\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             wal_level = logical\n\
             max_replication_slots = 64\n\
             max_wal_senders = 64\n\
             max_connections = 200\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n",
            pg.root.display()
        );
        pg.append_conf(&settings)?;
        pg.keep_dir = false;
        Ok(pg)
    }

    fn start_server(&mut self, port: u16) -> Result<(), StackError> {
        // A later `port` line overrides an earlier one, so a retry just appends.
        self.append_conf(&format!("port = {port}\n"))?;
        self.port = port;
        let log = self.log.display().to_string();
        let data = self.data.display().to_string();
        self.pg_ctl(
            &format!("start postgres on 127.0.0.1:{port}"),
            &["-D", &data, "-l", &log, "-w", "-t", "60", "start"],
        )?;
        self.running = true;
        info!(port, dir = %self.root.display(), "test postgres started");
        Ok(())
    }

    fn lost_port_race(&self) -> bool {
        fs::read_to_string(&self.log)
            .map(|l| l.contains("could not bind") || l.contains("Address already in use"))
            .unwrap_or(false)
    }

    fn append_conf(&self, text: &str) -> Result<(), StackError> {
        let path = self.data.join("postgresql.conf");
        OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(io_err(format!("write {}", path.display())))
    }

    fn pg_ctl(&self, what: &str, args: &[&str]) -> Result<(), StackError> {
        let pg_ctl = self.bin.join("pg_ctl").display().to_string();
        self.run(what, &pg_ctl, args)
    }

    /// A command that runs as the `postgres` OS user when we are root.
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = if self.run_as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", PG_OS_USER, "--", program]);
            c
        } else {
            Command::new(program)
        };
        // Postgres tools fail in a working directory they cannot read (e.g. /root).
        cmd.args(args).current_dir(&self.root).stdin(Stdio::null());
        cmd
    }

    /// Runs a command to completion, its output appended to `commands.log`.
    fn run(&self, what: &str, program: &str, args: &[&str]) -> Result<(), StackError> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.commands_log)
            .map_err(io_err(format!("open {}", self.commands_log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_err(format!("open {}", self.commands_log.display())))?;
        let status = self
            .command(program, args)
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(io_err(format!("{what}: run {program}")))?;
        if status.success() {
            return Ok(());
        }
        Err(StackError::Failed {
            what: what.to_string(),
            status: status.to_string(),
            log_tail: format!(
                "{}\n{}",
                log_tail(&self.commands_log, 10),
                log_tail(&self.log, 20)
            ),
        })
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        if self.keep_dir {
            warn!(dir = %self.root.display(), "kept the directory of a test postgres that failed to start");
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.root) {
            warn!(dir = %self.root.display(), error = %e, "could not remove test postgres directory");
        }
    }
}

/// Postgres 15 server binaries: the Debian location, else `pg_config --bindir`.
pub fn postgres_bin_dir() -> Result<PathBuf, StackError> {
    let default = PathBuf::from(PG_DEFAULT_BIN);
    if default.join("pg_ctl").is_file() && default.join("initdb").is_file() {
        return Ok(default);
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    match from_pg_config {
        Some(dir) if dir.join("pg_ctl").is_file() && dir.join("initdb").is_file() => Ok(dir),
        _ => Err(StackError::NotInstalled {
            what: "postgres server binaries (initdb, pg_ctl)",
            looked: format!("{PG_DEFAULT_BIN} and `pg_config --bindir`"),
        }),
    }
}

// ---------------------------------------------------------------------------------------------

/// A tansu Kafka-protocol broker with in-memory storage, killed on drop.
pub struct Broker {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Broker {
    /// Starts a broker on a free port and waits until it accepts connections.
    pub fn start() -> Result<Broker, StackError> {
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match Broker::start_on(port) {
                Ok(b) => return Ok(b),
                // Another process took the port between picking and binding it: retry.
                Err(e @ (StackError::PortInUse { .. } | StackError::Failed { .. })) => {
                    last = Some(e)
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(StackError::PortInUse { port: 0 }))
    }

    /// Starts a broker on a fixed port (for the demo).
    pub fn start_on(port: u16) -> Result<Broker, StackError> {
        Broker::start_advertising(port, port)
    }

    /// Starts a broker on `port` that tells clients to connect to `advertised` (a proxy in
    /// front of it, such as the TLS terminator of the Kafka TLS test).
    pub fn start_advertising(port: u16, advertised: u16) -> Result<Broker, StackError> {
        let tansu = find_tansu()?;
        // Readiness is "the port accepts connections": someone else listening would fake it.
        if !port_is_free(port) {
            return Err(StackError::PortInUse { port });
        }
        let dir = fresh_dir(&std::env::temp_dir(), "walbridge-tansu")?;
        let log = dir.join("tansu.log");
        let out = File::create(&log).map_err(io_err(format!("create {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_err(format!("open {}", log.display())))?;
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised_url = format!("tcp://127.0.0.1:{advertised}");
        let child = Command::new(&tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised_url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io_err(format!("start {}", tansu.display())))?;
        let mut broker = Broker { child, port, dir };
        broker.wait_ready(&log)?;
        info!(port, "test kafka broker started");
        Ok(broker)
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Freezes the broker (SIGSTOP): connections stay open but nothing is answered, like a
    /// stalled broker. Undo with [`Broker::resume`].
    pub fn pause(&self) -> Result<(), StackError> {
        self.signal(libc::SIGSTOP, "pause (SIGSTOP) the broker")
    }

    /// Lets a paused broker continue (SIGCONT).
    pub fn resume(&self) -> Result<(), StackError> {
        self.signal(libc::SIGCONT, "resume (SIGCONT) the broker")
    }

    fn signal(&self, signal: libc::c_int, what: &str) -> Result<(), StackError> {
        let pid = libc::pid_t::try_from(self.child.id()).map_err(|_| StackError::Io {
            what: what.to_string(),
            source: io::Error::other("pid out of range"),
        })?;
        // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped child,
        // so it cannot have been reused by another process.
        let rc = unsafe { libc::kill(pid, signal) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io_err(what)(io::Error::last_os_error()))
        }
    }

    fn wait_ready(&mut self, log: &Path) -> Result<(), StackError> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let started = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(io_err("check the tansu process"))?
            {
                return Err(exited("tansu broker", status, log, self.port));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if started.elapsed() > BROKER_READY_TIMEOUT {
                return Err(StackError::NotReady {
                    what: format!("tansu broker on {addr}"),
                    waited: BROKER_READY_TIMEOUT,
                    log_tail: log_tail(log, 20),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

fn exited(what: &str, status: ExitStatus, log: &Path, port: u16) -> StackError {
    let tail = log_tail(log, 20);
    if tail.contains("Address already in use") || tail.contains("AddrInUse") {
        return StackError::PortInUse { port };
    }
    StackError::Failed {
        what: format!("{what} on 127.0.0.1:{port} exited during start"),
        status: status.to_string(),
        log_tail: tail,
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // SIGKILL also ends a SIGSTOPped process.
        if let Err(e) = self.child.kill() {
            warn!(error = %e, "could not kill test kafka broker");
        }
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `tansu` from PATH, else from cargo's bin directory.
fn find_tansu() -> Result<PathBuf, StackError> {
    let mut candidates = Vec::new();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        candidates.push(PathBuf::from(home).join("bin/tansu"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/tansu"));
    }
    find_on_path("tansu")
        .or_else(|| candidates.iter().find(|p| p.is_file()).cloned())
        .ok_or(StackError::NotInstalled {
            what: "tansu (Kafka-protocol broker)",
            looked: "PATH, $CARGO_HOME/bin and ~/.cargo/bin".to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn postgres_runs_with_logical_wal_and_keeps_data_across_restart() {
        let mut pg = Postgres::start(&std::env::temp_dir()).unwrap_or_else(|e| panic!("{e}"));
        pg.create_database("stack_test").await.unwrap();
        let err = pg.create_database("bad; DROP").await.unwrap_err();
        assert!(matches!(err, StackError::InvalidName(_)), "{err}");

        let client = pg.connect("stack_test").await.unwrap();
        let wal_level: String = client
            .query_one("SHOW wal_level", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(wal_level, "logical");
        client
            .batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2);")
            .await
            .unwrap();
        drop(client);

        let port = pg.port();
        pg.restart().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pg.port(), port);
        let client = pg.connect("stack_test").await.unwrap();
        let n: i64 = client
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 2);
        drop(client);

        let data = pg.data_dir().to_path_buf();
        assert!(data.join("PG_VERSION").exists());
        drop(pg);
        assert!(!data.exists(), "data dir must be removed on drop");
        // The server is gone too: nothing listens on its port any more.
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }

    #[test]
    fn start_on_a_busy_port_says_so() {
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let err = Postgres::start_on(&std::env::temp_dir(), port)
            .err()
            .expect("must fail");
        assert!(
            matches!(err, StackError::PortInUse { port: p } if p == port),
            "{err}"
        );
    }

    fn process_state(pid: u32) -> char {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // The state follows the parenthesised command name.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        after.chars().next().unwrap()
    }

    /// Signals are delivered asynchronously: poll until the state matches or time runs out.
    fn wait_for_state(pid: u32, stopped: bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if (process_state(pid) == 'T') == stopped {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Needs `tansu` (tests/install-prereqs.sh installs it).
    #[test]
    fn broker_accepts_connections_pauses_and_stops_on_drop() {
        let broker = Broker::start().unwrap_or_else(|e| panic!("{e}"));
        let addr = broker.bootstrap();
        TcpStream::connect(&addr).unwrap();

        let pid = broker.child.id();
        broker.pause().unwrap();
        assert!(wait_for_state(pid, true), "paused broker must be stopped");
        broker.resume().unwrap();
        assert!(wait_for_state(pid, false), "resumed broker must run again");

        drop(broker);
        assert!(
            TcpStream::connect(&addr).is_err(),
            "broker must be gone after drop"
        );
    }
}
