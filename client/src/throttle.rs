//! Exponential backoff per caller after failed authentication or
//! authorization: brute force and replay cost the one who tries, not the
//! cluster.
//!
//! Past `free` failures (an allowance for an ordinary mistake, such as a
//! client retrying with a wrong setting a few times), each failure bars the
//! key (an address, an identity) for a time that doubles with every
//! failure: `base`, `2 × base`, ... up to `max`. While
//! barred, the key's attempts are refused before any work is done (no TLS
//! handshake, no handler). A key with no failure for `forget_after` starts
//! again from `base`. The table is bounded: past [`KEYS_MAX`] keys, those
//! long quiet are dropped first.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most keys remembered at once.
pub const KEYS_MAX: usize = 65_536;

#[derive(Clone, Copy, Debug)]
struct Entry {
    failures: u32,
    barred_until: Instant,
    last_failure: Instant,
}

pub struct Throttle<K> {
    entries: Mutex<HashMap<K, Entry>>,
    pub base: Duration,
    pub max: Duration,
    pub forget_after: Duration,
    /// Failures in a row that bar nothing yet.
    pub free: u32,
}

impl<K: Hash + Eq + Clone> Throttle<K> {
    pub fn new(base: Duration, max: Duration, forget_after: Duration) -> Throttle<K> {
        Throttle { entries: Mutex::new(HashMap::new()), base, max, forget_after, free: 0 }
    }

    /// The same, with `free` failures allowed before the first bar.
    pub fn with_free(mut self, free: u32) -> Throttle<K> {
        self.free = free;
        self
    }

    /// 100 ms after the first failure, doubling to a minute; forgotten
    /// after five quiet minutes.
    pub fn standard() -> Throttle<K> {
        Throttle::new(Duration::from_millis(100), Duration::from_secs(60), Duration::from_secs(300))
    }

    /// How much longer `key` is barred, if it is.
    pub fn barred(&self, key: &K) -> Option<Duration> {
        let entries = self.entries.lock().expect("throttle lock");
        let entry = entries.get(key)?;
        entry.barred_until.checked_duration_since(Instant::now()).filter(|left| !left.is_zero())
    }

    /// Records a failure of `key`; returns how long it is now barred.
    pub fn failed(&self, key: K) -> Duration {
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("throttle lock");
        if entries.len() >= KEYS_MAX && !entries.contains_key(&key) {
            let forget_after = self.forget_after;
            entries.retain(|_, e| now.duration_since(e.last_failure) < forget_after || e.barred_until > now);
            if entries.len() >= KEYS_MAX {
                // Still full of keys failing right now: bar this one at the
                // longest without remembering it.
                return self.max;
            }
        }
        let entry = entries.entry(key).or_insert(Entry { failures: 0, barred_until: now, last_failure: now });
        if now.duration_since(entry.last_failure) >= self.forget_after {
            entry.failures = 0;
        }
        entry.failures = entry.failures.saturating_add(1);
        entry.last_failure = now;
        let bar = self.bar_after(entry.failures);
        entry.barred_until = now + bar;
        bar
    }

    /// The bar after `failures` failures in a row.
    pub fn bar_after(&self, failures: u32) -> Duration {
        if failures <= self.free {
            return Duration::ZERO;
        }
        let doublings = (failures - self.free).saturating_sub(1).min(31);
        self.base.saturating_mul(1u32 << doublings).min(self.max)
    }

    /// Failures recorded against `key` (0 when unknown or forgotten).
    pub fn failures(&self, key: &K) -> u32 {
        let entries = self.entries.lock().expect("throttle lock");
        entries.get(key).filter(|e| e.last_failure.elapsed() < self.forget_after).map_or(0, |e| e.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_doubles_the_bar_up_to_the_limit_and_other_keys_are_free() {
        let throttle = Throttle::new(Duration::from_millis(100), Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(throttle.barred(&"a"), None);
        let bars: Vec<Duration> = (0..6).map(|_| throttle.failed("a")).collect();
        let ms: Vec<u128> = bars.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, vec![100, 200, 400, 800, 1000, 1000]);
        assert!(throttle.barred(&"a").is_some_and(|left| left <= Duration::from_secs(1)));
        assert_eq!(throttle.barred(&"b"), None, "another key is not barred");
        assert_eq!(throttle.failures(&"a"), 6);
        assert_eq!(throttle.bar_after(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn the_free_failures_bar_nothing() {
        let throttle =
            Throttle::new(Duration::from_millis(100), Duration::from_secs(1), Duration::from_secs(60)).with_free(2);
        assert_eq!(throttle.failed("a"), Duration::ZERO);
        assert_eq!(throttle.failed("a"), Duration::ZERO);
        assert_eq!(throttle.barred(&"a"), None);
        assert_eq!(throttle.failed("a"), Duration::from_millis(100));
        assert!(throttle.barred(&"a").is_some());
    }

    #[test]
    fn a_quiet_key_starts_again_from_the_base() {
        let throttle = Throttle::new(Duration::from_millis(10), Duration::from_secs(1), Duration::from_millis(30));
        throttle.failed(1);
        throttle.failed(1);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(throttle.failures(&1), 0);
        assert_eq!(throttle.failed(1), Duration::from_millis(10));
    }
}
