//! What the Debian package promises, checked on a running agent: the systemd unit's
//! capability bounding set is all the agent needs (XDP loaded and attached, routes and
//! neighbours programmed, BGP on port 179, ICMP health probes, metrics, a hitless-restart
//! exit that pins its links).

use std::time::Duration;

use xnet_lab::testkit::*;

/// The unit's CapabilityBoundingSet, as setpriv(1) takes it.
fn unit_capabilities() -> String {
    let unit = include_str!("../../packaging/deb/xnet.service");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet");
    std::iter::once("-all".to_string())
        .chain(
            line.split_whitespace()
                .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())),
        )
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn the_agent_needs_no_capability_beyond_the_units() {
    if !require_root("the_agent_needs_no_capability_beyond_the_units") {
        return;
    }
    let caps = unit_capabilities();
    let lab = lab_with_firewalls("caps", 1);
    let bird = Bird::with_config(&lab, xnet_lab::demo::BIRD_CONF, "172.16.0.1");
    let bpffs = std::env::temp_dir().join(format!("{}-bpffs", lab.prefix));
    std::fs::create_dir_all(&bpffs).unwrap();
    sh(&format!("mount -t bpf bpf {}", bpffs.display()));
    let config = xnet_lab::demo::config(&lab, "/run/xnet/demo.sock").replacen(
        "[agent]\n",
        &format!("[agent]\npin_dir = \"{}/xnet\"\n", bpffs.display()),
        1,
    );
    // As systemd runs it: root, with only the unit's capabilities.
    let setpriv = [
        "setpriv",
        "--bounding-set",
        &caps,
        "--inh-caps",
        "-all",
        "--",
    ];
    let mut agent = Agent::start_wrapped(&lab, "cxp", &config, &[], &setpriv);
    let pid = agent.child.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let bnd = status
        .lines()
        .find(|l| l.starts_with("CapBnd:"))
        .unwrap()
        .to_string();
    eprintln!("{caps}: {bnd}");
    assert_ne!(
        bnd.split_whitespace().nth(1),
        Some("000001ffffffffff"),
        "bounded"
    );
    wait_until(
        &agent,
        "BGP up, the firewall healthy, routes in",
        Duration::from_secs(20),
        |s| {
            established(s) == 1
                && healthy_instances(s) == 1
                && in_data_plane(s, "172.16.0.0/16")
                && s.interfaces.iter().all(|i| i.xdp == "native")
        },
    );
    assert_eq!(to_onprem_172(&lab, 50), 50, "forwarded by XDP");
    let metrics = http_get(&agent.ns, "127.0.0.1:9469", "/metrics").expect("metrics");
    assert!(metrics.contains("xnet_bgp_session_up"), "{metrics}");
    // The hitless-restart exit pins the XDP links on bpffs.
    agent.signal(libc::SIGUSR1);
    let code = agent.child.take().unwrap().wait().unwrap();
    assert!(code.success(), "{code}: {}", agent.log());
    // One directory per network namespace, a pin per interface in it.
    let pins: usize = std::fs::read_dir(bpffs.join("xnet"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| std::fs::read_dir(d.path()).map(|x| x.count()).unwrap_or(0))
        .sum();
    assert!(pins >= 4, "XDP links pinned: {pins}\n{}", agent.log());
    // Tidy up as a new agent would: a cold start over the pins, then a full stop.
    let mut again = Agent::start_wrapped(&lab, "cxp", &config, &[], &setpriv);
    wait_until(
        &again,
        "the new agent took over",
        Duration::from_secs(20),
        |s| s.interfaces.iter().all(|i| i.xdp == "native"),
    );
    assert!(again.stop().success(), "{}", again.log());
    drop(bird);
    sh(&format!("umount {}", bpffs.display()));
}

/// systemd's notify protocol (what `Type=notify` waits for), read from the socket the unit
/// would give: READY=1 once the data plane is programmed, RELOADING=1 then READY=1 around a
/// SIGHUP, STOPPING=1 on the way out.
#[test]
fn the_agent_tells_systemd_when_it_is_ready_reloading_and_stopping() {
    if !require_root("the_agent_tells_systemd_when_it_is_ready_reloading_and_stopping") {
        return;
    }
    let lab = lab("notify");
    let path = std::env::temp_dir().join(format!("{}-notify.sock", lab.prefix));
    let _ = std::fs::remove_file(&path);
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut agent = Agent::start_with_env(
        &lab,
        xnet_lab::lab::DEMO_CONFIG,
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    let mut buf = [0u8; 512];
    let mut next = || {
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(ready.contains("STATUS=forwarding: 3 interfaces"), "{ready}");
    // By then XDP is attached and the routes are in: the status says so.
    assert!(agent.status().interfaces.iter().all(|i| i.xdp == "native"));
    agent.signal(libc::SIGHUP);
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(next().trim_end(), "READY=1");
    assert!(agent.stop().success());
    assert_eq!(next().trim_end(), "STOPPING=1");
    let _ = std::fs::remove_file(&path);
}
