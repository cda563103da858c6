//! Hand-written SVG: a grid of log-log plots (latency vs slot count), one per
//! metric, one polyline (plus point markers) per implementation or backend.

use super::table::{fmt_ns, IMPLS, METRICS};
use super::Report;
use std::fmt::Write;

const W: f64 = 420.0;
const H: f64 = 300.0;
const COLS: usize = 3;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 15.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 60.0;
/// One colour per implementation, the same in every plot.
fn color_of(name: &str) -> &'static str {
    match name {
        "memslots" | "library" => "#1f77b4",
        "vm-memory" => "#d62728",
        "kvm" | "kvm-ioctl" => "#2ca02c",
        "library+kvm" => "#9467bd",
        "memslots-native" => "#17becf",
        "vm-memory-atomic" => "#ff7f0e",
        "arcswap-btreemap" => "#8c564b",
        "arcswap-imbl" => "#e377c2",
        "rwlock-btreemap" => "#bcbd22",
        "lower-bound" => "#000000",
        _ => "#7f7f7f",
    }
}

/// One plot: a title and named series of (slots, ns) points.
struct Plot {
    title: String,
    series: Vec<(String, Vec<(f64, f64)>)>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn plots(r: &Report) -> Vec<Plot> {
    let mut out = Vec::new();
    for metric in METRICS {
        let series = IMPLS
            .iter()
            .map(|&imp| {
                let pts = r
                    .micro
                    .iter()
                    .filter(|p| p.metric == metric && p.implementation == imp)
                    .map(|p| (f64::from(p.slots), p.median_ns))
                    .collect();
                (imp.to_string(), pts)
            })
            .collect();
        let what = if metric == "build" { "time to create all slots" } else { "median per operation" };
        out.push(Plot { title: format!("{metric}: {what}"), series });
    }
    // The sweep's area (the guest-layout rows use a smaller one).
    let area = r.scenarios.iter().filter(|p| p.backend == "library").map(|p| p.area_bytes).max().unwrap_or(0);
    for scenario in super::scenarios::SCENARIOS {
        let pts = r
            .scenarios
            .iter()
            .filter(|p| p.backend == "library" && p.scenario == scenario && p.area_bytes == area)
            .map(|p| (f64::from(p.slots), p.iter_median_us * 1e3))
            .collect();
        out.push(Plot {
            title: format!("{scenario} (library): time per iteration"),
            series: vec![("memslots".into(), pts)],
        });
    }
    let mut backends: Vec<&str> = r.scenarios.iter().map(|p| p.backend).collect();
    backends.sort_unstable();
    backends.dedup();
    let series = backends
        .iter()
        .map(|&b| {
            let mut pts: Vec<(f64, f64)> = r
                .scenarios
                .iter()
                .filter(|p| p.backend == b && (p.scenario == "setup" || (b == "library" && p.scenario == "map")))
                .map(|p| (f64::from(p.slots), p.setup_ms * 1e6))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            pts.dedup_by(|a, b| a.0 == b.0);
            (b.to_string(), pts)
        })
        .collect();
    out.push(Plot { title: "slot setup: creating all slots".into(), series });
    out.retain(|p| p.series.iter().any(|s| !s.1.is_empty()));
    out
}

fn decade_label(e: i32, unit_ns: bool) -> String {
    let v = 10f64.powi(e);
    if unit_ns {
        fmt_ns(v).replace(".0 ", " ").replace(".00 ", " ")
    } else if v >= 1000.0 {
        format!("{}k", v / 1000.0)
    } else {
        format!("{v}")
    }
}

fn draw(svg: &mut String, plot: &Plot, ox: f64, oy: f64) -> std::fmt::Result {
    let pts: Vec<(f64, f64)> = plot.series.iter().flat_map(|s| s.1.iter().copied()).filter(|p| p.1 > 0.0).collect();
    let lx = |v: f64| v.max(1.0).log10();
    let ly = |v: f64| v.max(1e-3).log10();
    let (mut x0, mut x1) = (f64::MAX, f64::MIN);
    let (mut y0, mut y1) = (f64::MAX, f64::MIN);
    for &(x, y) in &pts {
        x0 = x0.min(lx(x));
        x1 = x1.max(lx(x));
        y0 = y0.min(ly(y));
        y1 = y1.max(ly(y));
    }
    x0 = x0.floor();
    x1 = x1.ceil().max(x0 + 1.0);
    y0 = y0.floor();
    y1 = y1.ceil().max(y0 + 1.0);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let px = |x: f64| ox + LEFT + (lx(x) - x0) / (x1 - x0) * pw;
    let py = |y: f64| oy + TOP + ph - (ly(y) - y0) / (y1 - y0) * ph;
    writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" font-size="13" font-weight="bold" text-anchor="middle">{}</text>"#,
        ox + W / 2.0,
        oy + 18.0,
        esc(&plot.title)
    )?;
    writeln!(
        svg,
        r##"<rect x="{:.1}" y="{:.1}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="#444"/>"##,
        ox + LEFT,
        oy + TOP
    )?;
    // Decade grid lines and labels. The exponents are small whole numbers.
    #[allow(clippy::cast_possible_truncation)] // x0..x1, y0..y1 are floored/ceiled log10 values in -3..12
    let (ex0, ex1, ey0, ey1) = (x0 as i32, x1 as i32, y0 as i32, y1 as i32);
    for e in ex0..=ex1 {
        let x = px(10f64.powi(e));
        writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"##,
            oy + TOP,
            oy + TOP + ph,
            oy + TOP + ph + 13.0,
            decade_label(e, false)
        )?;
    }
    for e in ey0..=ey1 {
        let y = py(10f64.powi(e));
        writeln!(
            svg,
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"##,
            ox + LEFT,
            ox + LEFT + pw,
            ox + LEFT - 4.0,
            y + 3.0,
            esc(&decade_label(e, true))
        )?;
    }
    writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">slots (log)</text>"#,
        ox + LEFT + pw / 2.0,
        oy + TOP + ph + 26.0
    )?;
    let mut legend_x = ox + LEFT;
    for (name, series) in &plot.series {
        let color = color_of(name);
        let valid: Vec<&(f64, f64)> = series.iter().filter(|p| p.1 > 0.0).collect();
        if valid.is_empty() {
            continue;
        }
        let coords: Vec<String> = valid.iter().map(|&&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"><title>{}</title></polyline>"#,
            coords.join(" "),
            esc(name)
        )?;
        for &&(x, y) in &valid {
            writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"><title>{}: {} slots, {}</title></circle>"#,
                px(x),
                py(y),
                esc(name),
                x,
                esc(&fmt_ns(y))
            )?;
        }
        let ly = oy + H - 14.0;
        writeln!(
            svg,
            r#"<rect x="{legend_x:.1}" y="{:.1}" width="12" height="4" fill="{color}"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
            ly - 4.0,
            legend_x + 16.0,
            ly,
            esc(name)
        )?;
        legend_x += 30.0 + 7.0 * f64::from(u32::try_from(name.len()).unwrap_or(10));
    }
    Ok(())
}

/// The whole SVG document.
pub(crate) fn render(r: &Report) -> String {
    let plots = plots(r);
    let rows = plots.len().div_ceil(COLS).max(1);
    let cols = f64::from(u32::try_from(COLS).unwrap_or(3));
    let total_h = f64::from(u32::try_from(rows).unwrap_or(1)) * H + 30.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{total_h:.0}" viewBox="0 0 {w:.0} {total_h:.0}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="20" font-size="14">memslots perf ({}): latency vs slot count, log-log</text>"#,
        r.mode,
        w = cols * W
    );
    for (i, plot) in plots.iter().enumerate() {
        let col = f64::from(u32::try_from(i % COLS).unwrap_or(0));
        let row = f64::from(u32::try_from(i / COLS).unwrap_or(0));
        let _ = draw(&mut svg, plot, col * W, 30.0 + row * H);
    }
    svg.push_str("</svg>\n");
    svg
}
