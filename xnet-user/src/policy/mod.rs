//! Policies: validation against the rest of the config, and compilation into the XDP
//! program's tuple-space tables (layout in `xnet_common::policy`).

pub mod config;

use std::collections::{HashMap, HashSet};

use ipnet::IpNet;
use xnet_common::policy::{
    RuleKey, RuleValue, Tuple, ACTION_ALLOW, ACTION_DENY, ACTION_STEER, MAX_INSTANCES, MAX_RULES,
    MAX_TUPLES, STAY,
};

use config::{Action, Names, Policy, PortRange, Rules};

type Check = Result<(), (String, String)>;

/// Checks groups, services and policies: names exist, fields fit the action, steering
/// cannot loop, and no rule is made unreachable by an earlier one.
pub fn validate(c: &Rules, ctx: &dyn Names) -> Check {
    let err = |f: String, r: String| Err((f, r));
    let mut names = HashSet::new();
    for (i, g) in c.groups.iter().enumerate() {
        if !names.insert(&g.name) {
            return err(
                format!("groups[{i}].name"),
                format!("group {:?} is defined twice", g.name),
            );
        }
        if g.name.parse::<IpNet>().is_ok() {
            return err(
                format!("groups[{i}].name"),
                format!("{:?} looks like a prefix; name groups with words", g.name),
            );
        }
        if g.prefixes.is_empty() {
            return err(
                format!("groups[{i}].prefixes"),
                "a group needs at least one prefix".into(),
            );
        }
        for (j, p) in g.prefixes.iter().enumerate() {
            if p.trunc() != *p {
                return err(
                    format!("groups[{i}].prefixes[{j}]"),
                    format!("{p} has host bits set; did you mean {}?", p.trunc()),
                );
            }
        }
    }
    let mut snames = HashSet::new();
    for (i, s) in c.services.iter().enumerate() {
        let f = |sub: &str| format!("services[{i}].{sub}");
        if !snames.insert(&s.name) {
            return err(f("name"), format!("service {:?} is defined twice", s.name));
        }
        if s.instances.is_empty() || s.instances.len() > MAX_INSTANCES {
            return err(
                f("instances"),
                format!(
                    "needs 1 to {MAX_INSTANCES} instances, has {}",
                    s.instances.len()
                ),
            );
        }
        if s.health.kind == crate::health::HealthKind::Tcp && s.health.port.is_none() {
            return err(f("health.port"), "a tcp health check needs a port".into());
        }
        if !(50..=60_000).contains(&s.health.interval_ms)
            || s.health.threshold == 0
            || s.health.threshold > 100
        {
            return err(
                f("health"),
                "interval_ms must be 50-60000 and threshold 1-100".into(),
            );
        }
        let mut segment = None;
        for (j, inst) in s.instances.iter().enumerate() {
            let g = |sub: &str| format!("services[{i}].instances[{j}].{sub}");
            let Some((itf_segment, firewall)) = ctx.interface(&inst.interface) else {
                return err(
                    g("interface"),
                    format!("{:?} is not in [[interfaces]]", inst.interface),
                );
            };
            // Traffic back from a firewall must not be classified again, or it would be
            // steered in a loop: only firewall-facing ports may lead to instances.
            if !firewall {
                return err(g("interface"), format!("{:?} must have role = \"firewall\", or traffic coming back from the firewall would be steered again (a loop)", inst.interface));
            }
            if segment.is_some_and(|s| s != itf_segment) {
                return err(
                    g("interface"),
                    "all instances of a service must be in one segment".into(),
                );
            }
            segment = Some(itf_segment);
        }
    }
    let ends: Vec<Endpoints> = c
        .policies
        .iter()
        .map(|p| (c.endpoint(&p.source), c.endpoint(&p.destination)))
        .collect();
    for (i, p) in c.policies.iter().enumerate() {
        let f = |sub: &str| format!("policies[{i}].{sub}");
        if ctx.segment_id(&p.segment).is_none() {
            return err(f("segment"), format!("unknown segment {:?}", p.segment));
        }
        for (field, e) in [("source", &p.source), ("destination", &p.destination)] {
            if e.is_some() && c.endpoint(e).is_none() {
                return err(
                    f(field),
                    format!("{:?} is neither a prefix nor a group", e.as_ref().unwrap()),
                );
            }
            if let Some(nets) = c.endpoint(e) {
                if let Some(n) = nets.iter().find(|n| n.trunc() != **n) {
                    return err(f(field), format!("{n} has host bits set"));
                }
            }
        }
        if (p.source_ports.is_some() || p.destination_ports.is_some())
            && !matches!(p.protocol.map(|x| x.0), Some(6 | 17))
        {
            return err(
                f("protocol"),
                "ports need protocol = \"tcp\" or \"udp\"".into(),
            );
        }
        match (p.action, &p.service, &p.to_segment) {
            (Action::Steer, None, _) => {
                return err(f("service"), "action \"steer\" needs a service".into())
            }
            (Action::Steer, Some(s), _) => {
                let Some(svc) = c.services.iter().find(|x| &x.name == s) else {
                    return err(f("service"), format!("unknown service {s:?}"));
                };
                let (seg, _) = ctx
                    .interface(&svc.instances[0].interface)
                    .expect("checked above");
                if seg != p.segment {
                    return err(
                        f("service"),
                        format!(
                            "the instances of {s:?} are in segment {seg:?}, the policy in {:?}",
                            p.segment
                        ),
                    );
                }
            }
            (_, Some(_), _) => {
                return err(f("service"), "only action \"steer\" takes a service".into())
            }
            _ => {}
        }
        if let Some(t) = &p.to_segment {
            if p.action != Action::Allow {
                return err(
                    f("to_segment"),
                    "only action \"allow\" takes to_segment".into(),
                );
            }
            if ctx.segment_id(t).is_none() {
                return err(f("to_segment"), format!("unknown segment {t:?}"));
            }
        }
        if let Some(j) = (0..i).find(|&j| covers(c, &ends, j, i)) {
            return err(f("name"), format!("policy {:?} can never match: policies[{j}] ({:?}) matches all of its traffic first", p.name, c.policies[j].name));
        }
    }
    if c.policies.len() > MAX_RULES as usize {
        return err("policies".into(), format!("at most {MAX_RULES} rules"));
    }
    compile(c, ctx, &|_| (0, 0), &|_| 0)
        .map(|_| ())
        .map_err(|e| ("policies".into(), e))
}

/// A rule's endpoints, resolved once for the pairwise coverage check.
type Endpoints = (Option<Vec<IpNet>>, Option<Vec<IpNet>>);

/// Does rule `a` match everything rule `b` matches?
fn covers(c: &Rules, ends: &[Endpoints], a: usize, b: usize) -> bool {
    let (pa, pb) = (&c.policies[a], &c.policies[b]);
    let net_covers = |x: &Option<Vec<IpNet>>, y: &Option<Vec<IpNet>>| match (x, y) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(x), Some(y)) => y.iter().all(|n| x.iter().any(|m| m.contains(n))),
    };
    let ports = |x: Option<PortRange>, y: Option<PortRange>| match (x, y) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(x), Some(y)) => x.contains(&y),
    };
    pa.segment == pb.segment
        && (pa.protocol.is_none() || pa.protocol == pb.protocol)
        && ports(pa.source_ports, pb.source_ports)
        && ports(pa.destination_ports, pb.destination_ports)
        && net_covers(&ends[a].0, &ends[b].0)
        && net_covers(&ends[a].1, &ends[b].1)
}

/// An inclusive port range as the fewest (value, mask) prefixes that cover it exactly.
pub fn port_prefixes(r: Option<PortRange>) -> Vec<(u16, u16)> {
    let Some(r) = r else { return vec![(0, 0)] };
    let (mut lo, hi) = (r.first as u32, r.last as u32);
    let mut out = Vec::new();
    while lo <= hi {
        // The largest aligned block starting at lo that stays within hi.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, !((size - 1) as u16)));
        lo += size;
    }
    out
}

fn mask_words(len: u8, family: u8) -> [u32; 4] {
    xnet_common::policy::words(&mask_bytes(len, family))
}

fn mask_bytes(len: u8, family: u8) -> [u8; 16] {
    let mut m = [0u8; 16];
    let bits = if family == 4 {
        len.min(32)
    } else {
        len.min(128)
    } as usize;
    for (i, b) in m.iter_mut().enumerate() {
        let have = bits.saturating_sub(i * 8).min(8);
        *b = if have == 0 { 0 } else { 0xffu8 << (8 - have) };
    }
    m
}

fn addr_bytes(n: &IpNet) -> [u8; 16] {
    let mut a = [0u8; 16];
    match n {
        IpNet::V4(v) => a[..4].copy_from_slice(&v.network().octets()),
        IpNet::V6(v) => a = v.network().octets(),
    }
    a
}

/// A rule set ready for the data plane: tuples in search order and their entries, and
/// what the class cache needs (`xnet_common::policy`).
#[derive(Debug, Default)]
pub struct Compiled {
    pub tuples: Vec<Tuple>,
    /// Keys with `tuple` set to the tuple's index (without generation).
    pub entries: Vec<(RuleKey, RuleValue)>,
    /// The rules' source and destination prefixes (not "any"): each is an address class.
    pub prefixes: [HashSet<IpNet>; 2],
    /// Per port, its class as a source port and as a destination port (empty: all 0).
    pub port_classes: [Vec<u16>; 2],
}

/// The elementary intervals of `ranges` over the port space: port → class.
fn port_classes(ranges: &[PortRange]) -> Result<Vec<u16>, String> {
    if ranges.is_empty() {
        return Ok(Vec::new());
    }
    let mut starts = vec![false; 65_537];
    for r in ranges {
        starts[r.first as usize] = true;
        starts[r.last as usize + 1] = true;
    }
    let mut class = 0u32;
    let mut out = Vec::with_capacity(65_536);
    for (p, start) in starts.iter().take(65_536).enumerate() {
        if *start && p > 0 {
            class += 1;
        }
        out.push(class);
    }
    if class > u16::MAX as u32 {
        return Err(format!(
            "the policies' port ranges cut the port space into {class} classes, at most 65535"
        ));
    }
    Ok(out.into_iter().map(|c| c as u16).collect())
}

/// Compiles the policies. `roots(segment id)` gives a segment's table roots and
/// `service(name)` the service's id in the data plane.
pub fn compile(
    c: &Rules,
    names: &dyn Names,
    roots: &dyn Fn(u32) -> (u32, u32),
    service: &dyn Fn(&str) -> u32,
) -> Result<Compiled, String> {
    // Tuples by their masks; entries by (tuple, key), first (highest-priority) rule wins.
    type Masks = ([u32; 4], [u32; 4], u16, u16, u8);
    let mut tuple_ids: HashMap<Masks, usize> = HashMap::new();
    let mut tuples: Vec<Tuple> = Vec::new();
    let mut entries: HashMap<RuleKey, RuleValue> = HashMap::new();
    for (prio, p) in c.policies.iter().enumerate() {
        let segment = names.segment_id(&p.segment).expect("validated");
        let (to4, to6) = match &p.to_segment {
            Some(t) => roots(names.segment_id(t).expect("validated")),
            None => (STAY, STAY),
        };
        let value = RuleValue {
            rule: prio as u32,
            priority: prio as u32,
            action: match p.action {
                Action::Allow => ACTION_ALLOW,
                Action::Deny => ACTION_DENY,
                Action::Steer => ACTION_STEER,
            },
            _pad: [0; 3],
            service: p.service.as_deref().map(service).unwrap_or(0),
            to_v4_root: to4,
            to_v6_root: to6,
        };
        let any = |fam: u8| {
            if fam == 4 {
                "0.0.0.0/0".parse().unwrap()
            } else {
                "::/0".parse().unwrap()
            }
        };
        let src = c.endpoint(&p.source);
        let dst = c.endpoint(&p.destination);
        let (proto, proto_mask) = p.protocol.map(|x| (x.0, 0xff)).unwrap_or((0, 0));
        for fam in [4u8, 6] {
            let side = |e: &Option<Vec<IpNet>>| -> Vec<(IpNet, u8)> {
                match e {
                    None => vec![(any(fam), 0)],
                    Some(v) => v
                        .iter()
                        .filter(|n| (fam == 4) == matches!(n, IpNet::V4(_)))
                        .map(|n| (*n, n.prefix_len()))
                        .collect(),
                }
            };
            for (s, slen) in side(&src) {
                for (d, dlen) in side(&dst) {
                    for (sp, spm) in port_prefixes(p.source_ports) {
                        for (dp, dpm) in port_prefixes(p.destination_ports) {
                            let masks: Masks = (
                                mask_words(slen, fam),
                                mask_words(dlen, fam),
                                spm,
                                dpm,
                                proto_mask,
                            );
                            let t = *tuple_ids.entry(masks).or_insert_with(|| {
                                tuples.push(Tuple {
                                    src_mask: masks.0,
                                    dst_mask: masks.1,
                                    sport_mask: spm,
                                    dport_mask: dpm,
                                    proto_mask,
                                    _pad: [0; 3],
                                    best_priority: u32::MAX,
                                });
                                tuples.len() - 1
                            });
                            tuples[t].best_priority = tuples[t].best_priority.min(prio as u32);
                            let key = RuleKey {
                                tuple: t as u16,
                                segment: segment as u16,
                                family: fam,
                                proto,
                                sport: sp,
                                dport: dp,
                                matched: 0,
                                src: xnet_common::policy::words(&addr_bytes(&s)),
                                dst: xnet_common::policy::words(&addr_bytes(&d)),
                            };
                            entries.entry(key).or_insert(value);
                        }
                    }
                }
            }
        }
    }
    if tuples.len() > MAX_TUPLES as usize {
        return Err(format!(
            "the policies need {} distinct match shapes (prefix lengths × port ranges), the data plane takes {MAX_TUPLES}; use fewer distinct prefix lengths or port ranges",
            tuples.len()
        ));
    }
    if entries.len() > (xnet_common::policy::MAX_ENTRIES / 2) as usize {
        return Err(format!(
            "the policies expand to {} entries, at most {}",
            entries.len(),
            xnet_common::policy::MAX_ENTRIES / 2
        ));
    }
    // Search order: best priority first, so the search can stop early.
    let mut order: Vec<usize> = (0..tuples.len()).collect();
    order.sort_by_key(|&i| tuples[i].best_priority);
    let mut new_index = vec![0u16; tuples.len()];
    for (new, &old) in order.iter().enumerate() {
        new_index[old] = new as u16;
    }
    let entries = entries
        .into_iter()
        .map(|(mut key, v)| {
            key.tuple = new_index[key.tuple as usize];
            (key, v)
        })
        .collect();
    let tuples = order.into_iter().map(|i| tuples[i]).collect();
    let mut prefixes: [HashSet<IpNet>; 2] = Default::default();
    for p in c.policies {
        for (i, e) in [&p.source, &p.destination].into_iter().enumerate() {
            prefixes[i].extend(
                c.endpoint(e)
                    .into_iter()
                    .flatten()
                    .filter(|n| n.prefix_len() > 0)
                    .map(|n| n.trunc()),
            );
        }
    }
    let ranges =
        |f: fn(&Policy) -> Option<PortRange>| c.policies.iter().filter_map(f).collect::<Vec<_>>();
    let port_classes = [
        port_classes(&ranges(|p| p.source_ports))?,
        port_classes(&ranges(|p| p.destination_ports))?,
    ];
    Ok(Compiled {
        tuples,
        entries,
        prefixes,
        port_classes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_classes_split_at_every_range_edge() {
        let r = |first, last| PortRange { first, last };
        assert!(port_classes(&[]).unwrap().is_empty());
        let c = port_classes(&[r(1000, 2000), r(1500, 1500), r(65535, 65535)]).unwrap();
        assert_eq!(c.len(), 65_536);
        let class = |p: usize| c[p];
        // Edges: 0..999 | 1000..1499 | 1500 | 1501..2000 | 2001..65534 | 65535.
        let reps = [0, 999, 1000, 1499, 1500, 1501, 2000, 2001, 65534, 65535];
        let want = [0, 0, 1, 1, 2, 3, 3, 4, 4, 5];
        for (p, w) in reps.iter().zip(want) {
            assert_eq!(class(*p), w, "port {p}");
        }
    }

    #[test]
    fn port_ranges_become_exact_prefix_sets() {
        let r = |a, b| Some(PortRange { first: a, last: b });
        assert_eq!(port_prefixes(None), vec![(0, 0)]);
        assert_eq!(port_prefixes(r(443, 443)), vec![(443, 0xffff)]);
        assert_eq!(port_prefixes(r(1024, 65535)).len(), 6);
        assert_eq!(port_prefixes(r(0, 65535)), vec![(0, 0)]);
        // Every port inside, none outside.
        for (a, b) in [(1000, 2000), (1, 7), (5000, 5003), (65535, 65535)] {
            let set = port_prefixes(r(a, b));
            for port in 0..=65535u16 {
                let hit = set.iter().any(|(v, m)| port & m == *v);
                assert_eq!(hit, (a..=b).contains(&port), "{a}-{b}: port {port}");
            }
        }
    }
}

#[cfg(test)]
mod validation_tests {
    use crate::config::Config;

    const BASE: &str = r#"
[[segments]]
name = "prod"
table = 100

[[interfaces]]
name = "eth1"
segment = "prod"

[[interfaces]]
name = "fw0"
segment = "prod"
role = "firewall"

[[groups]]
name = "vnet"
prefixes = ["10.1.0.0/16"]

[[services]]
name = "fw"
failure_mode = "open"
instances = [{ name = "fw1", interface = "fw0", via = "10.0.9.1" }]
"#;

    fn check(policies: &str) -> Result<Config, String> {
        Config::parse(&format!("{BASE}\n{policies}"), "p.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn a_rule_covered_by_an_earlier_one_is_rejected() {
        let e = check(
            "[[policies]]\nname = \"all-vnet\"\nsegment = \"prod\"\nsource = \"vnet\"\naction = \"deny\"\n\
             [[policies]]\nname = \"vnet-web\"\nsegment = \"prod\"\nsource = \"10.1.2.0/24\"\nprotocol = \"tcp\"\ndestination_ports = 443\naction = \"allow\"\n",
        )
        .unwrap_err();
        assert_eq!(e, "p.toml: policies[1].name: policy \"vnet-web\" can never match: policies[0] (\"all-vnet\") matches all of its traffic first");
        // The other order is fine: the specific rule first.
        check(
            "[[policies]]\nname = \"vnet-web\"\nsegment = \"prod\"\nsource = \"10.1.2.0/24\"\nprotocol = \"tcp\"\ndestination_ports = 443\naction = \"allow\"\n\
             [[policies]]\nname = \"all-vnet\"\nsegment = \"prod\"\nsource = \"vnet\"\naction = \"deny\"\n",
        )
        .unwrap();
    }

    #[test]
    fn unknown_names_and_misfit_fields_are_rejected() {
        let p = |body: &str| {
            check(&format!(
                "[[policies]]\nname = \"x\"\nsegment = \"prod\"\n{body}\n"
            ))
            .unwrap_err()
        };
        assert!(p("source = \"nets\"\naction = \"allow\"")
            .contains("policies[0].source: \"nets\" is neither a prefix nor a group"));
        assert!(p("action = \"steer\"")
            .contains("policies[0].service: action \"steer\" needs a service"));
        assert!(p("action = \"steer\"\nservice = \"nope\"").contains("unknown service \"nope\""));
        assert!(p("action = \"deny\"\nservice = \"fw\"")
            .contains("only action \"steer\" takes a service"));
        assert!(p("action = \"allow\"\ndestination_ports = 80").contains("ports need protocol"));
        assert!(p("action = \"allow\"\nto_segment = \"dev\"").contains("unknown segment \"dev\""));
        assert!(p("action = \"allow\"\nprotocol = \"sctp\"").contains("unknown protocol \"sctp\""));
    }

    #[test]
    fn steering_to_a_non_firewall_port_is_a_loop() {
        let cfg = BASE.replace("interface = \"fw0\"", "interface = \"eth1\"");
        let e = Config::parse(&cfg, "p.toml").unwrap_err().to_string();
        assert!(
            e.contains(
                "services[0].instances[0].interface: \"eth1\" must have role = \"firewall\""
            ),
            "{e}"
        );
    }
}
