//! BGP against a second implementation beside BIRD: FRR 8.4 (Debian) in the lab's
//! on-prem namespace, the agent in cxp. eBGP over IPv4 and IPv6 with TCP-MD5 both ways
//! (FRR connects to our listener on one session, we connect to FRR on the other), iBGP
//! with FRR as route reflector and xnet as its client, and a removed neighbour seen by
//! FRR as Cease/Peer De-configured.

use std::time::Duration;

use xnet_lab::testkit::*;

/// FRR's paths for `prefix` in `afi`, as JSON (empty when it has none).
fn frr_paths(frr: &Frr, afi: &str, prefix: &str) -> Vec<serde_json::Value> {
    frr.routes(afi)[prefix]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

const FRR_EBGP: &str = r#"
frr defaults traditional
hostname onprem
router bgp 65010
 bgp router-id 10.0.3.2
 no bgp ebgp-requires-policy
 no bgp network import-check
 neighbor 10.0.3.1 remote-as 65000
 neighbor 10.0.3.1 password v4-s3cret
 neighbor 10.0.3.1 timers connect 2
 neighbor fd00:3::1 remote-as 65000
 neighbor fd00:3::1 password v6-s3cret
 neighbor fd00:3::1 passive
 address-family ipv4 unicast
  network 172.16.0.0/16
  network 172.17.0.0/16
 exit-address-family
 address-family ipv6 unicast
  network fd16::/48
  neighbor fd00:3::1 activate
 exit-address-family
"#;

/// The agent's side: FRR connects to us over IPv4 (we are passive: the listener's key
/// signs), we connect to FRR over IPv6 (FRR is passive: our connecting socket's key).
fn xnet_ebgp(dir: &std::path::Path) -> String {
    format!(
        r#"
[bgp]
asn = 65000
router_id = "10.0.3.1"

[[bgp.neighbors]]
name = "frr"
segment = "prod"
address = "10.0.3.2"
remote_asn = 65010
passive = true
advertise = "default"
password_file = "{}/frr.password"

[[bgp.neighbors]]
name = "frr6"
segment = "prod"
address = "fd00:3::2"
remote_asn = 65010
advertise = "custom"
prefixes = ["fd01::/48"]
password_env = "FRR6_PASSWORD"
"#,
        dir.display()
    )
}

#[test]
fn frr_ebgp_v4_and_v6_with_tcp_md5_both_ways() {
    if !require_root("frr_ebgp_v4_and_v6_with_tcp_md5_both_ways") {
        return;
    }
    let lab = lab("frr");
    let dir = std::env::temp_dir().join(format!("{}-frr-keys", lab.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("frr.password"), "v4-s3cret\n").unwrap();
    let frr = Frr::in_host(&lab, "onprem", FRR_EBGP, "172.16.0.1");
    let agent = Agent::start_with_env(
        &lab,
        &format!("{}\n{}", xnet_lab::lab::DEMO_CONFIG, xnet_ebgp(&dir)),
        &[("FRR6_PASSWORD", "v6-s3cret")],
    );
    wait_until(
        &agent,
        "both MD5-signed sessions with FRR established",
        Duration::from_secs(30),
        |s| established(s) == 2,
    );
    wait_until(
        &agent,
        "FRR's routes in the data plane",
        Duration::from_secs(10),
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
    for b in &s.bgp {
        assert_eq!(
            b.not_negotiated, 0,
            "{}: FRR sent only what was negotiated",
            b.name
        );
    }
    // What we advertise reaches FRR: the default route over IPv4, fd01::/48 over IPv6,
    // with our AS in front.
    wait_for(
        "FRR has the CXP's default route and fd01::/48",
        Duration::from_secs(10),
        || {
            !frr_paths(&frr, "ipv4", "0.0.0.0/0").is_empty()
                && !frr_paths(&frr, "ipv6", "fd01::/48").is_empty()
        },
        || frr.cmd("show bgp summary"),
    );
    let p = &frr_paths(&frr, "ipv6", "fd01::/48")[0];
    assert_eq!(p["path"].as_str(), Some("65000"), "{p}");
    // The kernel signs and checks: FRR's own view of the IPv4 session's connection.
    let n = frr.json("show bgp neighbors 10.0.3.1 json");
    assert_eq!(n["10.0.3.1"]["bgpState"].as_str(), Some("Established"));

    // FRR changes its IPv4 password and connects to us with it: the kernel drops its
    // SYNs without a word, and the agent says it is an MD5 mismatch (from the kernel's
    // TCPMD5 counters), not an absent peer.
    frr.configure(&[
        "router bgp 65010",
        "neighbor 10.0.3.1 password not-the-same",
    ]);
    wait_until(
        &agent,
        "the IPv4 session's error names the TCP-MD5 mismatch",
        Duration::from_secs(30),
        |s| {
            s.bgp.iter().any(|b| {
                b.name == "frr"
                    && b.state != "Established"
                    && b.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("TCP-MD5") && e.contains("wrong signature"))
            })
        },
    );
    let log = agent.log();
    assert!(
        !log.contains("v4-s3cret") && !log.contains("v6-s3cret"),
        "a password reached the log"
    );
}

const FRR_REFLECTOR: &str = r#"
frr defaults traditional
hostname rr
router bgp 65000
 bgp router-id 10.0.3.2
 bgp log-neighbor-changes
 no bgp network import-check
 neighbor 10.0.3.1 remote-as 65000
 neighbor 10.0.3.1 timers connect 2
 address-family ipv4 unicast
  network 172.16.0.0/16 route-map LP
  neighbor 10.0.3.1 route-reflector-client
 exit-address-family
route-map LP permit 10
 set local-preference 250
 set large-community 65000:7:1
"#;

const XNET_CLIENT: &str = r#"
[bgp]
asn = 65000
router_id = "10.0.3.1"

[[bgp.neighbors]]
name = "rr"
segment = "prod"
address = "10.0.3.2"
remote_asn = 65000
advertise = "all"
"#;

/// FRR reflects to us; we send it what we originate (static routes) and never what we
/// learned from it or any other internal peer (RFC 4271 §9.2). Then the neighbour is
/// removed: FRR records Cease/Peer De-configured and drops our routes at once, though
/// it is a graceful-restart helper that would otherwise keep them.
#[test]
fn frr_route_reflector_with_xnet_as_client_and_neighbour_removal() {
    if !require_root("frr_route_reflector_with_xnet_as_client_and_neighbour_removal") {
        return;
    }
    let lab = lab("frrrr");
    let frr = Frr::in_host(&lab, "onprem", FRR_REFLECTOR, "172.16.0.1");
    let agent = Agent::start(
        &lab,
        &format!("{}\n{XNET_CLIENT}", xnet_lab::lab::DEMO_CONFIG),
    );
    wait_until(
        &agent,
        "iBGP session with FRR established",
        Duration::from_secs(30),
        |s| established(s) == 1,
    );
    wait_until(
        &agent,
        "the reflector's route in the data plane",
        Duration::from_secs(10),
        |s| in_data_plane(s, "172.16.0.0/16"),
    );
    let s = agent.status();
    let r = s.bgp_route("172.16.0.0/16").unwrap();
    assert_eq!(
        r.paths[0].local_pref,
        Some(250),
        "LOCAL_PREF from an internal peer is the path's preference"
    );
    assert_eq!(r.paths[0].as_path, "");
    assert_eq!(r.paths[0].large_communities, ["65000:7:1"]);
    // Our static routes reach FRR; its own route does not come back from us.
    wait_for(
        "FRR has the CXP's static 10.1.0.0/16",
        Duration::from_secs(10),
        || !frr_paths(&frr, "ipv4", "10.1.0.0/16").is_empty(),
        || frr.cmd("show bgp ipv4 unicast"),
    );
    let own = frr_paths(&frr, "ipv4", "172.16.0.0/16");
    assert_eq!(
        own.len(),
        1,
        "only FRR's own path: xnet must not re-advertise an iBGP route to an iBGP peer: {own:?}"
    );
    let p = &frr_paths(&frr, "ipv4", "10.1.0.0/16")[0];
    assert_eq!(p["locPrf"].as_u64(), Some(100), "{p}");

    // A changed neighbour restarts with Cease 6, Other Configuration Change (RFC 4486).
    reconfigure(
        &agent,
        "advertise = \"all\"",
        "advertise = \"all\"\nhold_time = 30",
    );
    wait_for(
        "FRR told of the configuration change",
        Duration::from_secs(5),
        // FRR's log, not its neighbour state: that is the new session's once it is up.
        || {
            frr.log()
                .contains("received from neighbor 10.0.3.1 6/6 (Cease/Other Configuration Change)")
        },
        || frr.log(),
    );
    wait_until(&agent, "the session back", Duration::from_secs(30), |s| {
        established(s) == 1
    });
    wait_for(
        "FRR has the CXP's routes again",
        Duration::from_secs(10),
        || !frr_paths(&frr, "ipv4", "10.1.0.0/16").is_empty(),
        || frr.cmd("show bgp ipv4 unicast"),
    );

    // The neighbour goes from the config: FRR is told why, and our routes leave it now
    // (a graceful-restart helper keeps them for 120 s after a bare TCP close).
    let cfg = std::fs::read_to_string(&agent.config).unwrap();
    let without = &cfg[..cfg.find("[[bgp.neighbors]]").unwrap()];
    std::fs::write(&agent.config, without).unwrap();
    agent.signal(libc::SIGHUP);
    wait_for(
        "FRR dropped the CXP's routes",
        Duration::from_secs(5),
        || frr_paths(&frr, "ipv4", "10.1.0.0/16").is_empty(),
        || frr.cmd("show bgp ipv4 unicast"),
    );
    let why = last_notification(&frr);
    assert!(
        why.contains("Cease") && why.contains("De-configured"),
        "FRR's reason: {why:?}"
    );
}

/// The reason FRR gives for the last NOTIFICATION it received from the CXP.
fn last_notification(frr: &Frr) -> String {
    let n = frr.json("show bgp neighbors 10.0.3.1 json");
    n["10.0.3.1"]["lastNotificationReason"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}
