//! Measurement harness for `cargo xtask bench`, never attached by the agent.
//!
//! BPF_PROG_TEST_RUN with `repeat` reuses one buffer, so a translating program would
//! measure its own output from the second iteration on. This wrapper first restores
//! the original frame (64 bytes of IPv4, 96 of IPv6, 136 of ip6ip6; and, for
//! new-flow runs, gives each iteration its own source port and address), then
//! tail-calls the program
//! under test. The same wrapper around a program that only returns XDP_PASS is the
//! floor.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, LruHashMap, ProgramArray},
    programs::XdpContext,
};
use proxy_common::{
    bench_frame_len,
    key_layout::{self, NarrowEntry, NarrowKey, WideEntry, WideKey},
    BenchTemplate, BENCH_FRAME_IP6IP6, BENCH_FRAME_V4, BENCH_FRAME_V6, CONNTRACK_ENTRIES,
};

#[map]
static BENCH_TEMPLATE: Array<BenchTemplate> = Array::with_max_entries(1, 0);
/// Iterations so far, for per-iteration flows.
#[map]
static BENCH_TURN: Array<u64> = Array::with_max_entries(1, 0);
/// Slot 0: the program under test.
#[map]
static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Where an IPv4 frame's source address has its low half, and its L4 source port.
const V4_SRC_LOW: usize = 14 + 14;
const V4_SPORT: usize = 14 + 20;
/// The same in an IPv6 frame (the address's last two bytes).
const V6_SRC_LOW: usize = 14 + 8 + 14;
const V6_SPORT: usize = 14 + 40;

#[xdp]
pub fn bench_wrapper(ctx: XdpContext) -> u32 {
    let Some(template) = BENCH_TEMPLATE.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let restored = match bench_frame_len(&template.bytes) {
        BENCH_FRAME_IP6IP6 => {
            restore::<BENCH_FRAME_IP6IP6, { V6_SRC_LOW + 40 }, { V6_SPORT + 40 }>(&ctx, template)
        }
        BENCH_FRAME_V6 => restore::<BENCH_FRAME_V6, V6_SRC_LOW, V6_SPORT>(&ctx, template),
        _ => restore::<BENCH_FRAME_V4, V4_SRC_LOW, V4_SPORT>(&ctx, template),
    };
    if restored.is_none() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: tail call with our own context; returns only on failure.
    unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// Puts the template's frame of `FRAME` bytes back (and, for new-flow runs, this
/// iteration's source port and address at `SPORT` and `SRC_LOW`).
#[inline(always)]
fn restore<const FRAME: usize, const SRC_LOW: usize, const SPORT: usize>(
    ctx: &XdpContext,
    template: &BenchTemplate,
) -> Option<()> {
    // The previous iteration may have moved the frame's start (encapsulation or
    // decapsulation): put it back, so every iteration sees FRAME bytes.
    let len = ctx.data_end() as i64 - ctx.data() as i64;
    // SAFETY: helper on the program's own context.
    if len != FRAME as i64
        && unsafe { bpf_xdp_adjust_head(ctx.ctx, (len - FRAME as i64) as i32) } != 0
    {
        return None;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + FRAME > end {
        return None;
    }
    // SAFETY: the frame holds FRAME bytes (checked above).
    unsafe { core::ptr::copy_nonoverlapping(template.bytes.as_ptr(), data as *mut u8, FRAME) };
    if template.vary_flow != 0 {
        let turn = BENCH_TURN.get_ptr_mut(0)?;
        // SAFETY: map value owned by this CPU's run; frame bounds checked above.
        unsafe {
            *turn += 1;
            let bytes = (*turn as u32).to_ne_bytes();
            *((data + SPORT) as *mut [u8; 2]) = [bytes[0], bytes[1]];
            *((data + SRC_LOW) as *mut [u8; 2]) = [bytes[2], bytes[3]];
        }
    }
    Some(())
}

#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The key-layout measurement (`proxy_common::key_layout`): the same table of
/// conntrack's size and flags, keyed as today and as IPv4 alone.
#[map]
static KEYS_WIDE: LruHashMap<WideKey, WideEntry> =
    LruHashMap::with_max_entries(CONNTRACK_ENTRIES, 0);
#[map]
static KEYS_NARROW: LruHashMap<NarrowKey, NarrowEntry> =
    LruHashMap::with_max_entries(CONNTRACK_ENTRIES, 0);

/// How many of the filled flows the programs look up in turn.
#[map]
static KEYS_ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// The next of the active flows, a new one every iteration.
#[inline(always)]
fn next_flow() -> Option<u32> {
    let active = u64::from(*KEYS_ACTIVE.get(0)?).max(1);
    let turn = BENCH_TURN.get_ptr_mut(0)?;
    // SAFETY: map value, one test run on one CPU at a time.
    unsafe {
        *turn += 1;
        Some((*turn % active) as u32)
    }
}

/// XDP_PASS when the flow is found (the bench checks every look-up hit).
#[inline(always)]
fn found(hit: bool) -> u32 {
    if hit {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

#[xdp]
pub fn bench_keys_wide(_ctx: XdpContext) -> u32 {
    let Some(i) = next_flow() else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: presence check only.
    found(unsafe { KEYS_WIDE.get(key_layout::wide_key(i)) }.is_some())
}

#[xdp]
pub fn bench_keys_narrow(_ctx: XdpContext) -> u32 {
    let Some(i) = next_flow() else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: presence check only.
    found(unsafe { KEYS_NARROW.get(key_layout::narrow_key(i)) }.is_some())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
