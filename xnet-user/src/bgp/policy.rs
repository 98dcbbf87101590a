//! Per-neighbour import and export policy: prefix lists with ge/le, community match and
//! set, LOCAL_PREF and MED set, AS-path prepend.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::packet::{AsSegment, Attrs};

/// `prefix`, and more specifics of it with length in `ge..=le` (both default to the
/// prefix's own length, i.e. an exact match).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrefixMatch {
    pub prefix: IpNet,
    pub ge: Option<u8>,
    pub le: Option<u8>,
}

impl PrefixMatch {
    pub fn matches(&self, n: &IpNet) -> bool {
        let len = n.prefix_len();
        let ge = self.ge.unwrap_or(self.prefix.prefix_len());
        let le = self.le.unwrap_or(ge.max(self.prefix.prefix_len()));
        self.prefix.contains(n) && (ge..=le).contains(&len)
    }
}

/// A community as "ASN:VALUE".
pub fn parse_community(s: &str) -> Option<u32> {
    let (a, b) = s.split_once(':')?;
    Some((a.trim().parse::<u16>().ok()? as u32) << 16 | b.trim().parse::<u16>().ok()? as u32)
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Import {
    /// Accept only prefixes that match one of these (empty: accept all).
    pub prefixes: Vec<PrefixMatch>,
    /// Accept only routes carrying this community.
    pub community: Option<String>,
    pub local_pref: Option<u32>,
    pub med: Option<u32>,
    pub add_communities: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Export {
    /// Extra copies of our AS in front of the path (to make this path less preferred).
    pub prepend: u8,
    pub med: Option<u32>,
    pub add_communities: Vec<String>,
}

impl Import {
    /// The attributes to keep for `net`, or `None` to reject it.
    pub fn apply(&self, net: &IpNet, attrs: &Attrs) -> Option<Attrs> {
        if !self.prefixes.is_empty() && !self.prefixes.iter().any(|p| p.matches(net)) {
            return None;
        }
        if let Some(c) = self.community.as_deref().and_then(parse_community) {
            if !attrs.communities.contains(&c) {
                return None;
            }
        }
        let mut a = attrs.clone();
        if self.local_pref.is_some() {
            a.local_pref = self.local_pref;
        }
        if self.med.is_some() {
            a.med = self.med;
        }
        add(&mut a, &self.add_communities);
        Some(a)
    }

    pub fn is_identity(&self) -> bool {
        *self == Import::default()
    }
}

impl Export {
    pub fn apply(&self, local_asn: u32, attrs: &mut Attrs) {
        if self.prepend > 0 {
            let extra = vec![local_asn; self.prepend as usize];
            match attrs.as_path.first_mut() {
                Some(s) if s.kind == 2 && s.asns.len() + extra.len() < 255 => {
                    s.asns.splice(0..0, extra);
                }
                _ => attrs.as_path.insert(
                    0,
                    AsSegment {
                        kind: 2,
                        asns: extra,
                    },
                ),
            }
        }
        if self.med.is_some() {
            attrs.med = self.med;
        }
        add(attrs, &self.add_communities);
    }
}

fn add(a: &mut Attrs, communities: &[String]) {
    for c in communities.iter().filter_map(|c| parse_community(c)) {
        if !a.communities.contains(&c) {
            a.communities.push(c);
        }
    }
}

/// Checks a neighbour's policies; the error names the field.
pub fn validate(import: &Import, export: &Export) -> Result<(), (String, String)> {
    for (i, p) in import.prefixes.iter().enumerate() {
        let max = if p.prefix.addr().is_ipv4() { 32 } else { 128 };
        let ge = p.ge.unwrap_or(p.prefix.prefix_len());
        let le = p.le.unwrap_or(max.min(ge.max(p.prefix.prefix_len())));
        if ge < p.prefix.prefix_len() || le < ge || le > max {
            return Err((
                format!("import.prefixes[{i}]"),
                format!("needs {} ≤ ge ≤ le ≤ {max}", p.prefix.prefix_len()),
            ));
        }
    }
    for c in import
        .community
        .iter()
        .chain(&import.add_communities)
        .chain(&export.add_communities)
    {
        if parse_community(c).is_none() {
            return Err((
                "communities".into(),
                format!("{c:?} is not ASN:VALUE with 16-bit parts"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn prefix_lists_with_ge_le() {
        let exact = PrefixMatch {
            prefix: n("10.0.0.0/8"),
            ge: None,
            le: None,
        };
        assert!(exact.matches(&n("10.0.0.0/8")));
        assert!(!exact.matches(&n("10.1.0.0/16")));
        let range = PrefixMatch {
            prefix: n("10.0.0.0/8"),
            ge: Some(16),
            le: Some(24),
        };
        assert!(range.matches(&n("10.1.0.0/16")) && range.matches(&n("10.1.2.0/24")));
        assert!(
            !range.matches(&n("10.0.0.0/8"))
                && !range.matches(&n("10.1.2.0/25"))
                && !range.matches(&n("11.0.0.0/16"))
        );
        let upto = PrefixMatch {
            prefix: n("fd00::/16"),
            ge: None,
            le: Some(48),
        };
        assert!(
            upto.matches(&n("fd00::/16"))
                && upto.matches(&n("fd00:1::/48"))
                && !upto.matches(&n("fd00:1::/64"))
        );
    }

    #[test]
    fn import_sets_and_filters_export_prepends() {
        let imp = Import {
            community: Some("65010:1".into()),
            local_pref: Some(200),
            add_communities: vec!["65000:7".into()],
            ..Default::default()
        };
        let mut a = Attrs::default();
        assert_eq!(imp.apply(&n("10.0.0.0/8"), &a), None, "community required");
        a.communities.push(parse_community("65010:1").unwrap());
        let got = imp.apply(&n("10.0.0.0/8"), &a).unwrap();
        assert_eq!(got.local_pref, Some(200));
        assert_eq!(got.communities, vec![0xfdf2_0001, 0xfde8_0007]);
        let mut e = Attrs {
            as_path: vec![AsSegment {
                kind: 2,
                asns: vec![65010],
            }],
            ..Default::default()
        };
        Export {
            prepend: 2,
            med: Some(5),
            add_communities: vec![],
        }
        .apply(65000, &mut e);
        assert_eq!(e.as_path[0].asns, vec![65000, 65000, 65010]);
        assert_eq!(e.med, Some(5));
        assert!(validate(
            &Import {
                prefixes: vec![PrefixMatch {
                    prefix: n("10.0.0.0/8"),
                    ge: Some(4),
                    le: None
                }],
                ..Default::default()
            },
            &Export::default()
        )
        .is_err());
    }
}
