//! Real servers inside pod namespaces, one thread each: HTTP (keep-alive), a UDP
//! responder and a TFTP server (which, like every TFTP server, answers from a new
//! port). Each names its pod and the client address it saw, so tests can tell which
//! backend answered and whether the source was masqueraded.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Result;

use super::netns::{enter_current_thread, Netns};

pub const HTTP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 5353;
pub const TFTP_PORT: u16 = 69;
/// Size of the file every TFTP server serves: several 512-byte blocks.
pub const TFTP_FILE_LEN: usize = 1800;

/// What a server answers: `pod=<name> client=<addr:port>`. The servers' sockets are
/// dual-stack: an IPv4 client, which they see as `::ffff:a.b.c.d`, is named as IPv4.
pub fn greeting(pod: &str, peer: SocketAddr) -> String {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    format!("pod={pod} client={peer}\n")
}

/// The pod and the client address a `greeting` names (at its start: a TFTP file
/// repeats it).
pub fn parse_greeting(text: &str) -> Option<(String, SocketAddr)> {
    let mut words = text.split_whitespace();
    let pod = words.next()?.strip_prefix("pod=")?.to_owned();
    let client = words.next()?.strip_prefix("client=")?.parse().ok()?;
    Some((pod, client))
}

pub struct PodServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

const POLL: Duration = Duration::from_millis(50);

impl PodServers {
    /// Starts the three servers inside `ns`, answering as `pod`. Returns once they
    /// are bound.
    pub fn start(ns: &Netns, pod: &str) -> Result<PodServers> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for kind in [Kind::Http, Kind::Udp, Kind::Tftp] {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (ns_path, pod, stop) = (ns.path(), pod.to_owned(), stop.clone());
            threads.push(std::thread::spawn(move || {
                match enter_current_thread(&ns_path).and_then(|()| kind.bind()) {
                    Ok(socket) => {
                        let _ = ready_tx.send(Ok(()));
                        socket.serve(&pod, &stop);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            }));
            ready_rx.recv()??;
        }
        Ok(PodServers { stop, threads })
    }
}

impl Drop for PodServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Http,
    Udp,
    Tftp,
}

enum Bound {
    Http(TcpListener),
    Udp(UdpSocket),
    Tftp(UdpSocket),
}

impl Kind {
    fn bind(self) -> Result<Bound> {
        Ok(match self {
            Kind::Http => {
                let listener = TcpListener::bind(("::", HTTP_PORT))?;
                listener.set_nonblocking(true)?;
                Bound::Http(listener)
            }
            Kind::Udp => {
                let socket = UdpSocket::bind(("::", UDP_PORT))?;
                socket.set_read_timeout(Some(POLL))?;
                Bound::Udp(socket)
            }
            Kind::Tftp => {
                let socket = UdpSocket::bind(("::", TFTP_PORT))?;
                socket.set_read_timeout(Some(POLL))?;
                Bound::Tftp(socket)
            }
        })
    }
}

impl Bound {
    fn serve(self, pod: &str, stop: &AtomicBool) {
        match self {
            Bound::Http(listener) => serve_http(listener, pod, stop),
            Bound::Udp(socket) => serve_udp(socket, pod, stop),
            Bound::Tftp(socket) => serve_tftp(socket, pod, stop),
        }
    }
}

fn serve_http(listener: TcpListener, pod: &str, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        // Wait for a connection, or for POLL to pass so that `stop` is seen.
        let mut pending = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid descriptor.
        if unsafe { libc::poll(&mut pending, 1, POLL.as_millis() as i32) } <= 0 {
            continue;
        }
        if let Ok((stream, peer)) = listener.accept() {
            let pod = pod.to_owned();
            std::thread::spawn(move || {
                let _ = http_connection(stream, &pod, peer);
            });
        }
    }
}

/// The largest `/bytes/N` answer.
const MAX_BLOB: usize = 64 << 20;

/// The content of `GET /bytes/N`: a pattern that a lost, repeated or reordered
/// segment would break (its period, 251, is prime to every segment size).
pub fn blob(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Answers requests on one connection until the client closes it (keep-alive).
fn http_connection(stream: TcpStream, pod: &str, peer: SocketAddr) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    // Idle keep-alive connections last 5 minutes: a test holds one across an agent's
    // restart, which takes about 35 s on the kernel matrix's emulated 5.10.
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut close = false;
        let mut body_len = 0u64;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
                break;
            }
            let header = header.to_ascii_lowercase();
            if header.starts_with("connection: close") {
                close = true;
            }
            if let Some(len) = header.strip_prefix("content-length:") {
                body_len = len.trim().parse().unwrap_or(0);
            }
        }
        // A request body (an upload) is read whole and dropped.
        std::io::copy(&mut (&mut reader).take(body_len), &mut std::io::sink())?;
        // `GET /bytes/N`: N bytes of `blob`, for long transfers; anything else: the
        // greeting.
        let body = match request_line
            .split_whitespace()
            .nth(1)
            .and_then(|path| path.strip_prefix("/bytes/"))
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(len) => blob(len.min(MAX_BLOB)),
            None => greeting(pod, peer).into_bytes(),
        };
        // One write: `write!` would send the parts as separate segments, and Nagle's
        // algorithm would hold the second until the client's delayed ACK (40 ms).
        let mut response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        response.extend_from_slice(&body);
        writer.write_all(&response)?;
        if close {
            return Ok(());
        }
    }
}

/// Answers every datagram with the greeting, padded with dots to the question's
/// length when the question is longer: a datagram too large for one frame gets an
/// answer that is fragmented too.
fn serve_udp(socket: UdpSocket, pod: &str, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((len, peer)) = socket.recv_from(&mut buf) {
            let mut answer = greeting(pod, peer).into_bytes();
            if len > answer.len() {
                answer.resize(len, b'.');
            }
            let _ = socket.send_to(&answer, peer);
        }
    }
}

/// Read requests only (RFC 1350), octet mode, any file name: the content is the
/// greeting repeated to `TFTP_FILE_LEN` bytes.
fn serve_tftp(socket: UdpSocket, pod: &str, stop: &AtomicBool) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        let Ok((len, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if len < 4 || buf[..2] != [0, 1] {
            continue;
        }
        let greeting = greeting(pod, peer);
        let content: Vec<u8> = greeting.bytes().cycle().take(TFTP_FILE_LEN).collect();
        // A new socket, hence a new source port: the transfer's own TID.
        let _ = tftp_transfer(&content, peer);
    }
}

fn tftp_transfer(content: &[u8], peer: SocketAddr) -> std::io::Result<()> {
    let socket = UdpSocket::bind(("::", 0))?;
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    // Blocks of 512 bytes; a final short (possibly empty) block ends the transfer.
    let blocks = content.len() / 512 + 1;
    for index in 0..blocks {
        let block = (index + 1) as u16;
        let chunk = &content[index * 512..content.len().min((index + 1) * 512)];
        let mut packet = vec![0, 3];
        packet.extend_from_slice(&block.to_be_bytes());
        packet.extend_from_slice(chunk);
        let mut acked = false;
        for _attempt in 0..5 {
            socket.send_to(&packet, peer)?;
            let mut ack = [0u8; 16];
            if let Ok((n, from)) = socket.recv_from(&mut ack) {
                if from == peer && n >= 4 && ack[..2] == [0, 4] && ack[2..4] == block.to_be_bytes()
                {
                    acked = true;
                    break;
                }
            }
        }
        if !acked {
            return Err(std::io::Error::other("tftp: no ack"));
        }
    }
    Ok(())
}

/// A keep-alive HTTP client connection opened from inside a namespace: for tests
/// that need one connection to outlive changes to the services.
pub struct HttpConnection {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl HttpConnection {
    pub fn open(ns: &Netns, target: SocketAddr) -> Result<HttpConnection> {
        let ns_path = ns.path();
        let connected = std::thread::spawn(move || {
            enter_current_thread(&ns_path)
                .and_then(|()| Ok(TcpStream::connect_timeout(&target, Duration::from_secs(5))?))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("connect thread panicked"))??;
        HttpConnection::over(connected)
    }

    /// A connection over a stream the caller connected (from a port of its choice).
    pub fn over(connected: TcpStream) -> Result<HttpConnection> {
        connected.set_read_timeout(Some(Duration::from_secs(5)))?;
        connected.set_nodelay(true)?;
        let reader = BufReader::new(connected.try_clone()?);
        Ok(HttpConnection {
            stream: connected,
            reader,
        })
    }

    /// One request on the kept-alive connection; returns the body.
    pub fn get(&mut self) -> Result<String> {
        self.stream
            .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")?;
        let mut content_length = 0;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                anyhow::bail!("connection closed");
            }
            if line.trim().is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                content_length = v.trim().parse()?;
            }
        }
        let mut body = vec![0u8; content_length];
        self.reader.read_exact(&mut body)?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}
