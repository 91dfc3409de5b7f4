//! A self-contained SVG of a simulation's timeline: the request rate with the workers up, and
//! the TTFT p99 per window against its target (no scripts, no external assets).

use std::fmt::Write;

use crate::sim::SimReport;

const W: f64 = 900.0;
const PANEL: f64 = 220.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 60.0;

struct Series<'a> {
    name: &'a str,
    color: &'a str,
    /// Right axis when true.
    right: bool,
    points: Vec<(f64, f64)>,
}

fn panel(
    svg: &mut String,
    top: f64,
    title: &str,
    t_max: f64,
    series: &[Series<'_>],
    hline: Option<(f64, &str)>,
) {
    let (x0, x1) = (LEFT, W - RIGHT);
    let (y0, y1) = (top + PANEL - 30.0, top + 30.0);
    let max = |right: bool| {
        series
            .iter()
            .filter(|s| s.right == right)
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .chain(hline.filter(|_| !right).map(|h| h.0))
            .fold(0.0f64, f64::max)
            .max(1e-9)
            * 1.1
    };
    let (lmax, rmax) = (max(false), max(true));
    let x = |t: f64| x0 + (x1 - x0) * t / t_max.max(1e-9);
    let y = |v: f64, right: bool| y0 - (y0 - y1) * v / if right { rmax } else { lmax };
    let _ = write!(
        svg,
        r##"<text x="{LEFT}" y="{}" font-size="14" font-weight="bold">{title}</text><line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#888"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#888"/><line x1="{x1}" y1="{y0}" x2="{x1}" y2="{y1}" stroke="#888"/>"##,
        top + 18.0
    );
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{:.0}s</text><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"##,
            x(t_max * f),
            y0 + 14.0,
            t_max * f,
            x0 - 4.0,
            y(lmax / 1.1 * f, false) + 3.0,
            Num(lmax / 1.1 * f)
        );
        if series.iter().any(|s| s.right) {
            let _ = write!(
                svg,
                r##"<text x="{:.1}" y="{:.1}" font-size="10">{}</text>"##,
                x1 + 4.0,
                y(rmax / 1.1 * f, true) + 3.0,
                Num(rmax / 1.1 * f)
            );
        }
    }
    if let Some((v, label)) = hline {
        let _ = write!(
            svg,
            r##"<line x1="{x0}" y1="{:.1}" x2="{x1}" y2="{:.1}" stroke="#c00" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" font-size="10" fill="#c00" text-anchor="end">{label}</text>"##,
            y(v, false),
            y(v, false),
            x1 - 4.0,
            y(v, false) - 4.0
        );
    }
    for (k, s) in series.iter().enumerate() {
        let path: Vec<String> = s
            .points
            .iter()
            .map(|&(t, v)| format!("{:.1},{:.1}", x(t), y(v, s.right)))
            .collect();
        let _ = write!(
            svg,
            r##"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/><text x="{:.1}" y="{:.1}" font-size="11" fill="{}">{}</text>"##,
            s.color,
            path.join(" "),
            LEFT + 200.0 + 170.0 * k as f64,
            top + 18.0,
            s.color,
            s.name
        );
    }
}

/// An axis label: whole numbers from 10 up, one decimal below.
struct Num(f64);

impl std::fmt::Display for Num {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.abs() >= 10.0 {
            write!(f, "{:.0}", self.0)
        } else {
            write!(f, "{:.1}", self.0)
        }
    }
}

/// The report's timeline as an SVG document.
pub fn svg(r: &SimReport, title: &str) -> String {
    let t0 = r.timeline.first().map(|p| p.t_s).unwrap_or(0.0);
    let t_max = r.timeline.last().map(|p| p.t_s - t0).unwrap_or(1.0);
    let pts = |f: &dyn Fn(&crate::sim::Point) -> f64| -> Vec<(f64, f64)> {
        r.timeline.iter().map(|p| (p.t_s - t0, f(p))).collect()
    };
    let mut svg = String::new();
    let h = 3.0 * PANEL + 40.0;
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/><text x="{LEFT}" y="22" font-size="15">{}</text>"##,
        title.replace('<', "&lt;").replace('&', "&amp;")
    );
    let mut load = vec![
        Series {
            name: "requests/s",
            color: "#1f77b4",
            right: false,
            points: pts(&|p| p.rate),
        },
        Series {
            name: "workers up (right axis)",
            color: "#2ca02c",
            right: true,
            points: pts(&|p| (p.serving + p.starting + p.draining) as f64),
        },
    ];
    if r.timeline.iter().any(|p| p.prefill_serving > 0) {
        load.push(Series {
            name: "of them prefill, serving (right axis)",
            color: "#8c564b",
            right: true,
            points: pts(&|p| p.prefill_serving as f64),
        });
    }
    panel(&mut svg, 30.0, "Load and workers", t_max, &load, None);
    panel(
        &mut svg,
        30.0 + PANEL,
        "Latency per window",
        t_max,
        &[
            Series {
                name: "TTFT p99 ms",
                color: "#d62728",
                right: false,
                points: pts(&|p| p.ttft_p99_ms),
            },
            Series {
                name: "TTFT p50 ms",
                color: "#ff7f0e",
                right: false,
                points: pts(&|p| p.ttft_p50_ms),
            },
        ],
        Some((r.ttft_target_ms, "TTFT target")),
    );
    panel(
        &mut svg,
        30.0 + 2.0 * PANEL,
        "Requests within both targets, % per window",
        t_max,
        &[Series {
            name: "SLA attainment %",
            color: "#9467bd",
            right: false,
            points: pts(&|p| p.attainment * 100.0),
        }],
        Some((95.0, "95%")),
    );
    svg.push_str("</svg>\n");
    svg
}
