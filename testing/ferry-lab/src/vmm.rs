//! Spawning a VMM: what to boot ([`GuestConfig`]) and how a given VMM is asked to boot it
//! ([`Vmm`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::image::GuestImage;

/// The guest to boot, independent of the VMM.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// Kernel and initramfs.
    pub image: GuestImage,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Kernel command line.
    pub cmdline: String,
    /// Offer VIRTIO_BALLOON_F_FREE_PAGE_HINT.
    pub free_page_hint: bool,
    /// Offer VIRTIO_BALLOON_F_REPORTING.
    pub free_page_reporting: bool,
}

impl GuestConfig {
    /// Kernel command line of the test guest: serial console; `loglevel=5` keeps boot chatter
    /// off the console but still prints warnings and errors, which the tests look for; a panic
    /// ends the VM. The rest saves time, because under nested KVM each console line costs
    /// 0.1-1 s: no CMOS RTC probe (11 s in the lab), no crypto self-tests, no speculation
    /// mitigations (and their notices), no TSC watchdog or trace clock notices (the guest uses
    /// kvm-clock).
    pub const DEFAULT_CMDLINE: &'static str = "console=ttyS0 loglevel=5 panic=-1 edd=off \
        initcall_blacklist=cmos_init cryptomgr.notests mitigations=off tsc=unstable trace_clock=global";

    /// 512 MiB, one vCPU, both balloon hinting features offered. `FERRY_GUEST_APPEND` adds
    /// words to the kernel command line (for experiments, e.g. `transparent_hugepage=never`).
    pub fn new(image: GuestImage) -> Self {
        let mut cmdline = Self::DEFAULT_CMDLINE.to_string();
        if let Ok(extra) = std::env::var("FERRY_GUEST_APPEND") {
            cmdline.push(' ');
            cmdline.push_str(&extra);
        }
        Self {
            image,
            mem_mib: 512,
            vcpus: 1,
            cmdline,
            free_page_hint: true,
            free_page_reporting: true,
        }
    }
}

/// A VMM that can boot the guest image with its serial console on a Unix socket.
///
/// The VMM must listen on `serial_socket` and start the guest only once a client connected, so
/// that no console output is lost.
pub trait Vmm {
    /// Short name for messages, e.g. `qemu-microvm`.
    fn name(&self) -> &str;
    /// The command that boots `guest`.
    fn command(&self, guest: &GuestConfig, serial_socket: &Path) -> Command;
}

/// Debian's QEMU with KVM, `-M microvm,acpi=on`: the balloon is a virtio-mmio device described
/// in ACPI, as ferry's VMM describes it.
#[derive(Debug, Clone)]
pub struct QemuMicrovm {
    /// The QEMU binary.
    pub binary: PathBuf,
    /// Appended to the command line, e.g. `-qmp unix:PATH,server=on,wait=off` or
    /// `-incoming tcp:127.0.0.1:PORT` when QEMU is the migration baseline.
    pub extra_args: Vec<OsString>,
}

impl Default for QemuMicrovm {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-system-x86_64"),
            extra_args: Vec::new(),
        }
    }
}

impl QemuMicrovm {
    fn args(&self, guest: &GuestConfig, serial_socket: &Path) -> Vec<OsString> {
        let on_off = |b: bool| if b { "on" } else { "off" };
        let mut serial = OsString::from("unix:");
        serial.push(serial_socket);
        serial.push(",server=on,wait=on");
        [
            "-enable-kvm",
            "-M",
            "microvm,acpi=on",
            // Inside the lab (nested SVM on TCG) the XSAVE sizes in CPUID are inconsistent and
            // the guest kernel warns at boot; the guest does not need XSAVE.
            "-cpu",
            "host,xsave=off",
            "-m",
            &format!("{}M", guest.mem_mib),
            "-smp",
            &guest.vcpus.to_string(),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-append",
            &guest.cmdline,
            // QEMU's virtio-mmio is legacy (virtio 0.9) unless told otherwise; ferry's is 1.x.
            "-global",
            "virtio-mmio.force-legacy=false",
            // QEMU runs free page hinting on an I/O thread and refuses it without one.
            "-object",
            "iothread,id=balloon-io",
            "-device",
            &format!(
                "virtio-balloon-device,iothread=balloon-io,free-page-hint={},free-page-reporting={}",
                on_off(guest.free_page_hint),
                on_off(guest.free_page_reporting)
            ),
        ]
        .into_iter()
        .map(OsString::from)
        .chain([
            "-kernel".into(),
            guest.image.kernel.clone().into(),
            "-initrd".into(),
            guest.image.initrd.clone().into(),
            "-serial".into(),
            serial,
        ])
        .chain(self.extra_args.iter().cloned())
        .collect()
    }
}

impl Vmm for QemuMicrovm {
    fn name(&self) -> &str {
        "qemu-microvm"
    }

    fn command(&self, guest: &GuestConfig, serial_socket: &Path) -> Command {
        let mut command = Command::new(&self.binary);
        command.args(self.args(guest, serial_socket));
        command
    }
}

/// How [`FerryVmm`] starts ferry's VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FerryLaunch {
    /// The `ferry-vmm` binary: the VM's flags alone.
    Vmm,
    /// `ferry run`.
    Run,
    /// `ferry receive --listen ADDR`: a destination that waits for a migration.
    Receive(String),
}

/// ferry's VMM as a [`Vmm`]: the one place that turns a [`GuestConfig`] into ferry's command
/// line, for the tests, the benchmarks and bench-vm alike.
#[derive(Debug, Clone)]
pub struct FerryVmm {
    /// The `ferry-vmm` or `ferry` binary (see [`FerryLaunch`]).
    pub binary: PathBuf,
    /// Which command.
    pub launch: FerryLaunch,
    /// The control API socket, if the caller wants one.
    pub api_socket: Option<PathBuf>,
}

impl FerryVmm {
    /// `binary` started as `launch`, without a control API socket.
    pub fn new(binary: impl Into<PathBuf>, launch: FerryLaunch) -> Self {
        Self {
            binary: binary.into(),
            launch,
            api_socket: None,
        }
    }

    /// The same with the control API on `socket`.
    pub fn with_api_socket(mut self, socket: impl Into<PathBuf>) -> Self {
        self.api_socket = Some(socket.into());
        self
    }
}

impl Vmm for FerryVmm {
    fn name(&self) -> &str {
        match self.launch {
            FerryLaunch::Vmm => "ferry-vmm",
            FerryLaunch::Run => "ferry-run",
            FerryLaunch::Receive(_) => "ferry-receive",
        }
    }

    fn command(&self, guest: &GuestConfig, serial_socket: &Path) -> Command {
        let mut balloon = Vec::new();
        if guest.free_page_hint {
            balloon.push("hint");
        }
        if guest.free_page_reporting {
            balloon.push("report");
        }
        balloon.push("stats");
        let mut serial = OsString::from("socket:");
        serial.push(serial_socket);
        let mut command = Command::new(&self.binary);
        match &self.launch {
            // A destination takes the VM from its source: only its own sockets are given.
            FerryLaunch::Receive(listen) => {
                command.args(["receive", "--listen", listen]);
            }
            launch => {
                if *launch == FerryLaunch::Run {
                    command.arg("run");
                }
                command
                    .arg("--kernel")
                    .arg(&guest.image.kernel)
                    .arg("--initrd")
                    .arg(&guest.image.initrd)
                    .args(["--cmdline", &guest.cmdline])
                    .args(["--memory", &format!("{}M", guest.mem_mib)])
                    .args(["--vcpus", &guest.vcpus.to_string()])
                    .args(["--balloon", &balloon.join(",")])
                    // The lab's nested CPUID has inconsistent XSAVE sizes (QEMU gets
                    // xsave=off too).
                    .arg("--no-xsave");
            }
        }
        command.arg("--serial").arg(serial);
        if let Some(api) = &self.api_socket {
            command.arg("--api-socket").arg(api);
        }
        command
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ferry_command_lines_for_each_launch() {
        let mut config = GuestConfig::new(GuestImage {
            kernel: "/img/vmlinuz".into(),
            initrd: "/img/initrd".into(),
        });
        config.mem_mib = 1024;
        config.free_page_reporting = false;
        let args = |vmm: &FerryVmm| -> Vec<String> {
            vmm.command(&config, Path::new("/run/s.sock"))
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        let after = |args: &[String], flag: &str| {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1].clone()
        };
        let run = FerryVmm::new("/bin/ferry", FerryLaunch::Run).with_api_socket("/run/a.api");
        let run_args = args(&run);
        assert_eq!(run_args[0], "run");
        assert_eq!(after(&run_args, "--memory"), "1024M");
        assert_eq!(after(&run_args, "--balloon"), "hint,stats");
        assert_eq!(after(&run_args, "--serial"), "socket:/run/s.sock");
        assert_eq!(after(&run_args, "--api-socket"), "/run/a.api");
        assert!(run_args.contains(&"--no-xsave".to_string()));
        assert_eq!(run.name(), "ferry-run");

        let receive = FerryVmm::new("/bin/ferry", FerryLaunch::Receive("127.0.0.1:0".into()));
        let receive_args = args(&receive);
        assert_eq!(receive_args[..3], ["receive", "--listen", "127.0.0.1:0"]);
        assert!(!receive_args.contains(&"--api-socket".to_string()));
        // The VM comes from the source: a destination is given no VM flags.
        for vm_flag in ["--kernel", "--memory", "--vcpus", "--balloon", "--no-xsave"] {
            assert!(!receive_args.contains(&vm_flag.to_string()), "{vm_flag}");
        }
        assert_eq!(after(&receive_args, "--serial"), "socket:/run/s.sock");
        assert_eq!(receive.name(), "ferry-receive");

        let vmm = FerryVmm::new("/bin/ferry-vmm", FerryLaunch::Vmm);
        assert_eq!(args(&vmm)[0], "--kernel");
        assert_eq!(vmm.name(), "ferry-vmm");
    }

    #[test]
    fn qemu_command_line_boots_microvm_with_the_hinting_balloon() {
        let image = GuestImage {
            kernel: "/img/vmlinuz".into(),
            initrd: "/img/initrd".into(),
        };
        let mut config = GuestConfig::new(image);
        config.free_page_reporting = false;
        let qemu = QemuMicrovm {
            extra_args: vec!["-incoming".into(), "defer".into()],
            ..QemuMicrovm::default()
        };
        let args: Vec<String> = qemu
            .args(&config, Path::new("/run/s.sock"))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let after = |flag: &str| {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1].as_str()
        };
        assert!(args.iter().any(|a| a == "-enable-kvm"));
        assert_eq!(after("-M"), "microvm,acpi=on");
        assert_eq!(after("-m"), "512M");
        assert_eq!(after("-kernel"), "/img/vmlinuz");
        assert_eq!(after("-initrd"), "/img/initrd");
        assert_eq!(after("-serial"), "unix:/run/s.sock,server=on,wait=on");
        assert_eq!(args[args.len() - 2..], ["-incoming", "defer"]);
        assert_eq!(
            after("-device"),
            "virtio-balloon-device,iothread=balloon-io,free-page-hint=on,free-page-reporting=off"
        );
    }
}
