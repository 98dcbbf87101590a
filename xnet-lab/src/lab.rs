//! The demo lab in network namespaces: two "VNet" hosts and an "on-prem" host around a
//! `cxp` namespace, joined by veth pairs. `xnet-lab demo` and the end-to-end tests build it;
//! it is torn down when dropped.
//!
//! ```text
//!   {p}-vnet1  eth0 10.0.1.2/30 ── vnet1  10.0.1.1/30 ┐
//!   {p}-vnet2  eth0 10.0.2.2/30 ── vnet2  10.0.2.1/30 ├ {p}-cxp (forwarding off: only XDP forwards)
//!   {p}-onprem eth0 10.0.3.2/30 ── onprem 10.0.3.1/30 ┘
//! ```
//! Each host has a workload address on `lo` (10.1.0.1, 10.2.0.1, 192.168.10.1 and fd01::1,
//! fd02::1, fd03::1) and a default route via the CXP; the CXP's routes come from the
//! agent's config (`config/demo-lab.toml`).

use std::process::Command;

use anyhow::{bail, Context, Result};

/// The hosts around the CXP: (name, link subnet index, workload v4, workload v6).
pub const HOSTS: [(&str, u8, &str, &str); 3] = [
    ("vnet1", 1, "10.1.0.1", "fd01::1"),
    ("vnet2", 2, "10.2.0.1", "fd02::1"),
    ("onprem", 3, "192.168.10.1", "fd03::1"),
];

/// The demo config shipped with the agent.
pub const DEMO_CONFIG: &str = include_str!("../../xnet-user/config/demo-lab.toml");

pub struct Lab {
    pub prefix: String,
    pub firewalls: usize,
}

/// Runs `ip` with `args`; an error carries its stderr.
pub fn ip(args: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {args}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs a command inside namespace `ns`.
pub fn netns_exec(ns: &str, cmd: &str) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd.split_whitespace())
        .output()
        .with_context(|| format!("ip netns exec {ns} {cmd}"))?;
    if !out.status.success() {
        bail!(
            "ip netns exec {ns} {cmd}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Lab {
    /// Builds the topology with namespace names starting with `prefix`. Any leftover of
    /// an earlier lab with the same prefix is removed first.
    pub fn create(prefix: &str) -> Result<Lab> {
        Self::create_with_firewalls(prefix, 0)
    }

    /// The lab plus `firewalls` firewall namespaces `{p}-fw1…`, each joined to the CXP's
    /// interface `fwK` (10.0.1K.1/30 ↔ 10.0.1K.2/30). A firewall routes what it receives
    /// back to the CXP and counts it with nftables: `ip saddr` of the VNet (10.1.0.0/16)
    /// and of on-prem (192.168.0.0/16) separately, see [`Lab::firewall_counts`].
    pub fn create_with_firewalls(prefix: &str, firewalls: usize) -> Result<Lab> {
        let lab = Lab {
            prefix: prefix.to_string(),
            firewalls,
        };
        lab.destroy();
        let cxp = lab.ns("cxp");
        ip(&format!("netns add {cxp}"))?;
        for (host, _, _, _) in HOSTS {
            ip(&format!("netns add {}", lab.ns(host)))?;
        }
        let sysctl = |ns: &str, kv: &str| netns_exec(ns, &format!("sysctl -qw {kv}"));
        for ns in std::iter::once(cxp.clone()).chain(HOSTS.iter().map(|h| lab.ns(h.0))) {
            sysctl(&ns, "net.ipv6.conf.all.accept_dad=0")?;
            sysctl(&ns, "net.ipv6.conf.default.accept_dad=0")?;
            ip(&format!("-n {ns} link set lo up"))?;
        }
        // Only XDP may forward in the CXP.
        sysctl(&cxp, "net.ipv4.ip_forward=0")?;
        sysctl(&cxp, "net.ipv6.conf.all.forwarding=0")?;
        for (host, i, v4, v6) in HOSTS {
            let hns = lab.ns(host);
            ip(&format!(
                "link add {host} netns {cxp} type veth peer name eth0 netns {hns}"
            ))?;
            ip(&format!("-n {cxp} addr add 10.0.{i}.1/30 dev {host}"))?;
            ip(&format!("-n {cxp} addr add fd00:{i}::1/64 dev {host}"))?;
            ip(&format!("-n {cxp} link set {host} up"))?;
            ip(&format!("-n {hns} addr add 10.0.{i}.2/30 dev eth0"))?;
            ip(&format!("-n {hns} addr add fd00:{i}::2/64 dev eth0"))?;
            ip(&format!("-n {hns} addr add {v4}/32 dev lo"))?;
            ip(&format!("-n {hns} addr add {v6}/128 dev lo"))?;
            ip(&format!("-n {hns} link set eth0 up"))?;
            ip(&format!(
                "-n {hns} route add default via 10.0.{i}.1 src {v4}"
            ))?;
            ip(&format!(
                "-n {hns} -6 route add default via fd00:{i}::1 src {v6}"
            ))?;
            // XDP_REDIRECT into a veth needs NAPI on the receiving end: GRO turns it on.
            // A veth leaves TCP/UDP checksums to "hardware" that never comes when XDP
            // forwards the frame: the hosts compute them in software, as real NICs would.
            netns_exec(&hns, "ethtool -K eth0 gro on tx off")?;
        }
        for k in 1..=firewalls {
            let fns = lab.ns(&format!("fw{k}"));
            ip(&format!("netns add {fns}"))?;
            for kv in [
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.eth0.send_redirects=0",
            ] {
                let _ = sysctl(&fns, kv);
            }
            ip(&format!("-n {fns} link set lo up"))?;
            ip(&format!(
                "link add fw{k} netns {cxp} type veth peer name eth0 netns {fns}"
            ))?;
            ip(&format!("-n {cxp} addr add 10.0.1{k}.1/30 dev fw{k}"))?;
            ip(&format!("-n {cxp} link set fw{k} up"))?;
            ip(&format!("-n {fns} addr add 10.0.1{k}.2/30 dev eth0"))?;
            ip(&format!("-n {fns} link set eth0 up"))?;
            ip(&format!("-n {fns} route add default via 10.0.1{k}.1"))?;
            sysctl(&fns, "net.ipv4.conf.eth0.send_redirects=0")?;
            netns_exec(&fns, "ethtool -K eth0 gro on tx off")?;
            let nft = "add table inet fw ; add chain inet fw forward { type filter hook forward priority 0 ; policy accept ; } ; add rule inet fw forward ip saddr 10.1.0.0/16 counter ; add rule inet fw forward ip saddr 192.168.0.0/16 counter";
            let out = Command::new("ip")
                .args(["netns", "exec", &fns, "nft", nft])
                .output()
                .context("running nft (nftables)")?;
            if !out.status.success() {
                bail!(
                    "nft in {fns}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(lab)
    }

    /// Packets firewall `k` forwarded from the VNet and from on-prem (nftables counters).
    pub fn firewall_counts(&self, k: usize) -> Result<(u64, u64)> {
        let out = netns_exec(
            &self.ns(&format!("fw{k}")),
            "nft list chain inet fw forward",
        )?;
        let counts: Vec<u64> = out
            .lines()
            .filter_map(|l| l.split("counter packets ").nth(1))
            .filter_map(|r| r.split_whitespace().next()?.parse().ok())
            .collect();
        match counts[..] {
            [vnet, onprem] => Ok((vnet, onprem)),
            _ => bail!("unexpected nft output in fw{k}: {out}"),
        }
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// The demo config with its socket moved to `socket`.
    pub fn config(&self, socket: &str) -> String {
        DEMO_CONFIG.replace("/run/xnet/demo.sock", socket)
    }

    pub fn destroy(&self) {
        let firewalls = (1..=self.firewalls).map(|k| format!("fw{k}"));
        for name in ["cxp", "vnet1", "vnet2", "onprem"]
            .map(String::from)
            .into_iter()
            .chain(firewalls)
        {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(&name)])
                .output();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.destroy();
    }
}
