//! iopf
