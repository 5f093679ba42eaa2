//! A successful SASL login to Kafka, and a refused one.
//!
//! tansu 0.6 cannot be the other end of a SASL login here: it offers no PLAIN, and its SCRAM
//! users can only be stored through an authenticated connection (its Postgres storage needs a
//! schema that is not shipped). So [`MockSaslFront`] — a **mock** of a broker's SASL layer —
//! stands in front of the real tansu: it answers `SaslHandshake` and `SaslAuthenticate` itself
//! (PLAIN, one user), closes any connection that asks for anything else before logging in, as
//! a SASL listener does, and after a good login passes bytes through to tansu unchanged. What
//! the test shows is walbridge's side: `sasl.*` from `kafka.producer` reach every client it
//! makes (the producer, the admin client, `verify`'s consumer), the password comes from a file
//! and is never printed, and a wrong password is reported as a refused login.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{self, TestDb};

const USER: &str = "walbridge";
const PASSWORD: &str = "sasl-Pl41n-S3cret-7730";

const API_SASL_HANDSHAKE: i16 = 17;
const API_VERSIONS: i16 = 18;
const API_SASL_AUTHENTICATE: i16 = 36;
/// Kafka's error codes for the answers the mock gives.
const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
const SASL_AUTHENTICATION_FAILED: i16 = 58;

/// Logins the mock accepted and refused.
#[derive(Default)]
struct Logins {
    ok: AtomicUsize,
    refused: AtomicUsize,
}

/// The mock SASL layer (see the module doc): listens on `listen`, forwards to `upstream`.
struct MockSaslFront {
    logins: Arc<Logins>,
    task: tokio::task::JoinHandle<()>,
}

impl MockSaslFront {
    async fn start(listen: u16, upstream: u16) -> MockSaslFront {
        let logins = Arc::new(Logins::default());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", listen))
            .await
            .unwrap();
        let counts = logins.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counts = counts.clone();
                tokio::spawn(async move {
                    let _ = serve(client, upstream, &counts).await;
                });
            }
        });
        MockSaslFront { logins, task }
    }
}

impl Drop for MockSaslFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request frame: the size prefix is stripped; `None` at a clean end of stream.
async fn read_frame(s: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut frame = vec![0u8; i32::from_be_bytes(len) as usize];
    s.read_exact(&mut frame).await?;
    Ok(Some(frame))
}

async fn write_frame(s: &mut TcpStream, frame: &[u8]) -> std::io::Result<()> {
    s.write_all(&(frame.len() as i32).to_be_bytes()).await?;
    s.write_all(frame).await
}

/// Reads the request header v1 (api key, version, correlation id, client id) and returns
/// them with the offset of the body. SASL requests at the versions librdkafka uses (v0, v1)
/// are not flexible, so there are no tagged fields to skip.
fn header(frame: &[u8]) -> (i16, i16, i32, usize) {
    let key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let correlation = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let client_len = i16::from_be_bytes([frame[8], frame[9]]);
    (key, version, correlation, 10 + client_len.max(0) as usize)
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as i16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

async fn serve(mut client: TcpStream, upstream: u16, logins: &Logins) -> std::io::Result<()> {
    let mut up: Option<TcpStream> = None;
    let mut mechanism_ok = false;
    loop {
        let Some(frame) = read_frame(&mut client).await? else {
            return Ok(());
        };
        let (key, version, correlation, body) = header(&frame);
        let mut resp = correlation.to_be_bytes().to_vec();
        match key {
            // Asked before the login: forward it, tansu's answer lists the SASL APIs.
            API_VERSIONS => {
                if up.is_none() {
                    up = Some(TcpStream::connect(("127.0.0.1", upstream)).await?);
                }
                let up = up.as_mut().unwrap();
                write_frame(up, &frame).await?;
                let answer = read_frame(up).await?.unwrap_or_default();
                write_frame(&mut client, &answer).await?;
                continue;
            }
            API_SASL_HANDSHAKE => {
                assert!(version <= 1, "SaslHandshake v{version} is not mocked");
                let len = i16::from_be_bytes([frame[body], frame[body + 1]]) as usize;
                let mechanism = std::str::from_utf8(&frame[body + 2..body + 2 + len]).unwrap();
                mechanism_ok = mechanism == "PLAIN";
                let code = if mechanism_ok {
                    0
                } else {
                    UNSUPPORTED_SASL_MECHANISM
                };
                resp.extend_from_slice(&code.to_be_bytes());
                resp.extend_from_slice(&1i32.to_be_bytes());
                put_string(&mut resp, "PLAIN");
                write_frame(&mut client, &resp).await?;
                if !mechanism_ok {
                    return Ok(());
                }
            }
            API_SASL_AUTHENTICATE if mechanism_ok => {
                assert!(version <= 1, "SaslAuthenticate v{version} is not mocked");
                let len = i32::from_be_bytes(frame[body..body + 4].try_into().unwrap()) as usize;
                // PLAIN: authzid NUL authcid NUL password.
                let token = &frame[body + 4..body + 4 + len];
                let parts: Vec<&[u8]> = token.split(|b| *b == 0).collect();
                let good = parts.len() == 3
                    && parts[1] == USER.as_bytes()
                    && parts[2] == PASSWORD.as_bytes();
                if good {
                    resp.extend_from_slice(&0i16.to_be_bytes());
                    resp.extend_from_slice(&(-1i16).to_be_bytes());
                } else {
                    resp.extend_from_slice(&SASL_AUTHENTICATION_FAILED.to_be_bytes());
                    put_string(
                        &mut resp,
                        "Authentication failed: invalid username or password",
                    );
                }
                resp.extend_from_slice(&0i32.to_be_bytes());
                if version >= 1 {
                    resp.extend_from_slice(&0i64.to_be_bytes());
                }
                write_frame(&mut client, &resp).await?;
                if !good {
                    logins.refused.fetch_add(1, Ordering::SeqCst);
                    return Ok(());
                }
                logins.ok.fetch_add(1, Ordering::SeqCst);
                let mut up = match up.take() {
                    Some(up) => up,
                    None => TcpStream::connect(("127.0.0.1", upstream)).await?,
                };
                tokio::io::copy_bidirectional(&mut client, &mut up).await?;
                return Ok(());
            }
            // Anything else before a login: a SASL listener drops the connection.
            _ => return Ok(()),
        }
    }
}

/// `SASL_PLAINTEXT` + PLAIN: the pipeline streams through the login (its producer and the
/// admin client that creates topics), `walbridge verify` reads the topics back through it (a
/// consumer), and the password, read from a file, is never printed. A wrong password is
/// reported as a refused login while walbridge retries, and SIGTERM still ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sasl_plain_logs_in_every_client_and_a_wrong_password_is_refused() {
    let mut db = TestDb::new("kafka_sasl").await;
    let (inner, outer) = (walbridge::stack::free_port(), walbridge::stack::free_port());
    let _broker = walbridge::stack::Broker::start_advertising(inner, outer).expect("tansu");
    let front = MockSaslFront::start(outer, inner).await;
    let secret = db.dir.join("kafka-password");
    std::fs::write(&secret, format!("{PASSWORD}\n")).unwrap();
    db.brokers = format!("127.0.0.1:{outer}");
    db.kafka_extra = format!(
        "  producer:\n    security.protocol: SASL_PLAINTEXT\n    sasl.mechanisms: PLAIN\n    sasl.username: {USER}\n    sasl.password: \"${{file:{}}}\"\n",
        secret.display()
    );
    db.exec(&["CREATE TABLE oms.kafka_sasl (id bigint PRIMARY KEY, note text)"])
        .await;
    let mut wb = db.start().await;
    db.exec(&["INSERT INTO oms.kafka_sasl SELECT g, 'logged in' FROM generate_series(1, 25) g"])
        .await;
    // Confirmed only once Kafka acknowledged the rows: the producer logged in.
    db.wait_caught_up(&mut wb).await;
    let logins_of_run = front.logins.ok.load(Ordering::SeqCst);
    let report = db.verify(&["oms.kafka_sasl"]).await;
    assert!(wb.stop().success());
    assert!(
        report.equal,
        "Kafka differs from the source:\n{}",
        report.render()
    );
    assert_eq!(report.tables[0].rows, 25);
    assert!(logins_of_run >= 1, "walbridge run never logged in");
    assert!(
        front.logins.ok.load(Ordering::SeqCst) > logins_of_run,
        "verify's consumer did not log in"
    );
    assert_eq!(front.logins.refused.load(Ordering::SeqCst), 0);
    let log = std::fs::read_to_string(db.dir.join("walbridge.log")).unwrap();
    assert!(!log.contains(PASSWORD), "password printed:\n{log}");

    // A wrong password: refused by the broker, and the log says so.
    const WRONG: &str = "not-the-Pa55word-118";
    std::fs::write(&secret, format!("{WRONG}\n")).unwrap();
    db.source_extra = "  shutdown_timeout_ms: 3000\n".into();
    let path = db.dir.join("wrong-password.yaml");
    std::fs::write(&path, db.config_yaml()).unwrap();
    let wb = harness::Walbridge::start(&path, &db.dir.join("wrong-password.log"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !wb.log().contains("Authentication failed") {
        assert!(
            Instant::now() < deadline,
            "no refused login reported in 60 s:\n{}",
            wb.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log_path = db.dir.join("wrong-password.log");
    let status = wb.stop();
    let text = std::fs::read_to_string(&log_path).unwrap();
    if std::env::var_os("WALBRIDGE_TEST_DUMP").is_some() {
        eprintln!("=== wrong password -> {status}\n{text}");
    }
    assert!(
        !status.success(),
        "a stop that could not drain must not exit 0"
    );
    assert!(front.logins.refused.load(Ordering::SeqCst) >= 1);
    for s in [WRONG, PASSWORD] {
        assert!(!text.contains(s), "a password was printed:\n{text}");
    }
    assert!(
        text.contains("sasl.username") || text.contains("sasl.password"),
        "the refused login does not say which settings to check:\n{text}"
    );
}
