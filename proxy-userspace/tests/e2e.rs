//! End to end: the real agent in a node namespace, real servers in pod namespaces,
//! real clients (curl, socat) — traffic crosses the kernel through our programs.
//! Needs root, a mounted bpffs, iproute2, curl, socat and ethtool.

mod support;

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf, time::Duration};

use ebpf_proxy::testbed::{
    agent::{Agent, AgentOptions},
    eventually,
    manifests::{render, ServiceDef},
    netns::Netns,
    servers::HttpConnection,
    topology::{Topology, CLIENT_IP, NODE_IP},
};
use support::cluster::*;

const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const NODE_PORT: u16 = 30080;

fn web(topology: &Topology, pods: &[&str]) -> ServiceDef {
    ServiceDef::new("web", WEB_VIP, "TCP", 80, 8080).with_pods(pods.iter().map(|p| topology.pod(p)))
}

#[test]
fn cluster_ip_from_a_pod_spreads_tcp_over_all_backends() {
    let cluster = Cluster::new("cip", 4, 0, |t| {
        vec![web(t, &["pod-a1", "pod-a2", "pod-a3"])]
    });
    let client = cluster.ns("pod-a4");
    let bodies = curl_n(client, &format!("http://{WEB_VIP}/"), 9);
    let counts = tally(&bodies);
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![3, 3, 3],
        "{counts:?}"
    );
    // Pod-to-service traffic is not masqueraded: backends see the client pod.
    let client_addr = cluster.topology.pod("pod-a4").addr;
    assert!(
        bodies.iter().all(|b| client_of(b) == client_addr),
        "{bodies:?}"
    );
}

fn dns(topology: &Topology, pods: &[&str]) -> ServiceDef {
    ServiceDef::new("dns", DNS_VIP, "UDP", 53, 5353).with_pods(pods.iter().map(|p| topology.pod(p)))
}

/// One UDP request/response with socat from `ns`.
fn udp_ask(ns: &Netns, target: &str) -> String {
    let output = ns
        .exec(
            "sh",
            &["-c", &format!("echo question | socat -T 3 - UDP4:{target}")],
        )
        .expect("socat");
    assert!(!output.is_empty(), "no UDP answer from {target}");
    output
}

#[test]
fn cluster_ip_from_a_pod_spreads_udp_over_all_backends() {
    let cluster = Cluster::new("udp", 4, 0, |t| {
        vec![dns(t, &["pod-a1", "pod-a2", "pod-a3"])]
    });
    let client = cluster.ns("pod-a4");
    // Every socat run uses a new source port: a new flow, scheduled round-robin.
    let answers: Vec<String> = (0..6)
        .map(|_| udp_ask(client, &format!("{DNS_VIP}:53")))
        .collect();
    let counts = tally(&answers);
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2],
        "{counts:?}"
    );
}

#[test]
fn node_port_and_load_balancer_ip_serve_the_external_client_with_its_own_address() {
    let cluster = Cluster::new("ext", 2, 0, |t| {
        let mut service = web(t, &["pod-a1", "pod-a2"]);
        service.node_port = Some(NODE_PORT);
        service.load_balancer_ip = Some(LB_IP);
        vec![service]
    });
    let client = &cluster.topology.client;
    for url in [
        format!("http://{NODE_IP}:{NODE_PORT}/"),
        format!("http://{LB_IP}/"),
    ] {
        let bodies = curl_n(client, &url, 4);
        assert_eq!(tally(&bodies).len(), 2, "{url}: {bodies:?}");
        assert!(
            bodies.iter().all(|b| client_of(b) == CLIENT_IP),
            "local backends see the client: {bodies:?}"
        );
    }
    // The ClusterIP is not reachable on a port the service does not have.
    assert!(curl(client, &format!("http://{NODE_IP}:{}/", NODE_PORT + 1)).is_err());
}

#[test]
fn external_traffic_to_a_backend_on_another_node_is_masqueraded() {
    let cluster = Cluster::new("rem", 0, 1, |t| {
        let mut service = web(t, &["pod-b1"]);
        service.node_port = Some(NODE_PORT);
        vec![service]
    });
    let body = curl(
        &cluster.topology.client,
        &format!("http://{NODE_IP}:{NODE_PORT}/"),
    )
    .expect("curl");
    assert_eq!(pod_of(&body), "pod-b1");
    assert_eq!(
        client_of(&body),
        NODE_IP,
        "the remote backend must answer through this node"
    );
}

#[test]
fn a_pod_reaching_itself_through_its_service_works_thanks_to_hairpin_masquerade() {
    let cluster = Cluster::new("hp", 1, 0, |t| vec![web(t, &["pod-a1"])]);
    let body = curl(cluster.ns("pod-a1"), &format!("http://{WEB_VIP}/")).expect("hairpin curl");
    assert_eq!(pod_of(&body), "pod-a1");
    assert_eq!(client_of(&body), NODE_IP);
}

#[test]
fn a_kept_alive_connection_stays_on_its_backend_while_new_ones_rotate() {
    let cluster = Cluster::new("ka", 3, 0, |t| vec![web(t, &["pod-a1", "pod-a2"])]);
    let client = cluster.ns("pod-a3");
    let mut connection = HttpConnection::open(client, (WEB_VIP, 80).into()).expect("connect");
    let first = pod_of(&connection.get().expect("request"));
    for _ in 0..5 {
        let _ = curl(client, &format!("http://{WEB_VIP}/")).expect("other connection");
        assert_eq!(pod_of(&connection.get().expect("request")), first);
    }
}

#[test]
fn a_removed_backend_gets_no_new_connections_and_an_added_one_does() {
    let mut cluster = Cluster::new("chg", 4, 0, |t| vec![web(t, &["pod-a1", "pod-a2"])]);
    let manifests = render(&[web(&cluster.topology, &["pod-a2", "pod-a3"])]);
    cluster
        .agent
        .update_manifests(&manifests, |l| {
            l.services[0]
                .backends
                .iter()
                .map(|b| b.endpoint.addr.octets()[3])
                .collect::<Vec<_>>()
                == vec![12, 13]
        })
        .expect("update");
    // pod-a1 keeps running: only the service no longer sends to it.
    let bodies = curl_n(cluster.ns("pod-a4"), &format!("http://{WEB_VIP}/"), 6);
    let counts = tally(&bodies);
    assert_eq!(
        counts.keys().cloned().collect::<Vec<_>>(),
        vec!["pod-a2", "pod-a3"],
        "{counts:?}"
    );
    // A pod created after the agent started gets its tc program through netlink.
    let new_pod = cluster
        .topology
        .add_pod(true)
        .expect("new pod")
        .name
        .clone();
    let pin = cluster.agent.pin_dir.join("links").join(format!(
        "tc-{}",
        cluster.topology.pod(&new_pod).host_interface
    ));
    wait_until(|| pin.exists(), "tc attached to the new pod interface");
    let manifests = render(&[web(&cluster.topology, &[&new_pod])]);
    cluster
        .agent
        .update_manifests(&manifests, |l| l.services[0].backends.len() == 1)
        .expect("update");
    let body =
        curl(cluster.ns("pod-a4"), &format!("http://{WEB_VIP}/")).expect("curl to the new pod");
    assert_eq!(pod_of(&body), new_pod);
}

fn wait_until(condition: impl Fn() -> bool, what: &str) {
    let held = eventually(
        Duration::from_secs(10),
        Duration::from_millis(50),
        condition,
    );
    assert!(held, "timed out waiting: {what}");
}

#[test]
fn tftp_through_a_cluster_ip_works_although_the_server_answers_from_a_new_port() {
    let cluster = Cluster::new("tftp", 2, 0, |t| {
        vec![
            ServiceDef::new("tftp", Ipv4Addr::new(10, 96, 0, 69), "UDP", 69, 69)
                .with_pods([t.pod("pod-a1")]),
        ]
    });
    let content = cluster
        .ns("pod-a2")
        .exec(
            "curl",
            &["-sS", "--max-time", "10", "tftp://10.96.0.69/boot.img"],
        )
        .expect("curl tftp");
    assert_eq!(content.len(), ebpf_proxy::testbed::servers::TFTP_FILE_LEN);
    assert!(content.starts_with("pod=pod-a1 "), "{content:?}");
}

#[test]
fn node_processes_reach_cluster_ips_and_node_ports_through_the_socket_hooks() {
    let cluster = Cluster::new("host", 2, 0, |t| {
        let mut service = web(t, &["pod-a1", "pod-a2"]);
        service.node_port = Some(NODE_PORT);
        vec![service, dns(t, &["pod-a1"])]
    });
    let node = &cluster.topology.node;
    for url in [
        format!("http://{WEB_VIP}/"),
        format!("http://{NODE_IP}:{NODE_PORT}/"),
    ] {
        let bodies = curl_n(node, &url, 4);
        assert_eq!(tally(&bodies).len(), 2, "{url}: {bodies:?}");
    }
    // Unconnected UDP: the answer must appear to come from the service address, or
    // socat (connected to the ClusterIP) would not accept it.
    assert!(udp_ask(node, &format!("{DNS_VIP}:53")).starts_with("pod=pod-a1"));
}

#[test]
fn established_connections_survive_an_agent_killed_and_restarted() {
    let Cluster {
        mut agent,
        topology,
        ..
    } = Cluster::new("rst", 3, 0, |t| vec![web(t, &["pod-a1", "pod-a2"])]);
    let client = &topology.pod("pod-a3").ns;
    let mut connection = HttpConnection::open(client, (WEB_VIP, 80).into()).expect("connect");
    let first = pod_of(&connection.get().expect("request"));
    agent.kill();
    // Programs and maps are pinned: forwarding goes on without the agent.
    assert_eq!(
        pod_of(&connection.get().expect("request while the agent is down")),
        first
    );
    assert!(
        curl(client, &format!("http://{WEB_VIP}/")).is_ok(),
        "new connections while down"
    );
    agent.spawn().expect("restart");
    assert_eq!(
        pod_of(&connection.get().expect("request after the restart")),
        first
    );
    let last_sync = agent
        .log()
        .lines()
        .rfind(|l| l.contains("synced"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        last_sync.contains("map_writes=0"),
        "a restart must not rewrite unchanged services: {last_sync}"
    );
}

#[test]
fn cleanup_detaches_every_program_and_removes_the_pins() {
    let cluster = Cluster::new("cln", 2, 0, |t| vec![web(t, &["pod-a1"])]);
    let xdp_attached = |t: &Topology| {
        t.node
            .exec("bpftool", &["net", "show"])
            .expect("bpftool")
            .contains("up0(")
    };
    assert!(xdp_attached(&cluster.topology));
    assert!(curl(cluster.ns("pod-a2"), &format!("http://{WEB_VIP}/")).is_ok());
    let pin_dir = cluster.agent.pin_dir.clone();
    let Cluster {
        agent, topology, ..
    } = cluster;
    drop(agent); // stops the agent and runs `ebpf-proxy cleanup`
    assert!(!pin_dir.exists(), "pins left behind");
    assert!(!xdp_attached(&topology), "XDP still attached");
    // With the tc program gone, the ClusterIP is just an unrouted address again.
    let pod = &topology.pod("pod-a2").ns;
    assert!(pod
        .exec(
            "curl",
            &["-sS", "--max-time", "2", &format!("http://{WEB_VIP}/")]
        )
        .is_err());
}

#[test]
fn xdp_redirect_mode_transmits_from_xdp_to_receivers_that_run_gro() {
    let cluster = Cluster::with_agent_args(
        "xr",
        1,
        1,
        |t| {
            let mut service = web(t, &["pod-a1", "pod-b1"]);
            service.node_port = Some(NODE_PORT);
            vec![service]
        },
        &["--xdp-forward", "redirect"],
    );
    // Frames redirected into a veth are delivered only if the receiving end runs NAPI:
    // XDP or GRO (measured: without it they vanish; see the README).
    let topology = &cluster.topology;
    topology
        .pod("pod-a1")
        .ns
        .exec("ethtool", &["-K", "eth0", "gro", "on"])
        .expect("gro");
    topology
        .node2
        .exec("ethtool", &["-K", "up0", "gro", "on"])
        .expect("gro");
    topology
        .client
        .exec("ethtool", &["-K", "eth0", "gro", "on"])
        .expect("gro");
    let bodies = curl_n(
        &topology.client,
        &format!("http://{NODE_IP}:{NODE_PORT}/"),
        4,
    );
    assert_eq!(tally(&bodies).len(), 2, "{bodies:?}");
    let events = cluster.agent.listing().expect("list").events;
    let redirected = events
        .iter()
        .find(|(name, _)| name == "xdp_redirect")
        .map_or(0, |e| e.1);
    assert!(redirected > 0, "no frame left by XDP_REDIRECT: {events:?}");
}

fn least_connection_web(topology: &Topology, pods: &[&str]) -> ServiceDef {
    web(topology, pods).annotated("ebpf-proxy.io/scheduler", "lc")
}

#[test]
fn lc_sends_new_connections_away_from_a_backend_holding_long_lived_ones() {
    let cluster = Cluster::new("lc", 4, 0, |t| vec![least_connection_web(t, &["pod-a1"])]);
    // Three long-lived connections, all on pod-a1 while it is the only backend.
    let mut held: Vec<HttpConnection> = (0..3)
        .map(|_| HttpConnection::open(cluster.ns("pod-a4"), (WEB_VIP, 80).into()).expect("connect"))
        .collect();
    for connection in &mut held {
        assert_eq!(pod_of(&connection.get().expect("request")), "pod-a1");
    }
    let manifests = render(&[least_connection_web(
        &cluster.topology,
        &["pod-a1", "pod-a2", "pod-a3"],
    )]);
    cluster
        .agent
        .update_manifests(&manifests, |l| l.services[0].backends.len() == 3)
        .expect("update");
    let listing = cluster.agent.listing().expect("list");
    assert_eq!(listing.services[0].scheduler, "lc");
    let a1 = listing.services[0]
        .backends
        .iter()
        .find(|b| b.endpoint.addr.octets()[3] == 11)
        .expect("pod-a1");
    assert_eq!(a1.active, 3, "the held connections are active on pod-a1");
    let bodies = curl_n(cluster.ns("pod-a4"), &format!("http://{WEB_VIP}/"), 10);
    let counts = tally(&bodies);
    assert!(
        !counts.contains_key("pod-a1"),
        "new connections went to the busy backend: {counts:?}"
    );
    for connection in &mut held {
        assert_eq!(
            pod_of(&connection.get().expect("held connection still works")),
            "pod-a1"
        );
    }
}

#[test]
fn connection_counts_return_to_zero_after_two_thousand_connections() {
    let cluster = Cluster::with_agent_args(
        "drift",
        3,
        0,
        |t| vec![least_connection_web(t, &["pod-a1", "pod-a2"])],
        &["--ct-gc-interval-ms", "500"],
    );
    let client = &cluster.topology.pod("pod-a3").ns;
    for _ in 0..2000 {
        let mut connection = HttpConnection::open(client, (WEB_VIP, 80).into()).expect("connect");
        connection.get().expect("request");
    }
    let totals = |l: &ebpf_proxy::listing::Listing| -> (u64, u64, u64) {
        let backends = &l.services[0].backends;
        (
            backends.iter().map(|b| b.active).sum(),
            backends.iter().map(|b| b.inactive).sum(),
            l.services[0].stats.connections,
        )
    };
    // Closed connections leave "active" at once; "inactive" when conntrack expires
    // them (10 s after the close) and the GC collects them.
    let mut last = (0, 0, 0);
    let zero = eventually(Duration::from_secs(25), Duration::from_millis(500), || {
        last = totals(&cluster.agent.listing().expect("list"));
        last.0 == 0 && last.1 == 0
    });
    assert_eq!(last.2, 2000, "connections scheduled");
    assert!(
        zero,
        "counts did not return to zero: active {}, inactive {}",
        last.0, last.1
    );
}

#[test]
fn wrr_and_sh_on_real_traffic_and_a_scheduler_change_keeps_established_flows() {
    let services = |t: &Topology, web_scheduler: &str| {
        vec![
            web(t, &["pod-a1", "pod-a2"])
                .annotated("ebpf-proxy.io/scheduler", web_scheduler)
                .annotated("ebpf-proxy.io/weights", "10.244.1.11=2, 10.244.1.12=1"),
            dns(t, &["pod-a1", "pod-a2"]).annotated("ebpf-proxy.io/scheduler", "sh"),
        ]
    };
    let cluster = Cluster::new("wsh", 3, 0, |t| services(t, "wrr"));
    let client = cluster.ns("pod-a3");
    let bodies = curl_n(client, &format!("http://{WEB_VIP}/"), 9);
    assert_eq!(
        tally(&bodies),
        BTreeMap::from([("pod-a1".to_owned(), 6), ("pod-a2".to_owned(), 3)])
    );
    // sh: one client address, one backend, whatever the source port.
    let answers: Vec<String> = (0..6)
        .map(|_| udp_ask(client, &format!("{DNS_VIP}:53")))
        .collect();
    assert_eq!(tally(&answers).len(), 1, "{answers:?}");

    let mut connection = HttpConnection::open(client, (WEB_VIP, 80).into()).expect("connect");
    let first = pod_of(&connection.get().expect("request"));
    let manifests = render(&services(&cluster.topology, "random"));
    cluster
        .agent
        .update_manifests(&manifests, |l| {
            l.services.iter().any(|s| s.scheduler == "random")
        })
        .expect("update");
    for _ in 0..5 {
        assert_eq!(
            pod_of(&connection.get().expect("request after the change")),
            first
        );
    }
}

#[test]
fn udp_flows_to_a_removed_backend_are_flushed_so_the_client_moves_on() {
    let cluster = Cluster::new("udpf", 3, 0, |t| vec![dns(t, &["pod-a1"])]);
    // The same source port every time, as a resolver's long-lived socket would use.
    let target = format!("{DNS_VIP}:53,sourceport=40053,reuseaddr");
    let client = cluster.ns("pod-a3");
    assert!(udp_ask(client, &target).starts_with("pod=pod-a1"));
    // pod-a1 keeps running: without the flush its conntrack entry would keep the
    // client there for the whole UDP timeout.
    let manifests = render(&[dns(&cluster.topology, &["pod-a2"])]);
    cluster
        .agent
        .update_manifests(&manifests, |l| {
            l.services[0]
                .backends
                .iter()
                .all(|b| b.endpoint.addr.octets()[3] == 12)
        })
        .expect("update");
    assert!(udp_ask(client, &target).starts_with("pod=pod-a2"));
    assert!(
        cluster.agent.log().contains("flushed_udp_flows=1"),
        "{}",
        cluster.agent.log()
    );
}

#[test]
fn conntrack_list_and_flush_show_and_remove_flows() {
    let cluster = Cluster::new("ct", 2, 0, |t| vec![web(t, &["pod-a1"])]);
    let client = cluster.ns("pod-a2");
    let mut connection = HttpConnection::open(client, (WEB_VIP, 80).into()).expect("connect");
    connection.get().expect("request");
    let pin_dir = cluster.agent.pin_dir.to_str().expect("pin dir").to_owned();
    let binary = cluster.agent.binary().to_str().expect("binary").to_owned();
    let ct = |args: &[&str]| {
        let mut full = vec!["conntrack"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--pin-dir", &pin_dir]);
        ebpf_proxy::testbed::command::run(&binary, &full).expect("ebpf-proxy conntrack")
    };
    let flows: Vec<serde_json::Value> =
        serde_json::from_str(&ct(&["list", "--json"])).expect("json");
    assert_eq!(flows.len(), 1, "{flows:?}");
    assert_eq!(
        flows[0]["client"]
            .as_str()
            .map(|c| c.starts_with("10.244.1.12:")),
        Some(true)
    );
    assert_eq!(flows[0]["backend"], "10.244.1.11:8080");
    assert_eq!(flows[0]["state"], "ESTABLISHED");
    assert!(ct(&["list", "--service", "demo/other"]).is_empty());
    assert_eq!(
        ct(&["flush", "--backend", "10.244.1.11"]).trim(),
        "flushed 1 flows"
    );
    assert_eq!(ct(&["list"]), "");
    // The next segment finds no entry and is re-hashed: with one backend, the same one.
    assert_eq!(
        pod_of(&connection.get().expect("request after the flush")),
        "pod-a1"
    );
    let events = cluster.agent.listing().expect("list").events;
    assert!(
        events
            .iter()
            .any(|(name, n)| name == "ct_midflow_miss" && *n > 0),
        "{events:?}"
    );
}

#[test]
fn metrics_health_and_proxy_mode_answer_like_kube_proxy() {
    let cluster = Cluster::new("obs", 2, 0, |t| vec![web(t, &["pod-a1"])]);
    for _ in 0..3 {
        curl(cluster.ns("pod-a2"), &format!("http://{WEB_VIP}/")).expect("curl");
    }
    let node = &cluster.topology.node;
    assert_eq!(
        curl(node, "http://127.0.0.1:10249/proxyMode").expect("proxyMode"),
        "ebpf"
    );
    let metrics = curl(node, "http://127.0.0.1:10249/metrics").expect("metrics");
    let line = |prefix: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in:\n{metrics}"))
            .to_owned()
    };
    assert!(
        line("ebpf_proxy_service_connections_total{service=\"demo/web:main\",frontend=\"TCP 10.96.0.10:80\"}").ends_with(" 3"),
        "{metrics}"
    );
    assert!(
        line("ebpf_proxy_datapath_events_total{reason=\"translated\"}")
            .split(' ')
            .nth(1)
            > Some("0")
    );
    assert!(line("ebpf_proxy_map_entries{map=\"SERVICES\"}").ends_with(" 1"));
    assert!(line("ebpf_proxy_syncs_total").ends_with(" 1"));
    assert_eq!(
        curl(node, "http://127.0.0.1:10256/readyz").expect("readyz"),
        "ok\n"
    );
    assert!(curl(node, "http://127.0.0.1:10256/healthz")
        .expect("healthz")
        .contains("lastUpdated"));
    // Health answers on the node's address (load balancers probe it); metrics do not.
    let client = &cluster.topology.client;
    assert!(curl(client, &format!("http://{NODE_IP}:10256/livez")).is_ok());
    assert!(curl(client, &format!("http://{NODE_IP}:10249/metrics")).is_err());
}

#[test]
fn trace_explains_a_packet_without_changing_anything() {
    let cluster = Cluster::new("trc", 2, 1, |t| {
        let mut service = web(t, &["pod-b1"]);
        service.node_port = Some(NODE_PORT);
        vec![service]
    });
    let pin_dir = cluster.agent.pin_dir.to_str().expect("pin dir").to_owned();
    let binary = cluster.agent.binary().to_str().expect("binary").to_owned();
    let trace = |src: &str, dst: &str, iface: Option<&str>| -> serde_json::Value {
        let mut args = vec![
            "trace",
            "--json",
            "--pin-dir",
            &pin_dir,
            "--src",
            src,
            "--dst",
            dst,
        ];
        if let Some(iface) = iface {
            args.extend_from_slice(&["--iface", iface]);
        }
        serde_json::from_str(&ebpf_proxy::testbed::command::run(&binary, &args).expect("trace"))
            .expect("json")
    };
    let before = cluster.agent.listing().expect("list");
    // A new flow from outside to the NodePort: remote backend, hence masquerade.
    let explained = trace(
        "198.18.0.2:40000",
        &format!("{NODE_IP}:{NODE_PORT}"),
        Some("up0"),
    );
    assert_eq!(explained["service"], "demo/web:main");
    assert_eq!(explained["backend"], "10.244.2.11:8080");
    assert_eq!(explained["translated"][0], format!("{NODE_IP}:40000"));
    assert!(
        explained["steps"].to_string().contains("masqueraded"),
        "{explained}"
    );
    // Not a service.
    let other = trace("198.18.0.2:40000", &format!("{NODE_IP}:22"), None);
    assert!(
        other["steps"].to_string().contains("passes untouched"),
        "{other}"
    );
    // Tracing changed nothing: the rr cursor and the counters are where they were.
    let after = cluster.agent.listing().expect("list");
    assert_eq!(
        before.services[0].stats.connections,
        after.services[0].stats.connections
    );
    // A real flow is then found in conntrack, with the backend it really got.
    let mut connection =
        HttpConnection::open(&cluster.topology.client, (NODE_IP, NODE_PORT).into())
            .expect("connect");
    connection.get().expect("request");
    let flows = ebpf_proxy::testbed::command::run(
        &binary,
        &["conntrack", "list", "--json", "--pin-dir", &pin_dir],
    )
    .expect("list");
    let flows: Vec<serde_json::Value> = serde_json::from_str(&flows).expect("json");
    let client = flows[0]["client"].as_str().expect("client").to_owned();
    let tracked = trace(&client, &format!("{NODE_IP}:{NODE_PORT}"), Some("up0"));
    assert!(
        tracked["steps"][0]
            .as_str()
            .expect("step")
            .starts_with("conntrack: a tracked flow"),
        "{tracked}"
    );
    assert_eq!(tracked["backend"], "10.244.2.11:8080");
}

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

/// `setpriv` arguments that leave root with exactly these capabilities.
fn only_capabilities(caps: &str) -> Vec<String> {
    let set = format!("-all,{caps}");
    [
        "setpriv",
        "--bounding-set",
        &set,
        "--inh-caps",
        "-all",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn the_agent_runs_with_only_bpf_perfmon_and_net_admin_and_says_what_is_missing() {
    let launcher = only_capabilities("+bpf,+perfmon,+net_admin");
    let launcher: Vec<&str> = launcher.iter().map(String::as_str).collect();
    let cluster = Cluster::with_options(
        "caps",
        2,
        0,
        |t| vec![web(t, &["pod-a1"])],
        AgentOptions {
            launcher: &launcher,
            ..Default::default()
        },
    );
    assert!(curl(cluster.ns("pod-a2"), &format!("http://{WEB_VIP}/")).is_ok());
    drop(cluster);

    // Without NET_ADMIN the agent refuses at once, naming what is missing.
    let launcher = only_capabilities("+bpf,+perfmon");
    let prefix = format!("epx{}nocap", std::process::id() % 100_000);
    let topology = Topology::build(&prefix, 1, 0).expect("topology");
    let launcher: Vec<&str> = launcher.iter().map(String::as_str).collect();
    let error = Agent::start_with(
        env!("CARGO_BIN_EXE_ebpf-proxy").as_ref(),
        &topology,
        &PathBuf::from(format!("/tmp/{prefix}")),
        "",
        AgentOptions {
            launcher: &launcher,
            ..Default::default()
        },
    )
    .err()
    .expect("must refuse");
    assert!(
        format!("{error:#}").contains("missing capabilities: CAP_NET_ADMIN"),
        "{error:#}"
    );
}

#[test]
fn a_pod_interface_removed_and_added_again_gets_its_program_back() {
    let cluster = Cluster::new("readd", 2, 0, |t| vec![web(t, &["pod-a1"])]);
    let client = cluster.ns("pod-a2");
    assert!(curl(client, &format!("http://{WEB_VIP}/")).is_ok());
    let attachments = || {
        cluster
            .agent
            .log()
            .matches("tc program attached iface=\"veth1\"")
            .count()
    };
    let before = attachments();
    cluster
        .topology
        .recreate_pod_interface("pod-a1")
        .expect("recreate");
    let reattached = eventually(Duration::from_secs(10), Duration::from_millis(50), || {
        attachments() > before
    });
    assert!(
        reattached,
        "tc not re-attached to veth1:\n{}",
        cluster.agent.log()
    );
    // The backend's replies cross the new interface and are reverse-translated there.
    let body = curl(client, &format!("http://{WEB_VIP}/")).expect("curl after the re-add");
    assert_eq!(pod_of(&body), "pod-a1");
}

#[test]
fn restarts_under_load_lose_no_request_and_no_stream() {
    let Cluster {
        mut agent,
        topology,
        ..
    } = Cluster::new("load", 3, 0, |t| vec![web(t, &["pod-a1", "pod-a2"])]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client_path = topology.pod("pod-a3").ns.path();
    // Short requests, each on a new connection, as fast as they come.
    let short = {
        let (stop, path) = (stop.clone(), client_path.clone());
        std::thread::spawn(move || {
            ebpf_proxy::testbed::netns::enter_current_thread(&path).expect("setns");
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let result = std::net::TcpStream::connect_timeout(
                    &(WEB_VIP, 80).into(),
                    std::time::Duration::from_secs(2),
                )
                .and_then(|mut s| {
                    use std::io::{Read as _, Write as _};
                    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
                    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
                    let mut response = String::new();
                    s.read_to_string(&mut response)?;
                    Ok(response)
                });
                match result {
                    Ok(r) if r.contains("pod=") => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        })
    };
    // Long-lived streams: kept-alive connections used throughout.
    let mut streams: Vec<HttpConnection> = (0..3)
        .map(|_| {
            HttpConnection::open(&topology.pod("pod-a3").ns, (WEB_VIP, 80).into()).expect("stream")
        })
        .collect();
    let mut stream_requests = 0;
    for _round in 0..3 {
        agent.kill();
        for s in &mut streams {
            s.get().expect("stream while the agent is down");
            stream_requests += 1;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        // A restart loads the programs again and swaps them in for the pinned ones.
        agent.spawn().expect("restart");
        for s in &mut streams {
            s.get().expect("stream after the restart");
            stream_requests += 1;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = short.join().expect("load thread");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok > 100, "too little load to mean anything: {ok} requests");
    assert_eq!(stream_requests, 18);
    drop(agent);
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

/// Whether a UDP datagram from `ns` to `target` is refused: the ICMP port
/// unreachable came back about the address this socket is connected to.
fn udp_refused(ns: &Netns, target: std::net::SocketAddr) -> bool {
    let path = ns.path();
    std::thread::spawn(move || {
        ebpf_proxy::testbed::netns::enter_current_thread(&path).expect("enter");
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        socket.connect(target).expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let _ = socket.send(b"anyone?");
        let mut buf = [0u8; 64];
        matches!(socket.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    })
    .join()
    .expect("probe")
}

#[test]
fn port_unreachable_from_a_backend_reaches_clients_as_refused() {
    // The service points at a port where the pods have no listener.
    let closed = |t: &Topology, name: &str, vip: Ipv4Addr, lb: Ipv4Addr, pods: &[&str]| {
        let mut service =
            ServiceDef::new(name, vip, "UDP", 9999, 9).with_pods(pods.iter().map(|p| t.pod(p)));
        service.load_balancer_ip = Some(lb);
        service
    };
    let cluster = Cluster::new("icmp", 2, 1, |t| {
        vec![
            closed(t, "local", Ipv4Addr::new(10, 96, 0, 99), LB_IP, &["pod-a1"]),
            closed(
                t,
                "remote",
                Ipv4Addr::new(10, 96, 0, 98),
                Ipv4Addr::new(198, 18, 100, 2),
                &["pod-b1"],
            ),
        ]
    });
    // From a pod to a local backend, and from outside to a remote (masqueraded) one.
    assert!(udp_refused(
        cluster.ns("pod-a2"),
        (Ipv4Addr::new(10, 96, 0, 99), 9999).into()
    ));
    assert!(udp_refused(&cluster.topology.client, (LB_IP, 9999).into()));
    assert!(udp_refused(
        &cluster.topology.client,
        (Ipv4Addr::new(198, 18, 100, 2), 9999).into()
    ));
}

#[test]
fn netlink_tc_attachment_for_kernels_without_tcx_serves_and_survives_a_restart() {
    let mut cluster = Cluster::with_agent_args(
        "nltc",
        4,
        0,
        |t| vec![web(t, &["pod-a1", "pod-a2", "pod-a3"])],
        &["--tc-attach", "netlink"],
    );
    let filters = |cluster: &Cluster| {
        cluster
            .topology
            .node
            .exec("tc", &["filter", "show", "dev", "veth4", "ingress"])
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("name pod_ingress"))
            .count()
    };
    assert_eq!(filters(&cluster), 1, "one clsact filter, no TCX link");
    let url = format!("http://{WEB_VIP}/");
    assert_eq!(tally(&curl_n(cluster.ns("pod-a4"), &url, 6)).len(), 3);
    cluster.agent.kill();
    cluster.agent.spawn().expect("restart");
    assert_eq!(
        filters(&cluster),
        1,
        "the restarted agent replaced its filter"
    );
    assert_eq!(tally(&curl_n(cluster.ns("pod-a4"), &url, 6)).len(), 3);
}
