//! Issued tokens verify with our verifier and with PyJWT (a real third-party client); keys
//! rotate with old public keys kept in the JWKS.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use castellan_identity::{SigningKey, TokenError, TokenVerifier, issue_token, jwks};
use serde_json::{Map, json};
use std::process::Command;

const ISS: &str = "https://castellan.example.org";
const NOW: i64 = 1_795_000_000;

#[test]
fn issued_tokens_verify_and_carry_the_claims() {
    let key = SigningKey::generate().unwrap();
    let mut extra = Map::new();
    extra.insert("scope".into(), json!("orders.read"));
    extra.insert("exp".into(), json!(9_999_999_999i64)); // cannot override the lifetime
    let token = issue_token(&key, ISS, "billing", "orders", NOW, 300, &extra).unwrap();
    let v = TokenVerifier::new(ISS, "orders", &jwks(&[&key]).unwrap()).unwrap();
    let t = v.verify(&token, NOW + 10).unwrap();
    assert_eq!(t.subject(), Some("billing"));
    assert_eq!(t.claims["scope"], "orders.read");
    assert_eq!(t.claims["exp"], NOW + 300);
    assert_eq!(t.kid, key.kid());
    assert_eq!(v.verify(&token, NOW + 331), Err(TokenError::Expired));
    let other_aud = TokenVerifier::new(ISS, "payments", &jwks(&[&key]).unwrap()).unwrap();
    assert_eq!(
        other_aud.verify(&token, NOW),
        Err(TokenError::WrongAudience)
    );
}

#[test]
fn rotated_keys_keep_old_tokens_valid_while_published() {
    let old = SigningKey::generate().unwrap();
    let old_token = issue_token(&old, ISS, "a", "orders", NOW, 300, &Map::new()).unwrap();
    // Reload from storage: same kid, same key.
    let old = SigningKey::from_pkcs8(old.kid(), &old.pkcs8()).unwrap();
    let new = SigningKey::generate().unwrap();
    assert_ne!(old.kid(), new.kid());
    let new_token = issue_token(&new, ISS, "a", "orders", NOW, 300, &Map::new()).unwrap();
    let both = TokenVerifier::new(ISS, "orders", &jwks(&[&old, &new]).unwrap()).unwrap();
    assert!(both.verify(&old_token, NOW).is_ok());
    assert!(both.verify(&new_token, NOW).is_ok());
    let only_new = TokenVerifier::new(ISS, "orders", &jwks(&[&new]).unwrap()).unwrap();
    assert_eq!(
        only_new.verify(&old_token, NOW),
        Err(TokenError::UnknownKey)
    );
}

#[test]
fn pyjwt_verifies_our_tokens_with_our_jwks() {
    let probe = Command::new("python3")
        .args(["-c", "import jwt, cryptography"])
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install PyJWT and cryptography (.ci/run)"
        );
        eprintln!(
            "SKIPPED pyjwt_verifies_our_tokens_with_our_jwks: python3 with PyJWT and cryptography not found"
        );
        return;
    }
    let key = SigningKey::generate().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let token = issue_token(&key, ISS, "billing", "orders", now, 300, &Map::new()).unwrap();
    let set = serde_json::to_string(&jwks(&[&key]).unwrap()).unwrap();
    let script = r#"
import json, sys, jwt
token, jwks = sys.argv[1], json.loads(sys.argv[2])
key = jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(token)["kid"]]
claims = jwt.decode(token, key=key.key, algorithms=["ES256"], audience="orders", issuer=sys.argv[3])
print(claims["sub"])
"#;
    let out = Command::new("python3")
        .args(["-c", script, &token, &set, ISS])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "billing");
}
