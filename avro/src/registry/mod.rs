//! Schema registry: the only network I/O in this crate.
//!
//! - [`server`]: walbridge's own Confluent-compatible registry (the REST API producers,
//!   consumers and tools use), durable across restarts, for environments without one; its
//!   rules and log are in `store`, Avro compatibility checking in [`compat`].
//! - [`client`]: registers schemas and fetches them by id from any Confluent-compatible
//!   registry, built on `schema_registry_converter`.

pub mod client;
pub mod compat;
pub mod server;
mod store;

use std::path::PathBuf;

use schema_registry_converter::error::SRCError;

use crate::wire::WireError;

pub use client::RegistryClient;
pub use compat::CompatibilityLevel;
pub use server::{RegistryServer, RunningRegistry, basic_auth, serve};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("schema registry storage {path}: {source}; check the directory exists and is writable")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "schema registry log {path} is corrupt at line {line}: {reason}; restore the file from a \
         backup (only a torn last line is repaired automatically)"
    )]
    Corrupt {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("schema registry server stopped with an error: {0}")]
    Serve(#[source] std::io::Error),
    #[error("schema registry request ({what}) failed: {source}")]
    Request {
        what: String,
        #[source]
        source: SRCError,
    },
    #[error("schema {id} from the registry is not a valid Avro schema: {source}")]
    InvalidSchema {
        id: u32,
        #[source]
        source: Box<apache_avro::Error>,
    },
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("message with schema id {id} does not decode with that schema: {reason}")]
    Decode { id: u32, reason: String },
}

impl RegistryError {
    /// Whether retrying later may succeed (registry unreachable or overloaded), as opposed to a
    /// problem with the data or the request itself.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Request { source, .. } => source.retriable,
            RegistryError::Io { .. } | RegistryError::Serve(_) => true,
            _ => false,
        }
    }
}
