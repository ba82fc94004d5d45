//! COM1: vm-superio's 8250 UART with its interrupt on an irqfd, and its state for migration.
//! Where its output goes and its input comes from is [`crate::console`].
#![forbid(unsafe_code)]

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::console::UartInput;
pub use crate::console::{ConsoleOut, SerialError};

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

    /// The UART state for migration.
    pub fn snapshot(&self) -> SerialSnapshot {
        SerialSnapshot::from(&self.uart.state())
    }
}

impl UartInput for SerialConsole {
    fn enqueue(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::lock;
    use crate::config::SerialTarget;
    use crate::console::{open, SerialOut};
    use crate::gate::Gate;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

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
