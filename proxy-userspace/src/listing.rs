//! `ebpf-proxy list`: an `ipvsadm -Ln --stats`-like view of the pinned maps of a
//! running (or stopped) agent.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use aya::maps::lpm_trie::Key as LpmKey;
use proxy_common::{
    BackendSlotKey, ServiceValue, SourceRangeKey, TrafficStats, SVC_F_DSR, SVC_F_EXTERNAL,
    SVC_F_LOCAL_ONLY, SVC_F_SOURCE_RANGES,
};
use serde::{Deserialize, Serialize};

use crate::{
    datapath::{
        codec::{endpoint_of, frontend_key, source_range_id, source_range_of},
        tables::Tables,
    },
    model::{Endpoint, Family, FrontendKey, Helper, Scheduler},
};

#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceRow {
    pub frontend: FrontendKey,
    pub service: String,
    pub scheduler: String,
    pub external: bool,
    /// A traffic policy `Local` narrowed it to this node's endpoints.
    pub local_only: bool,
    /// `dsr-ipip`: new external flows to remote endpoints are encapsulated to them.
    pub dsr: bool,
    /// Its connection-tracking helper (related flows).
    #[serde(default)]
    pub helper: Helper,
    /// `sessionAffinity: ClientIP` timeout (IPVS's "persistent"); 0 = none.
    pub affinity_timeout_s: u32,
    /// `loadBalancerSourceRanges`: `None` admits everybody.
    pub source_ranges: Option<Vec<String>>,
    pub stats: TrafficStats,
    pub backends: Vec<BackendRow>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BackendRow {
    pub endpoint: Endpoint,
    /// Flows not closed yet (IPVS's ActiveConn).
    pub active: u64,
    /// Closed flows whose conntrack entry has not expired (IPVS's InActConn).
    pub inactive: u64,
    pub stats: TrafficStats,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Listing {
    pub services: Vec<ServiceRow>,
    /// Data path events (drops, misses…) by reason, summed over CPUs.
    pub events: Vec<(String, u64)>,
}

impl Listing {
    /// How often the data path counted the event `name` (0: never, or no such name).
    pub fn event(&self, name: &str) -> u64 {
        self.events
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, count)| *count)
    }
}

pub fn read(pin_dir: &Path) -> Result<Listing> {
    read_tables(&Tables::open(pin_dir)?)
}

pub fn read_tables(tables: &Tables) -> Result<Listing> {
    let mut ranges: BTreeMap<u32, Vec<LpmKey<SourceRangeKey>>> = BTreeMap::new();
    for key in tables.source_ranges.keys().filter_map(Result::ok) {
        ranges.entry(source_range_id(&key)).or_default().push(key);
    }
    let mut services = Vec::new();
    for entry in tables.services.iter() {
        let (key, value) = entry.context("reading SERVICES")?;
        let Some(frontend) = frontend_key(&key) else {
            continue;
        };
        let family = frontend.listen.family();
        let source_ranges = ranges.remove(&value.id).unwrap_or_default();
        services.push(ServiceRow {
            frontend,
            service: tables.service_name(value.id).unwrap_or_default(),
            scheduler: Scheduler::from_number(value.scheduler)
                .map_or_else(|| format!("#{}", value.scheduler), |s| s.name().to_owned()),
            external: value.flags & SVC_F_EXTERNAL != 0,
            local_only: value.flags & SVC_F_LOCAL_ONLY != 0,
            dsr: value.flags & SVC_F_DSR != 0,
            helper: Helper::from_number(value.helper),
            affinity_timeout_s: value.affinity_timeout_s,
            source_ranges: (value.flags & SVC_F_SOURCE_RANGES != 0).then(|| {
                source_ranges
                    .iter()
                    .map(|key| source_range_of(key, family).to_string())
                    .collect()
            }),
            stats: Tables::stats_sum(&tables.service_stats, value.id),
            backends: backend_rows(tables, &value, family),
        });
    }
    services.sort_by_key(|s| s.frontend);
    Ok(Listing {
        services,
        events: tables
            .events()
            .into_iter()
            .map(|(name, n)| (name.to_owned(), n))
            .collect(),
    })
}

/// A frontend's backends with their counts and traffic, by address.
pub fn backend_rows(tables: &Tables, service: &ServiceValue, family: Family) -> Vec<BackendRow> {
    let mut backends = Vec::new();
    for slot in 0..service.backend_count {
        let slot_key = BackendSlotKey {
            service_id: service.id,
            slot,
        };
        if let Ok(backend) = tables.slots.get(&slot_key, 0) {
            let counts = tables.conn_counts.get(&backend.id, 0).unwrap_or_default();
            backends.push(BackendRow {
                endpoint: endpoint_of(&backend, family),
                active: counts.active,
                inactive: counts.inactive,
                stats: Tables::stats_sum(&tables.backend_stats, backend.id),
            });
        }
    }
    backends.sort_by_key(|b| (b.endpoint.addr, b.endpoint.port));
    backends
}

fn stats_columns(s: &TrafficStats) -> String {
    format!(
        "{:>8} {:>9} {:>9} {:>11} {:>11}",
        s.connections, s.packets_in, s.packets_out, s.bytes_in, s.bytes_out
    )
}

/// The ipvsadm-like table; `wide` adds each frontend's kind and policies (external or
/// in-cluster, traffic policy `Local`, `dsr-ipip`, a helper) and every data path event, zero
/// ones too.
pub fn render(listing: &Listing, wide: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<36} {:>6} {:>6} {:>6} {:>8} {:>9} {:>9} {:>11} {:>11}",
        "Prot LocalAddress:Port Scheduler",
        "Weight",
        "Active",
        "InAct",
        "Conns",
        "InPkts",
        "OutPkts",
        "InBytes",
        "OutBytes"
    );
    let _ = writeln!(out, "  -> RemoteAddress:Port");
    for service in &listing.services {
        let mut head = format!("{} {}", service.frontend, service.scheduler);
        if service.affinity_timeout_s != 0 {
            let _ = write!(head, " persistent {}", service.affinity_timeout_s);
        }
        if let Some(ranges) = &service.source_ranges {
            let _ = write!(head, " from [{}]", ranges.join(","));
        }
        if wide {
            let kind = if service.external {
                "external"
            } else {
                "cluster"
            };
            let _ = write!(head, " [{kind}");
            for (set, flag) in [
                (service.local_only, "local-only"),
                (service.dsr, "dsr-ipip"),
                (service.helper == Helper::Tftp, "helper tftp"),
            ] {
                if set {
                    let _ = write!(head, " {flag}");
                }
            }
            head.push(']');
        }
        let _ = writeln!(
            out,
            "{head:<36} {:>22} {}  {}",
            "",
            stats_columns(&service.stats),
            service.service
        );
        for backend in &service.backends {
            let remote = if backend.endpoint.remote {
                " (remote)"
            } else {
                ""
            };
            // `[addr]:port` for IPv6, as ipvsadm writes it.
            let name = format!(
                "  -> {}{remote}",
                std::net::SocketAddr::new(backend.endpoint.addr, backend.endpoint.port)
            );
            let _ = writeln!(
                out,
                "{name:<36} {:>6} {:>6} {:>6} {}",
                backend.endpoint.weight,
                backend.active,
                backend.inactive,
                stats_columns(&backend.stats)
            );
        }
    }
    let events: Vec<String> = listing
        .events
        .iter()
        .filter(|(_, n)| wide || *n > 0)
        .map(|(name, n)| format!("{name}={n}"))
        .collect();
    if !events.is_empty() {
        let _ = writeln!(out, "data path events: {}", events.join(" "));
    }
    out
}
