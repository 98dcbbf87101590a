//! Maglev consistent hashing (Eisenbud et al., "Maglev", NSDI 2016, §3.4): the lookup
//! table that spreads steered flows over a firewall service's pool. It depends only on
//! the pool's instance names, so every node of a cluster builds the same table and both
//! directions of a flow meet the same instance whichever nodes they cross; and when an
//! instance leaves, only about its share of the flows moves.

use xnet_common::policy::MAGLEV_SLOTS;

const M: u64 = MAGLEV_SLOTS as u64;

/// FNV-1a (64 bits) of `seed` then `name`: stable across builds and hosts, which the
/// standard library's hasher does not promise.
fn fnv1a(seed: u8, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in std::iter::once(seed).chain(name.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The lookup table for `pool` (instance names): slot → index into `pool`. Empty for an
/// empty pool. The names' order in `pool` does not change which name a slot gets.
pub fn table(pool: &[&str]) -> Vec<u8> {
    assert!(pool.len() <= u8::MAX as usize);
    if pool.is_empty() {
        return Vec::new();
    }
    // Ties go to the instance filled first: fill in name order, not the caller's order.
    let mut order: Vec<usize> = (0..pool.len()).collect();
    order.sort_by_key(|&i| pool[i]);
    let perm: Vec<(u64, u64)> = pool
        .iter()
        .map(|n| (fnv1a(0, n) % M, fnv1a(1, n) % (M - 1) + 1))
        .collect();
    let mut next = vec![0u64; pool.len()];
    let mut entry = vec![u8::MAX; M as usize];
    let mut filled = 0;
    loop {
        for &i in &order {
            let (offset, skip) = perm[i];
            // Instance i's next preferred slot that is still free.
            let mut c = (offset + next[i] * skip) % M;
            while entry[c as usize] != u8::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % M;
            }
            entry[c as usize] = i as u8;
            next[i] += 1;
            filled += 1;
            if filled == M {
                return entry;
            }
        }
    }
}

/// The slot a flow with (symmetric) hash `hash` uses: what XDP computes.
pub fn slot(hash: u32) -> usize {
    ((hash as u64 * M) >> 32) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flow hashes spread evenly (a fixed sequence: the test is repeatable).
    fn hashes() -> impl Iterator<Item = u32> {
        (0u32..100_000).map(|i| i.wrapping_mul(0x9e37_79b9))
    }

    fn names(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("fw{i}")).collect()
    }

    #[test]
    fn every_instance_gets_a_near_equal_share_of_the_slots() {
        for n in 1..=8 {
            let names = names(n);
            let pool: Vec<&str> = names.iter().map(String::as_str).collect();
            let t = table(&pool);
            assert_eq!(t.len(), M as usize);
            for i in 0..n {
                let share = t.iter().filter(|&&x| x as usize == i).count();
                // Maglev's bound: at most one slot more than any other instance.
                assert!(
                    share.abs_diff(M as usize / n) <= 1,
                    "n={n}: instance {i} has {share} slots"
                );
            }
        }
    }

    #[test]
    fn the_callers_order_does_not_change_the_table() {
        let a = table(&["fw1", "fw2", "fw3"]);
        let b = table(&["fw3", "fw1", "fw2"]);
        let name_a = |s: usize| ["fw1", "fw2", "fw3"][a[s] as usize];
        let name_b = |s: usize| ["fw3", "fw1", "fw2"][b[s] as usize];
        assert!((0..M as usize).all(|s| name_a(s) == name_b(s)));
    }

    /// The fraction of flows whose instance changes when `gone` leaves a pool of `n`.
    fn moved(n: usize, gone: usize) -> (f64, f64) {
        let names = names(n);
        let before_pool: Vec<&str> = names.iter().map(String::as_str).collect();
        let after_pool: Vec<&str> = before_pool
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != gone)
            .map(|(_, n)| *n)
            .collect();
        let (before, after) = (table(&before_pool), table(&after_pool));
        let (mut moved, mut needless, mut total) = (0, 0, 0);
        for h in hashes() {
            let s = slot(h);
            let was = before_pool[before[s] as usize];
            let is = after_pool[after[s] as usize];
            total += 1;
            if was != is {
                moved += 1;
                if was != before_pool[gone] {
                    needless += 1;
                }
            }
        }
        (moved as f64 / total as f64, needless as f64 / total as f64)
    }

    #[test]
    fn one_of_n_instances_failing_moves_about_one_nth_of_the_flows() {
        for n in 2..=8 {
            for gone in 0..n {
                let (moved, needless) = moved(n, gone);
                let ideal = 1.0 / n as f64;
                assert!(
                    (moved - ideal).abs() < 0.03 && needless < 0.03,
                    "n={n}, instance {gone} gone: {moved:.3} of flows moved ({needless:.3} needlessly), ideal {ideal:.3}"
                );
            }
        }
    }
}
