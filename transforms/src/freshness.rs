//! How fresh the views are, measured on every change a processor folds: the age of the record
//! (now minus its CreateTime, the moment walbridge's pipeline handed the event to its producer)
//! when the processor reads it, and when the epoch that holds it has been published to SQL.
//! The second is the "event produced → visible" up to the query itself; a SQL answer
//! adds its own time on top (`walbridge views bench` measures both, per probe and here).
//!
//! Counts are kept per millisecond up to [`MAX_MS`], so the percentiles of a window (the
//! difference of two snapshots) are exact to the millisecond, and [`Ages::buckets`] folds them
//! into the Prometheus buckets of `walbridge process`'s `/metrics`. The clocks are the
//! producer's and the processor's: on two hosts their skew is in the figure, and an age below
//! zero counts as zero. A change read again after a restart counts again, with its old
//! timestamp: after a crash the views are that stale until the replay is through. Duplicates
//! dropped while a partition is aligned, and changes a replay holds back at a sink's cut, are
//! not timed.

use std::sync::atomic::{AtomicU64, Ordering};

/// Ages above this many milliseconds share one overflow count.
pub const MAX_MS: usize = 10_000;

/// Counts of ages by whole millisecond, shared by the processor thread (which observes) and
/// whoever reads them (relaxed atomics: a reader may see a count a moment before its sum).
#[derive(Debug)]
pub struct AgeHistogram {
    /// Index `i` counts ages of `i` ms; the last one every age above [`MAX_MS`].
    counts: Box<[AtomicU64]>,
    sum_ms: AtomicU64,
}

impl Default for AgeHistogram {
    fn default() -> Self {
        AgeHistogram {
            counts: (0..MAX_MS + 2).map(|_| AtomicU64::new(0)).collect(),
            sum_ms: AtomicU64::new(0),
        }
    }
}

impl AgeHistogram {
    pub fn observe_ms(&self, age_ms: i64) {
        let ms = u64::try_from(age_ms).unwrap_or(0);
        let i = usize::try_from(ms).map_or(MAX_MS + 1, |m| m.min(MAX_MS + 1));
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ms.fetch_add(ms, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Ages {
        Ages {
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum_ms: self.sum_ms.load(Ordering::Relaxed),
        }
    }
}

/// The counts of an [`AgeHistogram`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ages {
    counts: Vec<u64>,
    sum_ms: u64,
}

impl Ages {
    /// What was observed after `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &Ages) -> Ages {
        Ages {
            counts: self
                .counts
                .iter()
                .enumerate()
                .map(|(i, c)| c.saturating_sub(earlier.counts.get(i).copied().unwrap_or(0)))
                .collect(),
            sum_ms: self.sum_ms.saturating_sub(earlier.sum_ms),
        }
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn sum_ms(&self) -> u64 {
        self.sum_ms
    }

    /// Nearest rank: the smallest age in ms with at least `q` of the observations at or below
    /// it; `MAX_MS + 1` stands for "above [`MAX_MS`]". None when nothing was observed.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (ms, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(ms as u64);
            }
        }
        Some(MAX_MS as u64 + 1)
    }

    /// Counts per bucket (not cumulative) for upper bounds in seconds, ascending, plus one for
    /// everything above the last bound.
    pub fn buckets(&self, bounds_s: &[f64]) -> Vec<u64> {
        let mut out = vec![0; bounds_s.len() + 1];
        for (ms, &c) in self.counts.iter().enumerate() {
            let overflow = ms > MAX_MS;
            let i = bounds_s
                .iter()
                .position(|&b| !overflow && ms as f64 <= b * 1000.0)
                .unwrap_or(bounds_s.len());
            out[i] += c;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_gives_exact_percentiles_and_prometheus_buckets() {
        let h = AgeHistogram::default();
        h.observe_ms(3_000); // before the window
        let start = h.snapshot();
        for ms in 1..=100 {
            h.observe_ms(ms);
        }
        h.observe_ms(-5); // clock skew: counts as 0
        h.observe_ms(60_000); // beyond MAX_MS
        let w = h.snapshot().since(&start);
        assert_eq!(w.count(), 102);
        assert_eq!(w.sum_ms(), 5050 + 60_000);
        assert_eq!(w.quantile(0.5), Some(50));
        assert_eq!(w.quantile(0.98), Some(99));
        assert_eq!(w.quantile(1.0), Some(MAX_MS as u64 + 1));
        assert_eq!(AgeHistogram::default().snapshot().quantile(0.5), None);
        // 0 and 1..=5 ms, 6..=50 ms, 51..=100 ms, and the 60 s one above the last bound.
        assert_eq!(w.buckets(&[0.005, 0.05, 0.1]), vec![6, 45, 50, 1]);
        // The whole history keeps the 3 s one.
        assert_eq!(
            h.snapshot().buckets(&[0.005, 0.05, 0.1, 5.0]),
            vec![6, 45, 50, 1, 1]
        );
    }
}
