//! One retry policy for every caller: which failures may be tried again,
//! how long to wait before the next attempt, and the hints a refusal
//! carries (where the leader is, which epoch the cell is at).
//!
//! The waits use full jitter: the n-th wait is drawn uniformly from zero to
//! `min(delay_max, delay_min * 2^n)`, so the clients a failover turned away
//! together do not come back together.

use std::time::Duration;

use cellbank_proto::{EPOCH_METADATA_KEY, LEADER_ADDR_METADATA_KEY};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::{Code, Status};

/// Bounds of one caller's retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first wait's upper bound.
    pub delay_min: Duration,
    /// No wait is longer.
    pub delay_max: Duration,
    /// Refusals naming the leader that are followed at once, without a
    /// wait (after these, a named leader is tried after a wait too: two
    /// replicas that each name the other must not spin).
    pub free_redirects: u32,
}

impl RetryPolicy {
    /// A router carrying a client's request to a cell: its callers wait,
    /// so it retries often and briefly.
    pub const ROUTER: RetryPolicy =
        RetryPolicy { delay_min: Duration::from_millis(5), delay_max: Duration::from_millis(100), free_redirects: 2 };
    /// An application calling a cell or a router.
    pub const SERVICE: RetryPolicy =
        RetryPolicy { delay_min: Duration::from_millis(10), delay_max: Duration::from_millis(500), free_redirects: 2 };
    /// A cell's courier, per destination pair after a failed delivery: it
    /// retries for ever, so its waits grow to seconds.
    pub const COURIER: RetryPolicy =
        RetryPolicy { delay_min: Duration::from_millis(50), delay_max: Duration::from_secs(5), free_redirects: 0 };
    /// A Raft peer's stream reconnecting to a replica that went away: every
    /// member of a group reconnects after the same restart, so the waits
    /// are spread too.
    pub const PEER_RECONNECT: RetryPolicy =
        RetryPolicy { delay_min: Duration::from_millis(50), delay_max: Duration::from_secs(1), free_redirects: 0 };
    /// An operator's or a tool's call (admin actions, drills).
    pub const OPERATOR: RetryPolicy =
        RetryPolicy { delay_min: Duration::from_millis(50), delay_max: Duration::from_secs(1), free_redirects: 3 };

    /// The waits of one call, drawn from the thread's random source (seeded
    /// at the first wait: most calls never retry, and a router makes one of
    /// these per request).
    pub fn backoff(&self) -> Backoff {
        Backoff::new(*self, None)
    }

    /// The waits of one call, drawn from `seed` (for tests and replays).
    pub fn backoff_seeded(&self, seed: u64) -> Backoff {
        Backoff::new(*self, Some(StdRng::seed_from_u64(seed)))
    }
}

/// The waits between the attempts of one call.
#[derive(Debug)]
pub struct Backoff {
    policy: RetryPolicy,
    rng: Option<StdRng>,
    /// Waits drawn so far.
    attempt: u32,
    redirects_left: u32,
}

impl Backoff {
    fn new(policy: RetryPolicy, rng: Option<StdRng>) -> Backoff {
        Backoff { policy, rng, attempt: 0, redirects_left: policy.free_redirects }
    }

    /// The upper bound of the next wait.
    pub fn cap(&self) -> Duration {
        let doubled = self.policy.delay_min.saturating_mul(1u32 << self.attempt.min(20));
        doubled.min(self.policy.delay_max)
    }

    /// How long to wait before the next attempt. `hinted`: the failure
    /// named the leader, which is then tried at once while free redirects
    /// remain.
    pub fn next_delay(&mut self, hinted: bool) -> Duration {
        if hinted && self.redirects_left > 0 {
            self.redirects_left -= 1;
            return Duration::ZERO;
        }
        let cap = self.cap();
        self.attempt = self.attempt.saturating_add(1);
        let micros = cap.as_micros() as u64;
        let rng =
            self.rng.get_or_insert_with(|| StdRng::from_rng(rand::thread_rng()).expect("the thread's random source"));
        Duration::from_micros(rng.gen_range(0..=micros))
    }

    /// How long to wait after `status` before the next attempt: at once for
    /// a named leader (while free redirects remain), else the jittered
    /// wait. When the next attempt asks the same server (`same_server`),
    /// never less than its `RetryInfo` asks (at most the policy's longest
    /// wait); another server is not held back by this one's advice (a
    /// replica that knows no leader yet says nothing of its peers).
    pub fn after(&mut self, status: &Status, same_server: bool) -> Duration {
        let delay = self.next_delay(leader_hint(status).is_some());
        match crate::errors::retry_delay(status).filter(|_| same_server) {
            Some(asked) => delay.max(asked.min(self.policy.delay_max)),
            None => delay,
        }
    }
}

/// True for a failure of the connection itself (refused, reset, broken,
/// the attempt's own time limit): the call may or may not have reached the
/// server.
pub fn is_transport_failure(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::Unknown => std::error::Error::source(status).is_some(),
        // A connection that broke with the call on it, or the attempt's
        // time limit: the outcome is unknown.
        Code::Cancelled => true,
        _ => false,
    }
}

/// Whether a failed call may be sent again. A server's UNAVAILABLE (not
/// the leader, no quorum, an epoch moving) and RESOURCE_EXHAUSTED (a queue
/// full) mean nothing was applied: always, except a replica's full disk. A transport failure leaves the
/// outcome unknown: only for an `idempotent` call (every ledger write
/// carries its transfer id, so a repeat finds the first outcome). Anything
/// else is the answer.
pub fn retryable(status: &Status, idempotent: bool) -> bool {
    if is_transport_failure(status) {
        return idempotent;
    }
    match status.code() {
        Code::Unavailable => true,
        // A full queue clears in milliseconds; a full disk waits for an
        // operator.
        Code::ResourceExhausted => crate::errors::reason(status).as_deref() != Some(crate::errors::REASON_DISK_LOW),
        _ => false,
    }
}

/// The leader's address a refusal names (`host:port`), if any.
pub fn leader_hint(status: &Status) -> Option<&str> {
    status.metadata().get(LEADER_ADDR_METADATA_KEY).and_then(|v| v.to_str().ok()).filter(|s| !s.is_empty())
}

/// The epoch a cell's refusal names (its pair's routing epoch), if any.
pub fn epoch_hint(status: &Status) -> Option<u64> {
    status.metadata().get(EPOCH_METADATA_KEY).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_metadata(code: Code, key: &'static str, value: &str) -> Status {
        let mut status = Status::new(code, "refused");
        status.metadata_mut().insert(key, value.parse().unwrap());
        status
    }

    #[test]
    fn refusals_that_applied_nothing_are_retried_and_unknown_outcomes_only_when_idempotent() {
        for idempotent in [false, true] {
            assert!(retryable(&Status::unavailable("not the leader"), idempotent));
            assert!(retryable(&Status::resource_exhausted("queue full"), idempotent));
            assert!(!retryable(&Status::invalid_argument("amount"), idempotent));
            assert!(!retryable(&Status::failed_precondition("insufficient funds"), idempotent));
            assert!(!retryable(&Status::not_found("no such account"), idempotent));
            assert!(!retryable(&Status::deadline_exceeded("too late"), idempotent));
            assert!(!retryable(&Status::unknown("a server's own unknown error"), idempotent));
        }
        // The connection broke with the call on it: unknown outcome.
        let broken = Status::cancelled("connection reset");
        assert!(retryable(&broken, true));
        assert!(!retryable(&broken, false));
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let transport = Status::from_error(Box::new(io));
        assert!(is_transport_failure(&transport), "{transport:?}");
        assert!(retryable(&transport, true));
        assert!(!retryable(&transport, false));
    }

    #[test]
    fn hints_are_read_from_the_refusal() {
        let hinted = with_metadata(Code::Unavailable, LEADER_ADDR_METADATA_KEY, "127.0.0.1:7102");
        assert_eq!(leader_hint(&hinted), Some("127.0.0.1:7102"));
        assert_eq!(leader_hint(&Status::unavailable("no leader")), None);
        assert_eq!(leader_hint(&with_metadata(Code::Unavailable, LEADER_ADDR_METADATA_KEY, "")), None);
        assert_eq!(epoch_hint(&with_metadata(Code::Unavailable, EPOCH_METADATA_KEY, "7")), Some(7));
        assert_eq!(epoch_hint(&with_metadata(Code::Unavailable, EPOCH_METADATA_KEY, "seven")), None);
    }

    #[test]
    fn a_named_leader_is_tried_at_once_and_a_servers_retry_info_is_a_floor() {
        let mut backoff = RetryPolicy::SERVICE.backoff_seeded(3);
        let follower = crate::errors::not_leader("not the leader".into(), Some("127.0.0.1:7102"));
        assert_eq!(backoff.after(&follower, false), Duration::ZERO);
        assert_eq!(backoff.after(&follower, false), Duration::ZERO);
        // Free redirects used up: a jittered wait.
        assert!(backoff.after(&follower, false) <= Duration::from_millis(10));
        let electing = crate::errors::not_leader("no leader yet".into(), None);
        let overloaded = crate::errors::overloaded("queue full".into(), None);
        for _ in 0..20 {
            let mut backoff = RetryPolicy::SERVICE.backoff();
            assert!(backoff.after(&electing, true) >= crate::errors::NO_LEADER_RETRY_DELAY);
            assert!(backoff.after(&overloaded, true) >= crate::errors::OVERLOADED_RETRY_DELAY);
            // Another replica is asked after the jittered wait only.
            let mut backoff = RetryPolicy::SERVICE.backoff();
            assert!(backoff.after(&electing, false) <= Duration::from_millis(10));
        }
        // The floor never exceeds the policy's own longest wait.
        let mut short = RetryPolicy::ROUTER.backoff_seeded(1);
        let mut asked = tonic_types::ErrorDetails::new();
        asked.set_retry_info(Some(Duration::from_secs(60)));
        let slow = <Status as tonic_types::StatusExt>::with_error_details(Code::Unavailable, "wait", asked);
        assert_eq!(short.after(&slow, true), RetryPolicy::ROUTER.delay_max);
    }

    #[test]
    fn waits_stay_under_a_doubling_cap_and_are_spread() {
        let policy = RetryPolicy::SERVICE;
        let mut backoff = policy.backoff_seeded(7);
        let mut caps = Vec::new();
        for _ in 0..12 {
            let cap = backoff.cap();
            let delay = backoff.next_delay(false);
            assert!(delay <= cap, "{delay:?} > {cap:?}");
            caps.push(cap);
        }
        assert_eq!(caps[0], Duration::from_millis(10));
        assert_eq!(caps[1], Duration::from_millis(20));
        assert_eq!(caps[5], Duration::from_millis(320));
        assert!(caps[6..].iter().all(|c| *c == Duration::from_millis(500)), "{caps:?}");
        // Full jitter: 1,000 clients' first waits cover the whole range
        // rather than one instant.
        let firsts: Vec<Duration> = (0..1_000).map(|seed| policy.backoff_seeded(seed).next_delay(false)).collect();
        let below = firsts.iter().filter(|d| **d < Duration::from_millis(5)).count();
        assert!((350..=650).contains(&below), "{below} of 1000 below half the cap");
        assert!(firsts.iter().all(|d| *d <= Duration::from_millis(10)));
        let distinct: std::collections::HashSet<_> = firsts.iter().collect();
        assert!(distinct.len() > 900, "only {} distinct waits", distinct.len());
    }

    #[test]
    fn a_named_leader_is_followed_at_once_a_few_times_then_after_waits() {
        let mut backoff = RetryPolicy::SERVICE.backoff_seeded(1);
        assert_eq!(backoff.next_delay(true), Duration::ZERO);
        assert_eq!(backoff.next_delay(true), Duration::ZERO);
        assert_eq!(backoff.cap(), Duration::from_millis(10), "free redirects do not grow the cap");
        let _ = backoff.next_delay(true);
        assert_eq!(backoff.cap(), Duration::from_millis(20), "the third hint waits");
    }
}
