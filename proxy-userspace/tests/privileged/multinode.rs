//! Two nodes behind a router, both running the real agent, a dual-stack LoadBalancer
//! service whose only endpoint is on the second node, and an external client: `snat`
//! sends every reply back through the entry node, `dsr-ipip` encapsulates requests
//! to the endpoint's node (IPIP for IPv4, ip6ip6 for IPv6) and its replies go
//! straight to the client. Packet captures (tcpdump) on the router show which
//! packets cross which node. Each test runs both families on one pair of nodes.

use std::{
    net::{IpAddr, Ipv4Addr, UdpSocket},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, Stdio},
    time::Duration,
};

use ebpf_proxy::model::Family;
use testbed::{
    agent::{Agent, AgentOptions, NodeSpec},
    manifests::{render, ServiceDef},
    netns::{command_in, enter_current_thread, Netns},
    servers::{blob, parse_greeting},
    topology::{
        host_port, in_family, Topology, CLIENT_IP, NODE2_NAME, NODE_NAME, ROUTED_NODE2_IP,
        ROUTED_NODE_IP,
    },
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
        .annotated("ebpf-proxy.io/forwarding", forwarding)
        .dual_stack();
    web.load_balancer_ip = Some(LB_IP);
    let mut dns = ServiceDef::new("dns", Ipv4Addr::new(10, 96, 0, 53), "UDP", 53, 5353)
        .with_pods([remote])
        .annotated("ebpf-proxy.io/forwarding", forwarding)
        .dual_stack();
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

/// What one family's exchange showed.
struct Exchange {
    /// The pod that answered, and the client address it saw.
    pod: String,
    client: IpAddr,
    /// The packets that crossed the router's links to the entry node and to the
    /// second node, as tcpdump prints them.
    entry: Vec<String>,
    second: Vec<String>,
}

/// A greeting over the family's LoadBalancer IP, an 8 MB download compared byte for
/// byte, and the captures of both nodes' links meanwhile.
fn exchange(nodes: &TwoNodes, family: Family) -> Exchange {
    let lb = host_port(in_family(LB_IP, family), 80);
    let t = &nodes.topology;
    // Captured on the router, on every interface (each line names the one it
    // crossed): what crosses the wires, where a capture on a node's own interface
    // would see its XDP program's output instead.
    let router = t.router.as_ref().expect("router");
    let capture = Capture::start(router, PathBuf::from(format!("/tmp/{}.pcap", nodes.prefix)));
    let greeting = curl(&t.client, &[&format!("http://{lb}/")]);
    let (pod, client) = parse_greeting(&greeting).unwrap_or_else(|| panic!("{greeting:?}"));
    let file = format!("/tmp/{}-blob", nodes.prefix);
    curl(
        &t.client,
        &["-o", &file, &format!("http://{lb}/bytes/8000000")],
    );
    let downloaded = std::fs::read(&file).expect("downloaded file");
    let _ = std::fs::remove_file(&file);
    assert!(
        downloaded == blob(8_000_000),
        "the download is not byte-exact ({} bytes)",
        downloaded.len()
    );
    let lines = capture.stop();
    let on = |link: &str| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l.contains(&format!(" {link} ")))
            .cloned()
            .collect()
    };
    Exchange {
        pod,
        client: client.ip(),
        entry: on("ra"),
        second: on("rb"),
    }
}

/// Packets of the family's flows from the service to the client (tcpdump writes
/// `address.port`, IPv6 as RFC 5952 does, as `Display` does). The 8 MB download makes
/// far more than 20 even with the largest GSO segments (veth hands on up to 64 kB at
/// once).
fn replies(lines: &[String], family: Family) -> usize {
    let (lb, client) = (in_family(LB_IP, family), in_family(CLIENT_IP, family));
    lines
        .iter()
        .filter(|l| l.contains(&format!("{lb}.80 > {client}.")))
        .count()
}

fn requests(lines: &[String], family: Family) -> usize {
    let (lb, client) = (in_family(LB_IP, family), in_family(CLIENT_IP, family));
    lines
        .iter()
        .filter(|l| l.contains(&format!("{client}.")) && l.contains(&format!("> {lb}.80:")))
        .count()
}

/// Tunnelled packets: tcpdump prints the outer and the inner header (`IP` twice for
/// IPIP, `IP6` twice for ip6ip6).
fn encapsulated(lines: &[String], family: Family) -> usize {
    let header = match family {
        Family::V4 => "IP ",
        Family::V6 => "IP6 ",
    };
    lines
        .iter()
        .filter(|l| l.matches(header).count() >= 2)
        .count()
}

#[test]
fn with_snat_every_reply_returns_through_the_entry_node() {
    let nodes = two_nodes("msnat", "snat");
    for family in Family::ALL {
        let seen = exchange(&nodes, family);
        assert_eq!(seen.pod, "pod-b1");
        assert_eq!(
            seen.client,
            in_family(ROUTED_NODE_IP, family),
            "masqueraded by the entry node"
        );
        let replies = replies(&seen.entry, family);
        assert!(
            replies > 20,
            "{family:?} replies cross the entry node: {replies}"
        );
        assert_eq!(
            encapsulated(&seen.entry, family) + encapsulated(&seen.second, family),
            0
        );
    }
}

#[test]
fn with_dsr_ipip_replies_go_straight_to_the_client_which_the_pod_sees() {
    let nodes = two_nodes("mdsr", "dsr-ipip");
    for family in Family::ALL {
        let seen = exchange(&nodes, family);
        let (entry, second) = (&seen.entry, &seen.second);
        assert_eq!(seen.pod, "pod-b1");
        assert_eq!(
            seen.client,
            in_family(CLIENT_IP, family),
            "the pod sees the real client"
        );
        assert_eq!(
            replies(entry, family),
            0,
            "{family:?}: no reply crosses the entry node:\n{}",
            entry.join("\n")
        );
        assert!(
            requests(entry, family) > 0,
            "{family:?}: requests arrive at the entry node:\n{}\n---\n{}",
            entry.join("\n"),
            second
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(
            encapsulated(entry, family) > 0,
            "{family:?}: and leave it encapsulated"
        );
        assert!(
            encapsulated(second, family) > 0,
            "{family:?}: the second node receives them encapsulated"
        );
        let replies = replies(second, family);
        assert!(
            replies > 20,
            "{family:?}: and answers the client itself: {replies}"
        );
    }
}

/// The socket options of path-MTU discovery, per family: (level, MTU_DISCOVER,
/// PMTUDISC_DO, MTU), and the IP and UDP headers' length.
fn pmtu_options(family: Family) -> ((libc::c_int, libc::c_int, libc::c_int, libc::c_int), usize) {
    match family {
        Family::V4 => ((libc::IPPROTO_IP, 10, 2, 14), 28),
        Family::V6 => ((libc::IPPROTO_IPV6, 23, 2, 24), 48),
    }
}

/// From the client: a datagram of `len` bytes of IP packet that may not be fragmented
/// (IPv4's DF; IPv6 is never fragmented on the way) to the family's DNS LoadBalancer
/// IP, then (after any ICMP had time to arrive) the path MTU the kernel learned and
/// whether an answer came.
fn udp_probe(ns: &Netns, family: Family, len: usize) -> (Result<usize, std::io::Error>, i32) {
    let path = ns.path();
    let ((level, discover, always, mtu_option), headers) = pmtu_options(family);
    std::thread::spawn(move || {
        enter_current_thread(&path).expect("enter the client");
        let socket = UdpSocket::bind((family.unspecified(), 0)).expect("bind");
        socket
            .connect((in_family(DNS_LB_IP, family), 53))
            .expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        let value: libc::c_int = always;
        // SAFETY: setsockopt with an int of the size given.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                level,
                discover,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0);
        let _ = socket.send(&vec![b'q'; len - headers]);
        let mut answer = [0u8; 2048];
        let answered = socket.recv(&mut answer);
        let mut mtu: libc::c_int = 0;
        let mut size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into an int of the size given.
        unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                level,
                mtu_option,
                (&mut mtu as *mut libc::c_int).cast(),
                &mut size,
            )
        };
        (answered, mtu)
    })
    .join()
    .expect("probe thread")
}

/// The entry node answers a packet that would not fit the path once encapsulated as
/// a router would: ICMP fragmentation-needed (IPv4, DF set) or ICMPv6 packet too big,
/// with the MTU left for the inner packet.
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
    let frag_needed = || {
        let listing = nodes.agents[0].listing().expect("listing");
        (listing.event("frag_needed"), listing.events)
    };
    for family in Family::ALL {
        let outer = match family {
            Family::V4 => 20,
            Family::V6 => 40,
        };
        let fits = 1400 - outer;
        // Fits with its outer header: answered, straight from the second node.
        let (answered, mtu) = udp_probe(&t.client, family, fits);
        assert!(
            answered.is_ok(),
            "{family:?}: a {fits}-byte datagram is answered: {answered:?}"
        );
        assert_eq!(mtu, 1500, "{family:?}: nothing learned yet");
        // Does not fit once encapsulated: the client learns 1400 less the outer
        // header from the entry node's ICMP error.
        let (before, _) = frag_needed();
        let (answered, mtu) = udp_probe(&t.client, family, fits + 10);
        assert!(
            answered.is_err(),
            "{family:?}: dropped in favour of the ICMP error"
        );
        assert_eq!(
            mtu, fits as i32,
            "{family:?}: the path MTU the client learned"
        );
        let (after, events) = frag_needed();
        assert!(after > before, "{family:?}: {events:?}");
        // At the learned size the datagram passes again.
        let (answered, _) = udp_probe(&t.client, family, fits);
        assert!(answered.is_ok(), "{family:?}: {answered:?}");
    }
}
