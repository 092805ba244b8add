//! End to end over each address family: a dual-stack node (`--node-ip` of both),
//! dual-stack pods and clients, dual-stack Services (both clusterIPs, IPv4 and IPv6
//! EndpointSlices). Each test body runs for IPv4 and for IPv6 against the same
//! services, with real servers and clients (curl, socat).

use std::net::IpAddr;

use ebpf_proxy::model::Family;
use testbed::{
    manifests::ServiceDef,
    servers::blob,
    topology::{host_port, in_family, Topology, CLIENT_IP, NODE_IP},
};

use crate::support::{cluster::*, services::*};

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

fn url(address: IpAddr, port: u16) -> String {
    format!("http://{}/", host_port(address, port))
}

fn dual_web(topology: &Topology, pods: &[&str]) -> ServiceDef {
    web(topology, pods).dual_stack()
}

#[test]
fn cluster_ips_of_both_families_spread_tcp_and_udp_from_a_pod_over_every_backend() {
    let cluster = Cluster::new("dscip", 4, 0, |t| {
        let backends = ["pod-a1", "pod-a2", "pod-a3"];
        vec![dual_web(t, &backends), dns(t, &backends).dual_stack()]
    });
    let client = cluster.ns("pod-a4");
    let client_pod = cluster.topology.pod("pod-a4").addr;
    for family in FAMILIES {
        let bodies = curl_n(client, &url(in_family(WEB_VIP, family), 80), 6);
        let counts = tally(&bodies);
        assert_eq!(
            counts.values().copied().collect::<Vec<_>>(),
            vec![2, 2, 2],
            "{family}: {counts:?}"
        );
        // Not masqueraded: the backends see the client pod's address of the family.
        assert!(
            bodies
                .iter()
                .all(|b| client_ip_of(b) == in_family(client_pod, family)),
            "{family}: {bodies:?}"
        );
        let answers: Vec<String> = (0..3)
            .map(|_| udp_ask(client, &host_port(in_family(DNS_VIP, family), 53)))
            .collect();
        assert_eq!(tally(&answers).len(), 3, "{family}: {answers:?}");
    }
}

/// NodePort and LoadBalancer IP of each family from the external client: a local
/// backend sees the client's own address; a remote one (another node) the node's
/// address of the family, masqueraded, as kube-proxy does.
#[test]
fn node_ports_and_load_balancer_ips_of_both_families_serve_the_external_client() {
    let cluster = Cluster::new("dsext", 1, 1, |t| {
        let mut local = dual_web(t, &["pod-a1"]);
        local.node_port = Some(NODE_PORT);
        local.load_balancer_ip = Some(LB_IP);
        let mut remote = ServiceDef::new("far", DNS_VIP, "TCP", 80, 8080)
            .with_pods([t.pod("pod-b1")])
            .dual_stack();
        remote.node_port = Some(NODE_PORT + 1);
        vec![local, remote]
    });
    let client = &cluster.topology.client;
    for family in FAMILIES {
        let node = in_family(NODE_IP, family);
        for target in [url(node, NODE_PORT), url(in_family(LB_IP, family), 80)] {
            let bodies = curl_n(client, &target, 2);
            assert!(
                bodies
                    .iter()
                    .all(|b| pod_of(b) == "pod-a1"
                        && client_ip_of(b) == in_family(CLIENT_IP, family)),
                "{target}: {bodies:?}"
            );
        }
        let far = url(node, NODE_PORT + 1);
        let bodies = curl_n(client, &far, 2);
        assert!(
            bodies
                .iter()
                .all(|b| pod_of(b) == "pod-b1" && client_ip_of(b) == node),
            "{far}: masqueraded to the node's {family} address: {bodies:?}"
        );
    }
}

/// A pod reaching itself through its service (hairpin) is masqueraded, in each
/// family, so that its own replies come back through the node.
#[test]
fn a_pod_reaches_itself_through_its_service_in_both_families() {
    let cluster = Cluster::new("dshair", 1, 0, |t| vec![dual_web(t, &["pod-a1"])]);
    let pod = cluster.ns("pod-a1");
    for family in FAMILIES {
        let body = curl(pod, &url(in_family(WEB_VIP, family), 80))
            .unwrap_or_else(|e| panic!("{family}: {e}"));
        assert_eq!(pod_of(&body), "pod-a1", "{family}");
    }
}

/// An 8 MB download over IPv6 through the ClusterIP arrives byte for byte (the
/// pseudo-header checksum of every segment rewritten right, both directions).
#[test]
fn an_eight_megabyte_download_over_ipv6_is_byte_exact() {
    let cluster = Cluster::new("ds8mb", 2, 0, |t| vec![dual_web(t, &["pod-a1"])]);
    let client = cluster.ns("pod-a2");
    let target = url(in_family(WEB_VIP, Family::V6), 80) + "bytes/8000000";
    let file = format!("/tmp/epx{}-ds8mb-blob", std::process::id());
    let fetched = client.exec("curl", &["-sS", "--max-time", "30", "-o", &file, &target]);
    let downloaded = std::fs::read(&file);
    let _ = std::fs::remove_file(&file);
    fetched.expect("download");
    let downloaded = downloaded.expect("the downloaded file");
    assert!(
        downloaded == blob(8_000_000),
        "the download is not byte-exact ({} bytes)",
        downloaded.len()
    );
}
