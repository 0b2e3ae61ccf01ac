//! Guest memory a VMM built on rust-vmm's `vm-memory` already owns: each region of a
//! [`GuestMemoryMmap`] that maps a memory fd shared is a region faultd can serve, at whatever
//! offset of the fd it maps.

use std::os::fd::AsFd;
use std::ptr::NonNull;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::{ClientError, RamPageSize, RegionSpec, SharedMemory};

const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// The regions of `memory` as zero-filled [`RegionSpec`]s, in guest-address order (turn one
/// into a snapshot-backed region with [`RegionSpec::from_snapshot`]).
///
/// Every region must map a memory fd (`FileOffset`) `MAP_SHARED`: a memfd gives 4 KiB pages,
/// a hugetlbfs file 2 MiB pages (read from the file system). Anonymous regions (vm-memory's
/// `from_ranges` without files) are refused: faultd needs an fd to save and restore pages
/// through. Regions may share one fd at different offsets; it is sent to faultd once.
///
/// ```no_run
/// use std::fs::File;
/// use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};
/// use faultd_client::{create_uffd, vm_memory_regions, Client, DEFAULT_SOCKET_PATH};
///
/// // One memfd of 3 GiB: guest RAM below a 1 GiB hole at 3 GiB, and the rest above 4 GiB.
/// let memfd = File::from(nix::sys::memfd::memfd_create(
///     "guest-ram",
///     nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
/// )?);
/// memfd.set_len(3 << 30)?;
/// let memory: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files([
///     (GuestAddress(0), 2 << 30, Some(FileOffset::new(memfd.try_clone()?, 0))),
///     (GuestAddress(4 << 30), 1 << 30, Some(FileOffset::new(memfd, 2 << 30))),
/// ])?;
/// let regions = vm_memory_regions(&memory)?;
/// let uffd = create_uffd()?;
/// for r in &regions {
///     r.memory.register(&uffd)?;
/// }
/// let session = Client::connect(DEFAULT_SOCKET_PATH)?.register("vm0", &uffd, &regions, None)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn vm_memory_regions(memory: &GuestMemoryMmap) -> Result<Vec<RegionSpec<'_>>, ClientError> {
    memory
        .iter()
        .map(|region| {
            let gpa = region.start_addr().0;
            let refuse = |reason| ClientError::UnsharedRegion { gpa, reason };
            let file = region.file_offset().ok_or_else(|| {
                refuse("anonymous memory: faultd needs a memory fd (a FileOffset)")
            })?;
            let mapping = region.get_mmap();
            if mapping.flags() & libc::MAP_SHARED == 0 {
                return Err(refuse(
                    "mapped private: faultd fills pages through the fd, so it must be MAP_SHARED",
                ));
            }
            let fd = file.file().as_fd();
            let fs = nix::sys::statfs::fstatfs(fd)
                .map_err(|_| refuse("fstatfs of its memory fd failed"))?;
            let page_size = if fs.filesystem_type().0 as i64 == HUGETLBFS_MAGIC {
                RamPageSize::Size2M
            } else {
                RamPageSize::Size4K
            };
            let host = NonNull::new(mapping.as_ptr()).ok_or_else(|| refuse("null mapping"))?;
            let shared = SharedMemory::new(fd, file.start(), host, region.len(), page_size)?;
            Ok(RegionSpec::zero(gpa, shared))
        })
        .collect()
}
