//! Loading a policy set from a directory tree or from in-memory documents.

use crate::engine::{PolicySet, SetOptions};
use crate::model::{AccessPolicy, MeshConfig, Mode};
use crate::parse::{Diagnostic, parse_policy_file};
use crate::yaml::Pos;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a policy set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The documents are invalid; every problem found is listed.
    #[error("{} error(s) in policies:\n{}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Diagnostic>),
}

/// Whether a file name is a policy test file (`*_test.yaml` / `*_test.yml`).
pub fn is_test_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with("_test.yaml") || n.ends_with("_test.yml"))
}

/// Every `.yaml`/`.yml` file below `dir`, sorted, skipping hidden entries.
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| LoadError::Io {
            path: d.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| LoadError::Io {
                path: d.clone(),
                source,
            })?;
            let path = entry.path();
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let ft = entry.file_type().map_err(|source| LoadError::Io {
                path: path.clone(),
                source,
            })?;
            if ft.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

impl PolicySet {
    /// Loads every policy file below `dir` (test files excluded).
    pub fn load_dir(dir: &Path) -> Result<PolicySet, LoadError> {
        let mut sources = Vec::new();
        for path in yaml_files(dir)? {
            if is_test_file(&path) {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Io {
                path: path.clone(),
                source,
            })?;
            sources.push((path.display().to_string(), text));
        }
        PolicySet::from_sources(sources.iter().map(|(n, t)| (n.as_str(), t.as_str())))
    }

    /// Loads a set from `(name, yaml)` pairs; names appear in error messages.
    pub fn from_sources<'a>(
        sources: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<PolicySet, LoadError> {
        let mut diags = Vec::new();
        let mut policies: Vec<AccessPolicy> = Vec::new();
        let mut mesh: Vec<MeshConfig> = Vec::new();
        let mut rate_limits = Vec::new();
        let mut names: HashMap<String, (Arc<str>, Pos)> = HashMap::new();
        for (name, text) in sources {
            let file: Arc<str> = Arc::from(name);
            let parsed = parse_policy_file(file.clone(), text, &mut diags);
            for (policy, pos) in parsed.names {
                if let Some((f, p)) = names.get(&policy) {
                    diags.push(Diagnostic {
                        file: file.clone(),
                        pos,
                        message: format!(
                            "duplicate policy name {policy:?} (first defined at {}:{}:{})",
                            f, p.line, p.col
                        ),
                    });
                } else {
                    names.insert(policy, (file.clone(), pos));
                }
            }
            policies.extend(parsed.policies);
            mesh.extend(parsed.mesh);
            rate_limits.extend(parsed.rate_limits);
        }
        check_set(&policies, &mesh, &mut diags);
        if !diags.is_empty() {
            diags.sort_by(|a, b| (&a.file, a.pos).cmp(&(&b.file, b.pos)));
            return Err(LoadError::Invalid(diags));
        }
        let options = mesh
            .first()
            .map(|m| SetOptions {
                trust_domain: m.trust_domain.clone(),
                default_mode: m.default_mode,
                context_issuers: m.context_issuers.clone(),
            })
            .unwrap_or_default();
        let mut set = PolicySet::compile(policies, options);
        set.set_rate_limits(rate_limits);
        Ok(set)
    }
}

/// Checks that span documents: one mode per service, one MeshConfig.
fn check_set(policies: &[AccessPolicy], mesh: &[MeshConfig], diags: &mut Vec<Diagnostic>) {
    let mut modes: HashMap<&str, (Mode, &str)> = HashMap::new();
    for p in policies {
        match modes.get(p.service.as_str()) {
            Some((mode, other)) if *mode != p.mode => diags.push(Diagnostic {
                file: p.origin.file.clone(),
                pos: p.origin.pos,
                message: format!(
                    "policy {:?} sets mode {} for service {:?} but policy {:?} sets {}: all policies of a service must agree",
                    p.name, p.mode, p.service, other, mode
                ),
            }),
            Some(_) => {}
            None => {
                modes.insert(&p.service, (p.mode, &p.name));
            }
        }
    }
    for m in mesh.iter().skip(1) {
        diags.push(Diagnostic {
            file: m.origin.file.clone(),
            pos: m.origin.pos,
            message: "only one MeshConfig document is allowed".to_owned(),
        });
    }
}
