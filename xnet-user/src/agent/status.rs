//! Status assembly: the answer on the status socket.

use std::collections::HashMap;

use anyhow::Result;

use super::Agent;
use crate::config::XdpMode;
use crate::dataplane::NhKey;
use crate::routing::Source;
use crate::status::{self, Status};

impl Agent {
    /// What `xnet status` and its friends show: read from the config, the data plane's
    /// counters, the routing core, the RIB and the IKE daemon.
    pub(super) fn status(&mut self) -> Result<Status> {
        self.status_of(true)
    }

    /// The status without the tables that grow with routes (static routes, neighbours, the
    /// RIB's first prefixes): what metrics and `xnet top` need, cheap with a full table.
    pub(super) fn status_brief(&mut self) -> Result<Status> {
        self.status_of(false)
    }

    /// The static routes with their next hops' state, and the neighbours.
    fn route_tables(&self, s: &mut Status) {
        let nexthops = self.dp.nexthops();
        let valid: HashMap<NhKey, bool> = nexthops.iter().copied().collect();
        let mut routes: Vec<_> = self.statics.iter().collect();
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
        for (key, _) in nexthops
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
    }

    fn status_of(&mut self, tables: bool) -> Result<Status> {
        let counters = self.dp.counters()?;
        let attached = self.dp.attached();
        let mut s = Status {
            config: self.path.display().to_string(),
            started_unix: self.started_unix,
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
                rx_bytes: c.rx_bytes,
                forwarded_bytes: c.forwarded_bytes,
                passed_bytes: c.passed_bytes,
                dropped_bytes: c.dropped_bytes,
                reasons: counters
                    .per_reason
                    .iter()
                    .find(|(i, _)| *i == ifindex)
                    .map(|(_, r)| {
                        r.iter()
                            .map(|(r, c)| status::ReasonCount {
                                reason: r.name().to_string(),
                                outcome: r.outcome().name().to_string(),
                                packets: c.packets,
                                bytes: c.bytes,
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
        if tables {
            self.route_tables(&mut s);
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
            let pool = self.pool(si);
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
                    probe_rtt_ms: self
                        .health
                        .get(si)
                        .and_then(|h| h.get(ii))
                        .and_then(|h| h.rtt)
                        .map(|d| d.as_secs_f64() * 1e3),
                    in_pool: pool.iter().any(|(n, _)| *n == inst.name),
                });
            }
            s.services.push(status::ServiceStatus {
                name: svc.name.clone(),
                failure_mode: format!("{:?}", svc.failure_mode).to_lowercase(),
                instances,
            });
        }
        s.cluster = self.cluster.as_ref().map(|n| n.status());
        if let Some(bgp) = &self.bgp {
            // The first prefixes in order: the RIB keeps them, a full table is not walked.
            let first = if tables { self.rib.first() } else { Vec::new() };
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
                    flaps: st.flaps,
                    announced_total: self.bgp_counts.get(&p.address).map_or(0, |c| c.announced),
                    rejected_total: self.bgp_counts.get(&p.address).map_or(0, |c| c.rejected),
                });
            }
            s.bgp_routes_total = self.rib.len();
            s.bgp_in_data_plane = self.core.bgp_usable();
            for (seg, net) in first {
                let Some(paths) = self.rib.paths(seg, &net) else {
                    continue;
                };
                let (seg, net) = (&seg, &net);
                let selected = self.bgp_selected(*seg, net);
                s.bgp_routes.push(status::BgpRouteStatus {
                    segment: self.segment_name(*seg).to_string(),
                    prefix: net.to_string(),
                    in_data_plane: self.core.usable(Source::Bgp, *seg, net),
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
        s.bfd = self.bfd_status();
        s.failovers = self.failovers.iter().cloned().collect();
        s.flows = self.flows.as_ref().map(|f| f.stats.lock().unwrap().clone());
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
}
