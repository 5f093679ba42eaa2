//! TLS to the source, as an operator sets it up: a Postgres with `ssl = on`, certificates made
//! with the `openssl` CLI (a CA, a server certificate for localhost and 127.0.0.1), and
//! `hostssl` + scram-sha-256 in pg_hba.conf for walbridge's role. The real binary streams over
//! verify-full and over require; a wrong host name, a wrong CA and a plain (`sslmode=disable`)
//! client are refused with what to fix; the password is never printed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{self, TestDb};

const PASSWORD: &str = "tls-Pw-55120-secret";
const ROLE: &str = "walb_tls";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl (install the openssl CLI)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate it signed for `localhost` and `127.0.0.1`, plus a second CA
/// that signed nothing. Returns (server cert, server key, CA, other CA).
pub(crate) fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    for ca in ["ca", "other-ca"] {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
                "-days",
                "2",
                "-subj",
                &format!("/CN=walbridge test {ca}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
    }
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    (
        dir.join("server.crt"),
        dir.join("server.key"),
        dir.join("ca.crt"),
        dir.join("other-ca.crt"),
    )
}

/// Turns the test's own Postgres into a TLS server that lets `ROLE` in only over TLS with a
/// password (the harness' `postgres` user keeps its trust rule).
async fn enable_tls(db: &TestDb) -> (PathBuf, PathBuf) {
    let c = &db.client;
    let data: String = c
        .query_one("SHOW data_directory", &[])
        .await
        .unwrap()
        .get(0);
    let data = PathBuf::from(data);
    let (crt, key, ca, other_ca) = make_certs(&db.dir.join("certs"));
    // The server reads its key as its own OS user and refuses a key others can read.
    let owner = std::fs::metadata(&data).unwrap();
    for (from, to) in [(&crt, "server.crt"), (&key, "server.key")] {
        let dest = data.join(to);
        std::fs::copy(from, &dest).unwrap();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        std::os::unix::fs::chown(&dest, Some(owner.uid()), Some(owner.gid())).unwrap();
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    db.exec(&[
        &format!("CREATE ROLE {ROLE} LOGIN REPLICATION SUPERUSER PASSWORD '{PASSWORD}'"),
        "ALTER SYSTEM SET ssl = on",
        "ALTER SYSTEM SET ssl_cert_file = 'server.crt'",
        "ALTER SYSTEM SET ssl_key_file = 'server.key'",
    ])
    .await;
    let hba = data.join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "hostssl all {ROLE} 127.0.0.1/32 scram-sha-256\n\
             hostssl replication {ROLE} 127.0.0.1/32 scram-sha-256\n\
             host all {ROLE} 0.0.0.0/0 reject\n\
             host replication {ROLE} 0.0.0.0/0 reject\n{rules}"
        ),
    )
    .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    // The reload is asynchronous: wait until the server offers TLS.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let on: String = db
            .client
            .query_one("SELECT setting FROM pg_settings WHERE name = 'ssl'", &[])
            .await
            .unwrap()
            .get(0);
        let probe = walbridge::config::Dsn::parse(&dsn(
            port(db),
            &db.name,
            "host=127.0.0.1",
            "sslmode=require",
        ))
        .unwrap();
        if on == "on" && probe.pg_config().connect(probe.tls().clone()).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "ssl=on not applied after 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (ca, other_ca)
}

fn port(db: &TestDb) -> u16 {
    db.dsn
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("port="))
        .unwrap()
        .parse()
        .unwrap()
}

fn dsn(port: u16, dbname: &str, host: &str, tls: &str) -> String {
    format!("{host} port={port} user={ROLE} password={PASSWORD} dbname={dbname} {tls}")
}

/// Whether walbridge's walsender streams over TLS (pg_stat_ssl of the walsender process).
async fn walsender_uses_tls(db: &TestDb) -> bool {
    db.client
        .query_one(
            "SELECT coalesce(bool_and(s.ssl), false) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.usename = $1 AND a.backend_type = 'walsender'",
            &[&ROLE],
        )
        .await
        .unwrap()
        .get(0)
}

/// Streams one insert end to end with the given DSN and checks the walsender used TLS.
async fn streams_with(db: &mut TestDb, dsn: String, id: i64) {
    db.dsn = dsn;
    let mut wb = db.start().await;
    assert!(walsender_uses_tls(db).await, "walsender not on TLS");
    db.exec(&[&format!(
        "INSERT INTO oms.customers (id, email, first_name, last_name) VALUES ({id}, 'tls{id}@example.com', 'T', 'LS')"
    )])
    .await;
    let topic = format!("{}.oms.customers", db.name);
    db.events_until(|ev| harness::has_inserts(ev, &topic, id..id + 1))
        .await;
    db.wait_caught_up(&mut wb).await;
    let status = wb.stop();
    let log = std::fs::read_to_string(db.dir.join("walbridge.log")).unwrap_or_default();
    assert!(status.success(), "walbridge exited {status}:\n{log}");
    assert!(!log.contains(PASSWORD), "password printed:\n{log}");
}

/// Runs `walbridge run` with `dsn` until it exits (at most 30 s) and returns what it printed.
fn refused(db: &TestDb, what: &str, dsn: &str, needles: &[&str]) {
    let mut y = db.config_yaml();
    y = y.replace(&db.dsn, dsn);
    let path = db.dir.join(format!("{what}.yaml"));
    std::fs::write(&path, y).unwrap();
    let log = db.dir.join(format!("{what}.log"));
    let mut wb = harness::Walbridge::start_with_env(&path, &log, &db.child_env);
    let status = wb.wait(Duration::from_secs(30));
    let text = wb.log();
    if std::env::var_os("WALBRIDGE_TEST_DUMP").is_some() {
        eprintln!("=== {what} -> {status}\n{text}");
    }
    assert!(!status.success(), "{what}: exited 0:\n{text}");
    for n in needles {
        assert!(text.contains(n), "{what}: no {n:?} in:\n{text}");
    }
    assert!(
        !text.contains(PASSWORD),
        "{what}: password printed:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_full_and_require_stream_and_mistakes_are_refused() {
    let mut db = TestDb::with_own_postgres("tls").await;
    let (ca, other_ca) = enable_tls(&db).await;
    let (p, name) = (port(&db), db.name.clone());
    let ca = ca.display().to_string();

    // verify-full against the name in the certificate, with the CA that signed it.
    streams_with(
        &mut db,
        dsn(
            p,
            &name,
            "host=localhost",
            &format!("sslmode=verify-full sslrootcert={ca}"),
        ),
        990001,
    )
    .await;
    // require: encrypted, nothing to verify against.
    streams_with(
        &mut db,
        dsn(p, &name, "host=127.0.0.1", "sslmode=require"),
        990002,
    )
    .await;

    refused(
        &db,
        "wrong-name",
        &dsn(
            p,
            &name,
            "host=db.wrong.example hostaddr=127.0.0.1",
            &format!("sslmode=verify-full sslrootcert={ca}"),
        ),
        &[
            "not valid for the name \"db.wrong.example\"",
            "sslmode=verify-full",
            "sslmode=verify-ca",
            "source.dsn",
        ],
    );
    refused(
        &db,
        "wrong-ca",
        &dsn(
            p,
            &name,
            "host=localhost",
            &format!("sslmode=verify-full sslrootcert={}", other_ca.display()),
        ),
        &["not signed by the CA in sslrootcert", "source.dsn"],
    );
    refused(
        &db,
        "plain",
        &dsn(p, &name, "host=127.0.0.1", "sslmode=disable"),
        &["no encryption", "sslmode=require", "source.dsn"],
    );

    // sslrootcert=system (libpq 16): the system's CA bundle, here one that holds the test CA
    // (SSL_CERT_FILE, as OpenSSL reads it). It implies verify-full.
    db.child_env = vec![("SSL_CERT_FILE".into(), ca.clone())];
    streams_with(
        &mut db,
        dsn(p, &name, "host=localhost", "sslrootcert=system"),
        990003,
    )
    .await;
    // A system bundle without the server's CA (the other CA stands in for the public CAs of a
    // machine's store, so the test does not depend on what this machine has installed).
    let other = other_ca.display().to_string();
    db.child_env = vec![("SSL_CERT_FILE".into(), other.clone())];
    refused(
        &db,
        "system-store",
        &dsn(p, &name, "host=localhost", "sslrootcert=system"),
        &[
            "not signed by any CA the system trusts",
            &format!("sslrootcert=system read {other}"),
            "source.dsn",
        ],
    );
    db.child_env = vec![("SSL_CERT_FILE".into(), "/nonexistent/bundle.pem".into())];
    refused(
        &db,
        "system-none",
        &dsn(p, &name, "host=localhost", "sslrootcert=system"),
        &[
            "no CA certificates found in /nonexistent/bundle.pem",
            "SSL_CERT_FILE",
        ],
    );
    db.child_env.clear();
    refused(
        &db,
        "system-weak",
        &dsn(
            p,
            &name,
            "host=localhost",
            "sslmode=require sslrootcert=system",
        ),
        &["sslrootcert=system", "sslmode=verify-full", "source.dsn"],
    );
}

/// A TLS terminator: accepts TLS on `listen` with the server certificate, forwards the plain
/// bytes to `upstream`. tansu 0.6 has no TLS listener, so this stands in front of it the way a
/// TLS-terminating proxy stands in front of a broker; the broker behind it is real.
async fn tls_terminator(
    cert: &Path,
    key: &Path,
    listen: u16,
    upstream: u16,
) -> tokio::task::JoinHandle<()> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", listen))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                }
            });
        }
    })
}

/// Kafka over TLS: `security.protocol: SSL` and `ssl.ca.location` in `kafka.producer` reach every
/// client walbridge makes. The pipeline streams through the TLS terminator (the producer and the
/// admin client that creates topics), `walbridge verify` reads the topics back through it (a
/// consumer), and a CA that did not sign the broker's certificate is refused with librdkafka's
/// verification error while it retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_over_tls_reaches_every_client_and_a_wrong_ca_is_refused() {
    let mut db = TestDb::new("kafka_tls").await;
    let (cert, key, ca, other_ca) = make_certs(&db.dir.join("kafka-certs"));
    let (inner, outer) = (walbridge::stack::free_port(), walbridge::stack::free_port());
    let _broker = walbridge::stack::Broker::start_advertising(inner, outer).expect("tansu");
    let proxy = tls_terminator(&cert, &key, outer, inner).await;
    db.brokers = format!("127.0.0.1:{outer}");
    db.kafka_extra = format!(
        "  producer:\n    security.protocol: SSL\n    ssl.ca.location: \"{}\"\n",
        ca.display()
    );
    db.exec(&["CREATE TABLE oms.kafka_tls (id bigint PRIMARY KEY, note text)"])
        .await;
    let mut wb = db.start().await;
    db.exec(&["INSERT INTO oms.kafka_tls SELECT g, 'over tls' FROM generate_series(1, 25) g"])
        .await;
    // Confirmed only once Kafka acknowledged the rows: the producer went through TLS.
    db.wait_caught_up(&mut wb).await;
    let report = db.verify(&["oms.kafka_tls"]).await;
    assert!(wb.stop().success());
    assert!(
        report.equal,
        "Kafka differs from the source:\n{}",
        report.render()
    );
    assert_eq!(report.tables[0].rows, 25);
    assert_eq!(report.tables[0].distinct_event_ids, 25);

    // The wrong CA: librdkafka refuses the broker's certificate, and says so.
    db.kafka_extra = format!(
        "  producer:\n    security.protocol: SSL\n    ssl.ca.location: \"{}\"\n",
        other_ca.display()
    );
    db.source_extra = "  shutdown_timeout_ms: 3000\n".into();
    let path = db.dir.join("wrong-ca.yaml");
    std::fs::write(&path, db.config_yaml()).unwrap();
    let log = db.dir.join("wrong-ca.log");
    let mut wb = harness::Walbridge::start(&path, &log);
    // Like any Kafka client, walbridge keeps retrying the broker (a certificate may be fixed on
    // the broker's side); what matters is that it says why it cannot connect.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !wb.log().contains("certificate verify failed") {
        assert!(
            Instant::now() < deadline,
            "no certificate verification error in 60 s:\n{}",
            wb.log()
        );
        assert!(
            wb.try_exit().is_none() || wb.log().contains("certificate verify failed"),
            "exited without saying why:\n{}",
            wb.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // SIGTERM while it cannot reach the broker ends it within the shutdown timeout.
    let term = Instant::now();
    let status = wb.stop();
    assert!(
        !status.success(),
        "a stop that could not drain must not exit 0"
    );
    assert!(
        term.elapsed() < Duration::from_secs(15),
        "SIGTERM took {:?} (shutdown_timeout_ms is 3000)",
        term.elapsed()
    );
    let _ = log;
    proxy.abort();
}
