//! Connection accounting, as the least-connection schedulers and `list` read it:
//! flows counted active once established and inactive while half-open or closing (as
//! IPVS counts them), each transition once, never below zero, whatever the order of
//! endpoint removal, re-addition and flow close; and a drifted counter reconciled
//! from the conntrack table by the agent's GC.

use ebpf_proxy::{datapath::mmap::MappedArray, model::Scheduler};
use proxy_common::{map_name, ConnCounts};
use testbed::Ipv4Octets as _;

use crate::{
    schedulers::{backends, count_choices, established, open, VIP},
    support::{datapath::*, packets::*},
};

fn counts(dp: &TestDatapath, backend: u8) -> (u64, u64) {
    let listing = ebpf_proxy::listing::read(&dp.pin_dir).expect("list");
    let row = listing.services[0]
        .backends
        .iter()
        .find(|b| b.endpoint.addr.octets()[3] == backend)
        .expect("backend listed");
    (row.active, row.inactive)
}

#[test]
fn lc_sends_new_flows_to_the_backend_with_fewest_active_ones() {
    lc_sends_new_flows_to_the_backend_with_fewest_active_ones_on(TestDatapath::new);
}

/// Also run on the legacy object (`legacy_kernels`).
pub(crate) fn lc_sends_new_flows_to_the_backend_with_fewest_active_ones_on(
    load: fn() -> TestDatapath,
) {
    let mut dp = load();
    dp.program_with(Scheduler::Lc, &[(tcp(VIP, 80), backends(3))]);
    let client = [198, 18, 0, 2];
    // Three open flows land on three different backends.
    let first: Vec<u8> = (0..3)
        .map(|i| established(&mut dp, client, 1000 + i))
        .collect();
    assert_eq!(count_choices(first.clone()).len(), 3, "{first:?}");
    // Six more: still balanced, two each.
    let more = count_choices((0..6).map(|i| established(&mut dp, client, 2000 + i)));
    assert!(more.values().all(|c| *c == 2), "{more:?}");
    // Close the first flow (a reset from the client): its backend is now the least loaded.
    let closed = first[0];
    let _ = dp.xdp(&tcp_packet((client, 1000), (VIP, 80), Tcp::Rst, b""));
    assert_eq!(
        counts(&dp, closed),
        (2, 1),
        "active, inactive after the reset"
    );
    assert_eq!(open(&mut dp, client, 3000, VIP), closed);
}

#[test]
fn half_open_flows_count_inactive_and_spread_lc_as_in_ipvs() {
    half_open_flows_count_inactive_and_spread_lc_as_in_ipvs_on(TestDatapath::new);
}

/// Also run on the legacy object (`legacy_kernels`).
pub(crate) fn half_open_flows_count_inactive_and_spread_lc_as_in_ipvs_on(
    load: fn() -> TestDatapath,
) {
    let mut dp = load();
    dp.program_with(Scheduler::Lc, &[(tcp(VIP, 80), backends(3))]);
    // SYNs only: half-open, inactive; IPVS's lc overhead (256 active + inactive)
    // still spreads them.
    let spread = count_choices((0..6).map(|i| open(&mut dp, [198, 18, 0, 2], 1000 + i, VIP)));
    assert!(spread.values().all(|c| *c == 2), "{spread:?}");
    assert_eq!(counts(&dp, 1), (0, 2));
    // One established flow outweighs any number of half-open ones.
    let busy = established(&mut dp, [198, 18, 0, 3], 1000);
    assert_eq!(counts(&dp, busy), (1, 2));
    let next = count_choices((0..4).map(|i| open(&mut dp, [198, 18, 0, 2], 2000 + i, VIP)));
    assert!(!next.contains_key(&busy), "{next:?}");
}

#[test]
fn a_connection_closed_from_both_sides_is_counted_once() {
    a_connection_closed_from_both_sides_is_counted_once_on(TestDatapath::new);
}

/// Also run on the legacy object (`legacy_kernels`).
pub(crate) fn a_connection_closed_from_both_sides_is_counted_once_on(load: fn() -> TestDatapath) {
    let mut dp = load();
    dp.program_with(Scheduler::Lc, &[(tcp(VIP, 80), backends(1))]);
    let client = ([198, 18, 0, 2], 1000);
    let backend = dp.establish(client, (VIP, 80)).dst;
    assert_eq!(backend, ([10, 244, 1, 1], 8080));
    assert_eq!(counts(&dp, 1), (1, 0), "established");
    let _ = dp.xdp(&tcp_packet(client, (VIP, 80), Tcp::Fin, b""));
    assert_eq!(counts(&dp, 1), (1, 0), "one FIN: still open");
    let _ = dp.tc(&tcp_packet(backend, client, Tcp::Fin, b""));
    assert_eq!(counts(&dp, 1), (0, 1));
    // More closing packets (retransmissions, a reset) do not count it again.
    let _ = dp.xdp(&tcp_packet(client, (VIP, 80), Tcp::Rst, b""));
    let _ = dp.tc(&tcp_packet(backend, client, Tcp::Fin, b""));
    assert_eq!(counts(&dp, 1), (0, 1));
}

#[test]
fn a_backend_removed_and_readded_with_a_flow_open_keeps_its_count() {
    let mut dp = TestDatapath::new();
    let [a, b] = [local([10, 244, 1, 1], 8080), local([10, 244, 1, 2], 8080)];
    let program = |dp: &mut TestDatapath, endpoints: &[_]| {
        dp.program_with(Scheduler::Lc, &[(tcp(VIP, 80), endpoints.to_vec())])
    };
    program(&mut dp, &[a]);
    let client = ([198, 18, 0, 2], 1000);
    assert_eq!(dp.establish(client, (VIP, 80)).dst.0[3], 1);
    program(&mut dp, &[a, b]);
    program(&mut dp, &[b]);
    program(&mut dp, &[a, b]);
    assert_eq!(
        counts(&dp, 1),
        (1, 0),
        "the returning backend's open flow counts"
    );
    // lc sees it busy: the next two flows go to the idle one first.
    assert_eq!(established(&mut dp, [198, 18, 0, 3], 1000), 2);
    // The flow closes: counted once, and never below zero.
    let _ = dp.xdp(&tcp_packet(client, (VIP, 80), Tcp::Rst, b""));
    assert_eq!(counts(&dp, 1), (0, 1));
}

#[test]
fn a_departed_backends_id_is_not_given_to_another_while_its_flows_live() {
    let mut dp = TestDatapath::new();
    let [a, b, c] = [1, 2, 3].map(|i| local([10, 244, 1, i], 8080));
    dp.program_with(Scheduler::Lc, &[(tcp(VIP, 80), vec![a])]);
    let old_flow = ([198, 18, 0, 2], 1000);
    dp.establish(old_flow, (VIP, 80));
    // a leaves for good; b arrives, then c, and each gets a flow of its own.
    dp.program_with(Scheduler::Lc, &[(tcp(VIP, 80), vec![b])]);
    dp.program_with(Scheduler::Lc, &[(tcp(VIP, 80), vec![b, c])]);
    let spread =
        count_choices((1000..1002).map(|port| established(&mut dp, [198, 18, 0, 3], port)));
    assert_eq!(spread.len(), 2, "{spread:?}");
    let before = [counts(&dp, 2), counts(&dp, 3)];
    // a's flow ends: nothing it does may move b's or c's counts.
    let _ = dp.xdp(&tcp_packet(old_flow, (VIP, 80), Tcp::Rst, b""));
    assert_eq!([counts(&dp, 2), counts(&dp, 3)], before);
    let entry = dp.entry(old_flow, (VIP, 80)).expect("a's flow is tracked");
    let original = ct_key(old_flow, (VIP, 80));
    let reply = original.peer(&entry);
    let listed: Vec<u32> = dp
        .tables()
        .conntrack
        .iter()
        .filter_map(Result::ok)
        .filter(|(key, _)| *key != original && *key != reply)
        .map(|(_, e)| e.backend_id)
        .collect();
    assert!(
        !listed.contains(&entry.backend_id),
        "a's id {} went to another backend",
        entry.backend_id
    );
}

#[test]
fn a_drifted_counter_is_reconciled_from_conntrack() {
    let mut dp = TestDatapath::new();
    dp.program_with(Scheduler::Lc, &[(tcp(VIP, 80), backends(2))]);
    let client = ([198, 18, 0, 2], 1000);
    let backend = dp.establish(client, (VIP, 80)).dst.0[3];
    let id = dp.entry(client, (VIP, 80)).expect("tracked").backend_id;
    // A drift, as an eviction or a crash would leave: 5 active flows too many.
    let counters =
        MappedArray::<ConnCounts>::open(&dp.pin_dir, map_name::CONN_COUNTS).expect("counts");
    counters.adjust(id, 5, 0);
    let other = 3 - backend;
    let (report, corrected) = dp.syncer.collect_conntrack().expect("gc");
    assert_eq!(report.census.counted[&id].active, 1);
    assert_eq!(corrected, 0, "one pass only suspects");
    assert_eq!(counts(&dp, backend), (6, 0));
    let (_, corrected) = dp.syncer.collect_conntrack().expect("gc");
    assert_eq!(corrected, 1, "the second pass confirms and corrects");
    assert_eq!(counts(&dp, backend), (1, 0));
    assert_eq!(counts(&dp, other), (0, 0));
}
