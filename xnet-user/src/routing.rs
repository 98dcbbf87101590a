//! The routing core: every route source (static routes, IPsec tunnels, BGP) adds and
//! withdraws its routes here; the core selects one per prefix, resolves recursive next
//! hops, and says what the forwarding tables must change. It does no I/O: the agent applies
//! the changes it returns to the data plane and the kernel FIB (`forwarding`).
//!
//! Selection, per (segment, prefix), among the sources' candidates whose next hops resolve:
//! the lowest administrative distance, then the source's own order (the lower connector
//! index among tunnels; BGP's decision process among its paths). Distances follow FRR's
//! defaults where FRR has the source:
//!
//! | source                    | distance | note                                              |
//! |---------------------------|---------:|---------------------------------------------------|
//! | connected                 | 0        | resolves next hops; not programmed (the kernel has it) |
//! | static (`[[routes]]`)     | 1        | FRR `staticd`                                     |
//! | IPsec connector routes    | 10       | no FRR source: above static, so an operator's route wins, below BGP so a tunnel's own routes win over what is learned |
//! | eBGP                      | 20       | FRR                                               |
//! | iBGP                      | 200      | FRR                                               |
//!
//! The structure is a hierarchical FIB: a prefix points to a *path list* (its source's next
//! hops as the source knows them, shared by every prefix with the same ones: a full table
//! from two peers has a handful), and a path list resolves to one next-hop group. Next-hop
//! tracking keeps each recursive next hop's resolution with the path lists that use it, so a
//! change of a resolving route re-resolves only the next hops under it, and each path list
//! that changes re-selects only its own prefixes.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;
use smallvec::SmallVec;

use crate::fastmap::Map;

/// The ifindex of a next hop that is an IPsec tunnel (its `via`: the tunnel's remote
/// endpoint, or that address mapped into the other family): XDP hands such packets to the
/// kernel, whose XFRM policies encrypt them.
pub const TUNNEL: u32 = 0;

/// A resolved next hop: egress interface and gateway address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct NhKey {
    pub ifindex: u32,
    pub via: IpAddr,
}

/// A next-hop group as the forwarding tables get it: sorted, without duplicates, shared.
pub type Hops = Arc<[NhKey]>;

/// Where a route comes from. The order is the tie-break between equal distances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Static,
    /// IPsec connector, by its index in the config.
    Tunnel(u32),
    Bgp,
}

pub const DISTANCE_CONNECTED: u8 = 0;
pub const DISTANCE_STATIC: u8 = 1;
pub const DISTANCE_TUNNEL: u8 = 10;
pub const DISTANCE_EBGP: u8 = 20;
pub const DISTANCE_IBGP: u8 = 200;

/// One BGP path of a prefix as the core needs it, best first: its next hop, whether it was
/// learned over eBGP, and which better paths it ranks equal to (bit i: path i), for
/// multipath. "Equal" is BGP's own relation (MED only within one neighbouring AS), which is
/// not transitive, so it is given per pair rather than as tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RankedHop {
    pub next_hop: IpAddr,
    pub ebgp: bool,
    pub equal_to: u32,
}

/// How a source names a route's next hops.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Paths {
    /// Next hops with their interface (static routes, tunnels): used as they are.
    Direct(SmallVec<[NhKey; 2]>),
    /// BGP's paths, best first; each next hop resolves recursively. The selection is the
    /// first path whose next hop resolves and those after it equal to it (RFC 4271
    /// §9.1.2.1: a path whose next hop cannot be reached is no candidate), up to
    /// `multipath`.
    Ranked {
        paths: SmallVec<[RankedHop; 2]>,
        multipath: u8,
    },
}

impl Paths {
    pub fn direct(hops: &[NhKey]) -> Paths {
        let mut v: SmallVec<[NhKey; 2]> = hops.iter().copied().collect();
        v.sort_unstable();
        v.dedup();
        Paths::Direct(v)
    }
}

/// A change of the forwarding tables: the route for `net` in `segment` is now `hops`
/// from `source`, or (`None`) there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub segment: u32,
    pub net: IpNet,
    pub route: Option<(Source, Hops)>,
    /// The source of the route it replaces.
    pub previous: Option<Source>,
}

type ListId = u32;

/// A path list: shared by the prefixes whose source names the same next hops.
struct List {
    segment: u32,
    paths: Paths,
    /// What it resolves to now (None: no next hop reachable), and for BGP the distance of
    /// the path selected.
    resolved: Option<Hops>,
    distance: u8,
    /// Its prefixes; each candidate knows its index here (removal swaps the last in).
    members: Vec<IpNet>,
}

/// A recursive next hop being tracked.
struct Tracked {
    resolved: Option<Hops>,
    lists: SmallVec<[ListId; 2]>,
}

/// A source's route for a prefix: its path list, and its index among the list's members.
#[derive(Clone, Copy)]
struct Candidate {
    source: Source,
    list: ListId,
    pos: u32,
}

/// A prefix's candidates, by source. What is selected is not kept: it follows from the
/// candidates and their lists (one entry per prefix of a full table: kept small).
#[derive(Default)]
struct Entry {
    candidates: SmallVec<[Candidate; 1]>,
}

#[derive(Default)]
pub struct Core {
    entries: Map<(u32, IpNet), Entry>,
    lists: Vec<Option<List>>,
    free_lists: Vec<ListId>,
    list_ids: Map<(u32, Paths), ListId>,
    /// The list interned last: consecutive prefixes of one UPDATE share it.
    last: Option<(u32, Paths, ListId)>,
    nht: Map<(u32, IpAddr), Tracked>,
    /// Connected subnets: (segment, ifindex, prefix).
    connected: Vec<(u32, u32, IpNet)>,
    /// Selected static and tunnel routes: what recursive next hops resolve through, with
    /// the prefix lengths in use per (segment, IPv6) for the longest match.
    resolving: Map<(u32, IpNet), Hops>,
    lengths: Map<(u32, bool), std::collections::BTreeMap<u8, u32>>,
    /// Prefixes whose BGP candidate resolves (the status shows it without a walk).
    bgp_usable: usize,
}

impl Core {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces `source`'s route for `net` in `segment`. One lookup of the
    /// prefix: a full table comes through here.
    pub fn set(
        &mut self,
        source: Source,
        segment: u32,
        net: IpNet,
        paths: Paths,
        out: &mut Vec<Change>,
    ) {
        let id = self.intern(segment, paths);
        let key = (segment, net);
        let e = self.entries.entry(key).or_default();
        let before = Self::pick(&e.candidates, &self.lists);
        let join = |lists: &mut Vec<Option<List>>, bgp_usable: &mut usize| {
            let list = lists[id as usize].as_mut().expect("live list");
            list.members.push(net);
            if source == Source::Bgp && list.resolved.is_some() {
                *bgp_usable += 1;
            }
            (list.members.len() - 1) as u32
        };
        let old = match e.candidates.iter_mut().find(|c| c.source == source) {
            Some(c) if c.list == id => return,
            Some(c) => {
                let old = *c;
                c.list = id;
                c.pos = join(&mut self.lists, &mut self.bgp_usable);
                Some(old)
            }
            None => {
                let pos = join(&mut self.lists, &mut self.bgp_usable);
                e.candidates.push(Candidate {
                    source,
                    list: id,
                    pos,
                });
                e.candidates.sort_unstable_by_key(|c| c.source);
                None
            }
        };
        let after = Self::pick(&e.candidates, &self.lists);
        // Decided before the old list may go with its last member.
        let change = self.change_of(before, after);
        if let Some(old) = old {
            self.leave(old, net);
        }
        if let Some(best) = change {
            self.changed(key, before.map(|(s, _)| s), best, out);
        }
    }

    /// Withdraws `source`'s route for `net` in `segment`, if it has one.
    pub fn withdraw(&mut self, source: Source, segment: u32, net: IpNet, out: &mut Vec<Change>) {
        let key = (segment, net);
        let Some(e) = self.entries.get_mut(&key) else {
            return;
        };
        let Some(i) = e.candidates.iter().position(|c| c.source == source) else {
            return;
        };
        let before = Self::pick(&e.candidates, &self.lists);
        let old = e.candidates.remove(i);
        let after = Self::pick(&e.candidates, &self.lists);
        if e.candidates.is_empty() {
            self.entries.remove(&key);
        }
        let change = self.change_of(before, after);
        self.leave(old, net);
        if let Some(best) = change {
            self.changed(key, before.map(|(s, _)| s), best, out);
        }
    }

    /// Sets the connected subnets, (segment, ifindex, prefix): next hops inside them
    /// resolve to themselves on that interface.
    pub fn set_connected(&mut self, connected: Vec<(u32, u32, IpNet)>, out: &mut Vec<Change>) {
        self.connected = connected;
        let all: Vec<(u32, IpAddr)> = self.nht.keys().copied().collect();
        self.reresolve(all, out);
    }

    /// The route selected for `net` in `segment`.
    pub fn selected(&self, segment: u32, net: &IpNet) -> Option<(Source, Hops)> {
        Self::best(&self.entries.get(&(segment, *net))?.candidates, &self.lists)
    }

    /// Whether `source`'s candidate for `net` resolves (it would be used without better
    /// sources).
    pub fn usable(&self, source: Source, segment: u32, net: &IpNet) -> bool {
        self.entries.get(&(segment, *net)).is_some_and(|e| {
            e.candidates
                .iter()
                .any(|c| c.source == source && self.list(c.list).resolved.is_some())
        })
    }

    /// What `next_hop` resolves to in `segment` now.
    pub fn resolve(&self, segment: u32, next_hop: IpAddr) -> Option<Hops> {
        match self.nht.get(&(segment, next_hop)) {
            Some(t) => t.resolved.clone(),
            None => self.lookup(segment, next_hop),
        }
    }

    /// The prefixes with a candidate in `segment`.
    pub fn prefixes(&self, segment: u32) -> impl Iterator<Item = &IpNet> {
        self.entries
            .keys()
            .filter(move |(s, _)| *s == segment)
            .map(|(_, n)| n)
    }

    /// Prefixes whose BGP candidate resolves.
    pub fn bgp_usable(&self) -> usize {
        self.bgp_usable
    }

    /// Path lists in use (a full table has a handful: the hierarchical FIB at work).
    pub fn path_lists(&self) -> usize {
        self.list_ids.len()
    }

    /// Routes selected, by source.
    pub fn selected_routes(&self) -> impl Iterator<Item = (u32, IpNet, Source, Hops)> + '_ {
        self.entries.iter().filter_map(|((seg, net), e)| {
            Self::best(&e.candidates, &self.lists).map(|(s, h)| (*seg, *net, s, h))
        })
    }

    fn list(&self, id: ListId) -> &List {
        self.lists[id as usize].as_ref().expect("live list")
    }

    fn intern(&mut self, segment: u32, paths: Paths) -> ListId {
        if let Some((s, p, id)) = &self.last {
            if *s == segment && *p == paths {
                return *id;
            }
        }
        if let Some(id) = self.list_ids.get(&(segment, paths.clone())) {
            self.last = Some((segment, paths, *id));
            return *id;
        }
        let id = match self.free_lists.pop() {
            Some(id) => id,
            None => {
                self.lists.push(None);
                self.lists.len() as ListId - 1
            }
        };
        if let Paths::Ranked { paths: p, .. } = &paths {
            for h in p {
                if !self.nht.contains_key(&(segment, h.next_hop)) {
                    let resolved = self.lookup(segment, h.next_hop);
                    self.nht.insert(
                        (segment, h.next_hop),
                        Tracked {
                            resolved,
                            lists: SmallVec::new(),
                        },
                    );
                }
                let t = self.nht.get_mut(&(segment, h.next_hop)).unwrap();
                if !t.lists.contains(&id) {
                    t.lists.push(id);
                }
            }
        }
        let (resolved, distance) = self.resolve_list(segment, &paths);
        self.list_ids.insert((segment, paths.clone()), id);
        self.last = Some((segment, paths.clone(), id));
        self.lists[id as usize] = Some(List {
            segment,
            paths,
            resolved,
            distance,
            members: Vec::new(),
        });
        id
    }

    /// Candidate `c` of `net` is gone: `net` leaves its list (the last member takes its
    /// place); a list without prefixes goes, and so does the tracking of next hops only it
    /// used.
    fn leave(&mut self, c: Candidate, net: IpNet) {
        let id = c.list;
        let list = self.lists[id as usize].as_mut().expect("live list");
        let gone = list.members.swap_remove(c.pos as usize);
        debug_assert_eq!(gone, net);
        if c.source == Source::Bgp && list.resolved.is_some() {
            self.bgp_usable -= 1;
        }
        let last = list.members.len() as u32;
        if c.pos < last {
            // The member that was last is at `c.pos` now: its candidate says so.
            let moved = list.members[c.pos as usize];
            if let Some(e) = self.entries.get_mut(&(list.segment, moved)) {
                if let Some(m) = e
                    .candidates
                    .iter_mut()
                    .find(|m| m.list == id && m.pos == last)
                {
                    m.pos = c.pos;
                }
            }
        }
        if last > 0 {
            return;
        }
        let list = self.lists[id as usize].take().expect("live list");
        self.list_ids.remove(&(list.segment, list.paths.clone()));
        if self.last.as_ref().is_some_and(|(_, _, l)| *l == id) {
            self.last = None;
        }
        self.free_lists.push(id);
        if let Paths::Ranked { paths, .. } = &list.paths {
            for h in paths {
                let k = (list.segment, h.next_hop);
                if let Some(t) = self.nht.get_mut(&k) {
                    t.lists.retain(|l| *l != id);
                    if t.lists.is_empty() {
                        self.nht.remove(&k);
                    }
                }
            }
        }
    }

    /// What a path list resolves to, and its distance.
    fn resolve_list(&self, segment: u32, paths: &Paths) -> (Option<Hops>, u8) {
        match paths {
            Paths::Direct(hops) => ((!hops.is_empty()).then(|| Hops::from(&hops[..])), 0),
            Paths::Ranked { paths, multipath } => {
                let resolved = |h: &RankedHop| {
                    self.nht
                        .get(&(segment, h.next_hop))
                        .and_then(|t| t.resolved.clone())
                };
                let Some((top, first)) = paths
                    .iter()
                    .enumerate()
                    .find_map(|(i, h)| Some((i, resolved(h)?)))
                else {
                    return (None, 0);
                };
                let distance = if paths[top].ebgp {
                    DISTANCE_EBGP
                } else {
                    DISTANCE_IBGP
                };
                let mut union: Vec<NhKey> = first.to_vec();
                let mut taken = 1;
                for h in paths.iter().skip(top + 1) {
                    if taken >= (*multipath).max(1) as usize {
                        break;
                    }
                    let Some(r) = resolved(h) else { continue };
                    // Selection stops at the first usable path that is not equal to the
                    // best usable one.
                    if top >= 32 || h.equal_to & (1 << top) == 0 {
                        break;
                    }
                    union.extend_from_slice(&r);
                    taken += 1;
                }
                if taken == 1 {
                    return (Some(first), distance);
                }
                union.sort_unstable();
                union.dedup();
                (Some(Hops::from(union)), distance)
            }
        }
    }

    fn distance(source: Source, list: &List) -> u8 {
        match source {
            Source::Static => DISTANCE_STATIC,
            Source::Tunnel(_) => DISTANCE_TUNNEL,
            Source::Bgp => list.distance,
        }
    }

    /// The candidate to use: the lowest distance among those that resolve, then the
    /// source's order.
    fn best(candidates: &[Candidate], lists: &[Option<List>]) -> Option<(Source, Hops)> {
        Self::pick(candidates, lists).map(|(s, l)| (s, Self::hops_of(lists, l).clone()))
    }

    /// `best` as (source, its list), without touching the shared hops.
    fn pick(candidates: &[Candidate], lists: &[Option<List>]) -> Option<(Source, ListId)> {
        if let [c] = candidates {
            // The usual case: one source.
            let list = lists[c.list as usize].as_ref().expect("live list");
            return list.resolved.is_some().then_some((c.source, c.list));
        }
        candidates
            .iter()
            .filter_map(|c| {
                let list = lists[c.list as usize].as_ref().expect("live list");
                list.resolved.as_ref()?;
                Some(((Self::distance(c.source, list), c.source), c.list))
            })
            .min_by_key(|(rank, _)| *rank)
            .map(|((_, s), l)| (s, l))
    }

    fn hops_of(lists: &[Option<List>], id: ListId) -> &Hops {
        lists[id as usize]
            .as_ref()
            .and_then(|l| l.resolved.as_ref())
            .expect("a picked list resolves")
    }

    /// What the forwarding tables must change from `before` to `after` (None: nothing;
    /// two lists that resolve to the same next hops are no change).
    fn change_of(
        &self,
        before: Option<(Source, ListId)>,
        after: Option<(Source, ListId)>,
    ) -> Option<Option<(Source, Hops)>> {
        if before == after {
            return None;
        }
        let after = after.map(|(s, l)| (s, Self::hops_of(&self.lists, l).clone()));
        let before = before.map(|(s, l)| (s, Self::hops_of(&self.lists, l).clone()));
        (!Self::same(&before, &after)).then_some(after)
    }

    fn same(a: &Option<(Source, Hops)>, b: &Option<(Source, Hops)>) -> bool {
        match (a, b) {
            (None, None) => true,
            (Some((s1, h1)), Some((s2, h2))) => s1 == s2 && (Arc::ptr_eq(h1, h2) || h1 == h2),
            _ => false,
        }
    }

    /// Says what changed; when the selected static or tunnel route changed, the next hops
    /// under it resolve again.
    fn changed(
        &mut self,
        key: (u32, IpNet),
        previous: Option<Source>,
        best: Option<(Source, Hops)>,
        out: &mut Vec<Change>,
    ) {
        let resolving_before = previous.is_some_and(|s| s != Source::Bgp);
        let resolving_after = best.as_ref().is_some_and(|(s, _)| *s != Source::Bgp);
        out.push(Change {
            segment: key.0,
            net: key.1,
            route: best.clone(),
            previous,
        });
        if resolving_before || resolving_after {
            self.resolver_changed(key, best.filter(|(s, _)| *s != Source::Bgp), out);
        }
    }

    /// The selected static or tunnel route of `key` is now `route`: the tracked next hops
    /// under it resolve again.
    fn resolver_changed(
        &mut self,
        key: (u32, IpNet),
        route: Option<(Source, Hops)>,
        out: &mut Vec<Change>,
    ) {
        let lengths = self
            .lengths
            .entry((key.0, key.1.addr().is_ipv6()))
            .or_default();
        let len = key.1.prefix_len();
        match route {
            Some((_, hops)) => {
                if self.resolving.insert(key, hops).is_none() {
                    *lengths.entry(len).or_default() += 1;
                }
            }
            None => {
                if self.resolving.remove(&key).is_some() {
                    let n = lengths.get_mut(&len).unwrap();
                    *n -= 1;
                    if *n == 0 {
                        lengths.remove(&len);
                    }
                }
            }
        }
        // Tracked next hops are few (one per distinct BGP next hop), prefixes many: the
        // scan is over the former.
        let under: Vec<(u32, IpAddr)> = self
            .nht
            .keys()
            .filter(|(s, a)| *s == key.0 && key.1.contains(a))
            .copied()
            .collect();
        self.reresolve(under, out);
    }

    /// Resolves `next_hops` again; path lists whose resolution changed re-select their
    /// prefixes.
    fn reresolve(&mut self, next_hops: Vec<(u32, IpAddr)>, out: &mut Vec<Change>) {
        let mut lists: Vec<ListId> = Vec::new();
        for k in next_hops {
            let now = self.lookup(k.0, k.1);
            let t = self.nht.get_mut(&k).unwrap();
            if t.resolved != now {
                t.resolved = now;
                lists.extend(t.lists.iter().copied());
            }
        }
        lists.sort_unstable();
        lists.dedup();
        for id in lists {
            let Some(list) = self.lists[id as usize].as_ref() else {
                continue;
            };
            let (resolved, distance) = self.resolve_list(list.segment, &list.paths);
            let list = self.lists[id as usize].as_mut().unwrap();
            if list.resolved == resolved && list.distance == distance {
                continue;
            }
            if matches!(list.paths, Paths::Ranked { .. }) {
                match (list.resolved.is_some(), resolved.is_some()) {
                    (false, true) => self.bgp_usable += list.members.len(),
                    (true, false) => self.bgp_usable -= list.members.len(),
                    _ => {}
                }
            }
            let seg = list.segment;
            let members = list.members.clone();
            // What each member had selected, before the list changes under it.
            let before: Vec<Option<(Source, Hops)>> =
                members.iter().map(|n| self.selected(seg, n)).collect();
            let list = self.lists[id as usize].as_mut().unwrap();
            list.resolved = resolved;
            list.distance = distance;
            for (net, before) in members.into_iter().zip(before) {
                let best = self.selected(seg, &net);
                if !Self::same(&before, &best) {
                    self.changed((seg, net), before.map(|(s, _)| s), best, out);
                }
            }
        }
    }

    /// Longest match of `addr` among the connected subnets and the selected static and
    /// tunnel routes of `segment` (connected first at equal length).
    fn lookup(&self, segment: u32, addr: IpAddr) -> Option<Hops> {
        let connected = self
            .connected
            .iter()
            .filter(|(s, _, net)| *s == segment && net.contains(&addr))
            .max_by_key(|(_, _, net)| net.prefix_len());
        let floor = connected.map(|(_, _, n)| n.prefix_len() + 1).unwrap_or(0);
        if let Some(lengths) = self.lengths.get(&(segment, addr.is_ipv6())) {
            for len in lengths.keys().rev().take_while(|l| **l >= floor) {
                let net = IpNet::new(addr, *len).expect("valid length").trunc();
                if let Some(h) = self.resolving.get(&(segment, net)) {
                    return Some(h.clone());
                }
            }
        }
        connected.map(|(_, ifindex, _)| {
            Hops::from([NhKey {
                ifindex: *ifindex,
                via: addr,
            }])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn nh(ifindex: u32, via: &str) -> NhKey {
        NhKey {
            ifindex,
            via: ip(via),
        }
    }
    fn direct(hops: &[NhKey]) -> Paths {
        Paths::direct(hops)
    }
    /// BGP paths, best first, all equal to each other when `equal`.
    fn bgp(next_hops: &[&str], equal: bool, multipath: u8) -> Paths {
        Paths::Ranked {
            paths: next_hops
                .iter()
                .enumerate()
                .map(|(i, n)| RankedHop {
                    next_hop: ip(n),
                    ebgp: true,
                    equal_to: if equal { (1u32 << i) - 1 } else { 0 },
                })
                .collect(),
            multipath,
        }
    }
    fn route(out: &[Change], n: &str) -> Option<Option<(Source, Vec<NhKey>)>> {
        out.iter()
            .rev()
            .find(|c| c.net == net(n))
            .map(|c| c.route.as_ref().map(|(s, h)| (*s, h.to_vec())))
    }
    const TUN: Source = Source::Tunnel(0);

    #[test]
    fn static_wins_over_a_tunnel_which_wins_over_bgp_and_each_hands_back() {
        let mut c = Core::new();
        let mut out = Vec::new();
        c.set_connected(vec![(1, 2, net("10.0.0.0/24"))], &mut out);
        c.set(
            Source::Bgp,
            1,
            net("192.0.2.0/24"),
            bgp(&["10.0.0.9"], false, 1),
            &mut out,
        );
        assert_eq!(
            route(&out, "192.0.2.0/24"),
            Some(Some((Source::Bgp, vec![nh(2, "10.0.0.9")])))
        );
        out.clear();
        let tunnel = nh(TUNNEL, "203.0.113.1");
        c.set(TUN, 1, net("192.0.2.0/24"), direct(&[tunnel]), &mut out);
        assert_eq!(route(&out, "192.0.2.0/24"), Some(Some((TUN, vec![tunnel]))));
        out.clear();
        c.set(
            Source::Static,
            1,
            net("192.0.2.0/24"),
            direct(&[nh(3, "10.1.0.1")]),
            &mut out,
        );
        assert_eq!(
            route(&out, "192.0.2.0/24"),
            Some(Some((Source::Static, vec![nh(3, "10.1.0.1")])))
        );
        out.clear();
        // A better source's route comes and goes; the others' stay current under it.
        c.set(
            Source::Bgp,
            1,
            net("192.0.2.0/24"),
            bgp(&["10.0.0.7"], false, 1),
            &mut out,
        );
        assert!(out.is_empty(), "hidden under the static route: {out:?}");
        c.withdraw(Source::Static, 1, net("192.0.2.0/24"), &mut out);
        assert_eq!(route(&out, "192.0.2.0/24"), Some(Some((TUN, vec![tunnel]))));
        out.clear();
        c.withdraw(TUN, 1, net("192.0.2.0/24"), &mut out);
        assert_eq!(
            route(&out, "192.0.2.0/24"),
            Some(Some((Source::Bgp, vec![nh(2, "10.0.0.7")])))
        );
        out.clear();
        c.withdraw(Source::Bgp, 1, net("192.0.2.0/24"), &mut out);
        assert_eq!(route(&out, "192.0.2.0/24"), Some(None));
        assert_eq!(c.path_lists(), 0);
        assert!(c.nht.is_empty() && c.entries.is_empty());
    }

    #[test]
    fn ibgp_loses_to_a_tunnel_and_the_lower_connector_wins_a_tie() {
        let mut c = Core::new();
        let mut out = Vec::new();
        c.set(
            Source::Tunnel(3),
            1,
            net("10.9.0.0/16"),
            direct(&[nh(0, "203.0.113.3")]),
            &mut out,
        );
        c.set(
            Source::Tunnel(1),
            1,
            net("10.9.0.0/16"),
            direct(&[nh(0, "203.0.113.1")]),
            &mut out,
        );
        assert_eq!(
            route(&out, "10.9.0.0/16"),
            Some(Some((Source::Tunnel(1), vec![nh(0, "203.0.113.1")])))
        );
        out.clear();
        c.withdraw(Source::Tunnel(1), 1, net("10.9.0.0/16"), &mut out);
        assert_eq!(
            route(&out, "10.9.0.0/16"),
            Some(Some((Source::Tunnel(3), vec![nh(0, "203.0.113.3")]))),
            "the other connector's route takes over"
        );
    }

    #[test]
    fn recursive_next_hops_resolve_through_connected_static_and_tunnel_routes() {
        let mut c = Core::new();
        let mut out = Vec::new();
        c.set_connected(
            vec![(1, 2, net("10.0.0.0/24")), (2, 4, net("10.0.0.0/24"))],
            &mut out,
        );
        // Through a static route (eBGP multihop, iBGP).
        c.set(
            Source::Static,
            1,
            net("172.16.0.0/16"),
            direct(&[nh(2, "10.0.0.1")]),
            &mut out,
        );
        c.set(
            Source::Bgp,
            1,
            net("198.51.100.0/24"),
            bgp(&["172.16.5.5"], false, 1),
            &mut out,
        );
        assert_eq!(
            route(&out, "198.51.100.0/24"),
            Some(Some((Source::Bgp, vec![nh(2, "10.0.0.1")])))
        );
        // Through a tunnel route (a peer inside the tunnel).
        c.set(
            TUN,
            1,
            net("169.254.21.0/30"),
            direct(&[nh(TUNNEL, "203.0.113.1")]),
            &mut out,
        );
        c.set(
            Source::Bgp,
            1,
            net("198.51.101.0/24"),
            bgp(&["169.254.21.1"], false, 1),
            &mut out,
        );
        assert_eq!(
            route(&out, "198.51.101.0/24"),
            Some(Some((Source::Bgp, vec![nh(TUNNEL, "203.0.113.1")])))
        );
        // Connected, in the segment of the interface only.
        c.set(
            Source::Bgp,
            2,
            net("198.51.102.0/24"),
            bgp(&["10.0.0.9"], false, 1),
            &mut out,
        );
        assert_eq!(
            route(&out, "198.51.102.0/24"),
            Some(Some((Source::Bgp, vec![nh(4, "10.0.0.9")])))
        );
        // Unresolvable: no route, and none is put in.
        out.clear();
        c.set(
            Source::Bgp,
            1,
            net("198.51.103.0/24"),
            bgp(&["192.0.2.1"], false, 1),
            &mut out,
        );
        assert!(out.is_empty());
        assert!(!c.usable(Source::Bgp, 1, &net("198.51.103.0/24")));
        // The longest resolving route wins, even over a connected subnet.
        c.set(
            Source::Static,
            1,
            net("10.0.0.9/32"),
            direct(&[nh(3, "10.3.0.1")]),
            &mut out,
        );
        c.set(
            Source::Bgp,
            1,
            net("198.51.104.0/24"),
            bgp(&["10.0.0.9"], false, 1),
            &mut out,
        );
        assert_eq!(
            route(&out, "198.51.104.0/24"),
            Some(Some((Source::Bgp, vec![nh(3, "10.3.0.1")])))
        );
        // A route that appears later resolves what could not be resolved.
        out.clear();
        c.set(
            Source::Static,
            1,
            net("192.0.2.0/24"),
            direct(&[nh(2, "10.0.0.1")]),
            &mut out,
        );
        assert_eq!(
            route(&out, "198.51.103.0/24"),
            Some(Some((Source::Bgp, vec![nh(2, "10.0.0.1")])))
        );
    }

    #[test]
    fn ecmp_takes_the_equal_paths_that_resolve_up_to_multipath() {
        let mut c = Core::new();
        let mut out = Vec::new();
        c.set_connected(
            vec![(1, 2, net("10.0.0.0/24")), (1, 3, net("10.0.1.0/24"))],
            &mut out,
        );
        let three = bgp(&["10.0.0.1", "10.0.1.1", "10.0.0.2"], true, 2);
        c.set(Source::Bgp, 1, net("192.0.2.0/24"), three, &mut out);
        assert_eq!(
            route(&out, "192.0.2.0/24"),
            Some(Some((
                Source::Bgp,
                vec![nh(2, "10.0.0.1"), nh(3, "10.0.1.1")]
            )))
        );
        // Not equal: the best alone.
        c.set(
            Source::Bgp,
            1,
            net("192.0.3.0/24"),
            bgp(&["10.0.0.1", "10.0.1.1"], false, 4),
            &mut out,
        );
        assert_eq!(
            route(&out, "192.0.3.0/24"),
            Some(Some((Source::Bgp, vec![nh(2, "10.0.0.1")])))
        );
        // The best cannot be reached: the next one is the best now (RFC 4271 §9.1.2.1).
        c.set(
            Source::Bgp,
            1,
            net("192.0.4.0/24"),
            bgp(&["192.0.2.99", "10.0.1.1"], false, 4),
            &mut out,
        );
        assert_eq!(
            route(&out, "192.0.4.0/24"),
            Some(Some((Source::Bgp, vec![nh(3, "10.0.1.1")])))
        );
        // Static next hops are a group of their own, sorted.
        c.set(
            Source::Static,
            1,
            net("0.0.0.0/0"),
            direct(&[nh(3, "10.0.1.1"), nh(2, "10.0.0.1")]),
            &mut out,
        );
        assert_eq!(
            route(&out, "0.0.0.0/0"),
            Some(Some((
                Source::Static,
                vec![nh(2, "10.0.0.1"), nh(3, "10.0.1.1")]
            )))
        );
    }

    #[test]
    fn many_prefixes_share_one_path_list_and_one_group() {
        let mut c = Core::new();
        let mut out = Vec::new();
        c.set_connected(vec![(1, 2, net("10.0.0.0/24"))], &mut out);
        for i in 0..1000u32 {
            let n = IpNet::new(
                IpAddr::from((0x0a00_0000u32 + 0x0100_0000 + (i << 8)).to_be_bytes()),
                24,
            )
            .unwrap();
            c.set(
                Source::Bgp,
                1,
                n,
                bgp(&["10.0.0.1", "10.0.0.2"], true, 2),
                &mut out,
            );
        }
        assert_eq!(c.path_lists(), 1);
        assert_eq!(c.bgp_usable(), 1000);
        let first = &out[0].route.as_ref().unwrap().1;
        assert!(
            out.iter()
                .all(|o| Arc::ptr_eq(&o.route.as_ref().unwrap().1, first)),
            "every prefix points at the same group"
        );
    }

    #[test]
    fn a_next_hop_going_away_changes_only_the_routes_that_use_it() {
        let mut c = Core::new();
        let mut out = Vec::new();
        c.set_connected(vec![(1, 2, net("10.0.0.0/24"))], &mut out);
        let tunnel_a = nh(TUNNEL, "203.0.113.1");
        let tunnel_b = nh(TUNNEL, "203.0.113.2");
        // Two BGP peers inside two tunnels; prefixes via one, via the other, and via both
        // (the second path worse).
        c.set(
            Source::Tunnel(0),
            1,
            net("169.254.21.0/30"),
            direct(&[tunnel_a]),
            &mut out,
        );
        c.set(
            Source::Tunnel(1),
            1,
            net("169.254.22.0/30"),
            direct(&[tunnel_b]),
            &mut out,
        );
        for i in 0..100u8 {
            c.set(
                Source::Bgp,
                1,
                net(&format!("10.1.{i}.0/24")),
                bgp(&["169.254.21.1"], false, 1),
                &mut out,
            );
            c.set(
                Source::Bgp,
                1,
                net(&format!("10.2.{i}.0/24")),
                bgp(&["169.254.22.1"], false, 1),
                &mut out,
            );
            c.set(
                Source::Bgp,
                1,
                net(&format!("10.3.{i}.0/24")),
                bgp(&["169.254.21.1", "169.254.22.1"], false, 1),
                &mut out,
            );
        }
        assert_eq!(c.bgp_usable(), 300);
        out.clear();
        c.withdraw(Source::Tunnel(0), 1, net("169.254.21.0/30"), &mut out);
        let removed = out.iter().filter(|o| o.route.is_none()).count();
        let moved: Vec<_> = out.iter().filter(|o| o.route.is_some()).collect();
        assert_eq!(
            removed, 101,
            "the tunnel route and its 100 prefixes: {out:?}"
        );
        assert_eq!(moved.len(), 100);
        assert!(moved.iter().all(|o| o.net.to_string().starts_with("10.3.")
            && o.route.as_ref().unwrap().1[..] == [tunnel_b]));
        assert_eq!(c.bgp_usable(), 200);
        // It comes back: the same prefixes return to it, the others do not move.
        out.clear();
        c.set(
            Source::Tunnel(0),
            1,
            net("169.254.21.0/30"),
            direct(&[tunnel_a]),
            &mut out,
        );
        assert_eq!(out.len(), 201);
        assert!(out.iter().all(|o| !o.net.to_string().starts_with("10.2.")));
        assert_eq!(c.bgp_usable(), 300);
    }

    #[test]
    fn prefixes_leave_and_rejoin_lists_in_any_order_and_nothing_is_left() {
        let mut c = Core::new();
        let mut out = Vec::new();
        c.set_connected(vec![(1, 2, net("10.0.0.0/24"))], &mut out);
        let nets: Vec<IpNet> = (0..50u8).map(|i| net(&format!("10.9.{i}.0/24"))).collect();
        for n in &nets {
            c.set(Source::Bgp, 1, *n, bgp(&["10.0.0.1"], false, 1), &mut out);
        }
        // Withdraw from the front (each swaps the last member in), move some to another
        // list, back again, then withdraw everything.
        for n in nets.iter().step_by(3) {
            c.withdraw(Source::Bgp, 1, *n, &mut out);
        }
        for n in nets.iter().skip(1).step_by(4) {
            c.set(Source::Bgp, 1, *n, bgp(&["10.0.0.2"], false, 1), &mut out);
        }
        for n in nets.iter().skip(1).step_by(8) {
            c.set(Source::Bgp, 1, *n, bgp(&["10.0.0.1"], false, 1), &mut out);
        }
        for n in &nets {
            let usable = c.usable(Source::Bgp, 1, n);
            assert_eq!(usable, c.selected(1, n).is_some(), "{n}");
        }
        // Withdrawn (every third) unless set again (every fourth from the second).
        let gone = (0..nets.len()).filter(|i| i % 3 == 0 && i % 4 != 1).count();
        assert_eq!(c.bgp_usable(), nets.len() - gone);
        for n in nets.iter().rev() {
            c.withdraw(Source::Bgp, 1, *n, &mut out);
        }
        assert_eq!(c.bgp_usable(), 0);
        assert_eq!(c.path_lists(), 0);
        assert!(c.entries.is_empty() && c.nht.is_empty());
        assert!(c.lists.iter().all(|l| l.is_none()));
    }
}
