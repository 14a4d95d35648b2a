//! `chaosctl run --local`: the experiment's faults run in this process's own engine, on this
//! machine, with no agent or controller. Selecting agents makes no sense here, so it is refused.
use chaos_agent::engine::{Engine, EngineError};

use chaos_agent::spec::FaultSpec;
use chaos_experiment::driver::{AgentSelector, AppliedFault, DriverError, FaultDriver};
use chaos_proto::agent::v1 as pb;
use std::sync::Arc;

/// The node name faults applied by the local engine carry in records.
pub const LOCAL: &str = "local";

pub struct LocalDriver {
    engine: Arc<Engine>,
}

impl LocalDriver {
    pub fn new(engine: Arc<Engine>) -> Self {
        LocalDriver { engine }
    }
}

fn err(e: impl std::fmt::Display) -> DriverError {
    DriverError(e.to_string())
}

/// Why a pod target is refused outside Kubernetes mode.
pub const POD_TARGETS: &str = "target.pods: pods are resolved by chaos-controller in Kubernetes mode (a ChaosExperiment); use target.netns or --pod-uid here";

impl FaultDriver for LocalDriver {
    async fn apply(
        &self,
        selector: &AgentSelector,
        spec: pb::FaultSpec,
    ) -> Result<Vec<AppliedFault>, DriverError> {
        if !selector.labels.is_empty() || selector.agents.iter().any(|a| a != LOCAL) {
            return Err(DriverError(
                "target: agents and labels select agents of a controller; with --local faults run on this machine (leave them out, or run with --controller)".into(),
            ));
        }
        if selector.pods.is_some() {
            return Err(DriverError(POD_TARGETS.into()));
        }
        let spec = FaultSpec::try_from(spec).map_err(err)?;
        let engine = self.engine.clone();
        let status = tokio::task::spawn_blocking(move || engine.apply(spec))
            .await
            .map_err(err)?
            .map_err(err)?;
        Ok(vec![AppliedFault {
            pod: None,
            agent: LOCAL.into(),
            id: status.id,
            backend: status.backend.into(),
        }])
    }

    async fn counters(&self, fault: &AppliedFault) -> Result<pb::Counters, DriverError> {
        self.engine
            .status(&fault.id)
            .map(|s| s.counters.into())
            .ok_or_else(|| DriverError(format!("fault {} is unknown to the engine", fault.id)))
    }

    async fn revert(&self, fault: &AppliedFault) -> Result<pb::Counters, DriverError> {
        let engine = self.engine.clone();
        let id = fault.id.clone();
        tokio::task::spawn_blocking(move || match engine.revert(&id) {
            Ok(s) => Ok(s.counters.into()),
            // Already ended (its deadline): reverting again is a success with its last counters.
            Err(EngineError::NotFound(_)) => engine
                .status(&id)
                .map(|s| s.counters.into())
                .ok_or_else(|| DriverError(format!("fault {id} is unknown to the engine"))),
            Err(e) => Err(err(e)),
        })
        .await
        .map_err(err)?
    }
}
