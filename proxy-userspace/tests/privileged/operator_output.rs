//! `list` and `conntrack list` in every output format (issue 15), as kubectl and
//! cilium-dbg offer them: `-o text|wide|json|yaml`; an empty table says so.

use std::process::Command;

use testbed::servers::HttpConnection;

use crate::support::{cluster::*, services::*};

/// (stdout, stderr) of `ebpf-proxy ARGS --pin-dir …`.
fn run(cluster: &Cluster, args: &[&str]) -> (String, String) {
    let out = Command::new(cluster.agent.binary())
        .args(args)
        .arg("--pin-dir")
        .arg(&cluster.agent.pin_dir)
        .output()
        .expect("ebpf-proxy");
    assert!(out.status.success(), "{args:?}: {out:?}");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn list_and_conntrack_list_speak_every_format_and_say_when_empty() {
    let cluster = Cluster::new("outfmt", 2, 0, |t| vec![web(t, &["pod-a1"])]);

    // No flow yet: text says so (on stderr, so a line count stays 0); json and yaml
    // give an empty list.
    let (stdout, stderr) = run(&cluster, &["conntrack", "list"]);
    assert_eq!((stdout.as_str(), stderr.trim()), ("", "no tracked flows"));
    for format in ["json", "yaml"] {
        let (stdout, _) = run(&cluster, &["conntrack", "list", "-o", format]);
        assert_eq!(stdout.trim(), "[]", "{format}");
    }

    let client = cluster.ns("pod-a2");
    let mut connection = HttpConnection::open(client, (WEB_VIP, 80).into()).expect("connect");
    connection.get().expect("request");
    let (text, _) = run(&cluster, &["conntrack", "list"]);
    assert!(text.contains("-> 10.244.1.11:8080 ESTABLISHED"), "{text}");
    let (wide, _) = run(&cluster, &["conntrack", "list", "-o", "wide"]);
    assert!(wide.trim_end().ends_with("(dnat)"), "{wide}");
    let (json, _) = run(&cluster, &["conntrack", "list", "-o", "json"]);
    let flows: Vec<serde_json::Value> = serde_json::from_str(&json).expect("json");
    let (yaml, _) = run(&cluster, &["conntrack", "list", "-o", "yaml"]);
    let from_yaml: Vec<serde_json::Value> = serde_yaml::from_str(&yaml).expect("yaml");
    assert_eq!(flows.len(), 1, "{json}");
    assert_eq!(from_yaml, flows, "the same records in both");
    assert_eq!(flows[0]["backend"], "10.244.1.11:8080");

    let (json, _) = run(&cluster, &["list", "-o", "json"]);
    let listing: serde_json::Value = serde_json::from_str(&json).expect("json");
    let (yaml, _) = run(&cluster, &["list", "-o", "yaml"]);
    let from_yaml: serde_json::Value = serde_yaml::from_str(&yaml).expect("yaml");
    assert_eq!(from_yaml, listing);
    assert_eq!(listing["services"][0]["service"], "demo/web:main");
    let (legacy, _) = run(&cluster, &["list", "--json"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&legacy).expect("json")["services"],
        listing["services"]
    );
    let (text, _) = run(&cluster, &["list"]);
    let (wide, _) = run(&cluster, &["list", "-o", "wide"]);
    assert!(text.contains("TCP 10.96.0.10:80 rr"), "{text}");
    assert!(!text.contains("[cluster]"), "{text}");
    assert!(wide.contains("TCP 10.96.0.10:80 rr [cluster]"), "{wide}");
    assert!(
        wide.contains("no_backend=0"),
        "every event, zero ones too: {wide}"
    );
}
