//! The IKEv2 decoder and the responder on arbitrary bytes: neither may panic. The first
//! byte picks the payload type the chain starts with; the whole input is also offered
//! as an IKE_SA_INIT request to a responder.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use xnet_user::ike::crypto::Secret;
use xnet_user::ike::packet::{decode_payloads, id_of, Header, TrafficSelector};
use xnet_user::ike::proposal::Suite;
use xnet_user::ike::sa::{Auth, Conn, IkeSa};

fn conn() -> Arc<Conn> {
    static C: OnceLock<Arc<Conn>> = OnceLock::new();
    C.get_or_init(|| {
        let a = "192.0.2.1".parse().unwrap();
        let b = "192.0.2.2".parse().unwrap();
        Arc::new(Conn {
            name: "fuzz".into(),
            local: a,
            remote: b,
            auth: Auth::Psk(Secret::new(b"fuzz-psk-0123".to_vec())),
            local_id: id_of(a),
            remote_id: None,
            // A cheap group keeps the fuzzer fast.
            ike: vec![Suite::parse("aes128gcm16-prfsha256-curve25519", true).unwrap()],
            esp: vec![Suite::parse("aes128gcm16", false).unwrap()],
            local_ts: vec![TrafficSelector::from_net("10.0.0.0/8".parse().unwrap())],
            remote_ts: vec![TrafficSelector::from_net("10.0.0.0/8".parse().unwrap())],
            dpd: xnet_user::ike::sa::Dpd::OFF,
            force_encap: false,
            child_lifetime: Duration::from_secs(3600),
            ike_lifetime: Duration::from_secs(14400),
            initiate: false,
        })
    })
    .clone()
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = Header::decode(data);
    if let Some((&first, rest)) = data.split_first() {
        let _ = decode_payloads(first, rest, 28);
    }
    if let Ok((mut sa, _)) = IkeSa::respond(conn(), data, 500, Instant::now()) {
        let _ = sa.on_message(data, Instant::now());
    }
});
