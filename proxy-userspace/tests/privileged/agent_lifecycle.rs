//! The agent's life on a node, end to end: kill -9 and restart under load, cleanup,
//! exactly three capabilities, pod interfaces that come and go, netlink tc attachment;
//! and clear refusals on a machine that is not ready (pin directory outside bpffs,
//! pinned maps of another layout).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use testbed::{
    agent::{Agent, AgentOptions},
    eventually,
    servers::HttpConnection,
    topology::{in_family, Topology},
};

use ebpf_proxy::{
    datapath::{attach, loader::Datapath, sizing, tables::Tables},
    model::Family,
};
use proxy_common::map_name;

use crate::support::{cluster::*, datapath::TestDatapath, services::*};

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

/// Short requests on new connections and long-lived streams, in both families at once
/// through a dual-stack service, while the agent is killed and restarted three times.
#[test]
fn restarts_under_load_lose_no_request_and_no_stream_in_either_family() {
    let Cluster {
        mut agent,
        topology,
        ..
    } = Cluster::new("load", 3, 0, |t| {
        vec![web(t, &["pod-a1", "pod-a2"]).dual_stack()]
    });
    let stop = Arc::new(AtomicBool::new(false));
    let client = &topology.pod("pod-a3").ns;
    let loads: Vec<_> = Family::ALL
        .map(|family| {
            let service = SocketAddr::new(in_family(WEB_VIP, family), 80);
            (
                family,
                short_requests_until(client.path(), service, stop.clone()),
            )
        })
        .into();
    // Long-lived streams: kept-alive connections of each family used throughout.
    let mut streams: Vec<HttpConnection> = Family::ALL
        .iter()
        .flat_map(|&family| [family; 2])
        .map(|family| {
            HttpConnection::open(client, (in_family(WEB_VIP, family), 80).into()).expect("stream")
        })
        .collect();
    let mut stream_requests = 0;
    for _round in 0..3 {
        agent.kill();
        for s in &mut streams {
            s.get().expect("stream while the agent is down");
            stream_requests += 1;
        }
        std::thread::sleep(Duration::from_millis(300));
        // A restart loads the programs again and swaps them in for the pinned ones.
        agent.spawn().expect("restart");
        for s in &mut streams {
            s.get().expect("stream after the restart");
            stream_requests += 1;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    for (family, load) in loads {
        let (ok, failed) = load.join().expect("load thread");
        assert!(
            failed.is_empty(),
            "{family}: {} of {} requests failed: {:?}",
            failed.len(),
            ok as usize + failed.len(),
            &failed[..failed.len().min(3)]
        );
        assert!(
            ok > 50,
            "{family}: too little load to mean anything: {ok} requests"
        );
    }
    assert_eq!(stream_requests, 24);
    drop(agent);
}

/// Requests, each on a new connection, as fast as they come from the namespace at
/// `ns_path` to `service` until `stop`: the count that succeeded and the failures.
fn short_requests_until(
    ns_path: PathBuf,
    service: SocketAddr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u32, Vec<String>)> {
    std::thread::spawn(move || {
        testbed::netns::enter_current_thread(&ns_path).expect("setns");
        let (mut ok, mut failed) = (0u32, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            let result =
                TcpStream::connect_timeout(&service, Duration::from_secs(2)).and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
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

#[test]
fn a_pin_directory_outside_bpffs_is_refused_clearly() {
    let dir = std::env::temp_dir().join(format!("epx-not-bpffs-{}", std::process::id()));
    let error = Datapath::load(&dir).err().expect("must refuse");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        format!("{error:#}").contains("is not on a bpf filesystem"),
        "{error:#}"
    );
}

/// Issue 17, memory sized to the node: without `--conntrack-entries` the table is
/// sized to the node's memory; a restart without the flag keeps the size the pinned
/// table has (a size set by an earlier flag), instead of refusing it as another size.
#[test]
fn conntrack_is_sized_to_the_node_and_a_restart_keeps_the_pinned_size() {
    let capacity = |agent: &Agent| {
        Tables::open(&agent.pin_dir)
            .expect("tables")
            .capacity(map_name::CONNTRACK)
            .expect("capacity")
    };
    let Cluster {
        mut agent,
        topology: _topology,
        ..
    } = Cluster::new("ctsz", 1, 0, |t| vec![web(t, &["pod-a1"])]);
    let memory = sizing::node_memory().expect("MemTotal");
    assert_eq!(capacity(&agent), sizing::for_memory(memory));
    assert!(agent.log().contains("conntrack sized to the node's memory"));

    agent.kill();
    attach::cleanup(&agent.pin_dir).expect("cleanup");
    agent
        .restart_with_args(&["--conntrack-entries", "131072"])
        .expect("an explicit size");
    assert_eq!(capacity(&agent), 131_072);
    agent
        .restart_with_args(&[])
        .expect("no flag: the pinned size");
    assert_eq!(capacity(&agent), 131_072);
    assert!(agent
        .log()
        .contains("conntrack keeps the pinned table's size"));
}

#[test]
fn pinned_maps_of_another_layout_are_refused_clearly() {
    let dp = TestDatapath::new();
    let pin_dir = dp.pin_dir.clone();
    drop(dp); // unpins everything
    std::fs::create_dir_all(&pin_dir).expect("pin dir");
    // A CONNTRACK left by a version whose entries were 8 bytes.
    let conntrack = pin_dir.join("CONNTRACK");
    let created = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&conntrack)
        .args([
            "type",
            "lru_hash",
            "key",
            "40",
            "value",
            "8",
            "entries",
            "1024",
            "name",
            "CONNTRACK",
        ])
        .status()
        .expect("bpftool");
    assert!(created.success());
    let error = Datapath::load(&pin_dir).err().expect("must refuse");
    let _ = attach::cleanup(&pin_dir);
    let message = format!("{error:#}");
    assert!(
        message.contains("CONNTRACK: pinned key/value/entries 40/8/1024"),
        "{message}"
    );
    assert!(message.contains("ebpf-proxy cleanup"), "{message}");
}

/// Issue 14: a second agent on the same pin directory is refused at once, and the
/// first keeps serving with its maps untouched.
#[test]
fn a_second_agent_on_the_same_pin_directory_is_refused() {
    let cluster = Cluster::new("lock", 1, 0, |t| vec![web(t, &["pod-a1"])]);
    let (succeeded, stderr) = cluster.second_agent();
    assert!(!succeeded, "{stderr}");
    assert!(stderr.contains("another agent"), "{stderr}");
    assert!(curl(cluster.ns("pod-a1"), &format!("http://{WEB_VIP}/")).is_ok());
    assert_eq!(cluster.agent.listing().expect("list").services.len(), 1);
}
