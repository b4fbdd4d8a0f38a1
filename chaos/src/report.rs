//! The drill report: the JSON journal and one self-contained HTML page
//! (inline SVG and CSS, no script, nothing fetched), plus the terminal
//! summary.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::checkers::Status;
use crate::runner::Journal;

fn esc(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn ms(value: Option<u64>) -> String {
    value.map(|v| format!("{v} ms")).unwrap_or_else(|| "—".into())
}

/// Writes `journal.json` and `report.html` into `dir`; returns their paths.
pub fn write(journal: &Journal, dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let json = dir.join("journal.json");
    std::fs::write(&json, serde_json::to_vec_pretty(journal)?)?;
    let html = dir.join("report.html");
    std::fs::write(&html, html_page(journal))?;
    Ok((json, html))
}

/// One line of a chart: (name, colour, (t_ms, value) points).
type Line<'a> = (&'a str, &'a str, Vec<(u64, f64)>);

/// One chart: a line per series over the drill's time, fault windows shaded.
fn chart(journal: &Journal, title: &str, unit: &str, lines: &[Line<'_>]) -> String {
    let (w, h, left, bottom) = (900.0, 220.0, 60.0, 30.0);
    let end = journal.series.last().map(|p| p.t_ms + crate::runner::BUCKET_MS).unwrap_or(1).max(1) as f64;
    let top = lines.iter().flat_map(|(_, _, pts)| pts.iter().map(|p| p.1)).fold(0.0f64, f64::max).max(1.0) * 1.1;
    let x = |t: f64| left + t / end * (w - left - 10.0);
    let y = |v: f64| (h - bottom) - v / top * (h - bottom - 10.0);
    let mut svg = format!(
        "<svg viewBox=\"0 0 {w} {h}\" width=\"100%\" role=\"img\" aria-label=\"{}\"><rect x=\"{left}\" y=\"0\" \
         width=\"{}\" height=\"{}\" fill=\"#fafafa\"/>",
        esc(title),
        w - left - 10.0,
        h - bottom
    );
    for f in &journal.faults {
        let (a, b) = (x(f.start_ms as f64), x(f.end_ms.max(f.start_ms + 100) as f64));
        let _ = write!(
            svg,
            "<rect x=\"{a:.1}\" y=\"0\" width=\"{:.1}\" height=\"{}\" fill=\"#f4a3a3\" opacity=\"0.45\"><title>step {} \
             {:?}: {}–{} ms</title></rect>",
            (b - a).max(2.0),
            h - bottom,
            f.step,
            f.fault,
            f.start_ms,
            f.end_ms
        );
    }
    let (m0, m1) = journal.method_window_ms;
    let _ = write!(
        svg,
        "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"0\" y2=\"{2}\" stroke=\"#888\" stroke-dasharray=\"4\"/><line \
         x1=\"{1:.1}\" x2=\"{1:.1}\" y1=\"0\" y2=\"{2}\" stroke=\"#888\" stroke-dasharray=\"4\"/>",
        x(m0 as f64),
        x(m1 as f64),
        h - bottom
    );
    for i in 0..=4 {
        let v = top / 4.0 * i as f64;
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{v:.0}</text>",
            left - 4.0,
            y(v) + 4.0
        );
    }
    let step_s = ((end / 1000.0 / 10.0).ceil() as u64).max(1);
    let mut t = 0;
    while (t * 1000) as f64 <= end {
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{t}s</text>",
            x((t * 1000) as f64),
            h - 10.0
        );
        t += step_s;
    }
    for (name, color, pts) in lines {
        let path: Vec<String> = pts.iter().map(|(t, v)| format!("{:.1},{:.1}", x(*t as f64), y(*v))).collect();
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"><title>{}</title></polyline>",
            path.join(" "),
            esc(name)
        );
    }
    svg.push_str("</svg>");
    let legend: Vec<String> =
        lines.iter().map(|(name, color, _)| format!("<span style=\"color:{color}\">■</span> {}", esc(name))).collect();
    format!(
        "<h3>{}</h3><div class=\"legend\">{} ({unit}); shaded: fault windows; dashed: the method</div>{svg}",
        esc(title),
        legend.join(" &nbsp; ")
    )
}

pub fn html_page(journal: &Journal) -> String {
    let per_s = 1000.0 / crate::runner::BUCKET_MS as f64;
    let ok: Vec<(u64, f64)> = journal.series.iter().map(|p| (p.t_ms, p.ok as f64 * per_s)).collect();
    let unknown: Vec<(u64, f64)> = journal.series.iter().map(|p| (p.t_ms, p.unknown as f64 * per_s)).collect();
    let refused: Vec<(u64, f64)> = journal.series.iter().map(|p| (p.t_ms, p.refused as f64 * per_s)).collect();
    let p50: Vec<(u64, f64)> = journal.series.iter().map(|p| (p.t_ms, p.p50_ms)).collect();
    let p99: Vec<(u64, f64)> = journal.series.iter().map(|p| (p.t_ms, p.p99_ms)).collect();
    let verdict = if journal.passed() { "<b class=\"pass\">PASSED</b>" } else { "<b class=\"fail\">FAILED</b>" };
    let mut page = String::new();
    let _ = write!(
        page,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>drill {name}</title><style>body{{font-family:sans-serif;\
         max-width:960px;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px \
         solid #ccc;padding:3px 8px;text-align:left;font-size:14px}}.pass{{color:#176b2c}}.fail{{color:#b00020}}\
         .unknown{{color:#a06000}}code{{background:#f0f0f0;padding:2px 4px}}.legend{{font-size:13px}}</style></head><body>\
         <h1>Drill {name}: {verdict}</h1><p>{desc}</p><p>Seed {seed}; started {started} (unix ms); blast radius: cells \
         {radius:?}.</p><p>Replay: <code>{replay}</code></p>",
        name = esc(&journal.drill.name),
        desc = esc(&journal.drill.description),
        seed = journal.seed,
        started = journal.started_at_unix_ms,
        radius = journal.blast_radius,
        replay = esc(&journal.replay),
    );
    if let Some(why) = &journal.aborted {
        let _ = write!(page, "<p class=\"fail\"><b>Aborted:</b> {}</p>", esc(why));
    }
    let _ = write!(
        page,
        "<p>{} operations ({} reads), {} acknowledged, {} unknown writes (resolved {}); acknowledged operations lost \
         (RPO): <b>{}</b>. Heal verified: {}.</p>",
        journal.operations,
        journal.reads,
        journal.acknowledged,
        journal.unknown,
        journal.resolved,
        journal.rpo_lost,
        journal.heal_verified
    );
    if !journal.lost_cells.is_empty() {
        let _ = write!(
            page,
            "<p>Lost for good (never restarted, not compared): cells {:?}; their pairs were checked on their other \
             cell.</p>",
            journal.lost_cells
        );
    }
    page.push_str(&chart(
        journal,
        "Throughput",
        "operations/s",
        &[("acknowledged", "#1f77b4", ok), ("refused", "#9467bd", refused), ("unknown", "#d62728", unknown)],
    ));
    page.push_str(&chart(
        journal,
        "Latency of acknowledged operations",
        "ms",
        &[("p50", "#2ca02c", p50), ("p99", "#ff7f0e", p99)],
    ));
    page.push_str("<h2>Faults</h2><table><tr><th>step</th><th>fault</th><th>targets</th><th>window (ms)</th><th>RTO</th><th>detection</th><th>promotion</th><th>route switch</th><th>first success</th></tr>");
    for f in &journal.faults {
        let fo = f.failover.clone().unwrap_or_default();
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{:?}</td><td>{}</td><td>{}–{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            f.step,
            f.fault,
            esc(&f.targets.join(", ")),
            f.start_ms,
            f.end_ms,
            ms(f.rto_ms),
            ms(fo.detection_ms),
            ms(fo.promotion_ms),
            ms(fo.route_switch_ms),
            ms(fo.first_success_ms),
        );
    }
    page.push_str("</table><p>Failover columns are filled when the fault moved the pair to its other cell; times are from the fault's start.</p>");
    page.push_str(&credit_delay_html(journal));
    page.push_str("<h2>Checkers</h2><table><tr><th>checker</th><th>verdict</th><th>offenses</th><th>first</th><th>worst</th><th>last</th></tr>");
    for v in &journal.verdicts {
        let class = match v.status {
            Status::Pass => "pass",
            Status::Fail => "fail",
            Status::Unknown => "unknown",
        };
        let show = |o: &Option<crate::checkers::Offense>| {
            o.as_ref().map(|o| esc(&format!("#{} {}", o.seq, o.what))).unwrap_or_default()
        };
        let _ = write!(
            page,
            "<tr><td>{}</td><td class=\"{class}\">{:?}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            v.checker,
            v.status,
            v.offenses,
            show(&v.first),
            show(&v.worst),
            show(&v.last)
        );
    }
    page.push_str("</table><h2>Expectations</h2><table>");
    for e in &journal.expectations {
        let _ = write!(
            page,
            "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
            esc(&e.name),
            if e.pass { "pass" } else { "fail" },
            if e.pass { "met" } else { "MISSED" },
            esc(&e.detail)
        );
    }
    page.push_str(
        "</table><h2>Steady state</h2><table><tr><th>probe</th><th>before</th><th>after</th><th>bound</th></tr>",
    );
    for (i, p) in journal.steady_before.iter().enumerate() {
        let after = journal.steady_after.get(i);
        let _ = write!(
            page,
            "<tr><td>{}</td><td class=\"{}\">{:.1}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
            esc(&p.probe),
            if p.pass { "pass" } else { "fail" },
            p.measured,
            if after.is_some_and(|a| a.pass) { "pass" } else { "fail" },
            after.map(|a| format!("{:.1}", a.measured)).unwrap_or_default(),
            esc(&p.bound)
        );
    }
    page.push_str("</table><h2>Timeline</h2><table>");
    for e in &journal.events {
        let _ = write!(page, "<tr><td>{:.1} s</td><td>{}</td></tr>", e.t_ms as f64 / 1000.0, esc(&e.what));
    }
    page.push_str("</table>");
    if !journal.reconcile_discrepancies.is_empty() {
        page.push_str("<h2>Reconciliation discrepancies</h2><ul>");
        for d in &journal.reconcile_discrepancies {
            let _ = write!(page, "<li>{}</li>", esc(d));
        }
        page.push_str("</ul>");
    }
    if let Some(logs) = &journal.logs {
        let _ = write!(page, "<p>Process logs: <code>{}</code></p>", esc(logs));
    }
    page.push_str("</body></html>\n");
    page
}

fn delay(value: Option<i64>) -> String {
    value.map(|v| format!("{v} ms")).unwrap_or_else(|| "—".into())
}

/// The credit delay of acknowledged cross-pair transfers, as a table.
fn credit_delay_html(journal: &Journal) -> String {
    let mut html = String::from("<h2>Cross-cell credit delay</h2>");
    match &journal.credit_delay {
        None => html.push_str("<p>Not measured: the final state could not be read.</p>"),
        Some(d) => {
            let _ = write!(
                html,
                "<table><tr><th>credited</th><th>p50</th><th>p99</th><th>max</th><th>slowest</th><th>still in \
                 transit</th><th>refunded</th></tr><tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td></tr></table><p>For each acknowledged transfer across pairs: the recipient \
                 cell's clock when it credited minus the sender cell's clock when it debited{}.</p>",
                d.count,
                delay(d.p50_ms),
                delay(d.p99_ms),
                delay(d.max_ms),
                d.slowest.iter().map(|(seq, ms)| format!("#{seq} ({ms} ms)")).collect::<Vec<_>>().join(", "),
                d.in_transit,
                d.refunded,
                journal
                    .drill
                    .expect
                    .credit_delay_p99_max_ms
                    .map(|b| format!("; the drill expects p99 at most {b} ms"))
                    .unwrap_or_default()
            );
        }
    }
    html
}

/// The short summary for the terminal.
pub fn summary(journal: &Journal) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "drill {} (seed {}): {}",
        journal.drill.name,
        journal.seed,
        if journal.passed() { "PASSED" } else { "FAILED" }
    );
    if let Some(why) = &journal.aborted {
        let _ = writeln!(out, "  aborted: {why}");
    }
    let _ = writeln!(
        out,
        "  {} operations ({} reads), {} acknowledged, {} unknown writes (resolved {}), RPO: {} lost",
        journal.operations, journal.reads, journal.acknowledged, journal.unknown, journal.resolved, journal.rpo_lost
    );
    if let Some(d) = &journal.credit_delay {
        let _ = writeln!(
            out,
            "  credit delay of {} cross-pair transfer(s): p50 {}, p99 {}, max {}; {} in transit, {} refunded",
            d.count,
            delay(d.p50_ms),
            delay(d.p99_ms),
            delay(d.max_ms),
            d.in_transit,
            d.refunded
        );
    }
    if !journal.lost_cells.is_empty() {
        let _ = writeln!(out, "  lost for good: cells {:?}", journal.lost_cells);
    }
    for f in &journal.faults {
        let failover = f
            .failover
            .as_ref()
            .map(|t| {
                format!(
                    "; failover cell {}→{}: detection {}, promotion {}, route switch {}",
                    t.from_cell,
                    t.to_cell,
                    ms(t.detection_ms),
                    ms(t.promotion_ms),
                    ms(t.route_switch_ms)
                )
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  step {} {:?} on {}: RTO {}{failover}",
            f.step,
            f.fault,
            f.targets.join(", "),
            ms(f.rto_ms)
        );
    }
    for v in &journal.verdicts {
        let _ = writeln!(
            out,
            "  checker {:<29} {:?}{}",
            v.checker,
            v.status,
            if v.detail.is_empty() { String::new() } else { format!(": {}", v.detail) }
        );
    }
    for e in &journal.expectations {
        let _ = writeln!(out, "  expect  {:<50} {}: {}", e.name, if e.pass { "met" } else { "MISSED" }, e.detail);
    }
    let _ = writeln!(out, "  replay: {}", journal.replay);
    out
}
