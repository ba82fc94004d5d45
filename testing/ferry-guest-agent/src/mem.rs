//! Fallible allocation: a size the guest cannot hold is an error answer, not an abort.

use thiserror::Error;

use crate::sysinfo;

/// Bytes in one MiB.
pub const MIB: u64 = 1 << 20;

/// Guest page size the workloads and the data set are laid out in.
pub const PAGE_SIZE: usize = 4096;

#[derive(Debug, Error)]
pub enum AllocError {
    #[error("{mib} MiB does not fit in this process's address space")]
    TooLarge { mib: u64 },
    #[error("cannot allocate {mib} MiB: out of memory")]
    OutOfMemory { mib: u64 },
    #[error("{mib} MiB asked but only {available_mib} MiB available")]
    Unavailable { mib: u64, available_mib: u64 },
}

/// Number of `T`s that make up `mib` MiB.
pub fn elements_in<T>(mib: u64) -> Result<usize, AllocError> {
    mib.checked_mul(MIB)
        .and_then(|bytes| usize::try_from(bytes).ok())
        .map(|bytes| bytes / std::mem::size_of::<T>())
        .ok_or(AllocError::TooLarge { mib })
}

/// An empty vector with room for `mib` MiB of `T`s, or an error if the memory is not available.
/// The memory is not touched yet. Sizes above the kernel's MemAvailable are refused: the kernel
/// overcommits, so the allocation would succeed and the OOM killer would end the agent later.
pub fn reserve<T>(mib: u64) -> Result<Vec<T>, AllocError> {
    let len = elements_in::<T>(mib)?;
    // Without /proc/meminfo (not Linux) the allocation itself is the only check.
    if let Ok(info) = sysinfo::meminfo() {
        let available_mib = info.available_kib / 1024;
        if mib > available_mib {
            return Err(AllocError::Unavailable { mib, available_mib });
        }
    }
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| AllocError::OutOfMemory { mib })?;
    Ok(v)
}

/// `mib` MiB filled with `byte`: every page touched and non-zero when `byte` is.
pub fn filled(mib: u64, byte: u8) -> Result<Vec<u8>, AllocError> {
    let mut v = reserve::<u8>(mib)?;
    v.resize(elements_in::<u8>(mib)?, byte);
    // The buffer escapes to code the optimizer cannot see, so the allocation and the writes
    // stay even where the caller drops it unread (`freed`, the churn). Without this, once
    // inlined into the churn loop, LLVM removed both: the guest churned nothing, thousands
    // of empty "cycles" a second, and the restore test saw no free page report.
    Ok(std::hint::black_box(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked() {
        assert_eq!(elements_in::<u64>(1).unwrap(), 131_072);
        assert!(matches!(
            elements_in::<u8>(u64::MAX),
            Err(AllocError::TooLarge { .. })
        ));
        let available_mib = sysinfo::meminfo().unwrap().available_kib / 1024;
        assert!(matches!(
            reserve::<u8>(available_mib + 1),
            Err(AllocError::Unavailable { .. })
        ));
        let v = filled(1, 0x5a).unwrap();
        assert_eq!(v.len(), MIB as usize);
        assert!(v.iter().all(|&b| b == 0x5a));
    }
}
