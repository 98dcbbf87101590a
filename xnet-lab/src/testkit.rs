//! Helpers shared by the integration tests: root check, private network namespaces, and
//! packet builders.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::lab::Lab;
use xnet_user::status::{self, Status};

use xnet_common::csum;

/// True when the test may run. Without root it prints why it skips; in CI (CI=true) a
/// missing root is a failure, so a skipped suite can never pass as green there.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs root, and CI must run these tests as root");
    }
    eprintln!("SKIP {test}: needs root (BPF and network namespaces); run `sudo cargo xtask test`");
    false
}

/// Runs `f` on a fresh thread inside a new, private network namespace (with `lo` up), so
/// interfaces the test creates vanish with it.
pub fn in_private_netns<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    std::thread::spawn(move || {
        // SAFETY: unshare only affects this thread, which ends with the test.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            panic!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        }
        sh("ip link set lo up");
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Whether the kernel can do what `cmd` asks (tried in a private namespace).
pub fn kernel_can(cmd: &'static str) -> bool {
    in_private_netns(move || {
        Command::new("sh")
            .args(["-c", cmd])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// xfrm interfaces (route-based IPsec): not in this host's kernel, in the VM's.
pub fn kernel_has_xfrm_interfaces() -> bool {
    kernel_can("ip link add xnet-probe type xfrm if_id 9")
}

/// ESP with AES-GCM in XFRM: not in this host's kernel, in the VM's.
pub fn kernel_has_esp() -> bool {
    kernel_can("ip xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 mode tunnel aead 'rfc4106(gcm(aes))' 0x0102030405060708091011121314151617181920 128")
}

/// Runs a shell command, panicking with its output on failure.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    if !out.status.success() {
        panic!(
            "`{cmd}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The ifindex of `name` in this thread's namespace (/sys may show another one).
pub fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name}");
    i
}

pub const MAC_H1: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const MAC_CXP: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc0];

/// Ethernet header.
pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(64);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&src);
    p.extend_from_slice(&ethertype.to_be_bytes());
    p
}

/// An IPv4 header (valid checksum) followed by `payload`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, ttl, proto, 0, 0];
    let len = (20 + payload.len()) as u16;
    h[2..4].copy_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = csum::checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, hop_limit: u8, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.push(next);
    h.push(hop_limit);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

/// A UDP or TCP header's first 8 bytes (ports, then zeros) and some payload bytes; the
/// fast path reads only the ports.
pub fn l4(sport: u16, dport: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0u8; 24]);
    p
}

pub fn udp4(src: &str, dst: &str, ttl: u8, sport: u16, dport: u16) -> Vec<u8> {
    let mut p = eth(MAC_CXP, MAC_H1, 0x0800);
    p.extend(ipv4(
        src.parse().unwrap(),
        dst.parse().unwrap(),
        ttl,
        17,
        &l4(sport, dport),
    ));
    p
}

pub fn udp6(src: &str, dst: &str, hop_limit: u8, sport: u16, dport: u16) -> Vec<u8> {
    let mut p = eth(MAC_CXP, MAC_H1, 0x86dd);
    p.extend(ipv6(
        src.parse().unwrap(),
        dst.parse().unwrap(),
        hop_limit,
        17,
        &l4(sport, dport),
    ));
    p
}

// ---- The agent in the lab, and traffic between the lab's hosts. ----

/// The agent binary the tests run (`xnet`, built beside them): a path that formats with
/// `{XNET}` and goes straight into `Command::new`.
pub struct Xnet;
pub const XNET: Xnet = Xnet;

impl Xnet {
    pub fn path(&self) -> &'static std::path::Path {
        static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        PATH.get_or_init(|| {
            crate::agent_binary().expect("the xnet binary (cargo xtask test builds it)")
        })
    }
}

impl std::fmt::Display for Xnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.path().display().fmt(f)
    }
}

impl AsRef<std::ffi::OsStr> for Xnet {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.path().as_os_str()
    }
}
/// Runs `f` on a thread that has entered namespace `ns`.
pub fn in_netns<R: Send + 'static>(ns: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns only changes this thread's network namespace.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns {path}"
        );
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// `xnet run --config PATH` inside the lab's cxp namespace.
pub fn agent_command(lab: &Lab, path: &std::path::Path) -> Command {
    agent_command_in(&lab.ns("cxp"), path)
}

/// `xnet run --config PATH` in namespace `ns`.
pub fn agent_command_in(ns: &str, path: &std::path::Path) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(XNET)
        .args(["run", "--config", path.to_str().unwrap()]);
    c
}

/// Where each thread of process `pid` waits, from /proc: its name, its state, the kernel
/// function it sleeps in and its kernel stack. A stalled agent's report says whether it
/// waits in a netlink or socket call or runs.
pub fn where_it_waits(pid: u32) -> String {
    let mut out = format!("threads of {pid}:");
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("{out} gone");
    };
    for t in tasks.flatten() {
        let d = t.path();
        let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rsplit(") ")
            .next()
            .and_then(|r| r.split(' ').next())
            .unwrap_or("?");
        out += &format!(
            "\n  {} {} state {state} wchan {}\n{}",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan").trim(),
            read("stack")
                .lines()
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    out
}

pub struct Agent {
    pub child: Option<Child>,
    /// The namespace it runs in.
    pub ns: String,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub stderr: PathBuf,
}

impl Agent {
    /// Starts the agent in the lab's cxp namespace and waits until every next hop is on the
    /// fast path (its MAC resolved).
    pub fn start(lab: &Lab, config: &str) -> Agent {
        Self::start_with_env(lab, config, &[])
    }

    /// `start` with extra environment variables for the agent.
    pub fn start_with_env(lab: &Lab, config: &str, env: &[(&str, &str)]) -> Agent {
        Self::start_in(lab, "cxp", config, env)
    }

    /// `start` in lab namespace `host` (a second CXP, say), with its own files.
    pub fn start_in(lab: &Lab, host: &str, config: &str, env: &[(&str, &str)]) -> Agent {
        Self::start_wrapped(lab, host, config, env, &[])
    }

    /// `start_in` with the agent run under `wrapper` (a command that execs what follows
    /// it: `setpriv …`, say).
    pub fn start_wrapped(
        lab: &Lab,
        host: &str,
        config: &str,
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Agent {
        let dir = match host {
            "cxp" => std::env::temp_dir().join(&lab.prefix),
            _ => std::env::temp_dir().join(format!("{}-{host}", lab.prefix)),
        };
        Self::spawn(&lab.ns(host), &dir, config, env, wrapper)
    }

    /// The agent in namespace `ns` with `config` written to `dir`/xnet.toml (the demo
    /// socket path replaced by `dir`/xnet.sock), once its next hops are on the fast path.
    pub fn spawn(
        ns: &str,
        dir: &std::path::Path,
        config: &str,
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Agent {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("xnet.sock");
        let path = dir.join("xnet.toml");
        let stderr = dir.join("agent.log");
        std::fs::write(
            &path,
            config.replace("/run/xnet/demo.sock", socket.to_str().unwrap()),
        )
        .unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .args(wrapper)
            .arg(XNET)
            .args(["run", "--config", path.to_str().unwrap()]);
        let child = cmd
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut agent = Agent {
            child: Some(child),
            ns: ns.to_string(),
            socket,
            config: path,
            stderr,
        };
        let start = Instant::now();
        loop {
            if let Some(s) = agent.try_status() {
                if s.routes
                    .iter()
                    .all(|r| r.next_hops.iter().all(|h| h.fast_path))
                {
                    break;
                }
            }
            if let Ok(Some(code)) = agent.child.as_mut().unwrap().try_wait() {
                panic!("agent exited ({code}): {}", agent.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "agent not ready in 10 s: {}\n{}",
                agent.log(),
                where_it_waits(agent.child.as_ref().unwrap().id())
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        agent
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn try_status(&self) -> Option<Status> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(status::fetch(&self.socket)).ok()
    }

    pub fn status(&self) -> Status {
        self.try_status()
            .unwrap_or_else(|| panic!("no status from the agent: {}", self.log()))
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our child (`ip netns exec` execs the agent in place).
        unsafe { libc::kill(self.child.as_ref().unwrap().id() as i32, sig) };
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.child.take().unwrap().wait().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}

/// How long a receiver waits for the next datagram before it stops counting: longer in
/// the VM, whose emulated CPUs stall now and then.
/// A receive buffer that holds a whole test burst. A frame that XDP redirects into veth
/// becomes an skb of a page's truesize, so the default 208 KiB buffer overflows after
/// about 50 datagrams when the reading thread lags (seen in the VM: UdpRcvbufErrors 1,
/// one datagram short of 100). What is measured is the path, not this buffer.
fn large_receive_buffer(s: &UdpSocket) {
    let size: libc::c_int = 8 << 20;
    // SAFETY: a valid socket and an int option value; SO_RCVBUFFORCE (root) is not capped
    // by net.core.rmem_max.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
}

fn quiet_period() -> Duration {
    if std::env::var_os("XNET_VM").is_some() {
        Duration::from_secs(3)
    } else {
        Duration::from_millis(700)
    }
}

/// Counts, in the background, the datagrams starting with `tag` that arrive at `dst` in
/// namespace `ns`, until none came for `quiet_period()`, and sets `warmed` when a
/// "warm-up" datagram arrives. Reading while the client sends, so the socket buffer
/// never decides the result.
fn udp_counter_warmed(
    lab: &Lab,
    ns: &str,
    dst: SocketAddr,
    tag: &'static [u8],
    warmed: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    let server = in_netns(&lab.ns(ns), move || {
        let s = UdpSocket::bind(dst).unwrap();
        large_receive_buffer(&s);
        s.set_read_timeout(Some(quiet_period())).unwrap();
        s
    });
    std::thread::spawn(move || {
        let mut got = 0;
        let mut buf = [0u8; 64];
        while let Ok((k, _)) = server.recv_from(&mut buf) {
            if buf[..k].starts_with(tag) {
                got += 1;
            } else if buf[..k].starts_with(b"warm-up") {
                warmed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        got
    })
}

/// Sends `n` UDP datagrams from `src` in namespace `from` to `dst` in namespace `to`;
/// returns how many arrived.
pub fn udp(lab: &Lab, from: &str, src: &str, to: &str, dst: &str, n: usize) -> usize {
    let dst: SocketAddr = dst.parse().unwrap();
    let warmed: std::sync::Arc<std::sync::atomic::AtomicBool> = Default::default();
    let server = udp_counter_warmed(lab, to, dst, b"datagram", warmed.clone());
    let src: SocketAddr = src.parse().unwrap();
    in_netns(&lab.ns(from), move || {
        let c = UdpSocket::bind(src).unwrap();
        // Warm up until one datagram gets through (up to 2 s: a path that is down stays
        // down): what is measured is the path, not ARP/ND on its first packet.
        let t = Instant::now();
        while !warmed.load(std::sync::atomic::Ordering::Relaxed)
            && t.elapsed() < Duration::from_secs(2)
        {
            let _ = c.send_to(b"warm-up", dst);
            std::thread::sleep(Duration::from_millis(50));
        }
        for i in 0..n {
            let _ = c.send_to(format!("datagram {i}").as_bytes(), dst);
            if i % 50 == 49 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    server.join().unwrap()
}

/// Sends `bytes` over TCP from namespace `from` to `dst` in `to`; returns what the server
/// counted.
pub fn tcp(lab: &Lab, from: &str, src: &str, to: &str, dst: &str, bytes: usize) -> usize {
    let dst: SocketAddr = dst.parse().unwrap();
    let listener = in_netns(&lab.ns(to), move || TcpListener::bind(dst).unwrap());
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut total = 0;
        let mut buf = vec![0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => total += k,
            }
        }
        total
    });
    let src: SocketAddr = src.parse().unwrap();
    in_netns(&lab.ns(from), move || {
        let mut s = connect_from(src, dst);
        let chunk = vec![0x5au8; 16384];
        let mut sent = 0;
        while sent < bytes {
            s.write_all(&chunk).unwrap();
            sent += chunk.len();
        }
    });
    server.join().unwrap()
}

/// A TCP connection from a chosen source address (std has no bind-before-connect).
pub fn connect_from(src: SocketAddr, dst: SocketAddr) -> TcpStream {
    // SAFETY: plain socket calls on a descriptor we own; converted into TcpStream below.
    unsafe {
        use std::os::fd::FromRawFd;
        let fam = if src.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let fd = libc::socket(fam, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let (sa, len) = sockaddr(src);
        assert_eq!(
            libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len),
            0,
            "bind {src}"
        );
        let stream = TcpStream::from_raw_fd(fd);
        let (da, dlen) = sockaddr(dst);
        let rc = libc::connect(fd, &da as *const _ as *const libc::sockaddr, dlen);
        assert_eq!(rc, 0, "connect {dst}: {}", std::io::Error::last_os_error());
        stream
    }
}

pub fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is valid; we fill the family-specific view.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        match a {
            SocketAddr::V4(v4) => {
                let sin = &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in);
                sin.sin_family = libc::AF_INET as u16;
                sin.sin_port = v4.port().to_be();
                sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
                (ss, std::mem::size_of::<libc::sockaddr_in>() as u32)
            }
            SocketAddr::V6(v6) => {
                let sin = &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6);
                sin.sin6_family = libc::AF_INET6 as u16;
                sin.sin6_port = v6.port().to_be();
                sin.sin6_addr.s6_addr = v6.ip().octets();
                (ss, std::mem::size_of::<libc::sockaddr_in6>() as u32)
            }
        }
    }
}

/// IPv4 UDP from the vnet1 workload to the on-prem workload: how many of `n` arrived.
/// The two firewall ports of `Lab::create_with_firewalls(_, 2)` in segment "prod" and the
/// service "fw" of their two instances (config text).
pub const FIREWALL_SERVICE: &str = r#"
[[interfaces]]
name = "fw1"
segment = "prod"
role = "firewall"

[[interfaces]]
name = "fw2"
segment = "prod"
role = "firewall"

[[services]]
name = "fw"
failure_mode = "closed"
health = { kind = "icmp", interval_ms = 200, threshold = 2 }
instances = [
  { name = "fw1", interface = "fw1", via = "10.0.11.2" },
  { name = "fw2", interface = "fw2", via = "10.0.12.2" },
]
"#;

/// UDP from VNet 1 to on-prem steered through service "fw" (`FIREWALL_SERVICE`).
pub const STEER_VNET_TO_ONPREM_UDP: &str = r#"
[[policies]]
name = "vnet-to-onprem-udp"
segment = "prod"
source = "10.1.0.0/16"
destination = "192.168.0.0/16"
protocol = "udp"
action = "steer"
service = "fw"
"#;

/// UDP to on-prem port 9999 denied (put it before a rule the same packets match).
pub const DENY_UDP_9999_TO_ONPREM: &str = r#"
[[policies]]
name = "deny-9999"
segment = "prod"
destination = "192.168.0.0/16"
protocol = "udp"
destination_ports = "9999"
action = "deny"
"#;

/// Firewall instances up in `s`.
pub fn healthy_instances(s: &Status) -> usize {
    s.services
        .iter()
        .flat_map(|x| &x.instances)
        .filter(|i| i.health == "up")
        .count()
}

/// (VNet→on-prem, on-prem→VNet) packets each of the lab's two firewalls forwarded.
pub fn firewall_counts(lab: &Lab) -> [(u64, u64); 2] {
    [
        lab.firewall_counts(1).unwrap(),
        lab.firewall_counts(2).unwrap(),
    ]
}

pub fn vnet1_to_onprem(lab: &Lab, n: usize) -> usize {
    udp(
        lab,
        "vnet1",
        "10.1.0.1:5000",
        "onprem",
        "192.168.10.1:9000",
        n,
    )
}

/// UDP from the VNet to 172.16.0.1 on-prem (a prefix the BGP tests' peers announce).
pub fn to_onprem_172(lab: &Lab, n: usize) -> usize {
    udp(
        lab,
        "vnet1",
        "10.1.0.1:5000",
        "onprem",
        "172.16.0.1:9000",
        n,
    )
}

/// Polls the agent's status until `cond` holds, failing after `limit`.
pub fn wait_until(agent: &Agent, what: &str, limit: Duration, cond: impl Fn(&Status) -> bool) {
    let t = Instant::now();
    while !cond(&agent.status()) {
        assert!(
            t.elapsed() < limit,
            "{what} within {limit:?}: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn lab(name: &str) -> Lab {
    lab_with_firewalls(name, 0)
}

/// `lab` with `firewalls` firewall namespaces (`Lab::create_with_firewalls`).
pub fn lab_with_firewalls(name: &str, firewalls: usize) -> Lab {
    Lab::create_with_firewalls(&format!("xt{}-{name}", std::process::id()), firewalls).expect("lab")
}

/// Runs `cmd` (an `xnet` subcommand, say), which must succeed; its standard output.
pub fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

// ---- BIRD, and the agent's BGP sessions. ----

/// BIRD 2 in one of the lab's namespaces.
pub struct Bird {
    child: Child,
    pub socket: String,
    ns: String,
    conf: String,
}

impl Bird {
    /// BIRD in the on-prem namespace with `conf`; the namespace owns `address`, so
    /// traffic to it can be checked end to end.
    pub fn with_config(lab: &Lab, conf: &str, address: &str) -> Bird {
        Self::in_host(lab, "onprem", conf, address)
    }

    /// BIRD in lab host `host` with `conf`; the namespace gets `address` on lo.
    pub fn in_host(lab: &Lab, host: &str, conf: &str, address: &str) -> Bird {
        Self::instance(lab, host, "bird", conf, address)
    }

    /// `in_host` for one of several BIRDs in one namespace (two routers sharing a host,
    /// each with `strict bind`), told apart by `name`.
    pub fn instance(lab: &Lab, host: &str, name: &str, conf: &str, address: &str) -> Bird {
        let dir = std::env::temp_dir().join(format!("{}-{name}-{host}", lab.prefix));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bird.conf");
        std::fs::write(&path, conf).unwrap();
        let socket = dir.join("bird.ctl").display().to_string();
        let ns = lab.ns(host);
        sh(&format!("ip -n {ns} addr add {address}/32 dev lo"));
        let conf = path.display().to_string();
        let child = Self::spawn(&ns, &conf, &socket, false);
        Bird {
            child,
            socket,
            ns,
            conf,
        }
    }

    /// `recovery`: start in graceful-restart recovery mode (`bird -R`).
    fn spawn(ns: &str, conf: &str, socket: &str, recovery: bool) -> Child {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, "bird", "-f", "-c", conf, "-s", socket]);
        if recovery {
            c.arg("-R");
        }
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bird (Debian bird2) is installed by cargo xtask setup")
    }

    /// `birdc graceful restart`: BIRD exits, closing its sessions without a NOTIFICATION
    /// so its peers keep its routes. Returns once it is gone.
    pub fn exit_for_graceful_restart(&mut self) {
        self.cmd("graceful restart");
        let _ = self.child.wait();
    }

    /// Starts BIRD again in recovery mode after `exit_for_graceful_restart`.
    pub fn recover(&mut self) {
        self.child = Self::spawn(&self.ns, &self.conf, &self.socket, true);
    }

    /// Replaces BIRD's config with `conf` and has it reread (`birdc configure`).
    pub fn reconfigure(&self, conf: &str) {
        std::fs::write(&self.conf, conf).unwrap();
        let out = self.cmd("configure");
        assert!(out.contains("Reconfigured"), "birdc configure: {out}");
    }

    pub fn cmd(&self, args: &str) -> String {
        sh(&format!(
            "ip netns exec {} birdc -s {} {args}",
            self.ns, self.socket
        ))
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether BGP's route for `prefix` is in the data plane.
pub fn in_data_plane(s: &Status, prefix: &str) -> bool {
    s.bgp_route(prefix).is_some_and(|r| r.in_data_plane)
}

pub fn established(s: &Status) -> usize {
    s.bgp.iter().filter(|b| b.state == "Established").count()
}

/// Edits the agent's config file (`from` must be in it) and reloads it (SIGHUP).
pub fn reconfigure(agent: &Agent, from: &str, to: &str) {
    let cfg = std::fs::read_to_string(&agent.config).unwrap();
    assert!(cfg.contains(from), "{from} not in the config");
    std::fs::write(&agent.config, cfg.replace(from, to)).unwrap();
    agent.signal(libc::SIGHUP);
}

/// `xnet peer-config CONNECTOR --format strongswan --include-psk` for the config at `path`.
pub fn peer_config(connector: &str, path: &std::path::Path) -> String {
    xnet_peer_config(
        path,
        &[connector, "--format", "strongswan", "--include-psk"],
    )
}

/// `xnet peer-config ARGS --config PATH`: its output, which must succeed.
pub fn xnet_peer_config(path: &std::path::Path, args: &[&str]) -> String {
    stdout_of(
        Command::new(XNET)
            .arg("peer-config")
            .args(args)
            .arg("--config")
            .arg(path),
    )
}

/// The id of the XDP program attached to `dev` in the lab's CXP.
pub fn xdp_prog_id(lab: &Lab, dev: &str) -> Option<String> {
    let out = sh(&format!("ip -n {} -d link show dev {dev}", lab.ns("cxp")));
    out.split_whitespace()
        .skip_while(|w| *w != "prog/xdp")
        .nth(2)
        .map(str::to_string)
}

/// `cargo xtask lab`: with XNET_LAB set, stops here with the scenario up and opens a
/// shell on the console, after printing `what_to_try`; leaving it tears the scenario down.
pub fn hold(lab: &Lab, agent: &Agent, what_to_try: &str) {
    if std::env::var_os("XNET_LAB").is_none() {
        return;
    }
    let p = &lab.prefix;
    println!(
        "\n=== the scenario is up ===\nnamespaces: {p}-cxp (the CXP), {p}-vnet1, {p}-vnet2, {p}-onprem{}\nagent: ip netns exec {} {XNET} status --socket {}\n       (also: bgp, ipsec, policy); its log: {}\n{what_to_try}\n`exit` tears it down.\n",
        (1..=lab.firewalls)
            .map(|k| format!(", {p}-fw{k}"))
            .collect::<String>(),
        agent.ns,
        agent.socket.display(),
        agent.stderr.display()
    );
    let _ = Command::new("bash").arg("-i").env("PS1", "lab# ").status();
}

/// Steady UDP flows (for failovers, restarts, migrations): `n` flows (source ports `port`, `port + 1`, …)
/// from one address to one destination, one datagram every millisecond in turn, each
/// carrying its flow and sequence number. The receiver notes when each arrives, so a
/// test sees which flows a failure hit and how long each was cut off.
pub struct Flows {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sender: std::thread::JoinHandle<Vec<u64>>,
    receiver: std::thread::JoinHandle<Vec<Vec<Instant>>>,
}

/// What one flow of [`Flows`] saw.
#[derive(Debug)]
pub struct Flow {
    pub sent: u64,
    pub arrivals: Vec<Instant>,
}

impl Flow {
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.arrivals.len() as u64)
    }

    /// The longest time without an arrival, between the first and the last.
    pub fn longest_gap(&self) -> Duration {
        self.arrivals
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }

    pub fn received_since(&self, t: Instant) -> usize {
        self.arrivals.iter().filter(|a| **a > t).count()
    }
}

impl Flows {
    pub fn start(lab: &Lab, from: (&str, &str), to: (&str, &str), n: u16, port: u16) -> Flows {
        use std::sync::atomic::Ordering;
        let stop: std::sync::Arc<std::sync::atomic::AtomicBool> = Default::default();
        let dst: SocketAddr = to.1.parse().unwrap();
        let server = in_netns(&lab.ns(to.0), move || {
            let s = UdpSocket::bind(dst).unwrap();
            large_receive_buffer(&s);
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            s
        });
        let src: IpAddr = from.1.parse().unwrap();
        let clients = in_netns(&lab.ns(from.0), move || {
            (0..n)
                .map(|k| UdpSocket::bind(SocketAddr::new(src, port + k)).unwrap())
                .collect::<Vec<_>>()
        });
        let done = stop.clone();
        let receiver = std::thread::spawn(move || {
            let mut seen = vec![Vec::new(); n as usize];
            let mut buf = [0u8; 64];
            let mut stopped: Option<Instant> = None;
            loop {
                if let Ok((k, _)) = server.recv_from(&mut buf) {
                    if k == 14 && buf.starts_with(b"flow") {
                        let f = u16::from_be_bytes([buf[4], buf[5]]) as usize;
                        if let Some(v) = seen.get_mut(f) {
                            v.push(Instant::now());
                        }
                    }
                }
                if done.load(Ordering::Relaxed) {
                    let t = *stopped.get_or_insert_with(Instant::now);
                    if t.elapsed() > quiet_period() {
                        return seen;
                    }
                }
            }
        });
        let done = stop.clone();
        let sender = std::thread::spawn(move || {
            let mut sent = vec![0u64; clients.len()];
            'out: loop {
                for (k, c) in clients.iter().enumerate() {
                    if done.load(Ordering::Relaxed) {
                        break 'out;
                    }
                    let mut msg = *b"flow\0\0\0\0\0\0\0\0\0\0";
                    msg[4..6].copy_from_slice(&(k as u16).to_be_bytes());
                    msg[6..].copy_from_slice(&sent[k].to_be_bytes());
                    // A datagram the stack refuses (a route that is gone) is lost too.
                    let _ = c.send_to(&msg, dst);
                    sent[k] += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            sent
        });
        Flows {
            stop,
            sender,
            receiver,
        }
    }

    /// Stops sending; once the last datagrams had time to arrive, what each flow saw.
    pub fn stop(self) -> Vec<Flow> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = self.sender.join().unwrap();
        let seen = self.receiver.join().unwrap();
        sent.into_iter()
            .zip(seen)
            .map(|(sent, arrivals)| Flow { sent, arrivals })
            .collect()
    }
}

// ---- FRR: a second BGP implementation beside BIRD. ----

/// FRR's zebra and bgpd (Debian `frr`) in one of the lab's namespaces, with their own
/// pid files, zserv and vty sockets, so several run side by side and none touches the
/// host's services.
pub struct Frr {
    zebra: Child,
    bgpd: Child,
    bfdd: Option<Child>,
    dir: PathBuf,
    ns: String,
}

impl Frr {
    /// FRR in lab host `host` with `bgpd.conf` text `conf`; the namespace gets `address`
    /// on lo.
    pub fn in_host(lab: &Lab, host: &str, conf: &str, address: &str) -> Frr {
        Self::start(lab, host, conf, None, address)
    }

    /// `in_host` with FRR's BFD daemon too, configured with `bfdd_conf` (its `bfd` block:
    /// peers, profiles); bgpd's `neighbor … bfd` reaches it through zebra.
    pub fn with_bfdd(lab: &Lab, host: &str, conf: &str, bfdd_conf: &str, address: &str) -> Frr {
        Self::start(lab, host, conf, Some(bfdd_conf), address)
    }

    fn start(lab: &Lab, host: &str, conf: &str, bfdd: Option<&str>, address: &str) -> Frr {
        let dir = std::env::temp_dir().join(format!("{}-frr-{host}", lab.prefix));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ns = lab.ns(host);
        sh(&format!("ip -n {ns} addr add {address}/32 dev lo"));
        std::fs::write(dir.join("zebra.conf"), "hostname zebra\n").unwrap();
        std::fs::write(dir.join("bgpd.conf"), conf).unwrap();
        if let Some(b) = bfdd {
            std::fs::write(dir.join("bfdd.conf"), b).unwrap();
        }
        // FRR drops to its own user: it must reach its files.
        sh(&format!(
            "chown -R frr:frr {0} && chmod 755 {0}",
            dir.display()
        ));
        let zserv = dir.join("zserv.api").display().to_string();
        let d = dir.display().to_string();
        let daemon = |name: &str| {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns, &format!("/usr/lib/frr/{name}")])
                .args(["-f", &format!("{d}/{name}.conf")])
                .args(["-i", &format!("{d}/{name}.pid")])
                .args(["-z", &zserv, "--vty_socket", &d, "-P", "0"])
                .args(["--log", &format!("file:{d}/{name}.log")]);
            if name == "bfdd" {
                c.args(["--bfdctl", &format!("{d}/bfdd.sock")]);
            }
            c.stdout(Stdio::null()).stderr(Stdio::null());
            c.spawn()
                .expect("FRR (Debian frr) is installed by cargo xtask setup")
        };
        let zebra = daemon("zebra");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::path::Path::new(&zserv).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let bfdd = bfdd.map(|_| daemon("bfdd"));
        let bgpd = daemon("bgpd");
        let frr = Frr {
            zebra,
            bgpd,
            bfdd,
            dir,
            ns,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !frr.dir.join("bgpd.vty").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        frr
    }

    /// `vtysh -c CMD` against this FRR.
    pub fn cmd(&self, cmd: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "vtysh", "--vty_socket"])
            .arg(&self.dir)
            .args(["-c", cmd])
            .output()
            .expect("vtysh");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A `show … json` command, parsed.
    pub fn json(&self, cmd: &str) -> serde_json::Value {
        serde_json::from_str(&self.cmd(cmd)).unwrap_or(serde_json::Value::Null)
    }

    /// Configuration commands, in order, in `configure terminal`.
    pub fn configure(&self, lines: &[&str]) {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, "vtysh", "--vty_socket"])
            .arg(&self.dir)
            .args(["-c", "configure terminal"]);
        for l in lines {
            c.args(["-c", l]);
        }
        let out = c.output().expect("vtysh");
        assert!(
            out.status.success(),
            "vtysh {lines:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    /// The BGP state of neighbour `peer` as FRR sees it ("Established", …).
    pub fn state(&self, peer: &str) -> String {
        self.json(&format!("show bgp neighbors {peer} json"))[peer]["bgpState"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// The prefixes in FRR's BGP table for `afi` ("ipv4"/"ipv6") with their paths.
    pub fn routes(&self, afi: &str) -> serde_json::Value {
        self.json(&format!("show bgp {afi} unicast json"))["routes"].clone()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bgpd.log")).unwrap_or_default()
    }

    /// Stops bfdd without a word to its peers (SIGKILL): to them the path is dead.
    pub fn kill_bfdd(&mut self) {
        if let Some(mut c) = self.bfdd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        for c in [&mut self.bgpd, &mut self.zebra]
            .into_iter()
            .chain(self.bfdd.as_mut())
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `cond` until it holds or `limit` passes; panics with `what` and `detail()`.
pub fn wait_for(what: &str, limit: Duration, cond: impl Fn() -> bool, detail: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() > deadline {
            panic!("{what}: not within {limit:?}\n{}", detail());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `GET path` from `addr` inside namespace `ns` (HTTP/1.0, the body).
pub fn http_get(ns: &str, addr: &str, path: &str) -> std::io::Result<String> {
    let (addr, path) = (addr.to_string(), path.to_string());
    in_netns(ns, move || {
        let mut s = TcpStream::connect(&addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        match out.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
                Ok(body.to_string())
            }
            _ => Err(std::io::Error::other(format!("GET {path}: {out}"))),
        }
    })
}

/// A real Prometheus server (Debian's `prometheus`) in a namespace, scraping `targets`
/// every second; stopped on drop.
pub struct Prometheus {
    child: Child,
    ns: String,
    dir: PathBuf,
}

impl Prometheus {
    pub const LISTEN: &'static str = "127.0.0.1:19090";

    pub fn start(ns: &str, job: &str, targets: &[&str]) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("{ns}-prometheus"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "prometheus"])
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={}", Self::LISTEN))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus (Debian package `prometheus`; cargo xtask setup installs it)");
        Prometheus {
            child,
            ns: ns.to_string(),
            dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query through the HTTP API: each series' labels and value.
    pub fn query(&self, q: &str) -> Vec<(serde_json::Value, f64)> {
        let enc: String = q
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let Ok(body) = http_get(
            &self.ns,
            Self::LISTEN,
            &format!("/api/v1/query?query={enc}"),
        ) else {
            return Vec::new();
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]["result"]
            .as_array()
            .map(|r| {
                r.iter()
                    .map(|s| {
                        let value = s["value"][1]
                            .as_str()
                            .unwrap_or("NaN")
                            .parse()
                            .unwrap_or(f64::NAN);
                        (s["metric"].clone(), value)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The value of a query that yields one series (None: no such series yet).
    pub fn value(&self, q: &str) -> Option<f64> {
        let r = self.query(q);
        (r.len() == 1).then(|| r[0].1)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
