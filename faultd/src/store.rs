//! faultd's swap store: where evicted guest pages go.
//!
//! One file per session under `store.dir`, made of fixed-size slots (the session's largest
//! page size). Slots are allocated from a free list, so freed slots are reused and the file
//! grows only to the high-water mark of evicted pages. Which page lives in which slot is s2map's
//! `stored` map (pure state); this module only moves bytes.
//!
//! Not yet: surviving a faultd restart. The slot index lives in s2map only; making it durable
//! (a journal next to the file, replayed on re-registration) is part of the restart work.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A session's store file.
#[derive(Debug)]
pub struct Store {
    file: File,
    path: PathBuf,
    slot_bytes: u64,
    free: Vec<u32>,
    next: u32,
}

/// Failure of a store operation, named for it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Creating the store file failed.
    #[error("creating store file {path}")]
    Create {
        /// File path.
        path: PathBuf,
        #[source]
        source: io::Error,
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
    /// Every slot number is in use.
    #[error("the store is full ({0} slots)")]
    Full(u32),
}

impl Store {
    /// Creates (truncating) `dir/<name>.pages` with slots of `slot_bytes`.
    pub fn create(dir: &Path, name: &str, slot_bytes: u64) -> Result<Store, StoreError> {
        let path = dir.join(format!("{name}.pages"));
        let create = || -> io::Result<File> {
            std::fs::create_dir_all(dir)?;
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
        };
        let file = create().map_err(|source| StoreError::Create {
            path: path.clone(),
            source,
        })?;
        Ok(Store {
            file,
            path,
            slot_bytes,
            free: Vec::new(),
            next: 0,
        })
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

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn offset(&self, slot: u32) -> u64 {
        slot as u64 * self.slot_bytes
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // The store holds a dead session's pages: nothing can fault them in any more.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_pages_read_back_and_freed_slots_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::create(dir.path(), "vm", 4096).unwrap();
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
    fn the_store_file_goes_with_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let s = Store::create(dir.path(), "vm", 4096).unwrap();
            s.path().to_owned()
        };
        assert!(!path.exists());
    }
}
