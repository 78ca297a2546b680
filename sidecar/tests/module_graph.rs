//! The daemon's modules (`src/run/*`) import each other without circles: a module never imports from
//! one that imports it back, directly or through others. Leaves (job, config, address_policy, pg, …)
//! are what everyone uses; a circle means a type or rule sits in the wrong room. Read from the source:
//! `super::x` / `crate::run::x` paths outside comments and `#[cfg(test)]` modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn run_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/run")
}

/// Every `.rs` file of a module: `x.rs`, or everything under the folder `x/`.
fn files_of(entry: &Path) -> Vec<PathBuf> {
    if entry.is_dir() {
        let mut out = Vec::new();
        for e in std::fs::read_dir(entry).unwrap() {
            out.extend(files_of(&e.unwrap().path()));
        }
        out
    } else if entry.extension().is_some_and(|e| e == "rs") {
        vec![entry.to_path_buf()]
    } else {
        Vec::new()
    }
}

/// The source without comments and without its test module (tests may reach anywhere).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules of `run` a piece of code names (`super::x`, `super::super::x`, `crate::run::x`).
fn named(code: &str, names: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for prefix in ["super::super::", "super::", "crate::run::"] {
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            rest = &rest[at + prefix.len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if names.contains(&name) {
                out.insert(name);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut entries = BTreeMap::new();
    for e in std::fs::read_dir(run_dir()).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if name != "mod" && (path.is_dir() || name.len() + 3 == path.file_name().unwrap().len()) {
            entries.insert(name, path);
        }
    }
    let names: BTreeSet<String> = entries.keys().cloned().collect();
    entries
        .iter()
        .map(|(name, path)| {
            let mut deps = BTreeSet::new();
            for f in files_of(path) {
                let text = std::fs::read_to_string(&f).unwrap();
                deps.extend(named(&code(&text), &names));
            }
            deps.remove(name);
            (name.clone(), deps)
        })
        .collect()
}

/// A circle through `at`, if one is reachable from it.
fn circle(
    graph: &BTreeMap<String, BTreeSet<String>>,
    at: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(i) = path.iter().position(|p| p == at) {
        let mut c = path[i..].to_vec();
        c.push(at.to_string());
        return Some(c);
    }
    if !done.insert(at.to_string()) {
        return None;
    }
    path.push(at.to_string());
    for next in &graph[at] {
        if let Some(c) = circle(graph, next, path, done) {
            return Some(c);
        }
    }
    path.pop();
    None
}

#[test]
fn run_modules_import_each_other_without_circles() {
    let graph = graph();
    assert!(graph.len() > 10, "found the modules: {graph:?}");
    assert!(graph["job"].is_empty(), "job is a leaf: {:?}", graph["job"]);
    for start in graph.keys() {
        let mut done = BTreeSet::new();
        if let Some(c) = circle(&graph, start, &mut Vec::new(), &mut done) {
            panic!("import circle in src/run: {}", c.join(" -> "));
        }
    }
}

#[test]
fn the_check_sees_a_circle() {
    let names: BTreeSet<String> = ["a", "b"].map(String::from).into();
    assert_eq!(
        named(&code("use super::b::X;\n// use super::a::Y;"), &names),
        ["b".to_string()].into()
    );
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), ["b".to_string()].into()),
        ("b".to_string(), ["a".to_string()].into()),
    ]
    .into();
    let found = circle(&graph, "a", &mut Vec::new(), &mut BTreeSet::new());
    assert_eq!(found, Some(vec!["a".into(), "b".into(), "a".into()]));
}
