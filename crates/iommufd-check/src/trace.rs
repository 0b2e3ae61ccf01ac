//! Stopping one faultd thread at an exact point with ptrace: right after a read(2) of a given fd
//! returned data, before the thread does anything with it. The checks use it to hold faultd's
//! fault thread between reading a page-request group and answering it (the window in which an
//! HWPT replace makes a late answer; SIGSTOP cannot aim at it).

use std::mem::size_of;
use std::path::Path;

use nix::sys::ptrace;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

type Res<T> = Result<T, String>;

/// The thread of process `pid` named `name` (`/proc/PID/task/TID/comm`).
pub fn thread(pid: Pid, name: &str) -> Res<Pid> {
    let dir = format!("/proc/{pid}/task");
    let tasks = std::fs::read_dir(&dir).map_err(|e| format!("reading {dir}: {e}"))?;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            let tid = task.file_name().to_string_lossy().parse::<i32>();
            return tid
                .map(Pid::from_raw)
                .map_err(|e| format!("task {:?}: {e}", task.file_name()));
        }
    }
    Err(format!("process {pid} has no thread named {name}"))
}

/// The only fd of process `pid` whose `/proc/PID/fd/N` link reads `kind`.
pub fn fd_of_kind(pid: Pid, kind: &str) -> Res<i32> {
    let dir = format!("/proc/{pid}/fd");
    let fds = std::fs::read_dir(&dir).map_err(|e| format!("reading {dir}: {e}"))?;
    let found: Vec<i32> = fds
        .flatten()
        .filter(|f| std::fs::read_link(f.path()).is_ok_and(|l| l == Path::new(kind)))
        .filter_map(|f| f.file_name().to_string_lossy().parse().ok())
        .collect();
    match found[..] {
        [fd] => Ok(fd),
        _ => Err(format!(
            "process {pid} has fds {found:?} of kind {kind}, expected one"
        )),
    }
}

/// A thread seized with ptrace, stopped. Dropping it lets the thread go (detaches).
pub struct Tracer {
    tid: Pid,
    attached: bool,
}

/// `struct ptrace_syscall_info` as u64 words: `op` is the first byte; from word 3 on the entry
/// (nr, args) or the exit (rval) of the syscall.
type SyscallInfo = [u64; 11];
const OP_ENTRY: u8 = 1;
const OP_EXIT: u8 = 2;

impl Tracer {
    /// Seizes thread `tid` and stops it (PTRACE_SEIZE with TRACESYSGOOD, PTRACE_INTERRUPT).
    pub fn seize(tid: Pid) -> Res<Tracer> {
        ptrace::seize(tid, ptrace::Options::PTRACE_O_TRACESYSGOOD)
            .map_err(|e| format!("PTRACE_SEIZE of thread {tid}: {e}"))?;
        let t = Tracer {
            tid,
            attached: true,
        };
        ptrace::interrupt(tid).map_err(|e| format!("PTRACE_INTERRUPT of {tid}: {e}"))?;
        t.wait_stop()?;
        Ok(t)
    }

    /// Waits for the next stop of the thread; Ok(None) for a syscall stop, Ok(Some(sig)) for a
    /// signal to be passed on.
    fn wait_stop(&self) -> Res<Option<nix::sys::signal::Signal>> {
        match waitpid(self.tid, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::PtraceSyscall(_)) | Ok(WaitStatus::PtraceEvent(..)) => Ok(None),
            Ok(WaitStatus::Stopped(_, sig)) => Ok(Some(sig)),
            Ok(other) => Err(format!("thread {}: {other:?}", self.tid)),
            Err(e) => Err(format!("waitpid of thread {}: {e}", self.tid)),
        }
    }

    fn syscall_info(&self) -> Res<SyscallInfo> {
        let mut info: SyscallInfo = [0; 11];
        // SAFETY: PTRACE_GET_SYSCALL_INFO writes at most `size` bytes (the size of `info`) to
        // `info`, a live local buffer; `tid` is a thread this process traces, stopped.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_GET_SYSCALL_INFO,
                self.tid.as_raw(),
                size_of::<SyscallInfo>(),
                info.as_mut_ptr(),
            )
        };
        if r < 0 {
            return Err(format!(
                "PTRACE_GET_SYSCALL_INFO: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(info)
    }

    /// Lets the thread run until a read(2) of its fd `fd` returns more than 0 bytes, and stops
    /// it there (at the syscall's exit: the data is in its buffer, nothing done with it yet).
    /// Returns the bytes read.
    pub fn run_to_read_exit(&mut self, fd: i32) -> Res<i64> {
        let mut reading = false;
        let mut pass: Option<nix::sys::signal::Signal> = None;
        for _ in 0..100_000 {
            ptrace::syscall(self.tid, pass.take())
                .map_err(|e| format!("PTRACE_SYSCALL of {}: {e}", self.tid))?;
            if let Some(sig) = self.wait_stop()? {
                pass = Some(sig);
                continue;
            }
            let info = self.syscall_info()?;
            match info[0] as u8 {
                OP_ENTRY => {
                    reading = info[3] == libc::SYS_read as u64 && info[4] == fd as u64;
                }
                OP_EXIT if reading => {
                    reading = false;
                    let got = info[3] as i64;
                    if got > 0 {
                        return Ok(got);
                    }
                }
                _ => {}
            }
        }
        Err(format!(
            "thread {} made 100000 syscalls without reading anything from fd {fd}",
            self.tid
        ))
    }

    /// After the thread's process was killed: collects the traced thread's exit, which only
    /// its tracer can (the process cannot be reaped before).
    pub fn reap(mut self) -> Res<()> {
        self.attached = false;
        loop {
            match waitpid(self.tid, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => return Ok(()),
                Err(nix::errno::Errno::ECHILD) => return Ok(()),
                Ok(_) => {
                    // A stop on the way out: let it go on dying.
                    let _ = ptrace::cont(self.tid, None);
                }
                Err(e) => return Err(format!("waitpid of thread {}: {e}", self.tid)),
            }
        }
    }

    /// Lets the thread go.
    pub fn detach(mut self) -> Res<()> {
        self.attached = false;
        ptrace::detach(self.tid, None).map_err(|e| format!("PTRACE_DETACH of {}: {e}", self.tid))
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if self.attached {
            let _ = ptrace::detach(self.tid, None);
        }
    }
}
