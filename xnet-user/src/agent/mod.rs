//! The agent: one loop that takes inputs (signals, BGP and IKE events, probes, the
//! neighbour poll, status requests), hands routes to the routing core and applies what it
//! returns (`forwarding`). It applies a config at start, reloads routes on SIGHUP, and
//! undoes everything on SIGINT/SIGTERM; SIGUSR1 exits for a graceful restart instead:
//! forwarding goes on and BGP peers keep our routes until the next agent takes over
//! (`handover`).

mod bfd;
mod bgp;
mod cluster;
mod forwarding;
mod handover;
mod reload;
mod services;
mod status;
mod tunnels;
mod watchdog;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ipnet::IpNet;
use log::{info, warn};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

use tokio::sync::mpsc;

use std::sync::Arc;

use crate::bgp::graceful::Stale;
use crate::bgp::rib::Rib;
use crate::bgp::session::Event;
use crate::bgp::Speaker;
use crate::config::{Config, XdpMode};
use crate::dataplane::{Dataplane, NhKey};
use crate::health;
use crate::kernel::{Kernel, MAIN_TABLE, RULE_PRIORITY};
use crate::routing::Core;

pub use reload::reload_refusal;

/// Static routes: (segment id, prefix) → next hops.
type RouteSet = crate::fastmap::Map<(u32, IpNet), Arc<[NhKey]>>;

struct Agent {
    path: PathBuf,
    config: Config,
    kernel: Kernel,
    dp: Dataplane,
    /// Interface name → (ifindex, MAC).
    links: HashMap<String, (u32, [u8; 6])>,
    /// Selects a route per prefix among the sources; `apply` writes what it returns.
    core: Core,
    /// The config's static routes, as given to the core.
    statics: RouteSet,
    managed: crate::fastmap::Set<(u32, IpAddr)>,
    /// Next hops whose neighbour entry the operator made permanent: left alone.
    operator_neighbours: crate::fastmap::Set<(u32, IpAddr)>,
    rules: Vec<String>,
    /// Per service, per instance: health as the data plane uses it.
    health: Vec<Vec<services::InstanceHealth>>,
    probes: Option<mpsc::Receiver<health::Probe>>,
    /// Hits of each `log = true` rule when last logged.
    logged_hits: HashMap<usize, u64>,
    bgp: Option<Speaker>,
    rib: Rib,
    /// The kernel-FIB writer (with `agent.kernel_fib`).
    fib: Option<forwarding::FibWriter>,
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
    /// for a device route), by the data plane's key of the tunnel (`tunnels::tunnel_key`,
    /// one per family).
    tunnel_kernel_hops: HashMap<IpAddr, (u32, IpAddr)>,
    /// Route-based connectors: index → (xfrm interface, its ifindex).
    xfrm_links: HashMap<usize, (String, u32)>,
    /// BFD: the sessions' thread, who each session serves, and the sessions that failed
    /// (Up, then down for a reason other than the peer's AdminDown) and are not back.
    bfd: Option<crate::bfd::driver::Bfd>,
    bfd_clients: bfd::Wanted,
    bfd_failed: HashSet<crate::bfd::driver::Key>,
    /// The latest failures BFD detected, and when, per peer, until its routes moved.
    failovers: std::collections::VecDeque<crate::status::Failover>,
    failover_started: HashMap<IpAddr, Instant>,
    /// Per BGP peer: prefixes announced to us, and those import policy or an AS loop
    /// refused (for metrics).
    bgp_counts: HashMap<IpAddr, bgp::Counts>,
    /// Wall-clock start, for status and metrics.
    started_unix: f64,
    /// The IPsec connectors by the IKE daemon's index (a reload's removed ones: None).
    connectors: Vec<Option<crate::config::Ipsec>>,
    /// Kernel table of every segment id used since the start.
    tables: HashMap<u32, u32>,
    /// Status wanted by the socket's clients and the metrics server.
    requests: mpsc::Receiver<crate::status::Request>,
    request_tx: mpsc::Sender<crate::status::Request>,
    /// IPFIX flow export (with `[flows]`), and the ring buffer while there is none.
    flows: Option<crate::flows::exporter::Exporter>,
    flow_ring: Option<aya::maps::RingBuf<aya::maps::MapData>>,
    /// As a node of a cluster: its link to etcd and the cluster's view.
    cluster: Option<cluster::Node>,
}

/// Runs the agent on `path` until SIGINT or SIGTERM; as a node of cluster `cluster` (or
/// the file's `[agent.cluster]`), `path` is the node's own file and the rest of the config
/// comes from etcd.
pub async fn run(path: &Path, cluster: Option<crate::config::ClusterSettings>) -> Result<()> {
    let cluster = match cluster {
        Some(c) => Some(c),
        None => crate::cluster::settings_in(path)?,
    };
    let (config, cluster) = match cluster {
        Some(s) => {
            let (c, node) = cluster::join(s, path).await?;
            (c, Some(node))
        }
        None => (Config::load(path)?, None),
    };
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
    let t0 = Instant::now();
    let dp = Dataplane::load(config.agent.route_table_groups)?;
    info!(
        "XDP object loaded and its programs verified in {} ms",
        t0.elapsed().as_millis()
    );
    // From here on the loop must keep running (nothing else has started before).
    watchdog::start();
    let (request_tx, requests) = mpsc::channel(16);
    let mut agent = Agent {
        path: path.to_path_buf(),
        config,
        kernel,
        dp,
        links,
        core: Core::new(),
        statics: RouteSet::default(),
        managed: Default::default(),
        operator_neighbours: Default::default(),
        rules: Vec::new(),
        health: Vec::new(),
        probes: None,
        logged_hits: HashMap::new(),
        bgp: None,
        rib: Rib::new(1),
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
        bfd: None,
        bfd_clients: Default::default(),
        bfd_failed: HashSet::new(),
        failovers: Default::default(),
        failover_started: HashMap::new(),
        bgp_counts: HashMap::new(),
        started_unix: crate::status::unix_now(),
        requests,
        request_tx,
        tables: HashMap::new(),
        connectors: Vec::new(),
        flows: None,
        flow_ring: None,
        cluster,
    };
    let result = match agent.start(routes).await {
        Ok(()) => {
            // systemd (Type=notify): ready once the data plane is programmed and attached.
            notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&format!(
                    "forwarding: {} interfaces, {} static routes",
                    agent.config.interfaces.len(),
                    agent.statics.len()
                )),
            ]);
            agent.serve().await
        }
        Err(e) => Err(e),
    };
    notify(&[sd_notify::NotifyState::Stopping]);
    match result {
        Ok(Exit::Restart) => agent.exit_for_restart().await,
        _ => agent.stop().await,
    }
    result.map(|_| ())
}

/// Tells systemd (when it started us with Type=notify; a no-op otherwise).
fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, state) {
        log::debug!("sd_notify: {e}");
    }
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

async fn recv_tunnel(
    ike: &mut Option<crate::ike::daemon::IkeHandle>,
) -> Option<crate::ike::daemon::TunnelEvent> {
    match ike {
        Some(h) => h.events.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_bfd(b: &mut Option<crate::bfd::driver::Bfd>) -> Option<crate::bfd::driver::Event> {
    match b {
        Some(b) => b.events.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_cluster(n: &mut Option<cluster::Node>) -> Option<crate::cluster::store::Event> {
    match n {
        Some(n) => n.store.events.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_bgp(s: &mut Option<Speaker>) -> Option<(u64, Event)> {
    match s {
        Some(s) => s.events.recv().await,
        None => std::future::pending().await,
    }
}

/// One client of the status socket, off the loop: its request (`brief` or `full`; nothing
/// within 200 ms: full), the status from the loop, the answer. A client that does not read
/// is dropped after a second.
async fn status_client(
    mut stream: tokio::net::UnixStream,
    tx: mpsc::Sender<crate::status::Request>,
) {
    use tokio::io::AsyncReadExt;
    let mut req = [0u8; 16];
    let mut n = 0;
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        while n < req.len() {
            match stream.read(&mut req[n..]).await {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    n += k;
                    if req[..n].contains(&b'\n') {
                        break;
                    }
                }
            }
        }
    })
    .await;
    let what = crate::status::What::parse(&req[..n]);
    let (reply, answer) = tokio::sync::oneshot::channel();
    if tx
        .send(crate::status::Request { what, reply })
        .await
        .is_err()
    {
        return;
    }
    let Ok(Ok(body)) = answer.await.map(|s| serde_json::to_vec(&s)) else {
        return;
    };
    match tokio::time::timeout(Duration::from_secs(1), stream.write_all(&body)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::debug!("status client: {e}"),
        Err(_) => warn!("status client did not read its answer within 1 s: dropped"),
    }
}

/// Removes a file the agent made (a pinned XDP link, which detaches its program; the
/// status socket); one already gone is fine, any other failure is logged.
fn remove_if_present(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!("removing {}: {e}", path.display()),
    }
}

impl Agent {
    fn segment_name(&self, id: u32) -> &str {
        self.config
            .segment_by_id(id)
            .map(|s| s.name.as_str())
            .unwrap_or("?")
    }

    /// The kernel table that mirrors segment `id` (also of a segment a reload removed,
    /// while its routes leave).
    fn table_of(&self, id: u32) -> u32 {
        match self.config.segment_by_id(id) {
            Some(s) => s.table,
            None => self.tables.get(&id).copied().unwrap_or(0),
        }
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
        if let Some(addr) = c.agent.metrics_listen {
            crate::metrics::serve(addr, self.request_tx.clone())
                .await
                .with_context(|| self.path.display().to_string())?;
        }
        self.find_handover();
        for (id, s) in c.segments_with_ids() {
            self.dp.add_segment(id)?;
            self.tables.insert(id, s.table);
        }
        for itf in &c.interfaces {
            let (ifindex, mac) = self.links[&itf.name];
            let flags = reload::interface_flags(&c, itf);
            self.dp
                .set_interface(ifindex, c.segment_id(&itf.segment).unwrap(), mac, flags)?;
        }
        self.start_flows().await?;
        if c.agent.kernel_fib {
            self.fib = Some(forwarding::FibWriter::spawn()?);
        }
        self.reconcile_bfd()?;
        self.set_statics(routes).await?;
        if let Some(f) = &self.fib {
            // The slow path has the static routes before the first packet meets XDP.
            f.flush().await;
        }
        self.start_services().await?;
        self.publish_health();
        self.apply_policy()?;
        self.start_bgp().await?;
        self.connectors = self.config.ipsec.iter().cloned().map(Some).collect();
        self.create_xfrm_interfaces().await?;
        let if_ids = self
            .xfrm_links
            .keys()
            .map(|&i| (i, crate::ike::daemon::reqid(i)))
            .collect();
        self.ike = crate::ike::daemon::start(
            &self.config.ipsec,
            self.config.agent.ike_cookie_threshold,
            &self.path.display().to_string(),
            &if_ids,
        )
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
            "xnet agent running: {} interfaces, {} routes, status on {} (programmed in {} ms)",
            c.interfaces.len(),
            self.statics.len(),
            c.agent.socket.display(),
            self.started.elapsed().as_millis()
        );
        Ok(())
    }

    /// Flow export: the segments' sampling rates into XDP, the exporter on the ring buffer.
    async fn start_flows(&mut self) -> Result<()> {
        let mut rates = HashMap::new();
        for (id, s) in self.config.segments_with_ids() {
            let rate = s.flow_sample.unwrap_or(0);
            self.dp.set_flow_sampling(id, rate)?;
            if rate > 0 {
                rates.insert(id, rate);
                info!(
                    "segment {}: 1 packet in {rate} sampled for flow export",
                    s.name
                );
            }
        }
        if let Some(f) = self.config.flows.clone() {
            let ring = match self.flow_ring.take() {
                Some(r) => r,
                None => self.dp.flow_samples()?,
            };
            self.flows = Some(crate::flows::exporter::Exporter::start(ring, &f, rates).await?);
        }
        Ok(())
    }

    /// A reload that changed `[flows]`: the exporter sends what it holds and a new one
    /// starts with the new settings (or none).
    async fn restart_flows(&mut self) -> Result<()> {
        if let Some(mut f) = self.flows.take() {
            self.flow_ring = f.stop().await;
        }
        self.start_flows().await
    }

    /// Compiles the policies and swaps them in atomically.
    fn apply_policy(&mut self) -> Result<()> {
        let dp = &self.dp;
        let services = &self.config.services;
        let compiled = crate::policy::compile(
            &self.config.rules(),
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

    async fn serve(&mut self) -> Result<Exit> {
        let socket = self.config.agent.socket.clone();
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // A socket left by an agent that did not stop cleanly.
        remove_if_present(&socket);
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
                _ = hup.recv() => {
                    // With the time: what Type=notify-reload (systemd 253) requires.
                    let mut reloading = vec![sd_notify::NotifyState::Reloading];
                    reloading.extend(sd_notify::NotifyState::monotonic_usec_now());
                    notify(&reloading);
                    self.reload().await;
                    notify(&[sd_notify::NotifyState::Ready]);
                }
                Some(ev) = recv_bfd(&mut self.bfd) => self.on_bfd(ev).await,
                Some(ev) = recv_tunnel(&mut self.ike) => self.on_tunnel(ev).await,
                Some(ev) = recv_cluster(&mut self.cluster) => self.on_cluster(ev).await,
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
                Some(req) = self.requests.recv() => {
                    use crate::status::What;
                    let s = match req.what {
                        What::Full => self.status(),
                        What::Brief => self.status_brief(),
                        What::Config => self.status_brief().map(|mut s| {
                            s.running_config = Some(self.config.clone());
                            s
                        }),
                    };
                    match s {
                        Ok(s) => { let _ = req.reply.send(s); }
                        Err(e) => warn!("status: {e:#}"),
                    }
                }
                _ = tick.tick() => {
                    self.dp.flush_logs();
                    if let Err(e) = self.sync_kernel_state().await {
                        warn!("reading neighbours and addresses: {e:#}");
                    }
                    self.expire_stale().await;
                    self.maybe_finish_restart().await;
                }
                conn = listener.accept() => {
                    if let Ok((stream, _)) = conn {
                        tokio::spawn(status_client(stream, self.request_tx.clone()));
                    }
                }
            }
        };
        remove_if_present(&socket);
        Ok(exit)
    }

    /// Undoes what start() did, in reverse: BGP peers are told first (so they move traffic
    /// away), then XDP goes, so no packet meets half-removed state.
    async fn stop(&mut self) {
        self.stop_bfd();
        if let Some(f) = &mut self.flows {
            f.stop().await;
        }
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
            if let Err(e) = self.kernel.delete_route(MAIN_TABLE, host).await {
                warn!("{e:#}");
            }
        }
        // A graceful restart in progress: the previous agent's program goes too.
        for (_, pin) in std::mem::take(&mut self.handover) {
            remove_if_present(&pin);
        }
        self.dp.detach_all();
        self.dp.detach_tunnel_in();
        for name in std::mem::take(&mut self.rules) {
            if let Err(e) = self.kernel.delete_segment_rules(&name).await {
                warn!("removing ip rules of {name}: {e:#}");
            }
        }
        if let Some(f) = self.fib.take() {
            // What is still queued first, then every route selected goes.
            f.flush().await;
            let ours: Vec<(u32, IpNet)> = self
                .core
                .selected_routes()
                .map(|(seg, net, _, _)| (self.table_of(seg), net))
                .collect();
            let mut failed = 0;
            for (table, net) in ours {
                if let Err(e) = self.kernel.delete_route(table, net).await {
                    log::debug!("{e:#}");
                    failed += 1;
                }
            }
            if failed > 0 {
                warn!("{failed} kernel routes could not be removed (see the debug log)");
            }
        }
        for (ifindex, ip) in std::mem::take(&mut self.managed) {
            if let Err(e) = self.kernel.forget_neighbour(ifindex, ip).await {
                warn!("{e:#}");
            }
        }
        for (_, (name, _)) in std::mem::take(&mut self.xfrm_links) {
            if let Err(e) = self.kernel.delete_link(&name).await {
                warn!("{e:#}");
            }
        }
        info!("xnet agent stopped: XDP detached, kernel routes and rules removed");
    }
}
