//! Hitless agent restart: where the XDP attachments wait between two agents.
//!
//! The old agent pins its XDP links on a BPF filesystem and exits; the kernel keeps the
//! program and its maps forwarding. The new agent builds fresh maps, and once its routes
//! are selected swaps its program in behind the same links (one atomic link update per
//! interface).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// The pin directory of this network namespace under `base`: agents in several
/// namespaces may share one BPF filesystem, and ifindexes repeat across namespaces.
pub fn dir(base: &Path) -> PathBuf {
    let ns = std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0);
    base.join(format!("netns-{ns}"))
}

fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: a zeroed statfs is a valid out-parameter; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

/// Makes `dir(base)` usable for pins: mounts the BPF filesystem at /sys/fs/bpf when
/// `base` is under it and nothing is mounted there (hosts without systemd), creates the
/// directory, and checks it is on a BPF filesystem.
pub fn prepare(base: &Path) -> Result<PathBuf> {
    let sys = Path::new("/sys/fs/bpf");
    if base.starts_with(sys) && !is_bpffs(sys) {
        let src = c"bpf";
        let target = c"/sys/fs/bpf";
        // SAFETY: constant NUL-terminated strings, no data argument.
        if unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        } != 0
        {
            bail!(
                "mounting the BPF filesystem at /sys/fs/bpf: {}",
                std::io::Error::last_os_error()
            );
        }
        log::warn!("mounted a BPF filesystem at /sys/fs/bpf; if this agent runs in a private mount namespace (ip netns exec), the mount and the pins vanish with it: set agent.pin_dir to a BPF filesystem of the host");
    }
    let d = dir(base);
    std::fs::create_dir_all(&d)
        .with_context(|| format!("agent.pin_dir: creating {}", d.display()))?;
    if !is_bpffs(&d) {
        bail!("agent.pin_dir: {} is not on a BPF filesystem", d.display());
    }
    Ok(d)
}
