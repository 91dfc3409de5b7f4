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
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use dynamo_protocols::openai::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, Completion,
    CompletionChoice, Delta, ModelList, ModelObject, Usage,
};
use futures::{Stream, StreamExt};
use http_body_util::BodyExt;
use serde::Serialize;
use serde_json::{json, Value};

use dynamo_preprocessor::{LogprobEntry, Piece};

use super::metrics::Endpoint;
use super::serving::{ApiError, Generation, Serving};
use dynamo_runtime::InstanceId;

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
    /// Responses kept for the Responses API's `previous_response_id`.
    pub responses: super::responses::ResponseStore,
}

pub(crate) fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/messages", post(super::anthropic::messages))
        .route("/v1/responses", post(super::responses::responses))
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

pub(super) fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

pub(super) fn error_response(e: &ApiError) -> Response {
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

/// A request to a generating route, admitted and read: its in-flight permit, its JSON body
/// and the client's request id. Admission (the in-flight limit) comes before the body is
/// read: a client over the limit costs a 429, not the memory and time of its body.
pub(super) async fn admit_and_read(
    state: &Arc<HttpState>,
    req: Request,
    endpoint: Endpoint,
) -> Result<(super::serving::Permit, Value, Option<String>), ApiError> {
    let request_id = match req
        .headers()
        .get(REQUEST_ID_HEADER)
        .map(HeaderValue::to_str)
    {
        None => None,
        Some(Ok(id)) => Some(id.to_string()),
        Some(Err(_)) => {
            return Err(ApiError::bad_request(
                "the x-request-id header must be printable ASCII",
                Some(REQUEST_ID_HEADER),
            ))
        }
    };
    let permit = match state.serving.admit_unread(endpoint) {
        Ok(p) => p,
        Err(e) => {
            // The 429 goes at once; meanwhile the body is read and dropped as it comes (never
            // held), so a client still sending it reads the 429 instead of a reset.
            let most = state.max_body_bytes.saturating_mul(DRAIN_FACTOR);
            tokio::spawn(tokio::time::timeout(DISCARD_FOR, discard_body(most, req)));
            return Err(e);
        }
    };
    let body = read_json(state, req).await?;
    Ok((permit, body, request_id))
}

/// A request of an API with one answer per request (Responses, Messages), started: it is
/// admitted and read, mapped onto a chat request by `map` (which also returns what the
/// caller keeps of it), and started. Returns the generation, what `map` kept, and the
/// client's request id.
pub(super) async fn start_mapped<T>(
    state: &Arc<HttpState>,
    req: Request,
    map: impl FnOnce(&Value) -> Result<(Value, T), ApiError>,
) -> Result<(Generation, T, Option<String>), ApiError> {
    let (permit, body, request_id) = admit_and_read(state, req, Endpoint::Chat).await?;
    let (chat, kept) = map(&body)?;
    let mut gens = state
        .serving
        .start_admitted(permit, Endpoint::Chat, chat, request_id.as_deref())
        .await?;
    if gens.len() != 1 {
        return Err(ApiError::new(
            500,
            "internal_error",
            "the request started other than one sequence",
        ));
    }
    Ok((gens.remove(0), kept, request_id))
}

/// Adds the serving workers' and the client's ids to a response's headers.
pub(super) fn with_ids(
    mut response: Response,
    first: Option<(InstanceId, Option<InstanceId>)>,
    request_id: Option<&str>,
) -> Response {
    if let Some((worker, prefill)) = first {
        if let Ok(w) = HeaderValue::from_str(&worker.to_string()) {
            response.headers_mut().insert(WORKER_HEADER, w);
        }
        if let Some(p) = prefill.and_then(|p| HeaderValue::from_str(&p.to_string()).ok()) {
            response.headers_mut().insert(PREFILL_WORKER_HEADER, p);
        }
    }
    if let Some(id) = request_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    response
}

async fn generate(state: Arc<HttpState>, req: Request, endpoint: Endpoint) -> Response {
    let (permit, body, request_id) = match admit_and_read(&state, req, endpoint).await {
        Ok(x) => x,
        Err(e) => return error_response(&e),
    };
    let gens = match state
        .serving
        .start_admitted(permit, endpoint, body, request_id.as_deref())
        .await
    {
        Ok(g) => g,
        Err(e) => return error_response(&e),
    };
    // The first choice's workers name the response's (with n > 1 or a batch, the others'
    // may differ).
    let Some(first) = gens.first() else {
        return error_response(&ApiError::new(
            500,
            "internal_error",
            "the request started no sequence",
        ));
    };
    let ids = Some((first.worker, first.prefill_worker));
    let response = if first.prepared.stream {
        sse(gens, endpoint).into_response()
    } else {
        match whole(gens, endpoint).await {
            Ok(r) => r,
            Err(e) => return error_response(&e),
        }
    };
    with_ids(response, ids, request_id.as_deref())
}

/// What every chunk of a response shares.
struct Head {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    /// A streamed chunk's JSON before and after its one choice, serialized once per
    /// response: a token's chunk then costs only its choice.
    around: (String, String),
}

impl Head {
    fn of(gen: &Generation, endpoint: Endpoint) -> Self {
        Self::new(gen.id.clone(), gen.created, gen.model.clone(), endpoint)
    }

    fn new(id: String, created: u64, model: String, endpoint: Endpoint) -> Self {
        let mut head = Self {
            id,
            created,
            model,
            endpoint,
            around: Default::default(),
        };
        let empty = match endpoint {
            Endpoint::Chat => {
                let mut c = head.chat_chunk(0, Delta::default(), None, None);
                c.choices.clear();
                serde_json::to_string(&c)
            }
            Endpoint::Completions => serde_json::to_string(&head.completion(Vec::new())),
        }
        .unwrap_or_default();
        // The id, model and object come before `choices` (the model name is escaped, so no
        // `"choices":[]` of its own can match); `usage`, absent here, would come after.
        const CHOICES: &str = "\"choices\":[]";
        if let Some(at) = empty.rfind(CHOICES) {
            let split = at + CHOICES.len() - 1;
            head.around = (empty[..split].to_string(), empty[split..].to_string());
        }
        head
    }

    /// The SSE event of a chunk holding one choice: the shared JSON around the choice's.
    fn one_choice(&self, choice: &impl Serialize) -> Bytes {
        let (before, after) = &self.around;
        sse_event(before.len() + after.len() + 128, |buf| {
            buf.extend_from_slice(before.as_bytes());
            serde_json::to_writer(&mut *buf, choice)?;
            buf.extend_from_slice(after.as_bytes());
            Ok(())
        })
    }

    fn chat_chunk(
        &self,
        index: u32,
        delta: Delta,
        finish: Option<&str>,
        logprobs: Option<Value>,
    ) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: format!("chatcmpl-{}", self.id),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChatChunkChoice {
                index,
                delta,
                finish_reason: finish.map(str::to_string),
                logprobs,
            }],
            usage: None,
        }
    }

    fn completion(&self, choices: Vec<CompletionChoice>) -> Completion {
        Completion {
            id: format!("cmpl-{}", self.id),
            object: "text_completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: None,
        }
    }

    /// One streamed chunk of choice `index`: its new text, reasoning and tool calls (chat;
    /// `first_call` is the index of the first of `calls` in the choice), finish reason and
    /// logprobs.
    fn chunk(
        &self,
        index: u32,
        piece: Piece,
        first_call: usize,
        finish: Option<&str>,
        logprobs: Option<Value>,
    ) -> Bytes {
        match self.endpoint {
            Endpoint::Chat => {
                let calls: Vec<Value> = piece
                    .tool_calls
                    .iter()
                    .enumerate()
                    .map(|(i, c)| c.to_openai(Some(first_call + i)))
                    .collect();
                self.one_choice(&ChatChunkChoice {
                    index,
                    delta: Delta {
                        role: None,
                        content: (!piece.text.is_empty()).then_some(piece.text),
                        reasoning_content: (!piece.reasoning.is_empty()).then_some(piece.reasoning),
                        tool_calls: (!calls.is_empty()).then_some(calls),
                    },
                    finish_reason: finish.map(str::to_string),
                    logprobs,
                })
            }
            Endpoint::Completions => self.one_choice(&CompletionChoice {
                index,
                text: piece.text,
                finish_reason: finish.map(str::to_string),
                logprobs,
            }),
        }
    }

    /// The last chunk with `stream_options.include_usage`: usage and no choices.
    fn usage_chunk(&self, usage: Usage) -> Bytes {
        match self.endpoint {
            Endpoint::Chat => {
                let mut c = self.chat_chunk(0, Delta::default(), None, None);
                c.choices.clear();
                c.usage = Some(usage);
                event(&c)
            }
            Endpoint::Completions => {
                let mut c = self.completion(Vec::new());
                c.usage = Some(usage);
                event(&c)
            }
        }
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

/// The usage of a whole response: every choice's completion tokens; each prompt's tokens
/// (and cached share) once, from its first choice.
fn total_usage(parts: &[(u32, u32, Usage)]) -> Usage {
    let mut total = Usage {
        prompt_tokens: 0,
        completion_tokens: 0,
        total_tokens: 0,
        prompt_tokens_details: Some(Default::default()),
        completion_tokens_details: Some(Default::default()),
    };
    let mut cached = 0;
    for (index, n, u) in parts {
        if index % n.max(&1) == 0 {
            total.prompt_tokens += u.prompt_tokens;
            cached += u
                .prompt_tokens_details
                .as_ref()
                .map_or(0, |d| d.cached_tokens);
        }
        total.completion_tokens += u.completion_tokens;
    }
    total.total_tokens = total.prompt_tokens + total.completion_tokens;
    if let Some(d) = &mut total.prompt_tokens_details {
        d.cached_tokens = cached;
    }
    total
}

/// One SSE event, `data: <json>\n\n` (what axum's `Event::data` writes, without its copies),
/// its JSON written by `json` (an event with no data if that fails).
fn sse_event(capacity: usize, json: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>) -> Bytes {
    const DATA: &[u8] = b"data: ";
    let mut buf = Vec::with_capacity(capacity + DATA.len() + 2);
    buf.extend_from_slice(DATA);
    if json(&mut buf).is_err() {
        buf.truncate(DATA.len());
    }
    buf.extend_from_slice(b"\n\n");
    Bytes::from(buf)
}

/// `v` as one SSE event.
fn event(v: &impl Serialize) -> Bytes {
    sse_event(256, |buf| serde_json::to_writer(buf, v))
}

/// A `text/event-stream` response of already framed events; hyper writes the events that
/// are ready together in one call.
fn event_stream(events: impl Stream<Item = Bytes> + Send + 'static) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(events.map(Ok::<_, Infallible>)),
    )
        .into_response()
}

/// What one choice's stream gives the response's.
enum ChoiceOut {
    Chunk(Bytes),
    /// The choice is over: (its index, n, its usage).
    Finished(u32, u32, Usage),
    /// The request failed (an error event; the response ends after it).
    Failed(Bytes),
}

/// One choice's SSE chunks: its opening chunk (chat: the role; completions: the echoed
/// prompt, if asked), then a chunk per piece with text or a finish reason (empty pieces are
/// skipped; their logprobs go with the next chunk), then its usage.
fn choice_stream(gen: Generation, head: Arc<Head>) -> impl Stream<Item = ChoiceOut> {
    let opening = match head.endpoint {
        Endpoint::Chat => Some(event(&head.chat_chunk(
            gen.prepared.index,
            Delta {
                role: Some("assistant".into()),
                content: Some(String::new()),
                ..Default::default()
            },
            None,
            None,
        ))),
        Endpoint::Completions => gen.prepared.echo.clone().map(|t| {
            let piece = Piece {
                text: t,
                ..Default::default()
            };
            head.chunk(gen.prepared.index, piece, 0, None, None)
        }),
    };
    let opening = futures::stream::iter(opening.map(ChoiceOut::Chunk));
    // Boxed: the state moves in and out of the stream's future on every chunk.
    let body = futures::stream::unfold(Some(Box::new(gen)), move |gen| {
        let head = head.clone();
        async move {
            let mut gen = gen?;
            let index = gen.prepared.index;
            let mut entries = Vec::new();
            loop {
                match gen.next().await {
                    Some(Ok(mut piece)) => {
                        let finish = piece.finish.map(|f| f.as_str());
                        entries.append(&mut piece.logprobs);
                        if piece.text.is_empty()
                            && piece.reasoning.is_empty()
                            && piece.tool_calls.is_empty()
                            && finish.is_none()
                        {
                            continue;
                        }
                        let mut offset = gen.text_offset;
                        let logprobs = logprobs_value(&gen, head.endpoint, &entries, &mut offset);
                        gen.text_offset = offset;
                        let first_call = gen.calls_sent;
                        gen.calls_sent += piece.tool_calls.len();
                        let ev = head.chunk(index, piece, first_call, finish, logprobs);
                        return Some((ChoiceOut::Chunk(ev), Some(gen)));
                    }
                    Some(Err(e)) => return Some((ChoiceOut::Failed(event(&e.body())), None)),
                    None => {
                        let out = ChoiceOut::Finished(index, gen.prepared.n, gen.usage());
                        return Some((out, None));
                    }
                }
            }
        }
    });
    opening.chain(body)
}

/// The SSE answer: every choice's chunks as their text arrives (interleaved, each naming
/// its index), a usage chunk if asked, then `[DONE]`. An error ends the answer (and, by
/// dropping them, the other choices).
fn sse(gens: Vec<Generation>, endpoint: Endpoint) -> Response {
    // Every choice of a request has its id, model and creation time: one head for all.
    let head = gens.first().map(|g| Arc::new(Head::of(g, endpoint)));
    let include_usage = gens.first().is_some_and(|g| g.prepared.include_usage);
    let choices = gens.len();
    let merged = futures::stream::select_all(
        gens.into_iter()
            .map(|g| {
                let head = head
                    .clone()
                    .unwrap_or_else(|| Arc::new(Head::of(&g, endpoint)));
                Box::pin(choice_stream(g, head))
            })
            .collect::<Vec<_>>(),
    );
    struct State<S> {
        merged: S,
        usage: Vec<(u32, u32, Usage)>,
        /// The last events, once every choice is over or one failed.
        tail: Option<std::vec::IntoIter<Bytes>>,
    }
    let state = State {
        merged,
        usage: Vec::new(),
        tail: None,
    };
    let stream = futures::stream::unfold(state, move |mut st| {
        let head = head.clone();
        async move {
            let done = || Bytes::from_static(b"data: [DONE]\n\n");
            loop {
                if let Some(tail) = &mut st.tail {
                    let next = tail.next();
                    return next.map(|ev| (ev, st));
                }
                match st.merged.next().await {
                    Some(ChoiceOut::Chunk(ev)) => return Some((ev, st)),
                    Some(ChoiceOut::Failed(ev)) => st.tail = Some(vec![ev, done()].into_iter()),
                    Some(ChoiceOut::Finished(index, n, usage)) => {
                        st.usage.push((index, n, usage));
                        if st.usage.len() == choices {
                            let mut tail = Vec::new();
                            if let (true, Some(h)) = (include_usage, &head) {
                                tail.push(h.usage_chunk(total_usage(&st.usage)));
                            }
                            tail.push(done());
                            st.tail = Some(tail.into_iter());
                        }
                    }
                    None => st.tail = Some(vec![done()].into_iter()),
                }
            }
        }
    });
    event_stream(stream)
}

/// One choice, whole: its text (after the echoed prompt, if asked), finish reason,
/// logprobs and usage.
struct WholeChoice {
    index: u32,
    text: String,
    reasoning: String,
    calls: Vec<Value>,
    finish: Option<String>,
    logprobs: Option<Value>,
    usage: (u32, u32, Usage),
}

async fn whole_choice(mut gen: Generation, endpoint: Endpoint) -> Result<WholeChoice, ApiError> {
    let mut text = gen.prepared.echo.clone().unwrap_or_default();
    let (mut reasoning, mut calls) = (String::new(), Vec::new());
    let mut finish = None;
    let mut entries = Vec::new();
    while let Some(piece) = gen.next().await {
        let piece = piece?;
        text.push_str(&piece.text);
        reasoning.push_str(&piece.reasoning);
        calls.extend(piece.tool_calls.iter().map(|c| c.to_openai(None)));
        entries.extend(piece.logprobs);
        if let Some(f) = piece.finish {
            finish = Some(f.as_str().to_string());
        }
    }
    let logprobs = logprobs_value(&gen, endpoint, &entries, &mut 0);
    let index = gen.prepared.index;
    Ok(WholeChoice {
        index,
        text,
        reasoning,
        calls,
        finish,
        logprobs,
        usage: (index, gen.prepared.n, gen.usage()),
    })
}

/// The whole answer as one JSON body: every choice, in index order.
async fn whole(gens: Vec<Generation>, endpoint: Endpoint) -> Result<Response, ApiError> {
    let head = match gens.first() {
        Some(g) => Head::of(g, endpoint),
        None => return Err(ApiError::new(500, "internal_error", "no sequence started")),
    };
    let mut choices =
        futures::future::try_join_all(gens.into_iter().map(|g| whole_choice(g, endpoint))).await?;
    choices.sort_by_key(|c| c.index);
    let usage = total_usage(&choices.iter().map(|c| c.usage).collect::<Vec<_>>());
    Ok(match endpoint {
        Endpoint::Chat => json_response(
            StatusCode::OK,
            &ChatCompletion {
                id: format!("chatcmpl-{}", head.id),
                object: "chat.completion".into(),
                created: head.created,
                model: head.model.clone(),
                choices: choices
                    .into_iter()
                    .map(|c| ChatChoice {
                        index: c.index,
                        message: AssistantMessage {
                            role: "assistant".into(),
                            // Only calls: content is null, as OpenAI's.
                            content: (!c.text.is_empty() || c.calls.is_empty()).then_some(c.text),
                            reasoning_content: (!c.reasoning.is_empty()).then_some(c.reasoning),
                            tool_calls: (!c.calls.is_empty()).then_some(c.calls),
                        },
                        finish_reason: c.finish,
                        logprobs: c.logprobs,
                    })
                    .collect(),
                usage,
            },
        ),
        Endpoint::Completions => {
            let mut c = head.completion(
                choices
                    .into_iter()
                    .map(|c| CompletionChoice {
                        index: c.index,
                        text: c.text,
                        finish_reason: c.finish,
                        logprobs: c.logprobs,
                    })
                    .collect(),
            );
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

#[cfg(test)]
mod tests {
    use super::*;
    use dynamo_preprocessor::tools::ToolCall;

    /// A streamed chunk, built around its one choice, is byte for byte the whole chunk
    /// serialized as one SSE event, for every kind of piece and both endpoints (a model name
    /// that looks like the split point included).
    #[test]
    fn a_streamed_chunk_is_the_whole_chunk_as_one_event() {
        let pieces = || {
            vec![
                (
                    Piece {
                        text: "Hello, \"world\"\n\u{e9}".into(),
                        ..Default::default()
                    },
                    None,
                    None,
                ),
                (Piece::default(), Some("length"), None),
                (
                    Piece {
                        reasoning: "hmm".into(),
                        text: "ok".into(),
                        ..Default::default()
                    },
                    Some("stop"),
                    Some(json!({"content": [{"token": "ok", "logprob": -0.5}], "refusal": null})),
                ),
                (
                    Piece {
                        tool_calls: vec![ToolCall {
                            id: "call_1".into(),
                            name: "get".into(),
                            arguments: "{\"a\":1}".into(),
                        }],
                        ..Default::default()
                    },
                    Some("tool_calls"),
                    None,
                ),
            ]
        };
        for endpoint in [Endpoint::Chat, Endpoint::Completions] {
            for model in ["small", "m\",\"choices\":[]"] {
                let head = Head::new("abc123".into(), 1_700_000_000, model.into(), endpoint);
                for (i, (piece, finish, logprobs)) in pieces().into_iter().enumerate() {
                    let index = i as u32;
                    let whole = match endpoint {
                        Endpoint::Chat => {
                            let calls: Vec<Value> = piece
                                .tool_calls
                                .iter()
                                .enumerate()
                                .map(|(j, c)| c.to_openai(Some(2 + j)))
                                .collect();
                            event(
                                &head.chat_chunk(
                                    index,
                                    Delta {
                                        role: None,
                                        content: (!piece.text.is_empty())
                                            .then(|| piece.text.clone()),
                                        reasoning_content: (!piece.reasoning.is_empty())
                                            .then(|| piece.reasoning.clone()),
                                        tool_calls: (!calls.is_empty()).then_some(calls),
                                    },
                                    finish,
                                    logprobs.clone(),
                                ),
                            )
                        }
                        Endpoint::Completions => event(&head.completion(vec![CompletionChoice {
                            index,
                            text: piece.text.clone(),
                            finish_reason: finish.map(str::to_string),
                            logprobs: logprobs.clone(),
                        }])),
                    };
                    let streamed = head.chunk(index, piece, 2, finish, logprobs);
                    assert_eq!(
                        std::str::from_utf8(&streamed).unwrap(),
                        std::str::from_utf8(&whole).unwrap()
                    );
                    let json = streamed
                        .strip_prefix(b"data: ")
                        .and_then(|b| b.strip_suffix(b"\n\n"))
                        .expect("one SSE data event");
                    let v: Value = serde_json::from_slice(json).unwrap();
                    assert_eq!(v["model"], model);
                    assert_eq!(v["choices"][0]["index"], index);
                }
            }
        }
    }
}
