//! Conntrack: look-ups, state changes (`Transport::next`), and the parts of recording
//! a new flow that touch more than its own entry: its reply tuple (remapped when
//! another flow holds it, `claim_reply_tuple`) and a race lost to another CPU. A new
//! flow's entries and first state are built by `proxy_common` (`Transport::opening`,
//! `CtEntry::original`, `CtEntry::reply_to`, `CtEntry::encapsulated`, `CtKey::peer`)
//! in `PACKET_SCRATCH`, off the stack; `translate::open_flow` decides masquerading
//! and inserts them.
//!
//! Races, written down because several CPUs may be in here at once for one flow:
//! - Look-ups copy the entry; the only in-place writes are `state`, `flags` and
//!   `last_seen_ns`, each a plain store of a value computed from the copy. Two CPUs
//!   writing them at once leave one of two values, both describing the same flow
//!   and backend. The worst cases, all bounded by timeouts and never misrouting:
//!   - a lost `CT_F_FIN` (one CPU records the FIN of one direction while another
//!     stores the flags it read before): when the other side's FIN comes, the flow
//!     is not seen closing, and stays ESTABLISHED and counted active until a RST
//!     or its idle timeout;
//!   - a lost state advance (SYN_RECV -> ESTABLISHED overwritten by a concurrent
//!     refresh that still carries SYN_RECV): the client's next acknowledgement
//!     advances it again; meanwhile the flow has the SYN timeout and counts inactive;
//!   - a lost `last_seen_ns` refresh: the older of two close times, at most
//!     `CT_REFRESH_NS` apart.
//! - Creation is insert-if-absent, so two CPUs that both see a new flow agree on the
//!   first one's backend; the loser withdraws its reply entry (`adopt_winner`).
//! - How the flow is counted in `CONN_COUNTS` changes only atomically (`accounting`),
//!   so each transition is counted exactly once.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
};
use proxy_common::{
    ct_timeout_kind, sctp, tcp, Addr, CtEntry, CtKey, Family, ACCT_ACTIVE, ACCT_INACTIVE, CONFIG_SNAT_ADDR, CONFIG_SNAT_ADDR6,
    CT_CLOSING, CT_ESTABLISHED, CT_F_ENCAP, CT_F_FIN, CT_F_REPLY, CT_F_REWRITE_DST, CT_REFRESH_NS,
    EV_CT_INSERT_FAILED, EV_CT_RACE_LOST, EV_REPLY_PORT_REMAPPED,
};

use crate::{
    accounting, counters,
    maps::{CONNTRACK, NODE_CONFIG},
    packet::Packet,
    parse::Flow,
    settings,
};

/// `bpf_map_update_elem`'s answer to `BPF_NOEXIST` when the key is there.
pub const EEXIST: i32 = -17;

/// Idle timeout of an entry, in nanoseconds (an untracked protocol's: 0, stale).
#[inline(always)]
fn timeout_ns(proto: u8, state: u8) -> u64 {
    match ct_timeout_kind(proto, state) {
        Some(kind) => settings::ct_timeout_ns(kind),
        None => 0,
    }
}

/// CLOCK_MONOTONIC, as the agent's GC reads it: the coarse clock (a tick's
/// resolution, cheaper) from 5.11, the precise one before.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helpers without arguments.
    unsafe {
        if crate::LEGACY_KERNEL {
            bpf_ktime_get_ns()
        } else {
            bpf_ktime_get_coarse_ns()
        }
    }
}

pub enum Lookup {
    Live(*mut CtEntry),
    /// Present but over: idle past its timeout, or closed and opened again by the
    /// client (`reopens`). To be replaced by a new flow, never followed.
    Over(*mut CtEntry),
    Missing,
    /// A tunnelled packet's tuple is a flow this node encapsulates (it was the flow's
    /// entry node): the packet is dropped (`EV_TUNNEL_LOOP`), the entry left alone.
    Retunnel,
}

/// The flow `flow` belongs to, if tracked; `tunnelled`: the packet came out of a
/// tunnel (`dsr-ipip`), and a live entry that would encapsulate it again is
/// `Lookup::Retunnel`.
#[inline(always)]
pub fn lookup<P: Packet>(flow: &Flow, now: u64, tunnelled: bool) -> Lookup {
    let key = &flow.key;
    let Some(entry) = CONNTRACK.get_ptr_mut(key) else {
        return Lookup::Missing;
    };
    // SAFETY: a live map value; fields are read once each.
    let (state, flags, last_seen) =
        unsafe { ((*entry).state, (*entry).flags, (*entry).last_seen_ns) };
    let stale = now.saturating_sub(last_seen) > timeout_ns(key.proto, state);
    // One branch for both: with a branch of its own for a reopened flow, the new
    // flow's paths stopped merging with the others (+80,000 processed instructions in
    // the uplink program, +128,000 in SCTP's, measured before bpf-linker inlined
    // memmove), presumably what that test taught the verifier about the flags.
    if core::hint::black_box(stale | reopens::<P>(flow, state, flags)) {
        return Lookup::Over(entry);
    }
    if tunnelled && flags & CT_F_ENCAP != 0 {
        return Lookup::Retunnel;
    }
    Lookup::Live(entry)
}

/// Advances a tracked flow's state as its protocol says (`Transport::next`) and
/// refreshes its idle timer.
/// Writes happen only when something changed or the refresh interval passed.
#[inline(always)]
pub fn observe(flow: &Flow, entry_ptr: *mut CtEntry, entry: &CtEntry, now: u64) {
    let (state, flags) = flow
        .transport
        .next(entry.state, entry.flags, flow.tcp_flags, || {
            peer_has_fin(&flow.key, entry)
        });
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
    if state == entry.state {
        return;
    }
    // Both directions share the flow's state; a dsr-ipip flow has no reply entry.
    let peer = if entry.flags & CT_F_ENCAP == 0 {
        CONNTRACK.get_ptr_mut(flow.key.peer(entry))
    } else {
        None
    };
    if let Some(peer) = peer {
        // SAFETY: as above.
        unsafe {
            (*peer).state = state;
            (*peer).last_seen_ns = now;
        }
    }
    let original = if entry.flags & CT_F_REPLY == 0 {
        Some(entry_ptr)
    } else {
        peer
    };
    if let Some(original) = original {
        match state {
            CT_ESTABLISHED => {
                accounting::transition(original, entry.backend_id, ACCT_INACTIVE, ACCT_ACTIVE)
            }
            CT_CLOSING => {
                accounting::transition(original, entry.backend_id, ACCT_ACTIVE, ACCT_INACTIVE)
            }
            _ => {}
        }
    }
}

/// Whether the packet opens a new connection on a closed flow's tuple
/// (`tcp::reopens`, `sctp::reopens`). Whether the flow is SCTP is known at compile
/// time, as in `translate::open_flow`. A UDP flow never closes: its `tcp_flags` are 0
/// and its state ESTABLISHED.
#[inline(always)]
fn reopens<P: Packet>(flow: &Flow, state: u8, flags: u8) -> bool {
    if P::SCTP {
        sctp::reopens(state, flags, flow.tcp_flags)
    } else {
        tcp::reopens(state, flags, flow.tcp_flags)
    }
}

#[inline(always)]
fn peer_has_fin(key: &CtKey, entry: &CtEntry) -> bool {
    // SAFETY: copied flag read.
    unsafe { CONNTRACK.get(key.peer(entry)) }.is_some_and(|peer| peer.flags & CT_F_FIN != 0)
}

/// Ports tried for a new flow's reply tuple before giving up: the client's own port,
/// then random ones. Under a burst of short connections (the manifests fault suite:
/// about 2,300 a second from one client to 60 services on two backends) a third or
/// more of a backend's tuples toward one client can be held, by closed flows waiting
/// out their 10 s: 7 tries then failed for about one new flow in 1,000
/// (`snat_exhausted`). Random rather than derived from the tuple, so that a
/// retransmitted SYN whose tries all failed gets fresh ones (with a hash, the same
/// ports failed again and the connection timed out). Netfilter tries up to 128.
const REPLY_PORT_ATTEMPTS: u32 = 16;
/// Where remapped ports are drawn from: 1024-65535 but Linux's default ephemeral
/// range (32768-60999), where clients (and the node, whose address masquerade uses)
/// open their own connections; only tracked flows are seen here, so a port a client
/// used directly toward the same backend would clash unseen (netfilter, which tracks
/// everything, has no such blind spot). 36,280 ports.
const REMAP_PORT_MIN: u32 = 1024;
const EPHEMERAL_START: u32 = 32_768;
const EPHEMERAL_END: u32 = 61_000;
const REMAP_PORTS: u32 = (EPHEMERAL_START - REMAP_PORT_MIN) + (65_536 - EPHEMERAL_END);

/// The node's masquerade address of a flow's family (`None` when the node has none of
/// that family).
#[inline(always)]
pub fn snat_address(family: u8) -> Option<Addr> {
    let slot = if family == Family::V6.number() {
        CONFIG_SNAT_ADDR6
    } else {
        CONFIG_SNAT_ADDR
    };
    let addr = NODE_CONFIG.get(slot)?.addr;
    if addr.is_zero() {
        None
    } else {
        Some(addr)
    }
}

/// Claims a new flow's reply tuple (backend -> client, or -> masquerade address) by
/// inserting its reply entry there, and returns the client port the backend will see.
/// The client's own port when the tuple is free (the common case, and what keeps a
/// flow recognisable) or already this flow's (its original entry was lost and it is
/// picked up again). When another flow holds it (one client port to two services with
/// one backend, or two clients behind one masquerade address), the client's port is
/// remapped to a random free one, as netfilter's NAT does for a clashing tuple:
/// overwriting the other flow's reply entry would hand its replies to this flow.
/// Bounded, so a crowded node drops instead of looping.
// The entries by reference: see `translate::open_flow`.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
pub fn claim_reply_tuple(reply_key: &mut CtKey, reply: &mut CtEntry, original: &CtKey) -> Option<u16> {
    match CONNTRACK.insert(&*reply_key, &*reply, u64::from(BPF_NOEXIST)) {
        Ok(()) => return Some(original.sport),
        Err(EEXIST) => {}
        Err(_) => {
            // Not a clash: the table refused (full beyond LRU eviction). The packet is
            // translated anyway; its replies go untranslated, as before.
            counters::event(EV_CT_INSERT_FAILED);
            return Some(original.sport);
        }
    }
    // SAFETY: copied out at once.
    let held_by = unsafe { CONNTRACK.get(&*reply_key) }.map(|held| reply_key.peer(held));
    if held_by == Some(*original) {
        let _ = CONNTRACK.insert(&*reply_key, &*reply, u64::from(BPF_ANY));
        return Some(original.sport);
    }
    // The backend answers to the remapped port; the reply entry maps it back.
    reply.flags |= CT_F_REWRITE_DST;
    // SAFETY: a helper without arguments.
    let seed = unsafe { bpf_get_prandom_u32() };
    for attempt in 1..REPLY_PORT_ATTEMPTS {
        let mixed = seed ^ attempt.wrapping_mul(0x9e37_79b9);
        let mut port = REMAP_PORT_MIN + mixed % REMAP_PORTS;
        if port >= EPHEMERAL_START {
            port += EPHEMERAL_END - EPHEMERAL_START;
        }
        let port = (port as u16).to_be();
        reply_key.dport = port;
        if CONNTRACK
            .insert(&*reply_key, &*reply, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            counters::event(EV_REPLY_PORT_REMAPPED);
            return Some(port);
        }
    }
    None
}

/// Another CPU created this flow first: its record, with our reply entry withdrawn if
/// it points elsewhere (when it is the same tuple it is the winner's, rewritten with
/// equal content, and must stay). `None`: the winner's record vanished meanwhile.
#[inline(always)]
pub fn adopt_winner(key: &CtKey, our_reply_key: &CtKey) -> Option<CtEntry> {
    counters::event(EV_CT_RACE_LOST);
    // SAFETY: copied out at once.
    let winner = (unsafe { CONNTRACK.get(key) }).copied()?;
    if key.peer(&winner) != *our_reply_key {
        let _ = CONNTRACK.remove(our_reply_key);
    }
    Some(winner)
}
