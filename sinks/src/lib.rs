//! Where walbridge's events go. Every sink keeps the same contract:
//!
//! - **at-least-once**: a change is acked to [`cdc::progress::Progress`] only once the sink has
//!   stored it durably; after a crash, un-acked changes are sent again, so duplicates are
//!   possible and carry the same event id;
//! - **order per key**: changes with the same key are stored in the order they were given;
//! - **progress only on durable write**: an ack is never sent early, and a change that cannot be
//!   stored is reported as a failure, never dropped.

//!
//! [`views`] holds the sinks of the processors' live views (Kafka compacted topics, Postgres
//! read-model tables, Parquet files), each with its delivery guarantee in its module doc.

pub mod kafka;
pub mod views;
