//! Turning one row change into one Kafka record (and its tombstone): encode the key and the
//! Debezium envelope, frame both for the registry, attach the headers, register the expected ack
//! with [`Progress`], hand the record to the sink.
//!
//! Kept apart from the pipeline's stream loop so that several tasks can emit at once: the
//! stream loop, and the snapshot workers that copy chunks in parallel. Each task owns one
//! [`Emitter`] (its buffers are reused from change to change, so the hot path allocates
//! nothing of its own); the tables ([`TableState`]) and the [`Sink`] are shared read-only.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use avro::{Change, Op, Source, TableSchema};
use cdc::Lsn;
use cdc::pgoutput::{Relation, Tuple};
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
    /// The event id of the next [`emit`](Self::emit); the caller writes it (see [`id`](Self::id)).
    event_id: String,
}

impl Emitter {
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
        t.schema
            .encode_value(&change, &mut self.val_buf)
            .with_context(|| format!("encoding a change of {}", t.topic))?;
        self.val_frame.clear();
        avro::frame(t.value_id, &self.val_buf, &mut self.val_frame);
        let has_key = match (t.key_id, after.or(before)) {
            (Some(kid), Some(row)) => {
                self.key_buf.clear();
                t.schema.encode_key(row, &mut self.key_buf)?;
                self.key_frame.clear();
                avro::frame(kid, &self.key_buf, &mut self.key_frame);
                true
            }
            _ => false,
        };
        let headers: [(&str, &[u8]); 4] = [
            ("walbridge.event_id", self.event_id.as_bytes()),
            ("walbridge.lsn", m.lsn_text.as_bytes()),
            ("walbridge.txid", m.xid_text.as_bytes()),
            ("walbridge.op", op.code().as_bytes()),
        ];
        let key = has_key.then_some(self.key_frame.as_slice());
        // Debezium's tombstone after a keyed delete lets a compacted topic forget the key.
        let tombstone = op == Op::Delete && has_key;
        // Expect before send: the ack may arrive before `send` even returns.
        out.progress.expect(m.seq, if tombstone { 2 } else { 1 });
        let mut record = Record {
            topic: &t.topic,
            key,
            payload: Some(&self.val_frame),
            headers: &headers,
            seq: m.seq,
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
}
