//! The agent's IPsec side: xfrm interfaces for route-based connectors, policy on
//! decrypted traffic, and the routes of tunnels that are up.

use std::net::IpAddr;

use anyhow::{Context, Result};
use ipnet::IpNet;
use log::{info, warn};
use xnet_common::IF_F_DEFAULT_DENY;

use super::Agent;
use crate::config::DefaultAction;
use crate::dataplane::{NhKey, TUNNEL};
use crate::ike::daemon::TunnelEvent;
use crate::kernel::{unspecified, MAIN_TABLE, RULE_PRIORITY};
use crate::routing::{Paths, Source};

/// The data plane's key for a tunnel's routes of `net`'s family: its remote address, or
/// for inner prefixes of the other family, that address mapped into it (IPv4-mapped IPv6;
/// an IPv6 underlay's IPv4 routes use its last 32 bits). Only a key: XDP passes tunnel
/// traffic to the kernel.
pub(super) fn tunnel_key(remote: IpAddr, net: &IpNet) -> IpAddr {
    match (remote, net) {
        (IpAddr::V4(a), IpNet::V6(_)) => IpAddr::V6(a.to_ipv6_mapped()),
        (IpAddr::V6(a), IpNet::V4(_)) => {
            let o = a.octets();
            IpAddr::from([o[12], o[13], o[14], o[15]])
        }
        _ => remote,
    }
}

/// A tunnel's keys in both families (`tunnel_key` of an IPv4 and of an IPv6 prefix).
pub(super) fn tunnel_keys(remote: IpAddr) -> [IpAddr; 2] {
    [
        tunnel_key(remote, &IpNet::from(IpAddr::from([0u8; 4]))),
        tunnel_key(remote, &IpNet::from(IpAddr::from([0u8; 16]))),
    ]
}

impl Agent {
    /// Connector `i` (by the IKE daemon's index), unless a reload removed it.
    pub(super) fn connector(&self, i: usize) -> Option<&crate::config::Ipsec> {
        self.connectors.get(i).and_then(Option::as_ref)
    }

    /// Route-based connectors get their xfrm interface, and with the kernel FIB, the
    /// segment's `ip rule` for it (decrypted traffic is routed in its segment). A kernel
    /// without xfrm interfaces leaves the connector policy-based, said in the log.
    pub(super) async fn create_xfrm_interfaces(&mut self) -> Result<()> {
        for (i, c) in self.connectors.clone().iter().enumerate() {
            if let Some(c) = c {
                self.create_xfrm_interface(i, c).await?;
            }
        }
        Ok(())
    }

    /// `create_xfrm_interfaces` for connector `i`: its interface's if_id, if it has one.
    async fn create_xfrm_interface(
        &mut self,
        i: usize,
        c: &crate::config::Ipsec,
    ) -> Result<Option<u32>> {
        let Some(name) = &c.interface else {
            return Ok(None);
        };
        let if_id = crate::ike::daemon::reqid(i);
        match self.kernel.create_xfrm_interface(name, if_id).await {
            Ok(ifindex) => {
                if self.config.agent.kernel_fib {
                    let seg = self.config.segment_id(&c.segment).expect("validated");
                    let table = self.table_of(seg);
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
                Ok(Some(if_id))
            }
            Err(e) => {
                warn!(
                    "ipsec {}: {e:#}: the tunnel is policy-based instead (its traffic selectors decide what enters it)",
                    c.name
                );
                Ok(None)
            }
        }
    }

    /// A reload's connectors: removed and changed ones go (their SAs deleted, the peer
    /// told; their routes out; their xfrm interface deleted); added and changed ones come
    /// under a new index. Connectors whose settings did not change are not touched.
    /// `conns`: the connectors of `config.ipsec` with their secrets, read once by the
    /// reload.
    pub(super) async fn reconcile_connectors(
        &mut self,
        conns: &[std::sync::Arc<crate::ike::sa::Conn>],
    ) -> Result<()> {
        let target = self.config.ipsec.clone();
        for i in 0..self.connectors.len() {
            let Some(c) = self.connector(i).cloned() else {
                continue;
            };
            if target.contains(&c) {
                continue;
            }
            self.tunnel_down(i).await;
            if let Some(ike) = &self.ike {
                ike.remove(i).await;
            }
            if let Some((name, _)) = self.xfrm_links.remove(&i) {
                self.dp.detach_tunnel_in_from(&name);
                if let Some(r) = self.rules.iter().position(|r| *r == name) {
                    self.rules.remove(r);
                    self.kernel.delete_segment_rules(&name).await?;
                }
                self.kernel.delete_link(&name).await?;
            }
            self.dp.clear_tunnel(i as u32)?;
            self.connectors[i] = None;
            info!("ipsec {}: connector gone (reload)", c.name);
        }
        let (new, new_conns): (Vec<crate::config::Ipsec>, Vec<_>) = target
            .iter()
            .zip(conns)
            .filter(|(t, _)| !self.connectors.iter().flatten().any(|c| c == *t))
            .map(|(t, c)| (t.clone(), c.clone()))
            .unzip();
        if new.is_empty() {
            return Ok(());
        }
        let file = self.path.display().to_string();
        if self.ike.is_none() {
            // No connector ran: the daemon starts with these (indices from 0).
            debug_assert!(self.connectors.is_empty());
            let mut if_ids = std::collections::HashMap::new();
            for c in &new {
                let i = self.connectors.len();
                self.connectors.push(Some(c.clone()));
                if let Some(id) = self.create_xfrm_interface(i, c).await? {
                    if_ids.insert(i, id);
                }
            }
            self.ike = crate::ike::daemon::start(
                &new,
                self.config.agent.ike_cookie_threshold,
                &file,
                &if_ids,
            )
            .await?;
            return Ok(());
        }
        for (c, conn) in new.iter().zip(new_conns) {
            let i = self.connectors.len();
            self.connectors.push(Some(c.clone()));
            let if_id = self.create_xfrm_interface(i, c).await?;
            if let Some(ike) = &self.ike {
                ike.add(c, conn, i, if_id).await?;
            }
        }
        Ok(())
    }

    /// Decrypted traffic meets the same policy as the rest: each connector's packets are
    /// put in its segment (`TUNNELS`), and the TC program that picks them out runs where
    /// they re-enter the stack: the xfrm interfaces (route-based) and the config's
    /// interfaces (policy-based tunnels' packets come back in where their ESP arrived).
    pub(super) fn tunnel_policy(&mut self) -> Result<()> {
        let c = self.config.clone();
        if self.connectors.is_empty() {
            return Ok(());
        }
        let connectors = self.connectors.clone();
        for (i, t) in connectors
            .iter()
            .enumerate()
            .filter_map(|(i, t)| Some((i, t.as_ref()?)))
        {
            let seg = c.segment_id(&t.segment).expect("validated");
            let deny =
                c.segment_by_id(seg).expect("validated").default_action == DefaultAction::Deny;
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
    /// table sends them toward the tunnel endpoint) or taken out again, through the
    /// routing core: BGP routes whose next hop lies in the tunnel follow.
    pub(super) async fn on_tunnel(&mut self, ev: TunnelEvent) {
        match ev {
            TunnelEvent::Up(i) => self.tunnel_up(i).await,
            TunnelEvent::Down(i) => self.tunnel_down(i).await,
        }
    }

    async fn tunnel_up(&mut self, i: usize) {
        let Some(c) = self.connector(i).cloned() else {
            return;
        };
        let seg = self.config.segment_id(&c.segment).expect("validated");
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
        // How the kernel reaches the tunnel: into its xfrm interface (route-based: a
        // device route, its policies encrypt), or toward the endpoint (policy-based: XFRM
        // policies catch it there). Inner prefixes of the other family than the underlay
        // get a device route, XFRM does the rest; the data plane keys them by the
        // endpoint mapped into their family (`tunnel_key`).
        let kernel_hop = match (self.xfrm_links.get(&i), underlay) {
            (Some((_, xi)), _) => Some((*xi, unspecified(c.remote_address))),
            (None, hop) => hop,
        };
        if let Some((oif, gw)) = kernel_hop {
            for key in tunnel_keys(c.remote_address) {
                let hop = if key.is_ipv4() == gw.is_ipv4() {
                    (oif, gw)
                } else {
                    (oif, unspecified(key))
                };
                self.tunnel_kernel_hops.insert(key, hop);
            }
        }
        let prefixes = if c.routes.is_empty() {
            c.remote_ts.clone()
        } else {
            c.routes.clone()
        };
        for key in tunnel_keys(c.remote_address) {
            if let Err(e) = self.dp.set_nexthop_alive(key, true) {
                warn!("ipsec {}: {e:#}", c.name);
            }
        }
        self.tunnel_routes
            .insert(i, prefixes.iter().map(|n| (seg, *n)).collect());
        self.set_tunnel_routes(i).await;
        // BGP peers inside the tunnel (a VPN gateway's or a vWAN hub's BGP address): our
        // own session packets follow the main table, so each gets a host route into the
        // tunnel there.
        let peers: Vec<IpNet> = self
            .config
            .bgp
            .iter()
            .flat_map(|b| &b.neighbors)
            .filter(|n| {
                n.segment == c.segment && prefixes.iter().any(|net| net.contains(&n.address))
            })
            .map(|n| IpNet::from(n.address))
            .collect();
        for host in &peers {
            if let Some(h) = kernel_hop {
                if let Err(e) = self.kernel.replace_route(MAIN_TABLE, *host, &[h]).await {
                    warn!("ipsec {}: {e:#}", c.name);
                }
            }
            info!(
                "ipsec {}: BGP peer {} is reached through the tunnel",
                c.name,
                host.addr()
            );
        }
        self.tunnel_peers.insert(i, peers);
        info!(
            "ipsec {}: tunnel up: {} routed into it in segment {}",
            c.name,
            prefixes
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            c.segment
        );
    }

    /// Routes a connector's prefixes into its tunnel while it is up and its BFD session
    /// (if any) has not failed; takes them out otherwise.
    pub(super) async fn set_tunnel_routes(&mut self, i: usize) {
        let Some(c) = self.connector(i) else {
            return;
        };
        let (name, remote) = (c.name.clone(), c.remote_address);
        let Some(routes) = self.tunnel_routes.get(&i).cloned() else {
            return;
        };
        let held = self.bfd_holds_connector(i);
        let mut out = Vec::new();
        for (seg, net) in routes {
            if held {
                self.core
                    .withdraw(Source::Tunnel(i as u32), seg, net, &mut out);
            } else {
                let hop = NhKey {
                    ifindex: TUNNEL,
                    via: tunnel_key(remote, &net),
                };
                self.core.set(
                    Source::Tunnel(i as u32),
                    seg,
                    net,
                    Paths::direct(&[hop]),
                    &mut out,
                );
            }
        }
        if let Err(e) = self.apply(out).await {
            warn!("ipsec {name}: {e:#}");
        }
        if held {
            info!("ipsec {name}: BFD over the tunnel is down: its routes are out");
        }
    }

    async fn tunnel_down(&mut self, i: usize) {
        for host in self.tunnel_peers.remove(&i).unwrap_or_default() {
            if let Err(e) = self.kernel.delete_route(MAIN_TABLE, host).await {
                warn!("removing the host route to BGP peer {}: {e:#}", host.addr());
            }
        }
        let Some(routes) = self.tunnel_routes.remove(&i) else {
            return;
        };
        // Packets stop going into it first, whatever the number of routes.
        if let Some(c) = self.connector(i) {
            for key in tunnel_keys(c.remote_address) {
                if let Err(e) = self.dp.set_nexthop_alive(key, false) {
                    warn!("ipsec {}: {e:#}", c.name);
                }
            }
        }
        let mut out = Vec::new();
        for (seg, net) in routes {
            self.core
                .withdraw(Source::Tunnel(i as u32), seg, net, &mut out);
        }
        // Routes learned over the tunnel lose their next hop with it (next-hop tracking).
        if let Err(e) = self.apply(out).await {
            warn!("{e:#}");
        }
        if let Some(c) = self.connector(i).cloned() {
            for key in tunnel_keys(c.remote_address) {
                self.tunnel_kernel_hops.remove(&key);
            }
            info!("ipsec {}: tunnel down: its routes are gone", c.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tunnel_key;

    #[test]
    fn a_tunnels_key_takes_the_family_of_the_prefix() {
        let v4 = "203.0.113.1".parse().unwrap();
        let v6 = "2001:db8::c0a8:101".parse().unwrap();
        let (n4, n6) = ("10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap());
        assert_eq!(tunnel_key(v4, &n4), v4);
        assert_eq!(
            tunnel_key(v4, &n6),
            "::ffff:203.0.113.1".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(tunnel_key(v6, &n6), v6);
        assert_eq!(
            tunnel_key(v6, &n4),
            "192.168.1.1".parse::<std::net::IpAddr>().unwrap()
        );
    }
}
