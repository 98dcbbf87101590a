//! Packets XFRM decrypted go through the same pipeline as every other ingress.
//!
//! XDP never sees them: ESP is decrypted in the stack, and the inner packet re-enters it
//! on the xfrm interface (route-based) or on the interface the ESP came in on
//! (policy-based), where TC ingress runs. A TC program there picks them out by their
//! secpath (`bpf_skb_get_xfrm_state`), finds the connector from the SA's reqid and so the
//! segment, and runs `decide`: deny drops, steer and routes to a resolved neighbour leave
//! here by `bpf_redirect`, the rest goes on into the kernel as before (tunnel-to-tunnel
//! routes, unresolved neighbours). Packets without a secpath are the kernel's: XDP has
//! already judged them.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{
        __sk_buff, bpf_hdr_start_off::BPF_HDR_START_NET, bpf_xfrm_state, TC_ACT_OK,
        TC_ACT_REDIRECT, TC_ACT_SHOT,
    },
    helpers::{bpf_redirect, bpf_skb_get_xfrm_state, bpf_skb_load_bytes_relative},
    programs::TcContext,
    EbpfContext,
};
use xnet_common::{IfConfig, Reason};

use crate::maps::{INTERFACES, NEXTHOPS, TUNNELS};
use crate::parse::{read, ETH_HLEN, ETH_P_IP, ETH_P_IPV6};
use crate::{decide, rewrite, stats, Verdict};

/// Bytes of the inner packet made directly readable before parsing: IPv6 header and ports
/// with room to spare.
const PULL: u32 = 128;

pub fn run(ctx: &TcContext) -> i32 {
    let skb = ctx.as_ptr() as *mut __sk_buff;
    let Some(ifc) = tunnel_of(skb) else {
        return TC_ACT_OK as i32;
    };
    // SAFETY: the context is the kernel's __sk_buff for this run.
    let (ifindex, len) = unsafe { ((*skb).ifindex, (*skb).len as u64) };
    let (act, reason) = verdict(ctx, skb, ifc);
    // Counted on the interface it came in on when that is one of ours (the underlay).
    let slot = INTERFACES.get(ifindex).map(|c| c.slot).unwrap_or(0);
    stats::count(slot, reason, len);
    act
}

/// The segment settings of the connector whose SA decrypted this packet, if any.
#[inline(always)]
fn tunnel_of(skb: *mut __sk_buff) -> Option<&'static IfConfig> {
    let mut st = bpf_xfrm_state {
        reqid: 0,
        spi: 0,
        family: 0,
        ext: 0,
        __bindgen_anon_1: aya_ebpf::bindings::bpf_xfrm_state__bindgen_ty_1 { remote_ipv4: 0 },
    };
    // SAFETY: st is a writable bpf_xfrm_state of the size passed.
    let r = unsafe {
        bpf_skb_get_xfrm_state(
            skb,
            0,
            &mut st as *mut _ as *mut bpf_xfrm_state,
            size_of::<bpf_xfrm_state>() as u32,
            0,
        )
    };
    if r != 0 {
        return None;
    }
    let i = xnet_common::ipsec::connector_of(st.reqid)?;
    TUNNELS.get(i).filter(|c| c.segment != 0)
}

/// (TC action, the XDP action it counts as, reason).
#[inline(always)]
fn verdict(ctx: &TcContext, skb: *mut __sk_buff, ifc: &IfConfig) -> (i32, Reason) {
    let pass = |r| (TC_ACT_OK as i32, r);
    let drop = |r| (TC_ACT_SHOT as i32, r);
    let len = ctx.len();
    // A failure leaves the head as it is: reads past it fail below and the packet goes
    // to the kernel.
    let _ = ctx.pull_data(if len < PULL { len } else { PULL });
    let Some((l3, ethertype)) = network_header(ctx, skb) else {
        return pass(Reason::PassNotIp);
    };
    match decide::<_, true>(ctx, ifc, ethertype, l3) {
        Verdict::Pass(r) => pass(r),
        Verdict::Drop(r) => drop(r),
        Verdict::Send(id, r) => {
            let Some(nh) = NEXTHOPS.get(id) else {
                return pass(Reason::PassNoNeighbour);
            };
            let nh = *nh;
            if rewrite::ttl(ctx, l3, ethertype == ETH_P_IP).is_none()
                || rewrite::tc_ethernet(ctx, l3, &nh, ethertype).is_none()
            {
                return drop(Reason::DropMalformed);
            }
            // SAFETY: a plain helper call; it only records the target for the kernel.
            if unsafe { bpf_redirect(nh.ifindex, 0) } != TC_ACT_REDIRECT as i64 {
                return pass(Reason::PassNoNeighbour);
            }
            (TC_ACT_REDIRECT as i32, r)
        }
    }
}

/// Where the IP header starts in the packet data (0 on an xfrm interface; 14 where the
/// kernel rebuilt the old MAC header in front of the inner packet) and its ethertype. The
/// network header's first 20 bytes, read relative to it, are compared with both places.
#[inline(always)]
fn network_header(ctx: &TcContext, skb: *mut __sk_buff) -> Option<(usize, u16)> {
    let mut net = [0u32; 5];
    // SAFETY: net is 20 writable bytes.
    let r = unsafe {
        bpf_skb_load_bytes_relative(
            skb as *const c_void,
            0,
            net.as_mut_ptr() as *mut c_void,
            20,
            BPF_HDR_START_NET,
        )
    };
    if r != 0 {
        return None;
    }
    let l3 = if same(ctx, 0, &net) {
        0
    } else if same(ctx, ETH_HLEN, &net) {
        ETH_HLEN
    } else {
        return None;
    };
    let version = net[0].to_ne_bytes()[0] >> 4;
    match version {
        4 => Some((l3, ETH_P_IP)),
        6 => Some((l3, ETH_P_IPV6)),
        _ => None,
    }
}

/// Whether the 20 bytes at `off` are `net` (word by word: BPF has no memcmp).
#[inline(always)]
fn same(ctx: &TcContext, off: usize, net: &[u32; 5]) -> bool {
    let Some(w) = read::<[u32; 5], TcContext>(ctx, off) else {
        return false;
    };
    let mut diff = 0;
    for i in 0..5 {
        diff |= w[i] ^ net[i];
    }
    diff == 0
}
