//! The control plane end to end over real TLS: admin roles, OAuth2 (client_credentials with
//! each client authentication method, certificate-bound tokens, token exchange, introspection,
//! revocation, lockout), gRPC certify/renew, CA and key rotation — on SQLite, and on a fresh
//! PostgreSQL database when one is reachable.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use castellan_identity::{SvidUsage, SvidValidator, TokenVerifier, TrustBundle};
use castellan_proto::v1::identity_client::IdentityClient;
use castellan_proto::v1::{CertifyRequest, RenewRequest};
use castellan_server::{Running, Server, ServerConfig};
use rcgen::{CertificateParams, KeyPair, SanType};
use reqwest::StatusCode;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use serde_json::{Value, json};
use std::sync::Arc;

const TD: &str = "example.org";

struct Harness {
    _dir: tempfile::TempDir,
    running: Running,
    admin: String,
    http: reqwest::Client,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn tls_client(
    bundle: &[CertificateDer<'static>],
    ident: Option<(&[CertificateDer<'static>], &KeyPair)>,
) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    for c in bundle {
        roots.add(c.clone()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match ident {
        Some((chain, key)) => b
            .with_client_auth_cert(
                chain.to_vec(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    reqwest::Client::builder()
        .tls_backend_preconfigured(cfg)
        .build()
        .unwrap()
}

async fn start(database_url: Option<String>) -> Harness {
    start_td(TD, database_url).await
}

async fn start_td(td: &str, database_url: Option<String>) -> Harness {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServerConfig {
        data_dir: dir.path().join("data"),
        database_url,
        listen: "127.0.0.1:0".parse().unwrap(),
        auth_failures_per_minute: 3,
        max_body_bytes: 4096,
        ..ServerConfig::default()
    };
    let init = castellan_server::init(&cfg, td, None).await.unwrap();
    let running = Server::start(cfg, None).await.unwrap();
    let http = tls_client(&running.server.bundle(), None);
    Harness {
        _dir: dir,
        running,
        admin: init.admin_token,
        http,
    }
}

impl Harness {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.running.url)
    }

    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut r = self.http.request(method, self.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn post_form(
        &self,
        client: &reqwest::Client,
        path: &str,
        basic: Option<(&str, &str)>,
        form: &[(&str, &str)],
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let mut r = client.post(self.url(path)).form(form);
        if let Some((u, p)) = basic {
            r = r.basic_auth(u, Some(p));
        }
        let resp = r.send().await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
            headers,
        )
    }

    async fn add_client(
        &self,
        name: &str,
        scopes: &[&str],
        tls_san_uri: Option<&str>,
    ) -> Option<String> {
        self.add_client_for(name, scopes, tls_san_uri, &[]).await
    }

    async fn add_client_for(
        &self,
        name: &str,
        scopes: &[&str],
        tls_san_uri: Option<&str>,
        audiences: &[&str],
    ) -> Option<String> {
        let (st, v) = self
            .admin(
                reqwest::Method::POST,
                "/v1/clients",
                Some(&self.admin),
                Some(json!({"name": name, "scopes": scopes, "tls_san_uri": tls_san_uri, "audiences": audiences})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v.get("client_secret")
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    async fn grpc(
        &self,
        ident: Option<(&[CertificateDer<'static>], &KeyPair)>,
    ) -> IdentityClient<tonic::transport::Channel> {
        let bundle_pem = castellan_server::keys::pem_bundle(&self.running.server.bundle());
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(bundle_pem))
            .domain_name("localhost");
        if let Some((chain, key)) = ident {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                castellan_server::keys::pem_bundle(chain),
                key.serialize_pem(),
            ));
        }
        let ch = tonic::transport::Channel::from_shared(
            self.running.url.replace("127.0.0.1", "localhost"),
        )
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
        IdentityClient::new(ch)
    }

    async fn join_token(&self, service: &str) -> String {
        let (st, v) = self
            .admin(
                reqwest::Method::POST,
                "/v1/services",
                Some(&self.admin),
                Some(json!({"name": service})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v["join_token"].as_str().unwrap().to_owned()
    }

    fn verifier(&self, aud: &str) -> TokenVerifier {
        let jwks = &self.running.server.jwks();
        TokenVerifier::new(self.running.server.issuer(), aud, jwks).unwrap()
    }
}

fn csr(uri: Option<&str>) -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    if let Some(u) = uri {
        p.subject_alt_names = vec![SanType::URI(u.try_into().unwrap())];
    }
    let der = p.serialize_request(&key).unwrap().der().to_vec();
    (key, der)
}

fn claims(token: &str) -> Value {
    let p = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
}

async fn suite(h: Harness) {
    use reqwest::Method;
    // ---- admin API: 401 without or with a bad credential, 403 for a viewer's changes -------
    let (st, v) = h.admin(Method::GET, "/v1/services", None, None).await;
    assert_eq!(
        (st, v["status"].as_u64()),
        (StatusCode::UNAUTHORIZED, Some(401)),
        "{v}"
    );
    let (st, _) = h
        .admin(Method::GET, "/v1/services", Some("cadm_forged"), None)
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, v) = h
        .admin(
            Method::POST,
            "/v1/admin-tokens",
            Some(&h.admin),
            Some(json!({"name": "auditor", "role": "viewer"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let viewer = v["token"].as_str().unwrap().to_owned();
    let (st, _) = h
        .admin(Method::GET, "/v1/services", Some(&viewer), None)
        .await;
    assert_eq!(st, StatusCode::OK, "a viewer may read");
    for (m, path, body) in [
        (Method::POST, "/v1/services", Some(json!({"name": "x"}))),
        (Method::POST, "/v1/ca/rotate", None),
        (Method::POST, "/v1/keys/rotate", None),
        (Method::POST, "/v1/clients", Some(json!({"name": "x"}))),
        (
            Method::POST,
            "/v1/admin-tokens",
            Some(json!({"name": "x", "role": "admin"})),
        ),
    ] {
        let (st, v) = h.admin(m, path, Some(&viewer), body).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "viewer {path}: {v}");
        assert_eq!(v["status"], 403);
    }
    // Bad input: problem JSON, never a 500.
    let (st, v) = h
        .admin(
            Method::POST,
            "/v1/services",
            Some(&h.admin),
            Some(json!({"name": "../etc"})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let (st, _) = h
        .admin(
            Method::POST,
            "/v1/services",
            Some(&h.admin),
            Some(json!({"name": "a", "extra": 1})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    let big = "x".repeat(10_000);
    let (st, v) = h
        .admin(
            Method::POST,
            "/v1/services",
            Some(&h.admin),
            Some(json!({"name": big})),
        )
        .await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    let (st, v) = h.admin(Method::GET, "/nope", None, None).await;
    assert_eq!(
        (st, v["status"].as_u64()),
        (StatusCode::NOT_FOUND, Some(404))
    );

    // ---- workload identity: certify with a join token, once -----------------------------
    let join = h.join_token("orders").await;
    let mut g = h.grpc(None).await;
    let (bad_key, other_san) = csr(Some(&format!("spiffe://{TD}/svc/payments")));
    let e = g
        .certify(CertifyRequest {
            join_token: join.clone(),
            csr_der: other_san,
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::InvalidArgument,
        "CSR naming another service: {e}"
    );
    drop(bad_key);
    // The failed attempt above consumed the token: a join token is single use, whatever happens.
    let (key, der) = csr(None);
    let e = g
        .certify(CertifyRequest {
            join_token: join,
            csr_der: der.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let join = {
        let (st, v) = h
            .admin(
                Method::POST,
                "/v1/services/orders/join-token",
                Some(&h.admin),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::CREATED);
        v["join_token"].as_str().unwrap().to_owned()
    };
    let svid = g
        .certify(CertifyRequest {
            join_token: join.clone(),
            csr_der: der.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(svid.spiffe_id, format!("spiffe://{TD}/svc/orders"));
    let e = g
        .certify(CertifyRequest {
            join_token: join,
            csr_der: der,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "join token reuse");
    let chain: Vec<CertificateDer<'static>> = svid
        .cert_chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let bundle: Vec<CertificateDer<'static>> = svid
        .trust_bundle
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let validator = SvidValidator::new(TrustBundle::new(TD, bundle.clone()).unwrap());
    let id = validator
        .validate(&chain, UnixTime::now(), SvidUsage::Client)
        .unwrap();
    assert_eq!(id.service_name(), Some("orders"));
    assert!(svid.not_after - castellan_server::unix_now() <= 3600);

    // An edge service's SVID also names the DNS names / IPs registered for it, never others.
    let (st, v) = h
        .admin(
            Method::POST,
            "/v1/services",
            Some(&h.admin),
            Some(json!({"name": "gateway", "dns_names": ["gw.example", "127.0.0.2"]})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, _) = h
        .admin(
            Method::POST,
            "/v1/services",
            Some(&h.admin),
            Some(json!({"name": "edge2", "dns_names": ["bad name!"]})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (gkey, gder) = csr(None);
    let gw = g
        .certify(CertifyRequest {
            join_token: v["join_token"].as_str().unwrap().to_owned(),
            csr_der: gder,
        })
        .await
        .unwrap()
        .into_inner();
    let gw_chain: Vec<CertificateDer<'static>> = gw
        .cert_chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    validator
        .validate(&gw_chain, UnixTime::now(), SvidUsage::Server)
        .unwrap();
    let (_, gcert) = x509_parser::parse_x509_certificate(gw_chain[0].as_ref()).unwrap();
    let sans = format!(
        "{:?}",
        gcert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
    );
    assert!(
        sans.contains("gw.example")
            && (sans.contains("127.0.0.2") || sans.contains("[127, 0, 0, 2]")),
        "{sans}"
    );
    drop(gkey);

    // ---- renewal over mTLS with the current SVID --------------------------------------
    let e = g
        .renew(RenewRequest {
            csr_der: csr(None).1,
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::Unauthenticated,
        "renew without a certificate"
    );
    let mut gm = h.grpc(Some((&chain, &key))).await;
    let (key2, der2) = csr(None);
    let renewed = gm
        .renew(RenewRequest { csr_der: der2 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.spiffe_id, svid.spiffe_id);
    assert_ne!(renewed.cert_chain, svid.cert_chain);
    let chain2: Vec<CertificateDer<'static>> = renewed
        .cert_chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();

    // ---- OAuth2: client_credentials, each client authentication method --------------------
    let secret = h
        .add_client_for(
            "billing",
            &["orders.read", "orders.write"],
            None,
            &["inventory"],
        )
        .await
        .unwrap();
    let (st, v, hd) = h
        .post_form(
            &h.http,
            "/oauth2/token",
            Some(("billing", &secret)),
            &[
                ("grant_type", "client_credentials"),
                ("scope", "orders.read"),
            ],
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(hd["cache-control"], "no-store");
    let tok = v["access_token"].as_str().unwrap().to_owned();
    let c = claims(&tok);
    for k in ["iss", "sub", "aud", "exp", "iat", "jti", "scope"] {
        assert!(c.get(k).is_some(), "claim {k} missing: {c}");
    }
    assert_eq!(
        (c["sub"].as_str(), c["scope"].as_str(), c["aud"].as_str()),
        (Some("billing"), Some("orders.read"), Some(TD))
    );
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 300);
    h.verifier(TD)
        .verify(&tok, castellan_server::unix_now())
        .unwrap();
    let (st, v, _) = h
        .post_form(
            &h.http,
            "/oauth2/token",
            None,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "billing"),
                ("client_secret", &secret),
            ],
        )
        .await;
    assert_eq!(st, StatusCode::OK, "client_secret_post: {v}");
    assert_eq!(
        claims(v["access_token"].as_str().unwrap())["scope"],
        "orders.read orders.write"
    );
    let (st, v, _) = h
        .post_form(
            &h.http,
            "/oauth2/token",
            Some(("billing", &secret)),
            &[("grant_type", "client_credentials"), ("scope", "admin")],
        )
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_scope"))
    );
    let (st, v, _) = h
        .post_form(
            &h.http,
            "/oauth2/token",
            Some(("billing", &secret)),
            &[("grant_type", "password")],
        )
        .await;
    assert_eq!(v["error"], "unsupported_grant_type", "{st}");
    let (st, v, _) = h
        .post_form(
            &h.http,
            "/oauth2/token",
            Some(("billing", &secret)),
            &[
                ("grant_type", "client_credentials"),
                ("grant_type", "client_credentials"),
            ],
        )
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request")),
        "repeated parameter"
    );
    let (st, v, _) = h
        .post_form(
            &h.http,
            "/oauth2/token",
            Some(("billing", &secret)),
            &[
                ("grant_type", "client_credentials"),
                ("client_secret", &secret),
            ],
        )
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request")),
        "two auth methods"
    );
    let (st, v, hd) = h
        .post_form(
            &h.http,
            "/oauth2/token",
            None,
            &[("grant_type", "client_credentials")],
        )
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_client"))
    );
    assert!(hd.contains_key("www-authenticate"));

    // tls_client_auth: the SVID is the credential, the token is bound to it (RFC 8705).
    h.add_client(
        "orders-worker",
        &["orders.read"],
        Some(&format!("spiffe://{TD}/svc/orders")),
    )
    .await;
    let mtls = tls_client(&h.running.server.bundle(), Some((&chain2, &key2)));
    let (st, v, _) = h
        .post_form(
            &mtls,
            "/oauth2/token",
            None,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "orders-worker"),
            ],
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let bound = v["access_token"].as_str().unwrap().to_owned();
    let thumb = URL_SAFE_NO_PAD
        .encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, chain2[0].as_ref()).as_ref());
    assert_eq!(claims(&bound)["cnf"]["x5t#S256"], thumb);
    let (st, _, _) = h
        .post_form(
            &h.http,
            "/oauth2/token",
            None,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "orders-worker"),
            ],
        )
        .await;
    assert_eq!(
        st,
        StatusCode::UNAUTHORIZED,
        "tls_client_auth without a certificate"
    );
    // Another service's SVID does not authenticate this client.
    let pay_join = h.join_token("payments").await;
    let (pkey, pder) = csr(None);
    let pay = g
        .certify(CertifyRequest {
            join_token: pay_join,
            csr_der: pder,
        })
        .await
        .unwrap()
        .into_inner();
    let pchain: Vec<CertificateDer<'static>> = pay
        .cert_chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let wrong = tls_client(&h.running.server.bundle(), Some((&pchain, &pkey)));
    let (st, _, _) = h
        .post_form(
            &wrong,
            "/oauth2/token",
            None,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "orders-worker"),
            ],
        )
        .await;
    assert_eq!(
        st,
        StatusCode::UNAUTHORIZED,
        "wrong SVID for tls_client_auth"
    );

    fn form(v: &[(String, String)]) -> Vec<(&str, &str)> {
        v.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }
    // ---- token exchange: down-scoped, audience-restricted, never longer-lived -----------
    // A client may request only the default audience and its registered ones.
    let (_, v, _) = h
        .post_form(
            &h.http,
            "/oauth2/token",
            Some(("billing", &secret)),
            &[
                ("grant_type", "client_credentials"),
                ("audience", "payments"),
            ],
        )
        .await;
    assert_eq!(
        v["error"], "invalid_target",
        "an audience billing may not request"
    );
    // The subject token: issued to the frontend for billing (its audience).
    let front = h
        .add_client_for("frontend", &["orders.read"], None, &["billing"])
        .await
        .unwrap();
    let (_, v, _) = h
        .post_form(
            &h.http,
            "/oauth2/token",
            Some(("frontend", &front)),
            &[
                ("grant_type", "client_credentials"),
                ("audience", "billing"),
            ],
        )
        .await;
    let for_billing = v["access_token"].as_str().unwrap().to_owned();
    let c = claims(&for_billing);
    let exchange = |subject: &str, aud: &str| {
        vec![
            (
                "grant_type".to_owned(),
                "urn:ietf:params:oauth:grant-type:token-exchange".to_owned(),
            ),
            ("subject_token".to_owned(), subject.to_owned()),
            (
                "subject_token_type".to_owned(),
                "urn:ietf:params:oauth:token-type:access_token".to_owned(),
            ),
            ("audience".to_owned(), aud.to_owned()),
        ]
    };

    let ok = exchange(&for_billing, "inventory");
    let (st, v, _) = h
        .post_form(
            &h.http,
            "/oauth2/token",
            Some(("billing", &secret)),
            &form(&ok),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let ex = claims(v["access_token"].as_str().unwrap());
    assert_eq!(
        (ex["aud"].as_str(), ex["scope"].as_str(), ex["sub"].as_str()),
        (Some("inventory"), Some("orders.read"), Some("frontend"))
    );
    assert_eq!(ex["act"]["sub"], "billing");
    assert!(ex["exp"].as_i64() <= c["exp"].as_i64());
    // Refused: a token not issued for the exchanging client (billing's own, aud = TD; the
    // frontend's for billing, traded by the frontend); an audience the client may not ask for.
    for (who, client, subject, aud) in [
        (
            "a token issued for someone else",
            ("billing", secret.as_str()),
            tok.as_str(),
            "inventory",
        ),
        (
            "a token the client merely holds",
            ("frontend", front.as_str()),
            for_billing.as_str(),
            "billing",
        ),
        (
            "an audience outside the client's list",
            ("billing", secret.as_str()),
            for_billing.as_str(),
            "payments",
        ),
    ] {
        let (st, v, _) = h
            .post_form(
                &h.http,
                "/oauth2/token",
                Some(client),
                &form(&exchange(subject, aud)),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{who}: {v}");
    }
    // A subject token without scopes grants none (never the exchanging client's own).
    let bare_front = h
        .add_client_for("bare", &[], None, &["billing"])
        .await
        .unwrap();
    let (_, v, _) = h
        .post_form(
            &h.http,
            "/oauth2/token",
            Some(("bare", &bare_front)),
            &[
                ("grant_type", "client_credentials"),
                ("audience", "billing"),
            ],
        )
        .await;
    let unscoped = v["access_token"].as_str().unwrap().to_owned();
    assert!(claims(&unscoped).get("scope").is_none());
    let (st, v, _) = h
        .post_form(
            &h.http,
            "/oauth2/token",
            Some(("billing", &secret)),
            &form(&exchange(&unscoped, "inventory")),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(
        claims(v["access_token"].as_str().unwrap())
            .get("scope")
            .is_none(),
        "{v}"
    );
    let exch: Vec<(&str, &str)> = form(&ok);
    let mut up = exch.to_vec();
    up.push(("scope", "orders.write"));
    let (_, v, _) = h
        .post_form(&h.http, "/oauth2/token", Some(("billing", &secret)), &up)
        .await;
    assert_eq!(v["error"], "invalid_scope", "exchange cannot widen scope");
    let no_aud: Vec<_> = exch
        .iter()
        .copied()
        .filter(|(k, _)| *k != "audience")
        .collect();
    let (_, v, _) = h
        .post_form(
            &h.http,
            "/oauth2/token",
            Some(("billing", &secret)),
            &no_aud,
        )
        .await;
    assert_eq!(v["error"], "invalid_target");
    let mut forged = exch.to_vec();
    let tampered = format!("{}x", &tok[..tok.len() - 1]);
    forged[1] = ("subject_token", tampered.as_str());
    let (_, v, _) = h
        .post_form(
            &h.http,
            "/oauth2/token",
            Some(("billing", &secret)),
            &forged,
        )
        .await;
    assert_eq!(v["error"], "invalid_request", "forged subject token");
    let mut stolen = exch.to_vec();
    stolen[1] = ("subject_token", bound.as_str());
    let (_, v, _) = h
        .post_form(
            &h.http,
            "/oauth2/token",
            Some(("billing", &secret)),
            &stolen,
        )
        .await;
    assert_eq!(
        v["error"], "invalid_request",
        "certificate-bound token exchanged by another client"
    );

    // ---- introspection and revocation ------------------------------------------------
    let (st, v, _) = h
        .post_form(
            &h.http,
            "/oauth2/introspect",
            Some(("billing", &secret)),
            &[("token", &tok)],
        )
        .await;
    assert_eq!(
        (st, v["active"].as_bool(), v["scope"].as_str()),
        (StatusCode::OK, Some(true), Some("orders.read"))
    );
    let (st, _, _) = h
        .post_form(&h.http, "/oauth2/introspect", None, &[("token", &tok)])
        .await;
    assert_eq!(
        st,
        StatusCode::UNAUTHORIZED,
        "introspection needs client authentication"
    );
    let (_, v, _) = h
        .post_form(
            &h.http,
            "/oauth2/introspect",
            Some(("billing", &secret)),
            &[("token", "not.a.token")],
        )
        .await;
    assert_eq!(v, json!({"active": false}));
    // Another client introspecting billing's token learns nothing.
    let (st, v, _) = h
        .post_form(
            &mtls,
            "/oauth2/introspect",
            None,
            &[("client_id", "orders-worker"), ("token", &tok)],
        )
        .await;
    assert_eq!(
        (st, v),
        (StatusCode::OK, json!({"active": false})),
        "introspecting another client's token"
    );
    let (st, v, _) = h
        .post_form(
            &mtls,
            "/oauth2/revoke",
            None,
            &[("client_id", "orders-worker"), ("token", &tok)],
        )
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("unauthorized_client")),
        "revoking another client's token"
    );
    let (st, _, _) = h
        .post_form(
            &h.http,
            "/oauth2/revoke",
            Some(("billing", &secret)),
            &[("token", &tok)],
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (_, v, _) = h
        .post_form(
            &h.http,
            "/oauth2/introspect",
            Some(("billing", &secret)),
            &[("token", &tok)],
        )
        .await;
    assert_eq!(v, json!({"active": false}), "revoked token is inactive");
    let (st, _, _) = h
        .post_form(
            &h.http,
            "/oauth2/revoke",
            Some(("frontend", &front)),
            &[("token", &for_billing)],
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (_, v, _) = h
        .post_form(&h.http, "/oauth2/token", Some(("billing", &secret)), &exch)
        .await;
    assert_eq!(
        v["error"], "invalid_request",
        "revoked token cannot be exchanged"
    );

    // ---- failed client authentication is rate-limited per client ----------------------
    let mut codes = Vec::new();
    for _ in 0..5 {
        let (st, _, _) = h
            .post_form(
                &h.http,
                "/oauth2/token",
                Some(("billing", "wrong")),
                &[("grant_type", "client_credentials")],
            )
            .await;
        codes.push(st.as_u16());
    }
    assert_eq!(
        codes,
        [401, 401, 401, 429, 429],
        "3 failures/min allowed in this config"
    );
    let (st, _, hd) = h
        .post_form(
            &h.http,
            "/oauth2/token",
            Some(("billing", &secret)),
            &[("grant_type", "client_credentials")],
        )
        .await;
    assert_eq!(
        st,
        StatusCode::TOO_MANY_REQUESTS,
        "locked out even with the right secret"
    );
    assert!(hd["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    // Another client is not affected.
    let (st, _, _) = h
        .post_form(
            &mtls,
            "/oauth2/token",
            None,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "orders-worker"),
            ],
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    // An unknown client id gets exactly the same answers: nothing tells which ids exist.
    let mut codes = Vec::new();
    for _ in 0..5 {
        let (st, v, _) = h
            .post_form(
                &h.http,
                "/oauth2/token",
                Some(("no-such-client", "wrong")),
                &[("grant_type", "client_credentials")],
            )
            .await;
        codes.push((
            st.as_u16(),
            v["error"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    let want: Vec<(u16, String)> = [401, 401, 401, 429, 429]
        .iter()
        .map(|c| (*c, "invalid_client".to_owned()))
        .collect();
    assert_eq!(codes, want);
    // Lockout is per (client, source): from another address the right secret still works.
    let elsewhere = reqwest::Client::builder()
        .tls_backend_preconfigured(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates({
                    let mut r = rustls::RootCertStore::empty();
                    for c in h.running.server.bundle() {
                        r.add(c).unwrap();
                    }
                    r
                })
                .with_no_client_auth(),
        )
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let (st, _, _) = h
        .post_form(
            &elsewhere,
            "/oauth2/token",
            Some(("billing", &secret)),
            &[("grant_type", "client_credentials")],
        )
        .await;
    assert_eq!(
        st,
        StatusCode::OK,
        "billing is not locked out from 127.0.0.2"
    );
    // Failed secrets never lock out the holder of a tls_client_auth client's certificate.
    for _ in 0..6 {
        h.post_form(
            &h.http,
            "/oauth2/token",
            Some(("orders-worker", "guessed")),
            &[("grant_type", "client_credentials")],
        )
        .await;
    }
    let (st, _, _) = h
        .post_form(
            &mtls,
            "/oauth2/token",
            None,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "orders-worker"),
            ],
        )
        .await;
    assert_eq!(
        st,
        StatusCode::OK,
        "the certificate holder is not locked out"
    );

    // ---- revocation and disable reach renewals --------------------------------------
    let serial = {
        let (_, v) = h
            .admin(
                Method::GET,
                "/v1/services/orders/certificates",
                Some(&viewer),
                None,
            )
            .await;
        assert_eq!(v.as_array().unwrap().len(), 2);
        let (_, cert) = x509_parser::parse_x509_certificate(chain2[0].as_ref()).unwrap();
        let serial: String = cert
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(
            v.as_array()
                .unwrap()
                .iter()
                .any(|c| c["serial"] == serial.as_str())
        );
        serial
    };
    let (st, _) = h
        .admin(
            Method::POST,
            &format!("/v1/certificates/{serial}/revoke"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let e = h
        .grpc(Some((&chain2, &key2)))
        .await
        .renew(RenewRequest {
            csr_der: csr(None).1,
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::Unauthenticated,
        "revoked SVID cannot renew: {e}"
    );
    let (st, _, _) = h
        .post_form(
            &mtls,
            "/oauth2/token",
            None,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "orders-worker"),
            ],
        )
        .await;
    assert_eq!(
        st,
        StatusCode::UNAUTHORIZED,
        "revoked SVID cannot authenticate a client"
    );
    let (key3, der3) = csr(None);
    let r3 = h
        .grpc(Some((&chain, &key)))
        .await
        .renew(RenewRequest { csr_der: der3 })
        .await
        .unwrap()
        .into_inner();
    let chain3: Vec<CertificateDer<'static>> = r3
        .cert_chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let mtls = tls_client(&h.running.server.bundle(), Some((&chain3, &key3)));
    let (st, _) = h
        .admin(
            Method::POST,
            "/v1/services/payments/disable",
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let e = h
        .grpc(Some((&pchain, &pkey)))
        .await
        .renew(RenewRequest {
            csr_der: csr(None).1,
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::PermissionDenied,
        "disabled service cannot renew"
    );
    let (_, v) = h
        .admin(Method::GET, "/v1/revocations", Some(&viewer), None)
        .await;
    let kinds: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["certificate", "service"]);

    // ---- CA rotation: both CAs in the bundle; old SVIDs still validate ------------------
    let (st, v) = h
        .admin(Method::POST, "/v1/ca/rotate", Some(&h.admin), None)
        .await;
    assert_eq!(
        (st, v["bundle_size"].as_u64()),
        (StatusCode::OK, Some(2)),
        "{v}"
    );
    let new_bundle = h.running.server.bundle();
    assert!(new_bundle.contains(&bundle[0]));
    let v2 = SvidValidator::new(TrustBundle::new(TD, new_bundle.clone()).unwrap());
    v2.validate(&chain, UnixTime::now(), SvidUsage::Server)
        .unwrap();
    let j = h.join_token("inventory").await;
    let inv = h
        .grpc(None)
        .await
        .certify(CertifyRequest {
            join_token: j,
            csr_der: csr(None).1,
        })
        .await
        .unwrap()
        .into_inner();
    let ichain: Vec<CertificateDer<'static>> = inv
        .cert_chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    assert_eq!(inv.trust_bundle.len(), 2);
    v2.validate(&ichain, UnixTime::now(), SvidUsage::Server)
        .unwrap();
    let old_only = SvidValidator::new(TrustBundle::new(TD, bundle.clone()).unwrap());
    assert!(
        old_only
            .validate(&ichain, UnixTime::now(), SvidUsage::Server)
            .is_err(),
        "new SVIDs come from the new CA"
    );

    // ---- signing-key rotation: old public key stays published -------------------------
    let (st, v, _) = h
        .post_form(
            &mtls,
            "/oauth2/token",
            None,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "orders-worker"),
            ],
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let before = v["access_token"].as_str().unwrap().to_owned();
    let (st, _) = h
        .admin(Method::POST, "/v1/keys/rotate", Some(&h.admin), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    let jwks: Value = h
        .http
        .get(h.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
    let (_, v, _) = h
        .post_form(
            &mtls,
            "/oauth2/token",
            None,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "orders-worker"),
            ],
        )
        .await;
    let after = v["access_token"].as_str().unwrap().to_owned();
    let ver = h.verifier(TD);
    ver.verify(&before, castellan_server::unix_now()).unwrap();
    ver.verify(&after, castellan_server::unix_now()).unwrap();
    assert_ne!(claims_header_kid(&before), claims_header_kid(&after));

    // ---- discovery, health, metrics, OpenAPI ------------------------------------------
    let d: Value = h
        .http
        .get(h.url("/.well-known/openid-configuration"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(d["issuer"].as_str(), Some(h.running.server.issuer()));
    assert_eq!(
        d["token_endpoint"],
        format!("{}/oauth2/token", h.running.url)
    );
    for p in ["/healthz", "/readyz"] {
        assert_eq!(
            h.http.get(h.url(p)).send().await.unwrap().status(),
            StatusCode::OK,
            "{p}"
        );
    }
    // /metrics needs a credential on the main listener.
    assert_eq!(
        h.http.get(h.url("/metrics")).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let m = h
        .http
        .get(h.url("/metrics"))
        .bearer_auth(&h.admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("castellan_server_tokens_issued_total"), "{m}");
    assert!(m.contains("castellan_server_client_auth_failures_total"));
    let api: Value = h
        .http
        .get(h.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(api["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/services",
        "/oauth2/token",
        "/oauth2/introspect",
        "/oauth2/revoke",
        "/v1/ca/rotate",
        "/v1/keys/rotate",
    ] {
        assert!(api["paths"].get(path).is_some(), "OpenAPI lacks {path}");
    }
    h.running.shutdown().await;
}

fn claims_header_kid(token: &str) -> String {
    let h = token.split('.').next().unwrap();
    let v: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap();
    v["kid"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_on_sqlite() {
    suite(start(None).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_on_postgres() {
    let admin_url = "postgres://postgres@127.0.0.1:5432/test";
    let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(admin_url).await else {
        if std::env::var_os("CI").is_some() {
            panic!("PostgreSQL at {admin_url} is required in CI");
        }
        eprintln!("SKIPPED control_plane_on_postgres: no PostgreSQL at {admin_url}");
        return;
    };
    let db = format!(
        "castellan_server_test_{}_{}",
        std::process::id(),
        castellan_server::unix_now()
    );
    sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {db}").as_str())
        .await
        .unwrap();
    suite(start(Some(format!("postgres://postgres@127.0.0.1:5432/{db}"))).await).await;
    sqlx::Executor::execute(
        &mut conn,
        format!("DROP DATABASE {db} WITH (FORCE)").as_str(),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_refuses_an_uninitialized_or_foreign_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServerConfig {
        data_dir: dir.path().to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..ServerConfig::default()
    };
    let e = Server::start(cfg.clone(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("kek"), "{e}");
    castellan_server::init(&cfg, TD, None).await.unwrap();
    let e = castellan_server::init(&cfg, TD, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("already initialized"), "{e}");
    // The wrong key-encryption key cannot open the CA.
    let e = Server::start(cfg, Some("11".repeat(32)))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("wrong key-encryption key"), "{e}");
}

/// The control plane compiles an OpenAPI document with the proxies' compiler before storing
/// it: one every proxy would refuse (and then not validate against) is a 400 naming the
/// compiler's reason, and the document in force stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_documents_the_proxies_cannot_compile_are_refused() {
    let h = start(None).await;
    let (st, _) = h
        .admin(
            reqwest::Method::POST,
            "/v1/services",
            Some(&h.admin),
            Some(json!({"name": "orders"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let h = &h;
    let put = |text: &'static str| async move {
        let r = h
            .http
            .put(h.url("/v1/services/orders/spec"))
            .bearer_auth(&h.admin)
            .header("content-type", "application/yaml")
            .body(text)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let ct = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        (status, ct, r.json::<Value>().await.unwrap())
    };
    let stored = || async move {
        let db = format!(
            "sqlite://{}",
            h._dir.path().join("data").join("castellan.db").display()
        );
        let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&db)
            .await
            .unwrap();
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT spec FROM service_specs WHERE service = 'orders'")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        rows.into_iter()
            .map(|(t,)| serde_json::from_str::<Value>(&t).unwrap())
            .collect::<Vec<_>>()
    };

    let good = "openapi: 3.0.3\npaths:\n  /orders/{id}:\n    get:\n      parameters:\n        - {name: id, in: path, required: true, schema: {type: integer}}\n";
    let (st, _, v) = put(good).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"service": "orders", "paths": 1}));
    let in_force = stored().await;
    assert_eq!(in_force.len(), 1);

    // A `$ref` (which the compiler does not resolve) and a schema that is not one.
    for (bad, reason) in [
        (
            "openapi: 3.1.0\npaths:\n  /orders:\n    post:\n      requestBody:\n        content:\n          application/json:\n            schema: {$ref: '#/components/schemas/Order'}\ncomponents:\n  schemas:\n    Order: {type: object}\n",
            "spec: post /orders body: $ref is not supported yet",
        ),
        (
            "openapi: 3.0.3\npaths:\n  /orders:\n    get:\n      parameters:\n        - {name: limit, in: query, schema: {type: 12}}\n",
            "spec: get /orders parameter limit: invalid schema",
        ),
    ] {
        let (st, ct, v) = put(bad).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(ct.as_deref(), Some("application/problem+json"));
        let detail = v["detail"].as_str().unwrap();
        assert!(detail.starts_with(reason), "{detail}");
        assert_eq!(stored().await, in_force, "the document in force stays");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_exchange_accepts_a_configured_external_issuer_only() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    // The external IdP's key: its JWKS is configured as a file, never fetched.
    let idp = castellan_identity::SigningKey::generate().unwrap();
    let jwks_file = dir.path().join("idp-jwks.json");
    std::fs::write(
        &jwks_file,
        serde_json::to_string(&castellan_identity::jwks(&[&idp]).unwrap()).unwrap(),
    )
    .unwrap();
    let cfg = ServerConfig {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        external_issuers: vec![castellan_server::ExternalIssuer {
            issuer: "https://idp.example".to_owned(),
            audience: "castellan".to_owned(),
            jwks_file,
        }],
        // The IdP's tokens are issued for the control plane; the gateway may trade them.
        may_act: vec![castellan_server::MayAct {
            audience: "castellan".to_owned(),
            clients: vec!["gateway".to_owned()],
        }],
        ..ServerConfig::default()
    };
    let init = castellan_server::init(&cfg, TD, None).await.unwrap();
    let running = Server::start(cfg, None).await.unwrap();
    let h = Harness {
        _dir: dir,
        running,
        admin: init.admin_token,
        http: reqwest::Client::new(),
    };
    let h = Harness {
        http: tls_client(&h.running.server.bundle(), None),
        ..h
    };
    let secret = h
        .add_client_for(
            "gateway",
            &["orders.read", "orders.write"],
            None,
            &["orders"],
        )
        .await
        .unwrap();
    let now = castellan_server::unix_now();
    let mint = |iss: &str, aud: &str, key: &castellan_identity::SigningKey| {
        let mut extra = serde_json::Map::new();
        extra.insert("scope".to_owned(), json!("orders.read profile"));
        castellan_identity::issue_token(key, iss, "alice", aud, now, 120, &extra).unwrap()
    };
    let exchange = |subject: String| {
        let h = &h;
        let secret = secret.clone();
        async move {
            h.post_form(
                &h.http,
                "/oauth2/token",
                Some(("gateway", &secret)),
                &[
                    (
                        "grant_type",
                        "urn:ietf:params:oauth:grant-type:token-exchange",
                    ),
                    ("subject_token", &subject),
                    ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                    ("audience", "orders"),
                ],
            )
            .await
        }
    };
    let (st, v, _) = exchange(mint("https://idp.example", "castellan", &idp)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let c = claims(v["access_token"].as_str().unwrap());
    assert_eq!(
        (c["sub"].as_str(), c["aud"].as_str(), c["scope"].as_str()),
        (Some("alice"), Some("orders"), Some("orders.read"))
    );
    assert_eq!(c["subject_issuer"], "https://idp.example");
    assert!(
        c["exp"].as_i64().unwrap() <= now + 120,
        "never outlives the subject token"
    );
    // Wrong audience for this server, an unconfigured issuer, a key the IdP does not publish.
    let (_, v, _) = exchange(mint("https://idp.example", "someone-else", &idp)).await;
    assert_eq!(v["error"], "invalid_request");
    let (_, v, _) = exchange(mint("https://evil.example", "castellan", &idp)).await;
    assert_eq!(v["error"], "invalid_request");
    let other = castellan_identity::SigningKey::generate().unwrap();
    let (_, v, _) = exchange(mint("https://idp.example", "castellan", &other)).await;
    assert_eq!(v["error"], "invalid_request");
    h.running.shutdown().await;
}

// ---- distribution: policy revisions, the watch stream, two replicas -----------------------

fn demo_policy_files() -> serde_json::Map<String, Value> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/demo/policies");
    let mut files = serde_json::Map::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_owned();
        if name.ends_with(".yaml") && !name.ends_with("_test.yaml") {
            files.insert(name, Value::String(std::fs::read_to_string(&p).unwrap()));
        }
    }
    files
}

async fn certified(h: &Harness, service: &str) -> (Vec<CertificateDer<'static>>, KeyPair) {
    let join = h.join_token(service).await;
    let (key, der) = csr(None);
    let svid = h
        .grpc(None)
        .await
        .certify(CertifyRequest {
            join_token: join,
            csr_der: der,
        })
        .await
        .unwrap()
        .into_inner();
    (
        svid.cert_chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect(),
        key,
    )
}

async fn channel_to(
    url: &str,
    bundle: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
    key: &KeyPair,
) -> tonic::transport::Channel {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            castellan_server::keys::pem_bundle(bundle),
        ))
        .domain_name("localhost")
        .identity(tonic::transport::Identity::from_pem(
            castellan_server::keys::pem_bundle(chain),
            key.serialize_pem(),
        ));
    tonic::transport::Channel::from_shared(url.replace("127.0.0.1", "localhost"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn next(
    stream: &mut tonic::Streaming<castellan_proto::v1::WatchUpdate>,
) -> castellan_proto::v1::WatchUpdate {
    tokio::time::timeout(std::time::Duration::from_secs(10), stream.message())
        .await
        .expect("no update within 10 s")
        .unwrap()
        .unwrap()
}

/// `watch_url`: the replica the proxy watches (another replica on the same database, or the same).
async fn distribution_suite(h: &Harness, watch_url: &str) {
    use castellan_proto::v1::distribution_client::DistributionClient;
    use castellan_proto::v1::{ProxyReport, WatchRequest};
    use reqwest::Method;
    let (chain, key) = certified(h, "orders").await;
    let files = demo_policy_files();
    let (st, v) = h
        .admin(
            Method::POST,
            "/v1/policy",
            Some(&h.admin),
            Some(json!({"files": files, "comment": "demo"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let r1 = v["revision"].as_i64().unwrap();
    let (st, v) = h
        .admin(
            Method::POST,
            "/v1/policy",
            Some(&h.admin),
            Some(json!({"files": files})),
        )
        .await;
    assert_eq!(
        (st, v["changed"].as_bool(), v["revision"].as_i64()),
        (StatusCode::OK, Some(false), Some(r1)),
        "same content, same revision"
    );
    let mut broken = files.clone();
    broken.insert(
        "orders.yaml".to_owned(),
        Value::String("apiVersion: castellan/v1\nkind: AccessPolicy\nbogus: 1\n".to_owned()),
    );
    let (st, v) = h
        .admin(
            Method::POST,
            "/v1/policy",
            Some(&h.admin),
            Some(json!({"files": broken})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.as_str().unwrap().starts_with("orders.yaml:")),
        "{v}"
    );
    let mut traversal = files.clone();
    traversal.insert("../x.yaml".to_owned(), Value::String(String::new()));
    let (st, _) = h
        .admin(
            Method::POST,
            "/v1/policy",
            Some(&h.admin),
            Some(json!({"files": traversal})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);

    // Watching needs an SVID.
    let bundle = h.running.server.bundle();
    let anon = tonic::transport::Channel::from_shared(watch_url.replace("127.0.0.1", "localhost"))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(
                    castellan_server::keys::pem_bundle(&bundle),
                ))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let e = DistributionClient::new(anon)
        .watch(WatchRequest {
            proxy_id: "x".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    let mut client = DistributionClient::new(channel_to(watch_url, &bundle, &chain, &key).await);
    let mut stream = client
        .watch(WatchRequest {
            proxy_id: "orders-1".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let snap = next(&mut stream).await;
    assert_eq!(snap.sequence, 1);
    let p = snap.policy.unwrap();
    assert_eq!(p.revision, r1);
    // Least privilege: a sidecar of orders gets the mesh config and orders' documents only,
    // and no credentials at all.
    let mut names: Vec<&str> = p.files.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["mesh.yaml", "orders.yaml", "ratelimits.yaml"]);
    assert!(
        p.files.values().all(|t| !t.contains("service: payments")),
        "another service's policy reached the orders sidecar"
    );
    assert!(snap.api_keys.is_some_and(|k| k.keys.is_empty()));
    assert!(snap.endpoints.is_some() && !snap.trust_bundle.is_empty());

    // A gateway routing to orders (kind and routes registered here, not claimed by the proxy).
    let (st, v) = h
        .admin(
            Method::POST,
            "/v1/services",
            Some(&h.admin),
            Some(json!({"name": "edge", "kind": "gateway", "routes": ["/orders=orders"]})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (gkey, gder) = csr(None);
    let gsvid = h
        .grpc(None)
        .await
        .certify(CertifyRequest {
            join_token: v["join_token"].as_str().unwrap().to_owned(),
            csr_der: gder,
        })
        .await
        .unwrap()
        .into_inner();
    let gchain: Vec<CertificateDer<'static>> = gsvid
        .cert_chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let mut gw_client =
        DistributionClient::new(channel_to(watch_url, &bundle, &gchain, &gkey).await);
    let mut gw_stream = gw_client
        .watch(WatchRequest {
            proxy_id: "edge-1".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let gsnap = next(&mut gw_stream).await;
    let mut gnames: Vec<String> = gsnap.policy.unwrap().files.into_keys().collect();
    gnames.sort_unstable();
    assert_eq!(gnames, ["mesh.yaml", "orders.yaml", "ratelimits.yaml"]);

    // A policy change arrives as the next update.
    let mut changed = files.clone();
    let orders = changed["orders.yaml"].as_str().unwrap().to_owned() + "\n# changed\n";
    changed.insert("orders.yaml".to_owned(), Value::String(orders));
    let t0 = std::time::Instant::now();
    let (st, v) = h
        .admin(
            Method::POST,
            "/v1/policy",
            Some(&h.admin),
            Some(json!({"files": changed})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let r2 = v["revision"].as_i64().unwrap();
    let u = next(&mut stream).await;
    eprintln!(
        "policy apply -> update on the watch stream: {:?}",
        t0.elapsed()
    );
    assert_eq!(
        (u.sequence, u.policy.as_ref().map(|p| p.revision)),
        (2, Some(r2))
    );
    assert!(
        u.api_keys.is_none() && u.revocations.is_empty(),
        "only what changed"
    );
    let gu = next(&mut gw_stream).await;
    assert_eq!(gu.policy.map(|p| p.revision), Some(r2), "the gateway too");

    // API keys travel as hashes.
    let (st, v) = h
        .admin(
            Method::POST,
            "/v1/apikeys",
            Some(&h.admin),
            Some(json!({"user": "alice", "roles": ["customer"], "claims": {"customer_id": "42"}})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let api_key = v["api_key"].as_str().unwrap().to_owned();
    assert!(api_key.starts_with("cak_"));
    // ...to gateways only: the sidecar's stream stays silent.
    let u = next(&mut gw_stream).await;
    let keys = u.api_keys.clone().unwrap_or_else(|| panic!("{u:?}")).keys;
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), stream.message())
            .await
            .is_err(),
        "a sidecar was sent API-key hashes"
    );
    assert_eq!(keys.len(), 1);
    assert_eq!(
        keys[0].key_hash,
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, api_key.as_bytes()).as_ref()
    );
    assert_eq!(
        (
            keys[0].user.as_str(),
            keys[0].roles.as_slice(),
            keys[0].claims["customer_id"].as_str()
        ),
        ("alice", &["customer".to_owned()][..], "42")
    );

    // A revocation reaches the watcher.
    let (other, _) = certified(h, "inventory").await;
    let (_, cert) = x509_parser::parse_x509_certificate(other[0].as_ref()).unwrap();
    let serial: String = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (st, _) = h
        .admin(
            Method::POST,
            &format!("/v1/certificates/{serial}/revoke"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let u = next(&mut stream).await;
    assert_eq!(
        u.revocations
            .iter()
            .map(|r| (r.kind.as_str(), r.subject.as_str()))
            .collect::<Vec<_>>(),
        [("certificate", serial.as_str())]
    );

    // The proxy acknowledges what it enforces; its address becomes an endpoint.
    client
        .report(ProxyReport {
            proxy_id: "orders-1".to_owned(),
            mode: "sidecar".to_owned(),
            address: "127.0.0.1:9999".to_owned(),
            revision: r2,
            cert_not_after: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    // Orders' endpoint goes to whoever routes to orders (the gateway), not to orders itself.
    let eps = loop {
        let u = next(&mut gw_stream).await;
        if let Some(e) = u.endpoints
            && !e.endpoints.is_empty()
        {
            break e.endpoints;
        }
    };
    assert_eq!(
        eps.iter()
            .map(|e| (e.service.as_str(), e.address.as_str()))
            .collect::<Vec<_>>(),
        [("orders", "127.0.0.1:9999")]
    );
    let (_, v) = h
        .admin(Method::GET, "/v1/proxies", Some(&h.admin), None)
        .await;
    assert_eq!(
        (
            v[0]["proxy_id"].as_str(),
            v[0]["revision"].as_i64(),
            v[0]["up_to_date"].as_bool()
        ),
        (Some("orders-1"), Some(r2), Some(true))
    );
    let e = client
        .report(ProxyReport {
            proxy_id: "orders-1".to_owned(),
            mode: "evil".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // Rollback makes r1's content current as a new revision.
    let (st, v) = h
        .admin(
            Method::POST,
            &format!("/v1/policy/rollback/{r1}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let r3 = v["revision"].as_i64().unwrap();
    let u = next(&mut stream).await;
    let p = u.policy.unwrap();
    let (_, hist) = h
        .admin(Method::GET, "/v1/policy/history", Some(&h.admin), None)
        .await;
    assert_eq!(
        hist.as_array()
            .unwrap()
            .iter()
            .map(|r| r["revision"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [r3, r2, r1]
    );
    assert_eq!(p.revision, r3);
    assert_eq!(p.content_hash, hist[2]["content_hash"].as_str().unwrap());
    assert_eq!(hist[0]["comment"], format!("rollback to {r1}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distribution_on_sqlite() {
    let h = start_td("demo.castellan", None).await;
    distribution_suite(&h, &h.running.url.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgres_push_every_change() {
    let admin_url = "postgres://postgres@127.0.0.1:5432/test";
    let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(admin_url).await else {
        if std::env::var_os("CI").is_some() {
            panic!("PostgreSQL at {admin_url} is required in CI");
        }
        eprintln!(
            "SKIPPED two_replicas_on_postgres_push_every_change: no PostgreSQL at {admin_url}"
        );
        return;
    };
    let db = format!(
        "castellan_replicas_{}_{}",
        std::process::id(),
        castellan_server::unix_now()
    );
    sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {db}").as_str())
        .await
        .unwrap();
    let url = format!("postgres://postgres@127.0.0.1:5432/{db}");
    let a = start_td("demo.castellan", Some(url.clone())).await;
    // Replica B: same database, same key-encryption key, its own data directory and port.
    let kek = std::fs::read_to_string(a._dir.path().join("data/kek")).unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir_b.path()).unwrap();
    let cfg_b = ServerConfig {
        data_dir: dir_b.path().to_owned(),
        database_url: Some(url),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..ServerConfig::default()
    };
    let b = Server::start(cfg_b, Some(kek)).await.unwrap();
    // Changes are made on A; the proxy watches B.
    distribution_suite(&a, &b.url.clone()).await;
    b.shutdown().await;
    a.running.shutdown().await;
    sqlx::Executor::execute(
        &mut conn,
        format!("DROP DATABASE {db} WITH (FORCE)").as_str(),
    )
    .await
    .unwrap();
}

/// Deny-rate alerts: over the threshold → one JSON POST to the webhook, retried after a failure,
/// not repeated within the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_rate_alert_posts_to_the_webhook_once_per_window() {
    use http_body_util::BodyExt as _;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // The receiver: answers 500 the first time (so the server retries), then 200.
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_addr = hook.local_addr().unwrap();
    let seen: Arc<std::sync::Mutex<Vec<Value>>> = Arc::default();
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = hook.accept().await.unwrap();
            let seen = seen2.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let mut s = seen.lock().unwrap();
                            s.push(serde_json::from_slice(&body).unwrap());
                            let status = if s.len() == 1 { 500 } else { 200 };
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    // An https receiver with a certificate of its own CA, given to the rule as ca_file.
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf_params.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let ca_file = dir.path().join("hook-ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let tls_hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_hook_addr = tls_hook.local_addr().unwrap();
    let tls_seen: Arc<std::sync::Mutex<Vec<Value>>> = Arc::default();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )
            .unwrap(),
    ));
    let tls_seen2 = tls_seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tls_hook.accept().await.unwrap();
            let (seen, acceptor) = (tls_seen2.clone(), acceptor.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            seen.lock()
                                .unwrap()
                                .push(serde_json::from_slice(&body).unwrap());
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::new()),
                            ))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let cfg = ServerConfig {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        alerts: vec![
            castellan_server::AlertRule {
                service: "orders".to_owned(),
                decision: "deny".to_owned(),
                over: 3,
                per: "1m".to_owned(),
                webhook: format!("http://{hook_addr}/hook"),
                ca_file: None,
            },
            castellan_server::AlertRule {
                service: "orders".to_owned(),
                decision: "deny".to_owned(),
                over: 3,
                per: "1m".to_owned(),
                webhook: format!("https://{tls_hook_addr}/hook"),
                ca_file: Some(ca_file),
            },
        ],
        ..ServerConfig::default()
    };
    // Plain http is accepted only to loopback.
    let mut remote = cfg.clone();
    remote.alerts[0].webhook = "http://alerts.example/hook".to_owned();
    assert!(remote.validate().is_err());
    let init = castellan_server::init(&cfg, "demo.castellan", None)
        .await
        .unwrap();
    let running = Server::start(cfg, None).await.unwrap();
    let h = Harness {
        _dir: dir,
        http: tls_client(&running.server.bundle(), None),
        running,
        admin: init.admin_token,
    };
    let (chain, key) = certified(&h, "gateway").await;
    let bundle = h.running.server.bundle();
    let mut audit = castellan_proto::v1::audit_client::AuditClient::new(
        channel_to(&h.running.url, &bundle, &chain, &key).await,
    );
    let mut head = castellan_audit::Head::default();
    let now_ms = castellan_server::unix_now() * 1000;
    let records: Vec<String> = (0..5)
        .map(|i| {
            let e = castellan_audit::Entry {
                time_ms: now_ms,
                decision_id: format!("d{i}"),
                destination: "orders".to_owned(),
                decision: "deny".to_owned(),
                status: 403,
                ..castellan_audit::Entry::default()
            };
            serde_json::to_string(&head.chain("gw-1", "e1", castellan_audit::Kind::Decision, e, 0))
                .unwrap()
        })
        .collect();
    let ack = audit
        .ship(castellan_proto::v1::AuditBatch {
            writer: "gw-1".to_owned(),
            epoch: "e1".to_owned(),
            records,
            checkpoints: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.stored_through, 5);
    let t0 = std::time::Instant::now();
    while seen.lock().unwrap().len() < 2 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(15),
            "no webhook call (or no retry)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let calls = seen.lock().unwrap().clone();
    assert_eq!(
        (
            calls[1]["service"].as_str(),
            calls[1]["decision"].as_str(),
            calls[1]["count"].as_i64()
        ),
        (Some("orders"), Some("deny"), Some(5))
    );
    assert_eq!(calls[0], calls[1], "the retry sends the same alert");
    // The https webhook, verified with its CA file, got the same alert.
    let t0 = std::time::Instant::now();
    while tls_seen.lock().unwrap().is_empty() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(15),
            "no https webhook call"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(tls_seen.lock().unwrap()[0]["count"], calls[1]["count"]);
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert_eq!(seen.lock().unwrap().len(), 2, "at most once per window");
    // /metrics needs a credential on the main listener.
    assert_eq!(
        h.http.get(h.url("/metrics")).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let m = h
        .http
        .get(h.url("/metrics"))
        .bearer_auth(&h.admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("castellan_server_alerts_fired_total"), "{m}");
}

/// Audit chains and registry rows belong to the mTLS identity that wrote them: identity B
/// naming A's proxy id and epoch writes only B's own chain and row; batches that do not continue
/// the stored head (a huge `seq`, a forged link, a replay, an old-format batch) are refused with
/// the positions named; the ack is the chain's own head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_and_reports_are_bound_to_the_callers_identity_and_verified_on_ingest() {
    use castellan_audit::{AuditRecord, Entry, Head, Kind};
    use castellan_proto::v1::audit_client::AuditClient;
    use castellan_proto::v1::distribution_client::DistributionClient;
    use castellan_proto::v1::{AuditBatch, ProxyReport};
    let h = start(None).await;
    let (a_chain, a_key) = certified(&h, "orders").await;
    let (b_chain, b_key) = certified(&h, "gateway").await;
    let bundle = h.running.server.bundle();
    let a_ch = channel_to(&h.running.url, &bundle, &a_chain, &a_key).await;
    let b_ch = channel_to(&h.running.url, &bundle, &b_chain, &b_key).await;
    let (mut a, mut b) = (
        AuditClient::new(a_ch.clone()),
        AuditClient::new(b_ch.clone()),
    );
    let rec = |head: &mut Head, i: u64| {
        let e = Entry {
            decision_id: format!("d{i}"),
            decision: "allow".to_owned(),
            status: 200,
            ..Entry::default()
        };
        serde_json::to_string(&head.chain("orders-1", "ep1", Kind::Decision, e, 0)).unwrap()
    };
    let batch = |records: Vec<String>| AuditBatch {
        writer: "orders-1".to_owned(),
        epoch: "ep1".to_owned(),
        records,
        checkpoints: Vec::new(),
    };

    // A stores records 1..3.
    let mut ha = Head::default();
    let a1: Vec<String> = (0..3).map(|i| rec(&mut ha, i)).collect();
    let ack = a.ship(batch(a1)).await.unwrap().into_inner();
    assert_eq!(ack.stored_through, 3);

    // B ships a self-consistent chain of 5 under A's proxy id and epoch: it lands in B's own
    // chain, and B's ack is B's head.
    let mut hb = Head::default();
    let forged: Vec<String> = (100..105).map(|i| rec(&mut hb, i)).collect();
    assert_eq!(
        b.ship(batch(forged))
            .await
            .unwrap()
            .into_inner()
            .stored_through,
        5
    );
    // B's attempt to pre-empt A's record 4 is a position error in B's chain.
    let mut pre = Head {
        seq: 3,
        hash: ha.hash.clone(),
    };
    let e = b.ship(batch(vec![rec(&mut pre, 200)])).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("expected record 6, received record 4"),
        "{}",
        e.message()
    );

    // A continues untouched: 4..6 stored, acked 6.
    let a2: Vec<String> = (3..6).map(|i| rec(&mut ha, i)).collect();
    assert_eq!(
        a.ship(batch(a2.clone()))
            .await
            .unwrap()
            .into_inner()
            .stored_through,
        6
    );

    // A huge seq is refused, naming the writer and both positions; nothing moves.
    let mut huge: AuditRecord = serde_json::from_str(&a2[0]).unwrap();
    huge.seq = u64::MAX / 2;
    huge.prev_hash.clone_from(&ha.hash);
    huge.hash = huge.compute_hash();
    let e = a
        .ship(batch(vec![serde_json::to_string(&huge).unwrap()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    let msg = e.message();
    assert!(
        msg.contains("orders-1 spiffe://example.org/svc/orders ep1")
            && msg.contains("expected record 7, received record 9223372036854775807"),
        "{msg}"
    );
    // A batch whose first prev_hash does not continue the head: refused.
    let mut unlinked = Head {
        seq: 6,
        hash: castellan_audit::GENESIS.to_owned(),
    };
    let e = a
        .ship(batch(vec![rec(&mut unlinked, 7)]))
        .await
        .unwrap_err();
    assert!(
        e.message().contains("does not link to the stored head"),
        "{}",
        e.message()
    );
    // A replay of stored records: refused, never "stored" as a no-op.
    let e = a.ship(batch(a2)).await.unwrap_err();
    assert!(
        e.message().contains("expected record 7, received record 4"),
        "{}",
        e.message()
    );
    // An empty batch asks for the head; the real writer keeps shipping.
    assert_eq!(
        a.ship(batch(vec![]))
            .await
            .unwrap()
            .into_inner()
            .stored_through,
        6
    );
    assert_eq!(
        a.ship(batch(vec![rec(&mut ha, 6)]))
            .await
            .unwrap()
            .into_inner()
            .stored_through,
        7
    );
    // A proxy of the previous release (no epoch): a clear refusal.
    let e = a
        .ship(AuditBatch {
            writer: "orders-1".to_owned(),
            epoch: String::new(),
            records: vec![],
            checkpoints: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("record format 1"), "{}", e.message());

    // Nobody but the control plane writes admin-action records or its chain.
    let e = a
        .ship(AuditBatch {
            writer: "castellan-server".to_owned(),
            epoch: "ep1".to_owned(),
            records: vec![],
            checkpoints: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let mut ha2 = Head {
        seq: 7,
        hash: ha.hash.clone(),
    };
    let admin_like = ha2.chain(
        "orders-1",
        "ep1",
        Kind::Admin,
        Entry {
            user: "initial admin".to_owned(),
            method: "policy.apply".to_owned(),
            ..Entry::default()
        },
        0,
    );
    let e = a
        .ship(batch(vec![serde_json::to_string(&admin_like).unwrap()]))
        .await
        .unwrap_err();
    assert!(e.message().contains("admin records"), "{}", e.message());

    // verify: two intact chains, each under its own identity.
    let (st, v) = h
        .admin(
            reqwest::Method::GET,
            "/v1/audit/verify",
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["ok"], true, "{v}");
    let chain = |who: &str| {
        v["writers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["identity"] == format!("spiffe://example.org/svc/{who}"))
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(
        (
            chain("orders")["records"].as_u64(),
            chain("orders")["proxy_id"].as_str()
        ),
        (Some(7), Some("orders-1"))
    );
    assert_eq!(chain("gateway")["records"].as_u64(), Some(5));

    // Report: B naming A's proxy id gets a row of its own; A's row is unchanged.
    let report = |id: &str, address: &str| ProxyReport {
        proxy_id: id.to_owned(),
        mode: "sidecar".to_owned(),
        address: address.to_owned(),
        revision: 0,
        cert_not_after: 0,
        ..Default::default()
    };
    let (mut da, mut db) = (DistributionClient::new(a_ch), DistributionClient::new(b_ch));
    da.report(report("orders-1", "127.0.0.1:2222"))
        .await
        .unwrap();
    db.report(report("orders-1", "127.0.0.1:1111"))
        .await
        .unwrap();
    let (_, proxies) = h
        .admin(reqwest::Method::GET, "/v1/proxies", Some(&h.admin), None)
        .await;
    let rows: Vec<(String, String)> = proxies
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["proxy_id"] == "orders-1")
        .map(|p| {
            (
                p["service"].as_str().unwrap().to_owned(),
                p["address"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        rows.contains(&("orders".to_owned(), "127.0.0.1:2222".to_owned())),
        "{proxies}"
    );
    assert!(
        rows.contains(&("gateway".to_owned(), "127.0.0.1:1111".to_owned())),
        "{proxies}"
    );
    // A stolen key cannot flood the registry: ids per identity are capped (default 256).
    for i in 1..256 {
        db.report(report(&format!("flood-{i}"), "")).await.unwrap();
    }
    let e = db.report(report("flood-256", "")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    // A known id still reports.
    db.report(report("flood-1", "")).await.unwrap();
    da.report(report("orders-2", "")).await.unwrap();
}

/// The listener bounds what unauthenticated clients can hold: 300 TLS connections that send
/// nothing are all closed by the idle timeout (2 s here) while the API keeps answering; a TCP
/// connection that never completes its handshake is dropped at the handshake timeout; past the
/// per-source cap new connections are closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_connection_caps_hold() {
    use tokio::io::AsyncReadExt as _;
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServerConfig {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        idle_timeout_secs: 2,
        handshake_timeout_secs: 2,
        max_connections_per_source: 320,
        metrics_listen: Some(metrics_addr),
        ..ServerConfig::default()
    };
    let h_admin = castellan_server::init(&cfg, TD, None)
        .await
        .unwrap()
        .admin_token;
    let running = Server::start(cfg, None).await.unwrap();
    let bundle = running.server.bundle();
    let mut roots = rustls::RootCertStore::empty();
    for c in &bundle {
        roots.add(c.clone()).unwrap();
    }
    let tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let connect = || {
        let (tls, addr) = (tls.clone(), running.addr);
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tokio_rustls::TlsConnector::from(tls)
                .connect(
                    rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                    tcp,
                )
                .await
        }
    };
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(connect().await.unwrap());
    }
    // A TCP connection that never starts TLS.
    let mut silent = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    // The API answers meanwhile (a fresh client each time: new connections).
    let http = tls_client(&bundle, None);
    for _ in 0..3 {
        let r = http
            .get(format!("{}/healthz", running.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // Past the per-source cap (320; 300 idle + the silent one + the client above are open):
    // new connections are closed at once.
    let mut refused = 0;
    let mut extra = Vec::new();
    for _ in 0..30 {
        match connect().await {
            Ok(c) => extra.push(c),
            Err(_) => refused += 1,
        }
    }
    assert!(refused > 0, "the per-source cap refused nothing");
    drop(extra);
    // Every idle connection is closed by the server (EOF or reset), within idle + grace.
    let t0 = std::time::Instant::now();
    for mut c in idle {
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(std::time::Duration::from_secs(20), c.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "an idle connection is still open after {:?}",
            t0.elapsed()
        );
    }
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(std::time::Duration::from_secs(20), silent.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "a connection without a handshake is still open"
    );
    // And the API still answers afterwards (a new client: the old one's pooled connection was
    // idle and is closed too).
    let http = tls_client(&bundle, None);
    let r = http
        .get(format!("{}/healthz", running.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m = http
        .get(format!("{}/metrics", running.url))
        .bearer_auth(&h_admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("castellan_server_connections_closed_total{reason=\"idle\"}"),
        "{m}"
    );
    assert!(
        m.contains("castellan_server_connections_refused_total"),
        "{m}"
    );
    // The separate metrics address serves /metrics (only) without a credential.
    let plain = reqwest::Client::new();
    let r = plain
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("castellan_server_"));
    let r = plain
        .get(format!("http://{metrics_addr}/v1/services"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// Whoever can write the database but does not hold the key-encryption key cannot mint an
/// admin credential or plant a CA: rows written past the API are refused. Admin credentials
/// are listed (never shown) and revoked through the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_past_the_api_are_refused_and_admin_tokens_revocable() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServerConfig {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..ServerConfig::default()
    };
    let init = castellan_server::init(&cfg, TD, None).await.unwrap();
    let running = Server::start(cfg.clone(), None).await.unwrap();
    let h = Harness {
        _dir: dir,
        http: tls_client(&running.server.bundle(), None),
        running,
        admin: init.admin_token,
    };
    let db = format!("sqlite://{}", cfg.data_dir.join("castellan.db").display());
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&db)
        .await
        .unwrap();

    // An admin credential inserted directly: no MAC, or a made-up one.
    let sha = |s: &str| {
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s.as_bytes())
            .as_ref()
            .to_vec()
    };
    for (token, mac) in [
        ("cadm_insider-without-mac", None),
        ("cadm_insider-with-a-guess", Some(vec![7u8; 32])),
    ] {
        sqlx::query("INSERT INTO admin_tokens (token_hash, name, role, created_at, mac) VALUES ($1, 'insider', 'admin', 0, $2)")
            .bind(sha(token))
            .bind(mac)
            .execute(&mut conn)
            .await
            .unwrap();
        let (st, _) = h
            .admin(reqwest::Method::GET, "/v1/services", Some(token), None)
            .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{token}");
    }
    // Copying the MAC of the real admin's row onto another hash does not help either.
    let (real_mac,): (Vec<u8>,) =
        sqlx::query_as("SELECT mac FROM admin_tokens WHERE name = 'initial admin'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    sqlx::query("INSERT INTO admin_tokens (token_hash, name, role, created_at, mac) VALUES ($1, 'initial admin', 'admin', 0, $2)")
        .bind(sha("cadm_insider-copied-mac"))
        .bind(real_mac)
        .execute(&mut conn)
        .await
        .unwrap();
    let (st, _) = h
        .admin(
            reqwest::Method::GET,
            "/v1/services",
            Some("cadm_insider-copied-mac"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);

    // A CA of the insider's own, inserted as the newest active CA: never trusted.
    let rogue = castellan_identity::CertificateAuthority::generate(
        TD,
        castellan_server::unix_now(),
        std::time::Duration::from_secs(86400),
    )
    .unwrap();
    let (legit_sealed,): (Vec<u8>,) =
        sqlx::query_as("SELECT sealed_key FROM ca_keys ORDER BY created_at LIMIT 1")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    for (id, sealed) in [("rogue-1", vec![1u8; 64]), ("rogue-2", legit_sealed)] {
        sqlx::query(
            "INSERT INTO ca_keys (id, cert_der, sealed_key, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(rogue.cert().to_vec())
        .bind(sealed)
        .bind(castellan_server::unix_now() + 1)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    // A token-signing key of the insider's own, as a recently retired key (published for the
    // tokens it may still have signed): never published.
    let rogue_signer = castellan_identity::SigningKey::generate().unwrap();
    let rogue_jwk = serde_json::to_string(&rogue_signer.jwk().unwrap()).unwrap();
    sqlx::query("INSERT INTO signing_keys (kid, alg, public_jwk, sealed_key, created_at, retired_at) VALUES ($1, 'ES256', $2, $3, 0, $4)")
        .bind(rogue_signer.kid())
        .bind(&rogue_jwk)
        .bind(vec![3u8; 64])
        .bind(castellan_server::unix_now())
        .execute(&mut conn)
        .await
        .unwrap();
    // Restarted on the same database: the rogue rows are refused, the real CA serves.
    let port = h.running.addr.port();
    let Harness {
        _dir,
        running,
        admin,
        ..
    } = h;
    running.shutdown().await;
    let mut cfg2 = cfg.clone();
    cfg2.listen = format!("127.0.0.1:{port}").parse().unwrap();
    let running = Server::start(cfg2, None).await.unwrap();
    let bundle = running.server.bundle();
    assert_eq!(bundle.len(), 1, "only the real CA is in the bundle");
    assert!(!bundle.contains(rogue.cert()));
    let h = Harness {
        _dir,
        http: tls_client(&bundle, None),
        running,
        admin,
    };
    let (st, _) = h
        .admin(reqwest::Method::GET, "/v1/services", Some(&h.admin), None)
        .await;
    assert_eq!(st, StatusCode::OK, "the real admin credential still works");
    let jwks = h
        .http
        .get(h.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !jwks.contains(rogue_signer.kid()),
        "rogue signing key published: {jwks}"
    );

    // Admin credentials: listed without secrets, revocable.
    let (st, v) = h
        .admin(
            reqwest::Method::POST,
            "/v1/admin-tokens",
            Some(&h.admin),
            Some(json!({"name": "auditor", "role": "viewer"})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let viewer = v["token"].as_str().unwrap().to_owned();
    let (st, list) = h
        .admin(
            reqwest::Method::GET,
            "/v1/admin-tokens",
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert!(!list.to_string().contains("cadm_"), "{list}");
    let id = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "auditor")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (st, _) = h
        .admin(reqwest::Method::GET, "/v1/services", Some(&viewer), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = h
        .admin(
            reqwest::Method::POST,
            &format!("/v1/admin-tokens/{id}/revoke"),
            Some(&viewer),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "a viewer cannot revoke");
    let (st, _) = h
        .admin(
            reqwest::Method::POST,
            &format!("/v1/admin-tokens/{id}/revoke"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = h
        .admin(reqwest::Method::GET, "/v1/services", Some(&viewer), None)
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "revoked");
    // Clearing the revocation in the database does not bring it back (the MAC covers it).
    sqlx::query("UPDATE admin_tokens SET revoked_at = NULL WHERE name = 'auditor'")
        .execute(&mut conn)
        .await
        .unwrap();
    let (st, _) = h
        .admin(reqwest::Method::GET, "/v1/services", Some(&viewer), None)
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "un-revoked in the database");
}

/// A webhook receiver on loopback answering 200; the JSON bodies it got.
async fn hook_receiver() -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<Value>>>) {
    use http_body_util::BodyExt as _;
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hook.local_addr().unwrap();
    let seen: Arc<std::sync::Mutex<Vec<Value>>> = Arc::default();
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = hook.accept().await.unwrap();
            let seen = seen2.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            seen.lock()
                                .unwrap()
                                .push(serde_json::from_slice(&body).unwrap());
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::new()),
                            ))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// Ships `entries` as the next records of chain (`writer`, `epoch`) continuing `head`.
async fn ship_entries(
    h_url: &str,
    bundle: &[CertificateDer<'static>],
    ident: &(Vec<CertificateDer<'static>>, KeyPair),
    writer: &str,
    head: &mut castellan_audit::Head,
    entries: Vec<castellan_audit::Entry>,
) {
    let mut audit = castellan_proto::v1::audit_client::AuditClient::new(
        channel_to(h_url, bundle, &ident.0, &ident.1).await,
    );
    let records = entries
        .into_iter()
        .map(|e| {
            serde_json::to_string(&head.chain(writer, "e1", castellan_audit::Kind::Decision, e, 0))
                .unwrap()
        })
        .collect();
    audit
        .ship(castellan_proto::v1::AuditBatch {
            writer: writer.to_owned(),
            epoch: "e1".to_owned(),
            records,
            checkpoints: Vec::new(),
        })
        .await
        .unwrap();
}

fn traffic_entry(i: usize, source: &str, user: &str, decision: &str) -> castellan_audit::Entry {
    castellan_audit::Entry {
        time_ms: castellan_server::unix_now() * 1000,
        decision_id: format!("{user}-{decision}-{i}"),
        source: source.to_owned(),
        user: user.to_owned(),
        destination: "orders".to_owned(),
        method: "GET".to_owned(),
        path: "/orders/1".to_owned(),
        decision: decision.to_owned(),
        status: if decision == "deny" { 403 } else { 200 },
        ..castellan_audit::Entry::default()
    }
}

/// Anomalies from the audit stream: a new caller→callee edge, a user first seen on a service
/// and a deny spike each reach the webhook once, with the decision ids that raised them —
/// also when the records arrive in several batches, and with two replicas on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomalies_reach_the_webhook_once() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let (hook, seen) = hook_receiver().await;
    let anomalies = castellan_server::AnomalyConfig {
        webhook: format!("http://{hook}/anomaly"),
        ca_file: None,
        deny_spike_over: 5,
        deny_spike_factor: 5,
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServerConfig {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        anomalies: Some(anomalies.clone()),
        ..ServerConfig::default()
    };
    let mut bad = cfg.clone();
    bad.anomalies.as_mut().unwrap().webhook = "http://alerts.example/x".to_owned();
    assert!(bad.validate().is_err());
    let init = castellan_server::init(&cfg, "demo.castellan", None)
        .await
        .unwrap();
    let running = Server::start(cfg, None).await.unwrap();
    let h = Harness {
        _dir: dir,
        http: tls_client(&running.server.bundle(), None),
        running,
        admin: init.admin_token,
    };
    let gw = "spiffe://demo.castellan/svc/gateway";
    let ident = certified(&h, "gateway").await;
    let bundle = h.running.server.bundle();
    let mut head = castellan_audit::Head::default();
    // Batch 1: alice through the gateway to orders (new edge, new user).
    let e: Vec<_> = (0..3)
        .map(|i| traffic_entry(i, gw, "alice", "allow"))
        .collect();
    ship_entries(&h.running.url, &bundle, &ident, "gw-1", &mut head, e).await;
    // Batch 2: the same edge again, and mallory denied 12 times (new user, spike per source
    // and per user: the floor is 5).
    let mut e: Vec<_> = (3..5)
        .map(|i| traffic_entry(i, gw, "alice", "allow"))
        .collect();
    e.extend((0..12).map(|i| traffic_entry(i, gw, "mallory", "deny")));
    ship_entries(&h.running.url, &bundle, &ident, "gw-1", &mut head, e).await;
    let want = 5; // edge, alice@orders, mallory@orders, spike by source, spike by user
    let t0 = std::time::Instant::now();
    while seen.lock().unwrap().len() < want {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "{:#?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let calls = seen.lock().unwrap().clone();
    let kinds = |k: &str| calls.iter().filter(|c| c["kind"] == k).collect::<Vec<_>>();
    assert_eq!(calls.len(), want, "{calls:#?}");
    let edge = kinds("new-edge");
    assert_eq!(edge.len(), 1);
    assert_eq!(edge[0]["source"], gw);
    assert_eq!(edge[0]["decision_ids"], json!(["alice-allow-0"]));
    assert_eq!(kinds("new-user-on-service").len(), 2);
    let spikes = kinds("deny-spike");
    assert_eq!(spikes.len(), 2, "{spikes:#?}");
    assert!(spikes.iter().any(|s| s["user"] == "mallory"));
    assert!(spikes.iter().any(|s| s["source"] == gw));
    assert!(
        spikes
            .iter()
            .all(|s| s["decision_ids"].as_array().unwrap().len() == 6)
    );

    // Two replicas on one PostgreSQL database: an edge seen by both alerts once.
    let admin_url = "postgres://postgres@127.0.0.1:5432/test";
    let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(admin_url).await else {
        assert!(
            std::env::var_os("CI").is_none(),
            "PostgreSQL at {admin_url} is required in CI"
        );
        eprintln!("SKIPPED the two-replica part: no PostgreSQL at {admin_url}");
        return;
    };
    let db = format!(
        "castellan_anomalies_{}_{}",
        std::process::id(),
        castellan_server::unix_now()
    );
    sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {db}").as_str())
        .await
        .unwrap();
    let (hook2, seen2) = hook_receiver().await;
    let url = format!("postgres://postgres@127.0.0.1:5432/{db}");
    let dir_a = tempfile::tempdir().unwrap();
    let cfg_a = ServerConfig {
        data_dir: dir_a.path().join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        database_url: Some(url.clone()),
        anomalies: Some(castellan_server::AnomalyConfig {
            webhook: format!("http://{hook2}/anomaly"),
            ..anomalies
        }),
        ..ServerConfig::default()
    };
    let init_a = castellan_server::init(&cfg_a, "demo.castellan", None)
        .await
        .unwrap();
    let a = Server::start(cfg_a.clone(), None).await.unwrap();
    let kek = std::fs::read_to_string(dir_a.path().join("data/kek")).unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let b = Server::start(
        ServerConfig {
            data_dir: dir_b.path().to_owned(),
            ..cfg_a
        },
        Some(kek),
    )
    .await
    .unwrap();
    let ha = Harness {
        _dir: dir_a,
        http: tls_client(&a.server.bundle(), None),
        running: a,
        admin: init_a.admin_token,
    };
    let ident_a = certified(&ha, "gateway").await;
    let bundle = ha.running.server.bundle();
    let (mut h1, mut h2) = (
        castellan_audit::Head::default(),
        castellan_audit::Head::default(),
    );
    let e = vec![traffic_entry(0, gw, "", "allow")];
    ship_entries(
        &ha.running.url,
        &bundle,
        &ident_a,
        "gw-a",
        &mut h1,
        e.clone(),
    )
    .await;
    ship_entries(&b.url, &bundle, &ident_a, "gw-b", &mut h2, e).await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let calls = seen2.lock().unwrap().clone();
    assert_eq!(
        calls.iter().filter(|c| c["kind"] == "new-edge").count(),
        1,
        "{calls:#?}"
    );
    b.shutdown().await;
    ha.running.shutdown().await;
    sqlx::Executor::execute(
        &mut conn,
        format!("DROP DATABASE {db} WITH (FORCE)").as_str(),
    )
    .await
    .unwrap();
}

/// The operator gives the dashboard its own listener and certificate: browsers trusting that
/// certificate reach the dashboard (and only it); a key file others can read is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_on_its_own_listener_with_the_operators_certificate() {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["dashboard.test".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = params.self_signed(&key).unwrap();
    let (cert_file, key_file) = (dir.path().join("dash.pem"), dir.path().join("dash-key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = ServerConfig {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        dashboard: Some(castellan_server::config::DashboardConfig {
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
        }),
        ..ServerConfig::default()
    };
    let init = castellan_server::init(&cfg, TD, None).await.unwrap();
    let err = Server::start(cfg.clone(), None).await.err().unwrap();
    assert!(err.to_string().contains("chmod 600"), "{err}");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let running = Server::start(cfg, None).await.unwrap();
    let browser = tls_client(&[cert.der().clone()], None);
    let base = format!("https://127.0.0.1:{port}");
    let r = browser
        .get(format!("{base}/dashboard/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("Sign in"));
    let r = browser
        .get(format!("{base}/dashboard/fleet"))
        .bearer_auth(&init.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Only the dashboard is served there.
    for path in ["/v1/proxies", "/oauth2/token", "/healthz"] {
        let r = browser
            .get(format!("{base}{path}"))
            .bearer_auth(&init.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
    }
    running.shutdown().await;
}

/// Whatever a workload writes into its records reaches the dashboard as inert text: markup in
/// users, paths and rules is escaped, an origin outside the known set is refused at ingest, and
/// a record dated in the future does not count in the rollups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_renders_hostile_records_inert() {
    let h = start_td("demo.castellan", None).await;
    let gw = "spiffe://demo.castellan/svc/gateway";
    let ident = certified(&h, "gateway").await;
    let bundle = h.running.server.bundle();
    let mut head = castellan_audit::Head::default();
    let mut hostile = traffic_entry(0, gw, "<script>alert(1)</script>", "deny");
    hostile.path = "/orders/\"><img src=//evil.example/x>".to_owned();
    hostile.rule = "r<b>x</b>".to_owned();
    let mut future = traffic_entry(1, gw, "mallory", "deny");
    future.time_ms = (castellan_server::unix_now() + 10 * 365 * 24 * 3600) * 1000;
    ship_entries(
        &h.running.url,
        &bundle,
        &ident,
        "gw-1",
        &mut head,
        vec![hostile, future],
    )
    .await;
    // An origin outside the known set is refused, naming the field.
    let mut audit = castellan_proto::v1::audit_client::AuditClient::new(
        channel_to(&h.running.url, &bundle, &ident.0, &ident.1).await,
    );
    let mut e = traffic_entry(2, gw, "alice", "allow");
    e.origin = "<meta http-equiv=refresh content=0;url=https://evil.example/>".to_owned();
    let mut h2 = head.clone();
    let rec = serde_json::to_string(&h2.chain("gw-1", "e1", castellan_audit::Kind::Decision, e, 0))
        .unwrap();
    let err = audit
        .ship(castellan_proto::v1::AuditBatch {
            writer: "gw-1".to_owned(),
            epoch: "e1".to_owned(),
            records: vec![rec],
            checkpoints: Vec::new(),
        })
        .await
        .err()
        .unwrap();
    assert!(err.message().contains("origin"), "{err:?}");
    for path in [
        "/dashboard",
        "/dashboard/decisions",
        "/dashboard/decisions?decision=deny",
        "/dashboard/anomalies",
    ] {
        let r = h
            .http
            .get(h.url(path))
            .bearer_auth(&h.admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let body = r.text().await.unwrap();
        for bad in [
            "<script>alert",
            "<img src=//evil",
            "<b>x</b>",
            "<meta http-equiv",
        ] {
            assert!(!body.contains(bad), "{path} renders {bad:?} as markup");
        }
        if path == "/dashboard" {
            // Only the record dated now counts in the last hour.
            assert!(body.contains("id=\"denied-hour\">1<"), "{body}");
        } else if path == "/dashboard/decisions" {
            assert!(
                body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
                "{body}"
            );
        }
    }
}
