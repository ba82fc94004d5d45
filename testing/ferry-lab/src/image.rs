//! The guest image built by `lab/build`.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Environment variables overriding the image files.
pub const KERNEL_ENV: &str = "FERRY_GUEST_KERNEL";
/// See [`KERNEL_ENV`].
pub const INITRD_ENV: &str = "FERRY_GUEST_INITRD";

/// Why the guest image cannot be used.
#[derive(Debug, Error)]
pub enum ImageError {
    /// A file of the image does not exist.
    #[error("guest image file {0} is missing: run lab/build (or scripts/setup.sh)")]
    Missing(PathBuf),
}

/// The kernel (a bzImage) and initramfs that boot into `ferry-guest-agent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// Debian's kernel.
    pub kernel: PathBuf,
    /// busybox, the virtio-mmio and balloon modules, the agent.
    pub initrd: PathBuf,
}

impl GuestImage {
    /// The image in the workspace's `build/guest/`, or the files named by `FERRY_GUEST_KERNEL`
    /// and `FERRY_GUEST_INITRD`. Both files must exist.
    pub fn locate() -> Result<Self, ImageError> {
        let dir = workspace_root().join("build/guest");
        let pick = |var: &str, default: &str| {
            std::env::var_os(var).map_or_else(|| dir.join(default), PathBuf::from)
        };
        let image = Self {
            kernel: pick(KERNEL_ENV, "vmlinuz"),
            initrd: pick(INITRD_ENV, "initramfs.cpio.gz"),
        };
        for file in [&image.kernel, &image.initrd] {
            if !file.is_file() {
                return Err(ImageError::Missing(file.clone()));
            }
        }
        Ok(image)
    }
}

/// The workspace root, known at compile time. Inside the lab the repository has the same path,
/// so binaries built on the host find the image there too.
pub fn workspace_root() -> &'static Path {
    // testing/ferry-lab -> the workspace root.
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_root_holds_the_lab_scripts() {
        assert!(workspace_root().join("lab/build").is_file());
    }
}
