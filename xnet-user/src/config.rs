//! The declarative TOML config: segments, interfaces, static routes and the agent's own
//! settings. `Config::load` parses and validates everything before anything is applied;
//! every error names the file, the field and the reason.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use xnet_common::MAX_ECMP;

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentSettings,
    #[serde(default)]
    pub segments: Vec<Segment>,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub groups: Vec<Group>,
    #[serde(default)]
    pub services: Vec<Service>,
    /// In priority order: the first rule that matches decides.
    #[serde(default)]
    pub policies: Vec<Policy>,
    /// The BGP speaker; absent: no BGP.
    pub bgp: Option<Bgp>,
    /// Site-to-site IPsec connectors (IKEv2, ESP in kernel XFRM).
    #[serde(default)]
    pub ipsec: Vec<Ipsec>,
}

/// One IPsec connector: an IKEv2 peer and the CHILD SA between the given selectors.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Ipsec {
    pub name: String,
    pub segment: String,
    /// Our tunnel endpoint (IKE listens on UDP 500 there).
    pub local_address: std::net::IpAddr,
    pub remote_address: std::net::IpAddr,
    /// The pre-shared key: a file whose first line it is, or an environment variable.
    /// The config never holds the key itself.
    pub psk_file: Option<PathBuf>,
    pub psk_env: Option<String>,
    /// Certificate authentication instead of a PSK (RSA or ECDSA, RFC 7427): our
    /// certificate and its unencrypted PKCS#8 key (PEM files; the key is never logged) and
    /// the CA certificates that issue the peer's. The peer's ID (`remote_id`: a DN in the
    /// certificate's order, as "O=Example, CN=gw.example.net", an FQDN or an address)
    /// must be in its certificate; without `remote_id` any certificate of those CAs is
    /// accepted.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// Start the IKE SA (true) or wait for the peer to.
    #[serde(default = "default_true")]
    pub initiate: bool,
    /// "azure": the Azure VPN gateway's default IKEv2/IPsec policy, for proposals left
    /// out.
    pub profile: Option<String>,
    /// strongSwan-style names, in order of preference.
    #[serde(default)]
    pub ike_proposals: Vec<String>,
    #[serde(default)]
    pub esp_proposals: Vec<String>,
    /// Perfect forward secrecy for CHILD SA rekeys: the D-H group added to every ESP
    /// proposal that names none. Azure's custom-policy names ("None", "PFS2048", "PFS14",
    /// "ECP256", "ECP384", "PFSMM": the group of the first IKE proposal) or ours
    /// ("modp2048", "ecp256", "ecp384", "ecp521", "curve25519").
    pub pfs_group: Option<String>,
    /// Traffic selectors: our side's prefixes and the peer's.
    pub local_ts: Vec<IpNet>,
    pub remote_ts: Vec<IpNet>,
    /// IKE identities; default: the addresses. An address or a name (FQDN).
    pub local_id: Option<String>,
    pub remote_id: Option<String>,
    /// Idle seconds before a liveness check (DPD); 0: none.
    #[serde(default = "default_dpd")]
    pub dpd_seconds: u64,
    /// Encapsulate ESP in UDP 4500 even without a NAT (paths that drop IP protocol 50).
    #[serde(default)]
    pub force_encap: bool,
    /// Prefixes routed into the tunnel in the segment while it is up (default: remote_ts).
    #[serde(default)]
    pub routes: Vec<IpNet>,
    /// Seconds after which we rekey the CHILD SA and the IKE SA (make-before-break).
    /// Default 3,600 and 14,400; with `profile = "azure"` 27,000 and 28,800.
    pub child_lifetime: Option<u64>,
    pub ike_lifetime: Option<u64>,
    /// Route-based tunnel: the agent creates an xfrm interface of this name (if_id
    /// 0x100 + the connector's index) and routes `routes` into it; the SAs and policies
    /// are bound to it, so routes, not selectors, decide what is encrypted. Without it,
    /// or on a kernel without xfrm interfaces, the tunnel is policy-based.
    pub interface: Option<String>,
}

fn default_dpd() -> u64 {
    30
}

/// Proposals used when a connector names neither a profile nor its own.
pub const DEFAULT_IKE_PROPOSALS: &[&str] =
    &["aes256gcm16-prfsha384-ecp384", "aes256-sha256-modp2048"];
pub const DEFAULT_ESP_PROPOSALS: &[&str] = &["aes256gcm16", "aes256-sha256"];

impl Ipsec {
    /// (CHILD SA, IKE SA) lifetimes in effect.
    pub fn lifetimes(&self) -> (u64, u64) {
        let azure = self.profile.as_deref() == Some("azure");
        let (c, i) = if azure {
            (
                crate::ike::proposal::AZURE_CHILD_LIFETIME,
                crate::ike::proposal::AZURE_IKE_LIFETIME,
            )
        } else {
            (3600, 14400)
        };
        (
            self.child_lifetime.unwrap_or(c),
            self.ike_lifetime.unwrap_or(i),
        )
    }

    /// Proposals in effect: its own, else its profile's, else the defaults.
    fn in_effect(&self, own: &[String], profile: &[&str], default: &[&str]) -> Vec<String> {
        if !own.is_empty() {
            own.to_vec()
        } else if self.profile.as_deref() == Some("azure") {
            profile.iter().map(|s| s.to_string()).collect()
        } else {
            default.iter().map(|s| s.to_string()).collect()
        }
    }

    /// The (IKE, ESP) proposals in effect, ESP with the `pfs_group` added.
    pub fn proposals(&self) -> (Vec<String>, Vec<String>) {
        let ike = self.in_effect(
            &self.ike_proposals,
            crate::ike::proposal::AZURE_IKE,
            DEFAULT_IKE_PROPOSALS,
        );
        let mut esp = self.in_effect(
            &self.esp_proposals,
            crate::ike::proposal::AZURE_ESP,
            DEFAULT_ESP_PROPOSALS,
        );
        // Validated: an unknown group is an error there.
        if let Ok(Some(g)) = self.pfs_with(&ike) {
            for e in &mut esp {
                if crate::ike::proposal::Suite::parse(e, false).is_ok_and(|s| s.dh.is_none()) {
                    e.push('-');
                    e.push_str(&g);
                }
            }
        }
        (ike, esp)
    }

    /// `pfs_group` as a group name of ours (None: no PFS).
    pub fn pfs(&self) -> Result<Option<String>, String> {
        self.pfs_with(&self.proposals().0)
    }

    /// `pfs_group` with `ike` the IKE proposals in effect (PFSMM follows the first).
    fn pfs_with(&self, ike: &[String]) -> Result<Option<String>, String> {
        let Some(name) = &self.pfs_group else {
            return Ok(None);
        };
        let first_ike = ike
            .first()
            .and_then(|n| crate::ike::proposal::Suite::parse(n, true).ok())
            .and_then(|s| s.dh);
        crate::ike::proposal::pfs_group(name, first_ike)
            .map(|g| g.map(|g| crate::ike::proposal::group_name(g).to_string()))
    }
}

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
    /// What is accepted from the peer, and how it is changed.
    #[serde(default)]
    pub import: crate::bgp::policy::Import,
    /// How what we send is changed.
    #[serde(default)]
    pub export: crate::bgp::policy::Export,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Driver mode: the fast path proper.
    #[default]
    Native,
    /// Generic (skb) mode: works everywhere, slower; the agent warns.
    Generic,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSettings {
    pub xdp_mode: XdpMode,
    /// Unix socket where `xnet status` finds the agent.
    pub socket: PathBuf,
    /// Size of the route-table memory, in groups of 256 entries (1 KiB each). Every
    /// segment takes 512 groups (an IPv4 and an IPv6 root); a full Internet table
    /// (565k IPv4 + 168k IPv6 prefixes) needs about 200,000.
    pub route_table_groups: u32,
    /// Mirror the routes into the kernel FIB (one table per segment) so the slow path
    /// agrees with the fast path.
    pub kernel_fib: bool,
    /// How often the neighbour table and local addresses are re-read, in milliseconds.
    pub neighbour_poll_ms: u64,
    /// Directory on a BPF filesystem where a graceful restart (SIGUSR1) leaves the XDP
    /// attachments, so forwarding goes on until the next agent takes them over.
    pub pin_dir: PathBuf,
    /// Half-open IKE SAs (IKE_SA_INIT answered, no IKE_AUTH yet) above which new
    /// initiators must return a cookie first (RFC 7296 §2.6); 0: always.
    pub ike_cookie_threshold: usize,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            xdp_mode: XdpMode::Native,
            socket: PathBuf::from("/run/xnet/xnet.sock"),
            route_table_groups: 8192,
            kernel_fib: true,
            neighbour_poll_ms: 250,
            pin_dir: PathBuf::from("/sys/fs/bpf/xnet"),
            ike_cookie_threshold: 100,
        }
    }
}

/// A VRF-like routing domain: its own route table, no traffic to other segments.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    pub name: String,
    /// Kernel routing table that mirrors this segment's routes (slow path).
    pub table: u32,
    /// What happens to traffic no policy matches: routed in the segment, or dropped.
    #[serde(default)]
    pub default_action: DefaultAction,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Carries ordinary traffic, which policies classify.
    #[default]
    Normal,
    /// Faces firewall instances: what comes back from them is routed, not classified
    /// again.
    Firewall,
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
#[serde(deny_unknown_fields, default)]
pub struct Health {
    pub kind: HealthKind,
    /// TCP port for `kind = "tcp"`.
    pub port: Option<u16>,
    pub interval_ms: u64,
    /// Consecutive failures that take an instance out (and successes that put it back).
    pub threshold: u32,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            kind: HealthKind::Icmp,
            port: None,
            interval_ms: 500,
            threshold: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    Icmp,
    Tcp,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    pub name: String,
    /// A `role = "firewall"` interface.
    pub interface: String,
    pub via: IpAddr,
}

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

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// Linux interface name; XDP is attached to it.
    pub name: String,
    pub segment: String,
    #[serde(default)]
    pub role: Role,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub segment: String,
    pub prefix: IpNet,
    /// One or more (ECMP) next hops.
    pub next_hops: Vec<NextHop>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct NextHop {
    pub via: IpAddr,
    pub interface: String,
}

/// A config error: where and why.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {field}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub field: String,
    pub reason: String,
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            field: "-".into(),
            reason: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, &file)
    }

    /// Parses and validates `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let field = match e.span() {
                Some(span) => {
                    let line = text[..span.start].matches('\n').count() + 1;
                    format!("line {line}")
                }
                None => "-".into(),
            };
            ConfigError {
                file: file.into(),
                field,
                reason: e.message().to_string(),
            }
        })?;
        config.validate().map_err(|(field, reason)| ConfigError {
            file: file.into(),
            field,
            reason,
        })?;
        Ok(config)
    }

    /// Segment ids as the data plane numbers them: position in the list, from 1.
    pub fn segment_id(&self, name: &str) -> Option<u32> {
        self.segments
            .iter()
            .position(|s| s.name == name)
            .map(|i| i as u32 + 1)
    }

    /// The prefixes a policy endpoint names: a group's, or the one it spells; `None` for
    /// "any".
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

    fn validate(&self) -> Result<(), (String, String)> {
        self.validate_routing()?;
        crate::policy::validate(self)?;
        self.validate_bgp()?;
        self.validate_ipsec()
    }

    fn validate_ipsec(&self) -> Result<(), (String, String)> {
        let max = xnet_common::ipsec::MAX_CONNECTORS as usize;
        if self.ipsec.len() > max {
            return Err((
                "ipsec".into(),
                format!(
                    "{} connectors, at most {max} (the data plane finds a connector from its SAs' reqid)",
                    self.ipsec.len()
                ),
            ));
        }
        let mut names = HashSet::new();
        let mut pairs = HashSet::new();
        for (i, c) in self.ipsec.iter().enumerate() {
            let f = |sub: &str| format!("ipsec[{i}].{sub}");
            if c.name.is_empty() || !names.insert(c.name.clone()) {
                return Err((f("name"), format!("{:?} is empty or used twice", c.name)));
            }
            if self.segment_id(&c.segment).is_none() {
                return Err((f("segment"), format!("unknown segment {:?}", c.segment)));
            }
            if c.local_address.is_ipv4() != c.remote_address.is_ipv4() {
                return Err((
                    f("remote_address"),
                    "must be of local_address's family".into(),
                ));
            }
            if !pairs.insert((c.local_address, c.remote_address)) {
                return Err((
                    f("remote_address"),
                    format!(
                        "another connector already joins {} and {}",
                        c.local_address, c.remote_address
                    ),
                ));
            }
            let secrets = [
                c.psk_file.is_some(),
                c.psk_env.is_some(),
                c.cert_file.is_some(),
            ];
            if secrets.iter().filter(|x| **x).count() != 1 {
                return Err((
                    f("psk_file"),
                    "give exactly one of psk_file, psk_env and cert_file (with key_file and ca_file)".into(),
                ));
            }
            if c.cert_file.is_some() {
                for (field, v) in [("key_file", &c.key_file), ("ca_file", &c.ca_file)] {
                    if v.is_none() {
                        return Err((f(field), "certificate authentication needs it".into()));
                    }
                }
            } else if c.key_file.is_some() || c.ca_file.is_some() {
                return Err((
                    f("cert_file"),
                    "key_file and ca_file go with cert_file".into(),
                ));
            }
            if let Some(p) = &c.profile {
                if p != "azure" {
                    return Err((
                        f("profile"),
                        format!("unknown profile {p:?} (known: \"azure\")"),
                    ));
                }
            }
            c.pfs().map_err(|e| (f("pfs_group"), e))?;
            let (ike, esp) = c.proposals();
            for (k, n) in ike.iter().enumerate() {
                crate::ike::proposal::Suite::parse(n, true)
                    .map_err(|e| (f(&format!("ike_proposals[{k}]")), e))?;
            }
            for (k, n) in esp.iter().enumerate() {
                crate::ike::proposal::Suite::parse(n, false)
                    .map_err(|e| (f(&format!("esp_proposals[{k}]")), e))?;
            }
            for (field, v) in [
                ("child_lifetime", c.child_lifetime),
                ("ike_lifetime", c.ike_lifetime),
            ] {
                if v.is_some_and(|s| s < 2) {
                    return Err((f(field), "at least 2 seconds".into()));
                }
            }
            if c.local_ts.is_empty() || c.remote_ts.is_empty() {
                return Err((
                    f("local_ts"),
                    "local_ts and remote_ts need at least one prefix each".into(),
                ));
            }
            if let Some(n) = &c.interface {
                if n.is_empty()
                    || n.len() > 15
                    || n.contains(|ch: char| ch == '/' || ch.is_whitespace())
                {
                    return Err((
                        f("interface"),
                        format!(
                            "{n:?} is not an interface name (1 to 15 characters, no '/' or spaces)"
                        ),
                    ));
                }
                let clash = self.interfaces.iter().any(|i| &i.name == n)
                    || self.ipsec[..i]
                        .iter()
                        .any(|o| o.interface.as_ref() == Some(n));
                if clash {
                    return Err((f("interface"), format!("{n:?} is already in use")));
                }
            }
        }
        Ok(())
    }

    fn validate_bgp(&self) -> Result<(), (String, String)> {
        let Some(b) = &self.bgp else { return Ok(()) };
        let err = |f: String, r: String| Err((f, r));
        if b.asn == 0 {
            return err("bgp.asn".into(), "AS 0 is reserved".into());
        }
        if b.router_id.is_unspecified() {
            return err(
                "bgp.router_id".into(),
                "0.0.0.0 is not a BGP identifier".into(),
            );
        }
        if !(1..=16).contains(&b.multipath) {
            return err("bgp.multipath".into(), "must be 1 to 16".into());
        }
        // The capability carries it in 12 bits.
        if !(1..=4095).contains(&b.restart_time) {
            return err(
                "bgp.restart_time".into(),
                "must be 1 to 4095 seconds".into(),
            );
        }
        let mut seen = HashSet::new();
        for (i, n) in b.neighbors.iter().enumerate() {
            let f = |sub: &str| format!("bgp.neighbors[{i}].{sub}");
            if self.segment_id(&n.segment).is_none() {
                return err(f("segment"), format!("unknown segment {:?}", n.segment));
            }
            if !seen.insert(n.address) {
                return err(f("address"), format!("{} is listed twice", n.address));
            }
            if n.local_address
                .is_some_and(|l| l.is_ipv4() != n.address.is_ipv4())
            {
                return err(
                    f("local_address"),
                    "must be of the peer address's family".into(),
                );
            }
            crate::bgp::policy::validate(&n.import, &n.export)
                .map_err(|(field, reason)| (f(&field), reason))?;
            if n.password_file.is_some() && n.password_env.is_some() {
                return err(
                    f("password_file"),
                    "give at most one of password_file and password_env".into(),
                );
            }
            if let (Some(w), Some(m)) = (n.warn_prefixes, n.max_prefixes) {
                if w >= m {
                    return err(
                        f("warn_prefixes"),
                        format!("must be below max_prefixes ({m})"),
                    );
                }
            }
            if n.hold_time == 1 || n.hold_time == 2 {
                return err(
                    f("hold_time"),
                    "must be 0 or at least 3 seconds (RFC 4271)".into(),
                );
            }
            if n.advertise == Advertise::Custom && n.prefixes.is_empty() {
                return err(
                    f("prefixes"),
                    "advertise = \"custom\" needs prefixes".into(),
                );
            }
            if let Some(p) = n
                .prefixes
                .iter()
                .find(|p| p.addr().is_ipv4() != n.address.is_ipv4())
            {
                return err(
                    f("prefixes"),
                    format!(
                        "{p} is of the other address family than the session to {}",
                        n.address
                    ),
                );
            }
        }
        Ok(())
    }

    fn validate_routing(&self) -> Result<(), (String, String)> {
        let err = |field: String, reason: String| Err((field, reason));
        let a = &self.agent;
        if a.route_table_groups < 512 * self.segments.len().max(1) as u32 {
            return err(
                "agent.route_table_groups".into(),
                format!(
                    "{} is too small: each of the {} segments needs 512 groups for its roots",
                    a.route_table_groups,
                    self.segments.len()
                ),
            );
        }
        if a.route_table_groups > (1 << 22) {
            return err(
                "agent.route_table_groups".into(),
                "at most 4194304 (4 GiB)".into(),
            );
        }
        if !(10..=60_000).contains(&a.neighbour_poll_ms) {
            return err(
                "agent.neighbour_poll_ms".into(),
                "must be between 10 and 60000".into(),
            );
        }
        let mut names = HashSet::new();
        let mut tables = HashSet::new();
        for (i, s) in self.segments.iter().enumerate() {
            if s.name.is_empty() {
                return err(format!("segments[{i}].name"), "must not be empty".into());
            }
            if !names.insert(&s.name) {
                return err(
                    format!("segments[{i}].name"),
                    format!("segment {:?} is defined twice", s.name),
                );
            }
            // 0 is unspecified, 253-255 are the kernel's default, main and local tables.
            if s.table == 0 || (253..=255).contains(&s.table) {
                return err(
                    format!("segments[{i}].table"),
                    format!(
                        "{} is reserved by the kernel; use 1-252 or above 255",
                        s.table
                    ),
                );
            }
            if !tables.insert(s.table) {
                return err(
                    format!("segments[{i}].table"),
                    format!("table {} is used by another segment", s.table),
                );
            }
        }
        let mut if_segment: HashMap<&str, &str> = HashMap::new();
        for (i, itf) in self.interfaces.iter().enumerate() {
            if itf.name.is_empty() || itf.name.len() > 15 {
                return err(
                    format!("interfaces[{i}].name"),
                    format!(
                        "{:?} is not a valid interface name (1-15 characters)",
                        itf.name
                    ),
                );
            }
            if self.segment_id(&itf.segment).is_none() {
                return err(
                    format!("interfaces[{i}].segment"),
                    format!("unknown segment {:?}", itf.segment),
                );
            }
            if if_segment.insert(&itf.name, &itf.segment).is_some() {
                return err(
                    format!("interfaces[{i}].name"),
                    format!("interface {:?} is listed twice", itf.name),
                );
            }
        }
        let mut prefixes = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let f = |sub: &str| format!("routes[{i}].{sub}");
            if self.segment_id(&r.segment).is_none() {
                return err(f("segment"), format!("unknown segment {:?}", r.segment));
            }
            if r.prefix.trunc() != r.prefix {
                return err(
                    f("prefix"),
                    format!(
                        "{} has host bits set; did you mean {}?",
                        r.prefix,
                        r.prefix.trunc()
                    ),
                );
            }
            if !prefixes.insert((&r.segment, r.prefix)) {
                return err(
                    f("prefix"),
                    format!("{} is already routed in segment {:?}", r.prefix, r.segment),
                );
            }
            if r.next_hops.is_empty() || r.next_hops.len() > MAX_ECMP {
                return err(
                    f("next_hops"),
                    format!("needs 1 to {MAX_ECMP} next hops, has {}", r.next_hops.len()),
                );
            }
            let mut seen = HashSet::new();
            for (j, nh) in r.next_hops.iter().enumerate() {
                let g = |sub: &str| format!("routes[{i}].next_hops[{j}].{sub}");
                if nh.via.is_ipv4() != r.prefix.addr().is_ipv4() {
                    return err(
                        g("via"),
                        format!(
                            "{} and prefix {} are of different address families",
                            nh.via, r.prefix
                        ),
                    );
                }
                if nh.via.is_unspecified() || nh.via.is_multicast() {
                    return err(g("via"), format!("{} is not a unicast next hop", nh.via));
                }
                match if_segment.get(nh.interface.as_str()) {
                    None => {
                        return err(
                            g("interface"),
                            format!("{:?} is not in [[interfaces]]", nh.interface),
                        )
                    }
                    Some(seg) if *seg != r.segment => {
                        return err(
                            g("interface"),
                            format!(
                                "{:?} belongs to segment {:?}, the route to {:?}",
                                nh.interface, seg, r.segment
                            ),
                        )
                    }
                    _ => {}
                }
                if !seen.insert(nh) {
                    return err(
                        g("via"),
                        format!("next hop {} via {} is listed twice", nh.via, nh.interface),
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [agent]
        xdp_mode = "generic"

        [[segments]]
        name = "prod"
        table = 100

        [[interfaces]]
        name = "eth1"
        segment = "prod"

        [[interfaces]]
        name = "eth2"
        segment = "prod"

        [[routes]]
        segment = "prod"
        prefix = "10.1.0.0/16"
        next_hops = [ { via = "10.0.1.2", interface = "eth1" }, { via = "10.0.2.2", interface = "eth2" } ]

        [[routes]]
        segment = "prod"
        prefix = "fd01::/48"
        next_hops = [ { via = "fd00:1::2", interface = "eth1" } ]
    "#;

    fn error(text: &str) -> String {
        Config::parse(text, "x.toml").unwrap_err().to_string()
    }

    #[test]
    fn a_good_config_parses() {
        let c = Config::parse(GOOD, "x.toml").unwrap();
        assert_eq!(c.agent.xdp_mode, XdpMode::Generic);
        assert_eq!(c.routes[0].next_hops.len(), 2);
        assert_eq!(c.segment_id("prod"), Some(1));
        assert!(c.agent.kernel_fib, "defaults fill what is not given");
    }

    #[test]
    fn the_shipped_demo_config_is_valid() {
        let text = include_str!("../config/demo-lab.toml");
        Config::parse(text, "demo-lab.toml").unwrap();
    }

    #[test]
    fn errors_name_file_field_and_reason() {
        let e = error(&GOOD.replace("10.1.0.0/16", "10.1.0.1/16"));
        assert_eq!(
            e,
            "x.toml: routes[0].prefix: 10.1.0.1/16 has host bits set; did you mean 10.1.0.0/16?"
        );
        let e = error(&GOOD.replace("interface = \"eth2\"", "interface = \"eth9\""));
        assert_eq!(
            e,
            "x.toml: routes[0].next_hops[1].interface: \"eth9\" is not in [[interfaces]]"
        );
        let e = error(&GOOD.replace("via = \"fd00:1::2\"", "via = \"10.0.0.1\""));
        assert!(e.starts_with("x.toml: routes[1].next_hops[0].via: "), "{e}");
        let e = error(&GOOD.replace("table = 100", "table = 254"));
        assert!(
            e.starts_with("x.toml: segments[0].table: 254 is reserved"),
            "{e}"
        );
        let e = error(&GOOD.replace(
            "segment = \"prod\"\n\n        [[interfaces]]\n        name = \"eth2\"",
            "segment = \"nope\"\n\n        [[interfaces]]\n        name = \"eth2\"",
        ));
        assert_eq!(e, "x.toml: interfaces[0].segment: unknown segment \"nope\"");
    }

    #[test]
    fn syntax_and_unknown_fields_are_reported_with_a_line() {
        let e = error("[agent]\nxdp_mode = \"native\"\nbogus = 1\n");
        assert!(
            e.starts_with("x.toml: line 3: unknown field `bogus`"),
            "{e}"
        );
        let e = error("[[routes]]\nsegment = \"a\"\nprefix = \"10.0.0.0/33\"\nnext_hops = []\n");
        assert!(e.starts_with("x.toml: line 3: "), "{e}");
    }

    #[test]
    fn duplicate_and_cross_segment_routes_are_rejected() {
        let twice = format!("{GOOD}\n[[routes]]\nsegment = \"prod\"\nprefix = \"10.1.0.0/16\"\nnext_hops = [ {{ via = \"10.0.1.2\", interface = \"eth1\" }} ]\n");
        assert!(error(&twice).contains("routes[2].prefix: 10.1.0.0/16 is already routed"));
        let other = GOOD.replace(
            "[[interfaces]]\n        name = \"eth2\"\n        segment = \"prod\"",
            "[[segments]]\n        name = \"dev\"\n        table = 101\n\n        [[interfaces]]\n        name = \"eth2\"\n        segment = \"dev\"",
        );
        assert!(
            error(&other)
                .contains("routes[0].next_hops[1].interface: \"eth2\" belongs to segment \"dev\""),
            "{}",
            error(&other)
        );
    }

    #[test]
    fn a_route_based_connector_needs_a_free_interface_name() {
        let ipsec = |itf: &str| {
            format!("{GOOD}\n[[ipsec]]\nname = \"azure\"\nsegment = \"prod\"\nlocal_address = \"192.0.2.1\"\nremote_address = \"198.51.100.1\"\npsk_env = \"PSK\"\nlocal_ts = [\"0.0.0.0/0\"]\nremote_ts = [\"0.0.0.0/0\"]\nroutes = [\"10.50.0.0/16\"]\ninterface = \"{itf}\"\n")
        };
        Config::parse(&ipsec("xi-azure"), "x.toml").unwrap();
        assert_eq!(
            error(&ipsec("eth1")),
            "x.toml: ipsec[0].interface: \"eth1\" is already in use"
        );
        assert!(error(&ipsec("a-very-long-name-indeed")).starts_with(
            "x.toml: ipsec[0].interface: \"a-very-long-name-indeed\" is not an interface name"
        ),);
    }

    /// PFS by Azure's custom-policy names: the group joins every ESP proposal without
    /// one; weak or unknown groups name the field.
    #[test]
    fn pfs_group_takes_azures_names() {
        let ipsec = |extra: &str| {
            format!("{GOOD}\n[[ipsec]]\nname = \"azure\"\nsegment = \"prod\"\nlocal_address = \"192.0.2.1\"\nremote_address = \"198.51.100.1\"\npsk_env = \"PSK\"\nprofile = \"azure\"\nlocal_ts = [\"0.0.0.0/0\"]\nremote_ts = [\"0.0.0.0/0\"]\n{extra}\n")
        };
        let esp = |extra: &str| {
            Config::parse(&ipsec(extra), "x.toml").unwrap().ipsec[0]
                .proposals()
                .1
        };
        assert_eq!(
            esp("pfs_group = \"ECP384\""),
            [
                "aes256gcm16-ecp384",
                "aes256-sha256-ecp384",
                "aes128-sha256-ecp384"
            ]
        );
        assert_eq!(esp("pfs_group = \"PFS2048\"")[0], "aes256gcm16-modp2048");
        // PFSMM: the IKE SA's group (Azure's default IKE policy: DH group 14).
        assert_eq!(esp("pfs_group = \"PFSMM\"")[0], "aes256gcm16-modp2048");
        assert_eq!(esp("pfs_group = \"None\"")[0], "aes256gcm16");
        // An ESP proposal with its own group keeps it.
        assert_eq!(
            esp(
                "pfs_group = \"ECP256\"\nesp_proposals = [\"aes256gcm16-ecp384\", \"aes128gcm16\"]"
            ),
            ["aes256gcm16-ecp384", "aes128gcm16-ecp256"]
        );
        assert!(error(&ipsec("pfs_group = \"PFS1\""))
            .starts_with("x.toml: ipsec[0].pfs_group: \"PFS1\": D-H groups 1 and 2"));
        assert!(error(&ipsec("pfs_group = \"PFS42\""))
            .starts_with("x.toml: ipsec[0].pfs_group: unknown PFS group \"PFS42\""));
    }
}
