//! Stateless cookies (RFC 7296 §2.6): under load, a responder answers IKE_SA_INIT with a
//! COOKIE it can check later without having kept anything, so spoofed floods cost it no
//! state. Cookie = version | SHA-256(Ni | IPi | SPIi | secret); the secret changes every
//! few minutes and the previous one stays valid for one period.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::crypto::{self, ct_eq, Secret};

const ROTATE: Duration = Duration::from_secs(300);

pub struct Cookies {
    version: u32,
    secret: Secret,
    previous: Secret,
    since: Instant,
}

impl Default for Cookies {
    fn default() -> Self {
        Cookies {
            version: 1,
            secret: Secret::new(crypto::random(32)),
            previous: Secret::new(crypto::random(32)),
            since: Instant::now(),
        }
    }
}

fn digest(secret: &Secret, ni: &[u8], ip: IpAddr, spi_i: u64) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(ni);
    match ip {
        IpAddr::V4(a) => h.update(a.octets()),
        IpAddr::V6(a) => h.update(a.octets()),
    }
    h.update(spi_i.to_be_bytes());
    h.update(secret.bytes());
    h.finalize().to_vec()
}

impl Cookies {
    fn rotate(&mut self, now: Instant) {
        if now.duration_since(self.since) >= ROTATE {
            self.previous = std::mem::replace(&mut self.secret, Secret::new(crypto::random(32)));
            self.version = self.version.wrapping_add(1);
            self.since = now;
        }
    }

    /// The cookie for this initiator.
    pub fn make(&mut self, ni: &[u8], ip: IpAddr, spi_i: u64, now: Instant) -> Vec<u8> {
        self.rotate(now);
        let mut c = self.version.to_be_bytes().to_vec();
        c.extend(digest(&self.secret, ni, ip, spi_i));
        c
    }

    /// Whether `cookie` is one we made for this initiator, now or one period ago.
    pub fn check(
        &mut self,
        cookie: &[u8],
        ni: &[u8],
        ip: IpAddr,
        spi_i: u64,
        now: Instant,
    ) -> bool {
        self.rotate(now);
        let Some((v, hash)) = cookie.split_first_chunk::<4>() else {
            return false;
        };
        let v = u32::from_be_bytes(*v);
        let secret = if v == self.version {
            &self.secret
        } else if v == self.version.wrapping_sub(1) {
            &self.previous
        } else {
            return false;
        };
        ct_eq(hash, &digest(secret, ni, ip, spi_i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_check_their_initiator_and_survive_one_rotation() {
        let mut c = Cookies::default();
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let t = Instant::now();
        let k = c.make(b"nonce-of-the-initiator", ip, 7, t);
        assert!(c.check(&k, b"nonce-of-the-initiator", ip, 7, t));
        assert!(
            !c.check(&k, b"nonce-of-the-initiator", ip, 8, t),
            "other SPI"
        );
        assert!(
            !c.check(&k, b"another-nonce-entirely", ip, 7, t),
            "other nonce"
        );
        assert!(!c.check(
            &k,
            b"nonce-of-the-initiator",
            "192.0.2.10".parse().unwrap(),
            7,
            t
        ));
        assert!(!c.check(&k[..3], b"nonce-of-the-initiator", ip, 7, t));
        let t1 = t + ROTATE;
        assert!(
            c.check(&k, b"nonce-of-the-initiator", ip, 7, t1),
            "one period later"
        );
        let t2 = t1 + ROTATE;
        assert!(
            !c.check(&k, b"nonce-of-the-initiator", ip, 7, t2),
            "two periods later"
        );
    }
}
