//! The report: one JSON document (`report.json`, schema `netpol-bench/1`) and the same
//! numbers as Markdown (`report.md`), with the charts `plot.rs` draws beside them.
//!
//! Every enforced figure is paired with the baseline (`none`) run of the same round:
//! `ratio` is the mean of the rounds' value / baseline with its 95 % bootstrap interval
//! (`ratio_ci`), and for latencies `added_us` the mean of value − baseline. `targets`
//! judges the run against the goals (met, missed, too wide to judge).

use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::plan::{Plan, Scenario};

pub const SCHEMA: &str = "netpol-bench/1";

mod figures;
mod markdown;
pub mod targets;

pub use figures::{
    percentile, AgentMemory, AgentRun, Block, Control, Datapath, DeniedCheck, Dist, Events,
    EventsRun, Heap, KubeRun, Machine, Packet, PacketPoint, Stat, Update, UpdatePoint, Variant,
    METRICS,
};

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub command: String,
    pub testbed: String,
    pub machine: Machine,
    pub started_unix: u64,
    pub seconds: f64,
    pub plan: Plan,
    pub scenarios: Vec<Scenario>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datapath: Option<Datapath>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update: Option<Update>,
    /// Enforcers of the update scenario's labs, after it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lab_agents: Vec<AgentMemory>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control: Option<Control>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Events>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packet: Option<Packet>,
    pub charts: Vec<String>,
    /// The goals this run is judged against.
    pub targets: Vec<targets::Target>,
    /// What this testbed skipped or measures differently (the kind testbed's).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(plan: &Plan, scenarios: &[Scenario], args: &[String], testbed: &str) -> Report {
        // What a reader would type: the scenarios and --quick (xtask adds the paths).
        let mut command = String::from("cargo xtask bench");
        let mut skip = false;
        for a in args {
            if std::mem::take(&mut skip) {
                continue;
            }
            if matches!(
                a.as_str(),
                "--out" | "--compile-json" | "--testbed" | "--page"
            ) {
                skip = true;
                continue;
            }
            command.push(' ');
            command.push_str(a);
        }
        if testbed == "kind" {
            command = command.replacen("cargo xtask bench", "cargo xtask kind --bench", 1);
        }
        Report {
            schema: SCHEMA,
            command,
            testbed: testbed.into(),
            machine: Machine::here(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            seconds: 0.0,
            plan: plan.clone(),
            scenarios: scenarios.to_vec(),
            datapath: None,
            update: None,
            lab_agents: vec![],
            control: None,
            events: None,
            packet: None,
            charts: vec![],
            targets: vec![],
            notes: vec![],
        }
    }

    pub fn write(&mut self, dir: &Path) -> anyhow::Result<()> {
        self.targets = targets::judge(self);
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        Ok(())
    }

    /// The project's benchmark page (`docs/benchmarks.md`), whole: the method, then this
    /// run's report, its charts copied from `dir` into a directory named after the page.
    pub fn write_document(&self, dir: &Path, page: &Path) -> anyhow::Result<()> {
        let stem = page
            .file_stem()
            .and_then(|s| s.to_str())
            .context("a page name")?;
        let charts = page.with_file_name(stem);
        std::fs::create_dir_all(&charts)?;
        // Charts of an earlier run that this one did not draw would pass for its own.
        for old in std::fs::read_dir(&charts)?.flatten() {
            let name = old.file_name().to_string_lossy().into_owned();
            if name.ends_with(".png") && !self.charts.contains(&name) {
                std::fs::remove_file(old.path())?;
            }
        }
        for c in &self.charts {
            std::fs::copy(dir.join(c), charts.join(c))
                .with_context(|| format!("copying the chart {c}"))?;
        }
        let report = self.markdown_with(&format!("{stem}/"));
        // The report's own title gives way to the page's: it is a section here.
        let report = report.replacen("# netpol benchmark report", "## This run", 1);
        std::fs::write(page, format!("{METHOD}\n{}", demote(&report)))
            .with_context(|| format!("writing {}", page.display()))
    }
}

/// The page's fixed text: what is measured and how.
const METHOD: &str = include_str!("report/method.md");

/// Headings one level down (`## x` → `### x`), but for the first, already a section.
fn demote(md: &str) -> String {
    let mut out = String::new();
    for (i, line) in md.lines().enumerate() {
        if i > 0 && line.starts_with('#') {
            out.push('#');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}
