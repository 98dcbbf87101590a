//! Per-CPU counters: per interface (rx, forwarded, passed, dropped) and per reason.

use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
use xnet_common::Reason;

use crate::maps::{IF_STATS, REASONS};

#[inline(always)]
pub fn count(slot: u32, action: u32, reason: Reason) {
    if let Some(c) = REASONS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot; XDP runs with preemption off, so no concurrent writer.
        unsafe { *c += 1 };
    }
    if slot == 0 {
        return;
    }
    if let Some(s) = IF_STATS.get_ptr_mut(slot) {
        // SAFETY: as above.
        unsafe {
            (*s).rx += 1;
            match action {
                XDP_PASS => (*s).passed += 1,
                XDP_DROP => (*s).dropped += 1,
                _ => (*s).forwarded += 1,
            }
        }
    }
}
