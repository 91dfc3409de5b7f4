//! Disaggregated serving across processes over a real nats-server: a prefill worker process
//! and a decode worker process (native engine, the generated tiny model) behind a frontend
//! process routing by KV. The KV moves over shared memory, then (another pair) over TCP; every
//! greedy completion is identical to an aggregated server's, each response names the prefill
//! worker, and the prefill worker's `/metrics` shows the bytes moved by that backend. And the
//! shipped graph, `config/disagg.yaml`, served over NATS as supervised processes (its router
//! component plans the prefill).

mod common;

use common::{dynamo_run, model_dir, Proc};
use dynamo_runtime::testing::NatsServer;

/// A greedy completion: its text and the prefill worker header, if any.
async fn complete(base: &str, prompt: &str) -> (String, Option<String>) {
    try_complete(base, prompt)
        .await
        .unwrap_or_else(|status| panic!("{base}: status {status} for {prompt:?}"))
}

/// [`complete`], or the status of a response that is not a 200.
async fn try_complete(base: &str, prompt: &str) -> Result<(String, Option<String>), u16> {
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(&serde_json::json!({
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": 12,
            "min_tokens": 12,
            "temperature": 0,
        }))
        .send()
        .await
        .unwrap();
    if resp.status() != 200 {
        return Err(resp.status().as_u16());
    }
    let prefill = resp
        .headers()
        .get("x-dynamo-prefill-instance-id")
        .map(|v| v.to_str().unwrap().to_string());
    let body: serde_json::Value = resp.json().await.unwrap();
    Ok((
        body["choices"][0]["text"].as_str().unwrap().to_string(),
        prefill,
    ))
}

fn native_worker(url: &str, ns: &str, kind: &str, route: &str, extra: &[&str]) -> Proc {
    let endpoint = match kind {
        "prefill" => format!("in=dyn://{ns}.prefill.prefill"),
        _ => format!("in=dyn://{ns}.decode.generate"),
    };
    Proc::start(
        dynamo_run()
            .args(["--bus", url, "--namespace", ns, &endpoint, "out=native"])
            .args(["--model-path", model_dir(), "--model-name", "tiny"])
            .args(["--block-size", "16", "--num-gpu-blocks", "512"])
            .args(["--worker-kind", kind, "--kv-transfer", route])
            .args(extra),
    )
}

const PROMPTS: [&str; 4] = [
    "Once upon a time in a land far away there lived a",
    "Once upon a time in a land far away there lived a dragon who guarded a mountain of gold and never slept",
    "a short one",
    "Numbers: one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_and_decode_processes_match_aggregated_serving_over_shm_and_tcp() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let agg = common::native_server();
    let mut want = Vec::new();
    for p in PROMPTS {
        want.push(complete(&agg.http_base(), p).await.0);
    }
    for route in ["shm", "tcp"] {
        let ns = format!("disagg{route}");
        let port = common::free_port();
        let decode = native_worker(&url, &ns, "decode", route, &[]);
        let prefill = native_worker(
            &url,
            &ns,
            "prefill",
            route,
            &["--metrics-port", &port.to_string()],
        );
        let frontend = Proc::start(dynamo_run().args([
            "--bus",
            &url,
            "--namespace",
            &ns,
            "in=http",
            "out=dyn",
            "--router-mode",
            "kv",
            "--disagg-min-remote-tokens",
            "1",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            "0",
        ]));
        let base = frontend.http_base();
        until_remote(&base, route).await;
        // In order (the second prompt continues the first: the decode worker holds its
        // prefix, only the rest moves), then all at once.
        for (p, w) in PROMPTS.iter().zip(&want) {
            let (text, pre) = complete(&base, p).await;
            assert_eq!(&text, w, "{route}: {p:?}");
            if p.len() > 40 {
                assert_eq!(pre.as_deref(), Some(prefill.instance()), "{route}: {p:?}");
            }
        }
        let again: Vec<String> = PROMPTS
            .iter()
            .map(|p| format!("{p} (again, concurrently)"))
            .collect();
        let concurrent = futures::future::join_all(again.iter().map(|p| complete(&base, p))).await;
        let mut reference = Vec::new();
        for p in &again {
            reference.push(complete(&agg.http_base(), p).await.0);
        }
        for ((text, _), w) in concurrent.iter().zip(&reference) {
            assert_eq!(text, w, "{route}: concurrent");
        }
        let m = common::http_get(port, "/metrics");
        let moved = m
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "dynamo_kv_transfer_bytes_total{{backend=\"{route}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(moved > 0.0, "{route}: no KV bytes moved by {route}:\n{m}");
        drop((frontend, prefill, decode));
    }
}

/// Waits until a remote prefill happens on the frontend at `base` (the model listed, and the
/// router aware of the prefill worker: discovery state no event reports across processes), with
/// a new prompt each time so that nothing is cached on the decode worker.
async fn until_remote(base: &str, what: &str) {
    for i in 0..100 {
        let warm = format!(
            "warm-up {i}: a prompt long enough to pass the graph's threshold of sixty-four uncached \
             tokens on the decode worker, so that the router plans its prefill on the prefill \
             worker rather than on the decode worker itself, which it does once it knows of it"
        );
        if let Ok((_, Some(_))) = try_complete(base, &warm).await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{what}: the frontend never planned a remote prefill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disagg_graph_serves_over_nats_as_processes() {
    let server = NatsServer::start().unwrap();
    let port = common::free_port();
    let mut child = dynamo_run()
        .args([
            "serve",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/disagg.yaml"),
        ])
        .args(["--bus", &server.url()])
        .args(["--set", &format!("defaults.model_path={}", model_dir())])
        .args(["--set", "defaults.model_name=tiny"])
        .args(["--set", &format!("frontend.http_port={port}")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let ready = lines.find(|l| l.as_ref().is_ok_and(|l| l.starts_with("ready: graph")));
    assert!(ready.is_some(), "the graph did not get ready");
    let base = format!("http://127.0.0.1:{port}");
    until_remote(&base, "disagg.yaml").await;
    let agg = common::native_server();
    let prompt = "A longer story: once upon a time in a land far away there lived a dragon who \
                  guarded a mountain of gold, and every morning the villagers brought it bread, \
                  milk and songs, hoping that one day it would share a single coin with them";
    let (text, prefill) = complete(&base, prompt).await;
    assert_eq!(text, complete(&agg.http_base(), prompt).await.0);
    assert!(prefill.is_some(), "prefilled on the prefill worker");
    let _ = child.kill();
    let _ = child.wait();
}
