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
    pub _pad: u32,
}

impl LoadSettings {
    pub const DEFAULT: LoadSettings = LoadSettings {
        ct_timeouts: CtTimeouts::DEFAULT,
        masquerade_all: 0,
        _pad: 0,
    };
}

/// The global's name, the agent's handle to it.
pub const SETTINGS_GLOBAL: &str = "SETTINGS";

#[cfg(feature = "user")]
crate::user_pod!(LoadSettings);
