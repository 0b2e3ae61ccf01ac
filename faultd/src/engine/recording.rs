//! The working-set recording file format: what [`super::ws_library`] keeps and exports, and
//! what [`super::working_set`] records and replays. Pure data and its checked encoding, below
//! both, so neither imports the other's half.
//!
//! **Format** (version 1, little-endian; `docs/protocol.md` has the same):
//!
//! | bytes | what |
//! |---|---|
//! | 0..8 | magic `FAULTDWS` |
//! | 8..12 | version, 1 |
//! | 12..16 | page size of the offsets, 4096 |
//! | 16..24 | snapshot file size, bytes |
//! | 24..56 | SHA-256 of the snapshot file's contents |
//! | 56..64 | count N of offsets, at most 1048576 |
//! | 64..64+8N | file offsets of the pages, in first-touch order: page aligned, below the file size, no repeats |
//! | last 32 | SHA-256 of all the bytes before |
//!
//! Zero pages are not in the format: whoever serves the snapshot finds them in it.
use sha2::{Digest, Sha256};
use std::collections::HashSet;

/// Magic of a recording.
pub const MAGIC: [u8; 8] = *b"FAULTDWS";
/// The format version written and read.
pub const VERSION: u32 = 1;
/// Header bytes.
const HEADER: usize = 64;
/// Trailer (checksum) bytes.
const TRAILER: usize = 32;
/// Granule of the offsets.
pub const PAGE: u64 = 4096;
/// Most offsets one recording holds.
pub const MAX_PAGES: u64 = crate::ops::config::MAX_RECORD_PAGES;
/// Most bytes of an encoded recording.
pub const MAX_BYTES: usize = HEADER + 8 * MAX_PAGES as usize + TRAILER;
/// Bytes of a recording's header, all [`Header::read`] needs.
pub const HEADER_BYTES: usize = HEADER;
/// Fewest bytes of an encoded recording: a header and the checksum, no page.
pub const MIN_BYTES: usize = HEADER + TRAILER;

/// What a recording's header says, read without the rest of the file (a listing reads no
/// more; the checksum and the offsets are checked only by [`Recording::decode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Pages recorded.
    pub pages: u64,
    /// The snapshot file's size.
    pub snapshot_size: u64,
}

impl Header {
    /// The header of a recording file of `len` bytes: None unless the magic, version and page
    /// size are this format's and the count is within the bound and fits `len` exactly.
    pub fn read(head: &[u8; HEADER], len: u64) -> Option<Header> {
        let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap_or_default());
        let u64_at = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().unwrap_or_default());
        let pages = u64_at(56);
        let fits = pages <= MAX_PAGES && (HEADER + TRAILER) as u64 + 8 * pages == len;
        (head[..8] == MAGIC && u32_at(8) == VERSION && u64::from(u32_at(12)) == PAGE && fits)
            .then_some(Header {
                pages,
                snapshot_size: u64_at(16),
            })
    }
}

/// A working-set recording: the snapshot it is of, and its pages in first-touch order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recording {
    /// The snapshot file's size.
    pub snapshot_size: u64,
    /// The snapshot file's SHA-256.
    pub digest: [u8; 32],
    /// File offsets of the pages.
    pub offsets: Vec<u64>,
}

/// Why bytes are not a recording.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than a header and trailer, or longer than any recording.
    #[error("{0} bytes is not the size of a recording ({min}..={MAX_BYTES})", min = HEADER + TRAILER)]
    Size(usize),
    /// Not the magic.
    #[error("not a faultd working-set recording (bad magic)")]
    Magic,
    /// A version this faultd does not read.
    #[error("recording format version {0}; this faultd reads version {VERSION}")]
    Version(u32),
    /// Another page size.
    #[error("page size {0}; only 4096 is read")]
    PageSize(u32),
    /// The count does not match the length, or is beyond the bound.
    #[error("the header counts {count} pages but the recording has room for {room}")]
    Count {
        /// Counted.
        count: u64,
        /// Present.
        room: u64,
    },
    /// The checksum is wrong.
    #[error("checksum mismatch: the recording is damaged")]
    Checksum,
    /// An offset is not page aligned, beyond the snapshot, or repeated.
    #[error("entry {index}: offset {offset:#x} is {why}")]
    Offset {
        /// Entry.
        index: usize,
        /// Offset.
        offset: u64,
        /// What is wrong with it.
        why: &'static str,
    },
}

impl Recording {
    /// The recording in the file format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 8 * self.offsets.len() + TRAILER);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(PAGE as u32).to_le_bytes());
        out.extend_from_slice(&self.snapshot_size.to_le_bytes());
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&(self.offsets.len() as u64).to_le_bytes());
        for o in &self.offsets {
            out.extend_from_slice(&o.to_le_bytes());
        }
        let sum: [u8; 32] = Sha256::digest(&out).into();
        out.extend_from_slice(&sum);
        out
    }

    /// Reads a recording, checking every byte (bounded: nothing is allocated beyond what
    /// `bytes` holds).
    pub fn decode(bytes: &[u8]) -> Result<Recording, DecodeError> {
        if bytes.len() < HEADER + TRAILER || bytes.len() > MAX_BYTES {
            return Err(DecodeError::Size(bytes.len()));
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap_or_default());
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or_default());
        if bytes[..8] != MAGIC {
            return Err(DecodeError::Magic);
        }
        if u32_at(8) != VERSION {
            return Err(DecodeError::Version(u32_at(8)));
        }
        if u32_at(12) as u64 != PAGE {
            return Err(DecodeError::PageSize(u32_at(12)));
        }
        let count = u64_at(56);
        let room = ((bytes.len() - HEADER - TRAILER) / 8) as u64;
        if count != room || !(bytes.len() - HEADER - TRAILER).is_multiple_of(8) || count > MAX_PAGES
        {
            return Err(DecodeError::Count { count, room });
        }
        let body = bytes.len() - TRAILER;
        let sum: [u8; 32] = Sha256::digest(&bytes[..body]).into();
        if sum[..] != bytes[body..] {
            return Err(DecodeError::Checksum);
        }
        let snapshot_size = u64_at(16);
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&bytes[24..56]);
        let mut seen = HashSet::with_capacity(count as usize);
        let mut offsets = Vec::with_capacity(count as usize);
        for index in 0..count as usize {
            let offset = u64_at(HEADER + 8 * index);
            let why = if !offset.is_multiple_of(PAGE) {
                Some("not page aligned")
            } else if offset >= snapshot_size {
                Some("beyond the snapshot")
            } else if !seen.insert(offset) {
                Some("repeated")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(DecodeError::Offset { index, offset, why });
            }
            offsets.push(offset);
        }
        Ok(Recording {
            snapshot_size,
            digest,
            offsets,
        })
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Recording {
        Recording {
            snapshot_size: 64 * PAGE,
            digest: [7; 32],
            offsets: vec![3 * PAGE, 0, 63 * PAGE],
        }
    }

    #[test]
    fn a_recording_reads_back_as_written() {
        assert_eq!(Recording::decode(&sample().encode()), Ok(sample()));
    }

    #[test]
    fn damaged_or_foreign_bytes_are_refused_by_name() {
        let good = sample().encode();
        let with = |i: usize, b: u8| {
            let mut v = good.clone();
            v[i] ^= b;
            v
        };
        let resum = |mut v: Vec<u8>| {
            let body = v.len() - TRAILER;
            let sum: [u8; 32] = Sha256::digest(&v[..body]).into();
            v[body..].copy_from_slice(&sum);
            v
        };

        assert_eq!(Recording::decode(&good[..10]), Err(DecodeError::Size(10)));
        assert_eq!(Recording::decode(&with(0, 1)), Err(DecodeError::Magic));
        assert_eq!(Recording::decode(&with(8, 1)), Err(DecodeError::Version(0)));
        assert_eq!(Recording::decode(&with(70, 1)), Err(DecodeError::Checksum));
        assert!(matches!(
            Recording::decode(&good[..good.len() - 8]),
            Err(DecodeError::Count { count: 3, .. })
        ));
        // Checksummed but wrong: an unaligned offset, one beyond the snapshot, a repeat.
        let mut r = sample();
        r.offsets[1] = 5;
        assert!(matches!(
            Recording::decode(&r.encode()),
            Err(DecodeError::Offset {
                index: 1,
                why: "not page aligned",
                ..
            })
        ));
        r.offsets[1] = 64 * PAGE;
        assert!(matches!(
            Recording::decode(&r.encode()),
            Err(DecodeError::Offset {
                why: "beyond the snapshot",
                ..
            })
        ));
        r.offsets[1] = 3 * PAGE;
        assert!(matches!(
            Recording::decode(&r.encode()),
            Err(DecodeError::Offset {
                why: "repeated",
                ..
            })
        ));
        // A count that claims more than the bound, checksummed.
        let mut big = good.clone();
        big[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Recording::decode(&resum(big)),
            Err(DecodeError::Count { .. })
        ));
    }

    #[test]
    fn a_header_is_read_alone_and_only_at_its_length() {
        let bytes = sample().encode();
        let head: &[u8; HEADER] = bytes[..HEADER].try_into().unwrap();
        let len = bytes.len() as u64;
        let want = Header {
            pages: 3,
            snapshot_size: 64 * PAGE,
        };
        assert_eq!(Header::read(head, len), Some(want));
        assert_eq!(Header::read(head, len - 8), None);
        // A count beyond the bound is refused without arithmetic overflow.
        let mut big = *head;
        big[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(Header::read(&big, len), None);
        let mut foreign = *head;
        foreign[0] ^= 1;
        assert_eq!(Header::read(&foreign, len), None);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Recording::decode(&bytes);
        }

        #[test]
        fn a_flipped_byte_is_always_refused(i in 0usize..(HEADER + 24 + TRAILER), bit in 0u8..8) {
            let mut v = sample().encode();
            v[i] ^= 1 << bit;
            prop_assert!(Recording::decode(&v).is_err());
        }
    }
}
