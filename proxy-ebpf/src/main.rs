//! ebpf-proxy's data path. This file only declares the entry points; each concern has
//! its module: `headers` (protocol numbers and per-protocol header facts), `parse`
//! (reading headers), `balancer` (service look-up, scheduling over the shared
//! `proxy_common::decide`), `accounting` (connections per backend), `conntrack`
//! (recording flows, their state), `affinity` (sessionAffinity), `source_ranges`
//! (loadBalancerSourceRanges), `translate` (the pipeline), `packet` (how XDP and tc
//! rewrite), `checksum` (the Internet checksum), `tunnel` (IPIP), `icmp` (errors about
//! translated flows), `related` (flows a tracked flow announces: TFTP's new port),
//! `forward` (redirects), `sock` (node-local sockets), `maps` and `counters`.
//!
//! The entry points' bodies are inlined into the functions the program attribute
//! generates: as a frame of their own under that function's, they made the call
//! chain of a `bpf_loop` callback one frame deeper, which kernels before 6.8 (32-byte
//! frame rounding) refuse past 512 bytes of stack.
//!
//! SCTP packets are translated by programs of their own (`*_sctp`), the same
//! pipeline instantiated for SCTP alone, which each hook's main program tail-calls
//! once it parsed an SCTP header (`Packet::hand_over`):
//! verified apart, each stays within the verifier's budget (a third transport in the
//! main programs walked more than a million instructions).
//!
//! The same modules also build `legacy.rs`'s object, for kernels that lack what this
//! one uses (see `LEGACY_KERNEL`); the agent probes the kernel and loads one of them.
#![no_std]
#![no_main]
#![allow(internal_features)]
#![feature(core_intrinsics)]

/// Whether this object is for kernels 5.10 to 5.17. It is not: it uses `bpf_loop`
/// (5.17), atomic fetch-and-add, exchange and compare-exchange (5.12), the coarse
/// clock (5.11) and `bpf_set_retval` (5.18).
const LEGACY_KERNEL: bool = false;

include!("data_path.rs");
