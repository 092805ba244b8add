//! Switching a node from kube-proxy to the agent without a maintenance window
//! (`--adopt-kube-proxy-flows`): connections opened through kube-proxy's rules, of
//! both families, from a pod and from outside (masqueraded by the iptables and
//! nftables layouts), TCP and UDP, go on after the agent starts and kube-proxy's rules
//! are flushed, on the same backend, with netfilter holding no translation of them
//! any more; and without adoption the same switch breaks some, so that the test can
//! fail. IPVS mode runs in the QEMU guest (this kernel has no IPVS), over IPv4.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use ebpf_proxy::{
    adoption::netfilter::Conntrack,
    model::{Family, Listen},
};
use testbed::{
    agent::{Agent, AgentOptions},
    kube_proxy_rules::{self, Service},
    manifests::{render, ServiceDef},
    netns::Netns,
    servers::{parse_greeting, HttpConnection, HTTP_PORT, UDP_PORT},
    topology::{in_family, Topology, CLIENT_IP, NODE_IP},
};

use crate::support::{
    cluster::{curl, pod_of},
    in_guest,
    services::*,
    traffic::inside,
};

const BACKENDS: [&str; 2] = ["pod-a1", "pod-a2"];
/// A service whose NodePort keeps its outside clients' addresses
/// (`externalTrafficPolicy: Local`).
const LOCAL_WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const LOCAL_NODE_PORT: u16 = 30081;
/// The pod the in-cluster flows come from.
const CLIENT_POD: &str = "pod-a3";

/// One long-lived flow and the backend kube-proxy gave it.
struct Flow {
    what: String,
    conversation: Conversation,
    backend: String,
}

enum Conversation {
    Tcp(HttpConnection),
    /// A UDP socket connected to the service: every datagram from the same port.
    Udp(UdpSocket),
}

impl Conversation {
    /// One exchange: the pod that answered.
    fn ask(&mut self) -> Result<String, String> {
        match self {
            Conversation::Tcp(connection) => connection
                .get()
                .map(|body| pod_of(&body))
                .map_err(|e| format!("{e:#}")),
            Conversation::Udp(socket) => {
                socket.send(b"question").map_err(|e| e.to_string())?;
                let mut answer = [0u8; 512];
                let n = socket.recv(&mut answer).map_err(|e| e.to_string())?;
                let text = String::from_utf8_lossy(&answer[..n]);
                parse_greeting(&text)
                    .map(|(pod, _)| pod)
                    .ok_or_else(|| format!("not a greeting: {text}"))
            }
        }
    }
}

fn udp_conversation(ns: &Netns, service: SocketAddr) -> Conversation {
    let socket = inside(ns, move || -> std::io::Result<UdpSocket> {
        let any = SocketAddr::new(Family::of(&service.ip()).unspecified(), 0);
        let socket = UdpSocket::bind(any)?;
        socket.connect(service)?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(socket)
    })
    .expect("UDP socket");
    Conversation::Udp(socket)
}

/// A node still served by kube-proxy's `mode`, with long-lived flows through it.
struct KubeProxyNode {
    topology: Topology,
    mode: String,
    families: Vec<Family>,
    /// The flows the data path adopts.
    flows: Vec<Flow>,
    /// Flows from the node's own sockets, one per family: left to netfilter, whose
    /// translation of them ends with kube-proxy's rules (as it does without us).
    node_own: Vec<Flow>,
    work_dir: PathBuf,
}

impl KubeProxyNode {
    fn new(test: &str, mode: &str, families: &[Family]) -> KubeProxyNode {
        let prefix = format!("epx{}{test}", std::process::id() % 100_000);
        let topology = Topology::build(&prefix, 3, 0).expect("topology");
        let endpoints = |port| {
            BACKENDS
                .iter()
                .map(|pod| (topology.pod(pod).addr, port))
                .collect::<Vec<_>>()
        };
        let services = [
            Service {
                ip: WEB_VIP,
                port: 80,
                proto: "tcp",
                endpoints: endpoints(HTTP_PORT),
                node_port: Some(NODE_PORT),
                external_local: false,
            },
            Service {
                ip: LOCAL_WEB_VIP,
                port: 80,
                proto: "tcp",
                endpoints: endpoints(HTTP_PORT),
                node_port: Some(LOCAL_NODE_PORT),
                external_local: true,
            },
            Service {
                ip: DNS_VIP,
                port: 53,
                proto: "udp",
                endpoints: endpoints(UDP_PORT),
                node_port: None,
                external_local: false,
            },
        ];
        for &family in families {
            kube_proxy_rules::load_mode(&topology.node, mode, &services, family)
                .expect("kube-proxy's rules");
            // A node has a default route, which its own connections to a ClusterIP
            // take before kube-proxy's OUTPUT rules translate them.
            let gateway = in_family(CLIENT_IP, family);
            topology
                .node
                .ip(&format!("route add default via {gateway}"))
                .expect("default route");
        }
        let (mut flows, mut node_own) = (Vec::new(), Vec::new());
        let pod = &topology.pod(CLIENT_POD).ns;
        for &family in families {
            let web = SocketAddr::new(in_family(WEB_VIP, family), 80);
            let node_port = SocketAddr::new(in_family(NODE_IP, family), NODE_PORT);
            let local_node_port = SocketAddr::new(in_family(NODE_IP, family), LOCAL_NODE_PORT);
            let dns = SocketAddr::new(in_family(DNS_VIP, family), 53);
            // Outside clients are masqueraded (kube-proxy marks what is not from a
            // pod), to a port of netfilter's choosing (`--random-fully`).
            let conversations = [
                ("TCP from the node itself", &topology.node, web),
                ("TCP from a pod", pod, web),
                ("TCP from a pod, second", pod, web),
                ("TCP from outside", &topology.client, web),
                (
                    "TCP to the NodePort from outside",
                    &topology.client,
                    node_port,
                ),
                (
                    "TCP to the Local NodePort from outside (not masqueraded)",
                    &topology.client,
                    local_node_port,
                ),
                ("UDP from a pod", pod, dns),
                ("UDP from outside", &topology.client, dns),
            ];
            // kube-proxy's IPVS layout here has no NodePorts.
            let conversations = conversations.into_iter().filter(|(_, _, service)| {
                mode != "ipvs" || ![node_port, local_node_port].contains(service)
            });
            for (what, ns, service) in conversations {
                let mut conversation = match service == dns {
                    false => Conversation::Tcp(HttpConnection::open(ns, service).expect("connect")),
                    true => udp_conversation(ns, dns),
                };
                let what = format!("{family} {what}");
                // Two exchanges: a UDP flow answered more than once is a stream to
                // netfilter (120 s, not 30), which outlasts the agent's start in the
                // emulated guest.
                let backend = conversation
                    .ask()
                    .and_then(|_| conversation.ask())
                    .unwrap_or_else(|e| panic!("{what} through kube-proxy's rules: {e}"));
                let flow = Flow {
                    what,
                    conversation,
                    backend,
                };
                match ns.name == topology.node.name {
                    true => node_own.push(flow),
                    false => flows.push(flow),
                }
            }
        }
        let work_dir = PathBuf::from(format!("/tmp/{prefix}"));
        KubeProxyNode {
            topology,
            mode: mode.to_owned(),
            families: families.to_vec(),
            flows,
            node_own,
            work_dir,
        }
    }

    /// Starts the agent (ready: its programs attached, the services programmed) with
    /// `args`, kube-proxy's rules still in place.
    fn start_agent(&self, args: &[&str]) -> Agent {
        let mut web = web(&self.topology, &BACKENDS)
            .dual_stack()
            .annotated("ebpf-proxy.io/scheduler", "lc");
        web.node_port = Some(NODE_PORT);
        let mut local_web = ServiceDef::new("web-local", LOCAL_WEB_VIP, "TCP", 80, HTTP_PORT)
            .with_pods(BACKENDS.iter().map(|p| self.topology.pod(p)))
            .dual_stack()
            .with_spec("externalTrafficPolicy: Local");
        local_web.node_port = Some(LOCAL_NODE_PORT);
        let services = [web, local_web, dns(&self.topology, &BACKENDS).dual_stack()];
        Agent::start_with(
            env!("CARGO_BIN_EXE_ebpf-proxy").as_ref(),
            &self.topology,
            &self.work_dir,
            &render(&services),
            AgentOptions {
                extra_args: args,
                ..Default::default()
            },
        )
        .expect("agent")
    }

    /// The pod at `addr` (of either family).
    fn pod_at(&self, addr: IpAddr) -> String {
        let pod = self
            .topology
            .pods
            .iter()
            .find(|p| Family::ALL.iter().any(|&f| in_family(p.addr, f) == addr))
            .expect("a pod's address");
        pod.name.clone()
    }

    /// kube-proxy goes: its rules flushed.
    fn remove_kube_proxy(&self) {
        for &family in &self.families {
            kube_proxy_rules::remove_mode(&self.topology.node, &self.mode, family).expect("flush");
        }
    }

    /// The flows the data path adopts, asked `rounds` times: their failures.
    fn failures(&mut self, rounds: usize) -> Vec<String> {
        failures_of(&mut self.flows, rounds)
    }
}

/// Packets the data path rewrote so far (its `translated` event).
fn translated_packets(agent: &Agent) -> u64 {
    agent.listing().expect("list").event("translated")
}

/// Each of `flows` asked `rounds` times: the failures (an error, or another backend).
fn failures_of(flows: &mut [Flow], rounds: usize) -> Vec<String> {
    let mut failures = Vec::new();
    for flow in flows {
        for _ in 0..rounds {
            match flow.conversation.ask() {
                Ok(pod) if pod == flow.backend => {}
                Ok(pod) => failures.push(format!(
                    "{}: answered by {pod}, not {}",
                    flow.what, flow.backend
                )),
                Err(e) => failures.push(format!("{}: {e}", flow.what)),
            }
        }
    }
    failures
}

fn switches_without_dropping_a_flow(test: &str, mode: &str, families: &[Family]) {
    let mut node = KubeProxyNode::new(test, mode, families);
    let agent = node.start_agent(&["--adopt-kube-proxy-flows"]);
    // Every adopted flow (established TCP, UDP) counts as an active connection of its
    // backend, as the data path's own would: least-connection goes on from the truth.
    let active: u64 = agent
        .listing()
        .expect("list")
        .services
        .iter()
        .flat_map(|s| &s.backends)
        .map(|b| b.active)
        .sum();
    assert_eq!(
        active,
        node.flows.len() as u64,
        "{mode}: active connections"
    );
    let mut before = node.failures(1);
    // The node's own flows go on while kube-proxy's rules are there. Not under IPVS:
    // their source is the service address itself (on `kube-ipvs0`), and the data path
    // refuses what is sent to a service address on a port no service has, as their
    // backends' answers are (README).
    if mode != "ipvs" {
        before.extend(failures_of(&mut node.node_own, 1));
    }
    assert!(
        before.is_empty(),
        "{mode}: with the agent beside kube-proxy's rules: {before:#?}"
    );
    node.remove_kube_proxy();
    // Netfilter no longer translates any of them (at most the node's own, from one of
    // its addresses): what does is the data path.
    let (translated, foreign) = inside(&node.topology.node, || {
        let translated = Conntrack::open()
            .and_then(|mut c| c.translated_flows())
            .expect("nf_conntrack");
        let foreign: Vec<_> = translated
            .iter()
            .filter(|flow| UdpSocket::bind((flow.original.0.ip(), 0)).is_err())
            .copied()
            .collect();
        (translated, foreign)
    });
    assert!(
        foreign.is_empty() && translated.len() <= node.node_own.len(),
        "{mode}: netfilter still translates {translated:#?}"
    );
    let translated_before = translated_packets(&agent);
    let after = node.failures(3);
    // Each exchange is a request and an answer the data path rewrote (at least: a
    // TCP segment more or less per exchange is the kernel's business).
    let rewritten = translated_packets(&agent) - translated_before;
    assert!(
        rewritten >= 2 * 3 * node.flows.len() as u64,
        "{mode}: the data path rewrote only {rewritten} packets of {} exchanges",
        3 * node.flows.len()
    );
    assert!(after.is_empty(), "{mode}: after the switch: {after:#?}");
    let metrics = curl(&node.topology.node, "http://127.0.0.1:10249/metrics").expect("metrics");
    let adopted = format!(
        "ebpf_proxy_kube_proxy_flows_adopted_total {}",
        node.flows.len()
    );
    assert!(
        metrics.lines().any(|l| l == adopted),
        "{mode}: expected `{adopted}` in:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("adopted"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let (_, status) = agent.status(&[]).expect("status");
    assert!(
        status.contains(&format!(
            "Adopted:        {} kube-proxy flows at start; left to netfilter: {} node_local",
            node.flows.len(),
            node.node_own.len()
        )),
        "{status}"
    );
    // New connections are the data path's own, and least-connection (the web
    // service's scheduler) goes on from the adopted flows: a new one goes to a
    // backend with the fewest.
    let listing = agent.listing().expect("list");
    let web_row = listing
        .services
        .iter()
        .find(|s| s.frontend.listen == Listen::Address(WEB_VIP.into()))
        .expect("the web ClusterIP");
    let fewest = web_row.backends.iter().map(|b| b.active).min();
    let least_loaded: Vec<String> = web_row
        .backends
        .iter()
        .filter(|b| Some(b.active) == fewest)
        .map(|b| node.pod_at(b.endpoint.addr))
        .collect();
    let body = curl(&node.topology.client, &format!("http://{WEB_VIP}/")).expect("new");
    assert!(
        least_loaded.contains(&pod_of(&body)),
        "{mode}: lc sent a new connection to {} with {:?} active",
        pod_of(&body),
        web_row
            .backends
            .iter()
            .map(|b| (b.endpoint.addr, b.active))
            .collect::<Vec<_>>()
    );
    drop(agent);
}

#[test]
fn from_iptables_legacy_every_flow_goes_on_through_the_data_path() {
    switches_without_dropping_a_flow("migl", "iptables-legacy", &Family::ALL);
}

#[test]
fn from_iptables_nft_every_flow_goes_on_through_the_data_path() {
    switches_without_dropping_a_flow("mign", "iptables-nft", &Family::ALL);
}

#[test]
fn from_nftables_every_flow_goes_on_through_the_data_path() {
    switches_without_dropping_a_flow("migt", "nftables", &Family::ALL);
}

const IPVS_TEST: &str = "migration::from_ipvs_in_guest";

/// In the QEMU guest, whose stock kernel has IPVS: `from_ipvs_in_guest`.
#[test]
fn from_ipvs_every_flow_goes_on_through_the_data_path() {
    in_guest::run_ignored_test("ipvs-migration", IPVS_TEST);
}

#[test]
#[ignore = "run inside the QEMU guest by `from_ipvs_every_flow_goes_on_through_the_data_path`: needs a kernel with IPVS"]
fn from_ipvs_in_guest() {
    switches_without_dropping_a_flow("migv", "ipvs", &[Family::V4]);
}

/// A restart in the middle of a switch: a predecessor without the flag programmed the
/// services (and was killed before any of kube-proxy's flows sent a packet); the
/// agent started with the flag finds them pinned, not new, and adopts for them.
#[test]
fn a_restart_with_the_flag_adopts_for_services_already_programmed() {
    let mut node = KubeProxyNode::new("migr", "nftables", &[Family::V4]);
    let mut agent = node.start_agent(&[]);
    agent
        .restart_with_args(&["--adopt-kube-proxy-flows"])
        .expect("restart");
    node.remove_kube_proxy();
    let after = node.failures(2);
    assert!(after.is_empty(), "after the switch: {after:#?}");
    drop(agent);
}

/// The control: the same switch without adoption. The data path meets flows it has
/// never seen; the masqueraded ones at least are sent on from a port their backend
/// does not know.
#[test]
fn without_adoption_the_same_switch_breaks_flows() {
    let mut node = KubeProxyNode::new("migx", "iptables-legacy", &Family::ALL);
    let agent = node.start_agent(&[]);
    node.remove_kube_proxy();
    let broken = node.failures(1);
    assert!(
        broken.iter().any(|f| f.contains("TCP from outside")),
        "the switch without adoption broke only {broken:#?}"
    );
    drop(agent);
}
