//! Chaos Toolkit experiments, imported into our model: what maps is mapped (http and process
//! probes with their tolerances, process actions, pauses, rollbacks, `${name}` configuration
//! values), everything else is refused with one line naming the element. The result goes
//! through the same validation as a YAML experiment.
use crate::LoadError;
use crate::model::Experiment;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// A Chaos Toolkit file has typed activities (`"type": "action" | "probe"`) and providers.
pub fn is_chaos_toolkit(v: &Value) -> bool {
    let typed = |key: &str| {
        v.get(key).and_then(|m| m.as_array()).is_some_and(|a| {
            a.iter()
                .any(|s| s.get("type").is_some() || s.get("ref").is_some())
        })
    };
    typed("method")
        || v.get("steady-state-hypothesis")
            .and_then(|h| h.get("probes"))
            .and_then(|p| p.as_array())
            .is_some_and(|a| a.iter().any(|p| p.get("provider").is_some()))
}

struct Ctx<'a> {
    source: &'a str,
    config: BTreeMap<String, String>,
    /// Activities by name, for `{"ref": name}`.
    named: BTreeMap<String, Value>,
    /// Names given out so far: a ref runs the same activity again, under a new name.
    used: std::collections::BTreeSet<String>,
}

impl Ctx<'_> {
    fn err(&self, path: &str, rule: impl std::fmt::Display) -> LoadError {
        LoadError(format!(
            "{}: {path}: {rule} (Chaos Toolkit import)",
            self.source
        ))
    }

    /// `${name}` from the configuration, in a string.
    fn subst(&self, path: &str, s: &str) -> Result<String, LoadError> {
        let mut out = String::new();
        let mut rest = s;
        while let Some(i) = rest.find("${") {
            out.push_str(&rest[..i]);
            let end = rest[i..]
                .find('}')
                .ok_or_else(|| self.err(path, format!("unclosed ${{ in `{s}`")))?;
            let key = &rest[i + 2..i + end];
            let v = self.config.get(key).ok_or_else(|| {
                self.err(path, format!("`${{{key}}}` is not in the configuration"))
            })?;
            out.push_str(v);
            rest = &rest[i + end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn str(&self, path: &str, v: &Value, key: &str) -> Result<String, LoadError> {
        match v.get(key) {
            Some(Value::String(s)) => self.subst(&format!("{path}.{key}"), s),
            Some(other) => Err(self.err(
                &format!("{path}.{key}"),
                format!("must be a string, not {other}"),
            )),
            None => Err(self.err(path, format!("`{key}` is required"))),
        }
    }
}

pub fn import(v: &Value, source: &str) -> Result<Experiment, LoadError> {
    let mut ctx = Ctx {
        source,
        config: BTreeMap::new(),
        named: BTreeMap::new(),
        used: Default::default(),
    };
    if let Some(Value::Object(c)) = v.get("configuration") {
        for (k, val) in c {
            let s = plain(&ctx, &format!("configuration.{k}"), val)?;
            ctx.config.insert(k.clone(), s);
        }
    }
    // Secrets are substituted like configuration values (`${name}`), scope by scope; a
    // configuration value of the same name wins.
    match v.get("secrets") {
        None => {}
        Some(Value::Object(scopes)) => {
            for (scope, entries) in scopes {
                let Value::Object(entries) = entries else {
                    return Err(ctx.err(
                        &format!("secrets.{scope}"),
                        "must be a map of names to values",
                    ));
                };
                for (k, val) in entries {
                    let s = plain(&ctx, &format!("secrets.{scope}.{k}"), val)?;
                    ctx.config.entry(k.clone()).or_insert(s);
                }
            }
        }
        Some(other) => return Err(ctx.err("secrets", format!("{other} is not a map of scopes"))),
    }
    for key in v
        .as_object()
        .map(|o| o.keys().cloned().collect::<Vec<_>>())
        .unwrap_or_default()
    {
        if ![
            "version",
            "title",
            "description",
            "tags",
            "configuration",
            "secrets",
            "contributions",
            "steady-state-hypothesis",
            "method",
            "rollbacks",
            "extensions",
            "runtime",
            "controls",
        ]
        .contains(&key.as_str())
        {
            return Err(ctx.err(&key, "unknown top-level key"));
        }
        if key == "controls" {
            return Err(ctx.err("controls", "controls are not supported"));
        }
    }
    let hyp = v.get("steady-state-hypothesis").ok_or_else(|| {
        ctx.err(
            "steady-state-hypothesis",
            "is required: without a hypothesis nothing can be held or violated",
        )
    })?;
    let mut probes = vec![];
    for (i, p) in hyp
        .get("probes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let path = format!("steady-state-hypothesis.probes[{i}]");
        let p = resolve(&mut ctx, &path, p)?;
        let p = probe(&ctx, &path, &p)?;
        if let Some(n) = p["name"].as_str() {
            ctx.used.insert(n.to_string());
        }
        probes.push(p);
    }
    let mut method = vec![];
    for (i, a) in v
        .get("method")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let path = format!("method[{i}]");
        let a = resolve(&mut ctx, &path, a)?;
        method.extend(activity(&mut ctx, &path, &a, Place::Method)?);
    }
    let mut rollbacks = vec![];
    for (i, a) in v
        .get("rollbacks")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let path = format!("rollbacks[{i}]");
        let a = resolve(&mut ctx, &path, a)?;
        for step in activity(&mut ctx, &path, &a, Place::Rollbacks)? {
            if let Some(c) = step.get("command") {
                rollbacks.push(c.clone());
            }
        }
    }
    let exp = json!({
        "title": v.get("title").and_then(Value::as_str).unwrap_or("(untitled Chaos Toolkit experiment)"),
        "description": v.get("description").and_then(Value::as_str).unwrap_or(""),
        "tags": v.get("tags").cloned().unwrap_or(json!([])),
        "steady-state-hypothesis": {
            "title": hyp.get("title").and_then(Value::as_str).unwrap_or("steady state"),
            "probes": probes,
        },
        "method": method,
        "rollbacks": rollbacks,
        "semantics": "chaos-toolkit",
    });
    serde_json::from_value(exp)
        .map_err(|e| LoadError(format!("{source}: {e} (Chaos Toolkit import)")))
}

/// A configuration or secret value: a string, number or bool, or `{"type": "env", "key": K}`
/// (with an optional `default`). Vault and other sources are refused.
fn plain(ctx: &Ctx, path: &str, val: &Value) -> Result<String, LoadError> {
    Ok(match val {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Object(o) if o.get("type") == Some(&json!("env")) => {
            let key = o.get("key").and_then(Value::as_str).unwrap_or_default();
            match std::env::var(key) {
                Ok(s) => s,
                Err(_) => match o.get("default") {
                    Some(d) => d
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| d.to_string()),
                    None => {
                        return Err(ctx.err(
                            path,
                            format!("environment variable {key} is not set and has no default"),
                        ));
                    }
                },
            }
        }
        other => {
            return Err(ctx.err(
                path,
                format!("{other} is not a plain value or an env lookup"),
            ));
        }
    })
}

/// `{"ref": "name"}` → the activity declared earlier under that name.
fn resolve(ctx: &mut Ctx, path: &str, a: &Value) -> Result<Value, LoadError> {
    if let Some(r) = a.get("ref").and_then(Value::as_str) {
        return ctx
            .named
            .get(r)
            .cloned()
            .ok_or_else(|| ctx.err(path, format!("ref `{r}` names no earlier probe or action")));
    }
    if let Some(n) = a.get("name").and_then(Value::as_str) {
        ctx.named.insert(n.to_string(), a.clone());
    }
    Ok(a.clone())
}

fn provider<'a>(ctx: &Ctx, path: &str, a: &'a Value) -> Result<(&'a Value, String), LoadError> {
    let p = a
        .get("provider")
        .ok_or_else(|| ctx.err(path, "`provider` is required"))?;
    let t = p.get("type").and_then(Value::as_str).unwrap_or("");
    match t {
        "http" | "process" => Ok((p, t.to_string())),
        "python" => Err(ctx.err(path, format!(
            "provider type \"python\" (module {}) is not supported: use a fault action in a chaos experiment file, or a process provider",
            p.get("module").and_then(Value::as_str).unwrap_or("?")
        ))),
        other => Err(ctx.err(path, format!("provider type {other:?} is not supported (http and process are)"))),
    }
}

/// A jsonpath tolerance's path into the body. With `target: body` it is one already; without
/// a target chaos run applies it to the whole answer (`{status, headers, body}`), of which we
/// measure the body: `$.body...` is taken, anything else refused.
fn body_path(ctx: &Ctx, path: &str, targets_body: bool, jp: &str) -> Result<String, LoadError> {
    if targets_body {
        return Ok(jp.to_string());
    }
    match jp.strip_prefix("$.body") {
        Some("") => Ok("$".into()),
        Some(rest) if rest.starts_with(['.', '[']) => Ok(format!("${rest}")),
        _ => Err(ctx.err(
            path,
            format!("jsonpath `{jp}` without `target: body` must start with $.body (the status and headers are measured otherwise)"),
        )),
    }
}

fn timeout(p: &Value, default_s: f64) -> String {
    let s = p
        .get("timeout")
        .and_then(Value::as_f64)
        .unwrap_or(default_s);
    format!("{}ms", (s * 1000.0).round().max(1.0) as u64)
}

fn argv(ctx: &Ctx, path: &str, p: &Value) -> Result<Vec<String>, LoadError> {
    let mut v = vec![ctx.str(path, p, "path")?];
    match p.get("arguments") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            for a in ctx.subst(path, s)?.split_whitespace() {
                v.push(a.to_string());
            }
        }
        Some(Value::Array(list)) => {
            for a in list {
                match a {
                    Value::String(s) => v.push(ctx.subst(path, s)?),
                    other => v.push(other.to_string()),
                }
            }
        }
        Some(other) => {
            return Err(ctx.err(
                &format!("{path}.provider.arguments"),
                format!("{other} must be a string or a list"),
            ));
        }
    }
    Ok(v)
}

fn probe(ctx: &Ctx, path: &str, a: &Value) -> Result<Value, LoadError> {
    if a.get("type").and_then(Value::as_str) != Some("probe") {
        return Err(ctx.err(path, "the hypothesis holds probes only"));
    }
    let name = ctx.str(path, a, "name")?;
    let tol = a
        .get("tolerance")
        .ok_or_else(|| ctx.err(path, "`tolerance` is required"))?;
    measured(ctx, path, a, name, Some(tol))
}

/// A probe of our model from a Chaos Toolkit activity with an http or process provider; its
/// tolerance (none for an action, or a probe in the method without one) says what is checked.
fn measured(
    ctx: &Ctx,
    path: &str,
    a: &Value,
    name: String,
    tol: Option<&Value>,
) -> Result<Value, LoadError> {
    let (p, kind) = provider(ctx, path, a)?;
    let tpath = format!("{path}.tolerance");
    if kind == "http" {
        let mut out = json!({
            "name": name,
            "http": {
                "url": ctx.str(&format!("{path}.provider"), p, "url")?,
                "method": p.get("method").and_then(Value::as_str).unwrap_or("GET"),
                "rate": 1, "window": "1s", "timeout": timeout(p, 3.0),
            },
        });
        if let Some(Value::Object(h)) = p.get("headers") {
            out["http"]["headers"] = Value::Object(h.clone());
        }
        // `arguments` is the request's body: a map is sent as JSON, a string as it is.
        match p.get("arguments") {
            None | Some(Value::Null) => {}
            Some(Value::String(b)) => {
                out["http"]["body"] = json!(ctx.subst(&format!("{path}.provider.arguments"), b)?)
            }
            Some(doc @ (Value::Object(_) | Value::Array(_))) => {
                out["http"]["body"] = json!(doc.to_string());
                if out["http"]["headers"].get("Content-Type").is_none()
                    && out["http"]["headers"].get("content-type").is_none()
                {
                    out["http"]["headers"]["Content-Type"] = json!("application/json");
                }
            }
            Some(other) => {
                return Err(ctx.err(
                    &format!("{path}.provider.arguments"),
                    format!("{other} is not a request body (a map or a string)"),
                ));
            }
        }
        let Some(tol) = tol else {
            // An action: one request, measured; with no tolerance nothing it answers fails it.
            return Ok(out);
        };
        match tol {
            Value::Number(n) => {
                out["http"]["expect-status"] = json!([n]);
                out["tolerance"] = json!({"error-rate": "== 0"});
            }
            Value::Array(list) if list.iter().all(Value::is_number) => {
                out["http"]["expect-status"] = Value::Array(list.clone());
                out["tolerance"] = json!({"error-rate": "== 0"});
            }
            Value::Object(o) if o.get("type") == Some(&json!("range")) && matches!(o.get("target").and_then(Value::as_str), None | Some("status")) => {
                let r = o.get("range").and_then(Value::as_array).filter(|r| r.len() == 2).ok_or_else(|| ctx.err(&tpath, "range needs [low, high]"))?;
                out["tolerance"] = json!({"status": format!("{}..{}", r[0], r[1])});
            }
            Value::Object(o) if o.get("type") == Some(&json!("regex")) && matches!(o.get("target").and_then(Value::as_str), None | Some("body")) => {
                let re = o.get("pattern").and_then(Value::as_str).ok_or_else(|| ctx.err(&tpath, "regex needs a `pattern`"))?;
                out["tolerance"] = json!({"body": format!("~ {re}")});
            }
            Value::Object(o) if o.get("type") == Some(&json!("jsonpath")) && matches!(o.get("target").and_then(Value::as_str), None | Some("body")) => {
                let jp = ctx.str(&tpath, tol, "path")?;
                out["http"]["json-path"] = json!(body_path(ctx, &tpath, o.get("target").is_some(), &jp)?);
                // chaos run: `expect` means exactly one match, equal to it (whatever `count`
                // says); else `count` matches; else at least one.
                let t = match (o.get("expect"), o.get("count")) {
                    (Some(e @ (Value::Number(_) | Value::Bool(_))), _) => json!({"json": format!("== {e}"), "json-count": "== 1"}),
                    (Some(Value::String(e)), _) if !e.trim().is_empty() && !e.contains(char::is_whitespace) => json!({"json": format!("== {e}"), "json-count": "== 1"}),
                    (Some(other), _) => return Err(ctx.err(&tpath, format!("expect {other}: only a number, a word or a bool is supported"))),
                    (None, Some(Value::Number(n))) => json!({"json-count": format!("== {n}")}),
                    (None, Some(other)) => return Err(ctx.err(&tpath, format!("count {other} must be a number"))),
                    (None, None) => json!({"json-count": ">= 1"}),
                };
                out["tolerance"] = t;
            }
            other => return Err(ctx.err(&tpath, format!("{other} is not supported for an http probe (a status code, a list of them, a status range, a regex or a jsonpath on the body)"))),
        }
        return Ok(out);
    }
    let tolerance = match tol {
        None => json!({}),
        Some(tol) => match tol {
        Value::Number(n) => json!({"exit-code": format!("== {n}")}),
        Value::Bool(true) => json!({"exit-code": "== 0"}),
        Value::Object(o) => match (o.get("type").and_then(Value::as_str), o.get("target").and_then(Value::as_str)) {
            (Some("regex"), Some("stdout")) => json!({"stdout": format!("~ {}", o.get("pattern").and_then(Value::as_str).unwrap_or(""))}),
            (Some("range"), Some("status") | Some("exit_code")) => {
                let r = o.get("range").and_then(Value::as_array).filter(|r| r.len() == 2).ok_or_else(|| ctx.err(&tpath, "range needs [low, high]"))?;
                json!({"exit-code": format!("{}..{}", r[0], r[1])})
            }
            _ => return Err(ctx.err(&tpath, format!("{tol} is not supported for a process probe (an exit code, regex on stdout, or a range on status)"))),
        },
        other => return Err(ctx.err(&tpath, format!("{other} is not supported for a process probe"))),
        },
    };
    Ok(json!({
        "name": name,
        "command": {"run": argv(ctx, &format!("{path}.provider"), p)?, "timeout": timeout(p, 30.0)},
        "tolerance": tolerance,
    }))
}

#[derive(Clone, Copy, PartialEq)]
enum Place {
    Method,
    Rollbacks,
}

/// A method or rollback activity: a process action is a command; a probe, or an http action,
/// is a probe step (measured once, recorded, deciding nothing). Pauses go before and after,
/// and a background activity runs beside the ones after it.
fn activity(ctx: &mut Ctx, path: &str, a: &Value, place: Place) -> Result<Vec<Value>, LoadError> {
    let mut name = ctx.str(path, a, "name")?;
    if ctx.used.contains(&name) {
        name = format!("{name} ({path})");
    }
    ctx.used.insert(name.clone());
    let (p, kind) = provider(ctx, path, a)?;
    let is_probe = a.get("type").and_then(Value::as_str) == Some("probe");
    let step = if kind == "process" && (!is_probe || place == Place::Rollbacks) {
        json!({"command": {"name": name, "run": argv(ctx, &format!("{path}.provider"), p)?, "timeout": timeout(p, 60.0)}})
    } else if place == Place::Rollbacks {
        return Err(ctx.err(
            path,
            "http activities are not supported in rollbacks: use a process provider (e.g. curl)",
        ));
    } else {
        let tol = a.get("tolerance").filter(|_| is_probe);
        json!({"probe": measured(ctx, path, a, name, tol)?})
    };
    let pause = |key: &str| -> Option<Value> {
        let s = a.get("pauses")?.get(key)?.as_f64().filter(|s| *s > 0.0)?;
        Some(json!({"pause": format!("{}ms", (s * 1000.0).round() as u64)}))
    };
    if a.get("background").and_then(Value::as_bool) == Some(true) {
        if place == Place::Rollbacks {
            return Err(ctx.err(path, "background activities are not supported in rollbacks"));
        }
        if pause("before").is_some() || pause("after").is_some() {
            return Err(ctx.err(path, "pauses on a background activity are not supported: put a pause action of its own before or after it"));
        }
        return Ok(vec![json!({"background": step})]);
    }
    let mut steps: Vec<Value> = pause("before").into_iter().collect();
    steps.push(step);
    steps.extend(pause("after"));
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ProbeKind, Step};

    const FIXTURE: &str = include_str!("../tests/fixtures/ctk-http.json");

    #[test]
    fn a_real_chaos_toolkit_file_maps_onto_the_model() {
        let e = Experiment::parse(FIXTURE, "ctk-http.json").unwrap();
        let p = e.hypothesis_probes();
        assert_eq!(p.len(), 2);
        match &p[0].kind {
            ProbeKind::Http(h) => {
                assert_eq!(h.url, "http://127.0.0.1:8080/");
                assert_eq!(h.expect_status, vec![200]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p[1].tolerance["stdout"].as_str(), "~ ^ok");
        // flush (command), its pause after, and the ref'd probe run as a command.
        assert_eq!(e.method.len(), 3);
        assert!(
            matches!(&e.method[0], Step::Command(c) if c.run == ["touch", "/tmp/chaos-ctk-marker"])
        );
        assert!(matches!(&e.method[1], Step::Pause(d) if d.0.as_millis() == 1000));
        assert_eq!(e.rollbacks[0].run, ["rm", "-f", "/tmp/chaos-ctk-marker"]);
    }

    #[test]
    fn probes_http_actions_background_and_secrets_map_onto_steps() {
        // cargo sets CARGO_PKG_NAME for the tests it runs: an environment variable that is set.
        let file = json!({
            "title": "t",
            "secrets": {"api": {"token": {"type": "env", "key": "CARGO_PKG_NAME"}, "user": "bob"}},
            "steady-state-hypothesis": {"title": "h", "probes": [
                {"type": "probe", "name": "up", "tolerance": 200,
                 "provider": {"type": "http", "url": "http://127.0.0.1:9/"}}]},
            "method": [
                {"type": "action", "name": "load", "background": true,
                 "provider": {"type": "process", "path": "sh", "arguments": ["-c", "echo ${user}"]}},
                {"type": "action", "name": "poke",
                 "provider": {"type": "http", "url": "http://127.0.0.1:9/${token}", "method": "POST"}},
                {"type": "probe", "name": "count", "tolerance": 0,
                 "provider": {"type": "process", "path": "true"}},
                {"ref": "up"}
            ],
        });
        let e = Experiment::parse(&file.to_string(), "x.json").unwrap();
        assert_eq!(e.semantics, crate::model::Semantics::ChaosToolkit);
        assert!(matches!(&e.method[0], Step::Background(b)
            if matches!(&**b, Step::Command(c) if c.run == ["sh", "-c", "echo bob"])));
        let Step::Probe(poke) = &e.method[1] else {
            panic!("{:?}", e.method[1])
        };
        // An action has no tolerance: measured and recorded, it fails nothing.
        assert!(poke.tolerance.is_empty());
        assert!(
            matches!(&poke.kind, ProbeKind::Http(h) if h.url == "http://127.0.0.1:9/chaos-experiment" && h.method == "POST")
        );
        assert!(
            matches!(&e.method[2], Step::Probe(p) if p.tolerance["exit-code"].as_str() == "== 0")
        );
        // A ref to a hypothesis probe runs it again, under a name of its own.
        assert!(matches!(&e.method[3], Step::Probe(p) if p.name == "up (method[3])"));
    }

    #[test]
    fn what_does_not_map_is_refused_with_the_element() {
        let v: Value = serde_json::from_str(FIXTURE).unwrap();
        let refuse = |edit: &dyn Fn(&mut Value), want: &str| {
            let mut v = v.clone();
            edit(&mut v);
            let e = Experiment::parse(&v.to_string(), "x.json").unwrap_err().0;
            assert!(e.contains(want), "{e}\nwant: {want}");
        };
        refuse(
            &|v| v["method"][0]["provider"] = json!({"type": "python", "module": "chaosk8s.pod.actions", "func": "terminate_pods"}),
            "x.json: method[0]: provider type \"python\" (module chaosk8s.pod.actions) is not supported",
        );
        refuse(
            &|v| {
                v["steady-state-hypothesis"]["probes"][0]["tolerance"] =
                    json!({"type": "jsonpath", "path": "$.body.x", "expect": [1]})
            },
            "steady-state-hypothesis.probes[0].tolerance: expect [1]: only a number, a word or a bool is supported",
        );
        refuse(
            &|v| {
                v["steady-state-hypothesis"]["probes"][0]["tolerance"] =
                    json!({"type": "jsonpath", "path": "$[", "target": "body", "count": 1})
            },
            "http.json-path: `$[` is not a JSONPath",
        );
        refuse(
            &|v| {
                v["steady-state-hypothesis"]["probes"][0]["tolerance"] =
                    json!({"type": "jsonpath", "path": "$.status"})
            },
            "jsonpath `$.status` without `target: body` must start with $.body",
        );
        refuse(
            &|v| {
                v["steady-state-hypothesis"]["probes"][0]["tolerance"] =
                    json!({"type": "probe", "name": "x"})
            },
            "steady-state-hypothesis.probes[0].tolerance: {\"name\":\"x\",\"type\":\"probe\"} is not supported for an http probe",
        );
        refuse(
            &|v| v["secrets"] = json!({"k8s": {"token": {"type": "vault", "path": "x"}}}),
            "x.json: secrets.k8s.token: {\"path\":\"x\",\"type\":\"vault\"} is not a plain value or an env lookup",
        );
        refuse(
            &|v| v["rollbacks"] = json!([{"type": "action", "name": "r", "provider": {"type": "http", "url": "http://127.0.0.1:9/"}}]),
            "x.json: rollbacks[0]: http activities are not supported in rollbacks",
        );
        refuse(
            &|v| {
                v["method"][0]["background"] = json!(true);
                v["method"][0]["pauses"] = json!({"after": 1});
            },
            "x.json: method[0]: pauses on a background activity are not supported",
        );
        refuse(
            &|v| v["method"][1] = json!({"ref": "nope"}),
            "method[1]: ref `nope` names no earlier probe or action",
        );
        refuse(
            &|v| {
                v["configuration"]["marker"] =
                    json!({"type": "env", "key": "CHAOS_SURELY_UNSET_VAR"})
            },
            "configuration.marker: environment variable CHAOS_SURELY_UNSET_VAR is not set",
        );
    }
}
