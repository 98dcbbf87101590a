//! `xnet peer-config`: what the other side of a connector needs, in its own syntax:
//! addresses, identities, proposals, the PSK (by reference unless asked for), traffic
//! selectors and, when the segment has BGP neighbours at the peer's tunnel address, the
//! BGP settings.

pub mod bird;

use std::fmt::Write;

use anyhow::{bail, Context, Result};

use crate::config::{Config, Ipsec};
use crate::ike::proposal::Suite;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// strongSwan swanctl.conf (IPsec connectors).
    Strongswan,
    /// Azure local network gateway and connection settings (IPsec connectors).
    Azure,
    /// Cisco IOS crypto configuration (IPsec connectors).
    CiscoIos,
    /// Junos (SRX) configuration (IPsec connectors).
    Junos,
    /// BIRD 2 (BGP neighbours: an on-prem router on private peering, say).
    Bird,
}

fn psk_line(c: &Ipsec, psk: Option<&str>) -> String {
    match (psk, &c.psk_file, &c.psk_env) {
        (Some(k), _, _) => k.to_string(),
        (None, Some(f), _) => format!("<the key in {} on the CXP>", f.display()),
        (None, _, Some(v)) => format!("<the key in ${v} of the CXP agent>"),
        _ => "<pre-shared key>".into(),
    }
}

/// Renders the peer's configuration for connector `name`. `psk`: the key itself, when
/// the operator asked for it (`--include-psk`).
pub fn render(config: &Config, name: &str, format: Format, psk: Option<&str>) -> Result<String> {
    if format == Format::Bird {
        return bird::bird(config, name, psk);
    }
    let Some(c) = config.ipsec.iter().find(|c| c.name == name) else {
        bail!(
            "no ipsec connector {name:?} (known: {})",
            config
                .ipsec
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let (ike, esp) = c.proposals();
    let ike: Vec<Suite> = ike
        .iter()
        .map(|n| Suite::parse(n, true))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    let esp: Vec<Suite> = esp
        .iter()
        .map(|n| Suite::parse(n, false))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    let local_id = c.local_id.clone().unwrap_or(c.local_address.to_string());
    let remote_id = c.remote_id.clone().unwrap_or(c.remote_address.to_string());
    let list = |v: &[ipnet::IpNet]| {
        v.iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let bgp = config.bgp.as_ref().and_then(|b| {
        b.neighbors
            .iter()
            .find(|n| {
                n.segment == c.segment
                    && (n.address == c.remote_address
                        || c.remote_ts.iter().any(|t| t.contains(&n.address)))
            })
            .map(|n| {
                (
                    b.asn,
                    n.remote_asn,
                    n.local_address.unwrap_or(c.local_address),
                    n.address,
                )
            })
    });
    let psk = psk_line(c, psk);
    // With certificates: the subject of ours, in the order strongSwan writes DNs.
    let cert = match &c.cert_file {
        Some(f) => {
            let pem =
                std::fs::read_to_string(f).with_context(|| format!("cert_file {}", f.display()))?;
            let der = <x509_cert::Certificate as der::DecodePem>::from_pem(pem.as_bytes())
                .map_err(|e| anyhow::anyhow!("cert_file {}: {e}", f.display()))?;
            let subject = der::Encode::to_der(der.tbs_certificate().subject())?;
            Some(crate::ike::cert::dn_asn1_order(&subject))
        }
        None => None,
    };
    let mut s = String::new();
    match format {
        Format::Strongswan => {
            let _ = writeln!(
                s,
                "# swanctl.conf for the peer of xnet connector {:?} (segment {})",
                c.name, c.segment
            );
            let _ = writeln!(s, "connections {{\n  xnet-{} {{\n    version = 2", c.name);
            // Behind a NAT the peer's own address is not remote_address (the NAT's):
            // an address ID names it.
            let own = c
                .remote_id
                .as_deref()
                .and_then(|i| i.parse::<std::net::IpAddr>().ok())
                .unwrap_or(c.remote_address);
            if own != c.remote_address {
                let _ = writeln!(
                    s,
                    "    # behind a NAT that shows it as {}",
                    c.remote_address
                );
            }
            let _ = writeln!(
                s,
                "    local_addrs = {own}\n    remote_addrs = {}",
                c.local_address
            );
            let _ = writeln!(
                s,
                "    proposals = {}",
                ike.iter().map(|p| p.name()).collect::<Vec<_>>().join(",")
            );
            let _ = writeln!(s, "    dpd_delay = {}s", c.dpd_seconds.max(1));
            if c.force_encap {
                let _ = writeln!(s, "    encap = yes");
            }
            match &cert {
                None => {
                    let _ = writeln!(
                        s,
                        "    local {{\n      auth = psk\n      id = {remote_id}\n    }}"
                    );
                    let _ = writeln!(
                        s,
                        "    remote {{\n      auth = psk\n      id = {local_id}\n    }}"
                    );
                }
                Some(ours) => {
                    // The gateway's own certificate and key are its business; the CA
                    // must be one in the CXP's ca_file, and it must trust ours.
                    let _ = writeln!(s, "    local {{\n      auth = pubkey\n      certs = gateway.pem   # issued by a CA in {} on the CXP", c.ca_file.as_ref().map(|p| p.display().to_string()).unwrap_or_default());
                    if let Some(r) = &c.remote_id {
                        let _ = writeln!(s, "      id = \"{r}\"");
                    }
                    let _ = writeln!(s, "    }}");
                    let _ = writeln!(
                        s,
                        "    remote {{\n      auth = pubkey\n      id = \"{ours}\"\n      cacerts = cxp-ca.pem   # the CA that issued the CXP's certificate\n    }}"
                    );
                }
            }
            let _ = writeln!(s, "    children {{\n      xnet-{} {{", c.name);
            let _ = writeln!(
                s,
                "        local_ts = {}\n        remote_ts = {}",
                list(&c.remote_ts),
                list(&c.local_ts)
            );
            let _ = writeln!(
                s,
                "        esp_proposals = {}",
                esp.iter().map(|p| p.name()).collect::<Vec<_>>().join(",")
            );
            let _ = writeln!(
                s,
                "        start_action = {}",
                if c.initiate { "none" } else { "start" }
            );
            let _ = writeln!(
                s,
                "        dpd_action = restart\n      }}\n    }}\n  }}\n}}"
            );
            if cert.is_some() {
                let _ = writeln!(
                    s,
                    "# the gateway's private key goes into swanctl's private/ (or ecdsa/) directory"
                );
            } else {
                let _ = writeln!(s, "secrets {{\n  ike-xnet-{} {{\n    id-cxp = {local_id}\n    id-peer = {remote_id}\n    secret = \"{psk}\"\n  }}\n}}", c.name);
            }
            if let Some((asn, peer_asn, cxp, peer)) = bgp {
                let _ = writeln!(
                    s,
                    "# BGP: peer AS {peer_asn} at {peer}, neighbour AS {asn} at {cxp}"
                );
            }
        }
        Format::Azure => {
            let _ = writeln!(
                s,
                "# Azure: local network gateway and connection for xnet connector {:?}",
                c.name
            );
            let _ = writeln!(
                s,
                "Local network gateway:\n  gatewayIpAddress: {}\n  addressPrefixes: [{}]",
                c.local_address,
                list(&c.local_ts)
            );
            if let Some((asn, _, cxp, _)) = bgp {
                let _ = writeln!(
                    s,
                    "  bgpSettings: {{ asn: {asn}, bgpPeeringAddress: {cxp} }}"
                );
            }
            let _ = writeln!(
                s,
                "Connection (type IPsec, IKEv2):\n  sharedKey: {psk}\n  enableBgp: {}",
                bgp.is_some()
            );
            if c.profile.as_deref() == Some("azure")
                && c.ike_proposals.is_empty()
                && c.esp_proposals.is_empty()
                && c.pfs_group.is_none()
            {
                let _ = writeln!(
                    s,
                    "  ipsecPolicies: [] (the gateway's default policy: it matches this connector)"
                );
            } else {
                let _ = writeln!(s, "{}", azure_policy(&ike[0], &esp[0]));
            }
            let _ = writeln!(
                s,
                "  trafficSelectorPolicies: local {} remote {}",
                list(&c.remote_ts),
                list(&c.local_ts)
            );
        }
        Format::CiscoIos => {
            let i = ike[0];
            let e = esp[0];
            let _ = writeln!(s, "! Cisco IOS-XE for xnet connector {:?}", c.name);
            let _ = writeln!(
                s,
                "crypto ikev2 proposal XNET-{n}\n encryption {}\n prf {}\n group {}",
                cisco_encr(&i),
                cisco_hash(i.prf.map(|p| p.out_len())),
                i.dh.map(|d| d.id()).unwrap_or(0),
                n = c.name
            );
            if let Some(g) = i.integ {
                let _ = writeln!(s, " integrity {}", cisco_hash(Some(g.key_len())));
            }
            let _ = writeln!(
                s,
                "crypto ikev2 policy XNET-{n}\n proposal XNET-{n}",
                n = c.name
            );
            let _ = writeln!(
                s,
                "crypto ikev2 keyring XNET-{n}\n peer cxp\n  address {}\n  pre-shared-key {psk}",
                c.local_address,
                n = c.name
            );
            let _ = writeln!(s, "crypto ikev2 profile XNET-{n}\n match identity remote address {} 255.255.255.255\n identity local address {}\n authentication remote pre-share\n authentication local pre-share\n keyring local XNET-{n}\n dpd {} 5 periodic", c.local_address, c.remote_address, c.dpd_seconds.max(10), n = c.name);
            let _ = writeln!(
                s,
                "crypto ipsec transform-set XNET-{n} {}\n mode tunnel",
                cisco_esp(&e),
                n = c.name
            );
            let _ = writeln!(
                s,
                "crypto ipsec profile XNET-{n}\n set transform-set XNET-{n}\n set ikev2-profile XNET-{n}",
                n = c.name
            );
            if let Some(g) = e.dh {
                let _ = writeln!(s, " set pfs group{}", g.id());
            }
            let _ = writeln!(
                s,
                "! traffic: local {} remote {}",
                list(&c.remote_ts),
                list(&c.local_ts)
            );
            if let Some((asn, peer_asn, cxp, _)) = bgp {
                let _ = writeln!(s, "router bgp {peer_asn}\n neighbor {cxp} remote-as {asn}");
            }
        }
        Format::Bird => unreachable!("rendered above"),
        Format::Junos => {
            let i = ike[0];
            let e = esp[0];
            let n = &c.name;
            let _ = writeln!(s, "# Junos (SRX) for xnet connector {n:?}");
            let _ = writeln!(
                s,
                "set security ike proposal xnet-{n} authentication-method pre-shared-keys"
            );
            let _ = writeln!(
                s,
                "set security ike proposal xnet-{n} dh-group group{}",
                i.dh.map(|d| d.id()).unwrap_or(0)
            );
            let _ = writeln!(
                s,
                "set security ike proposal xnet-{n} encryption-algorithm {}",
                junos_encr(&i)
            );
            let _ = writeln!(s, "set security ike policy xnet-{n} proposals xnet-{n}");
            let _ = writeln!(
                s,
                "set security ike policy xnet-{n} pre-shared-key ascii-text \"{psk}\""
            );
            let _ = writeln!(
                s,
                "set security ike gateway xnet-{n} ike-policy xnet-{n} address {} version v2-only",
                c.local_address
            );
            let _ = writeln!(
                s,
                "set security ipsec proposal xnet-{n} protocol esp encryption-algorithm {}",
                junos_encr(&e)
            );
            if let Some(g) = e.dh {
                let _ = writeln!(
                    s,
                    "set security ipsec policy xnet-{n} perfect-forward-secrecy keys group{}",
                    g.id()
                );
            }
            let _ = writeln!(s, "set security ipsec vpn xnet-{n} ike gateway xnet-{n}");
            let _ = writeln!(
                s,
                "# traffic selectors: local {} remote {}",
                list(&c.remote_ts),
                list(&c.local_ts)
            );
            if let Some((asn, _, cxp, _)) = bgp {
                let _ = writeln!(
                    s,
                    "set protocols bgp group xnet-{n} neighbor {cxp} peer-as {asn}"
                );
            }
        }
    }
    Ok(s)
}

/// An Azure custom IPsec policy (the names of its connection's `ipsecPolicies`) for one
/// IKE and one ESP proposal; what Azure cannot express is said in a comment.
fn azure_policy(i: &Suite, e: &Suite) -> String {
    use crate::ike::crypto::{DhGroup, Encr, Integ, Prf};
    let encr = |x: Encr| match x {
        Encr::AesCbc(b) => format!("AES{b}"),
        Encr::AesGcm16(b) => format!("GCMAES{b}"),
    };
    let group = |g: Option<DhGroup>, pfs: bool| match g {
        None => "None".to_string(),
        Some(DhGroup::Modp2048) if pfs => "PFS2048".into(),
        Some(DhGroup::Modp2048) => "DHGroup14".into(),
        Some(DhGroup::Ecp256) => "ECP256".into(),
        Some(DhGroup::Ecp384) => "ECP384".into(),
        Some(g) => format!("None  # group {} has no Azure name", g.id()),
    };
    let ike_integ = match i.prf {
        Some(Prf::HmacSha384) => "SHA384",
        _ => "SHA256",
    };
    let esp_integ = match (e.encr, e.integ) {
        (Encr::AesGcm16(b), _) => format!("GCMAES{b}"),
        (_, Some(Integ::HmacSha256_128)) | (_, None) => "SHA256".into(),
        (_, Some(_)) => "SHA256  # Azure has no SHA-384/512 for ESP".into(),
    };
    format!(
        "  ipsecPolicies:\n  - ikeEncryption: {}\n    ikeIntegrity: {ike_integ}\n    dhGroup: {}\n    ipsecEncryption: {}\n    ipsecIntegrity: {esp_integ}\n    pfsGroup: {}",
        encr(i.encr),
        group(i.dh, false),
        encr(e.encr),
        group(e.dh, true)
    )
}

fn cisco_hash(len: Option<usize>) -> &'static str {
    match len {
        Some(48) => "sha384",
        Some(64) => "sha512",
        _ => "sha256",
    }
}

fn cisco_encr(s: &Suite) -> String {
    match s.encr {
        crate::ike::crypto::Encr::AesCbc(b) => format!("aes-cbc-{b}"),
        crate::ike::crypto::Encr::AesGcm16(b) => format!("aes-gcm-{b}"),
    }
}

fn cisco_esp(s: &Suite) -> String {
    match (s.encr, s.integ) {
        (crate::ike::crypto::Encr::AesGcm16(b), _) => format!("esp-gcm {b}"),
        (crate::ike::crypto::Encr::AesCbc(b), i) => format!(
            "esp-aes {b} esp-{}-hmac",
            i.map(|i| cisco_hash(Some(i.key_len()))).unwrap_or("sha256")
        ),
    }
}

fn junos_encr(s: &Suite) -> String {
    match s.encr {
        crate::ike::crypto::Encr::AesCbc(b) => format!("aes-{b}-cbc"),
        crate::ike::crypto::Encr::AesGcm16(b) => format!("aes-{b}-gcm"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Azure's custom-policy names, PFS included (the connection's `ipsecPolicies`).
    #[test]
    fn azure_policy_uses_azures_names() {
        let s = |n: &str, ike: bool| Suite::parse(n, ike).unwrap();
        assert_eq!(
            azure_policy(&s("aes256-sha256-modp2048", true), &s("aes256gcm16-ecp384", false)),
            "  ipsecPolicies:\n  - ikeEncryption: AES256\n    ikeIntegrity: SHA256\n    dhGroup: DHGroup14\n    ipsecEncryption: GCMAES256\n    ipsecIntegrity: GCMAES256\n    pfsGroup: ECP384"
        );
        assert!(azure_policy(
            &s("aes128gcm16-prfsha384-ecp256", true),
            &s("aes128-sha256-modp2048", false)
        )
        .ends_with("ipsecEncryption: AES128\n    ipsecIntegrity: SHA256\n    pfsGroup: PFS2048"));
    }
}
