//! Traffic for tests that run beside it: a stop flag that also stops on a failed
//! assertion, spoofed SYNs sent from inside a namespace, a ping and packets of other
//! protocols, and the ICMP answer they get.

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use testbed::netns::{enter_current_thread, Netns};

use super::packets::{internet_checksum, tcp_packet, Tcp};

/// Sets its flag when dropped: a traffic thread in a `thread::scope` stops also when
/// an assertion fails (else the scope would wait for it for ever).
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs `body` on a thread inside `ns` (sockets it opens are the namespace's).
pub fn inside<T: Send + 'static>(ns: &Netns, body: impl FnOnce() -> T + Send + 'static) -> T {
    let path = ns.path();
    std::thread::spawn(move || {
        enter_current_thread(&path).expect("enter the namespace");
        body()
    })
    .join()
    .expect("thread inside the namespace")
}

/// Runs `body` on a thread inside `ns` with a raw IPv4 socket of `protocol`, which is
/// closed afterwards.
fn with_raw_socket<T: Send + 'static>(
    ns: &Netns,
    protocol: libc::c_int,
    body: impl FnOnce(libc::c_int) -> T + Send + 'static,
) -> T {
    inside(ns, move || {
        // SAFETY: a raw socket this thread owns and closes.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, protocol) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let result = body(fd);
        // SAFETY: closing the socket opened above.
        unsafe { libc::close(fd) };
        result
    })
}

/// Sends `packet` (an IP packet, or an ICMP message for an ICMP socket) to `to`;
/// whether all of it went.
fn send_to(fd: libc::c_int, packet: &[u8], to: [u8; 4]) -> bool {
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(to),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sending a buffer we own to an address we built.
    let sent = unsafe {
        libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const address).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    sent == packet.len() as isize
}

/// Sends `count` TCP SYNs to `target` from `ns` through a raw socket, each from
/// another forged source in 100.64.0.0/10 (no namespace has those addresses: the
/// answers die in the node). Paced (a pause every 200) so that the veth queues do
/// not drop them. Returns how many were sent.
pub fn spoofed_syns(ns: &Netns, target: ([u8; 4], u16), count: u32) -> u32 {
    with_raw_socket(ns, libc::IPPROTO_RAW, move |fd| {
        let mut sent = 0;
        for i in 0..count {
            let source = [100, 64 | ((i >> 16) as u8 & 63), (i >> 8) as u8, i as u8];
            let frame = tcp_packet((source, 1024 + (i % 60_000) as u16), target, Tcp::Syn, b"");
            // The IP packet: the Ethernet header off.
            if send_to(fd, &frame[14..], target.0) {
                sent += 1;
            }
            if i % 200 == 199 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        sent
    })
}

/// Sends `message` from `ns` to `to` as the payload of an IP packet of `protocol`
/// (through a raw socket) and returns the first ICMP message other than an echo
/// request that arrives within `wait`: (its source, type, code).
pub fn icmp_answer(
    ns: &Netns,
    to: Ipv4Addr,
    protocol: libc::c_int,
    message: Vec<u8>,
    wait: Duration,
) -> Option<(Ipv4Addr, u8, u8)> {
    with_raw_socket(ns, libc::IPPROTO_ICMP, move |icmp| {
        let timeout = libc::timeval {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_usec: wait.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: setting a socket option from a value we own.
        unsafe {
            libc::setsockopt(
                icmp,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        let sent = if protocol == libc::IPPROTO_ICMP {
            send_to(icmp, &message, to.octets())
        } else {
            // SAFETY: a raw socket of this thread (in the namespace), closed below.
            let other = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, protocol) };
            assert!(
                other >= 0,
                "raw socket: {}",
                std::io::Error::last_os_error()
            );
            let sent = send_to(other, &message, to.octets());
            // SAFETY: closing the socket opened above.
            unsafe { libc::close(other) };
            sent
        };
        if !sent {
            return None;
        }
        let mut answer = [0u8; 1500];
        loop {
            // SAFETY: receiving into a buffer we own.
            let n = unsafe { libc::recv(icmp, answer.as_mut_ptr().cast(), answer.len(), 0) };
            if n < 28 {
                return None;
            }
            let header = usize::from(answer[0] & 0x0f) * 4;
            let source = Ipv4Addr::new(answer[12], answer[13], answer[14], answer[15]);
            let (kind, code) = (answer[header], answer[header + 1]);
            if kind != 8 {
                return Some((source, kind, code));
            }
        }
    })
}

/// One ICMP echo request from `ns` to `to`, of `ping`'s default size (this machine
/// has no `ping` binary to rely on), and the first ICMP answer (`icmp_answer`).
pub fn ping(ns: &Netns, to: Ipv4Addr, wait: Duration) -> Option<(Ipv4Addr, u8, u8)> {
    // 56 bytes of data, as `ping` sends by default.
    let mut request = vec![0u8; 8 + 56];
    request[..8].copy_from_slice(&[8, 0, 0, 0, 0x13, 0x37, 0, 1]);
    let checksum = internet_checksum(&request).to_be_bytes();
    request[2..4].copy_from_slice(&checksum);
    icmp_answer(ns, to, libc::IPPROTO_ICMP, request, wait)
}
