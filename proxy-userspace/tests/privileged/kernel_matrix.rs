//! Issue 16: the kernels operators run. Each Debian stock kernel (5.10, 6.1, 6.12)
//! boots in the QEMU guest (`testbed::guest`) with this test binary and the agent at
//! their paths here, and the guest runs `SUITE` of this binary: the data path's
//! BPF_PROG_TEST_RUN tests and the fuzzer (fewer cases: the guest is emulated), and
//! an end-to-end test of each attach point (XDP on an uplink, tc on pod interfaces,
//! the socket hooks, a restart with pinned state); with `--data-path`
//! (`EPX_MATRIX=data-path`) every BPF_PROG_TEST_RUN test too. This machine's 6.18 runs
//! the whole suite as usual. Run by `cargo xtask test --kernel <5.10|6.1|6.12|all>`;
//! ignored otherwise (minutes per kernel under emulation).

use std::path::PathBuf;

use ebpf_proxy::datapath::{generation::Generation, IPV6_PROGRAMS};
use testbed::guest::{self, DebianKernel, GuestRun};

/// The tests run on every kernel of the matrix: a sample of the data path's
/// BPF_PROG_TEST_RUN tests (each loads every program: about 40 s on 5.10 under
/// emulation), the fuzzer, the least-connection scan with its accounting, and one
/// end-to-end test per attach point (an `EPX_MATRIX_TESTS` of libtest filters,
/// space-separated, replaces the list).
const SUITE: [&str; 12] = [
    "kernel_matrix::every_program_verifies_and_says_what_it_cost",
    "datapath::a_service_packet_is_translated_to_a_backend_with_valid_checksums",
    "datapath::external_traffic_to_a_remote_backend_is_masqueraded_and_replies_restored",
    "datapath::malformed_and_fragmented_packets_pass_untouched",
    "fuzz_datapath::",
    "accounting::lc_sends_new_flows_to_the_backend_with_fewest_active_ones",
    "services::node_port_and_load_balancer_ip_serve_the_external_client_with_its_own_address",
    "services::cluster_ip_from_a_pod_spreads_tcp_over_all_backends",
    "services::cluster_ip_from_a_pod_spreads_udp_over_all_backends",
    "services::node_processes_reach_cluster_ips_and_node_ports_through_the_socket_hooks",
    "agent_lifecycle::established_connections_survive_an_agent_killed_and_restarted",
    "agent_lifecycle::netlink_tc_attachment_for_kernels_without_tcx_serves_and_survives_a_restart",
];

/// `EPX_MATRIX=data-path`: every test of the modules that drive the programs through
/// BPF_PROG_TEST_RUN, beside `SUITE`, but their end-to-end tests (`END_TO_END_SKIPPED`).
/// About 90 loads of the programs: minutes on 6.x under emulation, an hour on 5.10.
const DATA_PATH_MODULES: [&str; 17] = [
    "accounting::",
    "cpus::",
    "datapath::",
    "decisions::",
    "floods::",
    "fragments::",
    "fuzz_datapath::",
    "icmp::",
    "legacy_kernels::",
    "policies::",
    "refusals::",
    "related_flows::",
    "schedulers::",
    "sctp::",
    "sync::",
    "tunnel::",
    "upgrades::",
];

/// The end-to-end tests of `DATA_PATH_MODULES`, which the guest is not built for
/// (it has no ping, and their traffic would take minutes under emulation); `SUITE`
/// covers each attach point end to end. A new end-to-end test in those modules fails in the guest until named here.
const END_TO_END_SKIPPED: [&str; 13] = [
    "floods::a_spoofed_syn_flood_on_the_wire_fails_no_legitimate_request_and_expires",
    "fragments::datagrams_larger_than_the_mtu_reach_a_udp_service_and_come_back_whole",
    "fragments::sixty_thousand_byte_datagrams_cross_cluster_ips_and_node_ports_whole",
    "icmp::port_unreachable_from_a_backend_reaches_clients_as_refused",
    "icmp::path_mtu_discovery_works_through_a_node_port_to_a_narrower_pod_link",
    "refusals::clients_of_a_service_without_endpoints_are_refused_at_once",
    "refusals::a_ping_of_a_service_address_is_refused_from_it",
    "refusals::other_protocols_to_a_service_address_are_refused_end_to_end",
    "refusals::clients_of_an_unknown_port_of_a_cluster_ip_are_refused_at_once",
    "schedulers::lc_sends_new_connections_away_from_a_backend_holding_long_lived_ones",
    "schedulers::connection_counts_return_to_zero_after_two_thousand_connections",
    "schedulers::wrr_and_sh_on_real_traffic_and_a_scheduler_change_keeps_established_flows",
    "legacy_kernels::an_agent_on_the_legacy_object_serves_every_attach_point",
];

/// The libtest filters a guest runs: `EPX_MATRIX_TESTS` if set, else `SUITE`, with
/// `DATA_PATH_MODULES` under `EPX_MATRIX=data-path`.
fn tests() -> String {
    if let Ok(tests) = std::env::var("EPX_MATRIX_TESTS") {
        return tests;
    }
    let mut tests = SUITE.join(" ");
    if std::env::var("EPX_MATRIX").as_deref() == Ok("data-path") {
        tests += &format!(" {}", DATA_PATH_MODULES.join(" "));
        for skipped in END_TO_END_SKIPPED {
            tests += &format!(" --skip {skipped}");
        }
    }
    tests
}

/// The fuzzer's cases inside the guest (the host runs its default).
const GUEST_FUZZ_CASES: u32 = 64;

/// The kernels `EPX_KERNELS` names (generations, comma-separated, or `all`).
fn kernels() -> Vec<DebianKernel> {
    let wanted = std::env::var("EPX_KERNELS").unwrap_or_else(|_| "all".to_owned());
    if wanted == "all" {
        return DebianKernel::ALL.to_vec();
    }
    wanted
        .split(',')
        .map(|g| {
            DebianKernel::from_generation(g.trim())
                .unwrap_or_else(|| panic!("no Debian kernel of generation {g:?} (5.10, 6.1, 6.12)"))
        })
        .collect()
}

/// One kernel's outcome, from libtest's summary line.
struct KernelResult {
    kernel: String,
    passed: u32,
    failed: Vec<String>,
    seconds: u64,
    /// "generation program instructions" lines of the verifier's work.
    costs: Vec<String>,
}

fn run_on(kernel: DebianKernel) -> KernelResult {
    let tests = tests();
    let exe = std::env::current_exe().expect("this test binary");
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_ebpf-proxy"));
    let spec = GuestRun {
        name: "matrix",
        binaries: vec![(exe.clone(), exe.clone()), (agent.clone(), agent)],
        command: format!(
            "PROPTEST_CASES={GUEST_FUZZ_CASES} {} {tests} --test-threads 1 --nocapture",
            exe.display()
        ),
        kernel,
    };
    let (mut passed, mut failed, mut costs) = (0, Vec::new(), Vec::new());
    let mut listing_failures = false;
    let outcome = guest::run(&spec, |line| {
        eprintln!("guest {}: {line}", kernel.generation());
        if let Some(cost) = line.split("EPX-VERIFIED ").nth(1) {
            costs.push(cost.trim().to_owned());
        }
        // libtest's closing list: "failures:", then one indented name per line (with
        // --nocapture a failed test's own line ends in its output, not "FAILED").
        if line == "failures:" {
            listing_failures = true;
        } else if listing_failures {
            match line.strip_prefix("    ") {
                Some(name) => failed.push(name.to_owned()),
                None => listing_failures = false,
            }
        }
        if let Some(summary) = line.split("test result: ").nth(1) {
            passed = summary
                .split(". ")
                .nth(1)
                .and_then(|s| s.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    });
    let (kernel_name, seconds) = match &outcome {
        Ok(o) => (o.kernel.clone(), o.elapsed.as_secs()),
        Err(e) => {
            // Its console was echoed above: the error's first line says enough.
            let error = format!("{e:#}");
            failed.push(format!(
                "the guest run: {}",
                error.lines().next().unwrap_or("")
            ));
            (kernel.generation().to_owned(), 0)
        }
    };
    KernelResult {
        kernel: kernel_name,
        passed,
        failed,
        seconds,
        costs,
    }
}

#[test]
#[ignore = "boots Debian's kernels in QEMU: `cargo xtask test --kernel <5.10|6.1|6.12|all>`"]
fn the_data_path_suite_passes_on_debian_stock_kernels() {
    let results: Vec<KernelResult> = kernels().into_iter().map(run_on).collect();
    for r in &results {
        eprintln!(
            "EPX-MATRIX kernel {}: {} passed, {} failed, {} s{}{}",
            r.kernel,
            r.passed,
            r.failed.len(),
            r.seconds,
            r.costs
                .iter()
                .map(|c| format!("\n  verified: {c}"))
                .collect::<String>(),
            r.failed
                .iter()
                .map(|f| format!("\n  failed: {f}"))
                .collect::<String>()
        );
    }
    for r in &results {
        assert!(
            r.failed.is_empty() && r.passed > 0,
            "kernel {}: {:?}",
            r.kernel,
            r.failed
        );
    }
}

/// Loads the object this kernel takes and prints, per program, the instructions the
/// verifier processed (`EPX-VERIFIED generation program count`; kernels before 5.16
/// do not report them: "unreported"), which the matrix collects per kernel.
#[test]
fn every_program_verifies_and_says_what_it_cost() {
    let dp = crate::support::datapath::TestDatapath::new();
    let generation = dp.datapath.generation;
    let mut programs: Vec<_> = dp.datapath.ebpf.programs().collect();
    programs.sort_by_key(|(name, _)| *name);
    assert!(programs.len() >= 9, "{} programs", programs.len());
    for (name, program) in programs {
        // The legacy object's IPv6 programs are left unloaded on purpose (the loader).
        if generation == Generation::Legacy && IPV6_PROGRAMS.contains(&name) {
            assert!(program.info().is_err(), "{name} loaded on a legacy kernel");
            eprintln!("EPX-VERIFIED {generation:?} {name} not-loaded");
            continue;
        }
        let info = program.info().expect("a loaded program's info");
        let cost = info
            .verified_instruction_count()
            .map_or("unreported".to_owned(), |n| n.to_string());
        eprintln!("EPX-VERIFIED {generation:?} {name} {cost}");
    }
}
