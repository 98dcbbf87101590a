//! `xnet-lab`: the demo lab and the benchmarks (what `cargo xtask run` and `cargo xtask
//! bench` start). Needs root; runs the `xnet` agent built beside it.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "The xnet demo lab and benchmarks", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The demo lab: namespaces with two VNets and an on-prem host around a CXP running
    /// this agent, traffic across, live counters; Ctrl-C tears it down. Needs root.
    Demo {
        /// Stop after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        duration: Option<u64>,
    },
    /// The cluster lab (what `cargo xtask lab cluster` starts): three etcd members, two
    /// CXP nodes, BIRD on both sides, three firewalls; Ctrl-C tears it down. Needs root.
    Cluster {
        /// Stop after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        duration: Option<u64>,
    },
    /// Benchmarks (what `cargo xtask bench` runs): XDP ns/packet with the full Internet
    /// table, beside a parse-only baseline and the kernel's LPM trie. Needs root.
    Bench {
        /// Directory with routeviews-v4.txt.gz and routeviews-v6.txt.gz; without it a
        /// synthetic table with the same prefix-length mix is used.
        #[arg(long)]
        table_dir: Option<PathBuf>,
        /// Distinct packets (destinations) per family.
        #[arg(long, default_value_t = 8192)]
        packets: usize,
        /// Rounds over all packets; the median round is reported.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Only the BGP ingest benchmark.
        #[arg(long)]
        bgp_only: bool,
        /// Only the IKE setup benchmark.
        #[arg(long)]
        ike_only: bool,
        /// Only the failover benchmark (BFD, prefix-independent convergence).
        #[arg(long)]
        failover_only: bool,
        /// Only the forwarding benchmark (packets per second through veths).
        #[arg(long)]
        fwd_only: bool,
        /// Only the cluster benchmarks (flows moved by a pool change, config propagation).
        #[arg(long)]
        cluster_only: bool,
        /// IKE SAs the IKE setup benchmark establishes.
        #[arg(long, default_value_t = 1000)]
        tunnels: usize,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    if let Err(e) = real_main().await {
        eprintln!("xnet-lab: error: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main() -> Result<()> {
    match Cli::parse().command {
        Command::Bench {
            table_dir,
            packets,
            rounds,
            bgp_only,
            ike_only,
            failover_only,
            fwd_only,
            cluster_only,
            tunnels,
        } => {
            if cluster_only {
                xnet_lab::bench_cluster::pool_change();
                return tokio::task::spawn_blocking(|| {
                    xnet_lab::bench_cluster::config_propagation(10)
                })
                .await?;
            }
            if fwd_only {
                let opts = xnet_lab::bench::Options {
                    table_dir,
                    packets,
                    rounds: rounds.max(1),
                };
                return std::thread::spawn(move || xnet_lab::bench::run_fwd(opts))
                    .join()
                    .map_err(|_| anyhow::anyhow!("benchmark thread panicked"))?;
            }
            if ike_only {
                return tokio::task::spawn_blocking(move || xnet_lab::bench_ike::run(tunnels))
                    .await?;
            }
            if failover_only {
                let (v4, v6) = xnet_lab::bench::tables(table_dir.as_deref())?;
                return tokio::task::spawn_blocking(move || {
                    xnet_lab::bench_failover::run(&v4, &v6)
                })
                .await?;
            }
            let (v4, v6) = if bgp_only {
                xnet_lab::bench::tables(table_dir.as_deref())?
            } else {
                let opts = xnet_lab::bench::Options {
                    table_dir,
                    packets,
                    rounds: rounds.max(1),
                };
                // The XDP benchmarks move their thread into a private namespace: not this one.
                std::thread::spawn(move || xnet_lab::bench::run(opts))
                    .join()
                    .map_err(|_| anyhow::anyhow!("benchmark thread panicked"))??
            };
            let (v4, v6) = tokio::task::spawn_blocking(move || {
                xnet_lab::bench_bgp::run(&v4, &v6).map(|()| (v4, v6))
            })
            .await??;
            if !bgp_only {
                tokio::task::spawn_blocking(move || xnet_lab::bench_failover::run(&v4, &v6))
                    .await??;
            }
            if bgp_only {
                return tokio::task::spawn_blocking(move || xnet_lab::bench_ike::run(tunnels))
                    .await?;
            }
            tokio::task::spawn_blocking(move || xnet_lab::bench_ike::run(tunnels)).await??;
            xnet_lab::bench_cluster::pool_change();
            tokio::task::spawn_blocking(|| xnet_lab::bench_cluster::config_propagation(10)).await?
        }
        Command::Demo { duration } => xnet_lab::demo::run(duration).await.map(|_| ()),
        Command::Cluster { duration } => xnet_lab::cluster::run(duration).await,
    }
}
