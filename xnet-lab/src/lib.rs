//! The xnet lab: what the tests, the VM scenarios, the demo and the benchmarks share, kept
//! out of the product (`xnet-user`). Network-namespace topologies around a CXP (`lab`),
//! strongSwan's charon as a peer (`charon`), the demo, the benchmarks, and the helpers of
//! the integration tests (`testkit`). Not published.

pub mod bench;
pub mod bench_bgp;
pub mod bench_cluster;
pub mod bench_failover;
pub mod bench_fwd;
pub mod bench_ike;
pub mod charon;
pub mod cluster;
pub mod demo;
pub mod lab;
pub mod testkit;

use std::path::PathBuf;

/// The agent binary, `xnet`, from the same build as the running program: beside it (the
/// `xnet-lab` binary), or one directory up (a test binary in `deps/`).
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().expect("an executable has a directory");
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        let p = d.join("xnet");
        if p.is_file() {
            return Ok(p);
        }
    }
    anyhow::bail!(
        "no xnet binary beside {} (build it: cargo xtask build)",
        exe.display()
    )
}
