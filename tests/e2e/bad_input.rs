//! Bad input, tried on purpose: every mistake an operator can make in `pipelines.yaml` or in the
//! source database must end in a message that says what is wrong, where, and how to fix it,
//! with a non-zero exit (or, for a value Avro cannot carry, a dead letter), and must leave
//! nothing behind (no slot, no publication) and never print a password.
//!
//! The real `walbridge` binary runs each case against the shared Postgres, a tansu broker and
//! the registry. `tests/bad-input.md` lists the cases with the messages printed.
//!
//! Cases covered elsewhere and not repeated here: a position file of another server
//! (`a_position_record_of_another_server_is_refused`), a keyless table
//! (`a_keyless_table_is_refused_so_the_legacy_app_keeps_working`), a slot without a finished
//! snapshot (`a_slot_without_a_finished_snapshot_is_refused`), NaN in a `numeric(p,s)` column and
//! `kafka.dead_letter: stop` (`dlq.rs`), a table without the required identity in doctor
//! (`doctor.rs`).

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{self, TestDb, shared};

/// The password written into DSNs: it must never be printed.
const PASSWORD: &str = "s3cr3t-Pw-7781";

/// What a walbridge command did: its exit status (`None`: still running at the limit, then
/// stopped with SIGTERM) and everything it printed.
struct Outcome {
    status: Option<ExitStatus>,
    text: String,
}

/// Runs `walbridge <cmd> -c <config>`, waiting at most `limit` for it to exit by itself.
fn walbridge(cmd: &str, config: &Path, limit: Duration) -> Outcome {
    let log = config.with_extension(format!("{}.log", cmd.replace(' ', "-")));
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_walbridge"))
        .args(cmd.split(' '))
        .arg("-c")
        .arg(config)
        .env("RUST_LOG", "info,rdkafka=warn")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("start walbridge");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() >= deadline {
            harness::signal(child.id(), "TERM");
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    // For writing tests/bad-input.md: every command and what it printed.
    if std::env::var_os("WALBRIDGE_TEST_DUMP").is_some() {
        eprintln!(
            "=== walbridge {cmd} -c {} -> {status:?}\n{text}",
            config.display()
        );
    }
    Outcome { status, text }
}

/// Asserts the outcome of one case: exited non-zero, says each of `needles`, never the password.
fn assert_refused(what: &str, o: &Outcome, needles: &[&str]) {
    match o.status {
        Some(s) => assert!(!s.success(), "{what}: exited 0:\n{}", o.text),
        None => panic!("{what}: still running at the limit:\n{}", o.text),
    }
    assert_says(what, o, needles);
}

fn assert_says(what: &str, o: &Outcome, needles: &[&str]) {
    for n in needles {
        assert!(
            o.text.contains(n),
            "{what}: output lacks {n:?}:\n{}",
            o.text
        );
    }
    assert!(
        !o.text.contains(PASSWORD),
        "{what}: the password was printed:\n{}",
        o.text
    );
}

/// A pipeline config; `name` is the slot, publication and topic prefix.
struct Yaml {
    dsn: String,
    name: String,
    tables: String,
    brokers: String,
    registry: String,
    state_dir: String,
    /// Further top-level sections.
    more: String,
}

impl Yaml {
    fn render(&self) -> String {
        format!(
            "source:\n  dsn: \"{}\"\n  publication: {n}\n  slot: {n}\n  tables: {}\n  state_dir: \"{}\"\n  snapshot: never\n\
             kafka:\n  brokers: \"{}\"\n  topic_prefix: {n}\n\
             registry:\n  url: \"{}\"\n{}",
            self.dsn,
            self.tables,
            self.state_dir,
            self.brokers,
            self.registry,
            self.more,
            n = self.name,
        )
    }

    fn write(&self, dir: &Path, file: &str) -> std::path::PathBuf {
        let p = dir.join(file);
        std::fs::write(&p, self.render()).unwrap();
        p
    }
}

async fn count(client: &tokio_postgres::Client, sql: &str, name: &str) -> i64 {
    client.query_one(sql, &[&name]).await.unwrap().get(0)
}

async fn slots(client: &tokio_postgres::Client, name: &str) -> i64 {
    count(
        client,
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
        name,
    )
    .await
}

async fn publications(client: &tokio_postgres::Client, name: &str) -> i64 {
    count(
        client,
        "SELECT count(*) FROM pg_publication WHERE pubname = $1",
        name,
    )
    .await
}

/// Config mistakes: `check` and `run` both refuse them before connecting to anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_mistakes_are_refused_with_the_key_and_a_fix() {
    let s = shared();
    let dir = harness::scratch("badinput-config");
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname=postgres",
        s.pg.port()
    );
    let good = Yaml {
        dsn: dsn.clone(),
        name: "badcfg_x".into(),
        tables: "[oms.orders, wms.*]".into(),
        brokers: "127.0.0.1:9092".into(),
        registry: s.registry_url.clone(),
        state_dir: dir.join("state").display().to_string(),
        more: String::new(),
    }
    .render();
    let with = |from: &str, to: &str| {
        assert!(good.contains(from), "{from:?} is not in the base config");
        good.replacen(from, to, 1)
    };
    let reg_port = walbridge::stack::free_port();
    let embedded = format!("  embedded:\n    listen: \"127.0.0.1:{reg_port}\"\n    data_dir: x\n");
    let listens = format!("listens on port {reg_port}");
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "invalid YAML syntax",
            "source:\n  dsn: \"unclosed\n  slot: x\n".into(),
            vec!["bad.yaml:3:3", "invalid indentation"],
        ),
        (
            "a list, not a mapping",
            "- source\n- kafka\n".into(),
            vec![
                "bad.yaml:1:1",
                "expected mapping start",
                "a mapping with keys source, kafka, registry",
            ],
        ),
        (
            "empty file",
            String::new(),
            vec!["the document is empty", "source, kafka, registry"],
        ),
        (
            "unknown top-level key (typo)",
            with("source:", "sourc:"),
            vec!["unknown key `sourc`", "did you mean `source`?"],
        ),
        (
            "unknown nested key (typo)",
            with("  slot:", "  slot_nam:"),
            vec!["source.slot_nam", "did you mean `slot`?", "valid keys here"],
        ),
        (
            "unknown extra top-level key",
            format!("{good}metric:\n  listen: \"127.0.0.1:9187\"\n"),
            vec!["unknown key `metric`", "did you mean `metrics`?"],
        ),
        (
            "duplicate key",
            with(
                "  snapshot: never\n",
                "  snapshot: never\n  snapshot: initial\n",
            ),
            vec!["duplicate key `snapshot`", "only once"],
        ),
        (
            "string where a number goes",
            with("  topic_prefix:", "  partitions: three\n  topic_prefix:"),
            vec!["kafka.partitions", "an integer in 1..=10000", "e.g. 3"],
        ),
        (
            "list where a string goes",
            with(
                "brokers: \"127.0.0.1:9092\"",
                "brokers: [\"127.0.0.1:9092\"]",
            ),
            vec!["kafka.brokers", "host:port", "e.g. 127.0.0.1:9092"],
        ),
        (
            "partitions 0",
            with("  topic_prefix:", "  partitions: 0\n  topic_prefix:"),
            vec!["kafka.partitions", "out of range", "1..=10000"],
        ),
        (
            "status_interval_ms too small",
            with(
                "  snapshot: never",
                "  snapshot: never\n  status_interval_ms: 5",
            ),
            vec![
                "source.status_interval_ms",
                "\"5\" (out of range)",
                "100..=60000",
            ],
        ),
        (
            "empty tables list",
            with("[oms.orders, wms.*]", "[]"),
            vec![
                "source.tables",
                "no tables listed",
                "e.g. [oms.orders, wms.*]",
            ],
        ),
        (
            "table without a schema",
            with("[oms.orders, wms.*]", "[orders]"),
            vec!["source.tables[0]", "no schema: write schema.table"],
        ),
        (
            "three-part table name",
            with("[oms.orders, wms.*]", "[a.b.c]"),
            vec!["source.tables[0]", "\"a.b.c\"", "e.g. oms.orders"],
        ),
        (
            "table listed twice",
            with("[oms.orders, wms.*]", "[oms.orders, oms.orders]"),
            vec!["source.tables[1]", "listed twice", "remove one"],
        ),
        (
            "table covered by its schema's wildcard",
            with("[oms.orders, wms.*]", "[oms.orders, oms.*]"),
            vec!["source.tables[0]", "already covered by `oms.*`"],
        ),
        (
            "upper-case slot name",
            with("slot: badcfg_x", "slot: Walbridge"),
            vec![
                "source.slot",
                "must start with a lower-case letter",
                "e.g. walbridge",
            ],
        ),
        (
            "slot name longer than 63 bytes",
            with("slot: badcfg_x", &format!("slot: {}", "s".repeat(64))),
            vec!["source.slot", "longer than 63 bytes"],
        ),
        (
            "hyphen in the publication name",
            with("publication: badcfg_x", "publication: wal-bridge"),
            vec![
                "source.publication",
                "only lower-case letters, digits and _",
            ],
        ),
        (
            "missing source.dsn",
            with(&format!("  dsn: \"{dsn}\"\n"), ""),
            vec![
                "source.dsn",
                "missing required key",
                "e.g. dsn: host=127.0.0.1",
            ],
        ),
        (
            "missing kafka section",
            {
                let (a, b) = good.split_once("kafka:").unwrap();
                a.to_owned() + "registry:" + b.split_once("registry:").unwrap().1
            },
            vec!["kafka: missing required key", "e.g. kafka: { brokers: ..."],
        ),
        (
            "unparsable DSN (with a password)",
            with("port=", "port=notaport password=x "),
            vec![
                "source.dsn",
                "invalid connection string",
                "e.g. host=127.0.0.1",
            ],
        ),
        (
            "DSN without a user",
            with("user=postgres ", ""),
            vec!["source.dsn", "no user given: add user=", "password=***"],
        ),
        (
            "broker without a port",
            with("127.0.0.1:9092", "localhost"),
            vec!["kafka.brokers", "(no port)", "e.g. 127.0.0.1:9092"],
        ),
        (
            "registry url with a bad scheme",
            with(&s.registry_url, "ftp://127.0.0.1:8081"),
            vec![
                "registry.url",
                "scheme must be http or https",
                "e.g. http://",
            ],
        ),
        (
            "embedded registry on another port than registry.url",
            format!("{}{embedded}", with(&s.registry_url, "http://127.0.0.1:1")),
            vec!["registry.url", &listens, "make them match"],
        ),
        (
            "metrics.listen equal to the embedded registry's listen",
            format!(
                "{}{embedded}metrics:\n  listen: \"127.0.0.1:{reg_port}\"\n",
                with(&s.registry_url, &format!("http://127.0.0.1:{reg_port}"))
            ),
            vec![
                "metrics.listen",
                "also registry.embedded.listen",
                "a port of its own",
            ],
        ),
        (
            "producer override of enable.idempotence",
            with(
                "  topic_prefix:",
                "  producer: { enable.idempotence: \"false\" }\n  topic_prefix:",
            ),
            vec!["kafka.producer.enable.idempotence", "remove this key"],
        ),
        (
            "${VAR} naming an unset variable",
            with("user=postgres", "user=${WALBRIDGE_TEST_UNSET_USER}"),
            vec![
                "source.dsn",
                "WALBRIDGE_TEST_UNSET_USER is not set",
                "export it",
            ],
        ),
        (
            "unknown snapshot mode",
            with("snapshot: never", "snapshot: initial_snapshot"),
            vec![
                "source.snapshot",
                "initial, never, when_needed or initial_only",
            ],
        ),
        (
            "dead-letter policy without a dead-letter topic",
            format!(
                "{}  on_incompatible: dead_letter\n",
                with("  topic_prefix:", "  dead_letter: stop\n  topic_prefix:")
            ),
            vec!["registry.on_incompatible", "set kafka.dead_letter: topic"],
        ),
        (
            "a postgres view sink without a dsn",
            format!(
                "{good}processors:\n  group_id: v\n  sinks:\n    - {{ kind: postgres, name: rm }}\n"
            ),
            vec![
                "processors.sinks[0].dsn",
                "a postgres sink needs `dsn`",
                "e.g. dsn:",
            ],
        ),
        (
            "a view sink of an unknown kind",
            format!(
                "{good}processors:\n  group_id: v\n  sinks:\n    - {{ kind: s3, name: lake }}\n"
            ),
            vec![
                "processors.sinks.kind",
                "kafka, postgres or parquet",
                "got \"s3\"",
            ],
        ),
        (
            "two view sinks with one name",
            format!(
                "{good}processors:\n  group_id: v\n  sinks:\n    - {{ kind: parquet, name: lake, dir: a }}\n    - {{ kind: kafka, name: lake }}\n"
            ),
            vec![
                "processors.sinks[1].name",
                "also used by processors.sinks[0]",
                "its own name",
            ],
        ),
        (
            "a key of another sink kind",
            format!(
                "{good}processors:\n  group_id: v\n  sinks:\n    - {{ kind: kafka, name: t, dir: lake }}\n"
            ),
            vec![
                "processors.sinks[0].dir",
                "does not apply to a kafka sink",
                "topic_prefix",
            ],
        ),
        (
            "an empty SQL endpoint password",
            format!(
                "{good}processors:\n  group_id: v\n  sql: {{ listen: \"127.0.0.1:6875\", user: analyst, password: \"\" }}\n"
            ),
            vec!["processors.sql.password", "the password is empty", "${VAR}"],
        ),
    ];
    let n = cases.len();
    for (what, yaml, needles) in cases {
        let path = dir.join("bad.yaml");
        std::fs::write(&path, &yaml).unwrap();
        for cmd in ["check", "run"] {
            let o = walbridge(cmd, &path, Duration::from_secs(20));
            assert_refused(&format!("{what} ({cmd})"), &o, &needles);
            assert!(o.text.contains("invalid config"), "{what}: {}", o.text);
            assert_eq!(o.status.unwrap().code(), Some(2), "{what}: {}", o.text);
        }
    }
    // A file that is not there.
    let o = walbridge("run", &dir.join("nope.yaml"), Duration::from_secs(20));
    assert_refused(
        "missing file",
        &o,
        &["nope.yaml", "cannot read the config file"],
    );

    // Nothing was started by any of them.
    let c = s.pg.connect("postgres").await.unwrap();
    assert_eq!(
        slots(&c, "badcfg_x").await,
        0,
        "a bad config created a slot"
    );
    assert_eq!(publications(&c, "badcfg_x").await, 0);
    assert!(n + 1 >= 30, "{} config cases", n + 1);
}

/// Mistakes in the source database or in how walbridge reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_mistakes_stop_run_with_the_object_and_a_fix() {
    let db = TestDb::new("badinput").await;
    let s = shared();
    let port = s.pg.port();
    let base = |name: &str| Yaml {
        dsn: format!(
            "host=127.0.0.1 port={port} user=postgres password={PASSWORD} dbname=badinput"
        ),
        name: name.to_owned(),
        tables: "[oms.orders]".into(),
        brokers: db.brokers.clone(),
        registry: db.registry_url.clone(),
        state_dir: db.dir.join(format!("state-{name}")).display().to_string(),
        more: String::new(),
    };
    let limit = Duration::from_secs(30);
    let c = &db.client;

    // Wrong password: a role that must authenticate (the test cluster trusts everyone else).
    c.batch_execute(&format!(
        "CREATE ROLE bad_pw LOGIN REPLICATION SUPERUSER PASSWORD 'right-{PASSWORD}'"
    ))
    .await
    .unwrap();
    let hba = s.pg.data_dir().join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all bad_pw 127.0.0.1/32 scram-sha-256\n{rules}"),
    )
    .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    let wrong =
        format!("host=127.0.0.1 port={port} user=bad_pw password={PASSWORD} dbname=badinput");
    // The reload is asynchronous: wait until the rule applies.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio_postgres::connect(&wrong, tokio_postgres::NoTls)
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "pg_hba rule not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut y = base("bi_pw");
    y.dsn = wrong;
    let o = walbridge("run", &y.write(&db.dir, "pw.yaml"), limit);
    assert_refused(
        "wrong password",
        &o,
        &[
            "password authentication failed for user \"bad_pw\"",
            "password=***",
            "source.dsn",
        ],
    );

    let mut y = base("bi_role");
    y.dsn = y.dsn.replace("user=postgres", "user=no_such_role");
    let o = walbridge("run", &y.write(&db.dir, "role.yaml"), limit);
    assert_refused(
        "role that does not exist",
        &o,
        &["role \"no_such_role\" does not exist", "source.dsn"],
    );

    let mut y = base("bi_db");
    y.dsn = y.dsn.replace("dbname=badinput", "dbname=no_such_db");
    let o = walbridge("run", &y.write(&db.dir, "db.yaml"), limit);
    assert_refused(
        "database that does not exist",
        &o,
        &["database \"no_such_db\" does not exist", "source.dsn"],
    );

    // A user that may read and publish but not replicate.
    c.batch_execute("CREATE ROLE no_repl LOGIN; CREATE PUBLICATION bi_norepl FOR TABLE oms.orders")
        .await
        .unwrap();
    let mut y = base("bi_norepl");
    y.dsn = y.dsn.replace("user=postgres", "user=no_repl");
    let o = walbridge("run", &y.write(&db.dir, "norepl.yaml"), limit);
    assert_refused(
        "user without REPLICATION",
        &o,
        &[
            "must be superuser or replication role",
            "ALTER ROLE no_repl REPLICATION",
        ],
    );

    let mut y = base("bi_notable");
    y.tables = "[oms.orders, oms.no_such_table]".into();
    let o = walbridge("run", &y.write(&db.dir, "notable.yaml"), limit);
    assert_refused(
        "table that does not exist",
        &o,
        &["oms.no_such_table does not exist", "source.tables"],
    );
    assert_eq!(publications(c, "bi_notable").await, 0);

    let mut y = base("bi_noschema");
    y.tables = "[no_such_schema.*]".into();
    let o = walbridge("run", &y.write(&db.dir, "noschema.yaml"), limit);
    assert_refused(
        "schema that does not exist",
        &o,
        &["schema no_such_schema does not exist", "source.tables"],
    );

    // A publication the legacy team keeps by hand, missing a configured table.
    c.batch_execute("CREATE PUBLICATION bi_pubmiss FOR TABLE oms.orders")
        .await
        .unwrap();
    let mut y = base("bi_pubmiss");
    y.tables = "[oms.orders, oms.customers]".into();
    let o = walbridge("run", &y.write(&db.dir, "pubmiss.yaml"), limit);
    assert_refused(
        "publication missing a table",
        &o,
        &[
            "does not include oms.customers",
            "ALTER PUBLICATION bi_pubmiss ADD TABLE oms.customers",
        ],
    );

    // Slots of the configured name that walbridge cannot use.
    c.batch_execute(
        "SELECT pg_create_logical_replication_slot('bi_td', 'test_decoding'); \
         SELECT pg_create_physical_replication_slot('bi_phys')",
    )
    .await
    .unwrap();
    let o = walbridge("run", &base("bi_td").write(&db.dir, "td.yaml"), limit);
    assert_refused(
        "slot of another plugin",
        &o,
        &[
            "\"bi_td\" is a logical slot with plugin Some(\"test_decoding\")",
            "choose another `source.slot`",
        ],
    );
    let o = walbridge("run", &base("bi_phys").write(&db.dir, "phys.yaml"), limit);
    assert_refused(
        "physical slot",
        &o,
        &[
            "\"bi_phys\" is a physical slot",
            "choose another `source.slot`",
        ],
    );
    // Refused before anything was created for the pipeline.
    assert_eq!(publications(c, "bi_td").await, 0, "publication left behind");
    assert_eq!(
        publications(c, "bi_phys").await,
        0,
        "publication left behind"
    );

    // A second walbridge on a slot the first one streams.
    let first = db.start().await;
    let o = walbridge("run", &db.write_config(), limit);
    assert_refused(
        "slot in use by another consumer",
        &o,
        &[
            "\"badinput\" is in use by another consumer (pid",
            "choose another `source.slot`",
        ],
    );
    assert!(first.stop().success());

    // kafka.partition_by naming a column outside the primary key, or a table not streamed.
    let routed = |name: &str, entry: &str| {
        let y = base(name);
        let p = db.dir.join(format!("{name}.yaml"));
        let text = y.render().replace(
            &format!("  topic_prefix: {name}\n"),
            &format!("  topic_prefix: {name}\n  partition_by:\n    {entry}\n"),
        );
        assert!(text.contains("partition_by"), "test bug: {text}");
        std::fs::write(&p, text).unwrap();
        p
    };
    let o = walbridge(
        "run",
        &routed("bi_route_col", "oms.orders: [customer_id]"),
        limit,
    );
    assert_refused(
        "routing column outside the primary key",
        &o,
        &[
            "kafka.partition_by.oms.orders",
            "\"customer_id\" is not a primary-key column of oms.orders (its primary key: id)",
            "ALTER TABLE oms.orders REPLICA IDENTITY FULL",
        ],
    );
    let o = walbridge(
        "run",
        &routed("bi_route_table", "oms.customers: [id]"),
        limit,
    );
    assert_refused(
        "routing a table not streamed",
        &o,
        &[
            "kafka.partition_by.oms.customers",
            "walbridge does not stream oms.customers (source.tables does not match it)",
        ],
    );
    assert_eq!(
        publications(c, "bi_route_col").await,
        0,
        "publication left behind"
    );

    // state_dir is a file.
    let file = db.dir.join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let mut y = base("bi_state");
    y.state_dir = file.display().to_string();
    let o = walbridge("run", &y.write(&db.dir, "state.yaml"), limit);
    assert_refused(
        "state_dir is a file",
        &o,
        &["source.state_dir", "not-a-dir"],
    );

    // Ports walbridge must listen on are taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    let mut y = base("bi_metrics");
    y.more = format!("metrics:\n  listen: \"{busy}\"\n");
    let o = walbridge("run", &y.write(&db.dir, "metrics.yaml"), limit);
    assert_refused(
        "metrics port in use",
        &o,
        &["metrics.listen", &busy.to_string()],
    );
    let mut y = base("bi_reg");
    y.registry = format!("http://{busy}");
    y.more = format!(
        "  embedded:\n    listen: \"{busy}\"\n    data_dir: \"{}\"\n",
        db.dir.join("reg").display()
    );
    // `more` goes after `registry.url`, so it lands inside the registry section.
    let o = walbridge("run", &y.write(&db.dir, "reg.yaml"), limit);
    assert_refused(
        "embedded registry port in use",
        &o,
        &["registry.embedded.listen", &busy.to_string()],
    );
    drop(taken);

    for name in [
        "bi_pw",
        "bi_role",
        "bi_db",
        "bi_norepl",
        "bi_notable",
        "bi_noschema",
        "bi_pubmiss",
        "bi_state",
        "bi_metrics",
        "bi_reg",
        "bi_route_col",
        "bi_route_table",
    ] {
        assert_eq!(slots(c, name).await, 0, "{name}: a slot was created");
    }
    c.batch_execute(
        "SELECT pg_drop_replication_slot('bi_td'); SELECT pg_drop_replication_slot('bi_phys')",
    )
    .await
    .unwrap();
}

/// A source without logical decoding: walbridge says which setting and the statement to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_refused_with_the_statement_that_fixes_it() {
    let dir = harness::scratch("badinput-wal");
    let mut pg = walbridge::stack::Postgres::start(&dir).expect("start postgres");
    let c = pg.connect("postgres").await.unwrap();
    for sql in [
        "ALTER SYSTEM SET wal_level = replica",
        "CREATE TABLE t (id int PRIMARY KEY)",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    drop(c);
    let pg = tokio::task::spawn_blocking(move || {
        pg.restart().expect("restart postgres");
        pg
    })
    .await
    .unwrap();
    let y = Yaml {
        dsn: format!("{} password={PASSWORD}", pg.dsn("postgres")),
        name: "bi_wal".into(),
        tables: "[public.t]".into(),
        brokers: "127.0.0.1:9092".into(),
        registry: "http://127.0.0.1:8081".into(),
        state_dir: dir.join("state").display().to_string(),
        more: String::new(),
    };
    let cfg = y.write(&dir, "wal.yaml");
    let o = walbridge("run", &cfg, Duration::from_secs(30));
    assert_refused(
        "wal_level replica (run)",
        &o,
        &[
            "wal_level is \"replica\"",
            "ALTER SYSTEM SET wal_level = logical",
            "restart Postgres",
        ],
    );
    let o = walbridge("doctor", &cfg, Duration::from_secs(30));
    assert_refused(
        "wal_level replica (doctor)",
        &o,
        &["FAIL  wal_level", "ALTER SYSTEM SET wal_level = logical"],
    );
    let c = pg.connect("postgres").await.unwrap();
    assert_eq!(slots(&c, "bi_wal").await, 0);
    assert_eq!(publications(&c, "bi_wal").await, 0);
}

/// Services that cannot be reached are transient by design (a source restarting, a broker
/// being replaced): `run` keeps retrying with a warning that names the service and what to
/// check, and a stop ends it; `doctor` says the same and exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_services_are_named_while_run_retries() {
    let s = shared();
    let dir = harness::scratch("badinput-unreachable");
    let closed = walbridge::stack::free_port();
    let base = |name: &str| Yaml {
        dsn: format!(
            "host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname=postgres",
            s.pg.port()
        ),
        name: name.to_owned(),
        tables: "[public.nothing]".into(),
        brokers: "127.0.0.1:9092".into(),
        registry: s.registry_url.clone(),
        state_dir: dir.join("state").display().to_string(),
        more: String::new(),
    };
    let cases = [
        (
            "source port closed",
            format!(
                "host=127.0.0.1 port={closed} user=postgres password={PASSWORD} dbname=postgres"
            ),
            "Connection refused",
        ),
        (
            "source host that does not resolve",
            format!(
                "host=walbridge-test.invalid port=5432 user=postgres password={PASSWORD} dbname=postgres"
            ),
            "walbridge-test.invalid",
        ),
    ];
    for (what, dsn, needle) in cases {
        let mut y = base("bi_unreach");
        y.dsn = dsn;
        let cfg = y.write(&dir, "unreach.yaml");
        let o = walbridge("run", &cfg, Duration::from_secs(3));
        assert!(o.status.is_none(), "{what}: run gave up:\n{}", o.text);
        assert_says(
            what,
            &o,
            &[
                needle,
                "transient failure; restarting the pipeline",
                "is Postgres running and reachable",
                "source.dsn",
            ],
        );
        let o = walbridge("doctor", &cfg, Duration::from_secs(30));
        assert_refused(
            &format!("{what} (doctor)"),
            &o,
            &[needle, "connecting to the source", "source.dsn"],
        );
    }

    // Kafka unreachable: librdkafka names the broker and the refusal while run keeps trying
    // (a broker that is restarting comes back), and SIGTERM still ends it.
    let c = s.pg.connect("postgres").await.unwrap();
    c.batch_execute("CREATE TABLE IF NOT EXISTS public.bi_unreach_kafka (id int PRIMARY KEY)")
        .await
        .unwrap();
    let mut y = base("bi_unreach_kafka");
    y.tables = "[public.bi_unreach_kafka]".into();
    y.brokers = format!("127.0.0.1:{closed}");
    let cfg = dir.join("unreach-kafka.yaml");
    std::fs::write(
        &cfg,
        y.render().replace(
            "  snapshot: never\n",
            "  snapshot: never\n  shutdown_timeout_ms: 1000\n",
        ),
    )
    .unwrap();
    let o = walbridge("run", &cfg, Duration::from_secs(5));
    assert!(
        o.status.is_none(),
        "kafka unreachable: run gave up:\n{}",
        o.text
    );
    assert_says(
        "kafka unreachable",
        &o,
        &[&format!("127.0.0.1:{closed}"), "Connection refused"],
    );
    let _ = c
        .batch_execute(
            "SELECT pg_drop_replication_slot('bi_unreach_kafka'); DROP PUBLICATION IF EXISTS bi_unreach_kafka",
        )
        .await;
}

/// Values Postgres accepts but Avro cannot carry go to the dead-letter topic with the column and
/// the reason; the changes around them arrive, and the slot moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unencodable_values_are_dead_lettered_with_the_column() {
    let db = TestDb::new("badinput_dl").await;
    db.exec(&["CREATE TABLE oms.bi_times (id int PRIMARY KEY, at timestamptz, day date)"])
        .await;
    let mut wb = db.start().await;
    db.exec(&[
        "INSERT INTO oms.bi_times VALUES (1, now(), current_date)",
        "INSERT INTO oms.bi_times VALUES (2, 'infinity', current_date)",
        "INSERT INTO oms.bi_times VALUES (3, now(), '-infinity')",
        "INSERT INTO oms.bi_times VALUES (4, now(), current_date)",
    ])
    .await;
    db.wait_caught_up(&mut wb).await;
    let topic = format!("{}.oms.bi_times", db.name);
    let events = db
        .events_until(|ev| harness::has_inserts(ev, &topic, 4..5))
        .await;
    let mut ids: Vec<i64> = events
        .iter()
        .filter(|e| e.topic == topic)
        .filter_map(|e| harness::field(e, "after", "id")?.as_i64())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids, [1, 4], "the encodable rows arrive");
    let o = walbridge("dlq list", &db.write_config(), Duration::from_secs(60));
    assert_eq!(o.status.and_then(|s| s.code()), Some(0), "{}", o.text);
    assert_says(
        "dead letters",
        &o,
        &[
            "cannot encode column \"at\" (timestamptz) of table oms.bi_times",
            "cannot encode column \"day\" (date) of table oms.bi_times",
            "infinity",
            "2 dead letter(s) waiting",
        ],
    );
    assert!(wb.stop().success());
}

/// Kafka security settings go to librdkafka through `kafka.producer` (security.protocol, sasl.*,
/// ssl.*). The secrets among them are never printed: not when librdkafka refuses the settings
/// (a private key file that is not there is refused at start), and not while
/// the broker refuses or ignores a SASL login (tansu has no SASL: run retries until stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_secrets_in_producer_settings_are_never_printed() {
    const SASL_SECRET: &str = "kafka-S3cret-9931";
    const KEY_SECRET: &str = "keypass-S3cret-4410";
    let db = TestDb::new("badinput_ksec").await;
    let y = Yaml {
        dsn: format!("{} password={PASSWORD}", db.dsn),
        name: "bi_ksec".to_owned(),
        tables: "[oms.orders]".into(),
        brokers: db.brokers.clone(),
        registry: db.registry_url.clone(),
        state_dir: db.dir.join("state").display().to_string(),
        more: String::new(),
    };
    let with_producer = |protocol: &str, ssl: &str| {
        let text = y
            .render()
            .replace("  snapshot: never\n", "  snapshot: never\n  shutdown_timeout_ms: 1000\n")
            .replace(
            "  topic_prefix: bi_ksec\n",
            &format!(
                "  topic_prefix: bi_ksec\n  producer:\n    security.protocol: {protocol}\n    sasl.mechanisms: PLAIN\n    sasl.username: walbridge\n    sasl.password: \"${{file:{}}}\"\n{ssl}    message.timeout.ms: \"3000\"\n",
                db.dir.join("sasl-password").display()
            ),
        );
        let p = db.dir.join(format!("ksec-{protocol}.yaml"));
        std::fs::write(&p, text).unwrap();
        p
    };
    std::fs::write(db.dir.join("sasl-password"), format!("{SASL_SECRET}\n")).unwrap();
    let secrets_absent = |what: &str, o: &Outcome| {
        for s in [SASL_SECRET, KEY_SECRET, PASSWORD] {
            assert!(
                !o.text.contains(s),
                "{what}: a secret was printed:\n{}",
                o.text
            );
        }
    };

    // A private key librdkafka cannot load (the secret is the key's passphrase).
    let bad_key = format!(
        "    ssl.key.password: \"{KEY_SECRET}\"\n    ssl.key.location: \"{}\"\n",
        db.dir.join("no-such-key.pem").display()
    );
    let o = walbridge(
        "run",
        &with_producer("SASL_SSL", &bad_key),
        Duration::from_secs(30),
    );
    assert_refused(
        "SASL_SSL with a key file that is not there",
        &o,
        &["ssl.key.location", "kafka.producer"],
    );
    secrets_absent("SASL_SSL", &o);

    let plain = with_producer("SASL_PLAINTEXT", "");
    let o = walbridge("run", &plain, Duration::from_secs(8));
    secrets_absent("SASL_PLAINTEXT", &o);
    let o = walbridge("check", &plain, Duration::from_secs(30));
    secrets_absent("check", &o);
}
