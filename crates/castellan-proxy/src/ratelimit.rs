//! Rate limits from `RateLimit` policy documents, enforced locally with GCRA (governor), keyed
//! by source, user, API key or route. Rebuilt when the policy revision changes.

use crate::Inner;
use castellan_policy::{RateKey, RateLimit};
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Compiled = Vec<(RateLimit, Arc<DefaultKeyedRateLimiter<String>>)>;

/// The limiters of one policy revision.
#[derive(Default)]
pub(crate) struct Limits {
    current: Mutex<(i64, Arc<Compiled>)>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Limits")
    }
}

fn quota(l: &RateLimit) -> Option<Quota> {
    let per_request = Duration::from_millis(l.period_ms) / l.rate.max(1);
    Some(Quota::with_period(per_request)?.allow_burst(NonZeroU32::new(l.burst)?))
}

/// Who a request is, for keying limits.
pub(crate) struct Who<'a> {
    pub(crate) source: &'a str,
    pub(crate) user: &'a str,
    pub(crate) api_key: &'a str,
}

impl Limits {
    fn compiled(&self, inner: &Inner) -> Arc<Compiled> {
        let rev = inner.state.revision();
        let Ok(mut cur) = self.current.lock() else {
            return Arc::new(Vec::new());
        };
        if cur.0 != rev {
            let set = inner.state.engine.current();
            let compiled: Compiled = set
                .rate_limits()
                .iter()
                .filter_map(|l| quota(l).map(|q| (l.clone(), Arc::new(RateLimiter::keyed(q)))))
                .collect();
            *cur = (rev, Arc::new(compiled));
        }
        cur.1.clone()
    }

    /// `Err((limit name, retry after))` when a limit that applies is exhausted.
    pub(crate) fn check(
        &self,
        inner: &Inner,
        service: &str,
        method: &str,
        path: &str,
        who: &Who<'_>,
    ) -> Result<(), (String, Duration)> {
        for (l, limiter) in self.compiled(inner).iter() {
            if !l.applies(service, method, path) {
                continue;
            }
            let key = match l.key {
                RateKey::Source => who.source.to_owned(),
                RateKey::User => who.user.to_owned(),
                RateKey::ApiKey => {
                    if who.api_key.is_empty() {
                        who.user.to_owned()
                    } else {
                        who.api_key.to_owned()
                    }
                }
                RateKey::Route => format!("{method} {path}"),
            };
            if let Err(not_until) = limiter.check_key(&key) {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                metrics::counter!("castellan_proxy_rate_limited_total", "proxy" => inner.cfg.proxy_id.clone(), "limit" => l.name.clone()).increment(1);
                return Err((l.name.clone(), wait));
            }
        }
        Ok(())
    }
}
