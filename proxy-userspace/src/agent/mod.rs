//! `ebpf-proxy run`: load and attach the data path, then keep the maps in step with
//! the source. Programs stay attached (pinned links) when the agent exits; `cleanup`
//! removes them.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::programs::XdpMode;
use proxy_common::LoadSettings;
use tokio::{signal::unix, sync::mpsc};
use tracing::{debug, info, warn};

mod attachments;
mod netns_cookie;

use attachments::Attachments;

use crate::{
    adoption::AdoptionReport,
    capabilities,
    datapath::{
        attach,
        generation::Generation,
        interfaces::{self, LinkEvent},
        loader::{Datapath, MapSizes},
        lock::PinDirLock,
        tables::Tables,
    },
    health,
    healthcheck::HealthCheckServers,
    limits,
    metrics::AgentMetrics,
    model::{Forwarding, Problem, Scheduler, Severity, SourceRange},
    node::NodeConfig,
    server::{self, Status},
    source::{ProblemReporter, Source, SourceEvent, SourceUpdate, Updates},
    status::{self, AgentReport, Settings, SourceState},
    sync::{NodeSettings, Syncer},
    tracker::ChangeTracker,
};

pub struct AgentConfig {
    pub node: NodeConfig,
    pub pin_dir: PathBuf,
    /// The shortest time between two syncs (kube-proxy's `--min-sync-period`): changes
    /// arriving within it are batched into one sync; zero syncs every change at once.
    pub min_sync_period: Duration,
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
    /// Outer sources trusted to tunnel in (`--ipip-trusted-sources`).
    pub tunnel_peers: Option<Vec<SourceRange>>,
    /// The cluster's pod CIDRs (`--cluster-cidr`, kube-proxy's `clusterCIDR`).
    pub cluster_cidrs: Vec<SourceRange>,
    /// Handle only services labelled `service.kubernetes.io/service-proxy-name` with
    /// this value (running beside kube-proxy); `None`: every unlabelled service.
    pub service_proxy_name: Option<String>,
    /// How often idle conntrack entries are collected.
    pub ct_gc_interval: Duration,
    /// `/metrics` and `/proxyMode`.
    pub metrics_address: SocketAddr,
    /// Per-frontend and per-backend series in one scrape at most.
    pub metrics_max_series: usize,
    /// `/healthz`, `/livez`, `/readyz`.
    pub health_address: SocketAddr,
    /// Whether an HTTP address that cannot be bound stops the agent (kube-proxy's
    /// `bindAddressHardFail`); otherwise it runs without that listener, and says so.
    pub bind_hard_fail: bool,
    /// How long a change may wait to be programmed before `/healthz` and `/livez`
    /// fail (kube-proxy: twice its `syncPeriod`).
    pub health_timeout: Duration,
    /// kube-proxy's `oomScoreAdj`, applied at start if the agent may.
    pub oom_score_adj: Option<i32>,
    pub map_sizes: MapSizes,
    /// The data path object to load; `None`: the kernel's, by probing.
    pub generation: Option<Generation>,
    /// Set in the programs at load: conntrack idle timeouts (the collector's too),
    /// kube-proxy's `masqueradeAll`.
    pub load_settings: LoadSettings,
    /// TCX or netlink for the pod-interface program.
    pub tc_attach: attach::TcAttach,
    /// Take over the flows kube-proxy's rules translated (`adoption`).
    pub adopt_kube_proxy_flows: bool,
}

/// What `status` says of the socket hooks when they serve nothing.
const SOCKET_HOOKS_OFF: &str = "off: no socket hook saw the agent's own connect(), so it cannot name its network namespace to them (is the agent outside the hooks' cgroup?); the node's own processes reach services untranslated";

/// Programs what the tracker holds into the maps, and everything that follows from
/// it: health-check servers, metrics, logs and Events.
struct Programmer {
    tracker: ChangeTracker,
    syncer: Syncer,
    health_checks: HealthCheckServers,
    /// Told about every sync's problems besides logs and metrics (Kubernetes Events).
    reporters: Vec<Box<dyn ProblemReporter>>,
    metrics: AgentMetrics,
    /// Until one sync compared everything with the pinned maps, syncs are full ones
    /// (the maps may hold a predecessor's state).
    reconciled: bool,
    /// What the health-check servers last reported (a port that cannot be bound).
    health_check_problems: Vec<Problem>,
    /// `--adopt-kube-proxy-flows`: kube-proxy's flows are read right before the first
    /// sync (a flow netfilter opens after the read is not adopted).
    adopt_at_first_sync: bool,
    adoption_read_error: Option<String>,
}

impl Programmer {
    /// One sync. `changed_at` is when the oldest change it applies arrived: the
    /// programming latency is measured from there.
    /// Returns the problems that stand after it (for `status`).
    async fn sync(&mut self, mut problems: Vec<Problem>, changed_at: Option<Instant>) -> Standing {
        let started = Instant::now();
        let source_problems = problems.len();
        let full = !self.reconciled;
        let flush = self.tracker.flush();
        problems.extend(flush.problems);
        if std::mem::take(&mut self.adopt_at_first_sync) {
            self.start_adoption().await;
        }
        let report = if self.reconciled {
            self.syncer.apply_changes(&flush.changes)
        } else {
            self.syncer.apply(&self.tracker.desired())
        };
        problems.extend(report.problems);
        // Said when the servers change; they stand until the next change.
        if flush.health_checks_changed || !self.reconciled {
            let checks = self.tracker.health_checks();
            self.health_check_problems = self.health_checks.update(checks).await;
            problems.extend(self.health_check_problems.iter().cloned());
        }
        self.reconciled = true;
        for problem in &problems {
            match problem.severity {
                Severity::Error => warn!("{problem}"),
                Severity::Warning => info!("{problem}"),
            }
        }
        for reporter in &mut self.reporters {
            reporter.report(&problems);
        }
        let metrics = &self.metrics;
        metrics.syncs.inc();
        metrics
            .sync_duration_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.kube_proxy.synced(
            started.elapsed().as_secs_f64(),
            full,
            flush.applied,
            &flush.triggers,
            self.tracker.no_local_endpoints(),
        );
        if let Some(changed_at) = changed_at {
            metrics
                .programming_latency_seconds
                .observe(changed_at.elapsed().as_secs_f64());
        }
        // What stands now, not what this sync happened to touch: every tracked
        // object's problems, every frontend still refused, and what the sources and
        // health checks reported this time.
        let mut standing = Standing::default();
        let tracked = self.tracker.all_problems();
        let standing_ones = tracked
            .iter()
            .chain(&problems[..source_problems])
            .chain(&self.health_check_problems);
        for problem in standing_ones {
            standing.note(problem.to_string());
        }
        if report.unprogrammed > 0 {
            standing.note(format!(
                "{} frontends not programmed: the maps are full (--max-services, --max-backends)",
                report.unprogrammed
            ));
        }
        metrics.sync_problems.set(
            (tracked.len()
                + report.unprogrammed
                + source_problems
                + self.health_check_problems.len()) as i64,
        );
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
        // Once what the sync made on the way is freed: trimming earlier left the
        // holes of its transient copies resident.
        if flush.changes.len() >= LARGE_SYNC {
            drop((flush.changes, flush.triggers, problems, tracked));
            limits::return_free_memory();
        }
        standing
    }
}

/// The problems that stand after a sync: the first few for `status`, and how many.
#[derive(Default)]
struct Standing {
    shown: Vec<String>,
    total: usize,
}

impl Standing {
    fn note(&mut self, problem: String) {
        if self.shown.len() < status::PROBLEMS_SHOWN {
            self.shown.push(problem);
        }
        self.total += 1;
    }
}

/// A sync changing this many frontends (a first sync, a file replaced) is followed
/// by returning the memory it freed.
const LARGE_SYNC: usize = 1_000;

/// When to sync: the sources' updates are applied to the tracker as they arrive, and
/// programmed once every source has said its first view in full, then at most once
/// per `min_sync_period`.
struct SyncSchedule {
    min_sync_period: Duration,
    /// Sources that have not said `Listed` yet.
    unlisted: BTreeSet<&'static str>,
    /// When the oldest change not yet programmed arrived.
    pending_since: Option<Instant>,
    /// The problems of the source's latest changes not synced yet, reported with the
    /// next sync.
    pending_problems: Vec<Problem>,
    last_sync: Option<Instant>,
}

impl SyncSchedule {
    /// When the pending changes should be programmed.
    fn due(&self) -> Option<tokio::time::Instant> {
        self.pending_since?;
        if !self.unlisted.is_empty() {
            return None;
        }
        let at = self
            .last_sync
            .map_or_else(Instant::now, |last| last + self.min_sync_period);
        Some(tokio::time::Instant::from_std(at))
    }

    /// Every source said its first view and all of it is programmed.
    fn caught_up(&self) -> bool {
        self.unlisted.is_empty() && self.pending_since.is_none()
    }

    /// Applies one update to the tracker.
    fn apply(&mut self, update: SourceUpdate, tracker: &mut ChangeTracker, metrics: &AgentMetrics) {
        let SourceUpdate {
            source,
            event,
            received,
        } = update;
        match event {
            SourceEvent::Changed(change) => tracker.apply(change),
            SourceEvent::Changes { changes, problems } => {
                for change in changes {
                    tracker.apply(change);
                }
                // Two versions of a file before one sync: the later one's problems are
                // the ones that stand (a bad document kept is not counted twice).
                self.pending_problems = problems;
            }
            SourceEvent::Listed => {
                self.unlisted.remove(source);
                return;
            }
            SourceEvent::Trouble { what, error } => {
                warn!(
                    source,
                    what, "reading failed: {error}; the programmed state stays, retrying"
                );
                metrics
                    .source_errors
                    .get_or_create(&vec![("resource".to_owned(), what)])
                    .inc();
                return;
            }
        }
        debug!(source, "update");
        self.pending_since.get_or_insert(received);
        metrics.kube_proxy.queued(tracker.pending_changes());
    }
}

/// Runs the agent with `sources` until SIGTERM or Ctrl-C.
pub async fn run(config: AgentConfig, sources: Vec<Box<dyn Source>>) -> Result<()> {
    capabilities::check()?;
    config.node.validate()?;
    limits::raise_open_files();
    let mut pin_dir_lock = PinDirLock::acquire(&config.pin_dir)?;
    if let Some(adj) = config.oom_score_adj {
        limits::set_oom_score_adj(adj);
    }
    let status = Status::new(
        config.pin_dir.clone(),
        AgentMetrics::for_families(config.node.families()),
        config.metrics_max_series,
        config.health_timeout,
    );
    let mut tracker = ChangeTracker::new(&config.node.name)
        .with_default_scheduler(config.default_scheduler)
        .with_default_forwarding(config.default_forwarding)
        .with_service_proxy_name(config.service_proxy_name.clone());
    let mut schedule = SyncSchedule {
        min_sync_period: config.min_sync_period,
        unlisted: BTreeSet::new(),
        pending_since: None,
        pending_problems: Vec::new(),
        last_sync: None,
    };
    status.update_report(|r| *r = initial_report(&config));
    let (updates_tx, mut updates) = mpsc::channel(1024);
    let mut reporters = Vec::new();
    let mut running_sources = Vec::new();
    for source in sources {
        reporters.extend(source.problem_reporter());
        schedule.unlisted.insert(source.name());
        status.update_report(|r| {
            r.sources.push(SourceState {
                name: source.name().into(),
                listed: false,
            })
        });
        let feed = Updates::new(source.name(), updates_tx.clone());
        running_sources.push(source.start(feed));
    }
    drop(updates_tx);
    // The programs load and verify (seconds, for the uplink program) while the
    // sources read: a large manifests file is parsed and tracked meanwhile.
    let pin_dir = config.pin_dir.clone();
    let sizes = config.map_sizes;
    let settings = config.load_settings;
    let generation = match config.generation {
        Some(chosen) => chosen,
        None => Generation::of_this_kernel()?,
    };
    info!(%generation, "loading the data path");
    let mut loading = tokio::task::spawn_blocking(move || {
        Datapath::load_configured(&pin_dir, sizes, settings, generation)
    });
    let mut datapath = loop {
        tokio::select! {
            loaded = &mut loading => break loaded.context("loading the data path")??,
            Some(update) = updates.recv() => schedule.apply(update, &mut tracker, &status.metrics),
        }
    };
    let mut tables = Tables::open(&config.pin_dir)?;
    // Attached first: the hooks themselves tell the agent its namespace's cookie.
    attach::attach_sock_hooks(&mut datapath, &config.cgroup)?;
    let netns_cookie = netns_cookie::learn(&mut tables.config)?;
    match netns_cookie {
        Some(cookie) => info!(cookie, "socket hooks serve this network namespace"),
        None => {
            warn!("{SOCKET_HOOKS_OFF}");
            status.update_report(|r| r.socket_hooks = SOCKET_HOOKS_OFF.into());
        }
    }
    let mut syncer = Syncer::recover(tables)?.with_ct_timeouts(config.load_settings.ct_timeouts);
    let unbound = server::spawn(
        config.metrics_address,
        config.health_address,
        status.clone(),
        config.bind_hard_fail,
    )
    .await?;
    for failure in &unbound {
        warn!("{failure}; running without it (bindAddressHardFail is false)");
    }
    // Read before the first programming, so that a restart keeps every address that
    // answers NodePorts in place.
    let mut node_addresses = NodeAddresses {
        present: match config.node.node_ports.follows_interfaces() {
            true => interfaces::node_addresses().await?,
            false => BTreeSet::new(),
        },
    };
    let settings = NodeSettings {
        netns_cookie: netns_cookie.unwrap_or(0),
        xdp_redirect: config.xdp_redirect,
        tunnel_source: config.tunnel_source,
        tunnel_peers: config.tunnel_peers.clone(),
        cluster_cidrs: config.cluster_cidrs.clone(),
        interface_addresses: node_addresses.addresses(),
    };
    syncer.program_node(&config.node, &settings)?;
    let mut programmer = Programmer {
        tracker,
        syncer,
        health_checks: HealthCheckServers::new(status.clone()),
        reporters,
        metrics: status.metrics.clone(),
        reconciled: false,
        health_check_problems: Vec::new(),
        adopt_at_first_sync: config.adopt_kube_proxy_flows,
        adoption_read_error: None,
    };

    let (link_tx, mut link_rx) = mpsc::channel(256);
    let watcher = tokio::spawn(interfaces::watch(link_tx));
    let mut attachments = Attachments::default();
    let mut alive_ticker = tokio::time::interval(Duration::from_secs(1));
    let mut retry_ticker = tokio::time::interval(attachments::RETRY_INTERVAL);
    let mut gc_ticker = tokio::time::interval(config.ct_gc_interval);
    let mut terminate = unix::signal(unix::SignalKind::terminate())?;
    let mut links_listed = false;
    let mut marked_ready = false;
    // Checked once a second (the alive tick), not on every turn of the loop.
    let mut pins_whole = true;
    loop {
        let sync_due = schedule.due();
        tokio::select! {
            event = link_rx.recv() => match event {
                Some(LinkEvent::Present { index, name }) => {
                    attachments.present(&mut datapath, &config, index, &name);
                    status.update_report(|r| r.interfaces = attachments.states(&config));
                }
                Some(LinkEvent::AddressesListed(listed)) => {
                    let change = AddressChange::Listed(listed);
                    node_addresses.changed(&config, &mut programmer.syncer, change);
                }
                Some(LinkEvent::Address { index, address, present }) => {
                    let change = AddressChange::One { index, address, present };
                    node_addresses.changed(&config, &mut programmer.syncer, change);
                }
                Some(LinkEvent::Removed { index }) => {
                    attachments.removed(&config, index);
                    status.update_report(|r| r.interfaces = attachments.states(&config));
                }
                Some(LinkEvent::ListDone) => {
                    let missing = attachments.missing(&config);
                    if !missing.is_empty() {
                        warn!(?missing, "not attached yet; retried, and attached when they appear");
                    }
                    links_listed = true;
                }
                None => {
                    let result = watcher.await;
                    anyhow::bail!("interface watcher stopped: {result:?}");
                }
            },
            update = updates.recv() => {
                let Some(update) = update else {
                    anyhow::bail!("every source stopped");
                };
                schedule.apply(update, &mut programmer.tracker, &status.metrics);
            }
            _ = tokio::time::sleep_until(sync_due.unwrap_or_else(tokio::time::Instant::now)), if sync_due.is_some() => {
                let changed_at = schedule.pending_since.take();
                schedule.last_sync = Some(Instant::now());
                let problems = std::mem::take(&mut schedule.pending_problems);
                let standing = programmer.sync(problems, changed_at).await;
                status.health.synced();
                status.update_report(|r| {
                    r.problems = standing.shown;
                    r.problems_total = standing.total;
                });
            }
            _ = alive_ticker.tick() => {
                status.health.turned();
                status.metrics.programs.sample(&datapath.ebpf);
                if !datapath.pins_intact() {
                    restore_pinned_state(&mut datapath, &mut attachments, &config, &mut pin_dir_lock);
                }
                pins_whole = datapath.pins_intact();
                status.health.set_pins_broken(!pins_whole);
            }
            _ = retry_ticker.tick() => {
                attachments.retry(&mut datapath, &config);
                status.update_report(|r| r.interfaces = attachments.states(&config));
            }
            _ = gc_ticker.tick() => match programmer.syncer.collect_conntrack() {
                Ok((report, corrected)) => {
                    status.metrics.conntrack_expired.inc_by(report.expired as u64);
                    status.metrics.connection_count_corrections.inc_by(corrected as u64);
                    status
                        .metrics
                        .address_filter_occupancy
                        .set(programmer.syncer.address_filter_occupancy());
                    if corrected > 0 {
                        warn!(corrected, "connection counters disagreed with conntrack; corrected");
                    }
                    debug!(scanned = report.scanned, expired = report.expired, "conntrack GC");
                }
                Err(e) => warn!("conntrack GC: {e:#}"),
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
        // Ready once interfaces were listed, every source's first view is programmed
        // (a source that had nothing to say, such as a manifests file not there yet,
        // leaves the pinned state as it was), and everything of ours is attached.
        let mut missing = attachments.missing(&config);
        if !links_listed {
            missing.push("interfaces: not listed yet".into());
        }
        if !schedule.caught_up() {
            missing.push("sources: first view not programmed yet".into());
        }
        if !pins_whole {
            missing.push(format!(
                "pin directory {}: maps missing",
                config.pin_dir.display()
            ));
        }
        status.set_readiness(&missing);
        status.update_report(|r| {
            for source in &mut r.sources {
                source.listed = !schedule.unlisted.contains(source.name.as_str());
            }
        });
        status.health.set_pending(schedule.pending_since);
        let eligible = programmer.tracker.node_eligible();
        if status.health.set_node_eligible(eligible) {
            if eligible {
                info!("the node may serve again: /healthz follows the proxy's health");
            } else {
                warn!("the node is being deleted or tainted {}: /healthz answers 503 so that load balancers drain it", health::TO_BE_DELETED_TAINT);
            }
        }
        if let Some(now) = config
            .node
            .changed_addresses(programmer.tracker.node_addresses())
        {
            for source in &running_sources {
                source.abort();
            }
            anyhow::bail!(
                "the Node object's addresses changed from {:?} to {now:?}: exiting, to be \
                 restarted with them",
                config.node.addresses
            );
        }
        if missing.is_empty() && !marked_ready {
            marked_ready = true;
            if let Some(report) = programmer.finish_adoption() {
                report_adoption(&status, report);
            }
            mark_ready(&config)?;
        }
    }
    for source in running_sources {
        source.abort();
    }
    info!("stopping; programs stay attached through their pinned links (`ebpf-proxy cleanup` detaches)");
    Ok(())
}

/// The IPv4 addresses on the node's interfaces, by interface (an address may be on
/// two), followed when `nodePortAddresses` chooses from them.
struct NodeAddresses {
    present: BTreeSet<(u32, std::net::IpAddr)>,
}

/// What the interface watcher said about addresses.
enum AddressChange {
    /// All of them (its own listing: no change can have slipped past it).
    Listed(BTreeSet<(u32, std::net::IpAddr)>),
    One {
        index: u32,
        address: std::net::IpAddr,
        present: bool,
    },
}

impl NodeAddresses {
    fn addresses(&self) -> BTreeSet<std::net::IpAddr> {
        self.present.iter().map(|(_, address)| *address).collect()
    }

    fn changed(&mut self, config: &AgentConfig, syncer: &mut Syncer, change: AddressChange) {
        let before = self.addresses();
        match change {
            AddressChange::Listed(listed) => self.present = listed,
            AddressChange::One {
                index,
                address,
                present,
            } => {
                if present {
                    self.present.insert((index, address));
                } else {
                    self.present.remove(&(index, address));
                }
            }
        }
        let now = self.addresses();
        if now == before || !config.node.node_ports.follows_interfaces() {
            return;
        }
        let entries = config.node.node_ports.entries(&config.node.addresses, &now);
        let listed = |set: Vec<&std::net::IpAddr>| -> String {
            set.iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let answering = listed(
            entries
                .iter()
                .filter(|(_, flags)| flags.answers_node_ports())
                .map(|(addr, _)| addr)
                .collect(),
        );
        let added = listed(now.difference(&before).collect());
        let removed = listed(before.difference(&now).collect());
        match syncer.program_node_addresses(&entries) {
            Ok(()) => {
                info!(%added, %removed, %answering, "node addresses changed: NodePorts follow")
            }
            Err(e) => warn!("programming the node's addresses: {e:#}"),
        }
    }
}

/// What `/statusz` says before anything happened.
fn initial_report(config: &AgentConfig) -> AgentReport {
    AgentReport {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        node: config.node.name.clone(),
        node_ips: config.node.addresses.clone(),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        socket_hooks: config.cgroup.display().to_string(),
        conntrack_timeouts: config.load_settings.ct_timeouts.into(),
        masquerade_all: config.load_settings.masquerade_all != 0,
        settings: Settings {
            xdp_mode: match config.xdp_mode {
                XdpMode::Driver => "native".into(),
                _ => "skb".into(),
            },
            xdp_forward: if config.xdp_redirect {
                "redirect"
            } else {
                "pass"
            }
            .into(),
            tc_attach: format!("{:?}", config.tc_attach.resolved()).to_lowercase(),
            forwarding: config.default_forwarding.name().into(),
            scheduler: config.default_scheduler.name().into(),
        },
        ..Default::default()
    }
}

/// Someone removed the pin directory (or pins in it) under the running agent: the
/// maps live on in the descriptors the agent holds, so they are pinned again, and
/// the links, which went with their pins, are attached again.
fn restore_pinned_state(
    datapath: &mut Datapath,
    attachments: &mut Attachments,
    config: &AgentConfig,
    lock: &mut PinDirLock,
) {
    warn!(pin_dir = %config.pin_dir.display(), "pinned maps vanished; pinning them again and re-attaching");
    // First, so that no other agent takes a directory made anew in the meantime.
    if let Err(e) = lock.renew(&config.pin_dir) {
        warn!("locking the pin directory again: {e:#}");
    }
    match datapath.restore_pins() {
        Ok(restored) => info!(restored, "maps pinned again"),
        Err(e) => {
            warn!("restoring the pinned maps: {e:#}");
            return;
        }
    }
    attachments.attach_again(datapath, config);
    if let Err(e) = attach::attach_sock_hooks(datapath, &config.cgroup) {
        warn!("re-attaching the socket hooks: {e:#}");
    }
}

impl Programmer {
    async fn start_adoption(&mut self) {
        let started = interfaces::node_addresses().await.and_then(|addresses| {
            let local = addresses.into_iter().map(|(_, address)| address).collect();
            self.syncer.start_adoption(local)
        });
        if let Err(e) = started {
            warn!("not adopting kube-proxy's flows: reading them failed: {e:#}");
            self.adoption_read_error = Some(format!("{e:#}"));
        }
    }

    /// What the adoption did, once it is over (`None`: there was none).
    fn finish_adoption(&mut self) -> Option<AdoptionReport> {
        self.syncer.finish_adoption().or_else(|| {
            let read_error = self.adoption_read_error.take()?;
            Some(AdoptionReport {
                read_error: Some(read_error),
                ..AdoptionReport::default()
            })
        })
    }
}

/// Says what the adoption did: in the log, the metrics and `status`.
fn report_adoption(status: &Status, report: AdoptionReport) {
    if report.read_error.is_none() {
        info!(
            adopted = report.adopted,
            not_adopted = ?report.not_adopted,
            not_deleted = report.not_deleted,
            "kube-proxy's flows adopted; its rules may go now"
        );
    }
    status.metrics.flows_adopted.inc_by(report.adopted as u64);
    for (reason, n) in &report.not_adopted {
        let labels = vec![("reason".to_owned(), reason.clone())];
        status
            .metrics
            .flows_not_adopted
            .get_or_create(&labels)
            .inc_by(*n as u64);
    }
    status.update_report(|r| r.adoption = Some(report));
}

fn mark_ready(config: &AgentConfig) -> Result<()> {
    info!("ready");
    if let Some(path) = &config.ready_file {
        std::fs::write(path, b"ready\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
