//! Leader election through a coordination.k8s.io Lease, so several controller replicas can run
//! and exactly one reconciles: the holder renews every third of the lease; another replica
//! takes over only once a whole lease passes without renewal. Writes carry the resourceVersion
//! they read, so two replicas racing for an expired lease cannot both win (the API server
//! refuses the second with 409).
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use std::time::Duration;

pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    /// Who we are (the pod name): what `kubectl get lease` shows as the holder.
    pub identity: String,
    pub ttl: Duration,
}

impl LeaseLock {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, ttl: Duration) -> Self {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            ttl,
        }
    }

    /// One attempt to take or keep the lease; `Ok(true)` while we hold it.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let ttl_s = self.ttl.as_secs().max(1) as i32;
        let Some(current) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(ttl_s),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = current.spec.clone().unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let held_for =
            SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(ttl_s) as i64);
        let expired = match &spec.renew_time {
            Some(MicroTime(t)) => t.checked_add(held_for).map(|end| end < now).unwrap_or(true),
            None => true,
        };
        if !mine && !expired {
            return Ok(false);
        }
        let mut next = current.clone();
        next.spec = Some(LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(ttl_s),
            acquire_time: if mine {
                spec.acquire_time.clone()
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!mine)),
            ..spec
        });
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until we lead, retrying every third of the lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::warn!(lease = %self.name, "leader election: {e}"),
            }
            tokio::time::sleep(self.ttl / 3).await;
        }
    }

    /// Renews until a renewal is refused or none succeeds for a whole lease; then returns, and
    /// the leader must stop (another replica may take over from then on).
    pub async fn hold(&self) -> String {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.ttl / 3).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => return format!("lease {} was taken by another replica", self.name),
                Err(e) if last_ok.elapsed() >= self.ttl => {
                    return format!("lease {} not renewed for {:?}: {e}", self.name, self.ttl);
                }
                Err(e) => tracing::warn!(lease = %self.name, "renew: {e}"),
            }
        }
    }
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::fake::FakeApi;
    use serde_json::{Value, json};
    use std::sync::{Arc, Mutex};

    const PATH: &str =
        "/apis/coordination.k8s.io/v1/namespaces/chaos-system/leases/chaos-controller";

    /// A one-object API server for the Lease, with resourceVersion checks like the real one.
    fn server(initial: Option<Value>) -> (FakeApi, Arc<Mutex<Option<Value>>>) {
        let store = Arc::new(Mutex::new(initial));
        let s = store.clone();
        let api = FakeApi::start_with_body(move |method, uri, body| {
            let mut cur = s.lock().unwrap();
            let not_found = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "NotFound", "code": 404, "message": "not found", "metadata": {}});
            let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "Conflict", "code": 409, "message": "conflict", "metadata": {}});
            match method {
                "GET" => {
                    assert!(uri.starts_with(PATH), "{uri}");
                    match cur.as_ref() {
                        Some(v) => (200, v.clone()),
                        None => (404, not_found),
                    }
                }
                "POST" => {
                    if cur.is_some() {
                        return (409, conflict);
                    }
                    let mut v: Value = serde_json::from_str(body).unwrap();
                    v["metadata"]["resourceVersion"] = json!("1");
                    *cur = Some(v.clone());
                    (201, v)
                }
                "PUT" => {
                    let mut v: Value = serde_json::from_str(body).unwrap();
                    let have = cur.as_ref().unwrap()["metadata"]["resourceVersion"].clone();
                    if v["metadata"]["resourceVersion"] != have {
                        return (409, conflict);
                    }
                    let n: u64 = have.as_str().unwrap().parse::<u64>().unwrap() + 1;
                    v["metadata"]["resourceVersion"] = json!(n.to_string());
                    *cur = Some(v.clone());
                    (200, v)
                }
                m => panic!("unexpected {m} {uri}"),
            }
        });
        (api, store)
    }

    fn lock(api: &FakeApi, who: &str) -> LeaseLock {
        LeaseLock::new(
            api.client.clone(),
            "chaos-system",
            "chaos-controller",
            who,
            Duration::from_secs(15),
        )
    }

    fn held(holder: &str, renewed_secs_ago: i64) -> Value {
        let t = Timestamp::now() - SignedDuration::from_secs(renewed_secs_ago);
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "chaos-controller", "namespace": "chaos-system", "resourceVersion": "5"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                "renewTime": MicroTime(t), "acquireTime": MicroTime(t), "leaseTransitions": 2}})
    }

    #[tokio::test]
    async fn the_first_replica_creates_the_lease_and_keeps_it() {
        let (api, store) = server(None);
        let a = lock(&api, "ctl-a");
        assert!(a.try_acquire_or_renew().await.unwrap());
        assert!(
            !lock(&api, "ctl-b").try_acquire_or_renew().await.unwrap(),
            "b took a fresh lease"
        );
        assert!(a.try_acquire_or_renew().await.unwrap(), "a could not renew");
        let v = store.lock().unwrap().clone().unwrap();
        assert_eq!(v["spec"]["holderIdentity"], "ctl-a");
        assert_eq!(v["spec"]["leaseTransitions"], 0);
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_and_counted() {
        let (api, store) = server(Some(held("ctl-old", 16)));
        assert!(lock(&api, "ctl-b").try_acquire_or_renew().await.unwrap());
        let v = store.lock().unwrap().clone().unwrap();
        assert_eq!(v["spec"]["holderIdentity"], "ctl-b");
        assert_eq!(v["spec"]["leaseTransitions"], 3);
        // The old leader's next renewal is refused: it must stop.
        assert!(!lock(&api, "ctl-old").try_acquire_or_renew().await.unwrap());
    }

    #[tokio::test]
    async fn a_live_lease_is_left_alone() {
        let (api, store) = server(Some(held("ctl-a", 5)));
        assert!(!lock(&api, "ctl-b").try_acquire_or_renew().await.unwrap());
        assert_eq!(
            store.lock().unwrap().clone().unwrap()["spec"]["holderIdentity"],
            "ctl-a"
        );
        assert!(
            api.requests().iter().all(|(m, _, _)| m == "GET"),
            "wrote to a live lease"
        );
    }
}
