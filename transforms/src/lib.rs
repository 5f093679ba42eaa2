//! Stream processors and the live views they keep (issue 5).
//!
//! [`view`] is the contract between the processors (which fold change events into keyed state
//! and publish epochs), the SQL endpoint (which serves the latest snapshot of each view) and the
//! view sinks (which apply each epoch's changes downstream).

pub mod sql;
pub mod view;
