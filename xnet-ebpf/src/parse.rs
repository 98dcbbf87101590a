//! Zero-copy views of the headers the fast path reads. Every access is checked against
//! `data_end` first, in the form the verifier can follow.

use aya_ebpf::programs::{TcContext, XdpContext};

/// What the parsers need of a packet: where its bytes start and end. XDP frames and TC
/// socket buffers both give direct access to their (linear) head.
pub trait Packet {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    /// Bytes of the whole packet, for counters.
    fn len(&self) -> u64;
}

/// `len`: the frame's bytes for XDP, the socket buffer's (head and fragments) for TC.
macro_rules! packet {
    ($t:ty, $len:expr) => {
        impl Packet for $t {
            #[inline(always)]
            fn start(&self) -> usize {
                self.data()
            }
            #[inline(always)]
            fn end(&self) -> usize {
                self.data_end()
            }
            #[inline(always)]
            fn len(&self) -> u64 {
                $len(self)
            }
        }
    };
}
packet!(XdpContext, |c: &XdpContext| (c.data_end() - c.data())
    as u64);
packet!(TcContext, |c: &TcContext| c.len() as u64);

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ESP: u8 = 50;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Ethernet header fields: destination and source MAC, EtherType.
pub const ETH_DST: usize = 0;
pub const ETH_SRC: usize = 6;
pub const ETH_TYPE: usize = 12;
pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;

/// A pointer to `T` at `off` bytes into the packet, if the whole `T` is inside it.
#[inline(always)]
pub fn ptr_at<T, P: Packet>(ctx: &P, off: usize) -> Option<*mut T> {
    let start = ctx.start();
    let end = ctx.end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
pub fn read<T: Copy, P: Packet>(ctx: &P, off: usize) -> Option<T> {
    // SAFETY: ptr_at checked the bounds; packet data has no alignment guarantee.
    ptr_at::<T, P>(ctx, off).map(|p| unsafe { p.read_unaligned() })
}

/// The IPv4 header without options (RFC 791 §3.1), fields by name.
#[derive(Clone, Copy)]
pub struct Ipv4(pub [u8; IPV4_HLEN]);

impl Ipv4 {
    pub const TTL: usize = 8;
    pub const CHECKSUM: usize = 10;

    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.0[0] >> 4
    }
    /// Header length in 32-bit words (5 without options).
    #[inline(always)]
    pub fn ihl(&self) -> u8 {
        self.0[0] & 0x0f
    }
    /// The More Fragments flag and the fragment offset: non-zero for a fragment.
    #[inline(always)]
    pub fn fragment(&self) -> u16 {
        u16::from_be_bytes([self.0[6], self.0[7]]) & 0x3fff
    }
    #[inline(always)]
    pub fn ttl(&self) -> u8 {
        self.0[Self::TTL]
    }
    #[inline(always)]
    pub fn protocol(&self) -> u8 {
        self.0[9]
    }
    #[inline(always)]
    pub fn src(&self) -> [u8; 4] {
        [self.0[12], self.0[13], self.0[14], self.0[15]]
    }
    #[inline(always)]
    pub fn dst(&self) -> [u8; 4] {
        [self.0[16], self.0[17], self.0[18], self.0[19]]
    }
}

/// The IPv6 header's first 8 bytes (RFC 8200 §3): version to hop limit; the addresses
/// follow at `SRC` and `DST`.
#[derive(Clone, Copy)]
pub struct Ipv6(pub [u8; 8]);

impl Ipv6 {
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: usize = 8;
    pub const DST: usize = 24;

    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.0[0] >> 4
    }
    #[inline(always)]
    pub fn next_header(&self) -> u8 {
        self.0[6]
    }
    #[inline(always)]
    pub fn hop_limit(&self) -> u8 {
        self.0[Self::HOP_LIMIT]
    }
}

/// Layer 3 as found after the Ethernet header (and at most one VLAN tag).
pub struct L2 {
    pub ethertype: u16,
    /// Offset of the layer-3 header.
    pub l3: usize,
}

#[inline(always)]
pub fn ethernet<P: Packet>(ctx: &P) -> Option<L2> {
    let mut ethertype = u16::from_be(read::<u16, P>(ctx, ETH_TYPE)?);
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = u16::from_be(read::<u16, P>(ctx, ETH_HLEN + 2)?);
        l3 += VLAN_HLEN;
    }
    Some(L2 { ethertype, l3 })
}

/// Source and destination ports of a TCP/UDP header at `l4`, zero for other protocols or
/// when the header is cut short (the kernel deals with those).
#[inline(always)]
pub fn ports<P: Packet>(ctx: &P, proto: u8, l4: usize) -> (u16, u16) {
    if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        if let Some(p) = read::<[u8; 4], P>(ctx, l4) {
            return (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            );
        }
    }
    (0, 0)
}
