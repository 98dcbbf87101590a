//! BFD's clients: which sessions the config asks for, and what a session going down or
//! coming back does. A failure acts in two steps: the data plane stops using the dead
//! next hop in every next-hop group at once (prefix-independent), then the client
//! converges — the BGP session is reset (RFC 5882 §4.3; its routes leave the RIB), a
//! static next hop leaves its routes, a tunnel's routes leave. A peer's AdminDown is not
//! a failure (RFC 5882 §3.2), and a session that has not come up yet holds nothing back:
//! a next hop is only taken out after its session was Up and failed.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::time::{Instant, SystemTime};

use log::{info, warn};

use super::Agent;
use crate::bfd::driver::{Bfd, Event, Key};
use crate::bfd::packet::State;
use crate::bfd::session::Timers;
use crate::config::Config;
use crate::dataplane::NhKey;

/// Who a session serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Client {
    /// A BGP neighbour, by address.
    Neighbor(IpAddr),
    /// A static route's next hop.
    NextHop(NhKey),
    /// An IPsec connector, by index.
    Connector(usize),
}

/// The sessions a config asks for, each with its timers and clients.
pub(super) type Wanted = BTreeMap<Key, (Timers, Vec<Client>)>;

use crate::status::Failover;

/// Failovers shown in status, the latest last.
const FAILOVERS_KEPT: usize = 16;

/// The sessions `config` asks for. A neighbour's session is single hop unless the setting
/// says multihop or the neighbour sits inside an IPsec connector's prefixes; a next hop's
/// is single hop; a connector's is multihop (the peer is beyond the tunnel). Two clients
/// of one session with different timers: the first one's apply.
/// `connector`: the IKE daemon's index of a connector, by name.
pub(super) fn wanted(
    config: &Config,
    links: &dyn Fn(&str) -> Option<u32>,
    connector: &dyn Fn(&str) -> Option<usize>,
) -> Wanted {
    let mut w = Wanted::new();
    let mut add = |key: Key, t: Timers, c: Client| {
        let e = w.entry(key).or_insert((t, Vec::new()));
        if !e.1.contains(&c) {
            e.1.push(c);
        }
    };
    let in_tunnel = |a: IpAddr| {
        config.ipsec.iter().any(|c| {
            let routed = if c.routes.is_empty() {
                &c.remote_ts
            } else {
                &c.routes
            };
            routed.iter().any(|n| n.contains(&a))
        })
    };
    for n in config.bgp.iter().flat_map(|b| &b.neighbors) {
        if let Some(b) = &n.bfd {
            let key = Key {
                peer: n.address,
                local: n.local_address,
                multihop: b.multihop.unwrap_or_else(|| in_tunnel(n.address)),
            };
            add(key, b.timers(), Client::Neighbor(n.address));
        }
    }
    for r in &config.routes {
        for h in &r.next_hops {
            let (Some(b), Some(ifindex)) = (&h.bfd, links(&h.interface)) else {
                continue;
            };
            let key = Key {
                peer: h.via,
                local: None,
                multihop: b.multihop.unwrap_or(false),
            };
            add(
                key,
                b.timers(),
                Client::NextHop(NhKey {
                    ifindex,
                    via: h.via,
                }),
            );
        }
    }
    for c in &config.ipsec {
        let (Some(b), Some(i)) = (&c.bfd, connector(&c.name)) else {
            continue;
        };
        {
            let key = Key {
                peer: b.peer.expect("validated"),
                local: b.local,
                multihop: b.multihop.unwrap_or(true),
            };
            add(key, b.timers(), Client::Connector(i));
        }
    }
    w
}

impl Agent {
    /// Starts, changes and stops sessions to match the config (at start and on reload).
    pub(super) fn reconcile_bfd(&mut self) -> anyhow::Result<()> {
        let (links, connectors) = (&self.links, &self.connectors);
        let want = wanted(
            &self.config,
            &|name| links.get(name).map(|l| l.0),
            &|name| {
                connectors
                    .iter()
                    .position(|c| c.as_ref().is_some_and(|c| c.name == name))
            },
        );
        if want.is_empty() && self.bfd.is_none() {
            return Ok(());
        }
        if self.bfd.is_none() {
            self.bfd = Some(Bfd::start(self.dp.shared_groups())?);
        }
        let bfd = self.bfd.as_ref().expect("started");
        for key in self.bfd_clients.keys() {
            if !want.contains_key(key) {
                bfd.remove(*key);
            }
        }
        for (key, (timers, clients)) in &want {
            bfd.add(*key, *timers, self.bfd_vias(key, clients));
        }
        self.bfd_failed.retain(|k| want.contains_key(k));
        self.bfd_clients = want;
        Ok(())
    }

    /// Static next hops whose session failed: left out of their routes.
    pub(super) fn failed_next_hops(&self) -> HashSet<NhKey> {
        self.bfd_failed
            .iter()
            .filter_map(|k| self.bfd_clients.get(k))
            .flat_map(|(_, clients)| clients)
            .filter_map(|c| match c {
                Client::NextHop(h) => Some(*h),
                _ => None,
            })
            .collect()
    }

    /// Connectors whose BFD session failed: their routes stay out while the tunnel is up.
    pub(super) fn bfd_holds_connector(&self, i: usize) -> bool {
        self.bfd_failed.iter().any(|k| {
            self.bfd_clients
                .get(k)
                .is_some_and(|(_, c)| c.contains(&Client::Connector(i)))
        })
    }

    /// The next-hop addresses the data plane knows a session's clients by.
    fn bfd_vias(&self, key: &Key, clients: &[Client]) -> Vec<IpAddr> {
        let mut v = vec![key.peer];
        for c in clients {
            if let Client::Connector(i) = c {
                if let Some(conn) = self.connector(*i) {
                    v.extend(super::tunnels::tunnel_keys(conn.remote_address));
                }
            }
        }
        v
    }

    pub(super) async fn on_bfd(&mut self, ev: Event) {
        let Some((_, clients)) = self.bfd_clients.get(&ev.key).cloned() else {
            return;
        };
        if ev.to == State::Up {
            if !self.bfd_failed.remove(&ev.key) {
                return;
            }
            info!("bfd {}: up again: its clients use the path", ev.key);
            self.bfd_clients_follow(&clients, false).await;
            return;
        }
        if !ev.failure {
            return;
        }
        self.bfd_failed.insert(ev.key);
        // The BFD thread has taken the next hop out of the data plane's groups already.
        let (groups, switch_ms) = (ev.groups, ev.switched_after.as_secs_f64() * 1e3);
        info!(
            "bfd {}: down ({}): {groups} next-hop groups stopped using it {switch_ms:.2} ms after detection; {:.1} ms until the agent heard",
            ev.key,
            ev.diag.name(),
            ev.at.elapsed().as_secs_f64() * 1e3
        );
        if self.failovers.len() == FAILOVERS_KEPT {
            self.failovers.pop_front();
        }
        self.failovers.push_back(Failover {
            peer: ev.key.peer,
            detected_unix_ms: unix_ms(ev.at),
            groups,
            switch_ms,
            converge_ms: None,
        });
        self.failover_started.insert(ev.key.peer, ev.at);
        self.bfd_clients_follow(&clients, true).await;
        if !clients.iter().any(|c| matches!(c, Client::Neighbor(_))) {
            // Statics and tunnels have converged now; BGP when its session is down.
            self.failover_converged(ev.key.peer);
        }
    }

    /// The clients take the path as dead (`down`) or usable again.
    async fn bfd_clients_follow(&mut self, clients: &[Client], down: bool) {
        let mut statics = false;
        for c in clients {
            match *c {
                Client::Neighbor(peer) if down => {
                    if let Some(b) = &self.bgp {
                        b.reset(peer, crate::bgp::packet::CEASE_BFD_DOWN);
                    }
                }
                // The session reconnects by itself.
                Client::Neighbor(_) => {}
                Client::NextHop(_) => statics = true,
                Client::Connector(i) => self.set_tunnel_routes(i).await,
            }
        }
        if statics {
            let want = super::route_set(&self.config, &self.links);
            if let Err(e) = self.set_statics(want).await {
                warn!("bfd: static routes: {e:#}");
            }
        }
    }

    /// The routes of the failure of `peer` have all moved.
    pub(super) fn failover_converged(&mut self, peer: IpAddr) {
        let Some(t) = self.failover_started.remove(&peer) else {
            return;
        };
        let f = self
            .failovers
            .iter_mut()
            .rev()
            .find(|f| f.peer == peer && f.converge_ms.is_none());
        if let Some(f) = f {
            let ms = t.elapsed().as_secs_f64() * 1e3;
            f.converge_ms = Some(ms);
            info!(
                "failover from {}: routes converged {ms:.0} ms after detection",
                f.peer
            );
        }
    }

    /// Stops BFD with AdminDown to every peer (shutdown and graceful restart alike).
    pub(super) fn stop_bfd(&mut self) {
        if let Some(mut b) = self.bfd.take() {
            b.stop();
        }
    }

    pub(super) fn bfd_status(&self) -> Vec<crate::bfd::driver::Status> {
        self.bfd.as_ref().map(|b| b.status()).unwrap_or_default()
    }
}

fn unix_ms(at: Instant) -> f64 {
    let ago = at.elapsed();
    SystemTime::now()
        .checked_sub(ago)
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_from_neighbours_next_hops_and_connectors() {
        let text = r#"
[agent]
socket = "/tmp/x.sock"
[[segments]]
name = "prod"
table = 100
[[interfaces]]
name = "eth1"
segment = "prod"
[[routes]]
segment = "prod"
prefix = "10.9.0.0/16"
next_hops = [{ via = "10.0.1.2", interface = "eth1", bfd = true },
             { via = "10.0.1.3", interface = "eth1" }]
[[routes]]
segment = "prod"
prefix = "10.8.0.0/16"
next_hops = [{ via = "10.0.1.2", interface = "eth1", bfd = { interval_ms = 100 } }]
[bgp]
asn = 65000
router_id = "10.0.1.1"
[[bgp.neighbors]]
name = "a"
segment = "prod"
address = "10.0.1.2"
remote_asn = 65001
bfd = true
[[bgp.neighbors]]
name = "b"
segment = "prod"
address = "10.0.9.9"
remote_asn = 65001
bfd = { interval_ms = 50, multiplier = 5, multihop = true }
[[bgp.neighbors]]
name = "c"
segment = "prod"
address = "10.0.1.7"
remote_asn = 65001
"#;
        let config = Config::parse(text, "x.toml").unwrap();
        let w = wanted(&config, &|n| (n == "eth1").then_some(3), &|n| {
            config.ipsec.iter().position(|c| c.name == n)
        });
        let single = |a: &str| Key {
            peer: a.parse().unwrap(),
            local: None,
            multihop: false,
        };
        let nh = NhKey {
            ifindex: 3,
            via: "10.0.1.2".parse().unwrap(),
        };
        // The neighbour and both routes' next hop share one session (the first timers).
        let (t, clients) = &w[&single("10.0.1.2")];
        assert_eq!(t.interval.as_millis(), 300);
        assert_eq!(t.multiplier, 3);
        assert_eq!(
            clients,
            &vec![
                Client::Neighbor(single("10.0.1.2").peer),
                Client::NextHop(nh)
            ]
        );
        let b = Key {
            multihop: true,
            ..single("10.0.9.9")
        };
        assert_eq!(w[&b].0.interval.as_millis(), 50);
        assert_eq!(w.len(), 2, "no session without bfd: {w:?}");
    }
}
