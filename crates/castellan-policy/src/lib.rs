//! Castellan's policy engine: YAML access policies with CEL conditions, compiled into an index by
//! destination service, path template and method, so that a decision costs the same at 10 or
//! 10,000 rules. No async runtime and no network: embeddable and fuzzable.
//!
//! ```
//! use castellan_policy::{PolicySet, Request};
//! let set = PolicySet::from_sources([("inline", r#"
//! apiVersion: castellan/v1
//! kind: AccessPolicy
//! metadata: {name: orders-api}
//! spec:
//!   service: orders
//!   rules:
//!     - name: read
//!       effect: allow
//!       from: {services: [gateway]}
//!       to: {methods: [GET], paths: ["/orders/{id}"]}
//! "#)]).unwrap();
//! let req: Request = serde_json::from_str(r#"{"source": {"service": "gateway"},
//!   "destination": {"service": "orders"},
//!   "request": {"method": "GET", "path": "/orders/42"}}"#).unwrap();
//! assert!(set.decide(&req).is_allowed());
//! ```

pub mod condition;
mod engine;
mod fast;
mod load;
pub mod model;
pub mod normalize;
pub mod parse;
pub mod principal;
mod request;
pub mod template;
pub mod testing;
pub mod yaml;

pub use engine::{Engine, PolicySet, Reads, SetOptions};
pub use load::{LoadError, is_test_file, yaml_files};
pub use model::{Effect, Mode, RateKey, RateLimit, RuleId};
pub use normalize::{
    Malformed, normalize_host, normalize_path, normalize_target, percent_decode_lossy,
    validate_method,
};
pub use parse::Diagnostic;
pub use request::{Decision, Destination, HttpRequest, Reason, Request, Source, User};
