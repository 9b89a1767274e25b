//! `netpol graph` on `tests/graph/shop.yaml`: the edges are the simulate matrix grouped
//! by workload; the DOT text has a cluster per namespace, a node per workload and an
//! edge per flow; the SVG parses as XML with the same namespaces, workloads, edges and
//! labels, and renders (resvg) into a picture whose boxes are where the SVG says. The
//! PNG is left under target/tmp for a person to look at.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use netpol_engine::simulate::{simulate, Model};
use resvg::{tiny_skia, usvg};
use serde::Deserialize;

const NETPOL: &str = env!("CARGO_BIN_EXE_netpol");

fn shop() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/graph/shop.yaml")
}

fn netpol_graph(args: &[&str]) -> String {
    netpol_graph_of(&shop(), args)
}

fn netpol_graph_of(manifests: &Path, args: &[&str]) -> String {
    let out = Command::new(NETPOL)
        .args(["graph", "--manifests", manifests.to_str().unwrap()])
        .args(args)
        .output()
        .expect("run netpol");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[derive(Debug, Deserialize)]
struct Graph {
    namespaces: Vec<Namespace>,
    workloads: Vec<Workload>,
    edges: Vec<Edge>,
}

#[derive(Debug, Deserialize)]
struct Namespace {
    name: String,
    workloads: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Workload {
    key: String,
    pods: Vec<String>,
    isolated_ingress: bool,
    isolated_egress: bool,
}

#[derive(Debug, Deserialize, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Edge {
    from: String,
    to: String,
    ports: Vec<String>,
    partial: bool,
}

fn json_graph(args: &[&str]) -> Graph {
    json_graph_of(&shop(), args)
}

fn json_graph_of(manifests: &Path, args: &[&str]) -> Graph {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&netpol_graph_of(manifests, &all)).unwrap()
}

/// The edges the simulate matrix implies: for every protocol/port some pod declares,
/// every pair to a pod declaring it, allowed with a policy deciding on at least one side.
fn edges_from_simulate(g: &Graph, open_flows: bool) -> Vec<Edge> {
    let workload_of: BTreeMap<&str, &str> = g
        .workloads
        .iter()
        .flat_map(|w| w.pods.iter().map(move |p| (p.as_str(), w.key.as_str())))
        .collect();
    let model = Model::read(&[shop()]).unwrap();
    let declared: BTreeSet<(u8, u16)> = model
        .snap
        .pods
        .values()
        .flat_map(|p| p.ports.clone())
        .collect();
    // (from, to) → port label → (shown pairs, judged pairs)
    let mut flows: BTreeMap<(String, String), BTreeMap<String, (usize, usize)>> = BTreeMap::new();
    for (protocol, port) in declared {
        let report = simulate(&[shop()], protocol, port, None, None).unwrap();
        for pair in report.results {
            if !model.snap.pods[&pair.to].ports.contains(&(protocol, port)) {
                continue;
            }
            let label = format!(
                "{port}/{}",
                netpol_engine::index::policy::protocol_name(protocol)
            );
            let open = pair.ingress == "not-isolated" && pair.egress == "not-isolated";
            let key = (
                workload_of[pair.from.as_str()].to_string(),
                workload_of[pair.to.as_str()].to_string(),
            );
            let c = flows.entry(key).or_default().entry(label).or_default();
            c.0 += usize::from(pair.allowed && (open_flows || !open));
            c.1 += 1;
        }
    }
    flows
        .into_iter()
        .filter_map(|((from, to), ports)| {
            let shown: Vec<(&String, &(usize, usize))> =
                ports.iter().filter(|(_, c)| c.0 > 0).collect();
            (!shown.is_empty()).then(|| Edge {
                from,
                to,
                partial: shown.iter().any(|(_, c)| c.0 < c.1),
                ports: shown.iter().map(|(l, _)| (*l).clone()).collect(),
            })
        })
        .collect()
}

#[test]
fn the_edges_are_the_simulate_matrix_grouped_by_workload() {
    let g = json_graph(&[]);
    let names: Vec<&str> = g.namespaces.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["data", "kube-system", "monitoring", "shop"]);
    let keys: Vec<&str> = g.workloads.iter().map(|w| w.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "data/cache",
            "data/db",
            "kube-system/kube-dns",
            "monitoring/prometheus",
            "shop/api",
            "shop/frontend"
        ],
        "replicas are one workload, named by app.kubernetes.io/name, app or k8s-app"
    );
    let api = &g.workloads[4];
    assert_eq!(api.pods, ["shop/api-1", "shop/api-2"]);
    assert!(api.isolated_ingress && api.isolated_egress);
    assert!(
        !g.workloads[2].isolated_ingress,
        "kube-system has no policy"
    );

    let mut got = g.edges.clone();
    got.sort();
    let mut want = edges_from_simulate(&g, false);
    want.sort();
    assert_eq!(got, want);
    // What the manifests say, in words.
    let edge = |from: &str, to: &str| g.edges.iter().find(|e| e.from == from && e.to == to);
    assert!(
        edge("shop/api", "data/db").unwrap().partial,
        "only the writer may reach the db"
    );
    assert_eq!(
        edge("shop/frontend", "shop/frontend").unwrap().ports,
        ["8080/TCP"],
        "replicas talk to each other"
    );
    assert_eq!(
        edge("shop/frontend", "kube-system/kube-dns").unwrap().ports,
        ["53/TCP", "53/UDP"]
    );
    assert!(edge("shop/frontend", "data/db").is_none());
    assert!(
        edge("monitoring/prometheus", "kube-system/kube-dns").is_none(),
        "no policy judges it: not drawn"
    );

    // --open-flows draws those too, still the matrix.
    let g = json_graph(&["--open-flows"]);
    let mut got = g.edges.clone();
    got.sort();
    let mut want = edges_from_simulate(&g, true);
    want.sort();
    assert_eq!(got, want);
    assert!(g
        .edges
        .iter()
        .any(|e| e.from == "monitoring/prometheus" && e.to == "kube-system/kube-dns"));

    // --port judges every pair on that port alone.
    let g = json_graph(&["--port", "5432/TCP"]);
    let pairs: Vec<(&str, &str)> = g
        .edges
        .iter()
        .map(|e| (e.from.as_str(), e.to.as_str()))
        .collect();
    assert_eq!(pairs, [("shop/api", "data/db")]);
}

#[test]
fn dot_has_a_cluster_per_namespace_a_node_per_workload_and_an_edge_per_flow() {
    let g = json_graph(&[]);
    let dot = netpol_graph(&["-o", "dot"]);
    assert!(
        dot.starts_with("digraph netpol {\n") && dot.ends_with("}\n"),
        "{dot}"
    );
    assert_eq!(
        dot.matches('{').count(),
        dot.matches('}').count(),
        "balanced: {dot}"
    );
    let unquote = |s: &str| s.trim().trim_matches('"').to_string();
    let mut clusters = Vec::new();
    let mut nodes = BTreeMap::new();
    let mut edges = Vec::new();
    let mut current = None;
    for line in dot.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("subgraph \"cluster_") {
            let name = rest
                .trim_end_matches(" {")
                .trim_end_matches('"')
                .to_string();
            clusters.push(name.clone());
            current = Some(name);
        } else if t == "}" {
            current = None;
        } else if let Some((lhs, rest)) = t.split_once(" -> ") {
            let (rhs, attrs) = rest.split_once(" [").unwrap();
            let label = attrs
                .split("label=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            edges.push(Edge {
                from: unquote(lhs),
                to: unquote(rhs),
                ports: label.split(", ").map(str::to_string).collect(),
                partial: attrs.contains("style=dashed"),
            });
        } else if t.starts_with('"') && t.contains(" [label=") {
            let ns = current.clone().expect("nodes sit in a namespace cluster");
            nodes.insert(unquote(t.split(" [").next().unwrap()), ns);
        }
    }
    let names: Vec<String> = g.namespaces.iter().map(|n| n.name.clone()).collect();
    assert_eq!(clusters, names);
    for ns in &g.namespaces {
        for w in &ns.workloads {
            assert_eq!(
                nodes.get(w),
                Some(&ns.name),
                "{w} in its namespace's cluster"
            );
        }
    }
    assert_eq!(nodes.len(), g.workloads.len());
    assert_eq!(edges, g.edges);
}

fn attr(n: &roxmltree::Node, name: &str) -> String {
    n.attribute(name)
        .unwrap_or_else(|| panic!("{} has no {name}", n.tag_name().name()))
        .to_string()
}

fn num(n: &roxmltree::Node, name: &str) -> f32 {
    attr(n, name).parse().unwrap()
}

fn hex(color: &str) -> [u8; 3] {
    let c = color.trim_start_matches('#');
    let byte = |i: usize| u8::from_str_radix(&c[i..i + 2], 16).unwrap();
    [byte(0), byte(2), byte(4)]
}

#[test]
fn the_svg_holds_the_graph_and_renders_its_boxes_where_it_says() {
    check_svg(&shop(), &[], "netpol-graph-shop.png");
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo");
    check_svg(&demo, &["--open-flows"], "netpol-graph-demo.png");
}

/// The SVG of `netpol graph` on `manifests` holds the graph `-o json` describes, and
/// renders into `png` (under target/tmp) with its boxes where it says.
fn check_svg(manifests: &Path, args: &[&str], png: &str) {
    let g = json_graph_of(manifests, args);
    let svg = netpol_graph_of(manifests, args);
    let doc = roxmltree::Document::parse(&svg).expect("well-formed XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(
        root.tag_name().namespace(),
        Some("http://www.w3.org/2000/svg")
    );
    let class = |c: &'static str| {
        doc.descendants()
            .filter(move |n| n.attribute("class") == Some(c))
            .collect::<Vec<_>>()
    };

    let namespaces = class("namespace");
    let names: Vec<String> = namespaces
        .iter()
        .map(|n| attr(n, "data-namespace"))
        .collect();
    assert_eq!(
        names,
        g.namespaces
            .iter()
            .map(|n| n.name.clone())
            .collect::<Vec<_>>()
    );
    let workloads = class("workload");
    assert_eq!(workloads.len(), g.workloads.len());
    for (node, w) in workloads.iter().zip(&g.workloads) {
        assert_eq!(attr(node, "data-workload"), w.key);
        assert_eq!(attr(node, "data-pods"), w.pods.len().to_string());
        let isolated = match (w.isolated_ingress, w.isolated_egress) {
            (false, false) => "none",
            (true, false) => "ingress",
            (false, true) => "egress",
            (true, true) => "ingress egress",
        };
        assert_eq!(attr(node, "data-isolated"), isolated);
        let texts: Vec<&str> = node.descendants().filter_map(|t| t.text()).collect();
        assert!(
            texts.iter().any(|t| w.key.ends_with(&format!("/{t}"))),
            "{texts:?}"
        );
    }
    // Every workload box lies inside its namespace's box.
    let boxes = |c: &'static str| -> Vec<(String, [f32; 4])> {
        class(c)
            .iter()
            .map(|r| {
                let owner = r.parent().unwrap();
                let name = owner
                    .attribute("data-namespace")
                    .or(owner.attribute("data-workload"))
                    .unwrap()
                    .to_string();
                (
                    name,
                    [num(r, "x"), num(r, "y"), num(r, "width"), num(r, "height")],
                )
            })
            .collect()
    };
    let ns_boxes: BTreeMap<String, [f32; 4]> = boxes("namespace-box").into_iter().collect();
    let wl_boxes = boxes("workload-box");
    for (w, [x, y, wd, h]) in &wl_boxes {
        let [nx, ny, nw, nh] = ns_boxes[w.split('/').next().unwrap()];
        assert!(
            *x > nx && *y > ny && x + wd < nx + nw && y + h < ny + nh,
            "{w} inside its namespace"
        );
    }

    let edges: Vec<Edge> = class("edge")
        .iter()
        .map(|n| {
            let path = n
                .children()
                .find(|c| c.attribute("class") == Some("edge-line"))
                .unwrap();
            assert!(
                attr(&path, "marker-end").starts_with("url(#arrow"),
                "an arrowhead"
            );
            assert!(attr(&path, "d").starts_with("M "), "a path");
            Edge {
                from: attr(n, "data-from"),
                to: attr(n, "data-to"),
                ports: attr(n, "data-ports")
                    .split(", ")
                    .map(str::to_string)
                    .collect(),
                partial: attr(n, "data-partial") == "true",
            }
        })
        .collect();
    assert_eq!(edges, g.edges);
    let labels: Vec<String> = class("edge-label")
        .iter()
        .map(|n| n.descendants().find_map(|t| t.text()).unwrap().to_string())
        .collect();
    assert_eq!(
        labels,
        g.edges
            .iter()
            .map(|e| e.ports.join(", "))
            .collect::<Vec<_>>()
    );
    assert_eq!(class("legend").len(), 1);

    // Rendered: resvg, with the system's fonts.
    let mut options = usvg::Options::default();
    options.fontdb_mut().load_system_fonts();
    let fonts = options.fontdb.len();
    let tree = usvg::Tree::from_str(&svg, &options).expect("resvg reads it");
    let size = tree.size().to_int_size();
    assert_eq!(
        (size.width() as f32, size.height() as f32),
        (num(&root, "width"), num(&root, "height"))
    );
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height()).unwrap();
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    let png = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(png);
    pixmap.save_png(&png).unwrap();
    eprintln!("picture: {}", png.display());

    let rgb = |x: f32, y: f32| {
        let p = pixmap
            .pixel(x as u32, y as u32)
            .expect("inside the picture");
        assert_eq!(p.alpha(), 255, "opaque background");
        [p.red(), p.green(), p.blue()]
    };
    let white = [255, 255, 255];
    let inked = (0..size.height())
        .flat_map(|y| (0..size.width()).map(move |x| (x, y)))
        .filter(|(x, y)| rgb(*x as f32, *y as f32) != white)
        .count();
    let total = (size.width() * size.height()) as usize;
    assert!(inked * 10 > total, "{inked} of {total} pixels drawn");
    // Each box is where the SVG puts it: its fill inside, its stroke on its edge.
    for (c, fill_of) in [("namespace-box", "fill"), ("workload-box", "fill")] {
        for r in class(c) {
            let [x, y, w, h] = [
                num(&r, "x"),
                num(&r, "y"),
                num(&r, "width"),
                num(&r, "height"),
            ];
            let (fill, stroke) = (hex(&attr(&r, fill_of)), hex(&attr(&r, "stroke")));
            assert_eq!(
                rgb(x + w - 9.0, y + h - 9.0),
                fill,
                "{c} at {x},{y}: fill inside"
            );
            assert_eq!(rgb(x, y + h / 2.0), stroke, "{c} at {x},{y}: its left edge");
            assert_eq!(
                rgb(x + w - 1.0, y + h / 2.0 + 3.0),
                stroke,
                "{c} at {x},{y}: its right edge"
            );
            assert_eq!(
                rgb(x - 4.0, y + 12.0),
                if c == "workload-box" {
                    [0xf1, 0xf5, 0xf9]
                } else {
                    white
                },
                "{c} at {x},{y}: outside"
            );
        }
    }
    // The names are written in the boxes (when the machine has fonts).
    if fonts > 0 {
        for r in class("workload-box") {
            let [x, y] = [num(&r, "x"), num(&r, "y")];
            let fill = hex(&attr(&r, "fill"));
            let dark = (0..60)
                .flat_map(|dx| (8..22).map(move |dy| (dx, dy)))
                .filter(|(dx, dy)| {
                    let p = rgb(x + 10.0 + *dx as f32, y + *dy as f32);
                    p != fill && p.iter().map(|c| *c as u32).sum::<u32>() < 300
                })
                .count();
            assert!(dark > 20, "a name in the box at {x},{y}");
        }
    } else {
        eprintln!("no system fonts: text not checked");
    }
}
