//! # ferry-vmm
//!
//! A minimal KVM micro-VMM that boots a stock Debian kernel with ACPI-described virtio-mmio
//! devices, an 8250 console and a JSON control API. It is the VM ferry migrates.
#![deny(missing_docs)]

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod config;
pub mod gate;
pub mod kvm;
pub mod layout;
pub mod memory;
pub mod serial;

pub use config::{BalloonConfig, ConfigError, RunArgs, SerialTarget, VmConfig};
