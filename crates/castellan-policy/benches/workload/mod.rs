//! A generated workload expressed equally in Castellan YAML, Cedar and Rego, for the benchmark and
//! the differential test. Rules span many services and mix exact paths, `{id}` templates,
//! `{*rest}` catch-alls, caller-name globs, role checks, deny rules, and ~20% CEL conditions.
//!
//! Equivalence notes: Cedar and Rego get the path already normalized and split (they have no
//! normalizer), so they are measured without that work while Castellan's numbers include it.
//! Conditions only read attributes every generated request carries, because Cedar skips a policy
//! whose condition errors while Castellan fails closed (a deny rule whose condition errors matches).
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::fmt::Write as _;

/// xorshift64*: deterministic, dependency-free.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Clone, Debug)]
pub enum PathKind {
    Exact(Vec<String>),
    Template(Vec<String>, String), // literal prefix segments, then {id}, then suffix segment
    CatchAll(Vec<String>),         // literal prefix, then {*rest}
}

#[derive(Clone, Debug)]
pub enum Caller {
    Name(String),
    Glob(String), // prefix of `prefix*`
}

#[derive(Clone, Debug)]
pub enum Cond {
    LevelAtLeast(i64),
    TenantHeaderMatches,
    DebugHeaderOn,
}

#[derive(Clone, Debug)]
pub struct GenRule {
    pub name: String,
    pub service: String,
    pub allow: bool,
    pub caller: Caller,
    pub roles: Option<Vec<String>>,
    pub methods: Vec<&'static str>,
    pub path: PathKind,
    pub cond: Option<Cond>,
}

#[derive(Clone, Debug)]
pub struct GenRequest {
    pub source: String,
    pub service: String,
    pub method: &'static str,
    pub path: String,
    pub roles: Option<Vec<String>>, // None: no end user
    pub level: i64,
    pub tenant: String,
    pub header_tenant: String,
    pub debug: String,
}

const METHODS: [&str; 4] = ["GET", "POST", "PUT", "DELETE"];

/// Ten rules per service at every size, so that growth with size measures the index, not a
/// denser workload.
pub fn services_for(rules: usize) -> usize {
    (rules / 10).max(1)
}

pub fn generate_rules(n: usize, seed: u64) -> Vec<GenRule> {
    let mut rng = Rng::new(seed);
    let services = services_for(n);
    (0..n)
        .map(|i| {
            let svc = rng.below(services as u64);
            let res = format!("res{}", rng.below(4));
            let path = match rng.below(3) {
                0 => PathKind::Exact(vec![res, "list".into()]),
                1 => PathKind::Template(vec![res], "items".into()),
                _ => PathKind::CatchAll(vec![res, "files".into()]),
            };
            let allow = !rng.chance(10);
            let caller = if rng.chance(20) {
                Caller::Glob(format!("team{}-", rng.below(5)))
            } else {
                Caller::Name(format!("c{}", rng.below(20)))
            };
            let roles = rng.chance(50).then(|| {
                vec![
                    format!("role{}", rng.below(4)),
                    format!("role{}", rng.below(4)),
                ]
            });
            let methods = match rng.below(3) {
                0 => vec![METHODS[rng.below(4) as usize]],
                1 => vec!["GET", "PUT"],
                _ => vec![METHODS[rng.below(4) as usize]],
            };
            let cond = rng.chance(20).then(|| {
                if !allow {
                    Cond::DebugHeaderOn
                } else if rng.chance(50) {
                    Cond::LevelAtLeast(rng.below(5) as i64)
                } else {
                    Cond::TenantHeaderMatches
                }
            });
            // A condition on user claims needs a user: such rules always check roles too.
            let roles = match (&cond, roles) {
                (Some(Cond::LevelAtLeast(_) | Cond::TenantHeaderMatches), None) => {
                    Some(vec!["role0".into()])
                }
                (_, r) => r,
            };
            GenRule {
                name: format!("r{i}"),
                service: format!("svc{svc}"),
                allow,
                caller,
                roles,
                methods,
                path,
                cond,
            }
        })
        .collect()
}

/// Requests: most aimed at a rule (so they may match it), some at random places.
pub fn generate_requests(rules: &[GenRule], n: usize, seed: u64) -> Vec<GenRequest> {
    let mut rng = Rng::new(seed ^ 0xABCD);
    let services = services_for(rules.len());
    (0..n)
        .map(|_| {
            let (service, method, path, source);
            if rng.chance(80) {
                let r = &rules[rng.below(rules.len() as u64) as usize];
                service = r.service.clone();
                method = r.methods[rng.below(r.methods.len() as u64) as usize];
                path = match &r.path {
                    PathKind::Exact(segs) => format!("/{}", segs.join("/")),
                    PathKind::Template(pre, suf) => {
                        format!("/{}/{}/{}", pre.join("/"), rng.below(100), suf)
                    }
                    PathKind::CatchAll(pre) => {
                        format!("/{}/d{}/f{}.txt", pre.join("/"), rng.below(3), rng.below(9))
                    }
                };
                source = match (&r.caller, rng.chance(75)) {
                    (Caller::Name(n), true) => n.clone(),
                    (Caller::Glob(p), true) => format!("{p}{}", rng.below(9)),
                    _ => format!("c{}", rng.below(20)),
                };
            } else {
                service = format!("svc{}", rng.below(services as u64));
                method = METHODS[rng.below(4) as usize];
                path = format!("/res{}/items/{}/x", rng.below(4), rng.below(9));
                source = format!("team{}-{}", rng.below(5), rng.below(3));
            }
            let roles = rng
                .chance(80)
                .then(|| vec![format!("role{}", rng.below(4))]);
            let tenant = format!("t{}", rng.below(3));
            GenRequest {
                source,
                service,
                method,
                path,
                roles,
                level: rng.below(6) as i64,
                header_tenant: format!("t{}", rng.below(3)),
                tenant,
                debug: if rng.chance(10) {
                    "on".into()
                } else {
                    "off".into()
                },
            }
        })
        .collect()
}

fn yaml_path(p: &PathKind) -> String {
    match p {
        PathKind::Exact(s) => format!("/{}", s.join("/")),
        PathKind::Template(pre, suf) => format!("/{}/{{id}}/{suf}", pre.join("/")),
        PathKind::CatchAll(pre) => format!("/{}/{{*rest}}", pre.join("/")),
    }
}

/// Castellan YAML: one policy per service.
pub fn castellan_yaml(rules: &[GenRule]) -> String {
    let mut by_service: std::collections::BTreeMap<&str, Vec<&GenRule>> = Default::default();
    for r in rules {
        by_service.entry(&r.service).or_default().push(r);
    }
    let mut y = String::new();
    for (svc, rs) in by_service {
        let _ = write!(
            y,
            "---\napiVersion: castellan/v1\nkind: AccessPolicy\nmetadata: {{name: {svc}-policy}}\nspec:\n  service: {svc}\n  rules:\n"
        );
        for r in rs {
            let caller = match &r.caller {
                Caller::Name(n) => n.clone(),
                Caller::Glob(p) => format!("{p}*"),
            };
            let _ = writeln!(y, "    - name: {}", r.name);
            let _ = writeln!(
                y,
                "      effect: {}",
                if r.allow { "allow" } else { "deny" }
            );
            let _ = write!(y, "      from: {{services: [\"{caller}\"]");
            if let Some(roles) = &r.roles {
                let _ = write!(y, ", users: {{roles: [{}]}}", roles.join(", "));
            }
            y.push_str("}\n");
            let _ = writeln!(
                y,
                "      to: {{methods: [{}], paths: [\"{}\"]}}",
                r.methods.join(", "),
                yaml_path(&r.path)
            );
            match &r.cond {
                Some(Cond::LevelAtLeast(l)) => {
                    let _ = writeln!(y, "      when: \"user.claims.level >= {l}\"");
                }
                Some(Cond::TenantHeaderMatches) => {
                    let _ = writeln!(
                        y,
                        "      when: \"request.headers['x-tenant'] == user.claims.tenant\""
                    );
                }
                Some(Cond::DebugHeaderOn) => {
                    let _ = writeln!(y, "      when: \"request.headers['x-debug'] == 'on'\"");
                }
                None => {}
            }
        }
    }
    y
}

pub fn castellan_request(q: &GenRequest) -> castellan_policy::Request {
    let mut v = serde_json::json!({
        "source": {"service": q.source},
        "destination": {"service": q.service},
        "request": {"method": q.method, "path": q.path, "host": q.service,
                    "headers": {"x-tenant": q.header_tenant, "x-debug": q.debug}},
    });
    if let Some(roles) = &q.roles {
        v["user"] = serde_json::json!({"sub": "u", "roles": roles,
                                       "claims": {"level": q.level, "tenant": q.tenant}});
    }
    serde_json::from_value(v).unwrap()
}

/// Cedar: principal `Service::"<caller>"`, action `Action::"<METHOD>"`, resource `Svc::"<service>"`;
/// path and user in the context.
pub fn cedar_policies(rules: &[GenRule]) -> String {
    let mut s = String::new();
    for r in rules {
        let effect = if r.allow { "permit" } else { "forbid" };
        let actions: Vec<String> = r
            .methods
            .iter()
            .map(|m| format!("Action::\"{m}\""))
            .collect();
        let (principal, mut conds) = match &r.caller {
            Caller::Name(n) => (format!("principal == Service::\"{n}\""), Vec::new()),
            Caller::Glob(p) => (
                "principal".to_owned(),
                vec![format!(
                    "context.source like \"{p}*\" && context.source != \"{p}\""
                )],
            ),
        };
        match &r.path {
            PathKind::Exact(segs) => conds.push(format!("context.path == \"/{}\"", segs.join("/"))),
            PathKind::Template(pre, suf) => conds.push(format!(
                "context.nseg == {} && context.path like \"/{}/*/{suf}\"",
                pre.len() + 2,
                pre.join("/")
            )),
            PathKind::CatchAll(pre) => conds.push(format!(
                "context.nseg > {} && context.path like \"/{}/*\"",
                pre.len(),
                pre.join("/")
            )),
        }
        if let Some(roles) = &r.roles {
            let list: Vec<String> = roles.iter().map(|x| format!("\"{x}\"")).collect();
            conds.push(format!(
                "context.has_user && context.roles.containsAny([{}])",
                list.join(", ")
            ));
        }
        match &r.cond {
            Some(Cond::LevelAtLeast(l)) => conds.push(format!("context.claims.level >= {l}")),
            Some(Cond::TenantHeaderMatches) => {
                conds.push("context.headers.x_tenant == context.claims.tenant".into())
            }
            Some(Cond::DebugHeaderOn) => conds.push("context.headers.x_debug == \"on\"".into()),
            None => {}
        }
        let _ = writeln!(
            s,
            "@id(\"{}/{}\")\n{effect}({principal}, action in [{}], resource == Svc::\"{}\")\nwhen {{ {} }};\n",
            r.service,
            r.name,
            actions.join(", "),
            r.service,
            conds.join(" && ")
        );
    }
    s
}

pub fn cedar_context(q: &GenRequest) -> serde_json::Value {
    let nseg = q.path.trim_start_matches('/').split('/').count();
    serde_json::json!({
        "source": q.source,
        "path": q.path,
        "nseg": nseg,
        "has_user": q.roles.is_some(),
        "roles": q.roles.clone().unwrap_or_default(),
        "claims": if q.roles.is_some() { serde_json::json!({"level": q.level, "tenant": q.tenant}) } else { serde_json::json!({}) },
        "headers": {"x_tenant": q.header_tenant, "x_debug": q.debug},
    })
}

/// Rego (v1 syntax): one `allowed`/`denied` body per rule; decision = some allow, no deny.
/// Split into modules of the same package, as regorus limits one module to 1 MiB.
pub fn rego_policy(rules: &[GenRule]) -> Vec<String> {
    let mut modules = vec![String::from(
        "package castellan\n\ndefault allow := false\n\nallow if {\n  not denied\n  allowed\n}\n\n",
    )];
    for chunk in rules.chunks(1000) {
        modules.push(rego_module(chunk));
    }
    modules
}

fn rego_module(rules: &[GenRule]) -> String {
    let mut s = String::from("package castellan\n\n");
    for r in rules {
        let head = if r.allow { "allowed" } else { "denied" };
        let mut body = vec![
            format!("input.service == \"{}\"", r.service),
            if r.methods.len() == 1 {
                format!("input.method == \"{}\"", r.methods[0])
            } else {
                let ms: Vec<String> = r.methods.iter().map(|m| format!("\"{m}\"")).collect();
                format!("input.method in {{{}}}", ms.join(", "))
            },
        ];
        match &r.caller {
            Caller::Name(n) => body.push(format!("input.source == \"{n}\"")),
            Caller::Glob(p) => {
                body.push(format!("startswith(input.source, \"{p}\")"));
                body.push(format!("input.source != \"{p}\""));
            }
        }
        let lits = |pre: &[String], body: &mut Vec<String>| {
            for (i, l) in pre.iter().enumerate() {
                body.push(format!("input.segs[{i}] == \"{l}\""));
            }
        };
        match &r.path {
            PathKind::Exact(segs) => {
                body.push(format!("count(input.segs) == {}", segs.len()));
                lits(segs, &mut body);
            }
            PathKind::Template(pre, suf) => {
                body.push(format!("count(input.segs) == {}", pre.len() + 2));
                lits(pre, &mut body);
                body.push(format!("input.segs[{}] == \"{suf}\"", pre.len() + 1));
            }
            PathKind::CatchAll(pre) => {
                body.push(format!("count(input.segs) > {}", pre.len()));
                lits(pre, &mut body);
            }
        }
        if let Some(roles) = &r.roles {
            let list: Vec<String> = roles.iter().map(|x| format!("\"{x}\"")).collect();
            body.push("some role in input.roles".to_owned());
            body.push(format!("role in {{{}}}", list.join(", ")));
        }
        match &r.cond {
            Some(Cond::LevelAtLeast(l)) => body.push(format!("input.claims.level >= {l}")),
            Some(Cond::TenantHeaderMatches) => {
                body.push("input.headers[\"x-tenant\"] == input.claims.tenant".into())
            }
            Some(Cond::DebugHeaderOn) => body.push("input.headers[\"x-debug\"] == \"on\"".into()),
            None => {}
        }
        let _ = writeln!(s, "{head} if {{\n  {}\n}}\n", body.join("\n  "));
    }
    s
}

pub fn rego_input(q: &GenRequest) -> serde_json::Value {
    let segs: Vec<&str> = q.path.trim_start_matches('/').split('/').collect();
    let mut v = serde_json::json!({
        "source": q.source, "service": q.service, "method": q.method, "segs": segs,
        "headers": {"x-tenant": q.header_tenant, "x-debug": q.debug},
    });
    if let Some(roles) = &q.roles {
        v["roles"] = serde_json::json!(roles);
        v["claims"] = serde_json::json!({"level": q.level, "tenant": q.tenant});
    }
    v
}

/// The three engines, ready to decide.
pub struct Engines {
    pub castellan: castellan_policy::PolicySet,
    pub cedar_policies: cedar_policy::PolicySet,
    pub cedar: cedar_policy::Authorizer,
    pub cedar_entities: cedar_policy::Entities,
    pub rego: regorus::Engine,
}

impl Engines {
    pub fn build(rules: &[GenRule]) -> Engines {
        let yaml = castellan_yaml(rules);
        let castellan =
            castellan_policy::PolicySet::from_sources([("generated.yaml", yaml.as_str())])
                .unwrap_or_else(|e| panic!("{e}"));
        let cedar_policies: cedar_policy::PolicySet = cedar_policies(rules).parse().unwrap();
        let mut rego = regorus::Engine::new();
        for (i, module) in rego_policy(rules).into_iter().enumerate() {
            rego.add_policy(format!("castellan{i}.rego"), module)
                .unwrap();
        }
        Engines {
            castellan,
            cedar_policies,
            cedar: cedar_policy::Authorizer::new(),
            cedar_entities: cedar_policy::Entities::empty(),
            rego,
        }
    }
}

pub fn cedar_request(q: &GenRequest) -> cedar_policy::Request {
    use std::str::FromStr;
    let p = cedar_policy::EntityUid::from_str(&format!("Service::\"{}\"", q.source)).unwrap();
    let a = cedar_policy::EntityUid::from_str(&format!("Action::\"{}\"", q.method)).unwrap();
    let r = cedar_policy::EntityUid::from_str(&format!("Svc::\"{}\"", q.service)).unwrap();
    let ctx = cedar_policy::Context::from_json_value(cedar_context(q), None).unwrap();
    cedar_policy::Request::new(p, a, r, ctx, None).unwrap()
}

pub fn rego_value(q: &GenRequest) -> regorus::Value {
    regorus::Value::from(rego_input(q))
}

pub fn rego_allows(engine: &mut regorus::Engine, input: &regorus::Value) -> bool {
    engine.set_input(input.clone());
    engine.eval_rule("data.castellan.allow".into()).unwrap() == regorus::Value::from(true)
}
