//! VM configuration: what to boot and with which resources, validated before anything is
//! created so that a mistake is reported as a sentence, not as a failed ioctl.
//!
//! [`RunArgs`] is the `clap` face of the configuration (flatten it into a subcommand);
//! [`VmConfig`] is the validated, typed form [`crate::run`] consumes.
#![forbid(unsafe_code)]

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Smallest guest RAM accepted: Debian's kernel needs ~52 MiB to decompress, plus the initrd.
pub const MEMORY_BYTES_MIN: u64 = 128 << 20;
/// Largest guest RAM accepted (RAM above 3 GiB continues at 4 GiB, see [`crate::layout`]).
pub const MEMORY_BYTES_MAX: u64 = 64 << 30;
/// Most vCPUs accepted (APIC ids fit in a byte in the MADT entries ferry writes).
pub const VCPUS_MAX: u8 = 32;
/// Longest kernel command line accepted (x86 `COMMAND_LINE_SIZE` is 2048 including the NUL).
pub const CMDLINE_BYTES_MAX: usize = 2047;

/// Errors in a VM configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file given in the configuration cannot be opened or read.
    #[error("cannot read the {what} {path}: {source}")]
    Unreadable {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path as given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is not a bzImage ferry can boot in 64-bit mode.
    #[error("the kernel {path} is not a bootable x86-64 bzImage: {reason}")]
    BadKernel {
        /// The path as given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The initrd is empty.
    #[error("the initrd {0} is empty")]
    EmptyInitrd(PathBuf),
    /// Memory outside the accepted range or not a whole number of MiB.
    #[error(
        "guest memory of {bytes} bytes is out of range: give a whole number of MiB between \
         {} MiB and {} MiB",
        MEMORY_BYTES_MIN >> 20,
        MEMORY_BYTES_MAX >> 20
    )]
    Memory {
        /// The requested size.
        bytes: u64,
    },
    /// vCPU count out of range.
    #[error("{0} vCPUs requested: give between 1 and {VCPUS_MAX}")]
    Vcpus(u8),
    /// The command line is too long or contains a NUL byte.
    #[error("the kernel command line is {0} bytes long or contains NUL: at most {CMDLINE_BYTES_MAX} bytes")]
    Cmdline(usize),
    /// A serial target that does not parse.
    #[error("cannot parse the serial target {0:?}: use stdio, file:PATH, socket:PATH or none")]
    Serial(String),
    /// A balloon feature list that does not parse.
    #[error("unknown balloon feature {0:?}: use a comma list of hint, report, stats, deflate-on-oom, or none")]
    Balloon(String),
    /// Another process listens on the API (or serial) socket path.
    #[error("the socket {0} is in use by another process; choose another path or stop that VM")]
    SocketBusy(PathBuf),
    /// The socket path exists and is not a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// /dev/kvm cannot be opened.
    #[error("cannot open {path}: {source}; is KVM available and are you in the kvm group?")]
    KvmUnavailable {
        /// The device path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// /dev/kvm is PVM, which cannot run an unmodified guest at usable speed.
    #[error(
        "{0} is provided by the kvm_pvm module (/sys/module/kvm_pvm exists): it cannot run a \
         stock Linux guest at usable speed. Run ferry on a host with hardware KVM (VMX or SVM), \
         or pass --allow-pvm to try anyway"
    )]
    Pvm(PathBuf),
}

/// Where the guest's COM1 goes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "path")]
pub enum SerialTarget {
    /// Output to the VMM's stdout, input from its stdin.
    #[default]
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// A Unix socket the VMM listens on; one client at a time, bidirectional.
    Socket(PathBuf),
    /// Output discarded.
    None,
}

impl FromStr for SerialTarget {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let nonempty = |p: &str| {
            if p.is_empty() {
                Err(ConfigError::Serial(s.to_owned()))
            } else {
                Ok(PathBuf::from(p))
            }
        };
        match s {
            "stdio" => Ok(Self::Stdio),
            "none" => Ok(Self::None),
            _ => {
                if let Some(p) = s.strip_prefix("file:") {
                    Ok(Self::File(nonempty(p)?))
                } else if let Some(p) = s.strip_prefix("socket:") {
                    Ok(Self::Socket(nonempty(p)?))
                } else {
                    Err(ConfigError::Serial(s.to_owned()))
                }
            }
        }
    }
}

/// Which virtio-balloon features the device offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
// Part of the VM description a migration source sends: a feature this build does not know
// is one it cannot restore, so it is refused rather than dropped.
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Whether there is a balloon device at all.
    pub enabled: bool,
    /// VIRTIO_BALLOON_F_FREE_PAGE_HINT.
    pub free_page_hint: bool,
    /// VIRTIO_BALLOON_F_REPORTING.
    pub page_reporting: bool,
    /// VIRTIO_BALLOON_F_STATS_VQ.
    pub stats: bool,
    /// VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
}

impl FromStr for BalloonConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cfg = Self::default();
        if s == "none" || s == "off" {
            return Ok(cfg);
        }
        cfg.enabled = true;
        for feature in s.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            match feature {
                "on" => {}
                "hint" | "free-page-hint" => cfg.free_page_hint = true,
                "report" | "reporting" | "page-reporting" => cfg.page_reporting = true,
                "stats" => cfg.stats = true,
                "deflate-on-oom" => cfg.deflate_on_oom = true,
                other => return Err(ConfigError::Balloon(other.to_owned())),
            }
        }
        Ok(cfg)
    }
}

/// The command-line arguments of `ferry run`; flatten into a clap subcommand and convert with
/// [`RunArgs::into_config`].
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Linux bzImage to boot.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initial ramdisk (cpio, optionally compressed).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; ferry adds nothing to it.
    #[arg(long, default_value = VmConfig::DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Guest RAM, e.g. 512M or 4G (a bare number is MiB).
    #[arg(long, default_value = "512M", value_parser = crate::units::parse_size)]
    pub memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Balloon features: `none`, or a comma list of `hint`, `report`, `stats`, `deflate-on-oom`.
    #[arg(long, default_value = "hint,report,stats")]
    pub balloon: BalloonConfig,
    /// Serial console: `stdio`, `file:PATH`, `socket:PATH` (listen, one client) or `none`.
    #[arg(long, default_value = "stdio")]
    pub serial: SerialTarget,
    /// Unix socket path for the JSON control API.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// KVM device node.
    #[arg(long, default_value = "/dev/kvm")]
    pub kvm: PathBuf,
    /// Hide XSAVE/AVX from the guest (needed in the lab, whose nested CPUID reports
    /// inconsistent XSAVE sizes; QEMU's equivalent is `-cpu host,xsave=off`).
    #[arg(long)]
    pub no_xsave: bool,
    /// Also append everything the guest prints on the console to this file.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Run even on PVM's /dev/kvm (the kvm_pvm module), which boots a stock Linux guest only
    /// very slowly: for smoke tests.
    #[arg(long)]
    pub allow_pvm: bool,
}

impl RunArgs {
    /// The configuration these arguments describe (not yet validated).
    pub fn into_config(self) -> VmConfig {
        VmConfig {
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline: self.cmdline,
            memory_bytes: self.memory,
            vcpus: self.vcpus,
            balloon: self.balloon,
            serial: self.serial,
            api_socket: self.api_socket,
            kvm_path: self.kvm,
            xsave: !self.no_xsave,
            console_log: self.console_log,
            allow_pvm: self.allow_pvm,
        }
    }
}

/// Everything [`crate::run`] needs to build and boot a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Linux bzImage.
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// vCPU count.
    pub vcpus: u8,
    /// Balloon device.
    pub balloon: BalloonConfig,
    /// Serial console target.
    pub serial: SerialTarget,
    /// Control API socket.
    pub api_socket: Option<PathBuf>,
    /// KVM device node.
    pub kvm_path: PathBuf,
    /// Offer XSAVE and AVX to the guest.
    pub xsave: bool,
    /// A file that gets a copy of the console output.
    #[serde(default)]
    pub console_log: Option<PathBuf>,
    /// Accept PVM's /dev/kvm (see [`check_kvm`]).
    #[serde(default)]
    pub allow_pvm: bool,
}

impl VmConfig {
    /// A command line that boots Debian's kernel on ferry's machine model.
    pub const DEFAULT_CMDLINE: &'static str =
        "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.dumbkbd";

    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: Self::DEFAULT_CMDLINE.to_owned(),
            memory_bytes: 512 << 20,
            vcpus: 1,
            balloon: BalloonConfig::default(),
            serial: SerialTarget::Stdio,
            api_socket: None,
            kvm_path: PathBuf::from("/dev/kvm"),
            xsave: true,
            console_log: None,
            allow_pvm: false,
        }
    }

    /// Checks everything that can be checked without creating the VM: files, sizes, sockets.
    /// KVM itself is checked by [`check_kvm`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_resources()?;
        if self.cmdline.len() > CMDLINE_BYTES_MAX || self.cmdline.contains('\0') {
            return Err(ConfigError::Cmdline(self.cmdline.len()));
        }
        crate::boot::check_bzimage(&self.kernel).map_err(|e| match e {
            crate::boot::BzImageError::Unreadable(source) => ConfigError::Unreadable {
                what: "kernel",
                path: self.kernel.clone(),
                source,
            },
            crate::boot::BzImageError::Bad(reason) => ConfigError::BadKernel {
                path: self.kernel.clone(),
                reason,
            },
        })?;
        if let Some(initrd) = &self.initrd {
            let len = File::open(initrd)
                .and_then(|f| f.metadata())
                .map_err(|source| ConfigError::Unreadable {
                    what: "initrd",
                    path: initrd.clone(),
                    source,
                })?
                .len();
            if len == 0 {
                return Err(ConfigError::EmptyInitrd(initrd.clone()));
            }
        }
        Ok(())
    }

    /// Checks what a VM needs whether it boots or is restored: memory size, vCPU count and
    /// that the API and serial sockets are free (the kernel and initrd are not needed to
    /// restore a VM).
    pub fn validate_resources(&self) -> Result<(), ConfigError> {
        if self.memory_bytes < MEMORY_BYTES_MIN
            || self.memory_bytes > MEMORY_BYTES_MAX
            || self.memory_bytes % (1 << 20) != 0
        {
            return Err(ConfigError::Memory {
                bytes: self.memory_bytes,
            });
        }
        if self.vcpus == 0 || self.vcpus > VCPUS_MAX {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if let Some(path) = &self.api_socket {
            check_socket_free(path)?;
        }
        if let SerialTarget::Socket(path) = &self.serial {
            check_socket_free(path)?;
        }
        Ok(())
    }
}

/// Checks that nobody listens on the Unix socket `path`; removes a stale socket file.
pub fn check_socket_free(path: &Path) -> Result<(), ConfigError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    if !meta.file_type().is_socket() {
        return Err(ConfigError::NotASocket(path.to_owned()));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(ConfigError::SocketBusy(path.to_owned()));
    }
    // Nobody listens: a leftover from a process that died. Binding will need the path.
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Checks that the KVM device can be opened and is not PVM. `sys_module` is normally
/// `/sys/module`; PVM is accepted when `allow_pvm` is set (smoke tests only).
pub fn check_kvm(kvm_path: &Path, sys_module: &Path, allow_pvm: bool) -> Result<(), ConfigError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm_path)
        .map_err(|source| ConfigError::KvmUnavailable {
            path: kvm_path.to_owned(),
            source,
        })?;
    if !allow_pvm && sys_module.join("kvm_pvm").exists() {
        return Err(ConfigError::Pvm(kvm_path.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-vmm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A file with just enough of a setup header to pass [`crate::boot::check_bzimage`].
    pub(crate) fn fake_bzimage(path: &Path, version: u16, xloadflags: u16) {
        let mut img = vec![0u8; 0x1000];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        std::fs::File::create(path)
            .unwrap()
            .write_all(&img)
            .unwrap();
    }

    #[test]
    fn serial_and_balloon_parse() {
        assert_eq!(
            "stdio".parse::<SerialTarget>().unwrap(),
            SerialTarget::Stdio
        );
        assert_eq!(
            "socket:/tmp/s".parse::<SerialTarget>().unwrap(),
            SerialTarget::Socket("/tmp/s".into())
        );
        assert!("file:".parse::<SerialTarget>().is_err());
        assert!("tcp:1".parse::<SerialTarget>().is_err());
        let b: BalloonConfig = "hint,report".parse().unwrap();
        assert!(b.enabled && b.free_page_hint && b.page_reporting && !b.stats);
        assert!(!"none".parse::<BalloonConfig>().unwrap().enabled);
        assert!("hint,bogus".parse::<BalloonConfig>().is_err());
    }

    #[test]
    fn validation_names_the_problem() {
        let d = tmpdir("cfg");
        let kernel = d.join("bzImage");
        let mut cfg = VmConfig::new(&kernel);
        let e = cfg.validate().unwrap_err();
        assert!(
            matches!(e, ConfigError::Unreadable { what: "kernel", .. }),
            "{e}"
        );

        std::fs::write(&kernel, b"short").unwrap();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("too short"), "{e}");

        fake_bzimage(&kernel, 0x020b, 1);
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("older than 2.12"), "{e}");
        fake_bzimage(&kernel, 0x020f, 0);
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("XLF_KERNEL_64"));
        fake_bzimage(&kernel, 0x020f, 1);
        cfg.validate().unwrap();

        cfg.memory_bytes = 64 << 20;
        assert!(matches!(cfg.validate(), Err(ConfigError::Memory { .. })));
        cfg.memory_bytes = 65 << 30;
        assert!(matches!(cfg.validate(), Err(ConfigError::Memory { .. })));
        cfg.memory_bytes = (256 << 20) + 4096;
        assert!(matches!(cfg.validate(), Err(ConfigError::Memory { .. })));
        cfg.memory_bytes = 256 << 20;
        cfg.vcpus = 0;
        assert!(matches!(cfg.validate(), Err(ConfigError::Vcpus(0))));
        cfg.vcpus = 2;

        cfg.initrd = Some(d.join("initrd"));
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::Unreadable { what: "initrd", .. })
        ));
        std::fs::write(d.join("initrd"), b"").unwrap();
        assert!(matches!(cfg.validate(), Err(ConfigError::EmptyInitrd(_))));
        std::fs::write(d.join("initrd"), b"07070").unwrap();
        cfg.validate().unwrap();
    }

    #[test]
    fn busy_and_stale_sockets() {
        let d = tmpdir("sock");
        let path = d.join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(matches!(
            check_socket_free(&path),
            Err(ConfigError::SocketBusy(_))
        ));
        drop(listener);
        // The file remains but nobody listens: stale, removed.
        check_socket_free(&path).unwrap();
        assert!(!path.exists());
        std::fs::write(&path, b"x").unwrap();
        assert!(matches!(
            check_socket_free(&path),
            Err(ConfigError::NotASocket(_))
        ));
    }

    #[test]
    fn pvm_is_refused_unless_allowed() {
        let d = tmpdir("kvm");
        let dev = d.join("kvm");
        std::fs::write(&dev, b"").unwrap();
        let sys = d.join("module");
        std::fs::create_dir_all(sys.join("kvm_pvm")).unwrap();
        let e = check_kvm(&dev, &sys, false).unwrap_err().to_string();
        assert!(e.contains("kvm_pvm") && e.contains("--allow-pvm"), "{e}");
        check_kvm(&dev, &sys, true).unwrap();
        assert!(matches!(
            check_kvm(&d.join("nope"), &sys, false),
            Err(ConfigError::KvmUnavailable { .. })
        ));
    }
}
