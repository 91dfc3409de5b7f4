//! Disaggregated serving, worker side: a decode worker that has a request's prompt prefilled
//! on a prefill worker, and the prefill worker that computes it and writes the KV over.
//!
//! Decode worker, for a request routed with [`RemotePrefill`]:
//! 1. looks up how much of the prompt's full blocks it holds; reserves blocks for the rest
//!    in its engine and the same number of slots in its staging region (registered with its
//!    transfer agent);
//! 2. asks the prefill worker (`prefill` endpoint, [`PrefillRequest`]) to compute the prompt
//!    and write the missing blocks into those slots, within a deadline;
//! 3. on its answer (the first token), imports the slots' bytes into the reserved blocks
//!    (checked whole: a partial transfer is never cached) and streams the first token; the
//!    engine then continues from prompt + first token, its prefix found cached.
//!
//! Any failure on the way (no blocks, no staging room, the prefill worker failing or silent,
//! the transfer or the import failing) falls back to prefilling locally (or fails the
//! request, by [`PrefillFallback`]), counted by reason. Staging slots handed to a prefill
//! worker that did not answer stay out of use until its write deadline plus the transfer
//! timeout has passed, so a late write never lands in memory lent to another request.
//!
//! Prefill worker: computes the prompt with `max_tokens = 1`, exports the prompt's full
//! blocks after `skip_blocks` and writes them into the target through its agent (the
//! transfer library picks shared memory or TCP per peer), or, for a simulated engine, waits
//! the simulated transfer time; then answers with the first token.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dynamo_engine::{Engine, EngineError, EngineStream, KvCapability};
use dynamo_protocols::kv::SequenceHash;
use dynamo_protocols::llm::{
    EngineOutput, FinishReason, KvRange, KvTarget, PrefillRequest, PreprocessedRequest,
    RemotePrefill, WorkerKind,
};
use dynamo_runtime::rpc::{RemoteErrorKind, RpcClient, RpcError};
use dynamo_runtime::{CallOptions, EndpointId, InstanceId, Request, Target};
use dynamo_transfer::{
    Agent, AgentMetadata, AgentSettings, Descriptor, Dtype, Layout, Region, RegionId, Route,
    Source, TransferError, WriteOp,
};
use tokio_util::sync::CancellationToken;

/// What a decode worker does when a remote prefill fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefillFallback {
    /// Prefill locally (the client sees a slower first token, nothing else).
    #[default]
    Local,
    /// Fail the request (`internal`), e.g. to find a broken transfer path in a test.
    Fail,
}

impl std::str::FromStr for PrefillFallback {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(Self::Local),
            "fail" => Ok(Self::Fail),
            other => Err(format!(
                "unknown prefill fallback {other:?}; expected local or fail"
            )),
        }
    }
}

/// A prefill or decode worker's transfer settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DisaggSettings {
    /// Backend per peer: `auto` (same host: shared memory, else TCP), `shm`, `tcp`.
    pub route: Route,
    /// Where a decode worker listens for TCP transfers (port 0: any). Give an address other
    /// hosts can reach when prefill workers run elsewhere.
    pub listen: SocketAddr,
    /// Blocks of a decode worker's staging region (transfers in flight at once).
    pub staging_blocks: usize,
    pub fallback: PrefillFallback,
    /// Longest a decode worker waits for a prefill worker's answer.
    pub prefill_timeout: Duration,
    /// Longest one transfer may take.
    pub transfer_timeout: Duration,
    /// Share KV with peer workers (any kind): serve `kv_fetch`, and fetch a prefix a peer
    /// holds when the router says so (see [`super::share`]).
    pub share: bool,
    /// Longest a worker waits for a peer's blocks before computing the prompt itself (a fetch
    /// takes milliseconds; one that takes longer has lost to the prefill).
    pub fetch_timeout: Duration,
}

impl Default for DisaggSettings {
    fn default() -> Self {
        Self {
            route: Route::Auto,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            staging_blocks: 512,
            fallback: PrefillFallback::Local,
            prefill_timeout: Duration::from_secs(30),
            transfer_timeout: Duration::from_secs(10),
            share: false,
            fetch_timeout: Duration::from_secs(1),
        }
    }
}

/// The engine's block layout as the transfer library sees it.
fn layout_of(cap: &dyn KvCapability) -> Option<Layout> {
    let l = cap.layout()?;
    let dtype = match l.dtype {
        "f32" => Dtype::F32,
        "f16" => Dtype::F16,
        "bf16" => Dtype::Bf16,
        _ => return None,
    };
    Some(Layout {
        layers: l.layers as u32,
        kv_heads: l.kv_heads as u32,
        head_dim: l.head_dim as u32,
        block_size: l.block_size as u32,
        dtype,
    })
}

/// Free slots of a decode worker's staging region.
struct Staging {
    region: Arc<Region>,
    free: Mutex<Vec<usize>>,
}

/// Slots lent to one remote prefill or peer fetch; given back on drop, at once or after
/// `hold_until`.
pub(super) struct Slots {
    staging: Arc<Staging>,
    slots: Vec<usize>,
    hold_until: Option<Instant>,
}

impl Slots {
    pub(super) fn descriptors(&self) -> Vec<Descriptor> {
        self.slots
            .iter()
            .map(|&s| self.staging.region.block(s))
            .collect()
    }

    /// Kept out of use for `d` after the drop (a writer may still be at them until then).
    pub(super) fn hold_for(&mut self, d: Duration) {
        self.hold_until = Some(Instant::now() + d);
    }

    /// The writer is done: given back at the drop.
    pub(super) fn release_now(&mut self) {
        self.hold_until = None;
    }

    /// The first `n` slots' bytes.
    pub(super) fn read(&self, n: usize) -> Result<Vec<Vec<u8>>, TransferError> {
        self.descriptors()
            .iter()
            .take(n)
            .map(|d| self.staging.region.read(d))
            .collect()
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        let slots = std::mem::take(&mut self.slots);
        let staging = self.staging.clone();
        let give_back = move || {
            staging
                .free
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(slots)
        };
        match self.hold_until {
            Some(t) if t > Instant::now() => {
                // No runtime: the process is ending; nobody will lend these again.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        tokio::time::sleep_until(t.into()).await;
                        give_back();
                    });
                }
            }
            _ => give_back(),
        }
    }
}

/// How a call for one answer failed.
pub(super) enum CallFailed {
    /// An error: the callee's (it answered), or the bus's (e.g. no responders).
    Error(RpcError),
    /// No answer within the timeout.
    Timeout,
}

/// Calls `target` for one answer within `timeout`; `who` names the callee in errors.
pub(super) async fn call_one<Req, Resp>(
    client: &RpcClient,
    target: Target,
    request: &Req,
    timeout: Duration,
    who: &str,
) -> Result<Resp, CallFailed>
where
    Req: serde::Serialize,
    Resp: serde::de::DeserializeOwned,
{
    let call = async {
        let mut stream = client
            .call::<_, Resp>(
                target,
                request,
                CallOptions {
                    timeout: Some(timeout),
                    ..Default::default()
                },
            )
            .await?;
        match stream.next().await {
            Some(r) => r,
            None => Err(RpcError::Remote(dynamo_runtime::rpc::RemoteError {
                kind: RemoteErrorKind::Internal,
                message: format!("{who} answered nothing"),
            })),
        }
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(CallFailed::Error(e)),
        Err(_) => Err(CallFailed::Timeout),
    }
}

/// A worker's part in disaggregation: its transfer agent, a decode worker's staging region
/// and bus client.
pub(crate) struct Disagg {
    agent: Agent,
    staging: Option<Arc<Staging>>,
    /// This agent's metadata, msgpack (what a [`KvTarget`] carries).
    agent_meta: Vec<u8>,
    client: Option<RpcClient>,
    instance: InstanceId,
    settings: DisaggSettings,
}

/// Why a remote prefill did not happen; a closed set (metric labels).
#[derive(Debug, thiserror::Error)]
pub(super) enum Why {
    #[error("the engine has no KV cache to import into")]
    NoKv,
    #[error("the prompt's full blocks are cached here already")]
    Cached,
    #[error("no free KV blocks to reserve: {0}")]
    NoBlocks(EngineError),
    #[error("the staging region is full ({0} blocks in flight)")]
    StagingFull(usize),
    #[error("the prefill worker's endpoint is malformed: {0}")]
    Endpoint(String),
    #[error("the prefill worker failed: {0}")]
    Prefill(String),
    #[error("the prefill worker did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the import of the transferred blocks failed: {0}")]
    Import(EngineError),
    #[error("the request was cancelled")]
    Cancelled,
}

impl Why {
    fn label(&self) -> &'static str {
        match self {
            Why::NoKv => "no_kv",
            Why::Cached => "cached",
            Why::NoBlocks(_) => "no_blocks",
            Why::StagingFull(_) => "staging_full",
            Why::Endpoint(_) => "endpoint",
            Why::Prefill(_) => "prefill_failed",
            Why::Timeout(_) => "timeout",
            Why::Import(_) => "import",
            Why::Cancelled => "cancelled",
        }
    }
}

/// What became of a decode worker's remote prefill.
pub(crate) enum Prefilled {
    /// The first token (its output, to send) and, unless that ended the request, the
    /// engine's stream of the tokens after it.
    Done {
        first: EngineOutput,
        rest: Option<EngineStream>,
    },
    /// Prefill locally.
    Local,
    /// Fail the request with this message.
    Failed(String),
}

impl Disagg {
    /// The disaggregation part of a prefill or decode worker (`None` for aggregated ones).
    pub(crate) async fn start(
        kind: WorkerKind,
        settings: DisaggSettings,
        engine: &Arc<dyn Engine>,
        instance: InstanceId,
        bus: Arc<dyn dynamo_runtime::bus::Bus>,
    ) -> Result<Option<Arc<Self>>, String> {
        if kind == WorkerKind::Aggregated && !settings.share {
            return Ok(None);
        }
        // A decode worker receives a prefill worker's blocks; a sharing worker a peer's.
        let decode = kind == WorkerKind::Decode || settings.share;
        let layout = engine.kv_capability().as_deref().and_then(layout_of);
        let agent = Agent::start(AgentSettings {
            name: format!("{}-{instance}", kind.as_str()),
            // Only a worker whose engine has bytes to receive listens.
            tcp_listen: (decode && layout.is_some()).then_some(settings.listen),
            route: settings.route,
            tcp_connections: 4,
            timeout: settings.transfer_timeout,
        })
        .map_err(|e| format!("cannot start the KV transfer agent: {e}"))?;
        let staging = match (decode, layout) {
            (true, Some(layout)) if settings.staging_blocks > 0 => {
                let region = agent
                    .register(layout, settings.staging_blocks)
                    .map_err(|e| format!("cannot register the KV staging region: {e}"))?;
                Some(Arc::new(Staging {
                    region,
                    free: Mutex::new((0..settings.staging_blocks).rev().collect()),
                }))
            }
            _ => None,
        };
        let agent_meta = rmp_serde::to_vec_named(&agent.metadata())
            .map_err(|e| format!("cannot encode the agent's metadata: {e}"))?;
        let client = match decode {
            true => Some(
                RpcClient::new(bus, Default::default())
                    .await
                    .map_err(|e| format!("cannot start the prefill client: {e}"))?,
            ),
            false => None,
        };
        Ok(Some(Arc::new(Self {
            agent,
            staging,
            agent_meta,
            client,
            instance,
            settings,
        })))
    }

    /// The agent's metadata for discovery (`kv_transfer` of the worker's metadata).
    pub(crate) fn metadata(&self) -> serde_json::Value {
        serde_json::to_value(self.agent.metadata()).unwrap_or_default()
    }

    /// Whether it shares KV with peers (serves `kv_fetch`, fetches on a router's hint).
    pub(crate) fn shares(&self) -> bool {
        self.settings.share
    }

    pub(super) fn client(&self) -> Option<&RpcClient> {
        self.client.as_ref()
    }

    pub(super) fn instance(&self) -> InstanceId {
        self.instance
    }

    pub(super) fn settings(&self) -> &DisaggSettings {
        &self.settings
    }

    /// Where a peer writes into `slots`: this agent and one range per slot.
    pub(super) fn target(&self, slots: &Slots) -> KvTarget {
        KvTarget {
            agent: self.agent_meta.clone(),
            blocks: slots
                .descriptors()
                .into_iter()
                .map(|d| KvRange {
                    region: d.region.0,
                    offset: d.offset,
                    len: d.len,
                })
                .collect(),
        }
    }

    pub(super) fn take_slots(&self, n: usize) -> Result<Option<Slots>, Why> {
        let Some(staging) = &self.staging else {
            return Ok(None);
        };
        let mut free = staging.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < n {
            return Err(Why::StagingFull(self.settings.staging_blocks - free.len()));
        }
        let at = free.len() - n;
        let slots = free.split_off(at);
        Ok(Some(Slots {
            staging: staging.clone(),
            slots,
            hold_until: None,
        }))
    }

    /// Decode side: has `body`'s prompt prefilled on `remote`'s worker (see the module).
    pub(crate) async fn remote_prefill(
        &self,
        engine: &Arc<dyn Engine>,
        body: &PreprocessedRequest,
        remote: &RemotePrefill,
        cancel: &CancellationToken,
    ) -> Prefilled {
        let outcome = tokio::select! {
            r = self.try_remote(engine, body, remote, cancel) => r,
            _ = cancel.cancelled() => Err(Why::Cancelled),
        };
        match outcome {
            Ok((first, rest)) => {
                metrics::counter!("dynamo_disagg_remote_prefills_total", "outcome" => "ok")
                    .increment(1);
                Prefilled::Done { first, rest }
            }
            Err(why) => {
                metrics::counter!("dynamo_disagg_fallbacks_total", "reason" => why.label())
                    .increment(1);
                // Nothing to fall back from: the prompt is cached here or the engine cannot
                // import (both ordinary, not failures).
                let ordinary = matches!(why, Why::Cached | Why::NoKv | Why::Cancelled);
                if !ordinary {
                    tracing::warn!(instance = %self.instance, prefill_worker = remote.prefill_worker, reason = %why, "remote prefill failed");
                }
                match self.settings.fallback {
                    PrefillFallback::Fail if !ordinary => {
                        metrics::counter!("dynamo_disagg_remote_prefills_total", "outcome" => "failed")
                            .increment(1);
                        Prefilled::Failed(format!("remote prefill failed: {why}"))
                    }
                    _ => {
                        metrics::counter!("dynamo_disagg_remote_prefills_total", "outcome" => "fallback")
                            .increment(1);
                        Prefilled::Local
                    }
                }
            }
        }
    }

    async fn try_remote(
        &self,
        engine: &Arc<dyn Engine>,
        body: &PreprocessedRequest,
        remote: &RemotePrefill,
        cancel: &CancellationToken,
    ) -> Result<(EngineOutput, Option<EngineStream>), Why> {
        let cap = engine.kv_capability().ok_or(Why::NoKv)?;
        let client = self.client.as_ref().ok_or(Why::NoKv)?;
        let bs = cap.block_size();
        let seqs: Vec<SequenceHash> = dynamo_kv::block_hashes(&body.token_ids, bs)
            .into_iter()
            .map(|h| h.1)
            .collect();
        let total = body.token_ids.len().div_ceil(bs);
        let real = cap.block_bytes() > 0;
        if real && self.staging.is_none() {
            return Err(Why::NoKv);
        }
        // The cached leading blocks pinned and the rest allocated, in one step.
        let (reservation, cached) = cap
            .reserve_prompt(seqs, total)
            .await
            .map_err(Why::NoBlocks)?;
        if cached >= total {
            return Err(Why::Cached);
        }
        let need = total - cached;
        let mut slots = if real { self.take_slots(need)? } else { None };
        let target = slots.as_ref().map(|s| self.target(s));
        let endpoint =
            EndpointId::parse(&remote.endpoint).map_err(|e| Why::Endpoint(e.to_string()))?;
        let timeout = self.settings.prefill_timeout;
        // Should the prefill worker not answer, it may still write until its deadline (plus
        // the transfer's own timeout): the slots stay lent until then.
        if let Some(s) = &mut slots {
            s.hold_until = Some(Instant::now() + timeout + self.settings.transfer_timeout);
        }
        let request = PrefillRequest {
            request: PreprocessedRequest {
                remote_prefill: None,
                peer_prefix: None,
                resumed_tokens: 0,
                ..body.clone()
            },
            skip_blocks: cached as u32,
            target,
            write_within_ms: timeout.as_millis() as u64,
        };
        let target = Target::Instance(endpoint, InstanceId::new(remote.prefill_worker));
        let answer: EngineOutput =
            match call_one(client, target, &request, timeout, "the prefill worker").await {
                Ok(out) => out,
                Err(CallFailed::Error(e)) => {
                    if let (RpcError::Remote(_), Some(s)) = (&e, &mut slots) {
                        // It answered: it writes nothing more.
                        s.release_now();
                    }
                    return Err(Why::Prefill(e.to_string()));
                }
                Err(CallFailed::Timeout) => return Err(Why::Timeout(timeout)),
            };
        let token = *answer
            .token_ids
            .first()
            .ok_or_else(|| Why::Prefill("the prefill worker sent no token".into()))?;
        let data = match (slots.as_ref(), &self.staging) {
            (Some(s), Some(st)) => s
                .descriptors()
                .iter()
                .map(|d| st.region.read(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Why::Import(EngineError::Internal(e.to_string())))?,
            _ => vec![Vec::new(); need],
        };
        // The prefill worker answered, so it wrote everything it will write: the slots are
        // free again once read.
        if let Some(s) = &mut slots {
            s.hold_until = None;
        }
        drop(slots);
        // The first token under this request's own stop conditions (the prefill worker ran
        // with max_tokens 1 and no min_tokens).
        let stop = &body.stop;
        let finish = if stop.min_tokens == 0 && stop.stop_token_ids.contains(&token) {
            Some(FinishReason::Stop)
        } else if stop.max_tokens <= 1 {
            Some(FinishReason::Length)
        } else {
            None
        };
        let rest = match finish {
            Some(_) => None,
            None => Some(
                cap.generate_prefilled(
                    reservation,
                    cached,
                    PreprocessedRequest {
                        remote_prefill: None,
                        peer_prefix: None,
                        resumed_tokens: 0,
                        ..body.clone()
                    },
                    token,
                    data,
                    cancel.clone(),
                )
                .map_err(Why::Import)?,
            ),
        };
        let first = EngineOutput {
            token_ids: vec![token],
            finish_reason: finish,
            cached_tokens: Some((cached * bs) as u32),
            prefill_worker: Some(remote.prefill_worker),
            // The prefill worker sampled the first token: its logprobs, if asked for.
            logprobs: answer.logprobs.into_iter().take(1).collect(),
        };
        Ok((first, rest))
    }

    /// Prefill side: computes the prompt's first token, then writes the blocks (see the
    /// module). Failures are typed errors to the decode worker, which falls back.
    pub(crate) async fn prefill(
        self: Arc<Self>,
        engine: Arc<dyn Engine>,
        req: Request<PrefillRequest, EngineOutput>,
    ) {
        let Request { body, ctx, reply } = req;
        match self
            .prefill_and_send(&engine, body, ctx.cancellation())
            .await
        {
            Ok(first) => drop(reply.finish_with(&first).await),
            Err((kind, why)) => drop(reply.fail(kind, why).await),
        }
    }

    async fn prefill_and_send(
        &self,
        engine: &Arc<dyn Engine>,
        body: PrefillRequest,
        cancel: &CancellationToken,
    ) -> Result<EngineOutput, (RemoteErrorKind, String)> {
        let received = Instant::now();
        let PrefillRequest {
            mut request,
            skip_blocks,
            target,
            write_within_ms,
        } = body;
        request.remote_prefill = None;
        if request.token_ids.is_empty() {
            return Err((
                RemoteErrorKind::BadRequest,
                "the prompt has no tokens".into(),
            ));
        }
        let Some(cap) = engine.kv_capability() else {
            return Err((
                RemoteErrorKind::Internal,
                "this prefill worker's engine has no KV cache".into(),
            ));
        };
        let total = request.token_ids.len().div_ceil(cap.block_size());
        let skip = skip_blocks as usize;
        if skip >= total {
            return Err((
                RemoteErrorKind::BadRequest,
                format!("skip_blocks {skip} leaves none of the prompt's {total} blocks to send"),
            ));
        }
        let (first, data) = cap
            .prefill_export(request, cancel.clone())
            .await
            .map_err(|e| (super::requests::remote_kind(&e), e.to_string()))?;
        self.send_blocks(cap.as_ref(), data, skip, target, received, write_within_ms)
            .await?;
        Ok(first)
    }

    pub(super) async fn send_blocks(
        &self,
        cap: &dyn KvCapability,
        data: Vec<Vec<u8>>,
        skip: usize,
        target: Option<KvTarget>,
        received: Instant,
        write_within_ms: u64,
    ) -> Result<(), (RemoteErrorKind, String)> {
        let internal = |m: String| (RemoteErrorKind::Internal, m);
        let n = data.len().saturating_sub(skip);
        let Some(target) = target else {
            // A simulated engine: no bytes, the transfer's time only.
            if let Some(t) = cap.simulated_transfer(n) {
                tokio::time::sleep(t).await;
            }
            return Ok(());
        };
        if target.blocks.len() != n {
            return Err((
                RemoteErrorKind::BadRequest,
                format!(
                    "the target has {} blocks for the prompt's {n} blocks to send",
                    target.blocks.len()
                ),
            ));
        }
        let layout = layout_of(cap)
            .ok_or_else(|| internal("this engine's KV layout cannot be transferred".into()))?;
        let peer: AgentMetadata = rmp_serde::from_slice(&target.agent).map_err(|e| {
            (
                RemoteErrorKind::BadRequest,
                format!("the target's agent metadata does not decode: {e}"),
            )
        })?;
        let ops: Vec<WriteOp> = data
            .into_iter()
            .skip(skip)
            .zip(&target.blocks)
            .map(|(b, r)| WriteOp {
                src: Source::Bytes(Bytes::from(b)),
                dst: Descriptor {
                    region: RegionId(r.region),
                    offset: r.offset,
                    len: r.len,
                },
            })
            .collect();
        if received.elapsed() >= Duration::from_millis(write_within_ms) {
            return Err((
                RemoteErrorKind::DeadlineExceeded,
                "the write deadline passed before the prompt was computed; nothing written".into(),
            ));
        }
        match self.agent.write(&peer, layout, ops).await {
            Ok(report) => {
                let backend = report.backend.as_str();
                metrics::counter!("dynamo_kv_transfer_bytes_total", "backend" => backend)
                    .increment(report.bytes);
                metrics::histogram!("dynamo_kv_transfer_seconds", "backend" => backend)
                    .record(report.elapsed.as_secs_f64());
                Ok(())
            }
            Err(e) => {
                metrics::counter!("dynamo_kv_transfer_errors_total", "error" => e.label())
                    .increment(1);
                let kind = match e {
                    TransferError::LayoutMismatch { .. }
                    | TransferError::OutOfBounds { .. }
                    | TransferError::LengthMismatch { .. }
                    | TransferError::UnknownRegion(_)
                    | TransferError::RegionSize { .. } => RemoteErrorKind::BadRequest,
                    _ => RemoteErrorKind::Internal,
                };
                Err((kind, format!("KV transfer failed: {e}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots lent to a prefill worker that did not answer stay out of use until its write
    /// deadline: a late write must never land in memory lent to another request. Slots of an
    /// answered prefill come back at once.
    #[tokio::test]
    async fn unanswered_slots_stay_lent_until_the_write_deadline() {
        let agent = Agent::start(AgentSettings::default()).unwrap();
        let layout = Layout {
            layers: 1,
            kv_heads: 1,
            head_dim: 4,
            block_size: 2,
            dtype: Dtype::F32,
        };
        let staging = Arc::new(Staging {
            region: agent.register(layout, 4).unwrap(),
            free: Mutex::new((0..4).collect()),
        });
        let free = || staging.free.lock().unwrap().len();
        let take = |n: usize, hold: Option<Duration>| {
            let mut f = staging.free.lock().unwrap();
            let at = f.len() - n;
            Slots {
                staging: staging.clone(),
                slots: f.split_off(at),
                hold_until: hold.map(|h| Instant::now() + h),
            }
        };
        drop(take(2, None));
        assert_eq!(free(), 4, "an answered prefill's slots are free at once");
        let hold = Duration::from_millis(100);
        let dropped = Instant::now();
        drop(take(3, Some(hold)));
        assert_eq!(free(), 1, "held past the drop");
        // The deadline is the event: poll the free list until it is back, then check when.
        while free() < 4 {
            assert!(
                dropped.elapsed() < Duration::from_secs(10),
                "never given back"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(dropped.elapsed() >= hold, "given back before the deadline");
    }
}
