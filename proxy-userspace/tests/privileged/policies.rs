//! Per-service policies the kernel enforces, packet by packet through
//! BPF_PROG_TEST_RUN: `sessionAffinity: ClientIP` and `loadBalancerSourceRanges`.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};
use testbed::Ipv4Octets as _;

use crate::support::{datapath::*, packets::*};
use ebpf_proxy::{
    model::{Endpoint, Frontend, FrontendKey, Protocol, SourceRange},
    trace::{explain, Origin},
};

const VIP: [u8; 4] = [10, 96, 0, 10];
const LB_IP: [u8; 4] = [198, 18, 100, 1];
const CLIENT: [u8; 4] = [198, 18, 0, 2];
const OTHER_CLIENT: [u8; 4] = [203, 0, 113, 5];

fn backends() -> Vec<Endpoint> {
    vec![
        local([10, 244, 1, 2], 8080),
        local([10, 244, 1, 3], 8080),
        local([10, 244, 1, 4], 8080),
    ]
}

fn frontend(affinity_timeout_s: u32, source_ranges: Option<Vec<SourceRange>>) -> Frontend {
    Frontend {
        service: "test/web".into(),
        external: source_ranges.is_some(),
        endpoints: backends(),
        affinity_timeout_s,
        source_ranges,
        ..Default::default()
    }
}

/// The backend a new connection from `client:port` to `dst` reaches, or `None` if it
/// was dropped.
fn connect(dp: &mut TestDatapath, client: [u8; 4], port: u16, dst: [u8; 4]) -> Option<[u8; 4]> {
    let (verdict, out) = dp.xdp(&tcp_packet((client, port), (dst, 80), Tcp::Syn, b""));
    (verdict == XDP_PASS).then(|| inspect(&out).dst.0)
}

fn backends_reached(
    dp: &mut TestDatapath,
    client: [u8; 4],
    ports: std::ops::Range<u16>,
) -> BTreeSet<[u8; 4]> {
    ports
        .map(|port| connect(dp, client, port, VIP).expect("translated"))
        .collect()
}

#[test]
fn without_affinity_one_client_is_spread_over_the_backends() {
    let mut dp = TestDatapath::new();
    dp.program_frontends(vec![(tcp(VIP, 80), frontend(0, None))]);
    assert_eq!(backends_reached(&mut dp, CLIENT, 40000..40006).len(), 3);
    assert_eq!(dp.event("affinity_hit"), 0);
}

#[test]
fn client_ip_affinity_keeps_a_client_on_one_backend_and_others_are_still_spread() {
    let mut dp = TestDatapath::new();
    dp.program_frontends(vec![(tcp(VIP, 80), frontend(3600, None))]);
    let first = backends_reached(&mut dp, CLIENT, 40000..40030);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(dp.event("affinity_hit"), 29);
    // Other clients are scheduled (rr moves on) and then stick to their own backend.
    let mut seen = BTreeSet::new();
    for n in 0..3u8 {
        let client = [203, 0, 113, 10 + n];
        let reached = backends_reached(&mut dp, client, 50000..50005);
        assert_eq!(reached.len(), 1);
        seen.extend(reached);
    }
    assert_eq!(seen.len(), 3, "rr still spreads new clients: {seen:?}");
}

#[test]
fn affinity_expires_after_its_timeout() {
    let mut dp = TestDatapath::new();
    dp.program_frontends(vec![(tcp(VIP, 80), frontend(1, None))]);
    let first = connect(&mut dp, CLIENT, 40000, VIP);
    assert_eq!(
        connect(&mut dp, CLIENT, 40001, VIP),
        first,
        "within the timeout"
    );
    // The timeout runs from the last new flow; the coarse clock ticks every few ms.
    std::thread::sleep(Duration::from_millis(1300));
    let later = connect(&mut dp, CLIENT, 40002, VIP);
    assert_ne!(later, first, "rr's next turn after the binding expired");
}

#[test]
fn a_client_bound_to_a_backend_that_left_is_scheduled_afresh() {
    let mut dp = TestDatapath::new();
    dp.program_frontends(vec![(tcp(VIP, 80), frontend(3600, None))]);
    let bound = connect(&mut dp, CLIENT, 40000, VIP).expect("translated");
    let mut remaining = frontend(3600, None);
    remaining.endpoints.retain(|e| e.addr.octets() != bound);
    dp.program_frontends(vec![(tcp(VIP, 80), remaining)]);
    let next = connect(&mut dp, CLIENT, 40001, VIP).expect("translated");
    assert_ne!(next, bound);
    // ...and is bound to the new one.
    assert_eq!(connect(&mut dp, CLIENT, 40002, VIP), Some(next));
}

fn range(text: &str) -> SourceRange {
    text.parse().expect("range")
}

fn lb(port: u16) -> FrontendKey {
    tcp(LB_IP, port)
}

#[test]
fn source_ranges_admit_listed_clients_and_drop_the_rest() {
    let mut dp = TestDatapath::new();
    dp.program_frontends(vec![
        (lb(80), frontend(0, Some(vec![range("198.18.0.0/24")]))),
        (tcp(VIP, 80), frontend(0, None)),
    ]);
    assert!(connect(&mut dp, CLIENT, 40000, LB_IP).is_some());
    assert_eq!(connect(&mut dp, OTHER_CLIENT, 40000, LB_IP), None);
    assert_eq!(dp.event("source_denied"), 1);
    // The ClusterIP of the same service is not restricted.
    assert!(connect(&mut dp, OTHER_CLIENT, 40001, VIP).is_some());

    // Widening the ranges admits the other client; an empty list admits nobody;
    // no list admits everybody.
    dp.program_frontends(vec![(
        lb(80),
        frontend(
            0,
            Some(vec![range("198.18.0.0/24"), range("203.0.113.0/28")]),
        ),
    )]);
    assert!(connect(&mut dp, OTHER_CLIENT, 40002, LB_IP).is_some());
    assert!(connect(&mut dp, [203, 0, 113, 16], 40002, LB_IP).is_none());
    dp.program_frontends(vec![(lb(80), frontend(0, Some(Vec::new())))]);
    assert!(connect(&mut dp, CLIENT, 40003, LB_IP).is_none());
    dp.program_frontends(vec![(lb(80), frontend(0, None))]);
    assert!(connect(&mut dp, [192, 0, 2, 1], 40004, LB_IP).is_some());
    // Nothing of the removed ranges is left in the map (beside the node-wide entry
    // of the tunnel peers).
    let left = dp
        .tables()
        .source_ranges
        .keys()
        .filter_map(Result::ok)
        .filter(|k| {
            ebpf_proxy::datapath::codec::source_range_id(k) != proxy_common::TUNNEL_PEERS_ID
        })
        .count();
    assert_eq!(left, 0);
}

#[test]
fn trace_explains_source_ranges_and_affinity_as_the_kernel_decides() {
    let mut dp = TestDatapath::new();
    dp.program_frontends(vec![
        (lb(80), frontend(0, Some(vec![range("198.18.0.0/24")]))),
        (tcp(VIP, 80), frontend(3600, None)),
    ]);
    let trace = |dp: &TestDatapath, src: [u8; 4], dst: [u8; 4]| {
        explain(
            &dp.tables(),
            &proxy_common::LoadSettings::DEFAULT,
            Protocol::Tcp,
            SocketAddr::from((src, 41000)),
            SocketAddr::from((dst, 80)),
            Origin::External,
        )
        .expect("trace")
    };
    let denied = trace(&dp, OTHER_CLIENT, LB_IP);
    assert!(denied.backend.is_none(), "{:?}", denied.steps);
    assert!(
        denied.steps.iter().any(|s| s.contains("source_denied")),
        "{:?}",
        denied.steps
    );
    assert!(trace(&dp, CLIENT, LB_IP).backend.is_some());

    // Once the client has a flow, the trace predicts the bound backend, which a new
    // connection indeed reaches.
    let bound = connect(&mut dp, CLIENT, 40000, VIP).expect("translated");
    let explained = trace(&dp, CLIENT, VIP);
    assert!(
        explained
            .steps
            .iter()
            .any(|s| s.contains("sessionAffinity")),
        "{:?}",
        explained.steps
    );
    assert_eq!(explained.backend.map(|b| b.ip().octets()), Some(bound));
    assert_eq!(connect(&mut dp, CLIENT, 40001, VIP), Some(bound));
}
