//! What each data path program costs under real traffic: the kernel's own run count
//! and run time per program (`bpf_prog_info`), beside the test-run figures of the
//! benchmark. The kernel counts only while `kernel.bpf_stats_enabled` is 1 (or a
//! process holds `BPF_ENABLE_STATS` open): counting costs two clock reads per run,
//! so it is the operator's to switch on, and the agent (without `CAP_SYS_ADMIN`)
//! cannot. The agent samples the counts once a second, from the programs it holds.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use aya::Ebpf;
use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use super::{labels, Labels};

/// One program's counts, as the kernel kept them since it was loaded.
struct ProgramRuns {
    program: String,
    runs: u64,
    run_time: Duration,
}

/// The latest sample, shared between the agent (which holds the programs) and the
/// metrics endpoint.
#[derive(Clone, Default)]
pub struct ProgramRunStats(Arc<Mutex<Vec<ProgramRuns>>>);

impl ProgramRunStats {
    /// Samples every loaded program of the data path object.
    pub fn sample(&self, ebpf: &Ebpf) {
        let runs = ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some(ProgramRuns {
                    program: name.to_owned(),
                    runs: info.run_count(),
                    run_time: info.run_time(),
                })
            })
            .collect();
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = runs;
    }

    pub fn register(&self, registry: &mut Registry) {
        let runs = Family::<Labels, Counter>::default();
        let seconds = Family::<Labels, Counter<f64>>::default();
        for sample in self.0.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            let program = labels(&[("program", &sample.program)]);
            runs.get_or_create(&program).inc_by(sample.runs);
            seconds
                .get_or_create(&program)
                .inc_by(sample.run_time.as_secs_f64());
        }
        registry.register(
            "program_runs",
            "Runs of each data path program, counted by the kernel only while kernel.bpf_stats_enabled is 1 (sampled every second)",
            runs,
        );
        registry.register(
            "program_run_seconds",
            "Time spent in each data path program, counted by the kernel only while kernel.bpf_stats_enabled is 1 (sampled every second)",
            seconds,
        );
    }
}
