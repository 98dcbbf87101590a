//! The `[bgp]` section as the config gives it.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Bgp {
    pub asn: u32,
    pub router_id: std::net::Ipv4Addr,
    /// TCP port to listen on and to connect to.
    #[serde(default = "default_bgp_port")]
    pub port: u16,
    /// Equal paths installed together (ECMP width).
    #[serde(default = "default_multipath")]
    pub multipath: usize,
    /// Graceful restart (RFC 4724): keep a restarting peer's routes, and restart the
    /// agent (SIGUSR1, then start it again) without peers dropping ours or traffic
    /// stopping.
    #[serde(default = "default_true")]
    pub graceful_restart: bool,
    /// Seconds peers keep our routes while the agent restarts; also how long a restarted
    /// agent waits for its peers' End-of-RIB before it selects routes anyway.
    #[serde(default = "default_restart_time")]
    pub restart_time: u16,
    #[serde(default)]
    pub neighbors: Vec<Neighbor>,
}

fn default_true() -> bool {
    true
}
fn default_restart_time() -> u16 {
    120
}

fn default_bgp_port() -> u16 {
    179
}
fn default_multipath() -> usize {
    1
}
fn default_hold_time() -> u16 {
    90
}

/// What a neighbour is sent.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Advertise {
    #[default]
    None,
    /// A default route (0.0.0.0/0 or ::/0): greenfield connectors.
    Default,
    /// The `prefixes` listed: brownfield connectors.
    Custom,
    /// Every route of the segment (static and learned).
    All,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Neighbor {
    pub name: String,
    pub segment: String,
    /// The peer's address: IPv4 sessions carry IPv4 routes, IPv6 sessions IPv6 routes.
    pub address: IpAddr,
    pub remote_asn: u32,
    /// Wait for the peer to connect.
    #[serde(default)]
    pub passive: bool,
    #[serde(default = "default_hold_time")]
    pub hold_time: u16,
    #[serde(default)]
    pub advertise: Advertise,
    #[serde(default)]
    pub prefixes: Vec<IpNet>,
    /// Tear the session down (NOTIFICATION Cease 1) when the peer announces more.
    pub max_prefixes: Option<usize>,
    /// Log a warning when the peer announces more (the session stays).
    pub warn_prefixes: Option<usize>,
    /// Ignore routes from this external peer whose AS_PATH does not start with its AS
    /// (RFC 4271 §6.3). Off only for a route server that does not prepend its own AS.
    #[serde(default = "default_true")]
    pub enforce_first_as: bool,
    /// TCP-MD5 (RFC 2385) password: a file whose first line it is, or an environment
    /// variable. The config never holds the password itself.
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    /// Our address for the session (eBGP multihop from a loopback, say).
    pub local_address: Option<IpAddr>,
    /// BFD to the neighbour: its session going down takes the BGP session down at once
    /// (RFC 5882 §4.3) instead of after the hold time.
    #[serde(default, deserialize_with = "crate::bfd::config::setting")]
    pub bfd: Option<crate::bfd::config::Bfd>,
    /// What is accepted from the peer, and how it is changed.
    #[serde(default)]
    pub import: super::policy::Import,
    /// How what we send is changed.
    #[serde(default)]
    pub export: super::policy::Export,
}
