//! Validation of a `register` request: everything a VMM hands faultd is checked before a
//! session exists, so a bad registration costs that connection and nothing else.
//!
//! The checks and why each one matters:
//! - fd kinds: the uffd must be a userfaultfd (ioctls on another fd could do anything), guest
//!   RAM a tmpfs/hugetlbfs file whose page size matches the region (faultd installs whole pages
//!   of that size), the snapshot a readable regular file that covers every region it backs
//!   (reading past its end would serve short pages).
//! - layout: s2map refuses overlaps, misalignment and bad sizes.
//! - mappings: every region's `hva` range must be, in the VMM's own address space, a shared
//!   mapping of exactly its memory fd at `mem_offset`. userfaultfd operations name VMM addresses;
//!   if the VMM lied about them, faultd would fill pages that are not the guest's RAM.
//! - the handover itself: the uffd has completed `UFFDIO_API` (else every ioctl faultd makes
//!   fails and every fault blocks), every region is registered with it for MISSING faults (else
//!   absent pages never fault: a snapshot-backed guest reads zeros), and memory fds are open
//!   read-write (faultd restores evicted pages through them). [`handed_files`] names the uffd
//!   and memory files so that the daemon lets one live session at a time hold each.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use faultd_proto::{
    AddDevice, BackingDesc, ErrorCode, FdIndex, IommuDesc, QueueDesc, Register, MAX_REGIONS,
    MAX_VM_NAME,
};
use iopf::emulated::EmulatedIommu;
use iopf::iommufd::{IoasMapper, IommufdQueue};
use iopf::ring::RingConsumer;
use iopf::{DevId, FaultQueue, Mapper};
use s2map::{Backing, DeviceIdx, Gpa, Layout, PageSize, RegionSpec};

use crate::daemon::FileId;
use crate::engine::device::Device;
use crate::engine::session::{Hva, RegionMemory, ServedRegion, Session};
use crate::kernel::uffd::api_handshake_done;

const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

pub use crate::daemon::{Refusal, Validated};

fn refuse(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

/// Checks `reg` with the fds that came with it. `peer_pid` is the VMM (from SO_PEERCRED).
/// `object_len`: the size of the snapshot object the registration named (opened by the
/// caller), which snapshot-backed regions must lie within; then no snapshot fd may be given.
pub fn validate(
    reg: &Register,
    fds: Vec<OwnedFd>,
    peer_pid: Option<i32>,
    object_len: Option<u64>,
) -> Result<Validated, Refusal> {
    if reg.version != faultd_proto::PROTOCOL_VERSION {
        return Err(refuse(
            ErrorCode::UnsupportedVersion,
            format!(
                "version {} is not supported (faultd speaks {})",
                reg.version,
                faultd_proto::PROTOCOL_VERSION
            ),
        ));
    }
    check_vm_name(&reg.vm)?;
    if reg.regions.is_empty() || reg.regions.len() > MAX_REGIONS {
        return Err(refuse(
            ErrorCode::BadLayout,
            format!(
                "regions: {} given, 1..={MAX_REGIONS} allowed",
                reg.regions.len()
            ),
        ));
    }
    // The uffd, a snapshot, and one memory fd per region: any more cannot all be used.
    let most = reg.regions.len() + 2;
    if fds.len() > most {
        return Err(refuse(
            ErrorCode::BadFd,
            format!(
                "{} fds attached; a register of {} regions uses at most {most} (the uffd, a \
                 snapshot, one memory fd per region)",
                fds.len(),
                reg.regions.len()
            ),
        ));
    }
    let mut used = vec![false; fds.len()];
    let mut take = |idx: FdIndex, what: &str| -> Result<usize, Refusal> {
        let i = idx.0 as usize;
        match used.get_mut(i) {
            Some(u) => {
                *u = true;
                Ok(i)
            }
            None => Err(refuse(
                ErrorCode::BadFd,
                format!("{what}: fd index {i} but only {} fds attached", fds.len()),
            )),
        }
    };
    let uffd_i = take(reg.uffd, "uffd")?;
    let snap_i = reg.snapshot.map(|s| take(s, "snapshot")).transpose()?;
    let mut mem_is = Vec::with_capacity(reg.regions.len());
    for (n, r) in reg.regions.iter().enumerate() {
        mem_is.push(take(r.mem, &format!("regions[{n}].mem"))?);
    }
    if let Some(unused) = used.iter().position(|u| !u) {
        return Err(refuse(
            ErrorCode::BadFd,
            format!("fd {unused} was attached but no field refers to it"),
        ));
    }
    if mem_is.contains(&uffd_i) || snap_i.is_some_and(|s| s == uffd_i || mem_is.contains(&s)) {
        return Err(refuse(
            ErrorCode::BadFd,
            "the uffd, snapshot and memory fds must be distinct entries",
        ));
    }

    check_uffd(fds[uffd_i].as_fd())?;
    let snapshot_len = match (snap_i, object_len) {
        (Some(_), Some(_)) => {
            return Err(refuse(
                ErrorCode::BadFd,
                "a snapshot fd and a snapshot object were both given: one backs the snapshot",
            ))
        }
        (Some(i), None) => Some(check_snapshot(fds[i].as_fd())?),
        (None, len) => len,
    };

    let mut specs = Vec::with_capacity(reg.regions.len());
    let mut mems = Vec::with_capacity(reg.regions.len());
    for (n, (r, &mi)) in reg.regions.iter().zip(&mem_is).enumerate() {
        let page_size = PageSize::from_bytes(r.page_size).ok_or_else(|| {
            refuse(
                ErrorCode::BadLayout,
                format!(
                    "regions[{n}].page_size = {}: must be 4096 or 2097152",
                    r.page_size
                ),
            )
        })?;
        check_mem_access(n, mi, fds[mi].as_fd())?;
        check_mem(n, fds[mi].as_fd(), r.mem_offset, r.size, page_size)?;
        if r.hva == 0
            || !r.hva.is_multiple_of(page_size.bytes())
            || r.hva.checked_add(r.size).is_none()
        {
            return Err(refuse(
                ErrorCode::BadMapping,
                format!(
                    "regions[{n}].hva = {:#x}: must be page aligned, non-zero, and not wrap",
                    r.hva
                ),
            ));
        }
        let backing = match r.backing {
            BackingDesc::Zero => Backing::Zero,
            BackingDesc::Snapshot { offset } => {
                let Some(len) = snapshot_len else {
                    return Err(refuse(
                        ErrorCode::BadFd,
                        format!("regions[{n}] is snapshot-backed but no snapshot fd was given"),
                    ));
                };
                if offset.checked_add(r.size).is_none_or(|end| end > len) {
                    return Err(refuse(
                        ErrorCode::BadLayout,
                        format!(
                            "regions[{n}]: snapshot range {offset:#x}+{:#x} exceeds the snapshot file ({len} bytes)",
                            r.size
                        ),
                    ));
                }
                Backing::File { offset }
            }
        };
        specs.push(RegionSpec {
            gpa: Gpa(r.gpa),
            size: r.size,
            page_size,
            backing,
            read_only: r.read_only,
        });
        mems.push((r.hva, r.mem_offset, mi));
    }
    if snapshot_len.is_some()
        && !specs
            .iter()
            .any(|s| matches!(s.backing, Backing::File { .. }))
    {
        return Err(refuse(
            ErrorCode::BadFd,
            "a snapshot fd was given but no region is snapshot-backed",
        ));
    }
    check_hva_overlap(reg)?;
    let held: Vec<(FileId, u64, u64)> = reg
        .regions
        .iter()
        .zip(&mem_is)
        .enumerate()
        .map(|(n, (r, &mi))| {
            let st = nix::sys::stat::fstat(fds[mi].as_fd())
                .map_err(|e| refuse(ErrorCode::BadFd, format!("regions[{n}].mem: fstat: {e}")))?;
            let file = FileId {
                dev: st.st_dev,
                ino: st.st_ino,
            };
            Ok((file, r.mem_offset, r.size))
        })
        .collect::<Result<_, Refusal>>()?;
    check_file_overlap(&held)?;

    if let Some(pid) = peer_pid {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| {
            refuse(
                ErrorCode::Internal,
                format!("cannot read /proc/{pid}/maps to check the VMM's mappings: {e}"),
            )
        })?;
        for (n, &(hva, off, mi)) in mems.iter().enumerate() {
            let st = nix::sys::stat::fstat(fds[mi].as_fd())
                .map_err(|e| refuse(ErrorCode::BadFd, format!("regions[{n}].mem: fstat: {e}")))?;
            let file = MappedFile {
                dev_major: nix::sys::stat::major(st.st_dev),
                dev_minor: nix::sys::stat::minor(st.st_dev),
                inode: st.st_ino,
            };
            check_mapping(&maps, hva, reg.regions[n].size, off, file)
                .map_err(|why| refuse(ErrorCode::BadMapping, format!("regions[{n}]: {why}")))?;
        }
    }
    check_handshake(uffd_i, fds[uffd_i].as_fd(), Hva(reg.regions[0].hva))?;
    if let Some(pid) = peer_pid {
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).map_err(|e| {
            refuse(
                ErrorCode::Internal,
                format!("cannot read /proc/{pid}/smaps to check the uffd registration: {e}"),
            )
        })?;
        for (n, r) in reg.regions.iter().enumerate() {
            check_registered(&smaps, r.hva, r.size)
                .map_err(|why| refuse(ErrorCode::BadMapping, format!("regions[{n}]: {why}")))?;
        }
    }

    let layout = Layout::new(specs).map_err(|e| refuse(ErrorCode::BadLayout, e.to_string()))?;

    // Hand the fds out. Several regions may share one memory fd (at different offsets), so
    // memory fds are shared. Layout sorts regions by GPA; match each back to its request entry.
    let mut slots: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let uffd = slots[uffd_i]
        .take()
        .expect("uffd index validated above and taken once");
    let snapshot = snap_i.map(|i| File::from(slots[i].take().expect("snapshot taken once")));
    let shared: Vec<Option<Arc<OwnedFd>>> = slots.into_iter().map(|s| s.map(Arc::new)).collect();
    let mut served = Vec::with_capacity(reg.regions.len());
    for region in layout.regions() {
        let n = reg
            .regions
            .iter()
            .position(|r| r.gpa == region.gpa().0)
            .expect("every layout region comes from one request region");
        let (hva, mem_offset, mi) = mems[n];
        let mem = shared[mi]
            .clone()
            .expect("memory fd indexes are distinct from uffd/snapshot");
        served.push(ServedRegion {
            hva: Hva(hva),
            memory: RegionMemory::Shared {
                fd: mem,
                offset: mem_offset,
            },
        });
    }
    Ok(Validated {
        vm: reg.vm.clone(),
        layout,
        regions: served,
        uffd,
        snapshot,
        object: None,
    })
}

pub(crate) fn check_vm_name(vm: &str) -> Result<(), Refusal> {
    if crate::ops::config::valid_vm_name(vm) {
        Ok(())
    } else {
        Err(refuse(
            ErrorCode::BadLayout,
            format!("vm = {vm:?}: must be 1..={MAX_VM_NAME} bytes of [A-Za-z0-9._-]"),
        ))
    }
}

pub(crate) fn check_uffd(fd: BorrowedFd<'_>) -> Result<(), Refusal> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| refuse(ErrorCode::BadFd, format!("uffd: cannot inspect fd: {e}")))?;
    if link.as_os_str() != "anon_inode:[userfaultfd]" {
        return Err(refuse(
            ErrorCode::BadFd,
            format!("uffd: fd is {}, not a userfaultfd", link.display()),
        ));
    }
    Ok(())
}

/// Refuses a uffd on which the VMM has not done `UFFDIO_API`. `probe` is a page of guest RAM.
fn check_handshake(i: usize, fd: BorrowedFd<'_>, probe: Hva) -> Result<(), Refusal> {
    match api_handshake_done(fd, probe) {
        Ok(true) => Ok(()),
        Ok(false) => Err(refuse(
            ErrorCode::BadFd,
            format!(
                "uffd (fd {i}): the VMM has not completed UFFDIO_API on it; every ioctl faultd \
                 makes would fail and every fault would block"
            ),
        )),
        Err(e) => Err(refuse(
            ErrorCode::BadFd,
            format!("uffd (fd {i}): probing its API handshake: {e}"),
        )),
    }
}

/// Refuses a memory fd faultd cannot write guest pages through: an O_PATH fd (no I/O at all)
/// or one not open read-write (restoring evicted pages, and mapping RAM for devices, write).
fn check_mem_access(n: usize, i: usize, fd: BorrowedFd<'_>) -> Result<(), Refusal> {
    let what = format!("regions[{n}].mem (fd {i})");
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| refuse(ErrorCode::BadFd, format!("{what}: fcntl: {e}")))?;
    if flags & libc::O_PATH != 0 {
        return Err(refuse(
            ErrorCode::BadFd,
            format!("{what}: an O_PATH fd, which allows no reads or writes of guest RAM"),
        ));
    }
    if flags & libc::O_ACCMODE != libc::O_RDWR {
        return Err(refuse(
            ErrorCode::BadFd,
            format!("{what}: not open read-write; faultd writes restored pages through it"),
        ));
    }
    Ok(())
}

/// The files a registration hands over that one live session at a time may hold, with what
/// each is in the request: the uffd (two sessions reading one uffd steal each other's faults)
/// and every memory fd (two sessions filling and evicting one file destroy each other's
/// pages). Fds that cannot be inspected, or indexes out of range, are left to [`validate`] to
/// refuse.
pub fn handed_files(reg: &Register, fds: &[OwnedFd]) -> Vec<(FileId, String)> {
    let id = |i: usize| {
        let st = nix::sys::stat::fstat(fds.get(i)?.as_fd()).ok()?;
        Some(FileId {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    };
    let uffd = reg.uffd.0 as usize;
    let mut files: Vec<(FileId, String)> = id(uffd)
        .map(|f| (f, format!("uffd (fd {uffd})")))
        .into_iter()
        .collect();
    for (n, r) in reg.regions.iter().enumerate() {
        let i = r.mem.0 as usize;
        if let Some(f) = id(i) {
            if !files.iter().any(|(held, _)| *held == f) {
                files.push((f, format!("regions[{n}].mem (fd {i})")));
            }
        }
    }
    files
}

fn check_snapshot(fd: BorrowedFd<'_>) -> Result<u64, Refusal> {
    let st = nix::sys::stat::fstat(fd)
        .map_err(|e| refuse(ErrorCode::BadFd, format!("snapshot: fstat: {e}")))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(refuse(ErrorCode::BadFd, "snapshot: not a regular file"));
    }
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| refuse(ErrorCode::BadFd, format!("snapshot: fcntl: {e}")))?;
    if flags & libc::O_ACCMODE == libc::O_WRONLY || flags & libc::O_PATH != 0 {
        return Err(refuse(
            ErrorCode::BadFd,
            "snapshot: fd is not open for reading",
        ));
    }
    Ok(st.st_size as u64)
}

fn check_mem(
    n: usize,
    fd: BorrowedFd<'_>,
    offset: u64,
    size: u64,
    page_size: PageSize,
) -> Result<(), Refusal> {
    let what = format!("regions[{n}].mem");
    let st = nix::sys::stat::fstat(fd)
        .map_err(|e| refuse(ErrorCode::BadFd, format!("{what}: fstat: {e}")))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(refuse(
            ErrorCode::BadFd,
            format!("{what}: not a memfd or hugetlbfs file"),
        ));
    }
    let fs = nix::sys::statfs::fstatfs(fd)
        .map_err(|e| refuse(ErrorCode::BadFd, format!("{what}: fstatfs: {e}")))?;
    let magic = fs.filesystem_type().0 as i64;
    let want = match page_size {
        PageSize::Size4K => TMPFS_MAGIC,
        PageSize::Size2M => HUGETLBFS_MAGIC,
    };
    if magic != want {
        return Err(refuse(
            ErrorCode::BadFd,
            format!(
                "{what}: filesystem {magic:#x} does not hold {} pages (need {})",
                page_size.bytes(),
                if want == TMPFS_MAGIC {
                    "a memfd (tmpfs)"
                } else {
                    "hugetlbfs"
                }
            ),
        ));
    }
    if page_size == PageSize::Size2M && st.st_blksize as u64 != page_size.bytes() {
        return Err(refuse(
            ErrorCode::BadFd,
            format!("{what}: hugetlbfs page size {} is not 2 MiB", st.st_blksize),
        ));
    }
    if !offset.is_multiple_of(page_size.bytes())
        || offset
            .checked_add(size)
            .is_none_or(|e| e > st.st_size as u64)
    {
        return Err(refuse(
            ErrorCode::BadLayout,
            format!(
                "{what}: range {offset:#x}+{size:#x} is not page aligned or exceeds the file ({} bytes)",
                st.st_size
            ),
        ));
    }
    Ok(())
}

fn check_hva_overlap(reg: &Register) -> Result<(), Refusal> {
    let mut ranges: Vec<(u64, u64, usize)> = reg
        .regions
        .iter()
        .enumerate()
        .map(|(n, r)| (r.hva, r.hva + r.size, n))
        .collect();
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(refuse(
                ErrorCode::BadMapping,
                format!(
                    "regions[{}] and regions[{}] overlap in the VMM's address space",
                    w[0].2, w[1].2
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses two regions that name the same bytes of one memory file: `held[n]` is region `n`'s
/// file (by identity, so two fds of one memfd are one file), offset and size. Such regions
/// alias: a page filled for one would be present in the other without s2map knowing, and an
/// eviction of one would punch the other's page. Regions carved from one file at disjoint
/// offsets (RAM split around a hole) are fine.
fn check_file_overlap(held: &[(FileId, u64, u64)]) -> Result<(), Refusal> {
    for (a, &(file_a, off_a, size_a)) in held.iter().enumerate() {
        for (b, &(file_b, off_b, size_b)) in held.iter().enumerate().skip(a + 1) {
            // Sizes and offsets were checked not to wrap (check_mem).
            if file_a == file_b && off_a < off_b + size_b && off_b < off_a + size_a {
                return Err(refuse(
                    ErrorCode::BadLayout,
                    format!(
                        "regions[{a}] ({off_a:#x}+{size_a:#x}) and regions[{b}] \
                         ({off_b:#x}+{size_b:#x}) overlap in their memory file: one page of \
                         guest RAM would be two guest pages"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Identity of a file as `/proc/<pid>/maps` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedFile {
    /// Device major.
    pub dev_major: u64,
    /// Device minor.
    pub dev_minor: u64,
    /// Inode.
    pub inode: u64,
}

/// Checks that `maps` (the text of `/proc/<pid>/maps`) maps `[hva, hva+size)` entirely, shared,
/// from `file` at `offset` onwards, with no gaps.
pub fn check_mapping(
    maps: &str,
    hva: u64,
    size: u64,
    offset: u64,
    file: MappedFile,
) -> Result<(), String> {
    let end = hva + size;
    let mut covered = hva;
    for line in maps.lines() {
        let Some(m) = parse_maps_line(line) else {
            continue;
        };
        if m.end <= covered || m.start > covered {
            if m.start > covered && m.start < end {
                break;
            }
            continue;
        }
        // m covers `covered`.
        if !m.shared {
            return Err(format!("{covered:#x} is mapped private, not MAP_SHARED"));
        }
        if m.file != file {
            return Err(format!(
                "{covered:#x} maps another file than the region's memory fd"
            ));
        }
        let file_off_here = m.offset + (covered - m.start);
        let want = offset + (covered - hva);
        if file_off_here != want {
            return Err(format!(
                "{covered:#x} maps file offset {file_off_here:#x}, expected {want:#x}"
            ));
        }
        covered = m.end.min(end);
        if covered == end {
            return Ok(());
        }
    }
    Err(format!(
        "{covered:#x} (within {hva:#x}+{size:#x}) is not mapped from the region's memory fd"
    ))
}

/// Checks that `smaps` (the text of `/proc/<pid>/smaps`) shows every mapping within
/// `[hva, hva+size)` registered with a userfaultfd for missing faults (`um` in `VmFlags`).
/// The range is known to be mapped without gaps (see [`check_mapping`]).
pub fn check_registered(smaps: &str, hva: u64, size: u64) -> Result<(), String> {
    let end = hva + size;
    let mut current: Option<(u64, u64)> = None;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            let Some((start, stop)) = current.take() else {
                continue;
            };
            if stop <= hva || start >= end {
                continue;
            }
            if !flags.split_ascii_whitespace().any(|f| f == "um") {
                return Err(format!(
                    "{:#x} is not registered with the userfaultfd for missing faults (no `um` \
                     in its VmFlags): its absent pages would read zeros instead of their \
                     backing, without a fault",
                    start.max(hva)
                ));
            }
        } else if let Some(m) = parse_maps_line(line) {
            current = Some((m.start, m.end));
        } else if let Some((range, _)) = line.split_once(' ') {
            // A header line of an anonymous mapping (no device/inode fields parse as a file).
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    current = Some((a, b));
                }
            }
        }
    }
    Ok(())
}

struct MapsLine {
    start: u64,
    end: u64,
    shared: bool,
    offset: u64,
    file: MappedFile,
}

fn parse_maps_line(line: &str) -> Option<MapsLine> {
    let mut it = line.split_ascii_whitespace();
    let (start, end) = it.next()?.split_once('-')?;
    let perms = it.next()?;
    let offset = it.next()?;
    let (maj, min) = it.next()?.split_once(':')?;
    let inode = it.next()?;
    Some(MapsLine {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        shared: perms.as_bytes().get(3) == Some(&b's'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        file: MappedFile {
            dev_major: u64::from_str_radix(maj, 16).ok()?,
            dev_minor: u64::from_str_radix(min, 16).ok()?,
            inode: inode.parse().ok()?,
        },
    })
}

/// A device built from an `add_device` request.
#[derive(Debug)]
pub struct Built {
    /// The device.
    pub device: Device,
    /// Pinned mode: the DMA-able ranges to map before answering (granule aligned, each
    /// inside one region, sorted, not overlapping).
    pub pin: Option<Vec<(s2map::Gpa, u64)>>,
}

/// Checks a pinned device's DMA ranges against the layout and its `granule`; none: all RAM.
fn pin_ranges(
    session: &Session,
    ranges: Option<&[faultd_proto::DmaRange]>,
    granule: u64,
) -> Result<Vec<(s2map::Gpa, u64)>, Refusal> {
    let layout = session.layout();
    let Some(ranges) = ranges else {
        return Ok(layout
            .regions()
            .iter()
            .map(|r| (r.gpa(), r.size()))
            .collect());
    };
    let bad = |m: String| refuse(ErrorCode::BadLayout, format!("queue.ranges: {m}"));
    if ranges.is_empty() || ranges.len() > faultd_proto::MAX_DMA_RANGES {
        return Err(bad(format!(
            "{} ranges; 1..={} are allowed (leave it out for all guest RAM)",
            ranges.len(),
            faultd_proto::MAX_DMA_RANGES
        )));
    }
    let mut out: Vec<(s2map::Gpa, u64)> = Vec::with_capacity(ranges.len());
    for r in ranges {
        if r.size == 0 || r.gpa % granule != 0 || r.size % granule != 0 {
            return Err(bad(format!(
                "range {:#x}+{:#x} is empty or not aligned to the device's granule {granule:#x}",
                r.gpa, r.size
            )));
        }
        let inside = layout.regions().iter().any(|reg| {
            r.gpa >= reg.gpa().0
                && r.gpa
                    .checked_add(r.size)
                    .is_some_and(|end| end <= reg.end().0)
        });
        if !inside {
            return Err(bad(format!(
                "range {:#x}+{:#x} is not inside one guest RAM region",
                r.gpa, r.size
            )));
        }
        out.push((s2map::Gpa(r.gpa), r.size));
    }
    out.sort_unstable_by_key(|r| r.0 .0);
    for w in out.windows(2) {
        if w[0].0 .0 + w[0].1 > w[1].0 .0 {
            return Err(bad(format!(
                "ranges at {:#x} and {:#x} overlap",
                w[0].0 .0, w[1].0 .0
            )));
        }
    }
    Ok(out)
}

/// Checks an `add_device` request against `session` and builds the device from its fds.
/// `granule` and `max_devices` come from config.
pub fn device(
    session: &Session,
    add: &AddDevice,
    fds: Vec<OwnedFd>,
    granule: u64,
    max_devices: usize,
) -> Result<Built, Refusal> {
    if !session.memory_is_mappable() {
        return Err(refuse(
            ErrorCode::BadLayout,
            "the VM's guest RAM is anonymous private memory (a Firecracker restore): faultd has \
             no memory fd to map for a device",
        ));
    }
    let mut slots: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let n = slots.len();
    let mut take = |idx: FdIndex, what: &str| -> Result<OwnedFd, Refusal> {
        slots
            .get_mut(idx.0 as usize)
            .and_then(Option::take)
            .ok_or_else(|| {
                refuse(
                    ErrorCode::BadFd,
                    format!(
                        "{what}: fd index {} is out of range ({n} attached) or used twice",
                        idx.0
                    ),
                )
            })
    };
    let dev_id = DevId(add.dev_id);
    let queue: Option<Box<dyn FaultQueue>> = match &add.queue {
        &QueueDesc::Ring { ring, kick, notify } => {
            let (ring, kick, notify) = (
                take(ring, "queue.ring")?,
                take(kick, "queue.kick")?,
                take(notify, "queue.notify")?,
            );
            Some(Box::new(
                RingConsumer::new(ring, kick, notify, dev_id)
                    .map_err(|e| refuse(ErrorCode::BadFd, format!("queue: {}", chain(&e))))?,
            ))
        }
        QueueDesc::Pinned { .. } => None,
        &QueueDesc::Iommufd { fault_fd } => {
            let fault_fd = take(fault_fd, "queue.fault_fd")?;
            let bad = |e: std::io::Error| refuse(ErrorCode::BadFd, format!("queue.fault_fd: {e}"));
            // Only the kernel's queue: anything else would be read as garbage, or as nothing,
            // as fast as the session thread can poll it.
            iopf::iommufd::check_fault_fd(fault_fd.as_fd()).map_err(bad)?;
            Some(Box::new(IommufdQueue::new(fault_fd).map_err(bad)?))
        }
    };
    let layout = session.layout();
    let max_page = layout
        .regions()
        .iter()
        .map(|r| r.page_size().bytes())
        .max()
        .unwrap_or(4096);
    let fits = |g: u64| {
        g >= max_page
            && layout
                .regions()
                .iter()
                .all(|r| r.gpa().0 % g == 0 && r.size() % g == 0)
    };
    let mapper: Box<dyn Mapper> = match add.iommu {
        IommuDesc::Emulated { table } => {
            let m = EmulatedIommu::from_fd(take(table, "iommu.table")?)
                .map_err(|e| refuse(ErrorCode::BadFd, format!("iommu.table: {}", chain(&e))))?;
            if !fits(m.granule()) {
                return Err(refuse(
                    ErrorCode::BadLayout,
                    format!(
                        "iommu.table: granule {} does not fit the guest layout (every region must be aligned to it, and it must be at least the page size {max_page})",
                        m.granule()
                    ),
                ));
            }
            Box::new(m)
        }
        IommuDesc::Iommufd { iommufd, ioas_id } => {
            // The configured granule, lowered until every region is aligned to it.
            let mut g = granule.max(max_page);
            while g > max_page && !fits(g) {
                g /= 2;
            }
            if !fits(g) {
                return Err(refuse(
                    ErrorCode::BadLayout,
                    "iommu: the guest layout is not aligned to its page size".to_string(),
                ));
            }
            session.ensure_views().map_err(|e| {
                refuse(
                    ErrorCode::Internal,
                    format!("mapping guest memory for the IOMMU: {e}"),
                )
            })?;
            let iommufd = take(iommufd, "iommu.iommufd")?;
            // faultd's IOAS ioctls go to this fd: only /dev/iommu (the ioas_id is then the
            // client's own object in its own iommufd; a wrong one fails the first map, which
            // refuses the device).
            iopf::iommufd::check_iommufd(iommufd.as_fd())
                .map_err(|e| refuse(ErrorCode::BadFd, format!("iommu.iommufd: {e}")))?;
            Box::new(
                IoasMapper::new(iommufd, ioas_id, g)
                    .map_err(|e| refuse(ErrorCode::BadFd, format!("iommu: {}", chain(&e))))?,
            )
        }
    };
    if let Some(unused) = slots.iter().position(Option::is_some) {
        return Err(refuse(
            ErrorCode::BadFd,
            format!("fd {unused} was attached but no field refers to it"),
        ));
    }
    let mut ids = session.device_ids.lock().unwrap_or_else(|p| p.into_inner());
    let pin = match &add.queue {
        QueueDesc::Pinned { ranges } => {
            Some(pin_ranges(session, ranges.as_deref(), mapper.granule())?)
        }
        _ => None,
    };
    if ids.iter().any(|&(id, _)| id == add.dev_id) {
        return Err(refuse(
            ErrorCode::DuplicateDevice,
            format!("dev_id {} is attached already", add.dev_id),
        ));
    }
    if ids.len() >= max_devices {
        return Err(refuse(
            ErrorCode::Busy,
            format!("the VM has its limit of {max_devices} devices"),
        ));
    }
    // The lowest index no attached device holds (a detached device's is reused).
    let idx = (0..=u8::MAX)
        .map(DeviceIdx)
        .find(|i| ids.iter().all(|&(_, x)| x != *i))
        .expect("max_devices is at most s2map::MAX_DEVICES");
    ids.push((add.dev_id, idx));
    let device = match queue {
        Some(queue) => Device::new(idx, dev_id, queue, mapper),
        None => Device::pinned(idx, dev_id, mapper),
    };
    Ok(Built { device, pin })
}

pub(crate) use crate::ops::logging::chain;

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: MappedFile = MappedFile {
        dev_major: 0,
        dev_minor: 1,
        inode: 1234,
    };
    const MAPS: &str = "\
55d0c0000000-55d0c0001000 r--p 00000000 fd:01 99 /usr/bin/vmm
7f0000000000-7f0000200000 rw-s 00000000 00:01 1234 /memfd:ram (deleted)
7f0000200000-7f0000400000 rw-s 00200000 00:01 1234 /memfd:ram (deleted)
7f0000400000-7f0000401000 rw-p 00000000 00:00 0
7f0000500000-7f0000600000 rw-s 00000000 00:01 555 /memfd:other (deleted)
";

    #[test]
    fn mapping_spanning_two_vmas_of_the_memfd_is_accepted() {
        assert_eq!(
            check_mapping(MAPS, 0x7f00_0000_0000, 0x40_0000, 0, FILE),
            Ok(())
        );
    }

    #[test]
    fn mapping_at_an_inner_offset_is_accepted() {
        assert_eq!(
            check_mapping(MAPS, 0x7f00_0010_0000, 0x20_0000, 0x10_0000, FILE),
            Ok(())
        );
    }

    #[test]
    fn wrong_offset_is_refused() {
        let e = check_mapping(MAPS, 0x7f00_0000_0000, 0x1000, 0x1000, FILE).unwrap_err();
        assert!(e.contains("expected 0x1000"), "{e}");
    }

    #[test]
    fn range_running_into_a_private_mapping_is_refused() {
        let e = check_mapping(MAPS, 0x7f00_0000_0000, 0x40_1000, 0, FILE).unwrap_err();
        assert!(e.contains("private"), "{e}");
    }

    #[test]
    fn another_file_is_refused() {
        let e = check_mapping(MAPS, 0x7f00_0050_0000, 0x1000, 0, FILE).unwrap_err();
        assert!(e.contains("another file"), "{e}");
    }

    #[test]
    fn unmapped_range_is_refused() {
        let e = check_mapping(MAPS, 0x7f00_1000_0000, 0x1000, 0, FILE).unwrap_err();
        assert!(e.contains("not mapped"), "{e}");
    }

    const SMAPS: &str = "\
7f0000000000-7f0000200000 rw-s 00000000 00:01 1234 /memfd:ram (deleted)
Size:               2048 kB
VmFlags: rd wr sh mr mw me ms um uw
7f0000200000-7f0000400000 rw-s 00200000 00:01 1234 /memfd:ram (deleted)
Size:               2048 kB
VmFlags: rd wr sh mr mw me ms
";

    #[test]
    fn range_registered_missing_is_accepted() {
        assert_eq!(check_registered(SMAPS, 0x7f00_0000_0000, 0x20_0000), Ok(()));
    }

    #[test]
    fn range_running_into_an_unregistered_mapping_is_refused() {
        let e = check_registered(SMAPS, 0x7f00_0010_0000, 0x20_0000).unwrap_err();
        assert!(e.starts_with("0x7f0000200000 is not registered"), "{e}");
    }

    #[test]
    fn regions_of_one_file_may_not_overlap_in_it() {
        let (a, b) = (FileId { dev: 1, ino: 7 }, FileId { dev: 1, ino: 8 });
        const MIB: u64 = 1 << 20;
        // Split around a hole: disjoint ranges of one file, in any order.
        assert!(check_file_overlap(&[(a, 2 * MIB, MIB), (a, 0, 2 * MIB), (b, 0, MIB)]).is_ok());
        // One byte shared.
        let e = check_file_overlap(&[(a, 0, 2 * MIB), (b, 0, MIB), (a, 2 * MIB - 4096, MIB)])
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadLayout);
        assert!(
            e.message
                .starts_with("regions[0] (0x0+0x200000) and regions[2]"),
            "{}",
            e.message
        );
        // Nested.
        assert!(check_file_overlap(&[(a, MIB, 4096), (a, 0, 4 * MIB)]).is_err());
        // The same range of different files.
        assert!(check_file_overlap(&[(a, 0, MIB), (b, 0, MIB)]).is_ok());
    }

    #[test]
    fn a_memory_file_of_several_regions_is_claimed_once() {
        let memfd =
            nix::sys::memfd::memfd_create("t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        let uffd =
            nix::sys::memfd::memfd_create("u", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        let dup = memfd.try_clone().unwrap();
        let region = |gpa: u64, mem: u32, mem_offset: u64| faultd_proto::RegionDesc {
            gpa,
            size: 4096,
            page_size: 4096,
            hva: 0x7f00_0000_0000 + gpa,
            mem: FdIndex(mem),
            mem_offset,
            backing: BackingDesc::Zero,
            read_only: false,
        };
        // Two regions on fd 1, a third on fd 2, a duplicate of the same memfd.
        let reg = Register {
            version: faultd_proto::PROTOCOL_VERSION,
            vm: "t".into(),
            uffd: FdIndex(0),
            regions: vec![
                region(0, 1, 0),
                region(1 << 20, 1, 4096),
                region(2 << 20, 2, 8192),
            ],
            snapshot: None,
            object: None,
            resume: false,
        };
        let files = handed_files(&reg, &[uffd, memfd, dup]);
        assert_eq!(
            files
                .iter()
                .map(|(_, what)| what.as_str())
                .collect::<Vec<_>>(),
            ["uffd (fd 0)", "regions[0].mem (fd 1)"]
        );
    }

    #[test]
    fn bad_vm_names_are_refused() {
        assert!(check_vm_name("vm-1.a_b").is_ok());
        assert!(check_vm_name("").is_err());
        assert!(check_vm_name("a b").is_err());
        assert!(check_vm_name(&"x".repeat(65)).is_err());
    }
}
