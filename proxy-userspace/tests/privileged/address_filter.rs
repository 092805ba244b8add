//! The address filter (`proxy_common::address_filter`): the data path's first test of
//! whether a packet can be ours. It may let through what is not ours (a shared bit),
//! never hide what is: a departed backend's flows keep their address in it while
//! conntrack names them, and a filter the agent has not filled yet hides nothing.

use ebpf_proxy::{datapath::mmap::MappedArray, model::Scheduler};
use proxy_common::{map_name, ADDRESS_FILTER_ENTRIES, ADDRESS_FILTER_READY};

use crate::{
    schedulers::VIP,
    support::{datapath::*, packets::*},
};

const CLIENT: ([u8; 4], u16) = ([198, 18, 0, 2], 1000);
const BACKEND_A: [u8; 4] = [10, 244, 1, 1];

/// A's reply to the client, as it leaves the pod: translated back to the VIP or not.
fn reply_is_translated(dp: &mut TestDatapath) -> bool {
    let (verdict, out) = dp.tc(&tcp_packet((BACKEND_A, 8080), CLIENT, Tcp::Ack, b"r"));
    assert_eq!(verdict, TC_ACT_OK);
    match inspect(&out).src {
        (VIP, 80) => true,
        (BACKEND_A, 8080) => false,
        other => panic!("reply from {other:?}"),
    }
}

/// A service whose one backend is A, and an established flow of the client's to it.
fn serving_a_flow_from_a() -> TestDatapath {
    let mut dp = TestDatapath::new();
    dp.program_with(
        Scheduler::Rr,
        &[(tcp(VIP, 80), vec![local(BACKEND_A, 8080)])],
    );
    assert_eq!(dp.establish(CLIENT, (VIP, 80)).dst, (BACKEND_A, 8080));
    assert!(reply_is_translated(&mut dp));
    dp
}

fn filter(dp: &TestDatapath) -> MappedArray<u64> {
    MappedArray::open(&dp.pin_dir, map_name::ADDRESS_FILTER).expect("the filter's map")
}

#[test]
fn a_departed_backends_flow_keeps_its_address_in_the_filter_while_conntrack_names_it() {
    let mut dp = serving_a_flow_from_a();
    // A leaves the service (its established TCP flow goes on, as with kube-proxy);
    // the collection rebuilds the filter without the frontends naming A.
    dp.program_with(
        Scheduler::Rr,
        &[(tcp(VIP, 80), vec![local([10, 244, 1, 2], 8080)])],
    );
    dp.syncer.collect_conntrack().expect("gc");
    assert!(reply_is_translated(&mut dp), "the departed backend's reply");
    // Once its flow is gone, a rebuild may drop it: A's packets are no longer ours.
    dp.flush_conntrack();
    dp.syncer.collect_conntrack().expect("gc");
    assert!(!reply_is_translated(&mut dp));
}

#[test]
fn the_filter_decides_before_conntrack_and_a_rebuild_restores_what_conntrack_names() {
    let mut dp = serving_a_flow_from_a();
    let mut map = filter(&dp);
    let empty = vec![0; ADDRESS_FILTER_ENTRIES as usize];
    // Emptied but ready: the flow's packets are not even looked up.
    map.write(0, &empty[..ADDRESS_FILTER_READY as usize])
        .expect("clear the bits");
    assert!(
        !reply_is_translated(&mut dp),
        "an address out of the filter"
    );
    // Not ready (as a map an upgrading agent has just created): every packet is a
    // candidate.
    map.write(0, &empty).expect("clear the ready word");
    assert!(reply_is_translated(&mut dp), "a filter not filled yet");
    // The collection's rebuild puts back the addresses of the programmed state and
    // of every flow, and marks the filter ready.
    dp.syncer.collect_conntrack().expect("gc");
    assert_eq!(
        map.read(ADDRESS_FILTER_READY as usize, 1).expect("read"),
        [1]
    );
    assert!(reply_is_translated(&mut dp));
}
