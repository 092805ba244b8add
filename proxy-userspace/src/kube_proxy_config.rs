//! kube-proxy's configuration file (`--config`): a
//! `kubeproxy.config.k8s.io/v1alpha1 KubeProxyConfiguration` in YAML or JSON, read as
//! kube-proxy reads it, so that an operator moving from kube-proxy keeps their file.
//!
//! Every field kube-proxy knows has a [`Handling`] here: used (mapped to what
//! ebpf-proxy does), of no effect (it configures something ebpf-proxy does not have,
//! such as iptables' fwmark bit), or unsupported (it asks for a behaviour ebpf-proxy
//! does not offer yet). Fields set to something other than their zero value that are
//! not used are reported at start, one line each, with the reason. A field kube-proxy
//! does not know is an error, as in kube-proxy (strict decoding): a typo must not
//! pass for a setting. Command-line flags override the file, as in kube-proxy.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;

use crate::{
    model::{parse_scheduler, Scheduler, SourceRange},
    node_ports::NodePortAddresses,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not YAML or JSON: {source}")]
    Syntax {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// What ebpf-proxy does with a field of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handling {
    Used,
    /// Configures something ebpf-proxy does not have; the reason.
    NoEffect(&'static str),
    /// Asks for what ebpf-proxy does not do; the reason.
    Unsupported(&'static str),
}

use Handling::{NoEffect, Unsupported, Used};

const NO_FWMARK: Handling = NoEffect("no iptables or nftables rules, so no fwmark bit");
const NO_RESYNC: Handling = NoEffect("watches are not re-listed on a timer");
const NF_CONNTRACK: Handling = NoEffect(
    "sizes the kernel's nf_conntrack table, which service traffic does not use here \
     (the data path's own table is --conntrack-entries)",
);
const WINDOWS: Handling = NoEffect("Windows only");

/// Every field of `KubeProxyConfiguration` (Kubernetes 1.36), by JSON path; a path
/// ending in `.` covers every key under it.
pub const FIELDS: &[(&str, Handling)] = &[
    ("apiVersion", Used),
    ("kind", Used),
    ("featureGates.", NoEffect("kube-proxy's feature gates")),
    ("clientConnection.kubeconfig", Used),
    ("clientConnection.acceptContentTypes", Used),
    ("clientConnection.contentType", Used),
    ("clientConnection.qps", NoEffect("the agent only lists, watches and creates Events: no request bursts to limit")),
    ("clientConnection.burst", NoEffect("the agent only lists, watches and creates Events: no request bursts to limit")),
    ("logging.", NoEffect("logs go to stderr; RUST_LOG sets their level")),
    ("hostnameOverride", Used),
    ("bindAddress", Used),
    ("healthzBindAddress", Used),
    ("metricsBindAddress", Used),
    ("bindAddressHardFail", Used),
    ("enableProfiling", Unsupported("no profiling endpoint (Go's pprof)")),
    ("showHiddenMetricsForVersion", NoEffect("no hidden metrics")),
    ("mode", Used),
    ("iptables.masqueradeBit", NO_FWMARK),
    ("iptables.masqueradeAll", Used),
    ("iptables.localhostNodePorts", Unsupported("NodePorts are not served on 127.0.0.1 (as in kube-proxy's ipvs and nftables modes)")),
    ("iptables.snatNodeInternalIP", NoEffect("the masquerade source is always the node's primary address")),
    ("iptables.syncPeriod", Used),
    ("iptables.minSyncPeriod", Used),
    ("ipvs.syncPeriod", Used),
    ("ipvs.minSyncPeriod", Used),
    ("ipvs.scheduler", Used),
    ("ipvs.excludeCIDRs", NoEffect("no IPVS virtual servers to clean up")),
    ("ipvs.strictARP", NoEffect("service addresses are never assigned to an interface (no kube-ipvs0), so nothing answers ARP for them")),
    ("ipvs.tcpTimeout", Used),
    ("ipvs.tcpFinTimeout", Used),
    ("ipvs.udpTimeout", Used),
    ("nftables.masqueradeBit", NO_FWMARK),
    ("nftables.masqueradeAll", Used),
    ("nftables.syncPeriod", Used),
    ("nftables.minSyncPeriod", Used),
    ("winkernel.", WINDOWS),
    ("detectLocalMode", Used),
    ("detectLocal.bridgeInterface", Used),
    ("detectLocal.interfaceNamePrefix", Used),
    ("clusterCIDR", Used),
    ("nodePortAddresses", Used),
    ("oomScoreAdj", Used),
    ("conntrack.maxPerCore", NF_CONNTRACK),
    ("conntrack.min", NF_CONNTRACK),
    ("conntrack.tcpEstablishedTimeout", Used),
    ("conntrack.tcpCloseWaitTimeout", NoEffect("a flow whose FIN or RST was seen follows the FIN timeout (ipvs.tcpFinTimeout, --tcp-fin-timeout); a half-closed flow that still carries traffic lives on")),
    ("conntrack.tcpBeLiberal", NoEffect("the data path's conntrack does not check TCP windows")),
    ("conntrack.udpTimeout", Used),
    ("conntrack.udpStreamTimeout", Used),
    ("configSyncPeriod", NO_RESYNC),
    ("portRange", NoEffect("unused by kube-proxy too")),
    ("windowsRunAsService", WINDOWS),
];

fn handling(path: &str) -> Option<Handling> {
    FIELDS
        .iter()
        .find(|(field, _)| *field == path || (field.ends_with('.') && path.starts_with(field)))
        .map(|(_, handling)| *handling)
}

/// kube-proxy's proxy modes; each reads its own section's sync periods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Iptables,
    Ipvs,
    Nftables,
}

/// What the file asks of ebpf-proxy (`None`: not said; flags or defaults decide).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KubeProxyConfig {
    pub node_name: Option<String>,
    /// `bindAddress`: the node's primary address.
    pub primary_address: Option<IpAddr>,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    /// kube-proxy's default: a listener that cannot bind is logged, not fatal.
    pub bind_address_hard_fail: bool,
    pub min_sync_period: Option<Duration>,
    /// kube-proxy's health timeout is twice this.
    pub sync_period: Option<Duration>,
    pub scheduler: Option<Scheduler>,
    pub kubeconfig: Option<PathBuf>,
    /// From `detectLocalMode: InterfaceNamePrefix` or `BridgeInterface`.
    pub pod_interfaces: Option<String>,
    pub oom_score_adj: Option<i32>,
    /// The cluster's IPv4 pod CIDRs (`clusterCIDR`), in
    /// `detectLocalMode` ClusterCIDR (the default): a detector of in-cluster sources
    /// on uplinks, beside the pod interfaces.
    pub cluster_cidrs: Vec<SourceRange>,
    /// `masqueradeAll` of the mode's section (ipvs mode: the iptables section's, as
    /// kube-proxy reads it).
    pub masquerade_all: bool,
    /// Where NodePorts answer: the list, else kube-proxy's default for the mode
    /// (`all` in iptables and ipvs mode, `primary` in nftables mode).
    pub node_port_addresses: Option<NodePortAddresses>,
    /// Conntrack idle timeouts: established TCP, TCP after a FIN or RST, UDP. In
    /// ipvs mode the IPVS section's (IPVS's own connection table is what balances
    /// there), else and where it says 0 the conntrack section's.
    pub tcp_timeout: Option<Duration>,
    pub tcp_fin_timeout: Option<Duration>,
    pub udp_timeout: Option<Duration>,
    /// Fields set to ask for what ebpf-proxy does not do, with why: warned at start.
    pub unsupported: Vec<String>,
    /// Fields set that configure what ebpf-proxy does not have, with why: said at start.
    pub no_effect: Vec<String>,
}

impl KubeProxyConfig {
    pub fn load(path: &Path) -> Result<KubeProxyConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        KubeProxyConfig::parse(&text).map_err(|e| match e {
            Problem::Syntax(source) => ConfigError::Syntax {
                path: path.to_owned(),
                source,
            },
            Problem::Invalid(message) => ConfigError::Invalid {
                path: path.to_owned(),
                message,
            },
        })
    }

    fn parse(text: &str) -> Result<KubeProxyConfig, Problem> {
        // YAML 1.2 holds JSON, so one parser reads both, as kube-proxy does.
        let document: Value = serde_yaml::from_str(text).map_err(Problem::Syntax)?;
        let Value::Object(_) = &document else {
            return Err(invalid("not a KubeProxyConfiguration object"));
        };
        let field = |path: &str| path.split('.').try_fold(&document, |v, key| v.get(key));
        if field("apiVersion").and_then(Value::as_str) != Some("kubeproxy.config.k8s.io/v1alpha1")
            || field("kind").and_then(Value::as_str) != Some("KubeProxyConfiguration")
        {
            return Err(invalid(
                "apiVersion kubeproxy.config.k8s.io/v1alpha1, kind KubeProxyConfiguration expected",
            ));
        }
        let mode = match field("mode").and_then(Value::as_str) {
            None | Some("") | Some("iptables") => Mode::Iptables,
            Some("ipvs") => Mode::Ipvs,
            Some("nftables") => Mode::Nftables,
            Some(other) => {
                return Err(invalid(format!(
                    "mode {other:?}: ebpf-proxy replaces iptables, ipvs or nftables"
                )))
            }
        };
        let section = match mode {
            Mode::Iptables => "iptables",
            Mode::Ipvs => "ipvs",
            Mode::Nftables => "nftables",
        };
        // Another mode's section is ignored, as kube-proxy ignores it; its ipvs mode
        // takes the masquerading fields from the iptables section.
        let other_mode = |path: &str| {
            let shared = mode == Mode::Ipvs && path.starts_with("iptables.masquerade");
            ["iptables.", "ipvs.", "nftables."]
                .iter()
                .any(|s| path.starts_with(s) && !path.starts_with(&format!("{section}.")))
                && !shared
        };
        let (mut unsupported, mut no_effect, mut unknown) = (Vec::new(), Vec::new(), Vec::new());
        for (path, value) in leaves(&document, String::new()) {
            match handling(&path) {
                // A section written as null is an absent one, as in kube-proxy.
                _ if value.is_null() => {}
                None => unknown.push(path),
                Some(_) if is_zero(value) || other_mode(&path) => {}
                Some(Used) => {}
                Some(NoEffect(why)) => no_effect.push(format!("{path}: {why}")),
                Some(Unsupported(why)) => unsupported.push(format!("{path}: {why}")),
            }
        }
        if !unknown.is_empty() {
            return Err(invalid(format!(
                "fields kube-proxy does not know: {} (a typo? kube-proxy refuses them too)",
                unknown.join(", ")
            )));
        }
        let text_of = |path: &str| -> Result<Option<&str>, Problem> {
            match field(path) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(other) => Err(invalid(format!("{path}: a string expected, not {other}"))),
            }
        };
        let duration_of = |path: &str| -> Result<Option<Duration>, Problem> {
            text_of(path)?
                .map(|text| {
                    humantime::parse_duration(text)
                        .map_err(|e| invalid(format!("{path}: {text:?}: {e}")))
                })
                .transpose()
        };
        for content_type in [
            "clientConnection.contentType",
            "clientConnection.acceptContentTypes",
        ] {
            if text_of(content_type)?.is_some_and(|t| !t.contains("json")) {
                no_effect.push(format!(
                    "{content_type}: the agent speaks JSON to the API server"
                ));
            }
        }
        let scheduler = match (mode, text_of("ipvs.scheduler")?) {
            (Mode::Ipvs, Some(name)) => {
                Some(parse_scheduler(name).map_err(|e| invalid(format!("ipvs.scheduler: {e}")))?)
            }
            _ => None,
        };
        let cidr_mode = matches!(text_of("detectLocalMode")?, None | Some("ClusterCIDR"));
        let mut cluster_cidrs = Vec::new();
        let texts = text_of("clusterCIDR")?
            .into_iter()
            .flat_map(|t| t.split(','));
        for text in texts {
            let range: SourceRange = text
                .parse()
                .map_err(|e| invalid(format!("clusterCIDR: {e}")))?;
            match cidr_mode {
                true => cluster_cidrs.push(range),
                false => no_effect.push(format!(
                    "clusterCIDR {range}: detectLocalMode is not ClusterCIDR, as kube-proxy ignores it"
                )),
            }
        }
        let pod_interfaces = match text_of("detectLocalMode")? {
            None | Some("ClusterCIDR") => None,
            Some("NodeCIDR") => {
                no_effect.push(
                    "detectLocalMode: NodeCIDR: pod traffic is what arrives on pod interfaces; \
                     the node's pod CIDR adds nothing to that"
                        .into(),
                );
                None
            }
            Some("InterfaceNamePrefix") => {
                text_of("detectLocal.interfaceNamePrefix")?.map(|prefix| format!("{prefix}*"))
            }
            Some("BridgeInterface") => text_of("detectLocal.bridgeInterface")?.map(str::to_owned),
            Some(other) => return Err(invalid(format!("detectLocalMode {other:?} is not a mode"))),
        };
        // In ipvs mode the IPVS section's (IPVS's connection table is what balances
        // there; the conntrack section sizes nf_conntrack's), else the conntrack
        // section's. 0 keeps the system's value: ebpf-proxy's defaults.
        let timeout = |path: &str| -> Result<Option<Duration>, Problem> {
            let applies = (mode == Mode::Ipvs) == path.starts_with("ipvs.");
            Ok(duration_of(path)?.filter(|d| applies && !d.is_zero()))
        };
        if mode == Mode::Ipvs {
            for path in [
                "conntrack.tcpEstablishedTimeout",
                "conntrack.udpTimeout",
                "conntrack.udpStreamTimeout",
            ] {
                if duration_of(path)?.is_some_and(|d| !d.is_zero()) {
                    no_effect.push(format!(
                        "{path}: in ipvs mode the ipvs section's timeouts apply, as they do to IPVS"
                    ));
                }
            }
        }
        let tcp_timeout =
            timeout("ipvs.tcpTimeout")?.or(timeout("conntrack.tcpEstablishedTimeout")?);
        let tcp_fin_timeout = timeout("ipvs.tcpFinTimeout")?;
        let udp_timeout = timeout("ipvs.udpTimeout")?
            .or(timeout("conntrack.udpStreamTimeout")?)
            .or(timeout("conntrack.udpTimeout")?);
        let listed: Vec<String> = match field("nodePortAddresses") {
            None | Some(Value::Null) => Vec::new(),
            Some(value) => serde_json::from_value(value.clone())
                .map_err(|_| invalid("nodePortAddresses: a list of CIDRs and keywords expected"))?,
        };
        let node_port_addresses = match (listed.is_empty(), mode) {
            (false, _) => NodePortAddresses::parse(&listed).map_err(invalid)?,
            (true, Mode::Nftables) => NodePortAddresses::parse(&["primary"]).map_err(invalid)?,
            (true, _) => NodePortAddresses::parse(&["all"]).map_err(invalid)?,
        };
        let masquerade_section = if mode == Mode::Nftables {
            "nftables"
        } else {
            "iptables"
        };
        Ok(KubeProxyConfig {
            cluster_cidrs,
            masquerade_all: field(&format!("{masquerade_section}.masqueradeAll"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            node_port_addresses: Some(node_port_addresses),
            tcp_timeout,
            tcp_fin_timeout,
            udp_timeout,
            node_name: text_of("hostnameOverride")?.map(str::to_owned),
            primary_address: text_of("bindAddress")?
                .map(|a| {
                    a.parse::<IpAddr>()
                        .map_err(|_| invalid(format!("bindAddress {a:?}")))
                })
                .transpose()?
                .filter(|a| !a.is_unspecified()),
            healthz_bind_address: bind_address(text_of("healthzBindAddress")?, 10256)?,
            metrics_bind_address: bind_address(text_of("metricsBindAddress")?, 10249)?,
            bind_address_hard_fail: field("bindAddressHardFail")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            min_sync_period: duration_of(&format!("{section}.minSyncPeriod"))?,
            sync_period: duration_of(&format!("{section}.syncPeriod"))?,
            scheduler,
            kubeconfig: text_of("clientConnection.kubeconfig")?.map(PathBuf::from),
            pod_interfaces,
            oom_score_adj: field("oomScoreAdj")
                .and_then(Value::as_i64)
                .map(|v| {
                    i32::try_from(v)
                        .ok()
                        .filter(|v| (-1000..=1000).contains(v))
                        .ok_or_else(|| invalid(format!("oomScoreAdj {v}: -1000 to 1000")))
                })
                .transpose()?,
            unsupported,
            no_effect,
        })
    }
}

enum Problem {
    Syntax(serde_yaml::Error),
    Invalid(String),
}

fn invalid(message: impl Into<String>) -> Problem {
    Problem::Invalid(message.into())
}

/// `IP:port`, `[IPv6]:port`, or an address alone (kube-proxy's older form: the
/// default port).
fn bind_address(text: Option<&str>, default_port: u16) -> Result<Option<SocketAddr>, Problem> {
    let Some(text) = text else { return Ok(None) };
    if let Ok(socket) = text.parse::<SocketAddr>() {
        return Ok(Some(socket));
    }
    text.parse::<IpAddr>()
        .map(|ip| Some(SocketAddr::new(ip, default_port)))
        .map_err(|_| invalid(format!("{text:?} is not an address:port")))
}

/// Every leaf of the document with its dotted path (lists are leaves).
fn leaves(value: &Value, prefix: String) -> Vec<(String, &Value)> {
    match value {
        Value::Object(map) => map
            .iter()
            .flat_map(|(key, v)| {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                leaves(v, path)
            })
            .collect(),
        _ => vec![(prefix, value)],
    }
}

/// The zero value of a field: not a setting worth a note.
fn is_zero(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty() || s == "0s" || s == "0",
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}
