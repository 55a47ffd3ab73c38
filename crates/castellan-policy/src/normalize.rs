//! Request-target, method and host normalization: the one place where a raw request becomes what
//! policy matches, used by every enforcement point so that policy and application see one path.
//!
//! Rules (product.md §4): percent-decode unreserved characters exactly once; reject encoded `/`,
//! `\` and control bytes, invalid UTF-8, any `#`, `;` path parameters and `..` above the root;
//! merge repeated slashes; resolve `.` and `..`; drop the query. Other characters outside RFC
//! 3986 `pchar` are percent-encoded with upper-case hex, so that one resource has one spelling.
//! Paths are compared case-sensitively (RFC 3986 §6.2.2.1); hosts case-insensitively, without port.

use std::borrow::Cow;

/// The longest request target (path and query) accepted, in bytes.
pub const MAX_TARGET_LEN: usize = 8192;

/// The longest method token accepted, in bytes.
const MAX_METHOD_LEN: usize = 32;

/// Why a request cannot be decided on: the client sent something malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// The request target is longer than [`MAX_TARGET_LEN`].
    #[error("request target is longer than {MAX_TARGET_LEN} bytes")]
    TooLong,
    /// The path does not start with `/`.
    #[error("request target must start with '/'")]
    NotOriginForm,
    /// A `#` appears in the request target; clients never send fragments.
    #[error("request target contains '#'")]
    Fragment,
    /// `%2F` or `%5C` in the path.
    #[error("encoded '/' or '\\' in path")]
    EncodedSeparator,
    /// NUL or another control byte, raw or encoded.
    #[error("control character in path")]
    ControlCharacter,
    /// A `%` not followed by two hex digits.
    #[error("invalid percent-encoding in path")]
    BadPercentEncoding,
    /// The decoded path is not UTF-8.
    #[error("path is not valid UTF-8 once decoded")]
    InvalidUtf8,
    /// `..` would climb above `/`.
    #[error("'..' climbs above the root")]
    AboveRoot,
    /// A `;` path parameter (`/admin;x=y/`), which some servers strip and others keep.
    #[error("';' path parameters are not accepted")]
    PathParameter,
    /// A raw `\`, space or other character that servers disagree on.
    #[error("character not allowed in path")]
    ForbiddenCharacter,
    /// The method is not an upper-case token.
    #[error("method must be an upper-case token such as GET")]
    BadMethod,
    /// The host is not a valid host name or address.
    #[error("invalid host")]
    BadHost,
    /// Some other part of the request is malformed.
    #[error("{0}")]
    Other(&'static str),
}

/// A normalized request target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    /// The normalized path, never empty, always starting with `/`.
    pub path: Cow<'a, str>,
    /// The raw query (after `?`), if any; never used for path matching.
    pub query: Option<&'a str>,
}

/// Normalizes a request target (`/path?query`) as product.md §4 fixes it.
pub fn normalize_target(target: &str) -> Result<Target<'_>, Malformed> {
    if target.len() > MAX_TARGET_LEN {
        return Err(Malformed::TooLong);
    }
    if target.contains('#') {
        return Err(Malformed::Fragment);
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    Ok(Target {
        path: normalize_path(path)?,
        query,
    })
}

/// Normalizes a path (no query). Idempotent: normalizing the output again gives the output.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, Malformed> {
    if path.len() > MAX_TARGET_LEN {
        return Err(Malformed::TooLong);
    }
    if !path.starts_with('/') {
        return Err(Malformed::NotOriginForm);
    }
    if is_already_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    let mut segments: Vec<String> = Vec::new();
    let mut trailing_slash = false;
    let mut any_high_byte = false;
    let rest = path.get(1..).unwrap_or_default();
    let raw_segments: Vec<&str> = rest.split('/').collect();
    let last = raw_segments.len().saturating_sub(1);
    for (i, raw) in raw_segments.iter().enumerate() {
        let (seg, high) = canonical_segment(raw)?;
        any_high_byte |= high;
        match seg.as_str() {
            "" => {
                if i == last {
                    trailing_slash = !segments.is_empty();
                }
            }
            "." => {
                if i == last {
                    trailing_slash = !segments.is_empty();
                }
            }
            ".." => {
                if segments.pop().is_none() {
                    return Err(Malformed::AboveRoot);
                }
                if i == last {
                    trailing_slash = !segments.is_empty();
                }
            }
            _ => {
                segments.push(seg);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for seg in &segments {
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    // Encoding raw characters can triple the length: bound the output too, or normalizing the
    // output again would fail (found by the normalize_path fuzzer).
    if out.len() > MAX_TARGET_LEN {
        return Err(Malformed::TooLong);
    }
    if any_high_byte && !decodes_to_utf8(&out) {
        return Err(Malformed::InvalidUtf8);
    }
    Ok(Cow::Owned(out))
}

/// True when the path needs no change: only unreserved characters and `/`, no empty, `.` or `..`
/// segments. Most real paths take this branch, which allocates nothing.
fn is_already_normal(path: &str) -> bool {
    let bytes = path.as_bytes();
    let mut prev = 0u8;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'/' => {
                if prev == b'/' && i > 0 {
                    return false;
                }
            }
            b'.' => {
                // A segment that is `.` or `..`.
                if prev == b'/' {
                    let next = bytes.get(i + 1).copied();
                    let next2 = bytes.get(i + 2).copied();
                    if matches!(next, None | Some(b'/'))
                        || (next == Some(b'.') && matches!(next2, None | Some(b'/')))
                    {
                        return false;
                    }
                }
            }
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'~' => {}
            _ => return false,
        }
        prev = b;
    }
    true
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Characters that may stand raw in a path segment (RFC 3986 `pchar` less `;` and `%`).
fn is_raw_allowed(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@'
        )
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn push_encoded(out: &mut String, b: u8) {
    use std::fmt::Write as _;
    let _ = write!(out, "%{b:02X}");
}

/// Canonicalizes one segment; returns it and whether it holds encoded bytes ≥ 0x80.
fn canonical_segment(raw: &str) -> Result<(String, bool), Malformed> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut high = false;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex_value),
                bytes.get(i + 2).copied().and_then(hex_value),
            ) else {
                return Err(Malformed::BadPercentEncoding);
            };
            let v = (h << 4) | l;
            if is_unreserved(v) {
                out.push(char::from(v));
            } else if v == b'/' || v == b'\\' {
                return Err(Malformed::EncodedSeparator);
            } else if v < 0x20 || v == 0x7f {
                return Err(Malformed::ControlCharacter);
            } else {
                high |= v >= 0x80;
                push_encoded(&mut out, v);
            }
            i += 3;
            continue;
        }
        if b < 0x20 || b == 0x7f {
            return Err(Malformed::ControlCharacter);
        }
        if b == b';' {
            return Err(Malformed::PathParameter);
        }
        if b == b'\\' || b == b' ' {
            return Err(Malformed::ForbiddenCharacter);
        }
        if is_raw_allowed(b) {
            out.push(char::from(b));
        } else {
            // `"<>^`{|}` and raw UTF-8: one spelling, the encoded one.
            high |= b >= 0x80;
            push_encoded(&mut out, b);
        }
        i += 1;
    }
    Ok((out, high))
}

/// Whether fully percent-decoding `s` gives UTF-8.
fn decodes_to_utf8(s: &str) -> bool {
    std::str::from_utf8(&percent_decode(s)).is_ok()
}

/// `s` percent-decoded as text (invalid UTF-8 replaced): for comparing names, never for
/// deciding on paths (that is [`normalize_target`]'s job).
pub fn percent_decode_lossy(s: &str) -> String {
    String::from_utf8_lossy(&percent_decode(s)).into_owned()
}

/// Decodes every `%XX`; a `%` without two hex digits stays as it is.
pub(crate) fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex_value),
                bytes.get(i + 2).copied().and_then(hex_value),
            )
        {
            decoded.push((h << 4) | l);
            i += 3;
        } else {
            decoded.push(b);
            i += 1;
        }
    }
    decoded
}

/// Checks a method: methods are case-sensitive upper-case tokens (`GET`, `POST`, `M-SEARCH`).
pub fn validate_method(method: &str) -> Result<&str, Malformed> {
    let bytes = method.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_METHOD_LEN
        && bytes.first().is_some_and(u8::is_ascii_uppercase)
        && bytes
            .iter()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_'));
    if ok {
        Ok(method)
    } else {
        Err(Malformed::BadMethod)
    }
}

/// Normalizes a host: lower-case, without port and without one trailing dot.
pub fn normalize_host(host: &str) -> Result<Cow<'_, str>, Malformed> {
    if host.is_empty() {
        return Ok(Cow::Borrowed(""));
    }
    let name = if let Some(rest) = host.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or(Malformed::BadHost)?;
        if !(after.is_empty() || is_port(after)) {
            return Err(Malformed::BadHost);
        }
        if addr.is_empty()
            || !addr
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err(Malformed::BadHost);
        }
        return Ok(Cow::Owned(format!("[{}]", addr.to_ascii_lowercase())));
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if is_port(&format!(":{port}")) => h,
            Some(_) => return Err(Malformed::BadHost),
            None => host,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty()
        || name.len() > 253
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(Malformed::BadHost);
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) || name.len() != host.len() {
        Ok(Cow::Owned(name.to_ascii_lowercase()))
    } else {
        Ok(Cow::Borrowed(name))
    }
}

fn is_port(s: &str) -> bool {
    s.strip_prefix(':')
        .is_some_and(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn norm(p: &str) -> Result<String, Malformed> {
        normalize_target(p).map(|t| t.path.into_owned())
    }

    #[test]
    fn plain_paths_pass_unchanged_without_allocating() {
        assert!(matches!(
            normalize_path("/orders/42").unwrap(),
            Cow::Borrowed(_)
        ));
        assert_eq!(norm("/").unwrap(), "/");
        assert_eq!(norm("/a/b/").unwrap(), "/a/b/");
    }

    #[test]
    fn slashes_and_dots() {
        assert_eq!(norm("//admin/x").unwrap(), "/admin/x");
        assert_eq!(norm("/a//b///c").unwrap(), "/a/b/c");
        assert_eq!(norm("/orders/../admin/x").unwrap(), "/admin/x");
        assert_eq!(norm("/orders/%2e%2e/admin/x").unwrap(), "/admin/x");
        assert_eq!(norm("/orders/%2E./admin").unwrap(), "/admin");
        assert_eq!(norm("/a/./b/.").unwrap(), "/a/b/");
        assert_eq!(norm("/a/b/..").unwrap(), "/a/");
        assert_eq!(norm("/a/..").unwrap(), "/");
        assert_eq!(norm("/..").unwrap_err(), Malformed::AboveRoot);
        assert_eq!(norm("/a/../../b").unwrap_err(), Malformed::AboveRoot);
        assert_eq!(norm("/%2e%2e/x").unwrap_err(), Malformed::AboveRoot);
        assert_eq!(norm("/...").unwrap(), "/...");
    }

    #[test]
    fn rejected_encodings() {
        assert_eq!(
            norm("/%2Fadmin/x").unwrap_err(),
            Malformed::EncodedSeparator
        );
        assert_eq!(norm("/%2fadmin").unwrap_err(), Malformed::EncodedSeparator);
        assert_eq!(norm("/admin%5Cx").unwrap_err(), Malformed::EncodedSeparator);
        assert_eq!(norm("/admin%00").unwrap_err(), Malformed::ControlCharacter);
        assert_eq!(norm("/admin%0a").unwrap_err(), Malformed::ControlCharacter);
        assert_eq!(
            norm("/admin\u{1}").unwrap_err(),
            Malformed::ControlCharacter
        );
        assert_eq!(norm("/%ff%fe").unwrap_err(), Malformed::InvalidUtf8);
        assert_eq!(norm("/%C3").unwrap_err(), Malformed::InvalidUtf8);
        assert_eq!(norm("/%zz").unwrap_err(), Malformed::BadPercentEncoding);
        assert_eq!(norm("/%4").unwrap_err(), Malformed::BadPercentEncoding);
        assert_eq!(
            norm("/admin;x=y/users").unwrap_err(),
            Malformed::PathParameter
        );
        assert_eq!(norm("/..;/admin").unwrap_err(), Malformed::PathParameter);
        assert_eq!(
            norm("/admin\\x").unwrap_err(),
            Malformed::ForbiddenCharacter
        );
        assert_eq!(
            norm("/orders/42#/../../admin").unwrap_err(),
            Malformed::Fragment
        );
        assert_eq!(norm("orders").unwrap_err(), Malformed::NotOriginForm);
        assert_eq!(norm("").unwrap_err(), Malformed::NotOriginForm);
        assert_eq!(norm("?/orders").unwrap_err(), Malformed::NotOriginForm);
        let long = format!("/{}", "a".repeat(MAX_TARGET_LEN));
        assert_eq!(norm(&long).unwrap_err(), Malformed::TooLong);
        // Short enough as sent, too long once raw characters are encoded.
        let grows = format!("/{}", "`".repeat(MAX_TARGET_LEN / 2));
        assert_eq!(norm(&grows).unwrap_err(), Malformed::TooLong);
    }

    #[test]
    fn decoding_happens_once() {
        // `%252e` is a literal "%2e", never a dot.
        assert_eq!(norm("/%252e%252e/admin").unwrap(), "/%252e%252e/admin");
        assert_eq!(norm("/%7e%41").unwrap(), "/~A");
        assert_eq!(norm("/a%3ab").unwrap(), "/a%3Ab");
        assert_eq!(norm("/caf%c3%a9").unwrap(), "/caf%C3%A9");
        assert_eq!(norm("/café").unwrap(), "/caf%C3%A9");
        assert_eq!(norm("/a|b").unwrap(), "/a%7Cb");
    }

    #[test]
    fn query_is_dropped_from_path() {
        let t = normalize_target("/admin?/orders/42").unwrap();
        assert_eq!(t.path, "/admin");
        assert_eq!(t.query, Some("/orders/42"));
    }

    #[test]
    fn methods() {
        assert!(validate_method("GET").is_ok());
        assert!(validate_method("M-SEARCH").is_ok());
        assert_eq!(validate_method("get").unwrap_err(), Malformed::BadMethod);
        assert_eq!(validate_method("Get").unwrap_err(), Malformed::BadMethod);
        assert_eq!(validate_method("").unwrap_err(), Malformed::BadMethod);
        assert_eq!(validate_method("GE T").unwrap_err(), Malformed::BadMethod);
    }

    #[test]
    fn hosts() {
        assert_eq!(
            normalize_host("Orders.Example:8443").unwrap(),
            "orders.example"
        );
        assert_eq!(normalize_host("orders.example.").unwrap(), "orders.example");
        assert_eq!(normalize_host("[::1]:80").unwrap(), "[::1]");
        assert_eq!(normalize_host("[FE80::1]").unwrap(), "[fe80::1]");
        assert_eq!(normalize_host("orders").unwrap(), "orders");
        assert!(normalize_host("a b").is_err());
        assert!(normalize_host("a:b").is_err());
        assert!(normalize_host("a/b").is_err());
        assert!(normalize_host("evil.com\0.good").is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn normalization_is_idempotent_and_canonical(
            raw in prop::collection::vec(prop_oneof![
                Just("/".to_owned()), Just(".".to_owned()), Just("..".to_owned()),
                Just("%2e".to_owned()), Just("%2E".to_owned()), Just("%25".to_owned()),
                Just("%2F".to_owned()), Just("%00".to_owned()), Just("%41".to_owned()),
                Just("%c3%a9".to_owned()), Just("%ff".to_owned()), Just(";".to_owned()),
                Just("\\".to_owned()), Just("?".to_owned()), Just("#".to_owned()),
                "[a-zA-Z0-9_~:@!$&'()*+,=|-]{1,3}",
                "%[0-9a-fA-F]{2}",
                any::<char>().prop_map(|c| c.to_string()),
            ], 0..24)
        ) {
            let target = format!("/{}", raw.concat());
            if let Ok(t) = normalize_target(&target) {
                let p = t.path.as_ref();
                prop_assert!(p.starts_with('/'));
                for bad in ["//", "/./", "/../", "%2F", "%2f", "%5C", "%00", "\0", ";", "\\"] {
                    prop_assert!(!p.contains(bad), "{target:?} -> {p:?} contains {bad:?}");
                }
                prop_assert!(!p.ends_with("/.") && !p.ends_with("/.."), "{p:?}");
                let again = normalize_path(p).map(Cow::into_owned);
                prop_assert_eq!(again, Ok(p.to_owned()), "not idempotent for {:?}", target);
            }
        }

        #[test]
        fn double_encoding_is_never_decoded_twice(n in 1usize..5) {
            let target = format!("/{}admin", "%252e%252e/".repeat(n));
            let out = normalize_path(&target).map(Cow::into_owned);
            prop_assert_eq!(out, Ok(target));
        }
    }
}
