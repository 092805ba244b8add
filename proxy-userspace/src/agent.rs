//! `ebpf-proxy run`: load and attach the data path, then keep the maps in step with
//! the source. Programs stay attached (pinned links) when the agent exits; `cleanup`
//! removes them.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    os::fd::AsRawFd as _,
    path::PathBuf,
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
    healthcheck::HealthCheckServers,
    kubernetes::{
        self,
        events::EventReporter,
        watch::{Change, Received, Update},
    },
    manifests,
    metrics::AgentMetrics,
    model::{Forwarding, Problem, Scheduler, Severity, SourceRange},
    node::NodeConfig,
    server::{self, Status},
    sync::{NodeSettings, Syncer},
    tracker::ChangeTracker,
    translate::object_name,
};

pub struct AgentConfig {
    pub node: NodeConfig,
    pub pin_dir: PathBuf,
    pub source: SourceConfig,
    pub xdp_mode: XdpMode,
    pub cgroup: PathBuf,
    /// Created once services are programmed and present interfaces attached.
    pub ready_file: Option<PathBuf>,
    /// Transmit translated packets from XDP (XDP_TX/XDP_REDIRECT) instead of XDP_PASS.
    pub xdp_redirect: bool,
    /// Scheduler of services without the `ebpf-proxy.io/scheduler` annotation.
    pub default_scheduler: Scheduler,
    /// Forwarding of services without the `ebpf-proxy.io/forwarding` annotation.
    pub default_forwarding: Forwarding,
    /// Outer source addresses of IPIP packets (`dsr-ipip`).
    pub tunnel_source: Option<SourceRange>,
    /// Handle only services labelled `service.kubernetes.io/service-proxy-name` with
    /// this value (running beside kube-proxy); `None`: every unlabelled service.
    pub service_proxy_name: Option<String>,
    /// How often idle conntrack entries are collected.
    pub ct_gc_interval: Duration,
    /// `/metrics` and `/proxyMode`.
    pub metrics_address: SocketAddr,
    /// `/healthz`, `/livez`, `/readyz`.
    pub health_address: SocketAddr,
    pub map_sizes: MapSizes,
    /// TCX or netlink for the pod-interface program.
    pub tc_attach: attach::TcAttach,
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

/// Where the services come from.
pub enum SourceConfig {
    /// A manifests file, re-read when its bytes change (checked every `poll_interval`).
    Manifests {
        path: PathBuf,
        poll_interval: Duration,
    },
    /// The API server (in-cluster, or through `kubeconfig`). Changes are applied at
    /// most once per `min_sync_period` (kube-proxy's `--min-sync-period`): a burst
    /// of changes becomes one sync; 0 syncs every change at once.
    Kubernetes {
        kubeconfig: Option<PathBuf>,
        min_sync_period: Duration,
    },
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

    /// Feeds a new version of the manifests to the tracker; returns parse problems.
    fn load(&self, bytes: &[u8], tracker: &mut ChangeTracker) -> Vec<Problem> {
        let text = String::from_utf8_lossy(bytes);
        let (objects, problems) = manifests::parse(&text, &self.path.display().to_string());
        if problems.is_empty() {
            tracker.replace_all(&objects);
        } else {
            // A malformed document may have held objects that still serve traffic:
            // apply what parsed, remove nothing until the file parses cleanly again.
            warn!(
                malformed = problems.len(),
                "manifests have malformed documents: updating what parsed, removing nothing"
            );
            tracker.merge(&objects);
        }
        problems
    }
}

/// Programs what the tracker holds into the maps, and everything that follows from
/// it: health-check servers, metrics, logs and Events.
struct Programmer {
    tracker: ChangeTracker,
    syncer: Syncer,
    health_checks: HealthCheckServers,
    events: Option<EventReporter>,
    metrics: AgentMetrics,
    /// Until one sync compared everything with the pinned maps, syncs are full ones
    /// (the maps may hold a predecessor's state).
    reconciled: bool,
}

impl Programmer {
    /// One sync. `changed_at` is when the oldest change it applies arrived: the
    /// programming latency is measured from there.
    async fn sync(&mut self, mut problems: Vec<Problem>, changed_at: Option<Instant>) {
        let started = Instant::now();
        let flush = self.tracker.flush();
        problems.extend(flush.problems);
        let report = if self.reconciled {
            self.syncer.apply_changes(&flush.changes)
        } else {
            self.syncer.apply(&self.tracker.desired())
        };
        problems.extend(report.problems);
        if flush.health_checks_changed || !self.reconciled {
            let checks = self.tracker.health_checks();
            problems.extend(self.health_checks.update(checks).await);
        }
        self.reconciled = true;
        for problem in &problems {
            match problem.severity {
                Severity::Error => warn!("{problem}"),
                Severity::Warning => info!("{problem}"),
            }
        }
        if let Some(events) = &mut self.events {
            events.report(&problems);
        }
        let metrics = &self.metrics;
        metrics.syncs.inc();
        metrics
            .sync_duration_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Some(changed_at) = changed_at {
            metrics
                .programming_latency_seconds
                .observe(changed_at.elapsed().as_secs_f64());
        }
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
}

/// The Kubernetes source's state between syncs.
struct KubernetesFeed {
    updates: mpsc::Receiver<Received>,
    min_sync_period: Duration,
    /// Kinds whose first full list arrived; the first sync waits for all three, so
    /// that a restart never programs services without their endpoints.
    listed: BTreeSet<&'static str>,
    /// When the oldest change not yet programmed arrived.
    pending_since: Option<Instant>,
    last_sync: Option<Instant>,
}

const KINDS: [&str; 3] = ["services", "endpointslices", "nodes"];

impl KubernetesFeed {
    /// Applies one update to the tracker.
    fn apply(
        &mut self,
        update: Update,
        received: Instant,
        tracker: &mut ChangeTracker,
        metrics: &AgentMetrics,
    ) {
        let kind = match update {
            Update::Service(change) => {
                match change {
                    Change::Applied(s) => tracker.set_service(*s),
                    Change::Deleted(s) => tracker
                        .remove_service(&object_name(&s.metadata.namespace, &s.metadata.name)),
                    Change::Relisted(all) => {
                        tracker.replace_services(&all);
                        self.listed.insert("services");
                    }
                }
                "services"
            }
            Update::Slice(change) => {
                match change {
                    Change::Applied(s) => tracker.set_slice(*s),
                    Change::Deleted(s) => {
                        tracker.remove_slice(&object_name(&s.metadata.namespace, &s.metadata.name))
                    }
                    Change::Relisted(all) => {
                        tracker.replace_slices(&all);
                        self.listed.insert("endpointslices");
                    }
                }
                "endpointslices"
            }
            Update::Node(change) => {
                match change {
                    Change::Applied(n) => tracker.set_node(Some(&n)),
                    Change::Deleted(_) => tracker.set_node(None),
                    Change::Relisted(all) => {
                        tracker.set_node(all.first());
                        self.listed.insert("nodes");
                    }
                }
                "nodes"
            }
            Update::Trouble { kind, error } => {
                warn!(
                    kind,
                    "watching the API server: {error}; the programmed state stays, retrying"
                );
                metrics
                    .source_errors
                    .get_or_create(&vec![("resource".to_owned(), kind.to_owned())])
                    .inc();
                return;
            }
        };
        debug!(kind, "update");
        self.pending_since.get_or_insert(received);
    }

    /// When the pending changes should be programmed: never before every kind was
    /// listed, and not sooner than `min_sync_period` after the last sync.
    fn due(&self) -> Option<tokio::time::Instant> {
        self.pending_since?;
        if self.listed.len() < KINDS.len() {
            return None;
        }
        let at = self
            .last_sync
            .map_or_else(Instant::now, |last| last + self.min_sync_period);
        Some(tokio::time::Instant::from_std(at))
    }
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
        tunnel_source: config.tunnel_source,
    };
    syncer.program_node(&config.node, &settings)?;
    let mut programmer = Programmer {
        tracker: ChangeTracker::new(&config.node.name)
            .with_default_scheduler(config.default_scheduler)
            .with_default_forwarding(config.default_forwarding)
            .with_service_proxy_name(config.service_proxy_name.clone()),
        syncer,
        health_checks: HealthCheckServers::default(),
        events: None,
        metrics: status.metrics.clone(),
        reconciled: false,
    };
    let mut manifests = None;
    let mut feed = None;
    match &config.source {
        SourceConfig::Manifests { path, .. } => {
            let mut source = ManifestSource {
                path: path.clone(),
                last: None,
                unreadable_reported: false,
            };
            if let Some(bytes) = source.changed() {
                let problems = source.load(&bytes, &mut programmer.tracker);
                programmer.sync(problems, None).await;
            }
            manifests = Some(source);
        }
        SourceConfig::Kubernetes {
            kubeconfig,
            min_sync_period,
        } => {
            let client = kubernetes::client(kubeconfig.as_deref()).await?;
            programmer.events = Some(EventReporter::spawn(client.clone(), &config.node.name));
            feed = Some(KubernetesFeed {
                updates: kubernetes::watch::spawn(client, &config.node.name),
                min_sync_period: *min_sync_period,
                listed: BTreeSet::new(),
                pending_since: None,
                last_sync: None,
            });
        }
    }
    attach::attach_sock_hooks(&mut datapath, &config.cgroup)?;

    let (link_tx, mut link_rx) = mpsc::channel(256);
    let watcher = tokio::spawn(interfaces::watch(link_tx));
    let mut attached = BTreeSet::new();
    let poll_interval = match &config.source {
        SourceConfig::Manifests { poll_interval, .. } => *poll_interval,
        SourceConfig::Kubernetes { .. } => Duration::from_secs(1),
    };
    let mut ticker = tokio::time::interval(poll_interval);
    let mut gc_ticker = tokio::time::interval(config.ct_gc_interval);
    let mut terminate = unix::signal(unix::SignalKind::terminate())?;
    let mut links_listed = false;
    let mut ready = false;
    loop {
        let sync_due = feed.as_ref().and_then(KubernetesFeed::due);
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
                    links_listed = true;
                }
                None => {
                    let result = watcher.await;
                    anyhow::bail!("interface watcher stopped: {result:?}");
                }
            },
            update = async { feed.as_mut()?.updates.recv().await }, if feed.is_some() => {
                let Some((update, received)) = update else {
                    anyhow::bail!("the Kubernetes watchers stopped");
                };
                if let Some(feed) = feed.as_mut() {
                    feed.apply(update, received, &mut programmer.tracker, &status.metrics);
                }
            }
            _ = tokio::time::sleep_until(sync_due.unwrap_or_else(tokio::time::Instant::now)), if sync_due.is_some() => {
                if let Some(feed) = feed.as_mut() {
                    let changed_at = feed.pending_since.take();
                    feed.last_sync = Some(Instant::now());
                    programmer.sync(Vec::new(), changed_at).await;
                }
            }
            _ = ticker.tick() => {
                status.alive();
                if let Some(source) = manifests.as_mut() {
                    let read_at = Instant::now();
                    if let Some(bytes) = source.changed() {
                        let problems = source.load(&bytes, &mut programmer.tracker);
                        programmer.sync(problems, Some(read_at)).await;
                    }
                }
            }
            _ = gc_ticker.tick() => match programmer.syncer.collect_conntrack() {
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
        // The Kubernetes source is ready after its first sync; a manifests file may
        // appear later (its absence is logged), as before.
        if !ready && links_listed && (programmer.reconciled || manifests.is_some()) {
            ready = true;
            status.set_ready();
            mark_ready(&config)?;
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
        attach::attach_tc(datapath, name, config.tc_attach)?;
        return Ok(true);
    }
    Ok(false)
}
