//! The measurement behind the address layout (README, "Address families"): conntrack
//! look-ups in a table keyed as the data path's are (16-byte addresses of either
//! family: a 40-byte key, a 64-byte entry) against one keyed for IPv4 alone (a
//! 16-byte key, a 40-byte entry, as separate IPv4 maps would have), both of
//! `CONNTRACK_ENTRIES` and filled alike. Shared by the bench wrapper's programs and
//! `cargo xtask bench --only keys`, which fills the tables with these keys.

/// A `CtKey` of today's layout, as words.
pub type WideKey = [u32; 10];
/// A `CtEntry` of today's layout.
pub type WideEntry = [u64; 8];
/// The IPv4-only key: source, destination, ports, protocol.
pub type NarrowKey = [u32; 4];
/// The IPv4-only entry: NAT addresses and ports, ids, state and flags, accounting,
/// last seen.
pub type NarrowEntry = [u64; 5];

/// Flows in each table. The programs look up the first `KEYS_ACTIVE[0]` of them in
/// turn: a few (their entries stay in the CPU's caches, so the hash and the key
/// comparison show) or all (most look-ups miss the caches, so the entry size shows).
pub const FILLED: u32 = 262_144;

const DESTINATION: u32 = 0x0a60_0001;
const PROTOCOL: u32 = 6;

/// The `i`-th flow's ports: the client port varies with the flow, as the source does.
#[inline(always)]
const fn ports(i: u32) -> u32 {
    (i.wrapping_mul(0x9e37) & 0xffff) << 16 | 80
}

#[inline(always)]
pub const fn wide_key(i: u32) -> WideKey {
    [i, 0, 0, 0, DESTINATION, 0, 0, 0, ports(i), PROTOCOL]
}

#[inline(always)]
pub const fn narrow_key(i: u32) -> NarrowKey {
    [i, DESTINATION, ports(i), PROTOCOL]
}

const _: () = assert!(core::mem::size_of::<WideKey>() == core::mem::size_of::<crate::CtKey>());
const _: () = assert!(core::mem::size_of::<WideEntry>() == core::mem::size_of::<crate::CtEntry>());
