//! The TCP state machine conntrack follows (`proxy_common::tcp::next`), segment by
//! segment: what establishes a flow, what only half-opens it, what closes it.

use proxy_common::{
    tcp::{next, reopens, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    CT_CLOSING, CT_ESTABLISHED, CT_F_ENCAP, CT_F_FIN, CT_F_REPLY, CT_SYN_RECV, CT_SYN_SENT,
};

const CLIENT: u8 = 0;
const BACKEND: u8 = CT_F_REPLY;
const SYN_ACK: u8 = TCP_SYN | TCP_ACK;

fn step(state: u8, side: u8, tcp: u8) -> u8 {
    next(state, side, tcp, || false).0
}

#[test]
fn a_handshake_establishes_only_with_the_clients_final_ack() {
    assert_eq!(step(CT_SYN_SENT, BACKEND, SYN_ACK), CT_SYN_RECV);
    // The client's retransmitted SYN does not advance it.
    assert_eq!(step(CT_SYN_RECV, CLIENT, TCP_SYN), CT_SYN_RECV);
    assert_eq!(step(CT_SYN_RECV, CLIENT, TCP_ACK), CT_ESTABLISHED);
}

#[test]
fn a_spoofed_syn_never_gets_past_half_open() {
    // Everything a forged source's SYN can cause without the client's answer.
    let state = step(CT_SYN_SENT, BACKEND, SYN_ACK);
    for tcp in [SYN_ACK, TCP_ACK, TCP_SYN] {
        assert_eq!(step(state, BACKEND, tcp), CT_SYN_RECV, "backend {tcp:#x}");
    }
    assert_eq!(step(CT_SYN_SENT, CLIENT, TCP_SYN), CT_SYN_SENT);
}

#[test]
fn a_flow_picked_up_mid_stream_is_established_by_the_backends_answer() {
    assert_eq!(step(CT_SYN_SENT, CLIENT, TCP_ACK), CT_SYN_SENT);
    assert_eq!(step(CT_SYN_SENT, BACKEND, TCP_ACK), CT_ESTABLISHED);
    assert_eq!(step(CT_SYN_SENT, BACKEND, TCP_RST), CT_CLOSING);
}

#[test]
fn a_flow_closes_when_both_sides_sent_a_fin_or_either_a_reset() {
    let (state, flags) = next(CT_ESTABLISHED, CLIENT, TCP_FIN | TCP_ACK, || false);
    assert_eq!((state, flags), (CT_ESTABLISHED, CT_F_FIN));
    let (state, _) = next(CT_ESTABLISHED, BACKEND, TCP_FIN | TCP_ACK, || true);
    assert_eq!(state, CT_CLOSING);
    assert_eq!(step(CT_ESTABLISHED, BACKEND, TCP_RST), CT_CLOSING);
    // A retransmitted FIN does not ask the peer again.
    let (state, _) = next(CT_ESTABLISHED, CT_F_FIN, TCP_FIN, || panic!("asked"));
    assert_eq!(state, CT_ESTABLISHED);
}

#[test]
fn only_the_clients_bare_syn_reopens_a_closed_tuple() {
    assert!(reopens(CT_CLOSING, CT_F_FIN, TCP_SYN));
    // An ECN-setup SYN (ECE and CWR set) is a SYN.
    assert!(reopens(CT_CLOSING, CLIENT, TCP_SYN | 0xc0));
    assert!(!reopens(CT_CLOSING, BACKEND, TCP_SYN));
    assert!(!reopens(CT_CLOSING, CLIENT, TCP_SYN | TCP_ACK));
    assert!(!reopens(CT_CLOSING, CLIENT, TCP_SYN | TCP_RST));
    assert!(!reopens(CT_ESTABLISHED, CLIENT, TCP_SYN));
    // The old flow's state does not move: the new connection is a new flow.
    assert_eq!(step(CT_CLOSING, CLIENT, TCP_SYN), CT_CLOSING);
}

#[test]
fn dsr_flows_see_only_the_client_half() {
    assert_eq!(step(CT_SYN_SENT, CT_F_ENCAP, TCP_ACK), CT_ESTABLISHED);
    assert_eq!(step(CT_SYN_SENT, CT_F_ENCAP, TCP_SYN), CT_SYN_SENT);
    assert_eq!(step(CT_ESTABLISHED, CT_F_ENCAP, TCP_FIN), CT_CLOSING);
}
