//! Per-neighbour import and export policy: prefix lists with ge/le, community match and
//! set, LOCAL_PREF and MED set, AS-path prepend, and ordered terms (a route-map: the first
//! term whose matches all hold decides, with AS-path, community and large-community
//! lists to match and set actions).

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

/// A large community (RFC 8092) as "GLOBAL:LOCAL1:LOCAL2".
pub fn parse_large_community(s: &str) -> Option<[u32; 3]> {
    let mut it = s.split(':').map(|p| p.trim().parse::<u32>().ok());
    let v = [it.next()??, it.next()??, it.next()??];
    it.next().is_none().then_some(v)
}

/// What a term does with the routes it matches.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Accept,
    Reject,
}

/// One term of a policy: every match given must hold (a list matches when any of its
/// entries does); then its sets apply and its action decides.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Term {
    pub action: Action,
    /// The prefix matches one of these.
    pub prefixes: Vec<PrefixMatch>,
    /// One of these ASes is anywhere in the AS_PATH.
    pub as_path_contains: Vec<u32>,
    /// The origin AS (last of the path) is one of these.
    pub origin_as: Vec<u32>,
    /// The neighbouring AS (first of the path) is one of these.
    pub neighbor_as: Vec<u32>,
    /// AS_PATH length (an AS_SET counts as one) at least / at most.
    pub as_path_len_min: Option<usize>,
    pub as_path_len_max: Option<usize>,
    /// The route carries one of these communities ("ASN:VALUE").
    pub communities: Vec<String>,
    /// The route carries one of these large communities ("G:L1:L2").
    pub large_communities: Vec<String>,
    pub set_local_pref: Option<u32>,
    pub set_med: Option<u32>,
    pub add_communities: Vec<String>,
    pub remove_communities: Vec<String>,
    pub add_large_communities: Vec<String>,
    pub remove_large_communities: Vec<String>,
    /// Copies of our AS put in front of the path (export).
    pub prepend: u8,
}

impl Term {
    fn matches(&self, net: &IpNet, a: &Attrs) -> bool {
        let asns = || a.as_path.iter().flat_map(|s| s.asns.iter().copied());
        (self.prefixes.is_empty() || self.prefixes.iter().any(|p| p.matches(net)))
            && (self.as_path_contains.is_empty()
                || asns().any(|x| self.as_path_contains.contains(&x)))
            && (self.origin_as.is_empty()
                || a.origin_as().is_some_and(|x| self.origin_as.contains(&x)))
            && (self.neighbor_as.is_empty()
                || a.first_as().is_some_and(|x| self.neighbor_as.contains(&x)))
            && self.as_path_len_min.is_none_or(|m| a.as_path_len() >= m)
            && self.as_path_len_max.is_none_or(|m| a.as_path_len() <= m)
            && (self.communities.is_empty()
                || self
                    .communities
                    .iter()
                    .filter_map(|c| parse_community(c))
                    .any(|c| a.communities.contains(&c)))
            && (self.large_communities.is_empty()
                || self
                    .large_communities
                    .iter()
                    .filter_map(|c| parse_large_community(c))
                    .any(|c| a.large_communities.contains(&c)))
    }

    fn set(&self, local_asn: u32, a: &mut Attrs) {
        if self.set_local_pref.is_some() {
            a.local_pref = self.set_local_pref;
        }
        if self.set_med.is_some() {
            a.med = self.set_med;
        }
        let rm: Vec<u32> = self
            .remove_communities
            .iter()
            .filter_map(|c| parse_community(c))
            .collect();
        a.communities.retain(|c| !rm.contains(c));
        add(a, &self.add_communities);
        let rm: Vec<[u32; 3]> = self
            .remove_large_communities
            .iter()
            .filter_map(|c| parse_large_community(c))
            .collect();
        a.large_communities.retain(|c| !rm.contains(c));
        for c in self
            .add_large_communities
            .iter()
            .filter_map(|c| parse_large_community(c))
        {
            if !a.large_communities.contains(&c) {
                a.large_communities.push(c);
            }
        }
        prepend(local_asn, self.prepend, a);
    }
}

/// Runs `terms` in order: the first that matches sets and decides; none: accepted.
fn run_terms(terms: &[Term], local_asn: u32, net: &IpNet, a: &mut Attrs) -> bool {
    match terms.iter().find(|t| t.matches(net, a)) {
        Some(t) => {
            t.set(local_asn, a);
            t.action == Action::Accept
        }
        None => true,
    }
}

fn prepend(local_asn: u32, n: u8, attrs: &mut Attrs) {
    if n == 0 {
        return;
    }
    let extra = vec![local_asn; n as usize];
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
    /// Then these, in order (see [`Term`]).
    pub terms: Vec<Term>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Export {
    /// Extra copies of our AS in front of the path (to make this path less preferred).
    pub prepend: u8,
    pub med: Option<u32>,
    pub add_communities: Vec<String>,
    /// Then these, in order (see [`Term`]).
    pub terms: Vec<Term>,
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
        // Prepend on import would put our own AS in the path: terms do not prepend here.
        run_terms(&self.terms, 0, net, &mut a).then_some(a)
    }

    pub fn is_identity(&self) -> bool {
        *self == Import::default()
    }
}

impl Export {
    /// Changes `attrs` for `net`; false: `net` is not sent.
    pub fn apply(&self, local_asn: u32, net: &IpNet, attrs: &mut Attrs) -> bool {
        prepend(local_asn, self.prepend, attrs);
        if self.med.is_some() {
            attrs.med = self.med;
        }
        add(attrs, &self.add_communities);
        run_terms(&self.terms, local_asn, net, attrs)
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
    for (side, terms) in [("import", &import.terms), ("export", &export.terms)] {
        for (k, t) in terms.iter().enumerate() {
            let f = |x: &str| format!("{side}.terms[{k}].{x}");
            for c in t
                .communities
                .iter()
                .chain(&t.add_communities)
                .chain(&t.remove_communities)
            {
                if parse_community(c).is_none() {
                    return Err((
                        f("communities"),
                        format!("{c:?} is not ASN:VALUE with 16-bit parts"),
                    ));
                }
            }
            for c in t
                .large_communities
                .iter()
                .chain(&t.add_large_communities)
                .chain(&t.remove_large_communities)
            {
                if parse_large_community(c).is_none() {
                    return Err((
                        f("large_communities"),
                        format!("{c:?} is not GLOBAL:LOCAL1:LOCAL2 with 32-bit parts"),
                    ));
                }
            }
            if side == "import" && t.prepend > 0 {
                return Err((f("prepend"), "prepend is an export action".into()));
            }
            if let (Some(lo), Some(hi)) = (t.as_path_len_min, t.as_path_len_max) {
                if lo > hi {
                    return Err((f("as_path_len_min"), "is above as_path_len_max".into()));
                }
            }
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
        assert!(Export {
            prepend: 2,
            med: Some(5),
            ..Default::default()
        }
        .apply(65000, &n("10.0.0.0/8"), &mut e));
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

    #[test]
    fn terms_match_as_path_and_community_lists_and_set() {
        let policy: Import = toml::from_str(
            r#"
            [[terms]]
            action = "reject"
            as_path_contains = [64666]
            [[terms]]
            origin_as = [65020]
            large_communities = ["65010:1:2"]
            set_local_pref = 300
            remove_communities = ["65010:9"]
            add_large_communities = ["65000:7:7"]
            [[terms]]
            neighbor_as = [65010]
            as_path_len_max = 2
            set_med = 7
            [[terms]]
            action = "reject"
            as_path_len_min = 4
            "#,
        )
        .unwrap();
        let attrs = |path: &[u32]| Attrs {
            as_path: vec![AsSegment {
                kind: 2,
                asns: path.to_vec(),
            }],
            communities: vec![parse_community("65010:9").unwrap()],
            ..Default::default()
        };
        let net = n("10.0.0.0/8");
        assert_eq!(policy.apply(&net, &attrs(&[65010, 64666, 65020])), None);
        // Origin 65020 without the large community: not term 2; path length 3: not 3.
        let got = policy.apply(&net, &attrs(&[65010, 65011, 65020])).unwrap();
        assert_eq!((got.local_pref, got.med), (None, None));
        let mut tagged = attrs(&[65010, 65011, 65020]);
        tagged.large_communities.push([65010, 1, 2]);
        let got = policy.apply(&net, &tagged).unwrap();
        assert_eq!(got.local_pref, Some(300));
        assert!(got.communities.is_empty());
        assert_eq!(got.large_communities, vec![[65010, 1, 2], [65000, 7, 7]]);
        let got = policy.apply(&net, &attrs(&[65010, 65030])).unwrap();
        assert_eq!(got.med, Some(7));
        assert_eq!(policy.apply(&net, &attrs(&[1, 2, 3, 4])), None);
        assert!(validate(&policy, &Export::default()).is_ok());
        let bad: Import = toml::from_str("[[terms]]\nlarge_communities = [\"1:2\"]").unwrap();
        assert_eq!(
            validate(&bad, &Export::default()).unwrap_err().0,
            "import.terms[0].large_communities"
        );
        // Export: a term can hold a prefix back and prepend for another.
        let export: Export = toml::from_str(
            "[[terms]]\naction = \"reject\"\nprefixes = [{ prefix = \"10.9.0.0/16\" }]\n[[terms]]\nprepend = 2",
        )
        .unwrap();
        let mut a = attrs(&[65010]);
        assert!(!export.apply(65000, &n("10.9.0.0/16"), &mut a.clone()));
        assert!(export.apply(65000, &n("10.1.0.0/16"), &mut a));
        assert_eq!(a.as_path[0].asns, vec![65000, 65000, 65010]);
    }
}
