//! A cluster of two CXP nodes on a real etcd (three members), with BIRD on both sides
//! sending each direction of the test flows through a different node, and three firewall
//! instances that count every flow with nftables (`xnet_lab::cluster`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use xnet_lab::cluster::*;
use xnet_lab::testkit::*;
use xnet_user::status::Status;

const FLOWS: u16 = 90;
const PER_FLOW: usize = 4;

fn lab(name: &str) -> ClusterLab {
    ClusterLab::create(&format!("xc{}{name}", std::process::id() % 10000)).expect("cluster lab")
}

/// Instances in node's pool.
fn pool(s: &Status) -> Vec<String> {
    s.services
        .iter()
        .flat_map(|svc| svc.instances.iter())
        .filter(|i| i.in_pool)
        .map(|i| i.name.clone())
        .collect()
}

fn established(s: &Status) -> usize {
    s.bgp.iter().filter(|b| b.state == "Established").count()
}

/// Pushes the lab's document, starts both nodes and waits until each has its BGP
/// sessions, sees the other and steers over all three instances.
fn up(lab: &ClusterLab) -> (Agent, Agent) {
    let (ok, out) = lab.push(&lab.document_file(DOCUMENT, "cluster.toml"));
    assert!(ok, "push: {out}");
    let a = lab.start_node("a");
    let b = lab.start_node("b");
    for n in [&a, &b] {
        wait_until(
            n,
            "BGP up, both nodes live, three instances in the pool",
            Duration::from_secs(20),
            |s| {
                established(s) == 2
                    && s.cluster.as_ref().is_some_and(|c| c.members.len() == 2)
                    && pool(s).len() == 3
            },
        );
    }
    // Both routers' routes to the far side in place, the first packets' ARP done.
    let t = Instant::now();
    while exchange(lab, 1, 2) != vec![2] {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no path VNet ⇄ on-prem: {}\n{}",
            a.log(),
            b.log()
        );
    }
    (a, b)
}

/// Sends the test flows; asserts every request was answered and every flow crossed one
/// firewall instance both ways; returns each flow's instance (1-based) by VNet port.
fn flows_and_their_instance(lab: &ClusterLab) -> BTreeMap<u16, usize> {
    let counts = || -> Vec<BTreeMap<u16, (u64, u64)>> {
        (1..=FIREWALLS).map(|k| lab.firewall_flows(k)).collect()
    };
    let earlier = counts();
    let got = exchange(lab, FLOWS, PER_FLOW);
    let lost: Vec<usize> = got
        .iter()
        .enumerate()
        .filter(|(_, n)| **n != PER_FLOW)
        .map(|(i, _)| i)
        .collect();
    assert!(
        lost.is_empty(),
        "flows without all their replies: {lost:?} ({got:?})"
    );
    // What each instance forwarded of this exchange.
    let seen: Vec<BTreeMap<u16, (u64, u64)>> = counts()
        .into_iter()
        .zip(earlier)
        .map(|(now, then)| {
            now.into_iter()
                .map(|(p, (q, r))| {
                    let (q0, r0) = then.get(&p).copied().unwrap_or_default();
                    (p, (q - q0, r - r0))
                })
                .filter(|(_, c)| *c != (0, 0))
                .collect()
        })
        .collect();
    let mut at = BTreeMap::new();
    for i in 0..FLOWS {
        let port = FLOW_PORT + i;
        let on: Vec<(usize, (u64, u64))> = seen
            .iter()
            .enumerate()
            .filter_map(|(k, m)| m.get(&port).map(|c| (k + 1, *c)))
            .collect();
        assert!(
            on.len() == 1 && on[0].1 .0 >= PER_FLOW as u64 && on[0].1 .1 >= PER_FLOW as u64,
            "flow {port}: requests and replies (by instance): {on:?}"
        );
        at.insert(port, on[0].0);
    }
    at
}

fn share(at: &BTreeMap<u16, usize>) -> [usize; FIREWALLS] {
    let mut n = [0; FIREWALLS];
    for k in at.values() {
        n[k - 1] += 1;
    }
    n
}

#[test]
fn both_directions_meet_one_instance_across_nodes_and_only_a_dead_instances_flows_move() {
    if !require_root(
        "both_directions_meet_one_instance_across_nodes_and_only_a_dead_instances_flows_move",
    ) {
        return;
    }
    let lab = lab("s");
    let (a, b) = up(&lab);
    let (sa, sb) = (a.status().reason("steered"), b.status().reason("steered"));
    let before = flows_and_their_instance(&lab);
    eprintln!("{FLOWS} flows over fw1..fw3: {:?}", share(&before));
    assert!(
        share(&before).iter().all(|&n| n > 0),
        "every instance carries flows"
    );
    // Requests crossed b (the VNet prefers it), replies a (on-prem prefers it).
    let steered = FLOWS as u64 * PER_FLOW as u64;
    assert!(
        a.status().reason("steered") - sa >= steered,
        "node a steered the replies"
    );
    assert!(
        b.status().reason("steered") - sb >= steered,
        "node b steered the requests"
    );

    // fw2 dies: both nodes' probes fail, the cluster's pool is fw1 and fw3 on both.
    lab.set_firewall(2, false).unwrap();
    for n in [&a, &b] {
        wait_until(n, "fw2 out of the pool", Duration::from_secs(3), |s| {
            pool(s) == ["fw1", "fw3"]
        });
    }
    let after = flows_and_their_instance(&lab);
    let moved: Vec<u16> = before
        .keys()
        .filter(|p| before[p] != after[p])
        .copied()
        .collect();
    let needless = moved.iter().filter(|p| before[p] != 2).count();
    let on_fw2 = share(&before)[1];
    eprintln!(
        "one of 3 instances failed: {} of {FLOWS} flows moved ({:.3}; fw2 had {on_fw2}), {needless} that were not on fw2",
        moved.len(),
        moved.len() as f64 / FLOWS as f64
    );
    assert!(after.values().all(|&k| k != 2));
    // Maglev's table moves a few slots beyond the dead instance's (under 3% of flows).
    assert!(
        needless * 100 <= FLOWS as usize * 5,
        "flows moved needlessly: {needless}"
    );

    // It comes back; then node b alone loses fw1: one of two live nodes is no majority,
    // so fw1 leaves the pool of both nodes (a still sees it up) and the flows stay
    // symmetric.
    lab.set_firewall(2, true).unwrap();
    for n in [&a, &b] {
        wait_until(n, "fw2 back in the pool", Duration::from_secs(3), |s| {
            pool(s).len() == 3
        });
    }
    assert_eq!(
        flows_and_their_instance(&lab),
        before,
        "the flows went back where they were"
    );
    sh(&format!("ip -n {} link set dev fw1 down", lab.ns("b")));
    for n in [&a, &b] {
        wait_until(
            n,
            "fw1 out of both nodes' pools",
            Duration::from_secs(3),
            |s| pool(s) == ["fw2", "fw3"],
        );
    }
    let fw1_health = |s: &Status| s.services[0].instances[0].health.clone();
    assert_eq!(
        fw1_health(&a.status()),
        "up",
        "node a's own probes still answer"
    );
    assert_eq!(fw1_health(&b.status()), "down");
    let split = flows_and_their_instance(&lab);
    assert!(split.values().all(|&k| k != 1));
    sh(&format!("ip -n {} link set dev fw1 up", lab.ns("b")));
    for n in [&a, &b] {
        wait_until(n, "fw1 back", Duration::from_secs(3), |s| {
            pool(s).len() == 3
        });
    }

    // `xnet cluster status` shows both nodes, what they applied and see.
    let (ok, out) = lab.xnet(&[
        "cluster",
        "status",
        "--etcd",
        &lab.endpoints(),
        "--cluster",
        CLUSTER,
    ]);
    assert!(ok, "{out}");
    eprintln!("{out}");
    assert!(out.contains("2 live nodes"), "{out}");
    for node in NODES {
        assert!(out.lines().any(|l| l.starts_with(node)), "{out}");
    }

    // Multipath: both routers hash each flow onto either node (ECMP), so requests and
    // replies cross the nodes in every combination; each flow still meets one instance.
    lab.set_multipath(true).unwrap();
    let t = Instant::now();
    for (host, net) in [("onprem", "10.1.0.0/16"), ("vnet", "192.168.0.0/16")] {
        while sh(&format!("ip -n {} route show {net}", lab.ns(host)))
            .matches("nexthop")
            .count()
            < 2
        {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{host}: no ECMP route to {net}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Packets each node received from each side during the flows.
    let rx = |s: &Status| ["onprem", "vnet"].map(|n| s.interface(n).map_or(0, |i| i.rx));
    let before_rx = [rx(&a.status()), rx(&b.status())];
    assert_eq!(flows_and_their_instance(&lab), before);
    let after_rx = [rx(&a.status()), rx(&b.status())];
    let per_direction = FLOWS as u64 * PER_FLOW as u64;
    for (n, node) in NODES.iter().enumerate() {
        let [from_onprem, from_vnet] = [0, 1].map(|d| after_rx[n][d] - before_rx[n][d]);
        eprintln!("multipath: node {node} received {from_vnet} requests and {from_onprem} replies of {per_direction} each");
        assert!(
            from_onprem > per_direction / 4 && from_vnet > per_direction / 4,
            "node {node} carries a share of both directions"
        );
    }
}

fn applied(s: &Status) -> i64 {
    s.cluster.as_ref().map_or(0, |c| c.applied_revision)
}

/// The revision `xnet config push` reports.
fn pushed_revision(out: &str) -> i64 {
    out.split("as revision ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no revision in: {out}"))
}

#[test]
fn a_pushed_config_runs_on_both_nodes_within_a_second_and_a_bad_one_on_none() {
    if !require_root("a_pushed_config_runs_on_both_nodes_within_a_second_and_a_bad_one_on_none") {
        return;
    }
    let lab = lab("p");
    let (a, b) = up(&lab);
    let first = applied(&a.status());
    assert_eq!(applied(&b.status()), first);

    let doc = lab.document_file(&document_with_deny(), "deny.toml");
    let t = Instant::now();
    let (ok, out) = lab.push(&doc);
    assert!(ok, "{out}");
    let rev = pushed_revision(&out);
    for n in [&a, &b] {
        wait_until(
            n,
            "the new revision in force",
            Duration::from_secs(1),
            |s| applied(s) == rev,
        );
    }
    eprintln!(
        "config revision {rev} in force on both nodes {} ms after `xnet config push` started",
        t.elapsed().as_millis()
    );
    for n in [&a, &b] {
        assert!(n.status().policies.iter().any(|p| p.name == "deny-9999"));
    }
    // The same document again: nothing written.
    let (ok, out) = lab.push(&doc);
    assert!(ok && out.contains("nothing written"), "{out}");
    // A stale revision: refused by the compare-and-swap, nothing written.
    let endpoints = lab.endpoints();
    let (ok, out) = lab.xnet(&[
        "config",
        "push",
        lab.document_file(DOCUMENT, "c.toml").to_str().unwrap(),
        "--etcd",
        &endpoints,
        "--cluster",
        CLUSTER,
        "--local",
        lab.dir.join("node-a/xnet.toml").to_str().unwrap(),
        "--revision",
        &first.to_string(),
    ]);
    assert!(
        !ok && out.contains(&format!("at revision {rev}, not {first}")),
        "{out}"
    );
    // Without a node's file the document is incomplete (no neighbour or instance has its
    // address): push says what is missing where.
    let (ok, out) = lab.xnet(&[
        "config",
        "push",
        doc.to_str().unwrap(),
        "--etcd",
        &endpoints,
        "--cluster",
        CLUSTER,
    ]);
    assert!(
        !ok && out.contains("deny.toml: line 71: missing field `address`"),
        "{out}"
    );
    // A node's own file checks alone (what the unit's ExecStartPre runs).
    let (ok, out) = lab.xnet(&[
        "check",
        "--config",
        lab.dir.join("node-a/xnet.toml").to_str().unwrap(),
    ]);
    assert!(ok && out.contains("node a of cluster lab"), "{out}");
    // An invalid document is refused by push itself.
    let bad = lab.document_file(
        &DOCUMENT.replace("table = 100", "table = \"x\""),
        "bad.toml",
    );
    let (ok, out) = lab.push(&bad);
    assert!(!ok && out.contains("segments[0].table"), "{out}");

    // One written past push's check: every node refuses it whole and keeps the last.
    lab.put_unchecked(&DOCUMENT.replace("protocol = \"udp\"", "protocol = \"udpx\""))
        .unwrap();
    for n in [&a, &b] {
        wait_until(n, "the bad revision refused", Duration::from_secs(2), |s| {
            s.cluster.as_ref().is_some_and(|c| c.refused.is_some())
        });
        let s = n.status();
        assert_eq!(applied(&s), rev, "the last good revision stays in force");
        let why = &s.cluster.unwrap().refused.unwrap().reason;
        assert!(why.contains("protocol"), "{why}");
    }
    assert_eq!(exchange(&lab, 10, 2), vec![2; 10], "forwarding goes on");
    let (_, out) = lab.xnet(&[
        "cluster",
        "status",
        "--etcd",
        &endpoints,
        "--cluster",
        CLUSTER,
    ]);
    assert!(out.contains("(behind)") && out.contains("udpx"), "{out}");

    // SIGHUP on a node re-reads its own file over the revision in force.
    let file = lab.dir.join("node-b/xnet.toml");
    let mut text = std::fs::read_to_string(&file).unwrap();
    text += "\n[[routes]]\nsegment = \"prod\"\nprefix = \"10.77.0.0/16\"\nnext_hops = [{ interface = \"vnet\", via = \"172.18.2.2\" }]\n";
    std::fs::write(&file, text).unwrap();
    b.signal(libc::SIGHUP);
    wait_until(&b, "node b's own route", Duration::from_secs(2), |s| {
        s.routes.iter().any(|r| r.prefix == "10.77.0.0/16")
    });
    assert_eq!(applied(&b.status()), rev, "still the revision in force");
    assert!(!a.status().routes.iter().any(|r| r.prefix == "10.77.0.0/16"));
}

fn connected(s: &Status) -> bool {
    s.cluster.as_ref().is_some_and(|c| c.etcd_connected)
}

fn members(s: &Status) -> Vec<String> {
    s.cluster
        .as_ref()
        .map(|c| c.members.clone())
        .unwrap_or_default()
}

#[test]
fn etcd_failures_and_a_dead_node_do_not_stop_forwarding() {
    if !require_root("etcd_failures_and_a_dead_node_do_not_stop_forwarding") {
        return;
    }
    let lab = lab("f");
    let (mut a, mut b) = up(&lab);
    let before = flows_and_their_instance(&lab);

    // The etcd leader dies while a flow runs: no request goes unanswered.
    let leader = lab.etcd_leader().expect("a leader");
    let (sent, got) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            stream(
                &lab,
                FLOW_PORT + MAX_FLOWS - 1,
                Duration::from_millis(2),
                Duration::from_secs(3),
            )
        });
        std::thread::sleep(Duration::from_millis(800));
        lab.kill_etcd(leader);
        h.join().unwrap()
    });
    eprintln!(
        "the etcd leader (member {}) killed during a flow: {got} of {sent} requests answered",
        leader + 1
    );
    assert_eq!(got, sent);
    // The nodes carry on with the two members left; the cluster still takes a config.
    for n in [&a, &b] {
        wait_until(n, "etcd reached", Duration::from_secs(5), connected);
    }
    let (ok, out) = lab.push(&lab.document_file(&document_with_deny(), "deny.toml"));
    assert!(ok, "{out}");
    let rev = pushed_revision(&out);
    for n in [&a, &b] {
        wait_until(
            n,
            "the new revision in force",
            Duration::from_secs(2),
            |s| applied(s) == rev,
        );
    }
    assert_eq!(flows_and_their_instance(&lab), before);

    // Node b loses etcd: it says so, forwards on with what it has; its key expires.
    sh(&format!("ip -n {} link set dev b down", lab.ns("sw")));
    wait_until(
        &b,
        "node b knows it lost etcd",
        Duration::from_secs(3),
        |s| !connected(s),
    );
    let m = http_get(&lab.ns("b"), METRICS, "/metrics").unwrap();
    assert!(m.contains("xnet_cluster_etcd_connected 0.0"), "{m}");
    let text = stdout_of(
        std::process::Command::new("ip")
            .args(["netns", "exec", &lab.ns("b")])
            .arg(XNET)
            .arg("status")
            .arg("--socket")
            .arg(&b.socket),
    );
    assert!(text.contains("etcd NOT reached"), "{text}");
    wait_until(&a, "node b's key expired", Duration::from_secs(6), |s| {
        members(s) == ["a"]
    });
    assert_eq!(
        flows_and_their_instance(&lab),
        before,
        "forwarding as before"
    );
    // A revision b cannot see: a applies it; b keeps its own until it is back.
    let (ok, out) = lab.push(&lab.document_file(DOCUMENT, "cluster.toml"));
    assert!(ok, "{out}");
    let rev2 = pushed_revision(&out);
    wait_until(&a, "node a applies it", Duration::from_secs(2), |s| {
        applied(s) == rev2
    });
    assert_eq!(applied(&b.status()), rev);
    sh(&format!("ip -n {} link set dev b up", lab.ns("sw")));
    let t = Instant::now();
    wait_until(
        &b,
        "node b back, with the revision it missed",
        Duration::from_secs(6),
        |s| connected(s) && applied(s) == rev2,
    );
    eprintln!(
        "node b rejoined and applied revision {rev2} {} ms after its link came back",
        t.elapsed().as_millis()
    );

    // Node b restarts while etcd is away: it starts with the revision it last applied
    // (its cache), forwards, and says it has no etcd.
    b.stop();
    drop(b);
    sh(&format!("ip -n {} link set dev b down", lab.ns("sw")));
    b = lab.start_node("b");
    wait_until(
        &b,
        "node b up from its cache",
        Duration::from_secs(10),
        |s| applied(s) == rev2 && !connected(s) && established(s) == 2,
    );
    assert_eq!(
        flows_and_their_instance(&lab),
        before,
        "node b forwards from its cache"
    );
    sh(&format!("ip -n {} link set dev b up", lab.ns("sw")));
    wait_until(&b, "node b reaches etcd", Duration::from_secs(6), connected);

    // Node a dies (its agent and its links): on-prem's BIRD sees its session close and
    // sends everything to b, which steers each flow to the same instance as before.
    let steered = b.status().reason("steered");
    let mut child = a.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    lab.node_links_down("a").unwrap();
    let t = Instant::now();
    while exchange(&lab, 1, 1) != vec![1] {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no path through node b: on-prem's BIRD:\n{}\nVNet's BIRD:\n{}\nnode b: {}",
            lab.birdc("onprem", "show route"),
            lab.birdc("vnet", "show route"),
            b.log()
        );
    }
    eprintln!(
        "node a killed: traffic through node b after {} ms",
        t.elapsed().as_millis()
    );
    assert_eq!(
        flows_and_their_instance(&lab),
        before,
        "the same instance for every flow"
    );
    let both_ways = 2 * FLOWS as u64 * PER_FLOW as u64;
    assert!(
        b.status().reason("steered") - steered >= both_ways,
        "node b carries both directions"
    );
    wait_until(&b, "node a's key expired", Duration::from_secs(6), |s| {
        members(s) == ["b"]
    });
}
