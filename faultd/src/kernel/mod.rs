//! The kernel as faultd uses it: the userfaultfd operations behind a trait ([`uffd::UffdOps`],
//! with the real [`uffd::KernelUffd`] and fakes in tests), and another process's memory
//! (`process_madvise`, pagemap, `SEEK_DATA` residency). Imports nothing above it.

pub mod remote;
pub mod residency;
pub mod scan;
pub mod uffd;

pub use uffd::Hva;
