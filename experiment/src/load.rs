//! Reading an experiment file: our YAML model, or a Chaos Toolkit experiment (JSON or YAML),
//! detected by its shape. Every error is one line: `file:line:col: path: rule`.
use crate::ctk;
use crate::model::{self, Experiment, Step};
use chaos_spec::{ERROR_LINE_MAX, one_line};
use std::collections::BTreeSet;
use std::path::Path;

/// One line, however hostile the file: see [`one_line`].
#[derive(Debug, thiserror::Error)]
#[error("{}", one_line(.0, ERROR_LINE_MAX))]
pub struct LoadError(pub String);

impl Experiment {
    pub fn load(path: &Path) -> Result<Experiment, LoadError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| LoadError(format!("{}: {e}", path.display())))?;
        Experiment::parse(&text, &path.display().to_string())
    }

    /// `source` names the text in error lines.
    pub fn parse(text: &str, source: &str) -> Result<Experiment, LoadError> {
        bounded(text, source)?;
        let value: serde_json::Value =
            serde_yaml_ng::from_str(text).map_err(|e| LoadError(located(source, &e, "", text)))?;
        if ctk::is_chaos_toolkit(&value) {
            let exp = ctk::import(&value, source)?;
            check(&exp, text, source)?;
            return Ok(exp);
        }
        let exp: Experiment =
            serde_yaml_ng::from_str(text).map_err(|e| LoadError(located(source, &e, "", text)))?;
        check(&exp, text, source)?;
        Ok(exp)
    }
}

/// The largest experiment accepted, and its deepest nesting. A hostile file must cost nothing:
/// the YAML parser's time grows with the square of the nesting (60,000 levels took 6.6 s on
/// the controller's async worker), and a 50 MB title became 577 MB of reports.
pub const MAX_BYTES: usize = 1 << 20;
pub const MAX_NESTING: usize = 64;
/// The most keys and items: the parser loads every node before the first check (about half
/// a microsecond each, twice: 100,000 one-line keys in 1 MiB cost 125 ms of CPU per request),
/// and a real experiment of a few hundred steps has a few thousand.
pub const MAX_NODES: usize = 20_000;
/// The longest title (the experiment's and the hypothesis's), description, tag and name.
pub const MAX_TITLE: usize = 256;
pub const MAX_DESCRIPTION: usize = 4096;
pub const MAX_NAME: usize = 128;
pub const MAX_TAGS: usize = 32;

/// Refuses, in one line naming the limit, a text over [`MAX_BYTES`] or nested deeper than
/// [`MAX_NESTING`] (flow brackets, block indentation and `- ` sequence markers), or with more
/// than [`MAX_NODES`] keys and items (`key:`, `- `, flow commas), counted in one pass before
/// any parsing.
fn bounded(text: &str, source: &str) -> Result<(), LoadError> {
    if text.len() > MAX_BYTES {
        return Err(LoadError(format!(
            "{source}: {} bytes: an experiment is at most {MAX_BYTES} bytes (1 MiB)",
            text.len()
        )));
    }
    let mut indents: Vec<usize> = Vec::new();
    let (mut flow, mut nodes) = (0usize, 0usize);
    for (n, line) in text.lines().enumerate() {
        let body = line.trim_start_matches(' ');
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let indent = line.len() - body.len();
        while indents.last().is_some_and(|&i| i >= indent) {
            indents.pop();
        }
        indents.push(indent);
        let mut dashes = 0;
        let mut rest = body;
        while let Some(r) = rest.strip_prefix("- ") {
            dashes += 1;
            rest = r.trim_start_matches(' ');
        }
        let (mut quote, mut deepest, mut escaped) = (None, flow, false);
        nodes += dashes;
        let mut chars = rest.chars().peekable();
        while let Some(c) = chars.next() {
            match (quote, c) {
                // `\"` inside a double-quoted string (how JSON writes a quote) ends nothing.
                (Some('"'), _) if escaped => escaped = false,
                (Some('"'), '\\') => escaped = true,
                (None, '"' | '\'') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (None, '[' | '{') => {
                    flow += 1;
                    deepest = deepest.max(flow);
                }
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                (None, ',') if flow > 0 => nodes += 1,
                (None, ':') if chars.peek().is_none_or(|c| *c == ' ') => nodes += 1,
                (None, '#') => break,
                _ => {}
            }
        }
        let depth = indents.len() + dashes + deepest;
        if depth > MAX_NESTING {
            return Err(LoadError(format!(
                "{source}:{}: nested {depth} levels deep: an experiment nests at most {MAX_NESTING}",
                n + 1
            )));
        }
        if nodes > MAX_NODES {
            return Err(LoadError(format!(
                "{source}:{}: over {MAX_NODES} keys and items: an experiment has at most {MAX_NODES} keys and items",
                n + 1
            )));
        }
    }
    Ok(())
}

/// `source:line:col: path: message`, the message without serde_yaml's own position suffix.
fn located(source: &str, e: &serde_yaml_ng::Error, path: &str, _text: &str) -> String {
    let mut msg = e.to_string();
    if let Some(i) = msg.find(" at line ") {
        msg.truncate(i);
    }
    // The parser quotes what it could not read: never unbounded input in an error line.
    if let Some((i, _)) = msg.char_indices().nth(300) {
        msg.truncate(i);
        msg.push('…');
    }
    let path = if path.is_empty() || path == "." {
        String::new()
    } else {
        format!("{path}: ")
    };
    match e.location() {
        Some(l) => format!("{source}:{}:{}: {path}{msg}", l.line(), l.column()),
        None => format!("{source}: {path}{msg}"),
    }
}

/// The line of the last `key: value` in the text (block or flow style), for errors found after
/// parsing. The last: for a duplicate, the second use is the mistake.
fn line_of(text: &str, key: &str, value: &str) -> Option<usize> {
    let re = regex::Regex::new(&format!(
        r#"(^|[\s{{,-]){}:\s*["']?{}["']?\s*($|[,}}#])"#,
        regex::escape(key),
        regex::escape(value)
    ))
    .ok()?;
    let lines: Vec<&str> = text.lines().collect();
    lines.iter().rposition(|l| re.is_match(l)).map(|i| i + 1)
}

fn at(source: &str, line: Option<usize>, path: &str, rule: &str) -> LoadError {
    match line {
        Some(l) => LoadError(format!("{source}:{l}: {path}: {rule}")),
        None => LoadError(format!("{source}: {path}: {rule}")),
    }
}

/// Rules across fields: unique names, a non-empty hypothesis and method, the blast radius.
fn check(exp: &Experiment, text: &str, source: &str) -> Result<(), LoadError> {
    if exp.title.trim().is_empty() {
        return Err(at(source, None, "title", "must not be empty"));
    }
    // Every report, event and history entry repeats these: a 50 MB title became 577 MB of
    // reports. Bounded here, once, for every way an experiment arrives.
    let hypothesis = exp.steady_state_hypothesis.as_ref();
    let texts = [
        ("title", exp.title.as_str(), MAX_TITLE),
        ("description", exp.description.as_str(), MAX_DESCRIPTION),
        (
            "steady-state-hypothesis.title",
            hypothesis.map_or("", |h| h.title.as_str()),
            MAX_TITLE,
        ),
    ];
    let probe_names = exp.hypothesis_probes().iter().chain(&exp.stop_conditions);
    let too_long = texts
        .into_iter()
        .chain(exp.tags.iter().map(|t| ("tags", t.as_str(), MAX_NAME)))
        .chain(probe_names.map(|p| ("name", p.name.as_str(), MAX_NAME)))
        .find(|(_, value, max)| value.len() > *max);
    if let Some((path, value, max)) = too_long {
        return Err(at(
            source,
            None,
            path,
            &format!("{} bytes: must be at most {max}", value.len()),
        ));
    }
    if exp.tags.len() > MAX_TAGS {
        return Err(at(
            source,
            None,
            "tags",
            &format!("{} tags: at most {MAX_TAGS}", exp.tags.len()),
        ));
    }
    if exp
        .steady_state_hypothesis
        .as_ref()
        .is_some_and(|h| h.probes.is_empty())
    {
        return Err(at(
            source,
            None,
            "steady-state-hypothesis.probes",
            "needs at least one probe: without one, nothing can be held or violated",
        ));
    }
    if exp.method.is_empty() {
        return Err(at(source, None, "method", "needs at least one step"));
    }
    let mut names = BTreeSet::new();
    let probes = exp.hypothesis_probes().iter().chain(&exp.stop_conditions);
    for p in probes {
        if !names.insert(p.name.clone()) {
            return Err(at(
                source,
                line_of(text, "name", &p.name),
                "name",
                &format!(
                    "`{}` is used twice; probe and action names must be unique",
                    p.name
                ),
            ));
        }
    }
    fn walk(
        steps: &[Step],
        path: &str,
        names: &mut BTreeSet<String>,
        text: &str,
        source: &str,
    ) -> Result<(), LoadError> {
        for (i, s) in steps.iter().enumerate() {
            let here = format!("{path}[{i}]");
            let name = match s {
                Step::Fault(f) => Some(&f.name),
                Step::Command(c) => Some(&c.name),
                Step::Parallel(p) => {
                    if p.is_empty() {
                        return Err(at(
                            source,
                            None,
                            &format!("{here}.parallel"),
                            "needs at least one step",
                        ));
                    }
                    walk(p, &format!("{here}.parallel"), names, text, source)?;
                    None
                }
                Step::Background(b) => {
                    walk(
                        std::slice::from_ref(b),
                        &format!("{here}.background"),
                        names,
                        text,
                        source,
                    )?;
                    None
                }
                Step::Probe(p) => Some(&p.name),
                Step::Pause(_) => None,
            };
            if let Some(n) = name
                && !names.insert(n.clone())
            {
                return Err(at(
                    source,
                    line_of(text, "name", n),
                    &format!("{here}.name"),
                    &format!("`{n}` is used twice; probe and action names must be unique"),
                ));
            }
        }
        Ok(())
    }
    walk(&exp.method, "method", &mut names, text, source)?;
    let faults = model::faults(&exp.method);
    let br = &exp.blast_radius;
    if let Some(max) = br.max_faults
        && faults.len() > max as usize
    {
        return Err(at(
            source,
            line_of(text, "max-faults", &max.to_string()),
            "blast-radius.max-faults",
            &format!(
                "the method has {} fault actions, more than {max}",
                faults.len()
            ),
        ));
    }
    if let Some(max) = br.max_duration {
        let d = model::min_duration(&exp.method);
        if d > max.0 {
            return Err(at(
                source,
                None,
                "blast-radius.max-duration",
                &format!("the method takes at least {:?}, longer than {:?}", d, max.0),
            ));
        }
    }
    if let Some(max) = br.max_agents {
        for f in &faults {
            if f.selector.agents.len() > max as usize {
                return Err(at(
                    source,
                    line_of(text, "name", &f.name),
                    &format!("method: fault {}", f.name),
                    &format!(
                        "names {} agents, more than blast-radius.max-agents {max}",
                        f.selector.agents.len()
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hostile sizes and nestings are refused before the parser sees them, in one line naming
    /// the limit, and fast: 100,000 levels took the parser 39 s.
    #[test]
    fn titles_descriptions_tags_and_names_are_bounded() {
        let long = |n| "t".repeat(n);
        let title = "method: [pause: 1s]\n";
        let ok = format!("title: {}\ndescription: {}\n{title}", long(256), long(4096));
        assert!(Experiment::parse(&ok, "exp.yaml").is_ok());
        for (bad, rule) in [
            (
                format!("title: {}\n{title}", long(257)),
                "title: 257 bytes: must be at most 256",
            ),
            (
                format!("title: t\ndescription: {}\n{title}", long(4097)),
                "description: 4097 bytes: must be at most 4096",
            ),
            (
                format!("title: t\ntags: [{}]\n{title}", long(129)),
                "tags: 129 bytes: must be at most 128",
            ),
            (
                format!("title: t\ntags: [{}]\n{title}", vec!["a"; 33].join(", ")),
                "tags: 33 tags: at most 32",
            ),
        ] {
            let e = err(&bad);
            assert!(e.ends_with(rule), "{e}");
        }
    }

    #[test]
    fn hostile_nesting_and_size_are_refused_at_once() {
        let started = std::time::Instant::now();
        let flow = format!("title: {}x{}", "[".repeat(100_000), "]".repeat(100_000));
        let mut block = String::from("title: t\n");
        for i in 0..500 {
            block.push_str(&" ".repeat(i));
            block.push_str("a:\n");
        }
        let dashes = format!("title: t\nmethod:\n{}x\n", "- ".repeat(100_000));
        for (what, text) in [("flow", flow), ("block", block), ("dashes", dashes)] {
            let e = Experiment::parse(&text, "x.yaml").unwrap_err().0;
            assert!(e.contains("nests at most 64"), "{what}: {e}");
            assert_eq!(e.lines().count(), 1, "{what}");
        }
        // Many small nodes: the parser's cost is per node, whatever the nesting.
        let keys: String = (0..=MAX_NODES).map(|i| format!("k{i}: v\n")).collect();
        let items = format!("title: t\ntags: [{}]\n", vec!["a"; MAX_NODES + 1].join(","));
        for (what, text) in [("keys", keys), ("flow items", items)] {
            let e = Experiment::parse(&text, "x.yaml").unwrap_err().0;
            assert!(e.contains("at most 20000 keys and items"), "{what}: {e}");
        }
        // Colons inside values (URLs, times) and quoted text are not keys.
        let mut fine = GOOD.to_string();
        fine.push_str(&"# http://a:1/b 'k: v'\n".repeat(MAX_NODES));
        assert!(Experiment::parse(&fine, "x.yaml").is_ok());
        let big = format!("title: {}\n", "t".repeat(MAX_BYTES));
        let e = Experiment::parse(&big, "x.yaml").unwrap_err().0;
        assert!(e.contains("at most 1048576 bytes"), "{e}");
        assert!(
            e.len() < 200,
            "the error quotes the input: {} bytes",
            e.len()
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        // Ordinary nesting (the longest file here nests ~8) still loads.
        assert!(Experiment::parse(GOOD, "good.yaml").is_ok());
    }

    const GOOD: &str = r#"title: cart tolerates loss
steady-state-hypothesis:
  title: cart answers
  probes:
    - name: cart
      http: {url: "http://10.0.0.2/", rate: 20, window: 2s}
      tolerance: {p99-ms: "< 300", error-rate: "<= 0.01"}
method:
  - fault:
      name: lossy
      loss: {percent: 10}
      target: {agents: [a1], interface: eth0, dest: [10.0.0.1/32]}
      duration: 5s
  - pause: 1s
  - parallel:
      - command: {name: warm, run: [/bin/true]}
blast-radius: {max-faults: 2, max-duration: 1m}
"#;

    fn err(text: &str) -> String {
        Experiment::parse(text, "exp.yaml").unwrap_err().0
    }

    #[test]
    fn a_good_file_loads_with_its_fault_validated() {
        let e = Experiment::parse(GOOD, "exp.yaml").unwrap();
        let f = model::faults(&e.method);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].kind, "loss");
        assert_eq!(f[0].selector.agents, vec!["a1".to_string()]);
        assert_eq!(f[0].duration, Some(std::time::Duration::from_secs(5)));
        assert!(e.during.stop_on_violation);
        // No interface: the agent takes its namespace's default-route interface.
        let text = GOOD.replace("interface: eth0, ", "");
        let e = Experiment::parse(&text, "exp.yaml").unwrap();
        let t = model::faults(&e.method)[0].spec.target.clone().unwrap();
        assert_eq!(t.interface, "");
    }

    #[test]
    fn a_hypothesis_may_be_left_out_but_not_left_empty() {
        let start = GOOD.find("steady-state-hypothesis:").unwrap();
        let end = GOOD.find("method:").unwrap();
        let without = format!("{}{}", &GOOD[..start], &GOOD[end..]);
        let e = Experiment::parse(&without, "exp.yaml").unwrap();
        assert!(e.steady_state_hypothesis.is_none());
        assert!(e.hypothesis_probes().is_empty());
        let empty = format!(
            "{}steady-state-hypothesis: {{title: t, probes: []}}\n{}",
            &GOOD[..start],
            &GOOD[end..]
        );
        assert_eq!(
            err(&empty),
            "exp.yaml: steady-state-hypothesis.probes: needs at least one probe: without one, nothing can be held or violated"
        );
    }

    #[test]
    fn probe_urls_are_parsed_once_https_is_accepted_and_userinfo_refused() {
        let url = r#"http: {url: "http://10.0.0.2/", rate: 20, window: 2s}"#;
        assert!(GOOD.contains(url));
        let with = |u: &str| GOOD.replace(url, u);
        Experiment::parse(&with(r#"http: {url: "https://10.0.0.2/"}"#), "exp.yaml").unwrap();
        let e = err(&with(r#"http: {url: "http://127.0.0.1:1@10.0.0.2/"}"#));
        assert!(
            e.contains("http.url: `http://127.0.0.1:1@10.0.0.2/` carries user information"),
            "{e}"
        );
        let e = err(&with(r#"http: {url: "ftp://10.0.0.2/"}"#));
        assert!(e.contains("must start with http:// or https://"), "{e}");
        let e = err(&with(
            r#"http: {url: "https://10.0.0.2/", ca: /nonexistent/ca.pem}"#,
        ));
        assert!(e.contains("http.ca: /nonexistent/ca.pem"), "{e}");
    }

    /// A pod target: the spec carries the placeholder UID the controller fills in per pod.
    #[test]
    fn a_pod_target_reads_into_the_selector_and_a_pod_netns() {
        let text = GOOD.replace(
            "{agents: [a1], interface: eth0,",
            "{pods: {namespaces: [shop], labels: {app: cart}, mode: fixed, value: 2}, interface: eth0,",
        );
        let e = Experiment::parse(&text, "exp.yaml").unwrap();
        let f = model::faults(&e.method)[0];
        let pods = f.selector.pods.as_ref().unwrap();
        assert_eq!(
            (pods.mode, pods.value),
            (crate::driver::PodMode::Fixed, Some(2.0))
        );
        assert_eq!(pods.labels["app"], "cart");
        let ns = f.spec.target.as_ref().unwrap().namespace.clone();
        assert_eq!(
            ns,
            Some(chaos_proto::agent::v1::target::Namespace::PodUid(
                model::ANY_POD.into()
            ))
        );
    }

    #[test]
    fn errors_name_the_line_column_path_and_rule() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "      loss: {percent: 10}",
                "      loss: {percent: 200}",
                "exp.yaml:9:5: method[0]: fault.loss.percent: must be between 0 and 100 (got 200)",
            ),
            (
                "      loss: {percent: 10}",
                "      loss: {percnt: 10}",
                "exp.yaml:11:14: method[0].fault.loss: unknown field `percnt`, expected `percent` or `correlation`",
            ),
            (
                "      duration: 5s",
                "      duration: 5 parsecs",
                "exp.yaml:10:7: method[0].fault: `5 parsecs` must look like 30s",
            ),
            (
                "  - pause: 1s",
                "  - pause: 0s",
                "exp.yaml:14:5: method[1]: `0s` must be greater than 0",
            ),
            (
                "\"< 300\"",
                "\"fast\"",
                "exp.yaml:7:18: steady-state-hypothesis.probes[0].tolerance: `fast` must be `< N`",
            ),
            (
                "p99-ms:",
                "p99ms:",
                "exp.yaml:5:5: steady-state-hypothesis.probes: tolerance.p99ms: unknown measure for a http probe; it has p50-ms",
            ),
            (
                "dest: [10.0.0.1/32]",
                "dest: [10.0.0.300/32]",
                "exp.yaml:9:5: method[0]: fault.target.dest: `10.0.0.300/32` is not a CIDR",
            ),
            (
                "blast-radius: {max-faults: 2, max-duration: 1m}",
                "blast-radius: {max-faults: 0}",
                "exp.yaml:17: blast-radius.max-faults: the method has 1 fault actions, more than 0",
            ),
            (
                "blast-radius: {max-faults: 2, max-duration: 1m}",
                "blast-radius: {max-duration: 2s}",
                "exp.yaml: blast-radius.max-duration: the method takes at least 6s, longer than 2s",
            ),
            (
                "title: cart tolerates loss",
                "title: cart tolerates loss\nowner: me",
                "exp.yaml:2:1: unknown field `owner`, expected one of `title`",
            ),
            (
                "{name: warm,",
                "{name: lossy,",
                "exp.yaml:16: method[2].parallel[0].name: `lossy` is used twice",
            ),
            (
                "      loss: {percent: 10}",
                "      pod-kill: {grace-period-seconds: 0}",
                "exp.yaml:9:5: method[0]: fault.target.pods: pod-kill needs a pod target",
            ),
            (
                "{agents: [a1], interface: eth0,",
                "{pods: {namespaces: [shop], mode: fixed}, interface: eth0,",
                "exp.yaml:9:5: method[0]: fault.target.pods.value: mode fixed needs a whole number of pods >= 1",
            ),
            (
                "{agents: [a1], interface: eth0,",
                "{agents: [a1], pods: {namespaces: [shop]}, interface: eth0,",
                "exp.yaml:9:5: method[0]: fault.target.pods: the pods' nodes choose the agents; drop target.agents and target.labels",
            ),
            (
                "{agents: [a1], interface: eth0,",
                "{pods: {namespaces: [shop], mode: fixed-percent, value: 150}, interface: eth0,",
                "exp.yaml:9:5: method[0]: fault.target.pods.value: a percent mode needs a value in (0, 100]",
            ),
            (
                "{agents: [a1], interface: eth0,",
                "{pods: {namespaces: [shop], mode: most}, interface: eth0,",
                "exp.yaml:12:49: method[0].fault.target.pods.mode: unknown variant `most`, expected one of `one`",
            ),
            (
                "  - pause: 1s",
                "  - pause: 1s\n    command: {name: x, run: [a]}",
                "exp.yaml:9:3: method: a step has exactly one of fault, pause, parallel, command, probe, background (this one has 2)",
            ),
        ];
        for (from, to, want) in cases {
            assert!(GOOD.contains(from), "{from}");
            let got = err(&GOOD.replacen(from, to, 1));
            assert!(got.starts_with(want), "\n got: {got}\nwant: {want}");
        }
    }
}

#[cfg(test)]
mod readme {
    /// The experiment in the README must load: docs that do not parse are a bug.
    #[test]
    fn the_readme_example_is_a_valid_experiment() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("# cart-loss.yaml\n")
            .expect("example in README");
        let body = &readme[start..];
        let end = body.find("```").expect("end of the example");
        let e = crate::Experiment::parse(&body[..end], "README.md").unwrap();
        assert_eq!(crate::model::faults(&e.method).len(), 1);
        assert_eq!(e.stop_conditions.len(), 1);
        // What chaosctl sends the controller: the model, serialized, reads back the same.
        let sent = serde_yaml_ng::to_string(&e).unwrap();
        assert_eq!(crate::Experiment::parse(&sent, "sent").unwrap(), e);
    }
}
