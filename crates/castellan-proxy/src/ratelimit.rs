//! Rate limits from `RateLimit` policy documents, keyed by source, user, API key or route.
//! Locally with GCRA (governor); cluster-wide with the same algorithm in Redis — one atomic
//! script call per check — when `redis://` is configured, so N gateways share one limit. When
//! Redis does not answer the proxy falls back to its local limits (metric, log line, never a
//! 500) and returns to Redis a second later.

use crate::{Inner, ProxyError};
use castellan_policy::{RateKey, RateLimit};
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Compiled = Vec<(RateLimit, Arc<DefaultKeyedRateLimiter<String>>)>;

/// GCRA in one atomic step: KEYS[1] holds the theoretical arrival time (ms). ARGV: emission
/// interval (ms), burst. Returns {1, 0} when allowed, {0, ms to wait} when not.
pub const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local emission = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + emission
local allow_at = new_tat - emission * burst
if now < allow_at then return {0, allow_at - now} end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now + emission))
return {1, 0}
";

/// How long a Redis call may take before the local limit decides.
const REDIS_TIMEOUT: Duration = Duration::from_millis(100);

struct Shared {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>,
    script: redis::Script,
    down_until_ms: AtomicI64,
    announced_down: AtomicBool,
}

/// The limiters of one policy revision.
pub(crate) struct Limits {
    current: Mutex<(i64, Arc<Compiled>)>,
    redis: Option<Shared>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("redis", &self.redis.is_some())
            .finish()
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
    pub(crate) fn new(redis_url: Option<&str>) -> Result<Limits, ProxyError> {
        let redis = match redis_url {
            Some(url) => Some(Shared {
                client: redis::Client::open(url)
                    .map_err(|e| ProxyError::Config(format!("redis_url: {e}")))?,
                conn: tokio::sync::Mutex::new(None),
                script: redis::Script::new(GCRA),
                down_until_ms: AtomicI64::new(0),
                announced_down: AtomicBool::new(false),
            }),
            None => None,
        };
        Ok(Limits {
            current: Mutex::new((-1, Arc::new(Vec::new()))),
            redis,
        })
    }

    /// Forgets keys whose allowance has fully refilled (their state says nothing any more), so
    /// the maps do not grow with every source, user or key ever seen.
    pub(crate) fn prune(&self) {
        let compiled = match self.current.lock() {
            Ok(c) => c.1.clone(),
            Err(_) => return,
        };
        for (_, limiter) in compiled.iter() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

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

    /// Asks Redis; `None` when Redis is not configured or not answering (then the local limit
    /// decides).
    async fn redis_check(
        &self,
        inner: &Inner,
        l: &RateLimit,
        key: &str,
    ) -> Option<Result<(), Duration>> {
        let r = self.redis.as_ref()?;
        let now = crate::unix_now_ms();
        if r.down_until_ms.load(Ordering::Relaxed) > now {
            return None;
        }
        let emission = (l.period_ms / u64::from(l.rate.max(1))).max(1);
        let result = tokio::time::timeout(REDIS_TIMEOUT, async {
            let mut guard = r.conn.lock().await;
            if guard.is_none() {
                *guard = Some(redis::aio::ConnectionManager::new(r.client.clone()).await?);
            }
            let Some(conn) = guard.as_mut() else {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "no connection",
                )));
            };
            let mut inv = r.script.key(format!("castellan:rl:{}:{key}", l.name));
            inv.arg(emission).arg(l.burst);
            inv.invoke_async::<(i64, i64)>(conn).await
        })
        .await;
        match result {
            Ok(Ok((allowed, wait_ms))) => {
                if r.announced_down.swap(false, Ordering::Relaxed) {
                    tracing::warn!("Redis answers again: rate limits are shared again");
                }
                Some(if allowed == 1 {
                    Ok(())
                } else {
                    Err(Duration::from_millis(
                        u64::try_from(wait_ms).unwrap_or(1000),
                    ))
                })
            }
            failure => {
                r.down_until_ms.store(now + 1000, Ordering::Relaxed);
                *r.conn.lock().await = None;
                metrics::counter!("castellan_proxy_ratelimit_redis_fallbacks_total", "proxy" => inner.cfg.proxy_id.clone()).increment(1);
                if !r.announced_down.swap(true, Ordering::Relaxed) {
                    let why = match failure {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timeout".to_owned(),
                    };
                    tracing::warn!(error = %why, "Redis unreachable: enforcing rate limits locally");
                }
                None
            }
        }
    }

    /// `Err((limit name, retry after))` when a limit that applies is exhausted.
    pub(crate) async fn check(
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
            let verdict = match self.redis_check(inner, l, &key).await {
                Some(v) => v,
                None => limiter
                    .check_key(&key)
                    .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now())),
            };
            if let Err(wait) = verdict {
                metrics::counter!("castellan_proxy_rate_limited_total", "proxy" => inner.cfg.proxy_id.clone(), "limit" => l.name.clone()).increment(1);
                return Err((l.name.clone(), wait));
            }
        }
        Ok(())
    }
}
