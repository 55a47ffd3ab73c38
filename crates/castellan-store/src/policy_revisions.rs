//! Policy revisions: every applied policy, newest in force.

use crate::{Store, StoreError};

/// A stored policy revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRevision {
    /// Revision number; strictly increasing.
    pub rev: i64,
    /// Who applied it (admin credential name).
    pub author: String,
    /// When.
    pub created_at: i64,
    /// SHA-256 of the files, hex.
    pub content_hash: String,
    /// The policy files: a JSON object, file name → YAML text.
    pub files: String,
    /// Why (e.g. `rollback to 3`).
    pub comment: String,
}

/// `(rev, author, created_at, content_hash, files, comment)`.
type RevisionTuple = (i64, String, i64, String, String, String);

fn revision(
    (rev, author, created_at, content_hash, files, comment): RevisionTuple,
) -> PolicyRevision {
    PolicyRevision {
        rev,
        author,
        created_at,
        content_hash,
        files,
        comment,
    }
}

impl Store {
    /// Stores a new policy revision; returns its number.
    pub async fn add_policy_revision(
        &self,
        author: &str,
        now: i64,
        content_hash: &str,
        files: &str,
        comment: &str,
    ) -> Result<i64, StoreError> {
        let sql = "INSERT INTO policy_revisions (author, created_at, content_hash, files, comment) VALUES ($1, $2, $3, $4, $5) RETURNING rev";
        let (rev,): (i64,) = on_pool!(self, p => sqlx::query_as(sql).bind(author).bind(now).bind(content_hash).bind(files).bind(comment).fetch_one(p).await)?;
        Ok(rev)
    }

    /// One revision.
    pub async fn policy_revision(&self, rev: i64) -> Result<PolicyRevision, StoreError> {
        let sql = "SELECT rev, author, created_at, content_hash, files, comment FROM policy_revisions WHERE rev = $1";
        let row: Option<RevisionTuple> =
            on_pool!(self, p => sqlx::query_as(sql).bind(rev).fetch_optional(p).await)?;
        row.map(revision)
            .ok_or_else(|| StoreError::NotFound(format!("policy revision {rev}")))
    }

    /// The newest revision (the one in force), if any.
    pub async fn latest_policy_revision(&self) -> Result<Option<PolicyRevision>, StoreError> {
        let sql = "SELECT rev, author, created_at, content_hash, files, comment FROM policy_revisions ORDER BY rev DESC LIMIT 1";
        let row: Option<RevisionTuple> =
            on_pool!(self, p => sqlx::query_as(sql).fetch_optional(p).await)?;
        Ok(row.map(revision))
    }

    /// Revisions newest first, without their files.
    pub async fn policy_history(&self, limit: i64) -> Result<Vec<PolicyRevision>, StoreError> {
        let sql = "SELECT rev, author, created_at, content_hash, '' AS files, comment FROM policy_revisions ORDER BY rev DESC LIMIT $1";
        let rows: Vec<RevisionTuple> =
            on_pool!(self, p => sqlx::query_as(sql).bind(limit).fetch_all(p).await)?;
        Ok(rows.into_iter().map(revision).collect())
    }
}
