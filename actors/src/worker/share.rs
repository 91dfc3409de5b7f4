//! Cluster-wide KV sharing: a worker onboards a prompt prefix that a peer holds (in its device
//! pool or host tier) through the transfer library, instead of computing it.
//!
//! The router sees every worker's blocks by tier; when a peer holds a longer leading run of
//! a request's blocks than the worker it picks, it says so in the request
//! ([`PeerPrefix`]). The worker, before handing the request to its engine:
//! 1. pins the leading blocks it holds on its device and reserves blocks for the rest of the
//!    peer's run, in one step ([`dynamo_engine::KvCapability::reserve_prompt`]); asks its engine whether
//!    moving them beats computing them ([`dynamo_engine::KvCapability::worth_fetching`]: the mocker's cost
//!    model compares its link with its prefill; real bytes are always cheaper than a
//!    prefill on this CPU engine);
//! 2. asks the peer (`kv_fetch`, [`KvFetchRequest`]) to write the blocks after its own into
//!    its staging region (or, for a simulated engine, to wait the simulated transfer time);
//! 3. imports what arrived into the reserved blocks ([`dynamo_engine::KvCapability::import_continuation`]):
//!    they are cached on its device, and the engine finds them as the request's prefix
//!    (`cached_tokens`).
//!
//! Every failure (no blocks, a full staging region, a peer that is gone, slow or holds less
//! than announced, a bad import) only means computing the prompt as usual, counted by
//! outcome in `dynamo_worker_kv_peer_fetches_total`. A peer writes only within the deadline
//! the request carries, and slots lent to a peer that did not answer stay out of use until
//! then (as for a remote prefill). A fetch gets `fetch_timeout` (1 s), far above the
//! milliseconds it takes: past it, the prefill is the faster way.

use std::time::{Duration, Instant};

use dynamo_engine::{Engine, KvBlockData};
use dynamo_protocols::kv::SequenceHash;
use dynamo_protocols::llm::{KvFetchReply, KvFetchRequest, PeerPrefix, PreprocessedRequest};
use dynamo_runtime::rpc::{RemoteErrorKind, RpcError};
use dynamo_runtime::{EndpointId, InstanceId, Request, Target};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use super::disagg::{call_one, CallFailed, Disagg};

/// Why a peer fetch brought nothing; a closed set (metric labels).
#[derive(Debug, thiserror::Error)]
enum Skip {
    #[error("this worker does not share KV (no transfer agent)")]
    Unsupported,
    #[error("the prefix is on this worker's device already")]
    Cached,
    #[error("the engine's cost model prefers computing {0} blocks")]
    NotWorth(usize),
    #[error("no free KV blocks to reserve: {0}")]
    NoBlocks(String),
    #[error("the staging region is full")]
    StagingFull,
    #[error("the peer's endpoint is malformed: {0}")]
    Endpoint(String),
    #[error("the peer failed: {0}")]
    Peer(String),
    #[error("the peer did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the peer holds none of the blocks any more")]
    Gone,
    #[error("the import of the fetched blocks failed: {0}")]
    Import(String),
    #[error("the request was cancelled")]
    Cancelled,
}

impl Skip {
    fn label(&self) -> &'static str {
        match self {
            Skip::Unsupported => "unsupported",
            Skip::Cached => "cached",
            Skip::NotWorth(_) => "not_worth",
            Skip::NoBlocks(_) => "no_blocks",
            Skip::StagingFull => "staging_full",
            Skip::Endpoint(_) => "endpoint",
            Skip::Peer(_) => "peer_failed",
            Skip::Timeout(_) => "timeout",
            Skip::Gone => "gone",
            Skip::Import(_) => "import",
            Skip::Cancelled => "cancelled",
        }
    }
}

/// Fetches `peer`'s blocks of `body`'s prompt into this worker's device pool when worth it
/// (see the module). Never fails the request: a fetch that does not happen means computing
/// the prompt.
pub(crate) async fn fetch_prefix(
    disagg: Option<&Disagg>,
    engine: &Arc<dyn Engine>,
    body: &PreprocessedRequest,
    peer: &PeerPrefix,
    cancel: &CancellationToken,
) {
    let started = Instant::now();
    let outcome = match disagg {
        Some(d) if d.shares() => tokio::select! {
            r = d.fetch(engine, body, peer) => r,
            _ = cancel.cancelled() => Err(Skip::Cancelled),
        },
        _ => Err(Skip::Unsupported),
    };
    match outcome {
        Ok(blocks) => {
            metrics::counter!("dynamo_worker_kv_peer_fetches_total", "outcome" => "ok")
                .increment(1);
            metrics::counter!("dynamo_worker_kv_peer_fetched_blocks_total")
                .increment(blocks as u64);
            metrics::histogram!("dynamo_worker_kv_peer_fetch_seconds")
                .record(started.elapsed().as_secs_f64());
        }
        Err(why) => {
            metrics::counter!("dynamo_worker_kv_peer_fetches_total", "outcome" => why.label())
                .increment(1);
            if !matches!(
                why,
                Skip::Cached | Skip::NotWorth(_) | Skip::Cancelled | Skip::Gone
            ) {
                tracing::debug!(peer = peer.worker, reason = %why, "no KV fetched from the peer; computing the prompt");
            }
        }
    }
}

impl Disagg {
    async fn fetch(
        &self,
        engine: &Arc<dyn Engine>,
        body: &PreprocessedRequest,
        peer: &PeerPrefix,
    ) -> Result<usize, Skip> {
        let cap = engine.kv_capability().ok_or(Skip::Unsupported)?;
        let client = self.client().ok_or(Skip::Unsupported)?;
        if peer.worker == self.instance().as_u64() {
            return Err(Skip::Cached);
        }
        let bs = cap.block_size();
        let pairs = dynamo_kv::block_hashes(&body.token_ids, bs);
        let want = (peer.blocks as usize).min(pairs.len());
        if want == 0 {
            return Err(Skip::Cached);
        }
        // Checked again for the blocks actually missing; first for the whole run, so that a
        // fetch the cost model refuses reserves (and evicts) nothing.
        if !cap.worth_fetching(want) {
            return Err(Skip::NotWorth(want));
        }
        let hashes: Vec<SequenceHash> = pairs[..want].iter().map(|p| p.1).collect();
        // What this device holds stays pinned while the rest arrives.
        let (reservation, held) = cap
            .reserve_prompt(hashes.clone(), want)
            .await
            .map_err(|e| Skip::NoBlocks(e.to_string()))?;
        if held >= want {
            return Err(Skip::Cached);
        }
        let need = want - held;
        if !cap.worth_fetching(need) {
            return Err(Skip::NotWorth(need));
        }
        let real = cap.block_bytes() > 0;
        let mut slots = match real {
            true => Some(
                self.take_slots(need)
                    .map_err(|_| Skip::StagingFull)?
                    .ok_or(Skip::Unsupported)?,
            ),
            false => None,
        };
        let endpoint =
            EndpointId::parse(&peer.endpoint).map_err(|e| Skip::Endpoint(e.to_string()))?;
        let timeout = self.settings().fetch_timeout;
        if let Some(s) = &mut slots {
            // A peer that does not answer may still write until the deadline, and its write
            // may take the transfer's own timeout.
            s.hold_for(timeout + self.settings().transfer_timeout);
        }
        let request = KvFetchRequest {
            hashes,
            from: held as u32,
            target: slots.as_ref().map(|s| self.target(s)),
            write_within_ms: timeout.as_millis() as u64,
        };
        let target = Target::Instance(endpoint, InstanceId::new(peer.worker));
        let answer: KvFetchReply =
            match call_one(client, target, &request, timeout, "the peer").await {
                Ok(a) => a,
                Err(CallFailed::Error(e)) => {
                    if let (RpcError::Remote(_), Some(s)) = (&e, &mut slots) {
                        // It answered: it writes nothing more.
                        s.release_now();
                    }
                    return Err(Skip::Peer(e.to_string()));
                }
                Err(CallFailed::Timeout) => return Err(Skip::Timeout(timeout)),
            };
        let got = (answer.blocks as usize).min(need);
        if got == 0 {
            if let Some(s) = &mut slots {
                s.release_now();
            }
            return Err(Skip::Gone);
        }
        let data = match &slots {
            Some(s) => s
                .read(got)
                .map_err(|e| Skip::Import(format!("reading the staging region: {e}")))?,
            None => vec![Vec::new(); got],
        };
        if let Some(s) = &mut slots {
            s.release_now();
        }
        drop(slots);
        let chain: Vec<KvBlockData> = (held..held + got)
            .zip(data)
            .map(|(i, data)| KvBlockData {
                hash: pairs[i].1,
                parent: i.checked_sub(1).map(|p| pairs[p].1),
                local: pairs[i].0,
                position: i as u32,
                data,
            })
            .collect();
        cap.import_continuation(reservation, held, chain)
            .await
            .map_err(|e| Skip::Import(e.to_string()))
    }

    /// A peer's `kv_fetch`: writes the blocks this worker holds of the chain into the
    /// target, within the deadline; answers how many.
    pub(crate) async fn serve_fetch(
        self: Arc<Self>,
        engine: Arc<dyn Engine>,
        req: Request<KvFetchRequest, KvFetchReply>,
    ) {
        let Request { body, reply, .. } = req;
        let received = Instant::now();
        match self.share_blocks(&engine, body, received).await {
            Ok(blocks) => {
                metrics::counter!("dynamo_worker_kv_peer_served_blocks_total")
                    .increment(blocks as u64);
                drop(reply.finish_with(&KvFetchReply { blocks }).await)
            }
            Err((kind, why)) => drop(reply.fail(kind, why).await),
        }
    }

    async fn share_blocks(
        &self,
        engine: &Arc<dyn Engine>,
        body: KvFetchRequest,
        received: Instant,
    ) -> Result<u32, (RemoteErrorKind, String)> {
        let cap = engine.kv_capability().ok_or((
            RemoteErrorKind::Unavailable,
            "this worker's engine has no KV cache".to_string(),
        ))?;
        let from = body.from as usize;
        if from >= body.hashes.len() {
            return Err((
                RemoteErrorKind::BadRequest,
                format!(
                    "from {from} leaves none of the {} blocks to send",
                    body.hashes.len()
                ),
            ));
        }
        let wanted = body.hashes.len() - from;
        if let Some(t) = &body.target {
            if t.blocks.len() != wanted {
                return Err((
                    RemoteErrorKind::BadRequest,
                    format!(
                        "the target has {} blocks for the {wanted} wanted",
                        t.blocks.len()
                    ),
                ));
            }
        }
        let blocks = cap
            .share(body.hashes, from)
            .await
            .map_err(|e| (super::requests::remote_kind(&e), e.to_string()))?;
        let n = blocks.len();
        if n > 0 {
            self.send_blocks(
                cap.as_ref(),
                blocks.into_iter().map(|b| b.data).collect(),
                0,
                body.target.map(|mut t| {
                    t.blocks.truncate(n);
                    t
                }),
                received,
                body.write_within_ms,
            )
            .await?;
        }
        Ok(n as u32)
    }
}
