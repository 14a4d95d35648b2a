//! The application harness itself: nginx and Prometheus start inside a site's namespaces.
use chaos_tests::apps::{self, Site};
use chaos_tests::serial;
use std::time::Duration;

#[test]
fn nginx_and_prometheus_run_inside_a_site() {
    let _g = serial();
    let site = Site::new("smoke", 1);
    let _nginx = apps::nginx(&site.apps[0], &Site::app_ip(1), &site.tmp.join("nginx"));
    let (status, body) =
        apps::http_get(&site.hub, &format!("{}:80", Site::app_ip(1)), "/").expect("nginx answers");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let target = format!("{}:80", Site::app_ip(1));
    let _prom = apps::prometheus(
        &site.hub,
        "127.0.0.1:9090",
        &[target],
        &site.tmp.join("prom"),
    );
    apps::wait_http(
        &site.hub,
        "127.0.0.1:9090",
        "/api/v1/query?query=up",
        Duration::from_secs(5),
    );
}
