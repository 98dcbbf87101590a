//! SIGHUP reloads every section: a running agent (BGP with BIRD, two firewalls, a steer
//! policy) takes a config that adds a segment and an interface, changes a segment,
//! inserts a policy, adds a route and flow export; what did not change keeps running (the
//! BGP session's uptime, the firewalls' health and counters). A config that fails partway
//! is rolled back; one that does not validate changes nothing; `xnet check --diff` shows
//! the difference first.

use std::time::{Duration, Instant};

use xnet_lab::demo::BGP;
use xnet_lab::testkit::*;
use xnet_user::status::Status;

/// A third segment and its interface (a veth the test adds to the CXP).
const LAB_SEGMENT: &str = r#"
[[segments]]
name = "lab"
table = 102

[[interfaces]]
name = "lab0"
segment = "lab"

[[routes]]
segment = "lab"
prefix = "10.9.0.0/16"
next_hops = [{ via = "10.0.9.2", interface = "lab0" }]
"#;

const FLOWS: &str = r#"
[flows]
collectors = ["127.0.0.1:4739"]
"#;

fn reload_to(agent: &Agent, config: &str) {
    std::fs::write(
        &agent.config,
        config.replace("/run/xnet/demo.sock", agent.socket.to_str().unwrap()),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
}

fn wait_log(agent: &Agent, what: &str, since: usize) -> String {
    let t = Instant::now();
    loop {
        let log = agent.log();
        if log[since.min(log.len())..].contains(what) {
            return log[since..].to_string();
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no {what:?} in the log:\n{}",
            &log[since.min(log.len())..]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn bgp_uptime(s: &Status) -> u64 {
    s.bgp[0].uptime_secs
}

fn xnet_check_diff(agent: &Agent, config: &str) -> String {
    let path = agent.config.with_extension("next.toml");
    std::fs::write(
        &path,
        config.replace("/run/xnet/demo.sock", agent.socket.to_str().unwrap()),
    )
    .unwrap();
    stdout_of(
        std::process::Command::new(XNET)
            .args(["check", "--diff", "--config"])
            .arg(&path)
            .arg("--socket")
            .arg(&agent.socket),
    )
}

#[test]
fn sighup_applies_every_section_and_leaves_the_rest_running() {
    if !require_root("sighup_applies_every_section_and_leaves_the_rest_running") {
        return;
    }
    let lab = lab_with_firewalls("reload", 2);
    let cxp = lab.ns("cxp");
    sh(&format!(
        "ip -n {cxp} link add lab0 type veth peer name lab0p && ip -n {cxp} link set lab0 up && ip -n {cxp} link set lab0p up && ip -n {cxp} addr add 10.0.9.1/24 dev lab0"
    ));
    let bird = Bird::with_config(&lab, xnet_lab::demo::BIRD_CONF, "172.16.0.1");
    let before = format!(
        "{}\n{FIREWALL_SERVICE}\n{STEER_VNET_TO_ONPREM_UDP}\n{BGP}",
        xnet_lab::lab::DEMO_CONFIG
    );
    let agent = Agent::start(&lab, &before);
    wait_until(
        &agent,
        "BGP up, both firewalls healthy",
        Duration::from_secs(20),
        |s| established(s) == 1 && healthy_instances(s) == 2 && in_data_plane(s, "172.16.0.0/16"),
    );
    assert_eq!(vnet1_to_onprem(&lab, 50), 50);
    let s0 = agent.status();
    let steered0 = s0.policies[0].packets;
    let fw0: u64 = s0.services[0].instances.iter().map(|i| i.packets).sum();
    assert!(steered0 >= 50 && fw0 >= 50, "{:?}", s0.policies);
    // Long enough for the session's uptime to tell a reset from none.
    std::thread::sleep(Duration::from_secs(2));

    // The new config: segment dev denies by default now; a segment, an interface and a
    // route added; a deny rule inserted before the steer rule; flow export on.
    let after = format!(
        "{}\n{LAB_SEGMENT}\n{FIREWALL_SERVICE}\n{DENY_UDP_9999_TO_ONPREM}\n{STEER_VNET_TO_ONPREM_UDP}\n{BGP}\n{FLOWS}",
        xnet_lab::lab::DEMO_CONFIG.replacen(
            "name = \"dev\"\ntable = 101\n",
            "name = \"dev\"\ntable = 101\ndefault_action = \"deny\"\n",
            1
        )
    );
    let diff = xnet_check_diff(&agent, &after);
    assert_eq!(
        diff,
        "~ segments dev: default_action\n\
         + segments lab\n\
         + interfaces lab0\n\
         + routes lab 10.9.0.0/16\n\
         + policies deny-9999\n\
         + flows\n",
        "{diff}"
    );
    let mark = agent.log().len();
    reload_to(&agent, &after);
    let log = wait_log(&agent, "reloaded", mark);
    assert!(!log.contains("rolled back"), "{log}");
    let s = agent.status();
    // What changed is in force.
    let lab0 = s.interface("lab0").expect("lab0 in the data plane");
    assert_eq!(
        (lab0.segment.as_str(), lab0.xdp.as_str()),
        ("lab", "native")
    );
    assert!(s
        .routes
        .iter()
        .any(|r| r.prefix == "10.9.0.0/16" && r.segment == "lab"));
    let t102 = sh(&format!("ip -n {cxp} route show table 102"));
    assert!(
        t102.contains("10.9.0.0/16 via 10.0.9.2"),
        "the kernel mirror: {t102}"
    );
    let rules = sh(&format!("ip -n {cxp} rule show"));
    assert!(rules.contains("iif lab0 lookup 102"), "{rules}");
    assert_eq!(
        s.policies
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["deny-9999", "vnet-to-onprem-udp"]
    );
    assert_eq!(s.policies[0].packets, 0, "a new rule starts from zero");
    assert!(
        s.policies[1].packets >= steered0,
        "the steer rule's hits moved with it: {steered0} → {}",
        s.policies[1].packets
    );
    assert_eq!(
        udp(
            &lab,
            "vnet1",
            "10.1.0.1:5001",
            "onprem",
            "192.168.10.1:9999",
            20
        ),
        0
    );
    assert!(
        agent.status().policies[0].packets >= 20,
        "the inserted rule denies"
    );
    assert!(s.flows.is_some(), "flow export started");
    // What did not change kept running: the BGP session (no reset: its uptime went on),
    // the firewalls (healthy at once, their steered counters carried), the steer rule's
    // hits (moved with the rule to its new place).
    assert!(bgp_uptime(&s) >= 2, "BGP session kept: {:?}", s.bgp);
    assert_eq!(s.bgp[0].flaps, 0);
    assert_eq!(healthy_instances(&s), 2, "firewall health kept");
    assert!(
        !log.contains("is healthy: in the pool"),
        "no instance re-entered the pool: {log}"
    );
    let fw1: u64 = s.services[0].instances.iter().map(|i| i.packets).sum();
    assert!(fw1 >= fw0, "steered counters survive: {fw0} → {fw1}");
    assert_eq!(vnet1_to_onprem(&lab, 50), 50, "steering still works");
    assert!(agent.status().policies[1].packets >= 50);
    let ip = sh(&format!("ip -n {cxp} -d link show lab0"));
    assert!(ip.contains("prog/xdp"), "{ip}");

    // BGP globals: a new router id restarts the speaker, and the session comes back.
    let new_id = after.replace("router_id = \"10.0.3.1\"", "router_id = \"10.0.3.9\"");
    let mark = agent.log().len();
    reload_to(&agent, &new_id);
    wait_log(&agent, "reloaded", mark);
    wait_until(
        &agent,
        "BGP back with the new router id",
        Duration::from_secs(20),
        |s| established(s) == 1 && in_data_plane(s, "172.16.0.0/16"),
    );
    let seen = bird.cmd("show protocols all cxp");
    assert!(
        seen.contains("10.0.3.9"),
        "BIRD sees the new router id: {seen}"
    );

    // Partway failure: a segment and a route come, then an interface whose driver has no
    // native XDP (a bridge) fails to attach: everything goes back.
    sh(&format!(
        "ip -n {cxp} link add dummy9 type bridge && ip -n {cxp} link set dummy9 up"
    ));
    let failing = format!(
        "{new_id}\n[[segments]]\nname = \"extra\"\ntable = 103\n[[interfaces]]\nname = \"dummy9\"\nsegment = \"extra\"\n[[routes]]\nsegment = \"prod\"\nprefix = \"10.77.0.0/16\"\nnext_hops = [{{ via = \"10.0.1.2\", interface = \"vnet1\" }}]\n"
    );
    let mark = agent.log().len();
    reload_to(&agent, &failing);
    let log = wait_log(&agent, "reload rolled back", mark);
    eprintln!("the failed reload:\n{log}");
    assert!(log.contains("dummy9"), "the log names what failed: {log}");
    let s = agent.status();
    assert!(s.interface("dummy9").is_none(), "dummy9 not ours");
    assert!(
        !s.routes.iter().any(|r| r.prefix == "10.77.0.0/16"),
        "the new route is not in"
    );
    assert!(s.interface("lab0").is_some() && established(&s) == 1);
    assert_eq!(vnet1_to_onprem(&lab, 20), 20, "forwarding as before");
    let rules = sh(&format!("ip -n {cxp} rule show"));
    assert!(!rules.contains("dummy9"), "{rules}");

    // Removing the interface and its segment: XDP leaves it.
    let mark = agent.log().len();
    reload_to(&agent, &new_id.replace(LAB_SEGMENT, ""));
    wait_log(&agent, "reloaded", mark);
    let s = agent.status();
    assert!(s.interface("lab0").is_none());
    let ip = sh(&format!("ip -n {cxp} -d link show lab0"));
    assert!(!ip.contains("prog/xdp"), "XDP detached from lab0: {ip}");
    assert!(!sh(&format!("ip -n {cxp} rule show")).contains("lab0"));

    // A config that does not validate changes nothing.
    let mark = agent.log().len();
    reload_to(&agent, &new_id.replace("table = 101", "table = \"x\""));
    let log = wait_log(&agent, "reload rejected, nothing changed", mark);
    assert!(log.contains("table"), "{log}");
    assert_eq!(agent.status().interfaces.len(), s.interfaces.len());
}
