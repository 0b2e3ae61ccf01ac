//! What a device page fault is, independent of the transport that carried it.
//!
//! A record is one `iommu_hwpt_pgfault` ([`crate::sys`]), the same layout whether it came from
//! the kernel's fault fd or from the eventfd ring. [`PageRequest::from_raw`] validates one
//! record. [`GroupAssembler`] turns a stream of records into closed page request groups (or
//! malformed ones to answer INVALID) under the rules of `docs/device-faults.md`. Every record
//! from the other side is untrusted: nothing here panics on any input.

use std::fmt;

use crate::sys::{self, iommu_hwpt_pgfault};
use crate::Incoming;

/// An I/O virtual address. faultd's devices use IOVA == GPA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Iova(pub u64);

/// An iommufd device id (or, for the ring, the id the channel was registered with).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevId(pub u32);

/// Page requests name 4 KiB pages: `addr` is aligned to this.
pub const PAGE_SIZE: u64 = 4096;

/// Most records one group may have. PCIe does not bound a group. faultd does, so that one
/// open group is bounded state.
pub const MAX_GROUP_PAGES: usize = 512;

/// A PCIe Page Request Group Index is 9 bits wide.
pub const GRPID_MASK: u32 = 0x1ff;

/// The access a page request asks for: only the kernel's four bits are representable.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Perm(u32);

impl Perm {
    /// Read access requested.
    pub const READ: Perm = Perm(sys::PGFAULT_PERM_READ);
    /// Write access requested.
    pub const WRITE: Perm = Perm(sys::PGFAULT_PERM_WRITE);
    /// Execute requested (PASID prefix).
    pub const EXEC: Perm = Perm(sys::PGFAULT_PERM_EXEC);
    /// Privileged mode requested (PASID prefix).
    pub const PRIV: Perm = Perm(sys::PGFAULT_PERM_PRIV);
    const ALL: u32 = Self::READ.0 | Self::WRITE.0 | Self::EXEC.0 | Self::PRIV.0;

    /// No bit set.
    pub const fn empty() -> Perm {
        Perm(0)
    }

    /// `bits` as a permission, or `None` if any bit outside READ|WRITE|EXEC|PRIV is set.
    pub const fn from_bits(bits: u32) -> Option<Perm> {
        if bits & !Self::ALL == 0 {
            Some(Perm(bits))
        } else {
            None
        }
    }

    /// The raw bits, as in `iommu_hwpt_pgfault.perm`.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether every bit of `other` is set in `self`.
    pub const fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the request needs write access.
    pub const fn is_write(self) -> bool {
        self.contains(Perm::WRITE)
    }
}

impl std::ops::BitOr for Perm {
    type Output = Perm;
    fn bitor(self, rhs: Perm) -> Perm {
        Perm(self.0 | rhs.0)
    }
}

impl fmt::Debug for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Perm::READ, "READ"),
            (Perm::WRITE, "WRITE"),
            (Perm::EXEC, "EXEC"),
            (Perm::PRIV, "PRIV"),
        ];
        let set: Vec<&str> = names
            .iter()
            .filter(|(p, _)| self.contains(*p))
            .map(|(_, n)| *n)
            .collect();
        write!(f, "Perm({})", set.join("|"))
    }
}

/// Why one record is not a valid page request. Checked in the order of the variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// `flags` has bits other than PASID_VALID and LAST_PAGE.
    #[error("unknown flag bits {0:#x}")]
    UnknownFlags(u32),
    /// `perm` has bits other than READ, WRITE, EXEC and PRIV.
    #[error("unknown permission bits {0:#x}")]
    UnknownPerm(u32),
    /// `__reserved` is not zero.
    #[error("reserved field is {0:#x}, not 0")]
    Reserved(u32),
    /// `length` is not zero (no producer sends a prefetch hint today).
    #[error("length hint is {0:#x}, not 0")]
    Length(u32),
    /// `grpid` does not fit in 9 bits.
    #[error("group index {0:#x} is wider than 9 bits")]
    GrpidTooWide(u32),
    /// `addr` is not 4 KiB aligned.
    #[error("address {0:#x} is not page aligned")]
    Unaligned(u64),
    /// `cookie` is 0: the group cannot be answered.
    #[error("cookie is 0")]
    ZeroCookie,
    /// The record names a device other than the channel's (eventfd ring only).
    #[error("record for device {got} on the channel of device {expected}")]
    ForeignDevice {
        /// The channel's device.
        expected: u32,
        /// The device the record names.
        got: u32,
    },
}

impl RecordError {
    /// A fixed text for [`Incoming::Malformed`] (the error itself carries the values).
    pub fn reason(&self) -> &'static str {
        match self {
            RecordError::UnknownFlags(_) => "unknown flag bits",
            RecordError::UnknownPerm(_) => "unknown permission bits",
            RecordError::Reserved(_) => "reserved field not zero",
            RecordError::Length(_) => "length hint not zero",
            RecordError::GrpidTooWide(_) => "group index wider than 9 bits",
            RecordError::Unaligned(_) => "address not page aligned",
            RecordError::ZeroCookie => "cookie is 0",
            RecordError::ForeignDevice { .. } => "record for another device",
        }
    }
}

/// One validated page request: exactly the fields of an `iommu_hwpt_pgfault` record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// The device that faulted.
    pub dev_id: DevId,
    /// The PASID, if the request carried one.
    pub pasid: Option<u32>,
    /// The Page Request Group Index (9 bits).
    pub grpid: u32,
    /// The access requested.
    pub perm: Perm,
    /// The faulting page (4 KiB aligned).
    pub addr: Iova,
    /// The last request of its group.
    pub last: bool,
    /// The group's cookie (non-zero), echoed in the response.
    pub cookie: u32,
}

impl PageRequest {
    /// Validates one raw record. A `pasid` without PASID_VALID is ignored, not rejected: the
    /// kernel does not promise to zero it.
    pub fn from_raw(raw: &iommu_hwpt_pgfault) -> Result<PageRequest, RecordError> {
        if raw.flags & !sys::PGFAULT_FLAGS_KNOWN != 0 {
            return Err(RecordError::UnknownFlags(raw.flags));
        }
        let perm = Perm::from_bits(raw.perm).ok_or(RecordError::UnknownPerm(raw.perm))?;
        if raw.__reserved != 0 {
            return Err(RecordError::Reserved(raw.__reserved));
        }
        if raw.length != 0 {
            return Err(RecordError::Length(raw.length));
        }
        if raw.grpid & !GRPID_MASK != 0 {
            return Err(RecordError::GrpidTooWide(raw.grpid));
        }
        if !raw.addr.is_multiple_of(PAGE_SIZE) {
            return Err(RecordError::Unaligned(raw.addr));
        }
        if raw.cookie == 0 {
            return Err(RecordError::ZeroCookie);
        }
        Ok(PageRequest {
            dev_id: DevId(raw.dev_id),
            pasid: (raw.flags & sys::PGFAULT_FLAGS_PASID_VALID != 0).then_some(raw.pasid),
            grpid: raw.grpid,
            perm,
            addr: Iova(raw.addr),
            last: raw.flags & sys::PGFAULT_FLAGS_LAST_PAGE != 0,
            cookie: raw.cookie,
        })
    }

    /// The raw record (reserved and length zero).
    pub fn to_raw(&self) -> iommu_hwpt_pgfault {
        let mut flags = 0;
        if self.pasid.is_some() {
            flags |= sys::PGFAULT_FLAGS_PASID_VALID;
        }
        if self.last {
            flags |= sys::PGFAULT_FLAGS_LAST_PAGE;
        }
        iommu_hwpt_pgfault {
            flags,
            dev_id: self.dev_id.0,
            pasid: self.pasid.unwrap_or(0),
            grpid: self.grpid,
            perm: self.perm.bits(),
            __reserved: 0,
            addr: self.addr.0,
            length: 0,
            cookie: self.cookie,
        }
    }
}

impl TryFrom<&iommu_hwpt_pgfault> for PageRequest {
    type Error = RecordError;
    fn try_from(raw: &iommu_hwpt_pgfault) -> Result<PageRequest, RecordError> {
        PageRequest::from_raw(raw)
    }
}

/// The answer to one page request group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ResponseCode {
    /// Every page of the group is mapped: the device retries.
    Success = sys::PAGE_RESP_SUCCESS,
    /// The group failed: the device does not retry.
    Invalid = sys::PAGE_RESP_INVALID,
}

impl ResponseCode {
    /// The code for `raw`, or `None` for a value the kernel would reject.
    pub const fn from_raw(raw: u32) -> Option<ResponseCode> {
        match raw {
            sys::PAGE_RESP_SUCCESS => Some(ResponseCode::Success),
            sys::PAGE_RESP_INVALID => Some(ResponseCode::Invalid),
            _ => None,
        }
    }

    /// The raw value, as in `iommu_hwpt_page_response.code`.
    pub const fn raw(self) -> u32 {
        self as u32
    }
}

/// A closed page request group: answered once, with its cookie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// Echoed in the response.
    pub cookie: u32,
    /// The device that faulted.
    pub dev_id: DevId,
    /// The PASID, if the requests carried one.
    pub pasid: Option<u32>,
    /// The Page Request Group Index.
    pub grpid: u32,
    /// Every requested page with its access, in arrival order (1..=512 entries).
    pub pages: Vec<(Iova, Perm)>,
}

/// The group being assembled: records seen so far with one cookie.
#[derive(Debug)]
struct OpenGroup {
    cookie: u32,
    dev_id: DevId,
    pasid: Option<u32>,
    grpid: u32,
    records: usize,
    pages: Vec<(Iova, Perm)>,
    /// Set by the first problem; the group is then reported Malformed with this reason when
    /// it closes, and its pages are no longer kept.
    poisoned: Option<&'static str>,
}

/// Reason for a group cut short by a record with another cookie.
pub const REASON_INTERRUPTED: &str = "group interrupted by a record with another cookie";
/// Reason for a group longer than [`MAX_GROUP_PAGES`].
pub const REASON_OVERSIZE: &str = "group longer than 512 records";
/// Reason for a group whose records disagree on device, PASID or group index.
pub const REASON_INCONSISTENT: &str =
    "records of one group disagree on device, PASID or group index";

/// Turns records into closed groups.
///
/// Rules (the ring's, which the kernel's fault fd also keeps): records of a group are
/// consecutive and share a non-zero cookie; the one with LAST_PAGE closes it. Every group is
/// reported exactly once, when it closes: as [`Incoming::Group`] if all its records were valid
/// and consistent and there were at most [`MAX_GROUP_PAGES`], otherwise as
/// [`Incoming::Malformed`] with its cookie (to be answered INVALID). A record with another
/// cookie closes the open group as Malformed and starts a new one. A record with cookie 0
/// cannot be answered: it is reported alone, as Malformed without a cookie. At most one group
/// is open, holding at most [`MAX_GROUP_PAGES`] pages: the state is bounded whatever arrives.
#[derive(Debug, Default)]
pub struct GroupAssembler {
    device: Option<DevId>,
    open: Option<OpenGroup>,
}

impl GroupAssembler {
    /// An assembler accepting records of any device (one kernel fault queue may serve several).
    pub fn new() -> GroupAssembler {
        GroupAssembler::default()
    }

    /// An assembler for a channel of one device: records naming another are malformed.
    pub fn for_device(device: DevId) -> GroupAssembler {
        GroupAssembler {
            device: Some(device),
            open: None,
        }
    }

    /// Whether a group is open (records seen, LAST not yet).
    pub fn has_open_group(&self) -> bool {
        self.open.is_some()
    }

    /// Feeds one record and appends what it closes (zero, one or two entries). Returns the
    /// record's own validation error, so callers can count malformed records.
    pub fn push(
        &mut self,
        raw: &iommu_hwpt_pgfault,
        out: &mut Vec<Incoming>,
    ) -> Result<(), RecordError> {
        let checked = PageRequest::from_raw(raw).and_then(|req| match self.device {
            Some(dev) if dev != req.dev_id => Err(RecordError::ForeignDevice {
                expected: dev.0,
                got: req.dev_id.0,
            }),
            _ => Ok(req),
        });
        let cookie = raw.cookie;
        if self.open.as_ref().is_some_and(|g| g.cookie != cookie) {
            self.abandon(REASON_INTERRUPTED, out);
        }
        if cookie == 0 {
            // Nothing to answer: report it alone so it is counted. Only the first problem is
            // named; a record with several has the earliest in RecordError's order.
            let err = checked.err().unwrap_or(RecordError::ZeroCookie);
            out.push(Incoming::Malformed {
                cookie: None,
                reason: err.reason(),
            });
            return Err(err);
        }
        let open = self.open.get_or_insert_with(|| OpenGroup {
            cookie,
            dev_id: DevId(raw.dev_id),
            pasid: (raw.flags & sys::PGFAULT_FLAGS_PASID_VALID != 0).then_some(raw.pasid),
            grpid: raw.grpid,
            records: 0,
            pages: Vec::new(),
            poisoned: None,
        });
        open.records = open.records.saturating_add(1);
        match checked {
            Err(e) => open.poison(e.reason()),
            Ok(req)
                if (req.dev_id, req.pasid, req.grpid) != (open.dev_id, open.pasid, open.grpid) =>
            {
                open.poison(REASON_INCONSISTENT)
            }
            Ok(_) if open.records > MAX_GROUP_PAGES => open.poison(REASON_OVERSIZE),
            Ok(req) if open.poisoned.is_none() => open.pages.push((req.addr, req.perm)),
            Ok(_) => {}
        }
        if raw.flags & sys::PGFAULT_FLAGS_LAST_PAGE != 0 {
            if let Some(open) = self.open.take() {
                out.push(open.close());
            }
        }
        checked.map(drop)
    }

    /// Drops the open group, if any, reporting it Malformed with its cookie (used when the
    /// stream it came from is cut: ring indices resynchronised, records interleaved).
    pub fn abandon(&mut self, reason: &'static str, out: &mut Vec<Incoming>) {
        if let Some(mut open) = self.open.take() {
            open.poison(reason);
            out.push(open.close());
        }
    }
}

impl OpenGroup {
    fn poison(&mut self, reason: &'static str) {
        if self.poisoned.is_none() {
            self.poisoned = Some(reason);
            self.pages = Vec::new();
        }
    }

    fn close(self) -> Incoming {
        match self.poisoned {
            Some(reason) => Incoming::Malformed {
                cookie: Some(self.cookie),
                reason,
            },
            None => Incoming::Group(Group {
                cookie: self.cookie,
                dev_id: self.dev_id,
                pasid: self.pasid,
                grpid: self.grpid,
                pages: self.pages,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(cookie: u32, addr: u64, last: bool) -> iommu_hwpt_pgfault {
        PageRequest {
            dev_id: DevId(7),
            pasid: None,
            grpid: 5,
            perm: Perm::READ,
            addr: Iova(addr),
            last,
            cookie,
        }
        .to_raw()
    }

    fn valid() -> iommu_hwpt_pgfault {
        record(9, 0x1000, true)
    }

    #[test]
    fn page_request_round_trips_through_the_raw_record() {
        let req = PageRequest {
            dev_id: DevId(3),
            pasid: Some(0x42),
            grpid: 0x1ff,
            perm: Perm::READ | Perm::WRITE | Perm::EXEC | Perm::PRIV,
            addr: Iova(0xdead_b000),
            last: true,
            cookie: 17,
        };

        let raw = req.to_raw();

        assert_eq!(
            raw.flags,
            sys::PGFAULT_FLAGS_PASID_VALID | sys::PGFAULT_FLAGS_LAST_PAGE
        );
        assert_eq!(PageRequest::from_raw(&raw), Ok(req));
        assert_eq!(
            PageRequest::from_raw(&sys::pgfault_from_bytes(&sys::pgfault_to_bytes(&raw))),
            Ok(req)
        );
    }

    #[test]
    fn pasid_without_the_valid_flag_is_ignored() {
        let raw = iommu_hwpt_pgfault {
            pasid: 99,
            ..valid()
        };

        assert_eq!(PageRequest::from_raw(&raw).map(|r| r.pasid), Ok(None));
    }

    #[test]
    fn unknown_flag_bits_are_rejected() {
        let raw = iommu_hwpt_pgfault {
            flags: 0x6,
            ..valid()
        };

        assert_eq!(
            PageRequest::from_raw(&raw),
            Err(RecordError::UnknownFlags(0x6))
        );
    }

    #[test]
    fn unknown_perm_bits_are_rejected() {
        let raw = iommu_hwpt_pgfault {
            perm: 0x11,
            ..valid()
        };

        assert_eq!(
            PageRequest::from_raw(&raw),
            Err(RecordError::UnknownPerm(0x11))
        );
    }

    #[test]
    fn nonzero_reserved_field_is_rejected() {
        let raw = iommu_hwpt_pgfault {
            __reserved: 1,
            ..valid()
        };

        assert_eq!(PageRequest::from_raw(&raw), Err(RecordError::Reserved(1)));
    }

    #[test]
    fn nonzero_length_hint_is_rejected() {
        let raw = iommu_hwpt_pgfault {
            length: 4096,
            ..valid()
        };

        assert_eq!(PageRequest::from_raw(&raw), Err(RecordError::Length(4096)));
    }

    #[test]
    fn group_index_wider_than_nine_bits_is_rejected() {
        let raw = iommu_hwpt_pgfault {
            grpid: 0x200,
            ..valid()
        };

        assert_eq!(
            PageRequest::from_raw(&raw),
            Err(RecordError::GrpidTooWide(0x200))
        );
    }

    #[test]
    fn unaligned_address_is_rejected() {
        let raw = iommu_hwpt_pgfault {
            addr: 0x1008,
            ..valid()
        };

        assert_eq!(
            PageRequest::from_raw(&raw),
            Err(RecordError::Unaligned(0x1008))
        );
    }

    #[test]
    fn zero_cookie_is_rejected() {
        let raw = iommu_hwpt_pgfault {
            cookie: 0,
            ..valid()
        };

        assert_eq!(PageRequest::from_raw(&raw), Err(RecordError::ZeroCookie));
    }

    #[test]
    fn record_for_another_device_is_malformed_on_a_device_channel() {
        let mut asm = GroupAssembler::for_device(DevId(8));
        let mut out = Vec::new();

        let res = asm.push(&valid(), &mut out);

        assert_eq!(
            res,
            Err(RecordError::ForeignDevice {
                expected: 8,
                got: 7
            })
        );
        assert_eq!(
            out,
            vec![Incoming::Malformed {
                cookie: Some(9),
                reason: "record for another device"
            }]
        );
    }

    #[test]
    fn perm_rejects_unknown_bits_and_formats_names() {
        assert_eq!(Perm::from_bits(0x10), None);
        assert_eq!(Perm::from_bits(3), Some(Perm::READ | Perm::WRITE));
        assert_eq!(
            format!("{:?}", Perm::READ | Perm::WRITE),
            "Perm(READ|WRITE)"
        );
    }

    #[test]
    fn response_code_accepts_only_success_and_invalid() {
        assert_eq!(ResponseCode::from_raw(0), Some(ResponseCode::Success));
        assert_eq!(ResponseCode::from_raw(1), Some(ResponseCode::Invalid));
        assert_eq!(ResponseCode::from_raw(2), None);
    }

    #[test]
    fn multi_page_group_closes_on_last_page() {
        let mut asm = GroupAssembler::new();
        let mut out = Vec::new();

        asm.push(&record(4, 0x1000, false), &mut out).unwrap();
        asm.push(&record(4, 0x2000, false), &mut out).unwrap();
        let open_before_last = asm.has_open_group() && out.is_empty();
        asm.push(&record(4, 0x3000, true), &mut out).unwrap();

        assert!(open_before_last);
        assert!(!asm.has_open_group());
        assert_eq!(
            out,
            vec![Incoming::Group(Group {
                cookie: 4,
                dev_id: DevId(7),
                pasid: None,
                grpid: 5,
                pages: vec![
                    (Iova(0x1000), Perm::READ),
                    (Iova(0x2000), Perm::READ),
                    (Iova(0x3000), Perm::READ)
                ],
            })]
        );
    }

    #[test]
    fn last_only_record_is_a_single_page_group() {
        let mut asm = GroupAssembler::new();
        let mut out = Vec::new();

        asm.push(&record(1, 0x5000, true), &mut out).unwrap();

        assert_eq!(
            out,
            vec![Incoming::Group(Group {
                cookie: 1,
                dev_id: DevId(7),
                pasid: None,
                grpid: 5,
                pages: vec![(Iova(0x5000), Perm::READ)],
            })]
        );
    }

    #[test]
    fn interleaved_cookie_closes_the_open_group_as_malformed() {
        let mut asm = GroupAssembler::new();
        let mut out = Vec::new();

        asm.push(&record(4, 0x1000, false), &mut out).unwrap();
        asm.push(&record(5, 0x2000, true), &mut out).unwrap();

        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0],
            Incoming::Malformed {
                cookie: Some(4),
                reason: REASON_INTERRUPTED
            }
        );
        assert!(matches!(&out[1], Incoming::Group(g) if g.cookie == 5 && g.pages.len() == 1));
    }

    #[test]
    fn group_of_512_records_is_accepted_and_513_is_malformed() {
        let mut asm = GroupAssembler::new();
        let mut ok = Vec::new();
        let mut over = Vec::new();

        for i in 0..MAX_GROUP_PAGES as u64 {
            let last = i + 1 == MAX_GROUP_PAGES as u64;
            asm.push(&record(2, i * PAGE_SIZE, last), &mut ok).unwrap();
        }
        for i in 0..=MAX_GROUP_PAGES as u64 {
            let last = i == MAX_GROUP_PAGES as u64;
            asm.push(&record(3, i * PAGE_SIZE, last), &mut over)
                .unwrap();
        }

        assert!(matches!(&ok[..], [Incoming::Group(g)] if g.pages.len() == MAX_GROUP_PAGES));
        assert_eq!(
            over,
            vec![Incoming::Malformed {
                cookie: Some(3),
                reason: REASON_OVERSIZE
            }]
        );
    }

    #[test]
    fn invalid_record_poisons_its_group_which_is_reported_once_at_last() {
        let mut asm = GroupAssembler::new();
        let mut out = Vec::new();
        let bad = iommu_hwpt_pgfault {
            perm: 0x40,
            ..record(6, 0x2000, false)
        };

        asm.push(&record(6, 0x1000, false), &mut out).unwrap();
        let res = asm.push(&bad, &mut out);
        asm.push(&record(6, 0x3000, true), &mut out).unwrap();

        assert_eq!(res, Err(RecordError::UnknownPerm(0x40)));
        assert_eq!(
            out,
            vec![Incoming::Malformed {
                cookie: Some(6),
                reason: "unknown permission bits"
            }]
        );
    }

    #[test]
    fn records_disagreeing_on_group_index_make_the_group_malformed() {
        let mut asm = GroupAssembler::new();
        let mut out = Vec::new();
        let other_grp = iommu_hwpt_pgfault {
            grpid: 6,
            ..record(6, 0x2000, true)
        };

        asm.push(&record(6, 0x1000, false), &mut out).unwrap();
        asm.push(&other_grp, &mut out).unwrap();

        assert_eq!(
            out,
            vec![Incoming::Malformed {
                cookie: Some(6),
                reason: REASON_INCONSISTENT
            }]
        );
    }

    #[test]
    fn zero_cookie_record_is_reported_alone_and_closes_the_open_group() {
        let mut asm = GroupAssembler::new();
        let mut out = Vec::new();

        asm.push(&record(4, 0x1000, false), &mut out).unwrap();
        let res = asm.push(&record(0, 0x2000, true), &mut out);

        assert_eq!(res, Err(RecordError::ZeroCookie));
        assert_eq!(
            out,
            vec![
                Incoming::Malformed {
                    cookie: Some(4),
                    reason: REASON_INTERRUPTED
                },
                Incoming::Malformed {
                    cookie: None,
                    reason: "cookie is 0"
                }
            ]
        );
        assert!(!asm.has_open_group());
    }

    #[test]
    fn abandon_reports_the_open_group_with_its_cookie() {
        let mut asm = GroupAssembler::new();
        let mut out = Vec::new();

        asm.push(&record(8, 0x1000, false), &mut out).unwrap();
        asm.abandon("ring indices resynchronised", &mut out);
        asm.abandon("ring indices resynchronised", &mut out);

        assert_eq!(
            out,
            vec![Incoming::Malformed {
                cookie: Some(8),
                reason: "ring indices resynchronised"
            }]
        );
    }
}
