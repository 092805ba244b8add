//! Prometheus metrics: the agent's own (syncs, GC) kept as live counters, and the
//! data path's (per-service and per-backend traffic, flow counts, events by reason,
//! map fill levels) read from the pinned maps at each scrape, so they are right even
//! for what happened while the agent was down.

use std::path::Path;

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

use crate::{
    datapath::{codec::frontend_key, tables::Tables},
    listing,
};
use proxy_common::{map_name, TrafficStats};

/// Counters the agent updates as it works.
#[derive(Clone)]
pub struct AgentMetrics {
    pub syncs: Counter,
    pub sync_duration_seconds: Histogram,
    pub sync_problems: Gauge,
    pub udp_flows_flushed: Counter,
    pub conntrack_expired: Counter,
    pub connection_count_corrections: Counter,
    /// From a change's arrival (a watch event, a re-read manifests file) to the maps
    /// holding it, including the wait imposed by the minimum sync period.
    pub programming_latency_seconds: Histogram,
    /// Failed list/watch calls to the API server, by resource.
    pub source_errors: Family<Labels, Counter>,
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
            programming_latency_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 18)),
            source_errors: Family::default(),
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
    let mut registry = Registry::with_prefix("ebpf_proxy");
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
        "conntrack_expired",
        "Conntrack entries collected after their idle timeout",
        agent.conntrack_expired.clone(),
    );
    registry.register(
        "connection_count_corrections",
        "Backend connection counters corrected to what the conntrack table holds",
        agent.connection_count_corrections.clone(),
    );

    let tables = Tables::open(pin_dir)?;
    register_traffic(&mut registry, &tables, max_series);

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
    let fill = [
        (map_name::SERVICES, tables.services.keys().count()),
        (map_name::BACKEND_SLOTS, tables.slots.keys().count()),
        (map_name::CONNTRACK, tables.conntrack.keys().count()),
    ];
    for (map, used) in fill {
        let max = tables.capacity(map)?;
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
    encode(&mut out, &registry)?;
    Ok(out)
}

/// Traffic per frontend and per backend (within `max_series`), and over all frontends.
fn register_traffic(registry: &mut Registry, tables: &Tables, max_series: usize) {
    let mut frontends: Vec<_> = tables
        .services
        .iter()
        .filter_map(Result::ok)
        .filter_map(|(key, value)| Some((frontend_key(&key)?, value)))
        .collect();
    frontends.sort_by_key(|(frontend, _)| *frontend);
    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let connections = Family::<Labels, Counter>::default();
    let backend_packets = Family::<Labels, Counter>::default();
    let backend_bytes = Family::<Labels, Counter>::default();
    let backend_connections = Family::<Labels, Counter>::default();
    let flows = Family::<Labels, Gauge>::default();
    let mut total = TrafficStats::default();
    let (mut omitted_frontends, mut omitted_backends) = (0, 0);
    let mut room = max_series;
    for (frontend, value) in &frontends {
        let s = Tables::stats_sum(&tables.service_stats, value.id);
        total.add(&s);
        let backend_series = value.backend_count as usize * SERIES_PER_BACKEND;
        if room < SERIES_PER_FRONTEND {
            omitted_frontends += 1;
            omitted_backends += u64::from(value.backend_count);
            continue;
        }
        room -= SERIES_PER_FRONTEND;
        let service = tables.service_name(value.id).unwrap_or_default();
        let frontend_family = frontend.listen.family();
        let frontend = frontend.to_string();
        let base = [
            ("service", service.as_str()),
            ("frontend", frontend.as_str()),
        ];
        add_traffic(&connections, &packets, &bytes, &base, &s);
        if room < backend_series {
            omitted_backends += u64::from(value.backend_count);
            continue;
        }
        room -= backend_series;
        for backend in listing::backend_rows(tables, value, frontend_family) {
            let address =
                std::net::SocketAddr::new(backend.endpoint.addr, backend.endpoint.port).to_string();
            let with_backend = [base[0], base[1], ("backend", address.as_str())];
            add_traffic(
                &backend_connections,
                &backend_packets,
                &backend_bytes,
                &with_backend,
                &backend.stats,
            );
            for (state, n) in [("active", backend.active), ("inactive", backend.inactive)] {
                let l = labels(&[
                    with_backend[0],
                    with_backend[1],
                    with_backend[2],
                    ("state", state),
                ]);
                flows.get_or_create(&l).set(n as i64);
            }
        }
    }
    let all_connections: Counter = Counter::default();
    all_connections.inc_by(total.connections);
    let all_packets = Family::<Labels, Counter>::default();
    let all_bytes = Family::<Labels, Counter>::default();
    add_directions(&all_packets, &all_bytes, &[], &total);
    let omitted = Family::<Labels, Gauge>::default();
    for (kind, n) in [
        ("frontend", omitted_frontends),
        ("backend", omitted_backends),
    ] {
        omitted
            .get_or_create(&labels(&[("kind", kind)]))
            .set(n as i64);
    }
    for (name, help, family) in [
        (
            "service_packets",
            "Packets through a service frontend",
            packets,
        ),
        (
            "service_bytes",
            "IP bytes through a service frontend",
            bytes,
        ),
        (
            "service_connections",
            "Flows a frontend scheduled",
            connections,
        ),
        (
            "backend_packets",
            "Packets to and from a backend",
            backend_packets,
        ),
        (
            "backend_bytes",
            "IP bytes to and from a backend",
            backend_bytes,
        ),
        (
            "backend_connections",
            "Flows scheduled to a backend",
            backend_connections,
        ),
        (
            "frontends_packets",
            "Packets through all frontends",
            all_packets,
        ),
        (
            "frontends_bytes",
            "IP bytes through all frontends",
            all_bytes,
        ),
    ] {
        registry.register(name, help, family);
    }
    registry.register(
        "frontends_connections",
        "Flows all frontends scheduled",
        all_connections,
    );
    registry.register(
        "backend_flows",
        "Open (active) and closed but tracked (inactive) flows",
        flows,
    );
    registry.register(
        "metrics_series_omitted",
        "Frontends and backends without series of their own (--metrics-max-series); the frontends_* totals still count them",
        omitted,
    );
}

/// A connections counter and in/out packet and byte counters for one label set.
fn add_traffic(
    connections: &Family<Labels, Counter>,
    packets: &Family<Labels, Counter>,
    bytes: &Family<Labels, Counter>,
    base: &[(&str, &str)],
    stats: &TrafficStats,
) {
    connections
        .get_or_create(&labels(base))
        .inc_by(stats.connections);
    add_directions(packets, bytes, base, stats);
}

/// In and out packet and byte counters for one label set.
fn add_directions(
    packets: &Family<Labels, Counter>,
    bytes: &Family<Labels, Counter>,
    base: &[(&str, &str)],
    stats: &TrafficStats,
) {
    for (direction, p, b) in [
        ("in", stats.packets_in, stats.bytes_in),
        ("out", stats.packets_out, stats.bytes_out),
    ] {
        let mut with_direction = base.to_vec();
        with_direction.push(("direction", direction));
        let l = labels(&with_direction);
        packets.get_or_create(&l).inc_by(p);
        bytes.get_or_create(&l).inc_by(b);
    }
}
