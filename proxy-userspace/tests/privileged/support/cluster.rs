//! A topology with the real agent on its node, fed from a manifests file or from a
//! fake API server, and the client-side helpers the end-to-end tests share.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use testbed::{
    agent::{Agent, AgentOptions},
    apiserver::FakeApiServer,
    manifests::{render, ServiceDef},
    netns::Netns,
    servers::parse_greeting,
    topology::Topology,
};

/// A topology with the agent running on its node; both go away when dropped.
pub struct Cluster {
    pub agent: Agent,
    /// The API server the agent watches, when it watches one (dropped before the
    /// topology whose namespace it listens in).
    pub api: Option<FakeApiServer>,
    pub topology: Topology,
}

impl Cluster {
    pub fn new(
        test: &str,
        local_pods: usize,
        remote_pods: usize,
        services: impl Fn(&Topology) -> Vec<ServiceDef>,
    ) -> Cluster {
        Cluster::with_agent_args(test, local_pods, remote_pods, services, &[])
    }

    pub fn with_agent_args(
        test: &str,
        local_pods: usize,
        remote_pods: usize,
        services: impl Fn(&Topology) -> Vec<ServiceDef>,
        agent_args: &[&str],
    ) -> Cluster {
        Cluster::with_options(
            test,
            local_pods,
            remote_pods,
            services,
            AgentOptions {
                extra_args: agent_args,
                ..Default::default()
            },
        )
    }

    pub fn with_options(
        test: &str,
        local_pods: usize,
        remote_pods: usize,
        services: impl Fn(&Topology) -> Vec<ServiceDef>,
        options: AgentOptions<'_>,
    ) -> Cluster {
        let prefix = format!("epx{}{test}", std::process::id() % 100_000);
        let topology = Topology::build(&prefix, local_pods, remote_pods).expect("topology");
        let work_dir = PathBuf::from(format!("/tmp/{prefix}"));
        let manifests = render(&services(&topology));
        let agent = Agent::start_with(
            env!("CARGO_BIN_EXE_ebpf-proxy").as_ref(),
            &topology,
            &work_dir,
            &manifests,
            options,
        )
        .expect("agent");
        Cluster {
            agent,
            api: None,
            topology,
        }
    }

    pub fn ns(&self, pod: &str) -> &Netns {
        &self.topology.pod(pod).ns
    }

    /// Starts another agent on this cluster's pin directory (it should be refused):
    /// whether it exited successfully, and what it said.
    pub fn second_agent(&self) -> (bool, String) {
        let binary = self.agent.binary().to_str().expect("path").to_owned();
        let output = self
            .topology
            .node
            .command("timeout")
            .args(["20", &binary, "run", "--manifests"])
            .arg(&self.agent.manifests)
            .args(["--node-name", "n", "--node-ip", "198.18.0.1"])
            .args(["--metrics-bind-address", "127.0.0.1:0"])
            .args(["--healthz-bind-address", "127.0.0.1:0"])
            .arg("--pin-dir")
            .arg(&self.agent.pin_dir)
            .output()
            .expect("run");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

impl Cluster {
    /// The agent's `/metrics`, read inside the node (served on its loopback).
    pub fn metrics(&self) -> String {
        curl(&self.topology.node, "http://127.0.0.1:10249/metrics").expect("metrics")
    }
}

/// `curl` from `ns`; the body (`pod=… client=…`), or the error.
pub fn curl(ns: &Netns, url: &str) -> Result<String, String> {
    ns.exec("curl", &["-sS", "--max-time", "5", url])
        .map_err(|e| e.to_string())
}

/// `n` requests with curl, each on its own connection; their bodies.
pub fn curl_n(ns: &Netns, url: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| curl(ns, url).unwrap_or_else(|e| panic!("request {i} to {url}: {e}")))
        .collect()
}

pub fn greeting_of(body: &str) -> (String, std::net::SocketAddr) {
    parse_greeting(body).unwrap_or_else(|| panic!("not a greeting: {body:?}"))
}

pub fn pod_of(body: &str) -> String {
    greeting_of(body).0
}

/// The client address a greeting names, of either family.
pub fn client_ip_of(body: &str) -> std::net::IpAddr {
    greeting_of(body).1.ip()
}

pub fn client_of(body: &str) -> Ipv4Addr {
    match greeting_of(body).1 {
        std::net::SocketAddr::V4(v4) => *v4.ip(),
        other => panic!("not an IPv4 client: {other}"),
    }
}

pub fn tally(bodies: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for body in bodies {
        *counts.entry(pod_of(body)).or_default() += 1;
    }
    counts
}

impl Cluster {
    /// The agent watching a fake API server (in the node's namespace) that holds
    /// `services`.
    pub fn with_api_server(
        test: &str,
        local_pods: usize,
        remote_pods: usize,
        services: impl Fn(&Topology) -> Vec<ServiceDef>,
        agent_args: &[&str],
    ) -> Cluster {
        Cluster::with_api_server_prepared(
            test,
            local_pods,
            remote_pods,
            services,
            AgentOptions {
                extra_args: agent_args,
                ..Default::default()
            },
            |_| {},
        )
    }

    /// `with_api_server`, with more options for the agent (its kubeconfig is the
    /// server's) and `prepare` run on the server before the agent starts.
    pub fn with_api_server_prepared(
        test: &str,
        local_pods: usize,
        remote_pods: usize,
        services: impl Fn(&Topology) -> Vec<ServiceDef>,
        options: AgentOptions<'_>,
        prepare: impl FnOnce(&FakeApiServer),
    ) -> Cluster {
        let prefix = format!("epx{}{test}", std::process::id() % 100_000);
        let topology = Topology::build(&prefix, local_pods, remote_pods).expect("topology");
        let api = FakeApiServer::start(&topology.node.path()).expect("API server");
        api.apply_manifests(&render(&services(&topology)))
            .expect("objects");
        prepare(&api);
        let kubeconfig = api.kubeconfig();
        let agent = Agent::start_with(
            env!("CARGO_BIN_EXE_ebpf-proxy").as_ref(),
            &topology,
            &PathBuf::from(format!("/tmp/{prefix}")),
            "",
            AgentOptions {
                kubeconfig: Some(&kubeconfig),
                ..options
            },
        )
        .expect("agent");
        Cluster {
            agent,
            api: Some(api),
            topology,
        }
    }

    pub fn api(&self) -> &FakeApiServer {
        self.api.as_ref().expect("this cluster has an API server")
    }
}

/// The body of a health endpoint: `Ok` for 200, `Err` for any other answer or none.
pub fn probe(cluster: &Cluster, path: &str) -> Result<String, String> {
    let url = format!("http://127.0.0.1:10256{path}");
    let out = cluster
        .topology
        .node
        .exec(
            "curl",
            &["-sS", "--max-time", "5", "-w", "\n%{http_code}", &url],
        )
        .map_err(|e| e.to_string())?;
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", &out));
    if code == "200" {
        Ok(body.to_owned())
    } else {
        Err(format!("{code}: {body}"))
    }
}
