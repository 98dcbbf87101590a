//! Every map the XDP programs share with the agent. Names and sizes come from
//! `xnet_common::{names, limits}` so the agent cannot disagree with them.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMap, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use xnet_common::policy::{self, ClassKey, Counter, RuleKey, RuleValue, Service, Tuple};
use xnet_common::{limits, route::GROUP_SIZE, BenchGen, IfConfig, NextHop, NhGroup, Reason};

/// Lets user space mmap the array (linux/bpf.h).
const BPF_F_MMAPABLE: u32 = 1 << 10;
/// An LRU list per CPU instead of one shared one (linux/bpf.h).
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

/// Route tables of every segment (see `xnet_common::route`), one group of 256 entries per
/// element: array elements are 8-byte aligned, so a bare `u32` element would waste half the
/// memory and not be contiguous for the agent's mmap. Sized by the agent at load time; the
/// agent writes it through mmap, one `u32` store per entry.
#[map]
pub static ROUTE_NODES: Array<[u32; GROUP_SIZE as usize]> =
    Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Ingress ifindex → segment and its route-table roots (an array: no hashing per packet).
#[map]
pub static INTERFACES: Array<IfConfig> = Array::with_max_entries(limits::IFINDEX, 0);

/// IPsec connector (by `xnet_common::ipsec::connector_of` its SAs' reqid) → the segment
/// its decrypted packets belong to; segment 0: not ours.
#[map]
pub static TUNNELS: Array<IfConfig> =
    Array::with_max_entries(xnet_common::ipsec::MAX_CONNECTORS, 0);

#[map]
pub static NEXTHOPS: Array<NextHop> = Array::with_max_entries(limits::NEXTHOPS, 0);

#[map]
pub static NH_GROUPS: Array<NhGroup> = Array::with_max_entries(limits::NH_GROUPS, 0);

/// Egress ports for `XDP_REDIRECT`, by interface slot (`NextHop::port`).
#[map]
pub static TX_PORTS: DevMap = DevMap::with_max_entries(limits::INTERFACES + 1, 0);

/// The host's own addresses: packets to them go to the kernel.
#[map]
pub static LOCAL_V4: HashMap<[u8; 4], u32> = HashMap::with_max_entries(limits::LOCAL_ADDRS, 0);
#[map]
pub static LOCAL_V6: HashMap<[u8; 16], u32> = HashMap::with_max_entries(limits::LOCAL_ADDRS, 0);
/// A one-hash Bloom filter of those addresses (`xnet_common::local_filter_bit`).
#[map]
pub static LOCAL_FILTER: Array<u64> = Array::with_max_entries(xnet_common::LOCAL_FILTER_WORDS, 0);

/// Packets and bytes per interface slot (`IfConfig::slot`; 0: none of ours) and reason,
/// from which the agent sums per-interface outcomes and per-reason totals.
#[map]
pub static COUNTS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries((limits::INTERFACES + 1) * Reason::COUNT, 0);

/// Sampled packets for flow export (`flows`), read by the agent.
#[map]
pub static FLOW_SAMPLES: RingBuf = RingBuf::with_byte_size(xnet_common::FLOW_SAMPLES_BYTES, 0);

/// Benchmark only: the same table in the kernel's LPM trie, for comparison.
#[map]
pub static BENCH_TRIE_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(limits::BENCH_TRIE, 0);
#[map]
pub static BENCH_TRIE_V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(limits::BENCH_TRIE, 0);
/// Benchmark only: [v4 root, v6 root] of the table `xnet_bench_dir` looks up.
#[map]
pub static BENCH_ROOTS: Array<u32> = Array::with_max_entries(2, 0);

/// Benchmark only: the packet generator's frame and settings.
#[map]
pub static BENCH_GEN: Array<BenchGen> = Array::with_max_entries(1, 0);
/// Benchmark only: the generator's destinations (IPv4, network order).
#[map]
pub static BENCH_DSTS: Array<[u8; 4]> = Array::with_max_entries(limits::BENCH_DSTS, 0);
/// Benchmark only: [frames the sink dropped, frames the generator sent].
#[map]
pub static BENCH_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);
/// Benchmark only: where the bare redirect sends every frame.
#[map]
pub static BENCH_NH: Array<NextHop> = Array::with_max_entries(1, 0);

/// Policy: the `META_*` slots of `xnet_common::policy`.
#[map]
pub static POLICY_META: Array<u32> = Array::with_max_entries(policy::META_SLOTS, 0);
/// Per generation and port: its class as a source port (low 16 bits) and as a
/// destination port (high 16 bits).
#[map]
pub static PORT_CLASSES: Array<u32> = Array::with_max_entries(2 * policy::PORTS, 0);
/// Decisions by class (`xnet_common::policy`), LRU per CPU (no common LRU lock).
#[map]
pub static FLOW_CLASSES: LruHashMap<ClassKey, RuleValue> =
    LruHashMap::with_max_entries(policy::MAX_CACHED, BPF_F_NO_COMMON_LRU);
#[map]
pub static TUPLES: Array<Tuple> = Array::with_max_entries(2 * policy::MAX_TUPLES, 0);
#[map]
pub static RULES: HashMap<RuleKey, RuleValue> = HashMap::with_max_entries(policy::MAX_ENTRIES, 0);
/// Hits per rule id.
#[map]
pub static RULE_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(policy::MAX_RULES, 0);
#[map]
pub static SERVICES: Array<Service> = Array::with_max_entries(policy::MAX_SERVICES, 0);
/// Packets sent to each next hop id by `steer` (per firewall instance).
#[map]
pub static NH_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(limits::NEXTHOPS, 0);

/// Per-CPU scratch space for classification: [the packet's fields, the masked key], kept
/// off the 512-byte BPF stack.
#[map]
pub static POLICY_SCRATCH: PerCpuArray<[RuleKey; 2]> = PerCpuArray::with_max_entries(1, 0);
