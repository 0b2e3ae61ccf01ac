//! The front doors: the control socket and the validation of what VMMs hand over, the
//! operator's admin requests, and Firecracker's page-fault handler protocol. Each door turns a
//! peer's request into work for the [`crate::daemon`] registry and the [`crate::engine`].

pub mod admin;
pub mod control;
pub mod firecracker;
pub mod validate;
