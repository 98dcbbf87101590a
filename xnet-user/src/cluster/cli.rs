//! `xnet config push|get` and `xnet cluster status`: one-shot clients of the cluster's
//! keys in etcd.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{merge, store};
use crate::config::Config;

/// Validates `file` (with each node file in `locals`, or alone) and writes it if the
/// config is still at `revision` (default: the one read now).
pub async fn push(
    etcd: &[String],
    cluster: &str,
    file: &Path,
    locals: &[PathBuf],
    revision: Option<i64>,
) -> Result<()> {
    super::check_name(cluster).map_err(|e| anyhow::anyhow!("--cluster: {e}"))?;
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file).with_context(|| format!("{name}: cannot read"))?;
    if locals.is_empty() {
        Config::parse(&text, &name)?;
    }
    for l in locals {
        let local =
            std::fs::read_to_string(l).with_context(|| format!("{}: cannot read", l.display()))?;
        merge::config(&text, &name, &local, &l.display().to_string())?;
    }
    let mut client = store::connect(etcd).await?;
    let current = store::get_config(&mut client, cluster).await?;
    let now = current.as_ref().map_or(0, |(r, _)| *r);
    if let Some(expected) = revision {
        if expected != now {
            bail!("{}: at revision {now}, not {expected} as given: someone pushed since you read it; nothing written. Read it again (`xnet config get`), merge, push again", super::config_key(cluster));
        }
    }
    if current.as_ref().is_some_and(|(_, t)| *t == text) {
        println!(
            "{name}: already the config of cluster {cluster} (revision {now}): nothing written"
        );
        return Ok(());
    }
    let new = store::put_config(&mut client, cluster, &text, revision.unwrap_or(now)).await?;
    println!("{name}: pushed to cluster {cluster} as revision {new} (was {now})");
    Ok(())
}

pub async fn get(etcd: &[String], cluster: &str) -> Result<()> {
    let mut client = store::connect(etcd).await?;
    match store::get_config(&mut client, cluster).await? {
        Some((rev, text)) => {
            eprintln!("{}: revision {rev}", super::config_key(cluster));
            print!("{text}");
            Ok(())
        }
        None => bail!("cluster {cluster} has no config yet (`xnet config push`)"),
    }
}

pub async fn status(etcd: &[String], cluster: &str, json: bool) -> Result<()> {
    let mut client = store::connect(etcd).await?;
    let revision = store::get_config(&mut client, cluster)
        .await?
        .map_or(0, |(r, _)| r);
    let members = store::members(&mut client, cluster).await?;
    if json {
        let v = serde_json::json!({ "cluster": cluster, "config_revision": revision, "nodes": members });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print!("{}", render(cluster, revision, &members));
    Ok(())
}

/// The text `xnet cluster status` prints.
pub fn render(
    cluster: &str,
    revision: i64,
    members: &std::collections::BTreeMap<String, super::NodeRecord>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "cluster {cluster}: config revision {revision}, {} live nodes",
        members.len()
    );
    let _ = writeln!(
        s,
        "{:<16} {:<10} {:<9} {:<10} REFUSED",
        "NODE", "VERSION", "APPLIED", "UP (s)"
    );
    let now = crate::status::unix_now();
    for (n, r) in members {
        let applied = if r.applied_revision == revision {
            format!("{}", r.applied_revision)
        } else {
            format!("{} (behind)", r.applied_revision)
        };
        let refused = r
            .refused
            .as_ref()
            .map(|x| format!("revision {}: {}", x.revision, x.reason))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "{:<16} {:<10} {:<9} {:<10.0} {refused}",
            n,
            r.version,
            applied,
            (now - r.started_unix).max(0.0)
        );
    }
    let services: std::collections::BTreeSet<&String> =
        members.values().flat_map(|r| r.health.keys()).collect();
    for svc in services {
        let _ = writeln!(s, "service {svc}:");
        for (n, r) in members {
            let seen: Vec<String> = r
                .health
                .get(svc)
                .map(|h| {
                    h.iter()
                        .map(|(i, up)| format!("{i} {}", if *up { "up" } else { "down" }))
                        .collect()
                })
                .unwrap_or_default();
            let pool = r.pool.get(svc).map(|p| p.join(" ")).unwrap_or_default();
            let _ = writeln!(s, "  {n:<14} sees: {:<30} pool: {pool}", seen.join(", "));
        }
        let pools: std::collections::BTreeSet<_> =
            members.values().map(|r| r.pool.get(svc)).collect();
        if pools.len() > 1 {
            let _ = writeln!(
                s,
                "  the pools differ: a flow crossing two of these nodes may meet two instances (a node without etcd steers by its own probes)"
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{NodeRecord, Refusal};
    use std::collections::BTreeMap;

    fn node(name: &str, applied: i64, pool: &[&str]) -> (String, NodeRecord) {
        let mut r = NodeRecord {
            node: name.into(),
            version: "0.1.0".into(),
            applied_revision: applied,
            ..Default::default()
        };
        r.health.insert(
            "fw".into(),
            BTreeMap::from([("fw1".into(), true), ("fw2".into(), pool.contains(&"fw2"))]),
        );
        r.pool
            .insert("fw".into(), pool.iter().map(|s| s.to_string()).collect());
        (name.into(), r)
    }

    #[test]
    fn status_shows_revisions_refusals_views_and_disagreement() {
        let mut m: BTreeMap<String, NodeRecord> =
            [node("a", 7, &["fw1", "fw2"]), node("b", 6, &["fw1"])].into();
        m.get_mut("b").unwrap().refused = Some(Refusal {
            revision: 7,
            reason: "segments[0].table: invalid type".into(),
        });
        let s = render("eu", 7, &m);
        assert!(
            s.starts_with("cluster eu: config revision 7, 2 live nodes\n"),
            "{s}"
        );
        let b = s.lines().find(|l| l.starts_with("b ")).unwrap();
        assert!(
            b.contains("6 (behind)") && b.contains("revision 7: segments[0].table"),
            "{b}"
        );
        assert!(s.contains("sees: fw1 up, fw2 down"), "{s}");
        assert!(s.contains("the pools differ"), "{s}");
        m.insert("b".into(), node("b", 7, &["fw1", "fw2"]).1);
        assert!(!render("eu", 7, &m).contains("differ"));
    }
}
