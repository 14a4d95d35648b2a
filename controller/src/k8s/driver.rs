//! Faults in Kubernetes mode: a pod target is resolved to pods through the API, and each pod
//! gets its own fault, sent to the agent on the pod's node with the pod's UID; every other
//! selector goes to the fleet as it is.
use super::targets::{self, PodTarget};
use crate::fleet::FleetDriver;
use chaos_experiment::driver::{AgentSelector, AppliedFault, DriverError, FaultDriver};
use chaos_experiment::model::ANY_POD;
use chaos_proto::agent::v1 as pb;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct KubeDriver {
    pub fleet: FleetDriver,
    pub client: Client,
    /// The controller's namespace: protected like kube-system.
    pub namespace: String,
    /// pod-kill actions by the ids they were given: the recovery each one measures.
    kills: Mutex<HashMap<String, Arc<Recovery>>>,
}

/// How long a pod-kill's recovery is watched at most.
const READY_WATCH: Duration = Duration::from_secs(600);

/// A pod-kill's recovery: from the kill until the selected pods are all Ready again.
#[derive(Default)]
struct Recovery {
    /// Milliseconds; 0 until Ready.
    ready_ms: AtomicU64,
    stop: AtomicBool,
}

fn is_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `spec` aimed at one pod: the placeholder UID replaced by the pod's, and a container's name
/// by its id (as the runtime reports it in the pod's status).
pub fn for_pod(mut spec: pb::FaultSpec, pod: &PodTarget) -> Result<pb::FaultSpec, String> {
    let uid = pod.uid.as_str();
    if let Some(pb::fault_spec::Kind::ContainerKill(k)) = spec.kind.as_mut() {
        k.pod_uid = uid.to_string();
        if !k.container_name.is_empty() {
            k.container_id = pod
                .containers
                .get(&k.container_name)
                .cloned()
                .ok_or_else(|| {
                    format!(
                        "container-kill: pod {}/{} has no running container {}",
                        pod.namespace, pod.name, k.container_name
                    )
                })?;
        }
    }
    use pb::cpu::CgroupTarget;
    use pb::target::Namespace;
    if let Some(t) = spec.target.as_mut()
        && matches!(&t.namespace, Some(Namespace::PodUid(u)) if u == ANY_POD)
    {
        t.namespace = Some(Namespace::PodUid(uid.to_string()));
    }
    if let Some(pb::fault_spec::Kind::Cpu(c)) = spec.kind.as_mut()
        && matches!(&c.cgroup_target, Some(CgroupTarget::PodUid(u)) if u == ANY_POD)
    {
        c.cgroup_target = Some(CgroupTarget::PodUid(uid.to_string()));
    }
    if let Some(pb::fault_spec::Kind::Memory(m)) = spec.kind.as_mut()
        && matches!(&m.cgroup_target, Some(pb::memory::CgroupTarget::PodUid(u)) if u == ANY_POD)
    {
        m.cgroup_target = Some(pb::memory::CgroupTarget::PodUid(uid.to_string()));
    }
    if let Some(pb::fault_spec::Kind::DiskFill(d)) = spec.kind.as_mut()
        && matches!(&d.mount, Some(pb::disk_fill::Mount::PodUid(u)) if u == ANY_POD)
    {
        d.mount = Some(pb::disk_fill::Mount::PodUid(uid.to_string()));
    }
    use pb::process_target::Target as Process;
    let process = match spec.kind.as_mut() {
        Some(pb::fault_spec::Kind::ProcessPause(p)) => p.target.as_mut(),
        Some(pb::fault_spec::Kind::ProcessKill(p)) => p.target.as_mut(),
        Some(pb::fault_spec::Kind::ClockSkew(p)) => p.target.as_mut(),
        _ => None,
    };
    if let Some(t) = process
        && matches!(&t.target, Some(Process::PodUid(u)) if u == ANY_POD)
    {
        t.target = Some(Process::PodUid(uid.to_string()));
    }
    Ok(spec)
}

impl KubeDriver {
    pub fn new(fleet: FleetDriver, client: Client, namespace: String) -> Self {
        KubeDriver {
            fleet,
            client,
            namespace,
            kills: Mutex::new(HashMap::new()),
        }
    }

    fn kills(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Recovery>>> {
        self.kills.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// pod-kill: deletes the chosen pods, then watches until the selector has as many Ready
    /// pods as before and none of the killed ones is left.
    async fn kill_pods(
        &self,
        selector: &AgentSelector,
        spec: &pb::FaultSpec,
        grace: Option<i64>,
    ) -> Result<Vec<AppliedFault>, DriverError> {
        let Some(sel) = selector.pods.clone() else {
            return Err(DriverError(
                "target.pods: pod-kill needs a pod target".into(),
            ));
        };
        let pods = self.pods(selector, spec).await?;
        let before = targets::list_pods(&self.client, &sel)
            .await
            .map_err(DriverError)?;
        let ready_before = before.iter().filter(|p| is_ready(p)).count();
        let started = Instant::now();
        let dp = DeleteParams {
            grace_period_seconds: grace.map(|g| g.max(0) as u32),
            ..DeleteParams::default()
        };
        let mut applied = Vec::new();
        for p in &pods {
            let api = Api::<Pod>::namespaced(self.client.clone(), &p.namespace);
            match api.delete(&p.name, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    return Err(DriverError(format!(
                        "pod-kill {}/{}: {e} ({} of {} deleted)",
                        p.namespace,
                        p.name,
                        applied.len(),
                        pods.len()
                    )));
                }
            }
            applied.push(AppliedFault {
                agent: p.node.clone(),
                id: format!("pod-kill-{}", p.uid),
                backend: "kubernetes/delete".into(),
                pod: Some(format!("{}/{}", p.namespace, p.name)),
            });
        }
        let recovery = Arc::new(Recovery::default());
        for a in &applied {
            self.kills().insert(a.id.clone(), recovery.clone());
        }
        let killed: BTreeSet<String> = pods.iter().map(|p| p.uid.clone()).collect();
        let client = self.client.clone();
        tokio::spawn(async move {
            while started.elapsed() < READY_WATCH && !recovery.stop.load(Ordering::Relaxed) {
                if let Ok(now) = targets::list_pods(&client, &sel).await {
                    let gone = now
                        .iter()
                        .all(|p| !p.metadata.uid.as_ref().is_some_and(|u| killed.contains(u)));
                    if gone && now.iter().filter(|p| is_ready(p)).count() >= ready_before {
                        let ms = (started.elapsed().as_millis() as u64).max(1);
                        recovery.ready_ms.store(ms, Ordering::Relaxed);
                        tracing::info!(ready_ms = ms, "pods Ready again after pod-kill");
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Ok(applied)
    }

    fn kill_counters(&self, fault: &AppliedFault) -> Option<pb::Counters> {
        let r = self.kills().get(&fault.id)?.clone();
        Some(pb::Counters {
            seen: 1,
            matched: 1,
            affected: 1,
            ready_ms: r.ready_ms.load(Ordering::Relaxed),
            ..pb::Counters::default()
        })
    }

    /// The pods a pod selector picks now (also the dry run's answer).
    pub async fn pods(
        &self,
        selector: &AgentSelector,
        spec: &pb::FaultSpec,
    ) -> Result<Vec<PodTarget>, DriverError> {
        let Some(sel) = &selector.pods else {
            return Ok(vec![]);
        };
        let network = spec.target.is_some();
        let pods = targets::resolve(
            &self.client,
            sel,
            network,
            &self.namespace,
            targets::random_seed(),
        )
        .await
        .map_err(DriverError)?;
        let nodes: BTreeSet<&str> = pods.iter().map(|p| p.node.as_str()).collect();
        if let Some(max) = selector.max_agents
            && nodes.len() > max as usize
        {
            return Err(DriverError(format!(
                "blast-radius.max-agents: the chosen pods run on {} nodes, more than {max}",
                nodes.len()
            )));
        }
        Ok(pods)
    }
}

impl FaultDriver for KubeDriver {
    async fn apply(
        &self,
        selector: &AgentSelector,
        spec: pb::FaultSpec,
    ) -> Result<Vec<AppliedFault>, DriverError> {
        if let Some(pb::fault_spec::Kind::PodKill(k)) = &spec.kind {
            return self
                .kill_pods(selector, &spec, k.grace_period_seconds)
                .await;
        }
        if selector.pods.is_none() {
            return self.fleet.apply(selector, spec).await;
        }
        let pods = self.pods(selector, &spec).await?;
        let tries = pods.iter().map(|p| {
            let one = AgentSelector {
                agents: vec![p.node.clone()],
                ..AgentSelector::default()
            };
            let spec = for_pod(spec.clone(), p);
            async move {
                let r = match spec {
                    Ok(spec) => self.fleet.apply(&one, spec).await,
                    Err(e) => Err(DriverError(e)),
                };
                (p, r)
            }
        });
        let results = futures_util::future::join_all(tries).await;
        let mut applied = Vec::new();
        let mut first_error = None;
        for (p, r) in results {
            match r {
                Ok(list) => applied.extend(list.into_iter().map(|mut a| {
                    a.pod = Some(format!("{}/{}", p.namespace, p.name));
                    a
                })),
                Err(e) if first_error.is_none() => {
                    first_error = Some(format!("pod {}/{}: {e}", p.namespace, p.name))
                }
                Err(_) => {}
            }
        }
        // All or nothing, as for agents: what applied goes again before the error is told.
        if let Some(e) = first_error {
            for a in &applied {
                if let Err(r) = self.fleet.revert(a).await {
                    tracing::error!(agent = %a.agent, id = %a.id, "revert after a failed apply: {r}");
                }
            }
            return Err(DriverError(e));
        }
        Ok(applied)
    }

    async fn counters(&self, fault: &AppliedFault) -> Result<pb::Counters, DriverError> {
        if let Some(c) = self.kill_counters(fault) {
            return Ok(c);
        }
        self.fleet.counters(fault).await
    }

    /// A pod-kill has nothing to undo: its revert ends the recovery watch and reports it.
    async fn revert(&self, fault: &AppliedFault) -> Result<pb::Counters, DriverError> {
        if let Some(c) = self.kill_counters(fault) {
            if let Some(r) = self.kills().remove(&fault.id) {
                r.stop.store(true, Ordering::Relaxed);
            }
            return Ok(c);
        }
        self.fleet.revert(fault).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_pod_fills_in_only_the_placeholder() {
        use pb::target::Namespace;
        let spec = pb::FaultSpec {
            kind: Some(pb::fault_spec::Kind::Partition(pb::Partition {})),
            target: Some(pb::Target {
                interface: "eth0".into(),
                namespace: Some(Namespace::PodUid(ANY_POD.into())),
                ..Default::default()
            }),
            duration_ms: 0,
        };
        let uid = "6f1c2a3b-0d4e-4f5a-8b6c-7d8e9f0a1b2c";
        let pod = PodTarget {
            namespace: "shop".into(),
            name: "cart-a".into(),
            uid: uid.into(),
            node: "pi-1".into(),
            host_network: false,
            containers: [("cart".to_string(), "0123456789abcdef".to_string())].into(),
        };
        let got = for_pod(spec.clone(), &pod).unwrap();
        assert_eq!(
            got.target.unwrap().namespace,
            Some(Namespace::PodUid(uid.into()))
        );
        let mut named = spec;
        named.target.as_mut().unwrap().namespace = Some(Namespace::Netns("x".into()));
        assert_eq!(for_pod(named.clone(), &pod).unwrap(), named);
        // container-kill: the pod's UID, and the container's name becomes its id.
        let kill = |name: &str| pb::FaultSpec {
            kind: Some(pb::fault_spec::Kind::ContainerKill(pb::ContainerKill {
                pod_uid: ANY_POD.into(),
                container_name: name.into(),
                ..Default::default()
            })),
            target: None,
            duration_ms: 0,
        };
        let Some(pb::fault_spec::Kind::ContainerKill(k)) =
            for_pod(kill("cart"), &pod).unwrap().kind
        else {
            panic!("not a container-kill")
        };
        assert_eq!(
            (k.pod_uid.as_str(), k.container_id.as_str()),
            (uid, "0123456789abcdef")
        );
        assert_eq!(
            for_pod(kill("sidecar"), &pod).unwrap_err(),
            "container-kill: pod shop/cart-a has no running container sidecar"
        );
    }

    fn pod(name: &str, uid: &str, ready: bool) -> serde_json::Value {
        serde_json::json!({
            "metadata": {"name": name, "namespace": "shop", "uid": uid, "labels": {"app": "cart"}},
            "spec": {"nodeName": "pi-1", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": if ready { "True" } else { "False" }}
            ]}
        })
    }

    /// pod-kill on a fake API server that behaves like a ReplicaSet: the deleted pod is
    /// replaced by a new one that becomes Ready a few lists later. The DELETE carries the
    /// grace period, and the recovery is measured until the replacement is Ready.
    #[tokio::test]
    async fn pod_kill_deletes_and_measures_until_the_pods_are_ready_again() {
        use crate::fleet::{Caller, Fleet};
        use chaos_experiment::driver::{PodMode, PodSelector};
        let pods = Arc::new(Mutex::new((vec![pod("cart-a", "uid-a", true)], 0usize)));
        let state = pods.clone();
        let api = crate::k8s::fake::FakeApi::start_with_body(move |method, uri, body| {
            let mut st = state.lock().unwrap();
            if method == "DELETE" {
                assert_eq!(uri, "/api/v1/namespaces/shop/pods/cart-a?");
                assert!(body.contains("\"gracePeriodSeconds\":0"), "{body}");
                let gone = st.0.remove(0);
                st.0.push(pod("cart-z", "uid-z", false));
                return (200, gone);
            }
            assert!(
                uri.starts_with("/api/v1/namespaces/shop/pods?"),
                "{method} {uri}"
            );
            // Lists after the delete: the replacement is Ready from the third one on.
            if st.0.iter().any(|p| p["metadata"]["name"] == "cart-z") {
                st.1 += 1;
            }
            if st.1 >= 3 {
                for p in st.0.iter_mut() {
                    p["status"]["conditions"][0]["status"] = "True".into();
                }
            }
            (
                200,
                serde_json::json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": st.0}),
            )
        });
        let fleet = FleetDriver {
            fleet: Fleet::new(Duration::from_secs(15), None),
            caller: Caller("test".into()),
        };
        let driver = KubeDriver::new(fleet, api.client.clone(), "chaos-system".into());
        let selector = AgentSelector {
            pods: Some(PodSelector {
                namespaces: vec!["shop".into()],
                labels: [("app".to_string(), "cart".to_string())].into(),
                node_labels: Default::default(),
                mode: PodMode::All,
                value: None,
                allow_protected: false,
                allow_host_network: false,
            }),
            ..AgentSelector::default()
        };
        let spec = pb::FaultSpec {
            kind: Some(pb::fault_spec::Kind::PodKill(pb::PodKill {
                grace_period_seconds: Some(0),
            })),
            target: None,
            duration_ms: 0,
        };
        let applied = driver.apply(&selector, spec).await.unwrap();
        assert_eq!(applied.len(), 1);
        assert_eq!(
            (applied[0].pod.as_deref(), applied[0].agent.as_str()),
            (Some("shop/cart-a"), "pi-1")
        );
        assert_eq!(
            driver.counters(&applied[0]).await.unwrap().ready_ms,
            0,
            "Ready at once?"
        );
        let mut ready = 0;
        for _ in 0..100 {
            ready = driver.counters(&applied[0]).await.unwrap().ready_ms;
            if ready > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The watcher lists every 250 ms: the third list after the delete is at >= 500 ms.
        assert!(
            ready >= 450,
            "ready after {ready} ms, before the replacement was Ready"
        );
        let c = driver.revert(&applied[0]).await.unwrap();
        assert_eq!((c.affected, c.ready_ms), (1, ready));
        let deletes = api
            .requests()
            .iter()
            .filter(|(m, _, _)| m == "DELETE")
            .count();
        assert_eq!(deletes, 1);
    }
}
