//! chaosctl commands that go through a chaos-controller: agents, inject, revert.
use crate::cli::refuse;
use crate::controller_client::{self, ControllerFlags};
use crate::output::event;
use anyhow::Result;
use chaos_agent::spec::{self, FaultSpec};
use chaos_proto::agent::v1 as pb;
use chaos_proto::fleet::v1 as fleet;
use chaos_proto::fleet::v1::controller_client::ControllerClient;
use serde_json::json;
use std::process::ExitCode;

/// A refusal (bad input, nothing matched, an agent said no) is exit 2 with the line; anything
/// else is an error.
fn outcome(s: tonic::Status) -> Result<ExitCode> {
    match s.code() {
        tonic::Code::InvalidArgument
        | tonic::Code::FailedPrecondition
        | tonic::Code::PermissionDenied
        | tonic::Code::NotFound => refuse(s.message()),
        _ => Err(controller_client::CallFailed(s).into()),
    }
}

pub async fn agents(ctl: &ControllerFlags, json: bool) -> Result<ExitCode> {
    let mut c = ControllerClient::new(controller_client::connect(ctl).await?);
    let agents = match c.list_agents(fleet::ListAgentsRequest {}).await {
        Ok(r) => r.into_inner().agents,
        Err(s) => return outcome(s),
    };
    for a in &agents {
        let caps = a.capabilities.clone().unwrap_or_default();
        // A kind two backends run (latency: netem and EDT) is listed once.
        let kinds: Vec<String> = caps
            .backends
            .iter()
            .filter(|b| b.available)
            .flat_map(|b| b.fault_kinds.iter().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        if json {
            println!(
                "{}",
                json!({
                    "node": a.node_name, "labels": a.labels, "arch": caps.arch,
                    "kernel": caps.kernel, "version": a.agent_version, "peer": a.peer,
                    "connected_unix_ms": a.connected_unix_ms, "faults": a.faults,
                    "fault_kinds": kinds,
                })
            );
        } else {
            println!(
                "{:<20} {:<8} {:<24} faults={:<3} labels={} kinds={}",
                a.node_name,
                caps.arch,
                caps.kernel,
                a.faults,
                labels.join(","),
                kinds.join(",")
            );
        }
    }
    if !json && agents.is_empty() {
        println!("no agents connected");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn inject(
    ctl: &ControllerFlags,
    spec: FaultSpec,
    on: &[String],
    selector: &[(String, String)],
    json: bool,
) -> Result<ExitCode> {
    if let Err(e) = spec.validate(spec::DEFAULT_MAX_DURATION) {
        return refuse(e);
    }
    let mut c = ControllerClient::new(controller_client::connect(ctl).await?);
    let req = fleet::FleetApplyRequest {
        selector: Some(fleet::Selector {
            agents: on.to_vec(),
            labels: selector.iter().cloned().collect(),
        }),
        spec: Some(pb::FaultSpec::from(&spec)),
    };
    match c.apply(req).await {
        Ok(r) => {
            for af in r.into_inner().faults {
                let f = af.fault.unwrap_or_default();
                event(
                    json,
                    "applied",
                    &f.id,
                    None,
                    json!({ "agent": af.node_name, "backend": f.backend, "deadline_unix_ms": f.deadline_unix_ms }),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(s) => outcome(s),
    }
}

/// Every agent's faults, each with its node; agents that did not answer are named on stderr.
pub async fn list(ctl: &ControllerFlags, json: bool) -> Result<ExitCode> {
    let mut c = ControllerClient::new(controller_client::connect(ctl).await?);
    let r = match c.list_faults(fleet::ListFaultsRequest {}).await {
        Ok(r) => r.into_inner(),
        Err(s) => return outcome(s),
    };
    let faults: Vec<_> = r
        .faults
        .into_iter()
        .map(|af| (Some(af.node_name), af.fault.unwrap_or_default()))
        .collect();
    crate::cli::print_faults(&faults, json);
    for e in &r.errors {
        crate::output::error(format!("agent {e}"), 1);
    }
    Ok(if r.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `watch ID` through the controller: the fault's counters from its agent every interval,
/// until it ends (then its final counters, which the controller keeps).
pub async fn watch(ctl: &ControllerFlags, id: &str, interval: f64, json: bool) -> Result<ExitCode> {
    let every = match crate::cli::watch_interval(interval) {
        Ok(d) => d,
        Err(line) => return refuse(line),
    };
    let mut c = ControllerClient::new(controller_client::connect(ctl).await?);
    let mut node: Option<String> = None;
    loop {
        let listed = match c.list_faults(fleet::ListFaultsRequest {}).await {
            Ok(r) => r.into_inner(),
            Err(s) => return outcome(s),
        };
        let found = listed
            .faults
            .into_iter()
            .find(|af| af.fault.as_ref().is_some_and(|f| f.id == id));
        match (found, &node) {
            (Some(af), _) => {
                let f = af.fault.unwrap_or_default();
                let counters = f.counters.unwrap_or_default().into();
                event(
                    json,
                    "counters",
                    id,
                    Some(&counters),
                    json!({ "agent": af.node_name }),
                );
                node = Some(af.node_name);
            }
            (None, None) => return refuse(format!("no fault {id} on any connected agent")),
            (None, Some(n)) => {
                let req = fleet::FleetCountersRequest {
                    node_name: n.clone(),
                    id: id.to_string(),
                };
                let last = c
                    .counters(req)
                    .await
                    .map(|r| r.into_inner())
                    .unwrap_or_default();
                event(json, "ended", id, Some(&last.into()), json!({ "agent": n }));
                return Ok(ExitCode::SUCCESS);
            }
        }
        tokio::time::sleep(every).await;
    }
}

pub async fn revert(
    ctl: &ControllerFlags,
    id: Option<String>,
    all: bool,
    on: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    if id.is_none() && !all && on.is_none() {
        return refuse("invalid revert: give a fault id, --on NODE, or --all");
    }
    let mut c = ControllerClient::new(controller_client::connect(ctl).await?);
    let req = fleet::FleetRevertRequest {
        node_name: on.unwrap_or_default(),
        id: id.unwrap_or_default(),
        all,
    };
    match c.revert(req).await {
        Ok(r) => {
            for af in r.into_inner().reverted {
                let f = af.fault.unwrap_or_default();
                let counters = f.counters.unwrap_or_default().into();
                event(
                    json,
                    "reverted",
                    &f.id,
                    Some(&counters),
                    json!({ "agent": af.node_name }),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(s) => outcome(s),
    }
}
