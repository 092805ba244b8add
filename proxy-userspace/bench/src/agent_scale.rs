//! The agent at scale, as an operator runs it: the real binary in a node namespace
//! with N services (two endpoints each) in its manifests file. Measures the cold
//! start (process start to ready: programs loaded and attached, the file parsed, every
//! service programmed), the agent's memory (resident now and at its peak), one
//! endpoint change through the file (written atomically, as `kubectl`-style tools
//! and ConfigMap mounts do, until the agent's sync of it is logged), and one
//! `/metrics` scrape (bytes and time; three at once for the memory they cost), and
//! `ebpf-proxy conntrack list` of 200,000 flows (to its first line, and to its last).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use testbed::{
    agent::{Agent, AgentOptions},
    manifests::render,
    topology::Topology,
};

use crate::control_plane::{changed_address, percentile, service_defs};

const ENDPOINTS: usize = 2;
const CHANGES: usize = 5;

#[derive(Serialize)]
pub struct AgentScale {
    services: usize,
    manifests_bytes: usize,
    cold_start_ms: f64,
    rss_ready_mib: f64,
    /// Of which the agent's own heap and stacks (the rest: its binary and libraries).
    rss_anonymous_ready_mib: f64,
    rss_peak_mib: f64,
    file_change_p50_ms: f64,
    file_change_max_ms: f64,
    metrics_bytes: usize,
    metrics_scrape_ms: f64,
    rss_peak_after_parallel_scrapes_mib: f64,
    /// `conntrack list` of `CONNTRACK_FLOWS` flows: first line, and all of them.
    conntrack_flows: usize,
    conntrack_list_first_line_ms: f64,
    conntrack_list_all_ms: f64,
}

/// Flows put in conntrack for the listing (the adversary listed 177k).
const CONNTRACK_FLOWS: usize = 200_000;

/// Fills the agent's conntrack with established flows and times `conntrack list`:
/// (first line, every line) in ms.
fn time_conntrack_list(agent: &Agent) -> Result<(f64, f64)> {
    use proxy_common::{Addr, CtEntry, CtKey, Family, CT_ESTABLISHED, PROTO_TCP};
    use std::io::BufRead as _;
    let mut tables = ebpf_proxy::datapath::tables::Tables::open(&agent.pin_dir)?;
    let now = ebpf_proxy::conntrack::coarse_now_ns();
    for flow in 0..CONNTRACK_FLOWS {
        let client = u32::from(std::net::Ipv4Addr::new(10, 244, 0, 0)) + (flow / 60_000) as u32;
        let key = CtKey {
            src: Addr::from_v4_be(client.to_be()),
            dst: Addr::from_v4_octets([10, 96, 0, 1]),
            sport: (1024 + (flow % 60_000) as u16).to_be(),
            dport: 80u16.to_be(),
            proto: PROTO_TCP,
            family: Family::V4.number(),
            _pad: [0; 2],
        };
        let entry = CtEntry {
            nat_dst: Addr::from_v4_octets([10, 128, 0, 0]),
            nat_dport: 8080u16.to_be(),
            service_id: 0,
            state: CT_ESTABLISHED,
            last_seen_ns: now,
            ..CtEntry::default()
        };
        tables.conntrack.insert(key, entry, 0)?;
    }
    let pin_dir = agent.pin_dir.to_str().context("pin dir")?;
    let started = Instant::now();
    let mut child = std::process::Command::new(agent.binary())
        .args(["conntrack", "list", "--pin-dir", pin_dir])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut lines = std::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    lines.next().context("no flow listed")??;
    let first = started.elapsed();
    let count = 1 + lines.count();
    let all = started.elapsed();
    child.wait()?;
    anyhow::ensure!(
        count == CONNTRACK_FLOWS,
        "listed {count} of {CONNTRACK_FLOWS} flows"
    );
    Ok((first.as_secs_f64() * 1000.0, all.as_secs_f64() * 1000.0))
}

/// Resident, peak resident and anonymous resident memory of a process, MiB.
fn memory_mib(pid: u32) -> Result<(f64, f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} in /proc/{pid}/status"))?;
        let kib: f64 = line.split_whitespace().nth(1).context("value")?.parse()?;
        Ok(kib / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?, field("RssAnon:")?))
}

fn synced_lines(agent: &Agent) -> usize {
    agent
        .log()
        .lines()
        .filter(|l| l.contains(" synced "))
        .count()
}

/// Replaces the file the way a careful writer does (a new file renamed over it).
fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let temporary = path.with_extension("new");
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)?;
    Ok(())
}

/// One scrape from inside the node namespace: (bytes, seconds).
fn scrape(topology: &Topology) -> Result<(usize, f64)> {
    let out = topology.node.exec(
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{time_total}",
            "--max-time",
            "60",
            "http://127.0.0.1:10249/metrics",
        ],
    )?;
    let mut fields = out.split_whitespace();
    let bytes = fields.next().context("size")?.parse()?;
    let seconds = fields.next().context("time")?.parse()?;
    Ok((bytes, seconds))
}

fn measure(services: usize, work_dir: &Path) -> Result<AgentScale> {
    let topology = Topology::build("epxscale", 1, 0)?;
    let defs = service_defs(services, ENDPOINTS);
    let manifests = render(&defs);
    let binary = std::env::current_exe()?.with_file_name("ebpf-proxy");
    let max_services = (services * 2).max(1024).next_power_of_two().to_string();
    let started = Instant::now();
    let agent = Agent::start_with(
        &binary,
        &topology,
        work_dir,
        &manifests,
        AgentOptions {
            extra_args: &["--max-services", &max_services],
            ..AgentOptions::default()
        },
    )?;
    let cold_start = started.elapsed();
    let pid = agent.pid().context("agent pid")?;
    let (rss_ready, _, anon_ready) = memory_mib(pid)?;

    let mut changes = Vec::new();
    let mut current = manifests.clone();
    for change in 0..CHANGES {
        let (old, _) = &defs[(change * 7919) % services].backends[0];
        let new = changed_address(change);
        current = current.replacen(&format!("[\"{old}\"]"), &format!("[\"{new}\"]"), 1);
        let before = synced_lines(&agent);
        let started = Instant::now();
        write_atomically(&agent.manifests, &current)?;
        while synced_lines(&agent) == before {
            if started.elapsed() > Duration::from_secs(120) {
                bail!("no sync 120 s after a change:\n{}", agent.log());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        changes.push(started.elapsed());
    }
    let (_, rss_peak, _) = memory_mib(pid)?;
    let (metrics_bytes, metrics_seconds) = scrape(&topology)?;
    std::thread::scope(|scope| {
        let scrapes: Vec<_> = (0..3).map(|_| scope.spawn(|| scrape(&topology))).collect();
        scrapes
            .into_iter()
            .try_for_each(|s| s.join().expect("scrape thread").map(drop))
    })?;
    let (_, rss_peak_after_scrapes, _) = memory_mib(pid)?;
    let (list_first, list_all) = time_conntrack_list(&agent)?;
    Ok(AgentScale {
        services,
        manifests_bytes: manifests.len(),
        cold_start_ms: cold_start.as_secs_f64() * 1000.0,
        rss_ready_mib: rss_ready,
        rss_anonymous_ready_mib: anon_ready,
        rss_peak_mib: rss_peak,
        file_change_p50_ms: percentile(&mut changes.clone(), 0.5),
        file_change_max_ms: percentile(&mut changes, 1.0),
        metrics_bytes,
        metrics_scrape_ms: metrics_seconds * 1000.0,
        rss_peak_after_parallel_scrapes_mib: rss_peak_after_scrapes,
        conntrack_flows: CONNTRACK_FLOWS,
        conntrack_list_first_line_ms: list_first,
        conntrack_list_all_ms: list_all,
    })
}

pub fn run(quick: bool) -> Result<Vec<AgentScale>> {
    let only: Vec<usize> = std::env::var("EPX_SCALES")
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default();
    let scales: &[usize] = if !only.is_empty() {
        &only
    } else if quick {
        &[1_000, 10_000]
    } else {
        &[1_000, 10_000, 50_000, 100_000]
    };
    println!(
        "{:>8} {:>9} {:>10} {:>9} {:>9} {:>16} {:>10} {:>10} {:>12} {:>18}",
        "services",
        "file MB",
        "cold ms",
        "RSS MiB",
        "peak MiB",
        "change ms p50/max",
        "/metrics kB",
        "scrape ms",
        "3 scrapes peak",
        "ct list 1st/all ms"
    );
    let mut results = Vec::new();
    for &services in scales {
        let work_dir = PathBuf::from(format!("/tmp/epxscale-{}-{services}", std::process::id()));
        let result = measure(services, &work_dir);
        let _ = std::fs::remove_dir_all(&work_dir);
        let r = result.with_context(|| format!("{services} services"))?;
        println!(
            "{:>8} {:>9.1} {:>10.0} {:>9.1} {:>9.1} {:>16} {:>10.0} {:>10.0} {:>12.1} {:>18}",
            r.services,
            r.manifests_bytes as f64 / 1e6,
            r.cold_start_ms,
            r.rss_ready_mib,
            r.rss_peak_mib,
            format!("{:.0}/{:.0}", r.file_change_p50_ms, r.file_change_max_ms),
            r.metrics_bytes as f64 / 1e3,
            r.metrics_scrape_ms,
            r.rss_peak_after_parallel_scrapes_mib,
            format!(
                "{:.0}/{:.0}",
                r.conntrack_list_first_line_ms, r.conntrack_list_all_ms
            ),
        );
        results.push(r);
    }
    Ok(results)
}
