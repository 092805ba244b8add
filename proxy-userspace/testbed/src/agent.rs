//! The real `ebpf-proxy` binary running in a node namespace, stopped and cleaned up
//! (programs detached, pins removed) when dropped.

use std::{
    fs::File,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{
    command::run,
    netns::command_in,
    topology::{twin, Topology, NODE_IP, NODE_NAME, POD_INTERFACE_PATTERN, UPLINKS},
};
use ebpf_proxy::listing::Listing;

/// Which node an agent runs on, when not the topology's first node.
#[derive(Clone, Copy)]
pub struct NodeSpec<'a> {
    pub netns: &'a Path,
    pub name: &'a str,
    pub ip: Ipv4Addr,
    pub uplinks: &'a [&'a str],
}

pub struct Agent {
    binary: PathBuf,
    node_ns: PathBuf,
    node_name: String,
    node_ip: Ipv4Addr,
    uplinks: Vec<String>,
    pub pin_dir: PathBuf,
    pub manifests: PathBuf,
    /// With a kubeconfig the agent watches that API server instead of `manifests`.
    kubeconfig: Option<PathBuf>,
    work_dir: PathBuf,
    extra_args: Vec<String>,
    launcher: Vec<String>,
    /// Return from `spawn` once started, without waiting for the ready marker.
    no_ready_wait: bool,
    /// The node's addresses are left to the agent (no `--node-ip`).
    no_node_ips: bool,
    child: Option<Child>,
}

/// How to start the agent beyond the defaults.
#[derive(Clone, Copy, Default)]
pub struct AgentOptions<'a> {
    /// More `ebpf-proxy run` arguments.
    pub extra_args: &'a [&'a str],
    /// A program (and its arguments) the agent runs under, inside the node namespace.
    pub launcher: &'a [&'a str],
    /// A kubeconfig's text: the agent watches that API server (`--kubeconfig`)
    /// instead of the manifests file.
    pub kubeconfig: Option<&'a str>,
    /// Another node than the topology's first (`node`, `NODE_NAME`, `NODE_IP`).
    pub node: Option<NodeSpec<'a>>,
    /// Do not wait for the agent to be ready (a test of an agent that is not).
    pub no_ready_wait: bool,
    /// No `--node-ip`: the agent finds the node's addresses in its Node object.
    pub no_node_ips: bool,
}

impl Agent {
    /// Starts the agent on the topology's node and waits until it is ready.
    /// `work_dir` holds the manifests file, the log and the ready marker.
    pub fn start(
        binary: &Path,
        topology: &Topology,
        work_dir: &Path,
        manifests: &str,
    ) -> Result<Agent> {
        Agent::start_with(
            binary,
            topology,
            work_dir,
            manifests,
            AgentOptions::default(),
        )
    }

    /// `start` with more `ebpf-proxy run` arguments, and a launcher the agent runs
    /// under (e.g. `setpriv` with fewer capabilities).
    pub fn start_with(
        binary: &Path,
        topology: &Topology,
        work_dir: &Path,
        manifests: &str,
        options: AgentOptions<'_>,
    ) -> Result<Agent> {
        std::fs::create_dir_all(work_dir)?;
        let manifests_path = work_dir.join("manifests.yaml");
        std::fs::write(&manifests_path, manifests)?;
        let kubeconfig = match options.kubeconfig {
            Some(text) => {
                let path = work_dir.join("kubeconfig");
                std::fs::write(&path, text)?;
                Some(path)
            }
            None => None,
        };
        let name = work_dir
            .file_name()
            .and_then(|n| n.to_str())
            .context("work dir name")?;
        let node_ns = topology.node.path();
        let node = options.node.unwrap_or(NodeSpec {
            netns: &node_ns,
            name: NODE_NAME,
            ip: NODE_IP,
            uplinks: &UPLINKS,
        });
        let mut agent = Agent {
            binary: binary.to_owned(),
            node_ns: node.netns.to_owned(),
            node_name: node.name.to_owned(),
            node_ip: node.ip,
            uplinks: node.uplinks.iter().map(|u| u.to_string()).collect(),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{name}")),
            manifests: manifests_path,
            kubeconfig,
            work_dir: work_dir.to_owned(),
            extra_args: options.extra_args.iter().map(|a| a.to_string()).collect(),
            launcher: options.launcher.iter().map(|a| a.to_string()).collect(),
            no_ready_wait: options.no_ready_wait,
            no_node_ips: options.no_node_ips,
            child: None,
        };
        agent.spawn()?;
        Ok(agent)
    }

    pub fn log_path(&self) -> PathBuf {
        self.work_dir.join("agent.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// (Re)starts the process and waits for its ready marker.
    pub fn spawn(&mut self) -> Result<()> {
        let ready = self.work_dir.join("ready");
        let _ = std::fs::remove_file(&ready);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let binary = self.binary.to_str().context("binary path")?;
        let mut command = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut c = command_in(&self.node_ns, program);
                c.args(args).arg(binary);
                c
            }
            None => command_in(&self.node_ns, binary),
        };
        command.args(["run", "--node-name", &self.node_name]);
        if !self.no_node_ips {
            // The node is dual-stack, as the topology is: its address and its twin.
            command.args([
                "--node-ip",
                &self.node_ip.to_string(),
                "--node-ip",
                &twin(self.node_ip).to_string(),
            ]);
        }
        command
            .args(self.uplinks.iter().flat_map(|u| ["--uplink", u.as_str()]))
            .args([
                "--pod-interfaces",
                POD_INTERFACE_PATTERN,
                "--poll-ms",
                "100",
            ])
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(match &self.kubeconfig {
                Some(path) => ["--kubeconfig".as_ref(), path.as_os_str()],
                None => ["--manifests".as_ref(), self.manifests.as_os_str()],
            })
            .arg("--ready-file")
            .arg(&ready)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(command.spawn().context("starting ebpf-proxy")?);
        if self.no_ready_wait {
            return Ok(());
        }
        // Generous: under software emulation (the benchmark's QEMU guest) loading
        // and verifying the programs alone takes tens of seconds.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !ready.exists() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("ebpf-proxy exited ({status}):\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("ebpf-proxy not ready after 120 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process has exited on its own, and how.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Kills the process (as `kill -9` would) and starts it again with `extra_args`
    /// in place of its own: a DaemonSet whose arguments changed.
    pub fn restart_with_args(&mut self, extra_args: &[&str]) -> Result<()> {
        self.kill();
        self.extra_args = extra_args.iter().map(|a| a.to_string()).collect();
        self.spawn()
    }

    /// Kills the process without any cleanup (as `kill -9` would).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn listing(&self) -> Result<Listing> {
        let json = run(
            self.binary.to_str().context("binary path")?,
            &[
                "list",
                "--json",
                "--pin-dir",
                self.pin_dir.to_str().context("pin dir")?,
            ],
        )?;
        Ok(serde_json::from_str(&json)?)
    }

    /// `ebpf-proxy status ARGS` on the agent's node (where its metrics address is):
    /// whether it exited 0 (no problem listed), and its output.
    pub fn status(&self, args: &[&str]) -> Result<(bool, String)> {
        let binary = self.binary.to_str().context("binary path")?;
        let output = command_in(&self.node_ns, binary)
            .arg("status")
            .args(args)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .output()?;
        Ok((
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        ))
    }

    /// Replaces the manifests and waits until the agent has programmed `expect`
    /// (a predicate on the listing).
    pub fn update_manifests(
        &self,
        manifests: &str,
        expect: impl Fn(&Listing) -> bool,
    ) -> Result<()> {
        std::fs::write(&self.manifests, manifests)?;
        let programmed =
            super::eventually(Duration::from_secs(10), Duration::from_millis(50), || {
                self.listing().map(|l| expect(&l)).unwrap_or(false)
            });
        if !programmed {
            bail!(
                "the agent did not program the new manifests:\n{}",
                self.log()
            );
        }
        Ok(())
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // SIGTERM first: the agent exits cleanly, leaving links pinned.
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
        // In the node's namespace: netlink tc filters (`--tc-attach netlink`) are
        // found there, not through the pins. If the namespace is already gone (its
        // topology dropped first), so are the filters: the pins are removed from here.
        let binary = self.binary.to_str().unwrap_or("ebpf-proxy");
        let mut cleanup = if self.node_ns.exists() {
            command_in(&self.node_ns, binary)
        } else {
            std::process::Command::new(binary)
        };
        let _ = cleanup
            .arg("cleanup")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }
}
