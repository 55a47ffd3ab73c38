//! HTTP plumbing shared by sidecar and gateway: framing checks that stop request smuggling,
//! header stripping, bounded bodies, problem JSON, and forwarding.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::json;

/// Response body type.
pub type Body = Full<Bytes>;

/// Prefix of headers only Castellan may set.
pub const CASTELLAN_PREFIX: &str = "x-castellan-";
/// The user-context token header (verified before it is trusted).
pub const CONTEXT_HEADER: &str = "x-castellan-context";

/// A problem JSON response (RFC 9457).
pub fn problem(status: StatusCode, detail: &str, decision_id: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(problem_json(
        status,
        detail,
        decision_id,
    ))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

/// The problem JSON (RFC 9457) of [`problem`].
pub fn problem_json(status: StatusCode, detail: &str, decision_id: &str) -> String {
    json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail,
        "decision_id": decision_id,
    })
    .to_string()
}

/// A fresh decision id.
pub fn decision_id() -> String {
    let mut b = [0u8; 12];
    let _ = aws_lc_rs::rand::fill(&mut b);
    castellan_audit::hex(&b)
}

/// Refuses message framing a proxy and its upstream could read differently (request smuggling):
/// more than one Content-Length, a Content-Length that is not plain digits, Content-Length with
/// Transfer-Encoding, more than one Transfer-Encoding, or any coding but `chunked`.
pub fn check_framing(h: &HeaderMap) -> Result<(), &'static str> {
    let cl: Vec<&HeaderValue> = h.get_all(header::CONTENT_LENGTH).iter().collect();
    let te: Vec<&HeaderValue> = h.get_all(header::TRANSFER_ENCODING).iter().collect();
    if cl.len() > 1 {
        return Err("more than one Content-Length");
    }
    if let Some(v) = cl.first()
        && (v.is_empty() || !v.as_bytes().iter().all(u8::is_ascii_digit))
    {
        return Err("Content-Length must be digits");
    }
    if !cl.is_empty() && !te.is_empty() {
        return Err("Content-Length together with Transfer-Encoding");
    }
    if te.len() > 1 {
        return Err("more than one Transfer-Encoding");
    }
    if let Some(v) = te.first()
        && !v.as_bytes().eq_ignore_ascii_case(b"chunked")
    {
        return Err("only Transfer-Encoding: chunked is accepted");
    }
    Ok(())
}

/// Header fields RFC 9110 defines as comma-separated lists: sent more than once, their values
/// are joined with ", " into one field, which is what policy sees and what the app receives.
/// Any other field sent twice is refused.
const LIST_VALUED: &[&str] = &[
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "access-control-request-headers",
    "cache-control",
    "connection",
    "forwarded",
    "if-match",
    "if-none-match",
    "pragma",
    "prefer",
    "te",
    "trailer",
    "upgrade",
    "via",
    "warning",
    "x-forwarded-for",
];

/// Headers some back ends honour to rewrite the path or method after our decision
/// (shared/design/attack-classes.md): never passed on.
pub(crate) const REWRITE_HEADERS: &[&str] = &[
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-forwarded-uri",
    "x-forwarded-path",
    "x-forwarded-prefix",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-method",
];

/// Headers only the edge sets about the client; whatever a client sends is replaced.
const FORWARDING_HEADERS: &[&str] = &[
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-real-ip",
];

/// `name` as back ends that fold `_` into `-` see it (WSGI, CGI, Rack): lower case, `-`.
pub(crate) fn folded(name: &str) -> std::borrow::Cow<'_, str> {
    if name.contains('_') {
        std::borrow::Cow::Owned(name.replace('_', "-"))
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

/// Removes every field whose folded name (`_` as `-`, any case) is one of `names`.
pub fn remove_folded(h: &mut HeaderMap, names: &[&str]) {
    let gone: Vec<HeaderName> = h
        .keys()
        .filter(|k| names.contains(&folded(k.as_str()).as_ref()))
        .cloned()
        .collect();
    for n in gone {
        h.remove(n);
    }
}

/// Why a request's header section was refused (400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderRefusal {
    /// A value that is not UTF-8.
    NotUtf8(String),
    /// A field that may appear once appeared more often (or two spellings that back ends fold
    /// to one name).
    Repeated(String),
}

impl std::fmt::Display for HeaderRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderRefusal::NotUtf8(n) => write!(f, "header {n} is not valid UTF-8"),
            HeaderRefusal::Repeated(n) => write!(f, "header {n} sent more than once"),
        }
    }
}

/// Puts a request's header section in the one shape both policy and the app see, before
/// anything reads it:
/// - names are compared as back ends fold them (`X_Castellan_User` is `x-castellan-user`);
/// - every `x-castellan-*` field and every rewrite / method-override field is removed, in any
///   spelling; at the `edge`, so are client-supplied forwarding fields (the gateway sets its
///   own);
/// - a value that is not UTF-8 is refused;
/// - a field sent twice (or in two spellings) is refused unless it is list-valued, in which
///   case its values are joined into one field.
pub fn normalize_headers(h: &mut HeaderMap, edge: bool) -> Result<(), HeaderRefusal> {
    let mut seen: Vec<String> = Vec::with_capacity(h.keys_len());
    let mut remove: Vec<HeaderName> = Vec::new();
    let mut join: Vec<HeaderName> = Vec::new();
    for name in h.keys() {
        let f = folded(name.as_str());
        if f.starts_with(CASTELLAN_PREFIX)
            || REWRITE_HEADERS.contains(&f.as_ref())
            || (edge && FORWARDING_HEADERS.contains(&f.as_ref()))
        {
            remove.push(name.clone());
            continue;
        }
        for v in h.get_all(name) {
            if std::str::from_utf8(v.as_bytes()).is_err() {
                return Err(HeaderRefusal::NotUtf8(f.into_owned()));
            }
        }
        let list = LIST_VALUED.contains(&f.as_ref());
        if seen.iter().any(|s| *s == f) {
            // Two spellings of one folded name: refused even for list fields, since a back end
            // would merge what we pass on as two.
            return Err(HeaderRefusal::Repeated(f.into_owned()));
        }
        if h.get_all(name).iter().nth(1).is_some() {
            if !list {
                return Err(HeaderRefusal::Repeated(f.into_owned()));
            }
            join.push(name.clone());
        }
        seen.push(f.into_owned());
    }
    for n in remove {
        h.remove(n);
    }
    for n in join {
        let joined: Vec<u8> = {
            let mut out = Vec::new();
            for (i, v) in h.get_all(&n).iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                out.extend_from_slice(v.as_bytes());
            }
            out
        };
        if let Ok(v) = HeaderValue::from_bytes(&joined) {
            h.insert(n, v);
        }
    }
    Ok(())
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers (and those `Connection` names) and every `x-castellan-*` header.
pub fn strip_headers(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(*n);
    }
    let ours: Vec<HeaderName> = h
        .keys()
        .filter(|k| folded(k.as_str()).starts_with(CASTELLAN_PREFIX))
        .cloned()
        .collect();
    for n in ours {
        h.remove(n);
    }
}

/// Why a body could not be read.
#[derive(Debug)]
pub enum BodyError {
    /// Over the limit.
    TooLarge,
    /// Malformed (bad chunk size, early end…).
    Malformed,
    /// Not all there within [`BODY_TIMEOUT`].
    TimedOut,
}

/// Reads the whole body, at most `limit` bytes. Bodies are read before anything is forwarded,
/// so a malformed one never reaches the upstream.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, limit).collect()).await {
        Err(_) => Err(BodyError::TimedOut),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Ok(Err(_)) => Err(BodyError::Malformed),
    }
}

/// A request body must arrive within this (slow-body clients cannot hold a connection).
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The response for a body error.
pub fn body_error(e: BodyError, decision_id: &str) -> Response<Body> {
    match e {
        BodyError::TooLarge => problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large",
            decision_id,
        ),
        BodyError::Malformed => problem(
            StatusCode::BAD_REQUEST,
            "malformed request body",
            decision_id,
        ),
        BodyError::TimedOut => problem(
            StatusCode::REQUEST_TIMEOUT,
            "request body not received in time",
            decision_id,
        ),
    }
}

/// Turns an upstream response into ours (hop-by-hop headers dropped, body buffered).
pub async fn relay(resp: Response<Incoming>, limit: usize, decision_id: &str) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    match Limited::new(body, limit).collect().await {
        Ok(c) => {
            strip_response_headers(&mut parts.headers);
            Response::from_parts(parts, Full::new(c.to_bytes()))
        }
        Err(_) => problem(
            StatusCode::BAD_GATEWAY,
            "upstream response unreadable",
            decision_id,
        ),
    }
}

fn strip_response_headers(h: &mut HeaderMap) {
    for n in HOP_BY_HOP {
        h.remove(*n);
    }
    h.remove(header::CONTENT_LENGTH);
}

/// Builds the request to an upstream: `uri`, the original method and headers (already
/// stripped), the buffered body.
pub fn upstream_request(
    parts: &hyper::http::request::Parts,
    uri: hyper::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Request<Body>, hyper::http::Error> {
    let mut b = Request::builder().method(parts.method.clone()).uri(uri);
    if let Some(h) = b.headers_mut() {
        *h = headers;
    }
    b.body(Full::new(body))
}
