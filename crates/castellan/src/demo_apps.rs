//! The demo's three services: small HTTP apps that answer every request that reaches them with
//! 200 (201 for `POST /orders`) and a JSON echo of the method, path and the `x-castellan-*`
//! headers their sidecar added. `POST /orders` also calls inventory and payments through the
//! orders sidecar's outbound listeners, passing the user-context token on.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Where an app's outbound calls go (its sidecar's outbound listeners).
#[derive(Debug, Clone, Default)]
pub struct Upstreams {
    /// inventory, through the sidecar.
    pub inventory: Option<SocketAddr>,
    /// payments, through the sidecar.
    pub payments: Option<SocketAddr>,
}

struct App {
    name: &'static str,
    up: Upstreams,
    client: Client<HttpConnector, Full<Bytes>>,
}

fn castellan_headers(h: &hyper::HeaderMap) -> Value {
    let mut m = serde_json::Map::new();
    for (k, v) in h {
        if k.as_str().starts_with("x-castellan-") && k.as_str() != "x-castellan-context" {
            m.insert(
                k.as_str().to_owned(),
                Value::String(v.to_str().unwrap_or("").to_owned()),
            );
        }
    }
    if h.contains_key("x-castellan-context") {
        m.insert(
            "x-castellan-context".to_owned(),
            Value::String("(verified context token)".to_owned()),
        );
    }
    Value::Object(m)
}

async fn call(
    app: &App,
    to: SocketAddr,
    path: &str,
    context: Option<&hyper::header::HeaderValue>,
) -> Value {
    let mut b = Request::builder()
        .method("POST")
        .uri(format!("http://{to}{path}"))
        .header("content-type", "application/json");
    if let Some(c) = context {
        b = b.header("x-castellan-context", c);
    }
    let Ok(req) = b.body(Full::new(Bytes::from_static(b"{}"))) else {
        return json!({"error": "bad request"});
    };
    match app.client.request(req).await {
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            json!({"path": path, "status": status, "response": serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null)})
        }
        Err(e) => json!({"path": path, "error": e.to_string()}),
    }
}

async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, _body) = req.into_parts();
    let mut echo = json!({
        "service": app.name,
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        "headers": castellan_headers(&parts.headers),
    });
    let mut status = StatusCode::OK;
    if app.name == "orders" && parts.method == hyper::Method::POST && parts.uri.path() == "/orders"
    {
        status = StatusCode::CREATED;
        let ctx = parts.headers.get("x-castellan-context");
        let mut calls = Vec::new();
        if let Some(inv) = app.up.inventory {
            calls.push(call(&app, inv, "/items/7/reserve", ctx).await);
        }
        if let Some(pay) = app.up.payments {
            calls.push(call(&app, pay, "/charges", ctx).await);
        }
        if let Some(o) = echo.as_object_mut() {
            o.insert("calls".to_owned(), Value::Array(calls));
        }
    }
    let mut r = Response::new(Full::new(Bytes::from(echo.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Serves the app `name` on `listener` until the runtime ends.
pub fn spawn(name: &'static str, listener: TcpListener, up: Upstreams) {
    let app = Arc::new(App {
        name,
        up,
        client: Client::builder(TokioExecutor::new()).build_http(),
    });
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let app = app.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let app = app.clone();
                    async move { Ok::<_, Infallible>(handle(app, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
}
