//! ICMP and ICMPv6 errors about translated flows, through BPF_PROG_TEST_RUN, one body
//! per address family: the quoted packet and the addresses are turned back into what
//! the error's receiver knows, with every checksum still valid (IPv4's outer and
//! quoted headers and ICMP; ICMPv6's over its pseudo-header); and end to end, a UDP
//! client of a backend without a listener sees "connection refused", and path-MTU
//! discovery works through a NodePort, over either family.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use ebpf_proxy::model::{Family, Protocol};
use testbed::{
    manifests::ServiceDef,
    netns::Netns,
    topology::{host_port, in_family, Topology},
};

use crate::support::{
    cluster::*,
    datapath::*,
    families::*,
    packets::*,
    services::{web, LB_IP, NODE_PORT},
};

/// A question from the client to `net`'s service (UDP, port 80), and the packet the
/// uplink program made of it.
fn asked(dp: &mut TestDatapath, net: &Net) -> (Vec<u8>, SeenIp) {
    let question = packet((net.client, 40000), (net.vip, 80), L4::Udp, b"question");
    let (_, translated) = dp.xdp(&question);
    let seen = inspect_ip(&translated);
    (translated, seen)
}

/// What an error about the client's question must say once translated: from `from`,
/// to the client, about the packet the client sent to the service.
fn assert_about_the_question(error: &SeenError, net: &Net, from: IpAddr) {
    assert_eq!(error.outer, (from, net.client), "{:?}", net.family);
    assert_eq!(
        error.quoted,
        ((net.client, 40000), (net.vip, 80)),
        "{:?}: quotes what the client sent",
        net.family
    );
}

#[test]
fn a_pods_port_unreachable_reaches_the_client_about_the_service_it_used() {
    for net in nets() {
        let mut dp = serving(&net, Protocol::Udp);
        let (translated, seen) = asked(&mut dp, &net);
        assert_eq!(seen.dst, (net.pods[0], 8080));
        let error = icmp_error(
            net.pods[0],
            net.client,
            IcmpError::PortUnreachable,
            &translated,
        );
        let (verdict, out) = dp.tc(&error);
        assert_eq!(verdict, TC_ACT_OK, "{:?}", net.family);
        assert_about_the_question(&read_icmp_error(&out), &net, net.vip);
        assert_eq!(dp.event("icmp_translated"), 1, "{:?}", net.family);
    }
}

#[test]
fn a_remote_pods_error_about_a_masqueraded_flow_reaches_the_external_client() {
    for net in nets() {
        let mut dp = TestDatapath::new();
        dp.program(&[(
            frontend(net.vip, 80, Protocol::Udp),
            vec![endpoint(net.remote_pod, true)],
        )]);
        let (translated, seen) = asked(&mut dp, &net);
        assert_eq!(seen.src.0, net.node, "{:?}: masqueraded", net.family);
        // The error comes back to the node's address, on the uplink.
        let error = icmp_error(
            net.remote_pod,
            net.node,
            IcmpError::PortUnreachable,
            &translated,
        );
        let (verdict, out) = dp.xdp(&error);
        assert_eq!(verdict, XDP_PASS, "{:?}", net.family);
        assert_about_the_question(&read_icmp_error(&out), &net, net.vip);
    }
}

#[test]
fn errors_about_unknown_flows_pass_untouched() {
    for net in nets() {
        let mut dp = serving(&net, Protocol::Udp);
        let stray = packet((net.client, 40001), (net.pods[0], 8080), L4::Udp, b"x");
        let error = icmp_error(net.pods[0], net.client, IcmpError::PortUnreachable, &stray);
        assert_eq!(
            dp.tc(&error),
            (TC_ACT_OK, error.clone()),
            "{:?}",
            net.family
        );
        assert_eq!(dp.xdp(&error), (XDP_PASS, error), "{:?}", net.family);
        assert_eq!(dp.event("icmp_translated"), 0);
    }
}

/// An error whose IP length ends before the quoted ports (the frame's padding holds
/// the rest) is not translated, through either hook: the receiver keeps what the IP
/// length says, and the checksum would have been folded over what it drops. One
/// that just holds them is.
#[test]
fn an_error_too_short_for_its_quoted_ports_passes_untouched() {
    for net in nets() {
        let mut dp = serving(&net, Protocol::Udp);
        let (translated, _) = asked(&mut dp, &net);
        let error = icmp_error(
            net.pods[0],
            net.client,
            IcmpError::PortUnreachable,
            &translated,
        );
        // ICMP header, quoted IP header and the ports, less `short` bytes.
        let cut = |short: u16| {
            let mut error = error.clone();
            match net.family {
                Family::V4 => {
                    let total = 20u16 + 8 + 20 + 4 - short;
                    error[16..18].copy_from_slice(&total.to_be_bytes());
                    error[24..26].copy_from_slice(&[0, 0]);
                    let sum = internet_checksum(&error[14..34]);
                    error[24..26].copy_from_slice(&sum.to_be_bytes());
                }
                Family::V6 => {
                    let payload = 8u16 + 40 + 4 - short;
                    error[18..20].copy_from_slice(&payload.to_be_bytes());
                }
            }
            error
        };
        let short = cut(2);
        assert_eq!(
            dp.tc(&short),
            (TC_ACT_OK, short.clone()),
            "{:?}",
            net.family
        );
        assert_eq!(
            dp.xdp(&short),
            (XDP_PASS, short.clone()),
            "{:?}",
            net.family
        );
        assert_eq!(dp.event("icmp_translated"), 0, "{:?}", net.family);
        let (_, out) = dp.tc(&cut(0));
        assert_ne!(out, cut(0), "{:?}: translated", net.family);
        assert_eq!(dp.event("icmp_translated"), 1, "{:?}", net.family);
    }
}

/// Issue 14 (IPv4) and issue 12 (IPv6): errors the node itself generated about a
/// translated packet it forwarded (a smaller MTU further on, a TTL or hop limit
/// running out) left quoting the backend.
#[test]
fn errors_the_node_sends_about_translated_packets_are_translated_on_egress() {
    for net in nets() {
        let mut dp = serving(&net, Protocol::Udp);
        let (translated, seen) = asked(&mut dp, &net);
        assert_eq!(seen.dst, (net.pods[0], 8080));
        for kind in [IcmpError::TooBig, IcmpError::TimeExceeded] {
            let error = icmp_error(net.node, net.client, kind, &translated);
            let (verdict, out) = dp.tc_egress(&error);
            assert_eq!(verdict, TC_ACT_OK, "{:?} {kind:?}", net.family);
            // From the node, as sent.
            assert_about_the_question(&read_icmp_error(&out), &net, net.node);
        }
        assert_eq!(dp.event("icmp_translated"), 2, "{:?}", net.family);
        // Anything else leaves the egress program as it came.
        let question = packet((net.client, 40000), (net.vip, 80), L4::Udp, b"question");
        assert_eq!(dp.tc_egress(&question), (TC_ACT_OK, question));
    }
}

// End to end: the errors reach real clients, over either family.

/// Whether a UDP datagram from `ns` to `target` is refused: the ICMP port
/// unreachable came back about the address this socket is connected to.
fn udp_refused(ns: &Netns, target: std::net::SocketAddr) -> bool {
    let path = ns.path();
    std::thread::spawn(move || {
        testbed::netns::enter_current_thread(&path).expect("enter");
        let any: IpAddr = if target.is_ipv6() {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        } else {
            Ipv4Addr::UNSPECIFIED.into()
        };
        let socket = std::net::UdpSocket::bind((any, 0)).expect("bind");
        socket.connect(target).expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let _ = socket.send(b"anyone?");
        let mut buf = [0u8; 64];
        matches!(socket.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    })
    .join()
    .expect("probe")
}

#[test]
fn port_unreachable_from_a_backend_reaches_clients_as_refused() {
    const LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);
    const REMOTE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 98);
    const REMOTE_LB: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
    // The services point at a port where the pods have no listener.
    let closed = |t: &Topology, name: &str, vip: Ipv4Addr, lb: Ipv4Addr, pods: &[&str]| {
        let mut service = ServiceDef::new(name, vip, "UDP", 9999, 9)
            .with_pods(pods.iter().map(|p| t.pod(p)))
            .dual_stack();
        service.load_balancer_ip = Some(lb);
        service
    };
    let cluster = Cluster::new("icmp", 2, 1, |t| {
        vec![
            closed(t, "local", LOCAL_VIP, LB_IP, &["pod-a1"]),
            closed(t, "remote", REMOTE_VIP, REMOTE_LB, &["pod-b1"]),
        ]
    });
    let client = &cluster.topology.client;
    for family in Family::ALL {
        // From a pod to a local backend, and from outside to a local one and to a
        // remote (masqueraded) one.
        for (ns, address) in [
            (cluster.ns("pod-a2"), LOCAL_VIP),
            (client, LB_IP),
            (client, REMOTE_LB),
        ] {
            let target = (in_family(address, family), 9999).into();
            assert!(udp_refused(ns, target), "{family:?}: {target}");
        }
    }
}

/// Issue 14 (IPv4) and issue 12 (IPv6): a smaller MTU between the node and a backend
/// broke path-MTU discovery through a NodePort (the node's fragmentation-needed or
/// packet-too-big quoted the backend).
#[test]
fn path_mtu_discovery_works_through_a_node_port_to_a_narrower_pod_link() {
    let cluster = Cluster::new("pmtu", 1, 0, |t| {
        let mut service = web(t, &["pod-a1"]).dual_stack();
        service.node_port = Some(NODE_PORT);
        vec![service]
    });
    let host_side = &cluster.topology.pod("pod-a1").host_interface;
    cluster
        .topology
        .node
        .ip(&format!("link set {host_side} mtu 1400"))
        .expect("narrow the pod link");
    // 200 kB up: the client's full-size segments do not fit the pod link, so the
    // node answers fragmentation-needed (packet too big), which must reach the
    // client translated.
    let upload = std::env::temp_dir().join(format!("epx-pmtu-{}", std::process::id()));
    std::fs::write(&upload, vec![b'x'; 200_000]).expect("upload file");
    for family in Family::ALL {
        let node = in_family(testbed::topology::NODE_IP, family);
        let url = format!("http://{}/", host_port(node, NODE_PORT));
        let result = cluster.topology.client.exec(
            "curl",
            &[
                "-sS",
                "--max-time",
                "15",
                "--data-binary",
                &format!("@{}", upload.display()),
                &url,
            ],
        );
        let body = result.unwrap_or_else(|e| {
            let _ = std::fs::remove_file(&upload);
            panic!("{family:?}: the upload did not complete: {e}")
        });
        assert_eq!(pod_of(&body), "pod-a1", "{family:?}");
    }
    let _ = std::fs::remove_file(&upload);
}
