//! `castellan policy suggest`: a tightened copy of a policy directory, narrowed to what the
//! window's traffic used (least privilege from real traffic).
//!
//! The control plane replays the window against the directory's policies and says, per allow
//! rule, which calls it decided (`POST /v1/policy/usage`). Each allow rule is then narrowed:
//! caller lists and globs to the callers seen, methods to those used, catch-all paths to the
//! paths used (id-like segments become `{param}`s; `{param}` templates are never narrowed to
//! literal ids), unused templates and unused rules dropped, each with a comment saying why.
//! Deny rules, conditions, user clauses and hosts are kept as written. A rule some of whose
//! calls cannot be replayed (inputs not kept) is left as written. The result is checked like
//! `policy check`, its impact over the same window must show no newly denied call, and the
//! directory's `policy test` cases are run against it (`--keep-tested` first adds every call a
//! test allows to the evidence, so nothing a test exercises is removed or narrowed).

use crate::admin_cmd::Connection;
use castellan_policy::model::{AccessPolicy, From, Rule, To, Users};
use castellan_policy::parse::parse_policy_file;
use castellan_policy::principal::{Caller, ServicePattern};
use castellan_policy::template::{PathTemplate, Segment};
use castellan_policy::testing::{parse_test_file, run as run_tests};
use castellan_policy::{Effect, PolicySet, is_test_file, normalize_target, yaml_files};
use castellan_server::api::ImpactRequest;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

/// A catch-all narrowed to more templates than this is left as written.
const MAX_TEMPLATES: usize = 20;

/// What the traffic (and, with `--keep-tested`, the tests) used of one rule.
#[derive(Debug, Default, Clone)]
struct Used {
    calls: u64,
    callers: BTreeSet<String>,
    no_caller: bool,
    methods: BTreeSet<String>,
    paths: BTreeSet<String>,
    truncated: bool,
    indeterminate: u64,
}

fn strings(v: &Value, k: &str) -> BTreeSet<String> {
    v.get(k)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn used_of(v: &Value) -> Used {
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let b = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
    Used {
        calls: n("calls"),
        callers: strings(v, "callers"),
        no_caller: b("no_caller"),
        methods: strings(v, "methods"),
        paths: strings(v, "paths"),
        truncated: b("truncated"),
        indeterminate: n("indeterminate"),
    }
}

/// Whether a normalized path (no query) matches a template.
fn template_matches(t: &PathTemplate, path: &str) -> bool {
    let p = path.strip_prefix('/').unwrap_or(path);
    let p = if p.len() > 1 {
        p.strip_suffix('/').unwrap_or(p)
    } else {
        p
    };
    let segs: Vec<&str> = if p.is_empty() {
        Vec::new()
    } else {
        p.split('/').collect()
    };
    let mut i = 0;
    for s in &t.segments {
        match s {
            Segment::Literal(l) => {
                if segs.get(i) != Some(&l.as_str()) {
                    return false;
                }
            }
            Segment::Param(_) => {
                if segs.get(i).is_none_or(|x| x.is_empty()) {
                    return false;
                }
            }
            Segment::CatchAll(_) => return segs.len() > i,
        }
        i += 1;
    }
    segs.len() == i
}

/// Whether a path segment looks like an identifier (narrowed to a `{param}`, never a literal).
fn id_like(seg: &str) -> bool {
    let digits = seg.bytes().filter(u8::is_ascii_digit).count();
    (!seg.is_empty() && digits == seg.len())
        || (seg.len() >= 8 && digits > 0 && seg.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
}

/// The templates a catch-all template (or "any path") narrows to for the paths it was used
/// for: its own leading segments, then the used segments with id-like ones as `{segN}`.
/// `None` when the narrowing would not be valid or too many.
fn narrow_catch_all(t: Option<&PathTemplate>, paths: &[&str]) -> Option<Vec<String>> {
    let lead: &[Segment] = match t {
        Some(t) => t.segments.split_last().map_or(&[], |(_, l)| l),
        None => &[],
    };
    let mut out = BTreeSet::new();
    for path in paths {
        let p = path.trim_start_matches('/');
        let p = p.strip_suffix('/').unwrap_or(p);
        let segs: Vec<&str> = if p.is_empty() {
            Vec::new()
        } else {
            p.split('/').collect()
        };
        let mut src = String::new();
        for (i, seg) in segs.iter().enumerate() {
            src.push('/');
            match lead.get(i) {
                Some(Segment::Literal(l)) => src.push_str(l),
                Some(Segment::Param(n)) => {
                    let _ = write!(src, "{{{n}}}");
                }
                Some(Segment::CatchAll(_)) => return None,
                None if id_like(seg) => {
                    let _ = write!(src, "{{seg{i}}}");
                }
                None => src.push_str(seg),
            }
        }
        if src.is_empty() {
            src.push('/');
        }
        // Every narrowed template must itself be valid and match the path it came from.
        let parsed = PathTemplate::parse(&src).ok()?;
        if !template_matches(&parsed, path) {
            return None;
        }
        out.insert(src);
    }
    (out.len() <= MAX_TEMPLATES).then(|| out.into_iter().collect())
}

fn pattern_source(p: &ServicePattern) -> String {
    match p {
        ServicePattern::Name(n) | ServicePattern::SpiffeId(n) => n.clone(),
        ServicePattern::NamePrefix(n) | ServicePattern::SpiffePrefix(n) => format!("{n}*"),
    }
}

/// The pattern naming exactly this caller: its local name when it has one.
fn caller_pattern(td: &str, id: &str) -> Option<ServicePattern> {
    let c = Caller::resolve(td, None, Some(id)).ok()??;
    Some(match c.local_name() {
        Some(n) => ServicePattern::Name(n.to_owned()),
        None => ServicePattern::SpiffeId(id.to_owned()),
    })
}

/// One rule after narrowing: the rule to write (or none) and why.
struct Narrowed {
    rule: Option<Rule>,
    notes: Vec<String>,
}

fn narrow_rule(rule: &Rule, used: Option<&Used>, td: &str) -> Narrowed {
    let mut notes = Vec::new();
    if rule.effect == Effect::Deny {
        return Narrowed {
            rule: Some(rule.clone()),
            notes,
        };
    }
    let Some(u) = used else {
        notes.push(format!(
            "dropped allow rule {:?}: it allowed no call in the window",
            rule.id
        ));
        return Narrowed { rule: None, notes };
    };
    if u.indeterminate > 0 || u.truncated {
        notes.push(format!(
            "kept as written: {}",
            if u.truncated {
                "used by more distinct callers or paths than suggest keeps".to_owned()
            } else {
                format!(
                    "{} call(s) it allowed cannot be replayed (inputs not kept)",
                    u.indeterminate
                )
            }
        ));
        return Narrowed {
            rule: Some(rule.clone()),
            notes,
        };
    }
    let mut r = rule.clone();
    // Callers.
    if !u.no_caller {
        let resolved: Vec<(String, Caller<'_>)> = u
            .callers
            .iter()
            .filter_map(|id| {
                Caller::resolve(td, None, Some(id))
                    .ok()
                    .flatten()
                    .map(|c| (id.clone(), c))
            })
            .collect();
        if resolved.len() == u.callers.len() {
            let before: Vec<String> = match &r.from.services {
                Some(ps) => ps.iter().map(pattern_source).collect(),
                None => vec!["any caller".to_owned()],
            };
            let mut after: Vec<ServicePattern> = Vec::new();
            let mut add = |p: ServicePattern| {
                if !after.contains(&p) {
                    after.push(p);
                }
            };
            match &r.from.services {
                None => {
                    for (id, _) in &resolved {
                        if let Some(p) = caller_pattern(td, id) {
                            add(p);
                        }
                    }
                }
                Some(ps) => {
                    for p in ps {
                        let hits: Vec<&String> = resolved
                            .iter()
                            .filter(|(_, c)| p.matches(c))
                            .map(|(id, _)| id)
                            .collect();
                        match p {
                            ServicePattern::Name(_) | ServicePattern::SpiffeId(_) => {
                                if !hits.is_empty() {
                                    add(p.clone());
                                }
                            }
                            _ => {
                                for id in hits {
                                    if let Some(q) = caller_pattern(td, id) {
                                        add(q);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            let after_src: Vec<String> = after.iter().map(pattern_source).collect();
            if !after.is_empty() && after_src != before {
                notes.push(format!(
                    "callers narrowed from [{}] to [{}] (those seen)",
                    before.join(", "),
                    after_src.join(", ")
                ));
                r.from.services = Some(after);
            }
        }
    }
    // Methods.
    let methods: Vec<String> = match &r.to.methods {
        None => u.methods.iter().cloned().collect(),
        Some(ms) => ms
            .iter()
            .filter(|m| u.methods.contains(*m))
            .cloned()
            .collect(),
    };
    if !methods.is_empty() && Some(&methods) != r.to.methods.as_ref() {
        notes.push(format!(
            "methods narrowed from [{}] to [{}] (those used)",
            r.to.methods
                .as_ref()
                .map_or("any".to_owned(), |m| m.join(", ")),
            methods.join(", ")
        ));
        r.to.methods = Some(methods);
    }
    // Paths. Renaming a catch-all's parameters would change what a condition reads.
    let reads_params = r
        .when
        .as_ref()
        .is_some_and(|c| c.source().contains("params"));
    let paths: Vec<&str> = u.paths.iter().map(String::as_str).collect();
    let templates: Vec<Option<&PathTemplate>> = match &r.to.paths {
        None => vec![None],
        Some(ts) => ts.iter().map(Some).collect(),
    };
    let mut new_paths: Vec<String> = Vec::new();
    let mut changed = false;
    for t in templates {
        let hits: Vec<&str> = paths
            .iter()
            .copied()
            .filter(|p| t.is_none_or(|t| template_matches(t, p)))
            .collect();
        let src = t.map_or("any path".to_owned(), |t| t.source.clone());
        if hits.is_empty() {
            notes.push(format!("path {src:?} dropped: not used"));
            changed = true;
            continue;
        }
        let catch_all = t.is_none_or(|t| matches!(t.segments.last(), Some(Segment::CatchAll(_))));
        let narrowed = (catch_all && !reads_params)
            .then(|| narrow_catch_all(t, &hits))
            .flatten();
        match narrowed {
            Some(ns) => {
                notes.push(format!(
                    "path {src:?} narrowed to [{}] ({} path(s) used)",
                    ns.join(", "),
                    hits.len()
                ));
                new_paths.extend(ns);
                changed = true;
            }
            None => new_paths.push(src),
        }
    }
    if changed {
        let mut parsed = Vec::new();
        for p in &new_paths {
            match PathTemplate::parse(p) {
                Ok(t) if !parsed.contains(&t) => parsed.push(t),
                Ok(_) => {}
                Err(_) => {
                    notes.push(format!("kept paths as written ({p:?} would not be valid)"));
                    return Narrowed {
                        rule: Some(r.clone()),
                        notes,
                    };
                }
            }
        }
        r.to.paths = Some(parsed);
    }
    Narrowed {
        rule: Some(r),
        notes,
    }
}

/// A scalar as YAML (JSON strings are YAML double-quoted strings).
fn q(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

fn list(items: impl IntoIterator<Item = String>) -> String {
    let v: Vec<String> = items.into_iter().map(|s| q(&s)).collect();
    format!("[{}]", v.join(", "))
}

fn write_rule(out: &mut String, r: &Rule, notes: &[String]) {
    for n in notes {
        let _ = writeln!(out, "    # suggest: {n}");
    }
    let name = r.id.split_once('/').map_or(&*r.id, |(_, n)| n);
    let _ = writeln!(out, "    - name: {}", q(name));
    let _ = writeln!(out, "      effect: {}", r.effect);
    let From {
        services,
        users,
        authenticated,
    } = &r.from;
    if services.is_some() || users.is_some() || authenticated.is_some() {
        let _ = writeln!(out, "      from:");
        if let Some(ps) = services {
            let _ = writeln!(
                out,
                "        services: {}",
                list(ps.iter().map(pattern_source))
            );
        }
        if let Some(Users {
            roles,
            subjects,
            claims,
            delegated,
        }) = users
        {
            let _ = writeln!(out, "        users:");
            if let Some(r) = roles {
                let _ = writeln!(out, "          roles: {}", list(r.iter().cloned()));
            }
            if let Some(s) = subjects {
                let _ = writeln!(out, "          subjects: {}", list(s.iter().cloned()));
            }
            if let Some(c) = claims {
                let m: Vec<String> = c.iter().map(|(k, v)| format!("{}: {v}", q(k))).collect();
                let _ = writeln!(out, "          claims: {{{}}}", m.join(", "));
            }
            if let Some(d) = delegated {
                let _ = writeln!(out, "          delegated: {d}");
            }
        }
        if let Some(a) = authenticated {
            let _ = writeln!(out, "        authenticated: {a}");
        }
    }
    let To {
        methods,
        paths,
        hosts,
    } = &r.to;
    if methods.is_some() || paths.is_some() || hosts.is_some() {
        let _ = writeln!(out, "      to:");
        if let Some(m) = methods {
            let _ = writeln!(out, "        methods: {}", list(m.iter().cloned()));
        }
        if let Some(p) = paths {
            let _ = writeln!(
                out,
                "        paths: {}",
                list(p.iter().map(|t| t.source.clone()))
            );
        }
        if let Some(h) = hosts {
            let _ = writeln!(out, "        hosts: {}", list(h.iter().cloned()));
        }
    }
    if let Some(c) = &r.when {
        let _ = writeln!(out, "      when: {}", q(c.source()));
    }
}

/// One policy document, narrowed, as YAML; `None` when no rule is left.
fn write_policy(
    p: &AccessPolicy,
    usage: &BTreeMap<String, Used>,
    td: &str,
    changes: &mut Vec<Value>,
) -> String {
    let mut body = String::new();
    let mut kept = 0;
    for rule in &p.rules {
        let n = narrow_rule(rule, usage.get(&*rule.id), td);
        if !n.notes.is_empty() {
            changes.push(json!({"rule": &*rule.id, "kept": n.rule.is_some(), "notes": n.notes}));
        }
        match &n.rule {
            Some(r) => {
                write_rule(&mut body, r, &n.notes);
                kept += 1;
            }
            None => {
                for note in &n.notes {
                    let _ = writeln!(body, "    # suggest: {note}");
                }
            }
        }
    }
    let mut out = String::new();
    let _ = writeln!(out, "apiVersion: castellan/v1\nkind: AccessPolicy");
    let _ = writeln!(out, "metadata:\n  name: {}", q(&p.name));
    let _ = writeln!(
        out,
        "spec:\n  service: {}\n  mode: {}",
        q(&p.service),
        p.mode
    );
    if kept == 0 {
        // A policy needs rules; with none used, only a deny-all is left to say it.
        let _ = writeln!(
            out,
            "  # suggest: no rule of this policy allowed a call in the window\n  rules:"
        );
        out.push_str(&body);
        let _ = writeln!(
            out,
            "    - name: \"suggest-nothing-used\"\n      effect: deny\n      to:\n        paths: [\"/{{*rest}}\"]\n    - name: \"suggest-nothing-used-root\"\n      effect: deny\n      to:\n        paths: [\"/\"]"
        );
    } else {
        let _ = writeln!(out, "  rules:");
        out.push_str(&body);
    }
    out
}

/// Splits a YAML file into its documents' texts (on `---` lines), keeping separators out.
fn documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else if let Some(d) = docs.last_mut() {
            d.push_str(line);
            d.push('\n');
        }
    }
    docs
}

/// The leading comment lines of a document (kept above its rewritten form).
fn leading_comments(doc: &str) -> String {
    doc.lines()
        .take_while(|l| l.trim_start().starts_with('#') || l.trim().is_empty())
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Options of `policy suggest`.
pub struct Options<'a> {
    pub dir: &'a Path,
    pub out: &'a Path,
    pub since_secs: i64,
    pub keep_tested: bool,
    pub json: bool,
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(2)
}

pub fn run(o: &Options<'_>, conn: &Connection) -> ExitCode {
    if o.out.exists() && std::fs::read_dir(o.out).map_or(true, |mut d| d.next().is_some()) {
        return fail(format!(
            "{}: exists and is not an empty directory (suggest writes a new directory)",
            o.out.display()
        ));
    }
    let set = match PolicySet::load_dir(o.dir) {
        Ok(s) => s,
        Err(e) => return fail(format!("{}: {e}", o.dir.display())),
    };
    let td = set.trust_domain().to_owned();
    let paths = match yaml_files(o.dir) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let mut texts: Vec<(String, String, bool)> = Vec::new();
    for path in &paths {
        let name = path
            .strip_prefix(o.dir)
            .unwrap_or(path)
            .display()
            .to_string();
        match std::fs::read_to_string(path) {
            Ok(t) => texts.push((name, t, is_test_file(path))),
            Err(e) => return fail(format!("{}: {e}", path.display())),
        }
    }
    let files: BTreeMap<String, String> = texts
        .iter()
        .filter(|(_, _, test)| !test)
        .map(|(n, t, _)| (n.clone(), t.clone()))
        .collect();
    let since_ms = crate::admin_cmd::ms_ago(o.since_secs);
    let v = match conn.admin().and_then(|a| {
        a.policy_usage(&ImpactRequest {
            files,
            since_ms,
            service: String::new(),
        })
    }) {
        Ok(v) => v,
        Err(e) => return fail(crate::admin_cmd::printable(&e)),
    };
    let mut usage: BTreeMap<String, Used> = v
        .get("rules")
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), used_of(v))).collect())
        .unwrap_or_default();
    // Services some of whose served calls cannot be attributed to a rule: left as written.
    let blind: BTreeSet<String> = v
        .get("indeterminate_services")
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let mut diags = Vec::new();
    let mut cases = Vec::new();
    for (name, text, test) in &texts {
        if *test {
            cases.extend(parse_test_file(Arc::from(name.as_str()), text, &mut diags));
        }
    }
    if let Some(d) = diags.first() {
        return fail(d);
    }
    if o.keep_tested {
        for out in run_tests(&set, &cases) {
            let (true, Some(rule)) = (out.decision.is_allowed(), out.decision.rule.as_deref())
            else {
                continue;
            };
            let input = &out.case.input;
            let u = usage.entry(rule.to_owned()).or_default();
            u.calls += 1;
            match input.source.as_ref().and_then(|s| {
                Caller::resolve(&td, s.service.as_deref(), s.spiffe_id.as_deref())
                    .ok()
                    .flatten()
            }) {
                Some(c) => {
                    u.callers.insert(c.spiffe_id().into_owned());
                }
                None => u.no_caller = true,
            }
            u.methods.insert(input.request.method.to_ascii_uppercase());
            match normalize_target(&input.request.path) {
                Ok(t) => {
                    u.paths.insert(t.path.to_string());
                }
                Err(_) => u.truncated = true,
            }
        }
    }
    // Rewrite every file: policy documents narrowed, everything else as it was.
    let mut changes = Vec::new();
    let mut out_files: Vec<(String, String)> = Vec::new();
    for (name, text, test) in &texts {
        if *test {
            out_files.push((name.clone(), text.clone()));
            continue;
        }
        let mut docs_out = Vec::new();
        for doc in documents(text) {
            let mut d = Vec::new();
            let parsed = parse_policy_file(Arc::from(name.as_str()), &doc, &mut d);
            if parsed.policies.is_empty() || !d.is_empty() {
                docs_out.push(doc);
                continue;
            }
            let mut t = leading_comments(&doc);
            for (i, p) in parsed.policies.iter().enumerate() {
                if i > 0 {
                    t.push_str("---\n");
                }
                if blind.contains(&p.service) {
                    let _ = writeln!(
                        t,
                        "# suggest: kept as written: some calls to {:?} cannot be replayed",
                        p.service
                    );
                    t.push_str(&doc);
                    continue;
                }
                t.push_str(&write_policy(p, &usage, &td, &mut changes));
            }
            docs_out.push(t);
        }
        out_files.push((name.clone(), docs_out.join("---\n")));
    }
    // What was written must load like `policy check`, keep the tests' expectations (reported),
    // and deny no call the window made.
    let sources: Vec<(&str, &str)> = out_files
        .iter()
        .filter(|(n, _)| !is_test_file(Path::new(n)))
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let suggested = match PolicySet::from_sources(sources.iter().copied()) {
        Ok(s) => s,
        Err(e) => return fail(format!("the suggested policy set does not load: {e}")),
    };
    let broken: Vec<Value> = run_tests(&suggested, &cases)
        .into_iter()
        .filter_map(|o| {
            o.failure
                .map(|f| json!({"file": &*o.case.file, "test": o.case.name, "failure": f}))
        })
        .collect();
    let new_files: BTreeMap<String, String> = sources
        .iter()
        .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
        .collect();
    let impact = match conn.admin().and_then(|a| {
        a.policy_impact(&ImpactRequest {
            files: new_files,
            since_ms,
            service: String::new(),
        })
    }) {
        Ok(v) => v,
        Err(e) => return fail(crate::admin_cmd::printable(&e)),
    };
    let newly_denied = impact
        .get("newly_denied")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let summary = json!({
        "out": o.out.display().to_string(), "changes": changes, "broken_tests": broken,
        "newly_denied": newly_denied, "replayed": v.get("replayed"),
        "indeterminate_services": blind,
    });
    if o.json {
        println!("{summary}");
    } else {
        for c in &changes {
            for n in c
                .get("notes")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                println!(
                    "{}: {}",
                    c.get("rule").and_then(Value::as_str).unwrap_or_default(),
                    n.as_str().unwrap_or_default()
                );
            }
        }
        for b in &broken {
            println!(
                "would break test {:?} ({}): {}",
                b.get("test").and_then(Value::as_str).unwrap_or_default(),
                b.get("file").and_then(Value::as_str).unwrap_or_default(),
                b.get("failure").and_then(Value::as_str).unwrap_or_default()
            );
        }
        println!(
            "suggestion for {}: {} rule change(s), {} test(s) it would break, {} call(s) of the window newly denied",
            o.out.display(),
            changes.len(),
            broken.len(),
            newly_denied
        );
    }
    if newly_denied > 0 {
        eprintln!(
            "error: the suggestion would deny {newly_denied} call(s) the window made; it is not safe and was not written"
        );
        return ExitCode::FAILURE;
    }
    for (name, text) in &out_files {
        let path = o.out.join(name);
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, text));
        if let Err(e) = written {
            return fail(format!("{}: {e}", path.display()));
        }
    }
    ExitCode::SUCCESS
}
