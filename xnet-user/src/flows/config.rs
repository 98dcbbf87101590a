//! `[flows]`: where flow records go and when.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Flows {
    /// IPFIX collectors (UDP), e.g. ["192.0.2.10:4739"].
    pub collectors: Vec<SocketAddr>,
    /// A flow with no sampled packet for this long is finished and exported.
    #[serde(default = "idle")]
    pub idle_timeout_secs: u64,
    /// A long-lived flow is exported at least this often.
    #[serde(default = "active")]
    pub active_timeout_secs: u64,
    /// The IPFIX Observation Domain ID in every message (one per CXP host, say).
    #[serde(default = "domain")]
    pub observation_domain: u32,
    /// Your organisation's IANA Private Enterprise Number: with it, records carry the
    /// policy rule they matched in an enterprise-specific element (id 1, unsigned32,
    /// rule index + 1). Without it that element is left out.
    #[serde(default)]
    pub enterprise_number: Option<u32>,
    /// Flows held at once; samples of new flows beyond it are counted as lost.
    #[serde(default = "max_flows")]
    pub max_flows: usize,
}

fn idle() -> u64 {
    15
}
fn active() -> u64 {
    60
}
fn domain() -> u32 {
    1
}
fn max_flows() -> usize {
    65_536
}

impl Flows {
    /// Errors as (field under `flows.`, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.collectors.is_empty() {
            return Err(("collectors".into(), "at least one collector".into()));
        }
        if self.idle_timeout_secs == 0 || self.active_timeout_secs == 0 {
            return Err((
                "idle_timeout_secs".into(),
                "timeouts must be at least 1 second".into(),
            ));
        }
        if self.enterprise_number == Some(0) {
            return Err((
                "enterprise_number".into(),
                "0 is IANA's reserved number: use your organisation's PEN".into(),
            ));
        }
        if self.max_flows == 0 {
            return Err(("max_flows".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}
