//! COM1: vm-superio's 8250 UART with its interrupt on an irqfd, and the host side of the
//! console: stdout/stdin, an output file, or a listening Unix socket (one client at a time,
//! bidirectional) through which tests drive the guest agent.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{lock, BusDevice};
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

/// 16550 interrupt identification (IIR) bits vm-superio sets for a raised interrupt.
const IIR_THR_EMPTY: u8 = 0x02;
const IIR_DATA_READY: u8 = 0x04;

/// Raises an interrupt by writing an eventfd registered with KVM as an irqfd, once armed.
///
/// A restored UART starts disarmed: vm-superio raises a pending interrupt while it is rebuilt
/// from its state, which is before the VMM restored the interrupt controller, and that state
/// would overwrite the edge. vm-superio raises THR-empty and received-data interrupts only when
/// their IIR bit goes from clear to set, so a lost edge with the bit still set stops the
/// guest's transmit (or receive) path for good. [`SerialConsole::resume`] arms the trigger and
/// raises what is pending.
#[derive(Debug)]
pub struct EventFdTrigger {
    fd: EventFd,
    armed: AtomicBool,
}

impl EventFdTrigger {
    fn new(fd: EventFd, armed: bool) -> Self {
        Self {
            fd,
            armed: AtomicBool::new(armed),
        }
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        if self.armed.load(Ordering::SeqCst) {
            self.fd.write(1)
        } else {
            Ok(())
        }
    }
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
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| SerialError::File {
                path: path.display().to_string(),
                source,
            })?;
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

/// Serializable UART registers and receive FIFO (vm-superio's `SerialState`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub registers: [u8; 9],
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<&SerialState> for SerialSnapshot {
    fn from(s: &SerialState) -> Self {
        Self {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        let r = s.registers;
        Self {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// COM1 as a port I/O bus device.
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, NoEvents, ConsoleOut>,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialConsole").finish_non_exhaustive()
    }
}

impl SerialConsole {
    /// A UART raising `irq` and printing to `out`.
    pub fn new(irq: EventFd, out: impl Into<ConsoleOut>) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger::new(irq, true), out.into()),
        }
    }

    /// A UART continuing from `snapshot`. Its interrupt stays quiet until
    /// [`SerialConsole::resume`], which raises the one pending at save time.
    pub fn restore(
        irq: EventFd,
        out: impl Into<ConsoleOut>,
        snapshot: &SerialSnapshot,
    ) -> Result<Self, SerialError> {
        let trigger = EventFdTrigger::new(irq, false);
        let uart = Serial::from_state(&snapshot.into(), trigger, NoEvents, out.into())
            .map_err(|e| SerialError::State(format!("{e:?}")))?;
        Ok(Self { uart })
    }

    /// Call when the VM (re)starts running, after its interrupt controller state is in place:
    /// arms a restored UART's interrupt and raises it if the guest had not taken one when the
    /// state was saved (THR-empty or received-data set in IIR). The guest's handler reads IIR,
    /// which clears the bits, so the UART raises again on the next edge. That holds even when
    /// the guest has the interrupt disabled at the moment (its console write path clears IER
    /// while it polls): an extra interrupt is harmless, a bit left set is not. A no-op for a
    /// UART that is armed already.
    pub fn resume(&mut self) {
        let trigger = self.uart.interrupt_evt();
        if trigger.armed.swap(true, Ordering::SeqCst) {
            return;
        }
        if self.uart.state().interrupt_identification & (IIR_THR_EMPTY | IIR_DATA_READY) != 0 {
            if let Err(e) = trigger.fd.write(1) {
                tracing::warn!("cannot raise the restored serial interrupt: {e}");
            }
        }
    }

    /// Queues input bytes for the guest; returns how many fit in the FIFO.
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// The UART state for migration.
    pub fn snapshot(&self) -> SerialSnapshot {
        SerialSnapshot::from(&self.uart.state())
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(off), Some(b)) = (u8::try_from(offset), data.first_mut()) {
            *b = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), Some(&b)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.uart.write(off, b) {
                tracing::warn!("serial write failed: {e:?}");
            }
        }
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
        SerialTarget::File(path) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| SerialError::File {
                    path: path.display().to_string(),
                    source,
                })?;
            (SerialOut::File(f), Input::None)
        }
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
    pub fn spawn_input(
        self,
        console: Arc<Mutex<SerialConsole>>,
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

fn bind(path: &Path) -> Result<UnixListener, SerialError> {
    UnixListener::bind(path).map_err(|source| SerialError::Socket {
        path: path.display().to_string(),
        source,
    })
}

/// Copies `input` into the UART's FIFO until EOF, waiting for FIFO space and for the gate.
fn pump(mut input: impl Read, console: &Mutex<SerialConsole>, gate: &Gate) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn console(out: SerialOut) -> (SerialConsole, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (SerialConsole::new(irq.try_clone().unwrap(), out), irq)
    }

    #[test]
    fn socket_output_is_kept_until_a_client_connects() {
        let dir = std::env::temp_dir().join(format!("ferry-serial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.sock");
        let (out, input) = open(&SerialTarget::Socket(path.clone())).unwrap();
        let (c, _irq) = console(out);
        let c = Arc::new(Mutex::new(c));
        // The guest prints before anyone listens.
        for b in b"hello\n" {
            lock(&c).write(0, &[*b]);
        }
        let gate = Arc::new(Gate::new());
        input.spawn_input(c.clone(), gate).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut got = [0u8; 6];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello\n");
        // Input reaches the receive FIFO: LSR data-ready, then RBR.
        client.write_all(b"x").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut lsr = [0u8];
        while lsr[0] & 1 == 0 && std::time::Instant::now() < deadline {
            lock(&c).read(5, &mut lsr);
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut rbr = [0u8];
        lock(&c).read(0, &mut rbr);
        assert_eq!(rbr[0], b'x');
    }

    #[test]
    fn the_console_log_gets_a_copy() {
        let path = std::env::temp_dir().join(format!("ferry-console-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let out = ConsoleOut::with_log(SerialOut::Sink, &path).unwrap();
        let mut c = SerialConsole::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), out);
        for b in b"boot\n" {
            c.write(0, &[*b]);
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"boot\n");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn transmit_interrupt_fires_the_eventfd() {
        let (mut c, irq) = console(SerialOut::Sink);
        // IER: enable THR-empty interrupt, which the 8250 raises at once.
        c.write(1, &[0x02]);
        c.write(0, b"a");
        assert!(irq.read().unwrap() >= 1);
        let snap = c.snapshot();
        assert_eq!(snap.registers[2], 0x02);
        // Restored with the THR-empty interrupt pending: nothing is raised until resume (the
        // VMM has not restored the interrupt controller yet), then exactly once.
        let irq2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut back =
            SerialConsole::restore(irq2.try_clone().unwrap(), SerialOut::Sink, &snap).unwrap();
        assert_eq!(back.snapshot(), snap);
        assert!(irq2.read().is_err(), "raised before resume");
        back.resume();
        assert_eq!(irq2.read().unwrap(), 1);
        back.resume();
        assert!(irq2.read().is_err(), "a second resume raises nothing");
        // From then on it behaves as before: the guest takes the interrupt (reads IIR), the
        // next byte raises a new one.
        let mut iir = [0u8];
        back.read(2, &mut iir);
        back.write(0, b"b");
        assert_eq!(irq2.read().unwrap(), 1);
        let overfull = SerialSnapshot {
            in_buffer: vec![0; 65],
            ..snap
        };
        let irq3 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(SerialConsole::restore(irq3, SerialOut::Sink, &overfull).is_err());
    }

    #[test]
    fn resume_raises_an_interrupt_the_guest_had_not_taken() {
        let (mut c, irq) = console(SerialOut::Sink);
        c.resume(); // a console that was never restored is armed already
        assert!(irq.read().is_err());
        // Received data raised its interrupt (IER bit 0, IIR bit 2), not taken yet; then the
        // guest masks it (as its console write path does while polling): still pending.
        c.write(1, &[0x01]);
        assert_eq!(c.enqueue(b"x"), 1);
        assert!(irq.read().unwrap() >= 1);
        c.write(1, &[0x00]);
        let pending = c.snapshot();
        // The guest's handler read IIR: nothing left to raise.
        let mut iir = [0u8];
        c.read(2, &mut iir);
        let taken = c.snapshot();
        for (snap, raised) in [(&pending, true), (&taken, false)] {
            let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let mut back =
                SerialConsole::restore(fd.try_clone().unwrap(), SerialOut::Sink, snap).unwrap();
            back.resume();
            assert_eq!(fd.read().is_ok(), raised, "{snap:?}");
        }
    }
}
