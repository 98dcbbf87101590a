//! IKEv2 (RFC 7296): crypto, wire codec, proposals, the IKE SA state machine, and the
//! daemon that runs the configured IPsec connectors and installs their SAs into XFRM.
pub mod cert;
pub mod config;
pub mod cookie;
pub mod crypto;
pub mod daemon;
pub mod packet;
pub mod proposal;
pub mod sa;
pub mod status;
pub mod xfrm;
