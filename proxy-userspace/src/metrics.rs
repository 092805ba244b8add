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

use crate::{datapath::tables::Tables, listing};
use proxy_common::map_name;

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

/// The whole exposition, in the OpenMetrics text format.
pub fn render(pin_dir: &Path, agent: &AgentMetrics) -> Result<String> {
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
    let listing = listing::read_tables(&tables)?;
    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let connections = Family::<Labels, Counter>::default();
    let backend_packets = Family::<Labels, Counter>::default();
    let backend_bytes = Family::<Labels, Counter>::default();
    let backend_connections = Family::<Labels, Counter>::default();
    let flows = Family::<Labels, Gauge>::default();
    for service in &listing.services {
        let frontend = service.frontend.to_string();
        let base = [
            ("service", service.service.as_str()),
            ("frontend", frontend.as_str()),
        ];
        let s = &service.stats;
        connections
            .get_or_create(&labels(&base))
            .inc_by(s.connections);
        for (direction, p, b) in [
            ("in", s.packets_in, s.bytes_in),
            ("out", s.packets_out, s.bytes_out),
        ] {
            let l = labels(&[base[0], base[1], ("direction", direction)]);
            packets.get_or_create(&l).inc_by(p);
            bytes.get_or_create(&l).inc_by(b);
        }
        for backend in &service.backends {
            let address = format!("{}:{}", backend.endpoint.addr, backend.endpoint.port);
            let with_backend = [base[0], base[1], ("backend", address.as_str())];
            let b = &backend.stats;
            backend_connections
                .get_or_create(&labels(&with_backend))
                .inc_by(b.connections);
            for (direction, p, n) in [
                ("in", b.packets_in, b.bytes_in),
                ("out", b.packets_out, b.bytes_out),
            ] {
                let l = labels(&[
                    with_backend[0],
                    with_backend[1],
                    with_backend[2],
                    ("direction", direction),
                ]);
                backend_packets.get_or_create(&l).inc_by(p);
                backend_bytes.get_or_create(&l).inc_by(n);
            }
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
    registry.register(
        "service_packets",
        "Packets through a service frontend",
        packets,
    );
    registry.register(
        "service_bytes",
        "IP bytes through a service frontend",
        bytes,
    );
    registry.register(
        "service_connections",
        "Flows a frontend scheduled",
        connections,
    );
    registry.register(
        "backend_packets",
        "Packets to and from a backend",
        backend_packets,
    );
    registry.register(
        "backend_bytes",
        "IP bytes to and from a backend",
        backend_bytes,
    );
    registry.register(
        "backend_connections",
        "Flows scheduled to a backend",
        backend_connections,
    );
    registry.register(
        "backend_flows",
        "Open (active) and closed but tracked (inactive) flows",
        flows,
    );

    let events = Family::<Labels, Counter>::default();
    for (reason, n) in &listing.events {
        events
            .get_or_create(&labels(&[("reason", reason)]))
            .inc_by(*n);
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
