//! The fault thread: one OS thread per VM that drives [`FaultServer`], the commands the control
//! plane hands it, and the standby thread a Firecracker socket keeps ready.

use super::{pageout, EvictReport, FaultServer, ReadFirst, SpinPolicy};
use crate::engine::device::Device;
use crate::kernel::uffd::UffdOps;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Work handed to the session thread by the control plane.
#[derive(Debug)]
pub enum Command {
    /// Attach a device.
    AddDevice(Device),
    /// Attach a device in pinned mode: make `ranges` resident and map them first, in slices
    /// between faults, then report (see [`crate::engine::pinned`]).
    PinDevice {
        /// The device (built with [`Device::pinned`]).
        device: Device,
        /// The DMA-able ranges, validated against the layout and aligned to its granule.
        ranges: Vec<(s2map::Gpa, u64)>,
        /// Where the outcome goes: the bytes mapped, or why nothing was.
        reply: std::sync::mpsc::Sender<Result<u64, super::pinned::PinError>>,
    },
    /// Detach device `dev_id`: answer its pending groups INVALID, unmap and unpin everything
    /// it maps, and report the bytes unmapped (None: no such device).
    RemoveDevice {
        /// The device id.
        dev_id: u32,
        /// Where the report goes.
        reply: std::sync::mpsc::Sender<Option<u64>>,
    },
    /// Evict the resident pages of `[gpa, gpa+len)` (at most `max` of them), and report.
    Evict {
        /// Start of the range.
        gpa: s2map::Gpa,
        /// Bytes.
        len: u64,
        /// Most pages to evict.
        max: u64,
        /// Where the report goes.
        reply: std::sync::mpsc::Sender<EvictReport>,
    },
    /// Evict `pages` resident pages chosen as budget enforcement chooses them (oldest
    /// installed first, device-mapped ones last), and report. An operator's request.
    EvictOldest {
        /// Pages to evict.
        pages: u64,
        /// Where the report goes.
        reply: std::sync::mpsc::Sender<EvictReport>,
    },
    /// Fill every page whose bytes only faultd has (snapshot, store), stop evicting, and
    /// report: the VMM is about to end the session and close its uffd.
    Finish {
        /// Where the report goes.
        reply: std::sync::mpsc::Sender<super::FinishReport>,
    },
}

/// A running fault thread; [`FaultThread::stop`] ends it.
#[derive(Debug)]
pub struct FaultThread {
    ctl: Arc<Control>,
    commands: Sender<Command>,
    handle: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Control {
    stop: AtomicBool,
    /// Set with `stop` when faultd stops but the VM does not: finish the device groups
    /// outstanding (for at most this long) and keep the store for a resume.
    handover: std::sync::Mutex<Option<Duration>>,
    /// Wakes the thread from poll(2): to stop, or to pick up a new device.
    event: EventFd,
}

impl FaultThread {
    /// Starts serving `server` on a new thread named after the session, spinning for `spin`
    /// after each burst of work before sleeping.
    pub fn spawn<O: UffdOps + Send + 'static>(
        mut server: FaultServer<O>,
        spin: Duration,
    ) -> io::Result<FaultThread> {
        let ctl = Arc::new(Control {
            stop: AtomicBool::new(false),
            handover: std::sync::Mutex::new(None),
            event: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
        });
        let (tx, rx) = std::sync::mpsc::channel();
        server.new_devices = Some(rx);
        let name = format!("faultd-s{}", server.session.id());
        let c = ctl.clone();
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(server, spin, &c))?;
        Ok(FaultThread {
            ctl,
            commands: tx,
            handle: Some(handle),
        })
    }

    /// Hands a command to the thread; it runs at the thread's next wake-up, between faults.
    pub fn send(&self, command: Command) -> Result<(), Command> {
        self.commands.send(command).map_err(|e| e.0)?;
        let _ = self.ctl.event.write(1);
        Ok(())
    }

    /// A handle that hands commands to this thread from elsewhere (an operator's connection).
    pub fn commander(&self) -> Commander {
        Commander {
            ctl: self.ctl.clone(),
            commands: self.commands.clone(),
        }
    }

    /// Stops the thread and waits for it: the VM is gone. Outstanding device groups are
    /// answered and device mappings removed before it returns; the store is deleted.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    /// Stops the thread and waits for it while the VM lives on (faultd is stopping, or closed
    /// the session): for up to `drain`, outstanding device groups and faults are still served,
    /// then what is left is answered INVALID, device mappings are removed, and the store is
    /// kept (and synced) for the VMM to resume with.
    pub fn hand_over(mut self, drain: Duration) {
        *self.ctl.handover.lock().unwrap_or_else(|p| p.into_inner()) = Some(drain);
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.ctl.stop.store(true, Ordering::Release);
        let _ = self.ctl.event.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Hands commands to a fault thread without owning it: operator requests reach a session from
/// a connection other than the one that owns its [`FaultThread`]. Once the thread has ended,
/// sending fails.
#[derive(Debug, Clone)]
pub struct Commander {
    ctl: Arc<Control>,
    commands: Sender<Command>,
}

impl Commander {
    /// As [`FaultThread::send`].
    pub fn send(&self, command: Command) -> Result<(), Command> {
        self.commands.send(command).map_err(|e| e.0)?;
        let _ = self.ctl.event.write(1);
        Ok(())
    }
}

impl Drop for FaultThread {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// What a standby thread runs first: builds the server of the session it will serve (None:
/// there is none, e.g. the request was refused, and the thread ends).
pub type StandbyJob<O> = Box<dyn FnOnce() -> Option<FaultServer<O>> + Send>;

/// A fault thread created before its session exists, parked until it is given one.
///
/// Creating a thread costs tens to hundreds of microseconds here; a Firecracker restore waits
/// for its first pages from the moment it sends its message. So a Firecracker socket keeps one
/// standby thread, and the thread itself validates the message and starts serving: the
/// restore's first fault waits for one wake-up, not a thread creation and a hand-off.
#[derive(Debug)]
pub struct StandbyThread<O> {
    job: Sender<StandbyJob<O>>,
    ctl: Arc<Control>,
    commands: Sender<Command>,
    handle: Option<JoinHandle<()>>,
}

impl<O: UffdOps + Send + 'static> StandbyThread<O> {
    /// Creates the thread, named `name`; it will spin for `spin` after bursts of work.
    pub fn new(name: String, spin: Duration) -> io::Result<StandbyThread<O>> {
        let ctl = Arc::new(Control {
            stop: AtomicBool::new(false),
            handover: std::sync::Mutex::new(None),
            event: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
        });
        let (job_tx, job_rx) = std::sync::mpsc::channel::<StandbyJob<O>>();
        let (cmd_tx, cmd_rx) = std::sync::mpsc::channel();
        let c = ctl.clone();
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            // Sender dropped (the socket closed) or no session: nothing to serve.
            let Some(mut server) = job_rx.recv().ok().and_then(|job| job()) else {
                return;
            };
            server.new_devices = Some(cmd_rx);
            run(server, spin, &c);
        })?;
        Ok(StandbyThread {
            job: job_tx,
            ctl,
            commands: cmd_tx,
            handle: Some(handle),
        })
    }

    /// Wakes the thread to run `job` and then serve the server it builds, if any. (An unused
    /// standby is just dropped: its job channel closes and the parked thread ends.)
    pub fn start(self, job: StandbyJob<O>) -> FaultThread {
        let StandbyThread {
            job: jobs,
            ctl,
            commands,
            handle,
        } = self;
        // A send fails only if the thread is gone (it panicked): the FaultThread joins it.
        let _ = jobs.send(job);
        FaultThread {
            ctl,
            commands,
            handle,
        }
    }
}

/// Involuntary context switches of the calling thread so far: one more means another thread
/// took this thread's CPU (in the spin: the faulter it woke, or anything else runnable here).
fn preemptions() -> i64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_THREAD).map_or(0, |u| u.involuntary_context_switches())
}

/// The adaptive polling loop: serve while work comes, spin for the [`SpinPolicy`] window after
/// the last of it, then sleep in poll(2) on the uffd, the device queues and the control eventfd.
fn run<O: UffdOps>(mut server: FaultServer<O>, spin: Duration, ctl: &Arc<Control>) {
    server.session.watch.register_current_thread();
    let t0 = Instant::now();
    if let Some(r) = server.resume() {
        tracing::info!(
            session = server.session.id(),
            vm = server.session.vm(),
            present = r.present,
            stored = r.stored,
            zeroed = r.zeroed,
            unknown_records = r.unknown,
            took_us = t0.elapsed().as_micros() as u64,
            "resumed: page state rebuilt from guest memory and the store journal, waiters woken"
        );
    }
    // A recording to replay is looked for at once, on a loader thread that wakes this one when
    // it has it; faults are served meanwhile.
    let wake = ctl.clone();
    server.ws.waker = Some(Arc::new(move || {
        let _ = wake.event.write(1);
    }));
    server.ws_start();
    let mut policy = SpinPolicy::new(spin);
    let mut last_work = Instant::now();
    let mut window = policy.window();
    // Whether the last iteration found work: a gap is measured from the end of a burst.
    let mut in_burst = false;
    // While spinning: the thread's involuntary context switches when the spin began (to tell
    // whether the spin paid, see SpinPolicy).
    let mut spinning: Option<i64> = None;
    let mut reads = ReadFirst::default();
    // Whether this pass reads the uffd right after work instead of polling first.
    let mut reading_first = false;
    let mut passes = 0u64;
    while !ctl.stop.load(Ordering::Acquire) {
        passes += 1;
        server.session.watch.busy(passes);
        match server.serve_ready() {
            Ok(0) if !server.has_retries() => {
                if std::mem::take(&mut reading_first) {
                    reads.record(false);
                }
                in_burst = false;
                // Nothing pending: a slice of working-set replay, then the sources again.
                if server.prefetch_slice() {
                    continue;
                }
            }
            Ok(_) => {
                if std::mem::take(&mut reading_first) {
                    reads.record(true);
                }
                let now = Instant::now();
                if !in_burst {
                    if let Some(at_start) = spinning.take() {
                        // Work came within the window; it paid only if this thread held its
                        // CPU throughout (read after serving: off the fault's path).
                        policy.record_spin(preemptions() == at_start);
                    }
                    policy.record_gap(now - last_work);
                    window = policy.next_window();
                    in_burst = true;
                }
                last_work = now;
                if !window.is_zero() || server.has_retries() {
                    continue;
                }
                // No spin after this burst: read again first only where that finds work (see
                // ReadFirst), else sleep in poll(2) at once.
                in_burst = false;
                // But never with replay left to do: it runs only in a pass that finds nothing
                // pending, and a guest done faulting would leave it asleep halfway for good.
                if server.ws_replaying() {
                    continue;
                }
                // Nor with a pinned attach half done: its slices run only in passes, and no fd
                // wakes the thread for them (a VMM attaching a device after a quiet spell found
                // the thread asleep after the first slice, its `add_device` never answered).
                if server.pin_pending() {
                    continue;
                }
                if reads.read_first() {
                    reading_first = true;
                    continue;
                }
            }
            Err(e) => {
                tracing::error!(
                    session = server.session.id(),
                    "reading the userfaultfd failed, fault service stops: {e}"
                );
                break;
            }
        }
        if last_work.elapsed() < window {
            if spinning.is_none() {
                spinning = Some(preemptions());
            }
            std::hint::spin_loop();
            continue;
        }
        if spinning.take().is_some() {
            policy.record_spin(false);
        }
        let mut fds = Vec::with_capacity(2 + server.devices.len());
        fds.push(PollFd::new(server.fd(), PollFlags::POLLIN));
        fds.push(PollFd::new(ctl.event.as_fd(), PollFlags::POLLIN));
        // An object chunk landing wakes the thread (the doorbell is drained in serve_ready).
        if let Some(o) = &server.object {
            fds.push(PollFd::new(o.fd(), PollFlags::POLLIN));
        }
        fds.extend(
            server
                .devices
                .iter()
                .filter(|d| !d.quarantined)
                .filter_map(|d| d.queue.as_ref())
                .map(|q| PollFd::new(q.fd(), PollFlags::POLLIN)),
        );
        server.session.watch.idle(passes);
        let timeout = if server.needs_idle_check() {
            PollTimeout::from(pageout::IDLE_CHECK.as_millis() as u16)
        } else {
            PollTimeout::NONE
        };
        let mut timed_out = false;
        match poll(&mut fds, timeout) {
            Ok(0) => timed_out = true,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::error!(
                    session = server.session.id(),
                    "poll failed, fault service stops: {e}"
                );
                break;
            }
        }
        let hup = fds[0].revents().is_some_and(|r| {
            r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL)
        });
        if fds[1]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN))
        {
            let _ = ctl.event.read();
        }
        drop(fds);
        if timed_out {
            // Nothing came: an anonymous-memory VM's pages may have been swapped back in.
            server.enforce(true);
        }
        if hup {
            tracing::debug!(session = server.session.id(), "userfaultfd hung up");
            break;
        }
    }
    server.ws_end();
    let handover = *ctl.handover.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(drain) = handover {
        server.drain(drain);
    }
    server.shutdown_devices();
    if handover.is_some() {
        if let Some(store) = &mut server.store {
            store.keep();
            if let Err(e) = store.sync() {
                tracing::error!(session = server.session.id(), "syncing the store: {e}");
            }
        }
    }
    if let Some(b) = &server.budget {
        b.global.fetch_sub(b.reported, Ordering::Relaxed);
    }
    server.session.watch.exited();
}
