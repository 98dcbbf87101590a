//! Prometheus metrics against a real Prometheus server: it scrapes the agent in the lab's
//! cxp namespace, and the test reads the values back through Prometheus's query API and
//! compares them with what `xnet status` shows.

use std::time::{Duration, Instant};

use xnet_lab::testkit::*;

const METRICS: &str = "127.0.0.1:9469";

/// Import policy on the demo's BGP neighbour: of BIRD's two prefixes one is refused.
const IMPORT: &str = "import = { prefixes = [{ prefix = \"172.16.0.0/16\" }] }\n";

/// Waits until Prometheus's answer to `q` is `want` (a scrape after the traffic stopped).
fn until_value(p: &Prometheus, q: &str, want: f64) {
    let t = Instant::now();
    loop {
        let got = p.value(q);
        if got == Some(want) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "Prometheus: {q} = {got:?}, want {want}\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn prometheus_scrapes_the_agent_and_reads_what_status_shows() {
    if !require_root("prometheus_scrapes_the_agent_and_reads_what_status_shows") {
        return;
    }
    let lab = lab_with_firewalls("prom", 2);
    let bird = Bird::with_config(&lab, xnet_lab::demo::BIRD_CONF, "172.16.0.1");
    let config = xnet_lab::lab::DEMO_CONFIG.replace(
        "[agent]\n",
        &format!("[agent]\nmetrics_listen = \"{METRICS}\"\n"),
    );
    let agent = Agent::start(
        &lab,
        &format!(
            "{config}\n{FIREWALL_SERVICE}\n{STEER_VNET_TO_ONPREM_UDP}\n{}{IMPORT}",
            xnet_lab::demo::BGP
        ),
    );
    wait_until(
        &agent,
        "BGP up, both firewalls healthy",
        Duration::from_secs(20),
        |s| established(s) == 1 && healthy_instances(s) == 2 && in_data_plane(s, "172.16.0.0/16"),
    );
    assert_eq!(vnet1_to_onprem(&lab, 100), 100);
    assert_eq!(to_onprem_172(&lab, 50), 50);

    // The agent's own answer first: OpenMetrics text.
    let text = http_get(&agent.ns, METRICS, "/metrics").expect("GET /metrics");
    assert!(text.ends_with("# EOF\n"), "{text}");

    let prom = Prometheus::start(&lab.ns("cxp"), "xnet", &[METRICS]);
    until_value(&prom, r#"up{job="xnet"}"#, 1.0);
    let s = agent.status();
    let vnet1 = s.interface("vnet1").unwrap();
    // Counters as the status shows them (the traffic has stopped; health probes go to
    // the firewall interfaces, not these).
    until_value(
        &prom,
        r#"xnet_interface_packets_total{interface="vnet1",outcome="forwarded"}"#,
        vnet1.forwarded as f64,
    );
    assert!(vnet1.forwarded >= 150, "{vnet1:?}");
    until_value(
        &prom,
        r#"xnet_interface_bytes_total{interface="vnet1",outcome="forwarded"}"#,
        vnet1.forwarded_bytes as f64,
    );
    // Ethernet, IPv4 and UDP headers at least.
    assert!(vnet1.forwarded_bytes >= 150 * 42, "{vnet1:?}");
    until_value(
        &prom,
        r#"xnet_policy_rule_hits_total{rule="vnet-to-onprem-udp"}"#,
        s.policies[0].packets as f64,
    );
    assert!(s.policies[0].packets >= 100);
    until_value(
        &prom,
        r#"sum(xnet_datapath_reason_packets_total{interface="vnet1",reason="steered"})"#,
        vnet1
            .reasons
            .iter()
            .find(|r| r.reason == "steered")
            .map_or(0, |r| r.packets) as f64,
    );
    until_value(&prom, "sum(xnet_firewall_instance_up)", 2.0);
    let rtt = prom
        .value(r#"max(xnet_firewall_instance_probe_rtt_seconds)"#)
        .expect("probe latency");
    assert!(rtt > 0.0 && rtt < 0.2, "probe rtt {rtt}");
    // BGP: Established (BGP4-MIB's 6), one prefix accepted, the other refused by import.
    until_value(&prom, r#"xnet_bgp_session_state{neighbor="onprem"}"#, 6.0);
    until_value(&prom, r#"xnet_bgp_session_up{neighbor="onprem"}"#, 1.0);
    until_value(
        &prom,
        r#"xnet_bgp_prefixes_accepted{neighbor="onprem"}"#,
        1.0,
    );
    until_value(
        &prom,
        r#"xnet_bgp_prefixes_received_total{neighbor="onprem"}"#,
        2.0,
    );
    until_value(
        &prom,
        r#"xnet_bgp_prefixes_rejected_total{neighbor="onprem"}"#,
        1.0,
    );
    until_value(
        &prom,
        r#"xnet_bgp_prefixes_advertised{neighbor="onprem"}"#,
        1.0,
    );
    until_value(
        &prom,
        r#"xnet_bgp_session_flaps_total{neighbor="onprem"}"#,
        0.0,
    );
    assert!(prom.value("xnet_route_table_prefixes").unwrap_or(0.0) >= 7.0);
    assert_eq!(
        prom.query("xnet_build_info").len(),
        1,
        "build info: {:?}",
        prom.query("xnet_build_info")
    );

    // A flap shows: BIRD drops the session, it comes back.
    let t = Instant::now();
    bird.cmd("disable cxp");
    until_value(&prom, r#"xnet_bgp_session_up{neighbor="onprem"}"#, 0.0);
    bird.cmd("enable cxp");
    until_value(
        &prom,
        r#"xnet_bgp_session_flaps_total{neighbor="onprem"}"#,
        1.0,
    );
    eprintln!("flap seen through Prometheus after {:?}", t.elapsed());
}
