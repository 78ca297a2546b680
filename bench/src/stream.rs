//! The results stream (issue 16): what it costs `complete()` and how fast `GET /stream` fans results
//! out to many subscribers.
//!
//!   a. `stream/complete.rs`: claim(100) + complete(100) of N email jobs with the current extension
//!      (complete() stages an email.sent result per job) and with release 0.2.0 (no stream), in two
//!      databases of the same run, in turns; then `herald.advance_results(10000)` publishing them.
//!   b. `stream/fanout.rs`: `herald run` in-process serving `/stream` to 100 subscribers while the
//!      step engine makes R results; then 100 new subscribers catching up on them.

mod complete;
mod fanout;
mod sse;

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use tracing::info;

use super::{thousands, Goal};
use crate::cpu::machine_cores as cores;
use herald_sidecar::db::Target;

pub use complete::CompleteCost;
pub use fanout::Fanout;

const GOAL_COST: &str = "claim + complete with the results stream >= 0.9x without (0.2.0)";
const GOAL_FANOUT: &str = "/stream: every subscriber got every result once, in order";
const COST_GOAL: f64 = 0.9;

struct Sizes {
    jobs: usize,
    rounds: usize,
    fanout: fanout::Sizes,
}

impl Sizes {
    fn new(small: bool) -> Self {
        if small {
            Self {
                jobs: 2_000,
                rounds: 2,
                fanout: fanout::Sizes {
                    subscribers: 100,
                    results: 300,
                    chunk: 100,
                    timeout: Duration::from_secs(20),
                },
            }
        } else {
            Self {
                jobs: 50_000,
                rounds: 2,
                fanout: fanout::Sizes {
                    subscribers: 100,
                    results: 10_000,
                    chunk: 1_000,
                    timeout: Duration::from_secs(120),
                },
            }
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Stream {
    pub complete: CompleteCost,
    pub fanout: Fanout,
}

impl Stream {
    pub(super) fn goals(&self) -> Vec<Goal> {
        let r = self.complete.ratio;
        let f = &self.fanout;
        let correct = (f.live.correct + f.catch_up.correct) as f64;
        let all = (f.live.subscribers + f.catch_up.subscribers) as f64;
        vec![
            Goal::new(GOAL_COST, r, r >= COST_GOAL),
            Goal::new(
                GOAL_FANOUT,
                correct / all,
                correct == all && !f.live.timed_out && !f.catch_up.timed_out,
            ),
        ]
    }
}

pub async fn run(target: &Target, small: bool) -> Result<Stream> {
    let sizes = Sizes::new(small);
    let complete = complete::run(target, sizes.jobs, sizes.rounds).await?;
    info!("stream: /stream fan-out through herald run");
    let fanout = fanout::run(target, &sizes.fanout).await?;
    Ok(Stream { complete, fanout })
}

pub(super) fn render(o: &mut String, s: &Stream) {
    let goals = s.goals();
    let c = &s.complete;
    let _ = writeln!(
        o,
        "\n10. Results stream\na. What it costs complete(): claim({b}) + complete({b}) of {} email jobs per run (one herald.send \
         statement), one connection, herald {} (stages an email.sent result per job) and {} (no stream) in two \
         databases, runs in turns; tables never analysed (as right after the inserts; autovacuum off on herald's tables)",
        thousands(c.jobs_per_run as f64),
        c.with_stream.version,
        c.without_stream.version,
        b = c.batch,
    );
    let _ = writeln!(
        o,
        "  {:<7} | {:>5} | {:>8} | {:>7} | {:>9} | {:>26} | {:>8} | {:>13}",
        "herald",
        "round",
        "jobs",
        "seconds",
        "jobs/s",
        "complete() p50/p99/max ms",
        "analyses",
        "machine cores"
    );
    for r in &c.runs {
        let _ = writeln!(
            o,
            "  {:<7} | {:>5} | {:>8} | {:>7.2} | {:>9} | {:>8.2} {:>8.2} {:>8.1} | {:>8} | {:>13}",
            r.version,
            r.round,
            thousands(r.jobs as f64),
            r.secs,
            thousands(r.jobs_per_sec),
            r.complete_ms.p50_ms,
            r.complete_ms.p99_ms,
            r.complete_ms.max_ms,
            r.analyses_after,
            r.machine_cores
                .map_or("n/a".to_string(), |c| format!("{c:.2} of {}", cores()))
        );
    }
    for side in [&c.with_stream, &c.without_stream] {
        let _ = writeln!(
            o,
            "  herald {:<6} {} runs: {:>9} jobs/s   complete() p50 {:.2} ms p99 {:.2} ms",
            side.version,
            side.runs,
            thousands(side.jobs_per_sec),
            side.complete_ms.p50_ms,
            side.complete_ms.p99_ms
        );
    }
    let _ = writeln!(
        o,
        "  (machine cores: the whole machine's busy CPU during the drain: about 1 when nothing else runs. The ratio \
         compares the two releases as installed, table definitions included)"
    );
    let p = &c.publish;
    let _ = writeln!(
        o,
        "  publishing (maintenance, off the complete path): herald.advance_results({}) x {} calls: {} results in {:.2} s = {} results/s \
         (a call p50 {:.0} ms, max {:.0} ms)",
        thousands(f64::from(complete::PUBLISH_BATCH)),
        p.calls,
        thousands(p.results as f64),
        p.secs,
        thousands(p.results_per_sec),
        p.call_ms.p50_ms,
        p.call_ms.max_ms
    );
    for why in &c.problems {
        let _ = writeln!(o, "  ERROR: {why}");
    }
    if let Some(g) = goals.first() {
        let _ = writeln!(
            o,
            "  goal: {:<66} {:>6.2}x  {}",
            g.goal,
            g.value,
            g.verdict()
        );
    }

    let f = &s.fanout;
    let _ = writeln!(
        o,
        "\nb. GET /stream fan-out: herald run in-process (HTTP side on 127.0.0.1), {} subscribers over raw HTTP/1.1 from \
         {} loopback addresses, {} enrollment.completed results (a live exit-only automation, track_many in chunks of {}); \
         {:.0} B of data per event",
        f.subscribers,
        f.addresses,
        thousands(f.results as f64),
        thousands(f.chunk as f64),
        f.event_data_bytes
    );
    let _ = writeln!(
        o,
        "  {:<8} | {:>10} | {:>7} | {:>16} | {:>28} | {:>11} | {:>12} | {:>8}",
        "phase",
        "connect ms",
        "seconds",
        "results/s, all",
        "per subscriber min/p50/max",
        "first event",
        "last track->",
        "correct"
    );
    let _ = writeln!(
        o,
        "  {:<8} | {:>10} | {:>7} | {:>16} | {:>28} | {:>11} | {:>12} | {:>8}",
        "", "", "", "subscribers", "results/s", "ms", "last event ms", ""
    );
    for ph in [&f.live, &f.catch_up] {
        let _ = writeln!(
            o,
            "  {:<8} | {:>10.0} | {:>7.2} | {:>16} | {:>8} {:>9} {:>9} | {:>11.0} | {:>12} | {:>4}/{:<3}{}",
            ph.phase,
            ph.connect_ms,
            ph.secs,
            thousands(ph.delivered_per_sec),
            thousands(ph.per_subscriber_min),
            thousands(ph.per_subscriber_p50),
            thousands(ph.per_subscriber_max),
            ph.first_event_ms,
            ph.last_track_to_last_event_ms
                .map_or("-".to_string(), |ms| format!("{ms:.0}")),
            ph.correct,
            ph.subscribers,
            if ph.timed_out { "  TIMED OUT" } else { "" }
        );
    }
    if let Some(secs) = f.live.produce_secs {
        let _ = writeln!(
            o,
            "  live: the clock runs from the first track_many (the {} calls took {:.2} s: {} events/s) to the last subscriber's \
             last event; catch-up: from connecting, the results already published",
            f.results.div_ceil(f.chunk),
            secs,
            thousands(f.results as f64 / secs)
        );
    }
    if let Some(t) = f.live.server {
        let _ = writeln!(
            o,
            "  live, by the server's clock from the first track_many: last result made (tick) at {:.0} ms, published from {:.0} \
             to {:.0} ms; first event at a subscriber {:.0} ms ({:.0} ms after the first was published)",
            t.last_made_ms,
            t.first_published_ms,
            t.last_published_ms,
            f.live.first_event_ms,
            f.live.first_event_ms - t.first_published_ms
        );
        if f.live.first_event_ms - t.first_published_ms > 500.0 {
            let _ = writeln!(
                o,
                "  (the streams woke on their 1 s poll, not at publishing: another publish round took the tick's results first, so the \
                 daemon's own advance_results after the tick finds nothing and does not wake them)"
            );
        }
    }
    let cpu = |p: &fanout::Phase| {
        p.cpu.map_or("n/a".to_string(), |(own, all)| {
            format!("{own:.2} / {all:.2}")
        })
    };
    let _ = writeln!(
        o,
        "  CPU cores in use (this process: herald run + subscribers / the machine, of {}): live {}, catch-up {}",
        cores(),
        cpu(&f.live),
        cpu(&f.catch_up)
    );
    for ph in [&f.live, &f.catch_up] {
        for why in &ph.problems {
            let _ = writeln!(o, "  ERROR ({}): {why}", ph.phase);
        }
    }
    if let Some(g) = goals.get(1) {
        let _ = writeln!(
            o,
            "  check: {:<66} {}",
            g.goal,
            if g.pass { "PASS" } else { "MISS" }
        );
    }
}
