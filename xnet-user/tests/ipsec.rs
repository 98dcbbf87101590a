//! IKEv2 against a real peer: strongSwan's charon in the lab's on-prem namespace, the
//! agent in cxp, the peer configured by `xnet peer-config --format strongswan` as is.
//!
//! This host's kernel has no ESP, so charon does ESP in userspace (kernel-libipsec, which
//! only knows ESP in UDP: the connectors force NAT-T encapsulation) and the agent's SAs
//! cannot enter XFRM. What is checked is what IKE decides: both sides
//! agree on SPIs, algorithms and keys (charon logs its keys at level 4; the agent writes
//! its own to XNET_IKE_KEYLOG), and the agent's XFRM policies are in the kernel. The
//! encrypted data path is tested in the VM (vm-tests).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use xnet_lab::charon::Charon;
use xnet_lab::lab::Lab;
use xnet_lab::testkit::*;
use xnet_user::status::{IpsecStatus, Status};

/// strongswan.conf settings of the test peers: quick retransmissions, userspace ESP.
const SETTINGS: &str = "  port = 500\n  port_nat_t = 4500\n  install_routes = no\n  retransmit_timeout = 1\n  retransmit_tries = 3\n  load = random nonce aes sha1 sha2 hmac gcm curve25519 openssl pem pkcs1 x509 pubkey kdf kernel-libipsec kernel-netlink socket-default vici";
/// CHILD SA keys at level 4, to compare them with the agent's.
const LOG_LEVELS: &str = "      default = 1\n      ike = 2\n      chd = 4\n      cfg = 2";

/// charon in namespace `ns` with `swanctl_conf` loaded.
fn charon_in(lab: &Lab, ns: &str, swanctl_conf: &str) -> Charon {
    let dir = std::env::temp_dir().join(format!("{}-charon", lab.prefix));
    let c = Charon::start(ns, dir, SETTINGS, LOG_LEVELS, swanctl_conf).unwrap();
    c.load("--load-all").unwrap();
    c
}

/// charon in the on-prem namespace.
fn charon(lab: &Lab, swanctl_conf: &str) -> Charon {
    charon_in(lab, &lab.ns("onprem"), swanctl_conf)
}

/// The hexdump charon logged last after `label` (e.g. "encryption initiator key").
fn key(charon: &Charon, label: &str) -> String {
    let log = charon.log();
    let lines: Vec<&str> = log.lines().collect();
    let at = lines
        .iter()
        .rposition(|l| l.contains(&format!("{label} =>")))
        .unwrap_or_else(|| panic!("charon logged no {label}: {log}"));
    let mut hex = String::new();
    for l in &lines[at + 1..] {
        // "13[CHD]    0: 01 02 …  ascii": thread and group, an offset, a colon, up to
        // 16 hex pairs.
        let l = l.split_once(']').map(|(_, r)| r).unwrap_or(l);
        let Some((off, rest)) = l.split_once(": ") else {
            break;
        };
        if off.trim().parse::<usize>().is_err() {
            break;
        }
        for w in rest.split_whitespace().take(16) {
            if w.len() == 2 && w.chars().all(|c| c.is_ascii_hexdigit()) {
                hex.push_str(&w.to_lowercase());
            } else {
                break;
            }
        }
    }
    hex
}

const PSK: &str = "xnet-interop-test-key-0123456789";

fn agent_config(lab: &Lab, initiate: bool, ike: &[&str], esp: &[&str]) -> (String, PathBuf) {
    agent_config_with(lab, initiate, ike, esp, "")
}

/// `agent_config` with more lines for the connector.
fn agent_config_with(
    lab: &Lab,
    initiate: bool,
    ike: &[&str],
    esp: &[&str],
    extra: &str,
) -> (String, PathBuf) {
    let dir = std::env::temp_dir().join(&lab.prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let psk = dir.join("onprem.psk");
    std::fs::write(&psk, format!("{PSK}\n")).unwrap();
    let list = |v: &[&str]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let cfg = format!(
        r#"{}
[[ipsec]]
name = "onprem-vpn"
segment = "prod"
local_address = "10.0.3.1"
remote_address = "10.0.3.2"
psk_file = "{}"
initiate = {initiate}
ike_proposals = [{}]
esp_proposals = [{}]
local_ts = ["10.1.0.0/16"]
remote_ts = ["192.168.10.0/24"]
dpd_seconds = 2
force_encap = true
{extra}
"#,
        xnet_lab::lab::DEMO_CONFIG,
        psk.display(),
        list(ike),
        list(esp)
    );
    (cfg, dir.join("ike.keys"))
}

/// charon configured from the agent's config before the agent starts, so the agent's
/// first IKE_SA_INIT finds it.
fn charon_before_agent(lab: &Lab, cfg: &str) -> Charon {
    let path = std::env::temp_dir().join(&lab.prefix).join("pre.toml");
    std::fs::write(&path, cfg).unwrap();
    charon(lab, &peer_config("onprem-vpn", &path))
}

fn tunnel(s: &Status) -> IpsecStatus {
    s.ipsec.first().cloned().expect("one connector")
}

fn up(s: &Status) -> bool {
    let t = tunnel(s);
    t.state == "established" && t.children.len() == 1
}

/// The agent's logged ESP key for the SA with `spi`: (encryption, integrity).
fn keylog(path: &PathBuf, spi: &str) -> (String, String) {
    let text = std::fs::read_to_string(path).unwrap();
    let line = text
        .lines()
        .rev()
        .find(|l| l.split_whitespace().nth(3) == Some(spi))
        .unwrap_or_else(|| panic!("no key logged for {spi}: {text}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    let strip = |s: &str| s.trim_start_matches("0x").replace('-', "");
    (strip(f[5]), strip(f[6]))
}

/// Checks that charon and the agent agree on the CHILD SA: SPIs, algorithms, keys.
fn same_child_sa(
    agent: &Agent,
    charon: &Charon,
    keys: &PathBuf,
    agent_initiated: bool,
    esp_name: &str,
) {
    let t = tunnel(&agent.status());
    let c = &t.children[0];
    let sas = charon.swanctl("--list-sas").unwrap();
    assert!(
        sas.contains("ESTABLISHED") && sas.contains("INSTALLED"),
        "{sas}"
    );
    assert!(
        sas.contains(esp_name),
        "charon's ESP proposal {esp_name}: {sas}"
    );
    // charon's inbound SPI is our outbound one and the other way round.
    let spi = |s: &str| s.trim_start_matches("0x").to_string();
    assert!(
        sas.contains(&format!("in  {}", spi(&c.spi_out))),
        "{c:?}\n{sas}"
    );
    assert!(
        sas.contains(&format!("out {}", spi(&c.spi_in))),
        "{c:?}\n{sas}"
    );
    // Keys: initiator-to-responder first (RFC 7296 §2.17).
    let (out_e, out_a) = keylog(keys, &c.spi_out);
    let (in_e, in_a) = keylog(keys, &c.spi_in);
    let (mine, theirs) = if agent_initiated {
        ("initiator", "responder")
    } else {
        ("responder", "initiator")
    };
    assert_eq!(out_e, key(charon, &format!("encryption {mine} key")));
    assert_eq!(in_e, key(charon, &format!("encryption {theirs} key")));
    if !out_a.is_empty() {
        assert_eq!(out_a, key(charon, &format!("integrity {mine} key")));
        assert_eq!(in_a, key(charon, &format!("integrity {theirs} key")));
    }
}

#[test]
fn agent_initiates_to_strongswan_then_deletes_both_ways() {
    if !require_root("agent_initiates_to_strongswan_then_deletes_both_ways") {
        return;
    }
    let lab = lab("ike-i");
    let (cfg, keys) = agent_config(
        &lab,
        true,
        &["aes256gcm16-prfsha384-ecp384"],
        &["aes256gcm16"],
    );
    // The peer's config comes from the agent's; charon first, so the first try lands.
    let charon = charon_before_agent(&lab, &cfg);
    let agent = Agent::start_with_env(&lab, &cfg, &[("XNET_IKE_KEYLOG", keys.to_str().unwrap())]);
    wait_until(
        &agent,
        "IKE SA and CHILD SA up",
        Duration::from_secs(20),
        up,
    );
    let t = tunnel(&agent.status());
    assert_eq!(
        t.ike_proposal.as_deref(),
        Some("aes256gcm16-prfsha384-ecp384")
    );
    assert!(charon
        .swanctl("--list-sas")
        .unwrap()
        .contains("AES_GCM_16-256/PRF_HMAC_SHA2_384/ECP_384"));
    same_child_sa(&agent, &charon, &keys, true, "AES_GCM_16-256");
    // The kernel has the agent's policies (its SAs need ESP, which this kernel lacks).
    let pol = sh(&format!("ip -n {} xfrm policy", lab.ns("cxp")));
    assert!(pol.contains("src 10.1.0.0/16 dst 192.168.10.0/24"), "{pol}");
    assert!(pol.contains("tmpl src 10.0.3.1 dst 10.0.3.2"), "{pol}");
    assert!(pol.contains("src 192.168.10.0/24 dst 10.1.0.0/16"), "{pol}");
    // The tunnel is a route source: its remote prefix goes to the kernel from XDP (whose
    // XFRM policy encrypts) and the segment's table points at the tunnel endpoint.
    let t100 = sh(&format!("ip -n {} route show table 100", lab.ns("cxp")));
    assert!(
        t100.contains("192.168.10.0/24 via 10.0.3.2 dev onprem proto 250"),
        "{t100}"
    );
    let before = agent.status().reason("pass_tunnel");
    udp(
        &lab,
        "vnet1",
        "10.1.0.1:5300",
        "onprem",
        "192.168.10.1:9300",
        10,
    );
    assert!(
        agent.status().reason("pass_tunnel") >= before + 10,
        "XDP passes tunnel traffic"
    );

    // DELETE from strongSwan: the agent drops the SAs and (an initiator) starts again.
    charon.swanctl("--terminate --ike xnet-onprem-vpn").unwrap();
    wait_until(
        &agent,
        "agent saw the DELETE",
        Duration::from_secs(10),
        |_| agent.log().contains("IKE SA closed: deleted by the peer"),
    );
    wait_until(&agent, "re-established", Duration::from_secs(20), up);

    // DELETE from the agent: a clean stop tells charon.
    let mut agent = agent;
    assert!(agent.stop().success());
    let t = Instant::now();
    while charon
        .swanctl("--list-sas")
        .unwrap()
        .contains("ESTABLISHED")
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "charon kept the SA: {}",
            charon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        charon.log().contains("received DELETE for IKE_SA"),
        "{}",
        charon.log()
    );
    let pol = sh(&format!("ip -n {} xfrm policy", lab.ns("cxp")));
    assert!(!pol.contains("10.1.0.0/16"), "policies removed: {pol}");
    let t100 = sh(&format!("ip -n {} route show table 100", lab.ns("cxp")));
    assert!(
        !t100.contains("192.168.10.0/24"),
        "tunnel route removed: {t100}"
    );
}

/// A route-based connector: on a kernel with xfrm interfaces (the VM's), the agent makes
/// one, binds the SAs and policies to its if_id, routes the tunnel's prefixes into it and
/// routes what comes out of it in the segment; with ESP too, traffic crosses the tunnel.
/// This host's kernel has neither: the connector falls back to policy-based, said in the
/// log, and is otherwise the same tunnel.
#[test]
fn route_based_connector_uses_an_xfrm_interface_where_the_kernel_has_them() {
    if !require_root("route_based_connector_uses_an_xfrm_interface_where_the_kernel_has_them") {
        return;
    }
    let (xfrmi, esp) = (kernel_has_xfrm_interfaces(), kernel_has_esp());
    eprintln!("kernel: xfrm interfaces {xfrmi}, ESP {esp}");
    let lab = lab("ike-rb");
    let (cfg, _) = agent_config_with(
        &lab,
        true,
        &["aes256gcm16-prfsha384-ecp384"],
        &["aes256gcm16"],
        "interface = \"xi-onprem\"",
    );
    let charon = charon_before_agent(&lab, &cfg);
    let mut agent = Agent::start(&lab, &cfg);
    wait_until(
        &agent,
        "IKE SA and CHILD SA up",
        Duration::from_secs(20),
        up,
    );
    let cxp = lab.ns("cxp");
    let pol = sh(&format!("ip -n {cxp} xfrm policy"));
    let t100 = sh(&format!("ip -n {cxp} route show table 100"));
    if xfrmi {
        let link = sh(&format!("ip -n {cxp} -d link show xi-onprem"));
        assert!(link.contains("if_id 0x100"), "{link}");
        assert!(pol.contains("if_id 0x100"), "{pol}");
        assert!(
            t100.contains("192.168.10.0/24 dev xi-onprem proto 250"),
            "{t100}"
        );
        let rules = sh(&format!("ip -n {cxp} rule"));
        assert!(rules.contains("iif xi-onprem lookup 100"), "{rules}");
        if esp {
            let st = sh(&format!("ip -n {cxp} xfrm state"));
            assert!(st.contains("if_id 0x100"), "{st}");
            // Through the tunnel: XDP passes it, the kernel forwards it (the slow path:
            // forwarding on, as on any CXP host; the lab leaves it off to prove XDP), the
            // route picks the xfrm interface, ESP in UDP to charon, which decrypts into
            // the on-prem host.
            sh(&format!(
                "ip netns exec {cxp} sysctl -qw net.ipv4.ip_forward=1"
            ));
            assert_eq!(
                udp(
                    &lab,
                    "vnet1",
                    "10.1.0.1:5310",
                    "onprem",
                    "192.168.10.1:9310",
                    20
                ),
                20,
                "{}",
                charon.log()
            );
        }
    } else {
        assert!(
            agent
                .log()
                .contains("ipsec onprem-vpn: this kernel has no xfrm interfaces"),
            "{}",
            agent.log()
        );
        assert!(agent.log().contains("policy-based instead"));
        assert!(!pol.contains("if_id"), "{pol}");
        assert!(pol.contains("src 10.1.0.0/16 dst 192.168.10.0/24"), "{pol}");
        assert!(
            t100.contains("192.168.10.0/24 via 10.0.3.2 dev onprem proto 250"),
            "{t100}"
        );
    }
    assert!(agent.stop().success());
    let links = sh(&format!("ip -n {cxp} link"));
    assert!(!links.contains("xi-onprem"), "removed at stop: {links}");
    let rules = sh(&format!("ip -n {cxp} rule"));
    assert!(!rules.contains("xi-onprem"), "{rules}");
}

#[test]
fn strongswan_initiates_proposals_and_dpd_finds_it_dead() {
    if !require_root("strongswan_initiates_proposals_and_dpd_finds_it_dead") {
        return;
    }
    let lab = lab("ike-r");
    let (cfg, keys) = agent_config(
        &lab,
        false,
        &["aes128-sha256-modp2048", "aes256-sha512-curve25519"],
        &["aes128-sha256", "aes256-sha512"],
    );
    // Cookies always (threshold 0): charon must come back with one (RFC 7296 §2.6).
    let cfg = cfg.replacen("[agent]\n", "[agent]\nike_cookie_threshold = 0\n", 1);
    let agent = Agent::start_with_env(&lab, &cfg, &[("XNET_IKE_KEYLOG", keys.to_str().unwrap())]);
    // The agent does not initiate: charon does (start_action = start), offering both.
    let conf = peer_config("onprem-vpn", &agent.config);
    assert!(conf.contains("start_action = start"), "{conf}");
    let charon = charon(&lab, &conf);
    wait_until(&agent, "charon's IKE SA up", Duration::from_secs(20), up);
    assert!(
        agent.log().contains("asking initiators for cookies"),
        "{}",
        agent.log()
    );
    assert!(charon.log().contains("received COOKIE"), "{}", charon.log());
    assert_eq!(
        tunnel(&agent.status()).ike_proposal.as_deref(),
        Some("aes128-sha256-prfsha256-modp2048")
    );
    assert!(charon
        .swanctl("--list-sas")
        .unwrap()
        .contains("AES_CBC-128/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/MODP_2048"));
    same_child_sa(
        &agent,
        &charon,
        &keys,
        false,
        "AES_CBC-128/HMAC_SHA2_256_128",
    );

    // charon rekeys the CHILD SA, then the IKE SA: the agent follows, the tunnel stays.
    let before = tunnel(&agent.status()).children[0].clone();
    charon.swanctl("--rekey --child xnet-onprem-vpn").unwrap();
    wait_until(
        &agent,
        "CHILD SA rekeyed by charon",
        Duration::from_secs(10),
        |s| up(s) && tunnel(s).children[0].spi_in != before.spi_in,
    );
    same_child_sa(
        &agent,
        &charon,
        &keys,
        false,
        "AES_CBC-128/HMAC_SHA2_256_128",
    );
    charon.swanctl("--rekey --ike xnet-onprem-vpn").unwrap();
    wait_until(
        &agent,
        "IKE SA rekeyed by charon",
        Duration::from_secs(10),
        |_| agent.log().contains("IKE SA rekeyed"),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(up(&agent.status()));
    let sas = charon.swanctl("--list-sas").unwrap();
    assert_eq!(
        sas.matches("ESTABLISHED").count(),
        1,
        "one IKE SA after the rekey: {sas}"
    );

    // A third proposal: charon now offers only AES-256/SHA-512 with Curve25519.
    let only = conf
        .replace(
            "proposals = aes128-sha256-prfsha256-modp2048,",
            "proposals =",
        )
        .replace("esp_proposals = aes128-sha256,", "esp_proposals =");
    assert_ne!(only, conf);
    std::fs::write(charon.dir.join("swanctl.conf"), &only).unwrap();
    charon.swanctl("--terminate --ike xnet-onprem-vpn").unwrap();
    // Loading a connection with start_action = start initiates it.
    charon.load("--load-all").unwrap();
    wait_until(&agent, "curve25519 SA up", Duration::from_secs(20), |s| {
        up(s) && tunnel(s).ike_proposal.as_deref() == Some("aes256-sha512-prfsha512-curve25519")
    });
    same_child_sa(
        &agent,
        &charon,
        &keys,
        false,
        "AES_CBC-256/HMAC_SHA2_512_256",
    );

    // charon dies without a word: the agent's liveness check (DPD after 2 s idle, then
    // retransmissions) finds out and removes the SAs.
    drop(charon);
    wait_until(&agent, "dead peer detected", Duration::from_secs(30), |s| {
        let t = tunnel(s);
        t.state == "down"
            && t.last_error
                .as_deref()
                .is_some_and(|e| e.contains("not answering"))
    });
    let pol = sh(&format!("ip -n {} xfrm policy", lab.ns("cxp")));
    assert!(!pol.contains("10.1.0.0/16"), "policies removed: {pol}");
}

#[test]
fn malformed_ike_datagrams_are_dropped_and_counted() {
    if !require_root("malformed_ike_datagrams_are_dropped_and_counted") {
        return;
    }
    let lab = lab("ike-bad");
    let (cfg, _) = agent_config(
        &lab,
        false,
        &["aes256gcm16-prfsha384-ecp384"],
        &["aes256gcm16"],
    );
    let agent = Agent::start(&lab, &cfg);
    let before = tunnel(&agent.status()).dropped;
    in_netns(&lab.ns("onprem"), || {
        let s = std::net::UdpSocket::bind("10.0.3.2:500").unwrap();
        let mut junk = vec![0u8; 28];
        junk[17] = 0x20;
        junk[18] = 37;
        junk[27] = 28;
        for m in [vec![1u8, 2, 3], vec![0xff; 200], junk] {
            s.send_to(&m, "10.0.3.1:500").unwrap();
        }
    });
    wait_until(&agent, "three drops counted", Duration::from_secs(5), |s| {
        tunnel(s).dropped >= before + 3
    });
    assert_eq!(tunnel(&agent.status()).state, "down");
}

#[test]
fn agent_rekeys_child_and_ike_sas_with_strongswan() {
    if !require_root("agent_rekeys_child_and_ike_sas_with_strongswan") {
        return;
    }
    let lab = lab("ike-k");
    let (cfg, keys) = agent_config_with(
        &lab,
        true,
        &["aes256gcm16-prfsha384-ecp384"],
        &["aes256gcm16"],
        "child_lifetime = 5\nike_lifetime = 12",
    );
    let charon = charon_before_agent(&lab, &cfg);
    let agent = Agent::start_with_env(&lab, &cfg, &[("XNET_IKE_KEYLOG", keys.to_str().unwrap())]);
    wait_until(&agent, "up", Duration::from_secs(20), up);
    let first = tunnel(&agent.status()).children[0].clone();
    // After 5 s the agent rekeys the CHILD SA (it initiates that exchange).
    wait_until(
        &agent,
        "CHILD SA rekeyed by the agent",
        Duration::from_secs(10),
        |s| up(s) && tunnel(s).children[0].spi_in != first.spi_in,
    );
    same_child_sa(&agent, &charon, &keys, true, "AES_GCM_16-256");
    // After 12 s the IKE SA; the CHILD SAs move to the new one.
    wait_until(
        &agent,
        "IKE SA rekeyed by the agent",
        Duration::from_secs(15),
        |_| agent.log().contains("IKE SA rekeyed"),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(up(&agent.status()), "{}", agent.log());
    let sas = charon.swanctl("--list-sas").unwrap();
    assert_eq!(sas.matches("ESTABLISHED").count(), 1, "{sas}");
    assert_eq!(sas.matches("INSTALLED").count(), 1, "{sas}");
    assert!(!agent.log().contains("rekey refused"), "{}", agent.log());
}

/// Namespaces a test adds beside the lab's, deleted with it.
struct ExtraNs(Vec<String>);

impl Drop for ExtraNs {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

#[test]
fn nat_traversal_through_a_masquerading_nat() {
    if !require_root("nat_traversal_through_a_masquerading_nat") {
        return;
    }
    let lab = lab("ike-nat");
    // cxp natx 10.9.1.1 -- 10.9.1.254 nat (masquerade) 192.168.50.1 -- 192.168.50.2 branch
    let (nat, branch) = (lab.ns("nat"), lab.ns("branch"));
    let _extra = ExtraNs(vec![nat.clone(), branch.clone()]);
    let cxp = lab.ns("cxp");
    for cmd in [
        format!("ip netns add {nat}"),
        format!("ip netns add {branch}"),
        format!("ip link add natx netns {cxp} type veth peer name out netns {nat}"),
        format!("ip link add in netns {nat} type veth peer name eth0 netns {branch}"),
        format!("ip -n {cxp} addr add 10.9.1.1/24 dev natx"),
        format!("ip -n {cxp} link set natx up"),
        format!("ip -n {nat} addr add 10.9.1.254/24 dev out"),
        format!("ip -n {nat} addr add 192.168.50.1/24 dev in"),
        format!("ip -n {nat} link set out up"),
        format!("ip -n {nat} link set in up"),
        format!("ip -n {nat} link set lo up"),
        format!("ip netns exec {nat} sysctl -qw net.ipv4.ip_forward=1"),
        format!("ip -n {branch} addr add 192.168.50.2/24 dev eth0"),
        format!("ip -n {branch} link set eth0 up"),
        format!("ip -n {branch} link set lo up"),
        // charon's userspace ESP routes from an address inside its selector.
        format!("ip -n {branch} addr add 192.168.60.1/32 dev lo"),
        format!("ip -n {branch} route add default via 192.168.50.1"),
    ] {
        sh(&cmd);
    }
    sh(&format!(
        "ip netns exec {nat} nft 'add table ip nat; add chain ip nat post {{ type nat hook postrouting priority 100; }}; add rule ip nat post oifname \"out\" masquerade'"
    ));
    let dir = std::env::temp_dir().join(&lab.prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let psk = dir.join("branch.psk");
    std::fs::write(&psk, format!("{PSK}\n")).unwrap();
    // The CXP knows the branch by the NAT's address and by its ID.
    let cfg = format!(
        r#"{}
[[ipsec]]
name = "branch"
segment = "prod"
local_address = "10.9.1.1"
remote_address = "10.9.1.254"
remote_id = "192.168.50.2"
psk_file = "{}"
initiate = false
ike_proposals = ["aes256gcm16-prfsha384-ecp384"]
esp_proposals = ["aes256gcm16"]
local_ts = ["10.1.0.0/16"]
remote_ts = ["192.168.60.0/24"]
dpd_seconds = 5
"#,
        xnet_lab::lab::DEMO_CONFIG,
        psk.display()
    );
    let keys = dir.join("ike.keys");
    let agent = Agent::start_with_env(&lab, &cfg, &[("XNET_IKE_KEYLOG", keys.to_str().unwrap())]);
    let conf = peer_config("branch", &agent.config);
    assert!(conf.contains("local_addrs = 192.168.50.2"), "{conf}");
    let charon = charon_in(&lab, &branch, &conf);
    wait_until(
        &agent,
        "tunnel up through the NAT",
        Duration::from_secs(20),
        |s| {
            let t = tunnel(s);
            up(s) && t.natt
        },
    );
    let sas = charon.swanctl("--list-sas").unwrap();
    assert!(sas.contains("TUNNEL-in-UDP"), "ESP in UDP: {sas}");
    assert!(sas.contains("10.9.1.1[4500]"), "IKE moved to 4500: {sas}");
    same_child_sa(&agent, &charon, &keys, false, "AES_GCM_16-256");
    // The agent answers the NAT's mapped port, which keeps working for liveness checks.
    std::thread::sleep(Duration::from_secs(7));
    assert!(up(&agent.status()), "{}", agent.log());
}

/// Certificate authentication (RFC 7296 §3.8, RFC 7427) with strongSwan, configured by
/// `peer-config` (its own certificate and key filled in): the agent's RSA certificate
/// and strongSwan's ECDSA P-384 one, both from the test CA, the agent initiating and then
/// responding; a gateway certificate from another CA of the same name is refused, and
/// `xnet ipsec` says why.
#[test]
fn certificates_authenticate_both_ways_with_strongswan() {
    if !require_root("certificates_authenticate_both_ways_with_strongswan") {
        return;
    }
    let lab = lab("ike-cert");
    let td = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ike/testdata");
    let f = |n: &str| td.join(n).display().to_string();
    let config = |initiate: bool| {
        let (cfg, _) = agent_config_with(
            &lab,
            initiate,
            &["aes256gcm16-prfsha384-ecp384"],
            &["aes256gcm16"],
            &format!(
                "cert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\nremote_id = \"O=xnet test, CN=gw.example.net\"",
                f("cxp.pem"),
                f("cxp.key"),
                f("ca.pem")
            ),
        );
        cfg.lines()
            .filter(|l| !l.starts_with("psk_file"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // The gateway's side as peer-config writes it, with its credentials filled in.
    let gateway = |cfg: &str, cert: &str| {
        let path = std::env::temp_dir().join(&lab.prefix).join("cert.toml");
        std::fs::write(&path, cfg).unwrap();
        let conf = peer_config("onprem-vpn", &path);
        assert!(conf.contains("auth = pubkey"), "{conf}");
        assert!(
            conf.contains("id = \"O=xnet test, CN=cxp.example.net\""),
            "the CXP's identity, from its certificate: {conf}"
        );
        assert!(!conf.contains("secret ="), "no PSK: {conf}");
        conf.replace("gateway.pem", &f(cert))
            .replace("cxp-ca.pem", &f("ca.pem"))
    };
    // charon with the gateway's key in its swanctl directory's private/.
    let charon = |conf: &str| {
        let dir = std::env::temp_dir().join(format!("{}-charon", lab.prefix));
        let c = Charon::start(&lab.ns("onprem"), dir, SETTINGS, LOG_LEVELS, conf).unwrap();
        std::fs::create_dir_all(c.dir.join("private")).unwrap();
        std::fs::copy(td.join("gw.key"), c.dir.join("private/gw.key")).unwrap();
        c.load("--load-all").unwrap();
        c
    };
    for agent_initiates in [true, false] {
        let cfg = config(agent_initiates);
        let (charon, mut agent) = if agent_initiates {
            let c = charon(&gateway(&cfg, "gw.pem"));
            (c, Agent::start(&lab, &cfg))
        } else {
            let a = Agent::start(&lab, &cfg);
            (charon(&gateway(&cfg, "gw.pem")), a)
        };
        wait_until(
            &agent,
            "IKE SA up with certificates",
            Duration::from_secs(20),
            up,
        );
        // charon may log its check a moment after the agent is up (as responder).
        let t = std::time::Instant::now();
        while !charon
            .log()
            .contains("with RSA_EMSA_PKCS1_SHA2_256 successful")
            && t.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = charon.log();
        assert!(
            log.contains("authentication of 'O=xnet test, CN=cxp.example.net' with RSA_EMSA_PKCS1_SHA2_256 successful"),
            "strongSwan checked the agent's RSA signature (RFC 7427): {log}"
        );
        assert!(
            log.contains("authentication of 'O=xnet test, CN=gw.example.net' (myself) with ECDSA"),
            "{log}"
        );
        assert!(!agent.log().contains("BEGIN PRIVATE KEY"));
        if kernel_has_esp() {
            // In the VM: traffic through the tunnel (the kernel forwards it, as in the
            // route-based test).
            sh(&format!(
                "ip netns exec {} sysctl -qw net.ipv4.ip_forward=1",
                lab.ns("cxp")
            ));
            let port = if agent_initiates { 9320 } else { 9321 };
            assert_eq!(
                udp(
                    &lab,
                    "vnet1",
                    &format!("10.1.0.1:{}", port - 4000),
                    "onprem",
                    &format!("192.168.10.1:{port}"),
                    20
                ),
                20,
                "{}",
                charon.log()
            );
        }
        assert!(agent.stop().success());
        drop(charon);
    }
    // A gateway certificate of the same subject and key from another CA.
    let cfg = config(true);
    let charon = charon(&gateway(&cfg, "rogue-gw.pem"));
    let agent = Agent::start(&lab, &cfg);
    wait_until(
        &agent,
        "the rogue certificate refused",
        Duration::from_secs(20),
        |s| {
            tunnel(s)
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("is not signed by a CA in ca_file"))
        },
    );
    assert_ne!(tunnel(&agent.status()).state, "established");
    drop(charon);
}

/// A CHILD SA strongSwan deletes is re-created by the agent (which starts the
/// connector); one strongSwan refuses in IKE_AUTH leaves an IKE SA that `xnet ipsec`
/// shows as `no-child-sa` with the reason, logged at WARN once, while the agent keeps
/// asking with back-off.
#[test]
fn a_deleted_child_sa_comes_back_and_a_refused_one_is_shown() {
    if !require_root("a_deleted_child_sa_comes_back_and_a_refused_one_is_shown") {
        return;
    }
    let lab = lab("ike-child");
    let (cfg, _) = agent_config(
        &lab,
        true,
        &["aes256gcm16-prfsha384-ecp384"],
        &["aes256gcm16"],
    );
    let gw = charon_before_agent(&lab, &cfg);
    let agent = Agent::start(&lab, &cfg);
    wait_until(&agent, "up", Duration::from_secs(20), up);
    let first = tunnel(&agent.status()).children[0].clone();
    gw.swanctl("--terminate --child xnet-onprem-vpn").unwrap();
    wait_until(
        &agent,
        "a new CHILD SA after strongSwan deleted it",
        Duration::from_secs(10),
        |s| up(s) && tunnel(s).children[0].spi_in != first.spi_in,
    );
    let sas = gw.swanctl("--list-sas").unwrap();
    assert_eq!(sas.matches("INSTALLED").count(), 1, "{sas}");
    drop(gw);
    let mut agent = agent;
    assert!(agent.stop().success());

    // strongSwan's CHILD SA config takes other selectors: IKE_AUTH gives no CHILD SA.
    let path = std::env::temp_dir().join(&lab.prefix).join("pre.toml");
    std::fs::write(&path, &cfg).unwrap();
    let conf = peer_config("onprem-vpn", &path)
        .replace("remote_ts = 10.1.0.0/16", "remote_ts = 10.99.0.0/16");
    let charon = charon(&lab, &conf);
    let agent = Agent::start(&lab, &cfg);
    wait_until(
        &agent,
        "no-child-sa with the reason",
        Duration::from_secs(20),
        |s| {
            let t = tunnel(s);
            t.state == "no-child-sa"
                && t.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("no CHILD SA: TS_UNACCEPTABLE"))
        },
    );
    std::thread::sleep(Duration::from_secs(4));
    let log = agent.log();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("WARN") && l.contains("no CHILD SA"))
            .count(),
        1,
        "{log}"
    );
    // Asked again with back-off (after 1, 2, 4 s…), not every tick.
    let asked = charon
        .log()
        .lines()
        .filter(|l| l.contains("parsed CREATE_CHILD_SA request"))
        .count();
    assert!((1..=4).contains(&asked), "{asked}: {}", charon.log());
}

/// A reload leaves a connector whose settings did not change alone (same SAs), replaces
/// one whose settings changed (the peer sees a new IKE SA), removes one (the peer is told:
/// its SA goes) and adds one back.
#[test]
fn reload_touches_only_the_connectors_that_changed() {
    if !require_root("reload_touches_only_the_connectors_that_changed") {
        return;
    }
    let lab = lab("ike-reload");
    let (cfg, _) = agent_config(
        &lab,
        true,
        &["aes256gcm16-prfsha384-ecp384"],
        &["aes256gcm16"],
    );
    let charon = charon_before_agent(&lab, &cfg);
    let agent = Agent::start(&lab, &cfg);
    wait_until(
        &agent,
        "IKE SA and CHILD SA up",
        Duration::from_secs(20),
        up,
    );
    let spi = |s: &Status| tunnel(s).children[0].spi_in.clone();
    let first = spi(&agent.status());
    let reload = |text: &str, what: &str| {
        let mark = agent.log().len();
        std::fs::write(
            &agent.config,
            text.replace("/run/xnet/demo.sock", agent.socket.to_str().unwrap()),
        )
        .unwrap();
        agent.signal(libc::SIGHUP);
        wait_until(&agent, what, Duration::from_secs(10), |_| {
            agent.log()[mark..].contains("reloaded")
        });
        agent.log()[mark..].to_string()
    };

    // An unrelated change (a route): the connector and its SAs stay as they are.
    let route = "[[routes]]\nsegment = \"prod\"\nprefix = \"10.77.0.0/16\"\nnext_hops = [{ via = \"10.0.1.2\", interface = \"vnet1\" }]\n";
    let log = reload(&format!("{cfg}\n{route}"), "a route added");
    assert!(
        !log.contains("onprem-vpn"),
        "the connector untouched: {log}"
    );
    let s = agent.status();
    assert!(
        up(&s) && spi(&s) == first,
        "same CHILD SA: {:?}",
        tunnel(&s)
    );

    // Its settings change: it is replaced (the old SAs deleted, new ones negotiated).
    let changed = format!("{cfg}\n{route}").replace("dpd_seconds = 2", "dpd_seconds = 3");
    reload(&changed, "the connector replaced");
    wait_until(&agent, "a new CHILD SA", Duration::from_secs(20), |s| {
        up(s) && spi(s) != first
    });
    let sas = charon.swanctl("--list-sas").unwrap();
    assert_eq!(
        sas.matches("ESTABLISHED").count(),
        1,
        "one IKE SA at the peer, the new one: {sas}"
    );

    // Removed: the peer is told, its SA goes.
    let without = changed[..changed.find("[[ipsec]]").unwrap()].to_string() + route;
    let log = reload(&without, "the connector removed");
    assert!(log.contains("onprem-vpn: connector removed"), "{log}");
    assert!(agent.status().ipsec.is_empty());
    let t = Instant::now();
    while charon
        .swanctl("--list-sas")
        .unwrap()
        .contains("xnet-onprem-vpn")
    {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "charon still has the SA"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pol = sh(&format!("ip -n {} xfrm policy", lab.ns("cxp")));
    assert!(!pol.contains("10.0.3.2"), "its XFRM policies gone: {pol}");

    // And back.
    reload(&changed, "the connector added again");
    wait_until(&agent, "up again", Duration::from_secs(20), up);
}
