//! IKEv2 cryptography on RustCrypto: PRFs and prf+ (RFC 7296 §2.13), Diffie-Hellman
//! groups 14, 19, 20, 21 and 31, key derivation (§2.14, §2.17), the Encrypted payload's
//! ciphers (AES-GCM-16 per RFC 5282, AES-CBC + HMAC-SHA2 per RFC 7296 §3.14) and PSK
//! authentication (§2.15). Secrets are zeroised on drop; tags compare in constant time.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes128Gcm, Aes256Gcm};
use cbc::cipher::{block_padding::NoPadding, BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use crypto_bigint::modular::{FixedMontyForm, FixedMontyParams};
use crypto_bigint::{Odd, U2048};
use hmac::{Hmac, Mac};
use sha2::{Sha256, Sha384, Sha512};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

/// Secret bytes: zeroised when dropped, never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub Zeroizing<Vec<u8>>);

impl Secret {
    pub fn new(v: Vec<u8>) -> Self {
        Secret(Zeroizing::new(v))
    }
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} secret bytes>", self.0.len())
    }
}

pub fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    getrandom::fill(&mut v).expect("the kernel's random source");
    v
}

/// Pseudo-random functions (transform type 2) by IANA id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prf {
    HmacSha256 = 5,
    HmacSha384 = 6,
    HmacSha512 = 7,
}

impl Prf {
    pub fn from_id(id: u16) -> Option<Self> {
        Some(match id {
            5 => Prf::HmacSha256,
            6 => Prf::HmacSha384,
            7 => Prf::HmacSha512,
            _ => return None,
        })
    }

    /// Output and preferred key length.
    pub fn out_len(self) -> usize {
        match self {
            Prf::HmacSha256 => 32,
            Prf::HmacSha384 => 48,
            Prf::HmacSha512 => 64,
        }
    }

    pub fn prf(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        fn run<M: Mac + hmac::KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
            let mut m = <M as hmac::KeyInit>::new_from_slice(key).expect("HMAC takes any key");
            for p in parts {
                m.update(p);
            }
            m.finalize().into_bytes().to_vec()
        }
        match self {
            Prf::HmacSha256 => run::<Hmac<Sha256>>(key, parts),
            Prf::HmacSha384 => run::<Hmac<Sha384>>(key, parts),
            Prf::HmacSha512 => run::<Hmac<Sha512>>(key, parts),
        }
    }

    /// prf+ (§2.13): T1 | T2 | … with Tn = prf(K, Tn-1 | S | n), cut to `len`.
    pub fn prf_plus(self, key: &[u8], seed: &[u8], len: usize) -> Secret {
        let mut out = Vec::with_capacity(len + self.out_len());
        let mut t: Vec<u8> = Vec::new();
        let mut n = 1u8;
        while out.len() < len {
            let next = self.prf(key, &[&t, seed, &[n]]);
            t.zeroize();
            t = next;
            out.extend_from_slice(&t);
            n = n.wrapping_add(1);
        }
        t.zeroize();
        out.truncate(len);
        Secret::new(out)
    }
}

/// Integrity algorithms (transform type 3): HMAC-SHA2 truncated to half (RFC 4868).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Integ {
    HmacSha256_128 = 12,
    HmacSha384_192 = 13,
    HmacSha512_256 = 14,
}

impl Integ {
    pub fn from_id(id: u16) -> Option<Self> {
        Some(match id {
            12 => Integ::HmacSha256_128,
            13 => Integ::HmacSha384_192,
            14 => Integ::HmacSha512_256,
            _ => return None,
        })
    }
    pub fn key_len(self) -> usize {
        self.prf().out_len()
    }
    pub fn icv_len(self) -> usize {
        self.prf().out_len() / 2
    }
    fn prf(self) -> Prf {
        match self {
            Integ::HmacSha256_128 => Prf::HmacSha256,
            Integ::HmacSha384_192 => Prf::HmacSha384,
            Integ::HmacSha512_256 => Prf::HmacSha512,
        }
    }
    pub fn mac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        let mut m = self.prf().prf(key, &[data]);
        m.truncate(self.icv_len());
        m
    }
    /// The Linux XFRM name (`auth-trunc`).
    pub fn xfrm_name(self) -> &'static str {
        match self {
            Integ::HmacSha256_128 => "hmac(sha256)",
            Integ::HmacSha384_192 => "hmac(sha384)",
            Integ::HmacSha512_256 => "hmac(sha512)",
        }
    }
}

/// Encryption algorithms (transform type 1) with their key length in bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encr {
    AesCbc(u16),
    AesGcm16(u16),
}

pub const ENCR_AES_CBC: u16 = 12;
pub const ENCR_AES_GCM_16: u16 = 20;

impl Encr {
    pub fn from_id(id: u16, bits: Option<u16>) -> Option<Self> {
        let bits = bits?;
        if bits != 128 && bits != 256 {
            return None;
        }
        match id {
            ENCR_AES_CBC => Some(Encr::AesCbc(bits)),
            ENCR_AES_GCM_16 => Some(Encr::AesGcm16(bits)),
            _ => None,
        }
    }
    pub fn id(self) -> u16 {
        match self {
            Encr::AesCbc(_) => ENCR_AES_CBC,
            Encr::AesGcm16(_) => ENCR_AES_GCM_16,
        }
    }
    pub fn bits(self) -> u16 {
        match self {
            Encr::AesCbc(b) | Encr::AesGcm16(b) => b,
        }
    }
    pub fn is_aead(self) -> bool {
        matches!(self, Encr::AesGcm16(_))
    }
    /// Key material taken from prf+: the key, plus a 4-octet salt for GCM (RFC 5282 §7.1).
    pub fn key_len(self) -> usize {
        self.bits() as usize / 8 + if self.is_aead() { 4 } else { 0 }
    }
    fn iv_len(self) -> usize {
        if self.is_aead() {
            8
        } else {
            16
        }
    }
}

/// Diffie-Hellman groups (transform type 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DhGroup {
    Modp2048 = 14,
    Ecp256 = 19,
    Ecp384 = 20,
    Ecp521 = 21,
    Curve25519 = 31,
}

impl DhGroup {
    pub fn from_id(id: u16) -> Option<Self> {
        Some(match id {
            14 => DhGroup::Modp2048,
            19 => DhGroup::Ecp256,
            20 => DhGroup::Ecp384,
            21 => DhGroup::Ecp521,
            31 => DhGroup::Curve25519,
            _ => return None,
        })
    }
    pub fn id(self) -> u16 {
        self as u16
    }
    /// Length of the public value in the KE payload.
    pub fn public_len(self) -> usize {
        match self {
            DhGroup::Modp2048 => 256,
            DhGroup::Ecp256 => 64,
            DhGroup::Ecp384 => 96,
            DhGroup::Ecp521 => 132,
            DhGroup::Curve25519 => 32,
        }
    }
}

/// RFC 3526 §3, the 2048-bit MODP group; generator 2.
const MODP2048: &str = "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF";

/// One side's ephemeral key pair.
pub struct Dh {
    pub group: DhGroup,
    secret: Secret,
    pub public: Vec<u8>,
}

fn modp_params() -> FixedMontyParams<{ U2048::LIMBS }> {
    let p = U2048::from_be_hex(MODP2048);
    FixedMontyParams::new_vartime(Odd::new(p).expect("odd prime"))
}

/// Splits an IKE ECP public value (x ‖ y) into SEC1 uncompressed form.
fn sec1(public: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(public.len() + 1);
    v.push(4);
    v.extend_from_slice(public);
    v
}

macro_rules! ecp {
    ($curve:ident, $len:expr) => {{
        loop {
            let k = Zeroizing::new(random($len));
            if let Ok(sk) = $curve::SecretKey::from_slice(&k) {
                let pk = sk.public_key().to_sec1_bytes();
                break (Secret::new(k.to_vec()), pk[1..].to_vec());
            }
        }
    }};
}

macro_rules! ecp_shared {
    ($curve:ident, $secret:expr, $peer:expr) => {{
        let sk = $curve::SecretKey::from_slice($secret).map_err(|_| "bad key")?;
        let pk = $curve::PublicKey::from_sec1_bytes(&sec1($peer))
            .map_err(|_| "peer's public value is not a point of the curve")?;
        Secret::new(sk.diffie_hellman(&pk).raw_secret_bytes().to_vec())
    }};
}

impl Dh {
    pub fn new(group: DhGroup) -> Self {
        let (secret, public) = match group {
            DhGroup::Modp2048 => {
                // A 256-bit exponent: twice the group's ~112-bit strength (RFC 3526 §8).
                let x = Zeroizing::new(random(32));
                let e = U2048::from_be_slice(&[vec![0u8; 224], x.to_vec()].concat());
                let g = FixedMontyForm::new(&U2048::from_u8(2), &modp_params());
                let y = g.pow(&e).retrieve();
                (Secret::new(x.to_vec()), y.to_be_bytes().to_vec())
            }
            DhGroup::Ecp256 => ecp!(p256, 32),
            DhGroup::Ecp384 => ecp!(p384, 48),
            DhGroup::Ecp521 => {
                // The 521-bit scalar takes 66 octets with 7 leading zero bits.
                loop {
                    let mut k = Zeroizing::new(random(66));
                    k[0] &= 1;
                    if let Ok(sk) = p521::SecretKey::from_slice(&k) {
                        let pk = sk.public_key().to_sec1_bytes();
                        break (Secret::new(k.to_vec()), pk[1..].to_vec());
                    }
                }
            }
            DhGroup::Curve25519 => {
                let k: [u8; 32] = random(32).try_into().unwrap();
                let public = x25519_dalek::x25519(k, x25519_dalek::X25519_BASEPOINT_BYTES);
                (Secret::new(k.to_vec()), public.to_vec())
            }
        };
        Dh {
            group,
            secret,
            public,
        }
    }

    /// g^ir from the peer's public value; an invalid value is an error, not a panic.
    pub fn shared(&self, peer: &[u8]) -> Result<Secret, &'static str> {
        if peer.len() != self.group.public_len() {
            return Err("KE data has the wrong length for its group");
        }
        Ok(match self.group {
            DhGroup::Modp2048 => {
                let p = U2048::from_be_hex(MODP2048);
                let y = U2048::from_be_slice(peer);
                // RFC 7296 §2.7 / SP 800-56A: 1 < y < p-1.
                if y <= U2048::ONE || y >= p.wrapping_sub(&U2048::ONE) {
                    return Err("MODP public value out of range");
                }
                let e =
                    U2048::from_be_slice(&[vec![0u8; 224], self.secret.bytes().to_vec()].concat());
                let s = FixedMontyForm::new(&y, &modp_params()).pow(&e).retrieve();
                Secret::new(s.to_be_bytes().to_vec())
            }
            DhGroup::Ecp256 => ecp_shared!(p256, self.secret.bytes(), peer),
            DhGroup::Ecp384 => ecp_shared!(p384, self.secret.bytes(), peer),
            DhGroup::Ecp521 => ecp_shared!(p521, self.secret.bytes(), peer),
            DhGroup::Curve25519 => {
                let k: [u8; 32] = self.secret.bytes().try_into().unwrap();
                let s = x25519_dalek::x25519(k, peer.try_into().unwrap());
                if s.iter().all(|&b| b == 0) {
                    return Err("Curve25519 public value of small order");
                }
                Secret::new(s.to_vec())
            }
        })
    }
}

/// The keys of an IKE SA (§2.14).
#[derive(Debug, Clone)]
pub struct IkeKeys {
    pub d: Secret,
    pub ai: Secret,
    pub ar: Secret,
    pub ei: Secret,
    pub er: Secret,
    pub pi: Secret,
    pub pr: Secret,
}

/// The algorithms of an IKE SA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IkeSuite {
    pub encr: Encr,
    pub prf: Prf,
    pub integ: Option<Integ>,
    pub dh: DhGroup,
}

impl IkeKeys {
    /// SKEYSEED = prf(Ni | Nr, g^ir); {SK_d | SK_ai | …} = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr).
    pub fn derive(s: &IkeSuite, shared: &Secret, ni: &[u8], nr: &[u8], spis: &[u8; 16]) -> Self {
        let skeyseed = Zeroizing::new(s.prf.prf(&[ni, nr].concat(), &[shared.bytes()]));
        Self::from_seed(s, &skeyseed, &[ni, nr, spis].concat())
    }

    /// IKE SA rekey (§2.18): SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr).
    pub fn rekey(
        s: &IkeSuite,
        old_d: &Secret,
        shared: &Secret,
        ni: &[u8],
        nr: &[u8],
        spis: &[u8; 16],
    ) -> Self {
        let skeyseed = Zeroizing::new(s.prf.prf(old_d.bytes(), &[shared.bytes(), ni, nr]));
        Self::from_seed(s, &skeyseed, &[ni, nr, spis].concat())
    }

    fn from_seed(s: &IkeSuite, skeyseed: &[u8], seed: &[u8]) -> Self {
        let (p, a, e) = (
            s.prf.out_len(),
            s.integ.map(|i| i.key_len()).unwrap_or(0),
            s.encr.key_len(),
        );
        let k = s.prf.prf_plus(skeyseed, seed, p + 2 * a + 2 * e + 2 * p);
        let k = k.bytes();
        let mut at = 0;
        let mut take = |n: usize| {
            let v = Secret::new(k[at..at + n].to_vec());
            at += n;
            v
        };
        IkeKeys {
            d: take(p),
            ai: take(a),
            ar: take(a),
            ei: take(e),
            er: take(e),
            pi: take(p),
            pr: take(p),
        }
    }
}

/// Keys of a CHILD SA: KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr) (§2.17), initiator to
/// responder first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildKeys {
    pub encr_i: Secret,
    pub integ_i: Secret,
    pub encr_r: Secret,
    pub integ_r: Secret,
}

impl ChildKeys {
    pub fn derive(
        prf: Prf,
        sk_d: &Secret,
        encr: Encr,
        integ: Option<Integ>,
        pfs: Option<&Secret>,
        ni: &[u8],
        nr: &[u8],
    ) -> Self {
        let (e, a) = (encr.key_len(), integ.map(|i| i.key_len()).unwrap_or(0));
        let seed = [pfs.map(|s| s.bytes()).unwrap_or(&[]), ni, nr].concat();
        let k = prf.prf_plus(sk_d.bytes(), &seed, 2 * (e + a));
        let k = k.bytes();
        ChildKeys {
            encr_i: Secret::new(k[..e].to_vec()),
            integ_i: Secret::new(k[e..e + a].to_vec()),
            encr_r: Secret::new(k[e + a..2 * e + a].to_vec()),
            integ_r: Secret::new(k[2 * e + a..].to_vec()),
        }
    }
}

/// PSK authentication (§2.15): prf(prf(PSK, "Key Pad for IKEv2"), octets).
pub fn psk_auth(prf: Prf, psk: &[u8], signed_octets: &[u8]) -> Vec<u8> {
    let key = Zeroizing::new(prf.prf(psk, &[b"Key Pad for IKEv2"]));
    prf.prf(&key, &[signed_octets])
}

pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The ciphers of one direction of an IKE SA's Encrypted payload.
pub struct SkCipher<'a> {
    pub encr: Encr,
    pub integ: Option<Integ>,
    pub ek: &'a [u8],
    pub ak: &'a [u8],
}

impl SkCipher<'_> {
    /// Overhead around the plaintext, for sizing: IV, padding length octet, ICV.
    pub fn icv_len(&self) -> usize {
        match self.encr {
            Encr::AesGcm16(_) => 16,
            Encr::AesCbc(_) => self.integ.map(|i| i.icv_len()).unwrap_or(0),
        }
    }

    /// Length of the Encrypted payload's body for `plain` octets of payloads.
    pub fn sealed_len(&self, plain: usize) -> usize {
        let ct = match self.encr {
            Encr::AesGcm16(_) => plain + 1,
            Encr::AesCbc(_) => (plain + 1).div_ceil(16) * 16,
        };
        self.encr.iv_len() + ct + self.icv_len()
    }

    /// Encrypts `plain` into the body of an Encrypted payload: IV | ciphertext | ICV.
    /// `header` is the message up to and including the Encrypted payload's generic
    /// header, with the final lengths already in place (it is authenticated).
    pub fn seal(&self, header: &[u8], plain: &[u8]) -> Vec<u8> {
        let iv = random(self.encr.iv_len());
        match self.encr {
            Encr::AesGcm16(bits) => {
                // No alignment needed; one pad-length octet (0).
                let mut buf = Zeroizing::new(plain.to_vec());
                buf.push(0);
                let (key, salt) = self.ek.split_at(bits as usize / 8);
                let nonce: [u8; 12] = [salt, &iv].concat().try_into().unwrap();
                let aad = header;
                let tag = match bits {
                    128 => Aes128Gcm::new_from_slice(key)
                        .unwrap()
                        .encrypt_inout_detached(&nonce.into(), aad, buf.as_mut_slice().into()),
                    _ => Aes256Gcm::new_from_slice(key)
                        .unwrap()
                        .encrypt_inout_detached(&nonce.into(), aad, buf.as_mut_slice().into()),
                }
                .expect("GCM encryption");
                [iv.as_slice(), &buf, &tag].concat()
            }
            Encr::AesCbc(bits) => {
                let mut buf = Zeroizing::new(plain.to_vec());
                let pad = (16 - (buf.len() + 1) % 16) % 16;
                buf.extend(std::iter::repeat_n(0u8, pad));
                buf.push(pad as u8);
                let n = buf.len();
                match bits {
                    128 => cbc::Encryptor::<aes::Aes128>::new_from_slices(self.ek, &iv)
                        .unwrap()
                        .encrypt_padded::<NoPadding>(&mut buf, n)
                        .map(|_| ()),
                    _ => cbc::Encryptor::<aes::Aes256>::new_from_slices(self.ek, &iv)
                        .unwrap()
                        .encrypt_padded::<NoPadding>(&mut buf, n)
                        .map(|_| ()),
                }
                .expect("aligned");
                let body = [iv.as_slice(), &buf].concat();
                let integ = self.integ.expect("CBC needs integrity");
                let icv = integ.mac(self.ak, &[header, &body].concat());
                [body, icv].concat()
            }
        }
    }

    /// Checks and decrypts an Encrypted payload's body; `header` as for `seal`. None for
    /// anything that does not authenticate or is malformed.
    pub fn open(&self, header: &[u8], body: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let iv_len = self.encr.iv_len();
        let icv = self.icv_len();
        if body.len() < iv_len + icv + 1 {
            return None;
        }
        let (iv, rest) = body.split_at(iv_len);
        let (ct, tag) = rest.split_at(rest.len() - icv);
        let mut buf = Zeroizing::new(ct.to_vec());
        match self.encr {
            Encr::AesGcm16(bits) => {
                let (key, salt) = self.ek.split_at(bits as usize / 8);
                let nonce: [u8; 12] = [salt, iv].concat().try_into().unwrap();
                let tag: [u8; 16] = tag.try_into().unwrap();
                let ok = match bits {
                    128 => Aes128Gcm::new_from_slice(key)
                        .unwrap()
                        .decrypt_inout_detached(
                            &nonce.into(),
                            header,
                            buf.as_mut_slice().into(),
                            &tag.into(),
                        ),
                    _ => Aes256Gcm::new_from_slice(key)
                        .unwrap()
                        .decrypt_inout_detached(
                            &nonce.into(),
                            header,
                            buf.as_mut_slice().into(),
                            &tag.into(),
                        ),
                };
                ok.ok()?;
            }
            Encr::AesCbc(bits) => {
                let integ = self.integ?;
                let want = integ.mac(self.ak, &[header, &body[..body.len() - icv]].concat());
                if !ct_eq(&want, tag) || ct.len() % 16 != 0 {
                    return None;
                }
                match bits {
                    128 => cbc::Decryptor::<aes::Aes128>::new_from_slices(self.ek, iv)
                        .ok()?
                        .decrypt_padded::<NoPadding>(&mut buf)
                        .map(|_| ()),
                    _ => cbc::Decryptor::<aes::Aes256>::new_from_slices(self.ek, iv)
                        .ok()?
                        .decrypt_padded::<NoPadding>(&mut buf)
                        .map(|_| ()),
                }
                .ok()?;
            }
        }
        let pad = *buf.last()? as usize;
        if pad + 1 > buf.len() {
            return None;
        }
        let n = buf.len() - pad - 1;
        buf.truncate(n);
        Some(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::hex;

    #[test]
    fn hmac_sha256_rfc4231_case2() {
        let out = Prf::HmacSha256.prf(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            out,
            hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        );
    }

    #[test]
    fn every_group_agrees_with_itself() {
        for g in [
            DhGroup::Modp2048,
            DhGroup::Ecp256,
            DhGroup::Ecp384,
            DhGroup::Ecp521,
            DhGroup::Curve25519,
        ] {
            let (a, b) = (Dh::new(g), Dh::new(g));
            assert_eq!(a.public.len(), g.public_len(), "{g:?}");
            let (sa, sb) = (a.shared(&b.public).unwrap(), b.shared(&a.public).unwrap());
            assert_eq!(sa, sb, "{g:?}");
            assert!(a.shared(&b.public[1..]).is_err(), "{g:?} short value");
        }
        let a = Dh::new(DhGroup::Modp2048);
        assert!(a.shared(&[0u8; 256]).is_err());
        let mut one = vec![0u8; 256];
        one[255] = 1;
        assert!(a.shared(&one).is_err());
        assert!(
            Dh::new(DhGroup::Ecp256).shared(&[7u8; 64]).is_err(),
            "not on the curve"
        );
    }

    #[test]
    fn encrypted_payload_round_trips_and_rejects_tampering() {
        for (encr, integ) in [
            (Encr::AesGcm16(128), None),
            (Encr::AesGcm16(256), None),
            (Encr::AesCbc(128), Some(Integ::HmacSha256_128)),
            (Encr::AesCbc(256), Some(Integ::HmacSha512_256)),
        ] {
            let ek = random(encr.key_len());
            let ak = random(integ.map(|i| i.key_len()).unwrap_or(0));
            let c = SkCipher {
                encr,
                integ,
                ek: &ek,
                ak: &ak,
            };
            let header = b"header of the message and of SK";
            for len in [0, 1, 15, 16, 100] {
                let plain = random(len);
                let body = c.seal(header, &plain);
                assert_eq!(c.open(header, &body).unwrap().as_slice(), plain.as_slice());
                let mut bad = body.clone();
                let last = bad.len() - 1;
                bad[last] ^= 1;
                assert!(c.open(header, &bad).is_none(), "{encr:?}");
                assert!(c.open(b"other header", &body).is_none(), "{encr:?}");
                assert!(c.open(header, &body[..3]).is_none());
            }
        }
    }
}
