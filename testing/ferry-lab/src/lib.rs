//! # ferry-lab
//!
//! Test support for end-to-end tests: boot the guest image (Debian's kernel, an initramfs with
//! the virtio-mmio balloon modules and `ferry-guest-agent`) under a VMM, and talk to the agent
//! over the guest's serial console.
//!
//! - [`GuestImage`] finds the image that `lab/build` made.
//! - [`Vmm`] turns a [`GuestConfig`] into a VMM command line; [`QemuMicrovm`] is Debian's QEMU
//!   (`-M microvm,acpi=on`), the stand-in and the baseline for ferry's own VMM.
//! - [`Guest`] runs the VMM process and connects to the serial console through a Unix socket.
//! - [`AgentClient`] sends agent commands and waits for their `OK`/`ERR` answer, keeping every
//!   console line so that tests can check the guest kernel reported no error
//!   ([`AgentClient::kernel_errors`]).
//! - [`hw_kvm_usable`] says whether this machine can run such a guest at all (see `lab/run`).
//! - [`exit_lab_fault`] ends a test binary on a proven fault of the lab itself.
//! - [`pki`] makes throwaway certificates for the TLS tests and benchmarks.
//!
//! The agent's protocol is documented in the `ferry-guest-agent` crate and in docs/lab.md.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod agent;
mod fault;
mod guest;
mod image;
mod kvm;
pub mod pki;
mod vmm;

pub use agent::{
    checker_pages, heartbeat_gaps, heartbeat_number, is_heartbeat, AgentClient, AgentError,
    Heartbeat, HeartbeatGaps, KERNEL_ERROR_MARKERS, POWER_OFF_MARKERS, POWER_OFF_WARNINGS,
    READY_LINE,
};
pub use fault::{exit_lab_fault, page_walks_outside_ram, LAB_FAULT_EXIT};
pub use guest::{Guest, GuestError};
pub use image::{workspace_binary, workspace_root, GuestImage, ImageError, REPO_ENV};
pub use kvm::hw_kvm_usable;
pub use vmm::{FerryLaunch, FerryVmm, GuestConfig, QemuMicrovm, Vmm};
