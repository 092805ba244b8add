//! tftpd-hpa, Debian's TFTP server, in a pod's namespace, serving one file: real
//! transfers of any size where the built-in server (`servers`) sends a short greeting.
//! Like every TFTP server it answers each request from a new port of its own, which
//! is what the data path's related flows are for.

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use super::netns::Netns;

/// The port the tests' tftpd-hpa listens on (the built-in server has 69).
pub const TFTPD_PORT: u16 = 6969;
/// The file every tftpd-hpa serves.
pub const TFTPD_FILE: &str = "transfer.bin";

/// A running tftpd-hpa; stopped, and its directory removed, when dropped.
pub struct Tftpd {
    child: Child,
    dir: PathBuf,
}

impl Tftpd {
    /// Starts tftpd-hpa in `ns` on `TFTPD_PORT`, serving `content` as `TFTPD_FILE`
    /// from a fresh directory named after `name`.
    pub fn start(ns: &Netns, name: &str, content: &[u8]) -> Result<Tftpd> {
        let dir = std::env::temp_dir().join(format!("epx-tftpd-{}-{name}", std::process::id()));
        // A fresh directory (never one that exists: it could be anybody's).
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = dir.join(TFTPD_FILE);
        std::fs::write(&file, content).with_context(|| format!("writing {}", file.display()))?;
        // tftpd-hpa drops to `nobody` and serves only world-readable files.
        for (path, mode) in [(&dir, 0o755), (&file, 0o644)] {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        }
        let child = ns
            .command("in.tftpd")
            .args(["--foreground", "--secure", "--address"])
            .arg(format!("0.0.0.0:{TFTPD_PORT}"))
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .context("starting in.tftpd (is tftpd-hpa installed? `cargo xtask setup`)")?;
        let mut server = Tftpd { child, dir };
        let listening =
            crate::eventually(Duration::from_secs(5), Duration::from_millis(20), || {
                ns.exec("ss", &["-Hlun", &format!("sport = :{TFTPD_PORT}")])
                    .is_ok_and(|out| !out.trim().is_empty())
            });
        if !listening {
            let status = server.child.try_wait()?;
            bail!("in.tftpd is not listening on {TFTPD_PORT} (exited: {status:?})");
        }
        Ok(server)
    }
}

impl Drop for Tftpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
