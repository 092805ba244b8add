//! Map synchronisation against the real (pinned) maps: only differences are written.

use crate::support::datapath::*;
use ebpf_proxy::{
    datapath::tables::Tables,
    model::{DesiredState, Frontend, Scheduler},
    sync::Syncer,
};
use proxy_common::BackendSlotKey;

fn desired(services: usize, backends: usize) -> DesiredState {
    let mut state = DesiredState::default();
    for s in 0..services {
        let endpoints = (0..backends)
            .map(|b| local([10, 244, s as u8, b as u8 + 1], 8080))
            .collect();
        state.frontends.insert(
            tcp([10, 96, 0, s as u8 + 1], 80),
            Frontend {
                service: format!("ns/svc{s}:http"),
                external: false,
                scheduler: Scheduler::Rr,
                endpoints,
                ..Default::default()
            }
            .into(),
        );
    }
    state
}

fn slots(tables: &Tables, service_id: u32, count: u32) -> Vec<[u8; 4]> {
    (0..count)
        .map(|slot| {
            let backend = tables
                .slots
                .get(&BackendSlotKey { service_id, slot }, 0)
                .expect("slot");
            backend.addr.v4_octets()
        })
        .collect()
}

#[test]
fn an_unchanged_state_writes_nothing_even_after_a_restart() {
    let mut dp = TestDatapath::new();
    let state = desired(20, 5);
    let first = dp.syncer.apply(&state);
    assert_eq!(first.added, 20);
    assert_eq!(dp.syncer.apply(&state).map_writes, 0);
    // A restarted agent rebuilds its view from the pinned maps.
    let mut restarted = Syncer::recover(dp.tables()).expect("recover");
    let report = restarted.apply(&state);
    assert_eq!(
        (
            report.added,
            report.updated,
            report.removed,
            report.map_writes
        ),
        (0, 0, 0, 0)
    );
}

#[test]
fn changing_one_service_touches_only_its_own_entries() {
    let mut dp = TestDatapath::new();
    let mut state = desired(50, 4);
    dp.syncer.apply(&state);
    let key = tcp([10, 96, 0, 7], 80);
    std::sync::Arc::make_mut(state.frontends.get_mut(&key).expect("svc"))
        .endpoints
        .push(local([10, 244, 99, 1], 8080));
    let report = dp.syncer.apply(&state);
    assert_eq!(report.updated, 1);
    // One new slot and the count in SERVICES.
    assert_eq!(report.map_writes, 2);
}

#[test]
fn remaining_backends_keep_their_slots_when_one_leaves() {
    let mut dp = TestDatapath::new();
    let mut state = desired(1, 4);
    dp.syncer.apply(&state);
    let tables = dp.tables();
    let id = tables
        .services
        .iter()
        .next()
        .expect("service")
        .expect("read")
        .1
        .id;
    let before = slots(&tables, id, 4);
    // Remove the second backend: the last one moves into its slot, the others stay.
    let key = tcp([10, 96, 0, 1], 80);
    std::sync::Arc::make_mut(state.frontends.get_mut(&key).expect("svc"))
        .endpoints
        .remove(1);
    let report = dp.syncer.apply(&state);
    let after = slots(&tables, id, 3);
    assert_eq!(after, vec![before[0], before[3], before[2]]);
    assert_eq!(report.map_writes, 3, "moved slot, count, deleted tail slot");
    assert!(tables
        .slots
        .get(
            &BackendSlotKey {
                service_id: id,
                slot: 3
            },
            0
        )
        .is_err());
}

#[test]
fn removed_services_disappear_and_their_ids_are_reused() {
    let mut dp = TestDatapath::new();
    dp.syncer.apply(&desired(3, 2));
    dp.syncer.apply(&desired(1, 2));
    let tables = dp.tables();
    assert_eq!(tables.services.keys().count(), 1);
    assert_eq!(tables.slots.keys().count(), 2);
    let report = dp.syncer.apply(&desired(3, 2));
    assert_eq!(report.added, 2);
    let mut ids: Vec<u32> = tables
        .services
        .iter()
        .map(|e| e.expect("read").1.id)
        .collect();
    ids.sort();
    assert_eq!(ids, vec![0, 1, 2]);
}
