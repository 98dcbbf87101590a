//! The one layer that writes what the routing core selected: the data plane's route
//! tables, the kernel FIB (a task of its own, so a full table never holds up the data
//! plane), and the kernel neighbour entries of the next hops XDP uses. Also keeps the data
//! plane's view of the host (local addresses, neighbour MACs) current.

use std::collections::HashMap;
use std::net::IpAddr;

use anyhow::Result;
use ipnet::IpNet;
use log::{info, warn};
use tokio::sync::{mpsc, oneshot};

use super::{Agent, RouteSet};
use crate::dataplane::{NhKey, TUNNEL};
use crate::kernel::Kernel;
use crate::routing::{Change, Paths, Source};
use crate::status;

pub(super) enum FibOp {
    /// (table, prefix, next hops, whether a failure is worth a warning: not for each
    /// prefix of a full table).
    Replace(u32, IpNet, Vec<(u32, IpAddr)>, bool),
    Delete(u32, IpNet),
    /// Answers once every earlier operation is done.
    Flush(oneshot::Sender<()>),
}

/// The kernel-FIB writer: operations are applied in the order sent.
pub(super) struct FibWriter {
    tx: mpsc::UnboundedSender<FibOp>,
}

impl FibWriter {
    pub(super) fn spawn() -> Result<Self> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let kernel = Kernel::connect()?;
        tokio::spawn(async move {
            while let Some(op) = rx.recv().await {
                let (r, loud) = match op {
                    FibOp::Replace(t, net, hops, loud) => {
                        (kernel.replace_route(t, net, &hops).await, loud)
                    }
                    FibOp::Delete(t, net) => (kernel.delete_route(t, net).await, false),
                    FibOp::Flush(done) => {
                        // The waiter may have gone (agent stopping): nothing to tell.
                        done.send(()).ok();
                        continue;
                    }
                };
                match r {
                    Err(e) if loud => {
                        warn!("kernel FIB: {e:#}: the slow path will not have this route")
                    }
                    Err(e) => log::debug!("kernel FIB: {e:#}"),
                    Ok(()) => {}
                }
            }
        });
        Ok(Self { tx })
    }

    pub(super) fn send(&self, op: FibOp) {
        if self.tx.send(op).is_err() {
            warn!("kernel FIB writer has stopped: the kernel FIB is no longer updated");
        }
    }

    /// Waits until the kernel has every route sent so far.
    pub(super) async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(FibOp::Flush(tx));
        if rx.await.is_err() {
            warn!("kernel FIB writer has stopped before a flush");
        }
    }
}

impl Agent {
    /// Applies the routing core's changes: data plane first, then the kernel mirror.
    /// Every change is tried; the first failure is returned (each is logged).
    pub(super) async fn apply(&mut self, changes: Vec<Change>) -> Result<()> {
        let mut failed = None;
        let managed = self.managed.len();
        for c in changes {
            let table = self.table_of(c.segment);
            match &c.route {
                Some((source, hops)) => {
                    if let Err(e) = self.dp.set_route(c.segment, c.net, hops) {
                        let e = e.context(format!(
                            "route {} in segment {}",
                            c.net,
                            self.segment_name(c.segment)
                        ));
                        warn!("{e:#}");
                        failed.get_or_insert(e);
                        continue;
                    }
                    for h in hops.iter().filter(|h| h.ifindex != TUNNEL) {
                        self.manage_neighbour(h.ifindex, h.via).await;
                    }
                    if let Some(f) = &self.fib {
                        let kh = self.kernel_hops(hops);
                        f.send(if kh.is_empty() {
                            FibOp::Delete(table, c.net)
                        } else {
                            FibOp::Replace(table, c.net, kh, *source != Source::Bgp)
                        });
                    }
                    if *source == Source::Static || c.previous == Some(Source::Static) {
                        info!(
                            "route {} in segment {} via {}",
                            c.net,
                            self.segment_name(c.segment),
                            hops.iter()
                                .map(|h| format!("{} dev {}", h.via, self.link_name(h.ifindex)))
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                    }
                }
                None => {
                    if let Err(e) = self.dp.remove_route(c.segment, c.net) {
                        warn!(
                            "removing route {} in segment {}: {e:#}",
                            c.net,
                            self.segment_name(c.segment)
                        );
                        failed.get_or_insert(e);
                    }
                    if let Some(f) = &self.fib {
                        f.send(FibOp::Delete(table, c.net));
                    }
                    if c.previous == Some(Source::Static) {
                        info!(
                            "route {} removed from segment {}",
                            c.net,
                            self.segment_name(c.segment)
                        );
                    }
                }
            }
        }
        if self.managed.len() > managed {
            // A new next hop: its MAC now, not at the next neighbour poll, so that the
            // routes through it are on the fast path before they are advertised (a peer
            // that moves its traffic here meets a data plane that forwards it).
            if let Err(e) = self.sync_kernel_state().await {
                warn!("reading neighbours: {e:#}");
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Makes the static routes equal to `want` (the config's `[[routes]]`).
    pub(super) async fn set_statics(&mut self, mut want: RouteSet) -> Result<()> {
        // Next hops whose BFD session failed stay out; a route with none left goes.
        let failed = self.failed_next_hops();
        if !failed.is_empty() {
            want = want
                .into_iter()
                .filter_map(|(k, hops)| {
                    let live: std::sync::Arc<[NhKey]> = hops
                        .iter()
                        .filter(|h| !failed.contains(h))
                        .copied()
                        .collect();
                    (!live.is_empty()).then_some((k, live))
                })
                .collect();
        }
        let mut out = Vec::new();
        for (seg, net) in self.statics.keys() {
            if !want.contains_key(&(*seg, *net)) {
                self.core.withdraw(Source::Static, *seg, *net, &mut out);
            }
        }
        for ((seg, net), hops) in &want {
            if self.statics.get(&(*seg, *net)) != Some(hops) {
                self.core
                    .set(Source::Static, *seg, *net, Paths::direct(hops), &mut out);
            }
        }
        self.statics = want;
        self.apply(out).await
    }

    /// The kernel FIB's next hops for data-plane next hops: a tunnel next hop becomes the
    /// way the kernel reaches that tunnel (one that is down has none).
    pub(super) fn kernel_hops(&self, hops: &[NhKey]) -> Vec<(u32, IpAddr)> {
        hops.iter()
            .filter_map(|h| {
                if h.ifindex == TUNNEL {
                    self.tunnel_kernel_hops.get(&h.via).copied()
                } else {
                    Some((h.ifindex, h.via))
                }
            })
            .collect()
    }

    /// Has the kernel keep next hop `ip` resolved (once per next hop), unless the operator
    /// set its entry by hand: that one stays as it is, and stays when we stop.
    pub(super) async fn manage_neighbour(&mut self, ifindex: u32, ip: IpAddr) {
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

    /// Removes the kernel routes (protocol 250) in segment tables that the core did not
    /// select: what a crashed or previous agent left.
    pub(super) async fn sweep_kernel_routes(&mut self) {
        let Some(fib) = &self.fib else { return };
        let tables: HashMap<u32, u32> = self
            .config
            .segments_with_ids()
            .map(|(id, s)| (s.table, id))
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
            if self.core.selected(*seg, &net).is_some() {
                continue;
            }
            n += 1;
            fib.send(FibOp::Delete(table, net));
        }
        if n > 0 {
            info!("removing {n} kernel routes a previous agent left");
        }
    }

    /// Re-reads the host's addresses and the neighbour table into the data plane.
    pub(super) async fn sync_kernel_state(&mut self) -> Result<()> {
        let addrs = self.kernel.addresses().await?;
        self.dp.set_local_addrs(&addrs)?;
        let neighbours = self.kernel.neighbours().await?;
        // Tunnel next hops have no MAC: the kernel takes their packets.
        for (key, _) in self
            .dp
            .nexthops()
            .into_iter()
            .filter(|(k, _)| k.ifindex != TUNNEL)
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
}
