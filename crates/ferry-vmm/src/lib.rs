//! # ferry-vmm
//!
//! A minimal KVM micro-VMM that boots a stock Debian kernel with ACPI-described virtio-mmio
//! devices (the ferry balloon), an 8250 console and a JSON control API. It is the VM ferry
//! migrates: it exposes pause/resume, state save, and a dirty log for the migration engine.
//!
//! Entry point: [`run`] (blocking) with a [`VmConfig`], built from [`RunArgs`] by the CLI.
//! Layout of the crate: [`config`] (validation), [`layout`] (memory map), [`boot`] (bzImage,
//! zero page), [`acpi`], [`memory`] (RAM, slots, dirty log), [`kvm`] (VM, vCPUs, CPUID,
//! registers, state), [`bus`], [`serial`], [`devices`], [`vmm`] (the machine), [`api`].
//! `unsafe` lives only in [`memory`] and [`kvm`].
#![deny(missing_docs)]

pub mod acpi;
pub mod api;
pub mod api_schema;
pub mod boot;
pub mod builder;
pub mod bus;
pub mod config;
pub mod console;
pub mod description;
pub mod devices;
mod exit;
pub mod gate;
pub mod kvm;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod receive;
pub mod serial;
mod serve;
pub mod state_format;
pub mod status;
mod steps;
pub mod units;
pub mod vmm;

pub use api::{ApiClient, ApiError, ErrorCode, Refusal, Request};
pub use builder::IncomingVm;
pub use config::{BalloonConfig, ConfigError, RunArgs, SerialTarget, VmConfig};
pub use description::{IncomingError, ReceiveSettings, VmDescription};
pub use exit::ExitReason;
pub use serve::run;
pub use vmm::{MachineState, Status, Vmm, VmmError as Error};
