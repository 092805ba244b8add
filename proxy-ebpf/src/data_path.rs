// The modules and entry points of the data path, shared by its two crate roots:
// `main.rs` (kernels from 5.18) and `legacy.rs` (5.10 to 5.17), which differ only in
// `LEGACY_KERNEL`. Included, not a module, so that the entry points stay at the
// crate root and the modules are the crate's own.

mod accounting;
mod address_filter;
mod affinity;
mod balancer;
mod checksum;
mod conntrack;
mod counters;
mod forward;
mod fragments;
mod headers;
mod icmp;
mod icmp6;
mod maps;
mod packet;
mod parse;
mod related;
mod scratch;
mod settings;
mod sock;
mod source_ranges;
mod translate;
mod tunnel;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

use crate::{
    icmp::Sender,
    packet::{Ipv6Packet, Packet, Program, SctpPacket, TcPacket, TunnelledV6, XdpPacket},
    sock::Hook,
    translate::{Action, Origin, Verdict},
    tunnel::Arrival,
};

/// Node uplinks: traffic from outside the node to NodePorts, LoadBalancer and external
/// IPs, and replies of masqueraded flows coming back from remote backends. Translated
/// packets continue into the kernel's forwarding path (XDP_PASS) by default, or leave
/// from XDP in redirect mode (see `forward` and the README for when each delivers).
/// IPIP packets whose inner packet is ours are decapsulated first (`tunnel`), and
/// `dsr-ipip` flows leave encapsulated.
#[xdp]
#[inline(always)]
pub fn uplink_ingress(ctx: XdpContext) -> u32 {
    let origin = match tunnel::arrival::<false>(&ctx) {
        Arrival::Bare => Origin::EXTERNAL,
        Arrival::Tunnelled(backend) => Origin::tunnel(backend),
        Arrival::Refused => return xdp_action::XDP_DROP,
    };
    let verdict = translate::handle(&XdpPacket(&ctx), origin);
    uplink_action::<false>(&ctx, verdict)
}

/// SCTP from the uplinks, tail-called by `uplink_ingress` (no IPIP: SCTP frontends are
/// never `dsr-ipip`).
#[xdp]
#[inline(always)]
pub fn uplink_ingress_sctp(ctx: XdpContext) -> u32 {
    let verdict = translate::handle(&SctpPacket(&XdpPacket(&ctx)), Origin::EXTERNAL);
    uplink_action::<false>(&ctx, verdict)
}

/// IPv6 from the uplinks, tail-called by `uplink_ingress`: the same pipeline for IPv6
/// packets. ip6ip6 goes to `uplink_ingress_tunnel6`.
#[xdp]
#[inline(always)]
pub fn uplink_ingress_v6(ctx: XdpContext) -> u32 {
    let pkt = Ipv6Packet(&XdpPacket(&ctx));
    if tunnel::is_ip6ip6(&pkt) {
        // Not handed over (the program is missing): as a protocol no frontend takes.
        pkt.hand_over(Program::Ipv6Tunnel);
    }
    let verdict = translate::handle(&pkt, Origin::EXTERNAL);
    uplink_action::<true>(&ctx, verdict)
}

/// ip6ip6 from the uplinks, tail-called by `uplink_ingress_v6`: decapsulated when its
/// inner packet is ours (`tunnel`) and translated as IPv4's tunnelled packets are. A
/// program of its own, as the tunnelled origin doubled the paths the verifier walks
/// through IPv6's pipeline (past a million instructions in `uplink_ingress_v6`).
#[xdp]
#[inline(always)]
pub fn uplink_ingress_tunnel6(ctx: XdpContext) -> u32 {
    let verdict = match tunnel::arrival::<true>(&ctx) {
        Arrival::Tunnelled(backend) => translate::handle(
            &TunnelledV6(&Ipv6Packet(&XdpPacket(&ctx))),
            Origin::tunnel(backend),
        ),
        // Not ours: as a protocol no frontend takes.
        Arrival::Bare => translate::other_protocol(&Ipv6Packet(&XdpPacket(&ctx)), Origin::EXTERNAL),
        Arrival::Refused => return xdp_action::XDP_DROP,
    };
    uplink_action::<true>(&ctx, verdict)
}

/// SCTP over IPv6 from the uplinks, tail-called by `uplink_ingress_v6`.
#[xdp]
#[inline(always)]
pub fn uplink_ingress_sctp6(ctx: XdpContext) -> u32 {
    let verdict = translate::handle(&SctpPacket(&Ipv6Packet(&XdpPacket(&ctx))), Origin::EXTERNAL);
    uplink_action::<true>(&ctx, verdict)
}

/// ICMPv6 from the uplinks, tail-called by `uplink_ingress_v6`: errors about our flows
/// translated back, refusals (`icmp6`).
#[xdp]
#[inline(always)]
pub fn uplink_ingress_icmp6(ctx: XdpContext) -> u32 {
    let verdict = icmp6::handle(&Ipv6Packet(&XdpPacket(&ctx)), Origin::EXTERNAL);
    uplink_action::<true>(&ctx, verdict)
}

/// What becomes of an uplink packet of the family's programs (`IPV6`).
#[inline(always)]
fn uplink_action<const IPV6: bool>(ctx: &XdpContext, verdict: Verdict) -> u32 {
    match verdict.action {
        Action::Encapsulate => tunnel::transmit::<IPV6>(ctx, &verdict.tuple, verdict.ip_len),
        Action::Translated if forward::xdp_redirect_enabled() => {
            forward::xdp_transmit(ctx, &verdict.tuple, verdict.ip_len)
        }
        Action::Pass | Action::Translated => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        Action::Refuse if IPV6 => icmp6::refuse_xdp(ctx),
        Action::Refuse => icmp::refuse_xdp(ctx),
    }
}

/// Host side of pod interfaces (tc ingress = packets the pod sends): pod-to-service
/// traffic and the replies of backend pods.
#[classifier]
#[inline(always)]
pub fn pod_ingress(ctx: TcContext) -> i32 {
    // Pull the headers into the linear area once if the skb starts short of them;
    // 128 bytes covers Ethernet, IPv4 with options and a TCP header with options.
    if ctx.data_end() - ctx.data() < 128 && ctx.len() > (ctx.data_end() - ctx.data()) as u32 {
        let _ = ctx.pull_data(ctx.len().min(128));
    }
    let verdict = translate::handle(&TcPacket(&ctx), Origin::POD);
    pod_action::<false>(&ctx, verdict)
}

/// SCTP from pods, tail-called by `pod_ingress` (after its pull of the headers).
#[classifier]
#[inline(always)]
pub fn pod_ingress_sctp(ctx: TcContext) -> i32 {
    let verdict = translate::handle(&SctpPacket(&TcPacket(&ctx)), Origin::POD);
    pod_action::<false>(&ctx, verdict)
}

/// IPv6 from pods, tail-called by `pod_ingress`. Its headers are longer (and may
/// carry extension headers): 256 bytes are pulled into the linear area.
#[classifier]
#[inline(always)]
pub fn pod_ingress_v6(ctx: TcContext) -> i32 {
    if ctx.data_end() - ctx.data() < 256 && ctx.len() > (ctx.data_end() - ctx.data()) as u32 {
        let _ = ctx.pull_data(ctx.len().min(256));
    }
    let verdict = translate::handle(&Ipv6Packet(&TcPacket(&ctx)), Origin::POD);
    pod_action::<true>(&ctx, verdict)
}

/// SCTP over IPv6 from pods, tail-called by `pod_ingress_v6`.
#[classifier]
#[inline(always)]
pub fn pod_ingress_sctp6(ctx: TcContext) -> i32 {
    let verdict = translate::handle(&SctpPacket(&Ipv6Packet(&TcPacket(&ctx))), Origin::POD);
    pod_action::<true>(&ctx, verdict)
}

/// ICMPv6 from pods, tail-called by `pod_ingress_v6`.
#[classifier]
#[inline(always)]
pub fn pod_ingress_icmp6(ctx: TcContext) -> i32 {
    let verdict = icmp6::handle(&Ipv6Packet(&TcPacket(&ctx)), Origin::POD);
    pod_action::<true>(&ctx, verdict)
}

/// What becomes of a pod's packet (`IPV6`: see `uplink_action`).
#[inline(always)]
fn pod_action<const IPV6: bool>(ctx: &TcContext, verdict: Verdict) -> i32 {
    match verdict.action {
        Action::Translated if verdict.node_source => {
            forward::redirect_to_egress(ctx, &verdict.tuple, verdict.ip_len)
        }
        Action::Pass | Action::Translated => TC_ACT_OK,
        Action::Refuse if IPV6 => icmp6::refuse_tc(ctx, Sender::Pod),
        Action::Refuse => icmp::refuse_tc(ctx, Sender::Pod),
        // Pod traffic is never direct-return (only external flows are).
        Action::Drop | Action::Encapsulate => TC_ACT_SHOT,
    }
}

/// Egress of uplinks and pod interfaces: an ICMP or ICMPv6 error the node itself sends
/// about a packet it forwarded after translation (fragmentation needed or packet too
/// big where the next hop's MTU is smaller, time exceeded) quotes the translated tuple; it is translated back
/// here, so that the client recognises its own packet and path-MTU discovery works
/// through every path. A ping of a service address from the node's own processes
/// (which no socket hook sees: ICMP sockets have none) is refused back into the node,
/// as pods' and outside clients' pings are, instead of leaving towards the default
/// gateway. Everything else leaves untouched.
#[classifier]
pub fn node_egress(ctx: TcContext) -> i32 {
    // The node is refused as a pod is: any service address but its own.
    let pkt = TcPacket(&ctx);
    if parse::is_ipv6(&pkt) {
        // Legacy kernels serve IPv4 only (see the loader): IPv6 passes, as before.
        if crate::LEGACY_KERNEL {
            return TC_ACT_OK;
        }
        return match icmp6::handle(&Ipv6Packet(&pkt), Origin::POD).action {
            Action::Drop => TC_ACT_SHOT,
            Action::Refuse => icmp6::refuse_tc(&ctx, Sender::Node),
            _ => TC_ACT_OK,
        };
    }
    match icmp::handle(&pkt, Origin::POD).action {
        Action::Drop => TC_ACT_SHOT,
        Action::Refuse => icmp::refuse_tc(&ctx, Sender::Node),
        _ => TC_ACT_OK,
    }
}

/// What a cgroup sock_addr hook returns: 1 lets the call go on, 0 fails it (with the
/// errno the program set, `sock::refuse`; EPERM if none).
/// The bool reached the exit through a 32-bit stack slot whose value the verifier
/// cannot bound to [0, 1]; hidden from LLVM (`black_box`), it is branched on and the
/// exit sees one of two constants.
#[inline(always)]
fn allow(allowed: bool) -> i32 {
    if core::hint::black_box(allowed) {
        1
    } else {
        0
    }
}

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    allow(sock::redirect(&ctx, Hook::V4, false))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    allow(sock::redirect(&ctx, Hook::V4, true))
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, Hook::V4);
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, Hook::V4);
    1
}

/// IPv6 sockets: IPv6 services, and IPv4 ones through IPv4-mapped addresses.
#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    allow(sock::redirect(&ctx, Hook::V6, false))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    allow(sock::redirect(&ctx, Hook::V6, true))
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, Hook::V6);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, Hook::V6);
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
