//! Which of the data path's two objects this kernel runs. proxy-ebpf builds its
//! modules twice: `proxy-ebpf` for kernels from 5.18 and `proxy-ebpf-legacy` for 5.10
//! to 5.17, which lack `bpf_loop` (5.17), atomic fetch-and-add and exchanges (5.12),
//! the coarse clock (5.11) and `bpf_set_retval` in socket hooks (5.18). The agent
//! probes the two helpers that came last (never the version string: distributions
//! backport) and loads the object whose every instruction the kernel knows. What the
//! legacy object gives up is said in proxy-ebpf's `legacy.rs` and in the README.

use std::fmt;

use anyhow::{Context as _, Result};
use aya::{
    programs::ProgramType,
    sys::{is_helper_supported, BpfHelper},
};
use proxy_common::{MAX_LEAST_CONN_SCAN, MAX_LEAST_CONN_SCAN_LEGACY};

/// The data path for kernels 5.10 to 5.17 (proxy-ebpf's `legacy.rs`).
static LEGACY_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf-legacy"));

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Generation {
    /// Kernels with `bpf_loop` and `bpf_set_retval` (5.18 and later).
    Current,
    /// Kernels 5.10 to 5.17.
    Legacy,
}

impl Generation {
    /// The generation whose object this kernel accepts.
    pub fn of_this_kernel() -> Result<Generation> {
        let has = |program, helper| {
            is_helper_supported(program, helper)
                .with_context(|| format!("probing the kernel for {helper:?}"))
        };
        let current = has(ProgramType::Xdp, BpfHelper::BPF_FUNC_loop)?
            && has(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_set_retval)?;
        Ok(if current {
            Generation::Current
        } else {
            Generation::Legacy
        })
    }

    pub fn object(self) -> &'static [u8] {
        match self {
            Generation::Current => super::EBPF_OBJECT,
            Generation::Legacy => LEGACY_OBJECT,
        }
    }

    /// How many backends the least-connection family compares per new flow.
    pub fn least_conn_scan(self) -> u32 {
        match self {
            Generation::Current => MAX_LEAST_CONN_SCAN,
            Generation::Legacy => MAX_LEAST_CONN_SCAN_LEGACY,
        }
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Generation::Current => "current (kernels from 5.18)",
            Generation::Legacy => "legacy (kernels 5.10 to 5.17)",
        })
    }
}
