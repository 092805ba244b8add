//! Socket-level translation for traffic that starts on the node itself (host-network
//! pods, the kubelet, node processes): the cgroup hooks rewrite the destination at
//! connect()/sendmsg() time and restore the service address in recvmsg()/getpeername().

use crate::Addr;

/// Entries in `SOCK_REVERSE` and `SOCK_AFFINITY`.
pub const SOCK_ENTRIES: u32 = 65_536;

/// Key of the socket maps: one socket's view of one peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// The kernel's socket cookie.
    pub cookie: u64,
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    /// `Family::number` (the NAT address of `SockNat` is of the same family).
    pub family: u8,
    pub _pad: [u8; 4],
}

/// Value of `SOCK_REVERSE` (backend -> service address as the application sees it)
/// and `SOCK_AFFINITY` (service address -> the backend unconnected UDP keeps using).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockNat {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
    pub service_id: u32,
    /// With `slot`, lets the data path check that the remembered backend still serves.
    pub backend_id: u32,
    pub slot: u32,
}

#[cfg(feature = "user")]
crate::user_pod!(SockKey, SockNat);
