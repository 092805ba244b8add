//! kube-proxy's rules, laid out as kube-proxy itself lays them out, from the same
//! services as the agent's: the bench's contenders, and the kube-proxy a migration test
//! starts from. Its modes: iptables mode (KUBE-SERVICES → KUBE-SVC-* with `statistic`
//! probabilities → KUBE-SEP-* DNAT, masquerade marks), through iptables-legacy and
//! iptables-nft, nftables mode (a verdict map on address . protocol . port, then
//! `numgen random` over the endpoint chains), and IPVS mode (every service address on
//! the dummy `kube-ipvs0`, one rr virtual server per service with masquerading real
//! servers, kube-proxy's IPVS sysctls, and the KUBE-LOOP-BACK ipset with its
//! masquerade rule for hairpin). Only the nat rules are generated: they
//! are what a new connection traverses; kube-proxy's filter-table rules (drops of
//! invalid conntrack states, firewall chains) are left out, which favours them.
//!
//! The iptables and nftables layouts are written for either family, as kube-proxy's
//! proxier of that family writes them (ip6tables, an `ip6` table): the services'
//! IPv4 addresses become their IPv6 twins (`topology::twin`). IPVS is IPv4 only here.

use std::{fmt::Write as _, net::Ipv4Addr};

use crate::{
    netns::Netns,
    topology::{host_port, in_family},
};
use anyhow::{bail, Context as _, Result};
use ebpf_proxy::model::Family;

/// One ClusterIP service with its endpoints, as every contender gets it, by its
/// IPv4 addresses: a contender of IPv6 gets their twins.
pub struct Service {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// `tcp` or `udp`, as iptables and nft spell it.
    pub proto: &'static str,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
    /// A NodePort on every local address; the IPVS layout has none.
    pub node_port: Option<u16>,
    /// `externalTrafficPolicy: Local`: the NodePort's outside clients are not
    /// masqueraded. (kube-proxy then sends them to the node's own endpoints only,
    /// `KUBE-SVL-*`; these services have no others.)
    pub external_local: bool,
}

const POD_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 244, 0, 0), 16);

/// The pods' prefix in `family`: IPv4's, or its twin (96 more bits).
fn pod_cidr(family: Family) -> String {
    let (network, length) = POD_CIDR;
    let length = length + family.bits() - Family::V4.bits();
    format!("{}/{length}", in_family(network, family))
}

/// An address of `family` as a host prefix (`/32`, `/128`).
fn host(address: Ipv4Addr, family: Family) -> String {
    format!("{}/{}", in_family(address, family), family.bits())
}

/// `address:port` in `family`, bracketed for IPv6 as DNAT targets are written.
fn target(address: Ipv4Addr, port: u16, family: Family) -> String {
    host_port(in_family(address, family), port)
}

/// The iptables tool of `family` (`iptables-legacy-restore`, `ip6tables-nft-restore`).
pub fn iptables_tool(family: Family, backend: &str, suffix: &str) -> String {
    let name = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    format!("{name}-{backend}{suffix}")
}

fn chain_id(prefix: &str, index: usize) -> String {
    // kube-proxy hashes the service/endpoint name; an index is as unique here.
    format!("{prefix}-{index:016X}")
}

/// `iptables-restore` (or `ip6tables-restore`) input for the nat table, kube-proxy
/// iptables mode.
pub fn iptables_rules(services: &[Service], family: Family) -> String {
    let pod_cidr = pod_cidr(family);
    let mut chains = String::new();
    let mut rules = String::new();
    for name in ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"] {
        let _ = writeln!(chains, ":{name} - [0:0]");
    }
    let _ = writeln!(
        rules,
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
    );
    let _ = writeln!(
        rules,
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
    );
    let _ = writeln!(
        rules,
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"
    );
    let _ = writeln!(rules, "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000");
    let _ = writeln!(
        rules,
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN"
    );
    let _ = writeln!(rules, "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000");
    let _ = writeln!(rules, "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully");
    let mut endpoint_index = 0;
    let mut node_ports = String::new();
    for (s, service) in services.iter().enumerate() {
        let svc = chain_id("KUBE-SVC", s);
        let _ = writeln!(chains, ":{svc} - [0:0]");
        if let Some(node_port) = service.node_port {
            let ext = chain_id("KUBE-EXT", s);
            let _ = writeln!(chains, ":{ext} - [0:0]");
            let _ = writeln!(
                node_ports,
                "-A KUBE-NODEPORTS -m comment --comment \"bench/svc{s}:http\" -m {p} -p {p} --dport {node_port} -j {ext}",
                p = service.proto
            );
            let masquerade = match service.external_local {
                // Only the node's own clients, which kube-proxy still masquerades.
                true => "-m addrtype --src-type LOCAL ",
                false => "",
            };
            let _ = writeln!(node_ports, "-A {ext} -m comment --comment \"masquerade traffic for bench/svc{s}:http external destinations\" {masquerade}-j KUBE-MARK-MASQ");
            let _ = writeln!(node_ports, "-A {ext} -j {svc}");
        }
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"bench/svc{s}:http cluster IP\" -m {p} -p {p} -d {} --dport {} -j {svc}",
            host(service.ip, family), service.port, p = service.proto
        );
        let _ = writeln!(
            rules,
            "-A {svc} ! -s {pod_cidr} -d {} -m comment --comment \"bench/svc{s}:http cluster IP\" -m {p} -p {p} --dport {} -j KUBE-MARK-MASQ",
            host(service.ip, family), service.port, p = service.proto
        );
        let n = service.endpoints.len();
        for (i, (addr, port)) in service.endpoints.iter().enumerate() {
            let sep = chain_id("KUBE-SEP", endpoint_index);
            endpoint_index += 1;
            let _ = writeln!(chains, ":{sep} - [0:0]");
            if i + 1 < n {
                let probability = 1.0 / (n - i) as f64;
                let _ = writeln!(
                    rules,
                    "-A {svc} -m statistic --mode random --probability {probability:.10} -j {sep}"
                );
            } else {
                let _ = writeln!(rules, "-A {svc} -j {sep}");
            }
            let _ = writeln!(
                rules,
                "-A {sep} -s {} -j KUBE-MARK-MASQ",
                host(*addr, family)
            );
            let _ = writeln!(
                rules,
                "-A {sep} -m {p} -p {p} -j DNAT --to-destination {}",
                target(*addr, *port, family),
                p = service.proto
            );
        }
    }
    if !node_ports.is_empty() {
        // Last in KUBE-SERVICES, as kube-proxy writes it: after every service address.
        let _ = writeln!(chains, ":KUBE-NODEPORTS - [0:0]");
        let _ = writeln!(rules, "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS");
        rules += &node_ports;
    }
    format!("*nat\n{chains}{rules}COMMIT\n")
}

/// `nft -f` input, kube-proxy nftables mode (its `ip` or `ip6` table).
pub fn nftables_rules(services: &[Service], family: Family) -> String {
    let (table, address_type) = match family {
        Family::V4 => ("ip", "ipv4_addr"),
        Family::V6 => ("ip6", "ipv6_addr"),
    };
    let pod_cidr = pod_cidr(family);
    let mut out = format!("table {table} kube-proxy {{\n");
    let mut chain = |name: &str, body: &[String]| {
        let _ = writeln!(out, "  chain {name} {{\n    {}\n  }}", body.join("\n    "));
    };
    chain(
        "mark-for-masquerade",
        &["meta mark set meta mark or 0x4000".into()],
    );
    chain(
        "masquerading",
        &[
            "meta mark & 0x4000 == 0 return".into(),
            "meta mark set meta mark xor 0x4000".into(),
            "masquerade fully-random".into(),
        ],
    );
    let mut lookups = vec![format!(
        "{table} daddr . meta l4proto . th dport vmap @service-ips"
    )];
    if services.iter().any(|s| s.node_port.is_some()) {
        lookups.push("fib daddr type local meta l4proto . th dport vmap @service-nodeports".into());
    }
    chain("services", &lookups);
    chain(
        "nat-prerouting",
        &[
            "type nat hook prerouting priority dstnat; policy accept;".into(),
            "jump services".into(),
        ],
    );
    chain(
        "nat-output",
        &[
            "type nat hook output priority -100; policy accept;".into(),
            "jump services".into(),
        ],
    );
    chain(
        "nat-postrouting",
        &[
            "type nat hook postrouting priority srcnat; policy accept;".into(),
            "jump masquerading".into(),
        ],
    );
    let mut elements = Vec::new();
    let mut node_port_elements = Vec::new();
    let mut endpoint_index = 0;
    for (s, service) in services.iter().enumerate() {
        let name = format!("service-{s}");
        elements.push(format!(
            "{} . {} . {} : goto {name}",
            in_family(service.ip, family),
            service.proto,
            service.port
        ));
        let mut targets = Vec::new();
        for (i, (addr, port)) in service.endpoints.iter().enumerate() {
            let endpoint = format!("endpoint-{endpoint_index}");
            endpoint_index += 1;
            chain(
                &endpoint,
                &[
                    format!(
                        "{table} saddr {} jump mark-for-masquerade",
                        in_family(*addr, family)
                    ),
                    format!(
                        "meta l4proto {} dnat to {}",
                        service.proto,
                        target(*addr, *port, family)
                    ),
                ],
            );
            targets.push(format!("{i} : goto {endpoint}"));
        }
        if let Some(node_port) = service.node_port {
            let external = format!("external-{s}");
            let masquerade = match service.external_local {
                true => "fib saddr type local jump mark-for-masquerade",
                false => "jump mark-for-masquerade",
            };
            chain(&external, &[masquerade.into(), format!("goto {name}")]);
            node_port_elements.push(format!("{} . {node_port} : goto {external}", service.proto));
        }
        chain(
            &name,
            &[
                format!(
                    "{table} daddr {} {} dport {} {table} saddr != {pod_cidr} jump mark-for-masquerade",
                    in_family(service.ip, family),
                    service.proto,
                    service.port
                ),
                format!(
                    "numgen random mod {} vmap {{ {} }}",
                    service.endpoints.len(),
                    targets.join(", ")
                ),
            ],
        );
    }
    let _ = writeln!(
        out,
        "  map service-ips {{\n    type {address_type} . inet_proto . inet_service : verdict\n    elements = {{ {} }}\n  }}",
        elements.join(",\n      ")
    );
    if !node_port_elements.is_empty() {
        let _ = writeln!(
            out,
            "  map service-nodeports {{\n    type inet_proto . inet_service : verdict\n    elements = {{ {} }}\n  }}",
            node_port_elements.join(",\n      ")
        );
    }
    out += "}\n";
    out
}

/// `ipvsadm -R` (restore) input: one round-robin virtual server per service, its
/// endpoints as masquerading (NAT) real servers.
pub fn ipvs_rules(services: &[Service]) -> String {
    let mut out = String::new();
    for service in services {
        let flag = if service.proto == "udp" { "-u" } else { "-t" };
        let vs = format!("{}:{}", service.ip, service.port);
        let _ = writeln!(out, "-A {flag} {vs} -s rr");
        for (addr, port) in &service.endpoints {
            let _ = writeln!(out, "-a {flag} {vs} -r {addr}:{port} -m -w 1");
        }
    }
    out
}

/// Programs kube-proxy's IPVS mode into the node namespace.
fn load_ipvs(node: &Netns, services: &[Service]) -> Result<()> {
    for (key, value) in [
        ("net.ipv4.vs.conntrack", "1"),
        ("net.ipv4.vs.expire_nodest_conn", "1"),
        ("net.ipv4.vs.expire_quiescent_template", "1"),
    ] {
        node.sysctl(key, value)?;
    }
    node.ip("link add kube-ipvs0 type dummy")?;
    let mut addresses = String::new();
    let mut loopback = String::from("create KUBE-LOOP-BACK hash:ip,port,ip\n");
    // An endpoint of two services is one element, as kube-proxy adds it.
    let mut looped = std::collections::BTreeSet::new();
    for service in services {
        let _ = writeln!(addresses, "addr add {}/32 dev kube-ipvs0", service.ip);
        for (addr, port) in &service.endpoints {
            if looped.insert((*addr, service.proto, *port)) {
                let _ = writeln!(
                    loopback,
                    "add KUBE-LOOP-BACK {addr},{}:{port},{addr}",
                    service.proto
                );
            }
        }
    }
    load(node, "ip", &["-batch"], &addresses)?;
    load(node, "ipset", &["restore", "-file"], &loopback)?;
    load(
        node,
        "sh",
        &["-c", "ipvsadm -R < \"$0\""],
        &ipvs_rules(services),
    )?;
    node.exec(
        "iptables-legacy",
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-m",
            "set",
            "--match-set",
            "KUBE-LOOP-BACK",
            "dst,dst,src",
            "-j",
            "MASQUERADE",
        ],
    )?;
    Ok(())
}

/// Removes what `load_mode` programmed for `mode` and `family`.
pub fn remove_mode(node: &Netns, mode: &str, family: Family) -> Result<()> {
    match mode {
        "ipvs" => flush_ipvs(node),
        _ => flush(node, family),
    }
}

/// Removes what `load_ipvs` programmed.
fn flush_ipvs(node: &Netns) -> Result<()> {
    node.exec("ipvsadm", &["-C"])?;
    node.ip("link del kube-ipvs0")?;
    flush(node, Family::V4)?;
    node.exec("ipset", &["destroy", "KUBE-LOOP-BACK"])?;
    Ok(())
}

/// kube-proxy's modes, by the names the bench reports them under (`ipvs` only in the
/// QEMU guest: this kernel has no IPVS).
pub const MODES: [&str; 4] = ["iptables-legacy", "iptables-nft", "nftables", "ipvs"];

/// Programs `services` in `node` as kube-proxy's `mode` (one of `MODES`) of `family`
/// does (IPVS: IPv4 only here).
pub fn load_mode(node: &Netns, mode: &str, services: &[Service], family: Family) -> Result<()> {
    if mode == "ipvs" {
        anyhow::ensure!(family == Family::V4, "IPVS is laid out for IPv4 only");
        return load_ipvs(node, services);
    }
    match mode.strip_prefix("iptables-") {
        Some(backend) => load(
            node,
            &iptables_tool(family, backend, "-restore"),
            &[],
            &iptables_rules(services, family),
        ),
        None if mode == "nftables" => load(node, "nft", &["-f"], &nftables_rules(services, family)),
        None => bail!("{mode}: not one of kube-proxy's modes here ({MODES:?})"),
    }
}

/// Loads rules into a namespace through a file (the tools read their input whole).
pub fn load(node: &Netns, tool: &str, args: &[&str], rules: &str) -> Result<()> {
    let path = std::env::temp_dir().join(format!("epx-rules-{}-{tool}.rules", std::process::id()));
    std::fs::write(&path, rules)?;
    let mut full: Vec<&str> = args.to_vec();
    let path_str = path.to_str().context("temp path")?;
    full.push(path_str);
    let result = node.exec(tool, &full);
    let _ = std::fs::remove_file(&path);
    result.map(|_| ())
}

/// Removes every rule a contender of `family` left in the namespace (only that
/// family's iptables tools: the QEMU guest has IPv4's only).
pub fn flush(node: &Netns, family: Family) -> Result<()> {
    let tables = ["legacy", "nft"]
        .map(|backend| iptables_tool(family, backend, ""))
        .into_iter()
        .flat_map(|tool| {
            [
                (tool.clone(), vec!["-t", "nat", "-F"]),
                (tool, vec!["-t", "nat", "-X"]),
            ]
        });
    for (tool, args) in tables.chain([("nft".to_owned(), vec!["flush", "ruleset"])]) {
        node.exec(&tool, &args)
            .with_context(|| format!("{tool} {}", args.join(" ")))?;
    }
    let left = node.exec("nft", &["list", "ruleset"])?;
    if left.contains("dnat") {
        bail!("rules left after the flush:\n{left}");
    }
    Ok(())
}
