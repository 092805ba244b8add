//! The transport protocols the data path translates, and everything that differs
//! between them, decided here by an exhaustive match: where the header keeps what
//! translation touches, and how conntrack follows a flow (its states and their idle
//! timeouts). A protocol is never "TCP because it is not UDP"; a new one (SCTP) is a
//! variant here, and the compiler names every place that must learn it.

use crate::{
    sctp, tcp, ACCT_ACTIVE, ACCT_INACTIVE, CT_ESTABLISHED, CT_SYN_SENT, PROTO_SCTP, PROTO_TCP,
    PROTO_UDP, TIMEOUT_UDP,
};

/// Also the agent's `model::Protocol` (a Kubernetes port's protocol), so that the
/// protocols and their numbers are listed once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub enum Transport {
    Tcp,
    Udp,
    Sctp,
}

impl Transport {
    /// The IP protocol number.
    #[inline(always)]
    pub const fn number(self) -> u8 {
        match self {
            Transport::Tcp => PROTO_TCP,
            Transport::Udp => PROTO_UDP,
            Transport::Sctp => PROTO_SCTP,
        }
    }

    #[inline(always)]
    pub const fn from_number(proto: u8) -> Option<Transport> {
        match proto {
            PROTO_TCP => Some(Transport::Tcp),
            PROTO_UDP => Some(Transport::Udp),
            PROTO_SCTP => Some(Transport::Sctp),
            _ => None,
        }
    }

    /// A new flow's first conntrack (state, accounting) for protocol number `proto`:
    /// TCP and SCTP start half-open and inactive, also when picked up mid-stream (only
    /// the answers make them established, see `tcp` and `sctp`, so forged packets
    /// cannot create long-lived entries); UDP is established and active from its first
    /// datagram.
    /// Arithmetic on the number rather than a match: on the data path a branch here
    /// doubled the paths the verifier walks through the rest of a new flow (and a
    /// comparison with UDP's number instead of TCP's added half as many again). Of
    /// the three transports, bit 2 of the number is set for exactly the two with a
    /// handshake.
    #[inline(always)]
    pub const fn opening(proto: u8) -> (u8, u32) {
        const _: () = assert!(CT_SYN_SENT == 0 && CT_ESTABLISHED == 1);
        const _: () = assert!(ACCT_ACTIVE == 0 && ACCT_INACTIVE == 1);
        const _: () = assert!(PROTO_TCP & 4 != 0 && PROTO_SCTP & 4 != 0 && PROTO_UDP & 4 == 0);
        let handshake = (proto >> 2) & 1;
        (1 - handshake, handshake as u32)
    }

    /// The smallest header: ports, and everything up to the checksum.
    #[inline(always)]
    pub const fn min_header_len(self) -> usize {
        match self {
            Transport::Tcp => 20,
            Transport::Udp => 8,
            Transport::Sctp => sctp::MIN_PACKET_LEN,
        }
    }

    /// Where the checksum sits in the header.
    #[inline(always)]
    pub const fn check_offset(self) -> usize {
        match self {
            Transport::Tcp => 16,
            Transport::Udp => 6,
            Transport::Sctp => sctp::CHECKSUM_OFFSET,
        }
    }

    /// A tracked entry's (state, flags) after a packet with `l4_flags` (TCP's flag
    /// byte, or SCTP's first chunk type) travelled in its direction; `peer_fin` as
    /// `tcp::next` and `sctp::next` ask it. UDP has one state: its entries live while
    /// datagrams come.
    #[inline(always)]
    pub fn next(
        self,
        state: u8,
        flags: u8,
        l4_flags: u8,
        peer_fin: impl FnOnce() -> bool,
    ) -> (u8, u8) {
        match self {
            Transport::Tcp => tcp::next(state, flags, l4_flags, peer_fin),
            Transport::Sctp => sctp::next(state, flags, l4_flags, peer_fin),
            Transport::Udp => (state, flags),
        }
    }

    /// Which idle timeout (`TIMEOUT_*`) an entry in `state` follows.
    #[inline(always)]
    pub const fn timeout_kind(self, state: u8) -> usize {
        match self {
            Transport::Tcp | Transport::Sctp => tcp::timeout_kind(state),
            Transport::Udp => TIMEOUT_UDP,
        }
    }
}

impl core::fmt::Display for Transport {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "TCP",
            Transport::Udp => "UDP",
            Transport::Sctp => "SCTP",
        })
    }
}
