//! `xnet-lab demo` (what `cargo xtask run` starts): builds the lab, runs the agent in its `cxp`
//! namespace with the shipped config, sends traffic across, and shows the data plane's
//! counters until Ctrl-C (or `--duration`), then tears everything down.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lab::Lab;
use xnet_user::status;

const PREFIX: &str = "xnet-demo";

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

pub async fn run(duration: Option<u64>) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces and loads XDP: run it as root");
    }
    println!("xnet-lab demo: building the lab (namespaces {PREFIX}-cxp, -vnet1, -vnet2, -onprem)");
    let lab = Lab::create(PREFIX)?;
    let dir = Path::new("/run/xnet");
    std::fs::create_dir_all(dir)?;
    let socket = dir.join("demo.sock");
    let config = dir.join("demo-lab.toml");
    std::fs::write(&config, lab.config(&socket.display().to_string()))?;
    let exe = crate::agent_binary()?;
    let mut children = Children(Vec::new());
    println!(
        "xnet-lab demo: starting the agent in {} with {}",
        lab.ns("cxp"),
        config.display()
    );
    children.0.push(spawn_in(
        &lab.ns("cxp"),
        &[
            exe.to_str().unwrap(),
            "run",
            "--config",
            config.to_str().unwrap(),
        ],
        false,
    )?);

    // Wait until the agent answers and its next hops are resolved.
    let start = Instant::now();
    loop {
        if let Ok(s) = status::fetch(&socket).await {
            if s.routes
                .iter()
                .all(|r| r.next_hops.iter().all(|h| h.fast_path))
            {
                break;
            }
        }
        if let Some(Ok(Some(code))) = children.0.first_mut().map(|c| c.try_wait()) {
            bail!("the agent exited ({code}) before it was ready");
        }
        if start.elapsed() > Duration::from_secs(15) {
            bail!("the agent did not become ready in 15 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("xnet-lab demo: traffic: vnet1 ⇄ onprem over IPv4 and IPv6 (segment prod, forwarded by XDP); vnet2 → vnet1 (segment dev: no route, handed to the kernel)");
    let vnet1 = lab.ns("vnet1");
    let vnet2 = lab.ns("vnet2");
    children.0.push(spawn_in(
        &vnet1,
        &["ping", "-q", "-i", "0.2", "-I", "10.1.0.1", "192.168.10.1"],
        true,
    )?);
    children.0.push(spawn_in(
        &vnet1,
        &["ping", "-q", "-6", "-i", "0.2", "-I", "fd01::1", "fd03::1"],
        true,
    )?);
    children.0.push(spawn_in(
        &vnet2,
        &["ping", "-q", "-i", "0.5", "-I", "10.2.0.1", "10.1.0.1"],
        true,
    )?);
    println!("xnet-lab demo: press Ctrl-C to stop and tear down\n");

    let deadline = duration.map(|d| Instant::now() + Duration::from_secs(d));
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut last = None;
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
    println!("\nxnet-lab demo: stopping the agent and removing the lab");
    drop(children);
    drop(lab);
    let _ = std::fs::remove_file(&config);
    match last {
        Some(s) if s.reason("forwarded") > 0 => {
            println!(
                "xnet-lab demo: done: XDP forwarded {} packets",
                s.reason("forwarded")
            );
            Ok(())
        }
        _ => bail!("the demo saw no packet forwarded by XDP"),
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
