//! IPFIX messages (RFC 7011) carrying flow records in the information elements of the
//! IANA registry (RFC 7012): one template for IPv4 flows and one for IPv6, data sets of
//! records, messages that fit one UDP datagram without fragmentation. Each record names
//! its sampler (selectorId); an options template reports each sampler's rate (RFC 5476
//! selector reports), from which a collector scales the counts (nfdump does).

use std::net::IpAddr;

use xnet_common::Reason;

use super::cache::Record;

pub const VERSION: u16 = 10;
const SET_TEMPLATE: u16 = 2;
const SET_OPTIONS_TEMPLATE: u16 = 3;
pub const TEMPLATE_V4: u16 = 256;
pub const TEMPLATE_V6: u16 = 257;
/// The options template of the selector reports.
pub const TEMPLATE_SAMPLER: u16 = 258;
/// PSAMP selectorAlgorithm (IANA): uniform probabilistic sampling, what XDP does (each
/// packet with probability 1/N).
const UNIFORM_PROBABILISTIC: u16 = 4;
/// Below a 1500-byte path's UDP payload (IPv6 header and UDP header off).
pub const MAX_MESSAGE: usize = 1400;
const HEADER: usize = 16;

/// Information elements (IANA "IPFIX Information Elements").
mod ie {
    pub const OCTET_DELTA_COUNT: u16 = 1;
    pub const PACKET_DELTA_COUNT: u16 = 2;
    pub const PROTOCOL_IDENTIFIER: u16 = 4;
    pub const SOURCE_TRANSPORT_PORT: u16 = 7;
    pub const SOURCE_IPV4_ADDRESS: u16 = 8;
    pub const INGRESS_INTERFACE: u16 = 10;
    pub const DESTINATION_TRANSPORT_PORT: u16 = 11;
    pub const DESTINATION_IPV4_ADDRESS: u16 = 12;
    pub const EGRESS_INTERFACE: u16 = 14;
    pub const SOURCE_IPV6_ADDRESS: u16 = 27;
    pub const DESTINATION_IPV6_ADDRESS: u16 = 28;
    pub const FORWARDING_STATUS: u16 = 89;
    pub const FLOW_START_MILLISECONDS: u16 = 152;
    pub const FLOW_END_MILLISECONDS: u16 = 153;
    pub const INGRESS_VRFID: u16 = 234;
    pub const SELECTOR_ID: u16 = 302;
    pub const SELECTOR_ALGORITHM: u16 = 304;
    pub const SAMPLING_PACKET_INTERVAL: u16 = 305;
    pub const SAMPLING_PACKET_SPACE: u16 = 306;
}

/// Our enterprise-specific element (RFC 7011 §3.2): the policy rule a flow matched
/// (index + 1; 0: none), unsigned32, under the operator's Private Enterprise Number.
pub const IE_POLICY_RULE: u16 = 1;

/// (element, length) of each field, in record order, after the two addresses.
const FIELDS: &[(u16, u16)] = &[
    (ie::PROTOCOL_IDENTIFIER, 1),
    (ie::SOURCE_TRANSPORT_PORT, 2),
    (ie::DESTINATION_TRANSPORT_PORT, 2),
    (ie::INGRESS_INTERFACE, 4),
    (ie::EGRESS_INTERFACE, 4),
    (ie::INGRESS_VRFID, 4),
    // forwardingStatus is unsigned32 with reduced-size encoding allowed (RFC 7270 §4.12,
    // RFC 7011 §6.2): its one meaningful octet.
    (ie::FORWARDING_STATUS, 1),
    (ie::PACKET_DELTA_COUNT, 8),
    (ie::OCTET_DELTA_COUNT, 8),
    (ie::FLOW_START_MILLISECONDS, 8),
    (ie::FLOW_END_MILLISECONDS, 8),
    // The sampler: its id is the 1-in-N rate (see the selector reports).
    (ie::SELECTOR_ID, 8),
];

/// RFC 7270's forwardingStatus: status in the top two bits, reason below.
pub fn forwarding_status(r: Reason) -> u8 {
    const FORWARDED: u8 = 0b01 << 6;
    const DROPPED: u8 = 0b10 << 6;
    match r {
        // The kernel sends these on (encrypted into a tunnel; once the neighbour
        // answers): forwarded, reason unknown.
        Reason::Forwarded | Reason::Steered | Reason::PassTunnel | Reason::PassNoNeighbour => {
            FORWARDED
        }
        // "Drop ACL deny".
        Reason::DropPolicy => DROPPED | 1,
        // "Drop unroutable": the kernel FIB mirrors the same table.
        Reason::PassNoRoute => DROPPED | 3,
        _ => DROPPED,
    }
}

/// Builds IPFIX messages for one observation domain; counts the data records sent (the
/// header's sequence number, RFC 7011 §3.1).
pub struct Encoder {
    domain: u32,
    /// Our PEN for the policy-rule element; None: the element is left out.
    enterprise: Option<u32>,
    sequence: u32,
}

impl Encoder {
    pub fn new(domain: u32, enterprise: Option<u32>) -> Encoder {
        Encoder {
            domain,
            enterprise,
            sequence: 0,
        }
    }

    /// The template set (both templates).
    fn templates(&self) -> Vec<u8> {
        let mut set = Vec::new();
        for (id, addr_ies, addr_len) in [
            (
                TEMPLATE_V4,
                [ie::SOURCE_IPV4_ADDRESS, ie::DESTINATION_IPV4_ADDRESS],
                4u16,
            ),
            (
                TEMPLATE_V6,
                [ie::SOURCE_IPV6_ADDRESS, ie::DESTINATION_IPV6_ADDRESS],
                16,
            ),
        ] {
            let count = 2 + FIELDS.len() + usize::from(self.enterprise.is_some());
            set.extend(id.to_be_bytes());
            set.extend((count as u16).to_be_bytes());
            for e in addr_ies {
                set.extend(e.to_be_bytes());
                set.extend(addr_len.to_be_bytes());
            }
            for (e, len) in FIELDS {
                set.extend(e.to_be_bytes());
                set.extend(len.to_be_bytes());
            }
            if let Some(pen) = self.enterprise {
                set.extend((IE_POLICY_RULE | 0x8000).to_be_bytes());
                set.extend(4u16.to_be_bytes());
                set.extend(pen.to_be_bytes());
            }
        }
        let mut out = with_set_header(SET_TEMPLATE, set);
        // The selector report's options template (RFC 7011 §3.4.2.2): scope selectorId.
        let mut opt = Vec::new();
        opt.extend(TEMPLATE_SAMPLER.to_be_bytes());
        opt.extend(4u16.to_be_bytes());
        opt.extend(1u16.to_be_bytes());
        for (e, len) in [
            (ie::SELECTOR_ID, 8u16),
            (ie::SELECTOR_ALGORITHM, 2),
            (ie::SAMPLING_PACKET_INTERVAL, 4),
            (ie::SAMPLING_PACKET_SPACE, 4),
        ] {
            opt.extend(e.to_be_bytes());
            opt.extend(len.to_be_bytes());
        }
        out.extend(with_set_header(SET_OPTIONS_TEMPLATE, opt));
        out
    }

    /// One selector report per sampling rate in use: 1 packet in N, so an interval of 1
    /// and a space of N - 1.
    fn selector_reports(rates: &[u32]) -> Vec<u8> {
        let mut set = Vec::new();
        for &n in rates {
            set.extend(u64::from(n).to_be_bytes());
            set.extend(UNIFORM_PROBABILISTIC.to_be_bytes());
            set.extend(1u32.to_be_bytes());
            set.extend(n.saturating_sub(1).to_be_bytes());
        }
        with_set_header(TEMPLATE_SAMPLER, set)
    }

    fn record(&self, r: &Record) -> Vec<u8> {
        let k = &r.key;
        let mut b = Vec::with_capacity(96);
        for a in [k.src, k.dst] {
            match a {
                IpAddr::V4(a) => b.extend(a.octets()),
                IpAddr::V6(a) => b.extend(a.octets()),
            }
        }
        b.push(k.proto);
        b.extend(k.sport.to_be_bytes());
        b.extend(k.dport.to_be_bytes());
        b.extend(k.ingress.to_be_bytes());
        b.extend(k.egress.to_be_bytes());
        b.extend(k.segment.to_be_bytes());
        b.push(forwarding_status(k.reason));
        b.extend(r.packets.to_be_bytes());
        b.extend(r.bytes.to_be_bytes());
        b.extend(r.first_ms.to_be_bytes());
        b.extend(r.last_ms.to_be_bytes());
        b.extend(u64::from(r.sampling).to_be_bytes());
        if self.enterprise.is_some() {
            b.extend(k.rule.to_be_bytes());
        }
        b
    }

    /// The messages that carry `records`, exported at `now_secs` (Unix seconds); the
    /// first one starts with the templates and the selector reports of `rates` when
    /// `templates` is set (the first message to a collector, and periodically: UDP loses
    /// and collectors restart, RFC 7011 §8.4).
    pub fn messages(
        &mut self,
        records: &[Record],
        rates: &[u32],
        now_secs: u32,
        templates: bool,
    ) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut body = Vec::new();
        if templates {
            body = self.templates();
            if !rates.is_empty() {
                body.extend(Self::selector_reports(rates));
            }
        }
        let mut records_in_body = 0u32;
        // Records grouped by template, each group in data sets of whole records.
        let mut pending: Vec<(u16, Vec<u8>)> = Vec::new();
        for r in records {
            let id = if r.key.src.is_ipv4() {
                TEMPLATE_V4
            } else {
                TEMPLATE_V6
            };
            pending.push((id, self.record(r)));
        }
        let mut i = 0;
        while i < pending.len() {
            let id = pending[i].0;
            let mut set = Vec::new();
            let mut n = 0;
            while i < pending.len()
                && pending[i].0 == id
                && HEADER + body.len() + 4 + set.len() + pending[i].1.len() <= MAX_MESSAGE
            {
                set.extend(&pending[i].1);
                i += 1;
                n += 1;
            }
            if n == 0 {
                // The message is full: send it, the record goes into the next one.
                out.push(self.message(std::mem::take(&mut body), now_secs, records_in_body));
                records_in_body = 0;
                continue;
            }
            body.extend(with_set_header(id, set));
            records_in_body += n;
        }
        if !body.is_empty() {
            out.push(self.message(body, now_secs, records_in_body));
        }
        out
    }

    /// A message: header and sets. The sequence number counts data records sent before
    /// this message.
    fn message(&mut self, body: Vec<u8>, now_secs: u32, records: u32) -> Vec<u8> {
        let mut m = Vec::with_capacity(HEADER + body.len());
        m.extend(VERSION.to_be_bytes());
        m.extend(((HEADER + body.len()) as u16).to_be_bytes());
        m.extend(now_secs.to_be_bytes());
        m.extend(self.sequence.to_be_bytes());
        m.extend(self.domain.to_be_bytes());
        m.extend(body);
        self.sequence = self.sequence.wrapping_add(records);
        m
    }
}

fn with_set_header(id: u16, content: Vec<u8>) -> Vec<u8> {
    let mut s = Vec::with_capacity(4 + content.len());
    s.extend(id.to_be_bytes());
    s.extend(((4 + content.len()) as u16).to_be_bytes());
    s.extend(content);
    s
}

#[cfg(test)]
mod tests {
    use super::super::cache::Key;
    use super::*;

    fn record(src: &str, dst: &str) -> Record {
        Record {
            key: Key {
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
                proto: 17,
                sport: 5000,
                dport: 9000,
                segment: 1,
                ingress: 2,
                egress: 3,
                rule: 1,
                reason: Reason::Steered,
            },
            packets: 2,
            bytes: 300,
            first_ms: 1_700_000_000_000,
            last_ms: 1_700_000_000_400,
            sampling: 1000,
        }
    }

    #[test]
    fn a_message_with_templates_and_one_ipv4_record_byte_for_byte() {
        let mut e = Encoder::new(7, Some(32473));
        let m = e.messages(
            &[record("10.1.0.1", "192.168.10.1")],
            &[1000],
            1_700_000_001,
            true,
        );
        assert_eq!(m.len(), 1);
        let m = &m[0];
        // Header: version 10, length, export time, sequence 0, domain 7.
        assert_eq!(&m[..2], &[0, 10]);
        assert_eq!(u16::from_be_bytes([m[2], m[3]]) as usize, m.len());
        assert_eq!(&m[4..16], &[0x65, 0x53, 0xf1, 0x01, 0, 0, 0, 0, 0, 0, 0, 7]);
        // Template set: id 2; template 256 with 15 fields, first sourceIPv4Address/4.
        assert_eq!(&m[16..18], &[0, 2]);
        let tlen = u16::from_be_bytes([m[18], m[19]]) as usize;
        assert_eq!(&m[20..28], &[1, 0, 0, 15, 0, 8, 0, 4]);
        // Its last field: enterprise bit + element 1, length 4, PEN 32473.
        let t256_end = 20 + 4 + 14 * 4 + 8;
        assert_eq!(
            &m[t256_end - 8..t256_end],
            &[0x80, 1, 0, 4, 0, 0, 0x7e, 0xd9]
        );
        assert_eq!(&m[t256_end..t256_end + 8], &[1, 1, 0, 15, 0, 27, 0, 16]);
        assert_eq!(tlen, 4 + 2 * (4 + 14 * 4 + 8));
        // Options template set: id 3, template 258, 4 fields, 1 scope field (selectorId).
        let o = &m[16 + tlen..];
        assert_eq!(
            &o[..26],
            &[0, 3, 0, 26, 1, 2, 0, 4, 0, 1, 1, 46, 0, 8, 1, 48, 0, 2, 1, 49, 0, 4, 1, 50, 0, 4]
        );
        // Selector report: sampler 1000, uniform probabilistic, interval 1, space 999.
        assert_eq!(
            &o[26..48],
            &[1, 2, 0, 22, 0, 0, 0, 0, 0, 0, 3, 0xe8, 0, 4, 0, 0, 0, 1, 0, 0, 3, 0xe7]
        );
        // Data set 256: one record of 4+4+1+2+2+4+4+4+1+8+8+8+8+8+4 = 70 bytes.
        let d = &o[48..];
        assert_eq!(&d[..4], &[1, 0, 0, 74]);
        let r = &d[4..];
        assert_eq!(&r[..8], &[10, 1, 0, 1, 192, 168, 10, 1]);
        assert_eq!(r[8], 17);
        assert_eq!(&r[9..13], &[0x13, 0x88, 0x23, 0x28]);
        assert_eq!(&r[13..25], &[0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 1]);
        assert_eq!(r[25], 0x40, "forwardingStatus: forwarded");
        assert_eq!(
            &r[26..42],
            &[0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 1, 0x2c]
        );
        assert_eq!(&r[58..66], &[0, 0, 0, 0, 0, 0, 0x03, 0xe8], "selectorId");
        assert_eq!(&r[66..70], &[0, 0, 0, 1], "the rule, enterprise element");
        assert_eq!(r.len(), 70);
        // The next message's sequence number counts the record sent.
        let m2 = e.messages(
            &[record("fd01::1", "fd03::1")],
            &[1000],
            1_700_000_002,
            false,
        );
        assert_eq!(&m2[0][8..12], &[0, 0, 0, 1]);
        assert_eq!(
            &m2[0][16..18],
            &[1, 1],
            "an IPv6 record in a set of template 257"
        );
    }

    #[test]
    fn many_records_split_into_messages_that_fit_a_datagram() {
        let mut e = Encoder::new(1, None);
        let recs: Vec<Record> = (0..100)
            .map(|_| record("10.1.0.1", "192.168.10.1"))
            .collect();
        let ms = e.messages(&recs, &[], 0, true);
        assert!(ms.len() > 1);
        let mut seen = 0u32;
        for m in &ms {
            assert!(m.len() <= MAX_MESSAGE);
            assert_eq!(u32::from_be_bytes([m[8], m[9], m[10], m[11]]), seen);
            // Records in this message: walk its sets.
            let mut at = HEADER;
            while at < m.len() {
                let id = u16::from_be_bytes([m[at], m[at + 1]]);
                let len = u16::from_be_bytes([m[at + 2], m[at + 3]]) as usize;
                if id == TEMPLATE_V4 {
                    seen += ((len - 4) / 66) as u32;
                }
                at += len;
            }
        }
        assert_eq!(seen, 100, "without the rule element a record is 66 bytes");
    }

    #[test]
    fn drops_carry_their_reason() {
        assert_eq!(forwarding_status(Reason::DropPolicy), 0x81);
        assert_eq!(forwarding_status(Reason::PassNoRoute), 0x83);
        assert_eq!(forwarding_status(Reason::DropFailClosed), 0x80);
    }
}
