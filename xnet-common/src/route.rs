//! The route table layout: a multibit trie with strides 16-8-8-… stored in one flat array
//! of `u32` entries (`ROUTE_NODES`), in the spirit of DPDK's DIR-24-8 but with a 16-bit first
//! level so that every segment can have its own table.
//!
//! The array is cut into groups of 256 entries. A table's root is 256 consecutive groups
//! (65,536 entries) indexed by the first 16 address bits; each further level is one group
//! indexed by the next 8 bits. An IPv4 lookup reads at most 3 entries, an IPv6 lookup of a
//! /48 at most 5. Each entry is one `u32`, written with a single store by the agent, so a
//! packet in flight sees either the old or the new entry, never a torn one.
//!
//! An entry is either a leaf (`NODE_PTR` clear): the next-hop group id, 0 meaning no route;
//! or a pointer (`NODE_PTR` set): the index of the child group.

/// Set on entries that point to a child group.
pub const NODE_PTR: u32 = 1 << 31;
/// Entries per group (one level of 8 bits).
pub const GROUP_SIZE: u32 = 256;
/// Groups making up a root table (first level of 16 bits).
pub const ROOT_GROUPS: u32 = 256;
/// No route.
pub const LEAF_NONE: u32 = 0;

/// Longest-prefix match of `addr` in the table rooted at group `root`, reading entries
/// through `read` (a map lookup in XDP, a slice in the agent's tests). Returns the leaf:
/// the next-hop group id, or [`LEAF_NONE`].
#[inline(always)]
pub fn lookup<const N: usize>(root: u32, addr: &[u8; N], read: impl Fn(u32) -> u32) -> u32 {
    let top = ((addr[0] as u32) << 8) | addr[1] as u32;
    let mut entry = read(root * GROUP_SIZE + top);
    let mut i = 2;
    while i < N {
        if entry & NODE_PTR == 0 {
            return entry;
        }
        entry = read((entry & !NODE_PTR) * GROUP_SIZE + addr[i] as u32);
        i += 1;
    }
    if entry & NODE_PTR != 0 {
        // A pointer below the last byte cannot be built by the agent; treat as no route.
        return LEAF_NONE;
    }
    entry
}
