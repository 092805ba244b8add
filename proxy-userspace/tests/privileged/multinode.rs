//! Two nodes behind a router, both running the real agent, a LoadBalancer service
//! whose only endpoint is on the second node, and an external client: `snat` sends
//! every reply back through the entry node, `dsr-ipip` encapsulates requests to the
//! endpoint's node and its replies go straight to the client. Packet captures
//! (tcpdump) on both nodes show which packets cross which node.

use std::{
    net::{Ipv4Addr, UdpSocket},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, Stdio},
    time::Duration,
};

use testbed::{
    agent::{Agent, AgentOptions, NodeSpec},
    manifests::{render, ServiceDef},
    netns::{command_in, enter_current_thread, Netns},
    servers::{blob, parse_greeting},
    topology::{Topology, CLIENT_IP, NODE2_NAME, NODE_NAME, ROUTED_NODE2_IP, ROUTED_NODE_IP},
};

const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const DNS_LB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);

/// The agents (dropped first) and the topology.
struct TwoNodes {
    agents: Vec<Agent>,
    topology: Topology,
    prefix: String,
}

fn two_nodes(test: &str, forwarding: &str) -> TwoNodes {
    let prefix = format!("epx{}{test}", std::process::id() % 100_000);
    let topology = Topology::build_routed(&prefix, 1, 1).expect("topology");
    let remote = topology.pod("pod-b1");
    let mut web = ServiceDef::new("web", Ipv4Addr::new(10, 96, 0, 10), "TCP", 80, 8080)
        .with_pods([remote])
        .annotated("ebpf-proxy.io/forwarding", forwarding);
    web.load_balancer_ip = Some(LB_IP);
    let mut dns = ServiceDef::new("dns", Ipv4Addr::new(10, 96, 0, 53), "UDP", 53, 5353)
        .with_pods([remote])
        .annotated("ebpf-proxy.io/forwarding", forwarding);
    dns.load_balancer_ip = Some(DNS_LB_IP);
    let manifests = render(&[web, dns]);
    let mut agents = Vec::new();
    for (ns, name, ip) in [
        (&topology.node, NODE_NAME, ROUTED_NODE_IP),
        (&topology.node2, NODE2_NAME, ROUTED_NODE2_IP),
    ] {
        let netns = ns.path();
        agents.push(
            Agent::start_with(
                env!("CARGO_BIN_EXE_ebpf-proxy").as_ref(),
                &topology,
                &PathBuf::from(format!("/tmp/{prefix}-{name}")),
                &manifests,
                AgentOptions {
                    node: Some(NodeSpec {
                        netns: &netns,
                        name,
                        ip,
                        uplinks: &["up0"],
                    }),
                    ..Default::default()
                },
            )
            .expect("agent"),
        );
    }
    TwoNodes {
        agents,
        topology,
        prefix,
    }
}

/// tcpdump on every interface of a namespace, writing every packet at once (`-U`).
struct Capture {
    child: Child,
    file: PathBuf,
    /// Where interface indexes are named (the capture's namespace).
    netns: PathBuf,
}

impl Capture {
    fn start(ns: &Netns, file: PathBuf) -> Capture {
        let _ = std::fs::remove_file(&file);
        let child = ns
            .command("tcpdump")
            .args(["-i", "any", "-y", "LINUX_SLL2", "-n", "-U", "-w"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump");
        let started =
            testbed::eventually(Duration::from_secs(5), Duration::from_millis(50), || {
                std::fs::metadata(&file).is_ok_and(|m| m.len() > 0)
            });
        assert!(started, "tcpdump did not start");
        Capture {
            child,
            file,
            netns: ns.path(),
        }
    }

    /// Stops the capture; one line per packet, as `tcpdump -n -r` prints them.
    fn stop(mut self) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(200));
        let _ = self.child.kill();
        let _ = self.child.wait();
        let out = command_in(&self.netns, "tcpdump")
            .args(["-n", "-r"])
            .arg(&self.file)
            .output()
            .expect("tcpdump -r");
        let _ = std::fs::remove_file(&self.file);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

fn curl(ns: &Netns, args: &[&str]) -> String {
    let mut all = vec!["-sS", "--max-time", "20"];
    all.extend_from_slice(args);
    ns.exec("curl", &all).expect("curl")
}

/// A greeting over the LoadBalancer IP, an 8 MB download compared byte for byte,
/// and the captures of both nodes' uplinks meanwhile: (pod, client address seen,
/// entry node's packets, second node's packets).
fn exchange(nodes: &TwoNodes) -> (String, Ipv4Addr, Vec<String>, Vec<String>) {
    let t = &nodes.topology;
    // Captured on the router, on every interface (each line names the one it
    // crossed): what crosses the wires, where a capture on a node's own interface
    // would see its XDP program's output instead.
    let router = t.router.as_ref().expect("router");
    let capture = Capture::start(router, PathBuf::from(format!("/tmp/{}.pcap", nodes.prefix)));
    let greeting = curl(&t.client, &[&format!("http://{LB_IP}/")]);
    let (pod, client) = parse_greeting(&greeting).unwrap_or_else(|| panic!("{greeting:?}"));
    let file = format!("/tmp/{}-blob", nodes.prefix);
    curl(
        &t.client,
        &["-o", &file, &format!("http://{LB_IP}/bytes/8000000")],
    );
    let downloaded = std::fs::read(&file).expect("downloaded file");
    let _ = std::fs::remove_file(&file);
    assert!(
        downloaded == blob(8_000_000),
        "the download is not byte-exact ({} bytes)",
        downloaded.len()
    );
    let std::net::SocketAddr::V4(client) = client else {
        panic!("IPv6 client")
    };
    let lines = capture.stop();
    let on = |link: &str| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l.contains(&format!(" {link} ")))
            .cloned()
            .collect()
    };
    (pod, *client.ip(), on("ra"), on("rb"))
}

/// Packets from the service to the client. The 8 MB download makes far more than 20
/// even with the largest GSO segments (veth hands on up to 64 kB at once).
fn replies(lines: &[String]) -> usize {
    lines
        .iter()
        .filter(|l| l.contains(&format!("{LB_IP}.80 > {CLIENT_IP}")))
        .count()
}

fn requests(lines: &[String]) -> usize {
    lines
        .iter()
        .filter(|l| l.contains(&format!("{CLIENT_IP}.")) && l.contains(&format!("> {LB_IP}.80:")))
        .count()
}

/// Packets of protocol 4: tcpdump prints the outer and the inner header.
fn encapsulated(lines: &[String]) -> usize {
    lines
        .iter()
        .filter(|l| l.matches("IP ").count() >= 2)
        .count()
}

#[test]
fn with_snat_every_reply_returns_through_the_entry_node() {
    let nodes = two_nodes("msnat", "snat");
    let (pod, client, entry, second) = exchange(&nodes);
    assert_eq!(pod, "pod-b1");
    assert_eq!(client, ROUTED_NODE_IP, "masqueraded by the entry node");
    assert!(
        replies(&entry) > 20,
        "replies cross the entry node: {}",
        replies(&entry)
    );
    assert_eq!(encapsulated(&entry) + encapsulated(&second), 0);
}

#[test]
fn with_dsr_ipip_replies_go_straight_to_the_client_which_the_pod_sees() {
    let nodes = two_nodes("mdsr", "dsr-ipip");
    let (pod, client, entry, second) = exchange(&nodes);
    assert_eq!(pod, "pod-b1");
    assert_eq!(client, CLIENT_IP, "the pod sees the real client");
    assert_eq!(
        replies(&entry),
        0,
        "no reply crosses the entry node:\n{}",
        entry.join("\n")
    );
    assert!(
        requests(&entry) > 0,
        "requests arrive at the entry node:\n{}\n---\n{}",
        entry.join("\n"),
        second
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(encapsulated(&entry) > 0, "and leave it encapsulated");
    assert!(
        encapsulated(&second) > 0,
        "the second node receives them encapsulated"
    );
    assert!(
        replies(&second) > 20,
        "and answers the client itself: {}",
        replies(&second)
    );
}

const IP_MTU_DISCOVER: libc::c_int = 10;
const IP_PMTUDISC_DO: libc::c_int = 2;
const IP_MTU: libc::c_int = 14;

/// From the client: a DF datagram of `len` bytes of IP packet to the DNS LoadBalancer
/// IP, then (after any ICMP had time to arrive) the path MTU the kernel learned and
/// whether an answer came.
fn udp_probe(ns: &Netns, len: usize) -> (Result<usize, std::io::Error>, i32) {
    let path = ns.path();
    std::thread::spawn(move || {
        enter_current_thread(&path).expect("enter the client");
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
        socket.connect((DNS_LB_IP, 53)).expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        let set = |opt: libc::c_int, value: libc::c_int| {
            // SAFETY: setsockopt with an int of the size given.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::IPPROTO_IP,
                    opt,
                    (&value as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        assert_eq!(set(IP_MTU_DISCOVER, IP_PMTUDISC_DO), 0);
        let _ = socket.send(&vec![b'q'; len - 28]);
        let mut answer = [0u8; 2048];
        let answered = socket.recv(&mut answer);
        let mut mtu: libc::c_int = 0;
        let mut size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into an int of the size given.
        unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                IP_MTU,
                (&mut mtu as *mut libc::c_int).cast(),
                &mut size,
            )
        };
        (answered, mtu)
    })
    .join()
    .expect("probe thread")
}

#[test]
fn a_tunnel_too_big_for_the_path_answers_fragmentation_needed_to_the_client() {
    let nodes = two_nodes("mmtu", "dsr-ipip");
    let t = &nodes.topology;
    // The link between the entry node and the router gets a lower MTU.
    t.node.ip("link set up0 mtu 1400").expect("mtu");
    t.router
        .as_ref()
        .expect("router")
        .ip("link set ra mtu 1400")
        .expect("mtu");
    // Fits with its outer header: answered, straight from the second node.
    let (answered, mtu) = udp_probe(&t.client, 1380);
    assert!(
        answered.is_ok(),
        "a 1380-byte datagram is answered: {answered:?}"
    );
    assert_eq!(mtu, 1500, "nothing learned yet");
    // Does not fit once encapsulated: the client learns 1400 - 20 from the entry
    // node's ICMP fragmentation-needed.
    let (answered, mtu) = udp_probe(&t.client, 1390);
    assert!(answered.is_err(), "dropped in favour of the ICMP error");
    assert_eq!(mtu, 1380, "the path MTU the client learned");
    let listing = nodes.agents[0].listing().expect("listing");
    let frag_needed = listing
        .events
        .iter()
        .find(|(n, _)| n == "frag_needed")
        .map_or(0, |(_, v)| *v);
    assert!(frag_needed >= 1, "{:?}", listing.events);
    // At the learned size the datagram passes again.
    let (answered, _) = udp_probe(&t.client, 1380);
    assert!(answered.is_ok(), "{answered:?}");
}
