//! faultd's swap store: where evicted guest pages go, and the journal that lets a restarted
//! faultd find them again.
//!
//! One store per VM under a directory of its owner (`store.dir/<uid>/`, see
//! [`owner_dir`]): `<vm>.pages`, fixed-size slots (the VM's largest
//! page size) allocated from a free list, so freed slots are reused and the file grows only to
//! the high-water mark of evicted pages; and `<vm>.journal`, an append-only log of where each
//! absent page's contents are. Which page lives in which slot is s2map's `stored` map (pure
//! state); this module moves bytes and keeps the log.
//!
//! # Why a journal, and what it must say
//! A VMM outlives a faultd crash: its guest RAM, its userfaultfd and its registrations stay.
//! Pages that were in guest RAM are still there; pages faultd evicted exist only in this store.
//! A restarted faultd therefore needs, for every page that is *absent* from guest RAM, where its
//! contents are: a store slot, zero (discarded, or evicted while all zero), or the backing the
//! VMM registers again (zero fill or snapshot file) when the journal says nothing. For pages
//! present in guest RAM the memory itself is the truth and the journal is ignored.
//!
//! So a record is written whenever a page leaves guest RAM with contents other than its
//! backing's: [`Record::Stored`] by an eviction after the page is saved and *before* it is
//! dropped from the memfd, and [`Record::Zero`] for a discard or an all-zero eviction. The last
//! record of a page wins. A page that comes back into guest RAM needs no record: it is present,
//! and when it leaves again a new record is written. Slots are reused, so an old record can name
//! a slot that another page owns now; only the last record of a page that is absent counts,
//! and that one is always current.
//!
//! Durability: records are written with `pwrite` before the page is dropped, so they are in the
//! page cache, which survives the death of the faultd process (kill -9, panic). A host crash
//! loses guest RAM as well, so nothing is gained by an fsync per eviction; a clean shutdown
//! syncs both files ([`Store::sync`]). A record torn by a crash mid-write fails its checksum and
//! ends the replay (the write it belonged to had not returned, so its page was not dropped yet).
//!
//! # Who may read it
//! The store holds guest memory, so it is faultd's alone whoever starts faultd and whatever
//! its umask: `store.dir` is created 0700 (an existing one of faultd's uid is made 0700, one
//! of another uid is refused), and every file in it, the compaction's temporary journal
//! included, is created 0600 (a leftover of another mode is made 0600). Store files are opened
//! `O_NOFOLLOW` and must be regular files, so changing a mode never follows a link.

use std::fs::{File, OpenOptions, Permissions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of a store file: guest memory, for faultd alone (whatever the umask).
const FILE_MODE: u32 = 0o600;
/// Mode of an owner's store directory.
const DIR_MODE: u32 = 0o700;

/// The directory of the stores of VMs owned by `uid` (their VMM's uid, from SO_PEERCRED):
/// `dir/<uid>`. A VM name is one owner's: the same name under two uids is two VMs with two
/// stores, and no request of one uid reaches another's.
pub fn owner_dir(dir: &Path, uid: u32) -> PathBuf {
    dir.join(uid.to_string())
}

/// Whether `dir` holds a store of `vm` (its journal: a store is created with both files).
pub fn exists(dir: &Path, vm: &str) -> bool {
    std::fs::symlink_metadata(dir.join(format!("{vm}.journal"))).is_ok_and(|m| m.is_file())
}

/// Moves the store of `vm` from `from` into `to` (which [`Store::open`] makes private):
/// both files, renamed, so it is the same store. Nothing is moved unless `from` has a store
/// of `vm` and `to` has none.
pub fn adopt_legacy(from: &Path, to: &Path, vm: &str) -> io::Result<bool> {
    if !exists(from, vm) || exists(to, vm) {
        return Ok(false);
    }
    private_dir(to).map_err(io::Error::other)?;
    for ext in ["pages", "journal"] {
        let name = format!("{vm}.{ext}");
        match std::fs::rename(from.join(&name), to.join(&name)) {
            Ok(()) => {}
            // A store whose pages file never came to be has a journal alone.
            Err(e) if e.kind() == io::ErrorKind::NotFound && ext == "pages" => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// A fact about an absent page, as the journal keeps it. Pages are named by guest physical
/// address, so a VMM that registers the same layout again finds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// The page at `gpa` is in `slot`.
    Stored {
        /// Guest physical address of the page.
        gpa: u64,
        /// Store slot.
        slot: u32,
    },
    /// The pages of `[gpa, gpa + len)` are zero, whatever their backing says.
    Zero {
        /// Start.
        gpa: u64,
        /// Bytes.
        len: u64,
    },
}

/// A VM's store: page slots and the journal.
#[derive(Debug)]
pub struct Store {
    file: File,
    /// The pages file's lock (flock, on a duplicate of `file`), held while the store is open;
    /// None on a kernel without file locking.
    _lock: Option<nix::fcntl::Flock<File>>,
    path: PathBuf,
    journal: File,
    journal_path: PathBuf,
    /// Bytes of the journal (where the next record goes).
    journal_len: u64,
    /// Records in the journal.
    appended: u64,
    /// Records it had when it was last written whole (or opened).
    base: u64,
    slot_bytes: u64,
    free: Vec<u32>,
    next: u32,
    /// Keep the files when the store is dropped (faultd is going away, the VM is not).
    keep: bool,
}

/// Failure of a store operation, named for it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Creating or opening a store file failed.
    #[error("opening store file {path}")]
    Open {
        /// File path.
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The store directory exists and belongs to another user, who could read or replace
    /// the guest memory faultd would keep there.
    #[error("the store directory {path} belongs to uid {owner}, not to faultd's uid {faultd}")]
    DirOwner {
        /// Directory path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// faultd's effective uid.
        faultd: u32,
    },
    /// Another live session (of this faultd or another) holds the VM's store.
    #[error("the store {path} is in use by another session of the same VM name")]
    Busy {
        /// File path.
        path: PathBuf,
    },
    /// The journal of a store being resumed is not one this version wrote for this VM.
    #[error("journal {path} cannot be resumed: {why}")]
    Journal {
        /// File path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Writing a page to its slot failed.
    #[error("writing store slot {slot}")]
    Write {
        /// Slot.
        slot: u32,
        #[source]
        source: io::Error,
    },
    /// Reading a page from its slot failed.
    #[error("reading store slot {slot}")]
    Read {
        /// Slot.
        slot: u32,
        #[source]
        source: io::Error,
    },
    /// Appending to or rewriting the journal failed.
    #[error("writing the store journal {path}")]
    WriteJournal {
        /// File path.
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Making the pages file durable failed.
    #[error("syncing store file {path}")]
    Sync {
        /// File path.
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Every slot number is in use.
    #[error("the store is full ({0} slots)")]
    Full(u32),
}

/// `"FDJ1"` as a little-endian u32.
const JOURNAL_MAGIC: u32 = 0x314a_4446;
const JOURNAL_VERSION: u32 = 1;
/// magic, version, slot bytes.
const HEADER_BYTES: u64 = 16;
/// kind, checksum, gpa, argument.
const RECORD_BYTES: usize = 24;
const KIND_STORED: u32 = 1;
const KIND_ZERO: u32 = 2;
/// Records appended before a compaction is considered at all.
const COMPACT_MIN: u64 = 4096;

impl Store {
    /// Opens the store of VM `vm` in `dir` with slots of `slot_bytes`.
    ///
    /// Fresh (`resume` false): any leftover files of that name are truncated. Resumed: the
    /// existing journal is read and its records returned, oldest first (none if there was no
    /// store); the caller rebuilds page state from them and hands the slots still in use to
    /// [`Store::adopt`].
    ///
    /// The pages file is locked (`flock`) while the store is open, so two sessions can never
    /// share one store, whether in one faultd or in two.
    pub fn open(
        dir: &Path,
        vm: &str,
        slot_bytes: u64,
        resume: bool,
    ) -> Result<(Store, Vec<Record>), StoreError> {
        let path = dir.join(format!("{vm}.pages"));
        let journal_path = dir.join(format!("{vm}.journal"));
        let open_err = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Open { path, source }
        };
        private_dir(dir)?;
        let open = |p: &Path| open_private(p, false);
        let file = open(&path).map_err(open_err(&path))?;
        let dup = file.try_clone().map_err(open_err(&path))?;
        let lock = match nix::fcntl::Flock::lock(dup, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(locked) => Some(locked),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Err(StoreError::Busy { path }),
            // A kernel built without file locking (CONFIG_FILE_LOCKING=n, e.g. a minimal test
            // kernel): the store works, only the guard against a second user is gone.
            Err((_, nix::errno::Errno::ENOSYS | nix::errno::Errno::EOPNOTSUPP)) => {
                tracing::warn!(
                    store = %path.display(),
                    "no file locking: the store is not guarded against a second user"
                );
                None
            }
            Err((_, e)) => return Err(open_err(&path)(e.into())),
        };
        let journal = open(&journal_path).map_err(open_err(&journal_path))?;
        let mut store = Store {
            file,
            _lock: lock,
            path,
            journal,
            journal_path,
            journal_len: 0,
            appended: 0,
            base: 0,
            slot_bytes,
            free: Vec::new(),
            next: 0,
            keep: false,
        };
        let records = if resume {
            store.read_journal()?
        } else {
            Vec::new()
        };
        if records.is_empty() {
            // Nothing to keep: start both files afresh.
            store.reset()?;
        }
        Ok((store, records))
    }

    /// Empties both files and writes the journal header.
    fn reset(&mut self) -> Result<(), StoreError> {
        self.file.set_len(0).map_err(|source| StoreError::Open {
            path: self.path.clone(),
            source,
        })?;
        let mut header = [0u8; HEADER_BYTES as usize];
        header[0..4].copy_from_slice(&JOURNAL_MAGIC.to_le_bytes());
        header[4..8].copy_from_slice(&JOURNAL_VERSION.to_le_bytes());
        header[8..16].copy_from_slice(&self.slot_bytes.to_le_bytes());
        let write = |j: &File| {
            j.set_len(0)?;
            j.write_all_at(&header, 0)
        };
        write(&self.journal).map_err(|source| self.journal_error(source))?;
        self.journal_len = HEADER_BYTES;
        self.appended = 0;
        self.base = 0;
        self.free.clear();
        self.next = 0;
        Ok(())
    }

    /// Reads every intact record; cuts a torn tail off.
    fn read_journal(&mut self) -> Result<Vec<Record>, StoreError> {
        let bad = |why: String| StoreError::Journal {
            path: self.journal_path.clone(),
            why,
        };
        let mut bytes = Vec::new();
        {
            use std::io::Read;
            (&self.journal)
                .read_to_end(&mut bytes)
                .map_err(|source| self.journal_error(source))?;
        }
        if bytes.is_empty() {
            return Ok(Vec::new());
        }
        if bytes.len() < HEADER_BYTES as usize {
            return Err(bad(format!(
                "{} bytes, shorter than its header",
                bytes.len()
            )));
        }
        let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4"));
        let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8"));
        if u32_at(&bytes, 0) != JOURNAL_MAGIC || u32_at(&bytes, 4) != JOURNAL_VERSION {
            return Err(bad("not a faultd journal of version 1".into()));
        }
        let slot_bytes = u64_at(&bytes, 8);
        if slot_bytes != self.slot_bytes {
            return Err(bad(format!(
                "written with slots of {slot_bytes} bytes, the VM now has {}-byte pages",
                self.slot_bytes
            )));
        }
        let mut records = Vec::new();
        let mut at = HEADER_BYTES as usize;
        while at + RECORD_BYTES <= bytes.len() {
            let r = &bytes[at..at + RECORD_BYTES];
            let (kind, sum, gpa, arg) = (u32_at(r, 0), u32_at(r, 4), u64_at(r, 8), u64_at(r, 16));
            if sum != checksum(kind, gpa, arg) {
                break;
            }
            records.push(match kind {
                KIND_STORED => match u32::try_from(arg) {
                    Ok(slot) => Record::Stored { gpa, slot },
                    Err(_) => break,
                },
                KIND_ZERO => Record::Zero { gpa, len: arg },
                _ => break,
            });
            at += RECORD_BYTES;
        }
        if at != bytes.len() {
            tracing::warn!(
                journal = %self.journal_path.display(),
                intact = records.len(),
                cut_bytes = bytes.len() - at,
                "journal ends in a torn record (faultd died mid-write); replaying the intact ones"
            );
            self.journal
                .set_len(at as u64)
                .map_err(|source| self.journal_error(source))?;
        }
        self.journal_len = at as u64;
        self.appended = records.len() as u64;
        self.base = self.appended;
        Ok(records)
    }

    /// After a resume: `used` are the slots that hold pages still absent from guest RAM; every
    /// other slot below the highest is free.
    pub fn adopt(&mut self, used: impl IntoIterator<Item = u32>) {
        let mut used: Vec<u32> = used.into_iter().collect();
        used.sort_unstable();
        used.dedup();
        self.next = used.last().map_or(0, |&s| s + 1);
        let mut u = used.iter().peekable();
        let mut free: Vec<u32> = (0..self.next)
            .filter(|s| {
                if u.peek() == Some(&s) {
                    u.next();
                    false
                } else {
                    true
                }
            })
            .collect();
        // Lowest first out of `save` (it pops from the end). Reversed after filtering: the
        // filter walks `used` in ascending order alongside.
        free.reverse();
        self.free = free;
    }

    /// Saves `page` (at most one slot) to a free slot and returns the slot.
    pub fn save(&mut self, page: &[u8]) -> Result<u32, StoreError> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                let s = self.next;
                self.next = self.next.checked_add(1).ok_or(StoreError::Full(s))?;
                s
            }
        };
        if let Err(source) = self.file.write_all_at(page, self.offset(slot)) {
            self.free.push(slot);
            return Err(StoreError::Write { slot, source });
        }
        Ok(slot)
    }

    /// Appends `record` to the journal.
    pub fn record(&mut self, record: Record) -> Result<(), StoreError> {
        let bytes = encode(record);
        self.journal
            .write_all_at(&bytes, self.journal_len)
            .map_err(|source| self.journal_error(source))?;
        self.journal_len += RECORD_BYTES as u64;
        self.appended += 1;
        Ok(())
    }

    /// Whether the journal has grown enough since it was last written whole that
    /// [`Store::compact`] is worth its cost: by `COMPACT_MIN` records and by three times its
    /// size then. So the journal stays within a constant factor of the state it describes, and
    /// the cost of compactions is spread over the records that made them due.
    pub fn wants_compaction(&self) -> bool {
        let new = self.appended - self.base;
        new >= COMPACT_MIN.max(3 * self.base)
    }

    /// Replaces the journal by `records` (the state now), atomically: written beside it, then
    /// renamed over it, so a crash leaves the old journal or the new one, never half of one.
    pub fn compact(&mut self, records: impl IntoIterator<Item = Record>) -> Result<(), StoreError> {
        let tmp = self.journal_path.with_extension("journal.new");
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&JOURNAL_MAGIC.to_le_bytes());
        bytes.extend_from_slice(&JOURNAL_VERSION.to_le_bytes());
        bytes.extend_from_slice(&self.slot_bytes.to_le_bytes());
        let mut n = 0u64;
        for r in records {
            bytes.extend_from_slice(&encode(r));
            n += 1;
        }
        let write = || -> io::Result<File> {
            let f = open_private(&tmp, true)?;
            f.write_all_at(&bytes, 0)?;
            std::fs::rename(&tmp, &self.journal_path)?;
            Ok(f)
        };
        let journal = write().map_err(|source| self.journal_error(source))?;
        self.journal = journal;
        self.journal_len = bytes.len() as u64;
        self.appended = n;
        self.base = n;
        Ok(())
    }

    /// Reads `slot` into `page`.
    pub fn load(&self, slot: u32, page: &mut [u8]) -> Result<(), StoreError> {
        self.file
            .read_exact_at(page, self.offset(slot))
            .map_err(|source| StoreError::Read { slot, source })
    }

    /// Returns `slot` to the free list.
    pub fn free(&mut self, slot: u32) {
        self.free.push(slot);
    }

    /// Slots holding pages now.
    pub fn used_slots(&self) -> u32 {
        self.next - self.free.len() as u32
    }

    /// The pages file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps both files when the store is dropped: faultd is stopping, the VM is not, and a
    /// faultd started again resumes from them.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Makes both files durable (a clean shutdown; see the module notes on durability).
    pub fn sync(&self) -> Result<(), StoreError> {
        let sync = |f: &File| nix::unistd::fdatasync(f.as_fd()).map_err(io::Error::from);
        sync(&self.file).map_err(|source| StoreError::Sync {
            path: self.path.clone(),
            source,
        })?;
        sync(&self.journal).map_err(|source| self.journal_error(source))
    }

    fn journal_error(&self, source: io::Error) -> StoreError {
        StoreError::WriteJournal {
            path: self.journal_path.clone(),
            source,
        }
    }

    fn offset(&self, slot: u32) -> u64 {
        slot as u64 * self.slot_bytes
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // The VM is gone (its VMM hung up): nothing can fault these pages in any more.
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.journal_path);
    }
}

/// Creates `dir` (and its missing parents) [`DIR_MODE`] whatever the umask. An existing `dir`
/// of faultd's uid that is not [`DIR_MODE`] (made by an older faultd, or by hand) is made so,
/// and said; one of another uid is refused: its owner could read or swap the files.
fn private_dir(dir: &Path) -> Result<(), StoreError> {
    let failed = |source| StoreError::Open {
        path: dir.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(failed)?;
    let opened = File::open(dir).map_err(failed)?;
    let meta = opened.metadata().map_err(failed)?;
    let faultd = nix::unistd::geteuid().as_raw();
    if meta.uid() != faultd {
        return Err(StoreError::DirOwner {
            path: dir.to_owned(),
            owner: meta.uid(),
            faultd,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode != DIR_MODE {
        opened
            .set_permissions(Permissions::from_mode(DIR_MODE))
            .map_err(failed)?;
        tracing::warn!(
            dir = %dir.display(),
            "the store directory had mode {mode:04o}: made it {DIR_MODE:04o}"
        );
    }
    Ok(())
}

/// Opens the store file `path` for reading and writing, creating it [`FILE_MODE`] whatever the
/// umask (emptied with `truncate`). It must be a regular file and not a link (`O_NOFOLLOW`);
/// an existing one of another mode (a leftover of an older faultd) is made [`FILE_MODE`].
fn open_private(path: &Path, truncate: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let mode = meta.mode() & 0o7777;
    if mode != FILE_MODE {
        file.set_permissions(Permissions::from_mode(FILE_MODE))?;
        tracing::warn!(
            file = %path.display(),
            "the store file had mode {mode:04o}: made it {FILE_MODE:04o}"
        );
    }
    Ok(file)
}

fn checksum(kind: u32, gpa: u64, arg: u64) -> u32 {
    // FNV-1a over the record's fields: catches a torn or garbage record, which is all it is
    // for (the journal is faultd's own file, not input).
    let mut h: u32 = 0x811c_9dc5;
    for b in kind
        .to_le_bytes()
        .iter()
        .chain(&gpa.to_le_bytes())
        .chain(&arg.to_le_bytes())
    {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

fn encode(record: Record) -> [u8; RECORD_BYTES] {
    let (kind, gpa, arg) = match record {
        Record::Stored { gpa, slot } => (KIND_STORED, gpa, u64::from(slot)),
        Record::Zero { gpa, len } => (KIND_ZERO, gpa, len),
    };
    let mut b = [0u8; RECORD_BYTES];
    b[0..4].copy_from_slice(&kind.to_le_bytes());
    b[4..8].copy_from_slice(&checksum(kind, gpa, arg).to_le_bytes());
    b[8..16].copy_from_slice(&gpa.to_le_bytes());
    b[16..24].copy_from_slice(&arg.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_pages_read_back_and_freed_slots_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Store::open(dir.path(), "vm", 4096, false).unwrap();
        let a = s.save(&[1; 4096]).unwrap();
        let b = s.save(&[2; 4096]).unwrap();
        let mut buf = [0; 4096];
        s.load(a, &mut buf).unwrap();
        assert_eq!(buf, [1; 4096]);

        s.free(a);
        let c = s.save(&[3; 4096]).unwrap();

        assert_eq!(c, a);
        s.load(b, &mut buf).unwrap();
        assert_eq!(buf, [2; 4096]);
        assert_eq!(s.used_slots(), 2);
    }

    #[test]
    fn the_store_goes_with_the_vm_unless_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let (s, _) = Store::open(dir.path(), "vm", 4096, false).unwrap();
            s.path().to_owned()
        };
        assert!(!path.exists());
        assert!(!dir.path().join("vm.journal").exists());
        {
            let (mut s, _) = Store::open(dir.path(), "vm", 4096, false).unwrap();
            s.keep();
        }
        assert!(path.exists());
    }

    #[test]
    fn a_resumed_store_replays_its_records_and_keeps_the_pages() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Store::open(dir.path(), "vm", 4096, false).unwrap();
            let a = s.save(&[7; 4096]).unwrap();
            s.record(Record::Stored {
                gpa: 0x1000,
                slot: a,
            })
            .unwrap();
            s.record(Record::Zero {
                gpa: 0x8000,
                len: 0x2000,
            })
            .unwrap();
            let b = s.save(&[9; 4096]).unwrap();
            s.record(Record::Stored {
                gpa: 0x3000,
                slot: b,
            })
            .unwrap();
            s.keep();
        }
        let (mut s, records) = Store::open(dir.path(), "vm", 4096, true).unwrap();
        assert_eq!(
            records,
            vec![
                Record::Stored {
                    gpa: 0x1000,
                    slot: 0
                },
                Record::Zero {
                    gpa: 0x8000,
                    len: 0x2000
                },
                Record::Stored {
                    gpa: 0x3000,
                    slot: 1
                },
            ]
        );
        let mut buf = [0; 4096];
        s.load(1, &mut buf).unwrap();
        assert_eq!(buf, [9; 4096]);
        // Only slot 1 still holds an absent page: slot 0 is reused first, then 2.
        s.adopt([1]);
        assert_eq!(s.save(&[1; 4096]).unwrap(), 0);
        assert_eq!(s.save(&[1; 4096]).unwrap(), 2);
        // Every slot in use: no free one is handed out twice.
        s.adopt([4, 0, 1, 2, 3]);
        assert_eq!(s.used_slots(), 5);
        assert_eq!(s.save(&[1; 4096]).unwrap(), 5);
        s.adopt([0, 2, 5]);
        let more: Vec<u32> = (0..4).map(|_| s.save(&[1; 4096]).unwrap()).collect();
        assert_eq!(more, vec![1, 3, 4, 6]);
    }

    #[test]
    fn a_fresh_open_forgets_a_leftover_store() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Store::open(dir.path(), "vm", 4096, false).unwrap();
            let a = s.save(&[7; 4096]).unwrap();
            s.record(Record::Stored { gpa: 0, slot: a }).unwrap();
            s.keep();
        }
        drop(Store::open(dir.path(), "vm", 4096, false).unwrap());
        let (_s, records) = Store::open(dir.path(), "vm", 4096, true).unwrap();
        assert!(records.is_empty());
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_intact_records_replay() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Store::open(dir.path(), "vm", 4096, false).unwrap();
            s.record(Record::Stored { gpa: 0, slot: 0 }).unwrap();
            s.record(Record::Stored {
                gpa: 0x1000,
                slot: 1,
            })
            .unwrap();
            s.keep();
        }
        let j = dir.path().join("vm.journal");
        let len = std::fs::metadata(&j).unwrap().len();
        // Half of the second record, as if faultd died in the middle of writing it.
        let f = OpenOptions::new().write(true).open(&j).unwrap();
        f.set_len(len - 10).unwrap();
        let (mut s, records) = Store::open(dir.path(), "vm", 4096, true).unwrap();
        assert_eq!(records, vec![Record::Stored { gpa: 0, slot: 0 }]);
        // New records go after the intact ones.
        s.record(Record::Zero { gpa: 0, len: 4096 }).unwrap();
        s.keep();
        drop(s);
        let (_s, records) = Store::open(dir.path(), "vm", 4096, true).unwrap();
        assert_eq!(
            records,
            vec![
                Record::Stored { gpa: 0, slot: 0 },
                Record::Zero { gpa: 0, len: 4096 }
            ]
        );
    }

    #[test]
    fn a_journal_of_other_page_sizes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Store::open(dir.path(), "vm", 4096, false).unwrap();
            s.record(Record::Stored { gpa: 0, slot: 0 }).unwrap();
            s.keep();
        }
        let err = Store::open(dir.path(), "vm", 2 << 20, true).unwrap_err();
        assert!(err.to_string().contains("slots of 4096 bytes"), "{err}");
    }

    #[test]
    fn store_files_are_0600_in_a_0700_directory_whatever_was_there() {
        let dir = tempfile::tempdir().unwrap();
        let owner = owner_dir(dir.path(), 1000);
        std::fs::create_dir(&owner).unwrap();
        std::fs::set_permissions(&owner, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A pages file an older faultd made under a loose umask.
        let pages = owner.join("vm.pages");
        std::fs::write(&pages, b"").unwrap();
        std::fs::set_permissions(&pages, std::fs::Permissions::from_mode(0o644)).unwrap();

        let (mut s, _) = Store::open(&owner, "vm", 4096, false).unwrap();
        s.keep();

        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&owner), 0o700);
        assert_eq!(mode(&pages), 0o600);
        assert_eq!(mode(&owner.join("vm.journal")), 0o600);
    }

    #[test]
    fn a_store_is_not_opened_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, b"not faultd's").unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("vm.pages")).unwrap();

        let err = Store::open(dir.path(), "vm", 4096, false).unwrap_err();

        assert!(matches!(err, StoreError::Open { .. }), "{err}");
        assert_eq!(std::fs::read(&elsewhere).unwrap(), b"not faultd's");
    }

    #[test]
    fn an_older_store_is_moved_whole_and_only_where_there_is_none() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Store::open(dir.path(), "vm", 4096, false).unwrap();
            let slot = s.save(&[5; 4096]).unwrap();
            s.record(Record::Stored { gpa: 0, slot }).unwrap();
            s.keep();
        }
        let root = owner_dir(dir.path(), 0);

        assert!(adopt_legacy(dir.path(), &root, "vm").unwrap());
        assert!(!adopt_legacy(dir.path(), &root, "vm").unwrap());

        assert!(!exists(dir.path(), "vm"));
        let (s, records) = Store::open(&root, "vm", 4096, true).unwrap();
        assert_eq!(records, vec![Record::Stored { gpa: 0, slot: 0 }]);
        let mut page = [0; 4096];
        s.load(0, &mut page).unwrap();
        assert_eq!(page, [5; 4096]);
    }

    #[test]
    fn one_store_serves_one_session() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, _) = Store::open(dir.path(), "vm", 4096, false).unwrap();
        assert!(matches!(
            Store::open(dir.path(), "vm", 4096, true),
            Err(StoreError::Busy { .. })
        ));
        assert!(Store::open(dir.path(), "other", 4096, false).is_ok());
    }

    #[test]
    fn compaction_replaces_the_log_by_the_state() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Store::open(dir.path(), "vm", 4096, false).unwrap();
            for i in 0..COMPACT_MIN - 1 {
                s.record(Record::Stored {
                    gpa: 0,
                    slot: i as u32,
                })
                .unwrap();
            }
            assert!(!s.wants_compaction());
            for i in 0..1 {
                s.record(Record::Stored {
                    gpa: 0,
                    slot: i as u32,
                })
                .unwrap();
            }
            assert!(s.wants_compaction());
            s.compact([Record::Stored { gpa: 0, slot: 5 }]).unwrap();
            assert!(!s.wants_compaction());
            s.record(Record::Zero {
                gpa: 0x1000,
                len: 0x1000,
            })
            .unwrap();
            s.keep();
        }
        assert!(!dir.path().join("vm.journal.new").exists());
        let (_s, records) = Store::open(dir.path(), "vm", 4096, true).unwrap();
        assert_eq!(
            records,
            vec![
                Record::Stored { gpa: 0, slot: 5 },
                Record::Zero {
                    gpa: 0x1000,
                    len: 0x1000
                }
            ]
        );
    }

    /// Octal mode of `path` (not following a link).
    fn mode_of(path: &Path) -> String {
        let meta = std::fs::symlink_metadata(path).unwrap();
        format!("{:04o}", meta.mode() & 0o7777)
    }

    #[test]
    fn a_loose_store_directory_and_leftover_files_are_made_private() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("store");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        for name in ["vm.pages", "vm.journal", "vm.journal.new"] {
            std::fs::write(dir.join(name), b"").unwrap();
            std::fs::set_permissions(dir.join(name), Permissions::from_mode(0o644)).unwrap();
        }

        let (mut s, _) = Store::open(&dir, "vm", 4096, false).unwrap();
        s.compact([Record::Zero { gpa: 0, len: 4096 }]).unwrap();

        assert_eq!(
            ["", "vm.pages", "vm.journal"].map(|n| mode_of(&dir.join(n))),
            ["0700", "0600", "0600"]
        );
    }

    #[test]
    fn a_store_file_that_is_a_link_is_refused_and_its_target_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"not a store").unwrap();
        std::fs::set_permissions(&target, Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("vm.pages")).unwrap();

        let err = Store::open(dir.path(), "vm", 4096, false).unwrap_err();

        assert!(matches!(err, StoreError::Open { .. }), "{err}");
        assert_eq!(
            (mode_of(&target), std::fs::read(&target).unwrap()),
            ("0644".to_owned(), b"not a store".to_vec())
        );
    }

    #[test]
    fn a_store_directory_of_another_user_is_refused() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("store");
        std::fs::create_dir(&dir).unwrap();
        // Needs root (as faultd's tests do): only root gives a directory away.
        std::os::unix::fs::chown(&dir, Some(4242), None).unwrap();

        let err = Store::open(&dir, "vm", 4096, false).unwrap_err();

        assert!(
            matches!(err, StoreError::DirOwner { owner: 4242, .. }),
            "{err}"
        );
        assert!(!dir.join("vm.pages").exists());
    }
}
