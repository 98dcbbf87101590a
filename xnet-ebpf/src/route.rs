//! Route lookup and next-hop choice: the one module that knows how routes are stored, so
//! the table structure can change without touching the rest.

use xnet_common::{route::GROUP_SIZE, NextHop, LEAF_NONE, MAX_ECMP};

use crate::maps::{NEXTHOPS, NH_GROUPS, ROUTE_NODES};

/// Longest-prefix match of `addr` in the table rooted at `root`: the next-hop group id, or
/// `LEAF_NONE`. A subprogram: the unrolled walk's map keys stay in its own stack frame.
#[inline(never)]
pub fn lookup<const N: usize>(root: u32, addr: &[u8; N]) -> u32 {
    xnet_common::route::lookup(root, addr, |i| match ROUTE_NODES.get(i / GROUP_SIZE) {
        Some(group) => group[(i % GROUP_SIZE) as usize],
        None => LEAF_NONE,
    })
}

/// Longest-prefix match of an address held as the flow record's words (IPv4 in the
/// first): the bytes are those words' memory, in packet order.
#[inline(always)]
pub fn lookup_flow(root: u32, words: &[u32; 4], v6: bool) -> u32 {
    if v6 {
        // SAFETY: [u32; 4] and [u8; 16] have the same size; u8 has no alignment needs.
        lookup(root, unsafe { &*(words.as_ptr() as *const [u8; 16]) })
    } else {
        // SAFETY: as above, for the first word.
        lookup(root, unsafe { &*(words.as_ptr() as *const [u8; 4]) })
    }
}

/// The next hop (its id and value) of group `nhg` that a flow with `hash` takes (ECMP),
/// if the group has one.
#[inline(always)]
pub fn select(nhg: u32, hash: u32) -> Option<(u32, &'static NextHop)> {
    let group = NH_GROUPS.get(nhg)?;
    let count = group.count;
    if count == 0 || count as usize > MAX_ECMP {
        return None;
    }
    // Multiply-shift maps the hash onto 0..count without a division.
    let slot = ((hash as u64 * count as u64) >> 32) as usize;
    // LLVM knows slot < count ≤ MAX_ECMP and would drop a plain mask; the verifier does not
    // know it. The volatile read hides the range from LLVM so the mask stays.
    // SAFETY: reading a local.
    let slot = unsafe { core::ptr::read_volatile(&slot) } & (MAX_ECMP - 1);
    let member = group.members[slot];
    Some((member, NEXTHOPS.get(member)?))
}

/// A 5-tuple hash for ECMP: the same flow always takes the same next hop.
#[inline(always)]
pub fn flow_hash(src: u32, dst: u32, proto: u8, sport: u16, dport: u16) -> u32 {
    let mut h = src.wrapping_mul(0x9e37_79b1)
        ^ dst.rotate_left(13).wrapping_mul(0x85eb_ca6b)
        ^ (((sport as u32) << 16) | dport as u32).wrapping_mul(0xc2b2_ae35)
        ^ proto as u32;
    // murmur3 finaliser: spreads every input bit over the result.
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// An order-independent hash: a flow and its reverse get the same value, so both
/// directions are steered to the same firewall instance.
#[inline(always)]
pub fn symmetric_hash(src: u32, dst: u32, proto: u8, sport: u16, dport: u16) -> u32 {
    flow_hash(src ^ dst, 0, proto, sport ^ dport, 0)
}

/// Folds an address held as words (unused words zero) into 32 bits for [`flow_hash`].
#[inline(always)]
pub fn fold_words(w: &[u32; 4]) -> u32 {
    w[0] ^ w[1] ^ w[2] ^ w[3]
}
