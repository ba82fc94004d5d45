//! The host side of the guest's console: stdout/stdin, an output file, or a listening Unix
//! socket (one client at a time, bidirectional, with a backlog of what was printed while no
//! client was connected) through which tests drive the guest agent. The UART itself is in
//! [`crate::serial`]; this side feeds it through [`UartInput`].
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::bus::lock;
use crate::config::SerialTarget;
use crate::gate::Gate;

/// Console output kept while no socket client is connected; older bytes are dropped.
pub const BACKLOG_BYTES_MAX: usize = 1 << 20;
/// How long console output may wait for a socket client that does not read; after that the
/// client is disconnected and output is kept in the backlog again.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the input thread waits for FIFO space before retrying.
const FIFO_RETRY: Duration = Duration::from_millis(2);

/// Errors setting up the console.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The output file cannot be opened.
    #[error("cannot open the serial output file {path}: {source}")]
    File {
        /// Path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The socket cannot be bound.
    #[error("cannot listen on the serial socket {path}: {source}")]
    Socket {
        /// Path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The interrupt eventfd cannot be created.
    #[error("cannot create the serial interrupt eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// A saved UART state that cannot be restored.
    #[error("cannot restore the serial port: {0}")]
    State(String),
    /// The input thread cannot be started.
    #[error("cannot start the serial input thread: {0}")]
    Thread(#[source] io::Error),
}

/// What the host's input is fed into: the UART's receive FIFO.
pub trait UartInput {
    /// Queues input bytes for the guest; returns how many fit.
    fn enqueue(&mut self, bytes: &[u8]) -> usize;
}

/// A connected client plus what was printed while none was.
#[derive(Debug, Default)]
pub struct SocketSlot {
    client: Option<UnixStream>,
    backlog: VecDeque<u8>,
}

/// Where console output goes.
#[derive(Debug)]
pub enum SerialOut {
    /// The VMM's stdout.
    Stdout,
    /// A file.
    File(File),
    /// The socket client, if any (else the backlog).
    Socket(Arc<Mutex<SocketSlot>>),
    /// Nowhere.
    Sink,
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Stdout => io::stdout().write(buf),
            Self::File(f) => f.write(buf),
            Self::Socket(slot) => {
                let mut s = lock(slot);
                let sent = match s.client.as_mut() {
                    Some(c) => c.write_all(buf).is_ok(),
                    None => false,
                };
                if !sent {
                    if s.client.take().is_some() {
                        tracing::warn!("serial socket client not reading: disconnected");
                    }
                    s.backlog.extend(buf);
                    let excess = s.backlog.len().saturating_sub(BACKLOG_BYTES_MAX);
                    s.backlog.drain(..excess);
                }
                Ok(buf.len())
            }
            Self::Sink => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Stdout => io::stdout().flush(),
            Self::File(f) => f.flush(),
            _ => Ok(()),
        }
    }
}

/// Console output plus an optional log file that gets a copy of everything the guest prints
/// (useful with a socket console, whose client may connect late or not at all).
#[derive(Debug)]
pub struct ConsoleOut {
    /// The console target's output.
    pub out: SerialOut,
    /// A file receiving a copy; dropped after its first write error.
    pub log: Option<File>,
}

impl From<SerialOut> for ConsoleOut {
    fn from(out: SerialOut) -> Self {
        Self { out, log: None }
    }
}

impl ConsoleOut {
    /// `out` with a copy appended to the file at `path`.
    pub fn with_log(out: SerialOut, path: &Path) -> Result<Self, SerialError> {
        let log = append(path)?;
        Ok(Self {
            out,
            log: Some(log),
        })
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(log) = self.log.as_mut() {
            if log.write_all(buf).is_err() {
                tracing::warn!("cannot write the console log; no longer copying the console");
                self.log = None;
            }
        }
        self.out.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The console's input side, once opened.
#[derive(Debug)]
pub struct SerialInput {
    input: Input,
}

#[derive(Debug)]
enum Input {
    None,
    Stdin,
    Socket(UnixListener, Arc<Mutex<SocketSlot>>),
}

/// Opens the host side of `target` (binds the socket, opens the file): the UART's output
/// and the input to start once the UART exists.
pub fn open(target: &SerialTarget) -> Result<(SerialOut, SerialInput), SerialError> {
    let (out, input) = match target {
        SerialTarget::Stdio => (SerialOut::Stdout, Input::Stdin),
        SerialTarget::None => (SerialOut::Sink, Input::None),
        SerialTarget::File(path) => (SerialOut::File(append(path)?), Input::None),
        SerialTarget::Socket(path) => {
            let listener = bind(path)?;
            let slot = Arc::new(Mutex::new(SocketSlot::default()));
            (
                SerialOut::Socket(slot.clone()),
                Input::Socket(listener, slot),
            )
        }
    };
    Ok((out, SerialInput { input }))
}

impl SerialInput {
    /// Starts the thread feeding host input to `console`; it parks while `gate` is closed.
    /// Returns `None` for output-only targets.
    pub fn spawn_input<U: UartInput + Send + 'static>(
        self,
        console: Arc<Mutex<U>>,
        gate: Arc<Gate>,
    ) -> Result<Option<std::thread::JoinHandle<()>>, SerialError> {
        let builder = std::thread::Builder::new().name("ferry-serial-in".into());
        let handle = match self.input {
            Input::None => return Ok(None),
            Input::Stdin => builder.spawn(move || {
                pump(io::stdin().lock(), &console, &gate);
            }),
            Input::Socket(listener, slot) => builder.spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let Ok(reader) = stream.try_clone() else {
                        continue;
                    };
                    {
                        let mut s = lock(&slot);
                        let mut stream = stream;
                        // A client that stops reading must not stall the vCPU printing.
                        let _ = stream.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT));
                        let backlog: Vec<u8> = s.backlog.drain(..).collect();
                        if stream.write_all(&backlog).is_ok() {
                            s.client = Some(stream);
                        }
                    }
                    pump(reader, &console, &gate);
                    lock(&slot).client = None;
                }
            }),
        };
        handle.map(Some).map_err(SerialError::Thread)
    }
}

/// Opens `path` for appending console output, creating it.
fn append(path: &Path) -> Result<File, SerialError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| SerialError::File {
            path: path.display().to_string(),
            source,
        })
}

fn bind(path: &Path) -> Result<UnixListener, SerialError> {
    UnixListener::bind(path).map_err(|source| SerialError::Socket {
        path: path.display().to_string(),
        source,
    })
}

/// Copies `input` into the UART's FIFO until EOF, waiting for FIFO space and for the gate.
fn pump(mut input: impl Read, console: &Mutex<impl UartInput>, gate: &Gate) {
    let mut buf = [0u8; 256];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            gate.wait_open();
            let taken = lock(console).enqueue(rest);
            rest = &rest[taken..];
            if !rest.is_empty() {
                std::thread::sleep(FIFO_RETRY);
            }
        }
    }
}
