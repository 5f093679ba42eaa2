//! `walbridge verify`: does what is in Kafka add up to what is in the source?
//!
//! At-least-once delivery, crash recovery and backpressure all claim "nothing lost"; this is the
//! independent check an operator (and the fault-injection tests, which call [`verify`]) can run.
//! It rebuilds each table from its topic the way a consumer that materialises the table would,
//! and compares the result with the table itself:
//!
//! ```text
//!  topic ──read from offset 0──▶ fold per key, in (partition, offset) order ──▶ state ─┐
//!                                                                                     ├─▶ lost keys, extra keys,
//!  table ──SELECT, each column rendered as the Avro decode renders it ───────▶ rows ──┘   differing columns
//! ```
//!
//! The fold: `r`/`c`/`u` put `after` (a column listed in `unavailable_columns`, an unchanged
//! TOAST value Postgres did not resend, keeps the value it had), `d` removes the key, tombstones
//! are skipped, and `t` (truncate) removes every key whose last change came before it. A
//! truncate lands on one partition while the keys live on all of them, so "before" is decided
//! by the commit position in the event id, not by offsets.
//!
//! Duplicates: after a crash walbridge sends again what the slot had not confirmed, with the same
//! event id (`<commit LSN>:<index>`), so a consumer can drop them. verify counts them and lists
//! the ids; they are not a difference. Two deliveries of one id with different content are: ids
//! would then be useless for deduplication.
//!
//! When: only after the pipeline has caught up (the slot's `confirmed_flush_lsn` at or past the
//! source's WAL insert position when verify started), so that everything committed is in Kafka.
//! Run it while the source is quiet: a key written during the run can show as a difference.
//!
//! Rendering: a column is compared only where both sides render it the same way for certain:
//! integers, floats (as numbers), bool, strings, numeric/uuid/json/jsonb/enum/timetz/interval
//! (their Postgres text), bytea (as hex), date/time/timestamp(tz) (as the epoch numbers the Avro
//! logical types carry), and one-dimensional arrays of integers, bools and strings. Other columns
//! are listed as not compared. Generated columns and columns outside a publication's column
//! list are not streamed, so they are not compared either; a publication's row filter is applied
//! to the table's side.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use avro::RegistryClient;
use cdc::Lsn;
use futures_util::TryStreamExt;
use serde::Serialize;
use serde_json::{Map, Value as Json};

use crate::config::Config;
use crate::tail::{self, Event};

/// How many keys and rows a report lists per kind of difference (counts are always complete).
const SAMPLE: usize = 20;

/// What to verify and how long to wait.
#[derive(Debug, Clone)]
pub struct Options {
    /// `schema.table` names; empty means every published table the config captures.
    pub tables: Vec<String>,
    /// How long to wait for the pipeline to catch up with the source; zero compares at once.
    pub wait: Duration,
    /// Bound on reading one topic.
    pub read_deadline: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tables: Vec::new(),
            wait: Duration::from_secs(60),
            read_deadline: Duration::from_secs(600),
        }
    }
}

/// Returned (as an error) by the CLI when Kafka and the source differ, so that it exits with 1
/// rather than the 2 of a failure to verify at all.
#[derive(Debug, thiserror::Error)]
#[error("Kafka and the source differ in {0} table(s)")]
pub struct Differences(pub usize);

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub slot: String,
    /// The source's WAL insert position when verify started: what had to be confirmed.
    #[serde(serialize_with = "lsn_text")]
    pub source_lsn: Lsn,
    /// The slot's confirmed position when verify started, before waiting.
    #[serde(serialize_with = "lsn_text")]
    pub confirmed_at_start: Lsn,
    /// The slot's confirmed position when the comparison started.
    #[serde(serialize_with = "lsn_text")]
    pub confirmed: Lsn,
    /// False when verify was told not to wait and the pipeline had not caught up.
    pub caught_up: bool,
    pub equal: bool,
    pub tables: Vec<TableReport>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TableReport {
    pub table: String,
    pub topic: String,
    /// Why the table could not be compared (then the counts below are empty).
    pub skipped: Option<String>,
    /// Rows in the table (within the publication's row filter).
    pub rows: u64,
    /// Keys in the state folded from the topic.
    pub kafka_keys: u64,
    /// Change events read (tombstones not counted).
    pub events: u64,
    /// Distinct event ids among them: the number of changes delivered at least once.
    pub distinct_event_ids: u64,
    /// Keys in the table and not in the folded state.
    pub lost: Keys,
    /// Keys in the folded state and not in the table.
    pub extra: Keys,
    pub mismatched: Mismatches,
    pub duplicates: Duplicates,
    /// Event ids delivered more than once with different content.
    pub conflicting_ids: Vec<String>,
    pub not_compared: Vec<NotCompared>,
}

impl TableReport {
    pub fn is_equal(&self) -> bool {
        self.lost.count == 0
            && self.extra.count == 0
            && self.mismatched.count == 0
            && self.conflicting_ids.is_empty()
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Keys {
    pub count: u64,
    /// The first keys, as JSON objects of the key columns.
    pub sample: Vec<Json>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Mismatches {
    pub count: u64,
    pub sample: Vec<Mismatch>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    pub key: Json,
    /// Columns whose value in Kafka differs from the table's (a column missing from the Kafka
    /// row counts as differing).
    pub columns: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Duplicates {
    /// Deliveries beyond the first, over all ids.
    pub count: u64,
    /// Of the duplicated ids, those whose commit position the slot had confirmed when verify
    /// started.
    pub at_or_below_confirmed: u64,
    /// Every duplicated id.
    pub ids: Vec<Duplicate>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Duplicate {
    pub id: String,
    pub deliveries: u32,
    /// The commit position in the id (for a snapshot row: the position it was read at).
    #[serde(serialize_with = "lsn_text")]
    pub commit_lsn: Lsn,
}

#[derive(Debug, Clone, Serialize)]
pub struct NotCompared {
    pub column: String,
    #[serde(rename = "type")]
    pub pg_type: String,
    pub reason: &'static str,
}

fn lsn_text<S: serde::Serializer>(lsn: &Lsn, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(lsn)
}

/// Waits for the pipeline to catch up, then compares each table with its topic.
pub async fn verify(cfg: &Config, opts: &Options) -> anyhow::Result<Report> {
    let (client, conn) = cfg
        .source
        .pg_config()
        .connect(cfg.source.tls())
        .await
        .with_context(|| format!("connecting to the source {}", cfg.source.dsn.redacted()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "verify connection ended");
        }
    });
    // The settings of walbridge's replication connection, whose text output the Avro values
    // come from (intervals above all).
    client
        .batch_execute(
            "SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; SET IntervalStyle = 'iso_8601'; \
             SET extra_float_digits = 3",
        )
        .await
        .context("setting up the verify session")?;

    let slot = &cfg.source.slot;
    let source_lsn: Lsn = lsn_of(&client, "SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .context("the source reported no WAL position")?;
    let confirmed_at_start = slot_confirmed(&client, slot).await?;
    let started = Instant::now();
    let mut confirmed = confirmed_at_start;
    while confirmed < source_lsn && started.elapsed() < opts.wait {
        tokio::time::sleep(Duration::from_millis(100)).await;
        confirmed = slot_confirmed(&client, slot).await?;
    }
    let caught_up = confirmed >= source_lsn;
    if !caught_up && !opts.wait.is_zero() {
        bail!(
            "the pipeline did not catch up within {:?}: slot {slot} has confirmed {confirmed}, the source was at {source_lsn} when verify started. \
             Is `walbridge run` streaming this slot? verify compares only once everything committed is in Kafka \
             (raise --wait-secs for a pipeline that is far behind)",
            opts.wait
        );
    }

    let tables = published_tables(&client, cfg, &opts.tables).await?;
    let registry = RegistryClient::new(cfg.registry.url.as_str())?;
    let mut reports = Vec::with_capacity(tables.len());
    for t in &tables {
        let report = verify_table(&client, cfg, &registry, t, confirmed_at_start, opts)
            .await
            .with_context(|| format!("verifying {}.{}", t.schema, t.name))?;
        reports.push(report);
    }
    let equal = reports.iter().all(TableReport::is_equal);
    Ok(Report {
        slot: slot.clone(),
        source_lsn,
        confirmed_at_start,
        confirmed,
        caught_up,
        equal,
        tables: reports,
    })
}

async fn lsn_of(
    client: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> anyhow::Result<Option<Lsn>> {
    let row = client.query_opt(sql, params).await?;
    let text: Option<String> = row.and_then(|r| r.get(0));
    text.map(|t| {
        t.parse::<Lsn>()
            .map_err(|e| anyhow::anyhow!("bad LSN {t:?} from the source: {e:?}"))
    })
    .transpose()
}

async fn slot_confirmed(client: &tokio_postgres::Client, slot: &str) -> anyhow::Result<Lsn> {
    let exists = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .context("reading the slot")?;
    let Some(row) = exists else {
        bail!(
            "slot {slot} does not exist on the source: nothing was streamed through it yet (start `walbridge run` first)"
        );
    };
    let text: Option<String> = row.get(0);
    Ok(text.and_then(|t| t.parse().ok()).unwrap_or(Lsn::ZERO))
}

/// A published table and what the publication streams of it.
struct Published {
    schema: String,
    name: String,
    /// The publication's column list; `None` for every column.
    columns: Option<Vec<String>>,
    row_filter: Option<String>,
}

async fn published_tables(
    client: &tokio_postgres::Client,
    cfg: &Config,
    wanted: &[String],
) -> anyhow::Result<Vec<Published>> {
    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text, attnames::text[], rowfilter \
             FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
            &[&cfg.source.publication],
        )
        .await
        .context("listing the publication's tables")?;
    let all: Vec<Published> = rows
        .iter()
        .map(|r| Published {
            schema: r.get(0),
            name: r.get(1),
            columns: r.get(2),
            row_filter: r.get(3),
        })
        .filter(|p| {
            cfg.source
                .tables
                .iter()
                .any(|s| s.matches(&p.schema, &p.name))
        })
        .collect();
    if wanted.is_empty() {
        return Ok(all);
    }
    let mut out = Vec::new();
    let mut all = all;
    for w in wanted {
        let Some(i) = all
            .iter()
            .position(|p| format!("{}.{}", p.schema, p.name) == *w)
        else {
            bail!(
                "{w} is not a table of publication {} captured by this config (give it as schema.table)",
                cfg.source.publication
            );
        };
        out.push(all.swap_remove(i));
    }
    Ok(out)
}

/// How a column's value is rendered on both sides so that they can be compared.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Int,
    Float,
    /// bool and the string types, as `to_json` gives them.
    Plain,
    /// The Postgres text output (numeric, uuid, json, enums …).
    Text,
    Bytes,
    Date,
    Time,
    Timestamp,
    /// A one-dimensional array of `Int` or `Plain` items.
    Array(ArrayItem),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ArrayItem {
    Int,
    Plain,
}

struct Column {
    name: String,
    /// The field name in the Avro records.
    field: String,
    /// `None`: not compared (and read as its text only when it is a key column).
    kind: Option<Kind>,
}

impl Column {
    /// A SQL expression giving the column as JSON, rendered as walbridge's Avro decodes.
    fn sql(&self) -> String {
        let c = quote_ident(&self.name);
        match self.kind {
            Some(Kind::Int) => format!("to_json({c}::int8)"),
            Some(Kind::Float) => format!("to_json({c}::float8)"),
            Some(Kind::Plain) => format!("to_json({c})"),
            Some(Kind::Text) | None => format!("to_json({c}::text)"),
            Some(Kind::Bytes) => format!("to_json(encode({c}, 'hex'))"),
            Some(Kind::Date) => format!(
                "CASE WHEN isfinite({c}) THEN to_json({c} - date '1970-01-01') ELSE to_json({c}::text) END"
            ),
            Some(Kind::Time) => format!("to_json((extract(epoch FROM {c}) * 1000000)::int8)"),
            Some(Kind::Timestamp) => format!(
                "CASE WHEN isfinite({c}) THEN to_json((extract(epoch FROM {c}) * 1000000)::int8) ELSE to_json({c}::text) END"
            ),
            Some(Kind::Array(_)) => format!("array_to_json({c})"),
        }
    }

    /// The comparable form of a value from either side.
    fn normalise(&self, v: &Json) -> Json {
        normalise(self.kind, v)
    }
}

fn normalise(kind: Option<Kind>, v: &Json) -> Json {
    match (kind, v) {
        (Some(Kind::Int), Json::Number(n)) => n
            .as_i64()
            .map(Json::from)
            .or_else(|| n.as_u64().map(Json::from))
            .unwrap_or_else(|| v.clone()),
        // 5 from Postgres' JSON and 5.0 from a decoded double are the same value.
        (Some(Kind::Float), Json::Number(n)) => n.as_f64().map_or_else(|| v.clone(), Json::from),
        (Some(Kind::Bytes), Json::Array(items)) => {
            let mut hex = String::with_capacity(items.len() * 2);
            for b in items {
                let _ = write!(hex, "{:02x}", b.as_u64().unwrap_or(0));
            }
            Json::String(hex)
        }
        (Some(Kind::Array(item)), Json::Array(items)) => {
            let item = match item {
                ArrayItem::Int => Kind::Int,
                ArrayItem::Plain => Kind::Plain,
            };
            Json::Array(items.iter().map(|i| normalise(Some(item), i)).collect())
        }
        _ => v.clone(),
    }
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The comparable kind of a type (after resolving domains to their base type, as pgoutput
/// does); `None` when the renderings are not known to agree.
async fn kind_of(client: &tokio_postgres::Client, oid: u32) -> anyhow::Result<Option<Kind>> {
    let mut oid = oid;
    // A domain over a domain over … ends at a base type; the bound only guards a broken catalog.
    for _ in 0..16 {
        if let Some(k) = builtin_kind(oid) {
            return Ok(Some(k));
        }
        let row = client
            .query_one(
                "SELECT typtype::text, typbasetype::int8, typelem::int8, typcategory::text \
                 FROM pg_type WHERE oid = $1::int8::oid",
                &[&i64::from(oid)],
            )
            .await
            .with_context(|| format!("reading type {oid}"))?;
        let (typtype, base, elem, category): (String, i64, i64, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        match typtype.as_str() {
            "d" => oid = base as u32,
            "e" => return Ok(Some(Kind::Text)),
            _ if category == "A" && elem != 0 => {
                return Ok(match builtin_kind(elem as u32) {
                    Some(Kind::Int) => Some(Kind::Array(ArrayItem::Int)),
                    Some(Kind::Plain) => Some(Kind::Array(ArrayItem::Plain)),
                    _ => None,
                });
            }
            _ => return Ok(None),
        }
    }
    Ok(None)
}

fn builtin_kind(oid: u32) -> Option<Kind> {
    Some(match oid {
        20 | 21 | 23 | 26 => Kind::Int,
        700 | 701 => Kind::Float,
        16 | 25 | 1043 | 1042 | 19 | 18 => Kind::Plain,
        1700 | 2950 | 114 | 3802 | 1266 | 1186 => Kind::Text,
        17 => Kind::Bytes,
        1082 => Kind::Date,
        1083 => Kind::Time,
        1114 | 1184 => Kind::Timestamp,
        _ => return None,
    })
}

async fn verify_table(
    client: &tokio_postgres::Client,
    cfg: &Config,
    registry: &RegistryClient,
    t: &Published,
    confirmed_at_start: Lsn,
    opts: &Options,
) -> anyhow::Result<TableReport> {
    let qualified = format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name));
    let topic = cfg.kafka.topic_for(&t.schema, &t.name);
    let mut report = TableReport {
        table: format!("{}.{}", t.schema, t.name),
        topic: topic.clone(),
        ..TableReport::default()
    };
    let key_names = key_columns(client, &qualified).await?;
    if key_names.is_empty() {
        report.skipped = Some(
            "no primary key and no replica identity index: its events have no key to match rows by"
                .into(),
        );
        return Ok(report);
    }
    let attrs = client
        .query(
            "SELECT attname::text, atttypid::int8, format_type(atttypid, atttypmod), attgenerated::text \
             FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped \
             ORDER BY attnum",
            &[&qualified],
        )
        .await
        .context("reading the table's columns")?;
    let mut columns = Vec::new();
    for a in &attrs {
        let name: String = a.get(0);
        let oid: i64 = a.get(1);
        let pg_type: String = a.get(2);
        let generated: String = a.get(3);
        let is_key = key_names.contains(&name);
        let streamed = t.columns.as_ref().is_none_or(|c| c.contains(&name));
        let reason = if !generated.is_empty() {
            Some("generated column: not streamed")
        } else if !streamed {
            Some("not in the publication's column list")
        } else {
            None
        };
        let kind = if reason.is_none() {
            kind_of(client, oid as u32).await?
        } else {
            None
        };
        if let Some(reason) = reason.or(kind.is_none().then_some("rendering not known to agree")) {
            report.not_compared.push(NotCompared {
                column: name.clone(),
                pg_type,
                reason,
            });
            if !is_key {
                continue;
            }
        }
        columns.push(Column {
            field: avro::schema::avro_name(&name),
            name,
            kind,
        });
    }
    let key_idx: Vec<usize> = key_names
        .iter()
        .filter_map(|k| columns.iter().position(|c| &c.name == k))
        .collect();
    if key_idx.len() != key_names.len() {
        report.skipped = Some("a key column is not streamed".into());
        return Ok(report);
    }

    // Kafka side, read again once if it disagrees: tansu's end-of-partition answers are not
    // reliable (see tail::read_all), so a read can stop short under load.
    let mut attempt = 0;
    let fold = loop {
        let events = tail::read_all(
            &cfg.kafka.client(),
            registry,
            std::slice::from_ref(&topic),
            opts.read_deadline,
        )
        .await?;
        let fold = Fold::of(&events, &columns, &key_idx);
        drop(events);
        attempt += 1;
        if compare(
            client,
            t,
            &qualified,
            &columns,
            &key_idx,
            &fold,
            &mut report,
        )
        .await?
            || attempt == 2
        {
            break fold;
        }
        tracing::info!(table = %report.table, "differences found; reading the topic once more before reporting them");
    };
    report.kafka_keys = fold.state.len() as u64;
    report.events = fold.events;
    report.distinct_event_ids = fold.deliveries.len() as u64;
    let mut dups: Vec<Duplicate> = fold
        .deliveries
        .iter()
        .filter(|(_, d)| d.count > 1)
        .map(|(id, d)| Duplicate {
            id: id.clone(),
            deliveries: d.count,
            commit_lsn: d.position.0,
        })
        .collect();
    dups.sort_by(|a, b| (a.commit_lsn, &a.id).cmp(&(b.commit_lsn, &b.id)));
    report.duplicates = Duplicates {
        count: dups.iter().map(|d| u64::from(d.deliveries - 1)).sum(),
        at_or_below_confirmed: dups
            .iter()
            .filter(|d| d.commit_lsn <= confirmed_at_start)
            .count() as u64,
        ids: dups,
    };
    let mut conflicting: Vec<String> = fold
        .deliveries
        .iter()
        .filter(|(_, d)| d.conflicting)
        .map(|(id, _)| id.clone())
        .collect();
    conflicting.sort();
    report.conflicting_ids = conflicting;
    Ok(report)
}

/// The key columns walbridge keys events by: the primary key, else the replica identity index.
async fn key_columns(
    client: &tokio_postgres::Client,
    qualified: &str,
) -> anyhow::Result<Vec<String>> {
    for which in ["indisprimary", "indisreplident"] {
        let rows = client
            .query(
                &format!(
                    "SELECT a.attname::text FROM pg_index i \
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                     WHERE i.indrelid = $1::text::regclass AND i.{which} \
                     ORDER BY array_position(i.indkey::int2[], a.attnum)"
                ),
                &[&qualified],
            )
            .await
            .with_context(|| format!("reading the key of {qualified}"))?;
        if !rows.is_empty() {
            return Ok(rows.iter().map(|r| r.get(0)).collect());
        }
    }
    Ok(Vec::new())
}

/// Streams the table's rows against the folded state, filling the report's row counts and
/// differences; returns whether they agree.
async fn compare(
    client: &tokio_postgres::Client,
    t: &Published,
    qualified: &str,
    columns: &[Column],
    key_idx: &[usize],
    fold: &Fold,
    report: &mut TableReport,
) -> anyhow::Result<bool> {
    let exprs: Vec<String> = columns
        .iter()
        .map(|c| format!("({})::text", c.sql()))
        .collect();
    let filter = t
        .row_filter
        .as_ref()
        .map_or(String::new(), |f| format!(" WHERE {f}"));
    let sql = format!("SELECT {} FROM {qualified}{filter}", exprs.join(", "));
    let rows = client
        .query_raw(sql.as_str(), std::iter::empty::<String>())
        .await
        .context("reading the table")?;
    futures_util::pin_mut!(rows);
    let mut seen: std::collections::HashSet<&str> =
        std::collections::HashSet::with_capacity(fold.state.len());
    report.rows = 0;
    report.lost = Keys::default();
    report.extra = Keys::default();
    report.mismatched = Mismatches::default();
    while let Some(row) = rows.try_next().await.context("reading the table")? {
        report.rows += 1;
        let values: Vec<Json> = (0..columns.len())
            .map(|i| {
                let text: Option<String> = row.get(i);
                text.and_then(|t| serde_json::from_str(&t).ok())
                    .unwrap_or(Json::Null)
            })
            .collect();
        let key = canonical_key(key_idx.iter().map(|&i| (&columns[i], &values[i])));
        let Some((canon, state)) = fold.state.get_key_value(&key) else {
            report.lost.count += 1;
            if report.lost.sample.len() < SAMPLE {
                report
                    .lost
                    .sample
                    .push(key_object(columns, key_idx, &values));
            }
            continue;
        };
        seen.insert(canon.as_str());
        let differing: Vec<String> = columns
            .iter()
            .zip(&values)
            .filter(|(c, _)| c.kind.is_some())
            .filter(|(c, v)| {
                state
                    .after
                    .get(&c.field)
                    .is_none_or(|k| c.normalise(k) != c.normalise(v))
            })
            .map(|(c, _)| c.name.clone())
            .collect();
        if !differing.is_empty() {
            report.mismatched.count += 1;
            if report.mismatched.sample.len() < SAMPLE {
                report.mismatched.sample.push(Mismatch {
                    key: key_object(columns, key_idx, &values),
                    columns: differing,
                });
            }
        }
    }
    for (canon, state) in &fold.state {
        if !seen.contains(canon.as_str()) {
            report.extra.count += 1;
            if report.extra.sample.len() < SAMPLE {
                report.extra.sample.push(state.key.clone());
            }
        }
    }
    Ok(report.lost.count == 0 && report.extra.count == 0 && report.mismatched.count == 0)
}

/// The key's comparable form: the normalised values in key order, as JSON text.
fn canonical_key<'a>(parts: impl Iterator<Item = (&'a Column, &'a Json)>) -> String {
    let values: Vec<Json> = parts.map(|(c, v)| c.normalise(v)).collect();
    Json::Array(values).to_string()
}

fn key_object(columns: &[Column], key_idx: &[usize], values: &[Json]) -> Json {
    let mut m = Map::new();
    for &i in key_idx {
        m.insert(columns[i].name.clone(), values[i].clone());
    }
    Json::Object(m)
}

/// One key's row as folded from the topic.
struct KeyState {
    /// The decoded key, for reports.
    key: Json,
    after: Map<String, Json>,
    /// Commit position of the key's last change (for truncates).
    position: (Lsn, u32),
}

struct Delivery {
    count: u32,
    position: (Lsn, u32),
    /// Hash of `op`, `before` and `after` of the first delivery, to compare later ones with.
    content: u64,
    conflicting: bool,
}

#[derive(Default)]
struct Fold {
    state: HashMap<String, KeyState>,
    deliveries: HashMap<String, Delivery>,
    events: u64,
}

impl Fold {
    fn of(events: &[Event], columns: &[Column], key_idx: &[usize]) -> Fold {
        let mut ordered: Vec<&Event> = events.iter().filter(|e| e.value.is_some()).collect();
        ordered.sort_by_key(|e| (e.partition, e.offset));
        let mut fold = Fold::default();
        let mut truncated_at: Option<(Lsn, u32)> = None;
        for e in ordered {
            fold.events += 1;
            let Some(value) = &e.value else { continue };
            let position = e.event_id().map_or((Lsn::ZERO, 0), position_of);
            if let Some(id) = e.event_id() {
                let content = content_hash(value);
                match fold.deliveries.get_mut(id) {
                    Some(d) => {
                        d.count += 1;
                        d.conflicting |= d.content != content;
                    }
                    None => {
                        fold.deliveries.insert(
                            id.to_owned(),
                            Delivery {
                                count: 1,
                                position,
                                content,
                                conflicting: false,
                            },
                        );
                    }
                }
            }
            let op = e.op();
            if op == Some("t") {
                truncated_at = truncated_at.max(Some(position));
                continue;
            }
            let Some(key) = &e.key else { continue };
            let canon = canonical_key(key_idx.iter().map(|&i| {
                let c = &columns[i];
                (c, key.get(&c.field).unwrap_or(&Json::Null))
            }));
            match op {
                Some("r" | "c" | "u") => {
                    let Some(Json::Object(after)) = value.get("after") else {
                        continue;
                    };
                    let mut after = after.clone();
                    // Not resent by Postgres (an unchanged TOAST value): the value it had.
                    if let Some(Json::Array(unavailable)) = value.get("unavailable_columns") {
                        let prev = fold.state.get(&canon);
                        for f in unavailable.iter().filter_map(Json::as_str) {
                            match prev.and_then(|p| p.after.get(f)) {
                                Some(v) => after.insert(f.to_owned(), v.clone()),
                                None => after.remove(f),
                            };
                        }
                    }
                    fold.state.insert(
                        canon,
                        KeyState {
                            key: key.clone(),
                            after,
                            position,
                        },
                    );
                }
                Some("d") => {
                    fold.state.remove(&canon);
                }
                _ => {}
            }
        }
        if let Some(t) = truncated_at {
            fold.state.retain(|_, s| s.position > t);
        }
        fold
    }
}

/// What must be the same in two deliveries of one change (`ts_ms` is the time of sending).
fn content_hash(value: &Json) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for part in ["op", "before", "after"] {
        value
            .get(part)
            .unwrap_or(&Json::Null)
            .to_string()
            .hash(&mut h);
    }
    h.finish()
}

/// (commit LSN, index) from an event id: `<lsn>:<index>`, or `snapshot:<lsn>:<table>:<index>`
/// for a snapshot row (read at that position).
fn position_of(id: &str) -> (Lsn, u32) {
    let (lsn, index) = match id.strip_prefix("snapshot:") {
        Some(rest) => {
            let mut parts = rest.split(':');
            (parts.next(), parts.next_back())
        }
        None => {
            let mut parts = id.split(':');
            (parts.next(), parts.next())
        }
    };
    (
        lsn.and_then(|l| l.parse().ok()).unwrap_or(Lsn::ZERO),
        index.and_then(|i| i.parse().ok()).unwrap_or(0),
    )
}

impl Report {
    /// Tables whose Kafka state differs from the source.
    pub fn differences(&self) -> usize {
        self.tables.iter().filter(|t| !t.is_equal()).count()
    }

    /// The human summary: one line per table, then the details of what differs.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "slot {} confirmed {} (source at {} when verify started{})",
            self.slot,
            self.confirmed,
            self.source_lsn,
            if self.caught_up {
                ""
            } else {
                "; NOT caught up: recent changes may be missing from Kafka"
            }
        );
        let width = self
            .tables
            .iter()
            .map(|t| t.table.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let _ = writeln!(
            out,
            "{:<width$}  {:>9}  {:>9}  {:>9}  {:>6}  {:>6}  {:>6}  {:>6}  result",
            "table", "rows", "kafka", "events", "lost", "extra", "differ", "dups"
        );
        for t in &self.tables {
            let result = match (&t.skipped, t.is_equal()) {
                (Some(_), _) => "skipped",
                (None, true) => "equal",
                (None, false) => "DIFFERENT",
            };
            let _ = writeln!(
                out,
                "{:<width$}  {:>9}  {:>9}  {:>9}  {:>6}  {:>6}  {:>6}  {:>6}  {result}",
                t.table,
                t.rows,
                t.kafka_keys,
                t.events,
                t.lost.count,
                t.extra.count,
                t.mismatched.count,
                t.duplicates.count
            );
        }
        for t in &self.tables {
            let n = &t.table;
            if let Some(why) = &t.skipped {
                let _ = writeln!(out, "{n}: skipped: {why}");
            }
            let keys = |k: &Keys| {
                let shown: Vec<String> = k.sample.iter().map(Json::to_string).collect();
                let more = if k.count as usize > k.sample.len() {
                    ", …"
                } else {
                    ""
                };
                format!("{}{more}", shown.join(", "))
            };
            if t.lost.count > 0 {
                let _ = writeln!(
                    out,
                    "{n}: {} key(s) in the table but not in Kafka: {}",
                    t.lost.count,
                    keys(&t.lost)
                );
            }
            if t.extra.count > 0 {
                let _ = writeln!(
                    out,
                    "{n}: {} key(s) in Kafka but not in the table: {}",
                    t.extra.count,
                    keys(&t.extra)
                );
            }
            if t.mismatched.count > 0 {
                let _ = writeln!(out, "{n}: {} row(s) differ:", t.mismatched.count);
                for m in &t.mismatched.sample {
                    let _ = writeln!(out, "  {}: {}", m.key, m.columns.join(", "));
                }
            }
            if !t.conflicting_ids.is_empty() {
                let _ = writeln!(
                    out,
                    "{n}: {} event id(s) delivered with different contents: {}",
                    t.conflicting_ids.len(),
                    t.conflicting_ids
                        .iter()
                        .take(SAMPLE)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            if t.duplicates.count > 0 {
                let ids: Vec<&str> = t
                    .duplicates
                    .ids
                    .iter()
                    .take(SAMPLE)
                    .map(|d| d.id.as_str())
                    .collect();
                let _ = writeln!(
                    out,
                    "{n}: {} duplicate deliveries of {} event id(s) ({} at or below the confirmed position when verify started; \
                     expected after a crash for changes not yet confirmed, and dropped by consumers that deduplicate by event id): {}{}",
                    t.duplicates.count,
                    t.duplicates.ids.len(),
                    t.duplicates.at_or_below_confirmed,
                    ids.join(", "),
                    if t.duplicates.ids.len() > SAMPLE {
                        ", …"
                    } else {
                        ""
                    }
                );
            }
            if !t.not_compared.is_empty() {
                let cols: Vec<String> = t
                    .not_compared
                    .iter()
                    .map(|c| format!("{} ({}: {})", c.column, c.pg_type, c.reason))
                    .collect();
                let _ = writeln!(out, "{n}: not compared: {}", cols.join(", "));
            }
        }
        let _ = writeln!(
            out,
            "{}",
            if self.equal {
                "Kafka matches the source"
            } else {
                "Kafka and the source DIFFER"
            }
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn col(name: &str, kind: Option<Kind>) -> Column {
        Column {
            name: name.into(),
            field: avro::schema::avro_name(name),
            kind,
        }
    }

    fn event(partition: i32, offset: i64, id: &str, key: i64, value: Option<Json>) -> Event {
        Event {
            topic: "t".into(),
            partition,
            offset,
            key: Some(json!({ "id": key })),
            value,
            headers: [("walbridge.event_id".to_owned(), id.to_owned())].into(),
        }
    }

    fn change(op: &str, after: Option<Json>) -> Option<Json> {
        Some(json!({ "op": op, "before": null, "after": after }))
    }

    #[test]
    fn fold_applies_changes_in_offset_order_and_counts_duplicates() {
        let cols = [col("id", Some(Kind::Int)), col("n", Some(Kind::Int))];
        let events = vec![
            // Out of offset order on purpose: the fold sorts.
            event(
                0,
                1,
                "0/20:0",
                1,
                change("u", Some(json!({"id": 1, "n": 2}))),
            ),
            event(
                0,
                0,
                "0/10:0",
                1,
                change("c", Some(json!({"id": 1, "n": 1}))),
            ),
            event(
                1,
                0,
                "0/10:1",
                2,
                change("c", Some(json!({"id": 2, "n": 1}))),
            ),
            event(1, 1, "0/30:0", 2, change("d", None)),
            event(1, 2, "0/30:0", 2, None), // tombstone: ignored
            // Sent again after a crash: the same id, the same content.
            event(
                0,
                2,
                "0/20:0",
                1,
                change("u", Some(json!({"id": 1, "n": 2}))),
            ),
        ];
        let f = Fold::of(&events, &cols, &[0]);
        assert_eq!(f.state.len(), 1, "key 2 was deleted");
        assert_eq!(f.state["[1]"].after["n"], 2);
        assert_eq!(f.events, 5);
        assert_eq!(f.deliveries.len(), 4);
        assert_eq!(f.deliveries["0/20:0"].count, 2);
        assert!(!f.deliveries["0/20:0"].conflicting);
    }

    #[test]
    fn a_reused_id_with_other_content_is_a_conflict() {
        let cols = [col("id", Some(Kind::Int))];
        let events = vec![
            event(0, 0, "0/10:0", 1, change("c", Some(json!({"id": 1})))),
            event(0, 1, "0/10:0", 1, change("d", None)),
        ];
        let f = Fold::of(&events, &cols, &[0]);
        assert!(f.deliveries["0/10:0"].conflicting);
    }

    #[test]
    fn truncate_clears_keys_changed_before_it_on_any_partition() {
        let cols = [col("id", Some(Kind::Int))];
        let mut trunc = event(2, 0, "0/20:0", 0, change("t", None));
        trunc.key = None;
        let events = vec![
            event(0, 0, "0/10:0", 1, change("c", Some(json!({"id": 1})))),
            event(1, 0, "0/30:0", 2, change("c", Some(json!({"id": 2})))),
            trunc,
        ];
        let f = Fold::of(&events, &cols, &[0]);
        assert_eq!(f.state.keys().collect::<Vec<_>>(), ["[2]"]);
    }

    #[test]
    fn unavailable_columns_keep_their_previous_value() {
        let cols = [col("id", Some(Kind::Int)), col("doc", Some(Kind::Plain))];
        let events = vec![
            event(
                0,
                0,
                "0/10:0",
                1,
                change("c", Some(json!({"id": 1, "doc": "big"}))),
            ),
            event(
                0,
                1,
                "0/20:0",
                1,
                Some(
                    json!({"op": "u", "before": null, "after": {"id": 1, "doc": null}, "unavailable_columns": ["doc"]}),
                ),
            ),
        ];
        let f = Fold::of(&events, &cols, &[0]);
        assert_eq!(f.state["[1]"].after["doc"], "big");
    }

    #[test]
    fn renderings_are_normalised_per_kind() {
        assert_eq!(
            normalise(Some(Kind::Float), &json!(5)),
            normalise(Some(Kind::Float), &json!(5.0))
        );
        assert_ne!(
            normalise(Some(Kind::Float), &json!(5)),
            normalise(Some(Kind::Float), &json!(5.5))
        );
        assert_eq!(
            normalise(Some(Kind::Bytes), &json!([0, 255, 127])),
            json!("00ff7f")
        );
        assert_eq!(normalise(Some(Kind::Int), &json!(7)), json!(7));
    }

    #[test]
    fn positions_come_from_stream_and_snapshot_ids() {
        assert_eq!(
            position_of("0/16B3A28:3"),
            ("0/16B3A28".parse().unwrap(), 3)
        );
        assert_eq!(
            position_of("snapshot:0/10:oms.orders:7"),
            ("0/10".parse().unwrap(), 7)
        );
    }
}
