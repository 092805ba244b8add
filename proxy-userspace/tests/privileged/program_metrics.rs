//! The data path programs' own cost under real traffic in `/metrics` (issue 17): the
//! kernel's run count and run time of each program, while the kernel counts them.

use crate::support::{cluster::*, services::*};

/// (runs, seconds) of `program` in an exposition, if it is there.
fn runs_of(exposition: &str, program: &str) -> Option<(f64, f64)> {
    let sample = |name: &str| {
        let prefix = format!("{name}{{program=\"{program}\"}} ");
        exposition
            .lines()
            .find_map(|line| line.strip_prefix(&prefix)?.parse::<f64>().ok())
    };
    Some((
        sample("ebpf_proxy_program_runs_total")?,
        sample("ebpf_proxy_program_run_seconds_total")?,
    ))
}

#[test]
fn each_program_says_its_runs_and_run_time_while_the_kernel_counts_them() {
    // What `sysctl kernel.bpf_stats_enabled=1` does, for as long as this is held.
    let _counting = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let cluster = Cluster::new("runs", 2, 0, |t| vec![web(t, &["pod-a1"])]);
    curl_n(cluster.ns("pod-a2"), &format!("http://{WEB_VIP}/"), 5);
    // Five connections through the pod interfaces: a few packets each way each.
    wait_until(
        || runs_of(&cluster.metrics(), "pod_ingress").is_some_and(|(runs, _)| runs >= 10.0),
        "pod_ingress runs counted",
    );
    let exposition = cluster.metrics();
    let (runs, seconds) = runs_of(&exposition, "pod_ingress").expect("pod_ingress");
    let ns_per_run = seconds * 1e9 / runs;
    assert!(
        (1.0..1_000_000.0).contains(&ns_per_run),
        "{ns_per_run} ns per run"
    );
    assert!(
        runs_of(&exposition, "uplink_ingress").is_some(),
        "every program the agent loaded is listed:\n{exposition}"
    );
}
