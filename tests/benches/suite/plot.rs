//! The report's charts, as PNG (plotters' bitmap backend; text in DejaVu Sans, which
//! `cargo xtask setup` installs): cost against N for each enforcer and pair, update
//! latency distributions, per-packet cost against N.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use crate::report::{Report, METRICS};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const SANS: &str = "sans-serif";

fn register_font() -> anyhow::Result<()> {
    let bytes = std::fs::read(FONT).with_context(|| {
        format!("reading {FONT} (Debian's fonts-dejavu-core: cargo xtask setup)")
    })?;
    // plotters keeps the font for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(SANS, FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{FONT} is not a font plotters can read"))
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn bounds(values: impl Iterator<Item = f64>, with: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (with, with);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    let pad = ((hi - lo) * 0.1).max(0.05 * hi.abs().max(1e-9));
    (lo - pad, hi + pad)
}

const COLORS: [RGBColor; 6] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(23, 190, 207),
];

fn enforcer_color(e: &str) -> RGBColor {
    match e {
        "iptables" => COLORS[0],
        "nftables" => COLORS[2],
        _ => COLORS[1],
    }
}

/// Draws what the report has; the names of the files written.
pub fn draw(report: &Report, dir: &Path) -> anyhow::Result<Vec<String>> {
    register_font()?;
    let mut out = Vec::new();
    if let Some(d) = &report.datapath {
        for pair in &report.plan.pairs {
            let name = format!("datapath-{}.png", pair.name());
            datapath(d, *pair, &dir.join(&name)).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            out.push(name);
        }
    }
    if let Some(u) = &report.update {
        update(u, &dir.join("update.png")).map_err(|e| anyhow::anyhow!("update.png: {e}"))?;
        out.push("update.png".into());
    }
    if let Some(p) = &report.packet {
        packet(p, &dir.join("packet.png")).map_err(|e| anyhow::anyhow!("packet.png: {e}"))?;
        out.push("packet.png".into());
    }
    Ok(out)
}

fn datapath(
    d: &crate::report::Datapath,
    pair: crate::plan::Pair,
    path: &Path,
) -> Result<(), Error> {
    let root = BitMapBackend::new(path, (1600, 820)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "Cost against N, {}: each enforcer as a ratio to none in the same rounds (bars: 95 % intervals)",
            pair.name()
        ),
        (SANS, 24),
    )?;
    let ns: Vec<f64> = d
        .variants
        .iter()
        .filter(|v| !v.flood)
        .map(|v| v.rules as f64)
        .collect();
    let (xmin, xmax) = (
        ns.iter().copied().fold(f64::INFINITY, f64::min).min(10.0) * 0.8,
        ns.iter().copied().fold(0.0, f64::max).max(100.0) * 1.25,
    );
    for (panel, m) in root.split_evenly((2, 4)).iter().zip(METRICS.iter()) {
        let compared = |v: &crate::report::Variant| v.pairs.get(&pair)?.get(m.key).cloned();
        let ratio = |v: &crate::report::Variant| compared(v).map(|c| c.ratio);
        let (ylo, yhi) = bounds(
            d.variants
                .iter()
                .filter(|v| !v.flood)
                .filter_map(compared)
                .flat_map(|c| [c.ratio, c.ratio_ci[0], c.ratio_ci[1]]),
            1.0,
        );
        let mut chart = ChartBuilder::on(panel)
            .caption(m.label, (SANS, 17))
            .margin(10)
            .x_label_area_size(32)
            .y_label_area_size(48)
            .build_cartesian_2d((xmin..xmax).log_scale(), ylo..yhi)?;
        chart
            .configure_mesh()
            .x_desc("N rules")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc(if m.latency {
                "× none (latency)"
            } else {
                "retained (× none)"
            })
            .label_style((SANS, 12))
            .light_line_style(WHITE)
            .draw()?;
        chart.draw_series(LineSeries::new([(xmin, 1.0), (xmax, 1.0)], BLACK.mix(0.35)))?;
        for e in ["iptables", "nftables", "netpol"] {
            let pts: Vec<(f64, f64)> = d
                .variants
                .iter()
                .filter(|v| v.enforcer == e && !v.flood)
                .filter_map(|v| Some((v.rules as f64, ratio(v)?)))
                .filter(|p| p.1.is_finite())
                .collect();
            let color = enforcer_color(e);
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(e)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2))
                });
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
            // Each point's 95 % interval, as a bar.
            for v in d.variants.iter().filter(|v| v.enforcer == e && !v.flood) {
                let Some(c) = compared(v).filter(|c| c.ratio_ci.iter().all(|x| x.is_finite()))
                else {
                    continue;
                };
                let x = v.rules as f64;
                chart.draw_series(LineSeries::new(
                    [(x, c.ratio_ci[0]), (x, c.ratio_ci[1])],
                    color.mix(0.6).stroke_width(2),
                ))?;
            }
        }
        chart
            .configure_series_labels()
            .label_font((SANS, 12))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .position(SeriesLabelPosition::LowerLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn update(u: &crate::report::Update, path: &Path) -> Result<(), Error> {
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        "Policy update latency: distribution of samples (policy written or removed → first connection that shows it)",
        (SANS, 20),
    )?;
    let panels = root.split_evenly((1, 2));
    for (panel, (title, revoke)) in panels.iter().zip([("enforce", false), ("revoke", true)]) {
        let dist = |p: &crate::report::UpdatePoint| {
            if revoke {
                p.revoke.clone()
            } else {
                p.enforce.clone()
            }
        };
        let xmax = u
            .points
            .iter()
            .flat_map(|p| dist(p).samples_ms)
            .filter(|v| v.is_finite())
            .fold(10.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, (SANS, 18))
            .margin(10)
            .x_label_area_size(34)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..xmax, 0.0..1.0)?;
        chart
            .configure_mesh()
            .x_desc("ms")
            .y_desc("fraction of samples ≤ x")
            .label_style((SANS, 12))
            .draw()?;
        for (i, p) in u.points.iter().enumerate() {
            let mut s = dist(p).samples_ms;
            s.retain(|v| v.is_finite());
            s.sort_by(f64::total_cmp);
            let n = s.len().max(1) as f64;
            let mut pts = Vec::new();
            for (k, v) in s.iter().enumerate() {
                pts.push((*v, k as f64 / n));
                pts.push((*v, (k + 1) as f64 / n));
            }
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(format!("{}, {} pods", p.enforcer, p.pods))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .label_font((SANS, 12))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .position(SeriesLabelPosition::LowerRight)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn packet(p: &crate::report::Packet, path: &Path) -> Result<(), Error> {
    let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let ns: Vec<f64> = p.points.iter().map(|x| x.rules as f64).collect();
    let (xmin, xmax) = (
        ns.iter().copied().fold(f64::INFINITY, f64::min).min(10.0) * 0.8,
        ns.iter().copied().fold(0.0, f64::max).max(100.0) * 1.25,
    );
    let ymax = p
        .points
        .iter()
        .map(|x| x.ns.max)
        .filter(|v| v.is_finite())
        .fold(100.0, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Classifier cost per packet (BPF_PROG_TEST_RUN) against N policy entries",
            (SANS, 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d((xmin..xmax).log_scale(), 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_desc("N policy entries")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("ns per packet")
        .label_style((SANS, 12))
        .draw()?;
    let mut cases: Vec<&str> = Vec::new();
    for x in &p.points {
        if !cases.contains(&x.case.as_str()) {
            cases.push(&x.case);
        }
    }
    for (i, case) in cases.iter().enumerate() {
        let pts: Vec<(f64, f64)> = p
            .points
            .iter()
            .filter(|x| x.case == *case)
            .map(|x| (x.rules as f64, x.ns.median))
            .filter(|q| q.1.is_finite())
            .collect();
        let color = COLORS[(i + 2) % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(*case)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|q| Circle::new(*q, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .label_font((SANS, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}
