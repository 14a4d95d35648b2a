//! The ChaosSchedule reconciler: at each cron time a ChaosExperiment is created from the
//! schedule's experiment (owned by the schedule, so deleting the schedule deletes its runs),
//! and finished runs beyond the history limits are deleted, oldest first. Like a CronJob, a
//! controller that was away runs only the latest missed time, never a backlog.
use super::crd::{ChaosExperiment, ChaosSchedule, ConcurrencyPolicy, Phase};
use super::reconcile::{Ctx, Error};
use chaos_experiment::Experiment;
use chaos_experiment::record::Verdict;
use k8s_openapi::jiff::{Timestamp, tz::TimeZone};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

/// The label naming a run's schedule.
pub const SCHEDULE_LABEL: &str = "chaos.dev/schedule";

pub fn resource() -> ApiResource {
    ApiResource::erase::<ChaosSchedule>(&())
}

/// A run of a schedule, as the decision needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Child {
    pub name: String,
    pub created: Timestamp,
    /// None while it runs.
    pub held: Option<bool>,
}

/// What to do now.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    /// Create a run for this schedule time.
    pub create: Option<Timestamp>,
    /// Finished runs past the history limits.
    pub delete: Vec<String>,
    /// The next schedule time after now.
    pub next: Option<Timestamp>,
}

/// The cron expression's times, in UTC.
pub fn parse_cron(s: &str) -> Result<croner::Cron, String> {
    s.parse::<croner::Cron>()
        .map_err(|e| format!("schedule: `{s}` is not a cron expression: {e}"))
}

fn next_after(cron: &croner::Cron, t: Timestamp) -> Option<Timestamp> {
    let dt = t.to_zoned(TimeZone::UTC).datetime();
    let next = cron.find_next_occurrence(&dt, false).ok()?;
    next.to_zoned(TimeZone::UTC).ok().map(|z| z.timestamp())
}

/// Pure: from the schedule, the last time it fired (or its creation), now and its runs.
#[allow(clippy::too_many_arguments)]
pub fn decide(
    cron: &croner::Cron,
    suspend: bool,
    policy: ConcurrencyPolicy,
    held_limit: u32,
    failed_limit: u32,
    since: Timestamp,
    now: Timestamp,
    children: &[Child],
) -> Decision {
    let mut d = Decision::default();
    // The latest schedule time in (since, now]: missed ones before it are skipped.
    let mut due = None;
    let mut t = since;
    while let Some(n) = next_after(cron, t) {
        if n > now {
            d.next = Some(n);
            break;
        }
        due = Some(n);
        t = n;
    }
    let running = children.iter().any(|c| c.held.is_none());
    if let Some(at) = due
        && !suspend
        && !(running && policy == ConcurrencyPolicy::Forbid)
    {
        d.create = Some(at);
    }
    let mut finished: Vec<&Child> = children.iter().filter(|c| c.held.is_some()).collect();
    finished.sort_by_key(|c| std::cmp::Reverse(c.created));
    for (held, limit) in [(true, held_limit), (false, failed_limit)] {
        d.delete.extend(
            finished
                .iter()
                .filter(|c| c.held == Some(held))
                .skip(limit as usize)
                .map(|c| c.name.clone()),
        );
    }
    d
}

fn child_of(o: &DynamicObject) -> Child {
    let status = o.data.get("status");
    let phase: Option<Phase> = status
        .and_then(|s| s.get("phase"))
        .and_then(|p| serde_json::from_value(p.clone()).ok());
    let held = match phase {
        Some(p) if p.is_terminal() => Some(
            status
                .and_then(|s| s.get("verdict"))
                .and_then(|v| serde_json::from_value::<Verdict>(v.clone()).ok())
                .is_some_and(|v| v.exit_code() == 0),
        ),
        _ => None,
    };
    Child {
        name: o.name_any(),
        created: o
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0)
            .unwrap_or(Timestamp::UNIX_EPOCH),
        held,
    }
}

pub async fn reconcile(obj: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let schedules = Api::<DynamicObject>::namespaced_with(ctx.client.clone(), &ns, &resource());
    let runs_ar = ApiResource::erase::<ChaosExperiment>(&());
    let runs = Api::<DynamicObject>::namespaced_with(ctx.client.clone(), &ns, &runs_ar);
    let spec = obj.data.get("spec").cloned().unwrap_or_default();
    let status = |v: serde_json::Value| {
        let schedules = schedules.clone();
        let name = name.clone();
        async move {
            schedules
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({ "status": v })),
                )
                .await
                .map(|_| ())
                .map_err(|e| Error(format!("status of {name}: {e}")))
        }
    };
    let cron_text = spec
        .get("schedule")
        .and_then(|s| s.as_str())
        .unwrap_or_default();
    let experiment = spec.get("experiment").cloned().unwrap_or_default();
    let checked = parse_cron(cron_text).and_then(|c| {
        let text = serde_yaml_ng::to_string(&experiment).unwrap_or_default();
        Experiment::parse(&text, &format!("{ns}/{name}.spec.experiment"))
            .map(|_| c)
            .map_err(|e| e.to_string())
    });
    let cron = match checked {
        Ok(c) => c,
        Err(message) => {
            status(serde_json::json!({ "message": message })).await?;
            return Ok(Action::await_change());
        }
    };
    let get_u32 = |k: &str, default: u32| {
        spec.get(k)
            .and_then(|v| v.as_u64())
            .map(|v| v as u32)
            .unwrap_or(default)
    };
    let policy = match spec.get("concurrency-policy").and_then(|v| v.as_str()) {
        Some("Allow") => ConcurrencyPolicy::Allow,
        _ => ConcurrencyPolicy::Forbid,
    };
    let last = obj
        .data
        .get("status")
        .and_then(|s| s.get("lastScheduleTime"))
        .and_then(|t| t.as_str())
        .and_then(|t| t.parse::<Timestamp>().ok());
    let created = obj
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or(Timestamp::now());
    let lp = ListParams::default().labels(&format!("{SCHEDULE_LABEL}={name}"));
    let children: Vec<DynamicObject> = runs
        .list(&lp)
        .await
        .map_err(|e| Error(format!("list runs of {name}: {e}")))?
        .items;
    let kids: Vec<Child> = children.iter().map(child_of).collect();
    let now = Timestamp::now();
    let d = decide(
        &cron,
        spec.get("suspend")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        policy,
        get_u32("successful-history-limit", 3),
        get_u32("failed-history-limit", 1),
        last.unwrap_or(created),
        now,
        &kids,
    );
    for old in &d.delete {
        if let Err(e) = runs.delete(old, &DeleteParams::default()).await {
            tracing::warn!(schedule = %name, run = %old, "delete past run: {e}");
        }
    }
    let mut active: Vec<String> = kids
        .iter()
        .filter(|c| c.held.is_none())
        .map(|c| c.name.clone())
        .collect();
    let mut patch = serde_json::json!({ "message": null });
    if let Some(at) = d.create {
        let run_name = format!("{name}-{}", at.as_second() / 60);
        let owner = obj
            .controller_owner_ref(&resource())
            .ok_or_else(|| Error("schedule has no uid".into()))?;
        let mut child =
            DynamicObject::new(&run_name, &runs_ar)
                .within(&ns)
                .data(serde_json::json!({
                    "spec": experiment,
                }));
        child.metadata.labels = Some([(SCHEDULE_LABEL.to_string(), name.clone())].into());
        child.metadata.owner_references = Some(vec![owner]);
        match runs.create(&PostParams::default(), &child).await {
            Ok(_) => {}
            // Created by an earlier attempt that failed to record it.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(Error(format!("create run {run_name}: {e}"))),
        }
        active.push(run_name);
        patch["lastScheduleTime"] = serde_json::json!(at.to_string());
    }
    patch["active"] = serde_json::json!(active);
    status(patch).await?;
    let wait = d
        .next
        .map(|n| n.duration_since(now).unsigned_abs())
        .unwrap_or(Duration::from_secs(3600));
    // Also look again soon while runs are active, for the history limits.
    let wait = if active.is_empty() {
        wait
    } else {
        wait.min(Duration::from_secs(30))
    };
    Ok(Action::requeue(wait + Duration::from_millis(100)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn child(name: &str, created: &str, held: Option<bool>) -> Child {
        Child {
            name: name.into(),
            created: at(created),
            held,
        }
    }

    #[test]
    fn the_latest_due_time_runs_once_and_a_backlog_is_skipped() {
        let cron = parse_cron("0 14 * * 3").unwrap(); // Wednesdays 14:00 UTC
        let d = decide(
            &cron,
            false,
            ConcurrencyPolicy::Forbid,
            3,
            1,
            at("2026-11-01T00:00:00Z"), // three Wednesdays missed
            at("2026-11-25T15:00:00Z"),
            &[],
        );
        assert_eq!(d.create, Some(at("2026-11-25T14:00:00Z")));
        assert_eq!(d.next, Some(at("2026-12-02T14:00:00Z")));
        // Already fired for that time: nothing until the next one.
        let d = decide(
            &cron,
            false,
            ConcurrencyPolicy::Forbid,
            3,
            1,
            at("2026-11-25T14:00:00Z"),
            at("2026-11-25T15:00:00Z"),
            &[],
        );
        assert_eq!(d.create, None);
    }

    #[test]
    fn suspend_and_forbid_skip_a_time() {
        let cron = parse_cron("*/5 * * * *").unwrap();
        let (since, now) = (at("2026-12-01T10:00:00Z"), at("2026-12-01T10:06:00Z"));
        let running = [child("r", "2026-12-01T10:00:00Z", None)];
        let d = |suspend, policy, kids: &[Child]| {
            decide(&cron, suspend, policy, 3, 1, since, now, kids).create
        };
        assert_eq!(
            d(false, ConcurrencyPolicy::Forbid, &[]),
            Some(at("2026-12-01T10:05:00Z"))
        );
        assert_eq!(d(true, ConcurrencyPolicy::Forbid, &[]), None);
        assert_eq!(d(false, ConcurrencyPolicy::Forbid, &running), None);
        assert_eq!(
            d(false, ConcurrencyPolicy::Allow, &running),
            Some(at("2026-12-01T10:05:00Z"))
        );
    }

    #[test]
    fn history_limits_delete_the_oldest_of_each_outcome() {
        let cron = parse_cron("0 * * * *").unwrap();
        let kids = [
            child("h1", "2026-12-01T01:00:00Z", Some(true)),
            child("h2", "2026-12-01T02:00:00Z", Some(true)),
            child("h3", "2026-12-01T03:00:00Z", Some(true)),
            child("f1", "2026-12-01T04:00:00Z", Some(false)),
            child("f2", "2026-12-01T05:00:00Z", Some(false)),
            child("run", "2026-12-01T06:00:00Z", None),
        ];
        let d = decide(
            &cron,
            false,
            ConcurrencyPolicy::Forbid,
            2,
            1,
            at("2026-12-01T06:00:00Z"),
            at("2026-12-01T06:30:00Z"),
            &kids,
        );
        assert_eq!(d.delete, vec!["h1".to_string(), "f1".to_string()]);
    }

    #[test]
    fn a_bad_cron_is_one_line_naming_the_field() {
        let e = parse_cron("every wednesday").unwrap_err();
        assert!(
            e.starts_with("schedule: `every wednesday` is not a cron expression"),
            "{e}"
        );
    }

    /// On a fake API server: a due schedule creates its run (owned by the schedule, labelled,
    /// with the schedule's experiment as its spec) and records the time in status.
    #[tokio::test]
    async fn a_due_schedule_creates_an_owned_run() {
        use crate::fleet::{Caller, Fleet, FleetDriver};
        use crate::k8s::fake::FakeApi;
        use serde_json::json;
        let api = FakeApi::start_with_body(|method, uri, body| {
            let base = "/apis/chaos.dev/v1alpha1/namespaces/shop/chaosexperiments";
            match method {
                "GET" => {
                    assert!(uri.starts_with(&format!("{base}?")), "{uri}");
                    assert!(
                        uri.contains("labelSelector=chaos.dev%2Fschedule%3Dweekly"),
                        "{uri}"
                    );
                    (
                        200,
                        json!({"apiVersion": "chaos.dev/v1alpha1", "kind": "ChaosExperimentList", "metadata": {}, "items": []}),
                    )
                }
                "POST" => {
                    assert!(uri.starts_with(base), "{uri}");
                    (201, serde_json::from_str(body).unwrap())
                }
                "PATCH" => {
                    assert!(uri.contains("/chaosschedules/weekly/status"), "{uri}");
                    (
                        200,
                        json!({"apiVersion": "chaos.dev/v1alpha1", "kind": "ChaosSchedule",
                        "metadata": {"name": "weekly", "namespace": "shop"}}),
                    )
                }
                m => panic!("unexpected {m} {uri}"),
            }
        });
        let fleet = FleetDriver {
            fleet: Fleet::new(Duration::from_secs(15), None),
            caller: Caller("t".into()),
        };
        let ctx = Ctx::new(
            api.client.clone(),
            fleet,
            None,
            "chaos-system".into(),
            "t".into(),
        );
        let experiment = json!({
            "title": "cart",
            "steady-state-hypothesis": {"title": "ok", "probes": [{"name": "p", "command": {"run": ["/bin/true"]}}]},
            "method": [{"pause": "1s"}],
        });
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "chaos.dev/v1alpha1", "kind": "ChaosSchedule",
            "metadata": {"name": "weekly", "namespace": "shop", "uid": "s-1",
                "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"schedule": "0 * * * *", "experiment": experiment},
        }))
        .unwrap();
        reconcile(Arc::new(obj), ctx).await.unwrap();
        let reqs = api.requests();
        let (_, _, created) = reqs
            .iter()
            .find(|(m, _, _)| m == "POST")
            .expect("a run was created");
        let run: serde_json::Value = serde_json::from_str(created).unwrap();
        assert_eq!(run["metadata"]["labels"][SCHEDULE_LABEL], "weekly");
        assert_eq!(run["metadata"]["ownerReferences"][0]["uid"], "s-1");
        assert_eq!(run["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(run["spec"]["title"], "cart");
        let (_, _, st) = reqs.iter().rfind(|(m, _, _)| m == "PATCH").unwrap();
        let st: serde_json::Value = serde_json::from_str(st).unwrap();
        assert!(
            st["status"]["lastScheduleTime"]
                .as_str()
                .unwrap()
                .ends_with(":00:00Z"),
            "{st}"
        );
        assert_eq!(st["status"]["active"][0], run["metadata"]["name"]);
    }
}
