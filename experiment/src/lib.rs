//! Experiments: a steady-state hypothesis checked before, during and after a method of faults.
//!
//! This crate knows nothing about where faults run: the runner drives them through a
//! [`driver::FaultDriver`] (the in-process engine for `chaosctl run --local`, the fleet when the
//! controller runs it). What it produces is a [`record::RunRecord`], the single input of every
//! report format and of the controller's history.
pub mod ctk;
pub mod driver;
#[doc(hidden)]
pub mod fuzzing;
pub mod history;
pub mod http_client;
pub mod load;
pub mod model;
pub mod probe;
pub mod record;
pub mod report;
pub mod runner;
pub mod tolerance;

pub use load::LoadError;
pub use model::Experiment;
