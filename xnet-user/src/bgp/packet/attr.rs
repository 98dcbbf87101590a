//! Path attributes and NLRI prefixes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{err, BgpError, Reader, ERR_UPDATE};

pub const AFI_IPV4: u16 = 1;
pub const AFI_IPV6: u16 = 2;
pub const SAFI_UNICAST: u8 = 1;

const F_OPTIONAL: u8 = 0x80;
const F_TRANSITIVE: u8 = 0x40;
const F_PARTIAL: u8 = 0x20;
const F_EXTENDED: u8 = 0x10;

pub const ATTR_ORIGIN: u8 = 1;
pub const ATTR_AS_PATH: u8 = 2;
pub const ATTR_NEXT_HOP: u8 = 3;
pub const ATTR_MED: u8 = 4;
pub const ATTR_LOCAL_PREF: u8 = 5;
pub const ATTR_ATOMIC_AGGREGATE: u8 = 6;
pub const ATTR_AGGREGATOR: u8 = 7;
pub const ATTR_COMMUNITIES: u8 = 8;
pub const ATTR_ORIGINATOR_ID: u8 = 9;
pub const ATTR_MP_REACH: u8 = 14;
pub const ATTR_MP_UNREACH: u8 = 15;
pub const ATTR_LARGE_COMMUNITIES: u8 = 32;

/// An AS_PATH segment: AS_SET (1) or AS_SEQUENCE (2).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AsSegment {
    pub kind: u8,
    pub asns: Vec<u32>,
}

/// The attributes of one UPDATE (shared by all its prefixes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Attrs {
    /// 0 IGP, 1 EGP, 2 INCOMPLETE.
    pub origin: u8,
    pub as_path: Vec<AsSegment>,
    /// IPv4 NEXT_HOP attribute.
    pub next_hop: Option<Ipv4Addr>,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub atomic_aggregate: bool,
    pub aggregator: Option<(u32, Ipv4Addr)>,
    pub communities: Vec<u32>,
    pub large_communities: Vec<[u32; 3]>,
    /// ORIGINATOR_ID (RFC 4456), set by a route reflector: read, never sent on (it is
    /// optional non-transitive, and xnet reflects nothing).
    pub originator_id: Option<Ipv4Addr>,
    /// Optional transitive attributes we do not know: passed on with the partial bit.
    pub unknown: Vec<(u8, u8, Vec<u8>)>,
}

impl Attrs {
    /// AS_PATH length for best-path selection (an AS_SET counts as one).
    pub fn as_path_len(&self) -> usize {
        self.as_path
            .iter()
            .map(|s| if s.kind == 1 { 1 } else { s.asns.len() })
            .sum()
    }

    /// The origin AS: the last of the last AS_SEQUENCE (none when the path ends in an
    /// AS_SET, whose origin is not one AS).
    pub fn origin_as(&self) -> Option<u32> {
        self.as_path
            .last()
            .filter(|s| s.kind == 2)
            .and_then(|s| s.asns.last().copied())
    }

    /// The neighbouring AS (first of the first AS_SEQUENCE).
    pub fn first_as(&self) -> Option<u32> {
        self.as_path
            .first()
            .filter(|s| s.kind == 2)
            .and_then(|s| s.asns.first().copied())
    }
}

/// Multiprotocol reach: next hop and prefixes of one AFI/SAFI.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MpReach {
    pub afi: u16,
    pub safi: u8,
    /// Global next hop (an IPv6 link-local second address is ignored).
    pub next_hop: Option<IpAddr>,
    pub nlri: Vec<IpNet>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MpUnreach {
    pub afi: u16,
    pub safi: u8,
    pub withdrawn: Vec<IpNet>,
}

/// Decodes prefixes of family `afi` until `r` is exhausted.
pub(crate) fn decode_prefixes(r: &mut Reader, afi: u16) -> Result<Vec<IpNet>, BgpError> {
    let max = if afi == AFI_IPV4 { 32 } else { 128 };
    let mut out = Vec::new();
    while r.left() > 0 {
        let len = r.u8()?;
        if len > max {
            return Err(err(ERR_UPDATE, 10, format!("prefix length {len} > {max}")));
        }
        let bytes = r.bytes(len.div_ceil(8) as usize)?;
        let mut a = [0u8; 16];
        a[..bytes.len()].copy_from_slice(bytes);
        let net = if afi == AFI_IPV4 {
            IpNet::V4(
                Ipv4Net::new(Ipv4Addr::new(a[0], a[1], a[2], a[3]), len)
                    .unwrap()
                    .trunc(),
            )
        } else {
            IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), len).unwrap().trunc())
        };
        out.push(net);
    }
    Ok(out)
}

pub fn encode_prefix(out: &mut Vec<u8>, net: &IpNet) {
    let len = net.prefix_len();
    out.push(len);
    let n = len.div_ceil(8) as usize;
    match net {
        IpNet::V4(v) => out.extend_from_slice(&v.network().octets()[..n]),
        IpNet::V6(v) => out.extend_from_slice(&v.network().octets()[..n]),
    }
}

/// Everything an UPDATE's path-attribute block carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecodedAttrs {
    pub attrs: Attrs,
    pub mp_reach: Option<MpReach>,
    pub mp_unreach: Option<MpUnreach>,
    /// RFC 7606 "treat-as-withdraw": an attribute was malformed in a way that spares the
    /// session; the UPDATE's prefixes are withdrawn instead of installed. The reason.
    pub treat_as_withdraw: Option<String>,
    /// Codes of the attributes present.
    pub present: Vec<u8>,
}

/// The Optional and Transitive bits a known attribute must carry (RFC 4271 §5; RFC 4760
/// §3-4 for the MP attributes, RFC 1997, RFC 8092), or None for one we do not know.
fn expected_flags(code: u8) -> Option<u8> {
    match code {
        ATTR_ORIGIN | ATTR_AS_PATH | ATTR_NEXT_HOP | ATTR_LOCAL_PREF | ATTR_ATOMIC_AGGREGATE => {
            Some(F_TRANSITIVE)
        }
        ATTR_MED | ATTR_MP_REACH | ATTR_MP_UNREACH | ATTR_ORIGINATOR_ID => Some(F_OPTIONAL),
        ATTR_AGGREGATOR | ATTR_COMMUNITIES | ATTR_LARGE_COMMUNITIES => {
            Some(F_OPTIONAL | F_TRANSITIVE)
        }
        _ => None,
    }
}

/// Decodes a path-attribute block. `four_octet`: AS numbers in AS_PATH/AGGREGATOR are 4
/// bytes (both sides announced RFC 6793). Errors that reset the session carry the
/// NOTIFICATION's data (the offending attribute where RFC 4271 §6.3 asks for it).
pub fn decode_attrs(buf: &[u8], four_octet: bool) -> Result<DecodedAttrs, BgpError> {
    let mut d = DecodedAttrs::default();
    let mut seen = [false; 256];
    let mut pos = 0;
    while pos < buf.len() {
        let start = pos;
        let rest = &buf[pos..];
        let extended = rest[0] & F_EXTENDED != 0;
        let hdr = if extended { 4 } else { 3 };
        if rest.len() < hdr {
            // RFC 7606 §4: too few octets left for an attribute header. The Total Path
            // Attribute Length still locates the NLRI: treat-as-withdraw.
            d.treat_as_withdraw.get_or_insert(format!(
                "{} octets left after the last attribute",
                rest.len()
            ));
            break;
        }
        let (flags, code) = (rest[0], rest[1]);
        let len = if extended {
            u16::from_be_bytes([rest[2], rest[3]]) as usize
        } else {
            rest[2] as usize
        };
        if rest.len() < hdr + len {
            let reason =
                format!("attribute {code}: length {len} runs past the Total Path Attribute Length");
            // An MP attribute we cannot read hides NLRI we cannot withdraw (RFC 7606 §5.3,
            // §7.11): only a reset is safe. Otherwise §4: treat-as-withdraw.
            if code == ATTR_MP_REACH || code == ATTR_MP_UNREACH {
                return Err(err(ERR_UPDATE, 5, reason).with_data(rest));
            }
            d.treat_as_withdraw.get_or_insert(reason);
            break;
        }
        let whole = &rest[..hdr + len];
        let value = &whole[hdr..];
        pos = start + hdr + len;
        if seen[code as usize] {
            // RFC 7606 §3(g): a repeated MP attribute resets the session; any other
            // repeat is discarded.
            if code == ATTR_MP_REACH || code == ATTR_MP_UNREACH {
                return Err(err(
                    ERR_UPDATE,
                    1,
                    format!("attribute {code} appears twice"),
                ));
            }
            continue;
        }
        seen[code as usize] = true;
        d.present.push(code);
        let parsed = match expected_flags(code) {
            // RFC 7606 §3(c): Optional/Transitive bits in conflict with the attribute's
            // definition make it malformed (RFC 4271 §6.3: Attribute Flags Error).
            Some(want) if flags & (F_OPTIONAL | F_TRANSITIVE) != want => Err(err(
                ERR_UPDATE,
                4,
                format!("attribute {code}: flags {flags:#04x}"),
            )),
            _ => parse_one(&mut d, flags, code, value, four_octet),
        };
        match parsed {
            Ok(()) => {}
            // Malformed path attributes that do not affect framing: treat-as-withdraw
            // (RFC 7606 §7.1-7.8), or discard the attribute (§7.6, §7.7).
            Err(e) => match code {
                ATTR_ORIGIN
                | ATTR_AS_PATH
                | ATTR_NEXT_HOP
                | ATTR_MED
                | ATTR_LOCAL_PREF
                | ATTR_COMMUNITIES
                | ATTR_LARGE_COMMUNITIES
                | ATTR_ORIGINATOR_ID => {
                    d.present.retain(|c| *c != code);
                    d.treat_as_withdraw.get_or_insert(e.reason);
                }
                ATTR_ATOMIC_AGGREGATE => {
                    d.attrs.atomic_aggregate = false;
                    d.present.retain(|c| *c != code);
                }
                ATTR_AGGREGATOR => {
                    d.attrs.aggregator = None;
                    d.present.retain(|c| *c != code);
                }
                // RFC 4271 §6.3: these subcodes show the peer the attribute itself.
                _ if matches!(e.subcode, 2 | 4 | 5 | 6 | 8 | 9) && e.data.is_empty() => {
                    return Err(e.with_data(whole))
                }
                _ => return Err(e),
            },
        }
    }
    Ok(d)
}

/// Parses one attribute's value into `d`.
fn parse_one(
    d: &mut DecodedAttrs,
    flags: u8,
    code: u8,
    value: &[u8],
    four_octet: bool,
) -> Result<(), BgpError> {
    let len = value.len();
    {
        let mut v = Reader::new(value, ERR_UPDATE, 5);
        let bad_len = || err(ERR_UPDATE, 5, format!("attribute {code}: bad length {len}"));
        match code {
            ATTR_ORIGIN => {
                if len != 1 {
                    return Err(bad_len());
                }
                let o = v.u8()?;
                if o > 2 {
                    return Err(err(ERR_UPDATE, 6, format!("ORIGIN {o}")));
                }
                d.attrs.origin = o;
            }
            ATTR_AS_PATH => {
                let w = if four_octet { 4 } else { 2 };
                while v.left() > 0 {
                    let kind = v.u8()?;
                    let n = v.u8()? as usize;
                    if !(1..=2).contains(&kind) {
                        return Err(err(ERR_UPDATE, 11, format!("AS_PATH segment type {kind}")));
                    }
                    // RFC 7606 §7.2: a segment of length 0 is malformed.
                    if n == 0 {
                        return Err(err(ERR_UPDATE, 11, "AS_PATH segment of length 0"));
                    }
                    let raw = v
                        .bytes(n * w)
                        .map_err(|_| err(ERR_UPDATE, 11, "AS_PATH segment overruns"))?;
                    let asns = raw
                        .chunks(w)
                        .map(|c| {
                            if w == 4 {
                                u32::from_be_bytes([c[0], c[1], c[2], c[3]])
                            } else {
                                u16::from_be_bytes([c[0], c[1]]) as u32
                            }
                        })
                        .collect();
                    d.attrs.as_path.push(AsSegment { kind, asns });
                }
            }
            ATTR_NEXT_HOP => {
                if len != 4 {
                    return Err(bad_len());
                }
                let b = v.bytes(4)?;
                d.attrs.next_hop = Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
            }
            ATTR_MED => {
                if len != 4 {
                    return Err(bad_len());
                }
                d.attrs.med = Some(v.u32()?);
            }
            ATTR_LOCAL_PREF => {
                if len != 4 {
                    return Err(bad_len());
                }
                d.attrs.local_pref = Some(v.u32()?);
            }
            ATTR_ATOMIC_AGGREGATE => d.attrs.atomic_aggregate = true,
            ATTR_ORIGINATOR_ID => {
                if len != 4 {
                    return Err(bad_len());
                }
                let b = v.bytes(4)?;
                d.attrs.originator_id = Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
            }
            ATTR_AGGREGATOR => {
                let asn = match len {
                    8 if four_octet => v.u32()?,
                    6 if !four_octet => v.u16()? as u32,
                    _ => return Err(bad_len()),
                };
                let b = v.bytes(4)?;
                d.attrs.aggregator = Some((asn, Ipv4Addr::new(b[0], b[1], b[2], b[3])));
            }
            ATTR_COMMUNITIES => {
                if !len.is_multiple_of(4) {
                    return Err(bad_len());
                }
                while v.left() > 0 {
                    d.attrs.communities.push(v.u32()?);
                }
            }
            ATTR_LARGE_COMMUNITIES => {
                if !len.is_multiple_of(12) {
                    return Err(bad_len());
                }
                while v.left() > 0 {
                    d.attrs
                        .large_communities
                        .push([v.u32()?, v.u32()?, v.u32()?]);
                }
            }
            ATTR_MP_REACH => {
                let afi = v.u16()?;
                let safi = v.u8()?;
                let nh_len = v.u8()? as usize;
                let nh = v.bytes(nh_len)?;
                let next_hop = match (afi, nh_len) {
                    (AFI_IPV4, 4) => Some(IpAddr::V4(Ipv4Addr::new(nh[0], nh[1], nh[2], nh[3]))),
                    (AFI_IPV6, 16 | 32) => {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(&nh[..16]);
                        Some(IpAddr::V6(Ipv6Addr::from(a)))
                    }
                    _ => {
                        return Err(err(
                            ERR_UPDATE,
                            9,
                            format!("MP_REACH next hop of {nh_len} bytes for AFI {afi}"),
                        ))
                    }
                };
                v.u8()?; // reserved
                let nlri = decode_prefixes(&mut v, afi)?;
                d.mp_reach = Some(MpReach {
                    afi,
                    safi,
                    next_hop,
                    nlri,
                });
            }
            ATTR_MP_UNREACH => {
                let afi = v.u16()?;
                let safi = v.u8()?;
                let withdrawn = decode_prefixes(&mut v, afi)?;
                d.mp_unreach = Some(MpUnreach {
                    afi,
                    safi,
                    withdrawn,
                });
            }
            _ if flags & F_OPTIONAL == 0 => {
                return Err(err(
                    ERR_UPDATE,
                    2,
                    format!("unrecognized well-known attribute {code}"),
                ));
            }
            _ if flags & F_TRANSITIVE != 0 => {
                d.attrs
                    .unknown
                    .push((flags | F_PARTIAL, code, value.to_vec()))
            }
            _ => {} // optional non-transitive and unknown: dropped quietly (RFC 4271 §5)
        }
    }
    Ok(())
}

fn push_attr(out: &mut Vec<u8>, flags: u8, code: u8, value: &[u8]) {
    if value.len() > 255 {
        out.extend_from_slice(&[flags | F_EXTENDED, code]);
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[flags, code, value.len() as u8]);
    }
    out.extend_from_slice(value);
}

/// Encodes `a`, with an MP_REACH when `mp` is given. `four_octet`: AS numbers as 4 bytes;
/// otherwise 2 bytes, with AS_TRANS standing in for larger ones (AS4_PATH is not sent).
pub fn encode_attrs(a: &Attrs, mp: Option<&MpReach>, four_octet: bool) -> Vec<u8> {
    let asn_bytes = |asn: u32| -> Vec<u8> {
        if four_octet {
            asn.to_be_bytes().to_vec()
        } else {
            let two = if asn > 65535 {
                super::AS_TRANS
            } else {
                asn as u16
            };
            two.to_be_bytes().to_vec()
        }
    };
    let mut out = Vec::new();
    // RFC 7606 §5.1: MP_REACH_NLRI SHALL be the very first attribute, so that a receiver
    // can find the NLRI to withdraw whatever else is wrong.
    if let Some(mp) = mp {
        let mut v = Vec::new();
        v.extend_from_slice(&mp.afi.to_be_bytes());
        v.push(mp.safi);
        match mp.next_hop {
            Some(IpAddr::V6(nh)) => {
                v.push(16);
                v.extend_from_slice(&nh.octets());
            }
            Some(IpAddr::V4(nh)) => {
                v.push(4);
                v.extend_from_slice(&nh.octets());
            }
            None => v.push(0),
        }
        v.push(0);
        for n in &mp.nlri {
            encode_prefix(&mut v, n);
        }
        push_attr(&mut out, F_OPTIONAL, ATTR_MP_REACH, &v);
    }
    push_attr(&mut out, F_TRANSITIVE, ATTR_ORIGIN, &[a.origin]);
    let mut path = Vec::new();
    for s in &a.as_path {
        path.push(s.kind);
        path.push(s.asns.len() as u8);
        for asn in &s.asns {
            path.extend(asn_bytes(*asn));
        }
    }
    push_attr(&mut out, F_TRANSITIVE, ATTR_AS_PATH, &path);
    if let Some(nh) = a.next_hop {
        push_attr(&mut out, F_TRANSITIVE, ATTR_NEXT_HOP, &nh.octets());
    }
    if let Some(m) = a.med {
        push_attr(&mut out, F_OPTIONAL, ATTR_MED, &m.to_be_bytes());
    }
    if let Some(lp) = a.local_pref {
        push_attr(&mut out, F_TRANSITIVE, ATTR_LOCAL_PREF, &lp.to_be_bytes());
    }
    if a.atomic_aggregate {
        push_attr(&mut out, F_TRANSITIVE, ATTR_ATOMIC_AGGREGATE, &[]);
    }
    if let Some((asn, ip)) = a.aggregator {
        let mut v = asn_bytes(asn);
        v.extend_from_slice(&ip.octets());
        push_attr(&mut out, F_OPTIONAL | F_TRANSITIVE, ATTR_AGGREGATOR, &v);
    }
    if !a.communities.is_empty() {
        let v: Vec<u8> = a.communities.iter().flat_map(|c| c.to_be_bytes()).collect();
        push_attr(&mut out, F_OPTIONAL | F_TRANSITIVE, ATTR_COMMUNITIES, &v);
    }
    if !a.large_communities.is_empty() {
        let v: Vec<u8> = a
            .large_communities
            .iter()
            .flatten()
            .flat_map(|c| c.to_be_bytes())
            .collect();
        push_attr(
            &mut out,
            F_OPTIONAL | F_TRANSITIVE,
            ATTR_LARGE_COMMUNITIES,
            &v,
        );
    }
    for (flags, code, value) in &a.unknown {
        push_attr(&mut out, *flags, *code, value);
    }
    out
}
