//! Header rewrites for a forwarded packet: TTL/hop limit, MACs, VLAN tag removal, and the
//! Ethernet header a packet from a layer-3 (tunnel) device needs before it leaves.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::TcContext, programs::XdpContext};
use xnet_common::{csum, NextHop};

use crate::parse::{
    ptr_at, Ipv4, Ipv6, Packet, ETH_DST, ETH_HLEN, ETH_SRC, ETH_TYPE, VLAN_HLEN,
};

/// Decrements the IPv4 TTL at `l3` and updates the header checksum incrementally.
#[inline(always)]
pub fn ipv4_ttl<P: Packet>(ctx: &P, l3: usize) -> Option<()> {
    let h = ptr_at::<[u8; 12], P>(ctx, l3)?;
    // SAFETY: ptr_at checked that 12 bytes at l3 are inside the packet.
    // The checksum covers the TTL as the high byte of a 16-bit word with the protocol.
    const TTL: usize = Ipv4::TTL;
    const CHECK: usize = Ipv4::CHECKSUM;
    unsafe {
        let old = u16::from_be_bytes([(*h)[TTL], (*h)[TTL + 1]]);
        (*h)[TTL] -= 1;
        let new = u16::from_be_bytes([(*h)[TTL], (*h)[TTL + 1]]);
        let check = csum::replace16(u16::from_be_bytes([(*h)[CHECK], (*h)[CHECK + 1]]), old, new);
        let c = check.to_be_bytes();
        (*h)[CHECK] = c[0];
        (*h)[CHECK + 1] = c[1];
    }
    Some(())
}

/// Decrements the IPv6 hop limit at `l3` (IPv6 has no header checksum).
#[inline(always)]
pub fn ipv6_hop_limit<P: Packet>(ctx: &P, l3: usize) -> Option<()> {
    let h = ptr_at::<[u8; 8], P>(ctx, l3)?;
    // SAFETY: bounds checked above.
    unsafe { (*h)[Ipv6::HOP_LIMIT] -= 1 };
    Some(())
}

/// TTL or hop limit, by family.
#[inline(always)]
pub fn ttl<P: Packet>(ctx: &P, l3: usize, v4: bool) -> Option<()> {
    if v4 {
        ipv4_ttl(ctx, l3)
    } else {
        ipv6_hop_limit(ctx, l3)
    }
}

/// Writes the next hop's MACs; with a VLAN tag (`l3` past the plain Ethernet header), drops
/// the tag first: next hops are untagged ports in v1.
#[inline(always)]
pub fn ethernet(ctx: &XdpContext, l3: usize, nh: &NextHop) -> Option<()> {
    if l3 != ETH_HLEN {
        // SAFETY: moving the start of the packet forward by the tag's length; the MACs are
        // written below at the new start.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, VLAN_HLEN as i32) } != 0 {
            return None;
        }
    }
    let eth = ptr_at::<[u8; 12], XdpContext>(ctx, 0)?;
    // SAFETY: bounds checked above.
    let eth = unsafe { &mut *eth };
    eth[ETH_DST..ETH_SRC].copy_from_slice(&nh.dmac);
    eth[ETH_SRC..].copy_from_slice(&nh.smac);
    Some(())
}

/// A whole Ethernet header for `nh` on a socket buffer whose IP header is at `l3`: 0 on a
/// layer-3 device (room is made first), 14 where the kernel kept the header it had before
/// decapsulation (its type may still say the outer family, so it is written too).
#[inline(always)]
pub fn tc_ethernet(ctx: &TcContext, l3: usize, nh: &NextHop, ethertype: u16) -> Option<()> {
    if l3 == 0 && ctx.change_head(ETH_HLEN as u32, 0).is_err() {
        return None;
    }
    let eth = ptr_at::<[u8; ETH_HLEN], TcContext>(ctx, 0)?;
    // SAFETY: bounds checked above.
    let eth = unsafe { &mut *eth };
    eth[ETH_DST..ETH_SRC].copy_from_slice(&nh.dmac);
    eth[ETH_SRC..ETH_TYPE].copy_from_slice(&nh.smac);
    eth[ETH_TYPE..].copy_from_slice(&ethertype.to_be_bytes());
    Some(())
}
