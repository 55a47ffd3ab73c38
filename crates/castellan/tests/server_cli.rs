//! `castellan server` and the admin commands run as an operator runs them, with a real Python
//! OAuth2 client (authlib, PyJWT's PyJWKClient) against the running binary, and the server's
//! debug log searched afterwards for every secret that went through it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_castellan"));
    c.env_remove("CASTELLAN_KEK")
        .env_remove("CASTELLAN_SERVER")
        .env_remove("CASTELLAN_TOKEN");
    c
}

fn run(c: &mut Command) -> Output {
    c.output().unwrap()
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python_has(modules: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn operator_flow_python_client_and_no_secret_in_debug_log() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();

    // init prints the first admin credential once; bad input exits 2 with a message.
    let out = run(bin().args([
        "server",
        "init",
        "--trust-domain",
        "Bad_Domain",
        "--data-dir",
        d,
    ]));
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let init: Value = serde_json::from_str(&ok(&run(bin().args([
        "server",
        "init",
        "--trust-domain",
        "demo.castellan",
        "--data-dir",
        d,
        "-o",
        "json",
    ]))))
    .unwrap();
    let admin = init["admin_token"].as_str().unwrap().to_owned();
    let out = run(bin().args([
        "server",
        "init",
        "--trust-domain",
        "demo.castellan",
        "--data-dir",
        d,
    ]));
    assert_eq!(out.status.code(), Some(2));

    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let server = Killed(
        bin()
            .args(["server", "run", "--data-dir", d, "--listen", "127.0.0.1:0"])
            .env("CASTELLAN_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let endpoint = data.join("server.json");
    let t0 = Instant::now();
    while !endpoint.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "server did not start: {}",
            std::fs::read_to_string(&log_path).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ep: Value = serde_json::from_str(&std::fs::read_to_string(&endpoint).unwrap()).unwrap();
    let url = ep["url"].as_str().unwrap().to_owned();
    let bundle = ep["ca_bundle"].as_str().unwrap().to_owned();
    let admin_cmd = |args: &[&str], token: &str| -> Output {
        run(bin()
            .args(args)
            .args(["-o", "json"])
            .env("CASTELLAN_SERVER", &url)
            .env("CASTELLAN_TOKEN", token)
            .env("CASTELLAN_CA_BUNDLE", &bundle))
    };

    let svc: Value =
        serde_json::from_str(&ok(&admin_cmd(&["service", "add", "orders"], &admin))).unwrap();
    let join = svc["join_token"].as_str().unwrap().to_owned();
    assert!(join.starts_with("cjt_"));
    assert_eq!(svc["spiffe_id"], "spiffe://demo.castellan/svc/orders");
    let cl: Value = serde_json::from_str(&ok(&admin_cmd(
        &[
            "client",
            "add",
            "billing",
            "--scopes",
            "orders.read,orders.write",
            "--audiences",
            "billing,inventory",
        ],
        &admin,
    )))
    .unwrap();
    let secret = cl["client_secret"].as_str().unwrap().to_owned();
    let op: Value = serde_json::from_str(&ok(&admin_cmd(
        &["operator", "add", "auditor", "--role", "viewer"],
        &admin,
    )))
    .unwrap();
    let viewer = op["token"].as_str().unwrap().to_owned();
    ok(&admin_cmd(&["service", "list"], &viewer));
    let out = admin_cmd(&["service", "disable", "orders"], &viewer);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = admin_cmd(&["service", "list"], "cadm_not-a-real-credential");
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    let rotated: Value =
        serde_json::from_str(&ok(&admin_cmd(&["keys", "rotate"], &admin))).unwrap();
    assert_eq!(rotated["published"], 2);
    let ca: Value = serde_json::from_str(&ok(&admin_cmd(&["ca", "rotate"], &admin))).unwrap();
    assert_eq!(ca["bundle_size"], 2);
    ok(&admin_cmd(&["service", "disable", "orders"], &admin));
    let certs: Value =
        serde_json::from_str(&ok(&admin_cmd(&["cert", "list", "orders"], &viewer))).unwrap();
    assert_eq!(certs, Value::Array(vec![]));

    // A real OAuth2 client.
    let mut secrets = vec![admin.clone(), viewer.clone(), join.clone(), secret.clone()];
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/oauth_client.py");
    if python_has("jwt, authlib, requests, cryptography") {
        let out = run(Command::new("python3")
            .arg(&script)
            .env("CASTELLAN_URL", &url)
            .env("CASTELLAN_CA_BUNDLE", &bundle)
            .env("CLIENT_ID", "billing")
            .env("CLIENT_SECRET", &secret)
            .env("AUDIENCE", "demo.castellan"));
        let tokens: Value = serde_json::from_str(ok(&out).trim()).unwrap();
        for t in tokens.as_object().unwrap().values() {
            secrets.push(t.as_str().unwrap().to_owned());
        }
    } else if std::env::var_os("CI").is_some() {
        panic!(
            "CI needs python3 with PyJWT, authlib, requests, cryptography (pip install pyjwt authlib requests cryptography)"
        );
    } else {
        eprintln!("SKIPPED python OAuth2 client: pip install pyjwt authlib requests cryptography");
    }

    // Nothing secret in the debug log — neither credentials nor tokens nor the KEK.
    drop(server);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.lines().count() > 20 && log.contains("\"DEBUG\""),
        "debug logging was not on:\n{log}"
    );
    let kek = std::fs::read_to_string(data.join("kek")).unwrap();
    secrets.push(kek.trim().to_owned());
    for s in &secrets {
        // Any 16-character window of a secret is enough to count as a leak.
        let probe = &s[s.len() - 16..];
        assert!(
            !log.contains(probe),
            "secret ending {probe:?} found in the server log"
        );
    }
    for prefix in ["cadm_", "cjt_", "ccs_", "eyJ"] {
        assert!(!log.contains(prefix), "{prefix}… found in the server log");
    }
}
