//! `bench bgp_ingest`: BIRD (in the lab's on-prem namespace) announces the whole table;
//! how long from the session reaching Established until every prefix is in xnet's data
//! plane, the agent's peak RSS, and — in the same run — how long a second BIRD takes to
//! receive the same table from the first (the baseline).

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;

use crate::lab::{netns_exec, Lab};
use xnet_user::status;

pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

pub(crate) fn spawn(ns: &str, args: &[&str]) -> Result<Proc> {
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {args:?}"))?;
    Ok(Proc(child))
}

/// The agent under benchmark in namespace `ns` with `config`, its log (RUST_LOG from
/// `XNET_BENCH_LOG`, else `level`) into `log`; `XNET_PROFILE_WRAP` runs it under a
/// profiler. Stopped when dropped.
pub(crate) fn agent_in(ns: &str, config: &Path, log: &Path, level: &str) -> Result<Proc> {
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(
            std::env::var("XNET_PROFILE_WRAP")
                .ok()
                .iter()
                .flat_map(|w| w.split_whitespace()),
        )
        .arg(crate::agent_binary()?)
        .arg("run")
        .arg("--config")
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("XNET_BENCH_LOG").unwrap_or(level.into()),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()?;
    Ok(Proc(child))
}

pub(crate) fn birdc(ns: &str, sock: &Path, cmd: &str) -> String {
    netns_exec(ns, &format!("birdc -s {} {cmd}", sock.display())).unwrap_or_default()
}

/// Routes imported and exported over all of BIRD's protocols, from `show protocols all`
/// ("Routes: N imported, M exported, …"): per-protocol counters, so polling does not walk
/// the table. BGP protocols import the table; kernel protocols export it to the FIB.
fn bird_counts(ns: &str, sock: &Path) -> (usize, usize) {
    let mut sums = (0, 0);
    for l in birdc(ns, sock, "show protocols all").lines() {
        let Some(rest) = l.trim().strip_prefix("Routes:") else {
            continue;
        };
        for part in rest.split(',') {
            let mut w = part.split_whitespace();
            let (Some(n), Some(what)) = (w.next().and_then(|n| n.parse::<usize>().ok()), w.next())
            else {
                continue;
            };
            match what {
                "imported" => sums.0 += n,
                "exported" => sums.1 += n,
                _ => {}
            }
        }
    }
    sums
}

/// Routes in BIRD's table, from `show route count` ("N of M routes for K networks…").
pub(crate) fn bird_routes(ns: &str, sock: &Path) -> usize {
    birdc(ns, sock, "show route count")
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse::<usize>().ok())
        .sum()
}

/// Polls `done` every `every` until it holds; returns when it did.
pub(crate) fn wait(
    what: &str,
    limit: Duration,
    every: Duration,
    mut done: impl FnMut() -> bool,
) -> Result<Instant> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            bail!("bench: {what} not reached in {limit:?}");
        }
        std::thread::sleep(every);
    }
    Ok(Instant::now())
}

/// A process's CPU time so far (user + system), in seconds.
pub(crate) fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    f.iter().sum::<f64>() / hz
}

/// A BIRD in `cxp` receives the table from the announcer; with `fib`, its kernel protocols
/// also install it (into table 250). Returns (seconds from Established until all of it is
/// in, its CPU seconds meanwhile, its peak RSS in MiB).
fn bird_receives(
    dir: &Path,
    cxp: &str,
    onprem: &str,
    src_sock: &Path,
    total: usize,
    fib: bool,
) -> Result<(f64, f64, f64)> {
    let rcv_conf = dir.join("receiver.conf");
    let rcv_sock = dir.join("receiver.ctl");
    let kernel = if fib {
        "protocol kernel k4 { kernel table 250; ipv4 { export all; }; }\n\
         protocol kernel k6 { kernel table 250; ipv6 { export all; }; }\n"
    } else {
        ""
    };
    std::fs::write(
        &rcv_conf,
        format!(
            "router id 10.0.3.1;\nprotocol device {{}}\n{kernel}\
             protocol bgp onprem {{ local 10.0.3.1 as 65000; neighbor 10.0.3.2 as 65010; {BIRD_TIMERS} ipv4 {{ import all; export none; }}; }}\n\
             protocol bgp onprem6 {{ local fd00:3::1 as 65000; neighbor fd00:3::2 as 65010; {BIRD_TIMERS} ipv6 {{ import all; export none; }}; }}\n"
        ),
    )?;
    let receiver = spawn(
        cxp,
        &[
            "bird",
            "-f",
            "-c",
            rcv_conf.to_str().unwrap(),
            "-s",
            rcv_sock.to_str().unwrap(),
        ],
    )?;
    let t0 = wait(
        "BIRD→BIRD sessions established",
        Duration::from_secs(60),
        FAST,
        || {
            birdc(cxp, &rcv_sock, "show protocols")
                .matches("Established")
                .count()
                == 2
        },
    )?;
    let r0 = cpu_secs(receiver.0.id());
    let t1 = wait(
        "BIRD→BIRD table received",
        Duration::from_secs(600),
        FAST,
        || {
            poke(onprem, src_sock);
            let (imported, exported) = bird_counts(cxp, &rcv_sock);
            imported >= total && (!fib || exported >= total)
        },
    )?;
    let secs = (t1 - t0).as_secs_f64();
    let cpu = cpu_secs(receiver.0.id()) - r0;
    // `ip netns exec` execs BIRD: the child is BIRD itself.
    let rss = peak_rss_mib(receiver.0.id());
    drop(receiver);
    if fib {
        let _ = netns_exec(cxp, "ip -4 route flush table 250");
        let _ = netns_exec(cxp, "ip -6 route flush table 250");
    }
    Ok((secs, cpu, rss))
}

/// A field of /proc/PID/status in kB, as MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// A process's peak resident set (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

/// Wakes the announcing BIRD. Its event loop can sleep up to 3 s in poll() with the
/// last UPDATE of a table unsent (seen here: the last 99 prefixes and End-of-RIB 2.9 s
/// after the rest); a CLI request is I/O that ends the sleep. Both receivers get the same.
pub(crate) fn poke(ns: &str, sock: &Path) {
    birdc(ns, sock, "show status");
}

pub(crate) const FAST: Duration = Duration::from_millis(50);
/// `show route count` walks BIRD's whole table: poll it gently.
pub(crate) const GENTLE: Duration = Duration::from_millis(500);

pub(crate) const BIRD_TIMERS: &str =
    "connect delay time 1; connect retry time 1; error wait time 1, 2;";

pub fn run(v4: &[IpNet], v6: &[IpNet]) -> Result<()> {
    if Command::new("bird").arg("--version").output().is_err() {
        println!("bench bgp_ingest skipped: BIRD (Debian bird2) is not installed");
        return Ok(());
    }
    // Distinct prefixes: the table files hold a few duplicates, which BGP carries once.
    let total = v4
        .iter()
        .chain(v6)
        .collect::<std::collections::HashSet<_>>()
        .len();
    let lab = Lab::create("xnet-bgpb")?;
    let dir = std::env::temp_dir().join("xnet-bgpb");
    std::fs::create_dir_all(&dir)?;
    let onprem = lab.ns("onprem");
    let cxp = lab.ns("cxp");

    // The announcing BIRD: the table as static routes, exported over IPv4 and IPv6 sessions.
    let mut conf =
        String::from("router id 10.0.3.2;\nprotocol device {}\nprotocol static s4 { ipv4;\n");
    for n in v4 {
        let _ = writeln!(conf, "route {n} blackhole;");
    }
    conf.push_str("}\nprotocol static s6 { ipv6;\n");
    for n in v6 {
        let _ = writeln!(conf, "route {n} blackhole;");
    }
    let _ = write!(
        conf,
        "}}\nprotocol bgp cxp {{ local 10.0.3.2 as 65010; neighbor 10.0.3.1 as 65000; {BIRD_TIMERS} ipv4 {{ import none; export where proto = \"s4\"; }}; }}\n\
         protocol bgp cxp6 {{ local fd00:3::2 as 65010; neighbor fd00:3::1 as 65000; {BIRD_TIMERS} ipv6 {{ import none; export where proto = \"s6\"; }}; }}\n"
    );
    let src_conf = dir.join("announcer.conf");
    let src_sock = dir.join("announcer.ctl");
    std::fs::write(&src_conf, conf)?;
    let _announcer = spawn(
        &onprem,
        &[
            "bird",
            "-f",
            "-c",
            src_conf.to_str().unwrap(),
            "-s",
            src_sock.to_str().unwrap(),
        ],
    )?;
    wait(
        "the announcer's table loaded",
        Duration::from_secs(300),
        GENTLE,
        || bird_routes(&onprem, &src_sock) >= total,
    )?;

    // Baselines: a second BIRD in cxp receives the table into its RIB; then again, also
    // installing it into the kernel's FIB (what a BIRD in the CXP's place would do).
    let (bird_secs, bird_cpu, bird_rss) =
        bird_receives(&dir, &cxp, &onprem, &src_sock, total, false)?;
    birdc(&onprem, &src_sock, "restart cxp cxp6");
    let (bird_fib_secs, _, _) = bird_receives(&dir, &cxp, &onprem, &src_sock, total, true)?;
    birdc(&onprem, &src_sock, "restart cxp cxp6");

    // xnet receives the same table.
    let socket = dir.join("agent.sock");
    let agent_conf = dir.join("agent.toml");
    let config = lab
        .config(socket.to_str().unwrap())
        .replace("route_table_groups = 4096", "route_table_groups = 131072\nkernel_fib = false")
        + "\n[bgp]\nasn = 65000\nrouter_id = \"10.0.3.1\"\n\
           [[bgp.neighbors]]\nname = \"onprem\"\nsegment = \"prod\"\naddress = \"10.0.3.2\"\nremote_asn = 65010\n\
           [[bgp.neighbors]]\nname = \"onprem6\"\nsegment = \"prod\"\naddress = \"fd00:3::2\"\nremote_asn = 65010\n";
    std::fs::write(&agent_conf, config)?;
    let agent = agent_in(&cxp, &agent_conf, &dir.join("agent.log"), "warn")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let fetch = || rt.block_on(status::fetch(&socket)).ok();
    let t0 = wait(
        "xnet sessions established",
        Duration::from_secs(60),
        FAST,
        || fetch().is_some_and(|s| s.bgp.iter().filter(|b| b.state == "Established").count() == 2),
    )?;
    let cpu0 = cpu_secs(agent.0.id());
    let t1 = wait(
        "xnet table in the data plane",
        Duration::from_secs(600),
        FAST,
        || {
            poke(&onprem, &src_sock);
            fetch().is_some_and(|s| s.bgp_in_data_plane >= total)
        },
    )?;
    let secs = (t1 - t0).as_secs_f64();
    let cpu = cpu_secs(agent.0.id()) - cpu0;
    let rss = peak_rss_mib(agent.0.id());
    // Of that, the data plane's route table array (a BPF map the agent writes through
    // mmap: kernel memory, sized by route_table_groups) and the binary are mapped; the
    // agent's own heap is the anonymous part.
    let anon = status_mib(agent.0.id(), "RssAnon:");
    let mapped = status_mib(agent.0.id(), "RssFile:") + status_mib(agent.0.id(), "RssShmem:");
    println!(
        "bench bgp_ingest prefixes={total} secs={secs:.2} cpu_secs={cpu:.2} rss_mib={rss:.0} anon_mib={anon:.0} mapped_mib={mapped:.0} ratio_vs_bird={:.2} bird_secs={bird_secs:.2} bird_cpu_secs={bird_cpu:.2} bird_rss_mib={bird_rss:.0} ratio_vs_bird_fib={:.2} bird_fib_secs={bird_fib_secs:.2}",
        secs / bird_secs,
        secs / bird_fib_secs
    );
    Ok(())
}
