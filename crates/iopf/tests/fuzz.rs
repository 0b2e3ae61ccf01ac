//! Hostile input for what iopf reads from the other side, through the public API only: page
//! request records (as bytes, and as fields), streams of them through [`GroupAssembler`], and
//! the headers of the ring and emulated IOMMU table memfds a VMM hands over.
//!
//! What must hold: nothing panics; a record is accepted exactly when every field is in range,
//! and otherwise refused with the error of the first field out of range in `RecordError`'s
//! documented order; every group reported is within bounds and every group is reported once;
//! a memfd opens exactly when its header describes layout v1 and its size matches, and
//! otherwise fails with the error naming the first field that does not.
//!
//! The ring's indices and slots under a hostile producer are covered by the property in
//! `src/ring/tests.rs` (it needs the private layout offsets). Case counts are bounded so that
//! CI runs these in seconds; `PROPTEST_CASES=N` runs each property N times instead. The
//! hostile inputs worth keeping are replayed with their exact outcomes by the `corpus_*` tests.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use iopf::emulated::{EmulatedIommu, TableError, TableGeometry, TABLE_MAGIC, TABLE_VERSION};
use iopf::model::{GroupAssembler, MAX_GROUP_PAGES};
use iopf::ring::{RingConsumer, RingError, RingGeometry, RING_MAGIC, RING_VERSION};
use iopf::sys::{self, iommu_hwpt_pgfault};
use iopf::{DevId, Incoming, Iova, PageRequest, Perm, RecordError};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::memfd::{memfd_create, MFdFlags};
use proptest::prelude::*;

/// `cases` runs per property, unless `PROPTEST_CASES` says otherwise.
fn cases(cases: u32) -> ProptestConfig {
    match std::env::var("PROPTEST_CASES") {
        Ok(_) => ProptestConfig::default(),
        Err(_) => ProptestConfig::with_cases(cases),
    }
}

const DEV: DevId = DevId(7);

// ---- Records ------------------------------------------------------------------------------

/// Nothing (two times in three), or one or two fields of a record set to these values.
fn damages<T: std::fmt::Debug + Clone + 'static>(
    value: impl Strategy<Value = T> + 'static,
) -> impl Strategy<Value = Vec<(usize, T)>> {
    prop_oneof![
        2 => Just(Vec::new()),
        1 => prop::collection::vec((any::<usize>(), value), 1..=2),
    ]
}

/// A value for a damaged `u32` field: its edges or anything.
fn any_u32() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), Just(1), Just(u32::MAX), any::<u32>()]
}

/// A valid record (two times in three), or one with one or two fields set to anything.
fn record() -> impl Strategy<Value = iommu_hwpt_pgfault> {
    (
        (
            0..4u32,
            prop_oneof![Just(DEV.0), Just(DEV.0 + 1)],
            any::<u32>(),
        ),
        (
            0..=0x1ffu32,
            0..16u32,
            (0..1u64 << 40).prop_map(|a| a & !0xfff),
            1..4u32,
        ),
        damages((
            any_u32(),
            prop_oneof![any::<u64>(), Just(0x1001u64), Just(u64::MAX)],
        )),
    )
        .prop_map(
            |((flags, dev_id, pasid), (grpid, perm, addr, cookie), damages)| {
                let mut r = iommu_hwpt_pgfault {
                    flags,
                    dev_id,
                    pasid,
                    grpid,
                    perm,
                    __reserved: 0,
                    addr,
                    length: 0,
                    cookie,
                };
                for (field, (v, wide)) in damages {
                    match field % 9 {
                        0 => r.flags = v,
                        1 => r.dev_id = v,
                        2 => r.pasid = v,
                        3 => r.grpid = v,
                        4 => r.perm = v,
                        5 => r.__reserved = v,
                        6 => r.addr = wide,
                        7 => r.length = v,
                        _ => r.cookie = v,
                    }
                }
                r
            },
        )
}

/// What `PageRequest::from_raw` must say about `r`: the first field out of range, in the
/// documented order, else the request.
fn expected(r: &iommu_hwpt_pgfault) -> Result<PageRequest, RecordError> {
    if r.flags > 3 {
        return Err(RecordError::UnknownFlags(r.flags));
    }
    if r.perm > 15 {
        return Err(RecordError::UnknownPerm(r.perm));
    }
    if r.__reserved != 0 {
        return Err(RecordError::Reserved(r.__reserved));
    }
    if r.length != 0 {
        return Err(RecordError::Length(r.length));
    }
    if r.grpid > 0x1ff {
        return Err(RecordError::GrpidTooWide(r.grpid));
    }
    if !r.addr.is_multiple_of(4096) {
        return Err(RecordError::Unaligned(r.addr));
    }
    if r.cookie == 0 {
        return Err(RecordError::ZeroCookie);
    }
    Ok(PageRequest {
        dev_id: DevId(r.dev_id),
        pasid: (r.flags & 1 != 0).then_some(r.pasid),
        grpid: r.grpid,
        perm: Perm::from_bits(r.perm).expect("checked above"),
        addr: Iova(r.addr),
        last: r.flags & 2 != 0,
        cookie: r.cookie,
    })
}

proptest! {
    #![proptest_config(cases(16384))]

    #[test]
    fn record_bytes_are_the_fields_little_endian_at_their_offsets(bytes in any::<[u8; 40]>()) {
        let r = sys::pgfault_from_bytes(&bytes);

        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        prop_assert_eq!(
            [r.flags, r.dev_id, r.pasid, r.grpid, r.perm, r.__reserved, r.length, r.cookie],
            [u32_at(0), u32_at(4), u32_at(8), u32_at(12), u32_at(16), u32_at(20), u32_at(32), u32_at(36)]
        );
        prop_assert_eq!(r.addr, u64::from_le_bytes(bytes[24..32].try_into().unwrap()));
        prop_assert_eq!(sys::pgfault_to_bytes(&r), bytes);
        prop_assert_eq!(PageRequest::from_raw(&r), expected(&r));
    }

    #[test]
    fn records_are_accepted_exactly_when_every_field_is_in_range(r in record()) {
        let got = PageRequest::from_raw(&r);

        prop_assert_eq!(got, expected(&r));
        if let Ok(req) = got {
            let back = req.to_raw();
            prop_assert_eq!(PageRequest::from_raw(&back), Ok(req));
            let pasid = if r.flags & 1 != 0 { r.pasid } else { 0 };
            prop_assert_eq!(sys::pgfault_to_bytes(&back), sys::pgfault_to_bytes(&iommu_hwpt_pgfault { pasid, ..r }));
        }
    }
}

// ---- Streams of records -------------------------------------------------------------------

/// Runs of records of one group (one cookie, consecutive pages), the last one maybe LAST;
/// some runs longer than a group may be, some with one record replaced by any other record.
fn stream() -> impl Strategy<Value = Vec<iommu_hwpt_pgfault>> {
    let run = (
        prop_oneof![
            8 => 1..8usize,
            1 => Just(MAX_GROUP_PAGES),
            1 => Just(MAX_GROUP_PAGES + 1),
        ],
        record(),
        prop::option::weighted(0.3, (any::<prop::sample::Index>(), record())),
        any::<bool>(),
    )
        .prop_map(|(len, first, replaced, close)| {
            let mut run: Vec<iommu_hwpt_pgfault> = (0..len)
                .map(|i| iommu_hwpt_pgfault {
                    addr: first.addr.wrapping_add(4096 * i as u64),
                    flags: first.flags & !sys::PGFAULT_FLAGS_LAST_PAGE,
                    ..first
                })
                .collect();
            if let Some((at, other)) = replaced {
                run[at.index(len)] = other;
            }
            if close {
                run[len - 1].flags |= sys::PGFAULT_FLAGS_LAST_PAGE;
            }
            run
        });
    prop::collection::vec(run, 1..8).prop_map(|runs| runs.concat())
}

/// How many groups a stream closes (LAST, another cookie, or the final abandon) and how many
/// zero-cookie records it has, counted without the assembler.
fn closures(records: &[iommu_hwpt_pgfault]) -> (usize, usize) {
    let (mut closed, mut zero, mut open) = (0, 0, None);
    for r in records {
        if open.is_some_and(|c| c != r.cookie) {
            closed += 1;
            open = None;
        }
        if r.cookie == 0 {
            zero += 1;
            continue;
        }
        open = Some(r.cookie);
        if r.flags & sys::PGFAULT_FLAGS_LAST_PAGE != 0 {
            closed += 1;
            open = None;
        }
    }
    (closed + usize::from(open.is_some()), zero)
}

proptest! {
    #![proptest_config(cases(4096))]

    #[test]
    fn every_group_is_reported_once_and_within_bounds(
        records in stream(),
        one_device in any::<bool>(),
    ) {
        let mut asm = if one_device { GroupAssembler::for_device(DEV) } else { GroupAssembler::new() };
        let mut out = Vec::new();

        for r in &records {
            let got = asm.push(r, &mut out);

            let want = expected(r).and_then(|req| match req.dev_id {
                d if one_device && d != DEV => Err(RecordError::ForeignDevice { expected: DEV.0, got: d.0 }),
                _ => Ok(()),
            }).map(drop);
            prop_assert_eq!(got, want);
        }
        asm.abandon("end of stream", &mut out);

        prop_assert!(!asm.has_open_group());
        let (closed, zero) = closures(&records);
        let with_cookie = out.iter().filter(|e| !matches!(e, Incoming::Malformed { cookie: None, .. })).count();
        prop_assert_eq!((with_cookie, out.len() - with_cookie), (closed, zero));
        for entry in &out {
            match entry {
                Incoming::Group(g) => {
                    prop_assert!(g.cookie != 0 && g.grpid <= 0x1ff);
                    prop_assert!((1..=MAX_GROUP_PAGES).contains(&g.pages.len()));
                    prop_assert!(!one_device || g.dev_id == DEV);
                    prop_assert!(g.pages.iter().all(|(a, p)| a.0.is_multiple_of(4096) && p.bits() <= 15));
                }
                Incoming::Malformed { cookie, reason } => {
                    prop_assert!(*cookie != Some(0) && !reason.is_empty());
                }
            }
        }
    }
}

// ---- Memfd headers ------------------------------------------------------------------------

fn memfd(header: &[u8], size: u64) -> OwnedFd {
    let fd = memfd_create("fuzz", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
    nix::unistd::ftruncate(&fd, size as i64).unwrap();
    nix::sys::uio::pwrite(&fd, header, 0).unwrap();
    fd
}

fn eventfd() -> OwnedFd {
    EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .unwrap()
        .into()
}

fn slots() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => (1..=12u32).prop_map(|s| 1 << s),
        1 => Just(0u32),
        1 => Just(1u32),
        1 => Just(8192u32),
        1 => Just(6u32),
        1 => any::<u32>(),
    ]
}

/// A ring header (magic, version, req_slots, resp_slots) and the memfd's size (`None`: what
/// the slots need): valid, or with one or two fields set to anything.
fn ring_header() -> impl Strategy<Value = ([u32; 4], Option<u64>)> {
    (
        (1..=12u32, 1..=12u32),
        damages(prop_oneof![slots(), any_u32()]),
        prop_oneof![
            3 => Just(None),
            1 => prop_oneof![Just(0u64), Just(8), Just(4096), Just(8192), 0..300_000u64].prop_map(Some),
        ],
    )
        .prop_map(|((req, resp), damages, size)| {
            let mut h = [RING_MAGIC, RING_VERSION, 1 << req, 1 << resp];
            for (field, v) in damages {
                h[field % 4] = v;
            }
            (h, size)
        })
}

/// What opening a ring memfd with this header and size must say, in the documented order.
fn ring_verdict(h: [u32; 4], size: u64) -> Result<RingGeometry, String> {
    if size < 16 {
        return Err(format!("Size {size} 4096"));
    }
    if h[0] != RING_MAGIC {
        return Err(format!("Magic {}", h[0]));
    }
    if h[1] != RING_VERSION {
        return Err(format!("Version {}", h[1]));
    }
    let ok = |n: u32| n.is_power_of_two() && (2..=4096).contains(&n);
    for (which, n) in [("req_slots", h[2]), ("resp_slots", h[3])] {
        if !ok(n) {
            return Err(format!("SlotCount {which} {n}"));
        }
    }
    let need = (512 + 40 * u64::from(h[2]) + 8 * u64::from(h[3])).next_multiple_of(4096);
    if size != need {
        return Err(format!("Size {size} {need}"));
    }
    Ok(RingGeometry::new(h[2], h[3]).unwrap())
}

fn ring_outcome(got: Result<RingConsumer, RingError>) -> Result<RingGeometry, String> {
    got.map(|c| c.geometry()).map_err(|e| match e {
        RingError::Size { actual, expected } => format!("Size {actual} {expected}"),
        RingError::Magic(m) => format!("Magic {m}"),
        RingError::Version(v) => format!("Version {v}"),
        RingError::SlotCount { which, value } => format!("SlotCount {which} {value}"),
        other => format!("{other:?}"),
    })
}

fn table_header() -> impl Strategy<Value = ([u32; 4], [u64; 2], Option<u64>)> {
    (
        (12..=21u32, 1..=16u32, 0..1u64 << 20, 1..=4096u64),
        damages(prop_oneof![
            prop_oneof![
                Just(11u64),
                Just(22),
                Just(0),
                Just(17),
                Just(1 << 28),
                Just((1 << 28) + 1)
            ],
            Just(u64::MAX - (1 << 21) + 1),
            any::<u64>(),
        ]),
        prop_oneof![
            3 => Just(None),
            1 => prop_oneof![Just(0u64), Just(31), Just(4096), 0..100_000u64].prop_map(Some),
        ],
    )
        .prop_map(|((shift, workers, base, entries), damages, size)| {
            let mut h = [TABLE_MAGIC, TABLE_VERSION, shift, workers];
            let mut w = [base << 21, entries];
            for (field, v) in damages {
                match field % 6 {
                    f @ 0..=3 => h[f] = v as u32,
                    f => w[f - 4] = v,
                }
            }
            (h, w, size)
        })
}

/// What opening a table memfd with this header and size must say, in the documented order.
fn table_verdict(h: [u32; 4], w: [u64; 2], size: u64) -> Result<TableGeometry, String> {
    let [magic, version, shift, workers] = h;
    let [base, entries] = w;
    if size < 32 {
        return Err(format!("Size {size} 4096"));
    }
    if magic != TABLE_MAGIC {
        return Err(format!("Magic {magic}"));
    }
    if version != TABLE_VERSION {
        return Err(format!("Version {version}"));
    }
    if !(12..=21).contains(&shift) {
        return Err(format!("GranuleShift {shift}"));
    }
    if !(1..=16).contains(&workers) {
        return Err(format!("Workers {workers}"));
    }
    if !(1..=1 << 28).contains(&entries) {
        return Err(format!("Entries {entries}"));
    }
    let end = u128::from(base) + (u128::from(entries) << shift);
    if !base.is_multiple_of(1 << shift) || end > u128::from(u64::MAX) {
        return Err(format!("IovaBase {base}"));
    }
    let need = (1088 + 4 * entries).next_multiple_of(4096);
    if size != need {
        return Err(format!("Size {size} {need}"));
    }
    Ok(TableGeometry::new(shift, workers, Iova(base), entries).unwrap())
}

fn table_outcome(got: Result<EmulatedIommu, TableError>) -> Result<TableGeometry, String> {
    got.map(|t| t.geometry()).map_err(|e| match e {
        TableError::Size { actual, expected } => format!("Size {actual} {expected}"),
        TableError::Magic(m) => format!("Magic {m}"),
        TableError::Version(v) => format!("Version {v}"),
        TableError::GranuleShift(s) => format!("GranuleShift {s}"),
        TableError::Workers(w) => format!("Workers {w}"),
        TableError::Entries(n) => format!("Entries {n}"),
        TableError::IovaBase(b) => format!("IovaBase {b}"),
        other => format!("{other:?}"),
    })
}

fn table_bytes(h: [u32; 4], w: [u64; 2]) -> Vec<u8> {
    let mut bytes: Vec<u8> = h.iter().flat_map(|v| v.to_le_bytes()).collect();
    bytes.extend(w.iter().flat_map(|v| v.to_le_bytes()));
    bytes
}

proptest! {
    #![proptest_config(cases(2048))]

    #[test]
    fn ring_memfds_open_exactly_when_header_and_size_are_layout_v1(
        (header, size) in ring_header(),
    ) {
        let need = RingGeometry::new(header[2], header[3]).map(|g| g.size()).unwrap_or(4096);
        let size = size.unwrap_or(need);
        let bytes: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
        let fd = memfd(&bytes[..bytes.len().min(size as usize)], size);

        let got = RingConsumer::new(fd, eventfd(), eventfd(), DEV);

        prop_assert_eq!(ring_outcome(got), ring_verdict(header, size));
    }

    #[test]
    fn table_memfds_open_exactly_when_header_and_size_are_layout_v1(
        (header, words, size) in table_header(),
    ) {
        let need = TableGeometry::new(header[2], header[3], Iova(words[0]), words[1])
            .map(|g| g.size())
            .unwrap_or(4096);
        let size = size.unwrap_or(need);
        let bytes = table_bytes(header, words);
        let fd = memfd(&bytes[..bytes.len().min(size as usize)], size);

        let got = EmulatedIommu::from_fd(fd);

        prop_assert_eq!(table_outcome(got), table_verdict(header, words, size));
    }
}

// ---- The corpus ---------------------------------------------------------------------------
//
// tests/corpus/records: one 40-byte record per file. tests/corpus/ring and tests/corpus/table:
// the whole contents of a ring or table memfd per file (its size is the file's). Each file has
// its expected outcome below; a file without one, or one without a file, fails the replay.

fn corpus(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(kind)
}

/// The corpus files of `kind` with their contents, checked to be exactly `listed`.
fn corpus_files(kind: &str, listed: &[&str]) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<String> = std::fs::read_dir(corpus(kind))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    let mut want: Vec<String> = listed.iter().map(|f| f.to_string()).collect();
    want.sort();
    assert_eq!(
        files, want,
        "{kind} corpus files and their expectations differ"
    );
    files
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(corpus(kind).join(&f)).unwrap();
            (f, bytes)
        })
        .collect()
}

/// A memfd holding exactly `bytes`.
fn memfd_of(bytes: &[u8]) -> OwnedFd {
    memfd(bytes, bytes.len() as u64)
}

const RECORDS: &[(&str, RecordError)] = &[
    ("unknown-flag-bit-2.bin", RecordError::UnknownFlags(6)),
    ("all-flag-bits.bin", RecordError::UnknownFlags(u32::MAX)),
    ("perm-bit-4.bin", RecordError::UnknownPerm(16)),
    ("reserved-set.bin", RecordError::Reserved(1)),
    ("length-hint.bin", RecordError::Length(4096)),
    ("grpid-0x200.bin", RecordError::GrpidTooWide(0x200)),
    ("grpid-max.bin", RecordError::GrpidTooWide(u32::MAX)),
    ("unaligned-addr.bin", RecordError::Unaligned(0x1001)),
    ("addr-max.bin", RecordError::Unaligned(u64::MAX)),
    ("zero-cookie.bin", RecordError::ZeroCookie),
    // Several fields out of range: the first in RecordError's order is named.
    ("all-ones.bin", RecordError::UnknownFlags(u32::MAX)),
    ("all-zero.bin", RecordError::ZeroCookie),
    (
        "foreign-device.bin",
        RecordError::ForeignDevice {
            expected: DEV.0,
            got: DEV.0 + 1,
        },
    ),
];

#[test]
fn corpus_records_are_refused_with_the_first_field_out_of_range() {
    let listed: Vec<&str> = RECORDS.iter().map(|(f, _)| *f).collect();
    let files = corpus_files("records", &listed);

    for ((file, bytes), (_, want)) in files.iter().zip(sorted(RECORDS)) {
        let bytes: &[u8; 40] = bytes.as_slice().try_into().expect("a record is 40 bytes");
        let mut asm = GroupAssembler::for_device(DEV);
        let mut out = Vec::new();

        let got = asm.push(&sys::pgfault_from_bytes(bytes), &mut out);

        assert_eq!(got, Err(*want), "{file}");
        // Its group (or, without a cookie, the record alone) is reported malformed, once.
        asm.abandon("end", &mut out);
        assert!(
            matches!(&out[..], [Incoming::Malformed { .. }]),
            "{file}: {out:?}"
        );
    }
}

/// `table` sorted by file name, as `corpus_files` returns the files.
fn sorted<'a, T>(table: &'a [(&'static str, T)]) -> Vec<&'a (&'static str, T)> {
    let mut v: Vec<_> = table.iter().collect();
    v.sort_by_key(|(f, _)| *f);
    v
}

const RING_MEMFDS: &[(&str, &str)] = &[
    ("zero-size.bin", "Size 0 4096"),
    ("header-cut-short.bin", "Size 12 4096"),
    ("wrong-magic.bin", "Magic 1196576839"),
    ("version-2.bin", "Version 2"),
    ("zero-slots.bin", "SlotCount req_slots 0"),
    ("one-response-slot.bin", "SlotCount resp_slots 1"),
    ("slots-not-a-power-of-two.bin", "SlotCount req_slots 6"),
    ("8192-slots.bin", "SlotCount req_slots 8192"),
    ("u32-max-slots.bin", "SlotCount resp_slots 4294967295"),
    ("a-page-short.bin", "Size 196608 200704"),
    ("a-page-long.bin", "Size 8192 4096"),
];

#[test]
fn corpus_ring_memfds_are_refused_naming_the_field() {
    let listed: Vec<&str> = RING_MEMFDS.iter().map(|(f, _)| *f).collect();
    let files = corpus_files("ring", &listed);

    for ((file, bytes), (_, want)) in files.iter().zip(sorted(RING_MEMFDS)) {
        let got = ring_outcome(RingConsumer::new(
            memfd_of(bytes),
            eventfd(),
            eventfd(),
            DEV,
        ));

        assert_eq!(got, Err(want.to_string()), "{file}");
    }
}

const TABLE_MEMFDS: &[(&str, &str)] = &[
    ("header-cut-short.bin", "Size 31 4096"),
    ("wrong-magic.bin", "Magic 0"),
    ("version-0.bin", "Version 0"),
    ("granule-2k.bin", "GranuleShift 11"),
    ("granule-4m.bin", "GranuleShift 22"),
    ("no-workers.bin", "Workers 0"),
    ("17-workers.bin", "Workers 17"),
    ("no-entries.bin", "Entries 0"),
    ("too-many-entries.bin", "Entries 268435457"),
    ("entries-u64-max.bin", "Entries 18446744073709551615"),
    ("unaligned-base.bin", "IovaBase 4096"),
    ("range-past-2-64.bin", "IovaBase 18446744073707454464"),
    ("memfd-too-small.bin", "Size 4096 4198400"),
];

#[test]
fn corpus_table_memfds_are_refused_naming_the_field() {
    let listed: Vec<&str> = TABLE_MEMFDS.iter().map(|(f, _)| *f).collect();
    let files = corpus_files("table", &listed);

    for ((file, bytes), (_, want)) in files.iter().zip(sorted(TABLE_MEMFDS)) {
        let got = table_outcome(EmulatedIommu::from_fd(memfd_of(bytes)));

        assert_eq!(got, Err(want.to_string()), "{file}");
    }
}

#[test]
fn fds_that_are_not_memfds_or_eventfds_are_refused() {
    let file = tempfile::tempfile().unwrap();
    file.set_len(4096).unwrap();
    let plain = || OwnedFd::from(file.try_clone().unwrap());

    let ring = RingConsumer::new(plain(), eventfd(), eventfd(), DEV);
    let table = EmulatedIommu::from_fd(plain());
    let kick_not_eventfd = {
        let ch = iopf::ring::RingChannel::create(8, 4).unwrap();
        RingConsumer::new(ch.memfd, plain(), ch.notify.into(), DEV)
    };

    assert!(matches!(ring, Err(RingError::Io { op, .. }) if op.contains("sealing")));
    assert!(matches!(table, Err(TableError::Io { op, .. }) if op.contains("sealing")));
    assert!(matches!(
        kick_not_eventfd,
        Err(RingError::NotEventFd("kick"))
    ));
}

/// The corpus files, as they are written: `cargo test -- --ignored write_corpus_files`
/// rewrites them from these definitions.
#[test]
#[ignore = "writes the corpus; run by hand after changing a definition"]
fn write_corpus_files() {
    let valid = iommu_hwpt_pgfault {
        flags: sys::PGFAULT_FLAGS_LAST_PAGE,
        dev_id: DEV.0,
        pasid: 0,
        grpid: 1,
        perm: sys::PGFAULT_PERM_READ,
        __reserved: 0,
        addr: 0x1000,
        length: 0,
        cookie: 9,
    };
    /// A file name and what is wrong with the valid record.
    type Damage = (&'static str, fn(&mut iommu_hwpt_pgfault));
    let records: [Damage; 11] = [
        ("unknown-flag-bit-2.bin", |r| r.flags |= 4),
        ("all-flag-bits.bin", |r| r.flags = u32::MAX),
        ("perm-bit-4.bin", |r| r.perm = 16),
        ("reserved-set.bin", |r| r.__reserved = 1),
        ("length-hint.bin", |r| r.length = 4096),
        ("grpid-0x200.bin", |r| r.grpid = 0x200),
        ("grpid-max.bin", |r| r.grpid = u32::MAX),
        ("unaligned-addr.bin", |r| r.addr = 0x1001),
        ("addr-max.bin", |r| r.addr = u64::MAX),
        ("zero-cookie.bin", |r| r.cookie = 0),
        ("foreign-device.bin", |r| r.dev_id = DEV.0 + 1),
    ];
    let write = |kind: &str, name: &str, bytes: &[u8]| {
        std::fs::create_dir_all(corpus(kind)).unwrap();
        std::fs::write(corpus(kind).join(name), bytes).unwrap();
    };
    for (name, damage) in records {
        let mut r = valid;
        damage(&mut r);
        write("records", name, &sys::pgfault_to_bytes(&r));
    }
    write("records", "all-ones.bin", &[0xff; 40]);
    write("records", "all-zero.bin", &[0; 40]);

    let good = RingGeometry::new(8, 4).unwrap().size();
    let rings: [(&str, [u32; 4], u64); 11] = [
        ("zero-size.bin", [RING_MAGIC, 1, 8, 4], 0),
        ("header-cut-short.bin", [RING_MAGIC, 1, 8, 4], 12),
        ("wrong-magic.bin", [0x4752_5047, 1, 8, 4], good),
        ("version-2.bin", [RING_MAGIC, 2, 8, 4], good),
        ("zero-slots.bin", [RING_MAGIC, 1, 0, 4], good),
        ("one-response-slot.bin", [RING_MAGIC, 1, 8, 1], good),
        ("slots-not-a-power-of-two.bin", [RING_MAGIC, 1, 6, 4], good),
        ("8192-slots.bin", [RING_MAGIC, 1, 8192, 4], good),
        ("u32-max-slots.bin", [RING_MAGIC, 1, 8, u32::MAX], good),
        ("a-page-short.bin", [RING_MAGIC, 1, 4096, 4096], 196_608),
        ("a-page-long.bin", [RING_MAGIC, 1, 8, 4], good + 4096),
    ];
    for (name, header, size) in rings {
        let mut bytes: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
        bytes.resize(size as usize, 0);
        write("ring", name, &bytes);
    }

    let m = TABLE_MAGIC;
    /// A file name, the header's u32 words, its u64 words, the memfd's size.
    type Table = (&'static str, [u32; 4], [u64; 2], u64);
    let tables: [Table; 13] = [
        ("header-cut-short.bin", [m, 1, 12, 1], [0, 1], 31),
        ("wrong-magic.bin", [0, 1, 12, 1], [0, 1], 4096),
        ("version-0.bin", [m, 0, 12, 1], [0, 1], 4096),
        ("granule-2k.bin", [m, 1, 11, 1], [0, 1], 4096),
        ("granule-4m.bin", [m, 1, 22, 1], [0, 1], 4096),
        ("no-workers.bin", [m, 1, 12, 0], [0, 1], 4096),
        ("17-workers.bin", [m, 1, 12, 17], [0, 1], 4096),
        ("no-entries.bin", [m, 1, 12, 1], [0, 0], 4096),
        (
            "too-many-entries.bin",
            [m, 1, 12, 1],
            [0, (1 << 28) + 1],
            4096,
        ),
        ("entries-u64-max.bin", [m, 1, 21, 16], [0, u64::MAX], 4096),
        ("unaligned-base.bin", [m, 1, 21, 1], [4096, 1], 4096),
        (
            "range-past-2-64.bin",
            [m, 1, 21, 1],
            [u64::MAX - (1 << 21) + 1, 1],
            4096,
        ),
        ("memfd-too-small.bin", [m, 1, 12, 1], [0, 1 << 20], 4096),
    ];
    for (name, header, words, size) in tables {
        let mut bytes = table_bytes(header, words);
        bytes.resize(size as usize, 0);
        write("table", name, &bytes);
    }
}
