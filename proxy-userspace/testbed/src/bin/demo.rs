//! `cargo xtask demo`: a node with pods, a second node, an external client, all in
//! network namespaces; the real agent programs a ClusterIP, a UDP ClusterIP and a
//! NodePort service from a manifests file; real curl and socat traffic shows how the
//! requests spread. Everything is torn down at the end, also on failure.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use anyhow::{Context as _, Result};
use ebpf_proxy::listing;
use testbed::{
    agent::Agent,
    manifests::{render, ServiceDef},
    netns::Netns,
    servers::parse_greeting,
    topology::{Topology, CLIENT_IP, NODE_IP},
};

const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const NODE_PORT: u16 = 30080;
const REQUESTS: usize = 12;

/// Backend pod -> (answers, client addresses it saw).
type Spread = BTreeMap<String, (usize, Vec<String>)>;

fn main() -> Result<()> {
    let agent_binary = std::env::current_exe()?.with_file_name("ebpf-proxy");
    println!("== building the topology: client, node-a (3 pods + 1 client pod), node-b (1 pod)");
    let topology = Topology::build("epxdemo", 4, 1)?;
    let backends = ["pod-a1", "pod-a2", "pod-a3"];
    let web = ServiceDef::new("web", WEB_VIP, "TCP", 80, 8080)
        .with_pods(backends.iter().map(|p| topology.pod(p)));
    let dns = ServiceDef::new("dns", DNS_VIP, "UDP", 53, 5353)
        .with_pods(backends.iter().map(|p| topology.pod(p)));
    let mut public = ServiceDef::new("public", Ipv4Addr::new(10, 96, 0, 80), "TCP", 80, 8080)
        .with_pods(
            ["pod-a1", "pod-a2", "pod-b1"]
                .iter()
                .map(|p| topology.pod(p)),
        );
    public.node_port = Some(NODE_PORT);
    let manifests = render(&[web, dns, public]);

    println!("== starting ebpf-proxy on node-a (XDP on its uplinks, tc on pod interfaces)");
    let agent = Agent::start(
        &agent_binary,
        &topology,
        &PathBuf::from("/tmp/epxdemo"),
        &manifests,
    )?;

    let client_pod = &topology.pod("pod-a4").ns;
    let tcp = spread(REQUESTS, || curl(client_pod, &format!("http://{WEB_VIP}/")))?;
    print_spread(
        &format!("pod-a4 -> ClusterIP {WEB_VIP}:80 (TCP, curl)"),
        &tcp,
    );
    let udp = spread(REQUESTS, || {
        client_pod.exec(
            "sh",
            &["-c", &format!("echo q | socat -T 3 - UDP4:{DNS_VIP}:53")],
        )
    })?;
    print_spread(
        &format!("pod-a4 -> ClusterIP {DNS_VIP}:53 (UDP, socat)"),
        &udp,
    );
    let external = spread(REQUESTS, || {
        curl(&topology.client, &format!("http://{NODE_IP}:{NODE_PORT}/"))
    })?;
    print_spread(
        &format!("external client {CLIENT_IP} -> NodePort {NODE_IP}:{NODE_PORT} (pod-b1 is on node-b: masqueraded)"),
        &external,
    );

    println!("\n== ebpf-proxy list");
    print!("{}", listing::render(&agent.listing()?, false));
    println!("\n== ebpf-proxy status");
    let (all_well, status) = agent.status(&[])?;
    print!("{status}");
    anyhow::ensure!(all_well, "ebpf-proxy status lists problems");
    drop(agent);
    drop(topology);
    println!("\n== torn down: namespaces deleted, programs detached, pins removed");
    Ok(())
}

fn curl(ns: &Netns, url: &str) -> Result<String> {
    ns.exec("curl", &["-sS", "--max-time", "5", url])
}

fn spread(requests: usize, mut ask: impl FnMut() -> Result<String>) -> Result<Spread> {
    let mut spread = Spread::new();
    for _ in 0..requests {
        let answer = ask()?;
        let (pod, client) =
            parse_greeting(&answer).with_context(|| format!("unexpected answer {answer:?}"))?;
        let entry = spread.entry(pod).or_default();
        entry.0 += 1;
        let client = client.ip().to_string();
        if !entry.1.contains(&client) {
            entry.1.push(client);
        }
    }
    Ok(spread)
}

fn print_spread(title: &str, spread: &Spread) {
    println!("\n== {title}");
    println!(
        "   {:<10} {:>8}   client address seen by the backend",
        "backend", "requests"
    );
    for (pod, (count, clients)) in spread {
        println!("   {pod:<10} {count:>8}   {}", clients.join(", "));
    }
}
