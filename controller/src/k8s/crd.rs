//! The custom resources, derived from the Rust types: the spec of a `ChaosExperiment` is the
//! experiment model itself (what `chaosctl run FILE` reads), so a file moves into a cluster
//! unchanged. `deploy/base/crds/` holds the YAML generated from here; a test fails when the
//! two differ (`chaos-controller crds > deploy/base/crds/chaos.yaml` regenerates it).
use chaos_experiment::Experiment;
use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every chaos resource.
pub const GROUP: &str = "chaos.dev";

/// An experiment, run once by the controller in the cluster.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "chaos.dev",
    version = "v1alpha1",
    kind = "ChaosExperiment",
    namespaced,
    status = "ChaosExperimentStatus",
    shortname = "chaosexp",
    category = "chaos",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Verdict","type":"string","jsonPath":".status.verdict"}"#,
    printcolumn = r#"{"name":"Recovery-ms","type":"integer","jsonPath":".status.recoveryMs"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct ChaosExperimentSpec {
    #[serde(flatten)]
    #[schemars(flatten)]
    pub experiment: Experiment,
}

/// Where a run is. Terminal phases are never left: a new run is a new object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Accepted, not started (waiting for leadership or agents).
    Pending,
    Running,
    /// Deleted while running: faults are being reverted before the finalizer goes.
    Reverting,
    /// Finished with a verdict (which may be Violated: the system failed, not the run).
    Completed,
    /// The run could not start or was refused (invalid spec, blast radius, protected pods).
    Failed,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed)
    }
}

/// A condition in the Kubernetes style.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    pub reason: String,
    pub message: String,
    /// RFC 3339.
    pub last_transition_time: String,
}

/// One fault as applied: on which pod, through which agent, and what it did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultStatus {
    /// The fault action's name in the method.
    pub name: String,
    /// The node (agent) holding it.
    pub agent: String,
    /// The agent's fault id.
    pub id: String,
    /// The pod (namespace/name) for a pod target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub packets_seen: u64,
    pub packets_affected: u64,
    /// pod-kill: from the kill until the selected pods were all Ready again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChaosExperimentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// held, violated, aborted or inconclusive (the exit code of `chaosctl run`: 0, 1, 2, 3);
    /// completed (0) when the spec has no hypothesis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// One line: why the run ended as it did, or why it could not start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The run in the controller's history (`chaosctl experiments show ID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// From the last revert until the hypothesis held again (an upper bound: see the README).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<FaultStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Recurring game days: a ChaosExperiment created from `experiment` at each `schedule` time.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "chaos.dev",
    version = "v1alpha1",
    kind = "ChaosSchedule",
    namespaced,
    status = "ChaosScheduleStatus",
    shortname = "chaossched",
    category = "chaos",
    printcolumn = r#"{"name":"Schedule","type":"string","jsonPath":".spec.schedule"}"#,
    printcolumn = r#"{"name":"Suspend","type":"boolean","jsonPath":".spec.suspend"}"#,
    printcolumn = r#"{"name":"Last","type":"date","jsonPath":".status.lastScheduleTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "kebab-case")]
pub struct ChaosScheduleSpec {
    /// Cron, five fields, UTC: "0 14 * * 3" is Wednesdays at 14:00.
    pub schedule: String,
    /// Create no new runs (running ones go on).
    #[serde(default)]
    pub suspend: bool,
    /// Finished runs kept whose verdict was held; older ones are deleted.
    #[serde(default = "three")]
    pub successful_history_limit: u32,
    /// Finished runs kept that were not held (violated, aborted, inconclusive, failed).
    #[serde(default = "one")]
    pub failed_history_limit: u32,
    /// Forbid (default): a time is skipped while the previous run still runs. Allow: runs may
    /// overlap.
    #[serde(default)]
    pub concurrency_policy: ConcurrencyPolicy,
    /// The experiment each run is made from (a ChaosExperiment's spec).
    pub experiment: Experiment,
}

fn three() -> u32 {
    3
}
fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConcurrencyPolicy {
    #[default]
    Forbid,
    Allow,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChaosScheduleStatus {
    /// The last schedule time a run was created for (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<String>,
    /// Runs (ChaosExperiment names) not finished yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub active: Vec<String>,
    /// Why the schedule does nothing (an invalid cron or experiment), when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Every CRD of ours.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![ChaosExperiment::crd(), ChaosSchedule::crd()]
}

/// Every CRD of ours, as the YAML stream committed in deploy/base/crds/.
pub fn crds_yaml() -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::from(
        "# Generated by `chaos-controller crds` from controller/src/k8s/crd.rs: do not edit.\n",
    );
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed CRDs are the ones the code generates: edit the types, then run
    /// `cargo run -p chaos-controller --bin chaos-controller -- crds > deploy/base/crds/chaos.yaml`.
    #[test]
    fn committed_crds_match_the_code() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/base/crds/chaos.yaml"
        );
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        let generated = crds_yaml().expect("serialize the CRDs");
        assert!(
            committed == generated,
            "{path} is out of date: regenerate it with `chaos-controller crds`"
        );
    }

    /// The rules of a structural schema that the API server checks and no tool here can: every
    /// node has a type (or keeps unknown fields), no `$ref`, no `additionalProperties: false`,
    /// and never `properties` beside `additionalProperties`.
    #[test]
    fn schemas_are_structural() {
        fn walk(path: &str, v: &serde_json::Value, bad: &mut Vec<String>) {
            let Some(o) = v.as_object() else { return };
            let keeps = o.get("x-kubernetes-preserve-unknown-fields") == Some(&true.into());
            if !o.contains_key("type") && !keeps {
                bad.push(format!("{path}: no type"));
            }
            for k in ["$ref", "anyOf", "oneOf", "allOf"] {
                if o.contains_key(k) {
                    bad.push(format!("{path}: {k}"));
                }
            }
            match o.get("additionalProperties") {
                Some(serde_json::Value::Bool(false)) => {
                    bad.push(format!("{path}: additionalProperties: false"))
                }
                Some(a) if o.contains_key("properties") => {
                    bad.push(format!("{path}: properties and additionalProperties"));
                    walk(&format!("{path}/*"), a, bad)
                }
                Some(a) => walk(&format!("{path}/*"), a, bad),
                None => {}
            }
            if let Some(p) = o.get("properties").and_then(|p| p.as_object()) {
                for (k, v) in p {
                    walk(&format!("{path}.{k}"), v, bad);
                }
            }
            if let Some(i) = o.get("items") {
                walk(&format!("{path}[]"), i, bad);
            }
        }
        let mut bad = Vec::new();
        for crd in crds() {
            for v in &crd.spec.versions {
                let schema = v
                    .schema
                    .as_ref()
                    .and_then(|s| s.open_api_v3_schema.as_ref());
                let json = serde_json::to_value(schema.expect("a schema")).unwrap();
                walk(&crd.spec.names.kind, &json, &mut bad);
            }
        }
        assert!(bad.is_empty(), "not structural:\n{}", bad.join("\n"));
    }

    /// The README's code block that starts with `marker`, up to its closing fence.
    fn readme_block(marker: &str) -> &'static str {
        let readme = include_str!("../../../README.md");
        let start = readme.find(marker).expect("the example is in the README");
        let body = &readme[start..];
        &body[..body.find("```").expect("end of the example")]
    }

    /// The README's first ChaosExperiment reads as the typed resource, with a pod target.
    #[test]
    fn the_readme_chaos_experiment_is_valid() {
        let text = readme_block("apiVersion: chaos.dev/v1alpha1");
        let obj: ChaosExperiment = serde_yaml_ng::from_str(text).unwrap();
        let faults = chaos_experiment::model::faults(&obj.spec.experiment.method);
        let pods = faults[0].selector.pods.as_ref().expect("a pod target");
        assert_eq!(pods.namespaces, vec!["shop".to_string()]);
    }

    /// The README's experiment file is a valid ChaosExperiment spec as it is.
    #[test]
    fn an_experiment_file_is_a_spec() {
        let text = readme_block("# cart-loss.yaml\n");
        let spec: ChaosExperimentSpec = serde_yaml_ng::from_str(text).unwrap();
        assert_eq!(
            spec.experiment,
            Experiment::parse(text, "README.md").unwrap()
        );
    }
}
