//! The guest image built by `lab/build`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

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
    /// No ferry checkout around this process.
    #[error(
        "cannot find a ferry checkout (a directory with lab/run and Cargo.toml) above this \
         program or the current directory: run ferry from inside one, or set {REPO_ENV}"
    )]
    NoCheckout,
    /// A binary of the workspace has not been built.
    #[error(
        "{0} is missing: build the workspace's binaries first (cargo build --bins; lab/test does)"
    )]
    NoBinary(PathBuf),
}

/// Names the ferry checkout whose lab and guest image the tools use.
pub const REPO_ENV: &str = "FERRY_REPO";

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
        let dir = workspace_root()?.join("build/guest");
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

/// The ferry checkout this process works in, found at run time: `FERRY_REPO` if set, else the
/// first directory holding `lab/run` and `Cargo.toml` above this program (`target/*/ferry`, a
/// test binary in `target/*/deps`; inside the lab the checkout has the same path) or above the
/// current directory. Nothing is compiled in, so an installed `ferry` works from inside any
/// checkout.
pub fn workspace_root() -> Result<&'static Path, ImageError> {
    static ROOT: OnceLock<Option<PathBuf>> = OnceLock::new();
    ROOT.get_or_init(find_checkout)
        .as_deref()
        .ok_or(ImageError::NoCheckout)
}

/// A binary of this workspace (e.g. `ferry-vmm`) for a test: cargo puts test binaries in
/// `target/<profile>/deps/` and the workspace's binaries one level up, so it is looked for
/// there (a test in another package than the binary's gets no `CARGO_BIN_EXE_*`).
pub fn workspace_binary(name: &str) -> Result<PathBuf, ImageError> {
    let exe = std::env::current_exe().map_err(|_| ImageError::NoBinary(name.into()))?;
    let profile_dir = exe
        .parent()
        .filter(|d| d.ends_with("deps"))
        .and_then(Path::parent)
        .or_else(|| exe.parent())
        .ok_or_else(|| ImageError::NoBinary(name.into()))?;
    let path = profile_dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ImageError::NoBinary(path))
    }
}

fn is_checkout(dir: &Path) -> bool {
    dir.join("lab/run").is_file() && dir.join("Cargo.toml").is_file()
}

fn find_checkout() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(REPO_ENV) {
        let dir = PathBuf::from(dir);
        return is_checkout(&dir).then_some(dir);
    }
    [std::env::current_exe().ok(), std::env::current_dir().ok()]
        .into_iter()
        .flatten()
        .find_map(|start| {
            start
                .ancestors()
                .find(|d| is_checkout(d))
                .map(Path::to_path_buf)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_root_holds_the_lab_scripts() {
        // This test binary lives under the checkout's target/.
        let root = workspace_root().unwrap();
        assert!(root.join("lab/build").is_file(), "{}", root.display());
        assert!(!is_checkout(Path::new("/")));
    }
}
