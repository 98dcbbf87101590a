//! What one neighbour is sent: its advertisement mode, split horizon and its export
//! policy, over the segment's routes. Pure, so the rules are tested without sessions.

use std::net::IpAddr;

use super::config::{Advertise, Neighbor};
use super::packet::Attrs;
use super::session::Advert;
use super::SegmentRoute;

/// The routes for neighbour `n` of AS `local_asn`. `routes`: the segment's routes with
/// the peer and attributes of learned ones; `internal(peer)`: that peer is an iBGP one.
pub fn adverts(
    local_asn: u32,
    n: &Neighbor,
    routes: &[SegmentRoute],
    internal: impl Fn(&IpAddr) -> bool,
) -> Vec<Advert> {
    let own = |net| Advert {
        net,
        attrs: Attrs {
            origin: 0,
            ..Default::default()
        },
    };
    let to_internal = n.remote_asn == local_asn;
    let list: Vec<Advert> = match n.advertise {
        Advertise::None => Vec::new(),
        Advertise::Default => {
            vec![own(if n.address.is_ipv4() {
                "0.0.0.0/0".parse().unwrap()
            } else {
                "::/0".parse().unwrap()
            })]
        }
        Advertise::Custom => n.prefixes.iter().map(|p| own(*p)).collect(),
        Advertise::All => routes
            .iter()
            // Split horizon: nothing goes back to the peer it came from, and nothing
            // learned from an internal peer goes to another (RFC 4271 §9.2: xnet is no
            // route reflector).
            .filter(|(_, from)| {
                from.as_ref()
                    .is_none_or(|(peer, _)| *peer != n.address && !(to_internal && internal(peer)))
            })
            .map(|(net, from)| match from {
                Some((_, a)) => Advert {
                    net: *net,
                    attrs: Attrs {
                        local_pref: None,
                        med: None,
                        ..a.attrs.clone()
                    },
                },
                None => own(*net),
            })
            .collect(),
    };
    list.into_iter()
        .filter_map(|mut a| n.export.apply(local_asn, &a.net, &mut a.attrs).then_some(a))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bgp::packet::AsSegment;
    use std::sync::Arc;

    fn neighbor(address: &str, remote_asn: u32) -> Neighbor {
        toml::from_str(&format!(
            "name = \"n\"\nsegment = \"s\"\naddress = \"{address}\"\nremote_asn = {remote_asn}\nadvertise = \"all\""
        ))
        .unwrap()
    }

    #[test]
    fn ibgp_routes_do_not_go_to_other_ibgp_peers() {
        let learned = |peer: &str, asn: u32| {
            Some((
                peer.parse::<IpAddr>().unwrap(),
                Arc::new(crate::bgp::rib::Learned {
                    next_hop: peer.parse().unwrap(),
                    attrs: Attrs {
                        as_path: vec![AsSegment {
                            kind: 2,
                            asns: vec![asn],
                        }],
                        ..Default::default()
                    },
                }),
            ))
        };
        let routes: Vec<SegmentRoute> = vec![
            ("10.0.0.0/16".parse().unwrap(), None),
            ("10.1.0.0/16".parse().unwrap(), learned("192.0.2.1", 65001)),
            ("10.2.0.0/16".parse().unwrap(), learned("192.0.2.2", 65000)),
            ("10.3.0.0/16".parse().unwrap(), learned("192.0.2.3", 65000)),
        ];
        let internal = |p: &IpAddr| ["192.0.2.2", "192.0.2.3"].contains(&p.to_string().as_str());
        let nets = |v: Vec<Advert>| v.iter().map(|a| a.net.to_string()).collect::<Vec<_>>();
        // To iBGP peer .3: static and eBGP-learned only; not .2's, not its own.
        assert_eq!(
            nets(adverts(
                65000,
                &neighbor("192.0.2.3", 65000),
                &routes,
                internal
            )),
            ["10.0.0.0/16", "10.1.0.0/16"]
        );
        // To an eBGP peer: everything but its own.
        assert_eq!(
            nets(adverts(
                65000,
                &neighbor("192.0.2.1", 65001),
                &routes,
                internal
            )),
            ["10.0.0.0/16", "10.2.0.0/16", "10.3.0.0/16"]
        );
    }
}
