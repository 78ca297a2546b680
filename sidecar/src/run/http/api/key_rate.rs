//! A rate per API key (HERALD_API_RATE_PER_KEY), so that one application's runaway loop or a leaked
//! key cannot take the API, and the database connections behind it, from every other key: a token
//! bucket per key that holds a second's worth of requests and refills at the rate. Over it, a request
//! gets 429 with Retry-After before it costs a database call. Each daemon counts its own requests
//! (several daemons behind a balancer allow a key their sum).
//!
//! A bucket is found by a hash of the whole secret, not by the key's id: the id is readable in the
//! secret, and a caller who knows only that must not be able to use up another tenant's rate. A
//! secret that is no live key gets a bucket too (the database refuses it after); such buckets are
//! full again after a second and dropped when the map is at its size, so random secrets cannot grow
//! it.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys tracked at once. Past it, buckets that have refilled (which hold nothing a new one would
/// not) are dropped; if none has, a new key goes unmetered until one does.
const MAX_KEYS: usize = 10_000;

pub struct KeyRates {
    per_second: f64,
    hasher: RandomState,
    buckets: Mutex<HashMap<u64, Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl KeyRates {
    /// `per_second` requests a second per key; None for 0 (no limit).
    pub fn new(per_second: u32) -> Option<Self> {
        (per_second > 0).then(|| Self {
            per_second: f64::from(per_second),
            hasher: RandomState::new(),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// What a request over the rate is told (the API's 429 and the stream's).
    pub fn refusal(&self) -> String {
        let rate = self.per_second as u32;
        let requests = if rate == 1 { "request" } else { "requests" };
        format!("this API key is over its rate of {rate} {requests} a second")
    }

    /// Takes one request of `secret`'s at `now`, or says how long until it may make one.
    pub fn take(&self, secret: &str, now: Instant) -> Result<(), Duration> {
        let id = self.hasher.hash_one(secret);
        let rate = self.per_second;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(&id) && buckets.len() >= MAX_KEYS {
            // a full bucket (a second's worth: `rate` tokens) holds nothing a new one would not
            buckets.retain(|_, b| refilled(b, rate, now) < rate);
            if buckets.len() >= MAX_KEYS {
                return Ok(());
            }
        }
        let bucket = buckets.entry(id).or_insert(Bucket {
            tokens: rate,
            at: now,
        });
        bucket.tokens = refilled(bucket, self.per_second, now);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }
}

/// The tokens `b` holds at `now`: what it had, plus the rate for the time since, up to a second's
/// worth.
fn refilled(b: &Bucket, per_second: f64, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    (b.tokens + elapsed * per_second).min(per_second)
}

/// Retry-After's value: whole seconds, at least 1 (the header has no fractions).
pub fn retry_after_seconds(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "hk_1_aaaa";
    const B: &str = "hk_1_bbbb";

    #[test]
    fn zero_means_no_limit() {
        assert!(KeyRates::new(0).is_none());
    }

    #[test]
    fn a_key_gets_a_second_worth_then_the_rate() {
        let rates = KeyRates::new(5).unwrap();
        let t0 = Instant::now();
        for i in 0..5 {
            assert!(rates.take(A, t0).is_ok(), "request {i} of the burst");
        }
        let wait = rates
            .take(A, t0)
            .expect_err("the sixth in the same instant");
        assert_eq!(wait, Duration::from_millis(200));
        assert_eq!(retry_after_seconds(wait), 1);
        // refused requests take nothing: 200 ms later one more goes through, and only one
        let later = t0 + Duration::from_millis(200);
        assert!(rates.take(A, later).is_ok());
        assert!(rates.take(A, later).is_err());
        // an idle key refills to a second's worth, not more
        let idle = t0 + Duration::from_secs(60);
        for _ in 0..5 {
            assert!(rates.take(A, idle).is_ok());
        }
        assert!(rates.take(A, idle).is_err());
    }

    #[test]
    fn one_key_over_its_rate_does_not_hold_up_another() {
        let rates = KeyRates::new(2).unwrap();
        let t0 = Instant::now();
        assert!(rates.take(A, t0).is_ok() && rates.take(A, t0).is_ok());
        assert!(rates.take(A, t0).is_err());
        assert!(
            rates.take(B, t0).is_ok(),
            "another secret has its own bucket"
        );
        // a secret sharing A's key id but not its random part is another bucket too
        assert!(rates.take("hk_1_aaab", t0).is_ok());
    }

    #[test]
    fn random_secrets_do_not_grow_the_map() {
        let rates = KeyRates::new(10).unwrap();
        let t0 = Instant::now();
        for i in 0..MAX_KEYS {
            assert!(rates.take(&format!("hk_9_{i}"), t0).is_ok());
        }
        assert_eq!(rates.tracked(), MAX_KEYS);
        // all of them still partly empty: a new key is let through unmetered, and not kept
        assert!(rates.take(A, t0).is_ok());
        assert_eq!(rates.tracked(), MAX_KEYS);
        // a second later they are full again: dropped, and the new key is tracked
        let later = t0 + Duration::from_secs(1);
        assert!(rates.take(A, later).is_ok());
        assert_eq!(rates.tracked(), 1);
        // a key over its rate is kept through a sweep (its bucket is not full)
        for _ in 0..9 {
            rates.take(A, later).unwrap();
        }
        assert!(rates.take(A, later).is_err());
        for i in 0..MAX_KEYS {
            let _ = rates.take(&format!("hk_8_{i}"), later);
        }
        assert!(rates.take(A, later).is_err(), "still limited");
    }
}
