//! The SVG drawing: namespaces as boxes in a grid, workloads stacked inside them and
//! coloured by isolation, flows as curved arrows labelled with their ports, a legend.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{pods_words, style, Graph, Workload};

const NODE_W: f64 = 180.0;
const NODE_H: f64 = 46.0;
const NODE_GAP: f64 = 34.0;
const NS_PAD_X: f64 = 26.0;
const NS_PAD_R: f64 = 56.0;
const NS_HEADER: f64 = 34.0;
const NS_PAD_BOTTOM: f64 = 20.0;
const NS_W: f64 = NS_PAD_X + NODE_W + NS_PAD_R;
const GAP_X: f64 = 170.0;
const GAP_Y: f64 = 100.0;
const MARGIN: f64 = 40.0;
const TITLE_H: f64 = 36.0;
const LEGEND_H: f64 = 96.0;
const FONT: &str = "DejaVu Sans, Verdana, Arial, sans-serif";
const EDGE: &str = "#2563eb";
const EDGE_PARTIAL: &str = "#64748b";

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Shortens a name to what fits in a node.
fn fit(s: &str, chars: usize) -> String {
    if s.chars().count() <= chars {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(chars - 1).collect();
        t.push('…');
        t
    }
}

#[derive(Clone, Copy, Debug)]
struct Rect {
    x: f64,
    y: f64,
    w: f64,
    h: f64,
}

impl Rect {
    fn center(&self) -> (f64, f64) {
        (self.x + self.w / 2.0, self.y + self.h / 2.0)
    }
}

/// Where everything goes: namespaces in a grid (row by row, in name order), workloads
/// stacked inside them.
struct Layout {
    cols: usize,
    width: f64,
    height: f64,
    namespaces: Vec<Rect>,
    /// Workload key → (box, index in its namespace, namespace index).
    nodes: BTreeMap<String, (Rect, usize, usize)>,
}

fn layout(g: &Graph) -> Layout {
    let n = g.namespaces.len().max(1);
    let cols = ((n as f64).sqrt().ceil() as usize).clamp(1, 4);
    let heights: Vec<f64> = g
        .namespaces
        .iter()
        .map(|ns| {
            let k = ns.workloads.len() as f64;
            NS_HEADER + k * NODE_H + (k - 1.0).max(0.0) * NODE_GAP + NS_PAD_BOTTOM
        })
        .collect();
    let rows = n.div_ceil(cols);
    let row_h: Vec<f64> = (0..rows)
        .map(|r| {
            heights
                .iter()
                .skip(r * cols)
                .take(cols)
                .fold(0.0_f64, |a, b| a.max(*b))
        })
        .collect();
    let mut namespaces = Vec::new();
    let mut nodes = BTreeMap::new();
    for (i, ns) in g.namespaces.iter().enumerate() {
        let (r, c) = (i / cols, i % cols);
        let x = MARGIN + c as f64 * (NS_W + GAP_X);
        let y = MARGIN + TITLE_H + row_h[..r].iter().sum::<f64>() + r as f64 * GAP_Y;
        namespaces.push(Rect {
            x,
            y,
            w: NS_W,
            h: heights[i],
        });
        for (j, key) in ns.workloads.iter().enumerate() {
            let rect = Rect {
                x: x + NS_PAD_X,
                y: y + NS_HEADER + j as f64 * (NODE_H + NODE_GAP),
                w: NODE_W,
                h: NODE_H,
            };
            nodes.insert(key.clone(), (rect, j, i));
        }
    }
    let used_cols = cols.min(n) as f64;
    // The last column's edges bulge and write their labels to its right.
    let width = (2.0 * MARGIN + used_cols * NS_W + (used_cols - 1.0) * GAP_X + 110.0).max(700.0);
    let height = MARGIN
        + TITLE_H
        + row_h.iter().sum::<f64>()
        + (rows as f64 - 1.0) * GAP_Y
        + GAP_Y / 2.0
        + LEGEND_H
        + MARGIN / 2.0;
    Layout {
        cols,
        width,
        height,
        namespaces,
        nodes,
    }
}

/// An edge's path and where its label goes (x, y, text-anchor).
fn route(
    from: &(Rect, usize, usize),
    to: &(Rect, usize, usize),
    cols: usize,
) -> (String, (f64, f64, &'static str)) {
    let (a, ai, ans) = *from;
    let (b, bi, bns) = *to;
    if ans == bns && ai == bi {
        // Pods of one workload to each other: a loop over the top right corner.
        let (sx, sy) = (a.x + a.w - 40.0, a.y);
        let (ex, ey) = (a.x + a.w, a.y + 16.0);
        let d = format!(
            "M {sx:.1} {sy:.1} C {:.1} {:.1}, {:.1} {:.1}, {ex:.1} {ey:.1}",
            sx,
            sy - 30.0,
            ex + 34.0,
            ey
        );
        return (d, (sx - 6.0, a.y - 7.0, "end"));
    }
    let (ac, bc) = (a.center(), b.center());
    let same_column = ans == bns || ans % cols == bns % cols;
    if same_column {
        // One above the other: out of the right sides and back, bulging into the gap,
        // so that the boxes in between are not crossed; upward edges bulge further.
        let up = bc.1 < ac.1;
        let x = a.x + a.w;
        let off = 26.0 + 0.12 * (bc.1 - ac.1).abs() + if up { 18.0 } else { 0.0 };
        let (sy, ey) = (ac.1, bc.1);
        let d = format!(
            "M {x:.1} {sy:.1} C {:.1} {sy:.1}, {:.1} {ey:.1}, {x:.1} {ey:.1}",
            x + off,
            x + off
        );
        let ly = (sy + ey) / 2.0 + if up { 12.0 } else { -4.0 };
        return (d, (x + 0.75 * off + 5.0, ly, "start"));
    }
    // Across columns: from the side facing the other box, bent to the left of travel so
    // that A → B and B → A do not overlap.
    let sgn = (bc.0 - ac.0).signum();
    let s = (ac.0 + sgn * a.w / 2.0, ac.1);
    let e = (bc.0 - sgn * b.w / 2.0, bc.1);
    let (vx, vy) = (e.0 - s.0, e.1 - s.1);
    let len = (vx * vx + vy * vy).sqrt().max(1.0);
    let bend = (0.10 * len).clamp(14.0, 60.0);
    let c = (
        (s.0 + e.0) / 2.0 + vy / len * bend,
        (s.1 + e.1) / 2.0 - vx / len * bend,
    );
    let d = format!(
        "M {:.1} {:.1} Q {:.1} {:.1}, {:.1} {:.1}",
        s.0, s.1, c.0, c.1, e.0, e.1
    );
    let mid = (
        0.25 * s.0 + 0.5 * c.0 + 0.25 * e.0,
        0.25 * s.1 + 0.5 * c.1 + 0.25 * e.1,
    );
    (d, (mid.0, mid.1 + 4.0, "middle"))
}

impl Graph {
    /// A standalone SVG: namespaces as boxes in a grid, workloads inside them coloured by
    /// isolation, flows as arrows labelled with their ports, a legend.
    pub fn svg(&self) -> String {
        let l = layout(self);
        let mut out = String::new();
        let _ = writeln!(out, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" font-family="{FONT}">"#,
            w = l.width,
            h = l.height
        );
        let _ = writeln!(out, "<title>{}</title>", xml(&self.title()));
        out.push_str("<defs>\n");
        for (id, color) in [("arrow", EDGE), ("arrow-partial", EDGE_PARTIAL)] {
            let _ = writeln!(
                out,
                r#"<marker id="{id}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto"><path d="M 0 0 L 10 5 L 0 10 z" fill="{color}"/></marker>"#
            );
        }
        out.push_str("</defs>\n");
        let _ = writeln!(
            out,
            r##"<rect class="background" x="0" y="0" width="{:.0}" height="{:.0}" fill="#ffffff"/>"##,
            l.width, l.height
        );
        let _ = writeln!(
            out,
            r##"<text class="title" x="{MARGIN}" y="{:.0}" font-size="16" font-weight="bold" fill="#0f172a">{}</text>"##,
            MARGIN + 4.0,
            xml(&self.title())
        );

        for (ns, r) in self.namespaces.iter().zip(&l.namespaces) {
            let _ = writeln!(
                out,
                r##"<g class="namespace" data-namespace="{}"><rect class="namespace-box" x="{:.0}" y="{:.0}" width="{:.0}" height="{:.0}" rx="10" fill="#f1f5f9" stroke="#94a3b8" stroke-width="2"/><text class="namespace-label" x="{:.0}" y="{:.0}" font-size="13" font-weight="bold" fill="#334155">{}</text></g>"##,
                xml(&ns.name),
                r.x,
                r.y,
                r.w,
                r.h,
                r.x + 12.0,
                r.y + 22.0,
                xml(&fit(&ns.name, 30))
            );
        }

        let mut labels = String::new();
        let mut placed: Vec<(f64, f64, f64)> = Vec::new();
        for e in &self.edges {
            let (Some(from), Some(to)) = (l.nodes.get(&e.from), l.nodes.get(&e.to)) else {
                continue;
            };
            let (d, (lx, ly, anchor)) = route(from, to, l.cols);
            let (color, marker, dash) = if e.partial {
                (EDGE_PARTIAL, "arrow-partial", r#" stroke-dasharray="6 4""#)
            } else {
                (EDGE, "arrow", "")
            };
            let attrs = format!(
                r#"data-from="{}" data-to="{}" data-ports="{}" data-partial="{}""#,
                xml(&e.from),
                xml(&e.to),
                xml(&e.ports.join(", ")),
                e.partial
            );
            let _ = writeln!(
                out,
                r#"<g class="edge" {attrs}><path class="edge-line" d="{d}" fill="none" stroke="{color}" stroke-width="1.6"{dash} marker-end="url(#{marker})"/></g>"#
            );
            let text = fit(&e.ports.join(", "), 40);
            let tw = 6.1 * text.chars().count() as f64 + 8.0;
            let bx = match anchor {
                "start" => lx - 4.0,
                "end" => lx - tw + 4.0,
                _ => lx - tw / 2.0,
            };
            // Labels never cover each other: move down until clear.
            let mut ly = ly;
            while placed.iter().any(|(px, py, pw): &(f64, f64, f64)| {
                bx < px + pw && *px < bx + tw && ly - 11.0 < py + 15.0 && *py < ly + 4.0
            }) {
                ly += 16.0;
            }
            placed.push((bx, ly - 11.0, tw));
            let _ = writeln!(
                labels,
                r##"<g class="edge-label" {attrs}><rect x="{bx:.1}" y="{:.1}" width="{tw:.1}" height="15" rx="3" fill="#ffffff" fill-opacity="0.9"/><text x="{lx:.1}" y="{ly:.1}" font-size="10" text-anchor="{anchor}" fill="{color}">{}</text></g>"##,
                ly - 11.0,
                xml(&text)
            );
        }

        for w in &self.workloads {
            let Some((r, _, _)) = l.nodes.get(&w.key) else {
                continue;
            };
            let (fill, stroke, words) = style(w);
            let isolated = match (w.isolated_ingress, w.isolated_egress) {
                (false, false) => "none",
                (true, false) => "ingress",
                (false, true) => "egress",
                (true, true) => "ingress egress",
            };
            let _ = writeln!(
                out,
                r##"<g class="workload" data-workload="{}" data-isolated="{isolated}" data-pods="{}"><rect class="workload-box" x="{:.0}" y="{:.0}" width="{:.0}" height="{:.0}" rx="7" fill="{fill}" stroke="{stroke}" stroke-width="2"/><text x="{:.0}" y="{:.0}" font-size="12" font-weight="bold" fill="#0f172a">{}</text><text x="{:.0}" y="{:.0}" font-size="10" fill="#475569">{}</text></g>"##,
                xml(&w.key),
                w.pods.len(),
                r.x,
                r.y,
                r.w,
                r.h,
                r.x + 10.0,
                r.y + 19.0,
                xml(&fit(&w.name, 24)),
                r.x + 10.0,
                r.y + 35.0,
                xml(&format!("{}, {words}", pods_words(w.pods.len())))
            );
        }
        out.push_str(&labels);
        self.legend(&mut out, &l);
        out.push_str("</svg>\n");
        out
    }

    fn legend(&self, out: &mut String, l: &Layout) {
        let y = l.height - MARGIN / 2.0 - LEGEND_H + 12.0;
        let _ = writeln!(out, r#"<g class="legend">"#);
        let mut x = MARGIN;
        for (ingress, egress) in [(false, false), (true, false), (false, true), (true, true)] {
            let sample = Workload {
                key: String::new(),
                namespace: String::new(),
                name: String::new(),
                pods: vec![],
                isolated_ingress: ingress,
                isolated_egress: egress,
            };
            let (fill, stroke, words) = style(&sample);
            let _ = writeln!(
                out,
                r##"<rect x="{x:.0}" y="{y:.0}" width="18" height="13" rx="3" fill="{fill}" stroke="{stroke}" stroke-width="2"/><text x="{:.0}" y="{:.0}" font-size="11" fill="#334155">{words}</text>"##,
                x + 24.0,
                y + 11.0
            );
            x += 30.0 + 6.4 * words.len() as f64 + 18.0;
        }
        let y2 = y + 28.0;
        for (i, (color, marker, dash, words)) in [
            (EDGE, "arrow", "", "allowed flow, labelled with its ports"),
            (
                EDGE_PARTIAL,
                "arrow-partial",
                r#" stroke-dasharray="6 4""#,
                "allowed for some pod pairs only",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let x = MARGIN + i as f64 * 300.0;
            let _ = writeln!(
                out,
                r##"<path d="M {x:.0} {:.0} L {:.0} {:.0}" stroke="{color}" stroke-width="1.6"{dash} marker-end="url(#{marker})"/><text x="{:.0}" y="{:.0}" font-size="11" fill="#334155">{words}</text>"##,
                y2 + 5.0,
                x + 40.0,
                y2 + 5.0,
                x + 50.0,
                y2 + 9.0
            );
        }
        let mut notes = vec![
            "Workloads: the pods of a namespace sharing an app.kubernetes.io/name, app or k8s-app label (else one pod).",
        ];
        if self.open_flows_hidden {
            notes.push(
                "Flows between pods no policy isolates are not drawn (--open-flows draws them).",
            );
        }
        for (i, note) in notes.iter().enumerate() {
            let _ = writeln!(
                out,
                r##"<text x="{MARGIN}" y="{:.0}" font-size="10" fill="#64748b">{note}</text>"##,
                y2 + 30.0 + 14.0 * i as f64
            );
        }
        out.push_str("</g>\n");
    }
}
