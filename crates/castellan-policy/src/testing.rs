//! Policy tests (`*_test.yaml`, `kind: PolicyTest`): parsing, running, and JUnit XML.

use crate::engine::PolicySet;
use crate::model::{API_VERSION, Effect};
use crate::parse::{Checker, Diagnostic};
use crate::request::{Decision, Reason, Request};
use crate::yaml::{Pos, Value, parse_documents};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

/// One test case.
#[derive(Debug, Clone)]
pub struct TestCase {
    /// The file it is in.
    pub file: Arc<str>,
    /// Where.
    pub pos: Pos,
    /// Its name.
    pub name: String,
    /// The decision input.
    pub input: Request,
    /// The expected decision.
    pub expect: Effect,
    /// The expected deciding rule: `Some(None)` expects no rule.
    pub rule: Option<Option<String>>,
    /// The expected reason.
    pub reason: Option<Reason>,
}

/// Parses a test file, recording diagnostics; cases with errors are left out.
pub fn parse_test_file(file: Arc<str>, source: &str, diags: &mut Vec<Diagnostic>) -> Vec<TestCase> {
    let mut ck = Checker::new(file.clone(), diags);
    let mut out = Vec::new();
    let docs = match parse_documents(source) {
        Ok(d) => d,
        Err(e) => {
            ck.error(e.pos, format!("invalid YAML: {}", e.message));
            return out;
        }
    };
    let mut seen: HashMap<String, Pos> = HashMap::new();
    for doc in &docs {
        if doc.value == Value::Null {
            continue;
        }
        let Some(f) = ck.fields(
            doc,
            "document",
            &["apiVersion", "kind", "metadata", "tests"],
        ) else {
            continue;
        };
        if let Some(n) = f.get("apiVersion")
            && let Some(v) = ck.string(n, "apiVersion")
            && v != API_VERSION
        {
            ck.error(
                n.pos,
                format!("unsupported apiVersion {v:?} (expected {API_VERSION:?})"),
            );
        }
        match ck.required_str(&f, doc, "kind", "document") {
            Some(("PolicyTest", _)) => {}
            Some((other, pos)) => {
                ck.error(
                    pos,
                    format!("unknown kind {other:?} in a test file (expected PolicyTest)"),
                );
                continue;
            }
            None => continue,
        }
        let Some(tests) = f.get("tests") else {
            ck.error(doc.pos, "document is missing required field \"tests\"");
            continue;
        };
        let Value::Seq(items) = &tests.value else {
            ck.error(tests.pos, "tests must be a list");
            continue;
        };
        for item in items {
            let Some(tf) = ck.fields(
                item,
                "test",
                &["name", "description", "input", "expect", "rule", "reason"],
            ) else {
                continue;
            };
            let name = ck
                .required_str(&tf, item, "name", "test")
                .map(|(n, p)| (n.to_owned(), p));
            if let Some((n, p)) = &name {
                if let Some(first) = seen.get(n) {
                    ck.error(
                        *p,
                        format!("duplicate test name {n:?} (first at line {})", first.line),
                    );
                } else {
                    seen.insert(n.clone(), *p);
                }
            }
            let input = match tf.get("input") {
                None => {
                    ck.error(item.pos, "test is missing required field \"input\"");
                    None
                }
                Some(n) => match serde_json::from_value::<Request>(n.to_json()) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        ck.error(n.pos, format!("invalid input: {e}"));
                        None
                    }
                },
            };
            let expect = ck
                .required_str(&tf, item, "expect", "test")
                .and_then(|(e, p)| match e {
                    "allow" => Some(Effect::Allow),
                    "deny" => Some(Effect::Deny),
                    other => {
                        ck.error(p, format!("expect must be allow or deny, not {other:?}"));
                        None
                    }
                });
            let rule = match tf.get("rule") {
                None => Some(None),
                Some(n) if n.value == Value::Null => Some(Some(None)),
                Some(n) => ck.string(n, "rule").map(|s| Some(Some(s.to_owned()))),
            };
            let reason = match tf.get("reason") {
                None => Some(None),
                Some(n) => ck.string(n, "reason").and_then(|s| {
                    match serde_json::from_value::<Reason>(serde_json::Value::String(s.to_owned()))
                    {
                        Ok(r) => Some(Some(r)),
                        Err(_) => {
                            ck.error(n.pos, format!("unknown reason {s:?}"));
                            None
                        }
                    }
                }),
            };
            if let (Some((name, _)), Some(input), Some(expect), Some(rule), Some(reason)) =
                (name, input, expect, rule, reason)
            {
                out.push(TestCase {
                    file: file.clone(),
                    pos: item.pos,
                    name,
                    input,
                    expect,
                    rule,
                    reason,
                });
            }
        }
    }
    out
}

/// The result of one test case.
#[derive(Debug, Clone)]
pub struct Outcome<'a> {
    /// The case.
    pub case: &'a TestCase,
    /// What the engine decided.
    pub decision: Decision,
    /// Why it failed, if it did.
    pub failure: Option<String>,
    /// How long the decision took.
    pub elapsed: std::time::Duration,
}

/// Runs cases against a set.
pub fn run<'a>(set: &PolicySet, cases: &'a [TestCase]) -> Vec<Outcome<'a>> {
    cases
        .iter()
        .map(|case| {
            let start = std::time::Instant::now();
            let decision = set.decide(&case.input);
            let elapsed = start.elapsed();
            let mut problems = Vec::new();
            if decision.decision != case.expect {
                problems.push(format!(
                    "expected {}, got {}",
                    case.expect, decision.decision
                ));
            }
            if let Some(want) = &case.rule
                && want.as_deref() != decision.rule.as_deref()
            {
                problems.push(format!(
                    "expected rule {}, got {}",
                    want.as_deref().unwrap_or("none"),
                    decision.rule.as_deref().unwrap_or("none")
                ));
            }
            if let Some(want) = case.reason
                && want != decision.reason
            {
                problems.push(format!(
                    "expected reason {}, got {}",
                    want.as_str(),
                    decision.reason.as_str()
                ));
            }
            let failure = (!problems.is_empty()).then(|| {
                format!(
                    "{} (decided by rule {}, reason {}{})",
                    problems.join("; "),
                    decision.rule.as_deref().unwrap_or("none"),
                    decision.reason.as_str(),
                    decision
                        .detail
                        .as_deref()
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default()
                )
            });
            Outcome {
                case,
                decision,
                failure,
                elapsed,
            }
        })
        .collect()
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// JUnit XML for CI systems: one `<testsuite>` per file.
pub fn junit_xml(outcomes: &[Outcome<'_>]) -> String {
    let mut files: Vec<&str> = Vec::new();
    for o in outcomes {
        if !files.contains(&o.case.file.as_ref()) {
            files.push(&o.case.file);
        }
    }
    let failures = outcomes.iter().filter(|o| o.failure.is_some()).count();
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"castellan policy test\" tests=\"{}\" failures=\"{failures}\">",
        outcomes.len()
    );
    for file in files {
        let cases: Vec<&Outcome<'_>> = outcomes
            .iter()
            .filter(|o| o.case.file.as_ref() == file)
            .collect();
        let f = cases.iter().filter(|o| o.failure.is_some()).count();
        let _ = writeln!(
            x,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{f}\">",
            xml_escape(file),
            cases.len()
        );
        for o in cases {
            let _ = write!(
                x,
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.6}\" file=\"{}\" line=\"{}\"",
                xml_escape(file),
                xml_escape(&o.case.name),
                o.elapsed.as_secs_f64(),
                xml_escape(file),
                o.case.pos.line
            );
            match &o.failure {
                None => x.push_str("/>\n"),
                Some(msg) => {
                    let _ = writeln!(
                        x,
                        ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>",
                        xml_escape(msg),
                        xml_escape(msg)
                    );
                }
            }
        }
        x.push_str("  </testsuite>\n");
    }
    x.push_str("</testsuites>\n");
    x
}
