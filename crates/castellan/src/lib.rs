//! The `castellan` binary's library half: the demo mesh, so tests can drive it in-process.

pub mod demo;
pub mod demo_apps;
pub mod ocsf;
pub mod peers;
