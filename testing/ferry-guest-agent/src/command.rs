//! Parsing of the agent's command lines (see the protocol table in the crate documentation).

use thiserror::Error;

/// Largest data set or workload size accepted, in MiB. The real limit is the guest's memory;
/// this one only keeps sizes in a range where byte counts cannot overflow.
pub const MIB_MAX: u64 = 1 << 20;

/// Heartbeat intervals shorter than this would flood the console.
pub const HEARTBEAT_MS_MIN: u64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Features,
    Meminfo,
    Threads,
    /// Every task of the guest in uninterruptible sleep, with its kernel stack.
    Blocked,
    Workload(WorkloadCommand),
    Dataset {
        mib: u64,
    },
    Verify,
    Bump,
    Heartbeat {
        interval_ms: u64,
    },
    Shutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadCommand {
    Idle,
    Freed { mib: u64 },
    Dirty { mib: u64, mib_per_s: u64 },
    Check { mib: u64, mib_per_s: u64 },
    Status,
    Churn { mib: u64 },
    Stop,
}

/// Why a line is not a command. Displayed after `ERR `, so it starts with the command name.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("{0}: unknown command (features, meminfo, threads, blocked, workload, dataset, verify, bump, heartbeat, shutdown)")]
    Unknown(String),
    #[error("{command}: usage: {usage}")]
    Usage {
        command: &'static str,
        usage: &'static str,
    },
    #[error("{command}: {value:?} is not a number in {min}..={max}")]
    Number {
        command: &'static str,
        value: String,
        min: u64,
        max: u64,
    },
}

/// Parses one trimmed, non-empty command line.
pub fn parse(line: &str) -> Result<Command, ParseError> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let usage = |command, usage| ParseError::Usage { command, usage };
    match words.as_slice() {
        ["features"] => Ok(Command::Features),
        ["meminfo"] => Ok(Command::Meminfo),
        ["threads"] => Ok(Command::Threads),
        ["blocked"] => Ok(Command::Blocked),
        ["verify"] => Ok(Command::Verify),
        ["bump"] => Ok(Command::Bump),
        ["shutdown"] => Ok(Command::Shutdown),
        ["dataset", mib] => Ok(Command::Dataset {
            mib: number("dataset", mib, 1, MIB_MAX)?,
        }),
        ["dataset", ..] => Err(usage("dataset", "dataset <MiB>")),
        ["heartbeat", ms] => {
            let interval_ms = number("heartbeat", ms, 0, u64::from(u32::MAX))?;
            if interval_ms != 0 && interval_ms < HEARTBEAT_MS_MIN {
                return Err(ParseError::Number {
                    command: "heartbeat",
                    value: ms.to_string(),
                    min: HEARTBEAT_MS_MIN,
                    max: u64::from(u32::MAX),
                });
            }
            Ok(Command::Heartbeat { interval_ms })
        }
        ["heartbeat", ..] => Err(usage("heartbeat", "heartbeat <ms> (0 = off)")),
        ["workload", rest @ ..] => parse_workload(rest).map(Command::Workload),
        [other, ..] => Err(ParseError::Unknown((*other).to_string())),
        [] => Err(ParseError::Unknown(String::new())),
    }
}

fn parse_workload(words: &[&str]) -> Result<WorkloadCommand, ParseError> {
    const USAGE: &str = "workload idle | freed <MiB> | dirty <MiB> <MiB/s> | check <MiB> <MiB/s> | churn <MiB> | status | stop";
    let mib = |s: &str| number("workload", s, 1, MIB_MAX);
    match words {
        ["idle"] => Ok(WorkloadCommand::Idle),
        ["stop"] => Ok(WorkloadCommand::Stop),
        ["status"] => Ok(WorkloadCommand::Status),
        ["check", m, rate] => Ok(WorkloadCommand::Check {
            mib: mib(m)?,
            mib_per_s: mib(rate)?,
        }),
        ["freed", m] => Ok(WorkloadCommand::Freed { mib: mib(m)? }),
        ["dirty", m, rate] => Ok(WorkloadCommand::Dirty {
            mib: mib(m)?,
            mib_per_s: mib(rate)?,
        }),
        ["churn", m] => Ok(WorkloadCommand::Churn { mib: mib(m)? }),
        _ => Err(ParseError::Usage {
            command: "workload",
            usage: USAGE,
        }),
    }
}

fn number(command: &'static str, value: &str, min: u64, max: u64) -> Result<u64, ParseError> {
    value
        .parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| ParseError::Number {
            command,
            value: value.to_string(),
            min,
            max,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        assert_eq!(parse("features"), Ok(Command::Features));
        assert_eq!(parse("meminfo"), Ok(Command::Meminfo));
        assert_eq!(parse("threads"), Ok(Command::Threads));
        assert_eq!(parse("blocked"), Ok(Command::Blocked));
        assert_eq!(parse("dataset 64"), Ok(Command::Dataset { mib: 64 }));
        assert_eq!(parse("verify"), Ok(Command::Verify));
        assert_eq!(parse("bump"), Ok(Command::Bump));
        assert_eq!(
            parse("heartbeat 0"),
            Ok(Command::Heartbeat { interval_ms: 0 })
        );
        assert_eq!(parse("shutdown"), Ok(Command::Shutdown));
        assert_eq!(
            parse("workload  dirty 128   16"),
            Ok(Command::Workload(WorkloadCommand::Dirty {
                mib: 128,
                mib_per_s: 16
            }))
        );
        assert_eq!(
            parse("workload freed 8"),
            Ok(Command::Workload(WorkloadCommand::Freed { mib: 8 }))
        );
        assert_eq!(
            parse("workload churn 8"),
            Ok(Command::Workload(WorkloadCommand::Churn { mib: 8 }))
        );
        assert_eq!(
            parse("workload idle"),
            Ok(Command::Workload(WorkloadCommand::Idle))
        );
        assert_eq!(
            parse("workload check 64 32"),
            Ok(Command::Workload(WorkloadCommand::Check {
                mib: 64,
                mib_per_s: 32
            }))
        );
        assert_eq!(
            parse("workload status"),
            Ok(Command::Workload(WorkloadCommand::Status))
        );
        assert_eq!(
            parse("workload stop"),
            Ok(Command::Workload(WorkloadCommand::Stop))
        );
    }

    #[test]
    fn rejects_bad_lines_with_the_command_name_first() {
        for (line, prefix) in [
            ("reboot", "reboot: unknown command"),
            ("dataset", "dataset: usage"),
            ("dataset 0", "dataset: \"0\" is not a number"),
            ("dataset -1", "dataset: \"-1\" is not a number"),
            ("dataset 99999999999999999999999", "dataset: "),
            ("workload", "workload: usage"),
            ("workload dirty 8", "workload: usage"),
            ("workload freed x", "workload: \"x\" is not a number"),
            ("heartbeat 5", "heartbeat: \"5\" is not a number in 10..="),
            ("verify now", "verify: unknown command"),
        ] {
            let err = parse(line).expect_err(line).to_string();
            assert!(err.starts_with(prefix), "{line:?} gave {err:?}");
        }
    }
}
