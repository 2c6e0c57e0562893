//! Ratio charts as SVG: for each metric, one horizontal bar per peer,
//! Sluice's figure over the peer's, drawn against a line at 1.0. Green
//! where Sluice is better (below 1.0 for costs, above for rates), red
//! where it is worse, grey where the run has no figure. Written beside the
//! benchmarks' tables so the performance page can show the latest run.
//!
//! Plain text out, no dependency: an SVG is a small XML document.

use std::fmt::Write as _;

/// One metric: its name, whether lower is better, and per peer the ratio
/// (Sluice / peer), `None` when the run has no figure for one side.
#[derive(Debug, Clone)]
pub struct Group {
    pub metric: String,
    pub lower_is_better: bool,
    pub ratios: Vec<(String, Option<f64>)>,
}

const WIDTH: f64 = 760.0;
const LABEL_W: f64 = 300.0;
const BAR_H: f64 = 14.0;
const GAP: f64 = 10.0;
const TOP: f64 = 52.0;

/// Escapes text for XML character data and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The scale never goes past this: one far-off ratio would flatten every
/// other bar. A bar past it is drawn to the edge, its value written.
const MAX_SCALE: f64 = 3.0;

/// The chart: `title` on top, `note` under it (e.g. which run), then the
/// groups. The scale runs from 0 to the largest ratio shown, at least 2.0
/// and at most [`MAX_SCALE`].
pub fn ratio_chart(title: &str, note: &str, groups: &[Group]) -> String {
    let max = groups
        .iter()
        .flat_map(|g| g.ratios.iter().filter_map(|(_, r)| *r))
        .filter(|r| r.is_finite())
        .fold(2.0_f64, f64::max)
        .min(MAX_SCALE);
    let plot_w = WIDTH - LABEL_W - 70.0;
    let x = |r: f64| LABEL_W + plot_w * (r / max).clamp(0.0, 1.0);
    let rows: usize = groups.iter().map(|g| g.ratios.len()).sum();
    let height = TOP + rows as f64 * (BAR_H + 2.0) + groups.len() as f64 * (GAP + BAR_H) + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height:.0}\" viewBox=\"0 0 {WIDTH} {height:.0}\" font-family=\"sans-serif\" font-size=\"11\">"
    );
    let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(
        s,
        "<text x=\"10\" y=\"20\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        escape(title)
    );
    let _ = writeln!(s, "<text x=\"10\" y=\"38\" fill=\"#555\">{}</text>", escape(note));
    let mut y = TOP;
    for g in groups {
        let _ = writeln!(
            s,
            "<text x=\"10\" y=\"{:.1}\" font-weight=\"bold\">{}</text>",
            y + BAR_H - 3.0,
            escape(&g.metric)
        );
        y += BAR_H;
        for (peer, r) in &g.ratios {
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                LABEL_W - 6.0,
                y + BAR_H - 3.0,
                escape(&format!("Sluice / {peer}"))
            );
            match r.filter(|r| r.is_finite()) {
                Some(r) => {
                    let better = if g.lower_is_better { r < 1.0 } else { r > 1.0 };
                    let colour = if (r - 1.0).abs() < f64::EPSILON {
                        "#888"
                    } else if better {
                        "#2e7d32"
                    } else {
                        "#c62828"
                    };
                    let _ = writeln!(
                        s,
                        "<rect x=\"{LABEL_W}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{BAR_H}\" fill=\"{colour}\"/>",
                        x(r) - LABEL_W
                    );
                    let _ = writeln!(
                        s,
                        "<text x=\"{:.1}\" y=\"{:.1}\">{}{r:.2}</text>",
                        x(r) + 4.0,
                        y + BAR_H - 3.0,
                        if r > max { "▶ " } else { "" }
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#888\">not measured</text>",
                        LABEL_W + 4.0,
                        y + BAR_H - 3.0
                    );
                }
            }
            y += BAR_H + 2.0;
        }
        y += GAP;
    }
    let one = x(1.0);
    let _ = writeln!(
        s,
        "<line x1=\"{one:.1}\" y1=\"{:.1}\" x2=\"{one:.1}\" y2=\"{:.1}\" stroke=\"black\" stroke-dasharray=\"4 3\"/>",
        TOP - 6.0,
        y
    );
    let _ = writeln!(
        s,
        "<text x=\"{one:.1}\" y=\"{:.1}\" text-anchor=\"middle\">1.0 (equal)</text>",
        y + 14.0
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    fn group(lower: bool, ratios: &[(&str, Option<f64>)]) -> Group {
        Group {
            metric: "CPU <per> conn & more".into(),
            lower_is_better: lower,
            ratios: ratios.iter().map(|(p, r)| ((*p).to_owned(), *r)).collect(),
        }
    }

    /// The `width` of every bar, in order.
    fn widths(svg: &str) -> Vec<f64> {
        svg.split("<rect x=")
            .skip(1)
            .map(|r| {
                let w = r.split("width=\"").nth(1).unwrap();
                w[..w.find('"').unwrap()].parse().unwrap()
            })
            .collect()
    }

    #[test]
    fn bars_are_proportional_and_coloured_by_who_wins() {
        let svg = ratio_chart(
            "t",
            "n",
            &[
                group(true, &[("nginx", Some(0.5)), ("haproxy", Some(1.5))]),
                group(false, &[("nginx", Some(1.5)), ("envoy", None)]),
            ],
        );
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        let w = widths(&svg);
        assert_eq!(w.len(), 3, "{svg}");
        assert!((w[1] / w[0] - 3.0).abs() < 0.01, "{w:?}");
        // Lower is better: 0.5 wins (green), 1.5 loses (red); a rate of 1.5 wins.
        let fills: Vec<&str> = svg
            .split("<rect x=")
            .skip(1)
            .map(|r| r.split("fill=\"").nth(1).unwrap().split('"').next().unwrap())
            .collect();
        assert_eq!(fills, ["#2e7d32", "#c62828", "#2e7d32"]);
        assert!(svg.contains("not measured"));
        assert!(svg.contains(">0.50<") && svg.contains(">1.50<"));
    }

    #[test]
    fn the_scale_grows_past_two_up_to_three_and_text_is_escaped() {
        let svg = ratio_chart("a & b", "<run>", &[group(true, &[("x", Some(2.5)), ("y", Some(1.25))])]);
        let w = widths(&svg);
        assert!((w[0] / w[1] - 2.0).abs() < 0.01, "{w:?}");
        // One far-off ratio is drawn to the edge, not allowed to flatten the rest.
        let svg = ratio_chart("t", "n", &[group(true, &[("x", Some(20.0)), ("y", Some(1.5))])]);
        let w = widths(&svg);
        assert!((w[0] / w[1] - 2.0).abs() < 0.01, "{w:?}");
        assert!(svg.contains(">▶ 20.00<"), "{svg}");
        let svg = ratio_chart("a & b", "<run>", &[group(true, &[("x", Some(2.5))])]);
        assert!(svg.contains("a &amp; b") && svg.contains("&lt;run&gt;"));
        assert!(svg.contains("CPU &lt;per&gt; conn &amp; more"));
        assert!(!svg.contains("<per>"));
        // Every element opened is closed: as many `<text` as `</text>`.
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
    }

    #[test]
    fn an_empty_or_non_finite_run_still_draws() {
        let svg = ratio_chart("t", "n", &[group(true, &[("x", Some(f64::NAN))])]);
        assert!(svg.contains("not measured"));
        assert!(widths(&svg).is_empty());
    }
}
