//! BGP messages: header, OPEN with capabilities, UPDATE, NOTIFICATION, KEEPALIVE,
//! ROUTE-REFRESH.

use std::net::Ipv4Addr;

use ipnet::IpNet;

use super::attr::*;
use super::{err, BgpError, Reader, ERR_HEADER, ERR_OPEN, ERR_UPDATE};

pub const HEADER_LEN: usize = 19;
pub const MAX_LEN: usize = 4096;
/// With the extended-message capability (RFC 8654).
pub const MAX_LEN_EXTENDED: usize = 65535;
/// AS_TRANS (RFC 6793): the 2-octet stand-in for a 4-octet AS.
pub const AS_TRANS: u16 = 23456;

pub const CAP_MP: u8 = 1;
pub const CAP_ROUTE_REFRESH: u8 = 2;
pub const CAP_EXTENDED_MESSAGE: u8 = 6;
pub const CAP_GRACEFUL_RESTART: u8 = 64;
pub const CAP_FOUR_OCTET_AS: u8 = 65;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub asn: u32,
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    /// (AFI, SAFI) pairs announced with the multiprotocol capability.
    pub families: Vec<(u16, u8)>,
    pub four_octet: bool,
    pub route_refresh: bool,
    pub extended_message: bool,
    pub graceful_restart: Option<GracefulRestart>,
}

/// The graceful-restart capability (RFC 4724 §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GracefulRestart {
    /// R bit: the sender has just restarted (the receiver must not wait for its
    /// End-of-RIB before sending its own routes).
    pub restarting: bool,
    /// Seconds the receiver should keep the sender's routes after the session drops.
    pub restart_time: u16,
    /// (AFI, SAFI, F bit: forwarding state kept across the restart).
    pub families: Vec<(u16, u8, bool)>,
}

impl GracefulRestart {
    fn encode(&self) -> Vec<u8> {
        let flags = if self.restarting { 0x8000 } else { 0 };
        let mut v = (flags | (self.restart_time & 0x0fff))
            .to_be_bytes()
            .to_vec();
        for (afi, safi, f) in &self.families {
            v.extend_from_slice(&afi.to_be_bytes());
            v.extend_from_slice(&[*safi, if *f { 0x80 } else { 0 }]);
        }
        v
    }

    /// None for a capability too short to hold its flags; a trailing partial family is
    /// ignored rather than failing the OPEN (the capability is advisory).
    fn decode(v: &[u8]) -> Option<Self> {
        let head = u16::from_be_bytes([*v.first()?, *v.get(1)?]);
        Some(Self {
            restarting: head & 0x8000 != 0,
            restart_time: head & 0x0fff,
            families: v[2..]
                .as_chunks::<4>()
                .0
                .iter()
                .map(|c| (u16::from_be_bytes([c[0], c[1]]), c[2], c[3] & 0x80 != 0))
                .collect(),
        })
    }

    /// Whether the sender kept its forwarding state for this family.
    pub fn forwarding(&self, afi: u16, safi: u8) -> bool {
        self.families.contains(&(afi, safi, true))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    pub withdrawn: Vec<IpNet>,
    pub attrs: Option<Attrs>,
    /// IPv4 prefixes in the NLRI field (next hop: `attrs.next_hop`).
    pub nlri: Vec<IpNet>,
    pub mp_reach: Option<MpReach>,
    pub mp_unreach: Option<MpUnreach>,
    /// Set when RFC 7606 turned this UPDATE's announcements into withdrawals: why.
    pub treat_as_withdraw: Option<String>,
    /// The End-of-RIB marker for this (AFI, SAFI) (RFC 4724 §2): an UPDATE with nothing in
    /// it (IPv4 unicast), or with only an empty MP_UNREACH_NLRI.
    pub end_of_rib: Option<(u16, u8)>,
}

// Messages live only from the socket to the agent; boxing would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Update(Update),
    Notification {
        code: u8,
        subcode: u8,
        data: Vec<u8>,
    },
    Keepalive,
    RouteRefresh {
        afi: u16,
        safi: u8,
    },
}

/// The total length a header announces, checked. `buf` holds at least the 19 header bytes.
pub fn frame_len(buf: &[u8], max: usize) -> Result<usize, BgpError> {
    if buf[..16].iter().any(|&b| b != 0xff) {
        return Err(err(ERR_HEADER, 1, "marker is not all ones"));
    }
    let len = u16::from_be_bytes([buf[16], buf[17]]) as usize;
    if !(HEADER_LEN..=max).contains(&len) {
        // RFC 4271 §6.1: the Data field holds the erroneous Length field.
        return Err(err(ERR_HEADER, 2, format!("message length {len}")).with_data(&buf[16..18]));
    }
    Ok(len)
}

/// Decodes one whole message (header included). `four_octet`: the session negotiated
/// 4-octet AS numbers.
pub fn decode(buf: &[u8], four_octet: bool, max: usize) -> Result<Message, BgpError> {
    if buf.len() < HEADER_LEN {
        return Err(err(ERR_HEADER, 2, "shorter than a header"));
    }
    let len = frame_len(buf, max)?;
    if len != buf.len() {
        return Err(err(
            ERR_HEADER,
            2,
            format!("length {len} but {} bytes", buf.len()),
        )
        .with_data(&buf[16..18]));
    }
    let body = &buf[HEADER_LEN..];
    let kind = buf[18];
    let mut r = Reader::new(body, ERR_HEADER, 2);
    match kind {
        1 => decode_open(body).map(Message::Open),
        2 => decode_update(body, four_octet).map(Message::Update),
        3 => {
            let code = r.u8()?;
            let subcode = r.u8()?;
            Ok(Message::Notification {
                code,
                subcode,
                data: body[2..].to_vec(),
            })
        }
        4 if body.is_empty() => Ok(Message::Keepalive),
        4 => Err(err(ERR_HEADER, 2, "KEEPALIVE with a body").with_data(&buf[16..18])),
        5 => {
            let afi = r.u16()?;
            r.u8()?;
            let safi = r.u8()?;
            Ok(Message::RouteRefresh { afi, safi })
        }
        // §6.1: the Data field holds the erroneous Type field.
        t => Err(err(ERR_HEADER, 3, format!("message type {t}")).with_data(&[t])),
    }
}

fn decode_open(body: &[u8]) -> Result<Open, BgpError> {
    let mut r = Reader::new(body, ERR_OPEN, 0);
    let version = r.u8()?;
    if version != 4 {
        // §6.2: the Data field holds the largest version we support.
        return Err(err(ERR_OPEN, 1, format!("version {version}")).with_data(&4u16.to_be_bytes()));
    }
    let my_as = r.u16()?;
    let hold_time = r.u16()?;
    if hold_time == 1 || hold_time == 2 {
        return Err(err(ERR_OPEN, 6, format!("hold time {hold_time}")));
    }
    let id = r.bytes(4)?;
    let router_id = Ipv4Addr::new(id[0], id[1], id[2], id[3]);
    if router_id.is_unspecified() {
        return Err(err(ERR_OPEN, 3, "BGP identifier 0.0.0.0"));
    }
    let opt_len = r.u8()? as usize;
    let opts = r.bytes(opt_len)?;
    let mut o = Open {
        asn: my_as as u32,
        hold_time,
        router_id,
        families: Vec::new(),
        four_octet: false,
        route_refresh: false,
        extended_message: false,
        graceful_restart: None,
    };
    let mut p = Reader::new(opts, ERR_OPEN, 0);
    while p.left() > 0 {
        let ptype = p.u8()?;
        let plen = p.u8()? as usize;
        let pval = p.bytes(plen)?;
        if ptype != 2 {
            return Err(err(ERR_OPEN, 4, format!("optional parameter {ptype}")));
        }
        let mut c = Reader::new(pval, ERR_OPEN, 0);
        while c.left() > 0 {
            let code = c.u8()?;
            let clen = c.u8()? as usize;
            let cval = c.bytes(clen)?;
            let mut v = Reader::new(cval, ERR_OPEN, 0);
            match code {
                CAP_MP if clen == 4 => {
                    let afi = v.u16()?;
                    v.u8()?;
                    o.families.push((afi, v.u8()?));
                }
                CAP_FOUR_OCTET_AS if clen == 4 => {
                    o.four_octet = true;
                    o.asn = v.u32()?;
                }
                CAP_ROUTE_REFRESH => o.route_refresh = true,
                CAP_EXTENDED_MESSAGE => o.extended_message = true,
                CAP_GRACEFUL_RESTART => o.graceful_restart = GracefulRestart::decode(cval),
                _ => {}
            }
        }
    }
    if o.families.is_empty() {
        // No MP capability: IPv4 unicast only (RFC 4760 §8).
        o.families.push((AFI_IPV4, SAFI_UNICAST));
    }
    Ok(o)
}

fn decode_update(body: &[u8], four_octet: bool) -> Result<Update, BgpError> {
    let mut r = Reader::new(body, ERR_UPDATE, 1);
    let wlen = r.u16()? as usize;
    let wbuf = r.bytes(wlen)?;
    let withdrawn = decode_prefixes(&mut Reader::new(wbuf, ERR_UPDATE, 1), AFI_IPV4)?;
    let alen = r.u16()? as usize;
    let abuf = r.bytes(alen)?;
    let nlri = decode_prefixes(&mut Reader::new(&body[r.pos()..], ERR_UPDATE, 10), AFI_IPV4)?;
    let mut u = Update {
        withdrawn,
        nlri,
        ..Default::default()
    };
    if alen > 0 {
        let d = decode_attrs(abuf, four_octet)?;
        let announces =
            !u.nlri.is_empty() || d.mp_reach.as_ref().is_some_and(|m| !m.nlri.is_empty());
        let has = |c: u8| d.present.contains(&c);
        let missing = if !announces {
            None
        } else if !has(ATTR_ORIGIN) || !has(ATTR_AS_PATH) {
            Some("missing ORIGIN or AS_PATH".to_string())
        } else if !u.nlri.is_empty() && !has(ATTR_NEXT_HOP) {
            Some("missing NEXT_HOP".to_string())
        } else {
            None
        };
        if d.present == [ATTR_MP_UNREACH] && u.withdrawn.is_empty() && u.nlri.is_empty() {
            u.end_of_rib = d
                .mp_unreach
                .as_ref()
                .filter(|m| m.withdrawn.is_empty())
                .map(|m| (m.afi, m.safi));
        }
        u.mp_reach = d.mp_reach;
        u.mp_unreach = d.mp_unreach;
        u.attrs = Some(d.attrs);
        if let Some(reason) = d.treat_as_withdraw.or(missing) {
            u.withdraw_all(reason);
        }
    } else if !u.nlri.is_empty() {
        u.withdrawn.append(&mut u.nlri);
        u.treat_as_withdraw = Some("NLRI without path attributes".into());
    } else if u.withdrawn.is_empty() {
        u.end_of_rib = Some((AFI_IPV4, SAFI_UNICAST));
    }
    Ok(u)
}

impl Update {
    /// Nothing announced, withdrawn or marked.
    pub fn is_empty(&self) -> bool {
        self.nlri.is_empty()
            && self.withdrawn.is_empty()
            && self.mp_reach.as_ref().is_none_or(|m| m.nlri.is_empty())
            && self
                .mp_unreach
                .as_ref()
                .is_none_or(|m| m.withdrawn.is_empty())
            && self.end_of_rib.is_none()
    }

    /// RFC 7606 treat-as-withdraw: keep the session, withdraw what the UPDATE announced.
    pub fn withdraw_all(&mut self, reason: String) {
        self.attrs = None;
        self.withdrawn.append(&mut self.nlri);
        self.withdraw_mp_reach();
        self.treat_as_withdraw = Some(reason);
    }

    /// Turns the MP_REACH announcements into withdrawals of the same family.
    pub fn withdraw_mp_reach(&mut self) {
        if let Some(mp) = self.mp_reach.take() {
            let un = self.mp_unreach.get_or_insert(MpUnreach {
                afi: mp.afi,
                safi: mp.safi,
                withdrawn: Vec::new(),
            });
            if (un.afi, un.safi) == (mp.afi, mp.safi) {
                un.withdrawn.extend(mp.nlri);
            }
        }
    }
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&((HEADER_LEN + body.len()) as u16).to_be_bytes());
    m.push(kind);
    m.extend_from_slice(body);
    m
}

pub fn encode_open(o: &Open) -> Vec<u8> {
    let mut caps = Vec::new();
    let mut cap = |code: u8, v: &[u8]| {
        caps.extend_from_slice(&[code, v.len() as u8]);
        caps.extend_from_slice(v);
    };
    for (afi, safi) in &o.families {
        let mut v = afi.to_be_bytes().to_vec();
        v.extend_from_slice(&[0, *safi]);
        cap(CAP_MP, &v);
    }
    if o.route_refresh {
        cap(CAP_ROUTE_REFRESH, &[]);
    }
    if o.extended_message {
        cap(CAP_EXTENDED_MESSAGE, &[]);
    }
    if let Some(gr) = &o.graceful_restart {
        cap(CAP_GRACEFUL_RESTART, &gr.encode());
    }
    cap(CAP_FOUR_OCTET_AS, &o.asn.to_be_bytes());
    let mut b = vec![4];
    let as2 = if o.asn > 65535 {
        AS_TRANS
    } else {
        o.asn as u16
    };
    b.extend_from_slice(&as2.to_be_bytes());
    b.extend_from_slice(&o.hold_time.to_be_bytes());
    b.extend_from_slice(&o.router_id.octets());
    b.push((caps.len() + 2) as u8);
    b.extend_from_slice(&[2, caps.len() as u8]);
    b.extend_from_slice(&caps);
    frame(1, &b)
}

/// The End-of-RIB marker for a family (RFC 4724 §2).
pub fn encode_end_of_rib(afi: u16, safi: u8) -> Vec<u8> {
    if (afi, safi) == (AFI_IPV4, SAFI_UNICAST) {
        return frame(2, &[0, 0, 0, 0]);
    }
    let un = MpUnreach {
        afi,
        safi,
        withdrawn: Vec::new(),
    };
    encode_update(&[], None, &[], Some(&un), true)
}

/// ROUTE-REFRESH for a family (RFC 2918 §3).
pub fn encode_route_refresh(afi: u16, safi: u8) -> Vec<u8> {
    let mut b = afi.to_be_bytes().to_vec();
    b.extend_from_slice(&[0, safi]);
    frame(5, &b)
}

pub fn encode_keepalive() -> Vec<u8> {
    frame(4, &[])
}

pub fn encode_notification(code: u8, subcode: u8, data: &[u8]) -> Vec<u8> {
    let mut b = vec![code, subcode];
    b.extend_from_slice(data);
    frame(3, &b)
}

/// An UPDATE (AS numbers 4 bytes wide if `four_octet`) announcing IPv4 `nlri` with `attrs` (which carry NEXT_HOP), or IPv6 ones
/// through `mp`, and withdrawing IPv4 `withdrawn` / IPv6 `mp_unreach`.
#[allow(clippy::type_complexity)]
pub fn encode_update(
    withdrawn: &[IpNet],
    attrs: Option<(&Attrs, Option<&MpReach>)>,
    nlri: &[IpNet],
    mp_unreach: Option<&MpUnreach>,
    four_octet: bool,
) -> Vec<u8> {
    let mut w = Vec::new();
    for n in withdrawn {
        encode_prefix(&mut w, n);
    }
    // RFC 7606 §5.1: an MP attribute comes first (MP_REACH leads `encode_attrs`).
    let mut a = Vec::new();
    if let Some(un) = mp_unreach {
        let mut v = un.afi.to_be_bytes().to_vec();
        v.push(un.safi);
        for n in &un.withdrawn {
            encode_prefix(&mut v, n);
        }
        a.extend_from_slice(&[0x80 | 0x10, ATTR_MP_UNREACH]);
        a.extend_from_slice(&(v.len() as u16).to_be_bytes());
        a.extend(v);
    }
    if let Some((attrs, mp)) = attrs {
        a.extend(encode_attrs(attrs, mp, four_octet));
    }
    let mut b = (w.len() as u16).to_be_bytes().to_vec();
    b.extend(w);
    b.extend_from_slice(&(a.len() as u16).to_be_bytes());
    b.extend(a);
    for n in nlri {
        encode_prefix(&mut b, n);
    }
    frame(2, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::hex;

    const MARKER: &str = "ffffffffffffffffffffffffffffffff";

    #[test]
    fn open_round_trips_byte_exact() {
        let o = Open {
            asn: 4_200_000_001,
            hold_time: 90,
            router_id: "10.0.0.1".parse().unwrap(),
            families: vec![(AFI_IPV4, 1), (AFI_IPV6, 1)],
            four_octet: true,
            route_refresh: true,
            extended_message: false,
            graceful_restart: None,
        };
        let wire = encode_open(&o);
        let expect = hex(&format!(
            "{MARKER} 0033 01 04 5ba0 005a 0a000001 16 02 14 \
             0104 0001 0001  0104 0002 0001  0200  4104 fa56ea01"
        ));
        assert_eq!(wire, expect);
        assert_eq!(decode(&wire, false, MAX_LEN).unwrap(), Message::Open(o));
    }

    #[test]
    fn graceful_restart_capability_and_end_of_rib_byte_exact() {
        let o = Open {
            asn: 65000,
            hold_time: 90,
            router_id: "10.0.0.1".parse().unwrap(),
            families: vec![(AFI_IPV6, 1)],
            four_octet: true,
            route_refresh: false,
            extended_message: false,
            graceful_restart: Some(GracefulRestart {
                restarting: true,
                restart_time: 120,
                families: vec![(AFI_IPV6, 1, true)],
            }),
        };
        let wire = encode_open(&o);
        // Capability 64, length 6: R bit + 120 s, then AFI 2 SAFI 1 with the F bit.
        let expect = hex(&format!(
            "{MARKER} 0033 01 04 fde8 005a 0a000001 16 02 14 \
             0104 0002 0001  4006 8078 0002 0180  4104 0000fde8"
        ));
        assert_eq!(wire, expect);
        assert_eq!(decode(&wire, false, MAX_LEN).unwrap(), Message::Open(o));
        // A capability cut short inside a family keeps what is whole.
        let gr = GracefulRestart::decode(&hex("0078 0001 0180 0002")).unwrap();
        assert_eq!(gr.families, vec![(AFI_IPV4, 1, true)]);
        assert!(!gr.restarting && gr.restart_time == 120);
        assert!(GracefulRestart::decode(&hex("00")).is_none());

        // End-of-RIB: IPv4 is an empty UPDATE; IPv6 an UPDATE with an empty MP_UNREACH.
        let eor4 = encode_end_of_rib(AFI_IPV4, 1);
        assert_eq!(eor4, hex(&format!("{MARKER} 0017 02 0000 0000")));
        let eor6 = encode_end_of_rib(AFI_IPV6, 1);
        assert_eq!(
            eor6,
            hex(&format!("{MARKER} 001e 02 0000 0007 90 0f 0003 0002 01"))
        );
        for (wire, fam) in [(eor4, (AFI_IPV4, 1)), (eor6, (AFI_IPV6, 1))] {
            let Message::Update(u) = decode(&wire, true, MAX_LEN).unwrap() else {
                panic!()
            };
            assert_eq!(u.end_of_rib, Some(fam));
        }
        // BIRD's form of the IPv6 marker: 1-octet attribute length.
        let Message::Update(u) = decode(
            &hex(&format!("{MARKER} 001d 02 0000 0006 80 0f 03 0002 01")),
            true,
            MAX_LEN,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(u.end_of_rib, Some((AFI_IPV6, 1)));
        let rr = encode_route_refresh(AFI_IPV6, 1);
        assert_eq!(rr, hex(&format!("{MARKER} 0017 05 0002 00 01")));
        assert_eq!(
            decode(&rr, true, MAX_LEN).unwrap(),
            Message::RouteRefresh {
                afi: AFI_IPV6,
                safi: 1
            }
        );
        // A withdrawal is not an End-of-RIB.
        let w = encode_update(&["10.0.0.0/8".parse().unwrap()], None, &[], None, true);
        let Message::Update(u) = decode(&w, true, MAX_LEN).unwrap() else {
            panic!()
        };
        assert_eq!(u.end_of_rib, None);
    }

    #[test]
    fn update_round_trips_v4_and_v6() {
        let attrs = Attrs {
            origin: 0,
            as_path: vec![AsSegment {
                kind: 2,
                asns: vec![65001, 4_200_000_000],
            }],
            next_hop: Some("10.0.1.2".parse().unwrap()),
            med: Some(10),
            local_pref: Some(200),
            communities: vec![0xfde8_0001],
            large_communities: vec![[65001, 1, 2]],
            ..Default::default()
        };
        let nlri: Vec<IpNet> = vec![
            "10.1.0.0/16".parse().unwrap(),
            "192.168.5.128/25".parse().unwrap(),
        ];
        let wire = encode_update(
            &["10.9.0.0/24".parse().unwrap()],
            Some((&attrs, None)),
            &nlri,
            None,
            true,
        );
        let Message::Update(u) = decode(&wire, true, MAX_LEN).unwrap() else {
            panic!()
        };
        assert_eq!(u.nlri, nlri);
        assert_eq!(u.withdrawn, vec!["10.9.0.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(u.attrs.unwrap(), attrs);

        let mp = MpReach {
            afi: AFI_IPV6,
            safi: 1,
            next_hop: Some("fd00:1::2".parse().unwrap()),
            nlri: vec!["fd01::/48".parse().unwrap()],
        };
        let un = MpUnreach {
            afi: AFI_IPV6,
            safi: 1,
            withdrawn: vec!["fd09::/32".parse().unwrap()],
        };
        let a6 = Attrs {
            next_hop: None,
            ..attrs.clone()
        };
        let wire = encode_update(&[], Some((&a6, Some(&mp))), &[], Some(&un), true);
        let Message::Update(u) = decode(&wire, true, MAX_LEN).unwrap() else {
            panic!()
        };
        assert_eq!(u.mp_reach.unwrap(), mp);
        assert_eq!(u.mp_unreach.unwrap(), un);
    }

    #[test]
    fn two_octet_peers_get_two_octet_paths() {
        let attrs = Attrs {
            as_path: vec![AsSegment {
                kind: 2,
                asns: vec![65000, 4_200_000_000],
            }],
            next_hop: Some("10.0.0.1".parse().unwrap()),
            ..Default::default()
        };
        let wire = encode_update(
            &[],
            Some((&attrs, None)),
            &["10.1.0.0/16".parse().unwrap()],
            None,
            false,
        );
        let Message::Update(u) = decode(&wire, false, MAX_LEN).unwrap() else {
            panic!()
        };
        assert_eq!(
            u.attrs.unwrap().as_path[0].asns,
            vec![65000, AS_TRANS as u32]
        );
    }

    #[test]
    fn two_octet_as_path_decodes() {
        // ORIGIN IGP, AS_PATH SEQUENCE [65001 65002] in 2-byte form, NEXT_HOP 10.0.0.1.
        let body = hex("0000 0014 40010100 4002060202fde9fdea 400304 0a000001 10 0a01");
        let mut wire = hex(MARKER);
        wire.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
        wire.push(2);
        wire.extend(body);
        let Message::Update(u) = decode(&wire, false, MAX_LEN).unwrap() else {
            panic!()
        };
        assert_eq!(u.attrs.unwrap().as_path[0].asns, vec![65001, 65002]);
        assert_eq!(u.nlri, vec!["10.1.0.0/16".parse::<IpNet>().unwrap()]);
    }

    #[test]
    fn malformed_messages_give_the_right_notification() {
        let code = |wire: &[u8], four| decode(wire, four, MAX_LEN).map(|_| ()).unwrap_err();
        let mut bad_marker = encode_keepalive();
        bad_marker[0] = 0;
        assert_eq!(
            (
                code(&bad_marker, true).code,
                code(&bad_marker, true).subcode
            ),
            (1, 1)
        );
        let mut bad_len = encode_keepalive();
        bad_len[17] = 18;
        assert_eq!(code(&bad_len, true).subcode, 2);
        let mut bad_type = encode_keepalive();
        bad_type[18] = 9;
        assert_eq!(
            (code(&bad_type, true).code, code(&bad_type, true).subcode),
            (1, 3)
        );
        // UPDATE errors that reset the session: attribute length past the block, prefix
        // longer than 32, a repeated MP_REACH.
        for (body, sub) in [
            ("0000 0004 800e0501", 5),
            ("0000 0000 21 0a000000", 10),
            (
                "0000 0018 800e09000101040a00000100 800e09000101040a00000100",
                1,
            ),
        ] {
            let b = hex(body);
            let mut wire = hex(MARKER);
            wire.extend_from_slice(&((19 + b.len()) as u16).to_be_bytes());
            wire.push(2);
            wire.extend(b);
            let e = code(&wire, true);
            assert_eq!((e.code, e.subcode), (3, sub), "{body}: {e}");
        }
    }

    fn update(body: &str) -> Update {
        let b = hex(body);
        let mut wire = hex(MARKER);
        wire.extend_from_slice(&((19 + b.len()) as u16).to_be_bytes());
        wire.push(2);
        wire.extend(b);
        match decode(&wire, true, MAX_LEN) {
            Ok(Message::Update(u)) => u,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn rfc7606_treat_as_withdraw_and_attribute_discard() {
        let net: IpNet = "10.1.0.0/16".parse().unwrap();
        // ORIGIN 7; MED of 3 bytes; NLRI without NEXT_HOP; no AS_PATH: the prefix is
        // withdrawn, the session stays.
        for body in [
            "0000 0014 40010107 40020602010000fde9 4003040a000001 100a01",
            "0000 001a 40010100 40020602010000fde9 80040300000a 4003040a000001 100a01",
            "0000 000d 40010100 40020602010000fde9 100a01",
            "0000 000b 40010100 4003040a000001 100a01",
        ] {
            let u = update(body);
            assert!(u.treat_as_withdraw.is_some(), "{body}");
            assert_eq!(u.withdrawn, vec![net], "{body}");
            assert!(u.nlri.is_empty() && u.attrs.is_none(), "{body}");
        }
        // A bad AGGREGATOR is discarded; a repeated ORIGIN is ignored; the route stands.
        let u = update(
            "0000 001e 40010100 40020602010000fde9 4003040a000001 c0070300fde9 40010102 100a01",
        );
        assert_eq!(u.treat_as_withdraw, None);
        assert_eq!(u.nlri, vec![net]);
        let a = u.attrs.unwrap();
        assert_eq!((a.aggregator, a.origin), (None, 0));
    }

    #[test]
    fn rfc7606_framing_flags_and_empty_segments() {
        let net: IpNet = "10.1.0.0/16".parse().unwrap();
        // §4: LOCAL_PREF's length (5) runs past the Total Path Attribute Length: the
        // NLRI is still found, and withdrawn; the session stays.
        let u = update("0000 0011 40010100 40020602010000fde9 40050500 100a01");
        assert!(u.treat_as_withdraw.unwrap().contains("runs past"));
        assert_eq!(u.withdrawn, vec![net]);
        // §4: two octets left where an attribute header should be.
        let u = update("0000 000f 40010100 40020602010000fde9 4001 100a01");
        assert_eq!(u.withdrawn, vec![net]);
        // §3(c): ORIGIN sent as optional (0xc0) is malformed: treat-as-withdraw.
        let u = update("0000 0014 c0010100 40020602010000fde9 4003040a000001 100a01");
        assert!(u.treat_as_withdraw.unwrap().contains("flags"));
        assert_eq!(u.withdrawn, vec![net]);
        // MED sent as well-known: the same.
        let u =
            update("0000 001b 40010100 40020602010000fde9 4003040a000001 40040400000001 100a01");
        assert_eq!(u.withdrawn, vec![net]);
        // An AGGREGATOR without the optional bit is discarded, the route stands.
        let u = update(
            "0000 001f 40010100 40020602010000fde9 4003040a000001 40070800 00fde90a000001 100a01",
        );
        assert_eq!((u.nlri, u.attrs.unwrap().aggregator), (vec![net], None));
        // §7.2: an AS_PATH segment of length 0.
        let u = update("0000 0010 40010100 4002020200 4003040a000001 100a01");
        assert!(u.treat_as_withdraw.unwrap().contains("length 0"));
        assert_eq!(u.withdrawn, vec![net]);
    }

    #[test]
    fn notifications_carry_the_data_rfc4271_asks_for() {
        let e = |wire: &[u8]| decode(wire, true, MAX_LEN).unwrap_err();
        // Bad message length: the Length field.
        let mut w = encode_keepalive();
        w[17] = 18;
        assert_eq!(e(&w).data, hex("0012"));
        // Bad type: the Type field.
        let mut w = encode_keepalive();
        w[18] = 9;
        assert_eq!(e(&w).data, vec![9]);
        // Unsupported version: the version we support.
        let mut w = encode_open(&Open {
            asn: 65000,
            hold_time: 90,
            router_id: "10.0.0.1".parse().unwrap(),
            families: vec![],
            four_octet: true,
            route_refresh: false,
            extended_message: false,
            graceful_restart: None,
        });
        w[19] = 3;
        assert_eq!((e(&w).subcode, e(&w).data), (1, hex("0004")));
        // An MP_REACH whose length runs past the block: the attribute as far as it goes.
        let b = hex("0000 0004 800e0501");
        let mut wire = hex(MARKER);
        wire.extend_from_slice(&((19 + b.len()) as u16).to_be_bytes());
        wire.push(2);
        wire.extend(b);
        assert_eq!(e(&wire).data, hex("800e0501"));
        // An unrecognized well-known attribute (type 99, transitive): the attribute.
        let b = hex("0000 0008 40630201ff 40010100");
        let mut wire = hex(MARKER);
        wire.extend_from_slice(&((19 + b.len()) as u16).to_be_bytes());
        wire.push(2);
        wire.extend(b);
        let x = e(&wire);
        assert_eq!((x.code, x.subcode, &x.data), (3, 2, &hex("40630201ff")));
        assert_eq!(
            encode_notification(x.code, x.subcode, &x.data),
            hex(&format!("{MARKER} 001a 03 03 02 40630201ff"))
        );
    }

    #[test]
    fn mp_attributes_are_encoded_first() {
        let a = Attrs {
            as_path: vec![AsSegment {
                kind: 2,
                asns: vec![65000],
            }],
            ..Default::default()
        };
        let mp = MpReach {
            afi: AFI_IPV6,
            safi: 1,
            next_hop: Some("fd00::1".parse().unwrap()),
            nlri: vec!["fd01::/16".parse().unwrap()],
        };
        let wire = encode_update(&[], Some((&a, Some(&mp))), &[], None, true);
        // Header, withdrawn length 0, attribute length, then flags 0x80 type 14.
        assert_eq!(
            &wire[HEADER_LEN + 4..HEADER_LEN + 6],
            &[0x80, ATTR_MP_REACH]
        );
        assert_eq!(
            wire,
            hex(&format!(
                "{MARKER} 003f 02 0000 0028 \
                 800e 18 0002 01 10 fd000000000000000000000000000001 00 10 fd01 \
                 400101 00 400206 0201 0000fde8"
            ))
        );
        let un = MpUnreach {
            afi: AFI_IPV6,
            safi: 1,
            withdrawn: vec!["fd02::/16".parse().unwrap()],
        };
        let wire = encode_update(&[], Some((&a, None)), &[], Some(&un), true);
        assert_eq!(
            &wire[HEADER_LEN + 4..HEADER_LEN + 6],
            &[0x90, ATTR_MP_UNREACH]
        );
    }

    #[test]
    fn decoder_never_panics_on_garbage() {
        let mut s = 0x1234_5678u64;
        for n in 0..20_000 {
            let mut buf = hex(MARKER);
            let len = 19 + (n % 60);
            buf.extend_from_slice(&(len as u16).to_be_bytes());
            buf.push((n % 6) as u8);
            while buf.len() < len {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                buf.push(s as u8);
            }
            let _ = decode(&buf, n % 2 == 0, MAX_LEN);
        }
    }
}
