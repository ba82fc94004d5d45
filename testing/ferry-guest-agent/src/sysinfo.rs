//! Facts read from /proc and /sys: the balloon's negotiated features and memory counters.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use thiserror::Error;

const VIRTIO_DEVICES: &str = "/sys/bus/virtio/devices";
const VIRTIO_ID_BALLOON: &str = "0x0005";

/// Names of the feature bits a balloon may negotiate (virtio 1.2, 5.5.3 and 6).
const FEATURE_NAMES: &[(usize, &str)] = &[
    (0, "MUST_TELL_HOST"),
    (1, "STATS_VQ"),
    (2, "DEFLATE_ON_OOM"),
    (3, "FREE_PAGE_HINT"),
    (4, "PAGE_POISON"),
    (5, "PAGE_REPORTING"),
    (24, "NOTIFY_ON_EMPTY"),
    (27, "ANY_LAYOUT"),
    (28, "RING_INDIRECT_DESC"),
    (29, "RING_EVENT_IDX"),
    (32, "VERSION_1"),
    (33, "ACCESS_PLATFORM"),
    (34, "RING_PACKED"),
    (35, "IN_ORDER"),
    (36, "ORDER_PLATFORM"),
    (37, "SR_IOV"),
    (38, "NOTIFICATION_DATA"),
    (39, "NOTIF_CONFIG_DATA"),
    (40, "RING_RESET"),
];

#[derive(Debug, Error)]
pub enum SysinfoError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no virtio balloon (device id 5) in {VIRTIO_DEVICES}")]
    NoBalloon,
    #[error("{path}: expected 64 characters of 0 and 1, found {found:?}")]
    BadFeatures { path: PathBuf, found: String },
    #[error("/proc/meminfo has no {0} line")]
    MissingField(&'static str),
    #[error("/proc/buddyinfo: cannot read the line {0:?}")]
    BadBuddyinfo(String),
    #[error("vm.min_free_kbytes: not a number: {0:?}")]
    BadMinFree(String),
}

fn read(path: &Path) -> Result<String, SysinfoError> {
    fs::read_to_string(path).map_err(|source| SysinfoError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The balloon's negotiated features: the sysfs bit string and the names of the set bits.
pub struct Features {
    bits: String,
}

impl Features {
    fn parse(path: &Path, text: &str) -> Result<Self, SysinfoError> {
        let bits = text.trim();
        if bits.len() != 64 || !bits.bytes().all(|b| b == b'0' || b == b'1') {
            return Err(SysinfoError::BadFeatures {
                path: path.to_path_buf(),
                found: bits.chars().take(80).collect(),
            });
        }
        Ok(Self {
            bits: bits.to_string(),
        })
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.bits)?;
        for (bit, _) in self.bits.bytes().enumerate().filter(|(_, b)| *b == b'1') {
            match FEATURE_NAMES.iter().find(|(n, _)| *n == bit) {
                Some((_, name)) => write!(f, " {name}")?,
                None => write!(f, " BIT{bit}")?,
            }
        }
        Ok(())
    }
}

/// Finds the balloon among the virtio devices and reads its negotiated features.
pub fn balloon_features() -> Result<Features, SysinfoError> {
    let root = Path::new(VIRTIO_DEVICES);
    let entries = fs::read_dir(root).map_err(|source| SysinfoError::Read {
        path: root.to_path_buf(),
        source,
    })?;
    for entry in entries.flatten() {
        let dir = entry.path();
        if read(&dir.join("device")).is_ok_and(|id| id.trim() == VIRTIO_ID_BALLOON) {
            let path = dir.join("features");
            return Features::parse(&path, &read(&path)?);
        }
    }
    Err(SysinfoError::NoBalloon)
}

/// Memory counters from /proc/meminfo, /proc/buddyinfo and vm.min_free_kbytes, displayed
/// as `total_kib=N free_kib=N available_kib=N hintable_kib=N min_free_kib=N`.
pub struct Meminfo {
    pub total_kib: u64,
    pub free_kib: u64,
    pub available_kib: u64,
    /// Free memory in blocks of the buddy allocator's largest order (4 MiB on x86-64): all
    /// Linux's balloon driver can hint (it hints only such blocks), and the part of MemFree a
    /// host can learn of by free page hinting.
    pub hintable_kib: u64,
    /// The kernel's reserve (vm.min_free_kbytes; raised for transparent huge pages): free
    /// memory an allocation that may not reclaim, as the balloon driver's, cannot take.
    pub min_free_kib: u64,
}

/// Page size of the guests the agent runs in (x86-64), KiB.
const PAGE_KIB: u64 = 4;

/// Free memory in blocks of the largest order /proc/buddyinfo lists, KiB. Each line is
/// `Node N, zone NAME c0 c1 ... cK`: cI free blocks of 2^I pages.
fn largest_free_blocks_kib(text: &str) -> Result<u64, SysinfoError> {
    let mut kib = 0u64;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let bad = || SysinfoError::BadBuddyinfo(line.to_string());
        let counts = line
            .split_once("zone")
            .ok_or_else(bad)?
            .1
            .split_whitespace()
            .skip(1)
            .map(|c| c.parse::<u64>().map_err(|_| bad()))
            .collect::<Result<Vec<_>, _>>()?;
        let order = u32::try_from(counts.len()).map_err(|_| bad())?;
        let Some(&largest) = counts.last() else {
            return Err(bad());
        };
        let block_kib = PAGE_KIB.checked_shl(order - 1).ok_or_else(bad)?;
        kib = kib.saturating_add(largest.saturating_mul(block_kib));
    }
    Ok(kib)
}

impl Meminfo {
    fn parse(text: &str, buddyinfo: &str, min_free: &str) -> Result<Self, SysinfoError> {
        let field = |name: &'static str| {
            text.lines()
                .find_map(|line| {
                    let rest = line.strip_prefix(name)?.strip_prefix(':')?;
                    rest.split_whitespace().next()?.parse::<u64>().ok()
                })
                .ok_or(SysinfoError::MissingField(name))
        };
        Ok(Self {
            total_kib: field("MemTotal")?,
            free_kib: field("MemFree")?,
            available_kib: field("MemAvailable")?,
            hintable_kib: largest_free_blocks_kib(buddyinfo)?,
            min_free_kib: min_free
                .trim()
                .parse()
                .map_err(|_| SysinfoError::BadMinFree(min_free.trim().to_string()))?,
        })
    }
}

impl fmt::Display for Meminfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "total_kib={} free_kib={} available_kib={} hintable_kib={} min_free_kib={}",
            self.total_kib, self.free_kib, self.available_kib, self.hintable_kib, self.min_free_kib
        )
    }
}

pub fn meminfo() -> Result<Meminfo, SysinfoError> {
    Meminfo::parse(
        &read(Path::new("/proc/meminfo"))?,
        &read(Path::new("/proc/buddyinfo"))?,
        &read(Path::new("/proc/sys/vm/min_free_kbytes"))?,
    )
}

/// The agent's threads, for a host that finds a workload stuck: `TID|NAME|STATE|WCHAN|STACK`
/// per thread, `;`-separated, where STATE is the scheduler's letter (R, S, D...), WCHAN where
/// a sleeping thread waits and STACK its top kernel frames (`<`-separated; empty when the
/// kernel does not show them).
pub fn threads() -> String {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return "unreadable".to_owned();
    };
    let mut out: Vec<String> = tasks
        .flatten()
        .map(|task| Task::read(&task.path()).line())
        .collect();
    out.sort();
    out.join(";")
}

/// Every task of the guest in uninterruptible sleep (state D), in the form of [`threads`]:
/// a kernel worker that waits for a device that never answers (a virtio driver in
/// `wait_event` for a used buffer whose interrupt was lost) shows up here, and nowhere else
/// a host can see. "none" when no task is blocked.
pub fn blocked() -> String {
    blocked_in(Path::new("/proc"))
}

fn blocked_in(proc_root: &Path) -> String {
    let Ok(procs) = std::fs::read_dir(proc_root) else {
        return "unreadable".to_owned();
    };
    let mut out = Vec::new();
    for process in procs.flatten() {
        if !process
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(process.path().join("task")) else {
            continue; // the process ended meanwhile
        };
        out.extend(
            tasks
                .flatten()
                .map(|task| Task::read(&task.path()))
                .filter(|t| t.state == "D")
                .map(|t| t.line()),
        );
    }
    if out.is_empty() {
        return "none".to_owned();
    }
    out.sort();
    out.join(";")
}

/// One task as `/proc/PID/task/TID` shows it.
struct Task {
    tid: String,
    name: String,
    state: String,
    wchan: String,
    stack: Vec<String>,
}

impl Task {
    fn read(dir: &Path) -> Self {
        let field = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        let stat = field("stat");
        // "TID (NAME) S ...": the state follows the name's closing parenthesis.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?")
            .to_owned();
        let stack = field("stack")
            .lines()
            .take(6)
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
            .collect();
        Self {
            tid: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            name: field("comm").trim().replace(['|', ';'], "_"),
            state,
            wchan: field("wchan").trim().to_owned(),
            stack,
        }
    }

    fn line(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}",
            self.tid,
            self.name,
            self.state,
            self.wchan,
            self.stack.join("<")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_this_process_threads_with_their_state() {
        let t = threads();
        // /proc/thread-self is "PID/task/TID": this thread, running while it reads /proc.
        let me = std::fs::read_link("/proc/thread-self").unwrap();
        let tid = me.file_name().unwrap().to_string_lossy().into_owned();
        let this = t
            .split(';')
            .find(|e| e.split('|').next() == Some(tid.as_str()))
            .unwrap_or_else(|| panic!("no thread {tid} in {t}"));
        assert_eq!(this.split('|').nth(2), Some("R"), "{this}");
        assert!(
            t.split(';').count() >= 2,
            "the test harness has more threads: {t}"
        );
    }

    #[test]
    fn lists_only_the_blocked_tasks_of_every_process() {
        let root = std::env::temp_dir().join(format!("ferry-agent-proc-{}", std::process::id()));
        let task = |pid: &str, tid: &str, stat: &str, stack: &str| {
            let dir = root.join(pid).join("task").join(tid);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("stat"), stat).unwrap();
            fs::write(dir.join("comm"), "kworker/0:1|x\n").unwrap();
            fs::write(dir.join("wchan"), "virtballoon_free_page_report").unwrap();
            fs::write(dir.join("stack"), stack).unwrap();
        };
        task(
            "7",
            "7",
            "7 (kworker/0:1) D 2 0",
            "[<0>] virtballoon_free_page_report+0x10c/0x120\n[<0>] page_reporting_drain+0x5/0x9\n",
        );
        task("9", "9", "9 (sh (x)) S 1 0", "");
        task("9", "10", "10 (sh (x)) R 1 0", "");
        fs::create_dir_all(root.join("sys")).unwrap(); // not a process
        assert_eq!(
            blocked_in(&root),
            "7|kworker/0:1_x|D|virtballoon_free_page_report|\
             virtballoon_free_page_report+0x10c/0x120<page_reporting_drain+0x5/0x9"
        );
        fs::remove_dir_all(root.join("7")).unwrap();
        assert_eq!(blocked_in(&root), "none");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn decodes_feature_names_bit_0_first() {
        let mut bits = ["0"; 64];
        for bit in [3, 5, 32, 50] {
            bits[bit] = "1";
        }
        let f = Features::parse(Path::new("features"), &format!("{}\n", bits.concat())).unwrap();
        let shown = f.to_string();
        assert_eq!(
            shown.split_once(' ').unwrap().1,
            "FREE_PAGE_HINT PAGE_REPORTING VERSION_1 BIT50"
        );
        assert!(Features::parse(Path::new("features"), "0101").is_err());
    }

    #[test]
    fn reads_meminfo_fields() {
        let text = "MemTotal:  1000 kB\nMemFree:  600 kB\nMemAvailable:  800 kB\n";
        // Two zones with orders 0..=10: 3 + 2 free 4 MiB blocks.
        let buddy = "Node 0, zone      DMA      1 0 1 0 2 1 1 0 1 1 3\n\
                     Node 0, zone    DMA32    700 400 200 90 40 20 9 6 3 5 2\n";
        let m = Meminfo::parse(text, buddy, "45056\n").unwrap();
        assert_eq!(
            m.to_string(),
            "total_kib=1000 free_kib=600 available_kib=800 hintable_kib=20480 min_free_kib=45056"
        );
        assert!(Meminfo::parse("MemTotal: 1 kB\n", buddy, "1").is_err());
        assert!(Meminfo::parse(text, "Node 0, zone DMA 1 x 2\n", "1").is_err());
        assert!(Meminfo::parse(text, "Node 0, zone DMA\n", "1").is_err());
        assert!(Meminfo::parse(text, "garbage\n", "1").is_err());
        assert!(Meminfo::parse(text, buddy, "many").is_err());
    }
}
