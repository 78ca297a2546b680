//! An automation's graph as an SVG diagram, laid out in layers from the trigger down (a small
//! Sugiyama-style layout, pure and unit-tested):
//!
//! 1. edges that close a cycle (found by a depth-first walk from the start node) are set aside as
//!    back edges and drawn separately (dashed, along the right side of their nodes);
//! 2. every node's layer is its longest path from the start over the other edges, so a node always
//!    sits below everything that leads to it;
//! 3. an edge spanning several layers gets a point in each layer it crosses, so it is routed
//!    between the nodes instead of through them;
//! 4. the order within each layer is improved by a few barycenter sweeps (fewer crossings), then
//!    each row is placed near the average of its neighbours without overlaps;
//! 5. edges leave the bottom of their node spread out, one per arm, and their labels (branch
//!    conditions, split arms, shares) sit on a white box where the arms have parted.
//!
//! Everything drawn is escaped; numbers that update live carry `data-live` keys.

use std::collections::HashMap;
use std::fmt::Write as _;

use super::html::esc;

/// Node box width and the horizontal room between boxes.
const NODE_W: f64 = 208.0;
const GAP_X: f64 = 40.0;
/// The slot of an edge crossing a layer.
const DUMMY_W: f64 = 24.0;
/// Vertical room between layers (labels live there).
const GAP_Y: f64 = 76.0;
const MARGIN: f64 = 24.0;
/// Room on the right for back edges.
const BACK_ROOM: f64 = 72.0;
/// Height of the title lines and of each count line.
const HEAD_H: f64 = 40.0;
const LINE_H: f64 = 17.0;
/// Characters that fit on a line of a node box (12 px sans-serif, ~7 px per character).
const LINE_CHARS: usize = 27;

/// One figure on a node: `label value`, the value updated live when `live` is set.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    pub label: String,
    pub value: String,
    pub live: Option<String>,
}

/// A node of the diagram.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The node's id in the definition.
    pub id: String,
    /// Its type: email, delay, branch, …
    pub kind: String,
    /// A short detail: template, event, duration, …
    pub detail: Option<String>,
    /// Lines of figures.
    pub lines: Vec<Vec<Figure>>,
}

/// An edge `from → to` (indexes into `nodes`), with an optional label.
#[derive(Clone, Debug, PartialEq)]
pub struct Edge {
    pub from: usize,
    pub to: usize,
    pub label: Option<String>,
    /// The label's full text when it was shortened (a tooltip).
    pub title: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    pub start: usize,
}

/// Where everything goes.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    /// Each node's layer (0: the start).
    pub layer: Vec<usize>,
    /// Each node box's top-left corner.
    pub pos: Vec<(f64, f64)>,
    /// Each node box's height.
    pub height: Vec<f64>,
    /// Per edge (same order as `Graph::edges`): the points of its route, and whether it is a back edge.
    pub routes: Vec<Route>,
    pub width: f64,
    pub total_height: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub points: Vec<(f64, f64)>,
    pub back: bool,
    /// Where the label's centre goes.
    pub label_at: (f64, f64),
}

/// Edges that close a cycle: a depth-first walk from the start (then from any node not reached),
/// successors in edge order; an edge to a node still on the walk's stack is a back edge.
fn back_edges(g: &Graph) -> Vec<bool> {
    let n = g.nodes.len();
    let mut out_edges: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, e) in g.edges.iter().enumerate() {
        out_edges[e.from].push(i);
    }
    // 0 unseen, 1 on the stack, 2 done
    let mut state = vec![0u8; n];
    let mut back = vec![false; g.edges.len()];
    let roots = std::iter::once(g.start).chain(0..n);
    for root in roots {
        if state[root] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        state[root] = 1;
        while let Some(&mut (v, ref mut next)) = stack.last_mut() {
            if let Some(&ei) = out_edges[v].get(*next) {
                *next += 1;
                let w = g.edges[ei].to;
                match state[w] {
                    0 => {
                        state[w] = 1;
                        stack.push((w, 0));
                    }
                    1 => back[ei] = true,
                    _ => {}
                }
            } else {
                state[v] = 2;
                stack.pop();
            }
        }
    }
    back
}

/// Longest path from the roots over the forward edges (a DAG once back edges are set aside).
fn layers(g: &Graph, back: &[bool]) -> Vec<usize> {
    let n = g.nodes.len();
    let mut indegree = vec![0usize; n];
    let mut succ: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (e, &b) in g.edges.iter().zip(back) {
        if !b {
            indegree[e.to] += 1;
            succ[e.from].push(e.to);
        }
    }
    let mut layer = vec![0usize; n];
    let mut ready: Vec<usize> = (0..n).rev().filter(|&v| indegree[v] == 0).collect();
    while let Some(v) = ready.pop() {
        for &w in &succ[v] {
            layer[w] = layer[w].max(layer[v] + 1);
            indegree[w] -= 1;
            if indegree[w] == 0 {
                ready.push(w);
            }
        }
    }
    layer
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Slot {
    Node(usize),
    /// The k-th crossing point of edge e.
    Dummy(usize, usize),
}

impl Slot {
    fn width(self) -> f64 {
        match self {
            Slot::Node(_) => NODE_W,
            Slot::Dummy(..) => DUMMY_W,
        }
    }
}

/// Lays the graph out (see the module's description).
pub fn layout(g: &Graph) -> Layout {
    let n = g.nodes.len();
    let back = back_edges(g);
    let layer = layers(g, &back);
    let depth = layer.iter().copied().max().map_or(0, |m| m + 1);

    // slots per layer: nodes in a depth-first order from the start (a stable first guess), then the
    // crossing points of long edges
    let mut rows: Vec<Vec<Slot>> = vec![Vec::new(); depth];
    let mut seen = vec![false; n];
    let mut order = Vec::with_capacity(n);
    let mut stack = vec![g.start];
    for root in std::iter::once(g.start).chain(0..n) {
        if seen.get(root).copied().unwrap_or(true) {
            continue;
        }
        stack.clear();
        stack.push(root);
        while let Some(v) = stack.pop() {
            if seen[v] {
                continue;
            }
            seen[v] = true;
            order.push(v);
            for e in g.edges.iter().rev().filter(|e| e.from == v) {
                if !seen[e.to] {
                    stack.push(e.to);
                }
            }
        }
    }
    for &v in &order {
        rows[layer[v]].push(Slot::Node(v));
    }
    // each forward edge as a chain of slots, one per layer from its source to its target
    let mut chains: Vec<Vec<(usize, Slot)>> = Vec::with_capacity(g.edges.len());
    for (ei, e) in g.edges.iter().enumerate() {
        let mut chain = vec![(layer[e.from], Slot::Node(e.from))];
        if !back[ei] {
            for (k, l) in (layer[e.from] + 1..layer[e.to]).enumerate() {
                let d = Slot::Dummy(ei, k);
                rows[l].push(d);
                chain.push((l, d));
            }
            chain.push((layer[e.to], Slot::Node(e.to)));
        }
        chains.push(chain);
    }
    // neighbours between adjacent layers
    let mut up: HashMap<SlotKey, Vec<Slot>> = HashMap::new();
    let mut down: HashMap<SlotKey, Vec<Slot>> = HashMap::new();
    for chain in &chains {
        for pair in chain.windows(2) {
            down.entry(key(pair[0].1)).or_default().push(pair[1].1);
            up.entry(key(pair[1].1)).or_default().push(pair[0].1);
        }
    }

    // barycenter sweeps: down (by the positions of the layer above), then up
    for sweep in 0..6 {
        let downward = sweep % 2 == 0;
        let range: Vec<usize> = if downward {
            (1..depth).collect()
        } else {
            (0..depth.saturating_sub(1)).rev().collect()
        };
        for l in range {
            let neighbour_row = if downward { l - 1 } else { l + 1 };
            let index: HashMap<SlotKey, usize> = rows[neighbour_row]
                .iter()
                .enumerate()
                .map(|(i, s)| (key(*s), i))
                .collect();
            let links = if downward { &up } else { &down };
            let mut keyed: Vec<(f64, usize, Slot)> = rows[l]
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let ns: Vec<usize> = links
                        .get(&key(*s))
                        .into_iter()
                        .flatten()
                        .filter_map(|x| index.get(&key(*x)).copied())
                        .collect();
                    let bary = if ns.is_empty() {
                        i as f64
                    } else {
                        ns.iter().sum::<usize>() as f64 / ns.len() as f64
                    };
                    (bary, i, *s)
                })
                .collect();
            keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            rows[l] = keyed.into_iter().map(|(_, _, s)| s).collect();
        }
    }

    // x: each row first packed and centred, then pulled towards its parents' positions without
    // overlapping (the mean of a left-packed and a right-packed placement keeps the order)
    let widest = rows.iter().map(|r| row_width(r)).fold(NODE_W, f64::max);
    let mut x: HashMap<SlotKey, f64> = HashMap::new();
    for row in &rows {
        let mut at = (widest - row_width(row)) / 2.0;
        for s in row {
            x.insert(key(*s), at + s.width() / 2.0);
            at += s.width() + GAP_X;
        }
    }
    for row in rows.iter().skip(1) {
        let desired: Vec<f64> = row
            .iter()
            .map(|s| {
                let ps: Vec<f64> = up
                    .get(&key(*s))
                    .into_iter()
                    .flatten()
                    .map(|p| x[&key(*p)])
                    .collect();
                if ps.is_empty() {
                    x[&key(*s)]
                } else {
                    ps.iter().sum::<f64>() / ps.len() as f64
                }
            })
            .collect();
        for (s, cx) in row.iter().zip(place(row, &desired)) {
            x.insert(key(*s), cx);
        }
    }
    let min_left = rows
        .iter()
        .flatten()
        .map(|s| x[&key(*s)] - s.width() / 2.0)
        .fold(f64::INFINITY, f64::min);
    let shift = MARGIN - if min_left.is_finite() { min_left } else { 0.0 };
    for v in x.values_mut() {
        *v += shift;
    }

    // y: rows as tall as their tallest box
    let height: Vec<f64> = g
        .nodes
        .iter()
        .map(|node| HEAD_H + LINE_H * node.lines.len() as f64 + 6.0)
        .collect();
    let mut row_h = vec![0.0f64; depth];
    for v in 0..n {
        row_h[layer[v]] = row_h[layer[v]].max(height[v]);
    }
    let mut row_y = vec![MARGIN; depth];
    for l in 1..depth {
        row_y[l] = row_y[l - 1] + row_h[l - 1] + GAP_Y;
    }
    let pos: Vec<(f64, f64)> = (0..n)
        .map(|v| (x[&key(Slot::Node(v))] - NODE_W / 2.0, row_y[layer[v]]))
        .collect();

    // routes: arms leave the bottom spread out, arrive at the top spread out
    let mut out_rank: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut in_rank: HashMap<usize, Vec<usize>> = HashMap::new();
    for (ei, e) in g.edges.iter().enumerate() {
        if !back[ei] {
            out_rank.entry(e.from).or_default().push(ei);
            in_rank.entry(e.to).or_default().push(ei);
        }
    }
    // order arms by where they go, so they do not cross right under the node
    let first_x = |ei: usize| -> f64 {
        chains[ei]
            .get(1)
            .map(|(_, s)| x[&key(*s)])
            .unwrap_or_default()
    };
    for list in out_rank.values_mut() {
        list.sort_by(|a, b| first_x(*a).total_cmp(&first_x(*b)));
    }
    let last_x = |ei: usize| -> f64 {
        let c = &chains[ei];
        c.get(c.len().saturating_sub(2))
            .map(|(_, s)| x[&key(*s)])
            .unwrap_or_default()
    };
    for list in in_rank.values_mut() {
        list.sort_by(|a, b| last_x(*a).total_cmp(&last_x(*b)));
    }
    let spread = |list: &[usize], ei: usize| -> f64 {
        let k = list.len() as f64;
        let i = list.iter().position(|&e| e == ei).unwrap_or(0) as f64;
        let step = (NODE_W * 0.8 / k.max(1.0)).min(36.0);
        (i - (k - 1.0) / 2.0) * step
    };
    let mut routes = Vec::with_capacity(g.edges.len());
    let mut right = widest + 2.0 * MARGIN;
    for (ei, e) in g.edges.iter().enumerate() {
        let (fx, fy) = pos[e.from];
        let (tx, ty) = pos[e.to];
        if back[ei] {
            // out of the source's right side, up (or down) beside the boxes, into the target's right side
            let bulge = fx.max(tx) + NODE_W + 28.0 + 10.0 * (ei % 4) as f64;
            right = right.max(bulge + MARGIN);
            let a = (fx + NODE_W, fy + height[e.from] / 2.0);
            let b = (tx + NODE_W, ty + height[e.to] / 2.0);
            routes.push(Route {
                points: vec![a, (bulge, a.1), (bulge, b.1), b],
                back: true,
                label_at: (bulge, (a.1 + b.1) / 2.0),
            });
            continue;
        }
        let start = (
            fx + NODE_W / 2.0 + spread(&out_rank[&e.from], ei),
            fy + height[e.from],
        );
        let end = (tx + NODE_W / 2.0 + spread(&in_rank[&e.to], ei), ty);
        let mut points = vec![start];
        for (l, s) in &chains[ei][1..chains[ei].len() - 1] {
            let cx = x[&key(*s)];
            points.push((cx, row_y[*l]));
            points.push((cx, row_y[*l] + row_h[*l]));
        }
        points.push(end);
        // the label halfway down the first stretch, where the arms have parted
        let next = points[1];
        let label_at = (
            start.0 + (next.0 - start.0) * 0.5,
            start.1 + (next.1 - start.1) * 0.5,
        );
        routes.push(Route {
            points,
            back: false,
            label_at,
        });
    }
    stagger_labels(g, &back, &mut routes);
    let total_height =
        row_y.last().copied().unwrap_or(MARGIN) + row_h.last().copied().unwrap_or(0.0) + MARGIN;
    Layout {
        layer,
        pos,
        height,
        routes,
        width: right.max(widest + 2.0 * MARGIN + BACK_ROOM * back.iter().any(|b| *b) as u8 as f64),
        total_height,
    }
}

/// The width of an edge label's box.
fn label_width(label: &str) -> f64 {
    8.0 + 6.4 * label.chars().count() as f64
}

/// Labels of arms leaving one node that would overlap go on a second line, below the first.
fn stagger_labels(g: &Graph, back: &[bool], routes: &mut [Route]) {
    let mut by_source: HashMap<usize, Vec<usize>> = HashMap::new();
    for (ei, e) in g.edges.iter().enumerate() {
        if !back[ei] && e.label.is_some() {
            by_source.entry(e.from).or_default().push(ei);
        }
    }
    for list in by_source.values_mut() {
        list.sort_by(|a, b| routes[*a].label_at.0.total_cmp(&routes[*b].label_at.0));
        // the right end of the last label on each of the two lines
        let mut right = [f64::NEG_INFINITY; 2];
        for &ei in list.iter() {
            let w = label_width(g.edges[ei].label.as_deref().unwrap_or(""));
            let left = routes[ei].label_at.0 - w / 2.0;
            let line = if left >= right[0] + 4.0 {
                0
            } else if left >= right[1] + 4.0 {
                1
            } else {
                0
            };
            right[line] = left + w;
            routes[ei].label_at.1 += 21.0 * line as f64;
        }
    }
}

type SlotKey = (usize, usize, usize);

fn key(s: Slot) -> SlotKey {
    match s {
        Slot::Node(v) => (0, v, 0),
        Slot::Dummy(e, k) => (1, e, k),
    }
}

fn row_width(row: &[Slot]) -> f64 {
    row.iter().map(|s| s.width()).sum::<f64>() + GAP_X * row.len().saturating_sub(1) as f64
}

/// Centres as close to `desired` as the order and the spacing allow: the mean of the placement
/// packed from the left and the one packed from the right (both keep every gap, so their mean does).
fn place(row: &[Slot], desired: &[f64]) -> Vec<f64> {
    let n = row.len();
    let gap = |i: usize| row[i].width() / 2.0 + GAP_X + row[i + 1].width() / 2.0;
    let mut left = desired.to_vec();
    for i in 1..n {
        left[i] = left[i].max(left[i - 1] + gap(i - 1));
    }
    let mut right = desired.to_vec();
    for i in (0..n.saturating_sub(1)).rev() {
        right[i] = right[i].min(right[i + 1] - gap(i));
    }
    left.iter()
        .zip(&right)
        .map(|(a, b)| (a + b) / 2.0)
        .collect()
}

/// Shortens text to `max` characters with an ellipsis.
pub fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// The SVG of a laid-out graph. `title` names it for assistive technology.
pub fn svg(g: &Graph, l: &Layout, title: &str) -> String {
    let mut out = String::with_capacity(4096 + 600 * g.nodes.len());
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"diagram\" viewBox=\"0 0 {w:.0} {h:.0}\" \
         width=\"{w:.0}\" height=\"{h:.0}\" role=\"img\" aria-labelledby=\"diagram-title\">\
         <title id=\"diagram-title\">{}</title>\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" \
         markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\" class=\"arrowhead\"/></marker></defs>",
        esc(title),
        w = l.width,
        h = l.total_height
    );
    out.push_str("<g class=\"edges\">");
    for (e, r) in g.edges.iter().zip(&l.routes) {
        let class = if r.back { "edge edge-back" } else { "edge" };
        let _ = write!(
            out,
            "<path class=\"{class}\" d=\"{}\" marker-end=\"url(#arrow)\" data-from=\"{}\" data-to=\"{}\"/>",
            path_data(&r.points, r.back),
            esc(&g.nodes[e.from].id),
            esc(&g.nodes[e.to].id)
        );
    }
    out.push_str("</g><g class=\"edge-labels\">");
    for (e, r) in g.edges.iter().zip(&l.routes) {
        let Some(label) = &e.label else { continue };
        let w = label_width(label);
        let (cx, cy) = r.label_at;
        let tip = e
            .title
            .as_ref()
            .map(|t| format!("<title>{}</title>", esc(t)))
            .unwrap_or_default();
        let _ = write!(
            out,
            "<g class=\"edge-label\" data-from=\"{}\" data-to=\"{}\">{tip}<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"18\" rx=\"4\"/>\
             <text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text></g>",
            esc(&g.nodes[e.from].id),
            esc(&g.nodes[e.to].id),
            cx - w / 2.0,
            cy - 9.0,
            cy + 4.0,
            esc(label)
        );
    }
    out.push_str("</g><g class=\"nodes\">");
    for (v, node) in g.nodes.iter().enumerate() {
        let (x, y) = l.pos[v];
        let h = l.height[v];
        let start = if v == g.start { " node-start" } else { "" };
        let _ = write!(
            out,
            "<g class=\"node node-{}{start}\" data-node=\"{}\" transform=\"translate({x:.1},{y:.1})\">\
             <title>{} ({})</title><rect width=\"{NODE_W}\" height=\"{h:.1}\" rx=\"7\"/>\
             <text x=\"10\" y=\"17\" class=\"node-id\">{}</text>",
            esc(&css_word(&node.kind)),
            esc(&node.id),
            esc(&node.id),
            esc(&node.kind),
            esc(&shorten(&node.id, LINE_CHARS - 2))
        );
        let kind_line = match &node.detail {
            Some(d) => format!("{} · {d}", node.kind),
            None => node.kind.clone(),
        };
        let _ = write!(
            out,
            "<text x=\"10\" y=\"33\" class=\"node-kind\">{}</text>",
            esc(&shorten(&kind_line, LINE_CHARS + 3))
        );
        for (i, line) in node.lines.iter().enumerate() {
            let _ = write!(
                out,
                "<text x=\"10\" y=\"{:.1}\" class=\"node-figures\">",
                HEAD_H + 12.0 + LINE_H * i as f64
            );
            for (j, f) in line.iter().enumerate() {
                let sep = if j > 0 { " · " } else { "" };
                let live = f
                    .live
                    .as_ref()
                    .map(|k| format!(" data-live=\"{}\"", esc(k)))
                    .unwrap_or_default();
                let _ = write!(
                    out,
                    "<tspan class=\"figure-label\">{sep}{} </tspan><tspan class=\"figure\" data-count=\"{}\"{live}>{}</tspan>",
                    esc(&f.label),
                    esc(&f.label),
                    esc(&f.value)
                );
            }
            out.push_str("</text>");
        }
        out.push_str("</g>");
    }
    out.push_str("</g></svg>");
    out
}

/// A node type as a CSS class word (letters, digits, `-`).
fn css_word(kind: &str) -> String {
    kind.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// A route as SVG path data: vertical S-curves between points for forward edges (straight
/// through the layers they cross), a rounded bracket for back edges.
fn path_data(points: &[(f64, f64)], back: bool) -> String {
    let mut d = String::new();
    let Some(first) = points.first() else {
        return d;
    };
    let _ = write!(d, "M{:.1},{:.1}", first.0, first.1);
    if back {
        for p in &points[1..] {
            let _ = write!(d, " L{:.1},{:.1}", p.0, p.1);
        }
        return d;
    }
    for pair in points.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if (a.0 - b.0).abs() < 0.5 {
            let _ = write!(d, " L{:.1},{:.1}", b.0, b.1);
        } else {
            let my = (a.1 + b.1) / 2.0;
            let _ = write!(
                d,
                " C{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}",
                a.0, my, b.0, my, b.0, b.1
            );
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, kind: &str) -> Node {
        Node {
            id: id.into(),
            kind: kind.into(),
            detail: None,
            lines: vec![vec![Figure {
                label: "now".into(),
                value: "0".into(),
                live: None,
            }]],
        }
    }

    fn graph(ids: &[&str], edges: &[(usize, usize)]) -> Graph {
        Graph {
            nodes: ids.iter().map(|i| node(i, "email")).collect(),
            edges: edges
                .iter()
                .map(|&(from, to)| Edge {
                    from,
                    to,
                    label: None,
                    title: None,
                })
                .collect(),
            start: 0,
        }
    }

    fn overlaps(l: &Layout) -> bool {
        let n = l.pos.len();
        (0..n).any(|a| {
            (0..n).any(|b| {
                a < b && {
                    let (ax, ay) = l.pos[a];
                    let (bx, by) = l.pos[b];
                    ax < bx + NODE_W
                        && bx < ax + NODE_W
                        && ay < by + l.height[b]
                        && by < ay + l.height[a]
                }
            })
        })
    }

    #[test]
    fn layers_are_the_longest_path_from_the_start() {
        // start → a → b → end, and a shortcut start → end: end goes below b, not beside a
        let g = graph(
            &["start", "a", "b", "end"],
            &[(0, 1), (1, 2), (2, 3), (0, 3)],
        );
        let l = layout(&g);
        assert_eq!(l.layer, vec![0, 1, 2, 3]);
        // rows go down
        assert!(l.pos[0].1 < l.pos[1].1 && l.pos[1].1 < l.pos[2].1 && l.pos[2].1 < l.pos[3].1);
        // the shortcut crosses two layers: routed through a point in each
        assert_eq!(l.routes[3].points.len(), 2 + 2 * 2);
        assert!(!overlaps(&l));
        // the shortcut's crossing points sit beside a and b, not on them
        for p in &l.routes[3].points[1..5] {
            for v in [1, 2] {
                let (x, _) = l.pos[v];
                assert!(p.0 < x || p.0 > x + NODE_W, "{p:?} crosses node {v}");
            }
        }
    }

    #[test]
    fn branches_spread_out_and_rejoin_below() {
        // a split into three arms that meet again
        let g = graph(
            &["split", "a", "b", "c", "join"],
            &[(0, 1), (0, 2), (0, 3), (1, 4), (2, 4), (3, 4)],
        );
        let l = layout(&g);
        assert_eq!(l.layer, vec![0, 1, 1, 1, 2]);
        assert!(!overlaps(&l));
        // the arms leave the split at different points, left to right like their targets
        let starts: Vec<f64> = l.routes[..3].iter().map(|r| r.points[0].0).collect();
        assert!(starts[0] < starts[1] && starts[1] < starts[2], "{starts:?}");
        // the join sits under the middle arm
        let centre = |v: usize| l.pos[v].0 + NODE_W / 2.0;
        assert!((centre(4) - centre(2)).abs() < 1.0);
        assert!((centre(0) - centre(4)).abs() < 1.0);
    }

    #[test]
    fn cycles_become_back_edges_and_do_not_loop() {
        // start → wait → check → (back to wait) | done; plus a self-loop
        let g = graph(
            &["start", "wait", "check", "done"],
            &[(0, 1), (1, 2), (2, 1), (2, 3), (3, 3)],
        );
        let l = layout(&g);
        assert_eq!(l.layer, vec![0, 1, 2, 3]);
        assert!(l.routes[2].back && l.routes[4].back);
        assert!(!l.routes[0].back && !l.routes[3].back);
        // drawn on the right of the boxes, inside the picture
        for r in [&l.routes[2], &l.routes[4]] {
            let bulge = r.points[1].0;
            assert!(bulge > l.pos[1].0 + NODE_W && bulge < l.width, "{r:?}");
        }
        let s = svg(&g, &l, "loop");
        assert_eq!(s.matches("edge edge-back").count(), 2);
    }

    #[test]
    fn labels_of_one_node_do_not_overlap() {
        // three arms to targets side by side: long labels would collide at the same height
        let mut g = graph(&["b", "x", "y", "z"], &[(0, 1), (0, 2), (0, 3)]);
        for e in &mut g.edges {
            e.label = Some("a rather long condition · 33.3%".into());
        }
        let l = layout(&g);
        let w = label_width("a rather long condition · 33.3%");
        let boxes: Vec<(f64, f64, f64)> = l
            .routes
            .iter()
            .map(|r| (r.label_at.0 - w / 2.0, r.label_at.0 + w / 2.0, r.label_at.1))
            .collect();
        for (i, a) in boxes.iter().enumerate() {
            for b in &boxes[i + 1..] {
                let apart = a.1 + 2.0 <= b.0 || b.1 + 2.0 <= a.0 || (a.2 - b.2).abs() >= 18.0;
                assert!(apart, "{boxes:?}");
            }
        }
    }

    #[test]
    fn unreachable_nodes_still_get_a_place() {
        let g = graph(&["start", "x", "orphan"], &[(0, 1)]);
        let l = layout(&g);
        assert_eq!(l.layer, vec![0, 1, 0]);
        assert!(!overlaps(&l));
        assert_eq!(layout(&graph(&["only"], &[])).layer, vec![0]);
    }

    #[test]
    fn the_svg_escapes_and_labels() {
        let mut g = graph(&["start", "<b>x</b>"], &[(0, 1)]);
        g.edges[0].label = Some("plan = \"pro\" · 60%".into());
        g.edges[0].title = Some("contact.plan eq 'pro'".into());
        g.nodes[1].detail = Some("tpl <i>".into());
        g.nodes[1].lines = vec![vec![
            Figure {
                label: "now".into(),
                value: "3".into(),
                live: Some("node:<b>x</b>:now".into()),
            },
            Figure {
                label: "passed".into(),
                value: "12".into(),
                live: None,
            },
        ]];
        let s = svg(&g, &layout(&g), "Journey <1>");
        assert!(!s.contains("<b>") && !s.contains("<i>"), "{s}");
        assert!(s.contains("<title id=\"diagram-title\">Journey &lt;1&gt;</title>"));
        assert!(s.contains("data-node=\"&lt;b&gt;x&lt;/b&gt;\""));
        assert!(s.contains("plan = &quot;pro&quot; · 60%"));
        assert!(s.contains("<title>contact.plan eq &#39;pro&#39;</title>"));
        assert!(
            s.contains("data-count=\"now\" data-live=\"node:&lt;b&gt;x&lt;/b&gt;:now\">3</tspan>")
        );
        assert!(s.contains("data-count=\"passed\">12</tspan>"));
        assert!(s.contains("class=\"node node-email node-start\""));
        assert_eq!(shorten("abcdef", 4), "abc…");
        assert_eq!(shorten("abc", 4), "abc");
    }

    #[test]
    fn a_wide_graph_stays_ordered_without_overlaps() {
        // a start with 8 arms, each two nodes deep, all ending in one exit
        let mut ids = vec!["start".to_string()];
        let mut edges = Vec::new();
        for i in 0..8 {
            ids.push(format!("a{i}"));
            ids.push(format!("b{i}"));
            let a = ids.len() - 2;
            edges.push((0, a));
            edges.push((a, a + 1));
        }
        ids.push("exit".into());
        let exit = ids.len() - 1;
        for i in 0..8 {
            edges.push((2 + 2 * i, exit));
        }
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let l = layout(&graph(&refs, &edges));
        assert!(!overlaps(&l));
        assert_eq!(l.layer[exit], 3);
        assert!(l.width >= 8.0 * NODE_W);
    }
}
