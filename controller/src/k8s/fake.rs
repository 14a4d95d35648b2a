//! A fake API server for unit tests: no API server can run on these machines (no container
//! runtime, no kubelet), so kube's client talks to this tower-test mock instead, which answers
//! with what a handler returns and records every request.
use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use std::sync::{Arc, Mutex};

/// (method, path and query, body).
pub type Recorded = (String, String, String);

pub struct FakeApi {
    pub client: Client,
    log: Arc<Mutex<Vec<Recorded>>>,
}

impl FakeApi {
    /// Answers each request with `handler(method, uri)`: a status and a JSON body.
    pub fn start(
        handler: impl Fn(&str, &str) -> (u16, serde_json::Value) + Send + 'static,
    ) -> FakeApi {
        Self::start_with_body(move |m, u, _| handler(m, u))
    }

    /// [`FakeApi::start`] with the request body too.
    pub fn start_with_body(
        handler: impl Fn(&str, &str, &str) -> (u16, serde_json::Value) + Send + 'static,
    ) -> FakeApi {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let method = req.method().to_string();
                let uri = req.uri().to_string();
                let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
                let body = String::from_utf8_lossy(&bytes).into_owned();
                let (status, json) = handler(&method, &uri, &body);
                log2.lock().unwrap().push((method, uri, body));
                let resp = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&json).unwrap_or_default()))
                    .expect("a response");
                send.send_response(resp);
            }
        });
        FakeApi {
            client: Client::new(service, "default"),
            log,
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().unwrap().clone()
    }
}
