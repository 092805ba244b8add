//! Per-CPU room for one program run (`PACKET_SCRATCH`): what the stack has no room
//! for, and values the verifier must take as unknown.

use proxy_common::{CtEntry, CtKey};

use crate::{maps::PACKET_SCRATCH, packet::MAX_HEADER_OFFSET};

#[repr(C)]
pub struct PacketScratch {
    /// A new flow's entries and its reply's key while they are assembled
    /// (`translate::open_flow`): too large for the stack, which IPv6's wider
    /// addresses filled.
    pub forward: CtEntry,
    pub reply: CtEntry,
    pub reply_key: CtKey,
    /// An offset passing through (`forget_offset`).
    offset: u64,
}

/// This CPU's slot, nobody else's for the program's run (a program runs to its end
/// on one CPU; tail calls included).
#[inline(always)]
pub fn slot() -> Option<&'static mut PacketScratch> {
    // SAFETY: see above; the slot is plain data.
    PACKET_SCRATCH.get_ptr_mut(0).map(|s| unsafe { &mut *s })
}

/// `offset` as the verifier sees a value read back from memory: unknown, but for the
/// mask that bounds it (`MAX_HEADER_OFFSET`). The offsets IPv6's extension headers
/// lead to differ per path through their walk; forgotten, the paths after the walk
/// are one state for the verifier instead of one per number of headers (which took
/// the uplink's IPv6 program past a million instructions). `None` if the slot is
/// missing (it never is).
#[inline(always)]
pub fn forget_offset(offset: usize) -> Option<usize> {
    let slot = slot()?;
    // SAFETY: the slot's own field; volatile, so that the load is not folded into
    // the value stored.
    let read = unsafe {
        core::ptr::write_volatile(&mut slot.offset, offset as u64);
        core::ptr::read_volatile(&slot.offset)
    };
    Some(read as usize & MAX_HEADER_OFFSET)
}
