//! The declarative TOML config: segments, interfaces, static routes and the agent's own
//! settings. `Config::load` parses and validates everything before anything is applied;
//! every error names the file, the field and the reason.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use xnet_common::MAX_ECMP;

// Each domain owns its section's types; the config composes them.
pub use crate::bgp::config::{Advertise, Bgp, Neighbor};
pub use crate::health::{Health, HealthKind};
pub use crate::ike::config::{Ipsec, DEFAULT_ESP_PROPOSALS, DEFAULT_IKE_PROPOSALS};
pub use crate::policy::config::{
    Action, FailureMode, Group, Instance, Policy, PortRange, Protocol, Service,
};

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
    /// IPFIX flow export of the segments that sample (`flow_sample`).
    pub flows: Option<crate::flows::config::Flows>,
    /// The data plane's id of each segment (parallel to `segments`): its position from 1
    /// when loaded; a reload keeps the running ids (`keep_segment_ids`), so removing or
    /// reordering segments never renumbers the others' tables.
    #[serde(skip)]
    segment_ids: Vec<u32>,
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
    /// Where Prometheus scrapes `/metrics` (e.g. "127.0.0.1:9469"); absent: no metrics.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Run as a node of a cluster: the config comes from etcd (this file holds the
    /// node's own settings); `xnet run --etcd --cluster --node` set the same.
    pub cluster: Option<ClusterSettings>,
}

/// `[agent.cluster]`: where the cluster's store is and who we are in it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// etcd client URLs (http://host:2379), any member of the etcd cluster.
    pub etcd: Vec<String>,
    /// The cluster's name: its keys are under /xnet/<name>/.
    pub name: String,
    /// This node's name, unique in the cluster.
    pub node: String,
    /// Where the node keeps the cluster's document in force, so it starts with it when
    /// etcd cannot be reached (default /var/lib/xnet/cluster-<name>.toml).
    #[serde(default)]
    pub cache: Option<PathBuf>,
}

impl ClusterSettings {
    /// (field, reason) of the first setting that is wrong.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.etcd.is_empty() {
            return Err(("agent.cluster.etcd".into(), "at least one etcd URL".into()));
        }
        for (field, v) in [("name", &self.name), ("node", &self.node)] {
            crate::cluster::check_name(v).map_err(|why| (format!("agent.cluster.{field}"), why))?;
        }
        Ok(())
    }

    pub fn cache_path(&self) -> PathBuf {
        self.cache
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/var/lib/xnet/cluster-{}.toml", self.name)))
    }
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
            metrics_listen: None,
            cluster: None,
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
    /// Flow export: one packet in this many is sampled (1: every packet); absent: none.
    #[serde(default)]
    pub flow_sample: Option<u32>,
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
    /// BFD to the next hop: while its session is down (after it was up), the next hop
    /// leaves the route's group and the route goes when it was the last.
    #[serde(default, deserialize_with = "crate::bfd::config::setting")]
    pub bfd: Option<crate::bfd::config::Bfd>,
}

/// A config error: where and why.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {field}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub field: String,
    pub reason: String,
}

/// The field a parse error points at, from the text around `offset`: the key on its line
/// under the table header above it (`segments[1].table`).
fn field_at(text: &str, offset: usize) -> Option<String> {
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line.split_once('=').map(|(k, _)| k.trim().to_string())?;
    let header = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['));
    let Some(h) = header else { return Some(key) };
    let name = h.trim_matches(|c| c == '[' || c == ']').trim();
    if h.starts_with("[[") {
        let n = text[..line_start].lines().filter(|l| l.trim() == h).count();
        Some(format!("{name}[{}].{key}", n.saturating_sub(1)))
    } else {
        Some(format!("{name}.{key}"))
    }
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
                    match field_at(text, span.start) {
                        Some(path) => format!("line {line} ({path})"),
                        None => format!("line {line}"),
                    }
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

    /// A segment's id in the data plane (see `segment_ids`).
    pub fn segment_id(&self, name: &str) -> Option<u32> {
        let i = self.segments.iter().position(|s| s.name == name)?;
        Some(self.id_at(i))
    }

    fn id_at(&self, i: usize) -> u32 {
        self.segment_ids.get(i).copied().unwrap_or(i as u32 + 1)
    }

    /// The segment with data-plane id `id`.
    pub fn segment_by_id(&self, id: u32) -> Option<&Segment> {
        (0..self.segments.len())
            .find(|&i| self.id_at(i) == id)
            .map(|i| &self.segments[i])
    }

    /// Every segment with its id.
    pub fn segments_with_ids(&self) -> impl Iterator<Item = (u32, &Segment)> {
        self.segments
            .iter()
            .enumerate()
            .map(|(i, s)| (self.id_at(i), s))
    }

    /// For a reload: segments `running` has keep their ids; new ones get ids above any
    /// id it uses (`highest`: the highest id ever given, so a removed segment's id is not
    /// reused while its routes may still be leaving).
    pub fn keep_segment_ids(&mut self, running: &Config, highest: u32) {
        let mut next = highest.max(
            running
                .segments_with_ids()
                .map(|(id, _)| id)
                .max()
                .unwrap_or(0),
        );
        self.segment_ids = self
            .segments
            .iter()
            .map(|s| match running.segment_id(&s.name) {
                Some(id) => id,
                None => {
                    next += 1;
                    next
                }
            })
            .collect();
    }

    /// The prefixes a policy endpoint names: a group's, or the one it spells; `None` for
    /// "any".
    pub fn endpoint(&self, e: &Option<String>) -> Option<Vec<IpNet>> {
        self.rules().endpoint(e)
    }

    /// The sections policy reads.
    pub fn rules(&self) -> crate::policy::config::Rules<'_> {
        crate::policy::config::Rules {
            policies: &self.policies,
            groups: &self.groups,
            services: &self.services,
        }
    }

    fn validate(&self) -> Result<(), (String, String)> {
        self.validate_routing()?;
        crate::policy::validate(&self.rules(), self)?;
        self.validate_bgp()?;
        self.validate_ipsec()?;
        self.validate_flows()?;
        self.validate_cluster()
    }

    fn validate_cluster(&self) -> Result<(), (String, String)> {
        self.agent
            .cluster
            .as_ref()
            .map_or(Ok(()), ClusterSettings::validate)
    }

    fn validate_flows(&self) -> Result<(), (String, String)> {
        for (i, s) in self.segments.iter().enumerate() {
            match s.flow_sample {
                Some(0) => {
                    return Err((
                        format!("segments[{i}].flow_sample"),
                        "must be at least 1 (1: every packet); leave it out for none".into(),
                    ))
                }
                Some(_) if self.flows.is_none() => {
                    return Err((
                        format!("segments[{i}].flow_sample"),
                        "samples need somewhere to go: add [flows] with collectors".into(),
                    ))
                }
                _ => {}
            }
        }
        match &self.flows {
            Some(f) => f.validate().map_err(|(f, r)| (format!("flows.{f}"), r)),
            None => Ok(()),
        }
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
            if !(1..=3600).contains(&c.dpd_retransmit_seconds) {
                return Err((f("dpd_retransmit_seconds"), "must be 1 to 3600".into()));
            }
            if c.dpd_retries > 20 {
                return Err((f("dpd_retries"), "at most 20".into()));
            }
            if let Some(bfd) = &c.bfd {
                bfd.validate(&f("bfd"), true)?;
                let routed = if c.routes.is_empty() {
                    &c.remote_ts
                } else {
                    &c.routes
                };
                let peer = bfd.peer.expect("validated");
                if !routed.iter().any(|n| n.contains(&peer)) {
                    return Err((
                        f("bfd.peer"),
                        format!("{peer} is not in the prefixes routed into the tunnel"),
                    ));
                }
            }
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
            if let Some(bfd) = &n.bfd {
                bfd.validate(&f("bfd"), false)?;
            }
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
                if let Some(bfd) = &nh.bfd {
                    bfd.validate(&g("bfd"), false)?;
                }
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

/// What policy needs to know of the rest of the config.
impl crate::policy::config::Names for Config {
    fn segment_id(&self, name: &str) -> Option<u32> {
        Config::segment_id(self, name)
    }
    fn interface(&self, name: &str) -> Option<(&str, bool)> {
        self.interfaces
            .iter()
            .find(|i| i.name == name)
            .map(|i| (i.segment.as_str(), i.role == Role::Firewall))
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
            e.starts_with("x.toml: line 3 (agent.bogus): unknown field `bogus`"),
            "{e}"
        );
        let e = error("[[segments]]\nname = \"a\"\ntable = 1\n[[routes]]\nsegment = \"a\"\nprefix = \"10.0.0.0/24\"\nnext_hops = []\n[[routes]]\nsegment = \"a\"\nprefix = \"10.0.0.0/33\"\nnext_hops = []\n");
        assert!(e.starts_with("x.toml: line 10 (routes[1].prefix): "), "{e}");
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
