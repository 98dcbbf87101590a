//! A small XFRM netlink module: ESP SAs (XFRM_MSG_NEWSA/DELSA) and policies
//! (XFRM_MSG_UPDPOLICY/DELPOLICY), tunnel mode. The kernel does the ESP work; the agent
//! only installs what IKE negotiated. No crate covered XFRM well enough to trust without
//! the same tests, so the structs are written out here from <linux/xfrm.h>, with their
//! sizes asserted.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::crypto::{Encr, Integ, Secret};
use super::packet::TrafficSelector;

const NETLINK_XFRM: i32 = 6;
const XFRM_MSG_NEWSA: u16 = 0x10;
const XFRM_MSG_DELSA: u16 = 0x11;
const XFRM_MSG_GETSA: u16 = 0x12;
const XFRM_MSG_DELPOLICY: u16 = 0x14;
/// Adds a policy or replaces the one with the same selector and direction: a rekeyed or
/// second CHILD SA re-installs policies that exist (NEWPOLICY would fail with EEXIST).
const XFRM_MSG_UPDPOLICY: u16 = 0x19;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;

const XFRMA_ALG_CRYPT: u16 = 2;
const XFRMA_ENCAP: u16 = 4;
const UDP_ENCAP_ESPINUDP: u16 = 2;
const XFRMA_TMPL: u16 = 5;
const XFRMA_ALG_AEAD: u16 = 18;
const XFRMA_ALG_AUTH_TRUNC: u16 = 20;
const XFRMA_IF_ID: u16 = 31;

const IPPROTO_ESP: u8 = 50;
const XFRM_MODE_TUNNEL: u8 = 1;

pub const DIR_IN: u8 = 0;
pub const DIR_OUT: u8 = 1;
pub const DIR_FWD: u8 = 2;

/// An ESP SA, one direction.
#[derive(Debug, Clone)]
pub struct Sa {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub spi: u32,
    pub reqid: u32,
    pub encr: Encr,
    pub integ: Option<Integ>,
    pub enc_key: Secret,
    pub auth_key: Secret,
    /// Seconds after which the kernel expires the SA (0: never; IKE rekeys before).
    pub lifetime: u64,
    pub replay_window: u8,
    /// ESP in UDP (NAT-T, RFC 3948): (our port, the peer's port).
    pub encap: Option<(u16, u16)>,
    /// Route-based tunnels: the xfrm interface's if_id (its traffic only).
    pub if_id: Option<u32>,
}

/// A tunnel-mode policy: traffic between the selectors goes through (or must come from)
/// the SA with `reqid` between the tunnel endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub src: TrafficSelector,
    pub dst: TrafficSelector,
    pub dir: u8,
    /// Tunnel endpoints (outer addresses) in the direction of the traffic.
    pub tun_src: IpAddr,
    pub tun_dst: IpAddr,
    pub reqid: u32,
    pub priority: u32,
    /// Route-based tunnels: only packets routed into the xfrm interface with this if_id
    /// meet the policy, so routes, not selectors, decide what enters the tunnel.
    pub if_id: Option<u32>,
}

fn family(a: &IpAddr) -> u16 {
    if a.is_ipv4() {
        libc::AF_INET as u16
    } else {
        libc::AF_INET6 as u16
    }
}

/// xfrm_address_t: 16 octets, an IPv4 address in the first 4.
fn address(a: &IpAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    match a {
        IpAddr::V4(v) => b[..4].copy_from_slice(&v.octets()),
        IpAddr::V6(v) => b.copy_from_slice(&v.octets()),
    }
    b
}

/// struct xfrm_selector (56 octets).
fn selector(src: &TrafficSelector, dst: &TrafficSelector) -> Vec<u8> {
    let mut b = vec![0u8; 56];
    let plen = |t: &TrafficSelector| {
        t.to_net()
            .map(|n| n.prefix_len())
            .unwrap_or(if t.start.is_ipv4() { 32 } else { 128 })
    };
    b[0..16].copy_from_slice(&address(&dst.start));
    b[16..32].copy_from_slice(&address(&src.start));
    // A single port is matched; a range is not expressible in a selector: any port.
    let port = |t: &TrafficSelector| {
        if t.start_port == t.end_port {
            (t.start_port, 0xffffu16)
        } else {
            (0, 0)
        }
    };
    let (dp, dm) = port(dst);
    let (sp, sm) = port(src);
    b[32..34].copy_from_slice(&dp.to_be_bytes());
    b[34..36].copy_from_slice(&dm.to_be_bytes());
    b[36..38].copy_from_slice(&sp.to_be_bytes());
    b[38..40].copy_from_slice(&sm.to_be_bytes());
    b[40..42].copy_from_slice(&family(&src.start).to_ne_bytes());
    b[42] = plen(dst);
    b[43] = plen(src);
    b[44] = src.protocol.max(dst.protocol);
    b
}

fn lifetime_cfg(hard_secs: u64) -> Vec<u8> {
    let inf = u64::MAX;
    let mut b = Vec::with_capacity(64);
    for v in [inf, inf, inf, inf, 0, hard_secs, 0, 0] {
        b.extend_from_slice(&v.to_ne_bytes());
    }
    b
}

fn attr(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn alg_name(name: &str) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[..name.len()].copy_from_slice(name.as_bytes());
    b
}

/// XFRM_MSG_NEWSA body: xfrm_usersa_info (224 octets) and the algorithm attributes.
pub fn newsa_body(sa: &Sa) -> Vec<u8> {
    let any = TrafficSelector {
        protocol: 0,
        start_port: 0,
        end_port: 65535,
        start: if sa.src.is_ipv4() {
            "0.0.0.0".parse().unwrap()
        } else {
            "::".parse().unwrap()
        },
        end: sa.src,
    };
    let mut b = selector(&any, &any);
    // A tunnel SA's selector is left wide: policies decide what enters.
    b[42] = 0;
    b[43] = 0;
    // xfrm_id
    b.extend_from_slice(&address(&sa.dst));
    b.extend_from_slice(&sa.spi.to_be_bytes());
    b.push(IPPROTO_ESP);
    b.extend_from_slice(&[0; 3]);
    b.extend_from_slice(&address(&sa.src));
    b.extend(lifetime_cfg(sa.lifetime));
    b.extend_from_slice(&[0u8; 32]); // curlft
    b.extend_from_slice(&[0u8; 12]); // stats
    b.extend_from_slice(&0u32.to_ne_bytes()); // seq
    b.extend_from_slice(&sa.reqid.to_ne_bytes());
    b.extend_from_slice(&family(&sa.src).to_ne_bytes());
    b.push(XFRM_MODE_TUNNEL);
    b.push(sa.replay_window);
    b.push(0); // flags
    b.resize(224, 0);
    match sa.encr {
        Encr::AesGcm16(_) => {
            let mut a = alg_name("rfc4106(gcm(aes))").to_vec();
            a.extend_from_slice(&((sa.enc_key.bytes().len() * 8) as u32).to_ne_bytes());
            a.extend_from_slice(&128u32.to_ne_bytes());
            a.extend_from_slice(sa.enc_key.bytes());
            attr(&mut b, XFRMA_ALG_AEAD, &a);
        }
        Encr::AesCbc(_) => {
            let mut c = alg_name("cbc(aes)").to_vec();
            c.extend_from_slice(&((sa.enc_key.bytes().len() * 8) as u32).to_ne_bytes());
            c.extend_from_slice(sa.enc_key.bytes());
            attr(&mut b, XFRMA_ALG_CRYPT, &c);
            if let Some(i) = sa.integ {
                let mut a = alg_name(i.xfrm_name()).to_vec();
                a.extend_from_slice(&((sa.auth_key.bytes().len() * 8) as u32).to_ne_bytes());
                a.extend_from_slice(&((i.icv_len() * 8) as u32).to_ne_bytes());
                a.extend_from_slice(sa.auth_key.bytes());
                attr(&mut b, XFRMA_ALG_AUTH_TRUNC, &a);
            }
        }
    }
    if let Some((sport, dport)) = sa.encap {
        // struct xfrm_encap_tmpl: type, source and destination port, original address.
        let mut e = UDP_ENCAP_ESPINUDP.to_ne_bytes().to_vec();
        e.extend_from_slice(&sport.to_be_bytes());
        e.extend_from_slice(&dport.to_be_bytes());
        e.extend_from_slice(&[0; 2]);
        e.extend_from_slice(&[0; 16]);
        attr(&mut b, XFRMA_ENCAP, &e);
    }
    if_id(&mut b, sa.if_id);
    b
}

fn if_id(b: &mut Vec<u8>, id: Option<u32>) {
    if let Some(id) = id {
        attr(b, XFRMA_IF_ID, &id.to_ne_bytes());
    }
}

/// XFRM_MSG_DELSA body: xfrm_usersa_id.
fn delsa_body(dst: &IpAddr, spi: u32) -> Vec<u8> {
    let mut b = address(dst).to_vec();
    b.extend_from_slice(&spi.to_be_bytes());
    b.extend_from_slice(&family(dst).to_ne_bytes());
    b.push(IPPROTO_ESP);
    b.push(0);
    b
}

/// XFRM_MSG_UPDPOLICY (NEWPOLICY) body: xfrm_userpolicy_info (168 octets) and one template.
pub fn newpolicy_body(p: &Policy) -> Vec<u8> {
    let mut b = selector(&p.src, &p.dst);
    b.extend(lifetime_cfg(0));
    b.extend_from_slice(&[0u8; 32]);
    b.extend_from_slice(&p.priority.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes()); // index
    b.push(p.dir);
    b.push(0); // action: allow
    b.push(0); // flags
    b.push(0); // share
    b.resize(168, 0);
    // xfrm_user_tmpl (64 octets)
    let mut t = address(&p.tun_dst).to_vec();
    t.extend_from_slice(&0u32.to_be_bytes()); // any SPI
    t.push(IPPROTO_ESP);
    t.extend_from_slice(&[0; 3]);
    t.extend_from_slice(&family(&p.tun_dst).to_ne_bytes());
    t.extend_from_slice(&[0; 2]);
    t.extend_from_slice(&address(&p.tun_src));
    t.extend_from_slice(&p.reqid.to_ne_bytes());
    t.push(XFRM_MODE_TUNNEL);
    t.push(0); // share
    t.push(0); // optional
    t.push(0);
    for _ in 0..3 {
        t.extend_from_slice(&u32::MAX.to_ne_bytes()); // any algorithm
    }
    debug_assert_eq!(t.len(), 64);
    attr(&mut b, XFRMA_TMPL, &t);
    if_id(&mut b, p.if_id);
    b
}

/// XFRM_MSG_DELPOLICY body: xfrm_userpolicy_id.
fn delpolicy_body(p: &Policy) -> Vec<u8> {
    let mut b = selector(&p.src, &p.dst);
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.push(p.dir);
    b.resize(64, 0);
    // The kernel keys policies by if_id too.
    if_id(&mut b, p.if_id);
    b
}

/// A NETLINK_XFRM socket.
pub struct Xfrm {
    fd: OwnedFd,
    seq: u32,
}

impl Xfrm {
    pub fn open() -> io::Result<Xfrm> {
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_XFRM,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: a valid timeval of the right size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        Ok(Xfrm { fd, seq: 1 })
    }

    /// Sends one netlink message; returns its sequence number.
    fn send(&mut self, kind: u16, flags: u16, body: &[u8]) -> io::Result<u32> {
        self.seq += 1;
        let mut m = Vec::with_capacity(16 + body.len());
        m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        m.extend_from_slice(&self.seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        // SAFETY: sending our own buffer on our socket (the kernel is the destination).
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                m.as_ptr() as *const libc::c_void,
                m.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// The next reply to `seq`: (type, whole message).
    fn reply(&mut self, seq: u32) -> io::Result<(u16, Vec<u8>)> {
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: receiving into our own buffer.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            if n < 20 {
                return Err(io::Error::other("short netlink reply"));
            }
            if u32::from_ne_bytes(buf[8..12].try_into().unwrap()) != seq {
                continue;
            }
            let kind = u16::from_ne_bytes([buf[4], buf[5]]);
            if kind == NLMSG_ERROR {
                let err = i32::from_ne_bytes(buf[16..20].try_into().unwrap());
                if err != 0 {
                    return Err(io::Error::from_raw_os_error(-err));
                }
            }
            buf.truncate(n);
            return Ok((kind, buf));
        }
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&mut self, kind: u16, flags: u16, body: &[u8]) -> io::Result<()> {
        let seq = self.send(kind, NLM_F_ACK | flags, body)?;
        self.reply(seq).map(|_| ())
    }

    pub fn add_sa(&mut self, sa: &Sa) -> io::Result<()> {
        self.request(XFRM_MSG_NEWSA, NLM_F_CREATE | NLM_F_EXCL, &newsa_body(sa))
    }

    pub fn del_sa(&mut self, dst: &IpAddr, spi: u32) -> io::Result<()> {
        self.request(XFRM_MSG_DELSA, 0, &delsa_body(dst, spi))
    }

    /// Adds the policy, or updates the existing one with its selector and direction.
    pub fn add_policy(&mut self, p: &Policy) -> io::Result<()> {
        self.request(XFRM_MSG_UPDPOLICY, NLM_F_CREATE, &newpolicy_body(p))
    }

    pub fn del_policy(&mut self, p: &Policy) -> io::Result<()> {
        self.request(XFRM_MSG_DELPOLICY, 0, &delpolicy_body(p))
    }

    /// Bytes and packets through an SA (its current lifetime), for status.
    pub fn sa_counters(&mut self, dst: &IpAddr, spi: u32) -> io::Result<(u64, u64)> {
        let seq = self.send(XFRM_MSG_GETSA, 0, &delsa_body(dst, spi))?;
        let (kind, m) = self.reply(seq)?;
        if kind != XFRM_MSG_NEWSA || m.len() < 16 + 224 {
            return Err(io::Error::other("no SA"));
        }
        let info = &m[16..];
        let bytes = u64::from_ne_bytes(info[160..168].try_into().unwrap());
        let packets = u64::from_ne_bytes(info[168..176].try_into().unwrap());
        Ok((bytes, packets))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(n: &str) -> TrafficSelector {
        TrafficSelector::from_net(n.parse().unwrap())
    }

    #[test]
    fn struct_sizes_match_the_kernel_headers() {
        let sa = Sa {
            src: "192.0.2.1".parse().unwrap(),
            dst: "192.0.2.2".parse().unwrap(),
            spi: 0xc0ffee01,
            reqid: 7,
            encr: Encr::AesCbc(128),
            integ: Some(Integ::HmacSha256_128),
            enc_key: Secret::new(vec![1; 16]),
            auth_key: Secret::new(vec![2; 32]),
            lifetime: 3600,
            replay_window: 32,
            encap: None,
            if_id: None,
        };
        let b = newsa_body(&sa);
        // usersa_info, then crypt (4+64+4+16) and auth-trunc (4+64+4+4+32).
        assert_eq!(b.len(), 224 + 88 + 108);
        assert_eq!(&b[56..72], &address(&sa.dst));
        assert_eq!(&b[72..76], &0xc0ffee01u32.to_be_bytes());
        assert_eq!(b[76], IPPROTO_ESP);
        assert_eq!(&b[208..212], &7u32.to_ne_bytes());
        assert_eq!(b[214], XFRM_MODE_TUNNEL);
        let p = Policy {
            src: ts("10.1.0.0/16"),
            dst: ts("192.168.0.0/16"),
            dir: DIR_OUT,
            tun_src: sa.src,
            tun_dst: sa.dst,
            reqid: 7,
            priority: 1000,
            if_id: None,
        };
        let b = newpolicy_body(&p);
        assert_eq!(b.len(), 168 + 4 + 64);
        assert_eq!((b[42], b[43]), (16, 16));
        assert_eq!(b[160], DIR_OUT);
        assert_eq!(delpolicy_body(&p).len(), 64);
        assert_eq!(delsa_body(&sa.dst, 1).len(), 24);
        // Route-based: one more attribute, XFRMA_IF_ID (31) with a u32.
        let routed = Policy {
            if_id: Some(0x101),
            ..p.clone()
        };
        let b = newpolicy_body(&routed);
        assert_eq!(b.len(), 168 + 4 + 64 + 8);
        assert_eq!(&b[236..240], &[8, 0, 31, 0]);
        assert_eq!(&b[240..244], &0x101u32.to_ne_bytes());
        assert_eq!(delpolicy_body(&routed).len(), 64 + 8);
        let sa = Sa {
            if_id: Some(0x101),
            ..sa
        };
        assert_eq!(newsa_body(&sa).len(), 224 + 88 + 108 + 8);
    }

    /// Needs root (a private network namespace); the kernel checks the structures.
    #[test]
    fn kernel_accepts_policies_and_parses_sas() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP kernel_accepts_policies_and_parses_sas: needs root");
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: only this thread's namespace changes.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let mut x = Xfrm::open().unwrap();
            let p = Policy {
                src: ts("10.1.0.0/16"),
                dst: ts("192.168.0.0/16"),
                dir: DIR_OUT,
                tun_src: "192.0.2.1".parse().unwrap(),
                tun_dst: "192.0.2.2".parse().unwrap(),
                reqid: 7,
                priority: 1000,
                if_id: None,
            };
            x.add_policy(&p).unwrap();
            // Again, as a rekey or a second CHILD SA with the same selectors does: an
            // update, not "File exists".
            x.add_policy(&p).unwrap();
            // The same selectors bound to an xfrm interface are a policy of their own.
            let routed = Policy {
                if_id: Some(0x101),
                ..p.clone()
            };
            x.add_policy(&routed).unwrap();
            let shown = std::process::Command::new("ip")
                .args(["xfrm", "policy"])
                .output()
                .unwrap();
            let shown = String::from_utf8_lossy(&shown.stdout);
            assert!(
                shown.contains("src 10.1.0.0/16 dst 192.168.0.0/16"),
                "{shown}"
            );
            assert!(
                shown.contains("tmpl src 192.0.2.1 dst 192.0.2.2"),
                "{shown}"
            );
            assert!(shown.contains("reqid 7 mode tunnel"), "{shown}");
            assert!(shown.contains("if_id 0x101"), "{shown}");
            x.del_policy(&p).unwrap();
            assert!(x.del_policy(&p).is_err(), "gone");
            x.del_policy(&routed).unwrap();
            assert!(x.del_policy(&routed).is_err(), "gone");
            // SAs: a kernel without ESP refuses them after parsing the request (ENOENT /
            // EPROTONOSUPPORT / ENOSYS), a kernel with ESP takes them.
            let sa = Sa {
                src: "192.0.2.1".parse().unwrap(),
                dst: "192.0.2.2".parse().unwrap(),
                spi: 0xc0ffee01,
                reqid: 7,
                encr: Encr::AesGcm16(256),
                integ: None,
                enc_key: Secret::new(vec![1; 36]),
                auth_key: Secret::default(),
                lifetime: 3600,
                replay_window: 32,
                encap: Some((4500, 4500)),
                if_id: Some(0x101),
            };
            match x.add_sa(&sa) {
                Ok(()) => x.del_sa(&sa.dst, sa.spi).unwrap(),
                Err(e) => assert_ne!(
                    e.raw_os_error(),
                    Some(libc::EINVAL),
                    "malformed request: {e}"
                ),
            }
        })
        .join()
        .unwrap();
    }
}
