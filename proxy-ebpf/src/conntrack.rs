//! Conntrack look-ups and state changes.
//!
//! Races, written down because several CPUs may be in here at once for one flow:
//! - Look-ups copy the entry; the only in-place writes are `state`, `flags` and
//!   `last_seen_ns`, each a plain store. Two CPUs writing them at once leave one of
//!   two valid values, and both values describe the same flow and backend.
//! - Creation is insert-if-absent (see `translate::open_flow`), so two CPUs that both
//!   see a new flow agree on the first one's backend.
//! - `accounting` (how the flow counts in `CONN_COUNTS`) changes only by atomic
//!   compare-and-exchange or exchange, so each transition is counted exactly once.

use core::intrinsics::{atomic_cxchg, atomic_xchg, AtomicOrdering};

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use proxy_common::{
    ct_timeout_ns, CtEntry, CtKey, ACCT_ACTIVE, ACCT_GONE, ACCT_INACTIVE, CT_CLOSING,
    CT_ESTABLISHED, CT_F_ENCAP, CT_F_FIN, CT_F_REPLY, CT_REFRESH_NS, CT_SYN_SENT, PROTO_TCP,
};

use crate::{
    balancer,
    maps::CONNTRACK,
    parse::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

pub enum Lookup {
    Live(*mut CtEntry),
    /// Present but idle past its timeout: to be replaced, never followed.
    Stale(*mut CtEntry),
    Missing,
}

#[inline(always)]
pub fn lookup(key: &CtKey, now: u64) -> Lookup {
    let Some(entry) = CONNTRACK.get_ptr_mut(key) else {
        return Lookup::Missing;
    };
    // SAFETY: a live map value; fields are read once each.
    let (state, last_seen) = unsafe { ((*entry).state, (*entry).last_seen_ns) };
    if now.saturating_sub(last_seen) > ct_timeout_ns(key.proto, state) {
        return Lookup::Stale(entry);
    }
    Lookup::Live(entry)
}

/// Advances TCP state on a packet of a tracked flow and refreshes its idle timer.
/// Writes happen only when something changed or the refresh interval passed.
#[inline(always)]
pub fn observe(flow: &Flow, entry_ptr: *mut CtEntry, entry: &CtEntry, now: u64) {
    let mut state = entry.state;
    let mut flags = entry.flags;
    let mut peer_state = None;
    if flow.key.proto == PROTO_TCP {
        let tcp = flow.tcp_flags;
        if tcp & TCP_RST != 0 {
            state = CT_CLOSING;
            peer_state = Some(CT_CLOSING);
        } else if flags & CT_F_ENCAP != 0 {
            // dsr-ipip: only the client's half is seen. Its ACK means the backend
            // answered; its FIN ends the flow here.
            if tcp & TCP_FIN != 0 && state != CT_CLOSING {
                state = CT_CLOSING;
                peer_state = Some(CT_CLOSING);
            } else if state == CT_SYN_SENT && tcp & TCP_ACK != 0 && tcp & TCP_SYN == 0 {
                state = CT_ESTABLISHED;
            }
        } else if tcp & TCP_FIN != 0 && flags & CT_F_FIN == 0 {
            flags |= CT_F_FIN;
            if peer_has_fin(&flow.key, entry) {
                state = CT_CLOSING;
                peer_state = Some(CT_CLOSING);
            }
        } else if state == CT_SYN_SENT && entry.flags & CT_F_REPLY != 0 && tcp & TCP_ACK != 0 {
            // The backend's SYN-ACK: the connection is up in both directions.
            state = CT_ESTABLISHED;
            peer_state = Some(CT_ESTABLISHED);
        } else if state == CT_CLOSING && entry.flags & CT_F_REPLY == 0 && tcp & TCP_SYN != 0 {
            // The client reuses the tuple for a new connection; it keeps its backend.
            state = CT_SYN_SENT;
            flags &= !CT_F_FIN;
            peer_state = Some(CT_SYN_SENT);
        }
    }
    if state == entry.state
        && flags == entry.flags
        && now.saturating_sub(entry.last_seen_ns) < CT_REFRESH_NS
    {
        return;
    }
    // SAFETY: live map value, plain stores (see module comment).
    unsafe {
        (*entry_ptr).state = state;
        (*entry_ptr).flags = flags;
        (*entry_ptr).last_seen_ns = now;
    }
    let Some(peer_state) = peer_state else {
        return;
    };
    let peer = CONNTRACK.get_ptr_mut(flow.key.peer(entry));
    if let Some(peer) = peer {
        // SAFETY: as above.
        unsafe {
            (*peer).state = peer_state;
            (*peer).last_seen_ns = now;
            if peer_state == CT_SYN_SENT {
                (*peer).flags &= !CT_F_FIN;
            }
        }
    }
    let original = if entry.flags & CT_F_REPLY == 0 {
        Some(entry_ptr)
    } else {
        peer
    };
    if let Some(original) = original {
        match peer_state {
            CT_CLOSING => move_accounting(original, entry.backend_id, ACCT_ACTIVE, ACCT_INACTIVE),
            CT_SYN_SENT => move_accounting(original, entry.backend_id, ACCT_INACTIVE, ACCT_ACTIVE),
            _ => {}
        }
    }
}

/// Moves the flow of an original entry between `CONN_COUNTS` counters if it is still
/// counted as `from`: a compare-and-exchange, so that two CPUs seeing the closing
/// packets of both directions at once count the transition once.
#[inline(always)]
fn move_accounting(original: *mut CtEntry, backend_id: u32, from: u32, to: u32) {
    // SAFETY: a live map value; the field is only ever changed atomically.
    let (_, swapped) = unsafe {
        atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            &raw mut (*original).accounting,
            from,
            to,
        )
    };
    if swapped {
        balancer::count_moved(backend_id, from, to);
    }
}

/// Stops counting an original entry that is about to be replaced (it expired).
#[inline(always)]
pub fn retire(entry: *mut CtEntry) {
    // SAFETY: a live map value; atomic exchange as in `move_accounting`.
    unsafe {
        if (*entry).flags & CT_F_REPLY != 0 {
            return;
        }
        let was =
            atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(&raw mut (*entry).accounting, ACCT_GONE);
        balancer::count_moved((*entry).backend_id, was, ACCT_GONE);
    }
}

#[inline(always)]
fn peer_has_fin(key: &CtKey, entry: &CtEntry) -> bool {
    // SAFETY: copied flag read.
    unsafe { CONNTRACK.get(key.peer(entry)) }.is_some_and(|peer| peer.flags & CT_F_FIN != 0)
}
