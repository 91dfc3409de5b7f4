//! `dynamo-run bench` against `dynamo-run in=http out=mocker` (4 workers, embedded bus):
//! workloads, JSON report, plot, cached-token accounting, and bad trace lines.

mod common;

use std::process::Output;

use common::{dynamo_run, model_dir, Proc};
use serde_json::Value;

struct Server {
    _proc: Proc,
    url: String,
}

fn server(blocks: &str, extra: &[&str]) -> Server {
    let workers: &[&str] = if extra.contains(&"--num-workers") {
        &[]
    } else {
        &["--num-workers", "4"]
    };
    let proc = Proc::start(
        dynamo_run()
            .args([
                "in=http",
                "out=mocker",
                "--model-path",
                model_dir(),
                "--model-name",
                "m",
            ])
            .args(["--http-host", "127.0.0.1", "--http-port", "0"])
            .args([
                "--speedup-ratio",
                "20",
                "--num-gpu-blocks",
                blocks,
                "--block-size",
                "16",
            ])
            .args(workers)
            .args(extra),
    );
    Server {
        url: proc.http_base(),
        _proc: proc,
    }
}

fn bench(url: &str, args: &[&str]) -> (Output, Option<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let out = dynamo_run()
        .args([
            "bench",
            "--url",
            url,
            "--model",
            "m",
            "--output-json",
            json.to_str().unwrap(),
        ])
        .args(args)
        .output()
        .unwrap();
    let v = std::fs::read_to_string(&json)
        .ok()
        .map(|s| serde_json::from_str(&s).unwrap());
    (out, v)
}

#[test]
fn shared_prefix_and_multi_turn_reuse_the_cache_and_report_everything() {
    let s = server("256", &["--router-mode", "round-robin"]);
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("plot.svg");
    let records = dir.path().join("requests.jsonl");
    let (out, v) = bench(
        &s.url,
        &[
            "--workload",
            "shared-prefix",
            "--requests",
            "48",
            "--concurrency",
            "8",
            "--groups",
            "2",
            "--prompts-per-group",
            "4",
            "--system-prompt-tokens",
            "128",
            "--question-tokens",
            "16",
            "--output-tokens",
            "8",
            "--warmup",
            "4",
            "--plot",
            plot.to_str().unwrap(),
            "--requests-jsonl",
            records.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = v.unwrap();
    assert_eq!(v["completed"], 48);
    assert_eq!(v["errors"], serde_json::json!({}));
    for key in ["ttft_ms", "itl_ms", "e2e_ms"] {
        for stat in ["p50", "p90", "p99", "mean"] {
            assert!(v[key][stat].as_f64().unwrap() > 0.0, "{key}.{stat}: {v}");
        }
    }
    assert!(v["requests_per_second"].as_f64().unwrap() > 0.0);
    assert!(v["output_tokens_per_second"].as_f64().unwrap() > 0.0);
    // Two 128-token system prompts over four workers: most prompt tokens are cache hits.
    let ratio = v["cached_token_ratio"].as_f64().unwrap();
    assert!(ratio > 0.5, "cached token ratio {ratio}");
    assert!(std::fs::read_to_string(&plot).unwrap().starts_with("<svg"));
    // One record per measured request (after the warm-up), naming the worker that served it
    // (round-robin: all four), adding up to the report's cached ratio.
    let recs: Vec<Value> = std::fs::read_to_string(&records)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let index: Vec<u64> = recs.iter().map(|r| r["index"].as_u64().unwrap()).collect();
    assert_eq!(index, (4..52).collect::<Vec<u64>>());
    assert!(recs
        .iter()
        .all(|r| r["ok"] == true && r["ttft_ms"].as_f64().unwrap() > 0.0));
    let workers: std::collections::BTreeSet<u64> =
        recs.iter().map(|r| r["worker"].as_u64().unwrap()).collect();
    assert!(workers.len() == 4 && !workers.contains(&0), "{workers:?}");
    let sum = |k: &str| recs.iter().map(|r| r[k].as_f64().unwrap()).sum::<f64>();
    assert!((sum("cached_tokens") / sum("prompt_tokens") - ratio).abs() < 1e-9);

    let (out, v) = bench(
        &s.url,
        &[
            "--workload",
            "multi-turn",
            "--users",
            "3",
            "--turns",
            "3",
            "--requests",
            "9",
            "--concurrency",
            "3",
            "--system-prompt-tokens",
            "64",
            "--question-tokens",
            "16",
            "--output-tokens",
            "8",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(v.unwrap()["completed"], 9);
}

#[test]
fn traces_replay_and_bad_lines_are_reported() {
    let s = server("256", &[]);
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.jsonl");
    std::fs::write(
        &trace,
        "{\"timestamp\": 0, \"input_length\": 40, \"output_length\": 4, \"hash_ids\": [1, 2, 3]}\n\
         {\"timestamp\": 20, \"input_length\": 40, \"output_length\": 4, \"hash_ids\": [1, 2, 4]}\n\
         {\"timestamp\": 30, \"input_length\": \"long\"}\n\
         {\"timestamp\": 40, \"input_length\": 20, \"output_length\": 4, \"hash_ids\": [1, 2]}\n",
    )
    .unwrap();
    let workload = format!("trace:{}", trace.display());
    let args = [
        "--workload",
        &workload,
        "--requests",
        "10",
        "--trace-block-size",
        "16",
    ];
    let (out, _) = bench(&s.url, &args);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 3") && stderr.contains("--on-bad-line skip"),
        "{stderr}"
    );

    let (out, v) = bench(&s.url, &[&args[..], &["--on-bad-line", "skip"]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 3"));
    assert_eq!(v.unwrap()["completed"], 3);
}

#[tokio::test]
async fn a_prompt_the_pool_can_never_hold_is_a_clear_400() {
    // 8 blocks of 16 tokens: a request within the model's 4096-token context but over what a
    // worker's pool can ever hold is refused at once, not queued forever.
    let s = server("8", &[]);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", s.url))
        .json(&serde_json::json!({"model": "m", "prompt": "many words in this prompt", "max_tokens": 200}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("KV cache"), "{msg}");
}

#[tokio::test]
async fn two_hundred_fifty_six_mocker_workers_in_one_process() {
    let s = server("64", &["--num-workers", "256"]);
    let http = reqwest::Client::new();
    let health: Value = http
        .get(format!("{}/health", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: std::collections::HashSet<&str> = health["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 256, "each worker is its own instance");
    let (out, v) = bench(
        &s.url,
        &[
            "--requests",
            "64",
            "--concurrency",
            "16",
            "--system-prompt-tokens",
            "64",
            "--question-tokens",
            "16",
            "--output-tokens",
            "4",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(v.unwrap()["completed"], 64);
}
