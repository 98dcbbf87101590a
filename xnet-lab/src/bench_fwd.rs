//! `bench fwd` and `bench prog`: packets per second through real veths, and the warm cost
//! of one packet, for xnet beside the kernel's forwarding and a bare XDP redirect, in the
//! same run so that ratios hold on noisy machines.
//!
//! The generator is `xnet_bench_gen` run by `BPF_PROG_RUN` in live-frames mode
//! (`BPF_F_TEST_XDP_LIVE_FRAMES`): each frame leaves `gen0` by `XDP_TX` into its peer `xin`,
//! where the forwarder under test runs; it sends the frame out of `xout` to `sink0`, whose
//! XDP program counts and drops it. Generator, forwarder and sink share one CPU (the
//! syscall's; the veths' NAPI runs there), so the figures are per core. Steering goes
//! through a firewall namespace (kernel forwarding, one veth back to `xfw`).
//!
//! A second firewall, `fwx0`, is an XDP program that bounces every frame back: steering
//! through it measures the CXP's steering, not the firewall.
//!
//! ```text
//!   gen0 ─ xin [forwarder] xout ─ sink0 (count, drop)
//!                 xfw ─ fw0 [netns: forwards back]
//!                 xfx ─ fwx0 [XDP: bounces back]
//! ```

use std::net::IpAddr;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use aya::maps::{Array, PerCpuArray};
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode};
use ipnet::IpNet;
use xnet_common::{names, BenchGen, NextHop, BENCH_FRAME, IF_F_FIREWALL};

use crate::bench::{compile_rules, ifindex, inside, rule, Rng};
use xnet_user::config::Action;
use xnet_user::dataplane::{Dataplane, NhKey};

/// Where the generated frames go: kernel and xnet route it toward the sink.
const DST_NET: &str = "198.18.0.0/15";
const SINK_IP: &str = "10.9.0.2";
const FW_IP: &str = "10.10.0.2";
const FWX_IP: &str = "10.11.0.2";
const SRC_IP: [u8; 4] = [10, 8, 0, 2];
/// Kernel tables for the kernel's policy routing to the firewalls.
const FW_TABLE: u32 = 200;
const FWX_TABLE: u32 = 201;

pub struct Options {
    pub rounds: usize,
    /// Rounds for the full-table cases (each loads the kernel's FIB once).
    pub table_rounds: usize,
}

/// The bench's veths and their ifindexes and MACs.
struct Veths {
    gen: u32,
    xin: u32,
    xout: u32,
    xfw: u32,
    xfx: u32,
    fwx: u32,
    sink: u32,
    mac: std::collections::HashMap<&'static str, [u8; 6]>,
    fw_ns: String,
}

impl Drop for Veths {
    fn drop(&mut self) {
        let _ = crate::lab::ip(&format!("netns del {}", self.fw_ns));
    }
}

fn sh(cmd: &str) -> Result<()> {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .with_context(|| cmd.to_string())?;
    if !out.status.success() {
        bail!("{cmd}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn mac_of(ns: Option<&str>, dev: &str) -> Result<[u8; 6]> {
    let cmd = match ns {
        Some(ns) => format!("ip -n {ns} -br link show {dev}"),
        None => format!("ip -br link show {dev}"),
    };
    let out = Command::new("sh").args(["-c", &cmd]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let m = text
        .split_whitespace()
        .nth(2)
        .with_context(|| format!("{cmd}: {text}"))?;
    let b: Vec<u8> = m
        .split(':')
        .map(|x| u8::from_str_radix(x, 16))
        .collect::<Result<_, _>>()?;
    b.try_into()
        .map_err(|_| anyhow::anyhow!("{cmd}: bad MAC {m}"))
}

/// Builds the topology in this thread's (private) namespace.
fn veths() -> Result<Veths> {
    let fw_ns = format!("xnet-bench-fw-{}", std::process::id());
    let _ = crate::lab::ip(&format!("netns del {fw_ns}"));
    crate::lab::ip(&format!("netns add {fw_ns}"))?;
    for (a, b) in [
        ("gen0", "xin"),
        ("xout", "sink0"),
        ("xfw", "fw0"),
        ("xfx", "fwx0"),
    ] {
        crate::lab::ip(&format!("link add {a} type veth peer name {b}"))?;
    }
    crate::lab::ip(&format!("link set fw0 netns {fw_ns}"))?;
    // NAPI on every receiving veth (XDP_TX/redirect into a veth needs it): GRO turns it on.
    let setup = format!(
        "set -e
        for d in gen0 xin xout sink0 xfw xfx fwx0; do ip link set $d up; ethtool -K $d gro on >/dev/null; done
        ip addr add 10.11.0.1/24 dev xfx
        sysctl -qw net.ipv4.conf.xfx.rp_filter=0 net.ipv4.conf.xfx.send_redirects=0
        ip addr add 10.8.0.1/24 dev xin
        ip addr add 10.9.0.1/24 dev xout
        ip addr add 10.10.0.1/24 dev xfw
        sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
            net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.xin.rp_filter=0 net.ipv4.conf.xfw.rp_filter=0 \
            net.ipv4.conf.xfw.send_redirects=0
        ip route add {DST_NET} via {SINK_IP} dev xout
        ip netns exec {fw_ns} sh -c 'ip link set lo up; ip link set fw0 up; ethtool -K fw0 gro on >/dev/null;
            ip addr add {FW_IP}/24 dev fw0; ip route add default via 10.10.0.1;
            sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.fw0.send_redirects=0 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.fw0.rp_filter=0'"
    );
    sh(&setup)?;
    let mut mac = std::collections::HashMap::new();
    for d in ["gen0", "xin", "xout", "sink0", "xfw", "xfx", "fwx0"] {
        mac.insert(d, mac_of(None, d)?);
    }
    mac.insert("fw0", mac_of(Some(&fw_ns), "fw0")?);
    let hex = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    // Static neighbours: the measurement is forwarding, not ARP.
    sh(&format!(
        "ip neigh replace {SINK_IP} lladdr {} dev xout nud permanent
         ip neigh replace {FW_IP} lladdr {} dev xfw nud permanent
         ip neigh replace {FWX_IP} lladdr {} dev xfx nud permanent
         ip neigh replace 10.8.0.2 lladdr {} dev xin nud permanent
         ip netns exec {fw_ns} ip neigh replace 10.10.0.1 lladdr {} dev fw0 nud permanent",
        hex(mac["sink0"]),
        hex(mac["fw0"]),
        hex(mac["fwx0"]),
        hex(mac["gen0"]),
        hex(mac["xfw"])
    ))?;
    Ok(Veths {
        gen: ifindex("gen0")?,
        xin: ifindex("xin")?,
        xout: ifindex("xout")?,
        xfw: ifindex("xfw")?,
        xfx: ifindex("xfx")?,
        fwx: ifindex("fwx0")?,
        sink: ifindex("sink0")?,
        mac,
        fw_ns,
    })
}

/// The generator's frame: UDP from 10.8.0.2 to 198.18.0.1, TTL 64, to `xin`'s MAC, its
/// IPv4 header checksum set (the generator updates it when it changes the destination).
fn frame(v: &Veths) -> [u8; BENCH_FRAME] {
    let mut f = [0u8; BENCH_FRAME];
    f[..6].copy_from_slice(&v.mac["xin"]);
    f[6..12].copy_from_slice(&v.mac["gen0"]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let total = (BENCH_FRAME - 14) as u16;
    f[14..34].copy_from_slice(&[
        0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, SRC_IP[0], SRC_IP[1], SRC_IP[2], SRC_IP[3],
        198, 18, 0, 1,
    ]);
    f[16..18].copy_from_slice(&total.to_be_bytes());
    let check = xnet_common::csum::checksum(&f[14..34]);
    f[24..26].copy_from_slice(&check.to_be_bytes());
    let udp_len = total - 20;
    f[34..42].copy_from_slice(&[0x04, 0x00, 0x13, 0x88, 0, 0, 0, 0]);
    f[38..40].copy_from_slice(&udp_len.to_be_bytes());
    f
}

/// The forwarders compared.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Fwd {
    Kernel,
    Redirect,
    Xnet,
    /// xnet sampling one packet in `SAMPLE_RATE` for flow export (the samples read as
    /// the agent reads them).
    XnetSampled,
    /// xnet with the rule set of `policy_rules`.
    XnetPolicy,
    /// xnet steering every frame through the firewall namespace.
    XnetSteer,
    /// The kernel's policy routing (`ip rule iif xin`) to the firewall.
    KernelSteer,
    /// The same two through the XDP firewall.
    XnetSteerXdp,
    KernelSteerXdp,
}

struct Bench {
    dp: Dataplane,
    v: Veths,
    attached: Vec<(u32, &'static str, aya::programs::xdp::XdpLinkId)>,
    rules: xnet_user::policy::Compiled,
    steer: xnet_user::policy::Compiled,
    steer_xdp: xnet_user::policy::Compiled,
}

impl Bench {
    fn attach(&mut self, prog: &'static str, ifindex: u32) -> Result<()> {
        let p: &mut Xdp = self
            .dp
            .ebpf_mut()
            .program_mut(prog)
            .with_context(|| prog.to_string())?
            .try_into()?;
        if p.fd().is_err() {
            p.load()?;
        }
        let link = p
            .attach(ifindex, XdpMode::Driver)
            .with_context(|| format!("attaching {prog} to ifindex {ifindex}"))?;
        self.attached.push((ifindex, prog, link));
        Ok(())
    }

    fn detach_forwarders(&mut self) -> Result<()> {
        let keep: Vec<_> = std::mem::take(&mut self.attached);
        for (ifindex, prog, link) in keep {
            if ifindex == self.v.sink || ifindex == self.v.fwx {
                self.attached.push((ifindex, prog, link));
                continue;
            }
            let p: &mut Xdp = self.dp.ebpf_mut().program_mut(prog).unwrap().try_into()?;
            p.detach(link)?;
        }
        Ok(())
    }

    /// Puts `f` in place on `xin` (and `xfw`).
    fn set(&mut self, f: Fwd) -> Result<()> {
        self.detach_forwarders()?;
        let _ = sh(&format!("ip rule del iif xin lookup {FW_TABLE}"));
        let _ = sh(&format!("ip rule del iif xin lookup {FWX_TABLE}"));
        self.dp
            .set_policy(&xnet_user::policy::Compiled::default())?;
        let rate = if f == Fwd::XnetSampled {
            SAMPLE_RATE
        } else {
            0
        };
        self.dp.set_flow_sampling(1, rate)?;
        match f {
            Fwd::Kernel => {}
            Fwd::KernelSteer => sh(&format!("ip rule add iif xin lookup {FW_TABLE}"))?,
            Fwd::KernelSteerXdp => {
                sh(&format!("ip rule add iif xin lookup {FWX_TABLE}"))?;
                self.attach(names::PROG_BENCH_PASS, self.v.xfx)?;
            }
            Fwd::Redirect => self.attach(names::PROG_BENCH_REDIRECT, self.v.xin)?,
            Fwd::Xnet | Fwd::XnetSampled | Fwd::XnetPolicy | Fwd::XnetSteer | Fwd::XnetSteerXdp => {
                match f {
                    Fwd::XnetPolicy => self.dp.set_policy(&self.rules)?,
                    Fwd::XnetSteer => self.dp.set_policy(&self.steer)?,
                    Fwd::XnetSteerXdp => self.dp.set_policy(&self.steer_xdp)?,
                    _ => {}
                }
                self.attach(names::PROG_FORWARD, self.v.xin)?;
                self.attach(names::PROG_FORWARD, self.v.xfw)?;
                self.attach(names::PROG_FORWARD, self.v.xfx)?;
            }
        }
        Ok(())
    }

    fn frames_dropped_at_sink(&self) -> Result<u64> {
        let c: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.dp
                .ebpf()
                .map(names::MAP_BENCH_COUNT)
                .context("BENCH_COUNT")?,
        )?;
        Ok(c.get(&0, 0)?.iter().sum())
    }

    fn generator(&mut self, flows: u32, dsts: u32) -> Result<()> {
        let g = BenchGen {
            flows,
            dsts,
            frame: frame(&self.v),
        };
        let mut m: Array<_, BenchGen> =
            Array::try_from(self.dp.ebpf_mut().map_mut(names::MAP_BENCH_GEN).unwrap())?;
        m.set(0, &g, 0)?;
        Ok(())
    }

    /// Sends `n` frames; returns (frames per second delivered to the sink, delivered share).
    fn send(&mut self, n: u32) -> Result<(f64, f64)> {
        let before = self.frames_dropped_at_sink()?;
        let gen = self.v.gen;
        let data = frame(&self.v);
        let p: &mut Xdp = self
            .dp
            .ebpf_mut()
            .program_mut(names::PROG_BENCH_GEN)
            .unwrap()
            .try_into()?;
        if p.fd().is_err() {
            p.load()?;
        }
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex.
        let ctx = [0u32, data.len() as u32, 0, gen, 0, 0];
        let t = Instant::now();
        p.test_run(TestRunOptions {
            data_in: Some(&data),
            ctx_in: Some(bytemuck::cast_slice(&ctx)),
            repeat: n,
            attrs: TestRunAttrs::new().xdp_live_frames(64),
            ..Default::default()
        })
        .context("BPF_PROG_RUN (live frames) of the generator")?;
        let secs = t.elapsed().as_secs_f64();
        // Frames still in flight in NAPI land within a few ms.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let got = self.frames_dropped_at_sink()? - before;
        Ok((got as f64 / secs, got as f64 / n as f64))
    }

    /// Frames per second of the forwarder in place: about 0.3 s of frames.
    fn rate(&mut self) -> Result<f64> {
        let (pps, share) = self.send(100_000)?;
        if share < 0.5 {
            let out = Command::new("sh")
                .args(["-c", "ip -s -br link; nstat -az | grep -v ' 0 ' | head -60; ip rule; ip route show table all | head"])
                .output()?;
            bail!(
                "only {:.0} % of the frames reached the sink:\n{}",
                share * 100.0,
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let n = (pps * 0.3).clamp(100_000.0, 4_000_000.0) as u32;
        Ok(self.send(n)?.0)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// 10,000 `allow` rules that the generated frames do not match, in many match shapes:
/// source and destination prefixes of 5 lengths each, plus port ranges. Returns the
/// compiled set.
pub fn many_shapes(n: usize, v4: &[IpNet], seed: u64) -> Result<xnet_user::policy::Compiled> {
    let mut rng = Rng(seed);
    const LENS: [u8; 5] = [8, 16, 20, 24, 32];
    let mut rules = Vec::with_capacity(n);
    for i in 0..n {
        let mut pick = |len: u8| -> String {
            let net = v4[(rng.next() % v4.len() as u64) as usize];
            IpNet::new(net.addr(), len).unwrap().trunc().to_string()
        };
        let k = i % 31;
        let (src, dst, proto, ports) = if k < 25 {
            (pick(LENS[k / 5]), pick(LENS[k % 5]), None, None)
        } else {
            // Single ports and port ranges (each range one mask here).
            let (src_len, dst_len, ports) = [
                (24, 16, (443, 443)),
                (24, 16, (1024, 2047)),
                (16, 24, (53, 53)),
                (16, 24, (4096, 8191)),
                (32, 8, (22, 22)),
                (32, 8, (32768, 65535)),
            ][k - 25];
            (pick(src_len), pick(dst_len), Some(6), Some(ports))
        };
        rules.push(rule(
            format!("r{i}"),
            Some(src),
            Some(dst),
            proto,
            ports,
            Action::Allow,
        ));
    }
    compile_rules(rules, 0)
}

/// One steer rule for every generated frame, to service `service` (0 "fw" or 1 "fwx").
fn steer_rule(service: u32) -> Result<xnet_user::policy::Compiled> {
    let steer = rule(
        "steer".into(),
        Some("10.8.0.0/24".into()),
        None,
        None,
        None,
        Action::Steer,
    );
    compile_rules(vec![steer], service)
}

/// Flow sampling's rate in its case (a common production setting).
const SAMPLE_RATE: u32 = 1000;

/// Runs `bench fwd` and `bench prog` with table `v4` (the full-table cases).
pub fn run(v4: &[IpNet], opts: &Options) -> Result<()> {
    let v = veths()?;
    let mut dp = Dataplane::load(1 << 19)?;
    dp.add_segment(1)?;
    dp.set_interface(v.xin, 1, v.mac["xin"], 0)?;
    dp.set_interface(v.xout, 1, v.mac["xout"], 0)?;
    dp.set_interface(v.xfw, 1, v.mac["xfw"], IF_F_FIREWALL)?;
    dp.set_interface(v.xfx, 1, v.mac["xfx"], IF_F_FIREWALL)?;
    let sink = NhKey {
        ifindex: v.xout,
        via: SINK_IP.parse()?,
    };
    let fw = NhKey {
        ifindex: v.xfw,
        via: FW_IP.parse()?,
    };
    dp.set_neighbour(v.xout, sink.via, Some(v.mac["sink0"]))?;
    dp.set_neighbour(v.xfw, fw.via, Some(v.mac["fw0"]))?;
    let fwx = NhKey {
        ifindex: v.xfx,
        via: FWX_IP.parse()?,
    };
    dp.set_neighbour(v.xfx, fwx.via, Some(v.mac["fwx0"]))?;
    dp.set_service(1, &[fwx], true)?;
    dp.set_service_health(1, &[("fwx".into(), fwx)], true)?;
    dp.set_route(1, DST_NET.parse()?, &[sink])?;
    dp.set_service(0, &[fw], true)?;
    dp.set_service_health(0, &[("fw".into(), fw)], true)?;
    {
        let mut nh: Array<_, NextHop> =
            Array::try_from(dp.ebpf_mut().map_mut(names::MAP_BENCH_NH).unwrap())?;
        nh.set(
            0,
            &NextHop {
                ifindex: v.xout,
                flags: 0,
                smac: v.mac["xout"],
                dmac: v.mac["sink0"],
                port: 0,
            },
            0,
        )?;
    }
    sh(&format!(
        "ip route add default via {FW_IP} dev xfw table {FW_TABLE}
         ip route add default via {FWX_IP} dev xfx table {FWX_TABLE}"
    ))?;
    let rules = many_shapes(10_000, v4, 0x2545_f491_4f6c_dd1d)?;
    let mut b = Bench {
        dp,
        v,
        attached: Vec::new(),
        rules,
        steer: steer_rule(0)?,
        steer_xdp: steer_rule(1)?,
    };
    let sink_if = b.v.sink;
    b.attach(names::PROG_BENCH_SINK, sink_if)?;
    let fwx_if = b.v.fwx;
    b.attach(names::PROG_BENCH_BOUNCE, fwx_if)?;
    let shapes = b.rules.tuples.len();
    // The samples are read while the cases run, as the agent's exporter reads them.
    let samples = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let mut ring = b.dp.flow_samples()?;
        let (samples, stop) = (samples.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                while let Some(item) = ring.next() {
                    std::hint::black_box(&*item);
                    samples.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        })
    };

    // (name, forwarder, flows: 0 = a new flow per frame)
    let cases: Vec<(String, Fwd, u32, Fwd)> = vec![
        ("kernel".into(), Fwd::Kernel, 0, Fwd::Kernel),
        ("redirect".into(), Fwd::Redirect, 0, Fwd::Kernel),
        ("xnet".into(), Fwd::Xnet, 0, Fwd::Kernel),
        (
            format!("xnet_flow_sampling_1_in_{SAMPLE_RATE}"),
            Fwd::XnetSampled,
            0,
            Fwd::Kernel,
        ),
        (
            format!("xnet_policy_10k_shapes_{shapes}_new_flows"),
            Fwd::XnetPolicy,
            0,
            Fwd::Kernel,
        ),
        (
            format!("xnet_policy_10k_shapes_{shapes}_4_flows"),
            Fwd::XnetPolicy,
            4,
            Fwd::Kernel,
        ),
        ("kernel_steer".into(), Fwd::KernelSteer, 0, Fwd::KernelSteer),
        ("xnet_steer".into(), Fwd::XnetSteer, 0, Fwd::KernelSteer),
        (
            "kernel_steer_xdp_fw".into(),
            Fwd::KernelSteerXdp,
            0,
            Fwd::KernelSteerXdp,
        ),
        (
            "xnet_steer_xdp_fw".into(),
            Fwd::XnetSteerXdp,
            0,
            Fwd::KernelSteerXdp,
        ),
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..opts.rounds {
        for (i, (name, f, flows, _)) in cases.iter().enumerate() {
            b.set(*f)?;
            b.generator(*flows, 0)?;
            rates[i].push(b.rate().with_context(|| format!("bench fwd {name}"))?);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = reader.join();
    let index = |f: Fwd| cases.iter().position(|c| c.1 == f && c.2 == 0).unwrap();
    let redirect = index(Fwd::Redirect);
    for (i, (name, _, _, base)) in cases.iter().enumerate() {
        let k = index(*base);
        let ratio = |j: usize| median(rates[i].iter().zip(&rates[j]).map(|(a, b)| a / b).collect());
        println!(
            "bench fwd {name} mpps={:.2} ratio_vs_kernel={:.2} ratio_vs_redirect={:.2} kernel={}",
            median(rates[i].clone()) / 1e6,
            ratio(k),
            ratio(redirect),
            cases[k].0
        );
    }
    {
        let (s, x) = (index(Fwd::XnetSampled), index(Fwd::Xnet));
        let ratio = median(rates[s].iter().zip(&rates[x]).map(|(a, b)| a / b).collect());
        println!(
            "bench flow_sampling rate=1/{SAMPLE_RATE} mpps={:.2} unsampled_mpps={:.2} ratio_vs_unsampled={ratio:.3} samples={} (target: ratio >= 0.95)",
            median(rates[s].clone()) / 1e6,
            median(rates[x].clone()) / 1e6,
            samples.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    // Warm cost of one packet (the frame repeated: TTL 64 lasts for the 50 repeats).
    for (name, f, prog) in [
        ("redirect", Fwd::Redirect, names::PROG_BENCH_REDIRECT),
        ("xnet", Fwd::Xnet, names::PROG_FORWARD),
        ("xnet_policy_10k", Fwd::XnetPolicy, names::PROG_FORWARD),
        ("xnet_steer", Fwd::XnetSteer, names::PROG_FORWARD),
    ] {
        b.set(f)?;
        println!("bench prog {name} warm_ns={:.1}", warm(&mut b, prog)?);
    }
    b.set(Fwd::XnetPolicy)?;
    println!(
        "bench prog xnet_policy_10k_miss ns={:.1} shapes={shapes}",
        miss(&mut b)?
    );

    // The full table, destinations spread over 65,536 addresses inside its prefixes.
    b.set(Fwd::Kernel)?;
    let start = Instant::now();
    for n in v4 {
        b.dp.set_route(1, *n, &[sink])?;
    }
    let xnet_load = start.elapsed().as_secs_f64();
    let batch: String = v4
        .iter()
        .map(|n| format!("route replace {n} via {SINK_IP} dev xout\n"))
        .collect();
    let path = std::env::temp_dir().join(format!("xnet-bench-fib-{}", std::process::id()));
    std::fs::write(&path, batch)?;
    let start = Instant::now();
    let r = sh(&format!("ip -batch {}", path.display()));
    let _ = std::fs::remove_file(&path);
    r?;
    let kernel_load = start.elapsed().as_secs_f64();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let dsts: Vec<[u8; 4]> = (0..xnet_common::limits::BENCH_DSTS)
        .map(
            |_| match inside(&v4[(rng.next() % v4.len() as u64) as usize], &mut rng) {
                IpAddr::V4(a) => a.octets(),
                IpAddr::V6(_) => [198, 18, 0, 1],
            },
        )
        .collect();
    {
        let mut m: Array<_, [u8; 4]> =
            Array::try_from(b.dp.ebpf_mut().map_mut(names::MAP_BENCH_DSTS).unwrap())?;
        for (i, d) in dsts.iter().enumerate() {
            m.set(i as u32, d, 0)?;
        }
    }
    let mut full: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..opts.table_rounds {
        for (i, f) in [Fwd::Kernel, Fwd::Xnet].into_iter().enumerate() {
            b.set(f)?;
            b.generator(0, dsts.len() as u32)?;
            full[i].push(b.rate()?);
        }
    }
    let ratio = median(full[1].iter().zip(&full[0]).map(|(a, k)| a / k).collect());
    println!(
        "bench fwd full_table_kernel mpps={:.2} ratio_vs_kernel=1.00 routes={} destinations={} fib_load_secs={kernel_load:.2}",
        median(full[0].clone()) / 1e6,
        v4.len(),
        dsts.len()
    );
    println!(
        "bench fwd full_table_xnet mpps={:.2} ratio_vs_kernel={ratio:.2} routes={} destinations={} load_secs={xnet_load:.2}",
        median(full[1].clone()) / 1e6,
        v4.len(),
        dsts.len()
    );
    b.set(Fwd::Xnet)?;
    println!(
        "bench prog full_table_xnet warm_ns={:.1}",
        warm(&mut b, names::PROG_FORWARD)?
    );
    Ok(())
}

/// Mean ns of `prog` over 50 runs of the generator's frame (the kernel does not restore
/// the frame between repeats: 50 keeps its TTL above 1), median of 5.
fn warm(b: &mut Bench, prog: &str) -> Result<f64> {
    let data = frame(&b.v);
    let ctx = [0u32, data.len() as u32, 0, b.v.xin, 0, 0];
    let p: &mut Xdp = b.dp.ebpf_mut().program_mut(prog).unwrap().try_into()?;
    let mut ns = Vec::new();
    for _ in 0..5 {
        let r = p.test_run(TestRunOptions {
            data_in: Some(&data),
            ctx_in: Some(bytemuck::cast_slice(&ctx)),
            repeat: 50,
            ..Default::default()
        })?;
        if r.return_value != 4 {
            bail!("{prog}: action {} instead of XDP_REDIRECT", r.return_value);
        }
        ns.push(r.duration.as_nanos() as f64);
    }
    Ok(median(ns))
}

/// One run of the forwarding program on the generator's frame with the class cache
/// emptied first: the search a new combination of classes pays. Median of 51.
fn miss(b: &mut Bench) -> Result<f64> {
    use xnet_common::policy::{ClassKey, RuleValue};
    let data = frame(&b.v);
    let ctx = [0u32, data.len() as u32, 0, b.v.xin, 0, 0];
    let mut ns = Vec::new();
    for _ in 0..51 {
        {
            let mut cache: aya::maps::HashMap<_, ClassKey, RuleValue> =
                aya::maps::HashMap::try_from(
                    b.dp.ebpf_mut()
                        .map_mut(names::MAP_FLOW_CLASSES)
                        .context("FLOW_CLASSES")?,
                )?;
            let keys: Vec<ClassKey> = cache.keys().collect::<Result<_, _>>()?;
            for k in keys {
                let _ = cache.remove(&k);
            }
        }
        let p: &mut Xdp =
            b.dp.ebpf_mut()
                .program_mut(names::PROG_FORWARD)
                .unwrap()
                .try_into()?;
        let r = p.test_run(TestRunOptions {
            data_in: Some(&data),
            ctx_in: Some(bytemuck::cast_slice(&ctx)),
            repeat: 1,
            ..Default::default()
        })?;
        ns.push(r.duration.as_nanos() as f64);
    }
    Ok(median(ns))
}
