//! Connection tracking: one LRU table holding both directions of every translated flow.
//!
//! Each flow has two entries, as in Cilium: the *original* entry keyed by the tuple the
//! client sent (client -> service) and the *reply* entry keyed by the tuple the backend
//! answers with (backend -> client, or backend -> SNAT address). Both entries say how
//! to rewrite the packet they match, so one translation routine serves both directions,
//! and the peer entry of either one is found by reversing the rewritten tuple.

use crate::Addr;

/// Entries in `CONNTRACK` (two per flow). LRU maps evict before they are full, so
/// this is sized well above the expected number of flows.
pub const CONNTRACK_ENTRIES: u32 = 524_288;

/// Key of `CONNTRACK`: the packet's own 5-tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub src: Addr,
    pub dst: Addr,
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    /// `Family::number`. The entry's NAT addresses are of the same family: the data
    /// path translates within a family, never between them.
    pub family: u8,
    pub _pad: [u8; 2],
}

impl CtKey {
    /// The tuple a packet travelling the other way carries.
    #[inline(always)]
    pub const fn reversed(&self) -> CtKey {
        CtKey {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }

    /// The tuple a packet with this tuple carries after `entry` rewrote it.
    #[inline(always)]
    pub fn rewritten(&self, entry: &CtEntry) -> CtKey {
        let mut out = *self;
        if entry.flags & CT_F_REWRITE_SRC != 0 {
            out.src = entry.nat_src;
            out.sport = entry.nat_sport;
        }
        if entry.flags & CT_F_REWRITE_DST != 0 {
            out.dst = entry.nat_dst;
            out.dport = entry.nat_dport;
        }
        out
    }

    /// The key of the other direction's entry of this entry's flow: the reverse of
    /// the rewritten tuple.
    #[inline(always)]
    pub fn peer(&self, entry: &CtEntry) -> CtKey {
        self.rewritten(entry).reversed()
    }
}

/// `CtEntry::state` values (TCP's, moved by `tcp::next`; a UDP entry stays
/// `CT_ESTABLISHED`: `Transport` says which protocol has which).
/// The client's SYN (or a segment of a flow picked up mid-stream) was seen, nothing
/// came back yet.
pub const CT_SYN_SENT: u8 = 0;
/// Both ends answered: the client acknowledged the backend's SYN-ACK.
pub const CT_ESTABLISHED: u8 = 1;
/// A FIN or RST was seen in either direction.
pub const CT_CLOSING: u8 = 2;
/// The backend sent its SYN-ACK; the client has not acknowledged it yet. Still
/// half-open: the SYN timeout, not counted active.
pub const CT_SYN_RECV: u8 = 3;

/// `CtEntry::flags` bits.
pub const CT_F_REWRITE_SRC: u8 = 1;
pub const CT_F_REWRITE_DST: u8 = 2;
/// The entry matches packets from the backend towards the client.
pub const CT_F_REPLY: u8 = 4;
/// The flow was masqueraded (hairpin, or external traffic to a remote backend).
pub const CT_F_SNAT: u8 = 8;
/// A FIN travelled in this entry's direction; the flow closes when both have one.
pub const CT_F_FIN: u8 = 16;
/// Rewriting gives the packet one of this node's addresses as source (a hairpin
/// masquerade, or a NodePort reply): decided once per flow, so that the tc program
/// knows without a look-up per packet that the kernel would drop it as a martian.
pub const CT_F_NODE_SOURCE: u8 = 32;
/// `dsr-ipip` at the entry node: the packet is not rewritten but encapsulated in IPIP
/// from `nat_src` to `nat_dst` (the backend). Only the client's direction is seen, so
/// the entry has no reply peer.
pub const CT_F_ENCAP: u8 = 64;

/// A related flow (`related`): opened by an expectation its announcing flow recorded
/// (a TFTP server's answer from a new port), not by a frontend.
pub const CT_F_RELATED: u8 = 128;

/// Default idle timeouts in seconds, per state (Cilium's values for TCP; UDP as
/// Calico). The agent may set others at load (`CtTimeouts`).
pub const CT_TIMEOUT_SYN_S: u64 = 60;
pub const CT_TIMEOUT_TCP_ESTABLISHED_S: u64 = 21_600;
pub const CT_TIMEOUT_CLOSING_S: u64 = 10;
pub const CT_TIMEOUT_UDP_S: u64 = 60;

/// Which idle timeout an entry follows: an index into `CtTimeouts::ns`.
pub const TIMEOUT_SYN: usize = 0;
pub const TIMEOUT_TCP_ESTABLISHED: usize = 1;
pub const TIMEOUT_CLOSING: usize = 2;
pub const TIMEOUT_UDP: usize = 3;

const NS_PER_S: u64 = 1_000_000_000;

/// The idle timeouts in force, in nanoseconds, by `TIMEOUT_*`: in the data path's
/// `LoadSettings`, and the agent's collector and the tools hold the same value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    pub ns: [u64; 4],
}

impl CtTimeouts {
    pub const DEFAULT: CtTimeouts = CtTimeouts {
        ns: [
            CT_TIMEOUT_SYN_S * NS_PER_S,
            CT_TIMEOUT_TCP_ESTABLISHED_S * NS_PER_S,
            CT_TIMEOUT_CLOSING_S * NS_PER_S,
            CT_TIMEOUT_UDP_S * NS_PER_S,
        ],
    };

    /// Idle timeout of an entry of protocol `proto` in `state`, in nanoseconds (an
    /// entry of a protocol no version of ours tracks has none: it is stale at once).
    #[inline(always)]
    pub const fn of(&self, proto: u8, state: u8) -> u64 {
        match ct_timeout_kind(proto, state) {
            Some(kind) => self.ns[kind & 3],
            None => 0,
        }
    }
}

/// The data path refreshes `last_seen_ns` at most this often, so that an established
/// flow does not write a shared cache line on every packet.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// Value of `CONNTRACK`: how to rewrite a packet of this direction of the flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    pub nat_src: Addr,
    pub nat_dst: Addr,
    /// Network byte order.
    pub nat_sport: u16,
    /// Network byte order.
    pub nat_dport: u16,
    pub service_id: u32,
    pub backend_id: u32,
    pub state: u8,
    pub flags: u8,
    /// Client-to-backend entries: which of the flow's packets announce a related
    /// flow (`HELPER_*`, from the frontend; `related`).
    pub helper: u8,
    /// Client-to-backend entries of flows with a helper: 1 when the backend is on
    /// this node, so that its related flows are met only from pod interfaces (0: only
    /// from uplinks), where its packets come from.
    pub backend_here: u8,
    /// Original entries only: how the flow counts in `CONN_COUNTS` (`ACCT_*`),
    /// changed only by atomic exchange so that no transition is counted twice.
    pub accounting: u32,
    pub _pad2: u32,
    /// CLOCK_MONOTONIC_COARSE nanoseconds of the last refresh.
    pub last_seen_ns: u64,
}

impl CtEntry {
    /// The client's direction of a new flow to a backend at (`addr`, `port`): the
    /// destination rewritten. Masquerading, when decided, rewrites the source too.
    #[inline(always)]
    pub const fn original(
        key: &CtKey,
        (addr, port): (Addr, u16),
        (service_id, backend_id): (u32, u32),
        (state, accounting): (u8, u32),
        now: u64,
    ) -> CtEntry {
        CtEntry {
            nat_src: key.src,
            nat_dst: addr,
            nat_sport: key.sport,
            nat_dport: port,
            service_id,
            backend_id,
            state,
            flags: CT_F_REWRITE_DST,
            helper: crate::HELPER_NONE,
            backend_here: 0,
            accounting,
            _pad2: 0,
            last_seen_ns: now,
        }
    }

    /// The one entry of a new `dsr-ipip` flow: its packets leave encapsulated from
    /// `outer_src` to the backend's node address `outer_dst`, unchanged inside (the
    /// backend answers the client directly, so no reply is ever seen here).
    #[inline(always)]
    pub const fn encapsulated(
        (outer_src, outer_dst): (Addr, Addr),
        (service_id, backend_id): (u32, u32),
        (state, accounting): (u8, u32),
        now: u64,
    ) -> CtEntry {
        CtEntry {
            nat_src: outer_src,
            nat_dst: outer_dst,
            nat_sport: 0,
            nat_dport: 0,
            service_id,
            backend_id,
            state,
            flags: CT_F_ENCAP,
            helper: crate::HELPER_NONE,
            backend_here: 0,
            accounting,
            _pad2: 0,
            last_seen_ns: now,
        }
    }

    /// The backend's direction of the flow whose client direction `key` the
    /// `original` entry rewrites: the source put back to what the client sent to.
    /// Its key is `key.peer(original)`.
    #[inline(always)]
    pub const fn reply_to(key: &CtKey, original: &CtEntry) -> CtEntry {
        CtEntry {
            nat_src: key.dst,
            nat_dst: key.src,
            nat_sport: key.dport,
            nat_dport: key.sport,
            flags: CT_F_REWRITE_SRC | CT_F_REPLY,
            ..*original
        }
    }

    /// Masquerades a new flow: the client's direction (`forward`) leaves from
    /// `snat_addr`, one of this node's addresses, and the reply entry, which the
    /// caller keys to that address, puts the client's address back.
    #[inline(always)]
    pub fn masquerade(forward: &mut CtEntry, reply: &mut CtEntry, snat_addr: Addr) {
        reply.flags |= CT_F_REWRITE_DST | CT_F_SNAT;
        forward.flags |= CT_F_REWRITE_SRC | CT_F_SNAT | CT_F_NODE_SOURCE;
        forward.nat_src = snat_addr;
    }
}

/// `CtEntry::accounting` values, as IPVS counts: a TCP flow is active while it is
/// established, inactive while half-open or closing; a UDP flow is active.
pub const ACCT_ACTIVE: u32 = 0;
pub const ACCT_INACTIVE: u32 = 1;
/// No longer counted (expired or replaced).
pub const ACCT_GONE: u32 = 2;

/// Which timeout (`TIMEOUT_*`) an entry of protocol `proto` in `state` follows
/// (`Transport`'s); `None` for a protocol no version of ours tracks.
#[inline(always)]
pub const fn ct_timeout_kind(proto: u8, state: u8) -> Option<usize> {
    match crate::Transport::from_number(proto) {
        Some(transport) => Some(transport.timeout_kind(state)),
        None => None,
    }
}

#[cfg(feature = "user")]
crate::user_pod!(CtKey, CtEntry);

/// MurmurHash3 (32-bit) of a 5-tuple's four words: each word is mixed in on its own,
/// so structured inputs (sequential addresses and ports) spread evenly. Used by the
/// data path (Maglev, re-hashing, SNAT ports) and by `trace` to predict it.
#[inline(always)]
pub fn flow_hash(key: &CtKey) -> u32 {
    let ports = ((key.sport as u32) << 16) | key.dport as u32;
    let mut h = 0x9747_b28c_u32;
    let words = [key.src.folded(), key.dst.folded(), ports, key.proto as u32];
    let mut i = 0;
    while i < words.len() {
        let mut k = words[i].wrapping_mul(0xcc9e_2d51);
        k = k.rotate_left(15).wrapping_mul(0x1b87_3593);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
        i += 1;
    }
    h ^= 16;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// IPVS's sh/dh bucket of an address: `hash_32(ntohl(addr), 8)` as ip_vs_sh.c and
/// ip_vs_dh.c compute it (the port is not part of it), of the folded address for
/// IPv6 as they do.
#[inline(always)]
pub fn addr_hash(addr: &Addr) -> u32 {
    const GOLDEN_RATIO_32: u32 = 0x61C8_8647;
    u32::from_be(addr.folded()).wrapping_mul(GOLDEN_RATIO_32) >> (32 - 8)
}
