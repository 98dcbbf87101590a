//! What the IKE daemon reports of its connectors (the agent's status carries it).

use serde::{Deserialize, Serialize};

/// An IPsec connector: its IKE SA and CHILD SAs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IpsecStatus {
    pub name: String,
    pub segment: String,
    pub local: String,
    pub remote: String,
    /// down, connecting, established, deleting.
    pub state: String,
    pub ike_proposal: Option<String>,
    /// NAT-T in use: IKE and ESP over UDP 4500.
    #[serde(default)]
    pub natt: bool,
    pub uptime_secs: u64,
    pub children: Vec<IpsecChildStatus>,
    pub last_error: Option<String>,
    /// IKE messages dropped (malformed, not authentic, unexpected), all connectors.
    pub dropped: u64,
    /// The longest a silent peer goes before DPD declares it dead (0: no DPD).
    #[serde(default)]
    pub dpd_bound_secs: u64,
    /// Since the agent started.
    #[serde(default)]
    pub totals: IpsecTotals,
}

/// A connector's counters since the agent started (they never go back: a rekeyed CHILD
/// SA's traffic stays counted).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct IpsecTotals {
    pub ike_rekeys: u64,
    pub child_rekeys: u64,
    /// IKE SAs closed because the peer did not answer liveness checks.
    pub dpd_failures: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub packets_out: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IpsecChildStatus {
    pub spi_in: String,
    pub spi_out: String,
    pub proposal: String,
    pub local_ts: String,
    pub remote_ts: String,
    /// In kernel XFRM (false: the kernel refused, e.g. no ESP support).
    pub installed: bool,
    /// Through the SAs, as the kernel counts (0 when not installed).
    #[serde(default)]
    pub bytes_in: u64,
    #[serde(default)]
    pub bytes_out: u64,
    #[serde(default)]
    pub packets_in: u64,
    #[serde(default)]
    pub packets_out: u64,
}
