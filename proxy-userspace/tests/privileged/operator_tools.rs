//! What operators use, end to end: UDP flows flushed when a backend leaves,
//! `conntrack list` and `flush`, metrics and health like kube-proxy's, `trace`.

use testbed::Ipv4Octets as _;
use testbed::{manifests::render, servers::HttpConnection, topology::NODE_IP};

use crate::support::{cluster::*, services::*};

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
        testbed::command::run(&binary, &full).expect("ebpf-proxy conntrack")
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
    let listing = cluster.agent.listing().expect("list");
    assert!(listing.event("ct_midflow_miss") > 0, "{:?}", listing.events);
}

/// Issue 14: a scrape stays bounded whatever the number of services: per-frontend and
/// per-backend series up to `--metrics-max-series`, the rest counted, totals whole.
#[test]
fn metrics_series_are_capped_and_the_totals_still_count_everything() {
    // Room for one frontend's five series and its backend's seven, not for more.
    let cluster = Cluster::with_agent_args(
        "mcap",
        2,
        0,
        |t| vec![web(t, &["pod-a1"]), dns(t, &["pod-a1"])],
        &["--metrics-max-series", "12"],
    );
    let client = cluster.ns("pod-a2");
    for _ in 0..2 {
        curl(client, &format!("http://{WEB_VIP}/")).expect("curl");
    }
    assert!(udp_ask(client, &format!("{DNS_VIP}:53")).starts_with("pod=pod-a1"));
    let metrics = cluster.metrics();
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
    };
    let per_frontend = metrics
        .lines()
        .filter(|l| l.starts_with("ebpf_proxy_service_connections_total{"))
        .count();
    let per_backend = metrics
        .lines()
        .filter(|l| l.starts_with("ebpf_proxy_backend_connections_total{"))
        .count();
    assert_eq!((per_frontend, per_backend), (1, 1), "{metrics}");
    // Frontends in listing order: TCP before UDP, so the web service keeps its series.
    assert_eq!(
        value("ebpf_proxy_service_connections_total{service=\"demo/web:main\",frontend=\"TCP 10.96.0.10:80\"}"),
        2.0
    );
    assert_eq!(
        value("ebpf_proxy_metrics_series_omitted{kind=\"frontend\"}"),
        1.0
    );
    assert_eq!(
        value("ebpf_proxy_metrics_series_omitted{kind=\"backend\"}"),
        1.0
    );
    assert_eq!(
        value("ebpf_proxy_frontends_connections_total"),
        3.0,
        "{metrics}"
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
        serde_json::from_str(&testbed::command::run(&binary, &args).expect("trace")).expect("json")
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
    let flows = testbed::command::run(
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

/// Issue 14: `list` by a user who may not read the maps says so, instead of asking
/// whether an agent runs.
#[test]
fn list_without_the_right_to_read_the_maps_says_permission_denied() {
    let cluster = Cluster::new("eacces", 1, 0, |t| vec![web(t, &["pod-a1"])]);
    let output = cluster
        .topology
        .node
        .command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(cluster.agent.binary())
        .args(["list", "--pin-dir"])
        .arg(&cluster.agent.pin_dir)
        .output()
        .expect("setpriv");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
    assert!(!stderr.contains("is an agent running"), "{stderr}");
}

#[test]
fn a_peer_holding_connections_cannot_starve_the_health_port() {
    use std::{io::Read as _, net::TcpStream, time::Duration};

    use testbed::eventually;

    let cluster = Cluster::new("hflood", 1, 0, |t| vec![web(t, &["pod-a1"])]);
    let client_ns = cluster.topology.client.path();
    let health = std::net::SocketAddr::from((NODE_IP, 10256));
    // One peer opens 40 connections and sends nothing on them.
    let streams: Vec<TcpStream> = std::thread::spawn(move || {
        testbed::netns::enter_current_thread(&client_ns).expect("enter the client");
        (0..40)
            .filter_map(|_| TcpStream::connect_timeout(&health, Duration::from_secs(2)).ok())
            .collect()
    })
    .join()
    .expect("flooding thread");
    assert_eq!(streams.len(), 40, "the kernel accepts them all");
    // How many the agent has closed, seen without waiting (a non-blocking read: end
    // of stream or a reset when closed, "would block" while open), so that looking
    // takes no time off the header timeout.
    for stream in &streams {
        stream.set_nonblocking(true).expect("non-blocking");
    }
    let closed = || {
        streams
            .iter()
            .filter(|stream| {
                let mut reader: &TcpStream = stream;
                match reader.read(&mut [0u8; 1]) {
                    Ok(n) => n == 0,
                    Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                }
            })
            .count()
    };
    // Over its share (16 per address) its connections are closed at once ...
    let over_share = eventually(Duration::from_secs(2), Duration::from_millis(50), || {
        closed() == 40 - 16
    });
    assert!(over_share, "{} closed", closed());
    // ... while other addresses are answered ...
    assert!(
        curl(&cluster.topology.node, "http://127.0.0.1:10256/healthz")
            .expect("healthz from another address")
            .contains("lastUpdated")
    );
    // ... and the idle ones go after the header timeout (5 s).
    let all = eventually(Duration::from_secs(10), Duration::from_millis(100), || {
        closed() == 40
    });
    assert!(all, "{} closed", closed());
}
