//! Per-CPU packet counters: one per interface slot and reason (`COUNTS`), one increment per
//! packet.

use xnet_common::Reason;

use crate::maps::COUNTS;

#[inline(always)]
pub fn count(slot: u32, reason: Reason) {
    if let Some(c) = COUNTS.get_ptr_mut(slot * Reason::COUNT + reason as u32) {
        // SAFETY: per-CPU slot; XDP and TC run with preemption off, so no concurrent writer.
        unsafe { *c += 1 };
    }
}
