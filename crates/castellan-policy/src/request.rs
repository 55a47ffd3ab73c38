//! The decision input (product.md §4) and the decision output.

use crate::model::{Effect, Mode, RuleId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A request to decide on, as `policy eval --input` reads it.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The calling workload; absent for an unauthenticated caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// The end user; absent when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
    /// The service being called.
    pub destination: Destination,
    /// The HTTP request.
    pub request: HttpRequest,
    /// The time of the request (RFC 3339); now when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<chrono::DateTime<chrono::FixedOffset>>,
}

/// The calling workload.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// A service of the local trust domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// A full SPIFFE ID, of any trust domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
}

/// The end user.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Other claims, with their JSON types.
    #[serde(default)]
    pub claims: BTreeMap<String, serde_json::Value>,
    /// The delegation chain: services or clients acting on the user's behalf, nearest last;
    /// empty for a direct call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub act: Vec<String>,
}

/// The called service.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// Its local service name.
    pub service: String,
}

/// The HTTP part of the request.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HttpRequest {
    /// Method, as sent.
    pub method: String,
    /// Request target (path and query), as sent.
    pub path: String,
    /// Host (authority), as sent.
    #[serde(default)]
    pub host: String,
    /// Headers; keys are compared lower-case.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// Why a decision came out as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// An allow rule matched and no deny rule did.
    MatchedAllow,
    /// A deny rule matched.
    MatchedDeny,
    /// No allow rule matched.
    NoMatchingAllow,
    /// The request is malformed (path, method, host or identity).
    MalformedRequest,
    /// A condition failed to evaluate and the engine failed closed.
    ConditionError,
}

impl Reason {
    /// The machine-readable code.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MatchedAllow => "matched-allow",
            Reason::MatchedDeny => "matched-deny",
            Reason::NoMatchingAllow => "no-matching-allow",
            Reason::MalformedRequest => "malformed-request",
            Reason::ConditionError => "condition-error",
        }
    }
}

/// The outcome of one decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// What to do with the request.
    pub decision: Effect,
    /// The rule that decided; `None` when nothing matched.
    pub rule: Option<RuleId>,
    /// The destination's mode. In `audit` mode a would-be denial is allowed and keeps its reason.
    pub mode: Mode,
    /// Why.
    pub reason: Reason,
    /// Human-readable detail (which part was malformed, the condition error); not part of the
    /// JSON contract.
    #[serde(skip)]
    pub detail: Option<String>,
}

impl Decision {
    /// Whether the request may proceed.
    pub fn is_allowed(&self) -> bool {
        self.decision == Effect::Allow
    }
}
