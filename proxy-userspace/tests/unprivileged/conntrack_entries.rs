//! A new flow's two conntrack entries, as `proxy_common::conntrack` builds them for
//! the data path: each undoes the other, so a reply finds its entry and leaves with
//! the tuple the client sent to.

use proxy_common::{
    Addr, CtEntry, CtKey, Family, CT_F_ENCAP, CT_F_REPLY, CT_F_REWRITE_DST, CT_F_REWRITE_SRC,
    PROTO_TCP,
};

fn client_to_service() -> CtKey {
    CtKey {
        src: Addr::from_v4_octets([198, 18, 0, 2]),
        dst: Addr::from_v4_octets([10, 96, 0, 10]),
        sport: 41000u16.to_be(),
        dport: 80u16.to_be(),
        proto: PROTO_TCP,
        family: Family::V4.number(),
        _pad: [0; 2],
    }
}

#[test]
fn the_reply_entry_undoes_the_original_one() {
    let key = client_to_service();
    let backend = (Addr::from_v4_octets([10, 244, 1, 2]), 8080u16.to_be());
    let original = CtEntry::original(&key, backend, (3, 7), (0, 1), 42);
    assert_eq!(original.flags, CT_F_REWRITE_DST);
    assert_eq!((original.service_id, original.backend_id), (3, 7));
    // What the backend sees, and what it answers with: the reply entry's key.
    let at_backend = key.rewritten(&original);
    assert_eq!((at_backend.dst, at_backend.dport), backend);
    assert_eq!(at_backend.src, key.src, "no masquerade decided yet");
    let reply_key = key.peer(&original);
    assert_eq!(reply_key, at_backend.reversed());
    // The reply, rewritten, is the client's tuple turned around; its peer is the key.
    let reply = CtEntry::reply_to(&key, &original);
    assert_eq!(reply.flags, CT_F_REWRITE_SRC | CT_F_REPLY);
    assert_eq!(reply_key.rewritten(&reply), key.reversed());
    assert_eq!(reply_key.peer(&reply), key);
    assert_eq!(
        (
            reply.service_id,
            reply.backend_id,
            reply.state,
            reply.accounting
        ),
        (3, 7, 0, 1)
    );
    assert_eq!(reply.last_seen_ns, 42);
}

#[test]
fn an_encapsulated_flow_keeps_its_tuple_and_names_the_tunnel_ends() {
    let node = Addr::from_v4_octets([192, 0, 2, 1]);
    let backend_node = Addr::from_v4_octets([192, 0, 2, 2]);
    let entry = CtEntry::encapsulated((node, backend_node), (7, 9), (0, 1), 123);
    assert_eq!(
        entry.flags, CT_F_ENCAP,
        "no rewrite: the inner packet is the client's"
    );
    assert_eq!((entry.nat_src, entry.nat_dst), (node, backend_node));
    assert_eq!((entry.service_id, entry.backend_id), (7, 9));
    assert_eq!(
        (entry.state, entry.accounting, entry.last_seen_ns),
        (0, 1, 123)
    );
}
