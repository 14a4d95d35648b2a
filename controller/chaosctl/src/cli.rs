//! The command line: argument types, and what each command does.
#[doc(hidden)]
pub mod fuzzing;
use crate::output::{self, event};
use crate::{EXIT_INVALID, agent_client};
use anyhow::{Context, Result};
use chaos_agent::datapath::{AttachMode, Counters};
use chaos_agent::engine::{EndReason, Engine, EngineConfig, SweepScope};
use chaos_agent::server::capabilities_pb;
use chaos_agent::spec::{
    self, Direction, FaultKind, FaultSpec, InvalidInput, NetnsRef, Protocol, Target,
};
use chaos_agent::{EngineError, caps};
use chaos_experiment::Experiment;
use chaos_experiment::driver::{PodMode, PodSelector};
use chaos_experiment::model::{self as m, RawFault, RawTarget};
use chaos_proto::agent::v1 as pb;
use chaos_spec::params::{self, Kind, Params};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "chaosctl",
    version,
    about = "Inject network faults, precisely and safely"
)]
pub struct Cli {
    /// The chaos-agent to talk to.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "CHAOS_AGENT"
    )]
    agent: Option<String>,
    /// Print machine-readable JSON (one object per line).
    #[arg(long, global = true, help_heading = "Global options")]
    json: bool,
    /// A chaos-controller to go through (https://HOST:PORT), instead of one agent.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "CHAOS_CONTROLLER"
    )]
    controller: Option<String>,
    /// Directory with ca.pem and user-<user>.pem / -key.pem for the controller (and the one
    /// `certs init` and `certs issue` write).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "CHAOS_TLS_DIR"
    )]
    tls_dir: Option<PathBuf>,
    /// Whose certificate to use (user-<NAME>.pem in --tls-dir; default: the only one there);
    /// the audit log names it.
    #[arg(
        long = "as",
        global = true,
        help_heading = "Global options",
        env = "CHAOS_USER"
    )]
    user: Option<String>,
    /// Talk to the controller without TLS; allowed only on loopback.
    #[arg(long, global = true, help_heading = "Global options")]
    insecure_plaintext: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply a fault.
    Inject {
        #[command(subcommand)]
        fault: Box<FaultArgs>,
    },
    /// List active faults on the agent.
    List,
    /// Agents connected to the controller, with their labels and capabilities.
    Agents,
    /// Run an experiment (YAML, or a Chaos Toolkit JSON/YAML file). Exit codes: 0 hypothesis
    /// held, 1 violated, 2 aborted (stop condition or interrupt), 3 error or inconclusive.
    Run {
        file: PathBuf,
        /// Run the faults in this process, on this machine (no agent, no controller).
        #[arg(long, conflicts_with = "controller")]
        local: bool,
        /// Write run.json, junit.xml, report.md, report.html and plot.svg here.
        #[arg(long)]
        report_dir: Option<PathBuf>,
        /// Only validate the file (exit 0 if it would run, 3 with the error line if not).
        #[arg(long)]
        check: bool,
        /// Run it on a Kubernetes cluster (the kubeconfig's): it becomes a ChaosExperiment in
        /// this namespace, which chaos-controller runs; chaosctl follows it to its verdict, and
        /// Ctrl-C deletes it (reverting its faults).
        #[arg(long, conflicts_with_all = ["local", "controller", "check", "report_dir"])]
        namespace: Option<String>,
        /// Validate, then list what each fault action would hit now (pods, nodes,
        /// interfaces; pod targets are resolved through the kubeconfig's cluster). Applies
        /// nothing.
        #[arg(long, conflicts_with = "check")]
        dry_run: bool,
        /// With --local: journal directory for crash recovery.
        #[arg(
            long,
            default_value = "/run/chaos/journal",
            hide = true,
            env = "CHAOS_JOURNAL_DIR"
        )]
        journal_dir: PathBuf,
    },
    /// Past runs kept by the controller.
    Experiments {
        #[command(subcommand)]
        command: ExperimentsCommand,
    },
    /// Revert a fault by id, or all of them.
    Revert {
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// With --controller: only this agent's faults (with an id: the controller finds the
        /// agent holding it without this).
        #[arg(long)]
        on: Option<String>,
    },
    /// Revert every fault: this agent's, or with --controller every agent's (`revert --all`).
    Stop,
    /// Kernel features found here and what each backend can serve.
    Doctor,
    /// Remove, on this node, what dead chaos engines left in the kernel (found by journal and by
    /// our marks in every network namespace) and list it. Live engines' faults are not touched.
    Cleanup {
        /// Journal directory of this run (other engines' are found through the node's registry).
        #[arg(
            long,
            default_value = "/run/chaos/journal",
            hide = true,
            env = "CHAOS_JOURNAL_DIR"
        )]
        journal_dir: PathBuf,
    },
    /// Certificates for mutual TLS between controller, agents and chaosctl.
    Certs {
        #[command(subcommand)]
        command: crate::certs_cmd::CertsCommand,
    },
    /// Follow a fault's counters on the agent until it ends.
    Watch {
        id: String,
        /// Seconds between updates.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
}

#[derive(Subcommand)]
enum ExperimentsCommand {
    /// Every run, newest first.
    List,
    /// One run's game-day record (Markdown; --json for the record).
    Show {
        id: String,
        /// Also write its reports here.
        #[arg(long)]
        report_dir: Option<PathBuf>,
    },
}

/// One subcommand per kind; each kind's own flags are its parameters' type in
/// `chaos_spec::params`, the one an experiment file's `KIND:` mapping reads too.
#[derive(Subcommand)]
enum FaultArgs {
    /// Drop a percentage of matched packets, invisibly to the sender.
    Loss {
        #[command(flatten)]
        p: params::Loss,
        #[command(flatten)]
        common: Common,
    },
    /// Flip one payload bit in a percentage of matched packets.
    Corrupt {
        #[command(flatten)]
        p: params::Corrupt,
        #[command(flatten)]
        common: Common,
    },
    /// Drop every matched packet.
    Partition {
        #[command(flatten)]
        p: params::Partition,
        #[command(flatten)]
        common: Common,
    },
    /// Delay matched packets (netem, egress).
    Latency {
        #[command(flatten)]
        p: params::Latency,
        #[command(flatten)]
        common: Common,
    },
    /// Reorder: send a percentage of matched packets at once and delay the rest (netem, egress).
    Reorder {
        #[command(flatten)]
        p: params::Reorder,
        #[command(flatten)]
        common: Common,
    },
    /// Send a percentage of matched packets twice (netem, egress).
    Duplicate {
        #[command(flatten)]
        p: params::Duplicate,
        #[command(flatten)]
        common: Common,
    },
    /// Limit the bandwidth of matched traffic (egress, or ingress through an IFB).
    Bandwidth {
        #[command(flatten)]
        p: params::Bandwidth,
        #[command(flatten)]
        common: Common,
    },
    /// Fail DNS queries leaving the interface: dropped (timeout) or answered at once by the
    /// datapath with NXDOMAIN, SERVFAIL or REFUSED. UDP and TCP to port 53 unless --port says
    /// otherwise; TCP queries are dropped in every mode.
    Dns {
        #[command(flatten)]
        p: params::Dns,
        #[command(flatten)]
        common: Common,
    },
    /// CPU stress: workers inside the target's cgroups, each holding a share of one CPU (a
    /// noisy neighbour that spends the target's own CPU quota).
    Cpu {
        #[command(flatten)]
        p: params::Cpu,
        #[command(flatten)]
        run: Run,
    },
    /// Memory stress: workers inside the target's cgroups touching and holding memory (asleep,
    /// so no CPU is spent holding it); --oom lets the cgroup's OOM killer act.
    Memory {
        #[command(flatten)]
        p: params::Memory,
        #[command(flatten)]
        run: Run,
    },
    /// Signal the processes of a pod's container once (found through the pod's cgroup; the
    /// sandbox is spared, so the pod stays and the container restarts).
    ContainerKill {
        #[command(flatten)]
        p: params::ContainerKill,
        #[command(flatten)]
        run: Run,
    },
    /// Freeze processes until the fault ends: the cgroup freezer for a whole --cgroup, SIGSTOP
    /// otherwise. A guard process thaws them at the deadline, or at once if the engine dies.
    ProcessPause {
        #[command(flatten)]
        p: params::ProcessPause,
        #[command(flatten)]
        run: Run,
    },
    /// Signal processes once, or --every DURATION while the fault lasts (a crash loop).
    ProcessKill {
        #[command(flatten)]
        p: params::ProcessKill,
        #[command(flatten)]
        run: Run,
    },
    /// Move the clocks of processes (--offset, --drift-ppm): their vDSO and system-call reads,
    /// threads, children and exec'd programs; no other process. True time comes back at the
    /// end, or within 1 s of the engine's death.
    ClockSkew {
        #[command(flatten)]
        p: params::ClockSkew,
        #[command(flatten)]
        run: Run,
    },
    /// Fill a filesystem to a level and hold it (one fallocated file of a reserved name, removed
    /// at the end, or by a guard process if the engine dies); writers get ENOSPC.
    DiskFill {
        #[command(flatten)]
        p: params::DiskFill,
        #[command(flatten)]
        run: Run,
    },
    /// Delete pods through the cluster's API (needs --namespace); the run then waits for them
    /// to be replaced and measures the time until the selected pods are all Ready again.
    PodKill {
        #[command(flatten)]
        p: params::PodKill,
        #[command(flatten)]
        run: Run,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// Interface inside the target network namespace (default: its default route's; with
    /// --namespace: eth0 unless given).
    #[arg(long)]
    interface: Option<String>,
    /// Target netns by name (/run/netns/NAME) or path.
    #[arg(long, conflicts_with_all = ["pid", "pod_uid"])]
    netns: Option<String>,
    /// Target the network namespace of this process.
    #[arg(long, conflicts_with = "pod_uid")]
    pid: Option<u32>,
    /// Target the network namespace of this Kubernetes pod, found on the agent's node from its
    /// UID (`kubectl get pod NAME -o jsonpath='{.metadata.uid}'`).
    #[arg(long)]
    pod_uid: Option<String>,
    /// Remote CIDR (the far end: destination of egress, source of ingress). Repeatable.
    #[arg(long = "dest")]
    dest: Vec<String>,
    /// Local CIDR (the near end). Repeatable.
    #[arg(long = "source")]
    source: Vec<String>,
    /// Port or range A-B, matching either end of the flow. Repeatable.
    #[arg(long = "port")]
    port: Vec<String>,
    /// tcp, udp, icmp or all.
    #[arg(long, default_value = "all")]
    protocol: String,
    /// egress (leaving the interface), ingress, or both.
    #[arg(long, default_value = "egress")]
    direction: String,
    /// Shaping faults: replace a root qdisc another tool (a CNI) put on the interface. Its
    /// whole tree is snapshotted, proven restorable, and restored exactly on revert.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    run: Run,
}

/// How a fault runs, whatever its kind.
#[derive(Args, Clone)]
struct Run {
    /// How long the fault lasts; the node reverts it on its own after that.
    #[arg(long, default_value = "5m")]
    duration: String,
    /// Apply in this process instead of through an agent; blocks until the fault ends.
    #[arg(long)]
    local: bool,
    /// With --controller: the agents (node names) to apply on. Repeatable.
    #[arg(long = "on")]
    on: Vec<String>,
    /// With --controller: agents whose labels include k=v. With --namespace: pods whose
    /// labels include k=v. Repeatable.
    #[arg(long = "selector", value_parser = spec::parse_label)]
    selector: Vec<(String, String)>,
    /// Fault pods in this Kubernetes namespace through the cluster (the kubeconfig's): the
    /// fault becomes a ChaosExperiment there, which chaos-controller runs; chaosctl follows it
    /// and exits with its verdict. Ctrl-C deletes it, reverting the fault.
    #[arg(long, conflicts_with_all = ["local", "on"])]
    namespace: Option<String>,
    /// With --namespace: how many matching pods: all, one, fixed=N, fixed-percent=P or
    /// random-max-percent=P.
    #[arg(long, default_value = "all")]
    pods: String,
    /// With --namespace: only pods on nodes whose labels include k=v. Repeatable.
    #[arg(long = "node-selector", value_parser = spec::parse_label)]
    node_selector: Vec<(String, String)>,
    /// With --local: how to attach (auto, tcx, clsact).
    #[arg(long, default_value = "auto", hide = true, env = "CHAOS_ATTACH")]
    attach: String,
    /// With --local: journal directory for crash recovery.
    #[arg(
        long,
        default_value = "/run/chaos/journal",
        hide = true,
        env = "CHAOS_JOURNAL_DIR"
    )]
    journal_dir: PathBuf,
    /// With --local: seconds between live counter lines (0 = none).
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
}

impl FaultArgs {
    /// The spec, and how to run it.
    fn spec(&self) -> Result<(FaultSpec, &Run), InvalidInput> {
        if let FaultArgs::PodKill { .. } = self {
            return Err(spec::invalid(
                "--namespace",
                "pod-kill deletes pods through the cluster's API: give the pods' namespace",
            ));
        }
        let (params, _, run) = self.parts();
        let kind = params.kind()?;
        let spec = match self.common() {
            Some(common) => spec_from(kind, common)?,
            None => FaultSpec {
                kind,
                target: Target::none(),
                duration: spec::parse_duration(&run.duration)?,
            },
        };
        Ok((spec, run))
    }

    /// The kind's parameters and name, and how the fault runs. Every kind is matched here
    /// and in [`FaultArgs::common`], and nowhere else.
    fn parts(&self) -> (&dyn Params, &'static str, &Run) {
        fn net<'a, P: Params + Kind>(
            p: &'a P,
            c: &'a Common,
        ) -> (&'a dyn Params, &'static str, &'a Run) {
            (p, P::NAME, &c.run)
        }
        match self {
            FaultArgs::Loss { p, common } => net(p, common),
            FaultArgs::Corrupt { p, common } => net(p, common),
            FaultArgs::Partition { p, common } => net(p, common),
            FaultArgs::Latency { p, common } => net(p, common),
            FaultArgs::Reorder { p, common } => net(p, common),
            FaultArgs::Duplicate { p, common } => net(p, common),
            FaultArgs::Bandwidth { p, common } => net(p, common),
            FaultArgs::Dns { p, common } => net(p, common),
            FaultArgs::Cpu { p, run } => (p, params::Cpu::NAME, run),
            FaultArgs::Memory { p, run } => (p, params::Memory::NAME, run),
            FaultArgs::ContainerKill { p, run } => (p, params::ContainerKill::NAME, run),
            FaultArgs::ProcessPause { p, run } => (p, params::ProcessPause::NAME, run),
            FaultArgs::ProcessKill { p, run } => (p, params::ProcessKill::NAME, run),
            FaultArgs::DiskFill { p, run } => (p, params::DiskFill::NAME, run),
            FaultArgs::ClockSkew { p, run } => (p, params::ClockSkew::NAME, run),
            FaultArgs::PodKill { p, run } => (p, params::PodKill::NAME, run),
        }
    }

    /// The network target flags, for a network fault.
    fn common(&self) -> Option<&Common> {
        match self {
            FaultArgs::Loss { common, .. }
            | FaultArgs::Corrupt { common, .. }
            | FaultArgs::Partition { common, .. }
            | FaultArgs::Latency { common, .. }
            | FaultArgs::Reorder { common, .. }
            | FaultArgs::Duplicate { common, .. }
            | FaultArgs::Bandwidth { common, .. }
            | FaultArgs::Dns { common, .. } => Some(common),
            FaultArgs::Cpu { .. }
            | FaultArgs::Memory { .. }
            | FaultArgs::ContainerKill { .. }
            | FaultArgs::ProcessPause { .. }
            | FaultArgs::ProcessKill { .. }
            | FaultArgs::DiskFill { .. }
            | FaultArgs::ClockSkew { .. }
            | FaultArgs::PodKill { .. } => None,
        }
    }

    /// The fault as an action of the experiment model, for a cluster: its pods are chosen by
    /// the controller from `target.pods`, so node-level targets (--netns, --pid, --pod-uid,
    /// --cgroup) have no place here.
    fn model_fault(&self) -> Result<(RawFault, &Run), InvalidInput> {
        let mut f = RawFault {
            name: self.kind_name().into(),
            ..RawFault::default()
        };
        match self {
            FaultArgs::Loss { p, .. } => f.loss = Some(p.clone()),
            FaultArgs::Corrupt { p, .. } => f.corrupt = Some(p.clone()),
            FaultArgs::Partition { p, .. } => f.partition = Some(p.clone()),
            FaultArgs::Latency { p, .. } => {
                if !p.dest_ms.is_empty() {
                    return Err(spec::invalid(
                        "--dest-ms",
                        "is for a node; on a cluster give one --ms with --dest",
                    ));
                }
                f.latency = Some(p.clone())
            }
            FaultArgs::Reorder { p, .. } => f.reorder = Some(p.clone()),
            FaultArgs::Duplicate { p, .. } => f.duplicate = Some(p.clone()),
            FaultArgs::Bandwidth { p, .. } => f.bandwidth = Some(p.clone()),
            FaultArgs::Dns { p, .. } => f.dns = Some(p.clone()),
            FaultArgs::Cpu { p, .. } => {
                if !p.target.is_empty() {
                    return Err(spec::invalid(
                        "--namespace",
                        "stresses each chosen pod's own cgroup; drop --cgroup, --pid and --pod-uid",
                    ));
                }
                f.cpu = Some(p.clone())
            }
            FaultArgs::Memory { p, .. } => {
                if !p.target.is_empty() {
                    return Err(spec::invalid(
                        "--namespace",
                        "stresses each chosen pod's own cgroup; drop --cgroup, --pid and --pod-uid",
                    ));
                }
                f.memory = Some(p.clone())
            }
            FaultArgs::ContainerKill { p, .. } => f.container_kill = Some(p.clone()),
            FaultArgs::ProcessPause { p, .. } => {
                no_node_target(&p.target)?;
                f.process_pause = Some(p.clone())
            }
            FaultArgs::ProcessKill { p, .. } => {
                no_node_target(&p.target)?;
                f.process_kill = Some(p.clone())
            }
            FaultArgs::ClockSkew { p, .. } => {
                no_node_target(&p.target)?;
                f.clock_skew = Some(p.clone())
            }
            FaultArgs::DiskFill { p, .. } => {
                if p.pid.is_some() || p.pod_uid.is_some() {
                    return Err(spec::invalid(
                        "--namespace",
                        "fills --path in each chosen pod; drop --pid and --pod-uid",
                    ));
                }
                f.disk_fill = Some(p.clone())
            }
            FaultArgs::PodKill { p, .. } => f.pod_kill = Some(p.clone()),
        }
        let run = self.run();
        if let Some(c) = self.common() {
            if c.netns.is_some() || c.pid.is_some() || c.pod_uid.is_some() {
                return Err(spec::invalid(
                    "--namespace",
                    "faults each chosen pod's own network namespace; drop --netns, --pid and --pod-uid",
                ));
            }
            f.target = RawTarget {
                interface: c.interface.clone().unwrap_or_else(|| "eth0".into()),
                dest: c.dest.clone(),
                source: c.source.clone(),
                ports: c.port.clone(),
                protocol: c.protocol.clone(),
                direction: c.direction.clone(),
                force: c.force,
                ..RawTarget::default()
            };
        }
        let namespace = run.namespace.clone().unwrap_or_default();
        let (mode, value) = match run.pods.split_once('=') {
            Some((m, v)) => (
                m,
                Some(v.parse::<f64>().map_err(|_| {
                    spec::invalid("--pods", format!("`{v}` in `{}` is not a number", run.pods))
                })?),
            ),
            None => (run.pods.as_str(), None),
        };
        let mode: PodMode = serde_json::from_value(json!(mode)).map_err(|_| {
            spec::invalid(
                "--pods",
                format!(
                    "`{}` must be all, one, fixed=N, fixed-percent=P or random-max-percent=P",
                    run.pods
                ),
            )
        })?;
        f.target.pods = Some(PodSelector {
            namespaces: vec![namespace],
            labels: run.selector.iter().cloned().collect(),
            node_labels: run.node_selector.iter().cloned().collect(),
            mode,
            value,
            allow_protected: false,
            allow_host_network: false,
        });
        f.duration = Some(m::Dur(spec::parse_duration(&run.duration)?));
        Ok((f, run))
    }

    /// The subcommand's name, as the model names the fault kind.
    fn kind_name(&self) -> &'static str {
        self.parts().1
    }

    /// How the fault runs, and where (--namespace).
    fn run(&self) -> &Run {
        self.parts().2
    }

    fn namespace(&self) -> Option<&str> {
        self.run().namespace.as_deref()
    }
}

/// On a cluster each chosen pod is the target: node-level process targets have no place.
fn no_node_target(t: &params::ProcessTarget) -> Result<(), InvalidInput> {
    if t.pid.is_some() || t.cgroup.is_some() || t.pod_uid.is_some() {
        return Err(spec::invalid(
            "--namespace",
            "acts on each chosen pod's processes; drop --pid, --cgroup and --pod-uid (--name still narrows)",
        ));
    }
    Ok(())
}

fn spec_from(kind: FaultKind, c: &Common) -> Result<FaultSpec, InvalidInput> {
    let netns = match (&c.netns, c.pid, &c.pod_uid) {
        (Some(n), _, _) => NetnsRef::named(n)?,
        (None, Some(pid), _) => NetnsRef::Pid(pid),
        (None, None, Some(uid)) => {
            spec::check_pod_uid("--pod-uid", uid)?;
            NetnsRef::Pod(uid.clone())
        }
        (None, None, None) => NetnsRef::Current,
    };
    Ok(FaultSpec {
        kind,
        target: Target {
            netns,
            // None: the engine picks the target namespace's default-route interface.
            interface: c.interface.clone().unwrap_or_default(),
            remote: spec::parse_cidrs("--dest", &c.dest)?,
            local: spec::parse_cidrs("--source", &c.source)?,
            ports: spec::parse_ports(&c.port)?,
            protocol: c.protocol.parse::<Protocol>()?,
            direction: c.direction.parse::<Direction>()?,
            force: c.force,
        },
        duration: spec::parse_duration(&c.run.duration)?,
    })
}

/// A one-action experiment without a hypothesis: what `inject` runs on a cluster. Validated
/// by the loader the controller uses, so a bad flag fails here with the same line.
fn inject_experiment(fault: RawFault, run: &Run) -> Result<Experiment, String> {
    let mut title = format!(
        "chaosctl inject {} in {}",
        fault.name,
        run.namespace.as_deref().unwrap_or_default()
    );
    for (k, v) in &run.selector {
        title.push_str(&format!(" {k}={v}"));
    }
    // A long selector is the user's right; a title is a label and stays within the limit.
    title.truncate(title.floor_char_boundary(chaos_experiment::load::MAX_TITLE));
    let text = serde_json::to_string(&json!({
        "title": title,
        "method": [{"fault": fault}],
    }))
    .map_err(|e| e.to_string())?;
    // The loader's line and column point into text the user never saw: keep the rule.
    Experiment::parse(&text, "inject").map_err(|e| {
        let line = e.to_string();
        match line.find("fault.") {
            Some(i) => format!("invalid {}", &line[i..]),
            None => line,
        }
    })
}

pub fn refuse(message: impl std::fmt::Display) -> Result<ExitCode> {
    output::error(message, EXIT_INVALID);
    Ok(ExitCode::from(EXIT_INVALID))
}

/// Whether `--json` was given.
pub fn json(cli: &Cli) -> bool {
    cli.json
}

/// The controller the global flags name, if any.
pub fn controller_flags(cli: &Cli) -> Option<crate::controller_client::ControllerFlags> {
    cli.controller
        .clone()
        .map(|url| crate::controller_client::ControllerFlags {
            url,
            tls_dir: cli.tls_dir.clone(),
            user: cli.user.clone(),
            insecure_plaintext: cli.insecure_plaintext,
        })
}

pub async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let controller = controller_flags(&cli);
    let agent = cli
        .agent
        .clone()
        .unwrap_or_else(|| agent_client::DEFAULT_AGENT.to_string());
    match cli.command {
        Command::Inject { fault } if fault.namespace().is_some() => {
            if controller.is_some() {
                return refuse(
                    "--namespace: goes through the cluster's controller; drop --controller",
                );
            }
            let exp = fault
                .model_fault()
                .map_err(|e| e.to_string())
                .and_then(|(f, run)| inject_experiment(f, run));
            match exp {
                Ok(exp) => {
                    let ns = fault.namespace().unwrap_or_default().to_string();
                    let how = crate::cluster_cmd::Submit {
                        prefix: fault.kind_name(),
                        refused: crate::EXIT_INVALID,
                    };
                    crate::cluster_cmd::submit(exp, &ns, how, cli.json).await
                }
                Err(e) => refuse(e),
            }
        }
        Command::Inject { fault } => {
            let (spec, run) = match fault.spec() {
                Ok(s) => s,
                Err(e) => return refuse(e),
            };
            if run.local {
                inject_local(spec, run, cli.json).await
            } else if let Some(ctl) = controller {
                crate::fleet_cmd::inject(&ctl, spec, &run.on, &run.selector, cli.json).await
            } else {
                inject_remote(spec, &agent, cli.json).await
            }
        }
        Command::Agents => match controller {
            Some(ctl) => crate::fleet_cmd::agents(&ctl, cli.json).await,
            None => refuse("--controller: is required for `agents`"),
        },
        Command::List => match controller {
            Some(ctl) => crate::fleet_cmd::list(&ctl, cli.json).await,
            None => list(&agent, cli.json).await,
        },
        Command::Revert { id, all, on } => match controller {
            Some(ctl) => crate::fleet_cmd::revert(&ctl, id, all, on, cli.json).await,
            None => revert(&agent, id, all, cli.json).await,
        },
        Command::Stop => match controller {
            Some(ctl) => crate::fleet_cmd::revert(&ctl, None, true, None, cli.json).await,
            None => revert(&agent, None, true, cli.json).await,
        },
        Command::Doctor => doctor(cli.agent.as_deref(), cli.json).await,
        Command::Cleanup { journal_dir } => cleanup(journal_dir, cli.json).await,
        Command::Watch { id, interval } => match controller {
            Some(ctl) => crate::fleet_cmd::watch(&ctl, &id, interval, cli.json).await,
            None => watch(&agent, &id, interval, cli.json).await,
        },
        Command::Certs { command } => crate::certs_cmd::run(command, cli.tls_dir.clone()),
        Command::Run {
            file,
            local,
            report_dir,
            check,
            dry_run,
            journal_dir,
            namespace,
        } => {
            if check {
                return crate::run_cmd::check(&file);
            }
            if let (Some(ns), false) = (namespace, dry_run) {
                return match Experiment::load(&file) {
                    Ok(exp) => {
                        let how = crate::cluster_cmd::Submit {
                            prefix: "run",
                            refused: crate::run_cmd::EXIT_ERROR,
                        };
                        crate::cluster_cmd::submit(exp, &ns, how, cli.json).await
                    }
                    Err(e) => crate::run_cmd::fail(e),
                };
            }
            if dry_run {
                return crate::run_cmd::dry_run(&file).await;
            }
            crate::run_cmd::run(
                crate::run_cmd::RunArgs {
                    file: &file,
                    local,
                    report_dir: report_dir.as_deref(),
                    journal_dir,
                    json: cli.json,
                },
                controller.as_ref(),
            )
            .await
        }
        Command::Experiments { command } => {
            let Some(ctl) = controller else {
                return refuse("--controller: is required for `experiments`");
            };
            match command {
                ExperimentsCommand::List => crate::run_cmd::list(&ctl, cli.json).await,
                ExperimentsCommand::Show { id, report_dir } => {
                    crate::run_cmd::show_run(&ctl, &id, report_dir.as_deref(), cli.json).await
                }
            }
        }
    }
}

/// Runs the engine in this process: apply, report live counters, revert at the end of the
/// duration or on SIGINT/SIGTERM.
async fn inject_local(spec: FaultSpec, common: &Run, json: bool) -> Result<ExitCode> {
    // Refuse bad input before starting anything (the engine checks again).
    if let Err(e) = spec.validate(EngineConfig::default().max_duration) {
        return refuse(e);
    }
    let config = EngineConfig {
        journal_dir: common.journal_dir.clone(),
        attach: match common.attach.as_str() {
            "tcx" => AttachMode::Tcx,
            "clsact" => AttachMode::Clsact,
            "auto" => AttachMode::detect(),
            other => {
                return refuse(format!(
                    "invalid --attach: `{other}` must be auto, tcx or clsact"
                ));
            }
        },
        ..EngineConfig::default()
    };
    let duration = spec.duration;
    // Listening before the fault goes live: a signal sent as soon as "applied" is printed
    // must revert it, not be lost.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let started = tokio::task::spawn_blocking(move || -> Result<_, EngineError> {
        let (engine, reclaimed) = Engine::start(config)?;
        if reclaimed.faults > 0 || reclaimed.qdiscs > 0 {
            tracing::warn!(
                faults = reclaimed.faults,
                filters = reclaimed.clsact_filters,
                root_qdiscs = reclaimed.qdiscs,
                "removed leftovers of a crashed run"
            );
        }
        for r in &reclaimed.refused {
            tracing::warn!("a journal named what is not ours: {r}");
        }
        // Dead engines' leftovers on the namespace this fault uses go first: an orphaned root
        // there would otherwise refuse a shaping fault.
        if spec.kind.is_network() {
            match engine.sweep(SweepScope::Netns(&spec.target.netns)) {
                Ok(swept) => {
                    for line in &swept.removed {
                        tracing::warn!("removed a dead engine's {line}");
                    }
                }
                // A missing namespace is the apply's to refuse, in one line.
                Err(e) if e.is_user_error() => {}
                Err(e) => tracing::warn!("sweep before apply: {e}"),
            }
        }
        engine.spawn_deadline_enforcer();
        let applied = engine.apply(spec);
        Ok((engine, applied))
    })
    .await?;
    let (engine, applied) = match started {
        Ok(started) => started,
        Err(e) if e.is_user_error() => return refuse(e),
        Err(e) => return Err(anyhow::Error::from(e).context("start the fault engine")),
    };
    let fault = match applied {
        Ok(f) => f,
        Err(e) if e.is_user_error() => return refuse(e),
        Err(e) => return Err(e.into()),
    };
    let id = fault.id.clone();
    event(
        json,
        "applied",
        &id,
        None,
        json!({
            "kind": fault.spec.kind.name(),
            "summary": format!("{}, for {}", fault.spec, spec::format_duration(duration)),
            "interface": fault.spec.target.interface,
            "target": target_label(&(&fault.spec).into()),
            "backend": fault.backend,
            "duration_ms": duration.as_millis() as u64,
            "deadline_unix_ms": chaos_agent::engine::unix_ms(fault.deadline),
        }),
    );

    let end = tokio::time::Instant::now() + duration;
    let interval = Duration::from_secs_f64(common.interval.max(0.05));
    let mut next_report = Instant::now() + interval;
    let reason = loop {
        let tick = tokio::time::sleep(Duration::from_millis(50));
        tokio::select! {
            _ = term.recv() => break "sigterm",
            _ = int.recv() => break "sigint",
            _ = tokio::time::sleep_until(end) => break "duration",
            _ = tick => {}
        }
        match engine.status(&id) {
            Some(f) if f.ended.is_some() => break "deadline",
            Some(f) if common.interval > 0.0 && Instant::now() >= next_report => {
                next_report += interval;
                event(json, "counters", &id, Some(&f.counters), json!({}));
            }
            None => break "deadline",
            _ => {}
        }
    };
    let engine2 = engine.clone();
    let id2 = id.clone();
    let final_status = tokio::task::spawn_blocking(move || match engine2.revert(&id2) {
        Ok(f) => Ok(f),
        // The node's own deadline got there first: it is already reverted.
        Err(EngineError::NotFound(_)) => engine2.status(&id2).ok_or(EngineError::NotFound(id2)),
        Err(e) => Err(e),
    })
    .await??;
    let counters: Counters = final_status.counters;
    let how = match final_status.ended {
        Some(EndReason::Expired) => "deadline",
        _ => reason,
    };
    event(
        json,
        "reverted",
        &id,
        Some(&counters),
        json!({ "reason": how }),
    );
    drop(engine);
    Ok(ExitCode::SUCCESS)
}

async fn inject_remote(spec: FaultSpec, agent: &str, json: bool) -> Result<ExitCode> {
    if let Err(e) = spec.validate(spec::DEFAULT_MAX_DURATION) {
        return refuse(e);
    }
    let mut client = agent_client::connect(agent).await?;
    let req = pb::ApplyRequest {
        spec: Some((&spec).into()),
    };
    match client.apply(req).await {
        Ok(resp) => {
            let fault = resp.into_inner().fault.context("agent returned no fault")?;
            // The agent's spec: what it chose (the default route's interface) included.
            let summary = fault
                .spec
                .clone()
                .and_then(|s| FaultSpec::try_from(s).ok())
                .map(|s| format!("{s}, for {}", spec::format_duration(s.duration)));
            event(
                json,
                "applied",
                &fault.id,
                None,
                json!({ "backend": fault.backend, "deadline_unix_ms": fault.deadline_unix_ms, "summary": summary }),
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::InvalidArgument | tonic::Code::PermissionDenied
            ) =>
        {
            refuse(s.message())
        }
        Err(s) => Err(anyhow::anyhow!("agent: {}", s.message())),
    }
}

fn fault_counters(f: &pb::Fault) -> Counters {
    f.counters.unwrap_or_default().into()
}

async fn list(agent: &str, json: bool) -> Result<ExitCode> {
    let mut client = agent_client::connect(agent).await?;
    let faults = client
        .list(pb::ListRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("agent: {}", s.message()))?
        .into_inner()
        .faults;
    let faults: Vec<(Option<String>, pb::Fault)> = faults.into_iter().map(|f| (None, f)).collect();
    print_faults(&faults, json);
    Ok(ExitCode::SUCCESS)
}

/// Faults as `list` shows them; with a node, the agent that holds each (through a controller).
pub(crate) fn print_faults(faults: &[(Option<String>, pb::Fault)], json: bool) {
    if json {
        let items: Vec<_> = faults.iter().map(|(node, f)| json!({
            "id": f.id,
            "node": node,
            "kind": kind_name(f),
            "interface": f.spec.as_ref().and_then(|s| s.target.as_ref()).map(|t| t.interface.clone()),
            "target": f.spec.as_ref().map(target_label),
            "deadline_unix_ms": f.deadline_unix_ms,
            "backend": f.backend,
            "counters": output::counters_json(&fault_counters(f)),
        })).collect();
        println!("{}", serde_json::Value::Array(items));
    } else if faults.is_empty() {
        println!("no active faults");
    } else {
        let now = chaos_agent::engine::unix_ms(std::time::SystemTime::now()) as i64;
        for (node, f) in faults {
            // The whole fault as the spec says it; the terse label if it does not convert.
            let what = f
                .spec
                .clone()
                .and_then(|s| FaultSpec::try_from(s).ok())
                .map(|s| s.to_string())
                .unwrap_or_else(|| {
                    let target = f.spec.as_ref().map_or("?".into(), target_label);
                    format!("{} on {target}", kind_name(f))
                });
            let left = Duration::from_millis(f.deadline_unix_ms.saturating_sub(now).max(0) as u64);
            let on = node.as_ref().map(|n| format!(" [{n}]")).unwrap_or_default();
            println!(
                "{}{on} {what} ({}), {} left, {}",
                f.id,
                f.backend,
                spec::format_duration(Duration::from_secs(left.as_secs())),
                output::counters_line(&fault_counters(f))
            );
        }
    }
}

fn kind_name(f: &pb::Fault) -> &'static str {
    f.spec
        .as_ref()
        .and_then(|s| s.kind.as_ref())
        .map_or("unknown", |k| chaos_proto::convert::kind_info(k).name)
}

/// What a fault acts on: the interface, or for cpu the cgroup or process.
fn target_label(s: &pb::FaultSpec) -> String {
    match &s.kind {
        Some(pb::fault_spec::Kind::Cpu(c)) => match &c.cgroup_target {
            Some(pb::cpu::CgroupTarget::Cgroup(p)) => format!("cgroup {p}"),
            Some(pb::cpu::CgroupTarget::Pid(pid)) => format!("cgroups of pid {pid}"),
            Some(pb::cpu::CgroupTarget::PodUid(uid)) => format!("cgroup of pod {uid}"),
            None => "?".into(),
        },
        _ => s
            .target
            .as_ref()
            .map_or("?".into(), |t| t.interface.clone()),
    }
}

async fn revert(agent: &str, id: Option<String>, all: bool, json: bool) -> Result<ExitCode> {
    if id.is_none() && !all {
        return refuse("invalid revert: give a fault id or --all");
    }
    let mut client = agent_client::connect(agent).await?;
    let req = pb::RevertRequest {
        id: id.unwrap_or_default(),
        all,
    };
    match client.revert(req).await {
        Ok(resp) => {
            let reverted = resp.into_inner().reverted;
            if reverted.is_empty() && !json {
                println!("no active faults: nothing to revert");
            }
            for f in reverted {
                let summary = f
                    .spec
                    .clone()
                    .and_then(|s| FaultSpec::try_from(s).ok())
                    .map(|s| s.to_string());
                event(
                    json,
                    "reverted",
                    &f.id,
                    Some(&fault_counters(&f)),
                    json!({ "summary": summary }),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(s) if s.code() == tonic::Code::NotFound => refuse(s.message()),
        Err(s) => Err(anyhow::anyhow!("agent: {}", s.message())),
    }
}

/// `--interval` of `watch`, checked.
pub(crate) fn watch_interval(interval: f64) -> Result<Duration, String> {
    if interval.is_finite() && interval > 0.0 && interval <= 3600.0 {
        Ok(Duration::from_secs_f64(interval))
    } else {
        Err(format!(
            "invalid --interval: must be greater than 0 and at most 3600 (got {interval})"
        ))
    }
}

async fn watch(agent: &str, id: &str, interval: f64, json: bool) -> Result<ExitCode> {
    if let Err(line) = watch_interval(interval) {
        return refuse(line);
    }
    let mut client = agent_client::connect(agent).await?;
    let req = pb::WatchCountersRequest {
        id: id.to_string(),
        interval_ms: (interval * 1000.0).round() as u32,
    };
    let mut stream = match client.watch_counters(req).await {
        Ok(s) => s.into_inner(),
        Err(s) if s.code() == tonic::Code::NotFound => return refuse(s.message()),
        Err(s) => return Err(anyhow::anyhow!("agent: {}", s.message())),
    };
    while let Some(update) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("agent: {}", s.message()))?
    {
        let counters: Counters = update.counters.unwrap_or_default().into();
        let name = if update.ended { "ended" } else { "counters" };
        event(json, name, &update.id, Some(&counters), json!({}));
        if update.ended {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `chaosctl cleanup`: one sweep of the node by an engine of its own, what it removed listed.
async fn cleanup(journal_dir: PathBuf, json: bool) -> Result<ExitCode> {
    let config = EngineConfig {
        journal_dir,
        ..EngineConfig::default()
    };
    let report = tokio::task::spawn_blocking(move || -> Result<_, EngineError> {
        let (engine, mut at_start) = Engine::start(config)?;
        let swept = engine.sweep(SweepScope::Node)?;
        at_start.removed.extend(swept.removed);
        at_start.errors.extend(swept.errors);
        at_start.refused.extend(swept.refused);
        at_start.journals += swept.journals;
        at_start.faults += swept.faults;
        at_start.namespaces = swept.namespaces;
        Ok(at_start)
    })
    .await?
    .context("sweep the node")?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "namespaces": report.namespaces,
                "journals": report.journals,
                "faults": report.faults,
                "removed": report.removed,
                "refused": report.refused,
                "errors": report.errors,
            })
        );
    } else {
        println!(
            "swept {} network namespaces; {} dead engines' journals ({} faults) reclaimed",
            report.namespaces, report.journals, report.faults
        );
        for line in &report.removed {
            println!("removed {line}");
        }
        for line in &report.refused {
            println!("left in place: {line}");
        }
        for line in &report.errors {
            eprintln!("error: {line}");
        }
    }
    Ok(if report.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn doctor(agent: Option<&str>, json: bool) -> Result<ExitCode> {
    let caps = match agent {
        Some(url) => {
            let mut client = agent_client::connect(url).await?;
            client
                .capabilities(pb::CapabilitiesRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("agent: {}", s.message()))?
                .into_inner()
        }
        None => capabilities_pb(&tokio::task::spawn_blocking(caps::detect).await?),
    };
    // Each kind with the backends that can run it, and whether one of them works here.
    let kinds: Vec<(&str, Vec<(&str, bool)>)> = chaos_spec::KINDS
        .iter()
        .map(|k| {
            let on: Vec<(&str, bool)> = k
                .backends
                .iter()
                .map(|b| {
                    let up = caps
                        .backends
                        .iter()
                        .any(|have| have.name == *b && have.available);
                    (*b, up)
                })
                .collect();
            (k.name, on)
        })
        .collect();
    if json {
        let v = json!({
            "arch": caps.arch,
            "kernel": caps.kernel,
            "features": caps.features.iter().map(|f| json!({"name": f.name, "present": f.present, "detail": f.detail})).collect::<Vec<_>>(),
            "backends": caps.backends.iter().map(|b| json!({"name": b.name, "available": b.available, "fault_kinds": b.fault_kinds, "reason": b.reason})).collect::<Vec<_>>(),
            "kinds": kinds.iter().map(|(name, on)| json!({
                "name": name,
                "works": on.iter().any(|(_, up)| *up),
                "backends": on.iter().map(|(b, up)| json!({"name": b, "available": up})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("arch: {}  kernel: {}", caps.arch, caps.kernel);
    println!("kernel features:");
    for f in &caps.features {
        println!(
            "  {:<10} {:<4} {}",
            f.name,
            if f.present { "yes" } else { "no" },
            f.detail
        );
    }
    println!("backends:");
    for b in &caps.backends {
        let state = if b.available && b.reason.is_empty() {
            "ready".to_string()
        } else if b.available {
            format!("ready ({})", b.reason)
        } else {
            format!("unavailable: {}", b.reason)
        };
        println!("  {:<12} {:<34} {state}", b.name, b.fault_kinds.join(", "));
    }
    println!("fault kinds:");
    for (name, on) in &kinds {
        let works = if on.iter().any(|(_, up)| *up) {
            "works"
        } else {
            "unavailable"
        };
        let via: Vec<String> = on
            .iter()
            .map(|(b, up)| format!("{b}{}", if *up { "" } else { " (unavailable)" }))
            .collect();
        println!("  {name:<15} {works:<12} {}", via.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    /// clap checks flag clashes (a subcommand's flag shadowing a global one) only at run time.
    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    /// Every kind, three ways: `chaosctl inject` on a node, the same fault as an experiment
    /// file's action, and that spec through the protobuf and back. A kind without a row here
    /// fails the test, so a new kind is tried on every surface.
    #[test]
    fn every_kind_is_the_same_fault_from_the_cli_a_file_and_the_wire() {
        use chaos_experiment::model::{Fault, RawFault};
        use chaos_spec::FaultSpec;
        use clap::Parser;
        const POD: &str = "6f1d9c43-8c1e-4a57-9f0a-2f4d5e6a7b8c";
        // (kind, its flags, its file mapping, the target flags and keys for a network kind)
        let net = [
            "--interface",
            "eth0",
            "--dest",
            "10.0.0.0/8",
            "--port",
            "80",
        ];
        let net_yaml = "target: {interface: eth0, dest: [10.0.0.0/8], ports: ['80']}";
        let rows: &[(&str, &[&str], &str, bool)] = &[
            (
                "loss",
                &["--percent", "5%", "--correlation", "25"],
                "loss: {percent: 5, correlation: 25}",
                true,
            ),
            (
                "corrupt",
                &["--percent", "1"],
                "corrupt: {percent: 1}",
                true,
            ),
            ("partition", &[], "partition: {}", true),
            (
                "latency",
                &[
                    "--ms",
                    "500ms",
                    "--jitter-ms",
                    "20",
                    "--correlation",
                    "10",
                    "--distribution",
                    "normal",
                    "--backend",
                    "netem",
                ],
                "latency: {ms: 500, jitter-ms: 20, correlation: 10, distribution: normal, backend: netem}",
                true,
            ),
            (
                "bandwidth",
                &["--rate", "1mbit"],
                "bandwidth: {rate: 1mbit}",
                true,
            ),
            (
                "reorder",
                &["--percent", "30", "--ms", "40"],
                "reorder: {percent: 30, ms: 40}",
                true,
            ),
            (
                "duplicate",
                &["--percent", "2"],
                "duplicate: {percent: 2}",
                true,
            ),
            (
                "dns",
                &[
                    "--mode",
                    "nxdomain",
                    "--domain",
                    "example.com",
                    "--domain",
                    "*.shop.svc",
                ],
                "dns: {mode: nxdomain, domains: [example.com, '*.shop.svc']}",
                true,
            ),
            (
                "cpu",
                &["--workers", "2", "--load", "40", "--cgroup", "/chaos/x"],
                "cpu: {workers: 2, load: 40, cgroup: /chaos/x}",
                false,
            ),
            (
                "container-kill",
                &["--pod-uid", POD, "--signal", "TERM"],
                "container-kill: {pod-uid: 6f1d9c43-8c1e-4a57-9f0a-2f4d5e6a7b8c, signal: TERM}",
                false,
            ),
            (
                "process-pause",
                &["--cgroup", "/chaos/x", "--name", "^nginx"],
                "process-pause: {cgroup: /chaos/x, name: ^nginx}",
                false,
            ),
            (
                "process-kill",
                &["--pid", "4242", "--signal", "TERM", "--every", "10s"],
                "process-kill: {pid: 4242, signal: TERM, every: 10s}",
                false,
            ),
            (
                "memory",
                &[
                    "--bytes",
                    "256MiB",
                    "--workers",
                    "2",
                    "--ramp",
                    "10s",
                    "--oom",
                    "--cgroup",
                    "/chaos/x",
                ],
                "memory: {bytes: 256MiB, workers: 2, ramp: 10s, oom: true, cgroup: /chaos/x}",
                false,
            ),
            (
                "disk-fill",
                &["--path", "/var/lib/data", "--leave", "10MiB", "--pid", "77"],
                "disk-fill: {path: /var/lib/data, leave: 10MiB, pid: 77}",
                false,
            ),
            (
                "clock-skew",
                &[
                    "--offset",
                    "-90s",
                    "--drift-ppm",
                    "-500",
                    "--clocks",
                    "realtime,monotonic",
                    "--pid",
                    "4242",
                ],
                "clock-skew: {offset: -90s, drift-ppm: -500, clocks: [realtime, monotonic], pid: 4242}",
                false,
            ),
        ];
        for (kind, flags, mapping, network) in rows {
            let mut args = vec!["chaosctl", "inject", kind];
            args.extend_from_slice(flags);
            if *network {
                args.extend_from_slice(&net);
            }
            args.extend_from_slice(&["--duration", "2m"]);
            let cli = super::Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{kind}: {e}"));
            let super::Command::Inject { fault } = cli.command else {
                panic!("{kind}: not an inject");
            };
            let (from_cli, _) = fault.spec().unwrap_or_else(|e| panic!("{kind} (cli): {e}"));

            let target = if *network { net_yaml } else { "" };
            let yaml =
                format!("{{name: f, {mapping}, duration: 2m, {target}}}").replace(", }", "}");
            let f: Fault = serde_yaml_ng::from_str(&yaml)
                .unwrap_or_else(|e| panic!("{kind} (file): {e}: {yaml}"));
            assert_eq!(f.kind, *kind);
            let mut from_file = FaultSpec::try_from(f.spec.clone())
                .unwrap_or_else(|e| panic!("{kind} (file spec): {e}"));
            // The runner reverts on time; the agent's own deadline only backs it up.
            from_file.duration -= chaos_experiment::model::AGENT_DEADLINE_SLACK;
            assert_eq!(from_cli, from_file, "{kind}: the CLI and the file disagree");

            let wire = FaultSpec::try_from(super::pb::FaultSpec::from(&from_cli))
                .unwrap_or_else(|e| panic!("{kind} (wire): {e}"));
            assert_eq!(from_cli, wire, "{kind}: the protobuf changes it");
            assert!(
                chaos_spec::KINDS.contains(from_cli.kind.info()) && from_cli.kind.name() == *kind,
                "{kind}: not in the table of kinds"
            );
        }
        // pod-kill lives only on a cluster: the CLI builds the file's action.
        let exp = cluster_inject(&[
            "chaosctl",
            "inject",
            "pod-kill",
            "--namespace",
            "shop",
            "--grace-period",
            "5",
            "--duration",
            "1m",
        ])
        .unwrap();
        let from_cli = chaos_experiment::model::faults(&exp.method)[0].clone();
        let from_file: Fault = serde_yaml_ng::from_str(
            "{name: pod-kill, pod-kill: {grace-period-seconds: 5}, duration: 1m, target: {pods: {namespaces: [shop]}}}",
        )
        .unwrap();
        assert_eq!(from_cli.spec, from_file.spec);
        let tried: Vec<&str> = rows.iter().map(|r| r.0).chain(["pod-kill"]).collect();
        for kind in RawFault::KIND_NAMES {
            assert!(tried.contains(kind), "{kind} has no row in this test");
        }
        // The file's kinds are the table's (doctor, error texts), and pod-kill.
        let mut table: Vec<&str> = chaos_spec::KINDS.iter().map(|k| k.name).collect();
        table.push(chaos_spec::kinds::POD_KILL.name);
        let mut file = RawFault::KIND_NAMES.to_vec();
        table.sort_unstable();
        file.sort_unstable();
        assert_eq!(
            table, file,
            "the table of kinds and the experiment file disagree"
        );
    }

    /// The experiment an inject on a cluster creates, from the flags alone.
    fn cluster_inject(args: &[&str]) -> Result<chaos_experiment::Experiment, String> {
        use clap::Parser;
        let cli = super::Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        let super::Command::Inject { fault } = cli.command else {
            return Err("not an inject".into());
        };
        let (f, run) = fault.model_fault().map_err(|e| e.to_string())?;
        super::inject_experiment(f, run)
    }

    #[test]
    fn an_inject_on_a_cluster_is_a_one_fault_experiment_on_the_selected_pods() {
        use chaos_experiment::driver::PodMode;
        let exp = cluster_inject(&[
            "chaosctl",
            "inject",
            "latency",
            "--ms",
            "500",
            "--namespace",
            "shop",
            "--selector",
            "app=cart",
            "--duration",
            "2m",
        ])
        .unwrap();
        assert!(exp.steady_state_hypothesis.is_none());
        let faults = chaos_experiment::model::faults(&exp.method);
        assert_eq!(faults.len(), 1);
        let f = faults[0];
        assert_eq!(f.kind, "latency");
        assert_eq!(f.duration, Some(std::time::Duration::from_secs(120)));
        let pods = f.selector.pods.as_ref().unwrap();
        assert_eq!(pods.namespaces, ["shop"]);
        assert_eq!(pods.labels.get("app").map(String::as_str), Some("cart"));
        assert_eq!(pods.mode, PodMode::All);
        let target = f.spec.target.as_ref().unwrap();
        assert_eq!(target.interface, "eth0");

        let exp = cluster_inject(&[
            "chaosctl",
            "inject",
            "pod-kill",
            "--namespace",
            "shop",
            "--pods",
            "fixed=2",
            "--grace-period",
            "0",
        ])
        .unwrap();
        let pods = chaos_experiment::model::faults(&exp.method)[0]
            .selector
            .pods
            .clone()
            .unwrap();
        assert_eq!((pods.mode, pods.value), (PodMode::Fixed, Some(2.0)));
    }

    #[test]
    fn a_bad_flag_for_a_cluster_is_one_line_naming_it() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--pods", "fixed=x"],
                "invalid --pods: `x` in `fixed=x` is not a number",
            ),
            (
                &["--pods", "some"],
                "invalid --pods: `some` must be all, one, fixed=N, fixed-percent=P or random-max-percent=P",
            ),
            (
                &["--pods", "fixed"],
                "invalid fault.target.pods.value: mode fixed needs a whole number of pods >= 1",
            ),
            (
                &["--netns", "x"],
                "invalid --namespace: faults each chosen pod's own network namespace; drop --netns, --pid and --pod-uid",
            ),
        ];
        for (extra, want) in cases {
            let mut args = vec![
                "chaosctl",
                "inject",
                "loss",
                "--percent",
                "5",
                "--namespace",
                "shop",
            ];
            args.extend_from_slice(extra);
            assert_eq!(cluster_inject(&args).unwrap_err(), *want, "{extra:?}");
        }
    }
}
