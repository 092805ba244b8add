//! Map keys and values shared by the eBPF data path and the userspace agent.
//!
//! Every type is `#[repr(C)]` with its padding spelled out as named fields, so the
//! byte layout is identical on both sides and hash keys never contain
//! uninitialised bytes. Multi-byte address and port fields hold network byte order
//! exactly as they appear on the wire; counters and ids are host order.
#![no_std]

pub mod address_filter;
pub mod conntrack;
pub mod decide;
pub mod fragments;
pub mod key_layout;
pub mod map_name;
pub mod related;
pub mod sctp;
pub mod service;
pub mod settings;
pub mod sock;
pub mod stats;
pub mod tcp;
pub mod transport;

pub use address_filter::*;
pub use conntrack::*;
pub use fragments::*;
pub use related::*;
pub use service::*;
pub use settings::*;
pub use sock::*;
pub use stats::*;
pub use transport::Transport;

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol numbers the data path translates.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;
/// SCTP's programs' slot in the per-hook program arrays (`UPLINK_TRANSPORTS`,
/// `POD_TRANSPORTS`): SCTP is translated by programs of its own, tail-called by the
/// hooks' main programs (a third transport in one program would triple the paths
/// the verifier walks, past its limit).
pub const SCTP_PROGRAM: u32 = 0;
/// ICMP: errors about translated flows are translated back, pings of service
/// addresses refused (the data path and `trace` both say so).
pub const PROTO_ICMP: u8 = 1;
/// ICMPv6 (neighbour discovery among it, which always passes untouched).
pub const PROTO_ICMPV6: u8 = 58;
/// IPv6's programs' slots in the per-hook arrays `UPLINK_IPV6` and `POD_IPV6`: the
/// hooks' main programs (IPv4) tail-call `IPV6_PROGRAM` for an IPv6 frame, which
/// tail-calls `IPV6_SCTP_PROGRAM` for SCTP, as the IPv4 programs hand SCTP over. IPv6
/// in programs of its own: IPv4 packets pay one comparison for it, and each program
/// stays within the verifier's budget.
pub const IPV6_PROGRAM: u32 = 0;
pub const IPV6_SCTP_PROGRAM: u32 = 1;
pub const IPV6_PROGRAMS: u32 = 2;
/// IPv6's programs added since, in the arrays `UPLINK_IPV6_MORE` and `POD_IPV6_MORE`
/// (the first two arrays cannot grow: see proxy-ebpf's `maps`): ICMPv6, which
/// `IPV6_PROGRAM` tail-calls (its errors' translation did not fit that program's
/// stack), ip6ip6 (the uplinks' only: the tunnelled origin did not fit the verifier's
/// budget of `IPV6_PROGRAM`), and room for more without another array.
pub const IPV6_ICMP_PROGRAM: u32 = 0;
pub const IPV6_TUNNEL_PROGRAM: u32 = 1;
pub const IPV6_MORE_PROGRAMS: u32 = 4;

/// An address family, as keys carry it in a `family` byte (`Family::number`).
///
/// IPv4 is 0 on purpose: the byte was padding (always zero) in keys written before
/// keys carried a family, so a pinned map from then reads as IPv4, unchanged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub enum Family {
    #[default]
    V4,
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];
    pub const V4_NUMBER: u8 = 0;
    pub const V6_NUMBER: u8 = 1;

    /// The `family` byte of a key.
    #[inline(always)]
    pub const fn number(self) -> u8 {
        match self {
            Family::V4 => Family::V4_NUMBER,
            Family::V6 => Family::V6_NUMBER,
        }
    }

    /// The family a key's byte names (`None`: a byte no version writes).
    #[inline(always)]
    pub const fn from_number(number: u8) -> Option<Family> {
        match number {
            Family::V4_NUMBER => Some(Family::V4),
            Family::V6_NUMBER => Some(Family::V6),
            _ => None,
        }
    }

    /// How many bits an address of the family has: the length of a host prefix.
    #[inline(always)]
    pub const fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    /// As Kubernetes spells it (`ipFamilies`, `addressType`, kube-proxy's
    /// `ip_family` label).
    pub const fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    pub const fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The family's unspecified address (`0.0.0.0`, `::`): a catch-all prefix's.
    pub const fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(core::net::Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(core::net::Ipv6Addr::UNSPECIFIED),
        }
    }
}

impl core::fmt::Display for Family {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// An IP address of either family in network byte order, as keys and values hold
/// it: an IPv6 address fills the 16 bytes; IPv4 occupies `words[0]` and the other
/// words stay zero. The width alone does not tell the families apart (`a.b.c.d` and
/// `a0b:c0d::` are the same bytes), so every key that holds an address either has
/// a `family` byte or belongs to a service, whose frontend has one family. Why one
/// 16-byte form rather than separate IPv4 maps: README, "Address families".
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

    /// Builds an address from the sixteen octets of an IPv6 address.
    pub const fn from_v6_octets(o: [u8; 16]) -> Addr {
        let mut words = [0u32; 4];
        let mut i = 0;
        while i < 4 {
            words[i] = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
            i += 1;
        }
        Addr { words }
    }

    /// The sixteen octets of an IPv6 address.
    pub const fn v6_octets(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = self.words[i].to_ne_bytes();
            out[4 * i] = b[0];
            out[4 * i + 1] = b[1];
            out[4 * i + 2] = b[2];
            out[4 * i + 3] = b[3];
            i += 1;
        }
        out
    }

    pub const fn from_ip(ip: &IpAddr) -> Addr {
        match ip {
            IpAddr::V4(v4) => Addr::from_v4_octets(v4.octets()),
            IpAddr::V6(v6) => Addr::from_v6_octets(v6.octets()),
        }
    }

    /// The address as the `family` a key or its service says it is.
    pub const fn to_ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(Ipv4Addr::from_octets(self.v4_octets())),
            Family::V6 => IpAddr::V6(Ipv6Addr::from_octets(self.v6_octets())),
        }
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
    ServiceKey => (24, 4),
    ServiceValue => (24, 4),
    BackendSlotKey => (8, 4),
    Backend => (28, 4),
    ConnCounts => (16, 8),
    AffinityKey => (20, 4),
    AffinityValue => (16, 8),
    SourceRangeKey => (20, 4),
    ConfigValue => (16, 4),
    AddrKey => (20, 4),
    NodeAddrFlags => (4, 4),
    ServiceName => (64, 1),
    CtKey => (40, 4),
    CtEntry => (64, 8),
    SockKey => (32, 8),
    SockNat => (32, 4),
    TrafficStats => (40, 8),
    BenchTemplate => (140, 4),
    FragmentKey => (36, 4),
    LoadSettings => (40, 8),
    FragmentPorts => (4, 2),
    ExpectKey => (36, 4),
    Expectation => (136, 8),
}
