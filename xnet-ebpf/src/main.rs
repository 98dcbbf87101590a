//! xnet's data plane: parse, look up the route of the ingress interface's segment, pick
//! an ECMP next hop, rewrite and redirect. Anything it must not handle goes to the kernel,
//! counted by reason (`xnet_common::Reason`).
//!
//! One pipeline (`decide`) serves every way in: `xnet_forward` (XDP, on the config's
//! interfaces) and `xnet_tunnel_in` (TC ingress, for what XFRM decrypted: see `tunnel`).
//! Each hook only executes the verdict in its own terms.
#![no_std]
#![no_main]

mod flows;
mod maps;
mod parse;
mod policy;
mod rewrite;
mod route;
mod stats;
mod tunnel;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    macros::{classifier, xdp},
    maps::lpm_trie::Key,
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use xnet_common::policy::{words, RuleKey, ACTION_DENY, ACTION_STEER, STAY};
use xnet_common::{
    IfConfig, NextHop, Reason, BENCH_FRAME, IF_F_DEFAULT_DENY, IF_F_FIREWALL, LEAF_NONE,
    NH_F_KERNEL, NH_F_VALID,
};

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_redirect};
use maps::{
    BENCH_COUNT, BENCH_DSTS, BENCH_GEN, BENCH_NH, BENCH_ROOTS, BENCH_TRIE_V4, BENCH_TRIE_V6,
    INTERFACES, LOCAL_FILTER, LOCAL_V4, LOCAL_V6, NEXTHOPS, TX_PORTS,
};
use parse::*;

/// The forwarding program, attached to every interface of the config.
#[xdp]
pub fn xnet_forward(ctx: XdpContext) -> u32 {
    let ifindex = ctx.ingress_ifindex() as u32;
    let Some(ifc) = INTERFACES.get(ifindex).filter(|c| c.segment != 0) else {
        stats::count(0, Reason::PassNoInterface, stats::frame_len(&ctx));
        return XDP_PASS;
    };
    // Before the rewrite: the frame as it came in.
    let len = stats::frame_len(&ctx);
    let (action, reason, egress) = xdp_forward(&ctx, ifindex, ifc);
    if reason == Reason::DropMalformed {
        debug!(&ctx, "drop malformed packet on ifindex {}", ifindex);
    }
    stats::count(ifc.slot, reason, len);
    flows::sample(ifc, ifindex, egress, reason, len);
    action
}

/// Policy and routing for packets XFRM decrypted: attached (TC ingress) to xfrm interfaces
/// and to the interfaces where policy-based tunnels' packets come back in.
#[classifier]
pub fn xnet_tunnel_in(ctx: TcContext) -> i32 {
    tunnel::run(&ctx)
}

/// What the pipeline decided for a packet.
#[derive(Clone, Copy)]
pub enum Verdict {
    /// To the kernel, counted by reason.
    Pass(Reason),
    Drop(Reason),
    /// Rewrite for next hop (its id in `NEXTHOPS`) and send; reason `Forwarded` or
    /// `Steered`.
    Send(u32, Reason),
}

/// A parse stage's result in one register (BPF subprograms return in r0 alone): a
/// verdict, or `CONTINUE` when the flow record is filled and the next stages decide.
const CONTINUE: u64 = 3;

impl Verdict {
    #[inline(always)]
    fn pack(self) -> u64 {
        match self {
            Verdict::Pass(r) => (r as u64) << 8,
            Verdict::Drop(r) => 1 | (r as u64) << 8,
            Verdict::Send(nh, r) => 2 | (r as u64) << 8 | (nh as u64) << 32,
        }
    }

    #[inline(always)]
    fn unpack(v: u64) -> Self {
        let r = Reason::from_index((v >> 8) as u32 & 0xff);
        match v & 0xff {
            0 => Verdict::Pass(r),
            1 => Verdict::Drop(r),
            _ => Verdict::Send((v >> 32) as u32, r),
        }
    }
}

const MALFORMED: Verdict = Verdict::Drop(Reason::DropMalformed);

#[inline(always)]
/// The XDP action, the reason it is counted under, and the egress interface (0: none).
fn xdp_forward(ctx: &XdpContext, ifindex: u32, ifc: &IfConfig) -> (u32, Reason, u32) {
    let Some(l2) = ethernet(ctx) else {
        return (XDP_DROP, Reason::DropMalformed, 0);
    };
    let v4 = l2.ethertype == ETH_P_IP;
    match decide::<_, false>(ctx, ifc, l2.ethertype, l2.l3) {
        Verdict::Pass(r) => (XDP_PASS, r, 0),
        Verdict::Drop(r) => (XDP_DROP, r, 0),
        Verdict::Send(id, r) => {
            let Some(nh) = NEXTHOPS.get(id) else {
                return (XDP_PASS, Reason::PassNoNeighbour, 0);
            };
            if rewrite::ttl(ctx, l2.l3, v4).is_none() || rewrite::ethernet(ctx, l2.l3, nh).is_none()
            {
                return (XDP_DROP, Reason::DropMalformed, 0);
            }
            match send(ifindex, nh) {
                Some(action) => (action, r, nh.ifindex),
                // Not in TX_PORTS: the agent marks such next hops invalid, so this is a
                // race with an interface going away.
                None => (XDP_PASS, Reason::PassNoNeighbour, 0),
            }
        }
    }
}

/// `XDP_TX` back out of the ingress port, else `XDP_REDIRECT` through `TX_PORTS`.
#[inline(always)]
fn send(ingress: u32, nh: &NextHop) -> Option<u32> {
    if nh.ifindex == ingress {
        return Some(XDP_TX);
    }
    TX_PORTS.redirect(nh.port, 0).ok()
}

/// The pipeline, in three stages: **parse** (header checks, control plane, local and
/// multicast destinations, TTL; the flow's fields go into the per-CPU flow record),
/// **policy** (classify, then deny, steer or cross into another segment), **route**
/// (longest-prefix match, ECMP). Each stage is its own BPF subprogram or calls them, so
/// the stack frames of parsing and classification are never stacked on each other.
/// `l3`: where the IP header starts; `FROM_TUNNEL`: the packet was decrypted by XFRM
/// (see `sent_from`).
#[inline(always)]
pub fn decide<P: Packet, const FROM_TUNNEL: bool>(
    ctx: &P,
    ifc: &IfConfig,
    ethertype: u16,
    l3: usize,
) -> Verdict {
    let Some(flow) = policy::flow() else {
        return MALFORMED;
    };
    let parsed = match ethertype {
        ETH_P_IP => parse_v4(ctx, ifc.segment, l3, flow),
        ETH_P_IPV6 => parse_v6(ctx, ifc.segment, l3, flow),
        ETH_P_ARP => return Verdict::Pass(Reason::PassArp),
        _ => return Verdict::Pass(Reason::PassNotIp),
    };
    if parsed != CONTINUE {
        return Verdict::unpack(parsed);
    }
    let v6 = ethertype == ETH_P_IPV6;
    let mut root = if v6 { ifc.v6_root } else { ifc.v4_root };
    let f = &flow[0];
    let (src, dst) = (route::fold_words(&f.src), route::fold_words(&f.dst));
    let (proto, sport, dport) = (f.proto, f.sport, f.dport);
    // Packets back from a firewall are routed, never classified again.
    if ifc.flags & IF_F_FIREWALL == 0 {
        let rule = if policy::active() {
            policy::classify(flow)
        } else {
            None
        };
        match rule {
            Some(rule) => {
                policy::count_rule(rule.rule, ctx.len());
                // For flow sampling (`flows`): the record is this packet's own.
                flow[0].matched = rule.rule as u16 + 1;
                match rule.action {
                    ACTION_DENY => return Verdict::Drop(Reason::DropPolicy),
                    ACTION_STEER => {
                        let hash = route::symmetric_hash(src, dst, proto, sport, dport);
                        match policy::steer(rule.service, hash, ctx.len()) {
                            policy::Steer::To(id) => {
                                return sent_from::<FROM_TUNNEL>(
                                    ifc,
                                    v6,
                                    &flow[0].src,
                                    id,
                                    Reason::Steered,
                                )
                            }
                            policy::Steer::Drop => return Verdict::Drop(Reason::DropFailClosed),
                            policy::Steer::Bypass => {}
                        }
                    }
                    _ if rule.to_v4_root != STAY => {
                        root = if v6 { rule.to_v6_root } else { rule.to_v4_root };
                    }
                    _ => {}
                }
            }
            None if ifc.flags & IF_F_DEFAULT_DENY != 0 => return Verdict::Drop(Reason::DropPolicy),
            None => {}
        }
    }
    let nhg = route::lookup_flow(root, &flow[0].dst, v6);
    if nhg == LEAF_NONE {
        return Verdict::Pass(Reason::PassNoRoute);
    }
    let hash = route::flow_hash(src, dst, proto, sport, dport);
    let Some((id, nh)) = route::select(nhg, hash) else {
        return Verdict::Pass(Reason::PassNoRoute);
    };
    // Tunnel routes: XFRM in the kernel encrypts (the contract in ike::daemon).
    if nh.flags & NH_F_KERNEL != 0 {
        return Verdict::Pass(Reason::PassTunnel);
    }
    if nh.flags & NH_F_VALID == 0 {
        return Verdict::Pass(Reason::PassNoNeighbour);
    }
    sent_from::<FROM_TUNNEL>(ifc, v6, &flow[0].src, id, Reason::Forwarded)
}

/// Control-plane traffic the kernel must see even in transit: ESP, IKE, BGP.
#[inline(always)]
fn control_plane(proto: u8, sport: u16, dport: u16) -> Option<Reason> {
    match proto {
        IPPROTO_ESP => Some(Reason::PassEsp),
        IPPROTO_UDP if matches!(sport, 500 | 4500) || matches!(dport, 500 | 4500) => {
            Some(Reason::PassIke)
        }
        IPPROTO_TCP if sport == 179 || dport == 179 => Some(Reason::PassBgp),
        _ => None,
    }
}

/// Parse stage for IPv4 (a subprogram).
#[inline(never)]
fn parse_v4<P: Packet>(ctx: &P, segment: u32, l3: usize, flow: &mut [RuleKey; 2]) -> u64 {
    let Some(h) = read::<[u8; IPV4_HLEN], P>(ctx, l3).map(Ipv4) else {
        return MALFORMED.pack();
    };
    if h.version() != 4 || h.ihl() < 5 {
        return MALFORMED.pack();
    }
    if h.ihl() != 5 {
        return Verdict::Pass(Reason::PassIpOptions).pack();
    }
    if h.fragment() != 0 {
        return Verdict::Pass(Reason::PassFragment).pack();
    }
    let dst = h.dst();
    let dst_words = words(&dst);
    // SAFETY: plain value, only tested for presence.
    if maybe_local(&dst_words) && unsafe { LOCAL_V4.get(&dst) }.is_some() {
        return Verdict::Pass(Reason::PassLocal).pack();
    }
    // Multicast, class E and broadcast (224/3), link-local (169.254/16).
    if dst[0] >= 224 || (dst[0] == 169 && dst[1] == 254) {
        return Verdict::Pass(Reason::PassMulticast).pack();
    }
    let src = words(&h.src());
    transport(
        ctx,
        segment,
        4,
        h.protocol(),
        h.ttl(),
        l3 + IPV4_HLEN,
        flow,
        src,
        dst_words,
    )
}

/// Parse stage for IPv6 (a subprogram).
#[inline(never)]
fn parse_v6<P: Packet>(ctx: &P, segment: u32, l3: usize, flow: &mut [RuleKey; 2]) -> u64 {
    let Some(h) = read::<[u8; 8], P>(ctx, l3).map(Ipv6) else {
        return MALFORMED.pack();
    };
    let (Some(src), Some(dst)) = (
        read::<[u8; 16], P>(ctx, l3 + Ipv6::SRC),
        read::<[u8; 16], P>(ctx, l3 + Ipv6::DST),
    ) else {
        return MALFORMED.pack();
    };
    if h.version() != 6 {
        return MALFORMED.pack();
    }
    let proto = h.next_header();
    if proto == IPPROTO_HOPOPTS {
        return Verdict::Pass(Reason::PassHopByHop).pack();
    }
    if proto == IPPROTO_ICMPV6 {
        // Router/neighbour solicitation and advertisement, redirect: types 133..=137.
        if let Some(t) = read::<u8, P>(ctx, l3 + IPV6_HLEN) {
            if (133..=137).contains(&t) {
                return Verdict::Pass(Reason::PassNd).pack();
            }
        }
    }
    let dst_words = words(&dst);
    // SAFETY: plain value, only tested for presence.
    if maybe_local(&dst_words) && unsafe { LOCAL_V6.get(&dst) }.is_some() {
        return Verdict::Pass(Reason::PassLocal).pack();
    }
    // Multicast (ff00::/8) and link-local (fe80::/10).
    if dst[0] == 0xff || (dst[0] == 0xfe && dst[1] & 0xc0 == 0x80) {
        return Verdict::Pass(Reason::PassMulticast).pack();
    }
    transport(
        ctx,
        segment,
        6,
        proto,
        h.hop_limit(),
        l3 + IPV6_HLEN,
        flow,
        words(&src),
        dst_words,
    )
}

/// Whether `dst` (as words) may be one of the host's addresses (the filter in front of the
/// hash).
#[inline(always)]
fn maybe_local(dst: &[u32; 4]) -> bool {
    let (word, mask) = xnet_common::local_filter_bit(dst);
    LOCAL_FILTER.get(word).is_some_and(|w| w & mask != 0)
}

/// What both families share once their headers are read: ports, control plane, TTL, and
/// the flow record.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn transport<P: Packet>(
    ctx: &P,
    segment: u32,
    family: u8,
    proto: u8,
    ttl: u8,
    l4: usize,
    flow: &mut [RuleKey; 2],
    src: [u32; 4],
    dst: [u32; 4],
) -> u64 {
    let (sport, dport) = ports(ctx, proto, l4);
    if let Some(r) = control_plane(proto, sport, dport) {
        return Verdict::Pass(r).pack();
    }
    if ttl <= 1 {
        return Verdict::Pass(Reason::PassTtl).pack();
    }
    flow[0] = RuleKey {
        tuple: 0,
        segment: segment as u16,
        family,
        proto,
        sport,
        dport,
        matched: 0,
        src,
        dst,
    };
    CONTINUE
}

/// `Send` to next hop `nh`, but a decrypted packet only when its source is routed back
/// into a tunnel of its segment: sent from here, it skips the kernel's inbound check of the
/// SA's traffic selectors, so one whose source no tunnel covers goes to the kernel to be
/// judged there.
#[inline(always)]
fn sent_from<const FROM_TUNNEL: bool>(
    ifc: &IfConfig,
    v6: bool,
    src: &[u32; 4],
    nh: u32,
    reason: Reason,
) -> Verdict {
    if FROM_TUNNEL {
        let root = if v6 { ifc.v6_root } else { ifc.v4_root };
        let back = route::lookup_flow(root, src, v6);
        let into_tunnel = back != LEAF_NONE
            && route::select(back, 0).is_some_and(|(_, h)| h.flags & NH_F_KERNEL != 0);
        if !into_tunnel {
            return Verdict::Pass(Reason::PassTunnelSource);
        }
    }
    Verdict::Send(nh, reason)
}

// ---- Benchmark programs: the same parsing, each with one route structure. ----

/// Destination address of an untagged IPv4/IPv6 packet.
#[inline(always)]
fn bench_dst(ctx: &XdpContext) -> Option<([u8; 16], bool)> {
    let l2 = ethernet(ctx)?;
    let mut dst = [0u8; 16];
    match l2.ethertype {
        ETH_P_IP => {
            let d = read::<[u8; 4], _>(ctx, l2.l3 + 16)?;
            dst[..4].copy_from_slice(&d);
            Some((dst, true))
        }
        ETH_P_IPV6 => Some((read::<[u8; 16], _>(ctx, l2.l3 + 24)?, false)),
        _ => None,
    }
}

/// Baseline: parse and bounce.
#[xdp]
pub fn xnet_bench_base(ctx: XdpContext) -> u32 {
    match bench_dst(&ctx) {
        Some(_) => XDP_TX,
        None => XDP_PASS,
    }
}

/// Parse and look up in xnet's own route structure.
#[xdp]
pub fn xnet_bench_dir(ctx: XdpContext) -> u32 {
    let Some((dst, v4)) = bench_dst(&ctx) else {
        return XDP_PASS;
    };
    let leaf = if v4 {
        let root = BENCH_ROOTS.get(0).copied().unwrap_or(0);
        route::lookup(root, &[dst[0], dst[1], dst[2], dst[3]])
    } else {
        let root = BENCH_ROOTS.get(1).copied().unwrap_or(0);
        route::lookup(root, &dst)
    };
    if leaf == LEAF_NONE {
        XDP_PASS
    } else {
        XDP_TX
    }
}

/// Parse and look up in the kernel's LPM trie.
#[xdp]
pub fn xnet_bench_trie(ctx: XdpContext) -> u32 {
    let Some((dst, v4)) = bench_dst(&ctx) else {
        return XDP_PASS;
    };
    let hit = if v4 {
        BENCH_TRIE_V4
            .get(&Key::new(32, [dst[0], dst[1], dst[2], dst[3]]))
            .is_some()
    } else {
        BENCH_TRIE_V6.get(&Key::new(128, dst)).is_some()
    };
    if hit {
        XDP_TX
    } else {
        XDP_PASS
    }
}

/// Addresses per packet in the batch benchmarks (bounded by the verifier's budget for the
/// IPv6 walk).
const BATCH: usize = xnet_common::limits::BENCH_BATCH;

/// Steady-state lookup cost: the payload after the Ethernet header holds `BATCH`
/// destination addresses of `N` bytes; each is looked up in xnet's table (`trie` false) or
/// the kernel's LPM trie. `XDP_TX` when all were found.
#[inline(always)]
fn bench_batch<const N: usize>(ctx: &XdpContext, trie: bool) -> u32 {
    let mut hits = 0usize;
    for i in 0..BATCH {
        let Some(d) = read::<[u8; N], _>(ctx, ETH_HLEN + i * N) else {
            return XDP_PASS;
        };
        let hit = match (trie, N) {
            (true, 4) => BENCH_TRIE_V4
                .get(&Key::new(32, [d[0], d[1], d[2], d[3]]))
                .is_some(),
            (true, _) => {
                let mut a = [0u8; 16];
                a.copy_from_slice(&d[..16]);
                BENCH_TRIE_V6.get(&Key::new(128, a)).is_some()
            }
            (false, _) => {
                route::lookup(BENCH_ROOTS.get((N / 16) as u32).copied().unwrap_or(0), &d)
                    != LEAF_NONE
            }
        };
        hits += hit as usize;
    }
    if hits == BATCH {
        XDP_TX
    } else {
        XDP_PASS
    }
}

#[xdp]
pub fn xnet_bench_dir_batch(ctx: XdpContext) -> u32 {
    match ethernet(&ctx) {
        Some(l2) if l2.ethertype == ETH_P_IP => bench_batch::<4>(&ctx, false),
        Some(_) => bench_batch::<16>(&ctx, false),
        None => XDP_PASS,
    }
}

#[xdp]
pub fn xnet_bench_trie_batch(ctx: XdpContext) -> u32 {
    match ethernet(&ctx) {
        Some(l2) if l2.ethertype == ETH_P_IP => bench_batch::<4>(&ctx, true),
        Some(_) => bench_batch::<16>(&ctx, true),
        None => XDP_PASS,
    }
}

// ---- Forwarding benchmark (`bench fwd`): generator, sink, bare redirect. ----

/// Packet generator, run by `BPF_PROG_RUN` in live-frames mode on a veth: writes the frame
/// of `BENCH_GEN` whole (the kernel recycles pages with whatever the forwarder left in
/// them: MACs, a lower TTL), sets the flow's source port and destination, and sends it out
/// of that veth (`XDP_TX`) into the forwarder under test.
#[xdp]
pub fn xnet_bench_gen(ctx: XdpContext) -> u32 {
    let Some(g) = BENCH_GEN.get(0) else {
        return XDP_DROP;
    };
    let Some(p) = ptr_at::<[u8; BENCH_FRAME], _>(&ctx, 0) else {
        return XDP_DROP;
    };
    let Some(n) = BENCH_COUNT.get_ptr_mut(1) else {
        return XDP_DROP;
    };
    // SAFETY: this CPU's counter; ptr_at checked the frame's bounds.
    let (i, f) = unsafe {
        *n += 1;
        (*n, &mut *p)
    };
    *f = g.frame;
    let sport = if g.flows == 0 {
        // SAFETY: a plain helper call.
        (unsafe { bpf_get_prandom_u32() }) as u16
    } else {
        1024 + (i % g.flows as u64) as u16
    };
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    if g.dsts > 0 {
        if let Some(d) = BENCH_DSTS.get((i % g.dsts as u64) as u32) {
            // The frame's header checksum is right for its own destination: update it
            // for each of the two words that change.
            let mut check = u16::from_be_bytes([f[24], f[25]]);
            for k in 0..2 {
                let old = u16::from_be_bytes([f[30 + 2 * k], f[31 + 2 * k]]);
                let new = u16::from_be_bytes([d[2 * k], d[2 * k + 1]]);
                check = xnet_common::csum::replace16(check, old, new);
            }
            f[30..34].copy_from_slice(d);
            f[24..26].copy_from_slice(&check.to_be_bytes());
        }
    }
    XDP_TX
}

/// The benchmark's sink: counts and drops.
#[xdp]
pub fn xnet_bench_sink(_ctx: XdpContext) -> u32 {
    if let Some(c) = BENCH_COUNT.get_ptr_mut(0) {
        // SAFETY: this CPU's counter.
        unsafe { *c += 1 };
    }
    XDP_DROP
}

/// Hands every frame to the kernel: on the kernel's return port from the XDP firewall,
/// whose `XDP_TX` frames a veth only takes in when its peer runs XDP.
#[xdp]
pub fn xnet_bench_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// A firewall that costs (almost) nothing: sends every frame back where it came from,
/// MACs swapped. Steering through it measures the steering, not the firewall.
#[xdp]
pub fn xnet_bench_bounce(ctx: XdpContext) -> u32 {
    let Some(eth) = ptr_at::<[u8; 12], _>(&ctx, 0) else {
        return XDP_PASS;
    };
    // SAFETY: bounds checked above.
    let eth = unsafe { &mut *eth };
    let mut dst = [0u8; 6];
    dst.copy_from_slice(&eth[..6]);
    eth.copy_within(6..12, 0);
    eth[6..].copy_from_slice(&dst);
    XDP_TX
}

/// The fastest forwarder there is, for comparison: rewrite the MACs, `bpf_redirect`.
#[xdp]
pub fn xnet_bench_redirect(ctx: XdpContext) -> u32 {
    let Some(nh) = BENCH_NH.get(0) else {
        return XDP_PASS;
    };
    if rewrite::ethernet(&ctx, ETH_HLEN, nh).is_none() {
        return XDP_PASS;
    }
    // SAFETY: a plain helper call.
    (unsafe { bpf_redirect(nh.ifindex, 0) }) as u32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
