use std::os::fd::AsFd;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use proptest::prelude::*;

use super::*;
use crate::model::{REASON_INCONSISTENT, REASON_INTERRUPTED};
use crate::Group;

const DEV: DevId = DevId(1);

/// A channel with both ends open, each with its own mapping of the memfd, as a VMM and faultd
/// would have. `start` sets all four indices first (to exercise wrap-around).
struct Pair {
    producer: RingProducer,
    consumer: RingConsumer,
    /// A third mapping, for tests playing a hostile producer.
    raw: SharedMapping,
}

fn pair_at(req_slots: u32, resp_slots: u32, start: u32) -> Pair {
    let ch = RingChannel::create(req_slots, resp_slots).unwrap();
    for off in [OFF_REQ_PROD, OFF_REQ_CONS, OFF_RESP_PROD, OFF_RESP_CONS] {
        nix::sys::uio::pwrite(&ch.memfd, &start.to_le_bytes(), off as i64).unwrap();
    }
    let kick = OwnedFd::from(ch.kick);
    let notify = OwnedFd::from(ch.notify);
    let raw = SharedMapping::map(
        ch.memfd.as_fd(),
        RingGeometry::new(req_slots, resp_slots).unwrap().size() as usize,
    )
    .unwrap();
    let producer = RingProducer::new(
        ch.memfd.try_clone().unwrap(),
        kick.try_clone().unwrap(),
        notify.try_clone().unwrap(),
    )
    .unwrap();
    let consumer = RingConsumer::new(ch.memfd, kick, notify, DEV).unwrap();
    Pair {
        producer,
        consumer,
        raw,
    }
}

fn pair(req_slots: u32, resp_slots: u32) -> Pair {
    pair_at(req_slots, resp_slots, 0)
}

fn pages(addrs: &[u64]) -> Vec<(Iova, Perm)> {
    addrs.iter().map(|&a| (Iova(a), Perm::READ)).collect()
}

fn readable(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).unwrap() == 1
}

fn group(cookie: u32, grpid: u32, addrs: &[u64]) -> Incoming {
    Incoming::Group(Group {
        cookie,
        dev_id: DEV,
        pasid: None,
        grpid,
        pages: pages(addrs),
    })
}

#[test]
fn multi_page_groups_and_responses_round_trip_between_two_mappings() {
    let mut p = pair(8, 4);
    let mut incoming = Vec::new();
    let mut answers = Vec::new();

    let a = p
        .producer
        .post_group(DEV, 3, &pages(&[0x1000, 0x2000, 0x3000]))
        .unwrap();
    let b = p.producer.post_group(DEV, 4, &pages(&[0x9000])).unwrap();
    let kicked = readable(p.consumer.fd());
    p.consumer.read(&mut incoming).unwrap();
    p.consumer.respond(a, ResponseCode::Success).unwrap();
    p.consumer.respond(b, ResponseCode::Invalid).unwrap();
    let notified = readable(p.producer.notify_fd());
    p.producer.poll_responses(&mut answers).unwrap();

    assert!(kicked);
    assert_eq!(
        incoming,
        vec![
            group(a, 3, &[0x1000, 0x2000, 0x3000]),
            group(b, 4, &[0x9000])
        ]
    );
    assert!(notified);
    assert_eq!(
        answers,
        vec![(a, ResponseCode::Success), (b, ResponseCode::Invalid)]
    );
    assert_eq!(p.consumer.stats(), RingStats::default());
}

#[test]
fn read_drains_the_kick_eventfd() {
    let mut p = pair(4, 4);
    let mut incoming = Vec::new();
    p.producer.post_group(DEV, 0, &pages(&[0x1000])).unwrap();

    p.consumer.read(&mut incoming).unwrap();

    assert!(!readable(p.consumer.fd()));
    assert_eq!(incoming.len(), 1);
}

#[test]
fn read_of_an_empty_ring_appends_nothing() {
    let mut p = pair(4, 4);
    let mut incoming = Vec::new();

    p.consumer.read(&mut incoming).unwrap();

    assert!(incoming.is_empty());
}

#[test]
fn post_group_fails_when_full_and_succeeds_after_faultd_consumes() {
    let mut p = pair(4, 4);
    let mut incoming = Vec::new();

    p.producer
        .post_group(DEV, 0, &pages(&[0x1000, 0x2000, 0x3000]))
        .unwrap();
    let full = p.producer.post_group(DEV, 0, &pages(&[0x4000, 0x5000]));
    p.consumer.read(&mut incoming).unwrap();
    let after = p.producer.post_group(DEV, 0, &pages(&[0x4000, 0x5000]));

    assert!(matches!(full, Err(PostError::Full { needed: 2, free: 1 })));
    assert!(after.is_ok());
}

#[test]
fn group_larger_than_the_ring_is_refused() {
    let mut p = pair(4, 4);

    let res = p
        .producer
        .post_group(DEV, 0, &pages(&[0x1000, 0x2000, 0x3000, 0x4000, 0x5000]));

    assert!(matches!(res, Err(PostError::TooLarge { pages: 5, max: 4 })));
}

#[test]
fn post_group_refuses_empty_and_invalid_groups() {
    let mut p = pair(4, 4);

    let empty = p.producer.post_group(DEV, 0, &[]);
    let unaligned = p.producer.post_group(DEV, 0, &pages(&[0x1001]));
    let wide = p.producer.post_group(DEV, 0x200, &pages(&[0x1000]));

    assert!(matches!(empty, Err(PostError::EmptyGroup)));
    assert!(matches!(
        unaligned,
        Err(PostError::Invalid(RecordError::Unaligned(0x1001)))
    ));
    assert!(matches!(
        wide,
        Err(PostError::Invalid(RecordError::GrpidTooWide(0x200)))
    ));
}

#[test]
fn free_running_indices_wrap_past_u32_max() {
    let mut p = pair_at(4, 2, u32::MAX - 2);
    let mut incoming = Vec::new();
    let mut answers = Vec::new();
    let mut cookies = Vec::new();

    for round in 0..6u64 {
        let base = round * 0x10_000;
        let c = p
            .producer
            .post_group(DEV, 1, &pages(&[base, base + 0x1000, base + 0x2000]))
            .unwrap();
        p.consumer.read(&mut incoming).unwrap();
        p.consumer.respond(c, ResponseCode::Success).unwrap();
        p.producer.poll_responses(&mut answers).unwrap();
        cookies.push((c, ResponseCode::Success));
    }

    assert_eq!(incoming.len(), 6);
    assert!(incoming
        .iter()
        .all(|i| matches!(i, Incoming::Group(g) if g.pages.len() == 3)));
    assert_eq!(answers, cookies);
    assert_eq!(
        p.raw.u32_at(OFF_REQ_PROD).load(Ordering::Relaxed),
        (u32::MAX - 2).wrapping_add(18)
    );
    assert_eq!(p.consumer.stats(), RingStats::default());
}

#[test]
fn responses_wait_in_the_backlog_while_the_response_ring_is_full_then_drain() {
    let mut p = pair(8, 2);
    let mut incoming = Vec::new();
    let mut answers = Vec::new();
    let cookies: Vec<u32> = (0..5)
        .map(|i| {
            p.producer
                .post_group(DEV, 0, &pages(&[i * 0x1000]))
                .unwrap()
        })
        .collect();
    p.consumer.read(&mut incoming).unwrap();

    for &c in &cookies {
        p.consumer.respond(c, ResponseCode::Success).unwrap();
    }
    let backlog_when_full = p.consumer.stats().backlog;
    // The producer drains, and because the ring was full it kicks faultd, whose next read
    // moves held answers into the ring.
    for _ in 0..3 {
        p.producer.poll_responses(&mut answers).unwrap();
        p.consumer.read(&mut incoming).unwrap();
    }

    assert_eq!(backlog_when_full, 3);
    assert_eq!(
        answers,
        cookies
            .iter()
            .map(|&c| (c, ResponseCode::Success))
            .collect::<Vec<_>>()
    );
    assert_eq!(p.consumer.stats().backlog, 0);
    assert_eq!(p.consumer.stats().dropped_responses, 0);
}

#[test]
fn responses_beyond_the_backlog_are_dropped_and_counted() {
    let mut p = pair(4096, 2);
    let mut incoming = Vec::new();
    let total = 2 + RESPONSE_BACKLOG + 1;
    let mut cookies = Vec::new();
    while cookies.len() < total {
        let n = (total - cookies.len()).min(4096);
        for i in 0..n {
            cookies.push(
                p.producer
                    .post_group(DEV, 0, &pages(&[i as u64 * 0x1000]))
                    .unwrap(),
            );
        }
        p.consumer.read(&mut incoming).unwrap();
    }

    let results: Vec<_> = cookies
        .iter()
        .map(|&c| p.consumer.respond(c, ResponseCode::Invalid))
        .collect();

    assert!(results[..total - 1].iter().all(|r| r.is_ok()));
    assert!(matches!(results[total - 1], Err(RespondError::QueueFull)));
    assert_eq!(p.consumer.stats().dropped_responses, 1);
    assert_eq!(p.consumer.stats().backlog, RESPONSE_BACKLOG);
}

#[test]
fn answering_an_unknown_or_already_answered_cookie_is_refused() {
    let mut p = pair(4, 4);
    let mut incoming = Vec::new();
    let c = p.producer.post_group(DEV, 0, &pages(&[0x1000])).unwrap();
    p.consumer.read(&mut incoming).unwrap();

    let first = p.consumer.respond(c, ResponseCode::Success);
    let second = p.consumer.respond(c, ResponseCode::Success);
    let never = p.consumer.respond(c + 100, ResponseCode::Success);

    assert!(first.is_ok());
    assert!(matches!(second, Err(RespondError::UnknownCookie(x)) if x == c));
    assert!(matches!(never, Err(RespondError::UnknownCookie(_))));
}

fn write_record(raw: &SharedMapping, geo: RingGeometry, idx: u32, rec: iommu_hwpt_pgfault) {
    raw.write(geo.req_slot(idx), rec);
}

fn rec(cookie: u32, addr: u64, last: bool) -> iommu_hwpt_pgfault {
    PageRequest {
        dev_id: DEV,
        pasid: None,
        grpid: 2,
        perm: Perm::WRITE,
        addr: Iova(addr),
        last,
        cookie,
    }
    .to_raw()
}

#[test]
fn impossible_request_indices_resync_and_report_the_open_group() {
    let mut p = pair(4, 4);
    let geo = p.consumer.geometry();
    let mut incoming = Vec::new();
    write_record(&p.raw, geo, 0, rec(7, 0x1000, false));
    p.raw.u32_at(OFF_REQ_PROD).store(1, Ordering::Release);
    p.consumer.read(&mut incoming).unwrap();

    p.raw.u32_at(OFF_REQ_PROD).store(1 + 5, Ordering::Release);
    p.consumer.read(&mut incoming).unwrap();

    assert_eq!(
        incoming,
        vec![Incoming::Malformed {
            cookie: Some(7),
            reason: REASON_RESYNC
        }]
    );
    assert_eq!(p.consumer.stats().resyncs, 1);
    assert_eq!(p.raw.u32_at(OFF_REQ_CONS).load(Ordering::Acquire), 6);
    assert!(p.consumer.respond(7, ResponseCode::Invalid).is_ok());
}

#[test]
fn a_group_may_span_several_reads() {
    let mut p = pair(4, 4);
    let geo = p.consumer.geometry();
    let mut first = Vec::new();
    let mut second = Vec::new();
    write_record(&p.raw, geo, 0, rec(7, 0x1000, false));
    p.raw.u32_at(OFF_REQ_PROD).store(1, Ordering::Release);
    p.consumer.read(&mut first).unwrap();

    write_record(&p.raw, geo, 1, rec(7, 0x2000, true));
    p.raw.u32_at(OFF_REQ_PROD).store(2, Ordering::Release);
    p.consumer.read(&mut second).unwrap();

    assert!(first.is_empty());
    assert!(matches!(&second[..], [Incoming::Group(g)] if g.cookie == 7 && g.pages.len() == 2));
}

#[test]
fn record_for_another_device_is_malformed_and_counted() {
    let mut p = pair(4, 4);
    let geo = p.consumer.geometry();
    let mut incoming = Vec::new();
    let foreign = iommu_hwpt_pgfault {
        dev_id: 2,
        ..rec(7, 0x1000, true)
    };
    write_record(&p.raw, geo, 0, foreign);
    p.raw.u32_at(OFF_REQ_PROD).store(1, Ordering::Release);

    p.consumer.read(&mut incoming).unwrap();

    assert_eq!(
        incoming,
        vec![Incoming::Malformed {
            cookie: Some(7),
            reason: "record for another device"
        }]
    );
    assert_eq!(p.consumer.stats().malformed_records, 1);
    assert_eq!(p.consumer.stats().malformed_reported, 1);
}

fn eventfds() -> (OwnedFd, OwnedFd) {
    let e = || OwnedFd::from(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).unwrap());
    (e(), e())
}

fn consumer_for(memfd: OwnedFd) -> Result<RingConsumer, RingError> {
    let (kick, notify) = eventfds();
    RingConsumer::new(memfd, kick, notify, DEV)
}

fn patched(offset: u64, value: u32) -> OwnedFd {
    let ch = RingChannel::create(4, 4).unwrap();
    nix::sys::uio::pwrite(&ch.memfd, &value.to_le_bytes(), offset as i64).unwrap();
    ch.memfd
}

#[test]
fn consumer_rejects_a_memfd_with_the_wrong_magic() {
    let res = consumer_for(patched(0, 0x1234));

    assert!(matches!(res, Err(RingError::Magic(0x1234))));
}

#[test]
fn consumer_rejects_an_unknown_layout_version() {
    let res = consumer_for(patched(4, 2));

    assert!(matches!(res, Err(RingError::Version(2))));
}

#[test]
fn consumer_rejects_slot_counts_that_are_not_powers_of_two_in_range() {
    let three = consumer_for(patched(8, 3));
    let huge = consumer_for(patched(12, 8192));

    assert!(matches!(
        three,
        Err(RingError::SlotCount {
            which: "req_slots",
            value: 3
        })
    ));
    assert!(matches!(
        huge,
        Err(RingError::SlotCount {
            which: "resp_slots",
            value: 8192
        })
    ));
}

#[test]
fn consumer_rejects_a_memfd_whose_size_disagrees_with_its_header() {
    // Header says 128 request slots, the memfd was sized for 4.
    let res = consumer_for(patched(8, 128));

    assert!(matches!(
        res,
        Err(RingError::Size {
            actual: 4096,
            expected: 8192
        })
    ));
}

#[test]
fn consumer_rejects_a_regular_file_instead_of_a_memfd() {
    let file = tempfile::tempfile().unwrap();
    file.set_len(4096).unwrap();

    let res = consumer_for(file.into());

    assert!(matches!(res, Err(RingError::Io { .. })));
}

#[test]
fn consumer_rejects_a_kick_fd_that_is_not_an_eventfd() {
    let ch = RingChannel::create(4, 4).unwrap();
    let file = tempfile::tempfile().unwrap();

    let res = RingConsumer::new(ch.memfd, file.into(), ch.notify.into(), DEV);

    assert!(matches!(res, Err(RingError::NotEventFd("kick"))));
}

#[test]
fn consumer_seals_the_memfd_so_it_cannot_shrink() {
    let ch = RingChannel::create(4, 4).unwrap();
    let vmm_copy = ch.memfd.try_clone().unwrap();
    let _consumer = RingConsumer::new(ch.memfd, ch.kick.into(), ch.notify.into(), DEV).unwrap();

    let shrink = nix::unistd::ftruncate(&vmm_copy, 0);

    assert_eq!(shrink, Err(nix::errno::Errno::EPERM));
}

// ---- a hostile producer ----

/// One record as a hostile producer might write it: garbage, or a near-valid record with
/// fields drawn from small sets so that cookies repeat and groups form and break.
fn hostile_record() -> impl Strategy<Value = iommu_hwpt_pgfault> {
    let garbage = any::<[u8; 40]>().prop_map(|b| sys::pgfault_from_bytes(&b));
    let near_valid = (
        prop_oneof![Just(0u32), Just(2), Just(0), Just(2), Just(3), Just(0x80)],
        prop_oneof![Just(1u32), Just(1), Just(2)],
        prop_oneof![Just(2u32), Just(2), Just(2), Just(0x300)],
        prop_oneof![Just(1u32), Just(3), Just(0x40)],
        prop_oneof![Just(0u64), Just(0), Just(0), Just(1)],
        prop_oneof![Just(0u32), Just(0), Just(0), Just(1)],
        0u32..4,
        0u64..8,
    )
        .prop_map(
            |(flags, dev_id, grpid, perm, misalign, reserved, cookie, page)| iommu_hwpt_pgfault {
                flags,
                dev_id,
                pasid: 0,
                grpid,
                perm,
                __reserved: reserved,
                addr: page * 0x1000 + misalign,
                length: 0,
                cookie,
            },
        );
    prop_oneof![1 => garbage, 4 => near_valid]
}

#[derive(Clone, Debug)]
enum Publish {
    /// `req_prod = req_cons + n` (n may exceed the ring: impossible indices).
    Ahead(u32),
    /// Any value at all.
    Any(u32),
}

#[derive(Clone, Debug)]
struct Step {
    writes: Vec<(u32, iommu_hwpt_pgfault)>,
    publish: Publish,
}

fn step(slots: u32) -> impl Strategy<Value = Step> {
    (
        prop::collection::vec((0..slots, hostile_record()), 0..(2 * slots as usize)),
        prop_oneof![
            8 => (0..=2 * slots).prop_map(Publish::Ahead),
            1 => any::<u32>().prop_map(Publish::Any)
        ],
    )
        .prop_map(|(writes, publish)| Step { writes, publish })
}

/// The grouping rules, restated as simply as possible: what should be reported, in order, as
/// (cookie, is a valid group).
#[derive(Default)]
struct Oracle {
    open: Option<(u32, bool, (u32, u32), usize)>,
    reports: Vec<(Option<u32>, bool)>,
    bad_records: u64,
}

impl Oracle {
    fn feed(&mut self, r: &iommu_hwpt_pgfault) {
        let valid = PageRequest::from_raw(r).is_ok_and(|q| q.dev_id == DEV);
        if !valid {
            self.bad_records += 1;
        }
        if self.open.is_some_and(|(c, ..)| c != r.cookie) {
            self.abandon();
        }
        if r.cookie == 0 {
            self.reports.push((None, false));
            return;
        }
        let open = self
            .open
            .get_or_insert((r.cookie, true, (r.grpid, r.flags & 1), 0));
        open.3 += 1;
        open.1 &=
            valid && open.2 == (r.grpid, r.flags & 1) && open.3 <= crate::model::MAX_GROUP_PAGES;
        if r.flags & sys::PGFAULT_FLAGS_LAST_PAGE != 0 {
            let (c, ok, ..) = self.open.take().unwrap();
            self.reports.push((Some(c), ok));
        }
    }

    fn abandon(&mut self) {
        if let Some((c, ..)) = self.open.take() {
            self.reports.push((Some(c), false));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn hostile_producer_never_panics_and_every_group_is_reported_exactly_once(
        start in prop_oneof![Just(0u32), Just(u32::MAX - 3), any::<u32>()],
        steps in prop::collection::vec(step(8), 1..24),
    ) {
        let mut p = pair_at(8, 4, start);
        let geo = p.consumer.geometry();
        let mut oracle = Oracle::default();
        let mut reported = Vec::new();
        let mut resyncs = 0;

        for s in &steps {
            let cons = p.raw.u32_at(OFF_REQ_CONS).load(Ordering::Acquire);
            for &(slot, r) in &s.writes {
                write_record(&p.raw, geo, slot, r);
            }
            let prod = match s.publish {
                Publish::Ahead(n) => cons.wrapping_add(n),
                Publish::Any(v) => v,
            };
            p.raw.u32_at(OFF_REQ_PROD).store(prod, Ordering::Release);
            let avail = prod.wrapping_sub(cons);
            if avail > geo.req_slots() {
                resyncs += 1;
                oracle.abandon();
            } else {
                for i in 0..avail {
                    let r: iommu_hwpt_pgfault = p.raw.read(geo.req_slot(cons.wrapping_add(i)));
                    oracle.feed(&r);
                }
            }
            let mut out = Vec::new();

            p.consumer.read(&mut out).unwrap();

            let consumed = p.raw.u32_at(OFF_REQ_CONS).load(Ordering::Acquire).wrapping_sub(cons);
            prop_assert!(consumed == prod.wrapping_sub(cons));
            prop_assert!(avail > geo.req_slots() || consumed <= geo.req_slots());
            for entry in out {
                match entry {
                    Incoming::Group(g) => {
                        prop_assert!(!g.pages.is_empty() && g.pages.len() <= 8);
                        prop_assert!(p.consumer.respond(g.cookie, ResponseCode::Success).is_ok());
                        reported.push((Some(g.cookie), true));
                    }
                    Incoming::Malformed { cookie: Some(c), .. } => {
                        prop_assert!(p.consumer.respond(c, ResponseCode::Invalid).is_ok());
                        reported.push((Some(c), false));
                    }
                    Incoming::Malformed { cookie: None, .. } => reported.push((None, false)),
                }
            }
        }

        let stats = p.consumer.stats();
        prop_assert_eq!(&reported, &oracle.reports);
        prop_assert_eq!(stats.malformed_records, oracle.bad_records);
        prop_assert_eq!(stats.resyncs, resyncs);
        prop_assert_eq!(
            stats.malformed_reported,
            reported.iter().filter(|(_, ok)| !ok).count() as u64
        );
    }
}

#[test]
fn oracle_agrees_with_named_reasons_for_interleaving_and_inconsistency() {
    let mut p = pair(8, 4);
    let geo = p.consumer.geometry();
    let mut out = Vec::new();
    let other_grp = iommu_hwpt_pgfault {
        grpid: 3,
        ..rec(5, 0x3000, true)
    };
    for (i, r) in [rec(4, 0x1000, false), rec(5, 0x2000, false), other_grp]
        .into_iter()
        .enumerate()
    {
        write_record(&p.raw, geo, i as u32, r);
    }
    p.raw.u32_at(OFF_REQ_PROD).store(3, Ordering::Release);

    p.consumer.read(&mut out).unwrap();

    assert_eq!(
        out,
        vec![
            Incoming::Malformed {
                cookie: Some(4),
                reason: REASON_INTERRUPTED
            },
            Incoming::Malformed {
                cookie: Some(5),
                reason: REASON_INCONSISTENT
            }
        ]
    );
}
