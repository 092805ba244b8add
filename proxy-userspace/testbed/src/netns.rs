//! A named network namespace that is deleted when dropped.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use super::command::{ip, run};

pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Netns> {
        // A leftover of an interrupted run would make `add` fail.
        let _ = ip(&format!("netns del {name}"));
        ip(&format!("netns add {name}"))?;
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &str) -> Result<String> {
        ip(&format!("-n {} {args}", self.name))
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// Runs a program inside the namespace and returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A command that will run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        command_in(&self.path(), program)
    }
}

/// A command that will run inside the namespace at `path`. `nsenter --net` rather
/// than `ip netns exec`, which remounts /sys and would hide the bpffs pins.
pub fn command_in(path: &Path, program: &str) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net={}", path.display()))
        .arg(program);
    command
}

/// Moves the calling thread into the namespace at `path` (threads that serve or
/// connect from inside a pod). Other threads are unaffected.
pub fn enter_current_thread(path: &Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns on a namespace file descriptor we hold open.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&format!("netns del {}", self.name));
    }
}
