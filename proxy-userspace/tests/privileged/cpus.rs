//! Flows across CPUs, through BPF_PROG_TEST_RUN pinned to each CPU: a flow whose
//! packets move to another CPU keeps its backend, and two CPUs opening the same flows
//! at once agree on one backend each (the conntrack race).

use std::collections::BTreeSet;

use crate::support::{datapath::*, packets::*};

const VIP: [u8; 4] = [10, 96, 0, 10];
const CLIENT: [u8; 4] = [198, 18, 0, 2];

fn three_backends() -> Vec<ebpf_proxy::model::Endpoint> {
    vec![
        local([10, 244, 1, 2], 8080),
        local([10, 244, 1, 3], 8080),
        local([10, 244, 1, 4], 8080),
    ]
}

#[test]
fn a_flow_keeps_its_backend_when_its_packets_change_cpu() {
    if cpus() < 2 {
        panic!("this test needs two CPUs");
    }
    let dp = std::sync::Arc::new(std::sync::Mutex::new(TestDatapath::new()));
    dp.lock()
        .expect("lock")
        .program(&[(tcp(VIP, 80), three_backends())]);
    let mut chosen = Vec::new();
    for (turn, cpu) in [0, 1, 0, 1].into_iter().enumerate() {
        let worker = dp.clone();
        let flags = if turn == 0 { Tcp::Syn } else { Tcp::Ack };
        let seen = on_cpu(cpu, move || {
            let packet = tcp_packet((CLIENT, 40000), (VIP, 80), flags, b"");
            inspect(&worker.lock().expect("lock").xdp(&packet).1).dst
        })
        .join()
        .expect("worker thread");
        chosen.push(seen);
        // New flows from other clients in between move the rr cursor on.
        let other = tcp_packet((CLIENT, 41000 + turn as u16), (VIP, 80), Tcp::Syn, b"");
        let _ = dp.lock().expect("lock").xdp(&other);
    }
    assert!(chosen.iter().all(|c| *c == chosen[0]), "{chosen:?}");
    assert_eq!(dp.lock().expect("lock").event("ct_midflow_miss"), 0);
}

#[test]
fn two_cpus_opening_the_same_flows_at_once_agree_on_one_backend() {
    if cpus() < 2 {
        panic!("this test needs two CPUs");
    }
    const FLOWS: u16 = 3000;
    let pin_dir = {
        let mut dp = TestDatapath::new();
        dp.program(&[(tcp(VIP, 80), three_backends())]);
        dp
    };
    let prog_path = pin_dir.pin_dir.clone();
    let dp = std::sync::Arc::new(pin_dir);
    // Both CPUs send the SYN of every flow, racing each other from the start.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let workers: Vec<_> = (0..2)
        .map(|cpu| {
            let barrier = barrier.clone();
            let dp = dp.clone();
            on_cpu(cpu, move || {
                let xdp = dp.datapath.ebpf.program("uplink_ingress").expect("program");
                let xdp: &aya::programs::Xdp = xdp.try_into().expect("xdp");
                barrier.wait();
                (0..FLOWS)
                    .map(|i| {
                        let packet = tcp_packet((CLIENT, 10000 + i), (VIP, 80), Tcp::Syn, b"");
                        let mut out = vec![0u8; packet.len() + 64];
                        let result = aya::programs::TestRun::test_run(
                            xdp,
                            aya::programs::TestRunOptions {
                                data_in: Some(&packet),
                                data_out: Some(&mut out),
                                ..Default::default()
                            },
                        )
                        .expect("test_run");
                        out.truncate(result.data_size_out as usize);
                        inspect(&out).dst
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<Vec<_>> = workers
        .into_iter()
        .map(|w| w.join().expect("worker thread"))
        .collect();
    let disagreements = (0..FLOWS as usize)
        .filter(|i| results[0][*i] != results[1][*i])
        .count();
    assert_eq!(
        disagreements, 0,
        "every flow must have one backend on both CPUs"
    );
    // Exactly one reply entry per flow: a loser withdrew its own.
    let tables = ebpf_proxy::datapath::tables::Tables::open(&prog_path).expect("tables");
    let replies: BTreeSet<_> = tables
        .conntrack
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, e)| e.flags & proxy_common::CT_F_REPLY != 0)
        .map(|(k, _)| k)
        .collect();
    assert_eq!(replies.len(), FLOWS as usize);
}
