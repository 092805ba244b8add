//! End to end, the services themselves: the real agent in a node namespace, real
//! servers in pod namespaces, real clients (curl, socat): ClusterIP over TCP and UDP,
//! NodePort and LoadBalancer IP, masquerade, hairpin, backend changes, TFTP, node
//! processes through the socket hooks, and XDP redirect mode.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use socket2::{Domain, Socket, Type};
use testbed::Ipv4Octets as _;

use testbed::{
    manifests::{render, ServiceDef},
    servers::HttpConnection,
    topology::{CLIENT_IP, NODE_IP},
};

use crate::support::{cluster::*, services::*, traffic::inside};

const TIMEOUT: Duration = Duration::from_secs(5);

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

/// One client port to two services that share their backend: without a remap the
/// backend would see both flows as one tuple. Netfilter (kube-proxy) remaps the second
/// flow's client port; so does the data path, rather than take the first flow's reply
/// entry over (which handed its replies to the second flow: the manifests fault suite
/// once lost one request in 65,000 to it). TCP: both connections open and answer.
/// UDP: one socket asking both services alternately hears each answer from the
/// service it asked.
#[test]
fn one_client_port_to_two_services_with_one_backend_keeps_the_flows_apart() {
    const OTHER_WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
    const OTHER_DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 54);
    const CLIENT_PORT: u16 = 40_000;
    let cluster = Cluster::new("clash", 2, 0, |t| {
        let backend = [t.pod("pod-a1")];
        vec![
            web(t, &["pod-a1"]),
            ServiceDef::new("web2", OTHER_WEB_VIP, "TCP", 80, 8080).with_pods(backend),
            dns(t, &["pod-a1"]),
            ServiceDef::new("dns2", OTHER_DNS_VIP, "UDP", 53, 5353).with_pods(backend),
        ]
    });
    let client = cluster.ns("pod-a2");
    let client_addr = cluster.topology.pod("pod-a2").addr;
    let local = SocketAddr::from((client_addr, CLIENT_PORT));

    let tcp_ports = inside(client, move || {
        let open = |vip: Ipv4Addr| -> anyhow::Result<HttpConnection> {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&local.into())?;
            socket.connect_timeout(&SocketAddr::from((vip, 80)).into(), TIMEOUT)?;
            HttpConnection::over(socket.into())
        };
        let mut first = open(WEB_VIP).expect("first");
        let mut second = open(OTHER_WEB_VIP).expect("second");
        let port_seen = |connection: &mut HttpConnection| {
            connection.get().map(|body| greeting_of(&body).1.port())
        };
        let ports = [
            port_seen(&mut first),
            port_seen(&mut second),
            port_seen(&mut first),
        ];
        (ports, (first, second))
    });
    let (tcp_ports, _open) = tcp_ports;
    // `conntrack list` names the port the backend sees for the remapped flow.
    let pin_dir = cluster.agent.pin_dir.to_str().expect("pin dir");
    let binary = cluster.agent.binary().to_str().expect("binary");
    let flows = testbed::command::run(binary, &["conntrack", "list", "--pin-dir", pin_dir])
        .expect("conntrack list");
    let remapped = flows
        .lines()
        .find(|line| line.contains(&format!("{OTHER_WEB_VIP}:80")))
        .unwrap_or_else(|| panic!("no flow to {OTHER_WEB_VIP} in:\n{flows}"));
    assert!(
        remapped.contains(&format!(" via {client_addr}:")),
        "{flows}"
    );
    let [first, second, first_again] = tcp_ports.map(|port| port.expect("TCP answer"));
    assert_eq!((first, first_again), (CLIENT_PORT, CLIENT_PORT));
    assert_ne!(second, CLIENT_PORT, "the second flow was not remapped");

    let udp_answers = inside(client, move || {
        let socket = UdpSocket::bind(local).expect("bind");
        socket.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        [DNS_VIP, OTHER_DNS_VIP, DNS_VIP, OTHER_DNS_VIP].map(|vip| {
            socket.send_to(b"ask", (vip, 53)).expect("send");
            let mut answer = [0u8; 512];
            let (len, from) = socket.recv_from(&mut answer).expect("answer");
            (
                vip,
                from,
                greeting_of(&String::from_utf8_lossy(&answer[..len]))
                    .1
                    .port(),
            )
        })
    });
    for (asked, from, _) in udp_answers {
        assert_eq!(from, SocketAddr::from((asked, 53)), "{udp_answers:?}");
    }
    let seen_ports: Vec<u16> = udp_answers.iter().map(|(_, _, port)| *port).collect();
    assert_eq!(seen_ports[0], CLIENT_PORT, "{udp_answers:?}");
    assert_ne!(seen_ports[1], CLIENT_PORT, "{udp_answers:?}");
    assert_eq!(
        (seen_ports[2], seen_ports[3]),
        (seen_ports[0], seen_ports[1])
    );
    assert!(
        cluster
            .metrics()
            .contains("ebpf_proxy_datapath_events_total{reason=\"reply_port_remapped\"} 2"),
        "{}",
        cluster.metrics()
    );
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
    assert_eq!(content.len(), testbed::servers::TFTP_FILE_LEN);
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
    // The hooks named the agent's namespace themselves (on every kernel, 5.10 too).
    let log = cluster.agent.log();
    assert!(
        log.contains("socket hooks serve this network namespace"),
        "{log}"
    );
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
    let listing = cluster.agent.listing().expect("list");
    let redirected = listing.event("xdp_redirect");
    assert!(
        redirected > 0,
        "no frame left by XDP_REDIRECT: {:?}",
        listing.events
    );
}

/// A LoadBalancer service with `externalTrafficPolicy: Local` whose one endpoint is
/// on node2.
fn remote_only_local_policy(topology: &testbed::topology::Topology) -> ServiceDef {
    let mut web = web(topology, &["pod-b1"]);
    web.node_port = Some(NODE_PORT);
    web.load_balancer_ip = Some(LB_IP);
    web.with_spec("externalTrafficPolicy: Local")
}

/// kube-proxy short-circuits in-cluster traffic to a service's external addresses:
/// a pod, or the node itself, reaching the LoadBalancer IP or a NodePort of an
/// `externalTrafficPolicy: Local` service is served by every endpoint, while
/// outside clients get only this node's (none here: dropped).
#[test]
fn in_cluster_clients_of_a_local_policy_service_use_every_endpoint() {
    let cluster = Cluster::new("shortcut", 1, 1, |t| vec![remote_only_local_policy(t)]);
    let lb = format!("http://{LB_IP}/");
    let node_port = format!("http://{NODE_IP}:{NODE_PORT}/");
    assert!(
        curl(&cluster.topology.client, &lb).is_err(),
        "outside: no local endpoint"
    );
    for (what, url) in [("the LoadBalancer IP", &lb), ("the NodePort", &node_port)] {
        let body = curl(cluster.ns("pod-a1"), url).unwrap_or_else(|e| panic!("pod to {what}: {e}"));
        assert_eq!(pod_of(&body), "pod-b1", "pod to {what}");
    }
    let body = curl(&cluster.topology.node, &lb).expect("the node's own socket to the LB IP");
    assert_eq!(pod_of(&body), "pod-b1");
    let listing = cluster.agent.listing().expect("listing");
    assert!(
        listing
            .services
            .iter()
            .any(|s| s.frontend.to_string().contains("(in-cluster)")),
        "the view is listed"
    );
}

/// `--cluster-cidr` (kube-proxy's clusterCIDR): a source in it that arrives on an
/// uplink is an in-cluster client too (a pod whose own node did not translate its
/// traffic), so it gets every endpoint; one outside it gets this node's (none).
#[test]
fn a_cluster_cidr_source_on_an_uplink_is_an_in_cluster_client() {
    let cluster = Cluster::with_agent_args(
        "clcidr",
        1,
        1,
        |t| vec![remote_only_local_policy(t)],
        &["--cluster-cidr", &format!("{CLIENT_IP}/32")],
    );
    let lb = format!("http://{LB_IP}/");
    let body = curl(&cluster.topology.client, &lb).expect("in the cluster CIDR");
    // Masqueraded: the reply from the other node must come back through this one.
    assert_eq!(
        (pod_of(&body), client_of(&body)),
        ("pod-b1".to_owned(), NODE_IP)
    );
    assert!(
        curl(&cluster.topology.node2, &lb).is_err(),
        "node2's address is not in it: this node's endpoints only, none"
    );
}
