//! Real packets through the loaded XDP program with `BPF_PROG_TEST_RUN`: the action, the
//! exact bytes out, and the counters, for forwarding and for every reason to pass.

use xnet_common::{csum, Reason};
use xnet_lab::testkit::*;
use xnet_user::dataplane::{Dataplane, NhKey};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb0];
const MAC_NH: [u8; 6] = [0x02, 0, 0, 0, 0, 0x22];
const FWD: &str = xnet_common::names::PROG_FORWARD;

/// Ports a (ingress, segment 1), b (segment 1), c (segment 2), with routes and neighbours.
struct Lab {
    dp: Dataplane,
    a: u32,
    b: u32,
    c: u32,
}

fn nh(ifindex: u32, via: &str) -> NhKey {
    NhKey {
        ifindex,
        via: via.parse().unwrap(),
    }
}

fn lab() -> Lab {
    sh("ip link add xa type veth peer name xa-peer && ip link add xb type veth peer name xb-peer && ip link add xc type veth peer name xc-peer");
    sh("for i in xa xa-peer xb xb-peer xc xc-peer; do ip link set $i up; done");
    let (a, b, c) = (ifindex("xa"), ifindex("xb"), ifindex("xc"));
    let mut dp = Dataplane::load(2048).expect("XDP object loads and passes the verifier");
    dp.add_segment(1).unwrap();
    dp.add_segment(2).unwrap();
    dp.set_interface(a, 1, MAC_CXP, 0).unwrap();
    dp.set_interface(b, 1, MAC_B, 0).unwrap();
    dp.set_interface(c, 2, MAC_B, 0).unwrap();
    dp.set_route(1, "10.2.0.0/16".parse().unwrap(), &[nh(b, "10.0.2.2")])
        .unwrap();
    dp.set_route(1, "10.1.0.0/16".parse().unwrap(), &[nh(a, "10.0.1.2")])
        .unwrap();
    dp.set_route(1, "10.9.0.0/16".parse().unwrap(), &[nh(b, "10.0.9.9")])
        .unwrap();
    dp.set_route(1, "fd02::/48".parse().unwrap(), &[nh(b, "fd00:2::2")])
        .unwrap();
    dp.set_route(2, "10.3.0.0/16".parse().unwrap(), &[nh(c, "10.0.3.2")])
        .unwrap();
    dp.set_neighbour(b, "10.0.2.2".parse().unwrap(), Some(MAC_NH))
        .unwrap();
    dp.set_neighbour(b, "fd00:2::2".parse().unwrap(), Some(MAC_NH))
        .unwrap();
    dp.set_neighbour(a, "10.0.1.2".parse().unwrap(), Some(MAC_H1))
        .unwrap();
    dp.set_neighbour(c, "10.0.3.2".parse().unwrap(), Some(MAC_NH))
        .unwrap();
    dp.set_local_addrs(&["10.0.1.1".parse().unwrap(), "fd00:1::1".parse().unwrap()])
        .unwrap();
    Lab { dp, a, b, c }
}

/// Runs `pkt` in on `ifindex`; returns action and bytes, and checks that exactly one
/// packet was counted, under `reason`.
fn run(lab: &mut Lab, ifindex: u32, pkt: &[u8], reason: Reason) -> (u32, Vec<u8>) {
    let before = lab.dp.counters().unwrap();
    let (action, out, _) = lab.dp.test_run_ingress(FWD, pkt, ifindex).unwrap();
    let after = lab.dp.counters().unwrap();
    let moved: Vec<(&str, u64)> = Reason::ALL
        .iter()
        .map(|r| (r.name(), after.reason(*r) - before.reason(*r)))
        .filter(|(_, d)| *d != 0)
        .collect();
    assert_eq!(
        moved,
        vec![(reason.name(), 1)],
        "exactly one packet counted, as {}",
        reason.name()
    );
    let (b, a) = (before.interface(ifindex), after.interface(ifindex));
    assert_eq!(a.rx - b.rx, 1, "rx counted once on the ingress interface");
    let kind = match action {
        XDP_PASS => a.passed - b.passed,
        XDP_DROP => a.dropped - b.dropped,
        _ => a.forwarded - b.forwarded,
    };
    assert_eq!(kind, 1, "the interface counter for action {action} moved");
    (action, out)
}

fn assert_pass(lab: &mut Lab, pkt: &[u8], reason: Reason) {
    let a = lab.a;
    let (action, out) = run(lab, a, pkt, reason);
    assert_eq!(action, XDP_PASS, "{}", reason.name());
    assert_eq!(
        out,
        pkt,
        "{}: a passed packet is not modified",
        reason.name()
    );
}

#[test]
fn ipv4_forward_rewrites_exactly_ttl_checksum_and_macs() {
    if !require_root("ipv4_forward_rewrites_exactly_ttl_checksum_and_macs") {
        return;
    }
    in_private_netns(|| {
        let mut lab = lab();
        let pkt = udp4("10.1.0.5", "10.2.3.4", 64, 1234, 80);
        let a = lab.a;
        let (action, out) = run(&mut lab, a, &pkt, Reason::Forwarded);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(&out[0..6], &MAC_NH, "destination MAC is the next hop's");
        assert_eq!(&out[6..12], &MAC_B, "source MAC is the egress port's");
        let ip = &out[14..34];
        assert_eq!(ip[8], 63, "TTL decremented");
        assert_eq!(csum::checksum(ip), 0, "IPv4 header checksum still valid");
        let mut expect = pkt.clone();
        expect[..12].copy_from_slice(&out[..12]);
        expect[14 + 8] = 63;
        expect[14 + 10..14 + 12].copy_from_slice(&out[14 + 10..14 + 12]);
        assert_eq!(out, expect, "nothing else changed");
    });
}

#[test]
fn ipv6_forward_decrements_hop_limit() {
    if !require_root("ipv6_forward_decrements_hop_limit") {
        return;
    }
    in_private_netns(|| {
        let mut lab = lab();
        let pkt = udp6("fd01::5", "fd02:0:0:7::1", 64, 1234, 80);
        let a = lab.a;
        let (action, out) = run(&mut lab, a, &pkt, Reason::Forwarded);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(&out[0..6], &MAC_NH);
        assert_eq!(&out[6..12], &MAC_B);
        assert_eq!(out[14 + 7], 63);
        assert_eq!(out[12..], {
            let mut e = pkt[12..].to_vec();
            e[2 + 7] = 63;
            e
        });
    });
}

#[test]
fn hairpin_uses_xdp_tx_and_vlan_tag_is_removed() {
    if !require_root("hairpin_uses_xdp_tx_and_vlan_tag_is_removed") {
        return;
    }
    in_private_netns(|| {
        let mut lab = lab();
        let a = lab.a;
        let (action, out) = run(
            &mut lab,
            a,
            &udp4("10.1.0.5", "10.1.0.9", 64, 1, 2),
            Reason::Forwarded,
        );
        assert_eq!(action, XDP_TX, "egress = ingress goes back out with XDP_TX");
        assert_eq!(&out[0..6], &MAC_H1);
        // One 802.1Q tag: parsed, routed, and removed on the way out.
        let plain = udp4("10.1.0.5", "10.2.0.1", 64, 1, 2);
        let mut tagged = plain[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
        tagged.extend_from_slice(&plain[12..]);
        let (action, out) = run(&mut lab, a, &tagged, Reason::Forwarded);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(out.len(), plain.len(), "tag removed");
        assert_eq!(&out[12..14], &[0x08, 0x00]);
        assert_eq!(out[14 + 8], 63);
        assert_eq!(csum::checksum(&out[14..34]), 0);
    });
}

#[test]
fn every_pass_reason_is_counted_and_the_packet_left_alone() {
    if !require_root("every_pass_reason_is_counted_and_the_packet_left_alone") {
        return;
    }
    in_private_netns(|| {
        let mut lab = lab();
        let l = &mut lab;
        assert_pass(
            l,
            &udp4("10.1.0.5", "10.0.1.1", 64, 1, 2),
            Reason::PassLocal,
        );
        assert_pass(
            l,
            &udp6("fd01::5", "fd00:1::1", 64, 1, 2),
            Reason::PassLocal,
        );
        let mut arp = eth([0xff; 6], MAC_H1, 0x0806);
        arp.extend_from_slice(&[0u8; 28]);
        assert_pass(l, &arp, Reason::PassArp);
        let mut ns = eth(MAC_CXP, MAC_H1, 0x86dd);
        ns.extend(ipv6(
            "fe80::1".parse().unwrap(),
            "ff02::1:ff00:1".parse().unwrap(),
            255,
            58,
            &[135, 0, 0, 0, 0, 0, 0, 0],
        ));
        assert_pass(l, &ns, Reason::PassNd);
        assert_pass(l, &udp4("10.1.0.5", "10.2.0.1", 1, 1, 2), Reason::PassTtl);
        assert_pass(l, &udp6("fd01::5", "fd02::1", 1, 1, 2), Reason::PassTtl);
        let mut opts = udp4("10.1.0.5", "10.2.0.1", 64, 1, 2);
        opts[14] = 0x46;
        assert_pass(l, &opts, Reason::PassIpOptions);
        let mut frag = udp4("10.1.0.5", "10.2.0.1", 64, 1, 2);
        frag[14 + 6] = 0x20; // more fragments
        assert_pass(l, &frag, Reason::PassFragment);
        assert_pass(
            l,
            &udp4("10.1.0.5", "10.9.0.1", 64, 1, 2),
            Reason::PassNoNeighbour,
        );
        let mut esp = eth(MAC_CXP, MAC_H1, 0x0800);
        esp.extend(ipv4(
            "10.1.0.5".parse().unwrap(),
            "10.2.0.1".parse().unwrap(),
            64,
            50,
            &[0u8; 16],
        ));
        assert_pass(l, &esp, Reason::PassEsp);
        assert_pass(
            l,
            &udp4("10.1.0.5", "10.2.0.1", 64, 500, 500),
            Reason::PassIke,
        );
        assert_pass(
            l,
            &udp4("10.1.0.5", "10.2.0.1", 64, 4500, 4500),
            Reason::PassIke,
        );
        let mut bgp = eth(MAC_CXP, MAC_H1, 0x0800);
        bgp.extend(ipv4(
            "10.1.0.5".parse().unwrap(),
            "10.2.0.1".parse().unwrap(),
            64,
            6,
            &l4(40000, 179),
        ));
        assert_pass(l, &bgp, Reason::PassBgp);
        assert_pass(
            l,
            &udp4("10.1.0.5", "172.16.0.1", 64, 1, 2),
            Reason::PassNoRoute,
        );
        assert_pass(
            l,
            &udp6("fd01::5", "2001:db8::1", 64, 1, 2),
            Reason::PassNoRoute,
        );
        assert_pass(
            l,
            &udp4("10.1.0.5", "224.0.0.5", 64, 1, 2),
            Reason::PassMulticast,
        );
        assert_pass(
            l,
            &udp4("10.1.0.5", "255.255.255.255", 64, 1, 2),
            Reason::PassMulticast,
        );
        assert_pass(
            l,
            &udp6("fd01::5", "fe80::2", 64, 1, 2),
            Reason::PassMulticast,
        );
        let mut hbh = eth(MAC_CXP, MAC_H1, 0x86dd);
        hbh.extend(ipv6(
            "fd01::5".parse().unwrap(),
            "fd02::1".parse().unwrap(),
            64,
            0,
            &[17, 0, 5, 2, 0, 0, 1, 0],
        ));
        assert_pass(l, &hbh, Reason::PassHopByHop);
        let mut lldp = eth([0x01, 0x80, 0xc2, 0, 0, 0x0e], MAC_H1, 0x88cc);
        lldp.extend_from_slice(&[0u8; 46]);
        assert_pass(l, &lldp, Reason::PassNotIp);
    });
}

#[test]
fn malformed_packets_are_dropped_and_unknown_ports_passed() {
    if !require_root("malformed_packets_are_dropped_and_unknown_ports_passed") {
        return;
    }
    in_private_netns(|| {
        let mut lab = lab();
        let a = lab.a;
        let full = udp4("10.1.0.5", "10.2.0.1", 64, 1, 2);
        // Cut inside the IPv4 header, and a header claiming IHL 3.
        let (action, _) = run(&mut lab, a, &full[..14 + 12], Reason::DropMalformed);
        assert_eq!(action, XDP_DROP);
        let mut bad = full.clone();
        bad[14] = 0x43;
        let (action, _) = run(&mut lab, a, &bad, Reason::DropMalformed);
        assert_eq!(action, XDP_DROP);
        let v6 = udp6("fd01::5", "fd02::1", 64, 1, 2);
        let (action, _) = run(&mut lab, a, &v6[..14 + 30], Reason::DropMalformed);
        assert_eq!(action, XDP_DROP, "cut inside the IPv6 addresses");
        // An interface xnet does not manage: the kernel's business.
        sh("ip link add xz type veth peer name xz-peer && ip link set xz up");
        let z = ifindex("xz");
        let before = lab.dp.counters().unwrap().reason(Reason::PassNoInterface);
        let (action, out, _) = lab.dp.test_run_ingress(FWD, &full, z).unwrap();
        assert_eq!((action, out), (XDP_PASS, full));
        assert_eq!(
            lab.dp.counters().unwrap().reason(Reason::PassNoInterface),
            before + 1
        );
    });
}

#[test]
fn segments_do_not_see_each_others_routes() {
    if !require_root("segments_do_not_see_each_others_routes") {
        return;
    }
    in_private_netns(|| {
        let mut lab = lab();
        let (a, c) = (lab.a, lab.c);
        // 10.3/16 exists only in segment 2; 10.2/16 only in segment 1.
        let (action, _) = run(
            &mut lab,
            a,
            &udp4("10.1.0.5", "10.3.0.1", 64, 1, 2),
            Reason::PassNoRoute,
        );
        assert_eq!(action, XDP_PASS);
        let (action, _) = run(
            &mut lab,
            c,
            &udp4("10.3.0.5", "10.2.0.1", 64, 1, 2),
            Reason::PassNoRoute,
        );
        assert_eq!(action, XDP_PASS);
        let (action, _) = run(
            &mut lab,
            c,
            &udp4("10.4.0.5", "10.3.0.1", 64, 1, 2),
            Reason::Forwarded,
        );
        assert_eq!(
            action, XDP_TX,
            "segment 2's own route, back out of its only port"
        );
    });
}

#[test]
fn ecmp_spreads_flows_and_keeps_each_flow_on_one_next_hop() {
    if !require_root("ecmp_spreads_flows_and_keeps_each_flow_on_one_next_hop") {
        return;
    }
    in_private_netns(|| {
        let mut lab = lab();
        let (a, b) = (lab.a, lab.b);
        let hops: Vec<NhKey> = (1..=4)
            .map(|i| nh(b, &format!("10.0.2.{}", 10 + i)))
            .collect();
        lab.dp
            .set_route(1, "10.50.0.0/16".parse().unwrap(), &hops)
            .unwrap();
        for (i, h) in hops.iter().enumerate() {
            lab.dp
                .set_neighbour(b, h.via, Some([0x02, 0, 0, 0, 0x11, i as u8]))
                .unwrap();
        }
        let mut share = [0u32; 4];
        for port in 0..2000u16 {
            let pkt = udp4("10.1.0.5", "10.50.1.1", 64, 10000 + port, 443);
            let (action, out, _) = lab.dp.test_run_ingress(FWD, &pkt, a).unwrap();
            assert_eq!(action, XDP_REDIRECT);
            assert_eq!(&out[0..5], &[0x02, 0, 0, 0, 0x11]);
            share[out[5] as usize] += 1;
            let (_, again, _) = lab.dp.test_run_ingress(FWD, &pkt, a).unwrap();
            assert_eq!(again[5], out[5], "the same flow takes the same next hop");
        }
        for (i, s) in share.iter().enumerate() {
            assert!(
                (350..=650).contains(s),
                "next hop {i} got {s} of 2000 flows: {share:?}"
            );
        }
        // Shrinking the group sends every flow to the hops that remain.
        lab.dp
            .set_route(1, "10.50.0.0/16".parse().unwrap(), &hops[..2])
            .unwrap();
        let pkt = udp4("10.1.0.5", "10.50.1.1", 64, 1, 443);
        let (_, out, _) = lab.dp.test_run_ingress(FWD, &pkt, a).unwrap();
        assert!(out[5] < 2);
    });
}

#[test]
fn route_and_neighbour_changes_apply_to_the_next_packet() {
    if !require_root("route_and_neighbour_changes_apply_to_the_next_packet") {
        return;
    }
    in_private_netns(|| {
        let mut lab = lab();
        let (a, b) = (lab.a, lab.b);
        let pkt = udp4("10.1.0.5", "10.9.1.1", 64, 1, 2);
        let (action, _) = run(&mut lab, a, &pkt, Reason::PassNoNeighbour);
        assert_eq!(action, XDP_PASS);
        lab.dp
            .set_neighbour(b, "10.0.9.9".parse().unwrap(), Some(MAC_NH))
            .unwrap();
        let (action, _) = run(&mut lab, a, &pkt, Reason::Forwarded);
        assert_eq!(action, XDP_REDIRECT, "resolved neighbour: fast path");
        // A more specific route wins, then its removal restores the covering one.
        lab.dp
            .set_route(1, "10.9.1.0/24".parse().unwrap(), &[nh(a, "10.0.1.2")])
            .unwrap();
        let (action, _) = run(&mut lab, a, &pkt, Reason::Forwarded);
        assert_eq!(action, XDP_TX);
        assert!(lab
            .dp
            .remove_route(1, "10.9.1.0/24".parse().unwrap())
            .unwrap());
        let (action, _) = run(&mut lab, a, &pkt, Reason::Forwarded);
        assert_eq!(action, XDP_REDIRECT);
        lab.dp
            .remove_route(1, "10.9.0.0/16".parse().unwrap())
            .unwrap();
        let (action, _) = run(&mut lab, a, &pkt, Reason::PassNoRoute);
        assert_eq!(action, XDP_PASS);
    });
}

#[test]
fn a_dead_next_hop_leaves_every_group_at_once_and_only_its_flows_move() {
    if !require_root("a_dead_next_hop_leaves_every_group_at_once_and_only_its_flows_move") {
        return;
    }
    in_private_netns(|| {
        let mut lab = lab();
        let (a, b) = (lab.a, lab.b);
        let hops: Vec<NhKey> = (1..=3)
            .map(|i| nh(b, &format!("10.0.2.{}", 10 + i)))
            .collect();
        for (i, h) in hops.iter().enumerate() {
            lab.dp
                .set_neighbour(b, h.via, Some([0x02, 0, 0, 0, 0x11, i as u8]))
                .unwrap();
        }
        // 2,000 prefixes over the three hops (one group) and 100 over the first two.
        for p in 0..2000u32 {
            let net = format!("10.{}.{}.0/24", 100 + p / 256, p % 256);
            lab.dp.set_route(1, net.parse().unwrap(), &hops).unwrap();
        }
        for p in 0..100u32 {
            let net = format!("10.200.{p}.0/24");
            lab.dp
                .set_route(1, net.parse().unwrap(), &hops[..2])
                .unwrap();
        }
        let flows: Vec<Vec<u8>> = (0..600u16)
            .map(|port| udp4("10.1.0.5", "10.101.7.1", 64, 10000 + port, 443))
            .collect();
        let hop_of = |lab: &mut Lab, pkt: &[u8]| {
            let (action, out, _) = lab.dp.test_run_ingress(FWD, pkt, a).unwrap();
            assert_eq!(action, XDP_REDIRECT);
            out[5]
        };
        let before: Vec<u8> = flows.iter().map(|p| hop_of(&mut lab, p)).collect();
        assert!(before.contains(&1), "some flows use the second hop");
        // The second hop dies: two groups rewritten (not 2,100 prefixes).
        let groups = lab.dp.set_nexthop_alive(hops[1].via, false).unwrap();
        assert_eq!(groups, 2);
        for (pkt, was) in flows.iter().zip(&before) {
            let now = hop_of(&mut lab, pkt);
            assert_ne!(now, 1, "no packet goes to the dead hop");
            if *was != 1 {
                assert_eq!(now, *was, "flows on live hops stay where they were");
            }
        }
        for port in 0..200u16 {
            let p = udp4("10.1.0.5", "10.200.5.1", 64, 20000 + port, 443);
            assert_eq!(
                hop_of(&mut lab, &p),
                0,
                "the two-hop group has one live hop"
            );
        }
        // A new route over the same hops while it is dead avoids it too.
        lab.dp
            .set_route(1, "10.201.0.0/16".parse().unwrap(), &hops[1..])
            .unwrap();
        let p = udp4("10.1.0.5", "10.201.0.1", 64, 1, 443);
        assert_eq!(hop_of(&mut lab, &p), 2);
        // Back: the groups are as they were.
        lab.dp.set_nexthop_alive(hops[1].via, true).unwrap();
        let after: Vec<u8> = flows.iter().map(|p| hop_of(&mut lab, p)).collect();
        assert_eq!(after, before);
    });
}
