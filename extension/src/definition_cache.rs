//! Validated automations kept across ticks, so a definition is validated once per backend and not
//! once per tick for every automation in the batch.
//!
//! Keyed by automation id and version, plus a hash of the definition's text: a changed definition
//! hashes differently and is validated again (the entry is replaced). Versions are separate entries,
//! so enrollments pinned to an older version and those on the newest, ticked in the same batch, do
//! not evict each other. Failures are kept too, so a broken
//! definition costs one validation, not one per tick. Bounded by entries and by the bytes of the
//! definitions behind them; the least recently used entry goes first. Plain Rust: `api.rs` keeps one
//! in a `thread_local!` (a backend is single-threaded) and `tick_batch::run` takes it.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::rc::Rc;

use crate::definition::{self, Automation};
use crate::fault;

/// A validated automation, or why its definition does not validate (faults with their paths).
pub type Validated = Rc<Result<Automation, String>>;

/// (automation id, version)
pub type Key = (i64, i32);

/// Entries kept at most.
pub const MAX_ENTRIES: usize = 1000;
/// Definition text behind the entries at most (a parsed automation takes a few times its text).
pub const MAX_BYTES: usize = 64 * 1024 * 1024;

pub struct DefinitionCache {
    max_entries: usize,
    max_bytes: usize,
    /// Keyed per cache (per backend): a tenant cannot craft two definitions with the same hash.
    hasher: RandomState,
    entries: HashMap<Key, Entry>,
    /// last use → (automation id, version), oldest first
    order: BTreeMap<u64, Key>,
    clock: u64,
    bytes: usize,
    validations: u64,
}

struct Entry {
    hash: u64,
    len: usize,
    used: u64,
    value: Validated,
}

impl Default for DefinitionCache {
    fn default() -> Self {
        Self::with_limits(MAX_ENTRIES, MAX_BYTES)
    }
}

impl DefinitionCache {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_limits(max_entries: usize, max_bytes: usize) -> Self {
        DefinitionCache {
            max_entries,
            max_bytes,
            hasher: RandomState::new(),
            entries: HashMap::new(),
            order: BTreeMap::new(),
            clock: 0,
            bytes: 0,
            validations: 0,
        }
    }

    /// Automation version `id` = (automation id, version) with definition `text` (JSON), validated
    /// unless this exact text was validated for it before.
    pub fn get(&mut self, id: Key, text: &str) -> Validated {
        let hash = self.hasher.hash_one(text);
        self.clock += 1;
        let now = self.clock;
        if let Some(e) = self.entries.get_mut(&id) {
            if e.hash == hash && e.len == text.len() {
                self.order.remove(&e.used);
                e.used = now;
                self.order.insert(now, id);
                return Rc::clone(&e.value);
            }
        }
        self.remove(id);
        self.validations += 1;
        let value: Validated =
            Rc::new(definition::validate_text(text).map_err(|f| fault::describe(&f)));
        if text.len() <= self.max_bytes && self.max_entries > 0 {
            self.entries.insert(
                id,
                Entry {
                    hash,
                    len: text.len(),
                    used: now,
                    value: Rc::clone(&value),
                },
            );
            self.order.insert(now, id);
            self.bytes += text.len();
            while self.entries.len() > self.max_entries || self.bytes > self.max_bytes {
                let Some((_, oldest)) = self.order.pop_first() else {
                    break;
                };
                self.remove(oldest);
            }
        }
        value
    }

    fn remove(&mut self, id: Key) {
        if let Some(e) = self.entries.remove(&id) {
            self.order.remove(&e.used);
            self.bytes -= e.len;
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Definitions validated so far (cache misses).
    pub fn validations(&self) -> u64 {
        self.validations
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(name: &str) -> String {
        json!({"name": name, "start": "e", "nodes": {"e": {"type": "exit"}}}).to_string()
    }

    #[test]
    fn validates_once_per_definition_text() {
        let mut c = DefinitionCache::new();
        let a = c.get((1, 1), &def("a"));
        assert_eq!(a.as_ref().as_ref().unwrap().name, "a");
        let again = c.get((1, 1), &def("a"));
        assert!(Rc::ptr_eq(&a, &again));
        assert_eq!(c.validations(), 1);
        c.get((2, 1), &def("a"));
        assert_eq!(c.validations(), 2, "keyed by automation id too");
        assert_eq!(c.len(), 2);
        c.get((1, 2), &def("a"));
        c.get((1, 1), &def("a"));
        c.get((1, 2), &def("a"));
        assert_eq!(
            c.validations(),
            3,
            "and by version: two versions of 1 are kept side by side"
        );
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn a_changed_definition_is_validated_again() {
        let mut c = DefinitionCache::new();
        c.get((1, 1), &def("a"));
        let b = c.get((1, 1), &def("b"));
        assert_eq!(b.as_ref().as_ref().unwrap().name, "b");
        assert_eq!(c.validations(), 2);
        assert_eq!(c.len(), 1, "the old version is replaced, not kept");
        c.get((1, 1), &def("b"));
        assert_eq!(c.validations(), 2);
    }

    #[test]
    fn failures_are_kept_with_their_faults() {
        let mut c = DefinitionCache::new();
        let bad = c.get((7, 1), r#"{"name": "x"}"#);
        let reason = bad.as_ref().as_ref().unwrap_err();
        assert!(reason.contains("$.nodes: nodes is required"), "{reason}");
        c.get((7, 1), r#"{"name": "x"}"#);
        assert_eq!(c.validations(), 1);
        let deep = format!("{}1{}", "[".repeat(300), "]".repeat(300));
        let r = c.get((8, 1), &deep);
        assert!(
            r.as_ref()
                .as_ref()
                .unwrap_err()
                .contains("nests 300 levels deep; at most 100 are allowed"),
            "{r:?}"
        );
    }

    #[test]
    fn the_least_recently_used_entry_goes_first() {
        let mut c = DefinitionCache::with_limits(3, usize::MAX);
        for id in 1..=3 {
            c.get((id, 1), &def("a"));
        }
        c.get((1, 1), &def("a")); // 2 is now the oldest
        c.get((4, 1), &def("a"));
        assert_eq!(c.len(), 3);
        assert_eq!(c.validations(), 4);
        c.get((1, 1), &def("a"));
        c.get((3, 1), &def("a"));
        c.get((4, 1), &def("a"));
        assert_eq!(c.validations(), 4, "1, 3 and 4 stayed");
        c.get((2, 1), &def("a"));
        assert_eq!(c.validations(), 5, "2 was evicted");
    }

    #[test]
    fn bounded_by_bytes_too() {
        let text = def("a");
        let mut c = DefinitionCache::with_limits(100, text.len() * 2);
        for id in 1..=5 {
            c.get((id, 1), &text);
        }
        assert_eq!(c.len(), 2);
        let mut tiny = DefinitionCache::with_limits(100, 3);
        let v = tiny.get((1, 1), &text);
        assert!(v.is_ok(), "too big to keep is still validated");
        assert!(tiny.is_empty());
    }
}
