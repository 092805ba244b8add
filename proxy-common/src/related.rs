//! Related flows: a flow that a tracked flow announces and that does not match it,
//! like netfilter's conntrack expectations. A TFTP server answers a read or write
//! request from a new port of its own; that answer, and the transfer that follows in
//! both directions, are a new UDP flow that no frontend matches. When a packet of a
//! flow whose frontend has a helper (`ServiceValue::helper`) announces such a flow
//! (a TFTP request), the data path records an *expectation*: a packet from the
//! backend's address, from any port, to the address and port the backend answers
//! the request at. The first packet that matches it opens the related flow with the
//! translations of the announcing flow's two directions (reverse NAT, masquerade
//! included), only the backend's new port differing, as netfilter's
//! `nf_nat_follow_master` does; the expectation is then used up.
//!
//! Met only as netfilter would meet it, and no more: while the announcing flow lives
//! (its backend-to-client entry is live), arriving where the backend's packets arrive
//! (a pod interface for a backend on this node, an uplink for another node's), and
//! without displacing a tracked flow or another flow's expectation (both are
//! inserted only if absent; a clash leaves the packet untranslated, counted as
//! `related_clash`).
//!
//! The mechanism knows nothing of TFTP: a helper only decides which packets announce
//! (`HELPER_*`), and what is expected is always "the backend answers from any port".

use crate::{Addr, CtEntry, CtKey};

/// `ServiceValue::helper` and `CtEntry::helper` values: which packets of the flow
/// announce a related flow. No helper.
pub const HELPER_NONE: u8 = 0;
/// TFTP: a read (RRQ) or write (WRQ) request from the client (netfilter's
/// `nf_conntrack_tftp`).
pub const HELPER_TFTP: u8 = 1;

/// The port a UDP service port gets the TFTP helper on without being asked (as the
/// kernel's TFTP helper watches port 69).
pub const TFTP_PORT: u16 = 69;
/// TFTP opcodes that announce a transfer (RFC 1350): read and write requests.
pub const TFTP_RRQ: u16 = 1;
pub const TFTP_WRQ: u16 = 2;

/// Expectations at once (LRU: under a flood of requests, the oldest go first).
pub const EXPECTATION_ENTRIES: u32 = 4_096;
/// How long an expectation waits for its first packet: netfilter's TFTP helper's
/// five minutes.
pub const EXPECTATION_TIMEOUT_NS: u64 = 300 * 1_000_000_000;

/// Key of `EXPECTATIONS`: the tuple the related flow's first packet carries, but for
/// its source port, which may be any.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExpectKey {
    /// The backend's address.
    pub src: Addr,
    /// Where the backend answers the announcing flow: the client, or the node's
    /// masquerade address.
    pub dst: Addr,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    /// `Family::number`.
    pub family: u8,
}

impl ExpectKey {
    /// The expectation a packet of tuple `key` meets: its tuple but the source port.
    #[inline(always)]
    pub const fn of(key: &CtKey) -> ExpectKey {
        ExpectKey {
            src: key.src,
            dst: key.dst,
            dport: key.dport,
            proto: key.proto,
            family: key.family,
        }
    }
}

/// Value of `EXPECTATIONS`: the announcing flow's two conntrack entries, which the
/// related flow's entries copy with the backend's new port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expectation {
    /// The announcing flow's backend-to-client entry.
    pub to_client: CtEntry,
    /// Its client-to-backend entry.
    pub to_backend: CtEntry,
    /// CLOCK_MONOTONIC_COARSE nanoseconds after which it is not met any more.
    pub expires_ns: u64,
}

impl Expectation {
    /// The key of the announcing flow's backend-to-client entry, of which `key` is
    /// the expected tuple: an expectation is met only while that flow lives, as
    /// netfilter removes a connection's expectations with it.
    #[inline(always)]
    pub const fn announcer_reply(&self, key: &ExpectKey) -> CtKey {
        CtKey {
            src: key.src,
            dst: key.dst,
            sport: self.to_backend.nat_dport,
            dport: key.dport,
            proto: key.proto,
            family: key.family,
            _pad: [0; 2],
        }
    }

    /// Whether `other` was recorded by the same announcing flow (the same client and
    /// backend port): a retransmitted request refreshes its expectation, another
    /// flow's is left alone.
    #[inline(always)]
    pub fn same_announcer(&self, other: &Expectation) -> bool {
        self.to_client.nat_dst == other.to_client.nat_dst
            && self.to_client.nat_dport == other.to_client.nat_dport
            && self.to_backend.nat_dport == other.to_backend.nat_dport
    }

    /// Turns the announcing flow's entries into those of the related flow whose first
    /// packet, from the backend's `port`, met this expectation: the backend-to-client
    /// one (for that packet) and the client-to-backend one, each counted nowhere
    /// (`ACCT_GONE`: the announcing flow is the connection) and announcing nothing
    /// more, marked `CT_F_RELATED`. In place: the data path does it in per-CPU scratch memory, as two entries
    /// do not fit its stack beside the rest of a packet's path.
    #[inline(always)]
    pub fn meet(&mut self, port: u16, now: u64) {
        // The backend's new port is kept as it is: the client answers to it.
        self.to_client.nat_sport = port;
        self.to_backend.nat_dport = port;
        for entry in [&mut self.to_client, &mut self.to_backend] {
            entry.flags |= crate::CT_F_RELATED;
            entry.helper = HELPER_NONE;
            entry.accounting = crate::ACCT_GONE;
            entry.last_seen_ns = now;
        }
    }
}

#[cfg(feature = "user")]
crate::user_pod!(ExpectKey, Expectation);
