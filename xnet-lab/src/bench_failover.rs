//! `bench failover`: two eBGP peers (BIRD in the lab's vnet2 and on-prem namespaces, one
//! AS) announce the whole table, xnet spreads every prefix over both (ECMP), BFD runs on
//! all four sessions at 300 ms × 3; then one peer goes silent. Measured in one run:
//! `detect_ms` from the cut until BFD declares the session down; `switch_ms` from there
//! until the data plane's next-hop groups no longer hold the dead next hop (prefix-
//! independent convergence: one write per group); `converge_ms` until the RIB and every
//! prefix have moved — which is also when, without PIC, the last packet would stop going
//! to the dead next hop (today's per-prefix rewrite), so that line is printed beside it.
//! And `bench bfd_tx_jitter`: how late a periodic BFD packet left at worst while the two
//! full tables were coming in.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Result};
use ipnet::IpNet;

use crate::bench_bgp::{
    agent_in, bird_routes, birdc, poke, spawn, wait, Proc, BIRD_TIMERS, FAST, GENTLE,
};
use crate::lab::{netns_exec, Lab};
use xnet_user::status::{self, Status};

/// The two announcing peers: (lab host, link subnet index).
const PEERS: [(&str, u8); 2] = [("vnet2", 2), ("onprem", 3)];

fn announcer(i: u8, v4: &[IpNet], v6: &[IpNet]) -> String {
    let mut c = format!(
        "router id 10.0.{i}.2;\nprotocol device {{}}\n\
         protocol bfd {{ interface \"eth0\" {{ interval 300 ms; multiplier 3; }}; }}\n\
         protocol static s4 {{ ipv4;\n"
    );
    for n in v4 {
        let _ = writeln!(c, "route {n} blackhole;");
    }
    c.push_str("}\nprotocol static s6 { ipv6;\n");
    for n in v6 {
        let _ = writeln!(c, "route {n} blackhole;");
    }
    let _ = write!(
        c,
        "}}\nprotocol bgp cxp {{ local 10.0.{i}.2 as 65010; neighbor 10.0.{i}.1 as 65000; bfd on; {BIRD_TIMERS} ipv4 {{ import none; export where proto = \"s4\"; }}; }}\n\
         protocol bgp cxp6 {{ local fd00:{i}::2 as 65010; neighbor fd00:{i}::1 as 65000; bfd on; {BIRD_TIMERS} ipv6 {{ import none; export where proto = \"s6\"; }}; }}\n"
    );
    c
}

fn agent_config(socket: &str) -> String {
    let mut c = format!(
        "[agent]\nsocket = \"{socket}\"\nroute_table_groups = 131072\nkernel_fib = false\n\
         [[segments]]\nname = \"prod\"\ntable = 100\n"
    );
    for name in ["vnet1", "vnet2", "onprem"] {
        let _ = write!(c, "[[interfaces]]\nname = \"{name}\"\nsegment = \"prod\"\n");
    }
    c.push_str("[bgp]\nasn = 65000\nrouter_id = \"10.0.1.1\"\nmultipath = 2\n");
    for (host, i) in PEERS {
        for (suffix, addr) in [("", format!("10.0.{i}.2")), ("6", format!("fd00:{i}::2"))] {
            let _ = write!(
                c,
                "[[bgp.neighbors]]\nname = \"{host}{suffix}\"\nsegment = \"prod\"\naddress = \"{addr}\"\nremote_asn = 65010\nbfd = true\n"
            );
        }
    }
    c
}

fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

pub fn run(v4: &[IpNet], v6: &[IpNet]) -> Result<()> {
    if Command::new("bird").arg("--version").output().is_err() {
        println!("bench failover skipped: BIRD (Debian bird2) is not installed");
        return Ok(());
    }
    let total = v4.iter().chain(v6).collect::<HashSet<_>>().len();
    let (total4, total6) = (
        v4.iter().collect::<HashSet<_>>().len(),
        v6.iter().collect::<HashSet<_>>().len(),
    );
    let lab = Lab::create("xnet-fob")?;
    let dir = std::env::temp_dir().join("xnet-fob");
    std::fs::create_dir_all(&dir)?;
    let mut birds: Vec<(Proc, String, std::path::PathBuf)> = Vec::new();
    for (host, i) in PEERS {
        let ns = lab.ns(host);
        let conf = dir.join(format!("{host}.conf"));
        let sock = dir.join(format!("{host}.ctl"));
        std::fs::write(&conf, announcer(i, v4, v6))?;
        let p = spawn(
            &ns,
            &[
                "bird",
                "-f",
                "-c",
                conf.to_str().unwrap(),
                "-s",
                sock.to_str().unwrap(),
            ],
        )?;
        birds.push((p, ns, sock));
    }
    for (_, ns, sock) in &birds {
        wait(
            "an announcer's table loaded",
            Duration::from_secs(300),
            GENTLE,
            || bird_routes(ns, sock) >= total,
        )?;
    }
    let socket = dir.join("agent.sock");
    let config = dir.join("agent.toml");
    std::fs::write(&config, agent_config(socket.to_str().unwrap()))?;
    let _agent = agent_in(&lab.ns("cxp"), &config, &dir.join("agent.log"), "info")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let fetch = || rt.block_on(status::fetch(&socket)).ok();
    let bfd_up = |s: &Status| s.bfd.len() == 4 && s.bfd.iter().all(|b| b.state == "up");
    wait(
        "four sessions with BFD up and both tables in",
        Duration::from_secs(600),
        FAST,
        || {
            for (_, ns, sock) in &birds {
                poke(ns, sock);
            }
            fetch().is_some_and(|s| {
                s.bgp.iter().filter(|b| b.state == "Established").count() == 4
                    && bfd_up(&s)
                    && s.bgp
                        .iter()
                        .all(|b| b.received >= if b.peer.contains(':') { total6 } else { total4 })
            })
        },
    )?;
    let s = fetch().unwrap_or_default();
    let late = s.bfd.iter().map(|b| b.tx_late_max_ms).fold(0.0, f64::max);
    println!(
        "bench bfd_tx_jitter sessions=4 interval_ms=300 tx_late_max_ms={late:.2} while_ingesting_prefixes={}",
        2 * total
    );
    // Every prefix over both peers (ECMP), or there is nothing to fail over to.
    let ecmp = |r: &&status::BgpRouteStatus| r.paths.iter().filter(|p| p.selected).count() == 2;
    if s.bgp_routes.is_empty() || !s.bgp_routes.iter().all(|r| ecmp(&r)) {
        bail!(
            "bench failover: the prefixes do not use both peers: {:?}",
            s.bgp_routes.first()
        );
    }

    // vnet2's BIRD goes silent (everything in and out of its namespace dropped).
    let dead = lab.ns("vnet2");
    let cut = SystemTime::now();
    netns_exec(
        &dead,
        "nft add table inet cut ; add chain inet cut in { type filter hook input priority -10 ; policy drop ; } ; add chain inet cut out { type filter hook output priority -10 ; policy drop ; }",
    )?;
    let dead_peers = ["10.0.2.2", "fd00:2::2"];
    let done = |s: &Status| {
        dead_peers.iter().all(|p| {
            s.failovers
                .iter()
                .any(|f| f.peer.to_string() == *p && f.converge_ms.is_some())
        })
    };
    wait(
        "both sessions of the dead peer failed over and converged",
        Duration::from_secs(120),
        FAST,
        || fetch().is_some_and(|s| done(&s)),
    )?;
    let s = fetch().unwrap_or_default();
    let fo: Vec<_> = s
        .failovers
        .iter()
        .filter(|f| dead_peers.contains(&f.peer.to_string().as_str()))
        .collect();
    if fo.len() != 2 {
        bail!("bench failover: expected two failovers, got {fo:?}");
    }
    let detect = fo
        .iter()
        .map(|f| f.detected_unix_ms)
        .fold(f64::MAX, f64::min)
        - unix_ms(cut);
    let switch = fo.iter().map(|f| f.switch_ms).fold(0.0, f64::max);
    let converge = fo.iter().filter_map(|f| f.converge_ms).fold(0.0, f64::max);
    let groups: usize = fo.iter().map(|f| f.groups).sum();
    println!(
        "bench failover pic=on prefixes={total} detect_ms={detect:.0} switch_ms={switch:.2} converge_ms={converge:.0} groups_rewritten={groups}"
    );
    println!(
        "bench failover pic=off prefixes={total} detect_ms={detect:.0} switch_ms={converge:.0} converge_ms={converge:.0} (per-prefix rewrite, same run)"
    );
    for (_, ns, sock) in &birds {
        birdc(ns, sock, "down");
    }
    Ok(())
}
