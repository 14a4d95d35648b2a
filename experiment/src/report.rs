//! Reports of a run, all from the one RunRecord: JSON (machines), JUnit XML (CI test
//! reporters), Markdown and HTML (the game-day record people read), and an SVG plot of probe
//! latency and errors over time with the fault windows shaded.
use crate::record::{Phase, ProbeSample, RunRecord, Verdict};
use std::collections::BTreeMap;
use std::fmt::Write;

pub const SCHEMA: &str = "chaos.run/v1";

pub fn json(r: &RunRecord) -> String {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("schema".into(), SCHEMA.into());
        o.insert("exit_code".into(), r.verdict.exit_code().into());
    }
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Before => "before",
        Phase::During => "during",
        Phase::After => "after",
        Phase::Recovery => "recovery",
        Phase::StopCondition => "stop-condition",
        Phase::Method => "method",
    }
}

fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Held => "held",
        Verdict::Completed => "completed",
        Verdict::Violated => "violated",
        Verdict::Aborted => "aborted",
        Verdict::Inconclusive => "inconclusive",
        Verdict::Failed => "failed",
    }
}

/// Samples grouped by (probe, phase), in first-seen order.
fn groups(r: &RunRecord) -> Vec<((String, Phase), Vec<&ProbeSample>)> {
    let mut order: Vec<(String, Phase)> = vec![];
    let mut map: BTreeMap<(String, u8), Vec<&ProbeSample>> = BTreeMap::new();
    for s in &r.probes {
        let key = (s.probe.clone(), s.phase as u8);
        if !map.contains_key(&key) {
            order.push((s.probe.clone(), s.phase));
        }
        map.entry(key).or_default().push(s);
    }
    order
        .into_iter()
        .map(|(p, ph)| {
            let v = map.remove(&(p.clone(), ph as u8)).unwrap_or_default();
            ((p, ph), v)
        })
        .collect()
}

/// One testsuite: a testcase per probe and phase, per fault, and the verdict.
pub fn junit(r: &RunRecord) -> String {
    let mut cases = String::new();
    let (mut tests, mut failures, mut errors) = (0, 0, 0);
    for ((probe, phase), samples) in groups(r) {
        tests += 1;
        let bad: Vec<&&ProbeSample> = samples.iter().filter(|s| !s.ok).collect();
        let _ = write!(
            cases,
            r#"    <testcase classname="{}" name="{} [{}]" time="{:.3}">"#,
            esc(&r.title),
            esc(&probe),
            phase_name(phase),
            samples.iter().map(|s| s.end_ms - s.start_ms).sum::<u64>() as f64 / 1000.0
        );
        if let Some(first) = bad.first() {
            failures += 1;
            let _ = write!(
                cases,
                "\n      <failure message=\"{}\">{} of {} samples out of tolerance; first at {} ms: {}</failure>",
                esc(&first.out_of_tolerance()),
                bad.len(),
                samples.len(),
                first.start_ms,
                esc(&first.out_of_tolerance())
            );
        }
        let _ = write!(
            cases,
            "\n      <system-out>{}</system-out>\n    </testcase>\n",
            esc(&samples
                .iter()
                .map(|s| format!(
                    "t={}ms ok={} {}",
                    s.start_ms,
                    s.ok,
                    s.measures
                        .iter()
                        .map(|m| format!(
                            "{}={}",
                            m.name,
                            m.text
                                .clone()
                                .or(m.value.map(|v| format!("{v:.3}")))
                                .unwrap_or_default()
                        ))
                        .collect::<Vec<_>>()
                        .join(" ")
                ))
                .collect::<Vec<_>>()
                .join("\n"))
        );
    }
    for f in &r.faults {
        tests += 1;
        let _ = write!(
            cases,
            r#"    <testcase classname="{}" name="fault {} on {}">"#,
            esc(&r.title),
            esc(&f.action),
            esc(&f.place())
        );
        if let Some(e) = &f.error {
            errors += 1;
            let _ = write!(cases, "\n      <error message=\"{}\"/>", esc(e));
        } else if f.affected == 0 && f.cpu_time_us == 0 {
            failures += 1;
            let _ = write!(
                cases,
                "\n      <failure message=\"affected no packets (seen {}, matched {})\"/>",
                f.seen, f.matched
            );
        }
        let _ = writeln!(
            cases,
            "\n      <system-out>{} seen={} matched={} affected={}</system-out>\n    </testcase>",
            esc(&f.summary),
            f.seen,
            f.matched,
            f.affected
        );
    }
    tests += 1;
    let _ = write!(
        cases,
        r#"    <testcase classname="{}" name="verdict">"#,
        esc(&r.title)
    );
    match r.verdict {
        Verdict::Held | Verdict::Completed => {}
        Verdict::Violated => {
            failures += 1;
            let _ = write!(cases, "\n      <failure message=\"{}\"/>", esc(&r.reason));
        }
        Verdict::Aborted | Verdict::Inconclusive | Verdict::Failed => {
            errors += 1;
            let _ = write!(
                cases,
                "\n      <error message=\"{}: {}\"/>",
                verdict_name(r.verdict),
                esc(&r.reason)
            );
        }
    }
    cases.push_str("\n    </testcase>\n");
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n  <testsuite name=\"{}\" tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"0\" time=\"{:.3}\" timestamp=\"{}\">\n{cases}  </testsuite>\n</testsuites>\n",
        esc(&r.title),
        r.duration_ms as f64 / 1000.0,
        iso8601(r.started_unix_ms)
    )
}

fn iso8601(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn fmt_ms(ms: Option<u64>) -> String {
    ms.map_or("-".into(), |m| format!("{:.1} s", m as f64 / 1000.0))
}

/// The game-day record in Markdown.
pub fn markdown(r: &RunRecord) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# {}\n", r.title);
    if !r.description.is_empty() {
        let _ = writeln!(s, "{}\n", r.description);
    }
    let _ = writeln!(
        s,
        "**Verdict: {}** (exit {}) — {}\n\nRun `{}` on {}, started {} UTC, took {}. Recovery time: {}.{}\n",
        verdict_name(r.verdict).to_uppercase(),
        r.verdict.exit_code(),
        r.reason,
        r.id,
        r.runner,
        iso8601(r.started_unix_ms),
        fmt_ms(Some(r.duration_ms)),
        r.recovery_ms
            .map_or("not measured".into(), |m| format!("{m} ms")),
        if r.tags.is_empty() {
            String::new()
        } else {
            format!(" Tags: {}.", r.tags.join(", "))
        }
    );
    let _ = writeln!(s, "## Hypothesis\n\n{}\n", r.hypothesis);
    for p in &r.hypothesis_probes {
        let _ = writeln!(s, "- {p}");
    }
    let _ = writeln!(
        s,
        "\n## Method\n\n| action | kind | what | agent | applied | reverted | seen | matched | affected |\n|---|---|---|---|---|---|---|---|---|"
    );
    for f in &r.faults {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {}{}{} |",
            f.action,
            f.kind,
            f.summary.replace('|', "\\|"),
            f.place(),
            fmt_ms(Some(f.applied_ms)),
            fmt_ms(f.reverted_ms),
            f.seen,
            f.matched,
            f.affected,
            f.ready_ms
                .map_or(String::new(), |ms| format!(" (Ready again after {ms} ms)")),
            f.error
                .as_ref()
                .map_or(String::new(), |e| format!(" (error: {e})"))
        );
    }
    for st in &r.steps {
        let _ = writeln!(
            s,
            "\n- {} `{}` at {}: {}{}",
            st.kind,
            st.name,
            fmt_ms(Some(st.start_ms)),
            if st.ok { "ok" } else { "failed" },
            st.detail
                .as_ref()
                .map_or(String::new(), |d| format!(" ({d})"))
        );
    }
    let _ = writeln!(
        s,
        "\n## Observation\n\n| probe | phase | samples | out of tolerance | measures (min / median / max) |\n|---|---|---|---|---|"
    );
    for ((probe, phase), samples) in groups(r) {
        let bad = samples.iter().filter(|x| !x.ok).count();
        let _ = writeln!(
            s,
            "| {probe} | {} | {} | {bad} | {} |",
            phase_name(phase),
            samples.len(),
            stats(&samples)
        );
    }
    let _ = writeln!(
        s,
        "\n## Conclusion\n\n{}: {}. Recovery time: {}.\n\n## Timeline\n",
        verdict_name(r.verdict),
        r.reason,
        r.recovery_ms
            .map_or("not measured".into(), |m| format!("{m} ms"))
    );
    for e in &r.events {
        let _ = writeln!(s, "- {:>8} {}", fmt_ms(Some(e.t_ms)), e.text);
    }
    s
}

fn stats(samples: &[&ProbeSample]) -> String {
    let mut by: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for s in samples {
        for m in &s.measures {
            if let Some(v) = m.value.filter(|v| v.is_finite()) {
                by.entry(&m.name).or_default().push(v);
            }
        }
    }
    by.into_iter()
        .map(|(k, mut v)| {
            v.sort_by(|a, b| a.total_cmp(b));
            format!(
                "{k} {:.2} / {:.2} / {:.2}",
                v[0],
                v[v.len() / 2],
                v[v.len() - 1]
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The main numeric measure of a sample for the plot: p99 for http, else the first number.
fn latency_of(s: &ProbeSample) -> Option<f64> {
    s.measure("p99-ms")
        .or_else(|| s.measure("connect-ms"))
        .or_else(|| s.measure("ms"))
        .or_else(|| s.measure("value"))
        .and_then(|m| m.value)
        .filter(|v| v.is_finite())
}

fn error_of(s: &ProbeSample) -> f64 {
    match s.measure("error-rate").and_then(|m| m.value) {
        Some(v) => v,
        None if s.error.is_some() || !s.ok => 1.0,
        None => 0.0,
    }
}

/// Round tick step for a range: 1, 2 or 5 times a power of ten, about `n` ticks.
fn nice_step(max: f64, n: f64) -> f64 {
    let raw = (max / n).max(1e-9);
    let p = 10f64.powf(raw.log10().floor());
    let f = raw / p;
    p * if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    }
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// Latency (top) and error rate (bottom) over time; fault windows shaded and labelled,
/// violations marked with red dots, phases named along the top.
pub fn svg(r: &RunRecord) -> String {
    let (w, h) = (900.0, 420.0);
    let (left, right, top) = (60.0, 20.0, 30.0);
    let (lat_h, gap, err_h) = (220.0, 40.0, 90.0);
    let t_max = (r.duration_ms.max(1) as f64) / 1000.0;
    let x = |ms: u64| left + (ms as f64 / 1000.0) / t_max * (w - left - right);
    let lat_max = r
        .probes
        .iter()
        .filter_map(latency_of)
        .fold(1.0f64, f64::max)
        * 1.1;
    let ly = |v: f64| top + lat_h - v / lat_max * lat_h;
    let err_top = top + lat_h + gap;
    let ey = |v: f64| err_top + err_h - v.clamp(0.0, 1.0) * err_h;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">
<rect x="0" y="0" width="{w}" height="{h}" fill="white"/>
"#
    );
    // Fault windows.
    for (i, f) in r.faults.iter().enumerate() {
        let end = f.reverted_ms.unwrap_or(r.duration_ms);
        let (x0, x1) = (x(f.applied_ms), x(end).max(x(f.applied_ms) + 1.0));
        let _ = writeln!(
            s,
            r##"<rect class="fault-window" x="{x0:.1}" y="{top}" width="{:.1}" height="{:.1}" fill="#ff7f0e" fill-opacity="0.15"><title>{}</title></rect>
<text x="{:.1}" y="{:.1}" fill="#b35900">{}</text>"##,
            x1 - x0,
            err_top + err_h - top,
            esc(&format!("{} on {}: {}", f.action, f.place(), f.summary)),
            x0 + 3.0,
            top + 12.0 + 12.0 * i as f64,
            esc(&format!("{} @ {}", f.action, f.place()))
        );
    }
    // Axes and ticks: a grid line with its label at each value.
    let grid = |s: &mut String, y: f64, label: f64| {
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - right,
            left - 4.0,
            y + 4.0,
            trim(label),
        );
    };
    let step = nice_step(lat_max, 5.0);
    let mut v = 0.0;
    while v <= lat_max {
        grid(&mut s, ly(v), v);
        v += step;
    }
    for e in [0.0, 0.5, 1.0] {
        grid(&mut s, ey(e), e);
    }
    let tstep = nice_step(t_max, 10.0);
    let mut t = 0.0;
    while t <= t_max + 1e-9 {
        let px = x((t * 1000.0) as u64);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" x2="{px:.1}" y1="{:.1}" y2="{:.1}" stroke="#999"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            err_top + err_h,
            err_top + err_h + 4.0,
            err_top + err_h + 16.0,
            trim(t)
        );
        t += tstep;
    }
    let _ = writeln!(
        s,
        r##"<text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">latency (ms)</text>
<text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">error rate</text>
<text x="{:.1}" y="{:.1}" text-anchor="middle">time since start (s)</text>
<rect x="{left}" y="{top}" width="{:.1}" height="{lat_h}" fill="none" stroke="#333"/>
<rect x="{left}" y="{err_top}" width="{:.1}" height="{err_h}" fill="none" stroke="#333"/>"##,
        top + lat_h / 2.0,
        top + lat_h / 2.0,
        err_top + err_h / 2.0,
        err_top + err_h / 2.0,
        (left + w - right) / 2.0,
        h - 4.0,
        w - left - right,
        w - left - right,
    );
    // Series per probe.
    let mut names: Vec<&str> = vec![];
    for p in &r.probes {
        if p.phase != Phase::StopCondition && !names.contains(&p.probe.as_str()) {
            names.push(&p.probe);
        }
    }
    for (i, name) in names.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let samples: Vec<&ProbeSample> = r.probes.iter().filter(|p| p.probe == *name).collect();
        let pts: Vec<String> = samples
            .iter()
            .filter_map(|p| latency_of(p).map(|v| format!("{:.1},{:.1}", x(p.end_ms), ly(v))))
            .collect();
        if !pts.is_empty() {
            let _ = writeln!(
                s,
                r#"<polyline class="series" fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
                pts.join(" ")
            );
        }
        let errs: Vec<String> = samples
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.end_ms), ey(error_of(p))))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            errs.join(" ")
        );
        for p in samples.iter().filter(|p| !p.ok) {
            let y = latency_of(p).map_or(ey(error_of(p)), ly);
            let _ = writeln!(
                s,
                r#"<circle class="violation" cx="{:.1}" cy="{y:.1}" r="3.5" fill="red"><title>{}</title></circle>"#,
                x(p.end_ms),
                esc(&format!(
                    "{} at {} ms: {}",
                    p.probe,
                    p.end_ms,
                    p.out_of_tolerance()
                ))
            );
        }
        let _ = writeln!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="10" height="10" fill="{color}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            w - right - 160.0,
            top + 6.0 + 14.0 * i as f64,
            w - right - 146.0,
            top + 15.0 + 14.0 * i as f64,
            esc(name)
        );
    }
    // Phases along the top.
    let mut last = "";
    for e in &r.events {
        if let Some(ph) = e.text.strip_prefix("phase: ")
            && ph != last
        {
            let px = x(e.t_ms);
            let _ = writeln!(
                s,
                r##"<line x1="{px:.1}" x2="{px:.1}" y1="{:.1}" y2="{top}" stroke="#666" stroke-dasharray="2,2"/><text x="{:.1}" y="{:.1}" fill="#444">{}</text>"##,
                top - 14.0,
                px + 2.0,
                top - 4.0,
                esc(ph),
            );
            last = ph;
        }
    }
    s.push_str("</svg>\n");
    s
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// One self-contained HTML page (no scripts, no external resources).
pub fn html(r: &RunRecord) -> String {
    let md = markdown(r);
    let mut body = String::new();
    let mut in_table = false;
    let mut in_list = false;
    for line in md.lines() {
        if line.starts_with("|---") {
            continue;
        }
        if let Some(row) = line.strip_prefix('|') {
            if !in_table {
                body.push_str("<table>\n");
                in_table = true;
            }
            let cells: Vec<String> = row
                .trim_end_matches('|')
                .split(" | ")
                .map(|c| format!("<td>{}</td>", esc(c.trim()).replace("\\|", "|")))
                .collect();
            let _ = writeln!(body, "<tr>{}</tr>", cells.join(""));
            continue;
        } else if in_table {
            body.push_str("</table>\n");
            in_table = false;
        }
        if let Some(item) = line.strip_prefix("- ") {
            if !in_list {
                body.push_str("<ul>\n");
                in_list = true;
            }
            let _ = writeln!(body, "<li>{}</li>", inline(item));
            continue;
        } else if in_list && !line.is_empty() {
            body.push_str("</ul>\n");
            in_list = false;
        }
        if let Some(t) = line.strip_prefix("## ") {
            if t == "Observation" {
                let _ = writeln!(body, "<h2>Observation</h2>\n<figure>{}</figure>", svg(r));
            } else {
                let _ = writeln!(body, "<h2>{}</h2>", esc(t));
            }
        } else if let Some(t) = line.strip_prefix("# ") {
            let _ = writeln!(body, "<h1>{}</h1>", esc(t));
        } else if !line.is_empty() {
            let _ = writeln!(body, "<p>{}</p>", inline(line));
        }
    }
    if in_table {
        body.push_str("</table>\n");
    }
    if in_list {
        body.push_str("</ul>\n");
    }
    let color = match r.verdict {
        Verdict::Held | Verdict::Completed => "#2e7d32",
        Verdict::Violated => "#c62828",
        Verdict::Aborted => "#ef6c00",
        Verdict::Inconclusive | Verdict::Failed => "#616161",
    };
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>\nbody {{ font-family: sans-serif; max-width: 960px; margin: 2em auto; color: #222; }}\ntable {{ border-collapse: collapse; margin: 1em 0; }}\ntd {{ border: 1px solid #ccc; padding: 3px 6px; font-size: 13px; }}\ntr:first-child td {{ font-weight: bold; background: #f3f3f3; }}\nstrong {{ color: {color}; }}\ncode {{ background: #f3f3f3; padding: 0 3px; }}\n</style>\n</head>\n<body>\n{body}</body>\n</html>\n",
        esc(&r.title)
    )
}

/// `**bold**` and `` `code` `` in otherwise escaped text.
fn inline(s: &str) -> String {
    let mut out = String::new();
    let e = esc(s);
    let mut bold = false;
    let mut code = false;
    let mut rest = e.as_str();
    while let Some(i) = rest.find(['*', '`']) {
        out.push_str(&rest[..i]);
        if rest[i..].starts_with("**") {
            out.push_str(if bold { "</strong>" } else { "<strong>" });
            bold = !bold;
            rest = &rest[i + 2..];
        } else if rest[i..].starts_with('`') {
            out.push_str(if code { "</code>" } else { "<code>" });
            code = !code;
            rest = &rest[i + 1..];
        } else {
            out.push('*');
            rest = &rest[i + 1..];
        }
    }
    out.push_str(rest);
    if code {
        out.push_str("</code>");
    }
    if bold {
        out.push_str("</strong>");
    }
    out
}

/// Writes run.json, junit.xml, report.md, report.html and plot.svg into `dir`.
pub fn write_all(r: &RunRecord, dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut out = vec![];
    for (name, text) in [
        ("run.json", json(r)),
        ("junit.xml", junit(r)),
        ("report.md", markdown(r)),
        ("report.html", html(r)),
        ("plot.svg", svg(r)),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::record::{Event, FaultRecord, Measure};

    fn sample(probe: &str, phase: Phase, t: u64, p99: f64, err: f64, ok: bool) -> ProbeSample {
        let m = |name: &str, v: f64, tol: &str, ok: bool| Measure {
            name: name.into(),
            value: Some(v),
            text: None,
            tolerance: Some(tol.into()),
            ok,
        };
        ProbeSample {
            probe: probe.into(),
            phase,
            start_ms: t,
            end_ms: t + 400,
            ok,
            measures: vec![
                m("p99-ms", p99, "< 300", p99 < 300.0),
                m("error-rate", err, "<= 0.01", err <= 0.01),
            ],
            error: None,
        }
    }

    /// A violated run: loss on one agent, the hypothesis broken during, recovered after.
    pub(crate) fn violated() -> RunRecord {
        let mut probes = vec![sample("cart <&\"", Phase::Before, 0, 12.0, 0.0, true)];
        for (i, t) in (500..3000).step_by(500).enumerate() {
            probes.push(sample(
                "cart <&\"",
                Phase::During,
                t,
                40.0 + 100.0 * i as f64,
                if i > 2 { 0.3 } else { 0.0 },
                i <= 2,
            ));
        }
        probes.push(sample("cart <&\"", Phase::Recovery, 3200, 15.0, 0.0, true));
        probes.push(sample("cart <&\"", Phase::After, 3700, 13.0, 0.0, true));
        RunRecord {
            id: "r-1".into(),
            title: "Cart <survives> loss & \"latency\"".into(),
            description: "game day".into(),
            tags: vec!["cart".into()],
            hypothesis: "cart answers".into(),
            hypothesis_probes: vec!["cart: http p99-ms < 300".into()],
            runner: "local".into(),
            started_unix_ms: 1_795_478_400_000,
            duration_ms: 4200,
            verdict: Verdict::Violated,
            reason: "hypothesis violated during the method: cart: error-rate = 0.300".into(),
            recovery_ms: Some(420),
            probes,
            faults: vec![
                FaultRecord {
                    action: "lossy".into(),
                    kind: "loss".into(),
                    summary: "{\"percent\":30} on eth0".into(),
                    agent: "app-1".into(),
                    pod: None,
                    id: "f1".into(),
                    applied_ms: 450,
                    reverted_ms: Some(2900),
                    seen: 900,
                    matched: 600,
                    affected: 180,
                    cpu_time_us: 0,
                    ready_ms: None,
                    error: None,
                },
                FaultRecord {
                    action: "idle".into(),
                    kind: "loss".into(),
                    summary: "on eth1".into(),
                    agent: "app-2".into(),
                    pod: Some("shop/cart-b".into()),
                    id: "f2".into(),
                    applied_ms: 450,
                    reverted_ms: Some(2900),
                    seen: 0,
                    matched: 0,
                    affected: 0,
                    cpu_time_us: 0,
                    ready_ms: None,
                    error: None,
                },
            ],
            steps: vec![],
            events: vec![
                Event {
                    t_ms: 0,
                    text: "phase: before".into(),
                },
                Event {
                    t_ms: 450,
                    text: "phase: method".into(),
                },
                Event {
                    t_ms: 2900,
                    text: "phase: recovery".into(),
                },
                Event {
                    t_ms: 3700,
                    text: "phase: after".into(),
                },
            ],
        }
    }

    #[test]
    fn junit_is_well_formed_and_counts_failures() {
        let x = junit(&violated());
        let doc = roxmltree::Document::parse(&x).unwrap();
        let suite = doc
            .descendants()
            .find(|n| n.has_tag_name("testsuite"))
            .unwrap();
        assert_eq!(
            suite.attribute("name"),
            Some("Cart <survives> loss & \"latency\"")
        );
        // cases: cart before/during/recovery/after, two faults, the verdict.
        assert_eq!(suite.attribute("tests"), Some("7"));
        // during out of tolerance, the idle fault affected nothing, the verdict.
        assert_eq!(suite.attribute("failures"), Some("3"));
        assert_eq!(suite.attribute("errors"), Some("0"));
        assert_eq!(suite.attribute("timestamp"), Some("2026-11-24T00:00:00"));
        let during = doc
            .descendants()
            .find(|n| n.attribute("name") == Some("cart <&\" [during]"))
            .unwrap();
        let f = during
            .children()
            .find(|n| n.has_tag_name("failure"))
            .unwrap();
        assert!(
            f.text()
                .unwrap()
                .starts_with("2 of 5 samples out of tolerance"),
            "{:?}",
            f.text()
        );
    }

    #[test]
    fn the_plot_shades_each_fault_window_and_marks_violations() {
        let r = violated();
        let s = svg(&r);
        let doc = roxmltree::Document::parse(&s).unwrap();
        let count = |class: &str| {
            doc.descendants()
                .filter(|n| n.attribute("class") == Some(class))
                .count()
        };
        assert_eq!(count("fault-window"), 2);
        assert_eq!(count("violation"), 2);
        assert_eq!(count("series"), 1);
        let html = html(&r);
        assert!(html.contains("<svg") && html.contains("Cart &lt;survives&gt; loss &amp;"));
        assert!(!html.contains("<script"));
        let md = markdown(&r);
        for section in [
            "## Hypothesis",
            "## Method",
            "## Observation",
            "## Conclusion",
            "## Timeline",
        ] {
            assert!(md.contains(section), "{section}");
        }
        assert!(md.contains("| lossy | loss |"));
        // A pod target names the pod beside its node.
        assert!(md.contains("| app-2 (shop/cart-b) |"), "{md}");
        assert!(md.contains("Recovery time: 420 ms"));
        let j: serde_json::Value = serde_json::from_str(&json(&r)).unwrap();
        assert_eq!(j["schema"], SCHEMA);
        assert_eq!(j["exit_code"], 1);
        assert_eq!(j["faults"][0]["affected"], 180);
        let dir = std::env::temp_dir().join(format!("chaos-report-{}", std::process::id()));
        let files = write_all(&r, &dir).unwrap();
        assert_eq!(files.len(), 5);
        assert!(
            std::fs::read_to_string(dir.join("report.html"))
                .unwrap()
                .starts_with("<!DOCTYPE html>")
        );
        if std::env::var_os("CHAOS_KEEP_REPORT").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
