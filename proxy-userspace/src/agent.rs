//! `ebpf-proxy run`: load and attach the data path, then keep the maps in step with
//! the source. Programs stay attached (pinned links) when the agent exits; `cleanup`
//! removes them.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::programs::XdpMode;
use tokio::{signal::unix, sync::mpsc};
use tracing::{debug, info, warn};

use crate::{
    datapath::{
        attach,
        interfaces::{self, LinkEvent},
        loader::{Datapath, MapSizes},
        tables::Tables,
    },
    manifests,
    metrics::AgentMetrics,
    model::{Scheduler, Severity},
    node::NodeConfig,
    server::{self, Status},
    sync::{NodeSettings, Syncer},
    tracker::ChangeTracker,
};

pub struct AgentConfig {
    pub node: NodeConfig,
    pub pin_dir: PathBuf,
    pub manifests: PathBuf,
    pub xdp_mode: XdpMode,
    pub cgroup: PathBuf,
    /// How often the manifests file is checked for changes.
    pub poll_interval: Duration,
    /// Created once services are programmed and present interfaces attached.
    pub ready_file: Option<PathBuf>,
    /// Transmit translated packets from XDP (XDP_TX/XDP_REDIRECT) instead of XDP_PASS.
    pub xdp_redirect: bool,
    /// Scheduler of services without the `ebpf-proxy.io/scheduler` annotation.
    pub default_scheduler: Scheduler,
    /// How often idle conntrack entries are collected.
    pub ct_gc_interval: Duration,
    /// `/metrics` and `/proxyMode`.
    pub metrics_address: SocketAddr,
    /// `/healthz`, `/livez`, `/readyz`.
    pub health_address: SocketAddr,
    pub map_sizes: MapSizes,
}

/// The cookie of the agent's network namespace: the socket hooks serve only it.
fn own_netns_cookie() -> Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("opening a probe socket")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 of the length given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_NETNS_COOKIE (Linux >= 5.14)");
    }
    Ok(cookie)
}

/// Re-reads the manifests when their bytes change; keeps the last good state when
/// the file is missing or unreadable.
struct ManifestSource {
    path: PathBuf,
    last: Option<Vec<u8>>,
    unreadable_reported: bool,
}

impl ManifestSource {
    fn changed(&mut self) -> Option<Vec<u8>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                self.unreadable_reported = false;
                if self.last.as_ref() == Some(&bytes) {
                    return None;
                }
                self.last = Some(bytes.clone());
                Some(bytes)
            }
            Err(e) => {
                if !self.unreadable_reported {
                    warn!(path = %self.path.display(), "manifests unreadable ({e}); keeping the last programmed state");
                    self.unreadable_reported = true;
                }
                None
            }
        }
    }
}

/// Feeds a new version of the manifests through the tracker and programs what
/// changed. With `full`, the whole desired state is compared with the maps instead
/// (the first sync after a start, when the maps may hold a predecessor's state).
fn sync_from(
    bytes: &[u8],
    source: &Path,
    tracker: &mut ChangeTracker,
    syncer: &mut Syncer,
    full: bool,
    metrics: &AgentMetrics,
) {
    let started = Instant::now();
    let text = String::from_utf8_lossy(bytes);
    let (objects, mut problems) = manifests::parse(&text, &source.display().to_string());
    if problems.is_empty() {
        tracker.replace_all(&objects);
    } else {
        // A malformed document may have held objects that still serve traffic: apply
        // what parsed, remove nothing until the file parses cleanly again.
        warn!(
            malformed = problems.len(),
            "manifests have malformed documents: updating what parsed, removing nothing"
        );
        tracker.merge(&objects);
    }
    let flush = tracker.flush();
    problems.extend(flush.problems);
    let report = if full {
        syncer.apply(&tracker.desired())
    } else {
        syncer.apply_changes(&flush.changes)
    };
    problems.extend(report.problems);
    for problem in &problems {
        match problem.severity {
            Severity::Error => warn!("{problem}"),
            Severity::Warning => info!("{problem}"),
        }
    }
    metrics.syncs.inc();
    metrics
        .sync_duration_seconds
        .observe(started.elapsed().as_secs_f64());
    metrics.sync_problems.set(problems.len() as i64);
    metrics
        .udp_flows_flushed
        .inc_by(report.flushed_udp_flows as u64);
    info!(
        changed = flush.changes.len(),
        added = report.added,
        updated = report.updated,
        removed = report.removed,
        map_writes = report.map_writes,
        flushed_udp_flows = report.flushed_udp_flows,
        problems = problems.len(),
        elapsed_us = started.elapsed().as_micros() as u64,
        "synced"
    );
}

/// The capabilities the agent needs, and why (see also deploy/daemonset.yaml).
const REQUIRED_CAPABILITIES: [(u32, &str, &str); 3] = [
    (39, "CAP_BPF", "load programs and create maps"),
    (38, "CAP_PERFMON", "load programs that use packet pointers"),
    (
        12,
        "CAP_NET_ADMIN",
        "attach XDP, tc and cgroup programs, set accept_local on uplinks",
    ),
];

/// Fails clearly, before touching anything, when a needed capability is missing.
fn check_capabilities() -> Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("no CapEff in /proc/self/status")?;
    let missing: Vec<String> = REQUIRED_CAPABILITIES
        .iter()
        .filter(|(bit, _, _)| effective & (1 << bit) == 0)
        .map(|(_, name, why)| format!("{name} ({why})"))
        .collect();
    if !missing.is_empty() {
        anyhow::bail!("missing capabilities: {}", missing.join(", "));
    }
    Ok(())
}

pub async fn run(config: AgentConfig) -> Result<()> {
    check_capabilities()?;
    config.node.validate()?;
    let mut datapath = Datapath::load_sized(&config.pin_dir, config.map_sizes)?;
    let mut syncer = Syncer::recover(Tables::open(&config.pin_dir)?)?;
    let status = Status::new(config.pin_dir.clone(), AgentMetrics::default());
    server::spawn(
        config.metrics_address,
        config.health_address,
        status.clone(),
    )
    .await?;
    let settings = NodeSettings {
        netns_cookie: own_netns_cookie()?,
        xdp_redirect: config.xdp_redirect,
    };
    syncer.program_node(&config.node, &settings)?;
    let mut source = ManifestSource {
        path: config.manifests.clone(),
        last: None,
        unreadable_reported: false,
    };
    let mut tracker =
        ChangeTracker::new(&config.node.name).with_default_scheduler(config.default_scheduler);
    // Until one sync compared everything with the pinned maps, syncs are full ones.
    let mut reconciled = false;
    if let Some(bytes) = source.changed() {
        sync_from(
            &bytes,
            &config.manifests,
            &mut tracker,
            &mut syncer,
            true,
            &status.metrics,
        );
        reconciled = true;
    }
    attach::attach_sock_hooks(&mut datapath, &config.cgroup)?;

    let (link_tx, mut link_rx) = mpsc::channel(256);
    let watcher = tokio::spawn(interfaces::watch(link_tx));
    let mut attached = BTreeSet::new();
    let mut ticker = tokio::time::interval(config.poll_interval);
    let mut gc_ticker = tokio::time::interval(config.ct_gc_interval);
    let mut terminate = unix::signal(unix::SignalKind::terminate())?;
    let mut ready = false;
    loop {
        tokio::select! {
            event = link_rx.recv() => match event {
                Some(LinkEvent::Present(name)) if !attached.contains(&name) => {
                    match attach_interface(&mut datapath, &config, &name) {
                        Ok(true) => { attached.insert(name); }
                        Ok(false) => {}
                        Err(e) => warn!("{e:#}"),
                    }
                }
                Some(LinkEvent::Present(_)) => {}
                Some(LinkEvent::Removed(name)) => {
                    if attached.remove(&name) {
                        info!(iface = %name, "interface removed");
                        attach::forget_interface(&config.pin_dir, &name);
                    }
                }
                Some(LinkEvent::ListDone) => {
                    let missing: Vec<&String> = config.node.uplinks.iter().filter(|u| !attached.contains(*u)).collect();
                    if !missing.is_empty() {
                        warn!(?missing, "uplinks not present yet; they will be attached when they appear");
                    }
                    if !ready {
                        ready = true;
                        status.set_ready();
                        mark_ready(&config)?;
                    }
                }
                None => {
                    let result = watcher.await;
                    anyhow::bail!("interface watcher stopped: {result:?}");
                }
            },
            _ = ticker.tick() => {
                status.alive();
                if let Some(bytes) = source.changed() {
                    sync_from(&bytes, &config.manifests, &mut tracker, &mut syncer, !reconciled, &status.metrics);
                    reconciled = true;
                }
            }
            _ = gc_ticker.tick() => match syncer.collect_conntrack() {
                Ok(report) if report.expired > 0 => {
                    status.metrics.conntrack_expired.inc_by(report.expired as u64);
                    debug!(scanned = report.scanned, expired = report.expired, "conntrack GC");
                }
                Ok(_) => {}
                Err(e) => warn!("conntrack GC: {e:#}"),
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    info!("stopping; programs stay attached through their pinned links (`ebpf-proxy cleanup` detaches)");
    Ok(())
}

fn mark_ready(config: &AgentConfig) -> Result<()> {
    info!("ready");
    if let Some(path) = &config.ready_file {
        std::fs::write(path, b"ready\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// XDP hands translated packets to the stack (XDP_PASS). A masqueraded one, and the
/// reply of a NodePort flow from a remote backend, then carry a node address as
/// source, which the input path drops as a martian unless the interface accepts
/// local sources. (This needs `rp_filter` 0 or 2 on uplinks; strict mode 1 would
/// still drop them.)
fn accept_local_sources(iface: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv4/conf/{iface}/accept_local");
    std::fs::write(&path, b"1").with_context(|| format!("enabling {path}"))
}

/// Attaches what an interface needs; returns whether it is one of ours.
fn attach_interface(datapath: &mut Datapath, config: &AgentConfig, name: &str) -> Result<bool> {
    if config.node.uplinks.iter().any(|u| u == name) {
        accept_local_sources(name)?;
        attach::attach_xdp(datapath, name, config.xdp_mode)?;
        return Ok(true);
    }
    if config.node.is_pod_interface(name) {
        attach::attach_tc(datapath, name)?;
        return Ok(true);
    }
    Ok(false)
}
