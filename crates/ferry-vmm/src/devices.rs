//! The small legacy devices (i8042 reset line, ACPI sleep/reset registers) and the glue that
//! puts the virtio-mmio balloon on ferry's MMIO bus.
#![forbid(unsafe_code)]

use std::io;
use std::sync::Arc;

use ferry_balloon::{Balloon, IrqTrigger, MmioDevice};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi;
use crate::bus::BusDevice;
use crate::exit::ExitReason;
use crate::kvm::vcpu::VcpuControl;

/// i8042 command: pulse the CPU reset line.
const I8042_CMD_RESET: u8 = 0xfe;

/// Just enough of an i8042 controller for Linux to reboot through it (`reboot=k`): the status
/// port reads 0 (no data, input buffer empty), the reset command stops the VM. The data port
/// reads 0 too, which Linux's probe (with i8042.noaux etc.) tolerates.
#[derive(Debug)]
pub struct I8042 {
    control: Arc<VcpuControl>,
}

impl I8042 {
    /// Base port of the window [`I8042`] decodes (0x60..=0x64).
    pub const BASE: u16 = 0x60;
    /// Window length.
    pub const LEN: u64 = 5;

    /// A controller that reports a reset through `control`.
    pub fn new(control: Arc<VcpuControl>) -> Self {
        Self { control }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let command_offset = u64::from(crate::layout::I8042_COMMAND_PORT - Self::BASE);
        if offset == command_offset && data.first() == Some(&I8042_CMD_RESET) {
            self.control.request_exit(ExitReason::GuestReset);
        }
    }
}

/// The hardware-reduced ACPI sleep control, sleep status and reset registers declared in the
/// FADT: writing S5|SLP_EN powers off, writing the reset value reboots.
#[derive(Debug)]
pub struct AcpiPm {
    control: Arc<VcpuControl>,
}

impl AcpiPm {
    /// First port (sleep control); sleep status and reset follow.
    pub const BASE: u16 = crate::layout::ACPI_SLEEP_CONTROL_PORT;
    /// Window length.
    pub const LEN: u64 = 3;

    /// Registers reporting through `control`.
    pub fn new(control: Arc<VcpuControl>) -> Self {
        Self { control }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        let reset = u64::from(crate::layout::ACPI_RESET_PORT - Self::BASE);
        match offset {
            0 if v & acpi::SLP_EN != 0 && v == acpi::POWER_OFF_VALUE => {
                self.control.request_exit(ExitReason::GuestPowerOff)
            }
            o if o == reset && v == acpi::RESET_VALUE => {
                self.control.request_exit(ExitReason::GuestReset)
            }
            _ => {}
        }
    }
}

/// Raises a device interrupt through an irqfd.
#[derive(Debug)]
pub struct IrqfdTrigger(pub EventFd);

impl IrqTrigger for IrqfdTrigger {
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

impl BusDevice for Balloon {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.mmio_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.mmio_write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i8042_reset_and_acpi_power_off_stop_the_vm() {
        let c = Arc::new(VcpuControl::default());
        let mut kbd = I8042::new(c.clone());
        let mut status = [0xaa];
        kbd.read(4, &mut status);
        assert_eq!(status, [0]);
        kbd.write(4, &[0xfe]);
        assert_eq!(c.wait_exit(), ExitReason::GuestReset);

        let c = Arc::new(VcpuControl::default());
        let mut pm = AcpiPm::new(c.clone());
        pm.write(0, &[acpi::SLP_EN]); // S0 with SLP_EN: ignored
        pm.write(0, &[acpi::POWER_OFF_VALUE]);
        assert_eq!(c.wait_exit(), ExitReason::GuestPowerOff);
    }
}
