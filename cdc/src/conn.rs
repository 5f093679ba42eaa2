//! The replication connection: a Postgres wire-protocol client that speaks just enough of the
//! protocol for logical replication (`replication=database`): startup and authentication
//! (cleartext, MD5, SCRAM-SHA-256), simple queries, and the CopyBoth sub-protocol that carries
//! the WAL stream.
//!
//! Upstream tokio-postgres has no CopyBoth support, so this module owns the socket. It reuses
//! `postgres-protocol` for message encoding and SCRAM; the framing of backend messages is done
//! here because the hot path (CopyData carrying XLogData) must slice frames out of one read
//! buffer without copying.
//!
//! TLS ([`crate::tls`]): an SSLRequest first unless `sslmode=disable`, then the socket is
//! wrapped in rustls when the server agrees; [`Stream`] keeps both cases behind one type so the
//! read loop does not care.
//!
//! Reads go through one `BytesMut` of at least 256 KiB, so one `read` syscall usually yields
//! many WAL messages; each frame is split off as a `Bytes` that shares the buffer's memory.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::config::Host;

use crate::lsn::Lsn;
use crate::pgoutput::PG_EPOCH_OFFSET_MICROS;
use crate::tls::{PgTls, TlsError};

const READ_CHUNK: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("cannot connect to Postgres at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("replication connection I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("Postgres refused: {severity} {code}: {message}")]
    Server {
        severity: String,
        code: String,
        message: String,
    },
    #[error("authentication: {0}")]
    Auth(String),
    #[error("replication protocol: {0}")]
    Protocol(String),
    #[error("replication connection closed by the server")]
    Closed,
}

impl ConnError {
    /// The SQLSTATE when the server refused something.
    pub fn code(&self) -> Option<&str> {
        match self {
            ConnError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A message read while streaming (inside CopyBoth).
#[derive(Debug)]
pub enum StreamMessage {
    /// WAL data: one pgoutput message in `data`.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        data: Bytes,
    },
    /// The server's keepalive; `reply` asks for a status update right away.
    Keepalive { wal_end: Lsn, reply: bool },
}

/// The socket, plain or TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

pub struct ReplicationConnection {
    stream: Stream,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl ReplicationConnection {
    /// Connects in `replication=database` mode with the settings of `config` (host, port, user,
    /// password, dbname), encrypted as `tls` says. Only TCP hosts are supported here.
    pub async fn connect(config: &tokio_postgres::Config, tls: &PgTls) -> Result<Self, ConnError> {
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(Host::Unix(p)) => {
                return Err(ConnError::Protocol(format!(
                    "unix socket host {} is not supported for replication; use a TCP host",
                    p.display()
                )));
            }
            None => "localhost".to_owned(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        // libpq's hostaddr: connect to this address, and still check the certificate
        // against host=.
        let addr = match config.get_hostaddrs().first() {
            Some(ip) => std::net::SocketAddr::new(*ip, port).to_string(),
            None => format!("{host}:{port}"),
        };
        let connect = TcpStream::connect(&addr);
        let timeout = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(10));
        let stream = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(ConnError::Connect { addr, source }),
            Err(_) => {
                return Err(ConnError::Connect {
                    addr,
                    source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
                });
            }
        };
        stream.set_nodelay(true)?;
        let stream = negotiate_tls(stream, tls, &host).await?;
        let mut conn = ReplicationConnection {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(1024),
        };
        conn.startup(config).await?;
        Ok(conn)
    }

    async fn startup(&mut self, config: &tokio_postgres::Config) -> Result<(), ConnError> {
        let user = config
            .get_user()
            .ok_or_else(|| ConnError::Auth("no user in the source DSN".into()))?
            .to_owned();
        let dbname = config.get_dbname().unwrap_or(&user).to_owned();
        let mut params = vec![
            ("user", user.as_str()),
            ("database", dbname.as_str()),
            ("replication", "database"),
            (
                "application_name",
                config.get_application_name().unwrap_or("walbridge"),
            ),
            ("client_encoding", "UTF8"),
            // Text output of timestamptz in UTC keeps decoding independent of server settings.
            ("TimeZone", "UTC"),
            ("DateStyle", "ISO"),
            ("IntervalStyle", "iso_8601"),
            ("extra_float_digits", "3"),
        ];
        // The DSN's `options` (e.g. "-c logical_decoding_work_mem=256MB"), as libpq passes it.
        if let Some(options) = config.get_options() {
            params.push(("options", options));
        }
        frontend::startup_message(params.iter().copied(), &mut self.wbuf)?;
        self.flush().await?;
        let password = config.get_password().map(|p| p.to_vec());
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            let (tag, body) = self.read_frame().await?;
            match tag {
                b'R' => {
                    let mut b = body.clone();
                    if b.len() < 4 {
                        return Err(ConnError::Protocol("short authentication message".into()));
                    }
                    match b.get_i32() {
                        0 => {}
                        3 => {
                            let pw = password.as_deref().ok_or_else(no_password)?;
                            frontend::password_message(pw, &mut self.wbuf)?;
                            self.flush().await?;
                        }
                        5 => {
                            let pw = password.as_deref().ok_or_else(no_password)?;
                            if b.len() < 4 {
                                return Err(ConnError::Protocol("short MD5 salt".into()));
                            }
                            let salt = [b[0], b[1], b[2], b[3]];
                            let hash = postgres_protocol::authentication::md5_hash(
                                user.as_bytes(),
                                pw,
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                            self.flush().await?;
                        }
                        10 => {
                            let pw = password.as_deref().ok_or_else(no_password)?;
                            let mechs: Vec<&[u8]> = b
                                .chunk()
                                .split(|&c| c == 0)
                                .filter(|m| !m.is_empty())
                                .collect();
                            if !mechs.contains(&sasl::SCRAM_SHA_256.as_bytes()) {
                                return Err(ConnError::Auth(
                                    "server offers no SASL mechanism walbridge supports (SCRAM-SHA-256)"
                                        .into(),
                                ));
                            }
                            let s = sasl::ScramSha256::new(pw, sasl::ChannelBinding::unsupported());
                            frontend::sasl_initial_response(
                                sasl::SCRAM_SHA_256,
                                s.message(),
                                &mut self.wbuf,
                            )?;
                            self.flush().await?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                ConnError::Protocol("SASL continue without SASL start".into())
                            })?;
                            s.update(b.chunk()).map_err(|e| {
                                ConnError::Auth(format!("SCRAM exchange failed: {e}"))
                            })?;
                            frontend::sasl_response(s.message(), &mut self.wbuf)?;
                            self.flush().await?;
                        }
                        12 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                ConnError::Protocol("SASL final without SASL start".into())
                            })?;
                            s.finish(b.chunk()).map_err(|e| {
                                ConnError::Auth(format!("server's SCRAM signature is wrong: {e}"))
                            })?;
                        }
                        other => {
                            return Err(ConnError::Auth(format!(
                                "authentication method {other} is not supported (use scram-sha-256, md5, password or trust)"
                            )));
                        }
                    }
                }
                b'E' => return Err(server_error(&body)),
                b'Z' => return Ok(()),
                // ParameterStatus, BackendKeyData, NoticeResponse: nothing to do.
                _ => {}
            }
        }
    }

    /// Runs one statement with the simple query protocol and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ConnError> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (tag, mut body) = self.read_frame().await?;
            match tag {
                b'D' => {
                    let n = body.get_i16();
                    let mut row = Vec::with_capacity(n.max(0) as usize);
                    for _ in 0..n {
                        let len = body.get_i32();
                        if len < 0 {
                            row.push(None);
                        } else {
                            let v = body.split_to(len as usize);
                            row.push(Some(String::from_utf8_lossy(&v).into_owned()));
                        }
                    }
                    rows.push(row);
                }
                b'E' => error = Some(server_error(&body)),
                b'Z' => {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    };
                }
                _ => {}
            }
        }
    }

    /// Sends `START_REPLICATION` and waits for the server to enter CopyBoth mode.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, String)],
    ) -> Result<ReplicationStream, ConnError> {
        let opts: Vec<String> = options
            .iter()
            .map(|(k, v)| format!("{} '{}'", k, v.replace('\'', "''")))
            .collect();
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} ({})",
            quote_ident(slot),
            start,
            opts.join(", ")
        );
        frontend::query(&sql, &mut self.wbuf)?;
        self.flush().await?;
        loop {
            let (tag, body) = self.read_frame().await?;
            match tag {
                b'W' => return Ok(ReplicationStream { conn: self }),
                b'E' => return Err(server_error(&body)),
                b'N' | b'S' => {}
                other => {
                    return Err(ConnError::Protocol(format!(
                        "unexpected message {:?} after START_REPLICATION",
                        other as char
                    )));
                }
            }
        }
    }

    async fn flush(&mut self) -> Result<(), ConnError> {
        self.stream.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        Ok(())
    }

    /// Reads one complete backend message: its tag and body (without the length word).
    async fn read_frame(&mut self) -> Result<(u8, Bytes), ConnError> {
        loop {
            if let Some(frame) = self.try_frame()? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    fn try_frame(&mut self) -> Result<Option<(u8, Bytes)>, ConnError> {
        if self.rbuf.len() < 5 {
            return Ok(None);
        }
        let tag = self.rbuf[0];
        let len = i32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]);
        if len < 4 {
            return Err(ConnError::Protocol(format!("invalid message length {len}")));
        }
        let total = 1 + len as usize;
        if self.rbuf.len() < total {
            // Make room for a large message in one go rather than growing step by step.
            self.rbuf.reserve(total - self.rbuf.len());
            return Ok(None);
        }
        let mut frame = self.rbuf.split_to(total);
        frame.advance(5);
        Ok(Some((tag, frame.freeze())))
    }

    async fn fill(&mut self) -> Result<(), ConnError> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        let n = self.stream.read_buf(&mut self.rbuf).await?;
        if n == 0 {
            return Err(ConnError::Closed);
        }
        Ok(())
    }
}

/// Sends the SSLRequest unless TLS is disabled and upgrades the socket when the server agrees.
async fn negotiate_tls(mut tcp: TcpStream, tls: &PgTls, host: &str) -> Result<Stream, ConnError> {
    let Some(config) = tls.client_config().cloned() else {
        return Ok(Stream::Plain(tcp));
    };
    let mut req = BytesMut::with_capacity(8);
    frontend::ssl_request(&mut req);
    tcp.write_all(&req).await?;
    // Exactly one byte: nothing may be read past it before the handshake.
    let answer = tcp.read_u8().await?;
    match answer {
        b'S' => Ok(Stream::Tls(Box::new(
            tls.handshake(config, tcp, host).await?,
        ))),
        b'N' if !tls.mode().requires_tls() => Ok(Stream::Plain(tcp)),
        b'N' => Err(TlsError::NotOffered {
            host: host.to_owned(),
            mode: tls.mode(),
        }
        .into()),
        other => Err(ConnError::Protocol(format!(
            "unexpected answer {:?} to the SSLRequest",
            other as char
        ))),
    }
}

fn no_password() -> ConnError {
    ConnError::Auth("the server asks for a password but the source DSN has none".into())
}

fn server_error(body: &Bytes) -> ConnError {
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    for field in body.split(|&b| b == 0) {
        if field.is_empty() {
            continue;
        }
        let v = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'S' => severity = v,
            b'C' => code = v,
            b'M' => message = v,
            _ => {}
        }
    }
    ConnError::Server {
        severity,
        code,
        message,
    }
}

/// Quotes an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The WAL stream after `START_REPLICATION`.
pub struct ReplicationStream {
    conn: ReplicationConnection,
}

impl ReplicationStream {
    /// The next message from the stream. Cancel-safe: a message is only taken out of the read
    /// buffer once it is complete.
    pub async fn next(&mut self) -> Result<StreamMessage, ConnError> {
        loop {
            if let Some(m) = self.try_next()? {
                return Ok(m);
            }
            self.conn.fill().await?;
        }
    }

    /// The next message if one is already buffered; never waits.
    pub fn try_next(&mut self) -> Result<Option<StreamMessage>, ConnError> {
        loop {
            let Some((tag, mut body)) = self.conn.try_frame()? else {
                return Ok(None);
            };
            match tag {
                b'd' => {
                    if body.is_empty() {
                        return Err(ConnError::Protocol("empty CopyData".into()));
                    }
                    match body.get_u8() {
                        b'w' => {
                            if body.len() < 24 {
                                return Err(ConnError::Protocol("short XLogData header".into()));
                            }
                            let wal_start = Lsn(body.get_u64());
                            let wal_end = Lsn(body.get_u64());
                            let _send_time = body.get_i64();
                            return Ok(Some(StreamMessage::XLogData {
                                wal_start,
                                wal_end,
                                data: body,
                            }));
                        }
                        b'k' => {
                            if body.len() < 17 {
                                return Err(ConnError::Protocol("short keepalive".into()));
                            }
                            let wal_end = Lsn(body.get_u64());
                            let _send_time = body.get_i64();
                            let reply = body.get_u8() == 1;
                            return Ok(Some(StreamMessage::Keepalive { wal_end, reply }));
                        }
                        other => {
                            return Err(ConnError::Protocol(format!(
                                "unknown CopyData kind {:?}",
                                other as char
                            )));
                        }
                    }
                }
                b'E' => return Err(server_error(&body)),
                b'c' => return Err(ConnError::Closed),
                // Notices and parameter changes can arrive mid-stream.
                _ => continue,
            }
        }
    }

    /// Sends a standby status update: `written` is what walbridge has received, `flushed` what
    /// is durable downstream (the slot's confirmed_flush_lsn follows it).
    pub async fn send_status(
        &mut self,
        written: Lsn,
        flushed: Lsn,
        reply: bool,
    ) -> Result<(), ConnError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let pg_now = now.as_micros() as i64 - PG_EPOCH_OFFSET_MICROS;
        let mut body = BytesMut::with_capacity(34);
        body.put_u8(b'r');
        body.put_u64(written.0);
        body.put_u64(flushed.0);
        body.put_u64(flushed.0);
        body.put_i64(pg_now);
        body.put_u8(u8::from(reply));
        frontend::CopyData::new(body.freeze())?.write(&mut self.conn.wbuf);
        self.conn.flush().await
    }

    /// Ends the stream politely: CopyDone, then Terminate.
    pub async fn close(mut self) -> Result<(), ConnError> {
        frontend::copy_done(&mut self.conn.wbuf);
        frontend::terminate(&mut self.conn.wbuf);
        self.conn.flush().await?;
        let _ = self.conn.stream.shutdown().await;
        Ok(())
    }
}
