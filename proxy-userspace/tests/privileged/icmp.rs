//! ICMP errors about translated flows, through BPF_PROG_TEST_RUN: the quoted packet
//! and the addresses are turned back into what the error's receiver knows, with
//! every checksum (outer IP, quoted IP, ICMP) still valid; and end to end, a UDP
//! client of a backend without a listener sees "connection refused".

use std::{net::Ipv4Addr, time::Duration};

use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type, PacketBuilder};
use testbed::{manifests::ServiceDef, netns::Netns, topology::Topology};

use crate::support::{
    cluster::*,
    datapath::*,
    packets::*,
    services::{web, LB_IP, NODE_PORT},
};

const VIP: [u8; 4] = [10, 96, 0, 53];
const CLIENT: [u8; 4] = [198, 18, 0, 2];
const POD: [u8; 4] = [10, 244, 1, 2];
const REMOTE_POD: [u8; 4] = [10, 244, 2, 2];

/// Port unreachable from `from` to `to`, quoting `offending` (an Ethernet frame).
fn port_unreachable(from: [u8; 4], to: [u8; 4], offending: &[u8]) -> Vec<u8> {
    let quoted = &offending[14..14 + 28];
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(from, to, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ));
    let mut out = Vec::new();
    builder.write(&mut out, quoted).expect("icmp packet");
    out
}

struct Error {
    outer: ([u8; 4], [u8; 4]),
    quoted: (([u8; 4], u16), ([u8; 4], u16)),
}

/// Reads an ICMP error frame after checking its three checksums.
fn read_error(frame: &[u8]) -> Error {
    let ip = &frame[14..34];
    assert_eq!(internet_checksum(ip), 0, "outer IP checksum");
    assert_eq!(internet_checksum(&frame[34..]), 0, "ICMP checksum");
    let quoted = &frame[42..62];
    assert_eq!(internet_checksum(quoted), 0, "quoted IP checksum");
    let ports = &frame[62..66];
    let addr = |b: &[u8]| -> [u8; 4] { b.try_into().expect("4 bytes") };
    Error {
        outer: (addr(&ip[12..16]), addr(&ip[16..20])),
        quoted: (
            (
                addr(&quoted[12..16]),
                u16::from_be_bytes([ports[0], ports[1]]),
            ),
            (
                addr(&quoted[16..20]),
                u16::from_be_bytes([ports[2], ports[3]]),
            ),
        ),
    }
}

#[test]
fn a_pods_port_unreachable_reaches_the_client_about_the_service_it_used() {
    let mut dp = TestDatapath::new();
    dp.program(&[(udp(VIP, 53), vec![local(POD, 5353)])]);
    let question = udp_packet((CLIENT, 40000), (VIP, 53), b"question");
    let (_, translated) = dp.xdp(&question);
    assert_eq!(inspect(&translated).dst, (POD, 5353));
    let (verdict, out) = dp.tc(&port_unreachable(POD, CLIENT, &translated));
    assert_eq!(verdict, TC_ACT_OK);
    let error = read_error(&out);
    assert_eq!(
        error.outer,
        (VIP, CLIENT),
        "from the service, to the client"
    );
    assert_eq!(
        error.quoted,
        ((CLIENT, 40000), (VIP, 53)),
        "quotes what the client sent"
    );
    assert_eq!(dp.event("icmp_translated"), 1);
}

#[test]
fn a_remote_pods_error_about_a_masqueraded_flow_reaches_the_external_client() {
    let mut dp = TestDatapath::new();
    dp.program(&[(udp(VIP, 53), vec![remote(REMOTE_POD, 5353)])]);
    let question = udp_packet((CLIENT, 40000), (VIP, 53), b"question");
    let (_, translated) = dp.xdp(&question);
    let seen = inspect(&translated);
    assert_eq!(seen.src.0, NODE_IP.octets(), "masqueraded");
    // The error comes back to the node's address, on the uplink.
    let (verdict, out) = dp.xdp(&port_unreachable(REMOTE_POD, seen.src.0, &translated));
    assert_eq!(verdict, XDP_PASS);
    let error = read_error(&out);
    assert_eq!(error.outer, (VIP, CLIENT));
    assert_eq!(error.quoted, ((CLIENT, 40000), (VIP, 53)));
}

#[test]
fn errors_about_unknown_flows_pass_untouched() {
    let mut dp = TestDatapath::new();
    dp.program(&[(udp(VIP, 53), vec![local(POD, 5353)])]);
    let stray = udp_packet((CLIENT, 40001), (POD, 5353), b"x");
    let error = port_unreachable(POD, CLIENT, &stray);
    let (verdict, out) = dp.tc(&error);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, error);
    assert_eq!(dp.event("icmp_translated"), 0);
}

/// Issue 14: errors the node itself generated about a translated packet it forwarded
/// (a smaller MTU further on, a TTL running out) left quoting the backend.
#[test]
fn errors_the_node_sends_about_translated_packets_are_translated_on_egress() {
    let mut dp = TestDatapath::new();
    dp.program(&[(udp(VIP, 53), vec![local(POD, 5353)])]);
    let question = udp_packet((CLIENT, 40000), (VIP, 53), b"question");
    let (_, translated) = dp.xdp(&question);
    assert_eq!(inspect(&translated).dst, (POD, 5353));
    for kind in [
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1400,
        }),
        Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit),
    ] {
        let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(NODE_IP.octets(), CLIENT, 64)
            .icmpv4(kind);
        let mut error = Vec::new();
        builder
            .write(&mut error, &translated[14..14 + 28])
            .expect("icmp packet");
        let (verdict, out) = dp.tc_egress(&error);
        assert_eq!(verdict, TC_ACT_OK);
        let read = read_error(&out);
        assert_eq!(
            read.outer,
            (NODE_IP.octets(), CLIENT),
            "from the node, as sent"
        );
        assert_eq!(read.quoted, ((CLIENT, 40000), (VIP, 53)));
    }
    assert_eq!(dp.event("icmp_translated"), 2);
    // Anything else leaves the egress program as it came.
    let (verdict, out) = dp.tc_egress(&question);
    assert_eq!((verdict, out), (TC_ACT_OK, question));
}

// End to end: the errors reach real clients.

/// Whether a UDP datagram from `ns` to `target` is refused: the ICMP port
/// unreachable came back about the address this socket is connected to.
fn udp_refused(ns: &Netns, target: std::net::SocketAddr) -> bool {
    let path = ns.path();
    std::thread::spawn(move || {
        testbed::netns::enter_current_thread(&path).expect("enter");
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
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
    // The service points at a port where the pods have no listener.
    let closed = |t: &Topology, name: &str, vip: Ipv4Addr, lb: Ipv4Addr, pods: &[&str]| {
        let mut service =
            ServiceDef::new(name, vip, "UDP", 9999, 9).with_pods(pods.iter().map(|p| t.pod(p)));
        service.load_balancer_ip = Some(lb);
        service
    };
    let cluster = Cluster::new("icmp", 2, 1, |t| {
        vec![
            closed(t, "local", Ipv4Addr::new(10, 96, 0, 99), LB_IP, &["pod-a1"]),
            closed(
                t,
                "remote",
                Ipv4Addr::new(10, 96, 0, 98),
                Ipv4Addr::new(198, 18, 100, 2),
                &["pod-b1"],
            ),
        ]
    });
    // From a pod to a local backend, and from outside to a remote (masqueraded) one.
    assert!(udp_refused(
        cluster.ns("pod-a2"),
        (Ipv4Addr::new(10, 96, 0, 99), 9999).into()
    ));
    assert!(udp_refused(&cluster.topology.client, (LB_IP, 9999).into()));
    assert!(udp_refused(
        &cluster.topology.client,
        (Ipv4Addr::new(198, 18, 100, 2), 9999).into()
    ));
}

/// Issue 14: a smaller MTU between the node and a backend broke path-MTU discovery
/// through a NodePort (the node's fragmentation-needed quoted the backend).
#[test]
fn path_mtu_discovery_works_through_a_node_port_to_a_narrower_pod_link() {
    let cluster = Cluster::new("pmtu", 1, 0, |t| {
        let mut service = web(t, &["pod-a1"]);
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
    // node answers fragmentation-needed, which must reach the client translated.
    let upload = std::env::temp_dir().join(format!("epx-pmtu-{}", std::process::id()));
    std::fs::write(&upload, vec![b'x'; 200_000]).expect("upload file");
    let url = format!("http://{}:{NODE_PORT}/", testbed::topology::NODE_IP);
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
    let _ = std::fs::remove_file(&upload);
    let body = result.expect("the upload completes");
    assert_eq!(pod_of(&body), "pod-a1");
}
