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

/// Holds glibc's allocator to one arena per CPU. By default it makes up to eight per
/// CPU, one for each thread that allocates while the others hold theirs: the source's
/// parser threads, the runtime's workers and the agent's task each leave long-lived
/// data in arenas of their own, whose free holes cannot be shared. At 100,000 services
/// that cost about 20 MiB resident (262 against 243 MiB), for about a second more of
/// cold start (threads now wait for an arena at times). `MALLOC_ARENA_MAX` in the
/// environment still wins.
pub fn limit_allocator_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let arenas = libc::c_int::try_from(cpus).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt takes two integers; glibc ignores values it cannot use.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
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
