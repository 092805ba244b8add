//! Control plane: programming latency of one endpoint change.
//!
//! Loads the real data path (maps in a private bpffs directory, nothing attached),
//! programs N services x 10 endpoints from cold through the real change tracker and
//! syncer, then changes one endpoint of one service at a time and measures how long
//! it takes until the maps hold the change (p50/p99):
//! - *incremental*: the source reports the one changed EndpointSlice (as the API
//!   watcher does), the tracker re-translates that service, the syncer writes it;
//! - *manifests file*: the whole file is parsed again and compared, as the file
//!   source does on every change.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use ebpf_proxy::{
    datapath::{attach, loader::Datapath, tables::Tables},
    source::{manifests::parse, Objects},
    sync::{NodeSettings, Syncer},
    tracker::ChangeTracker,
};
use serde::Serialize;
use testbed::manifests::{render, ServiceDef};

pub const ENDPOINTS: usize = 10;
const CHANGES: usize = 500;
/// Re-parsing the whole file is slow at scale: fewer samples.
const FILE_CHANGES: usize = 20;

pub fn changed_address(change: usize) -> String {
    Ipv4Addr::new(10, 200, (change / 250) as u8, (change % 250) as u8).to_string()
}

#[derive(Serialize)]
pub struct ScaleResult {
    services: usize,
    endpoints_per_service: usize,
    cold_program_ms: f64,
    incremental_change_p50_ms: f64,
    incremental_change_p99_ms: f64,
    file_change_p50_ms: f64,
    file_change_p99_ms: f64,
    map_writes_per_change: usize,
}

/// `count` ClusterIP services with `endpoints` endpoints each, all addresses distinct.
pub fn service_defs(count: usize, endpoints: usize) -> Vec<ServiceDef> {
    (0..count)
        .map(|i| {
            let cluster_ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i as u32 + 1);
            let mut def = ServiceDef::new(&format!("svc{i}"), cluster_ip, "TCP", 80, 8080);
            def.backends = (0..endpoints)
                .map(|e| {
                    let addr = u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i * endpoints + e) as u32;
                    (Ipv4Addr::from(addr), "node-a".to_owned())
                })
                .collect();
            def
        })
        .collect()
}

pub fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index].as_secs_f64() * 1000.0
}

pub fn measure(services: usize) -> Result<ScaleResult> {
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/epx-bench-{}", std::process::id()));
    let _datapath = Datapath::load(&pin_dir)?;
    let result = (|| {
        let mut syncer = Syncer::recover(Tables::open(&pin_dir)?)?;
        syncer.program_node(
            &ebpf_proxy::node::NodeConfig {
                name: "node-a".into(),
                addresses: vec![Ipv4Addr::new(198, 18, 0, 1).into()],
                node_ports: Default::default(),
                uplinks: vec![],
                pod_interface_patterns: vec![],
                addresses_from: ebpf_proxy::node::AddressesFrom::Flags,
            },
            &NodeSettings::default(),
        )?;
        let manifests = render(&service_defs(services, ENDPOINTS));
        let (mut objects, problems): (Objects, _) = parse(&manifests, "bench");
        anyhow::ensure!(problems.is_empty(), "{problems:?}");

        let mut tracker = ChangeTracker::new("node-a");
        let started = Instant::now();
        tracker.replace_all(&objects);
        let report = syncer.apply_changes(&tracker.flush().changes);
        let cold = started.elapsed();
        anyhow::ensure!(
            report.problems.is_empty() && report.added == services,
            "cold sync failed"
        );

        let mut incremental = Vec::new();
        let mut writes = 0;
        for change in 0..CHANGES {
            let slice = &mut objects.slices[(change * 7919) % services];
            slice.endpoints[0].addresses[0] = changed_address(change);
            let started = Instant::now();
            tracker.set_slice(slice);
            let report = syncer.apply_changes(&tracker.flush().changes);
            incremental.push(started.elapsed());
            writes = report.map_writes;
        }
        let mut file = Vec::new();
        for change in 0..FILE_CHANGES {
            let index = (change * 7919) % services;
            let old = objects.slices[index].endpoints[0].addresses[0].clone();
            let edited = manifests.replacen(
                &format!("[\"{old}\"]"),
                &format!("[\"{}\"]", changed_address(CHANGES + change)),
                1,
            );
            let started = Instant::now();
            let (parsed, _) = parse(&edited, "bench");
            tracker.replace_all(&parsed);
            syncer.apply_changes(&tracker.flush().changes);
            file.push(started.elapsed());
        }
        Ok(ScaleResult {
            services,
            endpoints_per_service: ENDPOINTS,
            cold_program_ms: cold.as_secs_f64() * 1000.0,
            incremental_change_p50_ms: percentile(&mut incremental, 0.5),
            incremental_change_p99_ms: percentile(&mut incremental, 0.99),
            file_change_p50_ms: percentile(&mut file, 0.5),
            file_change_p99_ms: percentile(&mut file, 0.99),
            map_writes_per_change: writes,
        })
    })();
    attach::cleanup(&pin_dir)?;
    result
}

pub fn run(quick: bool) -> Result<Vec<ScaleResult>> {
    let scales: &[usize] = if quick {
        &[100, 1_000]
    } else {
        &[100, 1_000, 10_000]
    };
    let mut results = Vec::new();
    println!(
        "{:>9} {:>13} | one endpoint change, ms p50/p99: {:>15} {:>17} | map writes",
        "services", "cold sync ms", "incremental", "manifests file"
    );
    for &services in scales {
        let r = measure(services).with_context(|| format!("{services} services"))?;
        println!(
            "{:>9} {:>13.1} | {:>49} {:>17} | {}",
            r.services,
            r.cold_program_ms,
            format!(
                "{:.3}/{:.3}",
                r.incremental_change_p50_ms, r.incremental_change_p99_ms
            ),
            format!("{:.1}/{:.1}", r.file_change_p50_ms, r.file_change_p99_ms),
            r.map_writes_per_change
        );
        results.push(r);
    }
    Ok(results)
}
