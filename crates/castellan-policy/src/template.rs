//! Path templates: `/orders/{id}` (one segment), `/files/{*rest}` (the non-empty remainder), and
//! exact literal paths.

use crate::normalize::normalize_path;

/// One segment of a [`PathTemplate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// A literal segment, in normalized spelling.
    Literal(String),
    /// `{name}`: exactly one non-empty segment.
    Param(String),
    /// `{*name}`: one or more remaining segments; only last.
    CatchAll(String),
}

/// A parsed path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    /// The template as written.
    pub source: String,
    /// Its segments; empty for `/`.
    pub segments: Vec<Segment>,
}

/// Why a template is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// Does not start with `/`.
    #[error("path template must start with '/'")]
    NoLeadingSlash,
    /// Ends with `/` (other than the root template).
    #[error(
        "path template must not end with '/' (a template matches with or without one trailing slash)"
    )]
    TrailingSlash,
    /// An empty segment (`//`).
    #[error("path template has an empty segment ('//')")]
    EmptySegment,
    /// A literal segment that normalization would change, e.g. `..` or `%2e`.
    #[error("literal segment {0:?} is not in normalized form (expected {1:?})")]
    NotNormalized(String, String),
    /// A literal segment that no normalized request can contain.
    #[error("literal segment {0:?} can never match a request: {1}")]
    Unmatchable(String, String),
    /// A `{` or `}` not forming a whole-segment parameter.
    #[error("a parameter must be a whole segment, like '{{id}}' or '{{*rest}}', in {0:?}")]
    PartialParam(String),
    /// A bad parameter name.
    #[error("invalid parameter name {0:?}: use letters, digits and '_', not starting with a digit")]
    BadParamName(String),
    /// The same name twice.
    #[error("parameter {0:?} appears twice")]
    DuplicateParam(String),
    /// `{*rest}` not at the end.
    #[error("catch-all parameter {{*{0}}} must be the last segment")]
    CatchAllNotLast(String),
}

impl PathTemplate {
    /// Parses a template.
    pub fn parse(source: &str) -> Result<PathTemplate, TemplateError> {
        let rest = source
            .strip_prefix('/')
            .ok_or(TemplateError::NoLeadingSlash)?;
        if rest.is_empty() {
            return Ok(PathTemplate {
                source: source.to_owned(),
                segments: Vec::new(),
            });
        }
        if rest.ends_with('/') {
            return Err(TemplateError::TrailingSlash);
        }
        let raw: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(raw.len());
        let mut names: Vec<&str> = Vec::new();
        for (i, seg) in raw.iter().enumerate() {
            if seg.is_empty() {
                return Err(TemplateError::EmptySegment);
            }
            if let Some(inner) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                let (catch_all, name) = match inner.strip_prefix('*') {
                    Some(n) => (true, n),
                    None => (false, inner),
                };
                if !is_param_name(name) {
                    return Err(TemplateError::BadParamName(name.to_owned()));
                }
                if names.contains(&name) {
                    return Err(TemplateError::DuplicateParam(name.to_owned()));
                }
                names.push(name);
                if catch_all {
                    if i + 1 != raw.len() {
                        return Err(TemplateError::CatchAllNotLast(name.to_owned()));
                    }
                    segments.push(Segment::CatchAll(name.to_owned()));
                } else {
                    segments.push(Segment::Param(name.to_owned()));
                }
                continue;
            }
            if seg.contains('{') || seg.contains('}') {
                return Err(TemplateError::PartialParam((*seg).to_owned()));
            }
            let as_path = format!("/{seg}");
            match normalize_path(&as_path) {
                Ok(n) if n == as_path => segments.push(Segment::Literal((*seg).to_owned())),
                Ok(n) => {
                    return Err(TemplateError::NotNormalized(
                        (*seg).to_owned(),
                        n.trim_start_matches('/').to_owned(),
                    ));
                }
                Err(e) => return Err(TemplateError::Unmatchable((*seg).to_owned(), e.to_string())),
            }
        }
        Ok(PathTemplate {
            source: source.to_owned(),
            segments,
        })
    }
}

fn is_param_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_templates() {
        let t = PathTemplate::parse("/orders/{id}/items/{*rest}").unwrap();
        assert_eq!(
            t.segments,
            vec![
                Segment::Literal("orders".into()),
                Segment::Param("id".into()),
                Segment::Literal("items".into()),
                Segment::CatchAll("rest".into()),
            ]
        );
        assert!(PathTemplate::parse("/").unwrap().segments.is_empty());
    }

    #[test]
    fn rejects_bad_templates() {
        use TemplateError::*;
        let cases = [
            ("orders", NoLeadingSlash),
            ("/orders/", TrailingSlash),
            ("/a//b", EmptySegment),
            ("/a/{id", PartialParam("{id".into())),
            ("/a/x{id}", PartialParam("x{id}".into())),
            ("/a/{1d}", BadParamName("1d".into())),
            ("/a/{}", BadParamName("".into())),
            ("/a/{id}/{id}", DuplicateParam("id".into())),
            ("/a/{*r}/b", CatchAllNotLast("r".into())),
            ("/a/.", NotNormalized(".".into(), "".into())),
            ("/a/%7e", NotNormalized("%7e".into(), "~".into())),
        ];
        for (src, want) in cases {
            assert_eq!(PathTemplate::parse(src).unwrap_err(), want, "{src}");
        }
        assert!(matches!(
            PathTemplate::parse("/a;b").unwrap_err(),
            Unmatchable(..)
        ));
        assert!(matches!(
            PathTemplate::parse("/..").unwrap_err(),
            Unmatchable(..)
        ));
        assert!(matches!(
            PathTemplate::parse("/a%2Fb").unwrap_err(),
            Unmatchable(..)
        ));
    }
}
