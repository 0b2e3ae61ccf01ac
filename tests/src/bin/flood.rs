//! `flood MODE SOCKET ...`: a tenant that floods faultd's control socket, run by the trust tests
//! (`tests/trust_limits.rs`) as a uid of its own. Prints one line when its flood is in place,
//! then holds everything it opened until its stdin closes.
//!
//! - `idle SOCKET N`: opens N connections and sends nothing (`opened K`).
//! - `register SOCKET VM N`: sends N registrations for VM, each on a connection of its own,
//!   all with its one userfaultfd and guest RAM, without waiting for answers (`sent K`).
//! - `sessions SOCKET VM N`: registers N VMs named VM-0.. one after the other, each with RAM
//!   and a uffd of its own, and prints each answer (`ok` or `refused CODE: MESSAGE`), then
//!   `done`.

use std::io::{BufRead, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitCode;

use faultd_client::{GuestRam, RamPageSize, Uffd};
use nix::sys::socket::{
    connect, sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};

const RAM: u64 = 4 << 20;

/// A connection, made without waiting: a full backlog fails instead of blocking.
fn connect_to(path: &str) -> nix::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &UnixAddr::new(path)?)?;
    Ok(fd)
}

/// `UFFD_USER_MODE_ONLY`: faults from user mode only, which needs no privilege.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
/// `UFFDIO_API`: `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;

/// A userfaultfd an unprivileged process may have (user-mode faults only, from the syscall:
/// /dev/userfaultfd is root's), with `ram` registered.
fn uffd_for(ram: &GuestRam) -> Uffd {
    use std::os::fd::FromRawFd;
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
    // SAFETY: userfaultfd(2) takes an int of flags and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
    // The syscall returns an fd (fits an int) that nothing else owns.
    let fd = fd as libc::c_int;
    let mut api = [0xAAu64, 0, 0];
    // SAFETY: UFFDIO_API reads and writes one struct uffdio_api (three u64: api, features,
    // ioctls), which `api` is, alive and exclusively borrowed for the call.
    let rc = unsafe { libc::ioctl(fd, UFFDIO_API, api.as_mut_ptr()) };
    assert_eq!(rc, 0, "UFFDIO_API: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh userfaultfd owned by nothing else; Uffd takes ownership.
    let uffd = unsafe { Uffd::from_raw_fd(fd) };
    ram.register(&uffd).expect("registering RAM with the uffd");
    uffd
}

fn send_with_fds(conn: &OwnedFd, bytes: &[u8], fds: &[i32]) -> nix::Result<usize> {
    let iov = [std::io::IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    sendmsg::<()>(
        std::os::fd::AsRawFd::as_raw_fd(conn),
        &iov,
        &cmsg,
        MsgFlags::empty(),
        None,
    )
}

fn say(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn hold_until_stdin_closes() {
    let mut sink = String::new();
    while std::io::stdin().lock().read_line(&mut sink).unwrap_or(0) > 0 {}
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n = |i: usize| args.get(i).and_then(|v| v.parse::<usize>().ok());
    match (args.first().map(String::as_str), args.get(1)) {
        (Some("idle"), Some(socket)) if n(2).is_some() => {
            let conns: Vec<OwnedFd> = (0..n(2).unwrap_or(0))
                .filter_map(|_| connect_to(socket).ok())
                .collect();
            say(&format!("opened {}", conns.len()));
            hold_until_stdin_closes();
        }
        (Some("register"), Some(socket)) if n(3).is_some() => {
            let vm = &args[2];
            let ram = GuestRam::new("flood", RAM, RamPageSize::Size4K).expect("guest RAM");
            let uffd = uffd_for(&ram);
            let packet = faultd_tests::zero_register_bytes(vm, &ram);
            let fds = [
                std::os::fd::AsRawFd::as_raw_fd(&uffd.as_fd()),
                std::os::fd::AsRawFd::as_raw_fd(&ram.memfd()),
            ];
            // Each registration gets through: a full backlog is waited out (for a while).
            let connect = || {
                let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
                loop {
                    match connect_to(socket) {
                        Err(nix::errno::Errno::EAGAIN) if std::time::Instant::now() < until => {
                            std::thread::sleep(std::time::Duration::from_millis(1))
                        }
                        other => return other.ok(),
                    }
                }
            };
            let conns: Vec<OwnedFd> = (0..n(3).unwrap_or(0))
                .filter_map(|_| {
                    let c = connect()?;
                    send_with_fds(&c, &packet, &fds).ok()?;
                    Some(c)
                })
                .collect();
            say(&format!("sent {}", conns.len()));
            hold_until_stdin_closes();
        }
        (Some("sessions"), Some(socket)) if n(3).is_some() => {
            let vm = &args[2];
            let mut held = Vec::new();
            for i in 0..n(3).unwrap_or(0) {
                let ram = GuestRam::new("tenant", RAM, RamPageSize::Size4K).expect("guest RAM");
                let uffd = uffd_for(&ram);
                let regions = [faultd_client::RegionSpec::zero(0, &ram)];
                let client = faultd_client::Client::connect(socket).expect("connect");
                match client.register(&format!("{vm}-{i}"), &uffd, &regions, None) {
                    Ok(session) => {
                        say("ok");
                        held.push((session, uffd, ram));
                    }
                    Err(faultd_client::ClientError::Refused { code, message }) => {
                        say(&format!("refused {code:?}: {message}"))
                    }
                    Err(e) => say(&format!("failed: {e}")),
                }
            }
            say("done");
            hold_until_stdin_closes();
        }
        _ => {
            eprintln!("usage: flood idle SOCKET N | register SOCKET VM N | sessions SOCKET VM N");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}
