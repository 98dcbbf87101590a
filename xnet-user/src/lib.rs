//! The xnet agent as a library: the binary (`xnet`), the tests and the benchmarks share it.
pub mod agent;
pub mod bench;
pub mod bench_bgp;
pub mod bench_fwd;
pub mod bench_ike;
pub mod bgp;
pub mod charon;
pub mod config;
pub mod dataplane;
pub mod demo;
pub mod fastmap;
pub mod health;
pub mod ike;
pub mod kernel;
pub mod lab;
pub mod lpm;
pub mod peer_config;
pub mod policy;
pub mod restart;
pub mod routing;
pub mod status;
#[cfg(test)]
mod testutil;
