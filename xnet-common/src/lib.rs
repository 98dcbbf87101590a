//! Types shared by the XDP program (`xnet-ebpf`) and the agent (`xnet-user`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding so both sides agree on the
//! layout byte for byte; with the `user` feature they also implement `bytemuck::Pod` and
//! `aya::Pod`.
#![no_std]

pub mod csum;
pub mod ipsec;
pub mod policy;
pub mod route;

pub use route::*;

/// Most next hops in one ECMP group.
pub const MAX_ECMP: usize = 16;

/// Names of the BPF maps and programs, so the agent never spells them twice.
pub mod names {
    pub const PROG_FORWARD: &str = "xnet_forward";
    pub const PROG_BENCH_BASE: &str = "xnet_bench_base";
    pub const PROG_BENCH_DIR: &str = "xnet_bench_dir";
    pub const PROG_BENCH_TRIE: &str = "xnet_bench_trie";
    pub const PROG_BENCH_DIR_BATCH: &str = "xnet_bench_dir_batch";
    pub const PROG_BENCH_TRIE_BATCH: &str = "xnet_bench_trie_batch";
    pub const MAP_ROUTE_NODES: &str = "ROUTE_NODES";
    pub const MAP_INTERFACES: &str = "INTERFACES";
    pub const MAP_NEXTHOPS: &str = "NEXTHOPS";
    pub const MAP_NH_GROUPS: &str = "NH_GROUPS";
    pub const MAP_TX_PORTS: &str = "TX_PORTS";
    pub const MAP_LOCAL_V4: &str = "LOCAL_V4";
    pub const MAP_LOCAL_V6: &str = "LOCAL_V6";
    pub const MAP_LOCAL_FILTER: &str = "LOCAL_FILTER";
    pub const MAP_COUNTS: &str = "COUNTS";
    pub const MAP_POLICY_META: &str = "POLICY_META";
    pub const MAP_PORT_CLASSES: &str = "PORT_CLASSES";
    pub const MAP_FLOW_CLASSES: &str = "FLOW_CLASSES";
    pub const MAP_TUPLES: &str = "TUPLES";
    pub const MAP_RULES: &str = "RULES";
    pub const MAP_RULE_STATS: &str = "RULE_STATS";
    pub const MAP_SERVICES: &str = "SERVICES";
    pub const MAP_NH_STATS: &str = "NH_STATS";
    pub const MAP_TUNNELS: &str = "TUNNELS";
    pub const MAP_FLOW_SAMPLES: &str = "FLOW_SAMPLES";
    pub const PROG_TUNNEL_IN: &str = "xnet_tunnel_in";
    pub const MAP_BENCH_TRIE_V4: &str = "BENCH_TRIE_V4";
    pub const MAP_BENCH_TRIE_V6: &str = "BENCH_TRIE_V6";
    pub const MAP_BENCH_ROOTS: &str = "BENCH_ROOTS";
    pub const PROG_BENCH_GEN: &str = "xnet_bench_gen";
    pub const PROG_BENCH_SINK: &str = "xnet_bench_sink";
    pub const PROG_BENCH_REDIRECT: &str = "xnet_bench_redirect";
    pub const PROG_BENCH_BOUNCE: &str = "xnet_bench_bounce";
    pub const PROG_BENCH_PASS: &str = "xnet_bench_pass";
    pub const MAP_BENCH_GEN: &str = "BENCH_GEN";
    pub const MAP_BENCH_DSTS: &str = "BENCH_DSTS";
    pub const MAP_BENCH_COUNT: &str = "BENCH_COUNT";
    pub const MAP_BENCH_NH: &str = "BENCH_NH";
}

/// Map sizes compiled into the object; `ROUTE_NODES` is sized by the agent at load time.
pub mod limits {
    /// Destination addresses per packet in the batch benchmark programs.
    pub const BENCH_BATCH: usize = 16;
    pub const INTERFACES: u32 = 1024;
    /// `INTERFACES` is an array indexed by ifindex (no hashing per packet): the highest
    /// ifindex an interface of the config may have, plus one.
    pub const IFINDEX: u32 = 65_536;
    pub const NEXTHOPS: u32 = 65_536;
    pub const NH_GROUPS: u32 = 65_536;
    pub const LOCAL_ADDRS: u32 = 4096;
    pub const BENCH_TRIE: u32 = 1_048_576;
    /// Destinations the packet generator cycles through.
    pub const BENCH_DSTS: u32 = 65_536;
}

/// Per ingress interface: which segment it belongs to and where that segment's route
/// tables start in `ROUTE_NODES` (group indexes, see [`route`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct IfConfig {
    /// 0: not an interface of the config.
    pub segment: u32,
    pub v4_root: u32,
    pub v6_root: u32,
    pub flags: u32,
    /// Its counters' index in `IF_STATS` (0: none).
    pub slot: u32,
    /// Flow sampling: one packet in `sample` goes to `FLOW_SAMPLES` (0: off). The
    /// segment's `flow_sample`.
    pub sample: u32,
}

/// A sampled packet, from XDP to the agent through the `FLOW_SAMPLES` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowSample {
    /// Addresses as `policy::words` (IPv4 in the first word).
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub ingress: u32,
    /// The interface it was sent out of (0: not sent by XDP).
    pub egress: u32,
    pub segment: u32,
    /// The policy rule it matched + 1 (0: none).
    pub rule: u32,
    /// The frame's length as it came in.
    pub bytes: u32,
    pub sport: u16,
    pub dport: u16,
    /// 4 or 6.
    pub family: u8,
    pub proto: u8,
    /// `Reason` as its index.
    pub reason: u8,
    pub _pad: u8,
}

/// Room for samples between two reads by the agent (a power of two, in bytes).
pub const FLOW_SAMPLES_BYTES: u32 = 1 << 18;

/// `IfConfig::flags`: the port faces a firewall; its packets come back from one and are
/// routed without being classified again (no steering loops).
pub const IF_F_FIREWALL: u32 = 1;
/// `IfConfig::flags`: traffic no policy matches is dropped (segment default deny).
pub const IF_F_DEFAULT_DENY: u32 = 2;

/// The next hop is usable: its MAC is known and its egress port is in `TX_PORTS`.
pub const NH_F_VALID: u32 = 1;
/// The next hop is an IPsec tunnel: the kernel's XFRM encrypts, so XDP passes the packet.
pub const NH_F_KERNEL: u32 = 2;

/// Where a routed packet leaves: egress interface and the two MACs it gets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct NextHop {
    pub ifindex: u32,
    pub flags: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// The egress port's slot: its index in `TX_PORTS` (an array: no hashing per packet).
    pub port: u32,
}

/// An ECMP group: `count` members, each an index into `NEXTHOPS`.
///
/// Members are written before `count` grows and after it shrinks, so a packet that reads a
/// half-updated group still picks a member that was valid in the old or the new group.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct NhGroup {
    pub count: u32,
    pub members: [u32; MAX_ECMP],
}

/// Per-interface packet and byte counters, summed by the agent from `COUNTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "user",
    derive(bytemuck::Pod, bytemuck::Zeroable, serde::Serialize)
)]
pub struct IfStats {
    pub rx: u64,
    pub forwarded: u64,
    pub passed: u64,
    pub dropped: u64,
    /// Bytes of the same packets, as they came in (from the Ethernet header on).
    pub rx_bytes: u64,
    pub forwarded_bytes: u64,
    pub passed_bytes: u64,
    pub dropped_bytes: u64,
}

/// A packet's fate, by its reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Forwarded,
    Passed,
    Dropped,
}

impl Outcome {
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Passed => "passed",
            Outcome::Dropped => "dropped",
        }
    }
}

/// Why a packet was not forwarded by XDP: with the interface's slot, the index into the
/// `COUNTS` per-CPU array (`slot * Reason::COUNT + reason`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Forwarded by XDP (not a pass reason; counted for completeness).
    Forwarded = 0,
    /// Addressed to one of the host's own addresses.
    PassLocal,
    PassArp,
    /// IPv6 neighbour discovery / router solicitation and advertisement.
    PassNd,
    /// TTL or hop limit ≤ 1: the kernel sends ICMP time exceeded.
    PassTtl,
    PassIpOptions,
    PassFragment,
    /// The chosen next hop's MAC is not resolved yet (or its port is not ready).
    PassNoNeighbour,
    PassEsp,
    /// UDP 500 or 4500.
    PassIke,
    /// TCP 179.
    PassBgp,
    PassNoRoute,
    /// Neither IPv4 nor IPv6 (or an unsupported tag stack).
    PassNotIp,
    /// Multicast, broadcast or link-local destination.
    PassMulticast,
    /// IPv6 hop-by-hop options: routers must look at them.
    PassHopByHop,
    /// Ingress interface has no xnet configuration.
    PassNoInterface,
    /// Truncated or inconsistent headers.
    DropMalformed,
    /// A `deny` policy, or the segment's default deny.
    DropPolicy,
    /// `steer` to a fail-closed service with no healthy instance.
    DropFailClosed,
    /// Forwarded to a firewall instance by a `steer` policy.
    Steered,
    /// Routed into an IPsec tunnel: the kernel's XFRM encrypts it.
    PassTunnel,
    /// Decrypted, but its source is not routed back into a tunnel: the kernel's inbound
    /// policy check judges it.
    PassTunnelSource,
}

impl Reason {
    pub const COUNT: u32 = Reason::PassTunnelSource as u32 + 1;
    pub const ALL: [Reason; Reason::COUNT as usize] = [
        Reason::Forwarded,
        Reason::PassLocal,
        Reason::PassArp,
        Reason::PassNd,
        Reason::PassTtl,
        Reason::PassIpOptions,
        Reason::PassFragment,
        Reason::PassNoNeighbour,
        Reason::PassEsp,
        Reason::PassIke,
        Reason::PassBgp,
        Reason::PassNoRoute,
        Reason::PassNotIp,
        Reason::PassMulticast,
        Reason::PassHopByHop,
        Reason::PassNoInterface,
        Reason::DropMalformed,
        Reason::DropPolicy,
        Reason::DropFailClosed,
        Reason::Steered,
        Reason::PassTunnel,
        Reason::PassTunnelSource,
    ];

    /// What happened to a packet counted with this reason: every reason belongs to one
    /// outcome, so per-interface outcomes are sums of its reasons.
    pub const fn outcome(self) -> Outcome {
        match self {
            Reason::Forwarded | Reason::Steered => Outcome::Forwarded,
            Reason::DropMalformed | Reason::DropPolicy | Reason::DropFailClosed => Outcome::Dropped,
            _ => Outcome::Passed,
        }
    }

    /// The reason with discriminant `i` (`PassNotIp` for an index no reason has).
    #[inline(always)]
    pub const fn from_index(i: u32) -> Reason {
        if i < Self::COUNT {
            // SAFETY: Reason is repr(u32) with the discriminants 0..COUNT.
            unsafe { core::mem::transmute::<u32, Reason>(i) }
        } else {
            Reason::PassNotIp
        }
    }

    /// Stable name used in status output and tests.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Forwarded => "forwarded",
            Reason::PassLocal => "pass_local",
            Reason::PassArp => "pass_arp",
            Reason::PassNd => "pass_nd",
            Reason::PassTtl => "pass_ttl",
            Reason::PassIpOptions => "pass_ip_options",
            Reason::PassFragment => "pass_fragment",
            Reason::PassNoNeighbour => "pass_no_neighbour",
            Reason::PassEsp => "pass_esp",
            Reason::PassIke => "pass_ike",
            Reason::PassBgp => "pass_bgp",
            Reason::PassNoRoute => "pass_no_route",
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassMulticast => "pass_multicast",
            Reason::PassHopByHop => "pass_hop_by_hop",
            Reason::PassNoInterface => "pass_no_interface",
            Reason::DropMalformed => "drop_malformed",
            Reason::DropPolicy => "drop_policy",
            Reason::DropFailClosed => "drop_fail_closed",
            Reason::Steered => "steered",
            Reason::PassTunnel => "pass_tunnel",
            Reason::PassTunnelSource => "pass_tunnel_source",
        }
    }
}

/// `LOCAL_FILTER` words: 65,536 bits.
pub const LOCAL_FILTER_WORDS: u32 = 1024;

/// The bit of `LOCAL_FILTER` for an address held as words (as `policy::words` makes them):
/// (word index, mask). A clear bit proves the address is not the host's, so most packets
/// skip the `LOCAL_V4`/`LOCAL_V6` hash lookup; a set bit only means "look it up".
#[inline(always)]
pub fn local_filter_bit(w: &[u32; 4]) -> (u32, u64) {
    let h = (w[0] ^ w[1] ^ w[2] ^ w[3]).wrapping_mul(0x9e37_79b1) >> 16;
    (h >> 6, 1u64 << (h & 63))
}

/// The packet generator of `xnet bench` (`xnet_bench_gen`): every frame it sends is
/// `frame` (Ethernet, IPv4, UDP), with the source port counting through `flows` values
/// (0: a random port, each frame a new flow) and, when `dsts` > 0, the destination cycling
/// through the first `dsts` entries of `BENCH_DSTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct BenchGen {
    pub flows: u32,
    pub dsts: u32,
    pub frame: [u8; BENCH_FRAME],
}

/// Bytes of a generated frame: Ethernet 14 + IPv4 20 + UDP 8 + 22 of payload, the
/// usual 64-byte test frame.
pub const BENCH_FRAME: usize = 64;

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are repr(C), Copy, without padding holes (checked by bytemuck::Pod).
    unsafe impl aya::Pod for super::IfConfig {}
    unsafe impl aya::Pod for super::NextHop {}
    unsafe impl aya::Pod for super::NhGroup {}
    unsafe impl aya::Pod for super::IfStats {}
    unsafe impl aya::Pod for super::policy::Tuple {}
    unsafe impl aya::Pod for super::policy::RuleKey {}
    unsafe impl aya::Pod for super::policy::RuleValue {}
    unsafe impl aya::Pod for super::policy::Service {}
    unsafe impl aya::Pod for super::policy::Counter {}
    unsafe impl aya::Pod for super::BenchGen {}
    unsafe impl aya::Pod for super::policy::ClassKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_fixed() {
        // The XDP program and the agent are built by different compilers for different
        // targets: pin the sizes both rely on.
        assert_eq!(core::mem::size_of::<IfConfig>(), 24);
        assert_eq!(core::mem::size_of::<FlowSample>(), 60);
        assert_eq!(core::mem::size_of::<NextHop>(), 24);
        assert_eq!(core::mem::size_of::<NhGroup>(), 4 + 4 * MAX_ECMP);
        assert_eq!(core::mem::size_of::<IfStats>(), 64);
        assert_eq!(core::mem::size_of::<policy::Tuple>(), 44);
        assert_eq!(core::mem::size_of::<policy::RuleKey>(), 44);
        assert_eq!(core::mem::size_of::<policy::RuleValue>(), 24);
        assert_eq!(
            core::mem::size_of::<policy::Service>(),
            8 + 4 * policy::MAX_INSTANCES + policy::MAGLEV_TABLE
        );
    }

    #[test]
    fn reasons_are_dense_and_named() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert!(!r.name().is_empty());
        }
    }
}
