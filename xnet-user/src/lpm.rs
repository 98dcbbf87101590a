//! Builds the route tables the XDP program reads (layout in `xnet_common::route`): a
//! multibit trie with strides 16-8-8-… in one flat array of `u32`, shared by every segment.
//!
//! Updates keep packets in flight safe: a new child group is filled completely before the
//! pointer to it is stored, every entry is written with one 32-bit store, and a group that
//! is no longer referenced is reused only after a grace period, so a lookup that already
//! read the old pointer still finds the old, complete group.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use xnet_common::route::{GROUP_SIZE, LEAF_NONE, NODE_PTR, ROOT_GROUPS};

/// How long a freed group waits before reuse: far longer than any XDP program runs.
const GRACE: Duration = Duration::from_millis(100);

/// The entry array: the mmap of the BPF map, or plain memory in unit tests.
pub trait NodeMemory: Send {
    fn entries(&self) -> &[AtomicU32];
}

impl NodeMemory for Vec<AtomicU32> {
    fn entries(&self) -> &[AtomicU32] {
        self
    }
}

/// A prefix as the index keys it: the left-aligned address in 32-bit words (a u128 key
/// would be 16-byte aligned, making each of a full table's entries 48 bytes, not 24).
type PrefixKey = ([u32; 4], u8);

fn key(addr: u128, len: u8) -> PrefixKey {
    let w = |i: u32| (addr >> (96 - 32 * i)) as u32;
    ([w(0), w(1), w(2), w(3)], len)
}

/// The pointer entries passed on a walk down (at most 15 levels for IPv6): inline, as
/// every insert walks.
type Path = smallvec::SmallVec<[u32; 16]>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TableId(usize);

/// One address family of one segment.
struct Table {
    /// First group of the 256-group root.
    root: u32,
    /// 32 or 128.
    bits: u8,
    /// The prefixes and their leaf (next-hop group id).
    prefixes: crate::fastmap::Map<PrefixKey, u32>,
}

/// What a child group inherited from the slot it replaced: the covering prefix's leaf and
/// depth (prefix length + 1, 0 for none).
#[derive(Clone, Copy, Default)]
struct GroupBase {
    leaf: u32,
    depth: u8,
}

pub struct RouteTables<M: NodeMemory> {
    mem: M,
    groups: u32,
    /// Per entry: depth (prefix length + 1) of the prefix the leaf came from; 0 = none.
    depth: Vec<u8>,
    base: Vec<GroupBase>,
    next_group: u32,
    free: Vec<u32>,
    quarantine: Vec<(Instant, u32)>,
    tables: Vec<Table>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LpmError {
    #[error(
        "route table memory is full ({0} groups of 256 entries); raise agent.route_table_groups"
    )]
    Full(u32),
    #[error("next-hop group id {0} does not fit a route entry")]
    LeafTooLarge(u32),
    #[error("address family of {0} does not match the table")]
    Family(IpNet),
}

/// Counts for status and benchmarks.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct LpmUsage {
    pub groups_used: u32,
    pub groups_total: u32,
    pub prefixes: usize,
}

fn level_of(len: u8) -> u32 {
    if len <= 16 {
        0
    } else {
        (len as u32 - 17) / 8 + 1
    }
}

/// First address bit covered by a level's index.
fn level_start(level: u32) -> u32 {
    if level == 0 {
        0
    } else {
        16 + 8 * (level - 1)
    }
}

fn level_end(level: u32) -> u32 {
    16 + 8 * level
}

fn bits(addr: u128, start: u32, width: u32) -> u32 {
    ((addr >> (128 - start - width)) & ((1u128 << width) - 1)) as u32
}

fn mask(addr: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        addr & (!0u128 << (128 - len as u32))
    }
}

fn left_aligned(net: &IpNet) -> (u128, u8) {
    match net {
        IpNet::V4(n) => ((u32::from(n.network()) as u128) << 96, 32),
        IpNet::V6(n) => (u128::from(n.network()), 128),
    }
}

impl<M: NodeMemory> RouteTables<M> {
    /// Takes over `mem` (all zero: every entry "no route").
    pub fn new(mem: M) -> Self {
        let entries = mem.entries().len() as u32;
        let groups = entries / GROUP_SIZE;
        Self {
            mem,
            groups,
            depth: vec![0; (groups * GROUP_SIZE) as usize],
            base: vec![GroupBase::default(); groups as usize],
            next_group: 0,
            free: Vec::new(),
            quarantine: Vec::new(),
            tables: Vec::new(),
        }
    }

    pub fn usage(&self) -> LpmUsage {
        LpmUsage {
            groups_used: self.next_group - self.free.len() as u32 - self.quarantine.len() as u32,
            groups_total: self.groups,
            prefixes: self.tables.iter().map(|t| t.prefixes.len()).sum(),
        }
    }

    /// A new, empty table for one address family (`bits` 32 or 128). Returns its id and
    /// the root group index the XDP program starts from.
    pub fn add_table(&mut self, bits: u8) -> Result<(TableId, u32), LpmError> {
        if self.next_group + ROOT_GROUPS > self.groups {
            return Err(LpmError::Full(self.groups));
        }
        let root = self.next_group;
        self.next_group += ROOT_GROUPS;
        self.tables.push(Table {
            root,
            bits,
            prefixes: Default::default(),
        });
        Ok((TableId(self.tables.len() - 1), root))
    }

    pub fn get(&self, table: TableId, net: &IpNet) -> Option<u32> {
        let (addr, _) = left_aligned(net);
        self.tables[table.0]
            .prefixes
            .get(&key(addr, net.prefix_len()))
            .copied()
    }

    /// Adds or replaces `net` → `leaf` (a next-hop group id, > 0).
    pub fn insert(&mut self, table: TableId, net: &IpNet, leaf: u32) -> Result<(), LpmError> {
        if leaf == LEAF_NONE || leaf & NODE_PTR != 0 {
            return Err(LpmError::LeafTooLarge(leaf));
        }
        let (addr, bits) = left_aligned(net);
        if bits != self.tables[table.0].bits {
            return Err(LpmError::Family(*net));
        }
        let len = net.prefix_len();
        let depth = len + 1;
        // Allocate the whole path first so that a full table changes nothing.
        let (group, _) = self
            .descend(table, addr, len, true)?
            .expect("descend creates the path");
        self.tables[table.0].prefixes.insert(key(addr, len), leaf);
        self.paint_range(group, addr, len, GroupBase { leaf, depth }, |d| d <= depth);
        Ok(())
    }

    /// Removes `net`; its addresses fall back to the next shorter prefix. Returns the leaf
    /// it had, if it was there.
    pub fn remove(&mut self, table: TableId, net: &IpNet) -> Option<u32> {
        let (addr, _) = left_aligned(net);
        let len = net.prefix_len();
        let t = &mut self.tables[table.0];
        let old = t.prefixes.remove(&key(addr, len))?;
        let fallback = (0..len)
            .rev()
            .find_map(|l| {
                t.prefixes
                    .get(&key(mask(addr, l), l))
                    .map(|&leaf| GroupBase { leaf, depth: l + 1 })
            })
            .unwrap_or_default();
        let depth = len + 1;
        if let Ok(Some((group, path))) = self.descend(table, addr, len, false) {
            self.paint_range(group, addr, len, fallback, |d| d == depth);
            // The groups on the way may hold nothing more specific now.
            for idx in path.into_iter().rev() {
                let e = self.load(idx);
                if e & NODE_PTR != 0 {
                    self.collapse(idx, e & !NODE_PTR);
                }
            }
        }
        Some(old)
    }

    /// Longest-prefix match, read from the same memory the XDP program reads.
    pub fn lookup(&self, table: TableId, addr: std::net::IpAddr) -> u32 {
        let root = self.tables[table.0].root;
        let read = |i: u32| self.mem.entries()[i as usize].load(Ordering::Relaxed);
        match addr {
            std::net::IpAddr::V4(a) => xnet_common::route::lookup(root, &a.octets(), read),
            std::net::IpAddr::V6(a) => xnet_common::route::lookup(root, &a.octets(), read),
        }
    }

    fn load(&self, i: u32) -> u32 {
        self.mem.entries()[i as usize].load(Ordering::Relaxed)
    }

    fn store(&self, i: u32, v: u32) {
        // Release: a packet that sees a pointer also sees the group it points to, filled.
        self.mem.entries()[i as usize].store(v, Ordering::Release);
    }

    /// Walks from the root to the group holding the level at which a prefix of `len` ends,
    /// creating child groups on the way if `create`. Returns that group (the root for level
    /// 0) and the pointer entries passed on the way; `None` if the path does not exist.
    fn descend(
        &mut self,
        table: TableId,
        addr: u128,
        len: u8,
        create: bool,
    ) -> Result<Option<(u32, Path)>, LpmError> {
        let target = level_of(len);
        let mut group = self.tables[table.0].root;
        let mut path = Path::new();
        for level in 0..target {
            let width = if level == 0 { 16 } else { 8 };
            let idx = group * GROUP_SIZE + bits(addr, level_start(level), width);
            let e = self.load(idx);
            group = if e & NODE_PTR != 0 {
                e & !NODE_PTR
            } else if create {
                let child = self.alloc_group()?;
                let base = GroupBase {
                    leaf: e,
                    depth: self.depth[idx as usize],
                };
                self.base[child as usize] = base;
                for i in child * GROUP_SIZE..(child + 1) * GROUP_SIZE {
                    self.store(i, base.leaf);
                    self.depth[i as usize] = base.depth;
                }
                self.store(idx, NODE_PTR | child);
                child
            } else {
                return Ok(None);
            };
            path.push(idx);
        }
        Ok(Some((group, path)))
    }

    /// Applies `new` to every entry covered by the prefix at its level in `group`, and
    /// below it, where `applies(old depth)`.
    fn paint_range(
        &mut self,
        group: u32,
        addr: u128,
        len: u8,
        new: GroupBase,
        applies: impl Fn(u8) -> bool + Copy,
    ) {
        let level = level_of(len);
        let (start, end) = (level_start(level), level_end(level));
        let first = bits(mask(addr, len), start, end - start);
        let count = 1u32 << (end - len.max(start as u8) as u32);
        for slot in first..first + count {
            self.paint_entry(group * GROUP_SIZE + slot, new, applies);
        }
    }

    fn paint_entry(&mut self, idx: u32, new: GroupBase, applies: impl Fn(u8) -> bool + Copy) {
        let e = self.load(idx);
        if e & NODE_PTR == 0 {
            if applies(self.depth[idx as usize]) {
                self.store(idx, new.leaf);
                self.depth[idx as usize] = new.depth;
            }
            return;
        }
        let child = e & !NODE_PTR;
        if applies(self.base[child as usize].depth) {
            self.base[child as usize] = new;
        }
        for i in child * GROUP_SIZE..(child + 1) * GROUP_SIZE {
            self.paint_entry(i, new, applies);
        }
        self.collapse(idx, child);
    }

    /// Replaces the pointer at `idx` by a leaf when nothing below it is more specific than
    /// what it inherited.
    fn collapse(&mut self, idx: u32, child: u32) {
        let base = self.base[child as usize];
        let range = child * GROUP_SIZE..(child + 1) * GROUP_SIZE;
        if range
            .clone()
            .any(|i| self.load(i) & NODE_PTR != 0 || self.depth[i as usize] != base.depth)
        {
            return;
        }
        self.store(idx, base.leaf);
        self.depth[idx as usize] = base.depth;
        self.quarantine.push((Instant::now(), child));
    }

    fn alloc_group(&mut self) -> Result<u32, LpmError> {
        if let Some(g) = self.free.pop() {
            return Ok(g);
        }
        if self.next_group < self.groups {
            self.next_group += 1;
            return Ok(self.next_group - 1);
        }
        let now = Instant::now();
        let (ready, waiting): (Vec<_>, Vec<_>) = self
            .quarantine
            .drain(..)
            .partition(|(t, _)| now.duration_since(*t) >= GRACE);
        self.quarantine = waiting;
        self.free.extend(ready.into_iter().map(|(_, g)| g));
        self.free.pop().ok_or(LpmError::Full(self.groups))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn tables(groups: u32) -> RouteTables<Vec<AtomicU32>> {
        RouteTables::new(
            (0..groups * GROUP_SIZE)
                .map(|_| AtomicU32::new(0))
                .collect(),
        )
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The reference: longest matching prefix by brute force.
    fn reference(routes: &[(IpNet, u32)], a: IpAddr) -> u32 {
        routes
            .iter()
            .filter(|(n, _)| n.contains(&a))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, l)| *l)
            .unwrap_or(0)
    }

    #[test]
    fn longest_prefix_wins_at_every_level() {
        let mut t = tables(1024);
        let (v4, _) = t.add_table(32).unwrap();
        let routes = [
            (net("0.0.0.0/0"), 1),
            (net("10.0.0.0/8"), 2),
            (net("10.1.0.0/16"), 3),
            (net("10.1.2.0/23"), 4),
            (net("10.1.2.0/24"), 5),
            (net("10.1.2.128/25"), 6),
            (net("10.1.2.130/32"), 7),
        ];
        for (n, l) in &routes {
            t.insert(v4, n, *l).unwrap();
        }
        for a in [
            "1.2.3.4",
            "10.9.9.9",
            "10.1.9.9",
            "10.1.3.1",
            "10.1.2.1",
            "10.1.2.129",
            "10.1.2.130",
            "10.1.2.131",
        ] {
            assert_eq!(t.lookup(v4, ip(a)), reference(&routes, ip(a)), "{a}");
        }
    }

    #[test]
    fn insertion_order_does_not_matter_and_removal_restores() {
        let mut t = tables(1024);
        let (v4, _) = t.add_table(32).unwrap();
        // More specific first, then the covering ones.
        t.insert(v4, &net("192.168.1.0/24"), 5).unwrap();
        t.insert(v4, &net("192.168.0.0/16"), 4).unwrap();
        t.insert(v4, &net("192.0.0.0/8"), 3).unwrap();
        assert_eq!(t.lookup(v4, ip("192.168.1.9")), 5);
        assert_eq!(t.lookup(v4, ip("192.168.2.9")), 4);
        assert_eq!(t.lookup(v4, ip("192.1.2.9")), 3);
        let used = t.usage().groups_used;
        assert_eq!(t.remove(v4, &net("192.168.1.0/24")), Some(5));
        assert_eq!(t.lookup(v4, ip("192.168.1.9")), 4);
        assert_eq!(
            t.usage().groups_used,
            used - 1,
            "the /24's group is released"
        );
        assert_eq!(t.remove(v4, &net("192.168.0.0/16")), Some(4));
        assert_eq!(t.lookup(v4, ip("192.168.1.9")), 3);
        assert_eq!(t.remove(v4, &net("192.0.0.0/8")), Some(3));
        assert_eq!(t.lookup(v4, ip("192.168.1.9")), 0);
        assert_eq!(t.remove(v4, &net("192.0.0.0/8")), None);
    }

    #[test]
    fn ipv6_deep_prefixes() {
        let mut t = tables(2048);
        let (v6, _) = t.add_table(128).unwrap();
        let routes = [
            (net("::/0"), 1),
            (net("2001:db8::/32"), 2),
            (net("2001:db8:1::/48"), 3),
            (net("2001:db8:1:2::/64"), 4),
            (net("2001:db8:1:2::1/128"), 5),
        ];
        for (n, l) in &routes {
            t.insert(v6, n, *l).unwrap();
        }
        for a in [
            "2001:db8:1:2::1",
            "2001:db8:1:2::2",
            "2001:db8:1:3::1",
            "2001:db8:2::1",
            "2002::1",
        ] {
            assert_eq!(t.lookup(v6, ip(a)), reference(&routes, ip(a)), "{a}");
        }
    }

    #[test]
    fn segments_are_separate_tables() {
        let mut t = tables(1024);
        let (a, ra) = t.add_table(32).unwrap();
        let (b, rb) = t.add_table(32).unwrap();
        assert_ne!(ra, rb);
        t.insert(a, &net("10.0.0.0/8"), 1).unwrap();
        assert_eq!(t.lookup(a, ip("10.1.1.1")), 1);
        assert_eq!(t.lookup(b, ip("10.1.1.1")), 0);
    }

    #[test]
    fn full_memory_is_an_error_and_changes_nothing() {
        let mut t = tables(ROOT_GROUPS + 1);
        let (v4, _) = t.add_table(32).unwrap();
        t.insert(v4, &net("10.0.0.0/24"), 1).unwrap();
        let err = t.insert(v4, &net("10.1.0.0/24"), 2).unwrap_err();
        assert_eq!(err, LpmError::Full(ROOT_GROUPS + 1));
        assert_eq!(t.get(v4, &net("10.1.0.0/24")), None);
        assert_eq!(t.lookup(v4, ip("10.1.0.1")), 0);
        assert_eq!(t.lookup(v4, ip("10.0.0.1")), 1);
    }

    #[test]
    fn random_tables_match_brute_force() {
        // A small xorshift so the test needs no extra crate and is repeatable.
        let mut s = 0x1234_5678_9abc_def0u64;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut t = tables(4096);
        let (v4, _) = t.add_table(32).unwrap();
        let mut routes: Vec<(IpNet, u32)> = Vec::new();
        for i in 0..400 {
            // Cluster the addresses so prefixes nest.
            let a = 0x0a00_0000u32 | (rnd() as u32 & 0x0003_ffff);
            let len = [8u8, 12, 16, 18, 20, 23, 24, 26, 28, 32][(rnd() % 10) as usize];
            let n = IpNet::new(IpAddr::V4(a.into()), len).unwrap().trunc();
            routes.retain(|(r, _)| *r != n);
            routes.push((n, i + 1));
            t.insert(v4, &n, i + 1).unwrap();
            if i % 3 == 0 {
                let k = (rnd() as usize) % routes.len();
                let (gone, _) = routes.remove(k);
                assert!(t.remove(v4, &gone).is_some());
            }
        }
        for _ in 0..20_000 {
            let a = IpAddr::V4((0x0a00_0000u32 | (rnd() as u32 & 0x0003_ffff)).into());
            assert_eq!(t.lookup(v4, a), reference(&routes, a), "{a}");
        }
        for (n, _) in routes.clone() {
            t.remove(v4, &n);
        }
        assert_eq!(t.usage().prefixes, 0);
        assert_eq!(
            t.usage().groups_used,
            ROOT_GROUPS,
            "every child group is released"
        );
    }
}
