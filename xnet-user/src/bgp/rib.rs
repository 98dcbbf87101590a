//! The BGP RIB: one path per (segment, prefix, peer) (the Adj-RIB-In after import), best
//! path selection per RFC 4271 §9.1 and the equal-cost set for multipath.

use std::cmp::Ordering;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::IpNet;

use super::packet::Attrs;
use crate::routing::{self, RankedHop};

/// Where paths came from: one per session, shared by all its paths.
#[derive(Debug, PartialEq, Eq)]
pub struct Source {
    pub peer: IpAddr,
    pub peer_id: Ipv4Addr,
    pub ebgp: bool,
}

/// What an UPDATE said of its prefixes (after import): shared by the prefixes it covers.
#[derive(Debug, PartialEq, Eq)]
pub struct Learned {
    pub next_hop: IpAddr,
    pub attrs: Attrs,
}

/// One path: two shared pointers, so a full table's paths cost 16 bytes each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    pub src: Arc<Source>,
    pub route: Arc<Learned>,
}

/// The paths of one prefix, best first; the usual single one is held inline.
pub type Paths = smallvec::SmallVec<[Path; 1]>;

impl Path {
    pub fn new(
        peer: IpAddr,
        peer_id: Ipv4Addr,
        ebgp: bool,
        next_hop: IpAddr,
        attrs: Attrs,
    ) -> Path {
        Path {
            src: Arc::new(Source {
                peer,
                peer_id,
                ebgp,
            }),
            route: Arc::new(Learned { next_hop, attrs }),
        }
    }

    pub fn peer(&self) -> IpAddr {
        self.src.peer
    }

    pub fn next_hop(&self) -> IpAddr {
        self.route.next_hop
    }

    pub fn attrs(&self) -> &Attrs {
        &self.route.attrs
    }

    fn local_pref(&self) -> u32 {
        self.attrs().local_pref.unwrap_or(100)
    }

    /// The steps of §9.1.2.2 up to (not including) the router-id tie-break: paths equal
    /// here may share traffic (multipath).
    fn rank(&self, other: &Path) -> Ordering {
        other
            .local_pref()
            .cmp(&self.local_pref())
            .then(self.attrs().as_path_len().cmp(&other.attrs().as_path_len()))
            .then(self.attrs().origin.cmp(&other.attrs().origin))
            .then_with(|| {
                // MED only between paths from the same neighbouring AS.
                if self.attrs().first_as() == other.attrs().first_as() {
                    self.attrs()
                        .med
                        .unwrap_or(0)
                        .cmp(&other.attrs().med.unwrap_or(0))
                } else {
                    Ordering::Equal
                }
            })
            .then(other.src.ebgp.cmp(&self.src.ebgp))
    }

    /// Full order: better first.
    fn compare(&self, other: &Path) -> Ordering {
        self.rank(other)
            .then(self.src.peer_id.cmp(&other.src.peer_id))
            .then(self.src.peer.cmp(&other.src.peer))
    }
}

#[derive(Default)]
pub struct Rib {
    multipath: usize,
    paths: crate::fastmap::Map<(u32, IpNet), Paths>,
    /// Paths per peer, kept as paths come and go (status reads it on a full table).
    per_peer: crate::fastmap::Map<IpAddr, usize>,
    /// The smallest `FIRST` keys, for status to list without a pass over a full table;
    /// `first_stale` when a removal took one and the next reader must refill it.
    first: std::collections::BTreeSet<(u32, IpNet)>,
    first_stale: bool,
}

/// How many of the first prefixes `Rib::first` keeps.
pub const FIRST: usize = 100;

impl Rib {
    pub fn new(multipath: usize) -> Self {
        Self {
            multipath: multipath.max(1),
            paths: Default::default(),
            per_peer: Default::default(),
            first: Default::default(),
            first_stale: false,
        }
    }

    /// Adds or replaces `path` for `net` from its peer. Returns whether the paths changed
    /// (a path that is not the best may still be the one in use, when the better ones'
    /// next hops cannot be reached: see `selected_by`).
    pub fn update(&mut self, segment: u32, net: IpNet, path: Path) -> bool {
        let key = (segment, net);
        let v = self.paths.entry(key).or_default();
        if v.is_empty() && !self.first_stale {
            if self.first.len() < FIRST {
                self.first.insert(key);
            } else if self.first.last().is_some_and(|last| key < *last) {
                self.first.insert(key);
                self.first.pop_last();
            }
        }
        if v.contains(&path) {
            return false;
        }
        let before = v.len();
        v.retain(|p| p.src.peer != path.src.peer);
        if v.len() == before {
            *self.per_peer.entry(path.src.peer).or_default() += 1;
        }
        v.push(path);
        v.sort_by(|a, b| a.compare(b));
        true
    }

    /// Removes `peer`'s path for `net`. Returns whether there was one.
    pub fn withdraw(&mut self, segment: u32, net: IpNet, peer: IpAddr) -> bool {
        let Some(v) = self.paths.get_mut(&(segment, net)) else {
            return false;
        };
        let before = v.len();
        v.retain(|p| p.src.peer != peer);
        let removed = v.len() != before;
        if removed {
            if let Some(n) = self.per_peer.get_mut(&peer) {
                *n -= 1;
            }
        }
        if v.is_empty() {
            self.paths.remove(&(segment, net));
            if self.first.remove(&(segment, net)) && self.paths.len() >= FIRST {
                self.first_stale = true;
            }
        }
        removed
    }

    /// Drops every path from `peer`; returns the prefixes it had a path for.
    pub fn peer_down(&mut self, peer: IpAddr) -> Vec<(u32, IpNet)> {
        self.prefixes_of(peer)
            .into_iter()
            .filter(|(s, n)| self.withdraw(*s, *n, peer))
            .collect()
    }

    /// The prefixes `peer` has a path for.
    pub fn prefixes_of(&self, peer: IpAddr) -> Vec<(u32, IpNet)> {
        self.paths
            .iter()
            .filter(|(_, v)| v.iter().any(|p| p.src.peer == peer))
            .map(|(k, _)| *k)
            .collect()
    }

    /// The best path and those equal to it (up to `multipath`), best first.
    pub fn selected(&self, segment: u32, net: &IpNet) -> Vec<Path> {
        self.selected_by(segment, net, |_| Some(()))
            .into_iter()
            .map(|(p, ())| p)
            .collect()
    }

    /// `selected` among the paths `usable` accepts, each with what `usable` made of it.
    /// The agent passes "the next hops it resolves to": a path that cannot be used is no
    /// candidate (RFC 4271 §9.1.2.1), so when the tunnel behind the best path goes down,
    /// the standby takes over at once.
    pub fn selected_by<T>(
        &self,
        segment: u32,
        net: &IpNet,
        usable: impl FnMut(&Path) -> Option<T>,
    ) -> Vec<(Path, T)> {
        let mut out = Vec::new();
        self.for_selected(segment, net, usable, |p, t| out.push((p.clone(), t)));
        out
    }

    /// `selected_by` without collecting: `each` gets the selected paths in order (the
    /// ingest of a full table calls this once per prefix).
    pub fn for_selected<T>(
        &self,
        segment: u32,
        net: &IpNet,
        mut usable: impl FnMut(&Path) -> Option<T>,
        mut each: impl FnMut(&Path, T),
    ) {
        let Some(v) = self.paths.get(&(segment, *net)) else {
            return;
        };
        let mut candidates = v.iter().filter_map(|p| Some((p, usable(p)?)));
        let Some(best) = candidates.next() else {
            return;
        };
        let top = best.0;
        std::iter::once(best)
            .chain(candidates.take_while(|(p, _)| p.rank(top) == Ordering::Equal))
            .take(self.multipath)
            .for_each(|(p, t)| each(p, t));
    }

    /// The paths of `net` as the routing core takes them: next hops best first, each with
    /// the better paths it ranks equal to (for multipath). At most 32 paths: more peers
    /// than that for one prefix is not a CXP's case; the rest are left out.
    pub fn ranked(&self, segment: u32, net: &IpNet) -> Option<routing::Paths> {
        let v = self.paths.get(&(segment, *net))?;
        let v = &v[..v.len().min(32)];
        Some(routing::Paths::Ranked {
            paths: v
                .iter()
                .enumerate()
                .map(|(j, p)| RankedHop {
                    next_hop: p.next_hop(),
                    ebgp: p.src.ebgp,
                    equal_to: v[..j]
                        .iter()
                        .enumerate()
                        .filter(|(_, q)| p.rank(q) == Ordering::Equal)
                        .fold(0, |m, (i, _)| m | 1 << i),
                })
                .collect(),
            multipath: self.multipath.min(u8::MAX as usize) as u8,
        })
    }

    /// The first `FIRST` (segment, prefix) keys in order.
    pub fn first(&mut self) -> Vec<(u32, IpNet)> {
        if self.first_stale {
            let mut heap = std::collections::BinaryHeap::with_capacity(FIRST + 1);
            for k in self.paths.keys() {
                if heap.len() < FIRST {
                    heap.push(*k);
                } else if heap.peek().is_some_and(|top| k < top) {
                    heap.pop();
                    heap.push(*k);
                }
            }
            self.first = heap.into_iter().collect();
            self.first_stale = false;
        }
        self.first.iter().copied().collect()
    }

    /// The paths for `net`, best first.
    pub fn paths(&self, segment: u32, net: &IpNet) -> Option<&Paths> {
        self.paths.get(&(segment, *net))
    }

    /// How many prefixes `peer` has a path for.
    pub fn count_of(&self, peer: IpAddr) -> usize {
        self.per_peer.get(&peer).copied().unwrap_or(0)
    }

    /// Every (segment, prefix) with its paths, for status.
    pub fn all(&self) -> impl Iterator<Item = (&(u32, IpNet), &Paths)> {
        self.paths.iter()
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bgp::packet::AsSegment;

    fn path(
        peer: &str,
        id: &str,
        lp: Option<u32>,
        aspath: &[u32],
        med: Option<u32>,
        ebgp: bool,
    ) -> Path {
        Path::new(
            peer.parse().unwrap(),
            id.parse().unwrap(),
            ebgp,
            peer.parse().unwrap(),
            Attrs {
                local_pref: lp,
                med,
                as_path: vec![AsSegment {
                    kind: 2,
                    asns: aspath.to_vec(),
                }],
                ..Default::default()
            },
        )
    }

    #[test]
    fn best_path_follows_rfc4271_order() {
        let n: IpNet = "10.0.0.0/8".parse().unwrap();
        let mut r = Rib::new(1);
        assert!(r.update(
            1,
            n,
            path("10.0.0.1", "1.1.1.1", None, &[1, 2, 3], None, true)
        ));
        // Shorter AS path wins.
        assert!(r.update(1, n, path("10.0.0.2", "2.2.2.2", None, &[1, 2], None, true)));
        assert_eq!(r.selected(1, &n)[0].peer().to_string(), "10.0.0.2");
        // Higher LOCAL_PREF beats a shorter path.
        assert!(r.update(
            1,
            n,
            path("10.0.0.3", "3.3.3.3", Some(200), &[1, 2, 3, 4], None, false)
        ));
        assert_eq!(r.selected(1, &n)[0].peer().to_string(), "10.0.0.3");
        // Withdrawing the best falls back to the next.
        assert!(r.withdraw(1, n, "10.0.0.3".parse().unwrap()));
        assert_eq!(r.selected(1, &n)[0].peer().to_string(), "10.0.0.2");
        // Lower MED from the same neighbouring AS; router id breaks the last tie.
        let mut r = Rib::new(1);
        r.update(
            1,
            n,
            path("10.0.0.1", "9.9.9.9", None, &[7], Some(50), true),
        );
        r.update(
            1,
            n,
            path("10.0.0.2", "8.8.8.8", None, &[7], Some(10), true),
        );
        assert_eq!(r.selected(1, &n)[0].peer().to_string(), "10.0.0.2");
        r.update(
            1,
            n,
            path("10.0.0.3", "1.1.1.1", None, &[7], Some(10), true),
        );
        assert_eq!(r.selected(1, &n)[0].peer().to_string(), "10.0.0.3");
        // eBGP over iBGP.
        let mut r = Rib::new(1);
        r.update(1, n, path("10.0.0.1", "1.1.1.1", None, &[7], None, false));
        r.update(1, n, path("10.0.0.2", "2.2.2.2", None, &[7], None, true));
        assert_eq!(r.selected(1, &n)[0].peer().to_string(), "10.0.0.2");
    }

    #[test]
    fn multipath_takes_equal_paths_and_peer_down_cleans_up() {
        let n: IpNet = "10.0.0.0/8".parse().unwrap();
        let mut r = Rib::new(4);
        r.update(1, n, path("10.0.0.1", "1.1.1.1", None, &[7, 8], None, true));
        r.update(1, n, path("10.0.0.2", "2.2.2.2", None, &[9, 8], None, true));
        r.update(
            1,
            n,
            path("10.0.0.3", "3.3.3.3", None, &[9, 8, 8], None, true),
        );
        assert_eq!(
            r.selected(1, &n).len(),
            2,
            "equal AS-path length share, longer does not"
        );
        assert_eq!(r.count_of("10.0.0.1".parse().unwrap()), 1);
        assert_eq!(r.peer_down("10.0.0.1".parse().unwrap()), vec![(1, n)]);
        assert_eq!(r.count_of("10.0.0.1".parse().unwrap()), 0);
        assert_eq!(r.count_of("10.0.0.2".parse().unwrap()), 1);
        assert_eq!(r.selected(1, &n).len(), 1);
        assert!(r.peer_down("10.0.0.9".parse().unwrap()).is_empty());
        assert!(r.selected(2, &n).is_empty(), "segments are separate");
    }

    #[test]
    fn a_path_whose_next_hop_is_unreachable_is_no_candidate() {
        let n: IpNet = "10.0.0.0/8".parse().unwrap();
        let mut r = Rib::new(4);
        // Active/standby: the standby prepends.
        r.update(1, n, path("10.0.0.1", "1.1.1.1", None, &[7], None, true));
        r.update(
            1,
            n,
            path("10.0.0.2", "2.2.2.2", None, &[7, 7, 7], None, true),
        );
        let up =
            |down: &'static str| move |p: &Path| (p.next_hop().to_string() != down).then_some(());
        let peers = |v: Vec<(Path, ())>| {
            v.iter()
                .map(|(p, _)| p.peer().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(peers(r.selected_by(1, &n, up("none"))), ["10.0.0.1"]);
        assert_eq!(peers(r.selected_by(1, &n, up("10.0.0.1"))), ["10.0.0.2"]);
        // ECMP: an equal path behind a dead next hop leaves the set.
        r.update(1, n, path("10.0.0.3", "3.3.3.3", None, &[8], None, true));
        assert_eq!(
            peers(r.selected_by(1, &n, up("none"))),
            ["10.0.0.1", "10.0.0.3"]
        );
        assert_eq!(peers(r.selected_by(1, &n, up("10.0.0.3"))), ["10.0.0.1"]);
        assert!(r.selected_by(1, &n, |_| None::<()>).is_empty());
        // The same path again changes nothing; the standby's withdrawal is a change.
        assert!(!r.update(
            1,
            n,
            path("10.0.0.2", "2.2.2.2", None, &[7, 7, 7], None, true)
        ));
        assert!(r.withdraw(1, n, "10.0.0.2".parse().unwrap()));
        assert!(!r.withdraw(1, n, "10.0.0.2".parse().unwrap()));
    }

    #[test]
    fn the_first_prefixes_stay_known_through_updates_and_withdrawals() {
        let mut r = Rib::new(1);
        let net = |i: u32| {
            IpNet::from(ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(i << 8), 24).unwrap())
        };
        let p = || path("10.0.0.1", "1.1.1.1", None, &[1], None, true);
        for i in (0..300).rev() {
            r.update(1, net(i), p());
        }
        let want: Vec<_> = (0..FIRST as u32).map(|i| (1, net(i))).collect();
        assert_eq!(r.first(), want);
        // Withdrawing one of them pulls the next in; others change nothing.
        r.withdraw(1, net(3), "10.0.0.1".parse().unwrap());
        r.withdraw(1, net(250), "10.0.0.1".parse().unwrap());
        let want: Vec<_> = (0..=FIRST as u32)
            .filter(|i| *i != 3)
            .map(|i| (1, net(i)))
            .collect();
        assert_eq!(r.first(), want);
        r.peer_down("10.0.0.1".parse().unwrap());
        assert!(r.first().is_empty());
    }
}
