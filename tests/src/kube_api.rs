//! A stand-in for a Kubernetes API server: no real one can run on these machines (no
//! container runtime, no etcd), so tests that drive chaos-controller `--kubernetes` and
//! `chaosctl --namespace` talk to this instead, over real HTTP, through a real kubeconfig.
//!
//! It keeps objects in memory and speaks the parts of the API our clients use: list (with
//! label selectors) and watch (from a resourceVersion), get, create (with generateName), replace
//! (with the resourceVersion conflict check leases rely on), merge and JSON patches (main
//! resource and /status), and delete with finalizers (deletionTimestamp first; the object goes
//! when its last finalizer does). Every request needs a bearer token and is authorized against
//! deploy/'s RBAC (kube_rbac.rs): 401 without one, 403 with the API server's message for a verb
//! the manifests do not grant. Everything it does is the API server's documented behaviour,
//! nothing chaos-specific, so it cannot agree with a bug in our code by construction.
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

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<(Coll, String, String), Value>,
    log: Vec<Change>,
    requests: Vec<String>,
}

struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    auth: Mutex<Auth>,
}

/// Who a bearer token is, and the RBAC every request is authorized against.
struct Auth {
    users_by_token: BTreeMap<String, String>,
    rbac: Rbac,
}

impl Shared {
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
            store: Mutex::new(Store::default()),
            changes: broadcast::channel(4096).0,
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

    /// Stores an object as a client's create would.
    pub fn put(&self, coll: &Coll, namespace: &str, object: Value) {
        let mut st = self.store();
        create(&mut st, &self.shared.changes, coll, namespace, object).expect("seed an object");
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

fn create(
    st: &mut Store,
    tx: &broadcast::Sender<Change>,
    coll: &Coll,
    ns: &str,
    mut object: Value,
) -> Result<Value, Box<Response>> {
    let meta = &mut object["metadata"];
    if meta["name"].as_str().unwrap_or_default().is_empty() {
        let Some(prefix) = meta["generateName"].as_str() else {
            return Err(Box::new(status(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.name or metadata.generateName is required".into(),
            )));
        };
        meta["name"] = json!(format!("{prefix}{:05x}", st.rv * 7919 % 0xfffff));
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
    meta["generation"] = json!(1);
    st.objects.insert(key, object.clone());
    record(st, tx, coll, ns, "ADDED", object.clone());
    Ok(object)
}

/// Stores a changed object; it goes when it is being deleted and has no finalizer left.
fn update(
    st: &mut Store,
    tx: &broadcast::Sender<Change>,
    key: (Coll, String, String),
    mut object: Value,
) -> Value {
    st.rv += 1;
    object["metadata"]["resourceVersion"] = json!(st.rv.to_string());
    let finalizers = object["metadata"]["finalizers"]
        .as_array()
        .map_or(0, Vec::len);
    if !object["metadata"]["deletionTimestamp"].is_null() && finalizers == 0 {
        st.objects.remove(&key);
        record(st, tx, &key.0, &key.1, "DELETED", object.clone());
    } else {
        st.objects.insert(key.clone(), object.clone());
        record(st, tx, &key.0, &key.1, "MODIFIED", object.clone());
    }
    object
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
    let Some(t) = parse_path(uri.path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no route {}", uri.path()),
        );
    };
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
        (Method::POST, None) => match create(&mut st, tx, &t.coll, &ns, body) {
            Ok(o) => reply(StatusCode::CREATED, &o),
            Err(r) => *r,
        },
        (method, Some(name)) => {
            let key = (t.coll.clone(), ns.clone(), name.clone());
            let Some(current) = st.objects.get(&key).cloned() else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{} \"{name}\" not found", t.coll.plural),
                );
            };
            match method {
                Method::GET => reply(StatusCode::OK, &current),
                Method::PUT => {
                    let want = body["metadata"]["resourceVersion"].as_str();
                    let have = current["metadata"]["resourceVersion"].as_str();
                    if want.is_some() && want != have {
                        return status(
                            StatusCode::CONFLICT,
                            "Conflict",
                            format!(
                                "the object has been modified (resourceVersion {have:?}, not {want:?})"
                            ),
                        );
                    }
                    let mut next = body;
                    for keep in [
                        "uid",
                        "creationTimestamp",
                        "namespace",
                        "generation",
                        "deletionTimestamp",
                    ] {
                        next["metadata"][keep] = current["metadata"][keep].clone();
                    }
                    let o = update(&mut st, tx, key, next);
                    reply(StatusCode::OK, &o)
                }
                Method::PATCH => {
                    let kind = headers
                        .get(header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    let mut next = current.clone();
                    if kind.starts_with("application/json-patch+json") {
                        // A `test` of an absent field compares it with null, as the API server does.
                        let absent_finalizers = next["metadata"]["finalizers"].is_null();
                        if absent_finalizers {
                            next["metadata"]["finalizers"] = Value::Null;
                        }
                        let patch: json_patch::Patch = match serde_json::from_value(body) {
                            Ok(p) => p,
                            Err(e) => {
                                return status(
                                    StatusCode::BAD_REQUEST,
                                    "BadRequest",
                                    format!("patch: {e}"),
                                );
                            }
                        };
                        if let Err(e) = json_patch::patch(&mut next, &patch) {
                            return status(
                                StatusCode::UNPROCESSABLE_ENTITY,
                                "Invalid",
                                format!("the patch failed: {e}"),
                            );
                        }
                        if next["metadata"]["finalizers"].is_null()
                            && let Some(m) = next["metadata"].as_object_mut()
                        {
                            m.remove("finalizers");
                        }
                    } else {
                        // Merge patch (and, close enough for our clients, apply and strategic).
                        json_patch::merge(&mut next, &body);
                    }
                    let o = update(&mut st, tx, key, next);
                    reply(StatusCode::OK, &o)
                }
                Method::DELETE => {
                    let finalizers = current["metadata"]["finalizers"]
                        .as_array()
                        .map_or(0, Vec::len);
                    if finalizers == 0 {
                        st.rv += 1;
                        st.objects.remove(&key);
                        record(&mut st, tx, &key.0, &key.1, "DELETED", current.clone());
                        return reply(StatusCode::OK, &current);
                    }
                    if !current["metadata"]["deletionTimestamp"].is_null() {
                        return reply(StatusCode::ACCEPTED, &current);
                    }
                    let mut next = current;
                    next["metadata"]["deletionTimestamp"] = json!(now());
                    let o = update(&mut st, tx, key, next);
                    reply(StatusCode::ACCEPTED, &o)
                }
                m => status(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    format!("{m}"),
                ),
            }
        }
        (m, None) => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{m} on a collection"),
        ),
    }
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
    let past: Vec<Change> = shared
        .store()
        .log
        .iter()
        .filter(|c| c.rv > from)
        .cloned()
        .collect();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Bytes, std::io::Error>>();
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
        while let Ok(c) = live.recv().await {
            if c.rv <= last {
                continue;
            }
            last = c.rv;
            if wanted(&c) && tx.send(Ok(line(&c))).is_err() {
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}
