//! The server side: one thread per client, a greeting, then one reply per request line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::{
    answer, ApiError, ApiHandler, ErrorCode, Greeting, Reply, CLIENTS_MAX, REQUEST_BYTES_MAX,
};

/// The running API server: what a VMM needs to exit without cutting a reply short, and to
/// hand the socket to the VM it serves once that VM exists.
#[derive(Clone)]
pub struct ApiServer {
    /// Requests read and not yet fully answered.
    in_flight: Arc<AtomicUsize>,
    /// Who answers requests; every request asks it anew, so a replacement serves the next
    /// request of every client.
    handler: Arc<RwLock<Arc<dyn ApiHandler>>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("in_flight", &self.in_flight.load(SeqCst))
            .finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Lets `handler` answer every request from now on. A migration destination binds its
    /// socket with a handler that refuses everything while the VM arrives (a failed bind
    /// then refuses the migration before any memory moves, and starting the server's
    /// thread is not part of the downtime), then hands the socket to the restored VM.
    pub fn set_handler(&self, handler: Arc<dyn ApiHandler>) {
        *self.handler.write().unwrap_or_else(|p| p.into_inner()) = handler;
    }

    fn handler(&self) -> Arc<dyn ApiHandler> {
        self.handler
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

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
    let server = ApiServer {
        in_flight: Arc::new(AtomicUsize::new(0)),
        handler: Arc::new(RwLock::new(handler)),
    };
    let shared = server.clone();
    let clients = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("ferry-api".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                if clients.fetch_add(1, SeqCst) >= CLIENTS_MAX {
                    clients.fetch_sub(1, SeqCst);
                    let line =
                        Reply::refusal_line(ErrorCode::TooManyClients, "too many API clients");
                    let _ = writeln!(stream, "{line}");
                    continue;
                }
                let (server, clients) = (shared.clone(), clients.clone());
                let spawned = std::thread::Builder::new()
                    .name("ferry-api-client".into())
                    .spawn(move || {
                        serve_client(stream, &server);
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

fn serve_client(stream: UnixStream, server: &ApiServer) {
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
            let line = Reply::refusal_line(ErrorCode::RequestTooLong, "request line too long");
            let _ = writeln!(out, "{line}");
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        let _answering = InFlight::start(&server.in_flight);
        let reply = answer(server.handler().as_ref(), line.trim());
        let Ok(text) = serde_json::to_string(&reply) else {
            return;
        };
        if writeln!(out, "{text}").is_err() {
            return;
        }
    }
}
