//! The wire at the edge: protobuf <-> chaos-spec, in one place. Every spec that arrives over
//! gRPC is validated here with the same parsers and error lines as the CLI and the files.
use crate::agent::v1 as pb;
use chaos_spec::{
    CgroupRef, Counters, Direction, FaultKind, FaultSpec, FillLevel, InvalidInput, MemorySize,
    MountRef, NetnsRef, ProcessRef, Protocol, SkewedClock, Target, invalid,
};
use std::time::Duration;

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
                bytes_per_sec: chaos_spec::parse_rate(&b.rate)?,
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
            Some(pb::fault_spec::Kind::ProcessPause(k)) => {
                let (target, name) = process_target(k.target)?;
                FaultKind::ProcessPause { target, name }
            }
            Some(pb::fault_spec::Kind::ClockSkew(k)) => {
                let (target, name) = process_target(k.target)?;
                FaultKind::ClockSkew {
                    target,
                    name,
                    offset_ns: k.offset_ns,
                    drift_ppm: k.drift_ppm,
                    clocks: SkewedClock::parse_list(&k.clocks)?,
                }
            }
            Some(pb::fault_spec::Kind::ProcessKill(k)) => {
                let (target, name) = process_target(k.target)?;
                FaultKind::ProcessKill {
                    target,
                    name,
                    signal: k.signal.parse()?,
                    interval_ms: k.interval_ms,
                }
            }
            Some(pb::fault_spec::Kind::Memory(m)) => FaultKind::Memory {
                size: match m.size {
                    Some(pb::memory::Size::Bytes(b)) => MemorySize::Bytes(b),
                    Some(pb::memory::Size::Percent(p)) => MemorySize::Percent(p),
                    None => {
                        return Err(invalid(
                            "--bytes",
                            "give exactly one of --bytes SIZE or --percent P",
                        ));
                    }
                },
                workers: m.workers,
                cgroup: match m.cgroup_target {
                    Some(pb::memory::CgroupTarget::Cgroup(path)) => CgroupRef::Path(path),
                    Some(pb::memory::CgroupTarget::Pid(pid)) => CgroupRef::Pid(pid),
                    Some(pb::memory::CgroupTarget::PodUid(uid)) => CgroupRef::Pod(uid),
                    None => CgroupRef::from_flags(None, None, None)?,
                },
                ramp_ms: m.ramp_ms,
                oom: m.oom,
            },
            Some(pb::fault_spec::Kind::DiskFill(d)) => FaultKind::DiskFill {
                path: d.path,
                level: match d.level {
                    Some(pb::disk_fill::Level::FillPercent(p)) => FillLevel::Percent(p),
                    Some(pb::disk_fill::Level::LeaveBytes(b)) => FillLevel::Leave(b),
                    Some(pb::disk_fill::Level::Bytes(b)) => FillLevel::Bytes(b),
                    None => {
                        return Err(invalid(
                            "--fill-percent",
                            "give exactly one of --fill-percent P, --leave SIZE or --bytes SIZE",
                        ));
                    }
                },
                mount: match d.mount {
                    None => MountRef::Own,
                    Some(pb::disk_fill::Mount::Pid(pid)) => MountRef::Pid(pid),
                    Some(pb::disk_fill::Mount::PodUid(uid)) => MountRef::Pod(uid),
                },
                force: d.force,
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
                    format!("must be one of {}", chaos_spec::kind_names()),
                ));
            }
        };
        let duration = if p.duration_ms == 0 {
            chaos_spec::DEFAULT_DURATION
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
                chaos_spec::check_pod_uid("--pod-uid", &uid)?;
                NetnsRef::Pod(uid)
            }
        };
        Ok(FaultSpec {
            kind,
            target: Target {
                netns,
                interface: t.interface,
                remote: chaos_spec::parse_cidrs("--dest", &t.dest)?,
                local: chaos_spec::parse_cidrs("--source", &t.source)?,
                ports: chaos_spec::parse_ports(&t.ports)?,
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
            FaultKind::ProcessPause {
                ref target,
                ref name,
            } => {
                return host_spec(
                    s,
                    pb::fault_spec::Kind::ProcessPause(pb::ProcessPause {
                        target: Some(process_target_pb(target, name)),
                    }),
                );
            }
            FaultKind::ClockSkew {
                ref target,
                ref name,
                offset_ns,
                drift_ppm,
                ref clocks,
            } => {
                return host_spec(
                    s,
                    pb::fault_spec::Kind::ClockSkew(pb::ClockSkew {
                        target: Some(process_target_pb(target, name)),
                        offset_ns,
                        drift_ppm,
                        clocks: clocks.iter().map(|c| c.name().to_string()).collect(),
                    }),
                );
            }
            FaultKind::ProcessKill {
                ref target,
                ref name,
                signal,
                interval_ms,
            } => {
                return host_spec(
                    s,
                    pb::fault_spec::Kind::ProcessKill(pb::ProcessKill {
                        target: Some(process_target_pb(target, name)),
                        signal: signal.name().into(),
                        interval_ms,
                    }),
                );
            }
            FaultKind::Memory {
                size,
                workers,
                ref cgroup,
                ramp_ms,
                oom,
            } => {
                return host_spec(
                    s,
                    pb::fault_spec::Kind::Memory(pb::Memory {
                        size: Some(match size {
                            MemorySize::Bytes(b) => pb::memory::Size::Bytes(b),
                            MemorySize::Percent(p) => pb::memory::Size::Percent(p),
                        }),
                        workers,
                        cgroup_target: Some(match cgroup {
                            CgroupRef::Path(p) => pb::memory::CgroupTarget::Cgroup(p.clone()),
                            CgroupRef::Pid(pid) => pb::memory::CgroupTarget::Pid(*pid),
                            CgroupRef::Pod(uid) => pb::memory::CgroupTarget::PodUid(uid.clone()),
                        }),
                        ramp_ms,
                        oom,
                    }),
                );
            }
            FaultKind::DiskFill {
                ref path,
                level,
                ref mount,
                force,
            } => {
                return host_spec(
                    s,
                    pb::fault_spec::Kind::DiskFill(pb::DiskFill {
                        path: path.clone(),
                        level: Some(match level {
                            FillLevel::Percent(p) => pb::disk_fill::Level::FillPercent(p),
                            FillLevel::Leave(b) => pb::disk_fill::Level::LeaveBytes(b),
                            FillLevel::Bytes(b) => pb::disk_fill::Level::Bytes(b),
                        }),
                        mount: match mount {
                            MountRef::Own => None,
                            MountRef::Pid(pid) => Some(pb::disk_fill::Mount::Pid(*pid)),
                            MountRef::Pod(uid) => Some(pb::disk_fill::Mount::PodUid(uid.clone())),
                        },
                        force,
                    }),
                );
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

impl From<Counters> for pb::Counters {
    fn from(c: Counters) -> Self {
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
}

/// A wire kind's row in the table of kinds (the wire carries the spec's kinds, and pod-kill).
pub fn kind_info(k: &pb::fault_spec::Kind) -> &'static chaos_spec::KindInfo {
    use chaos_spec::kinds;
    use pb::fault_spec::Kind;
    match k {
        Kind::Loss(_) => &kinds::LOSS,
        Kind::Corrupt(_) => &kinds::CORRUPT,
        Kind::Partition(_) => &kinds::PARTITION,
        Kind::Latency(_) => &kinds::LATENCY,
        Kind::Bandwidth(_) => &kinds::BANDWIDTH,
        Kind::Reorder(_) => &kinds::REORDER,
        Kind::Duplicate(_) => &kinds::DUPLICATE,
        Kind::Dns(_) => &kinds::DNS,
        Kind::Cpu(_) => &kinds::CPU,
        Kind::PodKill(_) => &kinds::POD_KILL,
        Kind::ContainerKill(_) => &kinds::CONTAINER_KILL,
        Kind::ProcessPause(_) => &kinds::PROCESS_PAUSE,
        Kind::ProcessKill(_) => &kinds::PROCESS_KILL,
        Kind::DiskFill(_) => &kinds::DISK_FILL,
        Kind::Memory(_) => &kinds::MEMORY,
        Kind::ClockSkew(_) => &kinds::CLOCK_SKEW,
    }
}

/// A host kind's spec: no network target.
fn host_spec(s: &FaultSpec, kind: pb::fault_spec::Kind) -> pb::FaultSpec {
    pb::FaultSpec {
        kind: Some(kind),
        target: None,
        duration_ms: s.duration.as_millis() as u64,
    }
}

fn process_target(t: Option<pb::ProcessTarget>) -> Result<(ProcessRef, String), InvalidInput> {
    let t = t.unwrap_or_default();
    let target = match t.target {
        Some(pb::process_target::Target::Pid(pid)) => ProcessRef::Pid(pid),
        Some(pb::process_target::Target::Cgroup(path)) => ProcessRef::Cgroup(path),
        Some(pb::process_target::Target::PodUid(uid)) => ProcessRef::Pod(uid),
        None => ProcessRef::from_flags(None, None, None)?,
    };
    Ok((target, t.name))
}

fn process_target_pb(target: &ProcessRef, name: &str) -> pb::ProcessTarget {
    pb::ProcessTarget {
        target: Some(match target {
            ProcessRef::Pid(pid) => pb::process_target::Target::Pid(*pid),
            ProcessRef::Cgroup(p) => pb::process_target::Target::Cgroup(p.clone()),
            ProcessRef::Pod(uid) => pb::process_target::Target::PodUid(uid.clone()),
        }),
        name: name.to_string(),
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
