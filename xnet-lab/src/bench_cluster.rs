//! The cluster benchmarks: how many flows a pool change moves with the Maglev table,
//! beside the plain multiply-shift over the healthy instances (what steering did before,
//! the baseline) and the ideal 1/N; and how long a pushed config takes to be in force on
//! both nodes of the cluster lab (real etcd, two agents).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::cluster::{ClusterLab, DOCUMENT};

/// Flow hashes: a fixed pseudo-random sequence.
fn hashes(n: usize) -> impl Iterator<Item = u32> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 32) as u32
    })
}

/// Multiply-shift onto the pool, as steering picked an instance before Maglev.
fn modulo(hash: u32, n: usize) -> usize {
    ((hash as u64 * n as u64) >> 32) as usize
}

/// One line per pool size: the fraction of flows that move when the middle instance of
/// `n` fails.
pub fn pool_change() {
    const FLOWS: usize = 1_000_000;
    for n in [2usize, 3, 4, 8] {
        let names: Vec<String> = (1..=n).map(|i| format!("fw{i}")).collect();
        let gone = n / 2;
        let before: Vec<&str> = names.iter().map(String::as_str).collect();
        let after: Vec<&str> = before
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != gone)
            .map(|(_, s)| *s)
            .collect();
        let (tb, ta) = (
            xnet_user::maglev::table(&before),
            xnet_user::maglev::table(&after),
        );
        let (mut moved, mut needless, mut moved_modulo) = (0, 0, 0);
        for h in hashes(FLOWS) {
            let s = xnet_user::maglev::slot(h);
            let (was, is) = (before[tb[s] as usize], after[ta[s] as usize]);
            if was != is {
                moved += 1;
                if was != before[gone] {
                    needless += 1;
                }
            }
            if before[modulo(h, n)] != after[modulo(h, n - 1)] {
                moved_modulo += 1;
            }
        }
        let f = |x: usize| x as f64 / FLOWS as f64;
        println!(
            "bench steering_pool_change instances={n} one_failed flows_moved={:.3} ideal={:.3} needless={:.3} baseline_multiply_shift_moved={:.3}",
            f(moved),
            1.0 / n as f64,
            f(needless),
            f(moved_modulo)
        );
    }
}

/// Pushes alternate documents `pushes` times; from the start of `xnet config push` until
/// both nodes report the new revision in force.
pub fn config_propagation(pushes: usize) -> Result<()> {
    let lab = ClusterLab::create("xb-cluster")?;
    let (ok, out) = lab.push(&lab.document_file(DOCUMENT, "cluster.toml"));
    if !ok {
        bail!("push: {out}");
    }
    let nodes = [lab.start_node("a"), lab.start_node("b")];
    let files = [
        lab.document_file(&crate::cluster::document_with_deny(), "deny.toml"),
        lab.document_file(DOCUMENT, "cluster.toml"),
    ];
    let mut ms = Vec::new();
    for i in 0..pushes {
        let t = Instant::now();
        let (ok, out) = lab.push(&files[i % 2]);
        if !ok {
            bail!("push: {out}");
        }
        let rev: i64 = out
            .split("as revision ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        for n in &nodes {
            while n
                .try_status()
                .and_then(|s| s.cluster)
                .is_none_or(|c| c.applied_revision < rev)
            {
                if t.elapsed() > Duration::from_secs(10) {
                    bail!("revision {rev} not in force after 10 s: {}", n.log());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    println!(
        "bench cluster_config_propagation nodes=2 etcd_members=3 pushes={pushes} median_ms={:.0} max_ms={:.0} (from xnet config push until both nodes apply it)",
        ms[ms.len() / 2],
        ms[ms.len() - 1]
    );
    Ok(())
}
