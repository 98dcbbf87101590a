//! Internet checksum (RFC 1071) and its incremental update (RFC 1624), used by the XDP
//! program for the TTL decrement and by tests to check the result.

/// Incremental update of a checksum field when one 16-bit word changes from `old` to `new`
/// (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')). All values in the same byte order.
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!check as u32) + (!old as u32 & 0xffff) + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Full checksum over `data` (big-endian words), as stored in an IPv4 header.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let (words, rest) = data.as_chunks::<2>();
    for w in words {
        sum += u16::from_be_bytes(*w) as u32;
    }
    if let [last] = rest {
        sum += (*last as u32) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(ttl: u8) -> [u8; 20] {
        let mut h = [
            0x45, 0, 0, 0x54, 0x12, 0x34, 0x40, 0, ttl, 17, 0, 0, 10, 0, 1, 2, 10, 0, 2, 2,
        ];
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    #[test]
    fn ttl_decrement_matches_full_recompute() {
        for ttl in [2u8, 64, 128, 255] {
            let mut h = header(ttl);
            let old = u16::from_be_bytes([h[8], h[9]]);
            h[8] -= 1;
            let new = u16::from_be_bytes([h[8], h[9]]);
            let c = replace16(u16::from_be_bytes([h[10], h[11]]), old, new);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            assert_eq!(checksum(&h), 0, "ttl {ttl}: header must verify");
            assert_eq!(h, header(ttl - 1), "ttl {ttl}: same as a full recompute");
        }
    }

    #[test]
    fn checksum_of_valid_header_is_zero() {
        assert_eq!(checksum(&header(64)), 0);
    }
}
