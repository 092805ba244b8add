//! The `ebpf-proxy` command line: `run` the agent, `list` what it programmed,
//! `cleanup` what it left attached.

use std::{
    io::IsTerminal as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use ebpf_proxy::{
    agent::{self, AgentConfig},
    conntrack,
    datapath::{
        attach, generation::Generation, loader::MapSizes, mmap::MappedArray, sizing, tables::Tables,
    },
    health,
    kube_proxy_config::KubeProxyConfig,
    listing,
    model::{parse_scheduler, Family, Forwarding, Protocol, Scheduler, SourceRange},
    node::{self, AddressesFrom, NodeConfig},
    node_ports::NodePortAddresses,
    output::{self, Format, OutputArgs},
    source::{kubernetes::KubernetesSource, manifests::ManifestsSource, Source},
    status, trace,
};
use proxy_common::{
    icmp_interval_ns, map_name, Addr, CtTimeouts, LoadSettings, ICMP_RATE_DEFAULT, TIMEOUT_CLOSING,
    TIMEOUT_TCP_ESTABLISHED, TIMEOUT_UDP,
};

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ebpf-proxy";

#[derive(Parser)]
#[command(
    name = "ebpf-proxy",
    version,
    about = "Kubernetes service load balancing in eBPF (XDP and tc)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the data path and keep it in sync with its source (a manifests
    /// file or the API server).
    Run(Box<RunArgs>),
    /// Show programmed services, backends and counters, like `ipvsadm -Ln --stats`.
    List {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// One screen: the agent, its source and syncs, what is attached where, map fill,
    /// conntrack, kube-proxy coverage, problems. Exits 1 when it lists a problem.
    Status {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// The agent's `--metrics-bind-address` (where it serves `/statusz`).
        #[arg(long, default_value = "127.0.0.1:10249")]
        agent: SocketAddr,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Explain what the data path does with a packet (reads the maps, changes nothing).
    Trace {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long, value_enum, default_value = "tcp")]
        proto: ProtoArg,
        /// `address:port` (`address` alone for ICMP).
        #[arg(long, value_parser = parse_endpoint)]
        src: SocketAddr,
        #[arg(long, value_parser = parse_endpoint)]
        dst: SocketAddr,
        /// The packet arrives encapsulated (IPIP, or ip6ip6 for IPv6) to this address
        /// (`dsr-ipip`: an entry node chose a backend here, or tunnelled to this
        /// node's address) ...
        #[arg(long, requires = "outer_src")]
        outer_dst: Option<IpAddr>,
        /// ... from this address (the entry node's tunnel source, of the packet's
        /// family).
        #[arg(long, requires = "outer_dst")]
        outer_src: Option<IpAddr>,
        /// The interface the packet arrives on (an uplink or a pod interface the agent
        /// attached); without it, the packet comes from outside the node.
        #[arg(long)]
        iface: Option<String>,
        #[arg(long)]
        json: bool,
        /// The agent's `--metrics-bind-address` (it says the idle timeouts in force).
        #[arg(long, default_value = "127.0.0.1:10249")]
        agent: SocketAddr,
    },
    /// Tracked flows: list them, or flush some (their next packet is scheduled anew).
    Conntrack {
        #[command(subcommand)]
        action: ConntrackAction,
    },
    /// Detach every program and remove the pinned maps (drops all conntrack state).
    Cleanup {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Makes the node's kernel settings what the data path needs and the agent may
    /// not be able to make itself (a container's /proc/sys is read-only unless
    /// privileged): `net.ipv4.conf.all.accept_local=1`. For a privileged init
    /// container; changes nothing else and may run any number of times.
    PrepareNode,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProtoArg {
    Tcp,
    Udp,
    Sctp,
    /// ICMP: errors translated back with the flow they quote, pings of service
    /// addresses refused; GRE and ESP: never translated, refused at service addresses.
    Icmp,
    Gre,
    Esp,
}

impl ProtoArg {
    /// The transport the data path translates, or the IP protocol number of one it
    /// never translates.
    fn transport(self) -> Result<Protocol, u8> {
        match self {
            ProtoArg::Tcp => Ok(Protocol::Tcp),
            ProtoArg::Udp => Ok(Protocol::Udp),
            ProtoArg::Sctp => Ok(Protocol::Sctp),
            ProtoArg::Icmp => Err(proxy_common::PROTO_ICMP),
            ProtoArg::Gre => Err(47),
            ProtoArg::Esp => Err(50),
        }
    }
}

/// `address:port` (`[address]:port` for IPv6), or an address alone (port 0).
fn parse_endpoint(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>().or_else(|_| {
        text.parse::<IpAddr>()
            .map(|ip| SocketAddr::new(ip, 0))
            .map_err(|_| format!("{text:?} is neither address:port nor an IP address"))
    })
}

#[derive(Subcommand)]
enum ConntrackAction {
    /// One line per flow: client, service address, backend, state, idle time.
    List {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Only flows of services whose name starts with this (`namespace/name`).
        #[arg(long)]
        service: Option<String>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Remove flows: all, those of a service, or those to a backend.
    Flush {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long, conflicts_with = "backend")]
        service: Option<String>,
        /// A backend address, with or without `:port`.
        #[arg(long)]
        backend: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum XdpModeArg {
    /// In the driver (veth, most NICs): fastest.
    Native,
    /// Generic XDP in the kernel stack: works everywhere, slower than tc.
    Skb,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum XdpForwardArg {
    /// XDP_PASS to the kernel stack, which routes: works with any device.
    Pass,
    /// FIB look-up and XDP_TX/XDP_REDIRECT: faster; a veth target delivers only if
    /// its peer runs XDP or has GRO enabled.
    Redirect,
}

#[derive(Clone, Copy, ValueEnum)]
enum TcAttachArg {
    /// TCX on kernels that have it (6.6+), else netlink.
    Auto,
    /// TCX links, pinned (replaced atomically on restart).
    Tcx,
    /// Classic clsact filters (older kernels; re-attached on restart).
    Netlink,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Multi-document YAML with v1 Services, discovery.k8s.io/v1 EndpointSlices and
    /// optionally this node's v1 Node; re-read when it changes.
    #[arg(long, required_unless_present_any = ["kubernetes", "kubeconfig", "config"], conflicts_with_all = ["kubernetes", "kubeconfig"])]
    manifests: Option<PathBuf>,
    /// kube-proxy's configuration file (`KubeProxyConfiguration`, YAML or JSON): its
    /// settings apply where no flag says otherwise; what has no effect or is not
    /// supported is said at start, and a field kube-proxy does not know is refused.
    /// Without --manifests it implies the API server (its kubeconfig, else in-cluster).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Watch the API server with the pod's service account (a DaemonSet).
    #[arg(long)]
    kubernetes: bool,
    /// Watch the API server named in this kubeconfig (implies --kubernetes).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The shortest time between two syncs, in milliseconds (kube-proxy's
    /// --min-sync-period); changes within it are batched. 0 syncs at once. Default:
    /// 1000 with the Kubernetes source, 0 with a manifests file (whose changes are
    /// already batched by the file's polling).
    #[arg(long)]
    min_sync_period_ms: Option<u64>,
    /// This node's name, as EndpointSlices' `nodeName` spells it (or the config's
    /// hostnameOverride).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// An address of this node, IPv4 or IPv6; repeated for a dual-stack node
    /// (NodePorts answer on each; the first of each family is that family's SNAT
    /// source). Without it, the addresses of this node's Node object (its first
    /// InternalIP, else ExternalIP, of each family; the config's bindAddress takes its
    /// family's place), as kube-proxy finds them; with --manifests, the bindAddress.
    #[arg(long = "node-ip")]
    node_ips: Vec<IpAddr>,
    /// Where NodePorts answer (kube-proxy's --nodeport-addresses): comma-separated
    /// CIDRs and the keywords `primary` (the --node-ip addresses) and `all`; the
    /// node's addresses they hold are followed as they change. Default: the config's
    /// nodePortAddresses (or kube-proxy's default for its mode), else the --node-ip
    /// addresses.
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<String>,
    /// An interface facing the outside world (XDP). Repeatable.
    #[arg(long = "uplink")]
    uplinks: Vec<String>,
    /// Glob of host-side pod interfaces (tc ingress). Repeatable. Default: the
    /// config's detectLocal interface, else `veth*` and `cali*`.
    #[arg(long = "pod-interfaces")]
    pod_interfaces: Vec<String>,
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    #[arg(long, value_enum, default_value = "native")]
    xdp_mode: XdpModeArg,
    /// Scheduler of services without the `ebpf-proxy.io/scheduler` annotation:
    /// rr, wrr, lc, wlc, sh, dh, sed, nq, maglev (mh), random. Default: the config's
    /// ipvs.scheduler, else rr.
    #[arg(long, value_parser = parse_scheduler)]
    scheduler: Option<Scheduler>,
    /// Handle only services labelled `service.kubernetes.io/service-proxy-name` with
    /// this value (kube-proxy skips labelled services): runs beside kube-proxy on a
    /// disjoint set of services. Without it: every unlabelled service, as kube-proxy.
    #[arg(long)]
    service_proxy_name: Option<String>,
    /// How external traffic reaches endpoints on other nodes, for services without
    /// the `ebpf-proxy.io/forwarding` annotation: `snat` (translated here, replies
    /// return through this node) or `dsr-ipip` (encapsulated to the endpoint, whose
    /// node answers the client directly).
    #[arg(long, default_value = "snat")]
    forwarding: Forwarding,
    /// `dsr-ipip`: outer source addresses of IPIP packets, a prefix whose addresses
    /// the flows are hashed over (so receivers' RSS spreads them); without it, the
    /// first --node-ip of IPv4. (ip6ip6 leaves from the first --node-ip of IPv6, the
    /// flow's hash in its flow label.)
    #[arg(long, value_parser = parse_ipv4_range)]
    tunnel_source_cidr: Option<SourceRange>,
    /// `dsr-ipip`: the outer sources (comma-separated prefixes of either family: the
    /// nodes' tunnel sources, IPv4 for IPIP and IPv6 for ip6ip6) allowed to tunnel
    /// into this node; tunnels from others are dropped (all of a family the list has
    /// no prefix of). Without it any source may, except into frontends with
    /// loadBalancerSourceRanges, whose tunnelled flows are then refused (an
    /// unverified inner source would bypass the ranges).
    #[arg(long, value_delimiter = ',')]
    ipip_trusted_sources: Option<Vec<SourceRange>>,
    /// Idle timeout of established TCP flows (`6h`, `900s`; ipvsadm's `--set tcp`).
    /// Default: the config's ipvs.tcpTimeout or conntrack.tcpEstablishedTimeout,
    /// else 6 h.
    #[arg(long, value_parser = humantime::parse_duration)]
    tcp_timeout: Option<Duration>,
    /// Idle timeout of TCP flows after a FIN or RST. Default: the config's
    /// ipvs.tcpFinTimeout, else 10 s.
    #[arg(long, value_parser = humantime::parse_duration)]
    tcp_fin_timeout: Option<Duration>,
    /// Idle timeout of UDP flows. Default: the config's ipvs.udpTimeout,
    /// conntrack.udpStreamTimeout or conntrack.udpTimeout, else 60 s.
    #[arg(long, value_parser = humantime::parse_duration)]
    udp_timeout: Option<Duration>,
    /// Masquerade every flow from a pod to a ClusterIP, not only a pod reaching
    /// itself (kube-proxy's --masquerade-all, for CNIs that need it). Default: the
    /// config's iptables/nftables masqueradeAll.
    /// `--masquerade-all=false` overrides a config file's `true`.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    masquerade_all: Option<bool>,
    /// ICMP errors the data path sends itself (port unreachable refusing a new flow,
    /// fragmentation needed before IPIP encapsulation), per second and CPU, after a
    /// burst of 50: beyond it the offending packets are dropped unanswered
    /// (`icmp_rate_limited`). The kernel's own default for its ICMP errors
    /// (`net.ipv4.icmp_msgs_per_sec`). 0: unlimited.
    #[arg(long, default_value_t = ICMP_RATE_DEFAULT)]
    icmp_rate: u32,
    /// The cluster's pod CIDRs of either family (kube-proxy's --cluster-cidr,
    /// comma-separated): a source in them that arrives on an uplink is an in-cluster
    /// client, which gets every endpoint of an `externalTrafficPolicy: Local`
    /// service, as pods here do. Default: the config's clusterCIDR (in
    /// detectLocalMode ClusterCIDR).
    #[arg(long, value_delimiter = ',')]
    cluster_cidr: Vec<SourceRange>,
    /// How often idle conntrack entries are collected, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    ct_gc_interval_ms: u64,
    /// Where `/metrics`, `/proxyMode` and `/statusz` are served. Default: the
    /// config's, else kube-proxy's 127.0.0.1:10249.
    #[arg(long)]
    metrics_bind_address: Option<SocketAddr>,
    /// Per-frontend and per-backend series in one scrape at most (5 per frontend, 7
    /// per backend; frontends in listing order, the rest counted in
    /// `ebpf_proxy_metrics_series_omitted` and in the `frontends_*` totals).
    #[arg(long, default_value_t = 10_000)]
    metrics_max_series: usize,
    /// Where `/healthz`, `/livez` and `/readyz` are served. Default: the config's,
    /// else kube-proxy's 0.0.0.0:10256 (every address, for load balancers' node
    /// health checks).
    #[arg(long)]
    healthz_bind_address: Option<SocketAddr>,
    /// Frontends the maps hold (each ClusterIP, external IP, LB IP and NodePort port
    /// is one).
    #[arg(long, default_value_t = proxy_common::MAX_SERVICES)]
    max_services: u32,
    /// Backends the maps hold, over all frontends.
    #[arg(long, default_value_t = proxy_common::MAX_BACKENDS)]
    max_backends: u32,
    /// Conntrack entries (two per flow; an LRU: the oldest are evicted when full).
    /// Default: the pinned table's size if there is one, else one entry per 48 KiB of
    /// the node's memory, rounded to a power of two, 65,536 to 2,097,152 (524,288 at
    /// 24 GiB).
    #[arg(long)]
    conntrack_entries: Option<u32>,
    /// How the pod-interface program is attached.
    #[arg(long, value_enum, default_value = "auto")]
    tc_attach: TcAttachArg,
    /// Take over the connections kube-proxy's iptables or nftables rules translated
    /// (read from nf_conntrack at start), so that switching a node from kube-proxy
    /// drops none: see README, "Migrating from kube-proxy without a maintenance
    /// window". Harmless where there is nothing to adopt.
    #[arg(long)]
    adopt_kube_proxy_flows: bool,
    /// How the uplink program forwards translated packets.
    #[arg(long, value_enum, default_value = "pass")]
    xdp_forward: XdpForwardArg,
    /// Which data path object to load (default: the one the kernel's helpers allow,
    /// found by probing). `legacy` runs the object for kernels 5.10 to 5.17 on any
    /// kernel, to try its fallbacks.
    #[arg(long, value_enum)]
    datapath: Option<Generation>,
    /// cgroup v2 directory for the socket hooks (default: the hierarchy's root).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// How often to check the manifests file for changes, in milliseconds.
    #[arg(long, default_value_t = 500)]
    poll_ms: u64,
    /// Let an empty manifests file remove every service (without it, an empty file is
    /// reported and the programmed services stay: it is far more often a truncation).
    #[arg(long)]
    allow_empty_manifests: bool,
    /// File to create once the first sync is done and interfaces are attached.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

fn main() -> Result<()> {
    // Before any thread exists: each thread's first allocation may create an arena.
    ebpf_proxy::limits::limit_allocator_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // netlink-packet-route warns about every attribute newer than itself.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("info,netlink_packet_route=error")
                }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match Cli::parse().command {
        Command::Run(args) => {
            let file = match &args.config {
                Some(path) => KubeProxyConfig::load(path)?,
                None => KubeProxyConfig::default(),
            };
            let (config, sources) = run_settings(*args, file).await?;
            agent::run(config, sources).await
        }
        Command::List { pin_dir, output } => {
            let listing = listing::read(&pin_dir)?;
            let format = output.format();
            print!(
                "{}",
                output::document(&listing, format, |wide| listing::render(&listing, wide))?
            );
            if listing.services.is_empty() && matches!(format, Format::Text | Format::Wide) {
                eprintln!("no services programmed");
            }
            Ok(())
        }
        Command::Status {
            pin_dir,
            agent,
            output,
        } => {
            let report = status::gather(&pin_dir, agent).await;
            print!(
                "{}",
                output::document(&report, output.format(), |wide| status::render(
                    &report, wide
                ))?
            );
            if !report.problems.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Trace {
            pin_dir,
            proto,
            src,
            dst,
            outer_dst,
            outer_src,
            iface,
            json,
            agent,
        } => {
            let origin = match iface {
                None => trace::Origin::External,
                Some(iface)
                    if attach::links_dir(&pin_dir)
                        .join(format!("xdp-{iface}"))
                        .exists() =>
                {
                    trace::Origin::External
                }
                Some(iface)
                    if attach::links_dir(&pin_dir)
                        .join(format!("tc-{iface}"))
                        .exists() =>
                {
                    trace::Origin::Pod
                }
                Some(iface) => anyhow::bail!("{iface} is not an interface the agent attached to"),
            };
            let origin = match (outer_src.zip(outer_dst), origin) {
                (Some((outer_src, outer_dst)), trace::Origin::External) => trace::Origin::Tunnel {
                    outer_src,
                    outer_dst,
                },
                (Some(_), _) => anyhow::bail!("--outer-dst: IPIP arrives on uplinks only"),
                (None, origin) => origin,
            };
            let tables = Tables::open(&pin_dir)?;
            // The idle timeouts the programs were loaded with are the agent's to say.
            let settings = match status::fetch_agent_report(agent).await {
                Ok(report) => LoadSettings {
                    ct_timeouts: report.conntrack_timeouts.into(),
                    masquerade_all: u32::from(report.masquerade_all),
                    ..LoadSettings::DEFAULT
                },
                Err(e) => {
                    eprintln!(
                        "{e:#}: explaining with the default settings (timeouts, masquerading)"
                    );
                    LoadSettings::DEFAULT
                }
            };
            let explanation = match proto.transport() {
                Ok(protocol) => trace::explain(&tables, &settings, protocol, src, dst, origin)?,
                Err(number) => trace::explain_untranslated(&tables, number, src.ip(), dst.ip())?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&explanation)?);
            } else {
                for step in &explanation.steps {
                    println!("- {step}");
                }
                if let Some((from, to)) = explanation.translated {
                    println!("=> leaves as {from} -> {to}");
                }
            }
            Ok(())
        }
        Command::Conntrack { action } => conntrack_command(action),
        Command::Cleanup { pin_dir } => attach::cleanup(&pin_dir),
        Command::PrepareNode => node::accept_local_sources("all"),
    }
}

/// The agent's settings: flags first, then kube-proxy's configuration file, then
/// the defaults (kube-proxy's where it has one).
async fn run_settings(
    args: RunArgs,
    file: KubeProxyConfig,
) -> Result<(AgentConfig, Vec<Box<dyn Source>>)> {
    for note in &file.unsupported {
        tracing::warn!("--config: {note}: not supported");
    }
    for note in &file.no_effect {
        tracing::info!("--config: {note}: no effect");
    }
    let node_name = args
        .node_name
        .or(file.node_name)
        .context("--node-name (or NODE_NAME, or the config's hostnameOverride) is required")?;
    let pod_interfaces = match (args.pod_interfaces, file.pod_interfaces) {
        (flags, _) if !flags.is_empty() => flags,
        (_, Some(from_file)) => vec![from_file],
        _ => vec!["veth*".into(), "cali*".into()],
    };
    // --kubernetes means the pod's service account, whatever the file names.
    let kubeconfig = match args.kubernetes {
        true => None,
        false => args.kubeconfig.or(file.kubeconfig),
    };
    let (source, (node_ips, addresses_from), default_sync_period_ms): (Box<dyn Source>, _, u64) =
        match &args.manifests {
            Some(path) => {
                let source = ManifestsSource {
                    path: path.clone(),
                    poll_interval: Duration::from_millis(args.poll_ms),
                    allow_empty: args.allow_empty_manifests,
                };
                source.check()?;
                let node_ips = match (&args.node_ips[..], file.primary_address) {
                    ([], Some(primary)) => vec![primary],
                    ([], None) => anyhow::bail!(
                        "--node-ip (or the config's bindAddress) is required with --manifests"
                    ),
                    (ips, _) => ips.to_vec(),
                };
                (Box::new(source), (node_ips, AddressesFrom::Flags), 0)
            }
            None => {
                let source = KubernetesSource::connect(kubeconfig.as_deref(), &node_name).await?;
                let node_ips = match &args.node_ips[..] {
                    [] => node_ips_from_node_object(&source, file.primary_address).await?,
                    ips => (ips.to_vec(), AddressesFrom::Flags),
                };
                (Box::new(source), node_ips, 1000)
            }
        };
    let sources = vec![source];
    warn_of_untrusted_families(args.ipip_trusted_sources.as_deref(), &node_ips);
    let min_sync_period = args
        .min_sync_period_ms
        .map(Duration::from_millis)
        .or(file.min_sync_period)
        .unwrap_or(Duration::from_millis(default_sync_period_ms));
    let conntrack_entries = match args.conntrack_entries {
        Some(entries) => entries,
        None => node_sized_conntrack(&args.pin_dir)?,
    };
    let config = AgentConfig {
        node: NodeConfig {
            name: node_name,
            addresses: node_ips,
            addresses_from,
            node_ports: match (args.nodeport_addresses, file.node_port_addresses) {
                (flags, _) if !flags.is_empty() => {
                    NodePortAddresses::parse(&flags).map_err(anyhow::Error::msg)?
                }
                (_, Some(from_file)) => from_file,
                _ => NodePortAddresses::NodeIps,
            },
            uplinks: args.uplinks,
            pod_interface_patterns: pod_interfaces,
        },
        pin_dir: args.pin_dir,
        min_sync_period,
        xdp_mode: match args.xdp_mode {
            XdpModeArg::Native => aya::programs::XdpMode::Driver,
            XdpModeArg::Skb => aya::programs::XdpMode::Skb,
        },
        cgroup: args.cgroup.unwrap_or_else(attach::default_cgroup_root),
        ready_file: args.ready_file,
        xdp_redirect: args.xdp_forward == XdpForwardArg::Redirect,
        default_scheduler: args.scheduler.or(file.scheduler).unwrap_or(Scheduler::Rr),
        service_proxy_name: args.service_proxy_name,
        default_forwarding: args.forwarding,
        tunnel_source: args.tunnel_source_cidr,
        tunnel_peers: args.ipip_trusted_sources,
        cluster_cidrs: match args.cluster_cidr {
            flags if !flags.is_empty() => flags,
            _ => file.cluster_cidrs,
        },
        ct_gc_interval: Duration::from_millis(args.ct_gc_interval_ms),
        metrics_address: args
            .metrics_bind_address
            .or(file.metrics_bind_address)
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 10249))),
        metrics_max_series: args.metrics_max_series,
        health_address: args
            .healthz_bind_address
            .or(file.healthz_bind_address)
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 10256))),
        // Without a config file, a port that cannot be bound stops the agent (its
        // probes would fail anyway); with one, the file says, as in kube-proxy.
        bind_hard_fail: args.config.is_none() || file.bind_address_hard_fail,
        health_timeout: file
            .sync_period
            .map_or(health::PENDING_TIMEOUT, |period| period * 2),
        oom_score_adj: file.oom_score_adj,
        tc_attach: match args.tc_attach {
            TcAttachArg::Auto => attach::TcAttach::Auto,
            TcAttachArg::Tcx => attach::TcAttach::Tcx,
            TcAttachArg::Netlink => attach::TcAttach::Netlink,
        },
        adopt_kube_proxy_flows: args.adopt_kube_proxy_flows,
        generation: args.datapath,
        map_sizes: MapSizes {
            services: args.max_services,
            backends: args.max_backends,
            conntrack: conntrack_entries,
        },
        load_settings: LoadSettings {
            ct_timeouts: ct_timeouts([
                (
                    TIMEOUT_TCP_ESTABLISHED,
                    args.tcp_timeout.or(file.tcp_timeout),
                ),
                (
                    TIMEOUT_CLOSING,
                    args.tcp_fin_timeout.or(file.tcp_fin_timeout),
                ),
                (TIMEOUT_UDP, args.udp_timeout.or(file.udp_timeout)),
            ])?,
            masquerade_all: u32::from(args.masquerade_all.unwrap_or(file.masquerade_all)),
            icmp_interval_ns: icmp_interval_ns(args.icmp_rate),
        },
    };
    Ok((config, sources))
}

/// The default idle timeouts with those set (`TIMEOUT_*`, duration).
fn ct_timeouts(set: [(usize, Option<Duration>); 3]) -> Result<CtTimeouts> {
    let mut timeouts = CtTimeouts::DEFAULT;
    for (kind, duration) in set {
        if let Some(duration) = duration {
            // A year at most: beyond, nanoseconds would overflow the data path's sums.
            anyhow::ensure!(
                (Duration::from_secs(1)..=Duration::from_secs(365 * 86_400)).contains(&duration),
                "idle timeout {duration:?} (--tcp-timeout, --tcp-fin-timeout, --udp-timeout or \
                 the config's): whole seconds from 1 s to a year"
            );
            timeouts.ns[kind] = duration.as_secs() * 1_000_000_000;
        }
    }
    Ok(timeouts)
}

fn conntrack_command(action: ConntrackAction) -> Result<()> {
    match action {
        ConntrackAction::List {
            pin_dir,
            service,
            output,
        } => {
            let tables = Tables::open(&pin_dir)?;
            let wanted = |f: &conntrack::FlowView| {
                service
                    .as_ref()
                    .is_none_or(|s| f.service.starts_with(s.as_str()))
            };
            let out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut table = output::Stream::start(out, output.format());
            for flow in conntrack::flows(&tables) {
                let flow = flow?;
                if wanted(&flow) {
                    table.record(&flow, |wide| conntrack::render(&flow, wide))?;
                }
            }
            table.finish("no tracked flows")
        }
        ConntrackAction::Flush {
            pin_dir,
            service,
            backend,
        } => {
            let mut tables = Tables::open(&pin_dir)?;
            let counts = MappedArray::open(&pin_dir, map_name::CONN_COUNTS)?;
            let backend = backend.map(|b| parse_backend(&b)).transpose()?;
            let names = tables.service_names_by_id();
            let flushed = conntrack::flush(&mut tables, &counts, |_, entry| {
                let service_ok = service.as_ref().is_none_or(|s| {
                    names
                        .get(&entry.service_id)
                        .is_some_and(|n| n.starts_with(s.as_str()))
                });
                let backend_ok = backend.is_none_or(|(addr, port)| {
                    entry.nat_dst == Addr::from_ip(&addr)
                        && port.is_none_or(|p| u16::from_be(entry.nat_dport) == p)
                });
                service_ok && backend_ok
            })?;
            println!("flushed {flushed} flows");
            Ok(())
        }
    }
}

/// Without `--node-ip`, the node's addresses come from its Node object, merged with
/// the config's `bindAddress` as kube-proxy merges them. The agent waits up to 30 s
/// for the object (kube-proxy waits for it too); then a `bindAddress` alone will do,
/// and without one the agent stops: no address, no NodePorts and no masquerade.
/// The addresses, and that they follow the object.
async fn node_ips_from_node_object(
    source: &KubernetesSource,
    bind_address: Option<IpAddr>,
) -> Result<(Vec<IpAddr>, AddressesFrom)> {
    let from_node =
        match source.node_addresses(Duration::from_secs(30)).await {
            Ok(addresses) => addresses,
            Err(e) if bind_address.is_some() => {
                tracing::warn!("{e:#}: the node has only the config's bindAddress");
                Vec::new()
            }
            Err(e) => return Err(e.context(
                "this node's addresses are unknown: pass --node-ip (or the config's bindAddress)",
            )),
        };
    let node_ips = node::merge_bind_address(from_node.clone(), bind_address);
    anyhow::ensure!(
        !node_ips.is_empty(),
        "this node's addresses are unknown: its Node object has no InternalIP or ExternalIP \
         address; pass --node-ip (or the config's bindAddress)"
    );
    tracing::info!(
        ?node_ips,
        ?from_node,
        ?bind_address,
        "node addresses from the Node object"
    );
    Ok((node_ips, AddressesFrom::NodeObject { bind_address }))
}

/// The conntrack table's size when `--conntrack-entries` names none
/// (`datapath::sizing`), said at start.
fn node_sized_conntrack(pin_dir: &Path) -> Result<u32> {
    let (entries, basis) = sizing::conntrack_entries(pin_dir)?;
    match basis {
        sizing::Basis::Pinned => {
            tracing::info!(entries, "conntrack keeps the pinned table's size")
        }
        sizing::Basis::Memory(bytes) => tracing::info!(
            entries,
            node_memory_mib = bytes >> 20,
            "conntrack sized to the node's memory (--conntrack-entries sets it)"
        ),
    }
    Ok(entries)
}

/// A trusted-sources list without a prefix of a family the node has refuses every
/// tunnel of that family into this node (each `tunnel_refused`): deliberate, or a list
/// written before `dsr-ipip` carried IPv6 (ip6ip6), which deserves a word at start.
fn warn_of_untrusted_families(trusted: Option<&[SourceRange]>, node_ips: &[IpAddr]) {
    let Some(trusted) = trusted else {
        return;
    };
    for family in Family::ALL {
        let node_has = node_ips.iter().any(|ip| Family::of(ip) == family);
        if node_has && !trusted.iter().any(|r| r.family() == family) {
            tracing::warn!(
                "--ipip-trusted-sources has no {} prefix: every {} tunnel into this node is refused",
                family.name(),
                trace::tunnel_name(family),
            );
        }
    }
}

/// An IPv4 prefix: IPIP's outer addresses are IPv4.
fn parse_ipv4_range(text: &str) -> Result<SourceRange, String> {
    let range: SourceRange = text.parse()?;
    if range.family() != Family::V4 {
        return Err(format!("{text:?}: an IPv4 prefix expected"));
    }
    Ok(range)
}

/// `10.244.1.2`, `10.244.1.2:8080`, `fd00::5` or `[fd00::5]:8080`.
fn parse_backend(text: &str) -> Result<(IpAddr, Option<u16>)> {
    if let Ok(socket) = text.parse::<SocketAddr>() {
        return Ok((socket.ip(), Some(socket.port())));
    }
    Ok((text.parse().context("backend address")?, None))
}
