//! The `[[ipsec]]` connectors as the config gives them.

use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

fn default_true() -> bool {
    true
}

/// One IPsec connector: an IKEv2 peer and the CHILD SA between the given selectors.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Ipsec {
    pub name: String,
    pub segment: String,
    /// Our tunnel endpoint (IKE listens on UDP 500 there).
    pub local_address: std::net::IpAddr,
    pub remote_address: std::net::IpAddr,
    /// The pre-shared key: a file whose first line it is, or an environment variable.
    /// The config never holds the key itself.
    pub psk_file: Option<PathBuf>,
    pub psk_env: Option<String>,
    /// Certificate authentication instead of a PSK (RSA or ECDSA, RFC 7427): our
    /// certificate and its unencrypted PKCS#8 key (PEM files; the key is never logged) and
    /// the CA certificates that issue the peer's. The peer's ID (`remote_id`: a DN in the
    /// certificate's order, as "O=Example, CN=gw.example.net", an FQDN or an address)
    /// must be in its certificate; without `remote_id` any certificate of those CAs is
    /// accepted.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// Start the IKE SA (true) or wait for the peer to.
    #[serde(default = "default_true")]
    pub initiate: bool,
    /// "azure": the Azure VPN gateway's default IKEv2/IPsec policy, for proposals left
    /// out.
    pub profile: Option<String>,
    /// strongSwan-style names, in order of preference.
    #[serde(default)]
    pub ike_proposals: Vec<String>,
    #[serde(default)]
    pub esp_proposals: Vec<String>,
    /// Perfect forward secrecy for CHILD SA rekeys: the D-H group added to every ESP
    /// proposal that names none. Azure's custom-policy names ("None", "PFS2048", "PFS14",
    /// "ECP256", "ECP384", "PFSMM": the group of the first IKE proposal) or ours
    /// ("modp2048", "ecp256", "ecp384", "ecp521", "curve25519").
    pub pfs_group: Option<String>,
    /// Traffic selectors: our side's prefixes and the peer's.
    pub local_ts: Vec<IpNet>,
    pub remote_ts: Vec<IpNet>,
    /// IKE identities; default: the addresses. An address or a name (FQDN).
    pub local_id: Option<String>,
    pub remote_id: Option<String>,
    /// Idle seconds before a liveness check (DPD); 0: none.
    #[serde(default = "default_dpd")]
    pub dpd_seconds: u64,
    /// A liveness check unanswered is sent again every `dpd_retransmit_seconds`, up to
    /// `dpd_retries` times; then the peer is dead and the tunnel's routes leave. A silent
    /// peer is declared dead within dpd_seconds + dpd_retransmit_seconds × (dpd_retries
    /// + 1): 40 s by default (Azure's gateways: a DPD timeout of 45 s by default).
    #[serde(default = "default_dpd_retransmit")]
    pub dpd_retransmit_seconds: u64,
    #[serde(default = "default_dpd_retries")]
    pub dpd_retries: u32,
    /// Encapsulate ESP in UDP 4500 even without a NAT (paths that drop IP protocol 50).
    #[serde(default)]
    pub force_encap: bool,
    /// Prefixes routed into the tunnel in the segment while it is up (default: remote_ts).
    #[serde(default)]
    pub routes: Vec<IpNet>,
    /// Seconds after which we rekey the CHILD SA and the IKE SA (make-before-break).
    /// Default 3,600 and 14,400; with `profile = "azure"` 27,000 and 28,800.
    pub child_lifetime: Option<u64>,
    pub ike_lifetime: Option<u64>,
    /// Route-based tunnel: the agent creates an xfrm interface of this name (if_id
    /// 0x100 + the connector's index) and routes `routes` into it; the SAs and policies
    /// are bound to it, so routes, not selectors, decide what is encrypted. Without it,
    /// or on a kernel without xfrm interfaces, the tunnel is policy-based.
    pub interface: Option<String>,
    /// BFD over the tunnel to the peer's inside address (`peer`; multihop by default):
    /// the tunnel's routes leave when it goes down, without waiting for DPD.
    #[serde(default, deserialize_with = "crate::bfd::config::setting")]
    pub bfd: Option<crate::bfd::config::Bfd>,
}

fn default_dpd() -> u64 {
    30
}
fn default_dpd_retransmit() -> u64 {
    2
}
fn default_dpd_retries() -> u32 {
    4
}

/// Proposals used when a connector names neither a profile nor its own.
pub const DEFAULT_IKE_PROPOSALS: &[&str] =
    &["aes256gcm16-prfsha384-ecp384", "aes256-sha256-modp2048"];
pub const DEFAULT_ESP_PROPOSALS: &[&str] = &["aes256gcm16", "aes256-sha256"];

impl Ipsec {
    /// (CHILD SA, IKE SA) lifetimes in effect.
    /// Dead-peer detection as the IKE SA runs it.
    pub fn dpd(&self) -> super::sa::Dpd {
        super::sa::Dpd {
            interval: std::time::Duration::from_secs(self.dpd_seconds),
            retransmit: std::time::Duration::from_secs(self.dpd_retransmit_seconds),
            retries: self.dpd_retries,
        }
    }

    pub fn lifetimes(&self) -> (u64, u64) {
        let azure = self.profile.as_deref() == Some("azure");
        let (c, i) = if azure {
            (
                super::proposal::AZURE_CHILD_LIFETIME,
                super::proposal::AZURE_IKE_LIFETIME,
            )
        } else {
            (3600, 14400)
        };
        (
            self.child_lifetime.unwrap_or(c),
            self.ike_lifetime.unwrap_or(i),
        )
    }

    /// Proposals in effect: its own, else its profile's, else the defaults.
    fn in_effect(&self, own: &[String], profile: &[&str], default: &[&str]) -> Vec<String> {
        if !own.is_empty() {
            own.to_vec()
        } else if self.profile.as_deref() == Some("azure") {
            profile.iter().map(|s| s.to_string()).collect()
        } else {
            default.iter().map(|s| s.to_string()).collect()
        }
    }

    /// The (IKE, ESP) proposals in effect, ESP with the `pfs_group` added.
    pub fn proposals(&self) -> (Vec<String>, Vec<String>) {
        let ike = self.in_effect(
            &self.ike_proposals,
            super::proposal::AZURE_IKE,
            DEFAULT_IKE_PROPOSALS,
        );
        let mut esp = self.in_effect(
            &self.esp_proposals,
            super::proposal::AZURE_ESP,
            DEFAULT_ESP_PROPOSALS,
        );
        // Validated: an unknown group is an error there.
        if let Ok(Some(g)) = self.pfs_with(&ike) {
            for e in &mut esp {
                if super::proposal::Suite::parse(e, false).is_ok_and(|s| s.dh.is_none()) {
                    e.push('-');
                    e.push_str(&g);
                }
            }
        }
        (ike, esp)
    }

    /// `pfs_group` as a group name of ours (None: no PFS).
    pub fn pfs(&self) -> Result<Option<String>, String> {
        self.pfs_with(&self.proposals().0)
    }

    /// `pfs_group` with `ike` the IKE proposals in effect (PFSMM follows the first).
    fn pfs_with(&self, ike: &[String]) -> Result<Option<String>, String> {
        let Some(name) = &self.pfs_group else {
            return Ok(None);
        };
        let first_ike = ike
            .first()
            .and_then(|n| super::proposal::Suite::parse(n, true).ok())
            .and_then(|s| s.dh);
        super::proposal::pfs_group(name, first_ike)
            .map(|g| g.map(|g| super::proposal::group_name(g).to_string()))
    }
}
