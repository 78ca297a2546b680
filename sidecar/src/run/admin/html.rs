//! HTML text: escaping (everything that comes from the database or the request goes through
//! [`esc`]) and the page frame every admin page shares (head, navigation, the live-update script).

use std::fmt::Write as _;

/// Escapes text for HTML element content and double- or single-quoted attribute values (also inside
/// SVG): `& < > " '`.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query-string value (an email address in a search link).
pub fn query_value(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// A count with thin separators: 1234567 → "1 234 567".
pub fn count(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    if n < 0 {
        out.push('-');
    }
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{202f}');
        }
        out.push(d);
    }
    out
}

/// A share as a percentage with one decimal ("–" when there is nothing to share).
pub fn percent(part: i64, whole: i64) -> String {
    if whole <= 0 {
        return "–".into();
    }
    format!("{:.1}%", part as f64 * 100.0 / whole as f64)
}

/// A duration in seconds, short: "42 s", "7 min", "3.5 h", "2.0 d".
pub fn age(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 90.0 {
        format!("{s:.0} s")
    } else if s < 90.0 * 60.0 {
        format!("{:.0} min", s / 60.0)
    } else if s < 36.0 * 3600.0 {
        format!("{:.1} h", s / 3600.0)
    } else {
        format!("{:.1} d", s / 86400.0)
    }
}

/// The pages of the navigation, in order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Nav {
    Overview,
    Automations,
    Broadcasts,
    Approvals,
    DeadLetters,
    None,
}

const NAV: [(Nav, &str, &str); 5] = [
    (Nav::Overview, "", "Overview"),
    (Nav::Automations, "/automations", "Automations"),
    (Nav::Broadcasts, "/broadcasts", "Broadcasts"),
    (Nav::Approvals, "/approvals", "Approvals"),
    (Nav::DeadLetters, "/dead-letters", "Dead letters"),
];

/// What every page's frame needs: where the page lives (links are `base` + path, `base` being the
/// public URL's path + `/admin`), who is signed in and their form token.
pub struct Frame<'a> {
    pub base: &'a str,
    pub operator: Option<&'a str>,
    pub csrf: Option<&'a str>,
    /// The live endpoint's query for this page (`view=…`); None: nothing updates in place.
    pub live: Option<String>,
}

/// A whole page: `body` is HTML already escaped by the caller.
pub fn page(frame: &Frame, title: &str, active: Nav, body: &str) -> String {
    let base = esc(frame.base);
    let mut out = String::with_capacity(body.len() + 2048);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · herald</title>\
         <link rel=\"stylesheet\" href=\"{base}/assets/admin.css\">\
         <script src=\"{base}/assets/admin.js\" defer></script></head>",
        esc(title)
    );
    match &frame.live {
        Some(query) => {
            let _ = write!(out, "<body data-live-url=\"{base}/live?{}\">", esc(query));
        }
        None => out.push_str("<body>"),
    }
    out.push_str("<a class=\"skip\" href=\"#main\">Skip to content</a><header><nav aria-label=\"Admin pages\"><span class=\"brand\">herald</span><ul>");
    if frame.operator.is_some() {
        for (nav, path, label) in NAV {
            let current = if nav == active {
                " aria-current=\"page\""
            } else {
                ""
            };
            let _ = write!(
                out,
                "<li><a href=\"{base}{path}\"{current}>{label}</a></li>"
            );
        }
    }
    out.push_str("</ul>");
    if let (Some(name), Some(csrf)) = (frame.operator, frame.csrf) {
        let _ = write!(
            out,
            "<form method=\"post\" action=\"{base}/logout\" class=\"logout\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <span>Signed in as <strong>{}</strong></span> <button type=\"submit\">Sign out</button></form>\
             <form method=\"post\" action=\"{base}/logout\" class=\"logout\" data-confirm=\"Sign out every \
             operator, on every device (you too)?\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <input type=\"hidden\" name=\"everyone\" value=\"1\"><button type=\"submit\">Sign out everyone</button></form>",
            esc(csrf),
            esc(name),
            esc(csrf),
        );
    }
    let _ = writeln!(
        out,
        "</nav></header><main id=\"main\"><h1>{}</h1>{body}</main>\
         <footer><span id=\"live-status\" role=\"status\" aria-live=\"polite\"></span></footer></body></html>",
        esc(title)
    );
    out
}

/// A POST form that is one button: the CSRF token goes with it. `confirm` asks first (admin.js).
/// `what` names what the button acts on for screen readers ("Approve" → "Approve ann@x.example").
pub fn button_form(
    action: &str,
    csrf: &str,
    (label, what): (&str, &str),
    class: &str,
    confirm: Option<&str>,
) -> String {
    let confirm = confirm
        .map(|c| format!(" data-confirm=\"{}\"", esc(c)))
        .unwrap_or_default();
    format!(
        "<form method=\"post\" action=\"{}\" class=\"inline\"{confirm}>\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <button type=\"submit\" class=\"{}\" aria-label=\"{} {}\">{}</button></form>",
        esc(action),
        esc(csrf),
        esc(class),
        esc(label),
        esc(what),
        esc(label)
    )
}

/// A notice at the top of a page (after an action, or an error), announced to screen readers.
pub fn notice(kind: &str, text: &str) -> String {
    let role = if kind == "error" { "alert" } else { "status" };
    format!(
        "<p class=\"notice notice-{}\" role=\"{role}\">{}</p>",
        esc(kind),
        esc(text)
    )
}

/// A number that the live endpoint updates in place: `<span data-live="key">text</span>`.
pub fn live(key: &str, text: &str) -> String {
    format!("<span data-live=\"{}\">{}</span>", esc(key), esc(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_everything_that_could_open_markup() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(esc("plain text, été"), "plain text, été");
        // an attribute cannot be left, whatever the quotes
        let attr = format!(
            "<a title=\"{}\" data-x='{}'>",
            esc("\" onmouseover=\"x"),
            esc("' y='")
        );
        assert!(!attr.contains("\" onmouseover"), "{attr}");
        assert!(!attr.contains("' y='"), "{attr}");
    }

    #[test]
    fn page_frame_escapes_title_operator_and_base() {
        let frame = Frame {
            base: "/mail/admin",
            operator: Some("<b>eve</b>"),
            csrf: Some("tok\"en"),
            live: Some("view=overview".into()),
        };
        let html = page(&frame, "A <title>", Nav::Broadcasts, "<p>body</p>");
        assert!(html.contains("<title>A &lt;title&gt; · herald</title>"));
        assert!(html.contains("Signed in as <strong>&lt;b&gt;eve&lt;/b&gt;</strong>"));
        assert!(html.contains("value=\"tok&quot;en\""));
        assert!(html.contains("href=\"/mail/admin/broadcasts\" aria-current=\"page\""));
        assert!(html.contains("data-live-url=\"/mail/admin/live?view=overview\""));
        assert!(html.contains("<p>body</p>"));
        // signed out: no navigation, no sign-out form
        let frame = Frame {
            base: "/admin",
            operator: None,
            csrf: None,
            live: None,
        };
        let html = page(&frame, "Sign in", Nav::None, "");
        assert!(!html.contains("/admin/broadcasts") && !html.contains("Sign out"));
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(count(0), "0");
        assert_eq!(count(1234567), "1\u{202f}234\u{202f}567");
        assert_eq!(count(-1000), "-1\u{202f}000");
        assert_eq!(percent(1, 3), "33.3%");
        assert_eq!(percent(1, 0), "–");
        assert_eq!(age(42.0), "42 s");
        assert_eq!(age(600.0), "10 min");
        assert_eq!(age(7200.0), "2.0 h");
        assert_eq!(query_value("a+b@x.example"), "a%2Bb%40x.example");
        assert!(
            button_form("/admin/x", "t", ("Go", "there"), "primary", Some("Sure?"))
                .contains("data-confirm=\"Sure?\"")
        );
    }
}
