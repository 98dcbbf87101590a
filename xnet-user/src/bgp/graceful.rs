//! Graceful restart, helper side (RFC 4724 §4.2): when a peer that announced graceful
//! restart drops its session without a NOTIFICATION, its routes stay in the RIB and the
//! data plane, marked stale, until it sends End-of-RIB on the new session (stale ones it
//! did not announce again go then) or its restart time runs out.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

type Key = (u32, IpNet);

#[derive(Default)]
pub struct Stale {
    peers: HashMap<IpAddr, (HashSet<Key>, Instant)>,
}

impl Stale {
    /// Marks `routes` of `peer` stale for `secs` seconds; returns how many.
    pub fn keep(&mut self, peer: IpAddr, routes: Vec<Key>, secs: u16) -> usize {
        let n = routes.len();
        let deadline = Instant::now() + Duration::from_secs(secs as u64);
        self.peers
            .insert(peer, (routes.into_iter().collect(), deadline));
        n
    }

    /// The peer is back: its stale routes wait `secs` more for its End-of-RIB.
    pub fn rearm(&mut self, peer: IpAddr, secs: u16) -> usize {
        match self.peers.get_mut(&peer) {
            Some((routes, deadline)) => {
                *deadline = Instant::now() + Duration::from_secs(secs as u64);
                routes.len()
            }
            None => 0,
        }
    }

    /// The peer announced or withdrew `key` again: it is current, not stale.
    pub fn refreshed(&mut self, peer: IpAddr, key: &Key) {
        if let Some((routes, _)) = self.peers.get_mut(&peer) {
            routes.remove(key);
        }
    }

    pub fn is_stale(&self, peer: IpAddr, key: &Key) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|(routes, _)| routes.contains(key))
    }

    pub fn has(&self, peer: IpAddr) -> bool {
        self.peers.contains_key(&peer)
    }

    /// Ends the wait for `peer` (End-of-RIB, no graceful restart on the new session, or
    /// time out): the routes still stale, to be withdrawn.
    pub fn take(&mut self, peer: IpAddr) -> Vec<Key> {
        self.peers
            .remove(&peer)
            .map(|(r, _)| r.into_iter().collect())
            .unwrap_or_default()
    }

    /// Peers whose restart time ran out.
    pub fn expired(&self, now: Instant) -> Vec<IpAddr> {
        self.peers
            .iter()
            .filter(|(_, (_, d))| *d <= now)
            .map(|(p, _)| *p)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_routes_refresh_and_expire() {
        let p: IpAddr = "10.0.0.2".parse().unwrap();
        let a = (1, "10.1.0.0/16".parse().unwrap());
        let b = (1, "10.2.0.0/16".parse().unwrap());
        let mut s = Stale::default();
        assert_eq!(s.keep(p, vec![a, b], 120), 2);
        assert!(s.is_stale(p, &a));
        s.refreshed(p, &a);
        assert!(!s.is_stale(p, &a) && s.is_stale(p, &b));
        assert!(s.expired(Instant::now()).is_empty());
        assert_eq!(
            s.expired(Instant::now() + Duration::from_secs(121)),
            vec![p]
        );
        assert_eq!(s.take(p), vec![b]);
        assert!(!s.has(p));
    }
}
