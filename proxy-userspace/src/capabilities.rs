//! The capabilities the agent needs, checked before it touches anything (see also
//! deploy/daemonset.yaml, which grants exactly these).

use anyhow::{Context as _, Result};

/// (bit, name, why).
const REQUIRED: [(u32, &str, &str); 3] = [
    (39, "CAP_BPF", "load programs and create maps"),
    (38, "CAP_PERFMON", "load programs that use packet pointers"),
    (
        12,
        "CAP_NET_ADMIN",
        "attach XDP, tc and cgroup programs, set accept_local on uplinks",
    ),
];

/// Fails clearly, naming what is missing and why it is needed.
pub fn check() -> Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("no CapEff in /proc/self/status")?;
    let missing: Vec<String> = REQUIRED
        .iter()
        .filter(|(bit, _, _)| effective & (1 << bit) == 0)
        .map(|(_, name, why)| format!("{name} ({why})"))
        .collect();
    if !missing.is_empty() {
        anyhow::bail!("missing capabilities: {}", missing.join(", "));
    }
    Ok(())
}
