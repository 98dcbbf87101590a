//! Proposals: the strongSwan-style names the config uses ("aes256gcm16-prfsha384-ecp384",
//! "aes256-sha256-modp2048", ESP "aes256gcm16" or "aes128-sha256"), their SA payload
//! form, and choosing one from a peer's offer (§2.7, §3.3).

use super::crypto::{DhGroup, Encr, Integ, Prf};
use super::packet::{
    Proposal, Transform, PROTO_ESP, PROTO_IKE, TRANSFORM_DH, TRANSFORM_ENCR, TRANSFORM_ESN,
    TRANSFORM_INTEG, TRANSFORM_PRF,
};

/// One IKE or ESP proposal: one algorithm of each kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Suite {
    pub encr: Encr,
    /// IKE only.
    pub prf: Option<Prf>,
    /// None with an AEAD cipher.
    pub integ: Option<Integ>,
    /// IKE: the key exchange; ESP: PFS group for CREATE_CHILD_SA (none in IKE_AUTH).
    pub dh: Option<DhGroup>,
}

/// The Azure VPN gateway's default IKEv2 policies (IKE: AES256/AES128, SHA256/SHA384,
/// DH group 14; IPsec: GCM-AES256, AES256/AES128 with SHA256, no PFS), in the names
/// `ike_proposals` and `esp_proposals` take.
pub const AZURE_IKE: &[&str] = &[
    "aes256-sha256-modp2048",
    "aes256-sha384-modp2048",
    "aes128-sha256-modp2048",
];
pub const AZURE_ESP: &[&str] = &["aes256gcm16", "aes256-sha256", "aes128-sha256"];
/// Lifetimes of the Azure default policy: IKE SA 28,800 s, CHILD SA 27,000 s.
pub const AZURE_IKE_LIFETIME: u64 = 28_800;
pub const AZURE_CHILD_LIFETIME: u64 = 27_000;

impl Suite {
    /// Parses a proposal name; `ike` decides which parts are required.
    pub fn parse(name: &str, ike: bool) -> Result<Suite, String> {
        let mut encr = None;
        let mut prf = None;
        let mut integ = None;
        let mut dh = None;
        for tok in name.split('-') {
            match tok {
                "aes128" => encr = Some(Encr::AesCbc(128)),
                "aes256" => encr = Some(Encr::AesCbc(256)),
                "aes128gcm16" | "aes128gcm128" => encr = Some(Encr::AesGcm16(128)),
                "aes256gcm16" | "aes256gcm128" => encr = Some(Encr::AesGcm16(256)),
                "sha256" | "sha2_256" => integ = Some(Integ::HmacSha256_128),
                "sha384" | "sha2_384" => integ = Some(Integ::HmacSha384_192),
                "sha512" | "sha2_512" => integ = Some(Integ::HmacSha512_256),
                "prfsha256" => prf = Some(Prf::HmacSha256),
                "prfsha384" => prf = Some(Prf::HmacSha384),
                "prfsha512" => prf = Some(Prf::HmacSha512),
                "modp2048" => dh = Some(DhGroup::Modp2048),
                "ecp256" => dh = Some(DhGroup::Ecp256),
                "ecp384" => dh = Some(DhGroup::Ecp384),
                "ecp521" => dh = Some(DhGroup::Ecp521),
                "curve25519" | "x25519" => dh = Some(DhGroup::Curve25519),
                other => return Err(format!("{name:?}: unknown or unsupported algorithm {other:?} (supported: aes128, aes256, aes128gcm16, aes256gcm16, sha256, sha384, sha512, prfsha256/384/512, modp2048, ecp256, ecp384, ecp521, curve25519)")),
            }
        }
        let encr = encr.ok_or_else(|| format!("{name:?}: no encryption algorithm"))?;
        if encr.is_aead() && integ.is_some() {
            return Err(format!("{name:?}: AES-GCM needs no integrity algorithm"));
        }
        if !encr.is_aead() && integ.is_none() {
            return Err(format!(
                "{name:?}: AES-CBC needs an integrity algorithm (sha256, sha384, sha512)"
            ));
        }
        if ike {
            // Like strongSwan: the PRF follows the integrity hash unless named.
            let prf = prf.or(match integ {
                Some(Integ::HmacSha256_128) => Some(Prf::HmacSha256),
                Some(Integ::HmacSha384_192) => Some(Prf::HmacSha384),
                Some(Integ::HmacSha512_256) => Some(Prf::HmacSha512),
                None => None,
            });
            let prf = prf.ok_or_else(|| {
                format!("{name:?}: AES-GCM needs a PRF (prfsha256, prfsha384, prfsha512)")
            })?;
            let dh = dh.ok_or_else(|| format!("{name:?}: no Diffie-Hellman group"))?;
            Ok(Suite {
                encr,
                prf: Some(prf),
                integ,
                dh: Some(dh),
            })
        } else {
            if prf.is_some() {
                return Err(format!("{name:?}: an ESP proposal has no PRF"));
            }
            Ok(Suite {
                encr,
                prf: None,
                integ,
                dh,
            })
        }
    }

    /// Its strongSwan name.
    pub fn name(&self) -> String {
        let mut parts = vec![match self.encr {
            Encr::AesCbc(b) => format!("aes{b}"),
            Encr::AesGcm16(b) => format!("aes{b}gcm16"),
        }];
        if let Some(i) = self.integ {
            parts.push(
                match i {
                    Integ::HmacSha256_128 => "sha256",
                    Integ::HmacSha384_192 => "sha384",
                    Integ::HmacSha512_256 => "sha512",
                }
                .into(),
            );
        }
        if let Some(p) = self.prf {
            parts.push(
                match p {
                    Prf::HmacSha256 => "prfsha256",
                    Prf::HmacSha384 => "prfsha384",
                    Prf::HmacSha512 => "prfsha512",
                }
                .into(),
            );
        }
        if let Some(d) = self.dh {
            parts.push(group_name(d).into());
        }
        parts.join("-")
    }

    /// The same suite without its D-H transform: what the first CHILD SA is negotiated
    /// with in IKE_AUTH, which has no KE payload (RFC 7296 §1.2).
    pub fn without_dh(&self) -> Suite {
        Suite { dh: None, ..*self }
    }

    fn transforms(&self, ike: bool) -> Vec<Transform> {
        let mut t = vec![Transform {
            kind: TRANSFORM_ENCR,
            id: self.encr.id(),
            key_len: Some(self.encr.bits()),
        }];
        if let Some(p) = self.prf {
            t.push(Transform {
                kind: TRANSFORM_PRF,
                id: p as u16,
                key_len: None,
            });
        }
        if let Some(i) = self.integ {
            t.push(Transform {
                kind: TRANSFORM_INTEG,
                id: i as u16,
                key_len: None,
            });
        }
        if let Some(d) = self.dh {
            t.push(Transform {
                kind: TRANSFORM_DH,
                id: d.id(),
                key_len: None,
            });
        }
        if !ike {
            t.push(Transform {
                kind: TRANSFORM_ESN,
                id: 0,
                key_len: None,
            });
        }
        t
    }

    /// The SA payload proposal for this suite.
    pub fn proposal(&self, num: u8, ike: bool, spi: Vec<u8>) -> Proposal {
        Proposal {
            num,
            protocol: if ike { PROTO_IKE } else { PROTO_ESP },
            spi,
            transforms: self.transforms(ike),
        }
    }

    /// Whether a peer's proposal offers this suite (each of our algorithms among its
    /// transforms of that type, and nothing of a type we do not use).
    fn offered_in(&self, p: &Proposal, ike: bool) -> bool {
        let ours = self.transforms(ike);
        let kinds = [
            TRANSFORM_ENCR,
            TRANSFORM_PRF,
            TRANSFORM_INTEG,
            TRANSFORM_DH,
            TRANSFORM_ESN,
        ];
        kinds.iter().all(|k| {
            let theirs: Vec<&Transform> = p.transforms.iter().filter(|t| t.kind == *k).collect();
            match ours.iter().find(|t| t.kind == *k) {
                Some(o) => theirs
                    .iter()
                    .any(|t| t.id == o.id && (o.kind != TRANSFORM_ENCR || t.key_len == o.key_len)),
                // "NONE" (id 0) for integrity or DH is the same as leaving it out.
                None => theirs.iter().all(|t| t.id == 0),
            }
        })
    }

    /// Reads back the suite a responder chose (one transform per type).
    pub fn from_chosen(p: &Proposal, ike: bool) -> Option<Suite> {
        let get = |k| p.transforms.iter().find(|t| t.kind == k);
        let e = get(TRANSFORM_ENCR)?;
        let s = Suite {
            encr: Encr::from_id(e.id, e.key_len)?,
            prf: match get(TRANSFORM_PRF) {
                Some(t) => Some(Prf::from_id(t.id)?),
                None => None,
            },
            integ: match get(TRANSFORM_INTEG).filter(|t| t.id != 0) {
                Some(t) => Some(Integ::from_id(t.id)?),
                None => None,
            },
            dh: match get(TRANSFORM_DH).filter(|t| t.id != 0) {
                Some(t) => Some(DhGroup::from_id(t.id)?),
                None => None,
            },
        };
        (s.offered_in(p, ike) && (!ike || (s.prf.is_some() && s.dh.is_some()))).then_some(s)
    }
}

/// A group's name in proposals.
pub fn group_name(g: DhGroup) -> &'static str {
    match g {
        DhGroup::Modp2048 => "modp2048",
        DhGroup::Ecp256 => "ecp256",
        DhGroup::Ecp384 => "ecp384",
        DhGroup::Ecp521 => "ecp521",
        DhGroup::Curve25519 => "curve25519",
    }
}

/// A PFS group by Azure's custom-policy name (pfsGroup) or ours; `ike`: the IKE SA's
/// group, which "PFSMM" means. Ok(None): no PFS.
pub fn pfs_group(name: &str, ike: Option<DhGroup>) -> Result<Option<DhGroup>, String> {
    Ok(Some(match name.to_ascii_lowercase().as_str() {
        "none" => return Ok(None),
        "pfs2048" | "pfs14" | "modp2048" => DhGroup::Modp2048,
        "ecp256" => DhGroup::Ecp256,
        "ecp384" => DhGroup::Ecp384,
        "ecp521" => DhGroup::Ecp521,
        "curve25519" | "x25519" => DhGroup::Curve25519,
        "pfsmm" => return ike.map(Some).ok_or_else(|| "PFSMM: no IKE group to follow".into()),
        "pfs1" | "pfs2" => {
            return Err(format!(
                "{name:?}: D-H groups 1 and 2 (768 and 1024 bits) are too weak and not supported (RFC 8247); use PFS2048, ECP256 or ECP384"
            ))
        }
        "pfs24" => {
            return Err(format!(
                "{name:?}: D-H group 24 is not supported (RFC 8247: SHOULD NOT); use PFS2048, ECP256 or ECP384"
            ))
        }
        _ => {
            return Err(format!(
                "unknown PFS group {name:?} (Azure names: None, PFS2048, PFS14, ECP256, ECP384, PFSMM; or modp2048, ecp256, ecp384, ecp521, curve25519)"
            ))
        }
    }))
}

/// The ESP proposals for the first CHILD SA, carried in IKE_AUTH: without D-H transforms
/// (§1.2: "SHOULD omit the whole transform substructure"), duplicates removed, numbered.
pub fn first_child_proposals(ours: &[Suite], spi: u32) -> Vec<Proposal> {
    let mut seen: Vec<Suite> = Vec::new();
    for s in ours {
        if !seen.contains(&s.without_dh()) {
            seen.push(s.without_dh());
        }
    }
    seen.iter()
        .enumerate()
        .map(|(i, s)| s.proposal(i as u8 + 1, false, spi.to_be_bytes().to_vec()))
        .collect()
}

/// Responder's choice for the first CHILD SA (IKE_AUTH): as `choose`, with any D-H
/// transform of the peer's ignored (§1.2: there is no KE to use it with). Returns the
/// peer's proposal and our whole suite, whose group is used for the rekeys.
pub fn choose_first_child<'a>(
    offer: &'a [Proposal],
    ours: &[Suite],
) -> Option<(&'a Proposal, Suite)> {
    offer
        .iter()
        .filter(|p| p.protocol == PROTO_ESP)
        .find_map(|p| {
            let bare = without_dh_transforms(p);
            ours.iter()
                .find(|s| s.without_dh().offered_in(&bare, false))
                .map(|s| (p, *s))
        })
}

/// Initiator: which of our suites the responder's chosen first-CHILD proposal is (a D-H
/// transform in it ignored, as above).
pub fn chosen_first_child(p: &Proposal, ours: &[Suite]) -> Option<Suite> {
    let got = Suite::from_chosen(&without_dh_transforms(p), false)?;
    ours.iter().find(|s| s.without_dh() == got).copied()
}

/// A peer's proposal with its D-H transforms left out (IKE_AUTH, §1.2).
fn without_dh_transforms(p: &Proposal) -> Proposal {
    let mut bare = p.clone();
    bare.transforms.retain(|t| t.kind != TRANSFORM_DH);
    bare
}

/// Responder's choice (§2.7): the first of the peer's proposals, in its order of
/// preference, that one of ours matches. Returns the peer's proposal (for its number and
/// SPI) and our suite.
pub fn choose<'a>(
    offer: &'a [Proposal],
    ours: &[Suite],
    ike: bool,
) -> Option<(&'a Proposal, Suite)> {
    let protocol = if ike { PROTO_IKE } else { PROTO_ESP };
    offer
        .iter()
        .filter(|p| p.protocol == protocol)
        .find_map(|p| ours.iter().find(|s| s.offered_in(p, ike)).map(|s| (p, *s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for (n, ike) in [
            ("aes256gcm16-prfsha384-ecp384", true),
            ("aes256-sha256-prfsha256-modp2048", true),
            ("aes128gcm16-prfsha256-curve25519", true),
            ("aes256gcm16", false),
            ("aes128-sha256", false),
            ("aes256-sha512-ecp521", false),
        ] {
            let s = Suite::parse(n, ike).unwrap();
            assert_eq!(Suite::parse(&s.name(), ike).unwrap(), s, "{n}");
        }
        assert_eq!(
            Suite::parse("aes256-sha384-modp2048", true).unwrap().prf,
            Some(Prf::HmacSha384)
        );
        for bad in [
            "aes256",
            "aes256gcm16-sha256-prfsha256-ecp256",
            "3des-sha1-modp1024",
            "aes256gcm16-ecp256",
        ] {
            assert!(Suite::parse(bad, true).is_err(), "{bad}");
        }
        for a in AZURE_IKE {
            Suite::parse(a, true).unwrap();
        }
        for a in AZURE_ESP {
            Suite::parse(a, false).unwrap();
        }
    }

    #[test]
    fn choice_follows_the_peers_order_and_needs_every_algorithm() {
        let ours: Vec<Suite> = ["aes128-sha256-modp2048", "aes256gcm16-prfsha384-ecp384"]
            .iter()
            .map(|n| Suite::parse(n, true).unwrap())
            .collect();
        let gcm = Suite::parse("aes256gcm16-prfsha384-ecp384", true)
            .unwrap()
            .proposal(1, true, vec![]);
        let cbc = Suite::parse("aes128-sha256-modp2048", true)
            .unwrap()
            .proposal(2, true, vec![]);
        let offer = [gcm.clone(), cbc.clone()];
        let (p, s) = choose(&offer, &ours, true).unwrap();
        assert_eq!((p.num, s), (1, ours[1]));
        // A proposal offering several algorithms of a kind (as strongSwan does) matches.
        let mut multi = cbc.clone();
        multi.transforms.insert(
            0,
            Transform {
                kind: TRANSFORM_ENCR,
                id: 12,
                key_len: Some(256),
            },
        );
        assert!(choose(&[multi], &ours[..1], true).is_some());
        // Key length matters.
        let mut k = cbc;
        k.transforms[0].key_len = Some(256);
        assert!(choose(&[k], &ours[..1], true).is_none());
        assert_eq!(Suite::from_chosen(&gcm, true), Some(ours[1]));
    }
}
