//! Updates of the per-CPU counters. Per-CPU values are private to the running CPU
//! (preemption is disabled while a program runs), so plain adds are race-free.

use proxy_common::TrafficStats;

use crate::maps::{BACKEND_STATS, DATAPATH_EVENTS, SERVICE_STATS};

#[inline(always)]
pub fn event(reason: u32) {
    if let Some(counter) = DATAPATH_EVENTS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, see module comment.
        unsafe { *counter += 1 };
    }
}

/// Which way a packet travels relative to the client that opened the flow.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToBackend,
    ToClient,
}

#[inline(always)]
fn add(stats: *mut TrafficStats, direction: Direction, bytes: u64, new_flow: bool) {
    // SAFETY: per-CPU slot, see module comment.
    let stats = unsafe { &mut *stats };
    if new_flow {
        stats.connections += 1;
    }
    match direction {
        Direction::ToBackend => {
            stats.packets_in += 1;
            stats.bytes_in += bytes;
        }
        Direction::ToClient => {
            stats.packets_out += 1;
            stats.bytes_out += bytes;
        }
    }
}

/// Counts one packet (and, for the first one, one connection) for a service and backend.
#[inline(always)]
pub fn traffic(service_id: u32, backend_id: u32, direction: Direction, bytes: u64, new_flow: bool) {
    if let Some(stats) = SERVICE_STATS.get_ptr_mut(service_id) {
        add(stats, direction, bytes, new_flow);
    }
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_id) {
        add(stats, direction, bytes, new_flow);
    }
}
