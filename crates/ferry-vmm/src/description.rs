//! What a migration destination learns from its source before any memory arrives, and what
//! it decides itself.
//!
//! The source puts a [`VmDescription`] (JSON) in the stream's `Hello`; the destination builds
//! the empty VM from it and from its own [`ReceiveSettings`] (where the console goes, the API
//! socket, the KVM device, limits). So `ferry receive` needs no VM flags, and a destination
//! can never be configured differently from the VM it receives. Cloud Hypervisor's migration
//! works the same way: its source sends the VM configuration before memory
//! (`vm_receive_config`), while QEMU and Firecracker make the operator repeat it.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use ferry_migration::RegionDesc;
use serde::{Deserialize, Serialize};

use crate::config::{BalloonConfig, ConfigError, SerialTarget, VmConfig};
use crate::layout;
use crate::state_format;
use crate::vmm::MACHINE_STATE_VERSION;

/// The version of [`VmDescription`] this build writes and reads.
pub const DESCRIPTION_VERSION: u32 = 1;

/// The VM as the source describes it to the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// A field this build does not know describes something it cannot build: refuse, do not
// drop it.
#[serde(deny_unknown_fields)]
pub struct VmDescription {
    /// [`DESCRIPTION_VERSION`].
    pub version: u32,
    /// The machine state format the source will send at the end ([`MACHINE_STATE_VERSION`]),
    /// checked now so that a destination that cannot read it refuses before any memory.
    pub machine_state_version: u32,
    /// The envelope the machine state will come in ([`state_format::FORMAT_VERSION`]; a
    /// source from before version 2 names none and sends version 1, JSON). An older
    /// destination refuses this field it does not know, before any memory, instead of
    /// failing to read the state inside the downtime.
    #[serde(default = "json_state_format")]
    pub state_format: u32,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// vCPU count.
    pub vcpus: u8,
    /// The balloon device and its features.
    pub balloon: BalloonConfig,
    /// Whether the guest sees XSAVE and AVX.
    pub xsave: bool,
    /// The kernel command line the guest was booted with (for status; nothing is booted).
    pub cmdline: String,
}

fn json_state_format() -> u32 {
    state_format::FORMAT_VERSION_JSON
}

/// Why a destination refuses a source's VM. The source is told the same sentence.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    /// The source sent no description: a ferry from before the description existed.
    #[error("the source sent no VM description; update ferry on the source")]
    Missing,
    /// The description does not parse.
    #[error(
        "the source's VM description cannot be read ({0}); are both ends the same ferry version?"
    )]
    Unreadable(String),
    /// Another description version.
    #[error("VM description version {0} (this ferry reads {DESCRIPTION_VERSION})")]
    Version(u32),
    /// The machine state would come in a format this build cannot read.
    #[error("machine state format version {0} (this ferry reads {MACHINE_STATE_VERSION})")]
    StateVersion(u32),
    /// The machine state would come in an envelope this build cannot read.
    #[error(
        "machine state envelope version {0} (this ferry reads {json} and {current})",
        json = state_format::FORMAT_VERSION_JSON,
        current = state_format::FORMAT_VERSION
    )]
    StateEnvelope(u32),
    /// More memory than this destination allows.
    #[error("the VM has {} MiB of memory, more than this destination's limit of {} MiB (--max-memory)", .bytes >> 20, .max >> 20)]
    MemoryLimit {
        /// The VM's memory.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// More vCPUs than this destination allows.
    #[error("the VM has {vcpus} vCPUs, more than this destination's limit of {max} (--max-vcpus)")]
    VcpuLimit {
        /// The VM's vCPUs.
        vcpus: u8,
        /// The limit.
        max: u8,
    },
    /// The memory layout the stream announces is not the one the description implies.
    #[error("the source's memory layout {regions:x?} does not match its {} MiB of memory", .memory_bytes >> 20)]
    Layout {
        /// What the stream announced.
        regions: Vec<RegionDesc>,
        /// What the description says.
        memory_bytes: u64,
    },
    /// The description is outside what ferry supports at all.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// What a destination decides itself; everything else comes from the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveSettings {
    /// Where the guest's console goes here.
    pub serial: SerialTarget,
    /// The control API socket here.
    pub api_socket: Option<PathBuf>,
    /// KVM device node.
    pub kvm_path: PathBuf,
    /// A file that gets a copy of the console output.
    #[serde(default)]
    pub console_log: Option<PathBuf>,
    /// Accept PVM's /dev/kvm (see [`crate::config::check_kvm`]).
    #[serde(default)]
    pub allow_pvm: bool,
    /// Refuse a VM with more memory than this (bytes).
    #[serde(default)]
    pub max_memory_bytes: Option<u64>,
    /// Refuse a VM with more vCPUs than this.
    #[serde(default)]
    pub max_vcpus: Option<u8>,
    /// Accept compressed page data when the source offers it (`false` saves this host's
    /// CPU; the source then sends pages as they are).
    #[serde(default = "accept_compression_default")]
    pub accept_compression: bool,
}

fn accept_compression_default() -> bool {
    true
}

impl Default for ReceiveSettings {
    fn default() -> Self {
        Self {
            serial: SerialTarget::Stdio,
            api_socket: None,
            kvm_path: PathBuf::from("/dev/kvm"),
            console_log: None,
            allow_pvm: false,
            max_memory_bytes: None,
            max_vcpus: None,
            accept_compression: true,
        }
    }
}

/// The RAM regions ferry gives a guest of `memory_bytes`, as the stream describes them.
fn ram_regions(memory_bytes: u64) -> Vec<RegionDesc> {
    layout::ram_regions(memory_bytes)
        .into_iter()
        .map(|(gpa, size)| RegionDesc { gpa, size })
        .collect()
}

impl VmDescription {
    /// The description of a VM configured as `config`.
    pub fn of(config: &VmConfig) -> Self {
        Self {
            version: DESCRIPTION_VERSION,
            machine_state_version: MACHINE_STATE_VERSION,
            state_format: state_format::FORMAT_VERSION,
            memory_bytes: config.memory_bytes,
            vcpus: config.vcpus,
            balloon: config.balloon,
            xsave: config.xsave,
            cmdline: config.cmdline.clone(),
        }
    }

    /// The bytes the stream carries.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain fields into memory cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads what [`encode`](Self::encode) wrote.
    pub fn decode(bytes: &[u8]) -> Result<Self, IncomingError> {
        if bytes.is_empty() {
            return Err(IncomingError::Missing);
        }
        // The version first, so that a future layout is reported as a version, not a typo.
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let versioned: Versioned =
            serde_json::from_slice(bytes).map_err(|e| IncomingError::Unreadable(e.to_string()))?;
        if versioned.version != DESCRIPTION_VERSION {
            return Err(IncomingError::Version(versioned.version));
        }
        serde_json::from_slice(bytes).map_err(|e| IncomingError::Unreadable(e.to_string()))
    }

    /// The configuration of the empty VM that receives this one here, after checking it
    /// against this build, the destination's limits, and the layout the stream announced.
    pub fn config(
        &self,
        settings: &ReceiveSettings,
        regions: &[RegionDesc],
    ) -> Result<VmConfig, IncomingError> {
        if self.machine_state_version != MACHINE_STATE_VERSION {
            return Err(IncomingError::StateVersion(self.machine_state_version));
        }
        if !state_format::reads(self.state_format) {
            return Err(IncomingError::StateEnvelope(self.state_format));
        }
        if let Some(max) = settings.max_memory_bytes.filter(|m| self.memory_bytes > *m) {
            return Err(IncomingError::MemoryLimit {
                bytes: self.memory_bytes,
                max,
            });
        }
        if let Some(max) = settings.max_vcpus.filter(|m| self.vcpus > *m) {
            return Err(IncomingError::VcpuLimit {
                vcpus: self.vcpus,
                max,
            });
        }
        let config = VmConfig {
            // Nothing is booted: RAM, the kernel in it included, comes from the source.
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: self.cmdline.clone(),
            memory_bytes: self.memory_bytes,
            vcpus: self.vcpus,
            balloon: self.balloon,
            serial: settings.serial.clone(),
            // The destination serves its API socket itself, bound before any source arrived
            // (crate::receive): this VM must not check it is free, nor bind it.
            api_socket: None,
            kvm_path: settings.kvm_path.clone(),
            xsave: self.xsave,
            console_log: settings.console_log.clone(),
            allow_pvm: settings.allow_pvm,
        };
        config.validate_resources()?;
        if ram_regions(self.memory_bytes) != regions {
            return Err(IncomingError::Layout {
                regions: regions.to_vec(),
                memory_bytes: self.memory_bytes,
            });
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source_config() -> VmConfig {
        let mut c = VmConfig::new("/boot/vmlinuz");
        c.memory_bytes = 1 << 30;
        c.vcpus = 2;
        c.balloon = "hint,stats".parse().unwrap();
        c.xsave = false;
        c.serial = SerialTarget::File("/var/log/src.console".into());
        c.api_socket = Some("/run/src.api".into());
        c
    }

    #[test]
    fn a_destination_gets_the_vm_from_the_source_and_the_rest_from_itself() {
        let source = source_config();
        let wire = VmDescription::of(&source).encode();
        let settings = ReceiveSettings {
            serial: SerialTarget::None,
            api_socket: None,
            ..ReceiveSettings::default()
        };
        let regions = ram_regions(source.memory_bytes);
        let config = VmDescription::decode(&wire)
            .unwrap()
            .config(&settings, &regions)
            .unwrap();
        assert_eq!(config.memory_bytes, source.memory_bytes);
        assert_eq!(config.vcpus, 2);
        assert_eq!(config.balloon, source.balloon);
        assert!(!config.xsave);
        assert_eq!(config.cmdline, source.cmdline);
        // Host-local things are the destination's own.
        assert_eq!(config.serial, SerialTarget::None);
        assert_eq!(config.api_socket, None);
        assert_eq!(config.kernel, PathBuf::new());
    }

    #[test]
    fn the_destinations_own_api_socket_does_not_refuse_the_vm() {
        // `receive` binds its API socket before a source arrives; the VM built for the
        // source must not find that socket busy (every lab migration failed so once).
        let dir = std::env::temp_dir().join(format!("ferry-desc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let api = dir.join("dest.api");
        let _ = std::fs::remove_file(&api);
        let _served = std::os::unix::net::UnixListener::bind(&api).unwrap();
        let source = source_config();
        let settings = ReceiveSettings {
            serial: SerialTarget::None,
            api_socket: Some(api.clone()),
            ..ReceiveSettings::default()
        };
        let config =
            VmDescription::of(&source).config(&settings, &ram_regions(source.memory_bytes));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(config.unwrap().api_socket, None);
    }

    #[test]
    fn limits_and_mismatches_are_refused_with_the_reason() {
        let source = source_config();
        let d = VmDescription::of(&source);
        let regions = ram_regions(source.memory_bytes);
        let refuse = |d: &VmDescription, s: &ReceiveSettings, r: &[RegionDesc]| {
            d.config(s, r).unwrap_err().to_string()
        };
        let small = ReceiveSettings {
            max_memory_bytes: Some(512 << 20),
            ..ReceiveSettings::default()
        };
        let e = refuse(&d, &small, &regions);
        assert!(e.contains("1024 MiB") && e.contains("--max-memory"), "{e}");
        let few = ReceiveSettings {
            max_vcpus: Some(1),
            ..ReceiveSettings::default()
        };
        let e = refuse(&d, &few, &regions);
        assert!(e.contains("2 vCPUs") && e.contains("--max-vcpus"), "{e}");
        // Exactly at the limits is fine.
        let exact = ReceiveSettings {
            max_memory_bytes: Some(1 << 30),
            max_vcpus: Some(2),
            ..ReceiveSettings::default()
        };
        d.config(&exact, &regions).unwrap();

        let other = ram_regions(2 << 30);
        let e = refuse(&d, &ReceiveSettings::default(), &other);
        assert!(e.contains("does not match"), "{e}");
        let mut future = d.clone();
        future.machine_state_version += 1;
        let e = refuse(&future, &ReceiveSettings::default(), &regions);
        assert!(e.contains("machine state format"), "{e}");
        let mut envelope = d.clone();
        envelope.state_format = 3;
        let e = refuse(&envelope, &ReceiveSettings::default(), &regions);
        assert!(e.contains("envelope version 3"), "{e}");
        let mut huge = d.clone();
        huge.vcpus = 200;
        let e = refuse(&huge, &ReceiveSettings::default(), &regions);
        assert!(e.contains("200 vCPUs"), "{e}");
    }

    #[test]
    fn foreign_descriptions_are_refused_not_misread() {
        assert!(matches!(
            VmDescription::decode(b""),
            Err(IncomingError::Missing)
        ));
        assert!(matches!(
            VmDescription::decode(b"\xff\x00garbage"),
            Err(IncomingError::Unreadable(_))
        ));
        let mut v = serde_json::to_value(VmDescription::of(&source_config())).unwrap();
        v["version"] = 7.into();
        let e = VmDescription::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(matches!(e, IncomingError::Version(7)), "{e}");
        // A field this build does not know is a device it cannot build.
        v["version"] = DESCRIPTION_VERSION.into();
        v["gpu"] = true.into();
        let e = VmDescription::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(e.to_string().contains("gpu"), "{e}");
        // The same inside the balloon's features.
        let mut v = serde_json::to_value(VmDescription::of(&source_config())).unwrap();
        v["balloon"]["free_page_poisoning"] = true.into();
        let e = VmDescription::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(e.to_string().contains("free_page_poisoning"), "{e}");
    }

    /// A source from before the binary machine state names no envelope: it sends JSON,
    /// which this build still reads.
    #[test]
    fn a_description_without_an_envelope_means_json() {
        let mut v = serde_json::to_value(VmDescription::of(&source_config())).unwrap();
        assert_eq!(v["state_format"], state_format::FORMAT_VERSION);
        v.as_object_mut().unwrap().remove("state_format");
        let d = VmDescription::decode(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(d.state_format, state_format::FORMAT_VERSION_JSON);
        let source = source_config();
        d.config(
            &ReceiveSettings::default(),
            &ram_regions(source.memory_bytes),
        )
        .unwrap();
    }
}
