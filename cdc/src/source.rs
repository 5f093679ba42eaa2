//! The replication reader: the one loop that reads the WAL stream.
//!
//! It runs on a single thread (a current-thread runtime of its own: cross-thread wakeups cost
//! about 30 % throughput in our probes) and does as little as it can: frame, decode pgoutput,
//! batch, hand over. Everything else happens downstream, on the other side of a bounded channel.
//!
//! Backpressure: the channel holds a few batches of at most `max_batch_bytes` each, so when the
//! pipeline stalls (broker down) the reader stops reading and TCP flow control stops the
//! walsender. While it waits it keeps sending status updates, so the server does not time the
//! connection out (`wal_sender_timeout`).
//!
//! Shutdown is in two steps so that the last flush LSN reaches the server: on `Phase::Drain` the
//! reader stops reading and closes the channel; the pipeline finishes its in-flight work; then
//! on `Phase::Done` the reader sends the final confirmed LSN and closes the connection.
//!
//! Large transactions: with `streaming` (Postgres 14+), the server sends a transaction's changes
//! while it is still in progress, once it outgrows `logical_decoding_work_mem`, instead of
//! decoding it all at commit. The reader spills them to disk ([`crate::spill`]) and, at the
//! transaction's commit, hands them on as an ordinary Begin…Commit transaction, a batch at a
//! time; an aborted transaction or subtransaction is dropped. Downstream sees the same stream
//! as with protocol 1, in commit order, and memory stays bounded however large the transaction.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::conn::{ConnError, ReplicationConnection, StreamMessage};
use crate::lsn::Lsn;
use crate::pgoutput::{self, Begin, Commit, DecodeError, Message};
use crate::spill::{Replay, Spill};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error("cannot decode pgoutput message at {lsn}: {source}")]
    Decode { lsn: Lsn, source: DecodeError },
    #[error(
        "cannot spill a streamed transaction to {dir}: {source}; check that the directory is writable and has room \
         (source.state_dir; a large transaction needs about its own size in WAL there)"
    )]
    Spill {
        dir: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub enum SourceItem {
    /// One pgoutput message; `lsn` is the WAL position it was sent at.
    Data { lsn: Lsn, msg: Message },
    /// The server has sent everything up to here and no transaction is open in the stream.
    Idle(Lsn),
}

#[derive(Debug, Default)]
pub struct Batch {
    pub items: Vec<SourceItem>,
    /// Payload bytes of the batch (what bounds memory).
    pub bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Run,
    Drain,
    Done,
}

#[derive(Debug, Clone)]
pub struct ReaderOptions {
    pub slot: String,
    pub publication: String,
    pub start: Lsn,
    pub status_interval: Duration,
    pub max_batch_bytes: usize,
    /// Ask for in-progress transactions (protocol 2, Postgres 14+), spilled to `spill_dir`.
    pub streaming: bool,
    pub spill_dir: PathBuf,
}

/// Streams from the slot until `phase` becomes `Done` or an error happens.
pub async fn run_reader(
    conn: ReplicationConnection,
    opts: ReaderOptions,
    out: mpsc::Sender<Batch>,
    mut flushed: watch::Receiver<Lsn>,
    mut phase: watch::Receiver<Phase>,
) -> Result<(), SourceError> {
    let pub_names = format!("\"{}\"", opts.publication.replace('"', "\"\""));
    let mut options = vec![
        (
            "proto_version",
            if opts.streaming { "2" } else { "1" }.to_owned(),
        ),
        ("publication_names", pub_names),
        ("messages", "true".to_owned()),
    ];
    if opts.streaming {
        options.push(("streaming", "on".to_owned()));
    }
    let spill_err = |source| SourceError::Spill {
        dir: opts.spill_dir.clone(),
        source,
    };
    let spill = Spill::new(opts.spill_dir.clone()).map_err(spill_err)?;
    let mut stream = conn
        .start_replication(&opts.slot, opts.start, &options)
        .await?;
    tracing::info!(slot = %opts.slot, start = %opts.start, streaming = opts.streaming, "replication started");

    let mut out = Some(out);
    let mut st = State {
        batch: Batch::default(),
        received: opts.start,
        in_tx: false,
        last_idle: opts.start,
        reply: false,
        in_stream: None,
        spill,
        replay: None,
    };
    let mut tick = tokio::time::interval(opts.status_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        let current = *phase.borrow();
        if current == Phase::Done {
            let f = *flushed.borrow();
            stream.send_status(st.received.max(f), f, false).await?;
            tracing::info!(flushed = %f, "replication stopped");
            stream.close().await?;
            return Ok(());
        }
        // Draining stops at a transaction boundary, so a clean stop never leaves half a
        // transaction in Kafka (which a restart would send again).
        let draining = current == Phase::Drain;
        if draining && !st.in_tx && st.batch.items.is_empty() {
            out = None; // closes the channel: the pipeline finishes what it has
            tokio::select! {
                _ = phase.changed() => {}
                _ = flushed.changed() => {}
                _ = tick.tick() => {
                    let f = *flushed.borrow();
                    stream.send_status(st.received.max(f), f, false).await?;
                }
            }
            continue;
        }

        if st.replay.is_some() {
            // A committed streamed transaction goes downstream before anything read after it.
            st.replay_some(opts.max_batch_bytes).map_err(spill_err)?;
        } else {
            // Take everything already buffered without waiting, up to a batch.
            // While draining, read only to the end of the open transaction.
            while st.batch.bytes < opts.max_batch_bytes
                && (st.in_tx || !draining)
                && st.replay.is_none()
            {
                let Some(m) = stream.try_next()? else { break };
                st.handle(m)?;
            }
        }
        if std::mem::take(&mut st.reply) {
            let f = *flushed.borrow();
            stream.send_status(st.received, f, false).await?;
        }
        if !st.batch.items.is_empty() {
            let Some(tx) = out.as_ref() else {
                st.batch = Batch::default();
                continue;
            };
            // Wait for room downstream while keeping the server's timeout at bay.
            let permit = loop {
                tokio::select! {
                    p = tx.reserve() => break p.ok(),
                    _ = tick.tick() => {
                        let f = *flushed.borrow();
                        stream.send_status(st.received, f, false).await?;
                    }
                    _ = phase.changed() => {
                        if *phase.borrow() == Phase::Done {
                            break None;
                        }
                    }
                }
            };
            match permit {
                Some(p) => p.send(std::mem::take(&mut st.batch)),
                None => st.batch = Batch::default(),
            }
            continue;
        }
        if st.replay.is_some() || (draining && !st.in_tx) {
            continue;
        }

        tokio::select! {
            m = stream.next() => {
                st.handle(m?)?;
                if std::mem::take(&mut st.reply) {
                    let f = *flushed.borrow();
                    stream.send_status(st.received, f, false).await?;
                }
            }
            _ = tick.tick() => {
                let f = *flushed.borrow();
                stream.send_status(st.received, f, false).await?;
            }
            _ = phase.changed() => {}
        }
    }
}

/// The reader's position in the stream.
struct State {
    batch: Batch,
    received: Lsn,
    /// Inside Begin…Commit (or replaying a streamed transaction): no idle positions.
    in_tx: bool,
    last_idle: Lsn,
    reply: bool,
    /// Top-level xid between StreamStart and StreamStop.
    in_stream: Option<u32>,
    spill: Spill,
    /// A committed streamed transaction being handed on, and its commit.
    replay: Option<(Replay, Commit)>,
}

impl State {
    fn handle(&mut self, m: StreamMessage) -> Result<(), SourceError> {
        match m {
            StreamMessage::XLogData {
                wal_start,
                wal_end,
                data,
            } => {
                if wal_end > self.received {
                    self.received = wal_end;
                }
                let raw = data.clone();
                let msg = pgoutput::decode(data, self.in_stream.is_some()).map_err(|source| {
                    SourceError::Decode {
                        lsn: wal_start,
                        source,
                    }
                })?;
                match msg {
                    Message::StreamStart { xid, .. } => self.in_stream = Some(xid),
                    Message::StreamStop => self.in_stream = None,
                    Message::StreamAbort { xid, subxid } => {
                        self.spill
                            .abort(xid, subxid)
                            .map_err(|e| self.spill_error(e))?;
                    }
                    Message::StreamCommit { xid, commit } => {
                        let Commit {
                            commit_lsn,
                            commit_ts,
                            ..
                        } = commit;
                        self.push(
                            commit_lsn,
                            0,
                            Message::Begin(Begin {
                                final_lsn: commit_lsn,
                                commit_ts,
                                xid,
                            }),
                        );
                        match self.spill.take(xid).map_err(|e| self.spill_error(e))? {
                            Some(replay) => {
                                tracing::debug!(
                                    xid,
                                    bytes = replay.bytes,
                                    "streamed transaction committed"
                                );
                                self.in_tx = true;
                                self.replay = Some((replay, commit));
                            }
                            None => self.push(commit_lsn, 0, Message::Commit(commit)),
                        }
                    }
                    msg => match self.in_stream {
                        Some(top) => {
                            let sub = msg.stream_xid().unwrap_or(top);
                            self.spill
                                .append(top, sub, &raw)
                                .map_err(|e| self.spill_error(e))?;
                        }
                        None => {
                            match msg {
                                Message::Begin(_) => self.in_tx = true,
                                Message::Commit(_) => self.in_tx = false,
                                _ => {}
                            }
                            self.push(wal_start, raw.len(), msg);
                        }
                    },
                }
            }
            StreamMessage::Keepalive { wal_end, reply } => {
                self.reply |= reply;
                if wal_end > self.received {
                    self.received = wal_end;
                }
                // Safe also while a transaction is being streamed: it has not committed, so
                // a restart from here streams it again from its start.
                if !self.in_tx && wal_end > self.last_idle {
                    self.last_idle = wal_end;
                    self.batch.items.push(SourceItem::Idle(wal_end));
                }
            }
        }
        Ok(())
    }

    fn spill_error(&self, source: std::io::Error) -> SourceError {
        SourceError::Spill {
            dir: self.spill.dir().to_owned(),
            source,
        }
    }

    fn push(&mut self, lsn: Lsn, bytes: usize, msg: Message) {
        self.batch.bytes += bytes;
        self.batch.items.push(SourceItem::Data { lsn, msg });
    }

    /// Moves up to a batch of the streamed transaction being replayed into the batch; its
    /// Commit after the last change.
    fn replay_some(&mut self, max_bytes: usize) -> std::io::Result<()> {
        let Some((mut replay, commit)) = self.replay.take() else {
            return Ok(());
        };
        let at = commit.commit_lsn;
        while self.batch.bytes < max_bytes {
            let Some(raw) = replay.next_message()? else {
                self.in_tx = false;
                self.push(at, 0, Message::Commit(commit));
                return Ok(());
            };
            let len = raw.len();
            let msg = pgoutput::decode(raw, true)
                .map_err(|e| std::io::Error::other(format!("re-reading a spilled change: {e}")))?;
            self.push(at, len, msg);
        }
        self.replay = Some((replay, commit));
        Ok(())
    }
}
