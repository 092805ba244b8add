//! The data path's traffic, per frontend and per backend (within `--metrics-max-series`)
//! and over all frontends, read from the pinned maps at each scrape.

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use proxy_common::TrafficStats;

use super::{labels, Labels, SERIES_PER_BACKEND, SERIES_PER_FRONTEND};
use crate::{
    datapath::{codec::frontend_key, tables::Tables},
    listing,
};

/// Traffic per frontend and per backend (within `max_series`), and over all frontends.
pub(super) fn register(registry: &mut Registry, tables: &Tables, max_series: usize) {
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
