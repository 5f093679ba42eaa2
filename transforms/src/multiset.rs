//! An ordered multiset: the state behind MIN/MAX aggregates that must retract.
//!
//! A running max cannot "un-see" a value: when the current maximum is retracted, the next one
//! must be known. Keeping every value with its multiplicity in a `BTreeMap` gives O(log n)
//! insert/retract and O(log n) min/max, and a value leaves only when its count reaches zero.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MultiSet<T: Ord> {
    counts: BTreeMap<T, u64>,
    len: u64,
}

impl<T: Ord + Clone> MultiSet<T> {
    pub fn new() -> Self {
        Self {
            counts: BTreeMap::new(),
            len: 0,
        }
    }

    /// Adds `v` with weight `w` (+1 insert, −1 retract). Returns false when a retraction finds
    /// fewer copies than it removes (the input was not a valid change stream); the multiset then
    /// holds none of `v`.
    pub fn update(&mut self, v: &T, w: i64) -> bool {
        if w >= 0 {
            *self.counts.entry(v.clone()).or_insert(0) += w as u64;
            self.len += w as u64;
            return true;
        }
        let take = w.unsigned_abs();
        match self.counts.get_mut(v) {
            Some(c) if *c > take => {
                *c -= take;
                self.len -= take;
                true
            }
            Some(c) => {
                let ok = *c == take;
                self.len -= *c;
                self.counts.remove(v);
                ok
            }
            None => false,
        }
    }

    pub fn min(&self) -> Option<&T> {
        self.counts.keys().next()
    }

    pub fn max(&self) -> Option<&T> {
        self.counts.keys().next_back()
    }

    /// Each value with its count, largest first.
    pub fn iter_desc(&self) -> impl Iterator<Item = (&T, u64)> {
        self.counts.iter().rev().map(|(v, n)| (v, *n))
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_and_min_survive_retracting_the_extreme() {
        let mut m = MultiSet::new();
        for v in [5, 9, 9, 1] {
            m.update(&v, 1);
        }
        assert_eq!((m.min(), m.max(), m.len()), (Some(&1), Some(&9), 4));
        m.update(&9, -1);
        assert_eq!(m.max(), Some(&9), "one copy of 9 is still there");
        m.update(&9, -1);
        assert_eq!(m.max(), Some(&5));
        m.update(&1, -1);
        assert_eq!(m.min(), Some(&5));
        m.update(&5, -1);
        assert!(m.is_empty());
        assert_eq!((m.min(), m.max()), (None, None));
    }

    #[test]
    fn over_retraction_is_reported_not_hidden() {
        let mut m = MultiSet::new();
        m.update(&3, 1);
        assert!(!m.update(&3, -2));
        assert!(m.is_empty());
        assert!(!m.update(&7, -1));
    }
}
