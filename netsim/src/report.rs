//! The self-contained HTML report of a run: a summary, the assertions, and
//! inline SVG plots (reachability over time, the convergence CDF, control
//! traffic per node, the tunnel graph drawn). No script, no external file.

use std::fmt::Write;

use crate::run::Report;

const PALETTE: [&str; 8] =
    ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A "nice" tick step for a range.
fn tick_step(range: f64, target: usize) -> f64 {
    if range <= 0.0 {
        return 1.0;
    }
    let raw = range / target as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm < 1.5 {
        1.0
    } else if norm < 3.5 {
        2.0
    } else if norm < 7.5 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn fmt_num(v: f64) -> String {
    if v == v.round() && v.abs() < 1e9 { format!("{v:.0}") } else { format!("{v:.2}") }
}

/// A plot frame: axes, ticks, labels; maps data to pixels.
struct Frame {
    w: f64,
    h: f64,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Frame {
    fn new(w: f64, h: f64, (x0, x1): (f64, f64), (y0, y1): (f64, f64)) -> Self {
        let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
        let y1 = if y1 > y0 { y1 } else { y0 + 1.0 };
        Frame { w, h, left: 70.0, right: 20.0, top: 20.0, bottom: 50.0, x0, x1, y0, y1 }
    }
    fn x(&self, v: f64) -> f64 {
        self.left + (v - self.x0) / (self.x1 - self.x0) * (self.w - self.left - self.right)
    }
    fn y(&self, v: f64) -> f64 {
        self.h - self.bottom - (v - self.y0) / (self.y1 - self.y0) * (self.h - self.top - self.bottom)
    }
    fn axes(&self, out: &mut String, xlabel: &str, ylabel: &str, yfmt: &dyn Fn(f64) -> String) {
        let (l, r, t, b) = (self.left, self.w - self.right, self.top, self.h - self.bottom);
        let _ = write!(
            out,
            r##"<rect x="{l}" y="{t}" width="{}" height="{}" fill="#fff" stroke="#444"/>"##,
            r - l,
            b - t
        );
        let xs = tick_step(self.x1 - self.x0, 8);
        let mut v = (self.x0 / xs).ceil() * xs;
        while v <= self.x1 + 1e-9 {
            let x = self.x(v);
            let _ = write!(
                out,
                r##"<line x1="{x:.1}" y1="{t}" x2="{x:.1}" y2="{b}" stroke="#e4e4e4"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="13">{}</text>"##,
                b + 18.0,
                fmt_num(v)
            );
            v += xs;
        }
        let ys = tick_step(self.y1 - self.y0, 5);
        let mut v = (self.y0 / ys).ceil() * ys;
        while v <= self.y1 + 1e-9 {
            let y = self.y(v);
            let _ = write!(
                out,
                r##"<line x1="{l}" y1="{y:.1}" x2="{r}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="13">{}</text>"##,
                l - 6.0,
                y + 4.0,
                esc(&yfmt(v))
            );
            v += ys;
        }
        let _ = write!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="14">{}</text><text x="16" y="{:.1}" text-anchor="middle" font-size="14" transform="rotate(-90 16 {:.1})">{}</text>"##,
            (l + r) / 2.0,
            self.h - 8.0,
            esc(xlabel),
            (t + b) / 2.0,
            (t + b) / 2.0,
            esc(ylabel)
        );
    }
}

fn svg_open(out: &mut String, w: f64, h: f64, title: &str) {
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" role="img" aria-label="{}">"##,
        esc(title)
    );
}

fn reachability_plot(r: &Report) -> String {
    let mut out = String::new();
    let (w, h) = (1000.0, 320.0);
    // The axis covers what happens after the cold start (which begins at
    // 0 %), so that the dips after events are visible.
    let settled = r.events.first().and_then(|e| e.convergence_s).unwrap_or(0.0);
    let min = r
        .reachability
        .iter()
        .filter(|s| s.eligible > 0 && s.t_s >= settled)
        .map(|s| s.reachable as f64 / s.eligible as f64)
        .fold(1.0, f64::min);
    let y0 = ((min * 10.0).floor() / 10.0).min(0.9) * 100.0;
    let f = Frame::new(w, h, (0.0, r.duration_s), (y0, 100.0));
    svg_open(&mut out, w, h, "reachability over time");
    let clock = if r.namespaces { "time (s, real nodes in namespaces)" } else { "virtual time (s)" };
    f.axes(&mut out, clock, "pairs reachable (%)", &|v| format!("{v:.0}"));
    for (i, e) in r.events.iter().enumerate().skip(1) {
        let x = f.x(e.at_s);
        let _ = write!(
            out,
            r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="#d62728" stroke-dasharray="4 3" opacity="0.7"><title>{}</title></line>"##,
            f.top,
            f.h - f.bottom,
            esc(&format!("#{i} {} at {} s: {}", e.what, e.at_s, e.detail))
        );
        if r.events.len() <= 40 {
            let _ = write!(
                out,
                r##"<text x="{:.1}" y="{:.1}" font-size="11" fill="#d62728">{i}</text>"##,
                x + 2.0,
                f.top + 12.0 + (i % 3) as f64 * 11.0
            );
        }
    }
    let mut pts = String::new();
    for s in &r.reachability {
        let v = if s.eligible == 0 { 100.0 } else { s.reachable as f64 * 100.0 / s.eligible as f64 }.max(y0);
        let _ = write!(pts, "{:.1},{:.1} ", f.x(s.t_s), f.y(v));
    }
    let _ =
        write!(out, r##"<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="2"/></svg>"##);
    out
}

fn cdf_plot(r: &Report) -> String {
    let mut v: Vec<f64> = r.events.iter().skip(1).filter_map(|e| e.convergence_s).collect();
    let never = r.events.iter().skip(1).filter(|e| e.convergence_s.is_none()).count();
    if v.is_empty() {
        return format!("<p>No event converged ({never} never did).</p>");
    }
    v.sort_by(f64::total_cmp);
    let total = (v.len() + never) as f64;
    let xmax = v.last().copied().unwrap_or(1.0).max(r.sample_interval_s) * 1.05;
    let (w, h) = (480.0, 300.0);
    let f = Frame::new(w, h, (0.0, xmax), (0.0, 100.0));
    let mut out = String::new();
    svg_open(&mut out, w, h, "convergence time CDF");
    f.axes(&mut out, "time to reach every pair again after an event (s)", "events (%)", &|v| {
        format!("{v:.0}")
    });
    let mut d = format!("M{:.1},{:.1}", f.x(0.0), f.y(0.0));
    for (i, c) in v.iter().enumerate() {
        let _ = write!(d, " H{:.1} V{:.1}", f.x(*c), f.y((i + 1) as f64 * 100.0 / total));
    }
    let _ = write!(d, " H{:.1}", f.x(xmax));
    let _ = write!(out, r##"<path d="{d}" fill="none" stroke="#2ca02c" stroke-width="2"/>"##);
    for c in &v {
        let _ = write!(
            out,
            r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="#2ca02c"/>"##,
            f.x(*c),
            f.h - f.bottom - 3.0
        );
    }
    out.push_str("</svg>");
    if never > 0 {
        let _ = write!(out, "<p>{never} event(s) never converged (the curve stops below 100 %).</p>");
    }
    out
}

fn control_plot(r: &Report) -> String {
    let mut rates: Vec<f64> = r.per_node.iter().map(|n| n.control_tx_bytes_per_s).collect();
    rates.sort_by(|a, b| b.total_cmp(a));
    let (w, h) = (480.0, 300.0);
    let ymax = rates.first().copied().unwrap_or(1.0) * 1.1;
    let f = Frame::new(w, h, (0.0, rates.len() as f64), (0.0, ymax));
    let mut out = String::new();
    svg_open(&mut out, w, h, "control bytes per node");
    f.axes(&mut out, "nodes, busiest first", "control bytes sent per s", &|v| fmt_num(v));
    let mut d = format!("M{:.1},{:.1}", f.x(0.0), f.y(0.0));
    for (i, v) in rates.iter().enumerate() {
        let _ = write!(d, " V{:.1} H{:.1}", f.y(*v), f.x((i + 1) as f64));
    }
    let _ = write!(d, " V{:.1} Z", f.y(0.0));
    let _ = write!(out, r##"<path d="{d}" fill="#ff7f0e" fill-opacity="0.6" stroke="#ff7f0e"/></svg>"##);
    out
}

fn graph_plot(r: &Report) -> String {
    const MAX: usize = 1500;
    let n = r.per_node.len().min(MAX);
    let (w, h) = (760.0, 760.0);
    let (cx, cy, rad) = (w / 2.0, h / 2.0, w / 2.0 - 40.0);
    let regions: Vec<&str> = r.regions.iter().map(|x| x.name.as_str()).collect();
    // Around the circle by region, so that inter-region tunnels cross it.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (regions.iter().position(|x| *x == r.per_node[i].region), i));
    let mut pos = vec![(0.0, 0.0); n];
    for (k, &i) in order.iter().enumerate() {
        let a = k as f64 / n.max(1) as f64 * std::f64::consts::TAU - std::f64::consts::FRAC_PI_2;
        pos[i] = (cx + rad * a.cos(), cy + rad * a.sin());
    }
    let mut out = String::new();
    svg_open(&mut out, w, h, "tunnel graph");
    let opacity = (30.0 / (r.tunnel_graph.edges.len().max(1) as f64).sqrt()).clamp(0.05, 0.6);
    let _ = write!(out, r##"<g stroke="#555" stroke-opacity="{opacity:.2}" stroke-width="0.8">"##);
    for &(a, b) in &r.tunnel_graph.edges {
        if a < n && b < n {
            let _ = write!(
                out,
                r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}"/>"##,
                pos[a].0, pos[a].1, pos[b].0, pos[b].1
            );
        }
    }
    out.push_str("</g>");
    let dot = if n > 300 { 2.5 } else { 5.0 };
    for (i, p) in pos.iter().enumerate() {
        let node = &r.per_node[i];
        let ri = regions.iter().position(|x| *x == node.region).unwrap_or(0);
        let c = if node.running { PALETTE[ri % PALETTE.len()] } else { "#aaa" };
        let fill = if node.nat { "#fff" } else { c };
        let _ = write!(
            out,
            r##"<circle cx="{:.1}" cy="{:.1}" r="{dot}" fill="{fill}" stroke="{c}" stroke-width="1.5"><title>{} ({}, {} tunnels{}{})</title></circle>"##,
            p.0,
            p.1,
            esc(&node.name),
            esc(&node.region),
            node.tunnels,
            if node.nat { ", NAT" } else { "" },
            if node.running { "" } else { ", not running" }
        );
        if n <= 40 {
            let (dx, dy) = ((p.0 - cx) / rad * 16.0, (p.1 - cy) / rad * 16.0);
            let _ = write!(
                out,
                r##"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"##,
                p.0 + dx,
                p.1 + dy + 4.0,
                esc(&node.name)
            );
        }
    }
    // Legend.
    for (k, name) in regions.iter().enumerate() {
        let y = 20.0 + k as f64 * 18.0;
        let _ = write!(
            out,
            r##"<circle cx="16" cy="{y}" r="6" fill="{}"/><text x="28" y="{:.1}" font-size="13">{}</text>"##,
            PALETTE[k % PALETTE.len()],
            y + 4.0,
            esc(name)
        );
    }
    let y = 20.0 + regions.len() as f64 * 18.0;
    let _ = write!(
        out,
        r##"<circle cx="16" cy="{y}" r="6" fill="#fff" stroke="#444"/><text x="28" y="{:.1}" font-size="13">behind NAT</text></svg>"##,
        y + 4.0
    );
    if r.per_node.len() > MAX {
        let _ = write!(out, "<p>Only the first {MAX} of {} nodes are drawn.</p>", r.per_node.len());
    }
    out
}

/// Renders the report as one HTML page.
pub fn html(r: &Report) -> String {
    let mut o = String::new();
    let title = if r.scenario.is_empty() { "netsim run".to_string() } else { r.scenario.clone() };
    let verdict = if r.passed { ("PASSED", "#2ca02c") } else { ("FAILED", "#d62728") };
    let _ = write!(
        o,
        r##"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>sixmesh sim: {t}</title>
<style>body{{font-family:sans-serif;max-width:1040px;margin:1em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:14px}}
th{{background:#f3f3f3}}.ok{{color:#2ca02c;font-weight:bold}}.bad{{color:#d62728;font-weight:bold}}
h2{{margin-top:1.4em;border-bottom:1px solid #ddd}}.row{{display:flex;flex-wrap:wrap;gap:1em}}</style></head><body>
<h1>sixmesh sim: {t} <span style="color:{c}">{v}</span></h1><p>{d}</p>"##,
        t = esc(&title),
        c = verdict.1,
        v = verdict.0,
        d = esc(&r.description)
    );
    let _ = write!(
        o,
        "<table><tr><th>nodes</th><td>{}{}</td><th>{}</th><td>{} s</td><th>seed</th><td>{}</td></tr>\
         <tr><th>tunnels at the end</th><td>{} (mean degree {:.1})</td><th>tunnel-graph mean hops</th><td>{:.2} (max {})</td>\
         <th>pairs checked per sample</th><td>{}</td></tr>\
         <tr><th>control B/s/node</th><td>mean {:.0}, p99 {:.0}, max {:.0}</td><th>mean path stretch</th><td>{}</td>\
         <th>forwarding loops seen</th><td>{}</td></tr>{}</table>",
        r.nodes,
        if r.destinations < r.nodes {
            format!(" ({} announce a prefix)", r.destinations)
        } else {
            String::new()
        },
        if r.namespaces { "real time (namespaces)" } else { "virtual time" },
        fmt_num(r.duration_s),
        r.seed,
        r.tunnel_graph.tunnels,
        r.tunnel_graph.mean_degree,
        r.tunnel_graph.mean_hops,
        r.tunnel_graph.max_hops,
        r.sampled_pairs,
        r.control.mean_bytes_per_s,
        r.control.p99_bytes_per_s,
        r.control.max_bytes_per_s,
        r.stretch
            .as_ref()
            .map_or("—".into(), |s| format!("{:.2} (p90 {:.2}, {} pairs)", s.mean, s.p90, s.count)),
        r.loops.count,
        r.wall_s.map_or(String::new(), |w| format!("<tr><th>wall time</th><td colspan=5>{w:.1} s</td></tr>"))
    );
    o.push_str("<h2>Assertions</h2><table><tr><th>assertion</th><th>result</th><th>measured</th></tr>");
    for a in &r.assertions {
        let _ = write!(
            o,
            "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
            esc(&a.name),
            if a.passed { "ok" } else { "bad" },
            if a.passed { "pass" } else { "FAIL" },
            esc(&a.detail)
        );
    }
    if r.assertions.is_empty() {
        o.push_str("<tr><td colspan=3>none</td></tr>");
    }
    o.push_str("</table>");
    o.push_str("<h2>Reachability over time</h2><p>Share of the checked pairs (both ends running and connected through the underlay) whose forwarding path reaches the destination. Dashed lines: events (numbered as in the table below). The axis starts where the lowest point after the cold start lies; values under it sit on the bottom edge.</p>");
    o.push_str(&reachability_plot(r));
    o.push_str("<div class=row><div><h2>Convergence after events</h2>");
    o.push_str(&cdf_plot(r));
    o.push_str("</div><div><h2>Control traffic per node</h2>");
    o.push_str(&control_plot(r));
    o.push_str("</div></div><h2>Events</h2><table><tr><th>#</th><th>at</th><th>event</th><th>detail</th><th>every pair reachable after</th></tr>");
    for (i, e) in r.events.iter().enumerate() {
        let mut detail = e.detail.clone();
        if detail.len() > 120 {
            let cut = (0..=117).rev().find(|&k| detail.is_char_boundary(k)).unwrap_or(0);
            detail.truncate(cut);
            detail.push('…');
        }
        let _ = write!(
            o,
            "<tr><td>{i}</td><td>{} s</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            fmt_num(e.at_s),
            esc(&e.what),
            esc(&detail),
            e.convergence_s.map_or("<span class=bad>never</span>".into(), |c| format!("{c:.2} s"))
        );
    }
    o.push_str("</table><h2>Tunnel graph at the end</h2><p>Nodes around the circle grouped by region; a line per tunnel up at both ends; hollow: behind NAT; grey: not running.</p>");
    o.push_str(&graph_plot(r));
    o.push_str("<h2>Regions</h2><table><tr><th>region</th><th>nodes</th><th>behind NAT</th><th>paths broken from the start (sampled)</th></tr>");
    for g in &r.regions {
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1} %</td></tr>",
            esc(&g.name),
            g.nodes,
            g.nat,
            g.broken_paths * 100.0
        );
    }
    o.push_str("</table><p style=\"color:#777;font-size:12px\">Generated by <code>sixmesh sim</code>; the JSON report (<code>--json</code>) has every number shown here.</p></body></html>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_text_is_escaped() {
        assert_eq!(tick_step(100.0, 5), 20.0);
        assert_eq!(tick_step(7.0, 8), 1.0);
        assert_eq!(tick_step(0.3, 5), 0.05);
        assert_eq!(esc("<a&\"b\">"), "&lt;a&amp;&quot;b&quot;&gt;");
    }
}
