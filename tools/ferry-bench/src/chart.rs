//! PNG bar charts of a run: per workload, one bar per [`Variant`] (ferry hints off/on, QEMU
//! without and with free-page-hint), for bytes sent and for total time.
//!
//! Text needs a TrueType font: [`FONT_PATHS`] (Debian's `fonts-dejavu-core`, installed by
//! scripts/setup.sh). Without one the charts are still drawn, without any text.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use thiserror::Error;

use crate::results::{Medians, Results, Variant, Workload};

/// Fonts tried in order; the first that loads is used for every chart.
pub const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];
const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (960, 540);
const MARGIN_LEFT: i32 = 90;
const MARGIN_RIGHT: i32 = 20;
const MARGIN_TOP: i32 = 60;
const MARGIN_BOTTOM: i32 = 100;

/// Why a chart could not be written.
#[derive(Debug, Error)]
pub enum ChartError {
    /// Drawing or encoding the PNG failed.
    #[error("cannot draw {path}: {message}")]
    Draw {
        /// The PNG file.
        path: PathBuf,
        /// The backend's error.
        message: String,
    },
    /// Nothing to draw: no case has samples.
    #[error("no measurements to chart")]
    Empty,
}

/// Which metric a chart shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Bytes sent, in MiB.
    Bytes,
    /// Total migration time, in seconds.
    Time,
}

impl Metric {
    fn title(self) -> &'static str {
        match self {
            Self::Bytes => "Bytes sent per migration (MiB, median)",
            Self::Time => "Total migration time (s, median)",
        }
    }

    fn value(self, m: &Medians) -> f64 {
        match self {
            Self::Bytes => m.bytes / f64::from(1 << 20),
            Self::Time => m.total_ms / 1000.0,
        }
    }
}

fn color(v: Variant) -> RGBColor {
    match v {
        Variant::FerryOff => RGBColor(158, 202, 225),
        Variant::FerryOn => RGBColor(33, 113, 181),
        Variant::QemuOff => RGBColor(253, 174, 107),
        Variant::QemuHint => RGBColor(217, 72, 1),
        Variant::FerryZstd => RGBColor(8, 48, 107),
        Variant::QemuZstd => RGBColor(127, 39, 4),
    }
}

/// Registers the first usable font of [`FONT_PATHS`] once; true if there is one.
fn font_loaded() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        FONT_PATHS.iter().any(|path| {
            let Ok(bytes) = std::fs::read(path) else {
                return false;
            };
            // Registered fonts must live for the whole process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font(FAMILY, FontStyle::Normal, bytes).is_ok()
        })
    })
}

/// A round step (1, 2 or 5 times a power of ten) giving about five grid lines up to `max`.
pub fn tick_step(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / 5.0;
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power)
}

/// Writes `build/bench/bytes.png` and `time.png` style charts into `dir`; returns their paths.
pub fn write_charts(results: &Results, dir: &Path) -> Result<Vec<PathBuf>, ChartError> {
    let mut written = Vec::new();
    for (metric, name) in [(Metric::Bytes, "bytes.png"), (Metric::Time, "time.png")] {
        let path = dir.join(name);
        draw(results, metric, &path)?;
        written.push(path);
    }
    Ok(written)
}

/// Draws one chart into `path` (PNG).
pub fn draw(results: &Results, metric: Metric, path: &Path) -> Result<(), ChartError> {
    let workloads: Vec<Workload> = Workload::ALL
        .into_iter()
        .filter(|&w| {
            Variant::ALL
                .iter()
                .any(|&v| results.medians(w, v).is_some())
        })
        .collect();
    if workloads.is_empty() {
        return Err(ChartError::Empty);
    }
    let variants = results.variants_run();
    let fail = |e: &dyn std::fmt::Display| ChartError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
    }
    let text = font_loaded();
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let (w, h) = (SIZE.0 as i32, SIZE.1 as i32);
    let (left, right, top, bottom) = (MARGIN_LEFT, w - MARGIN_RIGHT, MARGIN_TOP, h - MARGIN_BOTTOM);

    let max = workloads
        .iter()
        .flat_map(|&wl| variants.iter().map(move |&v| results.medians(wl, v)))
        .flatten()
        .map(|m| metric.value(&m))
        .fold(0.0, f64::max);
    let step = tick_step(max);
    let top_value = ((max / step).floor() + 1.0) * step;
    let y_of = |v: f64| bottom - ((v / top_value) * f64::from(bottom - top)).round() as i32;

    let label = |size: f64, pos: Pos| {
        TextStyle::from((FAMILY, size).into_font())
            .color(&BLACK)
            .pos(pos)
    };
    let grid = RGBColor(220, 220, 220);
    let mut tick = 0.0;
    while tick <= top_value + step / 2.0 {
        let y = y_of(tick);
        root.draw(&PathElement::new(vec![(left, y), (right, y)], grid))
            .map_err(|e| fail(&e))?;
        if text {
            let style = label(14.0, Pos::new(HPos::Right, VPos::Center));
            root.draw_text(&format_value(tick), &style, (left - 8, y))
                .map_err(|e| fail(&e))?;
        }
        tick += step;
    }
    root.draw(&PathElement::new(
        vec![(left, top), (left, bottom), (right, bottom)],
        BLACK,
    ))
    .map_err(|e| fail(&e))?;

    let group = f64::from(right - left) / workloads.len() as f64;
    let bar = group * 0.8 / variants.len() as f64;
    for (i, &wl) in workloads.iter().enumerate() {
        let x0 = f64::from(left) + group * i as f64 + group * 0.1;
        for (j, &v) in variants.iter().enumerate() {
            let (bx0, bx1) = (
                (x0 + bar * j as f64).round() as i32,
                (x0 + bar * (j as f64 + 1.0)).round() as i32 - 2,
            );
            let Some(m) = results.medians(wl, v) else {
                if text {
                    let style = label(13.0, Pos::new(HPos::Center, VPos::Bottom));
                    root.draw_text("n/a", &style, ((bx0 + bx1) / 2, bottom - 3))
                        .map_err(|e| fail(&e))?;
                }
                continue;
            };
            let value = metric.value(&m);
            let y = y_of(value);
            root.draw(&Rectangle::new(
                [(bx0, y), (bx1, bottom)],
                color(v).filled(),
            ))
            .map_err(|e| fail(&e))?;
            if text {
                let style = label(13.0, Pos::new(HPos::Center, VPos::Bottom));
                root.draw_text(&format_value(value), &style, ((bx0 + bx1) / 2, y - 3))
                    .map_err(|e| fail(&e))?;
            }
        }
        if text {
            let style = label(18.0, Pos::new(HPos::Center, VPos::Top));
            let center = (f64::from(left) + group * (i as f64 + 0.5)).round() as i32;
            root.draw_text(wl.name(), &style, (center, bottom + 8))
                .map_err(|e| fail(&e))?;
        }
    }

    // Legend: a swatch per variant along the bottom.
    let slot = (right - left) / variants.len() as i32;
    for (j, &v) in variants.iter().enumerate() {
        let x = left + slot * j as i32 + 20;
        let y = h - 40;
        root.draw(&Rectangle::new(
            [(x, y - 8), (x + 16, y + 8)],
            color(v).filled(),
        ))
        .map_err(|e| fail(&e))?;
        if text {
            let style = label(15.0, Pos::new(HPos::Left, VPos::Center));
            root.draw_text(v.label(), &style, (x + 24, y))
                .map_err(|e| fail(&e))?;
        }
    }
    if text {
        let style = label(20.0, Pos::new(HPos::Center, VPos::Top));
        let title = format!(
            "{} - guest {} MiB, {}",
            metric.title(),
            results.setup.memory_mib,
            results.setup.host
        );
        root.draw_text(&title, &style, (w / 2, 15))
            .map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))
}

/// Short number for a label: no decimals from 100 up, one below.
fn format_value(v: f64) -> String {
    if v >= 100.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::canned;

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(1000.0), 200.0);
        assert_eq!(tick_step(9.0), 2.0);
        assert_eq!(tick_step(51.0), 20.0);
        assert_eq!(tick_step(0.0), 1.0);
    }

    #[test]
    fn charts_are_pngs_of_the_canned_results() {
        let dir = std::env::temp_dir().join(format!("ferry-bench-charts-{}", std::process::id()));
        let paths = write_charts(&canned(), &dir).unwrap();
        assert_eq!(paths.len(), 2);
        for path in &paths {
            let bytes = std::fs::read(path).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
            assert!(bytes.len() > 2000, "{} is too small", path.display());
        }
        let empty = Results {
            cases: Vec::new(),
            ..canned()
        };
        assert!(matches!(write_charts(&empty, &dir), Err(ChartError::Empty)));
        if std::env::var_os("FERRY_BENCH_KEEP_CHARTS").is_none() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
