//! Avro for walbridge: Postgres rows to Avro in the Debezium envelope, the Confluent wire
//! format, and the schema registry (client and a built-in server).
//!
//! Everything except [`registry`] is pure computation: no network, no files. The pipeline uses
//! it like this:
//!
//! ```text
//! pgoutput Relation ─▶ TableSchema::new ─▶ register <topic>-key / <topic>-value ─▶ schema ids
//! each row change  ─▶ encode_key / encode_value ─▶ wire::frame(id, datum) ─▶ Kafka
//! ```

mod binary;
pub mod contract;
mod pgtext;
pub mod registry;
pub mod schema;
pub mod wire;

pub use registry::{RegistryClient, RegistryError, RegistryServer, RunningRegistry};
pub use schema::{
    Change, EncodeError, EncodeReason, Op, SchemaError, Source, TableSchema, TypeNames,
};
pub use wire::{WireError, frame, unframe};
