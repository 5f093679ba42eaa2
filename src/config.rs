//! `pipelines.yaml`: parsing and validation.
//!
//! Loading runs in phases so that a user fixing a file sees every problem at once:
//!
//! ```text
//! text ──parse (serde, deny_unknown_fields)──▶ raw tree with spans ──validate all──▶ Config
//!            │ first structural error                 │ every semantic error
//!            ▼                                        ▼
//!        ConfigErrors  (origin:line:column: key.path: what is wrong — what would be valid)
//! ```
//!
//! The parse phase keeps the source location of every value (`serde_saphyr::Spanned`) so that
//! semantic problems found later (a bad broker list, an out-of-range interval) still point at a
//! line and column. Serde stops at the first structural problem (unknown key, wrong type, missing
//! key), so those are reported one at a time; everything past parsing is reported together.
//!
//! `${VAR}` in any string value is replaced by the environment variable `VAR` (write `$${` for a
//! literal `${`), and `${file:/path}` by the contents of a file without its final newline (how
//! Docker and Kubernetes hand out secrets). Neither value is ever shown in an error. Quote such values inside flow collections (`[ "${A}" ]`), where `{` is syntax.
//!
//! Secrets: the source DSN may carry a password. It is kept in [`Dsn`], whose `Debug` redacts it,
//! and no error message ever echoes a DSN that is not redacted.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

/// The validated contents of `pipelines.yaml`.
#[derive(Clone, Debug)]
pub struct Config {
    pub source: SourceConfig,
    pub kafka: KafkaConfig,
    pub registry: RegistryConfig,
    /// The HTTP endpoint for `/metrics`, `/health` and `/ready`; none when the section is absent.
    pub metrics: Option<MetricsConfig>,
    pub log: LogConfig,
    /// Business-event mappings and the outbox (`events:`); none when the section is absent.
    pub events: Option<std::sync::Arc<crate::events::EventsConfig>>,
    /// OTLP trace export; none when the section is absent (off by default).
    pub telemetry: Option<crate::telemetry::TelemetryConfig>,
    /// The stream processors (`walbridge process`); none when the section is absent.
    pub processors: Option<ProcessorsConfig>,
}

/// `processors:`: how `walbridge process` keeps the live views (see the `transforms` crate).
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessorsConfig {
    pub group_id: String,
    pub checkpoint_dir: PathBuf,
    pub epoch_interval: Duration,
    pub checkpoint_interval: Duration,
    /// How long the broker may hold the processors' fetches (`processors.fetch_wait_ms`).
    pub fetch_wait: Duration,
    pub safety_stock: transforms::SafetyStock,
    pub alerts_topic: Option<String>,
    /// The analysts' SQL endpoint (`processors.sql`); none when absent.
    pub sql: Option<SqlEndpointConfig>,
    /// Where the views go besides the SQL endpoint (`processors.sinks`), in the order given.
    pub sinks: Vec<ViewSinkConfig>,
    /// `/metrics`, `/health` and `/ready` of `walbridge process` (`processors.metrics_listen`).
    pub metrics_listen: Option<SocketAddr>,
    /// `processors.instances`.
    pub instances: Instances,
}

/// `processors.instances`: how many `walbridge process` run for one group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Instances {
    /// One instance reads every partition (a second one is refused).
    #[default]
    Single,
    /// Every instance joins the consumer group `group_id` and folds a share of the partitions
    /// (see `transforms::group`).
    Group,
}

/// `processors.sql`: the read-only Postgres-protocol endpoint over the live views.
#[derive(Clone, Debug, PartialEq)]
pub struct SqlEndpointConfig {
    pub listen: SocketAddr,
    pub credentials: Credentials,
    /// Certificate and key: TLS, required of every client.
    pub tls: Option<transforms::sql::SqlTls>,
    pub max_connections: usize,
}

/// One entry of `processors.sinks`.
#[derive(Clone, Debug)]
pub enum ViewSinkConfig {
    /// Compacted topics `<topic_prefix>.view.<view>` on the pipeline's brokers
    /// (`topic_prefix` defaults to `kafka.topic_prefix`).
    Kafka {
        name: String,
        topic_prefix: Option<String>,
    },
    /// Read-model tables in `schema` of the database at `dsn`.
    Postgres {
        name: String,
        dsn: Dsn,
        schema: String,
    },
    /// Parquet changelog files under `dir`.
    Parquet { name: String, dir: PathBuf },
}

impl ViewSinkConfig {
    pub fn name(&self) -> &str {
        match self {
            ViewSinkConfig::Kafka { name, .. }
            | ViewSinkConfig::Postgres { name, .. }
            | ViewSinkConfig::Parquet { name, .. } => name,
        }
    }
}

impl PartialEq for ViewSinkConfig {
    fn eq(&self, other: &Self) -> bool {
        format!("{self:?}") == format!("{other:?}")
    }
}

impl Config {
    /// What the processors need, from `processors:` plus the kafka and registry sections.
    pub fn processor_config(&self) -> Option<transforms::ProcessorConfig> {
        let p = self.processors.as_ref()?;
        Some(transforms::ProcessorConfig {
            brokers: self.kafka.brokers.join(","),
            topic_prefix: self.kafka.topic_prefix.clone(),
            registry_url: self.registry.url.to_string(),
            group_id: p.group_id.clone(),
            checkpoint_dir: p.checkpoint_dir.clone(),
            epoch_interval: p.epoch_interval,
            checkpoint_interval: p.checkpoint_interval,
            fetch_wait: p.fetch_wait,
            safety_stock: p.safety_stock.clone(),
            alerts_topic: p
                .alerts_topic
                .clone()
                .unwrap_or_else(|| format!("{}.alerts.oversell", self.kafka.topic_prefix)),
            alerts_partitions: self.kafka.partitions,
            kafka_properties: self.kafka.connection_properties(),
            unit: transforms::group::Unit::All,
            view_topic_prefix: p.sinks.iter().find_map(|s| match s {
                ViewSinkConfig::Kafka { topic_prefix, .. } => Some(
                    topic_prefix
                        .clone()
                        .unwrap_or_else(|| self.kafka.topic_prefix.clone()),
                ),
                _ => None,
            }),
        })
    }
}

/// The legacy Postgres database to capture changes from.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub dsn: Dsn,
    pub publication: String,
    pub slot: String,
    pub tables: Vec<TableSelector>,
    pub status_interval: Duration,
    pub heartbeat_interval: Duration,
    /// Where walbridge keeps its own record of the confirmed source position.
    pub state_dir: PathBuf,
    pub snapshot: SnapshotMode,
    /// Parallel connections copying snapshot chunks (`source.snapshot_workers`).
    pub snapshot_workers: usize,
    /// Size of one snapshot chunk of a table's heap (`source.snapshot_chunk_mb`).
    pub snapshot_chunk_bytes: u64,
    /// How long a stop (SIGTERM) may take to deliver what is in flight before walbridge gives
    /// up and exits non-zero (`source.shutdown_timeout_ms`). Nothing is lost either way: what
    /// was not delivered was not confirmed to the slot, and the next start sends it again.
    pub shutdown_timeout: Duration,
}

/// `registry.on_incompatible` (see `crate::contract`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnIncompatible {
    Stop,
    NewVersion,
    /// Send the table's changes of the new shape to the dead-letter topic and go on.
    DeadLetter,
}

/// `kafka.dead_letter`: what happens to a change that cannot be encoded (see `crate::dlq`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadLetter {
    /// Send it to `<topic_prefix>.dlq` with the reason and go on (the default).
    Topic,
    /// Stop the pipeline at it; nothing past it is confirmed.
    Stop,
}

/// When to copy the tables' existing rows before streaming (`source.snapshot`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotMode {
    /// When walbridge creates the slot: the rows as of the slot's consistent point arrive as
    /// `op = r` events, then the stream continues from exactly that point.
    Initial,
    /// Never: only changes committed after the slot's creation are streamed.
    Never,
    /// As `initial`, and also whenever streaming alone would miss rows: the slot is gone after
    /// walbridge had streamed from it, it was invalidated (`wal_status = lost`), or it exists
    /// without walbridge's record of a finished snapshot. The slot is then recreated and the
    /// tables copied again.
    WhenNeeded,
    /// Copy the tables as `initial` does, then stop without streaming (and drop the slot, which
    /// would otherwise hold WAL for nobody).
    InitialOnly,
}

impl SourceConfig {
    /// Connection settings for tokio-postgres (snapshot and metadata connections).
    pub fn pg_config(&self) -> tokio_postgres::Config {
        self.dsn.pg_config().clone()
    }

    /// TLS for every connection to the source (`sslmode` and friends in the DSN).
    pub fn tls(&self) -> cdc::tls::PgTls {
        self.dsn.tls.clone()
    }
}

/// A Postgres connection string that may contain a password.
///
/// `Debug` and [`Dsn::redacted`] hide the password; [`Dsn::expose`] gives the full text for
/// the code that actually connects.
#[derive(Clone)]
pub struct Dsn {
    text: String,
    config: tokio_postgres::Config,
    tls: cdc::tls::PgTls,
}

impl Dsn {
    /// Parses a libpq `key=value` string or a `postgres://` URL without connecting.
    /// The TLS keys (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`) are handled by
    /// [`cdc::tls`]: tokio-postgres gets the rest, and the certificate files are read here.
    pub fn parse(text: &str) -> Result<Dsn, String> {
        let (rest, tls_opts) = cdc::tls::split_dsn(text).map_err(|e| e.to_string())?;
        let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| {
            // The parser's detail can quote a character of the input; drop it when the input
            // carries a password.
            if has_password(text) {
                "invalid connection string".to_string()
            } else {
                e.to_string()
            }
        })?;
        if config.get_hosts().is_empty() {
            return Err("no host given: add host=... (e.g. host=127.0.0.1)".to_string());
        }
        if config.get_user().is_none() {
            return Err("no user given: add user=... (e.g. user=postgres)".to_string());
        }
        let tls = cdc::tls::PgTls::new(&tls_opts).map_err(|e| e.to_string())?;
        config.ssl_mode(tls.pg_mode());
        Ok(Dsn {
            text: text.to_string(),
            config,
            tls,
        })
    }

    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// TLS for connections made with [`Dsn::pg_config`].
    pub fn tls(&self) -> &cdc::tls::PgTls {
        &self.tls
    }

    /// The connection string with its password, for connecting. Never log it.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// The connection string with any password replaced by `***`, safe for logs and errors.
    pub fn redacted(&self) -> String {
        redact_dsn(&self.text)
    }
}

impl fmt::Debug for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Dsn").field(&self.redacted()).finish()
    }
}

pub use cdc::slot::TableSelector;

/// Where change and event topics go.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// `host:port` entries, in the order given.
    pub brokers: Vec<String>,
    pub topic_prefix: String,
    pub partitions: i32,
    pub replication_factor: i16,
    /// Extra librdkafka properties, passed through unchanged.
    pub producer: BTreeMap<String, String>,
    /// Bytes of produced-but-unacknowledged messages before the source stops reading.
    pub max_in_flight_bytes: u64,
    /// Producers (broker connections) the change topics are spread over, a topic always on the
    /// same one.
    pub connections: usize,
    /// Tables whose records are routed to a partition by these columns (`schema.table` →
    /// columns) instead of by the whole key.
    pub partition_by: BTreeMap<String, Vec<String>>,
    pub dead_letter: DeadLetter,
}

impl KafkaConfig {
    /// The `bootstrap.servers` value for librdkafka.
    pub fn bootstrap_servers(&self) -> String {
        self.brokers.join(",")
    }

    /// `<prefix>.<schema>.<table>`.
    pub fn topic_for(&self, schema: &str, table: &str) -> String {
        format!("{}.{schema}.{table}", self.topic_prefix)
    }

    /// The properties of `kafka.producer` that say how to connect (`security.*`, `sasl.*`,
    /// `ssl.*`): every Kafka client walbridge makes gets them, not only the producer.
    pub fn connection_properties(&self) -> Vec<(String, String)> {
        self.producer
            .iter()
            .filter(|(k, _)| {
                k.starts_with("security.") || k.starts_with("sasl.") || k.starts_with("ssl.")
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// A librdkafka client config with the brokers and the connection properties, for the
    /// consumers and admin clients (`tail`, `verify`, `dlq`, the processors' metrics).
    pub fn client(&self) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap_servers());
        for (k, v) in self.connection_properties() {
            c.set(k, v);
        }
        c
    }

    /// `<prefix>.dlq`: two parts, so it never collides with a table's three-part topic.
    pub fn dead_letter_topic(&self) -> String {
        format!("{}.dlq", self.topic_prefix)
    }
}

/// The Confluent-compatible schema registry.
#[derive(Clone)]
pub struct RegistryConfig {
    pub url: url::Url,
    /// What to do when a table's new shape is incompatible with its registered schemas.
    pub on_incompatible: OnIncompatible,
    /// When set, walbridge runs its own registry server.
    pub embedded: Option<EmbeddedRegistry>,
}

impl fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("url", &redact_url(&self.url))
            .field("embedded", &self.embedded)
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbeddedRegistry {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Credentials the registry's write endpoints require (`registry.embedded.write_auth`).
    pub write_auth: Option<Credentials>,
}

/// A user and password; the password never shows in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"***")
            .finish()
    }
}

/// `metrics`: where `walbridge run` serves its metrics and health endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

/// `log`: how `walbridge run` writes its log (stderr).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// One problem in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub origin: String,
    /// 1-based; 0 when the location is unknown (e.g. the file could not be read).
    pub line: u64,
    pub column: u64,
    /// Dotted key path such as `kafka.brokers` or `source.tables[2]`; empty for the document.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a config file, in source order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors {
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        errors: vec![ConfigError {
            origin: origin.clone(),
            line: 0,
            column: 0,
            path: String::new(),
            message: format!("cannot read the config file: {e}"),
        }],
    })?;
    from_str(&text, &origin)
}

/// Parses and validates config text; `origin` names it in errors (usually the file path).
pub fn from_str(src: &str, origin: &str) -> Result<Config, ConfigErrors> {
    from_str_with_env(src, origin, &|name| std::env::var(name).ok())
}

/// Like [`from_str`], with `${VAR}` looked up through `env` (lets tests avoid the process env).
pub fn from_str_with_env(
    src: &str,
    origin: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let raw = parse(src, origin)?;
    let mut v = Validator {
        origin,
        env,
        errors: Vec::new(),
    };
    let config = v.config(&raw);
    match config {
        Some(config) if v.errors.is_empty() => Ok(config),
        _ => {
            v.errors.sort_by_key(|e| (e.line, e.column));
            Err(ConfigErrors { errors: v.errors })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Schema: expected shape and an example for every key, used to explain parse errors.

struct KeySpec {
    path: &'static str,
    expects: &'static str,
    example: &'static str,
}

const fn key(path: &'static str, expects: &'static str, example: &'static str) -> KeySpec {
    KeySpec {
        path,
        expects,
        example,
    }
}

const IDENT: &str = "an identifier matching [a-z_][a-z0-9_]*, at most 63 bytes";

const KEYS: &[KeySpec] = &[
    key(
        "source",
        "a mapping",
        "source: { dsn: ..., publication: ..., slot: ..., tables: [...] }",
    ),
    key(
        "source.dsn",
        "a libpq key=value connection string or a postgres:// URL",
        "host=127.0.0.1 port=5432 user=postgres dbname=legacy",
    ),
    key("source.publication", IDENT, "walbridge"),
    key("source.slot", IDENT, "walbridge"),
    key(
        "source.tables",
        "a non-empty list of \"schema.table\" or \"schema.*\"",
        "[oms.orders, wms.*]",
    ),
    key(
        "source.status_interval_ms",
        "an integer number of milliseconds in 100..=60000",
        "1000",
    ),
    key(
        "source.heartbeat_interval_ms",
        "an integer number of milliseconds in 100..=3600000",
        "10000",
    ),
    key("source.state_dir", "a directory path", ".walbridge/state"),
    key(
        "source.snapshot",
        "initial, never, when_needed or initial_only",
        "initial",
    ),
    key("source.snapshot_workers", "an integer in 1..=64", "4"),
    key("source.snapshot_chunk_mb", "an integer in 1..=65536", "16"),
    key(
        "source.shutdown_timeout_ms",
        "an integer number of milliseconds in 1000..=3600000",
        "30000",
    ),
    key(
        "kafka",
        "a mapping",
        "kafka: { brokers: ..., topic_prefix: ... }",
    ),
    key(
        "kafka.brokers",
        "\"host:port[,host:port]\"",
        "127.0.0.1:9092",
    ),
    key(
        "kafka.topic_prefix",
        "Kafka topic-name characters [a-zA-Z0-9._-]",
        "legacy",
    ),
    key("kafka.partitions", "an integer in 1..=10000", "3"),
    key("kafka.replication_factor", "an integer in 1..=32767", "1"),
    key(
        "kafka.producer",
        "a mapping of librdkafka property names to values",
        "{ linger.ms: \"5\" }",
    ),
    key(
        "kafka.max_in_flight_bytes",
        "an integer number of bytes in 1048576..=68719476736",
        "67108864",
    ),
    key("kafka.connections", "an integer in 1..=64", "1"),
    key(
        "kafka.partition_by",
        "a mapping of \"schema.table\" to a list of its primary-key columns",
        "{ wms.stock_levels: [sku] }",
    ),
    key("kafka.dead_letter", "topic or stop", "topic"),
    key("registry", "a mapping", "registry: { url: ... }"),
    key(
        "registry.url",
        "an http:// or https:// URL",
        "http://127.0.0.1:8081",
    ),
    key(
        "registry.on_incompatible",
        "stop, new_version or dead_letter",
        "stop",
    ),
    key(
        "registry.embedded",
        "a mapping with listen and data_dir",
        "{ listen: \"127.0.0.1:8081\", data_dir: .walbridge/registry }",
    ),
    key(
        "registry.embedded.listen",
        "an IP socket address \"ip:port\"",
        "127.0.0.1:8081",
    ),
    key(
        "registry.embedded.data_dir",
        "a directory path",
        ".walbridge/registry",
    ),
    key(
        "registry.embedded.write_auth",
        "\"user:password\" required for writes",
        "\"walbridge:${REGISTRY_PASSWORD}\"",
    ),
    key(
        "metrics",
        "a mapping",
        "metrics: { listen: \"127.0.0.1:9187\" }",
    ),
    key(
        "metrics.listen",
        "an IP socket address \"ip:port\"",
        "127.0.0.1:9187",
    ),
    key("log", "a mapping", "log: { format: json }"),
    key("events", "a mapping", "events: { mappings: [...] }"),
    key(
        "events.contracts_dir",
        "a directory of .avsc files",
        "avro/contracts",
    ),
    key(
        "events.max_transaction_bytes",
        "bytes (at least 4096)",
        "268435456",
    ),
    key(
        "events.mappings",
        "a list of mappings",
        "[{ name: ..., table: ..., on: insert, event: ..., key: ..., topic: ..., fields: {...} }]",
    ),
    key("events.mappings.name", "[a-z0-9_]+", "order_placed"),
    key("events.mappings.table", "\"schema.table\"", "oms.orders"),
    key("events.mappings.on", "insert, update or delete", "insert"),
    key(
        "events.mappings.when",
        "a condition expression",
        "\"old.status <> new.status\"",
    ),
    key(
        "events.mappings.event",
        "a contract's record name",
        "OrderPlaced",
    ),
    key(
        "events.mappings.key",
        "an expression (the aggregate id)",
        "new.id",
    ),
    key(
        "events.mappings.topic",
        "a Kafka topic name",
        "retail.orders",
    ),
    key(
        "events.mappings.fields",
        "a mapping of contract field to expression",
        "{ order_id: new.id }",
    ),
    key(
        "events.mappings.lines",
        "a mapping with field, table, parent_key, fields",
        "{ field: lines, table: oms.order_lines, parent_key: new.order_id, fields: {...} }",
    ),
    key(
        "events.mappings.lines.field",
        "the contract's array field",
        "lines",
    ),
    key(
        "events.mappings.lines.table",
        "\"schema.table\"",
        "oms.order_lines",
    ),
    key(
        "events.mappings.lines.parent_key",
        "an expression on the line row",
        "new.order_id",
    ),
    key(
        "events.mappings.lines.parent_id",
        "an expression on the parent row",
        "new.id",
    ),
    key(
        "events.mappings.lines.fields",
        "a mapping of item field to expression",
        "{ sku: new.sku }",
    ),
    key(
        "events.outbox",
        "a mapping with table and/or message_prefix",
        "{ message_prefix: walbridge.outbox, topic_prefix: retail }",
    ),
    key("events.outbox.table", "\"schema.table\"", "public.outbox"),
    key(
        "events.outbox.message_prefix",
        "a logical message prefix",
        "walbridge.outbox",
    ),
    key(
        "events.outbox.topic_prefix",
        "a Kafka topic name prefix",
        "retail",
    ),
    key(
        "telemetry",
        "a mapping",
        "telemetry: { otlp_endpoint: \"http://127.0.0.1:4318\", service_name: walbridge }",
    ),
    key(
        "telemetry.otlp_endpoint",
        "an http:// URL of an OTLP/HTTP receiver (traces go to /v1/traces)",
        "http://127.0.0.1:4318",
    ),
    key("telemetry.service_name", "a non-empty name", "walbridge"),
    key("log.format", "text or json", "json"),
    key(
        "processors",
        "a mapping",
        "processors: { group_id: walbridge-views, checkpoint_dir: .walbridge/processors }",
    ),
    key("processors.group_id", IDENT, "walbridge_views"),
    key(
        "processors.checkpoint_dir",
        "a directory path",
        ".walbridge/processors",
    ),
    key(
        "processors.epoch_interval_ms",
        "an integer number of milliseconds in 10..=60000",
        "100",
    ),
    key(
        "processors.checkpoint_interval_ms",
        "an integer number of milliseconds in 100..=3600000",
        "1000",
    ),
    key(
        "processors.fetch_wait_ms",
        "an integer number of milliseconds in 0..=5000",
        "10",
    ),
    key(
        "processors.alerts_topic",
        "a Kafka topic name",
        "legacy.alerts.oversell",
    ),
    key(
        "processors.safety_stock",
        "a mapping with default, categories and skus",
        "{ default: 2, categories: { electronics: 5 }, skus: { SKU-000001: 10 } }",
    ),
    key("processors.safety_stock.default", "an integer >= 0", "2"),
    key(
        "processors.sql",
        "a mapping with listen, user and password",
        "sql: { listen: \"127.0.0.1:6875\", user: analyst, password: \"${WALBRIDGE_SQL_PASSWORD}\" }",
    ),
    key("processors.sql.listen", "host:port", "127.0.0.1:6875"),
    key(
        "processors.sql.tls",
        "a mapping with cert and key (PEM files)",
        "tls: { cert: /etc/walbridge/sql.crt, key: /etc/walbridge/sql.key }",
    ),
    key(
        "processors.sql.tls.cert",
        "a PEM certificate chain file",
        "/etc/walbridge/sql.crt",
    ),
    key(
        "processors.sql.tls.key",
        "a PEM private key file",
        "/etc/walbridge/sql.key",
    ),
    key(
        "processors.sql.max_connections",
        "an integer in 1..=10000",
        "64",
    ),
    key("processors.sql.user", "a non-empty user name", "analyst"),
    key(
        "processors.sql.password",
        "a non-empty password (use ${VAR} or ${file:/path})",
        "\"${WALBRIDGE_SQL_PASSWORD}\"",
    ),
    key(
        "processors.sinks",
        "a list of sinks, each with kind and name",
        "sinks: [ { kind: kafka, name: views_topics }, { kind: parquet, name: lake, dir: lake } ]",
    ),
    key("processors.instances", "single or group", "group"),
    key(
        "processors.metrics_listen",
        "host:port (a port of its own: metrics.listen is walbridge run's)",
        "127.0.0.1:19188",
    ),
    key(
        "processors.sinks.kind",
        "kafka, postgres or parquet",
        "postgres",
    ),
    key("processors.sinks.name", IDENT, "read_model"),
    key(
        "processors.sinks.topic_prefix",
        "a Kafka topic name prefix (kafka sinks; default kafka.topic_prefix)",
        "legacy",
    ),
    key(
        "processors.sinks.dsn",
        "a Postgres connection string (postgres sinks)",
        "\"host=127.0.0.1 port=5432 user=app dbname=analytics\"",
    ),
    key(
        "processors.sinks.schema",
        "a schema name (postgres sinks; default walbridge_views)",
        "walbridge_views",
    ),
    key(
        "processors.sinks.dir",
        "a directory path (parquet sinks)",
        ".walbridge/lake",
    ),
    key(
        "processors.safety_stock.categories",
        "a mapping of product category to units",
        "{ electronics: 5 }",
    ),
    key(
        "processors.safety_stock.skus",
        "a mapping of SKU to units",
        "{ SKU-000001: 10 }",
    ),
];

fn spec(path: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|k| k.path == path)
}

/// Keys allowed directly under `section` ("" for the top level).
fn keys_under(section: &str) -> Vec<&'static str> {
    KEYS.iter()
        .filter_map(|k| {
            let rest = if section.is_empty() {
                k.path
            } else {
                k.path.strip_prefix(section)?.strip_prefix('.')?
            };
            (!rest.contains('.')).then_some(rest)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Phase 1: parse into a tree that keeps every value's location.

type S<T> = Spanned<T>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    source: RawSource,
    kafka: RawKafka,
    registry: RawRegistry,
    metrics: Option<S<RawMetrics>>,
    log: Option<S<RawLog>>,
    events: Option<S<crate::events::config::RawEvents>>,
    telemetry: Option<S<RawTelemetry>>,
    processors: Option<S<RawProcessors>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProcessors {
    group_id: S<String>,
    checkpoint_dir: Option<S<String>>,
    epoch_interval_ms: Option<S<i64>>,
    checkpoint_interval_ms: Option<S<i64>>,
    fetch_wait_ms: Option<S<i64>>,
    alerts_topic: Option<S<String>>,
    safety_stock: Option<S<RawSafetyStock>>,
    sql: Option<S<RawSql>>,
    sinks: Option<S<Vec<S<RawViewSink>>>>,
    metrics_listen: Option<S<String>>,
    instances: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSql {
    listen: S<String>,
    user: S<String>,
    password: S<String>,
    tls: Option<S<RawSqlTls>>,
    max_connections: Option<S<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSqlTls {
    cert: S<String>,
    key: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawViewSink {
    kind: S<String>,
    name: S<String>,
    topic_prefix: Option<S<String>>,
    dsn: Option<S<String>>,
    schema: Option<S<String>>,
    dir: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSafetyStock {
    default: Option<S<i64>>,
    categories: Option<S<BTreeMap<String, S<i64>>>>,
    skus: Option<S<BTreeMap<String, S<i64>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    dsn: S<String>,
    publication: S<String>,
    slot: S<String>,
    tables: S<Vec<S<String>>>,
    status_interval_ms: Option<S<i64>>,
    heartbeat_interval_ms: Option<S<i64>>,
    state_dir: Option<S<String>>,
    snapshot: Option<S<String>>,
    snapshot_workers: Option<S<i64>>,
    snapshot_chunk_mb: Option<S<i64>>,
    shutdown_timeout_ms: Option<S<i64>>,
}

/// `kafka.partition_by`: table → its routing columns, with their places in the file.
type RawPartitionBy = BTreeMap<String, S<Vec<S<String>>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    brokers: S<String>,
    topic_prefix: S<String>,
    partitions: Option<S<i64>>,
    replication_factor: Option<S<i64>>,
    producer: Option<S<BTreeMap<String, S<String>>>>,
    max_in_flight_bytes: Option<S<i64>>,
    connections: Option<S<i64>>,
    partition_by: Option<S<RawPartitionBy>>,
    dead_letter: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    url: S<String>,
    embedded: Option<S<RawEmbedded>>,
    on_incompatible: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmbedded {
    listen: S<String>,
    data_dir: S<String>,
    write_auth: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    otlp_endpoint: S<String>,
    service_name: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<S<String>>,
}

fn parse(src: &str, origin: &str) -> Result<RawConfig, ConfigErrors> {
    let mut path = Vec::new();
    let result = serde_saphyr::with_deserializer_from_str(src, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = key_path(e.path());
            e.into_inner()
        })
    });
    result.map_err(|e| ConfigErrors {
        errors: vec![explain_parse_error(&e, &path, origin)],
    })
}

/// Key path segments of a parse error, without the `value` field that `Spanned` adds.
fn key_path(path: &serde_path_to_error::Path) -> Vec<String> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|s| match s {
            Segment::Map { key } if key == "value" => None,
            Segment::Map { key } => Some(key.clone()),
            Segment::Enum { variant } => Some(variant.clone()),
            Segment::Seq { index } => Some(format!("[{index}]")),
            Segment::Unknown => None,
        })
        .collect()
}

fn join_path(segments: &[String]) -> String {
    let mut out = String::new();
    for s in segments {
        if !out.is_empty() && !s.starts_with('[') {
            out.push('.');
        }
        out.push_str(s);
    }
    out
}

/// Turns a serde/YAML error into "key.path: what is wrong; what is expected".
fn explain_parse_error(e: &serde_saphyr::Error, path: &[String], origin: &str) -> ConfigError {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    // The plain message ends with " at line L, column C"; the location is shown separately.
    let full = e.without_snippet().to_string();
    let suffix = format!(" at line {line}, column {column}");
    let msg = full.strip_suffix(&suffix).unwrap_or(&full).to_string();

    let mut path = path.to_vec();
    let message = if let Some(field) = backticked(&msg, "unknown field `") {
        // The path ends with the unknown key itself; suggest from its section's keys.
        // List indices are dropped: `events.mappings[2]` has the keys of `events.mappings`.
        let section = join_path(
            &path[..path.len().saturating_sub(1)]
                .iter()
                .filter(|s| !s.starts_with('['))
                .cloned()
                .collect::<Vec<_>>(),
        );
        let valid = keys_under(&section);
        let mut m = format!("unknown key `{field}`");
        if let Some(best) = did_you_mean(&field, &valid) {
            m.push_str(&format!(" — did you mean `{best}`?"));
        }
        m.push_str(&format!(" (valid keys here: {})", valid.join(", ")));
        m
    } else if path.is_empty() && msg.contains("end of input") {
        format!(
            "the document is empty; expected a mapping with keys {}",
            keys_under("").join(", ")
        )
    } else if let Some(field) = backticked(&msg, "missing field `") {
        path.push(field);
        let p = join_path(&path);
        match spec(&p) {
            Some(k) => {
                let name = path.last().map(String::as_str).unwrap_or("");
                // A section's example already starts with its name.
                let example = if k.example.starts_with(&format!("{name}:")) {
                    k.example.to_string()
                } else {
                    format!("{name}: {}", k.example)
                };
                format!(
                    "missing required key; expected {}, e.g. {example}",
                    k.expects
                )
            }
            None => "missing required key".to_string(),
        }
    } else if let Some(rest) = msg.strip_prefix("duplicate mapping key: ") {
        let name = rest.split(',').next().unwrap_or(rest);
        format!("duplicate key `{name}`; each key may appear only once")
    } else {
        // Type errors: say what the key takes. Indices are dropped to find the list's spec.
        let spec_path = join_path(
            &path
                .iter()
                .filter(|s| !s.starts_with('['))
                .cloned()
                .collect::<Vec<_>>(),
        );
        match spec(&spec_path) {
            Some(k) => format!("{msg}; expected {}, e.g. {}", k.expects, k.example),
            // The document itself (a list, a scalar): say what the file must look like.
            None if path.is_empty() => format!(
                "{msg}; the file must be a mapping with keys {}",
                keys_under("").join(", ")
            ),
            None => msg.clone(),
        }
    };
    ConfigError {
        origin: origin.to_string(),
        line,
        column,
        path: join_path(&path),
        message,
    }
}

/// The text between `prefix` and the next backtick.
fn backticked(msg: &str, prefix: &str) -> Option<String> {
    let rest = msg.strip_prefix(prefix)?;
    Some(rest.split('`').next().unwrap_or(rest).to_string())
}

/// The closest valid key, if it is close enough to be a plausible typo.
fn did_you_mean<'a>(given: &str, valid: &[&'a str]) -> Option<&'a str> {
    valid
        .iter()
        .map(|v| (edit_distance(given, v), *v))
        // A key cut short or run on (`slot_nam` for `slot`) is as plausible as a typo.
        .filter(|(d, v)| *d <= 2.max(v.len() / 4) || (given.len() >= 3 && given.starts_with(v)))
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

// ---------------------------------------------------------------------------------------------
// Phase 2: validate everything, collecting all problems.

struct Validator<'a> {
    origin: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
    errors: Vec<ConfigError>,
}

/// Producer properties walbridge owns, and why.
const FORBIDDEN_PRODUCER_KEYS: &[(&str, &str)] = &[
    (
        "enable.idempotence",
        "walbridge always enables the idempotent producer (no duplicates or reordering on retry); remove this key",
    ),
    (
        "acks",
        "walbridge always uses acks=all: the replication slot only advances past durably written messages; remove this key",
    ),
    (
        "bootstrap.servers",
        "set kafka.brokers instead; remove this key",
    ),
];

impl Validator<'_> {
    fn error(&mut self, at: &Location, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            origin: self.origin.to_string(),
            line: at.line(),
            column: at.column(),
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// "expected X, got "v" — e.g. Y", from the key's spec.
    fn invalid(&mut self, at: &Location, path: &str, got: &str, reason: Option<&str>) {
        let k = spec(path);
        let expects = k.map(|k| k.expects).unwrap_or("a valid value");
        let example = k.map(|k| k.example).unwrap_or("");
        let mut m = format!("expected {expects}, got {got:?}");
        if let Some(r) = reason {
            m.push_str(&format!(" ({r})"));
        }
        if !example.is_empty() {
            m.push_str(&format!(" — e.g. {example}"));
        }
        self.error(at, path, m);
    }

    /// The string with `${VAR}` replaced; `None` (after reporting) if a variable is missing.
    fn string(&mut self, s: &S<String>, path: &str) -> Option<String> {
        let at = &s.referenced;
        let mut out = String::with_capacity(s.value.len());
        let mut rest = s.value.as_str();
        let mut ok = true;
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            if let Some(tail) = after.strip_prefix("${") {
                out.push_str("${");
                rest = tail;
            } else if let Some(body) = after.strip_prefix('{') {
                let Some(end) = body.find('}') else {
                    self.error(
                        at,
                        path,
                        "unterminated `${`: write `${NAME}` to use an environment variable, or `$${` for a literal `${`",
                    );
                    return None;
                };
                let name = &body[..end];
                if let Some(file) = name.strip_prefix("file:") {
                    match std::fs::read_to_string(file) {
                        Ok(text) => {
                            let text = text.strip_suffix('\n').unwrap_or(&text);
                            out.push_str(text.strip_suffix('\r').unwrap_or(text));
                        }
                        Err(e) => {
                            self.error(
                                at,
                                path,
                                format!("cannot read the secret file {file:?} named by `${{file:...}}`: {e}; check the path and that walbridge may read it"),
                            );
                            ok = false;
                        }
                    }
                } else if !is_env_name(name) {
                    self.error(
                        at,
                        path,
                        format!("`${{{name}}}` is not a valid environment variable reference; names match [A-Za-z_][A-Za-z0-9_]*"),
                    );
                    ok = false;
                } else if let Some(value) = (self.env)(name) {
                    out.push_str(&value);
                } else {
                    self.error(
                        at,
                        path,
                        format!("environment variable {name} is not set; export it or write the value literally"),
                    );
                    ok = false;
                }
                rest = &body[end + 1..];
            } else {
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
        ok.then_some(out)
    }

    fn int_in(
        &mut self,
        v: &Option<S<i64>>,
        path: &str,
        range: std::ops::RangeInclusive<i64>,
        default: i64,
    ) -> Option<i64> {
        match v {
            None => Some(default),
            Some(s) if range.contains(&s.value) => Some(s.value),
            Some(s) => {
                self.invalid(
                    &s.referenced,
                    path,
                    &s.value.to_string(),
                    Some("out of range"),
                );
                None
            }
        }
    }

    fn identifier(&mut self, s: &S<String>, path: &str) -> Option<String> {
        let v = self.string(s, path)?;
        match check_identifier(&v) {
            Ok(()) => Some(v),
            Err(reason) => {
                self.invalid(&s.referenced, path, &v, Some(reason));
                None
            }
        }
    }

    fn config(&mut self, raw: &RawConfig) -> Option<Config> {
        // Validate every section before combining so that all problems are reported.
        let source = self.source(&raw.source);
        let kafka = self.kafka(&raw.kafka);
        let registry = self.registry(&raw.registry);
        let metrics = match &raw.metrics {
            None => Some(None),
            Some(m) => self.metrics(&m.value).map(Some),
        };
        let log = match &raw.log {
            None => Some(LogConfig::default()),
            Some(l) => self.log(&l.value),
        };
        let telemetry = match &raw.telemetry {
            None => Some(None),
            Some(t) => self.telemetry(&t.value).map(Some),
        };
        let processors = match &raw.processors {
            None => Some(None),
            Some(p) => self.processors(&p.value).map(Some),
        };
        let (source, kafka, registry, metrics, log, telemetry, processors) = (
            source?,
            kafka?,
            registry?,
            metrics?,
            log?,
            telemetry?,
            processors?,
        );
        self.topic_lengths(&raw.source, &source, &kafka);
        if registry.on_incompatible == OnIncompatible::DeadLetter
            && kafka.dead_letter == DeadLetter::Stop
            && let Some(m) = &raw.registry.on_incompatible
        {
            self.error(
                &m.referenced,
                "registry.on_incompatible",
                "dead_letter needs the dead-letter topic, but kafka.dead_letter is stop; set kafka.dead_letter: topic, or choose stop or new_version here".to_owned(),
            );
        }
        if processors.is_some()
            && let Some(raw_routes) = &raw.kafka.partition_by
        {
            for (table, cols) in &kafka.partition_by {
                let Some(i) = transforms::input::TABLES.iter().position(|t| t == table) else {
                    continue;
                };
                let keys = transforms::input::KEYS[i];
                if transforms::input::ROWS_NOT_KEPT.contains(&table.as_str())
                    || transforms::input::ORDERED_BY_POSITION.contains(&table.as_str())
                {
                    continue;
                }
                if let Some(c) = cols.iter().find(|c| !keys.contains(&c.as_str()))
                    && let Some(at) = raw_routes.value.get(table)
                {
                    self.error(
                        &at.referenced,
                        &format!("kafka.partition_by.{table}"),
                        format!(
                            "the processors read {table}, and routing it by {c:?} (not in its primary key: {}) would move its rows between partitions, which the processors cannot follow yet; route it by primary-key columns, or leave it out",
                            keys.join(", ")
                        ),
                    );
                }
            }
        }
        if let (Some(p), Some(raw_p)) = (&processors, &raw.processors)
            && p.instances == Instances::Group
        {
            let at = raw_p
                .value
                .instances
                .as_ref()
                .map_or(&raw_p.referenced, |i| &i.referenced);
            let by_customer = [("oms.customers", "id"), ("oms.orders", "customer_id")];
            let routes = transforms::group::SKU_TABLES
                .iter()
                .map(|t| (*t, "sku", "SKU"))
                .chain(by_customer.iter().map(|(t, c)| (*t, *c, "customer")));
            for (t, col, by) in routes {
                let routed = kafka.partition_by.get(t);
                if routed.map(Vec::as_slice) != Some(&[col.to_owned()][..]) {
                    self.error(
                        at,
                        "processors.instances",
                        format!(
                            "instances share the partitions by {by}, so {t} must be routed by its {col} alone (now: {}); add {t}: [{col}] to kafka.partition_by",
                            routed.map_or("by its key".to_owned(), |c| format!("by {}", c.join(", ")))
                        ),
                    );
                }
            }
        }
        if let (Some(m), Some(e), Some(raw_m)) = (&metrics, &registry.embedded, &raw.metrics)
            && m.listen == e.listen
        {
            self.error(
                &raw_m.value.listen.referenced,
                "metrics.listen",
                format!(
                    "{} is also registry.embedded.listen; give the metrics server a port of its own, e.g. \"127.0.0.1:9187\"",
                    m.listen
                ),
            );
            return None;
        }
        let events = match &raw.events {
            None => None,
            Some(e) => Some(std::sync::Arc::new(crate::events::config::validate(
                e,
                &source.tables,
                &mut |at, path, msg| self.error(at, path, msg),
            )?)),
        };
        Some(Config {
            source,
            kafka,
            registry,
            metrics,
            log,
            events,
            telemetry,
            processors,
        })
    }

    fn telemetry(&mut self, raw: &RawTelemetry) -> Option<crate::telemetry::TelemetryConfig> {
        let path = "telemetry.otlp_endpoint";
        let text = self.string(&raw.otlp_endpoint, path)?;
        let endpoint = match url::Url::parse(&text) {
            Ok(u) if u.scheme() == "http" && u.host().is_some() => text,
            Ok(u) if u.scheme() == "https" => {
                let reason = "https is not supported by walbridge's exporter: send to a local OpenTelemetry Collector over http, which forwards over TLS";
                self.invalid(
                    &raw.otlp_endpoint.referenced,
                    path,
                    &redact_url(&u),
                    Some(reason),
                );
                return None;
            }
            Ok(u) => {
                self.invalid(&raw.otlp_endpoint.referenced, path, &redact_url(&u), None);
                return None;
            }
            Err(e) => {
                self.invalid(
                    &raw.otlp_endpoint.referenced,
                    path,
                    &text,
                    Some(&e.to_string()),
                );
                return None;
            }
        };
        let service_name = match &raw.service_name {
            None => "walbridge".to_owned(),
            Some(n) => {
                let name = self.string(n, "telemetry.service_name")?;
                if name.trim().is_empty() {
                    self.invalid(&n.referenced, "telemetry.service_name", &name, None);
                    return None;
                }
                name
            }
        };
        Some(crate::telemetry::TelemetryConfig {
            otlp_endpoint: endpoint,
            service_name,
        })
    }

    fn processors(&mut self, raw: &RawProcessors) -> Option<ProcessorsConfig> {
        let group_id = self.identifier(&raw.group_id, "processors.group_id");
        let checkpoint_dir = match &raw.checkpoint_dir {
            None => Some(PathBuf::from(".walbridge/processors")),
            Some(d) => self
                .string(d, "processors.checkpoint_dir")
                .map(PathBuf::from),
        };
        let epoch = self.int_in(
            &raw.epoch_interval_ms,
            "processors.epoch_interval_ms",
            10..=60_000,
            100,
        );
        let checkpoint = self.int_in(
            &raw.checkpoint_interval_ms,
            "processors.checkpoint_interval_ms",
            100..=3_600_000,
            1000,
        );
        let fetch_wait = self.int_in(&raw.fetch_wait_ms, "processors.fetch_wait_ms", 0..=5000, 10);
        let alerts_topic = match &raw.alerts_topic {
            None => Some(None),
            Some(t) => self.string(t, "processors.alerts_topic").map(Some),
        };
        let mut safety = transforms::SafetyStock::default();
        let mut ok = true;
        if let Some(s) = &raw.safety_stock {
            let s = &s.value;
            match self.int_in(
                &s.default,
                "processors.safety_stock.default",
                0..=i64::MAX,
                0,
            ) {
                Some(d) => safety.default = d,
                None => ok = false,
            }
            for (section, map, out) in [
                ("categories", &s.categories, &mut safety.categories),
                ("skus", &s.skus, &mut safety.skus),
            ] {
                for (k, v) in map.iter().flat_map(|m| m.value.iter()) {
                    let path = format!("processors.safety_stock.{section}.{k}");
                    match self.int_in(&Some(v.clone()), &path, 0..=i64::MAX, 0) {
                        Some(n) => {
                            out.insert(k.clone(), n);
                        }
                        None => ok = false,
                    }
                }
            }
        }
        let sql = match &raw.sql {
            None => Some(None),
            Some(q) => self.sql_endpoint(&q.value).map(Some),
        };
        let sinks = match &raw.sinks {
            None => Some(Vec::new()),
            Some(list) => self.view_sinks(list),
        };
        let metrics_listen = match &raw.metrics_listen {
            None => Some(None),
            Some(m) => self.socket_addr(m, "processors.metrics_listen").map(Some),
        };
        let (group_id, checkpoint_dir, epoch, checkpoint, alerts_topic, sql, sinks) = (
            group_id?,
            checkpoint_dir?,
            epoch?,
            checkpoint?,
            alerts_topic?,
            sql?,
            sinks?,
        );
        let metrics_listen = metrics_listen?;
        let fetch_wait = fetch_wait?;
        let instances = match &raw.instances {
            None => Instances::Single,
            Some(i) => {
                let path = "processors.instances";
                let text = self.string(i, path)?;
                match text.as_str() {
                    "single" => Instances::Single,
                    "group" => Instances::Group,
                    _ => {
                        self.invalid(&i.referenced, path, &text, None);
                        return None;
                    }
                }
            }
        };
        ok.then_some(ProcessorsConfig {
            group_id,
            checkpoint_dir,
            epoch_interval: Duration::from_millis(epoch as u64),
            checkpoint_interval: Duration::from_millis(checkpoint as u64),
            fetch_wait: Duration::from_millis(fetch_wait as u64),
            safety_stock: safety,
            alerts_topic,
            sql,
            sinks,
            metrics_listen,
            instances,
        })
    }

    fn sql_endpoint(&mut self, raw: &RawSql) -> Option<SqlEndpointConfig> {
        let listen = self.socket_addr(&raw.listen, "processors.sql.listen");
        let user = self.string(&raw.user, "processors.sql.user").and_then(|u| {
            if u.trim().is_empty() {
                self.invalid(
                    &raw.user.referenced,
                    "processors.sql.user",
                    &u,
                    Some("empty"),
                );
                None
            } else {
                Some(u)
            }
        });
        let password = self
            .string(&raw.password, "processors.sql.password")
            .and_then(|p| {
                if p.is_empty() {
                    // Never echo a secret, not even an empty one's neighbours.
                    self.error(
                        &raw.password.referenced,
                        "processors.sql.password",
                        "the password is empty; analysts connect with a password, so set one (keep it out of the file with ${VAR} or ${file:/path})",
                    );
                    None
                } else {
                    Some(p)
                }
            });
        let tls = match &raw.tls {
            None => Some(None),
            Some(t) => {
                let cert = self.string(&t.value.cert, "processors.sql.tls.cert");
                let key = self.string(&t.value.key, "processors.sql.tls.key");
                cert.zip(key).map(|(cert, key)| {
                    Some(transforms::sql::SqlTls {
                        cert: PathBuf::from(cert),
                        key: PathBuf::from(key),
                    })
                })
            }
        };
        let max = self.int_in(
            &raw.max_connections,
            "processors.sql.max_connections",
            1..=10_000,
            transforms::sql::DEFAULT_MAX_CONNECTIONS as i64,
        );
        Some(SqlEndpointConfig {
            listen: listen?,
            credentials: Credentials {
                user: user?,
                password: password?,
            },
            tls: tls?,
            max_connections: max? as usize,
        })
    }

    fn view_sinks(&mut self, list: &S<Vec<S<RawViewSink>>>) -> Option<Vec<ViewSinkConfig>> {
        let mut out = Vec::new();
        let mut ok = true;
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        for (i, raw) in list.value.iter().enumerate() {
            let at = format!("processors.sinks[{i}]");
            let r = &raw.value;
            let name = self.identifier(&r.name, "processors.sinks.name");
            if let Some(n) = &name
                && let Some(first) = names.insert(n.clone(), i)
            {
                self.error(
                    &r.name.referenced,
                    &format!("{at}.name"),
                    format!("sink name {n:?} is also used by processors.sinks[{first}]; every sink needs its own name (it keys the offsets the sink stores)"),
                );
                ok = false;
            }
            let kind = self.string(&r.kind, "processors.sinks.kind");
            // Keys that belong to another kind are mistakes, not silently ignored settings.
            let allowed: &[&str] = match kind.as_deref() {
                Some("kafka") => &["topic_prefix"],
                Some("postgres") => &["dsn", "schema"],
                Some("parquet") => &["dir"],
                Some(other) => {
                    self.invalid(&r.kind.referenced, "processors.sinks.kind", other, None);
                    ok = false;
                    continue;
                }
                None => {
                    ok = false;
                    continue;
                }
            };
            let kind = kind.unwrap_or_default();
            for (key, present) in [
                (
                    "topic_prefix",
                    r.topic_prefix.as_ref().map(|v| &v.referenced),
                ),
                ("dsn", r.dsn.as_ref().map(|v| &v.referenced)),
                ("schema", r.schema.as_ref().map(|v| &v.referenced)),
                ("dir", r.dir.as_ref().map(|v| &v.referenced)),
            ] {
                if let Some(loc) = present
                    && !allowed.contains(&key)
                {
                    self.error(
                        loc,
                        &format!("{at}.{key}"),
                        format!("`{key}` does not apply to a {kind} sink (its keys: {}); remove it or change `kind`", allowed.join(", ")),
                    );
                    ok = false;
                }
            }
            let sink = match kind.as_str() {
                "kafka" => {
                    let prefix = match &r.topic_prefix {
                        None => Some(None),
                        Some(p) => self.string(p, "processors.sinks.topic_prefix").map(Some),
                    };
                    name.zip(prefix)
                        .map(|(name, topic_prefix)| ViewSinkConfig::Kafka { name, topic_prefix })
                }
                "postgres" => {
                    let dsn = match &r.dsn {
                        None => {
                            self.error(
                                &raw.referenced,
                                &format!("{at}.dsn"),
                                "a postgres sink needs `dsn`, the database its tables go to — e.g. dsn: \"host=127.0.0.1 port=5432 user=app dbname=analytics\"",
                            );
                            None
                        }
                        Some(d) => {
                            let path = format!("{at}.dsn");
                            self.string(d, &path)
                                .and_then(|text| match Dsn::parse(&text) {
                                    Ok(dsn) => Some(dsn),
                                    Err(reason) => {
                                        let shown = redact_dsn(&text);
                                        self.invalid(&d.referenced, &path, &shown, Some(&reason));
                                        None
                                    }
                                })
                        }
                    };
                    let schema = match &r.schema {
                        None => Some("walbridge_views".to_owned()),
                        Some(s) => self.identifier(s, "processors.sinks.schema"),
                    };
                    match (name, dsn, schema) {
                        (Some(name), Some(dsn), Some(schema)) => {
                            Some(ViewSinkConfig::Postgres { name, dsn, schema })
                        }
                        _ => None,
                    }
                }
                _ => {
                    let dir = match &r.dir {
                        None => {
                            self.error(
                                &raw.referenced,
                                &format!("{at}.dir"),
                                "a parquet sink needs `dir`, where its files go — e.g. dir: .walbridge/lake",
                            );
                            None
                        }
                        Some(d) => self.string(d, "processors.sinks.dir").and_then(|t| {
                            if t.trim().is_empty() {
                                self.invalid(
                                    &d.referenced,
                                    "processors.sinks.dir",
                                    &t,
                                    Some("empty"),
                                );
                                None
                            } else {
                                Some(PathBuf::from(t))
                            }
                        }),
                    };
                    name.zip(dir)
                        .map(|(name, dir)| ViewSinkConfig::Parquet { name, dir })
                }
            };
            match sink {
                Some(s) => out.push(s),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn metrics(&mut self, raw: &RawMetrics) -> Option<MetricsConfig> {
        let listen = self.socket_addr(&raw.listen, "metrics.listen")?;
        Some(MetricsConfig { listen })
    }

    /// A `host:port` listen address; reported against `path` when it does not parse.
    fn socket_addr(&mut self, s: &S<String>, path: &str) -> Option<SocketAddr> {
        let text = self.string(s, path)?;
        match text.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.invalid(&s.referenced, path, &text, None);
                None
            }
        }
    }

    fn log(&mut self, raw: &RawLog) -> Option<LogConfig> {
        let Some(f) = &raw.format else {
            return Some(LogConfig::default());
        };
        let path = "log.format";
        let text = self.string(f, path)?;
        let format = match text.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => {
                self.invalid(&f.referenced, path, &text, None);
                return None;
            }
        };
        Some(LogConfig { format })
    }

    fn source(&mut self, raw: &RawSource) -> Option<SourceConfig> {
        let dsn = self.dsn(&raw.dsn);
        let publication = self.identifier(&raw.publication, "source.publication");
        let slot = self.identifier(&raw.slot, "source.slot");
        let tables = self.tables(&raw.tables);
        let status = self.int_in(
            &raw.status_interval_ms,
            "source.status_interval_ms",
            100..=60_000,
            1000,
        );
        let heartbeat = self.int_in(
            &raw.heartbeat_interval_ms,
            "source.heartbeat_interval_ms",
            100..=3_600_000,
            10_000,
        );
        let state_dir = match &raw.state_dir {
            None => Some(PathBuf::from(".walbridge/state")),
            Some(d) => self.string(d, "source.state_dir").and_then(|text| {
                if text.trim().is_empty() {
                    self.invalid(&d.referenced, "source.state_dir", &text, Some("empty"));
                    None
                } else {
                    Some(PathBuf::from(text))
                }
            }),
        };
        let snapshot = match &raw.snapshot {
            None => Some(SnapshotMode::Initial),
            Some(m) => self
                .string(m, "source.snapshot")
                .and_then(|text| match text.as_str() {
                    "initial" => Some(SnapshotMode::Initial),
                    "never" => Some(SnapshotMode::Never),
                    "when_needed" => Some(SnapshotMode::WhenNeeded),
                    "initial_only" => Some(SnapshotMode::InitialOnly),
                    _ => {
                        self.invalid(&m.referenced, "source.snapshot", &text, None);
                        None
                    }
                }),
        };
        let workers = self.int_in(&raw.snapshot_workers, "source.snapshot_workers", 1..=64, 4);
        let chunk_mb = self.int_in(
            &raw.snapshot_chunk_mb,
            "source.snapshot_chunk_mb",
            1..=65_536,
            16,
        );
        let shutdown = self.int_in(
            &raw.shutdown_timeout_ms,
            "source.shutdown_timeout_ms",
            1000..=3_600_000,
            30_000,
        );
        Some(SourceConfig {
            snapshot: snapshot?,
            snapshot_workers: workers?.unsigned_abs() as usize,
            snapshot_chunk_bytes: chunk_mb?.unsigned_abs() << 20,
            state_dir: state_dir?,
            dsn: dsn?,
            publication: publication?,
            slot: slot?,
            tables: tables?,
            status_interval: Duration::from_millis(status?.unsigned_abs()),
            heartbeat_interval: Duration::from_millis(heartbeat?.unsigned_abs()),
            shutdown_timeout: Duration::from_millis(shutdown?.unsigned_abs()),
        })
    }

    fn dsn(&mut self, s: &S<String>) -> Option<Dsn> {
        let path = "source.dsn";
        let text = self.string(s, path)?;
        match Dsn::parse(&text) {
            Ok(dsn) => Some(dsn),
            Err(reason) => {
                let shown = redact_dsn(&text);
                self.invalid(&s.referenced, path, &shown, Some(&reason));
                None
            }
        }
    }

    fn tables(&mut self, raw: &S<Vec<S<String>>>) -> Option<Vec<TableSelector>> {
        let path = "source.tables";
        if raw.value.is_empty() {
            self.error(
                &raw.referenced,
                path,
                "no tables listed; list at least one \"schema.table\" or \"schema.*\" — e.g. [oms.orders, wms.*]",
            );
            return None;
        }
        let mut ok = true;
        let mut seen: HashMap<TableSelector, u64> = HashMap::new();
        let mut out = Vec::new();
        for (i, entry) in raw.value.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let Some(text) = self.string(entry, &p) else {
                ok = false;
                continue;
            };
            match parse_table(&text) {
                Ok(sel) => {
                    if let Some(line) = seen.get(&sel) {
                        self.error(
                            &entry.referenced,
                            &p,
                            format!("`{sel}` is listed twice (first on line {line}); remove one"),
                        );
                        ok = false;
                    } else {
                        seen.insert(sel.clone(), entry.referenced.line());
                        out.push((sel, entry));
                    }
                }
                Err(reason) => {
                    let m = format!(
                        "expected \"schema.table\" or \"schema.*\", got {text:?} ({reason}) — e.g. oms.orders"
                    );
                    self.error(&entry.referenced, &p, m);
                    ok = false;
                }
            }
        }
        // A table also covered by its schema's wildcard is a duplicate in disguise.
        for (i, (sel, entry)) in out.iter().enumerate() {
            if let TableSelector::Table { schema, .. } = sel {
                let wildcard = TableSelector::AllInSchema {
                    schema: schema.clone(),
                };
                if let Some(line) = seen.get(&wildcard) {
                    self.error(
                        &entry.referenced,
                        &format!("{path}[{i}]"),
                        format!(
                            "`{sel}` is already covered by `{wildcard}` (line {line}); remove one"
                        ),
                    );
                    ok = false;
                }
            }
        }
        ok.then(|| out.into_iter().map(|(sel, _)| sel).collect())
    }

    fn kafka(&mut self, raw: &RawKafka) -> Option<KafkaConfig> {
        let brokers =
            self.string(&raw.brokers, "kafka.brokers").and_then(|text| {
                match parse_brokers(&text) {
                    Ok(brokers) => Some(brokers),
                    Err(reason) => {
                        self.invalid(
                            &raw.brokers.referenced,
                            "kafka.brokers",
                            &text,
                            Some(reason),
                        );
                        None
                    }
                }
            });
        let prefix = self
            .string(&raw.topic_prefix, "kafka.topic_prefix")
            .and_then(|text| match check_topic_part(&text) {
                Ok(()) => Some(text),
                Err(reason) => {
                    self.invalid(
                        &raw.topic_prefix.referenced,
                        "kafka.topic_prefix",
                        &text,
                        Some(reason),
                    );
                    None
                }
            });
        let partitions = self.int_in(&raw.partitions, "kafka.partitions", 1..=10_000, 3);
        let replication = self.int_in(
            &raw.replication_factor,
            "kafka.replication_factor",
            1..=32_767,
            1,
        );
        let max_in_flight = self.int_in(
            &raw.max_in_flight_bytes,
            "kafka.max_in_flight_bytes",
            1 << 20..=64 << 30,
            64 << 20,
        );
        let connections = self.int_in(&raw.connections, "kafka.connections", 1..=64, 1);
        let partition_by = self.partition_by(&raw.partition_by);
        let producer = self.producer(&raw.producer);
        let dead_letter = match &raw.dead_letter {
            None => Some(DeadLetter::Topic),
            Some(m) => self
                .string(m, "kafka.dead_letter")
                .and_then(|text| match text.as_str() {
                    "topic" => Some(DeadLetter::Topic),
                    "stop" => Some(DeadLetter::Stop),
                    _ => {
                        self.invalid(&m.referenced, "kafka.dead_letter", &text, None);
                        None
                    }
                }),
        };
        Some(KafkaConfig {
            brokers: brokers?,
            topic_prefix: prefix?,
            partitions: i32::try_from(partitions?).ok()?,
            replication_factor: i16::try_from(replication?).ok()?,
            producer: producer?,
            max_in_flight_bytes: max_in_flight?.unsigned_abs(),
            connections: usize::try_from(connections?).ok()?,
            partition_by: partition_by?,
            dead_letter: dead_letter?,
        })
    }

    fn partition_by(
        &mut self,
        raw: &Option<S<RawPartitionBy>>,
    ) -> Option<BTreeMap<String, Vec<String>>> {
        let Some(raw) = raw else {
            return Some(BTreeMap::new());
        };
        let mut ok = true;
        let mut out = BTreeMap::new();
        for (table, cols) in &raw.value {
            let path = format!("kafka.partition_by.{table}");
            match parse_table(table) {
                Ok(TableSelector::Table { .. }) => {}
                Ok(TableSelector::AllInSchema { .. }) | Err(_) => {
                    self.error(
                        &cols.referenced,
                        &path,
                        format!(
                            "expected one table \"schema.table\", got {table:?} — e.g. wms.stock_levels: [sku]"
                        ),
                    );
                    ok = false;
                    continue;
                }
            }
            if cols.value.is_empty() {
                self.error(
                    &cols.referenced,
                    &path,
                    "no columns listed; list the primary-key columns to route by, e.g. [sku]",
                );
                ok = false;
                continue;
            }
            let mut names: Vec<String> = Vec::new();
            for (i, c) in cols.value.iter().enumerate() {
                let p = format!("{path}[{i}]");
                match self.string(c, &p) {
                    Some(name) if names.contains(&name) => {
                        self.error(
                            &c.referenced,
                            &p,
                            format!("column {name:?} is listed twice"),
                        );
                        ok = false;
                    }
                    Some(name) if name.is_empty() => {
                        self.error(&c.referenced, &p, "empty column name");
                        ok = false;
                    }
                    Some(name) => names.push(name),
                    None => ok = false,
                }
            }
            out.insert(table.clone(), names);
        }
        ok.then_some(out)
    }

    fn producer(
        &mut self,
        raw: &Option<S<BTreeMap<String, S<String>>>>,
    ) -> Option<BTreeMap<String, String>> {
        let Some(raw) = raw else {
            return Some(BTreeMap::new());
        };
        let mut ok = true;
        let mut out = BTreeMap::new();
        for (k, v) in &raw.value {
            let path = format!("kafka.producer.{k}");
            if let Some((_, why)) = FORBIDDEN_PRODUCER_KEYS.iter().find(|(f, _)| f == k) {
                self.error(&v.referenced, &path, *why);
                ok = false;
                continue;
            }
            match self.string(v, &path) {
                Some(value) => {
                    out.insert(k.clone(), value);
                }
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn registry(&mut self, raw: &RawRegistry) -> Option<RegistryConfig> {
        let path = "registry.url";
        let url = self.string(&raw.url, path).and_then(|text| {
            // Never echo a URL that may carry credentials.
            let shown = if text.contains('@') {
                "<url with credentials, hidden>".to_string()
            } else {
                text.clone()
            };
            match url::Url::parse(&text) {
                Ok(u) if !matches!(u.scheme(), "http" | "https") => {
                    self.invalid(
                        &raw.url.referenced,
                        path,
                        &shown,
                        Some("scheme must be http or https"),
                    );
                    None
                }
                Ok(u) if u.host().is_none() => {
                    self.invalid(&raw.url.referenced, path, &shown, Some("no host"));
                    None
                }
                Ok(u) => Some(u),
                Err(e) => {
                    let reason = e.to_string();
                    self.invalid(&raw.url.referenced, path, &shown, Some(&reason));
                    None
                }
            }
        });
        let embedded = match &raw.embedded {
            None => Some(None),
            Some(e) => self.embedded(&e.value).map(Some),
        };
        let on_incompatible = match &raw.on_incompatible {
            None => Some(OnIncompatible::Stop),
            Some(m) => {
                self.string(m, "registry.on_incompatible")
                    .and_then(|text| match text.as_str() {
                        "stop" => Some(OnIncompatible::Stop),
                        "new_version" => Some(OnIncompatible::NewVersion),
                        "dead_letter" => Some(OnIncompatible::DeadLetter),
                        _ => {
                            self.invalid(&m.referenced, "registry.on_incompatible", &text, None);
                            None
                        }
                    })
            }
        };
        let (url, embedded, on_incompatible) = (url?, embedded?, on_incompatible?);
        if let Some(e) = &embedded
            && e.write_auth.is_some()
            && url.username().is_empty()
        {
            self.error(
                &raw.url.referenced,
                path,
                "registry.embedded.write_auth is set, so walbridge must send credentials: put them in the URL, e.g. \"http://walbridge:${REGISTRY_PASSWORD}@127.0.0.1:8081\"",
            );
            return None;
        }
        if let Some(e) = &embedded {
            // The pipeline talks to `url`; an embedded server elsewhere would sit unused.
            if url.port_or_known_default() != Some(e.listen.port()) {
                self.error(
                    &raw.url.referenced,
                    path,
                    format!(
                        "registry.embedded listens on port {} but registry.url points at port {}; make them match, e.g. url: \"http://127.0.0.1:{}\"",
                        e.listen.port(),
                        url.port_or_known_default().unwrap_or(0),
                        e.listen.port()
                    ),
                );
                return None;
            }
        }
        Some(RegistryConfig {
            url,
            embedded,
            on_incompatible,
        })
    }

    fn embedded(&mut self, raw: &RawEmbedded) -> Option<EmbeddedRegistry> {
        let listen = self.socket_addr(&raw.listen, "registry.embedded.listen");
        let dpath = "registry.embedded.data_dir";
        let data_dir = self.string(&raw.data_dir, dpath).and_then(|text| {
            if text.trim().is_empty() {
                self.invalid(&raw.data_dir.referenced, dpath, &text, Some("empty"));
                None
            } else {
                Some(PathBuf::from(text))
            }
        });
        let write_auth = match &raw.write_auth {
            None => Some(None),
            Some(w) => self
                .string(w, "registry.embedded.write_auth")
                .and_then(|text| match text.split_once(':') {
                    Some((user, password)) if !user.is_empty() && !password.is_empty() => {
                        Some(Some(Credentials {
                            user: user.to_owned(),
                            password: password.to_owned(),
                        }))
                    }
                    // The value holds a secret: say what is wrong without echoing it.
                    _ => {
                        self.error(
                            &w.referenced,
                            "registry.embedded.write_auth",
                            "expected \"user:password\" with both parts non-empty; keep the password out of the file with ${VAR} or ${file:/path}",
                        );
                        None
                    }
                }),
        };
        Some(EmbeddedRegistry {
            listen: listen?,
            data_dir: data_dir?,
            write_auth: write_auth?,
        })
    }

    /// Kafka topic names are at most 249 bytes: `<prefix>.<schema>.<table>` must fit.
    fn topic_lengths(&mut self, raw: &RawSource, source: &SourceConfig, kafka: &KafkaConfig) {
        for (i, sel) in source.tables.iter().enumerate() {
            if let TableSelector::Table { schema, table } = sel {
                let topic = kafka.topic_for(schema, table);
                if topic.len() > 249
                    && let Some(entry) = raw.tables.value.get(i)
                {
                    self.error(
                        &entry.referenced,
                        &format!("source.tables[{i}]"),
                        format!(
                            "topic name `{topic}` is {} bytes; Kafka allows 249 — shorten kafka.topic_prefix",
                            topic.len()
                        ),
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Value rules.

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Lower-case unquoted Postgres identifiers; these also make valid topic-name parts.
fn check_identifier(s: &str) -> Result<(), &'static str> {
    let mut chars = s.chars();
    match chars.next() {
        None => return Err("empty"),
        Some(c) if c.is_ascii_lowercase() || c == '_' => {}
        Some(_) => return Err("must start with a lower-case letter or _"),
    }
    if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
        return Err("only lower-case letters, digits and _ are allowed");
    }
    if s.len() > 63 {
        return Err("longer than 63 bytes");
    }
    Ok(())
}

fn parse_table(s: &str) -> Result<TableSelector, &'static str> {
    let Some((schema, table)) = s.split_once('.') else {
        return Err("no schema: write schema.table");
    };
    check_identifier(schema).map_err(|_| "the schema is not an identifier [a-z_][a-z0-9_]*")?;
    if table == "*" {
        return Ok(TableSelector::AllInSchema {
            schema: schema.to_string(),
        });
    }
    check_identifier(table).map_err(|_| "the table is not an identifier [a-z_][a-z0-9_]* or *")?;
    Ok(TableSelector::Table {
        schema: schema.to_string(),
        table: table.to_string(),
    })
}

fn parse_brokers(s: &str) -> Result<Vec<String>, &'static str> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err("empty entry");
        }
        let Some((host, port)) = part.rsplit_once(':') else {
            return Err("no port");
        };
        let host_ok = if let Some(inner) = host.strip_prefix('[') {
            inner
                .strip_suffix(']')
                .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
        } else {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        };
        if !host_ok {
            return Err("bad host");
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err("port must be 1..=65535"),
        }
        out.push(part.to_string());
    }
    Ok(out)
}

fn check_topic_part(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("empty");
    }
    if s == "." || s == ".." {
        return Err("Kafka forbids . and .. as names");
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err("only [a-zA-Z0-9._-] are allowed");
    }
    if s.len() > 200 {
        return Err("longer than 200 bytes");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Redaction.

/// Whether a DSN text names a password (libpq `password=` or URL `user:pass@`).
fn has_password(text: &str) -> bool {
    redact_dsn(text) != text
}

/// The DSN with passwords replaced by `***`. Unparseable key=value text is hidden entirely.
fn redact_dsn(text: &str) -> String {
    let t = text.trim();
    if let Some(rest) = t
        .strip_prefix("postgres://")
        .or_else(|| t.strip_prefix("postgresql://"))
    {
        let scheme = &t[..t.len() - rest.len()];
        let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(auth_end);
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***@{hosts}"),
                None => format!("{userinfo}@{hosts}"),
            },
            None => authority.to_string(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let q: Vec<String> = query
                    .split('&')
                    .map(|kv| match kv.split_once('=') {
                        Some(("password", _)) => "password=***".to_string(),
                        _ => kv.to_string(),
                    })
                    .collect();
                format!("{path}?{}", q.join("&"))
            }
            None => tail.to_string(),
        };
        return format!("{scheme}{authority}{tail}");
    }
    match split_key_values(t) {
        Some(pairs) => pairs
            .iter()
            .map(|(k, v)| {
                if *k == "password" {
                    format!("{k}=***")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        None => "<unparseable connection string, hidden>".to_string(),
    }
}

/// libpq `key = value` pairs as written (quoted values keep their quotes).
fn split_key_values(s: &str) -> Option<Vec<(&str, &str)>> {
    let mut out = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        let key_end = rest.find(|c: char| c == '=' || c.is_whitespace())?;
        let key = &rest[..key_end];
        rest = rest[key_end..].trim_start().strip_prefix('=')?.trim_start();
        let value_end = if rest.starts_with('\'') {
            let mut escaped = false;
            let mut end = None;
            for (i, c) in rest.char_indices().skip(1) {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '\'' => {
                        end = Some(i + 1);
                        break;
                    }
                    _ => {}
                }
            }
            end?
        } else {
            rest.find(char::is_whitespace).unwrap_or(rest.len())
        };
        out.push((key, &rest[..value_end]));
        rest = rest[value_end..].trim_start();
    }
    Some(out)
}

fn redact_url(u: &url::Url) -> String {
    let mut u = u.clone();
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"source:
  dsn: "host=127.0.0.1 port=5432 user=postgres dbname=legacy"
  publication: walbridge
  slot: walbridge
  tables: [oms.orders, oms.order_lines, wms.stock_levels]
  status_interval_ms: 1000
  heartbeat_interval_ms: 10000
kafka:
  brokers: "127.0.0.1:9092"
  topic_prefix: legacy
  partitions: 3
  replication_factor: 1
  producer: {}
  max_in_flight_bytes: 67108864
registry:
  url: "http://127.0.0.1:8081"
  embedded:
    listen: "127.0.0.1:8081"
    data_dir: ".walbridge/registry"
"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn errors_of(src: &str) -> ConfigErrors {
        match from_str_with_env(src, "pipelines.yaml", &no_env) {
            Ok(c) => panic!("expected errors, got {c:?}"),
            Err(e) => e,
        }
    }

    /// Replaces the first occurrence of `from` in the valid example.
    fn with(from: &str, to: &str) -> String {
        assert!(VALID.contains(from), "test bug: {from:?} not in VALID");
        VALID.replacen(from, to, 1)
    }

    /// Asserts exactly one error, on `line`, naming `path`, whose text contains `needle`.
    fn one_error(src: &str, line: u64, path: &str, needle: &str) -> ConfigError {
        let errs = errors_of(src);
        assert_eq!(errs.errors.len(), 1, "{errs}");
        let e = errs.errors[0].clone();
        assert_eq!(e.line, line, "{e}");
        assert_eq!(e.path, path, "{e}");
        assert!(e.message.contains(needle), "{e}");
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("pipelines.yaml:{line}:")),
            "{shown}"
        );
        e
    }

    #[test]
    fn snapshot_and_registry_policies_parse_and_bad_values_say_the_choices() {
        let c = from_str_with_env(VALID, "pipelines.yaml", &no_env).unwrap();
        assert_eq!(c.source.snapshot, SnapshotMode::Initial);
        assert_eq!(c.source.snapshot_workers, 4);
        assert_eq!(c.source.snapshot_chunk_bytes, 16 << 20);
        assert_eq!(c.registry.on_incompatible, OnIncompatible::Stop);
        let src = with(
            "  heartbeat_interval_ms: 10000\n",
            "  heartbeat_interval_ms: 10000\n  snapshot: when_needed\n  snapshot_workers: 8\n  snapshot_chunk_mb: 64\n",
        )
        .replace(
            "registry:\n",
            "registry:\n  on_incompatible: new_version\n",
        );
        let c = from_str_with_env(&src, "pipelines.yaml", &no_env).unwrap();
        assert_eq!(c.source.snapshot, SnapshotMode::WhenNeeded);
        assert_eq!(c.source.snapshot_workers, 8);
        assert_eq!(c.source.snapshot_chunk_bytes, 64 << 20);
        assert_eq!(c.registry.on_incompatible, OnIncompatible::NewVersion);

        let e = one_error(
            &with(
                "  heartbeat_interval_ms: 10000\n",
                "  heartbeat_interval_ms: 10000\n  snapshot: sometimes\n",
            ),
            8,
            "source.snapshot",
            "initial_only",
        );
        assert!(e.message.contains("when_needed"), "{e}");
        one_error(
            &with(
                "  heartbeat_interval_ms: 10000\n",
                "  heartbeat_interval_ms: 10000\n  snapshot_workers: 0\n",
            ),
            8,
            "source.snapshot_workers",
            "1..=64",
        );
        let src = VALID.replace("registry:\n", "registry:\n  on_incompatible: ignore\n");
        one_error(&src, 16, "registry.on_incompatible", "new_version");
        // dead_letter needs somewhere to send the letters.
        let src = VALID
            .replace("registry:\n", "registry:\n  on_incompatible: dead_letter\n")
            .replace("kafka:\n", "kafka:\n  dead_letter: stop\n");
        let errs = errors_of(&src);
        assert!(
            errs.errors
                .iter()
                .any(|e| e.path == "registry.on_incompatible"
                    && e.message.contains("kafka.dead_letter is stop")),
            "{errs}"
        );
    }

    #[test]
    fn dead_letter_defaults_to_the_topic_and_a_bad_value_says_the_choices() {
        let c = from_str_with_env(VALID, "pipelines.yaml", &no_env).unwrap();
        assert_eq!(c.kafka.dead_letter, DeadLetter::Topic);
        assert_eq!(c.kafka.dead_letter_topic(), "legacy.dlq");
        let stop = with(
            "  max_in_flight_bytes: 67108864\n",
            "  max_in_flight_bytes: 67108864\n  dead_letter: stop\n",
        );
        let c = from_str_with_env(&stop, "pipelines.yaml", &no_env).unwrap();
        assert_eq!(c.kafka.dead_letter, DeadLetter::Stop);
        let e = one_error(
            &with(
                "  max_in_flight_bytes: 67108864\n",
                "  max_in_flight_bytes: 67108864\n  dead_letter: drop\n",
            ),
            15,
            "kafka.dead_letter",
            "topic or stop",
        );
        assert!(e.message.contains("\"drop\""), "{e}");
    }

    #[test]
    fn kafka_connections_default_to_one_and_out_of_range_says_the_range() {
        let c = from_str_with_env(VALID, "pipelines.yaml", &no_env).unwrap();
        assert_eq!(c.kafka.connections, 1);
        let two = with(
            "  max_in_flight_bytes: 67108864\n",
            "  max_in_flight_bytes: 67108864\n  connections: 2\n",
        );
        let c = from_str_with_env(&two, "pipelines.yaml", &no_env).unwrap();
        assert_eq!(c.kafka.connections, 2);
        one_error(
            &with(
                "  max_in_flight_bytes: 67108864\n",
                "  max_in_flight_bytes: 67108864\n  connections: 0\n",
            ),
            15,
            "kafka.connections",
            "1..=64",
        );
    }

    #[test]
    fn partition_by_takes_tables_and_column_lists_and_refuses_the_rest() {
        let routed = |entries: &str| {
            with(
                "  max_in_flight_bytes: 67108864\n",
                &format!("  max_in_flight_bytes: 67108864\n  partition_by:\n{entries}"),
            )
        };
        let c = from_str_with_env(
            &routed("    wms.stock_levels: [sku]\n    oms.order_lines: [order_id, line_no]\n"),
            "pipelines.yaml",
            &no_env,
        )
        .unwrap();
        assert_eq!(c.kafka.partition_by["wms.stock_levels"], ["sku"]);
        assert_eq!(
            c.kafka.partition_by["oms.order_lines"],
            ["order_id", "line_no"]
        );
        for (entries, needle) in [
            ("    oms.*: [sku]\n", "expected one table \"schema.table\""),
            ("    stock_levels: [sku]\n", "expected one table"),
            ("    wms.stock_levels: []\n", "no columns listed"),
            (
                "    wms.stock_levels: [sku, sku]\n",
                "\"sku\" is listed twice",
            ),
        ] {
            let errs = errors_of(&routed(entries));
            assert_eq!(errs.errors.len(), 1, "{entries}: {errs}");
            let e = &errs.errors[0];
            assert!(e.path.starts_with("kafka.partition_by."), "{entries}: {e}");
            assert!(e.message.contains(needle), "{entries}: {e}");
        }
    }

    #[test]
    fn routing_a_processor_input_by_a_non_key_column_is_refused() {
        let demo = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines.yaml"),
        )
        .unwrap();
        assert!(
            demo.contains("    oms.products: [sku]\n"),
            "the demo routes products"
        );
        from_str_with_env(&demo, "pipelines.yaml", &no_env).expect("the demo's config is valid");
        // Orders are put back in source order by the fold, so they may move; returns may not.
        let routed = demo.replace(
            "    oms.products: [sku]\n",
            "    oms.products: [sku]\n    oms.orders: [customer_id]\n    oms.payments: [order_id]\n    oms.returns: [order_id]\n",
        );
        let errs = errors_of(&routed);
        assert_eq!(errs.errors.len(), 1, "{errs}");
        let e = &errs.errors[0];
        assert_eq!(e.path, "kafka.partition_by.oms.returns", "{e}");
        assert!(
            e.message.contains("the processors read oms.returns")
                && e.message
                    .contains("\"order_id\" (not in its primary key: id)"),
            "{e}"
        );
    }

    #[test]
    fn the_processors_fetch_wait_defaults_to_10_ms_and_is_bounded() {
        let demo = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines.yaml"),
        )
        .unwrap();
        let fetch_wait = |src: &str| {
            let c =
                from_str_with_env(src, "pipelines.yaml", &no_env).unwrap_or_else(|e| panic!("{e}"));
            c.processor_config().unwrap().fetch_wait
        };
        assert_eq!(
            fetch_wait(&demo),
            Duration::from_millis(2),
            "the demo's, for tansu"
        );
        let line = "  fetch_wait_ms: 2\n";
        assert!(demo.contains(line));
        assert_eq!(
            fetch_wait(&demo.replace(line, "")),
            Duration::from_millis(10)
        );
        let errs = errors_of(&demo.replace(line, "  fetch_wait_ms: 60000\n"));
        assert_eq!(errs.errors.len(), 1, "{errs}");
        assert_eq!(errs.errors[0].path, "processors.fetch_wait_ms");
        assert!(errs.errors[0].message.contains("0..=5000"), "{errs}");
    }

    #[test]
    fn instances_that_share_partitions_need_the_sku_and_customer_routing() {
        let demo = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines.yaml"),
        )
        .unwrap();
        let group = demo.replace(
            "  group_id: walbridge_views\n",
            "  group_id: walbridge_views\n  instances: group\n",
        );
        assert_ne!(group, demo);
        // The demo routes three of the four SKU tables: refused until it routes the fourth.
        let routed = group.replace(
            "    oms.inventory_cache: [sku]\n",
            "    oms.inventory_cache: [sku]\n    oms.order_lines: [sku]\n    oms.customers: [id]\n    oms.orders: [customer_id]\n",
        );
        // And the customer side shards by customer: orders with their customer.
        let errs = errors_of(&routed.replace("    oms.orders: [customer_id]\n", ""));
        assert_eq!(errs.errors.len(), 1, "{errs}");
        assert!(
            errs.errors[0].message.contains(
                "instances share the partitions by customer, so oms.orders must be routed by its customer_id alone (now: by its key); add oms.orders: [customer_id] to kafka.partition_by"
            ),
            "{errs}"
        );
        let errs = errors_of(&routed.replace("    oms.order_lines: [sku]\n", ""));
        assert_eq!(errs.errors.len(), 1, "{errs}");
        assert_eq!(errs.errors[0].path, "processors.instances");
        assert!(
            errs.errors[0].message.contains(
                "oms.order_lines must be routed by its sku alone (now: by its key); add oms.order_lines: [sku] to kafka.partition_by"
            ),
            "{errs}"
        );
        let c =
            from_str_with_env(&routed, "pipelines.yaml", &no_env).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.processors.unwrap().instances, Instances::Group);
        // Order lines may be routed by their SKU in one-instance mode too: the fold keeps no
        // line rows.
        from_str_with_env(
            &demo.replace(
                "    oms.inventory_cache: [sku]\n",
                "    oms.inventory_cache: [sku]\n    oms.order_lines: [sku]\n",
            ),
            "pipelines.yaml",
            &no_env,
        )
        .expect("order lines routed by sku");
        let errs = errors_of(&demo.replace(
            "  group_id: walbridge_views\n",
            "  group_id: walbridge_views\n  instances: many\n",
        ));
        assert!(
            errs.to_string()
                .contains("processors.instances: expected single or group, got \"many\""),
            "{errs}"
        );
    }

    #[test]
    fn valid_example_parses_with_defaults_applied() {
        let c = from_str_with_env(VALID, "pipelines.yaml", &no_env).unwrap();
        assert_eq!(c.source.publication, "walbridge");
        assert_eq!(c.source.tables.len(), 3);
        assert_eq!(
            c.source.tables[2],
            TableSelector::Table {
                schema: "wms".into(),
                table: "stock_levels".into()
            }
        );
        assert_eq!(c.source.status_interval, Duration::from_millis(1000));
        assert_eq!(c.source.pg_config().get_dbname(), Some("legacy"));
        assert_eq!(c.kafka.bootstrap_servers(), "127.0.0.1:9092");
        assert_eq!(c.kafka.topic_for("oms", "orders"), "legacy.oms.orders");
        assert_eq!(c.kafka.max_in_flight_bytes, 64 << 20);
        assert_eq!(
            c.registry.embedded.unwrap().listen,
            "127.0.0.1:8081".parse().unwrap()
        );

        let minimal = "source:\n  dsn: host=h user=u\n  publication: p\n  slot: s\n  tables: [a.*]\nkafka:\n  brokers: h:1\n  topic_prefix: t\nregistry:\n  url: https://r.example\n";
        let c = from_str_with_env(minimal, "m.yaml", &no_env).unwrap();
        assert_eq!(c.source.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(c.kafka.partitions, 3);
        assert_eq!(c.kafka.replication_factor, 1);
        assert!(c.registry.embedded.is_none());
        assert!(c.source.tables[0].matches("a", "anything"));
    }

    #[test]
    fn repo_pipelines_yaml_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines.yaml");
        let c = load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.source.pg_config().get_ports(), &[54329]);
        assert_eq!(c.kafka.bootstrap_servers(), "127.0.0.1:19092");
    }

    #[test]
    fn invalid_yaml_syntax_points_at_the_line() {
        let src = with("tables: [oms.orders,", "tables: [oms.orders, {");
        let errs = errors_of(&src);
        assert_eq!(errs.errors.len(), 1, "{errs}");
        assert!(errs.errors[0].line >= 5, "{errs}");
        assert!(errs.to_string().starts_with("pipelines.yaml:"), "{errs}");

        let errs = errors_of("");
        assert!(
            errs.to_string().contains(
                "the document is empty; expected a mapping with keys source, kafka, registry, metrics, log, events, telemetry, processors"
            ),
            "{errs}"
        );
    }

    #[test]
    fn unknown_key_suggests_the_right_one() {
        let e = one_error(
            &with("  slot: walbridge", "  slto: walbridge"),
            4,
            "source.slto",
            "did you mean `slot`?",
        );
        assert!(
            e.message.contains("(valid keys here: dsn, publication"),
            "{e}"
        );
    }

    #[test]
    fn a_key_with_extra_letters_suggests_the_key_it_starts_with() {
        one_error(
            &with("  slot: walbridge", "  slot_nam: walbridge"),
            4,
            "source.slot_nam",
            "did you mean `slot`?",
        );
    }

    #[test]
    fn a_document_that_is_not_a_mapping_says_which_keys_it_needs() {
        let errs = errors_of("- source\n- kafka\n");
        assert!(
            errs.to_string()
                .contains("the file must be a mapping with keys source, kafka, registry"),
            "{errs}"
        );
    }

    #[test]
    fn a_missing_section_shows_its_example_once() {
        let src = VALID.split("registry:").next().unwrap();
        let e = errors_of(src).to_string();
        assert!(e.contains("registry: missing required key"), "{e}");
        assert!(e.contains("e.g. registry: { url: ... }"), "{e}");
        assert!(!e.contains("registry: registry:"), "{e}");
    }

    #[test]
    fn wrong_type_says_what_the_key_takes() {
        one_error(
            &with("partitions: 3", "partitions: three"),
            11,
            "kafka.partitions",
            "expected an integer in 1..=10000",
        );
    }

    #[test]
    fn missing_required_key_is_named_with_an_example() {
        let src = with("  slot: walbridge\n", "");
        // Serde notices a missing key when its mapping ends: the last line of `source`.
        let e = one_error(&src, 6, "source.slot", "missing required key");
        assert!(e.message.contains("e.g. slot: walbridge"), "{e}");
    }

    #[test]
    fn empty_tables_is_rejected() {
        one_error(
            &with("[oms.orders, oms.order_lines, wms.stock_levels]", "[]"),
            5,
            "source.tables",
            "no tables listed",
        );
    }

    #[test]
    fn bad_table_name_is_rejected() {
        one_error(
            &with("oms.order_lines", "order_lines"),
            5,
            "source.tables[1]",
            "no schema",
        );
        one_error(
            &with("oms.order_lines", "oms.Order-Lines"),
            5,
            "source.tables[1]",
            "not an identifier",
        );
    }

    #[test]
    fn duplicate_and_covered_tables_are_rejected() {
        let errs = errors_of(&with(
            "[oms.orders, oms.order_lines, wms.stock_levels]",
            "[oms.orders, oms.orders, wms.*, wms.stock_levels]",
        ));
        let text = errs.to_string();
        assert_eq!(errs.errors.len(), 2, "{text}");
        assert!(
            text.contains("`oms.orders` is listed twice (first on line 5)"),
            "{text}"
        );
        assert!(
            text.contains("`wms.stock_levels` is already covered by `wms.*`"),
            "{text}"
        );
    }

    #[test]
    fn bad_broker_list_shows_the_expected_form() {
        let e = one_error(
            &with("\"127.0.0.1:9092\"", "\"localhost\""),
            9,
            "kafka.brokers",
            "expected \"host:port[,host:port]\", got \"localhost\"",
        );
        assert!(e.message.contains("e.g. 127.0.0.1:9092"), "{e}");
        assert_eq!(
            e.to_string(),
            "pipelines.yaml:9:12: kafka.brokers: expected \"host:port[,host:port]\", got \"localhost\" (no port) — e.g. 127.0.0.1:9092"
        );
        one_error(
            &with("\"127.0.0.1:9092\"", "\"a:1,,b:2\""),
            9,
            "kafka.brokers",
            "empty entry",
        );
    }

    #[test]
    fn bad_identifier_is_rejected() {
        one_error(
            &with("publication: walbridge", "publication: Wal-Bridge"),
            3,
            "source.publication",
            "must start with a lower-case letter",
        );
        let long = "s".repeat(64);
        one_error(
            &with("slot: walbridge", &format!("slot: {long}")),
            4,
            "source.slot",
            "longer than 63 bytes",
        );
    }

    #[test]
    fn bad_registry_url_is_rejected() {
        one_error(
            &with(
                "url: \"http://127.0.0.1:8081\"",
                "url: \"ftp://127.0.0.1:8081\"",
            ),
            16,
            "registry.url",
            "scheme must be http or https",
        );
        one_error(
            &with("url: \"http://127.0.0.1:8081\"", "url: \"not a url\""),
            16,
            "registry.url",
            "expected an http:// or https:// URL",
        );
        one_error(
            &with(
                "url: \"http://127.0.0.1:8081\"",
                "url: \"http://127.0.0.1:9999\"",
            ),
            16,
            "registry.url",
            "make them match",
        );
    }

    #[test]
    fn out_of_range_interval_is_rejected() {
        one_error(
            &with("status_interval_ms: 1000", "status_interval_ms: 50"),
            6,
            "source.status_interval_ms",
            "expected an integer number of milliseconds in 100..=60000, got \"50\" (out of range)",
        );
    }

    #[test]
    fn shutdown_timeout_defaults_to_30_s_and_is_bounded() {
        let c = from_str_with_env(VALID, "pipelines.yaml", &no_env).unwrap();
        assert_eq!(c.source.shutdown_timeout, Duration::from_secs(30));
        let src = with(
            "  heartbeat_interval_ms: 10000\n",
            "  heartbeat_interval_ms: 10000\n  shutdown_timeout_ms: 5000\n",
        );
        let c = from_str_with_env(&src, "pipelines.yaml", &no_env).unwrap();
        assert_eq!(c.source.shutdown_timeout, Duration::from_secs(5));
        for bad in ["999", "3600001", "-1"] {
            one_error(
                &with(
                    "  heartbeat_interval_ms: 10000\n",
                    &format!("  heartbeat_interval_ms: 10000\n  shutdown_timeout_ms: {bad}\n"),
                ),
                8,
                "source.shutdown_timeout_ms",
                &format!("in 1000..=3600000, got \"{bad}\" (out of range)"),
            );
        }
        // A typo is caught with a suggestion, like every other key.
        let errs = errors_of(&with(
            "  heartbeat_interval_ms: 10000\n",
            "  heartbeat_interval_ms: 10000\n  shutdown_timout_ms: 5000\n",
        ));
        assert!(errs.to_string().contains("shutdown_timeout_ms"), "{errs}");
    }

    #[test]
    fn missing_env_var_is_named() {
        let src = with(
            "\"host=127.0.0.1 port=5432 user=postgres dbname=legacy\"",
            "\"${WALBRIDGE_TEST_UNSET_DSN}\"",
        );
        one_error(
            &src,
            2,
            "source.dsn",
            "environment variable WALBRIDGE_TEST_UNSET_DSN is not set",
        );
    }

    #[test]
    fn secrets_come_from_files_without_their_newline_and_are_never_shown() {
        let dir = std::env::temp_dir().join(format!("walbridge-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("pg-password");
        std::fs::write(&secret, "s3cret-from-file\n").unwrap();
        let src = with(
            "\"host=127.0.0.1 port=5432 user=postgres dbname=legacy\"",
            &format!(
                "\"host=127.0.0.1 port=5432 user=postgres dbname=legacy password=${{file:{}}}\"",
                secret.display()
            ),
        );
        let c = from_str_with_env(&src, "pipelines.yaml", &no_env).unwrap();
        assert_eq!(
            c.source.pg_config().get_password(),
            Some(&b"s3cret-from-file"[..])
        );
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "Debug shows the secret"
        );
        assert!(!c.source.dsn.redacted().contains("s3cret"));
        // A missing file is named, with the key, and nothing of any secret is printed.
        let missing = dir.join("nope");
        let src = with(
            "\"host=127.0.0.1 port=5432 user=postgres dbname=legacy\"",
            &format!("\"password=${{file:{}}} host=x\"", missing.display()),
        );
        let e = one_error(&src, 2, "source.dsn", "cannot read the secret file");
        assert!(e.message.contains("nope"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn registry_write_auth_needs_credentials_in_the_url_and_is_never_shown() {
        let env = |n: &str| (n == "REGISTRY_PASSWORD").then(|| "hunter2".to_string());
        let embedded = "    data_dir: \".walbridge/registry\"\n";
        let with_auth = VALID.replace(
            embedded,
            &format!("{embedded}    write_auth: \"walbridge:${{REGISTRY_PASSWORD}}\"\n"),
        );
        // Without credentials in registry.url, walbridge could not write: refused, with a way out.
        let errs = from_str_with_env(&with_auth, "pipelines.yaml", &env).unwrap_err();
        assert!(
            errs.errors.iter().any(|e| e.path == "registry.url"
                && e.message.contains("write_auth is set")
                && e.message.contains("${REGISTRY_PASSWORD}@")),
            "{errs}"
        );
        assert!(!errs.to_string().contains("hunter2"), "{errs}");
        let ok = with_auth.replace(
            "url: \"http://127.0.0.1:8081\"",
            "url: \"http://walbridge:${REGISTRY_PASSWORD}@127.0.0.1:8081\"",
        );
        let c = from_str_with_env(&ok, "pipelines.yaml", &env).unwrap();
        let creds = c
            .registry
            .embedded
            .as_ref()
            .unwrap()
            .write_auth
            .clone()
            .unwrap();
        assert_eq!(
            (creds.user.as_str(), creds.password.as_str()),
            ("walbridge", "hunter2")
        );
        assert!(
            !format!("{c:?}").contains("hunter2"),
            "Debug shows the password"
        );
        // A malformed value is refused without being echoed.
        let bad = VALID.replace(
            embedded,
            &format!("{embedded}    write_auth: \"justapassword\"\n"),
        );
        let errs = from_str_with_env(&bad, "pipelines.yaml", &env).unwrap_err();
        assert!(errs.to_string().contains("user:password"), "{errs}");
        assert!(!errs.to_string().contains("justapassword"), "{errs}");
    }

    #[test]
    fn env_vars_are_substituted() {
        let src = with("topic_prefix: legacy", "topic_prefix: ${PREFIX}-x$${y}");
        let env = |n: &str| (n == "PREFIX").then(|| "shop".to_string());
        let errs = from_str_with_env(&src, "p.yaml", &env).unwrap_err();
        // `${` is not a topic character, so the literal escape shows up as a topic error.
        assert!(errs.to_string().contains("got \"shop-x${y}\""), "{errs}");

        let src = with("topic_prefix: legacy", "topic_prefix: ${PREFIX}");
        let c = from_str_with_env(&src, "p.yaml", &env).unwrap();
        assert_eq!(c.kafka.topic_prefix, "shop");
    }

    #[test]
    fn forbidden_producer_override_explains_why() {
        one_error(
            &with("producer: {}", "producer:\n    acks: \"1\""),
            14,
            "kafka.producer.acks",
            "walbridge always uses acks=all",
        );
        one_error(
            &with(
                "producer: {}",
                "producer: { enable.idempotence: \"false\" }",
            ),
            13,
            "kafka.producer.enable.idempotence",
            "idempotent producer",
        );
        let c = from_str_with_env(
            &with("producer: {}", "producer: { linger.ms: 5 }"),
            "p.yaml",
            &no_env,
        )
        .unwrap();
        assert_eq!(
            c.kafka.producer.get("linger.ms").map(String::as_str),
            Some("5")
        );
    }

    #[test]
    fn all_semantic_problems_are_reported_at_once() {
        let src = VALID
            .replace("publication: walbridge", "publication: 9pub")
            .replace("\"127.0.0.1:9092\"", "\"localhost\"")
            .replace("partitions: 3", "partitions: 0")
            .replace("url: \"http://127.0.0.1:8081\"", "url: \"gopher://x\"");
        let errs = errors_of(&src);
        let paths: Vec<&str> = errs.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "source.publication",
                "kafka.brokers",
                "kafka.partitions",
                "registry.url"
            ],
            "{errs}"
        );
        // One line per problem, each with its location.
        assert_eq!(errs.to_string().lines().count(), 4);
        assert!(
            errs.to_string()
                .lines()
                .all(|l| l.starts_with("pipelines.yaml:"))
        );
    }

    #[test]
    fn dsn_password_never_appears_in_errors_or_debug() {
        let secret = "s3cr3t-pa55";
        // Invalid DSN with a password: the error shows it redacted.
        let src = with(
            "\"host=127.0.0.1 port=5432 user=postgres dbname=legacy\"",
            &format!("\"host=127.0.0.1 port=notaport user=postgres password={secret}\""),
        );
        let errs = errors_of(&src);
        let text = errs.to_string();
        assert!(text.contains("source.dsn"), "{text}");
        assert!(text.contains("password=***"), "{text}");
        assert!(!text.contains(secret), "{text}");
        assert!(!format!("{errs:?}").contains(secret));

        // Malformed key=value text with a password: the parser's detail is dropped too.
        let src = with(
            "\"host=127.0.0.1 port=5432 user=postgres dbname=legacy\"",
            &format!("\"host=127.0.0.1 password={secret} junk\""),
        );
        let text = errors_of(&src).to_string();
        assert!(!text.contains(secret) && !text.contains("junk"), "{text}");

        // Valid DSN (from the environment, as URL): Debug of the whole config redacts it.
        let src = with(
            "\"host=127.0.0.1 port=5432 user=postgres dbname=legacy\"",
            "\"${DSN}\"",
        );
        let env = |_: &str| Some(format!("postgres://app:{secret}@db.internal:5432/legacy"));
        let c = from_str_with_env(&src, "p.yaml", &env).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains(secret), "{dbg}");
        assert!(
            dbg.contains("postgres://app:***@db.internal:5432/legacy"),
            "{dbg}"
        );
        assert_eq!(c.source.pg_config().get_password(), Some(secret.as_bytes()));
        assert!(c.source.dsn.expose().contains(secret));
    }

    #[test]
    fn redaction_covers_quoted_and_query_passwords() {
        assert_eq!(
            redact_dsn("host=h password='a b\\' c' user=u"),
            "host=h password=*** user=u"
        );
        assert_eq!(
            redact_dsn("postgresql://u@h/db?sslmode=disable&password=x"),
            "postgresql://u@h/db?sslmode=disable&password=***"
        );
        assert_eq!(redact_dsn("host = h user = u"), "host=h user=u");
    }

    #[test]
    fn metrics_and_log_sections_are_optional_and_parsed() {
        let c = from_str_with_env(VALID, "pipelines.yaml", &no_env).unwrap();
        assert_eq!(c.metrics, None, "no section, no server");
        assert_eq!(c.log.format, LogFormat::Text);

        let src = format!("{VALID}metrics:\n  listen: \"127.0.0.1:9187\"\nlog:\n  format: json\n");
        let c = from_str_with_env(&src, "pipelines.yaml", &no_env).unwrap();
        assert_eq!(
            c.metrics.unwrap().listen,
            "127.0.0.1:9187".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn telemetry_is_off_by_default_and_its_endpoint_is_checked() {
        let c = from_str_with_env(VALID, "pipelines.yaml", &no_env).unwrap();
        assert_eq!(c.telemetry, None, "no section, no export");
        let src = format!("{VALID}telemetry:\n  otlp_endpoint: \"http://127.0.0.1:4318\"\n");
        let t = from_str_with_env(&src, "pipelines.yaml", &no_env)
            .unwrap()
            .telemetry
            .unwrap();
        assert_eq!(t.traces_url(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(t.service_name, "walbridge");
        let src = format!("{VALID}telemetry:\n  otlp_endpoint: \"https://c:4318\"\n");
        let e = errors_of(&src).to_string();
        assert!(
            e.contains("telemetry.otlp_endpoint") && e.contains("https is not supported"),
            "{e}"
        );
    }

    #[test]
    fn dsn_tls_keys_are_understood_and_a_bad_mode_says_the_choices() {
        let d = Dsn::parse("host=h user=u password=pw sslmode=require").unwrap();
        assert_eq!(d.tls().mode(), cdc::tls::SslMode::Require);
        assert_eq!(
            d.pg_config().get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        let d = Dsn::parse("postgres://u:pw@h/db").unwrap();
        assert_eq!(d.tls().mode(), cdc::tls::SslMode::Prefer, "libpq's default");
        let e = Dsn::parse("host=h user=u password=pw sslmode=verify-full").unwrap_err();
        assert!(e.contains("sslrootcert") && !e.contains("pw"), "{e}");
        let e = Dsn::parse("host=h user=u sslmode=strict").unwrap_err();
        assert!(e.contains("verify-full"), "{e}");
    }

    #[test]
    fn bad_metrics_listen_is_rejected() {
        let e = one_error(
            &format!("{VALID}metrics:\n  listen: \"localhost\"\n"),
            21,
            "metrics.listen",
            "expected an IP socket address \"ip:port\", got \"localhost\"",
        );
        assert!(e.message.contains("e.g. 127.0.0.1:9187"), "{e}");
        one_error(
            &format!("{VALID}metrics:\n  listen: \"127.0.0.1:8081\"\n"),
            21,
            "metrics.listen",
            "is also registry.embedded.listen",
        );
    }

    #[test]
    fn unknown_metrics_key_suggests_the_right_one() {
        let e = one_error(
            &format!("{VALID}metrics:\n  listn: \"127.0.0.1:9187\"\n"),
            21,
            "metrics.listn",
            "did you mean `listen`?",
        );
        assert!(e.message.contains("(valid keys here: listen)"), "{e}");
    }

    #[test]
    fn bad_log_format_is_rejected_with_the_other_problems() {
        let src =
            format!("{VALID}log:\n  format: yaml\n").replace("partitions: 3", "partitions: 0");
        let errs = errors_of(&src);
        let paths: Vec<&str> = errs.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["kafka.partitions", "log.format"], "{errs}");
        assert!(
            errs.errors[1].to_string().starts_with(
                "pipelines.yaml:21:11: log.format: expected text or json, got \"yaml\""
            ),
            "{errs}"
        );
    }

    #[test]
    fn missing_file_is_reported_with_its_path() {
        let errs = load(Path::new("/nonexistent/walbridge.yaml")).unwrap_err();
        assert!(
            errs.to_string()
                .starts_with("/nonexistent/walbridge.yaml: cannot read the config file"),
            "{errs}"
        );
    }
}
