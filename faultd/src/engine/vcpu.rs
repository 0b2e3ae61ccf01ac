//! vCPU faults, end to end: a vCPU (or the VMM, or KVM on its behalf) touches an absent page of
//! guest RAM; the kernel blocks that thread and queues a MISSING event on the VMM's userfaultfd,
//! which faultd holds. The session's fault thread reads it ([`UffdOps::read_events`]), maps the
//! address to a page ([`Session::locate`]), asks s2map whether to resolve it
//! ([`s2map::S2Map::begin_fault`]: coalesces with a resolution already in flight), fills it from
//! its backing with `UFFDIO_ZEROPAGE` or `UFFDIO_COPY` (the kernel installs the page in the memfd
//! and wakes every thread blocked on it), and tells s2map it is resident ([`FaultServer::install`]).
//! Layout events (REMOVE, UNMAP) are read here too: they come on the same fd.
//!
//! [`Session::locate`]: crate::engine::session::Session::locate

use super::{outcome_of, FaultServer, InstallFail};
use crate::engine::session::{Counters, Hva};
use crate::engine::store::Record;
use crate::kernel::uffd::{UffdEvent, UffdOps};
use crate::ops::metrics::{FaultOutcome, Source};
use s2map::Begin;
use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

impl<O: UffdOps> FaultServer<O> {
    pub(super) fn serve_uffd(&mut self) -> io::Result<usize> {
        self.events.clear();
        self.ops.read_events(&mut self.events, self.batch)?;
        let t0 = Instant::now();
        let mut events = std::mem::take(&mut self.events);
        // Layout events first: a fault read in the same batch must see the discard, and every
        // ioctl fails EAGAIN while one is unread anyway.
        for ev in &events {
            self.handle_layout_event(*ev);
        }
        let retries = std::mem::take(&mut self.retries);
        let handled = events.len() + retries.len();
        let faults = events
            .iter()
            .filter(|e| matches!(e, UffdEvent::Fault { .. }))
            .count();
        self.metrics.vcpu_in_flight.set(retries.len() + faults);
        for addr in retries {
            self.handle_fault(addr, t0);
        }
        for ev in &events {
            if let UffdEvent::Fault { addr } = *ev {
                Counters::bump(&self.session.counters.vcpu_faults);
                self.handle_fault(addr, t0);
            }
        }
        events.clear();
        self.events = events;
        self.metrics.vcpu_in_flight.set(self.retries.len());
        Ok(handled)
    }

    /// Whether work is waiting for a retry (uffd EAGAIN, device groups not yet resolved).
    pub fn has_retries(&self) -> bool {
        !self.retries.is_empty()
            || self
                .devices
                .iter()
                .any(|d| !d.quarantined && !d.pending.is_empty())
    }

    pub(super) fn handle_layout_event(&mut self, ev: UffdEvent) {
        match ev {
            UffdEvent::Remove { start, end } => {
                for (gpa, len) in self.session.hva_range_to_gpa(start, end) {
                    // A device must lose its mapping before the page goes (the kernel zaps it
                    // once this event has been read).
                    self.unmap_devices_in(gpa, len);
                    let discarded = self.session.map().discard(gpa, len);
                    // The pages read zero from now on, whatever their backing: a restarted
                    // faultd must know (the journal's last word on them).
                    self.journal(Record::Zero { gpa: gpa.0, len });
                    let c = &self.session.counters;
                    c.discarded_pages
                        .fetch_add(discarded.resident_pages, Ordering::Relaxed);
                    c.discarded_bytes
                        .fetch_add(discarded.resident_bytes, Ordering::Relaxed);
                    if let Some(store) = &mut self.store {
                        discarded
                            .freed_slots
                            .iter()
                            .for_each(|&slot| store.free(slot));
                    }
                    for (dev, g) in discarded.dropped_mappings {
                        self.error(format_args!(
                            "{g:?} of device {} was still mapped at discard",
                            dev.0
                        ));
                    }
                }
            }
            UffdEvent::Unmap { start, end } => {
                // The memfd keeps the pages; only the VMM's view is gone, and faults cannot come
                // from an unmapped range. Nothing in s2map changes.
                tracing::debug!(
                    session = self.session.id(),
                    start = start.0,
                    end = end.0,
                    "VMM unmapped a range"
                );
            }
            UffdEvent::Ignored(what) => {
                tracing::debug!(session = self.session.id(), what, "ignored uffd event");
            }
            UffdEvent::Fault { .. } => {}
        }
    }

    pub(super) fn handle_fault(&mut self, addr: Hva, t0: Instant) {
        let Some(at) = self.session.locate(addr) else {
            // The kernel reports only registered ranges, so the VMM registered more than it
            // declared. Leave that thread blocked (its memory is not ours to fill) and say so.
            self.error(format_args!(
                "fault at {:#x} outside every declared region",
                addr.0
            ));
            self.metrics
                .observe(Source::Vcpu, FaultOutcome::Invalid, t0.elapsed());
            return;
        };
        let begin = self.session.map().begin_fault(at.page, None);
        match begin {
            Begin::Present => {
                // A duplicate event (several threads faulted before the install). Waking is
                // enough: the page is in the memfd.
                Counters::bump(&self.session.counters.already_present);
                if let Err(e) = self.ops.wake(at.hva, at.size) {
                    self.error(format_args!("wake at {:#x}: {e}", at.hva.0));
                }
                self.metrics
                    .observe(Source::Vcpu, FaultOutcome::Present, t0.elapsed());
            }
            Begin::Joined => {
                // Another source is installing it; the install wakes this thread too.
            }
            // Evictions finish before this thread reads events, so this is not seen; if it
            // were, the fault is retried once the eviction is done.
            Begin::Evicting => self.retries.push(at.hva),
            Begin::Resolve(fill) => match self.install(at, fill) {
                Ok(()) => {
                    let took = t0.elapsed();
                    self.session
                        .record_latency(took.as_nanos().min(u64::MAX as u128) as u64);
                    self.metrics.observe(Source::Vcpu, outcome_of(fill), took);
                    // The faulting thread is running already (the install woke it).
                    self.around_vcpu(at.page);
                }
                Err(InstallFail::Retry) => self.retries.push(at.hva),
                // The page's object chunk is being fetched: the thread stays blocked, and is
                // served again when the chunk lands (see `objects`).
                Err(InstallFail::Deferred { chunk }) => {
                    if let Some(o) = &mut self.object {
                        o.defer(chunk, at.hva);
                    }
                }
                // Stale: the page was discarded meanwhile; the thread re-faults if it still
                // needs it.
                Err(InstallFail::Stale) => {}
                // Failed: logged and counted; the thread stays blocked.
                Err(InstallFail::Failed) => {
                    self.metrics
                        .observe(Source::Vcpu, FaultOutcome::Invalid, t0.elapsed())
                }
            },
        }
    }
}
