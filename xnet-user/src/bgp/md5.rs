//! TCP-MD5 signatures for BGP sessions (RFC 2385): the key of a neighbour is set on the
//! listening socket (for its address) and on each socket that connects to it, and the
//! kernel's TcpExt counters tell a key mismatch from a peer that is simply not there.
//! Keys come from a file or an environment variable, never from the config, and are
//! never logged.

use std::net::IpAddr;
use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};

use super::config::{Bgp, Neighbor};

/// Linux's TCP_MD5SIG_MAXKEYLEN.
pub const MAX_KEY_LEN: usize = 80;

/// A neighbour's key; its Debug does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key(<{} bytes>)", self.0.len())
    }
}

impl Key {
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Reads neighbour `i`'s key (`password_file`: its first line; `password_env`), if it
/// has one. Errors name the config file and the field.
pub fn load(n: &Neighbor, i: usize, file: &str) -> Result<Option<Key>> {
    let raw = match (&n.password_file, &n.password_env) {
        (Some(p), _) => std::fs::read_to_string(p).with_context(|| {
            format!(
                "{file}: bgp.neighbors[{i}].password_file: cannot read {}",
                p.display()
            )
        })?,
        (_, Some(v)) => std::env::var(v)
            .with_context(|| format!("{file}: bgp.neighbors[{i}].password_env: {v} is not set"))?,
        _ => return Ok(None),
    };
    let key = raw.lines().next().unwrap_or("").trim_end_matches('\r');
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        bail!(
            "{file}: bgp.neighbors[{i}]: the TCP-MD5 password must be 1 to {MAX_KEY_LEN} bytes (it has {})",
            key.len()
        );
    }
    Ok(Some(Key(key.as_bytes().to_vec())))
}

/// Every neighbour's key (or none) by address, read once per start or reload.
pub fn load_all(bgp: &Bgp, file: &str) -> Result<Keys> {
    bgp.neighbors
        .iter()
        .enumerate()
        .map(|(i, n)| Ok((n.address, load(n, i, file)?)))
        .collect()
}

pub type Keys = std::collections::HashMap<IpAddr, Option<Key>>;

/// Linux's `struct tcp_md5sig` (include/uapi/linux/tcp.h).
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: libc::c_int,
    key: [u8; MAX_KEY_LEN],
}

/// Sets (or with `None` removes) the key for segments to and from `peer` on `sock`. On
/// an IPv6 socket an IPv4 peer is given as its v4-mapped address, which the kernel
/// files as an IPv4 key (a dual-stack listener serves both).
pub fn set(sock: &impl AsRawFd, peer: IpAddr, key: Option<&Key>) -> std::io::Result<()> {
    // SAFETY: all-zero is a valid sockaddr_storage and byte array.
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    let v6_socket = {
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: ss is large enough for any address, len says how large.
        let r = unsafe {
            libc::getsockname(
                sock.as_raw_fd(),
                &mut ss as *mut _ as *mut libc::sockaddr,
                &mut len,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        ss.ss_family as i32 == libc::AF_INET6
    };
    let addr = match (peer, v6_socket) {
        (IpAddr::V4(a), false) => SockAddr::V4(a),
        (IpAddr::V4(a), true) => SockAddr::V6(a.to_ipv6_mapped()),
        (IpAddr::V6(a), _) => SockAddr::V6(a),
    };
    // SAFETY: sockaddr_storage holds either form.
    unsafe {
        match addr {
            SockAddr::V4(a) => {
                let sin = &mut sig.addr as *mut _ as *mut libc::sockaddr_in;
                (*sin).sin_family = libc::AF_INET as libc::sa_family_t;
                (*sin).sin_addr.s_addr = u32::from(a).to_be();
            }
            SockAddr::V6(a) => {
                let sin6 = &mut sig.addr as *mut _ as *mut libc::sockaddr_in6;
                (*sin6).sin6_family = libc::AF_INET6 as libc::sa_family_t;
                (*sin6).sin6_addr.s6_addr = a.octets();
            }
        }
    }
    if let Some(k) = key {
        sig.keylen = k.0.len() as u16;
        sig.key[..k.0.len()].copy_from_slice(&k.0);
    }
    // SAFETY: sig is a complete tcp_md5sig.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            &sig as *const _ as *const libc::c_void,
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        // Removing a key that is not there is no error.
        if key.is_none() && e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

enum SockAddr {
    V4(std::net::Ipv4Addr),
    V6(std::net::Ipv6Addr),
}

/// The kernel's TCP-MD5 drop counters of this network namespace (TcpExt in
/// /proc/net/netstat): segments without a signature where one was expected
/// (TCPMD5NotFound), with one where none was (TCPMD5Unexpected), with a wrong one
/// (TCPMD5Failure).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub not_found: u64,
    pub unexpected: u64,
    pub failure: u64,
}

impl Counters {
    pub fn read() -> Counters {
        std::fs::read_to_string("/proc/net/netstat")
            .map(|t| Self::parse(&t))
            .unwrap_or_default()
    }

    fn parse(text: &str) -> Counters {
        let mut lines = text.lines();
        let mut c = Counters::default();
        while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
            if !names.starts_with("TcpExt:") {
                continue;
            }
            for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
                let v = v.parse().unwrap_or(0);
                match n {
                    "TCPMD5NotFound" => c.not_found = v,
                    "TCPMD5Unexpected" => c.unexpected = v,
                    "TCPMD5Failure" => c.failure = v,
                    _ => {}
                }
            }
        }
        c
    }

    /// What grew since `before`, as words for an operator, or None.
    pub fn explain_since(&self, before: &Counters) -> Option<String> {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        let (nf, un, fa) = (
            d(self.not_found, before.not_found),
            d(self.unexpected, before.unexpected),
            d(self.failure, before.failure),
        );
        let mut parts = Vec::new();
        if fa > 0 {
            parts.push(format!(
                "{fa} with a wrong signature (the passwords differ)"
            ));
        }
        if nf > 0 {
            parts.push(format!("{nf} unsigned where a password is set"));
        }
        if un > 0 {
            parts.push(format!("{un} signed where no password is set"));
        }
        (!parts.is_empty()).then(|| {
            format!(
                "TCP-MD5 mismatch: the kernel dropped segments: {}",
                parts.join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse_and_explain() {
        let text = "TcpExt: SyncookiesSent TCPMD5NotFound TCPMD5Unexpected TCPMD5Failure\n\
                    TcpExt: 0 3 0 2\n\
                    IpExt: InNoRoutes\nIpExt: 0\n";
        let c = Counters::parse(text);
        assert_eq!(
            c,
            Counters {
                not_found: 3,
                unexpected: 0,
                failure: 2
            }
        );
        let s = c.explain_since(&Counters::default()).unwrap();
        assert!(
            s.contains("2 with a wrong signature") && s.contains("3 unsigned"),
            "{s}"
        );
        assert_eq!(c.explain_since(&c), None);
    }

    #[test]
    fn keys_set_and_removed_on_real_sockets() {
        let l6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let l4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let k = Key(b"s3cret".to_vec());
        for l in [&l6, &l4] {
            set(l, "127.0.0.2".parse().unwrap(), Some(&k)).unwrap();
            set(l, "127.0.0.2".parse().unwrap(), None).unwrap();
            set(l, "127.0.0.3".parse().unwrap(), None).unwrap();
        }
        set(&l6, "::2".parse().unwrap(), Some(&k)).unwrap();
        assert!(format!("{k:?}").contains("6 bytes") && !format!("{k:?}").contains("s3cret"));
    }
}
