//! `xnet-lab demo` (what `cargo xtask run` starts): builds the lab (two VNets, on-prem, a
//! firewall), runs the agent in its `cxp` namespace with the shipped config plus what
//! shows the product's point — BGP from BIRD on-prem, a steer policy through the
//! firewall, a deny between segments, metrics — sends traffic across, and opens `xnet top`
//! on a terminal (else prints the counters) until Ctrl-C or `--duration`; then tears
//! everything down.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lab::Lab;
use xnet_user::status;

const PREFIX: &str = "xnet-demo";

/// On top of the shipped lab config: BIRD on-prem announces 172.16.0.0/16 and
/// 172.17.0.0/16; ICMP from the VNet to on-prem is steered through firewall fw1; the dev
/// segment's traffic toward prod is denied; metrics for Prometheus.
pub const DEMO_EXTRA: &str = r#"
[[interfaces]]
name = "fw1"
segment = "prod"
role = "firewall"

[[services]]
name = "fw"
failure_mode = "closed"
health = { kind = "icmp", interval_ms = 500, threshold = 2 }
instances = [{ name = "fw1", interface = "fw1", via = "10.0.11.2" }]

[[policies]]
name = "vnet-icmp-via-fw"
segment = "prod"
source = "10.1.0.0/16"
destination = "192.168.0.0/16"
protocol = "icmp"
action = "steer"
service = "fw"

[[policies]]
name = "dev-to-prod-denied"
segment = "dev"
destination = "10.1.0.0/16"
action = "deny"
"#;

/// BGP with BIRD on-prem (`BIRD_CONF`): it gets a default route.
pub const BGP: &str = r#"
[bgp]
asn = 65000
router_id = "10.0.3.1"

[[bgp.neighbors]]
name = "onprem"
segment = "prod"
address = "10.0.3.2"
remote_asn = 65010
advertise = "default"
"#;

pub const BIRD_CONF: &str = r#"
router id 10.0.3.2;
protocol device {}
protocol static onprem { ipv4; route 172.16.0.0/16 blackhole; route 172.17.0.0/16 blackhole; }
protocol bgp cxp {
  local 10.0.3.2 as 65010;
  neighbor 10.0.3.1 as 65000;
  ipv4 { import all; export where proto = "onprem"; };
}
"#;

/// The demo's config: the shipped one with metrics on, plus `DEMO_EXTRA`.
pub fn config(lab: &Lab, socket: &str) -> String {
    let base = lab.config(socket).replacen(
        "[agent]\n",
        "[agent]\nmetrics_listen = \"127.0.0.1:9469\"\n",
        1,
    );
    format!("{base}\n{DEMO_EXTRA}\n{BGP}")
}

struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SIGTERM lets the agent detach and clean up; pings just stop.
            // SAFETY: kill(2) on a child we started.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

fn spawn_in(ns: &str, args: &[&str], quiet: bool) -> Result<Child> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    if quiet {
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
    }
    cmd.spawn()
        .with_context(|| format!("starting {args:?} in {ns}"))
}

/// Returns, without a terminal, the last screen of `xnet top`.
pub async fn run(duration: Option<u64>) -> Result<Option<String>> {
    use std::io::IsTerminal;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces and loads XDP: run it as root");
    }
    println!(
        "xnet-lab demo: building the lab (namespaces {PREFIX}-cxp, -vnet1, -vnet2, -onprem, -fw1)"
    );
    let lab = Lab::create_with_firewalls(PREFIX, 1)?;
    let dir = Path::new("/run/xnet");
    std::fs::create_dir_all(dir)?;
    let socket = dir.join("demo.sock");
    let config = dir.join("demo-lab.toml");
    let log = dir.join("demo-agent.log");
    std::fs::write(&config, self::config(&lab, &socket.display().to_string()))?;
    println!(
        "xnet-lab demo: BIRD in {} announces 172.16.0.0/16 and 172.17.0.0/16",
        lab.ns("onprem")
    );
    let _bird = crate::testkit::Bird::with_config(&lab, BIRD_CONF, "172.16.0.1");
    let exe = crate::agent_binary()?;
    let mut children = Children(Vec::new());
    println!(
        "xnet-lab demo: starting the agent in {} with {} (log: {})",
        lab.ns("cxp"),
        config.display(),
        log.display()
    );
    children.0.push(
        Command::new("ip")
            .args(["netns", "exec", &lab.ns("cxp")])
            .arg(&exe)
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting the agent")?,
    );

    // Wait until the agent answers, its next hops are resolved, BGP is up and the
    // firewall is healthy.
    let start = Instant::now();
    loop {
        if let Ok(s) = status::fetch(&socket).await {
            let ready = s
                .routes
                .iter()
                .all(|r| r.next_hops.iter().all(|h| h.fast_path))
                && s.bgp.iter().all(|b| b.state == "Established")
                && s.bgp_in_data_plane >= 2
                && s.services
                    .iter()
                    .flat_map(|x| &x.instances)
                    .all(|i| i.health == "up");
            if ready {
                break;
            }
        }
        if let Some(Ok(Some(code))) = children.0.first_mut().map(|c| c.try_wait()) {
            bail!(
                "the agent exited ({code}) before it was ready:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "the agent did not become ready in 30 s (log: {})",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("xnet-lab demo: traffic: vnet1 → onprem ICMP steered through fw1; vnet1 ⇄ onprem IPv6 and vnet1 → 172.16.0.1 (BGP) forwarded by XDP; vnet2 (segment dev) → vnet1 denied by policy");
    let vnet1 = lab.ns("vnet1");
    let vnet2 = lab.ns("vnet2");
    for (ns, args) in [
        (
            &vnet1,
            &["ping", "-q", "-i", "0.01", "-I", "10.1.0.1", "192.168.10.1"][..],
        ),
        (
            &vnet1,
            &["ping", "-q", "-6", "-i", "0.02", "-I", "fd01::1", "fd03::1"][..],
        ),
        (
            &vnet1,
            &["ping", "-q", "-i", "0.05", "-I", "10.1.0.1", "172.16.0.1"][..],
        ),
        (
            &vnet2,
            &["ping", "-q", "-i", "0.1", "-I", "10.2.0.1", "10.1.0.1"][..],
        ),
    ] {
        children.0.push(spawn_in(ns, args, true)?);
    }

    let interactive = duration.is_none() && std::io::stdout().is_terminal();
    let mut last = None;
    let mut screen = None;
    if interactive {
        // The live view in the foreground; leaving it (q) ends the demo.
        let status = Command::new(&exe)
            .args(["top", "--socket"])
            .arg(&socket)
            .status()
            .context("xnet top")?;
        if !status.success() {
            println!("xnet top exited with {status}");
        }
        last = status::fetch(&socket).await.ok();
    } else {
        println!("xnet-lab demo: press Ctrl-C to stop and tear down (on a terminal, `cargo xtask run` shows `xnet top`)\n");
        let deadline = duration.map(|d| Instant::now() + Duration::from_secs(d));
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = int.recv() => break,
                _ = term.recv() => break,
                _ = tick.tick() => {
                    match status::fetch(&socket).await {
                        Ok(s) => {
                            print_summary(&s);
                            last = Some(s);
                        }
                        Err(e) => println!("status: {e:#}"),
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                }
            }
        }
        // What `xnet top` shows, once, for a log.
        match xnet_user::top::once(&socket, Duration::from_secs(1), 120, 40).await {
            Ok(s) => {
                println!("\n{s}");
                screen = Some(s);
            }
            Err(e) => println!("xnet top: {e:#}"),
        }
    }
    println!("\nxnet-lab demo: stopping the agent and removing the lab");
    drop(children);
    drop(_bird);
    drop(lab);
    let _ = std::fs::remove_file(&config);
    match last {
        Some(s)
            if s.reason("forwarded") > 0
                && s.reason("steered") > 0
                && s.reason("drop_policy") > 0 =>
        {
            println!(
                "xnet-lab demo: done: XDP forwarded {} packets, steered {} through the firewall, denied {}",
                s.reason("forwarded"),
                s.reason("steered"),
                s.reason("drop_policy")
            );
            Ok(screen)
        }
        _ => bail!("the demo did not see packets forwarded, steered and denied by XDP"),
    }
}

fn print_summary(s: &status::Status) {
    let ifs: Vec<String> = s
        .interfaces
        .iter()
        .map(|i| {
            format!(
                "{}: rx {} fwd {} pass {}",
                i.name, i.rx, i.forwarded, i.passed
            )
        })
        .collect();
    let reasons: Vec<String> = s
        .reasons
        .iter()
        .filter(|(n, v)| *v > 0 && n != "forwarded")
        .map(|(n, v)| format!("{n} {v}"))
        .collect();
    println!(
        "forwarded by XDP {:>6} | {} | to kernel: {}",
        s.reason("forwarded"),
        ifs.join(" | "),
        reasons.join(", ")
    );
}
