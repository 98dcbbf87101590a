//! The agent's BGP side: UPDATEs into the RIB (import policy, AS loops), the RIB's paths
//! into the routing core, graceful restart as a helper (stale routes), and what we
//! advertise.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use ipnet::IpNet;
use log::{info, warn};

use super::Agent;
use crate::bgp::rib::{self, Rib};
use crate::bgp::session::Event;
use crate::bgp::Speaker;
use crate::routing::{Hops, Source};

impl Agent {
    /// Starts the BGP speaker, if configured. Connected subnets resolve its next hops.
    pub(super) async fn start_bgp(&mut self) -> Result<()> {
        let Some(b) = &self.config.bgp else {
            return Ok(());
        };
        self.rib = Rib::new(b.multipath);
        let own = self.refresh_connected().await?;
        let config = &self.config;
        self.bgp = Speaker::start(
            config.bgp.as_ref(),
            &|name| config.segment_id(name),
            &self.path.display().to_string(),
            !self.handover.is_empty(),
            own,
        )
        .await?;
        self.readvertise_all();
        Ok(())
    }

    /// The subnets of our interfaces, by segment, into the routing core (BGP next hops
    /// resolve through them); returns our own addresses.
    pub(super) async fn refresh_connected(&mut self) -> Result<Vec<IpAddr>> {
        let connected = self.kernel.connected().await?;
        let own = connected.iter().map(|(_, n)| n.addr()).collect();
        let in_segments = connected
            .into_iter()
            .filter_map(|(ifindex, net)| Some((self.dp.segment_of(ifindex)?, ifindex, net)))
            .collect();
        let mut out = Vec::new();
        self.core.set_connected(in_segments, &mut out);
        self.apply(out).await?;
        Ok(own)
    }

    /// Stops the speaker (peers told with a Cease) and withdraws what it learned: a
    /// reload that changes the `[bgp]` globals starts a new one.
    pub(super) async fn stop_bgp(&mut self) {
        let Some(mut b) = self.bgp.take() else { return };
        let peers: Vec<IpAddr> = b.peers.iter().map(|p| p.address).collect();
        b.shutdown().await;
        b.close().await;
        let mut changed = Vec::new();
        for peer in peers {
            self.stale.take(peer);
            changed.extend(self.rib.peer_down(peer));
        }
        if let Err(e) = self.bgp_changed(changed).await {
            warn!("bgp: {e:#}");
        }
    }

    /// `readvertise` for every segment.
    pub(super) fn readvertise_all(&self) {
        for (seg, _) in self.config.segments_with_ids() {
            self.readvertise(seg);
        }
    }

    /// The segment's routes for advertisement: static ones, then learned ones that can be
    /// used (their next hop resolves), each with its best path.
    pub(super) fn readvertise(&self, segment: u32) {
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
            .statics
            .keys()
            .filter(|(s, _)| *s == segment)
            .map(|(_, n)| (*n, None))
            .collect();
        for net in self.core.prefixes(segment) {
            if self.statics.contains_key(&(segment, *net))
                || !self.core.usable(Source::Bgp, segment, net)
            {
                continue;
            }
            if let Some((best, _)) = self.bgp_selected(segment, net).first() {
                routes.push((*net, Some((best.peer(), best.route.clone()))));
            }
        }
        bgp.readvertise(segment, &routes);
    }

    /// BGP's selection for `net` among the paths whose next hop resolves now, each with
    /// what it resolves to.
    pub(super) fn bgp_selected(&self, segment: u32, net: &IpNet) -> Vec<(rib::Path, Hops)> {
        self.rib
            .selected_by(segment, net, |p| self.core.resolve(segment, p.next_hop()))
    }

    /// Hands the RIB's paths for `changed` to the routing core and applies what it
    /// selects; advertisements follow.
    pub(super) async fn bgp_changed(&mut self, changed: Vec<(u32, IpNet)>) -> Result<()> {
        let mut segments = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for (seg, net) in changed {
            segments.insert(seg);
            match self.rib.ranked(seg, &net) {
                Some(paths) => self.core.set(Source::Bgp, seg, net, paths, &mut out),
                None => self.core.withdraw(Source::Bgp, seg, net, &mut out),
            }
        }
        let applied = self.apply(out).await;
        for seg in segments {
            self.readvertise(seg);
        }
        applied
    }

    pub(super) async fn on_bgp(&mut self, (session, ev): (u64, Event)) {
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
        let down = match &ev {
            Event::Down { peer, .. } => Some(*peer),
            _ => None,
        };
        // Its routes leave without a graceful restart: packets stop going to it first.
        let mut dead = None;
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
                        // Packets stop going to it before its routes move, one write per
                        // next-hop group.
                        match self.dp.set_nexthop_alive(peer, false) {
                            Ok(_) => dead = Some(peer),
                            Err(e) => warn!("bgp: {peer}: {e:#}"),
                        }
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
        if let Err(e) = self.bgp_changed(changed).await {
            warn!("bgp: {e:#}");
        }
        // Its routes have moved. A session down is not a dead next hop for what else
        // uses the address (a static route): the mark goes, unless BFD says it is dead.
        if let Some(peer) = dead {
            if !self.bfd_failed.iter().any(|k| k.peer == peer) {
                if let Err(e) = self.dp.set_nexthop_alive(peer, true) {
                    warn!("bgp: {peer}: {e:#}");
                }
            }
        }
        if let Some(peer) = down {
            self.failover_converged(peer);
        }
    }

    /// Withdraws the routes of `peer` still stale.
    pub(super) fn drop_stale(&mut self, peer: IpAddr, why: &str) -> Vec<(u32, IpNet)> {
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
    pub(super) async fn expire_stale(&mut self) {
        let mut changed = Vec::new();
        for peer in self.stale.expired(Instant::now()) {
            changed.extend(self.drop_stale(peer, "restart time over"));
        }
        if !changed.is_empty() {
            if let Err(e) = self.bgp_changed(changed).await {
                warn!("bgp: {e:#}");
            }
        }
    }

    /// Applies one UPDATE to the RIB; returns the prefixes whose selection changed.
    pub(super) fn on_update(
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
        let (mut announced, mut rejected) = (0u64, 0u64);
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
                announced += 1;
                let hit = match accepted {
                    Some(route) if !looped => self.rib.update(
                        seg,
                        net,
                        rib::Path {
                            src: src.clone(),
                            route,
                        },
                    ),
                    _ => {
                        rejected += 1;
                        self.rib.withdraw(seg, net, peer)
                    }
                };
                if hit {
                    changed.push((seg, net));
                }
            }
        }
        let counts = self.bgp_counts.entry(peer).or_default();
        counts.announced += announced;
        counts.rejected += rejected;
        changed
    }
}

/// A peer's announcements since the agent started.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Counts {
    pub announced: u64,
    pub rejected: u64,
}
