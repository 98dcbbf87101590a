//! BGP against a real peer: BIRD 2 in the lab's on-prem namespace, the agent in cxp.

use std::process::Command;
use std::time::Duration;

use xnet_lab::lab::Lab;
use xnet_lab::testkit::*;
use xnet_user::status::Status;

const XNET_BGP: &str = r#"
[bgp]
asn = 65000
router_id = "10.0.3.1"

[[bgp.neighbors]]
name = "onprem"
segment = "prod"
address = "10.0.3.2"
remote_asn = 65010
advertise = "default"
import = { local_pref = 200 }
export = { prepend = 2, add_communities = ["65000:100"] }

[[bgp.neighbors]]
name = "onprem6"
segment = "prod"
address = "fd00:3::2"
remote_asn = 65010
advertise = "custom"
prefixes = ["fd01::/48"]
import = { prefixes = [{ prefix = "fd16::/16", le = 48 }] }
"#;

const BIRD_CONF: &str = r#"
router id 10.0.3.2;
protocol device {}
protocol static s4 { ipv4; route 172.16.0.0/16 blackhole; route 172.17.0.0/16 blackhole; }
protocol static s6 { ipv6; route fd16::/48 blackhole; route fd17::/48 blackhole; }
protocol bgp cxp {
  local 10.0.3.2 as 65010;
  neighbor 10.0.3.1 as 65000;
  ipv4 { import all; export where proto = "s4"; };
}
protocol bgp cxp6 {
  local fd00:3::2 as 65010;
  neighbor fd00:3::1 as 65000;
  enable as4 off;
  ipv6 { import all; export where proto = "s6"; };
}
"#;

/// Seconds the named session has been up.
fn uptime(agent: &Agent, name: &str) -> u64 {
    let s = agent.status();
    s.bgp.iter().find(|b| b.name == name).unwrap().uptime_secs
}

#[test]
fn bird_sessions_routes_withdrawals_and_exports() {
    if !require_root("bird_sessions_routes_withdrawals_and_exports") {
        return;
    }
    let lab = lab("bgp");
    let bird = Bird::with_config(&lab, BIRD_CONF, "172.16.0.1");
    let agent = Agent::start(&lab, &format!("{}\n{XNET_BGP}", xnet_lab::lab::DEMO_CONFIG));
    let up = Duration::from_secs(20);
    wait_until(&agent, "IPv4 and IPv6 sessions established", up, |s| {
        established(s) == 2
    });
    wait_until(
        &agent,
        "BIRD's routes in the data plane",
        Duration::from_secs(5),
        |s| {
            in_data_plane(s, "172.16.0.0/16")
                && in_data_plane(s, "172.17.0.0/16")
                && in_data_plane(s, "fd16::/48")
        },
    );
    let s = agent.status();
    let r = s.bgp_route("172.16.0.0/16").unwrap();
    assert_eq!(r.paths[0].as_path, "65010");
    assert_eq!(r.paths[0].next_hop, "10.0.3.2");
    assert_eq!(
        r.paths[0].local_pref,
        Some(200),
        "import policy sets LOCAL_PREF"
    );
    assert!(r.paths[0].selected);
    assert!(
        !s.bgp_routes.iter().any(|r| r.prefix == "fd17::/48"),
        "import prefix list rejects fd17::/48"
    );

    // Learned routes forward through XDP (the CXP's kernel does not forward).
    wait_until(&agent, "next hop resolved", Duration::from_secs(5), |s| {
        s.routes
            .iter()
            .all(|r| r.next_hops.iter().all(|h| h.fast_path))
    });
    let fwd = agent.status().reason("forwarded");
    assert_eq!(
        to_onprem_172(&lab, 50),
        50,
        "traffic to a BGP-learned prefix"
    );
    assert!(agent.status().reason("forwarded") - fwd >= 50);
    // …and the kernel FIB mirrors them.
    let t100 = sh(&format!("ip -n {} route show table 100", lab.ns("cxp")));
    assert!(
        t100.contains("172.16.0.0/16 via 10.0.3.2 dev onprem proto 250"),
        "{t100}"
    );

    // Export policy: the IPv4 neighbour gets only a default route, the IPv6 one only the
    // custom prefix, as BIRD sees them.
    let r4 = bird.cmd("show route protocol cxp all");
    assert!(r4.contains("0.0.0.0/0"), "{r4}");
    assert!(!r4.contains("10.1.0.0/16"), "{r4}");
    assert!(
        r4.contains("BGP.as_path: 65000 65000 65000"),
        "export prepends twice: {r4}"
    );
    assert!(
        r4.contains("(65000,100)"),
        "export adds the community: {r4}"
    );
    // The IPv6 session runs without 4-octet AS (a 2-octet peer): paths still decode.
    let r6 = bird.cmd("show route protocol cxp6 all");
    assert!(r6.contains("fd01::/48"), "{r6}");
    assert!(r6.contains("BGP.as_path: 65000"), "{r6}");
    let s6 = agent.status();
    let p6 = s6.bgp_route("fd16::/48").unwrap();
    assert_eq!(p6.paths[0].as_path, "65010");

    // A withdrawal removes the route from the data plane; traffic goes to the kernel.
    bird.cmd("disable s4");
    wait_until(&agent, "172.16/16 withdrawn", Duration::from_secs(5), |s| {
        !in_data_plane(s, "172.16.0.0/16")
    });
    assert_eq!(to_onprem_172(&lab, 20), 0);
    bird.cmd("enable s4");
    wait_until(&agent, "172.16/16 back", Duration::from_secs(5), |s| {
        in_data_plane(s, "172.16.0.0/16")
    });

    // A session reset from BIRD: down, routes gone, up again, routes back.
    bird.cmd("restart cxp");
    // BIRD's reset arrives as NOTIFICATION Cease/4 (administrative reset).
    wait_until(&agent, "session back after reset", up, |s| {
        let reset = s.bgp.iter().any(|b| {
            b.name == "onprem" && b.last_error.as_deref().is_some_and(|e| e.contains("6/4"))
        });
        reset && established(s) == 2 && in_data_plane(s, "172.16.0.0/16")
    });
    // The old session's withdrawals and the new one's announcements may still be in
    // flight for a moment: traffic must be back within a few seconds.
    let t = std::time::Instant::now();
    while to_onprem_172(&lab, 20) != 20 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "traffic not back after the reset"
        );
    }
    let s = agent.status();
    let b = s.bgp.iter().find(|b| b.name == "onprem").unwrap();
    assert_eq!(b.received, 2);
    assert_eq!(b.sent, 1);

    // Reconfiguring one neighbour (SIGHUP) restarts only its session: the IPv6 one now
    // advertises another prefix, the IPv4 one keeps running.
    wait_until(
        &agent,
        "the IPv4 session up for 2 s",
        Duration::from_secs(15),
        |s| {
            s.bgp
                .iter()
                .any(|b| b.name == "onprem" && b.state == "Established" && b.uptime_secs >= 2)
        },
    );
    let up_before = uptime(&agent, "onprem");
    reconfigure(
        &agent,
        "prefixes = [\"fd01::/48\"]",
        "prefixes = [\"fd01::/48\", \"fd03::/48\"]",
    );
    wait_until(
        &agent,
        "the IPv6 session back with the new export",
        up,
        |s| {
            s.bgp
                .iter()
                .any(|b| b.name == "onprem6" && b.state == "Established" && b.sent == 2)
        },
    );
    let s = agent.status();
    let v4 = s.bgp.iter().find(|b| b.name == "onprem").unwrap();
    assert_eq!(v4.state, "Established");
    assert!(
        v4.uptime_secs >= up_before,
        "the IPv4 session was not restarted: {v4:?}"
    );
    wait_until(
        &agent,
        "BIRD sees fd03::/48",
        Duration::from_secs(5),
        |_| bird.cmd("show route protocol cxp6").contains("fd03::/48"),
    );

    // A new import policy keeps the session: ROUTE-REFRESH brings the routes again and
    // the new policy applies to them.
    let up_before = uptime(&agent, "onprem");
    reconfigure(
        &agent,
        "import = { local_pref = 200 }",
        "import = { local_pref = 300 }",
    );
    wait_until(
        &agent,
        "routes refreshed under the new import policy",
        Duration::from_secs(10),
        |s| {
            s.bgp_routes.iter().any(|r| {
                r.prefix == "172.16.0.0/16" && r.paths.iter().any(|p| p.local_pref == Some(300))
            })
        },
    );
    let s = agent.status();
    let v4 = s.bgp.iter().find(|b| b.name == "onprem").unwrap();
    assert!(
        v4.state == "Established" && v4.uptime_secs >= up_before,
        "no session reset for an import change: {v4:?}"
    );
    assert!(
        agent.log().contains("ROUTE-REFRESH sent"),
        "{}",
        agent.log()
    );
}

#[test]
fn max_prefix_limit_tears_the_session_down() {
    if !require_root("max_prefix_limit_tears_the_session_down") {
        return;
    }
    let lab = lab("bgpmax");
    let _bird = Bird::with_config(&lab, BIRD_CONF, "172.16.0.1");
    let cfg = XNET_BGP.replace(
        "advertise = \"default\"",
        "advertise = \"default\"\nmax_prefixes = 1",
    );
    let agent = Agent::start(&lab, &format!("{}\n{cfg}", xnet_lab::lab::DEMO_CONFIG));
    wait_until(
        &agent,
        "the session torn down at the limit",
        Duration::from_secs(20),
        |s| {
            s.bgp.iter().any(|b| {
                b.name == "onprem"
                    && b.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("maximum number of prefixes reached"))
            })
        },
    );
    let s = agent.status();
    assert!(
        !in_data_plane(&s, "172.16.0.0/16") && !in_data_plane(&s, "172.17.0.0/16"),
        "nothing from the peer stays"
    );
    assert!(
        in_data_plane(&s, "fd16::/48") || s.bgp.iter().any(|b| b.name == "onprem6"),
        "the other session is unaffected"
    );
}

#[test]
fn ebgp_multihop_from_loopbacks_resolves_next_hops_through_static_routes() {
    if !require_root("ebgp_multihop_from_loopbacks_resolves_next_hops_through_static_routes") {
        return;
    }
    let lab = lab("bgpmh");
    // BIRD peers from its loopback 192.168.10.1 to the CXP's link address, two hops away
    // in BGP terms; its routes' next hop is that loopback, reached through the static
    // route 192.168.0.0/16 via 10.0.3.2.
    let conf = r#"
router id 192.168.10.1;
protocol device {}
protocol static s4 { ipv4; route 172.20.0.0/16 blackhole; }
protocol bgp cxp {
  local 192.168.10.1 as 65010;
  neighbor 10.0.3.1 as 65000;
  multihop 2;
  ipv4 { import all; export where proto = "s4"; };
}
"#;
    let _bird = Bird::with_config(&lab, conf, "172.20.0.1");
    // The agent's own sessions use the main table.
    sh(&format!(
        "ip -n {} route add 192.168.0.0/16 via 10.0.3.2",
        lab.ns("cxp")
    ));
    let cfg = r#"
[bgp]
asn = 65000
router_id = "10.0.3.1"

[[bgp.neighbors]]
name = "onprem-mh"
segment = "prod"
address = "192.168.10.1"
local_address = "10.0.3.1"
remote_asn = 65010
"#;
    let agent = Agent::start(&lab, &format!("{}\n{cfg}", xnet_lab::lab::DEMO_CONFIG));
    wait_until(
        &agent,
        "multihop session with the route installed",
        Duration::from_secs(20),
        |s| established(s) == 1 && in_data_plane(s, "172.20.0.0/16"),
    );
    let s = agent.status();
    let r = s.bgp_route("172.20.0.0/16").unwrap();
    assert_eq!(r.paths[0].next_hop, "192.168.10.1");
    assert_eq!(
        udp(
            &lab,
            "vnet1",
            "10.1.0.1:5000",
            "onprem",
            "172.20.0.1:9000",
            20
        ),
        20,
        "forwarded via the static route's next hop"
    );
}

/// A BPF filesystem mounted for the test in the host's mount namespace: the agent runs
/// under `ip netns exec`, whose private /sys would give each agent its own, gone when it
/// exits, and the pins with it.
struct BpfFs(std::path::PathBuf);

impl BpfFs {
    fn mount(lab: &Lab) -> BpfFs {
        let dir = std::env::temp_dir().join(format!("{}-bpffs", lab.prefix));
        std::fs::create_dir_all(&dir).unwrap();
        sh(&format!("mount -t bpf bpf {}", dir.display()));
        BpfFs(dir)
    }

    fn pins(&self) -> usize {
        std::fs::read_dir(&self.0)
            .unwrap()
            .flatten()
            .filter_map(|ns| std::fs::read_dir(ns.path()).ok())
            .map(|d| d.count())
            .sum()
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn stale(s: &Status, prefix: &str) -> bool {
    s.bgp_routes
        .iter()
        .any(|r| r.prefix == prefix && r.paths.iter().any(|p| p.stale))
}

#[test]
fn graceful_restart_of_the_agent_and_of_bird() {
    if !require_root("graceful_restart_of_the_agent_and_of_bird") {
        return;
    }
    graceful_restart(false);
}

/// The agent's restart stays hitless with BFD on: the old agent says AdminDown, which is
/// not a failure (RFC 5882 §3.2). BIRD 2.0.12 takes any Up → Down as one (its
/// `bfd_request_notify`), so it runs `bfd graceful`: its BFD down starts a graceful
/// restart for us instead of dropping our routes.
#[test]
fn graceful_restart_of_the_agent_with_bfd_stays_hitless() {
    if !require_root("graceful_restart_of_the_agent_with_bfd_stays_hitless") {
        return;
    }
    graceful_restart(true);
}

fn graceful_restart(bfd: bool) {
    let lab = lab(if bfd { "bgpgrb" } else { "bgpgr" });
    let pins = BpfFs::mount(&lab);
    let mut conf = BIRD_CONF.replace(
        "neighbor 10.0.3.1 as 65000;",
        "neighbor 10.0.3.1 as 65000;\n  graceful restart on;",
    );
    let mut xnet_bgp = XNET_BGP.to_string();
    if bfd {
        conf = conf.replace(
            "graceful restart on;",
            "graceful restart on;\n  bfd graceful;",
        ) + "protocol bfd { interface \"eth0\" { interval 300 ms; multiplier 3; }; }\n";
        xnet_bgp = xnet_bgp.replacen(
            "advertise = \"default\"",
            "advertise = \"default\"\nbfd = true",
            1,
        );
    }
    let mut bird = Bird::with_config(&lab, &conf, "172.16.0.1");
    let cfg = format!(
        "{}\n{}",
        xnet_lab::lab::DEMO_CONFIG.replace(
            "[agent]\n",
            &format!("[agent]\npin_dir = \"{}\"\n", pins.0.display())
        ),
        xnet_bgp
    );
    let mut agent = Agent::start(&lab, &cfg);
    let up = Duration::from_secs(20);
    wait_until(&agent, "sessions up, routes in", up, |s| {
        established(s) == 2
            && in_data_plane(s, "172.16.0.0/16")
            && (!bfd || s.bfd.iter().any(|b| b.state == "up"))
    });
    wait_until(&agent, "next hops resolved", Duration::from_secs(5), |s| {
        s.routes
            .iter()
            .all(|r| r.next_hops.iter().all(|h| h.fast_path))
    });
    assert!(bird.cmd("show route protocol cxp").contains("0.0.0.0/0"));

    // 1. The agent restarts (SIGUSR1, then a new agent) under steady traffic.
    let traffic = Flows::start(
        &lab,
        ("vnet1", "10.1.0.1"),
        ("onprem", "172.16.0.1:9100"),
        1,
        5100,
    );
    std::thread::sleep(Duration::from_millis(300));
    agent.signal(libc::SIGUSR1);
    let code = agent.child.take().unwrap().wait().unwrap();
    assert!(code.success(), "agent exit: {code}: {}", agent.log());
    assert!(
        agent.log().contains("exited for a graceful restart"),
        "{}",
        agent.log()
    );
    assert!(pins.pins() >= 3, "XDP links pinned: {}", pins.pins());
    // While no agent runs: BIRD keeps our route, the kernel keeps the learned ones.
    std::thread::sleep(Duration::from_millis(1000));
    let kept = bird.cmd("show route protocol cxp");
    assert!(kept.contains("0.0.0.0/0"), "BIRD kept our route: {kept}");
    let t100 = sh(&format!("ip -n {} route show table 100", lab.ns("cxp")));
    assert!(t100.contains("172.16.0.0/16"), "{t100}");
    let agent2 = Agent::start(&lab, &cfg);
    wait_until(&agent2, "the new agent took over", up, |s| {
        established(s) == 2
            && s.interfaces.iter().all(|i| i.xdp == "native")
            && in_data_plane(s, "172.16.0.0/16")
    });
    std::thread::sleep(Duration::from_millis(500));
    let flow = &traffic.stop()[0];
    let (sent, received) = (flow.sent, flow.arrivals.len() as u64);
    assert!(sent > 500, "{sent} sent");
    assert_eq!(received, sent, "no datagram lost across the restart");
    let log = agent2.log();
    assert!(log.contains("graceful restart complete"), "{log}");
    assert_eq!(pins.pins(), 0, "the new agent owns the links");
    assert!(
        agent2.status().reason("forwarded") > 0,
        "the new program forwards"
    );
    let r = bird.cmd("show route protocol cxp all");
    assert!(r.contains("0.0.0.0/0") && !r.contains("stale"), "{r}");
    if bfd {
        wait_until(&agent2, "BFD up with the new agent", up, |s| {
            s.bfd.iter().any(|b| b.state == "up")
        });
        assert!(agent2.status().failovers.is_empty());
        // A peer's control-plane restart is not told apart from a dead path: with BFD
        // on, its routes go at once (the point of BFD), so part 2 is for BFD off.
        return;
    }

    // 2. BIRD restarts gracefully: the agent keeps its routes (stale) and forwarding.
    bird.exit_for_graceful_restart();
    wait_until(&agent2, "the session down, routes stale", up, |s| {
        established(s) < 2 && stale(s, "172.16.0.0/16") && in_data_plane(s, "172.16.0.0/16")
    });
    assert_eq!(to_onprem_172(&lab, 20), 20, "forwarding on stale routes");
    bird.recover();
    wait_until(&agent2, "BIRD back, routes current", up, |s| {
        established(s) == 2 && in_data_plane(s, "172.16.0.0/16") && !stale(s, "172.16.0.0/16")
    });
    assert!(agent2.log().contains("End-of-RIB"), "{}", agent2.log());
    assert_eq!(to_onprem_172(&lab, 20), 20);
}
