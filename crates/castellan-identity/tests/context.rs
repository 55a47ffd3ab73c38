//! User-context tokens: a gateway's token verifies at a sidecar, and every forgery is refused.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use castellan_identity::{
    CertificateAuthority, ContextError, ContextSigner, SpiffeId, SvidValidator, TrustBundle,
    verify_context,
};
use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::CertificateDer;
use serde_json::{Map, json};
use std::time::Duration;

const TD: &str = "demo.castellan";
const NOW: i64 = 1_800_000_000;

struct Svid {
    chain: Vec<CertificateDer<'static>>,
    key: KeyPair,
    serial: Vec<u8>,
}

fn svid(ca: &CertificateAuthority, name: &str) -> Svid {
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let issued = ca
        .issue_svid(
            &csr,
            &SpiffeId::for_service(TD, name).unwrap(),
            NOW - 10,
            Duration::from_secs(3600),
        )
        .unwrap();
    Svid {
        chain: vec![issued.cert],
        key,
        serial: issued.serial,
    }
}

fn signer(s: &Svid, name: &str) -> ContextSigner {
    ContextSigner::new(
        SpiffeId::for_service(TD, name).unwrap(),
        &s.chain,
        &s.key.serialize_der(),
    )
    .unwrap()
}

/// The audience of the tokens here: the orders service, which the gateway calls.
const ORDERS: &str = "spiffe://demo.castellan/svc/orders";

fn claims() -> Map<String, serde_json::Value> {
    let mut m = Map::new();
    m.insert("customer_id".to_owned(), json!("42"));
    m
}

fn reencode(
    token: &str,
    header: Option<serde_json::Value>,
    body: Option<serde_json::Value>,
) -> String {
    let p: Vec<&str> = token.split('.').collect();
    let h = header.map_or(p[0].to_owned(), |h| URL_SAFE_NO_PAD.encode(h.to_string()));
    let b = body.map_or(p[1].to_owned(), |b| URL_SAFE_NO_PAD.encode(b.to_string()));
    format!("{h}.{b}.{}", p[2])
}

fn decode(seg: &str) -> serde_json::Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(seg).unwrap()).unwrap()
}

#[test]
fn gateway_context_verifies_and_forgeries_do_not() {
    let ca = CertificateAuthority::generate(TD, NOW - 100, Duration::from_secs(86400)).unwrap();
    let gw = svid(&ca, "gateway");
    let validator = SvidValidator::new(TrustBundle::new(TD, vec![ca.cert().clone()]).unwrap());
    let tok = signer(&gw, "gateway")
        .mint(
            ORDERS,
            "alice",
            &["customer".to_owned()],
            &claims(),
            "req-1",
            NOW,
            60,
        )
        .unwrap();
    let ctx = verify_context(&tok, &validator, TD, NOW).unwrap();
    assert_eq!(
        (ctx.signer.as_str(), ctx.sub.as_str(), ctx.txn.as_str()),
        ("spiffe://demo.castellan/svc/gateway", "alice", "req-1")
    );
    assert_eq!(
        (ctx.roles.as_slice(), ctx.claims["customer_id"].as_str()),
        (&["customer".to_owned()][..], Some("42"))
    );

    // Altered claims (roles raised): signature fails.
    let mut body = decode(tok.split('.').nth(1).unwrap());
    body["roles"] = json!(["admin"]);
    assert_eq!(
        verify_context(&reencode(&tok, None, Some(body)), &validator, TD, NOW),
        Err(ContextError::BadSignature)
    );
    // Signed by another key while presenting the gateway's certificate.
    let orders = svid(&ca, "orders");
    let forged = ContextSigner::new(
        SpiffeId::for_service(TD, "gateway").unwrap(),
        &gw.chain,
        &orders.key.serialize_der(),
    )
    .unwrap()
    .mint(ORDERS, "alice", &[], &claims(), "r", NOW, 60)
    .unwrap();
    assert_eq!(
        verify_context(&forged, &validator, TD, NOW),
        Err(ContextError::BadSignature)
    );
    // A chain from another CA.
    let other_ca =
        CertificateAuthority::generate(TD, NOW - 100, Duration::from_secs(86400)).unwrap();
    let rogue = svid(&other_ca, "gateway");
    let t = signer(&rogue, "gateway")
        .mint(ORDERS, "alice", &[], &claims(), "r", NOW, 60)
        .unwrap();
    assert!(matches!(
        verify_context(&t, &validator, TD, NOW),
        Err(ContextError::Signer(_))
    ));
    // A revoked signer.
    let mut revoked = validator.clone();
    revoked.revoke(&gw.serial);
    assert!(matches!(
        verify_context(&tok, &revoked, TD, NOW),
        Err(ContextError::Signer(_))
    ));
    // iss naming another workload than the signer.
    let mut body = decode(tok.split('.').nth(1).unwrap());
    body["iss"] = json!("spiffe://demo.castellan/svc/orders");
    let t = reencode(&tok, None, Some(body));
    assert!(verify_context(&t, &validator, TD, NOW).is_err());
    // Time: expired beyond leeway, issued in the future, lifetime over 5 min.
    assert_eq!(
        verify_context(&tok, &validator, TD, NOW + 60 + 31),
        Err(ContextError::Time)
    );
    assert!(verify_context(&tok, &validator, TD, NOW + 60 + 29).is_ok());
    let future = signer(&gw, "gateway")
        .mint(ORDERS, "alice", &[], &claims(), "r", NOW + 120, 60)
        .unwrap();
    assert_eq!(
        verify_context(&future, &validator, TD, NOW),
        Err(ContextError::Time)
    );
    // Wrong audience: another trust domain, or not a workload at all.
    assert_eq!(
        verify_context(&tok, &validator, "other.org", NOW),
        Err(ContextError::Claim("aud"))
    );
    let bare = signer(&gw, "gateway")
        .mint(TD, "alice", &[], &claims(), "r", NOW, 60)
        .unwrap();
    assert_eq!(
        verify_context(&bare, &validator, TD, NOW),
        Err(ContextError::Claim("aud"))
    );
    // Sender constraint: the signer calling the audience (direct), the audience calling on
    // (one delegation, act = [orders]); anyone else is a replay.
    let id = |n: &str| SpiffeId::for_service(TD, n).unwrap();
    assert_eq!(ctx.presented_by(&id("gateway"), &id("orders")), Ok(vec![]));
    assert_eq!(
        ctx.presented_by(&id("orders"), &id("inventory")),
        Ok(vec![ORDERS.to_owned()])
    );
    for (presenter, me) in [
        ("gateway", "payments"),   // the signer replaying it at another service
        ("inventory", "payments"), // a second hop
        ("inventory", "orders"),   // anyone else, even to the audience
        ("orders", "orders"),      // the audience to itself
    ] {
        assert!(
            matches!(
                ctx.presented_by(&id(presenter), &id(me)),
                Err(ContextError::Presenter { .. })
            ),
            "{presenter} → {me}"
        );
    }
    // Header tricks: jku/jwk/x5u/kid/crit, alg none, HS256, wrong typ, no x5c.
    let h = decode(tok.split('.').next().unwrap());
    for (k, v) in [
        ("jku", json!("https://evil/jwks")),
        ("jwk", json!({})),
        ("x5u", json!("https://evil")),
        ("crit", json!(["exp"])),
        ("kid", json!("../../k")),
    ] {
        let mut hh = h.clone();
        hh[k] = v;
        assert!(
            matches!(
                verify_context(&reencode(&tok, Some(hh), None), &validator, TD, NOW),
                Err(ContextError::Header(_))
            ),
            "{k}"
        );
    }
    for (k, v) in [
        ("alg", json!("none")),
        ("alg", json!("HS256")),
        ("typ", json!("JWT")),
    ] {
        let mut hh = h.clone();
        hh[k] = v.clone();
        assert!(
            matches!(
                verify_context(&reencode(&tok, Some(hh), None), &validator, TD, NOW),
                Err(ContextError::Header(_))
            ),
            "{k}={v}"
        );
    }
    let mut hh = h.clone();
    hh.as_object_mut().unwrap().remove("x5c");
    assert!(matches!(
        verify_context(&reencode(&tok, Some(hh), None), &validator, TD, NOW),
        Err(ContextError::Header(_))
    ));
    // Size and shape.
    assert_eq!(
        verify_context(&"a".repeat(9000), &validator, TD, NOW),
        Err(ContextError::TooLarge)
    );
    assert!(matches!(
        verify_context(&format!("{tok}.x"), &validator, TD, NOW),
        Err(ContextError::Malformed(_))
    ));
    let (h64, rest) = tok.split_once('.').unwrap();
    let (p64, _) = rest.split_once('.').unwrap();
    let zero = format!("{h64}.{p64}.{}", URL_SAFE_NO_PAD.encode([0u8; 64]));
    assert_eq!(
        verify_context(&zero, &validator, TD, NOW),
        Err(ContextError::BadSignature)
    );
}
