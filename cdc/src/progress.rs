//! Which LSN may be confirmed to Postgres. This module keeps invariant 1: the flush LSN sent to
//! the server never passes a change that is not durably acked by every sink it goes to.
//!
//! ```text
//!   pipeline (in commit order)            sinks (acks in any order, any thread)
//!   begin()  -> seq 7 ─┐
//!   expect(7) x3       │   entries: [ 7: pending 3, end ? ]
//!   commit(7, end=A)   │   entries: [ 7: pending 3, end A ] [ 8: pending 1, end B ] ...
//!                      └── ack(7) x3 ──▶ front entry has pending 0 and an end ──▶ confirmed = A
//! ```
//!
//! Why this is right: Postgres re-sends, after a restart, every transaction whose commit ends
//! after the confirmed flush LSN. Entries are created in commit order (the order pgoutput sends
//! transactions) and only the *front* entry may be retired, so `confirmed` is always the end LSN
//! of a commit whose changes, and those of every earlier commit, are all acked. A commit that is
//! acked out of order waits behind the earlier ones. A change that was never acked (crash,
//! delivery failure) keeps its entry at the front forever, so its commit and everything after it
//! is streamed again after a restart: at-least-once, with duplicates limited to the un-acked
//! window. Duplicates are recognisable by their deterministic event id (commit LSN, position).
//!
//! Positions with no changes (a keepalive's WAL end when nothing is in flight, a heartbeat
//! message) are entered as empty entries in the same order: they are confirmed only once all
//! earlier transactions are acked, which lets an idle slot advance (invariant 6) without ever
//! jumping over pending work. Such a position is safe to confirm because pgoutput sends a
//! transaction only at its commit, so every transaction committed before the position has
//! already been handed to the pipeline before the position itself.
//!
//! `confirmed` never moves backwards: entries are retired in order and their end LSNs are
//! non-decreasing; a smaller end (which Postgres never sends) is ignored.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::lsn::Lsn;

/// Identifies one transaction (or position) in the tracker.
pub type Seq = u64;

#[derive(Debug)]
struct Entry {
    pending: u64,
    end: Option<Lsn>,
}

#[derive(Debug)]
struct State {
    front_seq: Seq,
    entries: VecDeque<Entry>,
    confirmed: Lsn,
    failed: Option<String>,
}

/// Shared by the pipeline (which registers transactions and changes) and the sinks' delivery
/// callbacks (which ack). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Progress {
    state: Arc<Mutex<State>>,
    tx: Arc<watch::Sender<Lsn>>,
}

impl Progress {
    /// Starts from the slot's confirmed flush LSN.
    pub fn new(start: Lsn) -> (Progress, watch::Receiver<Lsn>) {
        let (tx, rx) = watch::channel(start);
        let state = State {
            front_seq: 0,
            entries: VecDeque::new(),
            confirmed: start,
            failed: None,
        };
        (
            Progress {
                state: Arc::new(Mutex::new(state)),
                tx: Arc::new(tx),
            },
            rx,
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the counters half-updated in a way that
        // confirms too much: every method updates one counter then retires. Keep going.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens an entry for a transaction; its changes follow with [`expect`](Self::expect).
    pub fn begin(&self) -> Seq {
        let mut s = self.lock();
        s.entries.push_back(Entry {
            pending: 0,
            end: None,
        });
        s.front_seq + s.entries.len() as u64 - 1
    }

    /// One more change of transaction `seq` has been handed to a sink and awaits its ack.
    pub fn expect(&self, seq: Seq, n: u64) {
        let mut s = self.lock();
        let i = (seq - s.front_seq) as usize;
        if let Some(e) = s.entries.get_mut(i) {
            e.pending += n;
        }
    }

    /// All changes of `seq` have been handed over; it ends at `end`.
    pub fn commit(&self, seq: Seq, end: Lsn) {
        let mut s = self.lock();
        let i = (seq - s.front_seq) as usize;
        if let Some(e) = s.entries.get_mut(i) {
            e.end = Some(end);
        }
        self.retire(&mut s);
    }

    /// A position with nothing to ack (keepalive, heartbeat): confirmable once all before it is.
    pub fn mark(&self, at: Lsn) {
        let seq = self.begin();
        self.commit(seq, at);
    }

    /// A sink durably stored one change of `seq`.
    pub fn ack(&self, seq: Seq) {
        let mut s = self.lock();
        if seq < s.front_seq {
            return;
        }
        let i = (seq - s.front_seq) as usize;
        if let Some(e) = s.entries.get_mut(i) {
            e.pending = e.pending.saturating_sub(1);
        }
        self.retire(&mut s);
    }

    /// A sink could not store a change of `seq` for good. Progress stops there for this run; the
    /// pipeline learns it from [`failure`](Self::failure) and stops, and the transaction is
    /// streamed again on the next start.
    pub fn fail(&self, reason: String) {
        let mut s = self.lock();
        s.failed.get_or_insert(reason);
    }

    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    pub fn confirmed(&self) -> Lsn {
        self.lock().confirmed
    }

    /// Whether every change of `seq` is acked and it has been committed (whether or not entries
    /// before it are). The snapshot uses it to record which chunks are safely in the sinks.
    pub fn is_done(&self, seq: Seq) -> bool {
        let s = self.lock();
        if seq < s.front_seq {
            return true;
        }
        s.entries
            .get((seq - s.front_seq) as usize)
            .is_some_and(|e| e.pending == 0 && e.end.is_some())
    }

    /// Number of transactions (and positions) not yet confirmed.
    pub fn in_flight(&self) -> usize {
        self.lock().entries.len()
    }

    fn retire(&self, s: &mut State) {
        if s.failed.is_some() {
            return;
        }
        let before = s.confirmed;
        while let Some(front) = s.entries.front() {
            match front.end {
                Some(end) if front.pending == 0 => {
                    if end > s.confirmed {
                        s.confirmed = end;
                    }
                    s.entries.pop_front();
                    s.front_seq += 1;
                }
                _ => break,
            }
        }
        if s.confirmed != before {
            self.tx.send_replace(s.confirmed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_acks_confirm_only_the_acked_prefix() {
        let (p, rx) = Progress::new(Lsn(10));
        let a = p.begin();
        p.expect(a, 2);
        p.commit(a, Lsn(100));
        let b = p.begin();
        p.expect(b, 1);
        p.commit(b, Lsn(200));
        p.ack(b); // later commit acked first: nothing may be confirmed yet
        assert_eq!(p.confirmed(), Lsn(10));
        p.ack(a);
        assert_eq!(
            p.confirmed(),
            Lsn(10),
            "one change of the first commit is still pending"
        );
        p.ack(a);
        assert_eq!(p.confirmed(), Lsn(200));
        assert_eq!(*rx.borrow(), Lsn(200));
        assert_eq!(p.in_flight(), 0);
    }

    #[test]
    fn a_chunk_is_done_when_its_own_changes_are_acked_whatever_came_before() {
        let (p, _rx) = Progress::new(Lsn(0));
        let a = p.begin();
        p.expect(a, 1);
        let b = p.begin();
        p.expect(b, 1);
        p.commit(b, Lsn(50));
        assert!(!p.is_done(b), "not acked yet");
        p.ack(b);
        assert!(
            p.is_done(b),
            "acked and committed, though entry a is still open"
        );
        assert!(!p.is_done(a), "a has neither its ack nor its commit");
        p.ack(a);
        assert!(
            !p.is_done(a),
            "acked but not committed: more changes may follow"
        );
        p.commit(a, Lsn(50));
        assert!(p.is_done(a) && p.is_done(b));
        assert_eq!(p.confirmed(), Lsn(50));
    }

    #[test]
    fn an_open_transaction_holds_back_later_positions() {
        let (p, _rx) = Progress::new(Lsn(0));
        let a = p.begin();
        p.expect(a, 1);
        p.ack(a); // acked, but the commit has not been seen yet
        p.mark(Lsn(500));
        assert_eq!(p.confirmed(), Lsn(0));
        p.commit(a, Lsn(300));
        assert_eq!(p.confirmed(), Lsn(500));
    }

    #[test]
    fn a_failure_freezes_progress() {
        let (p, _rx) = Progress::new(Lsn(0));
        let a = p.begin();
        p.expect(a, 1);
        p.commit(a, Lsn(100));
        p.fail("message too large".into());
        p.ack(a);
        assert_eq!(p.confirmed(), Lsn(0));
        assert_eq!(p.failure().as_deref(), Some("message too large"));
    }

    #[test]
    fn confirmed_never_moves_backwards() {
        let (p, _rx) = Progress::new(Lsn(1000));
        p.mark(Lsn(900));
        assert_eq!(p.confirmed(), Lsn(1000));
    }
}
