//! External engines behind our frontend and KV router (`out=openai`): two stand-in vLLM
//! servers (`scripts/engine-standin.py`: vLLM's completions dialect with token ids, its
//! metrics, and its KV events over ZeroMQ, one in each encoding vLLM has used and each hash
//! kind), each fronted by a `dynamo-run` sidecar worker process over a real nats-server, and a
//! frontend in `kv` mode here. A repeated prefix lands on the worker whose engine holds it,
//! for each encoding; a server that dies takes its worker out of the model's instances, and
//! the worker comes back when the server does.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{dynamo_run, eventually, model_dir, Proc};
use dynamo_actors::frontend::{Endpoint, Frontend, FrontendSettings, RouterMode, Serving};
use dynamo_actors::router::KvRouter;
use dynamo_kv::block_hashes;
use dynamo_protocols::kv::{SequenceHash, WorkerId, LOAD_TOPIC};
use dynamo_runtime::subject::Namespace;
use dynamo_runtime::testing::NatsServer;
use dynamo_runtime::InstanceId;
use serde_json::json;

const BS: usize = 16;

/// A stand-in engine server; killed on drop.
struct StandIn {
    child: Child,
    http: u16,
    zmq: u16,
}

impl StandIn {
    /// Starts one (on these ports when given, to come back where it was).
    fn start(encoding: &str, hashes: &str, ports: Option<(u16, u16)>) -> StandIn {
        let (http, zmq) = ports.unwrap_or((0, 0));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/engine-standin.py");
        let mut child = Command::new(common::python())
            .arg(script)
            .args([
                "--encoding",
                encoding,
                "--hashes",
                hashes,
                "--model",
                "served",
            ])
            .args(["--port", &http.to_string(), "--zmq-port", &zmq.to_string()])
            .args(["--block-size", &BS.to_string(), "--vocab", "300", "400"])
            .args(["--token-ms", "1"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the stand-in engine server");
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        let port = |key: &str| -> u16 {
            ready
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("stand-in ready line {ready:?}"))
        };
        StandIn {
            http: port("http="),
            zmq: port("zmq="),
            child,
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A sidecar worker fronting `engine`.
fn sidecar(nats: &str, engine: &StandIn) -> (Proc, InstanceId) {
    let proc = Proc::start(
        dynamo_run()
            .args(["--bus", nats, "in=dyn://ext.backend.generate", "out=openai"])
            .args(["--engine-url", &format!("http://127.0.0.1:{}", engine.http)])
            .args(["--engine-kind", "vllm"])
            .args(["--kv-events", &format!("tcp://127.0.0.1:{}", engine.zmq)])
            .args(["--block-size", &BS.to_string()])
            .args(["--model-path", model_dir(), "--model-name", "m"])
            .env("DYN_DISCOVERY__LEASE", "2s"),
    );
    let instance = InstanceId::parse_hex(proc.instance())
        .unwrap_or_else(|_| panic!("ready line {:?}", proc.ready));
    (proc, instance)
}

/// Runs a two-token completion of `prefix` + three tokens from `suffix`; the worker that
/// served it, and the tokens it got.
async fn ask(serving: &std::sync::Arc<Serving>, prefix: &[u32], suffix: u32) -> InstanceId {
    let mut prompt = prefix.to_vec();
    prompt.extend([suffix, suffix + 1, suffix + 2]);
    let body = json!({"model": "m", "prompt": prompt, "max_tokens": 2});
    let mut g = serving.start(Endpoint::Completions, &body).await.unwrap();
    let mut pieces = 0;
    while let Some(p) = g.next().await {
        p.unwrap();
        pieces += 1;
    }
    assert!(pieces > 0, "an answer streamed");
    g.worker
}

fn held(router: &KvRouter, hashes: &[SequenceHash], w: InstanceId) -> Option<u32> {
    router
        .index()
        .find_matches(hashes)
        .get(&WorkerId(w.as_u64()))
        .map(|o| o.blocks())
}

async fn idle(loads: &mut dynamo_runtime::bus::Subscription, worker: InstanceId) {
    common::until_idle(loads, &worker.to_string()).await
}

/// [`idle`], and the router has recorded an idle report too (its ingest may lag behind this
/// test's own subscription on a busy machine, and a report taken while the last request ran
/// would count that request's blocks as load).
async fn settled(
    router: &KvRouter,
    loads: &mut dynamo_runtime::bus::Subscription,
    worker: InstanceId,
) {
    idle(loads, worker).await;
    let w = WorkerId(worker.as_u64());
    eventually(
        "the router records the worker idle",
        Duration::from_secs(5),
        || {
            router
                .reported(w)
                .is_some_and(|r| r.running_requests == 0 && r.active_blocks == 0)
        },
    )
    .await;
}

/// `prefix`'s blocks are indexed for `holder` (from its engine's events), and `n` more
/// requests with that prefix land there.
async fn sticks(
    serving: &std::sync::Arc<Serving>,
    router: &KvRouter,
    loads: &mut dynamo_runtime::bus::Subscription,
    prefix: &[u32],
    holder: InstanceId,
    n: u32,
) {
    let hashes: Vec<SequenceHash> = block_hashes(prefix, BS).into_iter().map(|h| h.1).collect();
    eventually(
        "the engine's KV events index the prefix for its worker",
        Duration::from_secs(5),
        || held(router, &hashes, holder) == Some(hashes.len() as u32),
    )
    .await;
    settled(router, loads, holder).await;
    for i in 0..n {
        assert_eq!(
            ask(serving, prefix, 1000 + i * 10).await,
            holder,
            "request {i} with the cached prefix"
        );
        settled(router, loads, holder).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_routing_over_two_vllm_stand_ins_in_both_event_encodings() {
    let nats = NatsServer::start().unwrap();
    let runtime = common::runtime_with_lease(nats.url(), Duration::from_secs(2)).await;
    let mut settings = FrontendSettings::new(Namespace::new("ext").unwrap());
    settings.router_mode = RouterMode::Kv;
    let frontend = Frontend::start(&runtime, settings).await.unwrap();
    let serving = frontend.serving().clone();
    let router = serving.router().unwrap().clone();
    let mut loads = common::subscribe_events(&runtime, "ext", "backend", LOAD_TOPIC).await;

    // Older vLLM (positional events, 64-bit hashes) first, alone: it serves the first prefix.
    let mut engine_a = StandIn::start("array", "int", None);
    let (_worker_a, a) = sidecar(&nats.url(), &engine_a);
    tokio::time::timeout(Duration::from_secs(10), frontend.models().wait_for("m", 1))
        .await
        .expect("the sidecar's model is listed");
    let first: Vec<u32> = (500..660).collect();
    assert_eq!(ask(&serving, &first, 2000).await, a);

    // Newer vLLM (events as maps, 32-byte hashes) joins.
    let engine_b = StandIn::start("map", "bytes", None);
    let (_worker_b, b) = sidecar(&nats.url(), &engine_b);
    tokio::time::timeout(Duration::from_secs(10), frontend.models().wait_for("m", 2))
        .await
        .expect("two sidecars listed");
    sticks(&serving, &router, &mut loads, &first, a, 5).await;

    // A fresh prefix lands on either (a tie, drawn at random): try new ones until one lands
    // on B, then it sticks there.
    let mut second = None;
    for k in 0..24u32 {
        let prefix: Vec<u32> = (0..160).map(|i| 700 + k * 160 + i).collect();
        settled(&router, &mut loads, a).await;
        if ask(&serving, &prefix, 2000).await == b {
            second = Some(prefix);
            break;
        }
    }
    let second = second.expect("a fresh prefix lands on the idle second worker within 24 tries");
    sticks(&serving, &router, &mut loads, &second, b, 5).await;
    // A's prefix is still A's.
    assert_eq!(ask(&serving, &first, 3000).await, a);

    // A's server dies: its sidecar's health probes fail and it deregisters; its blocks
    // leave the index; requests go to B.
    let ports = (engine_a.http, engine_a.zmq);
    engine_a.kill9();
    let models = frontend.models();
    eventually(
        "the dead server's worker leaves the model",
        Duration::from_secs(15),
        || models.get("m").is_some_and(|m| m.instances.len() == 1),
    )
    .await;
    let hashes: Vec<SequenceHash> = block_hashes(&first, BS).into_iter().map(|h| h.1).collect();
    eventually(
        "the dead server's blocks leave the index",
        Duration::from_secs(5),
        || held(&router, &hashes, a).is_none(),
    )
    .await;
    assert_eq!(ask(&serving, &first, 4000).await, b);

    // The server comes back (same address): the worker registers again, same instance.
    let _engine_a = StandIn::start("array", "int", Some(ports));
    tokio::time::timeout(Duration::from_secs(15), models.wait_for("m", 2))
        .await
        .expect("the worker is back once its server is");
    assert!(models
        .get("m")
        .unwrap()
        .instances
        .iter()
        .any(|w| w.instance == a));
}

/// The shipped graph `config/vllm-fleet.yaml`, pointed at two stand-ins, serves on the embedded
/// bus, the second one spoken to in SGLang's dialect (`/generate`, cumulative `output_ids`):
/// both sidecars are listed on the status page with the load their servers' metrics report
/// (the KV blocks of `vllm:cache_config_info`; SGLang's token usage of the configured blocks),
/// and every answer comes from a server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vllm_fleet_graph_fronts_two_servers() {
    let a = StandIn::start("map", "int", None);
    let b = StandIn::start("array", "bytes", None);
    let sets = [
        format!("defaults.model_path={}", model_dir()),
        "defaults.model_name=m".to_string(),
        "frontend.http_port=0".to_string(),
        format!("vllm-0.engine_url=http://127.0.0.1:{}", a.http),
        format!("vllm-0.kv_events=tcp://127.0.0.1:{}", a.zmq),
        format!("vllm-1.engine_url=http://127.0.0.1:{}", b.http),
        format!("vllm-1.kv_events=tcp://127.0.0.1:{}", b.zmq),
        "vllm-1.engine_kind=sglang".to_string(),
        "vllm-1.num_gpu_blocks=512".to_string(),
    ];
    let mut args = vec![common::graph("vllm-fleet.yaml")];
    for s in &sets {
        args.extend(["--set".to_string(), s.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut serve = common::Serve::start(&args);
    let ready = serve.wait_out("[frontend] ready: http://", 0, Duration::from_secs(60));
    serve.wait_out("ready: graph", 0, Duration::from_secs(30));
    let base = common::base(&ready);
    let client = reqwest::Client::new();
    let get = |url: String| {
        let client = client.clone();
        async move {
            client
                .get(url)
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    let requests = |port: u16| {
        let get = &get;
        async move {
            get(format!("http://127.0.0.1:{port}/stats")).await["requests"]
                .as_u64()
                .unwrap()
        }
    };
    common::eventually_async(
        "both sidecars report their servers' KV blocks",
        Duration::from_secs(10),
        || async {
            let v = get(format!("{base}/status.json")).await;
            let mut seen: Vec<(String, u64)> = v["workers"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|w| {
                    Some((
                        w["component"].as_str()?.to_string(),
                        w["total_blocks"].as_u64()?,
                    ))
                })
                .collect();
            seen.sort();
            seen == [("vllm-0".to_string(), 1024), ("vllm-1".to_string(), 512)]
        },
    )
    .await;
    // Fresh prompts (ties between the two, drawn at random) until each server has answered.
    let mut served = 0;
    for i in 0..24u32 {
        let prompt: Vec<u32> = (0..40).map(|t| 500 + i * 40 + t).collect();
        let r = client
            .post(format!("{base}/v1/completions"))
            .json(&json!({"model": "m", "prompt": prompt, "max_tokens": 3}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
        served += 1;
        let (na, nb) = (requests(a.http).await, requests(b.http).await);
        assert_eq!(na + nb, served, "every answer came from a server");
        if na > 0 && nb > 0 {
            break;
        }
    }
    assert!(
        requests(a.http).await > 0 && requests(b.http).await > 0,
        "both the vLLM and the SGLang dialect served within 24 requests"
    );
    serve.terminate(Duration::from_secs(20));
}
