//! Policy classification: a cache of decisions by equivalence class in front of a
//! tuple-space search.
//!
//! **Tuple-space search** (the exact answer): every rule is expanded into exact-match
//! entries of a hash map, one per combination of prefixes and port prefixes; entries that
//! share the same field masks form a tuple. A packet is masked once per tuple and looked
//! up: the cost grows with the number of distinct tuples (match shapes).
//!
//! **Class cache** (the usual answer, whatever the shapes): each field of a packet is first
//! mapped to its equivalence class: source and destination address to the longest rule
//! prefix that contains it (an LPM walk in the route-table structure, tables rooted at
//! `POLICY_META[META_CLASS_ROOTS..]`), source and destination port to the elementary
//! interval of the rules' port ranges (`PORT_CLASSES`). Packets with the same classes,
//! protocol and segment meet the same rules, so the decision of the first one is cached
//! (`FLOW_CLASSES`, an LRU map) under those classes and the rule set's epoch. A flood of
//! new flows between the same networks hits the cache; only a new combination of classes
//! pays the search.
//!
//! Rule sets are double-buffered: entries carry a generation (0 or 1) in their tuple id,
//! and `POLICY_META[META_EPOCH]` (generation = epoch & 1) says which one packets use. The
//! agent writes the new generation completely, then bumps that one `u32`: a packet sees the
//! old rule set or the new one, never a mix, and cached decisions of an old epoch are never
//! read again.

/// Tuples per generation.
pub const MAX_TUPLES: u32 = 256;
/// Firewall instances per service.
pub const MAX_INSTANCES: usize = 8;
/// Rules (ids) in one rule set.
pub const MAX_RULES: u32 = 16_384;
/// Exact-match entries across both generations.
pub const MAX_ENTRIES: u32 = 262_144;
pub const MAX_SERVICES: u32 = 256;
/// Cached class decisions (LRU).
pub const MAX_CACHED: u32 = 65_536;
/// `PORT_CLASSES` entries per generation: one per port.
pub const PORTS: u32 = 65_536;

/// `POLICY_META` slots.
pub const META_EPOCH: u32 = 0;
/// Tuples in generation 0 and 1.
pub const META_TUPLES_GEN0: u32 = 1;
pub const META_TUPLES_GEN1: u32 = 2;
/// Roots of the class tables: IPv4 source, IPv4 destination, IPv6 source, IPv6
/// destination.
pub const META_CLASS_ROOTS: u32 = 3;
pub const META_SLOTS: u32 = 7;

pub const ACTION_ALLOW: u8 = 0;
pub const ACTION_DENY: u8 = 1;
pub const ACTION_STEER: u8 = 2;

/// `RuleValue::rule` of a cached "no rule matches".
pub const NO_RULE: u32 = u32::MAX;

/// A packet's classes: the key of `FLOW_CLASSES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ClassKey {
    pub epoch: u32,
    pub segment: u16,
    pub family: u8,
    pub proto: u8,
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
}

/// The masks of one tuple; the tuple at index `generation * MAX_TUPLES + i`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Tuple {
    /// Address masks as [`words`], so XDP masks a whole address in four operations.
    pub src_mask: [u32; 4],
    pub dst_mask: [u32; 4],
    pub sport_mask: u16,
    pub dport_mask: u16,
    /// 0xff: protocol must match; 0: any.
    pub proto_mask: u8,
    pub _pad: [u8; 3],
    /// Best (lowest) rule priority among this tuple's entries: the search stops once a
    /// match beats every remaining tuple.
    pub best_priority: u32,
}

/// An exact-match entry: packet fields after masking with its tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RuleKey {
    /// `generation * MAX_TUPLES + tuple index`.
    pub tuple: u16,
    pub segment: u16,
    /// 4 or 6.
    pub family: u8,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// Not part of any key (0 in `RULES` and in the search): in the flow record, the
    /// rule classification matched + 1, for flow sampling.
    pub matched: u16,
    /// Addresses as [`words`].
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

/// Address bytes (IPv4's 4 or IPv6's 16) as the words `RuleKey` and `Tuple` hold, IPv4
/// in the first.
#[inline(always)]
pub fn words<const N: usize>(a: &[u8; N]) -> [u32; 4] {
    let mut w = [0u32; 4];
    let mut i = 0;
    while i + 4 <= N && i < 16 {
        w[i / 4] = u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
        i += 4;
    }
    w
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RuleValue {
    /// Index into `RULE_STATS`.
    pub rule: u32,
    /// Lower wins: the rule's position in the config.
    pub priority: u32,
    pub action: u8,
    pub _pad: [u8; 3],
    /// `steer`: index into `SERVICES`.
    pub service: u32,
    /// `allow` into another segment: that segment's table roots (`STAY` to route in the
    /// ingress segment).
    pub to_v4_root: u32,
    pub to_v6_root: u32,
}

/// `RuleValue::to_v4_root` when the packet stays in its segment.
pub const STAY: u32 = u32::MAX;

/// Slots of a service's Maglev lookup table: a prime far above `MAX_INSTANCES`, so a
/// change of the pool moves few flows beyond those that must move.
pub const MAGLEV_SLOTS: u32 = 1021;
/// `Service::table`'s length: `MAGLEV_SLOTS` rounded up to a power of two (the verifier
/// sees the index masked).
pub const MAGLEV_TABLE: usize = 1024;

/// A firewall service: its pool (next-hop ids in `NEXTHOPS`) and the Maglev table that
/// spreads flows over it by their symmetric hash.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Service {
    /// Instances in the pool; 0: none (the failure mode applies).
    pub count: u32,
    /// 1: drop when no instance is healthy; 0: bypass (route normally).
    pub fail_closed: u32,
    pub members: [u32; MAX_INSTANCES],
    /// Slot (hash scaled onto `MAGLEV_SLOTS`) → index into `members`.
    pub table: [u8; MAGLEV_TABLE],
}

/// Packets and bytes (per CPU in the maps).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "user",
    derive(bytemuck::Pod, bytemuck::Zeroable, serde::Serialize)
)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
