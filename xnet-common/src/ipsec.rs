//! How XFRM request ids name IPsec connectors, shared by the agent (which sets them on its
//! SAs) and the data plane (which finds a decrypted packet's connector from its SA's).

/// Connectors the data plane knows (`TUNNELS` entries).
pub const MAX_CONNECTORS: u32 = 4096;

/// The reqid of connector `i`'s `n`-th set of traffic selectors (each set has its own, so
/// XFRM keeps their SAs apart); the first is also the if_id of its xfrm interface.
pub const fn reqid(i: u32, n: u32) -> u32 {
    if n == 0 {
        0x100 + i
    } else {
        0x1_0000 + i * 0x100 + n
    }
}

/// The connector a reqid of [`reqid`] belongs to.
#[inline(always)]
pub const fn connector_of(reqid: u32) -> Option<u32> {
    let i = if reqid >= 0x1_0000 {
        (reqid - 0x1_0000) >> 8
    } else if reqid >= 0x100 {
        reqid - 0x100
    } else {
        return None;
    };
    if i < MAX_CONNECTORS {
        Some(i)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reqid_names_its_connector() {
        for i in [0, 1, 7, 255, MAX_CONNECTORS - 1] {
            for n in [0, 1, 2, 255] {
                assert_eq!(connector_of(reqid(i, n)), Some(i), "connector {i} set {n}");
            }
        }
        assert_eq!(connector_of(0), None);
        assert_eq!(connector_of(0xff), None);
    }
}
