//! `ebpf-proxy status`: one screen that says whether service proxying works on this
//! node, as `cilium-dbg status` does for Cilium.
//!
//! It has two halves. What only the running agent knows (its sources and syncs,
//! what it attached where and what failed, its standing problems, its health) is
//! an [`AgentReport`], served as JSON on `/statusz` of the metrics address (local
//! by default, like `/metrics`). What the pinned maps say (how full they are, the
//! tracked flows, which program links are pinned) the command reads itself, so that
//! a stopped or stuck agent still shows what it left in the kernel. The command
//! exits non-zero when it lists a problem, so that scripts and probes can use it.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use proxy_common::{
    map_name, CtTimeouts, TIMEOUT_CLOSING, TIMEOUT_SYN, TIMEOUT_TCP_ESTABLISHED, TIMEOUT_UDP,
};

use crate::{
    adoption::AdoptionReport,
    datapath::{attach, tables::Tables, PROG_SOCK_HOOKS},
};

/// The agent's own account of itself (`/statusz`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentReport {
    pub version: String,
    pub node: String,
    pub node_ips: Vec<IpAddr>,
    /// Unix seconds.
    pub started: u64,
    pub sources: Vec<SourceState>,
    /// Unix seconds of the last sync's end.
    pub last_sync: Option<u64>,
    pub syncs: u64,
    /// How long the oldest change not yet programmed has waited, in seconds.
    pub pending_seconds: Option<u64>,
    pub proxy_healthy: bool,
    pub node_eligible: bool,
    /// What `/readyz` says is missing (empty: ready).
    pub not_ready: Vec<String>,
    pub interfaces: Vec<InterfaceState>,
    /// The cgroup the socket hooks are attached to.
    pub socket_hooks: String,
    pub conntrack_timeouts: Timeouts,
    /// kube-proxy's `masqueradeAll`.
    pub masquerade_all: bool,
    pub settings: Settings,
    /// The standing problems (objects skipped or changed, frontends that did not fit),
    /// the first [`PROBLEMS_SHOWN`] of them.
    pub problems: Vec<String>,
    pub problems_total: usize,
    /// What `--adopt-kube-proxy-flows` did at start, once it is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adoption: Option<AdoptionReport>,
}

/// At most this many problem lines are served: at 100,000 services a broken
/// manifests generator can produce as many, and one screen is the point.
pub const PROBLEMS_SHOWN: usize = 50;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceState {
    pub name: String,
    /// Whether its first full view arrived (before: nothing was programmed from it).
    pub listed: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceState {
    pub name: String,
    pub role: Role,
    /// `None`: attached; else why not (retried).
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    /// XDP (and tc egress): NodePorts, external and load-balancer IPs.
    Uplink,
    /// tc ingress and egress: pods' traffic to services.
    Pod,
}

/// Conntrack idle timeouts, in seconds.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    pub tcp_syn: u64,
    pub tcp_established: u64,
    /// After a FIN or RST.
    pub tcp_closing: u64,
    pub udp: u64,
}

const NS_PER_S: u64 = 1_000_000_000;

impl From<CtTimeouts> for Timeouts {
    fn from(t: CtTimeouts) -> Timeouts {
        Timeouts {
            tcp_syn: t.ns[TIMEOUT_SYN] / NS_PER_S,
            tcp_established: t.ns[TIMEOUT_TCP_ESTABLISHED] / NS_PER_S,
            tcp_closing: t.ns[TIMEOUT_CLOSING] / NS_PER_S,
            udp: t.ns[TIMEOUT_UDP] / NS_PER_S,
        }
    }
}

impl From<Timeouts> for CtTimeouts {
    fn from(t: Timeouts) -> CtTimeouts {
        let mut ns = [0; 4];
        ns[TIMEOUT_SYN] = t.tcp_syn * NS_PER_S;
        ns[TIMEOUT_TCP_ESTABLISHED] = t.tcp_established * NS_PER_S;
        ns[TIMEOUT_CLOSING] = t.tcp_closing * NS_PER_S;
        ns[TIMEOUT_UDP] = t.udp * NS_PER_S;
        CtTimeouts { ns }
    }
}

/// How the agent runs, as the operator asked for it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    pub xdp_mode: String,
    pub xdp_forward: String,
    pub tc_attach: String,
    pub forwarding: String,
    pub scheduler: String,
}

/// Everything `ebpf-proxy status` shows.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// This command's version (the agent's is in `agent`).
    pub version: String,
    pub agent: Option<AgentReport>,
    /// Why the agent's report could not be had.
    pub agent_error: Option<String>,
    pub maps: Vec<MapFill>,
    /// Program links pinned under the pin directory (TCX, XDP, socket hooks).
    pub pinned_links: Vec<String>,
    pub kube_proxy_replacement: Vec<Coverage>,
    /// What needs the operator's attention; empty when all is well.
    pub problems: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MapFill {
    pub map: String,
    pub entries: usize,
    pub capacity: u32,
}

/// A map this full is a problem: the next burst of services or flows may not fit.
const FULL_PERCENT: usize = 90;

/// One thing kube-proxy does, and whether this node does it now.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Coverage {
    pub feature: String,
    pub enabled: bool,
    pub detail: String,
}

/// How long the agent may take to answer.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The agent's report, from its metrics address.
pub async fn fetch_agent_report(address: SocketAddr) -> Result<AgentReport> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(address).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = hyper::Request::get("/statusz")
            .header("host", address.to_string())
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        anyhow::ensure!(response.status().is_success(), "{}", response.status());
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>(serde_json::from_slice(&body)?)
    };
    tokio::time::timeout(AGENT_TIMEOUT, exchange)
        .await
        .context("no answer within 5 s")?
        .with_context(|| format!("asking the agent at {address} (its --metrics-bind-address)"))
}

/// Reads the pinned state and asks the agent.
pub async fn gather(pin_dir: &Path, agent: SocketAddr) -> StatusReport {
    let mut problems = Vec::new();
    let maps = match Tables::open(pin_dir).and_then(|tables| tables.fill()) {
        Ok(fill) => fill
            .into_iter()
            .map(|(map, entries, capacity)| MapFill {
                map: map.to_owned(),
                entries,
                capacity,
            })
            .collect(),
        Err(e) => {
            problems.push(format!("pinned maps: {e:#}"));
            Vec::new()
        }
    };
    // Conntrack is an LRU, meant to run full on a busy node: not a problem.
    for fill in maps.iter().filter(|m| m.map != map_name::CONNTRACK) {
        if fill.entries * 100 >= fill.capacity as usize * FULL_PERCENT {
            problems.push(format!(
                "map {} is {}% full ({} of {})",
                fill.map,
                fill.entries * 100 / (fill.capacity.max(1) as usize),
                fill.entries,
                fill.capacity
            ));
        }
    }
    let pinned_links = pinned_links(pin_dir);
    let (agent, agent_error) = match fetch_agent_report(agent).await {
        Ok(report) => {
            problems.extend(agent_problems(&report));
            (Some(report), None)
        }
        Err(e) => {
            let error = format!("{e:#}");
            problems.push(match pinned_links.is_empty() {
                true => format!("agent: {error}"),
                false => format!(
                    "agent: {error}; its programs stay attached and serve with the maps as they are"
                ),
            });
            (None, Some(error))
        }
    };
    StatusReport {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        kube_proxy_replacement: coverage(
            &agent
                .as_ref()
                .map_or_else(|| Served::of_pins(&pinned_links), Served::of_agent),
            agent.is_some(),
            agent.as_ref().map(|a| a.node_ips.as_slice()),
        ),
        agent,
        agent_error,
        maps,
        pinned_links,
        problems,
    }
}

fn pinned_links(pin_dir: &Path) -> Vec<String> {
    let mut links: Vec<String> = std::fs::read_dir(attach::links_dir(pin_dir))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    links.sort();
    links
}

/// Pending changes waiting this long are worth a look (kube-proxy's `/healthz`
/// fails at 60 s).
const PENDING_WORTH_SAYING: u64 = 10;

fn agent_problems(report: &AgentReport) -> Vec<String> {
    // `not_ready` already names unlisted sources and interfaces not attached.
    let mut problems = Vec::new();
    if let Some(waited) = report
        .pending_seconds
        .filter(|s| *s >= PENDING_WORTH_SAYING)
    {
        problems.push(format!("changes have waited {waited} s to be programmed"));
    }
    if !report.proxy_healthy {
        problems.push("unhealthy: /livez and /healthz answer 503".into());
    }
    if !report.node_eligible {
        problems
            .push("the node is being deleted or tainted for deletion: /healthz answers 503".into());
    }
    problems.extend(report.not_ready.iter().map(|m| format!("not ready: {m}")));
    problems.extend(report.problems.iter().cloned());
    if report.problems_total > report.problems.len() {
        problems.push(format!(
            "... and {} more problems (the agent's log, ebpf_proxy_sync_problems)",
            report.problems_total - report.problems.len()
        ));
    }
    problems
}

/// Where the programs serve: from the agent's account, else from the links it
/// pinned (a stopped agent's programs keep serving; netlink tc filters cannot be
/// pinned and so do not show then).
struct Served {
    uplinks: Vec<String>,
    pods: Vec<String>,
    socket_hooks: Option<String>,
}

impl Served {
    fn of_agent(agent: &AgentReport) -> Served {
        let attached = |role| {
            agent
                .interfaces
                .iter()
                .filter(|i| i.role == role && i.error.is_none())
                .map(|i| i.name.clone())
                .collect()
        };
        Served {
            uplinks: attached(Role::Uplink),
            pods: attached(Role::Pod),
            // Serving nothing when the agent could not name its namespace to them
            // (its report then says why, in `SOCKET_HOOKS_OFF`'s words).
            socket_hooks: (!agent.socket_hooks.starts_with("off:"))
                .then(|| format!("socket hooks at {}", agent.socket_hooks)),
        }
    }

    fn of_pins(links: &[String]) -> Served {
        let named = |kind: &str| {
            links
                .iter()
                .filter_map(|l| l.strip_prefix(kind)?.strip_prefix('-'))
                .map(str::to_owned)
                .collect()
        };
        let hooks: Vec<String> = named("cgroup");
        Served {
            uplinks: named("xdp"),
            pods: named("tc"),
            socket_hooks: (!hooks.is_empty()).then(|| "socket hooks (pinned)".to_owned()),
        }
    }
}

/// What kube-proxy does, and what does it here (Cilium's KubeProxyReplacement list).
fn coverage(served: &Served, agent_running: bool, node_ips: Option<&[IpAddr]>) -> Vec<Coverage> {
    let on_uplinks = |what: &str| Coverage {
        feature: what.to_owned(),
        enabled: !served.uplinks.is_empty(),
        detail: match served.uplinks.is_empty() {
            true => "no uplink attached".to_owned(),
            false => format!("XDP on {}", served.uplinks.join(", ")),
        },
    };
    vec![
        Coverage {
            feature: "ClusterIP from pods".into(),
            enabled: !served.pods.is_empty(),
            detail: format!("tc on {} pod interfaces", served.pods.len()),
        },
        Coverage {
            feature: "ClusterIP from the node".into(),
            enabled: served.socket_hooks.is_some(),
            detail: served
                .socket_hooks
                .clone()
                .unwrap_or_else(|| "no socket hooks".into()),
        },
        on_uplinks("NodePort"),
        on_uplinks("LoadBalancer"),
        on_uplinks("externalIPs"),
        Coverage {
            feature: "healthCheckNodePort".into(),
            enabled: agent_running,
            detail: match agent_running {
                true => "served by the agent".into(),
                false => "the agent serves them: down".into(),
            },
        },
        dual_stack(node_ips),
    ]
}

/// Both families are served wherever the programs are; what a node without an IPv6
/// address lacks is its IPv6 NodePorts and masquerading.
fn dual_stack(node_ips: Option<&[IpAddr]>) -> Coverage {
    let (enabled, detail) = match node_ips {
        None => (
            false,
            "the agent knows the node's addresses: down".to_owned(),
        ),
        Some(ips) if ips.iter().any(IpAddr::is_ipv6) && ips.iter().any(IpAddr::is_ipv4) => {
            (true, "both families".to_owned())
        }
        Some(ips) => (
            false,
            match ips.iter().any(IpAddr::is_ipv6) {
                true => "IPv6 only: no --node-ip of IPv4".to_owned(),
                false => {
                    "no --node-ip of IPv6: IPv6 ClusterIPs only, no IPv6 NodePorts or masquerade"
                        .to_owned()
                }
            },
        ),
    };
    Coverage {
        feature: "IPv6 and dual-stack".into(),
        enabled,
        detail,
    }
}

/// The text form (`wide`: every problem and pinned link, the settings).
pub fn render(report: &StatusReport, wide: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let ago = |t: u64| format_age(now.saturating_sub(t));
    let _ = writeln!(out, "Version:        ebpf-proxy {}", report.version);
    match (&report.agent, &report.agent_error) {
        (Some(a), _) => {
            let _ = writeln!(
                out,
                "Agent:          running {} on node {} ({})",
                ago(a.started),
                a.node,
                join(&a.node_ips)
            );
            for source in &a.sources {
                let state = if source.listed { "synced" } else { "listing" };
                let _ = writeln!(out, "Source:         {} ({state})", source.name);
            }
            let last = a
                .last_sync
                .map_or("none yet".to_owned(), |t| ago(t) + " ago");
            let pending = a.pending_seconds.map_or("nothing pending".to_owned(), |s| {
                format!("changes pending {s} s")
            });
            let _ = writeln!(out, "Last sync:      {last} ({} syncs, {pending})", a.syncs);
            let _ = writeln!(
                out,
                "Health:         /livez {}, /healthz {}, /readyz {}",
                ok(a.proxy_healthy),
                ok(a.proxy_healthy && a.node_eligible),
                ok(a.not_ready.is_empty())
            );
            let _ = writeln!(out, "Attached:");
            for i in &a.interfaces {
                let hooks = match (i.role, &a.settings) {
                    (Role::Uplink, s) => format!(
                        "XDP {} (forward: {}), tc egress ({})",
                        s.xdp_mode, s.xdp_forward, s.tc_attach
                    ),
                    (Role::Pod, s) => format!("tc ingress and egress ({})", s.tc_attach),
                };
                let state = match &i.error {
                    None => hooks,
                    Some(e) => format!("NOT ATTACHED: {e}"),
                };
                let role = format!("{:?}", i.role).to_lowercase();
                let _ = writeln!(out, "  {:<14}{role:<8}{state}", i.name);
            }
            let hooks = match a.socket_hooks.strip_prefix("off: ") {
                Some(why) => format!("NOT SERVING: {why}"),
                None => format!("{} at {}", PROG_SOCK_HOOKS.join(" "), a.socket_hooks),
            };
            let _ = writeln!(out, "  {:<14}{:<8}{hooks}", "sockets", "cgroup");
            if let Some(adoption) = &a.adoption {
                let _ = writeln!(out, "Adopted:        {}", adoption_line(adoption));
            }
            if wide {
                let s = &a.settings;
                let _ = writeln!(
                    out,
                    "Defaults:       scheduler {}, forwarding {}, masquerade all {}",
                    s.scheduler,
                    s.forwarding,
                    if a.masquerade_all { "yes" } else { "no" }
                );
            }
        }
        (None, error) => {
            let _ = writeln!(
                out,
                "Agent:          NOT ANSWERING: {}",
                error.as_deref().unwrap_or("")
            );
        }
    }
    let _ = writeln!(out, "KubeProxyReplacement:");
    for c in &report.kube_proxy_replacement {
        let mark = if c.enabled { "yes" } else { "no " };
        let _ = writeln!(out, "  {mark} {:<24}{}", c.feature, c.detail);
    }
    let _ = writeln!(out, "Maps:");
    for m in &report.maps {
        let percent = m.entries * 100 / (m.capacity.max(1) as usize);
        let _ = writeln!(
            out,
            "  {:<14}{:>9} / {:<9}{percent:>3}%",
            m.map, m.entries, m.capacity
        );
    }
    if let Some(ct) = report.maps.iter().find(|m| m.map == map_name::CONNTRACK) {
        let _ = writeln!(
            out,
            "Conntrack:      {} entries (two per flow; `ebpf-proxy conntrack list`)",
            ct.entries
        );
    }
    if let Some(agent) = &report.agent {
        let t = agent.conntrack_timeouts;
        let _ = writeln!(
            out,
            "Idle timeouts:  tcp {}, tcpfin {}, udp {}, syn {}",
            format_age(t.tcp_established),
            format_age(t.tcp_closing),
            format_age(t.udp),
            format_age(t.tcp_syn)
        );
    }
    if wide {
        let _ = writeln!(out, "Pinned links:   {}", report.pinned_links.join(" "));
    }
    match report.problems.len() {
        0 => {
            let _ = writeln!(out, "Problems:       none");
        }
        n => {
            let _ = writeln!(out, "Problems:       {n}");
            let shown = if wide { n } else { n.min(10) };
            for p in &report.problems[..shown] {
                let _ = writeln!(out, "  - {p}");
            }
            if shown < n {
                let _ = writeln!(out, "  ... {} more (-o wide)", n - shown);
            }
        }
    }
    out
}

fn ok(good: bool) -> &'static str {
    if good {
        "ok"
    } else {
        "FAILING"
    }
}

fn join(addresses: &[IpAddr]) -> String {
    addresses
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `42s`, `3m12s`, `5h03m`, `2d04h`.
fn format_age(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// What `--adopt-kube-proxy-flows` did, in one line.
fn adoption_line(adoption: &AdoptionReport) -> String {
    if let Some(error) = &adoption.read_error {
        return format!("NOTHING: reading kube-proxy's flows failed: {error}");
    }
    let left: Vec<String> = adoption
        .not_adopted
        .iter()
        .map(|(reason, n)| format!("{n} {reason}"))
        .collect();
    let left = match left.is_empty() {
        true => "none".to_owned(),
        false => left.join(", "),
    };
    let mut line = format!(
        "{} kube-proxy flows at start; left to netfilter: {left}",
        adoption.adopted
    );
    if adoption.not_deleted > 0 {
        line += &format!(
            "; {} nf_conntrack entries NOT deleted (their flows may break)",
            adoption.not_deleted
        );
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_kubectl_prints_them() {
        assert_eq!(format_age(42), "42s");
        assert_eq!(format_age(192), "3m12s");
        assert_eq!(format_age(5 * 3600 + 180), "5h03m");
        assert_eq!(format_age(2 * 86_400 + 4 * 3600), "2d04h");
    }

    #[test]
    fn an_agent_report_names_what_is_wrong() {
        let report = AgentReport {
            pending_seconds: Some(12),
            proxy_healthy: true,
            node_eligible: false,
            not_ready: vec!["eth0: attaching XDP: busy".into()],
            problems: vec!["Service a/b: bad port".into()],
            problems_total: 3,
            ..Default::default()
        };
        let problems = agent_problems(&report);
        assert_eq!(
            problems,
            [
                "changes have waited 12 s to be programmed",
                "the node is being deleted or tainted for deletion: /healthz answers 503",
                "not ready: eth0: attaching XDP: busy",
                "Service a/b: bad port",
                "... and 2 more problems (the agent's log, ebpf_proxy_sync_problems)",
            ]
        );
        let healthy = AgentReport {
            proxy_healthy: true,
            node_eligible: true,
            ..Default::default()
        };
        assert!(agent_problems(&healthy).is_empty());
    }
}
