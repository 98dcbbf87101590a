//! The agent as a node of a cluster: the config comes from etcd (merged with the node's
//! own file), each new revision is applied as one reload or refused whole, and the
//! firewall pools follow the cluster's view. Without etcd the node forwards on with the
//! config in force and its own probes.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use log::{error, info, warn};

use super::Agent;
use crate::cluster::store::{Event, Store};
use crate::cluster::view::View;
use crate::cluster::{merge, NodeRecord, Refusal};
use crate::config::{ClusterSettings, Config};

/// The node's cluster state.
pub(super) struct Node {
    pub(super) settings: ClusterSettings,
    pub(super) store: Store,
    pub(super) view: View,
    /// The cluster's document in force: (revision, text).
    pub(super) doc: (i64, String),
    pub(super) refused: Option<Refusal>,
}

impl Node {
    pub(super) fn status(&self) -> crate::status::ClusterStatus {
        crate::status::ClusterStatus {
            cluster: self.settings.name.clone(),
            node: self.settings.node.clone(),
            etcd_connected: self.view.connected,
            applied_revision: self.doc.0,
            refused: self.refused.clone(),
            members: self.view.members.keys().cloned().collect(),
        }
    }
}

/// The config of node `s` from the cluster's document at `revision` and the node's file
/// `local` (its path for errors).
fn effective(
    s: &ClusterSettings,
    revision: i64,
    doc: &str,
    local: &Path,
) -> Result<Config, String> {
    let text = std::fs::read_to_string(local)
        .map_err(|e| format!("{}: cannot read: {e}", local.display()))?;
    let name = format!("etcd {}@{revision}", crate::cluster::config_key(&s.name));
    let mut c = merge::config(doc, &name, &text, &local.display().to_string())
        .map_err(|e| e.to_string())?;
    c.agent.cluster = Some(s.clone());
    Ok(c)
}

/// Keeps the document in force where the node starts from when etcd is away.
fn save(s: &ClusterSettings, revision: i64, doc: &str) {
    let path = s.cache_path();
    let body = format!(
        "# xnet: cluster {} config revision {revision}, as applied (etcd holds the original)\n{doc}",
        s.name
    );
    let tmp = path.with_extension("tmp");
    let r = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&tmp, body))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = r {
        warn!(
            "cluster {}: cannot keep the config in {}: {e}",
            s.name,
            path.display()
        );
    }
}

/// The document `save` kept: (revision, text).
fn cached(s: &ClusterSettings) -> Option<(i64, String)> {
    let text = std::fs::read_to_string(s.cache_path()).ok()?;
    let (first, doc) = text.split_once('\n')?;
    let revision = first
        .split("config revision ")
        .nth(1)?
        .split(',')
        .next()?
        .parse()
        .ok()?;
    Some((revision, doc.to_string()))
}

/// How long a starting node waits for etcd before it runs the cached document.
const WAIT_FOR_ETCD: Duration = Duration::from_secs(3);

/// Joins the cluster and waits for its first config that validates with the node's
/// file `local` (or, with etcd away for `WAIT_FOR_ETCD`, the one it last applied);
/// returns it with the node's state.
pub(super) async fn join(s: ClusterSettings, local: &Path) -> Result<(Config, Node)> {
    let record = NodeRecord {
        node: s.node.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        started_unix: crate::status::unix_now(),
        ..Default::default()
    };
    let mut store = Store::start(s.etcd.clone(), s.name.clone(), record);
    let mut view = View {
        me: s.node.clone(),
        ..Default::default()
    };
    let mut refused = None;
    let mut waiting = tokio::time::interval(Duration::from_secs(5));
    waiting.tick().await;
    let fallback = tokio::time::sleep(WAIT_FOR_ETCD);
    tokio::pin!(fallback);
    let mut fell_back = false;
    loop {
        tokio::select! {
            () = &mut fallback, if !fell_back => {
                fell_back = true;
                if view.connected {
                    continue;
                }
                let Some((revision, text)) = cached(&s) else { continue };
                match effective(&s, revision, &text, local) {
                    Ok(c) => {
                        warn!(
                            "cluster {}: etcd not reached in {} s: starting with revision {revision}, the last applied ({})",
                            s.name,
                            WAIT_FOR_ETCD.as_secs(),
                            s.cache_path().display()
                        );
                        let node = Node { settings: s, store, view, doc: (revision, text), refused };
                        return Ok((c, node));
                    }
                    Err(e) => warn!("cluster {}: the cached config does not validate: {e}", s.name),
                }
            }
            ev = store.events.recv() => match ev.context("the etcd task ended")? {
                Event::Connected(c) => view.connected = c,
                Event::Members(m) => view.members = m,
                Event::Config { revision, text } => match effective(&s, revision, &text, local) {
                    Ok(c) => {
                        info!("cluster {}: config revision {revision} valid with {}", s.name, local.display());
                        save(&s, revision, &text);
                        let node = Node { settings: s, store, view, doc: (revision, text), refused };
                        return Ok((c, node));
                    }
                    Err(e) => {
                        error!("cluster {}: config revision {revision} refused: {e}", s.name);
                        let r = Refusal { revision, reason: e };
                        let mut rec = store.record();
                        rec.refused = Some(r.clone());
                        store.publish(rec);
                        refused = Some(r);
                    }
                },
            },
            _ = waiting.tick() => warn!(
                "cluster {}: waiting for a config that validates ({}; push one with `xnet config push`)",
                s.name,
                if view.connected { "etcd reached" } else { "etcd not reached yet" }
            ),
        }
    }
}

impl Agent {
    /// The config a SIGHUP reloads: the file, or in a cluster the document in force with
    /// the node's file as it is now.
    pub(super) fn load_config(&self) -> Result<Config, String> {
        match &self.cluster {
            None => Config::load(&self.path).map_err(|e| e.to_string()),
            Some(n) => effective(&n.settings, n.doc.0, &n.doc.1, &self.path),
        }
    }

    pub(super) async fn on_cluster(&mut self, ev: Event) {
        let Some(node) = &mut self.cluster else {
            return;
        };
        match ev {
            Event::Connected(c) => {
                node.view.connected = c;
                if c {
                    info!("cluster {}: etcd reached", node.settings.name);
                }
            }
            Event::Members(m) => {
                let (before, after): (Vec<_>, Vec<_>) = (
                    node.view.members.keys().cloned().collect(),
                    m.keys().cloned().collect(),
                );
                if before != after {
                    info!(
                        "cluster {}: live nodes {}",
                        node.settings.name,
                        after.join(", ")
                    );
                }
                node.view.members = m;
            }
            Event::Config { revision, text } => {
                if revision <= node.doc.0 {
                    return;
                }
                let name = node.settings.name.clone();
                let outcome = match effective(&node.settings, revision, &text, &self.path) {
                    Ok(c) => {
                        self.reload_with(c, &format!("config revision {revision}"))
                            .await
                    }
                    Err(e) => Err(e),
                };
                let node = self.cluster.as_mut().expect("checked");
                match outcome {
                    Ok(()) => {
                        info!("cluster {name}: config revision {revision} in force");
                        save(&node.settings, revision, &text);
                        node.doc = (revision, text);
                        node.refused = None;
                    }
                    Err(e) => {
                        error!("cluster {name}: config revision {revision} refused, revision {} stays in force: {e}", node.doc.0);
                        node.refused = Some(Refusal {
                            revision,
                            reason: e,
                        });
                    }
                }
            }
        }
        self.refresh_pools();
        self.publish_health();
    }

    /// Writes every service's pool again (the cluster's view changed).
    fn refresh_pools(&mut self) {
        for si in 0..self.config.services.len() {
            if let Err(e) = self.set_pool(si) {
                warn!("service {}: {e:#}", self.config.services[si].name);
            }
        }
    }

    /// Publishes this node's record: the config in force, its probes, its pools.
    pub(super) fn publish_health(&mut self) {
        let Some(node) = &self.cluster else { return };
        let mut health = BTreeMap::new();
        let mut pools = BTreeMap::new();
        for (si, svc) in self.config.services.iter().enumerate() {
            let seen: BTreeMap<String, bool> = svc
                .instances
                .iter()
                .zip(&self.health[si])
                .filter_map(|(i, h)| Some((i.name.clone(), h.up?)))
                .collect();
            health.insert(svc.name.clone(), seen);
            pools.insert(
                svc.name.clone(),
                self.pool(si).into_iter().map(|(n, _)| n).collect(),
            );
        }
        let mut r = node.store.record();
        r.applied_revision = node.doc.0;
        r.refused = node.refused.clone();
        r.health = health;
        r.pool = pools;
        node.store.publish(r);
    }
}
