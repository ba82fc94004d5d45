//! Migration settings: `ferry migrate`'s flags and the API's `options` object.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use ferry_migration::{MigrationConfig, Policy};
use serde::{Deserialize, Serialize};

use super::MigrateError;

/// Migration settings, as given to `ferry migrate` and in the API's `options` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MigrateOptions {
    /// Use hint sources (balloon hints, reported ranges, never-populated memory).
    pub hints: bool,
    /// Longest acceptable pause of the guest, milliseconds.
    pub downtime_ms: u64,
    /// Send rate limit in bytes per second; none when absent.
    pub bandwidth: Option<u64>,
    /// Ask the guest's balloon driver for free page hints (with `hints`). The balloon's
    /// reported ranges and never-populated memory are used either way.
    pub free_page_hint: bool,
    /// How long the bulk round may wait for the hint sources' first answers, milliseconds
    /// (bounded, cut short once every source is done); the engine's default when absent.
    pub hint_head_start_ms: Option<u64>,
    /// Parallel connections (1 to 16).
    pub connections: u16,
    /// Arm KVM's dirty log lazily (manual protection, pages initially dirty) where KVM
    /// supports it: the guest's writes to pages not sent yet cost no write fault. `false`
    /// write-protects all RAM at the start, which suits guests that do not clear the pages
    /// they hint (see `ferry_migration::dirty`).
    pub lazy_dirty_log: bool,
    /// Check at the switchover that the dirty log missed no write and send what it missed
    /// (`ferry_migration::audit`); adds a read of the sent pages to the downtime.
    pub audit_dirty_log: bool,
    /// Give up after this many seconds (the VM keeps running here).
    pub timeout_s: u64,
    /// Iterative rounds after the bulk round before the policy below applies.
    pub rounds_max: u32,
    /// After `rounds_max` rounds without convergence: `switch-over` anyway (the pause exceeds
    /// `downtime_ms`) or `cancel` (the guest keeps running here).
    pub on_no_convergence: ferry_migration::OnNoConvergence,
    /// Migrate over mutually authenticated TLS 1.3 with these PEM files (absolute paths,
    /// read by the VMM when the migration starts); plain when absent.
    pub tls: Option<ferry_migration::TlsFiles>,
    /// With `tls`: the name the destination's certificate must carry, when it is not the host
    /// part of the destination's address.
    pub tls_server_name: Option<String>,
    /// Compression of page data, offered to the destination (used if it accepts): `"none"`
    /// or `{"zstd": {"level": N}}` (1-19). Worth it when the link, not the CPU, is the limit.
    pub compression: ferry_migration::Compression,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            hints: true,
            downtime_ms: 300,
            bandwidth: None,
            free_page_hint: true,
            hint_head_start_ms: None,
            connections: 1,
            lazy_dirty_log: true,
            audit_dirty_log: false,
            timeout_s: 30 * 60,
            rounds_max: ferry_migration::Policy::default().rounds_max,
            on_no_convergence: ferry_migration::OnNoConvergence::SwitchOver,
            tls: None,
            tls_server_name: None,
            compression: ferry_migration::Compression::None,
        }
    }
}

impl MigrateOptions {
    /// The TLS credentials, loaded, when the migration is to use TLS.
    pub(super) fn tls(&self) -> Result<Option<ferry_migration::Tls>, MigrateError> {
        let Some(files) = &self.tls else {
            if self.tls_server_name.is_some() {
                return Err(MigrateError::Options(
                    "a TLS server name without TLS files".into(),
                ));
            }
            return Ok(None);
        };
        let mut tls = ferry_migration::Tls::from_files(files)?;
        if let Some(name) = &self.tls_server_name {
            tls = tls.with_server_name(name)?;
        }
        Ok(Some(tls))
    }

    pub(super) fn engine_config(
        &self,
        cancel: Arc<AtomicBool>,
    ) -> Result<MigrationConfig, MigrateError> {
        if self.connections == 0 || self.connections > ferry_migration::transport::CONNECTIONS_MAX {
            return Err(MigrateError::Options(format!(
                "connections must be between 1 and {}, got {}",
                ferry_migration::transport::CONNECTIONS_MAX,
                self.connections
            )));
        }
        if self.bandwidth == Some(0) || self.timeout_s == 0 {
            return Err(MigrateError::Options(
                "bandwidth and timeout must be positive".into(),
            ));
        }
        let compression = self.compression.validate().map_err(MigrateError::Options)?;
        let defaults = MigrationConfig::default();
        let config = MigrationConfig {
            compression,
            audit_dirty_log: self.audit_dirty_log,
            hint_head_start: self
                .hint_head_start_ms
                .map_or(defaults.hint_head_start, Duration::from_millis),
            policy: Policy {
                downtime_max: Duration::from_millis(self.downtime_ms),
                rounds_max: self.rounds_max,
                on_no_convergence: self.on_no_convergence,
                ..Policy::default()
            },
            timeout: Duration::from_secs(self.timeout_s),
            bandwidth_limit: self.bandwidth,
            hints: self.hints,
            cancel,
            ..defaults
        };
        config.validate().map_err(MigrateError::Options)?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_have_defaults_and_refuse_unknown_fields() {
        let o: MigrateOptions = serde_json::from_str("{}").unwrap();
        assert_eq!(o, MigrateOptions::default());
        assert!(o.hints, "hints are on by default");
        let o: MigrateOptions =
            serde_json::from_str(r#"{"hints":false,"connections":4,"bandwidth":1000}"#).unwrap();
        assert_eq!(
            (o.hints, o.connections, o.bandwidth),
            (false, 4, Some(1000))
        );
        assert!(serde_json::from_str::<MigrateOptions>(r#"{"hint":false}"#).is_err());
    }

    #[test]
    fn options_are_checked_before_anything_happens() {
        let cancel = Arc::new(AtomicBool::new(false));
        let bad = |o: MigrateOptions| o.engine_config(cancel.clone()).unwrap_err().to_string();
        let e = bad(MigrateOptions {
            connections: 0,
            ..Default::default()
        });
        assert!(e.contains("between 1 and 16"), "{e}");
        let e = bad(MigrateOptions {
            connections: 17,
            ..Default::default()
        });
        assert!(e.contains("got 17"), "{e}");
        let e = bad(MigrateOptions {
            bandwidth: Some(0),
            ..Default::default()
        });
        assert!(e.contains("positive"), "{e}");
        let e = bad(MigrateOptions {
            compression: ferry_migration::Compression::Zstd { level: 99 },
            ..Default::default()
        });
        assert!(e.contains("zstd level 99"), "{e}");
        // Durations no deadline can be computed from are refused, not a panic at the pause.
        let e = bad(MigrateOptions {
            downtime_ms: u64::MAX,
            ..Default::default()
        });
        assert!(e.contains("downtime limit"), "{e}");
        let e = bad(MigrateOptions {
            timeout_s: u64::MAX,
            ..Default::default()
        });
        assert!(e.contains("timeout"), "{e}");
        let e = bad(MigrateOptions {
            hint_head_start_ms: Some(u64::MAX),
            ..Default::default()
        });
        assert!(e.contains("hint head start"), "{e}");
        let c = MigrateOptions {
            downtime_ms: 50,
            hints: false,
            ..Default::default()
        }
        .engine_config(cancel)
        .unwrap();
        assert_eq!(c.policy.downtime_max, Duration::from_millis(50));
        assert!(!c.hints);
    }

    #[test]
    fn tls_files_are_read_when_the_migration_starts_and_checked() {
        let o: MigrateOptions = serde_json::from_str(
            r#"{"tls":{"cert":"/x/c.pem","key":"/x/k.pem","ca":"/x/ca.pem"},"tls_server_name":"b"}"#,
        )
        .unwrap();
        assert_eq!(
            o.tls.as_ref().unwrap().ca,
            std::path::Path::new("/x/ca.pem")
        );
        let e = o.tls().unwrap_err().to_string();
        assert!(e.contains("/x/c.pem"), "{e}");

        let dir = std::env::temp_dir().join(format!("ferry-vmm-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = ferry_lab::pki::TestCa::new("test CA")
            .write_end(&dir, "a", &["host-a"])
            .unwrap();
        let mut o = MigrateOptions {
            tls: Some(ferry_migration::TlsFiles {
                cert: files.cert,
                key: files.key,
                ca: files.ca,
            }),
            ..Default::default()
        };
        assert!(o.tls().unwrap().is_some());
        o.tls_server_name = Some("host-b.example".into());
        assert!(o.tls().unwrap().is_some());
        o.tls_server_name = Some("not a name".into());
        assert!(o.tls().unwrap_err().to_string().contains("not a DNS name"));
        o.tls = None;
        let e = o.tls().unwrap_err().to_string();
        assert!(e.contains("without TLS files"), "{e}");
        assert!(MigrateOptions::default().tls().unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
