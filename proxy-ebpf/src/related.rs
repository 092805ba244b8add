//! Related flows (see `proxy_common::related`): a helper's packet records an
//! expectation (`announce`); the first packet that meets it opens the related flow
//! (`claim`), which `translate` then follows like any tracked flow. Expectations are
//! assembled in `RELATED_SCRATCH`, not on the stack: two conntrack entries do not fit
//! beside the rest of a packet's path in the verifier's 512 bytes.

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use proxy_common::{
    CtEntry, ExpectKey, EV_CT_INSERT_FAILED, EV_CT_RACE_LOST, EV_EXPECTED, EV_RELATED,
    EXPECTATION_TIMEOUT_NS, HELPER_NONE, HELPER_TFTP, PROTO_UDP, TFTP_RRQ, TFTP_WRQ,
};

use crate::{
    counters,
    maps::{CONNTRACK, EXPECTATIONS, EXPECTED_UNTIL, RELATED_SCRATCH},
    packet::Packet,
    parse::Flow,
};

const EEXIST: i32 = -17;

/// Whether an expectation may be live: only then is a packet that matches no tracked
/// flow looked up in `EXPECTATIONS`.
#[inline(always)]
pub fn may_be_expected(now: u64) -> bool {
    EXPECTED_UNTIL.get(0).is_some_and(|until| now < *until)
}

/// Records the related flow a client-to-backend packet announces, if its flow's
/// `helper` says it does: the backend may answer from any port to where it answers
/// this flow. The flow's entries are read back from `CONNTRACK`, so a flow whose
/// entries could not be stored announces nothing.
// By reference, not by value as clippy would have it: a value would be copied to the
// stack, which is what the scratch slot is for.
#[expect(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
pub fn announce<P: Packet>(pkt: &P, flow: &Flow, helper: u8, now: u64) {
    if helper == HELPER_NONE || !announces(pkt, flow, helper) {
        return;
    }
    let Some(scratch) = RELATED_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let Some(to_backend) = CONNTRACK.get_ptr(flow.key) else {
        return;
    };
    // SAFETY: live map values and this CPU's scratch slot; copied field by field.
    let reply_key = flow.key.peer(unsafe { &*to_backend });
    let Some(to_client) = CONNTRACK.get_ptr(reply_key) else {
        return;
    };
    let expires_ns = now + EXPECTATION_TIMEOUT_NS;
    // SAFETY: as above.
    let inserted = unsafe {
        (*scratch).to_backend = *to_backend;
        (*scratch).to_client = *to_client;
        (*scratch).expires_ns = expires_ns;
        EXPECTATIONS.insert(ExpectKey::of(&reply_key), &*scratch, u64::from(BPF_ANY))
    };
    if inserted.is_err() {
        return;
    }
    if let Some(until) = EXPECTED_UNTIL.get_ptr_mut(0) {
        // SAFETY: a live array slot; racing writers all store a time one expectation
        // timeout past their own moment, so whichever wins keeps the gate open for
        // every live expectation but by the coarse clock's step.
        unsafe { *until = expires_ns };
    }
    counters::event(EV_EXPECTED);
}

/// Whether the packet is one that announces a related flow for this helper.
#[inline(always)]
fn announces<P: Packet>(pkt: &P, flow: &Flow, helper: u8) -> bool {
    match helper {
        // A read or write request: its opcode opens the UDP payload (RFC 1350).
        HELPER_TFTP if flow.key.proto == PROTO_UDP => {
            let Some(opcode) = pkt.ptr_at::<[u8; 2]>(flow.l4_off + 8) else {
                return false;
            };
            // SAFETY: bounds-checked by ptr_at.
            let opcode = u16::from_be_bytes(unsafe { *opcode });
            opcode == TFTP_RRQ || opcode == TFTP_WRQ
        }
        _ => false,
    }
}

/// Opens the related flow a packet that matches no tracked flow was expected to
/// start: both of its entries recorded, the expectation used up. The entry that
/// translates this packet (in this CPU's scratch slot, valid for the rest of the
/// program's run), or `None` when nothing expected it.
// Entries by reference: see `announce`.
#[expect(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
pub fn claim(flow: &Flow, now: u64) -> Option<*const CtEntry> {
    let key = ExpectKey::of(&flow.key);
    let expectation = EXPECTATIONS.get_ptr(key)?;
    let scratch = RELATED_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: a live map value copied into this CPU's scratch slot.
    let live = unsafe {
        *scratch = *expectation;
        now < (*scratch).expires_ns
    };
    let _ = EXPECTATIONS.remove(key);
    if !live {
        return None;
    }
    // SAFETY: this CPU's scratch slot, nobody else's for the program's run.
    let related = unsafe { &mut *scratch };
    related.meet(flow.key.sport, now);
    let client_key = flow.key.peer(&related.to_client);
    if CONNTRACK
        .insert(client_key, &related.to_backend, u64::from(BPF_ANY))
        .is_err()
    {
        counters::event(EV_CT_INSERT_FAILED);
    }
    match CONNTRACK.insert(flow.key, &related.to_client, u64::from(BPF_NOEXIST)) {
        Ok(()) => counters::event(EV_RELATED),
        // Another CPU opened it with an earlier packet: the same translation.
        Err(EEXIST) => counters::event(EV_CT_RACE_LOST),
        Err(_) => counters::event(EV_CT_INSERT_FAILED),
    }
    Some(&related.to_client)
}
