//! Policy classification (tuple-space search, layout in `xnet_common::policy`) and the
//! steering of matched flows to firewall instances.

use xnet_common::policy::{
    Counter, RuleKey, RuleValue, MAX_INSTANCES, MAX_TUPLES, META_GENERATION, META_TUPLES_GEN0,
};

use crate::maps::{
    NEXTHOPS, NH_STATS, POLICY_META, POLICY_SCRATCH, RULES, RULE_STATS, SERVICES, TUPLES,
};

/// The packet's fields as `classify` takes them, in this CPU's scratch slot (off the
/// 512-byte BPF stack).
#[inline(always)]
pub fn flow() -> Option<&'static mut [RuleKey; 2]> {
    let scratch = POLICY_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot; XDP and TC do not nest on a CPU.
    Some(unsafe { &mut *scratch })
}

/// The best (lowest-priority-number) rule matching the packet in the active rule set.
/// `scratch[0]`: the packet's fields (addresses as [`words`], ports zero for protocols
/// without them); `scratch[1]` is overwritten.
// A function of its own (a BPF subprogram): its stack frame is not added to every caller's.
#[inline(never)]
pub fn classify(scratch: &mut [RuleKey; 2]) -> Option<RuleValue> {
    let [f, key] = scratch;
    *key = *f;
    let generation = POLICY_META.get(META_GENERATION).copied().unwrap_or(0) & 1;
    let tuples = POLICY_META
        .get(META_TUPLES_GEN0 + generation)
        .copied()
        .unwrap_or(0);
    let mut best: Option<RuleValue> = None;
    for i in 0..MAX_TUPLES {
        if i >= tuples {
            break;
        }
        let idx = generation * MAX_TUPLES + i;
        let Some(t) = TUPLES.get(idx) else { break };
        // Tuples are sorted by their best priority: nothing further can win.
        if let Some(b) = &best {
            if b.priority <= t.best_priority {
                break;
            }
        }
        key.tuple = idx as u16;
        key.proto = f.proto & t.proto_mask;
        key.sport = f.sport & t.sport_mask;
        key.dport = f.dport & t.dport_mask;
        for w in 0..4 {
            key.src[w] = f.src[w] & t.src_mask[w];
            key.dst[w] = f.dst[w] & t.dst_mask[w];
        }
        // SAFETY: plain Copy value.
        if let Some(v) = unsafe { RULES.get(key) } {
            if best.is_none_or(|b| v.priority < b.priority) {
                best = Some(*v);
            }
        }
    }
    best
}

#[inline(always)]
pub fn count(map_slot: Option<*mut Counter>, bytes: u64) {
    if let Some(c) = map_slot {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count_rule(rule: u32, bytes: u64) {
    count(RULE_STATS.get_ptr_mut(rule), bytes);
}

/// What `steer` decided.
pub enum Steer {
    /// Send to this firewall instance (its next-hop id).
    To(u32),
    /// No healthy instance, fail-open: route as if no policy matched.
    Bypass,
    /// No healthy (or resolved) instance, fail-closed.
    Drop,
}

/// The instance of `service` for a flow with symmetric hash `hash` (both directions of a
/// flow pick the same one).
#[inline(always)]
pub fn steer(service: u32, hash: u32, bytes: u64) -> Steer {
    let Some(s) = SERVICES.get(service) else {
        return Steer::Drop;
    };
    let n = s.count;
    if n == 0 || n as usize > MAX_INSTANCES {
        return if s.fail_closed != 0 {
            Steer::Drop
        } else {
            Steer::Bypass
        };
    }
    let slot = ((hash as u64 * n as u64) >> 32) as usize;
    // SAFETY: reading a local; hides the range from LLVM so the verifier sees the mask.
    let slot = unsafe { core::ptr::read_volatile(&slot) } & (MAX_INSTANCES - 1);
    let member = s.members[slot];
    match NEXTHOPS.get(member) {
        Some(nh) if nh.flags & xnet_common::NH_F_VALID != 0 => {
            count(NH_STATS.get_ptr_mut(member), bytes);
            Steer::To(member)
        }
        _ if s.fail_closed != 0 => Steer::Drop,
        _ => Steer::Bypass,
    }
}
