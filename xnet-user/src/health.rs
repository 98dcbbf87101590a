//! Health checks of firewall instances: ICMP echo or TCP connect, one probe per interval;
//! `threshold` consecutive failures take an instance out, as many successes put it back.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::mpsc;

use serde::{Deserialize, Serialize};

/// A probe's result for (service index, instance index).
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub service: usize,
    pub instance: usize,
    pub ok: bool,
    /// How long the answer took (the echo reply, or the TCP handshake).
    pub rtt: Option<Duration>,
}

/// Probes `target` every `health.interval_ms` until the receiver is gone.
pub fn spawn(
    service: usize,
    instance: usize,
    target: IpAddr,
    health: Health,
    tx: mpsc::Sender<Probe>,
) {
    tokio::spawn(async move {
        let interval = Duration::from_millis(health.interval_ms);
        let mut tick = tokio::time::interval(interval);
        let mut seq: u16 = 0;
        loop {
            tick.tick().await;
            seq = seq.wrapping_add(1);
            let t0 = std::time::Instant::now();
            let ok = match health.kind {
                HealthKind::Tcp => {
                    let addr = SocketAddr::new(target, health.port.unwrap_or(0));
                    matches!(
                        tokio::time::timeout(interval, tokio::net::TcpStream::connect(addr)).await,
                        Ok(Ok(_))
                    )
                }
                HealthKind::Icmp => {
                    tokio::task::spawn_blocking(move || ping(target, seq, interval))
                        .await
                        .unwrap_or(false)
                }
            };
            let rtt = ok.then(|| t0.elapsed());
            if tx
                .send(Probe {
                    service,
                    instance,
                    ok,
                    rtt,
                })
                .await
                .is_err()
            {
                return;
            }
        }
    });
}

/// One ICMP echo to `target`, waiting up to `timeout` for its reply.
fn ping(target: IpAddr, seq: u16, timeout: Duration) -> bool {
    let (domain, proto, request, reply) = match target {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128, 129),
    };
    let Ok(sock) = Socket::new(domain, Type::RAW, Some(proto)) else {
        return false;
    };
    let id = (std::process::id() as u16) ^ 0x5a5a;
    let mut msg = vec![request, 0, 0, 0];
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(b"xnet-health");
    if target.is_ipv4() {
        // The kernel fills in the ICMPv6 checksum, not the ICMPv4 one.
        let c = xnet_common::csum::checksum(&msg);
        msg[2..4].copy_from_slice(&c.to_be_bytes());
    }
    let to = SocketAddr::new(target, 0);
    if sock.send_to(&msg, &to.into()).is_err() {
        return false;
    }
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            return false;
        };
        // SAFETY: recv_from initialised the first n bytes.
        let data: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        // Raw IPv4 sockets deliver the IP header too; ICMPv6 ones do not.
        let icmp = match target {
            IpAddr::V4(_) => data
                .get(((data.first().copied().unwrap_or(0) & 0x0f) as usize * 4)..)
                .unwrap_or(&[]),
            IpAddr::V6(_) => &data[..],
        };
        let from_ip = from.as_socket().map(|s| s.ip());
        if icmp.len() >= 8
            && icmp[0] == reply
            && icmp[4..6] == id.to_be_bytes()
            && icmp[6..8] == seq.to_be_bytes()
            && from_ip == Some(target)
        {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn one(kind: HealthKind, target: IpAddr, port: Option<u16>) -> bool {
        let (tx, mut rx) = mpsc::channel(1);
        spawn(
            0,
            0,
            target,
            Health {
                kind,
                port,
                interval_ms: 300,
                threshold: 1,
            },
            tx,
        );
        rx.recv().await.unwrap().ok
    }

    #[tokio::test]
    async fn tcp_check_sees_a_listener_and_a_closed_port() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(one(HealthKind::Tcp, "127.0.0.1".parse().unwrap(), Some(port)).await);
        drop(l);
        assert!(!one(HealthKind::Tcp, "127.0.0.1".parse().unwrap(), Some(port)).await);
    }

    #[tokio::test]
    async fn icmp_check_answers_for_loopback() {
        // Raw ICMP sockets need root; CI runs as root.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var_os("CI").is_none(), "CI must run as root");
            eprintln!("SKIP icmp_check_answers_for_loopback: needs root");
            return;
        }
        assert!(one(HealthKind::Icmp, "127.0.0.1".parse().unwrap(), None).await);
        assert!(one(HealthKind::Icmp, "::1".parse().unwrap(), None).await);
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    pub kind: HealthKind,
    /// TCP port for `kind = "tcp"`.
    pub port: Option<u16>,
    pub interval_ms: u64,
    /// Consecutive failures that take an instance out (and successes that put it back).
    pub threshold: u32,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            kind: HealthKind::Icmp,
            port: None,
            interval_ms: 500,
            threshold: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    Icmp,
    Tcp,
}
