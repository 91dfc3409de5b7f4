//! The dialects' parsing, and the engine against a scripted HTTP server on loopback (each
//! connection answers from a script: a health check, a stream of SSE events, an error, a
//! stall), so failures, cancellation and health are seen as a worker sees them.

use std::sync::Mutex;

use dynamo_protocols::llm::{SamplingOptions, StopConditions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

#[test]
fn prometheus_gauges_are_read_and_summed_over_label_sets() {
    let text = "\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3.0
vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 2.0
vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 4.0
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.25
vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"2048\",enable_prefix_caching=\"True\"} 1.0
vllm:num_requests_swapped NaN
";
    let g = parse_metrics(ServerKind::Vllm, text);
    assert_eq!(g.running, Some(5.0));
    assert_eq!(g.waiting, Some(4.0));
    assert_eq!(g.usage, Some(0.25));
    assert_eq!(g.total_blocks, Some(2048));
    let g = parse_metrics(
        ServerKind::Llamacpp,
        "llamacpp:requests_processing 2\nllamacpp:requests_deferred 1\n",
    );
    assert_eq!(
        (g.running, g.waiting, g.usage),
        (Some(2.0), Some(1.0), None)
    );
    let g = parse_metrics(
        ServerKind::Sglang,
        "sglang:num_running_reqs{x=\"y\"} 7\ngarbage\n{\n",
    );
    assert_eq!(g.running, Some(7.0));
    // Another server's series are not this one's.
    let g = parse_metrics(ServerKind::Sglang, text);
    assert_eq!((g.running, g.total_blocks), (None, None));
}

#[test]
fn sse_lines_are_split_across_chunks() {
    let mut s = SseLines { buf: Vec::new() };
    assert!(s.push(b"data: {\"a\"").is_empty());
    assert_eq!(
        s.push(b":1}\r\n\r\nevent: x\ndata:[DONE]\n"),
        ["{\"a\":1}", "[DONE]"]
    );
}

#[test]
fn each_dialect_s_pieces_give_token_ids_and_finish_reasons() {
    let v = json!({"choices": [{"index": 0, "text": "hi", "token_ids": [5, 6], "finish_reason": null}]});
    assert_eq!(
        parse_piece(ServerKind::Vllm, &v, 0).unwrap(),
        Piece {
            tokens: vec![5, 6],
            finish: None
        }
    );
    let v = json!({"choices": [{"text": "", "token_ids": [], "finish_reason": "length"}]});
    assert_eq!(
        parse_piece(ServerKind::Vllm, &v, 2).unwrap().finish,
        Some(FinishReason::Length)
    );
    // Bad input: text without ids, and ids that are not ids.
    let v = json!({"choices": [{"text": "hi", "finish_reason": null}]});
    let e = parse_piece(ServerKind::Vllm, &v, 0).unwrap_err();
    assert!(e.contains("without token ids"), "{e}");
    let v = json!({"choices": [{"text": "hi", "token_ids": ["a"]}]});
    assert!(parse_piece(ServerKind::Vllm, &v, 0).is_err());
    // SGLang: cumulative ids keep only the new tail; incremental ones are taken whole.
    let v = json!({"output_ids": [1, 2, 3], "meta_info": {"completion_tokens": 3, "finish_reason": null}});
    assert_eq!(parse_piece(ServerKind::Sglang, &v, 2).unwrap().tokens, [3]);
    let v = json!({"output_ids": [3], "meta_info": {"completion_tokens": 3, "finish_reason": {"type": "length", "length": 3}}});
    let p = parse_piece(ServerKind::Sglang, &v, 2).unwrap();
    assert_eq!((p.tokens, p.finish), (vec![3], Some(FinishReason::Length)));
    // llama.cpp.
    let v = json!({"content": "x", "tokens": [9], "stop": false});
    assert_eq!(
        parse_piece(ServerKind::Llamacpp, &v, 0).unwrap().tokens,
        [9]
    );
    let v = json!({"content": "", "tokens": [], "stop": true, "stop_type": "limit"});
    assert_eq!(
        parse_piece(ServerKind::Llamacpp, &v, 0).unwrap().finish,
        Some(FinishReason::Length)
    );
    let v = json!({"content": "x", "stop": false});
    assert!(parse_piece(ServerKind::Llamacpp, &v, 0).is_err());
    let v = json!({"error": {"message": "boom"}});
    assert!(parse_piece(ServerKind::Llamacpp, &v, 0).is_err());
}

/// What one connection to the scripted server does.
#[derive(Clone)]
enum Answer {
    /// 200 with these SSE `data:` payloads, then the connection closes (or stays open with
    /// `hold`, until the client leaves).
    Events {
        events: Vec<String>,
        hold: bool,
    },
    Status(u16, &'static str),
}

/// A loopback HTTP server: health checks answer 200 while `up`; every other request takes
/// the next scripted answer and is recorded (path and JSON body).
struct Scripted {
    url: String,
    up: Arc<std::sync::atomic::AtomicBool>,
    seen: Arc<Mutex<Vec<(String, Value)>>>,
    /// Fires when a held stream's client went away.
    left: Arc<tokio::sync::Notify>,
}

async fn read_request(sock: &mut TcpStream) -> Option<(String, String, Value)> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        let n = sock.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut first = head.lines().next()?.split_whitespace();
    let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = sock.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let body = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or(Value::Null);
    Some((method, path, body))
}

impl Scripted {
    async fn start(script: Vec<Answer>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let left = Arc::new(tokio::sync::Notify::new());
        let script = Arc::new(Mutex::new(script.into_iter()));
        let (up2, seen2, left2) = (up.clone(), seen.clone(), left.clone());
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let (up, seen, left, script) =
                    (up2.clone(), seen2.clone(), left2.clone(), script.clone());
                tokio::spawn(async move {
                    while let Some((_, path, body)) = read_request(&mut sock).await {
                        if path == "/health" || path == "/v1/models" {
                            let (status, body) = if up.load(Ordering::SeqCst) {
                                ("200 OK", r#"{"data":[{"id":"served-model"}]}"#)
                            } else {
                                ("503 Service Unavailable", "{}")
                            };
                            let r = format!("HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                            if sock.write_all(r.as_bytes()).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        if path == "/metrics" {
                            let _ = sock
                                .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                                .await;
                            continue;
                        }
                        seen.lock().unwrap().push((path, body));
                        let answer = script.lock().unwrap().next();
                        match answer {
                            Some(Answer::Status(code, text)) => {
                                let r = format!(
                                    "HTTP/1.1 {code} X\r\ncontent-length: {}\r\n\r\n{text}",
                                    text.len()
                                );
                                let _ = sock.write_all(r.as_bytes()).await;
                            }
                            Some(Answer::Events { events, hold }) => {
                                let mut r = String::from("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n");
                                for e in events {
                                    r.push_str(&format!("data: {e}\n\n"));
                                }
                                let _ = sock.write_all(r.as_bytes()).await;
                                if hold {
                                    // Wait until the client hangs up.
                                    let mut b = [0u8; 64];
                                    while matches!(sock.read(&mut b).await, Ok(n) if n > 0) {}
                                    left.notify_one();
                                }
                                return;
                            }
                            None => return,
                        }
                    }
                });
            }
        });
        Self {
            url,
            up,
            seen,
            left,
        }
    }

    fn settings(&self, kind: ServerKind) -> OpenAiSettings {
        OpenAiSettings {
            url: self.url.clone(),
            kind,
            block_size: 4,
            total_blocks: 100,
            eos_token_ids: vec![2],
            probe_interval: Duration::from_millis(50),
            probe_failures: 2,
            metrics_interval: Duration::from_millis(20),
            stall_timeout: Duration::from_millis(300),
            ..Default::default()
        }
    }
}

fn request(prompt: Vec<TokenId>, max_tokens: u32, stops: Vec<TokenId>) -> PreprocessedRequest {
    PreprocessedRequest {
        token_ids: prompt,
        sampling: SamplingOptions {
            seed: Some(7),
            ..Default::default()
        },
        stop: StopConditions {
            max_tokens,
            min_tokens: 0,
            stop_token_ids: stops,
        },
        remote_prefill: None,
        peer_prefix: None,
        resumed_tokens: 0,
    }
}

async fn collect(mut s: EngineStream) -> (Vec<TokenId>, Result<Option<FinishReason>, EngineError>) {
    let mut tokens = Vec::new();
    while let Some(item) = s.next().await {
        match item {
            Ok(o) => {
                tokens.extend(o.token_ids);
                if o.finish_reason.is_some() {
                    assert!(s.next().await.is_none(), "nothing after the finish");
                    return (tokens, Ok(o.finish_reason));
                }
            }
            Err(e) => return (tokens, Err(e)),
        }
    }
    (tokens, Ok(None))
}

fn vllm_chunk(ids: &[u32], finish: Option<&str>) -> String {
    json!({"choices": [{"index": 0, "text": "t", "token_ids": ids, "finish_reason": finish}]})
        .to_string()
}

/// A vLLM server: the request carries token ids in its dialect; ids stream back; the stop
/// token ends the stream there (what follows is not sent on) with `stop`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vllm_server_streams_token_ids_and_our_stop_conditions_hold() {
    let server = Scripted::start(vec![
        Answer::Events {
            events: vec![
                vllm_chunk(&[10, 11], None),
                vllm_chunk(&[12], None),
                vllm_chunk(&[2, 13], None),
                vllm_chunk(&[], Some("stop")),
                "[DONE]".into(),
            ],
            hold: false,
        },
        Answer::Events {
            events: vec![
                vllm_chunk(&[20, 21, 22], None),
                vllm_chunk(&[23], Some("length")),
            ],
            hold: false,
        },
    ])
    .await;
    let engine = OpenAiEngine::connect(server.settings(ServerKind::Vllm))
        .await
        .unwrap();
    assert_eq!(engine.model(), Some("served-model"));
    let s = engine
        .generate(
            request(vec![1, 5, 6], 16, vec![2]),
            CancellationToken::new(),
        )
        .unwrap();
    assert_eq!(
        collect(s).await,
        (vec![10, 11, 12, 2], Ok(Some(FinishReason::Stop)))
    );
    // max_tokens is ours too, whatever the server sends.
    let s = engine
        .generate(request(vec![1, 5, 6], 2, vec![2]), CancellationToken::new())
        .unwrap();
    assert_eq!(
        collect(s).await,
        (vec![20, 21], Ok(Some(FinishReason::Length)))
    );
    let seen = server.seen.lock().unwrap().clone();
    let (path, body) = &seen[0];
    assert_eq!(path, "/v1/completions");
    assert_eq!(body["prompt"], json!([1, 5, 6]));
    assert_eq!(body["model"], json!("served-model"));
    assert_eq!(body["return_token_ids"], json!(true));
    assert_eq!(body["stop_token_ids"], json!([2]));
    assert_eq!(body["ignore_eos"], json!(false), "EOS is among the stops");
    assert_eq!(body["seed"], json!(7));
    assert_eq!(body["stream"], json!(true));
}

/// Failures, as the frontend needs them: 429 is overload (try another worker), 400 the
/// request's fault, a stream cut short or gone silent a stopped worker (migrate); a client
/// that leaves closes the upstream connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_are_typed_and_cancellation_closes_the_upstream_request() {
    let server = Scripted::start(vec![
        Answer::Status(429, "busy"),
        Answer::Status(400, "{\"error\":\"prompt too long\"}"),
        Answer::Status(500, "oops"),
        Answer::Events {
            events: vec![vllm_chunk(&[10], None)],
            hold: false,
        },
        Answer::Events {
            events: vec![vllm_chunk(&[10], None)],
            hold: true,
        },
        Answer::Events {
            events: vec![vllm_chunk(&[10], None)],
            hold: true,
        },
        Answer::Events {
            events: vec![json!({"choices": [{"text": "no ids"}]}).to_string()],
            hold: false,
        },
    ])
    .await;
    let engine = OpenAiEngine::connect(server.settings(ServerKind::Vllm))
        .await
        .unwrap();
    let go = || {
        engine
            .generate(request(vec![1, 2, 3], 8, vec![2]), CancellationToken::new())
            .unwrap()
    };
    assert!(matches!(
        collect(go()).await.1,
        Err(EngineError::Overloaded(_))
    ));
    match collect(go()).await.1 {
        Err(EngineError::BadRequest(m)) => assert!(m.contains("prompt too long"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        collect(go()).await.1,
        Err(EngineError::Stopped(_))
    ));
    // Cut short after one token: the token arrives, then the failure.
    let (tokens, end) = collect(go()).await;
    assert_eq!(tokens, [10]);
    assert!(matches!(end, Err(EngineError::Stopped(_))), "{end:?}");
    // Silent past the stall timeout.
    let (tokens, end) = collect(go()).await;
    assert_eq!(tokens, [10]);
    match end {
        Err(EngineError::Stopped(m)) => assert!(m.contains("sent nothing"), "{m}"),
        other => panic!("{other:?}"),
    }
    server.left.notified().await;
    // A client that leaves: the upstream connection closes.
    let cancel = CancellationToken::new();
    let mut s = engine
        .generate(request(vec![1, 2, 3], 8, vec![2]), cancel.clone())
        .unwrap();
    assert_eq!(s.next().await.unwrap().unwrap().token_ids, [10]);
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), server.left.notified())
        .await
        .expect("the upstream connection closes when the request is cancelled");
    // Text without ids.
    match collect(go()).await.1 {
        Err(EngineError::Stopped(m)) => assert!(m.contains("without token ids"), "{m}"),
        other => panic!("{other:?}"),
    }
    // What a dialect cannot carry is refused, not dropped.
    let mut r = request(vec![1], 4, vec![]);
    r.sampling.logprobs = Some(1);
    assert!(matches!(
        engine.generate(r, CancellationToken::new()),
        Err(EngineError::BadRequest(_))
    ));
}

/// Health: a server that stops answering fails the engine (its worker deregisters); a new
/// engine connects only once the server answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_fails_the_engine_and_a_new_one_waits_for_it() {
    let server = Scripted::start(vec![]).await;
    let settings = server.settings(ServerKind::Llamacpp);
    let engine = OpenAiEngine::connect(settings.clone()).await.unwrap();
    let mut health = engine.health().unwrap();
    assert_eq!(*health.borrow(), EngineState::Running);
    server.up.store(false, Ordering::SeqCst);
    tokio::time::timeout(
        Duration::from_secs(5),
        health.wait_for(|s| matches!(s, EngineState::Failed(_))),
    )
    .await
    .expect("the engine fails when its server stops answering")
    .unwrap();
    let connecting = tokio::spawn(OpenAiEngine::connect(settings));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !connecting.is_finished(),
        "no engine while the server is down"
    );
    server.up.store(true, Ordering::SeqCst);
    let again = tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .expect("connects once the server is back")
        .unwrap()
        .unwrap();
    assert_eq!(*again.health().unwrap().borrow(), EngineState::Running);
    // No /metrics here: the load report's blocks are the settings'.
    let load = again.kv().unwrap().load();
    assert_eq!(load.borrow().total_blocks, 100);
}

/// The llama.cpp and SGLang dialects on the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llamacpp_and_sglang_requests_carry_token_ids_in_their_dialects() {
    let server = Scripted::start(vec![
        Answer::Events {
            events: vec![
                json!({"content": "a", "tokens": [30], "stop": false}).to_string(),
                json!({"content": "", "tokens": [], "stop": true, "stop_type": "eos"}).to_string(),
            ],
            hold: false,
        },
        Answer::Events {
            events: vec![
                json!({"text": "a", "output_ids": [40], "meta_info": {"completion_tokens": 1, "finish_reason": null}}).to_string(),
                json!({"text": "ab", "output_ids": [40, 41], "meta_info": {"completion_tokens": 2, "finish_reason": {"type": "length"}}}).to_string(),
                "[DONE]".into(),
            ],
            hold: false,
        },
    ])
    .await;
    let engine = OpenAiEngine::connect(server.settings(ServerKind::Llamacpp))
        .await
        .unwrap();
    let s = engine
        .generate(request(vec![1, 9], 8, vec![2]), CancellationToken::new())
        .unwrap();
    assert_eq!(collect(s).await, (vec![30], Ok(Some(FinishReason::Stop))));
    let mut r = request(vec![1, 9], 8, vec![2]);
    r.stop.min_tokens = 3;
    assert!(
        matches!(engine.generate(r, CancellationToken::new()), Err(EngineError::BadRequest(m)) if m.contains("min_tokens")),
        "llama.cpp cannot hold off EOS"
    );
    let sglang = OpenAiEngine::connect(server.settings(ServerKind::Sglang))
        .await
        .unwrap();
    // The user asked to ignore EOS (no EOS among the stops): the server is told so.
    let s = sglang
        .generate(request(vec![1, 9], 8, vec![]), CancellationToken::new())
        .unwrap();
    assert_eq!(
        collect(s).await,
        (vec![40, 41], Ok(Some(FinishReason::Length)))
    );
    let seen = server.seen.lock().unwrap().clone();
    assert_eq!(seen[0].0, "/completion");
    assert_eq!(seen[0].1["prompt"], json!([1, 9]));
    assert_eq!(seen[0].1["return_tokens"], json!(true));
    assert_eq!(seen[0].1["n_predict"], json!(8));
    assert_eq!(seen[0].1["ignore_eos"], json!(false));
    assert_eq!(seen[1].0, "/generate");
    assert_eq!(seen[1].1["input_ids"], json!([1, 9]));
    assert_eq!(seen[1].1["sampling_params"]["max_new_tokens"], json!(8));
    assert_eq!(seen[1].1["sampling_params"]["ignore_eos"], json!(true));
}

/// Ids as text `<id>`, for a generic server.
struct Angle;

impl TextCodec for Angle {
    fn decode(&self, ids: &[TokenId]) -> String {
        ids.iter().map(|t| format!("<{t}>")).collect()
    }

    fn encode(&self, text: &str) -> Vec<TokenId> {
        text.split('<')
            .filter_map(|p| p.strip_suffix('>').and_then(|n| n.parse().ok()))
            .collect()
    }
}

/// A generic server: the prompt goes as text, the answer's text is re-tokenized, and a token
/// split across chunks comes out once, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generic_server_gets_text_and_its_text_is_re_tokenized() {
    let chunk = |text: &str, finish: Option<&str>| {
        json!({"choices": [{"index": 0, "text": text, "finish_reason": finish}]}).to_string()
    };
    let server = Scripted::start(vec![Answer::Events {
        events: vec![
            chunk("<5", None),
            chunk("0><6", None),
            chunk("1>", None),
            chunk("<7>", Some("length")),
        ],
        hold: false,
    }])
    .await;
    let mut settings = server.settings(ServerKind::Generic);
    assert!(
        OpenAiEngine::connect(settings.clone()).await.is_err(),
        "a generic server needs a codec"
    );
    settings.codec = Some(Arc::new(Angle));
    let engine = OpenAiEngine::connect(settings).await.unwrap();
    let s = engine
        .generate(request(vec![1, 2], 8, vec![2]), CancellationToken::new())
        .unwrap();
    assert_eq!(
        collect(s).await,
        (vec![50, 61, 7], Ok(Some(FinishReason::Length)))
    );
    let seen = server.seen.lock().unwrap().clone();
    assert_eq!(seen[0].1["prompt"], json!("<1><2>"));
    assert_eq!(seen[0].1["model"], json!("served-model"));
}
