//! strongSwan's charon as a real IKEv2 peer in a network namespace, for the interop tests
//! and the IKE benchmark. Each instance has its own /run (charon's pid file path is fixed),
//! VICI socket and log under its directory, and loads the swanctl.conf written there.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lab::netns_exec;

pub struct Charon {
    child: Child,
    pub dir: PathBuf,
    pub ns: String,
}

impl Drop for Charon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Charon {
    /// Starts charon in namespace `ns` with its files in `dir` (emptied first):
    /// strongswan.conf from `settings` (lines inside `charon { }`) and `log_levels` (lines
    /// of its file log), and `swanctl` as swanctl.conf, not loaded yet.
    pub fn start(
        ns: &str,
        dir: PathBuf,
        settings: &str,
        log_levels: &str,
        swanctl: &str,
    ) -> Result<Charon> {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let d = dir.display().to_string();
        std::fs::write(
            dir.join("strongswan.conf"),
            format!(
                "charon {{\n{settings}\n  plugins {{\n    vici {{\n      socket = unix://{d}/charon.vici\n    }}\n  }}\n  filelog {{\n    log {{\n      path = {d}/charon.log\n{log_levels}\n      flush_line = yes\n    }}\n  }}\n}}\n"
            ),
        )?;
        std::fs::write(dir.join("swanctl.conf"), swanctl)?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "unshare", "-m", "sh", "-c"])
            .arg(format!("mount -t tmpfs tmpfs /run && exec env STRONGSWAN_CONF={d}/strongswan.conf /usr/lib/ipsec/charon"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting charon (Debian strongswan-charon, installed by cargo xtask setup)")?;
        let c = Charon {
            child,
            dir,
            ns: ns.to_string(),
        };
        let t = Instant::now();
        while !c.dir.join("charon.vici").exists() {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("charon did not start in {ns}: {}", c.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(c)
    }

    pub fn swanctl(&self, args: &str) -> Result<String> {
        netns_exec(
            &self.ns,
            &format!(
                "swanctl {args} --uri unix://{}/charon.vici",
                self.dir.display()
            ),
        )
    }

    /// `swanctl --load-…` of the swanctl.conf in its directory.
    pub fn load(&self, what: &str) -> Result<String> {
        self.swanctl(&format!(
            "{what} --file {}/swanctl.conf",
            self.dir.display()
        ))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("charon.log")).unwrap_or_default()
    }

    /// (IKE SAs, half-open) from `swanctl --stats`.
    pub fn ike_sas(&self) -> (usize, usize) {
        let s = self.swanctl("--stats").unwrap_or_default();
        let line = s
            .lines()
            .find(|l| l.trim_start().starts_with("IKE_SAs:"))
            .unwrap_or("");
        let nums: Vec<usize> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|w| w.parse().ok())
            .collect();
        (
            nums.first().copied().unwrap_or(0),
            nums.get(1).copied().unwrap_or(0),
        )
    }
}
