//! TCP as conntrack follows it: which segment moves a tracked flow to which state.
//!
//! A flow counts as established only once both ends have shown they are there: the
//! backend answered the client's SYN (SYN-ACK) and the client acknowledged that answer.
//! A spoofed SYN never gets that far (the forged source does not see the SYN-ACK), so
//! a SYN flood leaves only half-open entries, which keep the short SYN timeout and do
//! not count as active connections (`CtEntry::accounting`). A flow picked up
//! mid-stream (its entry was lost) is established by the backend's answer instead:
//! a backend that does not know the connection resets it.
//!
//! A pure function of the entry and the segment, so that the data path and the unit
//! tests share it; the caller stores the result.

use crate::{
    CT_CLOSING, CT_ESTABLISHED, CT_F_ENCAP, CT_F_FIN, CT_F_REPLY, CT_SYN_RECV, CT_SYN_SENT,
    TIMEOUT_CLOSING, TIMEOUT_SYN, TIMEOUT_TCP_ESTABLISHED,
};

/// TCP flag bits as in byte 13 of the header.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The entry's (state, flags) after a segment with `tcp` flags travelled in its
/// direction. `peer_fin` says whether the other direction already sent its FIN; it
/// costs a map look-up, so it is asked only when this segment carries a FIN.
#[inline(always)]
pub fn next(state: u8, flags: u8, tcp: u8, peer_fin: impl FnOnce() -> bool) -> (u8, u8) {
    let ack = tcp & TCP_ACK != 0;
    let syn = tcp & TCP_SYN != 0;
    let from_backend = flags & CT_F_REPLY != 0;
    if tcp & TCP_RST != 0 {
        return (CT_CLOSING, flags);
    }
    if flags & CT_F_ENCAP != 0 {
        // dsr-ipip: only the client's half is seen. Its first ACK acknowledges the
        // backend's SYN-ACK; its FIN ends the flow here.
        return if tcp & TCP_FIN != 0 {
            (CT_CLOSING, flags)
        } else if state == CT_SYN_SENT && ack && !syn {
            (CT_ESTABLISHED, flags)
        } else {
            (state, flags)
        };
    }
    if tcp & TCP_FIN != 0 {
        if flags & CT_F_FIN != 0 {
            return (state, flags); // a retransmitted FIN
        }
        let state = if peer_fin() { CT_CLOSING } else { state };
        return (state, flags | CT_F_FIN);
    }
    match state {
        // The backend answers: a SYN-ACK, or (for a flow picked up mid-stream) any
        // acknowledgement, which only a backend that knows the connection sends.
        CT_SYN_SENT if from_backend && ack => {
            let state = if syn { CT_SYN_RECV } else { CT_ESTABLISHED };
            (state, flags)
        }
        // The client acknowledges the SYN-ACK: the handshake is complete. (A client's
        // SYN on a closed flow is a new connection, never a state of the old one:
        // `reopens`.)
        CT_SYN_RECV if !from_backend && ack && !syn => (CT_ESTABLISHED, flags),
        _ => (state, flags),
    }
}

/// Whether a segment with `tcp` flags on an entry in (state, flags) opens a new
/// connection on a closed flow's tuple: the client's SYN (its port came round again
/// while the flow waited out its closing timeout). Such a connection is a new flow,
/// scheduled afresh (IPVS's `conn_reuse_mode` 1, its default), not the old flow's
/// continuation: keeping the old backend sent it to a backend the service may have
/// dropped since (kube-proxy's IPVS port-reuse trouble) and past the scheduler's
/// weights and counts.
#[inline(always)]
pub fn reopens(state: u8, flags: u8, tcp: u8) -> bool {
    state == CT_CLOSING
        && flags & CT_F_REPLY == 0
        && tcp & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

/// Which idle timeout a TCP entry in `state` follows: half-open flows keep the short
/// SYN timeout (a flood's entries go soon).
#[inline(always)]
pub const fn timeout_kind(state: u8) -> usize {
    match state {
        CT_SYN_SENT | CT_SYN_RECV => TIMEOUT_SYN,
        CT_ESTABLISHED => TIMEOUT_TCP_ESTABLISHED,
        _ => TIMEOUT_CLOSING,
    }
}
