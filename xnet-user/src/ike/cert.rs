//! Certificate authentication for IKE (RFC 7296 §2.15, §3.6–3.8; RFC 7427): our
//! certificate and private key (RSA, ECDSA P-256/P-384) from PEM files, trust anchors for
//! the peer's, the CERTREQ we send, signing the AUTH octets and checking the peer's
//! certificate (issued by a trust anchor, in its validity period, naming the peer's ID)
//! and signature. The key stays in this module: it is never printed.

use std::path::Path;
use std::time::SystemTime;

use der::{Decode, Encode};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::signature::{SignatureEncoding, Signer, Verifier};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::name::Name;
use x509_cert::Certificate;

use super::packet::{ID_DER_ASN1_DN, ID_FQDN, ID_IPV4_ADDR, ID_IPV6_ADDR, ID_RFC822_ADDR};

/// AUTH methods (§3.8, RFC 7427 §3).
pub const AUTH_ECDSA_256: u8 = 9;
pub const AUTH_ECDSA_384: u8 = 10;
pub const AUTH_DIGITAL_SIGNATURE: u8 = 14;
/// CERT/CERTREQ encoding "X.509 Certificate - Signature" (§3.6).
pub const CERT_X509: u8 = 4;

/// AlgorithmIdentifier DER of the signature schemes we use, as RFC 7427 Appendix A
/// spells them.
const SHA256_WITH_RSA: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b, 0x05, 0x00,
];
const SHA384_WITH_RSA: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c, 0x05, 0x00,
];
const SHA512_WITH_RSA: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d, 0x05, 0x00,
];
const ECDSA_WITH_SHA256: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];
const ECDSA_WITH_SHA384: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03,
];

enum Key {
    Rsa(rsa::PrivateKey),
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
}

/// A connector's certificate credentials.
pub struct Credentials {
    /// Our certificate (DER), sent in CERT.
    pub cert: Vec<u8>,
    /// The intermediate CA certificates after it in `cert_file` (DER), sent too.
    pub chain: Vec<Vec<u8>>,
    /// Its subject (DER): our default ID (ID_DER_ASN1_DN).
    pub subject: Vec<u8>,
    key: Key,
    /// Trust anchors for the peer's certificate.
    anchors: Vec<Certificate>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({})", dn_string(&self.subject))
    }
}

fn read(path: &Path, what: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// A DN's string form (RFC 4514), or "?" for DER that is not a Name.
pub fn dn_string(der: &[u8]) -> String {
    Name::from_der(der)
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// A DN in the order of its DER (how strongSwan and openssl write it: "O=…, CN=…").
pub fn dn_asn1_order(der: &[u8]) -> String {
    let s = dn_string(der);
    let mut v: Vec<&str> = s.split(',').map(str::trim).collect();
    v.reverse();
    v.join(", ")
}

/// A DN given as text in the order of its DER, as strongSwan and openssl write it
/// ("O=Example, CN=gw.example.net"), as DER.
pub fn dn_der(text: &str) -> Option<Vec<u8>> {
    let mut t: Vec<&str> = text.split(',').map(str::trim).collect();
    // RFC 4514, which the parser takes, lists the last RDN first.
    t.reverse();
    t.join(",").parse::<Name>().ok()?.to_der().ok()
}

/// The same DN, compared by its attributes: encodings of the same text differ
/// (PrintableString or UTF8String), and people write DNs in either order (RFC 4514's,
/// or the certificate's as strongSwan and openssl print them).
pub fn same_dn(a: &[u8], b: &[u8]) -> bool {
    let norm = |d: &[u8]| {
        let mut v: Vec<String> = dn_string(d)
            .split(',')
            .map(|x| x.trim().to_ascii_lowercase())
            .collect();
        v.sort();
        v
    };
    a == b || (dn_string(a) != "?" && norm(a) == norm(b))
}

impl Credentials {
    /// Loads the certificate, key and trust anchors; errors name the file and the reason
    /// (never the key's content).
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Credentials, String> {
        let pem = read(cert, "cert_file")?;
        let mut certs = Certificate::load_pem_chain(pem.as_bytes())
            .map_err(|e| format!("cert_file {}: not PEM certificates ({e})", cert.display()))?
            .into_iter();
        let c = certs
            .next()
            .ok_or_else(|| format!("cert_file {}: no certificate", cert.display()))?;
        let chain = certs
            .map(|x| x.to_der())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let subject = c
            .tbs_certificate()
            .subject()
            .to_der()
            .map_err(|e| e.to_string())?;
        let pem = read(key, "key_file")?;
        let k = if let Ok(k) = rsa::PrivateKey::from_pkcs8_pem(&pem) {
            Key::Rsa(k)
        } else if let Ok(k) = p256::ecdsa::SigningKey::from_pkcs8_pem(&pem) {
            Key::P256(k)
        } else if let Ok(k) = p384::ecdsa::SigningKey::from_pkcs8_pem(&pem) {
            Key::P384(k)
        } else {
            return Err(format!(
                "key_file {}: not an unencrypted PKCS#8 RSA, P-256 or P-384 key (\"-----BEGIN PRIVATE KEY-----\")",
                key.display()
            ));
        };
        let pem = read(ca, "ca_file")?;
        let anchors = Certificate::load_pem_chain(pem.as_bytes())
            .map_err(|e| format!("ca_file {}: not PEM certificates ({e})", ca.display()))?;
        if anchors.is_empty() {
            return Err(format!("ca_file {}: no certificate", ca.display()));
        }
        let creds = Credentials {
            cert: c.to_der().map_err(|e| e.to_string())?,
            chain,
            subject,
            key: k,
            anchors,
        };
        // The key must be the certificate's: a mismatch fails here, not at the peer.
        let probe = creds.sign(b"xnet key check");
        let n = probe[0] as usize;
        check_alg(&c, &probe[1..1 + n])
            .and_then(|h| check_signature(&c, &probe[1 + n..], b"xnet key check", h))
            .map_err(|_| {
                format!(
                    "key_file {}: not the key of the certificate in {}",
                    key.display(),
                    cert.display()
                )
            })?;
        Ok(creds)
    }

    /// CERTREQ data: the SHA-1 hashes of our trust anchors' public keys (§3.7).
    pub fn certreq(&self) -> Vec<u8> {
        use sha1::Digest;
        let mut v = Vec::new();
        for a in &self.anchors {
            if let Ok(spki) = a.tbs_certificate().subject_public_key_info().to_der() {
                v.extend_from_slice(&sha1::Sha1::digest(&spki));
            }
        }
        v
    }

    /// AUTH data for method 14 (RFC 7427 §3): the AlgorithmIdentifier's length and DER,
    /// then the signature of `octets`.
    pub fn sign(&self, octets: &[u8]) -> Vec<u8> {
        let (alg, sig): (&[u8], Vec<u8>) = match &self.key {
            Key::Rsa(k) => {
                let s = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(k.clone()).sign(octets);
                (SHA256_WITH_RSA, s.to_vec())
            }
            Key::P256(k) => {
                let s: p256::ecdsa::Signature = k.sign(octets);
                (ECDSA_WITH_SHA256, s.to_der().to_vec())
            }
            Key::P384(k) => {
                let s: p384::ecdsa::Signature = k.sign(octets);
                (ECDSA_WITH_SHA384, s.to_der().to_vec())
            }
        };
        [&[alg.len() as u8][..], alg, &sig].concat()
    }

    /// Checks the peer's authentication: its end-entity certificate (the first CERT) is
    /// valid `now` and leads to one of our trust anchors, directly or through the
    /// intermediate CAs among the other CERTs; it carries the peer's `id`, and its key
    /// signed `octets` (AUTH method and data as received).
    pub fn verify_peer(
        &self,
        certs: &[Vec<u8>],
        id: &(u8, Vec<u8>),
        method: u8,
        auth: &[u8],
        octets: &[u8],
        now: SystemTime,
    ) -> Result<(), String> {
        let der = certs
            .first()
            .ok_or("the peer sent no certificate (CERT payload)")?;
        let c = Certificate::from_der(der).map_err(|e| format!("peer certificate: {e}"))?;
        let tbs = c.tbs_certificate();
        let v = tbs.validity();
        if !valid_at(&c, now) {
            return Err(format!(
                "peer certificate {} is not valid now ({} to {})",
                tbs.subject(),
                v.not_before,
                v.not_after
            ));
        }
        let pool: Vec<Certificate> = certs[1..]
            .iter()
            .filter_map(|d| Certificate::from_der(d).ok())
            .collect();
        self.path(&c, &pool, now).map_err(|e| {
            format!(
                "peer certificate {} (issuer {}) {e}",
                tbs.subject(),
                tbs.issuer()
            )
        })?;
        if !names(&c, id) {
            return Err(format!(
                "peer certificate {} does not carry the peer's ID",
                tbs.subject()
            ));
        }
        let (sig, hash) = match method {
            AUTH_DIGITAL_SIGNATURE => {
                let n = *auth.first().ok_or("empty AUTH")? as usize;
                let alg = auth
                    .get(1..1 + n)
                    .ok_or("AUTH shorter than its algorithm")?;
                (&auth[1 + n..], check_alg(&c, alg)?)
            }
            AUTH_ECDSA_256 => (auth, Hash::Sha256),
            AUTH_ECDSA_384 => (auth, Hash::Sha384),
            m => return Err(format!("AUTH method {m} is not a signature we verify")),
        };
        check_signature(&c, sig, octets, hash).map_err(|e| format!("AUTH signature: {e}"))
    }
}

/// Longest chain of intermediate CAs we follow from the peer's certificate.
const MAX_PATH: usize = 4;

impl Credentials {
    /// A path from `c` to a trust anchor: each step signed by the next, each
    /// intermediate a CA (basicConstraints) valid `now`.
    fn path(&self, c: &Certificate, pool: &[Certificate], now: SystemTime) -> Result<(), String> {
        let mut cur = c.clone();
        for _ in 0..=MAX_PATH {
            let issuer = cur.tbs_certificate().issuer();
            if self.anchors.iter().any(|a| {
                a.tbs_certificate().subject() == issuer && check_signature_of(a, &cur).is_ok()
            }) {
                return Ok(());
            }
            let Some(next) = pool.iter().find(|p| {
                p.tbs_certificate().subject() == issuer && check_signature_of(p, &cur).is_ok()
            }) else {
                return Err("is not signed by a CA in ca_file (nor through the intermediate certificates it sent)".into());
            };
            let t = next.tbs_certificate();
            let ca = t
                .get_extension::<x509_cert::ext::pkix::BasicConstraints>()
                .ok()
                .flatten()
                .is_some_and(|(_, b)| b.ca);
            if !ca {
                return Err(format!("is issued by {}, which is not a CA", t.subject()));
            }
            if !valid_at(next, now) {
                return Err(format!(
                    "is issued by {}, which is not valid now",
                    t.subject()
                ));
            }
            cur = next.clone();
        }
        Err(format!("needs more than {MAX_PATH} intermediate CAs"))
    }
}

/// Whether `now` is in certificate `c`'s validity period.
fn valid_at(c: &Certificate, now: SystemTime) -> bool {
    let v = c.tbs_certificate().validity();
    v.not_before.to_system_time() <= now && now <= v.not_after.to_system_time()
}

/// Whether certificate `c` names `id`: its subject for a DN, else its subjectAltName.
fn names(c: &Certificate, id: &(u8, Vec<u8>)) -> bool {
    let tbs = c.tbs_certificate();
    if id.0 == ID_DER_ASN1_DN {
        return tbs.subject().to_der().is_ok_and(|s| same_dn(&s, &id.1));
    }
    let Ok(Some((_, san))) = tbs.get_extension::<SubjectAltName>() else {
        return false;
    };
    san.0.iter().any(|g| match (g, id.0) {
        (GeneralName::DnsName(n), ID_FQDN) => n.as_bytes().eq_ignore_ascii_case(&id.1),
        (GeneralName::Rfc822Name(n), ID_RFC822_ADDR) => n.as_bytes().eq_ignore_ascii_case(&id.1),
        (GeneralName::IpAddress(a), ID_IPV4_ADDR | ID_IPV6_ADDR) => a.as_bytes() == id.1,
        _ => false,
    })
}

/// The hash of an RFC 7427 AlgorithmIdentifier, which must fit the certificate's key.
fn check_alg(c: &Certificate, alg: &[u8]) -> Result<Hash, String> {
    let rsa_key = is_rsa(c);
    let hash = match alg {
        SHA256_WITH_RSA if rsa_key => Some(Hash::Sha256),
        SHA384_WITH_RSA if rsa_key => Some(Hash::Sha384),
        SHA512_WITH_RSA if rsa_key => Some(Hash::Sha512),
        ECDSA_WITH_SHA256 if !rsa_key => Some(Hash::Sha256),
        ECDSA_WITH_SHA384 if !rsa_key => Some(Hash::Sha384),
        _ => None,
    };
    if let Some(h) = hash {
        Ok(h)
    } else {
        Err(format!(
            "AUTH signature algorithm {} is not one we verify for this key (RSA PKCS#1 v1.5 with SHA-2, ECDSA with SHA-256/384)",
            alg.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ))
    }
}

fn is_rsa(c: &Certificate) -> bool {
    c.tbs_certificate()
        .subject_public_key_info()
        .algorithm
        .oid
        .to_string()
        == "1.2.840.113549.1.1.1"
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn digest(self, msg: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        match self {
            Hash::Sha256 => sha2::Sha256::digest(msg).to_vec(),
            Hash::Sha384 => sha2::Sha384::digest(msg).to_vec(),
            Hash::Sha512 => sha2::Sha512::digest(msg).to_vec(),
        }
    }

    /// The hash of a signature AlgorithmIdentifier's OID (RSA PKCS#1 v1.5, ECDSA).
    fn of_oid(oid: &str) -> Option<Hash> {
        Some(match oid {
            "1.2.840.113549.1.1.11" | "1.2.840.10045.4.3.2" => Hash::Sha256,
            "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => Hash::Sha384,
            "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => Hash::Sha512,
            _ => return None,
        })
    }
}

/// `sig` over `msg` with `hash` by the key of certificate `c`: RSA PKCS#1 v1.5 or ECDSA
/// (DER, or the raw r|s of AUTH methods 9 and 10).
fn check_signature(c: &Certificate, sig: &[u8], msg: &[u8], hash: Hash) -> Result<(), String> {
    use rsa::signature::hazmat::PrehashVerifier;
    let spki = c
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|e| e.to_string())?;
    let bad = |_| "does not verify".to_string();
    if is_rsa(c) {
        let k = rsa::PublicKey::from_public_key_der(&spki).map_err(|e| e.to_string())?;
        let s = rsa::pkcs1v15::Signature::try_from(sig).map_err(|e| e.to_string())?;
        return match hash {
            Hash::Sha256 => rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(k).verify(msg, &s),
            Hash::Sha384 => rsa::pkcs1v15::VerifyingKey::<sha2::Sha384>::new(k).verify(msg, &s),
            Hash::Sha512 => rsa::pkcs1v15::VerifyingKey::<sha2::Sha512>::new(k).verify(msg, &s),
        }
        .map_err(bad);
    }
    let digest = hash.digest(msg);
    if let Ok(k) = p256::ecdsa::VerifyingKey::from_public_key_der(&spki) {
        let s = p256::ecdsa::Signature::from_der(sig)
            .or_else(|_| p256::ecdsa::Signature::try_from(sig))
            .map_err(|e| e.to_string())?;
        return k.verify_prehash(&digest, &s).map_err(bad);
    }
    if let Ok(k) = p384::ecdsa::VerifyingKey::from_public_key_der(&spki) {
        let s = p384::ecdsa::Signature::from_der(sig)
            .or_else(|_| p384::ecdsa::Signature::try_from(sig))
            .map_err(|e| e.to_string())?;
        return k.verify_prehash(&digest, &s).map_err(bad);
    }
    Err("a key type we do not verify (RSA, P-256, P-384)".into())
}

/// Whether `issuer`'s key signed certificate `c`.
fn check_signature_of(issuer: &Certificate, c: &Certificate) -> Result<(), String> {
    let oid = c.signature_algorithm().oid.to_string();
    let hash = Hash::of_oid(&oid).ok_or_else(|| {
        format!("certificate signature algorithm {oid} (we take SHA-2 RSA/ECDSA)")
    })?;
    let tbs = c.tbs_certificate().to_der().map_err(|e| e.to_string())?;
    check_signature(issuer, c.signature().raw_bytes(), &tbs, hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use der::DecodePem;

    fn creds(name: &str) -> Credentials {
        let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ike/testdata");
        Credentials::load(
            &d.join(format!("{name}.pem")),
            &d.join(format!("{name}.key")),
            &d.join("ca.pem"),
        )
        .unwrap()
    }

    fn testdata(f: &str) -> Vec<u8> {
        let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ike/testdata");
        let pem = std::fs::read_to_string(d.join(f)).unwrap();
        Certificate::from_pem(pem.as_bytes())
            .unwrap()
            .to_der()
            .unwrap()
    }

    /// RFC 7427: AUTH method 14 carries the AlgorithmIdentifier (exact bytes of its
    /// Appendix A) before the signature; RSA and ECDSA both ways; the certificate must
    /// come from the CA, be valid and name the ID; any change to the octets fails.
    #[test]
    fn signatures_certificates_and_ids() {
        let (cxp, gw) = (creds("cxp"), creds("gw"));
        let octets = b"IKE_SA_INIT | nonce | prf(SK_p, ID')";
        let a = cxp.sign(octets);
        assert_eq!(
            a[..16],
            [
                15, 0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b,
                0x05, 0x00
            ],
            "sha256WithRSAEncryption"
        );
        assert_eq!(a.len(), 16 + 256, "an RSA-2048 signature");
        let b = gw.sign(octets);
        assert_eq!(
            b[..13],
            [12, 0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],
            "ecdsa-with-SHA384"
        );
        let now = SystemTime::now();
        let dn = |c: &Credentials| (ID_DER_ASN1_DN, c.subject.clone());
        let fqdn = |n: &str| (ID_FQDN, n.as_bytes().to_vec());
        // Each verifies the other, by DN, FQDN or address from the subjectAltName.
        gw.verify_peer(
            std::slice::from_ref(&cxp.cert),
            &dn(&cxp),
            14,
            &a,
            octets,
            now,
        )
        .unwrap();
        cxp.verify_peer(
            std::slice::from_ref(&gw.cert),
            &fqdn("gw.example.net"),
            14,
            &b,
            octets,
            now,
        )
        .unwrap();
        cxp.verify_peer(
            std::slice::from_ref(&gw.cert),
            &(ID_IPV4_ADDR, vec![10, 0, 3, 2]),
            14,
            &b,
            octets,
            now,
        )
        .unwrap();
        let err = |r: Result<(), String>| r.unwrap_err();
        assert!(err(cxp.verify_peer(
            std::slice::from_ref(&gw.cert),
            &fqdn("other.example.net"),
            14,
            &b,
            octets,
            now
        ))
        .contains("does not carry the peer's ID"));
        assert!(err(cxp.verify_peer(
            std::slice::from_ref(&gw.cert),
            &fqdn("gw.example.net"),
            14,
            &b,
            b"other",
            now
        ))
        .contains("AUTH signature: does not verify"));
        assert!(
            err(cxp.verify_peer(
                std::slice::from_ref(&gw.cert),
                &dn(&gw),
                14,
                &a,
                octets,
                now
            ))
            .contains("is not one we verify for this key"),
            "an RSA AlgorithmIdentifier for an EC key"
        );
        assert!(err(cxp.verify_peer(&[], &dn(&gw), 14, &b, octets, now)).contains("no certificate"));
        // The same subject and key from another CA of the same name.
        assert!(
            err(cxp.verify_peer(&[testdata("rogue-gw.pem")], &dn(&gw), 14, &b, octets, now))
                .contains("is not signed by a CA in ca_file")
        );
        let later = now + std::time::Duration::from_secs(200 * 365 * 86400);
        assert!(err(cxp.verify_peer(
            std::slice::from_ref(&gw.cert),
            &dn(&gw),
            14,
            &b,
            octets,
            later
        ))
        .contains("is not valid now"));
        // A DN from the config matches the certificate's, whatever the string encoding.
        assert!(same_dn(
            &dn_der("O=xnet test, CN=gw.example.net").unwrap(),
            &gw.subject
        ));
        assert!(!same_dn(
            &dn_der("O=xnet test, CN=cxp.example.net").unwrap(),
            &gw.subject
        ));
        // The CERTREQ names the CA by the SHA-1 of its public key.
        assert_eq!(cxp.certreq().len(), 20);
        assert_eq!(
            format!("{cxp:?}"),
            "Credentials(CN=cxp.example.net,O=xnet test)"
        );
    }

    /// A peer certificate through an intermediate CA: accepted with the intermediate it
    /// sends, refused without it, refused when the "intermediate" is not a CA; our own
    /// intermediates (after the certificate in cert_file) are kept to be sent.
    #[test]
    fn chains_through_intermediate_cas() {
        let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ike/testdata");
        let leaf = Credentials::load(
            &d.join("leaf.pem"),
            &d.join("leaf.key"),
            &d.join("root2.pem"),
        )
        .unwrap();
        assert_eq!(
            leaf.chain,
            vec![testdata("inter.pem")],
            "the intermediate, to send"
        );
        let verifier = |ca: &str| {
            Credentials::load(&d.join("cxp.pem"), &d.join("cxp.key"), &d.join(ca)).unwrap()
        };
        let octets = b"signed";
        let auth = leaf.sign(octets);
        let id = (ID_FQDN, b"leaf.example.net".to_vec());
        let now = SystemTime::now();
        let with_inter = [leaf.cert.clone(), testdata("inter.pem")];
        verifier("root2.pem")
            .verify_peer(&with_inter, &id, 14, &auth, octets, now)
            .unwrap();
        let e = verifier("root2.pem")
            .verify_peer(
                std::slice::from_ref(&leaf.cert),
                &id,
                14,
                &auth,
                octets,
                now,
            )
            .unwrap_err();
        assert!(e.contains("is not signed by a CA in ca_file"), "{e}");
        // The same leaf issued by an end-entity certificate (gw.pem, from ca.pem).
        let fake = [testdata("by-end-entity.pem"), testdata("gw.pem")];
        let e = verifier("ca.pem")
            .verify_peer(&fake, &id, 14, &auth, octets, now)
            .unwrap_err();
        assert!(e.contains("which is not a CA"), "{e}");
    }

    /// Bad credential files: the field, the file and the reason, never the key.
    #[test]
    fn bad_credential_files_say_which_and_why() {
        let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ike/testdata");
        let load = |c: &str, k: &str, a: &str| {
            Credentials::load(&d.join(c), &d.join(k), &d.join(a)).unwrap_err()
        };
        assert!(load("cxp.pem", "gw.key", "ca.pem").starts_with("key_file "));
        assert!(load("cxp.pem", "gw.key", "ca.pem").contains("not the key of the certificate"));
        assert!(load("cxp.key", "cxp.key", "ca.pem").starts_with("cert_file "));
        assert!(load("cxp.pem", "ca.pem", "ca.pem").contains("not an unencrypted PKCS#8"));
        assert!(load("cxp.pem", "cxp.key", "missing.pem").starts_with("ca_file "));
        let e = load("cxp.pem", "gw.key", "ca.pem");
        assert!(!e.contains("PRIVATE"), "{e}");
    }
}
