//! The cluster lab (`cargo xtask lab cluster`, `tests/cluster.rs`): three etcd members,
//! two CXP nodes, an on-prem router and a VNet router (BIRD) that peer with both nodes,
//! and three firewall instances joined to both nodes.
//!
//! ```text
//!   onprem (AS 65010, 192.168.10.1) ──┬── a ──┬── vnet (AS 65020, 10.1.0.1)
//!                                     └── b ──┘
//!   fw1, fw2, fw3: a link to each node      etcd1..3, a, b: management bridge 10.99.0.0/24
//! ```
//!
//! On-prem prefers node a and the VNet prefers node b (BGP local preference), so a request
//! from the VNet crosses b and its reply crosses a: the case that needs steering to agree
//! across nodes. Node x's end of a link is 172.(16+x).L.1/30 and the other end .2, with L
//! 1 (on-prem), 2 (VNet), 10+k (firewall k).

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lab::{ip, netns_exec};
use crate::testkit::{in_netns, Agent};

pub const NODES: [&str; 2] = ["a", "b"];
pub const FIREWALLS: usize = 3;
pub const ETCD_MEMBERS: usize = 3;
pub const CLUSTER: &str = "lab";
pub const ONPREM_HOST: &str = "192.168.10.1";
pub const VNET_HOST: &str = "10.1.0.1";
/// Test flows: from VNet ports `FLOW_PORT + i` to on-prem's echo port, and back.
pub const FLOW_PORT: u16 = 20000;
pub const MAX_FLOWS: u16 = 120;
pub const ECHO_PORT: u16 = 7;
/// Where each node serves its metrics, in its namespace.
pub const METRICS: &str = "127.0.0.1:9469";

/// The cluster's document: everything but the nodes' addresses.
pub const DOCUMENT: &str = r#"# The cluster lab's config, shared by every node (pushed with `xnet config push`).
[[segments]]
name = "prod"
table = 100

[[interfaces]]
name = "onprem"
segment = "prod"

[[interfaces]]
name = "vnet"
segment = "prod"

[[interfaces]]
name = "fw1"
segment = "prod"
role = "firewall"

[[interfaces]]
name = "fw2"
segment = "prod"
role = "firewall"

[[interfaces]]
name = "fw3"
segment = "prod"
role = "firewall"

# Each node gives its own `via` of every instance.
[[services]]
name = "fw"
failure_mode = "closed"
health = { kind = "icmp", interval_ms = 200, threshold = 2 }
instances = [
  { name = "fw1", interface = "fw1" },
  { name = "fw2", interface = "fw2" },
  { name = "fw3", interface = "fw3" },
]

[[policies]]
name = "vnet-to-onprem-udp"
segment = "prod"
source = "10.1.0.0/16"
destination = "192.168.0.0/16"
protocol = "udp"
action = "steer"
service = "fw"

[[policies]]
name = "onprem-to-vnet-udp"
segment = "prod"
source = "192.168.0.0/16"
destination = "10.1.0.0/16"
protocol = "udp"
action = "steer"
service = "fw"

# Each node gives its router id and its neighbours' addresses. No graceful restart: a
# node that dies must be routed around at once, not waited for.
[bgp]
asn = 65000
graceful_restart = false

[[bgp.neighbors]]
name = "onprem"
segment = "prod"
remote_asn = 65010
hold_time = 3
advertise = "custom"
prefixes = ["10.1.0.0/16"]

[[bgp.neighbors]]
name = "vnet"
segment = "prod"
remote_asn = 65020
hold_time = 3
advertise = "custom"
prefixes = ["192.168.0.0/16"]
"#;

/// `DOCUMENT` with a deny of UDP to port 9999 before the steering rules: a second
/// revision to push.
pub fn document_with_deny() -> String {
    DOCUMENT.replacen(
        "[[policies]]",
        "[[policies]]\nname = \"deny-9999\"\nsegment = \"prod\"\nprotocol = \"udp\"\ndestination_ports = \"9999\"\naction = \"deny\"\n\n[[policies]]",
        1,
    )
}

/// Node `node`'s index: 1 for a, 2 for b.
pub fn node_index(node: &str) -> u8 {
    NODES.iter().position(|n| *n == node).expect("a lab node") as u8 + 1
}

/// Node `x`'s address on link `l` (1 on-prem, 2 VNet, 10+k firewall k), and the peer's.
pub fn link_addresses(x: u8, l: u8) -> (String, String) {
    (
        format!("172.{}.{l}.1", 16 + x),
        format!("172.{}.{l}.2", 16 + x),
    )
}

fn etcd_ip(i: usize) -> String {
    format!("10.99.0.{}", 11 + i)
}

fn node_ip(node: &str) -> String {
    format!("10.99.0.{}", 20 + node_index(node))
}

pub struct ClusterLab {
    pub prefix: String,
    pub dir: PathBuf,
    /// The members' processes (a test kills one while traffic runs).
    etcd: std::sync::Mutex<Vec<Option<Child>>>,
    birds: Vec<Child>,
}

impl ClusterLab {
    /// Builds the namespaces and links, starts the etcd members and BIRD on both sides.
    pub fn create(prefix: &str) -> Result<ClusterLab> {
        let mut lab = ClusterLab {
            prefix: prefix.to_string(),
            dir: std::env::temp_dir().join(format!("{prefix}-cluster")),
            etcd: Default::default(),
            birds: Vec::new(),
        };
        lab.destroy();
        let _ = std::fs::remove_dir_all(&lab.dir);
        std::fs::create_dir_all(&lab.dir)?;
        for h in lab.hosts() {
            ip(&format!("netns add {}", lab.ns(&h)))?;
            ip(&format!("-n {} link set lo up", lab.ns(&h)))?;
        }
        // Management: etcd members and nodes on one bridge.
        let sw = lab.ns("sw");
        ip(&format!("-n {sw} link add br0 type bridge"))?;
        ip(&format!("-n {sw} link set br0 up"))?;
        let members = (0..ETCD_MEMBERS)
            .map(|i| (format!("etcd{}", i + 1), etcd_ip(i)))
            .chain(NODES.iter().map(|n| (n.to_string(), node_ip(n))));
        for (host, addr) in members {
            let ns = lab.ns(&host);
            ip(&format!(
                "link add m0 netns {ns} type veth peer name {host} netns {sw}"
            ))?;
            ip(&format!("-n {sw} link set dev {host} master br0 up"))?;
            ip(&format!("-n {ns} addr add {addr}/24 dev m0"))?;
            ip(&format!("-n {ns} link set m0 up"))?;
        }
        let sysctl = |ns: &str, kv: &str| netns_exec(ns, &format!("sysctl -qw {kv}"));
        for node in NODES {
            // Only XDP forwards in a node.
            sysctl(&lab.ns(node), "net.ipv4.ip_forward=0")?;
        }
        for (host, a) in [("onprem", ONPREM_HOST), ("vnet", VNET_HOST)] {
            ip(&format!("-n {} addr add {a}/32 dev lo", lab.ns(host)))?;
        }
        for k in 1..=FIREWALLS {
            let fns = lab.ns(&format!("fw{k}"));
            for kv in [
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                // A dead node's link: its routes are not used.
                "net.ipv4.conf.all.ignore_routes_with_linkdown=1",
                "net.ipv4.conf.all.send_redirects=0",
            ] {
                sysctl(&fns, kv)?;
            }
        }
        // Data: every node to on-prem, the VNet and each firewall.
        for node in NODES {
            let x = node_index(node);
            let nns = lab.ns(node);
            let peers = [("onprem".to_string(), 1u8), ("vnet".to_string(), 2)]
                .into_iter()
                .chain((1..=FIREWALLS).map(|k| (format!("fw{k}"), 10 + k as u8)));
            for (peer, l) in peers {
                let pns = lab.ns(&peer);
                let (mine, theirs) = link_addresses(x, l);
                ip(&format!(
                    "link add {peer} netns {nns} type veth peer name e{x} netns {pns}"
                ))?;
                ip(&format!("-n {nns} addr add {mine}/30 dev {peer}"))?;
                ip(&format!("-n {pns} addr add {theirs}/30 dev e{x}"))?;
                ip(&format!("-n {nns} link set dev {peer} up"))?;
                ip(&format!("-n {pns} link set e{x} up"))?;
                // XDP_REDIRECT into a veth needs NAPI on the receiving end (GRO); the
                // peers compute checksums in software, as real NICs would.
                netns_exec(&pns, &format!("ethtool -K e{x} gro on tx off"))?;
            }
        }
        for k in 1..=FIREWALLS {
            lab.firewall_route(k)?;
            lab.count_flows(k)?;
        }
        lab.start_etcd()?;
        for host in ["onprem", "vnet"] {
            // ECMP (`set_multipath`) hashes each flow's 5-tuple onto one node.
            sysctl(&lab.ns(host), "net.ipv4.fib_multipath_hash_policy=1")?;
            let bird = lab.start_bird(host)?;
            lab.birds.push(bird);
        }
        Ok(lab)
    }

    fn hosts(&self) -> Vec<String> {
        let mut h: Vec<String> = ["sw", "onprem", "vnet"].map(String::from).to_vec();
        h.extend(NODES.iter().map(|n| n.to_string()));
        h.extend((1..=ETCD_MEMBERS).map(|i| format!("etcd{i}")));
        h.extend((1..=FIREWALLS).map(|k| format!("fw{k}")));
        h
    }

    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// The etcd client URLs, comma-separated.
    pub fn endpoints(&self) -> String {
        (0..ETCD_MEMBERS)
            .map(|i| format!("http://{}:2379", etcd_ip(i)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Firewall `k` returns what it forwards to either node.
    fn firewall_route(&self, k: usize) -> Result<()> {
        let (a, _) = link_addresses(1, 10 + k as u8);
        let (b, _) = link_addresses(2, 10 + k as u8);
        ip(&format!(
            "-n {} route replace default nexthop via {a} dev e1 nexthop via {b} dev e2",
            self.ns(&format!("fw{k}"))
        ))
    }

    /// Firewall `k` dies (both its links down) or comes back (with its route, which went
    /// with the links).
    pub fn set_firewall(&self, k: usize, up: bool) -> Result<()> {
        let ns = self.ns(&format!("fw{k}"));
        let state = if up { "up" } else { "down" };
        for e in ["e1", "e2"] {
            ip(&format!("-n {ns} link set dev {e} {state}"))?;
        }
        if up {
            self.firewall_route(k)?;
        }
        Ok(())
    }

    /// Node `node`'s host goes away with its agent: every link of it down (so its peers'
    /// routes through it go too).
    pub fn node_links_down(&self, node: &str) -> Result<()> {
        let ns = self.ns(node);
        let links = ["onprem", "vnet", "m0"]
            .map(String::from)
            .into_iter()
            .chain((1..=FIREWALLS).map(|k| format!("fw{k}")));
        for l in links {
            ip(&format!("-n {ns} link set dev {l} down"))?;
        }
        Ok(())
    }

    /// Firewall `k` counts each test flow's requests and replies (nftables).
    fn count_flows(&self, k: usize) -> Result<()> {
        let mut script =
            "add table inet fw\nadd chain inet fw forward { type filter hook forward priority 0 ; policy accept ; }\n"
                .to_string();
        for i in 0..MAX_FLOWS {
            let p = FLOW_PORT + i;
            script += &format!("add rule inet fw forward udp sport {p} udp dport {ECHO_PORT} counter\nadd rule inet fw forward udp sport {ECHO_PORT} udp dport {p} counter\n");
        }
        let path = self.dir.join(format!("fw{k}.nft"));
        std::fs::write(&path, script)?;
        netns_exec(
            &self.ns(&format!("fw{k}")),
            &format!("nft -f {}", path.display()),
        )?;
        Ok(())
    }

    /// Per test flow (by its VNet port): requests and replies firewall `k` forwarded.
    pub fn firewall_flows(&self, k: usize) -> BTreeMap<u16, (u64, u64)> {
        let out = netns_exec(
            &self.ns(&format!("fw{k}")),
            "nft list chain inet fw forward",
        )
        .expect("nft list");
        let mut m: BTreeMap<u16, (u64, u64)> = BTreeMap::new();
        for l in out.lines() {
            let w: Vec<&str> = l.split_whitespace().collect();
            // udp sport S udp dport D counter packets N bytes B
            if w.len() < 9 || w[0] != "udp" || w[7] != "packets" {
                continue;
            }
            let (Ok(s), Ok(d), Ok(n)) = (
                w[2].parse::<u16>(),
                w[5].parse::<u16>(),
                w[8].parse::<u64>(),
            ) else {
                continue;
            };
            if d == ECHO_PORT {
                m.entry(s).or_default().0 += n;
            } else {
                m.entry(d).or_default().1 += n;
            }
        }
        m.retain(|_, c| *c != (0, 0));
        m
    }

    fn start_etcd(&mut self) -> Result<()> {
        let cluster = (0..ETCD_MEMBERS)
            .map(|i| format!("e{}=http://{}:2380", i + 1, etcd_ip(i)))
            .collect::<Vec<_>>()
            .join(",");
        for i in 0..ETCD_MEMBERS {
            let data = self.dir.join(format!("etcd{}", i + 1));
            let log = std::fs::File::create(self.dir.join(format!("etcd{}.log", i + 1)))?;
            let a = etcd_ip(i);
            let child = Command::new("ip")
                .args(["netns", "exec", &self.ns(&format!("etcd{}", i + 1)), "etcd"])
                .args(["--name", &format!("e{}", i + 1)])
                .arg("--data-dir")
                .arg(&data)
                .args(["--listen-client-urls", &format!("http://{a}:2379")])
                .args(["--advertise-client-urls", &format!("http://{a}:2379")])
                .args(["--listen-peer-urls", &format!("http://{a}:2380")])
                .args(["--initial-advertise-peer-urls", &format!("http://{a}:2380")])
                .args(["--initial-cluster", &cluster])
                .args(["--initial-cluster-token", &self.prefix])
                .args(["--initial-cluster-state", "new"])
                .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("etcd (Debian etcd-server) is installed by cargo xtask setup")?;
            self.etcd.lock().unwrap().push(Some(child));
        }
        let t = Instant::now();
        while self.etcd_leader().is_none() {
            if t.elapsed() > Duration::from_secs(20) {
                bail!(
                    "etcd has no leader after 20 s; its log: {}",
                    std::fs::read_to_string(self.dir.join("etcd1.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// `etcdctl` in node a's namespace (it reaches the management network).
    fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns("a"), "etcdctl"])
            .args(["--endpoints", &self.endpoints(), "--command-timeout=2s"])
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .context("etcdctl (Debian etcd-client)")?;
        if !out.status.success() && out.stdout.is_empty() {
            bail!("etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The member (0-based) that leads the etcd cluster now.
    pub fn etcd_leader(&self) -> Option<usize> {
        let out = self
            .etcdctl(&["endpoint", "status", "--cluster=false", "-w", "json"])
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v.as_array()?.iter().find_map(|e| {
            let st = &e["Status"];
            let me = st["header"]["member_id"].as_u64()?;
            (me == st["leader"].as_u64()?).then(|| {
                let ep = e["Endpoint"].as_str().unwrap_or("");
                (0..ETCD_MEMBERS).find(|&i| ep.contains(&etcd_ip(i)))
            })?
        })
    }

    /// Kills etcd member `i` (0-based).
    pub fn kill_etcd(&self, i: usize) {
        let child = self.etcd.lock().unwrap()[i].take();
        if let Some(mut c) = child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Writes `text` as the cluster's config directly (`etcdctl put`), past `xnet config
    /// push`'s validation: what another tool might do.
    pub fn put_unchecked(&self, text: &str) -> Result<()> {
        self.etcdctl(&["put", &xnet_user::cluster::config_key(CLUSTER), text])
            .map(|_| ())
    }

    /// BIRD's config in `host` (on-prem or the VNet): it announces its network to both
    /// nodes and prefers on-prem node a's routes, the VNet node b's; with `multipath`,
    /// both nodes' equally, installed as one ECMP route (hashed by 5-tuple).
    fn bird_conf(&self, host: &str, multipath: bool) -> String {
        let (asn, net, preferred, l) = match host {
            "onprem" => (65010, "192.168.0.0/16", 1, 1),
            _ => (65020, "10.1.0.0/16", 2, 2),
        };
        let id = link_addresses(1, l).1;
        let mut conf = format!(
            "router id {id};\nprotocol device {{}}\nprotocol static nets {{ ipv4; route {net} blackhole; }}\nprotocol kernel {{ ipv4 {{ export where source = RTS_BGP; }}; merge paths yes; }}\n"
        );
        for node in NODES {
            let x = node_index(node);
            let (theirs, mine) = link_addresses(x, l);
            let pref = if x == preferred && !multipath {
                200
            } else {
                100
            };
            conf += &format!(
                "protocol bgp {node} {{\n  local {mine} as {asn};\n  neighbor {theirs} as 65000;\n  hold time 3;\n  connect retry time 1;\n  error wait time 1, 2;\n  ipv4 {{ import filter {{ bgp_local_pref = {pref}; accept; }}; export where proto = \"nets\"; }};\n}}\n"
            );
        }
        conf
    }

    /// Both routers spread flows over both nodes (ECMP), or go back to preferring one
    /// node each (`birdc configure`).
    pub fn set_multipath(&self, on: bool) -> Result<()> {
        for host in ["onprem", "vnet"] {
            std::fs::write(
                self.dir.join(format!("bird-{host}.conf")),
                self.bird_conf(host, on),
            )?;
            let out = self.birdc(host, "configure");
            if !out.contains("Reconfigured") {
                bail!("birdc configure in {host}: {out}");
            }
        }
        Ok(())
    }

    /// BIRD in `host` with `bird_conf`.
    fn start_bird(&self, host: &str) -> Result<Child> {
        let ns = self.ns(host);
        let path = self.dir.join(format!("bird-{host}.conf"));
        std::fs::write(&path, self.bird_conf(host, false))?;
        let socket = self.dir.join(format!("bird-{host}.ctl"));
        Command::new("ip")
            .args(["netns", "exec", &ns, "bird", "-f", "-c"])
            .arg(&path)
            .arg("-s")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("bird (Debian bird2) is installed by cargo xtask setup")
    }

    /// `birdc` on `host`'s BIRD.
    pub fn birdc(&self, host: &str, cmd: &str) -> String {
        let socket = self.dir.join(format!("bird-{host}.ctl"));
        let out = Command::new("birdc")
            .arg("-s")
            .arg(&socket)
            .args(cmd.split_whitespace())
            .output()
            .expect("birdc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The cluster document on disk (for `xnet config push`).
    pub fn document_file(&self, text: &str, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Node `node`'s own file: how to reach etcd, its router id and neighbours' addresses,
    /// its address of each firewall instance.
    pub fn node_file(&self, node: &str) -> String {
        let x = node_index(node);
        let (onprem_mine, onprem) = link_addresses(x, 1);
        let (_, vnet) = link_addresses(x, 2);
        let instances = (1..=FIREWALLS)
            .map(|k| {
                format!(
                    "  {{ name = \"fw{k}\", via = \"{}\" }},",
                    link_addresses(x, 10 + k as u8).1
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        format!(
            r#"# Node {node}'s own settings; the rest comes from etcd.
[agent]
socket = "/run/xnet/demo.sock"
route_table_groups = 2048
metrics_listen = "{METRICS}"

[agent.cluster]
etcd = [{etcd}]
name = "{CLUSTER}"
node = "{node}"
cache = "{cache}"

[bgp]
router_id = "{onprem_mine}"

[[bgp.neighbors]]
name = "onprem"
address = "{onprem}"

[[bgp.neighbors]]
name = "vnet"
address = "{vnet}"

[[services]]
name = "fw"
instances = [
{instances}
]
"#,
            cache = self
                .dir
                .join(format!("node-{node}"))
                .join("cluster.toml")
                .display(),
            etcd = self
                .endpoints()
                .split(',')
                .map(|e| format!("\"{e}\""))
                .collect::<Vec<_>>()
                .join(", "),
        )
    }

    /// Starts the agent of node `node` (its file in the lab's directory).
    pub fn start_node(&self, node: &str) -> Agent {
        Agent::spawn(
            &self.ns(node),
            &self.dir.join(format!("node-{node}")),
            &self.node_file(node),
            &[],
            &[],
        )
    }

    /// `xnet ARGS` in node a's namespace (where etcd is reachable); its output, and
    /// whether it succeeded.
    pub fn xnet(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns("a")])
            .arg(crate::testkit::XNET)
            .args(args)
            .output()
            .expect("xnet");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// `xnet config push FILE` validated with node a's file.
    pub fn push(&self, file: &std::path::Path) -> (bool, String) {
        let local = self.dir.join("node-a").join("xnet.toml");
        let local = if local.exists() {
            local
        } else {
            let p = self.dir.join("a.toml");
            std::fs::write(&p, self.node_file("a")).unwrap();
            p
        };
        let endpoints = self.endpoints();
        self.xnet(&[
            "config",
            "push",
            file.to_str().unwrap(),
            "--etcd",
            &endpoints,
            "--cluster",
            CLUSTER,
            "--local",
            local.to_str().unwrap(),
        ])
    }

    pub fn destroy(&mut self) {
        for mut c in self.birds.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let members = self.etcd.lock().unwrap().len();
        for i in 0..members {
            self.kill_etcd(i);
        }
        for h in self.hosts() {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(&h)])
                .output();
        }
    }
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        self.destroy();
    }
}

/// Sends `per_flow` requests on each of `flows` UDP flows from the VNet host (ports
/// `FLOW_PORT + i`) to on-prem's echo port; on-prem echoes each back. Returns the replies
/// each flow got.
pub fn exchange(lab: &ClusterLab, flows: u16, per_flow: usize) -> Vec<usize> {
    assert!(flows <= MAX_FLOWS);
    let echo = Echo::start(lab);
    let socks: Vec<UdpSocket> = in_netns(&lab.ns("vnet"), move || {
        (0..flows)
            .map(|i| {
                let s = UdpSocket::bind((VNET_HOST, FLOW_PORT + i)).unwrap();
                s.set_nonblocking(true).unwrap();
                s
            })
            .collect()
    });
    let dst: SocketAddr = format!("{ONPREM_HOST}:{ECHO_PORT}").parse().unwrap();
    let mut got = vec![0; flows as usize];
    let mut buf = [0u8; 64];
    let mut drain = |got: &mut Vec<usize>| {
        for (i, s) in socks.iter().enumerate() {
            while s.recv_from(&mut buf).is_ok() {
                got[i] += 1;
            }
        }
    };
    for _ in 0..per_flow {
        for s in &socks {
            let _ = s.send_to(b"request", dst);
        }
        std::thread::sleep(Duration::from_millis(2));
        drain(&mut got);
    }
    let t = Instant::now();
    while got.iter().sum::<usize>() < flows as usize * per_flow
        && t.elapsed() < Duration::from_millis(700)
    {
        std::thread::sleep(Duration::from_millis(20));
        drain(&mut got);
    }
    drop(echo);
    got
}

/// One flow's requests every `interval` for `duration`: (sent, replies).
pub fn stream(
    lab: &ClusterLab,
    port: u16,
    interval: Duration,
    duration: Duration,
) -> (usize, usize) {
    let echo = Echo::start(lab);
    let s = in_netns(&lab.ns("vnet"), move || {
        let s = UdpSocket::bind((VNET_HOST, port)).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    });
    let dst: SocketAddr = format!("{ONPREM_HOST}:{ECHO_PORT}").parse().unwrap();
    let (mut sent, mut got) = (0, 0);
    let mut buf = [0u8; 64];
    let t = Instant::now();
    while t.elapsed() < duration {
        let _ = s.send_to(b"request", dst);
        sent += 1;
        std::thread::sleep(interval);
        while s.recv_from(&mut buf).is_ok() {
            got += 1;
        }
    }
    let t = Instant::now();
    while got < sent && t.elapsed() < Duration::from_millis(700) {
        std::thread::sleep(Duration::from_millis(20));
        while s.recv_from(&mut buf).is_ok() {
            got += 1;
        }
    }
    drop(echo);
    (sent, got)
}

/// On-prem's UDP echo server, while it lives.
struct Echo {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start(lab: &ClusterLab) -> Echo {
        let s = in_netns(&lab.ns("onprem"), || {
            let s = UdpSocket::bind((ONPREM_HOST, ECHO_PORT)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            s
        });
        let stop: std::sync::Arc<std::sync::atomic::AtomicBool> = Default::default();
        let halt = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((k, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..k], from);
                }
            }
        });
        Echo {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `xnet-lab cluster` (what `cargo xtask lab cluster` starts): the lab up with both nodes
/// running the pushed document, test flows across, what to try; torn down on Ctrl-C or
/// after `duration` seconds.
pub async fn run(duration: Option<u64>) -> Result<()> {
    let (lab, a, b, report) = tokio::task::spawn_blocking(|| -> Result<_> {
        let lab = ClusterLab::create("xnet-cluster")?;
        let doc = lab.document_file(DOCUMENT, "cluster.toml");
        let (ok, out) = lab.push(&doc);
        if !ok {
            bail!("xnet config push: {out}");
        }
        let a = lab.start_node("a");
        let b = lab.start_node("b");
        let t = Instant::now();
        while exchange(&lab, 1, 1) != vec![1] {
            if t.elapsed() > Duration::from_secs(20) {
                bail!("no path VNet ⇄ on-prem after 20 s:\n{}\n{}", a.log(), b.log());
            }
        }
        let got = exchange(&lab, 60, 3);
        let mut report = format!(
            "60 UDP flows VNet → on-prem (requests through node b) and back (replies through node a): {} of 180 answered\n",
            got.iter().sum::<usize>()
        );
        for k in 1..=FIREWALLS {
            let n = lab.firewall_flows(k);
            report += &format!(
                "  fw{k} saw {} flows, every one both ways: {}\n",
                n.len(),
                n.values().all(|(q, r)| *q > 0 && *r > 0)
            );
        }
        report += &lab.xnet(&["cluster", "status", "--etcd", &lab.endpoints(), "--cluster", CLUSTER]).1;
        Ok((lab, a, b, report))
    })
    .await??;
    let p = &lab.prefix;
    let e = lab.endpoints();
    let d = lab.dir.display();
    let x = crate::testkit::XNET;
    println!(
        "\n=== the cluster lab is up ===\n{report}\n\
         namespaces: {p}-a and {p}-b (the CXP nodes), {p}-etcd1..3, {p}-onprem and {p}-vnet (BIRD), {p}-fw1..3, {p}-sw (management bridge)\n\
         try:\n\
         \x20 ip netns exec {p}-a {x} cluster status --etcd {e} --cluster {CLUSTER}\n\
         \x20 ip netns exec {p}-a {x} policy --socket {}      (node b: --socket {})\n\
         \x20 edit {d}/cluster.toml, then: ip netns exec {p}-a {x} config push {d}/cluster.toml --etcd {e} --cluster {CLUSTER} --local {d}/node-a/xnet.toml\n\
         \x20 an instance dies:  ip -n {p}-fw2 link set dev e1 down; ip -n {p}-fw2 link set dev e2 down\n\
         \x20 node b loses etcd: ip -n {p}-sw link set dev b down\n\
         \x20 an etcd member dies: kill the `etcd --name e1` process\n\
         logs: {d}/node-a/agent.log, {d}/node-b/agent.log, {d}/etcd1.log\n\
         Ctrl-C tears it down.",
        a.socket.display(),
        b.socket.display()
    );
    match duration {
        Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
        None => tokio::signal::ctrl_c().await?,
    }
    tokio::task::spawn_blocking(move || {
        drop((a, b));
        drop(lab);
    })
    .await?;
    println!("cluster lab torn down");
    Ok(())
}
