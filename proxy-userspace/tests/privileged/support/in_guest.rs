//! Tests that need a kernel this machine does not have (IPVS, SCTP): the QEMU guest
//! the bench boots (`testbed::guest`) runs one ignored test of this binary, with the
//! binary and the agent at their paths here.

use std::path::PathBuf;

use testbed::guest::{self, DebianKernel, GuestRun};

/// Boots the guest (Debian 12's kernel) and runs the ignored test `test` there (its
/// full path, `module::name`); its console is echoed. Panics unless it passed.
pub fn run_ignored_test(name: &'static str, test: &str) {
    let exe = std::env::current_exe().expect("this test binary");
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_ebpf-proxy"));
    let spec = GuestRun {
        name,
        binaries: vec![(exe.clone(), exe.clone()), (agent.clone(), agent)],
        command: format!(
            "{} --ignored --exact {test} --nocapture --test-threads 1",
            exe.display()
        ),
        kernel: DebianKernel::Bookworm,
    };
    let mut passed = false;
    guest::run(&spec, |line| {
        eprintln!("guest: {line}");
        passed |= line.contains("test result: ok. 1 passed");
    })
    .expect("the guest run");
    assert!(passed, "{test} did not pass in the guest");
}
