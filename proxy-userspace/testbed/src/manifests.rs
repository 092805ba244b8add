//! Kubernetes manifests for the pods of a `Topology`: what a cluster's API server
//! would hold for them, written as the agent's manifests file.

use std::{fmt::Write as _, net::Ipv4Addr};

use super::topology::{twin, Pod};

/// One single-port Service and the EndpointSlice listing its backends.
#[derive(Clone, Debug)]
pub struct ServiceDef {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    /// "TCP" or "UDP".
    pub protocol: &'static str,
    pub port: u16,
    pub target_port: u16,
    pub node_port: Option<u16>,
    pub load_balancer_ip: Option<Ipv4Addr>,
    /// (address, node name) of each ready backend.
    pub backends: Vec<(Ipv4Addr, String)>,
    /// (address, node name) of each terminating (but still serving) backend.
    pub terminating: Vec<(Ipv4Addr, String)>,
    /// Service annotations, e.g. `ebpf-proxy.io/scheduler`.
    pub annotations: Vec<(String, String)>,
    /// More `spec` fields, as YAML lines (`externalTrafficPolicy: Local`).
    pub spec: Vec<String>,
    /// Dual-stack (`RequireDualStack`): the clusterIP's and the LoadBalancer IP's
    /// IPv6 twins (`topology::twin`) too, and an IPv6 slice of the backends' twins.
    pub dual_stack: bool,
}

impl ServiceDef {
    pub fn new(
        name: &str,
        cluster_ip: Ipv4Addr,
        protocol: &'static str,
        port: u16,
        target_port: u16,
    ) -> ServiceDef {
        ServiceDef {
            name: name.to_owned(),
            cluster_ip,
            protocol,
            port,
            target_port,
            node_port: None,
            load_balancer_ip: None,
            backends: Vec::new(),
            terminating: Vec::new(),
            annotations: Vec::new(),
            spec: Vec::new(),
            dual_stack: false,
        }
    }

    pub fn dual_stack(mut self) -> ServiceDef {
        self.dual_stack = true;
        self
    }

    pub fn annotated(mut self, key: &str, value: &str) -> ServiceDef {
        self.annotations.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn with_spec(mut self, line: &str) -> ServiceDef {
        self.spec.push(line.to_owned());
        self
    }

    pub fn with_pods<'a>(mut self, pods: impl IntoIterator<Item = &'a Pod>) -> ServiceDef {
        self.backends = pods
            .into_iter()
            .map(|p| (p.addr, p.node.to_owned()))
            .collect();
        self
    }
}

pub fn render(services: &[ServiceDef]) -> String {
    let mut out = String::new();
    for s in services {
        let service_type = match (s.load_balancer_ip, s.node_port) {
            (Some(_), _) => "LoadBalancer",
            (None, Some(_)) => "NodePort",
            _ => "ClusterIP",
        };
        let node_port = s
            .node_port
            .map(|p| format!(", nodePort: {p}"))
            .unwrap_or_default();
        let families = if s.dual_stack {
            format!(
                "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIPs: [{}, \"{}\"]\n",
                s.cluster_ip,
                twin(s.cluster_ip)
            )
        } else {
            format!("  clusterIPs: [{}]\n", s.cluster_ip)
        };
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: demo\n  annotations: {{{annotations}}}\nspec:\n  type: {service_type}\n  selector: {{app: {name}}}\n  clusterIP: {ip}\n{families}  ports:\n  - {{name: main, protocol: {proto}, port: {port}, targetPort: {target}{node_port}}}\n{spec}",
            name = s.name,
            annotations = s
                .annotations
                .iter()
                .map(|(k, v)| format!("{k}: \"{v}\""))
                .collect::<Vec<_>>()
                .join(", "),
            ip = s.cluster_ip,
            proto = s.protocol,
            port = s.port,
            target = s.target_port,
            spec = s.spec.iter().map(|l| format!("  {l}\n")).collect::<String>(),
        );
        if let Some(lb) = s.load_balancer_ip {
            let twin_ingress = if s.dual_stack {
                format!(", {{ip: \"{}\"}}", twin(lb))
            } else {
                String::new()
            };
            let _ = write!(
                out,
                "status:\n  loadBalancer:\n    ingress: [{{ip: {lb}}}{twin_ingress}]\n"
            );
        }
        slice(&mut out, s, "IPv4", "1", &|addr| addr.to_string());
        if s.dual_stack {
            slice(&mut out, s, "IPv6", "2", &|addr| twin(addr).to_string());
        }
    }
    out
}

/// The EndpointSlice `<service>-<suffix>` of `address_type`, each backend's address
/// written by `address`.
fn slice(
    out: &mut String,
    s: &ServiceDef,
    address_type: &str,
    suffix: &str,
    address: &dyn Fn(Ipv4Addr) -> String,
) {
    let _ = write!(
        out,
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{suffix}\n  namespace: demo\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: {address_type}\nports:\n- {{name: main, protocol: {proto}, port: {target}}}\n",
        name = s.name,
        proto = s.protocol,
        target = s.target_port,
    );
    out.push_str(if s.backends.is_empty() && s.terminating.is_empty() {
        "endpoints: []\n"
    } else {
        "endpoints:\n"
    });
    for (addr, node) in &s.backends {
        let _ = writeln!(
            out,
            "- {{addresses: [\"{}\"], nodeName: {node}, conditions: {{ready: true}}}}",
            address(*addr)
        );
    }
    for (addr, node) in &s.terminating {
        let _ = writeln!(
            out,
            "- {{addresses: [\"{}\"], nodeName: {node}, conditions: {{ready: false, serving: true, terminating: true}}}}",
            address(*addr)
        );
    }
}
