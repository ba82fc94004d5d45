//! A minimal QMP (QEMU Machine Protocol) client: connect to `-qmp unix:PATH,server=on,wait=off`,
//! negotiate, execute commands, and read `query-migrate`.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};
use thiserror::Error;

/// How long one QMP reply may take (QEMU answers from its main loop, which a migration keeps
/// busy in the lab).
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a QMP exchange failed.
#[derive(Debug, Error)]
pub enum QmpError {
    /// No QMP socket to connect to in time.
    #[error("cannot connect to QMP at {path} within {timeout:?}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// How long we tried.
        timeout: Duration,
        /// The last error.
        source: io::Error,
    },
    /// Reading or writing the socket failed (or QEMU closed it).
    #[error("QMP I/O on {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// QEMU sent something that is not a QMP message.
    #[error("unexpected QMP message from {path}: {message}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What came.
        message: String,
    },
    /// QEMU refused a command.
    #[error("QEMU refused `{command}`: {class}: {desc}")]
    Refused {
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// A negotiated QMP connection.
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (retrying until the socket exists or `timeout`), reads the greeting and leaves
    /// capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(source) if Instant::now() >= deadline => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        timeout,
                        source,
                    })
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        };
        let io = |source| QmpError::Io {
            path: path.to_path_buf(),
            source,
        };
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Self {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(qmp.protocol(&greeting));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn protocol(&self, message: &Value) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            message: message.to_string(),
        }
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Io {
                path: self.path.clone(),
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "QEMU closed QMP"),
            });
        }
        serde_json::from_str(&line).map_err(|_| QmpError::Protocol {
            path: self.path.clone(),
            message: line.trim_end().to_string(),
        })
    }

    /// Executes `command` with `arguments` and returns its `return` value; events that arrive
    /// meanwhile are skipped.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let text = request.to_string() + "\n";
        self.writer
            .write_all(text.as_bytes())
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                continue;
            }
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let field = |name| {
                    error
                        .get(name)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string()
                };
                return Err(QmpError::Refused {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(self.protocol(&message));
        }
    }

    /// `query-migrate`.
    pub fn query_migrate(&mut self) -> Result<MigrateInfo, QmpError> {
        let value = self.execute("query-migrate", None)?;
        serde_json::from_value(value.clone()).map_err(|_| self.protocol(&value))
    }

    /// `query-status`: the run state, e.g. `running`, `inmigrate`, `postmigrate`.
    pub fn run_state(&mut self) -> Result<String, QmpError> {
        let value = self.execute("query-status", None)?;
        value
            .get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| self.protocol(&value))
    }
}

/// The fields of QEMU's `MigrationInfo` the benchmark reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateInfo {
    /// `setup`, `active`, `device`, `completed`, `failed`, `cancelled`, ... (absent before
    /// the first migration).
    #[serde(default)]
    pub status: Option<String>,
    /// Milliseconds from the start to completion (or so far).
    #[serde(default)]
    pub total_time: Option<u64>,
    /// Milliseconds the guest was stopped (when completed).
    #[serde(default)]
    pub downtime: Option<u64>,
    /// RAM statistics.
    #[serde(default)]
    pub ram: Option<RamInfo>,
    /// Why it failed.
    #[serde(default)]
    pub error_desc: Option<String>,
}

/// The fields of QEMU's `MigrationStats` (`ram`) the benchmark reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamInfo {
    /// Bytes transferred (pages, headers, zero-page markers).
    #[serde(default)]
    pub transferred: u64,
    /// Zero pages ("duplicate").
    #[serde(default)]
    pub duplicate: u64,
    /// Pages sent with data.
    #[serde(default)]
    pub normal: u64,
    /// Dirty bitmap syncs (roughly: rounds).
    #[serde(default)]
    pub dirty_sync_count: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn negotiates_skips_events_and_reads_migration_info() {
        let dir = std::env::temp_dir().join(format!("ferry-qmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut out = stream.try_clone().unwrap();
            let mut lines = BufReader::new(stream).lines();
            writeln!(out, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut next = || lines.next().unwrap().unwrap();
            assert_eq!(next(), r#"{"execute":"qmp_capabilities"}"#);
            writeln!(out, r#"{{"return": {{}}}}"#).unwrap();
            assert_eq!(next(), r#"{"execute":"query-migrate"}"#);
            writeln!(
                out,
                r#"{{"event": "MIGRATION", "data": {{"status": "completed"}}}}"#
            )
            .unwrap();
            let reply = r#"{"return": {"status": "completed", "total-time": 5520, "downtime": 41,
                "setup-time": 3, "ram": {"transferred": 3376414720, "duplicate": 9, "normal": 786,
                "dirty-sync-count": 3, "mbps": 1.5}}}"#;
            writeln!(out, "{}", reply.replace('\n', "")).unwrap();
            assert!(next().contains(r#""execute":"migrate""#));
            writeln!(
                out,
                r#"{{"error": {{"class": "GenericError", "desc": "no way"}}}}"#
            )
            .unwrap();
        });
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let info = qmp.query_migrate().unwrap();
        assert_eq!(info.status.as_deref(), Some("completed"));
        assert_eq!((info.total_time, info.downtime), (Some(5520), Some(41)));
        let ram = info.ram.unwrap();
        assert_eq!(
            (
                ram.transferred,
                ram.duplicate,
                ram.normal,
                ram.dirty_sync_count
            ),
            (3_376_414_720, 9, 786, 3)
        );
        let err = qmp
            .execute("migrate", Some(json!({"uri": "tcp:127.0.0.1:1"})))
            .unwrap_err();
        assert!(
            matches!(&err, QmpError::Refused { desc, .. } if desc == "no way"),
            "{err}"
        );
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
