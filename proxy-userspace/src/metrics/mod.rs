//! Prometheus metrics: the agent's own (syncs, GC) kept as live counters, and the
//! data path's (per-service and per-backend traffic, flow counts, events by reason,
//! map fill levels) read from the pinned maps at each scrape, so they are right even
//! for what happened while the agent was down; all under `ebpf_proxy_`. Beside them,
//! kube-proxy's own names (`kube_proxy`) and the process metrics every Kubernetes
//! component exports (`process`).

mod kube_proxy;
mod process;
mod programs;
mod traffic;

use std::{path::Path, sync::atomic::AtomicU64};

use anyhow::Result;
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use crate::datapath::tables::Tables;
pub use kube_proxy::KubeProxyMetrics;
pub use programs::ProgramRunStats;

/// Counters the agent updates as it works.
#[derive(Clone)]
pub struct AgentMetrics {
    pub syncs: Counter,
    pub sync_duration_seconds: Histogram,
    pub sync_problems: Gauge,
    pub udp_flows_flushed: Counter,
    pub conntrack_expired: Counter,
    pub connection_count_corrections: Counter,
    /// The share of the address filter's bits set, as of the last conntrack
    /// collection (which rebuilds it).
    pub address_filter_occupancy: Gauge<f64, AtomicU64>,
    /// kube-proxy's flows adopted at start (`--adopt-kube-proxy-flows`), and those
    /// left to netfilter, by reason.
    pub flows_adopted: Counter,
    pub flows_not_adopted: Family<Labels, Counter>,
    /// From a change's arrival (a watch event, a re-read manifests file) to the maps
    /// holding it, including the wait imposed by the minimum sync period.
    pub programming_latency_seconds: Histogram,
    /// Failed list/watch calls to the API server, by resource.
    pub source_errors: Family<Labels, Counter>,
    pub kube_proxy: KubeProxyMetrics,
    /// The data path programs' own run counts and times (`programs`).
    pub programs: ProgramRunStats,
}

impl AgentMetrics {
    /// For a node of these families (kube-proxy's `ip_family` label).
    pub fn for_families(families: impl IntoIterator<Item = proxy_common::Family>) -> AgentMetrics {
        AgentMetrics {
            kube_proxy: KubeProxyMetrics::for_families(families),
            ..AgentMetrics::default()
        }
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            syncs: Counter::default(),
            sync_duration_seconds: Histogram::new(exponential_buckets(0.000_01, 4.0, 12)),
            sync_problems: Gauge::default(),
            udp_flows_flushed: Counter::default(),
            conntrack_expired: Counter::default(),
            connection_count_corrections: Counter::default(),
            address_filter_occupancy: Gauge::default(),
            flows_adopted: Counter::default(),
            flows_not_adopted: Family::default(),
            programming_latency_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 18)),
            source_errors: Family::default(),
            kube_proxy: KubeProxyMetrics::default(),
            programs: ProgramRunStats::default(),
        }
    }
}

pub type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Series written per frontend (connections, packets and bytes in and out) and per
/// backend (the same, and its active and inactive flows).
const SERIES_PER_FRONTEND: usize = 5;
const SERIES_PER_BACKEND: usize = 7;

/// The whole exposition, in the OpenMetrics text format. Per-frontend and per-backend
/// series are written for frontends in listing order until `max_series` would be
/// passed (a frontend's backends only when all of them fit); the totals cover every
/// frontend, and `metrics_series_omitted` says what was left out. A node with
/// 100,000 services would otherwise answer each scrape with hundreds of megabytes.
pub fn render(pin_dir: &Path, agent: &AgentMetrics, max_series: usize) -> Result<String> {
    let mut root = Registry::default();
    agent.kube_proxy.register(&mut root);
    process::register(&mut root);
    let registry = root.sub_registry_with_prefix("ebpf_proxy");
    registry.register(
        "syncs",
        "Syncs of the maps with the source",
        agent.syncs.clone(),
    );
    registry.register(
        "sync_duration_seconds",
        "Time from reading a source change to the maps holding it",
        agent.sync_duration_seconds.clone(),
    );
    registry.register(
        "sync_problems",
        "Problems standing after the last sync: objects not (fully) translated, frontends not programmed (retried every sync), and the last reports of sources and health checks",
        agent.sync_problems.clone(),
    );
    registry.register(
        "udp_flows_flushed",
        "UDP flows removed because their backend left",
        agent.udp_flows_flushed.clone(),
    );
    registry.register(
        "network_programming_duration_seconds",
        "Time from a change arriving from the source to the maps holding it",
        agent.programming_latency_seconds.clone(),
    );
    registry.register(
        "source_errors",
        "Failed list or watch calls to the API server (retried with backoff)",
        agent.source_errors.clone(),
    );
    registry.register(
        "address_filter_occupancy",
        "Share of the address filter's bits set: about the share of packets not ours, per address tested, that still take the conntrack and frontend look-ups",
        agent.address_filter_occupancy.clone(),
    );
    registry.register(
        "conntrack_expired",
        "Conntrack entries collected after their idle timeout",
        agent.conntrack_expired.clone(),
    );
    registry.register(
        "kube_proxy_flows_adopted",
        "Flows of kube-proxy's rules the data path took over at start (--adopt-kube-proxy-flows)",
        agent.flows_adopted.clone(),
    );
    registry.register(
        "kube_proxy_flows_not_adopted",
        "Flows of kube-proxy's rules left to netfilter at start, by reason",
        agent.flows_not_adopted.clone(),
    );
    registry.register(
        "connection_count_corrections",
        "Backend connection counters corrected to what the conntrack table holds",
        agent.connection_count_corrections.clone(),
    );

    agent.programs.register(registry);

    let tables = Tables::open(pin_dir)?;
    traffic::register(registry, &tables, max_series);

    let events = Family::<Labels, Counter>::default();
    for (reason, n) in tables.events() {
        events
            .get_or_create(&labels(&[("reason", reason)]))
            .inc_by(n);
    }
    registry.register(
        "datapath_events",
        "What the data path did, by reason (drops, misses, races)",
        events,
    );

    let entries = Family::<Labels, Gauge>::default();
    let capacity = Family::<Labels, Gauge>::default();
    for (map, used, max) in tables.fill()? {
        entries
            .get_or_create(&labels(&[("map", map)]))
            .set(used as i64);
        capacity
            .get_or_create(&labels(&[("map", map)]))
            .set(i64::from(max));
    }
    registry.register(
        "map_entries",
        "Entries in a map (conntrack: LRU, evicts when full)",
        entries,
    );
    registry.register("map_capacity", "Maximum entries of a map", capacity);

    let mut out = String::new();
    encode(&mut out, &root)?;
    Ok(out)
}
