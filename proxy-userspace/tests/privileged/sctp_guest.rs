//! Issue 13: real SCTP associations through the agent. This machine's kernel has no
//! SCTP, so the test boots the QEMU guest the benchmark uses (Debian's stock kernel,
//! `testbed::guest`) with this test binary and the agent at their paths here, and
//! the guest runs `in_guest` (ignored everywhere else): the same topology and agent
//! as every end-to-end test, socat's SCTP at both ends. `sctp` checks the packets
//! byte by byte on this kernel.

use std::{
    process::{Child, Stdio},
    time::Duration,
};

use ebpf_proxy::model::Family;
use testbed::{
    eventually,
    manifests::ServiceDef,
    netns::Netns,
    topology::{host_port, in_family, NODE_IP},
};

use crate::support::cluster::Cluster;

const TEST: &str = "sctp_guest::in_guest";

/// In the QEMU guest, whose stock kernel has SCTP: `in_guest`.
#[test]
fn real_associations_through_a_cluster_ip_and_a_node_port() {
    crate::support::in_guest::run_ignored_test("sctp-test", TEST);
}

const DIAMETER_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 132);
const DIAMETER_NODE_PORT: u16 = 30868;
const REMOTE_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 133);
const BACKEND_PORT: u16 = 3869;

/// socat's name for SCTP over `family`'s sockets.
fn socat_sctp(family: Family) -> &'static str {
    match family {
        Family::V4 => "SCTP4",
        Family::V6 => "SCTP6",
    }
}

/// An SCTP server (socat) of one family in a pod that reads a line and answers
/// `got-<line>`, then shuts the association down, stopped when dropped. The server
/// closes, not the client: SCTP has no half-close, so a client that shut down after
/// sending could not receive the answer.
struct AnsweringServer(Child);

impl AnsweringServer {
    fn start(ns: &Netns, family: Family) -> AnsweringServer {
        // IPv6 only, so that the IPv4 server beside it keeps IPv4's side of the port.
        let v6_only = match family {
            Family::V4 => "",
            Family::V6 => ",ipv6only=1",
        };
        let listen = format!(
            "{}-LISTEN:{BACKEND_PORT},fork,reuseaddr{v6_only}",
            socat_sctp(family)
        );
        let child = ns
            .command("socat")
            .args([listen.as_str(), "SYSTEM:read line; echo got-$line"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat SCTP server");
        AnsweringServer(child)
    }
}

impl Drop for AnsweringServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One association from `ns` to `target` over `family`: a line sent, the answer
/// returned (the client keeps its side open, `shut-none`, until the server closes).
fn echoed(ns: &Netns, family: Family, target: &str) -> String {
    ns.exec(
        "sh",
        &[
            "-c",
            &format!(
                "echo 'sctp-through-{target}' | socat -t 20 -T 20 - {}:{target},shut-none",
                socat_sctp(family)
            ),
        ],
    )
    .unwrap_or_else(|e| format!("{e:#}"))
}

/// Inside the guest: dual-stack Diameter-like services with one backend each, a local
/// one behind a ClusterIP and a NodePort, a remote one behind a NodePort
/// (masqueraded). Associations of each family from a pod and from outside carry their
/// data both ways, and conntrack lists them. (Not from the node's own processes: the
/// kernel runs no cgroup connect hook for SCTP sockets, see the README.)
#[test]
#[ignore = "run inside the QEMU guest by `real_associations_through_a_cluster_ip_and_a_node_port`: needs a kernel with SCTP"]
fn in_guest() {
    let cluster = Cluster::new("sctp", 2, 1, |t| {
        let mut local = ServiceDef::new("diameter", DIAMETER_VIP, "SCTP", 3868, BACKEND_PORT)
            .with_pods([t.pod("pod-a1")])
            .dual_stack();
        local.node_port = Some(DIAMETER_NODE_PORT);
        let mut remote = ServiceDef::new("remote", REMOTE_VIP, "SCTP", 3868, BACKEND_PORT)
            .with_pods([t.pod("pod-b1")])
            .dual_stack();
        remote.node_port = Some(DIAMETER_NODE_PORT + 1);
        vec![local, remote]
    });
    // Every veth would leave a local socket's checksum to its peer, and the peer
    // trusts it unverified: the node's own interfaces compute it on the way out
    // instead, as a NIC without SCTP offload does, so that every receiver checks the
    // checksum the data path left (a correction written into a checksum still to be
    // computed broke it, for example).
    let node = &cluster.topology.node;
    let mut interfaces = vec!["up0".to_owned(), "up1".to_owned()];
    interfaces.extend(
        cluster
            .topology
            .pods
            .iter()
            .filter(|p| p.node == testbed::topology::NODE_NAME)
            .map(|p| p.host_interface.clone()),
    );
    for interface in &interfaces {
        node.exec("ethtool", &["-K", interface, "tx-checksum-sctp", "off"])
            .expect("ethtool");
    }
    let _servers: Vec<AnsweringServer> = Family::ALL
        .into_iter()
        .flat_map(|family| {
            ["pod-a1", "pod-b1"].map(|pod| AnsweringServer::start(cluster.ns(pod), family))
        })
        .collect();
    for family in Family::ALL {
        let node_port = |port: u16| host_port(in_family(NODE_IP, family), port);
        for (who, ns, target) in [
            (
                "a pod, the ClusterIP",
                cluster.ns("pod-a2"),
                host_port(in_family(DIAMETER_VIP, family), 3868),
            ),
            (
                "outside, a NodePort to a local backend",
                &cluster.topology.client,
                node_port(DIAMETER_NODE_PORT),
            ),
            (
                "outside, a NodePort to a remote backend (masqueraded)",
                &cluster.topology.client,
                node_port(DIAMETER_NODE_PORT + 1),
            ),
        ] {
            let expected = format!("got-sctp-through-{target}");
            // The servers may take a moment to listen under emulation.
            let associated =
                eventually(Duration::from_secs(40), Duration::from_millis(200), || {
                    echoed(ns, family, &target).trim() == expected
                });
            if !associated {
                diagnose(&cluster);
            }
            assert!(
                associated,
                "{family}, {who}: {}",
                echoed(ns, family, &target)
            );
            println!("SCTP association ok: {family}, {who}");
        }
    }
    for (name, ns) in [
        ("the client", &cluster.topology.client),
        ("pod-a1", cluster.ns("pod-a1")),
        ("pod-a2", cluster.ns("pod-a2")),
        ("pod-b1", cluster.ns("pod-b1")),
    ] {
        assert_eq!(checksum_errors(ns), 0, "{name}");
    }
    let listing = tool(&cluster, &["conntrack", "list"]);
    println!("{listing}");
    // The last association, masqueraded, went through its shutdown (the others may
    // have been collected already under emulation: 10 s after closing).
    // Masqueraded to the node's IPv6 address.
    let node = in_family(NODE_IP, Family::V6);
    let last = host_port(node, DIAMETER_NODE_PORT + 1);
    assert!(
        listing.lines().any(|l| l.starts_with("SCTP")
            && l.contains(&last)
            && l.contains(&format!(" via [{node}]:"))
            && l.contains("CLOSING")),
        "{last}: {listing}"
    );
}

/// The agent's `args` output.
fn tool(cluster: &Cluster, args: &[&str]) -> String {
    let out = std::process::Command::new(cluster.agent.binary())
        .args(args)
        .arg("--pin-dir")
        .arg(&cluster.agent.pin_dir)
        .output()
        .expect("ebpf-proxy");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The SCTP checksum errors a namespace's stack counted.
fn checksum_errors(ns: &Netns) -> u64 {
    let counters = ns
        .exec("cat", &["/proc/net/sctp/snmp"])
        .expect("SCTP counters");
    counters
        .lines()
        .find_map(|l| l.strip_prefix("SctpChecksumErrors"))
        .and_then(|v| v.trim().parse().ok())
        .expect("SctpChecksumErrors")
}

/// What the console shows of a failed association: the flows and events, and each
/// end's SCTP counters (checksum errors, out-of-the-blue packets…).
fn diagnose(cluster: &Cluster) {
    println!("{}", tool(cluster, &["conntrack", "list", "-o", "wide"]));
    println!("{}", tool(cluster, &["list", "-o", "wide"]));
    for (name, ns) in [
        ("client", &cluster.topology.client),
        ("node", &cluster.topology.node),
        ("pod-b1", cluster.ns("pod-b1")),
    ] {
        let counters = ns.exec("cat", &["/proc/net/sctp/snmp"]).unwrap_or_default();
        println!("{name}: {}", counters.replace('\n', " "));
    }
}
