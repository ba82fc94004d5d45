//! What a benchmark run measured: one [`Sample`] per migration, grouped into [`Case`]s of the
//! matrix (workload x [`Variant`]), saved as JSON (`build/bench/results.json`).

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why results could not be saved or loaded.
#[derive(Debug, Error)]
pub enum ResultsError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The file is not valid results JSON.
    #[error("{path} is not a results file: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The error.
        source: serde_json::Error,
    },
}

/// What the guest does while it is migrated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Nothing: the guest idles after boot (and after the data set was written).
    Idle,
    /// Most of the guest's RAM touched with data, then freed, just before the migration.
    Freed,
    /// A background writer dirtying a working set at a fixed rate during the migration.
    Dirty,
}

impl Workload {
    /// Every workload, in table order.
    pub const ALL: [Self; 3] = [Self::Idle, Self::Freed, Self::Dirty];

    /// Lower-case name, as in the tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Freed => "freed",
            Self::Dirty => "dirty",
        }
    }
}

impl FromStr for Workload {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| format!("unknown workload {s:?} (idle, freed, dirty)"))
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which VMM migrates, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// ferry's VMM, hint sources off: every page is read and sent.
    FerryOff,
    /// ferry's VMM, hint sources on (balloon hints, reported ranges, unpopulated memory).
    FerryOn,
    /// Debian's QEMU, balloon without `free-page-hint`.
    QemuOff,
    /// Debian's QEMU, balloon with `free-page-hint=on` (on an iothread).
    QemuHint,
    /// ferry's VMM, hint sources on, page data compressed with zstd (level 1) on two
    /// connections.
    FerryZstd,
    /// Debian's QEMU without `free-page-hint`, multifd with zstd compression (level 1) on two
    /// channels.
    QemuZstd,
}

impl Variant {
    /// Every variant, in table and chart order.
    pub const ALL: [Self; 6] = [
        Self::FerryOff,
        Self::FerryOn,
        Self::QemuOff,
        Self::QemuHint,
        Self::FerryZstd,
        Self::QemuZstd,
    ];
    /// The variants `ferry bench-vm` runs unless told otherwise.
    pub const DEFAULT: [Self; 4] = [Self::FerryOff, Self::FerryOn, Self::QemuOff, Self::QemuHint];

    /// Column heading.
    pub fn label(self) -> &'static str {
        match self {
            Self::FerryOff => "ferry off",
            Self::FerryOn => "ferry on",
            Self::QemuOff => "QEMU off",
            Self::QemuHint => "QEMU hint",
            Self::FerryZstd => "ferry zstd",
            Self::QemuZstd => "QEMU zstd",
        }
    }

    /// Name on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::FerryOff => "ferry-off",
            Self::FerryOn => "ferry-on",
            Self::QemuOff => "qemu-off",
            Self::QemuHint => "qemu-hint",
            Self::FerryZstd => "ferry-zstd",
            Self::QemuZstd => "qemu-zstd",
        }
    }

    /// True for ferry's VMM.
    pub fn is_ferry(self) -> bool {
        matches!(self, Self::FerryOff | Self::FerryOn | Self::FerryZstd)
    }

    /// True where the VMM skips free memory the guest tells it about.
    pub fn hints(self) -> bool {
        matches!(self, Self::FerryOn | Self::FerryZstd | Self::QemuHint)
    }

    /// True where page data is compressed on the stream.
    pub fn compress(self) -> bool {
        matches!(self, Self::FerryZstd | Self::QemuZstd)
    }
}

impl FromStr for Variant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|v| v.name()).collect();
                format!("unknown variant {s:?} ({})", names.join(", "))
            })
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// One migration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Start of the migration to completion, as the VMM reports it, milliseconds.
    pub total_ms: f64,
    /// Guest paused, as the VMM reports it, milliseconds.
    pub downtime_ms: f64,
    /// Bytes the source sent (ferry: all stream bytes; QEMU: `ram.transferred`).
    pub bytes: u64,
    /// Pages sent with their data.
    pub pages_sent: u64,
    /// Zero pages (sent as a marker, or not at all).
    pub pages_zero: u64,
    /// Pages skipped by hints (ferry only; QEMU does not count them).
    pub pages_skipped: u64,
    /// Dirty-log syncs (QEMU) or rounds (ferry).
    pub rounds: u64,
    /// Request to completion as seen by the benchmark, milliseconds.
    pub wall_ms: f64,
    /// The agent's `verify` on the destination passed.
    pub verified: bool,
    /// The agent's `verify` answer (or the error).
    pub verify_answer: String,
    /// Kernel error lines on the source's console (the guest as migrated away).
    pub kernel_errors: Vec<String>,
    /// Where ferry's downtime went (QEMU does not say).
    #[serde(default)]
    pub switchover: Option<ferry_migration::SwitchoverStats>,
    /// The switchover as the guest's outside world saw it: from the source's last heartbeat
    /// (the guest prints one every [`HEARTBEAT_MS`]) to the destination's first, by their
    /// arrival on this host, ms. Includes up to one heartbeat interval.
    #[serde(default)]
    pub guest_pause_ms: Option<f64>,
    /// The largest gap between two of the guest's heartbeats over the whole migration, the
    /// switchover included, ms: also a guest stalled while it still runs on the source.
    #[serde(default)]
    pub guest_stall_ms: Option<f64>,
    /// The guest's memory in use before the workload started (MemTotal - MemFree), MiB.
    #[serde(default)]
    pub in_use_mib: Option<u64>,
    /// The guest's RAM less MemFree as the migration starts (after the workload started),
    /// MiB: what any free-page source leaves to send, zero pages aside. It counts the
    /// memory the kernel reserves at boot (its page descriptors, its image), which
    /// MemTotal leaves out.
    #[serde(default)]
    pub not_free_mib: Option<u64>,
    /// The part of MemFree in blocks Linux's balloon driver can hint (the buddy allocator's
    /// largest order, 4 MiB) as the migration starts, MiB.
    #[serde(default)]
    pub hintable_mib: Option<u64>,
    /// ferry's final (stop-and-copy) round: pages queued, of which sent with data and
    /// found zero (QEMU does not say).
    #[serde(default)]
    pub final_round_pages: Option<[u64; 3]>,
    /// ferry's rounds as its engine reported them (QEMU does not say), for looking into a
    /// sample: what each round queued, sent, skipped and how long it took.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rounds_detail: Vec<ferry_migration::RoundStats>,
    /// ferry's free-page sources as its engine counted them (QEMU does not say): ranges
    /// applied, pages they covered and pages they spared.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<ferry_migration::SourceStats>,
}

/// How often the guest prints a heartbeat during a measured migration, ms (the agent's
/// shortest interval).
pub const HEARTBEAT_MS: u64 = 10;

/// The samples of one cell of the matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    /// The workload.
    pub workload: Workload,
    /// The VMM and its hint setting.
    pub variant: Variant,
    /// One per repetition.
    pub samples: Vec<Sample>,
}

/// Medians over a case's samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Medians {
    /// Total time, ms.
    pub total_ms: f64,
    /// Downtime, ms.
    pub downtime_ms: f64,
    /// Bytes sent.
    pub bytes: f64,
    /// Guest-visible switchover (heartbeat gap), ms, over the samples that measured it.
    pub guest_pause_ms: Option<f64>,
    /// Largest heartbeat gap over the migration, ms, over the samples that measured it.
    pub guest_stall_ms: Option<f64>,
    /// Guest memory in use before the workload, MiB, over the samples that measured it.
    pub in_use_mib: Option<f64>,
    /// Guest RAM less MemFree as the migration starts, MiB.
    pub not_free_mib: Option<f64>,
    /// Free memory in hintable blocks as the migration starts, MiB.
    pub hintable_mib: Option<f64>,
    /// Number of samples.
    pub runs: usize,
    /// Every sample verified.
    pub all_verified: bool,
}

impl Case {
    /// Medians of the samples; `None` without any.
    pub fn medians(&self) -> Option<Medians> {
        if self.samples.is_empty() {
            return None;
        }
        let of = |f: fn(&Sample) -> f64| median(self.samples.iter().map(f).collect());
        let of_some = |f: fn(&Sample) -> Option<f64>| {
            let values: Vec<f64> = self.samples.iter().filter_map(f).collect();
            (!values.is_empty()).then(|| median(values))
        };
        Some(Medians {
            total_ms: of(|s| s.total_ms),
            downtime_ms: of(|s| s.downtime_ms),
            bytes: of(|s| s.bytes as f64),
            guest_pause_ms: of_some(|s| s.guest_pause_ms),
            guest_stall_ms: of_some(|s| s.guest_stall_ms),
            in_use_mib: of_some(|s| s.in_use_mib.map(|m| m as f64)),
            not_free_mib: of_some(|s| s.not_free_mib.map(|m| m as f64)),
            hintable_mib: of_some(|s| s.hintable_mib.map(|m| m as f64)),
            runs: self.samples.len(),
            all_verified: self.samples.iter().all(|s| s.verified),
        })
    }
}

/// The median (mean of the middle two for an even count); NaN for none.
pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// The guest and workload settings of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// Guest vCPUs.
    pub vcpus: u32,
    /// The agent's integrity data set, MiB.
    pub dataset_mib: u64,
    /// What the freed workload touches and frees, MiB.
    pub freed_mib: u64,
    /// The dirty workload's working set, MiB.
    pub dirty_mib: u64,
    /// The dirty workload's rate, MiB/s.
    pub dirty_rate_mib_s: u64,
    /// Migrations per case.
    pub repeat: u32,
    /// ferry's and QEMU's downtime limit, ms.
    pub downtime_limit_ms: u64,
    /// QEMU's balloon also offers free page reporting (ferry's always does).
    pub qemu_reporting: bool,
    /// `qemu-system-x86_64 --version`, first line.
    pub qemu_version: String,
    /// Where it ran: `lab` (nested KVM under TCG) or `hardware KVM`.
    pub host: String,
    /// The link's bandwidth limit, Mbit/s, if any.
    #[serde(default)]
    pub link_mbit: Option<u64>,
    /// How the link was limited: a token bucket on the lab host's loopback for both VMMs
    /// (`tc`), or each VMM's own bandwidth limit (`limiter`).
    #[serde(default)]
    pub link_by: Option<String>,
}

/// A whole benchmark run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// UTC time the run started, `YYYY-MM-DD HH:MM`.
    pub date: String,
    /// The command line that produced it.
    pub command: String,
    /// Settings.
    pub setup: Setup,
    /// The matrix, in the order measured.
    pub cases: Vec<Case>,
    /// What failed (a VMM's session ends at its first failure; the others still run).
    pub failures: Vec<String>,
}

impl Results {
    /// The case for `workload` and `variant`, if measured.
    pub fn case(&self, workload: Workload, variant: Variant) -> Option<&Case> {
        self.cases
            .iter()
            .find(|c| c.workload == workload && c.variant == variant)
    }

    /// The variants with at least one case, in table order.
    pub fn variants_run(&self) -> Vec<Variant> {
        Variant::ALL
            .into_iter()
            .filter(|&v| self.cases.iter().any(|c| c.variant == v))
            .collect()
    }

    /// Medians of a case with at least one sample.
    pub fn medians(&self, workload: Workload, variant: Variant) -> Option<Medians> {
        self.case(workload, variant).and_then(Case::medians)
    }

    /// Adds a sample to its case (creating the case).
    pub fn push(&mut self, workload: Workload, variant: Variant, sample: Sample) {
        match self
            .cases
            .iter_mut()
            .find(|c| c.workload == workload && c.variant == variant)
        {
            Some(case) => case.samples.push(sample),
            None => self.cases.push(Case {
                workload,
                variant,
                samples: vec![sample],
            }),
        }
    }

    /// Writes the results as pretty JSON, creating the directory.
    pub fn save(&self, path: &Path) -> Result<(), ResultsError> {
        let io = |source| ResultsError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io)?;
        }
        let text = serde_json::to_string_pretty(self).map_err(|source| ResultsError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        fs::write(path, text + "\n").map_err(io)
    }

    /// Reads results saved by [`Results::save`].
    pub fn load(path: &Path) -> Result<Self, ResultsError> {
        let text = fs::read_to_string(path).map_err(|source| ResultsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ResultsError::Json {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// `YYYY-MM-DD HH:MM` (UTC) for seconds since the Unix epoch.
pub fn utc_date(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs = unix_secs % 86_400;
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60
    )
}

/// The current UTC time as [`utc_date`] formats it.
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_date(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_dates() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
        assert_eq!(utc_date(0), "1970-01-01 00:00");
        assert_eq!(utc_date(1_795_740_000), "2026-11-27 00:40");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00");
        assert_eq!("freed".parse(), Ok(Workload::Freed));
        assert_eq!("qemu-hint".parse(), Ok(Variant::QemuHint));
        assert!("qemu".parse::<Variant>().is_err());
    }
}
