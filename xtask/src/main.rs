//! `cargo xtask`: set up, build, run, test and benchmark xnet.
//!
//! This crate builds with the machine's own stable Rust and no pinned toolchain, so that
//! `cargo xtask …` can start on a fresh machine and install everything else itself.
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod package;
mod vm;

/// Stable toolchain for the agent and its tests (aya 0.16 needs rustc ≥ 1.98).
const USER_TOOLCHAIN: &str = "1.99.0";
/// Nightly for the XDP program (`-Z build-std=core`); bpf-linker links against its LLVM.
const BPF_TOOLCHAIN: &str = "nightly-2026-10-30";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the lab, the tests and the demo use.
/// bird2 and frr: BGP interop with two implementations; strongSwan (charon with swanctl, the plugins for GCM, Curve25519
/// and userspace ESP): IKEv2 interop.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "iputils-ping",
    "nftables",
    "bird2",
    "frr",
    "strongswan-charon",
    "strongswan-swanctl",
    "libstrongswan-standard-plugins",
    "libstrongswan-extra-plugins",
    "libcharon-extra-plugins",
    // Operations: a real Prometheus scrapes the agent's metrics; nfdump's nfcapd collects
    // its IPFIX flows.
    "prometheus",
    "nfdump",
    // The cluster: three real etcd members (etcdctl reads the leader in tests), and
    // protoc with protobuf's well-known types, which the etcd-client crate's build needs
    // for etcd's gRPC API.
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    "libprotobuf-dev",
    // The package: strip, and systemd-analyze to verify its unit (dpkg-deb is dpkg's).
    "binutils",
    "systemd",
    // vm-test: QEMU, and what its initramfs and kernel unpacking use.
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "cpio",
    "xz-utils",
];

#[derive(Parser)]
#[command(about = "Build, run, test and benchmark xnet")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the pinned toolchains, bpf-linker and the Debian packages (idempotent).
    Setup,
    /// Build the XDP object and the agent (release).
    Build,
    /// Run the demo lab (no arguments), or the agent on this host: `-- --config FILE`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run every test: unit, BPF_PROG_TEST_RUN packet tests and network-namespace tests
    /// (the last two need root; they skip with a message elsewhere), then the VM
    /// scenarios (`vm-test`, as root). Extra arguments go to `cargo test`, and skip the VM.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run the scenarios that need a kernel with ESP and xfrm interfaces (vm-tests/) in a
    /// QEMU VM with a stock Debian kernel: all of them, or those whose name contains
    /// SCENARIO. The IPsec interop tests run there too, with real ESP.
    VmTest {
        scenario: Option<String>,
        /// Run this shell command in the VM instead (debugging).
        #[arg(long)]
        exec: Option<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 1200)]
        timeout: u64,
    },
    /// Bring one scenario up in the VM for a person to poke at: s1 (site-to-site IPsec), s3 (vWAN hub and migration),
    /// s4 (transit VNet), s5 (firewall steering), s6 (private peering). A shell opens on
    /// the VM's console once it is up, with what to try; `exit` tears it down. `cluster`:
    /// two nodes on three etcd members with BIRD and three firewalls, in namespaces on
    /// this host (no VM); Ctrl-C tears it down.
    Lab { scenario: String },
    /// Fuzz the BGP and IKEv2 message decoders (cargo-fuzz, libFuzzer), each for a while.
    Fuzz {
        /// How long to run each target.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// The Debian package: target/package/xnet_<version>_amd64.deb (the agent with its
    /// XDP object, the example config as a conffile, the systemd unit).
    Package {
        /// Then install it here (root), verify the unit and the example, and purge it.
        #[arg(long)]
        verify: bool,
    },
    /// Benchmarks: ns/packet of the XDP program with the full Internet table.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let root = workspace_root();
    match Cli::parse().command {
        Cmd::Setup => setup(&root),
        Cmd::Build => build(&root).map(|_| ()),
        Cmd::Run { args } => {
            let xnet = build(&root)?;
            if args.is_empty() {
                return run(Command::new(lab_binary(&xnet)).arg("demo"));
            }
            run(Command::new(xnet).args(prepend("run", args)))
        }
        Cmd::Test { args } => {
            build(&root)?;
            let mut cmd = cargo(USER_TOOLCHAIN);
            cmd.current_dir(&root)
                .args(["test", "--release", "--workspace"])
                .args(&args)
                .env("XNET_EBPF_OBJ", ebpf_object(&root));
            run_tests(&mut cmd)?;
            if !args.is_empty() {
                return Ok(());
            }
            // SAFETY: geteuid has no preconditions.
            if unsafe { geteuid() } != 0 {
                step("SKIP the VM scenarios (vm-tests/): they need root; run `sudo cargo xtask vm-test`");
                return Ok(());
            }
            vm_test(&root, None, None, Duration::from_secs(1200))
        }
        Cmd::Fuzz { seconds } => fuzz(&root, seconds),
        Cmd::Package { verify } => {
            let xnet = build(&root)?;
            let deb = package::build(&root, &xnet)?;
            if verify {
                package::verify(&deb)?;
            }
            Ok(())
        }
        Cmd::Lab { scenario } if scenario == "cluster" => {
            // Namespaces on this host, no VM: etcd, BIRD and the firewalls run here.
            let xnet = build(&root)?;
            run(Command::new(lab_binary(&xnet)).arg("cluster"))
        }
        Cmd::Lab { scenario } => lab(&root, &scenario),
        Cmd::VmTest {
            scenario,
            exec,
            timeout,
        } => vm_test(&root, scenario, exec, Duration::from_secs(timeout)),
        Cmd::Bench { args } => {
            let xnet = build(&root)?;
            let mut cmd = Command::new(lab_binary(&xnet));
            cmd.arg("bench");
            // The real table ships with the repository (bench-data/README.md).
            let data = root.join("bench-data");
            if data.is_dir() && !args.iter().any(|a| a == "--table-dir") {
                cmd.arg("--table-dir").arg(data);
            }
            run(cmd.args(args))
        }
    }
}

/// The lab's binary (demo, benchmarks), built beside the agent.
fn lab_binary(xnet: &Path) -> PathBuf {
    xnet.with_file_name("xnet-lab")
}

fn prepend(first: &str, rest: Vec<OsString>) -> Vec<OsString> {
    std::iter::once(OsString::from(first)).chain(rest).collect()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn step(msg: &str) {
    eprintln!("xtask: {msg}");
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!(
            "{:?} {:?} failed: {status}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>()
        );
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and closes with one line that totals
/// every test binary's result.
fn run_tests(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        // "test result: ok. 8 passed; 0 failed; 0 ignored; ..."
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split([';', '.']) {
                let mut w = part.split_whitespace();
                if let (Some(n), Some(what)) =
                    (w.next().and_then(|n| n.parse::<u64>().ok()), w.next())
                {
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo +TOOLCHAIN`, through rustup so that the pinned toolchain is used whatever
/// toolchain runs xtask itself.
fn cargo(toolchain: &str) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", toolchain, "cargo"]);
    // Variables cargo set for xtask would leak into the inner build.
    for v in [
        "RUSTC",
        "RUSTDOC",
        "CARGO",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        c.env_remove(v);
    }
    c
}

fn setup(root: &Path) -> Result<()> {
    toolchain(USER_TOOLCHAIN, &["clippy", "rustfmt"])?;
    toolchain(BPF_TOOLCHAIN, &["rust-src"])?;
    bpf_linker(root)?;
    debian_packages()?;
    step("setup complete");
    Ok(())
}

fn toolchain(name: &str, components: &[&str]) -> Result<()> {
    let installed = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !installed.lines().any(|l| l.starts_with(name)) {
        step(&format!(
            "installing Rust toolchain {name} (minimal, with {})",
            components.join(", ")
        ));
        let mut cmd = Command::new("rustup");
        cmd.args(["toolchain", "install", name, "--profile", "minimal"]);
        for c in components {
            cmd.args(["--component", c]);
        }
        run(&mut cmd)?;
        return Ok(());
    }
    let have = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        name,
    ]))?;
    for c in components {
        if !have.lines().any(|l| l.starts_with(c)) {
            step(&format!("adding component {c} to {name}"));
            run(Command::new("rustup").args(["component", "add", c, "--toolchain", name]))?;
        }
    }
    Ok(())
}

fn tools_dir(root: &Path) -> PathBuf {
    root.join("target/tools")
}

fn bpf_linker_bin(root: &Path) -> PathBuf {
    tools_dir(root).join(format!(
        "bpf-linker-{BPF_LINKER_VERSION}-{BPF_TOOLCHAIN}/bin"
    ))
}

/// bpf-linker, built once against the pinned nightly's own libLLVM and cached in target/.
fn bpf_linker(root: &Path) -> Result<()> {
    let bin = bpf_linker_bin(root);
    if bin.join("bpf-linker").is_file() {
        return Ok(());
    }
    let sysroot =
        output(Command::new("rustup").args(["run", BPF_TOOLCHAIN, "rustc", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so")))
        .with_context(|| format!("no libLLVM in {}", lib.display()))?;
    // LLVM_PREFIX/lib must hold libLLVM.so and the versioned name llvm-sys looks for.
    let prefix = tools_dir(root).join(format!("llvm-{BPF_TOOLCHAIN}"));
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib)?;
    let versioned = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .unwrap_or(llvm.clone());
    for name in ["libLLVM.so".to_string(), versioned.clone()] {
        let link = plib.join(&name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&versioned), &link)?;
    }
    step(&format!("building bpf-linker {BPF_LINKER_VERSION} against {BPF_TOOLCHAIN}'s LLVM (about a minute, once)"));
    let dest = bin.parent().unwrap();
    let mut cmd = cargo(BPF_TOOLCHAIN);
    cmd.args([
        "install",
        "bpf-linker",
        "--locked",
        "--version",
        BPF_LINKER_VERSION,
        "--root",
    ])
    .arg(dest)
    .env("LLVM_PREFIX", &prefix);
    run(&mut cmd)
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| !String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } != 0 {
        step(&format!("not root: cannot install Debian packages {missing:?}; the tests that need them will skip"));
        return Ok(());
    }
    step(&format!("installing Debian packages {missing:?}"));
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    // Peers (FRR, BIRD, strongSwan) run per test in namespaces: their system services
    // must not start on install (policy-rc.d exit 101 = "not allowed"). An existing
    // policy is left as it is.
    let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        std::fs::write(
            policy,
            "#!/bin/sh\n# xtask: no services start while packages install\nexit 101\n",
        )?;
        run(Command::new("chmod").args(["755", "/usr/sbin/policy-rc.d"]))?;
    }
    let r = run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if ours {
        let _ = std::fs::remove_file(policy);
    }
    r
}

extern "C" {
    fn geteuid() -> u32;
}

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Runs the decoder fuzz target for `seconds`, installing cargo-fuzz (cached in target/)
/// the first time. A crash fails the run and leaves its input in xnet-user/fuzz/artifacts.
fn fuzz(root: &Path, seconds: u64) -> Result<()> {
    toolchain(BPF_TOOLCHAIN, &["rust-src"])?;
    let dest = tools_dir(root).join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let bin = dest.join("bin/cargo-fuzz");
    if !bin.is_file() {
        step(&format!("building cargo-fuzz {CARGO_FUZZ_VERSION} (once)"));
        let mut cmd = cargo(BPF_TOOLCHAIN);
        cmd.args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
            "--root",
        ])
        .arg(&dest);
        run(&mut cmd)?;
    }
    for (target, what) in [
        ("bgp_decode", "BGP decoder"),
        ("ike_decode", "IKEv2 decoder"),
    ] {
        step(&format!("fuzzing the {what} for {seconds} s"));
        let mut cmd = Command::new("rustup");
        cmd.args(["run", BPF_TOOLCHAIN])
            .arg(&bin)
            .args([
                "fuzz",
                "run",
                "--fuzz-dir",
                "xnet-user/fuzz",
                target,
                "--",
                &format!("-max_total_time={seconds}"),
            ])
            .current_dir(root)
            .env("CARGO_TARGET_DIR", root.join("target/fuzz"));
        for v in [
            "RUSTC",
            "RUSTDOC",
            "CARGO",
            "RUSTUP_TOOLCHAIN",
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
        ] {
            cmd.env_remove(v);
        }
        run(&mut cmd)?;
    }
    Ok(())
}

fn ebpf_object(root: &Path) -> PathBuf {
    root.join("target/bpfel-unknown-none/release/xnet")
}

/// Builds the XDP object, then the agent with the object embedded. Returns the agent.
fn build(root: &Path) -> Result<PathBuf> {
    setup(root)?;
    step("building the XDP program (xnet-ebpf)");
    let path = std::env::join_paths(std::iter::once(bpf_linker_bin(root)).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;
    let mut cmd = cargo(BPF_TOOLCHAIN);
    cmd.current_dir(root.join("xnet-ebpf"))
        .args(["build", "--release"])
        .env("PATH", path);
    run(&mut cmd)?;
    step("building the agent (xnet-user) and the lab (xnet-lab)");
    let mut cmd = cargo(USER_TOOLCHAIN);
    cmd.current_dir(root)
        .args(["build", "--release", "-p", "xnet-user", "-p", "xnet-lab"])
        .env("XNET_EBPF_OBJ", ebpf_object(root));
    run(&mut cmd)?;
    Ok(root.join("target/release/xnet"))
}

/// Test binaries that run in the VM, each with the tests it runs there unless a filter
/// is given: the scenarios, and the IPsec tests that need ESP and xfrm interfaces or send
/// traffic through the tunnel (the other IPsec tests run on the host).
/// Scenario 5 (firewall steering) is tests/steering.rs, run on the host and in the VM.
const VM_TESTS: &[(&str, &str)] = &[
    ("scenarios", ""),
    ("steering", ""),
    ("ipsec", "route_based"),
    ("ipsec", "certificates"),
];

fn vm_test(
    root: &Path,
    filter: Option<String>,
    exec: Option<String>,
    timeout: Duration,
) -> Result<()> {
    build(root)?;
    let assets = vm::assets(root)?;
    let script = match exec {
        Some(cmd) => format!("{VM_PRELUDE}{cmd}\n"),
        None => {
            let mut runs: Vec<(&str, &str)> = VM_TESTS
                .iter()
                .map(|(t, default)| (*t, filter.as_deref().unwrap_or(default)))
                .collect();
            // One filter for all: each binary once.
            runs.dedup();
            vm_test_script(root, &runs, "")?
        }
    };
    let path = root.join("target/vm/run.sh");
    std::fs::write(&path, script)?;
    step("booting the VM (QEMU, software emulation)");
    let t = std::time::Instant::now();
    let status = vm::boot(root, &assets, &path, timeout)?;
    step(&format!(
        "VM finished in {:.0} s with status {status}",
        t.elapsed().as_secs_f64()
    ));
    if status != 0 {
        bail!("vm-test failed (status {status})");
    }
    Ok(())
}

/// The start of every script the VM runs: from the work tree's root.
const VM_PRELUDE: &str = "set -u\ncd \"$(dirname \"$0\")/../..\"\n";

/// Builds the VM's test binaries and returns a script that runs each (binary, filter)
/// one test at a time and fails if any failed. `env`: more `NAME=value` to export.
fn vm_test_script(root: &Path, runs: &[(&str, &str)], env: &str) -> Result<String> {
    step("building the VM test binaries");
    let mut cmd = cargo(USER_TOOLCHAIN);
    cmd.current_dir(root)
        .args([
            "test",
            "--release",
            "-p",
            "xnet-user",
            "--no-run",
            "--message-format=json",
        ])
        .env("XNET_EBPF_OBJ", ebpf_object(root));
    for (t, _) in runs {
        cmd.args(["--test", t]);
    }
    let json = output(&mut cmd)?;
    let ci = if std::env::var_os("CI").is_some() {
        "true"
    } else {
        ""
    };
    let mut script = format!(
        "{VM_PRELUDE}export CI={ci} XNET_VM=1 XNET_EBPF_OBJ={} {env}\nstatus=0\n",
        ebpf_object(root).display()
    );
    for (t, filter) in runs {
        let exe = test_executable(&json, t)?;
        // One test at a time, each timed: the runtimes go into closing notes.
        script.push_str(&format!(
            "echo \"== {t}\"\nfor name in $({exe} --list --format terse {filter} | sed -n 's/: test$//p'); do\n  start=$(date +%s)\n  {exe} --exact --test-threads=1 --nocapture \"$name\" || status=1\n  echo \"== $name: $(( $(date +%s) - start )) s\"\ndone\n",
            exe = exe.display()
        ));
    }
    script.push_str("exit $status\n");
    Ok(script)
}

/// `cargo xtask lab SCENARIO`: (test binary, test name filter) of each scenario.
const LABS: &[(&str, &str, &str)] = &[
    ("s1", "scenarios", "s1_"),
    ("s2", "scenarios", "s2_zone"),
    ("s2f", "scenarios", "s2_failover_cxp_takes"),
    ("s2i", "scenarios", "s2_failover_cxp_over_ipsec"),
    ("s3", "scenarios", "s3_"),
    ("s4", "scenarios", "s4_"),
    ("s5", "steering", "steered_flows"),
    ("s6", "scenarios", "s6_"),
];

/// Brings a scenario up in the VM and hands its console to the user (XNET_LAB=1 makes
/// the scenario open a shell once it is up; leaving the shell tears it down).
fn lab(root: &Path, scenario: &str) -> Result<()> {
    let Some((_, test, filter)) = LABS.iter().find(|(s, _, _)| *s == scenario) else {
        bail!(
            "no lab {scenario:?} (there are: {})",
            LABS.iter().map(|l| l.0).collect::<Vec<_>>().join(", ")
        );
    };
    build(root)?;
    let assets = vm::assets(root)?;
    let script = vm_test_script(root, &[(test, filter)], "XNET_LAB=1")?;
    let path = root.join("target/vm/lab.sh");
    std::fs::write(&path, script)?;
    step(&format!("booting the VM for lab {scenario}: when it is up you get a shell; `exit` tears it down (QEMU: Ctrl-A X quits at once)"));
    vm::boot_interactive(root, &assets, &path)
}

/// The path of test binary `name` in `cargo test --no-run --message-format=json` output.
fn test_executable(json: &str, name: &str) -> Result<PathBuf> {
    json.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| {
            v["reason"] == "compiler-artifact"
                && v["target"]["name"] == name
                && v["profile"]["test"] == true
        })
        .and_then(|v| v["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("no test binary {name} in cargo's output"))
}
