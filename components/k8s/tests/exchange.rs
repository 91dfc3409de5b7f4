//! The kubernetes connector against a recorded API exchange (no cluster runs here): each
//! request it sends must be the recorded one (method, path, content type, body), and it must
//! read the recorded responses, the errors included, as the planner needs them.

use dynamo_actors::planner::connector::{Connector, ConnectorError};
use dynamo_k8s::KubernetesConnector;
use kube::client::Body;
use serde_json::Value;

#[tokio::test]
async fn the_connector_speaks_the_recorded_exchange() {
    let exchange: Vec<Value> =
        serde_json::from_str(include_str!("exchange/exchange.json")).unwrap();
    let (service, mut handle) =
        tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
    let server = tokio::spawn(async move {
        for step in exchange {
            let (req, send) = handle.next_request().await.expect("the recorded request");
            let want = &step["request"];
            assert_eq!(req.method().as_str(), want["method"], "{}", step["what"]);
            assert_eq!(req.uri().path(), want["path"], "{}", step["what"]);
            if let Some(ct) = want["content_type"].as_str() {
                assert_eq!(req.headers()["content-type"], ct, "{}", step["what"]);
            }
            let body = req.into_body().collect_bytes().await.unwrap();
            if !want["body"].is_null() {
                let sent: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(sent, want["body"], "{}", step["what"]);
            }
            let r = &step["response"];
            let bytes = serde_json::to_vec(&r["body"]).unwrap();
            send.send_response(
                http::Response::builder()
                    .status(r["status"].as_u64().unwrap() as u16)
                    .header("content-type", "application/json")
                    .body(Body::from(bytes))
                    .unwrap(),
            );
        }
    });
    let client = kube::Client::new(service, "dynamo");
    let k = KubernetesConnector::new(client, "dynamo", "dynamo-");
    assert_eq!(k.replicas("backend").await.unwrap(), 2);
    assert_eq!(k.scale("backend", 5).await.unwrap(), 5);
    match k.scale("backend", 1).await {
        Err(ConnectorError::Failed { pool, reason }) => {
            assert_eq!(pool, "backend");
            assert!(
                reason.contains("403") && reason.contains("deployments/scale"),
                "{reason}"
            );
            assert!(
                reason.contains("config/k8s/planner.yaml"),
                "says what to do: {reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    match k.replicas("prefill").await {
        Err(ConnectorError::Failed { reason, .. }) => {
            assert!(
                reason.contains("dynamo-prefill") && reason.contains("404"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    server.await.unwrap();
}
