//! Helpers shared by the integration tests: root check, private network namespaces, and
//! packet builders.
#![allow(dead_code)]

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;

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
