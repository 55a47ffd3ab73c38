//! A native evaluator for the common shapes of conditions — comparisons of request attributes and
//! literals joined by `&&`, `||`, `!` and `in` — that reads the request in place instead of
//! building CEL maps. Anything it is not sure of (other types, missing keys, other functions)
//! answers [`Unsure`], and the CEL interpreter decides; so a result from here is always the one
//! the interpreter would give. The differential test in this module checks that.

use crate::condition::EvalContext;
use crate::request::Request;
use cel::common::ast::{Expr, LiteralValue};

/// The fast evaluator cannot answer; use the interpreter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsure;

/// A request attribute a fast expression reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    SourceService,
    SourceSpiffeId,
    UserSub,
    UserRoles,
    UserClaim(String),
    RequestMethod,
    RequestPath,
    RequestHost,
    RequestHeader(String),
    Param(String),
}

/// A compiled fast expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Fast {
    Str(String),
    Int(i64),
    Bool(bool),
    StrList(Vec<String>),
    Attr(Attr),
    Eq(Box<Fast>, Box<Fast>),
    Ne(Box<Fast>, Box<Fast>),
    Cmp(&'static str, Box<Fast>, Box<Fast>),
    And(Box<Fast>, Box<Fast>),
    Or(Box<Fast>, Box<Fast>),
    Not(Box<Fast>),
    In(Box<Fast>, Box<Fast>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum V<'a> {
    Str(&'a str),
    Int(i64),
    Bool(bool),
    StrList(&'a [String]),
}

/// Compiles the supported subset; `None` when the expression uses anything else.
pub fn compile(e: &Expr) -> Option<Fast> {
    match e {
        Expr::Literal(LiteralValue::String(s)) => Some(Fast::Str(s.inner().to_owned())),
        Expr::Literal(LiteralValue::Int(i)) => Some(Fast::Int(*i.inner())),
        Expr::Literal(LiteralValue::Boolean(b)) => Some(Fast::Bool(*b.inner())),
        Expr::List(l) if l.optional_indices.is_empty() => {
            let items: Option<Vec<String>> = l
                .elements
                .iter()
                .map(|x| match &x.expr {
                    Expr::Literal(LiteralValue::String(s)) => Some(s.inner().to_owned()),
                    _ => None,
                })
                .collect();
            items.map(Fast::StrList)
        }
        Expr::Select(_) | Expr::Ident(_) => attr(e).map(Fast::Attr),
        Expr::Call(c) if c.target.is_none() => {
            let arg = |i: usize| c.args.get(i).and_then(|a| compile(&a.expr)).map(Box::new);
            match (c.func_name.as_str(), c.args.len()) {
                ("_==_", 2) => Some(Fast::Eq(arg(0)?, arg(1)?)),
                ("_!=_", 2) => Some(Fast::Ne(arg(0)?, arg(1)?)),
                (op @ ("_<_" | "_<=_" | "_>_" | "_>=_"), 2) => {
                    let op: &'static str = match op {
                        "_<_" => "<",
                        "_<=_" => "<=",
                        "_>_" => ">",
                        _ => ">=",
                    };
                    Some(Fast::Cmp(op, arg(0)?, arg(1)?))
                }
                ("_&&_", 2) => Some(Fast::And(arg(0)?, arg(1)?)),
                ("_||_", 2) => Some(Fast::Or(arg(0)?, arg(1)?)),
                ("!_", 1) => Some(Fast::Not(arg(0)?)),
                ("@in", 2) => Some(Fast::In(arg(0)?, arg(1)?)),
                ("_[_]", 2) => attr(e).map(Fast::Attr),
                _ => None,
            }
        }
        _ => None,
    }
}

/// `a.b.c` or `a.b['c']` chains naming one request attribute.
fn attr(e: &Expr) -> Option<Attr> {
    let mut path: Vec<&str> = Vec::new();
    let mut cur = e;
    loop {
        match cur {
            Expr::Select(s) if !s.test => {
                path.push(&s.field);
                cur = &s.operand.expr;
            }
            Expr::Call(c) if c.func_name == "_[_]" && c.target.is_none() && c.args.len() == 2 => {
                match c.args.get(1).map(|a| &a.expr) {
                    Some(Expr::Literal(LiteralValue::String(s))) => path.push(s.inner()),
                    _ => return None,
                }
                cur = &c.args.first()?.expr;
            }
            Expr::Ident(name) => {
                path.push(name);
                break;
            }
            _ => return None,
        }
    }
    path.reverse();
    match path.as_slice() {
        ["source", "service"] => Some(Attr::SourceService),
        ["source", "spiffe_id"] => Some(Attr::SourceSpiffeId),
        ["user", "sub"] => Some(Attr::UserSub),
        ["user", "roles"] => Some(Attr::UserRoles),
        ["user", "claims", c] => Some(Attr::UserClaim((*c).to_owned())),
        ["request", "method"] => Some(Attr::RequestMethod),
        ["request", "path"] => Some(Attr::RequestPath),
        ["request", "host"] => Some(Attr::RequestHost),
        // Header names are lower-case in CEL; an upper-case key can never be found there.
        ["request", "headers", h] if !h.bytes().any(|b| b.is_ascii_uppercase()) => {
            Some(Attr::RequestHeader((*h).to_owned()))
        }
        ["params", p] => Some(Attr::Param((*p).to_owned())),
        _ => None,
    }
}

impl Fast {
    /// Evaluates to a boolean, or [`Unsure`].
    pub fn eval_bool(
        &self,
        req: &Request,
        params: &[(&str, &str)],
        ctx: &EvalContext<'_>,
    ) -> Result<bool, Unsure> {
        match self.eval(req, params, ctx)? {
            V::Bool(b) => Ok(b),
            _ => Err(Unsure),
        }
    }

    fn eval<'a>(
        &'a self,
        req: &'a Request,
        params: &[(&'a str, &'a str)],
        ctx: &EvalContext<'a>,
    ) -> Result<V<'a>, Unsure> {
        Ok(match self {
            Fast::Str(s) => V::Str(s),
            Fast::Int(i) => V::Int(*i),
            Fast::Bool(b) => V::Bool(*b),
            Fast::StrList(l) => V::StrList(l),
            Fast::Attr(a) => read(a, req, params, ctx)?,
            Fast::Eq(a, b) | Fast::Ne(a, b) => {
                let eq = match (a.eval(req, params, ctx)?, b.eval(req, params, ctx)?) {
                    (V::Str(x), V::Str(y)) => x == y,
                    (V::Int(x), V::Int(y)) => x == y,
                    (V::Bool(x), V::Bool(y)) => x == y,
                    _ => return Err(Unsure),
                };
                V::Bool(if matches!(self, Fast::Eq(..)) {
                    eq
                } else {
                    !eq
                })
            }
            Fast::Cmp(op, a, b) => {
                let ord = match (a.eval(req, params, ctx)?, b.eval(req, params, ctx)?) {
                    (V::Str(x), V::Str(y)) => x.cmp(y),
                    (V::Int(x), V::Int(y)) => x.cmp(&y),
                    _ => return Err(Unsure),
                };
                V::Bool(match *op {
                    "<" => ord.is_lt(),
                    "<=" => ord.is_le(),
                    ">" => ord.is_gt(),
                    _ => ord.is_ge(),
                })
            }
            // CEL's && and || absorb an error on either side when the other side decides; an
            // unsure side therefore only matters when the other does not decide.
            Fast::And(a, b) => match (a.eval(req, params, ctx), b.eval(req, params, ctx)) {
                (Ok(V::Bool(false)), Ok(V::Bool(_)) | Err(_)) | (Err(_), Ok(V::Bool(false))) => {
                    V::Bool(false)
                }
                (Ok(V::Bool(true)), Ok(V::Bool(false))) => V::Bool(false),
                (Ok(V::Bool(true)), Ok(V::Bool(true))) => V::Bool(true),
                _ => return Err(Unsure),
            },
            Fast::Or(a, b) => match (a.eval(req, params, ctx), b.eval(req, params, ctx)) {
                (Ok(V::Bool(true)), Ok(V::Bool(_)) | Err(_)) | (Err(_), Ok(V::Bool(true))) => {
                    V::Bool(true)
                }
                (Ok(V::Bool(false)), Ok(V::Bool(true))) => V::Bool(true),
                (Ok(V::Bool(false)), Ok(V::Bool(false))) => V::Bool(false),
                _ => return Err(Unsure),
            },
            Fast::Not(a) => match a.eval(req, params, ctx)? {
                V::Bool(b) => V::Bool(!b),
                _ => return Err(Unsure),
            },
            Fast::In(a, b) => match (a.eval(req, params, ctx)?, b.eval(req, params, ctx)?) {
                (V::Str(x), V::StrList(l)) => V::Bool(l.iter().any(|i| i == x)),
                _ => return Err(Unsure),
            },
        })
    }
}

fn read<'a>(
    a: &Attr,
    req: &'a Request,
    params: &[(&'a str, &'a str)],
    ctx: &EvalContext<'a>,
) -> Result<V<'a>, Unsure> {
    let json = |v: &'a serde_json::Value| match v {
        serde_json::Value::String(s) => Ok(V::Str(s)),
        serde_json::Value::Bool(b) => Ok(V::Bool(*b)),
        serde_json::Value::Number(n) => n.as_i64().map(V::Int).ok_or(Unsure),
        _ => Err(Unsure),
    };
    match a {
        Attr::SourceService => ctx
            .caller
            .and_then(|c| c.local_name())
            .map(V::Str)
            .ok_or(Unsure),
        Attr::SourceSpiffeId => ctx
            .caller
            .and_then(|c| c.given_spiffe_id())
            .map(V::Str)
            .ok_or(Unsure),
        Attr::UserSub => req
            .user
            .as_ref()
            .and_then(|u| u.sub.as_deref())
            .map(V::Str)
            .ok_or(Unsure),
        Attr::UserRoles => req
            .user
            .as_ref()
            .map(|u| V::StrList(&u.roles))
            .ok_or(Unsure),
        Attr::UserClaim(c) => req
            .user
            .as_ref()
            .and_then(|u| u.claims.get(c))
            .ok_or(Unsure)
            .and_then(json),
        Attr::RequestMethod => Ok(V::Str(&req.request.method)),
        Attr::RequestPath => Ok(V::Str(ctx.path)),
        Attr::RequestHost => Ok(V::Str(ctx.host)),
        Attr::RequestHeader(h) => {
            let mut found = req
                .request
                .headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(h));
            match (found.next(), found.next()) {
                (Some((_, v)), None) => Ok(V::Str(v)),
                _ => Err(Unsure),
            }
        }
        Attr::Param(p) => params
            .iter()
            .find(|(k, _)| k == p)
            .filter(|(_, v)| !v.contains('%'))
            .map(|(_, v)| V::Str(v))
            .ok_or(Unsure),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::condition::Condition;
    use crate::principal::Caller;
    use proptest::prelude::*;

    const EXPRS: &[&str] = &[
        "params.id == user.claims.customer_id",
        "params.id == user.claims.customer_id || 'support' in user.roles",
        "request.headers['x-tenant'] == user.claims.tenant",
        "request.headers.x_debug == 'on' && user.claims.level >= 3",
        "user.claims.level > 2 || user.claims.level < 0",
        "!(request.method in ['GET', 'HEAD']) && source.service != 'gateway'",
        "user.claims.admin == true",
        "user.sub <= 'm' && request.path != '/x'",
        "source.spiffe_id == 'spiffe://castellan.local/svc/gateway'",
        "request.host == 'orders' || user.claims.missing == 'x'",
        "user.claims.missing == 'x' || request.host == 'orders'",
        "user.claims.level == 'high'",
    ];

    fn gen_request() -> impl Strategy<Value = (Request, Option<String>, String)> {
        let claim = prop_oneof![
            Just(None),
            Just(Some(serde_json::json!("42"))),
            Just(Some(serde_json::json!(42))),
            Just(Some(serde_json::json!(3))),
            Just(Some(serde_json::json!(-1))),
            Just(Some(serde_json::json!(true))),
            Just(Some(serde_json::json!(["a"]))),
            Just(Some(serde_json::json!(1.5))),
        ];
        (
            prop::option::of(prop::sample::select(vec!["support", "customer"])),
            claim.clone(),
            claim.clone(),
            claim,
            prop::option::of(prop::sample::select(vec!["t1", "t2"])),
            prop::option::of(prop::sample::select(vec!["gateway", "orders"])),
            prop::sample::select(vec!["GET", "POST", "HEAD"]),
            prop::sample::select(vec!["42", "43", "a%20b"]),
            any::<bool>(),
            prop::option::of(prop::sample::select(vec!["alice", "zed"])),
        )
            .prop_map(|(role, cid, level, admin, tenant, src, method, id, has_user, sub)| {
                let mut claims = serde_json::Map::new();
                for (k, v) in [("customer_id", cid), ("level", level), ("admin", admin), ("tenant", tenant.map(|t| serde_json::json!(t)))] {
                    if let Some(v) = v {
                        claims.insert(k.to_owned(), v);
                    }
                }
                let mut v = serde_json::json!({"destination": {"service": "orders"},
                    "request": {"method": method, "path": "/x", "host": "orders",
                                "headers": {"x-tenant": "t1", "X_Debug": "on"}}});
                if has_user {
                    v["user"] = serde_json::json!({"roles": role.into_iter().collect::<Vec<_>>(), "claims": claims});
                    if let Some(s) = sub {
                        v["user"]["sub"] = serde_json::json!(s);
                    }
                }
                (serde_json::from_value(v).unwrap(), src.map(str::to_owned), id.to_owned())
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Whenever the fast path answers, the interpreter answers the same.
        #[test]
        fn fast_path_agrees_with_the_interpreter((req, src, id) in gen_request(), which in 0..EXPRS.len()) {
            let cond = Condition::compile(EXPRS[which]).unwrap();
            let caller = src.as_deref().map(|s| Caller::resolve("castellan.local", Some(s), None).unwrap().unwrap());
            let ctx = EvalContext { caller: caller.as_ref(), path: "/x", query: None, host: "orders" };
            let params = [("id", id.as_str())];
            let fast = compile(&cel::Program::compile(EXPRS[which]).unwrap().expression().expr).unwrap();
            let interpreted = cond.eval_interpreted(&req, &params, &ctx);
            if let Ok(b) = fast.eval_bool(&req, &params, &ctx) {
                prop_assert_eq!(Ok(b), interpreted, "{}", EXPRS[which]);
            }
            // Through the public entry point the answer is the interpreter's, fast path or not.
            prop_assert_eq!(cond.eval(&req, &params, &ctx), cond.eval_interpreted(&req, &params, &ctx));
        }
    }

    #[test]
    fn the_fast_path_answers_the_common_shapes() {
        let req: Request = serde_json::from_value(serde_json::json!({
            "user": {"sub": "alice", "roles": ["customer"], "claims": {"customer_id": "42", "tenant": "t1", "level": 3, "admin": false}},
            "destination": {"service": "orders"},
            "request": {"method": "GET", "path": "/x", "host": "orders", "headers": {"x-tenant": "t1", "x_debug": "on"}}})).unwrap();
        let caller = Caller::resolve(
            "castellan.local",
            None,
            Some("spiffe://castellan.local/svc/gateway"),
        )
        .unwrap();
        let ctx = EvalContext {
            caller: caller.as_ref(),
            path: "/x",
            query: None,
            host: "orders",
        };
        for src in &EXPRS[..EXPRS.len() - 1] {
            let fast = compile(&cel::Program::compile(src).unwrap().expression().expr).unwrap();
            assert!(fast.eval_bool(&req, &[("id", "42")], &ctx).is_ok(), "{src}");
        }
    }

    #[test]
    fn unsupported_shapes_are_not_compiled() {
        for src in [
            "user.roles.exists(r, r == 'a')",
            "size(user.roles) > 0",
            "time.getHours() < 3",
            "request.query.a[0] == 'x'",
            "has(user.sub)",
            "1 + 2 == 3",
        ] {
            let p = cel::Program::compile(src).unwrap();
            assert!(compile(&p.expression().expr).is_none(), "{src}");
        }
    }
}
