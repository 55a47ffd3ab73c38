//! CEL conditions (`when:`): compiled once at load, evaluated with only the variables they use.

use crate::normalize::percent_decode;
use crate::request::Request;
use cel::common::ast::{EntryExpr, Expr};
use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelTimestamp,
    CelUInt,
};
use cel::{Context, Env, Program, Value};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock};

/// The CEL variables a condition may use.
pub const CEL_VARIABLES: &[&str] = &["source", "user", "request", "params", "time"];

static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

const USES_SOURCE: u8 = 1;
const USES_USER: u8 = 2;
const USES_REQUEST: u8 = 4;
const USES_PARAMS: u8 = 8;
const USES_TIME: u8 = 16;

/// A compiled condition.
pub struct Condition {
    source: String,
    program: Program,
    uses: u8,
    /// Whether the text mentions `query`: a sound over-approximation of reading `request.query`
    /// (CEL has no computed field names), which spares parsing the query for every other condition.
    uses_query: bool,
    /// The native form, when the condition has a shape [`crate::fast`] supports.
    fast: Option<crate::fast::Fast>,
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Condition")
            .field("source", &self.source)
            .finish()
    }
}

impl Condition {
    /// Compiles a condition, checking syntax and that it uses only known variables.
    pub fn compile(src: &str) -> Result<Condition, String> {
        let program = ENV.compile(src).map_err(|e| {
            let msgs: Vec<String> = e
                .errors
                .iter()
                .map(|pe| format!("{} (at {}:{})", pe.msg, pe.pos.0, pe.pos.1))
                .collect();
            format!("invalid CEL condition: {}", msgs.join("; "))
        })?;
        let mut bound = HashSet::new();
        collect_bound_vars(&program.expression().expr, &mut bound);
        let refs = program.references();
        let mut unknown: Vec<&str> = refs
            .variables()
            .into_iter()
            .filter(|v| !CEL_VARIABLES.contains(v) && !bound.contains(*v))
            .collect();
        unknown.sort_unstable();
        if let Some(v) = unknown.first() {
            return Err(format!(
                "unknown variable {v:?} in CEL condition (known: {})",
                CEL_VARIABLES.join(", ")
            ));
        }
        let mut uses = 0;
        for (name, bit) in [
            ("source", USES_SOURCE),
            ("user", USES_USER),
            ("request", USES_REQUEST),
            ("params", USES_PARAMS),
            ("time", USES_TIME),
        ] {
            if refs.has_variable(name) {
                uses |= bit;
            }
        }
        Ok(Condition {
            source: src.to_owned(),
            uses,
            uses_query: src.contains("query"),
            fast: crate::fast::compile(&program.expression().expr),
            program,
        })
    }

    /// The condition as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the condition can read the query string.
    pub fn reads_query(&self) -> bool {
        self.uses_query
    }

    /// The request headers the condition can read: adds their names to `out`, or returns
    /// `false` when it can read headers it does not name (`'x' in request.headers`, a computed
    /// index) — then any header may matter.
    pub fn header_reads(&self, out: &mut std::collections::BTreeSet<String>) -> bool {
        header_reads(&self.source, out)
    }

    /// Evaluates the condition. `Err` for anything but a boolean result: the caller fails closed.
    pub fn eval(
        &self,
        req: &Request,
        params: &[(&str, &str)],
        ctx: &EvalContext<'_>,
    ) -> Result<bool, String> {
        if let Some(fast) = &self.fast
            && let Ok(b) = fast.eval_bool(req, params, ctx)
        {
            return Ok(b);
        }
        self.eval_interpreted(req, params, ctx)
    }

    /// Evaluates with the CEL interpreter only.
    pub fn eval_interpreted(
        &self,
        req: &Request,
        params: &[(&str, &str)],
        ctx: &EvalContext<'_>,
    ) -> Result<bool, String> {
        // Values are built straight into CEL's `Val` types, borrowing from the request: no
        // intermediate `Value` tree, no string copies.
        let mut c = Context::with_env(ENV.clone());
        if self.uses & USES_SOURCE != 0 {
            c.add_variable_as_val("source", source_val(ctx));
        }
        if self.uses & USES_USER != 0 {
            c.add_variable_as_val("user", user_val(req));
        }
        if self.uses & USES_REQUEST != 0 {
            c.add_variable_as_val("request", request_val(req, ctx, self.uses_query)?);
        }
        if self.uses & USES_PARAMS != 0 {
            c.add_variable_as_val(
                "params",
                map(params.iter().map(|(k, v)| (*k, owned_str(decode_param(v))))),
            );
        }
        if self.uses & USES_TIME != 0 {
            let t = req
                .time
                .unwrap_or_else(|| chrono::Utc::now().fixed_offset());
            c.add_variable_as_val("time", Box::new(CelTimestamp::from(t)));
        }
        match self.program.execute(&c) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!(
                "condition returned {}, not a bool",
                other.type_of()
            )),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Scans a condition's text for `headers['name']`, `headers["name"]` and `headers.name`. Sound:
/// any other mention of `headers` means "could read any header" (`false`).
fn header_reads(src: &str, out: &mut std::collections::BTreeSet<String>) -> bool {
    let mut rest = src;
    while let Some(i) = rest.find("headers") {
        let after = rest.get(i + "headers".len()..).unwrap_or("");
        let trimmed = after.trim_start();
        let name = if let Some(r) = trimmed.strip_prefix('[') {
            let r = r.trim_start();
            let quote = r.chars().next().filter(|c| *c == '\'' || *c == '"');
            quote.and_then(|q| {
                let body = r.get(1..)?;
                let end = body.find(q)?;
                let name = body.get(..end)?;
                let close = body.get(end + 1..)?.trim_start();
                (close.starts_with(']') && !name.contains('\\')).then(|| name.to_owned())
            })
        } else if let Some(r) = trimmed.strip_prefix('.') {
            let name: String = r
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `headers.exists(…)`, `headers.all(…)`, `headers.size()`: a macro or method over
            // every header, not a header named `exists`.
            let call = r
                .get(name.len()..)
                .is_some_and(|rest| rest.trim_start().starts_with('('));
            (!name.is_empty() && !call).then_some(name)
        } else {
            None
        };
        match name {
            Some(n) => {
                out.insert(n.to_ascii_lowercase());
            }
            None => return false,
        }
        rest = after;
    }
    true
}

/// Parts of the request already normalized by the engine, shared by every condition of a decision.
#[derive(Debug, Default)]
pub struct EvalContext<'a> {
    /// The caller's full SPIFFE ID and local name.
    pub caller: Option<&'a crate::principal::Caller<'a>>,
    /// Normalized path.
    pub path: &'a str,
    /// Raw query.
    pub query: Option<&'a str>,
    /// Normalized host.
    pub host: &'a str,
}

type Val<'v> = Box<dyn cel::common::value::Val + 'v>;

fn str_val(s: &str) -> Val<'_> {
    Box::new(CelString::from(s))
}

fn owned_str(s: String) -> Val<'static> {
    Box::new(CelString::from(s))
}

fn map<'v>(entries: impl IntoIterator<Item = (&'v str, Val<'v>)>) -> Val<'v> {
    let m: HashMap<CelMapKey<'v>, Val<'v>> = entries
        .into_iter()
        .map(|(k, v)| (CelMapKey::from(k), v))
        .collect();
    Box::new(CelMap::from(m))
}

fn source_val<'v>(ctx: &EvalContext<'v>) -> Val<'v> {
    match ctx.caller {
        None => map([]),
        Some(c) => map([
            (
                "spiffe_id",
                Box::new(CelString::from(c.spiffe_id())) as Val<'v>,
            ),
            (
                "service",
                c.local_name()
                    .map_or_else(|| Box::new(CelNull) as Val<'v>, str_val),
            ),
        ]),
    }
}

/// Params are path segments in normalized spelling; conditions compare decoded text.
fn decode_param(v: &str) -> String {
    if !v.contains('%') {
        return v.to_owned();
    }
    let bytes = percent_decode(v);
    String::from_utf8_lossy(&bytes).into_owned()
}

fn user_val(req: &Request) -> Val<'_> {
    let Some(u) = &req.user else { return map([]) };
    let roles: Vec<Val<'_>> = u.roles.iter().map(|r| str_val(r)).collect();
    let claims = map(u.claims.iter().map(|(k, v)| (k.as_str(), json_val(v))));
    let act: Vec<Val<'_>> = u.act.iter().map(|a| str_val(a)).collect();
    let mut entries = vec![
        ("roles", Box::new(CelList::from(roles)) as Val<'_>),
        ("claims", claims),
        ("act", Box::new(CelList::from(act)) as Val<'_>),
    ];
    if let Some(sub) = &u.sub {
        entries.push(("sub", str_val(sub)));
    }
    map(entries)
}

fn request_val<'v>(
    req: &'v Request,
    ctx: &EvalContext<'v>,
    with_query: bool,
) -> Result<Val<'v>, String> {
    // Header names arrive in any case from JSON input; CEL sees them lower-case.
    let headers: HashMap<CelMapKey<'v>, Val<'v>> = req
        .request
        .headers
        .iter()
        .map(|(k, v)| {
            let key = if k.bytes().any(|b| b.is_ascii_uppercase()) {
                CelMapKey::from(k.to_ascii_lowercase())
            } else {
                CelMapKey::from(k.as_str())
            };
            (key, str_val(v))
        })
        .collect();
    let mut entries = vec![
        ("method", str_val(&req.request.method)),
        ("path", str_val(ctx.path)),
        ("host", str_val(ctx.host)),
        ("headers", Box::new(CelMap::from(headers)) as Val<'v>),
    ];
    if with_query {
        entries.push(("query", query_val(ctx.query)?));
    }
    Ok(map(entries))
}

/// The query as a map from name to every value (a list, so a repeated name cannot hide a value).
fn query_val(query: Option<&str>) -> Result<Val<'static>, String> {
    let mut m: HashMap<String, Vec<Val<'static>>> = HashMap::new();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dec = |s: &str| {
            String::from_utf8(percent_decode(&s.replace('+', " ")))
                .map_err(|_| "query is not valid UTF-8 once decoded".to_owned())
        };
        m.entry(dec(k)?).or_default().push(owned_str(dec(v)?));
    }
    let m: HashMap<CelMapKey<'static>, Val<'static>> = m
        .into_iter()
        .map(|(k, v)| {
            (
                CelMapKey::from(k),
                Box::new(CelList::from(v)) as Val<'static>,
            )
        })
        .collect();
    Ok(Box::new(CelMap::from(m)))
}

fn json_val(v: &serde_json::Value) -> Val<'_> {
    match v {
        serde_json::Value::Null => Box::new(CelNull),
        serde_json::Value::Bool(b) => Box::new(CelBool::from(*b)),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Box::new(CelInt::from(i))
            } else if let Some(u) = n.as_u64() {
                Box::new(CelUInt::from(u))
            } else {
                Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN)))
            }
        }
        serde_json::Value::String(s) => str_val(s),
        serde_json::Value::Array(a) => {
            Box::new(CelList::from(a.iter().map(json_val).collect::<Vec<_>>()))
        }
        serde_json::Value::Object(o) => map(o.iter().map(|(k, v)| (k.as_str(), json_val(v)))),
    }
}

/// Names bound by comprehensions (`x` in `list.exists(x, ...)`), which are not free variables.
fn collect_bound_vars<'a>(e: &'a Expr, out: &mut HashSet<&'a str>) {
    match e {
        Expr::Comprehension(c) => {
            out.insert(c.iter_var.as_str());
            if let Some(v2) = &c.iter_var2 {
                out.insert(v2.as_str());
            }
            out.insert(c.accu_var.as_str());
            for sub in [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ] {
                collect_bound_vars(&sub.expr, out);
            }
        }
        Expr::Call(call) => {
            if let Some(t) = &call.target {
                collect_bound_vars(&t.expr, out);
            }
            for a in &call.args {
                collect_bound_vars(&a.expr, out);
            }
        }
        Expr::List(l) => l
            .elements
            .iter()
            .for_each(|x| collect_bound_vars(&x.expr, out)),
        Expr::Map(m) => m.entries.iter().for_each(|x| entry_vars(&x.expr, out)),
        Expr::Struct(s) => s.entries.iter().for_each(|x| entry_vars(&x.expr, out)),
        Expr::Select(s) => collect_bound_vars(&s.operand.expr, out),
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
}

fn entry_vars<'a>(e: &'a EntryExpr, out: &mut HashSet<&'a str>) {
    match e {
        EntryExpr::StructField(f) => collect_bound_vars(&f.value.expr, out),
        EntryExpr::MapEntry(m) => {
            collect_bound_vars(&m.key.expr, out);
            collect_bound_vars(&m.value.expr, out);
        }
    }
}
