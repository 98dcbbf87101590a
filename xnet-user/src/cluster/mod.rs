//! A cluster of xnet nodes on etcd. The cluster's config is one document at
//! `/xnet/<cluster>/config`, written by `xnet config push` with a compare-and-swap; each
//! node merges it with its own small file (`merge`), applies each new revision as one
//! reload, and keeps `/xnet/<cluster>/nodes/<node>` under a lease with what it applied and
//! how it sees the firewall instances (`NodeRecord`). From the live nodes' records every
//! node computes the same pool per service (`view`), which the Maglev table spreads flows
//! over. `store` is the task that talks to etcd.

pub mod cli;
pub mod merge;
pub mod store;
pub mod view;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `[agent.cluster]` of a node's file, read alone: the rest of the file may be
/// incomplete without the cluster's document.
pub fn settings_in(
    path: &std::path::Path,
) -> anyhow::Result<Option<crate::config::ClusterSettings>> {
    use anyhow::Context;
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("{file}: cannot read"))?;
    let t: toml::Table = text.parse().with_context(|| file.clone())?;
    let Some(c) = t.get("agent").and_then(|a| a.get("cluster")) else {
        return Ok(None);
    };
    let c: crate::config::ClusterSettings = c
        .clone()
        .try_into()
        .with_context(|| format!("{file}: agent.cluster"))?;
    c.validate()
        .map_err(|(field, why)| anyhow::anyhow!("{file}: {field}: {why}"))?;
    Ok(Some(c))
}

/// The key of the cluster's config document.
pub fn config_key(cluster: &str) -> String {
    format!("/xnet/{cluster}/config")
}

/// The prefix of the nodes' keys.
pub fn nodes_prefix(cluster: &str) -> String {
    format!("/xnet/{cluster}/nodes/")
}

/// Everything of one cluster.
pub fn cluster_prefix(cluster: &str) -> String {
    format!("/xnet/{cluster}/")
}

/// A cluster or node name: one key segment.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("1 to 64 characters".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!(
            "{name:?}: only letters, digits, '-', '_' and '.' (it is a segment of an etcd key)"
        ));
    }
    Ok(())
}

/// A config revision a node would not apply, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    pub revision: i64,
    pub reason: String,
}

/// What a node publishes at `/xnet/<cluster>/nodes/<node>` (JSON, under its lease).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node: String,
    /// xnet's version on the node.
    pub version: String,
    pub started_unix: f64,
    /// The etcd revision of the config in force (its `mod_revision`).
    pub applied_revision: i64,
    /// The latest revision the node refused, if any since the one in force.
    pub refused: Option<Refusal>,
    /// Its own probes: service → instance → healthy (instances not probed yet are absent).
    pub health: BTreeMap<String, BTreeMap<String, bool>>,
    /// The pool it steers over: service → instances.
    pub pool: BTreeMap<String, Vec<String>>,
}
