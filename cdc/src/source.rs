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

use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::conn::{ConnError, ReplicationConnection, StreamMessage};
use crate::lsn::Lsn;
use crate::pgoutput::{self, DecodeError, Message};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error("cannot decode pgoutput message at {lsn}: {source}")]
    Decode { lsn: Lsn, source: DecodeError },
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
    let options = [
        ("proto_version", "1".to_owned()),
        ("publication_names", pub_names),
        ("messages", "true".to_owned()),
    ];
    let mut stream = conn
        .start_replication(&opts.slot, opts.start, &options)
        .await?;
    tracing::info!(slot = %opts.slot, start = %opts.start, "replication started");

    let mut out = Some(out);
    let mut batch = Batch::default();
    let mut received = opts.start;
    let mut in_tx = false;
    let mut last_idle = opts.start;
    let mut tick = tokio::time::interval(opts.status_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        let current = *phase.borrow();
        if current == Phase::Done {
            let f = *flushed.borrow();
            stream.send_status(received.max(f), f, false).await?;
            tracing::info!(flushed = %f, "replication stopped");
            stream.close().await?;
            return Ok(());
        }
        // Draining stops at a transaction boundary, so a clean stop never leaves half a
        // transaction in Kafka (which a restart would send again).
        let draining = current == Phase::Drain;
        if draining && !in_tx && batch.items.is_empty() {
            out = None; // closes the channel: the pipeline finishes what it has
            tokio::select! {
                _ = phase.changed() => {}
                _ = flushed.changed() => {}
                _ = tick.tick() => {
                    let f = *flushed.borrow();
                    stream.send_status(received.max(f), f, false).await?;
                }
            }
            continue;
        }

        // Take everything already buffered without waiting, up to a batch.
        let mut reply = false;
        // While draining, read only to the end of the open transaction.
        while batch.bytes < opts.max_batch_bytes && (in_tx || !draining) {
            let Some(m) = stream.try_next()? else { break };
            handle(
                m,
                &mut batch,
                &mut received,
                &mut in_tx,
                &mut last_idle,
                &mut reply,
            )?;
        }
        if reply {
            let f = *flushed.borrow();
            stream.send_status(received, f, false).await?;
        }
        if !batch.items.is_empty() {
            let Some(tx) = out.as_ref() else {
                batch = Batch::default();
                continue;
            };
            // Wait for room downstream while keeping the server's timeout at bay.
            let permit = loop {
                tokio::select! {
                    p = tx.reserve() => break p.ok(),
                    _ = tick.tick() => {
                        let f = *flushed.borrow();
                        stream.send_status(received, f, false).await?;
                    }
                    _ = phase.changed() => {
                        if *phase.borrow() == Phase::Done {
                            break None;
                        }
                    }
                }
            };
            match permit {
                Some(p) => p.send(std::mem::take(&mut batch)),
                None => batch = Batch::default(),
            }
            continue;
        }
        if draining && !in_tx {
            continue;
        }

        tokio::select! {
            m = stream.next() => {
                let mut reply = false;
                handle(m?, &mut batch, &mut received, &mut in_tx, &mut last_idle, &mut reply)?;
                if reply {
                    let f = *flushed.borrow();
                    stream.send_status(received, f, false).await?;
                }
            }
            _ = tick.tick() => {
                let f = *flushed.borrow();
                stream.send_status(received, f, false).await?;
            }
            _ = phase.changed() => {}
        }
    }
}

fn handle(
    m: StreamMessage,
    batch: &mut Batch,
    received: &mut Lsn,
    in_tx: &mut bool,
    last_idle: &mut Lsn,
    reply: &mut bool,
) -> Result<(), SourceError> {
    match m {
        StreamMessage::XLogData {
            wal_start,
            wal_end,
            data,
        } => {
            batch.bytes += data.len();
            let msg = pgoutput::decode(data, false).map_err(|source| SourceError::Decode {
                lsn: wal_start,
                source,
            })?;
            match msg {
                Message::Begin(_) => *in_tx = true,
                Message::Commit(_) => *in_tx = false,
                _ => {}
            }
            if wal_end > *received {
                *received = wal_end;
            }
            batch.items.push(SourceItem::Data {
                lsn: wal_start,
                msg,
            });
        }
        StreamMessage::Keepalive { wal_end, reply: r } => {
            *reply |= r;
            if wal_end > *received {
                *received = wal_end;
            }
            if !*in_tx && wal_end > *last_idle {
                *last_idle = wal_end;
                batch.items.push(SourceItem::Idle(wal_end));
            }
        }
    }
    Ok(())
}
