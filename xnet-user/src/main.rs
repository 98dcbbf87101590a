//! `xnet`: the CXP agent and its command-line tools.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use xnet_user::{agent, config::Config, status};

/// xnet: a Cloud Exchange Point forwarder. An XDP fast path routes between segments' interfaces
/// by longest-prefix match; this agent programs it from a declarative TOML config.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load and attach XDP on the config's interfaces, program the routes,
    /// mirror them into the kernel FIB, and follow neighbours. SIGHUP reloads routes;
    /// SIGINT/SIGTERM detach and clean up.
    Run {
        /// The TOML config (see xnet-user/config/demo-lab.toml for an example).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate a config without touching the system.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// The demo lab: namespaces with two VNets and an on-prem host around a CXP running
    /// this agent, traffic across, live counters; Ctrl-C tears it down. Needs root.
    Demo {
        /// Stop after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        duration: Option<u64>,
    },
    /// Show a running agent's interfaces, routes, neighbours and data-plane counters.
    Status {
        /// The agent's status socket (agent.socket in its config).
        #[arg(short, long, default_value = "/run/xnet/xnet.sock")]
        socket: PathBuf,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(e) = real_main().await {
        eprintln!("xnet: error: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main() -> Result<()> {
    match Cli::parse().command {
        Command::Run { config } => agent::run(&config).await,
        Command::Check { config } => {
            let c = Config::load(&config)?;
            println!(
                "{}: ok ({} segments, {} interfaces, {} routes)",
                config.display(),
                c.segments.len(),
                c.interfaces.len(),
                c.routes.len()
            );
            Ok(())
        }
        Command::Demo { duration } => xnet_user::demo::run(duration).await,
        Command::Status { socket, json } => {
            let s = status::fetch(&socket).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", s.render());
            }
            Ok(())
        }
    }
}
