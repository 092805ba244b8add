//! The data path's behaviour, packet by packet, through BPF_PROG_TEST_RUN on the real
//! programs in the real kernel (root and a mounted bpffs required).

use std::collections::BTreeMap;

use proxy_common::{LoadSettings, TIMEOUT_UDP};
use testbed::Ipv4Octets as _;

use crate::support::{datapath::*, packets::*};

const VIP: [u8; 4] = [10, 96, 0, 10];
const CLIENT: [u8; 4] = [198, 18, 0, 2];
const POD_A: [u8; 4] = [10, 244, 1, 2];
const POD_B: [u8; 4] = [10, 244, 1, 3];
const POD_C: [u8; 4] = [10, 244, 1, 4];
const REMOTE_POD: [u8; 4] = [10, 244, 2, 2];

fn three_backends() -> Vec<ebpf_proxy::model::Endpoint> {
    vec![local(POD_A, 8080), local(POD_B, 8080), local(POD_C, 8080)]
}

#[test]
fn a_service_packet_is_translated_to_a_backend_with_valid_checksums() {
    let mut dp = TestDatapath::new();
    dp.program(&[(tcp(VIP, 80), three_backends())]);
    let packet = tcp_packet((CLIENT, 40000), (VIP, 80), Tcp::Syn, b"");
    let (verdict, out) = dp.xdp(&packet);
    assert_eq!(verdict, XDP_PASS);
    let seen = inspect(&out);
    assert_eq!(
        seen.src,
        (CLIENT, 40000),
        "no masquerade for a local backend"
    );
    assert!(
        three_backends()
            .iter()
            .any(|e| seen.dst == (e.addr.octets(), e.port)),
        "{seen:?}"
    );
}

/// (Another port of a service address is refused instead: see `refusals`.)
#[test]
fn a_packet_for_no_service_address_passes_byte_for_byte() {
    let mut dp = TestDatapath::new();
    dp.program(&[(tcp(VIP, 80), three_backends())]);
    for packet in [
        tcp_packet((CLIENT, 40000), ([10, 96, 0, 11], 80), Tcp::Syn, b"x"),
        udp_packet((CLIENT, 40000), ([10, 96, 0, 12], 80), b"x"),
    ] {
        let (verdict, out) = dp.xdp(&packet);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out, packet);
    }
}

#[test]
fn replies_are_reverse_translated_to_the_service_address() {
    let mut dp = TestDatapath::new();
    dp.program(&[(tcp(VIP, 80), vec![local(POD_A, 8080)])]);
    let (_, out) = dp.xdp(&tcp_packet((CLIENT, 40000), (VIP, 80), Tcp::Syn, b""));
    assert_eq!(inspect(&out).dst, (POD_A, 8080));
    // The backend pod answers on its own interface (tc ingress).
    let reply = tcp_packet((POD_A, 8080), (CLIENT, 40000), Tcp::SynAck, b"");
    let (verdict, out) = dp.tc(&reply);
    assert_eq!(verdict, TC_ACT_OK);
    let seen = inspect(&out);
    assert_eq!(seen.src, (VIP, 80));
    assert_eq!(seen.dst, (CLIENT, 40000));
}

#[test]
fn round_robin_is_exact_and_conntrack_keeps_each_flow_on_its_backend() {
    round_robin_is_exact_and_conntrack_keeps_each_flow_on_its_backend_on(TestDatapath::new);
}

/// Also run on the legacy object (`legacy_kernels`).
pub(crate) fn round_robin_is_exact_and_conntrack_keeps_each_flow_on_its_backend_on(
    load: fn() -> TestDatapath,
) {
    let mut dp = load();
    dp.program(&[(tcp(VIP, 80), three_backends())]);
    let mut per_backend: BTreeMap<([u8; 4], u16), usize> = BTreeMap::new();
    let mut chosen = Vec::new();
    for port in 0..300u16 {
        let (_, out) = dp.xdp(&tcp_packet(
            (CLIENT, 20000 + port),
            (VIP, 80),
            Tcp::Syn,
            b"",
        ));
        let dst = inspect(&out).dst;
        *per_backend.entry(dst).or_default() += 1;
        chosen.push(dst);
    }
    assert_eq!(
        per_backend.values().copied().collect::<Vec<_>>(),
        vec![100, 100, 100]
    );
    // Later packets of every flow stay where the first went, whatever rr says now.
    for (port, first) in (0..300u16).zip(&chosen) {
        let packet = tcp_packet((CLIENT, 20000 + port), (VIP, 80), Tcp::Ack, b"data");
        assert_eq!(inspect(&dp.xdp(&packet).1).dst, *first);
    }
    let listing = ebpf_proxy::listing::read(&dp.pin_dir).expect("list");
    assert_eq!(listing.services[0].stats.connections, 300);
    assert_eq!(listing.services[0].stats.packets_in, 600);
}

#[test]
fn external_traffic_to_a_remote_backend_is_masqueraded_and_replies_restored() {
    let mut dp = TestDatapath::new();
    dp.program(&[(
        node_port(30080, ebpf_proxy::model::Protocol::Tcp),
        vec![remote(REMOTE_POD, 8080)],
    )]);
    let node_ip = NODE_IP.octets();
    let (verdict, out) = dp.xdp(&tcp_packet(
        (CLIENT, 40000),
        (node_ip, 30080),
        Tcp::Syn,
        b"",
    ));
    assert_eq!(verdict, XDP_PASS);
    let seen = inspect(&out);
    assert_eq!(seen.dst, (REMOTE_POD, 8080));
    assert_eq!(seen.src.0, node_ip, "masqueraded to the node address");
    // The remote backend's answer comes back through the uplink.
    let reply = tcp_packet(seen.dst, seen.src, Tcp::SynAck, b"");
    let (_, out) = dp.xdp(&reply);
    let back = inspect(&out);
    assert_eq!(back.src, (node_ip, 30080));
    assert_eq!(back.dst, (CLIENT, 40000));
}

#[test]
fn external_traffic_to_a_local_backend_keeps_the_client_address() {
    let mut dp = TestDatapath::new();
    dp.program(&[(
        node_port(30080, ebpf_proxy::model::Protocol::Tcp),
        vec![local(POD_A, 8080)],
    )]);
    let (_, out) = dp.xdp(&tcp_packet(
        (CLIENT, 40000),
        (NODE_IP.octets(), 30080),
        Tcp::Syn,
        b"",
    ));
    assert_eq!(inspect(&out).src, (CLIENT, 40000));
}

#[test]
fn a_node_port_answers_only_on_node_addresses() {
    let mut dp = TestDatapath::new();
    dp.program(&[(
        node_port(30080, ebpf_proxy::model::Protocol::Tcp),
        vec![local(POD_A, 8080)],
    )]);
    let packet = tcp_packet((CLIENT, 40000), ([198, 18, 0, 99], 30080), Tcp::Syn, b"");
    assert_eq!(dp.xdp(&packet).1, packet);
}

#[test]
fn hairpin_from_a_pod_to_its_own_service_is_masqueraded() {
    let mut dp = TestDatapath::new();
    dp.program(&[(tcp(VIP, 80), vec![local(POD_A, 8080)])]);
    let (verdict, out) = dp.tc(&tcp_packet((POD_A, 50000), (VIP, 80), Tcp::Syn, b""));
    assert_eq!(verdict, TC_ACT_OK);
    let seen = inspect(&out);
    assert_eq!(seen.dst, (POD_A, 8080));
    assert_eq!(
        seen.src.0,
        NODE_IP.octets(),
        "hairpin must not keep the pod's own address"
    );
    let (_, out) = dp.tc(&tcp_packet(seen.dst, seen.src, Tcp::SynAck, b""));
    let back = inspect(&out);
    assert_eq!((back.src, back.dst), ((VIP, 80), (POD_A, 50000)));
}

#[test]
fn a_pod_reaching_another_pod_through_a_service_keeps_its_address() {
    let mut dp = TestDatapath::new();
    dp.program(&[(tcp(VIP, 80), vec![local(POD_B, 8080)])]);
    let (_, out) = dp.tc(&tcp_packet((POD_A, 50000), (VIP, 80), Tcp::Syn, b""));
    assert_eq!(inspect(&out).src, (POD_A, 50000));
}

#[test]
fn a_mid_flow_segment_without_conntrack_is_rehashed_deterministically() {
    let mut dp = TestDatapath::new();
    dp.program(&[(tcp(VIP, 80), three_backends())]);
    let packet = tcp_packet((CLIENT, 40123), (VIP, 80), Tcp::Ack, b"late");
    let first = inspect(&dp.xdp(&packet).1).dst;
    // Losing the entry (eviction, flush) must lead to the same answer every time.
    dp.flush_conntrack();
    let again = inspect(&dp.xdp(&packet).1).dst;
    assert_eq!(first, again);
    assert_eq!(dp.event("ct_midflow_miss"), 2);
}

#[test]
fn a_reset_for_an_unknown_flow_is_dropped_without_creating_state() {
    let mut dp = TestDatapath::new();
    dp.program(&[(tcp(VIP, 80), three_backends())]);
    let (verdict, _) = dp.xdp(&tcp_packet((CLIENT, 40000), (VIP, 80), Tcp::Rst, b""));
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(dp.tables().conntrack.keys().count(), 0);
}

#[test]
fn udp_is_translated_and_a_zero_checksum_stays_zero() {
    let mut dp = TestDatapath::new();
    dp.program(&[(udp(VIP, 53), vec![local(POD_A, 5353)])]);
    let packet = udp_packet((CLIENT, 40000), (VIP, 53), b"query");
    let (_, out) = dp.xdp(&packet);
    assert_eq!(inspect(&out).dst, (POD_A, 5353));
    // The same datagram without a checksum ("none" in IPv4).
    let mut no_checksum = udp_packet((CLIENT, 40001), (VIP, 53), b"query");
    let at = 14 + 20 + 6;
    no_checksum[at..at + 2].copy_from_slice(&[0, 0]);
    let (_, out) = dp.xdp(&no_checksum);
    assert_eq!(&out[at..at + 2], &[0, 0]);
    assert_eq!(inspect(&out).dst, (POD_A, 5353));
}

#[test]
fn an_expired_udp_entry_is_replaced_by_a_new_choice() {
    // A one-second UDP timeout: an entry aged to time 0 is then expired on a machine
    // up for longer (a freshly booted guest of the kernel matrix is up for less than
    // the default's 60 s).
    let mut settings = LoadSettings::DEFAULT;
    settings.ct_timeouts.ns[TIMEOUT_UDP] = 1_000_000_000;
    let mut dp = TestDatapath::with_settings(settings);
    dp.program(&[(udp(VIP, 53), vec![local(POD_A, 53), local(POD_B, 53)])]);
    let packet = udp_packet((CLIENT, 40000), (VIP, 53), b"q");
    let first = inspect(&dp.xdp(&packet).1).dst;
    assert_eq!(
        inspect(&dp.xdp(&packet).1).dst,
        first,
        "tracked while fresh"
    );
    // Age every entry past the UDP timeout.
    let mut tables = dp.tables();
    let entries: Vec<_> = tables.conntrack.iter().filter_map(Result::ok).collect();
    for (key, mut entry) in entries {
        entry.last_seen_ns = 0;
        tables.conntrack.insert(key, entry, 0).expect("age entry");
    }
    assert_ne!(
        inspect(&dp.xdp(&packet).1).dst,
        first,
        "rr moves an expired flow on"
    );
}

#[test]
fn malformed_and_fragmented_packets_pass_untouched() {
    let mut dp = TestDatapath::new();
    dp.program(&[(tcp(VIP, 80), three_backends())]);
    let good = tcp_packet((CLIENT, 40000), (VIP, 80), Tcp::Syn, b"payload");
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated in the IP header", good[..14 + 10].to_vec()),
        ("truncated in the TCP header", good[..14 + 20 + 8].to_vec()),
    ];
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x43; // IHL 3 (< 5 words)
    cases.push(("IHL below minimum", bad_ihl));
    let mut ihl_past_end = good.clone();
    ihl_past_end[14] = 0x4f; // 60-byte header: the TCP header would start past the data
    cases.push(("IHL past the packet", ihl_past_end));
    // A later fragment whose first was never seen, to an address no service has
    // (fragments of tracked flows are translated, and untracked ones to a service
    // address dropped: see `fragments`).
    let mut later_fragment = tcp_packet((CLIENT, 40000), ([192, 0, 2, 7], 80), Tcp::Syn, b"");
    later_fragment[14 + 7] = 0x10; // offset 16*8
    cases.push(("later fragment", later_fragment));
    for (what, packet) in cases {
        let (verdict, out) = dp.xdp(&packet);
        assert_eq!(verdict, XDP_PASS, "{what}");
        assert_eq!(out, packet, "{what}: must not be rewritten");
    }
    assert_eq!(
        dp.tables().conntrack.keys().count(),
        0,
        "garbage must not create state"
    );
    assert!(dp.event("malformed") >= 3);
    assert_eq!(dp.event("fragment"), 1);
}

#[test]
fn ip_options_are_skipped_to_find_the_ports() {
    let mut dp = TestDatapath::new();
    dp.program(&[(tcp(VIP, 80), vec![local(POD_A, 8080)])]);
    let plain = tcp_packet((CLIENT, 40000), (VIP, 80), Tcp::Syn, b"");
    // Insert 4 bytes of options (NOPs + end) after the 20-byte IPv4 header.
    let mut packet = plain[..34].to_vec();
    packet.extend_from_slice(&[1, 1, 1, 0]);
    packet.extend_from_slice(&plain[34..]);
    packet[14] = 0x46;
    let total = u16::from_be_bytes([packet[16], packet[17]]) + 4;
    packet[16..18].copy_from_slice(&total.to_be_bytes());
    let mut header = etherparse::Ipv4HeaderSlice::from_slice(&packet[14..])
        .expect("ip")
        .to_header();
    header.header_checksum = header.calc_header_checksum();
    packet[24..26].copy_from_slice(&header.header_checksum.to_be_bytes());
    let (_, out) = dp.xdp(&packet);
    assert_eq!(inspect(&out).dst, (POD_A, 8080));
}

#[test]
fn a_full_conntrack_evicts_old_flows_and_keeps_translating_new_ones() {
    let sizes = ebpf_proxy::datapath::loader::MapSizes {
        conntrack: 128,
        ..Default::default()
    };
    let mut dp = TestDatapath::with_sizes(sizes);
    dp.program(&[(tcp(VIP, 80), three_backends())]);
    for port in 0..1000u16 {
        let (verdict, out) = dp.xdp(&tcp_packet(
            (CLIENT, 10_000 + port),
            (VIP, 80),
            Tcp::Syn,
            b"",
        ));
        assert_eq!(verdict, XDP_PASS);
        assert_ne!(inspect(&out).dst.0, VIP, "flow {port} not translated");
    }
    assert!(dp.tables().conntrack.keys().count() <= 128);
    assert_eq!(
        dp.event("ct_insert_failed"),
        0,
        "an LRU evicts instead of failing"
    );
}

/// Issue 17, connection reuse: a client that reuses a closed flow's tuple for a new
/// connection (its SYN on the closing entry) opens a new flow, scheduled afresh (rr
/// moves on to the other backend) and counted once, as IPVS's `conn_reuse_mode` 1.
#[test]
fn a_syn_reusing_a_closing_tuple_is_scheduled_afresh_and_counted() {
    let mut dp = TestDatapath::new();
    dp.program(&[(tcp(VIP, 80), vec![local(POD_A, 8080), local(POD_B, 8080)])]);
    let (client, frontend) = ((CLIENT, 40000), (VIP, 80));
    let first = close_after_one_connection(&mut dp, client, frontend);
    let explained = ebpf_proxy::trace::explain(
        &dp.tables(),
        &LoadSettings::DEFAULT,
        ebpf_proxy::model::Protocol::Tcp,
        std::net::SocketAddr::from(client),
        std::net::SocketAddr::from(frontend),
        ebpf_proxy::trace::Origin::External,
    )
    .expect("trace");
    assert!(
        explained
            .steps
            .iter()
            .any(|s| s.contains("scheduled afresh")),
        "trace says what a SYN does: {:?}",
        explained.steps
    );
    let (_, out) = dp.xdp(&tcp_packet(client, frontend, Tcp::Syn, b""));
    let second = inspect(&out).dst;
    assert_ne!(second, first, "rr's next backend, not the closed flow's");
    assert_eq!(
        dp.entry(client, frontend).map(|e| e.state),
        Some(proxy_common::CT_SYN_SENT),
        "a new, half-open flow"
    );
    // A retransmitted SYN of that connection is not another one.
    let (_, out) = dp.xdp(&tcp_packet(client, frontend, Tcp::Syn, b""));
    assert_eq!(inspect(&out).dst, second);
    let listing = ebpf_proxy::listing::read(&dp.pin_dir).expect("list");
    let service = &listing.services[0];
    assert_eq!(service.stats.connections, 2);
    // The closed flow is no longer counted on its backend; the new one is, half-open.
    let counts: Vec<(u64, u64)> = service
        .backends
        .iter()
        .map(|b| (b.active, b.inactive))
        .collect();
    assert_eq!(
        counts.iter().map(|(a, i)| a + i).sum::<u64>(),
        1,
        "{counts:?}"
    );
}

/// Kube-proxy's IPVS port-reuse trouble: a new connection on a closed flow's tuple went
/// to the closed flow's backend, also after the service dropped it. It goes to a
/// backend the service has now.
#[test]
fn a_reused_tuple_never_reaches_a_backend_the_service_dropped() {
    let mut dp = TestDatapath::new();
    dp.program(&[(tcp(VIP, 80), vec![local(POD_A, 8080)])]);
    let (client, frontend) = ((CLIENT, 40001), (VIP, 80));
    let first = close_after_one_connection(&mut dp, client, frontend);
    assert_eq!(first.0, POD_A);
    dp.program(&[(tcp(VIP, 80), vec![local(POD_B, 8080)])]);
    let (_, out) = dp.xdp(&tcp_packet(client, frontend, Tcp::Syn, b""));
    assert_eq!(inspect(&out).dst.0, POD_B, "the service's backend now");
}

/// Establishes one connection from `client`, closes it with FINs both ways, and
/// returns the backend it had.
fn close_after_one_connection(
    dp: &mut TestDatapath,
    client: ([u8; 4], u16),
    frontend: ([u8; 4], u16),
) -> ([u8; 4], u16) {
    let flow = dp.establish(client, frontend);
    dp.xdp(&tcp_packet(client, frontend, Tcp::Fin, b""));
    dp.tc(&tcp_packet(flow.dst, client, Tcp::Fin, b""));
    assert_eq!(
        dp.entry(client, frontend).map(|e| e.state),
        Some(proxy_common::CT_CLOSING)
    );
    flow.dst
}
