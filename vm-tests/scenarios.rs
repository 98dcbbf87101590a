//! The Azure integration scenarios, end to end: real IKE (strongSwan's charon standing in
//! for the Azure VPN gateway), real ESP in the kernel on both sides, real BGP (BIRD), real
//! packets through the agent's XDP program. All run in the VM of `cargo xtask vm-test`
//! (which sets XNET_VM=1); those that need ESP and xfrm interfaces skip on a host kernel
//! without them (in the VM a missing feature is a failure), the others run there too.
//!
//! The lab (`xnet_user::lab`): the CXP namespace `cxp` between hosts `vnet1` (10.1.0.0/16),
//! `vnet2` and `onprem`; here `onprem` (10.0.3.2, its subnet 192.168.10.0/24) plays the
//! remote VNet's VPN gateway.

use std::path::PathBuf;
use std::time::Duration;

use xnet_lab::charon::Charon;
use xnet_lab::lab::Lab;
use xnet_lab::testkit::*;

/// Whether this kernel can run the scenarios; prints why not.
fn vm_kernel(test: &str) -> bool {
    if !require_root(test) {
        return false;
    }
    let (esp, xfrmi) = (kernel_has_esp(), kernel_has_xfrm_interfaces());
    if esp && xfrmi {
        return true;
    }
    let why = format!("the kernel lacks ESP ({esp}) or xfrm interfaces ({xfrmi})");
    if std::env::var_os("XNET_VM").is_some() {
        panic!("{test}: {why}");
    }
    eprintln!("SKIP {test}: {why}; `cargo xtask vm-test` runs it in a VM");
    false
}

const PSK: &str = "xnet-scenario-psk-0123456789abcdef";

/// charon with the kernel's ESP (no userspace ESP: the VM's kernel has it).
const CHARON: &str = "  port = 500\n  port_nat_t = 4500\n  install_routes = no\n  retransmit_timeout = 1\n  retransmit_tries = 3\n  load = random nonce aes sha1 sha2 hmac gcm curve25519 openssl kdf kernel-netlink socket-default vici";

fn write_psk(lab: &Lab) -> PathBuf {
    let dir = std::env::temp_dir().join(&lab.prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let psk = dir.join("gw.psk");
    std::fs::write(&psk, format!("{PSK}\n")).unwrap();
    psk
}

/// `xnet peer-config NAME --format strongswan` for config text `cfg`.
fn peer_config_of(lab: &Lab, name: &str, cfg: &str) -> String {
    let path = std::env::temp_dir().join(&lab.prefix).join("peer.toml");
    std::fs::write(&path, cfg).unwrap();
    peer_config(name, &path)
}

/// The VPN gateway: charon in `host`, configured from the agent's config as is.
fn gateway(lab: &Lab, host: &str, name: &str, cfg: &str) -> Charon {
    charon_in(lab, host, &peer_config_of(lab, name, cfg))
}

/// charon in lab host `host` with `swanctl` loaded.
fn charon_in(lab: &Lab, host: &str, swanctl: &str) -> Charon {
    let dir = std::env::temp_dir().join(format!("{}-charon-{host}", lab.prefix));
    let c = Charon::start(
        &lab.ns(host),
        dir,
        CHARON,
        "      default = 1\n      ike = 2\n      net = 2\n      time_format = %H:%M:%S\n      time_add_ms = yes",
        swanctl,
    )
    .unwrap();
    c.load("--load-all").unwrap();
    c
}

/// The gateway's side of connector `name` (in `cfg`) when the gateway has several
/// tunnels with the same traffic selectors: route-based, into its own xfrm interface
/// `xi{if_id}` in `host`. Returns the peer config with that if_id, its names suffixed
/// with it so several such configs can go into one charon.
fn route_based_peer(lab: &Lab, host: &str, name: &str, cfg: &str, if_id: usize) -> String {
    let ns = lab.ns(host);
    sh(&format!(
        "ip -n {ns} link add xi{if_id} type xfrm if_id {if_id}"
    ));
    sh(&format!("ip -n {ns} link set xi{if_id} up"));
    peer_config_of(lab, name, cfg)
        .replace(&format!("xnet-{name}"), &format!("xnet-{name}-{if_id}"))
        .replace(
            "start_action = none",
            &format!(
                "start_action = none\n        if_id_in = {if_id}\n        if_id_out = {if_id}"
            ),
        )
}

/// Counts, on `dev` in `ns` (ingress), ESP packets and plaintext packets from `src`.
/// Packets XFRM decrypted in tunnel mode come through ingress again, with a secpath: those
/// are not plaintext on the wire.
fn count_underlay(ns: &str, dev: &str, src: &str) {
    sh(&format!(
        "ip netns exec {ns} nft -f - <<'EOF'\ntable netdev underlay_{dev} {{\n  chain in {{\n    type filter hook ingress device {dev} priority 0;\n    ip protocol esp counter\n    ip saddr {src} meta ipsec missing counter\n  }}\n}}\nEOF"
    ));
}

/// (ESP packets, plaintext packets) counted by `count_underlay`.
fn underlay_counts(ns: &str, dev: &str) -> (u64, u64) {
    let out = sh(&format!(
        "ip netns exec {ns} nft list table netdev underlay_{dev}"
    ));
    let n: Vec<u64> = out
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "packets")?;
            w.get(i + 1)?.parse().ok()
        })
        .collect();
    (n[0], n[1])
}

/// The demo config without its static route to on-prem: what lies behind the gateway is
/// learned over the tunnel.
fn without_onprem_route() -> String {
    let cfg = xnet_lab::lab::DEMO_CONFIG;
    let block = "[[routes]]\nsegment = \"prod\"\nprefix = \"192.168.0.0/16\"\nnext_hops = [{ via = \"10.0.3.2\", interface = \"onprem\" }]\n";
    assert!(cfg.contains(block), "the demo config changed");
    cfg.replace(block, "")
}

/// The VNet gateway's BGP speaker (Azure's ASN 65515): it announces the VNet's two
/// subnets and takes what the CXP advertises.
const GATEWAY_BIRD: &str = "router id 192.168.10.254;
protocol device {}
protocol static vnet { ipv4; route 192.168.10.0/24 blackhole; route 192.168.20.0/24 blackhole; }
protocol bgp cxp {
  local 192.168.10.254 as 65515;
  neighbor 10.255.0.1 as 65001;
  multihop;
  ipv4 { import all; export where proto = \"vnet\"; };
}
";

/// The CXP's BGP speaker in the tunnel scenarios: its session address (10.255.0.1, on lo)
/// is inside the tunnels' traffic selectors.
const CXP_BGP: &str = "[bgp]\nasn = 65001\nrouter_id = \"10.255.0.1\"\n";

/// Sets up the CXP for tunnels with BGP over them: the session address, the slow path;
/// returns the PSK file.
fn cxp_with_tunnels(lab: &Lab) -> PathBuf {
    sh(&format!(
        "ip -n {} addr add 10.255.0.1/32 dev lo",
        lab.ns("cxp")
    ));
    slow_path_on(lab);
    write_psk(lab)
}

fn slow_path_on(lab: &Lab) {
    // Tunnel traffic is forwarded by the kernel (XDP passes it): forwarding on, as on any
    // CXP host (the lab leaves it off to prove that XDP forwards the rest).
    sh(&format!(
        "ip netns exec {} sysctl -qw net.ipv4.ip_forward=1",
        lab.ns("cxp")
    ));
}

/// Scenario 1: site-to-site IPsec to a VNet's VPN gateway (Azure default proposals,
/// route-based on the CXP), BGP over the tunnel. The CXP advertises a default route
/// (greenfield), then custom prefixes (brownfield); the gateway's BGP table shows each.
/// VNet-to-CXP traffic crosses the underlay as ESP only.
#[test]
fn s1_site_to_site_ipsec_to_a_vnet_gateway() {
    if !vm_kernel("s1_site_to_site_ipsec_to_a_vnet_gateway") {
        return;
    }
    let lab = lab("s1");
    let (cxp, gw) = (lab.ns("cxp"), lab.ns("onprem"));
    let psk = cxp_with_tunnels(&lab);
    let cfg = format!(
        r#"{}
{CXP_BGP}
[[bgp.neighbors]]
name = "vnet-gw"
segment = "prod"
address = "192.168.10.254"
local_address = "10.255.0.1"
remote_asn = 65515
advertise = "default"

[[ipsec]]
name = "vnet-gw"
segment = "prod"
local_address = "10.0.3.1"
remote_address = "10.0.3.2"
psk_file = "{}"
profile = "azure"
local_ts = ["10.1.0.0/16", "10.255.0.1/32"]
remote_ts = ["192.168.10.0/24", "192.168.20.0/24"]
routes = ["192.168.10.254/32"]
interface = "xi-vnet-gw"
dpd_seconds = 5
"#,
        without_onprem_route(),
        psk.display()
    );
    let charon = gateway(&lab, "onprem", "vnet-gw", &cfg);
    let bird = Bird::in_host(&lab, "onprem", GATEWAY_BIRD, "192.168.10.254");
    count_underlay(&gw, "eth0", "10.1.0.0/16");
    let agent = Agent::start(&lab, &cfg);
    wait_until(
        &agent,
        "the tunnel and BGP over it",
        Duration::from_secs(90),
        |s| {
            s.ipsec
                .first()
                .is_some_and(|t| t.state == "established" && !t.children.is_empty())
                && established(s) == 1
        },
    );
    // Greenfield: the gateway learns a default route from the CXP.
    let wait_bird = |what: &str, f: &dyn Fn(&str) -> bool| {
        let t = std::time::Instant::now();
        loop {
            let r = bird.cmd("show route");
            if f(&r) {
                return r;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "{what}: {r}");
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    wait_bird("default route at the gateway", &|r| r.contains("0.0.0.0/0"));
    // The VNet's subnets are learned over the tunnel and go into it.
    wait_until(
        &agent,
        "VNet subnets learned over BGP",
        Duration::from_secs(30),
        |s| {
            ["192.168.10.0/24", "192.168.20.0/24"].iter().all(|p| {
                s.bgp_routes
                    .iter()
                    .any(|r| r.prefix == *p && r.in_data_plane)
            })
        },
    );
    sh(&format!("ip -n {gw} addr add 192.168.20.1/32 dev lo"));
    assert_eq!(
        udp(
            &lab,
            "vnet1",
            "10.1.0.1:5402",
            "onprem",
            "192.168.20.1:9402",
            20
        ),
        20,
        "vnet1 → second VNet subnet"
    );
    // VNet ⇄ CXP traffic, both ways through the tunnel.
    assert_eq!(
        udp(
            &lab,
            "vnet1",
            "10.1.0.1:5400",
            "onprem",
            "192.168.10.1:9400",
            50
        ),
        50,
        "vnet1 → gateway subnet: {}",
        charon.log()
    );
    assert_eq!(
        udp(
            &lab,
            "onprem",
            "192.168.10.1:9401",
            "vnet1",
            "10.1.0.1:5401",
            50
        ),
        50,
        "gateway subnet → vnet1"
    );
    let (esp, plain) = underlay_counts(&gw, "eth0");
    assert!(esp >= 50, "ESP on the underlay: {esp}");
    assert_eq!(plain, 0, "no plaintext from 10.1.0.0/16 on the underlay");
    let sas = sh(&format!("ip -n {cxp} xfrm state"));
    assert!(sas.contains("if_id 0x100"), "{sas}");
    // Brownfield: custom prefixes instead of a default route.
    reconfigure(
        &agent,
        "advertise = \"default\"",
        "advertise = \"custom\"\nprefixes = [\"10.1.0.0/16\"]",
    );
    let r = wait_bird("custom prefix at the gateway", &|r| {
        r.contains("10.1.0.0/16") && !r.contains("0.0.0.0/0")
    });
    eprintln!("gateway routes after the change:\n{r}");
    hold(
        &lab,
        &agent,
        &format!("try: ip netns exec {gw} swanctl --list-sas --uri unix://{}/charon.vici\n     ip -n {cxp} xfrm state; ip -n {cxp} route show table 100\n     ip netns exec {gw} birdc -s {} show route\n     ip netns exec {p}-vnet1 ping -I 10.1.0.1 192.168.20.1", charon.dir.display(), bird.socket, p = lab.prefix),
    );
}

/// Scenario 4: a transit VNet reached over a plain L3 link. The transit VNet (host
/// `vnet2`, segment "dev") announces its peered spokes over BGP; another cloud (vnet1,
/// segment "prod") gets to them the moment a policy joins the two segments — one SIGHUP,
/// no session or program restart.
#[test]
fn s4_transit_vnet_over_a_plain_link() {
    // No ESP here: it runs on the host too.
    if !require_root("s4_transit_vnet_over_a_plain_link") {
        return;
    }
    let lab = lab("s4");
    let cfg = format!(
        r#"{}
[bgp]
asn = 65001
router_id = "10.0.2.1"

[[bgp.neighbors]]
name = "transit"
segment = "dev"
address = "10.0.2.2"
local_address = "10.0.2.1"
remote_asn = 65030
advertise = "none"
"#,
        xnet_lab::lab::DEMO_CONFIG
    );
    let _bird = Bird::in_host(
        &lab,
        "vnet2",
        "router id 10.0.2.2;\nprotocol device {}\nprotocol static spokes { ipv4; route 10.30.0.0/16 blackhole; route 10.31.0.0/16 blackhole; }\nprotocol bgp cxp {\n  local 10.0.2.2 as 65030;\n  neighbor 10.0.2.1 as 65001;\n  ipv4 { import all; export where proto = \"spokes\"; };\n}\n",
        "10.30.0.1",
    );
    let agent = Agent::start(&lab, &cfg);
    wait_until(
        &agent,
        "the transit's spokes learned",
        Duration::from_secs(60),
        |s| {
            established(s) == 1
                && s.bgp_routes
                    .iter()
                    .filter(|r| r.prefix.starts_with("10.3") && r.in_data_plane)
                    .count()
                    == 2
        },
    );
    let to_spoke = || {
        udp(
            &lab,
            "vnet1",
            "10.1.0.1:5500",
            "vnet2",
            "10.30.0.1:9500",
            20,
        )
    };
    assert_eq!(
        to_spoke(),
        0,
        "segments are apart until a policy joins them"
    );
    let prog = xdp_prog_id(&lab, "vnet1");
    let join = r#"
[[policies]]
name = "prod-to-transit"
segment = "prod"
destination = "10.30.0.0/15"
action = "allow"
to_segment = "dev"

[[policies]]
name = "transit-to-prod"
segment = "dev"
source = "10.30.0.0/15"
destination = "10.1.0.0/16"
action = "allow"
to_segment = "prod"
"#;
    // The agent's file (the harness set its socket and pin directory), plus the policies.
    let running = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(&agent.config, format!("{running}{join}")).unwrap();
    let t = std::time::Instant::now();
    agent.signal(libc::SIGHUP);
    wait_until(
        &agent,
        "the policies in force",
        Duration::from_secs(10),
        |s| s.policies.len() == 2,
    );
    eprintln!("policies in force {:?} after SIGHUP", t.elapsed());
    assert_eq!(to_spoke(), 20, "prod → transit spoke");
    assert_eq!(
        udp(
            &lab,
            "vnet2",
            "10.30.0.1:9501",
            "vnet1",
            "10.1.0.1:5501",
            20
        ),
        20,
        "transit spoke → prod"
    );
    assert_eq!(xdp_prog_id(&lab, "vnet1"), prog, "the same XDP program");
    assert_eq!(established(&agent.status()), 1, "the BGP session stayed up");
    hold(
        &lab,
        &agent,
        &format!("try: ip netns exec {p}-vnet1 ping -I 10.1.0.1 10.30.0.1\n     {XNET} policy --socket {}", agent.socket.display(), p = lab.prefix),
    );
}

/// Scenario 6: ExpressRoute-style private peering: eBGP over the link with the on-prem
/// router, BIRD configured by `xnet peer-config … --format bird` as is. Routes both ways,
/// traffic forwarded by XDP.
#[test]
fn s6_private_peering_with_a_generated_router_config() {
    if !require_root("s6_private_peering_with_a_generated_router_config") {
        return;
    }
    let lab = lab("s6");
    let cfg = format!(
        r#"{}
[bgp]
asn = 65001
router_id = "10.0.3.1"

[[bgp.neighbors]]
name = "er-onprem"
segment = "prod"
address = "10.0.3.2"
local_address = "10.0.3.1"
remote_asn = 12076
advertise = "custom"
prefixes = ["10.1.0.0/16"]
import = {{ prefixes = [{{ prefix = "192.168.30.0/24" }}] }}
"#,
        without_onprem_route()
    );
    let path = std::env::temp_dir().join(format!("{}-er.toml", lab.prefix));
    std::fs::write(&path, &cfg).unwrap();
    let router = xnet_peer_config(&path, &["er-onprem", "--format", "bird"]);
    let bird = Bird::in_host(&lab, "onprem", &router, "192.168.30.1");
    let agent = Agent::start(&lab, &cfg);
    wait_until(
        &agent,
        "on-prem prefix learned",
        Duration::from_secs(60),
        |s| {
            s.bgp_routes
                .iter()
                .any(|r| r.prefix == "192.168.30.0/24" && r.in_data_plane)
        },
    );
    let t = std::time::Instant::now();
    loop {
        let r = bird.cmd("show route");
        if r.contains("10.1.0.0/16") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{r}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let before = agent.status().reason("forwarded");
    assert_eq!(
        udp(
            &lab,
            "vnet1",
            "10.1.0.1:5600",
            "onprem",
            "192.168.30.1:9600",
            50
        ),
        50
    );
    assert_eq!(
        udp(
            &lab,
            "onprem",
            "192.168.30.1:9601",
            "vnet1",
            "10.1.0.1:5601",
            50
        ),
        50
    );
    assert!(
        agent.status().reason("forwarded") >= before + 100,
        "XDP forwarded both ways"
    );
    hold(
        &lab,
        &agent,
        &format!("try: ip netns exec {p}-onprem birdc -s {} show route\n     ip netns exec {p}-vnet1 ping -I 10.1.0.1 192.168.30.1", bird.socket, p = lab.prefix),
    );
}

/// Scenario 3: a vWAN hub over IPsec + BGP, then migration. The hub (charon and BIRD in
/// `onprem`) announces two spokes; the CXP learns them over the tunnel and advertises
/// the on-prem prefix (10.1.0.0/16) back. Then spoke 10.41/16 moves to its own gateway
/// (charon in `vnet2`) on a direct connector the CXP already has: its tunnel comes up,
/// the hub withdraws the spoke, and steady traffic to the other spoke loses nothing.
#[test]
fn s3_vwan_hub_and_migration_of_a_spoke() {
    if !vm_kernel("s3_vwan_hub_and_migration_of_a_spoke") {
        return;
    }
    let lab = lab("s3");
    let (cxp, hub, spoke) = (lab.ns("cxp"), lab.ns("onprem"), lab.ns("vnet2"));
    let psk = cxp_with_tunnels(&lab);
    let cfg = format!(
        r#"{}
{CXP_BGP}
[[bgp.neighbors]]
name = "hub"
segment = "prod"
address = "192.168.10.254"
local_address = "10.255.0.1"
remote_asn = 65515
advertise = "custom"
prefixes = ["10.1.0.0/16"]

[[ipsec]]
name = "hub"
segment = "prod"
local_address = "10.0.3.1"
remote_address = "10.0.3.2"
psk_file = "{psk}"
profile = "azure"
local_ts = ["10.1.0.0/16", "10.255.0.1/32"]
remote_ts = ["192.168.10.0/24", "10.40.0.0/15"]
routes = ["192.168.10.254/32"]
interface = "xi-hub"

[[ipsec]]
name = "spoke41"
segment = "prod"
local_address = "10.0.2.1"
remote_address = "10.0.2.2"
psk_file = "{psk}"
initiate = false
profile = "azure"
local_ts = ["10.1.0.0/16"]
remote_ts = ["10.41.0.0/16"]
interface = "xi-spoke41"
"#,
        without_onprem_route(),
        psk = psk.display()
    );
    let _hub_gw = gateway(&lab, "onprem", "hub", &cfg);
    sh(&format!("ip -n {hub} addr add 192.168.10.254/32 dev lo"));
    let bird = Bird::in_host(
        &lab,
        "onprem",
        "router id 192.168.10.254;
protocol device {}
protocol static spoke40 { ipv4; route 10.40.0.0/16 blackhole; }
protocol static spoke41 { ipv4; route 10.41.0.0/16 blackhole; }
protocol bgp cxp {
  local 192.168.10.254 as 65515;
  neighbor 10.255.0.1 as 65001;
  multihop;
  ipv4 { import all; export where proto ~ \"spoke*\"; };
}
",
        "10.40.0.1",
    );
    sh(&format!("ip -n {hub} addr add 10.41.0.1/32 dev lo"));
    let agent = Agent::start(&lab, &cfg);
    let learned = |s: &xnet_user::status::Status, p: &str| {
        s.bgp_routes
            .iter()
            .any(|r| r.prefix == p && r.in_data_plane)
    };
    wait_until(
        &agent,
        "both spokes learned from the hub",
        Duration::from_secs(90),
        |s| learned(s, "10.40.0.0/16") && learned(s, "10.41.0.0/16"),
    );
    let t = std::time::Instant::now();
    while !bird.cmd("show route").contains("10.1.0.0/16") {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the hub never got 10.1.0.0/16"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        udp(
            &lab,
            "vnet1",
            "10.1.0.1:5700",
            "onprem",
            "10.41.0.1:9700",
            20
        ),
        20,
        "spoke 41 through the hub"
    );

    // Migration of spoke 41 under steady traffic to spoke 40.
    let steady = Flows::start(
        &lab,
        ("vnet1", "10.1.0.1"),
        ("onprem", "10.40.0.1:9701"),
        1,
        5701,
    );
    count_underlay(&spoke, "eth0", "10.1.0.0/16");
    let spoke_gw = gateway(&lab, "vnet2", "spoke41", &cfg);
    wait_until(
        &agent,
        "the direct tunnel of spoke 41",
        Duration::from_secs(60),
        |s| {
            s.ipsec
                .iter()
                .any(|t| t.name == "spoke41" && t.state == "established" && !t.children.is_empty())
        },
    );
    bird.cmd("disable spoke41");
    sh(&format!("ip -n {hub} addr del 10.41.0.1/32 dev lo"));
    sh(&format!("ip -n {spoke} addr add 10.41.0.1/32 dev lo"));
    wait_until(
        &agent,
        "the hub's withdrawal of spoke 41",
        Duration::from_secs(30),
        |s| !s.bgp_routes.iter().any(|r| r.prefix == "10.41.0.0/16"),
    );
    let got = udp(
        &lab,
        "vnet1",
        "10.1.0.1:5702",
        "vnet2",
        "10.41.0.1:9702",
        20,
    );
    assert_eq!(
        got,
        20,
        "spoke 41 over its own tunnel:\n{}\n{}\n{}\n{:?}",
        sh(&format!("ip -n {cxp} route show table 100")),
        sh(&format!("ip -n {cxp} -s link show xi-spoke41")),
        sh(&format!("ip netns exec {spoke} nft list ruleset; ip -n {spoke} -s xfrm state | grep -v 'limit\\|lifetime\\|expire\\|sel \\|anti-replay\\|aead'; ip -n {spoke} xfrm policy | grep -A1 '10.41'; grep -i 'nat\\|float\\|4500' {}/charon.log | head -20", spoke_gw.dir.display())),
        agent.status().reasons
    );
    assert_eq!(
        udp(
            &lab,
            "vnet2",
            "10.41.0.1:9703",
            "vnet1",
            "10.1.0.1:5703",
            20
        ),
        20,
        "and back"
    );
    let (esp, plain) = underlay_counts(&spoke, "eth0");
    assert!(
        esp >= 20 && plain == 0,
        "ESP only to the spoke: {esp} ESP, {plain} plain"
    );
    let flow = &steady.stop()[0];
    let (sent, received) = (flow.sent, flow.arrivals.len() as u64);
    eprintln!("steady traffic to spoke 40 during the migration: {received} of {sent}");
    assert_eq!(received, sent, "no loss for the spoke that stayed");
    hold(
        &lab,
        &agent,
        &format!(
            "try: {XNET} ipsec --socket {}\n     ip netns exec {hub} birdc -s {} show route",
            agent.socket.display(),
            bird.socket
        ),
    );
}

/// Adds a veth link `cxp_dev` (in CXP namespace `cxp`, `a`/30) ↔ `host_dev` (in `host`,
/// `b`/30): a second underlay, or the links of a second CXP.
fn link(cxp: &str, cxp_dev: &str, a: &str, host: &str, host_dev: &str, b: &str) {
    sh(&format!(
        "ip link add {cxp_dev} netns {cxp} type veth peer name {host_dev} netns {host}"
    ));
    sh(&format!("ip -n {cxp} addr add {a}/30 dev {cxp_dev}"));
    sh(&format!("ip -n {host} addr add {b}/30 dev {host_dev}"));
    sh(&format!("ip -n {cxp} link set {cxp_dev} up"));
    sh(&format!("ip -n {host} link set {host_dev} up"));
    // As in the lab: XDP_REDIRECT into a veth needs GRO on the receiving end.
    sh(&format!(
        "ip netns exec {host} ethtool -K {host_dev} gro on tx off"
    ));
}

/// What one ECMP path of the zone-redundant gateway is: its connector, the gateway's
/// underlay address and link, its BGP address, its xfrm interface (if_id) there.
const ZONES: [(&str, &str, &str, &str, usize); 2] = [
    ("gw0", "10.0.3.2", "eth0", "192.168.10.254", 1),
    ("gw1", "10.0.4.2", "eth1", "192.168.10.253", 2),
];

/// Scenario 2, first half: a zone-redundant VPN gateway. Two gateway instances (two
/// underlay addresses, two BGP addresses) each have a tunnel to the CXP with BGP over
/// it; both announce the VNet, so the CXP spreads flows over the two tunnels (ECMP, the
/// kernel's multipath route into two xfrm interfaces). Then instance 0's underlay goes
/// dark: the flows on its tunnel move to the other one when BFD over the tunnel (200 ms ×
/// 3, multihop, for the BGP session and the connector) notices, and the flows already on
/// the other tunnel lose nothing; then instance 0 comes back and the flows spread again
/// without loss.
#[test]
fn s2_zone_redundant_tunnels_share_flows_and_fail_over() {
    if !vm_kernel("s2_zone_redundant_tunnels_share_flows_and_fail_over") {
        return;
    }
    zone_redundant(true);
}

/// The same as an Azure VPN gateway runs it: no BFD, so DPD (after 1 s idle, 2 retries
/// 1 s apart: dead within 4 s) is what notices, well before BGP's 90 s hold time.
#[test]
fn s2_zone_redundant_without_bfd_fails_over_within_the_dpd_bound() {
    if !vm_kernel("s2_zone_redundant_without_bfd_fails_over_within_the_dpd_bound") {
        return;
    }
    zone_redundant(false);
}

fn zone_redundant(bfd: bool) {
    let lab = lab(if bfd { "s2z" } else { "s2d" });
    let (cxp, gw) = (lab.ns("cxp"), lab.ns("onprem"));
    let psk = cxp_with_tunnels(&lab);
    link(&cxp, "gw1", "10.0.4.1", &gw, "eth1", "10.0.4.2");
    // Flows, not just addresses, pick the path (the kernel forwards tunnel traffic).
    sh(&format!(
        "ip netns exec {cxp} sysctl -qw net.ipv4.fib_multipath_hash_policy=1"
    ));
    let mut cfg = format!(
        "{}\n{CXP_BGP}multipath = 2\ngraceful_restart = false\n",
        without_onprem_route()
    );
    for (i, (name, remote, _, bgp, _)) in ZONES.iter().enumerate() {
        let local = ["10.0.3.1", "10.0.4.1"][i];
        // BFD over the tunnel: one session (the same peer and local address) for the BGP
        // neighbour and the connector. Without it, DPD's bound.
        let (neighbor_bfd, liveness) = if bfd {
            (
                "bfd = { interval_ms = 200 }".to_string(),
                format!("bfd = {{ peer = \"{bgp}\", local = \"10.255.0.1\", interval_ms = 200 }}"),
            )
        } else {
            (
                String::new(),
                "dpd_seconds = 1\ndpd_retransmit_seconds = 1\ndpd_retries = 2".to_string(),
            )
        };
        cfg += &format!(
            r#"
[[bgp.neighbors]]
name = "{name}"
segment = "prod"
address = "{bgp}"
local_address = "10.255.0.1"
remote_asn = 65515
hold_time = 90
advertise = "custom"
prefixes = ["10.1.0.0/16"]
{neighbor_bfd}

[[ipsec]]
name = "{name}"
segment = "prod"
local_address = "{local}"
remote_address = "{remote}"
psk_file = "{}"
profile = "azure"
local_ts = ["10.1.0.0/16", "10.255.0.1/32"]
remote_ts = ["192.168.10.0/24"]
routes = ["{bgp}/32"]
interface = "xi-{name}"
{liveness}
"#,
            psk.display()
        );
    }
    // The gateway: route-based too (one xfrm interface per instance, so the two tunnels'
    // equal traffic selectors do not clash), each instance's BGP session into its own.
    let mut swanctl = String::new();
    for (name, _, _, bgp, if_id) in ZONES {
        swanctl += &route_based_peer(&lab, "onprem", name, &cfg, if_id);
        sh(&format!(
            "ip -n {gw} route add 10.255.0.1/32 dev xi{if_id} table {if_id}"
        ));
        sh(&format!("ip -n {gw} rule add from {bgp} lookup {if_id}"));
    }
    let _charon = charon_in(&lab, "onprem", &swanctl);
    // Two gateway instances, two BGP speakers (each bound to its own address: one BIRD
    // cannot hold two sessions to the same neighbour), each with multihop BFD on a
    // socket bound to its address (`strict bind`), so both share the namespace.
    let _birds: Vec<Bird> = ZONES
        .iter()
        .enumerate()
        .map(|(i, (_, _, _, bgp, _))| {
            let (proto, on) = if bfd {
                (
                    "protocol bfd { strict bind yes; multihop { interval 200 ms; multiplier 3; }; }\n",
                    "bfd on;",
                )
            } else {
                ("", "")
            };
            let conf = format!(
                "router id {bgp};
protocol device {{}}
{proto}protocol static vnet {{ ipv4; route 192.168.10.0/24 blackhole; }}
protocol bgp zone{i} {{
  local {bgp} as 65515; neighbor 10.255.0.1 as 65001; multihop; hold time 90; strict bind;
  error wait time 1, 5; {on}
  ipv4 {{ import all; export where proto = \"vnet\"; }};
}}
"
            );
            Bird::instance(&lab, "onprem", &format!("bird{i}"), &conf, bgp)
        })
        .collect();
    for (_, _, dev, _, _) in ZONES {
        count_underlay(&gw, dev, "10.1.0.0/16");
    }
    let agent = Agent::start(&lab, &cfg);
    let both = |s: &xnet_user::status::Status| {
        s.bgp_routes.iter().any(|r| {
            r.prefix == "192.168.10.0/24"
                && r.in_data_plane
                && r.paths.iter().filter(|p| p.selected).count() == 2
        })
    };
    wait_until(
        &agent,
        "both tunnels, BGP over each, the VNet over both",
        Duration::from_secs(120),
        |s| {
            s.ipsec
                .iter()
                .filter(|t| t.state == "established" && !t.children.is_empty())
                .count()
                == 2
                && established(s) == 2
                && both(s)
                && (!bfd || s.bfd.iter().filter(|b| b.state == "up").count() == 2)
        },
    );
    let route = sh(&format!("ip -n {cxp} route show table 100 192.168.10.0/24"));
    assert!(
        route.contains("xi-gw0") && route.contains("xi-gw1"),
        "the kernel's route into both tunnels: {route}"
    );

    let flows = Flows::start(
        &lab,
        ("vnet1", "10.1.0.1"),
        ("onprem", "192.168.10.1:9700"),
        8,
        7000,
    );
    std::thread::sleep(Duration::from_secs(4));
    let esp: Vec<u64> = ZONES
        .iter()
        .map(|(_, _, dev, _, _)| underlay_counts(&gw, dev).0)
        .collect();
    assert!(
        esp.iter().all(|n| *n > 0),
        "ESP on both gateway instances (ECMP): {esp:?}"
    );
    // Instance 0 goes dark: its underlay link loses everything, silently (no DELETE, no
    // NOTIFICATION: only timers can tell).
    go_dark(&gw);
    let failed = std::time::Instant::now();
    wait_until(
        &agent,
        "the VNet through the other tunnel only",
        Duration::from_secs(30),
        |s| {
            s.bgp_routes.iter().any(|r| {
                r.prefix == "192.168.10.0/24"
                    && r.in_data_plane
                    && r.paths.iter().filter(|p| p.selected).count() == 1
            })
        },
    );
    let noticed = failed.elapsed();
    std::thread::sleep(Duration::from_secs(4));
    let resumed = std::time::Instant::now() - Duration::from_secs(2);
    let flows = flows.stop();
    let log = agent.log();
    for (k, f) in flows.iter().enumerate() {
        assert!(
            f.received_since(resumed) > 0,
            "flow {k} resumed after the failover: {} sent, {} lost\n{log}",
            f.sent,
            f.lost()
        );
    }
    // A flow on the dark tunnel loses datagrams; one on the other loses none (a stall of
    // the emulated CPUs delays datagrams but drops none, so loss is what tells them apart).
    let hit: Vec<&Flow> = flows.iter().filter(|f| f.lost() > 0).collect();
    let gap = hit
        .iter()
        .map(|f| f.longest_gap())
        .max()
        .unwrap_or_default();
    let how = if bfd {
        "BFD 200 ms x 3 over the tunnels".to_string()
    } else {
        format!(
            "no BFD, DPD bound {} s",
            agent.status().ipsec[0].dpd_bound_secs
        )
    };
    println!(
        "s2 zone failover ({how}): {} of {} flows were on the dark tunnel, their longest gap {} ms; the agent moved the route after {} ms; the other {} flows lost nothing",
        hit.len(),
        flows.len(),
        gap.as_millis(),
        noticed.as_millis(),
        flows.len() - hit.len()
    );
    assert!(
        !hit.is_empty() && hit.len() < flows.len(),
        "some flows, not all, were on the dark tunnel: lost {:?}",
        flows.iter().map(|f| f.lost()).collect::<Vec<_>>()
    );
    let limit = if bfd {
        Duration::from_millis(1500)
    } else {
        // The bound, and the emulated CPUs' slack.
        Duration::from_secs(agent.status().ipsec[0].dpd_bound_secs + 2)
    };
    assert!(gap <= limit, "failover gap {gap:?} over {limit:?}\n{log}");
    assert!(
        underlay_counts(&gw, "eth1").0 > esp[1],
        "the surviving instance carries ESP"
    );
    if bfd {
        // Instance 0 comes back: BFD, then BGP over its tunnel; the flows spread again,
        // none lost.
        sh(&format!("ip netns exec {gw} nft delete table inet dark"));
        let flows = Flows::start(
            &lab,
            ("vnet1", "10.1.0.1"),
            ("onprem", "192.168.10.1:9750"),
            8,
            7100,
        );
        wait_until(&agent, "both tunnels again", Duration::from_secs(60), both);
        std::thread::sleep(Duration::from_secs(3));
        let flows = flows.stop();
        let lost: Vec<u64> = flows.iter().map(|f| f.lost()).collect();
        println!("s2 zone recovery: instance 0 back, flows lost {lost:?}");
        assert!(lost.iter().all(|l| *l == 0), "lost on recovery: {lost:?}");
    }
    hold(
        &lab,
        &agent,
        &format!("try: ip -n {cxp} route show table 100\n     ip netns exec {cxp} {XNET} bgp --socket {}", agent.socket.display()),
    );
}

/// A namespace the lab does not know of (scenario 2's backup CXP), deleted when dropped.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .output();
    }
}

/// Whether `ip route show NET` in `ns` has `what` ("via 10.0.6.1 ", "dev xi2 ").
fn route_via(ns: &str, net: &str, what: &str) -> bool {
    sh(&format!("ip -n {ns} route show {net}")).contains(what)
}

/// Waits until `f` holds, at most `limit`; returns how long that took.
fn wait_for(what: &str, limit: Duration, f: impl Fn() -> bool) -> Duration {
    let t = std::time::Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what} in {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t.elapsed()
}

/// Cuts namespace `ns` off from what is at the other end of its `eth0`, silently:
/// nftables drops everything it receives there or would send there (no FIN, no DELETE,
/// no NOTIFICATION gets through: only timers can tell).
fn go_dark(ns: &str) {
    sh(&format!(
        "ip netns exec {ns} nft add table inet dark \\; add chain inet dark in {{ type filter hook input priority -10 \\; }} \\; add rule inet dark in iifname eth0 drop \\; add chain inet dark out {{ type filter hook output priority -10 \\; }} \\; add rule inet dark out oifname eth0 drop"
    ));
}

/// Steady UDP both ways between `vnet1` (10.1.0.1) and `onprem` (192.168.10.1) on ports
/// `port` and `port + 1`; `names`: what each way is in the scenario.
fn both_ways(lab: &Lab, port: u16, names: [&'static str; 2]) -> [(&'static str, Flows); 2] {
    let (a, b) = (
        format!("192.168.10.1:{port}"),
        format!("10.1.0.1:{}", port + 1),
    );
    [
        (
            names[0],
            Flows::start(lab, ("vnet1", "10.1.0.1"), ("onprem", &a), 1, port + 100),
        ),
        (
            names[1],
            Flows::start(
                lab,
                ("onprem", "192.168.10.1"),
                ("vnet1", &b),
                1,
                port + 200,
            ),
        ),
    ]
}

/// The primary CXP dies silently: its peers' links to it (their `eth0`) go dark first,
/// so not even the FIN of its sessions gets out, then its agent is killed. Returns how
/// long until `moved` holds (the peers route through the backup).
fn primary_dies(primary: &mut Agent, peers: [&str; 2], moved: impl Fn() -> bool) -> Duration {
    for ns in peers {
        go_dark(ns);
    }
    primary.signal(libc::SIGKILL);
    let _ = primary.child.take().unwrap().wait();
    wait_for(
        "both sides routed through the backup",
        Duration::from_secs(30),
        moved,
    )
}

/// After a failover to `backup`: stops `flows` (3 s on), checks that each resumed and
/// that its gap stayed under 20 s; the gaps, for the report.
fn failover_gaps(flows: [(&str, Flows); 2], backup: &Agent) -> (String, Vec<Duration>) {
    std::thread::sleep(Duration::from_secs(3));
    let since = std::time::Instant::now() - Duration::from_secs(2);
    let mut report = Vec::new();
    let mut gaps = Vec::new();
    for (way, f) in flows {
        let f = &f.stop()[0];
        assert!(
            f.received_since(since) > 0,
            "{way}: traffic resumed through the backup ({} sent, {} lost)\n{}",
            f.sent,
            f.lost(),
            backup.log()
        );
        let gap = f.longest_gap();
        assert!(gap < Duration::from_secs(20), "{way}: gap {gap:?}");
        report.push(format!("{way} {} ms ({} lost)", gap.as_millis(), f.lost()));
        gaps.push(gap);
    }
    (report.join(", "), gaps)
}

/// What both CXPs of scenario 2 have: one segment, the links to each side.
const PAIR_BASE: &str = r#"[agent]
socket = "/run/xnet/demo.sock"
route_table_groups = 4096

[[segments]]
name = "prod"
table = 100

[[interfaces]]
name = "vnet1"
segment = "prod"

[[interfaces]]
name = "onprem"
segment = "prod"
"#;

/// A CXP of scenario 2's pair: eBGP with the VNet's route server and the on-prem router,
/// everything learned advertised on; the backup prepends its AS `prepend` times, so
/// both peers prefer the primary while it lives.
fn pair_config(
    router_id: &str,
    vnet_peer: &str,
    onprem_peer: &str,
    prepend: u8,
    bfd: bool,
) -> String {
    let bfd = if bfd {
        "bfd = { interval_ms = 200 }"
    } else {
        ""
    };
    format!(
        r#"{PAIR_BASE}
[bgp]
asn = 65001
router_id = "{router_id}"
# With a backup CXP, peers must drop a dead CXP's routes at once, not keep them for
# its graceful restart.
graceful_restart = false

[[bgp.neighbors]]
name = "vnet-rs"
segment = "prod"
address = "{vnet_peer}"
remote_asn = 65515
advertise = "all"
export = {{ prepend = {prepend} }}
{bfd}

[[bgp.neighbors]]
name = "onprem"
segment = "prod"
address = "{onprem_peer}"
remote_asn = 65010
advertise = "all"
export = {{ prepend = {prepend} }}
{bfd}
"#
    )
}

/// BIRD for one side of scenario 2's pair: AS `asn` announcing `net`, a session to the
/// primary CXP and one to the backup (hold time 6 s), the best path into the kernel;
/// with `bfd`, BFD at 200 ms × 3 on both sessions (ExpressRoute runs 300 ms × 3; the
/// emulated CPUs of the VM add half a second after detection, which 200 ms leaves room
/// for within 1.5 s).
fn pair_peer(
    asn: u32,
    net: &str,
    primary: (&str, &str),
    backup: (&str, &str),
    bfd: bool,
) -> String {
    let (proto, on) = if bfd {
        (
            "protocol bfd { interface \"*\" { interval 200 ms; multiplier 3; }; }\n",
            "bfd on;",
        )
    } else {
        ("", "")
    };
    format!(
        "router id {};
protocol device {{}}
{proto}protocol static own {{ ipv4; route {net} blackhole; }}
protocol kernel {{ ipv4 {{ export where source = RTS_BGP; }}; }}
protocol bgp cxp_primary {{
  local {} as {asn}; neighbor {} as 65001; hold time 6; error wait time 1, 5; {on}
  ipv4 {{ import all; export where proto = \"own\"; }};
}}
protocol bgp cxp_backup {{
  local {} as {asn}; neighbor {} as 65001; hold time 6; error wait time 1, 5; {on}
  ipv4 {{ import all; export where proto = \"own\"; }};
}}
",
        primary.0, primary.0, primary.1, backup.0, backup.1
    )
}

/// Scenario 2, second half: a failover CXP. A second CXP (`cxp2`, another region) has
/// its own links to the VNet and to on-prem and the same BGP peers, but prepends its
/// AS, so both sides route through the primary. Then the primary dies silently (its
/// agent killed, its links dark): both sides move to the backup, whose XDP forwards the
/// traffic on — told by BFD (200 ms × 3) within a second, or without BFD by BGP's hold
/// timer (6 s). The gap each way is measured. Then the primary comes back and the
/// traffic returns to it without loss.
#[test]
fn s2_failover_cxp_takes_over_when_the_primary_dies() {
    if !require_root("s2_failover_cxp_takes_over_when_the_primary_dies") {
        return;
    }
    failover_cxp(true);
}

#[test]
fn s2_failover_cxp_without_bfd_waits_for_the_hold_timer() {
    if !require_root("s2_failover_cxp_without_bfd_waits_for_the_hold_timer") {
        return;
    }
    failover_cxp(false);
}

fn failover_cxp(bfd: bool) {
    let lab = lab(if bfd { "s2f" } else { "s2h" });
    let (vnet, onprem) = (lab.ns("vnet1"), lab.ns("onprem"));
    let cxp2 = Netns(lab.ns("cxp2"));
    sh(&format!("ip netns add {}", cxp2.0));
    sh(&format!("ip -n {} link set lo up", cxp2.0));
    sh(&format!(
        "ip netns exec {} sysctl -qw net.ipv4.ip_forward=0",
        cxp2.0
    ));
    link(&cxp2.0, "vnet1", "10.0.6.1", &vnet, "eth1", "10.0.6.2");
    link(&cxp2.0, "onprem", "10.0.5.1", &onprem, "eth1", "10.0.5.2");
    let _rs = Bird::in_host(
        &lab,
        "vnet1",
        &pair_peer(
            65515,
            "10.1.0.0/16",
            ("10.0.1.2", "10.0.1.1"),
            ("10.0.6.2", "10.0.6.1"),
            bfd,
        ),
        "10.1.0.254",
    );
    let _router = Bird::in_host(
        &lab,
        "onprem",
        &pair_peer(
            65010,
            "192.168.10.0/24",
            ("10.0.3.2", "10.0.3.1"),
            ("10.0.5.2", "10.0.5.1"),
            bfd,
        ),
        "192.168.10.254",
    );
    let primary_cfg = pair_config("10.0.1.1", "10.0.1.2", "10.0.3.2", 0, bfd);
    let mut primary = Agent::start(&lab, &primary_cfg);
    let backup = Agent::start_in(
        &lab,
        "cxp2",
        &pair_config("10.0.6.1", "10.0.6.2", "10.0.5.2", 3, bfd),
        &[],
    );
    for agent in [&primary, &backup] {
        wait_until(agent, "both sessions", Duration::from_secs(60), |s| {
            established(s) == 2
                && s.bgp_routes.iter().filter(|r| r.in_data_plane).count() == 2
                && (!bfd || s.bfd.iter().filter(|b| b.state == "up").count() == 2)
        });
    }
    let through_primary = || {
        route_via(&vnet, "192.168.10.0/24", "via 10.0.1.1 ")
            && route_via(&onprem, "10.1.0.0/16", "via 10.0.3.1 ")
    };
    wait_for(
        "both sides routed through the primary",
        Duration::from_secs(30),
        through_primary,
    );
    let flows = both_ways(&lab, 9800, ["VNet to on-prem", "on-prem to VNet"]);
    std::thread::sleep(Duration::from_secs(3));
    let (p, b) = (
        primary.status().reason("forwarded"),
        backup.status().reason("forwarded"),
    );
    assert!(
        p >= 1000 && b < 10,
        "the primary forwards ({p}), the backup not ({b})"
    );
    let moved = primary_dies(&mut primary, [&vnet, &onprem], || {
        route_via(&vnet, "192.168.10.0/24", "via 10.0.6.1 ")
            && route_via(&onprem, "10.1.0.0/16", "via 10.0.5.1 ")
    });
    let (report, gaps) = failover_gaps(flows, &backup);
    let forwarded = backup.status().reason("forwarded");
    assert!(
        forwarded >= b + 1000,
        "the backup's XDP forwards: {forwarded}"
    );
    println!(
        "s2 failover CXP ({}): peers moved to the backup {} ms after the primary died; gap {}",
        if bfd {
            "BFD 200 ms x 3"
        } else {
            "BGP hold time 6 s, no BFD"
        },
        moved.as_millis(),
        report
    );
    if bfd {
        for g in gaps {
            assert!(g <= Duration::from_millis(1500), "gap {g:?} with BFD");
        }
    }

    // The primary comes back: the traffic returns to it, without loss.
    for ns in [&vnet, &onprem] {
        sh(&format!("ip netns exec {ns} nft delete table inet dark"));
    }
    let flows = both_ways(&lab, 9850, ["VNet to on-prem", "on-prem to VNet"]);
    let primary = Agent::start(&lab, &primary_cfg);
    wait_for(
        "both sides back through the primary",
        Duration::from_secs(60),
        through_primary,
    );
    std::thread::sleep(Duration::from_secs(2));
    let mut lost = Vec::new();
    for (way, f) in flows {
        let f = &f.stop()[0];
        lost.push(format!("{way} {} of {}", f.lost(), f.sent));
        assert_eq!(
            f.lost(),
            0,
            "{way}: lost on the way back to the primary (of {}, gap {:?})\n{}",
            f.sent,
            f.longest_gap(),
            primary.log()
        );
    }
    assert!(
        primary.status().reason("forwarded") > 100,
        "the primary forwards again"
    );
    println!(
        "s2 failover CXP: back through the primary, lost {}",
        lost.join(", ")
    );
    hold(
        &lab,
        &backup,
        &format!(
            "the primary is back.\ntry: ip -n {vnet} route; ip -n {onprem} route\n     ip netns exec {vnet} ping -c3 -I 10.1.0.1 192.168.10.1\n     ip netns exec {0} {XNET} bfd --socket {1}",
            cxp2.0,
            backup.socket.display()
        ),
    );
}

/// Scenario 2, the failover CXP toward a VNet's VPN gateway: each CXP has its own tunnel
/// to the gateway with BGP over it, and eBGP over a plain link with the on-prem route
/// server. The backup prepends its AS on both, so the gateway (BIRD, each CXP's routes
/// into that CXP's xfrm interface) and on-prem route through the primary. The primary
/// dies silently; BFD (200 ms × 3: single hop to on-prem, multihop over the tunnel to
/// the gateway) tells both sides, which move to the backup, and the traffic goes on
/// through its tunnel. The gap each way is measured.
#[test]
fn s2_failover_cxp_over_ipsec_to_the_vnet_gateway() {
    if !vm_kernel("s2_failover_cxp_over_ipsec_to_the_vnet_gateway") {
        return;
    }
    let lab = lab("s2i");
    let (vnet, gw) = (lab.ns("vnet1"), lab.ns("onprem"));
    let cxp2 = Netns(lab.ns("cxp2"));
    sh(&format!("ip netns add {}", cxp2.0));
    sh(&format!("ip -n {} link set lo up", cxp2.0));
    link(&cxp2.0, "vnet1", "10.0.6.1", &vnet, "eth1", "10.0.6.2");
    link(&cxp2.0, "onprem", "10.0.5.1", &gw, "eth1", "10.0.5.2");
    let psk = write_psk(&lab);
    // (namespace, session address, link to on-prem, on-prem's address, underlay, gateway's
    // underlay address, prepend)
    let cxps = [
        (
            lab.ns("cxp"),
            "10.255.0.1",
            "10.0.1.2",
            "10.0.3.1",
            "10.0.3.2",
            0,
        ),
        (
            cxp2.0.clone(),
            "10.255.0.2",
            "10.0.6.2",
            "10.0.5.1",
            "10.0.5.2",
            3,
        ),
    ];
    let mut cfgs = Vec::new();
    let mut swanctl = String::new();
    for (k, (ns, me, rs, local, remote, prepend)) in cxps.iter().enumerate() {
        sh(&format!("ip -n {ns} addr add {me}/32 dev lo"));
        // Tunnel traffic is forwarded by the kernel.
        sh(&format!(
            "ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=1"
        ));
        let cfg = format!(
            r#"{}
[bgp]
asn = 65001
router_id = "{me}"
graceful_restart = false

[[bgp.neighbors]]
name = "onprem-rs"
segment = "prod"
address = "{rs}"
remote_asn = 65010
hold_time = 6
advertise = "all"
export = {{ prepend = {prepend} }}
bfd = {{ interval_ms = 200 }}

[[bgp.neighbors]]
name = "vnet-gw"
segment = "prod"
address = "192.168.10.254"
local_address = "{me}"
remote_asn = 65515
hold_time = 6
advertise = "all"
export = {{ prepend = {prepend} }}
bfd = {{ interval_ms = 200 }}

[[ipsec]]
name = "vnet-gw"
segment = "prod"
local_address = "{local}"
remote_address = "{remote}"
psk_file = "{}"
profile = "azure"
local_ts = ["10.1.0.0/16", "{me}/32"]
remote_ts = ["192.168.10.0/24"]
routes = ["192.168.10.254/32"]
interface = "xi-gw"
dpd_seconds = 2
"#,
            PAIR_BASE,
            psk.display()
        );
        // The gateway's side of this CXP's tunnel, into its own xfrm interface.
        swanctl += &route_based_peer(&lab, "onprem", "vnet-gw", &cfg, k + 1);
        cfgs.push(cfg);
    }
    let charon = charon_in(&lab, "onprem", &swanctl);
    // The gateway's BGP speaker: each CXP's session and routes go into that CXP's tunnel
    // (BIRD sets the kernel route's device from the session it came from).
    let _gw_bird = Bird::in_host(
        &lab,
        "onprem",
        "router id 192.168.10.254;
protocol device {}
protocol static vnet { ipv4; route 192.168.10.0/24 blackhole; }
protocol static tunnels { ipv4; route 10.255.0.1/32 via \"xi1\"; route 10.255.0.2/32 via \"xi2\"; }
protocol bfd { multihop { interval 200 ms; multiplier 3; }; }
protocol kernel {
  ipv4 { export filter {
    if proto = \"cxp1\" then ifname = \"xi1\";
    if proto = \"cxp2\" then ifname = \"xi2\";
    if proto = \"cxp1\" || proto = \"cxp2\" || proto = \"tunnels\" then accept;
    reject;
  }; };
}
protocol bgp cxp1 {
  local 192.168.10.254 as 65515; neighbor 10.255.0.1 as 65001; multihop; hold time 6; bfd on;
  ipv4 { import all; export where proto = \"vnet\"; };
}
protocol bgp cxp2 {
  local 192.168.10.254 as 65515; neighbor 10.255.0.2 as 65001; multihop; hold time 6; bfd on;
  ipv4 { import all; export where proto = \"vnet\"; };
}
",
        "192.168.10.254",
    );
    let _rs = Bird::in_host(
        &lab,
        "vnet1",
        &pair_peer(
            65010,
            "10.1.0.0/16",
            ("10.0.1.2", "10.0.1.1"),
            ("10.0.6.2", "10.0.6.1"),
            true,
        ),
        "10.1.0.254",
    );
    let mut primary = Agent::start(&lab, &cfgs[0]);
    let backup = Agent::start_in(&lab, "cxp2", &cfgs[1], &[]);
    for agent in [&primary, &backup] {
        wait_until(
            agent,
            "the tunnel, both sessions",
            Duration::from_secs(120),
            |s| {
                s.ipsec
                    .first()
                    .is_some_and(|t| t.state == "established" && !t.children.is_empty())
                    && established(s) == 2
                    && s.bfd.iter().filter(|b| b.state == "up").count() == 2
            },
        );
    }
    wait_for(
        "both sides routed through the primary",
        Duration::from_secs(60),
        || {
            route_via(&vnet, "192.168.10.0/24", "via 10.0.1.1 ")
                && route_via(&gw, "10.1.0.0/16", "dev xi1 ")
        },
    );
    // Here `onprem` is the VNet's gateway and `vnet1` on-prem.
    let flows = both_ways(&lab, 9900, ["on-prem to VNet", "VNet to on-prem"]);
    std::thread::sleep(Duration::from_secs(3));
    // The gateway's underlay toward the primary and the on-prem link go dark.
    let moved = primary_dies(&mut primary, [&vnet, &gw], || {
        route_via(&vnet, "192.168.10.0/24", "via 10.0.6.1 ")
            && route_via(&gw, "10.1.0.0/16", "dev xi2 ")
    });
    let (report, gaps) = failover_gaps(flows, &backup);
    println!(
        "s2 failover CXP over IPsec (BFD 200 ms x 3, multihop over the tunnel): peers moved to the backup {} ms after the primary died; gap {}",
        moved.as_millis(),
        report
    );
    for g in gaps {
        assert!(g <= Duration::from_millis(1500), "gap {g:?} with BFD");
    }
    hold(
        &lab,
        &backup,
        &format!(
            "the primary is dead; the backup ({0}) carries the VNet's traffic in its tunnel.\ntry: ip -n {gw} route; ip -n {vnet} route\n     ip netns exec {vnet} ping -c3 -I 10.1.0.1 192.168.10.1",
            cxp2.0
        ),
    );
    drop(charon);
}

/// The CXP's connector to the gateway in the rekey scenarios: policy-based, PFS with
/// ECP-384, CHILD SAs rekeyed after `child_lifetime` seconds.
fn rekey_config(lab: &Lab, child_lifetime: u64) -> String {
    format!(
        r#"{}
[[ipsec]]
name = "gw"
segment = "prod"
local_address = "10.0.3.1"
remote_address = "10.0.3.2"
psk_file = "{}"
ike_proposals = ["aes256gcm16-prfsha384-ecp384"]
esp_proposals = ["aes256gcm16-ecp384"]
local_ts = ["10.1.0.0/16"]
remote_ts = ["192.168.10.0/24"]
child_lifetime = {child_lifetime}
dpd_seconds = 5
"#,
        without_onprem_route(),
        write_psk(lab).display()
    )
}

/// Lines of `log` that contain every one of `words`.
fn lines_with(log: &str, words: &[&str]) -> usize {
    log.lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .count()
}

/// Stops steady flows; prints and returns (lost, sent) over all of them.
fn losses(what: &str, flows: Vec<(&str, Flows)>) -> (u64, u64) {
    let (mut lost, mut sent) = (0, 0);
    // Wall-clock times of the gaps, to read beside the agent's and charon's logs.
    let (now, wall) = (std::time::Instant::now(), std::time::SystemTime::now());
    let at = |t: std::time::Instant| {
        let d = (wall - (now - t))
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        format!(
            "{:02}:{:02}:{:02}.{:03}",
            d.as_secs() / 3600 % 24,
            d.as_secs() / 60 % 60,
            d.as_secs() % 60,
            d.subsec_millis()
        )
    };
    for (name, f) in flows {
        for f in f.stop() {
            let gaps: Vec<String> = f
                .arrivals
                .windows(2)
                .filter(|w| w[1] - w[0] > Duration::from_millis(30))
                .map(|w| format!("{} +{:?}", at(w[0]), w[1] - w[0]))
                .collect();
            eprintln!(
                "{what}: {name}: {} of {} datagrams lost, longest gap {:?}; gaps over 30 ms: {gaps:?}",
                f.lost(),
                f.sent,
                f.longest_gap()
            );
            lost += f.lost();
            sent += f.sent;
        }
    }
    (lost, sent)
}

/// IPsec rekeys under steady traffic against strongSwan with PFS (its ESP proposals
/// with ECP-384, as `peer-config` writes them): the first CHILD SA comes up in IKE_AUTH
/// without a D-H transform (RFC 7296 §1.2), strongSwan adds a second CHILD SA (its own
/// half of the on-prem /24), the agent rekeys both with KE payloads, strongSwan rekeys
/// one. Datagrams both ways across all of it: none lost.
#[test]
fn s7_pfs_rekeys_both_ways_and_a_second_child_sa_under_traffic() {
    if !vm_kernel("s7_pfs_rekeys_both_ways_and_a_second_child_sa_under_traffic") {
        return;
    }
    let lab = lab("s7");
    slow_path_on(&lab);
    let gw_ns = lab.ns("onprem");
    sh(&format!("ip -n {gw_ns} addr add 192.168.10.129/32 dev lo"));
    let cfg = rekey_config(&lab, 8);
    let conf = peer_config_of(&lab, "gw", &cfg);
    assert!(
        conf.contains("esp_proposals = aes256gcm16-ecp384"),
        "{conf}"
    );
    // The gateway's on-prem /24 as two CHILD SAs, one per half.
    let conf = conf
        .replace(
            "      xnet-gw {\n        local_ts = 192.168.10.0/24",
            "      xnet-gw {\n        local_ts = 192.168.10.0/25",
        )
        .replace(
            "        dpd_action = restart\n      }\n",
            "        dpd_action = restart\n      }\n      second {\n        local_ts = 192.168.10.128/25\n        remote_ts = 10.1.0.0/16\n        esp_proposals = aes256gcm16-ecp384\n      }\n",
        );
    assert!(conf.contains("second {"), "{conf}");
    let charon = charon_in(&lab, "onprem", &conf);
    let agent = Agent::start(&lab, &cfg);
    let children = |s: &xnet_user::status::Status| {
        s.ipsec
            .first()
            .filter(|t| t.state == "established")
            .map(|t| t.children.len())
            .unwrap_or(0)
    };
    wait_until(&agent, "the tunnel", Duration::from_secs(90), |s| {
        children(s) == 1
    });
    if let Err(e) = charon.swanctl("--initiate --child second") {
        panic!("{e}\n{}\n{}", charon.log(), agent.log());
    }
    wait_until(
        &agent,
        "strongSwan's second CHILD SA",
        Duration::from_secs(30),
        |s| children(s) == 2,
    );
    let t0 = std::time::Instant::now();
    let mut flows: Vec<(&str, Flows)> =
        both_ways(&lab, 7100, ["vnet→onprem", "onprem→vnet"]).into();
    flows.push((
        "vnet→onprem (second CHILD SA)",
        Flows::start(
            &lab,
            ("vnet1", "10.1.0.1"),
            ("onprem", "192.168.10.129:7150"),
            1,
            7250,
        ),
    ));
    // The agent rekeys both after 8 s; strongSwan rekeys one in between; the agent again.
    std::thread::sleep(Duration::from_secs(12).saturating_sub(t0.elapsed()));
    charon.swanctl("--rekey --child xnet-gw").unwrap();
    std::thread::sleep(Duration::from_secs(22).saturating_sub(t0.elapsed()));
    let (lost, sent) = losses("s7", flows);
    let log = charon.log();
    let by_agent = lines_with(
        &log,
        &["parsed CREATE_CHILD_SA request", "N(REKEY_SA)", "KE"],
    );
    let by_charon = lines_with(&log, &["parsed CREATE_CHILD_SA response", "KE"]);
    eprintln!("s7: PFS rekeys: {by_agent} by the agent, {by_charon} by strongSwan; {lost} of {sent} datagrams lost");
    assert!(
        by_agent >= 2,
        "the agent rekeyed both CHILD SAs with KE: {log}"
    );
    assert!(
        by_charon >= 1,
        "strongSwan rekeyed with KE, we answered with ours: {log}"
    );
    assert_eq!(lines_with(&log, &["N(NO_PROP)"]), 0, "{log}");
    assert!(!agent.log().contains("refused"), "{}", agent.log());
    let s = agent.status();
    assert_eq!(children(&s), 2, "{s:?}");
    let sas = charon.swanctl("--list-sas").unwrap();
    assert_eq!(sas.matches("INSTALLED").count(), 2, "{sas}");
    assert!(
        sas.contains("AES_GCM_16-256/ECP_384"),
        "rekeyed with PFS: {sas}"
    );
    assert!(
        !agent.log().contains("File exists"),
        "policies updated, not re-added: {}",
        agent.log()
    );
    assert_eq!(
        lost,
        0,
        "datagrams lost across the rekeys: {}\n{}",
        agent.log(),
        charon.log()
    );
}

/// A gateway without PFS refuses the agent's PFS rekeys: the agent asks again with
/// back-off (not every tick), then for a fresh CHILD SA, then reauthenticates (a new IKE
/// SA beside the old, which goes once the new one carries traffic), long before the
/// kernel's hard lifetime. `xnet ipsec` says why meanwhile; traffic both ways loses
/// nothing.
#[test]
fn s7_refused_rekeys_back_off_and_reauthenticate_under_traffic() {
    if !vm_kernel("s7_refused_rekeys_back_off_and_reauthenticate_under_traffic") {
        return;
    }
    let lab = lab("s7r");
    slow_path_on(&lab);
    let cfg = rekey_config(&lab, 4);
    let conf = peer_config_of(&lab, "gw", &cfg).replace(
        "esp_proposals = aes256gcm16-ecp384",
        "esp_proposals = aes256gcm16",
    );
    let charon = charon_in(&lab, "onprem", &conf);
    let agent = Agent::start(&lab, &cfg);
    wait_until(&agent, "the tunnel", Duration::from_secs(90), |s| {
        s.ipsec
            .first()
            .is_some_and(|t| t.state == "established" && t.children.len() == 1)
    });
    let flows: Vec<(&str, Flows)> = both_ways(&lab, 7300, ["vnet→onprem", "onprem→vnet"]).into();
    wait_until(
        &agent,
        "the refusal shown in xnet ipsec",
        Duration::from_secs(20),
        |s| {
            s.ipsec[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("refused by the peer: NO_PROPOSAL_CHOSEN"))
        },
    );
    wait_until(&agent, "reauthentication", Duration::from_secs(60), |_| {
        agent.log().contains("reauthenticated: the old IKE SA")
    });
    std::thread::sleep(Duration::from_secs(2));
    let (lost, sent) = losses("s7r", flows);
    let log = charon.log();
    // Counted up to the new IKE SA (whose CHILD SA meets the same refusals in turn).
    let first = log.split("IKE_AUTH request 1").nth(1).unwrap_or_default();
    let refusals = lines_with(
        first,
        &["generating CREATE_CHILD_SA response", "N(NO_PROP)"],
    );
    let agent_log = agent.log();
    let before = agent_log
        .split("reauthenticated")
        .next()
        .unwrap_or_default();
    let warns = lines_with(before, &["WARN", "refused by the peer"]);
    eprintln!("s7r: {refusals} refusals before reauthenticating, {warns} WARN lines; {lost} of {sent} datagrams lost");
    assert_eq!(
        refusals, 4,
        "three rekeys and a fresh CHILD SA, then reauthentication: {log}"
    );
    assert!(
        warns <= 2,
        "one WARN for the rekey, one for the fresh CHILD SA: {agent_log}"
    );
    let s = agent.status();
    assert_eq!(s.ipsec[0].children.len(), 1, "{s:?}");
    let sas = charon.swanctl("--list-sas").unwrap();
    assert_eq!(
        sas.matches("ESTABLISHED").count(),
        1,
        "the old IKE SA deleted: {sas}"
    );
    // The refused rekeys lose nothing (the old CHILD SA carries on), nor does the
    // reauthentication: the new CHILD SA's inbound SA is in before IKE_AUTH goes out.
    assert_eq!(
        lost,
        0,
        "datagrams lost across the refusals and the reauthentication: {}\n{}",
        agent.log(),
        charon.log()
    );
}

/// A CHILD SA whose SAs the kernel no longer has (here deleted by hand, as a hard
/// lifetime would) is not shown as installed: the agent says so at WARN, tells the
/// gateway, re-creates the CHILD SA (it starts the connector) and traffic flows again.
#[test]
fn s7_a_child_sa_gone_from_the_kernel_is_noticed_and_comes_back() {
    if !vm_kernel("s7_a_child_sa_gone_from_the_kernel_is_noticed_and_comes_back") {
        return;
    }
    let lab = lab("s7x");
    slow_path_on(&lab);
    let cfg = rekey_config(&lab, 3600);
    let charon = charon_in(&lab, "onprem", &peer_config_of(&lab, "gw", &cfg));
    let agent = Agent::start(&lab, &cfg);
    let child = |s: &xnet_user::status::Status| {
        s.ipsec
            .first()
            .filter(|t| t.state == "established")
            .and_then(|t| t.children.first().cloned())
    };
    wait_until(&agent, "the tunnel", Duration::from_secs(90), |s| {
        child(s).is_some()
    });
    let old = child(&agent.status()).unwrap();
    assert_eq!(vnet1_to_onprem(&lab, 10), 10);
    sh(&format!(
        "ip -n {} xfrm state delete src 10.0.3.2 dst 10.0.3.1 proto esp spi {}",
        lab.ns("cxp"),
        old.spi_in
    ));
    wait_until(&agent, "a new CHILD SA", Duration::from_secs(30), |s| {
        child(s).is_some_and(|c| c.spi_in != old.spi_in && c.installed)
    });
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "WARN  xnet_user::ike::daemon] ipsec gw: CHILD SA {} expired in the kernel",
            old.spi_in
        )),
        "{log}"
    );
    assert!(
        charon.log().contains("received DELETE for ESP CHILD_SA"),
        "the gateway was told: {}",
        charon.log()
    );
    assert_eq!(vnet1_to_onprem(&lab, 10), 10, "traffic again");
}

/// Scenario 8's policies: on-prem (behind the IPsec connector) ⇄ vnet1 (a plain link)
/// steered through `fw` (`FIREWALL_SERVICE`); one UDP port from on-prem denied.
const TUNNEL_POLICIES: &str = r#"
[[policies]]
name = "onprem-deny-7777"
segment = "prod"
source = "192.168.0.0/16"
destination = "10.1.0.0/16"
protocol = "udp"
destination_ports = "7777"
action = "deny"

[[policies]]
name = "onprem-deny-7777-v6"
segment = "prod"
source = "fd03::/48"
destination = "fd01::/48"
protocol = "udp"
destination_ports = "7777"
action = "deny"

[[policies]]
name = "vnet-to-onprem"
segment = "prod"
source = "10.1.0.0/16"
destination = "192.168.0.0/16"
protocol = "udp"
action = "steer"
service = "fw"

[[policies]]
name = "onprem-to-vnet"
segment = "prod"
source = "192.168.0.0/16"
destination = "10.1.0.0/16"
protocol = "udp"
action = "steer"
service = "fw"
"#;

/// Scenario 8: policy on traffic that comes out of an IPsec tunnel. On-prem sits behind a
/// connector (charon configured by `peer-config`), vnet1 behind a plain link; a steer
/// policy each way between them, two firewall namespaces with nftables counters. A flow
/// and its reverse cross one instance both ways (the direction out of the tunnel is
/// steered too); a deny policy drops tunnel traffic and counts it; killing the instance
/// moves the flow. Route-based (xfrm interface) and policy-based connectors.
fn tunnel_traffic_meets_policy(name: &str, route_based: bool) {
    if !vm_kernel(name) {
        return;
    }
    let lab = Lab::create_with_firewalls(&format!("xt{}-s8", std::process::id()), 2).expect("lab");
    let psk = cxp_with_tunnels(&lab);
    let cfg = format!(
        r#"{}
{FIREWALL_SERVICE}
{TUNNEL_POLICIES}
[[ipsec]]
name = "onprem-gw"
segment = "prod"
local_address = "10.0.3.1"
remote_address = "10.0.3.2"
psk_file = "{}"
profile = "azure"
dpd_seconds = 5
{}
"#,
        // On-prem's IPv6 prefix is behind the tunnel too.
        without_onprem_route().replace(
            "[[routes]]\nsegment = \"prod\"\nprefix = \"fd03::/48\"\nnext_hops = [{ via = \"fd00:3::2\", interface = \"onprem\" }]\n",
            "",
        ),
        psk.display(),
        if route_based {
            // IPv6 inside too (one CHILD SA for both families).
            "local_ts = [\"10.1.0.0/16\", \"fd01::/48\"]\nremote_ts = [\"192.168.10.0/24\", \"fd03::/48\"]\ninterface = \"xi-onprem\""
        } else {
            "local_ts = [\"10.1.0.0/16\"]\nremote_ts = [\"192.168.10.0/24\"]"
        }
    );
    let charon = gateway(&lab, "onprem", "onprem-gw", &cfg);
    let agent = Agent::start(&lab, &cfg);
    wait_until(
        &agent,
        "the tunnel up and both firewall instances healthy",
        Duration::from_secs(90),
        |s| {
            s.ipsec
                .first()
                .is_some_and(|t| t.state == "established" && !t.children.is_empty())
                && healthy_instances(s) == 2
        },
    );
    // A flow into the tunnel, then its reverse out of it (same addresses, ports swapped).
    let sent =
        |from: &str, src: &str, to: &str, dst: &str, n: usize| udp(&lab, from, src, to, dst, n);
    assert_eq!(
        sent("vnet1", "10.1.0.1:5000", "onprem", "192.168.10.1:9000", 100),
        100,
        "vnet1 → on-prem: {}",
        charon.log()
    );
    assert_eq!(
        sent("onprem", "192.168.10.1:9000", "vnet1", "10.1.0.1:5000", 100),
        100,
        "on-prem → vnet1 out of the tunnel"
    );
    let c = firewall_counts(&lab);
    let (used, idle) = if c[0].0 > 0 { (0, 1) } else { (1, 0) };
    assert!(
        c[used].0 >= 100 && c[used].1 >= 100,
        "both directions crossed fw{}: {c:?}",
        used + 1
    );
    assert_eq!(c[idle], (0, 0), "the other instance saw none of it: {c:?}");
    let s = agent.status();
    let hits = |s: &xnet_user::status::Status, p: &str| {
        s.policies.iter().find(|x| x.name == p).unwrap().packets
    };
    assert!(
        hits(&s, "onprem-to-vnet") >= 100,
        "the tunnel's packets counted on their rule: {:?}",
        s.policies
    );

    // A deny policy holds for tunnel traffic, and counts it.
    let denied = s.reason("drop_policy");
    assert_eq!(
        sent("onprem", "192.168.10.1:9001", "vnet1", "10.1.0.1:7777", 20),
        0,
        "denied port from the tunnel"
    );
    let s = agent.status();
    assert!(hits(&s, "onprem-deny-7777") >= 20, "{:?}", s.policies);
    assert!(s.reason("drop_policy") - denied >= 20);
    let out = std::process::Command::new(XNET)
        .args(["policy", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("onprem-deny-7777"), "{shown}");
    eprintln!("xnet policy:\n{shown}");

    if route_based {
        // IPv6 out of the tunnel: routed (no policy steers it), and denied on the port.
        assert_eq!(
            sent("onprem", "[fd03::1]:9002", "vnet1", "[fd01::1]:5002", 50),
            50,
            "IPv6 on-prem → vnet1 out of the tunnel: reasons {:?}\nCXP: {}\ngateway: {}\n{}",
            agent.status().reasons,
            sh(&format!("ip -n {0} xfrm policy; ip -n {0} -6 route show table 100; ip -n {0} -6 neigh; ip -n {0} -s link show xi-onprem", lab.ns("cxp"))),
            sh(&format!("ip -n {0} xfrm policy; ip -n {0} -6 route; ip -n {0} -s xfrm state", lab.ns("onprem"))),
            agent.log()
        );
        let before = agent.status().reason("drop_policy");
        assert_eq!(
            sent("onprem", "[fd03::1]:9003", "vnet1", "[fd01::1]:7777", 20),
            0,
            "IPv6 denied port from the tunnel"
        );
        assert!(agent.status().reason("drop_policy") - before >= 20);
    }

    // The instance carrying the flow dies: the flow, both ways, moves to the other one.
    sh(&format!(
        "ip -n {} link set eth0 down",
        lab.ns(&format!("fw{}", used + 1))
    ));
    wait_until(
        &agent,
        "the dead instance out of the pool",
        Duration::from_secs(5),
        |s| healthy_instances(s) == 1,
    );
    assert_eq!(
        sent("onprem", "192.168.10.1:9000", "vnet1", "10.1.0.1:5000", 100),
        100,
        "on-prem → vnet1 after the failover"
    );
    assert_eq!(
        sent("vnet1", "10.1.0.1:5000", "onprem", "192.168.10.1:9000", 100),
        100,
        "vnet1 → on-prem after the failover"
    );
    let c2 = firewall_counts(&lab);
    assert!(
        c2[idle].0 >= 100 && c2[idle].1 >= 100,
        "the flow moved to fw{} both ways: {c2:?}",
        idle + 1
    );
    hold(
        &lab,
        &agent,
        &format!(
            "try: ip netns exec {p}-fw1 nft list ruleset; ip netns exec {p}-cxp tc filter show dev onprem ingress",
            p = lab.prefix
        ),
    );
}

#[test]
fn s8_traffic_out_of_a_route_based_tunnel_meets_policy() {
    tunnel_traffic_meets_policy("s8_traffic_out_of_a_route_based_tunnel_meets_policy", true);
}

#[test]
fn s8_traffic_out_of_a_policy_based_tunnel_meets_policy() {
    tunnel_traffic_meets_policy(
        "s8_traffic_out_of_a_policy_based_tunnel_meets_policy",
        false,
    );
}
