//! Caller identities as policy names them: local service names, full SPIFFE IDs, and `prefix*`
//! globs over either. A glob is never a regular expression: one `*`, at the end, matching one or
//! more characters within the last path segment.

use castellan_identity::spiffe::{is_path_char, split_spiffe_id};
use std::borrow::Cow;

/// The identity of a caller as the engine sees it, borrowed from the request: resolving it
/// allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller<'a> {
    /// The local trust domain.
    trust_domain: &'a str,
    /// The full SPIFFE ID, when the request gave one.
    id: Option<&'a str>,
    /// The service name when the caller is `spiffe://<local trust domain>/svc/<name>`.
    local_name: Option<&'a str>,
}

/// A pattern in `from.services`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServicePattern {
    /// A local service name.
    Name(String),
    /// Local service names starting with the prefix (and longer than it).
    NamePrefix(String),
    /// A full SPIFFE ID.
    SpiffeId(String),
    /// SPIFFE IDs starting with the prefix, the rest within the last segment.
    SpiffePrefix(String),
}

impl ServicePattern {
    /// Parses a pattern; the message says what is wrong.
    pub fn parse(s: &str) -> Result<ServicePattern, String> {
        let (body, glob) = match s.strip_suffix('*') {
            Some(b) => (b, true),
            None => (s, false),
        };
        if body.contains('*') {
            return Err(format!(
                "{s:?}: '*' may appear only once, at the end (globs are not regular expressions)"
            ));
        }
        if body.starts_with("spiffe://") {
            if glob {
                // The prefix must be a valid ID up to its last segment, which may be partial.
                let (dir, partial) = body.rsplit_once('/').unwrap_or((body, ""));
                if !partial.bytes().all(is_path_char) {
                    return Err(format!("{s:?}: invalid character in SPIFFE ID"));
                }
                if dir.len() > "spiffe://".len() {
                    parse_spiffe_id(dir).map_err(|e| format!("{s:?}: {e}"))?;
                } else {
                    return Err(format!("{s:?}: a SPIFFE glob needs a trust domain"));
                }
                Ok(ServicePattern::SpiffePrefix(body.to_owned()))
            } else {
                parse_spiffe_id(body).map_err(|e| format!("{s:?}: {e}"))?;
                Ok(ServicePattern::SpiffeId(body.to_owned()))
            }
        } else if body.contains(':') || body.contains('/') {
            Err(format!(
                "{s:?}: not a service name or SPIFFE ID (names use letters, digits, '.', '-', '_')"
            ))
        } else if !body.bytes().all(is_path_char) {
            Err(format!(
                "{s:?}: invalid service name (use letters, digits, '.', '-', '_')"
            ))
        } else if glob {
            Ok(ServicePattern::NamePrefix(body.to_owned()))
        } else if body.is_empty() {
            Err("empty service name".to_owned())
        } else {
            Ok(ServicePattern::Name(body.to_owned()))
        }
    }

    /// Whether the caller matches.
    pub fn matches(&self, caller: &Caller<'_>) -> bool {
        match self {
            ServicePattern::Name(n) => caller.local_name == Some(n.as_str()),
            ServicePattern::NamePrefix(p) => caller
                .local_name
                .and_then(|n| n.strip_prefix(p.as_str()))
                .is_some_and(|rest| !rest.is_empty()),
            ServicePattern::SpiffeId(id) => caller.spiffe_id_is(id),
            ServicePattern::SpiffePrefix(p) => caller
                .spiffe_id()
                .strip_prefix(p.as_str())
                .is_some_and(|rest| !rest.is_empty() && !rest.contains('/')),
        }
    }
}

/// Checks a trust domain name (SPIFFE: lower-case letters, digits, `.`, `-`, `_`).
pub fn validate_trust_domain(td: &str) -> Result<(), String> {
    castellan_identity::validate_trust_domain(td).map_err(|e| e.to_string())
}

/// Splits a SPIFFE ID into trust domain and path, validating it (SPIFFE-ID §2).
pub fn parse_spiffe_id(id: &str) -> Result<(&str, &str), String> {
    split_spiffe_id(id).map_err(|e| e.to_string())
}

impl<'a> Caller<'a> {
    /// Builds the caller from what the request says: a local service name and/or a SPIFFE ID.
    pub fn resolve(
        trust_domain: &'a str,
        service: Option<&'a str>,
        spiffe_id: Option<&'a str>,
    ) -> Result<Option<Caller<'a>>, String> {
        match (service, spiffe_id) {
            (None, None) => Ok(None),
            (Some(name), None) => {
                if name.is_empty() || !name.bytes().all(is_path_char) {
                    return Err(format!("invalid source service name {name:?}"));
                }
                Ok(Some(Caller {
                    trust_domain,
                    id: None,
                    local_name: Some(name),
                }))
            }
            (service, Some(id)) => {
                let (td, path) = parse_spiffe_id(id)?;
                let local_name = (td == trust_domain)
                    .then(|| path.strip_prefix("/svc/"))
                    .flatten()
                    .filter(|n| !n.contains('/'));
                if let Some(name) = service
                    && local_name != Some(name)
                {
                    return Err(format!(
                        "source.service {name:?} does not match source.spiffe_id {id:?}"
                    ));
                }
                Ok(Some(Caller {
                    trust_domain,
                    id: Some(id),
                    local_name,
                }))
            }
        }
    }

    /// The service name, when the caller is a service of the local trust domain.
    pub fn local_name(&self) -> Option<&'a str> {
        self.local_name
    }

    /// The full SPIFFE ID when the request gave it (not derived from a name).
    pub fn given_spiffe_id(&self) -> Option<&'a str> {
        self.id
    }

    /// The full SPIFFE ID.
    pub fn spiffe_id(&self) -> Cow<'a, str> {
        match (self.id, self.local_name) {
            (Some(id), _) => Cow::Borrowed(id),
            (None, Some(n)) => Cow::Owned(format!("spiffe://{}/svc/{n}", self.trust_domain)),
            (None, None) => Cow::Borrowed(""),
        }
    }

    /// Whether the full SPIFFE ID is `id`, without building it.
    pub fn spiffe_id_is(&self, id: &str) -> bool {
        match (self.id, self.local_name) {
            (Some(mine), _) => mine == id,
            (None, Some(n)) => {
                id.strip_prefix("spiffe://")
                    .and_then(|r| r.strip_prefix(self.trust_domain))
                    .and_then(|r| r.strip_prefix("/svc/"))
                    == Some(n)
            }
            (None, None) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(id: &str) -> Caller<'_> {
        Caller::resolve("example.org", None, Some(id))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn names_match_local_trust_domain_only() {
        let p = ServicePattern::parse("gateway").unwrap();
        assert!(p.matches(&caller("spiffe://example.org/svc/gateway")));
        assert!(!p.matches(&caller("spiffe://evil.org/svc/gateway")));
        assert!(!p.matches(&caller("spiffe://example.org/svc/gateway2")));
        assert!(!p.matches(&caller("spiffe://example.org/ns/svc/gateway")));
    }

    #[test]
    fn globs_are_prefixes_not_regexes() {
        let p = ServicePattern::parse("order.*").unwrap();
        assert!(p.matches(&caller("spiffe://example.org/svc/order.v2")));
        assert!(!p.matches(&caller("spiffe://example.org/svc/orderXv2")));
        assert!(!p.matches(&caller("spiffe://example.org/svc/order.")));
        let p = ServicePattern::parse("spiffe://cluster.local/ns/shop/sa/*").unwrap();
        assert!(p.matches(&caller("spiffe://cluster.local/ns/shop/sa/orders")));
        assert!(!p.matches(&caller("spiffe://cluster.local/ns/shop/sa/orders/x")));
        assert!(
            Caller::resolve(
                "example.org",
                None,
                Some("spiffe://cluster.local/ns/shop/sa/")
            )
            .is_err()
        );
        assert!(!p.matches(&caller("spiffe://cluster.local/ns/shopx/sa/orders")));
    }

    #[test]
    fn bad_patterns() {
        for bad in [
            "a*b",
            "*a*",
            "a.b/c",
            "spiffe://Bad/x",
            "spiffe://td/a//b",
            "",
            "spiffe:///x",
            "spiffe://*",
        ] {
            assert!(ServicePattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resolve_checks_consistency() {
        assert!(
            Caller::resolve("example.org", Some("a"), Some("spiffe://example.org/svc/b")).is_err()
        );
        assert!(
            Caller::resolve("example.org", Some("a"), Some("spiffe://other.org/svc/a")).is_err()
        );
        let c = Caller::resolve("example.org", Some("a"), None)
            .unwrap()
            .unwrap();
        assert_eq!(c.spiffe_id(), "spiffe://example.org/svc/a");
        assert!(c.spiffe_id_is("spiffe://example.org/svc/a"));
        assert!(!c.spiffe_id_is("spiffe://example.org/svc/ab"));
        assert!(!c.spiffe_id_is("spiffe://example.orgx/svc/a"));
    }
}
