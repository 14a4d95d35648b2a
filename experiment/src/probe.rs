//! Probes: each measures the system once and returns a sample with its measures checked
//! against the probe's tolerances.
//!
//! HTTP and Prometheus probes speak HTTP/1.1 through [`crate::http_client`]: a fresh connection
//! per request, as a new client would, so a latency is connect + request + the whole response.
use crate::http_client::Target;
use crate::model::{
    CommandProbe, DnsProbe, HttpProbe, Probe, ProbeKind, PrometheusProbe, TcpProbe,
};
use crate::record::{Measure, Phase, ProbeSample};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::net::{TcpStream, UdpSocket};

/// Runs `probe` once. `t0` is the run's start (sample times are relative to it).
pub async fn run(probe: &Probe, phase: Phase, t0: Instant) -> ProbeSample {
    let start_ms = t0.elapsed().as_millis() as u64;
    let result = match &probe.kind {
        ProbeKind::Http(p) => http(p, probe.tolerance.contains_key("body")).await,
        ProbeKind::Prometheus(p) => prometheus(p).await,
        ProbeKind::Tcp(p) => tcp(p).await,
        ProbeKind::Dns(p) => dns(p).await,
        ProbeKind::Command(p) => command(p).await,
    };
    let (mut measures, error) = match result {
        Ok(m) => (m, None),
        Err(e) => (vec![], Some(e)),
    };
    for m in &mut measures {
        if let Some(t) = probe.tolerance.get(&m.name) {
            t.check(m);
        }
        // A body is checked whole and recorded as one short line: reports are read by people.
        if m.name == "body"
            && let Some(t) = &mut m.text
        {
            *t = chaos_spec::one_line(t, RECORDED_BODY).into_owned();
        }
    }
    // A tolerance on a measure the probe could not produce is a violation, not a pass.
    for (name, t) in &probe.tolerance {
        if !measures.iter().any(|m| &m.name == name) {
            measures.push(Measure {
                name: name.clone(),
                value: None,
                text: None,
                tolerance: Some(t.as_str().to_string()),
                ok: false,
            });
        }
    }
    let ok = error.is_none() && measures.iter().all(|m| m.ok);
    ProbeSample {
        probe: probe.name.clone(),
        phase,
        start_ms,
        end_ms: t0.elapsed().as_millis() as u64,
        ok,
        measures,
        error,
    }
}

/// How much of an answer's body a record keeps.
const RECORDED_BODY: usize = 256;

fn num(name: &str, v: f64) -> Measure {
    Measure {
        name: name.into(),
        value: Some(v),
        text: None,
        tolerance: None,
        ok: true,
    }
}

fn text(name: &str, v: f64, t: String) -> Measure {
    Measure {
        name: name.into(),
        value: Some(v),
        text: Some(t),
        tolerance: None,
        ok: true,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Requests at a fixed rate over the window (open loop: a slow answer does not delay the next
/// request, so latency under fault is not hidden by coordinated omission).
///
/// The last answer's body is kept only when something measures it (`keep_body`, or a
/// JSONPath).
async fn http(p: &HttpProbe, keep_body: bool) -> Result<Vec<Measure>, String> {
    let keep_body = keep_body || p.json_path.is_some();
    let url = std::sync::Arc::new(Target::new(&p.url, p.ca.as_deref())?);
    let n = ((p.rate * p.window.0.as_secs_f64()).round() as usize).max(1);
    let gap = Duration::from_secs_f64(1.0 / p.rate);
    let mut set = tokio::task::JoinSet::new();
    let start = tokio::time::Instant::now();
    for i in 0..n {
        tokio::time::sleep_until(start + gap * i as u32).await;
        let (url, method, headers, body, timeout) = (
            url.clone(),
            p.method.clone(),
            p.headers.clone(),
            p.body.clone(),
            p.timeout.0,
        );
        set.spawn(async move {
            let t = Instant::now();
            let r = tokio::time::timeout(timeout, url.exchange(&method, &headers, &body)).await;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            match r {
                Ok(Ok(answer)) => (i, ms, Ok((answer.status, answer.body))),
                Ok(Err(e)) => (i, ms, Err(e)),
                Err(_) => (i, ms, Err(format!("no answer within {timeout:?}"))),
            }
        });
    }
    let mut lat = Vec::with_capacity(n);
    let mut errors = 0usize;
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut first_error: Option<String> = None;
    // The body of the last request (in the order they were sent) that was answered.
    let mut last_body: Option<(usize, Vec<u8>)> = None;
    while let Some(r) = set.join_next().await {
        let Ok((i, ms, answer)) = r else {
            errors += 1;
            continue;
        };
        lat.push(ms);
        let status = answer.map(|(s, body)| {
            if keep_body && last_body.as_ref().is_none_or(|(j, _)| *j < i) {
                last_body = Some((i, body));
            }
            s
        });
        match status {
            Ok(s) => {
                *statuses.entry(s).or_default() += 1;
                let good = if p.expect_status.is_empty() {
                    (200..400).contains(&s)
                } else {
                    p.expect_status.contains(&s)
                };
                if !good {
                    errors += 1;
                }
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let mut m = vec![
        num("p50-ms", percentile(&lat, 50.0)),
        num("p95-ms", percentile(&lat, 95.0)),
        num("p99-ms", percentile(&lat, 99.0)),
        num("error-rate", errors as f64 / n as f64),
        num("requests", n as f64),
    ];
    if let Some((s, _)) = statuses.iter().max_by_key(|(_, c)| **c) {
        m.push(num("status", *s as f64));
    }
    if let Some((_, body)) = last_body {
        m.extend(body_measures(p, &body));
    }
    // Why requests failed, when some did without an answer: what an SRE reads first.
    if let Some(e) = first_error {
        m.push(Measure {
            name: "first-error".into(),
            value: None,
            text: Some(e),
            tolerance: None,
            ok: true,
        });
    }
    Ok(m)
}

/// `body` (the text), and with a JSONPath `json` (its first match) and `json-count`. A body
/// that is not JSON has no `json-count`, so a tolerance on it fails.
fn body_measures(p: &HttpProbe, body: &[u8]) -> Vec<Measure> {
    let mut m = vec![Measure {
        name: "body".into(),
        value: None,
        text: Some(String::from_utf8_lossy(body).into_owned()),
        tolerance: None,
        ok: true,
    }];
    let Some(path) = p
        .json_path
        .as_deref()
        .and_then(|s| serde_json_path::JsonPath::parse(s).ok())
    else {
        return m;
    };
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else {
        return m;
    };
    let found = path.query(&doc).all();
    m.push(num("json-count", found.len() as f64));
    match found.first() {
        Some(serde_json::Value::Number(n)) => m.push(num("json", n.as_f64().unwrap_or(f64::NAN))),
        Some(serde_json::Value::String(s)) => m.push(Measure {
            name: "json".into(),
            value: s.parse().ok(),
            text: Some(s.clone()),
            tolerance: None,
            ok: true,
        }),
        Some(other) => m.push(Measure {
            name: "json".into(),
            value: None,
            text: Some(other.to_string()),
            tolerance: None,
            ok: true,
        }),
        None => {}
    }
    m
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query (one series or a scalar), or a range query ending now.
async fn prometheus(p: &PrometheusProbe) -> Result<Vec<Measure>, String> {
    let base = Target::new(&p.url, p.ca.as_deref())?;
    let prefix = base.path().trim_end_matches('/').to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let path = match p.range {
        None => format!("{prefix}/api/v1/query?query={}", urlencode(&p.query)),
        Some(w) => format!(
            "{prefix}/api/v1/query_range?query={}&start={:.3}&end={now:.3}&step={}",
            urlencode(&p.query),
            now - w.0.as_secs_f64(),
            p.step.0.as_secs_f64()
        ),
    };
    let answer = tokio::time::timeout(
        p.timeout.0,
        base.at(path).exchange("GET", &BTreeMap::new(), ""),
    )
    .await
    .map_err(|_| format!("no answer within {:?}", p.timeout.0))??;
    let (status, body) = (answer.status, answer.body);
    let v: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| format!("HTTP {status}: not JSON: {e}"))?;
    if v["status"] != "success" {
        return Err(format!(
            "HTTP {status}: {}",
            v["error"].as_str().unwrap_or("query failed")
        ));
    }
    let data = &v["data"];
    let parse = |pair: &serde_json::Value| -> Option<f64> { pair.get(1)?.as_str()?.parse().ok() };
    match data["resultType"].as_str() {
        Some("scalar") => Ok(vec![num(
            "value",
            parse(&data["result"]).ok_or("bad scalar")?,
        )]),
        Some("vector") => {
            let r = data["result"].as_array().ok_or("bad vector")?;
            if r.len() != 1 {
                return Err(format!(
                    "`{}` returned {} series; a probe needs exactly one (aggregate it, e.g. sum(...))",
                    p.query,
                    r.len()
                ));
            }
            Ok(vec![num(
                "value",
                parse(&r[0]["value"]).ok_or("bad sample")?,
            )])
        }
        Some("matrix") => {
            let r = data["result"].as_array().ok_or("bad matrix")?;
            if r.len() != 1 {
                return Err(format!(
                    "`{}` returned {} series; a probe needs exactly one",
                    p.query,
                    r.len()
                ));
            }
            let vals: Vec<f64> = r[0]["values"]
                .as_array()
                .ok_or("bad matrix")?
                .iter()
                .filter_map(parse)
                .collect();
            let last = *vals.last().ok_or("no samples in the range")?;
            let min = vals.iter().copied().fold(f64::INFINITY, f64::min);
            let max = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            Ok(vec![num("value", last), num("min", min), num("max", max)])
        }
        other => Err(format!("unexpected result type {other:?}")),
    }
}

async fn tcp(p: &TcpProbe) -> Result<Vec<Measure>, String> {
    let t = Instant::now();
    let ok = matches!(
        tokio::time::timeout(p.timeout.0, TcpStream::connect(p.address)).await,
        Ok(Ok(_))
    );
    let mut m = vec![num("ok", if ok { 1.0 } else { 0.0 })];
    if ok {
        m.push(num("connect-ms", t.elapsed().as_secs_f64() * 1000.0));
    }
    Ok(m)
}

fn qtype(name: &str) -> Result<u16, String> {
    Ok(match name.to_ascii_uppercase().as_str() {
        "A" => 1,
        "NS" => 2,
        "CNAME" => 5,
        "SOA" => 6,
        "PTR" => 12,
        "MX" => 15,
        "TXT" => 16,
        "AAAA" => 28,
        "SRV" => 33,
        other => {
            return Err(format!(
                "dns.type: `{other}` is not one of A, AAAA, CNAME, MX, NS, PTR, SOA, SRV, TXT"
            ));
        }
    })
}

const RCODES: [&str; 11] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET",
    "NXRRSET", "NOTAUTH", "NOTZONE",
];

/// One UDP query: rcode, answer count, time. No answer within the timeout is an error.
async fn dns(p: &DnsProbe) -> Result<Vec<Measure>, String> {
    let mut q = Vec::with_capacity(64);
    let id: u16 = (std::process::id() as u16) ^ (Instant::now().elapsed().subsec_nanos() as u16);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in p.name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "dns.name: `{}` has an empty or too long label",
                p.name
            ));
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype(&p.qtype)?.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    let bind = if p.server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let sock = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    let t = Instant::now();
    sock.send_to(&q, p.server)
        .await
        .map_err(|e| format!("send to {}: {e}", p.server))?;
    let mut buf = [0u8; 1500];
    let deadline = tokio::time::Instant::now() + p.timeout.0;
    loop {
        let (n, from) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf))
            .await
            .map_err(|_| format!("no answer from {} within {:?}", p.server, p.timeout.0))?
            .map_err(|e| e.to_string())?;
        if from != p.server || n < 12 || buf[0..2] != id.to_be_bytes() {
            continue;
        }
        let rcode = (buf[3] & 0x0f) as usize;
        let answers = u16::from_be_bytes([buf[6], buf[7]]);
        return Ok(vec![
            text(
                "rcode",
                rcode as f64,
                RCODES
                    .get(rcode)
                    .map_or_else(|| rcode.to_string(), |s| s.to_string()),
            ),
            num("answers", answers as f64),
            num("ms", t.elapsed().as_secs_f64() * 1000.0),
        ]);
    }
}

async fn command(p: &CommandProbe) -> Result<Vec<Measure>, String> {
    let t = Instant::now();
    let out = run_command(&p.run, p.timeout.0).await?;
    let mut stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    stdout.truncate(4096);
    Ok(vec![
        num("exit-code", out.status.code().unwrap_or(-1) as f64),
        Measure {
            name: "stdout".into(),
            value: None,
            text: Some(stdout),
            tolerance: None,
            ok: true,
        },
        num("ms", t.elapsed().as_secs_f64() * 1000.0),
    ])
}

/// Runs argv (no shell) with a timeout; the child is killed when the time is up.
pub async fn run_command(
    argv: &[String],
    timeout: Duration,
) -> Result<std::process::Output, String> {
    let (prog, args) = argv.split_first().ok_or("empty command")?;
    let child = tokio::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("run {prog}: {e}"))?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(o)) => Ok(o),
        Ok(Err(e)) => Err(format!("{prog}: {e}")),
        Err(_) => Err(format!("{prog} did not finish within {timeout:?} (killed)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tolerance::Tolerance;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn tol(pairs: &[(&str, &str)]) -> BTreeMap<String, Tolerance> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Tolerance::try_from(v.to_string()).unwrap()))
            .collect()
    }

    /// A real HTTP server on loopback answering `status` after `delay`, with `body`.
    async fn server(status: u16, delay: Duration, body: &'static str) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let _ = s.read(&mut buf).await;
                    tokio::time::sleep(delay).await;
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        addr
    }

    fn http_probe(addr: std::net::SocketAddr, t: &[(&str, &str)]) -> Probe {
        Probe {
            name: "web".into(),
            kind: ProbeKind::Http(HttpProbe {
                url: format!("http://{addr}/x"),
                method: "GET".into(),
                rate: 50.0,
                window: crate::model::Dur(Duration::from_millis(400)),
                timeout: crate::model::Dur(Duration::from_millis(500)),
                expect_status: vec![],
                headers: BTreeMap::new(),
                ca: None,
                body: String::new(),
                json_path: None,
            }),
            tolerance: tol(t),
        }
    }

    #[tokio::test]
    async fn http_measures_latency_errors_and_status_against_a_real_server() {
        let fast = server(200, Duration::ZERO, "ok").await;
        let s = run(
            &http_probe(fast, &[("p99-ms", "< 100"), ("error-rate", "== 0")]),
            Phase::Before,
            Instant::now(),
        )
        .await;
        assert!(s.ok, "{s:?}");
        assert_eq!(s.measure("requests").unwrap().value, Some(20.0));
        assert_eq!(s.measure("status").unwrap().value, Some(200.0));

        let slow = server(200, Duration::from_millis(150), "ok").await;
        let s = run(
            &http_probe(slow, &[("p50-ms", "< 100")]),
            Phase::During,
            Instant::now(),
        )
        .await;
        assert!(!s.ok);
        let p50 = s.measure("p50-ms").unwrap().value.unwrap();
        assert!((150.0..400.0).contains(&p50), "p50 {p50}");

        let failing = server(503, Duration::ZERO, "no").await;
        let s = run(
            &http_probe(failing, &[("error-rate", "<= 0.01")]),
            Phase::During,
            Instant::now(),
        )
        .await;
        assert!(!s.ok);
        assert_eq!(s.measure("error-rate").unwrap().value, Some(1.0));

        // Nothing listening: every request fails, and the sample says so through error-rate.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = l.local_addr().unwrap();
        drop(l);
        let s = run(
            &http_probe(gone, &[("error-rate", "<= 0.01")]),
            Phase::During,
            Instant::now(),
        )
        .await;
        assert_eq!(s.measure("error-rate").unwrap().value, Some(1.0));
        assert!(!s.ok);
    }

    /// Answers every request, chunked, with `{"echo": REQUEST BODY, "items": [{"v": 1}, {"v": 2}]}`.
    async fn echo_server() -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 2048];
                    let body = loop {
                        let Ok(n) = s.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        req.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&req).into_owned();
                        let Some((head, body)) = text.split_once("\r\n\r\n") else {
                            continue;
                        };
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            break body.to_string();
                        }
                    };
                    let doc = serde_json::json!({"echo": body, "items": [{"v": 1}, {"v": 2}]})
                        .to_string();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{doc}\r\n0\r\n\r\n",
                        doc.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn an_http_probe_sends_its_body_and_measures_the_answers_by_regex_and_jsonpath() {
        let addr = echo_server().await;
        let probe = |json_path: &str, t: &[(&str, &str)]| {
            let mut p = http_probe(addr, t);
            let ProbeKind::Http(h) = &mut p.kind else {
                unreachable!()
            };
            (h.method, h.body, h.rate) = ("POST".into(), r#"{"drain": true}"#.into(), 5.0);
            h.json_path = Some(json_path.into());
            p
        };
        let t0 = Instant::now();
        let s = run(
            &probe(
                "$.items[*].v",
                &[
                    ("body", r#"~ "echo":"\{\\"drain\\": true\}""#),
                    ("json", "== 1"),
                    ("json-count", "== 2"),
                ],
            ),
            Phase::Before,
            t0,
        )
        .await;
        assert!(s.ok, "{s:?}");
        let m = |s: &ProbeSample, n: &str| s.measures.iter().find(|m| m.name == n).cloned();
        assert_eq!(m(&s, "json").and_then(|m| m.value), Some(1.0));
        // A string that reads as a number compares as one; out of tolerance fails the sample.
        let s = run(&probe("$.echo", &[("json", "== 2")]), Phase::Before, t0).await;
        assert!(!s.ok, "{s:?}");
        assert_eq!(
            m(&s, "json").and_then(|m| m.text).as_deref(),
            Some(r#"{"drain": true}"#)
        );
        // No match: json-count 0, and no `json` measure, so a tolerance on it fails.
        let s = run(
            &probe("$.nope", &[("json-count", ">= 1")]),
            Phase::Before,
            t0,
        )
        .await;
        assert!(!s.ok);
        assert_eq!(m(&s, "json-count").and_then(|m| m.value), Some(0.0));
    }

    #[tokio::test]
    async fn prometheus_reads_one_series_and_refuses_several() {
        // A server speaking the Prometheus HTTP API's JSON (the real Prometheus is exercised by
        // the integration tests in tests/tests/experiments.rs).
        let one = server(200, Duration::ZERO, r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"3"]}]}}"#).await;
        let p = Probe {
            name: "prom".into(),
            kind: ProbeKind::Prometheus(PrometheusProbe {
                url: format!("http://{one}"),
                query: "sum(up)".into(),
                range: None,
                step: crate::model::Dur(Duration::from_secs(1)),
                timeout: crate::model::Dur(Duration::from_secs(1)),
                ca: None,
            }),
            tolerance: tol(&[("value", ">= 2")]),
        };
        let s = run(&p, Phase::Before, Instant::now()).await;
        assert!(s.ok, "{s:?}");
        assert_eq!(s.measure("value").unwrap().value, Some(3.0));
        let two = server(200, Duration::ZERO, r#"{"status":"success","data":{"resultType":"vector","result":[{"value":[1,"1"]},{"value":[1,"2"]}]}}"#).await;
        let mut p2 = p.clone();
        if let ProbeKind::Prometheus(pp) = &mut p2.kind {
            pp.url = format!("http://{two}");
        }
        let s = run(&p2, Phase::Before, Instant::now()).await;
        assert!(!s.ok);
        assert!(s.error.unwrap().contains("returned 2 series"));
    }

    /// A server that answers every request with `head` (status line and headers) and `body`
    /// written as given: raw framing, as a real server might send it.
    async fn raw_server(answer: String) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(answer.as_bytes()).await;
                });
            }
        });
        addr
    }

    fn prom(url: String, ca: Option<std::path::PathBuf>) -> Probe {
        Probe {
            name: "prom".into(),
            kind: ProbeKind::Prometheus(PrometheusProbe {
                url,
                query: "sum(up)".into(),
                range: None,
                step: crate::model::Dur(Duration::from_secs(1)),
                timeout: crate::model::Dur(Duration::from_secs(2)),
                ca,
            }),
            tolerance: tol(&[("value", "== 3")]),
        }
    }

    #[tokio::test]
    async fn a_chunked_answer_is_read_as_its_body_and_a_huge_one_is_refused() {
        // Prometheus sends bodies over a few KB chunked; the padding label makes this one big.
        let json = format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"metric":{{"pad":"{}"}},"value":[1,"3"]}}]}}}}"#,
            "x".repeat(20_000)
        );
        let mut chunked = String::from(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        for part in json.as_bytes().chunks(4096) {
            chunked.push_str(&format!("{:x}\r\n", part.len()));
            chunked.push_str(std::str::from_utf8(part).unwrap());
            chunked.push_str("\r\n");
        }
        chunked.push_str("0\r\n\r\n");
        let addr = raw_server(chunked).await;
        let s = run(
            &prom(format!("http://{addr}"), None),
            Phase::Before,
            Instant::now(),
        )
        .await;
        assert!(s.ok, "{s:?}");
        assert_eq!(s.measure("value").unwrap().value, Some(3.0));

        // A body over the limit is an error naming the limit, not memory.
        let huge = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            crate::http_client::BODY_LIMIT + 1
        );
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(huge.as_bytes()).await;
            let zeros = vec![b'0'; 1 << 20];
            for _ in 0..17 {
                if s.write_all(&zeros).await.is_err() {
                    return;
                }
            }
        });
        let s = run(
            &prom(format!("http://{addr}"), None),
            Phase::Before,
            Instant::now(),
        )
        .await;
        let e = s.error.unwrap();
        assert!(e.contains("over 16 MiB"), "{e}");
    }

    #[tokio::test]
    async fn https_is_verified_against_the_probes_ca_and_refused_without_it() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(vec![]).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".into()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let dir = std::env::temp_dir().join(format!("chaos-probe-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, ca.pem()).unwrap();

        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(s).await else {
                        return;
                    };
                    let mut buf = [0u8; 2048];
                    let _ = s.read(&mut buf).await;
                    let body =
                        r#"{"status":"success","data":{"resultType":"scalar","result":[1,"3"]}}"#;
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                    let _ = s.shutdown().await;
                });
            }
        });
        let url = format!("https://{addr}");
        let s = run(
            &prom(url.clone(), Some(ca_pem)),
            Phase::Before,
            Instant::now(),
        )
        .await;
        assert!(s.ok, "{s:?}");
        // The system's roots do not know this CA: refused, and the error says what to do.
        let s = run(&prom(url, None), Phase::Before, Instant::now()).await;
        let e = s.error.unwrap();
        assert!(e.contains("not signed by a trusted CA"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn tcp_dns_and_command_probes() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let tcp_probe = |a| Probe {
            name: "port".into(),
            kind: ProbeKind::Tcp(TcpProbe {
                address: a,
                timeout: crate::model::Dur(Duration::from_millis(300)),
            }),
            tolerance: tol(&[("ok", "== 1")]),
        };
        assert!(
            run(&tcp_probe(addr), Phase::Before, Instant::now())
                .await
                .ok
        );
        drop(l);
        assert!(
            !run(&tcp_probe(addr), Phase::Before, Instant::now())
                .await
                .ok
        );

        // A real UDP DNS responder: NXDOMAIN for everything.
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                buf[2] |= 0x80;
                buf[3] = 0x83;
                let _ = sock.send_to(&buf[..n], from).await;
            }
        });
        let dns_probe = |t: &[(&str, &str)]| Probe {
            name: "dns".into(),
            kind: ProbeKind::Dns(DnsProbe {
                server,
                name: "db.example".into(),
                qtype: "A".into(),
                timeout: crate::model::Dur(Duration::from_millis(500)),
            }),
            tolerance: tol(t),
        };
        let s = run(
            &dns_probe(&[("rcode", "== NXDOMAIN")]),
            Phase::Before,
            Instant::now(),
        )
        .await;
        assert!(s.ok, "{s:?}");
        assert!(
            !run(
                &dns_probe(&[("rcode", "== NOERROR")]),
                Phase::Before,
                Instant::now()
            )
            .await
            .ok
        );

        let cmd = |argv: &[&str], t: &[(&str, &str)]| Probe {
            name: "cmd".into(),
            kind: ProbeKind::Command(CommandProbe {
                run: argv.iter().map(|s| s.to_string()).collect(),
                timeout: crate::model::Dur(Duration::from_millis(500)),
            }),
            tolerance: tol(t),
        };
        assert!(
            run(
                &cmd(
                    &["/bin/echo", "ok fine"],
                    &[("exit-code", "== 0"), ("stdout", "~ ^ok")]
                ),
                Phase::Before,
                Instant::now()
            )
            .await
            .ok
        );
        assert!(
            !run(
                &cmd(&["/bin/false"], &[("exit-code", "== 0")]),
                Phase::Before,
                Instant::now()
            )
            .await
            .ok
        );
        let s = run(
            &cmd(&["/bin/sleep", "5"], &[("exit-code", "== 0")]),
            Phase::Before,
            Instant::now(),
        )
        .await;
        assert!(s.error.unwrap().contains("did not finish"));
    }
}
