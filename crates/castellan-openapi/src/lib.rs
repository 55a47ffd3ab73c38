//! Request validation against a service's OpenAPI 3.0/3.1 document, before the app sees the
//! request: unknown method or path → 404, missing or mistyped path/query parameters → 400, a
//! content type the operation does not take → 415, a JSON body that fails its schema → 400. The
//! problem detail names the failing field and the schema keyword, never the value sent.
//! `$ref`s are not resolved yet: a spec that uses them for parameters or bodies is refused when
//! it is compiled. The control plane compiles every document it is given with this same
//! compiler, so it never stores one that every proxy would refuse.

use jsonschema::Validator;
use serde_json::Value;

#[derive(Debug)]
enum Seg {
    Lit(String),
    Var(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum In {
    Path,
    Query,
}

struct Param {
    name: String,
    location: In,
    required: bool,
    ty: String,
    validator: Validator,
}

struct Op {
    method: String,
    segments: Vec<Seg>,
    params: Vec<Param>,
    body_required: bool,
    content: Vec<(String, Option<Validator>)>,
}

/// A compiled OpenAPI document.
pub struct ApiSpec {
    ops: Vec<Op>,
}

impl std::fmt::Debug for ApiSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiSpec")
            .field("operations", &self.ops.len())
            .finish()
    }
}

/// Why a request does not fit the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// 404, 400 or 415.
    pub status: u16,
    /// Names the field and the rule, never the value.
    pub detail: String,
}

fn v(status: u16, detail: impl Into<String>) -> Violation {
    Violation {
        status,
        detail: detail.into(),
    }
}

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn has_ref(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.contains_key("$ref") || m.values().any(has_ref),
        Value::Array(a) => a.iter().any(has_ref),
        _ => false,
    }
}

fn compile_schema(schema: &Value, what: &str) -> Result<Validator, String> {
    if has_ref(schema) {
        return Err(format!("{what}: $ref is not supported yet"));
    }
    jsonschema::validator_for(schema).map_err(|e| format!("{what}: invalid schema: {e}"))
}

impl ApiSpec {
    /// Compiles an OpenAPI document (as JSON).
    pub fn compile(doc: &Value) -> Result<ApiSpec, String> {
        let version = doc
            .get("openapi")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !version.starts_with("3.") {
            return Err("not an OpenAPI 3.x document".to_owned());
        }
        let paths = doc
            .get("paths")
            .and_then(Value::as_object)
            .ok_or("no paths")?;
        let mut ops = Vec::new();
        for (template, item) in paths {
            let segments: Vec<Seg> = template
                .trim_start_matches('/')
                .split('/')
                .filter(|s| !s.is_empty())
                .map(
                    |s| match s.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
                        Some(name) => Seg::Var(name.to_owned()),
                        None => Seg::Lit(s.to_owned()),
                    },
                )
                .collect();
            let shared = item
                .get("parameters")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for m in METHODS {
                let Some(op) = item.get(*m) else { continue };
                let mut params = Vec::new();
                for p in shared.iter().chain(
                    op.get("parameters")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten(),
                ) {
                    let name = p
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or(format!("{template}: a parameter without name"))?
                        .to_owned();
                    let location = match p.get("in").and_then(Value::as_str) {
                        Some("path") => In::Path,
                        Some("query") => In::Query,
                        _ => continue, // headers and cookies: not validated yet
                    };
                    let schema = p.get("schema").cloned().unwrap_or(Value::Bool(true));
                    params.push(Param {
                        ty: schema
                            .get("type")
                            .and_then(Value::as_str)
                            .unwrap_or("string")
                            .to_owned(),
                        validator: compile_schema(
                            &schema,
                            &format!("{m} {template} parameter {name}"),
                        )?,
                        required: location == In::Path
                            || p.get("required").and_then(Value::as_bool).unwrap_or(false),
                        name,
                        location,
                    });
                }
                let body = op.get("requestBody");
                let mut content = Vec::new();
                if let Some(c) = body
                    .and_then(|b| b.get("content"))
                    .and_then(Value::as_object)
                {
                    for (media, mt) in c {
                        let validator = match mt.get("schema") {
                            Some(s) if media.contains("json") => {
                                Some(compile_schema(s, &format!("{m} {template} body"))?)
                            }
                            _ => None,
                        };
                        content.push((media.to_ascii_lowercase(), validator));
                    }
                }
                ops.push(Op {
                    method: m.to_ascii_uppercase(),
                    segments: segments
                        .iter()
                        .map(|s| match s {
                            Seg::Lit(l) => Seg::Lit(l.clone()),
                            Seg::Var(x) => Seg::Var(x.clone()),
                        })
                        .collect(),
                    params,
                    body_required: body
                        .and_then(|b| b.get("required"))
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    content,
                });
            }
        }
        Ok(ApiSpec { ops })
    }

    fn matches<'p>(op: &Op, parts: &[&'p str]) -> Option<Vec<(String, &'p str)>> {
        if op.segments.len() != parts.len() {
            return None;
        }
        let mut vars = Vec::new();
        for (s, p) in op.segments.iter().zip(parts) {
            match s {
                Seg::Lit(l) if l == p => {}
                Seg::Lit(_) => return None,
                Seg::Var(name) => vars.push((name.clone(), *p)),
            }
        }
        Some(vars)
    }

    /// Checks a request (normalized path, raw query, content type, body).
    pub fn check(
        &self,
        method: &str,
        path: &str,
        query: Option<&str>,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<(), Violation> {
        let parts: Vec<&str> = path
            .trim_start_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let candidates: Vec<(&Op, Vec<(String, &str)>)> = self
            .ops
            .iter()
            .filter_map(|op| Self::matches(op, &parts).map(|v| (op, v)))
            .collect();
        if candidates.is_empty() {
            return Err(v(404, "no such path in the service's API"));
        }
        // A literal segment beats a template variable (OpenAPI path matching).
        let Some((op, vars)) = candidates
            .into_iter()
            .filter(|(op, _)| op.method == method)
            .min_by_key(|(op, _)| {
                op.segments
                    .iter()
                    .filter(|s| matches!(s, Seg::Var(_)))
                    .count()
            })
        else {
            return Err(v(
                404,
                format!("method {method} is not in the service's API for this path"),
            ));
        };
        let query: Vec<(String, String)> = query
            .unwrap_or("")
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, val) = kv.split_once('=').unwrap_or((kv, ""));
                (form_decode(k), form_decode(val))
            })
            .collect();
        for p in &op.params {
            let raw = match p.location {
                In::Path => vars
                    .iter()
                    .find(|(n, _)| *n == p.name)
                    .map(|(_, v)| form_decode(v)),
                In::Query => query
                    .iter()
                    .find(|(k, _)| *k == p.name)
                    .map(|(_, v)| v.clone()),
            };
            let where_ = if p.location == In::Path {
                "path"
            } else {
                "query"
            };
            let Some(raw) = raw else {
                if p.required {
                    return Err(v(
                        400,
                        format!("{where_} parameter {:?} is required", p.name),
                    ));
                }
                continue;
            };
            let typed = match p.ty.as_str() {
                "integer" => raw.parse::<i64>().ok().map(Value::from),
                "number" => raw.parse::<f64>().ok().map(Value::from),
                "boolean" => match raw.as_str() {
                    "true" => Some(Value::Bool(true)),
                    "false" => Some(Value::Bool(false)),
                    _ => None,
                },
                _ => Some(Value::String(raw)),
            };
            let Some(typed) = typed else {
                return Err(v(
                    400,
                    format!("{where_} parameter {:?} must be {}", p.name, p.ty),
                ));
            };
            if let Err(e) = p.validator.validate(&typed) {
                let keyword = e
                    .schema_path()
                    .as_str()
                    .rsplit('/')
                    .next()
                    .unwrap_or("schema")
                    .to_owned();
                return Err(v(
                    400,
                    format!("{where_} parameter {:?} violates {keyword:?}", p.name),
                ));
            }
        }
        if op.content.is_empty() {
            return Ok(());
        }
        if body.is_empty() {
            return if op.body_required {
                Err(v(400, "a request body is required"))
            } else {
                Ok(())
            };
        }
        let media = content_type
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let Some((_, validator)) = op.content.iter().find(|(m, _)| *m == media) else {
            return Err(v(
                415,
                format!(
                    "content type must be one of: {}",
                    op.content
                        .iter()
                        .map(|(m, _)| m.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        };
        if let Some(validator) = validator {
            let instance: Value =
                serde_json::from_slice(body).map_err(|_| v(400, "the body is not valid JSON"))?;
            if let Err(e) = validator.validate(&instance) {
                let field = e.instance_path().as_str().to_owned();
                let keyword = e
                    .schema_path()
                    .as_str()
                    .rsplit('/')
                    .next()
                    .unwrap_or("schema")
                    .to_owned();
                let field = if field.is_empty() {
                    "(the body)".to_owned()
                } else {
                    field
                };
                return Err(v(400, format!("body field {field} violates {keyword:?}")));
            }
        }
        Ok(())
    }
}

/// Percent-decodes a form or path component (`+` is a space in queries).
fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'+' => out.push(b' '),
            b'%' => match b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(x) => {
                    out.push(x);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ApiSpec {
        let text = include_str!("../../../examples/demo/openapi/orders.yaml");
        let yaml = yaml_rust2::YamlLoader::load_from_str(text).unwrap();
        ApiSpec::compile(&to_json(&yaml[0])).unwrap()
    }

    fn to_json(y: &yaml_rust2::Yaml) -> Value {
        use yaml_rust2::Yaml;
        match y {
            Yaml::Real(s) => s
                .parse::<f64>()
                .map_or(Value::String(s.clone()), Value::from),
            Yaml::Integer(i) => Value::from(*i),
            Yaml::String(s) => Value::String(s.clone()),
            Yaml::Boolean(b) => Value::Bool(*b),
            Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
            Yaml::Hash(h) => Value::Object(
                h.iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().map_or_else(|| format!("{k:?}"), str::to_owned),
                            to_json(v),
                        )
                    })
                    .collect(),
            ),
            _ => Value::Null,
        }
    }

    #[test]
    fn requests_are_checked_against_the_orders_api() {
        let s = spec();
        let json = Some("application/json");
        assert_eq!(s.check("GET", "/orders/42", None, None, b""), Ok(()));
        assert_eq!(
            s.check("GET", "/orders/42", Some("expand=true"), None, b""),
            Ok(())
        );
        assert_eq!(
            s.check("GET", "/orders/abc", None, None, b"")
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            s.check("GET", "/orders/0", None, None, b"")
                .unwrap_err()
                .detail,
            "path parameter \"id\" violates \"minimum\""
        );
        assert_eq!(
            s.check("GET", "/orders/42", Some("expand=maybe"), None, b"")
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            s.check("DELETE", "/orders/42", None, None, b"")
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(
            s.check("GET", "/nowhere", None, None, b"")
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(
            s.check(
                "POST",
                "/orders",
                None,
                json,
                br#"{"item_id": 7, "quantity": 2}"#
            ),
            Ok(())
        );
        let e = s
            .check(
                "POST",
                "/orders",
                None,
                json,
                br#"{"item_id": 7, "quantity": 1000}"#,
            )
            .unwrap_err();
        assert_eq!(
            (e.status, e.detail.as_str()),
            (400, "body field /quantity violates \"maximum\"")
        );
        let e = s
            .check(
                "POST",
                "/orders",
                None,
                json,
                br#"{"item_id": "<script>", "quantity": 1}"#,
            )
            .unwrap_err();
        assert!(
            !e.detail.contains("<script>"),
            "the value is never echoed: {}",
            e.detail
        );
        assert_eq!(
            s.check("POST", "/orders", None, json, br#"{"quantity": 1}"#)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            s.check("POST", "/orders", None, Some("text/plain"), b"hi")
                .unwrap_err()
                .status,
            415
        );
        assert_eq!(
            s.check("POST", "/orders", None, json, b"{not json")
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            s.check("POST", "/orders", None, json, b"")
                .unwrap_err()
                .detail,
            "a request body is required"
        );
        assert_eq!(s.check("GET", "/admin/stats", None, None, b""), Ok(()));
        assert_eq!(
            s.check("GET", "/admin/secrets", None, None, b"")
                .unwrap_err()
                .status,
            400
        );
    }
}
