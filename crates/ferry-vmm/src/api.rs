//! The control API: one JSON object per line over a Unix socket, one reply line per request.
//! Protocol reference: `docs/vmm.md`. [`ApiClient`] is the client the `ferry` CLI uses.
//! Each connection starts with the server's greeting, which carries the API version
//! ([`API_VERSION`]), as QMP's does.
//!
//! ```text
//! <- {"ferry":{"api":1,"vmm":"ferry-vmm 0.1.0"}}
//! -> {"cmd":"status"}
//! <- {"ok":true,"result":{"state":"running","vcpus":2,...}}
//! -> {"cmd":"balloon-set","target_bytes":268435456}
//! <- {"ok":true,"result":null}
//! -> {"cmd":"nonsense"}
//! <- {"ok":false,"error":"bad request: unknown variant `nonsense`, ..."}
//! ```
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest request line accepted; longer lines close the connection.
pub const REQUEST_BYTES_MAX: u64 = 64 * 1024;
/// Clients served at once; further connections are refused with an error line.
pub const CLIENTS_MAX: usize = 16;
/// How long [`ApiClient`] waits for a reply (except to `migrate`, which lasts as long as the
/// migration).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// The version of this protocol, in every connection's greeting. It changes when a request
/// or reply changes incompatibly (a new request or an added reply field does not change it);
/// a client refuses a server of another version.
pub const API_VERSION: u32 = 1;

/// The first line the server writes on a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    /// Who answers.
    pub ferry: ServerInfo,
}

/// What the greeting says about the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// [`API_VERSION`] of the server.
    pub api: u32,
    /// The serving program and its version.
    pub vmm: String,
}

impl Greeting {
    fn this() -> Self {
        Self {
            ferry: ServerInfo {
                api: API_VERSION,
                vmm: concat!("ferry-vmm ", env!("CARGO_PKG_VERSION")).to_owned(),
            },
        }
    }
}

/// Errors of the API server and client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket cannot be bound.
    #[error("cannot listen on the API socket {path}: {source}")]
    Bind {
        /// Path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The client cannot reach the VMM.
    #[error("cannot talk to the VMM at {path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM's reply is not valid JSON or not a reply object.
    #[error("malformed reply from the VMM: {0}")]
    Reply(String),
    /// The VMM refused or failed the request.
    #[error("the VMM refused the request: {0}")]
    Refused(String),
    /// The VMM closed the connection before it answered (it exited, or was killed).
    #[error("the VMM at {0} closed the connection without answering (did it exit?)")]
    Closed(PathBuf),
    /// The VMM speaks another version of the API.
    #[error(
        "the VMM at {path} speaks API version {theirs} ({vmm}); this client speaks version \
         {API_VERSION}: use the ferry command of the same release"
    )]
    Version {
        /// Path.
        path: PathBuf,
        /// The server's version.
        theirs: u32,
        /// The server's program.
        vmm: String,
    },
}

/// A request: `{"cmd": "<name>", ...arguments}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Run state, resources, balloon summary.
    Status,
    /// Stop the guest and devices.
    Pause,
    /// Run again.
    Resume,
    /// Set the balloon target in bytes.
    BalloonSet {
        /// Bytes the guest should give up.
        target_bytes: u64,
    },
    /// Balloon target, actual size and negotiated features.
    BalloonGet,
    /// The guest's last memory statistics (and ask it for fresh ones).
    BalloonStats,
    /// Stop the VM; the VMM process exits.
    Shutdown,
    /// Live-migrate to a destination; answers when the migration ended, with its statistics.
    Migrate {
        /// Destination address.
        to: String,
        /// Migration options (`ferry_vmm::migration::MigrateOptions`); defaults when absent.
        #[serde(default)]
        options: Value,
    },
    /// Cancel the running migration: the guest keeps running here, the destination discards
    /// what it received. Refused when no migration runs, or once the guest was handed over.
    MigrateCancel,
    /// What every vCPU is doing, for diagnosing a guest that stopped answering (the vCPUs
    /// stop for the read; refused while a migration owns the VM).
    Vcpus,
}

/// A reply line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// A sentence on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    fn from_result(r: Result<Value, String>) -> Self {
        match r {
            Ok(v) => Self {
                ok: true,
                result: Some(v),
                error: None,
            },
            Err(e) => Self {
                ok: false,
                result: None,
                error: Some(e),
            },
        }
    }
}

/// What serves requests (the VMM; a fake in tests).
pub trait ApiHandler: Send + Sync + 'static {
    /// Handles one request; `Err` is a sentence for the client.
    fn handle(&self, request: Request) -> Result<Value, String>;
}

/// Parses and answers one request line.
pub fn answer(handler: &dyn ApiHandler, line: &str) -> Reply {
    let result = match serde_json::from_str::<Request>(line) {
        Ok(req) => handler.handle(req),
        Err(e) => Err(format!("bad request: {e}")),
    };
    Reply::from_result(result)
}

/// The running API server: what a VMM needs to exit without cutting a reply short.
#[derive(Debug, Clone, Default)]
pub struct ApiServer {
    /// Requests read and not yet fully answered.
    in_flight: Arc<AtomicUsize>,
}

impl ApiServer {
    /// Waits until no request is being answered, at most `timeout`; returns whether it got
    /// there. A VMM calls this before it exits: a reply it still owes (the statistics of the
    /// migration that ended the VM here, the answer to `shutdown`) is then in the client's
    /// socket, and survives the process.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.in_flight.load(SeqCst) > 0 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

/// Counts a request as in flight until dropped (on every way out of answering it).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn start(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, SeqCst);
        Self(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// Binds `path` and serves requests on a background thread for the life of the process.
pub fn serve(path: &Path, handler: Arc<dyn ApiHandler>) -> Result<ApiServer, ApiError> {
    let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: path.to_owned(),
        source,
    })?;
    let server = ApiServer::default();
    let in_flight = server.in_flight.clone();
    let clients = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("ferry-api".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                if clients.fetch_add(1, SeqCst) >= CLIENTS_MAX {
                    clients.fetch_sub(1, SeqCst);
                    let _ = writeln!(stream, r#"{{"ok":false,"error":"too many API clients"}}"#);
                    continue;
                }
                let (handler, clients) = (handler.clone(), clients.clone());
                let in_flight = in_flight.clone();
                let spawned = std::thread::Builder::new()
                    .name("ferry-api-client".into())
                    .spawn(move || {
                        serve_client(stream, handler.as_ref(), &in_flight);
                        clients.fetch_sub(1, SeqCst);
                    });
                if spawned.is_err() {
                    tracing::warn!("cannot start an API client thread");
                }
            }
        })
        .map_err(|source| ApiError::Bind {
            path: path.to_owned(),
            source,
        })?;
    Ok(server)
}

fn serve_client(stream: UnixStream, handler: &dyn ApiHandler, in_flight: &Arc<AtomicUsize>) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let Ok(greeting) = serde_json::to_string(&Greeting::this()) else {
        return;
    };
    if writeln!(out, "{greeting}").is_err() {
        return;
    }
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = match reader.by_ref().take(REQUEST_BYTES_MAX).read_line(&mut line) {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        if !line.ends_with('\n') && n as u64 >= REQUEST_BYTES_MAX {
            let _ = writeln!(out, r#"{{"ok":false,"error":"request line too long"}}"#);
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        let _answering = InFlight::start(in_flight);
        let reply = answer(handler, line.trim());
        let Ok(text) = serde_json::to_string(&reply) else {
            return;
        };
        if writeln!(out, "{text}").is_err() {
            return;
        }
    }
}

/// A connection to a VMM's API socket.
#[derive(Debug)]
pub struct ApiClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ApiClient {
    /// Connects to the API socket at `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ApiError> {
        let path = path.as_ref().to_owned();
        let io = |source| ApiError::Io {
            path: path.clone(),
            source,
        };
        let stream = UnixStream::connect(&path).map_err(io)?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(io)? == 0 {
            return Err(ApiError::Closed(path));
        }
        match serde_json::from_str::<Greeting>(&line) {
            Ok(g) if g.ferry.api == API_VERSION => {}
            Ok(g) => {
                return Err(ApiError::Version {
                    path,
                    theirs: g.ferry.api,
                    vmm: g.ferry.vmm,
                })
            }
            // No greeting: a refusal (too many clients) or not a ferry VMM.
            Err(_) => {
                return Err(match serde_json::from_str::<Reply>(&line) {
                    Ok(Reply {
                        ok: false, error, ..
                    }) => ApiError::Refused(error.unwrap_or_default()),
                    _ => ApiError::Reply(format!("expected the VMM's greeting, got {line:?}")),
                })
            }
        }
        Ok(Self {
            reader,
            writer,
            path,
        })
    }

    /// Sends `request` and returns the result, or the VMM's error as [`ApiError::Refused`].
    pub fn request(&mut self, request: &Request) -> Result<Value, ApiError> {
        let io = |source| ApiError::Io {
            path: self.path.clone(),
            source,
        };
        let text = serde_json::to_string(request).map_err(|e| ApiError::Reply(e.to_string()))?;
        writeln!(self.writer, "{text}").map_err(io)?;
        let mut line = String::new();
        if self.reader.read_line(&mut line).map_err(io)? == 0 {
            return Err(ApiError::Closed(self.path.clone()));
        }
        let reply: Reply =
            serde_json::from_str(&line).map_err(|e| ApiError::Reply(format!("{e}: {line:?}")))?;
        if reply.ok {
            Ok(reply.result.unwrap_or(Value::Null))
        } else {
            Err(ApiError::Refused(reply.error.unwrap_or_default()))
        }
    }

    /// `status`, typed.
    pub fn status(&mut self) -> Result<crate::status::Status, ApiError> {
        let v = self.request(&Request::Status)?;
        serde_json::from_value(v).map_err(|e| ApiError::Reply(e.to_string()))
    }

    /// `pause`.
    pub fn pause(&mut self) -> Result<(), ApiError> {
        self.request(&Request::Pause).map(drop)
    }

    /// `resume`.
    pub fn resume(&mut self) -> Result<(), ApiError> {
        self.request(&Request::Resume).map(drop)
    }

    /// `balloon-set`.
    pub fn balloon_set(&mut self, target_bytes: u64) -> Result<(), ApiError> {
        self.request(&Request::BalloonSet { target_bytes })
            .map(drop)
    }

    /// `balloon-get`, typed.
    pub fn balloon_get(&mut self) -> Result<crate::status::BalloonInfo, ApiError> {
        let v = self.request(&Request::BalloonGet)?;
        serde_json::from_value(v).map_err(|e| ApiError::Reply(e.to_string()))
    }

    /// `balloon-stats` (raw JSON: the guest's statistics or null).
    pub fn balloon_stats(&mut self) -> Result<Value, ApiError> {
        self.request(&Request::BalloonStats)
    }

    /// `migrate`: asks the VMM to live-migrate to `to` with `options` (a serialized
    /// `ferry_vmm::migration::MigrateOptions`) and waits, without the read timeout of the
    /// other requests, for the migration to end; returns its statistics (JSON).
    pub fn migrate(&mut self, to: &str, options: Value) -> Result<Value, ApiError> {
        let io = |source| ApiError::Io {
            path: self.path.clone(),
            source,
        };
        self.writer.set_read_timeout(None).map_err(io)?;
        let result = self.request(&Request::Migrate {
            to: to.to_owned(),
            options,
        });
        self.writer
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(|source| ApiError::Io {
                path: self.path.clone(),
                source,
            })?;
        result
    }

    /// `migrate-cancel`: cancels the running migration (its `migrate` request then fails
    /// with "migration cancelled").
    pub fn migrate_cancel(&mut self) -> Result<(), ApiError> {
        self.request(&Request::MigrateCancel).map(drop)
    }

    /// `vcpus`, typed.
    pub fn vcpus(&mut self) -> Result<Vec<crate::status::VcpuReport>, ApiError> {
        let v = self.request(&Request::Vcpus)?;
        serde_json::from_value(v).map_err(|e| ApiError::Reply(e.to_string()))
    }

    /// `shutdown`.
    pub fn shutdown(&mut self) -> Result<(), ApiError> {
        self.request(&Request::Shutdown).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Fake(Mutex<Vec<Request>>);

    impl ApiHandler for Fake {
        fn handle(&self, request: Request) -> Result<Value, String> {
            self.0.lock().unwrap().push(request.clone());
            match request {
                Request::Status => Ok(serde_json::json!({
                    "state": "paused", "vcpus": 2, "memory_bytes": 1u64 << 30,
                    "uptime_ms": 5, "balloon": null
                })),
                Request::Migrate { to, options } if to == "ok" => {
                    Ok(serde_json::json!({ "echo": options }))
                }
                Request::Migrate { .. } => Err("migration refused by the fake".into()),
                _ => Ok(Value::Null),
            }
        }
    }

    #[test]
    fn requests_have_a_stable_wire_form() {
        let j = |r: &Request| serde_json::to_string(r).unwrap();
        assert_eq!(j(&Request::Status), r#"{"cmd":"status"}"#);
        assert_eq!(j(&Request::Vcpus), r#"{"cmd":"vcpus"}"#);
        assert_eq!(
            j(&Request::BalloonSet { target_bytes: 4096 }),
            r#"{"cmd":"balloon-set","target_bytes":4096}"#
        );
        let fake = Fake(Mutex::new(Vec::new()));
        let r = answer(&fake, r#"{"cmd":"bogus"}"#);
        assert!(!r.ok && r.error.unwrap().starts_with("bad request"));
        let r = answer(&fake, r#"{"cmd":"balloon-set","target_bytes":1,"extra":1}"#);
        assert!(!r.ok, "unknown fields are refused");
        let r = answer(&fake, "not json");
        assert!(!r.ok);
    }

    /// A fresh directory for a test's API socket, and the socket's path in it.
    fn socket_dir(name: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        (dir, path)
    }

    /// Answers `migrate` only once released, like a migration that is still running.
    struct Slow(Mutex<std::sync::mpsc::Receiver<()>>);

    impl ApiHandler for Slow {
        fn handle(&self, _request: Request) -> Result<Value, String> {
            let _ = self.0.lock().unwrap().recv();
            Ok(serde_json::json!("done"))
        }
    }

    #[test]
    fn the_server_is_idle_only_once_every_reply_is_written() {
        let (dir, path) = socket_dir("ferry-api-idle");
        let (release, wait) = std::sync::mpsc::channel();
        let server = serve(&path, Arc::new(Slow(Mutex::new(wait)))).unwrap();
        assert!(server.wait_idle(Duration::ZERO), "idle before any request");
        let mut c = ApiClient::connect(&path).unwrap();
        let asked = std::thread::spawn(move || {
            c.request(&Request::Migrate {
                to: "x".into(),
                options: Value::Null,
            })
        });
        // The request is being answered: a stopping VMM must wait for it.
        let started = std::time::Instant::now();
        while server.wait_idle(Duration::ZERO) {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "request never arrived"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!server.wait_idle(Duration::from_millis(50)));
        release.send(()).unwrap();
        assert!(server.wait_idle(Duration::from_secs(5)));
        assert_eq!(asked.join().unwrap().unwrap(), serde_json::json!("done"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_vmm_that_closes_without_answering_is_named_not_called_malformed() {
        let (dir, path) = socket_dir("ferry-api-closed");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            // Greet, read the request, then go away without a reply, as a killed VMM does.
            let (mut stream, _) = listener.accept().unwrap();
            let greeting = serde_json::to_string(&Greeting::this()).unwrap();
            writeln!(stream, "{greeting}").unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
        });
        let err = ApiClient::connect(&path)
            .unwrap()
            .request(&Request::Status)
            .unwrap_err();
        server.join().unwrap();
        assert!(matches!(err, ApiError::Closed(_)), "{err:?}");
        assert!(err
            .to_string()
            .contains("closed the connection without answering"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn client_and_server_talk_over_a_socket() {
        let (_, path) = socket_dir("ferry-api");
        let fake = Arc::new(Fake(Mutex::new(Vec::new())));
        serve(&path, fake.clone()).unwrap();
        let mut c = ApiClient::connect(&path).unwrap();
        let s = c.status().unwrap();
        assert_eq!((s.vcpus, s.state), (2, crate::status::RunState::Paused));
        c.pause().unwrap();
        c.balloon_set(1 << 20).unwrap();
        let e = c
            .request(&Request::Migrate {
                to: "x".into(),
                options: Value::Null,
            })
            .unwrap_err();
        assert!(e.to_string().contains("refused by the fake"), "{e}");
        // `migrate` carries the options and answers with the result; the client keeps
        // working (and its reply timeout) afterwards.
        let r = c
            .migrate("ok", serde_json::json!({ "hints": false }))
            .unwrap();
        assert_eq!(r["echo"]["hints"], false);
        assert!(c.migrate("no", Value::Null).is_err());
        assert_eq!(c.status().unwrap().vcpus, 2);
        assert_eq!(
            fake.0.lock().unwrap()[..3],
            [
                Request::Status,
                Request::Pause,
                Request::BalloonSet {
                    target_bytes: 1 << 20
                }
            ]
        );
        // A second client is served independently.
        ApiClient::connect(&path).unwrap().resume().unwrap();
        // Every connection starts with the greeting; over-long lines close the connection
        // with an error.
        let mut raw = UnixStream::connect(&path).unwrap();
        let mut reader = BufReader::new(raw.try_clone().unwrap());
        let mut greeting = String::new();
        reader.read_line(&mut greeting).unwrap();
        let g: Greeting = serde_json::from_str(&greeting).unwrap();
        assert_eq!(g.ferry.api, API_VERSION);
        assert!(g.ferry.vmm.starts_with("ferry-vmm "), "{greeting}");
        raw.write_all(&vec![b' '; REQUEST_BYTES_MAX as usize + 10])
            .unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
        assert!(reply.contains("too long"), "{reply}");
    }

    /// A server that greets with `line` instead of ferry's greeting.
    fn greeting_server(line: &'static str) -> (PathBuf, PathBuf) {
        let (dir, path) = socket_dir(&format!("greet-{}", line.len()));
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                let _ = writeln!(s, "{line}");
            }
        });
        (dir, path)
    }

    #[test]
    fn a_client_refuses_another_api_version_and_a_server_that_does_not_greet() {
        let (dir, path) = greeting_server(r#"{"ferry":{"api":2,"vmm":"ferry-vmm 9.0.0"}}"#);
        let e = ApiClient::connect(&path).unwrap_err();
        assert!(matches!(e, ApiError::Version { theirs: 2, .. }), "{e}");
        assert!(
            e.to_string()
                .contains("speaks API version 2 (ferry-vmm 9.0.0)"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(dir);
        let (dir, path) = greeting_server(r#"{"ok":false,"error":"too many API clients"}"#);
        let e = ApiClient::connect(&path).unwrap_err();
        assert!(e.to_string().contains("too many API clients"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
        let (dir, path) = greeting_server(r#"{"QMP":{"version":{}}}"#);
        let e = ApiClient::connect(&path).unwrap_err();
        assert!(e.to_string().contains("expected the VMM's greeting"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
