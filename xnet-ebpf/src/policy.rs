//! Policy classification (a class cache in front of a tuple-space search, layout in
//! `xnet_common::policy`) and the steering of matched flows to firewall instances.

use xnet_common::policy::{
    ClassKey, Counter, RuleKey, RuleValue, MAGLEV_SLOTS, MAGLEV_TABLE, MAX_INSTANCES, MAX_TUPLES,
    META_CLASS_ROOTS, META_EPOCH, META_TUPLES_GEN0, NO_RULE, PORTS,
};

use crate::maps::{
    FLOW_CLASSES, NEXTHOPS, NH_STATS, POLICY_META, POLICY_SCRATCH, PORT_CLASSES, RULES, RULE_STATS,
    SERVICES, TUPLES,
};
use crate::route;
use aya_ebpf::helpers::bpf_loop;
use core::ffi::c_void;

/// The packet's fields as `classify` takes them, in this CPU's scratch slot (off the
/// 512-byte BPF stack).
#[inline(always)]
pub fn flow() -> Option<&'static mut [RuleKey; 2]> {
    let scratch = POLICY_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot; XDP and TC do not nest on a CPU.
    Some(unsafe { &mut *scratch })
}

/// Whether any rule is in force (no policy: no classification at all).
#[inline(always)]
pub fn active() -> bool {
    let generation = POLICY_META.get(META_EPOCH).copied().unwrap_or(0) & 1;
    POLICY_META
        .get(META_TUPLES_GEN0 + generation)
        .is_some_and(|t| *t != 0)
}

/// The best (lowest-priority-number) rule matching the packet in the active rule set.
/// `scratch[0]`: the packet's fields (addresses as [`words`], ports zero for protocols
/// without them); `scratch[1]` is overwritten. The decision for the packet's classes comes
/// from the cache, or from the search, which fills the cache.
// A function of its own (a BPF subprogram): its stack frame is not added to every caller's.
#[inline(never)]
pub fn classify(scratch: &mut [RuleKey; 2]) -> Option<RuleValue> {
    let epoch = POLICY_META.get(META_EPOCH).copied().unwrap_or(0);
    let generation = epoch & 1;
    let f = &scratch[0];
    let v6 = f.family == 6;
    let roots = META_CLASS_ROOTS + if v6 { 2 } else { 0 };
    let src_root = POLICY_META.get(roots).copied().unwrap_or(0);
    let dst_root = POLICY_META.get(roots + 1).copied().unwrap_or(0);
    let port = |p: u16| {
        PORT_CLASSES
            .get(generation * PORTS + p as u32)
            .copied()
            .unwrap_or(0)
    };
    let key = ClassKey {
        epoch,
        segment: f.segment,
        family: f.family,
        proto: f.proto,
        src: class_of(src_root, &f.src, v6),
        dst: class_of(dst_root, &f.dst, v6),
        sport: port(f.sport) as u16,
        dport: (port(f.dport) >> 16) as u16,
    };
    // SAFETY: plain Copy value.
    if let Some(v) = unsafe { FLOW_CLASSES.get(&key) } {
        return if v.rule == NO_RULE { None } else { Some(*v) };
    }
    let best = search(scratch, generation);
    let cached = best.unwrap_or(RuleValue {
        rule: NO_RULE,
        ..Default::default()
    });
    // A full cache evicts its least recently used entries; a failed insert only costs the
    // next packet a search.
    let _ = FLOW_CLASSES.insert(&key, &cached, 0);
    best
}

/// The class of an address (words as in `RuleKey`): the id of the longest rule prefix
/// containing it in the class table at `root`, 0 for none.
#[inline(always)]
fn class_of(root: u32, a: &[u32; 4], v6: bool) -> u32 {
    // Roots are stored plus one: 0 means no class tables (no prefix in any rule yet).
    if root == 0 {
        return 0;
    }
    route::lookup_flow(root - 1, a, v6)
}

/// Tuple-space search of generation `generation` (the packet's fields in `scratch[0]`).
/// A `bpf_loop` over the tuples: the verifier checks one step, not every tuple.
#[inline(always)]
fn search(scratch: &mut [RuleKey; 2], generation: u32) -> Option<RuleValue> {
    scratch[1] = scratch[0];
    let tuples = POLICY_META
        .get(META_TUPLES_GEN0 + generation)
        .copied()
        .unwrap_or(0);
    let mut s = Search {
        generation,
        best: RuleValue {
            rule: NO_RULE,
            ..Default::default()
        },
    };
    // SAFETY: the callback gets `s` back as its context, for this call only.
    unsafe {
        bpf_loop(
            tuples.min(MAX_TUPLES),
            search_step as *mut c_void,
            &mut s as *mut Search as *mut c_void,
            0,
        )
    };
    if s.best.rule == NO_RULE {
        None
    } else {
        Some(s.best)
    }
}

struct Search {
    generation: u32,
    /// `rule` is `NO_RULE` until one matches.
    best: RuleValue,
}

/// One tuple: mask the packet's fields with it and look the result up. 1 stops the loop.
extern "C" fn search_step(i: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `search` passes its `Search` as the context.
    let s = unsafe { &mut *(ctx as *mut Search) };
    let Some(scratch) = flow() else { return 1 };
    let idx = s.generation * MAX_TUPLES + (i & (MAX_TUPLES - 1));
    let Some(t) = TUPLES.get(idx) else { return 1 };
    // Tuples are sorted by their best priority: nothing further can win.
    if s.best.rule != NO_RULE && s.best.priority <= t.best_priority {
        return 1;
    }
    let [f, key] = scratch;
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
        if s.best.rule == NO_RULE || v.priority < s.best.priority {
            s.best = *v;
        }
    }
    0
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
    // Maglev: the hash picks a slot, the slot an instance; the agent fills the table so
    // a pool change moves only the flows that must move, the same on every node.
    let slot = ((hash as u64 * MAGLEV_SLOTS as u64) >> 32) as usize;
    // SAFETY: reading locals; hides the ranges from LLVM so the verifier sees the masks.
    let slot = unsafe { core::ptr::read_volatile(&slot) } & (MAGLEV_TABLE - 1);
    let index = s.table[slot] as usize;
    let index = unsafe { core::ptr::read_volatile(&index) } & (MAX_INSTANCES - 1);
    let member = s.members[index];
    match NEXTHOPS.get(member) {
        Some(nh) if nh.flags & xnet_common::NH_F_VALID != 0 => {
            count(NH_STATS.get_ptr_mut(member), bytes);
            Steer::To(member)
        }
        _ if s.fail_closed != 0 => Steer::Drop,
        _ => Steer::Bypass,
    }
}
