//! Conntrack under forged traffic: a flow is established only when both ends have
//! answered, so spoofed SYNs and stray segments leave half-open entries that do not
//! count as active and expire on the short SYN timeout; and one CPU's burst of new
//! flows does not evict the established flows of others while the table has room.
//! Byte by byte with BPF_PROG_TEST_RUN, and end to end with a real flood on the wire.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use ebpf_proxy::{
    conntrack,
    datapath::{loader::MapSizes, tables::Tables},
    model::Scheduler,
};
use proxy_common::CT_TIMEOUT_SYN_S;
use testbed::{eventually, servers::HttpConnection, topology::NODE_IP};

use crate::{
    schedulers::{backends, VIP},
    support::{
        cluster::Cluster,
        datapath::*,
        packets::*,
        services::{web, NODE_PORT},
        traffic::{spoofed_syns, StopOnDrop},
    },
};

fn states(dp: &TestDatapath) -> BTreeMap<&'static str, usize> {
    states_in(&dp.tables())
}

fn states_in(tables: &Tables) -> BTreeMap<&'static str, usize> {
    let mut tally = BTreeMap::new();
    for flow in conntrack::flows(tables) {
        *tally
            .entry(flow.expect("conntrack list").state)
            .or_default() += 1;
    }
    tally
}

/// (active, inactive) summed over the first service's backends.
fn totals(dp: &TestDatapath) -> (u64, u64) {
    let listing = ebpf_proxy::listing::read(&dp.pin_dir).expect("list");
    listing.services[0]
        .backends
        .iter()
        .fold((0, 0), |(a, i), b| (a + b.active, i + b.inactive))
}

/// Makes every tracked flow look `seconds` older, as if that much time had passed.
fn age(dp: &TestDatapath, seconds: u64) {
    age_in(&mut dp.tables(), seconds);
}

fn age_in(tables: &mut Tables, seconds: u64) {
    let entries: Vec<_> = tables.conntrack.iter().filter_map(Result::ok).collect();
    for (key, mut entry) in entries {
        entry.last_seen_ns -= seconds * 1_000_000_000;
        tables
            .conntrack
            .insert(key, entry, 0)
            .expect("age an entry");
    }
}

#[test]
fn a_spoofed_syn_flood_leaves_half_open_flows_that_do_not_count_and_expire() {
    let mut dp = TestDatapath::new();
    dp.program_with(Scheduler::Lc, &[(tcp(VIP, 80), backends(2))]);
    // Forged sources: the backends answer every SYN, nobody acknowledges.
    for i in 0..200u16 {
        let spoofed = ([203, 0, 113, (i % 250) as u8], 20_000 + i);
        let (_, out) = dp.xdp(&tcp_packet(spoofed, (VIP, 80), Tcp::Syn, b""));
        let backend = inspect(&out).dst;
        let _ = dp.tc(&tcp_packet(backend, spoofed, Tcp::SynAck, b""));
    }
    let real = ([198, 18, 0, 2], 1000);
    dp.establish(real, (VIP, 80));
    assert_eq!(
        states(&dp),
        BTreeMap::from([("ESTABLISHED", 1), ("SYN_RECV", 200)])
    );
    assert_eq!(totals(&dp), (1, 200), "only the real flow is active");
    // The SYN timeout passes: the half-open flows go, the real one stays.
    age(&dp, CT_TIMEOUT_SYN_S + 1);
    let (report, _) = dp.syncer.collect_conntrack().expect("gc");
    assert_eq!(report.expired, 400, "both entries of each half-open flow");
    assert_eq!(states(&dp), BTreeMap::from([("ESTABLISHED", 1)]));
    assert_eq!(totals(&dp), (1, 0));
}

#[test]
fn a_segment_without_a_handshake_is_established_only_by_the_backends_answer() {
    let mut dp = TestDatapath::new();
    dp.program_with(Scheduler::Lc, &[(tcp(VIP, 80), backends(2))]);
    // A forged mid-stream segment: the backend does not know it and resets.
    let forged = ([203, 0, 113, 7], 30_000);
    let (_, out) = dp.xdp(&tcp_packet(forged, (VIP, 80), Tcp::Ack, b"x"));
    let backend = inspect(&out).dst;
    assert_eq!(states(&dp), BTreeMap::from([("SYN_SENT", 1)]));
    assert_eq!(totals(&dp), (0, 1));
    let _ = dp.tc(&tcp_packet(backend, forged, Tcp::Rst, b""));
    assert_eq!(states(&dp), BTreeMap::from([("CLOSING", 1)]));
    // A real flow whose entry was lost: the backend acknowledges, so it is one.
    let lost = ([198, 18, 0, 2], 1000);
    let (_, out) = dp.xdp(&tcp_packet(lost, (VIP, 80), Tcp::Ack, b"y"));
    let backend = inspect(&out).dst;
    let _ = dp.tc(&tcp_packet(backend, lost, Tcp::Ack, b""));
    assert_eq!(
        dp.entry(lost, (VIP, 80)).map(|e| e.state),
        Some(proxy_common::CT_ESTABLISHED)
    );
    assert_eq!(totals(&dp), (1, 1));
}

#[test]
fn a_burst_of_new_flows_does_not_evict_established_ones_while_the_table_has_room() {
    let survivors = on_cpu(0, || {
        let mut dp = TestDatapath::with_sizes(MapSizes {
            conntrack: 4096,
            ..Default::default()
        });
        dp.program_with(Scheduler::Rr, &[(tcp(VIP, 80), backends(3))]);
        let clients: Vec<_> = (0..4).map(|i| ([198, 18, 0, 2], 1000 + i)).collect();
        for client in &clients {
            dp.establish(*client, (VIP, 80));
        }
        // 1,500 new flows from one CPU: 3,000 entries, three quarters of the table.
        for i in 0..1500u16 {
            let source = ([203, 0, 113, (i % 250) as u8], 20_000 + i);
            let _ = dp.xdp(&tcp_packet(source, (VIP, 80), Tcp::Syn, b""));
        }
        clients
            .iter()
            .filter(|client| dp.entry(**client, (VIP, 80)).is_some())
            .count()
    })
    .join()
    .expect("worker thread");
    assert_eq!(
        survivors, 4,
        "established flows evicted from a table with room"
    );
}

/// Issue 14's fault suite: 100,000 SYNs from forged sources on the wire to a NodePort,
/// while a kept-alive connection keeps asking and new connections keep coming. Every
/// legitimate request succeeds; the forged flows are tracked half-open (not
/// established, not active) and collected once the SYN timeout has passed, the
/// legitimate connection's flow staying.
#[test]
fn a_spoofed_syn_flood_on_the_wire_fails_no_legitimate_request_and_expires() {
    const SYNS: u32 = 100_000;
    let cluster = Cluster::with_agent_args(
        "synfl",
        1,
        0,
        |t| {
            let mut service = web(t, &["pod-a1"]);
            service.node_port = Some(NODE_PORT);
            vec![service]
        },
        &["--ct-gc-interval-ms", "500"],
    );
    let client = &cluster.topology.client;
    let target = (NODE_IP, NODE_PORT);
    let mut held = HttpConnection::open(client, target.into()).expect("connect");
    held.get().expect("first request");
    let stop = AtomicBool::new(false);
    let (sent, requests, failures) = std::thread::scope(|scope| {
        let stopping = StopOnDrop(&stop);
        let kept_alive = &mut held;
        let legitimate = scope.spawn(|| {
            let (mut requests, mut failures) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                requests += 2;
                if let Err(e) = kept_alive.get() {
                    failures.push(format!("kept-alive: {e:#}"));
                }
                let new = HttpConnection::open(client, target.into()).and_then(|mut c| c.get());
                if let Err(e) = new {
                    failures.push(format!("new: {e:#}"));
                }
            }
            (requests, failures)
        });
        let sent = spoofed_syns(client, (NODE_IP.octets(), NODE_PORT), SYNS);
        drop(stopping);
        let (requests, failures) = legitimate.join().expect("legitimate traffic");
        (sent, requests, failures)
    });
    assert!(
        failures.is_empty(),
        "{} of {requests} failed: {failures:?}",
        failures.len()
    );
    assert!(requests > 20, "only {requests} legitimate requests");
    let mut tables = Tables::open(&cluster.agent.pin_dir).expect("tables");
    let during = states_in(&tables);
    let half_open = during.get("SYN_RECV").unwrap_or(&0) + during.get("SYN_SENT").unwrap_or(&0);
    assert!(
        half_open as u32 >= sent * 9 / 10,
        "{sent} forged SYNs sent, {during:?} tracked"
    );
    assert!(during.get("ESTABLISHED").unwrap_or(&0) < &10, "{during:?}");
    let listing = cluster.agent.listing().expect("list");
    let active: u64 = listing.services[0].backends.iter().map(|b| b.active).sum();
    assert!(
        active < 10,
        "{active} active: half-open flows must not count"
    );
    // The SYN timeout passes (made to, as `age` does): the agent's GC takes the
    // half-open flows, and the kept-alive connection goes on.
    age_in(&mut tables, CT_TIMEOUT_SYN_S + 1);
    let collected = eventually(Duration::from_secs(20), Duration::from_millis(200), || {
        let now = states_in(&tables);
        !now.contains_key("SYN_RECV") && !now.contains_key("SYN_SENT")
    });
    assert!(collected, "{:?}", states_in(&tables));
    held.get()
        .expect("the kept-alive connection after the flood");
    println!("forged SYNs sent {sent}, tracked half-open {half_open}, legitimate requests {requests}, all answered");
}
