//! Embeds the XDP object built by `cargo xtask build` (path in `XNET_EBPF_OBJ`). Without it
//! the agent still builds (for unit tests and `xnet check`) and says so when asked to load.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo::rerun-if-env-changed=XNET_EBPF_OBJ");
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("xnet.bpf.o");
    match env::var_os("XNET_EBPF_OBJ") {
        Some(obj) => {
            let obj = PathBuf::from(obj);
            println!("cargo::rerun-if-changed={}", obj.display());
            fs::copy(&obj, &out).unwrap_or_else(|e| panic!("XNET_EBPF_OBJ={}: {e}", obj.display()));
        }
        None => fs::write(&out, b"").unwrap(),
    }
}
