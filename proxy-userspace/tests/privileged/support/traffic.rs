//! Traffic for tests that run beside it: a stop flag that also stops on a failed
//! assertion, and spoofed SYNs sent from inside a namespace.

use std::sync::atomic::{AtomicBool, Ordering};

use testbed::netns::{enter_current_thread, Netns};

use super::packets::{tcp_packet, Tcp};

/// Sets its flag when dropped: a traffic thread in a `thread::scope` stops also when
/// an assertion fails (else the scope would wait for it for ever).
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Sends `count` TCP SYNs to `target` from `ns` through a raw socket, each from
/// another forged source in 100.64.0.0/10 (no namespace has those addresses: the
/// answers die in the node). Paced (a pause every 200) so that the veth queues do
/// not drop them. Returns how many were sent.
pub fn spoofed_syns(ns: &Netns, target: ([u8; 4], u16), count: u32) -> u32 {
    let path = ns.path();
    std::thread::spawn(move || {
        enter_current_thread(&path).expect("enter the namespace");
        // SAFETY: a raw socket this thread owns and closes.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(target.0),
            },
            sin_zero: [0; 8],
        };
        let mut sent = 0;
        for i in 0..count {
            let source = [100, 64 | ((i >> 16) as u8 & 63), (i >> 8) as u8, i as u8];
            let frame = tcp_packet((source, 1024 + (i % 60_000) as u16), target, Tcp::Syn, b"");
            // The IP packet: the Ethernet header off.
            let packet = &frame[14..];
            // SAFETY: sending a buffer we own to an address we built.
            let n = unsafe {
                libc::sendto(
                    fd,
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const to).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if n == packet.len() as isize {
                sent += 1;
            }
            if i % 200 == 199 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        // SAFETY: closing the socket opened above.
        unsafe { libc::close(fd) };
        sent
    })
    .join()
    .expect("SYN sender")
}
