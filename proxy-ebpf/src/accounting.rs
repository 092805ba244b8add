//! Connection accounting: how many flows each backend has open (`active`) and closing
//! (`inactive`) in `CONN_COUNTS`, for the least-connection schedulers and for `list`.
//!
//! Each original conntrack entry records how it is counted (`CtEntry::accounting`,
//! an `ACCT_*` value) and that field changes only by atomic compare-and-exchange or
//! exchange, so each transition is counted once however many CPUs see the packets
//! that cause it; the counters themselves move by atomic adds, and never below zero.
//! The agent's conntrack GC uncounts flows that just stop (UDP, evicted entries) the
//! same way, and reconciles the counters with the table so that a drift heals.
//!
//! Kernels before 5.12 (`LEGACY_KERNEL`) have only the plain atomic add: there the
//! exchanges are a read and a write, so two CPUs may, rarely, both make one
//! transition; the counters then drift, never below zero, until the reconciliation.

use core::intrinsics::{atomic_cxchg, atomic_xadd, atomic_xchg, AtomicOrdering};

use proxy_common::{ConnCounts, CtEntry, ACCT_ACTIVE, ACCT_GONE, ACCT_INACTIVE, CT_F_REPLY};

use crate::maps::CONN_COUNTS;

/// Counts a new flow on its backend, as `how` (`ACCT_ACTIVE` or `ACCT_INACTIVE`).
/// The counter is addressed by offset, not chosen by a branch: `how` is computed
/// without one (see `translate::open_flow`), and a branch here would fork every path
/// of a new flow in two for the verifier.
#[inline(always)]
pub fn opened(backend_id: u32, how: u32) {
    const _: () = assert!(ACCT_ACTIVE == 0 && ACCT_INACTIVE == 1);
    const _: () = assert!(core::mem::offset_of!(ConnCounts, inactive) == 8);
    let Some(counts) = CONN_COUNTS.get_ptr_mut(backend_id) else {
        return;
    };
    // SAFETY: live array slot; `how & 1` selects `active` (offset 0) or `inactive`
    // (offset 8) of it.
    unsafe { add(counts.cast::<u64>().add((how & 1) as usize), 1) };
}

/// Moves one flow between the backend's counters: `from`/`to` are `ACCT_*` values
/// (`ACCT_GONE`: not counted).
#[inline(always)]
fn moved(backend_id: u32, from: u32, to: u32) {
    let Some(counts) = CONN_COUNTS.get_ptr_mut(backend_id) else {
        return;
    };
    // SAFETY: live array slot; the fields are only changed atomically.
    unsafe {
        let field = |which: u32| match which {
            ACCT_ACTIVE => Some(&raw mut (*counts).active),
            ACCT_INACTIVE => Some(&raw mut (*counts).inactive),
            _ => None,
        };
        if let Some(f) = field(from) {
            decrement(f);
        }
        if let Some(f) = field(to) {
            add(f, 1);
        }
    }
}

/// Subtracts one unless the counter is zero: a count that drifted low (a flow
/// uncounted twice in a race the module comment allows) stays at zero instead of
/// wrapping to 2^64 - 1, and the agent's reconciliation restores it. An add that is
/// undone when it wrapped, not a compare-and-exchange loop: no loop for the verifier
/// to unroll in every path that closes a flow. A reader between the two adds sees
/// the wrapped value for an instant (the schedulers cap counts, so such a backend
/// just looks busy to one decision).
///
/// # Safety
/// `counter` points into a live map value that is only changed atomically.
#[inline(always)]
unsafe fn decrement(counter: *mut u64) {
    // SAFETY: the caller's promise.
    unsafe {
        if crate::LEGACY_KERNEL {
            // No fetching add: test first (a race may still wrap the counter).
            if core::ptr::read_volatile(counter) != 0 {
                add(counter, u64::MAX);
            }
        } else if fetch_add(counter, u64::MAX) == 0 {
            add(counter, 1);
        }
    }
}

/// Adds `n` to a counter that CPUs share: the plain atomic add (BPF_XADD), which
/// every kernel has. Relaxed: LLVM then emits the non-fetching instruction.
///
/// # Safety
/// `counter` points into a live map value that is only changed atomically.
#[inline(always)]
unsafe fn add(counter: *mut u64, n: u64) {
    // SAFETY: the caller's promise.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, n) };
}

/// Adds `n` to a shared counter and returns its previous value: an atomic
/// fetch-and-add (BPF_ATOMIC | BPF_FETCH, 5.12) where the kernel has it, else a read
/// and a plain atomic add, between which another CPU may add too.
///
/// # Safety
/// `counter` points into a live map value that is only changed atomically.
#[inline(always)]
pub unsafe fn fetch_add(counter: *mut u64, n: u64) -> u64 {
    // SAFETY: the caller's promise.
    unsafe {
        if crate::LEGACY_KERNEL {
            let was = core::ptr::read_volatile(counter);
            add(counter, n);
            was
        } else {
            // SeqCst, not Relaxed: with Relaxed, LLVM 22 emits the non-fetching add
            // and then reads the old value from the operand register (objdump).
            atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(counter, n)
        }
    }
}

/// Moves the flow of an original entry between counters if it is still counted as
/// `from`: a compare-and-exchange, so that two CPUs seeing the closing packets of
/// both directions at once count the transition once.
#[inline(always)]
pub fn transition(original: *mut CtEntry, backend_id: u32, from: u32, to: u32) {
    // SAFETY: a live map value; the field is only ever changed atomically (or, on
    // legacy kernels, by these reads and writes).
    let swapped = unsafe {
        let field = &raw mut (*original).accounting;
        if crate::LEGACY_KERNEL {
            let current = core::ptr::read_volatile(field) == from;
            if current {
                core::ptr::write_volatile(field, to);
            }
            current
        } else {
            atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                field, from, to,
            )
            .1
        }
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
        let field = &raw mut (*entry).accounting;
        let was = if crate::LEGACY_KERNEL {
            let was = core::ptr::read_volatile(field);
            core::ptr::write_volatile(field, ACCT_GONE);
            was
        } else {
            atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(field, ACCT_GONE)
        };
        moved((*entry).backend_id, was, ACCT_GONE);
    }
}
