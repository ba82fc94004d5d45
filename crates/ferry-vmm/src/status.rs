//! What the control API reports about a VM (`status`, `balloon`): plain data shared by the
//! VMM, which fills it in, and the API client, which reads it.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

/// Whether the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// vCPUs and devices are stopped.
    Paused,
}

/// What `vcpus` reports for one vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VcpuReport {
    /// vCPU index.
    pub id: u8,
    /// Registers, pending events and local APIC in one line
    /// (`ferry_vmm::kvm::state::VcpuState::describe`).
    pub state: String,
    /// The guest-physical address of its top-level page table when paging is on and that
    /// lies outside the guest's RAM: a guest that cannot run, whose CR3 was rewritten below
    /// it (docs/lab.md, "The lab writes its own CR3 into the guest").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_tables_outside_ram: Option<u64>,
}

/// What `status` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Status {
    /// Running or paused.
    pub state: RunState,
    /// vCPU count.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Milliseconds since the VM was started.
    pub uptime_ms: u64,
    /// The vCPU throttle in force (auto-converge during a migration), percent.
    #[serde(default)]
    pub throttle_percent: u8,
    /// Balloon summary, if there is a balloon.
    pub balloon: Option<BalloonInfo>,
}

/// The balloon as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BalloonInfo {
    /// Bytes the device asks the guest to give up.
    pub target_bytes: u64,
    /// Bytes the guest says it gave up.
    pub actual_bytes: u64,
    /// Features the driver acknowledged (virtio bits).
    pub acked_features: u64,
    /// Whether FREE_PAGE_HINT was negotiated.
    pub free_page_hint: bool,
    /// Whether PAGE_REPORTING was negotiated.
    pub page_reporting: bool,
}
