//! Disaggregated serving across processes over a real nats-server: a prefill worker process
//! and a decode worker process (native engine, the generated tiny model) behind a frontend
//! process routing by KV. The KV moves over shared memory, then (another pair) over TCP; every
//! greedy completion is identical to an aggregated server's, each response names the prefill
//! worker, and the prefill worker's `/metrics` shows the bytes moved by that backend.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::{dynamo_run, model_dir, Proc};
use dynamo_runtime::testing::NatsServer;

fn metrics(port: u16) -> String {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).unwrap();
    body
}

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
    let agg = Proc::start(dynamo_run().args([
        "in=http",
        "out=native",
        "--model-path",
        model_dir(),
        "--model-name",
        "tiny",
        "--block-size",
        "16",
        "--http-host",
        "127.0.0.1",
        "--http-port",
        "0",
    ]));
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
        // The frontend lists the model and its router learns of the prefill worker from
        // discovery: until then a request gets a 404 or prefills on the decode worker (each
        // warm-up prompt is new, so none is cached there).
        let mut remote = false;
        for i in 0..100 {
            let warm = format!("warm-up {i}: a prompt of a block or more");
            if let Ok((_, Some(_))) = try_complete(&base, &warm).await {
                remote = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(
            remote,
            "{route}: the frontend never planned a remote prefill"
        );
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
        let m = metrics(port);
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
