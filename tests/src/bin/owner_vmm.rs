//! A VMM that runs as a uid of its own, for the tests of VM ownership (`trust_owner`).
//!
//! Usage: `owner-vmm SOCKET UID PAGES`. Started as root, it makes its guest RAM (PAGES 4 KiB
//! pages of memfd) and its userfaultfd, then drops to UID (gid UID, no supplementary groups),
//! as a VMM does that is handed a userfaultfd by a privileged helper; every connection to
//! faultd is made after that, so faultd sees UID (SO_PEERCRED). It then takes one command a
//! line on stdin and answers one line on stdout:
//!
//! | command | answer |
//! |---|---|
//! | `register VM 0\|1` | `ok SESSION` (1: with `resume`), or `refused CODE MESSAGE` |
//! | `fill SEED` | writes `pattern_page(gpa, SEED)` to every page; `ok` |
//! | `evict` | evicts every page on its session; `ok EVICTED ZERO FAILED` |
//! | `check SEED` | reads every page; `ok` if each holds its pattern, else `bad N FIRST_GPA` |
//! | `zero` | reads every page; `ok` if each is all zero, else `bad N FIRST_GPA` |
//! | `vm_stats NAME` | `ok SESSIONS` (how many it was shown), or `refused CODE MESSAGE` |
//! | `detail SESSION` / `evict_session SESSION` | `ok`, or `refused CODE MESSAGE` |
//! | `hangup` | ends its session; `ok` |
//!
//! A failure that is not a refusal is `error MESSAGE`.

use std::io::BufRead;

use faultd_client::{Client, ClientError, EvictAmount, GuestRam, RamPageSize, RegionSpec, Session};
use faultd_proto::SessionRef;

const PAGE: u64 = 4096;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, uid, pages] = &args[..] else {
        eprintln!("usage: owner-vmm SOCKET UID PAGES");
        std::process::exit(2);
    };
    let uid: u32 = uid.parse().expect("UID");
    let pages: u64 = pages.parse().expect("PAGES");
    // As root: RAM and uffd (an unprivileged process may not make a uffd that sees kernel
    // faults); then nothing of root is kept.
    let ram = GuestRam::new("owner-vmm", pages * PAGE, RamPageSize::Size4K).expect("guest RAM");
    let uffd = faultd_client::create_uffd().expect("uffd");
    ram.register(&uffd).expect("uffd register");
    nix::unistd::setgroups(&[]).expect("setgroups");
    nix::unistd::setgid(nix::unistd::Gid::from_raw(uid)).expect("setgid");
    nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).expect("setuid");

    let mut session: Option<Session> = None;
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let words: Vec<&str> = line.split_whitespace().collect();
        let connect = || Client::connect(socket);
        let answer = match words[..] {
            ["register", vm, resume] => connect()
                .and_then(|c| {
                    let regions = [RegionSpec::zero(0, &ram)];
                    if resume == "1" {
                        c.resume(vm, &uffd, &regions, None)
                    } else {
                        c.register(vm, &uffd, &regions, None)
                    }
                })
                .map(|s| {
                    let id = s.id();
                    session = Some(s);
                    format!("ok {id}")
                }),
            ["fill", seed] => {
                let seed: u32 = seed.parse().expect("SEED");
                for p in 0..pages {
                    let page = faultd_tests::pattern_page(p * PAGE, seed);
                    // SAFETY: page `p` lies in the live shared mapping of `ram` (p < pages);
                    // the copy goes through a raw pointer, no reference to guest RAM is made.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            page.as_ptr(),
                            ram.host_ptr().as_ptr().add((p * PAGE) as usize),
                            PAGE as usize,
                        )
                    };
                }
                Ok("ok".into())
            }
            ["evict"] => match session.as_mut() {
                Some(s) => s
                    .evict(0, pages * PAGE, None)
                    .map(|(e, z, f)| format!("ok {e} {z} {f}")),
                None => Ok("error no session".into()),
            },
            ["check", seed] => {
                let seed: u32 = seed.parse().expect("SEED");
                Ok(compare(&ram, pages, |gpa| {
                    faultd_tests::pattern_page(gpa, seed)
                }))
            }
            ["zero"] => Ok(compare(&ram, pages, |_| vec![0; PAGE as usize])),
            ["vm_stats", name] => connect()
                .and_then(|c| c.vm_stats(name))
                .map(|s| format!("ok {}", s.len())),
            ["detail", id] => connect()
                .and_then(|c| c.session_detail(SessionRef::Session(id.parse().expect("id"))))
                .map(|_| "ok".into()),
            ["evict_session", id] => connect()
                .and_then(|c| {
                    c.evict_session(
                        SessionRef::Session(id.parse().expect("id")),
                        EvictAmount::Pages(pages),
                    )
                })
                .map(|_| "ok".into()),
            ["hangup"] => {
                session = None;
                Ok("ok".into())
            }
            _ => Ok(format!("error unknown command {line:?}")),
        };
        let text = match answer {
            Ok(text) => text,
            Err(ClientError::Refused { code, message }) => {
                let code = serde_json::to_value(code).expect("code");
                format!("refused {} {message}", code.as_str().unwrap_or("?"))
            }
            Err(e) => format!("error {e}"),
        };
        println!("{text}");
    }
}

/// `ok` if every page of `ram` holds `want(gpa)`, else how many do not and the first.
fn compare(ram: &GuestRam, pages: u64, want: impl Fn(u64) -> Vec<u8>) -> String {
    let mut bad = Vec::new();
    let mut page = vec![0u8; PAGE as usize];
    for p in 0..pages {
        // SAFETY: as in `fill`: page `p` is in the live mapping, read through a raw pointer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                ram.host_ptr().as_ptr().add((p * PAGE) as usize),
                page.as_mut_ptr(),
                PAGE as usize,
            )
        };
        if page != want(p * PAGE) {
            bad.push(p * PAGE);
        }
    }
    match bad.first() {
        None => "ok".into(),
        Some(first) => format!("bad {} {first:#x}", bad.len()),
    }
}
