//! The xnet agent as a library: the binary (`xnet`) is built on it; the lab (`xnet-lab`:
//! tests, demo, benchmarks) uses it from outside.
pub mod agent;
pub mod bfd;
pub mod bgp;
pub mod cluster;
pub mod config;
pub mod config_diff;
pub mod dataplane;
pub mod fastmap;
pub mod flows;
pub mod health;
pub mod ike;
pub mod kernel;
pub mod lpm;
pub mod maglev;
pub mod metrics;
pub mod nexthop_groups;
pub mod peer_config;
pub mod policy;
pub mod restart;
pub mod routing;
pub mod status;
#[cfg(test)]
mod testutil;
pub mod top;
pub mod wire;
