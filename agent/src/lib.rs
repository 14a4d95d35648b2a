//! The chaos fault engine, used in-process by `chaosctl --local` and served by the `chaos-agent`
//! daemon. See ARCHITECTURE.md for the map.
pub mod admin;
pub mod caps;
pub mod cgroup;
pub mod clock;
pub mod datapath;
pub mod disk;
pub mod engine;
pub mod fleet_client;
#[doc(hidden)]
pub mod fuzzing;
pub mod guard;
pub mod heartbeat;
pub mod journal;
pub mod memory;
pub mod netlink;
pub mod netns;
pub mod null_backend;
pub mod pod;
pub mod process;
pub mod qdisc;
pub mod registry;
pub mod rules;
pub mod server;
pub mod stress;
pub mod sweep;
pub mod table;
pub mod tc_snapshot;
pub mod tls;
pub mod undo;

pub use chaos_spec as spec;
pub use chaos_spec::{dns, netem_dist};
pub use engine::{Engine, EngineConfig, EngineError, FaultStatus};
pub use spec::{FaultKind, FaultSpec, InvalidInput, Target};
