//! What differs between two configs, section by section and item by item (by name), with
//! the fields that changed: what a reload applies and logs, and what `xnet check --diff`
//! prints against the running agent.

use std::fmt;

use serde::Serialize;
use serde_json::Value;

use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Added,
    Removed,
    Changed,
}

/// One item of a section that differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The config's section: "segments", "interfaces", "routes", "groups", "services",
    /// "policies", "bgp", "bgp.neighbors", "ipsec", "flows", "agent".
    pub section: &'static str,
    /// The item: its name (a route: "segment prefix"; a whole section: "").
    pub name: String,
    pub kind: Kind,
    /// Changed: the fields that differ.
    pub fields: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    pub changes: Vec<Change>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Whether anything of `section` differs.
    pub fn touches(&self, section: &str) -> bool {
        self.changes.iter().any(|c| c.section == section)
    }

    /// Items of `section` that differ in a given way.
    pub fn names(&self, section: &str, kind: Kind) -> Vec<&str> {
        self.changes
            .iter()
            .filter(|c| c.section == section && c.kind == kind)
            .map(|c| c.name.as_str())
            .collect()
    }

    /// Whether item `name` of `section` differs at all.
    pub fn has(&self, section: &str, name: &str) -> bool {
        self.changes
            .iter()
            .any(|c| c.section == section && c.name == name)
    }
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.changes.is_empty() {
            return writeln!(f, "no change");
        }
        for c in &self.changes {
            let sign = match c.kind {
                Kind::Added => '+',
                Kind::Removed => '-',
                Kind::Changed => '~',
            };
            let what = if c.name.is_empty() {
                c.section.to_string()
            } else {
                format!("{} {}", c.section, c.name)
            };
            if c.fields.is_empty() {
                writeln!(f, "{sign} {what}")?;
            } else {
                writeln!(f, "{sign} {what}: {}", c.fields.join(", "))?;
            }
        }
        Ok(())
    }
}

fn value<T: Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// The top-level fields in which two objects differ (all of them for non-objects).
fn fields(a: &Value, b: &Value, skip: &[&str]) -> Vec<String> {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .filter(|k| !skip.contains(&k.as_str()) && a.get(*k) != b.get(*k))
                .cloned()
                .collect()
        }
        _ if a != b => vec!["value".into()],
        _ => Vec::new(),
    }
}

/// Items matched by `key`: added, removed, changed (with fields).
fn items<T: Serialize>(
    section: &'static str,
    old: &[T],
    new: &[T],
    key: impl Fn(&T) -> String,
    out: &mut Vec<Change>,
) {
    for n in new {
        let k = key(n);
        match old.iter().find(|o| key(o) == k) {
            None => out.push(Change {
                section,
                name: k,
                kind: Kind::Added,
                fields: Vec::new(),
            }),
            Some(o) => {
                let f = fields(&value(o), &value(n), &[]);
                if !f.is_empty() {
                    out.push(Change {
                        section,
                        name: k,
                        kind: Kind::Changed,
                        fields: f,
                    });
                }
            }
        }
    }
    for o in old {
        let k = key(o);
        if !new.iter().any(|n| key(n) == k) {
            out.push(Change {
                section,
                name: k,
                kind: Kind::Removed,
                fields: Vec::new(),
            });
        }
    }
}

/// A whole section (an object or an optional one).
fn whole(section: &'static str, old: Value, new: Value, skip: &[&str], out: &mut Vec<Change>) {
    let kind = match (&old, &new) {
        (Value::Null, Value::Null) => return,
        (Value::Null, _) => Kind::Added,
        (_, Value::Null) => Kind::Removed,
        _ => Kind::Changed,
    };
    let f = if kind == Kind::Changed {
        fields(&old, &new, skip)
    } else {
        Vec::new()
    };
    if kind != Kind::Changed || !f.is_empty() {
        out.push(Change {
            section,
            name: String::new(),
            kind,
            fields: f,
        });
    }
}

/// What `new` changes against `old`.
pub fn diff(old: &Config, new: &Config) -> Diff {
    let mut c = Vec::new();
    whole("agent", value(&old.agent), value(&new.agent), &[], &mut c);
    items(
        "segments",
        &old.segments,
        &new.segments,
        |s| s.name.clone(),
        &mut c,
    );
    items(
        "interfaces",
        &old.interfaces,
        &new.interfaces,
        |i| i.name.clone(),
        &mut c,
    );
    items(
        "routes",
        &old.routes,
        &new.routes,
        |r| format!("{} {}", r.segment, r.prefix),
        &mut c,
    );
    items(
        "groups",
        &old.groups,
        &new.groups,
        |g| g.name.clone(),
        &mut c,
    );
    items(
        "services",
        &old.services,
        &new.services,
        |s| s.name.clone(),
        &mut c,
    );
    items(
        "policies",
        &old.policies,
        &new.policies,
        |p| p.name.clone(),
        &mut c,
    );
    // First match wins: the same rules in another order are another policy.
    let names = |c: &Config| {
        c.policies
            .iter()
            .map(|p| p.name.clone())
            .collect::<Vec<_>>()
    };
    let (mut a, mut b) = (names(old), names(new));
    a.retain(|n| b.contains(n));
    b.retain(|n| a.contains(n));
    if a != b {
        c.push(Change {
            section: "policies",
            name: String::new(),
            kind: Kind::Changed,
            fields: vec!["order".into()],
        });
    }
    whole(
        "bgp",
        value(&old.bgp),
        value(&new.bgp),
        &["neighbors"],
        &mut c,
    );
    let neighbors = |c: &Config| {
        c.bgp
            .as_ref()
            .map(|b| b.neighbors.clone())
            .unwrap_or_default()
    };
    items(
        "bgp.neighbors",
        &neighbors(old),
        &neighbors(new),
        |n| n.name.clone(),
        &mut c,
    );
    items("ipsec", &old.ipsec, &new.ipsec, |i| i.name.clone(), &mut c);
    whole("flows", value(&old.flows), value(&new.flows), &[], &mut c);
    Diff { changes: c }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let base = include_str!("../config/demo-lab.toml");
        toml::from_str(&format!("{base}\n{extra}")).unwrap()
    }

    #[test]
    fn items_are_matched_by_name_with_their_changed_fields() {
        let old = config("[[policies]]\nname = \"a\"\nsegment = \"prod\"\naction = \"deny\"\n[[policies]]\nname = \"b\"\nsegment = \"prod\"\naction = \"deny\"\n");
        let mut new = old.clone();
        new.segments[1].default_action = crate::config::DefaultAction::Deny;
        new.interfaces.pop();
        new.routes[0].next_hops[0].via = "10.0.1.3".parse().unwrap();
        new.policies.swap(0, 1);
        new.agent.neighbour_poll_ms = 100;
        let d = diff(&old, &new);
        assert_eq!(
            d.to_string(),
            "~ agent: neighbour_poll_ms\n\
             ~ segments dev: default_action\n\
             - interfaces vnet2\n\
             ~ routes prod 10.1.0.0/16: next_hops\n\
             ~ policies: order\n"
        );
        assert!(d.touches("segments") && !d.touches("bgp"));
        assert_eq!(d.names("interfaces", Kind::Removed), ["vnet2"]);
        assert!(diff(&old, &old).is_empty());
        assert_eq!(diff(&old, &old).to_string(), "no change\n");
    }

    #[test]
    fn the_running_config_survives_its_trip_through_the_status_socket() {
        let c = config(&format!(
            "{}\n[flows]\ncollectors = [\"192.0.2.1:4739\"]\n[[ipsec]]\nname = \"azure\"\nsegment = \"prod\"\nlocal_address = \"192.0.2.1\"\nremote_address = \"198.51.100.1\"\npsk_env = \"PSK\"\nlocal_ts = [\"0.0.0.0/0\"]\nremote_ts = [\"0.0.0.0/0\"]\nbfd = {{ peer = \"10.255.0.1\", interval_ms = 200 }}\n",
            "[bgp]\nasn = 65000\nrouter_id = \"10.0.3.1\"\n[[bgp.neighbors]]\nname = \"onprem\"\nsegment = \"prod\"\naddress = \"10.0.3.2\"\nremote_asn = 65010\nbfd = true\n[[bgp.neighbors]]\nname = \"other\"\nsegment = \"prod\"\naddress = \"10.0.3.3\"\nremote_asn = 65010\n"
        ));
        let json = serde_json::to_string(&c).unwrap();
        let back: Config = serde_json::from_str(&json).unwrap();
        assert!(diff(&c, &back).is_empty(), "{}", diff(&c, &back));
        assert_eq!(back, c);
    }

    #[test]
    fn sections_come_and_go_whole() {
        let old = config("");
        let new = config("[bgp]\nasn = 65000\nrouter_id = \"10.0.3.1\"\n[[bgp.neighbors]]\nname = \"onprem\"\nsegment = \"prod\"\naddress = \"10.0.3.2\"\nremote_asn = 65010\n");
        assert_eq!(
            diff(&old, &new).to_string(),
            "+ bgp\n+ bgp.neighbors onprem\n"
        );
        let mut asn = new.clone();
        asn.bgp.as_mut().unwrap().asn = 65001;
        assert_eq!(diff(&new, &asn).to_string(), "~ bgp: asn\n");
    }
}
