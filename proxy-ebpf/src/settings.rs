//! The node-wide settings the agent sets when it loads the programs
//! (`proxy_common::LoadSettings`): read-only data, so a read is a load, not a map
//! look-up. Reads are volatile, so that the compiler does not fold in the defaults
//! the agent replaces.

use proxy_common::LoadSettings;

/// The name is the agent's handle to it (`SETTINGS_GLOBAL`).
#[no_mangle]
static SETTINGS: LoadSettings = LoadSettings::DEFAULT;

/// An idle timeout (`TIMEOUT_*`), in nanoseconds.
#[inline(always)]
pub fn ct_timeout_ns(kind: usize) -> u64 {
    // SAFETY: a read of read-only data, in bounds (`& 3` of a 4-element array).
    unsafe { core::ptr::read_volatile(&SETTINGS.ct_timeouts.ns[kind & 3]) }
}

/// kube-proxy's `masqueradeAll`.
#[inline(always)]
pub fn masquerade_all() -> bool {
    // SAFETY: a read of read-only data.
    unsafe { core::ptr::read_volatile(&SETTINGS.masquerade_all) != 0 }
}

/// The least time between two ICMP errors on one CPU, in nanoseconds (0: unlimited).
#[inline(always)]
pub fn icmp_interval_ns() -> u64 {
    // SAFETY: a read of read-only data.
    u64::from(unsafe { core::ptr::read_volatile(&SETTINGS.icmp_interval_ns) })
}
