//! Map keys and values shared by the eBPF data path and the userspace agent.
//!
//! Every type is `#[repr(C)]` with its padding spelled out as named fields, so the
//! byte layout is identical on both sides and hash keys never contain
//! uninitialised bytes. Multi-byte address and port fields hold network byte order
//! exactly as they appear on the wire; counters and ids are host order.
#![no_std]

pub mod conntrack;
pub mod decide;
pub mod map_name;
pub mod service;
pub mod sock;
pub mod stats;
pub mod tcp;

pub use conntrack::*;
pub use service::*;
pub use sock::*;
pub use stats::*;

/// IP protocol numbers the data path translates.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// An IP address in network byte order. IPv4 occupies `words[0]` and the other
/// words stay zero; the 16-byte width keeps every key ready for IPv6 without a
/// layout change.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    pub words: [u32; 4],
}

impl Addr {
    pub const ZERO: Addr = Addr { words: [0; 4] };

    /// Wraps an IPv4 address already in network byte order (as read from a header).
    #[inline(always)]
    pub const fn from_v4_be(be: u32) -> Addr {
        Addr {
            words: [be, 0, 0, 0],
        }
    }

    /// The IPv4 address in network byte order.
    #[inline(always)]
    pub const fn v4_be(&self) -> u32 {
        self.words[0]
    }

    /// Builds an address from the four octets of an IPv4 address.
    pub const fn from_v4_octets(o: [u8; 4]) -> Addr {
        Addr::from_v4_be(u32::from_ne_bytes(o))
    }

    /// The four octets of the IPv4 address.
    pub const fn v4_octets(&self) -> [u8; 4] {
        self.words[0].to_ne_bytes()
    }

    /// The address folded to one word (the XOR of its words), in network byte order:
    /// what hashes take of it. IPVS folds IPv6 addresses the same way for sh and dh;
    /// an IPv4 address folds to itself, so IPv4 hashes are those of the address.
    #[inline(always)]
    pub const fn folded(&self) -> u32 {
        self.words[0] ^ self.words[1] ^ self.words[2] ^ self.words[3]
    }

    pub const fn is_zero(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == 0 && self.words[3] == 0
    }
}

/// Implements `aya::Pod` for map types when built for userspace.
#[cfg(feature = "user")]
macro_rules! user_pod {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: the type is repr(C), Copy and has no implicit padding.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
#[cfg(feature = "user")]
pub(crate) use user_pod;

#[cfg(feature = "user")]
user_pod!(Addr);

/// Asserts at compile time the size and alignment of shared types: both sides read
/// these bytes (and pinned maps keep them across versions), so a layout change must be
/// deliberate, and comes with a new map layout check in the agent's loader.
macro_rules! assert_layout {
    ($($t:ty => ($size:literal, $align:literal)),* $(,)?) => {
        $(
            const _: () = assert!(
                core::mem::size_of::<$t>() == $size && core::mem::align_of::<$t>() == $align
            );
        )*
    };
}

assert_layout! {
    Addr => (16, 4),
    ServiceKey => (20, 4),
    ServiceValue => (24, 4),
    BackendSlotKey => (8, 4),
    Backend => (28, 4),
    ConnCounts => (16, 8),
    AffinityKey => (20, 4),
    AffinityValue => (16, 8),
    SourceRangeKey => (8, 4),
    ConfigValue => (16, 4),
    NodeAddrFlags => (4, 4),
    ServiceName => (64, 1),
    CtKey => (40, 4),
    CtEntry => (64, 8),
    SockKey => (32, 8),
    SockNat => (32, 4),
    TrafficStats => (40, 8),
    BenchTemplate => (68, 4),
}
