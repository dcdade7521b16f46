//! The throughput chart: one panel per thread count (top to bottom), one group of
//! bars per workload (left to right), one bar per system, on a log scale with a
//! grid line at each power of ten. It has no text, so it needs no font: the
//! legend is a text file next to it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::{Cell, System, Workload};
use crate::BenchResult;

const WIDTH: u32 = 1200;
const PANEL_HEIGHT: u32 = 300;
const MARGIN: i32 = 20;
/// The log scale's range: 10^LOW to 10^HIGH operations per second.
const LOW: f64 = 2.0;
const HIGH: f64 = 8.0;

/// A colour per system, in the order systems are listed (Tableau 10).
const COLOURS: [(u8, u8, u8); 5] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
];

/// Draws the chart at `path` and its legend at `<path>.legend.txt`; the legend's
/// path.
pub(super) fn draw(
    path: &Path,
    cells: &[Cell],
    workloads: &[Workload],
    systems: &[System],
    threads: &[usize],
) -> BenchResult<PathBuf> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let height = PANEL_HEIGHT * threads.len().max(1) as u32;
    {
        let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let panels = root.split_evenly((threads.len().max(1), 1));
        let grey = RGBColor(210, 210, 210);
        for (panel, &t) in panels.iter().zip(threads) {
            let (w, h) = panel.dim_in_pixel();
            let (w, h) = (w as i32, h as i32);
            let (left, right, top, bottom) = (MARGIN, w - MARGIN, MARGIN, h - MARGIN);
            let y_of = |ops: f64| {
                let level = ops.max(1.0).log10().clamp(LOW, HIGH);
                bottom - ((level - LOW) / (HIGH - LOW) * f64::from(bottom - top)) as i32
            };
            for decade in LOW as i32..=HIGH as i32 {
                let y = y_of(10f64.powi(decade));
                panel.draw(&PathElement::new(vec![(left, y), (right, y)], grey))?;
            }
            panel.draw(&PathElement::new(
                vec![(left, bottom), (right, bottom)],
                BLACK,
            ))?;
            let group = (right - left) / workloads.len().max(1) as i32;
            let bar = group / (systems.len() as i32 + 1);
            for (g, workload) in workloads.iter().enumerate() {
                for (s, system) in systems.iter().enumerate() {
                    let Some(cell) = cells.iter().find(|c| {
                        c.workload == workload.letter()
                            && c.system == system.name()
                            && c.threads == t
                    }) else {
                        continue;
                    };
                    let x0 = left + g as i32 * group + bar / 2 + s as i32 * bar;
                    let (r, gr, b) = COLOURS[s % COLOURS.len()];
                    panel.draw(&Rectangle::new(
                        [(x0, y_of(cell.ops_per_sec)), (x0 + bar - 2, bottom)],
                        RGBColor(r, gr, b).filled(),
                    ))?;
                }
            }
        }
        root.present()?;
    }
    let legend_path = PathBuf::from(format!("{}.legend.txt", path.display()));
    std::fs::write(&legend_path, legend(workloads, systems, threads))?;
    Ok(legend_path)
}

/// What the chart shows, in words.
fn legend(workloads: &[Workload], systems: &[System], threads: &[usize]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "YCSB throughput (operations per second), log scale: grey lines at 10^{} (bottom) \
         to 10^{} (top), one per power of ten.",
        LOW as i32, HIGH as i32
    );
    let _ = writeln!(
        out,
        "Panels, top to bottom: {} client thread(s).",
        threads
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        out,
        "Groups, left to right: workload {}.",
        workloads
            .iter()
            .map(|w| w.letter().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(out, "Bars in each group, left to right:");
    for (s, system) in systems.iter().enumerate() {
        let (r, g, b) = COLOURS[s % COLOURS.len()];
        let _ = writeln!(out, "  #{r:02x}{g:02x}{b:02x}  {}", system.name());
    }
    out
}
