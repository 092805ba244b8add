//! End to end through the kernel, on this machine's kernel: one topology (a client
//! pod, three backend pods, a node), the same services programmed into each contender
//! in turn: ebpf-proxy, and kube-proxy's iptables layout (through iptables-legacy and
//! iptables-nft) and nftables layout. A client of our own, in the client pod, measures
//! new TCP connections per second (connect, request, response, close: TCP_CRR-like),
//! requests per second on one kept-alive connection, and UDP request/response pairs
//! per second with a new socket (a new flow, as DNS clients do) for each, to the
//! last-programmed services (the worst placed for iptables' linear chain). Every
//! request must succeed. CPU time per new connection is the whole machine's (from
//! /proc/stat: client, servers and proxy alike), so only its differences between
//! contenders are the proxies' own.
//!
//! For ebpf-proxy, one more round of new connections runs with the kernel's BPF
//! statistics on, and the agent's `/metrics` says what each data path program cost
//! per run under that traffic (in situ, beside the benchmark's test-run figures).
//!
//! Each family is measured on its own, over the same topology: IPv6 with the
//! services' twin addresses, kube-proxy's ip6tables and `ip6` nftables layouts, and
//! ebpf-proxy holding the services dual-stack (both families' frontends, as on a
//! dual-stack cluster; the contenders hold only the measured family's rules).
//!
//! IPVS is not here: this kernel has none (it needs the QEMU guest harness).
//! Contenders run one after the other, not interleaved, so slow drift of the machine
//! shows as a difference; the ranges over rounds say how noisy each figure is.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use ebpf_proxy::model::Family;
use serde::Serialize;
use testbed::{
    agent::Agent,
    manifests::{render, ServiceDef},
    netns::enter_current_thread,
    servers::{HttpConnection, HTTP_PORT, UDP_PORT},
    topology::{in_family, Topology},
};

use testbed::kube_proxy_rules::{self, Service};

#[derive(Serialize, serde::Deserialize)]
pub struct E2eResult {
    pub services: usize,
    /// The family of the measured flows (results from before families: IPv4).
    #[serde(default)]
    pub family: Family,
    pub contender: String,
    /// Time from an empty node to the services answering (rules loaded, or the agent
    /// started, programmed and attached).
    pub program_ms: f64,
    pub new_connections_per_s: Vec<f64>,
    pub keepalive_requests_per_s: Vec<f64>,
    pub udp_requests_per_s: Vec<f64>,
    /// Machine CPU time (all cores) per new connection, in microseconds.
    pub cpu_us_per_connection: Vec<f64>,
    /// ebpf-proxy: what each data path program that ran cost over one more round of
    /// new connections, as the kernel counted it.
    #[serde(default)]
    pub programs_in_situ: BTreeMap<String, ProgramCost>,
}

/// Runs of a program over a round, and its mean run time.
#[derive(Clone, Copy, Serialize, serde::Deserialize)]
pub struct ProgramCost {
    pub runs: f64,
    pub ns_per_run: f64,
}

/// The contenders on this machine's kernel (it has no IPVS).
const HOST_CONTENDERS: [&str; 4] = ["ebpf-proxy", "iptables-legacy", "iptables-nft", "nftables"];
/// The contenders in the QEMU guest (`guest`), whose stock kernel has IPVS.
pub const GUEST_CONTENDERS: [&str; 5] = [
    "ebpf-proxy",
    "ipvs",
    "iptables-legacy",
    "iptables-nft",
    "nftables",
];
const ENDPOINTS: usize = 10;

/// `count` services: the last two are measured (TCP and UDP, on the three backend
/// pods), the others have 10 endpoints each that are never reached.
fn services(count: usize, topology: &Topology) -> Vec<Service> {
    let pods: Vec<Ipv4Addr> = ["pod-a1", "pod-a2", "pod-a3"]
        .iter()
        .map(|p| topology.pod(p).addr)
        .collect();
    (0..count.max(2))
        .map(|i| {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 10 + i as u32);
            let (proto, port, endpoints) = if i + 1 == count.max(2) {
                ("udp", 53, pods.iter().map(|a| (*a, UDP_PORT)).collect())
            } else if i + 2 == count.max(2) {
                ("tcp", 80, pods.iter().map(|a| (*a, HTTP_PORT)).collect())
            } else {
                let endpoints = (0..ENDPOINTS)
                    .map(|e| {
                        let addr =
                            u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i * ENDPOINTS + e) as u32;
                        (Ipv4Addr::from(addr), HTTP_PORT)
                    })
                    .collect();
                ("tcp", 80, endpoints)
            };
            Service {
                ip,
                port,
                proto,
                endpoints,
                node_port: None,
                external_local: false,
            }
        })
        .collect()
}

/// The agent's manifests: the services, dual-stack when IPv6 is measured.
fn manifests(services: &[Service], family: Family) -> String {
    let defs: Vec<ServiceDef> = services
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let protocol = if s.proto == "udp" { "UDP" } else { "TCP" };
            let target = s.endpoints.first().map_or(HTTP_PORT, |e| e.1);
            let mut def = ServiceDef::new(&format!("svc{i}"), s.ip, protocol, s.port, target);
            def.backends = s
                .endpoints
                .iter()
                .map(|(a, _)| (*a, "node-a".to_owned()))
                .collect();
            def.dual_stack = family == Family::V6;
            def
        })
        .collect();
    render(&defs)
}

/// Exchanges per second from inside `ns` for `duration`: `exchange` runs again and
/// again on a client thread in the namespace, and any failure fails the run.
fn rate_in(
    ns: &Path,
    duration: Duration,
    mut exchange: impl FnMut() -> Result<()> + Send + 'static,
) -> Result<f64> {
    let ns = ns.to_owned();
    std::thread::spawn(move || -> Result<f64> {
        enter_current_thread(&ns)?;
        let started = Instant::now();
        let mut count = 0u64;
        while started.elapsed() < duration {
            exchange()?;
            count += 1;
        }
        Ok(count as f64 / started.elapsed().as_secs_f64())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))?
}

/// New connections per second: connect, request, response, close.
fn connection_rate(ns: &Path, target: SocketAddr, duration: Duration) -> Result<f64> {
    rate_in(ns, duration, move || {
        let mut stream =
            TcpStream::connect_timeout(&target, Duration::from_secs(2)).context("connect")?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        if !response.contains("pod=") {
            bail!("unexpected response {response:?}");
        }
        Ok(())
    })
}

/// Busy CPU time of the whole machine so far, in seconds (/proc/stat's first line:
/// everything but idle and iowait).
fn busy_cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .context("empty /proc/stat")?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let busy: u64 = fields
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(busy as f64 / ticks)
}

/// UDP request/response pairs per second, each from a new socket (a new flow).
fn udp_rate(ns: &Path, target: SocketAddr, duration: Duration) -> Result<f64> {
    rate_in(ns, duration, move || {
        let unspecified: IpAddr = match target {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let socket = UdpSocket::bind((unspecified, 0))?;
        socket.connect(target)?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        socket.send(b"question")?;
        let mut answer = [0u8; 256];
        let len = socket.recv(&mut answer).context("no UDP answer")?;
        if !answer[..len].starts_with(b"pod=") {
            bail!("unexpected UDP answer");
        }
        Ok(())
    })
}

/// Requests per second on one kept-alive connection.
fn keepalive_rate(topology: &Topology, target: SocketAddr, duration: Duration) -> Result<f64> {
    let mut connection = HttpConnection::open(&topology.pod("pod-a4").ns, target)?;
    let started = Instant::now();
    let mut count = 0u64;
    while started.elapsed() < duration {
        connection.get()?;
        count += 1;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Each data path program's (runs, seconds), as the agent's `/metrics` says them.
fn program_runs(topology: &Topology) -> Result<BTreeMap<String, (f64, f64)>> {
    let exposition = topology.node.exec(
        "curl",
        &["-sS", "--max-time", "10", "http://127.0.0.1:10249/metrics"],
    )?;
    let mut runs: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for line in exposition.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some((name, program)) = series
            .strip_suffix("\"}")
            .and_then(|s| s.split_once("{program=\""))
        else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let entry = runs.entry(program.to_owned()).or_default();
        match name {
            "ebpf_proxy_program_runs_total" => entry.0 = value,
            "ebpf_proxy_program_run_seconds_total" => entry.1 = value,
            _ => {}
        }
    }
    Ok(runs)
}

/// Runs and nanoseconds per run of each program that ran over one round of new
/// connections, with the kernel's statistics on for that round only: they cost two
/// clock reads per run, which the measured rounds do not pay. The agent samples its
/// programs' counts every second, hence the waits.
fn programs_in_situ(
    topology: &Topology,
    client: &Path,
    target: SocketAddr,
    duration: Duration,
) -> Result<BTreeMap<String, ProgramCost>> {
    let sampled = Duration::from_millis(1_500);
    let counting = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    std::thread::sleep(sampled);
    let before = program_runs(topology)?;
    connection_rate(client, target, duration)?;
    std::thread::sleep(sampled);
    let after = program_runs(topology)?;
    drop(counting);
    Ok(after
        .into_iter()
        .filter_map(|(program, (runs, seconds))| {
            let (runs_before, seconds_before) = before.get(&program).copied().unwrap_or_default();
            let ran = runs - runs_before;
            let cost = ProgramCost {
                runs: ran,
                ns_per_run: (seconds - seconds_before) * 1e9 / ran,
            };
            (ran > 0.0).then_some((program, cost))
        })
        .collect())
}

/// Programs one contender for `family`'s flows; returns what keeps it alive (the
/// agent) and the time taken.
fn program(
    contender: &str,
    family: Family,
    topology: &Topology,
    services: &[Service],
    work_dir: &Path,
) -> Result<(Option<Agent>, f64)> {
    let started = Instant::now();
    let agent = match contender {
        "ebpf-proxy" => {
            let binary = std::env::current_exe()?.with_file_name("ebpf-proxy");
            Some(Agent::start(
                &binary,
                topology,
                work_dir,
                &manifests(services, family),
            )?)
        }
        mode => {
            kube_proxy_rules::load_mode(&topology.node, mode, services, family)?;
            None
        }
    };
    Ok((agent, started.elapsed().as_secs_f64() * 1000.0))
}

/// Both families, IPv4 first, on this machine's kernel.
pub fn run(quick: bool) -> Result<Vec<E2eResult>> {
    let (scales, duration, rounds): (&[usize], Duration, usize) = if quick {
        (&[1, 1_000], Duration::from_secs(1), 2)
    } else {
        (&[1, 10_000], Duration::from_secs(3), 3)
    };
    let mut results = Vec::new();
    for family in Family::ALL {
        results.extend(run_contenders(
            &HOST_CONTENDERS,
            family,
            scales,
            duration,
            rounds,
            &mut |_| {},
        )?);
    }
    Ok(results)
}

/// Measures `contenders` over `family` at each scale; `report` sees each result as it
/// comes (the guest prints them on its console).
pub fn run_contenders(
    contenders: &[&str],
    family: Family,
    scales: &[usize],
    duration: Duration,
    rounds: usize,
    report: &mut dyn FnMut(&E2eResult),
) -> Result<Vec<E2eResult>> {
    let mut results = Vec::new();
    println!(
        "\n{family}\n{:>8}  {:<16} {:>12}  {:>26}  {:>26}  {:>26}  {:>8}",
        "services",
        "contender",
        "program ms",
        "new connections/s",
        "keep-alive requests/s",
        "UDP requests/s (new flow)",
        "CPU µs/conn"
    );
    for &count in scales {
        let topology = Topology::build(&format!("epxbench{}", std::process::id() % 100_000), 4, 0)?;
        let services = services(count, &topology);
        let [.., tcp_service, udp_service] = services.as_slice() else {
            bail!("fewer than two services");
        };
        let target = SocketAddr::new(in_family(tcp_service.ip, family), tcp_service.port);
        let udp_target = SocketAddr::new(in_family(udp_service.ip, family), udp_service.port);
        let client = topology.pod("pod-a4").ns.path();
        for &contender in contenders {
            let work_dir = PathBuf::from(format!("/tmp/epxbench-agent-{}", std::process::id()));
            let (agent, program_ms) = program(contender, family, &topology, &services, &work_dir)?;
            let mut new_connections = Vec::new();
            let mut keepalive = Vec::new();
            let mut udp = Vec::new();
            let mut cpu = Vec::new();
            for _ in 0..rounds {
                let busy = busy_cpu_seconds()?;
                let rate = connection_rate(&client, target, duration)
                    .with_context(|| format!("{contender}: new connections"))?;
                let connections = rate * duration.as_secs_f64();
                cpu.push((busy_cpu_seconds()? - busy) / connections * 1e6);
                new_connections.push(rate);
                udp.push(
                    udp_rate(&client, udp_target, duration)
                        .with_context(|| format!("{contender}: UDP"))?,
                );
                keepalive.push(
                    keepalive_rate(&topology, target, duration)
                        .with_context(|| format!("{contender}: keep-alive"))?,
                );
            }
            let programs_in_situ = if agent.is_some() {
                programs_in_situ(&topology, &client, target, duration).unwrap_or_else(|e| {
                    eprintln!("{contender}: no in-situ program figures: {e:#}");
                    BTreeMap::new()
                })
            } else {
                BTreeMap::new()
            };
            drop(agent);
            // Also after ebpf-proxy: the flush checks that no DNAT rule is left.
            kube_proxy_rules::remove_mode(&topology.node, contender, family)?;
            let median = |v: &[f64]| {
                let mut v = v.to_vec();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let range = |v: &[f64]| {
                format!(
                    "{:>9.0} ({:>6.0}..{:>6.0})",
                    median(v),
                    v.iter().copied().fold(f64::MAX, f64::min),
                    v.iter().copied().fold(0.0, f64::max)
                )
            };
            println!(
                "{:>8}  {:<16} {:>12.0}  {}  {}  {}  {:>8.1}",
                count,
                contender,
                program_ms,
                range(&new_connections),
                range(&keepalive),
                range(&udp),
                median(&cpu),
            );
            if !programs_in_situ.is_empty() {
                let each: Vec<String> = programs_in_situ
                    .iter()
                    .map(|(program, cost)| {
                        format!("{program} {:.0} ns x {:.0}", cost.ns_per_run, cost.runs)
                    })
                    .collect();
                println!("{:>8}  in situ, per run: {}", "", each.join(", "));
            }
            let result = E2eResult {
                services: count,
                family,
                contender: contender.to_owned(),
                program_ms,
                new_connections_per_s: new_connections,
                keepalive_requests_per_s: keepalive,
                udp_requests_per_s: udp,
                cpu_us_per_connection: cpu,
                programs_in_situ,
            };
            report(&result);
            results.push(result);
        }
    }
    Ok(results)
}
