//! A real VFIO device for faultd: the VFIO cdev (`/dev/vfio/devices/vfioN`) bound to the VMM's
//! iommufd, attached either to a fault-capable HWPT (faultd serves its page requests) or, for
//! a device without PRI, to the plain IOAS in pinned mode (faultd maps its DMA-able RAM up
//! front).
//!
//! ```no_run
//! # fn run(session: &mut faultd_client::Session) -> Result<(), Box<dyn std::error::Error>> {
//! use std::os::fd::AsFd;
//!
//! use faultd_client::vfio::{open_iommufd, VfioAttachError, VfioDevice};
//! use faultd_client::{DeviceIommu, DeviceQueue};
//!
//! let iommufd = open_iommufd()?;
//! let dev = VfioDevice::bind("/dev/vfio/devices/vfio0", &iommufd)?;
//! let iommu = DeviceIommu::Iommufd { iommufd: iommufd.as_fd(), ioas_id: dev.ioas_id() };
//! match dev.attach_faulting(&iommufd) {
//!     Ok(faulting) => {
//!         let queue = DeviceQueue::Iommufd { fault_fd: faulting.fault_fd() };
//!         session.add_device(dev.dev_id(), queue, iommu)?;
//!     }
//!     // No PRI: the error says so; pinned mode is the way.
//!     Err(VfioAttachError::NoPri { .. }) => {
//!         dev.attach_pinned()?;
//!         session.add_device(dev.dev_id(), DeviceQueue::Pinned { ranges: None }, iommu)?;
//!     }
//!     Err(e) => return Err(e.into()),
//! }
//! # Ok(()) }
//! ```
//!
//! The structures are rust-vmm's `vfio-bindings`; the ioctls are issued here. rust-vmm's
//! `vfio-ioctls` (0.10, feature `vfio_cdev`) does bind a cdev to an iommufd
//! (`VFIO_DEVICE_BIND_IOMMUFD`) and attach it (`VFIO_DEVICE_ATTACH_IOMMUFD_PT`), but only to
//! the IOAS its own `VfioIommufd` allocates: its syscall wrappers are crate-private and take no
//! `pt_id`, so a device cannot be attached to a fault-capable HWPT through it, and the
//! ENODEV that says "no PRI" cannot be told apart. It also pulls in kvm-ioctls and
//! iommufd-ioctls and registers the device with a KVM VFIO device, none of which this needs.
//! The iommufd side (IOAS, fault queue, fault-capable HWPT) is faultd's own `iopf::iommufd`,
//! the code faultd's kernel checks run.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use vfio_bindings::bindings::vfio::{
    vfio_device_attach_iommufd_pt, vfio_device_bind_iommufd, vfio_region_info, VFIO_BASE, VFIO_TYPE,
};

/// `_IO(VFIO_TYPE, VFIO_BASE + nr)`: VFIO ioctls carry no size or direction bits (the struct
/// is `argsz`-prefixed instead).
const fn vfio_io(nr: u32) -> libc::c_ulong {
    ((VFIO_TYPE as libc::c_ulong) << 8) | (VFIO_BASE + nr) as libc::c_ulong
}

const VFIO_DEVICE_GET_REGION_INFO: libc::c_ulong = vfio_io(8);
const VFIO_DEVICE_BIND_IOMMUFD: libc::c_ulong = vfio_io(18);
const VFIO_DEVICE_ATTACH_IOMMUFD_PT: libc::c_ulong = vfio_io(19);

// The numbers in include/uapi/linux/vfio.h (and vfio-ioctls' own asserts).
const _: () = assert!(VFIO_DEVICE_BIND_IOMMUFD == 15222);
const _: () = assert!(VFIO_DEVICE_ATTACH_IOMMUFD_PT == 15223);
const _: () = assert!(VFIO_DEVICE_GET_REGION_INFO == 15212);
const _: () = assert!(size_of::<vfio_device_bind_iommufd>() == 24);
const _: () = assert!(size_of::<vfio_device_attach_iommufd_pt>() == 16);
const _: () = assert!(size_of::<vfio_region_info>() == 32);

/// Failure of a VFIO or iommufd step, named for the step.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// Opening a path failed.
    #[error("opening {path} failed")]
    Open {
        /// The path.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An ioctl failed.
    #[error("{op} on {path} failed")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The device (or /dev/iommu).
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why [`VfioDevice::attach_faulting`] did not attach the device.
#[derive(Debug, thiserror::Error)]
pub enum VfioAttachError {
    /// The kernel refused to attach the device to a fault-capable HWPT with ENODEV: the
    /// device (or its IOMMU) cannot issue page requests. Everything allocated for it was
    /// destroyed; the device is still bound and can go on in pinned mode.
    #[error(
        "VFIO device {path} (iommufd dev_id {dev_id}) has no PRI: the kernel refused to attach \
         it to a fault-capable HWPT (ENODEV), so it cannot fault on DMA and faultd cannot serve \
         it on demand. Use pinned mode: VfioDevice::attach_pinned, then Session::add_device \
         with DeviceQueue::Pinned and DeviceIommu::Iommufd (faultd makes the device's DMA \
         ranges resident, maps them in its IOAS and keeps them while it is attached)"
    )]
    NoPri {
        /// The cdev.
        path: PathBuf,
        /// Its iommufd device id.
        dev_id: u32,
    },
    /// Another step failed.
    #[error(transparent)]
    Vfio(#[from] VfioError),
}

/// Opens `/dev/iommu`: the VMM's iommufd.
pub fn open_iommufd() -> Result<OwnedFd, VfioError> {
    open_rw(Path::new("/dev/iommu"))
}

fn open_rw(path: &Path) -> Result<OwnedFd, VfioError> {
    File::options()
        .read(true)
        .write(true)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|source| VfioError::Open {
            path: path.to_owned(),
            source,
        })
}

/// Issues `req` on `fd` with `arg`.
///
/// # Safety
/// `arg` must be the argument struct the kernel defines for `req`, with its size field set;
/// the kernel reads and writes at most that struct.
unsafe fn ioctl<T>(fd: BorrowedFd<'_>, req: libc::c_ulong, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: per this function's contract, `arg` is a live exclusive borrow of the struct
    // `req` takes, for the duration of the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `IOMMU_DESTROY` of object `id`; a failure is ignored (the object goes with the iommufd).
fn destroy(iommufd: BorrowedFd<'_>, id: u32) {
    let _ = iopf::iommufd::destroy(iommufd, id);
}

/// A VFIO cdev bound to an iommufd, with an IOAS of its own.
#[derive(Debug)]
pub struct VfioDevice {
    fd: OwnedFd,
    path: PathBuf,
    dev_id: u32,
    ioas_id: u32,
}

/// A device attached to a fault-capable HWPT: its page requests arrive on `fault_fd`, which
/// goes to faultd ([`crate::DeviceQueue::Iommufd`]).
#[derive(Debug)]
pub struct Faulting {
    fault_fd: OwnedFd,
    fault_id: u32,
    hwpt_id: u32,
}

impl Faulting {
    /// The fault queue's fd (for faultd).
    pub fn fault_fd(&self) -> BorrowedFd<'_> {
        self.fault_fd.as_fd()
    }

    /// The fault object's id.
    pub fn fault_id(&self) -> u32 {
        self.fault_id
    }

    /// The fault-capable HWPT the device is attached to.
    pub fn hwpt_id(&self) -> u32 {
        self.hwpt_id
    }
}

/// One region of a VFIO device (`VFIO_DEVICE_GET_REGION_INFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VfioRegion {
    /// Offset of the region in the device fd (for pread/pwrite/mmap).
    pub offset: u64,
    /// Bytes.
    pub size: u64,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
}

impl VfioDevice {
    /// Opens the VFIO cdev at `path` (`/dev/vfio/devices/vfioN`), binds it to `iommufd`
    /// (`VFIO_DEVICE_BIND_IOMMUFD`) and allocates an IOAS for it. The device is not attached
    /// yet: [`Self::attach_faulting`] or [`Self::attach_pinned`].
    pub fn bind(path: impl AsRef<Path>, iommufd: &impl AsFd) -> Result<VfioDevice, VfioError> {
        let path = path.as_ref().to_owned();
        let fd = open_rw(&path)?;
        let mut bind = vfio_device_bind_iommufd {
            argsz: size_of::<vfio_device_bind_iommufd>() as u32,
            flags: 0,
            iommufd: iommufd.as_fd().as_raw_fd(),
            out_devid: 0,
            token_uuid_ptr: 0,
        };
        // SAFETY: vfio_device_bind_iommufd is the argument of VFIO_DEVICE_BIND_IOMMUFD.
        unsafe { ioctl(fd.as_fd(), VFIO_DEVICE_BIND_IOMMUFD, &mut bind) }.map_err(|source| {
            VfioError::Ioctl {
                op: "VFIO_DEVICE_BIND_IOMMUFD",
                path: path.clone(),
                source,
            }
        })?;
        let ioas_id =
            iopf::iommufd::alloc_ioas(iommufd.as_fd()).map_err(|source| VfioError::Ioctl {
                op: "IOMMU_IOAS_ALLOC",
                path: "/dev/iommu".into(),
                source,
            })?;
        Ok(VfioDevice {
            fd,
            path,
            dev_id: bind.out_devid,
            ioas_id,
        })
    }

    /// The device's iommufd id (`dev_id` in page requests and in `add_device`).
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// The device's IOAS (IOVA == guest physical address).
    pub fn ioas_id(&self) -> u32 {
        self.ioas_id
    }

    /// The cdev fd (for regions, config space, interrupts).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` to `pt_id` (an IOAS or a HWPT).
    fn attach(&self, pt_id: u32) -> std::io::Result<()> {
        let mut arg = vfio_device_attach_iommufd_pt {
            argsz: size_of::<vfio_device_attach_iommufd_pt>() as u32,
            flags: 0,
            pt_id,
            pasid: 0,
        };
        // SAFETY: vfio_device_attach_iommufd_pt is the argument of
        // VFIO_DEVICE_ATTACH_IOMMUFD_PT. flags 0: the pasid field is not used (no
        // VFIO_DEVICE_ATTACH_PASID, whose success on a device without PASID proves nothing).
        unsafe { ioctl(self.fd.as_fd(), VFIO_DEVICE_ATTACH_IOMMUFD_PT, &mut arg) }
    }

    /// Allocates a fault queue and a fault-capable HWPT over the device's IOAS and attaches the
    /// device to it. [`VfioAttachError::NoPri`] when the kernel refuses the attach with
    /// ENODEV (the device cannot issue page requests); the queue and HWPT are destroyed then.
    pub fn attach_faulting(&self, iommufd: &impl AsFd) -> Result<Faulting, VfioAttachError> {
        let iommufd = iommufd.as_fd();
        let failed = |op: &'static str| {
            let path = self.path.clone();
            move |source| VfioError::Ioctl { op, path, source }
        };
        let (fault_id, fault_fd) =
            iopf::iommufd::alloc_fault_queue(iommufd).map_err(failed("IOMMU_FAULT_QUEUE_ALLOC"))?;
        let hwpt_id =
            match iopf::iommufd::alloc_fault_hwpt(iommufd, self.dev_id, self.ioas_id, fault_id) {
                Ok(id) => id,
                Err(e) => {
                    destroy(iommufd, fault_id);
                    return Err(failed("IOMMU_HWPT_ALLOC (fault-capable)")(e).into());
                }
            };
        if let Err(e) = self.attach(hwpt_id) {
            destroy(iommufd, hwpt_id);
            destroy(iommufd, fault_id);
            if e.raw_os_error() == Some(libc::ENODEV) {
                return Err(VfioAttachError::NoPri {
                    path: self.path.clone(),
                    dev_id: self.dev_id,
                });
            }
            return Err(failed("VFIO_DEVICE_ATTACH_IOMMUFD_PT (fault-capable HWPT)")(e).into());
        }
        Ok(Faulting {
            fault_fd,
            fault_id,
            hwpt_id,
        })
    }

    /// Pinned mode: attaches the device to its plain IOAS. Hand it to faultd with
    /// [`crate::DeviceQueue::Pinned`] and [`crate::DeviceIommu::Iommufd`] with
    /// [`Self::ioas_id`]: faultd maps the DMA ranges there before `add_device` returns.
    pub fn attach_pinned(&self) -> Result<(), VfioError> {
        self.attach(self.ioas_id)
            .map_err(|source| VfioError::Ioctl {
                op: "VFIO_DEVICE_ATTACH_IOMMUFD_PT (IOAS)",
                path: self.path.clone(),
                source,
            })
    }

    /// `VFIO_DEVICE_GET_REGION_INFO` of region `index` (for PCI: 0..=5 the BARs, 7 config).
    pub fn region(&self, index: u32) -> Result<VfioRegion, VfioError> {
        let mut arg = vfio_region_info {
            argsz: size_of::<vfio_region_info>() as u32,
            flags: 0,
            index,
            cap_offset: 0,
            size: 0,
            offset: 0,
        };
        // SAFETY: vfio_region_info is the argument of VFIO_DEVICE_GET_REGION_INFO; argsz is
        // its size, so the kernel writes no capability chain past it.
        unsafe { ioctl(self.fd.as_fd(), VFIO_DEVICE_GET_REGION_INFO, &mut arg) }.map_err(
            |source| VfioError::Ioctl {
                op: "VFIO_DEVICE_GET_REGION_INFO",
                path: self.path.clone(),
                source,
            },
        )?;
        Ok(VfioRegion {
            offset: arg.offset,
            size: arg.size,
            flags: arg.flags,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_cdev_is_an_open_error_naming_the_path() {
        let iommufd = File::open("/dev/null").unwrap();

        let e = VfioDevice::bind("/nonexistent/vfio9", &iommufd).unwrap_err();

        assert!(
            matches!(&e, VfioError::Open { path, .. } if path == Path::new("/nonexistent/vfio9"))
        );
    }

    #[test]
    fn binding_a_file_that_is_no_vfio_device_names_the_ioctl() {
        let iommufd = File::open("/dev/null").unwrap();

        let e = VfioDevice::bind("/dev/null", &iommufd).unwrap_err();

        assert!(
            matches!(
                &e,
                VfioError::Ioctl {
                    op: "VFIO_DEVICE_BIND_IOMMUFD",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn the_no_pri_error_says_no_pri_and_points_to_pinned_mode() {
        let e = VfioAttachError::NoPri {
            path: "/dev/vfio/devices/vfio0".into(),
            dev_id: 3,
        };
        let msg = e.to_string();

        assert!(msg.contains("has no PRI"), "{msg}");
        assert!(msg.contains("ENODEV"), "{msg}");
        assert!(msg.contains("pinned mode"), "{msg}");
        assert!(msg.contains("/dev/vfio/devices/vfio0"), "{msg}");
    }
}
