//! The run over time and the latency distribution: a per-second timeline, and an SVG chart of
//! it (plotters) a person can read at a glance.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

/// One measured second: how many requests were due in it (answered, failed or never sent), and
/// their latencies (µs; a failed or unsent request's a lower bound).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Second {
    pub(crate) requests: u64,
    /// Of `requests`, those never sent: the second's latencies are lower bounds.
    pub(crate) unsent: u64,
    pub(crate) p50: u64,
    pub(crate) p90: u64,
    pub(crate) p99: u64,
    pub(crate) max: u64,
}

/// A histogram for one second of the timeline (two significant digits: small, and enough to
/// draw).
pub(crate) fn second_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, crate::MOST_LATENCY_US, 2).expect("histogram bounds")
}

/// The seconds of a run, from their histograms (an empty second counts zero requests), and
/// the unsent requests of each (by the same second; missing ones count none).
pub(crate) fn timeline(seconds: &[Histogram<u64>], unsent: &[u64]) -> Vec<Second> {
    seconds
        .iter()
        .enumerate()
        .map(|(second, h)| Second {
            requests: h.len(),
            unsent: unsent.get(second).copied().unwrap_or(0),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
        })
        .collect()
}

/// The latency at each percentile from 0 to 99.999 (or as far as the samples go), as
/// (nines, milliseconds): nines is `log10(1 / (1 - q))`, so 1 is p90, 2 p99, 3 p99.9.
fn distribution(latency: &Histogram<u64>) -> Vec<(f64, f64)> {
    let most = if latency.is_empty() {
        0.0
    } else {
        (latency.len() as f64).log10().min(5.0)
    };
    let steps = 200;
    let mut points: Vec<(f64, f64)> = (0..=steps)
        .map(|i| {
            let nines = most * f64::from(i) / f64::from(steps);
            let q = 1.0 - 10f64.powf(-nines);
            (nines, latency.value_at_quantile(q) as f64 / 1000.0)
        })
        .collect();
    // The slowest request ends the line.
    if let Some(last) = points.last_mut() {
        last.1 = last.1.max(latency.max() as f64 / 1000.0);
    }
    points
}

/// A line of the latency chart: its name, its colour, and what of a second it shows.
type Line = (&'static str, RGBColor, fn(&Second) -> u64);

/// The shade of the seconds that had unsent requests.
const UNSENT_SHADE: RGBColor = RGBColor(255, 150, 0);

/// The legend of the seconds shaded for their unsent requests.
const UNSENT_LEGEND: &str = "seconds with unsent requests: latencies are lower bounds";

/// Shades, on `chart` (seconds across, up to `top` high), each second of `timeline` that had
/// unsent requests, with a legend entry when there are any: their latencies count only until
/// the run stopped, so the lines fall there though the backlog did not.
fn shade_unsent<DB: DrawingBackend>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    timeline: &[Second],
    top: f64,
) -> Result<(), String> {
    if timeline.iter().all(|s| s.unsent == 0) {
        return Ok(());
    }
    let shade = UNSENT_SHADE.mix(0.25).filled();
    chart
        .draw_series(
            timeline
                .iter()
                .enumerate()
                .filter(|(_, s)| s.unsent > 0)
                .map(|(i, _)| Rectangle::new([(i as f64, 0.0), (i as f64 + 1.0, top)], shade)),
        )
        .map_err(failed)?
        .label(UNSENT_LEGEND)
        .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 20, y + 6)], shade));
    Ok(())
}

fn failed(e: impl std::fmt::Display) -> String {
    format!("cannot draw the plot: {e}")
}

/// Draws `title`'s run into the SVG file `path`: requests per second over time, latency over
/// time (p50, p90, p99, max per second), and latency by percentile over the whole run, of
/// every request (`latency`: failed and unsent ones as lower bounds) and of the answered ones
/// (`answered`).
pub(crate) fn svg(
    path: &Path,
    title: &str,
    timeline: &[Second],
    latency: &Histogram<u64>,
    answered: &Histogram<u64>,
) -> Result<(), String> {
    let root = SVGBackend::new(path, (1000, 1150)).into_drawing_area();
    root.fill(&WHITE).map_err(failed)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(failed)?;
    let (top, rest) = root.split_vertically(340);
    let (middle, bottom) = rest.split_vertically(380);
    let seconds = timeline.len().max(1) as f64;
    let ms = |us: u64| us as f64 / 1000.0;

    let most = timeline
        .iter()
        .map(|s| s.requests)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let mut chart = ChartBuilder::on(&top)
        .caption("requests per second", ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..seconds, 0f64..most * 1.1)
        .map_err(failed)?;
    chart
        .configure_mesh()
        .x_desc("seconds measured")
        .y_desc("requests")
        .y_label_formatter(&|n| format!("{n:.0}"))
        .draw()
        .map_err(failed)?;
    shade_unsent(&mut chart, timeline, most * 1.1)?;
    chart
        .draw_series(LineSeries::new(
            timeline
                .iter()
                .enumerate()
                .map(|(i, s)| (i as f64 + 0.5, s.requests as f64)),
            BLUE.stroke_width(2),
        ))
        .map_err(failed)?
        .label("requests due (sent or not)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(failed)?;

    let highest = timeline
        .iter()
        .map(|s| ms(s.max))
        .fold(0.0, f64::max)
        .max(0.001);
    let mut chart = ChartBuilder::on(&middle)
        .caption(
            "latency over time (from when each request was due; failed and unsent ones as lower bounds)",
            ("sans-serif", 17),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..seconds, 0f64..highest * 1.1)
        .map_err(failed)?;
    chart
        .configure_mesh()
        .x_desc("seconds measured")
        .y_desc("milliseconds")
        .draw()
        .map_err(failed)?;
    shade_unsent(&mut chart, timeline, highest * 1.1)?;
    let lines: [Line; 4] = [
        ("p50", GREEN, |s| s.p50),
        ("p90", BLUE, |s| s.p90),
        ("p99", MAGENTA, |s| s.p99),
        ("max", RED, |s| s.max),
    ];
    for (name, color, value) in lines {
        chart
            .draw_series(LineSeries::new(
                timeline
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.requests > 0)
                    .map(|(i, s)| (i as f64 + 0.5, ms(value(s)))),
                color.stroke_width(2),
            ))
            .map_err(failed)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(failed)?;

    let points = distribution(latency);
    let answered_points = distribution(answered);
    let nines = points.last().map_or(1.0, |(n, _)| *n).max(1.0);
    let highest = points
        .iter()
        .chain(&answered_points)
        .map(|(_, v)| *v)
        .fold(0.0, f64::max)
        .max(0.001);
    let unsent: u64 = timeline.iter().map(|s| s.unsent).sum();
    let caption = if unsent > 0 {
        format!("latency by percentile (whole run; {unsent} unsent: lower bounds)")
    } else {
        "latency by percentile (whole run)".to_owned()
    };
    let mut chart = ChartBuilder::on(&bottom)
        .caption(caption, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..nines, 0f64..highest * 1.1)
        .map_err(failed)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("milliseconds")
        .x_labels(nines.ceil() as usize + 1)
        .x_label_formatter(&|n| percentile_label(*n))
        .draw()
        .map_err(failed)?;
    let curves = [
        (
            "every request (failed and unsent: lower bounds)",
            BLACK,
            points,
        ),
        ("answered requests only", BLUE, answered_points),
    ];
    for (name, color, points) in curves {
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(failed)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(failed)?;
    root.present().map_err(failed)?;
    Ok(())
}

/// `0` -> `p0`, `1` -> `p90`, `2` -> `p99`, `3` -> `p99.9`, ...
fn percentile_label(nines: f64) -> String {
    let q = 100.0 * (1.0 - 10f64.powf(-nines));
    let text = format!("{q:.5}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("p{text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_labels_count_nines() {
        assert_eq!(percentile_label(0.0), "p0");
        assert_eq!(percentile_label(1.0), "p90");
        assert_eq!(percentile_label(2.0), "p99");
        assert_eq!(percentile_label(3.0), "p99.9");
    }

    #[test]
    fn the_timeline_and_the_plot_show_what_was_recorded() {
        let mut seconds = vec![second_histogram(), second_histogram(), second_histogram()];
        for v in 1..=1000u64 {
            seconds[0].record(v).unwrap();
            seconds[2].record(v * 10).unwrap();
        }
        // The last second's requests: 5 of them never sent.
        let timeline = timeline(&seconds, &[0, 0, 5]);
        assert_eq!(timeline[0].requests, 1000);
        assert_eq!(timeline[1].requests, 0);
        assert_eq!(
            timeline.iter().map(|s| s.unsent).collect::<Vec<_>>(),
            [0, 0, 5]
        );
        assert!((495..=505).contains(&timeline[0].p50), "{:?}", timeline[0]);
        assert!(
            (9_900..=10_100).contains(&timeline[2].max),
            "{:?}",
            timeline[2]
        );
        let mut whole = second_histogram();
        for h in &seconds {
            whole.add(h).unwrap();
        }
        let points = distribution(&whole);
        assert_eq!(points.first().unwrap().0, 0.0);
        assert!(
            points.windows(2).all(|w| w[0].1 <= w[1].1),
            "latency rises with the percentile"
        );
        let path =
            std::env::temp_dir().join(format!("fhir-loadgen-plot-{}.svg", std::process::id()));
        let mut answered = second_histogram();
        answered.add(&seconds[0]).unwrap();
        svg(&path, "a test run", &timeline, &whole, &answered).unwrap();
        let drawn = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(
            drawn.starts_with("<svg"),
            "{}",
            &drawn[..100.min(drawn.len())]
        );
        for text in [
            "a test run",
            "requests per second",
            "p99",
            "latency by percentile",
            "p99.9",
            "failed and unsent",
            "answered requests only",
            // The seconds with unsent requests are shaded, in both charts over time, and said
            // to hold lower bounds.
            UNSENT_LEGEND,
            "5 unsent: lower bounds",
        ] {
            assert!(drawn.contains(text), "{text} missing");
        }
        assert!(drawn.matches("<polyline").count() >= 7, "seven lines");
        assert_eq!(
            drawn.matches(UNSENT_LEGEND).count(),
            2,
            "a legend in each chart over time"
        );
        // Without unsent requests, nothing is shaded.
        let whole_run = timeline
            .iter()
            .map(|s| Second { unsent: 0, ..*s })
            .collect::<Vec<_>>();
        svg(&path, "a test run", &whole_run, &whole, &answered).unwrap();
        let drawn = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(!drawn.contains(UNSENT_LEGEND));
        assert!(!drawn.contains("whole run;"));
    }
}
