//! The frontend's request path, shared by HTTP and the terminal inputs: find the model,
//! preprocess, admit (in-flight limit), route, call the worker, and turn its token stream into
//! text pieces with usage and metrics.
//!
//! Routing retries: an instance that has no responders (it just died) is skipped and another
//! tried, up to [`MAX_ATTEMPTS`], before any token reaches the client. Errors are classified
//! once here into an [`ApiError`] with an HTTP status; worker internals never reach clients.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use dynamo_preprocessor::{OutputProcessor, Piece, Prepared, RequestError};
use dynamo_protocols::llm::{EngineOutput, FinishReason, PreprocessedRequest, TokenId};
use dynamo_protocols::openai::{
    CompletionTokensDetails, ErrorDetail, ErrorResponse, PromptTokensDetails, Usage,
};
use dynamo_runtime::rpc::{RemoteErrorKind, ResponseStream};
use dynamo_runtime::{CallOptions, InstanceId, RpcError, Runtime, Target};
use serde_json::Value;

use super::metrics::{Endpoint, RequestMetrics, Status};
use super::models::{ModelEntry, ModelTable, WorkerAddr};
use super::RouterMode;
use crate::router::{DecisionSink, KvRouter, RouteError, RouteLease};
use dynamo_protocols::kv::WorkerId;
use dynamo_protocols::llm::{PeerPrefix, RemotePrefill, WorkerKind};
use dynamo_protocols::router::{RouteRequest, RouteResponse};
use dynamo_router::PrefillPlan;
use dynamo_runtime::EndpointId;

/// Instances tried per request before giving up with 503.
pub const MAX_ATTEMPTS: usize = 3;

/// How long a request waits for a worker to join when every worker it knows failed it or
/// is gone.
const WORKER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long an instance found gone from the bus stays out of routing (longer than a
/// discovery lease, so a dead one is dropped by then; a live one comes back after it).
const SUSPECT_FOR: std::time::Duration = std::time::Duration::from_secs(15);

/// For this long after this frontend's bus connection came back, "no responders" says little:
/// live workers are still re-creating their subscriptions on the server. An instance found
/// gone then stays out of routing for [`SUSPECT_AFTER_RECONNECT`] only.
const RECONNECT_GRACE: std::time::Duration = std::time::Duration::from_secs(3);
const SUSPECT_AFTER_RECONNECT: std::time::Duration = std::time::Duration::from_secs(1);

/// Instances found gone from the bus (no responders on their subjects), kept out of every
/// request's routing until discovery drops them (their lease) or [`SUSPECT_FOR`] passes: a
/// killed worker stays listed until its lease expires. Not across a reconnection of this
/// frontend's bus connection: the server that said "no responders" is gone, and with it what
/// it knew (after a nats-server restart every worker was "gone" for a moment, and kept out
/// for 15 s the survivors of the restart took all the load).
struct Suspects {
    /// Instance -> until when it stays out, and the connection (reconnection count) that
    /// found it gone.
    gone: std::sync::Mutex<std::collections::HashMap<InstanceId, (Instant, u64)>>,
    /// The bus's reconnection count (none in process), and since when this one is seen.
    reconnections: Option<tokio::sync::watch::Receiver<u64>>,
    seen: std::sync::Mutex<(u64, Option<Instant>)>,
}

impl Suspects {
    fn new(reconnections: Option<tokio::sync::watch::Receiver<u64>>) -> Self {
        let current = reconnections.as_ref().map_or(0, |r| *r.borrow());
        Self {
            gone: Default::default(),
            reconnections,
            // The first connection is not a reconnection.
            seen: std::sync::Mutex::new((current, None)),
        }
    }

    /// The current connection, and about when it came back (first seen here).
    fn connection(&self, now: Instant) -> (u64, Option<Instant>) {
        let Some(r) = &self.reconnections else {
            return (0, None);
        };
        let current = *r.borrow();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.0 != current {
            *seen = (current, Some(now));
        }
        *seen
    }

    /// Keeps `instance` out of routing from `now`; true if it was not already, and whether
    /// the connection came back just now (then only for [`SUSPECT_AFTER_RECONNECT`]).
    fn suspect(&self, instance: InstanceId, now: Instant) -> (bool, bool) {
        let (connection, since) = self.connection(now);
        let fresh = since.is_some_and(|t| now.duration_since(t) < RECONNECT_GRACE);
        let until = now
            + match fresh {
                true => SUSPECT_AFTER_RECONNECT,
                false => SUSPECT_FOR,
            };
        let mut gone = self.gone.lock().unwrap_or_else(|p| p.into_inner());
        gone.retain(|_, (u, c)| *c == connection && now < *u);
        (gone.insert(instance, (until, connection)).is_none(), fresh)
    }

    /// The suspicions in force at `now` (on the current connection): instance, until when.
    fn in_force(&self, now: Instant) -> Vec<(InstanceId, Instant)> {
        let (connection, _) = self.connection(now);
        let gone = self.gone.lock().unwrap_or_else(|p| p.into_inner());
        gone.iter()
            .filter(|(_, (u, c))| *c == connection && now < *u)
            .map(|(i, (u, _))| (*i, *u))
            .collect()
    }

    /// When the first suspicion still in force at `now` ends.
    fn next_expiry(&self, now: Instant) -> Option<Instant> {
        self.in_force(now).into_iter().map(|(_, u)| u).min()
    }

    /// `tried` and the instances kept out at `now`.
    fn avoid(&self, tried: &[InstanceId], now: Instant) -> Vec<InstanceId> {
        let mut avoid = tried.to_vec();
        avoid.extend(self.in_force(now).into_iter().map(|(i, _)| i));
        avoid
    }
}

/// Times a streaming request may move to another worker, by default (`--migration-limit`).
pub const DEFAULT_MIGRATION_LIMIT: u32 = 3;

/// A refused or failed request, ready to become an OpenAI error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        let mut e = Self::new(400, "invalid_request_error", message);
        e.param = param.map(str::to_string);
        e
    }

    /// 404 `model_not_found`: no live worker serves `model`.
    pub(crate) fn model_not_found(model: &str) -> Self {
        let mut e = Self::new(
            404,
            "invalid_request_error",
            format!("the model {model:?} does not exist or no worker serves it; GET /v1/models lists the served models"),
        );
        e.param = Some("model".into());
        e.code = Some("model_not_found");
        e
    }

    fn unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(503, "service_unavailable", message);
        e.retry_after = Some(1);
        e
    }

    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.to_string(),
                param: self.param.clone(),
                code: self.code.map(str::to_string),
            },
        }
    }

    pub(crate) fn status_label(&self) -> Status {
        Status::from_code(self.status)
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        Self {
            status: 400,
            kind: "invalid_request_error",
            message: e.message,
            param: e.param,
            code: e.code,
            retry_after: None,
        }
    }
}

/// Classifies a call failure (`model` is for the message only).
fn rpc_error(e: &RpcError, model: &str) -> ApiError {
    match e {
        RpcError::NoResponders { .. } => ApiError::unavailable(format!(
            "no live worker serves model {model}; retry shortly"
        )),
        RpcError::Disconnected { .. } => ApiError::unavailable(format!(
            "the worker serving model {model} stopped responding; retry the request"
        )),
        RpcError::DeadlineExceeded { .. } => {
            ApiError::new(504, "timeout", "the request took longer than its deadline")
        }
        RpcError::PayloadTooLarge { size, max } => {
            let mut e = ApiError::new(
                413,
                "invalid_request_error",
                format!("the tokenized request is {size} bytes; the bus carries at most {max}"),
            );
            e.code = Some("request_too_large");
            e
        }
        RpcError::Remote(r) => match r.kind {
            RemoteErrorKind::BadRequest => ApiError::bad_request(r.message.clone(), None),
            RemoteErrorKind::Overloaded | RemoteErrorKind::Unavailable => {
                ApiError::unavailable(format!("the worker is overloaded: {}", r.message))
            }
            RemoteErrorKind::DeadlineExceeded => {
                ApiError::new(504, "timeout", "the request took longer than its deadline")
            }
            RemoteErrorKind::WorkerFailed => {
                tracing::warn!(error = %r.message, "a worker failed with a request in flight");
                let mut e = ApiError::unavailable(format!(
                    "the worker serving model {model} failed while generating; retry the request"
                ));
                e.code = Some("worker_failed");
                e
            }
            RemoteErrorKind::ResponseTooLarge | RemoteErrorKind::Internal => {
                tracing::warn!(error = %r.message, "worker failed a request");
                ApiError::new(500, "internal_error", "the worker failed the request")
            }
        },
        RpcError::Protocol(_) | RpcError::Encode(_) | RpcError::Bus(_) => {
            tracing::warn!(error = %e, "request failed on the bus");
            ApiError::new(
                500,
                "internal_error",
                "the request failed between frontend and worker",
            )
        }
    }
}

/// A router component on the bus (`--remote-router`): asked for each request's worker; the
/// request's first token and end are reported through `sink`.
pub struct RemoteRouter {
    pub endpoint: EndpointId,
    pub sink: DecisionSink,
}

/// The shared request path.
pub struct Serving {
    runtime: Runtime,
    router: Option<Arc<KvRouter>>,
    remote: Option<RemoteRouter>,
    table: Arc<ModelTable>,
    mode: RouterMode,
    max_inflight: usize,
    inflight: Arc<AtomicUsize>,
    /// Times a request may move to another worker after its first token.
    migration_limit: u32,
    suspects: Suspects,
    /// This interval's request statistics, when the frontend publishes them for the planner.
    stats: Option<Arc<super::stats::StatsWindow>>,
}

/// Text in a request (bytes of its strings, and token ids) past which it is preprocessed on a
/// blocking thread.
const LARGE_BODY: usize = 64 * 1024;

/// Whether the strings and arrays in `v` hold more than [`LARGE_BODY`] bytes and elements
/// (stops counting there).
fn body_is_large(v: &Value) -> bool {
    fn walk(v: &Value, left: &mut usize) -> bool {
        match v {
            Value::String(s) => {
                *left = left.saturating_sub(s.len());
                *left == 0
            }
            Value::Array(a) => {
                // Token ids count too: a long array of numbers is a long prompt.
                *left = left.saturating_sub(a.len());
                *left == 0 || a.iter().any(|x| walk(x, left))
            }
            Value::Object(o) => o.values().any(|x| walk(x, left)),
            _ => false,
        }
    }
    let mut left = LARGE_BODY;
    walk(v, &mut left)
}

/// Holds one in-flight slot; frees it on drop.
pub struct Permit(Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// A prompt's prefill worker and its accounting there (released at the first token).
struct Prefill {
    remote: RemotePrefill,
    _lease: RouteLease,
}

/// Where a request goes: its (decode) worker, the router's accounting there, and the prefill
/// worker when the prompt is prefilled elsewhere, or the peer to fetch its prefix from.
struct Routed {
    addr: WorkerAddr,
    lease: Option<RouteLease>,
    prefill: Option<Prefill>,
    peer: Option<PeerPrefix>,
}

impl Routed {
    fn to(addr: WorkerAddr) -> Self {
        Self {
            addr,
            lease: None,
            prefill: None,
            peer: None,
        }
    }
}

/// The router's suggested peer as the worker's request carries it: its `kv_fetch` endpoint,
/// from the peer's own address (`None` when this frontend does not know it, or it failed).
fn peer_prefix(
    entry: &ModelEntry,
    skip: &[InstanceId],
    peer: Option<(WorkerId, u32)>,
) -> Option<PeerPrefix> {
    let (worker, blocks) = peer?;
    let addr = entry
        .instances
        .iter()
        .find(|a| a.instance.as_u64() == worker.0 && !skip.contains(&a.instance))?;
    let endpoint = addr
        .endpoint
        .component
        .endpoint(WorkerKind::KV_FETCH_ENDPOINT)
        .ok()?;
    Some(PeerPrefix {
        worker: worker.0,
        endpoint: endpoint.to_string(),
        blocks,
    })
}

impl Serving {
    pub fn new(
        runtime: Runtime,
        table: Arc<ModelTable>,
        mode: RouterMode,
        max_inflight: usize,
        router: Option<Arc<KvRouter>>,
        remote: Option<RemoteRouter>,
        stats: Option<Arc<super::stats::StatsWindow>>,
    ) -> Self {
        let suspects = Suspects::new(runtime.bus().reconnections());
        Self {
            runtime,
            router,
            remote,
            table,
            mode,
            max_inflight,
            inflight: Arc::default(),
            migration_limit: DEFAULT_MIGRATION_LIMIT,
            suspects,
            stats,
        }
    }

    /// Times a request may move to another worker once it streams (0: never).
    pub fn with_migration_limit(mut self, limit: u32) -> Self {
        self.migration_limit = limit;
        self
    }

    /// The KV router (modes `kv` and `least-loaded`).
    pub fn router(&self) -> Option<&Arc<KvRouter>> {
        self.router.as_ref()
    }

    pub fn table(&self) -> &Arc<ModelTable> {
        &self.table
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// Keeps `instance` out of routing for a while: the bus says nobody is there (briefly
    /// just after this frontend's connection came back, when live workers may not have
    /// subscribed again yet). True in that case: the answer says little about the worker.
    fn suspect(&self, instance: InstanceId) -> bool {
        let (new, fresh) = self.suspects.suspect(instance, Instant::now());
        if new && !fresh {
            tracing::info!(%instance, "no responders at the instance: routing around it until discovery drops it");
        } else if new {
            tracing::info!(%instance, "no responders at the instance just after the bus came back: routing around it for a second");
        }
        fresh
    }

    /// `tried` and the instances currently suspected of being gone (on this connection).
    fn avoid(&self, tried: &[InstanceId]) -> Vec<InstanceId> {
        self.suspects.avoid(tried, Instant::now())
    }

    /// Takes an in-flight slot before anything of the request is read: over the limit, a
    /// 429 (counted, with no model label: the body that names it was not read).
    pub fn admit_unread(&self, endpoint: Endpoint) -> Result<Permit, ApiError> {
        self.admit().inspect_err(|e| {
            RequestMetrics::start(None, endpoint, 0, Instant::now(), self.stats.clone())
                .finish(e.status_label());
        })
    }

    fn admit(&self) -> Result<Permit, ApiError> {
        let prev = self.inflight.fetch_add(1, Ordering::AcqRel);
        let permit = Permit(self.inflight.clone());
        if prev >= self.max_inflight {
            let mut e = ApiError::new(
                429,
                "rate_limit_error",
                format!(
                    "the server is at its limit of {} requests in flight; retry shortly",
                    self.max_inflight
                ),
            );
            e.retry_after = Some(1);
            return Err(e);
        }
        Ok(permit)
    }

    /// Asks the router component for a worker; `None` when no router component answers (the
    /// caller then picks locally: serving on goes before routing well).
    async fn pick_remote(
        &self,
        remote: &RemoteRouter,
        entry: &ModelEntry,
        tokens: &[TokenId],
        skip: &[InstanceId],
    ) -> Option<Result<Routed, ApiError>> {
        let request = RouteRequest {
            model: entry.card.name.clone(),
            token_ids: tokens.to_vec(),
            exclude: skip.iter().map(|i| WorkerId(i.as_u64())).collect(),
            load_only: self.mode == RouterMode::LeastLoaded,
        };
        let reply = match self
            .runtime
            .client()
            .call::<_, RouteResponse>(
                Target::Any(remote.endpoint.clone()),
                &request,
                CallOptions {
                    timeout: Some(std::time::Duration::from_secs(2)),
                    ..Default::default()
                },
            )
            .await
        {
            Ok(mut stream) => stream.next().await,
            Err(e) => Some(Err(e)),
        };
        let decided = match reply {
            Some(Ok(r)) => r,
            Some(Err(RpcError::Remote(e))) if e.kind == RemoteErrorKind::Overloaded => {
                return Some(Err(ApiError::unavailable(format!(
                    "{}; retry shortly",
                    e.message
                ))))
            }
            Some(Err(e)) => {
                metrics::counter!("dynamo_frontend_router_fallbacks_total").increment(1);
                tracing::warn!(router = %remote.endpoint, error = %e, "the router component did not answer; routing this request round-robin");
                return None;
            }
            None => return None,
        };
        let lease = RouteLease::remote(remote.sink.clone(), decided.lease);
        let prefill = decided.prefill.map(|p| Prefill {
            remote: RemotePrefill {
                prefill_worker: p.worker.0,
                endpoint: p.endpoint,
            },
            _lease: RouteLease::remote(remote.sink.clone(), p.lease),
        });
        let addr = entry
            .instances
            .iter()
            .find(|a| a.instance.as_u64() == decided.worker.0 && !skip.contains(&a.instance))
            .cloned();
        let peer = peer_prefix(entry, skip, decided.peer.map(|p| (p.worker, p.blocks)));
        // None: the router knows a worker this frontend does not (yet); any live one serves.
        addr.map(|addr| {
            Ok(Routed {
                addr,
                lease: Some(lease),
                prefill,
                peer,
            })
        })
    }

    async fn route(
        &self,
        entry: &ModelEntry,
        tokens: &[TokenId],
        pinned: Option<&str>,
        skip: &[InstanceId],
    ) -> Result<Routed, ApiError> {
        if let (Some(remote), None) = (&self.remote, pinned) {
            if let Some(picked) = self.pick_remote(remote, entry, tokens, skip).await {
                return picked;
            }
            return self.pick_with(RouterMode::RoundRobin, entry, tokens, pinned, skip);
        }
        self.pick_with(self.mode, entry, tokens, pinned, skip)
    }

    fn pick_with(
        &self,
        mode: RouterMode,
        entry: &ModelEntry,
        tokens: &[TokenId],
        pinned: Option<&str>,
        skip: &[InstanceId],
    ) -> Result<Routed, ApiError> {
        if let Some(hex) = pinned {
            let param = Some("nvext.backend_instance_id");
            let id = InstanceId::parse_hex(hex).map_err(|_| {
                ApiError::bad_request(
                    format!("backend_instance_id {hex:?} is not an instance id (16 hex digits)"),
                    param,
                )
            })?;
            return entry
                .instances
                .iter()
                .find(|a| a.instance == id)
                .map(|a| Routed::to(a.clone()))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        format!("instance {hex} does not serve model {}", entry.card.name),
                        param,
                    )
                });
        }
        let live: Vec<&WorkerAddr> = entry
            .instances
            .iter()
            .filter(|a| !skip.contains(&a.instance))
            .collect();
        if live.is_empty() {
            return Err(ApiError::unavailable(format!(
                "no live worker serves model {}; retry shortly",
                entry.card.name
            )));
        }
        if let (true, Some(router)) = (mode.uses_kv_router(), &self.router) {
            let ids: Vec<WorkerId> = live.iter().map(|a| WorkerId(a.instance.as_u64())).collect();
            let bs = entry.card.kv_block_size.max(1) as usize;
            return match router.route(&ids, tokens, bs) {
                Ok(d) => {
                    let addr = live
                        .iter()
                        .find(|a| a.instance.as_u64() == d.worker.0)
                        .map(|a| (*a).clone())
                        .expect("the router picks among the candidates");
                    let prefill = match router.plan_prefill(
                        &entry.card.name,
                        d.worker,
                        d.overlap,
                        tokens,
                    ) {
                        PrefillPlan::Remote {
                            worker,
                            endpoint,
                            lease,
                        } => Some(Prefill {
                            remote: RemotePrefill {
                                prefill_worker: worker.0,
                                endpoint,
                            },
                            _lease: lease,
                        }),
                        PrefillPlan::Local(_) => None,
                    };
                    let peer = match prefill {
                        Some(_) => None,
                        None => peer_prefix(entry, skip, d.peer),
                    };
                    Ok(Routed {
                        addr,
                        lease: Some(d.lease),
                        prefill,
                        peer,
                    })
                }
                Err(RouteError::AllBusy(n)) => Err(ApiError::unavailable(format!(
                    "all {n} workers serving model {} are busy (KV cache over the busy threshold); retry shortly",
                    entry.card.name
                ))),
                Err(RouteError::NoWorkers) => Err(ApiError::unavailable(format!(
                    "no live worker serves model {}; retry shortly",
                    entry.card.name
                ))),
            };
        }
        let i = match mode {
            RouterMode::Kv | RouterMode::LeastLoaded => 0,
            RouterMode::RoundRobin => entry.cursor.fetch_add(1, Ordering::Relaxed) % live.len(),
            RouterMode::Random => rand::random_range(0..live.len()),
            RouterMode::Direct => {
                return Err(ApiError::bad_request(
                    "the router is in direct mode: name a worker in nvext.backend_instance_id",
                    Some("nvext.backend_instance_id"),
                ))
            }
        };
        Ok(Routed::to(live[i].clone()))
    }

    /// Preprocesses, routes and starts one request; the result streams its text.
    pub async fn start(
        self: &Arc<Self>,
        endpoint: Endpoint,
        body: &Value,
    ) -> Result<Generation, ApiError> {
        self.start_as(endpoint, body, None).await
    }

    /// [`Serving::start`] under the client's request id (`x-request-id`): the response's id
    /// and the request's log lines carry it. An id that is empty, longer than 128 bytes or not
    /// printable ASCII without spaces is refused.
    pub async fn start_as(
        self: &Arc<Self>,
        endpoint: Endpoint,
        body: &Value,
        request_id: Option<&str>,
    ) -> Result<Generation, ApiError> {
        let mut all = self.start_choices(endpoint, body, request_id).await?;
        match all.len() {
            1 => Ok(all.remove(0)),
            k => Err(ApiError::bad_request(
                format!("this entry point serves one sequence; the request asks for {k} (n or a batch of prompts)"),
                Some("n"),
            )),
        }
    }

    /// Starts every sequence a request asks for (`n` choices of each prompt of a batch), in
    /// choice order; each takes a place in the in-flight limit.
    pub async fn start_choices(
        self: &Arc<Self>,
        endpoint: Endpoint,
        body: &Value,
        request_id: Option<&str>,
    ) -> Result<Vec<Generation>, ApiError> {
        self.start_with(endpoint, std::borrow::Cow::Borrowed(body), request_id, None)
            .await
    }

    /// [`Serving::start_as`] for a request admitted before its body was read
    /// ([`Serving::admit_unread`]).
    pub async fn start_admitted(
        self: &Arc<Self>,
        permit: Permit,
        endpoint: Endpoint,
        body: Value,
        request_id: Option<&str>,
    ) -> Result<Vec<Generation>, ApiError> {
        self.start_with(
            endpoint,
            std::borrow::Cow::Owned(body),
            request_id,
            Some(permit),
        )
        .await
    }

    async fn start_with(
        self: &Arc<Self>,
        endpoint: Endpoint,
        body: std::borrow::Cow<'_, Value>,
        request_id: Option<&str>,
        permit: Option<Permit>,
    ) -> Result<Vec<Generation>, ApiError> {
        if let Some(id) = request_id {
            if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ApiError::bad_request(
                    "the x-request-id header must be 1 to 128 printable ASCII characters without spaces",
                    Some("x-request-id"),
                ));
            }
        }
        let started = Instant::now();
        let model = match body.get("model") {
            Some(Value::String(m)) => m.clone(),
            Some(_) => {
                return Err(ApiError::bad_request(
                    "model must be a string",
                    Some("model"),
                ))
            }
            None => {
                return Err(ApiError::bad_request(
                    "missing field `model`",
                    Some("model"),
                ))
            }
        };
        let Some(entry) = self.table.get(&model) else {
            let e = ApiError::model_not_found(&model);
            let m = RequestMetrics::start(None, endpoint, 0, started, self.stats.clone());
            m.finish(e.status_label());
            return Err(e);
        };
        let metrics_model = Some(entry.card.name.as_str());
        let fail = |e: ApiError, prompt: u32| {
            RequestMetrics::start(metrics_model, endpoint, prompt, started, self.stats.clone())
                .finish(e.status_label());
            Err(e)
        };
        let permit = match permit.map_or_else(|| self.admit(), Ok) {
            Ok(p) => p,
            Err(e) => return fail(e, 0),
        };
        // Templating and tokenizing a large prompt take milliseconds of CPU: off the async
        // runtime's worker threads, so they keep serving other requests' streams meanwhile.
        let prepared = if body_is_large(&body) {
            let (pre, body) = (entry.pre.clone(), body.into_owned());
            tokio::task::spawn_blocking(move || match endpoint {
                Endpoint::Chat => pre.chat(&body),
                Endpoint::Completions => pre.completion(&body),
            })
            .await
            .map_err(|e| {
                ApiError::new(500, "internal_error", format!("preprocessing failed: {e}"))
            })?
        } else {
            match endpoint {
                Endpoint::Chat => entry.pre.chat(&body),
                Endpoint::Completions => entry.pre.completion(&body),
            }
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => return fail(e.into(), 0),
        };
        let id =
            request_id.map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_string);
        let created = now_secs();
        let sequences = prepared.expand();
        // Every sequence after the first takes its own place in the in-flight limit, before
        // any starts: a request too big for what is left gets its 429 at once.
        let mut permits = vec![permit];
        for _ in 1..sequences.len() {
            match self.admit() {
                Ok(p) => permits.push(p),
                Err(e) => return fail(e, 0),
            }
        }
        let n = sequences[0].n.max(1) as usize;
        let mut pairs: Vec<(Prepared, Permit)> = sequences.into_iter().zip(permits).collect();
        let mut prompts = Vec::new();
        while !pairs.is_empty() {
            let rest = pairs.split_off(n.min(pairs.len()));
            prompts.push(std::mem::replace(&mut pairs, rest));
        }
        // Per prompt, its first choice starts alone; once it answers, its prompt's KV is
        // cached on its worker (and predicted there by the KV router), and the other choices
        // start together, sharing it. Prompts of a batch start in parallel.
        let (entry, model, id) = (&entry, model.as_str(), id.as_str());
        let launches = prompts.into_iter().map(|choices| async move {
            let mut choices = choices.into_iter();
            let mut all = Vec::with_capacity(n);
            let head = (id, model, created);
            if let Some((p, permit)) = choices.next() {
                all.push(
                    self.launch(entry, endpoint, p, permit, head, started, None)
                        .await?,
                );
            }
            let holder = all.first().map(|g: &Generation| g.worker);
            let rest =
                futures::future::try_join_all(choices.map(|(p, permit)| {
                    self.launch(entry, endpoint, p, permit, head, started, holder)
                }))
                .await?;
            all.extend(rest);
            Ok::<_, ApiError>(all)
        });
        Ok(futures::future::try_join_all(launches)
            .await?
            .into_iter()
            .flatten()
            .collect())
    }

    /// Routes and starts one sequence of a request (`head`: the response's id, model and
    /// creation time; `arrived`: when the request came in; `prefer`: the worker to send it
    /// to while that one serves, e.g. the one holding its prompt's KV).
    #[allow(clippy::too_many_arguments)]
    async fn launch(
        self: &Arc<Self>,
        entry: &Arc<ModelEntry>,
        endpoint: Endpoint,
        prepared: Prepared,
        permit: Permit,
        head: (&str, &str, u64),
        arrived: Instant,
        prefer: Option<InstanceId>,
    ) -> Result<Generation, ApiError> {
        let (id, model, created) = head;
        let metrics = RequestMetrics::start(
            Some(entry.card.name.as_str()),
            endpoint,
            prepared.prompt_tokens(),
            arrived,
            self.stats.clone(),
        );
        tracing::debug!(request_id = %id, model = %entry.card.name, prompt_tokens = prepared.prompt_tokens(), choice = prepared.index, "request admitted");
        let mut tried = Vec::new();
        let started = match self
            .dispatch(
                entry,
                &prepared.request,
                (prepared.instance.as_deref(), prefer),
                id,
                &mut tried,
            )
            .await
        {
            Ok(s) => s,
            Err(e) => {
                metrics.finish(e.status_label());
                return Err(e);
            }
        };
        let output = entry.pre.output(&prepared);
        let prefill_worker = started
            .first
            .as_ref()
            .and_then(|f| f.prefill_worker)
            .map(InstanceId::new);
        Ok(Generation {
            id: id.to_string(),
            model: model.to_string(),
            created,
            worker: started.worker,
            prefill_worker,
            prepared,
            output,
            stream: started.stream,
            pending: started.first,
            done: false,
            lease: started.lease,
            metrics,
            _permit: permit,
            serving: self.clone(),
            entry: entry.clone(),
            tried,
            generated: Vec::new(),
            migrations: 0,
            last_output: Instant::now(),
            text_offset: 0,
            calls_sent: 0,
        })
    }

    /// Routes `request` (never to an instance in `tried`) and calls the worker until one
    /// answers: with its first output, or a stream that ends at once. A worker that is gone
    /// (no responders, silent), failed, overloaded or shutting down is added to `tried` and
    /// another is asked, up to [`MAX_ATTEMPTS`] in all, unless the client pinned an instance.
    async fn dispatch(
        &self,
        entry: &ModelEntry,
        request: &PreprocessedRequest,
        (pinned, prefer): (Option<&str>, Option<InstanceId>),
        id: &str,
        tried: &mut Vec<InstanceId>,
    ) -> Result<Started, ApiError> {
        let model = &entry.card.name;
        let mut last_err = None;
        let mut changes = self.table.changes();
        let wait_until = tokio::time::Instant::now() + WORKER_WAIT;
        let mut attempts = 0;
        while attempts < MAX_ATTEMPTS {
            // The latest list of the model's workers (a restarted one joins under a new id).
            changes.borrow_and_update();
            let current = self.table.get(model);
            let entry = current.as_deref().unwrap_or(entry);
            let mut avoid = self.avoid(tried);
            if let Some(p) = prefer
                .filter(|p| !avoid.contains(p) && entry.instances.iter().any(|a| a.instance == *p))
            {
                // Only the preferred worker, through the same routing (its router accounts
                // for the request); should it fail, the next attempt routes as usual.
                avoid.extend(
                    entry
                        .instances
                        .iter()
                        .map(|a| a.instance)
                        .filter(|&i| i != p),
                );
            }
            if pinned.is_none() && entry.instances.iter().all(|a| avoid.contains(&a.instance)) {
                // Every worker it knows failed this request or is gone: wait (briefly) for
                // one to join rather than fail at once (a killed worker restarts in seconds),
                // or for a suspicion to end (one found just after a reconnection lasts a
                // second).
                let expiry = self
                    .suspects
                    .next_expiry(Instant::now())
                    .map(tokio::time::Instant::from_std);
                let until = expiry.map_or(wait_until, |e| e.min(wait_until));
                match tokio::time::timeout_at(until, changes.changed()).await {
                    Ok(Ok(())) => continue,
                    Err(_) if until < wait_until => continue,
                    _ => {}
                }
            }
            attempts += 1;
            let Routed {
                addr,
                lease,
                prefill,
                peer,
            } = match self.route(entry, &request.token_ids, pinned, &avoid).await {
                Ok(a) => a,
                Err(e) => {
                    last_err = Some(last_err.unwrap_or(e));
                    break;
                }
            };
            let opts = CallOptions {
                trace_id: Some(id.to_string()),
                ..Default::default()
            };
            let call = self
                .runtime
                .client()
                .call::<_, EngineOutput>(
                    Target::Instance(addr.endpoint.clone(), addr.instance),
                    &match (&prefill, peer) {
                        (Some(p), _) => std::borrow::Cow::Owned(PreprocessedRequest {
                            remote_prefill: Some(p.remote.clone()),
                            ..request.clone()
                        }),
                        (None, Some(peer)) => std::borrow::Cow::Owned(PreprocessedRequest {
                            peer_prefix: Some(peer),
                            ..request.clone()
                        }),
                        (None, None) => std::borrow::Cow::Borrowed(request),
                    },
                    opts,
                )
                .await;
            let first = match call {
                Ok(mut stream) => match stream.next().await {
                    Some(Ok(out)) => Ok((stream, Some(out))),
                    Some(Err(e)) => Err(e),
                    None => Ok((stream, None)),
                },
                Err(e) => Err(e),
            };
            // The first token ends the prompt's prefill, wherever it ran.
            drop(prefill);
            match first {
                Ok((stream, first)) => {
                    return Ok(Started {
                        worker: addr.instance,
                        stream,
                        first,
                        lease,
                    })
                }
                Err(e) => {
                    let Some(cause) = Cause::of(&e).filter(|_| pinned.is_none()) else {
                        return Err(rpc_error(&e, model));
                    };
                    // Just after the bus came back, "no responders" may be a live worker
                    // still subscribing again: kept out a second, not for this whole request.
                    let fresh = cause.gone() && self.suspect(addr.instance);
                    tracing::debug!(request_id = %id, instance = %addr.instance, error = %e, "worker unavailable; trying another");
                    metrics::counter!("dynamo_frontend_retries_total", "cause" => cause.as_str())
                        .increment(1);
                    if !fresh {
                        tried.push(addr.instance);
                    }
                    last_err = Some(rpc_error(&e, model));
                }
            }
        }
        Err(last_err.unwrap_or_else(|| {
            ApiError::unavailable(format!("no live worker serves model {model}"))
        }))
    }
}

/// A call that answered: its worker, the stream, its first output, the router's lease.
struct Started {
    worker: InstanceId,
    stream: ResponseStream<EngineOutput>,
    first: Option<EngineOutput>,
    lease: Option<RouteLease>,
}

/// Why a request moves to another worker (a label of `dynamo_frontend_migrations_total` and
/// `dynamo_frontend_retries_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// Nobody answers on its subject: the worker is gone.
    NoResponders,
    /// It went silent (heartbeats stopped, or a probe found it gone).
    Disconnected,
    /// Its engine failed with the request in flight.
    WorkerFailed,
    /// It is shutting down (draining) or its handler is gone.
    Unavailable,
    /// It has too much in flight.
    Overloaded,
    /// Its stream ended without a finish reason.
    EndedEarly,
    /// Frames were lost or garbled on the bus (a bus outage): the tokens received are known,
    /// the rest is asked of another worker.
    Protocol,
}

impl Cause {
    /// The cause when `e` is one a request survives on another worker.
    fn of(e: &RpcError) -> Option<Self> {
        Some(match e {
            RpcError::NoResponders { .. } => Cause::NoResponders,
            RpcError::Disconnected { .. } => Cause::Disconnected,
            RpcError::Protocol(_) => Cause::Protocol,
            RpcError::Remote(r) => match r.kind {
                RemoteErrorKind::WorkerFailed => Cause::WorkerFailed,
                RemoteErrorKind::Unavailable => Cause::Unavailable,
                RemoteErrorKind::Overloaded => Cause::Overloaded,
                _ => return None,
            },
            _ => return None,
        })
    }

    /// The worker is gone from the bus, not just failing this request.
    fn gone(self) -> bool {
        matches!(self, Cause::NoResponders | Cause::Disconnected)
    }

    /// Whether the worker is to blame: frames lost on the bus (a nats-server restart) say
    /// nothing about it, and the request may go back to it (the migration limit still bounds
    /// a worker that keeps breaking its frames).
    fn blames_worker(self) -> bool {
        !matches!(self, Cause::Protocol)
    }

    fn as_str(self) -> &'static str {
        match self {
            Cause::NoResponders => "no_responders",
            Cause::Disconnected => "disconnected",
            Cause::WorkerFailed => "worker_failed",
            Cause::Unavailable => "unavailable",
            Cause::Overloaded => "overloaded",
            Cause::EndedEarly => "ended_early",
            Cause::Protocol => "protocol",
        }
    }
}

/// One request in progress: pieces of text until a finish reason.
///
/// Migration: it keeps the token ids its worker produced. When that worker dies or fails
/// mid-stream (see [`Cause`]), the request goes to another worker (never one that failed it)
/// as the prompt followed by those tokens (`resumed_tokens`), with what is left of its token
/// budget and the same sampling options: the client's stream goes on where it stopped, with
/// no text repeated or lost, and usage counts the original prompt and every completion token
/// once. At most `--migration-limit` times; a request pinned to an instance never moves.
pub struct Generation {
    pub id: String,
    pub model: String,
    pub created: u64,
    /// The instance serving it (the last one, after a migration).
    pub worker: InstanceId,
    /// The prefill worker that computed its prompt, when that was not `worker`.
    pub prefill_worker: Option<InstanceId>,
    pub prepared: Prepared,
    output: OutputProcessor,
    stream: ResponseStream<EngineOutput>,
    pending: Option<EngineOutput>,
    done: bool,
    /// The KV router's accounting for this request (released on drop).
    lease: Option<RouteLease>,
    metrics: RequestMetrics,
    _permit: Permit,
    serving: Arc<Serving>,
    /// Its model's entry when it started (a migration reads the table's latest, and falls
    /// back to this one while the model has no worker listed).
    entry: Arc<ModelEntry>,
    /// Instances that failed it.
    tried: Vec<InstanceId>,
    /// Every token id its workers produced.
    generated: Vec<TokenId>,
    migrations: u32,
    /// When the last output arrived (a migration's log says how long the stream was silent).
    last_output: Instant,
    /// Characters of completion text the streamed logprobs covered so far (their
    /// `text_offset`).
    pub text_offset: usize,
    /// Tool calls streamed so far (the next one's `index`).
    pub calls_sent: usize,
}

impl Generation {
    /// The next piece: text (possibly empty) and, once, a finish reason; `None` after it.
    /// Dropping the generation cancels the request on the worker.
    pub async fn next(&mut self) -> Option<Result<Piece, ApiError>> {
        if self.done {
            return None;
        }
        loop {
            let out = match self.pending.take() {
                Some(o) => Some(Ok(o)),
                None => self.stream.next().await,
            };
            let (cause, error) = match out {
                Some(Ok(out)) => return Some(Ok(self.piece(out))),
                Some(Err(e)) => match Cause::of(&e) {
                    Some(cause) => (cause, rpc_error(&e, &self.model)),
                    None => return Some(Err(self.fail(rpc_error(&e, &self.model)))),
                },
                // Every engine ends a stream with a finish reason: an end without one is a
                // worker that failed, never a normal stop.
                None => {
                    tracing::warn!(request_id = %self.id, worker = %self.worker, "the worker ended a stream without a finish reason");
                    let mut e = ApiError::unavailable(format!(
                        "the worker serving model {} ended the stream early; retry the request",
                        self.model
                    ));
                    e.code = Some("worker_failed");
                    (Cause::EndedEarly, e)
                }
            };
            if let Err(e) = self.migrate(cause, error).await {
                return Some(Err(self.fail(e)));
            }
        }
    }

    fn fail(&mut self, e: ApiError) -> ApiError {
        self.done = true;
        self.metrics.set_status(e.status_label());
        e
    }

    fn piece(&mut self, mut out: EngineOutput) -> Piece {
        if self.migrations > 0 {
            // The prompt's cached share is the first worker's; a later one would count the
            // resumed tokens as cached prompt.
            out.cached_tokens = None;
        }
        self.generated.extend_from_slice(&out.token_ids);
        self.last_output = Instant::now();
        let piece = self.output.process(&out);
        if self.output.completion_tokens() > 0 {
            if let Some(l) = &mut self.lease {
                l.prefill_done();
            }
        }
        self.metrics.on_tokens(self.output.completion_tokens());
        if piece.finish.is_some() {
            self.done = true;
            self.metrics.set_output(self.output.completion_tokens());
            self.metrics.set_cached(self.output.cached_tokens());
            self.metrics.set_status(Status::Ok);
        }
        piece
    }

    /// Moves the request to another worker after `cause` ended its stream; `error` is what
    /// the client gets when it cannot move.
    async fn migrate(&mut self, cause: Cause, error: ApiError) -> Result<(), ApiError> {
        let pinned = self.prepared.instance.is_some();
        if pinned || self.migrations >= self.serving.migration_limit {
            return Err(error);
        }
        let original = &self.prepared.request;
        let done = self.generated.len() as u32;
        let left = original.stop.max_tokens.saturating_sub(done);
        if left == 0 {
            // Everything was generated; only the finish was lost with the worker.
            self.pending = Some(EngineOutput {
                finish_reason: Some(FinishReason::Length),
                ..Default::default()
            });
            return Ok(());
        }
        let mut token_ids = original.token_ids.clone();
        token_ids.extend_from_slice(&self.generated);
        let request = PreprocessedRequest {
            token_ids,
            sampling: original.sampling.clone(),
            stop: dynamo_protocols::llm::StopConditions {
                max_tokens: left,
                min_tokens: original.stop.min_tokens.saturating_sub(done),
                stop_token_ids: original.stop.stop_token_ids.clone(),
            },
            remote_prefill: None,
            peer_prefix: None,
            resumed_tokens: original.resumed_tokens + done,
        };
        // Just after the bus came back, "no responders" may be a live worker still
        // subscribing again: kept out a second, not for the rest of this request.
        let fresh = cause.gone() && self.serving.suspect(self.worker);
        if cause.blames_worker() && !fresh {
            self.tried.push(self.worker);
        }
        self.migrations += 1;
        metrics::counter!("dynamo_frontend_migrations_total", "cause" => cause.as_str())
            .increment(1);
        let silent_ms = self.last_output.elapsed().as_millis() as u64;
        let moving = Instant::now();
        // The failed worker's accounting ends now; the new route takes its own.
        self.lease = None;
        match self
            .serving
            .dispatch(
                &self.entry,
                &request,
                (None, None),
                &self.id,
                &mut self.tried,
            )
            .await
        {
            Ok(started) => {
                tracing::info!(request_id = %self.id, from = %self.worker, to = %started.worker, cause = cause.as_str(), generated = done, silent_ms, resumed_ms = moving.elapsed().as_millis() as u64, "migrated the request to another worker");
                self.worker = started.worker;
                self.stream = started.stream;
                self.pending = started.first;
                self.lease = started.lease;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(request_id = %self.id, error = %e.message, "no worker could take the request over");
                let mut error = error;
                error.message = format!(
                    "{} (no other worker could take it over: {})",
                    error.message, e.message
                );
                Err(error)
            }
        }
    }

    /// Times the request moved to another worker.
    pub fn migrations(&self) -> u32 {
        self.migrations
    }

    pub fn usage(&self) -> Usage {
        let prompt = self.prepared.prompt_tokens();
        let completion = self.output.completion_tokens();
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: Some(PromptTokensDetails {
                cached_tokens: self.output.cached_tokens(),
            }),
            completion_tokens_details: Some(CompletionTokensDetails::default()),
        }
    }
}

#[cfg(test)]
mod suspects_tests {
    use super::*;
    use std::time::Duration;

    /// An instance the bus said was gone stays out of routing for [`SUSPECT_FOR`], but not
    /// across a reconnection (after a nats-server restart every worker was "gone" for a
    /// moment); one found gone just after the connection came back stays out a second only.
    #[test]
    fn suspicion_ends_with_the_connection_that_found_it() {
        let (tx, rx) = tokio::sync::watch::channel(0u64);
        let s = Suspects::new(Some(rx));
        let (a, b) = (InstanceId::new(1), InstanceId::new(2));
        let t0 = Instant::now();
        assert_eq!(s.suspect(a, t0), (true, false));
        assert_eq!(s.suspect(a, t0), (false, false));
        let tried = [InstanceId::new(9)];
        assert_eq!(
            s.avoid(&tried, t0 + Duration::from_secs(1)),
            vec![tried[0], a]
        );
        assert_eq!(
            s.avoid(&[], t0 + SUSPECT_FOR + Duration::from_millis(1)),
            vec![]
        );
        // The connection comes back: what the old server said no longer counts.
        assert_eq!(s.avoid(&[], t0 + Duration::from_secs(2)), vec![a]);
        tx.send(1).unwrap();
        let t1 = t0 + Duration::from_secs(3);
        assert_eq!(s.avoid(&[], t1), vec![]);
        // Just after it, "no responders" keeps an instance out for a second only...
        assert_eq!(s.suspect(b, t1), (true, true));
        assert_eq!(s.next_expiry(t1), Some(t1 + SUSPECT_AFTER_RECONNECT));
        assert_eq!(s.avoid(&[], t1 + Duration::from_millis(500)), vec![b]);
        assert_eq!(s.avoid(&[], t1 + SUSPECT_AFTER_RECONNECT), vec![]);
        assert_eq!(s.next_expiry(t1 + SUSPECT_AFTER_RECONNECT), None);
        // ...and later on the same connection for the full time again.
        let t2 = t1 + RECONNECT_GRACE;
        assert_eq!(s.suspect(b, t2), (true, false));
        assert_eq!(s.avoid(&[], t2 + Duration::from_secs(10)), vec![b]);
        // In process (no reconnections) suspicion is never cut short.
        let local = Suspects::new(None);
        assert_eq!(local.suspect(a, t0), (true, false));
        assert_eq!(local.avoid(&[], t0 + Duration::from_secs(14)), vec![a]);
    }
}
