//! What a decoded UPDATE may bring into the RIB, by the rules of the session it came on:
//! only negotiated address families (RFC 4760 §6, RFC 5492), no LOCAL_PREF from an
//! external peer (RFC 4271 §5.1.5, RFC 7606 §7.5), the peer's AS first in an external
//! path (RFC 4271 §6.3, on by default as in FRR), no NEXT_HOP that is one of our own
//! addresses (RFC 4271 §6.3). Pure: the session calls it, tests call it with bytes.

use std::net::IpAddr;

use super::packet::{Update, AFI_IPV4, SAFI_UNICAST};

/// The session's side of the rules.
#[derive(Debug, Clone)]
pub struct Screen {
    pub ebgp: bool,
    pub peer_asn: u32,
    /// Check the first AS of an external path against the peer's AS.
    pub enforce_first_as: bool,
    /// (AFI, SAFI) both sides announced.
    pub families: Vec<(u16, u8)>,
    /// Our own addresses: a route with one of them as next hop points back at us.
    pub local: Vec<IpAddr>,
    /// Our BGP identifier: a reflected route that names it as ORIGINATOR_ID is our own.
    pub router_id: std::net::Ipv4Addr,
}

/// What screening took out, for the counters and the log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Screened {
    /// Prefixes (announced or withdrawn) of families that were not negotiated.
    pub not_negotiated: usize,
    /// An End-of-RIB of a family that was not negotiated was ignored.
    pub foreign_end_of_rib: bool,
    /// LOCAL_PREF from an external peer was discarded.
    pub local_pref_discarded: bool,
    /// Announcements turned into withdrawals, and why.
    pub withdrawn: Option<String>,
    /// Our own routes, reflected back to us (RFC 4456 §8): ignored without a warning.
    pub own_reflected: bool,
}

impl Screen {
    /// Applies the rules to `u` in place.
    pub fn apply(&self, u: &mut Update) -> Screened {
        let mut s = Screened::default();
        let negotiated = |afi: u16, safi: u8| self.families.contains(&(afi, safi));
        if !negotiated(AFI_IPV4, SAFI_UNICAST) {
            s.not_negotiated += u.nlri.len() + u.withdrawn.len();
            u.nlri.clear();
            u.withdrawn.clear();
        }
        if let Some(m) = u.mp_reach.take_if(|m| !negotiated(m.afi, m.safi)) {
            s.not_negotiated += m.nlri.len();
        }
        if let Some(m) = u.mp_unreach.take_if(|m| !negotiated(m.afi, m.safi)) {
            s.not_negotiated += m.withdrawn.len();
        }
        if let Some((afi, safi)) = u.end_of_rib {
            if !negotiated(afi, safi) {
                u.end_of_rib = None;
                s.foreign_end_of_rib = true;
            }
        }
        let announces =
            !u.nlri.is_empty() || u.mp_reach.as_ref().is_some_and(|m| !m.nlri.is_empty());
        let Some(attrs) = u.attrs.as_mut().filter(|_| announces) else {
            return s;
        };
        if self.ebgp && attrs.local_pref.take().is_some() {
            s.local_pref_discarded = true;
        }
        if !self.ebgp && attrs.originator_id == Some(self.router_id) {
            // RFC 4456 §8: a route reflector sends our routes back to us; ignore them.
            u.withdraw_all("ORIGINATOR_ID is our BGP identifier".into());
            s.own_reflected = true;
            return s;
        }
        if self.ebgp && self.enforce_first_as && attrs.first_as() != Some(self.peer_asn) {
            // A malformed AS_PATH: RFC 7606 §7.2, treat-as-withdraw.
            let why = format!(
                "first AS {} is not the peer's AS {}",
                attrs
                    .first_as()
                    .map_or("(none)".to_string(), |a| a.to_string()),
                self.peer_asn
            );
            u.withdraw_all(why.clone());
            s.withdrawn = Some(why);
            return s;
        }
        // Our own address as next hop: the routes are ignored, the session stays. What the
        // peer announced before under these prefixes is replaced, so they are withdrawn.
        let own = |nh: Option<IpAddr>| nh.is_some_and(|nh| self.local.contains(&nh));
        let v4_own = !u.nlri.is_empty() && own(attrs.next_hop.map(IpAddr::V4));
        let mp_own = u.mp_reach.as_ref().is_some_and(|m| own(m.next_hop));
        if v4_own || mp_own {
            let why = "NEXT_HOP is one of our own addresses".to_string();
            if v4_own {
                u.withdrawn.append(&mut u.nlri);
            }
            if mp_own {
                u.withdraw_mp_reach();
            }
            s.withdrawn = Some(why);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bgp::packet::*;
    use ipnet::IpNet;

    use crate::testutil::hex;

    /// The UPDATE with path attributes `attrs` and NLRI `nlri` (hex), decoded with
    /// 4-octet AS numbers.
    fn update(attrs: &str, nlri: &str) -> Update {
        let (a, n) = (hex(attrs), hex(nlri));
        let mut wire = vec![0xff; 16];
        wire.extend_from_slice(&((19 + 4 + a.len() + n.len()) as u16).to_be_bytes());
        wire.extend_from_slice(&[2, 0, 0]);
        wire.extend_from_slice(&(a.len() as u16).to_be_bytes());
        wire.extend(a);
        wire.extend(n);
        match decode(&wire, true, MAX_LEN) {
            Ok(Message::Update(u)) => u,
            other => panic!("{attrs}: {other:?}"),
        }
    }

    fn ebgp_v4() -> Screen {
        Screen {
            ebgp: true,
            peer_asn: 65001,
            enforce_first_as: true,
            families: vec![(AFI_IPV4, SAFI_UNICAST)],
            local: vec!["192.0.2.1".parse().unwrap()],
            router_id: "192.0.2.1".parse().unwrap(),
        }
    }

    fn ebgp_v6() -> Screen {
        Screen {
            families: vec![(AFI_IPV6, SAFI_UNICAST)],
            ..ebgp_v4()
        }
    }

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    // ORIGIN IGP, AS_PATH [65001], NEXT_HOP 192.0.2.2, LOCAL_PREF 1000; NLRI 10.1.0.0/16.
    const WITH_LOCAL_PREF: &str = "40010100 400206 0201 0000fde9 400304 c0000202 400504 000003e8";
    const NLRI: &str = "10 0a01";

    #[test]
    fn local_pref_from_an_external_peer_is_discarded() {
        let mut u = update(WITH_LOCAL_PREF, NLRI);
        assert_eq!(u.attrs.as_ref().unwrap().local_pref, Some(1000));
        let s = ebgp_v4().apply(&mut u);
        assert!(s.local_pref_discarded);
        assert_eq!(u.attrs.as_ref().unwrap().local_pref, None);
        assert_eq!(u.nlri, vec![n("10.1.0.0/16")], "the route itself stands");
        // From an internal peer it is the path's preference.
        let mut u = update(WITH_LOCAL_PREF, NLRI);
        let ibgp = Screen {
            ebgp: false,
            peer_asn: 65000,
            ..ebgp_v4()
        };
        assert!(!ibgp.apply(&mut u).local_pref_discarded);
        assert_eq!(u.attrs.unwrap().local_pref, Some(1000));
    }

    #[test]
    fn families_that_were_not_negotiated_are_ignored_and_counted() {
        // MP_REACH IPv6 unicast (next hop fd00::2, fd01::/48) on an IPv4-only session.
        let v6 = "800e 1c 0002 01 10 fd000000000000000000000000000002 00 30 fd0000010000 \
                  40010100 400206 0201 0000fde9";
        let mut u = update(v6, "");
        assert!(u.mp_reach.is_some());
        let s = ebgp_v4().apply(&mut u);
        assert_eq!(s.not_negotiated, 1);
        assert!(u.mp_reach.is_none());
        // SAFI 2 (multicast) IPv4 NLRI in MP_REACH: not unicast routes.
        let mc = "800e 0c 0001 02 04 c0000202 00 10 0a02 40010100 400206 0201 0000fde9";
        let mut u = update(mc, "");
        assert_eq!(u.mp_reach.as_ref().unwrap().safi, 2);
        assert_eq!(ebgp_v4().apply(&mut u).not_negotiated, 1);
        assert!(u.mp_reach.is_none() && u.nlri.is_empty());
        // MP_UNREACH of IPv6 and its End-of-RIB: neither touches an IPv4 session.
        let mut u = update("800f 03 0002 01", "");
        assert_eq!(u.end_of_rib, Some((AFI_IPV6, 1)));
        let s = ebgp_v4().apply(&mut u);
        assert!(s.foreign_end_of_rib && u.end_of_rib.is_none());
        // Plain IPv4 NLRI on an IPv6-only session.
        let v6only = Screen {
            families: vec![(AFI_IPV6, SAFI_UNICAST)],
            ..ebgp_v4()
        };
        let mut u = update(WITH_LOCAL_PREF, NLRI);
        assert_eq!(v6only.apply(&mut u).not_negotiated, 1);
        assert!(u.nlri.is_empty());
        let mut u = update("", "");
        assert_eq!(u.end_of_rib, Some((AFI_IPV4, 1)));
        assert!(v6only.apply(&mut u).foreign_end_of_rib);
        assert_eq!(u.end_of_rib, None);
    }

    #[test]
    fn an_external_path_must_start_with_the_peers_as() {
        // AS_PATH [65003 65001] from peer AS 65001: treat-as-withdraw.
        let body = "40010100 40020a 0202 0000fdeb 0000fde9 400304 c0000202";
        let mut u = update(body, NLRI);
        let s = ebgp_v4().apply(&mut u);
        assert!(s.withdrawn.unwrap().contains("65003"));
        assert!(u.attrs.is_none() && u.nlri.is_empty());
        assert_eq!(u.withdrawn, vec![n("10.1.0.0/16")]);
        // A withdrawal carries no AS_PATH to check.
        let mut u = update("800f 06 0002 01 10 fd16", "");
        assert_eq!(ebgp_v6().apply(&mut u), Screened::default());
        assert_eq!(u.mp_unreach.unwrap().withdrawn, vec![n("fd16::/16")]);
        // Switched off (a route server that does not prepend its AS): accepted.
        let mut u = update(body, NLRI);
        let rs = Screen {
            enforce_first_as: false,
            ..ebgp_v4()
        };
        assert_eq!(rs.apply(&mut u).withdrawn, None);
        assert_eq!(u.nlri, vec![n("10.1.0.0/16")]);
        // Internal peers' paths need not start with anything.
        let mut u = update(body, NLRI);
        let ibgp = Screen {
            ebgp: false,
            peer_asn: 65000,
            ..ebgp_v4()
        };
        assert_eq!(ibgp.apply(&mut u).withdrawn, None);
    }

    #[test]
    fn our_routes_reflected_back_are_ignored_quietly() {
        // From a route reflector (iBGP): ORIGINATOR_ID 192.0.2.1, which is us.
        let ibgp = Screen {
            ebgp: false,
            peer_asn: 65000,
            ..ebgp_v4()
        };
        let mut u = update("40010100 400200 400304 c0000203 800904 c0000201", NLRI);
        assert_eq!(
            u.attrs.as_ref().unwrap().originator_id,
            Some("192.0.2.1".parse().unwrap())
        );
        let s = ibgp.apply(&mut u);
        assert!(s.own_reflected && s.withdrawn.is_none());
        assert_eq!(u.withdrawn, vec![n("10.1.0.0/16")]);
        // Another originator: a route like any other.
        let mut u = update("40010100 400200 400304 c0000203 800904 c0000209", NLRI);
        assert_eq!(ibgp.apply(&mut u), Screened::default());
        assert_eq!(u.nlri, vec![n("10.1.0.0/16")]);
    }

    #[test]
    fn our_own_address_as_next_hop_is_ignored() {
        // NEXT_HOP 192.0.2.1: ours.
        let mut u = update("40010100 400206 0201 0000fde9 400304 c0000201", NLRI);
        let s = ebgp_v4().apply(&mut u);
        assert_eq!(
            s.withdrawn.as_deref(),
            Some("NEXT_HOP is one of our own addresses")
        );
        assert!(u.nlri.is_empty());
        assert_eq!(u.withdrawn, vec![n("10.1.0.0/16")]);
        // IPv6 through MP_REACH.
        let v6 = Screen {
            families: vec![(AFI_IPV6, SAFI_UNICAST)],
            local: vec!["fd00::2".parse().unwrap()],
            ..ebgp_v4()
        };
        let mut u = update(
            "800e 1c 0002 01 10 fd000000000000000000000000000002 00 30 fd0000010000 \
             40010100 400206 0201 0000fde9",
            "",
        );
        assert!(v6.apply(&mut u).withdrawn.is_some());
        assert!(u.mp_reach.is_none());
        assert_eq!(u.mp_unreach.unwrap().withdrawn, vec![n("fd00:1::/48")]);
    }
}
