//! ebpf-proxy's data path for kernels 5.10 to 5.17 (Debian 11, Ubuntu 22.04, RHEL 9,
//! Amazon Linux 2): the modules of `main.rs`, built with `LEGACY_KERNEL`, which
//! replaces what those kernels lack. The agent loads this object when its probes
//! find `bpf_loop` or `bpf_set_retval` missing.
#![no_std]
#![no_main]
#![allow(internal_features)]
#![feature(core_intrinsics)]

/// Set: the least-connection scan and the tunnel's backend search are bounded loops
/// over at most `MAX_LEAST_CONN_SCAN_LEGACY` slots instead of `bpf_loop`'s
/// `MAX_LEAST_CONN_SCAN`; counters are updated by plain atomic adds (no fetch, no
/// exchange: 5.10's BPF_XADD), so two CPUs may rarely take one round-robin turn or
/// one accounting transition twice (the agent's reconciliation heals the counts);
/// flows are timed with `bpf_ktime_get_ns`; a refused `connect()` from the node fails
/// with EPERM, not ECONNREFUSED.
const LEGACY_KERNEL: bool = true;

include!("data_path.rs");
