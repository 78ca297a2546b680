//! Figures that cost a scan proportional to a table (every contact of a workspace, every job in
//! the queue, every journey in progress) are not counted on each request: they are kept here for
//! a few seconds and served as they are while a background task counts them again
//! (stale-while-revalidate). A page therefore answers in the time of its cheap reads, and its
//! numbers are at most [`TTL`] plus one count old; the live updates bring the new ones. Only the
//! very first request for a figure waits for its count.
//!
//! The chart's minutes are cached differently: a minute that has passed does not change, so each
//! request reads only the messages of the minutes not yet known ([`Minutes`]).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::chart::Minute;

/// How long a count is served before it is counted again.
pub const TTL: Duration = Duration::from_secs(10);
/// How long after its end a minute's messages may still appear (see [`Minutes`]).
pub const GRACE: i64 = 10;
/// Entries not asked for this long are dropped (keys: one per automation viewed).
const FORGET: Duration = Duration::from_secs(600);

struct Entry<V> {
    value: Arc<V>,
    at: Instant,
    asked: Instant,
    refreshing: bool,
}

/// Values by key, each recounted in the background once older than [`TTL`].
pub struct Swr<K, V> {
    entries: Mutex<HashMap<K, Entry<V>>>,
    /// Held while a value that is not there yet is loaded, so that requests arriving meanwhile
    /// (or the warm-up at start) wait for that one load instead of starting their own.
    first_load: tokio::sync::Mutex<()>,
}

impl<K, V> Default for Swr<K, V> {
    fn default() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            first_load: tokio::sync::Mutex::new(()),
        }
    }
}

impl<K, V> Swr<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Send + Sync + 'static,
{
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Entry<V>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn store(&self, key: K, value: Arc<V>) {
        let now = Instant::now();
        let mut entries = self.lock();
        entries.retain(|_, e| now.duration_since(e.asked) < FORGET);
        let asked = entries.get(&key).map_or(now, |e| e.asked);
        entries.insert(
            key,
            Entry {
                value,
                at: now,
                asked,
                refreshing: false,
            },
        );
    }

    /// The value of `key` and its age: cached (and, when stale, recounted in the background by
    /// `load`), or loaded now when there is none yet.
    pub async fn get<E, F, Fut>(self: &Arc<Self>, key: K, load: F) -> Result<(Arc<V>, Duration), E>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let cached = {
            let mut entries = self.lock();
            entries.get_mut(&key).map(|e| {
                e.asked = Instant::now();
                let stale = e.at.elapsed() >= TTL && !e.refreshing;
                if stale {
                    e.refreshing = true;
                }
                (Arc::clone(&e.value), e.at.elapsed(), stale)
            })
        };
        match cached {
            Some((value, age, stale)) => {
                if stale {
                    let me = Arc::clone(self);
                    tokio::spawn(async move {
                        match load().await {
                            Ok(v) => me.store(key, Arc::new(v)),
                            Err(e) => {
                                tracing::debug!(error = %e, "admin page: a count was not refreshed");
                                if let Some(entry) = me.lock().get_mut(&key) {
                                    entry.refreshing = false;
                                }
                            }
                        }
                    });
                }
                Ok((value, age))
            }
            None => {
                let _loading = self.first_load.lock().await;
                let loaded = self
                    .lock()
                    .get(&key)
                    .map(|e| (Arc::clone(&e.value), e.at.elapsed()));
                if let Some(done) = loaded {
                    return Ok(done);
                }
                let value = Arc::new(load().await?);
                self.store(key, Arc::clone(&value));
                Ok((value, Duration::ZERO))
            }
        }
    }
}

/// Sent and failed per workspace and minute, for the minutes that are over. A minute is final
/// [`GRACE`] after its end: complete() stamps its rows with the start of its transaction, which
/// commits within a second or so, so a row of a minute can appear a little after the minute.
#[derive(Default)]
pub struct Minutes {
    inner: Mutex<MinutesInner>,
}

#[derive(Default)]
struct MinutesInner {
    /// Minutes before this one (Unix seconds, a whole minute) are final and kept below.
    final_before: i64,
    by_workspace: HashMap<String, BTreeMap<i64, Minute>>,
}

impl Minutes {
    fn lock(&self) -> std::sync::MutexGuard<'_, MinutesInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From when messages must be read: the first minute not yet final (0: the whole hour).
    pub fn read_from(&self) -> i64 {
        self.lock().final_before
    }

    /// Merges what was read from `read_from` on (rows of (workspace, minute, sent, failed)) at the
    /// database's time `now` (Unix seconds), and returns each workspace's last 60 minutes, oldest
    /// first. Minutes from `read_from` on come from the rows (a minute without rows had no
    /// messages), earlier ones from what was kept.
    pub fn merge(
        &self,
        read_from: i64,
        now: f64,
        rows: &[(String, i64, Minute)],
        workspaces: &[String],
    ) -> HashMap<String, Vec<Minute>> {
        let minute = |t: i64| t.div_euclid(60) * 60;
        let this_minute = minute(now.floor() as i64);
        let first = this_minute - 59 * 60;
        let covered_from = read_from.max(first);
        // minutes that ended GRACE seconds ago or more
        let final_before = minute(now.floor() as i64 - GRACE);
        let fresh: HashMap<(&str, i64), Minute> = rows
            .iter()
            .map(|(w, m, v)| ((w.as_str(), *m), *v))
            .collect();
        let mut inner = self.lock();
        for (w, m, v) in rows {
            if *m >= covered_from && *m < final_before {
                inner
                    .by_workspace
                    .entry(w.clone())
                    .or_default()
                    .insert(*m, *v);
            }
        }
        inner.final_before = inner.final_before.max(final_before);
        for minutes in inner.by_workspace.values_mut() {
            *minutes = minutes.split_off(&first);
        }
        inner.by_workspace.retain(|_, m| !m.is_empty());
        workspaces
            .iter()
            .map(|w| {
                let kept = inner.by_workspace.get(w);
                let hour = (0..60)
                    .map(|i| {
                        let m = first + i * 60;
                        let known = if m >= covered_from {
                            fresh.get(&(w.as_str(), m)).copied()
                        } else {
                            kept.and_then(|k| k.get(&m)).copied()
                        };
                        known.unwrap_or_default()
                    })
                    .collect();
                (w.clone(), hour)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn counts_are_served_from_the_cache_and_recounted_in_the_background() {
        let cache: Arc<Swr<u8, usize>> = Arc::default();
        let loads = Arc::new(AtomicUsize::new(0));
        let load = |loads: &Arc<AtomicUsize>| {
            let loads = Arc::clone(loads);
            move || async move { Ok::<_, String>(loads.fetch_add(1, Ordering::SeqCst) + 1) }
        };
        let (v, _) = cache.get(1, load(&loads)).await.unwrap();
        assert_eq!(*v, 1, "the first one is loaded at once");
        let (v, _) = cache.get(1, load(&loads)).await.unwrap();
        assert_eq!(
            (*v, loads.load(Ordering::SeqCst)),
            (1, 1),
            "fresh: from the cache"
        );
        // stale: the old value now, the new one once the background count is done
        cache.lock().get_mut(&1).unwrap().at -= TTL;
        let (v, age) = cache.get(1, load(&loads)).await.unwrap();
        assert_eq!(*v, 1);
        assert!(age >= TTL);
        for _ in 0..100 {
            if loads.load(Ordering::SeqCst) == 2 && !cache.lock()[&1].refreshing {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (v, _) = cache.get(1, load(&loads)).await.unwrap();
        assert_eq!(*v, 2);
        // an error the first time is the caller's
        let e = cache
            .get(2, || async { Err::<usize, _>("down".to_string()) })
            .await;
        assert_eq!(e.unwrap_err(), "down");
    }

    #[test]
    fn minutes_that_are_over_are_read_once() {
        let m = Minutes::default();
        let now = 1_900_000_020 / 60 * 60;
        let ws = vec!["acme".to_string()];
        let one = |s| Minute { sent: s, failed: 0 };
        let rows = |list: &[(i64, i64)]| -> Vec<(String, i64, Minute)> {
            list.iter()
                .map(|(at, n)| ("acme".to_string(), *at, one(*n)))
                .collect()
        };
        // first read: the whole hour; 5 s into the minute the previous one is not final yet
        assert_eq!(m.read_from(), 0);
        let read = rows(&[(now - 59 * 60, 1), (now - 120, 2), (now - 60, 3), (now, 4)]);
        let hour = &m.merge(0, (now + 5) as f64, &read, &ws)["acme"];
        assert_eq!(hour.len(), 60);
        assert_eq!(
            (hour[0].sent, hour[57].sent, hour[58].sent, hour[59].sent),
            (1, 2, 3, 4)
        );
        assert_eq!(m.read_from(), now - 60);
        // 30 s into the minute: the previous one is final; only this one is read next time
        let read = rows(&[(now - 60, 3), (now, 4)]);
        let hour = &m.merge(now - 60, (now + 30) as f64, &read, &ws)["acme"];
        assert_eq!((hour[57].sent, hour[58].sent, hour[59].sent), (2, 3, 4));
        assert_eq!(m.read_from(), now);
        // a minute later, 20 s in: from the kept minutes and the two read
        let later = now + 60;
        let read = rows(&[(now, 5), (later, 6)]);
        let hour = &m.merge(now, (later + 20) as f64, &read, &ws)["acme"];
        assert_eq!(hour[0].sent, 0, "the oldest minute left the hour");
        assert_eq!(
            (hour[56].sent, hour[57].sent, hour[58].sent, hour[59].sent),
            (2, 3, 5, 6)
        );
        assert_eq!(m.read_from(), later);
        // a workspace without messages: an empty hour
        let hour = &m.merge(later, (later + 30) as f64, &[], &["other".to_string()])["other"];
        assert!(hour.iter().all(|x| x.sent == 0 && x.failed == 0));
    }
}
