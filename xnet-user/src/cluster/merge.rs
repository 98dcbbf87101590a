//! The config a node runs: the cluster's document with the node's own file over it.
//! Tables merge key by key; an array of tables whose items all have a `name` merges item
//! by item (same name: merged; new name: added), so a node can give its own `via` of an
//! instance or `local_address` of a neighbour; any other value in the node's file replaces
//! the cluster's.

use toml::{Table, Value};

use crate::config::{Config, ConfigError};

/// The running config from the cluster's document `cluster` (named `cluster_name` in
/// errors) and the node's file `local` (named `local_name`).
pub fn config(
    cluster: &str,
    cluster_name: &str,
    local: &str,
    local_name: &str,
) -> Result<Config, ConfigError> {
    let mut base = parse(cluster, cluster_name)?;
    merge_tables(&mut base, parse(local, local_name)?);
    let merged = toml::to_string(&base).map_err(|e| ConfigError {
        file: cluster_name.into(),
        field: "-".into(),
        reason: e.to_string(),
    })?;
    Config::parse(&merged, &format!("{cluster_name} with {local_name}"))
}

/// Parses `text` as TOML (syntax only; `Config::parse` validates).
fn parse(text: &str, file: &str) -> Result<Table, ConfigError> {
    text.parse::<Table>().map_err(|e| ConfigError {
        file: file.into(),
        field: match e.span() {
            Some(s) => format!("line {}", text[..s.start].matches('\n').count() + 1),
            None => "-".into(),
        },
        reason: e.message().to_string(),
    })
}

fn merge_tables(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge_tables(b, o),
            (Some(Value::Array(b)), Value::Array(o)) if named(b) && named(&o) => merge_named(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Every item a table with a string `name`.
fn named(items: &[Value]) -> bool {
    items
        .iter()
        .all(|v| matches!(v.get("name"), Some(Value::String(_))))
}

fn merge_named(base: &mut Vec<Value>, over: Vec<Value>) {
    for item in over {
        let name = item.get("name").cloned();
        match base.iter_mut().find(|b| b.get("name") == name.as_ref()) {
            Some(Value::Table(b)) => {
                if let Value::Table(o) = item {
                    merge_tables(b, o);
                }
            }
            _ => base.push(item),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = r#"
[[segments]]
name = "prod"
table = 100

[[interfaces]]
name = "fw1"
segment = "prod"
role = "firewall"

[[services]]
name = "fw"
failure_mode = "closed"
health = { kind = "icmp", interval_ms = 200, threshold = 2 }
instances = [ { name = "fw1", interface = "fw1", via = "10.0.11.2" } ]

[[routes]]
segment = "prod"
prefix = "10.9.0.0/16"
next_hops = [ { interface = "fw1", via = "10.0.11.2" } ]
"#;

    #[test]
    fn the_nodes_file_overrides_by_key_and_by_name() {
        let local = r#"
[agent]
socket = "/run/xnet/b.sock"

[[services]]
name = "fw"
instances = [ { name = "fw1", via = "10.0.21.2" } ]

[[routes]]
segment = "prod"
prefix = "10.8.0.0/16"
next_hops = [ { interface = "fw1", via = "10.0.21.2" } ]
"#;
        let c = config(CLUSTER, "etcd", local, "b.toml").unwrap();
        assert_eq!(c.agent.socket.to_str(), Some("/run/xnet/b.sock"));
        // Named items merge: the instance keeps its interface, takes the node's via.
        let i = &c.services[0].instances[0];
        assert_eq!(
            (i.interface.as_str(), i.via.to_string()),
            ("fw1", "10.0.21.2".into())
        );
        // Unnamed items (routes) are replaced as a whole.
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.routes[0].prefix.to_string(), "10.8.0.0/16");
        assert_eq!(c.segments[0].table, 100, "untouched sections stay");
    }

    #[test]
    fn errors_name_the_document_and_the_field() {
        let e = config("[[segments]\n", "etcd /xnet/c/config@7", "", "b.toml").unwrap_err();
        assert_eq!(e.file, "etcd /xnet/c/config@7");
        assert_eq!(e.field, "line 1");
        let e = config(CLUSTER, "etcd", "[agent]\nsockett = 1\n", "b.toml").unwrap_err();
        assert!(e.file.contains("b.toml"), "{e}");
        assert!(e.reason.contains("sockett"), "{e}");
    }
}
