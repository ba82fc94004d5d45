//! Is hardware KVM usable here?

use std::path::Path;

/// True when /dev/kvm is backed by hardware virtualization (kvm_intel or kvm_amd is loaded and
/// kvm_pvm is not). PVM's /dev/kvm accepts every ioctl but emulates a non-PVM guest far too slowly
/// to boot Linux, so its presence alone means nothing; inside the lab host this is true.
pub fn hw_kvm_usable() -> bool {
    usable_in(Path::new("/"))
}

fn usable_in(root: &Path) -> bool {
    let exists = |p: &str| root.join(p).exists();
    exists("dev/kvm")
        && !exists("sys/module/kvm_pvm")
        && (exists("sys/module/kvm_intel") || exists("sys/module/kvm_amd"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn needs_a_hardware_module_and_no_pvm() {
        let root = std::env::temp_dir().join(format!("ferry-lab-kvm-{}", std::process::id()));
        let make = |p: &str| fs::create_dir_all(root.join(p)).unwrap();
        make("dev/kvm");
        make("sys/module/kvm");
        assert!(!usable_in(&root), "/dev/kvm alone");
        make("sys/module/kvm_amd");
        assert!(usable_in(&root), "kvm_amd");
        make("sys/module/kvm_pvm");
        assert!(!usable_in(&root), "kvm_pvm");
        fs::remove_dir_all(&root).unwrap();
    }
}
