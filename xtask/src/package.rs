//! `cargo xtask package`: the Debian package, built with dpkg-deb from packaging/deb/ —
//! `/usr/bin/xnet` (the XDP object is inside it), the example config as a conffile, the
//! systemd unit, the maintainer scripts. `--verify` installs it here as CI does: dpkg -i,
//! systemd-analyze verify on the unit, xnet check on the shipped example, then purge.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{run, step};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Builds `target/package/xnet_<version>_amd64.deb` around the agent binary `xnet`.
pub fn build(root: &Path, xnet: &Path) -> Result<PathBuf> {
    let out = root.join("target/package");
    let stage = out.join(format!("xnet_{VERSION}_amd64"));
    let _ = std::fs::remove_dir_all(&stage);
    let src = root.join("packaging/deb");
    let put = |from: &Path, to: &str, mode: u32| -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dest = stage.join(to);
        std::fs::create_dir_all(dest.parent().unwrap())?;
        std::fs::copy(from, &dest).with_context(|| format!("{} → {to}", from.display()))?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    put(xnet, "usr/bin/xnet", 0o755)?;
    // Debian ships binaries stripped (policy 10.1); the symbols stay in target/.
    run(Command::new("strip")
        .arg("--strip-unneeded")
        .arg(stage.join("usr/bin/xnet")))?;
    put(
        &root.join("xnet-user/config/xnet.toml"),
        "etc/xnet/xnet.toml",
        0o644,
    )?;
    put(
        &src.join("xnet.service"),
        "lib/systemd/system/xnet.service",
        0o644,
    )?;
    put(
        &root.join("README.md"),
        "usr/share/doc/xnet/README.md",
        0o644,
    )?;
    std::fs::write(
        stage.join("usr/share/doc/xnet/copyright"),
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: xnet\n\nFiles: *\nLicense: MIT or Apache-2.0\n",
    )?;
    for script in ["postinst", "prerm", "postrm"] {
        put(&src.join(script), &format!("DEBIAN/{script}"), 0o755)?;
    }
    std::fs::write(stage.join("DEBIAN/conffiles"), "/etc/xnet/xnet.toml\n")?;
    let size_kib = du_kib(&stage)?;
    let control = std::fs::read_to_string(src.join("control.in"))?
        .replace("@VERSION@", VERSION)
        .replace("@SIZE@", &size_kib.to_string());
    std::fs::write(stage.join("DEBIAN/control"), control)?;
    let deb = out.join(format!("xnet_{VERSION}_amd64.deb"));
    run(Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group"])
        .arg(&stage)
        .arg(&deb))?;
    step(&format!("built {}", deb.display()));
    Ok(deb)
}

fn du_kib(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        if m.is_dir() {
            if e.file_name() != "DEBIAN" {
                total += du_kib(&e.path())?;
            }
        } else {
            total += m.len().div_ceil(1024);
        }
    }
    Ok(total)
}

/// Installs `deb` on this machine, checks what it installed, and purges it.
pub fn verify(deb: &Path) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { crate::geteuid() } != 0 {
        bail!("package --verify installs the package: run it as root");
    }
    if Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "xnet"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
    {
        bail!("an xnet package is installed on this machine already: not touching it");
    }
    step(&format!("dpkg -i {}", deb.display()));
    run(Command::new("dpkg").arg("-i").arg(deb))?;
    let checks = (|| -> Result<()> {
        let listed = String::from_utf8(Command::new("dpkg").args(["-L", "xnet"]).output()?.stdout)?;
        for f in [
            "/usr/bin/xnet",
            "/etc/xnet/xnet.toml",
            "/lib/systemd/system/xnet.service",
        ] {
            if !listed.lines().any(|l| l == f) {
                bail!("the package does not install {f}:\n{listed}");
            }
        }
        let conffiles = std::fs::read_to_string("/var/lib/dpkg/info/xnet.conffiles")?;
        if conffiles.trim() != "/etc/xnet/xnet.toml" {
            bail!("conffiles: {conffiles}");
        }
        step("systemd-analyze verify xnet.service");
        let out = Command::new("systemd-analyze")
            .args(["verify", "/lib/systemd/system/xnet.service"])
            .output()
            .context("systemd-analyze (package systemd)")?;
        let err = String::from_utf8_lossy(&out.stderr);
        // Its only complaints must not be about our unit.
        if !out.status.success() || err.contains("xnet.service") {
            bail!(
                "systemd-analyze verify: {}{err}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        step("xnet check on the shipped example");
        run(Command::new("/usr/bin/xnet").args(["check", "--config", "/etc/xnet/xnet.toml"]))?;
        run(Command::new("/usr/bin/xnet").arg("--version"))
    })();
    step("dpkg --purge xnet");
    let purged = run(Command::new("dpkg").args(["--purge", "xnet"]));
    checks?;
    purged
}
