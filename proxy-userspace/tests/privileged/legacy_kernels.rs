//! Issue 16: the data path's object for kernels 5.10 to 5.17 (proxy-ebpf's
//! `legacy.rs`), loaded on this kernel so that its fallbacks run on every CI run at
//! full speed: least-connection scans in bounded loops instead of `bpf_loop`,
//! counters and accounting transitions without fetching atomics, the precise clock.
//! The same assertions as for the current object, from the modules that own them.
//! The kernel matrix (`kernel_matrix`) runs it on a real 5.10.

use crate::{accounting, datapath, schedulers, support::datapath::TestDatapath};

#[test]
fn least_connection_schedulers_choose_as_with_bpf_loop() {
    accounting::lc_sends_new_flows_to_the_backend_with_fewest_active_ones_on(TestDatapath::legacy);
    accounting::half_open_flows_count_inactive_and_spread_lc_as_in_ipvs_on(TestDatapath::legacy);
    // The legacy object translates IPv4 only (README, "Kernels").
    let [v4, _] = crate::support::families::nets();
    schedulers::wlc_and_sed_weigh_active_flows_on(TestDatapath::legacy, &v4);
    schedulers::nq_prefers_an_idle_backend_whatever_its_weight_on(TestDatapath::legacy, &v4);
}

#[test]
fn counts_and_turns_move_without_fetching_atomics() {
    accounting::a_connection_closed_from_both_sides_is_counted_once_on(TestDatapath::legacy);
    datapath::round_robin_is_exact_and_conntrack_keeps_each_flow_on_its_backend_on(
        TestDatapath::legacy,
    );
}

/// The legacy scan compares only `MAX_LEAST_CONN_SCAN_LEGACY` backends per flow, from
/// a start that rotates one slot per flow: over 20 new flows, each of 20 idle
/// backends still gets one.
#[test]
fn the_scan_covers_every_backend_over_successive_flows() {
    use ebpf_proxy::model::Scheduler;

    use crate::{
        schedulers::{backends, count_choices, open, VIP},
        support::datapath::tcp,
    };
    let mut dp = TestDatapath::legacy();
    dp.program_with(Scheduler::Lc, &[(tcp(VIP, 80), backends(20))]);
    let spread = count_choices((0..20).map(|i| open(&mut dp, [198, 18, 0, 2], 1000 + i, VIP)));
    assert_eq!(spread.len(), 20, "{spread:?}");
}

/// The agent told to load the legacy object serves pods, outside clients and the
/// node's own sockets; a node-local connect() to a port no frontend has fails with
/// EPERM, the only error a socket hook can give without `bpf_set_retval`.
#[test]
fn an_agent_on_the_legacy_object_serves_every_attach_point() {
    use testbed::topology::NODE_IP;

    use crate::support::{cluster::*, services::*};

    let cluster = Cluster::with_agent_args(
        "legacy",
        3,
        0,
        |t| {
            let mut service = web(t, &["pod-a1", "pod-a2"]);
            service.node_port = Some(NODE_PORT);
            vec![service]
        },
        &["--datapath", "legacy"],
    );
    let node = &cluster.topology.node;
    for (ns, url) in [
        (cluster.ns("pod-a3"), format!("http://{WEB_VIP}/")),
        (
            &cluster.topology.client,
            format!("http://{NODE_IP}:{NODE_PORT}/"),
        ),
        (node, format!("http://{WEB_VIP}/")),
    ] {
        let bodies = curl_n(ns, &url, 4);
        assert_eq!(tally(&bodies).len(), 2, "{url}: {bodies:?}");
    }
    let refused = node
        .command("socat")
        .args(["-T1", "-", &format!("TCP4:{WEB_VIP}:81")])
        .output()
        .expect("socat");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("Operation not permitted"), "{said}");
}
