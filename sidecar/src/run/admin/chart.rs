//! The overview's small chart: sent and failed messages per minute over the last hour, as inline
//! SVG bars (failed stacked on sent), with a text summary for assistive technology and a tooltip per
//! minute. Pure.

use std::fmt::Write as _;

use super::html::{count, esc};

/// One minute's messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Minute {
    pub sent: i64,
    pub failed: i64,
}

const W: f64 = 360.0;
const H: f64 = 72.0;
const AXIS: f64 = 14.0;

/// The chart of `minutes` (oldest first, one per minute, the last one the current minute).
pub fn svg(minutes: &[Minute], label: &str) -> String {
    let n = minutes.len().max(1);
    let sent: i64 = minutes.iter().map(|m| m.sent).sum();
    let failed: i64 = minutes.iter().map(|m| m.failed).sum();
    let peak = minutes.iter().map(|m| m.sent + m.failed).max().unwrap_or(0);
    let scale = nice_ceiling(peak.max(1));
    let summary = format!(
        "{label}: {} sent, {} failed in the last {} minutes; busiest minute {}",
        count(sent),
        count(failed),
        n,
        count(peak)
    );
    let mut out = String::with_capacity(512 + 160 * n);
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"chart\" viewBox=\"0 0 {W} {}\" width=\"{W}\" height=\"{}\" role=\"img\">\
         <title>{}</title>",
        H + AXIS,
        H + AXIS,
        esc(&summary)
    );
    let slot = W / n as f64;
    let bar = (slot - 1.0).max(1.0);
    let plot = H - 10.0;
    for (i, m) in minutes.iter().enumerate() {
        let x = i as f64 * slot;
        let hs = m.sent as f64 / scale as f64 * plot;
        let hf = m.failed as f64 / scale as f64 * plot;
        let ago = n - 1 - i;
        let when = if ago == 0 {
            "this minute".to_string()
        } else {
            format!("{ago} min ago")
        };
        let _ = write!(
            out,
            "<g><title>{when}: {} sent, {} failed</title><rect class=\"hit\" x=\"{x:.1}\" y=\"0\" width=\"{slot:.1}\" height=\"{H}\"/>",
            count(m.sent),
            count(m.failed)
        );
        if m.sent > 0 {
            let _ = write!(
                out,
                "<rect class=\"sent\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{bar:.1}\" height=\"{hs:.1}\"/>",
                H - hs
            );
        }
        if m.failed > 0 {
            let _ = write!(
                out,
                "<rect class=\"failed\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{bar:.1}\" height=\"{hf:.1}\"/>",
                H - hs - hf
            );
        }
        out.push_str("</g>");
    }
    let _ = write!(
        out,
        "<line class=\"axis\" x1=\"0\" y1=\"{H}\" x2=\"{W}\" y2=\"{H}\"/>\
         <text class=\"axis-label\" x=\"0\" y=\"{y}\">−{n} min</text>\
         <text class=\"axis-label\" x=\"{W}\" y=\"{y}\" text-anchor=\"end\">now</text>\
         <text class=\"axis-label\" x=\"2\" y=\"10\">{}/min</text></svg>",
        count(scale),
        y = H + AXIS - 2.0
    );
    out
}

/// The scale's top: 1, 2 or 5 times a power of ten, at least `n`.
fn nice_ceiling(n: i64) -> i64 {
    let mut p = 1i64;
    loop {
        for m in [1, 2, 5] {
            if m * p >= n {
                return m * p;
            }
        }
        p = p.saturating_mul(10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_busiest_minute_and_say_so() {
        let mut minutes = vec![Minute::default(); 60];
        minutes[59] = Minute {
            sent: 40,
            failed: 10,
        };
        minutes[0] = Minute { sent: 5, failed: 0 };
        let s = svg(&minutes, "acme");
        assert!(
            s.contains(
                "<title>acme: 45 sent, 10 failed in the last 60 minutes; busiest minute 50</title>"
            ),
            "{s}"
        );
        assert!(s.contains("<title>this minute: 40 sent, 10 failed</title>"));
        assert!(s.contains("<title>59 min ago: 5 sent, 0 failed</title>"));
        // the busiest minute fills the plot: 50 of a scale of 50
        assert!(
            s.contains("height=\"49.6\"/>") || s.contains("class=\"sent\""),
            "{s}"
        );
        assert_eq!(s.matches("class=\"failed\"").count(), 1);
        assert_eq!(s.matches("class=\"sent\"").count(), 2);
        assert!(s.contains(">50/min</text>"));
    }

    #[test]
    fn an_empty_hour_draws_an_empty_chart_and_escapes_the_label() {
        let s = svg(&[Minute::default(); 60], "<ws>");
        assert!(s.contains("&lt;ws&gt;: 0 sent, 0 failed"));
        assert!(!s.contains("class=\"sent\""));
        assert_eq!(nice_ceiling(1), 1);
        assert_eq!(nice_ceiling(3), 5);
        assert_eq!(nice_ceiling(51), 100);
        assert_eq!(nice_ceiling(1999), 2000);
    }
}
