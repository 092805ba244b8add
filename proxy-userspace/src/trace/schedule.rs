//! The backend a new flow would get, predicted with the kernel's own decisions
//! (`proxy_common::decide`) over the pinned maps, read-only: the round-robin cursor is
//! read, never advanced.

use std::sync::OnceLock;

use anyhow::Result;
use proxy_common::{
    decide::{self, LeastLoaded, Position, SchedTables},
    CtKey, Scheduler, ServiceValue, MAX_LEAST_CONN_SCAN,
};

use crate::datapath::{generation::Generation, tables::Tables};

/// How many slots the kernel's scans examine (least connections, a tunnel's
/// backend): the bound of the data path object this kernel runs, probed once. An
/// agent forced to `--datapath legacy` on a newer kernel scans fewer than assumed
/// here, which only matters for services of more than that many backends.
pub fn scan_bound() -> u32 {
    static BOUND: OnceLock<u32> = OnceLock::new();
    *BOUND.get_or_init(|| {
        Generation::of_this_kernel().map_or(MAX_LEAST_CONN_SCAN, Generation::least_conn_scan)
    })
}

impl SchedTables for Tables {
    fn entry(&self, index: u32) -> Option<u32> {
        self.sched_tables.get(&index, 0).ok()
    }
}

/// The slot a new flow would get, and why; `None` when no backend can be chosen.
pub fn predict_slot(
    tables: &Tables,
    service: &ServiceValue,
    key: &CtKey,
    scheduler: Scheduler,
) -> Result<Option<(u32, String)>> {
    if decide::backend_count(service).is_none() {
        return Ok(None);
    }
    let cursor = tables.rr_cursors.get(&service.id, 0)?;
    let Some(turn) = decide::turn(service, cursor) else {
        return Ok(None);
    };
    let cycle = decide::cycle_len(service);
    let at = |n: u32| decide::slot_at(tables, service, n);
    Ok(match decide::position(scheduler, key) {
        Position::NextTurn => {
            at(turn).map(|slot| (slot, format!("the next turn is {turn} of {cycle}")))
        }
        Position::Hash(hash) => at(hash).map(|slot| {
            let why = match scheduler {
                Scheduler::Sh => format!("source address bucket {}", hash % cycle),
                Scheduler::Dh => format!("destination address bucket {}", hash % cycle),
                _ => format!("5-tuple hash {hash:#010x}, ring entry {}", hash % cycle),
            };
            (slot, why)
        }),
        Position::Random => {
            at(0).map(|slot| (slot, "random: any backend; one possibility shown".into()))
        }
        Position::LeastLoaded => least_loaded(tables, service, turn)?,
    })
}

/// The least-connection family's choice, as the kernel's scan makes it.
fn least_loaded(
    tables: &Tables,
    service: &ServiceValue,
    start: u32,
) -> Result<Option<(u32, String)>> {
    let mut scan = LeastLoaded::default();
    for index in 0..service.backend_count.min(scan_bound()) {
        let Some(slot) = LeastLoaded::slot(service, start, index) else {
            break;
        };
        let Some(backend) = super::slot_backend(tables, service.id, slot) else {
            continue;
        };
        let counts = tables.conn_counts.get(&backend.id, 0).unwrap_or_default();
        if scan.consider(service.scheduler, slot, backend.weight, &counts) {
            return Ok(Some((slot, "an idle backend (nq)".into())));
        }
    }
    Ok(scan.chosen().map(|slot| {
        (
            slot,
            format!(
                "least loaded (load {}, weight {}; weight-0 backends are quiesced)",
                scan.best_load, scan.best_weight
            ),
        )
    }))
}
