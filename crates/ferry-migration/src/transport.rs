//! Byte-stream transports: TCP and Unix sockets, one or more connections per migration,
//! optionally under mutually authenticated TLS ([`crate::tls`]), and an optional bandwidth
//! limit.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::thread;
use std::time::{Duration, Instant};

use crate::socket::Socket;
use crate::tls::{self, Role, Tls};

/// Connections one migration may use at most.
pub const CONNECTIONS_MAX: u16 = 16;

/// Where a destination listens or a source connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `tcp:HOST:PORT` or plain `HOST:PORT`.
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("`unix:` needs a socket path, e.g. unix:/run/ferry.sock".into());
            }
            return Ok(Self::Unix(path.into()));
        }
        let addr = s.strip_prefix("tcp:").unwrap_or(s);
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Self::Tcp(addr.to_owned()))
            }
            _ => Err(format!(
                "`{s}` is not an address: use HOST:PORT, tcp:HOST:PORT or unix:PATH"
            )),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp:{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// One connection, split into independently owned halves.
pub struct Connection {
    /// The receiving half.
    pub reader: Box<dyn Read + Send>,
    /// The sending half.
    pub writer: Box<dyn Write + Send>,
    closer: Closer,
    read_timeout: Box<dyn Fn(Option<Duration>) -> io::Result<()> + Send + Sync>,
    write_timeout: Box<dyn Fn(Option<Duration>) -> io::Result<()> + Send + Sync>,
}

/// Shuts a connection down from any thread, unblocking its reader and writer.
#[derive(Clone)]
pub struct Closer(std::sync::Arc<dyn Fn(Shutdown) + Send + Sync>);

impl Closer {
    /// Shuts the connection down in both directions.
    pub fn shutdown(&self) {
        (self.0)(Shutdown::Both)
    }

    /// Shuts down the receiving direction only: a blocked reader returns, and the
    /// connection can still carry a final error record to the peer.
    pub fn shutdown_read(&self) {
        (self.0)(Shutdown::Read)
    }
}

impl fmt::Debug for Closer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Closer")
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

impl Connection {
    /// Wraps a TCP stream (with Nagle off: records are written whole).
    pub fn from_tcp(s: TcpStream) -> io::Result<Self> {
        Self::tcp(s, None)
    }

    /// Wraps a Unix stream.
    pub fn from_unix(s: UnixStream) -> io::Result<Self> {
        Self::unix(s, None)
    }

    fn tcp(s: TcpStream, tls: Option<(&Tls, Role<'_>)>) -> io::Result<Self> {
        s.set_nodelay(true)?;
        Self::over(s, tls)
    }

    fn unix(s: UnixStream, tls: Option<(&Tls, Role<'_>)>) -> io::Result<Self> {
        Self::over(s, tls)
    }

    /// Wraps `s`, after a (bounded) TLS handshake in `role` when `tls` is given.
    fn over<S: Socket>(mut s: S, tls: Option<(&Tls, Role<'_>)>) -> io::Result<Self> {
        let (reader, writer): (Box<dyn Read + Send>, Box<dyn Write + Send>) = match tls {
            Some((tls, role)) => {
                let session = tls::handshake(tls, role, &mut s)?;
                let (r, w) = tls::split(session, &s)?;
                (Box::new(r), Box::new(w))
            }
            None => (Box::new(s.try_clone()?), Box::new(s.try_clone()?)),
        };
        let (c, t, w) = (s.try_clone()?, s.try_clone()?, s);
        Ok(Self {
            read_timeout: Box::new(move |d| t.set_read_timeout(d)),
            write_timeout: Box::new(move |d| w.set_write_timeout(d)),
            reader,
            writer,
            closer: Closer(std::sync::Arc::new(move |how| {
                let _ = c.shutdown(how);
            })),
        })
    }

    /// A connected pair of Unix-socket connections, for tests and in-process migration.
    pub fn pair() -> io::Result<(Self, Self)> {
        let (a, b) = UnixStream::pair()?;
        Ok((Self::from_unix(a)?, Self::from_unix(b)?))
    }

    /// Shuts the connection down in both directions.
    pub fn shutdown(&self) {
        self.closer.shutdown()
    }

    /// Makes reads fail after `timeout` without data (`None`: wait forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        (self.read_timeout)(timeout)
    }

    /// Makes a write that cannot make progress fail after `timeout` (`None`: block forever):
    /// a peer that stops reading then fails the migration instead of stalling it.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        (self.write_timeout)(timeout)
    }

    /// A handle that shuts this connection down from anywhere.
    pub fn closer(&self) -> Closer {
        self.closer.clone()
    }
}

/// Opens `count` connections to `endpoint`, each under TLS when `tls` is given (the
/// destination's certificate must name the endpoint's host, or the name set on `tls`).
pub fn connect(endpoint: &Endpoint, count: u16, tls: Option<&Tls>) -> io::Result<Vec<Connection>> {
    if count == 0 || count > CONNECTIONS_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("connections must be between 1 and {CONNECTIONS_MAX}, got {count}"),
        ));
    }
    (0..count)
        .map(|_| match endpoint {
            Endpoint::Tcp(a) => {
                let role = Role::Client {
                    host: tls::host_of(a),
                };
                Connection::tcp(TcpStream::connect(a)?, tls.map(|t| (t, role)))
            }
            Endpoint::Unix(p) => {
                // A Unix socket has no host name: the certificate must name "localhost" or
                // the name set on `tls`.
                let role = Role::Client { host: "localhost" };
                Connection::unix(UnixStream::connect(p)?, tls.map(|t| (t, role)))
            }
        })
        .collect()
}

/// A listening endpoint for the destination.
#[derive(Debug)]
pub struct Listener {
    socket: ListenSocket,
    tls: Option<Tls>,
}

#[derive(Debug)]
enum ListenSocket {
    Tcp(TcpListener),
    /// The path is removed when the listener is dropped.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Listens on `endpoint`. A Unix socket path that exists is an error, not replaced.
    pub fn bind(endpoint: &Endpoint) -> io::Result<Self> {
        let socket = match endpoint {
            Endpoint::Tcp(a) => ListenSocket::Tcp(TcpListener::bind(a)?),
            Endpoint::Unix(p) => ListenSocket::Unix(UnixListener::bind(p)?, p.clone()),
        };
        Ok(Self { socket, tls: None })
    }

    /// Requires TLS with a certificate signed by `tls`'s CA of every source. A peer that
    /// fails the handshake is logged and dropped, and the listener keeps waiting: a stranger
    /// cannot end a destination's wait, let alone feed it a VM.
    pub fn with_tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The endpoint actually bound (with the real port when port 0 was asked for).
    pub fn local_endpoint(&self) -> io::Result<Endpoint> {
        Ok(match &self.socket {
            ListenSocket::Tcp(l) => Endpoint::Tcp(l.local_addr()?.to_string()),
            ListenSocket::Unix(_, p) => Endpoint::Unix(p.clone()),
        })
    }

    /// Accepts one connection (with TLS: the first peer that passes the handshake).
    pub fn accept(&self) -> io::Result<Connection> {
        loop {
            let stream = match &self.socket {
                ListenSocket::Tcp(l) => Stream::Tcp(l.accept()?.0),
                ListenSocket::Unix(l, _) => Stream::Unix(l.accept()?.0),
            };
            if let Some(c) = self.establish(stream)? {
                return Ok(c);
            }
        }
    }

    /// Wraps an accepted stream; `None` when the peer failed the TLS handshake (logged).
    fn establish(&self, stream: Stream) -> io::Result<Option<Connection>> {
        let tls = self.tls.as_ref().map(|t| (t, Role::Server));
        let (peer, result) = match stream {
            Stream::Tcp(s) => (
                s.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
                Connection::tcp(s, tls),
            ),
            Stream::Unix(s) => ("a local process".to_owned(), Connection::unix(s, tls)),
        };
        match result {
            Ok(c) => Ok(Some(c)),
            Err(e) if self.tls.is_some() => {
                tracing::warn!("refused a connection from {peer}: {e}");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Accepts one connection, giving up at `deadline`.
    pub fn accept_until(&self, deadline: Instant) -> io::Result<Connection> {
        loop {
            let stream = self.accept_stream_until(deadline)?;
            if let Some(c) = self.establish(stream)? {
                return Ok(c);
            }
        }
    }

    fn accept_stream_until(&self, deadline: Instant) -> io::Result<Stream> {
        self.set_nonblocking(true)?;
        let result = loop {
            let r = match &self.socket {
                ListenSocket::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
                ListenSocket::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        break Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the source did not open all its connections in time",
                        ));
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                other => break other,
            }
        };
        self.set_nonblocking(false)?;
        let stream = result?;
        match &stream {
            Stream::Tcp(s) => s.set_nonblocking(false)?,
            Stream::Unix(s) => s.set_nonblocking(false)?,
        }
        Ok(stream)
    }

    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match &self.socket {
            ListenSocket::Tcp(l) => l.set_nonblocking(on),
            ListenSocket::Unix(l, _) => l.set_nonblocking(on),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenSocket::Unix(_, p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Limits the average send rate to a number of bytes per second.
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_s: u64,
    start: Instant,
    sent: u64,
}

/// The most a [`RateLimiter`] lets through at once after sending less than its rate: the
/// credit of idle time it keeps.
pub const RATE_BURST: Duration = Duration::from_millis(50);

impl RateLimiter {
    /// A limiter allowing `bytes_per_s` (must be non-zero), with bursts of at most
    /// [`RATE_BURST`] worth of bytes.
    pub fn new(bytes_per_s: u64) -> Self {
        Self {
            bytes_per_s: bytes_per_s.max(1),
            start: Instant::now(),
            sent: 0,
        }
    }

    /// Accounts for `bytes` about to be sent and sleeps until sending them keeps to the
    /// limit. Time spent sending less (a round of zero pages, a wait for the guest) earns
    /// at most [`RATE_BURST`] of credit: a limiter that averaged over the whole migration let
    /// a later round through at full speed after a quiet one (the lab saw 275 MB/s under a
    /// 16 MiB/s limit).
    pub fn consume(&mut self, bytes: u64) {
        let now = self.start.elapsed();
        let floor = now.saturating_sub(RATE_BURST).as_secs_f64() * self.bytes_per_s as f64;
        self.sent = self.sent.max(floor as u64) + bytes;
        let due = Duration::from_secs_f64(self.sent as f64 / self.bytes_per_s as f64);
        if let Some(wait) = due.checked_sub(now) {
            thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_limiter_lets_only_a_burst_through() {
        // 10 MB/s; idle for 300 ms, then 1 MB (100 ms worth): only RATE_BURST of the idle
        // time counts, so the limiter must hold the sender for the other 50 ms.
        let mut limiter = RateLimiter::new(10_000_000);
        thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        limiter.consume(1_000_000);
        assert!(
            t.elapsed() >= Duration::from_millis(40),
            "a burst past the limit went through at once: {:?}",
            t.elapsed()
        );
        // And the average still holds: 2 MB more take at least 200 ms.
        let t = Instant::now();
        limiter.consume(1_000_000);
        limiter.consume(1_000_000);
        assert!(
            t.elapsed() >= Duration::from_millis(190),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            "127.0.0.1:4000".parse(),
            Ok(Endpoint::Tcp("127.0.0.1:4000".into()))
        );
        assert_eq!(
            "tcp:[::1]:4000".parse(),
            Ok(Endpoint::Tcp("[::1]:4000".into()))
        );
        assert_eq!("unix:/tmp/x".parse(), Ok(Endpoint::Unix("/tmp/x".into())));
        for bad in ["", "unix:", "host", "host:port", ":80", "h:99999"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn connects_several_connections() {
        let l = Listener::bind(&"127.0.0.1:0".parse().unwrap()).unwrap();
        let ep = l.local_endpoint().unwrap();
        let t = thread::spawn(move || {
            let mut c = connect(&ep, 2, None).unwrap();
            c[1].writer.write_all(b"hi").unwrap();
        });
        let _a = l.accept().unwrap();
        let mut b = l.accept().unwrap();
        let mut buf = [0u8; 2];
        b.reader.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        t.join().unwrap();
        assert!(connect(&"127.0.0.1:1".parse().unwrap(), 0, None).is_err());
    }

    #[test]
    fn rate_limiter_spreads_sends() {
        let mut r = RateLimiter::new(1 << 20);
        let t = Instant::now();
        for _ in 0..4 {
            r.consume(64 << 10);
        }
        // 256 KiB at 1 MiB/s needs at least 250 ms; allow scheduling slack above.
        assert!(
            t.elapsed() >= Duration::from_millis(240),
            "{:?}",
            t.elapsed()
        );
    }
}
