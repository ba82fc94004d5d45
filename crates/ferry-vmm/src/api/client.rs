//! The client the `ferry` CLI uses.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{ApiError, Greeting, Reply, Request, API_VERSION, REPLY_TIMEOUT};

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
                    Ok(reply) if !reply.ok => reply.refused(),
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
            Err(reply.refused())
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
