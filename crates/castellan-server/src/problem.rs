//! Error responses: problem JSON (RFC 9457) for the admin API, OAuth2 error JSON (RFC 6749
//! §5.2) for the token endpoints. Neither ever carries a stack trace, a secret or a key.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use castellan_store::StoreError;
use serde_json::json;

/// A problem JSON response.
#[derive(Debug)]
pub struct Problem {
    status: StatusCode,
    detail: String,
    www_authenticate: Option<&'static str>,
}

impl Problem {
    /// A problem with this status and detail.
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Problem {
        Problem {
            status,
            detail: detail.into(),
            www_authenticate: None,
        }
    }

    /// 400.
    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, detail)
    }

    /// 401 with a `WWW-Authenticate: Bearer` challenge.
    pub fn unauthorized(detail: impl Into<String>) -> Problem {
        Problem {
            www_authenticate: Some("Bearer realm=\"castellan-admin\""),
            ..Problem::new(StatusCode::UNAUTHORIZED, detail)
        }
    }

    /// 403.
    pub fn forbidden(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::FORBIDDEN, detail)
    }

    /// 500, logged; the client learns nothing about the cause.
    pub fn internal(e: impl std::fmt::Display) -> Problem {
        tracing::error!(error = %e, "internal error");
        Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Problem {
        match e {
            StoreError::NotFound(what) => {
                Problem::new(StatusCode::NOT_FOUND, format!("{what} not found"))
            }
            StoreError::Conflict(what) => {
                Problem::new(StatusCode::CONFLICT, format!("{what} already exists"))
            }
            e => Problem::internal(e),
        }
    }
}

impl From<crate::ServerError> for Problem {
    fn from(e: crate::ServerError) -> Problem {
        match e {
            crate::ServerError::Store(e) => e.into(),
            e => Problem::internal(e),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("error");
        let body = json!({
            "type": "about:blank",
            "title": title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        let mut r = (self.status, body.to_string()).into_response();
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(c) = self.www_authenticate {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
        }
        r
    }
}

/// An OAuth2 error response.
#[derive(Debug)]
pub struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
    challenge: bool,
    retry_after: Option<u64>,
}

impl OAuthError {
    /// 400 with `error`.
    pub fn bad(error: &'static str, description: impl Into<String>) -> OAuthError {
        OAuthError {
            status: StatusCode::BAD_REQUEST,
            error,
            description: description.into(),
            challenge: false,
            retry_after: None,
        }
    }

    /// 401 `invalid_client` with a `WWW-Authenticate: Basic` challenge.
    pub fn invalid_client(description: impl Into<String>) -> OAuthError {
        OAuthError {
            status: StatusCode::UNAUTHORIZED,
            challenge: true,
            ..OAuthError::bad("invalid_client", description)
        }
    }

    /// 429: too many failed authentications for this client.
    pub fn locked_out(retry_after: u64) -> OAuthError {
        OAuthError {
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: Some(retry_after.max(1)),
            ..OAuthError::bad(
                "invalid_client",
                "too many failed authentications; retry later",
            )
        }
    }

    /// 500, logged.
    pub fn internal(e: impl std::fmt::Display) -> OAuthError {
        tracing::error!(error = %e, "internal error");
        OAuthError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            ..OAuthError::bad("server_error", "internal error")
        }
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.error, "error_description": self.description});
        let mut r = (self.status, body.to_string()).into_response();
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.challenge {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"castellan\""),
            );
        }
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            h.insert(header::RETRY_AFTER, v);
        }
        r
    }
}
