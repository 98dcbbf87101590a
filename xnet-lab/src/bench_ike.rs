//! `bench ike_setup`: N IKE SAs with one CHILD SA each, set up against one strongSwan
//! responder (charon in the lab's on-prem namespace): first by xnet's IKE state machine,
//! then — in the same run, against a fresh responder with the same config — by a second
//! charon (the baseline). Seconds from the first IKE_SA_INIT until every SA is up.
//!
//! Both sides use Curve25519, AES-GCM and PSK, and UDP encapsulation (charon's userspace
//! ESP needs it; this kernel has no ESP), so the work compared is IKE's. charon can only
//! start N SAs by loading N connections (Debian has no load-tester plugin): the time
//! loading alone takes is measured apart and subtracted. xnet's initiator here is the IKE
//! state machine without XFRM; charon's installs its SAs in userspace ESP.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::charon::Charon;
use crate::lab::Lab;
use xnet_user::ike::crypto::Secret;
use xnet_user::ike::packet::{id_of, Header, TrafficSelector, ID_FQDN};
use xnet_user::ike::proposal::Suite;
use xnet_user::ike::sa::{Conn, IkeSa, Output, State};

const PSK: &str = "bench-ike-setup-0123456789";
const IKE: &str = "aes128gcm16-prfsha256-curve25519";
const ESP: &str = "aes128gcm16";
/// SAs in flight at once from the xnet initiator (charon's initiator paces itself).
const WINDOW: usize = 64;

/// Half-open limits per peer address would throttle both initiators alike: off.
/// Retransmission as xnet's (0.5 s, doubling): with charon's default 4 s, one datagram
/// lost in the burst made the baseline run bimodal.
const SETTINGS: &str = "  install_routes = no\n  retransmit_timeout = 0.5\n  retransmit_base = 2\n  block_threshold = 100000\n  cookie_threshold = 100000\n  init_limit_half_open = 0\n  load = random nonce aes sha1 sha2 hmac gcm curve25519 openssl kdf kernel-libipsec kernel-netlink socket-default vici";
const QUIET: &str = "      default = 0";

fn charon(ns: &str, dir: PathBuf, swanctl: &str) -> Result<Charon> {
    Charon::start(ns, dir, SETTINGS, QUIET, swanctl)
}

fn responder_conf() -> String {
    format!(
        "connections {{\n  bench {{\n    version = 2\n    local_addrs = 10.0.3.2\n    remote_addrs = 10.0.3.1\n    proposals = {IKE}\n    unique = never\n    encap = yes\n    local {{\n      auth = psk\n      id = 10.0.3.2\n    }}\n    remote {{\n      auth = psk\n      id = %any\n    }}\n    children {{\n      bench {{\n        local_ts = 192.168.0.0/16\n        remote_ts = 10.1.0.0/16\n        esp_proposals = {ESP}\n      }}\n    }}\n  }}\n}}\nsecrets {{\n  ike {{\n    secret = \"{PSK}\"\n  }}\n}}\n"
    )
}

/// Tunnel `i`'s identity and inner prefix: each SA is its own peer to the responder.
fn tunnel(i: usize) -> (String, String) {
    (
        format!("c{i}.bench"),
        format!("10.1.{}.{}/32", i / 256, i % 256),
    )
}

/// The baseline initiator: `n` connections that start as they are loaded (`start`), or
/// only loaded (to time the loading alone).
fn initiator_conf(n: usize, start: bool) -> String {
    let action = if start { "start" } else { "none" };
    let mut s = String::from("connections {\n");
    for i in 0..n {
        let (id, ts) = tunnel(i);
        s.push_str(&format!(
            "  c{i} {{\n    version = 2\n    local_addrs = 10.0.3.1\n    remote_addrs = 10.0.3.2\n    proposals = {IKE}\n    encap = yes\n    local {{\n      auth = psk\n      id = {id}\n    }}\n    remote {{\n      auth = psk\n      id = 10.0.3.2\n    }}\n    children {{\n      c{i} {{\n        local_ts = {ts}\n        remote_ts = 192.168.0.0/16\n        esp_proposals = {ESP}\n        start_action = {action}\n      }}\n    }}\n  }}\n"
        ));
    }
    s.push_str(&format!(
        "}}\nsecrets {{\n  ike {{\n    secret = \"{PSK}\"\n  }}\n}}\n"
    ));
    s
}

fn conn(i: usize) -> Arc<Conn> {
    let local: IpAddr = "10.0.3.1".parse().unwrap();
    let remote: IpAddr = "10.0.3.2".parse().unwrap();
    let (id, ts) = tunnel(i);
    Arc::new(Conn {
        name: "bench".into(),
        local,
        remote,
        auth: xnet_user::ike::sa::Auth::Psk(Secret::new(PSK.as_bytes().to_vec())),
        local_id: (ID_FQDN, id.into_bytes()),
        remote_id: Some(id_of(remote)),
        ike: vec![Suite::parse(IKE, true).unwrap()],
        esp: vec![Suite::parse(ESP, false).unwrap()],
        local_ts: vec![TrafficSelector::from_net(ts.parse().unwrap())],
        remote_ts: vec![TrafficSelector::from_net("192.168.0.0/16".parse().unwrap())],
        dpd: xnet_user::ike::sa::Dpd::OFF,
        force_encap: true,
        child_lifetime: Duration::from_secs(3600),
        ike_lifetime: Duration::from_secs(14400),
        initiate: true,
    })
}

/// xnet's initiator: `n` SAs, `WINDOW` at a time, over UDP 500/4500 from this thread's
/// namespace. Returns the seconds until all are up with their CHILD SA.
fn xnet_initiator(n: usize) -> Result<f64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let remote: IpAddr = "10.0.3.2".parse().unwrap();
        let s500 = tokio::net::UdpSocket::bind("10.0.3.1:500").await?;
        let s4500 = tokio::net::UdpSocket::bind("10.0.3.1:4500").await?;
        let peer = |port| SocketAddr::new(remote, port);
        let mut sas: HashMap<u64, IkeSa> = HashMap::new();
        let (mut started, mut done) = (0usize, 0usize);
        let t0 = Instant::now();
        let mut buf = vec![0u8; 65536];
        let mut buf2 = vec![0u8; 65536];
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        async fn send(
            s500: &tokio::net::UdpSocket,
            s4500: &tokio::net::UdpSocket,
            sa: &IkeSa,
            to: SocketAddr,
            m: &[u8],
        ) {
            if sa.natt {
                let _ = s4500
                    .send_to(
                        &[&[0u8, 0, 0, 0][..], m].concat(),
                        SocketAddr::new(to.ip(), 4500),
                    )
                    .await;
            } else {
                let _ = s500.send_to(m, to).await;
            }
        }
        while done < n {
            if t0.elapsed() > Duration::from_secs(300) {
                bail!("bench ike_setup: xnet: {done} of {n} SAs after 300 s");
            }
            while started < n && sas.len() < WINDOW {
                let (sa, out) = IkeSa::initiate(conn(started), Instant::now());
                for o in out {
                    if let Output::Send(m) = o {
                        send(&s500, &s4500, &sa, peer(500), &m).await;
                    }
                }
                sas.insert(sa.spi_i, sa);
                started += 1;
            }
            let msg = tokio::select! {
                r = s500.recv_from(&mut buf) => buf[..r?.0].to_vec(),
                r = s4500.recv_from(&mut buf2) => {
                    let k = r?.0;
                    if k <= 4 || buf2[..4] != [0, 0, 0, 0] { continue; }
                    buf2[4..k].to_vec()
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    for sa in sas.values_mut() {
                        for o in sa.on_tick(now) {
                            if let Output::Send(m) = o {
                                send(&s500, &s4500, sa, peer(500), &m).await;
                            }
                        }
                    }
                    continue;
                }
            };
            let Ok(h) = Header::decode(&msg) else {
                continue;
            };
            let Some(sa) = sas.get_mut(&h.spi_i) else {
                continue;
            };
            let out = sa.on_message(&msg, Instant::now());
            let mut up = false;
            for o in out {
                match o {
                    Output::Send(m) => send(&s500, &s4500, sa, peer(500), &m).await,
                    Output::ChildUp(_) => up = true,
                    Output::Closed(why) => bail!("bench ike_setup: an SA failed: {why}"),
                    Output::Dropped(why) => eprintln!("bench ike_setup: dropped: {why}"),
                    _ => {}
                }
            }
            if up && sa.state == State::Established {
                sas.remove(&h.spi_i);
                done += 1;
            }
        }
        Ok(t0.elapsed().as_secs_f64())
    })
}

pub fn run(n: usize) -> Result<()> {
    if !Path::new("/usr/lib/ipsec/charon").exists() {
        println!("bench ike_setup skipped: charon (Debian strongswan-charon) is not installed");
        return Ok(());
    }
    let lab = Lab::create(&format!("xb{}-ike", std::process::id()))?;
    let tmp = std::env::temp_dir();
    // xnet against a fresh responder.
    let responder = charon(
        &lab.ns("onprem"),
        tmp.join(format!("{}-resp", lab.prefix)),
        &responder_conf(),
    )?;
    responder.load("--load-all")?;
    let ns = lab.ns("cxp");
    let xnet_secs = std::thread::spawn(move || -> Result<f64> {
        let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
        use std::os::fd::AsRawFd;
        // SAFETY: setns on this thread only.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        xnet_initiator(n)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("bench thread panicked"))??;
    let (established, _) = responder.ike_sas();
    if established < n {
        bail!("bench ike_setup: the responder holds {established} IKE SAs, expected {n}");
    }
    drop(responder);
    // The baseline: charon against a fresh responder.
    let responder = charon(
        &lab.ns("onprem"),
        tmp.join(format!("{}-resp2", lab.prefix)),
        &responder_conf(),
    )?;
    responder.load("--load-all")?;
    // Loading n connections over vici takes time of its own: measured alone first, and
    // taken off the baseline, which loads and starts them in one go.
    let loader = charon(
        &lab.ns("vnet1"),
        tmp.join(format!("{}-load", lab.prefix)),
        &initiator_conf(n, false),
    )?;
    loader.load("--load-creds")?;
    let t = Instant::now();
    loader.load("--load-conns")?;
    let load_secs = t.elapsed().as_secs_f64();
    drop(loader);
    let initiator = charon(
        &lab.ns("cxp"),
        tmp.join(format!("{}-init", lab.prefix)),
        &initiator_conf(n, true),
    )?;
    initiator.load("--load-creds")?;
    let t0 = Instant::now();
    initiator.load("--load-conns")?;
    loop {
        let (total, half_open) = initiator.ike_sas();
        if total >= n && half_open == 0 {
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("bench ike_setup: strongSwan: {total} of {n} IKE SAs after 300 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ss_secs = (t0.elapsed().as_secs_f64() - load_secs).max(0.001);
    println!(
        "bench ike_setup tunnels={n} secs={xnet_secs:.2} ratio_vs_strongswan={:.2} strongswan_secs={ss_secs:.2} strongswan_load_secs={load_secs:.2}",
        xnet_secs / ss_secs
    );
    Ok(())
}
