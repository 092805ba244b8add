//! Programming latency through the Kubernetes source, end to end: the real agent in
//! a node namespace watches the test API server (`testbed::apiserver`, real HTTP and
//! the real list/watch protocol) holding N services x 10 endpoints; one endpoint of
//! one service changes at a time, and the time from the API server accepting the
//! change to the kernel map holding the new backend is measured by polling the pinned
//! map (p50/p99). The agent runs with `--min-sync-period-ms 0`: with the default
//! (1000) an isolated change is programmed at once too, and only a burst waits.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use ebpf_proxy::datapath::tables::Tables;
use proxy_common::{Addr, BackendSlotKey};
use serde::Serialize;
use testbed::{
    agent::{Agent, AgentOptions},
    apiserver::FakeApiServer,
    manifests::render,
    topology::Topology,
};

use crate::control_plane::{changed_address, percentile, service_defs, ENDPOINTS};

const CHANGES: usize = 200;

#[derive(Serialize)]
pub struct WatchResult {
    services: usize,
    endpoints_per_service: usize,
    /// From the agent's start to ready (first full list programmed).
    initial_sync_s: f64,
    change_p50_ms: f64,
    change_p99_ms: f64,
    changes: usize,
}

/// Whether the service with this id has a backend at `addr` in the maps.
fn programmed(tables: &Tables, service_id: u32, count: u32, addr: Addr) -> bool {
    (0..count).any(|slot| {
        tables
            .slots
            .get(&BackendSlotKey { service_id, slot }, 0)
            .is_ok_and(|b| b.addr == addr)
    })
}

pub fn measure(services: usize) -> Result<WatchResult> {
    let prefix = format!("epxw{}", std::process::id() % 100_000);
    let topology = Topology::build(&prefix, 0, 0)?;
    let api = FakeApiServer::start(&topology.node.path())?;
    let mut defs = service_defs(services, ENDPOINTS);
    api.apply_manifests(&render(&defs))?;
    let kubeconfig = api.kubeconfig();
    let binary = std::env::current_exe()?.with_file_name("ebpf-proxy");
    let started = Instant::now();
    let agent = Agent::start_with(
        &binary,
        &topology,
        &PathBuf::from(format!("/tmp/{prefix}")),
        "",
        AgentOptions {
            extra_args: &["--min-sync-period-ms", "0"],
            kubeconfig: Some(&kubeconfig),
            ..Default::default()
        },
    )?;
    let initial_sync = started.elapsed();
    let tables = Tables::open(&agent.pin_dir)?;
    let ids: BTreeMap<Addr, (u32, u32)> = tables
        .services
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| (k.addr, (v.id, v.backend_count)))
        .collect();
    anyhow::ensure!(
        ids.len() == services,
        "{} of {services} services programmed",
        ids.len()
    );
    let mut samples = Vec::new();
    for change in 0..CHANGES {
        let index = (change * 7919) % services;
        let new: Ipv4Addr = changed_address(change).parse()?;
        defs[index].backends[0].0 = new;
        let vip = Addr::from_v4_octets(defs[index].cluster_ip.octets());
        let (id, count) = ids[&vip];
        let text = render(&defs[index..=index]);
        let started = Instant::now();
        api.apply_manifests(&text)?;
        let deadline = started + Duration::from_secs(10);
        while !programmed(&tables, id, count, Addr::from_v4_octets(new.octets())) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "change {change} not programmed:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_micros(50));
        }
        samples.push(started.elapsed());
    }
    Ok(WatchResult {
        services,
        endpoints_per_service: ENDPOINTS,
        initial_sync_s: initial_sync.as_secs_f64(),
        change_p50_ms: percentile(&mut samples, 0.5),
        change_p99_ms: percentile(&mut samples, 0.99),
        changes: CHANGES,
    })
}

pub fn run(quick: bool) -> Result<Vec<WatchResult>> {
    let scales: &[usize] = if quick {
        &[100, 1_000]
    } else {
        &[100, 1_000, 10_000]
    };
    println!(
        "{:>9} {:>16} | one endpoint change through the API server, ms p50/p99",
        "services", "initial sync s"
    );
    let mut results = Vec::new();
    for &services in scales {
        let r = measure(services).with_context(|| format!("{services} services via the API"))?;
        println!(
            "{:>9} {:>16.2} | {:.3}/{:.3}",
            r.services, r.initial_sync_s, r.change_p50_ms, r.change_p99_ms
        );
        results.push(r);
    }
    Ok(results)
}
