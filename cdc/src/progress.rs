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
//!
//! Observability: a transaction opened with [`Progress::begin_at`] carries its commit time, so
//! the tracker can say how old the oldest unconfirmed commit is (the lag behind the source) and
//! report each confirmed commit to an [`on_confirm`](Progress::on_confirm) hook (commit→ack
//! latency). Neither affects what is confirmed.

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
    /// Commit time in Unix ms; 0 for positions and entries opened without one.
    commit_ms: i64,
}

#[derive(Debug)]
struct State {
    front_seq: Seq,
    entries: VecDeque<Entry>,
    confirmed: Lsn,
    failed: Option<String>,
}

/// Told the commit time (Unix ms) of every transaction as it becomes confirmed. It runs under
/// the tracker's lock, on whichever thread acked: keep it to a few atomic operations.
type ConfirmHook = Arc<dyn Fn(i64) + Send + Sync>;

/// Shared by the pipeline (which registers transactions and changes) and the sinks' delivery
/// callbacks (which ack). Cheap to clone.
#[derive(Clone)]
pub struct Progress {
    state: Arc<Mutex<State>>,
    tx: Arc<watch::Sender<Lsn>>,
    on_confirm: Option<ConfirmHook>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("state", &self.state)
            .field("on_confirm", &self.on_confirm.is_some())
            .finish()
    }
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
                on_confirm: None,
            },
            rx,
        )
    }

    /// Calls `hook` with the commit time of every transaction opened with
    /// [`begin_at`](Self::begin_at) when it becomes confirmed. Set it before cloning: clones made
    /// earlier do not call it.
    pub fn on_confirm(mut self, hook: impl Fn(i64) + Send + Sync + 'static) -> Progress {
        self.on_confirm = Some(Arc::new(hook));
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the counters half-updated in a way that
        // confirms too much: every method updates one counter then retires. Keep going.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens an entry for a transaction; its changes follow with [`expect`](Self::expect).
    pub fn begin(&self) -> Seq {
        self.begin_at(0)
    }

    /// [`begin`](Self::begin) for a transaction committed at `commit_ms` (Unix ms), which then
    /// counts for [`oldest_pending_commit_ms`](Self::oldest_pending_commit_ms) and the confirm hook.
    pub fn begin_at(&self, commit_ms: i64) -> Seq {
        let mut s = self.lock();
        s.entries.push_back(Entry {
            pending: 0,
            end: None,
            commit_ms,
        });
        s.front_seq + s.entries.len() as u64 - 1
    }

    /// Commit time of the oldest transaction not yet confirmed (`None` when all are): how far
    /// the sinks are behind the source.
    pub fn oldest_pending_commit_ms(&self) -> Option<i64> {
        // Positions retire as soon as they reach the front, so the first timed entry is near it.
        self.lock()
            .entries
            .iter()
            .map(|e| e.commit_ms)
            .find(|&ms| ms != 0)
    }

    /// One more change of transaction `seq` has been handed to a sink and awaits its ack.
    pub fn expect(&self, seq: Seq, n: u64) {
        let mut s = self.lock();
        let i = (seq - s.front_seq) as usize;
        if let Some(e) = s.entries.get_mut(i) {
            e.pending += n;
        }
    }

    /// Takes back `n` of the changes expected for `seq` that were never sent (a caller that
    /// expects in blocks, to take the lock once per block, returns the unused rest before
    /// committing). Pending never drops below what is really unacked, so nothing retires early.
    pub fn unexpect(&self, seq: Seq, n: u64) {
        let mut s = self.lock();
        if seq < s.front_seq {
            return;
        }
        let i = (seq - s.front_seq) as usize;
        if let Some(e) = s.entries.get_mut(i) {
            e.pending = e.pending.saturating_sub(n);
        }
        self.retire(&mut s);
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
                    if let (Some(hook), ms) = (&self.on_confirm, front.commit_ms)
                        && ms != 0
                    {
                        hook(ms);
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
    fn expecting_in_blocks_never_confirms_before_the_last_real_ack() {
        let (p, _rx) = Progress::new(Lsn(0));
        let a = p.begin();
        p.expect(a, 1024); // a block, of which 3 are used
        p.ack(a);
        p.ack(a);
        p.unexpect(a, 1021);
        p.commit(a, Lsn(70));
        assert_eq!(p.confirmed(), Lsn(0), "one sent change is still unacked");
        p.ack(a);
        assert_eq!(p.confirmed(), Lsn(70));
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
    fn commit_times_give_the_lag_and_reach_the_hook_once_confirmed() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let hook_seen = seen.clone();
        let (p, _rx) = Progress::new(Lsn(0));
        let p = p.on_confirm(move |ms| hook_seen.lock().unwrap().push(ms));
        assert_eq!(p.oldest_pending_commit_ms(), None);
        let a = p.begin_at(1_000);
        p.expect(a, 1);
        p.commit(a, Lsn(100));
        let b = p.begin_at(2_000);
        p.expect(b, 1);
        p.commit(b, Lsn(200));
        p.mark(Lsn(250));
        assert_eq!(p.oldest_pending_commit_ms(), Some(1_000));
        p.ack(b); // out of order: b waits behind a, so nothing is reported yet
        assert!(seen.lock().unwrap().is_empty());
        p.ack(a);
        assert_eq!(*seen.lock().unwrap(), [1_000, 2_000]);
        assert_eq!(p.oldest_pending_commit_ms(), None);
    }

    #[test]
    fn confirmed_never_moves_backwards() {
        let (p, _rx) = Progress::new(Lsn(1000));
        p.mark(Lsn(900));
        assert_eq!(p.confirmed(), Lsn(1000));
    }
}
