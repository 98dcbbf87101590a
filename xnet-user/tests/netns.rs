//! End to end in network namespaces: the agent binary runs in the lab's `cxp` namespace,
//! where IP forwarding is off, so every packet that crosses was forwarded by XDP.

use std::process::Command;
use std::time::Duration;

use xnet_lab::testkit::*;
use xnet_user::status::Status;

#[test]
fn xdp_forwards_udp_and_tcp_with_kernel_forwarding_off() {
    if !require_root("xdp_forwards_udp_and_tcp_with_kernel_forwarding_off") {
        return;
    }
    let lab = lab("fwd");
    let cxp = lab.ns("cxp");
    assert_eq!(
        sh(&format!(
            "ip netns exec {cxp} sysctl -n net.ipv4.ip_forward"
        ))
        .trim(),
        "0"
    );
    let agent = Agent::start(&lab, xnet_lab::lab::DEMO_CONFIG);
    let before = agent.status();
    assert_eq!(vnet1_to_onprem(&lab, 200), 200, "IPv4 UDP vnet1 → onprem");
    let got = udp(
        &lab,
        "onprem",
        "[fd03::1]:5000",
        "vnet1",
        "[fd01::1]:9000",
        200,
    );
    assert_eq!(
        got,
        200,
        "IPv6 UDP onprem → vnet1; counters: {:?}",
        agent.status().reasons
    );
    let sent = 1 << 20;
    assert_eq!(
        tcp(
            &lab,
            "vnet1",
            "10.1.0.1:0",
            "onprem",
            "192.168.10.1:9001",
            sent
        ),
        sent,
        "TCP transfer, both directions forwarded"
    );
    assert_eq!(
        tcp(
            &lab,
            "onprem",
            "[fd03::1]:0",
            "vnet1",
            "[fd01::1]:9001",
            sent
        ),
        sent,
        "TCP over IPv6"
    );
    let after = agent.status();
    let fwd = |s: &Status, i: &str| s.interface(i).unwrap().forwarded;
    assert!(
        fwd(&after, "vnet1") - fwd(&before, "vnet1") >= 200,
        "vnet1 ingress counted the UDP it forwarded"
    );
    assert!(fwd(&after, "onprem") - fwd(&before, "onprem") >= 200);
    // Counters agree: per-interface forwarded sums to the per-reason total.
    let by_if: u64 = after.interfaces.iter().map(|i| i.forwarded).sum();
    assert_eq!(by_if, after.reason("forwarded"));
    let rx: u64 = after.interfaces.iter().map(|i| i.rx).sum();
    let all: u64 = after.reasons.iter().map(|(_, v)| v).sum();
    assert_eq!(rx, all, "every received packet has exactly one outcome");
    // The slow path mirrors the fast path.
    let t100 = sh(&format!("ip -n {cxp} route show table 100"));
    assert!(
        t100.contains("192.168.0.0/16 via 10.0.3.2 dev onprem proto 250"),
        "{t100}"
    );
    assert!(sh(&format!("ip -n {cxp} rule")).contains("iif vnet1 lookup 100"));
}

#[test]
fn segments_are_isolated() {
    if !require_root("segments_are_isolated") {
        return;
    }
    let lab = lab("seg");
    let agent = Agent::start(&lab, xnet_lab::lab::DEMO_CONFIG);
    let before = agent.status().reason("pass_no_route");
    // vnet2 is in segment dev, which has no route to vnet1's prefix.
    assert_eq!(
        udp(&lab, "vnet2", "10.2.0.1:5000", "vnet1", "10.1.0.1:9000", 50),
        0
    );
    assert!(agent.status().reason("pass_no_route") - before >= 50);
    // And the same flow inside segment prod gets through.
    assert_eq!(
        udp(
            &lab,
            "onprem",
            "192.168.10.1:5000",
            "vnet1",
            "10.1.0.1:9000",
            50
        ),
        50
    );
}

#[test]
fn route_change_on_sighup_applies_without_reloading_the_program() {
    if !require_root("route_change_on_sighup_applies_without_reloading_the_program") {
        return;
    }
    let lab = lab("hup");
    let agent = Agent::start(&lab, xnet_lab::lab::DEMO_CONFIG);
    let prog = xdp_prog_id(&lab, "vnet1").expect("XDP attached to vnet1");
    let cfg = std::fs::read_to_string(&agent.config).unwrap();
    let route = "[[routes]]\nsegment = \"prod\"\nprefix = \"192.168.0.0/16\"\nnext_hops = [{ via = \"10.0.3.2\", interface = \"onprem\" }]\n";
    assert!(cfg.contains(route));
    let has_route = |s: &Status| {
        s.routes
            .iter()
            .any(|r| r.prefix == "192.168.0.0/16" && r.next_hops[0].fast_path)
    };
    std::fs::write(&agent.config, cfg.replace(route, "")).unwrap();
    agent.signal(libc::SIGHUP);
    wait_until(&agent, "route withdrawn", Duration::from_secs(5), |s| {
        !has_route(s)
    });
    assert_eq!(vnet1_to_onprem(&lab, 20), 0, "route removed");
    let table = sh(&format!("ip -n {} route show table 100", lab.ns("cxp")));
    assert!(
        !table.contains("192.168.0.0/16"),
        "kernel mirror follows: {table}"
    );
    // A broken file is rejected whole and changes nothing.
    std::fs::write(&agent.config, "[[routes]]\nprefix = \"nonsense\"\n").unwrap();
    agent.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        agent.log().contains("reload rejected, nothing changed"),
        "{}",
        agent.log()
    );
    assert_eq!(agent.status().routes.len(), 5);
    std::fs::write(&agent.config, &cfg).unwrap();
    agent.signal(libc::SIGHUP);
    wait_until(&agent, "route restored", Duration::from_secs(5), has_route);
    assert_eq!(vnet1_to_onprem(&lab, 20), 20, "route back");
    assert_eq!(
        xdp_prog_id(&lab, "vnet1"),
        Some(prog),
        "same program all along"
    );
}

#[test]
fn new_neighbour_becomes_fast_path_within_a_second() {
    if !require_root("new_neighbour_becomes_fast_path_within_a_second") {
        return;
    }
    let lab = lab("nbr");
    let agent = Agent::start(&lab, xnet_lab::lab::DEMO_CONFIG);
    let cxp = lab.ns("cxp");
    // The on-prem router's MAC changes (a replaced box): the agent follows the kernel.
    let mac = "02:00:00:00:99:01";
    sh(&format!(
        "ip -n {} link set eth0 address {mac}",
        lab.ns("onprem")
    ));
    sh(&format!(
        "ip -n {cxp} neigh replace 10.0.3.2 dev onprem lladdr {mac} nud reachable"
    ));
    wait_until(
        &agent,
        "new MAC on the fast path",
        Duration::from_secs(1),
        |s| {
            s.neighbours
                .iter()
                .any(|n| n.ip == "10.0.3.2" && n.mac.as_deref() == Some(mac))
        },
    );
    assert_eq!(vnet1_to_onprem(&lab, 50), 50);
}

#[test]
fn stop_detaches_and_removes_kernel_state() {
    if !require_root("stop_detaches_and_removes_kernel_state") {
        return;
    }
    let lab = lab("stop");
    let mut agent = Agent::start(&lab, xnet_lab::lab::DEMO_CONFIG);
    assert!(xdp_prog_id(&lab, "onprem").is_some());
    let status = agent.stop();
    assert!(status.success(), "clean exit on SIGTERM: {}", agent.log());
    let cxp = lab.ns("cxp");
    for dev in ["vnet1", "vnet2", "onprem"] {
        assert_eq!(xdp_prog_id(&lab, dev), None, "{dev} detached");
    }
    assert_eq!(
        sh(&format!(
            "ip -n {cxp} route show table 100 2>/dev/null || true"
        ))
        .trim(),
        ""
    );
    assert!(!sh(&format!("ip -n {cxp} rule")).contains("iif vnet1"));
    assert!(!agent.socket.exists(), "status socket removed");
    assert_eq!(vnet1_to_onprem(&lab, 10), 0, "no XDP, no kernel forwarding");
}

#[test]
fn invalid_config_is_reported_and_changes_nothing() {
    if !require_root("invalid_config_is_reported_and_changes_nothing") {
        return;
    }
    let lab = lab("bad");
    let dir = std::env::temp_dir().join(&lab.prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    // The second interface does not exist: the first must not be touched either.
    let bad = lab
        .config(dir.join("s").to_str().unwrap())
        .replace("\"vnet2\"", "\"vnet9\"");
    std::fs::write(&path, bad).unwrap();
    let out = agent_command(&lab, &path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains(&format!("{}: interfaces[2].name", path.display())),
        "{err}"
    );
    assert!(err.contains("\"vnet9\" does not exist"), "{err}");
    for dev in ["vnet1", "onprem"] {
        assert_eq!(xdp_prog_id(&lab, dev), None, "{dev} untouched");
    }
    assert_eq!(
        sh(&format!(
            "ip -n {} route show table 100 2>/dev/null || true",
            lab.ns("cxp")
        ))
        .trim(),
        ""
    );
    // `xnet check` reports a bad field without touching anything.
    std::fs::write(&path, "[[segments]]\nname = \"a\"\ntable = 255\n").unwrap();
    let out = Command::new(XNET)
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("segments[0].table: 255 is reserved"), "{err}");
}

/// A next hop's neighbour entry the operator made permanent (a router that answers no ARP,
/// say) is used as it is: the agent does not turn it into a managed entry, XDP forwards
/// with its MAC, and it is still there after the agent stops.
#[test]
fn an_operators_permanent_neighbour_entry_is_kept() {
    if !require_root("an_operators_permanent_neighbour_entry_is_kept") {
        return;
    }
    let lab = lab("perm");
    let cxp = lab.ns("cxp");
    let onprem_mac = sh(&format!(
        "ip -n {} -br link show eth0 | awk '{{print $3}}'",
        lab.ns("onprem")
    ));
    let onprem_mac = onprem_mac.trim();
    sh(&format!(
        "ip -n {cxp} neigh replace 10.0.3.2 dev onprem lladdr {onprem_mac} nud permanent"
    ));
    let mut agent = Agent::start(&lab, xnet_lab::lab::DEMO_CONFIG);
    assert!(
        agent
            .log()
            .contains("keeping the permanent neighbour entry"),
        "{}",
        agent.log()
    );
    let entry = || sh(&format!("ip -n {cxp} neigh show 10.0.3.2 dev onprem"));
    let e = entry();
    assert!(e.contains("PERMANENT") && !e.contains("managed"), "{e}");
    assert_eq!(vnet1_to_onprem(&lab, 50), 50, "XDP forwards with its MAC");
    assert!(agent.stop().success());
    let e = entry();
    assert!(
        e.contains(onprem_mac) && e.contains("PERMANENT"),
        "kept after stop: {e}"
    );
}
