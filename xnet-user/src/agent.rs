//! The agent: applies a config to the data plane and the kernel, keeps next-hop MACs and
//! local addresses current, serves status, reloads routes on SIGHUP, and undoes everything
//! on SIGINT/SIGTERM. SIGUSR1 exits for a graceful restart instead: forwarding goes on and
//! BGP peers keep our routes until the next agent takes over (see `restart`).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ipnet::IpNet;
use log::{error, info, warn};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

use tokio::sync::mpsc;
use xnet_common::{IF_F_DEFAULT_DENY, IF_F_FIREWALL};

use std::sync::Arc;

use crate::bgp::fsm::Event;
use crate::bgp::graceful::Stale;
use crate::bgp::rib::{self, Rib};
use crate::bgp::Speaker;
use crate::config::{Config, DefaultAction, FailureMode, Role, XdpMode};
use crate::dataplane::{Dataplane, NhKey};
use crate::health;
use crate::kernel::{unspecified, Kernel, MAIN_TABLE, RULE_PRIORITY};
use crate::status::{self, Status};

/// A route as the agent applies it: segment id, prefix, next hops.
/// Routes with their next hops; the next-hop lists are shared (a full table has few).
type RouteSet = crate::fastmap::Map<(u32, IpNet), Arc<[NhKey]>>;

struct Agent {
    path: PathBuf,
    config: Config,
    kernel: Kernel,
    dp: Dataplane,
    /// Interface name → (ifindex, MAC).
    links: HashMap<String, (u32, [u8; 6])>,
    routes: RouteSet,
    managed: crate::fastmap::Set<(u32, IpAddr)>,
    /// Next hops whose neighbour entry the operator made permanent: left alone.
    operator_neighbours: crate::fastmap::Set<(u32, IpAddr)>,
    rules: Vec<String>,
    /// Per service, per instance: health as the data plane uses it.
    health: Vec<Vec<InstanceHealth>>,
    probes: Option<mpsc::Receiver<health::Probe>>,
    /// Hits of each `log = true` rule when last logged.
    logged_hits: HashMap<usize, u64>,
    bgp: Option<Speaker>,
    rib: Rib,
    /// BGP routes in the data plane, with the next hops they use.
    bgp_routes: RouteSet,
    /// Connected subnets (ifindex, interface prefix), to resolve BGP next hops.
    connected: Vec<(u32, IpNet)>,
    /// Kernel FIB updates for learned routes, written by a task of their own so a full
    /// table never holds up the data plane.
    fib: Option<mpsc::UnboundedSender<FibOp>>,
    /// Graceful restart, new agent: the XDP links the previous agent left (ifindex, pin),
    /// taken over once routes are selected; and when we started.
    handover: Vec<(u32, PathBuf)>,
    started: Instant,
    /// Peers whose initial routes are all in (End-of-RIB, or no graceful restart).
    converged: HashSet<IpAddr>,
    /// Graceful restart, helper side: routes of restarting peers.
    stale: Stale,
    /// Restart time each peer announced (graceful restart negotiated).
    peer_restart_time: HashMap<IpAddr, u16>,
    ike: Option<crate::ike::daemon::IkeHandle>,
    /// Routes into IPsec tunnels that are up: connector index → (segment, prefix).
    tunnel_routes: HashMap<usize, Vec<(u32, IpNet)>>,
    /// Host routes in the main table to BGP peers inside a tunnel, by connector.
    tunnel_peers: HashMap<usize, Vec<IpNet>>,
    /// How the kernel FIB reaches each tunnel that is up: (ifindex, gateway; unspecified
    /// for a device route into an xfrm interface), by tunnel endpoint.
    tunnel_kernel_hops: HashMap<IpAddr, (u32, IpAddr)>,
    /// Route-based connectors: index → (xfrm interface, its ifindex).
    xfrm_links: HashMap<usize, (String, u32)>,
}

enum FibOp {
    Replace(u32, IpNet, Vec<(u32, IpAddr)>),
    Delete(u32, IpNet),
}

#[derive(Debug, Clone, Copy, Default)]
struct InstanceHealth {
    /// None until the first probe answers.
    up: Option<bool>,
    /// Consecutive probes that disagree with `up`.
    streak: u32,
}

/// Runs the agent on `path` until SIGINT or SIGTERM.
pub async fn run(path: &Path) -> Result<()> {
    let config = Config::load(path)?;
    let kernel = Kernel::connect()?;
    // Resolve every interface before touching anything, so a typo changes nothing.
    let mut links = HashMap::new();
    for (i, itf) in config.interfaces.iter().enumerate() {
        let l = kernel
            .link(&itf.name)
            .await
            .with_context(|| format!("{}: interfaces[{i}].name", path.display()))?;
        links.insert(itf.name.clone(), (l.ifindex, l.mac));
    }
    let routes = route_set(&config, &links);
    let dp = Dataplane::load(config.agent.route_table_groups)?;
    let mut agent = Agent {
        path: path.to_path_buf(),
        config,
        kernel,
        dp,
        links,
        routes: RouteSet::default(),
        managed: Default::default(),
        operator_neighbours: Default::default(),
        rules: Vec::new(),
        health: Vec::new(),
        probes: None,
        logged_hits: HashMap::new(),
        bgp: None,
        rib: Rib::new(1),
        bgp_routes: RouteSet::default(),
        connected: Vec::new(),
        fib: None,
        handover: Vec::new(),
        started: Instant::now(),
        converged: HashSet::new(),
        stale: Stale::default(),
        peer_restart_time: HashMap::new(),
        ike: None,
        tunnel_routes: HashMap::new(),
        xfrm_links: HashMap::new(),
        tunnel_peers: HashMap::new(),
        tunnel_kernel_hops: HashMap::new(),
    };
    let result = match agent.start(routes).await {
        Ok(()) => agent.serve().await,
        Err(e) => Err(e),
    };
    match result {
        Ok(Exit::Restart) => agent.exit_for_restart().await,
        _ => agent.stop().await,
    }
    result.map(|_| ())
}

/// How the agent leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// Undo everything.
    Stop,
    /// Leave forwarding running for the next agent (SIGUSR1).
    Restart,
}

fn route_set(config: &Config, links: &HashMap<String, (u32, [u8; 6])>) -> RouteSet {
    config
        .routes
        .iter()
        .map(|r| {
            let seg = config.segment_id(&r.segment).expect("validated");
            let hops = r
                .next_hops
                .iter()
                .map(|h| NhKey {
                    ifindex: links[&h.interface].0,
                    via: h.via,
                })
                .collect();
            ((seg, r.prefix), hops)
        })
        .collect()
}

async fn recv(rx: &mut Option<mpsc::Receiver<health::Probe>>) -> Option<health::Probe> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The `[bgp]` settings a reload cannot change (everything but the neighbours).
fn bgp_globals(c: &Config) -> Option<(u32, std::net::Ipv4Addr, u16, usize)> {
    c.bgp
        .as_ref()
        .map(|b| (b.asn, b.router_id, b.port, b.multipath))
}

async fn recv_tunnel(
    ike: &mut Option<crate::ike::daemon::IkeHandle>,
) -> Option<crate::ike::daemon::TunnelEvent> {
    match ike {
        Some(h) => h.events.recv().await,
        None => std::future::pending().await,
    }
}

/// The data plane's key for a tunnel's routes of `net`'s family: its remote address, or
/// for inner prefixes of the other family, that address mapped into it (IPv4-mapped IPv6;
/// an IPv6 underlay's IPv4 routes use its last 32 bits). Only a key: XDP passes tunnel
/// traffic to the kernel.
fn tunnel_key(remote: IpAddr, net: &IpNet) -> IpAddr {
    match (remote, net) {
        (IpAddr::V4(a), IpNet::V6(_)) => IpAddr::V6(a.to_ipv6_mapped()),
        (IpAddr::V6(a), IpNet::V4(_)) => {
            let o = a.octets();
            IpAddr::from([o[12], o[13], o[14], o[15]])
        }
        _ => remote,
    }
}

async fn recv_bgp(s: &mut Option<Speaker>) -> Option<(u64, Event)> {
    match s {
        Some(s) => s.events.recv().await,
        None => std::future::pending().await,
    }
}

impl Agent {
    fn segment_name(&self, id: u32) -> &str {
        self.config
            .segments
            .get(id as usize - 1)
            .map(|s| s.name.as_str())
            .unwrap_or("?")
    }

    fn link_name(&self, ifindex: u32) -> String {
        self.links
            .iter()
            .find(|(_, (i, _))| *i == ifindex)
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| ifindex.to_string())
    }

    async fn start(&mut self, routes: RouteSet) -> Result<()> {
        let c = self.config.clone();
        // A previous agent's XDP links (graceful restart): ours are taken over later;
        // those of interfaces no longer configured detach now.
        let ours: HashSet<u32> = self.links.values().map(|(i, _)| *i).collect();
        for (ifindex, pin) in Dataplane::pinned(&crate::restart::dir(&c.agent.pin_dir)) {
            if ours.contains(&ifindex) {
                self.handover.push((ifindex, pin));
            } else if std::fs::remove_file(&pin).is_ok() {
                info!("ifindex {ifindex}: XDP left by the previous agent detached (no longer configured)");
            }
        }
        if !self.handover.is_empty() {
            info!(
                "graceful restart: the previous agent's XDP keeps forwarding on {} interfaces until routes are selected",
                self.handover.len()
            );
        }
        for (i, _) in c.segments.iter().enumerate() {
            self.dp.add_segment(i as u32 + 1)?;
        }
        for itf in &c.interfaces {
            let (ifindex, mac) = self.links[&itf.name];
            let seg = c.segments.iter().find(|s| s.name == itf.segment).unwrap();
            let mut flags = 0;
            if itf.role == Role::Firewall {
                flags |= IF_F_FIREWALL;
            }
            if seg.default_action == DefaultAction::Deny {
                flags |= IF_F_DEFAULT_DENY;
            }
            self.dp
                .set_interface(ifindex, c.segment_id(&itf.segment).unwrap(), mac, flags)?;
        }
        self.apply_routes(routes).await?;
        self.start_services().await?;
        self.apply_policy()?;
        self.start_bgp().await?;
        self.create_xfrm_interfaces().await?;
        let if_ids = self
            .xfrm_links
            .keys()
            .map(|&i| (i, crate::ike::daemon::reqid(i)))
            .collect();
        self.ike =
            crate::ike::daemon::start(&self.config, &self.path.display().to_string(), &if_ids)
                .await?;
        self.sync_kernel_state().await?;
        self.tunnel_policy()?;
        // Maps are complete before the first packet meets the program.
        let generic = c.agent.xdp_mode == XdpMode::Generic;
        if generic {
            warn!("xdp_mode = \"generic\": XDP runs after the kernel allocates an skb; expect far lower throughput than native mode");
        }
        for itf in &c.interfaces {
            let (ifindex, _) = self.links[&itf.name];
            if self.handover.iter().any(|(i, _)| *i == ifindex) {
                continue;
            }
            self.dp.attach(ifindex, generic).with_context(|| {
                format!("{}: interfaces: {} (set agent.xdp_mode = \"generic\" if its driver has no native XDP)", self.path.display(), itf.name)
            })?;
            info!(
                "attached XDP to {} (ifindex {ifindex}, {} mode, segment {})",
                itf.name,
                if generic { "generic" } else { "native" },
                itf.segment
            );
        }
        if c.agent.kernel_fib {
            for itf in &c.interfaces {
                let table = c
                    .segments
                    .iter()
                    .find(|s| s.name == itf.segment)
                    .unwrap()
                    .table;
                self.kernel
                    .add_segment_rules(&itf.name, table, RULE_PRIORITY)
                    .await?;
                self.rules.push(itf.name.clone());
            }
        }
        if self.handover.is_empty() {
            // A crashed agent may have left routes in the kernel.
            self.sweep_kernel_routes().await;
        }
        info!(
            "xnet agent running: {} interfaces, {} routes, status on {}",
            c.interfaces.len(),
            self.routes.len(),
            c.agent.socket.display()
        );
        Ok(())
    }

    /// Removes the kernel routes (protocol 250) in segment tables that we do not want.
    async fn sweep_kernel_routes(&mut self) {
        if !self.config.agent.kernel_fib {
            return;
        }
        let tables: HashMap<u32, u32> = self
            .config
            .segments
            .iter()
            .enumerate()
            .map(|(i, s)| (s.table, i as u32 + 1))
            .collect();
        let ours = match self.kernel.our_routes().await {
            Ok(r) => r,
            Err(e) => {
                warn!("listing kernel routes: {e:#}");
                return;
            }
        };
        let mut n = 0;
        for (table, net) in ours {
            let Some(seg) = tables.get(&table) else {
                continue;
            };
            if self.routes.contains_key(&(*seg, net)) || self.bgp_routes.contains_key(&(*seg, net))
            {
                continue;
            }
            n += 1;
            match &self.fib {
                Some(f) => {
                    let _ = f.send(FibOp::Delete(table, net));
                }
                None => {
                    let _ = self.kernel.delete_route(table, net).await;
                }
            }
        }
        if n > 0 {
            info!("removed {n} kernel routes a previous agent left");
        }
    }

    /// Graceful restart, new agent: once every peer has sent its routes (End-of-RIB) or
    /// `restart_time` is over, and the firewall health checks have answered (or 5 s
    /// passed), puts our program behind the previous agent's links and lets our
    /// advertisements go.
    async fn maybe_finish_restart(&mut self) {
        let bgp_pending = self.bgp.as_ref().is_some_and(|b| b.restarting());
        if self.handover.is_empty() && !bgp_pending {
            return;
        }
        let waited = self.started.elapsed();
        let deadline = Duration::from_secs(
            self.config
                .bgp
                .as_ref()
                .map(|b| b.restart_time)
                .unwrap_or(0) as u64,
        );
        let peers_done = self
            .bgp
            .as_ref()
            .is_none_or(|b| b.peers.iter().all(|p| self.converged.contains(&p.address)));
        let health_done = self.health.iter().flatten().all(|h| h.up.is_some());
        if !((peers_done || waited >= deadline)
            && (health_done || waited >= Duration::from_secs(5)))
        {
            return;
        }
        let generic = self.config.agent.xdp_mode == XdpMode::Generic;
        for (ifindex, pin) in std::mem::take(&mut self.handover) {
            let name = self.link_name(ifindex);
            if let Err(e) = self.dp.take_over(ifindex, &pin) {
                // Never leave an interface without XDP: drop the old one, attach ours.
                warn!("{name}: {e:#}: detaching the previous agent's XDP and attaching ours");
                let _ = std::fs::remove_file(&pin);
                if let Err(e) = self.dp.attach(ifindex, generic) {
                    error!("{name}: attaching XDP: {e:#}");
                }
            }
        }
        if let Some(b) = &self.bgp {
            b.restart_done();
        }
        for seg in 1..=self.config.segments.len() as u32 {
            self.readvertise(seg);
        }
        self.sweep_kernel_routes().await;
        info!(
            "graceful restart complete after {:.1} s: our XDP program forwards now ({} of {} BGP peers sent End-of-RIB, {} BGP routes)",
            waited.as_secs_f64(),
            self.converged.len(),
            self.bgp.as_ref().map(|b| b.peers.len()).unwrap_or(0),
            self.bgp_routes.len()
        );
    }

    /// Makes the applied routes equal to `want`: data plane first, then the kernel mirror.
    async fn apply_routes(&mut self, want: RouteSet) -> Result<()> {
        let old = std::mem::take(&mut self.routes);
        for ((seg, net), hops) in &want {
            if old.get(&(*seg, *net)) == Some(hops) {
                continue;
            }
            self.dp
                .set_route(*seg, *net, hops)
                .with_context(|| format!("route {net} in segment {}", self.segment_name(*seg)))?;
            for h in hops.iter() {
                self.manage_neighbour(h.ifindex, h.via).await;
            }
            if self.config.agent.kernel_fib {
                let table = self.config.segments[*seg as usize - 1].table;
                let kh: Vec<(u32, IpAddr)> = hops.iter().map(|h| (h.ifindex, h.via)).collect();
                if let Err(e) = self.kernel.replace_route(table, *net, &kh).await {
                    warn!("{e:#}: the slow path will not have this route");
                }
            }
            info!(
                "route {net} in segment {} via {}",
                self.segment_name(*seg),
                hops.iter()
                    .map(|h| format!("{} dev {}", h.via, self.link_name(h.ifindex)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for (seg, net) in old.keys() {
            if want.contains_key(&(*seg, *net)) {
                continue;
            }
            self.dp.remove_route(*seg, *net)?;
            if self.config.agent.kernel_fib {
                let table = self.config.segments[*seg as usize - 1].table;
                if let Err(e) = self.kernel.delete_route(table, *net).await {
                    warn!("{e:#}");
                }
            }
            info!(
                "route {net} removed from segment {}",
                self.segment_name(*seg)
            );
        }
        self.routes = want;
        Ok(())
    }

    fn instance_key(&self, service: usize, instance: usize) -> NhKey {
        let i = &self.config.services[service].instances[instance];
        NhKey {
            ifindex: self.links[&i.interface].0,
            via: i.via,
        }
    }

    /// Declares the firewall services (no instance used until its first probe answers)
    /// and starts their health checks.
    async fn start_services(&mut self) -> Result<()> {
        let (tx, rx) = mpsc::channel(256);
        let services = self.config.services.clone();
        for (si, svc) in services.iter().enumerate() {
            let keys: Vec<NhKey> = (0..svc.instances.len())
                .map(|ii| self.instance_key(si, ii))
                .collect();
            self.dp
                .set_service(si as u32, &keys, svc.failure_mode == FailureMode::Closed)?;
            for k in &keys {
                self.manage_neighbour(k.ifindex, k.via).await;
            }
            for (ii, inst) in svc.instances.iter().enumerate() {
                health::spawn(si, ii, inst.via, svc.health.clone(), tx.clone());
            }
            self.health
                .push(vec![InstanceHealth::default(); svc.instances.len()]);
            info!(
                "service {}: {} instances, fail-{}, {:?} health check every {} ms",
                svc.name,
                keys.len(),
                if svc.failure_mode == FailureMode::Closed {
                    "closed"
                } else {
                    "open"
                },
                svc.health.kind,
                svc.health.interval_ms
            );
        }
        self.probes = Some(rx);
        Ok(())
    }

    /// Compiles the policies and swaps them in atomically.
    fn apply_policy(&mut self) -> Result<()> {
        let dp = &self.dp;
        let services = &self.config.services;
        let compiled = crate::policy::compile(
            &self.config,
            &|seg| dp.segment_roots(seg).unwrap_or((0, 0)),
            &|name| services.iter().position(|s| s.name == name).unwrap_or(0) as u32,
        )
        .map_err(|e| anyhow::anyhow!("{}: policies: {e}", self.path.display()))?;
        self.dp.set_policy(&compiled)?;
        if !self.config.policies.is_empty() {
            info!(
                "policy: {} rules in {} tuples, {} entries",
                self.config.policies.len(),
                compiled.tuples.len(),
                compiled.entries.len()
            );
        }
        Ok(())
    }

    /// Starts the BGP speaker, if configured, and the kernel-FIB writer for its routes.
    async fn start_bgp(&mut self) -> Result<()> {
        let Some(b) = &self.config.bgp else {
            return Ok(());
        };
        self.rib = Rib::new(b.multipath);
        self.connected = self.kernel.connected().await?;
        if self.config.agent.kernel_fib {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let kernel = Kernel::connect()?;
            tokio::spawn(async move {
                while let Some(op) = rx.recv().await {
                    let r = match op {
                        FibOp::Replace(t, net, hops) => kernel.replace_route(t, net, &hops).await,
                        FibOp::Delete(t, net) => kernel.delete_route(t, net).await,
                    };
                    if let Err(e) = r {
                        log::debug!("kernel FIB: {e:#}");
                    }
                }
            });
            self.fib = Some(tx);
        }
        let own = self.connected.iter().map(|(_, n)| n.addr()).collect();
        self.bgp = Speaker::start(
            &self.config,
            &self.path.display().to_string(),
            !self.handover.is_empty(),
            own,
        )
        .await?;
        for seg in 1..=self.config.segments.len() as u32 {
            self.readvertise(seg);
        }
        Ok(())
    }

    /// The segment's routes for advertisement: static ones, then learned ones.
    fn readvertise(&self, segment: u32) {
        let Some(bgp) = &self.bgp else { return };
        if !bgp
            .peers
            .iter()
            .any(|p| p.segment == segment && p.advertise == crate::config::Advertise::All)
        {
            bgp.readvertise(segment, &[]);
            return;
        }
        let mut routes: Vec<crate::bgp::SegmentRoute> = self
            .routes
            .keys()
            .filter(|(s, _)| *s == segment)
            .map(|(_, n)| (*n, None))
            .collect();
        for (seg, net) in self.bgp_routes.keys().filter(|(s, _)| *s == segment) {
            if let Some((best, _)) = self.selected(*seg, net).first() {
                routes.push((*net, Some((best.peer(), best.route.clone()))));
            }
        }
        bgp.readvertise(segment, &routes);
    }

    async fn on_bgp(&mut self, (session, ev): (u64, Event)) {
        // The last words of a session stopped by a reconfiguration: ignore them.
        if !self
            .bgp
            .as_ref()
            .is_some_and(|b| b.peers.iter().any(|p| p.session == session))
        {
            return;
        }
        let local_restart = self
            .config
            .bgp
            .as_ref()
            .map(|b| b.restart_time)
            .unwrap_or(0);
        let changed = match ev {
            Event::Established {
                peer,
                graceful_restart,
                ..
            } => {
                info!("bgp: {peer} established");
                let family = if peer.is_ipv4() { (1, 1) } else { (2, 1) };
                let kept = graceful_restart
                    .as_ref()
                    .is_some_and(|g| g.forwarding(family.0, family.1));
                if graceful_restart.is_none() {
                    // No End-of-RIB to wait for.
                    self.converged.insert(peer);
                }
                // Its routes are kept across its restarts only for the families its
                // capability lists (RFC 4724 §4.2).
                match graceful_restart
                    .as_ref()
                    .filter(|g| g.families.iter().any(|(a, s, _)| (*a, *s) == family))
                {
                    Some(g) => self.peer_restart_time.insert(peer, g.restart_time),
                    None => self.peer_restart_time.remove(&peer),
                };
                if !self.stale.has(peer) {
                    return;
                }
                if kept {
                    let n = self.stale.rearm(peer, local_restart);
                    info!("bgp: {peer} is back from a graceful restart: its {n} stale routes stay until its End-of-RIB");
                    return;
                }
                // It did not keep forwarding (F bit clear) or no longer does graceful
                // restart: its old routes are void now.
                self.drop_stale(peer, "the peer did not keep its forwarding state")
            }
            Event::EndOfRib { peer } => {
                self.converged.insert(peer);
                if self.stale.has(peer) {
                    self.drop_stale(peer, "End-of-RIB")
                } else {
                    Vec::new()
                }
            }
            Event::Down {
                peer,
                reason,
                graceful,
            } => {
                self.converged.remove(&peer);
                match self.peer_restart_time.get(&peer).copied() {
                    Some(secs) if graceful && secs > 0 => {
                        let n = self.stale.keep(peer, self.rib.prefixes_of(peer), secs);
                        info!("bgp: {peer} down ({reason}): graceful restart, its {n} routes stay (stale) for up to {secs} s");
                        Vec::new()
                    }
                    _ => {
                        self.stale.take(peer);
                        let changed = self.rib.peer_down(peer);
                        info!(
                            "bgp: {peer} down ({reason}): {} prefixes changed",
                            changed.len()
                        );
                        changed
                    }
                }
            }
            Event::Update {
                peer,
                peer_id,
                ebgp,
                update,
            } => self.on_update(peer, peer_id, ebgp, *update),
        };
        if let Err(e) = self.apply_bgp(changed).await {
            warn!("bgp: {e:#}");
        }
    }

    /// Has the kernel keep next hop `ip` resolved (once per next hop), unless the operator
    /// set its entry by hand: that one stays as it is, and stays when we stop.
    async fn manage_neighbour(&mut self, ifindex: u32, ip: IpAddr) {
        if self.managed.contains(&(ifindex, ip))
            || self.operator_neighbours.contains(&(ifindex, ip))
        {
            return;
        }
        match self.kernel.manage_neighbour(ifindex, ip).await {
            Ok(true) => {
                self.managed.insert((ifindex, ip));
            }
            Ok(false) => {
                info!("next hop {ip} (ifindex {ifindex}): keeping the permanent neighbour entry set by hand");
                self.operator_neighbours.insert((ifindex, ip));
            }
            Err(e) => warn!("{e:#}: XDP will use {ip} once the kernel resolves it by itself"),
        }
    }

    /// Route-based connectors get their xfrm interface, and with the kernel FIB, the
    /// segment's `ip rule` for it (decrypted traffic is routed in its segment). A kernel
    /// without xfrm interfaces leaves the connector policy-based, said in the log.
    async fn create_xfrm_interfaces(&mut self) -> Result<()> {
        for (i, c) in self.config.ipsec.clone().iter().enumerate() {
            let Some(name) = &c.interface else { continue };
            let if_id = crate::ike::daemon::reqid(i);
            match self.kernel.create_xfrm_interface(name, if_id).await {
                Ok(ifindex) => {
                    if self.config.agent.kernel_fib {
                        let seg = self.config.segment_id(&c.segment).expect("validated");
                        let table = self.config.segments[seg as usize - 1].table;
                        self.kernel
                            .add_segment_rules(name, table, RULE_PRIORITY)
                            .await?;
                        self.rules.push(name.clone());
                    }
                    info!(
                        "ipsec {}: route-based: xfrm interface {name} (if_id 0x{if_id:x}) in segment {}",
                        c.name, c.segment
                    );
                    self.xfrm_links.insert(i, (name.clone(), ifindex));
                }
                Err(e) => warn!(
                    "ipsec {}: {e:#}: the tunnel is policy-based instead (its traffic selectors decide what enters it)",
                    c.name
                ),
            }
        }
        Ok(())
    }

    /// Decrypted traffic meets the same policy as the rest: each connector's packets are
    /// put in its segment (`TUNNELS`), and the TC program that picks them out runs where
    /// they re-enter the stack: the xfrm interfaces (route-based) and the config's
    /// interfaces (policy-based tunnels' packets come back in where their ESP arrived).
    fn tunnel_policy(&mut self) -> Result<()> {
        let c = self.config.clone();
        if c.ipsec.is_empty() {
            return Ok(());
        }
        for (i, t) in c.ipsec.iter().enumerate() {
            let seg = c.segment_id(&t.segment).expect("validated");
            let deny = c.segments[seg as usize - 1].default_action == DefaultAction::Deny;
            self.dp
                .set_tunnel(i as u32, seg, if deny { IF_F_DEFAULT_DENY } else { 0 })
                .with_context(|| format!("ipsec {}", t.name))?;
        }
        let names: Vec<String> = self
            .xfrm_links
            .values()
            .map(|(n, _)| n.clone())
            .chain(c.interfaces.iter().map(|i| i.name.clone()))
            .collect();
        for name in names {
            self.dp.attach_tunnel_in(&name)?;
        }
        info!("decrypted IPsec traffic goes through policy (TC ingress on the xfrm interfaces and the underlay)");
        Ok(())
    }

    /// An IPsec connector's tunnel came up or went down: its prefixes are routed into it
    /// (XDP passes them to the kernel, whose XFRM policies encrypt; the segment's kernel
    /// table sends them toward the tunnel endpoint) or taken out again.
    async fn on_tunnel(&mut self, ev: crate::ike::daemon::TunnelEvent) {
        use crate::ike::daemon::TunnelEvent;
        match ev {
            TunnelEvent::Up(i) => {
                let Some(c) = self.config.ipsec.get(i).cloned() else {
                    return;
                };
                let seg = self.config.segment_id(&c.segment).expect("validated");
                let table = self.config.segments[seg as usize - 1].table;
                let underlay = match self.kernel.route_to(c.remote_address).await {
                    Ok((oif, gw)) => Some((oif, gw.unwrap_or(c.remote_address))),
                    Err(e) => {
                        warn!(
                            "ipsec {}: {e:#}: the slow path will not route into the tunnel",
                            c.name
                        );
                        None
                    }
                };
                // How the kernel reaches the tunnel: into its xfrm interface (route-based:
                // a device route, its policies encrypt), or toward the endpoint
                // (policy-based: XFRM policies catch it there).
                let kernel_hop = match (self.xfrm_links.get(&i), underlay) {
                    (Some((_, xi)), _) => Some((*xi, unspecified(c.remote_address))),
                    (None, hop) => hop,
                };
                if let Some(h) = kernel_hop {
                    self.tunnel_kernel_hops.insert(c.remote_address, h);
                }
                let prefixes = if c.routes.is_empty() {
                    c.remote_ts.clone()
                } else {
                    c.routes.clone()
                };
                let mut done = Vec::new();
                for net in prefixes {
                    let hop = NhKey {
                        ifindex: crate::dataplane::TUNNEL,
                        via: tunnel_key(c.remote_address, &net),
                    };
                    if let Err(e) = self.dp.set_route(seg, net, &[hop]) {
                        warn!("ipsec {}: route {net}: {e:#}", c.name);
                        continue;
                    }
                    if self.config.agent.kernel_fib {
                        // Inner prefixes of the other family than the underlay: a device
                        // route, XFRM does the rest.
                        let h = kernel_hop.map(|(oif, gw)| match (gw, net) {
                            (IpAddr::V4(_), IpNet::V6(_)) | (IpAddr::V6(_), IpNet::V4(_)) => {
                                (oif, unspecified(net.addr()))
                            }
                            _ => (oif, gw),
                        });
                        self.kernel_tunnel_route(&c.name, table, net, h).await;
                    }
                    done.push((seg, net));
                }
                // BGP peers inside the tunnel (a VPN gateway's or a vWAN hub's BGP
                // address): our own session packets follow the main table, so each gets a
                // host route into the tunnel there.
                let peers: Vec<IpNet> = self
                    .config
                    .bgp
                    .iter()
                    .flat_map(|b| &b.neighbors)
                    .filter(|n| {
                        n.segment == c.segment
                            && done.iter().any(|(_, net)| net.contains(&n.address))
                    })
                    .map(|n| IpNet::from(n.address))
                    .collect();
                for host in &peers {
                    self.kernel_tunnel_route(&c.name, MAIN_TABLE, *host, kernel_hop)
                        .await;
                    info!(
                        "ipsec {}: BGP peer {} is reached through the tunnel",
                        c.name,
                        host.addr()
                    );
                }
                self.tunnel_peers.insert(i, peers);
                // Paths learned earlier whose next hop lies in the tunnel are usable again
                // (a second tunnel's session outlived this one's outage, say).
                let reachable: Vec<(u32, IpNet)> = self
                    .rib
                    .all()
                    .filter(|((s, _), paths)| {
                        *s == seg
                            && paths
                                .iter()
                                .any(|p| done.iter().any(|(_, n)| n.contains(&p.next_hop())))
                    })
                    .map(|(k, _)| *k)
                    .collect();
                info!(
                    "ipsec {}: tunnel up: {} routed into it in segment {}",
                    c.name,
                    done.iter()
                        .map(|(_, n)| n.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    c.segment
                );
                self.tunnel_routes.insert(i, done);
                if !reachable.is_empty() {
                    if let Err(e) = self.apply_bgp(reachable).await {
                        warn!("bgp: {e:#}");
                    }
                }
            }
            TunnelEvent::Down(i) => {
                for host in self.tunnel_peers.remove(&i).unwrap_or_default() {
                    let _ = self.kernel.delete_route(MAIN_TABLE, host).await;
                }
                let Some(routes) = self.tunnel_routes.remove(&i) else {
                    return;
                };
                self.remove_tunnel_routes(&routes).await;
                // BGP routes learned over the tunnel lose their next hop.
                if let Some(c) = self.config.ipsec.get(i).cloned() {
                    self.tunnel_kernel_hops.remove(&c.remote_address);
                    let through: Vec<(u32, IpNet)> = self
                        .bgp_routes
                        .iter()
                        .filter(|(_, hops)| {
                            hops.iter().any(|h| {
                                h.ifindex == crate::dataplane::TUNNEL && h.via == c.remote_address
                            })
                        })
                        .map(|(k, _)| *k)
                        .collect();
                    if let Err(e) = self.apply_bgp(through).await {
                        warn!("bgp: {e:#}");
                    }
                    info!("ipsec {}: tunnel down: its routes are gone", c.name);
                }
            }
        }
    }

    /// A kernel route for `net` in `table` into connector `name`'s tunnel by `hop`.
    async fn kernel_tunnel_route(
        &self,
        name: &str,
        table: u32,
        net: IpNet,
        hop: Option<(u32, IpAddr)>,
    ) {
        if let Some(h) = hop {
            if let Err(e) = self.kernel.replace_route(table, net, &[h]).await {
                warn!("ipsec {name}: {e:#}");
            }
        }
    }

    /// The kernel FIB's next hops for data-plane next hops: a tunnel next hop becomes the
    /// way the kernel reaches that tunnel (one that is down has none).
    fn kernel_hops(&self, hops: &[NhKey]) -> Vec<(u32, IpAddr)> {
        hops.iter()
            .filter_map(|h| {
                if h.ifindex == crate::dataplane::TUNNEL {
                    self.tunnel_kernel_hops.get(&h.via).copied()
                } else {
                    Some((h.ifindex, h.via))
                }
            })
            .collect()
    }

    /// Takes tunnel routes out; a static or learned route for the same prefix comes back.
    async fn remove_tunnel_routes(&mut self, routes: &[(u32, IpNet)]) {
        for (seg, net) in routes {
            let table = self.config.segments[*seg as usize - 1].table;
            let back = self
                .routes
                .get(&(*seg, *net))
                .or_else(|| self.bgp_routes.get(&(*seg, *net)))
                .cloned();
            match back {
                Some(hops) => {
                    let _ = self.dp.set_route(*seg, *net, &hops);
                    let kh = self.kernel_hops(&hops);
                    let _ = self.kernel.replace_route(table, *net, &kh).await;
                }
                None => {
                    let _ = self.dp.remove_route(*seg, *net);
                    if self.config.agent.kernel_fib {
                        let _ = self.kernel.delete_route(table, *net).await;
                    }
                }
            }
        }
    }

    /// Withdraws the routes of `peer` still stale.
    fn drop_stale(&mut self, peer: IpAddr, why: &str) -> Vec<(u32, IpNet)> {
        let keys = self.stale.take(peer);
        let n = keys.len();
        let changed: Vec<(u32, IpNet)> = keys
            .into_iter()
            .filter(|(s, net)| self.rib.withdraw(*s, *net, peer))
            .collect();
        info!("bgp: {peer}: {why}: {n} stale routes removed");
        changed
    }

    /// Helper side: restarting peers that did not come back in time lose their routes.
    async fn expire_stale(&mut self) {
        let mut changed = Vec::new();
        for peer in self.stale.expired(Instant::now()) {
            changed.extend(self.drop_stale(peer, "restart time over"));
        }
        if !changed.is_empty() {
            if let Err(e) = self.apply_bgp(changed).await {
                warn!("bgp: {e:#}");
            }
        }
    }

    /// Applies one UPDATE to the RIB; returns the prefixes whose selection changed.
    fn on_update(
        &mut self,
        peer: IpAddr,
        peer_id: std::net::Ipv4Addr,
        ebgp: bool,
        u: crate::bgp::packet::Update,
    ) -> Vec<(u32, IpNet)> {
        let Some(p) = self
            .bgp
            .as_ref()
            .and_then(|b| b.peers.iter().find(|p| p.address == peer))
        else {
            return Vec::new();
        };
        let seg = p.segment;
        let import = (!p.import.is_identity()).then(|| p.import.clone());
        let local_asn = self.config.bgp.as_ref().map(|b| b.asn).unwrap_or(0);
        let mut changed = Vec::new();
        // Only a peer back from a graceful restart has stale routes to refresh.
        let stale = self.stale.has(peer);
        let withdrawn = u
            .withdrawn
            .iter()
            .chain(u.mp_unreach.iter().flat_map(|m| m.withdrawn.iter()));
        for net in withdrawn {
            if stale {
                self.stale.refreshed(peer, &(seg, *net));
            }
            if self.rib.withdraw(seg, *net, peer) {
                changed.push((seg, *net));
            }
        }
        let Some(attrs) = u.attrs else { return changed };
        let looped = attrs.as_path.iter().any(|s| s.asns.contains(&local_asn));
        let src = Arc::new(rib::Source {
            peer,
            peer_id,
            ebgp,
        });
        let v4 = attrs.next_hop.map(|nh| (IpAddr::V4(nh), u.nlri));
        let mp = u.mp_reach.and_then(|m| m.next_hop.map(|nh| (nh, m.nlri)));
        for (next_hop, nlri) in v4.into_iter().chain(mp) {
            // Shared by every prefix of the UPDATE that import policy leaves as it is.
            let learned = Arc::new(rib::Learned {
                next_hop,
                attrs: attrs.clone(),
            });
            for net in nlri {
                if stale {
                    self.stale.refreshed(peer, &(seg, net));
                }
                // Our own AS in the path: a loop (RFC 4271 §9.1.2); treat as withdrawn.
                // Import policy: rejected prefixes are withdrawn (a route accepted before
                // may be refused now).
                let accepted = match &import {
                    None => Some(learned.clone()),
                    Some(imp) => imp
                        .apply(&net, &attrs)
                        .map(|attrs| Arc::new(rib::Learned { next_hop, attrs })),
                };
                let hit = match accepted {
                    Some(route) if !looped => self.rib.update(
                        seg,
                        net,
                        rib::Path {
                            src: src.clone(),
                            route,
                        },
                    ),
                    _ => self.rib.withdraw(seg, net, peer),
                };
                if hit {
                    changed.push((seg, net));
                }
            }
        }
        changed
    }

    /// The interface through which `next_hop` is directly reachable in `segment`.
    fn resolve(&self, segment: u32, next_hop: IpAddr) -> Option<NhKey> {
        self.connected
            .iter()
            .filter(|(i, net)| net.contains(&next_hop) && self.dp.segment_of(*i) == Some(segment))
            .max_by_key(|(_, net)| net.prefix_len())
            .map(|(i, _)| NhKey {
                ifindex: *i,
                via: next_hop,
            })
    }

    /// `resolve`, or, for a next hop that is not directly connected (eBGP multihop, iBGP),
    /// the next hops of the longest static route covering it.
    fn resolve_recursive(&self, segment: u32, next_hop: IpAddr) -> Vec<NhKey> {
        if let Some(k) = self.resolve(segment, next_hop) {
            return vec![k];
        }
        let static_route = self
            .routes
            .iter()
            .filter(|((s, net), _)| *s == segment && net.contains(&next_hop))
            .max_by_key(|((_, net), _)| net.prefix_len())
            .map(|(_, hops)| hops.clone());
        if let Some(hops) = static_route {
            return hops.to_vec();
        }
        // A peer inside an IPsec tunnel (BGP over the tunnel): its routes go into it.
        self.tunnel_routes
            .iter()
            .flat_map(|(i, r)| r.iter().map(move |(s, net)| (*i, *s, *net)))
            .filter(|(_, s, net)| *s == segment && net.contains(&next_hop))
            .max_by_key(|(_, _, net)| net.prefix_len())
            .map(|(i, _, _)| {
                vec![NhKey {
                    ifindex: crate::dataplane::TUNNEL,
                    via: self.config.ipsec[i].remote_address,
                }]
            })
            .unwrap_or_default()
    }

    /// The RIB's selection among the paths whose next hop can be reached now, each with
    /// the next hops it resolves to.
    fn selected(&self, segment: u32, net: &IpNet) -> Vec<(rib::Path, Vec<NhKey>)> {
        self.rib.selected_by(segment, net, |p| {
            let hops = self.resolve_recursive(segment, p.next_hop());
            (!hops.is_empty()).then_some(hops)
        })
    }

    /// Puts the RIB's selection for `changed` into the data plane. Static routes and the
    /// routes of IPsec tunnels that are up win over BGP for the same prefix (a tunnel's
    /// route hands BGP's back when it goes down, so BGP's stays up to date under it).
    async fn apply_bgp(&mut self, changed: Vec<(u32, IpNet)>) -> Result<()> {
        let mut segments = std::collections::BTreeSet::new();
        // Per batch: each next hop resolved once, each multipath union shared.
        let mut memo: crate::fastmap::Map<(u32, IpAddr), Option<Arc<[NhKey]>>> = Default::default();
        let mut interned: crate::fastmap::Map<Vec<NhKey>, Arc<[NhKey]>> = Default::default();
        for (seg, net) in changed {
            segments.insert(seg);
            if self.routes.contains_key(&(seg, net)) {
                continue;
            }
            let under_tunnel = self
                .tunnel_routes
                .values()
                .flatten()
                .any(|r| *r == (seg, net));
            // The selected paths' next hops: one shared list per next hop (memo), a
            // new one only for the union of several (multipath).
            let mut one: Option<Arc<[NhKey]>> = None;
            let mut union: Vec<NhKey> = Vec::new();
            self.rib.for_selected(
                seg,
                &net,
                |p| {
                    memo.entry((seg, p.next_hop()))
                        .or_insert_with(|| {
                            let mut h = self.resolve_recursive(seg, p.next_hop());
                            h.sort();
                            h.dedup();
                            (!h.is_empty()).then(|| Arc::from(h))
                        })
                        .clone()
                },
                |_, hops| match &one {
                    None => one = Some(hops),
                    Some(first) => {
                        if union.is_empty() {
                            union.extend_from_slice(first);
                        }
                        union.extend_from_slice(&hops);
                    }
                },
            );
            let hops: Arc<[NhKey]> = if union.is_empty() {
                one.unwrap_or_else(|| Arc::from([]))
            } else {
                union.sort();
                union.dedup();
                interned
                    .entry(union)
                    .or_insert_with_key(|h| Arc::from(&h[..]))
                    .clone()
            };
            let table = self.config.segments[seg as usize - 1].table;
            if hops.is_empty() {
                if self.bgp_routes.remove(&(seg, net)).is_some() && !under_tunnel {
                    self.dp.remove_route(seg, net)?;
                    if let Some(f) = &self.fib {
                        let _ = f.send(FibOp::Delete(table, net));
                    }
                }
                continue;
            }
            if self
                .bgp_routes
                .get(&(seg, net))
                .is_some_and(|h| **h == *hops)
            {
                continue;
            }
            if under_tunnel {
                self.bgp_routes.insert((seg, net), hops);
                continue;
            }
            self.dp.set_route(seg, net, &hops)?;
            for h in hops
                .iter()
                .filter(|h| h.ifindex != crate::dataplane::TUNNEL)
            {
                self.manage_neighbour(h.ifindex, h.via).await;
            }
            if let Some(f) = &self.fib {
                let _ = f.send(FibOp::Replace(table, net, self.kernel_hops(&hops)));
            }
            self.bgp_routes.insert((seg, net), hops);
        }
        for seg in segments {
            self.readvertise(seg);
        }
        Ok(())
    }

    /// Logs new hits of the rules marked `log = true` (every rule is counted anyway; the
    /// log gives a trail without a per-packet cost in XDP).
    fn log_rule_hits(&mut self) {
        let logged: Vec<usize> = self
            .config
            .policies
            .iter()
            .enumerate()
            .filter(|(_, p)| p.log)
            .map(|(i, _)| i)
            .collect();
        if logged.is_empty() {
            return;
        }
        let Ok(hits) = self.dp.rule_counters(self.config.policies.len()) else {
            return;
        };
        for i in logged {
            let now = hits[i].packets;
            let before = self.logged_hits.insert(i, now).unwrap_or(0);
            if now > before {
                let p = &self.config.policies[i];
                info!(
                    "policy {:?} (segment {}, {:?}): {} new packets, {} in all",
                    p.name,
                    p.segment,
                    p.action,
                    now - before,
                    now
                );
            }
        }
    }

    /// A probe result: moves the instance in or out of its service after `threshold`
    /// consecutive disagreeing probes (the first probe decides at once).
    async fn on_probe(&mut self, p: health::Probe) -> Result<()> {
        let svc = &self.config.services[p.service];
        let threshold = svc.health.threshold;
        let h = &mut self.health[p.service][p.instance];
        let changed = match h.up {
            None => {
                h.up = Some(p.ok);
                true
            }
            Some(up) if up == p.ok => {
                h.streak = 0;
                false
            }
            Some(_) => {
                h.streak += 1;
                if h.streak >= threshold {
                    h.up = Some(p.ok);
                    h.streak = 0;
                    true
                } else {
                    false
                }
            }
        };
        if !changed {
            return Ok(());
        }
        if p.ok {
            // The probe that just answered made the kernel resolve the instance's MAC: read
            // it now, so the instance joins the pool with a fast-path next hop instead of
            // dropping (fail-closed) its first flows until the next neighbour poll.
            self.sync_kernel_state().await?;
        }
        let svc = &self.config.services[p.service];
        let inst = &svc.instances[p.instance];
        if p.ok {
            info!(
                "service {}: instance {} ({}) is healthy: in the pool",
                svc.name, inst.name, inst.via
            );
        } else {
            warn!(
                "service {}: instance {} ({}) failed {} health checks: out of the pool",
                svc.name, inst.name, inst.via, threshold
            );
        }
        let healthy: Vec<NhKey> = (0..svc.instances.len())
            .filter(|&i| self.health[p.service][i].up == Some(true))
            .map(|i| self.instance_key(p.service, i))
            .collect();
        if healthy.is_empty() {
            warn!(
                "service {}: no healthy instance: traffic is {}",
                svc.name,
                if svc.failure_mode == FailureMode::Closed {
                    "dropped (fail-closed)"
                } else {
                    "routed around the firewall (fail-open)"
                }
            );
        }
        let closed = svc.failure_mode == FailureMode::Closed;
        self.dp
            .set_service_health(p.service as u32, &healthy, closed)
    }

    /// Re-reads the host's addresses and the neighbour table into the data plane.
    async fn sync_kernel_state(&mut self) -> Result<()> {
        let addrs = self.kernel.addresses().await?;
        self.dp.set_local_addrs(&addrs)?;
        let neighbours = self.kernel.neighbours().await?;
        // Tunnel next hops have no MAC: the kernel takes their packets.
        for (key, _) in self
            .dp
            .nexthops()
            .into_iter()
            .filter(|(k, _)| k.ifindex != crate::dataplane::TUNNEL)
        {
            let mac = neighbours
                .iter()
                .find(|n| n.ifindex == key.ifindex && n.ip == key.via)
                .and_then(|n| n.mac);
            let before = self.dp.neighbour(key.ifindex, key.via);
            if before != mac {
                self.dp.set_neighbour(key.ifindex, key.via, mac)?;
                match mac {
                    Some(m) => info!(
                        "next hop {} dev {} resolved to {}: fast path",
                        key.via,
                        self.link_name(key.ifindex),
                        status::mac_string(&m)
                    ),
                    None => info!(
                        "next hop {} dev {} unresolved: its packets go to the kernel",
                        key.via,
                        self.link_name(key.ifindex)
                    ),
                }
            }
        }
        Ok(())
    }

    /// SIGHUP: re-reads the config and applies route changes. An invalid file, or one that
    /// changes interfaces, segments or agent settings (which need a restart), changes nothing.
    async fn reload(&mut self) {
        let new = match Config::load(&self.path) {
            Ok(c) => c,
            Err(e) => {
                error!("reload rejected, nothing changed: {e}");
                return;
            }
        };
        if new.interfaces != self.config.interfaces
            || new.segments != self.config.segments
            || new.agent != self.config.agent
            || new.services != self.config.services
            || bgp_globals(&new) != bgp_globals(&self.config)
            || new.ipsec != self.config.ipsec
        {
            error!("reload rejected, nothing changed: {}: interfaces, segments, services, [[ipsec]] connectors, [agent] and the [bgp] settings other than neighbors only change with a restart", self.path.display());
            return;
        }
        // Neighbours' passwords are read now, so a missing one changes nothing.
        let keys = match &new.bgp {
            Some(b) => match crate::bgp::md5::load_all(b, &self.path.display().to_string()) {
                Ok(k) => k,
                Err(e) => {
                    error!("reload rejected, nothing changed: {e:#}");
                    return;
                }
            },
            None => Default::default(),
        };
        let want = route_set(&new, &self.links);
        // Static routes that go away uncover what BGP learned for the same prefix.
        let uncovered: Vec<(u32, IpNet)> = self
            .routes
            .keys()
            .filter(|k| !want.contains_key(*k))
            .copied()
            .collect();
        let old = std::mem::replace(&mut self.config, new);
        if let Err(e) = self.apply_policy() {
            error!("reload rejected, nothing changed: {e:#}");
            self.config = old;
            return;
        }
        match self.apply_routes(want).await {
            Ok(()) => info!(
                "reloaded {}: {} routes",
                self.path.display(),
                self.routes.len()
            ),
            Err(e) => error!("reload: {e:#}"),
        }
        // Neighbours: only the removed or changed ones restart.
        let stopped = match self.bgp.as_mut() {
            Some(b) => b.reconcile(&self.config, keys),
            None => Vec::new(),
        };
        let mut changed = Vec::new();
        for k in uncovered {
            self.bgp_routes.remove(&k);
            changed.push(k);
        }
        for peer in stopped {
            changed.extend(self.rib.peer_down(peer));
        }
        if let Err(e) = self.apply_bgp(changed).await {
            warn!("bgp: {e:#}");
        }
        for seg in 1..=self.config.segments.len() as u32 {
            self.readvertise(seg);
        }
    }

    async fn serve(&mut self) -> Result<Exit> {
        let socket = self.config.agent.socket.clone();
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .with_context(|| format!("status socket {}", socket.display()))?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut usr1 = signal(SignalKind::user_defined1())?;
        let mut tick =
            tokio::time::interval(Duration::from_millis(self.config.agent.neighbour_poll_ms));
        let mut log_tick = tokio::time::interval(Duration::from_secs(5));
        let exit = loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: stopping"); break Exit::Stop; }
                _ = int.recv() => { info!("SIGINT: stopping"); break Exit::Stop; }
                _ = usr1.recv() => { info!("SIGUSR1: exiting for a graceful restart"); break Exit::Restart; }
                _ = hup.recv() => self.reload().await,
                Some(ev) = recv_tunnel(&mut self.ike) => self.on_tunnel(ev).await,
                Some(ev) = recv_bgp(&mut self.bgp) => {
                    self.on_bgp(ev).await;
                    self.maybe_finish_restart().await;
                }
                Some(p) = recv(&mut self.probes) => {
                    if let Err(e) = self.on_probe(p).await {
                        warn!("health: {e:#}");
                    }
                }
                _ = log_tick.tick() => self.log_rule_hits(),
                _ = tick.tick() => {
                    self.dp.flush_logs();
                    if let Err(e) = self.sync_kernel_state().await {
                        warn!("reading neighbours and addresses: {e:#}");
                    }
                    self.expire_stale().await;
                    self.maybe_finish_restart().await;
                }
                conn = listener.accept() => {
                    if let Ok((mut stream, _)) = conn {
                        let body = match self.status() {
                            Ok(s) => serde_json::to_vec(&s)?,
                            Err(e) => { warn!("status: {e:#}"); continue; }
                        };
                        // A client that does not read cannot stall the agent for long.
                        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&body)).await;
                    }
                }
            }
        };
        let _ = std::fs::remove_file(&socket);
        Ok(exit)
    }

    fn status(&mut self) -> Result<Status> {
        let counters = self.dp.counters()?;
        let attached = self.dp.attached();
        let mut s = Status {
            config: self.path.display().to_string(),
            ..Default::default()
        };
        for itf in &self.config.interfaces {
            let (ifindex, mac) = self.links[&itf.name];
            let c = counters.interface(ifindex);
            s.interfaces.push(status::InterfaceStatus {
                name: itf.name.clone(),
                ifindex,
                segment: itf.segment.clone(),
                mac: status::mac_string(&mac),
                xdp: if self.handover.iter().any(|(i, _)| *i == ifindex) {
                    "previous agent's (graceful restart)".into()
                } else if !attached.contains(&ifindex) {
                    "detached".into()
                } else if self.config.agent.xdp_mode == XdpMode::Generic {
                    "generic".into()
                } else {
                    "native".into()
                },
                rx: c.rx,
                forwarded: c.forwarded,
                passed: c.passed,
                dropped: c.dropped,
            });
        }
        let valid: HashMap<NhKey, bool> = self.dp.nexthops().into_iter().collect();
        let mut routes: Vec<_> = self.routes.iter().collect();
        routes.sort_by_key(|((seg, net), _)| (*seg, *net));
        for ((seg, net), hops) in routes {
            s.routes.push(status::RouteStatus {
                segment: self.segment_name(*seg).to_string(),
                prefix: net.to_string(),
                next_hops: hops
                    .iter()
                    .map(|h| status::NextHopStatus {
                        via: h.via.to_string(),
                        interface: self.link_name(h.ifindex),
                        fast_path: valid.get(h).copied().unwrap_or(false),
                    })
                    .collect(),
            });
        }
        for (key, _) in self
            .dp
            .nexthops()
            .into_iter()
            .filter(|(k, _)| k.ifindex != crate::dataplane::TUNNEL)
        {
            s.neighbours.push(status::NeighbourStatus {
                interface: self.link_name(key.ifindex),
                ip: key.via.to_string(),
                mac: self
                    .dp
                    .neighbour(key.ifindex, key.via)
                    .map(|m| status::mac_string(&m)),
            });
        }
        let hits = self.dp.rule_counters(self.config.policies.len())?;
        for (p, c) in self.config.policies.iter().zip(hits) {
            s.policies.push(status::PolicyStatus {
                name: p.name.clone(),
                segment: p.segment.clone(),
                action: match (&p.action, &p.service, &p.to_segment) {
                    (crate::config::Action::Steer, Some(svc), _) => format!("steer {svc}"),
                    (crate::config::Action::Allow, _, Some(seg)) => format!("allow to {seg}"),
                    (a, _, _) => format!("{a:?}").to_lowercase(),
                },
                packets: c.packets,
                bytes: c.bytes,
            });
        }
        for (si, svc) in self.config.services.iter().enumerate() {
            let mut instances = Vec::new();
            for (ii, inst) in svc.instances.iter().enumerate() {
                let c = self.dp.steered_to(self.instance_key(si, ii))?;
                instances.push(status::InstanceStatus {
                    name: inst.name.clone(),
                    via: inst.via.to_string(),
                    interface: inst.interface.clone(),
                    health: match self
                        .health
                        .get(si)
                        .and_then(|h| h.get(ii))
                        .and_then(|h| h.up)
                    {
                        Some(true) => "up".into(),
                        Some(false) => "down".into(),
                        None => "unknown".into(),
                    },
                    packets: c.packets,
                    bytes: c.bytes,
                });
            }
            s.services.push(status::ServiceStatus {
                name: svc.name.clone(),
                failure_mode: format!("{:?}", svc.failure_mode).to_lowercase(),
                instances,
            });
        }
        if let Some(bgp) = &self.bgp {
            // The first prefixes in order: the RIB keeps them, a full table is not walked.
            let first = self.rib.first();
            for p in &bgp.peers {
                let st = p.state.lock().unwrap().clone();
                s.bgp.push(status::BgpSessionStatus {
                    name: p.name.clone(),
                    peer: p.address.to_string(),
                    remote_asn: p.remote_asn,
                    segment: self.segment_name(p.segment).to_string(),
                    state: st.state.to_string(),
                    uptime_secs: if st.state == "Established" {
                        st.since.map(|t| t.elapsed().as_secs()).unwrap_or(0)
                    } else {
                        0
                    },
                    received: self.rib.count_of(p.address),
                    sent: st.sent,
                    last_error: st.last_error.clone(),
                    not_negotiated: st.not_negotiated,
                    treated_as_withdraw: st.treated_as_withdraw,
                });
            }
            s.bgp_routes_total = self.rib.len();
            s.bgp_in_data_plane = self.bgp_routes.len();
            for (seg, net) in first {
                let Some(paths) = self.rib.paths(seg, &net) else {
                    continue;
                };
                let (seg, net) = (&seg, &net);
                let selected = self.selected(*seg, net);
                s.bgp_routes.push(status::BgpRouteStatus {
                    segment: self.segment_name(*seg).to_string(),
                    prefix: net.to_string(),
                    in_data_plane: self.bgp_routes.contains_key(&(*seg, *net)),
                    paths: paths
                        .iter()
                        .map(|p| status::BgpPathStatus {
                            peer: p.peer().to_string(),
                            next_hop: p.next_hop().to_string(),
                            as_path: crate::bgp::as_path_string(&p.attrs().as_path),
                            origin: ["igp", "egp", "incomplete"][p.attrs().origin as usize % 3]
                                .to_string(),
                            local_pref: p.attrs().local_pref,
                            med: p.attrs().med,
                            communities: p
                                .attrs()
                                .communities
                                .iter()
                                .map(|c| format!("{}:{}", c >> 16, c & 0xffff))
                                .collect(),
                            large_communities: p
                                .attrs()
                                .large_communities
                                .iter()
                                .map(|[g, a, b]| format!("{g}:{a}:{b}"))
                                .collect(),
                            selected: selected.iter().any(|(x, _)| x.peer() == p.peer()),
                            stale: self.stale.is_stale(p.peer(), &(*seg, *net)),
                        })
                        .collect(),
                });
            }
        }
        if let Some(ike) = &self.ike {
            s.ipsec = ike.status.lock().unwrap().clone();
        }
        s.reasons = counters
            .reasons
            .iter()
            .map(|(n, v)| (n.to_string(), *v))
            .collect();
        let u = self.dp.usage();
        s.route_table = status::RouteTableStatus {
            prefixes: u.prefixes,
            groups_used: u.groups_used,
            groups_total: u.groups_total,
        };
        Ok(s)
    }

    /// SIGUSR1: leaves forwarding to the next agent. The XDP links are pinned (the
    /// program and its maps keep forwarding), kernel routes, rules and neighbours stay, and
    /// BGP sessions close without a NOTIFICATION, so graceful-restart peers keep our
    /// routes for `restart_time`. If the links cannot be pinned, stops cleanly instead.
    async fn exit_for_restart(&mut self) {
        let base = self.config.agent.pin_dir.clone();
        // Still restarting ourselves: the previous agent's program is in place and pinned.
        if self.handover.is_empty() {
            let pinned = crate::restart::prepare(&base).and_then(|d| {
                self.dp.pin_all(&d)?;
                Ok(d)
            });
            match pinned {
                Ok(d) => info!("XDP links pinned in {}", d.display()),
                Err(e) => {
                    error!("graceful restart not possible, stopping cleanly: {e:#}");
                    self.stop().await;
                    return;
                }
            }
        }
        // IPsec SAs are not handed over (yet): they are deleted and negotiated again by
        // the next agent.
        if let Some(ike) = self.ike.take() {
            ike.shutdown().await;
        }
        let gr = self
            .config
            .bgp
            .as_ref()
            .map(|b| (b.graceful_restart, b.restart_time));
        if let Some(b) = &mut self.bgp {
            match gr {
                Some((true, _)) => b.close_for_restart(),
                _ => b.shutdown().await,
            }
        }
        info!(
            "xnet agent exited for a graceful restart: XDP keeps forwarding, kernel routes and rules stay{}; start the agent again to take over",
            match gr {
                Some((true, secs)) => format!(", BGP peers keep our routes for {secs} s"),
                _ => String::new(),
            }
        );
    }

    /// Undoes what start() did, in reverse: BGP peers are told first (so they move traffic
    /// away), then XDP goes, so no packet meets half-removed state.
    async fn stop(&mut self) {
        if let Some(b) = &mut self.bgp {
            b.shutdown().await;
        }
        if let Some(ike) = self.ike.take() {
            ike.shutdown().await;
        }
        for host in self
            .tunnel_peers
            .drain()
            .flat_map(|(_, r)| r)
            .collect::<Vec<_>>()
        {
            let _ = self.kernel.delete_route(MAIN_TABLE, host).await;
        }
        let tunnels: Vec<(u32, IpNet)> = self.tunnel_routes.drain().flat_map(|(_, r)| r).collect();
        self.remove_tunnel_routes(&tunnels).await;
        // A graceful restart in progress: the previous agent's program goes too.
        for (_, pin) in std::mem::take(&mut self.handover) {
            let _ = std::fs::remove_file(pin);
        }
        self.dp.detach_all();
        self.dp.detach_tunnel_in();
        for name in std::mem::take(&mut self.rules) {
            if let Err(e) = self.kernel.delete_segment_rules(&name).await {
                warn!("removing ip rules of {name}: {e:#}");
            }
        }
        if self.config.agent.kernel_fib {
            for (seg, net) in self.routes.keys().chain(self.bgp_routes.keys()) {
                let table = self.config.segments[*seg as usize - 1].table;
                let _ = self.kernel.delete_route(table, *net).await;
            }
        }
        for (ifindex, ip) in std::mem::take(&mut self.managed) {
            let _ = self.kernel.forget_neighbour(ifindex, ip).await;
        }
        for (_, (name, _)) in std::mem::take(&mut self.xfrm_links) {
            if let Err(e) = self.kernel.delete_link(&name).await {
                warn!("{e:#}");
            }
        }
        info!("xnet agent stopped: XDP detached, kernel routes and rules removed");
    }
}
