//! The kernel side as the agent sees it: loading the programs (`loader`), attaching
//! them to interfaces and cgroups (`attach`), following interfaces as they come and go
//! (`interfaces`), and typed access to the pinned maps (`tables`).

pub mod attach;
pub mod interfaces;
pub mod layout;
pub mod loader;
pub mod mmap;
pub mod tables;

/// The eBPF object built by build.rs from proxy-ebpf.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// The benchmark's wrapper program (proxy-ebpf's `bench-wrapper`), built with the data
/// path so that the bench needs no eBPF build of its own; the agent binary does not
/// refer to it, so the linker leaves it out.
pub static BENCH_WRAPPER_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-wrapper"));

/// Program names in the object, as the `#[xdp]`/`#[classifier]`/… functions are named.
pub const PROG_UPLINK: &str = "uplink_ingress";
pub const PROG_POD: &str = "pod_ingress";
pub const PROG_SOCK_HOOKS: [&str; 4] = [
    "sock_connect4",
    "sock_sendmsg4",
    "sock_recvmsg4",
    "sock_getpeername4",
];
