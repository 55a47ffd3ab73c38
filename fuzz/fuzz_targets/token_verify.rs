//! Fuzzes token verification with arbitrary token text: never panics, never accepts (the fuzzer
//! cannot forge an ES256 signature, so any acceptance is a bug).
#![no_main]

use castellan_identity::TokenVerifier;
use jsonwebtoken::jwk::JwkSet;
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

static VERIFIER: LazyLock<TokenVerifier> = LazyLock::new(|| {
    // A fixed P-256 public key (any valid point will do: nobody has its private key here).
    let jwks: JwkSet = serde_json::from_str(
        r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","alg":"ES256",
        "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    TokenVerifier::new("https://issuer.example", "aud", &jwks).unwrap_or_else(|e| panic!("{e}"))
});

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else { return };
    assert!(VERIFIER.verify(token, 1_795_000_000).is_err());
});
