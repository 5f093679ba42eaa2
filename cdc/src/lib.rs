//! Postgres logical replication source for walbridge.
//!
//! Knows Postgres and nothing else: no Avro, no Kafka. The reader ([`source`]) hands decoded
//! pgoutput messages downstream in batches; the sinks tell [`progress`] what is durable, and the
//! reader confirms that LSN to the server.

pub mod conn;
pub mod lsn;
pub mod pgoutput;
pub mod position;
pub mod progress;
pub mod slot;
pub mod snapshot;
pub mod source;
pub mod spill;
pub mod tls;

pub use lsn::Lsn;
