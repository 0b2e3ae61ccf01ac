//! s2map
