//! Conntrack per transport protocol (`proxy_common::Transport`): each protocol its own
//! states and idle timeouts, and none for a protocol no version tracks.

use proxy_common::{
    tcp::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    CtTimeouts, Transport, ACCT_ACTIVE, ACCT_INACTIVE, CT_CLOSING, CT_ESTABLISHED, CT_F_REPLY,
    CT_SYN_RECV, CT_SYN_SENT, PROTO_TCP, PROTO_UDP,
};

const SECOND: u64 = 1_000_000_000;

#[test]
fn udp_has_one_state_whatever_its_bytes_look_like() {
    // A datagram whose first bytes would read as TCP flags changes nothing.
    for bits in [TCP_SYN, TCP_FIN, TCP_RST, TCP_ACK | TCP_SYN] {
        assert_eq!(
            Transport::Udp.next(CT_ESTABLISHED, CT_F_REPLY, bits, || true),
            (CT_ESTABLISHED, CT_F_REPLY)
        );
    }
}

#[test]
fn a_new_tcp_flow_starts_half_open_and_a_new_udp_flow_established() {
    // Only the answers make a TCP flow established, so forged segments cannot
    // create long-lived, counted entries.
    assert_eq!(Transport::opening(PROTO_TCP), (CT_SYN_SENT, ACCT_INACTIVE));
    assert_eq!(Transport::opening(PROTO_UDP), (CT_ESTABLISHED, ACCT_ACTIVE));
}

#[test]
fn tcp_follows_its_handshake_and_teardown() {
    assert_eq!(
        Transport::Tcp
            .next(CT_SYN_SENT, CT_F_REPLY, TCP_SYN | TCP_ACK, || false)
            .0,
        CT_SYN_RECV
    );
    assert_eq!(
        Transport::Tcp.next(CT_ESTABLISHED, 0, TCP_RST, || false).0,
        CT_CLOSING
    );
}

#[test]
fn each_protocol_has_its_idle_timeouts_and_an_unknown_one_none() {
    let ct_timeout_ns = |proto, state| CtTimeouts::DEFAULT.of(proto, state);
    assert_eq!(ct_timeout_ns(PROTO_UDP, CT_ESTABLISHED), 60 * SECOND);
    assert_eq!(ct_timeout_ns(PROTO_TCP, CT_SYN_SENT), 60 * SECOND);
    assert_eq!(ct_timeout_ns(PROTO_TCP, CT_SYN_RECV), 60 * SECOND);
    assert_eq!(ct_timeout_ns(PROTO_TCP, CT_ESTABLISHED), 21_600 * SECOND);
    assert_eq!(ct_timeout_ns(PROTO_TCP, CT_CLOSING), 10 * SECOND);
    // SCTP (132): no entry of it is ever made; one found is stale at once, where it
    // used to get UDP's timeout (every protocol but TCP did).
    assert_eq!(ct_timeout_ns(132, CT_ESTABLISHED), 0);
    // Set timeouts are followed, per kind.
    let mut set = CtTimeouts::DEFAULT;
    set.ns[proxy_common::TIMEOUT_UDP] = 5 * SECOND;
    assert_eq!(set.of(PROTO_UDP, CT_ESTABLISHED), 5 * SECOND);
    assert_eq!(set.of(PROTO_TCP, CT_ESTABLISHED), 21_600 * SECOND);
}
