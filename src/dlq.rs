//! Dead letters (invariant 7: nothing is lost silently).
//!
//! A change whose values walbridge cannot encode for its table's Avro schema — a `timestamp` or
//! `date` of `infinity`, a `NaN` in a `numeric(p,s)` column, text that is not UTF-8 — is a
//! *definite* error: it belongs to that one record and retrying cannot help. With
//! `kafka.dead_letter: topic` (the default) the change goes to `<topic_prefix>.dlq` instead of
//! its table's topic, and the pipeline goes on:
//!
//! ```text
//!  change ─encode─▶ ok ──────────────▶ <prefix>.<schema>.<table>  ┐ both acked through Progress:
//!            └────▶ EncodeError ─────▶ <prefix>.dlq (JSON)        ┘ the commit is confirmed only
//!                                        + walbridge_dead_letters_total   when every record is
//! ```
//!
//! With `kafka.dead_letter: stop` the encode error stops the pipeline at that change, and
//! nothing from its transaction on is confirmed (the slot keeps it for the next start).
//!
//! # The dead-letter record
//!
//! Key: the record key the table's topic would have had (the Avro key, framed for the
//! registry), or null when the key columns themselves cannot be encoded or the table has none.
//! Headers: `walbridge.event_id` (the id the change would have had), `walbridge.lsn`,
//! `walbridge.txid`, `walbridge.op`, `walbridge.dlq.reason`, plus the correlation and trace
//! headers every event carries. Value: one JSON object ([`Letter`]):
//!
//! ```json
//! { "format": "walbridge.dlq/1",
//!   "event_id": "0/1A2B3C8:1", "schema": "oms", "table": "items", "topic": "legacy.oms.items",
//!   "op": "c", "commit_lsn": "0/1A2B3C8", "txid": 750, "commit_ts_ms": 1714567890123,
//!   "snapshot": false, "dead_lettered_at_ms": 1714567890456,
//!   "reason": { "message": "cannot encode column \"price\" (numeric(8,2)) of table oms.items: NaN has no Avro decimal representation",
//!               "column": "price", "pg_type": "numeric(8,2)", "fix": "…" },
//!   "before": null,
//!   "after": { "values": { "id": "2", "price": "NaN", "note": null },
//!              "unchanged_toast": [], "hex": [] } }
//! ```
//!
//! A row's `values` are Postgres' text output per column (in column order), or null for SQL
//! NULL. A column in `unchanged_toast` was not sent by Postgres (an UPDATE left its TOASTed
//! value alone; its `values` entry is null): listed apart rather than as a placeholder string,
//! which a consumer could mistake for data. A column in `hex` holds bytes that are not UTF-8,
//! written as hex. A later format bumps the number in `format`; readers skip formats they do
//! not know.
//!
//! # Replay
//!
//! `walbridge dlq replay` re-encodes each stored change with the table's *current* shape, read
//! from the source catalog (after e.g. `ALTER TABLE … ALTER COLUMN price TYPE numeric`), and
//! produces it to the table's topic with the same event id and headers. A replayed letter is
//! remembered by a marker record on the dead-letter topic (header `walbridge.dlq.replayed` =
//! the event id, value `{"format": "walbridge.dlq.replayed/1", …}`), so later lists and replays
//! skip it: replay is idempotent by event id. A crash between the replayed record's ack and the
//! marker's replays it once more; consumers drop the duplicate by its event id (invariant 2).
//! A replayed change arrives after the changes committed after it: its event id (commit LSN,
//! index) says where it belongs in commit order.
//!
//! A business event's letter (a mapping or contract violation, a malformed outbox write)
//! carries `event` ([`EventOrigin`]): the mapping's name, the change's index and the `lines:`
//! rows. Replay builds that event again from the stored rows under the *current* mapping and
//! contract and produces it to its business topic with the same event id; one still invalid
//! stays, with the reason. See [`crate::events::replay`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use avro::{EncodeError, EncodeReason, Op, RegistryClient, TypeNames};
use cdc::Lsn;
use cdc::pgoutput::{Relation, Tuple, Value};
use cdc::progress::Progress;
use serde::{Deserialize, Serialize};
use sinks::kafka::{KafkaSink, Record};

use crate::config::Config;
use crate::emit::{Emitter, EventMeta, Out, Sink, TableState};

/// `format` of a dead letter written by this version.
pub const FORMAT: &str = "walbridge.dlq/1";
/// `format` of the marker that says a letter was replayed.
pub const REPLAYED_FORMAT: &str = "walbridge.dlq.replayed/1";
/// Header naming the event id a marker record stands for.
pub const REPLAYED_HEADER: &str = "walbridge.dlq.replayed";

/// One dead letter: the value of a record on the dead-letter topic (see the module doc).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Letter {
    pub format: String,
    pub event_id: String,
    pub schema: String,
    pub table: String,
    /// The table's topic, where the change would have gone.
    pub topic: String,
    pub op: String,
    pub commit_lsn: String,
    pub txid: u32,
    pub commit_ts_ms: i64,
    pub snapshot: bool,
    pub dead_lettered_at_ms: i64,
    pub reason: Reason,
    pub before: Option<Row>,
    pub after: Option<Row>,
    /// Set on a business event's letter (see [`crate::events::replay`]); absent on a row
    /// change's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<EventOrigin>,
}

/// What a business event's letter keeps beyond its rows, so that replay can build the event
/// again from them under the current mapping and contract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventOrigin {
    /// The mapping's name (`events.mappings[].name`); absent for an outbox event, whose rows
    /// are the outbox row (`after`) or the logical message (`after.values.content`).
    pub mapping: Option<String>,
    /// Position of the triggering change or message in its transaction.
    pub index: u32,
    /// For a `lines:` mapping: the child table and its rows of the transaction, as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines_table: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<Row>,
}

/// What failed, where, and how to fix it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    pub message: String,
    /// The Postgres column, when one column is at fault.
    pub column: Option<String>,
    pub pg_type: Option<String>,
    pub fix: String,
}

/// One row of the original change, as Postgres sent it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Column name → text output (null for SQL NULL), in column order.
    #[serde(with = "ordered")]
    pub values: Vec<(String, Option<String>)>,
    /// Columns whose value Postgres did not send (unchanged TOAST).
    #[serde(default)]
    pub unchanged_toast: Vec<String>,
    /// Columns whose value is not UTF-8, given in `values` as hex.
    #[serde(default)]
    pub hex: Vec<String>,
}

/// `values` as a JSON object that keeps the column order when written.
mod ordered {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        v: &[(String, Option<String>)],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(v.iter().map(|(k, v)| (k, v)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(String, Option<String>)>, D::Error> {
        let m = std::collections::BTreeMap::<String, Option<String>>::deserialize(d)?;
        Ok(m.into_iter().collect())
    }
}

impl Row {
    fn of(rel: &Relation, tuple: &Tuple) -> Row {
        let names: Vec<String> = rel.columns.iter().map(|c| c.name.clone()).collect();
        Row::of_names(&names, tuple)
    }

    /// The row from its column names (in the tuple's order) and values as sent.
    pub(crate) fn of_names(names: &[String], tuple: &Tuple) -> Row {
        let mut row = Row {
            values: Vec::with_capacity(tuple.len()),
            unchanged_toast: Vec::new(),
            hex: Vec::new(),
        };
        for (i, value) in tuple.iter().enumerate() {
            let name = names.get(i).cloned().unwrap_or_else(|| format!("#{i}"));
            let text = match value {
                Value::Null => None,
                Value::UnchangedToast => {
                    row.unchanged_toast.push(name.clone());
                    None
                }
                Value::Text(b) | Value::Binary(b) => match std::str::from_utf8(b) {
                    Ok(s) if matches!(value, Value::Text(_)) => Some(s.to_owned()),
                    _ => {
                        row.hex.push(name.clone());
                        Some(b.iter().map(|x| format!("{x:02x}")).collect())
                    }
                },
            };
            row.values.push((name, text));
        }
        row
    }

    /// The row in the column order of `rel` (the table's current shape): columns matched by
    /// name; a column added since is null, a column dropped since is left out.
    /// The row as a tuple of `rel`, matching columns by name (a column since added is null).
    pub(crate) fn tuple(&self, rel: &Relation) -> anyhow::Result<Tuple> {
        let by_name: HashMap<&str, &Option<String>> =
            self.values.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut out = Vec::with_capacity(rel.columns.len());
        for col in &rel.columns {
            let name = col.name.as_str();
            if self.unchanged_toast.iter().any(|c| c == name) {
                out.push(Value::UnchangedToast);
                continue;
            }
            out.push(match by_name.get(name) {
                Some(Some(text)) if self.hex.iter().any(|c| c == name) => Value::Text(
                    unhex(text)
                        .with_context(|| format!("column {name}"))?
                        .into(),
                ),
                Some(Some(text)) => Value::Text(text.clone().into_bytes().into()),
                Some(None) | None => Value::Null,
            });
        }
        Ok(out)
    }
}

fn unhex(text: &str) -> anyhow::Result<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        bail!("hex value of odd length");
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).context("not hex"))
        .collect()
}

impl Letter {
    /// The dead letter of a change that `err` kept from being encoded.
    pub fn new(
        event_id: &str,
        t: &TableState,
        m: &EventMeta<'_>,
        op: Op,
        before: Option<&Tuple>,
        after: Option<&Tuple>,
        err: &EncodeError,
    ) -> Letter {
        Letter {
            format: FORMAT.to_owned(),
            event_id: event_id.to_owned(),
            schema: t.rel.namespace.clone(),
            table: t.rel.name.clone(),
            topic: t.topic.clone(),
            op: op.code().to_owned(),
            commit_lsn: m.lsn_text.to_owned(),
            txid: m.xid,
            commit_ts_ms: m.commit_ms,
            snapshot: m.snapshot,
            dead_lettered_at_ms: m.now_ms,
            reason: Reason {
                message: err.to_string(),
                column: (!err.column.is_empty()).then(|| err.column.clone()),
                pg_type: (!err.column.is_empty()).then(|| err.pg_type.clone()),
                fix: fix_for(&err.reason).to_owned(),
            },
            before: before.map(|r| Row::of(&t.rel, r)),
            after: after.map(|r| Row::of(&t.rel, r)),
            event: None,
        }
    }
}

/// How to get a change with this problem through.
fn fix_for(reason: &EncodeReason) -> &'static str {
    match reason {
        EncodeReason::Unrepresentable { .. } => {
            "the column's Avro type has no such value (e.g. infinity for a timestamp or date, NaN for a numeric(p,s)): \
             change the column to a type walbridge sends as a string (e.g. an unconstrained numeric, or text), \
             then run `walbridge dlq replay`; or correct the value in the source"
        }
        EncodeReason::PrecisionExceeded { .. } => {
            "the value has more digits than the column's numeric(p,s) as walbridge knew it: widen the column \
             (ALTER TABLE … ALTER COLUMN … TYPE numeric(p,s) with a larger p) or make it an unconstrained \
             numeric, then run `walbridge dlq replay`"
        }
        EncodeReason::OutOfRange { .. } => {
            "the value is outside the range of the column's Avro type: widen the column type, then run \
             `walbridge dlq replay`"
        }
        EncodeReason::NotUtf8 { .. } => {
            "the value is not UTF-8: use a UTF-8 database, or make the column bytea, then run `walbridge dlq replay`"
        }
        EncodeReason::MultiDimArray => {
            "multi-dimensional arrays are not supported: make the column a one-dimensional array or text, \
             then run `walbridge dlq replay`"
        }
        EncodeReason::NullKey => {
            "a key column has no value: give the table a primary key whose columns are NOT NULL, then run \
             `walbridge dlq replay`"
        }
        EncodeReason::IncompatibleShape(_) => {
            "the registry refuses the table's new shape under the subject's compatibility level: make the \
             change compatible (e.g. change the column back, or add a column instead), or relax the subject's \
             level (PUT /config/<topic>-value {\"compatibility\":\"NONE\"}), then run `walbridge dlq replay`"
        }
        EncodeReason::Malformed { .. }
        | EncodeReason::ColumnCount { .. }
        | EncodeReason::BinaryFormat => {
            "walbridge could not read what Postgres sent (a walbridge bug: please report it with the column's \
             type); after an upgrade that fixes it, run `walbridge dlq replay`"
        }
    }
}

/// A letter read back from the topic.
#[derive(Debug, Clone)]
pub struct Stored {
    pub letter: Letter,
    pub partition: i32,
    pub offset: i64,
}

/// What the dead-letter topic holds.
#[derive(Debug, Default)]
pub struct Contents {
    /// Letters not replayed yet, oldest first, one per event id.
    pub pending: Vec<Stored>,
    /// Event ids replayed already (they have a marker).
    pub replayed: HashSet<String>,
    /// Records in a format this version does not know.
    pub unknown: usize,
}

/// Reads the whole dead-letter topic.
pub async fn read(cfg: &Config) -> anyhow::Result<Contents> {
    let registry = RegistryClient::new(cfg.registry.url.as_str())?;
    let topic = cfg.kafka.dead_letter_topic();
    let events = crate::tail::read_all(
        &cfg.kafka.client(),
        &registry,
        std::slice::from_ref(&topic),
        Duration::from_secs(120),
    )
    .await
    .with_context(|| format!("reading the dead-letter topic {topic}"))?;
    let mut out = Contents::default();
    let mut letters = Vec::new();
    for e in events {
        if let Some(id) = e.headers.get(REPLAYED_HEADER) {
            out.replayed.insert(id.clone());
            continue;
        }
        let letter = e
            .value
            .as_ref()
            .filter(|v| v.get("format").and_then(|f| f.as_str()) == Some(FORMAT))
            .and_then(|v| serde_json::from_value::<Letter>(v.clone()).ok());
        match letter {
            Some(letter) => letters.push(Stored {
                letter,
                partition: e.partition,
                offset: e.offset,
            }),
            None => out.unknown += 1,
        }
    }
    // Oldest change first; a letter written twice (at-least-once) once.
    letters.sort_by(|a, b| {
        let pos = |s: &Stored| {
            (
                s.letter.commit_lsn.parse::<Lsn>().unwrap_or(Lsn::ZERO),
                s.letter.event_id.clone(),
            )
        };
        pos(a).cmp(&pos(b))
    });
    let mut seen = HashSet::new();
    out.pending = letters
        .into_iter()
        .filter(|s| !out.replayed.contains(&s.letter.event_id))
        .filter(|s| seen.insert(s.letter.event_id.clone()))
        .collect();
    Ok(out)
}

/// `walbridge dlq list`: the last `limit` letters waiting, one line each.
pub async fn print_list(cfg: &Config, limit: usize) -> anyhow::Result<()> {
    let c = read(cfg).await?;
    let shown = &c.pending[c.pending.len().saturating_sub(limit)..];
    if !shown.is_empty() {
        println!(
            "{:<28} {:<14} {:<24} {:<2} REASON",
            "TABLE", "COMMIT LSN", "EVENT ID", "OP"
        );
    }
    for s in shown {
        let l = &s.letter;
        println!(
            "{:<28} {:<14} {:<24} {:<2} {}",
            format!("{}.{}", l.schema, l.table),
            l.commit_lsn,
            l.event_id,
            l.op,
            l.reason.message
        );
    }
    println!(
        "{} dead letter(s) waiting in {}{}; {} replayed{}",
        c.pending.len(),
        cfg.kafka.dead_letter_topic(),
        if shown.len() < c.pending.len() {
            format!(" (the last {} shown)", shown.len())
        } else {
            String::new()
        },
        c.replayed.len(),
        if c.unknown > 0 {
            format!(
                "; {} record(s) in a format this walbridge does not read",
                c.unknown
            )
        } else {
            String::new()
        },
    );
    Ok(())
}

/// What became of one letter in a replay.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub event_id: String,
    pub table: String,
    /// `Err` says why it is still a dead letter.
    pub result: Result<(), String>,
}

/// `walbridge dlq replay`: re-encodes the waiting letters (only those in `only`, when given)
/// with their table's current shape and produces them to the table's topic. See the module doc.
pub async fn replay(cfg: &Config, only: &[String]) -> anyhow::Result<Vec<Outcome>> {
    let contents = read(cfg).await?;
    let todo: Vec<Letter> = contents
        .pending
        .into_iter()
        .map(|s| s.letter)
        .filter(|l| only.is_empty() || only.contains(&l.event_id))
        .collect();
    if todo.is_empty() {
        return Ok(Vec::new());
    }
    let pg = cfg.source.pg_config();
    let (meta, conn) = pg
        .connect(cfg.source.tls())
        .await
        .with_context(|| format!("connecting to the source {}", cfg.source.dsn.redacted()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "metadata connection ended");
        }
    });
    let registry = RegistryClient::new(cfg.registry.url.as_str())?;
    let (progress, _confirmed) = Progress::new(Lsn::ZERO);
    let sink = KafkaSink::new(crate::pipeline::kafka_settings(cfg), progress.clone())?;
    let out = Out {
        sink: Arc::new(Sink::Kafka(sink)),
        progress: progress.clone(),
        name: cfg.kafka.topic_prefix.as_str().into(),
        db: pg.get_dbname().unwrap_or("postgres").into(),
        // A change that still cannot be encoded stays where it is.
        dead_letter: None,
    };
    let metrics = crate::metrics::Metrics::new(&cfg.source);
    let mut tables: HashMap<(String, String), Result<Arc<TableState>, String>> = HashMap::new();
    let mut em = Emitter::default();
    let mut outcomes = Vec::with_capacity(todo.len());
    let mut sent = Vec::new();
    let now = crate::pipeline::now_ms();
    for l in &todo {
        let mut outcome = Outcome {
            event_id: l.event_id.clone(),
            // A business event is named by its topic (an outbox message has no table).
            table: match &l.event {
                Some(_) => l.topic.clone(),
                None => format!("{}.{}", l.schema, l.table),
            },
            result: Ok(()),
        };
        if let Some(origin) = &l.event {
            // A business event: built again under the current mapping and contract.
            let Ok(lsn) = l.commit_lsn.parse::<Lsn>() else {
                outcome.result = Err(format!("the stored LSN {:?} is damaged", l.commit_lsn));
                outcomes.push(outcome);
                continue;
            };
            let seq = progress.begin();
            let xid_text = l.txid.to_string();
            let m = EventMeta {
                seq,
                commit_lsn: lsn,
                xid: l.txid,
                commit_ms: l.commit_ts_ms,
                now_ms: now,
                lsn_text: &l.commit_lsn,
                xid_text: &xid_text,
                snapshot: false,
            };
            let result = crate::events::replay::replay(
                cfg.events.as_ref(),
                &meta,
                cfg.registry.url.as_str(),
                &out,
                l,
                origin,
                &m,
            )
            .await;
            progress.commit(seq, lsn);
            match result {
                Ok(()) => sent.push((outcomes.len(), seq)),
                Err(why) => outcome.result = Err(why),
            }
            outcomes.push(outcome);
            continue;
        }
        if l.topic != cfg.kafka.topic_for(&l.schema, &l.table) {
            // A business event's letter from a walbridge that did not keep what replay needs.
            outcome.result = Err(format!(
                "a business-event letter (for {}) without the rows to rebuild it (written by an older walbridge); \
                 it cannot be replayed",
                l.topic
            ));
            outcomes.push(outcome);
            continue;
        }
        let key = (l.schema.clone(), l.table.clone());
        if !tables.contains_key(&key) {
            let mapped = map_table(cfg, &meta, &registry, &metrics, &out, &l.schema, &l.table)
                .await
                .map(Arc::new)
                .map_err(|e| format!("{e:#}"));
            tables.insert(key.clone(), mapped);
        }
        let t = match &tables[&key] {
            Ok(t) => t.clone(),
            Err(why) => {
                outcome.result = Err(why.clone());
                outcomes.push(outcome);
                continue;
            }
        };
        if let Some(why) = &t.incompatible {
            outcome.result = Err(format!(
                "the table's shape is still incompatible with its registered schemas ({why}); \
                 make it compatible or relax the subject's level, then replay again"
            ));
            outcomes.push(outcome);
            continue;
        }
        let rows = (
            l.before.as_ref().map(|r| r.tuple(&t.rel)).transpose(),
            l.after.as_ref().map(|r| r.tuple(&t.rel)).transpose(),
        );
        let (before, after) = match rows {
            (Ok(b), Ok(a)) => (b, a),
            (Err(e), _) | (_, Err(e)) => {
                outcome.result = Err(format!("the stored change is damaged: {e:#}"));
                outcomes.push(outcome);
                continue;
            }
        };
        let (Some(op), Ok(lsn)) = (op_of(&l.op), l.commit_lsn.parse::<Lsn>()) else {
            outcome.result = Err(format!(
                "the stored change has an unknown op {:?} or LSN {:?}",
                l.op, l.commit_lsn
            ));
            outcomes.push(outcome);
            continue;
        };
        let seq = progress.begin();
        let xid_text = l.txid.to_string();
        let m = EventMeta {
            seq,
            commit_lsn: lsn,
            xid: l.txid,
            commit_ms: l.commit_ts_ms,
            now_ms: now,
            lsn_text: &l.commit_lsn,
            xid_text: &xid_text,
            snapshot: l.snapshot,
        };
        em.id(format_args!("{}", l.event_id));
        let emitted = em
            .emit(&out, &t, &m, op, before.as_ref(), after.as_ref())
            .await;
        progress.commit(seq, lsn);
        match emitted {
            Ok(()) => sent.push((outcomes.len(), seq)),
            Err(e) => match e.downcast_ref::<EncodeError>() {
                Some(enc) => outcome.result = Err(format!("{enc}; {}", fix_for(&enc.reason))),
                None => return Err(e.context(format!("replaying {}", l.event_id))),
            },
        }
        outcomes.push(outcome);
    }
    flush(&out)?;
    // Markers only for what Kafka acked.
    let dlq_topic = cfg.kafka.dead_letter_topic();
    let mut markers = Vec::new();
    for (i, seq) in sent {
        let o = &mut outcomes[i];
        if !progress.is_done(seq) {
            o.result = Err(format!(
                "Kafka did not ack the replayed record: {}",
                progress.failure().unwrap_or_else(|| "no ack".into())
            ));
            continue;
        }
        // One outcome per letter, in order.
        let l = &todo[i];
        let marker = serde_json::json!({
            "format": REPLAYED_FORMAT,
            "event_id": o.event_id,
            "schema": l.schema,
            "table": l.table,
            "topic": l.topic,
            "replayed_at_ms": now,
        })
        .to_string();
        let seq = progress.begin();
        progress.expect(seq, 1);
        out.sink
            .send(&Record {
                topic: &dlq_topic,
                key: None,
                payload: Some(marker.as_bytes()),
                headers: &[
                    (REPLAYED_HEADER, o.event_id.as_bytes()),
                    ("walbridge.event_id", o.event_id.as_bytes()),
                ],
                seq,
                partition: None,
            })
            .await?;
        progress.commit(seq, Lsn::ZERO);
        markers.push((i, seq));
    }
    flush(&out)?;
    for (i, seq) in markers {
        if !progress.is_done(seq) {
            // The change is in its topic; only the note is missing, so a later replay sends it
            // once more under the same event id.
            tracing::warn!(event_id = %outcomes[i].event_id, "replayed, but the replay marker was not acked; a later replay re-sends this change (same event id)");
        }
    }
    Ok(outcomes)
}

fn flush(out: &Out) -> anyhow::Result<()> {
    let sink = out.sink.clone();
    tokio::task::block_in_place(|| sink.flush(Duration::from_secs(60)))
        .context("waiting for Kafka to ack the replayed records")
}

fn op_of(code: &str) -> Option<Op> {
    [Op::Create, Op::Update, Op::Delete, Op::Read, Op::Truncate]
        .into_iter()
        .find(|op| op.code() == code)
}

/// The table's current shape from the catalog, mapped and registered as the pipeline maps a
/// Relation message (same key choice, same schemas, same `registry.on_incompatible`).
async fn map_table(
    cfg: &Config,
    meta: &tokio_postgres::Client,
    registry: &RegistryClient,
    metrics: &crate::metrics::Metrics,
    out: &Out,
    schema: &str,
    table: &str,
) -> anyhow::Result<TableState> {
    let (rel, infos) = cdc::snapshot::catalog_relation(meta, schema, table).await?;
    let mut types = TypeNames::new();
    for t in &infos {
        types.insert(t);
    }
    let topic = cfg.kafka.topic_for(schema, table);
    out.sink.ensure_topics(std::slice::from_ref(&topic)).await?;
    crate::pipeline::map_relation(cfg, meta, registry, metrics, &types, &out.sink, rel, topic).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdc::pgoutput::Column;

    fn rel() -> Relation {
        let col = |name: &str| Column {
            key: name == "id",
            name: name.into(),
            type_oid: 25,
            type_modifier: -1,
        };
        Relation {
            id: 1,
            namespace: "oms".into(),
            name: "items".into(),
            replica_identity: cdc::pgoutput::ReplicaIdentity::Default,
            columns: vec![col("id"), col("price"), col("doc"), col("raw"), col("note")],
        }
    }

    #[test]
    fn a_row_survives_the_json_round_trip_and_maps_onto_a_changed_table_by_name() {
        let original: Tuple = vec![
            Value::Text(b"2".to_vec().into()),
            Value::Text(b"NaN".to_vec().into()),
            Value::UnchangedToast,
            Value::Text(vec![0xff, 0x00].into()),
            Value::Null,
        ];
        let row = Row::of(&rel(), &original);
        let json = serde_json::to_string(&row).unwrap();
        // Column order is kept in the text, and nothing pretends to be a value.
        assert!(
            json.starts_with(
                r#"{"values":{"id":"2","price":"NaN","doc":null,"raw":"ff00","note":null}"#
            ),
            "{json}"
        );
        let back: Row = serde_json::from_str(&json).unwrap();
        assert_eq!(back.tuple(&rel()).unwrap(), original);

        // The table since: `note` dropped, `added` added, columns reordered.
        let mut now = rel();
        now.columns.remove(4);
        now.columns.swap(0, 1);
        now.columns.push(Column {
            key: false,
            name: "added".into(),
            type_oid: 25,
            type_modifier: -1,
        });
        let t = back.tuple(&now).unwrap();
        assert_eq!(t[0], Value::Text(b"NaN".to_vec().into()));
        assert_eq!(t[1], Value::Text(b"2".to_vec().into()));
        assert_eq!(t[2], Value::UnchangedToast);
        assert_eq!(t[4], Value::Null);
    }

    #[test]
    fn every_reason_has_a_fix_that_points_at_replay() {
        let reasons = [
            EncodeReason::Unrepresentable {
                what: "infinity",
                target: "timestamp",
            },
            EncodeReason::PrecisionExceeded {
                precision: 5,
                scale: 2,
            },
            EncodeReason::OutOfRange { target: "int" },
            EncodeReason::NotUtf8 { len: 3 },
            EncodeReason::MultiDimArray,
            EncodeReason::NullKey,
            EncodeReason::Malformed {
                expected: "date",
                len: 3,
            },
        ];
        for r in &reasons {
            assert!(fix_for(r).contains("walbridge dlq replay"), "{r}");
        }
        assert_eq!(op_of("u"), Some(Op::Update));
        assert_eq!(op_of("x"), None);
    }
}
