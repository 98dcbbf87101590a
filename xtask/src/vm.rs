//! The VM of `cargo xtask vm-test`: a stock Debian kernel (it has ESP, GCM, xfrm
//! interfaces — this host's kernel does not) under QEMU in software emulation, booted
//! straight into a small initramfs (`vm-tests/init.sh`) that mounts this host's root
//! read-only and the work tree read-write over 9p, then runs one script with the guest
//! kernel. Kernel, modules and initramfs are cached under target/vm/.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{output, run, step};

/// What a boot needs.
pub struct Assets {
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    /// The root for `modprobe -d`: holds lib/modules/VERSION.
    pub modules: PathBuf,
}

/// The kernel package `linux-image-amd64` points at now (Debian 12: 6.1).
fn kernel_package() -> Result<String> {
    let deps = output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    deps.lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
        .map(str::to_string)
        .context("apt-cache depends linux-image-amd64: no linux-image package")
}

/// Downloads and unpacks the kernel once, extracts vmlinux and builds the initramfs.
pub fn assets(root: &Path) -> Result<Assets> {
    let pkg = kernel_package()?;
    let dir = root.join("target/vm").join(&pkg);
    let a = Assets {
        vmlinux: dir.join("vmlinux"),
        initrd: dir.join("initrd.cpio"),
        modules: dir.join("root"),
    };
    let init = include_str!("../../vm-tests/init.sh");
    let stamp = dir.join("ready");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == init) {
        return Ok(a);
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    step(&format!("fetching {pkg} for the VM (once)"));
    run(Command::new("apt-get")
        .args(["download", "-q", &pkg])
        .current_dir(&dir))?;
    let deb = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&a.modules))?;
    std::fs::remove_file(&deb)?;
    let version = pkg.trim_start_matches("linux-image-").to_string();
    run(Command::new("depmod")
        .arg("-b")
        .arg(&a.modules)
        .arg(&version))?;
    extract_vmlinux(
        &a.modules.join(format!("boot/vmlinuz-{version}")),
        &a.vmlinux,
    )?;
    initramfs(
        &a.modules.join("lib/modules").join(&version),
        init,
        &a.initrd,
    )?;
    std::fs::write(&stamp, init)?;
    Ok(a)
}

/// The bzImage carries vmlinux XZ-compressed; QEMU boots an uncompressed vmlinux through
/// PVH directly, about twice as fast as through the real-mode setup.
fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<()> {
    let data = std::fs::read(bzimage).with_context(|| bzimage.display().to_string())?;
    let magic = [0xfd, b'7', b'z', b'X', b'Z', 0];
    let at = data
        .windows(magic.len())
        .position(|w| w == magic)
        .context("no XZ stream in the kernel image")?;
    let mut xz = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(out)?)
        .spawn()
        .context("xz")?;
    // xz stops reading after the stream (trailing data follows it): a broken pipe is fine.
    match xz.stdin.take().unwrap().write_all(&data[at..]) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
        _ => {}
    }
    xz.wait()?;
    let head = std::fs::read(out)?;
    if !head.starts_with(b"\x7fELF") {
        bail!("{}: not an ELF kernel", out.display());
    }
    Ok(())
}

/// busybox, /init and the modules that mounting 9p needs (in dependency order).
fn initramfs(modules: &Path, init: &str, out: &Path) -> Result<()> {
    let dir = out.with_extension("d");
    let _ = std::fs::remove_dir_all(&dir);
    for d in ["bin", "m", "proc", "sys", "dev", "newroot"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .context("/bin/busybox (busybox-static)")?;
    std::fs::write(dir.join("init"), init)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("init"), std::fs::Permissions::from_mode(0o755))?;
    let deps = std::fs::read_to_string(modules.join("modules.dep"))?;
    let mut order: Vec<String> = Vec::new();
    for m in ["virtio_pci", "9pnet_virtio", "9p"] {
        add_with_deps(&deps, m, &mut order)?;
    }
    let mut names = String::new();
    for rel in &order {
        let name = Path::new(rel).file_name().unwrap();
        std::fs::copy(modules.join(rel), dir.join("m").join(name))?;
        names.push_str(&format!("{}\n", name.to_string_lossy()));
    }
    std::fs::write(dir.join("modules.order"), names)?;
    let cpio = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find . | cpio -o -H newc --quiet > '{}'",
            out.display()
        ))
        .current_dir(&dir)
        .status()?;
    if !cpio.success() {
        bail!("cpio failed");
    }
    Ok(())
}

/// Appends module `name` (as modules.dep names it) after everything it depends on.
fn add_with_deps(deps: &str, name: &str, order: &mut Vec<String>) -> Result<()> {
    let line = deps
        .lines()
        .find(|l| {
            l.split(':')
                .next()
                .is_some_and(|p| Path::new(p).file_stem().is_some_and(|s| s == name))
        })
        .with_context(|| format!("module {name} not in modules.dep"))?;
    let (path, rest) = line.split_once(':').unwrap();
    for d in rest.split_whitespace() {
        let stem = Path::new(d)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        add_with_deps(deps, &stem, order)?;
    }
    if !order.iter().any(|p| p == path) {
        order.push(path.to_string());
    }
    Ok(())
}

/// The QEMU command that boots the VM to run `script` (a bash script in the work tree).
fn qemu(root: &Path, a: &Assets, script: &Path) -> Command {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-accel",
        "tcg,tb-size=256",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "3072",
    ])
    .args([
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
    ])
    .arg("-kernel")
    .arg(&a.vmlinux)
    .arg("-initrd")
    .arg(&a.initrd)
    .args([
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs",
    ])
    .arg(format!(
        "local,path={},mount_tag=work,security_model=none,multidevs=remap",
        root.display()
    ))
    .arg("-append")
    .arg(format!(
        "console=ttyS0 quiet panic=-1 xnet.work={} xnet.run={} xnet.modules={}",
        root.display(),
        script.display(),
        a.modules.display()
    ));
    qemu
}

/// Boots the VM with the console on this terminal, for a person (`cargo xtask lab`).
pub fn boot_interactive(root: &Path, a: &Assets, script: &Path) -> Result<()> {
    let status = qemu(root, a, script)
        .status()
        .context("starting qemu-system-x86_64 (Debian qemu-system-x86)")?;
    if !status.success() {
        bail!("qemu: {status}");
    }
    Ok(())
}

/// Boots the VM to run `script` and returns its exit status. The serial console goes to
/// stdout, each line prefixed with `vm| `.
pub fn boot(root: &Path, a: &Assets, script: &Path, timeout: Duration) -> Result<i32> {
    let mut child = qemu(root, a, script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64 (Debian qemu-system-x86)")?;
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut status = None;
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let line = line.trim_end_matches('\r');
                println!("vm| {line}");
                if let Some(s) = line.strip_prefix("XNET-VM-EXIT=") {
                    status = s.trim().parse::<i32>().ok();
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the VM did not finish within {} s", timeout.as_secs());
            }
        }
    }
    child.wait()?;
    status.context("the VM stopped without reporting an exit status (see its console above)")
}
