//! An engine that fails under a worker, over both buses: the worker's open streams end with a
//! typed `worker_failed` error (never a normal stop), the worker leaves discovery at once, its
//! engine restarts under supervision, it registers again and serves, and the restart is
//! counted in `/metrics`.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use dynamo_actors::frontend::{Endpoint, Frontend, FrontendSettings, ModelTable};
use dynamo_actors::worker::{EngineFactory, WorkerHandle, WorkerSettings, WorkerStatus};
use dynamo_engine::{Engine, MockerEngine, MockerFaults, MockerSettings};
use dynamo_preprocessor::Preprocessor;
use dynamo_protocols::llm::FinishReason;
use dynamo_runtime::subject::{ComponentId, Namespace};
use serde_json::json;

const MODEL: &str = "tiny";

/// Waits (on the table's change events) until `cond` holds for the model's instance count.
async fn until_instances(table: &ModelTable, cond: impl Fn(usize) -> bool, what: &str) {
    let mut changes = table.changes();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let n = table.get(MODEL).map_or(0, |e| e.instances.len());
            if cond(n) {
                return;
            }
            changes.changed().await.expect("the table lives");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

async fn engine_failure_is_typed_and_the_worker_restarts(bus: Option<String>) {
    let (_dir, folder) = common::small_model();
    let pre = Preprocessor::new(MODEL, folder.files()).unwrap();
    let vocab = pre.ordinary_tokens();
    let marked = vocab.start + 7;

    let runtime = common::runtime_on(bus).await;
    let ns = Namespace::new("failtest").unwrap();
    let mut fs = FrontendSettings::new(ns.clone());
    fs.http_addr = Some("127.0.0.1:0".parse().unwrap());
    let frontend = Frontend::start(&runtime, fs).await.unwrap();

    let mocker = MockerSettings {
        num_gpu_blocks: 256,
        block_size: 16,
        vocab: vocab.clone(),
        faults: MockerFaults {
            panic_on_token: Some(marked),
            ..Default::default()
        },
        ..Default::default()
    };
    let make = {
        let mocker = mocker.clone();
        move || -> Result<Arc<dyn Engine>, String> {
            Ok(Arc::new(
                MockerEngine::start(mocker.clone()).map_err(|e| e.to_string())?,
            ))
        }
    };
    let factory: EngineFactory = {
        let make = make.clone();
        Arc::new(move || {
            let make = make.clone();
            Box::pin(async move { make() })
        })
    };
    let card = folder.files().card(MODEL, 16, 256).unwrap();
    let instance = runtime
        .component(ComponentId::new("failtest", "backend").unwrap(), json!({}))
        .await
        .unwrap();
    let mut ws = WorkerSettings::new(card, folder.files().clone());
    ws.factory = Some(factory);
    // Long enough to see the worker out of discovery before it comes back.
    ws.restart_initial = Duration::from_millis(500);
    let worker = WorkerHandle::start(&instance, ws, make().unwrap())
        .await
        .unwrap();
    let table = frontend.models().clone();
    until_instances(&table, |n| n == 1, "the worker is listed").await;

    // Three ordinary requests, each streaming (first token seen), then the marked one.
    let serving = frontend.serving().clone();
    let body = |prompt: Vec<u32>, max_tokens: u32| json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": true});
    let mut open = Vec::new();
    for i in 0..3u32 {
        let prompt: Vec<u32> = (0..20).map(|j| vocab.start + 20 + i * 20 + j).collect();
        open.push(common::open_completion(&serving, &body(prompt, 2000)).await);
    }
    let mut marked_prompt: Vec<u32> = (0..20).map(|j| vocab.start + 200 + j).collect();
    marked_prompt[5] = marked;
    // The marked request kills the engine before its first token. It waits a moment for
    // another worker (there is none: the restarted one is the worker that failed it).
    let marked_request = {
        let serving = serving.clone();
        let b = body(marked_prompt, 10);
        tokio::spawn(async move { serving.start(Endpoint::Completions, &b).await.err() })
    };

    // The worker leaves discovery at once, and comes back once its new engine is up.
    until_instances(&table, |n| n == 0, "the failed worker is deregistered").await;
    let mut restarts = worker.restarts();
    tokio::time::timeout(Duration::from_secs(10), restarts.wait_for(|n| *n == 1))
        .await
        .expect("one restart")
        .unwrap();
    let mut status = worker.status();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| *s == WorkerStatus::Serving),
    )
    .await
    .expect("serving again")
    .unwrap();

    // Every open stream ends with the typed error, never a `stop`: no other worker could take
    // it over (a request never goes back to the worker that failed it).
    let ends = futures::future::join_all(open.into_iter().map(|mut g| async move {
        let mut finish = None;
        let error = loop {
            match g.next().await {
                Some(Ok(p)) => finish = finish.or(p.finish),
                Some(Err(e)) => break Some(e),
                None => break None,
            }
        };
        (finish, error)
    }))
    .await;
    for (i, (finish, error)) in ends.into_iter().enumerate() {
        assert_ne!(finish, Some(FinishReason::Stop), "stream {i} reported stop");
        assert_eq!(finish, None, "stream {i} finished instead of failing");
        let e = error.unwrap_or_else(|| panic!("stream {i} ended without an error"));
        assert_eq!(e.code, Some("worker_failed"), "stream {i}: {e:?}");
        assert_eq!(e.status, 503);
    }
    let e = marked_request
        .await
        .unwrap()
        .expect("the marked request fails");
    assert_eq!(e.code, Some("worker_failed"), "the marked request: {e:?}");
    until_instances(&table, |n| n == 1, "the restarted worker is listed again").await;

    let prompt: Vec<u32> = (0..20).map(|j| vocab.start + 300 + j).collect();
    let mut g = serving
        .start(Endpoint::Completions, &body(prompt, 5))
        .await
        .unwrap();
    let mut finish = None;
    while let Some(p) = g.next().await {
        finish = finish.or(p.expect("the restarted worker serves").finish);
    }
    assert_eq!(finish, Some(FinishReason::Length));

    let addr = frontend.local_addr().unwrap();
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = format!(
        "dynamo_worker_engine_restarts_total{{instance=\"{}\"}} 1",
        worker.instance()
    );
    assert!(metrics.lines().any(|l| l == line), "{line} not in /metrics");
    // Every series has HELP text (promtool's first complaint), before its TYPE line.
    let mut helped = std::collections::HashSet::new();
    for l in metrics.lines() {
        if let Some(rest) = l.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP has text");
            assert!(!help.trim().is_empty(), "empty HELP for {name}");
            helped.insert(name.to_string());
        } else if let Some(rest) = l.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap();
            assert!(helped.contains(name), "{name} has no HELP line in /metrics");
        }
    }
    assert!(helped.contains("dynamo_worker_engine_restarts_total"));
    assert!(helped.contains("dynamo_frontend_requests_total"));

    frontend.shutdown().await;
    worker.drain(Duration::from_secs(1)).await;
    runtime.close().await;
}

on_both_buses!(
    engine_failure_embedded_bus,
    engine_failure_nats_bus,
    engine_failure_is_typed_and_the_worker_restarts
);
