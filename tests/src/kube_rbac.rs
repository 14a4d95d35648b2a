//! Kubernetes RBAC as the API server evaluates it, for the stand-in API server: the roles and
//! bindings are the ones deploy/ ships, so a verb our code uses and the manifests do not grant
//! fails a test here as it would be 403 on every real cluster.
//!
//! What it evaluates: ClusterRoles and Roles (apiGroups, resources with `/subresource`, verbs,
//! `*` in each), ClusterRoleBindings (every namespace, and cluster-scoped objects) and
//! RoleBindings (their namespace only), with User and ServiceAccount subjects.
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    #[serde(default)]
    api_groups: Vec<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    verbs: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Meta {
    name: String,
    namespace: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct RoleRef {
    kind: String,
    name: String,
}

#[derive(Debug, Deserialize)]
struct Subject {
    kind: String,
    name: String,
    namespace: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Object {
    kind: String,
    metadata: Meta,
    #[serde(default)]
    rules: Vec<Rule>,
    role_ref: Option<RoleRef>,
    #[serde(default)]
    subjects: Vec<Subject>,
}

#[derive(Debug, Clone)]
struct Binding {
    /// None: a ClusterRoleBinding.
    namespace: Option<String>,
    role: RoleRef,
    users: Vec<String>,
}

/// One request as the authorizer sees it.
#[derive(Debug, Clone)]
pub struct Attributes {
    pub user: String,
    pub verb: String,
    pub group: String,
    /// `pods`, or `chaosexperiments/status` for a subresource.
    pub resource: String,
    pub namespace: Option<String>,
}

#[derive(Debug, Default, Clone)]
pub struct Rbac {
    cluster_roles: BTreeMap<String, Vec<Rule>>,
    roles: BTreeMap<(String, String), Vec<Rule>>,
    bindings: Vec<Binding>,
}

/// The service account chaos-controller runs as in deploy/.
pub const CONTROLLER: &str = "system:serviceaccount:chaos-system:chaos-controller";

/// kubeadm's admin user, in the group `system:masters`, which the API server lets through
/// before RBAC is asked (a cluster's break-glass identity; tests use it to set the scene).
pub const ADMIN: &str = "kubernetes-admin";

impl Rbac {
    /// The RBAC objects of deploy/base, as kustomize renders them into `chaos-system`.
    pub fn from_deploy() -> Rbac {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base");
        let mut rbac = Rbac::default();
        for file in ["controller-rbac.yaml", "user-rbac.yaml"] {
            let text = std::fs::read_to_string(base.join(file)).expect("read deploy RBAC");
            for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                let o = Object::deserialize(doc).expect("an RBAC object");
                rbac.add(o, "chaos-system");
            }
        }
        rbac
    }

    fn add(&mut self, o: Object, default_ns: &str) {
        let ns = o.metadata.namespace.unwrap_or_else(|| default_ns.into());
        let users = |subjects: &[Subject]| {
            subjects
                .iter()
                .map(|s| match s.kind.as_str() {
                    "ServiceAccount" => format!(
                        "system:serviceaccount:{}:{}",
                        s.namespace.as_deref().unwrap_or(&ns),
                        s.name
                    ),
                    _ => s.name.clone(),
                })
                .collect()
        };
        match o.kind.as_str() {
            "ClusterRole" => {
                self.cluster_roles.insert(o.metadata.name, o.rules);
            }
            "Role" => {
                self.roles.insert((ns.clone(), o.metadata.name), o.rules);
            }
            "ClusterRoleBinding" | "RoleBinding" => self.bindings.push(Binding {
                namespace: (o.kind == "RoleBinding").then(|| ns.clone()),
                role: o.role_ref.expect("a binding's roleRef"),
                users: users(&o.subjects),
            }),
            other => panic!("not an RBAC kind: {other}"),
        }
    }

    /// `kubectl create rolebinding -n NS --clusterrole=ROLE --user=USER`.
    pub fn bind_cluster_role(&mut self, user: &str, role: &str, namespace: &str) {
        self.bindings.push(Binding {
            namespace: Some(namespace.into()),
            role: RoleRef {
                kind: "ClusterRole".into(),
                name: role.into(),
            },
            users: vec![user.into()],
        });
    }

    pub fn allows(&self, a: &Attributes) -> bool {
        if a.user == ADMIN {
            return true;
        }
        self.bindings
            .iter()
            .filter(|b| b.users.contains(&a.user))
            .filter(|b| b.namespace.is_none() || b.namespace == a.namespace)
            .filter_map(|b| match b.role.kind.as_str() {
                "ClusterRole" => self.cluster_roles.get(&b.role.name),
                _ => self.roles.get(&(b.namespace.clone()?, b.role.name.clone())),
            })
            .flatten()
            .any(|r| {
                let has = |list: &[String], x: &str| list.iter().any(|v| v == "*" || v == x);
                has(&r.api_groups, &a.group)
                    && has(&r.resources, &a.resource)
                    && has(&r.verbs, &a.verb)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(user: &str, verb: &str, group: &str, resource: &str, ns: Option<&str>) -> Attributes {
        Attributes {
            user: user.into(),
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: ns.map(Into::into),
        }
    }

    #[test]
    fn the_deploy_roles_grant_what_they_say_and_nothing_else() {
        let mut rbac = Rbac::from_deploy();
        let c = CONTROLLER;
        assert!(rbac.allows(&req(c, "watch", "chaos.dev", "chaosexperiments", None)));
        assert!(rbac.allows(&req(
            c,
            "patch",
            "chaos.dev",
            "chaosexperiments/status",
            Some("x")
        )));
        assert!(!rbac.allows(&req(c, "get", "", "secrets", Some("x"))));
        // Every call the controller's code makes (controller/src/k8s): a pod-kill deletes pods.
        for (verb, group, resource, ns) in [
            ("list", "chaos.dev", "chaosexperiments", None),
            ("patch", "chaos.dev", "chaosexperiments", Some("shop")),
            ("create", "chaos.dev", "chaosexperiments", Some("shop")),
            ("delete", "chaos.dev", "chaosexperiments", Some("shop")),
            ("watch", "chaos.dev", "chaosschedules", None),
            ("patch", "chaos.dev", "chaosschedules/status", Some("shop")),
            ("list", "", "pods", Some("shop")),
            ("delete", "", "pods", Some("shop")),
            ("list", "", "nodes", None),
            ("create", "events.k8s.io", "events", Some("shop")),
            (
                "create",
                "coordination.k8s.io",
                "leases",
                Some("chaos-system"),
            ),
        ] {
            assert!(
                rbac.allows(&req(c, verb, group, resource, ns)),
                "the controller may not {verb} {resource} in {group:?}"
            );
        }
        // The leader Role is bound in chaos-system only.
        let lease = |ns| req(c, "update", "coordination.k8s.io", "leases", Some(ns));
        assert!(rbac.allows(&lease("chaos-system")));
        assert!(!rbac.allows(&lease("shop")));
        let alice = |ns| req("alice", "create", "chaos.dev", "chaosexperiments", Some(ns));
        assert!(!rbac.allows(&alice("shop")));
        rbac.bind_cluster_role("alice", "chaos-experimenter", "shop");
        assert!(rbac.allows(&alice("shop")));
        assert!(!rbac.allows(&alice("prod")));
        assert!(!rbac.allows(&req(
            "alice",
            "patch",
            "chaos.dev",
            "chaosexperiments/status",
            Some("shop")
        )));
    }
}
