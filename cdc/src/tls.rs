//! TLS to Postgres with libpq's `sslmode` semantics, for both kinds of connection walbridge
//! opens: the replication connection ([`crate::conn`], which owns its socket and upgrades it
//! after an SSLRequest) and tokio-postgres' metadata and snapshot connections ([`PgTls`] is
//! their `MakeTlsConnect`).
//!
//! tokio-postgres' own DSN parser knows only `sslmode=disable|prefer|require` and rejects
//! `sslrootcert`, `sslcert` and `sslkey`, so [`split_dsn`] takes those keys out of the DSN first;
//! tokio-postgres then gets the rest with `disable`, `prefer` or `require`, and [`PgTls`]
//! does the verifying. What each mode does (as libpq does it):
//!
//! | sslmode | TLS | server certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `allow`, `prefer` (default) | when the server offers it | checked against `sslrootcert` when one is given, else not checked |
//! | `require` | always | as `prefer` (libpq: with a root certificate, require acts as verify-ca) |
//! | `verify-ca` | always | signed by the CA in `sslrootcert` (required) |
//! | `verify-full` | always | as `verify-ca`, and valid for `host=` |
//!
//! Unlike libpq, no default `~/.postgresql/root.crt` is read: the CA is always named in the DSN,
//! so what is trusted is visible in the config. `sslrootcert=system` (libpq 16) trusts the
//! system's CA bundle instead: `$SSL_CERT_FILE` when set (as OpenSSL reads it), else the first
//! of the distributions' bundle paths in [`SYSTEM_BUNDLES`]. Any public CA could then sign a
//! certificate for another server, so, as in libpq, it implies `verify-full` and refuses a
//! weaker `sslmode`. `sslcert` + `sslkey` (PEM) send a client
//! certificate. Crypto is rustls with the ring provider (aws-lc-rs needs cmake to build).

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// libpq tries plain first, then TLS; walbridge treats it as `prefer`.
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, TlsError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(TlsError::UnknownMode(other.to_owned())),
        })
    }

    /// Whether the connection must be encrypted (else plain is fine when the server has no TLS).
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// The TLS keys of a DSN.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    pub mode: SslMode,
    pub rootcert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "sslmode={0} is not a mode walbridge knows: use disable, prefer, require, verify-ca or verify-full"
    )]
    UnknownMode(String),
    #[error(
        "sslmode={0} checks the server's certificate but no sslrootcert is given: add sslrootcert=/path/to/ca.crt (the CA that signed the server's certificate), or use sslmode=require to encrypt without checking"
    )]
    NeedsRootCert(SslMode),
    #[error("{key} is given without {missing}: a client certificate needs both sslcert and sslkey")]
    HalfClientCert {
        key: &'static str,
        missing: &'static str,
    },
    #[error("cannot read {key}={path}: {reason}")]
    File {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{key}={path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate { key: &'static str, path: PathBuf },
    #[error("TLS settings rejected: {0}")]
    Config(String),
    #[error(
        "sslrootcert=system trusts every CA of the system, so it needs sslmode=verify-full (any of those CAs can sign a certificate for another server), not sslmode={0}: use sslmode=verify-full, or name your own CA with sslrootcert=/path/to/ca.crt"
    )]
    SystemNeedsVerifyFull(SslMode),
    #[error(
        "sslrootcert=system: no CA certificates found in {looked}; install the ca-certificates package or point SSL_CERT_FILE at a PEM bundle"
    )]
    NoSystemRoots { looked: String },
    #[error("{0}")]
    BadDsn(String),
    /// The handshake failed for a reason the user must fix (certificate, name, protocol).
    #[error("TLS handshake with Postgres at {host} failed (sslmode={mode}): {detail}")]
    Handshake {
        host: String,
        mode: SslMode,
        detail: String,
    },
    /// The network failed during the handshake: worth retrying.
    #[error("TLS handshake with Postgres at {host}: {source}")]
    Io { host: String, source: io::Error },
    #[error(
        "Postgres at {host} does not accept TLS connections but sslmode={mode} requires TLS: enable ssl on the server, or use sslmode=prefer"
    )]
    NotOffered { host: String, mode: SslMode },
}

/// Takes the TLS keys out of a DSN (libpq `key=value` or a `postgres://` URL) and returns the
/// DSN without them, for tokio-postgres' parser, and the keys.
pub fn split_dsn(text: &str) -> Result<(String, TlsOptions), TlsError> {
    let mut opts = TlsOptions::default();
    let mut mode_given = false;
    let mut take = |key: &str, value: String| -> Result<bool, TlsError> {
        match key {
            "sslmode" => {
                opts.mode = SslMode::parse(&value)?;
                mode_given = true;
            }
            "sslrootcert" => opts.rootcert = Some(PathBuf::from(value)),
            "sslcert" => opts.cert = Some(PathBuf::from(value)),
            "sslkey" => opts.key = Some(PathBuf::from(value)),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let t = text.trim();
    let rest = if t.starts_with("postgres://") || t.starts_with("postgresql://") {
        match t.split_once('?') {
            None => t.to_owned(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&') {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if !take(k, percent_decode(v)?)? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for (key, raw, value) in key_values(t)? {
            if !take(key, value)? {
                kept.push(format!("{key}={raw}"));
            }
        }
        kept.join(" ")
    };
    if opts.rootcert.as_deref() == Some(Path::new(SYSTEM)) {
        match opts.mode {
            SslMode::VerifyFull => {}
            _ if !mode_given => opts.mode = SslMode::VerifyFull,
            weaker => return Err(TlsError::SystemNeedsVerifyFull(weaker)),
        }
    }
    Ok((rest, opts))
}

/// `sslrootcert=system`: the system's CA bundle (a file literally named `system` is `./system`).
const SYSTEM: &str = "system";

/// Where distributions keep the system CA bundle, in the order they are tried when
/// `$SSL_CERT_FILE` is not set: Debian/Ubuntu, Fedora/RHEL, openSUSE, Alpine/macOS/BSD.
pub const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The system's trusted CAs and the file they came from.
fn system_roots() -> Result<(RootCertStore, PathBuf), TlsError> {
    let candidates: Vec<PathBuf> = match std::env::var_os("SSL_CERT_FILE") {
        Some(f) if !f.is_empty() => vec![PathBuf::from(f)],
        _ => SYSTEM_BUNDLES.iter().map(PathBuf::from).collect(),
    };
    for path in &candidates {
        let Ok(iter) = CertificateDer::pem_file_iter(path) else {
            continue;
        };
        let mut roots = RootCertStore::empty();
        // A bundle may hold a certificate webpki cannot parse; libpq skips those too.
        roots.add_parsable_certificates(iter.filter_map(Result::ok));
        if !roots.is_empty() {
            return Ok((roots, path.clone()));
        }
    }
    Err(TlsError::NoSystemRoots {
        looked: candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// libpq `key = value` pairs: (key, value as written, value unquoted).
fn key_values(s: &str) -> Result<Vec<(&str, &str, String)>, TlsError> {
    let bad = || TlsError::BadDsn("invalid connection string: expected key=value pairs".into());
    let mut out = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        let key_end = rest
            .find(|c: char| c == '=' || c.is_whitespace())
            .ok_or_else(bad)?;
        let key = &rest[..key_end];
        rest = rest[key_end..]
            .trim_start()
            .strip_prefix('=')
            .ok_or_else(bad)?
            .trim_start();
        let quoted = rest.starts_with('\'');
        let mut value = String::new();
        let mut escaped = false;
        let mut end = None;
        for (i, c) in rest.char_indices().skip(usize::from(quoted)) {
            match c {
                _ if escaped => {
                    value.push(c);
                    escaped = false;
                }
                '\\' => escaped = true,
                '\'' if quoted => {
                    end = Some(i + 1);
                    break;
                }
                c if !quoted && c.is_whitespace() => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = match end {
            Some(e) => e,
            None if quoted => return Err(bad()),
            None => rest.len(),
        };
        out.push((key, &rest[..end], value));
        rest = rest[end..].trim_start();
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, TlsError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| TlsError::BadDsn(format!("invalid %-escape in URL value {s:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| TlsError::BadDsn("URL value is not UTF-8".into()))
}

/// TLS for Postgres connections: the mode and, unless it is `disable`, a rustls client
/// configuration. Cheap to clone; `MakeTlsConnect` for tokio-postgres.
#[derive(Clone)]
pub struct PgTls {
    mode: SslMode,
    config: Option<Arc<ClientConfig>>,
    /// What signs an accepted certificate, for the "unknown issuer" message.
    trust: Arc<str>,
}

impl fmt::Debug for PgTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTls").field("mode", &self.mode).finish()
    }
}

impl PgTls {
    /// Never TLS.
    pub fn disabled() -> PgTls {
        PgTls {
            mode: SslMode::Disable,
            config: None,
            trust: Arc::from(""),
        }
    }

    /// Reads the certificate files named in `opts` and builds the client configuration, so a
    /// missing or bad file is reported when the config is checked, not at the first connect.
    pub fn new(opts: &TlsOptions) -> Result<PgTls, TlsError> {
        if opts.mode == SslMode::Disable {
            return Ok(PgTls::disabled());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut trust = String::new();
        let verifier: Arc<dyn ServerCertVerifier> = match &opts.rootcert {
            Some(path) => {
                let roots = if path == Path::new(SYSTEM) {
                    let (roots, file) = system_roots()?;
                    trust = format!(
                        "any CA the system trusts (sslrootcert=system read {}); the server's CA is not among them: add it to the system store, or name it with sslrootcert=/path/to/ca.crt",
                        file.display()
                    );
                    roots
                } else {
                    let mut roots = RootCertStore::empty();
                    for cert in read_certs("sslrootcert", path)? {
                        roots.add(cert).map_err(|e| TlsError::File {
                            key: "sslrootcert",
                            path: path.clone(),
                            reason: e.to_string(),
                        })?;
                    }
                    trust = "the CA in sslrootcert; point sslrootcert at the CA that signed the server's certificate".to_owned();
                    roots
                };
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| TlsError::Config(e.to_string()))?;
                if opts.mode == SslMode::VerifyFull {
                    webpki
                } else {
                    Arc::new(ChainOnly(webpki))
                }
            }
            None if matches!(opts.mode, SslMode::VerifyCa | SslMode::VerifyFull) => {
                return Err(TlsError::NeedsRootCert(opts.mode));
            }
            None => Arc::new(Unchecked(provider)),
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&opts.cert, &opts.key) {
            (Some(cert), Some(key)) => {
                let certs = read_certs("sslcert", cert)?;
                let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
                    key: "sslkey",
                    path: key.clone(),
                    reason: format!("{e} (expected an unencrypted PEM private key)"),
                })?;
                builder
                    .with_client_auth_cert(certs, key_der)
                    .map_err(|e| TlsError::Config(format!("sslcert/sslkey: {e}")))?
            }
            (Some(_), None) => {
                return Err(TlsError::HalfClientCert {
                    key: "sslcert",
                    missing: "sslkey",
                });
            }
            (None, Some(_)) => {
                return Err(TlsError::HalfClientCert {
                    key: "sslkey",
                    missing: "sslcert",
                });
            }
            (None, None) => builder.with_no_client_auth(),
        };
        Ok(PgTls {
            mode: opts.mode,
            config: Some(Arc::new(config)),
            trust: Arc::from(trust),
        })
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// The mode tokio-postgres should negotiate with (it knows only these three); the
    /// verifying is done by this connector.
    pub fn pg_mode(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Pg;
        match self.mode {
            SslMode::Disable => Pg::Disable,
            SslMode::Allow | SslMode::Prefer => Pg::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
        }
    }

    /// The client configuration when TLS may be used.
    pub(crate) fn client_config(&self) -> Option<&Arc<ClientConfig>> {
        self.config.as_ref()
    }

    /// Runs the TLS handshake on an already negotiated stream (after the server said `S`).
    pub(crate) async fn handshake<S>(
        &self,
        config: Arc<ClientConfig>,
        stream: S,
        host: &str,
    ) -> Result<tokio_rustls::client::TlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name = server_name(host, self.mode)?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await
            .map_err(|e| explain(e, host, self.mode, &self.trust))
    }
}

fn server_name(host: &str, mode: SslMode) -> Result<ServerName<'static>, TlsError> {
    match ServerName::try_from(host.to_owned()) {
        Ok(n) => Ok(n),
        // Without name checking the name only goes into SNI, which Postgres ignores.
        Err(_) if mode != SslMode::VerifyFull => Ok(ServerName::try_from("localhost")
            .map_err(|e| TlsError::Config(e.to_string()))?
            .to_owned()),
        Err(e) => Err(TlsError::Handshake {
            host: host.to_owned(),
            mode,
            detail: format!(
                "host={host} is not a DNS name or IP address to check the certificate against: {e}"
            ),
        }),
    }
}

/// Turns a failed handshake into what to fix; plain network errors stay I/O errors (retried).
fn explain(e: io::Error, host: &str, mode: SslMode, trust: &str) -> TlsError {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return TlsError::Io {
            host: host.to_owned(),
            source: e,
        };
    };
    let detail = match tls {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "the server's certificate is not valid for the name {host:?}; connect with host= set to a name in the certificate (its CN/subjectAltName), or use sslmode=verify-ca to check only the CA"
        ),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            format!("the server's certificate is not signed by {trust}")
        }
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "the server's certificate has expired; renew it on the server".to_owned(),
        rustls::Error::InvalidCertificate(c) => {
            format!("the server's certificate is not accepted: {c:?}")
        }
        rustls::Error::AlertReceived(alert) => format!(
            "the server refused the handshake ({alert:?}); if it asks for a client certificate, add sslcert= and sslkey= to the DSN"
        ),
        other => other.to_string(),
    };
    TlsError::Handshake {
        host: host.to_owned(),
        mode,
        detail,
    }
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |reason: String| TlsError::File {
        key,
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| file_err(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            key,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// verify-ca (and prefer/require with a root certificate): the chain must lead to the CA, the
/// name is not checked. webpki checks the chain before the name, so a name error means the
/// chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// prefer/require without a root certificate: encrypted, the certificate is not checked (as
/// libpq); the handshake signatures still are.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// tokio-postgres glue.

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = TlsError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, TlsError> {
        Ok(PgTlsConnect {
            tls: self.clone(),
            host: domain.to_owned(),
        })
    }
}

/// One connection's handshake (tokio-postgres calls it after the server agreed to TLS).
pub struct PgTlsConnect {
    tls: PgTls,
    host: String,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<PgTlsStream<S>, TlsError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            // tokio-postgres only asks for TLS when the mode is not disable, and a PgTls that
            // is not disable always has a client configuration.
            let config = self.tls.client_config().cloned().ok_or_else(|| {
                TlsError::Config("TLS was negotiated with sslmode=disable".to_owned())
            })?;
            let s = self.tls.handshake(config, stream, &self.host).await?;
            Ok(PgTlsStream(s))
        })
    }
}

/// A TLS stream as tokio-postgres wants it.
pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM without channel binding (tokio-postgres' channel_binding=prefer falls back).
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_keys_leave_the_dsn_in_both_forms() {
        let (rest, o) = split_dsn(
            "host=db user=u sslmode=verify-full sslrootcert='/etc/my ca.crt' password='a b' dbname=x",
        )
        .unwrap();
        assert_eq!(rest, "host=db user=u password='a b' dbname=x");
        assert_eq!(o.mode, SslMode::VerifyFull);
        assert_eq!(o.rootcert.as_deref(), Some(Path::new("/etc/my ca.crt")));
        let (rest, o) = split_dsn(
            "postgres://u:p@db:5432/x?sslmode=require&application_name=w&sslcert=%2Ftmp%2Fc.pem&sslkey=/tmp/k.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@db:5432/x?application_name=w");
        assert_eq!(o.mode, SslMode::Require);
        assert_eq!(o.cert.as_deref(), Some(Path::new("/tmp/c.pem")));
        assert_eq!(o.key.as_deref(), Some(Path::new("/tmp/k.pem")));
        let (rest, o) = split_dsn("postgresql://u@db/x?sslmode=disable").unwrap();
        assert_eq!(rest, "postgresql://u@db/x");
        assert_eq!(o.mode, SslMode::Disable);
        assert_eq!(split_dsn("host=h").unwrap().1.mode, SslMode::Prefer);
    }

    #[test]
    fn verifying_modes_need_a_root_certificate_and_say_how_to_fix() {
        for mode in ["verify-ca", "verify-full"] {
            let (_, o) = split_dsn(&format!("host=h sslmode={mode}")).unwrap();
            let e = PgTls::new(&o).unwrap_err().to_string();
            assert!(e.contains("sslrootcert=/path/to/ca.crt"), "{e}");
            assert!(e.contains(mode), "{e}");
        }
        let e = split_dsn("host=h sslmode=verify_full")
            .unwrap_err()
            .to_string();
        assert!(e.contains("verify-full"), "{e}");
    }

    #[test]
    fn a_missing_root_certificate_file_is_named() {
        let (_, o) = split_dsn("host=h sslmode=verify-ca sslrootcert=/nonexistent/ca.crt").unwrap();
        let e = PgTls::new(&o).unwrap_err().to_string();
        assert!(e.contains("sslrootcert=/nonexistent/ca.crt"), "{e}");
        let (_, o) = split_dsn("host=h sslcert=/tmp/c.pem").unwrap();
        let e = PgTls::new(&o).unwrap_err().to_string();
        assert!(e.contains("without sslkey"), "{e}");
    }

    #[test]
    fn sslrootcert_system_implies_verify_full_and_refuses_weaker_modes() {
        let (_, o) = split_dsn("host=h sslrootcert=system").unwrap();
        assert_eq!(o.mode, SslMode::VerifyFull);
        let (_, o) = split_dsn("postgres://u@h/x?sslrootcert=system&sslmode=verify-full").unwrap();
        assert_eq!(o.mode, SslMode::VerifyFull);
        for weak in ["disable", "prefer", "require", "verify-ca"] {
            let e = split_dsn(&format!("host=h sslmode={weak} sslrootcert=system"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("sslmode=verify-full") && e.contains(weak), "{e}");
        }
        // A file named system is ./system, as in libpq.
        let (_, o) = split_dsn("host=h sslmode=require sslrootcert=./system").unwrap();
        assert_eq!(o.mode, SslMode::Require);
    }
}
