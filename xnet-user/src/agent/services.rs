//! Firewall services: their instances in the data plane, health checks, and the
//! hysteresis that moves an instance in or out of its pool.

use anyhow::Result;
use log::{info, warn};
use tokio::sync::mpsc;

use super::Agent;
use crate::config::FailureMode;
use crate::dataplane::NhKey;
use crate::health;

/// An instance's health as the data plane uses it.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct InstanceHealth {
    /// None until the first probe answers.
    pub(super) up: Option<bool>,
    /// Consecutive probes that disagree with `up`.
    streak: u32,
    /// The last probe that was answered: how long it took.
    pub(super) rtt: Option<std::time::Duration>,
}

impl InstanceHealth {
    /// Takes one probe result; returns whether `up` changed: at once for the first probe,
    /// then after `threshold` consecutive probes that disagree.
    pub(super) fn observe(&mut self, ok: bool, threshold: u32) -> bool {
        match self.up {
            None => {
                self.up = Some(ok);
                true
            }
            Some(up) if up == ok => {
                self.streak = 0;
                false
            }
            Some(_) => {
                self.streak += 1;
                if self.streak >= threshold {
                    self.up = Some(ok);
                    self.streak = 0;
                    true
                } else {
                    false
                }
            }
        }
    }
}

impl Agent {
    pub(super) fn instance_key(&self, service: usize, instance: usize) -> NhKey {
        let i = &self.config.services[service].instances[instance];
        NhKey {
            ifindex: self.links[&i.interface].0,
            via: i.via,
        }
    }

    /// Declares the firewall services (no instance used until its first probe answers)
    /// and starts their health checks.
    pub(super) async fn start_services(&mut self) -> Result<()> {
        self.start_services_keeping(Vec::new()).await
    }

    /// `start_services`, with the health in `kept` for the services that have it.
    async fn start_services_keeping(
        &mut self,
        mut kept: Vec<Option<Vec<InstanceHealth>>>,
    ) -> Result<()> {
        self.health.clear();
        let (tx, rx) = mpsc::channel(256);
        let services = self.config.services.clone();
        kept.resize(services.len(), None);
        for (si, svc) in services.iter().enumerate() {
            let keys: Vec<NhKey> = (0..svc.instances.len())
                .map(|ii| self.instance_key(si, ii))
                .collect();
            let health = kept[si]
                .take()
                .unwrap_or_else(|| vec![InstanceHealth::default(); svc.instances.len()]);
            self.health.push(health);
            let pool = self.pool(si);
            self.dp.set_service_with_health(
                si as u32,
                &keys,
                &pool,
                svc.failure_mode == FailureMode::Closed,
            )?;
            for k in &keys {
                self.manage_neighbour(k.ifindex, k.via).await;
            }
            for (ii, inst) in svc.instances.iter().enumerate() {
                health::spawn(si, ii, inst.via, svc.health.clone(), tx.clone());
            }
            info!(
                "service {}: {} instances, fail-{}, {:?} health check every {} ms",
                svc.name,
                keys.len(),
                if svc.failure_mode == FailureMode::Closed {
                    "closed"
                } else {
                    "open"
                },
                svc.health.kind,
                svc.health.interval_ms
            );
        }
        self.probes = Some(rx);
        Ok(())
    }

    /// A reload that touched services (or interfaces): every service is declared again
    /// and probed by new checks; a service whose settings did not change keeps its
    /// instances' health, so its pool and counters carry on as they were.
    pub(super) async fn restart_services(&mut self, from: &crate::config::Config) -> Result<()> {
        let old = std::mem::take(&mut self.health);
        let kept = self
            .config
            .services
            .iter()
            .map(|svc| {
                let i = from.services.iter().position(|o| o == svc)?;
                old.get(i).cloned()
            })
            .collect();
        // The old services' probes end with their channel.
        self.probes = None;
        self.start_services_keeping(kept).await?;
        // Ids of services that are gone: empty.
        for si in self.config.services.len()..from.services.len() {
            self.dp.set_service(si as u32, &[], false)?;
        }
        Ok(())
    }

    /// A probe result: moves the instance in or out of its service after `threshold`
    /// consecutive disagreeing probes (the first probe decides at once).
    pub(super) async fn on_probe(&mut self, p: health::Probe) -> Result<()> {
        let svc = &self.config.services[p.service];
        let threshold = svc.health.threshold;
        let h = &mut self.health[p.service][p.instance];
        if p.rtt.is_some() {
            h.rtt = p.rtt;
        }
        if !h.observe(p.ok, threshold) {
            return Ok(());
        }
        if p.ok {
            // The probe that just answered made the kernel resolve the instance's MAC: read
            // it now, so the instance joins the pool with a fast-path next hop instead of
            // dropping (fail-closed) its first flows until the next neighbour poll.
            self.sync_kernel_state().await?;
        }
        let svc = &self.config.services[p.service];
        let inst = &svc.instances[p.instance];
        if p.ok {
            info!(
                "service {}: instance {} ({}) is healthy: in the pool",
                svc.name, inst.name, inst.via
            );
        } else {
            warn!(
                "service {}: instance {} ({}) failed {} health checks: out of the pool",
                svc.name, inst.name, inst.via, threshold
            );
        }
        self.publish_health();
        self.set_pool(p.service)
    }

    /// The instances of service `si` that traffic may use, by name and key: those this
    /// node sees healthy; in a cluster, those a majority of its live nodes see healthy.
    pub(super) fn pool(&self, si: usize) -> Vec<(String, NhKey)> {
        let svc = &self.config.services[si];
        let local: Vec<Option<bool>> = self.health[si].iter().map(|h| h.up).collect();
        let members = match &self.cluster {
            Some(c) => {
                let names: Vec<&str> = svc.instances.iter().map(|i| i.name.as_str()).collect();
                c.view.pool(&svc.name, &names, &local)
            }
            None => local.iter().map(|h| *h == Some(true)).collect(),
        };
        members
            .iter()
            .enumerate()
            .filter(|(_, up)| **up)
            .map(|(i, _)| (svc.instances[i].name.clone(), self.instance_key(si, i)))
            .collect()
    }

    /// Writes service `si`'s pool into the data plane.
    pub(super) fn set_pool(&mut self, si: usize) -> Result<()> {
        let svc = &self.config.services[si];
        let pool = self.pool(si);
        if pool.is_empty() {
            warn!(
                "service {}: no healthy instance: traffic is {}",
                svc.name,
                if svc.failure_mode == FailureMode::Closed {
                    "dropped (fail-closed)"
                } else {
                    "routed around the firewall (fail-open)"
                }
            );
        }
        let closed = svc.failure_mode == FailureMode::Closed;
        self.dp.set_service_health(si as u32, &pool, closed)
    }
}

#[cfg(test)]
mod tests {
    use super::InstanceHealth;

    #[test]
    fn the_first_probe_decides_then_threshold_disagreeing_probes_in_a_row() {
        let mut h = InstanceHealth::default();
        assert!(h.observe(true, 3), "first probe: in the pool at once");
        assert_eq!(h.up, Some(true));
        // Two failures, a success: the streak starts over.
        assert!(!h.observe(false, 3));
        assert!(!h.observe(false, 3));
        assert!(!h.observe(true, 3));
        assert!(!h.observe(false, 3));
        assert!(!h.observe(false, 3));
        assert!(h.observe(false, 3), "third failure in a row: out");
        assert_eq!(h.up, Some(false));
        assert!(!h.observe(false, 3));
        assert!(!h.observe(true, 3));
        assert!(!h.observe(true, 3));
        assert!(h.observe(true, 3), "back after three successes");
        let mut first_down = InstanceHealth::default();
        assert!(first_down.observe(false, 3));
        assert_eq!(first_down.up, Some(false));
    }
}
