//! Per-CPU packet and byte counters: one per interface slot and reason (`COUNTS`), one
//! update per packet.

use xnet_common::Reason;

use crate::maps::COUNTS;

#[inline(always)]
pub fn count(slot: u32, reason: Reason, bytes: u64) {
    crate::policy::count(COUNTS.get_ptr_mut(slot * Reason::COUNT + reason as u32), bytes);
}

/// The frame's length on the wire as XDP sees it (from the Ethernet header on).
#[inline(always)]
pub fn frame_len(ctx: &aya_ebpf::programs::XdpContext) -> u64 {
    (ctx.data_end() - ctx.data()) as u64
}
