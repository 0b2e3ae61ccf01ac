//! The kernel backend: page requests from an iommufd fault fd ([`IommufdQueue`]) and device
//! translations through an IOAS ([`IoasMapper`]). Also the two allocations a VMM makes to wire
//! a device for faulting ([`alloc_fault_queue`], [`alloc_fault_hwpt`]).
//!
//! Errno is lifted into meaning once, here. On the fault fd, a read of 0 bytes means empty: the
//! fd never blocks and never says EAGAIN. On write, EINVAL means the cookie is not pending. On
//! IOAS_MAP with FIXED_IOVA, EEXIST or EBUSY (which one is unconfirmed) mean already mapped. On
//! IOAS_UNMAP, ENOENT means nothing mapped there.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use crate::model::GroupAssembler;
use crate::sys::{self, iommu_fault_alloc, iommu_hwpt_alloc, iommu_ioas_map, iommu_ioas_unmap};
use crate::{check_granule, FaultQueue, Incoming, Iova, MapError, MapTarget, Mapper};
use crate::{RespondError, ResponseCode};

/// Records per read(2): 1640 * 40 = 65600 bytes, at least 64 KiB and a multiple of 40. The
/// kernel copies whole groups only, so a buffer smaller than a group would read 0 forever.
const READ_RECORDS: usize = 1640;
/// read(2) calls per [`FaultQueue::read`]: a bound on one call's work. The fd polls readable
/// while groups remain.
const READS_PER_CALL: usize = 4;

/// What `/proc/self/fd/N` reads for a fault fd of `IOMMU_FAULT_QUEUE_ALLOC`: the kernel
/// makes it an anon inode named `[iommufd-pgfault]` (drivers/iommu/iommufd, 6.11 on).
pub const FAULT_FD_KIND: &str = "anon_inode:[iommufd-pgfault]";

/// Refuses an fd that is not the kernel's iommufd fault queue, naming what it is instead (a
/// file read as a queue delivers garbage, or nothing, as fast as it is read).
pub fn check_fault_fd(fd: BorrowedFd<'_>) -> io::Result<()> {
    let kind = crate::shm::fd_kind(fd)?;
    if kind.as_os_str() == FAULT_FD_KIND {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "is {}, not an iommufd fault queue ({FAULT_FD_KIND})",
            kind.display()
        ),
    ))
}

/// Where the kernel publishes the device number of `/dev/iommu` (the misc device "iommu").
/// A fixed path of faultd's own choosing, never one a client names.
const IOMMU_DEV_SYSFS: &str = "/sys/class/misc/iommu/dev";

/// Refuses an fd that is not an open `/dev/iommu` (an iommufd), naming what it is instead.
/// faultd issues `IOMMU_IOAS_MAP`/`UNMAP` on the fd a client hands it as its device's IOMMU;
/// on another device's fd those numbers mean whatever that driver makes of them.
pub fn check_iommufd(fd: BorrowedFd<'_>) -> io::Result<()> {
    let st = nix::sys::stat::fstat(fd)?;
    let is_chr = st.st_mode & libc::S_IFMT == libc::S_IFCHR;
    let rdev = (
        nix::sys::stat::major(st.st_rdev),
        nix::sys::stat::minor(st.st_rdev),
    );
    let iommu = std::fs::read_to_string(IOMMU_DEV_SYSFS)
        .ok()
        .and_then(|s| parse_dev(s.trim()));
    if is_chr && iommu == Some(rdev) {
        return Ok(());
    }
    let kind = crate::shm::fd_kind(fd)?;
    let why = match iommu {
        None => format!("this kernel has no /dev/iommu ({IOMMU_DEV_SYSFS} unreadable)"),
        Some((ma, mi)) => format!("/dev/iommu is char device {ma}:{mi}"),
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "is {} (device {}:{}), not an iommufd: {why}",
            kind.display(),
            rdev.0,
            rdev.1
        ),
    ))
}

/// "MAJOR:MINOR" as sysfs writes a device number.
fn parse_dev(s: &str) -> Option<(u64, u64)> {
    let (ma, mi) = s.split_once(':')?;
    Some((ma.parse().ok()?, mi.parse().ok()?))
}

/// Page requests from the kernel's fault fd (`IOMMU_FAULT_QUEUE_ALLOC`).
#[derive(Debug)]
pub struct IommufdQueue {
    fd: OwnedFd,
    buf: Vec<u8>,
    assembler: GroupAssembler,
    malformed_records: u64,
}

impl IommufdQueue {
    /// Takes the fault fd. Sets O_NONBLOCK, which the kernel fd does not need (it never
    /// blocks) but anything standing in for it might.
    pub fn new(fault_fd: OwnedFd) -> io::Result<IommufdQueue> {
        crate::shm::set_nonblocking(fault_fd.as_fd())?;
        Ok(IommufdQueue {
            fd: fault_fd,
            buf: vec![0; READ_RECORDS * sys::PGFAULT_SIZE],
            // One fault object may serve several devices: any dev_id is accepted.
            assembler: GroupAssembler::new(),
            malformed_records: 0,
        })
    }

    /// Records that failed validation so far.
    pub fn malformed_records(&self) -> u64 {
        self.malformed_records
    }
}

impl FaultQueue for IommufdQueue {
    fn read(&mut self, out: &mut Vec<Incoming>) -> io::Result<()> {
        for _ in 0..READS_PER_CALL {
            let n = match nix::unistd::read(&self.fd, &mut self.buf) {
                // 0 is the kernel's "empty"; EAGAIN is a non-blocking stand-in's.
                Ok(0) | Err(nix::errno::Errno::EAGAIN) => return Ok(()),
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            if n % sys::PGFAULT_SIZE != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("fault fd returned {n} bytes, not whole 40-byte records"),
                ));
            }
            for chunk in self.buf[..n].chunks_exact(sys::PGFAULT_SIZE) {
                // chunks_exact yields exactly PGFAULT_SIZE bytes, so the conversion holds.
                let Ok(bytes) = <&[u8; sys::PGFAULT_SIZE]>::try_from(chunk) else {
                    continue;
                };
                if self
                    .assembler
                    .push(&sys::pgfault_from_bytes(bytes), out)
                    .is_err()
                {
                    self.malformed_records += 1;
                }
            }
        }
        Ok(())
    }

    fn respond(&mut self, cookie: u32, code: ResponseCode) -> Result<(), RespondError> {
        let bytes = sys::page_response_to_bytes(&sys::iommu_hwpt_page_response {
            cookie,
            code: code.raw(),
        });
        match nix::unistd::write(&self.fd, &bytes) {
            Ok(n) if n == bytes.len() => Ok(()),
            Ok(_) => Err(RespondError::Io(io::ErrorKind::WriteZero.into())),
            Err(e) => Err(lift_respond_errno(cookie, e)),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn lift_respond_errno(cookie: u32, e: nix::errno::Errno) -> RespondError {
    match e {
        nix::errno::Errno::EINVAL => RespondError::UnknownCookie(cookie),
        // Never from the kernel fd (its write does not block); a stand-in that is full.
        nix::errno::Errno::EAGAIN => RespondError::QueueFull,
        e => RespondError::Io(e.into()),
    }
}

/// Device translations through an iommufd IOAS: one `IOMMU_IOAS_MAP` (FIXED_IOVA, user VA
/// = faultd's mapping of guest RAM) per granule, and `IOMMU_IOAS_UNMAP` of exactly it. The
/// kernel pins the pages while mapped and invalidates the IOTLB before unmap returns.
#[derive(Debug)]
pub struct IoasMapper {
    iommufd: OwnedFd,
    ioas_id: u32,
    granule: u64,
}

impl IoasMapper {
    /// A mapper for IOAS `ioas_id` of `iommufd`, in granules of `granule` bytes (a power of
    /// two, at least 4 KiB).
    pub fn new(iommufd: OwnedFd, ioas_id: u32, granule: u64) -> Result<IoasMapper, MapError> {
        if !granule.is_power_of_two() || granule < crate::model::PAGE_SIZE {
            return Err(MapError::InvalidGranule(granule));
        }
        Ok(IoasMapper {
            iommufd,
            ioas_id,
            granule,
        })
    }
}

/// The `IOMMU_IOAS_MAP` argument for one granule.
fn ioas_map_args(ioas_id: u32, iova: Iova, len: u64, va: u64, writable: bool) -> iommu_ioas_map {
    let mut flags = sys::IOAS_MAP_FIXED_IOVA | sys::IOAS_MAP_READABLE;
    if writable {
        flags |= sys::IOAS_MAP_WRITEABLE;
    }
    iommu_ioas_map {
        size: size_of::<iommu_ioas_map>() as u32,
        flags,
        ioas_id,
        __reserved: 0,
        user_va: va,
        length: len,
        iova: iova.0,
    }
}

fn lift_map_errno(op: &'static str, err: io::Error) -> MapError {
    match err.raw_os_error() {
        Some(libc::EEXIST) | Some(libc::EBUSY) if op == "IOMMU_IOAS_MAP" => MapError::Exists,
        Some(libc::ENOENT) if op == "IOMMU_IOAS_UNMAP" => MapError::NotMapped,
        _ => MapError::Io { op, source: err },
    }
}

/// Issues iommufd ioctl `req` with `arg`.
fn iommufd_ioctl<T>(fd: BorrowedFd<'_>, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: every caller passes the iommufd argument struct of `req` (sizes asserted in
    // `sys`), whose `size` field tells the kernel how much to read and write; `arg` is a live,
    // exclusive borrow for the call. No memory is handed to the kernel beyond it (IOAS_MAP's
    // user_va is checked and pinned by the kernel, not dereferenced as Rust memory).
    let ret = unsafe { ioctl_with_mut_ref(&fd.as_raw_fd(), req, arg) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Mapper for IoasMapper {
    fn granule(&self) -> u64 {
        self.granule
    }

    fn map(
        &mut self,
        iova: Iova,
        len: u64,
        target: MapTarget<'_>,
        writable: bool,
    ) -> Result<(), MapError> {
        check_granule(iova, len, self.granule)?;
        let mut arg = ioas_map_args(self.ioas_id, iova, len, target.va, writable);
        iommufd_ioctl(self.iommufd.as_fd(), sys::IOMMU_IOAS_MAP, &mut arg)
            .map_err(|e| lift_map_errno("IOMMU_IOAS_MAP", e))
    }

    fn unmap(&mut self, iova: Iova, len: u64) -> Result<(), MapError> {
        check_granule(iova, len, self.granule)?;
        let mut arg = iommu_ioas_unmap {
            size: size_of::<iommu_ioas_unmap>() as u32,
            ioas_id: self.ioas_id,
            iova: iova.0,
            length: len,
        };
        iommufd_ioctl(self.iommufd.as_fd(), sys::IOMMU_IOAS_UNMAP, &mut arg)
            .map_err(|e| lift_map_errno("IOMMU_IOAS_UNMAP", e))
    }
}

/// `IOMMU_IOAS_ALLOC`: a new, empty IOAS. Returns its id. VMM side.
pub fn alloc_ioas(iommufd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut arg = sys::iommu_ioas_alloc {
        size: size_of::<sys::iommu_ioas_alloc>() as u32,
        ..Default::default()
    };
    iommufd_ioctl(iommufd, sys::IOMMU_IOAS_ALLOC, &mut arg)?;
    Ok(arg.out_ioas_id)
}

/// `IOMMU_IOAS_UNMAP` of every mapping inside `[iova, iova+len)` of IOAS `ioas_id` (a mapping
/// that crosses either end is an error). Returns false when nothing was mapped there (ENOENT).
/// VMM side: clearing what a faultd that is gone had mapped.
pub fn unmap_range(iommufd: BorrowedFd<'_>, ioas_id: u32, iova: u64, len: u64) -> io::Result<bool> {
    let mut arg = iommu_ioas_unmap {
        size: size_of::<iommu_ioas_unmap>() as u32,
        ioas_id,
        iova,
        length: len,
    };
    match iommufd_ioctl(iommufd, sys::IOMMU_IOAS_UNMAP, &mut arg) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `IOMMU_DESTROY` of object `id` (an IOAS, a HWPT, a fault object). VMM side.
pub fn destroy(iommufd: BorrowedFd<'_>, id: u32) -> io::Result<()> {
    let mut arg = sys::iommu_destroy {
        size: size_of::<sys::iommu_destroy>() as u32,
        id,
    };
    iommufd_ioctl(iommufd, sys::IOMMU_DESTROY, &mut arg)
}

/// `IOMMU_FAULT_QUEUE_ALLOC`: a new fault object. Returns its id (for [`alloc_fault_hwpt`])
/// and its fault fd (for [`IommufdQueue`]). VMM side.
pub fn alloc_fault_queue(iommufd: BorrowedFd<'_>) -> io::Result<(u32, OwnedFd)> {
    let mut arg = iommu_fault_alloc {
        size: size_of::<iommu_fault_alloc>() as u32,
        ..Default::default()
    };
    iommufd_ioctl(iommufd, sys::IOMMU_FAULT_QUEUE_ALLOC, &mut arg)?;
    let raw = i32::try_from(arg.out_fault_fd).map_err(|_| io::ErrorKind::InvalidData)?;
    // SAFETY: on success the kernel installed a new fd in this process for the fault object;
    // nothing else owns it, so the OwnedFd becomes its only owner.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    Ok((arg.out_fault_id, fd))
}

/// `IOMMU_HWPT_ALLOC` with FAULT_ID_VALID: a paging HWPT over IOAS `ioas_id` for device
/// `dev_id` that reports page faults to fault object `fault_id` (Linux 6.13+). Returns the
/// HWPT id, to attach (or replace) the device to. VMM side.
pub fn alloc_fault_hwpt(
    iommufd: BorrowedFd<'_>,
    dev_id: u32,
    ioas_id: u32,
    fault_id: u32,
) -> io::Result<u32> {
    let mut arg = iommu_hwpt_alloc {
        size: size_of::<iommu_hwpt_alloc>() as u32,
        flags: sys::HWPT_FAULT_ID_VALID,
        dev_id,
        pt_id: ioas_id,
        fault_id,
        ..Default::default()
    };
    iommufd_ioctl(iommufd, sys::IOMMU_HWPT_ALLOC, &mut arg).map_err(lift_hwpt_alloc_error)?;
    Ok(arg.out_hwpt_id)
}

/// EOPNOTSUPP from a fault-capable paging HWPT_ALLOC is the kernel version, not the caller:
/// Linux 6.11 and 6.12 accept FAULT_ID_VALID on nested HWPTs only. Say so.
fn lift_hwpt_alloc_error(err: io::Error) -> io::Error {
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return err;
    }
    io::Error::new(
        io::ErrorKind::Unsupported,
        "IOMMU_HWPT_ALLOC refused a fault-capable paging HWPT (EOPNOTSUPP): faultd's iommufd \
         backend needs Linux 6.13 or later (or upstream commit cbeb1b7eee2f backported); \
         Linux 6.11 and 6.12 accept IOMMU_HWPT_FAULT_ID_VALID only on nested HWPTs",
    )
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    use super::*;
    use crate::{DevId, Group, PageRequest, Perm};

    /// A non-blocking stream socketpair: the queue's end and the test's "kernel" end.
    fn queue() -> (IommufdQueue, OwnedFd) {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        (IommufdQueue::new(a).unwrap(), b)
    }

    fn record(cookie: u32, addr: u64, last: bool, perm: Perm) -> [u8; 40] {
        sys::pgfault_to_bytes(
            &PageRequest {
                dev_id: DevId(3),
                pasid: Some(1),
                grpid: 9,
                perm,
                addr: Iova(addr),
                last,
                cookie,
            }
            .to_raw(),
        )
    }

    fn send(kernel: &OwnedFd, records: &[[u8; 40]]) {
        let bytes: Vec<u8> = records.concat();
        assert_eq!(nix::unistd::write(kernel, &bytes).unwrap(), bytes.len());
    }

    #[test]
    fn two_groups_in_one_read_are_both_delivered() {
        let (mut q, kernel) = queue();
        send(
            &kernel,
            &[
                record(10, 0x1000, false, Perm::READ),
                record(10, 0x2000, true, Perm::WRITE),
                record(11, 0x8000, true, Perm::READ),
            ],
        );
        let mut out = Vec::new();

        q.read(&mut out).unwrap();

        let group = |cookie, pages| {
            Incoming::Group(Group {
                cookie,
                dev_id: DevId(3),
                pasid: Some(1),
                grpid: 9,
                pages,
            })
        };
        assert_eq!(
            out,
            vec![
                group(
                    10,
                    vec![(Iova(0x1000), Perm::READ), (Iova(0x2000), Perm::WRITE)]
                ),
                group(11, vec![(Iova(0x8000), Perm::READ)]),
            ]
        );
    }

    #[test]
    fn eagain_read_is_empty() {
        let (mut q, _kernel) = queue();
        let mut out = Vec::new();

        q.read(&mut out).unwrap();

        assert!(out.is_empty());
    }

    #[test]
    fn zero_byte_read_is_empty() {
        let (mut q, kernel) = queue();
        drop(kernel); // the stream now reads 0, as the kernel fd does when empty
        let mut out = Vec::new();

        q.read(&mut out).unwrap();

        assert!(out.is_empty());
    }

    #[test]
    fn malformed_record_is_reported_with_its_cookie_and_counted() {
        let (mut q, kernel) = queue();
        let mut bad = record(12, 0x1000, true, Perm::READ);
        bad[20] = 1; // __reserved
        send(&kernel, &[bad]);
        let mut out = Vec::new();

        q.read(&mut out).unwrap();

        assert_eq!(
            out,
            vec![Incoming::Malformed {
                cookie: Some(12),
                reason: "reserved field not zero"
            }]
        );
        assert_eq!(q.malformed_records(), 1);
    }

    #[test]
    fn partial_record_is_an_error() {
        let (mut q, kernel) = queue();
        nix::unistd::write(&kernel, &[0u8; 17]).unwrap();
        let mut out = Vec::new();

        let res = q.read(&mut out);

        assert_eq!(res.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn response_bytes_are_cookie_then_code_little_endian() {
        let (mut q, kernel) = queue();

        q.respond(0x0102_0304, ResponseCode::Invalid).unwrap();
        q.respond(7, ResponseCode::Success).unwrap();
        let mut buf = [0u8; 32];
        let n = nix::unistd::read(&kernel, &mut buf).unwrap();

        assert_eq!(&buf[..n], &[4, 3, 2, 1, 1, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn einval_on_respond_means_unknown_cookie() {
        assert!(matches!(
            lift_respond_errno(5, nix::errno::Errno::EINVAL),
            RespondError::UnknownCookie(5)
        ));
        assert!(matches!(
            lift_respond_errno(5, nix::errno::Errno::EIO),
            RespondError::Io(_)
        ));
    }

    #[test]
    fn eexist_and_ebusy_on_map_mean_exists_and_enoent_on_unmap_means_not_mapped() {
        let errno = io::Error::from_raw_os_error;

        assert!(matches!(
            lift_map_errno("IOMMU_IOAS_MAP", errno(libc::EEXIST)),
            MapError::Exists
        ));
        assert!(matches!(
            lift_map_errno("IOMMU_IOAS_MAP", errno(libc::EBUSY)),
            MapError::Exists
        ));
        assert!(matches!(
            lift_map_errno("IOMMU_IOAS_UNMAP", errno(libc::ENOENT)),
            MapError::NotMapped
        ));
        assert!(matches!(
            lift_map_errno("IOMMU_IOAS_MAP", errno(libc::ENOMEM)),
            MapError::Io {
                op: "IOMMU_IOAS_MAP",
                ..
            }
        ));
    }

    #[test]
    fn map_arguments_are_fixed_iova_readable_and_writeable_only_if_writable() {
        let ro = ioas_map_args(3, Iova(0x20_0000), 0x1_0000, 0x7f00_0000_0000, false);
        let rw = ioas_map_args(3, Iova(0x20_0000), 0x1_0000, 0x7f00_0000_0000, true);

        assert_eq!(ro.size, 40);
        assert_eq!(ro.flags, sys::IOAS_MAP_FIXED_IOVA | sys::IOAS_MAP_READABLE);
        assert_eq!(
            rw.flags,
            sys::IOAS_MAP_FIXED_IOVA | sys::IOAS_MAP_READABLE | sys::IOAS_MAP_WRITEABLE
        );
        assert_eq!(
            (ro.ioas_id, ro.iova, ro.length, ro.user_va),
            (3, 0x20_0000, 0x1_0000, 0x7f00_0000_0000)
        );
    }

    fn dev_null() -> OwnedFd {
        File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap()
            .into()
    }

    #[test]
    fn ioas_mapper_refuses_a_granule_that_is_not_a_power_of_two_of_4k_or_more() {
        assert!(matches!(
            IoasMapper::new(dev_null(), 1, 0x3000),
            Err(MapError::InvalidGranule(0x3000))
        ));
        assert!(matches!(
            IoasMapper::new(dev_null(), 1, 0x800),
            Err(MapError::InvalidGranule(0x800))
        ));
    }

    #[test]
    fn ioas_mapper_checks_the_granule_before_any_ioctl_and_names_a_failed_ioctl() {
        let mut m = IoasMapper::new(dev_null(), 1, 0x1_0000).unwrap();
        let fd = dev_null();
        let target = MapTarget {
            va: 0,
            fd: fd.as_fd(),
            offset: 0,
        };

        let partial = m.map(Iova(0), 0x1000, target, true);
        let not_iommufd = m.map(Iova(0), 0x1_0000, target, true);
        let unmap = m.unmap(Iova(0), 0x1_0000);

        assert!(matches!(partial, Err(MapError::NotAGranule { .. })));
        assert!(matches!(
            not_iommufd,
            Err(MapError::Io {
                op: "IOMMU_IOAS_MAP",
                ..
            })
        ));
        assert!(matches!(
            unmap,
            Err(MapError::Io {
                op: "IOMMU_IOAS_UNMAP",
                ..
            })
        ));
    }

    #[test]
    fn eopnotsupp_from_hwpt_alloc_names_the_kernel_requirement() {
        let e = lift_hwpt_alloc_error(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        let other = lift_hwpt_alloc_error(io::Error::from_raw_os_error(libc::ENOENT));

        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        assert!(e.to_string().contains("Linux 6.13 or later"), "{e}");
        assert_eq!(other.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn dev_null_is_not_an_iommufd_and_the_refusal_names_it() {
        let e = check_iommufd(dev_null().as_fd()).unwrap_err();

        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("/dev/null"), "{e}");
        assert!(e.to_string().contains("not an iommufd"), "{e}");
        assert_eq!(parse_dev("10:124"), Some((10, 124)));
        assert_eq!(parse_dev("10"), None);
    }

    #[test]
    fn alloc_fault_queue_on_a_non_iommufd_fails_cleanly() {
        let fd = dev_null();

        assert!(alloc_fault_queue(fd.as_fd()).is_err());
        assert!(alloc_fault_hwpt(fd.as_fd(), 1, 2, 3).is_err());
    }
}
