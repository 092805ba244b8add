//! IPVS beside the others, in a QEMU guest (`testbed::guest`): this machine's kernel
//! has no IPVS, so the guest boots Debian's stock kernel with our binaries and runs
//! every contender, ebpf-proxy included, inside that one guest (`--guest-e2e`, the
//! same measurement code as on the host). Under TCG only the ratios between
//! contenders of one guest boot mean anything; the report says which acceleration
//! ran.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use serde::Serialize;
use testbed::guest::{self, GuestRun};

use super::end_to_end::E2eResult;

#[derive(Serialize)]
pub struct GuestReport {
    pub kernel: String,
    pub acceleration: String,
    pub boot_to_results_s: f64,
    pub results: Vec<E2eResult>,
}

/// Boots the guest, runs the measurement there and collects its results.
pub fn run_guest(quick: bool) -> Result<GuestReport> {
    let exe = std::env::current_exe()?;
    let args = if quick { "--quick" } else { "" };
    let spec = GuestRun {
        name: "bench",
        binaries: vec![
            (
                exe.with_file_name("ebpf-proxy"),
                PathBuf::from("/usr/bin/ebpf-proxy"),
            ),
            (exe.clone(), PathBuf::from("/usr/bin/ebpf-proxy-bench")),
        ],
        command: format!("/usr/bin/ebpf-proxy-bench --guest-e2e {args}"),
        kernel: guest::DebianKernel::Bookworm,
    };
    println!("\nIPVS guest: Debian's stock kernel");
    let mut results = Vec::new();
    let mut parse_error = None;
    let outcome = guest::run(&spec, |line| {
        if let Some(json) = line.split("EPX-RESULT ").nth(1) {
            match serde_json::from_str::<E2eResult>(json.trim()).context("a guest result") {
                Ok(result) => results.push(result),
                Err(e) => parse_error = Some(e),
            }
        }
        if line.contains("EPX-") || line.contains("  ") {
            println!("  guest: {line}");
        }
    })?;
    if let Some(e) = parse_error {
        return Err(e);
    }
    println!(
        "IPVS guest: Debian kernel {}, acceleration {}",
        outcome.kernel, outcome.acceleration
    );
    Ok(GuestReport {
        kernel: outcome.kernel,
        acceleration: outcome.acceleration.to_owned(),
        boot_to_results_s: outcome.elapsed.as_secs_f64(),
        results,
    })
}

/// Inside the guest: every contender at each scale, each result printed as it comes.
pub fn measure_in_guest(quick: bool) -> Result<()> {
    let (scales, duration, rounds): (&[usize], Duration, usize) = if quick {
        (&[1], Duration::from_secs(2), 1)
    } else {
        (&[1, 1_000], Duration::from_secs(3), 2)
    };
    super::end_to_end::run_contenders(
        &super::end_to_end::GUEST_CONTENDERS,
        // IPVS is laid out over IPv4 only (`contenders`).
        ebpf_proxy::model::Family::V4,
        scales,
        duration,
        rounds,
        &mut |result| {
            if let Ok(json) = serde_json::to_string(result) {
                println!("EPX-RESULT {json}");
            }
        },
    )?;
    Ok(())
}
