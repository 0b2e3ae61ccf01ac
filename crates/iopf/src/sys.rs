//! The raw kernel ABI: `include/uapi/linux/iommufd.h`, nothing else.
//!
//! The structures and numbers come from `iommufd-bindings` 0.2.0, which bindgen generated from
//! the uapi headers of Linux v7.1. faultd relies only on the parts that have not changed since
//! they appeared: the fault object and fault fd (6.11), fault-capable paging HWPTs (6.13),
//! `IOMMU_IOAS_MAP_FILE` (6.13), and the pgfault record with its padding explicit and zeroed
//! (6.14, backported to 6.12.y/6.13.y). So the running kernel must be 6.13 or later. The asserts
//! below pin the size and every field offset faultd reads or writes. If a regenerated binding
//! moves any of them, the crate stops compiling.
//!
//! The same 40-byte `iommu_hwpt_pgfault` and 8-byte `iommu_hwpt_page_response` records are also
//! the slot formats of the eventfd ring (`crate::ring`). The kernel writes them in native byte
//! order and the ring is specified little-endian. The two agree only on little-endian hosts,
//! which is every host faultd targets (x86-64, aarch64), and the assert below checks that.

use std::mem::{offset_of, size_of};
use std::os::raw::c_ulong;

use iommufd_bindings as b;
pub use iommufd_bindings::{
    iommu_destroy, iommu_fault_alloc, iommu_hwpt_alloc, iommu_hwpt_page_response,
    iommu_hwpt_pgfault, iommu_ioas_alloc, iommu_ioas_map, iommu_ioas_map_file, iommu_ioas_unmap,
};
use vmm_sys_util::ioctl::ioctl_expr;

const _: () = assert!(cfg!(target_endian = "little"));

/// `_IO(IOMMUFD_TYPE, nr)`: iommufd ioctls carry no size or direction bits. The struct is
/// size-prefixed instead.
const fn iommufd_io(nr: u32) -> c_ulong {
    ioctl_expr(0, b::IOMMUFD_TYPE as u32, nr, 0)
}

/// `IOMMU_DESTROY`: destroy an iommufd object (an IOAS, a HWPT, a fault object).
pub const IOMMU_DESTROY: c_ulong = iommufd_io(b::IOMMUFD_CMD_DESTROY);
/// `IOMMU_IOAS_ALLOC`: allocate an empty IOAS.
pub const IOMMU_IOAS_ALLOC: c_ulong = iommufd_io(b::IOMMUFD_CMD_IOAS_ALLOC);
/// `IOMMU_IOAS_MAP`: map a user VA range into an IOAS.
pub const IOMMU_IOAS_MAP: c_ulong = iommufd_io(b::IOMMUFD_CMD_IOAS_MAP);
/// `IOMMU_IOAS_UNMAP`: unmap whole, previously mapped IOVA ranges.
pub const IOMMU_IOAS_UNMAP: c_ulong = iommufd_io(b::IOMMUFD_CMD_IOAS_UNMAP);
/// `IOMMU_HWPT_ALLOC`: allocate a hardware page table (here: fault-capable, from an IOAS).
pub const IOMMU_HWPT_ALLOC: c_ulong = iommufd_io(b::IOMMUFD_CMD_HWPT_ALLOC);
/// `IOMMU_FAULT_QUEUE_ALLOC`: allocate a fault object and its fault fd.
pub const IOMMU_FAULT_QUEUE_ALLOC: c_ulong = iommufd_io(b::IOMMUFD_CMD_FAULT_QUEUE_ALLOC);
/// `IOMMU_IOAS_MAP_FILE`: map a memfd range into an IOAS.
pub const IOMMU_IOAS_MAP_FILE: c_ulong = iommufd_io(b::IOMMUFD_CMD_IOAS_MAP_FILE);

const _: () = assert!(IOMMU_DESTROY == 0x3B80 && IOMMU_IOAS_ALLOC == 0x3B81);
const _: () = assert!(IOMMU_IOAS_MAP == 0x3B85);
const _: () = assert!(IOMMU_IOAS_UNMAP == 0x3B86);
const _: () = assert!(IOMMU_HWPT_ALLOC == 0x3B89);
const _: () = assert!(IOMMU_FAULT_QUEUE_ALLOC == 0x3B8E);
const _: () = assert!(IOMMU_IOAS_MAP_FILE == 0x3B8F);

/// `iommu_hwpt_pgfault.flags`: the `pasid` field is valid.
pub const PGFAULT_FLAGS_PASID_VALID: u32 =
    b::iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_PASID_VALID;
/// `iommu_hwpt_pgfault.flags`: the last record of its page request group.
pub const PGFAULT_FLAGS_LAST_PAGE: u32 = b::iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_LAST_PAGE;
/// Every flag bit the kernel defines; others make a record malformed.
pub const PGFAULT_FLAGS_KNOWN: u32 = PGFAULT_FLAGS_PASID_VALID | PGFAULT_FLAGS_LAST_PAGE;

/// `iommu_hwpt_pgfault.perm`: read access requested.
pub const PGFAULT_PERM_READ: u32 = b::iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_READ;
/// `iommu_hwpt_pgfault.perm`: write access requested.
pub const PGFAULT_PERM_WRITE: u32 = b::iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_WRITE;
/// `iommu_hwpt_pgfault.perm`: execute requested (PASID prefix).
pub const PGFAULT_PERM_EXEC: u32 = b::iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_EXEC;
/// `iommu_hwpt_pgfault.perm`: privileged mode requested (PASID prefix).
pub const PGFAULT_PERM_PRIV: u32 = b::iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_PRIV;

/// `iommu_hwpt_page_response.code`: translations installed, the device retries.
pub const PAGE_RESP_SUCCESS: u32 = b::iommufd_page_response_code_IOMMUFD_PAGE_RESP_SUCCESS;
/// `iommu_hwpt_page_response.code`: the request failed, the device does not retry.
pub const PAGE_RESP_INVALID: u32 = b::iommufd_page_response_code_IOMMUFD_PAGE_RESP_INVALID;

/// `iommu_ioas_map.flags`: place the mapping at the given IOVA.
pub const IOAS_MAP_FIXED_IOVA: u32 = b::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA;
/// `iommu_ioas_map.flags`: DMA may write.
pub const IOAS_MAP_WRITEABLE: u32 = b::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE;
/// `iommu_ioas_map.flags`: DMA may read.
pub const IOAS_MAP_READABLE: u32 = b::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE;

/// `iommu_hwpt_alloc.flags`: `fault_id` is valid (the HWPT reports page faults).
pub const HWPT_FAULT_ID_VALID: u32 = b::iommufd_hwpt_alloc_flags_IOMMU_HWPT_FAULT_ID_VALID;

const _: () = assert!(PGFAULT_FLAGS_PASID_VALID == 1 && PGFAULT_FLAGS_LAST_PAGE == 2);
const _: () = assert!(PGFAULT_PERM_READ == 1 && PGFAULT_PERM_WRITE == 2);
const _: () = assert!(PGFAULT_PERM_EXEC == 4 && PGFAULT_PERM_PRIV == 8);
const _: () = assert!(PAGE_RESP_SUCCESS == 0 && PAGE_RESP_INVALID == 1);
const _: () = assert!(IOAS_MAP_FIXED_IOVA == 1 && IOAS_MAP_WRITEABLE == 2);
const _: () = assert!(IOAS_MAP_READABLE == 4 && HWPT_FAULT_ID_VALID == 4);

/// Bytes of one `iommu_hwpt_pgfault` record.
pub const PGFAULT_SIZE: usize = 40;
/// Bytes of one `iommu_hwpt_page_response` record.
pub const PAGE_RESPONSE_SIZE: usize = 8;

const _: () = assert!(size_of::<iommu_hwpt_pgfault>() == PGFAULT_SIZE);
const _: () = assert!(offset_of!(iommu_hwpt_pgfault, flags) == 0);
const _: () = assert!(offset_of!(iommu_hwpt_pgfault, dev_id) == 4);
const _: () = assert!(offset_of!(iommu_hwpt_pgfault, pasid) == 8);
const _: () = assert!(offset_of!(iommu_hwpt_pgfault, grpid) == 12);
const _: () = assert!(offset_of!(iommu_hwpt_pgfault, perm) == 16);
const _: () = assert!(offset_of!(iommu_hwpt_pgfault, __reserved) == 20);
const _: () = assert!(offset_of!(iommu_hwpt_pgfault, addr) == 24);
const _: () = assert!(offset_of!(iommu_hwpt_pgfault, length) == 32);
const _: () = assert!(offset_of!(iommu_hwpt_pgfault, cookie) == 36);

const _: () = assert!(size_of::<iommu_hwpt_page_response>() == PAGE_RESPONSE_SIZE);
const _: () = assert!(offset_of!(iommu_hwpt_page_response, cookie) == 0);
const _: () = assert!(offset_of!(iommu_hwpt_page_response, code) == 4);

const _: () = assert!(size_of::<iommu_fault_alloc>() == 16);
const _: () = assert!(size_of::<iommu_destroy>() == 8 && size_of::<iommu_ioas_alloc>() == 12);
const _: () = assert!(offset_of!(iommu_fault_alloc, size) == 0);
const _: () = assert!(offset_of!(iommu_fault_alloc, flags) == 4);
const _: () = assert!(offset_of!(iommu_fault_alloc, out_fault_id) == 8);
const _: () = assert!(offset_of!(iommu_fault_alloc, out_fault_fd) == 12);

const _: () = assert!(size_of::<iommu_ioas_map>() == 40);
const _: () = assert!(offset_of!(iommu_ioas_map, size) == 0);
const _: () = assert!(offset_of!(iommu_ioas_map, flags) == 4);
const _: () = assert!(offset_of!(iommu_ioas_map, ioas_id) == 8);
const _: () = assert!(offset_of!(iommu_ioas_map, __reserved) == 12);
const _: () = assert!(offset_of!(iommu_ioas_map, user_va) == 16);
const _: () = assert!(offset_of!(iommu_ioas_map, length) == 24);
const _: () = assert!(offset_of!(iommu_ioas_map, iova) == 32);

const _: () = assert!(size_of::<iommu_ioas_map_file>() == 40);
const _: () = assert!(offset_of!(iommu_ioas_map_file, size) == 0);
const _: () = assert!(offset_of!(iommu_ioas_map_file, flags) == 4);
const _: () = assert!(offset_of!(iommu_ioas_map_file, ioas_id) == 8);
const _: () = assert!(offset_of!(iommu_ioas_map_file, fd) == 12);
const _: () = assert!(offset_of!(iommu_ioas_map_file, start) == 16);
const _: () = assert!(offset_of!(iommu_ioas_map_file, length) == 24);
const _: () = assert!(offset_of!(iommu_ioas_map_file, iova) == 32);

const _: () = assert!(size_of::<iommu_ioas_unmap>() == 24);
const _: () = assert!(offset_of!(iommu_ioas_unmap, size) == 0);
const _: () = assert!(offset_of!(iommu_ioas_unmap, ioas_id) == 4);
const _: () = assert!(offset_of!(iommu_ioas_unmap, iova) == 8);
const _: () = assert!(offset_of!(iommu_ioas_unmap, length) == 16);

const _: () = assert!(size_of::<iommu_hwpt_alloc>() == 48);
const _: () = assert!(offset_of!(iommu_hwpt_alloc, size) == 0);
const _: () = assert!(offset_of!(iommu_hwpt_alloc, flags) == 4);
const _: () = assert!(offset_of!(iommu_hwpt_alloc, dev_id) == 8);
const _: () = assert!(offset_of!(iommu_hwpt_alloc, pt_id) == 12);
const _: () = assert!(offset_of!(iommu_hwpt_alloc, out_hwpt_id) == 16);
const _: () = assert!(offset_of!(iommu_hwpt_alloc, data_type) == 24);
const _: () = assert!(offset_of!(iommu_hwpt_alloc, data_len) == 28);
const _: () = assert!(offset_of!(iommu_hwpt_alloc, data_uptr) == 32);
const _: () = assert!(offset_of!(iommu_hwpt_alloc, fault_id) == 40);

/// Decodes one pgfault record from its wire bytes (no alignment needed).
pub fn pgfault_from_bytes(bytes: &[u8; PGFAULT_SIZE]) -> iommu_hwpt_pgfault {
    let u32_at =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let mut addr = [0u8; 8];
    addr.copy_from_slice(&bytes[24..32]);
    iommu_hwpt_pgfault {
        flags: u32_at(0),
        dev_id: u32_at(4),
        pasid: u32_at(8),
        grpid: u32_at(12),
        perm: u32_at(16),
        __reserved: u32_at(20),
        addr: u64::from_le_bytes(addr),
        length: u32_at(32),
        cookie: u32_at(36),
    }
}

/// Encodes one pgfault record into its wire bytes.
pub fn pgfault_to_bytes(rec: &iommu_hwpt_pgfault) -> [u8; PGFAULT_SIZE] {
    let mut out = [0u8; PGFAULT_SIZE];
    for (at, v) in [
        (0, rec.flags),
        (4, rec.dev_id),
        (8, rec.pasid),
        (12, rec.grpid),
        (16, rec.perm),
        (20, rec.__reserved),
        (32, rec.length),
        (36, rec.cookie),
    ] {
        out[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    out[24..32].copy_from_slice(&rec.addr.to_le_bytes());
    out
}

/// Encodes one page response into its wire bytes: cookie, then code.
pub fn page_response_to_bytes(resp: &iommu_hwpt_page_response) -> [u8; PAGE_RESPONSE_SIZE] {
    let mut out = [0u8; PAGE_RESPONSE_SIZE];
    out[..4].copy_from_slice(&resp.cookie.to_le_bytes());
    out[4..].copy_from_slice(&resp.code.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgfault_bytes_round_trip_keeps_every_field() {
        let rec = iommu_hwpt_pgfault {
            flags: 3,
            dev_id: 0x0102_0304,
            pasid: 0x0506_0708,
            grpid: 0x1ff,
            perm: 0xf,
            __reserved: 0x0a0b_0c0d,
            addr: 0x1122_3344_5566_7000,
            length: 0x99,
            cookie: 0xdead_beef,
        };

        let bytes = pgfault_to_bytes(&rec);

        assert_eq!(pgfault_from_bytes(&bytes), rec);
        assert_eq!(bytes[36..40], 0xdead_beef_u32.to_le_bytes());
        assert_eq!(bytes[24..32], 0x1122_3344_5566_7000_u64.to_le_bytes());
    }

    #[test]
    fn page_response_bytes_are_cookie_then_code_little_endian() {
        let resp = iommu_hwpt_page_response {
            cookie: 0x0102_0304,
            code: PAGE_RESP_INVALID,
        };

        assert_eq!(page_response_to_bytes(&resp), [4, 3, 2, 1, 1, 0, 0, 0]);
    }
}
