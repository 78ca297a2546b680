//! The pages' HTML, rendered on the server from what queries.rs read; every value from the database
//! goes through `esc`. Each page with live numbers also has a `*_live` function giving the same
//! numbers by key (what the live endpoint sends), so the page and its updates cannot disagree.

use std::fmt::Write as _;

use serde_json::Value;

use super::chart;
use super::diagram;
use super::graph;
use super::html::{age, button_form, count, esc, live, page, percent, query_value, Frame, Nav};
use super::live::Live;
use super::queries::{
    ApprovalRow, AutomationDetail, AutomationRow, BroadcastRow, ContactHistory, DeadRow,
    WorkspaceFigures,
};

/// The sign-in form. `next` is where to go after signing in (a path below the page, validated).
pub fn login(frame: &Frame, error: Option<&str>, next: &str) -> String {
    let mut body = String::new();
    if let Some(e) = error {
        body.push_str(&super::html::notice("error", e));
    }
    let _ = write!(
        body,
        "<form method=\"post\" action=\"{}/login\" class=\"card login\">\
         <input type=\"hidden\" name=\"next\" value=\"{}\">\
         <p><label for=\"name\">Your name</label>\
         <input type=\"text\" id=\"name\" name=\"name\" required maxlength=\"64\" autocomplete=\"username\" \
         aria-describedby=\"name-hint\" autofocus>\
         <span id=\"name-hint\" class=\"muted hint\">Recorded with the approvals you decide.</span></p>\
         <p><label for=\"password\">Password</label>\
         <input type=\"password\" id=\"password\" name=\"password\" required autocomplete=\"current-password\"></p>\
         <p><button type=\"submit\" class=\"primary\">Sign in</button></p></form>",
        esc(frame.base),
        esc(next)
    );
    page(frame, "Sign in", Nav::None, &body)
}

fn figure(label: &str, key: &str, value: &str) -> String {
    format!(
        "<div><dt>{}</dt><dd>{}</dd></div>",
        esc(label),
        live(key, value)
    )
}

fn oldest(w: &WorkspaceFigures) -> String {
    w.oldest_due.map_or_else(|| "none due".into(), age)
}

/// Overview: per workspace, contacts, events/min, live automations, the queue, sent/failed per
/// minute over the last hour.
pub fn overview(frame: &Frame, workspaces: &[WorkspaceFigures]) -> String {
    let mut body = String::new();
    if workspaces.is_empty() {
        body.push_str("<p class=\"card\">No workspaces yet: <code>SELECT herald.create_workspace('id', 'name')</code>.</p>");
    }
    for w in workspaces {
        let k = |f: &str| format!("w:{}:{f}", w.id);
        let dead = format!(
            "<div><dt>Dead letters</dt><dd><a href=\"{}/dead-letters\">{}</a></dd></div>",
            esc(frame.base),
            live(&k("dead"), &count(w.counts.dead))
        );
        let _ = write!(
            body,
            "<section class=\"card\" aria-labelledby=\"ws-{id}\" data-workspace=\"{id}\"><h2 id=\"ws-{id}\">{name} <span class=\"muted\">({id})</span></h2>\
             <div class=\"workspace\"><div><dl class=\"figures\">{}{}{}{}{}{}{}{}{}</dl>\
             <p class=\"muted small\">Contacts, pending, due, held and dead: counted {} ago (again every {} s).</p></div>\
             <figure><figcaption id=\"chart-{id}\">Sent (green) and failed (red) per minute, last hour</figcaption>\
             <div data-live-html=\"{chart_key}\">{}</div></figure></div></section>",
            figure("Contacts", &k("contacts"), &count(w.counts.contacts)),
            figure("Events, last minute", &k("events"), &count(w.events_last_minute)),
            figure("Live automations", &k("live"), &count(w.live_automations)),
            figure("Pending jobs", &k("pending"), &count(w.counts.pending)),
            figure("Due now", &k("due"), &count(w.counts.due)),
            figure("Leased (sending)", &k("leased"), &count(w.leased)),
            figure("Held (paused)", &k("held"), &count(w.counts.held)),
            figure("Oldest due job waiting", &k("oldest"), &oldest(w)),
            dead,
            live(&k("counted"), &age(w.counted_ago.as_secs_f64())),
            super::cache::TTL.as_secs(),
            chart::svg(&w.minutes, &w.id),
            id = esc(&w.id),
            name = esc(&w.name),
            chart_key = esc(&k("chart")),
        );
    }
    page(frame, "Overview", Nav::Overview, &body)
}

pub fn overview_live(workspaces: &[WorkspaceFigures]) -> Live {
    let mut l = Live::default();
    for w in workspaces {
        let k = |f: &str| format!("w:{}:{f}", w.id);
        l.text(k("contacts"), count(w.counts.contacts));
        l.text(k("events"), count(w.events_last_minute));
        l.text(k("live"), count(w.live_automations));
        l.text(k("pending"), count(w.counts.pending));
        l.text(k("due"), count(w.counts.due));
        l.text(k("leased"), count(w.leased));
        l.text(k("held"), count(w.counts.held));
        l.text(k("dead"), count(w.counts.dead));
        l.text(k("oldest"), oldest(w));
        l.text(k("counted"), age(w.counted_ago.as_secs_f64()));
        l.html(k("chart"), chart::svg(&w.minutes, &w.id));
    }
    l
}

fn badge(status: &str) -> String {
    format!(
        "<span class=\"badge badge-{}\">{}</span>",
        esc(status),
        esc(status)
    )
}

/// Every automation with its contacts in progress.
pub fn automations(frame: &Frame, rows: &[AutomationRow]) -> String {
    let mut body = String::from(
        "<table><caption>Automations (in progress: active and waiting enrollments)</caption><thead><tr>\
         <th scope=\"col\">Workspace</th><th scope=\"col\">Automation</th><th scope=\"col\">Status</th>\
         <th scope=\"col\">Trigger</th><th scope=\"col\" class=\"num\">Versions</th>\
         <th scope=\"col\" class=\"num\">Active</th><th scope=\"col\" class=\"num\">Waiting</th></tr></thead><tbody>",
    );
    for a in rows {
        let _ = write!(
            body,
            "<tr><td>{}</td><td><a href=\"{}/automations/{}\">{}</a> <span class=\"muted\">#{}</span></td><td>{}</td>\
             <td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(&a.workspace),
            esc(frame.base),
            a.id,
            esc(&a.name),
            a.id,
            badge(&a.status),
            esc(a.trigger.as_deref().unwrap_or("–")),
            a.versions,
            live(&format!("a:{}:active", a.id), &count(a.active)),
            live(&format!("a:{}:waiting", a.id), &count(a.waiting)),
        );
    }
    if rows.is_empty() {
        body.push_str("<tr><td colspan=\"7\">No automations yet.</td></tr>");
    }
    body.push_str("</tbody></table>");
    page(frame, "Automations", Nav::Automations, &body)
}

pub fn automations_live(rows: &[AutomationRow]) -> Live {
    let mut l = Live::default();
    for a in rows {
        l.text(format!("a:{}:active", a.id), count(a.active));
        l.text(format!("a:{}:waiting", a.id), count(a.waiting));
    }
    l
}

/// What the contact search found, for the automation page.
pub enum Search {
    None,
    NotFound(String),
    Found(ContactHistory),
}

/// An automation: its diagram with figures, the same figures as tables, versions, and the step
/// history of one contact.
pub fn automation(frame: &Frame, a: &AutomationDetail, search: &Search) -> String {
    let (g, flows) = graph::build(&a.definition, &a.figures);
    let layout = diagram::layout(&g);
    let mut body = String::new();
    let total = |m: &str| a.totals.get(m).copied().unwrap_or(0);
    let _ = write!(
        body,
        "<section class=\"card\"><p>{} · workspace <strong>{}</strong> · trigger <code>{}</code> · version {} · \
         <a href=\"{}/automations\">all automations</a></p>\
         <dl class=\"figures\">{}{}{}{}{}</dl></section>",
        badge(&a.status),
        esc(&a.workspace),
        esc(a.trigger.as_deref().unwrap_or("(none: manual enrolment)")),
        a.version,
        esc(frame.base),
        figure("Enrolled", "t:enrolled", &count(total("enrolled"))),
        figure("Completed", "t:completed", &count(total("completed") + total("completed_journey"))),
        figure("Exited", "t:exited", &count(total("exited"))),
        figure("Failed", "t:failed", &count(total("failed"))),
        figure("Goal reached", "t:goal", &count(total("goal"))),
    );
    let _ = write!(
        body,
        "<section aria-labelledby=\"diagram-h\"><h2 id=\"diagram-h\">Journey</h2>\
         <p class=\"muted\">Each box: contacts on the node now and how many passed it; arms with their share of \
         the contacts that left the node, where it can be told. Dashed: a way back.</p>\
         <div class=\"diagram-wrap\" tabindex=\"0\" aria-label=\"Journey diagram (scrollable)\">{}</div></section>",
        diagram::svg(&g, &layout, &format!("Journey of {}", a.name))
    );

    // the same numbers as tables (readable without the picture)
    body.push_str(
        "<h2>Nodes</h2><table><caption>Per node (sent, failed, opened, clicked: email nodes)</caption><thead><tr>\
         <th scope=\"col\">Node</th><th scope=\"col\">Type</th><th scope=\"col\" class=\"num\">Now</th>\
         <th scope=\"col\" class=\"num\">Passed</th><th scope=\"col\" class=\"num\">Sent</th>\
         <th scope=\"col\" class=\"num\">Failed</th><th scope=\"col\" class=\"num\">Opened</th>\
         <th scope=\"col\" class=\"num\">Clicked</th></tr></thead><tbody>",
    );
    for node in &g.nodes {
        let f = &a.figures;
        let id = &node.id;
        let is_job = matches!(node.kind.as_str(), "email" | "webhook" | "decide");
        let job = |v: i64| if is_job { count(v) } else { "–".into() };
        let mail = |v: i64| {
            if node.kind == "email" {
                count(v)
            } else {
                "–".into()
            }
        };
        let _ = write!(
            body,
            "<tr data-node=\"{}\"><th scope=\"row\">{}</th><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(id),
            esc(id),
            esc(&node.kind),
            live(&graph::live_key(id, "now"), &count(f.now(id))),
            live(&graph::live_key(id, "passed"), &count(f.metric(id, "entered"))),
            job(f.metric(id, "sent")),
            job(f.metric(id, "failed") + f.metric(id, "dead")),
            mail(f.opened.get(id).copied().unwrap_or(0)),
            mail(f.clicked.get(id).copied().unwrap_or(0)),
        );
    }
    body.push_str("</tbody></table>");
    let arms: Vec<(usize, &diagram::Edge)> = g
        .edges
        .iter()
        .enumerate()
        .filter(|(_, e)| g.edges.iter().filter(|x| x.from == e.from).count() > 1)
        .collect();
    if !arms.is_empty() {
        body.push_str(
            "<h2>Arms</h2><table><caption>Where contacts went from nodes with several ways out</caption><thead><tr>\
             <th scope=\"col\">From</th><th scope=\"col\">To</th><th scope=\"col\">Arm</th>\
             <th scope=\"col\" class=\"num\">Contacts</th><th scope=\"col\" class=\"num\">Share</th></tr></thead><tbody>",
        );
        for (ei, e) in arms {
            let total: Option<i64> = g
                .edges
                .iter()
                .enumerate()
                .filter(|(_, x)| x.from == e.from)
                .try_fold(0i64, |acc, (i, _)| flows[i].map(|f| acc + f));
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                esc(&g.nodes[e.from].id),
                esc(&g.nodes[e.to].id),
                esc(e.title.as_deref().or(e.label.as_deref()).unwrap_or("")),
                flows[ei].map_or("not known".into(), count),
                match (flows[ei], total) {
                    (Some(f), Some(t)) => percent(f, t),
                    _ => "–".into(),
                }
            );
        }
        body.push_str("</tbody></table>");
    }
    // per version: contacts in progress (only when there are several versions)
    if a.versions.len() > 1 {
        body.push_str(
            "<h2>Versions</h2><table><caption>Contacts in progress per version</caption><thead><tr>\
             <th scope=\"col\">Version</th><th scope=\"col\">Made</th><th scope=\"col\">Note</th>\
             <th scope=\"col\">In progress, by node</th></tr></thead><tbody>",
        );
        for (v, at, note) in &a.versions {
            let mut nodes: Vec<(&String, i64)> = a
                .figures
                .now
                .iter()
                .filter_map(|(node, by)| by.get(v).map(|n| (node, *n)))
                .filter(|(_, n)| *n > 0)
                .collect();
            nodes.sort();
            let list = if nodes.is_empty() {
                "none".to_string()
            } else {
                nodes
                    .iter()
                    .map(|(node, n)| format!("{} {}", esc(node), count(*n)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = write!(
                body,
                "<tr><th scope=\"row\">v{v}{}</th><td>{}</td><td>{}</td><td>{list}</td></tr>",
                if *v == a.version { " (current)" } else { "" },
                esc(at),
                esc(note.as_deref().unwrap_or(""))
            );
        }
        body.push_str("</tbody></table>");
    }

    // one contact's history
    let searched = match search {
        Search::NotFound(e) => e.as_str(),
        Search::Found(h) => h.email.as_str(),
        Search::None => "",
    };
    let _ = write!(
        body,
        "<h2 id=\"contact-h\">A contact's steps</h2>\
         <form method=\"get\" action=\"{}/automations/{}\" class=\"search\" role=\"search\" aria-labelledby=\"contact-h\">\
         <div><label for=\"email\">Contact email</label><input type=\"email\" id=\"email\" name=\"email\" value=\"{}\" required></div>\
         <button type=\"submit\">Show steps</button></form>",
        esc(frame.base),
        a.id,
        esc(searched)
    );
    match search {
        Search::None => {}
        Search::NotFound(email) => {
            let _ = write!(
                body,
                "<p role=\"status\">No contact {} in workspace {}.</p>",
                esc(email),
                esc(&a.workspace)
            );
        }
        Search::Found(h) if h.journeys.is_empty() => {
            let _ = write!(
                body,
                "<p role=\"status\">{} (contact #{}) has not been in this automation.</p>",
                esc(&h.email),
                h.contact
            );
        }
        Search::Found(h) => {
            for j in &h.journeys {
                let _ = write!(
                    body,
                    "<table class=\"steps\" data-enrollment=\"{}\"><caption>Enrollment #{} of {} (v{}): {} at {} since {}{}</caption>\
                     <thead><tr><th scope=\"col\">When</th><th scope=\"col\">Node</th><th scope=\"col\" class=\"num\">Visit</th>\
                     <th scope=\"col\">What happened</th></tr></thead><tbody>",
                    j.enrollment,
                    j.enrollment,
                    esc(&h.email),
                    j.version,
                    esc(&j.status),
                    esc(&j.node),
                    esc(&j.enrolled_at),
                    j.ended
                        .as_ref()
                        .map(|e| format!(
                            ", ended {} ({})",
                            esc(e),
                            esc(j.exit_reason.as_deref().unwrap_or(""))
                        ))
                        .unwrap_or_default()
                );
                for (at, node, visit, action) in &j.steps {
                    let _ = write!(
                        body,
                        "<tr><td>{}</td><td>{}</td><td class=\"num\">{visit}</td><td>{}</td></tr>",
                        esc(at),
                        esc(node),
                        esc(action)
                    );
                }
                if j.steps.is_empty() {
                    body.push_str("<tr><td colspan=\"4\">No steps logged (pruned, or not ticked yet).</td></tr>");
                }
                body.push_str("</tbody></table>");
            }
        }
    }
    page(
        frame,
        &format!("{} (#{})", a.name, a.id),
        Nav::Automations,
        &body,
    )
}

pub fn automation_live(a: &AutomationDetail) -> Live {
    let (g, _) = graph::build(&a.definition, &a.figures);
    let mut l = Live::default();
    for (k, v) in graph::live_values(&g) {
        l.text(k, v);
    }
    // edge labels carry shares; they are redrawn with the diagram on reload only
    let total = |m: &str| a.totals.get(m).copied().unwrap_or(0);
    l.text("t:enrolled", count(total("enrolled")));
    l.text(
        "t:completed",
        count(total("completed") + total("completed_journey")),
    );
    l.text("t:exited", count(total("exited")));
    l.text("t:failed", count(total("failed")));
    l.text("t:goal", count(total("goal")));
    l
}

/// The numbers of a broadcast's progress: (sent, failed, suppressed or cancelled, still to go).
fn progress_parts(b: &BroadcastRow) -> (i64, i64, i64, i64) {
    let sent = b.total("sent");
    let failed = b.total("failed") + b.total("dead");
    let skipped = b.total("suppressed") + b.total("cancelled");
    let left = (b.enqueued - sent - failed - skipped).max(0);
    (sent, failed, skipped, left)
}

fn audience_note(b: &BroadcastRow) -> &'static str {
    match (b.status.as_str(), b.phase.as_str()) {
        ("sent" | "cancelled", _) | (_, "done") => "the whole audience",
        ("draft" | "scheduled", _) => "nothing queued yet",
        _ => "queued so far (the audience is queued in chunks)",
    }
}

/// Broadcasts: progress, results per variation, the A/B winner and why, and the buttons.
pub fn broadcasts(frame: &Frame, rows: &[BroadcastRow], notice: &str) -> String {
    let csrf = frame.csrf.unwrap_or("");
    let mut body = notice.to_string();
    if rows.is_empty() {
        body.push_str("<p class=\"card\">No broadcasts yet.</p>");
    }
    for b in rows {
        let k = |f: &str| format!("b:{}:{f}", b.id);
        let (sent, failed, skipped, left) = progress_parts(b);
        let _ = write!(
            body,
            "<section class=\"card\" aria-labelledby=\"b-{id}\" data-broadcast=\"{id}\">\
             <h2 id=\"b-{id}\">{name} <span class=\"muted\">#{id} · {ws}</span> <span data-live=\"{sk}\">{status}</span></h2>\
             <p>Phase <strong data-live=\"{pk}\">{phase}</strong>{send_at}. Queued: <strong>{}</strong> ({}).</p>",
            live(&k("enqueued"), &count(b.enqueued)),
            audience_note(b),
            id = b.id,
            name = esc(&b.name),
            ws = esc(&b.workspace),
            sk = esc(&k("status")),
            status = badge(&b.status),
            pk = esc(&k("phase")),
            phase = esc(&b.phase),
            send_at = b
                .send_at
                .as_ref()
                .map(|s| format!(", send at {}", esc(s)))
                .unwrap_or_default(),
        );
        body.push_str("<div class=\"progress\">");
        for (label, key, value, class) in [
            ("Sent", "sent", sent, "sent"),
            ("Failed", "failed", failed, "failed"),
            ("Skipped", "skipped", skipped, "skipped"),
            ("To go", "left", left, "left"),
        ] {
            let _ = write!(
                body,
                "<span id=\"{id}\">{label}</span><progress class=\"{class}\" aria-labelledby=\"{id}\" value=\"{}\" max=\"{}\" data-live-attrs=\"{}\"></progress>\
                 <span>{} <span class=\"muted\">(<span data-live=\"{}\">{}</span>)</span></span>",
                value.max(0),
                b.enqueued.max(1),
                esc(&k(&format!("{key}_bar"))),
                live(&k(key), &count(value)),
                esc(&k(&format!("{key}_pct"))),
                percent(value, b.enqueued),
                id = esc(&format!("b-{}-{key}", b.id)),
            );
        }
        body.push_str("</div>");
        if let Some(e) = &b.last_error {
            let _ = write!(
                body,
                "<p class=\"notice notice-error\">Last advance failed: {}</p>",
                esc(e)
            );
        }
        // kept after a cancel (why it stopped); said while it waits for a resume or a cancel
        if let (Some(why), "paused") = (&b.auto_paused, b.status.as_str()) {
            let _ = write!(
                body,
                "<p class=\"notice notice-error\" data-auto-paused>Paused by itself: {}. Resume it \
                 to go on (counted afresh from then), or cancel it.</p>",
                esc(&crate::listing::auto_pause_note(why))
            );
        }

        // per variation
        let keys: Vec<String> = if b.variations.is_empty() {
            b.stats.keys().cloned().collect()
        } else {
            b.variations.iter().map(|(k, _)| k.clone()).collect()
        };
        let _ = write!(
            body,
            "<table><caption>Per variation{}</caption><thead><tr><th scope=\"col\">Variation</th><th scope=\"col\">Template</th>\
             <th scope=\"col\" class=\"num\">Sent</th><th scope=\"col\" class=\"num\">Failed</th>\
             <th scope=\"col\" class=\"num\">Bounced</th><th scope=\"col\" class=\"num\">Complaints</th>\
             <th scope=\"col\" class=\"num\">Opened</th><th scope=\"col\" class=\"num\">Clicked</th>\
             <th scope=\"col\" class=\"num\">Open rate</th><th scope=\"col\" class=\"num\">Click rate</th></tr></thead><tbody>",
            b.ab_metric
                .as_ref()
                .map(|m| format!(" (A/B test on {})", esc(m)))
                .unwrap_or_default()
        );
        for key in &keys {
            let m = |metric: &str| {
                b.stats
                    .get(key)
                    .and_then(|s| s.get(metric))
                    .copied()
                    .unwrap_or(0)
            };
            let template = b
                .variations
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, t)| t.as_str())
                .unwrap_or("");
            let winner = if b.winner.as_deref() == Some(key.as_str()) {
                " <span class=\"badge badge-sent\">winner</span>"
            } else {
                ""
            };
            let vk = |f: &str| format!("b:{}:v:{key}:{f}", b.id);
            let _ = write!(
                body,
                "<tr><th scope=\"row\">{}{winner}</th><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                esc(key),
                esc(template),
                live(&vk("sent"), &count(m("sent"))),
                live(&vk("failed"), &count(m("failed") + m("dead"))),
                // hard bounces: reported after sending, or refused at send time
                live(&vk("bounced"), &count(m("bounced") + m("refused"))),
                live(&vk("complained"), &count(m("complained"))),
                live(&vk("opened"), &count(m("opened"))),
                live(&vk("clicked"), &count(m("clicked"))),
                live(&vk("open_rate"), &percent(m("opened"), m("sent"))),
                live(&vk("click_rate"), &percent(m("clicked"), m("sent"))),
            );
        }
        body.push_str("</tbody></table>");
        match (&b.winner, &b.winner_reason) {
            (Some(w), reason) => {
                let _ = write!(
                    body,
                    "<p><strong>A/B winner: {}</strong>. Why: {}</p>",
                    esc(w),
                    esc(reason.as_deref().unwrap_or("(no reason recorded)"))
                );
            }
            (None, _) if b.ab_metric.is_some() => {
                let _ = write!(
                    body,
                    "<p>A/B test: no winner yet{}.</p>",
                    b.test_ends_at
                        .as_ref()
                        .map(|t| format!(" (the test ends at {})", esc(t)))
                        .unwrap_or_default()
                );
            }
            _ => {}
        }
        // what can be done now (the database checks again)
        body.push_str("<p class=\"actions\">");
        let action = |verb: &str| format!("{}/broadcasts/{}/{verb}", frame.base, b.id);
        if matches!(b.status.as_str(), "scheduled" | "sending") {
            body.push_str(&button_form(
                &action("pause"),
                csrf,
                ("Pause", &b.name),
                "",
                None,
            ));
        }
        if b.status == "paused" {
            body.push_str(&button_form(
                &action("resume"),
                csrf,
                ("Resume", &b.name),
                "primary",
                None,
            ));
        }
        if !matches!(b.status.as_str(), "sent" | "cancelled") {
            body.push_str(&button_form(
                &action("cancel"),
                csrf,
                ("Cancel", &b.name),
                "danger",
                Some(&format!(
                    "Cancel broadcast {}? Every message not yet sent is dropped.",
                    b.name
                )),
            ));
        }
        body.push_str("</p></section>");
    }
    page(frame, "Broadcasts", Nav::Broadcasts, &body)
}

pub fn broadcasts_live(rows: &[BroadcastRow]) -> Live {
    let mut l = Live::default();
    for b in rows {
        let k = |f: &str| format!("b:{}:{f}", b.id);
        let (sent, failed, skipped, left) = progress_parts(b);
        l.text(k("enqueued"), count(b.enqueued));
        l.text(k("phase"), b.phase.clone());
        l.html(k("status"), badge(&b.status));
        for (key, value) in [
            ("sent", sent),
            ("failed", failed),
            ("skipped", skipped),
            ("left", left),
        ] {
            l.text(k(key), count(value));
            l.text(k(&format!("{key}_pct")), percent(value, b.enqueued));
            l.progress(k(&format!("{key}_bar")), value, b.enqueued);
        }
        for (key, stats) in &b.stats {
            let m = |metric: &str| stats.get(metric).copied().unwrap_or(0);
            let vk = |f: &str| format!("b:{}:v:{key}:{f}", b.id);
            l.text(vk("sent"), count(m("sent")));
            l.text(vk("failed"), count(m("failed") + m("dead")));
            l.text(vk("bounced"), count(m("bounced") + m("refused")));
            l.text(vk("complained"), count(m("complained")));
            l.text(vk("opened"), count(m("opened")));
            l.text(vk("clicked"), count(m("clicked")));
            l.text(vk("open_rate"), percent(m("opened"), m("sent")));
            l.text(vk("click_rate"), percent(m("clicked"), m("sent")));
        }
    }
    l
}

/// A JSON value as readable, escaped text (shortened: contexts can be large).
fn json_text(v: &Value) -> String {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    esc(&diagram::shorten(&text, 2000))
}

/// Pending approvals with their contact and context, and the two buttons.
pub fn approvals(frame: &Frame, rows: &[ApprovalRow], total: i64, notice: &str) -> String {
    let csrf = frame.csrf.unwrap_or("");
    let mut body = notice.to_string();
    let _ = write!(
        body,
        "<p>Pending: <strong>{}</strong> (the oldest 200 below; decisions are recorded with your name, {}).</p>\
         <table><caption>Pending approvals</caption><thead><tr><th scope=\"col\">Contact</th><th scope=\"col\">Automation</th>\
         <th scope=\"col\">Node</th><th scope=\"col\">Waiting since</th><th scope=\"col\">Times out</th>\
         <th scope=\"col\">Context</th><th scope=\"col\">Decide</th></tr></thead><tbody>",
        live("approvals:count", &count(total)),
        esc(frame.operator.unwrap_or(""))
    );
    for r in rows {
        let action = |verb: &str| format!("{}/approvals/{}/{verb}", frame.base, r.enrollment);
        let _ = write!(
            body,
            "<tr data-enrollment=\"{}\"><th scope=\"row\">{}<br><span class=\"muted\">{} · enrollment #{}</span></th>\
             <td><a href=\"{}/automations/{}?email={}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td>\
             <td><details><summary>context</summary><pre>{}</pre>{}</details></td><td>{}{}</td></tr>",
            r.enrollment,
            esc(&r.email),
            esc(&r.workspace),
            r.enrollment,
            esc(frame.base),
            r.automation,
            esc(&query_value(&r.email)),
            esc(&r.automation_name),
            esc(&r.node),
            esc(&r.waiting_since),
            esc(r.times_out_at.as_deref().unwrap_or("never")),
            json_text(&r.context),
            r.event
                .as_ref()
                .map(|e| format!("<p class=\"muted\">trigger event:</p><pre>{}</pre>", json_text(e)))
                .unwrap_or_default(),
            button_form(&action("approve"), csrf, ("Approve", &r.email), "good", None),
            button_form(&action("reject"), csrf, ("Reject", &r.email), "danger", None),
        );
    }
    if rows.is_empty() {
        body.push_str("<tr><td colspan=\"7\">Nothing waits for a decision.</td></tr>");
    }
    body.push_str("</tbody></table>");
    page(frame, "Approvals", Nav::Approvals, &body)
}

pub fn approvals_live(total: i64) -> Live {
    let mut l = Live::default();
    l.text("approvals:count", count(total));
    l
}

/// Dead letters with their error, and redrive buttons.
pub fn dead_letters(frame: &Frame, rows: &[DeadRow], total: i64, notice: &str) -> String {
    let csrf = frame.csrf.unwrap_or("");
    let mut body = notice.to_string();
    let _ = write!(
        body,
        "<p>Dead jobs: <strong>{}</strong> (the newest 200 below). Redrive puts a job back in the queue with its \
         attempts reset; its journey goes on when it succeeds.</p>\
         <table><caption>Dead letters</caption><thead><tr><th scope=\"col\">Job</th><th scope=\"col\">Recipient</th>\
         <th scope=\"col\">From</th><th scope=\"col\" class=\"num\">Attempts</th><th scope=\"col\">Died</th>\
         <th scope=\"col\">Error</th><th scope=\"col\">Redrive</th></tr></thead><tbody>",
        live("dead:count", &count(total))
    );
    for d in rows {
        let from = match (d.automation, &d.node) {
            (Some(a), node) => format!(
                "<a href=\"{}/automations/{a}\">automation #{a}</a>{}",
                esc(frame.base),
                node.as_ref()
                    .map(|n| format!(", node {}", esc(n)))
                    .unwrap_or_default()
            ),
            (None, _) => match d.broadcast {
                Some(b) => format!(
                    "<a href=\"{}/broadcasts\">broadcast #{b}</a>",
                    esc(frame.base)
                ),
                None => "transactional (send)".into(),
            },
        };
        let _ = write!(
            body,
            "<tr data-job=\"{}\"><th scope=\"row\">#{} <span class=\"muted\">{} · {}</span></th><td>{}</td><td>{from}</td>\
             <td class=\"num\">{}</td><td>{}</td><td><pre>{}</pre></td><td>{}</td></tr>",
            d.id,
            d.id,
            esc(&d.kind),
            esc(&d.workspace),
            esc(d.email.as_deref().unwrap_or("–")),
            d.attempt,
            esc(&d.died_at),
            esc(&diagram::shorten(d.error.as_deref().unwrap_or(""), 600)),
            button_form(
                &format!("{}/dead-letters/{}/redrive", frame.base, d.id),
                csrf,
                ("Redrive", &format!("job {}", d.id)),
                "primary",
                None
            ),
        );
    }
    if rows.is_empty() {
        body.push_str("<tr><td colspan=\"7\">No dead letters.</td></tr>");
    }
    body.push_str("</tbody></table>");
    page(frame, "Dead letters", Nav::DeadLetters, &body)
}

pub fn dead_letters_live(total: i64) -> Live {
    let mut l = Live::default();
    l.text("dead:count", count(total));
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn frame() -> Frame<'static> {
        Frame {
            base: "/mail/admin",
            operator: Some("ann"),
            csrf: Some("tok"),
            live: None,
        }
    }

    #[test]
    fn database_text_is_escaped_everywhere() {
        let evil = "<img src=x onerror=alert(1)>";
        let b = BroadcastRow {
            workspace: evil.into(),
            id: 7,
            name: evil.into(),
            status: "sending".into(),
            phase: "test".into(),
            send_at: None,
            enqueued: 10,
            winner: Some(evil.into()),
            winner_reason: Some(evil.into()),
            test_ends_at: None,
            last_error: Some(evil.into()),
            auto_paused: Some(serde_json::json!({"reason": evil, "percent": evil, "sent": evil})),
            ab_metric: Some("opens".into()),
            variations: vec![(evil.into(), evil.into())],
            stats: BTreeMap::from([(evil.to_string(), BTreeMap::from([("sent".to_string(), 4)]))]),
        };
        let html = broadcasts(&frame(), &[b], "");
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("action=\"/mail/admin/broadcasts/7/pause\""));
        assert!(html.contains("name=\"csrf\" value=\"tok\""));
        assert!(
            !html.contains("/resume\""),
            "a sending broadcast can be paused, not resumed"
        );

        let a = ApprovalRow {
            workspace: "acme".into(),
            enrollment: 3,
            automation: 1,
            automation_name: evil.into(),
            node: evil.into(),
            email: "a&b@x.example".into(),
            waiting_since: "now".into(),
            times_out_at: None,
            context: serde_json::json!({"note": evil}),
            event: None,
        };
        let html = approvals(&frame(), &[a], 1, "");
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("a&amp;b@x.example"));
        assert!(
            html.contains("?email=a%2526b%40x.example")
                || html.contains("?email=a%26b%40x.example"),
            "{html}"
        );
        assert!(html.contains("/mail/admin/approvals/3/approve"));

        let d = DeadRow {
            workspace: "acme".into(),
            id: 9,
            kind: "email".into(),
            attempt: 5,
            error: Some(evil.into()),
            automation: None,
            node: None,
            broadcast: None,
            email: Some(evil.into()),
            died_at: "x".into(),
        };
        let html = dead_letters(&frame(), &[d], 1, "");
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("/mail/admin/dead-letters/9/redrive"));

        let html = login(
            &Frame {
                base: "/admin",
                operator: None,
                csrf: None,
                live: None,
            },
            Some(evil),
            "\"><script>",
        );
        assert!(
            !html.contains("<img") && !html.contains("<script>"),
            "{html}"
        );
    }
}
