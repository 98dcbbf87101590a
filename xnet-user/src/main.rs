//! `xnet`: the CXP agent and its command-line tools.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use xnet_user::{agent, config::Config, status};

/// xnet: a Cloud Exchange Point forwarder. An XDP fast path routes between segments' interfaces
/// by longest-prefix match; this agent programs it from a declarative TOML config.
#[derive(Parser)]
#[command(name = "xnet", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load and attach XDP on the config's interfaces, program the routes,
    /// mirror them into the kernel FIB, and follow neighbours. SIGHUP reloads routes and
    /// BGP neighbours; SIGINT/SIGTERM tell BGP peers, detach and clean up. SIGUSR1 exits
    /// for a graceful restart: XDP keeps forwarding (pinned in agent.pin_dir), kernel
    /// routes stay, BGP peers keep our routes; the next `xnet run` takes over without
    /// dropping traffic.
    Run {
        /// The TOML config (see xnet-user/config/demo-lab.toml for an example); in a
        /// cluster, the node's own settings, merged over the cluster's document.
        #[arg(short, long)]
        config: PathBuf,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// The cluster's config in etcd: read it, or write a new revision.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// A cluster's nodes as etcd has them: the config revision each applies, what it
    /// refused, how it sees the firewall instances and the pool it steers over.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Validate a config without touching the system; with --diff, also show what a reload
    /// (SIGHUP) would change in the running agent.
    Check {
        #[arg(short, long)]
        config: PathBuf,
        /// Compare with the config the running agent applies (by section and item).
        #[arg(long)]
        diff: bool,
        /// The running agent's status socket (with --diff).
        #[arg(short, long, default_value = "/run/xnet/xnet.sock")]
        socket: PathBuf,
    },
    /// Show a running agent's BGP sessions (state, uptime, prefixes received and sent) and
    /// routes with their attributes and which path was chosen.
    Bgp {
        #[arg(short, long, default_value = "/run/xnet/xnet.sock")]
        socket: PathBuf,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Show a running agent's BFD sessions: state, discriminators, negotiated intervals,
    /// last diagnostic, flaps; and the latest failovers with their switch and convergence times.
    Bfd {
        #[arg(short, long, default_value = "/run/xnet/xnet.sock")]
        socket: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a running agent's policies with their hits and its firewall services with
    /// their instances' health.
    Policy {
        #[arg(short, long, default_value = "/run/xnet/xnet.sock")]
        socket: PathBuf,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Print what the other side of an IPsec connector needs (addresses, identities,
    /// proposals, traffic selectors, the PSK by reference, BGP settings), in its syntax.
    PeerConfig {
        /// The IPsec connector's name (`[[ipsec]] name`), or with `--format bird`, the BGP
        /// neighbour's (`[[bgp.neighbors]] name`).
        connector: String,
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long, value_enum, default_value = "strongswan")]
        format: xnet_user::peer_config::Format,
        /// Print the pre-shared key (or with `--format bird`, the TCP-MD5 password) itself
        /// instead of where it is kept.
        #[arg(long)]
        include_psk: bool,
    },
    /// Show a running agent's IPsec connectors: IKE SA state and proposal, CHILD SAs with
    /// SPIs, proposals and traffic selectors.
    Ipsec {
        #[arg(short, long, default_value = "/run/xnet/xnet.sock")]
        socket: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A live view of a running agent, refreshed every second: interface rates, passes and
    /// drops by reason, the busiest rules, BGP and IPsec sessions, firewall instances.
    Top {
        #[arg(short, long, default_value = "/run/xnet/xnet.sock")]
        socket: PathBuf,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Print one screen (two samples an interval apart) as text and exit; what a
        /// terminal that is not one gets.
        #[arg(long)]
        once: bool,
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

/// `xnet run` as a node of a cluster: all three or none.
#[derive(clap::Args)]
struct ClusterArgs {
    /// etcd client URLs, comma-separated (http://10.99.0.11:2379,…).
    #[arg(long, value_delimiter = ',', requires_all = ["cluster", "node"])]
    etcd: Vec<String>,
    /// The cluster's name (its keys are under /xnet/<cluster>/).
    #[arg(long, requires = "etcd")]
    cluster: Option<String>,
    /// This node's name in the cluster.
    #[arg(long, requires = "etcd")]
    node: Option<String>,
}

/// Where a cluster is.
#[derive(clap::Args)]
struct Store {
    /// etcd client URLs, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    /// The cluster's name.
    #[arg(long)]
    cluster: String,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate FILE and write it as the cluster's config, if nobody wrote one since the
    /// revision read (compare-and-swap): every node applies it as one reload.
    Push {
        file: PathBuf,
        #[command(flatten)]
        store: Store,
        /// A node's own file to validate the document with (repeatable); without one the
        /// document must be a complete config by itself.
        #[arg(long)]
        local: Vec<PathBuf>,
        /// Write only if the config is still at this revision (the one `xnet config get`
        /// printed when you started editing); default: the revision read just before.
        #[arg(long)]
        revision: Option<i64>,
    },
    /// Print the cluster's config (its revision on standard error).
    Get {
        #[command(flatten)]
        store: Store,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// The live nodes: version, config revision applied, refusals, instance views, pools.
    Status {
        #[command(flatten)]
        store: Store,
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // Milliseconds: failovers and convergence are read off these timestamps.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    if let Err(e) = real_main().await {
        eprintln!("xnet: error: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main() -> Result<()> {
    match Cli::parse().command {
        Command::Run { config, cluster } => {
            let cluster = match (cluster.cluster, cluster.node) {
                (Some(name), Some(node)) => Some(xnet_user::config::ClusterSettings {
                    etcd: cluster.etcd,
                    name,
                    node,
                    cache: None,
                }),
                _ => None,
            };
            agent::run(&config, cluster).await
        }
        Command::Config {
            command:
                ConfigCommand::Push {
                    file,
                    store,
                    local,
                    revision,
                },
        } => {
            xnet_user::cluster::cli::push(&store.etcd, &store.cluster, &file, &local, revision)
                .await
        }
        Command::Config {
            command: ConfigCommand::Get { store },
        } => xnet_user::cluster::cli::get(&store.etcd, &store.cluster).await,
        Command::Cluster {
            command: ClusterCommand::Status { store, json },
        } => xnet_user::cluster::cli::status(&store.etcd, &store.cluster, json).await,
        Command::Check {
            config,
            diff,
            socket,
        } => {
            if let Some(s) = xnet_user::cluster::settings_in(&config)? {
                // A node's own file: the rest comes from etcd, which a check does not ask
                // (a node must start from its cache while etcd is away).
                if diff {
                    anyhow::bail!("--diff: {} is a cluster node's file; `xnet config push --local` validates it with the cluster's document", config.display());
                }
                println!(
                    "{}: node {} of cluster {} (etcd {}): ok; the rest of its config comes from etcd",
                    config.display(),
                    s.node,
                    s.name,
                    s.etcd.join(",")
                );
                return Ok(());
            }
            let c = Config::load(&config)?;
            if diff {
                let running = status::fetch_config(&socket).await?;
                let d = xnet_user::config_diff::diff(&running, &c);
                print!("{d}");
                if let Some(why) = xnet_user::agent::reload_refusal(&d) {
                    println!("a reload would be refused: {why}");
                }
                return Ok(());
            }
            println!(
                "{}: ok ({} segments, {} interfaces, {} routes, {} policies, {} BGP neighbours, {} IPsec connectors)",
                config.display(),
                c.segments.len(),
                c.interfaces.len(),
                c.routes.len(),
                c.policies.len(),
                c.bgp.as_ref().map(|b| b.neighbors.len()).unwrap_or(0),
                c.ipsec.len()
            );
            Ok(())
        }
        Command::Bgp { socket, json } => {
            let s = status::fetch(&socket).await?;
            if json {
                let v = serde_json::json!({ "sessions": s.bgp, "routes": s.bgp_routes, "routes_total": s.bgp_routes_total });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", s.render_bgp());
            }
            Ok(())
        }
        Command::Bfd { socket, json } => {
            let s = status::fetch(&socket).await?;
            if json {
                let v = serde_json::json!({ "sessions": s.bfd, "failovers": s.failovers });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", s.render_bfd());
            }
            Ok(())
        }
        Command::Policy { socket, json } => {
            let s = status::fetch(&socket).await?;
            if json {
                let v = serde_json::json!({ "policies": s.policies, "services": s.services });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", s.render_policy());
            }
            Ok(())
        }
        Command::PeerConfig {
            connector,
            config,
            format,
            include_psk,
        } => {
            let c = Config::load(&config)?;
            let file = config.display().to_string();
            let psk = if !include_psk {
                None
            } else if format == xnet_user::peer_config::Format::Bird {
                // The BGP neighbour's TCP-MD5 password.
                let neighbors = c.bgp.iter().flat_map(|b| b.neighbors.iter());
                match neighbors.enumerate().find(|(_, n)| n.name == connector) {
                    Some((i, n)) => xnet_user::bgp::md5::load(n, i, &file)?
                        .map(|k| String::from_utf8_lossy(k.bytes()).into_owned()),
                    None => None,
                }
            } else {
                let conns = xnet_user::ike::daemon::conns(&c.ipsec, &file)?;
                let i = c.ipsec.iter().position(|x| x.name == connector);
                i.and_then(|i| match &conns[i].auth {
                    xnet_user::ike::sa::Auth::Psk(k) => {
                        Some(String::from_utf8_lossy(k.bytes()).into_owned())
                    }
                    xnet_user::ike::sa::Auth::Cert(_) => None,
                })
            };
            print!(
                "{}",
                xnet_user::peer_config::render(&c, &connector, format, psk.as_deref())?
            );
            Ok(())
        }
        Command::Ipsec { socket, json } => {
            let s = status::fetch(&socket).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s.ipsec)?);
            } else {
                print!("{}", s.render_ipsec());
            }
            Ok(())
        }
        Command::Top {
            socket,
            interval,
            once,
        } => {
            use std::io::IsTerminal;
            if !(0.1..=60.0).contains(&interval) {
                anyhow::bail!("--interval: between 0.1 and 60 seconds");
            }
            let interval = std::time::Duration::from_secs_f64(interval);
            if once || !std::io::stdout().is_terminal() {
                let (w, h) = match ratatui::crossterm::terminal::size() {
                    Ok((w, h)) if !once => (w, h),
                    _ => (120, 40),
                };
                print!("{}", xnet_user::top::once(&socket, interval, w, h).await?);
                Ok(())
            } else {
                xnet_user::top::run(&socket, interval).await
            }
        }
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
