//! Conntrack per transport protocol (`proxy_common::Transport`): each protocol its own
//! states and idle timeouts, and none for a protocol no version tracks.

use proxy_common::{
    sctp,
    tcp::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    CtTimeouts, Transport, ACCT_ACTIVE, ACCT_INACTIVE, CT_CLOSING, CT_ESTABLISHED, CT_F_REPLY,
    CT_SYN_RECV, CT_SYN_SENT, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
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
fn a_new_tcp_or_sctp_flow_starts_half_open_and_a_new_udp_flow_established() {
    // Only the answers make a TCP flow (an SCTP association) established, so forged
    // packets cannot create long-lived, counted entries.
    assert_eq!(Transport::opening(PROTO_TCP), (CT_SYN_SENT, ACCT_INACTIVE));
    assert_eq!(Transport::opening(PROTO_SCTP), (CT_SYN_SENT, ACCT_INACTIVE));
    assert_eq!(Transport::opening(PROTO_UDP), (CT_ESTABLISHED, ACCT_ACTIVE));
}

/// One SCTP packet whose first chunk is `chunk`, from the client (`side` 0) or the
/// backend (`CT_F_REPLY`), applied to an entry in `state`; `peer_shut_down` answers
/// whether the other direction already sent its SHUTDOWN (or SHUTDOWN-ACK).
fn sctp_step(state: u8, side: u8, chunk: u8, peer_shut_down: bool) -> u8 {
    Transport::Sctp
        .next(state, side, chunk, || peer_shut_down)
        .0
}

const FROM_CLIENT: u8 = 0;
const FROM_BACKEND: u8 = CT_F_REPLY;
const DATA: u8 = 0;
const SACK: u8 = 3;

#[test]
fn an_sctp_association_is_established_by_the_backends_cookie_ack() {
    // INIT opens half-open; the backend's INIT-ACK keeps it half-open; the client's
    // COOKIE-ECHO does not establish it (a spoofed client could send one, with a
    // made-up cookie the backend silently discards); the backend's COOKIE-ACK does.
    assert_eq!(Transport::opening(PROTO_SCTP).0, CT_SYN_SENT);
    let state = sctp_step(CT_SYN_SENT, FROM_BACKEND, sctp::CHUNK_INIT_ACK, false);
    assert_eq!(state, CT_SYN_RECV);
    for chunk in [sctp::CHUNK_COOKIE_ECHO, DATA, SACK] {
        assert_eq!(
            sctp_step(state, FROM_CLIENT, chunk, false),
            CT_SYN_RECV,
            "{chunk}"
        );
    }
    assert_eq!(sctp_step(state, FROM_BACKEND, DATA, false), CT_SYN_RECV);
    let state = sctp_step(state, FROM_BACKEND, sctp::CHUNK_COOKIE_ACK, false);
    assert_eq!(state, CT_ESTABLISHED);
    // An association picked up mid-stream (its entry lost) is established by the
    // backend's answer (DATA, SACK, HEARTBEAT-ACK…), not by the client's packets.
    assert_eq!(
        sctp_step(CT_SYN_SENT, FROM_BACKEND, SACK, false),
        CT_ESTABLISHED
    );
    assert_eq!(
        sctp_step(CT_SYN_SENT, FROM_CLIENT, DATA, false),
        CT_SYN_SENT
    );
}

#[test]
fn a_spoofed_init_never_gets_past_half_open() {
    // The forged client sees neither the INIT-ACK nor its tag: whatever it sends
    // next leaves the entry half-open, on the short timeout, counted inactive.
    let mut state = sctp_step(CT_SYN_SENT, FROM_BACKEND, sctp::CHUNK_INIT_ACK, false);
    for chunk in [sctp::CHUNK_COOKIE_ECHO, DATA, SACK, sctp::CHUNK_INIT] {
        state = sctp_step(state, FROM_CLIENT, chunk, false);
        assert_eq!(state, CT_SYN_RECV, "after chunk {chunk}");
    }
    assert_eq!(
        CtTimeouts::DEFAULT.of(PROTO_SCTP, state),
        60 * SECOND,
        "the half-open timeout"
    );
}

#[test]
fn an_sctp_association_closes_by_shutdown_both_ways_or_either_abort() {
    for side in [FROM_CLIENT, FROM_BACKEND] {
        for chunk in [sctp::CHUNK_ABORT, sctp::CHUNK_SHUTDOWN_COMPLETE] {
            assert_eq!(sctp_step(CT_ESTABLISHED, side, chunk, false), CT_CLOSING);
        }
    }
    // SHUTDOWN one way leaves it established; the SHUTDOWN-ACK back closes it.
    assert_eq!(
        sctp_step(CT_ESTABLISHED, FROM_CLIENT, sctp::CHUNK_SHUTDOWN, false),
        CT_ESTABLISHED
    );
    assert_eq!(
        sctp_step(CT_ESTABLISHED, FROM_BACKEND, sctp::CHUNK_SHUTDOWN_ACK, true),
        CT_CLOSING
    );
    // A new association on the closed tuple (an INIT from the client) is a new flow,
    // not a state of the closed one; the backend's INIT is neither.
    assert!(sctp::reopens(CT_CLOSING, FROM_CLIENT, sctp::CHUNK_INIT));
    assert!(!sctp::reopens(CT_CLOSING, FROM_BACKEND, sctp::CHUNK_INIT));
    assert!(!sctp::reopens(
        CT_ESTABLISHED,
        FROM_CLIENT,
        sctp::CHUNK_INIT
    ));
    assert_eq!(
        sctp_step(CT_CLOSING, FROM_CLIENT, sctp::CHUNK_INIT, false),
        CT_CLOSING
    );
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
    // An SCTP association follows TCP's timeouts.
    assert_eq!(ct_timeout_ns(PROTO_SCTP, CT_SYN_SENT), 60 * SECOND);
    assert_eq!(ct_timeout_ns(PROTO_SCTP, CT_ESTABLISHED), 21_600 * SECOND);
    // DCCP (33): no entry of it is ever made; one found is stale at once, where it
    // used to get UDP's timeout (every protocol but TCP did).
    assert_eq!(ct_timeout_ns(33, CT_ESTABLISHED), 0);
    // Set timeouts are followed, per kind.
    let mut set = CtTimeouts::DEFAULT;
    set.ns[proxy_common::TIMEOUT_UDP] = 5 * SECOND;
    assert_eq!(set.of(PROTO_UDP, CT_ESTABLISHED), 5 * SECOND);
    assert_eq!(set.of(PROTO_TCP, CT_ESTABLISHED), 21_600 * SECOND);
}
