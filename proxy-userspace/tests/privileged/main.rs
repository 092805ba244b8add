//! The privileged test suite, one binary: the real programs in the real kernel
//! (BPF_PROG_TEST_RUN on crafted packets) and end-to-end runs of the real agent in
//! network namespaces with real servers and clients. Needs root, a mounted bpffs and
//! the tools `cargo xtask setup` installs (iproute2, curl, socat, ethtool, tcpdump).
//! One module per feature; shared helpers in `support`.
//!
//! Without root every test would fail on its first syscall, so the binary says so in
//! one line and runs nothing.

mod accounting;
mod address_filter;
mod agent_lifecycle;
mod container;
mod cpus;
mod datapath;
mod decisions;
mod dual_stack;
mod families;
mod faults;
mod floods;
mod fragments;
mod fuzz_datapath;
mod icmp;
mod kernel_matrix;
mod kube_proxy_config;
mod kube_proxy_metrics;
mod kubernetes;
mod kubernetes_resilience;
mod legacy_kernels;
mod manifests_source;
mod migration;
mod multinode;
mod node_health;
mod node_port_addresses;
mod operator_output;
mod operator_status;
mod operator_tools;
mod policies;
mod program_metrics;
mod refusals;
mod related_flows;
mod schedulers;
mod sctp;
mod sctp_guest;
mod services;
mod support;
mod sync;
mod tftp;
mod tunnel;
mod upgrades;

#[ctor::ctor]
fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "privileged tests skipped: they load eBPF programs and create network namespaces; run `cargo xtask test` as root"
        );
        std::process::exit(0);
    }
}
