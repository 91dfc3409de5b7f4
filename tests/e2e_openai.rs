//! The official `openai` Python SDK against a frontend and two echo workers, each its own
//! `dynamo-run` process, over a real nats-server; then workers are killed.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{dynamo_run, model_dir, python, Proc};
use dynamo_runtime::testing::NatsServer;
use serde_json::Value;

const LEASE: &str = "2s";

/// A `dynamo-run` child with a 2 s discovery lease.
fn start(args: &[&str]) -> Proc {
    Proc::start(dynamo_run().args(args).env("DYN_DISCOVERY__LEASE", LEASE))
}

/// Instances of `model` that `/health` lists.
async fn instances(http: &reqwest::Client, base: &str) -> usize {
    let Ok(r) = http.get(format!("{base}/health")).send().await else {
        return 0;
    };
    let v: Value = r.json().await.unwrap_or(Value::Null);
    v["instances"].as_array().map(Vec::len).unwrap_or(0)
}

async fn wait_instances(http: &reqwest::Client, base: &str, want: usize, within: Duration) {
    let until = Instant::now() + within;
    loop {
        let n = instances(http, base).await;
        if n == want {
            return;
        }
        assert!(
            Instant::now() < until,
            "expected {want} instances, /health lists {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_against_frontend_and_two_workers_over_nats() {
    let py = python();
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let dir = model_dir();

    let worker = |_: usize| {
        start(&[
            "--bus",
            &url,
            "in=dyn://e2e.backend.generate",
            "out=echo",
            "--model-path",
            dir,
            "--model-name",
            "tiny",
            "--echo-delay-ms",
            "0",
        ])
    };
    let mut w1 = worker(1);
    let mut w2 = worker(2);
    assert!(w1.ready.contains("model=tiny"), "{}", w1.ready);
    let frontend = start(&[
        "--bus",
        &url,
        "--namespace",
        "e2e",
        "in=http",
        "out=dyn",
        "--http-host",
        "127.0.0.1",
        "--http-port",
        "0",
    ]);
    let base = frontend.http_base();
    let http = reqwest::Client::new();
    wait_instances(&http, &base, 2, Duration::from_secs(10)).await;

    let sdk = |py: &str| {
        let out = Command::new(py)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py"))
            .args([&format!("{base}/v1"), "tiny"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "openai SDK checks failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("all checks passed"), "{stdout}");
    };
    sdk(&py);

    // kill -9 one worker: the model stays listed and every request is still served (the
    // dead instance is skipped even before its lease runs out).
    w1.kill9();
    for i in 0..6 {
        let r = http
            .post(format!("{base}/v1/completions"))
            .json(&serde_json::json!({"model": "tiny", "prompt": "still here", "max_tokens": 4}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "request {i} after a worker died: {}",
            r.text().await.unwrap()
        );
    }
    wait_instances(&http, &base, 1, Duration::from_secs(5)).await;
    sdk(&py);

    // The last worker vanished (its lease lapsed, no deregistration): the model stays listed
    // while it may restart, and requests get a 503 to retry, not a 404 (which clients do not
    // retry).
    w2.kill9();
    wait_instances(&http, &base, 0, Duration::from_secs(10)).await;
    let listed = || async {
        let models: Value = http
            .get(format!("{base}/v1/models"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        models["data"].as_array().unwrap().len()
    };
    assert_eq!(
        listed().await,
        1,
        "the model stays listed while its worker restarts"
    );
    let complete = || async {
        http.post(format!("{base}/v1/completions"))
            .json(&serde_json::json!({"model": "tiny", "prompt": "anyone", "max_tokens": 2}))
            .send()
            .await
            .unwrap()
    };
    let r = complete().await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("retry shortly"),
        "{body}"
    );
    // A worker back: served again.
    let mut w3 = worker(3);
    wait_instances(&http, &base, 1, Duration::from_secs(10)).await;
    assert_eq!(complete().await.status(), 200);
    // The last worker leaving on purpose (SIGTERM: it deregisters): the model goes at once.
    w3.signal(nix::sys::signal::Signal::SIGTERM);
    w3.wait_exit(Duration::from_secs(30));
    // Well before the linger of a vanished worker (30 s) would end.
    let until = Instant::now() + Duration::from_secs(5);
    while listed().await != 0 {
        assert!(Instant::now() < until, "the model is still listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(complete().await.status(), 404);
    drop(frontend);
}
