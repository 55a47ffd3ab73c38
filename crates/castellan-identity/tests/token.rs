//! Token verification: a valid ES256 and EdDSA token pass; each attack of
//! shared/design/attack-classes.md "Tokens" is refused with its own error.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use castellan_identity::token::MAX_TOKEN_LEN;
use castellan_identity::{TokenError, TokenVerifier};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, EncodingKey};
use rcgen::{KeyPair, PKCS_ED25519};
use serde_json::{Value, json};

const ISS: &str = "https://castellan.example.org";
const AUD: &str = "orders";
const NOW: i64 = 1_795_000_000;

struct Keys {
    es: KeyPair,
    ed: KeyPair,
}

impl Keys {
    fn new() -> Keys {
        Keys {
            es: KeyPair::generate().unwrap(),
            ed: KeyPair::generate_for(&PKCS_ED25519).unwrap(),
        }
    }

    fn jwks(&self) -> JwkSet {
        let raw = self.es.public_key_raw();
        serde_json::from_value(json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "es-1", "alg": "ES256", "use": "sig",
             "x": B64.encode(&raw[1..33]), "y": B64.encode(&raw[33..65])},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed-1", "alg": "EdDSA", "use": "sig",
             "x": B64.encode(self.ed.public_key_raw())},
        ]}))
        .unwrap()
    }

    fn verifier(&self) -> TokenVerifier {
        TokenVerifier::new(ISS, AUD, &self.jwks()).unwrap()
    }

    /// Signs `header.claims` with the ES256 key (or EdDSA when the header says so).
    fn sign(&self, header: &Value, claims: &Value) -> String {
        let msg = format!(
            "{}.{}",
            B64.encode(serde_json::to_vec(header).unwrap()),
            B64.encode(serde_json::to_vec(claims).unwrap())
        );
        let (key, alg) = if header["alg"] == "EdDSA" {
            (
                EncodingKey::from_ed_der(&self.ed.serialize_der()),
                Algorithm::EdDSA,
            )
        } else {
            (
                EncodingKey::from_ec_der(&self.es.serialize_der()),
                Algorithm::ES256,
            )
        };
        let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &key, alg).unwrap();
        format!("{msg}.{sig}")
    }
}

fn header() -> Value {
    json!({"alg": "ES256", "typ": "JWT", "kid": "es-1"})
}

fn claims() -> Value {
    json!({"iss": ISS, "sub": "alice", "aud": AUD, "exp": NOW + 300, "iat": NOW, "nbf": NOW, "jti": "t1", "scope": "orders.read"})
}

fn with(mut v: Value, key: &str, val: Value) -> Value {
    v[key] = val;
    v
}

#[test]
fn valid_tokens_verify() {
    let k = Keys::new();
    let v = k.verifier();
    let t = v.verify(&k.sign(&header(), &claims()), NOW).unwrap();
    assert_eq!(t.subject(), Some("alice"));
    assert_eq!(t.kid, "es-1");
    let ed = json!({"alg": "EdDSA", "kid": "ed-1"});
    assert!(v.verify(&k.sign(&ed, &claims()), NOW).is_ok());
    // An audience list with just our audience is fine.
    assert!(
        v.verify(
            &k.sign(&header(), &with(claims(), "aud", json!([AUD]))),
            NOW
        )
        .is_ok()
    );
}

#[test]
fn alg_none_and_other_algorithms_are_refused() {
    let k = Keys::new();
    let v = k.verifier();
    let valid = k.sign(&header(), &claims());
    let parts: Vec<&str> = valid.split('.').collect();
    for alg in ["none", "None", "HS256", "RS256", "ES384", ""] {
        let h = B64.encode(serde_json::to_vec(&with(header(), "alg", json!(alg))).unwrap());
        for sig in ["", parts[2]] {
            let token = format!("{h}.{}.{sig}", parts[1]);
            let err = v.verify(&token, NOW).unwrap_err();
            assert!(
                matches!(err, TokenError::Algorithm(_) | TokenError::Malformed(_)),
                "{alg} {sig:?}: {err:?}"
            );
        }
    }
    let no_alg = B64.encode(br#"{"kid":"es-1"}"#);
    assert!(matches!(
        v.verify(&format!("{no_alg}.{}.{}", parts[1], parts[2]), NOW),
        Err(TokenError::Algorithm(_))
    ));
}

#[test]
fn hs256_keyed_with_the_public_key_is_refused() {
    use attacker::hmac;
    let k = Keys::new();
    let v = k.verifier();
    // The attacker signs with HMAC-SHA256, keyed with the public key bytes the JWKS publishes.
    let h = B64.encode(serde_json::to_vec(&json!({"alg": "HS256", "kid": "es-1"})).unwrap());
    let p = B64.encode(serde_json::to_vec(&claims()).unwrap());
    let sig = B64.encode(hmac(k.es.public_key_raw(), format!("{h}.{p}").as_bytes()));
    assert_eq!(
        v.verify(&format!("{h}.{p}.{sig}"), NOW),
        Err(TokenError::Algorithm("HS256".into()))
    );
}

#[test]
fn unknown_and_malicious_key_ids_are_refused() {
    let k = Keys::new();
    let v = k.verifier();
    for kid in [
        json!("nope"),
        json!("../../etc/passwd"),
        json!("es-1' OR '1'='1"),
        json!(""),
        json!(7),
        Value::Null,
    ] {
        let t = k.sign(&with(header(), "kid", kid.clone()), &claims());
        assert_eq!(v.verify(&t, NOW), Err(TokenError::UnknownKey), "{kid}");
    }
    let mut h = header();
    h.as_object_mut().unwrap().remove("kid");
    assert_eq!(
        v.verify(&k.sign(&h, &claims()), NOW),
        Err(TokenError::UnknownKey)
    );
    // An EdDSA header naming the ES256 key.
    let t = k.sign(&json!({"alg": "EdDSA", "kid": "es-1"}), &claims());
    assert!(matches!(
        v.verify(&t, NOW),
        Err(TokenError::KeyAlgorithmMismatch(..))
    ));
}

#[test]
fn key_carrying_headers_and_crit_are_refused() {
    let k = Keys::new();
    let v = k.verifier();
    let jwk = serde_json::to_value(&k.jwks().keys[0]).unwrap();
    for (name, val) in [
        ("jku", json!("https://evil.example/jwks.json")),
        ("x5u", json!("https://evil.example/cert.pem")),
        ("jwk", jwk),
        ("x5c", json!(["MIIB"])),
        ("crit", json!(["exp"])),
        ("crit", json!(["b64"])),
    ] {
        let t = k.sign(&with(header(), name, val), &claims());
        assert!(
            matches!(v.verify(&t, NOW), Err(TokenError::ForbiddenHeader(_))),
            "{name}"
        );
    }
}

#[test]
fn claims_of_the_wrong_type_are_refused_not_skipped() {
    let k = Keys::new();
    let v = k.verifier();
    for (name, val) in [
        ("exp", json!((NOW + 300).to_string())),
        ("exp", json!(1.5e12)),
        ("exp", Value::Null),
        ("nbf", json!(NOW.to_string())),
        ("iat", json!(true)),
        ("iss", json!([ISS])),
        ("aud", json!(7)),
        ("aud", json!([7])),
        ("sub", json!({"id": "alice"})),
    ] {
        let t = k.sign(&header(), &with(claims(), name, val.clone()));
        assert!(
            matches!(v.verify(&t, NOW), Err(TokenError::ClaimType(_))),
            "{name}: {val}"
        );
    }
    let mut c = claims();
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(
        v.verify(&k.sign(&header(), &c), NOW),
        Err(TokenError::ClaimType("exp"))
    );
}

#[test]
fn time_is_checked_with_a_30_second_leeway() {
    let k = Keys::new();
    let v = k.verifier();
    let t = k.sign(&header(), &with(claims(), "exp", json!(NOW)));
    assert!(v.verify(&t, NOW + 30).is_ok(), "at the leeway boundary");
    assert_eq!(v.verify(&t, NOW + 31), Err(TokenError::Expired));
    let t = k.sign(&header(), &with(claims(), "nbf", json!(NOW + 100)));
    assert!(v.verify(&t, NOW + 70).is_ok());
    assert_eq!(v.verify(&t, NOW + 69), Err(TokenError::NotYetValid));
}

#[test]
fn issuer_and_audience_are_checked() {
    let k = Keys::new();
    let v = k.verifier();
    let t = k.sign(
        &header(),
        &with(claims(), "iss", json!("https://evil.example")),
    );
    assert_eq!(v.verify(&t, NOW), Err(TokenError::WrongIssuer));
    let mut c = claims();
    c.as_object_mut().unwrap().remove("iss");
    assert_eq!(
        v.verify(&k.sign(&header(), &c), NOW),
        Err(TokenError::WrongIssuer)
    );
    let t = k.sign(&header(), &with(claims(), "aud", json!("payments")));
    assert_eq!(v.verify(&t, NOW), Err(TokenError::WrongAudience));
    let t = k.sign(&header(), &with(claims(), "aud", json!([])));
    assert_eq!(v.verify(&t, NOW), Err(TokenError::WrongAudience));
    // A token for several services could be replayed by one to another.
    let t = k.sign(&header(), &with(claims(), "aud", json!(["payments", AUD])));
    assert_eq!(v.verify(&t, NOW), Err(TokenError::MultipleAudiences));
}

#[test]
fn forged_and_broken_signatures_are_refused() {
    let k = Keys::new();
    let v = k.verifier();
    let valid = k.sign(&header(), &claims());
    let (msg, _) = valid.rsplit_once('.').unwrap();
    // All-zero ECDSA signature (CVE-2022-21449).
    let zero = format!("{msg}.{}", B64.encode([0u8; 64]));
    assert_eq!(v.verify(&zero, NOW), Err(TokenError::BadSignature));
    // Changed claims under the old signature.
    let sig = valid.rsplit_once('.').unwrap().1;
    let forged = format!(
        "{}.{}.{sig}",
        msg.split('.').next().unwrap(),
        B64.encode(serde_json::to_vec(&with(claims(), "sub", json!("admin"))).unwrap())
    );
    assert_eq!(v.verify(&forged, NOW), Err(TokenError::BadSignature));
    // Another key, same kid.
    let other = Keys::new();
    assert_eq!(
        v.verify(&other.sign(&header(), &claims()), NOW),
        Err(TokenError::BadSignature)
    );
}

#[test]
fn framing_tricks_are_refused() {
    let k = Keys::new();
    let v = k.verifier();
    let valid = k.sign(&header(), &claims());
    for bad in [
        format!("{valid}."),
        format!("{valid}.AAAA"),
        format!("{valid} "),
        format!("{valid}AA"),
        format!("{valid}=="),
        format!(" {valid}"),
        valid.replacen('.', "..", 1),
        valid.split('.').take(2).collect::<Vec<_>>().join("."),
        String::new(),
        "....".into(),
    ] {
        assert!(v.verify(&bad, NOW).is_err(), "{bad:?}");
    }
    let big = k.sign(
        &header(),
        &with(claims(), "pad", json!("x".repeat(MAX_TOKEN_LEN))),
    );
    assert_eq!(v.verify(&big, NOW), Err(TokenError::TooLarge));
    let not_object = format!(
        "{}.{}.{}",
        B64.encode(b"[1]"),
        B64.encode(b"{}"),
        B64.encode([0u8; 64])
    );
    assert_eq!(
        v.verify(&not_object, NOW),
        Err(TokenError::NotJson("header"))
    );
}

#[test]
fn key_sets_must_name_kid_and_alg() {
    let k = Keys::new();
    let mut jwks = serde_json::to_value(k.jwks()).unwrap();
    jwks["keys"][0].as_object_mut().unwrap().remove("alg");
    let jwks: JwkSet = serde_json::from_value(jwks).unwrap();
    assert!(matches!(
        TokenVerifier::new(ISS, AUD, &jwks),
        Err(TokenError::Keys(_))
    ));
    assert!(matches!(
        TokenVerifier::new(ISS, AUD, &JwkSet { keys: vec![] }),
        Err(TokenError::Keys(_))
    ));
}

/// The attacker's HMAC-SHA256 for the key-confusion attack.
mod attacker {
    pub fn hmac(key: &[u8], msg: &[u8]) -> Vec<u8> {
        let tag = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key),
            msg,
        );
        tag.as_ref().to_vec()
    }
}
