//! # ferry-guest-agent
//!
//! The program ferry's tests talk to inside a guest. The guest image's `/init` runs it with
//! stdin and stdout on the serial console (`/dev/ttyS0`, canonical mode, echo off). It speaks a
//! line protocol; every line is ASCII and ends with `\n`.
//!
//! ## Protocol
//!
//! When ready the agent prints `FERRY-AGENT READY`. It then reads one command per line and
//! answers each with exactly one line starting with `OK <command>` or `ERR <command>: <reason>`.
//! Before the answer it may print progress lines starting with `# `. Lines starting with
//! `HB <n>` are heartbeats and may appear at any time between other lines. Anything else on the
//! console comes from the kernel.
//!
//! | command | answer |
//! |---|---|
//! | `features` | `OK features <64 chars of 0/1, bit 0 first> <names of the set bits>` for the virtio device with device id 5 (balloon), e.g. `... FREE_PAGE_HINT PAGE_REPORTING VERSION_1` |
//! | `meminfo` | `OK meminfo total_kib=N free_kib=N available_kib=N` |
//! | `workload idle` | stops any background workload: `OK workload idle` |
//! | `workload freed <MiB>` | touches MiB of RAM with non-zero data, frees it to the kernel: `OK workload freed mib=N` |
//! | `workload dirty <MiB> <MiB/s>` | starts writing MiB/s over a working set of MiB in the background: `OK workload dirty started` |
//! | `workload check <MiB> <MiB/s>` | starts rewriting MiB/s over a working set of MiB in the background, checking each page against its last write before rewriting it: `OK workload check started` |
//! | `workload churn <MiB>` | starts an allocate/touch/free loop of MiB in the background: `OK workload churn started` |
//! | `workload status` | what the background workloads did so far, without stopping them (format of `stop`) |
//! | `workload stop` | stops every background workload: `OK workload stop` and, per workload in start order, `kind=dirty pages=N`, `kind=check pages=N mismatches=M first=<page or ->`, `kind=churn cycles=N`; or `kind=none` |
//! | `dataset <MiB>` | allocates the integrity data set (replacing any previous one): `OK dataset pages=N generation=G` |
//! | `verify` | checks every data set page: `OK verify pages=N` or `ERR verify mismatches=N first=<page index>` |
//! | `bump` | increments the generation and rewrites every page: `OK bump pages=N generation=G` |
//! | `heartbeat <ms>` | prints `HB <n>` every ms milliseconds (0 = off, n never repeats): `OK heartbeat interval_ms=N` |
//! | `shutdown` | answers `OK shutdown` and exits; the guest's init then powers off |
//!
//! Every page of the data set is a pure function of (page index, generation), see [`dataset`],
//! so a page the VMM lost, zeroed or sent from the wrong round is found by `verify`.
//! Bad commands get an `ERR` answer; the agent never exits on one.
#![deny(unsafe_code)]

mod command;
mod dataset;
mod heartbeat;
mod mem;
mod output;
mod sysinfo;
mod workload;

use std::io::{self, BufRead, Read};

use command::{Command, WorkloadCommand};
use dataset::Dataset;
use heartbeat::Heartbeat;
use output::emit;
use workload::Workloads;

/// Longest command line accepted; longer lines are answered with an error and skipped.
const LINE_BYTES_MAX: u64 = 1024;

/// Allocations at least this large are served by mmap, so freeing them returns the pages to the
/// kernel at once (where the balloon's free page reporting and hinting can see them).
const MMAP_THRESHOLD_BYTES: i32 = 128 * 1024;

/// The agent's state: everything a command may act on.
#[derive(Default)]
struct Agent {
    dataset: Option<Dataset>,
    workloads: Workloads,
    heartbeat: Heartbeat,
}

/// What the main loop does after a command.
enum Next {
    Continue,
    Exit,
}

impl Agent {
    /// Runs one command and returns its answer line (without the newline).
    fn execute(&mut self, command: Command) -> (String, Next) {
        let answer = match command {
            Command::Features => sysinfo::balloon_features()
                .map(|f| format!("OK features {f}"))
                .unwrap_or_else(|e| format!("ERR features: {e}")),
            Command::Meminfo => sysinfo::meminfo()
                .map(|m| format!("OK meminfo {m}"))
                .unwrap_or_else(|e| format!("ERR meminfo: {e}")),
            Command::Threads => format!("OK threads {}", sysinfo::threads()),
            Command::Blocked => format!("OK blocked {}", sysinfo::blocked()),
            Command::Workload(w) => self.workload(w),
            Command::Dataset { mib } => {
                // Drop the old data set first so both never occupy memory at once.
                self.dataset = None;
                match Dataset::new(mib) {
                    Ok(d) => {
                        let answer = format!(
                            "OK dataset pages={} generation={}",
                            d.pages(),
                            d.generation()
                        );
                        self.dataset = Some(d);
                        answer
                    }
                    Err(e) => format!("ERR dataset: {e}"),
                }
            }
            Command::Verify => match &self.dataset {
                None => "ERR verify: no data set (send `dataset <MiB>` first)".to_string(),
                Some(d) => {
                    let report = d.verify();
                    match report.first_mismatch {
                        None => format!("OK verify pages={}", report.pages),
                        Some(first) => {
                            format!("ERR verify mismatches={} first={first}", report.mismatches)
                        }
                    }
                }
            },
            Command::Bump => match &mut self.dataset {
                None => "ERR bump: no data set (send `dataset <MiB>` first)".to_string(),
                Some(d) => {
                    d.bump();
                    format!("OK bump pages={} generation={}", d.pages(), d.generation())
                }
            },
            Command::Heartbeat { interval_ms } => {
                self.heartbeat.set_interval(interval_ms);
                format!("OK heartbeat interval_ms={interval_ms}")
            }
            Command::Shutdown => return ("OK shutdown".to_string(), Next::Exit),
        };
        (answer, Next::Continue)
    }

    fn workload(&mut self, command: WorkloadCommand) -> String {
        match command {
            WorkloadCommand::Idle => match self.workloads.stop() {
                Ok(_) => "OK workload idle".to_string(),
                Err(e) => format!("ERR workload idle: {e}"),
            },
            WorkloadCommand::Freed { mib } => match workload::freed(mib) {
                Ok(()) => format!("OK workload freed mib={mib}"),
                Err(e) => format!("ERR workload freed: {e}"),
            },
            WorkloadCommand::Dirty { mib, mib_per_s } => {
                match self.workloads.start_dirty(mib, mib_per_s) {
                    Ok(()) => "OK workload dirty started".to_string(),
                    Err(e) => format!("ERR workload dirty: {e}"),
                }
            }
            WorkloadCommand::Check { mib, mib_per_s } => {
                match self.workloads.start_check(mib, mib_per_s) {
                    Ok(()) => "OK workload check started".to_string(),
                    Err(e) => format!("ERR workload check: {e}"),
                }
            }
            WorkloadCommand::Status => match self.workloads.status() {
                Ok(summary) => format!("OK workload status {summary}"),
                Err(e) => format!("ERR workload status: {e}"),
            },
            WorkloadCommand::Churn { mib } => match self.workloads.start_churn(mib) {
                Ok(()) => "OK workload churn started".to_string(),
                Err(e) => format!("ERR workload churn: {e}"),
            },
            WorkloadCommand::Stop => match self.workloads.stop() {
                Ok(summary) => format!("OK workload stop {summary}"),
                Err(e) => format!("ERR workload stop: {e}"),
            },
        }
    }
}

/// Makes glibc serve large allocations with mmap so that freeing them unmaps the pages.
#[allow(unsafe_code)]
fn set_mmap_threshold() -> bool {
    // SAFETY: mallopt only changes parameters of glibc's allocator and is called from main before
    // any other thread exists; it takes no pointers.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 }
}

fn main() {
    if !set_mmap_threshold() {
        emit(format_args!(
            "# warning: mallopt(M_MMAP_THRESHOLD) failed; freed memory may stay in the heap"
        ));
    }
    let mut agent = Agent::default();
    emit(format_args!("FERRY-AGENT READY"));

    let stdin = io::stdin();
    let mut input = stdin.lock();
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = match input
            .by_ref()
            .take(LINE_BYTES_MAX)
            .read_until(b'\n', &mut line)
        {
            Ok(n) => n,
            Err(e) => {
                emit(format_args!("ERR input: {e}"));
                continue;
            }
        };
        if read == 0 {
            // End of input (a hung-up serial line): nobody can talk to us any more.
            emit(format_args!("# end of input: the agent exits"));
            break;
        }
        if line.last() != Some(&b'\n') && read as u64 == LINE_BYTES_MAX {
            skip_rest_of_line(&mut input);
            emit(format_args!(
                "ERR input: line longer than {LINE_BYTES_MAX} bytes"
            ));
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let (answer, next) = match command::parse(text) {
            Ok(command) => agent.execute(command),
            Err(e) => (format!("ERR {e}"), Next::Continue),
        };
        emit(format_args!("{answer}"));
        if let Next::Exit = next {
            break;
        }
    }
    // The guest powers off next; a failed workload has nobody left to report to.
    let _ = agent.workloads.stop();
    agent.heartbeat.set_interval(0);
}

fn skip_rest_of_line(input: &mut impl BufRead) {
    let mut discard = Vec::new();
    loop {
        discard.clear();
        match input
            .by_ref()
            .take(LINE_BYTES_MAX)
            .read_until(b'\n', &mut discard)
        {
            Ok(0) | Err(_) => return,
            Ok(_) if discard.last() == Some(&b'\n') => return,
            Ok(_) => {}
        }
    }
}
