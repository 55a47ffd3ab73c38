//! A circuit breaker per upstream service: after consecutive failures it opens and answers 503
//! at once; after a pause one probe is let through (half-open), and its outcome closes or
//! reopens the circuit.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Consecutive failures that open the circuit.
const FAILURES_TO_OPEN: u32 = 5;
/// How long it stays open before a probe.
const OPEN_FOR: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

/// One upstream's breaker.
#[derive(Debug)]
pub(crate) struct Breaker {
    state: Mutex<State>,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }
}

impl Breaker {
    /// Whether a request may go upstream now (in half-open, only the one probe).
    pub(crate) fn allow(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return true;
        };
        match *s {
            State::Closed { .. } => true,
            State::Open { until } if Instant::now() >= until => {
                *s = State::HalfOpen;
                true
            }
            State::Open { .. } | State::HalfOpen => false,
        }
    }

    /// The upstream answered.
    pub(crate) fn success(&self) {
        if let Ok(mut s) = self.state.lock() {
            *s = State::Closed { failures: 0 };
        }
    }

    /// The upstream failed (connection error or timeout); returns whether the circuit is open.
    pub(crate) fn failure(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        *s = match *s {
            State::Closed { failures } if failures + 1 < FAILURES_TO_OPEN => State::Closed {
                failures: failures + 1,
            },
            _ => State::Open {
                until: Instant::now() + OPEN_FOR,
            },
        };
        matches!(*s, State::Open { .. })
    }

    /// Whether the circuit is open (for metrics).
    pub(crate) fn is_open(&self) -> bool {
        self.state
            .lock()
            .is_ok_and(|s| !matches!(*s, State::Closed { .. }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_probes_and_closes() {
        let b = Breaker::default();
        for _ in 0..4 {
            assert!(b.allow());
            assert!(!b.failure());
        }
        assert!(b.allow());
        assert!(b.failure(), "fifth failure opens");
        assert!(!b.allow(), "open: refused at once");
        *b.state.lock().unwrap() = State::Open {
            until: Instant::now(),
        };
        assert!(b.allow(), "after the pause, one probe");
        assert!(!b.allow(), "only one");
        b.failure();
        assert!(!b.allow(), "failed probe reopens");
        *b.state.lock().unwrap() = State::Open {
            until: Instant::now(),
        };
        assert!(b.allow());
        b.success();
        assert!(
            b.allow() && b.allow() && !b.is_open(),
            "successful probe closes"
        );
    }
}
