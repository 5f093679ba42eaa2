//! Turning one row change into one Kafka record (and its tombstone): encode the key and the
//! Debezium envelope, frame both for the registry, attach the headers, register the expected ack
//! with [`Progress`], hand the record to the sink.
//!
//! Kept apart from the pipeline's stream loop so that several tasks can emit at once: the
//! stream loop, and the snapshot workers that copy chunks in parallel. Each task owns one
//! [`Emitter`] (its buffers are reused from change to change, so the hot path allocates
//! nothing of its own); the tables ([`TableState`]) and the [`Sink`] are shared read-only.
//!
//! Headers on every record (the same on its tombstone):
//!
//! | header | value |
//! |---|---|
//! | `walbridge.event_id` | `<commit LSN>:<index in transaction>` (snapshot rows: `snapshot:…`) |
//! | `walbridge.lsn`, `walbridge.txid`, `walbridge.op` | commit LSN, transaction id, `c`/`u`/`d`/`r`/`t` |
//! | `walbridge.correlation_id` | the source transaction, `<txid>:<commit LSN>` (snapshot rows: `0:<snapshot LSN>`) |
//! | `walbridge.causation_id` | the same as the correlation id: a row change has no causing event, so it names the transaction it came from |
//! | `traceparent` | W3C trace context `00-<trace id>-<span id>-01`: the trace id is a hash of commit LSN and txid (one trace per transaction), the span id another hash of them: the transaction's span, which `crate::telemetry` exports when configured, so a consumer continuing the trace hangs under it; both deterministic, so a re-delivered change carries the same ones (`walbridge.event_id` tells the changes apart) |
//! | `walbridge.schema_id` | the value's registry schema id, in decimal |
//! | `walbridge.event_type` | `<schema>.<table>.<op>`, e.g. `oms.orders.c` |
//!
//! A change that cannot be encoded (invariant 7) goes to the dead-letter topic instead
//! (`kafka.dead_letter: topic`, see [`crate::dlq`]), counted like any record by [`Progress`], so
//! its transaction is confirmed only once the dead letter is acked too; with
//! `kafka.dead_letter: stop` the encode error stops the pipeline.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use avro::{Change, EncodeError, Op, Source, TableSchema};
use cdc::Lsn;
use cdc::pgoutput::{Relation, Tuple, Value};
use cdc::progress::{Progress, Seq};
use sinks::kafka::{KafkaSink, KafkaSinkError, Record};

/// A table as the pipeline knows it after its Relation message (or the snapshot's catalog read).
pub struct TableState {
    pub rel: Relation,
    pub topic: String,
    pub schema: TableSchema,
    pub key_id: Option<u32>,
    pub value_id: u32,
    /// This table's metrics, resolved once (an event costs relaxed atomic adds).
    pub counters: crate::metrics::TableCounters,
    /// Set when the registry refused this shape and `registry.on_incompatible` is
    /// `dead_letter`: every change goes to the dead-letter topic with this reason.
    pub incompatible: Option<String>,
    /// `kafka.partition_by`: the partition comes from these columns, not from the whole key.
    pub route: Option<Route>,
}

/// How a table routed by columns (`kafka.partition_by`) picks a record's partition: murmur2 of
/// the columns' text (joined by a zero byte, which text values cannot contain) modulo the
/// topic's partitions, as the Java client would place a record keyed by that text. With
/// primary-key (and replica-identity) routing columns every record of a key, its
/// delete and tombstone included, goes to one partition, and per-key order holds. Other columns
/// need `REPLICA IDENTITY FULL`, and a change of their value moves the row (a delete to the old
/// partition, a create to the new one).
pub struct Route {
    /// Positions in the relation's columns.
    pub columns: Vec<usize>,
    pub partitions: i32,
}

impl Route {
    /// The partition of `row`, or `None` when a routing column's value is not in it (an
    /// unchanged TOASTed value), in which case the key decides. NULL routes as a value of its
    /// own (a 0xFF byte, which no UTF-8 text holds), so a row whose routing column becomes or
    /// stops being NULL is moved like any other change of it.
    pub(crate) fn partition(&self, row: &Tuple, buf: &mut Vec<u8>) -> Option<i32> {
        buf.clear();
        for (n, &i) in self.columns.iter().enumerate() {
            if n > 0 {
                buf.push(0);
            }
            match row.get(i)? {
                Value::Text(b) | Value::Binary(b) => buf.extend_from_slice(b),
                Value::Null => buf.push(0xFF),
                Value::UnchangedToast => return None,
            }
        }
        Some(sinks::kafka::partition_for(buf, self.partitions))
    }
}

/// Where records go.
pub enum Sink {
    Kafka(KafkaSink),
    /// Encodes everything and sends nothing; every record counts as acked at once. Only the
    /// benchmark uses it, to measure walbridge's own cost without a broker's (it confirms
    /// changes nobody stored, so it is never reachable from a config file).
    Discard(Progress),
}

impl Sink {
    pub async fn send(&self, r: &Record<'_>) -> Result<(), KafkaSinkError> {
        match self {
            Sink::Kafka(k) => k.send(r).await,
            Sink::Discard(progress) => {
                std::hint::black_box((r.key, r.payload, r.headers));
                progress.ack(r.seq);
                Ok(())
            }
        }
    }

    pub async fn ensure_topics(&self, topics: &[String]) -> Result<(), KafkaSinkError> {
        match self {
            Sink::Kafka(k) => k.ensure_topics(topics).await,
            Sink::Discard(_) => Ok(()),
        }
    }

    /// The partition count of `topic`; `default` when nothing is sent.
    pub async fn partition_count(&self, topic: &str, default: i32) -> Result<i32, KafkaSinkError> {
        match self {
            Sink::Kafka(k) => k.partition_count(topic).await,
            Sink::Discard(_) => Ok(default),
        }
    }

    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaSinkError> {
        match self {
            Sink::Kafka(k) => k.flush(timeout),
            Sink::Discard(_) => Ok(()),
        }
    }
}

/// What every record of one emitting task shares.
#[derive(Clone)]
pub struct Out {
    pub sink: Arc<Sink>,
    pub progress: Progress,
    /// `source.name` in the envelope (the topic prefix, as Debezium's connector name).
    pub name: Arc<str>,
    pub db: Arc<str>,
    /// Where changes that cannot be encoded go; `None` stops instead (`kafka.dead_letter`).
    pub dead_letter: Option<DeadLetterTarget>,
}

/// The dead-letter topic and the metric that counts what goes there.
#[derive(Clone)]
pub struct DeadLetterTarget {
    pub topic: Arc<str>,
    pub counter: Arc<crate::metrics::Counter>,
}

/// The transaction (or snapshot chunk) a change belongs to.
pub struct EventMeta<'a> {
    pub seq: Seq,
    pub commit_lsn: Lsn,
    pub xid: u32,
    pub commit_ms: i64,
    /// Processing time for the envelope's `ts_ms`, read by the caller once per batch.
    pub now_ms: i64,
    pub lsn_text: &'a str,
    pub xid_text: &'a str,
    pub snapshot: bool,
}

/// Per-task buffers; see the module doc.
#[derive(Default)]
pub struct Emitter {
    key_buf: Vec<u8>,
    val_buf: Vec<u8>,
    key_frame: Vec<u8>,
    val_frame: Vec<u8>,
    /// The routing columns' text of the current change (`kafka.partition_by`).
    route_buf: Vec<u8>,
    /// The event id of the next [`emit`](Self::emit); the caller writes it (see [`id`](Self::id)).
    event_id: String,
    /// Header texts, rewritten per change into the same buffers.
    correlation_id: String,
    /// `00-<32 hex trace id>-<16 hex span id>-01`.
    traceparent: Vec<u8>,
    schema_id: String,
    event_type: String,
    /// Acks already expected for the current progress entry (see [`prepay`](Self::prepay)).
    prepaid: u64,
    /// The transaction the correlation id and trace id were last written for.
    tx_of_headers: Option<(Lsn, u32)>,
    /// (table, value schema id, op) the schema id and event type headers were written for.
    table_of_headers: Option<(u32, u32, Op)>,
}

impl Emitter {
    /// Expects `n` acks for `seq` at once, for the next [`emit`](Self::emit)s of that entry: one
    /// lock instead of one per change. [`settle`](Self::settle) returns what was not used.
    pub fn prepay(&mut self, progress: &Progress, seq: Seq, n: u64) {
        progress.expect(seq, n);
        self.prepaid += n;
    }

    /// Acks prepaid and not yet used.
    pub fn prepaid(&self) -> u64 {
        self.prepaid
    }

    /// Gives back the prepaid acks not used (before the entry is committed).
    pub fn settle(&mut self, progress: &Progress, seq: Seq) {
        progress.unexpect(seq, std::mem::take(&mut self.prepaid));
    }

    /// Sets the event id of the next change from its parts (no allocation once warmed up).
    pub fn id(&mut self, parts: std::fmt::Arguments<'_>) {
        self.event_id.clear();
        let _ = self.event_id.write_fmt(parts);
    }

    /// Encodes one change and hands it to the sink (plus a tombstone after a keyed delete).
    pub async fn emit(
        &mut self,
        out: &Out,
        t: &TableState,
        m: &EventMeta<'_>,
        op: Op,
        before: Option<&Tuple>,
        after: Option<&Tuple>,
    ) -> anyhow::Result<()> {
        if let Some(why) = &t.incompatible {
            let err = avro::EncodeError {
                table: t.schema.table().to_owned(),
                column: "(table shape)".to_owned(),
                pg_type: String::new(),
                reason: avro::EncodeReason::IncompatibleShape(why.clone()),
            };
            return self.dead_letter(out, t, m, op, before, after, err).await;
        }
        let change = Change {
            op,
            before,
            after,
            source: Source {
                name: &out.name,
                db: &out.db,
                schema: &t.rel.namespace,
                table: &t.rel.name,
                ts_ms: m.commit_ms,
                tx_id: m.xid,
                lsn: m.commit_lsn.0,
                snapshot: m.snapshot,
            },
            ts_ms: m.now_ms,
        };
        self.val_buf.clear();
        if let Err(e) = t.schema.encode_value(&change, &mut self.val_buf) {
            return self.dead_letter(out, t, m, op, before, after, e).await;
        }
        self.val_frame.clear();
        avro::frame(t.value_id, &self.val_buf, &mut self.val_frame);
        let has_key = match (t.key_id, after.or(before)) {
            (Some(kid), Some(row)) => {
                self.key_buf.clear();
                if let Err(e) = t.schema.encode_key(row, &mut self.key_buf) {
                    return self.dead_letter(out, t, m, op, before, after, e).await;
                }
                self.key_frame.clear();
                avro::frame(kid, &self.key_buf, &mut self.key_frame);
                true
            }
            _ => false,
        };
        self.write_headers(t, m, op);
        let headers: [(&str, &[u8]); 9] = [
            ("walbridge.event_id", self.event_id.as_bytes()),
            ("walbridge.lsn", m.lsn_text.as_bytes()),
            ("walbridge.txid", m.xid_text.as_bytes()),
            ("walbridge.op", op.code().as_bytes()),
            ("walbridge.correlation_id", self.correlation_id.as_bytes()),
            ("walbridge.causation_id", self.correlation_id.as_bytes()),
            ("traceparent", &self.traceparent[..]),
            ("walbridge.schema_id", self.schema_id.as_bytes()),
            ("walbridge.event_type", self.event_type.as_bytes()),
        ];
        let key = has_key.then_some(self.key_frame.as_slice());
        // Debezium's tombstone after a keyed delete lets a compacted topic forget the key.
        let tombstone = op == Op::Delete && has_key;
        // Expect before send: the ack may arrive before `send` even returns.
        let need = if tombstone { 2 } else { 1 };
        if self.prepaid >= need {
            self.prepaid -= need;
        } else {
            out.progress.expect(m.seq, need);
        }
        let partition = match (&t.route, after.or(before)) {
            (Some(r), Some(row)) => {
                // An unchanged TOASTed routing value: the old row (FULL) has it.
                let p = r
                    .partition(row, &mut self.route_buf)
                    .or_else(|| r.partition(before?, &mut self.route_buf));
                if p.is_none() {
                    tracing::warn!(table = %t.schema.table(), "a routing column's value is not in the change (unchanged TOAST); the record goes by its key's partition");
                }
                p
            }
            _ => None,
        };
        let mut record = Record {
            topic: &t.topic,
            key,
            payload: Some(&self.val_frame),
            headers: &headers,
            seq: m.seq,
            partition,
        };
        out.sink.send(&record).await?;
        if tombstone {
            record.payload = None;
            out.sink.send(&record).await?;
        }
        let key_len = key.map_or(0, <[u8]>::len);
        t.counters.produced(
            op,
            key_len * (1 + usize::from(tombstone)) + self.val_frame.len(),
        );
        Ok(())
    }
    /// Writes the per-change header texts into the reusable buffers (no allocation once warm).
    fn write_headers(&mut self, t: &TableState, m: &EventMeta<'_>, op: Op) {
        // Rewritten only when the transaction or the table changes (formatting per change was a
        // measurable cost).
        if self.tx_of_headers != Some((m.commit_lsn, m.xid)) {
            self.tx_of_headers = Some((m.commit_lsn, m.xid));
            self.correlation_id.clear();
            let _ = write!(self.correlation_id, "{}:{}", m.xid_text, m.lsn_text);
            self.traceparent.resize(55, b'0');
            self.traceparent[..3].copy_from_slice(b"00-");
            hex_into(&mut self.traceparent[3..35], trace_id(m.commit_lsn, m.xid));
            self.traceparent[35] = b'-';
            hex_into(
                &mut self.traceparent[36..52],
                u128::from(tx_span_id(m.commit_lsn, m.xid)),
            );
            self.traceparent[52..].copy_from_slice(b"-01");
        }
        if self.table_of_headers != Some((t.rel.id, t.value_id, op)) {
            self.table_of_headers = Some((t.rel.id, t.value_id, op));
            self.schema_id.clear();
            let _ = write!(self.schema_id, "{}", t.value_id);
            self.event_type.clear();
            let _ = write!(
                self.event_type,
                "{}.{}.{}",
                t.rel.namespace,
                t.rel.name,
                op.code()
            );
        }
    }

    /// Sends a change that cannot be encoded to the dead-letter topic, or fails with the
    /// reason when there is none (`kafka.dead_letter: stop`). Rare, so it may allocate.
    #[allow(clippy::too_many_arguments)]
    async fn dead_letter(
        &mut self,
        out: &Out,
        t: &TableState,
        m: &EventMeta<'_>,
        op: Op,
        before: Option<&Tuple>,
        after: Option<&Tuple>,
        err: EncodeError,
    ) -> anyhow::Result<()> {
        let Some(dlq) = &out.dead_letter else {
            return Err(anyhow::Error::new(err).context(format!(
                "change {} (commit LSN {}) cannot be encoded and kafka.dead_letter is stop: \
                 the pipeline stops here and nothing from this transaction on is confirmed. \
                 Fix the value or the column type in the source (the slot keeps the change), \
                 or set kafka.dead_letter: topic to send such changes to {}.dlq",
                self.event_id, m.lsn_text, out.name
            )));
        };
        // The key as the table's topic would have it, when the key columns encode.
        let has_key = match (t.key_id, after.or(before)) {
            (Some(kid), Some(row)) => {
                self.key_buf.clear();
                self.key_frame.clear();
                let ok = t.schema.encode_key(row, &mut self.key_buf).is_ok();
                if ok {
                    avro::frame(kid, &self.key_buf, &mut self.key_frame);
                }
                ok
            }
            _ => false,
        };
        let letter = crate::dlq::Letter::new(&self.event_id, t, m, op, before, after, &err);
        self.val_frame.clear();
        serde_json::to_writer(&mut self.val_frame, &letter)
            .context("writing a dead letter as JSON")?;
        self.write_headers(t, m, op);
        let reason = letter.reason.message.as_bytes();
        let headers: [(&str, &[u8]); 8] = [
            ("walbridge.event_id", self.event_id.as_bytes()),
            ("walbridge.lsn", m.lsn_text.as_bytes()),
            ("walbridge.txid", m.xid_text.as_bytes()),
            ("walbridge.op", op.code().as_bytes()),
            ("walbridge.correlation_id", self.correlation_id.as_bytes()),
            ("traceparent", &self.traceparent[..]),
            ("walbridge.event_type", self.event_type.as_bytes()),
            ("walbridge.dlq.reason", reason),
        ];
        tracing::warn!(
            table = %t.schema.table(),
            column = %err.column,
            event_id = %self.event_id,
            lsn = %m.lsn_text,
            reason = %err.reason,
            topic = %dlq.topic,
            "change cannot be encoded; sent to the dead-letter topic"
        );
        out.progress.expect(m.seq, 1);
        let record = Record {
            topic: &dlq.topic,
            key: has_key.then_some(self.key_frame.as_slice()),
            payload: Some(&self.val_frame),
            headers: &headers,
            seq: m.seq,
            partition: None,
        };
        out.sink.send(&record).await?;
        dlq.counter.inc();
        Ok(())
    }
}

/// A business event (see [`crate::events`]) ready to produce: the value is framed for the
/// registry (contract events) or plain JSON (outbox events naming no contract).
pub struct EventRecord<'a> {
    pub topic: &'a str,
    /// The aggregate id as UTF-8 text: one aggregate, one partition.
    pub key: &'a [u8],
    pub payload: &'a [u8],
    pub event_id: &'a str,
    /// The row change (`<commit LSN>:<index>`) or outbox row/message the event came from.
    pub causation_id: &'a str,
    /// The contract's name, e.g. `OrderPlaced` (outbox: its `event_type`).
    pub event_type: &'a str,
    pub schema_id: Option<u32>,
    /// `walbridge.op` of the triggering change (`c`/`u`/`d`; `m` for a logical message).
    pub op: &'a str,
}

/// Produces one business event with the headers every record carries, after registering the
/// ack it owes with [`Progress`] (so its transaction is confirmed only once it is acked).
/// Events are rare next to row changes, so this formats its headers afresh each time.
pub async fn send_event(out: &Out, m: &EventMeta<'_>, e: &EventRecord<'_>) -> anyhow::Result<()> {
    let correlation_id = format!("{}:{}", m.xid_text, m.lsn_text);
    let mut traceparent = *b"00-00000000000000000000000000000000-0000000000000000-01";
    hex_into(&mut traceparent[3..35], trace_id(m.commit_lsn, m.xid));
    hex_into(
        &mut traceparent[36..52],
        u128::from(tx_span_id(m.commit_lsn, m.xid)),
    );
    let schema_id = e.schema_id.map(|id| id.to_string()).unwrap_or_default();
    let mut headers: Vec<(&str, &[u8])> = vec![
        ("walbridge.event_id", e.event_id.as_bytes()),
        ("walbridge.lsn", m.lsn_text.as_bytes()),
        ("walbridge.txid", m.xid_text.as_bytes()),
        ("walbridge.op", e.op.as_bytes()),
        ("walbridge.correlation_id", correlation_id.as_bytes()),
        ("walbridge.causation_id", e.causation_id.as_bytes()),
        ("traceparent", &traceparent[..]),
        ("walbridge.event_type", e.event_type.as_bytes()),
    ];
    if e.schema_id.is_some() {
        headers.push(("walbridge.schema_id", schema_id.as_bytes()));
    } else {
        headers.push(("content-type", b"application/json"));
    }
    out.progress.expect(m.seq, 1);
    out.sink
        .send(&Record {
            topic: e.topic,
            key: Some(e.key),
            payload: Some(e.payload),
            headers: &headers,
            seq: m.seq,
            partition: None,
        })
        .await?;
    Ok(())
}

/// Sends a business event that violates its contract (or could not be evaluated) to the
/// dead-letter topic, or fails when there is none (`kafka.dead_letter: stop`).
pub async fn dead_letter_event(
    out: &Out,
    m: &EventMeta<'_>,
    letter: &crate::dlq::Letter,
    key: Option<&[u8]>,
    event_type: &str,
    causation_id: &str,
) -> anyhow::Result<()> {
    let Some(dlq) = &out.dead_letter else {
        anyhow::bail!(
            "event {} ({event_type}, commit LSN {}) is invalid and kafka.dead_letter is stop: {}. \
             Nothing from this transaction on is confirmed; fix the mapping or the contract, \
             or set kafka.dead_letter: topic",
            letter.event_id,
            m.lsn_text,
            letter.reason.message
        );
    };
    let payload = serde_json::to_vec(letter).context("writing a dead letter as JSON")?;
    let correlation_id = format!("{}:{}", m.xid_text, m.lsn_text);
    let mut traceparent = *b"00-00000000000000000000000000000000-0000000000000000-01";
    hex_into(&mut traceparent[3..35], trace_id(m.commit_lsn, m.xid));
    hex_into(
        &mut traceparent[36..52],
        u128::from(tx_span_id(m.commit_lsn, m.xid)),
    );
    let headers: [(&str, &[u8]); 9] = [
        ("walbridge.event_id", letter.event_id.as_bytes()),
        ("walbridge.lsn", m.lsn_text.as_bytes()),
        ("walbridge.txid", m.xid_text.as_bytes()),
        ("walbridge.op", letter.op.as_bytes()),
        ("walbridge.correlation_id", correlation_id.as_bytes()),
        ("walbridge.causation_id", causation_id.as_bytes()),
        ("traceparent", &traceparent[..]),
        ("walbridge.event_type", event_type.as_bytes()),
        ("walbridge.dlq.reason", letter.reason.message.as_bytes()),
    ];
    tracing::warn!(event_id = %letter.event_id, event_type, lsn = %m.lsn_text, reason = %letter.reason.message, topic = %dlq.topic, "business event violates its contract; sent to the dead-letter topic");
    out.progress.expect(m.seq, 1);
    out.sink
        .send(&Record {
            topic: &dlq.topic,
            key,
            payload: Some(&payload),
            headers: &headers,
            seq: m.seq,
            partition: None,
        })
        .await?;
    dlq.counter.inc();
    Ok(())
}

/// Lower-case hex of the low `dst.len()` nibbles of `v`, most significant first.
fn hex_into(dst: &mut [u8], mut v: u128) {
    for b in dst.iter_mut().rev() {
        *b = b"0123456789abcdef"[(v & 0xf) as usize];
        v >>= 4;
    }
}

/// 128 bits from the transaction, never zero (W3C forbids an all-zero trace id).
pub(crate) fn trace_id(commit_lsn: Lsn, xid: u32) -> u128 {
    let hi = mix(commit_lsn.0 ^ 0x5741_4c42_5249_4447);
    let lo = mix(hi ^ u64::from(xid));
    (u128::from(hi) << 64 | u128::from(lo)).max(1)
}

/// The transaction's span id: 64 bits from the transaction, never zero, independent of the
/// trace id's halves.
pub(crate) fn tx_span_id(commit_lsn: Lsn, xid: u32) -> u64 {
    mix(mix(commit_lsn.0 ^ 0x7370_616e_5f74_7821) ^ u64::from(xid).rotate_left(32)).max(1)
}

/// splitmix64's finalizer: spreads every input bit over the output.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_are_stable_per_transaction_and_differ_between_transactions() {
        let a = trace_id(Lsn(0x16B_3748), 750);
        assert_eq!(a, trace_id(Lsn(0x16B_3748), 750));
        assert_ne!(a, trace_id(Lsn(0x16B_3749), 750));
        assert_ne!(a, trace_id(Lsn(0x16B_3748), 751));
        assert_ne!(trace_id(Lsn(0), 0), 0);
        let s = tx_span_id(Lsn(0x16B_3748), 750);
        assert_eq!(s, tx_span_id(Lsn(0x16B_3748), 750));
        assert_ne!(s, tx_span_id(Lsn(0x16B_3748), 751));
        assert_ne!(s, tx_span_id(Lsn(0x16B_3749), 750));
    }

    #[test]
    fn a_null_routing_value_has_a_partition_of_its_own_and_unchanged_toast_has_none() {
        let route = Route {
            columns: vec![1],
            partitions: 3,
        };
        let mut buf = Vec::new();
        let row = |v: Value| vec![Value::Text(b"7".as_slice().into()), v];
        let text = route.partition(&row(Value::Text(b"SKU-1".as_slice().into())), &mut buf);
        assert_eq!(text, Some(sinks::kafka::partition_for(b"SKU-1", 3)));
        assert_eq!(
            route.partition(&row(Value::Null), &mut buf),
            Some(sinks::kafka::partition_for(&[0xFF], 3))
        );
        assert_eq!(route.partition(&row(Value::UnchangedToast), &mut buf), None);
    }
}
