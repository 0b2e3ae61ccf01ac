//! Hostile input for what faultd parses itself: Firecracker's handshake message
//! ([`parse_message`], then [`check_regions`]) and the configuration text
//! ([`Config::from_toml`], [`Config::load`]).
//!
//! Firecracker: any bytes parse without panicking; what parses is one JSON array of objects,
//! each exactly the mapping it says; a cut-short message is `Incomplete`, never `Invalid`; and
//! `check_regions` accepts exactly the layouts `docs/protocol.md` allows (checked against an
//! independent oracle), turning them into the layout and regions it promises.
//!
//! Config: any TOML document built from the configuration's own keys, and any text, loads or
//! fails with an error naming what was wrong, never panics, and a configuration that loads
//! keeps every documented bound.
//!
//! Case counts are bounded so that CI runs these in seconds; `PROPTEST_CASES=N` runs each
//! property N times instead. Every hostile input worth keeping is a file in
//! `tests/corpus/{firecracker,config}`, replayed with its exact expected outcome.

use std::path::{Path, PathBuf};
use std::time::Duration;

use faultd::front::firecracker::{check_regions, parse_message, Mapping, Parse, WireForm};
use faultd::ops::config::{Config, ConfigError, Overrides};
use proptest::prelude::*;
use serde_json::{json, Value};

/// `cases` runs per property, unless `PROPTEST_CASES` says otherwise.
fn cases(cases: u32) -> ProptestConfig {
    match std::env::var("PROPTEST_CASES") {
        Ok(_) => ProptestConfig::default(),
        Err(_) => ProptestConfig::with_cases(cases),
    }
}

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

// ---- Firecracker: messages ----------------------------------------------------------------

fn page() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => Just(4 * KIB),
        2 => Just(2 * MIB),
        1 => Just(4),
        1 => Just(GIB),
        1 => any::<u64>(),
    ]
}

/// A message: mostly regions laid out as Firecracker lays them out (disjoint, aligned, in the
/// file in order), then damaged in a few places, so that both verdicts are common.
fn mappings() -> impl Strategy<Value = Vec<Mapping>> {
    let region = (1..4u64, 0..3u64, prop::option::of(page()), any::<bool>());
    (
        prop_oneof![Just(4 * KIB), Just(2 * MIB)],
        prop::collection::vec(region, 0..6),
        prop::collection::vec((any::<prop::sample::Index>(), damage()), 0..3),
    )
        .prop_map(|(page, regions, damages)| {
            let mut hva = 0x7f00_0000_0000;
            let mut offset = 0;
            let mut out: Vec<Mapping> = regions
                .into_iter()
                .map(|(pages, gap, page_size, kib_too)| {
                    let size = pages * page;
                    let m = Mapping {
                        base_host_virt_addr: hva,
                        size,
                        offset,
                        page_size: page_size.map(|_| page),
                        page_size_kib: (kib_too || page_size.is_none()).then_some(page),
                    };
                    hva += size + gap * page;
                    offset += size;
                    m
                })
                .collect();
            for (at, d) in damages {
                if !out.is_empty() {
                    let i = at.index(out.len());
                    let other = out[(i + 1) % out.len()].clone();
                    d.apply(&mut out[i], &other);
                }
            }
            out
        })
}

/// One thing wrong with a mapping.
#[derive(Clone, Debug)]
enum Damage {
    /// A field becomes this value (0 hva, 1 size, 2 offset).
    Set(u8, u64),
    /// A field moves by this much.
    Nudge(u8, u64),
    /// `page_size` becomes this (or goes).
    PageSize(Option<u64>),
    /// `page_size_kib` becomes this (or goes).
    PageSizeKib(Option<u64>),
    /// Starts where another region starts, in Firecracker's address space.
    SameHva,
    /// Starts where another region starts, in the file.
    SameOffset,
}

fn damage() -> impl Strategy<Value = Damage> {
    let value = prop_oneof![
        Just(0u64),
        Just(4 * KIB),
        Just(TIB),
        Just(u64::MAX),
        Just(u64::MAX - 4 * KIB + 1),
        any::<u64>(),
    ];
    prop_oneof![
        (0..3u8, value).prop_map(|(f, v)| Damage::Set(f, v)),
        (
            0..3u8,
            prop_oneof![Just(1u64), Just(4 * KIB), Just(2 * MIB)]
        )
            .prop_map(|(f, v)| Damage::Nudge(f, v)),
        prop::option::of(page()).prop_map(Damage::PageSize),
        prop::option::of(page()).prop_map(Damage::PageSizeKib),
        Just(Damage::SameHva),
        Just(Damage::SameOffset),
    ]
}

impl Damage {
    fn apply(self, m: &mut Mapping, other: &Mapping) {
        fn field(m: &mut Mapping, f: u8) -> &mut u64 {
            match f {
                0 => &mut m.base_host_virt_addr,
                1 => &mut m.size,
                _ => &mut m.offset,
            }
        }
        match self {
            Damage::Set(f, v) => *field(m, f) = v,
            Damage::Nudge(f, d) => {
                let x = field(m, f);
                *x = x.wrapping_add(d);
            }
            Damage::PageSize(p) => m.page_size = p,
            Damage::PageSizeKib(p) => m.page_size_kib = p,
            Damage::SameHva => m.base_host_virt_addr = other.base_host_virt_addr,
            Damage::SameOffset => m.offset = other.offset,
        }
    }
}

/// Whether the documented rules admit `regions` against a snapshot file of `snapshot_len`
/// bytes, written independently of `check_regions` (pairwise overlap tests, u128 ends).
fn admitted(regions: &[Mapping], snapshot_len: u64) -> bool {
    if regions.is_empty() || regions.len() > 256 {
        return false;
    }
    let with_page_size = regions.iter().filter(|r| r.page_size.is_some()).count();
    if with_page_size != 0 && with_page_size != regions.len() {
        return false;
    }
    let each_ok = regions.iter().all(|r| {
        let page = match (r.page_size, r.page_size_kib) {
            (Some(a), Some(b)) if a != b => return false,
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => 4 * KIB,
        };
        let end = |start: u64| u128::from(start) + u128::from(r.size);
        (page == 4 * KIB || page == 2 * MIB)
            && r.size != 0
            && r.size % page == 0
            && r.base_host_virt_addr != 0
            && r.base_host_virt_addr % page == 0
            && end(r.base_host_virt_addr) <= u128::from(u64::MAX)
            && r.offset % page == 0
            && end(r.offset) <= u128::from(snapshot_len)
    });
    let overlap = |a: u64, b: u64, size_a: u64, size_b: u64| {
        let (a, b) = (u128::from(a), u128::from(b));
        a < b + u128::from(size_b) && b < a + u128::from(size_a)
    };
    let disjoint = regions.iter().enumerate().all(|(i, r)| {
        regions[i + 1..].iter().all(|s| {
            !overlap(r.base_host_virt_addr, s.base_host_virt_addr, r.size, s.size)
                && !overlap(r.offset, s.offset, r.size, s.size)
        })
    });
    each_ok && disjoint
}

fn snapshot_len() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(16 * MIB),
        Just(GIB),
        Just(TIB),
        Just(u64::MAX),
        any::<u64>(),
    ]
}

/// JSON in the words of Firecracker's message: arrays of objects with its keys (or others) and
/// numbers of every kind, of arrays of numbers, of anything nested a little.
fn firecracker_json() -> impl Strategy<Value = Value> {
    let number = prop_oneof![
        Just(json!(0)),
        Just(json!(4096)),
        Just(json!(140_204_305_678_336_u64)),
        Just(json!(-4096)),
        Just(json!(4096.0)),
        Just(json!(u64::MAX)),
        any::<u64>().prop_map(Value::from),
    ];
    let leaf = prop_oneof![
        6 => number.clone(),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        1 => Just(json!("4096")),
    ];
    let key = prop_oneof![
        4 => prop::sample::select(&["base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"][..])
            .prop_map(str::to_owned),
        1 => "[a-z_]{1,10}",
    ];
    let mapping_like = (
        prop::collection::vec(number.clone(), 3),
        prop::collection::vec((key.clone(), leaf.clone()), 0..3),
    )
        .prop_map(|(n, extra)| {
            let mut m: serde_json::Map<String, Value> = extra.into_iter().collect();
            for (k, v) in ["base_host_virt_addr", "size", "offset"].into_iter().zip(n) {
                m.insert(k.into(), v);
            }
            Value::Object(m)
        });
    let nested = leaf.prop_recursive(2, 16, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    });
    let element = prop_oneof![
        4 => mapping_like,
        2 => prop::collection::vec(number, 3..=5).prop_map(Value::Array),
        2 => nested,
    ];
    prop_oneof![
        8 => prop::collection::vec(element.clone(), 0..4).prop_map(Value::Array),
        1 => element,
    ]
}

/// Parses `bytes` and checks what any outcome must satisfy: what is accepted is one JSON
/// array of objects, element for element the mappings returned.
fn check_parse(bytes: &[u8]) -> Result<Result<Vec<Mapping>, Parse>, TestCaseError> {
    let got = parse_message(bytes);
    if let Ok(regions) = &got {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| TestCaseError::fail(format!("accepted, but not JSON: {e}")))?;
        let elements = value.as_array().cloned().unwrap_or_default();
        prop_assert!(value.is_array() && elements.len() == regions.len());
        for (e, r) in elements.iter().zip(regions) {
            prop_assert!(e.is_object(), "accepted {} as {:?}", e, r);
            let field = |k: &str| e.get(k).and_then(Value::as_u64);
            prop_assert_eq!(field("base_host_virt_addr"), Some(r.base_host_virt_addr));
            prop_assert_eq!(field("size"), Some(r.size));
            prop_assert_eq!(field("offset"), Some(r.offset));
            prop_assert_eq!(field("page_size"), r.page_size);
            prop_assert_eq!(field("page_size_kib"), r.page_size_kib);
        }
    }
    Ok(got)
}

proptest! {
    #![proptest_config(cases(4096))]

    #[test]
    fn firecracker_messages_parse_to_what_was_sent_and_cut_short_are_incomplete(
        regions in mappings(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 8),
    ) {
        let bytes = serde_json::to_vec(&regions).unwrap();

        prop_assert_eq!(check_parse(&bytes)?, Ok(regions));
        for cut in cuts {
            let n = cut.index(bytes.len());
            prop_assert_eq!(parse_message(&bytes[..n]), Err(Parse::Incomplete), "cut at {}", n);
        }
    }

    #[test]
    fn hostile_bytes_never_panic_the_firecracker_parser(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let _ = check_parse(&bytes)?;
    }

    #[test]
    fn firecracker_shaped_json_parses_only_as_an_array_of_mappings(v in firecracker_json()) {
        let _ = check_parse(&serde_json::to_vec(&v).unwrap())?;
    }

    #[test]
    fn json_like_text_parses_only_as_an_array_of_mappings(
        text in r#"[\[\]{}":,0-9 .eE+-]{0,120}|\[\{"(base_host_virt_addr|size|offset|page_size)":[0-9\[\]{}., -]{0,60}"#,
    ) {
        let _ = check_parse(text.as_bytes())?;
    }

    #[test]
    fn damaged_messages_never_parse_as_anything_but_what_they_say(
        regions in mappings(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<bool>()), 1..6),
    ) {
        let mut bytes = serde_json::to_vec(&regions).unwrap();
        for (at, byte, insert) in edits {
            let at = at.index(bytes.len() + 1);
            match (insert, at < bytes.len()) {
                (true, _) => bytes.insert(at, byte),
                (false, true) => bytes[at] = byte,
                (false, false) => bytes.push(byte),
            }
        }

        let _ = check_parse(&bytes)?;
    }

    #[test]
    fn check_regions_admits_exactly_the_documented_layouts(
        regions in mappings(),
        snapshot_len in snapshot_len(),
    ) {
        let got = check_regions(&regions, snapshot_len);

        prop_assert_eq!(got.is_ok(), admitted(&regions, snapshot_len), "{:?}", got);
        if let Ok(checked) = got {
            let all_current = regions.iter().all(|r| r.page_size.is_some());
            prop_assert_eq!(
                checked.form,
                if all_current { WireForm::Current } else { WireForm::Legacy }
            );
            // One layout region per mapping, in file order, each at gpa == file offset, with
            // the mapping's size, backed by the file there, served at the mapping's hva.
            let mut by_offset = regions.clone();
            by_offset.sort_by_key(|r| r.offset);
            let layout = checked.layout.regions();
            prop_assert_eq!(layout.len(), regions.len());
            prop_assert_eq!(checked.served.len(), regions.len());
            for ((l, served), r) in layout.iter().zip(&checked.served).zip(&by_offset) {
                prop_assert_eq!(l.gpa().0, r.offset);
                prop_assert_eq!(l.size(), r.size);
                prop_assert_eq!(l.backing(), s2map::Backing::File { offset: r.offset });
                prop_assert!(!l.read_only());
                prop_assert_eq!(Some(l.page_size().bytes()), r.page_size.or(r.page_size_kib).or(Some(4 * KIB)));
                prop_assert_eq!(served.hva.0, r.base_host_virt_addr);
            }
        }
    }
}

#[test]
fn more_than_256_regions_are_refused_and_256_admitted() {
    let region = |i: u64| Mapping {
        base_host_virt_addr: (i + 1) * 2 * MIB,
        size: 4 * KIB,
        offset: i * 4 * KIB,
        page_size: Some(4 * KIB),
        page_size_kib: None,
    };
    let max: Vec<Mapping> = (0..256).map(region).collect();
    let over: Vec<Mapping> = (0..257).map(region).collect();

    assert_eq!(
        check_regions(&max, GIB).unwrap().layout.regions().len(),
        256
    );
    assert!(check_regions(&over, GIB)
        .unwrap_err()
        .contains("257 regions given"));
}

// ---- Config --------------------------------------------------------------------------------

/// Every section and key the configuration has, and a few it does not.
const SECTIONS: &[(&str, &[&str])] = &[
    ("control", &["socket", "max_sessions"]),
    ("fault", &["spin_us", "batch"]),
    (
        "device",
        &["deadline_ms", "pin_limit_mib", "granule_kib", "max_devices"],
    ),
    (
        "budget",
        &["session_mib", "global_mib", "high_pct", "low_pct"],
    ),
    ("store", &["dir"]),
    ("log", &["filter"]),
    ("metrics", &["listen", "vm_labels"]),
    ("bogus", &["x"]),
];
const FIRECRACKER_KEYS: &[&str] = &["vm", "socket", "snapshot", "uid", "pid"];

/// A TOML value, written out as TOML text.
fn toml_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(-1),
            Just(2),
            Just(4),
            Just(64),
            Just(100),
            Just(4096),
            Just(4097),
            Just(10_000),
            Just(60_000),
            Just(1 << 30),
            Just(1 << 44),
            Just(i64::MAX),
            Just(i64::MIN),
            any::<i64>(),
        ]
        .prop_map(|i| i.to_string()),
        Just("99999999999999999999".to_string()),
        prop_oneof![Just(0.5f64), Just(f64::NAN), Just(1e300), any::<f64>()]
            .prop_map(|f| format!("{f:?}").replace("NaN", "nan")),
        any::<bool>().prop_map(|b| b.to_string()),
        prop_oneof![
            Just("/run/faultd/faultd.sock".to_string()),
            Just("/var/lib/faultd/store".to_string()),
            Just("relative/path".to_string()),
            Just(String::new()),
            Just("127.0.0.1:0".to_string()),
            Just("[::1]:9597".to_string()),
            Just("0.0.0.0:9597".to_string()),
            Just("info".to_string()),
            Just("faultd=debug,warn".to_string()),
            Just("fc0".to_string()),
            Just("../fc0".to_string()),
            Just(format!("/{}", "s".repeat(107))),
            "/[a-z0-9/._-]{0,40}",
            "[a-z=,\\[\\]{}:./0-9*_-]{0,24}",
            ".{0,24}",
        ]
        .prop_map(|s| format!("{s:?}")),
        Just("1979-05-27T07:32:00Z".to_string()),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec(("[a-z_]{1,8}", inner), 0..3).prop_map(|kv| {
                let kv: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", kv.join(", "))
            }),
        ]
    })
}

/// A value of the type `key` has, mostly near its bounds (twelve times in thirteen), or any
/// TOML value.
fn value_for(key: &'static str) -> BoxedStrategy<String> {
    let typed = match key {
        "socket" | "dir" | "snapshot" => prop_oneof![
            Just("/run/faultd/faultd.sock".to_string()),
            Just("/run/fc0.sock".to_string()),
            Just("/var/lib/faultd/store".to_string()),
            Just("relative/path".to_string()),
            Just(String::new()),
            Just(format!("/{}", "s".repeat(106))),
            Just(format!("/{}", "s".repeat(107))),
            "/[a-z0-9/._-]{0,40}",
        ]
        .prop_map(|s| format!("{s:?}"))
        .boxed(),
        "filter" => prop_oneof![
            Just("info".to_string()),
            Just("faultd=debug,warn".to_string()),
            "[a-z=,\\[\\]{}:./0-9*_-]{0,24}",
        ]
        .prop_map(|s| format!("{s:?}"))
        .boxed(),
        "listen" => prop_oneof![
            Just(String::new()),
            Just("127.0.0.1:0".to_string()),
            Just("[::1]:9597".to_string()),
            Just("0.0.0.0:9597".to_string()),
            Just("localhost:9597".to_string()),
            "[0-9.:]{0,16}",
        ]
        .prop_map(|s| format!("{s:?}"))
        .boxed(),
        "vm" => prop_oneof![Just("fc0"), Just("fc1"), Just("../fc0"), Just("")]
            .prop_map(|s| format!("{s:?}"))
            .boxed(),
        _ => prop_oneof![
            4 => prop::sample::select(
                &[
                    -1i64, 0, 1, 2, 4, 12, 16, 32, 33, 50, 64, 85, 95, 100, 101, 256, 257, 4096,
                    4097, 10_000, 10_001, 60_000, 60_001, 1 << 20, 1 << 30, (1 << 30) + 1,
                    1 << 44, 1 << 45, i64::MAX,
                ][..]
            ),
            1 => any::<i64>(),
        ]
        .prop_map(|i| i.to_string())
        .boxed(),
    };
    prop_oneof![12 => typed, 1 => toml_value()].boxed()
}

/// A configuration file: sections of known (and unknown) keys with values mostly of their
/// types, and `[[firecracker]]` entries.
fn config_text() -> impl Strategy<Value = String> {
    let section = |&(name, keys): &(&'static str, &'static [&'static str])| {
        prop::sample::subsequence(keys, 0..=keys.len())
            .prop_flat_map(|keys| {
                keys.into_iter()
                    .map(|k| value_for(k).prop_map(move |v| format!("{k} = {v}\n")))
                    .collect::<Vec<_>>()
            })
            .prop_map(move |lines| format!("[{name}]\n{}", lines.concat()))
    };
    let sections = (
        prop::sample::subsequence(&SECTIONS[..7], 0..=4),
        prop::bool::weighted(0.05),
    )
        .prop_flat_map(move |(mut picked, bogus)| {
            picked.extend(bogus.then_some(SECTIONS[7]));
            picked.iter().map(section).collect::<Vec<_>>()
        });
    let entry = prop::collection::vec(
        prop::sample::select(FIRECRACKER_KEYS)
            .prop_flat_map(|k| value_for(k).prop_map(move |v| (k, v))),
        0..3,
    )
    .prop_map(|changes| {
        let mut fields = vec![
            ("vm", "\"fc0\"".to_string()),
            ("socket", "\"/run/fc0.sock\"".to_string()),
            ("snapshot", "\"/srv/mem\"".to_string()),
        ];
        for (k, v) in changes {
            match fields.iter_mut().find(|(f, _)| *f == k) {
                Some(field) => field.1 = v,
                None => fields.push((k, v)),
            }
        }
        let lines: String = fields.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        format!("[[firecracker]]\n{lines}")
    });
    (sections, prop::collection::vec(entry, 0..3))
        .prop_map(|(sections, entries)| sections.concat() + &entries.concat())
}

/// What any outcome must satisfy: a configuration that loads keeps every documented bound, an
/// error names what was wrong.
fn check_config(got: &Result<Config, ConfigError>) -> Result<(), TestCaseError> {
    match got {
        Ok(c) => {
            prop_assert!(c.socket.is_absolute() && c.socket.as_os_str().len() < 108);
            prop_assert!((1..=4096).contains(&c.max_sessions));
            prop_assert!(c.spin <= Duration::from_millis(10));
            prop_assert!((1..=4096).contains(&c.batch));
            prop_assert!(
                (Duration::from_millis(1)..=Duration::from_secs(60)).contains(&c.device_deadline)
            );
            prop_assert!(c.pin_limit % MIB == 0 && (2 * MIB..=GIB * MIB).contains(&c.pin_limit));
            prop_assert!(c.granule.is_power_of_two() && (4 * KIB..=GIB).contains(&c.granule));
            prop_assert!((1..=32).contains(&c.max_devices));
            let b = c.budget;
            prop_assert!(b.session % MIB == 0 && b.global % MIB == 0);
            prop_assert!(b.low_pct < b.high_pct && (1..=100).contains(&b.high_pct));
            prop_assert!(c.store_dir.is_absolute());
            prop_assert!(c.metrics_listen.is_none_or(|a| a.ip().is_loopback()));
            prop_assert!(c.metrics_vm_labels <= 256);
            for (i, f) in c.firecracker.iter().enumerate() {
                let name_ok = (1..=64).contains(&f.vm.len())
                    && f.vm
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
                prop_assert!(name_ok, "vm {:?}", f.vm);
                prop_assert!(f.socket.is_absolute() && f.socket.as_os_str().len() < 108);
                let source_ok = match &f.source {
                    faultd::front::firecracker::ListenSource::File(p) => p.is_absolute(),
                    faultd::front::firecracker::ListenSource::Object { .. } => true,
                };
                prop_assert!(source_ok && f.socket != c.socket);
                prop_assert!(f.peer.pid.is_none());
                for g in &c.firecracker[..i] {
                    prop_assert!(g.socket != f.socket && g.vm != f.vm);
                }
            }
        }
        Err(ConfigError::Invalid { field, value, .. }) => {
            let (section, key) = field.split_once('.').unwrap_or(("", field));
            let known = SECTIONS[..7]
                .iter()
                .any(|(s, keys)| *s == section && keys.contains(&key));
            prop_assert!(known, "{:?} ({})", got, value);
        }
        Err(ConfigError::Firecracker { field, value, .. }) => {
            prop_assert!(
                ["vm", "socket", "snapshot"].contains(field),
                "{:?} ({})",
                got,
                value
            );
        }
        Err(ConfigError::ObjectStore { field, value, .. }) => {
            prop_assert!(
                field.starts_with("object_store.stores."),
                "{:?} ({})",
                got,
                value
            );
        }
        Err(ConfigError::Parse { .. }) => {}
        Err(e @ (ConfigError::Read { .. } | ConfigError::Unsafe { .. })) => {
            prop_assert!(false, "text is neither read nor a file: {:?}", e);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(4096))]

    #[test]
    fn config_documents_load_within_bounds_or_name_the_fault(text in config_text()) {
        check_config(&Config::from_toml(&text))?;
    }

    #[test]
    fn any_text_loads_within_bounds_or_names_the_fault(
        text in prop_oneof![".{0,200}", r#"[\[\]{}="'a-z_.,0-9 \n#-]{0,200}"#],
    ) {
        check_config(&Config::from_toml(&text))?;
    }
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn any_file_loads_within_bounds_or_names_the_fault(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("faultd.toml");
        std::fs::write(&path, &bytes).unwrap();

        let got = Config::load(Some(&path), &Overrides::default());

        match (&got, std::str::from_utf8(&bytes)) {
            (Err(ConfigError::Read { source, .. }), Err(_)) => {
                prop_assert_eq!(source.kind(), std::io::ErrorKind::InvalidData);
            }
            (got, Ok(_)) => check_config(got)?,
            (got, Err(_)) => prop_assert!(false, "non-UTF-8 file loaded as {:?}", got),
        }
    }
}

// ---- The corpus ---------------------------------------------------------------------------

fn corpus(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(kind)
}

/// The corpus directory's files, which must be exactly `listed`: the corpus holds every case,
/// each with its expected outcome.
fn corpus_files(kind: &str, listed: &[&str]) {
    let mut files: Vec<String> = std::fs::read_dir(corpus(kind))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    let mut listed: Vec<String> = listed.iter().map(|f| f.to_string()).collect();
    listed.sort();
    assert_eq!(
        files, listed,
        "{kind} corpus files and their expectations differ"
    );
}

/// What one Firecracker corpus message must give, against a 1 GiB snapshot file.
#[derive(Debug)]
enum Fc {
    /// More bytes may follow.
    Incomplete,
    /// Not a message: the reason contains this.
    Invalid(&'static str),
    /// A message whose regions `check_regions` refuses: the reason contains this.
    Refused(&'static str),
    /// Admitted: this many regions, sent in this form.
    Admitted(usize, WireForm),
}

const FIRECRACKER_CORPUS: &[(&str, Fc)] = &[
    ("legacy.json", Fc::Admitted(2, WireForm::Legacy)),
    ("current.json", Fc::Admitted(2, WireForm::Current)),
    ("current-2m-pages.json", Fc::Admitted(1, WireForm::Current)),
    // Unknown fields are ignored, so that newer Firecrackers keep working (docs/protocol.md).
    ("unknown-field.json", Fc::Admitted(1, WireForm::Current)),
    // A null page size is an absent one.
    ("null-page-size.json", Fc::Admitted(1, WireForm::Legacy)),
    // serde_json keeps the last of duplicate keys; Firecracker never sends any.
    ("duplicate-key.json", Fc::Admitted(1, WireForm::Current)),
    ("empty.bin", Fc::Incomplete),
    ("truncated.json", Fc::Incomplete),
    ("nesting-100.json", Fc::Incomplete),
    ("nesting-1mib.json", Fc::Invalid("recursion limit exceeded")),
    ("non-utf8.bin", Fc::Invalid("not valid JSON")),
    ("trailing-garbage.json", Fc::Invalid("trailing characters")),
    ("two-messages.json", Fc::Invalid("trailing characters")),
    ("object-not-array.json", Fc::Invalid("expected a sequence")),
    (
        "mapping-as-array.json",
        Fc::Invalid("regions[0] is not a JSON object"),
    ),
    (
        "array-of-numbers.json",
        Fc::Invalid("regions[0] is not a JSON object"),
    ),
    ("negative-size.json", Fc::Invalid("-4096")),
    ("float-offset.json", Fc::Invalid("floating point")),
    ("u64-overflow.json", Fc::Invalid("floating point")),
    ("string-size.json", Fc::Invalid("invalid type: string")),
    ("missing-offset.json", Fc::Invalid("missing field `offset`")),
    ("missing-size.json", Fc::Invalid("missing field `size`")),
    ("empty-array.json", Fc::Refused("0 regions given")),
    (
        "overlapping-hva.json",
        Fc::Refused("overlap in Firecracker's address space"),
    ),
    (
        "overlapping-file.json",
        Fc::Refused("overlap in the snapshot file"),
    ),
    (
        "huge-1tib.json",
        Fc::Refused("does not fit the snapshot file"),
    ),
    ("huge-wrapping-hva.json", Fc::Refused("not wrap")),
    (
        "huge-offset-wraps.json",
        Fc::Refused("does not fit the snapshot file"),
    ),
    (
        "zero-size.json",
        Fc::Refused("size 0x0 is not a non-zero multiple"),
    ),
    ("zero-hva.json", Fc::Refused("must be non-zero")),
    ("unaligned-hva.json", Fc::Refused("aligned to 0x1000")),
    (
        "unaligned-offset.json",
        Fc::Refused("offset 0x800 is not aligned"),
    ),
    (
        "unaligned-size-2m.json",
        Fc::Refused("not a non-zero multiple of the page size 0x200000"),
    ),
    ("page-size-1g.json", Fc::Refused("must be 4096 or 2097152")),
    (
        "page-size-zero.json",
        Fc::Refused("must be 4096 or 2097152"),
    ),
    ("page-sizes-disagree.json", Fc::Refused("disagree")),
    (
        "page-size-on-some.json",
        Fc::Refused("some regions have page_size"),
    ),
    ("257-regions.json", Fc::Refused("257 regions given")),
];

#[test]
fn firecracker_corpus_messages_end_exactly_as_recorded() {
    let listed: Vec<&str> = FIRECRACKER_CORPUS.iter().map(|(f, _)| *f).collect();
    corpus_files("firecracker", &listed);

    for (file, expect) in FIRECRACKER_CORPUS {
        let bytes = std::fs::read(corpus("firecracker").join(file)).unwrap();

        let got = parse_message(&bytes).map(|m| check_regions(&m, GIB));

        match (expect, got) {
            (Fc::Incomplete, Err(Parse::Incomplete)) => {}
            (Fc::Invalid(word), Err(Parse::Invalid(why))) => {
                assert!(why.contains(word), "{file}: {why:?} lacks {word:?}");
            }
            (Fc::Refused(word), Ok(Err(why))) => {
                assert!(why.contains(word), "{file}: {why:?} lacks {word:?}");
            }
            (Fc::Admitted(n, form), Ok(Ok(r))) => {
                assert_eq!((r.layout.regions().len(), r.form), (*n, *form), "{file}");
            }
            (expect, got) => panic!("{file}: expected {expect:?}, got {got:?}"),
        }
    }
}

/// What loading one config corpus file (over the embedded default) must give.
#[derive(Debug)]
enum Cfg {
    /// It loads, as the embedded default with this changed.
    Loads(fn(&mut Config)),
    /// Not readable as text.
    Unreadable,
    /// Not TOML of the configuration's shape: the message (with its cause) contains this.
    Parse(&'static str),
    /// A value out of range: this field.
    Invalid(&'static str),
    /// A bad `[[firecracker]]` entry: this one, this field.
    Firecracker(usize, &'static str),
}

const CONFIG_CORPUS: &[(&str, Cfg)] = &[
    ("empty.toml", Cfg::Loads(|_| {})),
    ("comment-only.toml", Cfg::Loads(|_| {})),
    ("utf8-bom.toml", Cfg::Loads(|c| c.batch = 7)),
    (
        "firecracker-valid.toml",
        Cfg::Loads(|c| {
            c.firecracker = vec![faultd::front::firecracker::ListenSpec::new(
                "fc0".into(),
                "/run/fc0/uffd.sock".into(),
                faultd::front::firecracker::ListenSource::File("/srv/fc0/mem".into()),
                faultd::front::firecracker::PeerRule {
                    uid: Some(1000),
                    pid: None,
                },
            )
            .unwrap()]
        }),
    ),
    ("non-utf8.toml", Cfg::Unreadable),
    ("unknown-section.toml", Cfg::Parse("unknown field `bogus`")),
    ("unknown-key.toml", Cfg::Parse("unknown field `sockets`")),
    (
        "negative-max-sessions.toml",
        Cfg::Parse("invalid value: integer `-1`"),
    ),
    ("integer-too-large.toml", Cfg::Parse("99999999999999999999")),
    (
        "float-spin.toml",
        Cfg::Parse("invalid type: floating point"),
    ),
    ("nan-batch.toml", Cfg::Parse("invalid type: floating point")),
    ("string-batch.toml", Cfg::Parse("invalid type: string")),
    ("table-for-socket.toml", Cfg::Parse("invalid type: map")),
    ("duplicate-key.toml", Cfg::Parse("duplicate key")),
    ("section-twice.toml", Cfg::Parse("duplicate key")),
    ("nesting-100k.toml", Cfg::Parse("recursion")),
    ("dotted-key-10k.toml", Cfg::Parse("recursion limit")),
    // Accepted: the socket is checked to be absolute and short, and a NUL in it fails only at
    // bind(2), with an error naming the path. Refusing it here is left to the integrator.
    (
        "nul-in-socket.toml",
        Cfg::Loads(|c| c.socket = "/run/faultd\0/faultd.sock".into()),
    ),
    ("firecracker-pid.toml", Cfg::Parse("unknown field `pid`")),
    ("zero-sessions.toml", Cfg::Invalid("control.max_sessions")),
    ("socket-relative.toml", Cfg::Invalid("control.socket")),
    ("socket-empty.toml", Cfg::Invalid("control.socket")),
    ("socket-108-bytes.toml", Cfg::Invalid("control.socket")),
    ("spin-too-long.toml", Cfg::Invalid("fault.spin_us")),
    ("batch-zero.toml", Cfg::Invalid("fault.batch")),
    ("deadline-zero.toml", Cfg::Invalid("device.deadline_ms")),
    (
        "granule-not-power-of-two.toml",
        Cfg::Invalid("device.granule_kib"),
    ),
    ("pin-limit-huge.toml", Cfg::Invalid("device.pin_limit_mib")),
    ("max-devices-33.toml", Cfg::Invalid("device.max_devices")),
    (
        "budget-mib-overflow.toml",
        Cfg::Invalid("budget.session_mib"),
    ),
    ("low-above-high.toml", Cfg::Invalid("budget.low_pct")),
    ("high-pct-zero.toml", Cfg::Invalid("budget.low_pct")),
    ("store-relative.toml", Cfg::Invalid("store.dir")),
    ("log-filter-bad.toml", Cfg::Invalid("log.filter")),
    ("metrics-public.toml", Cfg::Invalid("metrics.listen")),
    ("metrics-garbage.toml", Cfg::Invalid("metrics.listen")),
    ("vm-labels-257.toml", Cfg::Invalid("metrics.vm_labels")),
    ("firecracker-bad-vm.toml", Cfg::Firecracker(0, "vm")),
    (
        "firecracker-relative-snapshot.toml",
        Cfg::Firecracker(0, "snapshot"),
    ),
    (
        "firecracker-control-socket.toml",
        Cfg::Firecracker(0, "socket"),
    ),
    (
        "firecracker-same-socket.toml",
        Cfg::Firecracker(1, "socket"),
    ),
    ("firecracker-same-vm.toml", Cfg::Firecracker(1, "vm")),
];

/// The error and its causes, as `main` prints them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s += &format!(": {c}");
        cause = c.source();
    }
    s
}

#[test]
fn config_corpus_files_load_exactly_as_recorded() {
    let listed: Vec<&str> = CONFIG_CORPUS.iter().map(|(f, _)| *f).collect();
    corpus_files("config", &listed);
    let default = Config::load(None, &Overrides::default()).unwrap();

    for (file, expect) in CONFIG_CORPUS {
        let got = Config::load(Some(&corpus("config").join(file)), &Overrides::default());

        match (expect, got) {
            (Cfg::Loads(change), Ok(c)) => {
                let mut want = default.clone();
                change(&mut want);
                assert_eq!(c, want, "{file}");
            }
            (Cfg::Unreadable, Err(ConfigError::Read { source, .. })) => {
                assert_eq!(source.kind(), std::io::ErrorKind::InvalidData, "{file}");
            }
            (Cfg::Parse(word), Err(e @ ConfigError::Parse { .. })) => {
                let text = chain(&e);
                assert!(text.contains(word), "{file}: {text:?} lacks {word:?}");
            }
            (Cfg::Invalid(want), Err(ConfigError::Invalid { field, .. })) => {
                assert_eq!(field, *want, "{file}");
            }
            (
                Cfg::Firecracker(index, want),
                Err(ConfigError::Firecracker {
                    index: i, field, ..
                }),
            ) => {
                assert_eq!((i, field), (*index, *want), "{file}");
            }
            (expect, got) => panic!("{file}: expected {expect:?}, got {got:?}"),
        }
    }
}

/// The corpora's generated files, as they are written: `cargo test -- --ignored
/// write_generated_corpus_files` rewrites them (the others are written by hand).
#[test]
#[ignore = "writes the corpus; run by hand after changing a generator"]
fn write_generated_corpus_files() {
    let fc = |name: &str, bytes: &[u8]| std::fs::write(corpus("firecracker").join(name), bytes);
    fc("empty.bin", b"").unwrap();
    fc("nesting-100.json", &[b'['; 100]).unwrap();
    fc("nesting-1mib.json", &vec![b'['; 1 << 20]).unwrap();
    fc(
        "non-utf8.bin",
        b"[{\"base_host_virt_addr\":4096,\"size\":4096,\"offset\":0,\"\xff\xfe\":1}]",
    )
    .unwrap();
    let many: Vec<Mapping> = (0..257u64)
        .map(|i| Mapping {
            base_host_virt_addr: (i + 1) * 2 * MIB,
            size: 4 * KIB,
            offset: i * 4 * KIB,
            page_size: Some(4 * KIB),
            page_size_kib: Some(4 * KIB),
        })
        .collect();
    fc("257-regions.json", &serde_json::to_vec(&many).unwrap()).unwrap();

    let cfg = |name: &str, bytes: &[u8]| std::fs::write(corpus("config").join(name), bytes);
    cfg("empty.toml", b"").unwrap();
    cfg("utf8-bom.toml", b"\xef\xbb\xbf[fault]\nbatch = 7\n").unwrap();
    cfg("non-utf8.toml", b"[log]\nfilter = \"\xff\xfe\"\n").unwrap();
    let nesting = "a = ".to_string() + &"[".repeat(100_000) + "\n";
    cfg("nesting-100k.toml", nesting.as_bytes()).unwrap();
    let dotted = vec!["a"; 10_000].join(".") + " = 1\n";
    cfg("dotted-key-10k.toml", dotted.as_bytes()).unwrap();
    let long = format!("[control]\nsocket = \"/{}\"\n", "s".repeat(107));
    cfg("socket-108-bytes.toml", long.as_bytes()).unwrap();
}
