//! From an automation's definition (JSON, as stored) and its figures to the diagram's graph: one
//! box per node with its figures, one edge per way out of a node (labelled with the branch
//! condition, split weight, decide reply, …) and, where the figures tell it, each arm's share of
//! the contacts that left the node. Pure.
//!
//! How many took an edge is not stored as such; it is worked out from the node figures
//! (`automation_stats`): an email's `next` is taken by what was sent (or suppressed), its
//! `on_error` by what failed; an approval's arms by `approved` / `rejected`; the only way out of a
//! node by all that completed it; otherwise, an edge that is the only way into its target by all
//! that entered the target. An arm whose count cannot be told this way shows no share.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use super::diagram::{shorten, Edge, Figure, Graph, Node};
use super::html::{count, percent};

/// What the database says about an automation's nodes.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    /// (node, metric) → value: entered, completed, queued, sent, failed, dead, suppressed, goal,
    /// approved, rejected (herald.automation_stats, every version).
    pub metrics: HashMap<(String, String), i64>,
    /// node → version → contacts there now (active or waiting).
    pub now: HashMap<String, BTreeMap<i32, i64>>,
    /// node → unique contacts who opened / clicked its email.
    pub opened: HashMap<String, i64>,
    pub clicked: HashMap<String, i64>,
}

impl Figures {
    pub fn metric(&self, node: &str, metric: &str) -> i64 {
        self.metrics
            .get(&(node.to_string(), metric.to_string()))
            .copied()
            .unwrap_or(0)
    }

    pub fn now(&self, node: &str) -> i64 {
        self.now.get(node).map_or(0, |v| v.values().sum())
    }

    /// version → contacts who entered the node on it. The step engine counts `entered` (every
    /// version) and `entered@v<N>` for versions after the first, so version 1's figure is the total
    /// minus the others. Empty when no later version has entered the node.
    pub fn passed_by_version(&self, node: &str) -> BTreeMap<i32, i64> {
        let mut out: BTreeMap<i32, i64> = self
            .metrics
            .iter()
            .filter(|((n, _), _)| n == node)
            .filter_map(|((_, metric), value)| {
                let version = metric.strip_prefix("entered@v")?.parse().ok()?;
                Some((version, *value))
            })
            .collect();
        if !out.is_empty() {
            let later: i64 = out.values().sum();
            out.insert(1, (self.metric(node, "entered") - later).max(0));
        }
        out
    }
}

/// Live-update key of a node figure.
pub fn live_key(node: &str, figure: &str) -> String {
    format!("n:{node}:{figure}")
}

/// One way out of a node, before edges to the same target are merged.
struct Arm {
    to: String,
    label: Option<String>,
    title: Option<String>,
    /// Where its count comes from, when the node's type tells it.
    flow: Option<i64>,
}

fn text(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_string)
}

/// A condition in a few words: `plan = pro`, `score ≥ 50 and …`.
pub fn summarize(c: &Value) -> String {
    if let Some(all) = c.get("all").and_then(Value::as_array) {
        return all.iter().map(summarize).collect::<Vec<_>>().join(" and ");
    }
    if let Some(any) = c.get("any").and_then(Value::as_array) {
        return any.iter().map(summarize).collect::<Vec<_>>().join(" or ");
    }
    if let Some(not) = c.get("not") {
        return format!("not ({})", summarize(not));
    }
    let field = text(c, "field").unwrap_or_default();
    let field = field
        .strip_prefix("contact.")
        .or_else(|| field.strip_prefix("event."))
        .unwrap_or(&field)
        .to_string();
    let op = match text(c, "op").as_deref().unwrap_or("") {
        "eq" => "=",
        "ne" => "≠",
        "gt" => ">",
        "gte" => "≥",
        "lt" => "<",
        "lte" => "≤",
        "exists" => return format!("{field} exists"),
        other => return format!("{field} {other} {}", value_text(c.get("value"))),
    };
    format!("{field} {op} {}", value_text(c.get("value")))
}

fn value_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

fn arm(to: Option<String>, label: Option<String>, flow: Option<i64>) -> Option<Arm> {
    Some(Arm {
        to: to?,
        label,
        title: None,
        flow,
    })
}

/// The ways out of one node, in the definition's order.
fn arms(id: &str, node: &Value, f: &Figures) -> Vec<Arm> {
    let kind = text(node, "type").unwrap_or_default();
    let m = |metric: &str| f.metric(id, metric);
    let mut out: Vec<Arm> = Vec::new();
    match kind.as_str() {
        "email" | "webhook" => {
            let has_error = node.get("on_error").is_some_and(|v| !v.is_null());
            out.extend(arm(
                text(node, "next"),
                has_error.then(|| "ok".to_string()),
                Some(m("sent") + m("suppressed")),
            ));
            out.extend(arm(
                text(node, "on_error"),
                Some("on error".into()),
                Some(m("failed")),
            ));
        }
        "branch" => {
            for (i, p) in node
                .get("paths")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let when = p.get("when").map(summarize).unwrap_or_default();
                if let Some(mut a) = arm(text(p, "next"), Some(shorten(&when, 20)), None) {
                    a.title = Some(format!("path {}: {when}", i + 1));
                    out.push(a);
                }
            }
            out.extend(arm(text(node, "default"), Some("default".into()), None));
        }
        "filter" => {
            out.extend(arm(text(node, "next"), Some("passes".into()), None));
            out.extend(arm(text(node, "otherwise"), Some("otherwise".into()), None));
        }
        "split" => {
            let variants: Vec<&Value> = node
                .get("variants")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .collect();
            let total: f64 = variants
                .iter()
                .filter_map(|v| v.get("weight").and_then(Value::as_f64))
                .sum();
            for v in variants {
                let w = v.get("weight").and_then(Value::as_f64).unwrap_or(0.0);
                let weight = if total > 0.0 {
                    format!("{:.0}%", w * 100.0 / total)
                } else {
                    "?".into()
                };
                if let Some(mut a) = arm(text(v, "next"), Some(format!("weight {weight}")), None) {
                    a.title = Some(format!("split weight {w}"));
                    out.push(a);
                }
            }
        }
        "wait_event" => {
            let event = text(node, "event").unwrap_or_default();
            out.extend(arm(text(node, "next"), Some(shorten(&event, 18)), None));
            out.extend(arm(
                text(node, "timeout_next"),
                Some("timeout".into()),
                None,
            ));
        }
        "approval" => {
            out.extend(arm(
                text(node, "approved"),
                Some("approved".into()),
                Some(m("approved")),
            ));
            out.extend(arm(
                text(node, "rejected"),
                Some("rejected".into()),
                Some(m("rejected")),
            ));
            out.extend(arm(
                text(node, "timeout_next"),
                Some("timeout".into()),
                None,
            ));
        }
        "decide" => {
            if let Some(paths) = node.get("paths").and_then(Value::as_object) {
                for (reply, to) in paths {
                    out.extend(arm(
                        to.as_str().map(str::to_string),
                        Some(shorten(&format!("= {reply}"), 18)),
                        None,
                    ));
                }
            }
            out.extend(arm(text(node, "default"), Some("default".into()), None));
        }
        _ => {
            // delay, update_contact, goal: one way on
            out.extend(arm(text(node, "next"), None, None));
        }
    }
    out
}

/// A short detail under the node type.
fn detail(node: &Value) -> Option<String> {
    let kind = text(node, "type").unwrap_or_default();
    match kind.as_str() {
        "email" => text(node, "template"),
        "webhook" | "decide" => text(node, "url").map(|u| {
            url::Url::parse(&u)
                .ok()
                .and_then(|u| u.host_str().map(str::to_string))
                .unwrap_or(u)
        }),
        "delay" => text(node, "duration")
            .or_else(|| text(node, "until"))
            .or_else(|| node.get("window").map(|_| "window".into())),
        "wait_event" => text(node, "event"),
        "filter" => node.get("when").map(summarize),
        _ => None,
    }
}

/// The figures lines of a node.
fn lines(id: &str, kind: &str, f: &Figures) -> Vec<Vec<Figure>> {
    let fig = |label: &str, value: i64, key: &str| Figure {
        label: label.into(),
        value: count(value),
        live: Some(live_key(id, key)),
    };
    let m = |metric: &str| f.metric(id, metric);
    let mut out = vec![vec![
        fig("now", f.now(id), "now"),
        fig("passed", m("entered"), "passed"),
    ]];
    // per version, when contacts of more than one version are on the node or passed it
    let now = f.now.get(id).cloned().unwrap_or_default();
    let passed = f.passed_by_version(id);
    let versions: std::collections::BTreeSet<i32> = now
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(v, _)| *v)
        .chain(passed.iter().filter(|(_, n)| **n > 0).map(|(v, _)| *v))
        .collect();
    if versions.len() > 1 {
        for v in versions {
            let figure = |what: &str, value: i64| Figure {
                label: format!("v{v} {what}"),
                value: count(value),
                live: Some(live_key(id, &format!("{what}_v{v}"))),
            };
            out.push(vec![
                figure("now", now.get(&v).copied().unwrap_or(0)),
                figure("passed", passed.get(&v).copied().unwrap_or(0)),
            ]);
        }
    }
    match kind {
        "email" => {
            out.push(vec![
                fig("sent", m("sent"), "sent"),
                fig("failed", m("failed") + m("dead"), "failed"),
            ]);
            out.push(vec![
                fig("opened", f.opened.get(id).copied().unwrap_or(0), "opened"),
                fig(
                    "clicked",
                    f.clicked.get(id).copied().unwrap_or(0),
                    "clicked",
                ),
            ]);
        }
        "webhook" | "decide" => {
            out.push(vec![
                fig("ok", m("sent"), "sent"),
                fig("failed", m("failed") + m("dead"), "failed"),
            ]);
        }
        "approval" => {
            out.push(vec![
                fig("approved", m("approved"), "approved"),
                fig("rejected", m("rejected"), "rejected"),
            ]);
        }
        "goal" => out.push(vec![fig("reached", m("goal"), "goal")]),
        _ => {}
    }
    out
}

/// Every figure of the diagram by live key (what the live endpoint sends for an automation page).
pub fn live_values(g: &Graph) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for node in &g.nodes {
        for line in &node.lines {
            for f in line {
                if let Some(k) = &f.live {
                    out.push((k.clone(), f.value.clone()));
                }
            }
        }
    }
    out
}

/// The diagram's graph of a definition with its figures. Edge labels carry each arm's share where
/// it can be told. Also returns, per edge, its count (None: not known) for the page's table.
pub fn build(definition: &Value, f: &Figures) -> (Graph, Vec<Option<i64>>) {
    let empty = serde_json::Map::new();
    let nodes_json = definition
        .get("nodes")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let ids: Vec<&String> = nodes_json.keys().collect();
    let index: HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, k)| (k.as_str(), i))
        .collect();
    let start = definition
        .get("start")
        .and_then(Value::as_str)
        .and_then(|s| index.get(s).copied())
        .unwrap_or(0);

    let mut nodes = Vec::with_capacity(ids.len());
    // (from, to) → merged arm
    let mut edges: Vec<(usize, usize, Vec<Arm>)> = Vec::new();
    for (i, (id, node)) in nodes_json.iter().enumerate() {
        let kind = text(node, "type").unwrap_or_else(|| "?".into());
        nodes.push(Node {
            id: id.clone(),
            kind: kind.clone(),
            detail: detail(node),
            lines: lines(id, &kind, f),
        });
        for a in arms(id, node, f) {
            let Some(&to) = index.get(a.to.as_str()) else {
                continue;
            };
            match edges.iter_mut().find(|(fr, t, _)| *fr == i && *t == to) {
                Some((_, _, list)) => list.push(a),
                None => edges.push((i, to, vec![a])),
            }
        }
    }
    let mut incoming = vec![0usize; nodes.len()];
    for (_, to, _) in &edges {
        incoming[*to] += 1;
    }
    let mut outgoing = vec![0usize; nodes.len()];
    for (from, _, _) in &edges {
        outgoing[*from] += 1;
    }
    let flows: Vec<Option<i64>> = edges
        .iter()
        .map(|(from, to, list)| {
            let typed: Option<i64> = list
                .iter()
                .map(|a| a.flow)
                .try_fold(0i64, |acc, x| x.map(|x| acc + x));
            let from_id = &nodes[*from].id;
            typed
                .or_else(|| (outgoing[*from] == 1).then(|| f.metric(from_id, "completed")))
                .or_else(|| {
                    (incoming[*to] == 1 && *to != start)
                        .then(|| f.metric(&nodes[*to].id, "entered"))
                })
        })
        .collect();
    let graph_edges = edges
        .iter()
        .enumerate()
        .map(|(ei, (from, to, list))| {
            let labels: Vec<&str> = list.iter().filter_map(|a| a.label.as_deref()).collect();
            let titles: Vec<String> = list
                .iter()
                .filter_map(|a| a.title.clone().or_else(|| a.label.clone()))
                .collect();
            let mut label = (!labels.is_empty()).then(|| labels.join(" | "));
            // a share when the node has several ways out and every one is known
            if outgoing[*from] > 1 {
                let siblings: Vec<Option<i64>> = edges
                    .iter()
                    .zip(&flows)
                    .filter(|((fr, _, _), _)| fr == from)
                    .map(|(_, f)| *f)
                    .collect();
                if let (Some(mine), Some(total)) = (
                    flows[ei],
                    siblings.iter().try_fold(0i64, |acc, x| x.map(|x| acc + x)),
                ) {
                    if total > 0 {
                        let share = percent(mine, total);
                        label = Some(match label {
                            Some(l) => format!("{l} · {share}"),
                            None => share,
                        });
                    }
                }
            }
            Edge {
                from: *from,
                to: *to,
                label,
                title: (!titles.is_empty()).then(|| titles.join(" | ")),
            }
        })
        .collect();
    (
        Graph {
            nodes,
            edges: graph_edges,
            start,
        },
        flows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn figures(metrics: &[(&str, &str, i64)], now: &[(&str, i32, i64)]) -> Figures {
        let mut f = Figures::default();
        for (n, m, v) in metrics {
            f.metrics.insert((n.to_string(), m.to_string()), *v);
        }
        for (n, version, v) in now {
            f.now.entry(n.to_string()).or_default().insert(*version, *v);
        }
        f
    }

    fn journey() -> Value {
        json!({
            "name": "Welcome", "trigger": {"event": "signup"}, "start": "split",
            "nodes": {
                "split": {"type": "split", "variants": [{"weight": 1, "next": "a"}, {"weight": 3, "next": "b"}]},
                "a": {"type": "email", "template": "welcome-a", "next": "check", "on_error": "done"},
                "b": {"type": "email", "template": "welcome-b", "next": "check"},
                "check": {"type": "branch", "paths": [{"when": {"field": "contact.plan", "op": "eq", "value": "pro"}, "next": "ok"}], "default": "done"},
                "ok": {"type": "approval", "approved": "done", "rejected": "done"},
                "done": {"type": "exit"}
            }
        })
    }

    #[test]
    fn nodes_edges_labels_and_figures() {
        let f = figures(
            &[
                ("split", "entered", 100),
                ("split", "completed", 100),
                ("a", "entered", 25),
                ("a", "sent", 20),
                ("a", "failed", 3),
                ("b", "entered", 75),
                ("b", "sent", 70),
                ("check", "entered", 90),
                ("check", "completed", 90),
                ("ok", "entered", 30),
                ("ok", "approved", 4),
                ("ok", "rejected", 1),
                ("ok", "entered@v2", 8),
            ],
            &[("a", 1, 2), ("ok", 1, 20), ("ok", 2, 5)],
        );
        let (g, flows) = build(&journey(), &f);
        let id = |n: &str| g.nodes.iter().position(|x| x.id == n).unwrap();
        assert_eq!(g.start, id("split"));
        let edge = |from: &str, to: &str| {
            g.edges
                .iter()
                .position(|e| e.from == id(from) && e.to == id(to))
                .unwrap_or_else(|| panic!("{from} -> {to}"))
        };
        // split arms: weights and shares (a and b are entered only from the split)
        assert_eq!(
            g.edges[edge("split", "a")].label.as_deref(),
            Some("weight 25% · 25.0%")
        );
        assert_eq!(
            g.edges[edge("split", "b")].label.as_deref(),
            Some("weight 75% · 75.0%")
        );
        // email a: ok (sent) and on error (failed)
        assert_eq!(flows[edge("a", "check")], Some(20));
        assert_eq!(
            g.edges[edge("a", "done")].label.as_deref(),
            Some("on error · 13.0%")
        );
        // the branch: the condition in words; shares known (ok entered only from check, done not)
        let pro = &g.edges[edge("check", "ok")];
        assert!(
            pro.label.as_deref().unwrap().starts_with("plan = pro"),
            "{pro:?}"
        );
        assert_eq!(pro.title.as_deref(), Some("path 1: plan = pro"));
        assert_eq!(
            flows[edge("check", "done")],
            None,
            "done is entered from several nodes"
        );
        // the approval: both arms go to done, merged into one edge with both labels
        assert_eq!(flows[edge("ok", "done")], Some(5));
        assert_eq!(
            g.edges[edge("ok", "done")].label.as_deref(),
            Some("approved | rejected")
        );
        // figures: now (all versions), passed, per version when several, email numbers
        let a = &g.nodes[id("a")];
        assert_eq!(a.detail.as_deref(), Some("welcome-a"));
        assert_eq!(a.lines[0][0].value, "2");
        assert_eq!(a.lines[0][1].value, "25");
        assert_eq!(a.lines[1][0].label, "sent");
        assert_eq!(a.lines[1][1].value, "3");
        assert_eq!(a.lines[2][0].label, "opened");
        let ok = &g.nodes[id("ok")];
        assert_eq!(ok.lines[0][0].value, "25");
        assert_eq!(ok.lines[0][1].value, "30", "passed: every version");
        // one line per version: on it now, and passed it (v1 = the total minus later versions)
        let line = |i: usize| {
            ok.lines[i]
                .iter()
                .map(|x| format!("{} {}", x.label, x.value))
                .collect::<Vec<_>>()
        };
        assert_eq!(line(1), ["v1 now 20", "v1 passed 22"]);
        assert_eq!(line(2), ["v2 now 5", "v2 passed 8"]);
        assert_eq!(ok.lines[3][0].value, "4");
        // a node no later version reached has no version lines
        assert_eq!(g.nodes[id("a")].lines.len(), 3);
        let live = live_values(&g);
        assert!(live.contains(&("n:ok:now".to_string(), "25".to_string())));
        assert!(live.contains(&("n:ok:now_v2".to_string(), "5".to_string())));
        assert!(live.contains(&("n:ok:passed_v1".to_string(), "22".to_string())));
    }

    #[test]
    fn unknown_targets_and_odd_definitions_do_not_break_it() {
        let (g, _) = build(
            &json!({"start": "x", "nodes": {"x": {"type": "delay", "next": "nowhere"}}}),
            &Figures::default(),
        );
        assert_eq!(g.nodes.len(), 1);
        assert!(g.edges.is_empty());
        let (g, _) = build(&json!({}), &Figures::default());
        assert!(g.nodes.is_empty());
        assert_eq!(
            summarize(
                &json!({"all": [{"field": "event.score", "op": "gte", "value": 5}, {"not": {"field": "contact.tags", "op": "contains", "value": "vip"}}]})
            ),
            "score ≥ 5 and not (tags contains vip)"
        );
    }
}
