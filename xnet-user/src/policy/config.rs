//! The `[[policies]]` rules as the config gives them.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::health::Health;

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
    Steer,
}

/// One rule. Fields left out match anything.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    /// The segment the traffic arrives in.
    pub segment: String,
    /// A group name or a prefix.
    pub source: Option<String>,
    pub destination: Option<String>,
    /// "tcp", "udp", "icmp", "icmpv6" or a protocol number.
    pub protocol: Option<Protocol>,
    /// "443" or "1024-65535".
    pub source_ports: Option<PortRange>,
    pub destination_ports: Option<PortRange>,
    pub action: Action,
    /// For `steer`: the service.
    pub service: Option<String>,
    /// For `allow`: route in this segment instead of the ingress one (inter-segment
    /// traffic is denied unless a policy allows it like this).
    pub to_segment: Option<String>,
    /// Log the rule's hits (they are counted in any case).
    #[serde(default)]
    pub log: bool,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Protocol(pub u8);

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u8),
            Name(String),
        }
        Ok(Protocol(match Raw::deserialize(d)? {
            Raw::Num(n) => n,
            Raw::Name(s) => match s.as_str() {
                "tcp" => 6,
                "udp" => 17,
                "icmp" => 1,
                "icmpv6" => 58,
                other => other.parse().map_err(|_| {
                    serde::de::Error::custom(format!(
                        "unknown protocol {other:?} (tcp, udp, icmp, icmpv6 or a number)"
                    ))
                })?,
            },
        }))
    }
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, o: &PortRange) -> bool {
        self.first <= o.first && o.last <= self.last
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u16),
            Text(String),
        }
        let bad = |s: &str| {
            serde::de::Error::custom(format!(
                "{s:?} is not a port or a range like \"1024-65535\""
            ))
        };
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(PortRange { first: n, last: n }),
            Raw::Text(s) => {
                let (a, b) = s.split_once('-').unwrap_or((&s, &s));
                let first: u16 = a.trim().parse().map_err(|_| bad(&s))?;
                let last: u16 = b.trim().parse().map_err(|_| bad(&s))?;
                if first > last {
                    return Err(bad(&s));
                }
                Ok(PortRange { first, last })
            }
        }
    }
}

/// A named set of prefixes: a VNet's subnets, an on-prem range, "internet".
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    pub prefixes: Vec<IpNet>,
}

/// A pool of firewall instances that `steer` policies send traffic through.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    /// With no healthy instance: "open" routes traffic around the firewall, "closed"
    /// drops it.
    pub failure_mode: FailureMode,
    #[serde(default)]
    pub health: Health,
    pub instances: Vec<Instance>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    Open,
    Closed,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    pub name: String,
    /// A `role = "firewall"` interface.
    pub interface: String,
    pub via: IpAddr,
}

/// The sections policy reads: the rules, the groups they name, the services they steer to.
pub struct Rules<'a> {
    pub policies: &'a [Policy],
    pub groups: &'a [Group],
    pub services: &'a [Service],
}

impl Rules<'_> {
    /// A rule's source or destination: a prefix, or the prefixes of a group.
    pub fn endpoint(&self, e: &Option<String>) -> Option<Vec<IpNet>> {
        let e = e.as_ref()?;
        match e.parse::<IpNet>() {
            Ok(n) => Some(vec![n]),
            Err(_) => self
                .groups
                .iter()
                .find(|g| &g.name == e)
                .map(|g| g.prefixes.clone()),
        }
    }
}

/// What policy needs to know of the rest of the config (the config implements it).
pub trait Names {
    fn segment_id(&self, name: &str) -> Option<u32>;
    /// An interface's segment, and whether it faces firewalls.
    fn interface(&self, name: &str) -> Option<(&str, bool)>;
}
