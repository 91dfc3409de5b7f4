//! What the worker does with each request, and what it publishes: one task per `generate`
//! request (the engine's outputs streamed back, ending in a finish reason or a typed error),
//! model files in chunks, KV dumps in pieces, KV event batches and load reports.

use std::sync::Arc;

use dynamo_engine::{Engine, EngineError, KvHandle};
use dynamo_preprocessor::ModelFiles;
use dynamo_protocols::kv::{
    KvDump, KvDumpRequest, KvEventBatch, LoadReport, WorkerId, KV_EVENTS_TOPIC, LOAD_TOPIC,
};
use dynamo_protocols::llm::{
    EngineOutput, FileChunk, FileRequest, ModelCard, PreprocessedRequest, WorkerKind,
};
use dynamo_runtime::bus::Outgoing;
use dynamo_runtime::rpc::RemoteErrorKind;
use dynamo_runtime::serve::encode_event;
use dynamo_runtime::subject::Topic;
use dynamo_runtime::{ComponentInstance, Request};
use futures::StreamExt;

use super::disagg::{Disagg, Prefilled};
use super::{DUMP_PIECE, FILE_CHUNK, LOAD_MAX_INTERVAL, LOAD_MIN_INTERVAL};

pub(super) fn remote_kind(e: &EngineError) -> RemoteErrorKind {
    match e {
        EngineError::BadRequest(_) => RemoteErrorKind::BadRequest,
        EngineError::Overloaded(_) => RemoteErrorKind::Overloaded,
        EngineError::Internal(_) => RemoteErrorKind::Internal,
        EngineError::Stopped(_) => RemoteErrorKind::WorkerFailed,
    }
}

pub(super) async fn generate(
    engine: Arc<dyn Engine>,
    kind: WorkerKind,
    disagg: Option<Arc<Disagg>>,
    req: Request<PreprocessedRequest, EngineOutput>,
) {
    let Request {
        mut body,
        ctx,
        mut reply,
    } = req;
    if let Err(why) = admit(kind, &body) {
        let _ = reply.fail(RemoteErrorKind::BadRequest, why).await;
        return;
    }
    // A decode worker has the prompt prefilled remotely when the router said so: the first
    // token comes from the prefill worker, the engine continues from there.
    let mut continued = None;
    if let Some(remote) = body.remote_prefill.take() {
        if let (Some(d), false) = (&disagg, body.token_ids.is_empty()) {
            match d
                .remote_prefill(&engine, &body, &remote, ctx.cancellation())
                .await
            {
                Prefilled::Done { first, rest } => {
                    let Some(rest) = rest else {
                        let _ = reply.finish_with(&first).await;
                        return;
                    };
                    if reply.send(&first).await.is_err() {
                        return;
                    }
                    continued = Some(rest);
                }
                Prefilled::Local => {}
                Prefilled::Failed(why) => {
                    let _ = reply.fail(RemoteErrorKind::Internal, why).await;
                    return;
                }
            }
        }
    }
    // A peer holds more of the prompt than this worker: fetch it when worth it.
    if let Some(peer) = body.peer_prefix.take() {
        if continued.is_none() && !body.token_ids.is_empty() {
            super::share::fetch_prefix(
                disagg.as_deref(),
                &engine,
                &body,
                &peer,
                ctx.cancellation(),
            )
            .await;
        }
    }
    if body.token_ids.is_empty() {
        let _ = reply
            .fail(
                RemoteErrorKind::BadRequest,
                "the prompt has no tokens".to_string(),
            )
            .await;
        return;
    }
    let started = match continued {
        Some(rest) => Ok(rest),
        None => engine.generate(body, ctx.cancellation().clone()),
    };
    let mut stream = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = reply.fail(remote_kind(&e), e.to_string()).await;
            return;
        }
    };
    while let Some(item) = stream.next().await {
        let sent = match item {
            Ok(out) if out.finish_reason.is_some() => return drop(reply.finish_with(&out).await),
            Ok(out) => reply.send(&out).await,
            Err(e) => return drop(reply.fail(remote_kind(&e), e.to_string()).await),
        };
        if sent.is_err() {
            // The caller went away; dropping the stream stops the engine.
            return;
        }
    }
    if ctx.cancellation().is_cancelled() {
        // Cancelled by the caller (or a drain past its grace): nobody waits for an answer.
        let _ = reply.finish().await;
        return;
    }
    // Every engine ends a request with a finish reason: a stream that just stops is an engine
    // that died under it (its scheduler panicked or exited), never a normal end.
    let _ = reply
        .fail(
            RemoteErrorKind::WorkerFailed,
            "the engine stopped with this request in flight".to_string(),
        )
        .await;
}

/// Whether a worker of `kind` takes a request on its generate endpoint: only a decode
/// worker takes one to be prefilled elsewhere (a prefill worker's endpoint is `prefill`, which
/// takes [`dynamo_protocols::llm::PrefillRequest`]s).
fn admit(kind: WorkerKind, body: &PreprocessedRequest) -> Result<(), String> {
    match (kind, &body.remote_prefill) {
        (WorkerKind::Decode, _) | (_, None) => Ok(()),
        (_, Some(_)) => Err(format!(
            "this is a {} worker: a request prefilled elsewhere goes to a decode worker",
            kind.as_str()
        )),
    }
}

pub(super) async fn send_file(files: Arc<ModelFiles>, req: Request<FileRequest, FileChunk>) {
    let Request {
        body, mut reply, ..
    } = req;
    let Some(bytes) = files.by_hash(&body.hash) else {
        let _ = reply
            .fail(
                RemoteErrorKind::BadRequest,
                format!("no model file with hash {}", body.hash),
            )
            .await;
        return;
    };
    let mut chunks = bytes.chunks(FILE_CHUNK).peekable();
    while let Some(c) = chunks.next() {
        let chunk = FileChunk { data: c.to_vec() };
        let sent = if chunks.peek().is_none() {
            return drop(reply.finish_with(&chunk).await);
        } else {
            reply.send(&chunk).await
        };
        if sent.is_err() {
            return;
        }
    }
    let _ = reply.finish().await;
}

pub(super) async fn send_dump(kv: Option<KvHandle>, req: Request<KvDumpRequest, KvDump>) {
    let Request { mut reply, .. } = req;
    let dump = match kv {
        Some(kv) => kv.dump().await,
        None => None,
    };
    let Some(dump) = dump else {
        let _ = reply
            .fail(
                RemoteErrorKind::Unavailable,
                "this engine has no KV cache to dump".to_string(),
            )
            .await;
        return;
    };
    // Device blocks, then the lower tiers' blocks, in pieces under the bus payload limit.
    let piece = |blocks: &[_], lower: &[_]| KvDump {
        last_event_id: dump.last_event_id,
        block_size: dump.block_size,
        blocks: blocks.to_vec(),
        lower: lower.to_vec(),
    };
    let mut pieces: Vec<KvDump> = dump
        .blocks
        .chunks(DUMP_PIECE)
        .map(|c| piece(c, &[]))
        .chain(dump.lower.chunks(DUMP_PIECE).map(|c| piece(&[], c)))
        .collect();
    if pieces.is_empty() {
        pieces.push(piece(&[], &[]));
    }
    let mut pieces = pieces.into_iter().peekable();
    while let Some(piece) = pieces.next() {
        if pieces.peek().is_none() {
            let _ = reply.finish_with(&piece).await;
            return;
        }
        if reply.send(&piece).await.is_err() {
            return;
        }
    }
}

/// Publishes KV event batches and load reports until aborted.
pub(super) fn spawn_kv_publishers(
    instance: &ComponentInstance,
    kv: &KvHandle,
) -> Vec<tokio::task::JoinHandle<()>> {
    let topic = |t: &str| Topic::new(t).expect("topic names are valid constants");
    let bus = instance.bus().clone();
    let events_subject = instance
        .component()
        .event_subject(&topic(KV_EVENTS_TOPIC), instance.id());
    let load_subject = instance
        .component()
        .event_subject(&topic(LOAD_TOPIC), instance.id());
    // Stamped on every batch and report: receivers check it against the subject.
    let worker = WorkerId(instance.id().as_u64());
    let mut events = kv.subscribe();
    let events_bus = bus.clone();
    let published = metrics::counter!(
        "dynamo_worker_kv_event_batches_total",
        "instance" => instance.id().to_string()
    );
    let events_task = tokio::spawn(async move {
        loop {
            let batch = match events.recv().await {
                Ok(b) => b,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    // Routers see the gap in event ids and resync from a dump.
                    tracing::warn!(lost_batches = n, "KV event publisher fell behind");
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            let payload = match encode_event(&KvEventBatch {
                worker,
                events: batch,
            }) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode KV events");
                    continue;
                }
            };
            let subject = events_subject.clone();
            match events_bus.publish(Outgoing::new(subject, payload)).await {
                Ok(()) => published.increment(1),
                Err(e) => tracing::warn!(error = %e, "cannot publish KV events"),
            }
        }
    });
    let mut load = kv.load();
    let id = instance.id().to_string();
    let gauges = [
        "dynamo_worker_active_blocks",
        "dynamo_worker_total_blocks",
        "dynamo_worker_waiting_requests",
        "dynamo_worker_running_requests",
        "dynamo_worker_queued_prefill_tokens",
    ]
    .map(|name| metrics::gauge!(name, "instance" => id.clone()));
    let mut tiers = TierMetrics::new(&id);
    drop(id);
    let load_task = tokio::spawn(async move {
        loop {
            let report = LoadReport {
                worker: Some(worker),
                ..*load.borrow_and_update()
            };
            for (g, v) in gauges.iter().zip([
                report.active_blocks,
                report.total_blocks,
                report.waiting_requests,
                report.running_requests,
                report.queued_prefill_tokens,
            ]) {
                g.set(v as f64);
            }
            if let Some(t) = report.tiers {
                tiers.record(&t);
            }
            if let Ok(payload) = encode_event(&report) {
                if let Err(e) = bus
                    .publish(Outgoing::new(load_subject.clone(), payload))
                    .await
                {
                    tracing::debug!(error = %e, "cannot publish load");
                }
            }
            tokio::time::sleep(LOAD_MIN_INTERVAL).await;
            // Publish again on the next change, or when the maximum interval is up.
            let wait = LOAD_MAX_INTERVAL - LOAD_MIN_INTERVAL;
            if let Ok(Err(_)) = tokio::time::timeout(wait, load.changed()).await {
                return;
            }
        }
    });
    vec![events_task, load_task]
}

/// The `generate` endpoint's discovery metadata: its role, its kind and the model card.
pub(super) fn card_metadata(
    card: &ModelCard,
    kind: WorkerKind,
    disagg: Option<&Disagg>,
) -> serde_json::Value {
    let mut meta = serde_json::Map::new();
    meta.insert("role".into(), "worker".into());
    meta.insert(WorkerKind::METADATA_KEY.into(), kind.as_str().into());
    if let Some(d) = disagg {
        // The transfer agent (regions, TCP address): how peers reach this worker's memory.
        meta.insert("kv_transfer".into(), d.metadata());
        if d.shares() {
            meta.insert("kv_share".into(), true.into());
        }
    }
    meta.insert(
        ModelCard::METADATA_KEY.into(),
        serde_json::to_value(card).unwrap_or_default(),
    );
    meta.into()
}

/// A worker's lower-tier series, from its engine's [`TierReport`] (counts since the engine
/// started: a restarted engine resets them, which Prometheus reads as a counter reset).
struct TierMetrics {
    gauges: Vec<(metrics::Gauge, Field)>,
    counters: Vec<(metrics::Counter, Field)>,
    /// Onboard latency: the report carries the count and total time of onboards so far; each
    /// report's new ones are recorded at their mean.
    onboard_seconds: metrics::Histogram,
    onboards_seen: (u64, u64),
}

use dynamo_protocols::kv::TierReport;

/// Reads one figure of a [`TierReport`].
type Field = fn(&TierReport) -> u64;

impl TierMetrics {
    fn new(id: &str) -> Self {
        let labels = |pairs: &[(&'static str, &'static str)]| {
            let mut v = vec![("instance", id.to_string())];
            v.extend(pairs.iter().map(|(k, val)| (*k, val.to_string())));
            v
        };
        let host = [("tier", "host")];
        let disk = [("tier", "disk")];
        let gauge = |name: &'static str, l: &[(&'static str, &'static str)]| {
            metrics::gauge!(name, &labels(l))
        };
        let counter = |name: &'static str, l: &[(&'static str, &'static str)]| {
            metrics::counter!(name, &labels(l))
        };
        let gauges: Vec<(metrics::Gauge, Field)> = vec![
            (gauge("dynamo_worker_kv_tier_blocks", &host), |t| {
                t.host_blocks
            }),
            (gauge("dynamo_worker_kv_tier_bytes", &host), |t| {
                t.host_bytes
            }),
            (gauge("dynamo_worker_kv_tier_blocks", &disk), |t| {
                t.disk_blocks
            }),
            (gauge("dynamo_worker_kv_tier_bytes", &disk), |t| {
                t.disk_bytes
            }),
            (gauge("dynamo_worker_kv_tier_unusable", &disk), |t| {
                t.disk_unusable
            }),
        ];
        let dropped = "dynamo_worker_kv_offload_dropped_total";
        let refused = "dynamo_worker_kv_refused_blocks_total";
        let hits = "dynamo_worker_kv_hit_tokens_total";
        let counters: Vec<(metrics::Counter, Field)> = vec![
            (
                counter("dynamo_worker_kv_offloaded_blocks_total", &host),
                |t| t.offloaded_blocks,
            ),
            (
                counter("dynamo_worker_kv_offloaded_bytes_total", &host),
                |t| t.offloaded_bytes,
            ),
            (
                counter("dynamo_worker_kv_offloaded_blocks_total", &disk),
                |t| t.disk_offloaded_blocks,
            ),
            (
                counter("dynamo_worker_kv_offloaded_bytes_total", &disk),
                |t| t.disk_offloaded_bytes,
            ),
            (
                counter(dropped, &[host[0], ("reason", "queue_full")]),
                |t| t.offload_dropped,
            ),
            (
                counter(dropped, &[disk[0], ("reason", "queue_full")]),
                |t| t.disk_dropped,
            ),
            (counter(dropped, &[disk[0], ("reason", "filtered")]), |t| {
                t.disk_filtered
            }),
            (
                counter(dropped, &[disk[0], ("reason", "write_error")]),
                |t| t.disk_write_errors,
            ),
            (counter("dynamo_worker_kv_tier_evicted_total", &host), |t| {
                t.host_evicted
            }),
            (counter("dynamo_worker_kv_tier_evicted_total", &disk), |t| {
                t.disk_evicted
            }),
            (
                counter("dynamo_worker_kv_onboarded_blocks_total", &host),
                |t| t.onboarded_blocks,
            ),
            (
                counter("dynamo_worker_kv_onboarded_blocks_total", &disk),
                |t| t.disk_onboarded_blocks,
            ),
            (
                counter("dynamo_worker_kv_onboard_declined_total", &[]),
                |t| t.onboard_declined,
            ),
            (counter(refused, &[disk[0], ("reason", "corrupt")]), |t| {
                t.disk_corrupt
            }),
            (counter(refused, &[disk[0], ("reason", "foreign")]), |t| {
                t.disk_foreign
            }),
            (
                counter("dynamo_worker_kv_recovered_blocks_total", &disk),
                |t| t.disk_recovered,
            ),
            (counter("dynamo_worker_kv_prompt_tokens_total", &[]), |t| {
                t.prompt_tokens
            }),
            (counter(hits, &[("tier", "device")]), |t| {
                t.device_hit_tokens
            }),
            (counter(hits, &host), |t| t.host_hit_tokens),
            (counter(hits, &disk), |t| t.disk_hit_tokens),
        ];
        Self {
            gauges,
            counters,
            onboard_seconds: metrics::histogram!("dynamo_worker_kv_onboard_seconds", &labels(&[])),
            onboards_seen: (0, 0),
        }
    }

    fn record(&mut self, t: &TierReport) {
        for (g, get) in &self.gauges {
            g.set(get(t) as f64);
        }
        for (c, get) in &self.counters {
            c.absolute(get(t));
        }
        let (n, us) = self.onboards_seen;
        // A restarted engine counts from zero again.
        let (n, us) = if t.onboards < n { (0, 0) } else { (n, us) };
        if t.onboards > n {
            let mean = t.onboard_micros.saturating_sub(us) as f64 / (t.onboards - n) as f64;
            for _ in n..t.onboards {
                self.onboard_seconds.record(mean / 1e6);
            }
        }
        self.onboards_seen = (t.onboards, t.onboard_micros);
    }
}
