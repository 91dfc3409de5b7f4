//! Eight mocker workers (one `dynamo-run` process) over a real nats-server: the KV events they
//! publish on the bus, replayed per worker, equal each worker's actual cached set (its
//! `kv_dump`), with consecutive event ids; and the load reports arrive. And the planner's
//! signals as `dynamo-run watch stats|load` shows them.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{dynamo_run, model_dir, Proc, Watch};
use dynamo_protocols::kv::{
    KvDump, KvDumpRequest, KvEventBatch, KvEventData, LoadReport, SequenceHash, KV_DUMP_ENDPOINT,
    KV_EVENTS_TOPIC, LOAD_TOPIC,
};
use dynamo_protocols::llm::{EngineOutput, PreprocessedRequest, SamplingOptions, StopConditions};
use dynamo_runtime::serve::decode_event;
use dynamo_runtime::subject::ComponentId;
use dynamo_runtime::testing::NatsServer;
use dynamo_runtime::{CallOptions, InstanceId, Runtime, RuntimeSettings, Target};

#[derive(Default)]
struct Replayed {
    set: HashSet<SequenceHash>,
    next_id: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mocker_events_on_the_bus_replay_to_each_workers_cached_set() {
    let server = NatsServer::start().unwrap();
    let dir = model_dir();
    let runtime = Runtime::start(RuntimeSettings {
        bus: Some(server.url()),
        ..Default::default()
    })
    .await
    .unwrap();
    let component = ComponentId::new("e2e", "backend").unwrap();
    // Subscribe before the workers exist: every event from the first one on.
    let mut events = common::subscribe_events(&runtime, "e2e", "backend", KV_EVENTS_TOPIC).await;
    let mut loads = common::subscribe_events(&runtime, "e2e", "backend", LOAD_TOPIC).await;
    runtime.bus().flush().await.unwrap();

    let mut workers = Proc::start(dynamo_run().args([
        "--bus",
        &server.url(),
        "in=dyn://e2e.backend.generate",
        "out=mocker",
        "--model-path",
        dir,
        "--num-workers",
        "8",
        "--num-gpu-blocks",
        "48",
        "--block-size",
        "16",
        "--speedup-ratio",
        "50",
    ]));
    let generate = component.endpoint("generate").unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    let instances: Vec<InstanceId> = loop {
        let list = runtime
            .discovery()
            .list(&generate.discovery_filter())
            .await
            .unwrap();
        if list.len() == 8 {
            break list.into_iter().map(|i| i.instance).collect();
        }
        assert!(
            Instant::now() < until,
            "{} of 8 workers registered",
            list.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Prompts from a few shared prefixes, more than the 48-block pools hold: blocks are
    // cached, reused, and evicted.
    let mut calls = Vec::new();
    for (w, &instance) in instances.iter().enumerate() {
        for r in 0..12u32 {
            let prefix = (r % 3) * 1000;
            let prompt: Vec<u32> = (prefix..prefix + 64)
                .chain((0..40).map(|i| 5000 + w as u32 * 100 + r * 7 + i))
                .collect();
            let req = PreprocessedRequest {
                token_ids: prompt,
                sampling: SamplingOptions::default(),
                stop: StopConditions {
                    max_tokens: 20,
                    min_tokens: 0,
                    stop_token_ids: vec![],
                },
                remote_prefill: None,
                peer_prefix: None,
                resumed_tokens: 0,
            };
            let client = runtime.client().clone();
            let target = Target::Instance(generate.clone(), instance);
            calls.push(tokio::spawn(async move {
                client
                    .call::<_, EngineOutput>(target, &req, CallOptions::default())
                    .await
                    .unwrap()
                    .collect()
                    .await
                    .unwrap()
            }));
        }
    }
    let mut cached_seen = 0;
    for c in calls {
        let outs = c.await.unwrap();
        assert_eq!(outs.iter().map(|o| o.token_ids.len()).sum::<usize>(), 20);
        cached_seen += outs[0].cached_tokens.unwrap_or(0);
    }
    assert!(cached_seen > 0, "shared prefixes were reused");

    // Every worker's dump equals its replayed events once they have all arrived.
    let mut replayed: HashMap<String, Replayed> = HashMap::new();
    let dump_ep = component.endpoint(KV_DUMP_ENDPOINT).unwrap();
    for &instance in &instances {
        let pieces: Vec<KvDump> = runtime
            .client()
            .call(
                Target::Instance(dump_ep.clone(), instance),
                &KvDumpRequest {},
                CallOptions::default(),
            )
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let last = pieces[0].last_event_id.expect("the worker emitted events");
        let dumped: HashSet<SequenceHash> = pieces
            .iter()
            .flat_map(|p| p.blocks.iter().map(|(_, b)| b.block_hash))
            .collect();
        let key = instance.to_string();
        let until = Instant::now() + Duration::from_secs(10);
        while replayed.get(&key).map(|r| r.next_id) != Some(last + 1) {
            let msg = tokio::time::timeout_at(until.into(), events.next())
                .await
                .unwrap_or_else(|_| panic!("events of {key} stop before id {last}"))
                .unwrap();
            let batch: KvEventBatch = decode_event(&msg.payload).unwrap();
            let r = replayed
                .entry(msg.subject.last_token().to_string())
                .or_default();
            for e in batch.events {
                assert_eq!(e.event_id, r.next_id, "event ids are consecutive");
                r.next_id += 1;
                match e.data {
                    KvEventData::Stored { blocks, .. } => {
                        r.set.extend(blocks.iter().map(|b| b.block_hash))
                    }
                    KvEventData::Removed { block_hashes } => {
                        for h in block_hashes {
                            assert!(r.set.remove(&h), "removed a block never stored");
                        }
                    }
                    KvEventData::Cleared => r.set.clear(),
                }
            }
        }
        assert_eq!(replayed[&key].set, dumped, "worker {key}");
        assert!(!dumped.is_empty());
    }
    // Load reports arrive from the workers.
    let msg = tokio::time::timeout(Duration::from_secs(3), loads.next())
        .await
        .unwrap()
        .unwrap();
    let load: LoadReport = decode_event(&msg.payload).unwrap();
    assert_eq!(load.total_blocks, 48);

    workers.kill9();
    runtime.close().await;
}

/// The number just before `suffix` in `line`, after `after`.
fn number_before(line: &str, after: &str, suffix: &str) -> Option<f64> {
    let rest = &line[line.find(after)? + after.len()..];
    rest[..rest.find(suffix)?].rsplit(' ').next()?.parse().ok()
}

/// The planner's signals as `dynamo-run watch` shows them over a real nats-server: each
/// interval a frontend's request statistics per model (requests, tokens, TTFT and ITL
/// percentiles), and the workers' load reports with their engine steps since the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_shows_frontend_statistics_and_worker_steps() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let stats = Watch::start(&url, "stats");
    let load = Watch::start(&url, "load");
    let frontend = Proc::start(dynamo_run().args([
        "--bus",
        &url,
        "in=http",
        "out=mocker",
        "--model-path",
        model_dir(),
        "--model-name",
        "tiny",
        "--num-workers",
        "2",
        "--speedup-ratio",
        "10",
        "--http-host",
        "127.0.0.1",
        "--http-port",
        "0",
    ]));
    let base = frontend.http_base();
    let client = reqwest::Client::new();
    for i in 0..3 {
        let r = client
            .post(format!("{base}/v1/completions"))
            .json(&serde_json::json!({
                "model": "tiny", "prompt": format!("question number {i}"),
                "max_tokens": 8, "min_tokens": 8,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // The three requests and their 24 tokens, over however many intervals they spanned.
    stats
        .until("watch stats shows the three requests", |lines| {
            let sum = |after: &str, suffix: &str| -> f64 {
                lines
                    .iter()
                    .filter_map(|l| number_before(l, after, suffix))
                    .sum()
            };
            sum("tiny: ", " requests") == 3.0 && sum("failed), ", " out tokens") == 24.0
        })
        .await;
    {
        let lines = stats.lines.lock().unwrap();
        let busy = lines
            .iter()
            .find(|l| l.contains("tiny: ") && !l.contains("tiny: 0 requests"))
            .unwrap();
        assert!(
            number_before(busy, "TTFT p50 ", " p99").is_some_and(|ms| ms > 0.0),
            "TTFT in {busy}"
        );
        // At this speedup a step takes microseconds and the median gap between tokens can
        // print as 0.0 ms: the p99 (the number before " ms") shows ITL was measured.
        assert!(
            number_before(busy, "ITL p50 ", " ms").is_some_and(|ms| ms > 0.0),
            "ITL in {busy}"
        );
    }
    // Each request's first token ends its prefill step; the other seven are decoded.
    load.until("watch load shows engine steps", |lines| {
        lines
            .iter()
            .filter_map(|l| number_before(l, "prefill + ", " decode tokens"))
            .sum::<f64>()
            == 21.0
    })
    .await;
    let lines = load.lines.lock().unwrap();
    // Prompts shorter than a block: nothing cached, all 18 prompt tokens computed.
    let prompt: f64 = lines
        .iter()
        .filter_map(|l| number_before(l, " ms, ", " prefill + "))
        .sum();
    assert_eq!(
        prompt, 18.0,
        "the prompts' 18 tokens were computed: {lines:?}"
    );
}
