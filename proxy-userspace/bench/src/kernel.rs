//! What the bench asks the kernel directly: a program's run time under
//! BPF_PROG_TEST_RUN, and a map's memory.

use std::os::fd::{AsFd as _, AsRawFd as _};

use anyhow::{Context as _, Result};
use aya::{
    maps::MapData,
    programs::{TestRun as _, TestRunOptions, Xdp},
};

/// Runs `xdp` `repeat` times on a zeroed frame of `len` bytes: (its return value, ns
/// per run).
pub fn test_run(xdp: &mut Xdp, repeat: u32, len: usize) -> Result<(u32, f64)> {
    let input = vec![0u8; len];
    // Room for an encapsulated frame (IPIP's outer header is 20 bytes).
    let mut output = vec![0u8; len + 64];
    let result = xdp.test_run(TestRunOptions {
        data_in: Some(&input),
        data_out: Some(&mut output),
        repeat,
        ..Default::default()
    })?;
    Ok((result.return_value, result.duration.as_nanos() as f64))
}

/// What the kernel charges for a map (`memlock` in its fdinfo), in bytes.
pub fn map_memory(map: &MapData) -> Result<u64> {
    let info = std::fs::read_to_string(format!(
        "/proc/self/fdinfo/{}",
        map.fd().as_fd().as_raw_fd()
    ))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no memlock in the map's fdinfo")
}
