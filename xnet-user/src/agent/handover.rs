//! The hitless restart, both sides: the new agent takes over the XDP links the previous
//! one pinned once its routes are selected; SIGUSR1 pins ours and leaves forwarding
//! running for the next agent (see `crate::restart`).

use std::collections::HashSet;
use std::time::Duration;

use log::{error, info, warn};

use super::Agent;
use crate::config::XdpMode;
use crate::dataplane::Dataplane;

impl Agent {
    /// A previous agent's XDP links (graceful restart): ours are taken over once routes
    /// are selected; those of interfaces no longer configured detach now.
    pub(super) fn find_handover(&mut self) {
        let ours: HashSet<u32> = self.links.values().map(|(i, _)| *i).collect();
        for (ifindex, pin) in Dataplane::pinned(&crate::restart::dir(&self.config.agent.pin_dir)) {
            if ours.contains(&ifindex) {
                self.handover.push((ifindex, pin));
            } else if std::fs::remove_file(&pin).is_ok() {
                info!("ifindex {ifindex}: XDP left by the previous agent detached (no longer configured)");
            }
        }
        if !self.handover.is_empty() {
            info!(
                "graceful restart: the previous agent's XDP keeps forwarding on {} interfaces until routes are selected",
                self.handover.len()
            );
        }
    }

    /// Graceful restart, new agent: once every peer has sent its routes (End-of-RIB) or
    /// `restart_time` is over, and the firewall health checks have answered (or 5 s
    /// passed), puts our program behind the previous agent's links and lets our
    /// advertisements go.
    pub(super) async fn maybe_finish_restart(&mut self) {
        let bgp_pending = self.bgp.as_ref().is_some_and(|b| b.restarting());
        if self.handover.is_empty() && !bgp_pending {
            return;
        }
        let waited = self.started.elapsed();
        let deadline = Duration::from_secs(
            self.config
                .bgp
                .as_ref()
                .map(|b| b.restart_time)
                .unwrap_or(0) as u64,
        );
        let peers_done = self
            .bgp
            .as_ref()
            .is_none_or(|b| b.peers.iter().all(|p| self.converged.contains(&p.address)));
        let health_done = self.health.iter().flatten().all(|h| h.up.is_some());
        if !((peers_done || waited >= deadline)
            && (health_done || waited >= Duration::from_secs(5)))
        {
            return;
        }
        let generic = self.config.agent.xdp_mode == XdpMode::Generic;
        for (ifindex, pin) in std::mem::take(&mut self.handover) {
            let name = self.link_name(ifindex);
            if let Err(e) = self.dp.take_over(ifindex, &pin) {
                // Never leave an interface without XDP: drop the old one, attach ours.
                warn!("{name}: {e:#}: detaching the previous agent's XDP and attaching ours");
                super::remove_if_present(&pin);
                if let Err(e) = self.dp.attach(ifindex, generic) {
                    error!("{name}: attaching XDP: {e:#}");
                }
            }
        }
        if let Some(b) = &self.bgp {
            b.restart_done();
        }
        self.readvertise_all();
        self.sweep_kernel_routes().await;
        info!(
            "graceful restart complete after {:.1} s: our XDP program forwards now ({} of {} BGP peers sent End-of-RIB, {} BGP routes)",
            waited.as_secs_f64(),
            self.converged.len(),
            self.bgp.as_ref().map(|b| b.peers.len()).unwrap_or(0),
            self.core.bgp_usable()
        );
    }

    /// SIGUSR1: leaves forwarding to the next agent. The XDP links are pinned (the
    /// program and its maps keep forwarding), kernel routes, rules and neighbours stay, and
    /// BGP sessions close without a NOTIFICATION, so graceful-restart peers keep our
    /// routes for `restart_time`. If the links cannot be pinned, stops cleanly instead.
    pub(super) async fn exit_for_restart(&mut self) {
        // AdminDown: to the peers our going is not a failure (RFC 5882 §3.2).
        self.stop_bfd();
        if let Some(f) = &mut self.flows {
            f.stop().await;
        }
        let base = self.config.agent.pin_dir.clone();
        // Still restarting ourselves: the previous agent's program is in place and pinned.
        if self.handover.is_empty() {
            let pinned = crate::restart::prepare(&base).and_then(|d| {
                self.dp.pin_all(&d)?;
                Ok(d)
            });
            match pinned {
                Ok(d) => info!("XDP links pinned in {}", d.display()),
                Err(e) => {
                    error!("graceful restart not possible, stopping cleanly: {e:#}");
                    self.stop().await;
                    return;
                }
            }
        }
        // IPsec SAs are not handed over (yet): they are deleted and negotiated again by
        // the next agent.
        if let Some(ike) = self.ike.take() {
            ike.shutdown().await;
        }
        let gr = self
            .config
            .bgp
            .as_ref()
            .map(|b| (b.graceful_restart, b.restart_time));
        if let Some(b) = &mut self.bgp {
            match gr {
                Some((true, _)) => b.close_for_restart(),
                _ => b.shutdown().await,
            }
        }
        info!(
            "xnet agent exited for a graceful restart: XDP keeps forwarding, kernel routes and rules stay{}; start the agent again to take over",
            match gr {
                Some((true, secs)) => format!(", BGP peers keep our routes for {secs} s"),
                _ => String::new(),
            }
        );
    }
}
