//! testvmm: a minimal KVM VMM whose guests exercise RAM that the VMM never
//! touches itself, so every resident page of guest RAM was faulted in by the
//! guest (and, in real use, served by faultd through a userfaultfd).
//!
//! # CPU mode: 64-bit long mode at CPL3, because PVM emulates everything else
//!
//! `/dev/kvm` here is PVM (`kvm_pvm`), which runs guest code natively only in
//! 64-bit user mode; everything else goes through KVM's instruction emulator.
//! Measured with a 3-instruction loop (`add; dec; jnz`) on this machine:
//!
//! | mode                                         | time per iteration |
//! |----------------------------------------------|--------------------|
//! | 32-bit protected mode, no paging, CPL0       | ~1.4 µs            |
//! | 32-bit protected mode, no paging, CPL3       | ~1.9 µs            |
//! | long mode, 32-bit compat code segment, CPL3  | ~1.8 µs            |
//! | long mode, 64-bit code, CPL0                 | ~1.8 µs            |
//! | long mode, 64-bit code, CPL3, IOPL=3         | ~0.3 ns (native)   |
//! | 32-bit paging (PSE), any CPL                 | triple fault       |
//!
//! So the guest runs 64-bit code at CPL3 with IOPL=3 (so `out` works without
//! an I/O bitmap), under page tables in the ROM slot. Other costs measured
//! here (release build, `tests/vm.rs::speed`):
//!
//! - a port-I/O exit round trip (guest `out` to `KVM_RUN` returning and
//!   re-entering) is ~27-30 µs, so progress reports are batched;
//! - WriteVerify on anonymous RAM: ~8 µs per first-touched page (write fault),
//!   ~125k first touches/s on 1 vCPU, ~245k/s on 2; a resident page visit
//!   (64 dword writes or checks) costs well under 1 µs;
//! - WriteVerify on a memfd served by a poll+read+zeropage userfaultfd thread
//!   in the same process: ~100 µs per first touch, ~9k first touches/s on 1
//!   vCPU, ~21k/s on 2;
//! - `hlt` (and any exception, there is no IDT) at CPL3 ends in a triple
//!   fault, so the program ends with a final `out` instead;
//! - `KVM_RUN`, including a vCPU blocked in an unserved userfault, returns
//!   `EINTR` on a signal, which is how timeouts and aborts stop vCPUs.
//!
//! # Guest physical memory map
//!
//! | gpa                           | what                                        |
//! |-------------------------------|---------------------------------------------|
//! | `0 .. 256 GiB` ([`RAM_LIMIT`])| caller's [`RamSlot`]s (holes allowed)        |
//! | `256 GiB` ([`ROM_GPA`])       | ROM slot, owned by the VMM:                 |
//! | `  +0x0000`                   | PML4                                        |
//! | `  +0x1000`                   | PDPT                                        |
//! | `  +0x2000`                   | page directory of the ROM's GiB             |
//! | `  +0x3000` ([`CODE_OFFSET`]) | the guest program (under 4 KiB)             |
//! | `  +0x4000 + g * 0x1000`      | page directory of RAM's GiB `g`, one for each GiB up to the end of the highest slot |
//!
//! Virtual = physical. RAM is mapped with 2 MiB user read-write pages, up to the end of the
//! highest RAM slot rounded up to a GiB; the ROM with one 2 MiB user read-only page (so the
//! guest cannot overwrite its program or page tables); accessed/dirty bits are preset so the
//! MMU has no reason to write the ROM. A RAM access outside every slot is an MMIO exit,
//! reported as an error. The ROM is `0x4000` bytes plus 4 KiB per GiB of RAM (260 KiB for a
//! 64 GiB guest); nothing in guest RAM is written by the VMM.
//!
//! Why 256 GiB and what it takes: the page tables need one page directory per GiB, and the ROM
//! must stay within the one 2 MiB page that maps it (508 directories at most); 256 GiB keeps
//! the ROM below 1.1 MiB. A guest physical address at or above 64 GiB needs a guest
//! MAXPHYADDR above 36 bits, which is what KVM assumes for a vCPU without CPUID (a page table
//! entry pointing above it is a reserved-bit fault, a triple fault here), so every vCPU gets
//! KVM's supported CPUID, whose physical address width is the host's ([`Vm::new`] refuses RAM
//! beyond it). KVM's own limit on one memory slot (2^31 - 1 pages, 8 TiB) is far above.

use std::os::raw::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

pub mod device;
mod guest;

pub use device::{DeviceConfig, DeviceFds, DmaError, PriDevice, PriStats, RamRange};

pub use guest::{
    dword_offsets, page_sequence, pattern, DWORDS_PER_PAGE, LCG_ADD, LCG_MUL, PATTERN_MUL,
};

/// RAM must lie below this guest physical address (256 GiB).
pub const RAM_LIMIT: u64 = 256 << 30;
/// Guest physical address of the VMM-owned ROM slot: right above the highest RAM.
pub const ROM_GPA: u64 = RAM_LIMIT;
/// Offset of the guest program within the ROM slot.
pub const CODE_OFFSET: usize = 0x3000;
/// Most vCPUs one [`Vm::run`] accepts.
pub const MAX_VCPUS: usize = 8;
const PAGE: u64 = 4096;

/// Guest RAM provided by the caller. The VMM never reads or writes it; it
/// only registers it with KVM.
#[derive(Debug, Clone, Copy)]
pub struct RamSlot {
    /// Guest physical address, 4 KiB aligned; `gpa + size <= RAM_LIMIT`.
    pub gpa: u64,
    /// Start of the host mapping, 4 KiB aligned. Must stay mapped while the `Vm` lives.
    pub host: NonNull<u8>,
    /// Size in bytes, a non-zero multiple of 4 KiB.
    pub size: u64,
}

/// What one vCPU does. Page numbers count 4 KiB pages from the first RAM
/// slot's gpa (`ram[0].gpa`, usually 0); the pages must be backed by RAM slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Pick `touches` pages pseudo-randomly in `[first_page, first_page + page_count)`
    /// ([`page_sequence`]), write [`pattern`]`(gpa, seed)` into the
    /// [`dword_offsets`] of each, then walk the same sequence again and verify.
    WriteVerify {
        seed: u32,
        touches: u32,
        first_page: u32,
        page_count: u32,
    },
    /// Only the verify pass of `WriteVerify` (e.g. for RAM restored from a snapshot).
    Verify {
        seed: u32,
        touches: u32,
        first_page: u32,
        page_count: u32,
    },
    /// Read one dword (offset 0) of pages `first_page..first_page + count` in
    /// order, with an `out` after each read so the VMM timestamps each touch.
    TouchSequential { first_page: u32, count: u32 },
    /// `WriteVerify` over every page of `first_page..first_page + page_count` in ascending
    /// order (both passes): a guest streaming through memory.
    WriteVerifySequential {
        seed: u32,
        first_page: u32,
        page_count: u32,
    },
}

/// The outcome of one vCPU's workload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VcpuReport {
    /// Page visits done (`2 * touches` for WriteVerify: both passes).
    pub pages: u32,
    /// Dwords whose value differed from `pattern()` (saturating).
    pub mismatches: u32,
    /// Guest physical address of the first mismatching dword.
    pub first_mismatch_gpa: Option<u64>,
    /// `KVM_RUN` returns (port I/O exits and interruptions).
    pub exits: u64,
    /// From the first `KVM_RUN` to the final `out`.
    pub elapsed: Duration,
    /// TouchSequential only: for each touch, the time since the previous touch's
    /// `out` (the first: since the workload's first instruction, [`VcpuReport::started_at`]).
    /// Includes one I/O exit round trip (~27 µs under PVM) besides the fault.
    pub touch_times: Vec<Duration>,
    /// When the workload's first instruction (an `out`, before any RAM access) exited to
    /// the VMM: the moment the guest is known to run.
    pub started_at: Option<Instant>,
}

/// Errors, named for the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("create KVM VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_SUPPORTED_CPUID")]
    GetCpuid(#[source] kvm_ioctls::Error),
    #[error(
        "the vCPU's physical address width is {bits} bits, too few for the ROM at {ROM_GPA:#x}"
    )]
    PhysAddrWidth { bits: u32 },
    #[error("set CPUID of vCPU {vcpu}")]
    SetCpuid {
        vcpu: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("invalid RAM slot {index}: {reason}")]
    InvalidRam { index: usize, reason: &'static str },
    #[error("mmap the ROM slot")]
    MapRom(#[source] nix::Error),
    #[error("assemble the guest program")]
    Assemble(#[source] iced_x86::IcedError),
    #[error("KVM_SET_USER_MEMORY_REGION slot {slot} (gpa {gpa:#x}, {size:#x} bytes)")]
    SetUserMemoryRegion {
        slot: u32,
        gpa: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{0} workloads given; one per vCPU, 1..={MAX_VCPUS}")]
    VcpuCount(usize),
    #[error("invalid workload for vCPU {vcpu}: {reason}")]
    InvalidWorkload { vcpu: usize, reason: String },
    #[error("install the vCPU kick signal handler")]
    SignalHandler(#[source] kvm_ioctls::Error),
    #[error("create vCPU {vcpu}")]
    CreateVcpu {
        vcpu: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("get special registers of vCPU {vcpu}")]
    GetSregs {
        vcpu: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("set special registers of vCPU {vcpu}")]
    SetSregs {
        vcpu: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("set registers of vCPU {vcpu}")]
    SetRegs {
        vcpu: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_RUN on vCPU {vcpu} failed at rip {rip:#x}")]
    RunVcpu {
        vcpu: usize,
        rip: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {vcpu}: unexpected exit {reason} at rip {rip:#x}")]
    UnexpectedExit {
        vcpu: usize,
        reason: String,
        rip: u64,
    },
    #[error("vCPU {vcpu}: timed out after {timeout:?} at rip {rip:#x}")]
    Timeout {
        vcpu: usize,
        timeout: Duration,
        rip: u64,
    },
    #[error("vCPU {vcpu}: stopped because another vCPU failed")]
    Aborted { vcpu: usize },
}

/// A KVM VM with caller-provided RAM and a VMM-owned ROM holding the guest program.
#[derive(Debug)]
pub struct Vm {
    // Field order is drop order: vCPUs and the VM go before the ROM they map.
    vcpus: Vec<VcpuFd>,
    vm: VmFd,
    /// KVM's supported CPUID, given to every vCPU (for its physical address width).
    cpuid: kvm_bindings::CpuId,
    _rom: Rom,
    program: guest::Program,
    /// `(gpa, size)` of each RAM slot, in the caller's order.
    ram: Vec<(u64, u64)>,
    timeout: Option<Duration>,
    progress_every: u32,
}

impl Vm {
    /// Creates the VM, registers `ram` (KVM slots 0..n) and the ROM (slot n).
    /// The caller keeps `ram` mapped for the `Vm`'s lifetime.
    pub fn new(ram: Vec<RamSlot>) -> Result<Vm, VmError> {
        validate_ram(&ram)?;
        let ram_end = ram.iter().map(|r| r.gpa + r.size).max().unwrap_or(0);
        let program = guest::assemble(ROM_GPA + CODE_OFFSET as u64).map_err(VmError::Assemble)?;
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::GetCpuid)?;
        // The ROM (above all RAM) is the highest guest physical address the page tables hold.
        let bits = phys_addr_bits(&cpuid);
        if (ROM_GPA + ROM_MAX as u64) > 1u64 << bits {
            return Err(VmError::PhysAddrWidth { bits });
        }
        let rom = Rom::new(&program.code, ram_end)?;
        let vm = kvm.create_vm().map_err(VmError::CreateVm)?;

        let regions = ram
            .iter()
            .map(|r| (r.gpa, r.size, r.host.as_ptr() as u64))
            .chain([(ROM_GPA, rom.len as u64, rom.ptr.as_ptr() as u64)]);
        for (slot, (gpa, size, host)) in (0u32..).zip(regions) {
            let region = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: host,
                flags: 0,
            };
            // SAFETY: the ROM mapping is owned by this Vm and dropped after the
            // VM fd; the caller guarantees each RAM mapping stays valid while
            // the Vm lives (RamSlot's contract). Slots were checked for
            // alignment and overlap, and KVM only accesses this memory, never
            // our own Rust objects.
            unsafe { vm.set_user_memory_region(region) }.map_err(|source| {
                VmError::SetUserMemoryRegion {
                    slot,
                    gpa,
                    size,
                    source,
                }
            })?;
        }
        Ok(Vm {
            vcpus: Vec::new(),
            vm,
            cpuid,
            _rom: rom,
            program,
            ram: ram.iter().map(|r| (r.gpa, r.size)).collect(),
            timeout: None,
            progress_every: 4096,
        })
    }

    /// Makes [`Vm::run`] fail with [`VmError::Timeout`] once it has run this long
    /// (default: no timeout). A vCPU blocked on an unserved userfault is interrupted too.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// Report progress every `pages` page visits, rounded up to a power of two
    /// (default 4096). Each report is an I/O exit (~30 µs under PVM).
    pub fn set_progress_interval(&mut self, pages: u32) {
        self.progress_every = pages.max(1).checked_next_power_of_two().unwrap_or(1 << 31);
    }

    /// Runs `workloads[i]` on vCPU `i`, each vCPU in its own thread, to completion.
    /// `progress(i, pages_done)` is called from vCPU `i`'s thread every
    /// progress interval and once at the end. On the first failure the other
    /// vCPUs are stopped and that failure is returned.
    ///
    /// vCPU threads are stopped with `SIGRTMIN`, for which this installs a
    /// process-wide no-op handler; the rest of the process must leave that
    /// signal alone.
    pub fn run(
        &mut self,
        workloads: Vec<Workload>,
        progress: &(dyn Fn(usize, u32) + Sync),
    ) -> Result<Vec<VcpuReport>, VmError> {
        if workloads.is_empty() || workloads.len() > MAX_VCPUS {
            return Err(VmError::VcpuCount(workloads.len()));
        }
        let starts = workloads
            .iter()
            .enumerate()
            .map(|(i, w)| self.start_regs(i, w))
            .collect::<Result<Vec<_>, _>>()?;
        while self.vcpus.len() < workloads.len() {
            let vcpu = self.vcpus.len();
            let fd = self
                .vm
                .create_vcpu(vcpu as u64)
                .map_err(|source| VmError::CreateVcpu { vcpu, source })?;
            // Once, before the vCPU first runs: KVM refuses a CPUID change after that.
            fd.set_cpuid2(&self.cpuid)
                .map_err(|source| VmError::SetCpuid { vcpu, source })?;
            self.vcpus.push(fd);
        }
        for (i, regs) in starts.iter().enumerate() {
            init_vcpu(i, &self.vcpus[i], regs)?;
        }
        // A no-op handler without SA_RESTART: the signal only makes KVM_RUN
        // (or a userfault KVM waits on) return EINTR.
        vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(VmError::SignalHandler)?;

        let ctx = RunCtx {
            stop: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
            timeout: self.timeout.unwrap_or(Duration::MAX),
            progress,
            progress_every: self.progress_every,
        };
        let n = workloads.len();
        let threads = Mutex::new(vec![None; n]);
        let deadline = self.timeout.and_then(|t| Instant::now().checked_add(t));
        let mut results = std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel();
            for (i, vcpu) in self.vcpus.iter_mut().take(n).enumerate() {
                let (tx, ctx, threads) = (tx.clone(), &ctx, &threads);
                s.spawn(move || {
                    threads.lock().unwrap()[i] = Some(nix::sys::pthread::pthread_self());
                    let _ = tx.send((i, run_vcpu(i, vcpu, ctx)));
                });
            }
            drop(tx);
            supervise(&rx, &ctx, &threads, deadline)
        });
        // Return the error that stopped the run, not the Aborted ones it caused.
        if let Some(Some(Err(e))) = results.first_failed.map(|i| results.done[i].take()) {
            return Err(e);
        }
        // (A vCPU thread that panicked has re-raised its panic at the end of the scope.)
        results.done.into_iter().map(Option::unwrap).collect()
    }

    /// Checks a workload and returns vCPU `i`'s start registers for it.
    fn start_regs(&self, i: usize, w: &Workload) -> Result<kvm_regs, VmError> {
        let invalid = |reason: String| VmError::InvalidWorkload { vcpu: i, reason };
        let base_page = self.ram[0].0 / PAGE;
        let mut regs = kvm_regs {
            rflags: 0x2 | 0x3000, // reserved bit 1, IOPL=3 so `out` works at CPL3
            rbp: u64::MAX,        // no mismatch yet
            r8: u64::from(self.progress_every - 1),
            ..Default::default()
        };
        let (pages, first, count) = match *w {
            Workload::WriteVerify {
                seed,
                touches,
                first_page,
                page_count,
            }
            | Workload::Verify {
                seed,
                touches,
                first_page,
                page_count,
            } => {
                if touches > u32::MAX / 2 {
                    return Err(invalid(format!("{touches} touches is too many")));
                }
                if touches > 0 && page_count == 0 {
                    return Err(invalid("touches > 0 but page_count == 0".into()));
                }
                regs.rip = match w {
                    Workload::WriteVerify { .. } => self.program.write_verify,
                    _ => self.program.verify,
                };
                regs.r9 = touches.into();
                regs.r10 = base_page + u64::from(first_page);
                regs.r11 = page_count.into();
                regs.r13 = u64::from(seed) << 32;
                regs.r14 = PATTERN_MUL;
                (touches, first_page, page_count)
            }
            Workload::WriteVerifySequential {
                seed,
                first_page,
                page_count,
            } => {
                if page_count > u32::MAX / 2 {
                    return Err(invalid(format!("{page_count} pages is too many")));
                }
                regs.rip = self.program.write_verify_sequential;
                regs.r9 = page_count.into();
                regs.r10 = base_page + u64::from(first_page);
                regs.r11 = page_count.into();
                regs.r13 = u64::from(seed) << 32;
                regs.r14 = PATTERN_MUL;
                (page_count, first_page, page_count)
            }
            Workload::TouchSequential { first_page, count } => {
                regs.rip = self.program.touch_sequential;
                regs.rbx = (base_page + u64::from(first_page)) * PAGE;
                regs.r9 = count.into();
                (count, first_page, count)
            }
        };
        let start = self.ram[0].0 + u64::from(first) * PAGE;
        let end = start + u64::from(count) * PAGE;
        if pages > 0 && !self.is_ram(start, end) {
            return Err(invalid(format!(
                "pages {first}..{} (gpa {start:#x}..{end:#x}) are not all RAM",
                u64::from(first) + u64::from(count)
            )));
        }
        Ok(regs)
    }

    /// Whether RAM slots cover all of `start..end`.
    fn is_ram(&self, mut start: u64, end: u64) -> bool {
        let mut slots = self.ram.clone();
        slots.sort_unstable();
        for (gpa, size) in slots {
            if gpa <= start && start < gpa + size {
                start = gpa + size;
            }
        }
        start >= end
    }
}

/// Shared state of one [`Vm::run`].
struct RunCtx<'a> {
    stop: AtomicBool,
    timed_out: AtomicBool,
    timeout: Duration,
    progress: &'a (dyn Fn(usize, u32) + Sync),
    progress_every: u32,
}

type VcpuResult = Result<VcpuReport, VmError>;

/// What [`supervise`] collected: each vCPU's result, and which failed first.
struct Results {
    done: Vec<Option<VcpuResult>>,
    first_failed: Option<usize>,
}

/// Collects the vCPU threads' results. On the first failure or at `deadline`
/// it sets `ctx.stop` and kicks the still-running vCPUs out of KVM_RUN.
fn supervise(
    rx: &mpsc::Receiver<(usize, VcpuResult)>,
    ctx: &RunCtx,
    threads: &Mutex<Vec<Option<libc::pthread_t>>>,
    deadline: Option<Instant>,
) -> Results {
    let n = threads.lock().unwrap().len();
    let mut results = Results {
        done: (0..n).map(|_| None).collect(),
        first_failed: None,
    };
    let mut pending = n;
    while pending > 0 {
        let wait = match (ctx.stop.load(Ordering::SeqCst), deadline) {
            // Re-kick periodically: a kick that lands just before a thread
            // enters KVM_RUN is otherwise lost.
            (true, _) => Duration::from_millis(10),
            (false, Some(d)) => d.saturating_duration_since(Instant::now()),
            (false, None) => Duration::from_secs(3600),
        };
        match rx.recv_timeout(wait) {
            Ok((i, result)) => {
                if result.is_err() {
                    ctx.stop.store(true, Ordering::SeqCst);
                    results.first_failed.get_or_insert(i);
                }
                results.done[i] = Some(result);
                pending -= 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    ctx.timed_out.store(true, Ordering::SeqCst);
                    ctx.stop.store(true, Ordering::SeqCst);
                }
            }
            // A vCPU thread panicked (in `progress`); the scope re-raises it.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if ctx.stop.load(Ordering::SeqCst) {
            let threads = threads.lock().unwrap();
            for (t, done) in threads.iter().zip(&results.done) {
                if let (Some(t), None) = (t, done) {
                    kick(*t);
                }
            }
        }
    }
    results
}

/// Runs vCPU `i` until its final `out`.
fn run_vcpu(i: usize, vcpu: &mut VcpuFd, ctx: &RunCtx) -> VcpuResult {
    let mut report = VcpuReport::default();
    let mut reported = 0;
    let start = Instant::now();
    let mut last_touch = start;
    let mut first_mismatch_low = 0;
    loop {
        if ctx.stop.load(Ordering::SeqCst) {
            return Err(if ctx.timed_out.load(Ordering::SeqCst) {
                VmError::Timeout {
                    vcpu: i,
                    timeout: ctx.timeout,
                    rip: rip(vcpu),
                }
            } else {
                VmError::Aborted { vcpu: i }
            });
        }
        report.exits += 1;
        let (port, value) = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) if data.len() == 4 => {
                (port, u32::from_le_bytes(data.try_into().unwrap()))
            }
            Ok(exit) => {
                let reason = format!("{exit:?}");
                return Err(VmError::UnexpectedExit {
                    vcpu: i,
                    reason,
                    rip: rip(vcpu),
                });
            }
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(source) => {
                return Err(VmError::RunVcpu {
                    vcpu: i,
                    rip: rip(vcpu),
                    source,
                })
            }
        };
        match port {
            guest::PORT_START => {
                let now = Instant::now();
                report.started_at.get_or_insert(now);
                last_touch = now;
            }
            guest::PORT_PROGRESS => {
                reported = value;
                (ctx.progress)(i, value);
            }
            guest::PORT_TOUCH => {
                let now = Instant::now();
                report.touch_times.push(now - last_touch);
                last_touch = now;
                if (value + 1) % ctx.progress_every == 0 {
                    reported = value + 1;
                    (ctx.progress)(i, reported);
                }
            }
            guest::PORT_PAGES => report.pages = value,
            guest::PORT_MISMATCHES => report.mismatches = value,
            guest::PORT_FIRST_MISMATCH => first_mismatch_low = value,
            guest::PORT_FIRST_MISMATCH_HIGH => {
                let gpa = u64::from(value) << 32 | u64::from(first_mismatch_low);
                report.first_mismatch_gpa = (gpa != u64::MAX).then_some(gpa);
            }
            guest::PORT_DONE => {
                report.elapsed = start.elapsed();
                if reported != report.pages {
                    (ctx.progress)(i, report.pages);
                }
                return Ok(report);
            }
            _ => {
                return Err(VmError::UnexpectedExit {
                    vcpu: i,
                    reason: format!("out to unknown port {port:#x} (value {value:#x})"),
                    rip: rip(vcpu),
                })
            }
        }
    }
}

/// The vCPU's rip, for error messages (0 if it cannot be read).
fn rip(vcpu: &VcpuFd) -> u64 {
    vcpu.get_regs().map(|r| r.rip).unwrap_or(0)
}

/// Puts vCPU `i` into 64-bit mode at CPL3 with `regs`.
fn init_vcpu(i: usize, vcpu: &VcpuFd, regs: &kvm_regs) -> Result<(), VmError> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|source| VmError::GetSregs { vcpu: i, source })?;
    // No GDT or IDT is needed: segment state lives in the hidden registers
    // set here, and the program neither loads segments nor takes exceptions.
    let segment = |selector, type_, l, db| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db,
        s: 1,
        l,
        g: 1,
        ..Default::default()
    };
    sregs.cs = segment(0x33, 0xb, 1, 0); // 64-bit code, execute/read, accessed
    let data = segment(0x2b, 0x3, 0, 1); // data, read/write, accessed
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    // VM entry wants a present busy TSS even though it is never used.
    sregs.tr = kvm_segment {
        base: ROM_GPA,
        limit: 0x67,
        selector: 0x40,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.cr0 = 0x8001_0033; // PG | WP | NE | ET | MP | PE
    sregs.cr3 = ROM_GPA + PML4_OFFSET as u64;
    sregs.cr4 = 0x20; // PAE
    sregs.efer = 0x500; // LMA | LME
    vcpu.set_sregs(&sregs)
        .map_err(|source| VmError::SetSregs { vcpu: i, source })?;
    vcpu.set_regs(regs)
        .map_err(|source| VmError::SetRegs { vcpu: i, source })
}

/// The physical address width in `cpuid` (leaf 0x8000_0008, EAX bits 7:0); 36 without that
/// leaf, as KVM assumes then.
fn phys_addr_bits(cpuid: &kvm_bindings::CpuId) -> u32 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map_or(36, |e| e.eax & 0xff)
}

fn validate_ram(ram: &[RamSlot]) -> Result<(), VmError> {
    if ram.is_empty() {
        return Err(VmError::InvalidRam {
            index: 0,
            reason: "no RAM slots",
        });
    }
    for (index, r) in ram.iter().enumerate() {
        let invalid = |reason| Err(VmError::InvalidRam { index, reason });
        if (r.gpa | r.size | r.host.as_ptr() as u64) & (PAGE - 1) != 0 {
            return invalid("gpa, size and host must be 4 KiB aligned");
        }
        if r.size == 0 || r.gpa.checked_add(r.size).is_none_or(|end| end > RAM_LIMIT) {
            return invalid("must be non-empty and end at or below RAM_LIMIT (256 GiB)");
        }
        if ram[..index]
            .iter()
            .any(|o| r.gpa < o.gpa + o.size && o.gpa < r.gpa + r.size)
        {
            return invalid("overlaps an earlier slot");
        }
    }
    Ok(())
}

const PML4_OFFSET: usize = 0;
const PDPT_OFFSET: usize = 0x1000;
/// The page directory of the GiB the ROM lies in.
const ROM_PD_OFFSET: usize = 0x2000;
/// The page directory of RAM's GiB `g` is at `RAM_PD_OFFSET + g * 0x1000`.
const RAM_PD_OFFSET: usize = 0x4000;
/// The ROM is mapped by one 2 MiB page, so it must fit in one.
const ROM_MAX: usize = 2 << 20;
const GIB: u64 = 1 << 30;

/// The VMM-owned ROM slot: page tables and the program, in an anonymous mapping.
#[derive(Debug)]
struct Rom {
    ptr: NonNull<c_void>,
    len: usize,
}

// SAFETY: Rom only owns an anonymous mapping; after `new` nothing in this
// process reads or writes through `ptr` (only KVM does, on the guest's behalf),
// and `drop` unmaps it once. Moving or sharing it between threads is fine.
unsafe impl Send for Rom {}
// SAFETY: see `Send`; `&Rom` gives no access to the memory.
unsafe impl Sync for Rom {}

impl Rom {
    /// The ROM for `code`, with page tables mapping RAM up to `ram_end` (at most [`RAM_LIMIT`]).
    fn new(code: &[u8], ram_end: u64) -> Result<Rom, VmError> {
        let image = rom_image(code, ram_end);
        let len = image.len();
        // SAFETY: a fresh anonymous private mapping aliases no existing memory.
        let ptr = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                len.try_into().expect("the ROM is never empty"),
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_PRIVATE,
            )
        }
        .map_err(VmError::MapRom)?;
        // SAFETY: `ptr` is a fresh, writable, `len`-byte mapping that nothing
        // else references yet, and `image` is `len` bytes.
        unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), ptr.as_ptr().cast(), len) };
        Ok(Rom { ptr, len })
    }
}

impl Drop for Rom {
    fn drop(&mut self) {
        // SAFETY: `ptr` is our `len`-byte mapping, unmapped only here, and
        // no Rust reference into it exists.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
    }
}

/// Builds the ROM contents: identity-mapping page tables for `0..ram_end` (rounded up to a
/// GiB) and for the ROM itself, then the code. Its length is a multiple of 4 KiB.
fn rom_image(code: &[u8], ram_end: u64) -> Vec<u8> {
    const P: u64 = 1; // present
    const RW: u64 = 2;
    const US: u64 = 4; // user (CPL3) access
    const A: u64 = 0x20; // accessed, preset so the MMU does not write it
    const D: u64 = 0x40; // dirty, ditto
    const PS: u64 = 0x80; // 2 MiB page
    const TABLE: u64 = P | RW | US | A;

    // The program is fixed (~1 KiB) and RAM is checked against RAM_LIMIT before this:
    // not fitting is a bug here, not a runtime condition.
    assert!(
        CODE_OFFSET + code.len() <= RAM_PD_OFFSET,
        "guest program too large"
    );
    let ram_gib = ram_end.div_ceil(GIB) as usize;
    let len = RAM_PD_OFFSET + ram_gib * 0x1000;
    assert!(
        ram_end <= RAM_LIMIT && len <= ROM_MAX,
        "RAM beyond RAM_LIMIT"
    );
    let mut rom = vec![0u8; len];
    let mut entry = |table: usize, index: usize, value: u64| {
        let at = table + index * 8;
        rom[at..at + 8].copy_from_slice(&value.to_le_bytes());
    };
    let addr = |offset: usize| ROM_GPA + offset as u64;
    // One PDPT covers 512 GiB, RAM and ROM alike.
    const { assert!(ROM_GPA < 512 * GIB && ROM_GPA.is_multiple_of(2 << 20)) };
    entry(PML4_OFFSET, 0, addr(PDPT_OFFSET) | TABLE);
    for gib in 0..ram_gib {
        let pd = RAM_PD_OFFSET + gib * 0x1000;
        entry(PDPT_OFFSET, gib, addr(pd) | TABLE);
        for i in 0..512 {
            let gpa = ((gib as u64) << 30) | ((i as u64) << 21);
            entry(pd, i, gpa | P | RW | US | A | D | PS);
        }
    }
    let rom_gib = (ROM_GPA / GIB) as usize;
    let rom_pde = ((ROM_GPA % GIB) >> 21) as usize;
    entry(PDPT_OFFSET, rom_gib, addr(ROM_PD_OFFSET) | TABLE);
    entry(ROM_PD_OFFSET, rom_pde, ROM_GPA | P | US | A | PS); // read-only
    rom[CODE_OFFSET..CODE_OFFSET + code.len()].copy_from_slice(code);
    rom
}

/// Signal used to kick vCPU threads out of `KVM_RUN`. A real-time signal, so
/// it collides with nothing the C runtime uses.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut c_void) {}

fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` is a vCPU thread of the enclosing `thread::scope`, which
    // joins it only after we stop kicking, so the handle is valid (an exited,
    // unjoined thread just yields ESRCH). The signal has a no-op handler. Raw libc: nix's
    // pthread_kill takes a `Signal`, which has no real-time signals.
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}
