//! The PNG plots of BENCHMARKS.md, drawn from the results just measured: per-packet
//! cost against the number of services, and new connections per second per
//! contender at each scale.

use std::path::Path;

use anyhow::{Context as _, Result};
use plotters::prelude::*;

use super::{data_path::CaseResult, end_to_end::E2eResult};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const SIZE: (u32, u32) = (1000, 600);
const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Registers the font once (plotters draws text only with a registered font).
fn register_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if REGISTERED.get().is_some() {
        return Ok(());
    }
    let bytes = std::fs::read(FONT).with_context(|| format!("{FONT} (fonts-dejavu-core)"))?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))?;
    let _ = REGISTERED.set(());
    Ok(())
}

/// How the per-packet cases of IPv6 are named: IPv4's names, prefixed.
const IPV6_PREFIX: &str = "IPv6 ";

/// ns/packet (median) of the established, reply, non-service, tunnel and rr and
/// maglev new-flow cases against the number of services (log scale): IPv4's on the
/// left, IPv6's on the right, one colour per case in both, on one scale.
pub fn per_packet(results: &[CaseResult], path: &Path) -> Result<()> {
    register_font()?;
    let family_case = |r: &CaseResult| match r.case.strip_prefix(IPV6_PREFIX) {
        Some(case) => (true, case.to_owned()),
        None => (false, r.case.clone()),
    };
    let mut cases: Vec<String> = Vec::new();
    for r in results {
        let (_, case) = family_case(r);
        let plotted = !case.starts_with("new TCP flow")
            || case.ends_with(", rr")
            || case.ends_with(", maglev");
        if plotted && !cases.contains(&case) {
            cases.push(case);
        }
    }
    let max_services = results.iter().map(|r| r.services).max().unwrap_or(1) as f64;
    let max_ns = results.iter().map(|r| r.ns_median).fold(0.0, f64::max) * 1.1;
    let root = BitMapBackend::new(path, (SIZE.0 * 3 / 2, SIZE.1)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        "Per-packet cost (BPF_PROG_TEST_RUN, median ns)",
        ("sans-serif", 24),
    )?;
    let panels = root.split_evenly((1, 2));
    for (panel, ipv6) in panels.iter().zip([false, true]) {
        let mut chart = ChartBuilder::on(panel)
            .caption(if ipv6 { "IPv6" } else { "IPv4" }, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((1f64..max_services * 1.5).log_scale(), 0f64..max_ns)?;
        chart
            .configure_mesh()
            .x_desc("services loaded (10 backends each)")
            .y_desc("ns per packet")
            .draw()?;
        for (i, case) in cases.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let points: Vec<(f64, f64)> = results
                .iter()
                .filter(|r| family_case(r) == (ipv6, case.clone()))
                .map(|r| (r.services as f64, r.ns_median))
                .collect();
            if points.is_empty() {
                continue;
            }
            // Past the palette, cases are told apart by a thinner line.
            let width = if i < COLOURS.len() { 2 } else { 1 };
            chart
                .draw_series(LineSeries::new(points.clone(), colour.stroke_width(width)))?
                .label(case.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(width))
                });
            chart.draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, colour.filled())),
            )?;
        }
        if !ipv6 {
            legend(&mut chart)?;
        }
    }
    root.present()?;
    Ok(())
}

/// New connections per second (median, with the min..max range as a whisker) per
/// contender, grouped by the number of services.
pub fn connections(results: &[&E2eResult], path: &Path) -> Result<()> {
    register_font()?;
    let mut scales: Vec<usize> = results.iter().map(|r| r.services).collect();
    scales.dedup();
    let mut contenders: Vec<&str> = Vec::new();
    for r in results {
        if !contenders.contains(&r.contender.as_str()) {
            contenders.push(&r.contender);
        }
    }
    let max = results
        .iter()
        .flat_map(|r| r.new_connections_per_s.iter().copied())
        .fold(0.0, f64::max)
        * 1.35;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let groups = scales.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "New TCP connections per second (median, min..max)",
            ("sans-serif", 24),
        )
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..groups, 0f64..max)?;
    let labels = scales.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(scales.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < labels.len() {
                format!("{} services", labels[i])
            } else {
                String::new()
            }
        })
        .y_desc("connections/s")
        .draw()?;
    let width = 0.8 / contenders.len() as f64;
    for (c, contender) in contenders.iter().enumerate() {
        let colour = COLOURS[c % COLOURS.len()];
        let mut bars = Vec::new();
        let mut whiskers = Vec::new();
        for (g, scale) in scales.iter().enumerate() {
            let Some(r) = results
                .iter()
                .find(|r| r.services == *scale && r.contender == *contender)
            else {
                continue;
            };
            let mut v = r.new_connections_per_s.clone();
            v.sort_by(f64::total_cmp);
            let x0 = g as f64 + 0.1 + c as f64 * width;
            bars.push(Rectangle::new(
                [(x0, 0.0), (x0 + width * 0.9, v[v.len() / 2])],
                colour.filled(),
            ));
            let mid = x0 + width * 0.45;
            whiskers.push(PathElement::new(
                vec![(mid, v[0]), (mid, v[v.len() - 1])],
                BLACK.stroke_width(2),
            ));
        }
        chart
            .draw_series(bars)?
            .label(*contender)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], colour.filled()));
        chart.draw_series(whiskers)?;
    }
    legend(&mut chart)?;
    root.present()?;
    Ok(())
}

/// The series' labels, top right on a white box.
fn legend<'a, DB: DrawingBackend + 'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}
