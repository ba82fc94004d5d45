//! Mutually authenticated, encrypted migration connections (TLS 1.3, rustls with *ring*).
//!
//! Both ends hold a certificate and key signed by a CA they both trust (the files an operator
//! already has for QEMU's `tls-creds-x509` or Cloud Hypervisor's TLS directory): the source
//! checks the destination's certificate against the CA and the name it connects to, the
//! destination refuses a source without a certificate from that CA. Only TLS 1.3 is offered.
//!
//! A migration connection is used by two threads at once (one sends, one reads the peer's
//! replies), but a rustls session is one state machine. [`split`] shares it behind a mutex that
//! is never held across socket I/O: each half moves ciphertext between the socket and its own
//! buffer without the lock and takes the lock only to encrypt or decrypt, so a send blocked on
//! a full socket never stops the other half from reading (the idea of the `rustls-split`
//! crate, written anew for rustls 0.23). Socket timeouts and shutdown act on the socket as
//! without TLS.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use crate::socket::Socket;

/// How long a TLS handshake may take before the connection is given up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Ciphertext read from the socket in one go.
const READ_CHUNK: usize = 64 << 10;

/// Why TLS credentials cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file cannot be read or holds nothing usable.
    #[error("TLS {what} {path}: {reason}")]
    File {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// rustls refuses the credentials (e.g. a key that does not match the certificate).
    #[error("TLS credentials refused: {0}")]
    Credentials(String),
    /// The name to check the destination's certificate against is not a DNS name or IP.
    #[error("`{0}` is not a DNS name or IP address a certificate can be checked against")]
    ServerName(String),
}

/// The PEM files of one end: its certificate chain, its private key and the CA that signs
/// its peers' certificates.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Path of this end's certificate (chain), a PEM file.
    pub cert: PathBuf,
    /// Path of this end's private key, a PEM file (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Path of the CA certificate(s) the peer's certificate must chain to, a PEM file.
    pub ca: PathBuf,
}

/// TLS settings for both roles, loaded once and shared by every connection.
#[derive(Clone)]
pub struct Tls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    server_name: Option<ServerName<'static>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads the PEM files of `files`.
    pub fn from_files(files: &TlsFiles) -> Result<Self, TlsError> {
        let read = |what, path: &Path| {
            std::fs::read(path).map_err(|e| TlsError::File {
                what,
                path: path.to_owned(),
                reason: e.to_string(),
            })
        };
        let cert = read("certificate", &files.cert)?;
        let key = read("key", &files.key)?;
        let ca = read("CA certificate", &files.ca)?;
        Self::from_pem(&cert, &key, &ca).map_err(|e| match e {
            TlsError::File { what, reason, .. } => TlsError::File {
                what,
                path: match what {
                    "certificate" => files.cert.clone(),
                    "key" => files.key.clone(),
                    _ => files.ca.clone(),
                },
                reason,
            },
            other => other,
        })
    }

    /// Builds the settings from PEM text (for files, see [`Tls::from_files`]).
    pub fn from_pem(cert: &[u8], key: &[u8], ca: &[u8]) -> Result<Self, TlsError> {
        let pem_err = |what, reason: String| TlsError::File {
            what,
            path: PathBuf::from("(PEM)"),
            reason,
        };
        let certs = certificates(cert).map_err(|r| pem_err("certificate", r))?;
        let cas = certificates(ca).map_err(|r| pem_err("CA certificate", r))?;
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| pem_err("key", format!("no private key in PEM form ({e})")))?;
        let mut roots = RootCertStore::empty();
        for c in cas {
            roots
                .add(c)
                .map_err(|e| pem_err("CA certificate", e.to_string()))?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let refused = |e: rustls::Error| TlsError::Credentials(e.to_string());

        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(refused)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(certs.clone(), key.clone_key())
            .map_err(refused)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| TlsError::Credentials(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(refused)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(refused)?;
        // A migration never resumes a session: no tickets to send or store.
        server.send_tls13_tickets = 0;
        Ok(Self {
            client: Arc::new(client),
            server: Arc::new(server),
            server_name: None,
        })
    }

    /// Checks the destination's certificate against `name` instead of the host part of the
    /// address the source connects to (e.g. when connecting to an IP address the certificate
    /// does not name).
    pub fn with_server_name(mut self, name: &str) -> Result<Self, TlsError> {
        self.server_name = Some(server_name(name)?);
        Ok(self)
    }

    /// The name the destination at `host` must prove.
    fn name_for(&self, host: &str) -> io::Result<ServerName<'static>> {
        match &self.server_name {
            Some(n) => Ok(n.clone()),
            None => server_name(host)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string())),
        }
    }
}

fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM ({e})"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_owned()).map_err(|_| TlsError::ServerName(name.to_owned()))
}

/// The host part of a `HOST:PORT` address (`[::1]:80` gives `::1`).
pub(crate) fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// The role of this end in a handshake.
pub(crate) enum Role<'a> {
    /// The source: connects to `host`.
    Client { host: &'a str },
    /// The destination: accepted the connection.
    Server,
}

/// Runs the handshake on `sock` (bounded by [`HANDSHAKE_TIMEOUT`]) and returns the session.
pub(crate) fn handshake<S: Socket>(
    tls: &Tls,
    role: Role<'_>,
    sock: &mut S,
) -> io::Result<rustls::Connection> {
    let role_is_server = matches!(role, Role::Server);
    let mut conn: rustls::Connection = match role {
        Role::Client { host } => ClientConnection::new(tls.client.clone(), tls.name_for(host)?)
            .map_err(|e| handshake_error(&e))?
            .into(),
        Role::Server => ServerConnection::new(tls.server.clone())
            .map_err(|e| handshake_error(&e))?
            .into(),
    };
    sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    sock.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let done = run_handshake(&mut conn, role_is_server, sock);
    if done.is_err() && role_is_server {
        linger(&mut conn, sock);
    }
    done?;
    sock.set_read_timeout(None)?;
    sock.set_write_timeout(None)?;
    Ok(conn)
}

/// How long a destination that refused a handshake keeps reading what the peer sent before
/// it closes. Closing a socket with unread data resets the connection, and a reset can
/// destroy the alert sent just before it: a plain source, which sends its hello right after
/// its preamble, then saw "connection reset" instead of "the destination speaks TLS".
const LINGER: Duration = Duration::from_millis(250);
/// The most a refused peer's data read while lingering.
const LINGER_BYTES: usize = 1 << 20;

/// Sends what rustls queued (its alert), ends this direction, and reads the peer's data until
/// it closes too, at most [`LINGER`] and [`LINGER_BYTES`].
fn linger<S: Socket>(conn: &mut rustls::Connection, sock: &mut S) {
    while conn.wants_write() {
        if conn.write_tls(sock).is_err() {
            break;
        }
    }
    let _ = sock.flush();
    let _ = sock.shutdown(std::net::Shutdown::Write);
    let deadline = std::time::Instant::now() + LINGER;
    let mut buf = [0u8; 16 << 10];
    let mut read = 0;
    while read < LINGER_BYTES {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match sock.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => read += n,
        }
    }
}

/// The handshake proper, and the destination's confirmation.
fn run_handshake<S: Socket>(
    conn: &mut rustls::Connection,
    role_is_server: bool,
    sock: &mut S,
) -> io::Result<()> {
    while conn.is_handshaking() {
        conn.complete_io(sock).map_err(|e| {
            let tls_error = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>());
            match (tls_error, e.kind()) {
                (Some(t), _) => handshake_error(t),
                (None, io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => timed_out(),
                (None, io::ErrorKind::UnexpectedEof) => io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "TLS handshake: the peer closed the connection (does it use TLS, and \
                     accept this end's certificate?)",
                ),
                (None, _) => io::Error::new(e.kind(), format!("TLS handshake: {e}")),
            }
        })?;
    }
    confirm(conn, role_is_server, sock)
}

/// The byte a destination sends once it has accepted the source's certificate.
const ACCEPTED: u8 = b'F';

/// Closes the one gap of TLS 1.3 client authentication: the client finishes its handshake
/// before the server has checked its certificate, so a refused source would only learn it from
/// a failed write later. The destination confirms with one byte, and the source waits for it
/// (bounded like the handshake), so a refusal is an error of `connect` with the peer's alert.
fn confirm<S: Socket>(conn: &mut rustls::Connection, server: bool, sock: &mut S) -> io::Result<()> {
    if server {
        conn.writer().write_all(&[ACCEPTED])?;
        while conn.wants_write() {
            conn.write_tls(sock)?;
        }
        return sock.flush();
    }
    let mut byte = [0u8; 1];
    loop {
        match conn.reader().read(&mut byte) {
            Ok(1) if byte[0] == ACCEPTED => return Ok(()),
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS handshake: the peer is not a ferry destination",
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let closed = || {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "TLS handshake: the peer closed the connection (does it use TLS, and accept \
                 this end's certificate?)",
            )
        };
        match conn.read_tls(sock) {
            Ok(0) => return Err(closed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out())
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(closed()),
            Err(e) => return Err(e),
        }
        conn.process_new_packets()
            .map_err(|e| handshake_error(&e))?;
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "TLS handshake: the peer did not answer within {} s",
            HANDSHAKE_TIMEOUT.as_secs()
        ),
    )
}

/// An io::Error that says what a rustls error means for a migration.
fn handshake_error(e: &rustls::Error) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        describe(e, "TLS handshake"),
    )
}

/// A sentence for a rustls error, with what probably caused it.
fn describe(e: &rustls::Error, when: &str) -> String {
    use rustls::{AlertDescription as A, Error as E};
    let hint = match e {
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
            " (the peer does not speak TLS: give both ends the same --tls-* options)"
        }
        E::InvalidCertificate(
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. },
        ) => " (connect by a name the certificate carries, or give --tls-server-name)",
        E::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
            " (its certificate is not signed by this end's --tls-ca)"
        }
        E::NoCertificatesPresented => {
            " (the peer has no certificate: give it --tls-cert and --tls-key)"
        }
        E::AlertReceived(
            A::BadCertificate | A::UnknownCA | A::CertificateRequired | A::CertificateUnknown,
        ) => " (the peer refused this end's certificate)",
        E::DecryptError => " (the stream was altered in flight)",
        _ => "",
    };
    format!("{when}: {e}{hint}")
}

/// Splits a session into a reading and a writing half over clones of `sock`.
pub(crate) fn split<S: Socket>(
    conn: rustls::Connection,
    sock: &S,
) -> io::Result<(TlsReader<S>, TlsWriter<S>)> {
    let session = Arc::new(Mutex::new(conn));
    Ok((
        TlsReader {
            session: session.clone(),
            sock: sock.try_clone()?,
            buf: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
            eof: false,
        },
        TlsWriter {
            session,
            sock: sock.try_clone()?,
            out: Vec::new(),
        },
    ))
}

fn lock(s: &Mutex<rustls::Connection>) -> MutexGuard<'_, rustls::Connection> {
    // A half that panicked left the session as consistent as rustls keeps it; the other half
    // sees the error the session reports.
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The reading half of a TLS connection.
pub(crate) struct TlsReader<S> {
    session: Arc<Mutex<rustls::Connection>>,
    sock: S,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

impl<S: Socket> Read for TlsReader<S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut session = lock(&self.session);
                match session.reader().read(out) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The peer closed the socket without a close_notify: for the migration
                    // stream this is an end of stream like a plain socket's (its own records,
                    // checksums and Complete record tell a cut stream from a whole one).
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                if self.eof {
                    return Ok(0);
                }
                if self.start < self.end {
                    let n = session.read_tls(&mut &self.buf[self.start..self.end])?;
                    self.start += n;
                    session.process_new_packets().map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, describe(&e, "TLS"))
                    })?;
                    continue;
                }
            }
            // Nothing buffered: wait for ciphertext without holding the session.
            let n = self.sock.read(&mut self.buf)?;
            (self.start, self.end) = (0, n);
            if n == 0 {
                self.eof = true;
                // Tell rustls the stream ended; it then reports a clean or unclean close.
                let mut session = lock(&self.session);
                session.read_tls(&mut &[][..])?;
                session
                    .process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, describe(&e, "TLS")))?;
            }
        }
    }
}

/// The writing half of a TLS connection.
pub(crate) struct TlsWriter<S> {
    session: Arc<Mutex<rustls::Connection>>,
    sock: S,
    out: Vec<u8>,
}

impl<S: Socket> TlsWriter<S> {
    /// Moves what the session has to send into `out`, under the lock.
    fn take_ciphertext(session: &mut rustls::Connection, out: &mut Vec<u8>) -> io::Result<()> {
        while session.wants_write() {
            session.write_tls(out)?;
        }
        Ok(())
    }

    /// Sends `out` without holding the session.
    fn send(&mut self) -> io::Result<()> {
        let r = self.sock.write_all(&self.out);
        self.out.clear();
        r
    }
}

impl<S: Socket> Write for TlsWriter<S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = {
            let mut session = lock(&self.session);
            let n = session.writer().write(data)?;
            Self::take_ciphertext(&mut session, &mut self.out)?;
            n
        };
        self.send()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        {
            let mut session = lock(&self.session);
            session.writer().flush()?;
            Self::take_ciphertext(&mut session, &mut self.out)?;
        }
        self.send()?;
        self.sock.flush()
    }
}
