//! Raw device-fault handlers: the least a process can do to serve page-request groups from an
//! eventfd ring (`docs/device-faults.md`) on 4 KiB memfd guest RAM, as baselines for faultd in
//! the device round-trip benchmark (`benches/device_roundtrip.rs`).
//!
//! A handler owns a [`RingConsumer`], an [`EmulatedIommu`] and a duplicate of the RAM's uffd,
//! and serves them on one OS thread. Per group: for each page's granule (once per run of pages
//! in the same granule), `UFFDIO_ZEROPAGE` over the whole granule at the VMM's address (the
//! install faultd does, one ioctl per granule where faultd issues one per page), then
//! [`EmulatedIommu::map`] of the granule, then one SUCCESS answer. No layout, no s2map, no
//! permission checks, no deadline: an address outside the RAM is answered INVALID, nothing
//! else is looked at. The two kinds differ only in how the thread waits for requests:
//!
//! - [`RingKind::Blocking`]: sleeps in poll(2) on the kick eventfd, then `RingConsumer::read`;
//! - [`RingKind::Polling`]: never sleeps: calls `RingConsumer::read` in a tight loop (burns a
//!   core; every call also drains the kick eventfd, one syscall, as the consumer does).
//!
//! Also here: [`DeviceChannel`], a device's ring and IOMMU table made the way a VMM makes them,
//! handing out the producer end, the consumer end, the IOMMU and the fds faultd takes. The
//! serving thread, its stop signal and its CPU time are [`crate::bench`]'s, shared with the
//! uffd handlers of [`crate::raw`].

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::raw::c_void;
use std::time::Instant;

use faultd_client::{DeviceIommu, DeviceQueue, GuestRam};
use iopf::emulated::{EmulatedIommu, EmulatedTable, IommuView};
use iopf::ring::{RingChannel, RingConsumer, RingProducer};
use iopf::{
    DevId, FaultQueue, Group, Incoming, Iova, MapError, MapTarget, Mapper, RespondError,
    ResponseCode,
};
use userfaultfd::Uffd;

use crate::bench::{dup_uffd, ServingThread, Stop};
use crate::raw::PAGE;

/// A device's ring and emulated IOMMU table, created as a VMM creates them (IOVA == GPA, the
/// table covering `[0, ram_size)`, one device worker).
#[derive(Debug)]
pub struct DeviceChannel {
    ring: RingChannel,
    table: OwnedFd,
    granule: u64,
}

impl DeviceChannel {
    /// A ring of `slots` request and response slots and a table of `1 << granule_shift`-byte
    /// granules over `ram_size` bytes of guest RAM (a multiple of the granule).
    pub fn create(ram_size: u64, granule_shift: u32, slots: u32) -> io::Result<DeviceChannel> {
        let granule = 1u64 << granule_shift;
        if ram_size == 0 || !ram_size.is_multiple_of(granule) {
            return Err(io::Error::other(format!(
                "RAM size {ram_size:#x} is not a non-zero multiple of the granule {granule:#x}"
            )));
        }
        let ring = RingChannel::create(slots, slots).map_err(io::Error::other)?;
        let table = EmulatedTable::create(granule_shift, 1, Iova(0), ram_size / granule)
            .map_err(io::Error::other)?;
        Ok(DeviceChannel {
            ring,
            table,
            granule,
        })
    }

    /// Bytes per IOMMU granule.
    pub fn granule(&self) -> u64 {
        self.granule
    }

    /// The device's end of the ring (on duplicates of the fds).
    pub fn producer(&self) -> io::Result<RingProducer> {
        let (ring, kick, notify) = self.dup_ring()?;
        RingProducer::new(ring, kick, notify).map_err(io::Error::other)
    }

    /// The handler's end of the ring for device `dev_id` (on duplicates of the fds).
    pub fn consumer(&self, dev_id: DevId) -> io::Result<RingConsumer> {
        let (ring, kick, notify) = self.dup_ring()?;
        RingConsumer::new(ring, kick, notify, dev_id).map_err(io::Error::other)
    }

    /// The handler's end of the IOMMU table.
    pub fn iommu(&self) -> io::Result<EmulatedIommu> {
        EmulatedIommu::from_fd(self.table.try_clone()?).map_err(io::Error::other)
    }

    /// The device's end of the IOMMU table (to check what was mapped).
    pub fn view(&self) -> io::Result<IommuView> {
        IommuView::from_fd(self.table.try_clone()?).map_err(io::Error::other)
    }

    /// The ring's fds as `Session::add_device` takes them.
    pub fn queue(&self) -> DeviceQueue<'_> {
        DeviceQueue::Ring {
            ring: self.ring.memfd.as_fd(),
            kick: self.ring.kick.as_fd(),
            notify: self.ring.notify.as_fd(),
        }
    }

    /// The table's fd as `Session::add_device` takes it.
    pub fn table(&self) -> DeviceIommu<'_> {
        DeviceIommu::Emulated {
            table: self.table.as_fd(),
        }
    }

    fn dup_ring(&self) -> io::Result<(OwnedFd, OwnedFd, OwnedFd)> {
        Ok((
            self.ring.memfd.try_clone()?,
            self.ring.kick.as_fd().try_clone_to_owned()?,
            self.ring.notify.as_fd().try_clone_to_owned()?,
        ))
    }
}

/// How a raw ring handler waits for page requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingKind {
    /// poll(2) on the kick eventfd until readable, read, serve, repeat.
    Blocking,
    /// `RingConsumer::read` in a tight loop; never sleeps.
    Polling,
}

impl RingKind {
    /// Short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            RingKind::Blocking => "raw-blocking",
            RingKind::Polling => "raw-polling",
        }
    }
}

/// What a raw ring handler did, returned when it stops.
#[derive(Debug, Default)]
pub struct RingHandlerStats {
    /// Groups answered SUCCESS.
    pub success: u64,
    /// Groups (and malformed entries with a cookie) answered INVALID.
    pub invalid: u64,
    /// Pages in the groups answered.
    pub pages: u64,
    /// Per answered group: ns from `RingConsumer::read` returning it to its answer published
    /// (the span faultd's own device service time covers).
    pub service_ns: Vec<u64>,
}

/// The guest RAM a handler installs into: the VMM's mapping (IOVA == GPA == offset in it).
#[derive(Debug)]
struct RamTarget {
    uffd: Uffd,
    host: u64,
    size: u64,
    memfd: OwnedFd,
}

/// A raw handler serving one device ring on its own thread; [`RingHandler::stop`] ends it.
#[derive(Debug)]
pub struct RingHandler {
    kind: RingKind,
    thread: ServingThread<RingHandlerStats>,
}

impl RingHandler {
    /// Starts a `kind` handler answering `queue`, mapping into `iommu`, installing pages of
    /// `ram` through a duplicate of `uffd` (the uffd `ram` is registered with). Returns once the
    /// thread runs and knows its tid. `ram` must outlive the handler for installs to succeed
    /// (after it is unmapped they fail, which ends the handler with an error).
    pub fn spawn(
        kind: RingKind,
        queue: RingConsumer,
        iommu: EmulatedIommu,
        uffd: &Uffd,
        ram: &GuestRam,
    ) -> io::Result<RingHandler> {
        let target = RamTarget {
            uffd: dup_uffd(uffd)?,
            host: ram.host_addr(),
            size: ram.size(),
            memfd: ram.memfd().try_clone_to_owned()?,
        };
        let name = format!("ring-{}", kind.name());
        let thread = ServingThread::spawn(name, "ring handler", move |stop| {
            let mut server = Server {
                queue,
                iommu,
                ram: target,
                incoming: Vec::with_capacity(64),
                stats: RingHandlerStats {
                    // Sized up front so a reallocation never lands inside a measurement.
                    service_ns: Vec::with_capacity(1 << 16),
                    ..RingHandlerStats::default()
                },
            };
            match kind {
                RingKind::Blocking => server.run_blocking(stop),
                RingKind::Polling => server.run_polling(stop),
            }?;
            Ok(server.stats)
        })?;
        Ok(RingHandler { kind, thread })
    }

    /// Which handler this is.
    pub fn kind(&self) -> RingKind {
        self.kind
    }

    /// Kernel thread id of the serving thread (for its schedstat).
    pub fn tid(&self) -> i32 {
        self.thread.tid()
    }

    /// CPU time the serving thread has used, in ns.
    pub fn cpu_ns(&self) -> io::Result<u64> {
        self.thread.cpu_ns()
    }

    /// Stops the thread and returns what it did, or the error that ended it. (Dropping the
    /// handler stops it too.)
    pub fn stop(self) -> io::Result<RingHandlerStats> {
        self.thread.stop()
    }
}

/// The serving thread's state.
struct Server {
    queue: RingConsumer,
    iommu: EmulatedIommu,
    ram: RamTarget,
    incoming: Vec<Incoming>,
    stats: RingHandlerStats,
}

impl Server {
    fn run_blocking(&mut self, stop: &Stop) -> io::Result<()> {
        while stop.wait(self.queue.fd())? {
            // One read per wake-up; a spurious one reads nothing.
            self.read_and_serve()?;
        }
        Ok(())
    }

    fn run_polling(&mut self, stop: &Stop) -> io::Result<()> {
        while !stop.requested() {
            self.read_and_serve()?;
        }
        Ok(())
    }

    fn read_and_serve(&mut self) -> io::Result<()> {
        self.incoming.clear();
        self.queue.read(&mut self.incoming)?;
        if self.incoming.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        let incoming = std::mem::take(&mut self.incoming);
        for item in &incoming {
            let (cookie, code) = match item {
                Incoming::Group(g) => {
                    self.stats.pages += g.pages.len() as u64;
                    (g.cookie, self.resolve(g)?)
                }
                Incoming::Malformed {
                    cookie: Some(cookie),
                    ..
                } => (*cookie, ResponseCode::Invalid),
                Incoming::Malformed { cookie: None, .. } => continue,
            };
            match self.queue.respond(cookie, code) {
                Ok(()) => {}
                Err(RespondError::Io(e)) => return Err(e),
                Err(e) => return Err(io::Error::other(e)),
            }
            match code {
                ResponseCode::Success => self.stats.success += 1,
                ResponseCode::Invalid => self.stats.invalid += 1,
            }
            self.stats.service_ns.push(t0.elapsed().as_nanos() as u64);
        }
        self.incoming = incoming;
        Ok(())
    }

    /// Installs and maps every granule the group touches. INVALID for an address outside the
    /// RAM; an install or map failure is an error that ends the handler (the bench asserts on
    /// it), not an answer.
    fn resolve(&mut self, group: &Group) -> io::Result<ResponseCode> {
        let granule = self.iommu.granule();
        let mut last = None;
        for &(iova, _perm) in &group.pages {
            let start = iova.0 & !(granule - 1);
            // Consecutive pages of one granule: it was just installed and mapped.
            if last == Some(start) {
                continue;
            }
            last = Some(start);
            if start
                .checked_add(granule)
                .is_none_or(|end| end > self.ram.size)
            {
                return Ok(ResponseCode::Invalid);
            }
            self.zero(start, granule)?;
            let target = MapTarget {
                va: self.ram.host + start,
                fd: self.ram.memfd.as_fd(),
                offset: start,
            };
            match self.iommu.map(Iova(start), granule, target, true) {
                Ok(()) | Err(MapError::Exists) => {}
                Err(e) => return Err(io::Error::other(e)),
            }
        }
        Ok(ResponseCode::Success)
    }

    /// `UFFDIO_ZEROPAGE` of `[off, off+len)` of the RAM in one ioctl; if some page of it is
    /// already present (EEXIST), page by page, skipping present pages.
    fn zero(&self, off: u64, len: u64) -> io::Result<()> {
        match self.zeropage(off, len) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && len > PAGE as u64 => {
                for p in (off..off + len).step_by(PAGE) {
                    match self.zeropage(p, PAGE as u64) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn zeropage(&self, off: u64, len: u64) -> io::Result<()> {
        let at = (self.ram.host + off) as *mut c_void;
        // SAFETY: `[at, at+len)` lies inside the RAM's registered mapping (the caller checked
        // `off + len <= size`); the kernel checks the range against the uffd's registration
        // anyway, and no Rust reference points into guest RAM.
        let zeroed = unsafe { self.ram.uffd.zeropage(at, len as usize, true) };
        match zeroed {
            Ok(_) => Ok(()),
            Err(userfaultfd::Error::ZeropageFailed(e)) => {
                Err(io::Error::from_raw_os_error(e as i32))
            }
            Err(e) => Err(io::Error::other(e)),
        }
    }
}
