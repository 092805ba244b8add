//! Connection accounting: how many flows each backend has open (`active`) and closing
//! (`inactive`) in `CONN_COUNTS`, for the least-connection schedulers and for `list`.
//!
//! Each original conntrack entry records how it is counted (`CtEntry::accounting`,
//! an `ACCT_*` value) and that field changes only by atomic compare-and-exchange or
//! exchange, so each transition is counted once however many CPUs see the packets
//! that cause it; the counters themselves move by atomic adds. The agent's conntrack
//! GC uncounts flows that just stop (UDP, evicted entries) the same way.

use core::intrinsics::{atomic_cxchg, atomic_xadd, atomic_xchg, AtomicOrdering};

use proxy_common::{CtEntry, ACCT_ACTIVE, ACCT_GONE, ACCT_INACTIVE, CT_F_REPLY};

use crate::maps::CONN_COUNTS;

/// Counts a new flow as active on its backend.
#[inline(always)]
pub fn opened(backend_id: u32) {
    if let Some(counts) = CONN_COUNTS.get_ptr_mut(backend_id) {
        // SAFETY: live array slot; atomic add (SeqCst: see balancer::next_turn).
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(&raw mut (*counts).active, 1)
        };
    }
}

/// Moves one flow between the backend's counters: `from`/`to` are `ACCT_*` values
/// (`ACCT_GONE`: not counted).
#[inline(always)]
fn moved(backend_id: u32, from: u32, to: u32) {
    let Some(counts) = CONN_COUNTS.get_ptr_mut(backend_id) else {
        return;
    };
    // SAFETY: live array slot; atomic adds of -1 and +1.
    unsafe {
        let field = |which: u32| match which {
            ACCT_ACTIVE => Some(&raw mut (*counts).active),
            ACCT_INACTIVE => Some(&raw mut (*counts).inactive),
            _ => None,
        };
        if let Some(f) = field(from) {
            atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(f, u64::MAX);
        }
        if let Some(f) = field(to) {
            atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(f, 1);
        }
    }
}

/// Moves the flow of an original entry between counters if it is still counted as
/// `from`: a compare-and-exchange, so that two CPUs seeing the closing packets of
/// both directions at once count the transition once.
#[inline(always)]
pub fn transition(original: *mut CtEntry, backend_id: u32, from: u32, to: u32) {
    // SAFETY: a live map value; the field is only ever changed atomically.
    let (_, swapped) = unsafe {
        atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            &raw mut (*original).accounting,
            from,
            to,
        )
    };
    if swapped {
        moved(backend_id, from, to);
    }
}

/// Stops counting an original entry that is about to be replaced (it expired).
#[inline(always)]
pub fn retire(entry: *mut CtEntry) {
    // SAFETY: a live map value; atomic exchange as in `transition`.
    unsafe {
        if (*entry).flags & CT_F_REPLY != 0 {
            return;
        }
        let was =
            atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(&raw mut (*entry).accounting, ACCT_GONE);
        moved((*entry).backend_id, was, ACCT_GONE);
    }
}
