//! Client side of the agent's line protocol (see the `ferry-guest-agent` crate).
//!
//! A reader thread splits the console stream into lines and keeps every one of them (the
//! transcript); [`AgentClient::command`] writes one command and waits for the first line that
//! starts with `OK ` or `ERR ` after it. Kernel messages, heartbeats (`HB <n>`) and progress lines
//! (`# ...`) can appear in between and are only recorded.

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;

/// The line the agent prints once it accepts commands.
pub const READY_LINE: &str = "FERRY-AGENT READY";

/// Console text that means the guest kernel hit an error; no test guest may print any.
pub const KERNEL_ERROR_MARKERS: &[&str] = &[
    "BUG:",
    "Oops",
    "Kernel panic",
    "list_del corruption",
    "list_add corruption",
    "WARNING: CPU:",
    "general protection fault",
    "Call Trace:",
    "segfault",
    "page allocation failure",
    "Out of memory",
];

/// Console lines after which the guest is powering off: the agent's answer to `shutdown`
/// (lab/guest-init then runs `poweroff -f`) and guest-init's own line when the agent exits.
pub const POWER_OFF_MARKERS: &[&str] = &["OK shutdown", "guest-init: ferry-guest-agent exited"];

/// The guest kernel's last console line before the machine powers off.
const POWERED_DOWN: &str = "reboot: Power down";

/// Guest kernel warnings that are expected while the guest powers off, and only then, as
/// (text that identifies the warning, text its register dump must contain, why it is
/// harmless). Such a warning and its trace, up to the kernel's `---[ end trace` line, are
/// reported by [`AgentClient::power_off_warnings`] instead of [`AgentClient::kernel_errors`].
/// The same warning before the power-off, or with another register value, is an error.
pub const POWER_OFF_WARNINGS: &[(&str, &str, &str)] = &[(
    "virtballoon_free_page_report",
    // RAX holds virtqueue_add_inbuf's result: -EIO (0xfffffffb), the broken-queue error.
    "RAX: 00000000fffffffb",
    "Debian's 6.1.192 kernel breaks every virtqueue when it powers off (its stable update \
     \"virtio: break and reset virtio devices on device_shutdown()\"); a free page report \
     the page_reporting worker starts after that gets -EIO and virtio_balloon warns once. \
     Nothing is lost: the guest is shutting down.",
)];

/// One [`POWER_OFF_WARNINGS`] entry's console lines, from its `WARNING` line to the end of
/// its trace, and the register text that makes it expected.
struct WarningBlock {
    lines: Vec<String>,
    needle: &'static str,
}

impl WarningBlock {
    /// Expected if the guest was powering off and the registers match; otherwise the block's
    /// error lines count like any other.
    fn settle(self, powering_off: bool, errors: &mut Vec<String>, expected: &mut Vec<String>) {
        if powering_off && self.lines.iter().any(|l| l.contains(self.needle)) {
            expected.extend(self.lines);
        } else {
            errors.extend(self.lines.into_iter().filter(|l| is_kernel_error(l)));
        }
    }
}

/// Whether a console line is one of the agent's heartbeats (`HB <n>`, see `heartbeat MS`).
pub fn is_heartbeat(line: &str) -> bool {
    line.starts_with("HB ")
}

/// The pages the guest's page checker (`workload check`) has checked so far, from the answer
/// of `workload status` or `workload stop`; an error when it found a page that lost a write,
/// or when the answer has no checker.
pub fn checker_pages(status: &str) -> Result<u64, String> {
    let field = |name: &str| {
        status
            .split_whitespace()
            .skip_while(|f| *f != "kind=check")
            .find_map(|f| f.strip_prefix(name))
            .ok_or_else(|| format!("no {name} of the page checker in {status:?}"))
    };
    if field("mismatches=")? != "0" {
        return Err(format!(
            "the guest's page checker found pages that lost a write: {status}"
        ));
    }
    field("pages=")?
        .parse()
        .map_err(|e| format!("the page checker's count in {status:?}: {e}"))
}

/// Splits console lines into kernel errors and expected power-off warnings (see
/// [`POWER_OFF_WARNINGS`]).
fn classify(lines: &[String]) -> (Vec<String>, Vec<String>) {
    let (mut errors, mut expected) = (Vec::new(), Vec::new());
    let mut powering_off = false;
    // The kernel's last line before the machine goes off: a warning it starts printing after
    // that is cut off with the power, before its registers can be checked.
    let mut powered_down = false;
    let mut block: Option<(WarningBlock, bool)> = None;
    for line in lines {
        // Another CPU may print the power-down line in the middle of a trace.
        powered_down |= line.contains(POWERED_DOWN);
        if let Some((b, _)) = block.as_mut() {
            b.lines.push(line.clone());
            if line.contains("---[ end trace") {
                if let Some((b, _)) = block.take() {
                    b.settle(powering_off, &mut errors, &mut expected);
                }
            }
            continue;
        }
        if POWER_OFF_MARKERS.iter().any(|m| line.contains(m)) {
            powering_off = true;
        }
        if let Some((_, needle, _)) = POWER_OFF_WARNINGS.iter().find(|(m, ..)| line.contains(m)) {
            block = Some((
                WarningBlock {
                    lines: vec![line.clone()],
                    needle,
                },
                powered_down,
            ));
        } else if is_kernel_error(line) {
            errors.push(line.clone());
        }
    }
    match block {
        // Cut off by the power before its registers: started after the kernel's final
        // power-down line, or that line came (from another CPU) while it was being printed.
        // Expected unchecked: the machine went off, nothing can be lost.
        Some((b, started_after)) if powering_off && (started_after || powered_down) => {
            expected.extend(b.lines)
        }
        Some((b, _)) => b.settle(powering_off, &mut errors, &mut expected),
        None => {}
    }
    (errors, expected)
}

fn is_kernel_error(line: &str) -> bool {
    KERNEL_ERROR_MARKERS.iter().any(|m| line.contains(m))
}

/// Why a command did not get an `OK` answer.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The agent answered `ERR ...`.
    #[error("the agent refused `{command}`: {answer}")]
    Refused {
        /// The command sent.
        command: String,
        /// The whole `ERR` line.
        answer: String,
    },
    /// No answer in time.
    #[error("no answer to `{command}` within {timeout:?}; last console lines:\n{tail}")]
    Timeout {
        /// The command sent (or what was awaited).
        command: String,
        /// How long we waited.
        timeout: Duration,
        /// The last lines of the console.
        tail: String,
    },
    /// The console closed (the VMM exited or the guest powered off).
    #[error("the console closed while waiting for `{command}`; last console lines:\n{tail}")]
    Closed {
        /// The command sent (or what was awaited).
        command: String,
        /// The last lines of the console.
        tail: String,
    },
    /// Writing the command failed.
    #[error("cannot send `{command}` to the agent: {source}")]
    Send {
        /// The command.
        command: String,
        /// The write error.
        source: std::io::Error,
    },
    /// A command must be one line.
    #[error("a command must be a single line: {0:?}")]
    NotOneLine(String),
}

/// Lines shown in error messages.
const TAIL_LINES: usize = 20;

/// The number of a heartbeat line (`HB <n>`).
pub fn heartbeat_number(line: &str) -> Option<u64> {
    line.strip_prefix("HB ")?.trim().parse().ok()
}

/// A heartbeat as it arrived here: when, and its number.
pub type Heartbeat = (Instant, u64);

/// How long the guest went without a heartbeat during a migration, as seen from the host
/// (arrival times on its consoles): what the guest's outside world sees, not the guest's own
/// clocks, which both ferry and QEMU stop while the guest is paused. Each includes up to one
/// heartbeat interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatGaps {
    /// From the source's last heartbeat to the destination's first: the switchover as the
    /// guest's outside world sees it.
    pub switchover: Duration,
    /// The largest gap between consecutive heartbeats (by number) over the whole migration,
    /// the switchover included: also a guest stalled while it still runs on the source
    /// (e.g. busy in its kernel answering a free page hint request).
    pub largest: Duration,
}

/// The [`HeartbeatGaps`] of a migration from `source`'s and `destination`'s consoles,
/// counting only heartbeats that arrived at or after `since` (when the migration began).
/// `None` unless the source showed a heartbeat and the destination a later-numbered one.
pub fn heartbeat_gaps(
    source: &[Heartbeat],
    destination: &[Heartbeat],
    since: Instant,
) -> Option<HeartbeatGaps> {
    let recent = |beats: &[Heartbeat]| -> Vec<Heartbeat> {
        beats.iter().copied().filter(|(t, _)| *t >= since).collect()
    };
    let (source, destination) = (recent(source), recent(destination));
    let &(left, last) = source.iter().max_by_key(|h| h.1)?;
    let &(resumed, _) = destination
        .iter()
        .filter(|h| h.1 > last)
        .min_by_key(|h| h.1)?;
    let mut beats: Vec<Heartbeat> = source.into_iter().chain(destination).collect();
    beats.sort_by_key(|&(t, n)| (n, t));
    beats.dedup_by_key(|h| h.1);
    let largest = beats
        .windows(2)
        .map(|w| w[1].0.saturating_duration_since(w[0].0))
        .max()
        .unwrap_or_default();
    Some(HeartbeatGaps {
        switchover: resumed.saturating_duration_since(left),
        largest,
    })
}

/// Talks to `ferry-guest-agent` over a console stream.
pub struct AgentClient {
    writer: Box<dyn Write + Send>,
    lines: Receiver<String>,
    transcript: Arc<Mutex<Vec<String>>>,
    heartbeats: Arc<Mutex<Vec<Heartbeat>>>,
}

impl AgentClient {
    /// Starts reading `reader` (the console output) on a thread; commands go to `writer`.
    pub fn new<R, W>(reader: R, writer: W) -> Self
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let (tx, lines) = mpsc::channel();
        let transcript = Arc::new(Mutex::new(Vec::new()));
        let heartbeats = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&transcript);
        let beats = Arc::clone(&heartbeats);
        thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match reader.read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let arrived = Instant::now();
                let line = String::from_utf8_lossy(&raw)
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                if let Some(n) = heartbeat_number(&line) {
                    lock(&beats).push((arrived, n));
                }
                lock(&record).push(line.clone());
                // The client may be gone; the transcript still has the line.
                let _ = tx.send(line);
            }
        });
        Self {
            writer: Box::new(writer),
            lines,
            transcript,
            heartbeats,
        }
    }

    /// Every heartbeat received so far, with its arrival time.
    pub fn heartbeats(&self) -> Vec<Heartbeat> {
        lock(&self.heartbeats).clone()
    }

    /// Waits for [`READY_LINE`].
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), AgentError> {
        self.wait_for(READY_LINE, timeout, |line| line == READY_LINE)
            .map(drop)
    }

    /// Sends `command` and returns its `OK` line, without the `OK ` prefix.
    pub fn command(&mut self, command: &str, timeout: Duration) -> Result<String, AgentError> {
        if command.contains('\n') {
            return Err(AgentError::NotOneLine(command.to_string()));
        }
        self.writer
            .write_all(format!("{command}\n").as_bytes())
            .and_then(|()| self.writer.flush())
            .map_err(|source| AgentError::Send {
                command: command.to_string(),
                source,
            })?;
        let answer = self.wait_for(command, timeout, |line| {
            line.starts_with("OK ") || line.starts_with("ERR ")
        })?;
        match answer.strip_prefix("OK ") {
            Some(rest) => Ok(rest.to_string()),
            None => Err(AgentError::Refused {
                command: command.to_string(),
                answer,
            }),
        }
    }

    /// Waits for the next line matching `wanted`, e.g. a heartbeat.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<String, AgentError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if wanted(&line) => return Ok(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(AgentError::Timeout {
                        command: what.to_string(),
                        timeout,
                        tail: self.tail(),
                    })
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(AgentError::Closed {
                        command: what.to_string(),
                        tail: self.tail(),
                    })
                }
            }
        }
    }

    /// Every console line received so far.
    pub fn transcript(&self) -> Vec<String> {
        lock(&self.transcript).clone()
    }

    /// The console lines that contain one of [`KERNEL_ERROR_MARKERS`], except a warning that
    /// is expected while the guest powers off ([`POWER_OFF_WARNINGS`]), which is printed to
    /// stderr as such.
    pub fn kernel_errors(&self) -> Vec<String> {
        let (errors, expected) = classify(&lock(&self.transcript));
        for line in &expected {
            eprintln!("expected while powering off, not a kernel error: {line}");
        }
        errors
    }

    /// The console lines of warnings expected while the guest powers off
    /// ([`POWER_OFF_WARNINGS`]).
    pub fn power_off_warnings(&self) -> Vec<String> {
        classify(&lock(&self.transcript)).1
    }

    fn tail(&self) -> String {
        let transcript = lock(&self.transcript);
        let from = transcript.len().saturating_sub(TAIL_LINES);
        transcript[from..].join("\n")
    }
}

/// The transcript stays usable even if a thread panicked while holding it.
fn lock<T>(m: &Mutex<Vec<T>>) -> MutexGuard<'_, Vec<T>> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The warning as Debian's 6.1 guest printed it in the lab while powering off after a
    /// restore (lines shortened), with the register dump that says -EIO.
    fn report_warning(rax: &str) -> Vec<String> {
        [
            "[ 8.67] ------------[ cut here ]------------",
            "[ 8.70] WARNING: CPU: 0 PID: 50 at drivers/virtio/virtio_balloon.c:178 virtballoon_free_page_report+0x10c/0x120 [virtio_balloon]",
            "[ 8.82] Workqueue: events_freezable page_reporting_process",
            &format!("[ 8.97] RAX: {rax} RBX: ffff89a2819b9e00 RCX: 0000000000002800"),
            "[ 9.19] Call Trace:",
            "[ 9.23]  page_reporting_process+0x234/0x570",
            "[ 9.36] ---[ end trace 0000000000000000 ]---",
        ]
        .map(String::from)
        .to_vec()
    }

    fn console(parts: &[&[String]]) -> Vec<String> {
        parts.concat()
    }

    #[test]
    fn the_reporting_warning_is_expected_only_while_powering_off_with_eio() {
        let eio = report_warning("00000000fffffffb");
        let shutdown = ["OK shutdown".to_string()];
        let oops = ["[ 9.8] BUG: kernel NULL pointer dereference".to_string()];

        // After `shutdown`, with -EIO: expected; an error after the block still counts.
        let (errors, expected) = classify(&console(&[&shutdown, &eio, &oops]));
        assert_eq!(
            expected,
            eio[1..].to_vec(),
            "from the WARNING line to the end of trace"
        );
        assert_eq!(errors, oops.to_vec());

        // The same warning while the guest runs: a kernel error.
        let (errors, expected) = classify(&console(&[&eio, &shutdown]));
        assert!(expected.is_empty());
        assert_eq!(errors, vec![eio[1].clone(), eio[4].clone()]);

        // Another error code (-ENOSPC: leaked descriptors) while powering off: an error.
        let enospc = report_warning("00000000fffffffc");
        let (errors, expected) = classify(&console(&[&shutdown, &enospc]));
        assert!(expected.is_empty());
        assert_eq!(errors.len(), 2, "{errors:?}");

        // A console that ends inside the trace is judged on what it has.
        let (errors, expected) = classify(&console(&[&shutdown, &eio[..4]]));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(expected.len(), 3);

        // Started after the kernel's last line and cut off by the power before its
        // registers (seen in the lab, 2026-12-02): expected, it cannot be checked.
        let down = ["[ 9.0] reboot: Power down".to_string()];
        let (errors, expected) = classify(&console(&[&shutdown, &down, &eio[..2]]));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(expected, eio[1..2].to_vec());
        // Started before the power-down line, which another CPU printed in the middle of the
        // trace, then cut off (lab, 2026-12-04: CPU 1's trace interleaved with CPU 0's
        // "reboot: Power down", the console ending before the registers): expected too.
        let interleaved = console(&[&shutdown, &eio[..2], &down, &eio[2..3]]);
        let (errors, expected) = classify(&interleaved);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(expected.len(), 3, "{expected:?}");
        // The same cut-off warning with no power-down line at all is judged on what it has:
        // an error, as its registers are missing (the guest may still be running).
        let (errors, _) = classify(&console(&[&shutdown, &eio[..2]]));
        assert_eq!(errors, vec![eio[1].clone()]);
    }

    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn the_gaps_span_both_consoles() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let ms = Duration::from_millis;
        // Source beats every 10 ms up to 7 but stalls 300 ms between 3 and 4 (busy in its
        // kernel); the destination's first is 8, 90 ms after the source's 7.
        let mut source: Vec<Heartbeat> = (0..4).map(|n| (at(10 * n), n)).collect();
        source.extend((4..8).map(|n| (at(300 + 10 * n), n)));
        let destination: Vec<Heartbeat> = vec![(at(460), 8), (at(470), 9), (at(480), 10)];
        let gaps = heartbeat_gaps(&source, &destination, t0).unwrap();
        assert_eq!((gaps.switchover, gaps.largest), (ms(90), ms(310)));
        // Only what arrived since the migration began counts; a beat both consoles delivered
        // counts once, at its first arrival.
        let early: Vec<Heartbeat> = vec![(at(0), 0), (at(5), 1)];
        assert_eq!(heartbeat_gaps(&early, &destination, at(10)), None);
        let repeated = [&[(at(500), 7)][..], &destination].concat();
        assert_eq!(heartbeat_gaps(&source, &repeated, t0), Some(gaps));
        // Without a later beat on the destination: not measured.
        assert_eq!(heartbeat_gaps(&source, &[], t0), None);
        assert_eq!(heartbeat_gaps(&source, &source[..3], t0), None);
        assert_eq!(heartbeat_number("HB 42"), Some(42));
        assert_eq!(heartbeat_number("HB x"), None);
        assert_eq!(heartbeat_number("OK HB 1"), None);
    }

    #[test]
    fn heartbeats_are_recorded_with_their_arrival() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let client = AgentClient::new(ours.try_clone().unwrap(), ours);
        let before = Instant::now();
        let mut out = theirs;
        writeln!(out, "HB 3\r\nnoise\nHB 4").unwrap();
        drop(out);
        let deadline = Instant::now() + Duration::from_secs(5);
        while client.heartbeats().len() < 2 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        let beats = client.heartbeats();
        assert_eq!(beats.iter().map(|h| h.1).collect::<Vec<_>>(), [3, 4]);
        assert!(beats.iter().all(|h| h.0 >= before));
    }

    /// A fake guest console: kernel noise, then READY, then scripted answers per command.
    fn fake_console(answers: &'static [(&'static str, &'static [&'static str])]) -> AgentClient {
        let (ours, theirs) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            let mut out = theirs.try_clone().unwrap();
            writeln!(out, "[    0.5] virtio_balloon: loading\r").unwrap();
            writeln!(out, "{READY_LINE}").unwrap();
            for line in BufReader::new(theirs).lines() {
                let line = line.unwrap();
                let Some((_, reply)) = answers.iter().find(|(c, _)| *c == line) else {
                    continue; // No answer: the client times out.
                };
                for r in reply.iter() {
                    writeln!(out, "{r}").unwrap();
                }
            }
        });
        AgentClient::new(ours.try_clone().unwrap(), ours)
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn the_page_checker_count_is_read_and_a_lost_write_is_an_error() {
        let status =
            "workload status kind=churn cycles=3 kind=check pages=512 mismatches=0 first=-";
        assert_eq!(checker_pages(status), Ok(512));
        let lost = "workload status kind=check pages=512 mismatches=2 first=17";
        assert!(checker_pages(lost).unwrap_err().contains("lost a write"));
        assert!(checker_pages("workload status kind=none").is_err());
        assert!(is_heartbeat("HB 12") && !is_heartbeat("OK HB"));
    }

    #[test]
    fn waits_for_the_answer_past_noise_and_heartbeats() {
        let mut agent = fake_console(&[
            (
                "verify",
                &[
                    "HB 1",
                    "# checking",
                    "[ 2.2] Speculative Return Stack Overflow: WARNING: See https://...",
                    "[ 3.0] WARNING: CPU: 0 PID: 1 at mm/x.c:1",
                    "OK verify pages=3",
                ],
            ),
            (
                "dataset 0",
                &["ERR dataset: \"0\" is not a number in 1..=1048576"],
            ),
        ]);
        agent.wait_ready(T).unwrap();
        assert_eq!(agent.command("verify", T).unwrap(), "verify pages=3");
        let err = agent.command("dataset 0", T).unwrap_err();
        assert!(
            matches!(&err, AgentError::Refused { answer, .. } if answer.starts_with("ERR dataset:")),
            "{err}"
        );
        assert_eq!(
            agent.kernel_errors(),
            vec!["[ 3.0] WARNING: CPU: 0 PID: 1 at mm/x.c:1"]
        );
        let transcript = agent.transcript();
        assert_eq!(
            transcript[0], "[    0.5] virtio_balloon: loading",
            "CR stripped"
        );
        assert!(transcript.contains(&"HB 1".to_string()));
    }

    #[test]
    fn times_out_with_the_console_tail() {
        let mut agent = fake_console(&[]);
        agent.wait_ready(T).unwrap();
        let err = agent
            .command("features", Duration::from_millis(100))
            .unwrap_err();
        match err {
            AgentError::Timeout { tail, .. } => assert!(tail.ends_with(READY_LINE)),
            other => panic!("expected a timeout, got {other}"),
        }
        assert!(matches!(
            agent.command("a\nb", T),
            Err(AgentError::NotOneLine(_))
        ));
    }

    #[test]
    fn reports_a_closed_console() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let mut agent = AgentClient::new(ours.try_clone().unwrap(), ours);
        assert!(matches!(
            agent.wait_ready(T),
            Err(AgentError::Closed { .. })
        ));
    }
}
