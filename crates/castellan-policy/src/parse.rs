//! Reading policy documents: YAML into the model, reporting every error as `file:line:col: message`.

use crate::condition::Condition;
use crate::model::{
    API_VERSION, AccessPolicy, DEFAULT_TRUST_DOMAIN, Effect, From, MeshConfig, Mode, Origin, Rule,
    To, Users,
};
use crate::normalize::{normalize_host, validate_method};
use crate::principal::{ServicePattern, validate_trust_domain};
use crate::template::PathTemplate;
use crate::yaml::{Node, Pos, Value, parse_documents};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// One problem found while loading, with its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file (or source name).
    pub file: Arc<str>,
    /// Where in it.
    pub pos: Pos,
    /// What is wrong, lower-case, no trailing period.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.pos.line, self.pos.col, self.message
        )
    }
}

/// Collects diagnostics for one file.
#[derive(Debug)]
pub struct Checker<'a> {
    file: Arc<str>,
    diags: &'a mut Vec<Diagnostic>,
}

impl<'a> Checker<'a> {
    /// A checker writing into `diags`.
    pub fn new(file: Arc<str>, diags: &'a mut Vec<Diagnostic>) -> Self {
        Checker { file, diags }
    }

    /// The file name.
    pub fn file(&self) -> &Arc<str> {
        &self.file
    }

    /// Records an error.
    pub fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            file: self.file.clone(),
            pos,
            message: message.into(),
        });
    }

    /// The fields of a mapping, checked against the allowed names; reports unknown and repeated
    /// keys and non-mappings. Returns `None` when the node is not a mapping.
    pub fn fields<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        allowed: &[&str],
    ) -> Option<HashMap<&'n str, &'n Node>> {
        let Value::Map(entries) = &node.value else {
            self.error(
                node.pos,
                format!("{what} must be a mapping, found a {}", node.kind()),
            );
            return None;
        };
        let mut out = HashMap::with_capacity(entries.len());
        for (k, v) in entries {
            let Some(key) = k.as_str() else {
                self.error(k.pos, format!("{what}: keys must be strings"));
                continue;
            };
            if !allowed.contains(&key) {
                self.error(
                    k.pos,
                    format!(
                        "unknown field {key:?} in {what} (expected one of: {})",
                        allowed.join(", ")
                    ),
                );
                continue;
            }
            if out.insert(key, v).is_some() {
                self.error(k.pos, format!("field {key:?} appears twice in {what}"));
            }
        }
        Some(out)
    }

    /// A required string field.
    pub fn required_str<'n>(
        &mut self,
        fields: &HashMap<&str, &'n Node>,
        parent: &Node,
        key: &str,
        what: &str,
    ) -> Option<(&'n str, Pos)> {
        match fields.get(key) {
            None => {
                self.error(
                    parent.pos,
                    format!("{what} is missing required field {key:?}"),
                );
                None
            }
            Some(n) => self.string(n, &format!("{what}.{key}")).map(|s| (s, n.pos)),
        }
    }

    /// A string scalar.
    pub fn string<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n str> {
        match &node.value {
            Value::Scalar { text, .. } => Some(text),
            _ => {
                self.error(
                    node.pos,
                    format!("{what} must be a string, found a {}", node.kind()),
                );
                None
            }
        }
    }

    /// A non-empty sequence of strings, each checked with `check`.
    pub fn string_list<T>(
        &mut self,
        node: &Node,
        what: &str,
        mut check: impl FnMut(&str) -> Result<T, String>,
    ) -> Option<Vec<T>> {
        let Value::Seq(items) = &node.value else {
            self.error(
                node.pos,
                format!("{what} must be a list, found a {}", node.kind()),
            );
            return None;
        };
        if items.is_empty() {
            self.error(
                node.pos,
                format!("{what} must not be empty (omit the field to match any)"),
            );
            return None;
        }
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in items {
            match self.string(item, what).map(&mut check) {
                Some(Ok(v)) => out.push(v),
                Some(Err(msg)) => {
                    self.error(item.pos, format!("{what}: {msg}"));
                    ok = false;
                }
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// A boolean scalar.
    pub fn boolean(&mut self, node: &Node, what: &str) -> Option<bool> {
        match &node.value {
            Value::Scalar {
                text,
                quoted: false,
            } if text == "true" => Some(true),
            Value::Scalar {
                text,
                quoted: false,
            } if text == "false" => Some(false),
            _ => {
                self.error(node.pos, format!("{what} must be true or false"));
                None
            }
        }
    }
}

/// A checked name for policies and rules: letters, digits, `.`, `-`, `_`; no `/`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: use letters, digits, '.', '-', '_', starting with a letter or digit"
        ))
    }
}

/// What one policy file held.
#[derive(Debug, Default)]
pub struct ParsedFile {
    /// Every policy name read, valid policy or not, with its place (for duplicate checks).
    pub names: Vec<(String, Pos)>,
    /// Its access policies.
    pub policies: Vec<AccessPolicy>,
    /// Its mesh configs.
    pub mesh: Vec<MeshConfig>,
    /// Its rate limits.
    pub rate_limits: Vec<crate::model::RateLimit>,
}

/// Parses one policy file, recording diagnostics; documents with errors are left out.
pub fn parse_policy_file(file: Arc<str>, source: &str, diags: &mut Vec<Diagnostic>) -> ParsedFile {
    let mut ck = Checker::new(file.clone(), diags);
    let mut out = ParsedFile::default();
    let docs = match parse_documents(source) {
        Ok(d) => d,
        Err(e) => {
            ck.error(e.pos, format!("invalid YAML: {}", e.message));
            return out;
        }
    };
    for doc in &docs {
        if doc.value == Value::Null {
            continue; // an empty document, e.g. after a trailing `---`
        }
        let Some(f) = ck.fields(doc, "document", &["apiVersion", "kind", "metadata", "spec"])
        else {
            continue;
        };
        if let Some((v, pos)) = ck.required_str(&f, doc, "apiVersion", "document")
            && v != API_VERSION
        {
            ck.error(
                pos,
                format!("unsupported apiVersion {v:?} (expected {API_VERSION:?})"),
            );
        }
        let Some((kind, kind_pos)) = ck.required_str(&f, doc, "kind", "document") else {
            continue;
        };
        let origin = Origin {
            file: file.clone(),
            pos: first_key_pos(doc),
        };
        match kind {
            "AccessPolicy" => {
                if let Some(n) = f.get("metadata").and_then(|m| match &m.value {
                    Value::Map(e) => e.iter().find(|(k, _)| k.as_str() == Some("name")),
                    _ => None,
                }) && let Some(name) = n.1.as_str()
                {
                    out.names.push((name.to_owned(), n.1.pos));
                }
                if let Some(p) = parse_access_policy(&mut ck, doc, &f, origin) {
                    out.policies.push(p);
                }
            }
            "MeshConfig" => {
                if let Some(m) = parse_mesh_config(&mut ck, doc, &f, origin) {
                    out.mesh.push(m);
                }
            }
            "RateLimit" => {
                if let Some(r) = parse_rate_limit(&mut ck, doc, &f) {
                    out.rate_limits.push(r);
                }
            }
            "PolicyTest" => ck.error(
                kind_pos,
                "PolicyTest documents belong in files named *_test.yaml".to_owned(),
            ),
            other => ck.error(
                kind_pos,
                format!("unknown kind {other:?} (expected AccessPolicy, MeshConfig or RateLimit)"),
            ),
        }
    }
    out
}

/// Where a mapping's first key is: block mappings report their start oddly, keys exactly.
fn first_key_pos(node: &Node) -> Pos {
    match &node.value {
        Value::Map(entries) => entries.first().map_or(node.pos, |(k, _)| k.pos),
        _ => node.pos,
    }
}

fn metadata_name(ck: &mut Checker<'_>, doc: &Node, f: &HashMap<&str, &Node>) -> Option<String> {
    let Some(meta) = f.get("metadata") else {
        ck.error(doc.pos, "document is missing required field \"metadata\"");
        return None;
    };
    let mf = ck.fields(meta, "metadata", &["name", "description", "labels"])?;
    let (name, pos) = ck.required_str(&mf, meta, "name", "metadata")?;
    if let Err(e) = check_name(name) {
        ck.error(pos, e);
        return None;
    }
    Some(name.to_owned())
}

fn parse_mode(ck: &mut Checker<'_>, node: &Node, what: &str) -> Option<Mode> {
    match ck.string(node, what)? {
        "enforce" => Some(Mode::Enforce),
        "audit" => Some(Mode::Audit),
        other => {
            ck.error(
                node.pos,
                format!("unknown {what} {other:?} (expected enforce or audit)"),
            );
            None
        }
    }
}

fn parse_mesh_config(
    ck: &mut Checker<'_>,
    doc: &Node,
    f: &HashMap<&str, &Node>,
    origin: Origin,
) -> Option<MeshConfig> {
    let name = metadata_name(ck, doc, f);
    let Some(spec) = f.get("spec") else {
        ck.error(doc.pos, "document is missing required field \"spec\"");
        return None;
    };
    let sf = ck.fields(
        spec,
        "spec",
        &["trustDomain", "defaultMode", "contextIssuers"],
    )?;
    let mut trust_domain = DEFAULT_TRUST_DOMAIN.to_owned();
    let mut ok = name.is_some();
    if let Some(n) = sf.get("trustDomain") {
        match ck.string(n, "spec.trustDomain").map(validate_trust_domain) {
            Some(Ok(())) => trust_domain = n.as_str().unwrap_or_default().to_owned(),
            Some(Err(e)) => {
                ck.error(n.pos, e);
                ok = false;
            }
            None => ok = false,
        }
    }
    let default_mode = match sf.get("defaultMode") {
        Some(n) => parse_mode(ck, n, "spec.defaultMode"),
        None => Some(Mode::Enforce),
    };
    let context_issuers = match sf.get("contextIssuers") {
        Some(n) => ck.string_list(n, "spec.contextIssuers", ServicePattern::parse)?,
        None => Vec::new(),
    };
    Some(MeshConfig {
        trust_domain,
        default_mode: default_mode.filter(|_| ok)?,
        context_issuers,
        origin,
    })
}

fn positive(ck: &mut Checker<'_>, n: &Node, what: &str) -> Option<u32> {
    let v = ck.string(n, what)?;
    match v.parse::<u32>() {
        Ok(x) if x > 0 => Some(x),
        _ => {
            ck.error(
                n.pos,
                format!("{what} must be a positive integer, got {v:?}"),
            );
            None
        }
    }
}

fn parse_rate_limit(
    ck: &mut Checker<'_>,
    doc: &Node,
    f: &HashMap<&str, &Node>,
) -> Option<crate::model::RateLimit> {
    use crate::model::{RateKey, RateLimit};
    let name = metadata_name(ck, doc, f);
    let Some(spec) = f.get("spec") else {
        ck.error(doc.pos, "document is missing required field \"spec\"");
        return None;
    };
    let sf = ck.fields(
        spec,
        "spec",
        &[
            "service",
            "key",
            "rate",
            "per",
            "burst",
            "methods",
            "pathPrefixes",
        ],
    )?;
    let service = ck
        .required_str(&sf, spec, "service", "spec")
        .map(|(s, _)| s.to_owned());
    let key = match ck.required_str(&sf, spec, "key", "spec") {
        Some(("source", _)) => Some(RateKey::Source),
        Some(("user", _)) => Some(RateKey::User),
        Some(("apikey", _)) => Some(RateKey::ApiKey),
        Some(("route", _)) => Some(RateKey::Route),
        Some((other, pos)) => {
            ck.error(
                pos,
                format!("spec.key must be source, user, apikey or route, got {other:?}"),
            );
            None
        }
        None => None,
    };
    let rate = match sf.get("rate") {
        Some(n) => positive(ck, n, "spec.rate"),
        None => {
            ck.error(spec.pos, "spec is missing required field \"rate\"");
            None
        }
    };
    let period_ms = match ck.required_str(&sf, spec, "per", "spec") {
        Some(("1s" | "second", _)) => Some(1000),
        Some(("1m" | "minute", _)) => Some(60_000),
        Some(("1h" | "hour", _)) => Some(3_600_000),
        Some((other, pos)) => {
            ck.error(pos, format!("spec.per must be 1s, 1m or 1h, got {other:?}"));
            None
        }
        None => None,
    };
    let burst = match sf.get("burst") {
        Some(n) => positive(ck, n, "spec.burst"),
        None => rate,
    };
    let methods = match sf.get("methods") {
        Some(n) => ck.string_list(n, "spec.methods", |m| {
            if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) {
                Ok(m.to_owned())
            } else {
                Err(format!("{m:?}: methods are upper-case"))
            }
        })?,
        None => Vec::new(),
    };
    let path_prefixes = match sf.get("pathPrefixes") {
        Some(n) => ck.string_list(n, "spec.pathPrefixes", |p| {
            if p.starts_with('/') && !p.contains("..") && !p.contains('%') {
                Ok(p.trim_end_matches('/').to_owned())
            } else {
                Err(format!("{p:?}: a normalized path starting with /"))
            }
        })?,
        None => Vec::new(),
    };
    Some(RateLimit {
        name: name?,
        service: service?,
        key: key?,
        rate: rate?,
        period_ms: period_ms?,
        burst: burst?,
        methods,
        path_prefixes,
    })
}

fn parse_access_policy(
    ck: &mut Checker<'_>,
    doc: &Node,
    f: &HashMap<&str, &Node>,
    origin: Origin,
) -> Option<AccessPolicy> {
    let name = metadata_name(ck, doc, f);
    let Some(spec) = f.get("spec") else {
        ck.error(doc.pos, "document is missing required field \"spec\"");
        return None;
    };
    let sf = ck.fields(spec, "spec", &["service", "mode", "rules"])?;
    let service = ck
        .required_str(&sf, spec, "service", "spec")
        .and_then(|(s, pos)| match ServicePattern::parse(s) {
            Ok(ServicePattern::Name(n)) => Some(n),
            _ => {
                ck.error(
                    pos,
                    format!("spec.service {s:?} must be a local service name"),
                );
                None
            }
        });
    let mode = match sf.get("mode") {
        Some(n) => parse_mode(ck, n, "spec.mode"),
        None => Some(Mode::Enforce),
    };
    let rules_node = sf.get("rules");
    let mut rules = Vec::new();
    let mut ok = true;
    match rules_node.map(|n| &n.value) {
        None => {
            ck.error(spec.pos, "spec is missing required field \"rules\"");
            ok = false;
        }
        Some(Value::Seq(items)) => {
            let mut seen: HashMap<String, Pos> = HashMap::new();
            for item in items {
                let (named, rule) = parse_rule(ck, item, name.as_deref().unwrap_or("?"));
                if let Some((rule_name, name_pos)) = named {
                    if let Some(first) = seen.get(&rule_name) {
                        ck.error(
                            name_pos,
                            format!(
                                "duplicate rule name {rule_name:?} (first at line {})",
                                first.line
                            ),
                        );
                        ok = false;
                    } else {
                        seen.insert(rule_name, name_pos);
                    }
                }
                match rule {
                    Some(r) => rules.push(r),
                    None => ok = false,
                }
            }
        }
        Some(_) => {
            if let Some(n) = rules_node {
                ck.error(n.pos, "spec.rules must be a list");
            }
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    Some(AccessPolicy {
        name: name?,
        service: service?,
        mode: mode?,
        rules,
        origin,
    })
}

/// Parses a rule; returns its name (when readable, for duplicate checks) and the rule when valid.
fn parse_rule(
    ck: &mut Checker<'_>,
    node: &Node,
    policy: &str,
) -> (Option<(String, Pos)>, Option<Rule>) {
    let Some(f) = ck.fields(
        node,
        "rule",
        &["name", "description", "effect", "from", "to", "when"],
    ) else {
        return (None, None);
    };
    let name = ck
        .required_str(&f, node, "name", "rule")
        .and_then(|(n, pos)| match check_name(n) {
            Ok(()) => Some((n.to_owned(), pos)),
            Err(e) => {
                ck.error(pos, e);
                None
            }
        });
    let effect = ck
        .required_str(&f, node, "effect", "rule")
        .and_then(|(e, pos)| match e {
            "allow" => Some(Effect::Allow),
            "deny" => Some(Effect::Deny),
            other => {
                ck.error(
                    pos,
                    format!("unknown effect {other:?} (expected allow or deny)"),
                );
                None
            }
        });
    let from = match f.get("from") {
        Some(n) => parse_from(ck, n),
        None => Some(From::default()),
    };
    let to = match f.get("to") {
        Some(n) => parse_to(ck, n),
        None => Some(To::default()),
    };
    let when = match f.get("when") {
        Some(n) if !n.to_json().is_string() => {
            ck.error(
                n.pos,
                "rule.when must be a CEL expression string (quote it), not a number or boolean",
            );
            None
        }
        Some(n) => ck
            .string(n, "rule.when")
            .and_then(|src| match Condition::compile(src) {
                Ok(c) => Some(Some(Arc::new(c))),
                Err(e) => {
                    ck.error(n.pos, e);
                    None
                }
            }),
        None => Some(None),
    };
    let rule = match (&name, effect, from, to, when) {
        (Some((n, _)), Some(effect), Some(from), Some(to), Some(when)) => Some(Rule {
            id: Arc::from(format!("{policy}/{n}")),
            effect,
            from,
            to,
            when,
        }),
        _ => None,
    };
    (name, rule)
}

fn parse_from(ck: &mut Checker<'_>, node: &Node) -> Option<From> {
    let f = ck.fields(node, "from", &["services", "users", "authenticated"])?;
    let mut ok = true;
    let services = match f.get("services") {
        Some(n) => {
            let v = ck.string_list(n, "from.services", ServicePattern::parse);
            ok &= v.is_some();
            v
        }
        None => None,
    };
    let users = match f.get("users") {
        Some(n) => {
            let v = parse_users(ck, n);
            ok &= v.is_some();
            v
        }
        None => None,
    };
    let authenticated = match f.get("authenticated") {
        Some(n) => {
            let v = ck.boolean(n, "from.authenticated");
            ok &= v.is_some();
            v
        }
        None => None,
    };
    if authenticated == Some(false) && (services.is_some() || users.is_some()) {
        ck.error(
            node.pos,
            "from.authenticated: false cannot be combined with services or users (they require an authenticated caller)",
        );
        ok = false;
    }
    ok.then_some(From {
        services,
        users,
        authenticated,
    })
}

fn parse_users(ck: &mut Checker<'_>, node: &Node) -> Option<Users> {
    let f = ck.fields(
        node,
        "from.users",
        &["roles", "subjects", "claims", "delegated"],
    )?;
    let mut ok = true;
    let nonempty = |s: &str| {
        if s.is_empty() {
            Err("must not be empty".to_owned())
        } else {
            Ok(s.to_owned())
        }
    };
    let roles = f.get("roles").and_then(|n| {
        let v = ck.string_list(n, "from.users.roles", nonempty);
        ok &= v.is_some();
        v
    });
    let subjects = f.get("subjects").and_then(|n| {
        let v = ck.string_list(n, "from.users.subjects", nonempty);
        ok &= v.is_some();
        v
    });
    let claims = match f.get("claims") {
        Some(n) => match &n.value {
            Value::Map(entries) if !entries.is_empty() => {
                let mut out = Vec::new();
                for (k, v) in entries {
                    match (k.as_str(), &v.value) {
                        (Some(key), Value::Scalar { .. }) => {
                            out.push((key.to_owned(), v.to_json()))
                        }
                        (Some(_), _) => {
                            ck.error(v.pos, "from.users.claims values must be scalars");
                            ok = false;
                        }
                        (None, _) => {
                            ck.error(k.pos, "from.users.claims keys must be strings");
                            ok = false;
                        }
                    }
                }
                Some(out)
            }
            _ => {
                ck.error(n.pos, "from.users.claims must be a non-empty mapping");
                ok = false;
                None
            }
        },
        None => None,
    };
    let delegated = match f.get("delegated") {
        Some(n) => {
            let v = ck.boolean(n, "from.users.delegated");
            ok &= v.is_some();
            v
        }
        None => None,
    };
    if roles.is_none() && subjects.is_none() && claims.is_none() && delegated.is_none() && ok {
        ck.error(
            node.pos,
            "from.users must name roles, subjects, claims or delegated",
        );
        ok = false;
    }
    ok.then_some(Users {
        roles,
        subjects,
        claims,
        delegated,
    })
}

fn parse_to(ck: &mut Checker<'_>, node: &Node) -> Option<To> {
    let f = ck.fields(node, "to", &["methods", "paths", "hosts"])?;
    let mut ok = true;
    let methods = f.get("methods").and_then(|n| {
        let v = ck.string_list(n, "to.methods", |m| {
            validate_method(m)
                .map(str::to_owned)
                .map_err(|_| format!("{m:?} is not an upper-case method such as GET"))
        });
        ok &= v.is_some();
        v
    });
    let paths = f.get("paths").and_then(|n| {
        let v = ck.string_list(n, "to.paths", |p| {
            PathTemplate::parse(p).map_err(|e| format!("{p:?}: {e}"))
        });
        ok &= v.is_some();
        v
    });
    let hosts = f.get("hosts").and_then(|n| {
        let v = ck.string_list(n, "to.hosts", |h| {
            normalize_host(h)
                .map(|c| c.into_owned())
                .map_err(|_| format!("{h:?} is not a valid host"))
        });
        ok &= v.is_some();
        v
    });
    ok.then_some(To {
        methods,
        paths,
        hosts,
    })
}
