//! The manifests source, end to end: a corrupted or deleted file keeps the last good
//! state; a full service table is reported and what fits keeps working.

use std::net::Ipv4Addr;

use testbed::{
    manifests::{render, ServiceDef},
    topology::Topology,
};

use crate::support::{cluster::*, services::*};

#[test]
fn a_corrupted_or_deleted_manifests_file_keeps_the_last_good_state() {
    let services = |t: &Topology| vec![web(t, &["pod-a1"]), dns(t, &["pod-a1"])];
    let cluster = Cluster::new("bad", 2, 0, services);
    let client = cluster.ns("pod-a2");
    let good = render(&services(&cluster.topology));
    // The second half of the file (the UDP service) becomes garbage.
    let split = good
        .find("name: dns")
        .and_then(|i| good[..i].rfind("---"))
        .expect("dns document");
    let corrupted = format!(
        "{}---\napiVersion: v1\nkind: Service\n  metadata: [broken\n",
        &good[..split]
    );
    std::fs::write(&cluster.agent.manifests, corrupted).expect("write");
    wait_until(
        || cluster.agent.log().contains("removing nothing"),
        "the agent read the corrupted file",
    );
    assert!(curl(client, &format!("http://{WEB_VIP}/")).is_ok());
    assert!(
        udp_ask(client, &format!("{DNS_VIP}:53")).starts_with("pod=pod-a1"),
        "the UDP service must stay"
    );
    std::fs::remove_file(&cluster.agent.manifests).expect("delete");
    wait_until(
        || cluster.agent.log().contains("manifests unreadable"),
        "the agent noticed the deletion",
    );
    assert!(curl(client, &format!("http://{WEB_VIP}/")).is_ok());
    assert_eq!(cluster.agent.listing().expect("list").services.len(), 2);
}

#[test]
fn a_full_service_table_is_reported_and_the_services_that_fit_keep_working() {
    let cluster = Cluster::with_agent_args(
        "full",
        2,
        0,
        |t| {
            (1..=3u8)
                .map(|i| {
                    ServiceDef::new(
                        &format!("svc{i}"),
                        Ipv4Addr::new(10, 96, 1, i),
                        "TCP",
                        80,
                        8080,
                    )
                    .with_pods([t.pod("pod-a1")])
                })
                .collect()
        },
        &["--max-services", "2"],
    );
    let log = cluster.agent.log();
    assert!(
        log.contains("the service table is full (raise --max-services)"),
        "{log}"
    );
    let client = cluster.ns("pod-a2");
    assert!(curl(client, "http://10.96.1.1/").is_ok());
    assert!(curl(client, "http://10.96.1.2/").is_ok());
    assert!(
        curl(client, "http://10.96.1.3/").is_err(),
        "the third does not fit"
    );
    let metrics = curl(&cluster.topology.node, "http://127.0.0.1:10249/metrics").expect("metrics");
    assert!(
        metrics.contains("ebpf_proxy_map_capacity{map=\"SERVICES\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("ebpf_proxy_sync_problems 1"), "{metrics}");
}
