//! The OpenAI HTTP API (axum): `/v1/chat/completions` and `/v1/completions` (JSON or SSE),
//! `/v1/models`, `/health`, `/live`, `/metrics`, and the status page (`/status`, `/status.json`).
//!
//! Every error is an OpenAI error body with a 4xx/5xx status. Bodies over the configured limit
//! get 413 without being read whole. A client that disconnects drops its response stream,
//! which drops the [`Generation`] and cancels the request on the worker.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use dynamo_protocols::openai::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, Completion,
    CompletionChoice, Delta, ModelList, ModelObject,
};
use futures::Stream;
use http_body_util::BodyExt;
use serde::Serialize;
use serde_json::{json, Value};

use dynamo_preprocessor::LogprobEntry;

use super::metrics::Endpoint;
use super::serving::{ApiError, Generation, Serving};

/// Response header naming the worker instance that served the request.
pub const WORKER_HEADER: &str = "x-dynamo-instance-id";
/// The prefill worker of a request whose prompt was prefilled on another worker.
pub const PREFILL_WORKER_HEADER: &str = "x-dynamo-prefill-instance-id";
/// Request header with the client's id for the request, echoed in the response.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

pub(crate) struct HttpState {
    pub serving: Arc<Serving>,
    pub max_body_bytes: usize,
    pub render_metrics: Box<dyn Fn() -> String + Send + Sync>,
    pub status: Arc<super::status::Board>,
    pub membership: crate::membership::MembershipHandle,
}

pub(crate) fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/health", get(health))
        .route("/live", get(live))
        .route("/metrics", get(metrics))
        .route("/status", get(status_page))
        .route("/status.json", get(status_json))
        .fallback(not_found)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json_response(status, &e.body());
    if let Some(s) = e.retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

async fn not_found(req: Request) -> Response {
    error_response(&ApiError::new(
        404,
        "invalid_request_error",
        format!("no route for {} {}", req.method(), req.uri().path()),
    ))
}

async fn wrong_method(req: Request) -> Response {
    error_response(&ApiError::new(
        405,
        "invalid_request_error",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    ))
}

/// How much of an oversize body is read and discarded so the client, still sending, sees the
/// 413 rather than a reset connection; past this the connection is dropped.
const DRAIN_FACTOR: usize = 8;

/// How long a refused request's body is read (and dropped) at most.
const DISCARD_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads a refused request's body without keeping it, up to `most` bytes (past that the
/// connection is dropped).
async fn discard_body(most: usize, req: Request) {
    let mut body = req.into_body();
    let mut seen = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            seen += data.len();
            if seen > most {
                break;
            }
        }
    }
}

/// Reads and parses the body, refusing oversize bodies and invalid JSON.
async fn read_json(state: &HttpState, req: Request) -> Result<Value, ApiError> {
    let limit = state.max_body_bytes;
    let mut body = req.into_body();
    let mut bytes = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::bad_request(format!("cannot read the request body: {e}"), None)
        })?;
        if let Some(data) = frame.data_ref() {
            seen += data.len();
            if seen <= limit {
                bytes.extend_from_slice(data);
            } else if seen > limit.saturating_mul(DRAIN_FACTOR) {
                break;
            }
        }
    }
    if seen > limit {
        let mut e = ApiError::new(
            413,
            "invalid_request_error",
            format!("the request body is over the limit of {limit} bytes"),
        );
        e.code = Some("request_too_large");
        return Err(e);
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}"), None))
}

async fn chat(State(state): State<Arc<HttpState>>, req: Request) -> Response {
    generate(state, req, Endpoint::Chat).await
}

async fn completions(State(state): State<Arc<HttpState>>, req: Request) -> Response {
    generate(state, req, Endpoint::Completions).await
}

async fn generate(state: Arc<HttpState>, req: Request, endpoint: Endpoint) -> Response {
    let request_id = match req
        .headers()
        .get(REQUEST_ID_HEADER)
        .map(HeaderValue::to_str)
    {
        None => None,
        Some(Ok(id)) => Some(id.to_string()),
        Some(Err(_)) => {
            return error_response(&ApiError::bad_request(
                "the x-request-id header must be printable ASCII",
                Some(REQUEST_ID_HEADER),
            ))
        }
    };
    // Admitted (in-flight limit) before the body is read: a client over the limit costs a
    // 429, not the memory and time of its body.
    let permit = match state.serving.admit_unread(endpoint) {
        Ok(p) => p,
        Err(e) => {
            // The 429 goes at once; meanwhile the body is read and dropped as it comes (never
            // held), so a client still sending it reads the 429 instead of a reset.
            let most = state.max_body_bytes.saturating_mul(DRAIN_FACTOR);
            tokio::spawn(tokio::time::timeout(DISCARD_FOR, discard_body(most, req)));
            return error_response(&e);
        }
    };
    let body = match read_json(&state, req).await {
        Ok(b) => b,
        Err(e) => return error_response(&e),
    };
    let gen = match state
        .serving
        .start_admitted(permit, endpoint, body, request_id.as_deref())
        .await
    {
        Ok(g) => g,
        Err(e) => return error_response(&e),
    };
    let worker = HeaderValue::from_str(&gen.worker.to_string()).ok();
    let prefill = gen
        .prefill_worker
        .and_then(|p| HeaderValue::from_str(&p.to_string()).ok());
    let mut response = if gen.prepared.stream {
        sse(gen, endpoint).into_response()
    } else {
        match whole(gen, endpoint).await {
            Ok(r) => r,
            Err(e) => return error_response(&e),
        }
    };
    if let Some(w) = worker {
        response.headers_mut().insert(WORKER_HEADER, w);
    }
    if let Some(p) = prefill {
        response.headers_mut().insert(PREFILL_WORKER_HEADER, p);
    }
    if let Some(id) = request_id.and_then(|id| HeaderValue::from_str(&id).ok()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    response
}

fn chat_chunk(
    gen: &Generation,
    delta: Delta,
    finish: Option<&str>,
    logprobs: Option<Value>,
) -> ChatCompletionChunk {
    ChatCompletionChunk {
        id: format!("chatcmpl-{}", gen.id),
        object: "chat.completion.chunk".into(),
        created: gen.created,
        model: gen.model.clone(),
        choices: vec![ChatChunkChoice {
            index: 0,
            delta,
            finish_reason: finish.map(str::to_string),
            logprobs,
        }],
        usage: None,
    }
}

fn completion_chunk(
    gen: &Generation,
    text: String,
    finish: Option<&str>,
    logprobs: Option<Value>,
) -> Completion {
    Completion {
        id: format!("cmpl-{}", gen.id),
        object: "text_completion".into(),
        created: gen.created,
        model: gen.model.clone(),
        choices: vec![CompletionChoice {
            index: 0,
            text,
            finish_reason: finish.map(str::to_string),
            logprobs,
        }],
        usage: None,
    }
}

/// A choice's `logprobs` in the endpoint's shape, when the request asked for them. Chat:
/// `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`. Completions:
/// `{tokens, token_logprobs, top_logprobs, text_offset}`, each alternative map holding the
/// chosen token too (as OpenAI's); `offset` is the text offset of the first token (in
/// characters), advanced past these.
fn logprobs_value(
    gen: &Generation,
    endpoint: Endpoint,
    entries: &[LogprobEntry],
    offset: &mut usize,
) -> Option<Value> {
    gen.prepared.request.sampling.logprobs?;
    Some(match endpoint {
        Endpoint::Chat => {
            let one = |t: &dynamo_preprocessor::TokenInfo| json!({"token": t.text(), "logprob": t.logprob, "bytes": t.bytes});
            let content: Vec<Value> = entries
                .iter()
                .map(|e| {
                    let mut v = one(&e.token);
                    v["top_logprobs"] = e.top.iter().map(one).collect();
                    v
                })
                .collect();
            json!({"content": content, "refusal": null})
        }
        Endpoint::Completions => {
            let (mut tokens, mut lps, mut tops, mut offsets) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for e in entries {
                let text = e.token.text();
                let mut top = serde_json::Map::new();
                for t in &e.top {
                    top.entry(t.text()).or_insert(json!(t.logprob));
                }
                top.entry(text.clone()).or_insert(json!(e.token.logprob));
                offsets.push(*offset);
                *offset += text.chars().count();
                tokens.push(text);
                lps.push(e.token.logprob);
                tops.push(Value::Object(top));
            }
            json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
        }
    })
}

fn event(v: &impl Serialize) -> Event {
    Event::default().data(serde_json::to_string(v).unwrap_or_default())
}

/// The SSE answer: chunks as text arrives, a usage chunk if asked, then `[DONE]`.
enum Phase {
    Start,
    Body,
    Usage,
    Done,
    End,
}

type SseStep = Option<(Result<Event, Infallible>, (Generation, Phase))>;

/// The next event with text or a finish reason (empty pieces are skipped; their logprobs
/// go with the next event).
async fn body_event(mut gen: Generation, endpoint: Endpoint) -> SseStep {
    let mut entries = Vec::new();
    loop {
        match gen.next().await {
            Some(Ok(piece)) => {
                let finish = piece.finish.map(|f| f.as_str());
                entries.extend(piece.logprobs);
                if piece.text.is_empty() && finish.is_none() {
                    continue;
                }
                let mut offset = gen.text_offset;
                let logprobs = logprobs_value(&gen, endpoint, &entries, &mut offset);
                gen.text_offset = offset;
                let ev = match endpoint {
                    Endpoint::Chat => {
                        let content = (!piece.text.is_empty()).then_some(piece.text);
                        event(&chat_chunk(
                            &gen,
                            Delta {
                                role: None,
                                content,
                            },
                            finish,
                            logprobs,
                        ))
                    }
                    Endpoint::Completions => {
                        event(&completion_chunk(&gen, piece.text, finish, logprobs))
                    }
                };
                let next = if finish.is_some() {
                    Phase::Usage
                } else {
                    Phase::Body
                };
                return Some((Ok(ev), (gen, next)));
            }
            Some(Err(e)) => return Some((Ok(event(&e.body())), (gen, Phase::Done))),
            None => return Some((Ok(Event::default().data("[DONE]")), (gen, Phase::End))),
        }
    }
}

fn sse(gen: Generation, endpoint: Endpoint) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = futures::stream::unfold((gen, Phase::Start), move |(gen, phase)| async move {
        match phase {
            Phase::Start => {
                // Chat opens with the role; completions with the echoed prompt, if asked.
                let first = match endpoint {
                    Endpoint::Chat => Some(event(&chat_chunk(
                        &gen,
                        Delta {
                            role: Some("assistant".into()),
                            content: Some(String::new()),
                        },
                        None,
                        None,
                    ))),
                    Endpoint::Completions => gen
                        .prepared
                        .echo
                        .clone()
                        .map(|t| event(&completion_chunk(&gen, t, None, None))),
                };
                match first {
                    Some(ev) => Some((Ok(ev), (gen, Phase::Body))),
                    None => body_event(gen, endpoint).await,
                }
            }
            Phase::Body => body_event(gen, endpoint).await,
            Phase::Usage => {
                if !gen.prepared.include_usage {
                    return Some((Ok(Event::default().data("[DONE]")), (gen, Phase::End)));
                }
                let usage = Some(gen.usage());
                let ev = match endpoint {
                    Endpoint::Chat => {
                        let mut c = chat_chunk(&gen, Delta::default(), None, None);
                        c.choices.clear();
                        c.usage = usage;
                        event(&c)
                    }
                    Endpoint::Completions => {
                        let mut c = completion_chunk(&gen, String::new(), None, None);
                        c.choices.clear();
                        c.usage = usage;
                        event(&c)
                    }
                };
                Some((Ok(ev), (gen, Phase::Done)))
            }
            Phase::Done => Some((Ok(Event::default().data("[DONE]")), (gen, Phase::End))),
            Phase::End => None,
        }
    });
    Sse::new(stream)
}

/// The whole answer as one JSON body.
async fn whole(mut gen: Generation, endpoint: Endpoint) -> Result<Response, ApiError> {
    let mut text = gen.prepared.echo.clone().unwrap_or_default();
    let mut finish = None;
    let mut entries = Vec::new();
    while let Some(piece) = gen.next().await {
        let piece = piece?;
        text.push_str(&piece.text);
        entries.extend(piece.logprobs);
        if let Some(f) = piece.finish {
            finish = Some(f.as_str().to_string());
        }
    }
    let logprobs = logprobs_value(&gen, endpoint, &entries, &mut 0);
    let usage = gen.usage();
    Ok(match endpoint {
        Endpoint::Chat => json_response(
            StatusCode::OK,
            &ChatCompletion {
                id: format!("chatcmpl-{}", gen.id),
                object: "chat.completion".into(),
                created: gen.created,
                model: gen.model.clone(),
                choices: vec![ChatChoice {
                    index: 0,
                    message: AssistantMessage {
                        role: "assistant".into(),
                        content: text,
                    },
                    finish_reason: finish,
                    logprobs,
                }],
                usage,
            },
        ),
        Endpoint::Completions => {
            let mut c = completion_chunk(&gen, text, finish.as_deref(), logprobs);
            c.usage = Some(usage);
            json_response(StatusCode::OK, &c)
        }
    })
}

/// `GET /v1/models/{id}` (ids may hold slashes, as Hugging Face names do).
async fn model(
    State(state): State<Arc<HttpState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match state.serving.table().get(&id) {
        Some(m) => json_response(StatusCode::OK, &model_object(&m)),
        None => error_response(&ApiError::model_not_found(&id)),
    }
}

fn model_object(m: &super::ModelEntry) -> ModelObject {
    ModelObject {
        id: m.card.name.clone(),
        object: "model".into(),
        created: m.created,
        owned_by: "dynamo".into(),
    }
}

async fn models(State(state): State<Arc<HttpState>>) -> Response {
    let data = state
        .serving
        .table()
        .list()
        .iter()
        .map(|m| model_object(m))
        .collect();
    json_response(
        StatusCode::OK,
        &ModelList {
            object: "list".into(),
            data,
        },
    )
}

/// Ready when at least one model is served and every role of the process is healthy (see
/// `crate::supervisor`); lists every instance and each role's state.
async fn status_page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        super::status::PAGE,
    )
        .into_response()
}

async fn status_json(State(state): State<Arc<HttpState>>) -> Response {
    let members = state.membership.members().await.unwrap_or_default();
    json_response(StatusCode::OK, &state.status.snapshot(&members))
}

async fn health(State(state): State<Arc<HttpState>>) -> Response {
    let models = state.serving.table().list();
    let instances: Vec<Value> = models
        .iter()
        .flat_map(|m| {
            m.instances.iter().map(|a| {
                json!({
                    "model": m.card.name,
                    "endpoint": a.endpoint.to_string(),
                    "instance_id": a.instance.to_string(),
                })
            })
        })
        .collect();
    // The process's own checks (its supervisor's roles) count too: one meaning per process.
    let (process_ok, checks) = dynamo_runtime::telemetry::health_checks();
    let (status, code) = if models.is_empty() {
        ("no models served yet", StatusCode::SERVICE_UNAVAILABLE)
    } else if !process_ok {
        ("degraded", StatusCode::SERVICE_UNAVAILABLE)
    } else {
        ("healthy", StatusCode::OK)
    };
    json_response(
        code,
        &json!({ "status": status, "instances": instances, "inflight": state.serving.inflight(), "checks": checks }),
    )
}

async fn live() -> Response {
    json_response(StatusCode::OK, &json!({ "status": "live" }))
}

async fn metrics(State(state): State<Arc<HttpState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        Body::from((state.render_metrics)()),
    )
        .into_response()
}
