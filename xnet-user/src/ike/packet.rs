//! The IKEv2 wire format (RFC 7296 §3): header, the generic payload chain and the
//! payloads the agent uses, decoded into owned values with every length checked (a
//! malformed message is an error naming what is wrong, never a panic), and encoded back.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const HEADER_LEN: usize = 28;

pub const IKE_SA_INIT: u8 = 34;
pub const IKE_AUTH: u8 = 35;
pub const CREATE_CHILD_SA: u8 = 36;
pub const INFORMATIONAL: u8 = 37;

pub const FLAG_INITIATOR: u8 = 0x08;
pub const FLAG_RESPONSE: u8 = 0x20;

pub const PT_NONE: u8 = 0;
pub const PT_SA: u8 = 33;
pub const PT_KE: u8 = 34;
pub const PT_IDI: u8 = 35;
pub const PT_IDR: u8 = 36;
pub const PT_CERT: u8 = 37;
pub const PT_CERTREQ: u8 = 38;
pub const PT_AUTH: u8 = 39;
pub const PT_NONCE: u8 = 40;
pub const PT_NOTIFY: u8 = 41;
pub const PT_DELETE: u8 = 42;
pub const PT_TSI: u8 = 44;
pub const PT_TSR: u8 = 45;
pub const PT_SK: u8 = 46;

pub const PROTO_IKE: u8 = 1;
pub const PROTO_ESP: u8 = 3;

pub const TRANSFORM_ENCR: u8 = 1;
pub const TRANSFORM_PRF: u8 = 2;
pub const TRANSFORM_INTEG: u8 = 3;
pub const TRANSFORM_DH: u8 = 4;
pub const TRANSFORM_ESN: u8 = 5;

pub const ID_IPV4_ADDR: u8 = 1;
pub const ID_FQDN: u8 = 2;
pub const ID_RFC822_ADDR: u8 = 3;
pub const ID_IPV6_ADDR: u8 = 5;
pub const ID_DER_ASN1_DN: u8 = 9;

pub const AUTH_PSK: u8 = 2;

// Notify message types (§3.10.1).
pub const N_UNSUPPORTED_CRITICAL_PAYLOAD: u16 = 1;
pub const N_INVALID_IKE_SPI: u16 = 4;
pub const N_INVALID_MAJOR_VERSION: u16 = 5;
pub const N_INVALID_SYNTAX: u16 = 7;
pub const N_NO_PROPOSAL_CHOSEN: u16 = 14;
pub const N_INVALID_KE_PAYLOAD: u16 = 17;
pub const N_AUTHENTICATION_FAILED: u16 = 24;
pub const N_NO_ADDITIONAL_SAS: u16 = 35;
pub const N_TS_UNACCEPTABLE: u16 = 38;
pub const N_TEMPORARY_FAILURE: u16 = 43;
pub const N_CHILD_SA_NOT_FOUND: u16 = 44;
pub const N_INITIAL_CONTACT: u16 = 16384;
pub const N_NAT_DETECTION_SOURCE_IP: u16 = 16388;
pub const N_NAT_DETECTION_DESTINATION_IP: u16 = 16389;
pub const N_COOKIE: u16 = 16390;
pub const N_USE_TRANSPORT_MODE: u16 = 16391;
pub const N_REKEY_SA: u16 = 16393;
/// RFC 7427 §4: the hashes we take in signatures (AUTH method 14).
pub const N_SIGNATURE_HASH_ALGORITHMS: u16 = 16431;

/// A malformed message: the notify type to answer with (when answering is right) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub notify: u16,
    pub reason: String,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (notify {})", self.reason, self.notify)
    }
}

fn syntax(reason: impl Into<String>) -> Error {
    Error {
        notify: N_INVALID_SYNTAX,
        reason: reason.into(),
    }
}

/// The shared bounds-checked reader (`crate::wire`), each read naming what it reads for
/// the error.
struct Reader<'a>(crate::wire::Reader<'a>);

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader(crate::wire::Reader::new(buf))
    }
    fn pos(&self) -> usize {
        self.0.pos()
    }
    fn left(&self) -> usize {
        self.0.left()
    }
    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], Error> {
        self.0.bytes(n).map_err(|s| short(what, s))
    }
    fn u8(&mut self, what: &str) -> Result<u8, Error> {
        self.0.u8().map_err(|s| short(what, s))
    }
    fn u16(&mut self, what: &str) -> Result<u16, Error> {
        self.0.u16().map_err(|s| short(what, s))
    }
    fn u32(&mut self, what: &str) -> Result<u32, Error> {
        self.0.u32().map_err(|s| short(what, s))
    }
    fn rest(&mut self) -> &'a [u8] {
        self.0.rest()
    }
}

fn short(what: &str, s: crate::wire::Short) -> Error {
    syntax(format!("{what}: {} octets needed, {} left", s.need, s.left))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub spi_i: u64,
    pub spi_r: u64,
    pub next: u8,
    pub exchange: u8,
    pub flags: u8,
    pub message_id: u32,
    pub length: u32,
}

impl Header {
    pub fn is_response(&self) -> bool {
        self.flags & FLAG_RESPONSE != 0
    }
    pub fn from_initiator(&self) -> bool {
        self.flags & FLAG_INITIATOR != 0
    }

    pub fn decode(buf: &[u8]) -> Result<Header, Error> {
        let mut r = Reader::new(buf);
        let spi_i = u64::from_be_bytes(r.bytes(8, "IKE SPIi")?.try_into().unwrap());
        let spi_r = u64::from_be_bytes(r.bytes(8, "IKE SPIr")?.try_into().unwrap());
        let next = r.u8("next payload")?;
        let version = r.u8("version")?;
        if version >> 4 != 2 {
            return Err(Error {
                notify: N_INVALID_MAJOR_VERSION,
                reason: format!("IKE major version {}", version >> 4),
            });
        }
        let exchange = r.u8("exchange type")?;
        let flags = r.u8("flags")?;
        let message_id = r.u32("message id")?;
        let length = r.u32("length")?;
        if length as usize != buf.len() {
            return Err(syntax(format!(
                "header length {length}, datagram {} octets",
                buf.len()
            )));
        }
        Ok(Header {
            spi_i,
            spi_r,
            next,
            exchange,
            flags,
            message_id,
            length,
        })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(&self.spi_i.to_be_bytes());
        b[8..16].copy_from_slice(&self.spi_r.to_be_bytes());
        b[16] = self.next;
        b[17] = 0x20;
        b[18] = self.exchange;
        b[19] = self.flags;
        b[20..24].copy_from_slice(&self.message_id.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Transform {
    pub kind: u8,
    pub id: u16,
    /// The Key Length attribute, in bits.
    pub key_len: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub num: u8,
    pub protocol: u8,
    pub spi: Vec<u8>,
    pub transforms: Vec<Transform>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TrafficSelector {
    pub protocol: u8,
    pub start_port: u16,
    pub end_port: u16,
    pub start: IpAddr,
    pub end: IpAddr,
}

impl TrafficSelector {
    /// Everything within a prefix, any protocol and port.
    pub fn from_net(net: ipnet::IpNet) -> Self {
        TrafficSelector {
            protocol: 0,
            start_port: 0,
            end_port: 65535,
            start: net.network(),
            end: net.broadcast(),
        }
    }

    /// The prefix this range is exactly, if it is one.
    pub fn to_net(&self) -> Option<ipnet::IpNet> {
        let (s, e): (u128, u128) = match (self.start, self.end) {
            (IpAddr::V4(s), IpAddr::V4(e)) => (u32::from(s) as u128, u32::from(e) as u128),
            (IpAddr::V6(s), IpAddr::V6(e)) => (u128::from(s), u128::from(e)),
            _ => return None,
        };
        let bits = if self.start.is_ipv4() { 32 } else { 128 };
        let span = e.checked_sub(s)?;
        let host_bits = 128 - span.leading_zeros();
        if span & span.wrapping_add(1) != 0 {
            return None;
        }
        let len = bits - host_bits;
        let net = ipnet::IpNet::new(self.start, len as u8).ok()?;
        (net.network() == self.start).then_some(net)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Sa(Vec<Proposal>),
    Ke {
        group: u16,
        data: Vec<u8>,
    },
    /// IDi (`initiator`) or IDr.
    Id {
        initiator: bool,
        kind: u8,
        data: Vec<u8>,
    },
    Auth {
        method: u8,
        data: Vec<u8>,
    },
    Nonce(Vec<u8>),
    /// CERT (`request` false) or CERTREQ: encoding and data (§3.6, §3.7).
    Cert {
        request: bool,
        encoding: u8,
        data: Vec<u8>,
    },
    Notify {
        protocol: u8,
        spi: Vec<u8>,
        kind: u16,
        data: Vec<u8>,
    },
    Delete {
        protocol: u8,
        spis: Vec<Vec<u8>>,
    },
    /// TSi (`initiator`) or TSr.
    Ts {
        initiator: bool,
        selectors: Vec<TrafficSelector>,
    },
    /// A payload the agent does not use (vendor ID, CERTREQ, CP…), skipped.
    Other {
        kind: u8,
    },
}

impl Payload {
    pub fn kind(&self) -> u8 {
        match self {
            Payload::Sa(_) => PT_SA,
            Payload::Ke { .. } => PT_KE,
            Payload::Id { initiator, .. } => {
                if *initiator {
                    PT_IDI
                } else {
                    PT_IDR
                }
            }
            Payload::Auth { .. } => PT_AUTH,
            Payload::Cert { request, .. } => {
                if *request {
                    PT_CERTREQ
                } else {
                    PT_CERT
                }
            }
            Payload::Nonce(_) => PT_NONCE,
            Payload::Notify { .. } => PT_NOTIFY,
            Payload::Delete { .. } => PT_DELETE,
            Payload::Ts { initiator, .. } => {
                if *initiator {
                    PT_TSI
                } else {
                    PT_TSR
                }
            }
            Payload::Other { kind } => *kind,
        }
    }

    pub fn notify(kind: u16, data: Vec<u8>) -> Payload {
        Payload::Notify {
            protocol: 0,
            spi: Vec::new(),
            kind,
            data,
        }
    }
}

/// Lookups in a decoded payload chain: the first payload of a kind.
pub trait Payloads {
    /// The SA payload's proposals.
    fn sa(&self) -> Option<&[Proposal]>;
    /// An answer's SA payload: exactly one proposal, the chosen one.
    fn chosen(&self) -> Option<&Proposal>;
    fn ke(&self) -> Option<(u16, &[u8])>;
    fn nonce(&self) -> Option<&[u8]>;
    /// IDi (`initiator`) or IDr: (type, data).
    fn id(&self, initiator: bool) -> Option<(u8, Vec<u8>)>;
    fn psk_auth(&self) -> Option<&[u8]>;
    /// AUTH: (method, data).
    fn auth(&self) -> Option<(u8, &[u8])>;
    /// The data of CERT payloads of X.509 certificates, in order (the end entity first).
    fn certs(&self) -> Vec<Vec<u8>>;
    /// TSi (`initiator`) or TSr.
    fn ts(&self, initiator: bool) -> Option<&[TrafficSelector]>;
    fn notify(&self, kind: u16) -> Option<&[u8]>;
    /// The first error notify (type below 16384).
    fn error_notify(&self) -> Option<u16>;
}

impl Payloads for [Payload] {
    fn sa(&self) -> Option<&[Proposal]> {
        self.iter().find_map(|p| match p {
            Payload::Sa(v) => Some(v.as_slice()),
            _ => None,
        })
    }
    fn chosen(&self) -> Option<&Proposal> {
        self.sa().filter(|v| v.len() == 1).map(|v| &v[0])
    }
    fn ke(&self) -> Option<(u16, &[u8])> {
        self.iter().find_map(|p| match p {
            Payload::Ke { group, data } => Some((*group, data.as_slice())),
            _ => None,
        })
    }
    fn nonce(&self) -> Option<&[u8]> {
        self.iter().find_map(|p| match p {
            Payload::Nonce(n) => Some(n.as_slice()),
            _ => None,
        })
    }
    fn id(&self, initiator: bool) -> Option<(u8, Vec<u8>)> {
        self.iter().find_map(|p| match p {
            Payload::Id {
                initiator: i,
                kind,
                data,
            } if *i == initiator => Some((*kind, data.clone())),
            _ => None,
        })
    }
    fn psk_auth(&self) -> Option<&[u8]> {
        self.iter().find_map(|p| match p {
            Payload::Auth {
                method: AUTH_PSK,
                data,
            } => Some(data.as_slice()),
            _ => None,
        })
    }
    fn auth(&self) -> Option<(u8, &[u8])> {
        self.iter().find_map(|p| match p {
            Payload::Auth { method, data } => Some((*method, data.as_slice())),
            _ => None,
        })
    }
    fn certs(&self) -> Vec<Vec<u8>> {
        self.iter()
            .filter_map(|p| match p {
                Payload::Cert {
                    request: false,
                    encoding: 4,
                    data,
                } => Some(data.clone()),
                _ => None,
            })
            .collect()
    }
    fn ts(&self, initiator: bool) -> Option<&[TrafficSelector]> {
        self.iter().find_map(|p| match p {
            Payload::Ts {
                initiator: i,
                selectors,
            } if *i == initiator => Some(selectors.as_slice()),
            _ => None,
        })
    }
    fn notify(&self, kind: u16) -> Option<&[u8]> {
        self.iter().find_map(|p| match p {
            Payload::Notify { kind: k, data, .. } if *k == kind => Some(data.as_slice()),
            _ => None,
        })
    }
    fn error_notify(&self) -> Option<u16> {
        self.iter().find_map(|p| match p {
            Payload::Notify { kind, .. } if *kind < 16384 => Some(*kind),
            _ => None,
        })
    }
}

/// TSi and TSr payloads.
pub fn ts_pair(tsi: &[TrafficSelector], tsr: &[TrafficSelector]) -> [Payload; 2] {
    [
        Payload::Ts {
            initiator: true,
            selectors: tsi.to_vec(),
        },
        Payload::Ts {
            initiator: false,
            selectors: tsr.to_vec(),
        },
    ]
}

/// Where the Encrypted payload sits in a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encrypted {
    /// Type of the first payload inside.
    pub first: u8,
    /// Offset of its generic header (the authenticated data ends 4 octets later).
    pub offset: usize,
}

/// Decodes a payload chain starting with type `next`. Stops at an Encrypted payload,
/// which must be last (§3.14).
pub fn decode_payloads(
    mut next: u8,
    buf: &[u8],
    base: usize,
) -> Result<(Vec<Payload>, Option<Encrypted>), Error> {
    let mut r = Reader::new(buf);
    let mut out = Vec::new();
    while next != PT_NONE {
        let start = r.pos();
        let following = r.u8("payload header")?;
        let critical = r.u8("payload header")? & 0x80 != 0;
        let len = r.u16("payload length")? as usize;
        if len < 4 {
            return Err(syntax(format!("payload {next} length {len}")));
        }
        let body = r.bytes(len - 4, &format!("payload {next}"))?;
        if next == PT_SK {
            if r.left() != 0 {
                return Err(syntax("data after the Encrypted payload"));
            }
            return Ok((
                out,
                Some(Encrypted {
                    first: following,
                    offset: base + start,
                }),
            ));
        }
        out.push(decode_payload(next, critical, body)?);
        next = following;
    }
    if r.left() != 0 {
        return Err(syntax(format!(
            "{} octets after the last payload",
            r.left()
        )));
    }
    Ok((out, None))
}

fn addr(b: &[u8]) -> IpAddr {
    if b.len() == 4 {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    } else {
        let a: [u8; 16] = b.try_into().unwrap();
        IpAddr::V6(Ipv6Addr::from(a))
    }
}

fn decode_payload(kind: u8, critical: bool, body: &[u8]) -> Result<Payload, Error> {
    let mut r = Reader::new(body);
    Ok(match kind {
        PT_SA => {
            let mut proposals = Vec::new();
            loop {
                let more = r.u8("proposal")?;
                r.u8("proposal")?;
                let plen = r.u16("proposal length")? as usize;
                if plen < 8 {
                    return Err(syntax(format!("proposal length {plen}")));
                }
                let mut p = Reader::new(r.bytes(plen - 4, "proposal")?);
                let num = p.u8("proposal number")?;
                let protocol = p.u8("protocol id")?;
                let spi_size = p.u8("SPI size")? as usize;
                let count = p.u8("transform count")?;
                let spi = p.bytes(spi_size, "SPI")?.to_vec();
                let mut transforms = Vec::new();
                for _ in 0..count {
                    p.u8("transform")?;
                    p.u8("transform")?;
                    let tlen = p.u16("transform length")? as usize;
                    if tlen < 8 {
                        return Err(syntax(format!("transform length {tlen}")));
                    }
                    let mut t = Reader::new(p.bytes(tlen - 4, "transform")?);
                    let tkind = t.u8("transform type")?;
                    t.u8("transform")?;
                    let id = t.u16("transform id")?;
                    let mut key_len = None;
                    while t.left() > 0 {
                        let at = t.u16("attribute")?;
                        if at & 0x8000 != 0 {
                            let v = t.u16("attribute value")?;
                            if at & 0x7fff == 14 {
                                key_len = Some(v);
                            }
                        } else {
                            let l = t.u16("attribute length")? as usize;
                            t.bytes(l, "attribute value")?;
                        }
                    }
                    transforms.push(Transform {
                        kind: tkind,
                        id,
                        key_len,
                    });
                }
                if p.left() != 0 {
                    return Err(syntax("proposal longer than its transforms"));
                }
                proposals.push(Proposal {
                    num,
                    protocol,
                    spi,
                    transforms,
                });
                if more == 0 {
                    break;
                }
                if more != 2 {
                    return Err(syntax(format!("proposal 'last' field {more}")));
                }
            }
            Payload::Sa(proposals)
        }
        PT_KE => {
            let group = r.u16("DH group")?;
            r.u16("KE reserved")?;
            Payload::Ke {
                group,
                data: r.rest().to_vec(),
            }
        }
        PT_IDI | PT_IDR => {
            let k = r.u8("ID type")?;
            r.bytes(3, "ID reserved")?;
            Payload::Id {
                initiator: kind == PT_IDI,
                kind: k,
                data: r.rest().to_vec(),
            }
        }
        PT_AUTH => {
            let method = r.u8("auth method")?;
            r.bytes(3, "AUTH reserved")?;
            Payload::Auth {
                method,
                data: r.rest().to_vec(),
            }
        }
        PT_CERT | PT_CERTREQ => {
            let encoding = r.u8("certificate encoding")?;
            Payload::Cert {
                request: kind == PT_CERTREQ,
                encoding,
                data: r.rest().to_vec(),
            }
        }
        PT_NONCE => {
            let n = r.rest();
            if !(16..=256).contains(&n.len()) {
                return Err(syntax(format!("nonce of {} octets", n.len())));
            }
            Payload::Nonce(n.to_vec())
        }
        PT_NOTIFY => {
            let protocol = r.u8("notify protocol")?;
            let spi_size = r.u8("notify SPI size")? as usize;
            let k = r.u16("notify type")?;
            let spi = r.bytes(spi_size, "notify SPI")?.to_vec();
            Payload::Notify {
                protocol,
                spi,
                kind: k,
                data: r.rest().to_vec(),
            }
        }
        PT_DELETE => {
            let protocol = r.u8("delete protocol")?;
            let spi_size = r.u8("delete SPI size")? as usize;
            let n = r.u16("delete SPI count")? as usize;
            let mut spis = Vec::new();
            for _ in 0..n {
                spis.push(r.bytes(spi_size, "delete SPI")?.to_vec());
            }
            Payload::Delete { protocol, spis }
        }
        PT_TSI | PT_TSR => {
            let n = r.u8("TS count")?;
            r.bytes(3, "TS reserved")?;
            let mut selectors = Vec::new();
            for _ in 0..n {
                let t = r.u8("TS type")?;
                let protocol = r.u8("TS protocol")?;
                let len = r.u16("TS length")? as usize;
                let alen = match (t, len) {
                    (7, 16) => 4,
                    (8, 40) => 16,
                    _ => return Err(syntax(format!("traffic selector type {t} length {len}"))),
                };
                let start_port = r.u16("TS port")?;
                let end_port = r.u16("TS port")?;
                let start = addr(r.bytes(alen, "TS address")?);
                let end = addr(r.bytes(alen, "TS address")?);
                selectors.push(TrafficSelector {
                    protocol,
                    start_port,
                    end_port,
                    start,
                    end,
                });
            }
            if r.left() != 0 {
                return Err(syntax("TS payload longer than its selectors"));
            }
            Payload::Ts {
                initiator: kind == PT_TSI,
                selectors,
            }
        }
        _ if critical => {
            return Err(Error {
                notify: N_UNSUPPORTED_CRITICAL_PAYLOAD,
                reason: format!("critical payload type {kind}"),
            })
        }
        _ => Payload::Other { kind },
    })
}

fn encode_body(p: &Payload) -> Vec<u8> {
    let mut b = Vec::new();
    match p {
        Payload::Sa(proposals) => {
            for (i, pr) in proposals.iter().enumerate() {
                let mut t = Vec::new();
                for (j, tr) in pr.transforms.iter().enumerate() {
                    let attr = tr.key_len.map(|k| [0x80, 14, (k >> 8) as u8, k as u8]);
                    let tlen = 8 + attr.map(|_| 4).unwrap_or(0);
                    t.push(if j + 1 == pr.transforms.len() { 0 } else { 3 });
                    t.push(0);
                    t.extend_from_slice(&(tlen as u16).to_be_bytes());
                    t.push(tr.kind);
                    t.push(0);
                    t.extend_from_slice(&tr.id.to_be_bytes());
                    if let Some(a) = attr {
                        t.extend_from_slice(&a);
                    }
                }
                let plen = 8 + pr.spi.len() + t.len();
                b.push(if i + 1 == proposals.len() { 0 } else { 2 });
                b.push(0);
                b.extend_from_slice(&(plen as u16).to_be_bytes());
                b.extend_from_slice(&[
                    pr.num,
                    pr.protocol,
                    pr.spi.len() as u8,
                    pr.transforms.len() as u8,
                ]);
                b.extend_from_slice(&pr.spi);
                b.extend(t);
            }
        }
        Payload::Ke { group, data } => {
            b.extend_from_slice(&group.to_be_bytes());
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(data);
        }
        Payload::Id { kind, data, .. } => {
            b.extend_from_slice(&[*kind, 0, 0, 0]);
            b.extend_from_slice(data);
        }
        Payload::Auth { method, data } => {
            b.extend_from_slice(&[*method, 0, 0, 0]);
            b.extend_from_slice(data);
        }
        Payload::Nonce(n) => b.extend_from_slice(n),
        Payload::Cert { encoding, data, .. } => {
            b.push(*encoding);
            b.extend_from_slice(data);
        }
        Payload::Notify {
            protocol,
            spi,
            kind,
            data,
        } => {
            b.extend_from_slice(&[*protocol, spi.len() as u8]);
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(spi);
            b.extend_from_slice(data);
        }
        Payload::Delete { protocol, spis } => {
            let size = spis.first().map(|s| s.len()).unwrap_or(0);
            b.extend_from_slice(&[*protocol, size as u8]);
            b.extend_from_slice(&(spis.len() as u16).to_be_bytes());
            for s in spis {
                b.extend_from_slice(s);
            }
        }
        Payload::Ts { selectors, .. } => {
            b.extend_from_slice(&[selectors.len() as u8, 0, 0, 0]);
            for s in selectors {
                let v4 = s.start.is_ipv4();
                b.extend_from_slice(&[if v4 { 7 } else { 8 }, s.protocol]);
                b.extend_from_slice(&(if v4 { 16u16 } else { 40 }).to_be_bytes());
                b.extend_from_slice(&s.start_port.to_be_bytes());
                b.extend_from_slice(&s.end_port.to_be_bytes());
                for a in [s.start, s.end] {
                    match a {
                        IpAddr::V4(a) => b.extend_from_slice(&a.octets()),
                        IpAddr::V6(a) => b.extend_from_slice(&a.octets()),
                    }
                }
            }
        }
        Payload::Other { .. } => {}
    }
    b
}

/// Encodes a payload chain; returns the first payload's type and the octets.
pub fn encode_payloads(payloads: &[Payload]) -> (u8, Vec<u8>) {
    let mut out = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        let body = encode_body(p);
        let next = payloads.get(i + 1).map(|n| n.kind()).unwrap_or(PT_NONE);
        out.push(next);
        out.push(0);
        out.extend_from_slice(&((body.len() + 4) as u16).to_be_bytes());
        out.extend(body);
    }
    (payloads.first().map(|p| p.kind()).unwrap_or(PT_NONE), out)
}

/// The data an ID payload authenticates: its body (type, reserved, data).
pub fn id_body(kind: u8, data: &[u8]) -> Vec<u8> {
    [&[kind, 0, 0, 0][..], data].concat()
}

/// An ID of an address.
pub fn id_of(a: IpAddr) -> (u8, Vec<u8>) {
    match a {
        IpAddr::V4(v) => (ID_IPV4_ADDR, v.octets().to_vec()),
        IpAddr::V6(v) => (ID_IPV6_ADDR, v.octets().to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        let payloads = vec![
            Payload::Sa(vec![
                Proposal {
                    num: 1,
                    protocol: PROTO_IKE,
                    spi: vec![],
                    transforms: vec![
                        Transform {
                            kind: TRANSFORM_ENCR,
                            id: 20,
                            key_len: Some(256),
                        },
                        Transform {
                            kind: TRANSFORM_PRF,
                            id: 6,
                            key_len: None,
                        },
                        Transform {
                            kind: TRANSFORM_DH,
                            id: 20,
                            key_len: None,
                        },
                    ],
                },
                Proposal {
                    num: 2,
                    protocol: PROTO_ESP,
                    spi: vec![1, 2, 3, 4],
                    transforms: vec![Transform {
                        kind: TRANSFORM_ESN,
                        id: 0,
                        key_len: None,
                    }],
                },
            ]),
            Payload::Ke {
                group: 31,
                data: vec![9; 32],
            },
            Payload::Nonce(vec![7; 32]),
            Payload::notify(N_NAT_DETECTION_SOURCE_IP, vec![1; 20]),
            Payload::Id {
                initiator: true,
                kind: ID_IPV4_ADDR,
                data: vec![10, 0, 0, 1],
            },
            Payload::Ts {
                initiator: false,
                selectors: vec![
                    TrafficSelector::from_net("10.1.0.0/16".parse().unwrap()),
                    TrafficSelector::from_net("fd00::/64".parse().unwrap()),
                ],
            },
            Payload::Delete {
                protocol: PROTO_ESP,
                spis: vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8]],
            },
        ];
        let (first, bytes) = encode_payloads(&payloads);
        assert_eq!(first, PT_SA);
        let (back, enc) = decode_payloads(first, &bytes, HEADER_LEN).unwrap();
        assert_eq!(back, payloads);
        assert!(enc.is_none());
    }

    #[test]
    fn header_and_ke_byte_exact() {
        let h = Header {
            spi_i: 0x0102030405060708,
            spi_r: 0,
            next: PT_KE,
            exchange: IKE_SA_INIT,
            flags: FLAG_INITIATOR,
            message_id: 0,
            length: 28 + 12,
        };
        let (_, ke) = encode_payloads(&[Payload::Ke {
            group: 19,
            data: vec![0xaa; 4],
        }]);
        let msg = [h.encode().to_vec(), ke].concat();
        assert_eq!(
            msg,
            [
                &[
                    1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0, 34, 0x20, 34, 0x08, 0, 0, 0, 0,
                    0, 0, 0, 40
                ][..],
                &[0, 0, 0, 12, 0, 19, 0, 0, 0xaa, 0xaa, 0xaa, 0xaa][..]
            ]
            .concat()
        );
        assert_eq!(
            Header::decode(&msg[..28]).unwrap_err().notify,
            N_INVALID_SYNTAX
        );
        assert_eq!(Header::decode(&msg).unwrap(), h);
        let mut v1 = msg.clone();
        v1[17] = 0x10;
        assert_eq!(
            Header::decode(&v1).unwrap_err().notify,
            N_INVALID_MAJOR_VERSION
        );
    }

    #[test]
    fn malformed_payloads_are_errors_not_panics() {
        // Length shorter than a header, longer than the data, a bad TS, unknown critical.
        for (next, body) in [
            (PT_NONCE, vec![0u8, 0, 0, 2]),
            (PT_NONCE, vec![0, 0, 0, 40, 1, 2]),
            (PT_TSI, vec![0, 0, 0, 12, 1, 0, 0, 0, 7, 0, 0, 9]),
            (PT_SA, vec![0, 0, 0, 8, 0, 0, 0, 4]),
            (200, vec![0, 0x80, 0, 4]),
            (PT_NONCE, vec![0, 0, 0, 6, 1, 2]),
        ] {
            assert!(decode_payloads(next, &body, 28).is_err(), "{next} {body:?}");
        }
        // An unknown payload that is not critical is skipped.
        let (p, _) = decode_payloads(200, &[0, 0, 0, 5, 9], 28).unwrap();
        assert_eq!(p, vec![Payload::Other { kind: 200 }]);
        // Random garbage never panics.
        let mut seed = 1u64;
        for _ in 0..20000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (seed >> 56) as usize % 64;
            let buf: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8).collect();
            let _ = decode_payloads((seed >> 40) as u8 % 50, &buf, 28);
            let _ = Header::decode(&buf);
        }
    }

    #[test]
    fn selectors_and_prefixes() {
        for n in [
            "10.1.0.0/16",
            "0.0.0.0/0",
            "10.0.0.1/32",
            "fd00::/48",
            "::/0",
        ] {
            let net: ipnet::IpNet = n.parse().unwrap();
            assert_eq!(TrafficSelector::from_net(net).to_net(), Some(net), "{n}");
        }
        let odd = TrafficSelector {
            protocol: 0,
            start_port: 0,
            end_port: 65535,
            start: "10.0.0.1".parse().unwrap(),
            end: "10.0.0.5".parse().unwrap(),
        };
        assert_eq!(odd.to_net(), None);
    }
}
