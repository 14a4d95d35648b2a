//! chaosctl, the command line: inject faults locally (`--local`, the engine in-process) or
//! through a chaos-agent or the controller, run experiments, manage certificates and the fleet.
//! A library beneath a thin `main` so the fuzz targets and tests reach the parser
//! ([`cli::fuzzing`]) without a process.
mod agent_client;
mod certs_cmd;
pub mod cli;
mod cluster_cmd;
pub mod controller_client;
mod fleet_cmd;
mod local_engine;
pub mod output;
mod run_cmd;

/// Exit code for bad input: the command was refused and nothing was applied.
pub const EXIT_INVALID: u8 = 2;

/// A new run id (time-ordered).
pub fn run_id() -> String {
    chaos_controller::experiments::new_run_id()
}
