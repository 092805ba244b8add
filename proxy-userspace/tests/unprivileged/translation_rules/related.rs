//! Rule 14: which frontends get a connection-tracking helper.

use std::net::Ipv4Addr;

use ebpf_proxy::{
    model::{FrontendKey, Helper, Listen, Protocol},
    tracker::{translate_all, Translation},
};

use super::{objects, NODE};

/// A NodePort service with UDP 69, UDP 6969 and TCP 69, annotated as given.
fn translated(annotations: &str) -> Translation {
    let yaml = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: tftp, namespace: ns{annotations}}}\nspec:\n  selector: {{app: tftp}}\n  type: NodePort\n  clusterIP: 10.96.0.1\n  ports:\n  - {{name: tftp, port: 69, protocol: UDP, nodePort: 30069}}\n  - {{name: alt, port: 6969, protocol: UDP, nodePort: 30070}}\n  - {{name: tcp, port: 69, protocol: TCP}}\n"
    );
    translate_all(&objects(&yaml), NODE)
}

/// The helper of every frontend, by (listen, port, protocol).
fn helpers(out: &Translation) -> Vec<(String, Helper)> {
    out.state
        .frontends
        .iter()
        .map(|(key, frontend)| (key.to_string(), frontend.helper))
        .collect()
}

fn helper_of(out: &Translation, listen: Listen, port: u16, protocol: Protocol) -> Helper {
    let key = FrontendKey {
        listen,
        port,
        protocol,
    };
    out.state.frontends[&key].helper
}

#[test]
fn rule14_udp_port_69_gets_the_tftp_helper_on_every_frontend_unless_annotated() {
    let cluster_ip = Listen::Address(Ipv4Addr::new(10, 96, 0, 1).into());
    let node_port = Listen::NodePort(ebpf_proxy::model::Family::V4);
    let default = translated("");
    assert!(default.problems.is_empty(), "{:?}", default.problems);
    assert_eq!(
        helper_of(&default, cluster_ip, 69, Protocol::Udp),
        Helper::Tftp
    );
    assert_eq!(
        helper_of(&default, node_port, 30069, Protocol::Udp),
        Helper::Tftp
    );
    assert_eq!(
        helper_of(&default, cluster_ip, 6969, Protocol::Udp),
        Helper::None
    );
    assert_eq!(
        helper_of(&default, cluster_ip, 69, Protocol::Tcp),
        Helper::None
    );

    // Annotated: every UDP port; TCP never (TFTP is UDP).
    let tftp = translated(", annotations: {ebpf-proxy.io/helper: tftp}");
    assert_eq!(
        helper_of(&tftp, cluster_ip, 6969, Protocol::Udp),
        Helper::Tftp
    );
    assert_eq!(
        helper_of(&tftp, cluster_ip, 69, Protocol::Tcp),
        Helper::None
    );

    // Listed ports only, by name or number; a listed port that is not UDP is said.
    for listed in ["tftp:alt", "tftp:6969", "\"tftp:alt, tftp:tcp\""] {
        let ports = translated(&format!(
            ", annotations: {{ebpf-proxy.io/helper: {listed}}}"
        ));
        assert_eq!(
            helper_of(&ports, cluster_ip, 6969, Protocol::Udp),
            Helper::Tftp,
            "{listed}"
        );
        assert_eq!(
            helper_of(&ports, cluster_ip, 69, Protocol::Udp),
            Helper::None,
            "{listed}"
        );
        assert_eq!(
            helper_of(&ports, node_port, 30069, Protocol::Udp),
            Helper::None
        );
        assert_eq!(
            helper_of(&ports, cluster_ip, 69, Protocol::Tcp),
            Helper::None
        );
        assert_eq!(
            ports
                .problems
                .iter()
                .any(|p| p.message.contains("tcp is no UDP port")),
            listed.contains("tftp:tcp"),
            "{listed}: {:?}",
            ports.problems
        );
    }

    let none = translated(", annotations: {ebpf-proxy.io/helper: none}");
    assert!(
        helpers(&none).iter().all(|(_, h)| *h == Helper::None),
        "{:?}",
        helpers(&none)
    );

    // An unknown helper is reported; the service keeps the default.
    let unknown = translated(", annotations: {ebpf-proxy.io/helper: ftp}");
    assert!(
        unknown
            .problems
            .iter()
            .any(|p| p.message.contains("unknown helper \"ftp\"")),
        "{:?}",
        unknown.problems
    );
    assert_eq!(helpers(&unknown), helpers(&default));
}

#[test]
fn rule14_a_port_with_a_helper_is_never_dsr_ipip() {
    let dsr = translated(", annotations: {ebpf-proxy.io/forwarding: dsr-ipip}");
    let node_port = |port| FrontendKey {
        listen: Listen::NodePort(ebpf_proxy::model::Family::V4),
        port,
        protocol: Protocol::Udp,
    };
    assert!(
        !dsr.state.frontends[&node_port(30069)].dsr,
        "TFTP stays snat"
    );
    assert!(
        dsr.state.frontends[&node_port(30070)].dsr,
        "the other port is dsr-ipip"
    );
    assert!(
        !dsr.state
            .frontends
            .keys()
            .any(|k| k.listen.is_tunnel() && k.port == 30069),
        "no IPIP view of the TFTP port"
    );
}
