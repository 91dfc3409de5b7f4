//! The OpenAI frontend over real HTTP (reqwest) in front of echo workers on the embedded bus:
//! what clients see, including every bad-input answer.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::eventually;
use dynamo_actors::frontend::{Frontend, FrontendSettings, RouterMode, WORKER_HEADER};
use dynamo_actors::router::KvRouterSettings;
use dynamo_actors::worker::{WorkerHandle, WorkerSettings, GENERATE};
use dynamo_engine::{EchoEngine, EchoSettings};
use dynamo_preprocessor::make_model::{make_model, MakeModelSettings};
use dynamo_preprocessor::{ModelFolder, Preprocessor};
use dynamo_runtime::discovery::InstanceInfo;
use dynamo_runtime::subject::{EndpointId, Namespace};
use dynamo_runtime::{InstanceId, Runtime, RuntimeSettings};
use futures::StreamExt;
use serde_json::{json, Value};

const MODEL: &str = "tiny";

fn model_dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        make_model(dir.path(), &MakeModelSettings::default()).unwrap();
        dir
    })
}

fn folder() -> ModelFolder {
    ModelFolder::load(model_dir().path()).unwrap()
}

fn endpoint() -> EndpointId {
    EndpointId::new("test", "backend", GENERATE).unwrap()
}

struct Stack {
    runtime: Runtime,
    frontend: Option<Frontend>,
    workers: Vec<WorkerHandle>,
    base: String,
    http: reqwest::Client,
}

struct Opts {
    workers: usize,
    delay: Duration,
    mode: RouterMode,
    max_inflight: usize,
    max_body: usize,
    kv: KvRouterSettings,
    /// Mocker workers (a real block pool and prefix cache) instead of echo ones.
    mocker: bool,
    parsers: dynamo_preprocessor::tools::OutputParsers,
    auth: dynamo_actors::frontend::auth::AuthSettings,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            workers: 1,
            delay: Duration::ZERO,
            mode: RouterMode::RoundRobin,
            max_inflight: 64,
            max_body: 1 << 20,
            kv: KvRouterSettings::default(),
            mocker: false,
            parsers: Default::default(),
            auth: Default::default(),
        }
    }
}

async fn add_worker(runtime: &Runtime, delay: Duration, mocker: bool) -> WorkerHandle {
    let f = folder();
    let instance = runtime
        .component(endpoint().component, json!({}))
        .await
        .unwrap();
    let (card, engine): (_, std::sync::Arc<dyn dynamo_engine::Engine>) = if mocker {
        let engine = dynamo_engine::MockerEngine::start(dynamo_engine::MockerSettings {
            num_gpu_blocks: 256,
            block_size: 16,
            speedup_ratio: 100.0,
            ..Default::default()
        })
        .unwrap();
        (
            f.files().card(MODEL, 16, 256).unwrap(),
            std::sync::Arc::new(engine),
        )
    } else {
        let engine = EchoEngine::new(EchoSettings {
            delay_per_token: delay,
        });
        (
            f.files().card(MODEL, 64, 0).unwrap(),
            std::sync::Arc::new(engine),
        )
    };
    WorkerHandle::start(
        &instance,
        WorkerSettings::new(card, f.files().clone()),
        engine,
    )
    .await
    .unwrap()
}

impl Stack {
    async fn start(o: Opts) -> Stack {
        let runtime = Runtime::start(RuntimeSettings::default()).await.unwrap();
        let mut s = FrontendSettings::new(Namespace::new("test").unwrap());
        s.http_addr = Some("127.0.0.1:0".parse().unwrap());
        s.router_mode = o.mode;
        s.max_inflight = o.max_inflight;
        s.max_body_bytes = o.max_body;
        s.kv_router = o.kv;
        s.parsers = o.parsers;
        s.auth = o.auth;
        let frontend = Frontend::start(&runtime, s).await.unwrap();
        let mut workers = Vec::new();
        for _ in 0..o.workers {
            workers.push(add_worker(&runtime, o.delay, o.mocker).await);
        }
        tokio::time::timeout(
            Duration::from_secs(10),
            frontend.models().wait_for(MODEL, o.workers),
        )
        .await
        .expect("model listed");
        let base = format!("http://{}", frontend.local_addr().unwrap());
        Stack {
            runtime,
            frontend: Some(frontend),
            workers,
            base,
            http: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value, reqwest::header::HeaderMap) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.json::<Value>().await.unwrap_or(Value::Null);
        (status, body, headers)
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn inflight(&self) -> u64 {
        let (_, body) = self.get("/health").await;
        serde_json::from_str::<Value>(&body).unwrap()["inflight"]
            .as_u64()
            .unwrap()
    }

    async fn finish(mut self) {
        self.frontend.take().unwrap().shutdown().await;
        for w in self.workers.drain(..) {
            w.drain(Duration::from_secs(1)).await;
        }
        self.runtime.close().await;
    }
}

fn chat(content: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}]})
}

/// The answer is an OpenAI error body with this status.
fn assert_error(status: u16, body: &Value, want: u16, needle: &str) {
    assert_eq!(status, want, "{body}");
    let e = &body["error"];
    for key in ["message", "type", "param", "code"] {
        assert!(e.get(key).is_some(), "error body lacks {key}: {body}");
    }
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
}

/// Reads an SSE response into its `data:` payloads.
async fn sse_events(r: reqwest::Response) -> Vec<String> {
    let text = r.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completions_with_usage_streaming_and_not() {
    let s = Stack::start(Opts::default()).await;
    let pre = Preprocessor::new(MODEL, folder().files()).unwrap();

    // Non-streaming chat: the echo engine repeats the framed prompt up to the end of turn.
    let (status, body, headers) = s
        .post("/v1/chat/completions", &chat("Hello there, café 日本"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "user\nHello there, café 日本"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let prompt = pre
        .chat(&chat("Hello there, café 日本"))
        .unwrap()
        .prompt_tokens() as u64;
    let usage = &body["usage"];
    assert_eq!(usage["prompt_tokens"], prompt);
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion);
    assert!(headers.contains_key(WORKER_HEADER));

    // Streaming completion with a stop string and usage: the stop string and what follows
    // never reach the client.
    let r = s
        .http
        .post(format!("{}/v1/completions", s.base))
        .json(
            &json!({"model": MODEL, "prompt": "one two three four", "stream": true,
                      "stop": ["three"], "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_events(r).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, "one two ");
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, vec![&json!("stop")]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));
    let p = pre
        .completion(&json!({"model": MODEL, "prompt": "one two three four"}))
        .unwrap();
    assert_eq!(usage["prompt_tokens"], p.prompt_tokens() as u64);

    // max_tokens ends with length, and completion tokens equal max_tokens.
    let (status, body, _) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "alpha beta gamma delta", "max_tokens": 3}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 3);

    // Streaming chat: role first, then content, then finish.
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&json!({"model": MODEL, "stream": true, "messages": [{"role": "user", "content": "stream me"}]}))
        .send()
        .await
        .unwrap();
    let events = sse_events(r).await;
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let content: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(content, "user\nstream me");
    assert_eq!(s.inflight().await, 0);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_openai_errors_and_leaks_nothing() {
    let s = Stack::start(Opts {
        max_body: 64 * 1024,
        ..Default::default()
    })
    .await;
    let raw = |body: &'static str| {
        let s = &s;
        async move {
            let r = s
                .http
                .post(format!("{}/v1/chat/completions", s.base))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (st, b) = raw("{not json").await;
    assert_error(st, &b, 400, "not valid JSON");
    let (st, b) = raw(
        r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}"#,
    )
    .await;
    assert_error(st, &b, 400, "max_tokens");
    assert_eq!(b["error"]["param"], "max_tokens");
    let (st, b, _) = s
        .post("/v1/chat/completions", &json!({"model": MODEL}))
        .await;
    assert_error(st, &b, 400, "messages");
    let (st, b, _) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": []}),
        )
        .await;
    assert_error(st, &b, 400, "must not be empty");
    let (st, b, _) = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_error(st, &b, 400, "model");
    let (st, b, _) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_error(st, &b, 404, "gpt-9");
    assert_eq!(b["error"]["code"], "model_not_found");
    let long = "word ".repeat(5000);
    let (st, b, _) = s.post("/v1/chat/completions", &chat(&long)).await;
    assert_error(st, &b, 400, "context length");
    assert_eq!(b["error"]["code"], "context_length_exceeded");
    let mut zero = chat("x");
    zero["max_tokens"] = json!(0);
    let (st, b, _) = s.post("/v1/chat/completions", &zero).await;
    assert_error(st, &b, 400, "at least 1");
    // The chat template's own refusal (raise_exception) is the client's error, named.
    let late_system = json!({"model": MODEL, "messages": [
        {"role": "user", "content": "x"}, {"role": "system", "content": "late"}]});
    let (st, b, _) = s.post("/v1/chat/completions", &late_system).await;
    assert_error(st, &b, 400, "A system message must come first");
    for n in [0, 129] {
        let mut bad_n = chat("x");
        bad_n["n"] = json!(n);
        let (st, b, _) = s.post("/v1/chat/completions", &bad_n).await;
        assert_error(st, &b, 400, "between 1 and 128");
    }
    // More choices than the in-flight limit (64) leaves: a 429 before any starts.
    let mut many = chat("x");
    many["n"] = json!(100);
    let (st, b, _) = s.post("/v1/chat/completions", &many).await;
    assert_error(st, &b, 429, "requests in flight");
    let huge = "x".repeat(100 * 1024);
    let (st, b, _) = s.post("/v1/chat/completions", &chat(&huge)).await;
    assert_error(st, &b, 413, "over the limit");
    let (st, body) = s.get("/v1/nothing").await;
    assert_error(st, &serde_json::from_str(&body).unwrap(), 404, "no route");
    let (st, body) = s.get("/v1/chat/completions").await;
    assert_error(
        st,
        &serde_json::from_str(&body).unwrap(),
        405,
        "GET is not allowed",
    );

    // The server still serves, and no request slot leaked.
    let (st, b, _) = s.post("/v1/chat/completions", &chat("still alive")).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(s.inflight().await, 0);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_live_worker_is_503_and_the_inflight_limit_is_429() {
    let mut s = Stack::start(Opts {
        max_inflight: 2,
        delay: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    // Two slow streams hold both slots; a third request is refused with Retry-After.
    let open = |s: &Stack| {
        s.http
            .post(format!("{}/v1/completions", s.base))
            .json(&json!({"model": MODEL, "prompt": "a b c d", "stream": true}))
            .send()
    };
    let a = open(&s).await.unwrap();
    let b = open(&s).await.unwrap();
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    let (st, body, headers) = s.post("/v1/chat/completions", &chat("third")).await;
    assert_error(st, &body, 429, "limit of 2");
    assert_eq!(headers["retry-after"], "1");
    // The refusal comes before the body is read: a client that announces 2 MB and sends
    // none of it gets its 429 at once (reading the body first would wait for it forever).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = s.base.trim_start_matches("http://").to_string();
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            2 << 20
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut answer))
            .await
            .expect("an answer without the body")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    }
    drop((sse_events(a).await, sse_events(b).await));
    assert_eq!(s.inflight().await, 0);

    // A registered instance that nobody answers for: the model stays listed, requests get 503.
    let ghost = InstanceInfo {
        endpoint: endpoint(),
        instance: InstanceId::random(),
        metadata: json!({"role": "worker", "model": folder().files().card(MODEL, 64, 0).unwrap()}),
        process: None,
        lease: None,
    };
    s.runtime.discovery().register(ghost.clone()).await.unwrap();
    let table = s.frontend.as_ref().unwrap().models().clone();
    tokio::time::timeout(Duration::from_secs(5), table.wait_for(MODEL, 2))
        .await
        .unwrap();
    for w in s.workers.drain(..) {
        w.drain(Duration::from_secs(1)).await;
    }
    let mut changes = table.changes();
    while table.get(MODEL).map(|m| m.instances.len()) != Some(1) {
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .unwrap()
            .unwrap();
    }
    let (st, body, headers) = s.post("/v1/chat/completions", &chat("anyone?")).await;
    assert_error(st, &body, 503, "no live worker");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(s.inflight().await, 0);

    // Its last instance leaving drops the model: 404 and an empty list.
    s.runtime
        .discovery()
        .deregister(&ghost.endpoint, ghost.instance)
        .await
        .unwrap();
    while table.get(MODEL).is_some() {
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .unwrap()
            .unwrap();
    }
    let (_, models) = s.get("/v1/models").await;
    assert_eq!(
        serde_json::from_str::<Value>(&models).unwrap()["data"],
        json!([])
    );
    let (st, body) = s.get("/health").await;
    assert_eq!(st, 503, "{body}");
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_request_on_the_worker() {
    let s = Stack::start(Opts {
        delay: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    let long = "many words here ".repeat(100);
    let r = s
        .http
        .post(format!("{}/v1/completions", s.base))
        .json(&json!({"model": MODEL, "prompt": long, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    assert_eq!(s.workers[0].open_requests(), 1);
    drop(body);
    // 300 tokens at 20 ms would take 6 s; the worker must let go well before.
    eventually(
        "the worker lets go of the gone client's request",
        Duration::from_secs(3),
        || s.workers[0].open_requests() == 0,
    )
    .await;
    assert_eq!(s.inflight().await, 0);

    // The same for a non-streaming request whose client gives up waiting.
    let gave_up = s
        .http
        .post(format!("{}/v1/completions", s.base))
        .json(&json!({"model": MODEL, "prompt": long}))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gave_up.is_err(), "6 s of tokens cannot arrive in 300 ms");
    eventually(
        "the worker lets go of the gone client's request",
        Duration::from_secs(3),
        || s.workers[0].open_requests() == 0,
    )
    .await;
    assert_eq!(s.inflight().await, 0);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_modes_spread_or_pin_requests() {
    let s = Stack::start(Opts {
        workers: 2,
        ..Default::default()
    })
    .await;
    let ids: Vec<String> = s.workers.iter().map(|w| w.instance().to_string()).collect();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let (st, _, h) = s.post("/v1/chat/completions", &chat("rr")).await;
        assert_eq!(st, 200);
        seen.push(h[WORKER_HEADER].to_str().unwrap().to_string());
    }
    assert_ne!(seen[0], seen[1], "round-robin alternates: {seen:?}");
    assert_eq!(seen[0], seen[2]);
    assert_eq!(seen[1], seen[3]);
    // A request can pin its worker.
    for id in &ids {
        let mut body = chat("pinned");
        body["nvext"] = json!({"backend_instance_id": id});
        let (st, _, h) = s.post("/v1/chat/completions", &body).await;
        assert_eq!(st, 200);
        assert_eq!(h[WORKER_HEADER].to_str().unwrap(), id);
    }
    let mut bad = chat("pinned");
    bad["nvext"] = json!({"backend_instance_id": "0123456789abcdef"});
    let (st, b, _) = s.post("/v1/chat/completions", &bad).await;
    assert_error(st, &b, 400, "does not serve");
    // /health lists both instances; /metrics has the frontend series.
    let (_, health) = s.get("/health").await;
    for id in &ids {
        assert!(health.contains(id.as_str()), "{health}");
    }
    let (st, m) = s.get("/metrics").await;
    assert_eq!(st, 200);
    for series in [
        "dynamo_frontend_requests_total{model=\"tiny\",endpoint=\"chat_completions\",status=\"200\"}",
        "dynamo_frontend_time_to_first_token_seconds",
        "dynamo_frontend_inter_token_latency_seconds",
        "dynamo_frontend_request_duration_seconds",
        "dynamo_frontend_input_sequence_tokens",
        "dynamo_frontend_output_sequence_tokens",
        "dynamo_frontend_inflight_requests",
    ] {
        assert!(m.contains(series), "missing {series} in\n{m}");
    }
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_mode_requires_an_instance_and_random_uses_all() {
    let s = Stack::start(Opts {
        workers: 2,
        mode: RouterMode::Direct,
        ..Default::default()
    })
    .await;
    let (st, b, _) = s.post("/v1/chat/completions", &chat("where?")).await;
    assert_error(st, &b, 400, "direct mode");
    let id = s.workers[1].instance().to_string();
    let mut body = chat("here");
    body["nvext"] = json!({"backend_instance_id": id});
    let (st, _, h) = s.post("/v1/chat/completions", &body).await;
    assert_eq!((st, h[WORKER_HEADER].to_str().unwrap()), (200, id.as_str()));
    s.finish().await;

    let s = Stack::start(Opts {
        workers: 2,
        mode: RouterMode::Random,
        ..Default::default()
    })
    .await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..24 {
        let (_, _, h) = s.post("/v1/chat/completions", &chat("r")).await;
        seen.insert(h[WORKER_HEADER].to_str().unwrap().to_string());
    }
    assert_eq!(
        seen.len(),
        2,
        "random routing used one worker for 24 requests"
    );
    s.finish().await;
}

/// Echo workers publish no KV events: the kv router falls back, visibly, to prefixes predicted
/// from its own decisions, so a repeated prompt keeps going to the worker that served it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_mode_without_events_falls_back_to_predicted_prefixes() {
    let s = Stack::start(Opts {
        workers: 3,
        mode: RouterMode::Kv,
        kv: KvRouterSettings {
            fallback_after: Duration::ZERO,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let long = "the same long system prompt shared by these requests ".repeat(20);
    let mut seen = Vec::new();
    for i in 0..5 {
        let body =
            json!({"model": MODEL, "prompt": format!("{long} question {i}"), "max_tokens": 2});
        let (st, b, h) = s.post("/v1/completions", &body).await;
        assert_eq!(st, 200, "{b}");
        seen.push(h[WORKER_HEADER].to_str().unwrap().to_string());
    }
    assert!(
        seen.iter().all(|w| *w == seen[0]),
        "a repeated prefix sticks: {seen:?}"
    );
    let router = s
        .frontend
        .as_ref()
        .unwrap()
        .serving()
        .router()
        .unwrap()
        .clone();
    assert!(router.approximate());
    let (_, m) = s.get("/metrics").await;
    assert!(m.contains("dynamo_router_approximate 1"), "{m}");
    s.finish().await;
}

/// The request fields of the official SDKs' create params, by API (`tests/openai_fields.py`).
fn sdk_fields() -> Value {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_fields.py");
    let out = std::process::Command::new(common::python())
        .arg(&script)
        .output()
        .expect("run tests/openai_fields.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Nothing is silently ignored: every request field of the official openai SDK's chat and
/// completions params has a decision here, and sent with a value this server cannot honour
/// it gets a 400 naming it; only fields honoured with any value (or without effect, like
/// `user`) may answer 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_openai_request_field_is_honoured_or_refused_by_name() {
    use dynamo_preprocessor::fields::{always_taken, known, Api};

    let sdk = sdk_fields();
    let s = Stack::start(Opts::default()).await;
    let mut walked = 0;
    for (api, path, key) in [
        (Api::Chat, "/v1/chat/completions", "chat"),
        (Api::Completions, "/v1/completions", "completions"),
    ] {
        let fields = sdk[key].as_array().unwrap();
        assert!(fields.len() > 10, "the SDK lists {key} fields: {fields:?}");
        for f in fields {
            let f = f.as_str().unwrap();
            assert!(
                known(api, f),
                "{key}: the SDK's field {f:?} has no decision"
            );
            if ["model", "messages", "prompt"].contains(&f) {
                continue;
            }
            let mut body = match api {
                Api::Chat => {
                    json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
                }
                Api::Completions => json!({"model": MODEL, "prompt": "x", "max_tokens": 2}),
            };
            body[f] = json!({"unexpected": 1});
            let (status, answer, _) = s.post(path, &body).await;
            match status {
                400 => {
                    let param = answer["error"]["param"].as_str().unwrap_or_default();
                    assert!(
                        param.starts_with(f),
                        "{key}.{f}: 400 naming {param:?}: {answer}"
                    );
                }
                200 => assert!(always_taken(api, f), "{key}.{f} was accepted: {answer}"),
                other => panic!("{key}.{f}: status {other}: {answer}"),
            }
            walked += 1;
        }
    }
    assert!(walked > 40, "walked {walked} fields");
    // An unknown field is refused too, naming it.
    let (status, answer, _) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "guided_grammar": "x"}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(answer["error"]["param"], "guided_grammar");
    // Structured output needs a model's logits too: the echo engine refuses it by name.
    let (status, answer, _) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("guided decoding"),
        "{answer}"
    );
    // A valid logit_bias reaches the engine; the echo engine has no logits and says so.
    let (status, answer, _) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "x", "max_tokens": 2, "logit_bias": {"5": 10}}),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("logit_bias"), "{answer}");
    // So are logprobs: no made-up probabilities.
    let (status, answer, _) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logprobs": true}),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("logprobs"), "{answer}");
    s.finish().await;
}

/// `GET /v1/models/{id}` answers one model or a 404 in the API's error shape; a client's
/// `x-request-id` becomes the response's id and comes back as a header; a malformed one is
/// refused naming the header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_retrieval_and_client_request_ids() {
    let s = Stack::start(Opts::default()).await;
    let (status, body) = s.get(&format!("/v1/models/{MODEL}")).await;
    assert_eq!(status, 200);
    let m: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (m["id"].as_str(), m["object"].as_str()),
        (Some(MODEL), Some("model"))
    );
    let (status, body) = s.get("/v1/models/org/no-such-model").await;
    assert_eq!(status, 404);
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");

    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .header("x-request-id", "client-42")
        .json(&chat("hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "client-42");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["id"], "chatcmpl-client-42");
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .header("x-request-id", "has spaces")
        .json(&chat("hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["param"], "x-request-id");
    s.finish().await;
}

/// `n` choices share their prompt's KV: the first choice prefills it, and the KV router sends
/// the others to the worker that now holds it, where they find it cached. A batch of prompts
/// gives one sequence per (prompt, choice), in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn choices_share_their_prompts_cached_blocks() {
    let s = Stack::start(Opts {
        workers: 3,
        mode: RouterMode::Kv,
        mocker: true,
        ..Default::default()
    })
    .await;
    let serving = s.frontend.as_ref().unwrap().serving().clone();
    let prompt: Vec<u32> = (200..264).collect();
    let body =
        json!({"model": MODEL, "prompt": prompt, "max_tokens": 4, "n": 4, "ignore_eos": true});
    let gens = serving
        .start_choices(dynamo_actors::frontend::Endpoint::Completions, &body, None)
        .await
        .unwrap();
    assert_eq!(gens.len(), 4);
    let worker = gens[0].worker;
    let mut cached = Vec::new();
    for mut g in gens {
        assert_eq!(
            g.worker, worker,
            "choice {} on another worker",
            g.prepared.index
        );
        while let Some(p) = g.next().await {
            p.unwrap();
        }
        cached.push(g.usage().prompt_tokens_details.unwrap().cached_tokens);
    }
    // 64 tokens are 4 blocks; the last is recomputed to sample from, so 3 come from cache.
    assert_eq!(cached, vec![0, 48, 48, 48]);
    // Over HTTP: a batch of two prompts, n = 2: four choices, prompts counted once each.
    let (status, answer, _) = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": [[1, 2, 3], [4, 5, 6, 7]], "max_tokens": 3, "n": 2, "ignore_eos": true}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let indexes: Vec<u64> = answer["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, vec![0, 1, 2, 3]);
    assert_eq!(answer["usage"]["prompt_tokens"], 7, "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 12, "{answer}");
    s.finish().await;
}

/// With `--reasoning-parser think`, a model's `<think>...</think>` comes out as
/// `reasoning_content`, whole and streamed (the echo engine answers with the prompt, so the
/// message's own think block comes back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_is_split_into_reasoning_content() {
    let s = Stack::start(Opts {
        parsers: dynamo_preprocessor::tools::OutputParsers {
            reasoning: true,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let body = chat("<think>plan the answer</think>The answer is four.");
    let (status, answer, _) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    let m = &answer["choices"][0]["message"];
    let reasoning = m["reasoning_content"].as_str().unwrap_or_default();
    let content = m["content"].as_str().unwrap_or_default();
    assert!(reasoning.ends_with("\nplan the answer"), "{answer}");
    assert!(content.starts_with("The answer is four."), "{answer}");
    assert!(
        !content.contains("think>") && !reasoning.contains("think>"),
        "{answer}"
    );
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let text = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&streamed)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (mut r, mut c) = (String::new(), String::new());
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let d = &v["choices"][0]["delta"];
        r.push_str(d["reasoning_content"].as_str().unwrap_or_default());
        c.push_str(d["content"].as_str().unwrap_or_default());
    }
    assert_eq!((r.as_str(), c.as_str()), (reasoning, content));
    s.finish().await;
}

/// The Responses and Messages APIs refuse by name what they cannot honour: every request
/// field of the official SDKs' responses and messages params, sent with a value of the wrong
/// shape, gets a 400 naming it (in each API's error shape); a well-formed request answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_responses_and_messages_field_is_honoured_or_refused_by_name() {
    let sdk = sdk_fields();
    let s = Stack::start(Opts::default()).await;
    let base = |api: &str| match api {
        "responses" => json!({"model": MODEL, "input": "x", "max_output_tokens": 2}),
        _ => {
            json!({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]})
        }
    };
    for (api, path) in [("responses", "/v1/responses"), ("messages", "/v1/messages")] {
        let (status, answer, _) = s.post(path, &base(api)).await;
        assert_eq!(status, 200, "{api}: {answer}");
        let fields = sdk[api].as_array().unwrap();
        assert!(fields.len() > 10, "the SDK lists {api} fields: {fields:?}");
        for f in fields {
            let f = f.as_str().unwrap();
            if ["model", "input", "messages"].contains(&f) {
                continue;
            }
            let mut body = base(api);
            body[f] = json!({"unexpected": 1});
            let (status, answer, _) = s.post(path, &body).await;
            assert_eq!(status, 400, "{api}.{f} was accepted: {answer}");
            if api == "responses" {
                let param = answer["error"]["param"].as_str().unwrap_or_default();
                assert!(
                    param.starts_with(f),
                    "{api}.{f}: 400 naming {param:?}: {answer}"
                );
            } else {
                assert_eq!(answer["type"], "error", "{answer}");
                let message = answer["error"]["message"].as_str().unwrap_or_default();
                assert!(
                    message.starts_with(f) || message.contains(&format!("{f:?}")),
                    "{api}.{f}: {answer}"
                );
            }
        }
    }
    s.finish().await;
}

/// Per-key request rate: over `rpm` in a minute, a 429 with `Retry-After`; counted per key
/// name (never the key) in metrics; with `protect_ops`, `/health` needs a key too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_limit_the_rate_and_can_protect_operations() {
    let s = Stack::start(Opts {
        auth: dynamo_actors::frontend::auth::AuthSettings {
            keys: vec!["sk-rate".into()],
            rpm: Some(2),
            protect_ops: true,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let call = || async {
        s.http
            .post(format!("{}/v1/chat/completions", s.base))
            .bearer_auth("sk-rate")
            .json(&chat("x"))
            .send()
            .await
            .unwrap()
    };
    assert_eq!(call().await.status(), 200);
    assert_eq!(call().await.status(), 200);
    let third = call().await;
    assert_eq!(third.status(), 429);
    let wait: u64 = third.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    let body: Value = third.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains("key-1"),
        "{body}"
    );
    let (status, _) = s.get("/health").await;
    assert_eq!(status, 401);
    let metrics = s
        .http
        .get(format!("{}/metrics", s.base))
        .bearer_auth("sk-rate")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "dynamo_frontend_api_key_requests_total{key=\"key-1\",outcome=\"rate_limited\"}"
        ),
        "{metrics}"
    );
    assert!(!metrics.contains("sk-rate"));
    s.finish().await;
}
