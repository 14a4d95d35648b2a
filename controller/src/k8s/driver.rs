//! Faults in Kubernetes mode: a pod target is resolved to pods through the API, and each pod
//! gets its own fault, sent to the agent on the pod's node with the pod's UID; every other
//! selector goes to the fleet as it is.
use super::targets::{self, PodTarget};
use crate::fleet::FleetDriver;
use chaos_experiment::driver::{AgentSelector, AppliedFault, DriverError, FaultDriver};
use chaos_experiment::model::ANY_POD;
use chaos_proto::agent::v1 as pb;
use kube::Client;
use std::collections::BTreeSet;

pub struct KubeDriver {
    pub fleet: FleetDriver,
    pub client: Client,
    /// The controller's namespace: protected like kube-system.
    pub namespace: String,
}

/// `spec` aimed at one pod: the placeholder UID replaced by the pod's.
pub fn for_pod(mut spec: pb::FaultSpec, uid: &str) -> pb::FaultSpec {
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
    spec
}

impl KubeDriver {
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
        if selector.pods.is_none() {
            return self.fleet.apply(selector, spec).await;
        }
        let pods = self.pods(selector, &spec).await?;
        let tries = pods.iter().map(|p| {
            let one = AgentSelector {
                agents: vec![p.node.clone()],
                ..AgentSelector::default()
            };
            let spec = for_pod(spec.clone(), &p.uid);
            async move {
                let r = self.fleet.apply(&one, spec).await;
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
        self.fleet.counters(fault).await
    }

    async fn revert(&self, fault: &AppliedFault) -> Result<pb::Counters, DriverError> {
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
        let got = for_pod(spec.clone(), uid);
        assert_eq!(
            got.target.unwrap().namespace,
            Some(Namespace::PodUid(uid.into()))
        );
        let mut named = spec;
        named.target.as_mut().unwrap().namespace = Some(Namespace::Netns("x".into()));
        assert_eq!(for_pod(named.clone(), uid), named);
    }
}
