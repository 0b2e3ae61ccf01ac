//! The control decoder's corpus of hostile packets (`crates/proto/tests/corpus/control`) sent
//! to a live faultd, each on its own connection and with the fds its name calls for: every one
//! is answered as recorded here and closes only its own connection.
//!
//! The decoder's own replay checks what `decode` makes of the bytes; this one checks what the
//! daemon does around it: fd counts, the empty packet, sizes the kernel refuses to carry.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use faultd_client::Client;
use faultd_proto::{ErrorCode, Response};
use faultd_tests::Faultd;

/// What faultd must do with one corpus packet.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Answer {
    /// Refuse it with this code and close the connection.
    Refused(ErrorCode),
    /// Close the connection without an answer.
    HangsUp,
    /// Nothing reaches faultd: the kernel refuses to send a packet that large (EMSGSIZE).
    NotSent,
    /// Answer it (it is a valid request).
    Answered,
}

/// Every corpus file, the fds it is sent with, and faultd's answer.
const CORPUS: &[(&str, usize, Answer)] = &[
    ("empty.bin", 0, Answer::Refused(ErrorCode::Malformed)),
    (
        "whitespace-only.json",
        0,
        Answer::Refused(ErrorCode::Malformed),
    ),
    (
        "array-status.json",
        0,
        Answer::Refused(ErrorCode::Malformed),
    ),
    (
        "array-sessions.json",
        0,
        Answer::Refused(ErrorCode::Malformed),
    ),
    (
        "array-register.json",
        0,
        Answer::Refused(ErrorCode::Malformed),
    ),
    (
        "string-status.json",
        0,
        Answer::Refused(ErrorCode::Malformed),
    ),
    ("null.json", 0, Answer::Refused(ErrorCode::Malformed)),
    (
        "register-region-as-array.json",
        2,
        Answer::Refused(ErrorCode::Malformed),
    ),
    (
        "register-backing-as-array.json",
        2,
        Answer::Refused(ErrorCode::Malformed),
    ),
    (
        "register-zero-backing-with-offset.json",
        2,
        Answer::Refused(ErrorCode::Malformed),
    ),
    (
        "add-device-queue-as-array.json",
        0,
        Answer::Refused(ErrorCode::Malformed),
    ),
    (
        "evict-session-range-as-array.json",
        0,
        Answer::Refused(ErrorCode::Malformed),
    ),
    (
        "register-65-fds.json",
        65,
        Answer::Refused(ErrorCode::Oversize),
    ),
    (
        "register-250-fds.json",
        250,
        Answer::Refused(ErrorCode::Oversize),
    ),
    (
        "unknown-type.json",
        0,
        Answer::Refused(ErrorCode::Malformed),
    ),
    (
        "unknown-field.json",
        0,
        Answer::Refused(ErrorCode::Malformed),
    ),
    (
        "missing-type.json",
        0,
        Answer::Refused(ErrorCode::Malformed),
    ),
    (
        "duplicate-type.json",
        0,
        Answer::Refused(ErrorCode::Malformed),
    ),
    (
        "duplicate-field.json",
        0,
        Answer::Refused(ErrorCode::Malformed),
    ),
    (
        "float-number.json",
        0,
        Answer::Refused(ErrorCode::Malformed),
    ),
    (
        "negative-number.json",
        0,
        Answer::Refused(ErrorCode::Malformed),
    ),
    (
        "u64-overflow.json",
        0,
        Answer::Refused(ErrorCode::Malformed),
    ),
    (
        "u32-overflow-fd.json",
        0,
        Answer::Refused(ErrorCode::Malformed),
    ),
    (
        "lone-surrogate.json",
        0,
        Answer::Refused(ErrorCode::Malformed),
    ),
    ("non-utf8.bin", 0, Answer::Refused(ErrorCode::Malformed)),
    ("utf8-bom.json", 0, Answer::Refused(ErrorCode::Malformed)),
    (
        "trailing-garbage.json",
        0,
        Answer::Refused(ErrorCode::Malformed),
    ),
    ("trailing-nul.bin", 0, Answer::Refused(ErrorCode::Malformed)),
    (
        "two-messages.json",
        0,
        Answer::Refused(ErrorCode::Malformed),
    ),
    (
        "truncated-register.json",
        0,
        Answer::Refused(ErrorCode::Malformed),
    ),
    ("nesting-64k.json", 0, Answer::Refused(ErrorCode::Malformed)),
    ("nesting-1mib.json", 0, Answer::NotSent),
    (
        "oversize-64k-plus-1.json",
        0,
        Answer::Refused(ErrorCode::Oversize),
    ),
    (
        "nul-in-socket-path.json",
        0,
        Answer::Refused(ErrorCode::BadPath),
    ),
    ("defaults-spelled-out.json", 0, Answer::Answered),
];

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/proto/tests/corpus/control")
}

/// Sends `file` with `fds` copies of /dev/null on a fresh connection; what faultd did.
fn send(faultd: &Faultd, file: &str, fds: usize, null: BorrowedFd<'_>) -> Answer {
    let bytes = std::fs::read(corpus_dir().join(file)).unwrap();
    let mut conn = Client::connect(faultd.socket()).unwrap().into_raw();
    if let Err(e) = conn.send(&bytes, &vec![null; fds]) {
        assert!(format!("{e:?}").contains("EMSGSIZE"), "{file}: {e:?}");
        return Answer::NotSent;
    }
    let answer = match conn.recv().unwrap() {
        None => return Answer::HangsUp,
        Some(bytes) => faultd_proto::decode::<Response>(&bytes).unwrap(),
    };
    match answer {
        Response::Error { code, message } => {
            // After an error faultd closes the connection.
            assert!(conn.recv().unwrap().is_none(), "{file}: left open");
            assert!(!message.is_empty(), "{file}");
            Answer::Refused(code)
        }
        _ => Answer::Answered,
    }
}

#[test]
fn every_control_corpus_packet_is_answered_as_recorded() {
    let mut files: Vec<String> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    let mut listed: Vec<&str> = CORPUS.iter().map(|(f, ..)| *f).collect();
    listed.sort();
    assert_eq!(files, listed, "corpus files and their answers differ");
    let faultd = Faultd::start(&[]);
    let null = File::open("/dev/null").unwrap();

    for (file, fds, want) in CORPUS {
        let got = send(&faultd, file, *fds, null.as_fd());

        assert_eq!(got, *want, "{file} with {fds} fds");
    }

    // Still serving: a valid request on a new connection is answered.
    assert_eq!(
        send(&faultd, "defaults-spelled-out.json", 0, null.as_fd()),
        Answer::Answered
    );
}

/// docs/protocol.md: at most 64 fds per message, a packet with more is refused `oversize`
/// (faultd receives up to the kernel's 253 and counts them; it once let 65..=76 through).
#[test]
fn more_than_64_fds_are_refused_as_oversize() {
    let faultd = Faultd::start(&[]);
    let null = File::open("/dev/null").unwrap();

    let got = send(&faultd, "register-65-fds.json", 65, null.as_fd());

    assert_eq!(got, Answer::Refused(ErrorCode::Oversize));
}
