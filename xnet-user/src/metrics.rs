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

type Counters<L> = Family<L, Counter<u64>>;
type Gauges<L> = Family<L, Gauge<f64, AtomicU64>>;

/// Adds one family to `r`, fills it with `fill`.
fn family<L, M>(
    r: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    fill: impl FnOnce(&Family<L, M>),
) where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
    M: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Default
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let f = Family::<L, M>::default();
    fill(&f);
    match unit {
        Some(u) => r.register_with_unit(name, help, u, f),
        None => r.register(name, help, f),
    }
}

/// Adds one gauge without labels.
fn gauge(r: &mut Registry, name: &str, help: &str, unit: Option<Unit>, v: f64) {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(v);
    match unit {
        Some(u) => r.register_with_unit(name, help, u, g),
        None => r.register(name, help, g),
    }
}

/// The metrics of one status, in the OpenMetrics text format.
pub fn encode(s: &Status) -> String {
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
    let outcomes = |i: &crate::status::InterfaceStatus| {
        [
            ("forwarded", i.forwarded, i.forwarded_bytes),
            ("passed", i.passed, i.passed_bytes),
            ("dropped", i.dropped, i.dropped_bytes),
        ]
    };
    let label = |i: &crate::status::InterfaceStatus, o: &str| Itf {
        interface: i.name.clone(),
        segment: i.segment.clone(),
        outcome: o.to_string(),
    };
    family(&mut r, "interface_packets", "Packets received on an interface, by what XDP did with them (forwarded, passed to the kernel, dropped)", None, |f: &Counters<Itf>| {
        for i in &s.interfaces {
            for (o, p, _) in outcomes(i) {
                f.get_or_create(&label(i, o)).inc_by(p);
            }
        }
    });
    family(
        &mut r,
        "interface",
        "Bytes received on an interface (frames from the Ethernet header on), by outcome",
        Some(Unit::Bytes),
        |f: &Counters<Itf>| {
            for i in &s.interfaces {
                for (o, _, b) in outcomes(i) {
                    f.get_or_create(&label(i, o)).inc_by(b);
                }
            }
        },
    );
    family(&mut r, "datapath_reason_packets", "Packets by interface and reason: forwarded and steered, and why XDP passed a packet to the kernel or dropped it", None, |f: &Counters<ItfReason>| {
        for i in &s.interfaces {
            for c in &i.reasons {
                f.get_or_create(&ItfReason { interface: i.name.clone(), outcome: c.outcome.clone(), reason: c.reason.clone() }).inc_by(c.packets);
            }
        }
    });
    family(
        &mut r,
        "datapath_reason",
        "Bytes by interface and reason",
        Some(Unit::Bytes),
        |f: &Counters<ItfReason>| {
            for i in &s.interfaces {
                for c in &i.reasons {
                    f.get_or_create(&ItfReason {
                        interface: i.name.clone(),
                        outcome: c.outcome.clone(),
                        reason: c.reason.clone(),
                    })
                    .inc_by(c.bytes);
                }
            }
        },
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
    let rule = |p: &crate::status::PolicyStatus| Rule {
        rule: p.name.clone(),
        segment: p.segment.clone(),
        action: p.action.clone(),
    };
    family(
        &mut r,
        "policy_rule_hits",
        "Packets that matched a policy rule",
        None,
        |f: &Counters<Rule>| {
            for p in &s.policies {
                f.get_or_create(&rule(p)).inc_by(p.packets);
            }
        },
    );
    family(
        &mut r,
        "policy_rule",
        "Bytes of the packets that matched a policy rule",
        Some(Unit::Bytes),
        |f: &Counters<Rule>| {
            for p in &s.policies {
                f.get_or_create(&rule(p)).inc_by(p.bytes);
            }
        },
    );
    let instances = || {
        s.services.iter().flat_map(|svc| {
            svc.instances.iter().map(move |i| {
                (
                    Instance {
                        service: svc.name.clone(),
                        instance: i.name.clone(),
                    },
                    i,
                )
            })
        })
    };
    family(&mut r, "firewall_instance_up", "1 when the instance passes its health checks (in the pool), 0 when it failed them; absent until the first probe answers or fails", None, |f: &Gauges<Instance>| {
        for (l, i) in instances() {
            match i.health.as_str() {
                "up" => f.get_or_create(&l).set(1.0),
                "down" => f.get_or_create(&l).set(0.0),
                _ => 0.0,
            };
        }
    });
    family(
        &mut r,
        "firewall_instance_probe_rtt",
        "Round trip of the instance's last answered health probe",
        Some(Unit::Seconds),
        |f: &Gauges<Instance>| {
            for (l, i) in instances() {
                if let Some(ms) = i.probe_rtt_ms {
                    f.get_or_create(&l).set(ms / 1e3);
                }
            }
        },
    );
    family(
        &mut r,
        "firewall_instance_steered_packets",
        "Packets steered to the instance",
        None,
        |f: &Counters<Instance>| {
            for (l, i) in instances() {
                f.get_or_create(&l).inc_by(i.packets);
            }
        },
    );
    family(
        &mut r,
        "firewall_instance_steered",
        "Bytes steered to the instance",
        Some(Unit::Bytes),
        |f: &Counters<Instance>| {
            for (l, i) in instances() {
                f.get_or_create(&l).inc_by(i.bytes);
            }
        },
    );

    // BGP.
    let nb = |b: &crate::status::BgpSessionStatus| Neighbor {
        neighbor: b.name.clone(),
        peer: b.peer.clone(),
        segment: b.segment.clone(),
    };
    family(
        &mut r,
        "bgp_session_up",
        "1 when the session is Established",
        None,
        |f: &Gauges<Neighbor>| {
            for b in &s.bgp {
                f.get_or_create(&nb(b))
                    .set(f64::from(u8::from(b.state == "Established")));
            }
        },
    );
    family(&mut r, "bgp_session_state", "The session's FSM state as BGP4-MIB's bgpPeerState numbers it: 1 Idle, 2 Connect, 3 Active, 4 OpenSent, 5 OpenConfirm, 6 Established", None, |f: &Gauges<Neighbor>| {
        for b in &s.bgp {
            f.get_or_create(&nb(b)).set(bgp_state_number(&b.state));
        }
    });
    family(
        &mut r,
        "bgp_session_uptime",
        "How long the session has been Established (0 when it is not)",
        Some(Unit::Seconds),
        |f: &Gauges<Neighbor>| {
            for b in &s.bgp {
                f.get_or_create(&nb(b)).set(b.uptime_secs as f64);
            }
        },
    );
    family(
        &mut r,
        "bgp_session_flaps",
        "Times the session left Established",
        None,
        |f: &Counters<Neighbor>| {
            for b in &s.bgp {
                f.get_or_create(&nb(b)).inc_by(b.flaps);
            }
        },
    );
    family(
        &mut r,
        "bgp_prefixes_received",
        "Prefixes the peer announced (each announcement counts)",
        None,
        |f: &Counters<Neighbor>| {
            for b in &s.bgp {
                f.get_or_create(&nb(b)).inc_by(b.announced_total);
            }
        },
    );
    family(
        &mut r,
        "bgp_prefixes_rejected",
        "Announced prefixes refused by import policy or for our AS in the path",
        None,
        |f: &Counters<Neighbor>| {
            for b in &s.bgp {
                f.get_or_create(&nb(b)).inc_by(b.rejected_total);
            }
        },
    );
    family(
        &mut r,
        "bgp_prefixes_accepted",
        "The peer's prefixes in the RIB now",
        None,
        |f: &Gauges<Neighbor>| {
            for b in &s.bgp {
                f.get_or_create(&nb(b)).set(b.received as f64);
            }
        },
    );
    family(
        &mut r,
        "bgp_prefixes_advertised",
        "Prefixes advertised to the peer now",
        None,
        |f: &Gauges<Neighbor>| {
            for b in &s.bgp {
                f.get_or_create(&nb(b)).set(b.sent as f64);
            }
        },
    );
    family(
        &mut r,
        "bgp_updates_treated_as_withdraw",
        "UPDATEs whose routes were withdrawn instead (RFC 7606)",
        None,
        |f: &Counters<Neighbor>| {
            for b in &s.bgp {
                f.get_or_create(&nb(b)).inc_by(b.treated_as_withdraw);
            }
        },
    );

    // IPsec.
    let conn = |c: &crate::status::IpsecStatus| Connector {
        connector: c.name.clone(),
        segment: c.segment.clone(),
    };
    family(
        &mut r,
        "ipsec_ike_sa_up",
        "1 when the connector's IKE SA is established",
        None,
        |f: &Gauges<Connector>| {
            for c in &s.ipsec {
                let up = c.state == "established" || c.state == "no-child-sa";
                f.get_or_create(&conn(c)).set(f64::from(u8::from(up)));
            }
        },
    );
    family(
        &mut r,
        "ipsec_child_sas",
        "CHILD SAs installed in the kernel",
        None,
        |f: &Gauges<Connector>| {
            for c in &s.ipsec {
                f.get_or_create(&conn(c))
                    .set(c.children.iter().filter(|c| c.installed).count() as f64);
            }
        },
    );
    family(
        &mut r,
        "ipsec_ike_rekeys",
        "IKE SA rekeys (either side's)",
        None,
        |f: &Counters<Connector>| {
            for c in &s.ipsec {
                f.get_or_create(&conn(c)).inc_by(c.totals.ike_rekeys);
            }
        },
    );
    family(
        &mut r,
        "ipsec_child_rekeys",
        "CHILD SA rekeys (either side's)",
        None,
        |f: &Counters<Connector>| {
            for c in &s.ipsec {
                f.get_or_create(&conn(c)).inc_by(c.totals.child_rekeys);
            }
        },
    );
    family(
        &mut r,
        "ipsec_dpd_failures",
        "IKE SAs closed because the peer did not answer dead-peer detection",
        None,
        |f: &Counters<Connector>| {
            for c in &s.ipsec {
                f.get_or_create(&conn(c)).inc_by(c.totals.dpd_failures);
            }
        },
    );
    let dirs = |c: &crate::status::IpsecStatus| {
        [
            ("in", c.totals.bytes_in, c.totals.packets_in),
            ("out", c.totals.bytes_out, c.totals.packets_out),
        ]
    };
    family(
        &mut r,
        "ipsec",
        "Bytes through the connector's SAs, as the kernel counts them (rekeyed SAs included)",
        Some(Unit::Bytes),
        |f: &Counters<ConnectorDir>| {
            for c in &s.ipsec {
                for (d, b, _) in dirs(c) {
                    f.get_or_create(&ConnectorDir {
                        connector: c.name.clone(),
                        direction: d.into(),
                    })
                    .inc_by(b);
                }
            }
        },
    );
    family(
        &mut r,
        "ipsec_packets",
        "Packets through the connector's SAs",
        None,
        |f: &Counters<ConnectorDir>| {
            for c in &s.ipsec {
                for (d, _, p) in dirs(c) {
                    f.get_or_create(&ConnectorDir {
                        connector: c.name.clone(),
                        direction: d.into(),
                    })
                    .inc_by(p);
                }
            }
        },
    );
    let dropped = Counter::<u64>::default();
    dropped.inc_by(s.ipsec.first().map_or(0, |c| c.dropped));
    r.register(
        "ike_messages_dropped",
        "IKE messages dropped (malformed, not authentic, unexpected), all connectors",
        dropped,
    );

    // BFD.
    let bp = |b: &crate::bfd::driver::Status| BfdPeer {
        peer: b.peer.to_string(),
        local: b.local.map(|l| l.to_string()).unwrap_or_default(),
    };
    family(
        &mut r,
        "bfd_session_up",
        "1 when the BFD session is Up",
        None,
        |f: &Gauges<BfdPeer>| {
            for b in &s.bfd {
                f.get_or_create(&bp(b))
                    .set(f64::from(u8::from(b.state == "up")));
            }
        },
    );
    family(
        &mut r,
        "bfd_session_flaps",
        "Times the BFD session went down after Up",
        None,
        |f: &Counters<BfdPeer>| {
            for b in &s.bfd {
                f.get_or_create(&bp(b)).inc_by(b.flaps.into());
            }
        },
    );

    // Flow export.
    if let Some(f) = &s.flows {
        for (name, help, v) in [
            (
                "flow_samples",
                "Packets sampled by XDP and read by the exporter",
                f.samples,
            ),
            (
                "flow_records_exported",
                "IPFIX flow records sent",
                f.records_exported,
            ),
            (
                "flow_samples_lost",
                "Samples of new flows dropped: the flow cache was full (flows.max_flows)",
                f.lost,
            ),
            (
                "flow_send_errors",
                "IPFIX messages a collector could not be sent",
                f.send_errors,
            ),
        ] {
            let c = Counter::<u64>::default();
            c.inc_by(v);
            r.register(name, help, c);
        }
    }

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
