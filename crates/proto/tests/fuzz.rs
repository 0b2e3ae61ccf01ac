//! Hostile input for the control decoder, [`faultd_proto::decode::<Request>`]: valid requests
//! of every kind, the same mutated (a field replaced, removed or added, a record spelled as an
//! array of its fields), random JSON built from the protocol's own words, and random bytes.
//!
//! What must hold for every input: decoding never panics; it fails only as `Malformed` or (past
//! the size limit) `Oversize`; and whatever it accepts is a request in its one documented
//! spelling: encoding it again decodes to the same value, and the input has the shape of that
//! encoding (objects where it has objects, never an array standing in for a record).
//!
//! Case counts are bounded so that CI runs these in seconds; `PROPTEST_CASES=N` runs each
//! property N times instead. Every hostile input worth keeping is a file in
//! `tests/corpus/control`, replayed with its exact expected outcome by
//! `corpus_inputs_decode_exactly_as_recorded`.

use std::path::{Path, PathBuf};

use faultd_proto::{
    decode, encode, AddDevice, BackingDesc, CodecError, EvictAmount, FdIndex, FirecrackerListen,
    IommuDesc, QueueDesc, RegionDesc, Register, Request, SessionRef, MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
};
use proptest::prelude::*;
use serde_json::{json, Value};

/// `cases` runs per property, unless `PROPTEST_CASES` says otherwise.
fn cases(cases: u32) -> ProptestConfig {
    match std::env::var("PROPTEST_CASES") {
        Ok(_) => ProptestConfig::default(),
        Err(_) => ProptestConfig::with_cases(cases),
    }
}

// ---- Valid requests ---------------------------------------------------------------------

fn num() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(4096),
        Just(2 << 20),
        Just(1 << 40),
        Just(u64::MAX),
        any::<u64>(),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[A-Za-z0-9._-]{1,64}", ".{0,80}"]
}

fn path() -> impl Strategy<Value = PathBuf> {
    prop_oneof!["/[a-z0-9/._-]{0,60}", ".{0,60}"].prop_map(PathBuf::from)
}

fn fd() -> impl Strategy<Value = FdIndex> {
    prop_oneof![0..4u32, any::<u32>()].prop_map(FdIndex)
}

fn backing() -> impl Strategy<Value = BackingDesc> {
    prop_oneof![
        Just(BackingDesc::Zero),
        num().prop_map(|offset| BackingDesc::Snapshot { offset }),
    ]
}

fn region() -> impl Strategy<Value = RegionDesc> {
    (
        (num(), num(), num(), num()),
        (fd(), num(), backing(), any::<bool>()),
    )
        .prop_map(
            |((gpa, size, page_size, hva), (mem, mem_offset, backing, read_only))| RegionDesc {
                gpa,
                size,
                page_size,
                hva,
                mem,
                mem_offset,
                backing,
                read_only,
            },
        )
}

fn register() -> impl Strategy<Value = Register> {
    (
        prop_oneof![Just(PROTOCOL_VERSION), any::<u32>()],
        text(),
        fd(),
        prop::collection::vec(region(), 0..4),
        prop::option::of(fd()),
        any::<bool>(),
    )
        .prop_map(|(version, vm, uffd, regions, snapshot, resume)| Register {
            version,
            vm,
            uffd,
            regions,
            snapshot,
            object: None,
            resume,
        })
}

fn add_device() -> impl Strategy<Value = AddDevice> {
    let queue = prop_oneof![
        (fd(), fd(), fd()).prop_map(|(ring, kick, notify)| QueueDesc::Ring { ring, kick, notify }),
        fd().prop_map(|fault_fd| QueueDesc::Iommufd { fault_fd }),
    ];
    let iommu = prop_oneof![
        fd().prop_map(|table| IommuDesc::Emulated { table }),
        (fd(), any::<u32>()).prop_map(|(iommufd, ioas_id)| IommuDesc::Iommufd { iommufd, ioas_id }),
    ];
    (any::<u32>(), queue, iommu).prop_map(|(dev_id, queue, iommu)| AddDevice {
        dev_id,
        queue,
        iommu,
    })
}

fn session_ref() -> impl Strategy<Value = SessionRef> {
    prop_oneof![
        text().prop_map(SessionRef::Vm),
        num().prop_map(SessionRef::Session)
    ]
}

fn request() -> impl Strategy<Value = Request> {
    let amount = prop_oneof![
        (num(), num()).prop_map(|(gpa, len)| EvictAmount::Range { gpa, len }),
        num().prop_map(EvictAmount::Pages),
    ];
    let listen = (
        text(),
        path(),
        path(),
        prop::option::of(any::<u32>()),
        prop::option::of(any::<i32>()),
    )
        .prop_map(|(vm, socket, snapshot, uid, pid)| FirecrackerListen {
            vm,
            socket,
            snapshot: Some(snapshot),
            object: None,
            uid,
            pid,
        });
    prop_oneof![
        register().prop_map(Request::Register),
        Just(Request::Stats {}),
        add_device().prop_map(Request::AddDevice),
        (num(), num(), prop::option::of(num())).prop_map(|(gpa, len, max_pages)| Request::Evict {
            gpa,
            len,
            max_pages
        }),
        listen.prop_map(Request::FirecrackerListen),
        text().prop_map(|vm| Request::VmStats { vm }),
        Just(Request::Status {}),
        prop::option::of(num()).prop_map(|after| Request::Sessions { after }),
        session_ref().prop_map(|target| Request::SessionDetail { target }),
        (session_ref(), amount)
            .prop_map(|(target, amount)| Request::EvictSession { target, amount }),
    ]
}

// ---- Random JSON from the protocol's own words -------------------------------------------

/// Every key the requests use, in an order that is each record's declaration order: sorting a
/// record's keys by it gives the order serde expects when the record is spelled as an array.
const KEYS: &[&str] = &[
    "type",
    "kind",
    "version",
    "vm",
    "uffd",
    "regions",
    "socket",
    "snapshot",
    "resume",
    "uid",
    "pid",
    "dev_id",
    "queue",
    "iommu",
    "target",
    "amount",
    "after",
    "gpa",
    "size",
    "len",
    "page_size",
    "hva",
    "mem",
    "mem_offset",
    "backing",
    "read_only",
    "max_pages",
    "offset",
    "ring",
    "kick",
    "notify",
    "fault_fd",
    "table",
    "iommufd",
    "ioas_id",
    "range",
    "pages",
    "session",
];

/// The tags of requests and records, and a few values of other strings.
const WORDS: &[&str] = &[
    "register",
    "stats",
    "add_device",
    "evict",
    "firecracker_listen",
    "vm_stats",
    "status",
    "sessions",
    "session_detail",
    "evict_session",
    "zero",
    "snapshot",
    "ring",
    "iommufd",
    "emulated",
    "vm0",
    "/run/fc0/uffd.sock",
    "",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(KEYS).prop_map(str::to_owned),
        1 => "[a-z_]{1,12}",
    ]
}

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        num().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop::sample::select(WORDS).prop_map(Value::from),
        ".{0,16}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A request-shaped object: a known `type` and fields drawn from the protocol's keys.
fn request_shaped() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(&WORDS[..10]),
        prop::collection::vec((key(), json()), 0..8),
    )
        .prop_map(|(tag, fields)| {
            let mut m: serde_json::Map<String, Value> = fields.into_iter().collect();
            m.insert("type".into(), tag.into());
            Value::Object(m)
        })
}

// ---- Mutations ----------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Mutation {
    /// The node becomes this value.
    Replace(Value),
    /// An object loses one of its keys.
    Remove(usize),
    /// An object gains (or has replaced) this key.
    Insert(String, Value),
    /// An object becomes the array of its values in declaration order: serde's other
    /// spelling of a record, which the protocol does not have.
    AsArray,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        json().prop_map(Mutation::Replace),
        any::<usize>().prop_map(Mutation::Remove),
        (key(), json()).prop_map(|(k, v)| Mutation::Insert(k, v)),
        Just(Mutation::AsArray),
    ]
}

fn count_nodes(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count_nodes).sum(),
        Value::Object(m) => m.values().map(count_nodes).sum(),
        _ => 0,
    }
}

/// The `n`th node of `v` in preorder (`n` < `count_nodes(v)`).
fn nth_node(v: &mut Value, n: usize) -> &mut Value {
    if n == 0 {
        return v;
    }
    let mut n = n - 1;
    let children: Vec<&mut Value> = match v {
        Value::Array(a) => a.iter_mut().collect(),
        Value::Object(m) => m.values_mut().collect(),
        _ => unreachable!("n < count_nodes(v) leaves no index in a leaf"),
    };
    for child in children {
        let size = count_nodes(child);
        if n < size {
            return nth_node(child, n);
        }
        n -= size;
    }
    unreachable!("n < count_nodes(v)")
}

fn declaration_rank(key: &str) -> usize {
    KEYS.iter().position(|k| *k == key).unwrap_or(KEYS.len())
}

fn apply(v: &mut Value, at: usize, m: Mutation) {
    let node = nth_node(v, at % count_nodes(v));
    match (m, node) {
        (Mutation::Replace(new), node) => *node = new,
        (Mutation::Remove(i), Value::Object(map)) if !map.is_empty() => {
            let k = map.keys().nth(i % map.len()).cloned();
            k.map(|k| map.remove(&k));
        }
        (Mutation::Insert(k, new), Value::Object(map)) => {
            map.insert(k, new);
        }
        (Mutation::AsArray, node @ Value::Object(_)) => {
            let Value::Object(map) = std::mem::take(node) else {
                unreachable!("matched as an object")
            };
            let mut fields: Vec<(String, Value)> = map.into_iter().collect();
            fields.sort_by_key(|(k, _)| declaration_rank(k));
            *node = Value::Array(fields.into_iter().map(|(_, v)| v).collect());
        }
        _ => {}
    }
}

// ---- What must hold -----------------------------------------------------------------------

/// Whether `input` has the shape of `canonical`, the encoding of what it decoded to: the same
/// kind of value at every place, arrays of the same length, and a key only the input has
/// holding null or false (the defaults the encoding leaves out).
fn same_shape(input: &Value, canonical: &Value) -> bool {
    match (input, canonical) {
        (Value::Object(a), Value::Object(b)) => a.iter().all(|(k, v)| match b.get(k) {
            Some(w) => same_shape(v, w),
            None => matches!(v, Value::Null | Value::Bool(false)),
        }),
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(v, w)| same_shape(v, w))
        }
        (Value::Null, Value::Null)
        | (Value::Bool(_), Value::Bool(_))
        | (Value::Number(_), Value::Number(_))
        | (Value::String(_), Value::String(_)) => true,
        _ => false,
    }
}

/// Decodes `bytes` and checks what any outcome must satisfy.
fn check_decode(bytes: &[u8]) -> Result<Option<Request>, TestCaseError> {
    match decode::<Request>(bytes) {
        Ok(req) => {
            let again = encode(&req).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&decode::<Request>(&again).ok(), &Some(req.clone()));
            let input: Value = serde_json::from_slice(bytes)
                .map_err(|e| TestCaseError::fail(format!("accepted, but not JSON: {e}")))?;
            let canonical = serde_json::to_value(&req).expect("a request is always JSON");
            prop_assert!(
                same_shape(&input, &canonical),
                "accepted {} as {:?}, whose encoding is {}",
                String::from_utf8_lossy(bytes),
                req,
                canonical
            );
            Ok(Some(req))
        }
        Err(CodecError::Malformed(_)) => Ok(None),
        Err(CodecError::Oversize { len }) => {
            prop_assert!(bytes.len() > MAX_MESSAGE_BYTES && len == bytes.len());
            Ok(None)
        }
    }
}

proptest! {
    #![proptest_config(cases(8192))]

    #[test]
    fn every_request_round_trips_through_its_encoding(req in request()) {
        let bytes = encode(&req).unwrap();

        let decoded = check_decode(&bytes)?;

        prop_assert_eq!(decoded, Some(req));
    }

    #[test]
    fn mutated_requests_decode_only_in_their_own_shape(
        req in request(),
        mutations in prop::collection::vec((any::<usize>(), mutation()), 1..4),
    ) {
        let mut v = serde_json::to_value(&req).unwrap();
        for (at, m) in mutations {
            apply(&mut v, at, m);
        }
        let bytes = serde_json::to_vec(&v).unwrap();

        check_decode(&bytes)?;
    }

    #[test]
    fn random_request_shaped_json_never_decodes_out_of_shape(v in request_shaped()) {
        check_decode(&serde_json::to_vec(&v).unwrap())?;
    }

    #[test]
    fn random_json_never_decodes_out_of_shape(v in json()) {
        check_decode(&serde_json::to_vec(&v).unwrap())?;
    }

    #[test]
    fn random_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_decode(&bytes)?;
    }

    #[test]
    fn json_like_text_never_panics_the_decoder(text in r#"[\[\]{}":,0-9a-z_ .eE+-]{0,200}"#) {
        check_decode(text.as_bytes())?;
    }

    #[test]
    fn damaged_encodings_never_decode_out_of_shape(
        req in request(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), 0..3u8), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = encode(&req).unwrap();
        for (at, byte, how) in edits {
            let at = at % (bytes.len() + 1);
            match how {
                0 => bytes.insert(at, byte),
                1 if at < bytes.len() => bytes[at] = byte,
                _ if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => {}
            }
        }
        bytes.truncate(cut.index(bytes.len() + 1));

        check_decode(&bytes)?;
    }
}

#[test]
fn packets_past_the_limit_are_oversize_whatever_they_hold() {
    let valid = encode(&Request::Status {}).unwrap();
    for len in [MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES + 4096, 1 << 20] {
        let mut padded = valid.clone();
        padded.resize(len, b' ');

        let got = decode::<Request>(&padded);

        assert!(
            matches!(got, Err(CodecError::Oversize { len: l }) if l == len),
            "{len} bytes: {got:?}"
        );
    }
    let mut at_limit = valid;
    at_limit.resize(MAX_MESSAGE_BYTES, b' ');
    assert_eq!(decode::<Request>(&at_limit).unwrap(), Request::Status {});
}

// ---- The corpus ---------------------------------------------------------------------------

/// What decoding one corpus file must give.
#[derive(Debug)]
enum Expect {
    /// Accepted, as exactly this request.
    Accepted(Request),
    /// Malformed, with serde_json's error class and a word of the message.
    Malformed(serde_json::error::Category, &'static str),
    /// Oversize, with the packet's length.
    Oversize(usize),
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/control")
}

/// Every file of `tests/corpus/control` and its outcome. A file without an entry here, or an
/// entry without a file, fails the replay: the corpus holds every case, each with its outcome.
/// Fd counts are not the decoder's: `register-65-fds.json` and `register-250-fds.json` decode
/// (they only name fd 64 and 249); faultd's receive path must refuse the packets that carry
/// that many fds (`oversize`), which only a test with a socket can show.
fn expectations() -> Vec<(&'static str, Expect)> {
    use serde_json::error::Category::{Data, Eof, Syntax};
    use Expect::{Accepted, Malformed, Oversize};
    let fd_heavy = |last: u32| {
        Accepted(Request::Register(Register {
            version: 1,
            vm: "vm0".into(),
            uffd: FdIndex(0),
            regions: vec![RegionDesc {
                gpa: 0,
                size: 1 << 20,
                page_size: 4096,
                hva: 0x7f00_0000_0000,
                mem: FdIndex(last),
                mem_offset: 0,
                backing: BackingDesc::Zero,
                read_only: false,
            }],
            snapshot: None,
            object: None,
            resume: false,
        }))
    };
    vec![
        ("empty.bin", Malformed(Eof, "EOF")),
        ("whitespace-only.json", Malformed(Eof, "EOF")),
        ("array-status.json", Malformed(Data, "not a JSON object")),
        ("array-sessions.json", Malformed(Data, "not a JSON object")),
        ("array-register.json", Malformed(Data, "not a JSON object")),
        ("string-status.json", Malformed(Data, "")),
        ("null.json", Malformed(Data, "")),
        (
            "register-region-as-array.json",
            Malformed(Data, "regions[0]"),
        ),
        ("register-backing-as-array.json", Malformed(Data, "backing")),
        (
            "register-zero-backing-with-offset.json",
            Malformed(Data, "unknown field `offset`"),
        ),
        ("add-device-queue-as-array.json", Malformed(Data, "")),
        ("evict-session-range-as-array.json", Malformed(Data, "")),
        ("register-65-fds.json", fd_heavy(64)),
        ("register-250-fds.json", fd_heavy(249)),
        ("unknown-type.json", Malformed(Data, "reboot")),
        ("unknown-field.json", Malformed(Data, "extra")),
        ("missing-type.json", Malformed(Data, "type")),
        (
            "duplicate-type.json",
            Malformed(Data, "duplicate field `type`"),
        ),
        (
            "duplicate-field.json",
            Malformed(Data, "duplicate field `gpa`"),
        ),
        ("float-number.json", Malformed(Data, "floating point")),
        ("negative-number.json", Malformed(Data, "-4096")),
        ("u64-overflow.json", Malformed(Data, "floating point")),
        ("u32-overflow-fd.json", Malformed(Data, "4294967296")),
        ("lone-surrogate.json", Malformed(Syntax, "hex escape")),
        ("non-utf8.bin", Malformed(Syntax, "unicode")),
        ("utf8-bom.json", Malformed(Syntax, "expected value")),
        (
            "trailing-garbage.json",
            Malformed(Syntax, "trailing characters"),
        ),
        ("trailing-nul.bin", Malformed(Syntax, "trailing characters")),
        (
            "two-messages.json",
            Malformed(Syntax, "trailing characters"),
        ),
        ("truncated-register.json", Malformed(Eof, "EOF")),
        (
            "nesting-64k.json",
            Malformed(Data, "invalid type: sequence"),
        ),
        ("nesting-1mib.json", Oversize(1 << 20)),
        ("oversize-64k-plus-1.json", Oversize(MAX_MESSAGE_BYTES + 1)),
        (
            "nul-in-socket-path.json",
            Accepted(Request::FirecrackerListen(FirecrackerListen {
                vm: "fc0".into(),
                socket: "/run/fc0\u{0}/uffd.sock".into(),
                snapshot: Some("/srv/fc0/mem".into()),
                object: None,
                uid: None,
                pid: None,
            })),
        ),
        (
            "defaults-spelled-out.json",
            Accepted(Request::Sessions { after: None }),
        ),
    ]
}

#[test]
fn corpus_inputs_decode_exactly_as_recorded() {
    let expected = expectations();
    let mut files: Vec<String> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    let mut listed: Vec<String> = expected.iter().map(|(f, _)| f.to_string()).collect();
    listed.sort();
    assert_eq!(files, listed, "corpus files and their expectations differ");

    for (file, expect) in expected {
        let bytes = std::fs::read(corpus_dir().join(file)).unwrap();

        let got = decode::<Request>(&bytes);

        match (&expect, got) {
            (Expect::Accepted(want), Ok(req)) => assert_eq!(&req, want, "{file}"),
            (Expect::Malformed(class, word), Err(CodecError::Malformed(e))) => {
                assert_eq!(e.classify(), *class, "{file}: {e}");
                assert!(e.to_string().contains(word), "{file}: {e:?} lacks {word:?}");
            }
            (Expect::Oversize(len), Err(CodecError::Oversize { len: got })) => {
                assert_eq!(got, *len, "{file}");
            }
            (expect, got) => panic!("{file}: expected {expect:?}, got {got:?}"),
        }
    }
}

/// The corpus's generated files, as they are written: `cargo test -- --ignored
/// write_generated_corpus_files` rewrites them (the others are written by hand).
#[test]
#[ignore = "writes the corpus; run by hand after changing a generator"]
fn write_generated_corpus_files() {
    let dir = corpus_dir();
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).unwrap();
    write("empty.bin", b"");
    write("nesting-64k.json", &vec![b'['; MAX_MESSAGE_BYTES - 1]);
    write("nesting-1mib.json", &vec![b'['; 1 << 20]);
    let mut oversize = encode(&Request::Status {}).unwrap();
    oversize.resize(MAX_MESSAGE_BYTES + 1, b' ');
    write("oversize-64k-plus-1.json", &oversize);
    write(
        "non-utf8.bin",
        b"{\"type\":\"vm_stats\",\"vm\":\"\xff\xfe\"}",
    );
    write("trailing-nul.bin", b"{\"type\":\"status\"}\0");
    write("utf8-bom.json", b"\xef\xbb\xbf{\"type\":\"status\"}");
    for (name, last) in [("register-65-fds.json", 64), ("register-250-fds.json", 249)] {
        let text = json!({
            "type": "register", "version": 1, "vm": "vm0", "uffd": 0,
            "regions": [{"gpa": 0, "size": 1 << 20, "page_size": 4096,
                "hva": 0x7f00_0000_0000_u64, "mem": last, "mem_offset": 0,
                "backing": {"kind": "zero"}}]
        });
        write(name, &serde_json::to_vec(&text).unwrap());
    }
}
