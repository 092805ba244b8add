//! Node-wide settings the agent writes into the programs' read-only data when it
//! loads them (aya's `override_global` on the global `SETTINGS`), rather than into a
//! map: the data path reads them on its hot paths (every conntrack look-up, every new
//! flow) at the cost of a load, no map look-up, and they change only with a restart,
//! which loads the programs anew anyway.

use crate::CtTimeouts;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSettings {
    pub ct_timeouts: CtTimeouts,
    /// Masquerade every flow from a pod to a ClusterIP (kube-proxy's
    /// `masqueradeAll`), not only hairpin ones: 1 or 0.
    pub masquerade_all: u32,
    /// The least time, in nanoseconds, between two ICMP errors the data path builds
    /// itself (refusals, fragmentation needed) on one CPU, beyond a burst of
    /// `ICMP_BURST`: `icmp_interval_ns(rate)`. 0: unlimited.
    pub icmp_interval_ns: u32,
}

/// ICMP errors the data path may send per second and CPU by default: the kernel's
/// own limit for the errors it sends (`net.ipv4.icmp_msgs_per_sec`), which also
/// bounds kube-proxy's REJECT answers. Per CPU here, as the budget lives in a per-CPU
/// map: a node with n CPUs sends at most n times as many.
pub const ICMP_RATE_DEFAULT: u32 = 1000;
/// How many ICMP errors a CPU may send at once after a quiet spell: the kernel's
/// `net.ipv4.icmp_msgs_burst`.
pub const ICMP_BURST: u64 = 50;

/// The interval between ICMP errors at `per_second` errors per second per CPU (0:
/// unlimited).
pub const fn icmp_interval_ns(per_second: u32) -> u32 {
    match per_second {
        0 => 0,
        rate => 1_000_000_000 / rate,
    }
}

impl LoadSettings {
    pub const DEFAULT: LoadSettings = LoadSettings {
        ct_timeouts: CtTimeouts::DEFAULT,
        masquerade_all: 0,
        icmp_interval_ns: icmp_interval_ns(ICMP_RATE_DEFAULT),
    };
}

/// The global's name, the agent's handle to it.
pub const SETTINGS_GLOBAL: &str = "SETTINGS";

#[cfg(feature = "user")]
crate::user_pod!(LoadSettings);
