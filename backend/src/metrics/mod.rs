//! Prometheus metrics: `GET /metrics` in the text exposition format
//! (version 0.0.4) on a TCP address or a UNIX socket (`--metrics`,
//! `[daemon] metrics`).
//!
//! A scrape reads the counters the queue threads already keep
//! (`QueueShared`: relaxed atomics) under the control-plane lock and
//! encodes them with `prometheus-client`'s custom collector
//! ([`collect`]); nothing is counted twice and the request path does not
//! know the metrics exist.
//!
//! The HTTP side is one thread that serves one connection at a time, each
//! within `METRICS_REQUEST_TIMEOUT_MS` from its accept to its last byte
//! written, a request head of at most `METRICS_MAX_REQUEST_BYTES` (parsed by
//! `httparse`), and `Connection: close`. Its allocations are counted apart
//! (`alloc::count_this_thread_as_metrics`), so the request path's proof of
//! no allocation holds while scraped. It stops with close-all: the thread is
//! joined and a UNIX socket file removed.

mod collect;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Weak;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};

use crate::config::MetricsAddr;
use crate::daemon::Daemon;
use crate::limits::{
    METRICS_ACCEPT_FAILURE_PAUSE_MS, METRICS_LINGER_MS, METRICS_MAX_REQUEST_BYTES,
    METRICS_REQUEST_TIMEOUT_MS,
};
use crate::logging::Throttle;
use crate::unix_socket::{self, BindError};

/// Mode of a UNIX metrics socket: owner only, like the control socket.
pub const METRICS_SOCKET_MODE: u32 = 0o600;

/// The `Content-Type` of a scrape's answer.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Why the metrics address could not be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// The TCP address could not be bound.
    #[error(
        "metrics address {addr}: cannot listen: {source}; choose another address with \
         --metrics or [daemon] metrics (port 0 picks a free one), or stop what listens there"
    )]
    BindTcp {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The UNIX socket could not be bound.
    #[error("metrics socket {path}: {source}; pass another path to --metrics or [daemon] metrics")]
    BindUnix {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: BindError,
    },
    /// The server's thread or its stop socket pair could not be made.
    #[error("metrics address {addr}: cannot start its server: {source}")]
    Start {
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The running metrics server.
#[derive(Debug)]
pub struct MetricsServer {
    /// Where it listens, as the ready line says it (`127.0.0.1:34567`, with
    /// the port the kernel picked for port 0; `unix:/path`).
    shown: String,
    unix_path: Option<PathBuf>,
    /// Closed to stop the server: its thread polls the other end.
    stop: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` and serves scrapes of `daemon` on a thread of its own.
    pub fn start(addr: &MetricsAddr, daemon: Weak<Daemon>) -> Result<MetricsServer, MetricsError> {
        let (listener, shown, unix_path) = match addr {
            MetricsAddr::Tcp(a) => {
                let l = TcpListener::bind(a)
                    .map_err(|source| MetricsError::BindTcp { addr: *a, source })?;
                let shown = l
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or(a.to_string());
                (Listener::Tcp(l), shown, None)
            }
            MetricsAddr::Unix(path) => {
                let l = unix_socket::bind(path, METRICS_SOCKET_MODE).map_err(|source| {
                    MetricsError::BindUnix {
                        path: path.clone(),
                        source,
                    }
                })?;
                (Listener::Unix(l), addr.to_string(), Some(path.clone()))
            }
        };
        let failed = |source| {
            if let Some(p) = &unix_path {
                let _ = std::fs::remove_file(p);
            }
            MetricsError::Start {
                addr: shown.clone(),
                source,
            }
        };
        listener.set_nonblocking().map_err(failed)?;
        let (stop, stop_seen) = UnixStream::pair().map_err(failed)?;
        let start_time = collect::process_start_time_seconds();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                crate::alloc::count_this_thread_as_metrics();
                let registry = collect::registry(daemon, start_time);
                serve(&listener, &stop_seen, &registry);
            })
            .map_err(failed)?;
        tracing::info!("metrics: serving GET /metrics on {shown}");
        Ok(MetricsServer {
            shown,
            unix_path,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens (`127.0.0.1:9412`, `unix:/run/sluice/metrics.sock`).
    pub fn addr(&self) -> &str {
        &self.shown
    }

    /// Stops serving: a scrape under way finishes (within its timeout), the
    /// thread is joined, a UNIX socket file removed.
    pub fn stop(mut self) {
        let _ = self.stop.shutdown(Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l) => l.set_nonblocking(true),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l) => l.as_fd(),
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Makes the next read or write wait at most until `deadline`; false
    /// once it has passed.
    fn bound_by(&self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let set = match self {
            Stream::Tcp(s) => s
                .set_read_timeout(Some(left))
                .and_then(|()| s.set_write_timeout(Some(left))),
            Stream::Unix(s) => s
                .set_read_timeout(Some(left))
                .and_then(|()| s.set_write_timeout(Some(left))),
        };
        set.is_ok()
    }

    fn set_blocking(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(false),
            Stream::Unix(s) => s.set_nonblocking(false),
        }
    }

    fn close(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The server's loop: waits for a connection or the stop (the other end
/// of `stop` shut down), and
/// serves each connection to its end before the next.
fn serve(listener: &Listener, stop: &UnixStream, registry: &prometheus_client::registry::Registry) {
    let mut accept_log = Throttle::per_ms(crate::limits::ACCEPT_FAILURE_LOG_INTERVAL_MS);
    loop {
        let mut fds = [
            PollFd::from_borrowed_fd(listener.fd(), PollFlags::IN),
            PollFd::new(stop, PollFlags::IN),
        ];
        if rustix::event::poll(&mut fds, None).is_err() {
            continue;
        }
        if !fds[1].revents().is_empty() {
            return;
        }
        match listener.accept() {
            Ok(mut stream) => answer(&mut stream, registry),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of descriptors, most likely: the listener stays
                // readable, so pause (still hearing the stop) instead of
                // spinning.
                if let Some(suppressed) = accept_log.allow() {
                    tracing::warn!(suppressed, "metrics: cannot accept a connection: {e}");
                }
                let pause = Timespec {
                    tv_sec: 0,
                    tv_nsec: (METRICS_ACCEPT_FAILURE_PAUSE_MS * 1_000_000) as _,
                };
                let mut fds = [PollFd::new(stop, PollFlags::IN)];
                let _ = rustix::event::poll(&mut fds, Some(&pause));
            }
        }
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    /// `GET /metrics` (`head`: `HEAD /metrics`, headers only).
    Metrics { head: bool },
    /// Another path.
    NotFound,
    /// Another method.
    BadMethod,
    /// Not HTTP, or a head too long.
    Malformed,
}

/// Reads a request head and answers it; the connection then closes. The
/// whole exchange is bounded by `METRICS_REQUEST_TIMEOUT_MS`.
fn answer(stream: &mut Stream, registry: &prometheus_client::registry::Registry) {
    let deadline = Instant::now() + Duration::from_millis(METRICS_REQUEST_TIMEOUT_MS);
    if stream.set_blocking().is_err() {
        return;
    }
    let Some(asked) = read_head(stream, deadline) else {
        // Timed out or hung up before a whole head: nobody to answer.
        stream.close();
        return;
    };
    let (status, body, content_type) = match asked {
        Asked::Metrics { .. } => {
            let mut text = String::new();
            match prometheus_client::encoding::prometheus_text::encode(&mut text, registry) {
                Ok(()) => ("200 OK", text, CONTENT_TYPE),
                Err(_) => (
                    "500 Internal Server Error",
                    "cannot encode the metrics\n".into(),
                    "text/plain; charset=utf-8",
                ),
            }
        }
        Asked::NotFound => (
            "404 Not Found",
            "sluice serves its metrics at /metrics\n".into(),
            "text/plain; charset=utf-8",
        ),
        Asked::BadMethod => (
            "405 Method Not Allowed",
            "use GET /metrics\n".into(),
            "text/plain; charset=utf-8",
        ),
        Asked::Malformed => (
            "400 Bad Request",
            "not an HTTP request sluice understands; use GET /metrics\n".into(),
            "text/plain; charset=utf-8",
        ),
    };
    let allow = if asked == Asked::BadMethod {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}\
         Connection: close\r\n\r\n",
        body.len()
    );
    let with_body = !matches!(asked, Asked::Metrics { head: true });
    let written =
        write_all_by(stream, header.as_bytes(), deadline).and_then(|()| match with_body {
            true => write_all_by(stream, body.as_bytes(), deadline),
            false => Ok(()),
        });
    if written.is_ok() {
        linger(stream, deadline);
    }
    stream.close();
}

/// Closes our side for writing and reads what the client still sends
/// until it closes (at most `METRICS_LINGER_MS`, and never past
/// `deadline`): closing a socket with unread input resets the connection,
/// and the client could lose the answer (a head too long, a body we did
/// not read).
fn linger(stream: &mut Stream, deadline: Instant) {
    let _ = match stream {
        Stream::Tcp(s) => s.shutdown(Shutdown::Write),
        Stream::Unix(s) => s.shutdown(Shutdown::Write),
    };
    let until = deadline.min(Instant::now() + Duration::from_millis(METRICS_LINGER_MS));
    let mut sink = [0u8; 4096];
    while stream.bound_by(until) {
        match stream.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Reads until the end of the request head (or `METRICS_MAX_REQUEST_BYTES`)
/// and says what it asks for; `None` if the client hung up or the deadline
/// passed first.
fn read_head(stream: &mut Stream, deadline: Instant) -> Option<Asked> {
    let mut buf = [0u8; METRICS_MAX_REQUEST_BYTES];
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Some(Asked::Malformed);
        }
        if !stream.bound_by(deadline) {
            return None;
        }
        match stream.read(&mut buf[len..]) {
            Ok(0) => return None,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
        if let Some(asked) = parse_head(&buf[..len]) {
            return Some(asked);
        }
    }
}

/// What a (possibly partial) request head asks for; `None` while it is
/// incomplete.
fn parse_head(bytes: &[u8]) -> Option<Asked> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Partial) => None,
        Err(_) => Some(Asked::Malformed),
        Ok(httparse::Status::Complete(_)) => {
            let path = req.path.unwrap_or_default();
            let path = path.split_once('?').map_or(path, |(p, _)| p);
            Some(match req.method.unwrap_or_default() {
                "GET" | "HEAD" if path != "/metrics" => Asked::NotFound,
                "GET" => Asked::Metrics { head: false },
                "HEAD" => Asked::Metrics { head: true },
                _ => Asked::BadMethod,
            })
        }
    }
}

/// `write_all`, each write bounded by what is left until `deadline`.
fn write_all_by(stream: &mut Stream, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    while !bytes.is_empty() {
        if !stream.bound_by(deadline) {
            return Err(io::ErrorKind::TimedOut.into());
        }
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        let cases: [(&[u8], Option<Asked>); 9] = [
            (
                b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                Some(Asked::Metrics { head: false }),
            ),
            (
                b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n",
                Some(Asked::Metrics { head: false }),
            ),
            (
                b"HEAD /metrics HTTP/1.1\r\n\r\n",
                Some(Asked::Metrics { head: true }),
            ),
            (b"GET / HTTP/1.1\r\n\r\n", Some(Asked::NotFound)),
            (b"GET /metrics/x HTTP/1.1\r\n\r\n", Some(Asked::NotFound)),
            (b"POST /metrics HTTP/1.1\r\n\r\n", Some(Asked::BadMethod)),
            (b"GET /metrics HTTP/1.1\r\nHost", None),
            (
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                Some(Asked::Malformed),
            ),
            (b"GET /metrics HTTP/9.9\r\n\r\n", Some(Asked::Malformed)),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                parse_head(bytes),
                want,
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}
