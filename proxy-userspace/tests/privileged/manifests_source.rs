//! The manifests source, end to end: a corrupted, deleted, emptied, cut or slowly
//! written file keeps the last good state (under traffic, no request fails); a full
//! service table is reported and what fits keeps working.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use testbed::{
    manifests::{render, ServiceDef},
    servers::HttpConnection,
    topology::Topology,
};

use crate::support::{cluster::*, services::*, traffic::StopOnDrop};

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

fn numbered_services(t: &Topology, numbers: std::ops::RangeInclusive<u8>) -> Vec<ServiceDef> {
    numbers
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
}

#[test]
fn a_full_service_table_is_reported_and_what_did_not_fit_is_programmed_once_room_appears() {
    let cluster = Cluster::with_agent_args(
        "full",
        2,
        0,
        |t| numbered_services(t, 1..=3),
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
    let now = cluster.metrics();
    assert!(
        now.contains("ebpf_proxy_map_capacity{map=\"SERVICES\"} 2"),
        "{now}"
    );
    assert!(now.contains("ebpf_proxy_sync_problems 1"), "{now}");
    // svc1 goes: the third is programmed without being mentioned again, and the
    // problem is gone.
    cluster
        .agent
        .update_manifests(&render(&numbered_services(&cluster.topology, 2..=3)), |l| {
            l.services
                .iter()
                .any(|s| s.service.starts_with("demo/svc3"))
        })
        .expect("svc3 programmed once svc1 made room");
    assert!(curl(client, "http://10.96.1.3/").is_ok());
    let now = cluster.metrics();
    assert!(now.contains("ebpf_proxy_sync_problems 0"), "{now}");
}

/// Issue 14: an empty file, or a document of a kind the agent reads under another
/// apiVersion or spelling, must not remove what it no longer lists; a bad update of an
/// EndpointSlice must not empty its service.
#[test]
fn an_empty_file_a_misversioned_document_or_a_bad_slice_removes_nothing() {
    let services = |t: &Topology| vec![web(t, &["pod-a1"]), dns(t, &["pod-a1"])];
    let cluster = Cluster::new("trunc", 2, 0, services);
    let client = cluster.ns("pod-a2");
    let good = render(&services(&cluster.topology));
    let still_serving = |what: &str| {
        assert!(
            curl(client, &format!("http://{WEB_VIP}/")).is_ok(),
            "{what}"
        );
        assert!(
            udp_ask(client, &format!("{DNS_VIP}:53")).starts_with("pod=pod-a1"),
            "{what}"
        );
        assert_eq!(
            cluster.agent.listing().expect("list").services.len(),
            2,
            "{what}"
        );
    };

    std::fs::write(&cluster.agent.manifests, "").expect("truncate");
    wait_until(
        || cluster.agent.log().contains("the file is empty"),
        "the agent read the empty file",
    );
    still_serving("after truncation to 0 bytes");

    // The dns Service as `v1beta1`: a problem, not an absence.
    let misversioned = good.replacen(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: dns",
        "apiVersion: v1beta1\nkind: Service\nmetadata:\n  name: dns",
        1,
    );
    assert_ne!(misversioned, good, "the dns Service document was found");
    std::fs::write(&cluster.agent.manifests, misversioned).expect("write");
    wait_until(
        || cluster.agent.log().contains("is not read"),
        "the agent read the misversioned document",
    );
    still_serving("after a misversioned document");

    // The dns EndpointSlice with port 0: its last readable version stays in use.
    let bad_slice = good.replacen("port: 5353", "port: 0", 1);
    assert_ne!(bad_slice, good, "the dns slice port was found");
    std::fs::write(&cluster.agent.manifests, bad_slice).expect("write");
    wait_until(
        || cluster.agent.log().contains("last readable version"),
        "the agent read the bad slice",
    );
    still_serving("after a bad EndpointSlice");
}

#[test]
fn a_manifests_path_that_is_missing_or_not_a_regular_file_is_refused_at_start() {
    let cluster = Cluster::new("mpath", 1, 0, |t| vec![web(t, &["pod-a1"])]);
    let fifo = cluster.agent.manifests.with_file_name("fifo");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(status.success());
    for path in [fifo.clone(), fifo.with_file_name("no-such-file.yaml")] {
        let output = cluster
            .topology
            .node
            .command(cluster.agent.binary().to_str().expect("path"))
            .args(["run", "--manifests"])
            .arg(&path)
            .args(["--node-name", "n", "--node-ip", "198.18.0.1"])
            .args(["--pin-dir", "/sys/fs/bpf/epx-never-created"])
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{}: {stderr}", path.display());
        assert!(
            stderr.contains("manifests file"),
            "{}: {stderr}",
            path.display()
        );
    }
    assert!(!std::path::Path::new("/sys/fs/bpf/epx-never-created").exists());
}

/// Issue 14's fault suite: under continuous traffic (a new connection each request, to
/// every service in turn), the manifests file is emptied, cut short in the middle of
/// a line (a writer that stopped), rewritten in place in 8 KB pieces (a writer that is
/// slow), and given a document of a wrong apiVersion. No request fails, and every
/// service is still programmed after each.
#[test]
fn a_file_emptied_cut_short_written_slowly_or_misversioned_under_traffic_loses_no_request() {
    const SERVICES: u8 = 60;
    let services = |t: &Topology| numbered_services(t, 1..=SERVICES);
    let cluster = Cluster::new("mfault", 2, 0, services);
    let good = render(&services(&cluster.topology));
    let path = cluster.agent.manifests.clone();
    let settle = || std::thread::sleep(Duration::from_millis(1_500));
    let restore = || {
        let temporary = path.with_extension("new");
        std::fs::write(&temporary, &good).expect("write");
        std::fs::rename(&temporary, &path).expect("rename");
        settle();
    };
    let all_programmed =
        || cluster.agent.listing().expect("list").services.len() == usize::from(SERVICES);
    let stop = AtomicBool::new(false);
    let (sent, failures) = std::thread::scope(|scope| {
        // Stops the traffic also when an assertion below fails (else the scope would
        // wait for it for ever).
        let stopping = StopOnDrop(&stop);
        let traffic = scope.spawn(|| {
            let client = cluster.ns("pod-a2");
            let (mut sent, mut failures) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let vip = Ipv4Addr::new(10, 96, 1, 1 + (sent % u32::from(SERVICES)) as u8);
                sent += 1;
                let answer =
                    HttpConnection::open(client, (vip, 80).into()).and_then(|mut c| c.get());
                if let Err(e) = answer {
                    failures.push(format!("{vip}: {e:#}"));
                }
            }
            (sent, failures)
        });
        // Emptied.
        std::fs::write(&path, "").expect("empty");
        settle();
        assert!(all_programmed(), "after emptying");
        restore();
        // Cut short in the middle of a line, in the middle of the file.
        let mut cut = good.len() / 2;
        while good.as_bytes()[cut - 1] == b'\n' {
            cut += 1;
        }
        std::fs::write(&path, &good[..cut]).expect("cut short");
        settle();
        assert!(all_programmed(), "after cutting short");
        restore();
        // Rewritten in place, slowly.
        let mut file = std::fs::File::create(&path).expect("rewrite");
        for piece in good.as_bytes().chunks(8 * 1024) {
            file.write_all(piece).expect("piece");
            std::thread::sleep(Duration::from_millis(30));
        }
        drop(file);
        settle();
        assert!(all_programmed(), "after a slow rewrite");
        // One Service under a wrong apiVersion.
        let misversioned = good.replacen(
            "apiVersion: v1\nkind: Service",
            "apiVersion: v2\nkind: Service",
            1,
        );
        std::fs::write(&path, misversioned).expect("misversioned");
        settle();
        assert!(all_programmed(), "after a misversioned document");
        restore();
        drop(stopping);
        traffic.join().expect("traffic")
    });
    let log = cluster.agent.log();
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:?}\n{log}",
        failures.len()
    );
    assert!(sent > 100, "only {sent} requests");
    for said in [
        "the file is empty",
        "cut short",
        "\"v2\" \"Service\" is not read",
    ] {
        assert!(log.contains(said), "{said:?} not in\n{log}");
    }
}

#[test]
fn a_bad_document_is_counted_once_and_taken_out_of_the_file_takes_its_problem_with_it() {
    let services = |t: &Topology| numbered_services(t, 1..=1);
    // Syncs at most every 3 s: two versions of the file can wait for the same one.
    let cluster =
        Cluster::with_agent_args("gone", 2, 0, services, &["--min-sync-period-ms", "3000"]);
    let good = render(&services(&cluster.topology));
    let problems = |count: usize| {
        cluster
            .metrics()
            .contains(&format!("ebpf_proxy_sync_problems {count}\n"))
    };
    let bad = format!("{good}---\napiVersion: v1\nkind: Service\n  metadata: [broken\n");
    std::fs::write(&cluster.agent.manifests, &bad).expect("write");
    wait_until(|| problems(1), "the bad document reported");
    // Two more versions, both with the bad document, read before the next sync: the
    // later one's problems stand (they were added up: 2).
    std::fs::write(&cluster.agent.manifests, format!("{bad}# a\n")).expect("write");
    std::thread::sleep(Duration::from_millis(600));
    std::fs::write(&cluster.agent.manifests, format!("{bad}# b\n")).expect("write");
    std::thread::sleep(Duration::from_secs(4));
    assert!(problems(1), "the bad document counted once");
    // Taken out, the file changes no object: its version is still said, and the
    // problem goes (it stood in the metric until some other change).
    std::fs::write(&cluster.agent.manifests, &good).expect("write");
    wait_until(|| problems(0), "the problem gone with its document");
    assert!(curl(cluster.ns("pod-a2"), "http://10.96.1.1/").is_ok());
}
