//! testvmm
