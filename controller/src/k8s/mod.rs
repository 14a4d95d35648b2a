//! Kubernetes mode: the API server stores experiments, the controller reconciles them.
//!
//! No API server can run on these machines (no container runtime, no kubelet), so the logic
//! here is tested against a mocked API (tower-test) with the request and response bodies a real
//! server sends; the manifests are validated by `scripts/k8s-check.sh`.
pub mod crd;
pub mod driver;
pub mod lease;
pub mod reconcile;
pub mod schedule;
pub mod targets;

#[cfg(test)]
pub mod fake;
