//! The flow cache: sampled packets aggregated into flow records, expired by the idle and
//! active timeouts (RFC 7011's metering process, as a state machine: samples and the
//! time in, finished records out).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use xnet_common::{FlowSample, Reason};

/// What makes a flow: the 5-tuple, where it came in and went, the segment, the rule it
/// matched and what became of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub segment: u32,
    pub ingress: u32,
    pub egress: u32,
    /// The policy rule's index + 1 (0: none).
    pub rule: u32,
    pub reason: Reason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub key: Key,
    /// Sampled packets and their bytes (not scaled: `sampling` says by how much).
    pub packets: u64,
    pub bytes: u64,
    /// Unix milliseconds of the first and last sampled packet.
    pub first_ms: u64,
    pub last_ms: u64,
    /// 1 in `sampling` packets was sampled.
    pub sampling: u32,
}

pub struct Cache {
    flows: HashMap<Key, Record>,
    /// A flow with no sample for this long is finished.
    idle_ms: u64,
    /// A long flow is reported at least this often (its counts start again).
    active_ms: u64,
    /// At most this many flows; when full, new flows' samples are counted as lost.
    max: usize,
    pub lost: u64,
}

/// Addresses back from the flow record's words (`xnet_common::policy::words`).
pub fn address(family: u8, w: &[u32; 4]) -> IpAddr {
    if family == 6 {
        let mut b = [0u8; 16];
        for (i, x) in w.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&x.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(b))
    } else {
        IpAddr::V4(Ipv4Addr::from(w[0].to_ne_bytes()))
    }
}

impl Cache {
    pub fn new(idle_ms: u64, active_ms: u64, max: usize) -> Cache {
        Cache {
            flows: HashMap::new(),
            idle_ms,
            active_ms,
            max,
            lost: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// One sample, taken at `now_ms`, from a segment sampling 1 in `sampling`.
    pub fn add(&mut self, s: &FlowSample, sampling: u32, now_ms: u64) {
        let key = Key {
            src: address(s.family, &s.src),
            dst: address(s.family, &s.dst),
            proto: s.proto,
            sport: s.sport,
            dport: s.dport,
            segment: s.segment,
            ingress: s.ingress,
            egress: s.egress,
            rule: s.rule,
            reason: Reason::from_index(s.reason as u32),
        };
        if !self.flows.contains_key(&key) && self.flows.len() >= self.max {
            self.lost += 1;
            return;
        }
        let r = self.flows.entry(key).or_insert(Record {
            key,
            packets: 0,
            bytes: 0,
            first_ms: now_ms,
            last_ms: now_ms,
            sampling,
        });
        if r.packets == 0 {
            // The first sample since the active timeout reported it.
            r.first_ms = now_ms;
        }
        r.packets += 1;
        r.bytes += u64::from(s.bytes);
        r.last_ms = now_ms;
    }

    /// Records due at `now_ms`: idle flows leave the cache; flows active for longer than
    /// the active timeout are reported and go on with fresh counts.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Record> {
        let mut out = Vec::new();
        let (idle, active) = (self.idle_ms, self.active_ms);
        self.flows.retain(|_, r| {
            if now_ms.saturating_sub(r.last_ms) >= idle {
                out.push(*r);
                return false;
            }
            if now_ms.saturating_sub(r.first_ms) >= active {
                out.push(*r);
                r.packets = 0;
                r.bytes = 0;
                r.first_ms = now_ms;
                r.last_ms = now_ms;
            }
            true
        });
        // A flow restarted by the active timeout and not seen since has nothing to say.
        self.flows
            .retain(|_, r| r.packets > 0 || now_ms - r.first_ms < idle);
        out.sort_by_key(|r| r.first_ms);
        out
    }

    /// Every flow, as at a stop.
    pub fn drain(&mut self) -> Vec<Record> {
        let mut out: Vec<Record> = self.flows.drain().map(|(_, r)| r).collect();
        out.retain(|r| r.packets > 0);
        out.sort_by_key(|r| r.first_ms);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xnet_common::policy::words;

    fn sample(sport: u16, bytes: u32) -> FlowSample {
        FlowSample {
            src: words(&[10, 1, 0, 1]),
            dst: words(&[192, 168, 10, 1]),
            ingress: 2,
            egress: 3,
            segment: 1,
            rule: 1,
            bytes,
            sport,
            dport: 9000,
            family: 4,
            proto: 17,
            reason: Reason::Steered as u8,
            _pad: 0,
        }
    }

    #[test]
    fn samples_of_one_flow_make_one_record_until_idle() {
        let mut c = Cache::new(1_000, 10_000, 100);
        c.add(&sample(5000, 100), 10, 0);
        c.add(&sample(5000, 200), 10, 400);
        c.add(&sample(5001, 50), 10, 500);
        assert_eq!(c.len(), 2);
        assert!(c.expire(1_300).is_empty(), "not idle for 1 s yet");
        let out = c.expire(1_400);
        assert_eq!(out.len(), 1);
        let r = out[0];
        assert_eq!(r.key.src, "10.1.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(r.key.dst, "192.168.10.1".parse::<IpAddr>().unwrap());
        assert_eq!((r.key.sport, r.key.dport, r.key.proto), (5000, 9000, 17));
        assert_eq!(
            (r.packets, r.bytes, r.first_ms, r.last_ms),
            (2, 300, 0, 400)
        );
        assert_eq!(
            (r.sampling, r.key.rule, r.key.reason),
            (10, 1, Reason::Steered)
        );
        assert_eq!(c.expire(1_500).len(), 1, "the second flow");
        assert!(c.is_empty());
    }

    #[test]
    fn a_long_flow_is_reported_every_active_timeout() {
        let mut c = Cache::new(1_000, 3_000, 100);
        let mut reported = Vec::new();
        for t in (0..7_000).step_by(100) {
            c.add(&sample(5000, 10), 1, t);
            reported.extend(c.expire(t));
        }
        reported.extend(c.drain());
        let packets: u64 = reported.iter().map(|r| r.packets).sum();
        assert_eq!(packets, 70, "no sample lost or counted twice");
        assert_eq!(reported.len(), 3, "{reported:?}");
        assert_eq!((reported[0].first_ms, reported[0].last_ms), (0, 3_000));
        assert_eq!((reported[1].first_ms, reported[1].last_ms), (3_100, 6_100));
    }

    #[test]
    fn a_full_cache_counts_new_flows_as_lost() {
        let mut c = Cache::new(1_000, 3_000, 2);
        for p in 0..3 {
            c.add(&sample(p, 10), 1, 0);
        }
        c.add(&sample(0, 10), 1, 1);
        assert_eq!((c.len(), c.lost), (2, 1));
    }

    #[test]
    fn ipv6_addresses_come_back_from_words() {
        let a: Ipv6Addr = "fd01::1".parse().unwrap();
        assert_eq!(address(6, &words(&a.octets())), IpAddr::V6(a));
    }
}
