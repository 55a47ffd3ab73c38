//! Policy documents as written (after validation), before compilation into the index.

use crate::condition::Condition;
use crate::principal::ServicePattern;
use crate::template::PathTemplate;
use crate::yaml::Pos;
use serde::Serialize;
use std::fmt;
use std::sync::Arc;

/// The API version every document must declare.
pub const API_VERSION: &str = "castellan/v1";

/// The trust domain assumed when no `MeshConfig` names one.
pub const DEFAULT_TRUST_DOMAIN: &str = "castellan.local";

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// Permit the request.
    Allow,
    /// Refuse the request.
    Deny,
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        })
    }
}

/// Whether a service's denials are enforced or only recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Denials are enforced.
    #[default]
    Enforce,
    /// Would-be denials are recorded and the request is allowed.
    Audit,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        })
    }
}

/// A rule's id: `<policy>/<rule>`.
pub type RuleId = Arc<str>;

/// Where a document came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file (or source name).
    pub file: Arc<str>,
    /// The position in it.
    pub pos: Pos,
}

/// `kind: AccessPolicy`.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    /// `metadata.name`.
    pub name: String,
    /// `spec.service`.
    pub service: String,
    /// `spec.mode`.
    pub mode: Mode,
    /// `spec.rules`.
    pub rules: Vec<Rule>,
    /// Where the policy was written.
    pub origin: Origin,
}

/// One rule of a policy.
#[derive(Debug, Clone)]
pub struct Rule {
    /// `<policy>/<rule>`.
    pub id: RuleId,
    /// allow or deny.
    pub effect: Effect,
    /// Who the rule is about; `None` means any caller (see `authenticated`).
    pub from: From,
    /// What the rule is about.
    pub to: To,
    /// The CEL condition, if any, compiled.
    pub when: Option<Arc<Condition>>,
}

/// The `from` clause.
#[derive(Debug, Clone, Default)]
pub struct From {
    /// `services`: caller identities.
    pub services: Option<Vec<ServicePattern>>,
    /// `users`.
    pub users: Option<Users>,
    /// `authenticated`.
    pub authenticated: Option<bool>,
}

/// The `from.users` clause.
#[derive(Debug, Clone, Default)]
pub struct Users {
    /// Any of these roles.
    pub roles: Option<Vec<String>>,
    /// Any of these subjects.
    pub subjects: Option<Vec<String>>,
    /// All of these claims, each equal (same JSON type and value), or contained in an array claim.
    pub claims: Option<Vec<(String, serde_json::Value)>>,
    /// `true`: only calls made on the user's behalf by another service or client (`user.act`
    /// not empty); `false`: only direct calls.
    pub delegated: Option<bool>,
}

/// The `to` clause.
#[derive(Debug, Clone, Default)]
pub struct To {
    /// Upper-case methods.
    pub methods: Option<Vec<String>>,
    /// Path templates.
    pub paths: Option<Vec<PathTemplate>>,
    /// Lower-case hosts without port.
    pub hosts: Option<Vec<String>>,
}

/// `kind: MeshConfig`: settings for the whole mesh.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// The local trust domain.
    pub trust_domain: String,
    /// What happens to a service that has no policy.
    pub default_mode: Mode,
    /// Workloads whose SVID may sign user-context tokens (the gateways).
    pub context_issuers: Vec<crate::principal::ServicePattern>,
    /// Where it was written.
    pub origin: Origin,
}

/// What a rate limit counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateKey {
    /// The calling workload.
    Source,
    /// The end user.
    User,
    /// The API key (the user for other credentials).
    ApiKey,
    /// Method and normalized path.
    Route,
}

/// A `RateLimit` document: at most `rate` requests per `period_ms` per key, with `burst`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// Its name (`metadata.name`).
    pub name: String,
    /// The destination service it applies to.
    pub service: String,
    /// What it counts by.
    pub key: RateKey,
    /// Requests per period.
    pub rate: u32,
    /// The period, milliseconds.
    pub period_ms: u64,
    /// Requests allowed at once.
    pub burst: u32,
    /// Methods it applies to (all when empty).
    pub methods: Vec<String>,
    /// Normalized path prefixes it applies to (all when empty).
    pub path_prefixes: Vec<String>,
}

impl RateLimit {
    /// Whether the limit applies to this request.
    pub fn applies(&self, service: &str, method: &str, path: &str) -> bool {
        self.service == service
            && (self.methods.is_empty() || self.methods.iter().any(|m| m == method))
            && (self.path_prefixes.is_empty()
                || self.path_prefixes.iter().any(|p| {
                    path == p
                        || path
                            .strip_prefix(p.as_str())
                            .is_some_and(|r| r.starts_with('/'))
                }))
    }
}
