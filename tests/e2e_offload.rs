//! The KV offloader end to end over a real nats-server: a native worker process with a small
//! device pool, a host tier and a disk tier, behind a frontend process. A prompt is served,
//! evicted from the device by other prompts, and served again from the host tier; evicted
//! further (host to disk); the worker is restarted and the prompt comes back from disk; then
//! a block file is corrupted, the worker restarted again, and the corrupted block is refused
//! and recomputed. Every answer is the first run's greedy text, and the worker's `/metrics`
//! say which tier the cached tokens came from. Then cluster-wide sharing: two mocker worker
//! processes, and an idle one fetches the prefix its busy peer holds.

mod common;

use common::{dynamo_run, model_dir, Proc};
use dynamo_runtime::testing::NatsServer;
use nix::sys::signal::Signal;
use std::time::Duration;

/// A greedy completion: its text and `cached_tokens`.
async fn complete(base: &str, prompt: &str) -> (String, u64) {
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(&serde_json::json!({
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": 8,
            "min_tokens": 8,
            "temperature": 0,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{prompt:?}");
    let body: serde_json::Value = resp.json().await.unwrap();
    (
        body["choices"][0]["text"].as_str().unwrap().to_string(),
        body["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
    )
}

/// The sum of a metric's series whose labels contain every one of `labels`.
fn metric(port: u16, name: &str, labels: &[&str]) -> f64 {
    common::http_get(port, "/metrics")
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until `metric(port, name, labels)` satisfies `ok` (the worker's series follow its
/// engine's load reports, a moment after the request that changed them).
async fn until_metric(port: u16, name: &str, labels: &[&str], ok: impl Fn(f64) -> bool) {
    common::eventually(
        &format!("{name}{labels:?} is as expected"),
        Duration::from_secs(20),
        || ok(metric(port, name, labels)),
    )
    .await;
}

/// Bytes of one 16-token KV block of the generated model (f32 keys and values).
fn block_bytes() -> usize {
    let c: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{}/config.json", model_dir())).unwrap(),
    )
    .unwrap();
    let n = |k: &str| c[k].as_u64().unwrap() as usize;
    let head_dim = n("hidden_size") / n("num_attention_heads");
    n("num_hidden_layers") * 2 * n("num_key_value_heads") * head_dim * 16 * 4
}

/// Whether the frontend at `base` lists the model (a worker serves it).
fn listed(base: &str) -> bool {
    let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    common::http_get(port, "/v1/models").contains("\"tiny\"")
}

/// Stops the worker (SIGTERM: it deregisters) and waits until the frontend has let it go.
async fn stop(mut w: Proc, base: &str) {
    w.signal(Signal::SIGTERM);
    w.wait_exit(Duration::from_secs(20));
    common::eventually("the model is unlisted", Duration::from_secs(20), || {
        !listed(base)
    })
    .await;
}

async fn until_listed(base: &str) {
    common::eventually("the model is listed", Duration::from_secs(20), || {
        listed(base)
    })
    .await;
}

fn worker(url: &str, disk: &std::path::Path, port: u16) -> Proc {
    Proc::start(
        dynamo_run()
            .args(["--bus", url, "--namespace", "offload"])
            .args(["in=dyn://offload.backend.generate", "out=native"])
            .args(["--model-path", model_dir(), "--model-name", "tiny"])
            .args(["--block-size", "16", "--num-gpu-blocks", "24"])
            // 32 blocks of host RAM, 4 MiB of disk.
            .args(["--host-kv-cache", &(32 * block_bytes()).to_string()])
            .args(["--disk-kv-cache", "4MiB"])
            .args(["--disk-kv-dir", disk.to_str().unwrap()])
            .args(["--metrics-port", &port.to_string()]),
    )
}

/// A prompt of about 150 tokens, different for each `i`.
fn filler(i: usize) -> String {
    (0..40)
        .map(|w| format!("w{}x{}", i * 97 + w, w % 7))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_comes_back_from_host_then_from_disk_after_a_restart() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let disk = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let w = worker(&url, disk.path(), port);
    let frontend = Proc::start(dynamo_run().args([
        "--bus",
        &url,
        "--namespace",
        "offload",
        "in=http",
        "out=dyn",
        "--router-mode",
        "kv",
        "--http-host",
        "127.0.0.1",
        "--http-port",
        "0",
    ]));
    let base = frontend.http_base();
    until_listed(&base).await;
    let prompt = "The history of the lighthouse keepers of the northern coast, told in \
        twelve parts, begins with a storm that lasted nine days and a ship that never \
        arrived, and the keeper who waited for it every night with a lamp and a logbook \
        full of numbers: 17, 23, 42, 108, 256, 1024, 4096.";
    let (want, cached) = complete(&base, prompt).await;
    assert_eq!(cached, 0);
    // Three requests use the prefix: the disk tier's filter lets it in later.
    for _ in 0..2 {
        let (text, cached) = complete(&base, prompt).await;
        assert_eq!(text, want);
        assert!(cached > 0, "a device hit");
    }

    // Other prompts evict it from the 24-block device pool into host RAM.
    for i in 0..3 {
        complete(&base, &filler(i)).await;
    }
    let (text, cached) = complete(&base, prompt).await;
    assert_eq!(text, want, "onboarded from host");
    assert!(cached > 0);
    until_metric(
        port,
        "dynamo_worker_kv_hit_tokens_total",
        &["tier=\"host\""],
        |v| v > 0.0,
    )
    .await;

    // Many more push it out of host RAM onto the disk.
    for i in 10..22 {
        complete(&base, &filler(i)).await;
    }
    until_metric(
        port,
        "dynamo_worker_kv_tier_blocks",
        &["tier=\"disk\""],
        |v| v >= 4.0,
    )
    .await;
    // One-off prompts stay off the disk.
    until_metric(
        port,
        "dynamo_worker_kv_offload_dropped_total",
        &["reason=\"filtered\""],
        |v| v > 0.0,
    )
    .await;

    // A restart: the disk tier is rescanned and the prefix comes back from it.
    stop(w, &base).await;
    let w = worker(&url, disk.path(), port);
    until_listed(&base).await;
    until_metric(port, "dynamo_worker_kv_recovered_blocks_total", &[], |v| {
        v >= 4.0
    })
    .await;
    let (text, cached) = complete(&base, prompt).await;
    assert_eq!(text, want, "onboarded from disk after a restart");
    assert!(cached > 0);
    until_metric(
        port,
        "dynamo_worker_kv_hit_tokens_total",
        &["tier=\"disk\""],
        |v| v > 0.0,
    )
    .await;
    stop(w, &base).await;

    // Every block file damaged: the first one read is refused, everything is recomputed.
    for f in std::fs::read_dir(disk.path()).unwrap() {
        let path = f.unwrap().path();
        if path.extension().is_some_and(|e| e == "kvb") {
            let mut bytes = std::fs::read(&path).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 0x5a;
            std::fs::write(&path, bytes).unwrap();
        }
    }
    let _w = worker(&url, disk.path(), port);
    until_listed(&base).await;
    let (text, cached) = complete(&base, prompt).await;
    assert_eq!(text, want, "a corrupted block is recomputed, never served");
    assert_eq!(cached, 0);
    until_metric(
        port,
        "dynamo_worker_kv_refused_blocks_total",
        &["reason=\"corrupt\""],
        |v| v == 1.0,
    )
    .await;
    assert_eq!(
        metric(
            port,
            "dynamo_worker_kv_hit_tokens_total",
            &["tier=\"disk\""]
        ),
        0.0
    );
}

fn sharing_mocker(url: &str, port: u16) -> Proc {
    Proc::start(
        dynamo_run()
            .args(["--bus", url, "--namespace", "share"])
            .args(["in=dyn://share.backend.generate", "out=mocker"])
            .args(["--model-path", model_dir(), "--model-name", "tiny"])
            .args(["--block-size", "16", "--num-gpu-blocks", "32"])
            .args(["--speedup-ratio", "1", "--kv-share"])
            .args(["--metrics-port", &port.to_string()]),
    )
}

/// Cluster-wide KV sharing over a real nats-server, two mocker worker processes behind a
/// frontend routing by KV with a peer credit: a prompt served by one worker, then a long
/// request continuing it (routed to the same worker, which it keeps busy), then the prompt
/// again: the idle worker takes it and fetches its blocks from the busy one instead of
/// computing them (`cached_tokens` covers the prompt's full blocks), the fetch counted on both
/// sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_fetches_the_prefix_a_busy_peer_holds() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let ports = [common::free_port(), common::free_port()];
    let workers = [
        sharing_mocker(&url, ports[0]),
        sharing_mocker(&url, ports[1]),
    ];
    let frontend = Proc::start(dynamo_run().args([
        "--bus",
        &url,
        "--namespace",
        "share",
        "in=http",
        "out=dyn",
        "--router-mode",
        "kv",
        "--kv-peer-credit",
        "0.4",
        "--http-host",
        "127.0.0.1",
        "--http-port",
        "0",
    ]));
    let base = frontend.http_base();
    let client = reqwest::Client::new();
    // Both workers listed: a request pinned to each is served (polled, as `eventually`).
    for w in &workers {
        let body = serde_json::json!({"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 1,
            "nvext": {"backend_instance_id": w.instance()}});
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while !client
            .post(format!("{base}/v1/completions"))
            .json(&body)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            assert!(
                std::time::Instant::now() < until,
                "the frontend never listed worker {}",
                w.instance()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let send = |prompt: Vec<u32>, max_tokens: u32, stream: bool| {
        client
            .post(format!("{base}/v1/completions"))
            .json(&serde_json::json!({
                "model": "tiny",
                "prompt": prompt,
                "max_tokens": max_tokens,
                "min_tokens": max_tokens,
                "stream": stream,
                "stream_options": {"include_usage": true},
            }))
            .send()
    };
    let served_by = |r: &reqwest::Response| {
        r.headers()["x-dynamo-instance-id"]
            .to_str()
            .unwrap()
            .to_string()
    };
    // Ten full blocks and a partial one.
    let prompt: Vec<u32> = (0..165).map(|i| 200 + (i * 31) % 2500).collect();
    let first = send(prompt.clone(), 4, false).await.unwrap();
    let holder = served_by(&first);
    first.bytes().await.unwrap();
    // A long request continuing it goes to the same worker (its prefix is cached there) and
    // keeps it busy: 28 blocks of its 32 while it decodes for a second or more.
    let long: Vec<u32> = prompt
        .iter()
        .copied()
        .chain((0..283).map(|i| 3000 + i))
        .collect();
    let mut busy = send(long, 60, true).await.unwrap();
    assert_eq!(served_by(&busy), holder);
    busy.chunk()
        .await
        .unwrap()
        .expect("the long request started");
    // The prompt again: the idle worker wins and fetches the ten blocks from the busy one.
    let again = send(prompt, 4, false).await.unwrap();
    let fetcher = served_by(&again);
    assert_ne!(fetcher, holder, "the idle worker takes it");
    let body: serde_json::Value = again.json().await.unwrap();
    assert_eq!(
        body["usage"]["prompt_tokens_details"]["cached_tokens"], 160,
        "the prompt's full blocks came from the peer"
    );
    let port_of = |id: &str| ports[workers.iter().position(|w| w.instance() == id).unwrap()];
    until_metric(
        port_of(&fetcher),
        "dynamo_worker_kv_peer_fetched_blocks_total",
        &[],
        |v| v == 10.0,
    )
    .await;
    until_metric(
        port_of(&holder),
        "dynamo_worker_kv_peer_served_blocks_total",
        &[],
        |v| v == 10.0,
    )
    .await;
    while busy.chunk().await.unwrap().is_some() {}
}
