//! The agent's gRPC service (chaos.agent.v1.Agent): a thin edge over the engine. Protobuf types
//! are converted here, once, with the same parsers and error lines as the CLI.
use crate::caps;
use crate::datapath::Counters;
use crate::engine::{Engine, EngineError, FaultStatus, unix_ms};
use crate::spec::{
    self, CgroupRef, Direction, FaultKind, FaultSpec, InvalidInput, NetnsRef, Protocol, Target,
    invalid,
};
use chaos_proto::agent::v1 as pb;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub struct AgentService {
    engine: Arc<Engine>,
}

impl AgentService {
    pub fn new(engine: Arc<Engine>) -> Self {
        AgentService { engine }
    }
}

impl TryFrom<pb::FaultSpec> for FaultSpec {
    type Error = InvalidInput;
    fn try_from(p: pb::FaultSpec) -> Result<Self, InvalidInput> {
        let kind = match p.kind {
            Some(pb::fault_spec::Kind::Loss(l)) => FaultKind::Loss {
                percent: l.percent,
                correlation: l.correlation,
            },
            Some(pb::fault_spec::Kind::Corrupt(c)) => FaultKind::Corrupt { percent: c.percent },
            Some(pb::fault_spec::Kind::Partition(_)) => FaultKind::Partition,
            Some(pb::fault_spec::Kind::Latency(l)) => FaultKind::Latency {
                ms: l.ms,
                jitter_ms: l.jitter_ms,
                correlation: l.correlation,
                distribution: match l.distribution.as_str() {
                    "" => None,
                    d => Some(d.parse()?),
                },
                backend: l.backend.parse()?,
                per_destination: l
                    .dest_ms
                    .iter()
                    .map(|d| d.parse())
                    .collect::<Result<_, _>>()?,
            },
            Some(pb::fault_spec::Kind::Reorder(r)) => FaultKind::Reorder {
                percent: r.percent,
                ms: r.ms,
                correlation: r.correlation,
            },
            Some(pb::fault_spec::Kind::Duplicate(d)) => FaultKind::Duplicate { percent: d.percent },
            Some(pb::fault_spec::Kind::Bandwidth(b)) => FaultKind::Bandwidth {
                bytes_per_sec: spec::parse_rate(&b.rate)?,
            },
            Some(pb::fault_spec::Kind::Dns(d)) => FaultKind::Dns {
                mode: d.mode.parse()?,
                domains: d
                    .domains
                    .iter()
                    .map(|p| p.parse())
                    .collect::<Result<_, _>>()?,
            },
            Some(pb::fault_spec::Kind::Cpu(c)) => FaultKind::Cpu {
                workers: c.workers,
                load_percent: c.load_percent,
                cgroup: match c.cgroup_target {
                    Some(pb::cpu::CgroupTarget::Cgroup(path)) => CgroupRef::Path(path),
                    Some(pb::cpu::CgroupTarget::Pid(pid)) => CgroupRef::Pid(pid),
                    Some(pb::cpu::CgroupTarget::PodUid(uid)) => CgroupRef::Pod(uid),
                    None => CgroupRef::from_flags(None, None, None)?,
                },
            },
            Some(pb::fault_spec::Kind::ContainerKill(k)) => FaultKind::ContainerKill {
                pod: k.pod_uid,
                container: k.container_id,
                signal: k.signal.parse()?,
            },
            Some(pb::fault_spec::Kind::PodKill(_)) => {
                return Err(invalid(
                    "kind",
                    "pod-kill is done by chaos-controller through the Kubernetes API, not by an agent",
                ));
            }
            None => {
                return Err(invalid(
                    "kind",
                    "must be one of loss, corrupt, partition, latency, bandwidth, reorder, duplicate, dns, cpu",
                ));
            }
        };
        let duration = if p.duration_ms == 0 {
            spec::DEFAULT_DURATION
        } else {
            Duration::from_millis(p.duration_ms)
        };
        if !kind.is_network() {
            return Ok(FaultSpec {
                kind,
                target: Target::none(),
                duration,
            });
        }
        let t = p.target.ok_or_else(|| invalid("target", "is required"))?;
        let netns = match t.namespace {
            None => NetnsRef::Current,
            Some(pb::target::Namespace::Netns(n)) => NetnsRef::named(&n)?,
            Some(pb::target::Namespace::Pid(pid)) => NetnsRef::Pid(pid),
            Some(pb::target::Namespace::PodUid(uid)) => {
                spec::check_pod_uid("--pod-uid", &uid)?;
                NetnsRef::Pod(uid)
            }
        };
        Ok(FaultSpec {
            kind,
            target: Target {
                netns,
                interface: t.interface,
                remote: spec::parse_cidrs("--dest", &t.dest)?,
                local: spec::parse_cidrs("--source", &t.source)?,
                ports: spec::parse_ports(&t.ports)?,
                protocol: t.protocol.parse::<Protocol>()?,
                direction: t.direction.parse::<Direction>()?,
                force: t.force,
            },
            duration,
        })
    }
}

impl From<&FaultSpec> for pb::FaultSpec {
    fn from(s: &FaultSpec) -> Self {
        let kind = match s.kind {
            FaultKind::Loss {
                percent,
                correlation,
            } => pb::fault_spec::Kind::Loss(pb::Loss {
                percent,
                correlation,
            }),
            FaultKind::Corrupt { percent } => {
                pb::fault_spec::Kind::Corrupt(pb::Corrupt { percent })
            }
            FaultKind::Partition => pb::fault_spec::Kind::Partition(pb::Partition {}),
            FaultKind::Latency {
                ms,
                jitter_ms,
                correlation,
                distribution,
                backend,
                ref per_destination,
            } => pb::fault_spec::Kind::Latency(pb::Latency {
                ms,
                jitter_ms,
                correlation,
                distribution: distribution
                    .map(|d| d.name().to_string())
                    .unwrap_or_default(),
                backend: format!("{backend:?}").to_lowercase(),
                dest_ms: per_destination
                    .iter()
                    .map(|d| format!("{}={}", d.cidr, d.ms))
                    .collect(),
            }),
            FaultKind::Reorder {
                percent,
                ms,
                correlation,
            } => pb::fault_spec::Kind::Reorder(pb::Reorder {
                percent,
                ms,
                correlation,
            }),
            FaultKind::Duplicate { percent } => {
                pb::fault_spec::Kind::Duplicate(pb::Duplicate { percent })
            }
            FaultKind::Dns { mode, ref domains } => pb::fault_spec::Kind::Dns(pb::Dns {
                mode: mode.name().to_string(),
                domains: domains.iter().map(ToString::to_string).collect(),
            }),
            FaultKind::Bandwidth { bytes_per_sec } => {
                pb::fault_spec::Kind::Bandwidth(pb::Bandwidth {
                    rate: format!("{bytes_per_sec}bps"),
                })
            }
            FaultKind::Cpu {
                workers,
                load_percent,
                ref cgroup,
            } => {
                let kind = pb::fault_spec::Kind::Cpu(pb::Cpu {
                    workers,
                    load_percent,
                    cgroup_target: Some(match cgroup {
                        CgroupRef::Path(p) => pb::cpu::CgroupTarget::Cgroup(p.clone()),
                        CgroupRef::Pid(pid) => pb::cpu::CgroupTarget::Pid(*pid),
                        CgroupRef::Pod(uid) => pb::cpu::CgroupTarget::PodUid(uid.clone()),
                    }),
                });
                return pb::FaultSpec {
                    kind: Some(kind),
                    target: None,
                    duration_ms: s.duration.as_millis() as u64,
                };
            }
            FaultKind::ContainerKill {
                ref pod,
                ref container,
                signal,
            } => {
                return pb::FaultSpec {
                    kind: Some(pb::fault_spec::Kind::ContainerKill(pb::ContainerKill {
                        pod_uid: pod.clone(),
                        container_id: container.clone(),
                        signal: signal.name().into(),
                        container_name: String::new(),
                    })),
                    target: None,
                    duration_ms: s.duration.as_millis() as u64,
                };
            }
        };
        let t = &s.target;
        pb::FaultSpec {
            kind: Some(kind),
            target: Some(pb::Target {
                interface: t.interface.clone(),
                namespace: match &t.netns {
                    NetnsRef::Current => None,
                    NetnsRef::Path(p) => {
                        Some(pb::target::Namespace::Netns(p.display().to_string()))
                    }
                    NetnsRef::Pid(pid) => Some(pb::target::Namespace::Pid(*pid)),
                    NetnsRef::Pod(uid) => Some(pb::target::Namespace::PodUid(uid.clone())),
                },
                dest: t.remote.iter().map(ToString::to_string).collect(),
                source: t.local.iter().map(ToString::to_string).collect(),
                ports: t.ports.iter().map(ToString::to_string).collect(),
                protocol: format!("{:?}", t.protocol).to_lowercase(),
                direction: format!("{:?}", t.direction).to_lowercase(),
                force: t.force,
            }),
            duration_ms: s.duration.as_millis() as u64,
        }
    }
}

impl From<pb::Counters> for Counters {
    fn from(c: pb::Counters) -> Self {
        Counters {
            seen: c.seen,
            matched: c.matched,
            affected: c.affected,
            cpu_time_us: c.cpu_time_us,
            seen_bytes: c.seen_bytes,
            matched_bytes: c.matched_bytes,
            affected_bytes: c.affected_bytes,
        }
    }
}

pub fn counters_pb(c: Counters) -> pb::Counters {
    pb::Counters {
        seen: c.seen,
        matched: c.matched,
        affected: c.affected,
        cpu_time_us: c.cpu_time_us,
        ready_ms: 0,
        seen_bytes: c.seen_bytes,
        matched_bytes: c.matched_bytes,
        affected_bytes: c.affected_bytes,
    }
}

pub fn fault_pb(f: &FaultStatus) -> pb::Fault {
    pb::Fault {
        id: f.id.clone(),
        spec: Some((&f.spec).into()),
        deadline_unix_ms: unix_ms(f.deadline) as i64,
        counters: Some(counters_pb(f.counters)),
        backend: f.backend.to_string(),
    }
}

fn status(e: EngineError) -> Status {
    match &e {
        EngineError::NotFound(_) => Status::not_found(e.to_string()),
        EngineError::Privileges(_) => Status::permission_denied(e.to_string()),
        _ if e.is_user_error() => Status::invalid_argument(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// Engine calls block (netns threads, bpf syscalls): keep them off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("engine task: {e}")))
}

/// The spec of an Apply request, as sent and as parsed with the CLI's parsers: every backend of
/// the Agent API (the engine, the null backend) refuses the same input with the same line.
pub fn apply_spec(req: pb::ApplyRequest) -> Result<(pb::FaultSpec, FaultSpec), Status> {
    let sent = req
        .spec
        .ok_or_else(|| Status::invalid_argument("invalid spec: is required"))?;
    let parsed =
        FaultSpec::try_from(sent.clone()).map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok((sent, parsed))
}

/// The fault kind's name, as the CLI spells it.
pub fn kind_name(k: &pb::fault_spec::Kind) -> &'static str {
    use pb::fault_spec::Kind::*;
    match k {
        Loss(_) => "loss",
        Corrupt(_) => "corrupt",
        Partition(_) => "partition",
        Latency(_) => "latency",
        Bandwidth(_) => "bandwidth",
        Reorder(_) => "reorder",
        Duplicate(_) => "duplicate",
        Dns(_) => "dns",
        Cpu(_) => "cpu",
        PodKill(_) => "pod-kill",
        ContainerKill(_) => "container-kill",
    }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let (_, spec) = apply_spec(req.into_inner())?;
        let engine = self.engine.clone();
        let fault = blocking(move || engine.apply(spec))
            .await?
            .map_err(status)?;
        match &fault.spec.kind {
            FaultKind::Cpu { cgroup, .. } => {
                tracing::info!(id = %fault.id, kind = "cpu", target = %cgroup, "applied")
            }
            kind => {
                tracing::info!(id = %fault.id, kind = kind.name(), iface = %fault.spec.target.interface, "applied")
            }
        }
        Ok(Response::new(pb::ApplyResponse {
            fault: Some(fault_pb(&fault)),
        }))
    }

    async fn revert(
        &self,
        req: Request<pb::RevertRequest>,
    ) -> Result<Response<pb::RevertResponse>, Status> {
        let req = req.into_inner();
        let engine = self.engine.clone();
        let reverted = if req.all {
            blocking(move || engine.revert_all())
                .await?
                .into_iter()
                .filter_map(Result::ok)
                .collect()
        } else {
            vec![
                blocking(move || engine.revert(&req.id))
                    .await?
                    .map_err(status)?,
            ]
        };
        Ok(Response::new(pb::RevertResponse {
            reverted: reverted.iter().map(fault_pb).collect(),
        }))
    }

    async fn list(
        &self,
        _req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let engine = self.engine.clone();
        let faults = blocking(move || engine.list()).await?;
        Ok(Response::new(pb::ListResponse {
            faults: faults.iter().map(fault_pb).collect(),
        }))
    }

    type WatchCountersStream = ReceiverStream<Result<pb::CountersUpdate, Status>>;

    async fn watch_counters(
        &self,
        req: Request<pb::WatchCountersRequest>,
    ) -> Result<Response<Self::WatchCountersStream>, Status> {
        let req = req.into_inner();
        let interval = Duration::from_millis(req.interval_ms.clamp(50, 60_000) as u64);
        let engine = self.engine.clone();
        if engine.status(&req.id).is_none() {
            return Err(Status::not_found(format!("no active fault {}", req.id)));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let (id, engine2) = (req.id.clone(), engine.clone());
                let Ok(Some(f)) = tokio::task::spawn_blocking(move || engine2.status(&id)).await
                else {
                    break;
                };
                let ended = f.ended.is_some();
                let update = pb::CountersUpdate {
                    id: f.id,
                    counters: Some(counters_pb(f.counters)),
                    ended,
                };
                if tx.send(Ok(update)).await.is_err() || ended {
                    break;
                }
                tokio::time::sleep(interval).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn capabilities(
        &self,
        _req: Request<pb::CapabilitiesRequest>,
    ) -> Result<Response<pb::CapabilitiesResponse>, Status> {
        let caps = blocking(caps::detect).await?;
        Ok(Response::new(capabilities_pb(&caps)))
    }
}

pub fn capabilities_pb(c: &caps::Capabilities) -> pb::CapabilitiesResponse {
    pb::CapabilitiesResponse {
        arch: c.arch.to_string(),
        kernel: c.kernel.clone(),
        features: c
            .features
            .iter()
            .map(|f| pb::Feature {
                name: f.name.to_string(),
                present: f.present,
                detail: f.detail.clone(),
            })
            .collect(),
        backends: c
            .backends
            .iter()
            .map(|b| pb::Backend {
                name: b.name.to_string(),
                available: b.available,
                fault_kinds: b.fault_kinds.iter().map(|k| k.to_string()).collect(),
                reason: b.reason.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_spec_round_trips_without_a_network_target() {
        for cgroup in [CgroupRef::Path("/chaos/pod1".into()), CgroupRef::Pid(42)] {
            let spec = FaultSpec {
                kind: FaultKind::Cpu {
                    workers: 3,
                    load_percent: 42.5,
                    cgroup,
                },
                target: Target::none(),
                duration: Duration::from_secs(30),
            };
            let p: pb::FaultSpec = (&spec).into();
            assert!(p.target.is_none());
            assert_eq!(FaultSpec::try_from(p).unwrap(), spec);
        }
        let p = pb::FaultSpec {
            kind: Some(pb::fault_spec::Kind::Cpu(pb::Cpu {
                workers: 1,
                load_percent: 50.0,
                cgroup_target: None,
            })),
            target: None,
            duration_ms: 0,
        };
        assert_eq!(FaultSpec::try_from(p).unwrap_err().field, "--cgroup");
    }
}
