//! The `castellan policy` commands run as a user runs them: exit codes, output formats, files.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn castellan(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_castellan"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn demo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/demo/policies")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn demo_policies_pass_their_tests_and_write_junit() {
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("junit.xml");
    let out = castellan(
        &[
            "policy",
            "test",
            demo_dir().to_str().unwrap(),
            "--junit",
            junit.to_str().unwrap(),
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains(" passed, 0 failed"));
    let xml = std::fs::read_to_string(junit).unwrap();
    assert!(xml.contains("<testsuites") && xml.contains("failures=\"0\""));
    assert!(xml.contains("attack: /%2Fadmin/x (encoded slash) as alice"));
}

/// `castellan policy eval` on the demo policies with `input` on stdin.
fn eval_demo(input: &str) -> Output {
    let dir = demo_dir();
    castellan(
        &[
            "policy",
            "eval",
            "--policy",
            dir.to_str().unwrap(),
            "--input",
            "-",
        ],
        Some(input),
    )
}

#[test]
fn eval_prints_the_decision_json() {
    let input = r#"{"source": {"service": "gateway"},
      "user": {"sub": "u-42", "roles": ["customer"], "claims": {"customer_id": "42"}},
      "destination": {"service": "orders"},
      "request": {"method": "GET", "path": "/orders/42?x=1", "host": "orders", "headers": {}}}"#;
    let out = eval_demo(input);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"decision": "allow", "rule": "orders-api/customers-read-own-orders",
                           "mode": "enforce", "reason": "matched-allow"})
    );
    let malformed = input.replace("/orders/42?x=1", "/orders/%2e%2e/%2e%2e/x");
    let out = eval_demo(&malformed);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["reason"], "malformed-request");
    assert_eq!(v["rule"], serde_json::Value::Null);
    // Input that is not a decision input is an error naming where, exit 2.
    let out = eval_demo("{\"destination\": 1}");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("-:1:"), "{}", text(&out.stderr));
}

#[test]
fn failing_test_exits_1_and_names_test_expected_got_and_rule() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["orders.yaml", "mesh.yaml"] {
        std::fs::copy(demo_dir().join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("x_test.yaml"),
        r#"kind: PolicyTest
tests:
  - name: wrong expectation
    input: {"source": {"service": "gateway"}, "user": {"roles": ["admin"]}, "destination": {"service": "orders"}, "request": {"method": "GET", "path": "/orders/1"}}
    expect: deny
"#,
    )
    .unwrap();
    let out = castellan(&["policy", "test", dir.path().to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    let s = text(&out.stdout);
    assert!(s.contains("FAIL") && s.contains("wrong expectation"), "{s}");
    assert!(s.contains("expected deny, got allow"), "{s}");
    assert!(s.contains("orders-api/admins-read-any-order"), "{s}");
    assert!(s.contains("0 passed, 1 failed"), "{s}");
    let out = castellan(
        &["-o", "json", "policy", "test", dir.path().to_str().unwrap()],
        None,
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["failed"], 1);
}

#[test]
fn invalid_policies_exit_2_with_every_error_located() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: castellan/v1\nkind: AccessPolicy\nmetadata: {name: b}\nspec:\n  service: orders\n  rules:\n    - name: r\n      effect: allow\n      to: {paths: [\"/a/{x\"]}\n      when: \"1 +\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("bad_test.yaml"),
        "kind: PolicyTest\ntests:\n  - {name: t, expect: perhaps}\n",
    )
    .unwrap();
    let path = dir.path().join("bad.yaml").display().to_string();
    for cmd in ["check", "test"] {
        let out = castellan(&["policy", cmd, dir.path().to_str().unwrap()], None);
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        let err = text(&out.stderr);
        assert!(err.contains(&format!("{path}:9:20: to.paths")), "{err}");
        assert!(
            err.contains(&format!("{path}:10:13: invalid CEL condition")),
            "{err}"
        );
        assert!(
            err.contains("bad_test.yaml:3:5: test is missing required field \"input\""),
            "{err}"
        );
        assert!(
            err.contains("bad_test.yaml:3:23: expect must be allow or deny"),
            "{err}"
        );
    }
    let out = castellan(
        &[
            "-o",
            "json",
            "policy",
            "check",
            dir.path().to_str().unwrap(),
        ],
        None,
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["errors"].as_array().unwrap().len(), 4);
}

#[test]
fn a_directory_without_tests_is_an_error_not_a_pass() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        demo_dir().join("orders.yaml"),
        dir.path().join("orders.yaml"),
    )
    .unwrap();
    let out = castellan(&["policy", "test", dir.path().to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(2));
    let out = castellan(&["policy", "check", dir.path().to_str().unwrap()], None);
    assert!(out.status.success());
}

/// The admin credential is never sent in clear: an `http://` control-plane URL is refused
/// before any connection is made.
#[test]
fn the_admin_token_is_never_sent_over_plain_http() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let out = castellan(
        &[
            "service",
            "list",
            "--server",
            &url,
            "--token",
            "cadm_secret",
        ],
        None,
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("served over TLS only"), "{err}");
    assert!(
        listener.accept().is_err(),
        "the CLI connected to the plain-http server"
    );
}
