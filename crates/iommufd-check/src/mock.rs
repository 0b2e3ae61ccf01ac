//! The iommufd calls only a VMM (or a test) makes, and the kernel's selftest mock IOMMU
//! (`IOMMU_TEST_CMD`, present when the kernel has CONFIG_IOMMUFD_TEST).
//!
//! Layouts are those of Linux 6.12's `include/uapi/linux/iommufd.h` and
//! `drivers/iommu/iommufd/iommufd_test.h`; the sizes and offsets used are asserted below. The
//! same calls pass on Linux 7.3 (`tests/kernel/run --kernel 7.3`). The
//! fault queue and the fault-capable HWPT are allocated with faultd's own helpers
//! (`iopf::iommufd`), so those are proven against the kernel too.

use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `_IO(';', nr)`: iommufd ioctls carry no size or direction bits.
const fn iommufd_io(nr: u64) -> u64 {
    (b';' as u64) << 8 | nr
}

const IOMMU_IOAS_MAP: u64 = iommufd_io(0x85);
const IOMMU_IOAS_UNMAP: u64 = iommufd_io(0x86);
const IOMMU_TEST_CMD: u64 = iommufd_io(0xa0);

const _: () = assert!(IOMMU_TEST_CMD == 0x3ba0);

/// `IOMMU_TEST_OP_*` (iommufd_test.h).
const OP_MOCK_DOMAIN: u32 = 2;
const OP_MD_CHECK_MAP: u32 = 3;
const OP_CREATE_ACCESS: u32 = 5;
const OP_ACCESS_RW: u32 = 8;
const OP_MOCK_DOMAIN_REPLACE: u32 = 10;
const OP_TRIGGER_IOPF: u32 = 15;

/// The mock IOMMU's aperture: IOVAs it can translate.
pub const MOCK_APERTURE_START: u64 = 1 << 24;

#[repr(C)]
#[derive(Debug, Default)]
struct IoasMap {
    size: u32,
    flags: u32,
    ioas_id: u32,
    reserved: u32,
    user_va: u64,
    length: u64,
    iova: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct IoasUnmap {
    size: u32,
    ioas_id: u32,
    iova: u64,
    length: u64,
}

/// `struct iommu_test_cmd`: a 16-byte header, a 48-byte union (the op's arguments), `last`.
#[repr(C)]
#[derive(Debug, Default)]
struct TestCmd {
    size: u32,
    op: u32,
    id: u32,
    reserved: u32,
    body: [u64; 6],
    last: u32,
}

const _: () = assert!(size_of::<IoasMap>() == 40 && offset_of!(IoasMap, iova) == 32);
const _: () = assert!(size_of::<IoasUnmap>() == 24 && offset_of!(IoasUnmap, length) == 16);
const _: () = assert!(offset_of!(TestCmd, body) == 16 && offset_of!(TestCmd, last) == 64);
const _: () = assert!(size_of::<TestCmd>() == 72);

impl TestCmd {
    fn new(op: u32, id: u32) -> TestCmd {
        TestCmd {
            size: size_of::<TestCmd>() as u32,
            op,
            id,
            ..TestCmd::default()
        }
    }

    /// The union viewed as u32s (little-endian halves of the u64 words).
    fn u32_at(&self, idx: usize) -> u32 {
        let word = self.body[idx / 2];
        if idx.is_multiple_of(2) {
            word as u32
        } else {
            (word >> 32) as u32
        }
    }

    fn set_u32(&mut self, idx: usize, v: u32) {
        let word = &mut self.body[idx / 2];
        if idx.is_multiple_of(2) {
            *word = (*word & !0xffff_ffff) | u64::from(v);
        } else {
            *word = (*word & 0xffff_ffff) | u64::from(v) << 32;
        }
    }
}

const _: () = assert!(cfg!(target_endian = "little"));

/// Issues iommufd ioctl `req` with `arg`.
fn ioctl<T>(fd: BorrowedFd<'_>, req: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: every caller passes the argument struct of `req` (layouts asserted above), whose
    // `size` field bounds what the kernel reads and writes; `arg` is a live exclusive borrow
    // for the duration of the call. User pointers inside (IOAS_MAP's user_va, CHECK_MAP's
    // uptr) are checked by the kernel, which never writes through them; ACCESS_RW's read
    // writes through its uptr, which its caller makes a live exclusive buffer of that length.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req as libc::c_ulong, arg as *mut T) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether nothing is mapped in `[iova, iova+len)` of the IOAS: a FIXED_IOVA map of `len`
/// bytes at `user_va` (resident memory of this process) succeeds only on free IOVA. The probe
/// mapping is removed again at once. Err for anything but success or EEXIST.
pub fn iova_is_free(
    iommufd: BorrowedFd<'_>,
    ioas_id: u32,
    iova: u64,
    len: u64,
    user_va: u64,
) -> io::Result<bool> {
    let mut map = IoasMap {
        size: size_of::<IoasMap>() as u32,
        flags: 1 | 4, // FIXED_IOVA | READABLE
        ioas_id,
        user_va,
        length: len,
        iova,
        ..IoasMap::default()
    };
    match ioctl(iommufd, IOMMU_IOAS_MAP, &mut map) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Ok(false),
        Err(e) => return Err(e),
    }
    let mut unmap = IoasUnmap {
        size: size_of::<IoasUnmap>() as u32,
        ioas_id,
        iova,
        length: len,
    };
    ioctl(iommufd, IOMMU_IOAS_UNMAP, &mut unmap)?;
    Ok(true)
}

/// `IOMMU_IOAS_MAP` (FIXED_IOVA, readable) of `len` bytes at `user_va` to `iova`, left mapped
/// (undo with [`ioas_unmap`]).
pub fn ioas_map_fixed(
    iommufd: BorrowedFd<'_>,
    ioas_id: u32,
    iova: u64,
    len: u64,
    user_va: u64,
) -> io::Result<()> {
    let mut map = IoasMap {
        size: size_of::<IoasMap>() as u32,
        flags: 1 | 4, // FIXED_IOVA | READABLE
        ioas_id,
        user_va,
        length: len,
        iova,
        ..IoasMap::default()
    };
    ioctl(iommufd, IOMMU_IOAS_MAP, &mut map)
}

/// `IOMMU_IOAS_UNMAP` of exactly `[iova, iova+len)`.
pub fn ioas_unmap(iommufd: BorrowedFd<'_>, ioas_id: u32, iova: u64, len: u64) -> io::Result<()> {
    let mut unmap = IoasUnmap {
        size: size_of::<IoasUnmap>() as u32,
        ioas_id,
        iova,
        length: len,
    };
    ioctl(iommufd, IOMMU_IOAS_UNMAP, &mut unmap)
}

/// A mock device bound to this iommufd.
#[derive(Debug, Clone, Copy)]
pub struct MockDev {
    /// The selftest object (for MOCK_DOMAIN_REPLACE).
    pub stdev_id: u32,
    /// The iommufd device id (`dev_id` of HWPT_ALLOC and of its page requests).
    pub idev_id: u32,
    /// The HWPT it was attached to at creation (the IOAS's automatic domain).
    pub hwpt_id: u32,
}

/// `IOMMU_TEST_OP_MOCK_DOMAIN`: creates a mock device, binds it and attaches it to `pt_id`.
pub fn mock_domain(iommufd: BorrowedFd<'_>, pt_id: u32) -> io::Result<MockDev> {
    let mut cmd = TestCmd::new(OP_MOCK_DOMAIN, pt_id);
    ioctl(iommufd, IOMMU_TEST_CMD, &mut cmd)?;
    Ok(MockDev {
        stdev_id: cmd.u32_at(0),
        hwpt_id: cmd.u32_at(1),
        idev_id: cmd.u32_at(2),
    })
}

/// `IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE`: attaches the mock device to `pt_id` in place of its
/// current HWPT (the kernel answers the old HWPT's outstanding page requests INVALID).
pub fn mock_replace(iommufd: BorrowedFd<'_>, dev: &MockDev, pt_id: u32) -> io::Result<()> {
    let mut cmd = TestCmd::new(OP_MOCK_DOMAIN_REPLACE, dev.stdev_id);
    cmd.set_u32(0, pt_id);
    ioctl(iommufd, IOMMU_TEST_CMD, &mut cmd)
}

/// `IOMMU_TEST_OP_TRIGGER_IOPF`: the mock device raises a one-page page request group.
pub fn trigger_iopf(
    iommufd: BorrowedFd<'_>,
    dev: &MockDev,
    grpid: u32,
    perm: u32,
    addr: u64,
) -> io::Result<()> {
    let mut cmd = TestCmd::new(OP_TRIGGER_IOPF, 0);
    cmd.set_u32(0, dev.idev_id);
    cmd.set_u32(1, 0); // pasid: IOMMU_NO_PASID, a RID-level request as VT-d reports them
    cmd.set_u32(2, grpid);
    cmd.set_u32(3, perm);
    cmd.body[2] = addr;
    ioctl(iommufd, IOMMU_TEST_CMD, &mut cmd)
}

/// `IOMMU_TEST_OP_MD_CHECK_MAP`: Ok iff every page of `[iova, iova+len)` in mock HWPT
/// `hwpt_id` translates to the physical page behind `[uptr, uptr+len)` of this process
/// (the kernel compares page by page; EINVAL on the first that is unmapped or elsewhere).
/// `uptr` must be resident: the kernel looks it up with get_user_pages.
pub fn md_check_map(
    iommufd: BorrowedFd<'_>,
    hwpt_id: u32,
    iova: u64,
    len: u64,
    uptr: u64,
) -> io::Result<()> {
    let mut cmd = TestCmd::new(OP_MD_CHECK_MAP, hwpt_id);
    cmd.body[0] = iova;
    cmd.body[1] = len;
    cmd.body[2] = uptr;
    ioctl(iommufd, IOMMU_TEST_CMD, &mut cmd)
}

/// `IOMMU_TEST_OP_CREATE_ACCESS`: an emulated device ("access") reading and writing through
/// IOAS `ioas_id`, as a device's DMA would through the IOAS's mappings. Its fd is its id.
pub fn create_access(iommufd: BorrowedFd<'_>, ioas_id: u32) -> io::Result<OwnedFd> {
    let mut cmd = TestCmd::new(OP_CREATE_ACCESS, ioas_id);
    ioctl(iommufd, IOMMU_TEST_CMD, &mut cmd)?;
    let raw = cmd.u32_at(0) as i32;
    // SAFETY: on success the kernel installed a new fd for the access object in this process;
    // nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `IOMMU_TEST_OP_ACCESS_RW` (read): the access reads `buf.len()` bytes at `iova` through the
/// IOAS into `buf`. Fails (ENOENT/EINVAL) where the IOAS maps nothing.
pub fn access_read(
    iommufd: BorrowedFd<'_>,
    access: BorrowedFd<'_>,
    iova: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    let mut cmd = TestCmd::new(OP_ACCESS_RW, access.as_raw_fd() as u32);
    cmd.body[0] = iova;
    cmd.body[1] = buf.len() as u64;
    cmd.body[2] = buf.as_mut_ptr() as u64;
    cmd.set_u32(6, 0); // flags: read, fast path
    ioctl(iommufd, IOMMU_TEST_CMD, &mut cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_u32s_are_little_endian_halves_of_the_words() {
        let mut cmd = TestCmd::new(OP_TRIGGER_IOPF, 0);
        cmd.set_u32(0, 7);
        cmd.set_u32(1, 0x0102_0304);
        cmd.set_u32(3, 2);
        cmd.body[2] = 0x1234_5000;

        assert_eq!(cmd.body[0], 0x0102_0304_0000_0007);
        assert_eq!(cmd.body[1], 2 << 32);
        assert_eq!(
            (cmd.u32_at(0), cmd.u32_at(1), cmd.u32_at(3)),
            (7, 0x0102_0304, 2)
        );
        assert_eq!(cmd.size, 72);
    }
}
