//! The one difference between the XDP and tc hooks the translation logic cares about:
//! how header fields are rewritten. XDP writes the bytes and fixes checksums itself;
//! tc goes through the skb helpers, which also keep the kernel's checksum state
//! (CHECKSUM_PARTIAL from local sockets, CHECKSUM_COMPLETE) right. SCTP's programs
//! see their packets through `SctpPacket`, whose checksum is SCTP's, and IPv6's
//! through `Ipv6Packet`.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    programs::{TcContext, XdpContext},
};
use proxy_common::{
    sctp, Addr, IPV6_ICMP_PROGRAM, IPV6_PROGRAM, IPV6_TUNNEL_PROGRAM, IPV6_SCTP_PROGRAM, PROTO_UDP, SCTP_PROGRAM,
};

use crate::{
    checksum,
    headers::{IPV6_DST, IPV6_MAX_EXTENSION_HEADERS, IPV6_SRC},
    maps::{
        POD_IPV6, POD_IPV6_MORE, POD_TRANSPORTS, UPLINK_IPV6, UPLINK_IPV6_MORE, UPLINK_TRANSPORTS,
    },
    parse::Flow,
};

pub const ETH_LEN: usize = 14;
/// Every header the data path reads lies below this offset (the farthest, IPv6's
/// transport header past six extension headers of at most 2,048 bytes, starts before
/// 12.4 KiB): a mask of it bounds offsets for the verifier and changes none.
pub const MAX_HEADER_OFFSET: usize = 0x3fff;
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

    /// The address field's offset in an IPv6 packet's frame.
    #[inline(always)]
    fn ipv6_offset(self) -> usize {
        match self {
            Side::Src => ETH_LEN + IPV6_SRC,
            Side::Dst => ETH_LEN + IPV6_DST,
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

/// The programs a hook's program hands packets to (`Packet::hand_over`).
#[derive(Clone, Copy)]
pub enum Program {
    /// SCTP over IPv4.
    Sctp,
    /// TCP and UDP over IPv6.
    Ipv6,
    /// SCTP over IPv6.
    Ipv6Sctp,
    /// ICMPv6.
    Ipv6Icmp,
    /// ip6ip6 (the uplinks' only).
    Ipv6Tunnel,
}

impl Program {
    /// The program's slot in its array (`*_TRANSPORTS` for `Sctp`, `*_IPV6_MORE` for
    /// `Ipv6Icmp` and `Ipv6Tunnel`, `*_IPV6` else).
    #[inline(always)]
    fn slot(self) -> u32 {
        match self {
            Program::Sctp => SCTP_PROGRAM,
            Program::Ipv6 => IPV6_PROGRAM,
            Program::Ipv6Sctp => IPV6_SCTP_PROGRAM,
            Program::Ipv6Icmp => IPV6_ICMP_PROGRAM,
            Program::Ipv6Tunnel => IPV6_TUNNEL_PROGRAM,
        }
    }
}

pub trait Packet {
    /// Whether the program handling the packet translates SCTP (and nothing else) or
    /// TCP and UDP: SCTP has programs of its own (see `main`), which see their packets
    /// as `SctpPacket`s. Known at compile time, so that each program holds the code of
    /// its own transports only.
    const SCTP: bool = false;
    /// Whether the program translates IPv6 (and nothing else) or IPv4: IPv6 has
    /// programs of their own, which see their packets as `Ipv6Packet`s.
    const IPV6: bool = false;
    /// How many IPv6 extension headers the parser steps over (`parse`): all it
    /// allows, but in the programs whose packets have none (`TunnelledV6`).
    const EXTENSION_HEADERS: usize = IPV6_MAX_EXTENSION_HEADERS;

    fn start(&self) -> usize;
    fn end(&self) -> usize;
    /// The whole packet's length (for tc, beyond the linear part too).
    fn len(&self) -> usize;

    /// Replaces the source or destination address (of the program's family) and fixes
    /// the checksums that cover it (IPv4's header checksum, the L4 pseudo-header).
    #[inline(always)]
    fn rewrite_addr(&self, flow: &Flow, side: Side, old: &Addr, new: &Addr) -> Result<(), ()> {
        // By the program's family, known at compile time (a flow's is the program's):
        // IPv4's programs hold no IPv6 rewrite, whose stack they have no room for.
        if Self::IPV6 {
            self.rewrite_addr_v6(flow, side.ipv6_offset(), old, new)
        } else {
            self.rewrite_addr_v4(flow, side.ipv4_offset(), old.v4_be(), new.v4_be())
        }
    }

    /// The IPv6 rewrite: the 16-byte address at `offset` and the L4 pseudo-header
    /// checksum (IPv6 has no header checksum).
    fn rewrite_addr_v6(&self, flow: &Flow, offset: usize, old: &Addr, new: &Addr)
        -> Result<(), ()>;

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

    /// Hands the packet to another program of the hook (`Skip::OtherProgram`,
    /// `Skip::Ipv6`): a tail call, which returns only if that program is missing.
    fn hand_over(&self, program: Program);

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
        // Masked to `MAX_HEADER_OFFSET`: the verifier allows arithmetic on a packet
        // pointer only with an offset it knows bounded (and far enough below 64 KiB to
        // bound the pointer too), and loses the bounds of some (IPv6's transport
        // offset, past extension headers, read back from the stack).
        let at = self.start() + (offset & MAX_HEADER_OFFSET);
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
        // UDP: a zero checksum stays zero (over IPv4 it means none; over IPv6 it is
        // invalid, or a tunnel's RFC 6935 zero, and the tc rewrite leaves it too); a
        // computed zero is sent as 0xffff.
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
    fn rewrite_addr_v6(
        &self,
        flow: &Flow,
        offset: usize,
        old: &Addr,
        new: &Addr,
    ) -> Result<(), ()> {
        let field: *mut Addr = self.ptr_at(offset).ok_or(())?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { field.write_unaligned(*new) };
        if !flow.has_l4 {
            return Ok(());
        }
        self.update_l4_check(flow, |c| checksum::replace128(c, old, new))
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
    fn hand_over(&self, program: Program) {
        let array = match program {
            Program::Sctp => &UPLINK_TRANSPORTS,
            Program::Ipv6 | Program::Ipv6Sctp => &UPLINK_IPV6,
            Program::Ipv6Icmp | Program::Ipv6Tunnel => &UPLINK_IPV6_MORE,
        };
        // SAFETY: a tail call with the program's own context.
        unsafe { array.tail_call(self.0, program.slot()) };
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
        // A zero UDP checksum stays zero (over IPv4 it means none; over IPv6 it is
        // invalid either way) and a computed zero is sent as 0xffff.
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

    /// The pseudo-header change as one checksum difference (a helper call of size 0
    /// applies a difference), then the address in one store.
    #[inline(always)]
    fn rewrite_addr_v6(
        &self,
        flow: &Flow,
        offset: usize,
        old: &Addr,
        new: &Addr,
    ) -> Result<(), ()> {
        if flow.has_l4 {
            let flags = Self::l4_csum_flags(flow, 0) | u64::from(BPF_F_PSEUDO_HDR);
            self.0
                .l4_csum_replace(flow.l4_check, 0, u64::from(checksum::diff128(old, new)), flags)
                .map_err(|_| ())?;
        }
        // The helper's pseudo-header rule for a CHECKSUM_COMPLETE skb is IPv4's
        // (whose header checksum absorbs the address change); over IPv6 the store
        // must carry the address change into `skb->csum` itself to cancel it.
        self.0
            .store(offset, new, BPF_F_RECOMPUTE_CSUM as u64)
            .map_err(|_| ())
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
    fn hand_over(&self, program: Program) {
        let array = match program {
            Program::Sctp => &POD_TRANSPORTS,
            Program::Ipv6 | Program::Ipv6Sctp => &POD_IPV6,
            Program::Ipv6Icmp | Program::Ipv6Tunnel => &POD_IPV6_MORE,
        };
        // SAFETY: a tail call with the program's own context.
        unsafe { array.tail_call(self.0, program.slot()) };
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

/// The methods a wrapper of a hook's packet type (`SctpPacket`, `Ipv6Packet`) passes
/// on to it unchanged: the bounds, the checksum-neutral stores and loads, and the
/// rewrites of plain header words.
macro_rules! delegate_to_inner {
    () => {
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
        fn rewrite_word32(&self, offset: usize, check: usize, old: u32, new: u32) -> Result<(), ()> {
            self.0.rewrite_word32(offset, check, old, new)
        }

        #[inline(always)]
        fn rewrite_word16(&self, offset: usize, check: usize, old: u16, new: u16) -> Result<(), ()> {
            self.0.rewrite_word16(offset, check, old, new)
        }

        #[inline(always)]
        fn store<const N: usize>(&self, offset: usize, bytes: [u8; N]) -> Result<(), ()> {
            self.0.store(offset, bytes)
        }

        #[inline(always)]
        fn load<const N: usize>(&self, offset: usize) -> Result<[u8; N], ()> {
            self.0.load(offset)
        }
    };
}

/// The rewrites a wrapper that changes only what the parser sees (`Ipv6Packet`,
/// `TunnelledV6`) passes on to the packet type it wraps.
macro_rules! delegate_rewrites {
    () => {
        #[inline(always)]
        fn rewrite_addr_v4(&self, flow: &Flow, offset: usize, old: u32, new: u32) -> Result<(), ()> {
            self.0.rewrite_addr_v4(flow, offset, old, new)
        }

        #[inline(always)]
        fn rewrite_addr_v6(
            &self,
            flow: &Flow,
            offset: usize,
            old: &Addr,
            new: &Addr,
        ) -> Result<(), ()> {
            self.0.rewrite_addr_v6(flow, offset, old, new)
        }

        #[inline(always)]
        fn rewrite_port(&self, flow: &Flow, side: Side, old: u16, new: u16) -> Result<(), ()> {
            self.0.rewrite_port(flow, side, old, new)
        }
    };
}

/// A packet of SCTP's programs, rewritten through the hook's own packet type but for
/// the checksums: SCTP's CRC32c covers no address (an address rewrite fixes only the
/// IP header's checksum) and is updated for a port by `sctp::updated_checksum`. No
/// checksum helper knows CRC32c.
pub struct SctpPacket<'a, P>(pub &'a P);

impl<P: Packet> Packet for SctpPacket<'_, P> {
    const SCTP: bool = true;
    const IPV6: bool = P::IPV6;
    const EXTENSION_HEADERS: usize = P::EXTENSION_HEADERS;

    delegate_to_inner!();

    #[inline(always)]
    fn rewrite_addr_v4(&self, _flow: &Flow, offset: usize, old: u32, new: u32) -> Result<(), ()> {
        self.0.rewrite_word32(offset, ETH_LEN + IP_CHECK, old, new)
    }

    /// Nothing but the address: IPv6 has no header checksum.
    #[inline(always)]
    fn rewrite_addr_v6(
        &self,
        _flow: &Flow,
        offset: usize,
        _old: &Addr,
        new: &Addr,
    ) -> Result<(), ()> {
        self.0.store(offset, new.v6_octets())
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

    /// SCTP's programs translate SCTP alone and are handed nothing else.
    #[inline(always)]
    fn hand_over(&self, _program: Program) {}

}

/// A packet of IPv6's programs (`Packet::IPV6`), rewritten through the hook's own
/// packet type.
pub struct Ipv6Packet<'a, P>(pub &'a P);

impl<P: Packet> Packet for Ipv6Packet<'_, P> {
    const SCTP: bool = P::SCTP;
    const IPV6: bool = true;

    delegate_to_inner!();

    delegate_rewrites!();

    #[inline(always)]
    fn hand_over(&self, program: Program) {
        self.0.hand_over(program)
    }
}

/// The inner packet of an ip6ip6 packet `tunnel` decapsulated, an `Ipv6Packet`: its
/// transport header follows its fixed header (`tunnel` checked), so the parser walks
/// no extension header, whose paths the verifier could not afford twice in one program.
pub struct TunnelledV6<'a, P>(pub &'a P);

impl<P: Packet> Packet for TunnelledV6<'_, P> {
    const SCTP: bool = P::SCTP;
    const IPV6: bool = P::IPV6;
    const EXTENSION_HEADERS: usize = 0;

    delegate_to_inner!();

    delegate_rewrites!();

    #[inline(always)]
    fn hand_over(&self, program: Program) {
        self.0.hand_over(program)
    }
}
