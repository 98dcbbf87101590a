//! `bfd = true` (300 ms × 3, as ExpressRoute and Direct Connect run it) or
//! `bfd = { interval_ms = …, multiplier = …, multihop = … }` on a BGP neighbour, a static
//! route's next hop or an IPsec connector.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::session::Timers;

pub const DEFAULT_INTERVAL_MS: u32 = 300;
pub const DEFAULT_MULTIPLIER: u8 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Bfd {
    /// Our desired transmit and required receive interval.
    pub interval_ms: u32,
    pub multiplier: u8,
    /// RFC 5883 (UDP 4784, no TTL check) instead of RFC 5881 (UDP 3784, TTL 255); default:
    /// multihop when the peer is not on one of our subnets.
    pub multihop: Option<bool>,
    /// IPsec connectors only: the peer's address inside the tunnel, and ours.
    pub peer: Option<std::net::IpAddr>,
    pub local: Option<std::net::IpAddr>,
}

impl Default for Bfd {
    fn default() -> Self {
        Bfd {
            interval_ms: DEFAULT_INTERVAL_MS,
            multiplier: DEFAULT_MULTIPLIER,
            multihop: None,
            peer: None,
            local: None,
        }
    }
}

impl Bfd {
    pub fn timers(&self) -> Timers {
        Timers {
            interval: Duration::from_millis(self.interval_ms as u64),
            multiplier: self.multiplier,
        }
    }

    /// The field's problem, if any (`field` names it in the message); `tunnel`: the
    /// setting of an IPsec connector, which names the peer inside the tunnel.
    pub fn validate(&self, field: &str, tunnel: bool) -> Result<(), (String, String)> {
        match (tunnel, self.peer) {
            (true, None) => {
                return Err((
                    format!("{field}.peer"),
                    "a connector's BFD needs the peer's address inside the tunnel".into(),
                ))
            }
            (false, Some(_)) => {
                return Err((
                    format!("{field}.peer"),
                    "only a connector's BFD names its peer (here it is the neighbour or next hop)"
                        .into(),
                ))
            }
            _ => {}
        }
        if !tunnel && self.local.is_some() {
            return Err((
                format!("{field}.local"),
                "only for a connector's BFD".into(),
            ));
        }
        if let (Some(p), Some(l)) = (self.peer, self.local) {
            if p.is_ipv4() != l.is_ipv4() {
                return Err((format!("{field}.local"), "not the family of peer".into()));
            }
        }
        // 10 ms: below that a 2-core host cannot keep the promise; 60 s: RFC 5880's
        // intervals are 32-bit microseconds, and beyond a minute BFD is pointless.
        if !(10..=60_000).contains(&self.interval_ms) {
            return Err((format!("{field}.interval_ms"), "must be 10 to 60000".into()));
        }
        if self.multiplier == 0 {
            return Err((format!("{field}.multiplier"), "must be 1 to 255".into()));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    #[serde(default = "interval")]
    interval_ms: u32,
    #[serde(default = "multiplier")]
    multiplier: u8,
    #[serde(default)]
    multihop: Option<bool>,
    #[serde(default)]
    peer: Option<std::net::IpAddr>,
    #[serde(default)]
    local: Option<std::net::IpAddr>,
}

fn interval() -> u32 {
    DEFAULT_INTERVAL_MS
}
fn multiplier() -> u8 {
    DEFAULT_MULTIPLIER
}

/// `Option<Bfd>` from `true`, `false` or a table: a field of type `Option<Bfd>` with
/// `#[serde(default, deserialize_with = "bfd::config::setting")]`.
pub fn setting<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Bfd>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Option<Bfd>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("true, false or { interval_ms, multiplier, multihop }")
        }
        fn visit_bool<E>(self, on: bool) -> Result<Self::Value, E> {
            Ok(on.then(Bfd::default))
        }
        // What serializing `None` gives (the running config as `xnet check --diff` reads it).
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<Self::Value, A::Error> {
            let t = Table::deserialize(serde::de::value::MapAccessDeserializer::new(m))?;
            Ok(Some(Bfd {
                interval_ms: t.interval_ms,
                multiplier: t.multiplier,
                multihop: t.multihop,
                peer: t.peer,
                local: t.local,
            }))
        }
    }
    d.deserialize_any(V)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct N {
        #[serde(default, deserialize_with = "setting")]
        bfd: Option<Bfd>,
    }

    fn parse(s: &str) -> Result<Option<Bfd>, String> {
        toml::from_str::<N>(s)
            .map(|n| n.bfd)
            .map_err(|e| e.message().to_string())
    }

    #[test]
    fn true_false_or_a_table() {
        assert_eq!(parse(""), Ok(None));
        assert_eq!(parse("bfd = false"), Ok(None));
        assert_eq!(parse("bfd = true"), Ok(Some(Bfd::default())));
        let b = parse("bfd = { interval_ms = 100, multiplier = 5, multihop = true }")
            .unwrap()
            .unwrap();
        assert_eq!(
            (b.interval_ms, b.multiplier, b.multihop),
            (100, 5, Some(true))
        );
        assert!(parse("bfd = { interval = 100 }")
            .unwrap_err()
            .contains("interval"));
        assert!(parse("bfd = 3").is_err());
        assert!(Bfd {
            interval_ms: 5,
            ..b
        }
        .validate("x", false)
        .is_err());
        assert!(Bfd { multiplier: 0, ..b }.validate("x", false).is_err());
        assert!(b.validate("x", false).is_ok());
        assert_eq!(b.validate("x", true).unwrap_err().0, "x.peer");
        let t = Bfd {
            peer: Some("169.254.21.1".parse().unwrap()),
            ..b
        };
        assert!(t.validate("x", true).is_ok());
        assert_eq!(t.validate("x", false).unwrap_err().0, "x.peer");
    }
}
