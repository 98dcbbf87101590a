//! SIGHUP: the new config is read and validated whole, every name it uses resolved and
//! every secret read, before anything changes; then the difference is applied section by
//! section (`config_diff`). What did not change is not touched: BGP sessions, services'
//! health and counters, connectors and their SAs. A failure partway applies the running
//! config again to the sections already touched, and the log says what was rolled back.

use std::collections::HashMap;

use anyhow::{Context, Result};
use log::{error, info, warn};

use super::{route_set, Agent};
use crate::config::{Config, DefaultAction, Role};
use crate::config_diff::{diff, Diff, Kind};
use crate::kernel::RULE_PRIORITY;
use xnet_common::{IF_F_DEFAULT_DENY, IF_F_FIREWALL};

/// Why a reload with difference `d` is refused before anything changes, if it is.
pub fn reload_refusal(d: &Diff) -> Option<String> {
    let mut why = Vec::new();
    for c in &d.changes {
        match (c.section, c.kind) {
            ("agent", _) => why.push(format!(
                "[agent] {} only change with a restart (hitless: `systemctl kill -s USR1 xnet && systemctl start xnet`)",
                c.fields.join(", ")
            )),
            ("segments", Kind::Changed) if c.fields.iter().any(|f| f == "table") => why.push(format!(
                "segments {}: its kernel table only changes with a restart",
                c.name
            )),
            _ => {}
        }
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// The config's flags for interface `itf` (firewall-facing, segment default deny).
pub(super) fn interface_flags(c: &Config, itf: &crate::config::Interface) -> u32 {
    let mut flags = 0;
    if itf.role == Role::Firewall {
        flags |= IF_F_FIREWALL;
    }
    if c.segments
        .iter()
        .any(|s| s.name == itf.segment && s.default_action == DefaultAction::Deny)
    {
        flags |= IF_F_DEFAULT_DENY;
    }
    flags
}

/// What a reload needs that can fail without changing anything: the config, its
/// interfaces' links, its BGP passwords.
struct Prepared {
    config: Config,
    links: HashMap<String, (u32, [u8; 6])>,
    keys: crate::bgp::md5::Keys,
    /// The connectors with their secrets, as `config.ipsec` lists them.
    conns: Vec<std::sync::Arc<crate::ike::sa::Conn>>,
}

impl Agent {
    async fn prepare(&self, mut config: Config) -> Result<Prepared> {
        let file = self.path.display().to_string();
        config.keep_segment_ids(&self.config, self.tables.keys().copied().max().unwrap_or(0));
        let mut links = HashMap::new();
        for (i, itf) in config.interfaces.iter().enumerate() {
            let l = self
                .kernel
                .link(&itf.name)
                .await
                .with_context(|| format!("{file}: interfaces[{i}].name"))?;
            links.insert(itf.name.clone(), (l.ifindex, l.mac));
        }
        let keys = match &config.bgp {
            Some(b) => crate::bgp::md5::load_all(b, &file)?,
            None => Default::default(),
        };
        // The connectors' secrets and certificates read now: a missing one changes nothing.
        let conns = crate::ike::daemon::conns(&config.ipsec, &file)?;
        Ok(Prepared {
            config,
            links,
            keys,
            conns,
        })
    }

    /// SIGHUP: the file again (in a cluster: the document in force with the node's file).
    pub(super) async fn reload(&mut self) {
        match self.load_config() {
            Ok(c) => {
                let _ = self.reload_with(c, &self.path.display().to_string()).await;
            }
            Err(e) => error!("reload rejected, nothing changed: {e}"),
        }
    }

    /// Applies `new` (from `source`, for the log) as one reload: all of it, or on a
    /// failure partway the running config again; Err says why it is not in force.
    pub(super) async fn reload_with(&mut self, new: Config, source: &str) -> Result<(), String> {
        let d = diff(&self.config, &new);
        if d.is_empty() {
            info!("reload: {source}: no change");
            return Ok(());
        }
        if let Some(why) = reload_refusal(&d) {
            error!("reload rejected, nothing changed: {source}: {why}");
            return Err(why);
        }
        let prepared = match self.prepare(new).await {
            Ok(p) => p,
            Err(e) => {
                error!("reload rejected, nothing changed: {e:#}");
                return Err(format!("{e:#}"));
            }
        };
        info!(
            "reload: {source}: {}",
            d.to_string().trim_end().replace('\n', "; ")
        );
        let running = self.config.clone();
        let mut done = Vec::new();
        match self.apply_config(prepared, &mut done, None).await {
            Ok(()) => {
                info!(
                    "reloaded {source}: {} changes applied ({} routes)",
                    d.changes.len(),
                    self.statics.len()
                );
                Ok(())
            }
            Err(e) => {
                error!("reload failed, rolling back: {e:#}");
                let why = format!("applying it failed, rolled back: {e:#}");
                let back = match self.prepare(running).await {
                    Ok(p) => p,
                    Err(e) => {
                        error!("rollback impossible: {e:#}");
                        return Err(why);
                    }
                };
                let undo = done.clone();
                let mut redone = Vec::new();
                match self.apply_config(back, &mut redone, Some(&undo)).await {
                    Ok(()) => warn!(
                        "reload rolled back: the running config is in force again ({} restored)",
                        undo.join(", ")
                    ),
                    Err(e) => error!(
                        "rollback incomplete (restored: {}): {e:#}",
                        redone.join(", ")
                    ),
                }
                Err(why)
            }
        }
    }

    /// Brings the running state to `p.config`: the sections of the difference (only those
    /// in `only`, when rolling back), each recorded in `done` before it starts.
    async fn apply_config(
        &mut self,
        p: Prepared,
        done: &mut Vec<&'static str>,
        only: Option<&[&'static str]>,
    ) -> Result<()> {
        let from = self.config.clone();
        let target = p.config;
        let d = diff(&from, &target);
        let wanted = |s: &str| only.is_none_or(|o| o.contains(&s));
        let seg_changed = |name: &str| d.has("segments", name);
        for (name, l) in p.links {
            self.links.insert(name, l);
        }
        self.config = target.clone();

        if wanted("segments") && d.touches("segments") {
            done.push("segments");
            for (id, s) in target.segments_with_ids() {
                self.dp.add_segment(id)?;
                self.tables.insert(id, s.table);
                self.dp.set_flow_sampling(id, s.flow_sample.unwrap_or(0))?;
            }
        }

        if wanted("interfaces") && (d.touches("interfaces") || d.touches("segments")) {
            done.push("interfaces");
            for name in d.names("interfaces", Kind::Removed) {
                let Some(&(ifindex, _)) = self.links.get(name) else {
                    continue;
                };
                self.dp.detach(ifindex)?;
                self.dp.detach_tunnel_in_from(name);
                self.dp.remove_interface(ifindex)?;
                if let Some(i) = self.rules.iter().position(|r| r == name) {
                    self.rules.remove(i);
                    self.kernel.delete_segment_rules(name).await?;
                }
                self.links.remove(name);
                info!("reload: interface {name} left the data plane (XDP detached)");
            }
            let generic = target.agent.xdp_mode == crate::config::XdpMode::Generic;
            for itf in &target.interfaces {
                let old = from.interfaces.iter().find(|i| i.name == itf.name);
                if old.is_some() && !d.has("interfaces", &itf.name) && !seg_changed(&itf.segment) {
                    continue;
                }
                let (ifindex, mac) = self.links[&itf.name];
                let seg = target.segment_id(&itf.segment).expect("validated");
                self.dp
                    .set_interface(ifindex, seg, mac, interface_flags(&target, itf))?;
                if !self.dp.attached().contains(&ifindex) {
                    self.dp.attach(ifindex, generic).with_context(|| {
                        format!("interfaces: {} (set agent.xdp_mode = \"generic\" if its driver has no native XDP)", itf.name)
                    })?;
                    info!(
                        "reload: attached XDP to {} (segment {})",
                        itf.name, itf.segment
                    );
                }
                if target.agent.kernel_fib && old.is_none_or(|o| o.segment != itf.segment) {
                    if let Some(i) = self.rules.iter().position(|r| *r == itf.name) {
                        self.rules.remove(i);
                        self.kernel.delete_segment_rules(&itf.name).await?;
                    }
                    let table = self.table_of(seg);
                    self.kernel
                        .add_segment_rules(&itf.name, table, RULE_PRIORITY)
                        .await?;
                    self.rules.push(itf.name.clone());
                }
            }
            self.refresh_connected().await?;
        }

        if wanted("services") && (d.touches("services") || d.touches("interfaces")) {
            done.push("services");
            self.restart_services(&from).await?;
        }

        if wanted("routes") {
            done.push("routes");
            self.set_statics(route_set(&target, &self.links)).await?;
        }

        if wanted("policies") {
            done.push("policies");
            self.apply_policy()?;
            // Each rule keeps its hits, wherever it moved (by name).
            let from_index: Vec<Option<usize>> = target
                .policies
                .iter()
                .map(|p| from.policies.iter().position(|o| o.name == p.name))
                .collect();
            if from_index.iter().enumerate().any(|(i, f)| *f != Some(i))
                || from.policies.len() != target.policies.len()
            {
                self.dp
                    .move_rule_counters(from.policies.len(), &from_index)?;
                self.logged_hits.clear();
            }
        }

        if wanted("bgp") && (d.touches("bgp") || d.touches("bgp.neighbors")) {
            done.push("bgp");
            if d.touches("bgp") {
                // Globals (AS, router id, port, multipath, graceful restart): a new speaker.
                self.stop_bgp().await;
                self.start_bgp().await?;
            } else {
                let stopped = match self.bgp.as_mut() {
                    Some(b) => {
                        let config = &self.config;
                        b.reconcile(config.bgp.as_ref(), &|name| config.segment_id(name), p.keys)
                    }
                    None => Vec::new(),
                };
                let mut changed = Vec::new();
                for peer in stopped {
                    changed.extend(self.rib.peer_down(peer));
                }
                self.bgp_changed(changed).await?;
            }
        }

        if wanted("ipsec") && d.touches("ipsec") {
            done.push("ipsec");
            self.reconcile_connectors(&p.conns).await?;
        }

        // The exporter knows each segment's rate (its selector reports).
        let rates_changed = d.changes.iter().any(|c| {
            c.section == "segments"
                && (c.kind != Kind::Changed || c.fields.iter().any(|f| f == "flow_sample"))
        });
        if wanted("flows") && (d.touches("flows") || rates_changed) {
            done.push("flows");
            self.restart_flows().await?;
        }

        self.reconcile_bfd()?;
        self.tunnel_policy()?;
        self.readvertise_all();
        Ok(())
    }
}
