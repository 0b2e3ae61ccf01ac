//! iopf: device I/O page faults (PCIe PRI page request groups) for faultd.
//!
//! Not built yet: the page-request model, the iommufd fault-queue backend, the eventfd ring
//! transport and the emulated PRI device are issue 3. This crate exists so the workspace layout
//! is the final one.
