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
    let body = json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail,
        "decision_id": decision_id,
    });
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

/// A fresh decision id.
pub fn decision_id() -> String {
    let mut b = [0u8; 12];
    let _ = aws_lc_rs::rand::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
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
        .filter(|k| k.as_str().starts_with(CASTELLAN_PREFIX))
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
}

/// Reads the whole body, at most `limit` bytes. Bodies are read before anything is forwarded,
/// so a malformed one never reaches the upstream.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::Malformed),
    }
}

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
