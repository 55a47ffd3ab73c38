//! Wire types between the control plane and the proxies (gRPC, generated from `proto/`).

#![allow(
    missing_debug_implementations,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "generated code"
)]

/// `castellan.v1`: identity (certify, renew) and distribution (watch, report).
pub mod v1 {
    tonic::include_proto!("castellan.v1");
}
