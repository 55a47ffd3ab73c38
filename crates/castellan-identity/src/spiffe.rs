//! SPIFFE IDs (SPIFFE-ID standard §2): `spiffe://<trust domain>/<path>`.

use std::fmt;

/// The longest SPIFFE ID accepted, in bytes (SPIFFE-ID §2.3).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Why a string is not a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// Not `spiffe://` (the scheme is lower-case and exact).
    #[error("SPIFFE ID must start with 'spiffe://'")]
    Scheme,
    /// Longer than [`MAX_SPIFFE_ID_LEN`].
    #[error("SPIFFE ID is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    /// A bad trust domain (empty, upper-case, port, userinfo, other characters).
    #[error("invalid trust domain {0:?}: use lower-case letters, digits, '.', '-', '_'")]
    TrustDomain(String),
    /// A bad path segment (empty, `.`, `..`, or characters other than letters, digits, `.-_`).
    #[error("invalid SPIFFE ID path segment {0:?}")]
    PathSegment(String),
}

fn is_trust_domain_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
}

/// Whether `b` may appear in a SPIFFE ID path segment.
pub fn is_path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
}

/// Checks a trust domain name.
pub fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() || td.len() > 255 || !td.bytes().all(is_trust_domain_char) {
        return Err(SpiffeIdError::TrustDomain(td.to_owned()));
    }
    Ok(())
}

/// Splits a SPIFFE ID into trust domain and path (`""` or starting with `/`), validating it.
pub fn split_spiffe_id(id: &str) -> Result<(&str, &str), SpiffeIdError> {
    let rest = id.strip_prefix("spiffe://").ok_or(SpiffeIdError::Scheme)?;
    if id.len() > MAX_SPIFFE_ID_LEN {
        return Err(SpiffeIdError::TooLong);
    }
    let (td, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    validate_trust_domain(td)?;
    if !path.is_empty() {
        for seg in path.split('/').skip(1) {
            if seg.is_empty() || seg == "." || seg == ".." || !seg.bytes().all(is_path_char) {
                return Err(SpiffeIdError::PathSegment(seg.to_owned()));
            }
        }
    }
    Ok((td, path))
}

/// A validated SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    td_len: usize,
}

impl SpiffeId {
    /// Parses and validates.
    pub fn parse(id: &str) -> Result<SpiffeId, SpiffeIdError> {
        let (td, _) = split_spiffe_id(id)?;
        Ok(SpiffeId {
            id: id.to_owned(),
            td_len: td.len(),
        })
    }

    /// The ID of service `name` in trust domain `td`: `spiffe://td/svc/name`.
    pub fn for_service(td: &str, name: &str) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::parse(&format!("spiffe://{td}/svc/{name}"))
    }

    /// The control plane's own ID in trust domain `td`: `spiffe://td/castellan/server`.
    /// Proxies and the CLI accept the control plane only with this ID, never by DNS name:
    /// workload SVIDs are always `/svc/<name>`, so no registered service can hold it.
    pub fn control_plane(td: &str) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::parse(&format!("spiffe://{td}/castellan/server"))
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        self.id.get(9..9 + self.td_len).unwrap_or_default()
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        self.id.get(9 + self.td_len..).unwrap_or_default()
    }

    /// The service name when the path is `/svc/<name>`.
    pub fn service_name(&self) -> Option<&str> {
        self.path()
            .strip_prefix("/svc/")
            .filter(|n| !n.contains('/'))
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids() {
        let id = SpiffeId::parse("spiffe://example.org/svc/orders").unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "/svc/orders");
        assert_eq!(id.service_name(), Some("orders"));
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/orders").unwrap();
        assert_eq!(id.service_name(), None);
        assert_eq!(SpiffeId::parse("spiffe://td").unwrap().path(), "");
    }

    #[test]
    fn invalid_ids() {
        for bad in [
            "SPIFFE://td/a",
            "https://td/a",
            "spiffe://",
            "spiffe:///a",
            "spiffe://TD/a",
            "spiffe://td:443/a",
            "spiffe://user@td/a",
            "spiffe://td/",
            "spiffe://td//a",
            "spiffe://td/./a",
            "spiffe://td/../a",
            "spiffe://td/a?b",
            "spiffe://td/a#b",
            "spiffe://td/a%2Fb",
            "spiffe://td/a\0b",
            "spiffe://td/a b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad:?}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        assert_eq!(SpiffeId::parse(&long), Err(SpiffeIdError::TooLong));
    }
}
