//! The soak's curve as a PNG (plotters, bitmap backend): four panels over the run's minutes — sizes of
//! the largest tables and of all of herald, dead tuples, claim/track() latency, throughput and backlog.
//! Text is drawn with DejaVu Sans read at run time (Debian's fonts-dejavu-core, installed by
//! tests/setup.sh); without it there is no chart, the JSON is written all the same.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

use super::Point;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const COLOURS: [RGBColor; 7] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(0, 0, 0),
];

/// One line of a panel: its label and (minutes, value) points.
type Line = (String, Vec<(f64, f64)>);

fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = std::fs::read(FONT).map_err(|e| format!("{FONT}: {e}"))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{FONT} is not a font plotters can read"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// `top` tables by final size and `dead_top` by peak dead tuples are drawn one by one; `broadcast_min`
/// marks when the broadcast started.
pub fn draw(
    path: &Path,
    points: &[Point],
    top: &[String],
    dead_top: &[String],
    broadcast_min: Option<f64>,
) -> Result<()> {
    register_font()?;
    let minutes = |p: &Point| p.secs / 60.0;
    let mib = |b: i64| b as f64 / (1024.0 * 1024.0);

    let mut sizes: Vec<Line> = top
        .iter()
        .map(|t| {
            let pts = points
                .iter()
                .map(|p| {
                    (
                        minutes(p),
                        p.tables.get(t).map_or(0.0, |x| mib(x.total_bytes)),
                    )
                })
                .collect();
            (format!("{t} (MiB)"), pts)
        })
        .collect();
    sizes.push((
        "all herald tables (MiB)".into(),
        points
            .iter()
            .map(|p| {
                (
                    minutes(p),
                    mib(p.tables.values().map(|t| t.total_bytes).sum()),
                )
            })
            .collect(),
    ));
    let dead: Vec<Line> = dead_top
        .iter()
        .map(|t| {
            let pts = points
                .iter()
                .map(|p| {
                    (
                        minutes(p),
                        p.tables.get(t).map_or(0.0, |x| x.dead as f64 / 1000.0),
                    )
                })
                .collect();
            (format!("{t} dead tuples (thousands)"), pts)
        })
        .collect();
    let interval = |f: fn(&Point) -> Option<f64>| -> Vec<(f64, f64)> {
        points
            .iter()
            .filter_map(|p| Some((minutes(p), f(p)?)))
            .collect()
    };
    let latency: Vec<Line> = vec![
        (
            "claim(100) p99 ms".into(),
            interval(|p| Some(p.interval.as_ref()?.claim.p99_ms)),
        ),
        (
            "claim(100) p50 ms".into(),
            interval(|p| Some(p.interval.as_ref()?.claim.p50_ms)),
        ),
        (
            "track() p99 ms".into(),
            interval(|p| Some(p.interval.as_ref()?.track.p99_ms)),
        ),
        (
            "track() p50 ms".into(),
            interval(|p| Some(p.interval.as_ref()?.track.p50_ms)),
        ),
        (
            "daemon's claim, mean server ms".into(),
            interval(|p| p.interval.as_ref()?.daemon_claim_mean_ms),
        ),
    ];
    let rates: Vec<Line> = vec![
        (
            "emails/s".into(),
            interval(|p| Some(p.interval.as_ref()?.emails_per_sec)),
        ),
        (
            "webhooks/s".into(),
            interval(|p| Some(p.interval.as_ref()?.webhooks_per_sec)),
        ),
        (
            "events/s".into(),
            interval(|p| Some(p.interval.as_ref()?.events_per_sec)),
        ),
        (
            "pending jobs (hundreds)".into(),
            interval(|p| Some(p.counters.pending? / 100.0)),
        ),
    ];

    let root = BitMapBackend::new(path, (1400, 1600)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((4, 1));
    let end = points.last().map_or(1.0, minutes).max(0.1);
    for (area, (title, lines)) in panels.iter().zip([
        ("Table sizes (pg_total_relation_size)", &sizes),
        ("Dead tuples (pg_stat_user_tables.n_dead_tup)", &dead),
        ("Latency per sampling interval", &latency),
        ("Throughput per sampling interval, and backlog", &rates),
    ]) {
        panel(area, title, lines, end, broadcast_min)
            .with_context(|| format!("drawing {title}"))?;
    }
    root.present()?;
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    lines: &[Line],
    end: f64,
    broadcast_min: Option<f64>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let top = lines
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..end, 0f64..top)?;
    chart
        .configure_mesh()
        .x_desc("minutes")
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, (label, pts)) in lines.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), colour.stroke_width(2)))?
            .label(label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    if let Some(at) = broadcast_min {
        let grey = RGBColor(150, 150, 150);
        chart
            .draw_series(LineSeries::new(
                [(at, 0.0), (at, top)],
                grey.stroke_width(1),
            ))?
            .label("broadcast started")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
