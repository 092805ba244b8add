//! The kernel's own connection tracking (`nf_conntrack`), read and pruned over
//! ctnetlink: the flows kube-proxy translated, by its iptables and nftables rules'
//! DNAT, or by IPVS, which with `net.ipv4.vs.conntrack=1` (kube-proxy sets it) writes
//! the real server into the entry's reply tuple.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
};

use anyhow::{bail, Context as _, Result};
use netlink_packet_core_netfilter::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
};
use netlink_packet_netfilter::{
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple, Tuple,
    },
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr as NetlinkAddr};
use tracing::warn;

/// How long an answer of the kernel may take, in seconds.
const RECEIVE_TIMEOUT_S: libc::time_t = 10;
/// Listings taken when the kernel says each changed under it.
const DUMP_ATTEMPTS: u32 = 3;

/// One flow whose destination was translated: the tuple each direction carries on
/// the wire, as `conntrack -L` prints them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatFlow {
    /// IP protocol number.
    pub protocol: u8,
    /// (source, destination) as the client sent it: to the service's frontend.
    pub original: (SocketAddr, SocketAddr),
    /// (source, destination) as the backend answers: from the backend, to the client
    /// or, when masqueraded, to the address and port netfilter gave it.
    pub reply: (SocketAddr, SocketAddr),
    /// `TCP_CONNTRACK_*` for TCP flows.
    pub tcp_state: Option<u8>,
    /// A FIN was seen from the client (`fin.0`), from the backend (`fin.1`).
    pub fin: (bool, bool),
    /// Seconds netfilter would keep the flow if it saw nothing more.
    pub timeout_s: u32,
}

/// A ctnetlink socket of the agent's network namespace.
pub struct Conntrack {
    socket: Socket,
    sequence: u32,
}

impl Conntrack {
    pub fn open() -> Result<Conntrack> {
        let mut socket = Socket::new(NETLINK_NETFILTER).context("a ctnetlink socket")?;
        socket.bind_auto()?;
        socket.connect(&NetlinkAddr::new(0, 0))?;
        // A kernel that never answers must not hold the agent's start.
        let timeout = libc::timeval {
            tv_sec: RECEIVE_TIMEOUT_S,
            tv_usec: 0,
        };
        // SAFETY: setsockopt on the socket we own, with a timeval of the given size.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(std::io::Error::last_os_error()).context("SO_RCVTIMEO");
        }
        Ok(Conntrack {
            socket,
            sequence: 0,
        })
    }

    /// Every flow of either family whose destination was translated: its answers
    /// come from elsewhere than where it was sent (a DNAT rule's flows, IPVS's).
    /// A listing the kernel says changed under it is taken again, a few times.
    pub fn translated_flows(&mut self) -> Result<Vec<NatFlow>> {
        let mut attempt = 1;
        loop {
            let mut flows = Vec::new();
            let request = ConntrackMessage::Get(Vec::new());
            let interrupted = self
                .exchange(
                    NetfilterProtoFamily::Unspec,
                    request,
                    NLM_F_DUMP,
                    |message| {
                        if let ConntrackMessage::New(attributes) = message {
                            flows.extend(nat_flow(&attributes));
                        }
                    },
                )
                .context("listing nf_conntrack")?;
            if !interrupted || attempt == DUMP_ATTEMPTS {
                if interrupted {
                    warn!("nf_conntrack changed during each of {DUMP_ATTEMPTS} listings; the last one is used");
                }
                return Ok(flows);
            }
            attempt += 1;
        }
    }

    /// Forgets `flow` (by its original tuple); one already gone is no error.
    pub fn delete(&mut self, flow: &NatFlow) -> Result<()> {
        let family = match flow.original.0.ip() {
            IpAddr::V4(_) => NetfilterProtoFamily::IPv4,
            IpAddr::V6(_) => NetfilterProtoFamily::IPv6,
        };
        let tuple = ConntrackAttribute::CtaTupleOrig(vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(flow.original.0.ip()),
                IPTuple::DestinationAddress(flow.original.1.ip()),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(flow.protocol.into()),
                ProtoTuple::SourcePort(flow.original.0.port()),
                ProtoTuple::DestinationPort(flow.original.1.port()),
            ]),
        ]);
        match self.exchange(
            family,
            ConntrackMessage::Delete(vec![tuple]),
            NLM_F_ACK,
            |_| {},
        ) {
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(()),
            other => other.map(|_interrupted| ()),
        }
    }

    /// Sends one request and reads its answers to the end (the dump's DONE, or the
    /// acknowledgement), handing each conntrack message to `each`; whether the kernel
    /// said a dump was interrupted (the table changed under it).
    fn exchange(
        &mut self,
        family: NetfilterProtoFamily,
        request: ConntrackMessage,
        flags: u16,
        mut each: impl FnMut(ConntrackMessage),
    ) -> Result<bool> {
        let mut interrupted = false;
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.sequence;
        let inner = NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), request);
        let mut message = NetlinkMessage::new(header, NetlinkPayload::from(inner));
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        loop {
            let (datagram, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < datagram.len() {
                let answer = NetlinkMessage::<NetfilterMessage>::deserialize(&datagram[offset..])
                    .context("a ctnetlink answer")?;
                let length = answer.header.length as usize;
                if length == 0 {
                    bail!("a ctnetlink answer of length 0");
                }
                offset += length;
                if answer.header.sequence_number != self.sequence {
                    continue;
                }
                interrupted |= answer.header.flags & NLM_F_DUMP_INTR != 0;
                match answer.payload {
                    NetlinkPayload::Done(done) if done.code < 0 => {
                        return Err(std::io::Error::from_raw_os_error(-done.code).into())
                    }
                    NetlinkPayload::Done(_) => return Ok(interrupted),
                    NetlinkPayload::Error(error) => match error.code {
                        None => return Ok(interrupted),
                        Some(code) => {
                            return Err(std::io::Error::from_raw_os_error(-code.get()).into())
                        }
                    },
                    NetlinkPayload::InnerMessage(NetfilterMessage {
                        inner: NetfilterMessageInner::Conntrack(message),
                        ..
                    }) => each(message),
                    _ => {}
                }
            }
        }
    }
}

fn is_errno(e: &anyhow::Error, errno: i32) -> bool {
    e.downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::raw_os_error)
        == Some(errno)
}

/// The flow an entry of the dump describes, if its destination was translated (not
/// only its source: a masquerade alone is not a service's).
fn nat_flow(attributes: &[ConntrackAttribute]) -> Option<NatFlow> {
    let mut original = None;
    let mut reply = None;
    let mut tcp = TcpInfo::default();
    let mut timeout_s = 0;
    for attribute in attributes {
        match attribute {
            ConntrackAttribute::CtaTupleOrig(tuple) => original = endpoints(tuple),
            ConntrackAttribute::CtaTupleReply(tuple) => reply = endpoints(tuple),
            ConntrackAttribute::CtaTimeout(seconds) => timeout_s = *seconds,
            ConntrackAttribute::CtaProtoInfo(info) => tcp = tcp_info(info),
            _ => {}
        }
    }
    let ((protocol, original), (_, reply)) = (original?, reply?);
    (reply.0 != original.1).then_some(NatFlow {
        protocol,
        original,
        reply,
        tcp_state: tcp.state,
        fin: (tcp.fin_original, tcp.fin_reply),
        timeout_s,
    })
}

/// (protocol, (source, destination)) of a tuple with ports.
fn endpoints(tuple: &[Tuple]) -> Option<(u8, (SocketAddr, SocketAddr))> {
    let (mut src, mut dst, mut protocol, mut sport, mut dport) = (None, None, None, None, None);
    for part in tuple {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(fields) => {
                for field in fields {
                    match field {
                        ProtoTuple::Protocol(p) => protocol = Some(u8::from(*p)),
                        ProtoTuple::SourcePort(p) => sport = Some(*p),
                        ProtoTuple::DestinationPort(p) => dport = Some(*p),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((
        protocol?,
        (SocketAddr::new(src?, sport?), SocketAddr::new(dst?, dport?)),
    ))
}

/// What netfilter says of a TCP flow.
#[derive(Default)]
struct TcpInfo {
    state: Option<u8>,
    fin_original: bool,
    fin_reply: bool,
}

/// `IP_CT_TCP_FLAG_CLOSE_INIT`: this direction sent a FIN.
const CLOSE_INIT: u8 = 0x04;

fn tcp_info(info: &[ProtoInfo]) -> TcpInfo {
    let mut tcp = TcpInfo::default();
    let fields = info.iter().flat_map(|i| match i {
        ProtoInfo::TCP(fields) => fields.as_slice(),
        _ => &[],
    });
    for field in fields {
        match field {
            ProtoInfoTCP::State(state) => tcp.state = Some(*state),
            ProtoInfoTCP::OriginalFlags(f) => tcp.fin_original = f.flags & CLOSE_INIT != 0,
            ProtoInfoTCP::ReplyFlags(f) => tcp.fin_reply = f.flags & CLOSE_INIT != 0,
            _ => {}
        }
    }
    tcp
}
