//! The agent's own resource limits.

use tracing::{info, warn};

/// Raises the soft limit on open descriptors to the hard one. The agent holds a
/// descriptor per map, link, watch and HTTP connection, and the default soft limit
/// (1,024) is what a peer holding connections ran it out of; the hard limit is the
/// operator's (the container runtime's) to set.
pub fn raise_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            warn!("reading RLIMIT_NOFILE: {}", std::io::Error::last_os_error());
            return;
        }
        if limit.rlim_cur >= limit.rlim_max {
            return;
        }
        let before = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            warn!("raising RLIMIT_NOFILE: {}", std::io::Error::last_os_error());
            return;
        }
        info!(
            from = before,
            to = limit.rlim_max,
            "raised the open-files limit"
        );
    }
}

/// Gives the allocator's free memory back to the system. A first sync of a large
/// node parses and translates everything at once; glibc keeps the freed peak in its
/// arenas unless told, and the agent would keep that resident memory for good.
pub fn return_free_memory() {
    // SAFETY: no arguments to get wrong; glibc's allocator is thread-safe.
    unsafe { libc::malloc_trim(0) };
}

/// kube-proxy's `oomScoreAdj`: how willingly the kernel kills the agent when memory
/// runs out. Lowering it needs `CAP_SYS_RESOURCE`, which the agent is not given
/// (the kubelet already lowers it for `system-node-critical` pods): then it is only
/// said, and the agent runs on.
pub fn set_oom_score_adj(adj: i32) {
    match std::fs::write("/proc/self/oom_score_adj", adj.to_string()) {
        Ok(()) => info!(adj, "oom_score_adj set"),
        Err(e) => warn!(
            adj,
            "oomScoreAdj not applied: {e} (lowering it needs CAP_SYS_RESOURCE)"
        ),
    }
}
