//! The controller: the fleet of agents (gRPC, leases, audit), experiments run on it, and what
//! chaosctl shares with it.
pub mod audit;
pub mod certs;
pub mod experiments;
pub mod fleet;
pub mod k8s;
pub mod limits;
pub mod local_driver;
pub mod server;
pub mod tls_front;
