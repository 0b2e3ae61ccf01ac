//! The eventfd ring, layout version 1 (`docs/device-faults.md`): page requests from an emulated
//! device (in the VMM) to faultd, and answers back, through one shared memfd and two eventfds.
//!
//! [`RingChannel::create`] makes the memfd and eventfds (VMM side). [`RingProducer`] is the
//! device's end: it posts groups and collects answers. [`RingConsumer`] is faultd's end and a
//! [`FaultQueue`]. The producer is untrusted: indices and slots are read once, copied out with
//! volatile reads and validated, faultd keeps its own copy of the indices it owns, and every
//! impossible value is counted in [`RingStats`], never trusted. A buggy or hostile producer
//! costs only its own device.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::model::{GroupAssembler, PageRequest, RecordError, MAX_GROUP_PAGES};
use crate::shm::{self, Doorbell, SharedMapping};
use crate::sys::{self, iommu_hwpt_page_response, iommu_hwpt_pgfault};
use crate::{DevId, FaultQueue, Incoming, Iova, Perm, RespondError, ResponseCode};

/// `"FPRG"` read as a little-endian u32.
pub const RING_MAGIC: u32 = 0x4752_5046;
/// The layout this module speaks.
pub const RING_VERSION: u32 = 1;
/// Fewest slots in either ring.
pub const MIN_SLOTS: u32 = 2;
/// Most slots in either ring.
pub const MAX_SLOTS: u32 = 4096;
/// Answers faultd holds while the response ring is full; beyond this they are dropped.
pub const RESPONSE_BACKLOG: usize = 4096;
/// Reason reported for the open group when the request indices are resynchronised.
pub const REASON_RESYNC: &str = "ring indices resynchronised";

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_REQ_SLOTS: usize = 8;
const OFF_RESP_SLOTS: usize = 12;
const OFF_REQ_PROD: usize = 64;
const OFF_REQ_CONS: usize = 128;
const OFF_RESP_PROD: usize = 192;
const OFF_RESP_CONS: usize = 256;
const OFF_REQ_RING: usize = 512;

/// Why a ring could not be created or opened.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// A slot count that is not a power of two in 2..=4096.
    #[error("{which} slot count {value} is not a power of two in 2..=4096")]
    SlotCount {
        /// `req_slots` or `resp_slots`.
        which: &'static str,
        /// The value found.
        value: u32,
    },
    /// The memfd's size does not match the layout its header describes.
    #[error("ring memfd is {actual} bytes, layout v1 with its slot counts needs {expected}")]
    Size {
        /// The memfd's size.
        actual: u64,
        /// The size the header implies.
        expected: u64,
    },
    /// The header does not start with the ring magic.
    #[error("ring magic is {0:#x}, not {RING_MAGIC:#x}")]
    Magic(u32),
    /// A layout version other than 1.
    #[error("ring layout version {0}, this side speaks {RING_VERSION}")]
    Version(u32),
    /// The kick or notify fd is not an eventfd.
    #[error("the {0} fd is not an eventfd")]
    NotEventFd(&'static str),
    /// A system call on the ring's fds failed.
    #[error("{op} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
}

impl RingError {
    fn io(op: &'static str) -> impl FnOnce(io::Error) -> RingError {
        move |source| RingError::Io { op, source }
    }
}

/// The slot counts of a ring, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingGeometry {
    req_slots: u32,
    resp_slots: u32,
}

impl RingGeometry {
    /// Validates the slot counts: powers of two in 2..=4096.
    pub fn new(req_slots: u32, resp_slots: u32) -> Result<RingGeometry, RingError> {
        let ok = |n: u32| n.is_power_of_two() && (MIN_SLOTS..=MAX_SLOTS).contains(&n);
        if !ok(req_slots) {
            return Err(RingError::SlotCount {
                which: "req_slots",
                value: req_slots,
            });
        }
        if !ok(resp_slots) {
            return Err(RingError::SlotCount {
                which: "resp_slots",
                value: resp_slots,
            });
        }
        Ok(RingGeometry {
            req_slots,
            resp_slots,
        })
    }

    /// Request slots.
    pub fn req_slots(&self) -> u32 {
        self.req_slots
    }

    /// Response slots.
    pub fn resp_slots(&self) -> u32 {
        self.resp_slots
    }

    /// Bytes of the memfd: header, both rings, rounded up to 4 KiB.
    pub fn size(&self) -> u64 {
        shm::page_round_up(self.resp_ring_offset() as u64 + 8 * u64::from(self.resp_slots))
    }

    fn resp_ring_offset(&self) -> usize {
        OFF_REQ_RING + sys::PGFAULT_SIZE * self.req_slots as usize
    }

    /// Byte offset of the request slot for free-running index `idx`.
    fn req_slot(&self, idx: u32) -> usize {
        OFF_REQ_RING + sys::PGFAULT_SIZE * (idx & (self.req_slots - 1)) as usize
    }

    /// Byte offset of the response slot for free-running index `idx`.
    fn resp_slot(&self, idx: u32) -> usize {
        self.resp_ring_offset() + sys::PAGE_RESPONSE_SIZE * (idx & (self.resp_slots - 1)) as usize
    }
}

/// A new ring, as the VMM creates it: hand `memfd`, `kick` and `notify` to faultd (and keep
/// duplicates for the [`RingProducer`]).
#[derive(Debug)]
pub struct RingChannel {
    /// The shared memory, header written, indices 0, sealed against resizing.
    pub memfd: OwnedFd,
    /// Producer -> faultd: requests published.
    pub kick: EventFd,
    /// faultd -> producer: responses published.
    pub notify: EventFd,
}

impl RingChannel {
    /// Creates the memfd (layout v1) and both eventfds (non-blocking, close-on-exec).
    pub fn create(req_slots: u32, resp_slots: u32) -> Result<RingChannel, RingError> {
        let geo = RingGeometry::new(req_slots, resp_slots)?;
        let memfd = shm::create_memfd("faultd-iopf-ring", geo.size())
            .map_err(RingError::io("creating the ring memfd"))?;
        let mut header = [0u8; 16];
        for (at, v) in [
            (OFF_MAGIC, RING_MAGIC),
            (OFF_VERSION, RING_VERSION),
            (OFF_REQ_SLOTS, req_slots),
            (OFF_RESP_SLOTS, resp_slots),
        ] {
            header[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        nix::sys::uio::pwrite(&memfd, &header, 0)
            .map_err(|e| RingError::Io {
                op: "writing the ring header",
                source: e.into(),
            })
            .and_then(|n| match n {
                16 => Ok(()),
                _ => Err(RingError::Io {
                    op: "writing the ring header",
                    source: io::ErrorKind::WriteZero.into(),
                }),
            })?;
        let eventfd = || {
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(|e| {
                RingError::Io {
                    op: "creating an eventfd",
                    source: e.into(),
                }
            })
        };
        Ok(RingChannel {
            memfd,
            kick: eventfd()?,
            notify: eventfd()?,
        })
    }
}

/// Opens a ring memfd from the other side: seals it against shrinking, checks header and size,
/// maps it. The geometry is read once here and never again (the other side could rewrite it).
fn open_ring(memfd: &OwnedFd) -> Result<(RingGeometry, SharedMapping), RingError> {
    shm::seal_against_shrink(memfd.as_fd()).map_err(RingError::io(
        "sealing the ring memfd against shrinking (is it a memfd?)",
    ))?;
    let actual = shm::file_size(memfd.as_fd()).map_err(RingError::io("fstat of the ring memfd"))?;
    let mut header = [0u8; 16];
    let n = nix::sys::uio::pread(memfd, &mut header, 0).map_err(|e| RingError::Io {
        op: "reading the ring header",
        source: e.into(),
    })?;
    if n < header.len() {
        return Err(RingError::Size {
            actual,
            expected: 4096,
        });
    }
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    if word(OFF_MAGIC) != RING_MAGIC {
        return Err(RingError::Magic(word(OFF_MAGIC)));
    }
    if word(OFF_VERSION) != RING_VERSION {
        return Err(RingError::Version(word(OFF_VERSION)));
    }
    let geo = RingGeometry::new(word(OFF_REQ_SLOTS), word(OFF_RESP_SLOTS))?;
    if actual != geo.size() {
        return Err(RingError::Size {
            actual,
            expected: geo.size(),
        });
    }
    // The size fits in usize: it is at most a few hundred KiB.
    let map = SharedMapping::map(memfd.as_fd(), geo.size() as usize)
        .map_err(RingError::io("mapping the ring memfd"))?;
    Ok((geo, map))
}

fn doorbell(fd: OwnedFd, which: &'static str) -> Result<Doorbell, RingError> {
    Doorbell::new(fd)
        .map_err(|source| RingError::Io {
            op: "checking an eventfd",
            source,
        })?
        .ok_or(RingError::NotEventFd(which))
}

/// What a [`RingConsumer`] has seen go wrong, for faultd's metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Records that failed validation.
    pub malformed_records: u64,
    /// [`Incoming::Malformed`] entries delivered (with or without cookie).
    pub malformed_reported: u64,
    /// Times `req_prod - req_cons` exceeded `req_slots` and faultd resynchronised.
    pub resyncs: u64,
    /// Times `resp_prod - resp_cons` exceeded `resp_slots` (responses held back).
    pub bad_response_indices: u64,
    /// Responses dropped because the backlog was full.
    pub dropped_responses: u64,
    /// Responses waiting now for room in the response ring.
    pub backlog: usize,
}

/// faultd's end of a ring: a [`FaultQueue`] for one device.
#[derive(Debug)]
pub struct RingConsumer {
    map: SharedMapping,
    geo: RingGeometry,
    kick: Doorbell,
    notify: Doorbell,
    /// faultd's own copies of the indices it owns: the shared words are only ever written.
    req_cons: u32,
    resp_prod: u32,
    assembler: GroupAssembler,
    /// Cookies delivered and not yet answered, with multiplicity (a producer may reuse one).
    awaiting: HashMap<u32, u32>,
    backlog: VecDeque<(u32, ResponseCode)>,
    stats: RingStats,
}

impl RingConsumer {
    /// Opens the ring of device `dev_id`: checks `memfd` (a sealable memfd whose size and
    /// header match layout v1) and that `kick` and `notify` are eventfds, seals the memfd
    /// against shrinking and maps it. Starts from the indices found in the header.
    pub fn new(
        memfd: OwnedFd,
        kick: OwnedFd,
        notify: OwnedFd,
        dev_id: DevId,
    ) -> Result<RingConsumer, RingError> {
        let (geo, map) = open_ring(&memfd)?;
        let kick = doorbell(kick, "kick")?;
        let notify = doorbell(notify, "notify")?;
        let req_cons = map.u32_at(OFF_REQ_CONS).load(Ordering::Acquire);
        let resp_prod = map.u32_at(OFF_RESP_PROD).load(Ordering::Acquire);
        Ok(RingConsumer {
            map,
            geo,
            kick,
            notify,
            req_cons,
            resp_prod,
            assembler: GroupAssembler::for_device(dev_id),
            awaiting: HashMap::new(),
            backlog: VecDeque::new(),
            stats: RingStats::default(),
        })
    }

    /// The validated slot counts.
    pub fn geometry(&self) -> RingGeometry {
        self.geo
    }

    /// Counters of bad input and lost answers.
    pub fn stats(&self) -> RingStats {
        RingStats {
            backlog: self.backlog.len(),
            ..self.stats
        }
    }

    fn word(&self, offset: usize) -> &AtomicU32 {
        self.map.u32_at(offset)
    }

    /// Moves held-back responses into the ring as far as it has room, then notifies once.
    fn flush(&mut self) -> io::Result<()> {
        if self.backlog.is_empty() {
            return Ok(());
        }
        let cons = self.word(OFF_RESP_CONS).load(Ordering::Acquire);
        let used = self.resp_prod.wrapping_sub(cons);
        if used > self.geo.resp_slots {
            // The producer claims to have consumed responses never published: hold them
            // until its index makes sense again (or the backlog overflows).
            self.stats.bad_response_indices += 1;
            return Ok(());
        }
        let room = (self.geo.resp_slots - used) as usize;
        let n = room.min(self.backlog.len());
        for (cookie, code) in self.backlog.drain(..n) {
            let slot = self.geo.resp_slot(self.resp_prod);
            self.map.write(
                slot,
                iommu_hwpt_page_response {
                    cookie,
                    code: code.raw(),
                },
            );
            self.resp_prod = self.resp_prod.wrapping_add(1);
        }
        if n > 0 {
            self.word(OFF_RESP_PROD)
                .store(self.resp_prod, Ordering::Release);
            self.notify.ring()?;
        }
        Ok(())
    }
}

impl FaultQueue for RingConsumer {
    fn read(&mut self, out: &mut Vec<Incoming>) -> io::Result<()> {
        // Drain first: a kick for records published after the index load below stays set.
        self.kick.drain()?;
        // A kick may also mean the producer freed response slots.
        self.flush()?;
        let start = out.len();
        let prod = self.word(OFF_REQ_PROD).load(Ordering::Acquire);
        let avail = prod.wrapping_sub(self.req_cons);
        if avail > self.geo.req_slots {
            self.stats.resyncs += 1;
            self.assembler.abandon(REASON_RESYNC, out);
        } else {
            // At most req_slots records: a flood cannot hold faultd here longer than that.
            for i in 0..avail {
                let slot = self.geo.req_slot(self.req_cons.wrapping_add(i));
                let rec: iommu_hwpt_pgfault = self.map.read(slot);
                if self.assembler.push(&rec, out).is_err() {
                    self.stats.malformed_records += 1;
                }
            }
        }
        self.req_cons = prod;
        self.word(OFF_REQ_CONS).store(prod, Ordering::Release);
        for entry in &out[start..] {
            let cookie = match entry {
                Incoming::Group(g) => Some(g.cookie),
                Incoming::Malformed { cookie, .. } => {
                    self.stats.malformed_reported += 1;
                    *cookie
                }
            };
            if let Some(cookie) = cookie {
                *self.awaiting.entry(cookie).or_insert(0) += 1;
            }
        }
        Ok(())
    }

    fn respond(&mut self, cookie: u32, code: ResponseCode) -> Result<(), RespondError> {
        match self.awaiting.entry(cookie) {
            Entry::Vacant(_) => return Err(RespondError::UnknownCookie(cookie)),
            Entry::Occupied(mut e) => {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
        if self.backlog.len() >= RESPONSE_BACKLOG {
            self.flush().map_err(RespondError::Io)?;
        }
        if self.backlog.len() >= RESPONSE_BACKLOG {
            self.stats.dropped_responses += 1;
            return Err(RespondError::QueueFull);
        }
        self.backlog.push_back((cookie, code));
        self.flush().map_err(RespondError::Io)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.kick.fd()
    }
}

/// Why a group was not posted.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    /// A group needs at least one page.
    #[error("empty page request group")]
    EmptyGroup,
    /// More pages than one group or the whole ring can hold.
    #[error("group of {pages} pages exceeds the limit of {max}")]
    TooLarge {
        /// Pages in the group.
        pages: usize,
        /// The limit (512, or req_slots if smaller).
        max: usize,
    },
    /// A page or the group index would make an invalid record.
    #[error("invalid page request")]
    Invalid(#[from] RecordError),
    /// Not enough free request slots now: wait for faultd to consume.
    #[error("ring full: {needed} slots needed, {free} free")]
    Full {
        /// Slots the group needs.
        needed: usize,
        /// Slots free.
        free: usize,
    },
    /// faultd's request slots index is impossible.
    #[error("faultd's consumer index is inconsistent")]
    BadIndex,
    /// Writing the kick eventfd failed (the group is published).
    #[error("kicking faultd failed")]
    Kick(#[source] io::Error),
}

/// The device's end of a ring (VMM side): posts page request groups, collects answers.
#[derive(Debug)]
pub struct RingProducer {
    map: SharedMapping,
    geo: RingGeometry,
    kick: Doorbell,
    notify: Doorbell,
    req_prod: u32,
    resp_cons: u32,
    next_cookie: u32,
}

impl RingProducer {
    /// Opens the ring memfd (validated like the consumer does) with the eventfds.
    pub fn new(memfd: OwnedFd, kick: OwnedFd, notify: OwnedFd) -> Result<RingProducer, RingError> {
        let (geo, map) = open_ring(&memfd)?;
        let kick = doorbell(kick, "kick")?;
        let notify = doorbell(notify, "notify")?;
        let req_prod = map.u32_at(OFF_REQ_PROD).load(Ordering::Acquire);
        let resp_cons = map.u32_at(OFF_RESP_CONS).load(Ordering::Acquire);
        Ok(RingProducer {
            map,
            geo,
            kick,
            notify,
            req_prod,
            resp_cons,
            next_cookie: 1,
        })
    }

    /// The validated slot counts.
    pub fn geometry(&self) -> RingGeometry {
        self.geo
    }

    /// The fd faultd writes after publishing responses: poll it, then [`Self::poll_responses`].
    pub fn notify_fd(&self) -> BorrowedFd<'_> {
        self.notify.fd()
    }

    /// Publishes one group (no PASID) and kicks faultd. Returns the cookie its answer will
    /// carry. Fails without publishing anything if the ring lacks room for the whole group.
    pub fn post_group(
        &mut self,
        dev_id: DevId,
        grpid: u32,
        pages: &[(Iova, Perm)],
    ) -> Result<u32, PostError> {
        let max = MAX_GROUP_PAGES.min(self.geo.req_slots as usize);
        if pages.is_empty() {
            return Err(PostError::EmptyGroup);
        }
        if pages.len() > max {
            return Err(PostError::TooLarge {
                pages: pages.len(),
                max,
            });
        }
        let cons = self.map.u32_at(OFF_REQ_CONS).load(Ordering::Acquire);
        let used = self.req_prod.wrapping_sub(cons);
        if used > self.geo.req_slots {
            return Err(PostError::BadIndex);
        }
        let free = (self.geo.req_slots - used) as usize;
        if pages.len() > free {
            return Err(PostError::Full {
                needed: pages.len(),
                free,
            });
        }
        let cookie = self.next_cookie;
        let records = pages
            .iter()
            .enumerate()
            .map(|(i, &(addr, perm))| {
                let req = PageRequest {
                    dev_id,
                    pasid: None,
                    grpid,
                    perm,
                    addr,
                    last: i + 1 == pages.len(),
                    cookie,
                };
                // Check what faultd will check, so a bad page fails here, not as INVALID.
                PageRequest::from_raw(&req.to_raw()).map(|r| r.to_raw())
            })
            .collect::<Result<Vec<_>, _>>()?;
        for rec in records {
            self.map.write(self.geo.req_slot(self.req_prod), rec);
            self.req_prod = self.req_prod.wrapping_add(1);
        }
        self.map
            .u32_at(OFF_REQ_PROD)
            .store(self.req_prod, Ordering::Release);
        self.next_cookie = self.next_cookie.checked_add(1).unwrap_or(1);
        self.kick.ring().map_err(PostError::Kick)?;
        Ok(cookie)
    }

    /// Appends every published answer as `(cookie, code)`; a code other than SUCCESS reads as
    /// INVALID (the device must not retry on something it does not understand). If the
    /// response ring was full, kicks faultd: it may be holding answers back for lack of room.
    pub fn poll_responses(&mut self, out: &mut Vec<(u32, ResponseCode)>) -> io::Result<()> {
        self.notify.drain()?;
        let prod = self.map.u32_at(OFF_RESP_PROD).load(Ordering::Acquire);
        let avail = prod.wrapping_sub(self.resp_cons);
        if avail > self.geo.resp_slots {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "faultd's response index is inconsistent",
            ));
        }
        for i in 0..avail {
            let resp: iommu_hwpt_page_response = self
                .map
                .read(self.geo.resp_slot(self.resp_cons.wrapping_add(i)));
            let code = ResponseCode::from_raw(resp.code).unwrap_or(ResponseCode::Invalid);
            out.push((resp.cookie, code));
        }
        self.resp_cons = prod;
        self.map
            .u32_at(OFF_RESP_CONS)
            .store(self.resp_cons, Ordering::Release);
        if avail == self.geo.resp_slots {
            self.kick.ring()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
