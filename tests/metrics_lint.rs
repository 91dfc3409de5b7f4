//! `promtool check metrics` passes clean on every process's `/metrics`: a router, a worker
//! and a frontend as separate processes over a real nats-server, after a request went
//! through all three (so their request, routing and engine series exist).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{dynamo_run, model_dir, Proc};
use dynamo_runtime::testing::NatsServer;
use serde_json::json;

/// promtool (`scripts/install-promtool.sh`, idempotent; `PROMTOOL_BIN` when set).
fn promtool() -> String {
    std::env::var("PROMTOOL_BIN").unwrap_or_else(|_| common::installed("install-promtool.sh"))
}

/// Runs `promtool check metrics` on `text`; panics with its complaints.
fn lint(what: &str, text: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics on the {what}'s /metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_metrics_pass_promtool() {
    let server = NatsServer::start().unwrap();
    let bus = server.url();
    let (router_port, worker_port) = (common::free_port(), common::free_port());
    let _router = Proc::start(dynamo_run().args([
        "--bus",
        &bus,
        "--metrics-port",
        &router_port.to_string(),
        "router",
    ]));
    let _worker = Proc::start(dynamo_run().args([
        "--bus",
        &bus,
        "--metrics-port",
        &worker_port.to_string(),
        "in=dyn://dynamo.backend.generate",
        "out=mocker",
        "--model-path",
        model_dir(),
        "--model-name",
        "m",
        "--speedup-ratio",
        "10",
    ]));
    let frontend = Proc::start(dynamo_run().args([
        "--bus",
        &bus,
        "in=http",
        "out=dyn",
        "--http-port",
        "0",
        "--http-host",
        "127.0.0.1",
        "--model-name",
        "m",
        "--router-mode",
        "kv",
        "--remote-router",
    ]));
    let base = frontend.http_base();
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for (what, url) in [
        ("frontend", format!("{base}/metrics")),
        ("router", format!("http://127.0.0.1:{router_port}/metrics")),
        ("worker", format!("http://127.0.0.1:{worker_port}/metrics")),
    ] {
        let text = http.get(&url).send().await.unwrap().text().await.unwrap();
        assert!(text.contains("# HELP dynamo_"), "{what}: {text}");
        lint(what, &text);
    }
}
