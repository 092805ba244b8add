//! Related flows (see `proxy_common::related`): a helper's packet records an
//! expectation (`announce`); the first packet that meets it opens the related flow
//! (`claim`), which `translate` then follows like any tracked flow. Expectations are
//! assembled in `RELATED_SCRATCH`, not on the stack: two conntrack entries do not fit
//! beside the rest of a packet's path in the verifier's 512 bytes.

use aya_ebpf::bindings::BPF_NOEXIST;
use proxy_common::{
    CtEntry, CtKey, ExpectKey, Expectation, EV_EXPECTED, EV_RELATED, EV_RELATED_CLASH,
    EXPECTATION_TIMEOUT_NS, HELPER_NONE, HELPER_TFTP, PROTO_UDP, TFTP_RRQ, TFTP_WRQ,
};

use crate::{
    counters,
    maps::{CONNTRACK, EXPECTATIONS, EXPECTED_UNTIL, RELATED_SCRATCH},
    packet::Packet,
    parse::Flow,
};

/// Whether an expectation may be live: only then is a packet that matches no tracked
/// flow looked up in `EXPECTATIONS`.
#[inline(always)]
pub fn may_be_expected(now: u64) -> bool {
    EXPECTED_UNTIL.get(0).is_some_and(|until| now < *until)
}

/// Records the related flow a client-to-backend packet announces, if its flow's
/// `helper` says it does: the backend may answer from any port to where it answers
/// this flow. The flow's entries are read back from `CONNTRACK`, so a flow whose
/// entries could not be stored announces nothing. Another flow's expectation of the
/// same tuple is left alone (netfilter refuses such a clash too).
// By reference, not by value as clippy would have it: a value would be copied to the
// stack, which is what the scratch slot is for.
#[expect(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
pub fn announce<P: Packet>(pkt: &P, flow: &Flow, helper: u8, now: u64) {
    // A later fragment (no L4 header) announces nothing: its payload is not where
    // the helper reads.
    if helper == HELPER_NONE || !flow.has_l4 || !announces(pkt, flow, helper) {
        return;
    }
    // SAFETY: this CPU's scratch slot, nobody else's for the program's run; the
    // keys live there too, off the stack (which a new flow's path fills already).
    let Some(scratch) = RELATED_SCRATCH.get_ptr_mut(0).map(|s| unsafe { &mut *s }) else {
        return;
    };
    let Some(to_backend) = CONNTRACK.get_ptr(&flow.key) else {
        return;
    };
    // SAFETY: a live map value.
    scratch.ct_key = flow.key.peer(unsafe { &*to_backend });
    let Some(to_client) = CONNTRACK.get_ptr(&scratch.ct_key) else {
        return;
    };
    scratch.expect_key = ExpectKey::of(&scratch.ct_key);
    let expires_ns = now + EXPECTATION_TIMEOUT_NS;
    let expectation = &mut scratch.expectation;
    // SAFETY: live map values, copied.
    unsafe {
        expectation.to_backend = *to_backend;
        expectation.to_client = *to_client;
    }
    expectation.expires_ns = expires_ns;
    let recorded = match EXPECTATIONS.get_ptr_mut(&scratch.expect_key) {
        // A retransmitted request: the same expectation, for longer.
        // SAFETY: a live map value; a plain store of its expiry.
        Some(existing) if unsafe { (*existing).same_announcer(expectation) } => {
            unsafe { (*existing).expires_ns = expires_ns };
            true
        }
        Some(_) => false,
        None => EXPECTATIONS
            .insert(&scratch.expect_key, &*expectation, u64::from(BPF_NOEXIST))
            .is_ok(),
    };
    if !recorded {
        counters::event(EV_RELATED_CLASH);
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

/// Where a TFTP request's opcode ends in its UDP header and payload.
const TFTP_OPCODE_END: u16 = 8 + 2;

/// Whether the packet is one that announces a related flow for this helper.
#[inline(always)]
fn announces<P: Packet>(pkt: &P, flow: &Flow, helper: u8) -> bool {
    match helper {
        // A read or write request: its opcode opens the UDP payload (RFC 1350), which
        // must hold it: the UDP length (which parsing keeps within the IP length)
        // says so, not the frame, whose padding a receiver trims away.
        HELPER_TFTP if flow.key.proto == PROTO_UDP => {
            let Some(start) = pkt.ptr_at::<[u8; TFTP_OPCODE_END as usize]>(flow.l4_off) else {
                return false;
            };
            // SAFETY: bounds-checked by ptr_at.
            let start = unsafe { *start };
            let udp_len = u16::from_be_bytes([start[4], start[5]]);
            let opcode = u16::from_be_bytes([start[8], start[9]]);
            udp_len >= TFTP_OPCODE_END && (opcode == TFTP_RRQ || opcode == TFTP_WRQ)
        }
        _ => false,
    }
}

/// What became of a packet that matched no tracked flow, as far as expectations go.
/// No payload: the met entry is read from the scratch slot (`met_entry`), since LLVM
/// leaves payload slots of other variants unset (see `translate::Verdict`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Nothing expected it: it goes on to the frontends.
    NotExpected,
    /// It met an expectation: translate it as `met_entry` says.
    Met,
    /// It matched an expectation's tuple but may not meet it (it arrived where the
    /// backend's packets do not, or the expectation or its announcing flow is gone, or
    /// a tracked flow holds the tuple): passed untranslated (`Pass`) or, when it can
    /// only be spoofed, dropped (`Drop`).
    Pass,
    Drop,
}

/// Opens the related flow a packet that matches no tracked flow was expected to
/// start (`from_pod`: it came from a pod interface, not an uplink): both of its
/// entries recorded, the expectation used up.
// Entries by reference: see `announce`.
#[expect(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
pub fn claim(flow: &Flow, from_pod: bool, now: u64) -> Claim {
    // SAFETY: this CPU's scratch slot, nobody else's for the program's run.
    let Some(scratch) = RELATED_SCRATCH.get_ptr_mut(0).map(|s| unsafe { &mut *s }) else {
        return Claim::NotExpected;
    };
    scratch.expect_key = ExpectKey::of(&flow.key);
    let Some(expectation) = EXPECTATIONS.get_ptr(&scratch.expect_key) else {
        return Claim::NotExpected;
    };
    // SAFETY: a live map value, copied.
    scratch.expectation = unsafe { *expectation };
    let related = &mut scratch.expectation;
    // The backend's packets arrive from its pod's interface if it is on this node,
    // else from an uplink: one from elsewhere with its address is spoofed (the
    // expectation stays for the real one).
    if (related.to_backend.backend_here != 0) != from_pod {
        counters::event(EV_RELATED_CLASH);
        return Claim::Drop;
    }
    let _ = EXPECTATIONS.remove(&scratch.expect_key);
    // Its announcing flow still tracked (an entry idle past its timeout counts until
    // the collector or a new packet removes it: a lighter test, for the verifier).
    scratch.ct_key = related.announcer_reply(&scratch.expect_key);
    let announcer_lives = CONNTRACK.get_ptr(&scratch.ct_key).is_some();
    if now >= related.expires_ns || !announcer_lives {
        return Claim::Pass;
    }
    related.meet(flow.key.sport, now);
    scratch.ct_key = flow.key.peer(&related.to_client);
    let opened = CONNTRACK
        .insert(&scratch.ct_key, &related.to_backend, u64::from(BPF_NOEXIST))
        .is_ok()
        && CONNTRACK
            .insert(&flow.key, &related.to_client, u64::from(BPF_NOEXIST))
            .is_ok();
    if !opened {
        // A tracked flow holds the client's side of the tuple (never displaced), or
        // another CPU opened the flow with an earlier packet of it at this instant:
        // this one goes untranslated, as a lost packet would.
        counters::event(EV_RELATED_CLASH);
        return Claim::Pass;
    }
    counters::event(EV_RELATED);
    Claim::Met
}

/// The entry of the related flow `claim` just opened (`Claim::Met`), in this CPU's
/// scratch slot.
#[inline(always)]
pub fn met_entry() -> Option<*const CtEntry> {
    let scratch = RELATED_SCRATCH.get_ptr(0)?;
    // SAFETY: a field of this CPU's scratch slot.
    Some(unsafe { &raw const (*scratch).expectation.to_client })
}

/// Per-CPU room of `related` (`RELATED_SCRATCH`): an expectation and the entries of
/// the related flow that meets one, and the keys looked up meanwhile.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Scratch {
    expectation: Expectation,
    expect_key: ExpectKey,
    ct_key: CtKey,
}
