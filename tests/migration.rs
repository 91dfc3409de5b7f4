//! Request migration over a real nats-server, with workers as `dynamo-run` processes killed
//! with SIGKILL mid-stream: every stream of the killed worker finishes on another one, with
//! its whole token budget and no error; a greedy request on the native engine gives exactly
//! the text it gives without the fault.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{dynamo_run, model_dir, Proc};

use dynamo_actors::frontend::{
    Endpoint, Frontend, FrontendSettings, Generation, RouterMode, Serving,
};
use dynamo_protocols::llm::FinishReason;
use dynamo_runtime::subject::Namespace;
use dynamo_runtime::testing::NatsServer;
use dynamo_runtime::InstanceId;
use serde_json::{json, Value};

const NS: &str = "mig";

fn worker(url: &str, engine: &str, extra: &[&str]) -> (InstanceId, Proc) {
    worker_with_env(url, engine, extra, &[])
}

fn worker_with_env(
    url: &str,
    engine: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (InstanceId, Proc) {
    let endpoint = format!("in=dyn://{NS}.backend.generate");
    let proc = Proc::start(
        dynamo_run()
            .args(["--bus", url, &endpoint, engine, "--model-path", model_dir()])
            .args(["--model-name", "m", "--block-size", "16"])
            .args(extra)
            .env("DYN_DISCOVERY__LEASE", "2s")
            .envs(env.iter().copied()),
    );
    let instance = InstanceId::parse_hex(proc.instance())
        .unwrap_or_else(|_| panic!("ready line {:?}", proc.ready));
    (instance, proc)
}

async fn frontend(url: &str, mode: RouterMode) -> Frontend {
    let runtime = common::runtime_with_lease(url.to_string(), Duration::from_secs(2)).await;
    let mut settings = FrontendSettings::new(Namespace::new(NS).unwrap());
    settings.router_mode = mode;
    Frontend::start(&runtime, settings).await.unwrap()
}

/// Waits until the frontend lists `n` workers of the model.
async fn until_listed(frontend: &Frontend, n: usize) {
    tokio::time::timeout(Duration::from_secs(10), frontend.models().wait_for("m", n))
        .await
        .unwrap_or_else(|_| panic!("{n} workers listed"));
}

/// Starts `n` streaming completions of `max_tokens` (distinct prompts of `len` tokens), each
/// with its first piece read: they are all open on their workers.
async fn open_streams(
    serving: &Arc<Serving>,
    n: u32,
    len: u32,
    max_tokens: u32,
) -> Vec<Generation> {
    let mut open = Vec::new();
    for i in 0..n {
        let prompt: Vec<u32> = (0..len).map(|j| 100 + i * (len + 10) + j).collect();
        let body =
            json!({"model": "m", "prompt": prompt, "max_tokens": max_tokens, "stream": true});
        open.push(common::open_completion(serving, &body).await);
    }
    open
}

/// Reads every stream to its end; each must finish with its whole budget, and only those of
/// `victim` moved (once).
async fn all_finish(open: Vec<Generation>, victim: InstanceId, max_tokens: u32) {
    let results = futures::future::join_all(open.into_iter().map(|g| async move {
        let worker = g.worker;
        (worker, finish(g).await)
    }))
    .await;
    for (i, (worker, result)) in results.into_iter().enumerate() {
        let (_, finish, tokens, migrations) =
            result.unwrap_or_else(|e| panic!("stream {i} failed: {e}"));
        assert_eq!(finish, Some(FinishReason::Length), "stream {i}");
        assert_eq!(
            tokens, max_tokens,
            "stream {i}: every token of the budget, once"
        );
        assert_eq!(migrations, (worker == victim) as u32, "stream {i}");
    }
}

/// Reads a generation to its end: (text, finish, completion tokens), or the error.
async fn finish(mut g: Generation) -> Result<(String, Option<FinishReason>, u32, u32), String> {
    let mut text = String::new();
    let mut finish = None;
    while let Some(piece) = g.next().await {
        let piece = piece.map_err(|e| format!("{}: {}", e.status, e.message))?;
        text.push_str(&piece.text);
        finish = finish.or(piece.finish);
    }
    Ok((text, finish, g.usage().completion_tokens, g.migrations()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_streams_finish_on_the_others() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let mut workers: HashMap<InstanceId, Proc> = (0..3)
        .map(|_| worker(&url, "out=mocker", &["--num-gpu-blocks", "512"]))
        .collect();
    let frontend = frontend(&url, RouterMode::RoundRobin).await;
    until_listed(&frontend, 3).await;
    let serving = frontend.serving().clone();
    // Twelve streams of 200 tokens (about 1.2 s each at the mocker's pace), spread round-robin.
    let open = open_streams(&serving, 12, 40, 200).await;
    let victim = open[0].worker;
    let on_victim = open.iter().filter(|g| g.worker == victim).count();
    assert!(
        on_victim >= 3,
        "round-robin gave the victim {on_victim} streams"
    );
    workers.get_mut(&victim).unwrap().kill9();
    all_finish(open, victim, 200).await;
    // A new request goes to a survivor at once.
    let body = json!({"model": "m", "prompt": [5, 6, 7], "max_tokens": 3});
    let g = serving.start(Endpoint::Completions, &body).await.unwrap();
    assert_ne!(g.worker, victim);
    assert_eq!(finish(g).await.unwrap().2, 3);
}

/// Greedy decoding continues exactly: the new worker computes the prompt plus the tokens the
/// dead one produced and draws the same next tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_greedy_request_gives_the_text_it_gives_without_faults() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let (first_id, mut first) = worker(&url, "out=native", &[]);
    let frontend = frontend(&url, RouterMode::Kv).await;
    until_listed(&frontend, 1).await;
    let serving = frontend.serving().clone();
    let body: Value = json!({
        "model": "m",
        "prompt": "the migration of a request between two workers",
        "max_tokens": 400,
        "temperature": 0,
        "stream": true,
    });
    let mut g = serving.start(Endpoint::Completions, &body).await.unwrap();
    assert_eq!(g.worker, first_id);
    let mut text = String::new();
    for _ in 0..5 {
        text.push_str(&g.next().await.unwrap().unwrap().text);
    }
    // The stream is still open on the first worker (flow control holds it a window ahead);
    // a second worker joins, and the first dies.
    let (second_id, _second) = worker(&url, "out=native", &[]);
    until_listed(&frontend, 2).await;
    first.kill9();
    let (rest, finish_reason, tokens, migrations) = finish(g).await.unwrap();
    text.push_str(&rest);
    assert_eq!(migrations, 1, "the request moved once");
    assert_eq!(finish_reason, Some(FinishReason::Length));
    assert_eq!(tokens, 400);

    // The same request without a fault, on the survivor.
    let g = serving.start(Endpoint::Completions, &body).await.unwrap();
    assert_eq!(g.worker, second_id);
    let (reference, _, _, migrations) = finish(g).await.unwrap();
    assert_eq!(migrations, 0);
    assert_eq!(text, reference, "the migrated text is the fault-free text");
}

/// SIGTERM: the worker stops taking requests, and what it cannot finish within its grace it
/// hands off (its callers hear `Unavailable` and move the requests), then exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_hands_off_what_it_cannot_finish() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let mut workers: HashMap<InstanceId, Proc> = (0..2)
        .map(|_| worker_with_env(&url, "out=mocker", &[], &[("DYN_SHUTDOWN_GRACE", "300ms")]))
        .collect();
    let frontend = frontend(&url, RouterMode::RoundRobin).await;
    until_listed(&frontend, 2).await;
    let serving = frontend.serving().clone();
    // About 2.4 s of decoding each: far past the 300 ms grace.
    let open = open_streams(&serving, 6, 30, 400).await;
    let victim = open[0].worker;
    workers
        .get(&victim)
        .unwrap()
        .signal(nix::sys::signal::Signal::SIGTERM);
    all_finish(open, victim, 400).await;
    let status = workers
        .get_mut(&victim)
        .unwrap()
        .wait_exit(Duration::from_secs(10));
    assert!(
        status.success(),
        "the drained worker exits cleanly: {status:?}"
    );
}
