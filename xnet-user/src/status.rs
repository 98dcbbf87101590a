//! What `xnet status` shows: the agent serves it as JSON on its Unix socket; the command
//! prints it as tables or passes the JSON on.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

pub use crate::ike::status::{IpsecChildStatus, IpsecStatus, IpsecTotals};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub config: String,
    /// When the agent started (Unix seconds).
    #[serde(default)]
    pub started_unix: f64,
    pub interfaces: Vec<InterfaceStatus>,
    pub routes: Vec<RouteStatus>,
    pub neighbours: Vec<NeighbourStatus>,
    /// Packets by outcome: `forwarded` and each pass/drop reason.
    pub reasons: Vec<(String, u64)>,
    pub route_table: RouteTableStatus,
    #[serde(default)]
    pub policies: Vec<PolicyStatus>,
    #[serde(default)]
    pub services: Vec<ServiceStatus>,
    #[serde(default)]
    pub bgp: Vec<BgpSessionStatus>,
    /// The first `BGP_ROUTES_SHOWN` prefixes of the RIB (all of them in `bgp_routes_total`).
    #[serde(default)]
    pub bgp_routes: Vec<BgpRouteStatus>,
    #[serde(default)]
    pub bgp_routes_total: usize,
    /// Learned prefixes installed in the data plane.
    #[serde(default)]
    pub bgp_in_data_plane: usize,
    #[serde(default)]
    pub ipsec: Vec<IpsecStatus>,
    #[serde(default)]
    pub bfd: Vec<crate::bfd::driver::Status>,
    /// The latest failures BFD detected (the last one last) and how fast forwarding and
    /// routes followed.
    #[serde(default)]
    pub failovers: Vec<Failover>,
    /// Flow export (with `[flows]`).
    #[serde(default)]
    pub flows: Option<crate::flows::exporter::FlowStats>,
    /// The config it runs, when asked for (`What::Config`; it holds no secrets, only where
    /// they are kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_config: Option<crate::config::Config>,
    /// As a node of a cluster.
    #[serde(default)]
    pub cluster: Option<ClusterStatus>,
}

/// Now, in Unix seconds (what `started_unix` and the like are compared with).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A cluster node's view: etcd reachable, the config revision in force, the live nodes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ClusterStatus {
    pub cluster: String,
    pub node: String,
    pub etcd_connected: bool,
    pub applied_revision: i64,
    pub refused: Option<crate::cluster::Refusal>,
    pub members: Vec<String>,
}

/// The last failure BFD detected, with how long each step took.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Failover {
    pub peer: std::net::IpAddr,
    /// When the BFD thread declared the session down (Unix milliseconds).
    pub detected_unix_ms: f64,
    /// Next-hop groups rewritten, and how long from detection until they were: from then
    /// on no packet takes the dead next hop.
    pub groups: usize,
    pub switch_ms: f64,
    /// From detection until the routes had moved (the RIB and every prefix).
    pub converge_ms: Option<f64>,
}

impl Status {
    pub fn render_ipsec(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<16} {:<10} {:<18} {:<18} {:<12} {:>8}  {:<32} LAST ERROR",
            "CONNECTOR", "SEGMENT", "LOCAL", "REMOTE", "STATE", "UPTIME", "IKE PROPOSAL"
        );
        for c in &self.ipsec {
            let _ = writeln!(
                s,
                "{:<16} {:<10} {:<18} {:<18} {:<12} {:>8}  {:<32} {}",
                c.name,
                c.segment,
                c.local,
                c.remote,
                c.state,
                c.uptime_secs,
                c.ike_proposal.as_deref().unwrap_or("-"),
                c.last_error.as_deref().unwrap_or("-")
            );
            for ch in &c.children {
                let _ = writeln!(
                    s,
                    "  child in {} out {} {} {} <-> {}{}",
                    ch.spi_in,
                    ch.spi_out,
                    ch.proposal,
                    ch.local_ts,
                    ch.remote_ts,
                    if ch.installed {
                        format!(
                            ", in {} B / {} packets, out {} B / {} packets",
                            ch.bytes_in, ch.packets_in, ch.bytes_out, ch.packets_out
                        )
                    } else {
                        " (not in the kernel)".to_string()
                    }
                );
            }
        }
        if let Some(c) = self.ipsec.first() {
            let _ = writeln!(s, "IKE messages dropped: {}", c.dropped);
        }
        s
    }
}

pub const BGP_ROUTES_SHOWN: usize = 10_000;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BgpSessionStatus {
    pub name: String,
    pub peer: String,
    pub remote_asn: u32,
    pub segment: String,
    pub state: String,
    pub uptime_secs: u64,
    /// Prefixes in the RIB from this peer.
    pub received: usize,
    /// Prefixes advertised to it.
    pub sent: usize,
    pub last_error: Option<String>,
    /// Prefixes of address families that were not negotiated, ignored (RFC 4760).
    #[serde(default)]
    pub not_negotiated: u64,
    /// UPDATEs whose routes were withdrawn instead (RFC 7606, our own next hop, first AS).
    #[serde(default)]
    pub treated_as_withdraw: u64,
    /// Times the session left Established.
    #[serde(default)]
    pub flaps: u64,
    /// Prefixes announced to us since the agent started, and those refused (import
    /// policy, our AS in the path).
    #[serde(default)]
    pub announced_total: u64,
    #[serde(default)]
    pub rejected_total: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BgpRouteStatus {
    pub segment: String,
    pub prefix: String,
    pub in_data_plane: bool,
    pub paths: Vec<BgpPathStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BgpPathStatus {
    pub peer: String,
    pub next_hop: String,
    pub as_path: String,
    pub origin: String,
    pub local_pref: Option<u32>,
    pub med: Option<u32>,
    pub communities: Vec<String>,
    /// Large communities (RFC 8092) as "GLOBAL:LOCAL1:LOCAL2".
    #[serde(default)]
    pub large_communities: Vec<String>,
    /// Chosen (best, or equal to it under multipath).
    pub selected: bool,
    /// Kept from a peer that is restarting (graceful restart), until its End-of-RIB.
    #[serde(default)]
    pub stale: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PolicyStatus {
    pub name: String,
    pub segment: String,
    pub action: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ServiceStatus {
    pub name: String,
    pub failure_mode: String,
    pub instances: Vec<InstanceStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct InstanceStatus {
    pub name: String,
    pub via: String,
    pub interface: String,
    /// "up", "down" or "unknown" (no probe answered yet).
    pub health: String,
    /// Packets and bytes steered to it.
    pub packets: u64,
    pub bytes: u64,
    /// The last answered probe's round trip (milliseconds).
    #[serde(default)]
    pub probe_rtt_ms: Option<f64>,
    /// In the pool flows are steered over (its own health; in a cluster, the majority's).
    #[serde(default)]
    pub in_pool: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    pub segment: String,
    pub mac: String,
    pub xdp: String,
    pub rx: u64,
    pub forwarded: u64,
    pub passed: u64,
    pub dropped: u64,
    /// Bytes of the same packets, as they came in.
    #[serde(default)]
    pub rx_bytes: u64,
    #[serde(default)]
    pub forwarded_bytes: u64,
    #[serde(default)]
    pub passed_bytes: u64,
    #[serde(default)]
    pub dropped_bytes: u64,
    /// Packets and bytes by reason (those that met any).
    #[serde(default)]
    pub reasons: Vec<ReasonCount>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReasonCount {
    pub reason: String,
    /// forwarded, passed or dropped.
    pub outcome: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RouteStatus {
    pub segment: String,
    pub prefix: String,
    pub next_hops: Vec<NextHopStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NextHopStatus {
    pub via: String,
    pub interface: String,
    /// XDP forwards through it (its MAC is known); otherwise packets go to the kernel.
    pub fast_path: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NeighbourStatus {
    pub interface: String,
    pub ip: String,
    pub mac: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RouteTableStatus {
    pub prefixes: usize,
    pub groups_used: u32,
    pub groups_total: u32,
}

impl Status {
    pub fn reason(&self, name: &str) -> u64 {
        self.reasons
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    }

    pub fn interface(&self, name: &str) -> Option<&InterfaceStatus> {
        self.interfaces.iter().find(|i| i.name == name)
    }

    /// The BGP route for `prefix` (among the routes status lists).
    pub fn bgp_route(&self, prefix: &str) -> Option<&BgpRouteStatus> {
        self.bgp_routes.iter().find(|r| r.prefix == prefix)
    }

    /// Human-readable tables.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "config: {}", self.config);
        if let Some(c) = &self.cluster {
            let _ = writeln!(
                s,
                "cluster: {} node {}: config revision {} in force; etcd {}; live nodes: {}",
                c.cluster,
                c.node,
                c.applied_revision,
                if c.etcd_connected {
                    "reached"
                } else {
                    "NOT reached: forwarding with the config in force and this node's own probes"
                },
                c.members.join(", ")
            );
            if let Some(r) = &c.refused {
                let _ = writeln!(s, "  refused revision {}: {}", r.revision, r.reason);
            }
        }
        let _ = writeln!(s, "\nINTERFACE        IFINDEX  SEGMENT      XDP      MAC                        RX   FORWARDED      PASSED     DROPPED");
        for i in &self.interfaces {
            let _ = writeln!(
                s,
                "{:<16} {:>7}  {:<12} {:<8} {:<17} {:>11} {:>11} {:>11} {:>11}",
                i.name, i.ifindex, i.segment, i.xdp, i.mac, i.rx, i.forwarded, i.passed, i.dropped
            );
        }
        let _ = writeln!(s, "\nSEGMENT      PREFIX                         NEXT HOPS");
        for r in &self.routes {
            let hops: Vec<String> = r
                .next_hops
                .iter()
                .map(|h| {
                    format!(
                        "{} dev {} ({})",
                        h.via,
                        h.interface,
                        if h.fast_path {
                            "xdp"
                        } else {
                            "kernel: no MAC yet"
                        }
                    )
                })
                .collect();
            let _ = writeln!(s, "{:<12} {:<30} {}", r.segment, r.prefix, hops.join(", "));
        }
        let _ = writeln!(
            s,
            "\nNEIGHBOUR                                INTERFACE        MAC"
        );
        for n in &self.neighbours {
            let _ = writeln!(
                s,
                "{:<40} {:<16} {}",
                n.ip,
                n.interface,
                n.mac.as_deref().unwrap_or("(unresolved)")
            );
        }
        let _ = writeln!(s, "\nPACKETS BY OUTCOME");
        for (name, v) in &self.reasons {
            if *v > 0 {
                let _ = writeln!(s, "  {name:<22} {v:>12}");
            }
        }
        let t = &self.route_table;
        let _ = writeln!(
            s,
            "\nroute table: {} prefixes, {}/{} groups used",
            t.prefixes, t.groups_used, t.groups_total
        );
        s
    }
}

impl Status {
    /// The BFD view: one line per session, then the latest failovers.
    pub fn render_bfd(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "PEER                     LOCAL            HOPS   STATE       REMOTE      DISCR (L/R)             TX ms  DETECT ms  FLAPS  LAST DIAG");
        for b in &self.bfd {
            let _ = writeln!(
                s,
                "{:<24} {:<16} {:<6} {:<11} {:<11} {:>10}/{:<10} {:>8.0} {:>10.0} {:>6}  {}{}",
                b.peer,
                b.local.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                if b.multihop { "multi" } else { "single" },
                b.state,
                b.remote_state,
                b.local_discr,
                b.remote_discr,
                b.tx_ms,
                b.detect_ms,
                b.flaps,
                b.last_diag,
                if b.remote_diag != "none" {
                    format!(" (peer: {})", b.remote_diag)
                } else {
                    String::new()
                }
            );
        }
        if !self.failovers.is_empty() {
            let _ = writeln!(s, "\nfailovers (latest last):");
        }
        for f in &self.failovers {
            let _ = writeln!(
                s,
                "  {} — {} next-hop groups switched {:.2} ms after detection; routes converged {}",
                f.peer,
                f.groups,
                f.switch_ms,
                f.converge_ms
                    .map(|c| format!("{c:.0} ms after detection"))
                    .unwrap_or_else(|| "not yet".into())
            );
        }
        s
    }

    /// The BGP view: sessions, then routes with their paths (`*` chosen).
    pub fn render_bgp(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "NEIGHBOR         PEER                     AS         SEGMENT      STATE        UPTIME  RECEIVED      SENT  LAST ERROR");
        for b in &self.bgp {
            let _ = writeln!(
                s,
                "{:<16} {:<24} {:<10} {:<12} {:<12} {:>6} {:>9} {:>9}  {}",
                b.name,
                b.peer,
                b.remote_asn,
                b.segment,
                b.state,
                b.uptime_secs,
                b.received,
                b.sent,
                b.last_error.as_deref().unwrap_or("-")
            );
        }
        let _ = writeln!(s, "\n(* selected, S stale: kept while the peer restarts)");
        let _ = writeln!(s, "   SEGMENT      PREFIX                         PEER                     NEXT HOP                 AS PATH              LOCPRF    MED");
        for r in &self.bgp_routes {
            for p in &r.paths {
                let _ = writeln!(
                    s,
                    "{}{} {:<12} {:<30} {:<24} {:<24} {:<20} {:>6} {:>6}",
                    if p.selected { "*" } else { " " },
                    if p.stale { "S" } else { " " },
                    r.segment,
                    r.prefix,
                    p.peer,
                    p.next_hop,
                    p.as_path,
                    p.local_pref.map(|v| v.to_string()).unwrap_or_default(),
                    p.med.map(|v| v.to_string()).unwrap_or_default()
                );
            }
        }
        if self.bgp_routes_total > self.bgp_routes.len() {
            let _ = writeln!(
                s,
                "… {} more prefixes",
                self.bgp_routes_total - self.bgp_routes.len()
            );
        }
        s
    }

    /// The policy view: rules with their hits, services with their instances' health.
    pub fn render_policy(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "PRIORITY  POLICY                   SEGMENT      ACTION                PACKETS          BYTES");
        for (i, p) in self.policies.iter().enumerate() {
            let _ = writeln!(
                s,
                "{:>8}  {:<24} {:<12} {:<16} {:>12} {:>14}",
                i, p.name, p.segment, p.action, p.packets, p.bytes
            );
        }
        let _ = writeln!(s, "\nSERVICE          FAILURE  INSTANCE         VIA                      INTERFACE        HEALTH   POOL      PACKETS          BYTES");
        for svc in &self.services {
            for i in &svc.instances {
                let _ = writeln!(
                    s,
                    "{:<16} {:<8} {:<16} {:<24} {:<16} {:<8} {:<4} {:>12} {:>14}",
                    svc.name,
                    svc.failure_mode,
                    i.name,
                    i.via,
                    i.interface,
                    i.health,
                    if i.in_pool { "in" } else { "out" },
                    i.packets,
                    i.bytes
                );
            }
        }
        s
    }
}

pub fn mac_string(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Asks the agent listening on `socket` for its status.
pub async fn fetch(socket: &Path) -> Result<Status> {
    fetch_as(socket, What::Full).await
}

/// The status without the tables that grow with routes (what `xnet top` refreshes).
pub async fn fetch_brief(socket: &Path) -> Result<Status> {
    fetch_as(socket, What::Brief).await
}

/// The config the agent runs (for `xnet check --diff`).
pub async fn fetch_config(socket: &Path) -> Result<crate::config::Config> {
    fetch_as(socket, What::Config)
        .await?
        .running_config
        .context("the agent did not send its config")
}

/// What a client asks of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    Full,
    /// Without routes, neighbours and the RIB's first prefixes.
    Brief,
    /// A brief status with the running config.
    Config,
}

impl What {
    /// The line a client writes on the status socket before it reads (then it shuts down
    /// its side). A client that writes nothing gets the full status.
    pub fn request(self) -> &'static [u8] {
        match self {
            What::Full => b"full\n",
            What::Brief => b"brief\n",
            What::Config => b"config\n",
        }
    }

    pub fn parse(line: &[u8]) -> What {
        [What::Brief, What::Config]
            .into_iter()
            .find(|w| line.starts_with(w.request()))
            .unwrap_or(What::Full)
    }
}

/// A status wanted from the agent's loop (by the status socket or the metrics server):
/// the loop owns the state and answers on `reply`.
pub struct Request {
    pub what: What,
    pub reply: tokio::sync::oneshot::Sender<Status>,
}

async fn fetch_as(socket: &Path, what: What) -> Result<Status> {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| {
            format!(
                "connecting to the agent at {} (is `xnet run` running?)",
                socket.display()
            )
        })?;
    stream.write_all(what.request()).await?;
    stream.shutdown().await?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await?;
    serde_json::from_slice(&buf).context("the agent's answer is not valid status JSON")
}
