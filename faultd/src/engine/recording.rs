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
//! Zero pages are not in version 1: whoever serves a snapshot file finds them in it.
//!
//! **Version 2** (only beside a snapshot object, [`Recording::decode_object`]; the local
//! library reads and writes version 1): the same, with version 2, and between the offsets and
//! the checksum the object's zero chunks:
//!
//! | bytes | what |
//! |---|---|
//! | 8 | chunk size Z of the indexes, bytes (a power of two, 512 KiB..=4 MiB) |
//! | 8 | count M of zero chunks, at most 1048576 |
//! | 8M | indexes of chunks of Z bytes whose bytes are all zero: ascending, within the object |
//!
//! The header's digest field of a recording of an object is not a content hash but the
//! object version's identity (`engine::objects::recording_digest`).
use sha2::{Digest, Sha256};
use std::collections::HashSet;

/// Magic of a recording.
pub const MAGIC: [u8; 8] = *b"FAULTDWS";
/// The format version written and read.
pub const VERSION: u32 = 1;
/// The version with an object's zero chunks (read by [`Recording::decode_object`] only).
pub const VERSION_ZERO: u32 = 2;
/// Most zero chunks a version-2 recording lists.
pub const MAX_ZERO_CHUNKS: u64 = 1 << 20;
/// Most bytes of an encoded version-2 recording.
pub const MAX_OBJECT_BYTES: usize = MAX_BYTES + 16 + 8 * MAX_ZERO_CHUNKS as usize;
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
    /// An object's chunks known to be all zero (version 2; None: version 1).
    pub zero: Option<ZeroChunks>,
}

/// Chunks of an object whose bytes are all zero, as faultd saw them when it fetched them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZeroChunks {
    /// The chunk size the indexes count in.
    pub chunk_bytes: u64,
    /// Ascending chunk indexes.
    pub chunks: Vec<u64>,
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
    /// The zero-chunk section is malformed.
    #[error("zero chunks: {0}")]
    Zero(&'static str),
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
        let version = if self.zero.is_some() {
            VERSION_ZERO
        } else {
            VERSION
        };
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&(PAGE as u32).to_le_bytes());
        out.extend_from_slice(&self.snapshot_size.to_le_bytes());
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&(self.offsets.len() as u64).to_le_bytes());
        for o in &self.offsets {
            out.extend_from_slice(&o.to_le_bytes());
        }
        if let Some(z) = &self.zero {
            out.extend_from_slice(&z.chunk_bytes.to_le_bytes());
            out.extend_from_slice(&(z.chunks.len() as u64).to_le_bytes());
            for c in &z.chunks {
                out.extend_from_slice(&c.to_le_bytes());
            }
        }
        let sum: [u8; 32] = Sha256::digest(&out).into();
        out.extend_from_slice(&sum);
        out
    }

    /// Reads a recording, checking every byte (bounded: nothing is allocated beyond what
    /// `bytes` holds).
    pub fn decode(bytes: &[u8]) -> Result<Recording, DecodeError> {
        Self::decode_as(bytes, false)
    }

    /// Reads a recording beside an object: version 1, or version 2 with its zero chunks
    /// (checked as the rest: ascending, within the object, bounded).
    pub fn decode_object(bytes: &[u8]) -> Result<Recording, DecodeError> {
        Self::decode_as(bytes, true)
    }

    fn decode_as(bytes: &[u8], object: bool) -> Result<Recording, DecodeError> {
        let max = if object { MAX_OBJECT_BYTES } else { MAX_BYTES };
        if bytes.len() < HEADER + TRAILER || bytes.len() > max {
            return Err(DecodeError::Size(bytes.len()));
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap_or_default());
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or_default());
        if bytes[..8] != MAGIC {
            return Err(DecodeError::Magic);
        }
        let version = u32_at(8);
        if version != VERSION && !(object && version == VERSION_ZERO) {
            return Err(DecodeError::Version(version));
        }
        if u32_at(12) as u64 != PAGE {
            return Err(DecodeError::PageSize(u32_at(12)));
        }
        let count = u64_at(56);
        let body = bytes.len() - TRAILER;
        // Version 2: the zero section's 16 bytes of head follow the offsets.
        let tail = if version == VERSION_ZERO { 16 } else { 0 };
        let room = ((bytes.len() - HEADER - TRAILER).saturating_sub(tail) / 8) as u64;
        let offsets_end = (count <= MAX_PAGES)
            .then(|| HEADER + 8 * count as usize)
            .filter(|&e| e + tail <= body);
        let Some(offsets_end) = offsets_end else {
            return Err(DecodeError::Count { count, room });
        };
        if version == VERSION
            && (count != room || !(bytes.len() - HEADER - TRAILER).is_multiple_of(8))
        {
            return Err(DecodeError::Count { count, room });
        }
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
        let zero = if version == VERSION_ZERO {
            let chunk_bytes = u64_at(offsets_end);
            let m = u64_at(offsets_end + 8);
            if !(chunk_bytes.is_power_of_two() && (512 << 10..=4 << 20).contains(&chunk_bytes)) {
                return Err(DecodeError::Zero(
                    "the chunk size is not a power of two from 512 KiB to 4 MiB",
                ));
            }
            if m > MAX_ZERO_CHUNKS || (offsets_end + 16) as u64 + 8 * m != body as u64 {
                return Err(DecodeError::Zero("the count does not match the length"));
            }
            let chunks_in = snapshot_size.div_ceil(chunk_bytes);
            let mut chunks = Vec::with_capacity(m as usize);
            for i in 0..m as usize {
                let c = u64_at(offsets_end + 16 + 8 * i);
                if c >= chunks_in {
                    return Err(DecodeError::Zero("a chunk beyond the object"));
                }
                if chunks.last().is_some_and(|&l| l >= c) {
                    return Err(DecodeError::Zero("chunks not ascending"));
                }
                chunks.push(c);
            }
            Some(ZeroChunks {
                chunk_bytes,
                chunks,
            })
        } else {
            None
        };
        Ok(Recording {
            snapshot_size,
            digest,
            offsets,
            zero,
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
            zero: None,
        }
    }

    #[test]
    fn an_objects_recording_with_zero_chunks_reads_back_and_is_checked() {
        let mut r = sample();
        r.snapshot_size = 4 << 20;
        r.zero = Some(ZeroChunks {
            chunk_bytes: 512 << 10,
            chunks: vec![1, 5, 7],
        });
        let bytes = r.encode();
        assert_eq!(Recording::decode_object(&bytes), Ok(r.clone()));
        // The local library's reader takes version 1 only.
        assert_eq!(Recording::decode(&bytes), Err(DecodeError::Version(2)));
        // Version 1 still reads as an object's.
        assert_eq!(Recording::decode_object(&sample().encode()), Ok(sample()));
        for (chunks, why) in [
            (vec![1, 8], "a chunk beyond the object"),
            (vec![5, 1], "chunks not ascending"),
            (vec![5, 5], "chunks not ascending"),
        ] {
            let mut bad = r.clone();
            bad.zero.as_mut().unwrap().chunks = chunks;
            assert_eq!(
                Recording::decode_object(&bad.encode()),
                Err(DecodeError::Zero(why))
            );
        }
        let mut bad = r.clone();
        bad.zero.as_mut().unwrap().chunk_bytes = 4096;
        assert!(matches!(
            Recording::decode_object(&bad.encode()),
            Err(DecodeError::Zero(_))
        ));
        // Cut short (and checksummed again): refused, never read past the end.
        let mut short = bytes[..bytes.len() - TRAILER - 8].to_vec();
        let sum: [u8; 32] = Sha256::digest(&short).into();
        short.extend_from_slice(&sum);
        assert!(Recording::decode_object(&short).is_err());
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
