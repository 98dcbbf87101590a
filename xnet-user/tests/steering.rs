//! Firewall steering end to end: the lab with two firewall namespaces (nftables counters)
//! behind the CXP; policies steer VNet ⇄ on-prem UDP through them.

use std::time::{Duration, Instant};

use xnet_lab::testkit::*;

/// With `STEER_VNET_TO_ONPREM_UDP`: VNet ⇄ on-prem UDP steered through service "fw".
const ONPREM_TO_VNET_UDP: &str = r#"
[[policies]]
name = "onprem-to-vnet-udp"
segment = "prod"
source = "192.168.0.0/16"
destination = "10.1.0.0/16"
protocol = "udp"
action = "steer"
service = "fw"
"#;

#[test]
fn steered_flows_cross_one_firewall_both_ways_and_fail_over() {
    if !require_root("steered_flows_cross_one_firewall_both_ways_and_fail_over") {
        return;
    }
    let lab = lab_with_firewalls("fw", 2);
    let agent = Agent::start(
        &lab,
        &format!(
            "{}\n{FIREWALL_SERVICE}\n{STEER_VNET_TO_ONPREM_UDP}\n{ONPREM_TO_VNET_UDP}",
            xnet_lab::lab::DEMO_CONFIG
        ),
    );
    wait_until(
        &agent,
        "both firewall instances healthy",
        Duration::from_secs(5),
        |s| healthy_instances(s) == 2,
    );

    // One UDP flow, then its reverse (same addresses and ports swapped).
    assert_eq!(vnet1_to_onprem(&lab, 100), 100);
    assert_eq!(
        udp(
            &lab,
            "onprem",
            "192.168.10.1:9000",
            "vnet1",
            "10.1.0.1:5000",
            100
        ),
        100
    );
    let c = firewall_counts(&lab);
    let (used, idle) = if c[0].0 > 0 { (0, 1) } else { (1, 0) };
    assert!(
        c[used].0 >= 100 && c[used].1 >= 100,
        "both directions crossed fw{}: {c:?}",
        used + 1
    );
    assert_eq!(
        c[idle],
        (0, 0),
        "the other instance saw none of the flow: {c:?}"
    );

    // Traffic no policy matches (TCP) goes straight, around the firewalls.
    assert_eq!(
        tcp(
            &lab,
            "vnet1",
            "10.1.0.1:0",
            "onprem",
            "192.168.10.1:9001",
            1 << 18
        ),
        1 << 18
    );
    assert_eq!(firewall_counts(&lab), c, "TCP bypassed the firewalls");
    let s = agent.status();
    assert!(
        s.policies[0].packets >= 100 && s.policies[1].packets >= 100,
        "rule hits: {:?}",
        s.policies
    );
    assert!(s.reason("steered") >= 200);

    // Kill the instance that carries the flow: it leaves the pool within its detection
    // time (2 × 200 ms, plus a probe's wait) and the flow re-hashes to the other one.
    sh(&format!(
        "ip -n {} link set eth0 down",
        lab.ns(&format!("fw{}", used + 1))
    ));
    let t = Instant::now();
    wait_until(
        &agent,
        "the dead instance out of the pool",
        Duration::from_millis(1500),
        |s| healthy_instances(s) == 1,
    );
    eprintln!("instance removed after {:?}", t.elapsed());
    assert_eq!(vnet1_to_onprem(&lab, 100), 100);
    let c2 = firewall_counts(&lab);
    assert!(c2[idle].0 >= 100, "flow moved to fw{}: {c2:?}", idle + 1);

    // Fail-closed: with no instance left, steered traffic is dropped, not bypassed.
    sh(&format!(
        "ip -n {} link set eth0 down",
        lab.ns(&format!("fw{}", idle + 1))
    ));
    wait_until(
        &agent,
        "no instance left",
        Duration::from_millis(1500),
        |s| healthy_instances(s) == 0,
    );
    let dropped = agent.status().reason("drop_fail_closed");
    assert_eq!(vnet1_to_onprem(&lab, 50), 0);
    assert!(agent.status().reason("drop_fail_closed") - dropped >= 50);

    // Recovery puts an instance back (its default route went with the link: restore it).
    let k = used + 1;
    sh(&format!(
        "ip -n {0} link set eth0 up && ip -n {0} route replace default via 10.0.1{k}.1",
        lab.ns(&format!("fw{k}"))
    ));
    wait_until(&agent, "instance back", Duration::from_secs(3), |s| {
        healthy_instances(s) == 1
    });
    let got = vnet1_to_onprem(&lab, 50);
    let s = agent.status();
    assert_eq!(
        got,
        50,
        "after recovery (drop_fail_closed {}, pass_no_neighbour {})",
        s.reason("drop_fail_closed"),
        s.reason("pass_no_neighbour")
    );
    hold(
        &lab,
        &agent,
        &format!(
            "try: ip netns exec {p}-fw1 nft list ruleset (the firewall's counters)\n     ip netns exec {p}-vnet1 ping -I 10.1.0.1 192.168.10.1\n     ip -n {p}-fw{k} link set eth0 down (fail over)",
            p = lab.prefix
        ),
    );
}
