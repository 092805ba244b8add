//! End to end over each address family: a dual-stack node (`--node-ip` of both),
//! dual-stack pods and clients, dual-stack Services (both clusterIPs, IPv4 and IPv6
//! EndpointSlices). Each test body runs for IPv4 and for IPv6 against the same
//! services, with real servers and clients (curl, socat).

use std::{net::IpAddr, time::Duration};

use ebpf_proxy::model::Family;
use serde_json::json;
use testbed::{
    agent::AgentOptions,
    apiserver::Resource,
    eventually,
    manifests::ServiceDef,
    servers::blob,
    topology::{host_port, in_family, Topology, CLIENT_IP, NODE_IP, NODE_NAME},
};

use crate::support::{cluster::*, services::*};

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
    for family in Family::ALL {
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
    let cluster = Cluster::new("dsext", 1, 1, near_and_far);
    serve_the_external_client_in_both_families(&cluster);
}

/// Without `--node-ip`, with the Kubernetes source, the node's addresses of both
/// families come from its Node object (first InternalIP, then the other family's
/// ExternalIP, as kube-proxy reads them): NodePorts answer on both and each family
/// masquerades to its own. When the object's addresses change, the agent exits to be
/// restarted with them.
#[test]
fn a_node_without_node_ip_flags_takes_both_addresses_from_its_node_object_and_follows_it() {
    let node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": NODE_NAME },
        "status": { "addresses": [
            { "type": "Hostname", "address": NODE_NAME },
            { "type": "InternalIP", "address": NODE_IP.to_string() },
            { "type": "ExternalIP", "address": in_family(NODE_IP, Family::V6).to_string() },
        ] },
    });
    let mut cluster = Cluster::with_api_server_prepared(
        "dsnode",
        1,
        1,
        near_and_far,
        AgentOptions {
            no_node_ips: true,
            ..Default::default()
        },
        |api| {
            api.apply(Resource::Nodes, &node).expect("the Node");
        },
    );
    let log = cluster.agent.log();
    assert!(log.contains("node addresses from the Node object"), "{log}");
    serve_the_external_client_in_both_families(&cluster);

    // A status without addresses changes nothing; losing the IPv6 address does: the
    // agent exits, to be restarted with the new addresses, as kube-proxy does.
    let with_addresses = |addresses: serde_json::Value| {
        let mut changed = node.clone();
        changed["status"]["addresses"] = addresses;
        changed
    };
    let api = cluster.api.take().expect("the API server");
    api.apply(Resource::Nodes, &with_addresses(json!([])))
        .expect("the Node");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(cluster.agent.exit_status(), None, "{}", cluster.agent.log());
    let ipv4_only = json!([{ "type": "InternalIP", "address": NODE_IP.to_string() }]);
    api.apply(Resource::Nodes, &with_addresses(ipv4_only))
        .expect("the Node");
    let exited = eventually(Duration::from_secs(10), Duration::from_millis(100), || {
        cluster.agent.exit_status().is_some_and(|s| !s.success())
    });
    let log = cluster.agent.log();
    assert!(exited, "the agent did not exit: {log}");
    // For the second change, not the first (an exit on the empty status would say
    // `to []`).
    assert!(
        log.contains(&format!(
            "addresses changed from [{NODE_IP}, {}] to [{NODE_IP}]",
            in_family(NODE_IP, Family::V6)
        )),
        "{log}"
    );
}

/// A service with a local backend on a NodePort and a LoadBalancer IP, and one with
/// a remote backend on the next NodePort, both dual-stack.
fn near_and_far(t: &Topology) -> Vec<ServiceDef> {
    let mut local = dual_web(t, &["pod-a1"]);
    local.node_port = Some(NODE_PORT);
    local.load_balancer_ip = Some(LB_IP);
    let mut remote = ServiceDef::new("far", DNS_VIP, "TCP", 80, 8080)
        .with_pods([t.pod("pod-b1")])
        .dual_stack();
    remote.node_port = Some(NODE_PORT + 1);
    vec![local, remote]
}

fn serve_the_external_client_in_both_families(cluster: &Cluster) {
    let client = &cluster.topology.client;
    for family in Family::ALL {
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
    for family in Family::ALL {
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

/// The node's own processes reach both families' services through the socket hooks:
/// IPv6 ClusterIP and NodePort, and the IPv4 ClusterIP through its IPv4-mapped IPv6
/// address (a dual-stack socket), TCP and unconnected-then-connected UDP alike.
#[test]
fn node_processes_reach_ipv6_services_and_ipv4_ones_through_mapped_addresses() {
    let cluster = Cluster::new("dshost", 2, 0, |t| {
        let mut service = dual_web(t, &["pod-a1", "pod-a2"]);
        service.node_port = Some(NODE_PORT);
        vec![service, dns(t, &["pod-a1"]).dual_stack()]
    });
    let node = &cluster.topology.node;
    let mapped = |v4: std::net::Ipv4Addr| IpAddr::V6(v4.to_ipv6_mapped());
    for target in [
        url(in_family(WEB_VIP, Family::V6), 80),
        url(in_family(NODE_IP, Family::V6), NODE_PORT),
        url(mapped(WEB_VIP), 80),
    ] {
        let bodies = curl_n(node, &target, 4);
        assert_eq!(tally(&bodies).len(), 2, "{target}: {bodies:?}");
    }
    // The answer must appear to come from the address socat sent to (recvmsg6 puts
    // the service's back, mapped or not), or socat would not take it.
    for dns in [in_family(DNS_VIP, Family::V6), mapped(DNS_VIP)] {
        let answer = udp_ask(node, &host_port(dns, 53));
        assert!(answer.starts_with("pod=pod-a1"), "{dns}: {answer}");
    }
}

/// The operators' tools speak both families: `list` writes IPv6 frontends and
/// backends as ipvsadm does (`[addr]:port`), `trace` explains an IPv6 packet (here a
/// NodePort flow masqueraded to the node's IPv6 address) and `conntrack list` shows
/// the IPv6 flows.
#[test]
fn list_trace_and_conntrack_show_ipv6_as_ipvsadm_writes_it() {
    let cluster = Cluster::new("dstools", 1, 1, |t| {
        let mut service = dual_web(t, &["pod-b1"]);
        service.node_port = Some(NODE_PORT);
        vec![service]
    });
    let pin_dir = cluster.agent.pin_dir.to_str().expect("pin dir").to_owned();
    let binary = cluster.agent.binary().to_str().expect("binary").to_owned();
    let listing = testbed::command::run(&binary, &["list", "--pin-dir", &pin_dir]).expect("list");
    let backend = in_family(cluster.topology.pod("pod-b1").addr, Family::V6);
    for expected in [
        host_port(in_family(WEB_VIP, Family::V6), 80),
        format!("[*]:{NODE_PORT}"),
        host_port(backend, 8080),
    ] {
        assert!(listing.contains(&expected), "{expected} not in:\n{listing}");
    }
    let node = in_family(NODE_IP, Family::V6);
    let client = host_port(in_family(CLIENT_IP, Family::V6), 40000);
    let traced = testbed::command::run(
        &binary,
        &[
            "trace",
            "--json",
            "--pin-dir",
            &pin_dir,
            "--src",
            &client,
            "--dst",
            &host_port(node, NODE_PORT),
            "--iface",
            "up0",
        ],
    )
    .expect("trace");
    let explained: serde_json::Value = serde_json::from_str(&traced).expect("json");
    assert_eq!(
        explained["backend"],
        host_port(backend, 8080),
        "{explained}"
    );
    assert_eq!(
        explained["translated"][0],
        host_port(node, 40000),
        "{explained}"
    );
    // A real flow, then its conntrack entry.
    let body = curl(&cluster.topology.client, &url(node, NODE_PORT)).expect("curl");
    assert_eq!(client_ip_of(&body), node, "masqueraded: {body}");
    let flows = testbed::command::run(&binary, &["conntrack", "list", "--pin-dir", &pin_dir])
        .expect("conntrack list");
    assert!(
        flows.contains(&host_port(backend, 8080)),
        "no IPv6 flow in:\n{flows}"
    );
}

/// From the Kubernetes source: a dual-stack Service (both clusterIPs answer) whose
/// `externalTrafficPolicy: Local` keeps each family's NodePort on this node's
/// endpoint, with the client's own address, and whose health check answers on both
/// families (one dual-stack pod is one local endpoint); `internalTrafficPolicy:
/// Local` then keeps each family's clusterIP on it.
#[test]
fn the_kubernetes_source_serves_dual_stack_services_with_both_traffic_policies() {
    const HEALTH_PORT: u16 = 31999;
    let exposed = |t: &Topology| {
        let mut service = dual_web(t, &["pod-a1", "pod-b1"]);
        service.node_port = Some(NODE_PORT);
        service
    };
    let cluster = Cluster::with_api_server(
        "dskube",
        2,
        1,
        |t| {
            vec![exposed(t)
                .with_spec("externalTrafficPolicy: Local")
                .with_spec(&format!("healthCheckNodePort: {HEALTH_PORT}"))]
        },
        &["--min-sync-period-ms", "0"],
    );
    let t = &cluster.topology;
    let client = &t.client;
    for family in Family::ALL {
        let pods = tally(&curl_n(
            cluster.ns("pod-a2"),
            &url(in_family(WEB_VIP, family), 80),
            6,
        ));
        assert_eq!(
            pods.len(),
            2,
            "{family}: the clusterIP serves both: {pods:?}"
        );
        let node = in_family(NODE_IP, family);
        let bodies = curl_n(client, &url(node, NODE_PORT), 4);
        assert!(
            bodies
                .iter()
                .all(|b| pod_of(b) == "pod-a1" && client_ip_of(b) == in_family(CLIENT_IP, family)),
            "{family}: {bodies:?}"
        );
        let health = curl(client, &(url(node, HEALTH_PORT) + "healthz")).expect("health");
        let report: serde_json::Value = serde_json::from_str(&health).expect("JSON");
        assert_eq!(report["localEndpoints"], 1, "{family}: {report}");
    }
    cluster
        .api()
        .apply_manifests(&testbed::manifests::render(&[
            exposed(t).with_spec("internalTrafficPolicy: Local")
        ]))
        .expect("apply");
    for family in Family::ALL {
        let vip = url(in_family(WEB_VIP, family), 80);
        wait_until(
            || tally(&curl_n(cluster.ns("pod-a2"), &vip, 6)).len() == 1,
            &format!("{family}: the clusterIP keeps to this node's endpoint"),
        );
        assert_eq!(
            pod_of(&curl(cluster.ns("pod-a2"), &vip).expect("curl")),
            "pod-a1"
        );
    }
}
