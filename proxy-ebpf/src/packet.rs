//! The one difference between the XDP and tc hooks the translation logic cares about:
//! how header fields are rewritten. XDP writes the bytes and fixes checksums itself;
//! tc goes through the skb helpers, which also keep the kernel's checksum state
//! (CHECKSUM_PARTIAL from local sockets, CHECKSUM_COMPLETE) right. SCTP's programs
//! see their packets through `SctpPacket`, whose checksum is SCTP's.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use proxy_common::{sctp, Addr, Family, PROTO_UDP, SCTP_PROGRAM};

use crate::{
    checksum,
    maps::{POD_TRANSPORTS, UPLINK_TRANSPORTS},
    parse::Flow,
};

pub const ETH_LEN: usize = 14;
/// Offsets inside the IPv4 header.
pub const IP_CHECK: usize = 10;
pub const IP_SRC: usize = 12;
pub const IP_DST: usize = 16;
/// Offsets inside the L4 header (ports are at the same place for TCP, UDP and SCTP).
pub const L4_SPORT: usize = 0;
pub const L4_DPORT: usize = 2;

/// Which of a packet's two addresses (or ports) a rewrite replaces.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Src,
    Dst,
}

impl Side {
    /// The address field's offset in an IPv4 packet's frame.
    #[inline(always)]
    fn ipv4_offset(self) -> usize {
        match self {
            Side::Src => ETH_LEN + IP_SRC,
            Side::Dst => ETH_LEN + IP_DST,
        }
    }

    #[inline(always)]
    pub fn port_offset(self) -> usize {
        match self {
            Side::Src => L4_SPORT,
            Side::Dst => L4_DPORT,
        }
    }
}

pub trait Packet {
    /// Whether the program handling the packet translates SCTP (and nothing else) or
    /// TCP and UDP: SCTP has programs of its own (see `main`), which see their packets
    /// as `SctpPacket`s. Known at compile time, so that each program holds the code of
    /// its own transports only.
    const SCTP: bool = false;

    fn start(&self) -> usize;
    fn end(&self) -> usize;
    /// The whole packet's length (for tc, beyond the linear part too).
    fn len(&self) -> usize;

    /// Replaces the source or destination address of the flow's family and fixes the
    /// checksums that cover it (IPv4's header checksum, the L4 pseudo-header).
    #[inline(always)]
    fn rewrite_addr(&self, flow: &Flow, side: Side, old: &Addr, new: &Addr) -> Result<(), ()> {
        match flow.family {
            Family::V4 => self.rewrite_addr_v4(flow, side.ipv4_offset(), old.v4_be(), new.v4_be()),
            // Not reached: `parse` yields IPv4 flows only until it reads IPv6 headers;
            // their rewrite (four words, no header checksum) comes with them.
            Family::V6 => Err(()),
        }
    }

    /// The IPv4 rewrite: the 32-bit address at `offset`, the IP checksum and the L4
    /// pseudo-header checksum (a later fragment has none: its first fragment's covers
    /// the datagram).
    fn rewrite_addr_v4(&self, flow: &Flow, offset: usize, old: u32, new: u32) -> Result<(), ()>;

    /// Replaces the source or destination port and fixes the L4 checksum.
    fn rewrite_port(&self, flow: &Flow, side: Side, old: u16, new: u16) -> Result<(), ()>;

    /// Replaces the 32-bit field at `offset` and updates the 16-bit Internet checksum
    /// at `check` (of a header without pseudo-header, e.g. IP or ICMP).
    fn rewrite_word32(&self, offset: usize, check: usize, old: u32, new: u32) -> Result<(), ()>;

    /// The same for a 16-bit field.
    fn rewrite_word16(&self, offset: usize, check: usize, old: u16, new: u16) -> Result<(), ()>;

    /// Hands the packet to the hook's program for its transport (`Skip::OtherProgram`):
    /// a tail call, which returns only if that program is missing.
    fn hand_over(&self);

    /// Replaces the bytes at `offset`, no checksum touched.
    fn store<const N: usize>(&self, offset: usize, bytes: [u8; N]) -> Result<(), ()>;

    /// The bytes at `offset`.
    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Result<[u8; N], ()> {
        let at: *const [u8; N] = self.ptr_at(offset).ok_or(())?;
        // SAFETY: bounds checked by ptr_at.
        Ok(unsafe { at.read_unaligned() })
    }

    /// A pointer to a `T` at `offset`, if the packet is long enough.
    #[inline(always)]
    fn ptr_at<T>(&self, offset: usize) -> Option<*mut T> {
        let at = self.start() + offset;
        if at + size_of::<T>() > self.end() {
            return None;
        }
        Some(at as *mut T)
    }
}

pub struct XdpPacket<'a>(pub &'a XdpContext);

impl XdpPacket<'_> {
    /// Applies `update` to the L4 checksum, leaving a zero UDP checksum ("none") alone
    /// and never producing one.
    #[inline(always)]
    fn update_l4_check(&self, flow: &Flow, update: impl Fn(u16) -> u16) -> Result<(), ()> {
        let check: *mut u16 = self.ptr_at(flow.l4_check).ok_or(())?;
        // UDP over IPv4: a zero checksum means "none" (it stays zero, and a computed
        // zero is sent as 0xffff).
        let zero_is_none = flow.key.proto == PROTO_UDP;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            let old = check.read_unaligned();
            if zero_is_none && old == 0 {
                return Ok(());
            }
            let mut new = update(old);
            if zero_is_none && new == 0 {
                new = 0xffff;
            }
            check.write_unaligned(new);
        }
        Ok(())
    }
}

impl Packet for XdpPacket<'_> {
    #[inline(always)]
    fn start(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.data_end() - self.0.data()
    }

    #[inline(always)]
    fn rewrite_addr_v4(&self, flow: &Flow, offset: usize, old: u32, new: u32) -> Result<(), ()> {
        let field: *mut u32 = self.ptr_at(offset).ok_or(())?;
        let check: *mut u16 = self.ptr_at(ETH_LEN + IP_CHECK).ok_or(())?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            field.write_unaligned(new);
            check.write_unaligned(checksum::replace32(check.read_unaligned(), old, new));
        }
        if !flow.has_l4 {
            return Ok(());
        }
        self.update_l4_check(flow, |c| checksum::replace32(c, old, new))
    }

    #[inline(always)]
    fn rewrite_port(&self, flow: &Flow, side: Side, old: u16, new: u16) -> Result<(), ()> {
        let field: *mut u16 = self.ptr_at(flow.l4_off + side.port_offset()).ok_or(())?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { field.write_unaligned(new) };
        self.update_l4_check(flow, |c| checksum::replace16(c, old, new))
    }

    #[inline(always)]
    fn rewrite_word32(&self, offset: usize, check: usize, old: u32, new: u32) -> Result<(), ()> {
        let field: *mut u32 = self.ptr_at(offset).ok_or(())?;
        let sum: *mut u16 = self.ptr_at(check).ok_or(())?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            field.write_unaligned(new);
            sum.write_unaligned(checksum::replace32(sum.read_unaligned(), old, new));
        }
        Ok(())
    }

    #[inline(always)]
    fn rewrite_word16(&self, offset: usize, check: usize, old: u16, new: u16) -> Result<(), ()> {
        let field: *mut u16 = self.ptr_at(offset).ok_or(())?;
        let sum: *mut u16 = self.ptr_at(check).ok_or(())?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            field.write_unaligned(new);
            sum.write_unaligned(checksum::replace16(sum.read_unaligned(), old, new));
        }
        Ok(())
    }

    #[inline(always)]
    fn hand_over(&self) {
        // SAFETY: a tail call with the program's own context.
        unsafe { UPLINK_TRANSPORTS.tail_call(self.0, SCTP_PROGRAM) };
    }

    #[inline(always)]
    fn store<const N: usize>(&self, offset: usize, bytes: [u8; N]) -> Result<(), ()> {
        let at: *mut [u8; N] = self.ptr_at(offset).ok_or(())?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { at.write_unaligned(bytes) };
        Ok(())
    }
}

pub struct TcPacket<'a>(pub &'a TcContext);

impl TcPacket<'_> {
    #[inline(always)]
    fn l4_csum_flags(flow: &Flow, size: u64) -> u64 {
        let mangled = if flow.key.proto == PROTO_UDP {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        };
        size | mangled
    }
}

impl Packet for TcPacket<'_> {
    #[inline(always)]
    fn start(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len() as usize
    }

    #[inline(always)]
    fn rewrite_addr_v4(&self, flow: &Flow, offset: usize, old: u32, new: u32) -> Result<(), ()> {
        if flow.has_l4 {
            let flags = Self::l4_csum_flags(flow, 4) | u64::from(BPF_F_PSEUDO_HDR);
            self.0
                .l4_csum_replace(flow.l4_check, u64::from(old), u64::from(new), flags)
                .map_err(|_| ())?;
        }
        self.0
            .l3_csum_replace(ETH_LEN + IP_CHECK, u64::from(old), u64::from(new), 4)
            .map_err(|_| ())?;
        self.0.store(offset, &new, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn rewrite_port(&self, flow: &Flow, side: Side, old: u16, new: u16) -> Result<(), ()> {
        let l4_check = flow.l4_check;
        self.0
            .l4_csum_replace(
                l4_check,
                u64::from(old),
                u64::from(new),
                Self::l4_csum_flags(flow, 2),
            )
            .map_err(|_| ())?;
        self.0
            .store(flow.l4_off + side.port_offset(), &new, 0)
            .map_err(|_| ())
    }

    #[inline(always)]
    fn rewrite_word32(&self, offset: usize, check: usize, old: u32, new: u32) -> Result<(), ()> {
        self.0
            .l3_csum_replace(check, u64::from(old), u64::from(new), 4)
            .map_err(|_| ())?;
        self.0.store(offset, &new, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn rewrite_word16(&self, offset: usize, check: usize, old: u16, new: u16) -> Result<(), ()> {
        self.0
            .l3_csum_replace(check, u64::from(old), u64::from(new), 2)
            .map_err(|_| ())?;
        self.0.store(offset, &new, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn hand_over(&self) {
        // SAFETY: a tail call with the program's own context.
        unsafe { POD_TRANSPORTS.tail_call(self.0, SCTP_PROGRAM) };
    }

    #[inline(always)]
    fn store<const N: usize>(&self, offset: usize, bytes: [u8; N]) -> Result<(), ()> {
        self.0.store(offset, &bytes, 0).map_err(|_| ())
    }

    /// Through the skb helper: the bytes may lie beyond the linear part.
    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Result<[u8; N], ()> {
        self.0.load(offset).map_err(|_| ())
    }
}

/// A packet of SCTP's programs, rewritten through the hook's own packet type but for
/// the checksums: SCTP's CRC32c covers no address (an address rewrite fixes only the
/// IP header's checksum) and is updated for a port by `sctp::updated_checksum`. No
/// checksum helper knows CRC32c.
pub struct SctpPacket<'a, P>(pub &'a P);

impl<P: Packet> Packet for SctpPacket<'_, P> {
    const SCTP: bool = true;

    #[inline(always)]
    fn start(&self) -> usize {
        self.0.start()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.0.end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len()
    }

    #[inline(always)]
    fn rewrite_addr_v4(&self, _flow: &Flow, offset: usize, old: u32, new: u32) -> Result<(), ()> {
        self.0.rewrite_word32(offset, ETH_LEN + IP_CHECK, old, new)
    }

    /// A zero checksum is left alone: a local socket's packet whose checksum the
    /// device or kernel computes later (CHECKSUM_PARTIAL), over the field as it finds
    /// it, zero. A real CRC32c is zero once in 2^32 packets; that one is dropped by
    /// its receiver and retransmitted.
    #[inline(always)]
    fn rewrite_port(&self, flow: &Flow, side: Side, old: u16, new: u16) -> Result<(), ()> {
        let sum = self.0.load::<4>(flow.l4_check)?;
        self.0
            .store(flow.l4_off + side.port_offset(), new.to_ne_bytes())?;
        if sum == [0; 4] {
            return Ok(());
        }
        let sum = sctp::updated_checksum(
            sum,
            side.port_offset(),
            old.to_ne_bytes(),
            new.to_ne_bytes(),
            flow.l4_len,
        );
        self.0.store(flow.l4_check, sum)
    }

    #[inline(always)]
    fn rewrite_word32(&self, offset: usize, check: usize, old: u32, new: u32) -> Result<(), ()> {
        self.0.rewrite_word32(offset, check, old, new)
    }

    #[inline(always)]
    fn rewrite_word16(&self, offset: usize, check: usize, old: u16, new: u16) -> Result<(), ()> {
        self.0.rewrite_word16(offset, check, old, new)
    }

    /// SCTP's programs translate SCTP alone and are handed nothing else.
    #[inline(always)]
    fn hand_over(&self) {}

    #[inline(always)]
    fn store<const N: usize>(&self, offset: usize, bytes: [u8; N]) -> Result<(), ()> {
        self.0.store(offset, bytes)
    }

    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Result<[u8; N], ()> {
        self.0.load(offset)
    }
}
