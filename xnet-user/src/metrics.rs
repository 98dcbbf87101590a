//! Prometheus metrics: with `agent.metrics_listen` set, `GET /metrics` answers in the
//! OpenMetrics text format. Every scrape asks the agent's loop for a fresh status (the
//! same numbers `xnet status` shows) and encodes it with prometheus-client; nothing is
//! counted twice and no metric state lives outside the agent.
//!
//! Names follow Prometheus conventions: base units (bytes, seconds), `_total` on counters,
//! labels bounded by the config (interfaces, rules, neighbours, connectors), never by
//! traffic (no addresses of packets, no prefixes).

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;

use anyhow::{Context, Result};
use log::{info, warn};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::{mpsc, oneshot};

use crate::status::{Request, Status};

/// The OpenMetrics content type (Prometheus negotiates it; the text format is a subset).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `addr` now (so a taken port fails the agent's start with a clear error) and serves
/// `/metrics` on the current runtime; each scrape sends a `Request` on `tx`.
pub async fn serve(addr: SocketAddr, tx: mpsc::Sender<Request>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("agent.metrics_listen: cannot listen on {addr}"))?;
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(tx);
    info!("metrics on http://{addr}/metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!("metrics server stopped: {e}");
        }
    });
    Ok(())
}

async fn scrape(
    axum::extract::State(tx): axum::extract::State<mpsc::Sender<Request>>,
) -> axum::response::Response {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let (reply, answer) = oneshot::channel();
    let request = Request {
        what: crate::status::What::Brief,
        reply,
    };
    let status = match tx.send(request).await {
        Ok(()) => answer.await.ok(),
        Err(_) => None,
    };
    match status {
        Some(s) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], encode(&s)).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "agent not answering\n").into_response(),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Itf {
    interface: String,
    segment: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ItfReason {
    interface: String,
    outcome: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Rule {
    rule: String,
    segment: String,
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Instance {
    service: String,
    instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Neighbor {
    neighbor: String,
    peer: String,
    segment: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Connector {
    connector: String,
    segment: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectorDir {
    connector: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BfdPeer {
    peer: String,
    local: String,
}

/// What a label set needs to go into a family.
trait Labels:
    Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static
{
}
impl<
        L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
    > Labels for L
{
}

fn register<M: prometheus_client::registry::Metric>(
    r: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    m: M,
) {
    match unit {
        Some(u) => r.register_with_unit(name, help, u, m),
        None => r.register(name, help, m),
    }
}

/// A counter family with one series per (labels, value).
fn counters<L: Labels>(
    r: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    series: impl IntoIterator<Item = (L, u64)>,
) {
    let f = Family::<L, Counter<u64>>::default();
    for (l, v) in series {
        f.get_or_create(&l).inc_by(v);
    }
    register(r, name, help, unit, f);
}

/// A gauge family with one series per (labels, value).
fn gauges<L: Labels>(
    r: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    series: impl IntoIterator<Item = (L, f64)>,
) {
    let f = Family::<L, Gauge<f64, AtomicU64>>::default();
    for (l, v) in series {
        f.get_or_create(&l).set(v);
    }
    register(r, name, help, unit, f);
}

/// One gauge without labels.
fn gauge(r: &mut Registry, name: &str, help: &str, unit: Option<Unit>, v: f64) {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(v);
    register(r, name, help, unit, g);
}

/// One counter without labels.
fn counter(r: &mut Registry, name: &str, help: &str, v: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    register(r, name, help, None, c);
}

fn up(b: bool) -> f64 {
    f64::from(u8::from(b))
}

/// The metrics of one status, in the OpenMetrics text format.
pub fn encode(s: &Status) -> String {
    use crate::status::{BgpSessionStatus, InterfaceStatus, IpsecStatus, PolicyStatus};
    let mut r = Registry::with_prefix("xnet");
    r.register(
        "build",
        "The agent's version",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    gauge(
        &mut r,
        "agent_start_time",
        "When the agent started (Unix time)",
        Some(Unit::Seconds),
        s.started_unix,
    );

    // The data plane.
    let outcomes = |i: &InterfaceStatus| {
        let l = |o: &str| Itf {
            interface: i.name.clone(),
            segment: i.segment.clone(),
            outcome: o.to_string(),
        };
        [
            (l("forwarded"), i.forwarded, i.forwarded_bytes),
            (l("passed"), i.passed, i.passed_bytes),
            (l("dropped"), i.dropped, i.dropped_bytes),
        ]
    };
    let per_outcome = || s.interfaces.iter().flat_map(outcomes);
    counters(&mut r, "interface_packets", "Packets received on an interface, by what XDP did with them (forwarded, passed to the kernel, dropped)", None, per_outcome().map(|(l, p, _)| (l, p)));
    counters(
        &mut r,
        "interface",
        "Bytes received on an interface (frames from the Ethernet header on), by outcome",
        Some(Unit::Bytes),
        per_outcome().map(|(l, _, b)| (l, b)),
    );
    let per_reason = || {
        s.interfaces.iter().flat_map(|i| {
            i.reasons.iter().map(move |c| {
                let l = ItfReason {
                    interface: i.name.clone(),
                    outcome: c.outcome.clone(),
                    reason: c.reason.clone(),
                };
                (l, c.packets, c.bytes)
            })
        })
    };
    counters(&mut r, "datapath_reason_packets", "Packets by interface and reason: forwarded and steered, and why XDP passed a packet to the kernel or dropped it", None, per_reason().map(|(l, p, _)| (l, p)));
    counters(
        &mut r,
        "datapath_reason",
        "Bytes by interface and reason",
        Some(Unit::Bytes),
        per_reason().map(|(l, _, b)| (l, b)),
    );
    let t = &s.route_table;
    gauge(
        &mut r,
        "route_table_prefixes",
        "Prefixes in the data plane's route table, all segments",
        None,
        t.prefixes as f64,
    );
    gauge(
        &mut r,
        "route_table_groups_used",
        "Route-table memory in use, in groups of 256 entries",
        None,
        t.groups_used.into(),
    );
    gauge(
        &mut r,
        "route_table_groups",
        "Route-table memory, in groups of 256 entries (agent.route_table_groups)",
        None,
        t.groups_total.into(),
    );

    // Policy and firewalls.
    let rule = |p: &PolicyStatus| Rule {
        rule: p.name.clone(),
        segment: p.segment.clone(),
        action: p.action.clone(),
    };
    counters(
        &mut r,
        "policy_rule_hits",
        "Packets that matched a policy rule",
        None,
        s.policies.iter().map(|p| (rule(p), p.packets)),
    );
    counters(
        &mut r,
        "policy_rule",
        "Bytes of the packets that matched a policy rule",
        Some(Unit::Bytes),
        s.policies.iter().map(|p| (rule(p), p.bytes)),
    );
    let instances = || {
        s.services.iter().flat_map(|svc| {
            svc.instances.iter().map(move |i| {
                let l = Instance {
                    service: svc.name.clone(),
                    instance: i.name.clone(),
                };
                (l, i)
            })
        })
    };
    gauges(&mut r, "firewall_instance_up", "1 when the instance passes its health checks (in the pool), 0 when it failed them; absent until the first probe answers or fails", None, instances().filter_map(|(l, i)| match i.health.as_str() {
        "up" => Some((l, 1.0)),
        "down" => Some((l, 0.0)),
        _ => None,
    }));
    gauges(
        &mut r,
        "firewall_instance_probe_rtt",
        "Round trip of the instance's last answered health probe",
        Some(Unit::Seconds),
        instances().filter_map(|(l, i)| Some((l, i.probe_rtt_ms? / 1e3))),
    );
    counters(
        &mut r,
        "firewall_instance_steered_packets",
        "Packets steered to the instance",
        None,
        instances().map(|(l, i)| (l, i.packets)),
    );
    counters(
        &mut r,
        "firewall_instance_steered",
        "Bytes steered to the instance",
        Some(Unit::Bytes),
        instances().map(|(l, i)| (l, i.bytes)),
    );

    // BGP.
    let nb = |b: &BgpSessionStatus| Neighbor {
        neighbor: b.name.clone(),
        peer: b.peer.clone(),
        segment: b.segment.clone(),
    };
    let bgp_gauge =
        |r: &mut Registry, name: &str, help: &str, unit, v: fn(&BgpSessionStatus) -> f64| {
            gauges(r, name, help, unit, s.bgp.iter().map(|b| (nb(b), v(b))));
        };
    bgp_gauge(
        &mut r,
        "bgp_session_up",
        "1 when the session is Established",
        None,
        |b| up(b.state == "Established"),
    );
    bgp_gauge(&mut r, "bgp_session_state", "The session's FSM state as BGP4-MIB's bgpPeerState numbers it: 1 Idle, 2 Connect, 3 Active, 4 OpenSent, 5 OpenConfirm, 6 Established", None, |b| bgp_state_number(&b.state));
    bgp_gauge(
        &mut r,
        "bgp_session_uptime",
        "How long the session has been Established (0 when it is not)",
        Some(Unit::Seconds),
        |b| b.uptime_secs as f64,
    );
    bgp_gauge(
        &mut r,
        "bgp_prefixes_accepted",
        "The peer's prefixes in the RIB now",
        None,
        |b| b.received as f64,
    );
    bgp_gauge(
        &mut r,
        "bgp_prefixes_advertised",
        "Prefixes advertised to the peer now",
        None,
        |b| b.sent as f64,
    );
    let bgp_counter =
        |r: &mut Registry, name: &str, help: &str, v: fn(&BgpSessionStatus) -> u64| {
            counters(r, name, help, None, s.bgp.iter().map(|b| (nb(b), v(b))));
        };
    bgp_counter(
        &mut r,
        "bgp_session_flaps",
        "Times the session left Established",
        |b| b.flaps,
    );
    bgp_counter(
        &mut r,
        "bgp_prefixes_received",
        "Prefixes the peer announced (each announcement counts)",
        |b| b.announced_total,
    );
    bgp_counter(
        &mut r,
        "bgp_prefixes_rejected",
        "Announced prefixes refused by import policy or for our AS in the path",
        |b| b.rejected_total,
    );
    bgp_counter(
        &mut r,
        "bgp_updates_treated_as_withdraw",
        "UPDATEs whose routes were withdrawn instead (RFC 7606)",
        |b| b.treated_as_withdraw,
    );

    // IPsec.
    let conn = |c: &IpsecStatus| Connector {
        connector: c.name.clone(),
        segment: c.segment.clone(),
    };
    gauges(
        &mut r,
        "ipsec_ike_sa_up",
        "1 when the connector's IKE SA is established",
        None,
        s.ipsec.iter().map(|c| {
            (
                conn(c),
                up(c.state == "established" || c.state == "no-child-sa"),
            )
        }),
    );
    gauges(
        &mut r,
        "ipsec_child_sas",
        "CHILD SAs installed in the kernel",
        None,
        s.ipsec.iter().map(|c| {
            (
                conn(c),
                c.children.iter().filter(|c| c.installed).count() as f64,
            )
        }),
    );
    let ipsec_counter = |r: &mut Registry, name: &str, help: &str, v: fn(&IpsecStatus) -> u64| {
        counters(r, name, help, None, s.ipsec.iter().map(|c| (conn(c), v(c))));
    };
    ipsec_counter(
        &mut r,
        "ipsec_ike_rekeys",
        "IKE SA rekeys (either side's)",
        |c| c.totals.ike_rekeys,
    );
    ipsec_counter(
        &mut r,
        "ipsec_child_rekeys",
        "CHILD SA rekeys (either side's)",
        |c| c.totals.child_rekeys,
    );
    ipsec_counter(
        &mut r,
        "ipsec_dpd_failures",
        "IKE SAs closed because the peer did not answer dead-peer detection",
        |c| c.totals.dpd_failures,
    );
    let dirs = || {
        s.ipsec.iter().flat_map(|c| {
            let l = |d: &str| ConnectorDir {
                connector: c.name.clone(),
                direction: d.into(),
            };
            [
                (l("in"), c.totals.bytes_in, c.totals.packets_in),
                (l("out"), c.totals.bytes_out, c.totals.packets_out),
            ]
        })
    };
    counters(
        &mut r,
        "ipsec",
        "Bytes through the connector's SAs, as the kernel counts them (rekeyed SAs included)",
        Some(Unit::Bytes),
        dirs().map(|(l, b, _)| (l, b)),
    );
    counters(
        &mut r,
        "ipsec_packets",
        "Packets through the connector's SAs",
        None,
        dirs().map(|(l, _, p)| (l, p)),
    );
    counter(
        &mut r,
        "ike_messages_dropped",
        "IKE messages dropped (malformed, not authentic, unexpected), all connectors",
        s.ipsec.first().map_or(0, |c| c.dropped),
    );

    // BFD.
    let bp = |b: &crate::bfd::driver::Status| BfdPeer {
        peer: b.peer.to_string(),
        local: b.local.map(|l| l.to_string()).unwrap_or_default(),
    };
    gauges(
        &mut r,
        "bfd_session_up",
        "1 when the BFD session is Up",
        None,
        s.bfd.iter().map(|b| (bp(b), up(b.state == "up"))),
    );
    counters(
        &mut r,
        "bfd_session_flaps",
        "Times the BFD session went down after Up",
        None,
        s.bfd.iter().map(|b| (bp(b), u64::from(b.flaps))),
    );

    // Flow export.
    if let Some(f) = &s.flows {
        counter(
            &mut r,
            "flow_samples",
            "Packets sampled by XDP and read by the exporter",
            f.samples,
        );
        counter(
            &mut r,
            "flow_records_exported",
            "IPFIX flow records sent",
            f.records_exported,
        );
        counter(
            &mut r,
            "flow_samples_lost",
            "Samples of new flows dropped: the flow cache was full (flows.max_flows)",
            f.lost,
        );
        counter(
            &mut r,
            "flow_send_errors",
            "IPFIX messages a collector could not be sent",
            f.send_errors,
        );
    }

    // As a node of a cluster.
    if let Some(c) = &s.cluster {
        gauge(
            &mut r,
            "cluster_etcd_connected",
            "1 while etcd answers; 0: the node forwards with the config in force and its own probes",
            None,
            c.etcd_connected as u8 as f64,
        );
        gauge(
            &mut r,
            "cluster_config_revision",
            "The etcd revision of the cluster config in force",
            None,
            c.applied_revision as f64,
        );
        gauge(
            &mut r,
            "cluster_config_refused_revision",
            "The latest config revision the node refused (0: none since the one in force)",
            None,
            c.refused.as_ref().map_or(0.0, |x| x.revision as f64),
        );
        gauge(
            &mut r,
            "cluster_nodes",
            "Live nodes of the cluster as this node last saw them",
            None,
            c.members.len() as f64,
        );
    }
    gauges(
        &mut r,
        "firewall_instance_in_pool",
        "1 when flows are steered to the instance (its own health; in a cluster, the majority's view)",
        None,
        instances().map(|(l, i)| (l, i.in_pool as u8 as f64)),
    );

    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r).expect("writing to a String");
    out
}

fn bgp_state_number(s: &str) -> f64 {
    match s {
        "Connect" => 2.0,
        "Active" => 3.0,
        "OpenSent" => 4.0,
        "OpenConfirm" => 5.0,
        "Established" => 6.0,
        _ => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::*;

    fn status() -> Status {
        Status {
            started_unix: 1_700_000_000.5,
            interfaces: vec![InterfaceStatus {
                name: "vnet1".into(),
                segment: "prod".into(),
                forwarded: 5,
                forwarded_bytes: 500,
                dropped: 1,
                dropped_bytes: 60,
                reasons: vec![ReasonCount {
                    reason: "drop_policy".into(),
                    outcome: "dropped".into(),
                    packets: 1,
                    bytes: 60,
                }],
                ..Default::default()
            }],
            policies: vec![PolicyStatus {
                name: "deny-dev".into(),
                segment: "prod".into(),
                action: "deny".into(),
                packets: 1,
                bytes: 60,
            }],
            services: vec![ServiceStatus {
                name: "fw".into(),
                failure_mode: "closed".into(),
                instances: vec![
                    InstanceStatus {
                        name: "fw1".into(),
                        health: "up".into(),
                        probe_rtt_ms: Some(1.5),
                        packets: 7,
                        in_pool: true,
                        ..Default::default()
                    },
                    InstanceStatus {
                        name: "fw2".into(),
                        health: "unknown".into(),
                        ..Default::default()
                    },
                ],
            }],
            bgp: vec![BgpSessionStatus {
                name: "onprem".into(),
                peer: "10.0.3.2".into(),
                segment: "prod".into(),
                state: "Established".into(),
                uptime_secs: 42,
                received: 2,
                sent: 1,
                flaps: 3,
                announced_total: 4,
                rejected_total: 2,
                ..Default::default()
            }],
            ipsec: vec![IpsecStatus {
                name: "azure".into(),
                segment: "prod".into(),
                state: "established".into(),
                totals: IpsecTotals {
                    child_rekeys: 2,
                    bytes_in: 1000,
                    ..Default::default()
                },
                ..Default::default()
            }],
            cluster: Some(crate::status::ClusterStatus {
                cluster: "eu".into(),
                node: "a".into(),
                etcd_connected: false,
                applied_revision: 12,
                refused: Some(crate::cluster::Refusal {
                    revision: 13,
                    reason: "bad".into(),
                }),
                members: vec!["a".into(), "b".into()],
            }),
            ..Default::default()
        }
    }

    #[test]
    fn families_carry_conventional_names_units_and_labels() {
        let text = encode(&status());
        for line in [
            "# TYPE xnet_interface_packets counter",
            r#"xnet_interface_packets_total{interface="vnet1",segment="prod",outcome="forwarded"} 5"#,
            "# UNIT xnet_interface_bytes bytes",
            r#"xnet_interface_bytes_total{interface="vnet1",segment="prod",outcome="dropped"} 60"#,
            r#"xnet_datapath_reason_packets_total{interface="vnet1",outcome="dropped",reason="drop_policy"} 1"#,
            r#"xnet_policy_rule_hits_total{rule="deny-dev",segment="prod",action="deny"} 1"#,
            r#"xnet_firewall_instance_up{service="fw",instance="fw1"} 1.0"#,
            r#"xnet_firewall_instance_probe_rtt_seconds{service="fw",instance="fw1"} 0.0015"#,
            r#"xnet_firewall_instance_steered_packets_total{service="fw",instance="fw1"} 7"#,
            r#"xnet_bgp_session_state{neighbor="onprem",peer="10.0.3.2",segment="prod"} 6.0"#,
            r#"xnet_bgp_session_flaps_total{neighbor="onprem",peer="10.0.3.2",segment="prod"} 3"#,
            r#"xnet_bgp_prefixes_rejected_total{neighbor="onprem",peer="10.0.3.2",segment="prod"} 2"#,
            r#"xnet_bgp_prefixes_accepted{neighbor="onprem",peer="10.0.3.2",segment="prod"} 2.0"#,
            r#"xnet_ipsec_child_rekeys_total{connector="azure",segment="prod"} 2"#,
            r#"xnet_ipsec_bytes_total{connector="azure",direction="in"} 1000"#,
            r#"xnet_ipsec_ike_sa_up{connector="azure",segment="prod"} 1.0"#,
            "xnet_agent_start_time_seconds 1700000000.5",
            r#"xnet_firewall_instance_in_pool{service="fw",instance="fw1"} 1.0"#,
            r#"xnet_firewall_instance_in_pool{service="fw",instance="fw2"} 0.0"#,
            "xnet_cluster_etcd_connected 0.0",
            "xnet_cluster_config_revision 12.0",
            "xnet_cluster_config_refused_revision 13.0",
            "xnet_cluster_nodes 2.0",
            r#"xnet_build_info{version=""#,
            "# EOF",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
        // An instance never probed has no health sample (not a false "down").
        assert!(!text.contains(r#"xnet_firewall_instance_up{service="fw",instance="fw2"}"#));
    }

    #[test]
    fn bgp_states_number_as_the_mib_does() {
        let n: Vec<f64> = [
            "Idle",
            "Connect",
            "Active",
            "OpenSent",
            "OpenConfirm",
            "Established",
        ]
        .iter()
        .map(|s| bgp_state_number(s))
        .collect();
        assert_eq!(n, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }
}
