//! Issue 13: IP fragments of translated flows. Only a datagram's first fragment
//! carries the ports; the later ones used to pass untranslated (to a service address
//! nobody owns), so a datagram larger than the path MTU never arrived whole. Now the
//! first fragment's ports are remembered and every fragment follows the flow.

use std::net::Ipv4Addr;

use testbed::{manifests::ServiceDef, servers::parse_greeting, topology::NODE_IP};

use crate::support::{cluster::*, datapath::*, packets::*, services::*};

const VIP: [u8; 4] = [10, 96, 0, 53];
const POD: [u8; 4] = [10, 244, 1, 2];
const CLIENT: [u8; 4] = [198, 18, 0, 2];

/// A UDP datagram too large for one 1500-byte frame, in two fragments.
fn fragmented(src: ([u8; 4], u16), dst: ([u8; 4], u16), id: u16) -> (Vec<u8>, Vec<u8>) {
    let payload: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8).collect();
    fragments(&udp_packet(src, dst, &payload), 1480, id)
}

#[test]
fn every_fragment_of_a_datagram_follows_its_flow_both_ways() {
    let mut dp = TestDatapath::new();
    dp.program(&[(udp(VIP, 53), vec![local(POD, 5353)])]);

    // From outside to the service: both fragments go to the backend, and together
    // they are the datagram with a valid UDP checksum for its new addresses.
    let (first, second) = fragmented((CLIENT, 40000), (VIP, 53), 0x4242);
    let (verdict, first_out) = dp.xdp(&first);
    assert_eq!(verdict, XDP_PASS);
    let (verdict, second_out) = dp.xdp(&second);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        second_out[14 + 16..14 + 20],
        POD,
        "the later fragment's destination"
    );
    assert_eq!(second_out[34..], second[34..], "its payload untouched");
    let request = inspect(&reassemble(&first_out, &second_out));
    assert_eq!(request.src, (CLIENT, 40000));
    assert_eq!(request.dst, (POD, 5353));

    // The backend's answer, fragmented too, comes back from the service address.
    let (first, second) = fragmented((POD, 5353), (CLIENT, 40000), 0x5151);
    let (verdict, first_out) = dp.tc(&first);
    assert_eq!(verdict, TC_ACT_OK);
    let (verdict, second_out) = dp.tc(&second);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        second_out[14 + 12..14 + 16],
        VIP,
        "the later fragment's source"
    );
    let answer = inspect(&reassemble(&first_out, &second_out));
    assert_eq!(answer.src, (VIP, 53));
    assert_eq!(answer.dst, (CLIENT, 40000));
    assert_eq!(dp.event("fragment"), 0);
}

#[test]
fn a_later_fragment_without_its_first_never_leaves_for_a_service_address_nor_opens_a_flow() {
    let mut dp = TestDatapath::new();
    dp.program(&[(udp(VIP, 53), vec![local(POD, 5353)])]);
    // Reordered: the later fragment first. It cannot be translated yet, and to a
    // service address it could only leave the node untranslated: dropped.
    let (first, second) = fragmented((CLIENT, 40001), (VIP, 53), 0x6161);
    let (verdict, out) = dp.xdp(&second);
    assert_eq!((verdict, out), (XDP_DROP, second.clone()));
    assert_eq!(dp.event("fragment_dropped"), 1);
    assert_eq!(dp.tables().conntrack.keys().count(), 0);
    // Its first fragment still opens the flow, and fragments of another datagram
    // (another IP id) of the same client are not mistaken for it.
    let (verdict, out) = dp.xdp(&first);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out[14 + 16..14 + 20], POD);
    let (_, stranger) = fragmented((CLIENT, 40001), (VIP, 53), 0x6262);
    let (verdict, out) = dp.xdp(&stranger);
    assert_eq!((verdict, out), (XDP_DROP, stranger));
    // From a pod too; and one to an address no service has passes untouched.
    let (_, from_pod) = fragmented(([10, 244, 1, 9], 40002), (VIP, 53), 0x6363);
    assert_eq!(dp.tc(&from_pod).0, TC_ACT_SHOT);
    assert_eq!(dp.event("fragment_dropped"), 3);
    let (_, elsewhere) = fragmented((CLIENT, 40001), ([192, 0, 2, 7], 53), 0x6464);
    let (verdict, out) = dp.xdp(&elsewhere);
    assert_eq!((verdict, out), (XDP_PASS, elsewhere));
    assert_eq!(dp.event("fragment"), 1);
}

/// A datagram of another protocol to a service address: its first fragment is
/// refused (as a whole packet of it would be), its later ones dropped, none leaves.
#[test]
fn every_fragment_of_another_protocol_to_a_service_address_stays_on_the_node() {
    const PROTO_GRE: u8 = 47;
    let mut dp = TestDatapath::new();
    dp.program(&[(udp(VIP, 53), vec![local(POD, 5353)])]);
    let gre = ip_packet(CLIENT, VIP, PROTO_GRE, &[0x5a; 2000]);
    let (first, second) = fragments(&gre, 1480, 0x6565);
    let (verdict, out) = dp.xdp(&first);
    assert_eq!(
        (verdict, out[23], out[34]),
        (XDP_PASS, 1, 3),
        "refused: ICMP unreachable"
    );
    let (verdict, out) = dp.xdp(&second);
    assert_eq!((verdict, out), (XDP_DROP, second));
    assert_eq!((dp.event("refused"), dp.event("fragment_dropped")), (1, 1));
}

/// A datagram of `size` bytes to `target` from `ns`, and the UDP test server's
/// answer (its greeting padded with dots to the question's size). socat sends each
/// read of its input as one datagram, so the question comes from a regular file,
/// read whole at once: from a pipe, socat could read (and send) whatever part the
/// writer had written so far, several datagrams whose answers add up to the size.
fn ask_large(ns: &testbed::netns::Netns, target: &str, size: usize) -> String {
    let question =
        std::env::temp_dir().join(format!("epx-frag-question-{}-{size}", std::process::id()));
    std::fs::write(&question, vec![b'q'; size]).expect("write the question");
    let answer = ns
        .command("socat")
        .args(["-b", "65536", "-T", "3", "-", &format!("UDP4:{target}")])
        .stdin(std::fs::File::open(&question).expect("open the question"))
        .output()
        .expect("socat");
    std::fs::remove_file(&question).expect("remove the question");
    String::from_utf8(answer.stdout).expect("a text answer")
}

/// Real datagrams of 4,000 bytes from a pod to a UDP ClusterIP: the client's kernel
/// fragments the question, the backend's the answer (the pod links' MTU is 1,500);
/// every fragment is translated both ways and both ends reassemble the datagrams.
#[test]
fn datagrams_larger_than_the_mtu_reach_a_udp_service_and_come_back_whole() {
    let cluster = Cluster::new("frag", 2, 0, |t| vec![dns(t, &["pod-a1"])]);
    let answer = ask_large(cluster.ns("pod-a2"), &format!("{DNS_VIP}:53"), 4000);
    assert_eq!(answer.len(), 4000, "{:?}", &answer[..answer.len().min(80)]);
    let (pod, seen_client) = parse_greeting(&answer).expect("a greeting");
    assert_eq!(pod, "pod-a1");
    assert_eq!(
        seen_client.ip(),
        std::net::IpAddr::V4(cluster.topology.pod("pod-a2").addr)
    );
    assert!(
        answer.trim_end().ends_with('.'),
        "padded to the question's size"
    );
}

/// 60,000-byte datagrams (41 fragments each way) through a ClusterIP from a pod, and
/// from outside through NodePorts to a local backend and to a remote one (masqueraded:
/// the answer's fragments come back through the uplink's XDP program).
#[test]
fn sixty_thousand_byte_datagrams_cross_cluster_ips_and_node_ports_whole() {
    let cluster = Cluster::new("frag60k", 2, 1, |t| {
        let mut local = dns(t, &["pod-a1"]);
        local.node_port = Some(30053);
        let mut remote =
            ServiceDef::new("dns-remote", Ipv4Addr::new(10, 96, 0, 54), "UDP", 53, 5353)
                .with_pods([t.pod("pod-b1")]);
        remote.node_port = Some(30054);
        vec![local, remote]
    });
    let client = &cluster.topology.client;
    for (path, ns, target, backend) in [
        (
            "ClusterIP from a pod",
            cluster.ns("pod-a2"),
            format!("{DNS_VIP}:53"),
            "pod-a1",
        ),
        (
            "NodePort, local backend",
            client,
            format!("{NODE_IP}:30053"),
            "pod-a1",
        ),
        (
            "NodePort, remote backend",
            client,
            format!("{NODE_IP}:30054"),
            "pod-b1",
        ),
    ] {
        let answer = ask_large(ns, &target, 60_000);
        assert_eq!(
            answer.len(),
            60_000,
            "{path}: {:?}",
            &answer[..answer.len().min(80)]
        );
        let (pod, _) = parse_greeting(&answer).expect("a greeting");
        assert_eq!(pod, backend, "{path}");
        // The greeting, then the padding to the question's size: byte for byte.
        assert!(
            answer.as_bytes()[200..].iter().all(|b| *b == b'.'),
            "{path}"
        );
    }
}
