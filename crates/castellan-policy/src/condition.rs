//! CEL conditions (`when:`): compiled once at load, evaluated with only the variables they use.

use crate::request::Request;
use cel::common::ast::{EntryExpr, Expr};
use cel::objects::{Key, Map};
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
            program,
            uses,
        })
    }

    /// The condition as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the condition. `Err` for anything but a boolean result: the caller fails closed.
    pub fn eval(
        &self,
        req: &Request,
        params: &[(&str, &str)],
        ctx: &EvalContext<'_>,
    ) -> Result<bool, String> {
        let mut c = Context::with_env(ENV.clone());
        if self.uses & USES_SOURCE != 0 {
            c.add_variable_from_value("source", ctx.source_value());
        }
        if self.uses & USES_USER != 0 {
            c.add_variable_from_value("user", user_value(req));
        }
        if self.uses & USES_REQUEST != 0 {
            c.add_variable_from_value("request", request_value(req, ctx)?);
        }
        if self.uses & USES_PARAMS != 0 {
            let m: HashMap<Key, Value> = params
                .iter()
                .map(|(k, v)| (Key::from((*k).to_owned()), Value::from(decode_param(v))))
                .collect();
            c.add_variable_from_value("params", Value::Map(Map { map: Arc::new(m) }));
        }
        if self.uses & USES_TIME != 0 {
            let t = req
                .time
                .unwrap_or_else(|| chrono::Utc::now().fixed_offset());
            c.add_variable_from_value("time", Value::Timestamp(t));
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

/// Parts of the request already normalized by the engine, shared by every condition of a decision.
#[derive(Debug)]
pub struct EvalContext<'a> {
    /// The caller's full SPIFFE ID and local name.
    pub caller: Option<&'a crate::principal::Caller>,
    /// Normalized path.
    pub path: &'a str,
    /// Raw query.
    pub query: Option<&'a str>,
    /// Normalized host.
    pub host: &'a str,
}

impl EvalContext<'_> {
    fn source_value(&self) -> Value {
        let mut m: HashMap<Key, Value> = HashMap::new();
        if let Some(c) = self.caller {
            m.insert(
                Key::from("spiffe_id".to_owned()),
                Value::from(c.spiffe_id.clone()),
            );
            m.insert(
                Key::from("service".to_owned()),
                c.local_name.clone().map_or(Value::Null, Value::from),
            );
        }
        Value::Map(Map { map: Arc::new(m) })
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

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|x| (*x as char).to_digit(16)),
                b.get(i + 2).and_then(|x| (*x as char).to_digit(16)),
            )
        {
            out.push(u8::try_from(h * 16 + l).unwrap_or(0));
            i += 3;
            continue;
        }
        out.push(c);
        i += 1;
    }
    out
}

fn user_value(req: &Request) -> Value {
    let mut m: HashMap<Key, Value> = HashMap::new();
    if let Some(u) = &req.user {
        if let Some(sub) = &u.sub {
            m.insert(Key::from("sub".to_owned()), Value::from(sub.clone()));
        }
        m.insert(
            Key::from("roles".to_owned()),
            Value::List(Arc::new(
                u.roles.iter().map(|r| Value::from(r.clone())).collect(),
            )),
        );
        let claims: HashMap<Key, Value> = u
            .claims
            .iter()
            .map(|(k, v)| (Key::from(k.clone()), json_to_cel(v)))
            .collect();
        m.insert(
            Key::from("claims".to_owned()),
            Value::Map(Map {
                map: Arc::new(claims),
            }),
        );
    }
    Value::Map(Map { map: Arc::new(m) })
}

fn request_value(req: &Request, ctx: &EvalContext<'_>) -> Result<Value, String> {
    let mut m: HashMap<Key, Value> = HashMap::new();
    m.insert(
        Key::from("method".to_owned()),
        Value::from(req.request.method.clone()),
    );
    m.insert(
        Key::from("path".to_owned()),
        Value::from(ctx.path.to_owned()),
    );
    m.insert(
        Key::from("host".to_owned()),
        Value::from(ctx.host.to_owned()),
    );
    let headers: HashMap<Key, Value> = req
        .request
        .headers
        .iter()
        .map(|(k, v)| (Key::from(k.to_ascii_lowercase()), Value::from(v.clone())))
        .collect();
    m.insert(
        Key::from("headers".to_owned()),
        Value::Map(Map {
            map: Arc::new(headers),
        }),
    );
    m.insert(Key::from("query".to_owned()), query_value(ctx.query)?);
    Ok(Value::Map(Map { map: Arc::new(m) }))
}

/// The query as a map from name to every value (a list, so a repeated name cannot hide a value).
fn query_value(query: Option<&str>) -> Result<Value, String> {
    let mut m: HashMap<String, Vec<Value>> = HashMap::new();
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
        m.entry(dec(k)?).or_default().push(Value::from(dec(v)?));
    }
    let m: HashMap<Key, Value> = m
        .into_iter()
        .map(|(k, v)| (Key::from(k), Value::List(Arc::new(v))))
        .collect();
    Ok(Value::Map(Map { map: Arc::new(m) }))
}

fn json_to_cel(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else {
                Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::from(s.clone()),
        serde_json::Value::Array(a) => Value::List(Arc::new(a.iter().map(json_to_cel).collect())),
        serde_json::Value::Object(o) => {
            let m: HashMap<Key, Value> = o
                .iter()
                .map(|(k, v)| (Key::from(k.clone()), json_to_cel(v)))
                .collect();
            Value::Map(Map { map: Arc::new(m) })
        }
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
