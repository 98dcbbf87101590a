//! `xnet-lab bench` (run by `cargo xtask bench`): the XDP program's cost per packet with the
//! whole Internet table loaded, beside a baseline program (parse + `XDP_TX`) and the
//! kernel's `BPF_MAP_TYPE_LPM_TRIE` holding the same table, all in one run.
//!
//! Every packet goes through `BPF_PROG_TEST_RUN` once (repeat = 1), each to another
//! destination (random addresses inside random prefixes of the table), so no lookup is
//! served from a cache warmed by the packet before. The kernel's per-run timer overhead is
//! in every figure alike; the baseline shows it.

use std::io::BufRead;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::Array;
use ipnet::IpNet;
use xnet_common::names;

use xnet_user::dataplane::{Dataplane, NhKey};

const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

pub struct Options {
    pub table_dir: Option<PathBuf>,
    pub packets: usize,
    pub rounds: usize,
}

/// A tiny xorshift generator: repeatable runs without another dependency.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Reads `PREFIX ORIGIN_AS` lines from a gzip file.
fn read_table(path: &Path) -> Result<Vec<IpNet>> {
    let f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(flate2::read::GzDecoder::new(f))
        .lines()
        .enumerate()
    {
        let line = line.with_context(|| format!("{}: line {}", path.display(), i + 1))?;
        let Some(p) = line.split_whitespace().next() else {
            continue;
        };
        let net: IpNet = p
            .parse()
            .with_context(|| format!("{}: line {}: {p:?}", path.display(), i + 1))?;
        out.push(net.trunc());
    }
    Ok(out)
}

/// A synthetic table with the real table's IPv4 prefix-length mix (see shared/data/README).
fn synthetic(v6: bool, n: usize, rng: &mut Rng) -> Vec<IpNet> {
    let mix: &[(u8, u32)] = if v6 {
        &[(32, 15), (36, 5), (40, 10), (44, 15), (48, 55)]
    } else {
        &[
            (24, 39),
            (23, 18),
            (22, 18),
            (21, 8),
            (20, 6),
            (19, 4),
            (16, 2),
            (18, 3),
            (17, 1),
            (25, 1),
        ]
    };
    let total: u32 = mix.iter().map(|m| m.1).sum();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let mut pick = (rng.next() % total as u64) as u32;
        let len = mix
            .iter()
            .find(|m| {
                if pick < m.1 {
                    true
                } else {
                    pick -= m.1;
                    false
                }
            })
            .unwrap()
            .0;
        let r = rng.next();
        let net = if v6 {
            // Global unicast 2000::/3 only (a random first byte would draw multicast).
            let a = (1u128 << 125) | (((r as u128) << 64) >> 3);
            IpNet::new(IpAddr::V6(a.into()), len).unwrap().trunc()
        } else {
            // Unicast only (1.0.0.0 to 223.255.255.255, not 127/8 or 169.254/16): the
            // forwarding program hands the rest to the kernel, as it should.
            let a = 0x0100_0000 + (r as u32) % (0xe000_0000 - 0x0100_0000);
            if a >> 24 == 127 || a >> 16 == 0xa9fe {
                continue;
            }
            IpNet::new(IpAddr::V4(a.into()), len).unwrap().trunc()
        };
        out.push(net);
    }
    out.sort();
    out.dedup();
    out
}

/// A random address inside `net`.
pub(crate) fn inside(net: &IpNet, rng: &mut Rng) -> IpAddr {
    match net {
        IpNet::V4(n) => {
            let host = if n.prefix_len() == 32 {
                0
            } else {
                (rng.next() as u32) >> n.prefix_len()
            };
            IpAddr::V4((u32::from(n.network()) | host).into())
        }
        IpNet::V6(n) => {
            let r = ((rng.next() as u128) << 64) | rng.next() as u128;
            let host = if n.prefix_len() == 128 {
                0
            } else {
                r >> n.prefix_len()
            };
            IpAddr::V6((u128::from(n.network()) | host).into())
        }
    }
}

fn packet(dst: IpAddr) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 0xc0, 0x02, 0, 0, 0, 0, 0x01];
    let udp = [0x30, 0x39, 0x00, 0x50, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    match dst {
        IpAddr::V4(d) => {
            p.extend_from_slice(&[0x08, 0x00]);
            let mut h = vec![0x45, 0, 0, 36, 0, 0, 0x40, 0, 255, 17, 0, 0, 10, 0, 0, 1];
            h.extend_from_slice(&d.octets());
            let c = xnet_common::csum::checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            p.extend(h);
        }
        IpAddr::V6(d) => {
            p.extend_from_slice(&[0x86, 0xdd]);
            p.extend_from_slice(&[0x60, 0, 0, 0, 0, 16, 17, 255]);
            p.extend_from_slice(&"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
            p.extend_from_slice(&d.octets());
        }
    }
    p.extend_from_slice(&udp);
    p
}

/// Median over rounds of the mean ns per packet; every packet must give `want`.
fn measure(
    dp: &mut Dataplane,
    prog: &str,
    pkts: &[Vec<u8>],
    ifindex: u32,
    rounds: usize,
    want: u32,
) -> Result<f64> {
    let mut per_round = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let mut total = 0u64;
        for p in pkts {
            let (action, _, ns) = dp.test_run_ingress(prog, p, ifindex)?;
            if action != want {
                bail!(
                    "{prog}: action {action} instead of {want}: the table or the program is wrong"
                );
            }
            total += ns;
        }
        per_round.push(total as f64 / pkts.len() as f64);
    }
    per_round.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(per_round[rounds / 2])
}

/// The route table from `dir` (routeviews-v4/v6.txt.gz), or a synthetic one with the same
/// prefix-length mix when there is none (and says so).
pub fn tables(dir: Option<&Path>) -> Result<(Vec<IpNet>, Vec<IpNet>)> {
    match dir {
        Some(d) if d.join("routeviews-v4.txt.gz").is_file() => {
            println!("bench note: route table from {}", d.display());
            Ok((
                read_table(&d.join("routeviews-v4.txt.gz"))?,
                read_table(&d.join("routeviews-v6.txt.gz"))?,
            ))
        }
        _ => {
            println!("bench note: no route table found (--table-dir); using a synthetic table with the real prefix-length mix");
            let mut rng = Rng(0x51ed_2701_f00d_cafe);
            Ok((
                synthetic(false, 565_000, &mut rng),
                synthetic(true, 168_000, &mut rng),
            ))
        }
    }
}

/// The ifindex of interface `n` in this thread's namespace (/sys still shows the old one).
pub(crate) fn ifindex(n: &str) -> Result<u32> {
    let c = std::ffi::CString::new(n)?;
    // SAFETY: a valid NUL-terminated name.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!("no interface {n}"),
        i => Ok(i),
    }
}

/// Root, and a private network namespace for this thread's veths.
fn private_netns() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark loads XDP programs: run it as root");
    }
    // SAFETY: unshare only affects the calling thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Only the forwarding benchmark (`bench fwd`, `bench prog`).
pub fn run_fwd(opts: Options) -> Result<()> {
    private_netns()?;
    let (v4, _) = tables(opts.table_dir.as_deref())?;
    crate::bench_fwd::run(
        &v4,
        &crate::bench_fwd::Options {
            rounds: opts.rounds,
            table_rounds: opts.rounds.min(3),
        },
    )
}

/// Runs the data-plane benchmarks; returns the tables it used for the BGP benchmark.
pub fn run(opts: Options) -> Result<(Vec<IpNet>, Vec<IpNet>)> {
    private_netns()?;
    crate::lab::ip("link add bench0 type veth peer name bench1")?;
    crate::lab::ip("link set bench0 up")?;
    crate::lab::ip("link set bench1 up")?;
    let (in_if, out_if) = (ifindex("bench0")?, ifindex("bench1")?);

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (v4, v6) = tables(opts.table_dir.as_deref())?;
    println!(
        "bench table v4_prefixes={} v6_prefixes={}",
        v4.len(),
        v6.len()
    );

    let groups = 1 << 19;
    let mut dp = Dataplane::load(groups)?;
    dp.add_segment(1)?;
    dp.set_interface(in_if, 1, [2, 0, 0, 0, 0, 0xc0], 0)?;
    dp.set_interface(out_if, 1, [2, 0, 0, 0, 0, 0xc1], 0)?;
    let nh4 = NhKey {
        ifindex: out_if,
        via: "10.255.0.2".parse()?,
    };
    let nh6 = NhKey {
        ifindex: out_if,
        via: "fd00:ff::2".parse()?,
    };
    dp.set_neighbour(out_if, nh4.via, Some([2, 0, 0, 0, 0, 0x22]))?;
    dp.set_neighbour(out_if, nh6.via, Some([2, 0, 0, 0, 0, 0x22]))?;
    let start = Instant::now();
    for n in &v4 {
        dp.set_route(1, *n, &[nh4])?;
    }
    for n in &v6 {
        dp.set_route(1, *n, &[nh6])?;
    }
    let secs = start.elapsed().as_secs_f64();
    let routes = v4.len() + v6.len();
    let u = dp.usage();
    println!(
        "bench route_load_xnet routes={routes} secs={secs:.2} routes_per_s={:.0} groups_used={} mib={:.0}",
        routes as f64 / secs,
        u.groups_used,
        u.groups_used as f64 / 1024.0
    );

    let (r4, r6) = dp.segment_roots(1).context("segment 1")?;
    {
        let mut roots: Array<_, u32> = Array::try_from(
            dp.ebpf_mut()
                .map_mut(names::MAP_BENCH_ROOTS)
                .context("roots")?,
        )?;
        roots.set(0, &r4, 0)?;
        roots.set(1, &r6, 0)?;
    }
    let start = Instant::now();
    {
        let mut t4: LpmTrie<_, [u8; 4], u32> = LpmTrie::try_from(
            dp.ebpf_mut()
                .map_mut(names::MAP_BENCH_TRIE_V4)
                .context("trie")?,
        )?;
        for n in &v4 {
            if let IpNet::V4(n) = n {
                t4.insert(
                    &Key::new(n.prefix_len() as u32, n.network().octets()),
                    &1,
                    0,
                )?;
            }
        }
    }
    {
        let mut t6: LpmTrie<_, [u8; 16], u32> = LpmTrie::try_from(
            dp.ebpf_mut()
                .map_mut(names::MAP_BENCH_TRIE_V6)
                .context("trie")?,
        )?;
        for n in &v6 {
            if let IpNet::V6(n) = n {
                t6.insert(
                    &Key::new(n.prefix_len() as u32, n.network().octets()),
                    &1,
                    0,
                )?;
            }
        }
    }
    let tsecs = start.elapsed().as_secs_f64();
    println!(
        "bench route_load_lpm_trie routes={routes} secs={tsecs:.2} routes_per_s={:.0} ratio_vs_xnet={:.2}",
        routes as f64 / tsecs,
        tsecs / secs
    );

    for (fam, table) in [("v4", &v4), ("v6", &v6)] {
        let pkts: Vec<Vec<u8>> = (0..opts.packets)
            .map(|_| {
                packet(inside(
                    &table[(rng.next() % table.len() as u64) as usize],
                    &mut rng,
                ))
            })
            .collect();
        let base = measure(
            &mut dp,
            names::PROG_BENCH_BASE,
            &pkts,
            in_if,
            opts.rounds,
            XDP_TX,
        )?;
        println!(
            "bench xdp_base_{fam} ns_per_pkt={base:.1} packets={} rounds={}",
            pkts.len(),
            opts.rounds
        );
        for (case, prog, want) in [
            ("lpm_xnet", names::PROG_BENCH_DIR, XDP_TX),
            ("lpm_trie", names::PROG_BENCH_TRIE, XDP_TX),
            ("xdp_forward", names::PROG_FORWARD, XDP_REDIRECT),
        ] {
            let ns = measure(&mut dp, prog, &pkts, in_if, opts.rounds, want)?;
            println!(
                "bench {case}_{fam} ns_per_pkt={ns:.1} ratio_vs_xdp_base={:.2}",
                ns / base
            );
        }
        // Steady state: many distinct lookups inside one program run, so the per-run
        // overhead and the syscall's cache pollution drop out.
        let batch = xnet_common::limits::BENCH_BATCH;
        let batches: Vec<Vec<u8>> = pkts
            .chunks(batch)
            .filter(|c| c.len() == batch)
            .map(|c| {
                let mut p = c[0][..12].to_vec();
                p.extend_from_slice(if fam == "v4" {
                    &[0x08, 0x00]
                } else {
                    &[0x86, 0xdd]
                });
                for q in c {
                    // The destination address of each single-destination packet.
                    let (off, len) = if fam == "v4" {
                        (14 + 16, 4)
                    } else {
                        (14 + 24, 16)
                    };
                    p.extend_from_slice(&q[off..off + len]);
                }
                p
            })
            .collect();
        let empty = measure(
            &mut dp,
            names::PROG_BENCH_BASE,
            &batches,
            in_if,
            opts.rounds,
            XDP_TX,
        )?;
        let mut per_lookup = Vec::new();
        for (case, prog) in [
            ("lookup_xnet", names::PROG_BENCH_DIR_BATCH),
            ("lookup_trie", names::PROG_BENCH_TRIE_BATCH),
        ] {
            let ns = (measure(&mut dp, prog, &batches, in_if, opts.rounds, XDP_TX)? - empty)
                / batch as f64;
            per_lookup.push(ns);
            let ratio = if per_lookup.len() == 2 {
                format!(" ratio_vs_lookup_xnet={:.2}", ns / per_lookup[0])
            } else {
                String::new()
            };
            println!(
                "bench {case}_{fam} ns_per_lookup={ns:.1} lookups={}{ratio}",
                batches.len() * batch
            );
        }
    }
    policy_bench(&mut dp, &v4, in_if, &opts, &mut rng)?;
    drop(dp);
    crate::bench_fwd::run(
        &v4,
        &crate::bench_fwd::Options {
            rounds: opts.rounds,
            table_rounds: opts.rounds.min(3),
        },
    )?;
    Ok((v4, v6))
}

/// A rule of segment "bench" (a `steer` goes to service "fw").
pub(crate) fn rule(
    name: String,
    source: Option<String>,
    destination: Option<String>,
    protocol: Option<u8>,
    destination_ports: Option<(u16, u16)>,
    action: xnet_user::config::Action,
) -> xnet_user::config::Policy {
    use xnet_user::config::{Action, PortRange, Protocol};
    xnet_user::config::Policy {
        name,
        segment: "bench".into(),
        source,
        destination,
        protocol: protocol.map(Protocol),
        source_ports: None,
        destination_ports: destination_ports.map(|(first, last)| PortRange { first, last }),
        service: (action == Action::Steer).then(|| "fw".to_string()),
        action,
        to_segment: None,
        log: false,
    }
}

/// `rules` compiled in a config with the one segment "bench", service "fw" as id `service`.
pub(crate) fn compile_rules(
    rules: Vec<xnet_user::config::Policy>,
    service: u32,
) -> Result<xnet_user::policy::Compiled> {
    let mut config = xnet_user::config::Config::default();
    config.segments.push(xnet_user::config::Segment {
        name: "bench".into(),
        table: 100,
        default_action: Default::default(),
        flow_sample: None,
    });
    config.policies = rules;
    xnet_user::policy::compile(&config.rules(), &config, &|_| (0, 0), &|_| service)
        .map_err(anyhow::Error::msg)
}

/// Policy classification cost as the rule count grows, with the full table loaded: the
/// forwarding program over the same packets with 10, 1,000 and 10,000 rules. Rules come in
/// four shapes (prefix lengths × protocol × port) drawn from the table, like a real rule
/// base; packets mostly match none, so every tuple is searched (the worst case).
fn policy_bench(
    dp: &mut Dataplane,
    v4: &[IpNet],
    in_if: u32,
    opts: &Options,
    rng: &mut Rng,
) -> Result<()> {
    use xnet_user::config::Action;
    let pkts: Vec<Vec<u8>> = (0..opts.packets)
        .map(|_| packet(inside(&v4[(rng.next() % v4.len() as u64) as usize], rng)))
        .collect();
    let mut base = None;
    for n in [10usize, 1_000, 10_000] {
        let mut rules = Vec::with_capacity(n);
        for i in 0..n {
            let pick = |rng: &mut Rng, len: u8| -> String {
                let net = v4[(rng.next() % v4.len() as u64) as usize];
                IpNet::new(net.addr(), len).unwrap().trunc().to_string()
            };
            let (src, dst, proto, port) = match i % 4 {
                0 => (
                    Some(pick(rng, 24)),
                    Some(pick(rng, 16)),
                    Some(6),
                    Some(443 + (i % 7) as u16),
                ),
                1 => (Some(pick(rng, 16)), Some(pick(rng, 24)), Some(17), None),
                2 => (None, Some(pick(rng, 32)), Some(6), Some(22)),
                _ => (Some(pick(rng, 20)), Some(pick(rng, 20)), None, None),
            };
            rules.push(rule(
                format!("r{i}"),
                src,
                dst,
                proto,
                port.map(|p| (p, p)),
                Action::Allow,
            ));
        }
        let compiled = compile_rules(rules, 0)?;
        dp.set_policy(&compiled)?;
        let ns = measure(
            dp,
            names::PROG_FORWARD,
            &pkts,
            in_if,
            opts.rounds,
            XDP_REDIRECT,
        )?;
        let b = *base.get_or_insert(ns);
        println!(
            "bench policy rules={n} ns_per_pkt={ns:.1} ratio_vs_rules_10={:.2} tuples={} entries={}",
            ns / b,
            compiled.tuples.len(),
            compiled.entries.len()
        );
    }
    dp.set_policy(&xnet_user::policy::Compiled::default())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fallback table must be forwardable: the program hands multicast, link-local and
    /// loopback destinations to the kernel, so the bench would stop on them.
    #[test]
    fn the_synthetic_table_holds_only_forwardable_unicast() {
        let mut rng = Rng(7);
        for net in synthetic(false, 50_000, &mut rng) {
            let IpNet::V4(n) = net else { panic!() };
            let a = n.network().octets();
            assert!(a[0] >= 1 && a[0] < 224 && a[0] != 127, "{n}");
            assert!(!(a[0] == 169 && a[1] == 254), "{n}");
        }
        for net in synthetic(true, 50_000, &mut rng) {
            let IpNet::V6(n) = net else { panic!() };
            assert_eq!(
                n.network().octets()[0] >> 5,
                0b001,
                "{n} is not in 2000::/3"
            );
        }
    }
}
