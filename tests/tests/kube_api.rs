//! The stand-in API server (chaos_tests::kube_api) refuses and rewrites what a real API server
//! refuses and rewrites, so a test that passes against it cannot rely on leniency: spoken to
//! with kube's client, as chaos-controller speaks to it. No root, no kernel.
use chaos_tests::kube_api::KubeApi;
use chaos_tests::kube_rbac::{ADMIN, CONTROLLER};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
    PostParams, Preconditions,
};
use kube::runtime::watcher;
use serde_json::{Value, json};
use std::time::Duration;
use tokio_stream::StreamExt;

fn experiments() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("chaos.dev", "v1alpha1", "ChaosExperiment"),
        "chaosexperiments",
    )
}

fn schedules() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("chaos.dev", "v1alpha1", "ChaosSchedule"),
        "chaosschedules",
    )
}

/// A client as `user`.
async fn client(api: &KubeApi, dir: &std::path::Path, user: &str) -> kube::Client {
    let path = dir.join(format!("kubeconfig-{user}"));
    api.write_kubeconfig_as(&path, user);
    let kc = kube::config::Kubeconfig::read_from(&path).expect("read the kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("a kube config");
    kube::Client::try_from(config).expect("a kube client")
}

fn experiment(name: &str) -> DynamicObject {
    DynamicObject::new(name, &experiments())
        .within("shop")
        .data(json!({"spec": {"title": "t", "method": []}, "status": {"phase": "Completed"}}))
}

fn tmp(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("chaos-kube-api-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("a temp dir");
    d
}

fn code(e: kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        other => panic!("not an API error: {other}"),
    }
}

#[tokio::test]
async fn status_and_spec_are_written_through_their_own_endpoints() {
    let server = KubeApi::start().await;
    let dir = tmp("status");
    let api: Api<DynamicObject> =
        Api::namespaced_with(client(&server, &dir, ADMIN).await, "shop", &experiments());
    let created = api
        .create(&PostParams::default(), &experiment("e1"))
        .await
        .expect("create");
    assert!(created.data.get("status").is_none(), "create kept a status");
    assert_eq!(created.metadata.generation, Some(1));

    // The main endpoint: status ignored, the spec counted in generation.
    let merge = |v: Value| Patch::Merge(v);
    let o = api
        .patch(
            "e1",
            &PatchParams::default(),
            &merge(json!({"status": {"phase": "Running"}})),
        )
        .await
        .expect("patch status through the main endpoint");
    assert!(o.data.get("status").is_none(), "{:?}", o.data);
    assert_eq!(
        o.metadata.generation,
        Some(1),
        "a status-only patch bumped generation"
    );
    let o = api
        .patch(
            "e1",
            &PatchParams::default(),
            &merge(json!({"spec": {"title": "u"}, "metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .expect("patch the spec");
    assert_eq!(o.metadata.generation, Some(2));
    let o = api
        .patch(
            "e1",
            &PatchParams::default(),
            &merge(json!({"metadata": {"labels": {"a": "c"}}})),
        )
        .await
        .expect("patch a label");
    assert_eq!(
        o.metadata.generation,
        Some(2),
        "a metadata patch bumped generation"
    );

    // /status: the status only.
    let o = api
        .patch_status(
            "e1",
            &PatchParams::default(),
            &merge(json!({"spec": {"title": "v"}, "status": {"phase": "Running"}})),
        )
        .await
        .expect("patch /status");
    assert_eq!(o.data["status"]["phase"], "Running");
    assert_eq!(o.data["spec"]["title"], "u", "/status changed the spec");
    assert_eq!(o.metadata.generation, Some(2));

    // A resourceVersion sent must be the current one.
    let stale = json!({"metadata": {"resourceVersion": "1"}, "spec": {"title": "w"}});
    assert_eq!(
        code(
            api.patch("e1", &PatchParams::default(), &merge(stale))
                .await
                .unwrap_err()
        ),
        409
    );
    let mut replace = api.get("e1").await.expect("get");
    replace.metadata.resource_version = None;
    assert_eq!(
        code(
            api.replace("e1", &PostParams::default(), &replace)
                .await
                .unwrap_err()
        ),
        422,
        "a custom resource's replace without resourceVersion"
    );

    // A subresource or resource the server does not have.
    let leases: Api<DynamicObject> = Api::namespaced_with(
        api.clone().into_client(),
        "chaos-system",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("coordination.k8s.io", "v1", "Lease"),
            "leases",
        ),
    );
    let lease = DynamicObject::new("l", &leases_resource()).within("chaos-system");
    leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("create a lease");
    assert_eq!(
        code(
            leases
                .patch_status("l", &PatchParams::default(), &merge(json!({"status": {}})))
                .await
                .unwrap_err()
        ),
        404,
        "leases have no /status"
    );
    let unknown: Api<DynamicObject> = Api::namespaced_with(
        api.clone().into_client(),
        "shop",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("chaos.dev", "v1alpha1", "ChaosThing"),
            "chaosthings",
        ),
    );
    assert_eq!(code(unknown.get("x").await.unwrap_err()), 404);
    let _ = std::fs::remove_dir_all(dir);
}

fn leases_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("coordination.k8s.io", "v1", "Lease"),
        "leases",
    )
}

#[tokio::test]
async fn deletion_honours_preconditions_finalizers_and_owners() {
    let server = KubeApi::start().await;
    let dir = tmp("delete");
    let client = client(&server, &dir, ADMIN).await;
    let runs: Api<DynamicObject> = Api::namespaced_with(client.clone(), "shop", &experiments());
    let scheds: Api<DynamicObject> = Api::namespaced_with(client, "shop", &schedules());
    let owner = scheds
        .create(
            &PostParams::default(),
            &DynamicObject::new("s", &schedules())
                .within("shop")
                .data(json!({"spec": {"schedule": "* * * * *"}})),
        )
        .await
        .expect("create the owner");
    let owner_ref = json!([{
        "apiVersion": "chaos.dev/v1alpha1", "kind": "ChaosSchedule", "name": "s",
        "uid": owner.metadata.uid, "controller": true,
    }]);
    for (name, finalizers) in [
        ("plain", json!([])),
        ("held", json!(["chaos.dev/revert-faults"])),
    ] {
        let mut o = experiment(name);
        o.metadata.owner_references = serde_json::from_value(owner_ref.clone()).ok();
        o.metadata.finalizers = serde_json::from_value(finalizers).ok();
        runs.create(&PostParams::default(), &o)
            .await
            .expect("create a dependent");
    }
    let held = runs.get("held").await.expect("get");

    // Preconditions.
    let wrong = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some("not-its-uid".into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    assert_eq!(code(runs.delete("held", &wrong).await.unwrap_err()), 409);

    // The owner goes; the garbage collector deletes its dependents: the plain one at once,
    // the held one marked until its finalizer goes.
    scheds
        .delete("s", &DeleteParams::default())
        .await
        .expect("delete the owner");
    assert_eq!(code(scheds.get("s").await.unwrap_err()), 404);
    assert_eq!(
        code(runs.get("plain").await.unwrap_err()),
        404,
        "the dependent stayed"
    );
    let marked = runs.get("held").await.expect("a held dependent stays");
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert_eq!(
        marked.metadata.generation,
        held.metadata.generation.map(|g| g + 1),
        "the start of a deletion bumps generation"
    );
    let add = Patch::Merge(json!({"metadata": {"finalizers": ["chaos.dev/revert-faults", "x/y"]}}));
    assert_eq!(
        code(
            runs.patch("held", &PatchParams::default(), &add)
                .await
                .unwrap_err()
        ),
        422,
        "a new finalizer on an object being deleted"
    );
    let clear = Patch::Merge(json!({"metadata": {"finalizers": null}}));
    runs.patch("held", &PatchParams::default(), &clear)
        .await
        .expect("remove the finalizer");
    assert_eq!(
        code(runs.get("held").await.unwrap_err()),
        404,
        "gone with its finalizer"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_watch_from_a_compacted_version_is_gone_and_the_watcher_lists_again() {
    let server = KubeApi::start().await;
    let dir = tmp("watch");
    // As chaos-controller watches.
    let client = client(&server, &dir, CONTROLLER).await;
    let runs: Api<DynamicObject> = Api::namespaced_with(client.clone(), "shop", &experiments());
    let leases: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "chaos-system", &leases_resource());
    let mut stream = Box::pin(watcher::watcher(runs.clone(), watcher::Config::default()));
    let mut seen = Vec::new();
    runs.create(&PostParams::default(), &experiment("before"))
        .await
        .expect("create");
    seen.push(next_apply(&mut stream).await);
    // Other collections move the version on; the history is compacted past what the watcher
    // saw, and its watch ends.
    for i in 0..3 {
        let l = DynamicObject::new(&format!("l{i}"), &leases_resource()).within("chaos-system");
        leases
            .create(&PostParams::default(), &l)
            .await
            .expect("a lease");
    }
    let lists_before = server
        .requests()
        .iter()
        .filter(|r| r.contains("chaosexperiments") && !r.contains("watch=true"))
        .count();
    server.compact();
    runs.create(&PostParams::default(), &experiment("after"))
        .await
        .expect("create");
    while !seen.contains(&"after".to_string()) {
        seen.push(next_apply(&mut stream).await);
    }
    assert!(server.expired_watches() >= 1, "no watch was answered 410");
    let lists_after = server
        .requests()
        .iter()
        .filter(|r| r.contains("chaosexperiments") && !r.contains("watch=true"))
        .count();
    assert!(lists_after > lists_before, "the watcher did not list again");
    let _ = std::fs::remove_dir_all(dir);
}

/// The name of the next object the watcher reports as present.
async fn next_apply(
    stream: &mut (
             impl tokio_stream::Stream<Item = watcher::Result<watcher::Event<DynamicObject>>> + Unpin
         ),
) -> String {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a watch event in 10 s")
            .expect("the watcher goes on");
        match ev {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                return o.metadata.name.unwrap_or_default();
            }
            Ok(_) => {}
            // The watcher reports the 410 and goes on with a new list.
            Err(e) => eprintln!("watcher: {e}"),
        }
    }
}
