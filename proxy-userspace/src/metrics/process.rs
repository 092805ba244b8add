//! The process metrics every Kubernetes component exports (`process_*`, as the
//! Prometheus client libraries' process collector defines them), and
//! `kubernetes_build_info`, read from `/proc/self` at each scrape.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::labels;

/// `/proc/self/stat` fields (1-based, as proc(5) numbers them; the command name in
/// parentheses counts as field 2 and may hold spaces, so fields are counted after it).
const UTIME: usize = 14;
const STIME: usize = 15;
const STARTTIME: usize = 22;
const VSIZE: usize = 23;
const RSS_PAGES: usize = 24;

/// What is known of this process, read now.
struct ProcessSample {
    cpu_seconds: f64,
    start_time_seconds: f64,
    virtual_bytes: f64,
    resident_bytes: f64,
    open_fds: f64,
    max_fds: f64,
}

fn sysconf(name: libc::c_int) -> f64 {
    // SAFETY: sysconf has no memory arguments.
    unsafe { libc::sysconf(name) as f64 }
}

fn sample() -> Option<ProcessSample> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    // `after_name` starts at field 3.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
    let ticks = sysconf(libc::_SC_CLK_TCK);
    let boot_time = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit to write into.
    let max_fds = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur as f64
    } else {
        0.0
    };
    Some(ProcessSample {
        cpu_seconds: (field(UTIME)? + field(STIME)?) / ticks,
        start_time_seconds: boot_time + field(STARTTIME)? / ticks,
        virtual_bytes: field(VSIZE)?,
        resident_bytes: field(RSS_PAGES)? * sysconf(libc::_SC_PAGESIZE),
        open_fds: std::fs::read_dir("/proc/self/fd").ok()?.count() as f64,
        max_fds,
    })
}

fn gauge(value: f64) -> Gauge<f64, AtomicU64> {
    let gauge = Gauge::<f64, AtomicU64>::default();
    gauge.set(value);
    gauge
}

/// As Kubernetes names platforms (Go's architecture names).
fn platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    format!("linux/{arch}")
}

pub fn register(registry: &mut Registry) {
    if let Some(s) = sample() {
        let cpu = Counter::<f64, AtomicU64>::default();
        cpu.inc_by(s.cpu_seconds);
        registry.register(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            cpu,
        );
        for (name, help, value) in [
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                s.start_time_seconds,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                s.virtual_bytes,
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.resident_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                s.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                s.max_fds,
            ),
        ] {
            registry.register(name, help, gauge(value));
        }
    }
    let build = Family::<super::Labels, Gauge>::default();
    build
        .get_or_create(&labels(&[
            ("git_version", concat!("v", env!("CARGO_PKG_VERSION"))),
            ("major", env!("CARGO_PKG_VERSION_MAJOR")),
            ("minor", env!("CARGO_PKG_VERSION_MINOR")),
            ("compiler", "rustc"),
            ("platform", &platform()),
        ]))
        .set(1);
    registry.register(
        "kubernetes_build_info",
        "A metric with a constant '1' value labeled by major, minor, git version and platform from which ebpf-proxy was built (its own version, not Kubernetes')",
        build,
    );
}
