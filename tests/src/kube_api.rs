//! A stand-in for a Kubernetes API server: no real one can run on these machines (no
//! container runtime, no etcd), so tests that drive chaos-controller `--kubernetes` and
//! `chaosctl --namespace` talk to this instead, over real HTTP, through a real kubeconfig.
//!
//! It keeps objects in memory and speaks the parts of the API our clients use, as strictly as
//! the real one:
//! - only the resources a cluster running us has: the built-ins our code calls and the custom
//!   resources deploy/'s CRDs define (scope and `/status` subresource read from the CRD);
//!   anything else, or a namespaced path to a cluster-scoped kind, is 404;
//! - list (label selectors) and watch (from a resourceVersion); a watch from a version older
//!   than the last [`KubeApi::compact`] gets the API server's `ERROR` event with 410 Expired,
//!   and the client has to list again;
//! - create (generateName; status dropped where there is a `/status`), replace and merge or
//!   JSON patches: a resourceVersion that is sent must be the current one (409 otherwise), the
//!   main endpoint cannot change status and `/status` can change nothing else, the server's
//!   own metadata stays, and `generation` counts changes to everything but metadata and status
//!   (and the start of a deletion), as the update strategies of custom resources do;
//! - delete with preconditions and finalizers (deletionTimestamp first, no new finalizers
//!   after it; the object goes when its last finalizer does), and then the garbage collector:
//!   objects whose ownerReferences name a deleted object are deleted in turn (background
//!   propagation).
//!
//! Every request needs a bearer token and is authorized against deploy/'s RBAC (kube_rbac.rs):
//! 401 without one, 403 with the API server's message for a verb the manifests do not grant.
//! Everything it does is the API server's documented behaviour, nothing chaos-specific, so it
//! cannot agree with a bug in our code by construction.
use crate::kube_rbac::{Attributes, Rbac};
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::broadcast;

/// A collection: its API prefix (`/api/v1`, `/apis/GROUP/VERSION`) and plural.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Coll {
    pub prefix: String,
    pub plural: String,
}

impl Coll {
    pub fn new(prefix: &str, plural: &str) -> Coll {
        Coll {
            prefix: prefix.into(),
            plural: plural.into(),
        }
    }
}

#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    coll: Coll,
    namespace: String,
    kind: &'static str,
    object: Value,
}

/// What the API server knows of a collection besides its name.
#[derive(Debug, Clone, Copy)]
struct Kind {
    namespaced: bool,
    /// A `/status` subresource: the main endpoint ignores status, `/status` all the rest.
    status: bool,
    /// `metadata.generation` is kept (custom resources).
    generation: bool,
}

/// The built-in collections our code uses, and the custom resources of deploy/'s CRDs.
fn kinds() -> BTreeMap<Coll, Kind> {
    let mut kinds = BTreeMap::new();
    for (prefix, plural, namespaced, status) in [
        ("/api/v1", "pods", true, true),
        ("/api/v1", "nodes", false, true),
        ("/api/v1", "namespaces", false, true),
        ("/api/v1", "events", true, false),
        ("/apis/coordination.k8s.io/v1", "leases", true, false),
        ("/apis/events.k8s.io/v1", "events", true, false),
    ] {
        let kind = Kind {
            namespaced,
            status,
            generation: false,
        };
        kinds.insert(Coll::new(prefix, plural), kind);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/crds/chaos.yaml");
    let text = std::fs::read_to_string(&path).expect("read deploy/'s CRDs");
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let crd = <Value as serde::Deserialize>::deserialize(doc).expect("a CRD");
        let spec = &crd["spec"];
        let group = spec["group"].as_str().expect("a CRD's group");
        let plural = spec["names"]["plural"].as_str().expect("a CRD's plural");
        for v in spec["versions"].as_array().into_iter().flatten() {
            if v["served"] != json!(true) {
                continue;
            }
            let version = v["name"].as_str().expect("a version's name");
            let kind = Kind {
                namespaced: spec["scope"] == "Namespaced",
                status: v["subresources"]["status"].is_object(),
                generation: true,
            };
            kinds.insert(Coll::new(&format!("/apis/{group}/{version}"), plural), kind);
        }
    }
    kinds
}

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<(Coll, String, String), Value>,
    /// Changes after `compacted`, for watches that start from a resourceVersion.
    log: Vec<Change>,
    compacted: u64,
    /// Watches answered 410 Expired.
    expired: u64,
    requests: Vec<String>,
}

struct Shared {
    kinds: BTreeMap<Coll, Kind>,
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    /// Ends every open watch (as an API server's restart or a watch timeout does).
    end_watches: broadcast::Sender<()>,
    auth: Mutex<Auth>,
}

/// Who a bearer token is, and the RBAC every request is authorized against.
struct Auth {
    users_by_token: BTreeMap<String, String>,
    rbac: Rbac,
}

impl Shared {
    fn kind(&self, coll: &Coll) -> Option<Kind> {
        self.kinds.get(coll).copied()
    }

    /// The store; a panicked holder leaves it usable (a test's panic must not hide others).
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running server; it stops with the test's runtime.
#[derive(Clone)]
pub struct KubeApi {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl KubeApi {
    /// Serves on 127.0.0.1, on a port of the kernel's choosing.
    pub async fn start() -> KubeApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the API server");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            kinds: kinds(),
            store: Mutex::new(Store::default()),
            changes: broadcast::channel(4096).0,
            end_watches: broadcast::channel(4).0,
            auth: Mutex::new(Auth {
                users_by_token: BTreeMap::new(),
                rbac: Rbac::from_deploy(),
            }),
        });
        let s = shared.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let s = s.clone();
                async move { handle(&s, method, uri, headers, body).await }
            },
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        KubeApi { addr, shared }
    }

    /// A kubeconfig naming this server (plain HTTP) with a bearer token for `user`, written
    /// to `path`. Each request is authorized as that user against deploy/'s RBAC.
    pub fn write_kubeconfig_as(&self, path: &Path, user: &str) {
        let token = {
            let mut auth = self.shared.auth.lock().unwrap_or_else(|p| p.into_inner());
            let token = format!("token-{}", auth.users_by_token.len() + 1);
            auth.users_by_token.insert(token.clone(), user.into());
            token
        };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\nusers:\n- name: fake\n  user: {{token: {token}}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake, namespace: default}}\ncurrent-context: fake\n",
            self.addr
        );
        std::fs::write(path, text).expect("write the kubeconfig");
    }

    /// `kubectl create rolebinding -n NAMESPACE --clusterrole=ROLE --user=USER`.
    pub fn bind_cluster_role(&self, user: &str, role: &str, namespace: &str) {
        let mut auth = self.shared.auth.lock().unwrap_or_else(|p| p.into_inner());
        auth.rbac.bind_cluster_role(user, role, namespace);
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.shared.store()
    }

    /// Stores an object as a client's create and, for its status, the component that owns
    /// the status (a kubelet for a pod) would.
    pub fn put(&self, coll: &Coll, namespace: &str, object: Value) {
        let mut st = self.store();
        let kind = Kind {
            status: false,
            ..self.shared.kind(coll).expect("a collection the server has")
        };
        create(&mut st, &self.shared.changes, coll, kind, namespace, object)
            .expect("seed an object");
    }

    /// Compacts the history as etcd does: a watch from any version before now gets 410 Gone.
    /// Every open watch ends, so its client has to start a new one (from the version it saw).
    pub fn compact(&self) {
        let mut st = self.store();
        st.compacted = st.rv;
        st.log.clear();
        let _ = self.shared.end_watches.send(());
    }

    /// How many watches were answered 410 Expired.
    pub fn expired_watches(&self) -> u64 {
        self.store().expired
    }

    pub fn get(&self, coll: &Coll, namespace: &str, name: &str) -> Option<Value> {
        self.store()
            .objects
            .get(&(coll.clone(), namespace.into(), name.into()))
            .cloned()
    }

    pub fn list(&self, coll: &Coll) -> Vec<Value> {
        self.store()
            .objects
            .iter()
            .filter(|((c, _, _), _)| c == coll)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// "METHOD path?query" of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.store().requests.clone()
    }
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "reason": reason, "message": message, "code": code.as_u16(),
    });
    reply(code, &body)
}

fn reply(code: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap_or_default()
}

/// What a path names: a collection (in a namespace, or across all), an object, or its status.
struct Target {
    coll: Coll,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (format!("/api/{v}"), rest),
        ["apis", g, v, rest @ ..] => (format!("/apis/{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        rest => (None, rest),
    };
    let (plural, name, status) = match rest {
        [plural] => (plural, None, false),
        [plural, name] => (plural, Some(name.to_string()), false),
        [plural, name, "status"] => (plural, Some(name.to_string()), true),
        _ => return None,
    };
    Some(Target {
        coll: Coll::new(&prefix, plural),
        namespace,
        name,
        status,
    })
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

/// `a=b,c!=d,e` against an object's labels.
fn selects(selector: &str, object: &Value) -> bool {
    let labels = &object["metadata"]["labels"];
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels[k.trim()].as_str() != Some(v.trim())
        } else if let Some((k, v)) = term.split_once('=') {
            let v = v.trim_start_matches('=');
            labels[k.trim()].as_str() == Some(v.trim())
        } else {
            !labels[term.trim()].is_null()
        }
    })
}

fn now() -> String {
    let t = jiff::Timestamp::now();
    t.round(jiff::Unit::Second).unwrap_or(t).to_string()
}

fn record(
    st: &mut Store,
    tx: &broadcast::Sender<Change>,
    coll: &Coll,
    ns: &str,
    kind: &'static str,
    object: Value,
) {
    let change = Change {
        rv: st.rv,
        coll: coll.clone(),
        namespace: ns.into(),
        kind,
        object,
    };
    st.log.push(change.clone());
    let _ = tx.send(change);
}

type Key = (Coll, String, String);
type Refused = Box<Response>;

fn conflict(coll: &Coll, name: &str, message: &str) -> Refused {
    Box::new(status(
        StatusCode::CONFLICT,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": {message}",
            coll.plural
        ),
    ))
}

fn invalid(message: String) -> Refused {
    Box::new(status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message))
}

/// Sets `object[field]`, or removes it when `value` is null (no `"field": null` left behind).
fn set_field(object: &mut Value, field: &str, value: Value) {
    if let Some(map) = object.as_object_mut() {
        if value.is_null() {
            map.remove(field);
        } else {
            map.insert(field.into(), value);
        }
    }
}

fn finalizers(object: &Value) -> Vec<String> {
    object["metadata"]["finalizers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect()
}

fn create(
    st: &mut Store,
    tx: &broadcast::Sender<Change>,
    coll: &Coll,
    kind: Kind,
    ns: &str,
    mut object: Value,
) -> Result<Value, Refused> {
    let meta = &mut object["metadata"];
    if meta["name"].as_str().unwrap_or_default().is_empty() {
        let Some(prefix) = meta["generateName"].as_str() else {
            return Err(invalid(
                "metadata.name or metadata.generateName is required".into(),
            ));
        };
        meta["name"] = json!(format!("{prefix}{:05x}", st.rv * 7919 % 0xfffff));
    }
    if !meta["resourceVersion"].is_null() {
        return Err(Box::new(status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "resourceVersion should not be set on objects to be created".into(),
        )));
    }
    let name = meta["name"].as_str().unwrap_or_default().to_string();
    let key = (coll.clone(), ns.to_string(), name.clone());
    if st.objects.contains_key(&key) {
        return Err(Box::new(status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", coll.plural),
        )));
    }
    st.rv += 1;
    if !ns.is_empty() {
        meta["namespace"] = json!(ns);
    }
    if meta["uid"].is_null() {
        meta["uid"] = json!(format!(
            "{:08x}-0000-4000-8000-{:012x}",
            std::process::id(),
            st.rv
        ));
    }
    meta["resourceVersion"] = json!(st.rv.to_string());
    meta["creationTimestamp"] = json!(now());
    set_field(meta, "deletionTimestamp", Value::Null);
    set_field(meta, "generation", Value::Null);
    if kind.generation {
        meta["generation"] = json!(1);
    }
    if kind.status {
        set_field(&mut object, "status", Value::Null);
    }
    st.objects.insert(key, object.clone());
    record(st, tx, coll, ns, "ADDED", object.clone());
    Ok(object)
}

/// The metadata only the server writes: a client's values for these are ignored.
const SERVER_METADATA: [&str; 6] = [
    "name",
    "namespace",
    "uid",
    "creationTimestamp",
    "generation",
    "deletionTimestamp",
];

/// What an update may change, as the API server's update strategies for custom resources
/// decide: a resourceVersion sent must be the current one; through `/status` only the status
/// changes; through the main endpoint everything but the server's metadata and (where there is
/// a `/status`) the status; a change outside metadata and status bumps `generation`; an object
/// being deleted takes no new finalizer.
fn admit_update(
    coll: &Coll,
    kind: Kind,
    current: &Value,
    mut next: Value,
    on_status: bool,
) -> Result<Value, Refused> {
    let name = current["metadata"]["name"].as_str().unwrap_or_default();
    let sent = next["metadata"]["resourceVersion"].clone();
    let have = current["metadata"]["resourceVersion"].clone();
    if !sent.is_null() && sent != have {
        return Err(conflict(
            coll,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        ));
    }
    if on_status {
        let mut out = current.clone();
        set_field(&mut out, "status", next["status"].clone());
        return Ok(out);
    }
    for field in SERVER_METADATA {
        let keep = current["metadata"][field].clone();
        set_field(&mut next["metadata"], field, keep);
    }
    set_field(&mut next["metadata"], "resourceVersion", have);
    if kind.status {
        set_field(&mut next, "status", current["status"].clone());
    }
    if !current["metadata"]["deletionTimestamp"].is_null() {
        let old = finalizers(current);
        let added: Vec<String> = finalizers(&next)
            .into_iter()
            .filter(|f| !old.contains(f))
            .collect();
        if !added.is_empty() {
            return Err(invalid(format!(
                "{} \"{name}\" is invalid: metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers {added:?}",
                coll.plural
            )));
        }
    }
    let spec_of = |o: &Value| {
        let mut o = o.clone();
        set_field(&mut o, "metadata", Value::Null);
        set_field(&mut o, "status", Value::Null);
        o
    };
    if kind.generation && spec_of(&next) != spec_of(current) {
        let g = current["metadata"]["generation"].as_u64().unwrap_or(0);
        next["metadata"]["generation"] = json!(g + 1);
    }
    Ok(next)
}

/// Stores a changed object; it goes when it is being deleted and has no finalizer left.
fn update(st: &mut Store, tx: &broadcast::Sender<Change>, key: Key, mut object: Value) -> Value {
    if !object["metadata"]["deletionTimestamp"].is_null() && finalizers(&object).is_empty() {
        return remove(st, tx, key, object);
    }
    st.rv += 1;
    object["metadata"]["resourceVersion"] = json!(st.rv.to_string());
    st.objects.insert(key.clone(), object.clone());
    record(st, tx, &key.0, &key.1, "MODIFIED", object.clone());
    object
}

/// Removes an object, and then, as the garbage collector does with background propagation,
/// deletes every object in its namespace whose ownerReferences name it.
fn remove(st: &mut Store, tx: &broadcast::Sender<Change>, key: Key, mut object: Value) -> Value {
    st.rv += 1;
    object["metadata"]["resourceVersion"] = json!(st.rv.to_string());
    st.objects.remove(&key);
    record(st, tx, &key.0, &key.1, "DELETED", object.clone());
    let uid = object["metadata"]["uid"].clone();
    let dependents: Vec<Key> = st
        .objects
        .iter()
        .filter(|((_, ns, _), o)| {
            *ns == key.1
                && o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
        })
        .map(|(k, _)| k.clone())
        .collect();
    for dependent in dependents {
        delete(st, tx, dependent);
    }
    object
}

/// Deletes an object: at once without finalizers; otherwise it is marked (deletionTimestamp,
/// and generation bumped as the API server does) and goes with its last finalizer.
fn delete(st: &mut Store, tx: &broadcast::Sender<Change>, key: Key) -> (StatusCode, Value) {
    let Some(current) = st.objects.get(&key).cloned() else {
        return (StatusCode::NOT_FOUND, Value::Null);
    };
    if finalizers(&current).is_empty() {
        return (StatusCode::OK, remove(st, tx, key, current));
    }
    if !current["metadata"]["deletionTimestamp"].is_null() {
        return (StatusCode::ACCEPTED, current);
    }
    let mut next = current;
    next["metadata"]["deletionTimestamp"] = json!(now());
    next["metadata"]["deletionGracePeriodSeconds"] = json!(0);
    if let Some(g) = next["metadata"]["generation"].as_u64() {
        next["metadata"]["generation"] = json!(g + 1);
    }
    (StatusCode::ACCEPTED, update(st, tx, key, next))
}

/// A DELETE's options: its preconditions must hold; only background propagation is kept.
fn delete_options(coll: &Coll, current: &Value, options: &Value) -> Result<(), Refused> {
    let name = current["metadata"]["name"].as_str().unwrap_or_default();
    for field in ["uid", "resourceVersion"] {
        let want = &options["preconditions"][field];
        let have = &current["metadata"][field];
        if !want.is_null() && want != have {
            return Err(conflict(
                coll,
                name,
                &format!(
                    "Precondition failed: {field} in precondition: {want}, {field} in object meta: {have}"
                ),
            ));
        }
    }
    match options["propagationPolicy"].as_str() {
        None | Some("Background") => Ok(()),
        Some(other) => Err(Box::new(status(
            StatusCode::NOT_IMPLEMENTED,
            "NotImplemented",
            format!("the stand-in API server does not implement propagationPolicy {other}"),
        ))),
    }
}

fn not_found(what: String) -> Response {
    status(StatusCode::NOT_FOUND, "NotFound", what)
}

async fn handle(
    shared: &Shared,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let q = query(&uri);
    {
        let mut st = shared.store();
        st.requests.push(format!("{method} {uri}"));
    }
    let no_route = || not_found("the server could not find the requested resource".into());
    let Some(t) = parse_path(uri.path()) else {
        return no_route();
    };
    let Some(kind) = shared.kind(&t.coll) else {
        return no_route();
    };
    let scoped_wrong = if kind.namespaced {
        t.namespace.is_none() && t.name.is_some()
    } else {
        t.namespace.is_some()
    };
    if scoped_wrong || (t.status && !kind.status) {
        return no_route();
    }
    let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    if let Err(r) = authorize(shared, &method, &headers, &t, watching) {
        return *r;
    }
    let ns = t.namespace.clone().unwrap_or_default();
    if method == Method::GET && t.name.is_none() && watching {
        return watch(shared, t, q);
    }
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", format!("body: {e}")),
        }
    };
    let tx = &shared.changes;
    let mut st = shared.store();
    match (method, t.name) {
        (Method::GET, None) => {
            let selector = q.get("labelSelector").cloned().unwrap_or_default();
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|((c, n, _), _)| *c == t.coll && (t.namespace.is_none() || *n == ns))
                .map(|(_, v)| v)
                .filter(|v| selects(&selector, v))
                .cloned()
                .collect();
            reply(
                StatusCode::OK,
                &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
            )
        }
        (Method::POST, None) if !t.status => match create(&mut st, tx, &t.coll, kind, &ns, body) {
            Ok(o) => reply(StatusCode::CREATED, &o),
            Err(r) => *r,
        },
        (method, Some(name)) => {
            let key = (t.coll.clone(), ns.clone(), name.clone());
            let Some(current) = st.objects.get(&key).cloned() else {
                return not_found(format!("{} \"{name}\" not found", t.coll.plural));
            };
            let next = match method {
                Method::GET => return reply(StatusCode::OK, &current),
                Method::DELETE if !t.status => {
                    if let Err(r) = delete_options(&t.coll, &current, &body) {
                        return *r;
                    }
                    let (code, o) = delete(&mut st, tx, key);
                    return reply(code, &o);
                }
                Method::PUT => {
                    if kind.generation && body["metadata"]["resourceVersion"].is_null() {
                        return *invalid(format!(
                            "{} \"{name}\" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
                            t.coll.plural
                        ));
                    }
                    body
                }
                Method::PATCH => match patched(&headers, &current, body) {
                    Ok(next) => next,
                    Err(r) => return *r,
                },
                m => {
                    return status(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "MethodNotAllowed",
                        format!("{m}"),
                    );
                }
            };
            match admit_update(&t.coll, kind, &current, next, t.status) {
                Ok(next) => reply(StatusCode::OK, &update(&mut st, tx, key, next)),
                Err(r) => *r,
            }
        }
        (m, None) => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{m} on a collection"),
        ),
    }
}

/// `current` with a JSON patch or a merge patch applied (apply and strategic patches are
/// taken as merge patches: close enough for our clients, which send neither).
fn patched(headers: &HeaderMap, current: &Value, body: Value) -> Result<Value, Refused> {
    let kind = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let mut next = current.clone();
    if !kind.starts_with("application/json-patch+json") {
        json_patch::merge(&mut next, &body);
        return Ok(next);
    }
    // A `test` of an absent field compares it with null, as the API server does.
    let absent_finalizers = next["metadata"]["finalizers"].is_null();
    if absent_finalizers {
        next["metadata"]["finalizers"] = Value::Null;
    }
    let patch: json_patch::Patch = serde_json::from_value(body).map_err(|e| {
        Box::new(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("patch: {e}"),
        ))
    })?;
    json_patch::patch(&mut next, &patch).map_err(|e| invalid(format!("the patch failed: {e}")))?;
    if next["metadata"]["finalizers"].is_null() {
        set_field(&mut next["metadata"], "finalizers", Value::Null);
    }
    Ok(next)
}

/// Authenticates the bearer token and authorizes the request as the API server would.
fn authorize(
    shared: &Shared,
    method: &Method,
    headers: &HeaderMap,
    t: &Target,
    watching: bool,
) -> Result<(), Box<Response>> {
    let auth = shared.auth.lock().unwrap_or_else(|p| p.into_inner());
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(user) = token.and_then(|t| auth.users_by_token.get(t)) else {
        return Err(Box::new(status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized".into(),
        )));
    };
    let verb = match (method, &t.name) {
        (&Method::GET, None) if watching => "watch",
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, None) => "deletecollection",
        (&Method::DELETE, Some(_)) => "delete",
        _ => "unknown",
    };
    let group = t
        .coll
        .prefix
        .strip_prefix("/apis/")
        .and_then(|g| g.split('/').next())
        .unwrap_or_default();
    let resource = if t.status {
        format!("{}/status", t.coll.plural)
    } else {
        t.coll.plural.clone()
    };
    let a = Attributes {
        user: user.clone(),
        verb: verb.into(),
        group: group.into(),
        resource: resource.clone(),
        namespace: t.namespace.clone(),
    };
    if auth.rbac.allows(&a) {
        return Ok(());
    }
    let scope = match &t.namespace {
        Some(ns) => format!(" in the namespace \"{ns}\""),
        None => " at the cluster scope".into(),
    };
    Err(Box::new(status(
        StatusCode::FORBIDDEN,
        "Forbidden",
        format!(
            "{resource} \"{}\" is forbidden: User \"{user}\" cannot {verb} resource \"{resource}\" in API group \"{group}\"{scope}",
            t.name.as_deref().unwrap_or_default()
        ),
    )))
}

/// Every change after `resourceVersion`, then each new one, as newline-delimited JSON.
fn watch(shared: &Shared, t: Target, q: BTreeMap<String, String>) -> Response {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let selector = q.get("labelSelector").cloned().unwrap_or_default();
    // Subscribed before the log is read: nothing falls between the two.
    let mut live = shared.changes.subscribe();
    let mut ended = shared.end_watches.subscribe();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Bytes, std::io::Error>>();
    let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
    let response = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_default();
    let past: Vec<Change> = {
        let mut st = shared.store();
        if from != 0 && from < st.compacted {
            // As the API server's watch cache answers: 200, one ERROR event, the end.
            st.expired += 1;
            let gone = json!({
                "type": "ERROR",
                "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "reason": "Expired", "code": 410,
                    "message": format!("too old resource version: {from} ({})", st.compacted),
                },
            });
            let _ = tx.send(Ok(Bytes::from(format!("{gone}\n"))));
            return response;
        }
        st.log.iter().filter(|c| c.rv > from).cloned().collect()
    };
    let wanted = move |c: &Change| {
        c.coll == t.coll
            && (t.namespace.is_none() || t.namespace.as_deref() == Some(c.namespace.as_str()))
            && selects(&selector, &c.object)
    };
    tokio::spawn(async move {
        let mut last = from;
        let line =
            |c: &Change| Bytes::from(format!("{}\n", json!({"type": c.kind, "object": c.object})));
        for c in past {
            last = c.rv;
            if wanted(&c) && tx.send(Ok(line(&c))).is_err() {
                return;
            }
        }
        loop {
            let c = tokio::select! {
                c = live.recv() => match c {
                    Ok(c) => c,
                    Err(_) => return,
                },
                _ = ended.recv() => return,
            };
            if c.rv <= last {
                continue;
            }
            last = c.rv;
            if wanted(&c) && tx.send(Ok(line(&c))).is_err() {
                return;
            }
        }
    });
    response
}
