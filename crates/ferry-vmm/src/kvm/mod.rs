//! Everything that talks to KVM. With [`crate::memory`], the only place `unsafe` is allowed.

pub mod cpuid;
pub mod regs;
pub mod state;
pub mod vcpu;
pub mod vm;
