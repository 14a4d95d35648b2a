//! Pods → nodes → agents: which pods a fault hits, read from the API server, and the refusals
//! that keep a game day from hitting the cluster's own machinery.
use chaos_experiment::driver::{PodMode, PodSelector};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{Api, ListParams};
use std::collections::{BTreeMap, BTreeSet};

/// Namespaces no selector reaches unless `allow-protected` is set (with the controller's own).
pub const PROTECTED: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// One pod a fault goes into, and the node (agent) that can reach it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PodTarget {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub host_network: bool,
    /// Running containers: name → id (without the runtime's `containerd://` prefix).
    pub containers: BTreeMap<String, String>,
}

impl PodTarget {
    fn from_pod(p: &Pod) -> Option<PodTarget> {
        let spec = p.spec.as_ref()?;
        Some(PodTarget {
            namespace: p.metadata.namespace.clone()?,
            name: p.metadata.name.clone()?,
            uid: p.metadata.uid.clone()?,
            node: spec.node_name.clone()?,
            host_network: spec.host_network.unwrap_or(false),
            containers: p
                .status
                .iter()
                .flat_map(|s| s.container_statuses.iter().flatten())
                .filter_map(|c| {
                    let id = c.container_id.as_deref()?;
                    Some((c.name.clone(), id.rsplit("://").next()?.to_string()))
                })
                .collect(),
        })
    }
}

/// `k=v,k2=v2`: a label selector's matchLabels as the API takes them.
fn label_selector(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Every pod of the selector's namespaces with its labels, whatever its phase or node.
pub async fn list_pods(client: &Client, sel: &PodSelector) -> Result<Vec<Pod>, String> {
    let lp = ListParams::default().labels(&label_selector(&sel.labels));
    let mut out = Vec::new();
    for ns in &sel.namespaces {
        let list = Api::<Pod>::namespaced(client.clone(), ns)
            .list(&lp)
            .await
            .map_err(|e| format!("list pods in {ns}: {e}"))?;
        out.extend(list.items);
    }
    Ok(out)
}

/// Lists the running pods `sel` matches and chooses among them (`network`: the fault is a
/// network fault, for which hostNetwork pods are refused). `own_namespace` is protected too.
pub async fn resolve(
    client: &Client,
    sel: &PodSelector,
    network: bool,
    own_namespace: &str,
    seed: u64,
) -> Result<Vec<PodTarget>, String> {
    for ns in &sel.namespaces {
        if !sel.allow_protected && (PROTECTED.contains(&ns.as_str()) || ns == own_namespace) {
            return Err(format!(
                "target.pods.namespaces: `{ns}` is protected (set allow-protected: true to target it)"
            ));
        }
    }
    let nodes: Option<BTreeSet<String>> = if sel.node_labels.is_empty() {
        None
    } else {
        let lp = ListParams::default().labels(&label_selector(&sel.node_labels));
        let list = Api::<Node>::all(client.clone())
            .list(&lp)
            .await
            .map_err(|e| format!("list nodes: {e}"))?;
        Some(
            list.items
                .into_iter()
                .filter_map(|n| n.metadata.name)
                .collect(),
        )
    };
    let mut matched = Vec::new();
    for p in &list_pods(client, sel).await? {
        let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        if !running || p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(t) = PodTarget::from_pod(p) else {
            continue;
        };
        if nodes.as_ref().is_some_and(|n| !n.contains(&t.node)) {
            continue;
        }
        matched.push(t);
    }
    choose(matched, sel, network, seed)
}

/// The pods the mode picks among the matching running ones; refuses in one line.
pub fn choose(
    mut matched: Vec<PodTarget>,
    sel: &PodSelector,
    network: bool,
    seed: u64,
) -> Result<Vec<PodTarget>, String> {
    if matched.is_empty() {
        return Err(format!(
            "target.pods: no running pod in {} matches {}",
            sel.namespaces.join(", "),
            describe(sel)
        ));
    }
    if network
        && !sel.allow_host_network
        && let Some(p) = matched.iter().find(|p| p.host_network)
    {
        return Err(format!(
            "target.pods: {}/{} uses hostNetwork: a network fault on it hits node {} (set allow-host-network: true to allow it)",
            p.namespace, p.name, p.node
        ));
    }
    matched.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let n = matched.len();
    let value = sel.value.unwrap_or(0.0);
    let percent = |p: f64| ((n as f64 * p / 100.0).floor() as usize).max(1);
    let mut rng = XorShift(seed | 1);
    let count = match sel.mode {
        PodMode::All => n,
        PodMode::One => 1,
        PodMode::Fixed => {
            let want = value as usize;
            if want > n {
                return Err(format!(
                    "target.pods.value: mode fixed wants {want} pods, only {n} match"
                ));
            }
            want
        }
        PodMode::FixedPercent => percent(value),
        PodMode::RandomMaxPercent => 1 + (rng.next() as usize) % percent(value),
    };
    // Fisher-Yates, then the first `count`, listed in name order.
    for i in (1..n).rev() {
        let j = (rng.next() as usize) % (i + 1);
        matched.swap(i, j);
    }
    matched.truncate(count);
    matched.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(matched)
}

fn describe(sel: &PodSelector) -> String {
    let mut s = if sel.labels.is_empty() {
        "any labels".to_string()
    } else {
        label_selector(&sel.labels)
    };
    if !sel.node_labels.is_empty() {
        s.push_str(&format!(" on nodes {}", label_selector(&sel.node_labels)));
    }
    s
}

/// Enough randomness to pick pods; seeded, so a test can name its outcome.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// The dry run: for each fault action, what it would hit now, one line per pod (or per agent
/// selector), in method order. Modes that choose at random show one possible choice.
pub async fn plan(
    client: Option<&Client>,
    exp: &chaos_experiment::Experiment,
    own_namespace: &str,
) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for f in chaos_experiment::model::faults(&exp.method) {
        let place = match &f.spec.target {
            Some(t) => format!("interface {}", t.interface),
            None => "its cgroup".to_string(),
        };
        let Some(sel) = &f.selector.pods else {
            let who = if f.selector.agents.is_empty() && f.selector.labels.is_empty() {
                "every agent".to_string()
            } else {
                format!(
                    "agents [{}] labels [{}]",
                    f.selector.agents.join(","),
                    label_selector(&f.selector.labels)
                )
            };
            out.push(format!("{} ({}): {who}, {place}", f.name, f.kind));
            continue;
        };
        let client = client.ok_or_else(|| format!("{}: a pod target needs a cluster", f.name))?;
        let pods = resolve(
            client,
            sel,
            f.spec.target.is_some(),
            own_namespace,
            random_seed(),
        )
        .await
        .map_err(|e| format!("{}: {e}", f.name))?;
        for p in pods {
            out.push(format!(
                "{} ({}): pod {}/{} (uid {}) on node {}, {place}",
                f.name, f.kind, p.namespace, p.name, p.uid, p.node
            ));
        }
    }
    Ok(out)
}

/// A seed for production choices.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::fake::FakeApi;
    use serde_json::json;

    fn sel(mode: PodMode, value: Option<f64>) -> PodSelector {
        PodSelector {
            namespaces: vec!["shop".into()],
            labels: [("app".to_string(), "cart".to_string())].into(),
            node_labels: BTreeMap::new(),
            mode,
            value,
            allow_protected: false,
            allow_host_network: false,
        }
    }

    fn pods(n: usize) -> Vec<PodTarget> {
        (0..n)
            .map(|i| PodTarget {
                namespace: "shop".into(),
                name: format!("cart-{i}"),
                uid: format!("00000000-0000-0000-0000-{i:012}"),
                node: format!("node-{}", i % 3),
                host_network: false,
                containers: BTreeMap::new(),
            })
            .collect()
    }

    #[test]
    fn modes_pick_the_right_number_of_distinct_pods() {
        let count = |mode, value, n| {
            let got = choose(pods(n), &sel(mode, value), true, 7).unwrap();
            let names: BTreeSet<_> = got.iter().map(|p| p.name.clone()).collect();
            assert_eq!(names.len(), got.len(), "a pod was chosen twice");
            got.len()
        };
        assert_eq!(count(PodMode::All, None, 10), 10);
        assert_eq!(count(PodMode::One, None, 10), 1);
        assert_eq!(count(PodMode::Fixed, Some(3.0), 10), 3);
        assert_eq!(count(PodMode::FixedPercent, Some(25.0), 10), 2);
        assert_eq!(
            count(PodMode::FixedPercent, Some(1.0), 10),
            1,
            "at least one"
        );
        for seed in 0..200 {
            let n = choose(
                pods(10),
                &sel(PodMode::RandomMaxPercent, Some(50.0)),
                true,
                seed,
            )
            .unwrap()
            .len();
            assert!(
                (1..=5).contains(&n),
                "random-max-percent 50 of 10 chose {n}"
            );
        }
    }

    #[test]
    fn one_is_spread_over_the_pods() {
        let mut seen = BTreeSet::new();
        for seed in 0..200 {
            seen.insert(
                choose(pods(5), &sel(PodMode::One, None), true, seed).unwrap()[0]
                    .name
                    .clone(),
            );
        }
        assert_eq!(seen.len(), 5, "mode one never chose some pods: {seen:?}");
    }

    #[test]
    fn refusals_are_one_line_naming_the_field() {
        let e = choose(pods(2), &sel(PodMode::Fixed, Some(3.0)), true, 1).unwrap_err();
        assert_eq!(
            e,
            "target.pods.value: mode fixed wants 3 pods, only 2 match"
        );
        let e = choose(vec![], &sel(PodMode::All, None), true, 1).unwrap_err();
        assert_eq!(e, "target.pods: no running pod in shop matches app=cart");
        let mut host = pods(3);
        host[1].host_network = true;
        let e = choose(host.clone(), &sel(PodMode::All, None), true, 1).unwrap_err();
        assert!(
            e.starts_with("target.pods: shop/cart-1 uses hostNetwork"),
            "{e}"
        );
        // CPU stress in a hostNetwork pod's cgroup touches only that pod.
        assert_eq!(
            choose(host.clone(), &sel(PodMode::All, None), false, 1)
                .unwrap()
                .len(),
            3
        );
        let mut allowed = sel(PodMode::All, None);
        allowed.allow_host_network = true;
        assert_eq!(choose(host, &allowed, true, 1).unwrap().len(), 3);
    }

    fn pod(name: &str, node: &str, phase: &str, host: bool) -> serde_json::Value {
        json!({
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}")},
            "spec": {"nodeName": node, "hostNetwork": host, "containers": [{"name": "c"}]},
            "status": {"phase": phase}
        })
    }

    /// The API calls: pods listed with the label selector in each namespace, nodes with the
    /// node selector; pending pods and pods on other nodes are left out.
    #[tokio::test]
    async fn resolve_lists_pods_and_nodes_through_the_api() {
        let api = FakeApi::start(|method, uri| {
            assert_eq!(method, "GET");
            if uri.starts_with("/api/v1/nodes?") {
                assert!(
                    uri.contains("labelSelector=kubernetes.io%2Farch%3Darm64"),
                    "{uri}"
                );
                return (
                    200,
                    json!({"kind": "NodeList", "apiVersion": "v1", "metadata": {},
                    "items": [{"metadata": {"name": "pi-1"}}, {"metadata": {"name": "pi-2"}}]}),
                );
            }
            assert!(uri.starts_with("/api/v1/namespaces/shop/pods?"), "{uri}");
            assert!(uri.contains("labelSelector=app%3Dcart"), "{uri}");
            (
                200,
                json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [
                    pod("cart-a", "pi-1", "Running", false),
                    pod("cart-b", "pi-2", "Running", false),
                    pod("cart-c", "pi-2", "Pending", false),
                    pod("cart-d", "x86-1", "Running", false),
                ]}),
            )
        });
        let mut s = sel(PodMode::All, None);
        s.node_labels = [("kubernetes.io/arch".to_string(), "arm64".to_string())].into();
        let got = resolve(&api.client, &s, true, "chaos-system", 1)
            .await
            .unwrap();
        let names: Vec<_> = got
            .iter()
            .map(|p| (p.name.as_str(), p.node.as_str()))
            .collect();
        assert_eq!(names, vec![("cart-a", "pi-1"), ("cart-b", "pi-2")]);
        assert_eq!(got[0].uid, "uid-cart-a");
        assert_eq!(api.requests().len(), 2);

        // Protected namespaces are refused before the API is asked anything.
        for ns in ["kube-system", "chaos-system"] {
            let mut p = sel(PodMode::All, None);
            p.namespaces = vec![ns.into()];
            let e = resolve(&api.client, &p, true, "chaos-system", 1)
                .await
                .unwrap_err();
            assert!(e.contains(&format!("`{ns}` is protected")), "{e}");
        }
        assert_eq!(api.requests().len(), 2);
    }

    /// The dry run names each pod, its node and the interface, and asks the API only to read.
    #[tokio::test]
    async fn plan_lists_pods_nodes_and_interfaces() {
        let api = FakeApi::start(|method, uri| {
            assert_eq!(method, "GET", "a dry run only reads");
            assert!(uri.starts_with("/api/v1/namespaces/shop/pods?"), "{uri}");
            (
                200,
                json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [
                    pod("cart-a", "pi-1", "Running", false),
                    pod("cart-b", "pi-2", "Running", false),
                ]}),
            )
        });
        let exp = chaos_experiment::Experiment::parse(
            r#"title: t
steady-state-hypothesis: {title: h, probes: [{name: p, command: {run: [/bin/true]}}]}
method:
  - fault: {name: lossy, loss: {percent: 5}, target: {pods: {namespaces: [shop], labels: {app: cart}}, interface: eth0}}
  - fault: {name: slow, latency: {ms: 50}, target: {labels: {zone: a}, interface: eth1}}
"#,
            "t.yaml",
        )
        .unwrap();
        let lines = plan(Some(&api.client), &exp, "chaos-system").await.unwrap();
        assert_eq!(
            lines,
            [
                "lossy (loss): pod shop/cart-a (uid uid-cart-a) on node pi-1, interface eth0",
                "lossy (loss): pod shop/cart-b (uid uid-cart-b) on node pi-2, interface eth0",
                "slow (latency): agents [] labels [zone=a], interface eth1",
            ]
        );
    }
}
