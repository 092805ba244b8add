//! IPv4 fragments of translated flows. Only a datagram's first fragment carries the
//! L4 header, so the data path remembers its ports under the fragments' common
//! identity (addresses, IP id, protocol) and translates the later fragments as their
//! flow says, addresses only (Cilium's IPv4 fragment tracking; kube-proxy gets the
//! same from netfilter's reassembly). A later fragment that arrives before its first
//! one (reordered) finds nothing and passes untouched.

use crate::Addr;

/// Datagrams being fragmented at once (LRU: the oldest are forgotten first).
pub const FRAGMENT_ENTRIES: u32 = 8_192;

/// Key of `FRAGMENTS`: what every fragment of one datagram carries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: Addr,
    pub dst: Addr,
    /// The IP identification, network byte order.
    pub id: u16,
    pub proto: u8,
    /// `Family::number`.
    pub family: u8,
}

/// Value of `FRAGMENTS`: the datagram's ports, from its first fragment (network
/// byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentPorts {
    pub sport: u16,
    pub dport: u16,
}

#[cfg(feature = "user")]
crate::user_pod!(FragmentKey, FragmentPorts);
