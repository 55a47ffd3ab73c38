//! The compiled policy set: rules indexed by destination service, path template and method, so
//! that a decision looks only at rules that can match; and [`Engine`], which swaps revisions while
//! other threads keep deciding.

use crate::condition::EvalContext;
use crate::model::{AccessPolicy, Effect, Mode, Rule, RuleId};
use crate::normalize::{Malformed, normalize_host, normalize_target, validate_method};
use crate::principal::Caller;
use crate::request::{Decision, Reason, Request};
use crate::template::Segment;
use arc_swap::ArcSwap;
use std::collections::HashMap;

/// Index maps use foldhash: lookups with client-chosen keys only (never inserts), so a fast seeded
/// hash is safe here, and SipHash showed up in profiles.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
use std::sync::Arc;

/// A rule reference inside the index, with the names of its template's captures.
#[derive(Debug, Clone)]
struct Entry {
    rule: u32,
    params: Arc<[Box<str>]>,
}

/// Entries grouped by method.
#[derive(Debug, Default)]
struct MethodRules {
    by_method: Vec<(Box<str>, Vec<Entry>)>,
    any_method: Vec<Entry>,
}

impl MethodRules {
    fn add(&mut self, methods: Option<&[String]>, entry: &Entry) {
        match methods {
            None => self.any_method.push(entry.clone()),
            Some(ms) => {
                for m in ms {
                    match self.by_method.iter_mut().find(|(k, _)| **k == **m) {
                        Some((_, v)) => v.push(entry.clone()),
                        None => self
                            .by_method
                            .push((m.as_str().into(), vec![entry.clone()])),
                    }
                }
            }
        }
    }

    fn for_method(&self, method: &str) -> impl Iterator<Item = &Entry> {
        self.by_method
            .iter()
            .filter(move |(m, _)| **m == *method)
            .flat_map(|(_, v)| v.iter())
            .chain(self.any_method.iter())
    }
}

/// A node of the path trie.
#[derive(Debug, Default)]
struct PathNode {
    literals: FastMap<Box<str>, PathNode>,
    param: Option<Box<PathNode>>,
    /// Rules whose template ends here.
    exact: MethodRules,
    /// Rules whose template ends with `{*rest}` here.
    catch_all: MethodRules,
}

/// The rules protecting one service.
#[derive(Debug, Default)]
struct ServiceIndex {
    mode: Mode,
    root: PathNode,
    any_path: MethodRules,
}

/// A validated, compiled, indexed set of policies. Immutable; build a new one for a new revision.
#[derive(Debug)]
pub struct PolicySet {
    rate_limits: Vec<crate::model::RateLimit>,
    trust_domain: String,
    default_mode: Mode,
    context_issuers: Vec<crate::principal::ServicePattern>,
    services: FastMap<String, ServiceIndex>,
    rules: Vec<Rule>,
    reads: Reads,
}

/// What the conditions of a set can read beyond the request line, the caller and the user's
/// sub, roles and claims (which every decision record keeps): named headers, any header, the
/// query. A record is replayable against a set whose reads it kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reads {
    /// Header names (lower-case) some condition reads.
    pub headers: std::collections::BTreeSet<String>,
    /// Some condition may read a header it does not name.
    pub any_header: bool,
    /// Some condition may read the query string.
    pub query: bool,
    /// Some rule matches on the user's id (`users.subjects`, or a condition naming `sub`): a
    /// record whose user was pseudonymised cannot be judged on it.
    pub user_sub: bool,
}

/// Settings that apply to the whole set.
#[derive(Debug, Clone)]
pub struct SetOptions {
    /// The local trust domain.
    pub trust_domain: String,
    /// The mode of a service that has no policy.
    pub default_mode: Mode,
    /// Who may sign user-context tokens.
    pub context_issuers: Vec<crate::principal::ServicePattern>,
}

impl Default for SetOptions {
    fn default() -> Self {
        SetOptions {
            trust_domain: crate::model::DEFAULT_TRUST_DOMAIN.to_owned(),
            default_mode: Mode::Enforce,
            context_issuers: Vec::new(),
        }
    }
}

/// A candidate rule found through the index, with the range of its captures.
#[derive(Debug, Clone, Copy)]
struct Candidate<'i> {
    rule: u32,
    params: &'i [Box<str>],
    caps_start: usize,
}

impl PolicySet {
    /// Compiles validated policies. Conflicting modes for one service are reported by the loader,
    /// which calls this only on a clean set.
    pub fn compile(policies: Vec<AccessPolicy>, options: SetOptions) -> PolicySet {
        let mut set = PolicySet {
            rate_limits: Vec::new(),
            trust_domain: options.trust_domain,
            default_mode: options.default_mode,
            context_issuers: options.context_issuers,
            services: FastMap::default(),
            rules: Vec::new(),
            reads: Reads::default(),
        };
        for policy in policies {
            let svc = set.services.entry(policy.service.clone()).or_default();
            // INVARIANT: the loader rejects a service with policies of both modes.
            svc.mode = policy.mode;
            for rule in policy.rules {
                let Ok(idx) = u32::try_from(set.rules.len()) else {
                    break; // more than 4 billion rules: not reachable from any file set
                };
                let methods = rule.to.methods.as_deref();
                match &rule.to.paths {
                    None => svc.any_path.add(
                        methods,
                        &Entry {
                            rule: idx,
                            params: Arc::from(Vec::new()),
                        },
                    ),
                    Some(templates) => {
                        for t in templates {
                            insert_template(&mut svc.root, &t.segments, methods, idx);
                        }
                    }
                }
                if let Some(c) = &rule.when {
                    set.reads.any_header |= !c.header_reads(&mut set.reads.headers);
                    set.reads.query |= c.reads_query();
                    set.reads.user_sub |= c.source().contains("sub");
                }
                set.reads.user_sub |= rule
                    .from
                    .users
                    .as_ref()
                    .is_some_and(|u| u.subjects.is_some());
                set.rules.push(rule);
            }
        }
        set
    }

    /// Every rule, in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The services the set has policies for, and their modes.
    pub fn services(&self) -> Vec<(&str, Mode)> {
        let mut v: Vec<(&str, Mode)> = self
            .services
            .iter()
            .map(|(k, s)| (k.as_str(), s.mode))
            .collect();
        v.sort_unstable_by(|a, b| a.0.cmp(b.0));
        v
    }

    /// What the set's conditions can read (see [`Reads`]).
    pub fn reads(&self) -> &Reads {
        &self.reads
    }

    /// An empty set: denies everything.
    pub fn empty() -> PolicySet {
        PolicySet::compile(Vec::new(), SetOptions::default())
    }

    /// The number of rules.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The set's rate limits (`RateLimit` documents).
    pub fn rate_limits(&self) -> &[crate::model::RateLimit] {
        &self.rate_limits
    }

    pub(crate) fn set_rate_limits(&mut self, limits: Vec<crate::model::RateLimit>) {
        self.rate_limits = limits;
    }

    /// Whether the workload `spiffe_id` may sign user-context tokens (MeshConfig
    /// `contextIssuers`; nobody when unset).
    pub fn may_mint_context(&self, spiffe_id: &str) -> bool {
        match crate::principal::Caller::resolve(&self.trust_domain, None, Some(spiffe_id)) {
            Ok(Some(caller)) => self.context_issuers.iter().any(|p| p.matches(&caller)),
            _ => false,
        }
    }

    /// The local trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Decides on a request. Never panics, never allows by default.
    pub fn decide(&self, req: &Request) -> Decision {
        match self.decide_inner(req) {
            Ok(d) => d,
            Err(m) => Decision {
                decision: Effect::Deny,
                rule: None,
                mode: Mode::Enforce,
                reason: Reason::MalformedRequest,
                detail: Some(m.to_string()),
            },
        }
    }

    fn decide_inner(&self, req: &Request) -> Result<Decision, Malformed> {
        let method = validate_method(&req.request.method)?;
        let target = normalize_target(&req.request.path)?;
        let host = normalize_host(&req.request.host)?;
        check_header_names(&req.request.headers)?;
        let caller = match &req.source {
            None => None,
            Some(s) => Caller::resolve(
                &self.trust_domain,
                s.service.as_deref(),
                s.spiffe_id.as_deref(),
            )
            .map_err(|_| Malformed::Other("invalid source identity"))?,
        };
        let Some(svc) = self.services.get(req.destination.service.as_str()) else {
            return Ok(apply_mode(
                self.default_mode,
                Effect::Deny,
                None,
                Reason::NoMatchingAllow,
                None,
            ));
        };

        // Candidates from the index: only rules whose method and path template can match.
        let path = target.path.as_ref();
        let match_path = if path.len() > 1 {
            path.strip_suffix('/').unwrap_or(path)
        } else {
            path
        };
        let mut stack: Vec<&str> = Vec::new();
        let mut caps: Vec<&str> = Vec::new();
        let mut cands: Vec<Candidate<'_>> = Vec::new();
        for e in svc.any_path.for_method(method) {
            cands.push(Candidate {
                rule: e.rule,
                params: &e.params,
                caps_start: 0,
            });
        }
        let rest = match_path.get(1..).unwrap_or_default();
        walk(&svc.root, rest, method, &mut stack, &mut caps, &mut cands);
        cands.sort_by_key(|c| c.rule);

        let ctx = EvalContext {
            caller: caller.as_ref(),
            path,
            query: target.query,
            host: &host,
        };
        let authenticated = caller.is_some() || req.user.is_some();
        let with_effect = |effect: Effect| {
            cands
                .iter()
                .filter_map(|c| self.rules.get(c.rule as usize).map(|r| (c, r)))
                .filter(move |(_, r)| r.effect == effect)
        };

        // Deny overrides: the first matching deny rule (in file order) decides.
        for (c, rule) in with_effect(Effect::Deny) {
            match self.rule_matches(rule, c, &caps, req, &ctx, authenticated) {
                Match::No => {}
                Match::Yes => {
                    return Ok(apply_mode(
                        svc.mode,
                        Effect::Deny,
                        Some(&rule.id),
                        Reason::MatchedDeny,
                        None,
                    ));
                }
                Match::Error(e) => {
                    return Ok(apply_mode(
                        svc.mode,
                        Effect::Deny,
                        Some(&rule.id),
                        Reason::ConditionError,
                        Some(e),
                    ));
                }
            }
        }
        let mut first_error: Option<(&RuleId, String)> = None;
        for (c, rule) in with_effect(Effect::Allow) {
            match self.rule_matches(rule, c, &caps, req, &ctx, authenticated) {
                Match::No => {}
                Match::Yes => {
                    return Ok(Decision {
                        decision: Effect::Allow,
                        rule: Some(rule.id.clone()),
                        mode: svc.mode,
                        reason: Reason::MatchedAllow,
                        detail: None,
                    });
                }
                Match::Error(e) => {
                    if first_error.is_none() {
                        first_error = Some((&rule.id, e));
                    }
                }
            }
        }
        Ok(match first_error {
            Some((id, e)) => apply_mode(
                svc.mode,
                Effect::Deny,
                Some(id),
                Reason::ConditionError,
                Some(e),
            ),
            None => apply_mode(svc.mode, Effect::Deny, None, Reason::NoMatchingAllow, None),
        })
    }

    fn rule_matches(
        &self,
        rule: &Rule,
        cand: &Candidate<'_>,
        caps: &[&str],
        req: &Request,
        ctx: &EvalContext<'_>,
        authenticated: bool,
    ) -> Match {
        let from = &rule.from;
        match rule.effect {
            // Safety exception: allow rules match unauthenticated callers only if they say so.
            Effect::Allow if !authenticated && from.authenticated != Some(false) => {
                return Match::No;
            }
            Effect::Deny if !authenticated && from.authenticated == Some(true) => return Match::No,
            _ => {}
        }
        if let Some(patterns) = &from.services {
            let Some(caller) = ctx.caller else {
                return Match::No;
            };
            if !patterns.iter().any(|p| p.matches(caller)) {
                return Match::No;
            }
        }
        if let Some(users) = &from.users {
            let Some(user) = &req.user else {
                return Match::No;
            };
            if let Some(roles) = &users.roles
                && !roles.iter().any(|r| user.roles.contains(r))
            {
                return Match::No;
            }
            if let Some(subjects) = &users.subjects
                && !user.sub.as_ref().is_some_and(|s| subjects.contains(s))
            {
                return Match::No;
            }
            if let Some(delegated) = users.delegated
                && delegated == user.act.is_empty()
            {
                return Match::No;
            }
            if let Some(claims) = &users.claims
                && !claims.iter().all(|(k, want)| match user.claims.get(k) {
                    Some(got) if got == want => true,
                    Some(serde_json::Value::Array(items)) => items.contains(want),
                    _ => false,
                })
            {
                return Match::No;
            }
        }
        if let Some(hosts) = &rule.to.hosts
            && !hosts.iter().any(|h| h == ctx.host)
        {
            return Match::No;
        }
        if let Some(cond) = &rule.when {
            let values = caps
                .get(cand.caps_start..cand.caps_start + cand.params.len())
                .unwrap_or_default();
            let params: Vec<(&str, &str)> = cand
                .params
                .iter()
                .map(|n| n.as_ref())
                .zip(values.iter().copied())
                .collect();
            return match cond.eval(req, &params, ctx) {
                Ok(true) => Match::Yes,
                Ok(false) => Match::No,
                // Fail closed: an error makes an allow rule not match and a deny rule match.
                Err(e) => Match::Error(e),
            };
        }
        Match::Yes
    }
}

/// Header names are case-insensitive: two spellings of one name are a repeated header, which
/// policy and application could read differently (Envoy CVE-2020-25017), so the request is refused.
fn check_header_names(
    headers: &std::collections::BTreeMap<String, String>,
) -> Result<(), Malformed> {
    if !headers
        .keys()
        .any(|k| k.bytes().any(|b| b.is_ascii_uppercase()))
    {
        return Ok(()); // keys of a map are distinct; all lower-case means no repeats
    }
    let mut lower: Vec<String> = headers.keys().map(|k| k.to_ascii_lowercase()).collect();
    lower.sort_unstable();
    if lower.windows(2).any(|w| matches!(w, [a, b] if a == b)) {
        return Err(Malformed::Other("a header name appears twice"));
    }
    Ok(())
}

enum Match {
    No,
    Yes,
    Error(String),
}

fn apply_mode(
    mode: Mode,
    effect: Effect,
    rule: Option<&RuleId>,
    reason: Reason,
    detail: Option<String>,
) -> Decision {
    // In audit mode a would-be denial is allowed; the reason and rule still say what would have
    // happened, so audit records can show it.
    let decision = if mode == Mode::Audit {
        Effect::Allow
    } else {
        effect
    };
    Decision {
        decision,
        rule: rule.cloned(),
        mode,
        reason,
        detail,
    }
}

fn insert_template(
    root: &mut PathNode,
    segments: &[Segment],
    methods: Option<&[String]>,
    idx: u32,
) {
    let mut node = root;
    let mut params: Vec<Box<str>> = Vec::new();
    for seg in segments {
        match seg {
            Segment::Literal(l) => node = node.literals.entry(l.as_str().into()).or_default(),
            Segment::Param(p) => {
                params.push(p.as_str().into());
                node = node.param.get_or_insert_with(Box::default);
            }
            Segment::CatchAll(p) => {
                params.push(p.as_str().into());
                node.catch_all.add(
                    methods,
                    &Entry {
                        rule: idx,
                        params: params.into(),
                    },
                );
                return;
            }
        }
    }
    node.exact.add(
        methods,
        &Entry {
            rule: idx,
            params: params.into(),
        },
    );
}

/// Collects every rule whose template matches `rest` (the path without its leading `/`).
/// `stack` holds the captures along the current branch; each candidate with parameters gets a
/// copy of them in `arena`, from `caps_start` on.
fn walk<'i, 'p>(
    node: &'i PathNode,
    rest: &'p str,
    method: &str,
    stack: &mut Vec<&'p str>,
    arena: &mut Vec<&'p str>,
    out: &mut Vec<Candidate<'i>>,
) {
    if rest.is_empty() {
        for e in node.exact.for_method(method) {
            emit(e, stack, None, arena, out);
        }
        return;
    }
    for e in node.catch_all.for_method(method) {
        emit(e, stack, Some(rest), arena, out);
    }
    let (seg, tail) = rest.split_once('/').unwrap_or((rest, ""));
    if let Some(child) = node.literals.get(seg) {
        walk(child, tail, method, stack, arena, out);
    }
    if let Some(child) = &node.param {
        stack.push(seg);
        walk(child, tail, method, stack, arena, out);
        stack.pop();
    }
}

fn emit<'i, 'p>(
    e: &'i Entry,
    stack: &[&'p str],
    remainder: Option<&'p str>,
    arena: &mut Vec<&'p str>,
    out: &mut Vec<Candidate<'i>>,
) {
    let caps_start = arena.len();
    if !e.params.is_empty() {
        arena.extend_from_slice(stack);
        arena.extend(remainder);
    }
    out.push(Candidate {
        rule: e.rule,
        params: &e.params,
        caps_start,
    });
}

/// Holds the current [`PolicySet`] and swaps in new revisions without blocking deciders.
#[derive(Debug)]
pub struct Engine {
    current: ArcSwap<PolicySet>,
}

impl Engine {
    /// An engine deciding with `set`.
    pub fn new(set: PolicySet) -> Engine {
        Engine {
            current: ArcSwap::from_pointee(set),
        }
    }

    /// Decides with the current revision.
    pub fn decide(&self, req: &Request) -> Decision {
        self.current.load().decide(req)
    }

    /// The current revision; decisions already under way keep the one they started with.
    pub fn current(&self) -> Arc<PolicySet> {
        self.current.load_full()
    }

    /// Installs a new revision; returns the previous one.
    pub fn swap(&self, set: PolicySet) -> Arc<PolicySet> {
        self.current.swap(Arc::new(set))
    }
}
