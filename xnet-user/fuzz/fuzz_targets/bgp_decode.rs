//! The BGP message decoder on arbitrary bytes: it must never panic, with or without
//! 4-octet AS numbers and extended messages.
#![no_main]

use xnet_user::bgp::packet::{decode, MAX_LEN, MAX_LEN_EXTENDED};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = decode(data, true, MAX_LEN_EXTENDED);
    let _ = decode(data, false, MAX_LEN);
});
