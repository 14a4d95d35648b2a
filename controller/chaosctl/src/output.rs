//! How chaosctl prints: one line per event for people, one JSON object per line with --json.
use chaos_agent::datapath::Counters;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};

static JSON: AtomicBool = AtomicBool::new(false);

/// `--json` for the whole process, so every error path speaks it without being passed it.
pub fn set_json(on: bool) {
    JSON.store(on, Ordering::Relaxed);
}

/// The one way chaosctl reports a failure, on stderr: `chaosctl: LINE`, or with --json one
/// object `{"error": LINE, "exit": CODE}` a script can parse.
pub fn error(line: impl std::fmt::Display, exit: u8) {
    if JSON.load(Ordering::Relaxed) {
        eprintln!("{}", json!({"error": line.to_string(), "exit": exit}));
    } else {
        eprintln!("chaosctl: {line}");
    }
}

/// One line: the error and its causes; when TLS is why, its top context and the reason (tonic
/// would say "transport error").
pub fn chain(e: &anyhow::Error) -> String {
    if let Some(why) = e.chain().find_map(chaos_agent::tls::explain) {
        return format!("{e}: {why}");
    }
    e.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

pub fn counters_line(c: &Counters) -> String {
    if c.cpu_time_us > 0 {
        return format!("cpu_time={:.2}s", c.cpu_time_us as f64 / 1e6);
    }
    // A disk-fill or a memory fault holds bytes, not packets (a memory fault counts the OOM
    // killer's kills, and how many of them were its own workers).
    if c.seen == 0 && (c.affected_bytes > 0 || c.matched_bytes > 0) {
        let mut line = format!(
            "held={} of {}",
            chaos_spec::format_size(c.affected_bytes),
            chaos_spec::format_size(c.seen_bytes)
        );
        if c.affected > 0 || c.matched > 0 {
            line.push_str(&format!(
                " oom_kills={} (workers lost {})",
                c.affected, c.matched
            ));
        }
        return line;
    }
    let pct = if c.matched > 0 {
        100.0 * c.affected as f64 / c.matched as f64
    } else {
        0.0
    };
    format!(
        "seen={} matched={} affected={} ({pct:.2}% of matched)",
        c.seen, c.matched, c.affected
    )
}

pub fn counters_json(c: &Counters) -> serde_json::Value {
    json!({
        "seen": c.seen, "matched": c.matched, "affected": c.affected, "cpu_time_us": c.cpu_time_us,
        "seen_bytes": c.seen_bytes, "matched_bytes": c.matched_bytes, "affected_bytes": c.affected_bytes,
    })
}

/// Prints one event about a fault.
pub fn event(
    json: bool,
    event: &str,
    id: &str,
    counters: Option<&Counters>,
    extra: serde_json::Value,
) {
    if json {
        let mut v = json!({ "event": event, "id": id });
        if let Some(c) = counters {
            v["counters"] = counters_json(c);
        }
        if let (Some(obj), Some(more)) = (v.as_object_mut(), extra.as_object()) {
            obj.extend(more.clone());
        }
        println!("{v}");
    } else {
        // What matters during an incident, restated: what the fault does, to what, how long.
        let text = |k: &str| extra.get(k).and_then(|s| s.as_str());
        let what = match (text("summary"), text("reason")) {
            (Some(s), _) => format!(": {s}"),
            (None, Some(r)) => format!(" ({})", reason_words(r)),
            (None, None) => String::new(),
        };
        match counters {
            Some(c) => println!("fault {id} {event}{what} {}", counters_line(c)),
            None => println!("fault {id} {event}{what}"),
        }
    }
}

/// Why a fault ended, as a person reads it.
fn reason_words(reason: &str) -> &str {
    match reason {
        "deadline" => "its deadline",
        "duration" => "its --duration",
        "sigint" => "Ctrl-C",
        "sigterm" => "SIGTERM",
        "revert" => "reverted",
        "lease" => "the controller's lease ran out",
        other => other,
    }
}
