//! BFD against real peers: BIRD's `protocol bfd` (single hop and multihop) and FRR's
//! bfdd, in the lab's on-prem namespace, the agent in cxp. What an operator checks: both
//! sides say Up with the intervals they agreed, a dead path takes the BGP session and its
//! routes away within a second, the peer hears why (Cease 10, RFC 9384), the peer's
//! AdminDown is not a failure, and the path coming back brings everything back.

use std::time::{Duration, Instant};

use xnet_lab::lab::Lab;
use xnet_lab::testkit::*;
use xnet_user::status::Status;

const XNET_BGP_BFD: &str = r#"
[bgp]
asn = 65000
router_id = "10.0.3.1"

[[bgp.neighbors]]
name = "onprem"
segment = "prod"
address = "10.0.3.2"
remote_asn = 65010
hold_time = 90
bfd = true
"#;

fn bird_conf(bgp_extra: &str, bfd: &str) -> String {
    format!(
        r#"
router id 10.0.3.2;
protocol device {{}}
protocol static s4 {{ ipv4; route 172.16.0.0/16 blackhole; }}
protocol bfd {{
  {bfd}
}}
protocol bgp cxp {{
  local 10.0.3.2 as 65010;
  neighbor 10.0.3.1 as 65000;
  hold time 90;
  connect retry time 1;
  error wait time 1, 2;
  {bgp_extra}
  ipv4 {{ import all; export where proto = "s4"; }};
}}
"#
    )
}

fn session(s: &Status) -> Option<&xnet_user::bfd::driver::Status> {
    s.bfd.iter().find(|b| b.peer.to_string() == "10.0.3.2")
}

fn bfd_up(s: &Status) -> bool {
    session(s).is_some_and(|b| b.state == "up")
}

fn bgp_up_with_routes(s: &Status) -> bool {
    established(s) == 1 && in_data_plane(s, "172.16.0.0/16")
}

/// Everything to and from the on-prem host is dropped there: to us the peer just died.
fn cut(lab: &Lab, what: &str) {
    let ns = lab.ns("onprem");
    let rule = match what {
        "all" => "",
        proto_port => proto_port,
    };
    sh(&format!(
        "ip netns exec {ns} nft 'add table inet cut; add chain inet cut in {{ type filter hook input priority -10; }}; add chain inet cut out {{ type filter hook output priority -10; }}; add rule inet cut in {rule} drop; add rule inet cut out {rule} drop'"
    ));
}

fn heal(lab: &Lab) {
    sh(&format!(
        "ip netns exec {} nft delete table inet cut",
        lab.ns("onprem")
    ));
}

/// Polls the agent every 20 ms until `cond`; the time it took.
fn time_until(
    agent: &Agent,
    what: &str,
    limit: Duration,
    cond: impl Fn(&Status) -> bool,
) -> Duration {
    let t0 = Instant::now();
    loop {
        if agent.try_status().is_some_and(|s| cond(&s)) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "{what}: not within {limit:?}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bird_single_hop_bfd_takes_bgp_and_its_routes_down_within_a_second_and_back() {
    if !require_root("bird_single_hop_bfd_takes_bgp_and_its_routes_down_within_a_second_and_back") {
        return;
    }
    let lab = lab("bfd1");
    let bird = Bird::with_config(
        &lab,
        &bird_conf(
            "bfd on;",
            r#"interface "eth0" { min rx interval 300 ms; min tx interval 300 ms; multiplier 3; };"#,
        ),
        "172.16.0.1",
    );
    let agent = Agent::start(
        &lab,
        &format!("{}\n{XNET_BGP_BFD}", xnet_lab::lab::DEMO_CONFIG),
    );
    wait_until(
        &agent,
        "BFD up and BGP established with routes",
        Duration::from_secs(30),
        |s| bfd_up(s) && bgp_up_with_routes(s),
    );
    let b = session(&agent.status()).unwrap().clone();
    assert!(!b.multihop);
    // Both sides agreed on 300 ms (after the Poll Sequence): 900 ms to detect.
    wait_until(&agent, "300 ms negotiated", Duration::from_secs(5), |s| {
        session(s).is_some_and(|b| b.tx_ms == 300.0 && b.detect_ms == 900.0)
    });
    let view = bird.cmd("show bfd sessions");
    let line = view
        .lines()
        .find(|l| l.starts_with("10.0.3.1"))
        .unwrap_or_else(|| panic!("BIRD has no session with us: {view}"));
    assert!(line.contains("Up"), "BIRD: {line}");
    assert!(
        line.contains("0.300") && line.contains("0.900"),
        "BIRD's intervals: {line}"
    );
    let text = std::process::Command::new(XNET.path())
        .args(["bfd", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("10.0.3.2") && text.contains("up"),
        "xnet bfd: {text}"
    );

    // The peer dies silently: BFD, not the 90 s hold timer, takes the session down.
    cut(&lab, "all");
    let gap = time_until(
        &agent,
        "BGP down and its routes gone",
        Duration::from_secs(5),
        |s| established(s) == 0 && !in_data_plane(s, "172.16.0.0/16"),
    );
    println!("bfd single hop: peer cut → session down and routes gone in {gap:?}");
    assert!(gap <= Duration::from_millis(1500), "{gap:?}");
    let s = agent.status();
    let f = s
        .failovers
        .last()
        .cloned()
        .expect("the failover is recorded");
    assert_eq!(f.peer.to_string(), "10.0.3.2");
    assert!(f.switch_ms < 10.0, "{f:?}");
    assert!(f.converge_ms.is_some(), "{f:?}");
    let b = session(&s).unwrap();
    assert_eq!(b.state, "down");
    assert_eq!(b.last_diag, "control detection time expired");
    assert_eq!(b.flaps, 1);

    // The path comes back: BFD, BGP and the routes follow.
    heal(&lab);
    wait_until(&agent, "all back", Duration::from_secs(30), |s| {
        bfd_up(s) && bgp_up_with_routes(s)
    });
    assert_eq!(to_onprem_172(&lab, 20), 20);

    // Reloads — new intervals, then BFD off: the BGP session stays as it is.
    let before = agent
        .status()
        .bgp
        .iter()
        .map(|b| b.uptime_secs)
        .next()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // New intervals by reload: the same session, Up throughout, told by Poll/Final.
    reconfigure(&agent, "bfd = true", "bfd = { interval_ms = 500 }");
    wait_until(&agent, "500 ms negotiated", Duration::from_secs(5), |s| {
        session(s).is_some_and(|b| b.tx_ms == 500.0 && b.detect_ms == 1500.0)
    });
    let b = session(&agent.status()).unwrap().clone();
    assert_eq!((b.state.as_str(), b.flaps), ("up", 1), "{b:?}");
    let view = bird.cmd("show bfd sessions");
    assert!(
        view.lines()
            .any(|l| l.starts_with("10.0.3.1") && l.contains("Up") && l.contains("1.500")),
        "BIRD: {view}"
    );
    // BFD off: BIRD first (it would take our AdminDown for a failure: see the restart
    // test), then us; the BFD session goes.
    bird.reconfigure(&bird_conf(
        "",
        r#"interface "eth0" { min rx interval 300 ms; min tx interval 300 ms; multiplier 3; };"#,
    ));
    reconfigure(&agent, "bfd = { interval_ms = 500 }", "bfd = false");
    wait_until(&agent, "BFD session removed", Duration::from_secs(5), |s| {
        s.bfd.is_empty()
    });
    let s = agent.status();
    assert!(bgp_up_with_routes(&s));
    assert!(
        s.bgp[0].uptime_secs > before,
        "the BGP session was not reset"
    );
}

#[test]
fn bird_multihop_bfd_takes_bgp_down_when_only_bfd_is_lost() {
    if !require_root("bird_multihop_bfd_takes_bgp_down_when_only_bfd_is_lost") {
        return;
    }
    let lab = lab("bfd2");
    let bird = Bird::with_config(
        &lab,
        &bird_conf(
            "multihop 2; bfd on;",
            "multihop { min rx interval 200 ms; min tx interval 200 ms; multiplier 3; };",
        ),
        "172.16.0.1",
    );
    let cfg = XNET_BGP_BFD.replace(
        "bfd = true",
        "bfd = { interval_ms = 200, multiplier = 3, multihop = true }",
    );
    let agent = Agent::start(&lab, &format!("{}\n{cfg}", xnet_lab::lab::DEMO_CONFIG));
    wait_until(
        &agent,
        "multihop BFD up, BGP established",
        Duration::from_secs(30),
        |s| bfd_up(s) && bgp_up_with_routes(s),
    );
    assert!(session(&agent.status()).unwrap().multihop);
    let view = bird.cmd("show bfd sessions");
    assert!(
        view.lines()
            .any(|l| l.starts_with("10.0.3.1") && l.contains("Up")),
        "BIRD: {view}"
    );
    // Only BFD's packets are lost (UDP 4784): BGP's TCP works, BFD still takes it down.
    cut(&lab, "udp dport 4784");
    let gap = time_until(&agent, "BGP reset", Duration::from_secs(5), |s| {
        !in_data_plane(s, "172.16.0.0/16")
    });
    println!("bfd multihop: BFD cut → routes gone in {gap:?}");
    assert!(gap <= Duration::from_millis(1200), "{gap:?}");
    // BIRD's side of the session saw the same failure.
    wait_for(
        "BIRD's BFD session down",
        Duration::from_secs(5),
        || {
            bird.cmd("show bfd sessions")
                .lines()
                .any(|l| l.starts_with("10.0.3.1") && l.contains("Down"))
        },
        || bird.cmd("show bfd sessions"),
    );
    heal(&lab);
    wait_until(&agent, "all back", Duration::from_secs(30), |s| {
        bfd_up(s) && bgp_up_with_routes(s)
    });
}

const FRR_BGP: &str = r#"
router bgp 65010
 bgp router-id 10.0.3.2
 no bgp ebgp-requires-policy
 timers bgp 30 90
 neighbor 10.0.3.1 remote-as 65000
 neighbor 10.0.3.1 timers connect 1
 neighbor 10.0.3.1 bfd profile fast
 address-family ipv4 unicast
  network 172.16.0.0/16
 exit-address-family
!
ip route 172.16.0.0/16 blackhole
"#;

const FRR_BFD: &str = r#"
bfd
 profile fast
  receive-interval 300
  transmit-interval 300
  detect-multiplier 3
 !
!
"#;

#[test]
fn frr_bfdd_admin_down_is_not_a_failure_and_a_dead_bfdd_is() {
    if !require_root("frr_bfdd_admin_down_is_not_a_failure_and_a_dead_bfdd_is") {
        return;
    }
    let lab = lab("bfd3");
    let mut frr = Frr::with_bfdd(&lab, "onprem", FRR_BGP, FRR_BFD, "172.16.0.1");
    // FRR's static route lives in zebra's config; the blackhole is enough for `network`.
    sh(&format!(
        "ip -n {} route add blackhole 172.16.0.0/16",
        lab.ns("onprem")
    ));
    let agent = Agent::start(
        &lab,
        &format!("{}\n{XNET_BGP_BFD}", xnet_lab::lab::DEMO_CONFIG),
    );
    wait_until(
        &agent,
        "BFD up with FRR, BGP established",
        Duration::from_secs(40),
        |s| bfd_up(s) && bgp_up_with_routes(s),
    );
    let peers = frr.json("show bfd peers json");
    let p = peers
        .as_array()
        .and_then(|a| a.iter().find(|p| p["peer"] == "10.0.3.1"))
        .unwrap_or_else(|| panic!("FRR has no BFD peer 10.0.3.1: {peers}"));
    assert_eq!(p["status"], "up", "{p}");
    let (l, r) = {
        let b = session(&agent.status()).unwrap().clone();
        (b.local_discr, b.remote_discr)
    };
    assert_eq!(p["remote-id"], l, "FRR knows our discriminator: {p}");
    assert_eq!(p["id"], r, "we know FRR's: {p}");

    // FRR shuts its session down administratively: AdminDown, which is not a failure.
    frr.configure(&["bfd", "profile fast", "shutdown"]);
    wait_until(
        &agent,
        "the peer's AdminDown seen",
        Duration::from_secs(5),
        |s| session(s).is_some_and(|b| b.state == "down" && b.remote_state == "admin-down"),
    );
    std::thread::sleep(Duration::from_secs(2));
    let s = agent.status();
    assert!(
        bgp_up_with_routes(&s),
        "BGP stays up on the peer's AdminDown"
    );
    assert!(s.failovers.is_empty(), "{:?}", s.failovers);
    frr.configure(&["bfd", "profile fast", "no shutdown"]);
    wait_until(&agent, "BFD up again", Duration::from_secs(10), bfd_up);

    // bfdd dies without a word: a failure; bgpd hears Cease 10 from us.
    frr.kill_bfdd();
    let gap = time_until(&agent, "routes gone", Duration::from_secs(5), |s| {
        !in_data_plane(s, "172.16.0.0/16")
    });
    println!("bfd with FRR: bfdd killed → routes gone in {gap:?}");
    assert!(gap <= Duration::from_millis(1500), "{gap:?}");
    wait_for(
        "FRR's bgpd received Cease/BFD Down",
        Duration::from_secs(5),
        || {
            let n = frr.json("show bgp neighbors 10.0.3.1 json");
            n["10.0.3.1"].to_string().contains("BFD")
        },
        || frr.cmd("show bgp neighbors 10.0.3.1"),
    );
}

#[test]
fn a_static_next_hop_with_bfd_leaves_its_route_while_the_session_is_down() {
    if !require_root("a_static_next_hop_with_bfd_leaves_its_route_while_the_session_is_down") {
        return;
    }
    let lab = lab("bfd4");
    // BIRD as a plain BFD responder for the next hop (no routing protocol).
    let _bird = Bird::with_config(
        &lab,
        r#"
router id 10.0.3.2;
protocol device {}
protocol bfd {
  interface "eth0" { interval 300 ms; multiplier 3; };
  neighbor 10.0.3.1 dev "eth0";
}
"#,
        "172.16.0.1",
    );
    let hop = r#"{ via = "10.0.3.2", interface = "onprem" }"#;
    let config = xnet_lab::lab::DEMO_CONFIG.replacen(
        hop,
        r#"{ via = "10.0.3.2", interface = "onprem", bfd = true }"#,
        1,
    );
    let agent = Agent::start(&lab, &config);
    let routed = |s: &Status| s.routes.iter().any(|r| r.prefix == "192.168.0.0/16");
    wait_until(
        &agent,
        "BFD up with the next hop",
        Duration::from_secs(20),
        bfd_up,
    );
    assert_eq!(vnet1_to_onprem(&lab, 20), 20);
    cut(&lab, "all");
    let gap = time_until(&agent, "the route gone", Duration::from_secs(5), |s| {
        !routed(s)
    });
    println!("bfd static next hop: cut → route gone in {gap:?}");
    assert!(gap <= Duration::from_millis(1500), "{gap:?}");
    heal(&lab);
    wait_until(&agent, "the route back", Duration::from_secs(20), |s| {
        bfd_up(s) && routed(s)
    });
    assert_eq!(vnet1_to_onprem(&lab, 20), 20);
}

/// RFC 5881 §5: a single-hop Control packet must arrive with TTL 255 (it cannot have
/// crossed a router); anything less is discarded before it reaches a session.
#[test]
fn a_single_hop_packet_with_ttl_below_255_is_discarded() {
    if !require_root("a_single_hop_packet_with_ttl_below_255_is_discarded") {
        return;
    }
    let lab = lab("bfd5");
    // No BGP peer: only BFD matters here.
    let agent = Agent::start(
        &lab,
        &format!("{}\n{XNET_BGP_BFD}", xnet_lab::lab::DEMO_CONFIG),
    );
    wait_until(&agent, "the BFD session", Duration::from_secs(5), |s| {
        session(s).is_some()
    });
    // Down, My Discriminator 77, Your Discriminator 0, 1 s / 300 ms.
    let packet: [u8; 24] = [
        0x20, 0x40, 3, 24, 0, 0, 0, 77, 0, 0, 0, 0, 0, 0x0f, 0x42, 0x40, 0, 0x04, 0x93, 0xe0, 0, 0,
        0, 0,
    ];
    let send = |ttl: u32| {
        in_netns(&lab.ns("onprem"), move || {
            let s = std::net::UdpSocket::bind("10.0.3.2:49999").unwrap();
            s.set_ttl(ttl).unwrap();
            for _ in 0..3 {
                s.send_to(&packet, "10.0.3.1:3784").unwrap();
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    send(254);
    std::thread::sleep(Duration::from_millis(500));
    let b = session(&agent.status()).unwrap().clone();
    assert_eq!(
        (b.state.as_str(), b.remote_discr),
        ("down", 0),
        "TTL 254 ignored: {b:?}"
    );
    send(255);
    wait_until(
        &agent,
        "TTL 255 taken: Down → Init",
        Duration::from_secs(2),
        |s| session(s).is_some_and(|b| b.state == "init" && b.remote_discr == 77),
    );
}
