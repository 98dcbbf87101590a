//! Flow export over IPFIX: XDP samples one packet in N per segment into a ring buffer
//! (`xnet-ebpf/src/flows.rs`); `exporter` reads the samples, `cache` aggregates them into
//! flow records, `ipfix` encodes the records for the collectors of `[flows]`.

pub mod cache;
pub mod config;
pub mod exporter;
pub mod ipfix;
