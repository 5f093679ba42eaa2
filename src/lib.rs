//! walbridge: the binary's library half, so that tests and benchmarks drive the same code the
//! CLI runs.

pub mod bench;
pub mod config;
pub mod contract;
pub mod demo;
pub mod dlq;
pub mod doctor;
pub mod emit;
pub mod events;
pub mod metrics;
pub mod pipeline;
pub mod process;
pub mod process_metrics;
pub mod resume;
pub mod snapshot;
pub mod stack;
pub mod status;
pub mod tail;
pub mod telemetry;
pub mod verify;
pub mod views_bench;
