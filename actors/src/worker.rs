//! The worker role: hosts an [`Engine`] on the `generate` endpoint and publishes its model card.
//!
//! - `generate` takes a [`PreprocessedRequest`] and streams [`EngineOutput`]s; the last one
//!   carries the finish reason and ends the stream in the same message. Each request runs in
//!   its own task; the engine sees the request's cancellation token, so a client that goes
//!   away stops generation within one engine step.
//! - `model_files` serves the files named in the card, by content hash, in chunks under the
//!   bus payload limit, so a frontend can build the same preprocessor without the folder.
//! - The card is the `model` key of the `generate` endpoint's discovery metadata: a frontend
//!   lists the model while at least one worker serving it is registered.
//! - An engine with a KV cache (the mocker, later the native engine) also gets: its KV event
//!   batches published on `dyn.ev.{ns}.{component}.kv_events.{instance}` as they happen; its
//!   load on `...load.{instance}`, on change (at most every [`LOAD_MIN_INTERVAL`]) and at least
//!   every [`LOAD_MAX_INTERVAL`] (also as `dynamo_worker_*` gauges per instance); and a `kv_dump` endpoint that streams its cached set (pieces
//!   of at most [`DUMP_PIECE`] blocks) for routers that must resync.

use std::sync::Arc;
use std::time::Duration;

use dynamo_engine::{Engine, EngineError, KvHandle};
use dynamo_preprocessor::ModelFiles;
use dynamo_protocols::kv::{
    KvDump, KvDumpRequest, KvEventBatch, KV_DUMP_ENDPOINT, KV_EVENTS_TOPIC, LOAD_TOPIC,
};
use dynamo_protocols::llm::{EngineOutput, FileChunk, FileRequest, ModelCard, PreprocessedRequest};
use dynamo_runtime::bus::Outgoing;
use dynamo_runtime::rpc::RemoteErrorKind;
use dynamo_runtime::serve::{encode_event, DrainReport, ServeError};
use dynamo_runtime::subject::{EndpointName, Topic};
use dynamo_runtime::{ComponentInstance, Request, ServedEndpoint};
use futures::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::Instrument;

/// The usual name of the endpoint that generates tokens.
pub const GENERATE: &str = "generate";

/// Size of one model-file chunk on the bus (well under the 1 MiB NATS default).
const FILE_CHUNK: usize = 256 * 1024;
/// Load is published on change at most this often...
pub const LOAD_MIN_INTERVAL: Duration = Duration::from_millis(100);
/// ...and at least this often.
pub const LOAD_MAX_INTERVAL: Duration = Duration::from_secs(1);
/// Blocks per `kv_dump` piece (about 30 bytes each: well under the bus payload limit).
pub const DUMP_PIECE: usize = 8192;

pub enum WorkerMsg {
    Generate(Request<PreprocessedRequest, EngineOutput>),
    File(Request<FileRequest, FileChunk>),
    Dump(Request<KvDumpRequest, KvDump>),
}

impl From<Request<KvDumpRequest, KvDump>> for WorkerMsg {
    fn from(r: Request<KvDumpRequest, KvDump>) -> Self {
        WorkerMsg::Dump(r)
    }
}

impl From<Request<PreprocessedRequest, EngineOutput>> for WorkerMsg {
    fn from(r: Request<PreprocessedRequest, EngineOutput>) -> Self {
        WorkerMsg::Generate(r)
    }
}

impl From<Request<FileRequest, FileChunk>> for WorkerMsg {
    fn from(r: Request<FileRequest, FileChunk>) -> Self {
        WorkerMsg::File(r)
    }
}

struct WorkerActor {
    engine: Arc<dyn Engine>,
    files: Arc<ModelFiles>,
}

impl Actor for WorkerActor {
    type Msg = WorkerMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<WorkerMsg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<WorkerMsg>,
        msg: WorkerMsg,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::Generate(req) => {
                let span = req.ctx.span().clone();
                tokio::spawn(generate(self.engine.clone(), req).instrument(span));
            }
            WorkerMsg::File(req) => {
                tokio::spawn(send_file(self.files.clone(), req));
            }
            WorkerMsg::Dump(req) => {
                tokio::spawn(send_dump(self.engine.kv(), req));
            }
        }
        Ok(())
    }
}

fn remote_kind(e: &EngineError) -> RemoteErrorKind {
    match e {
        EngineError::BadRequest(_) => RemoteErrorKind::BadRequest,
        EngineError::Overloaded(_) => RemoteErrorKind::Overloaded,
        EngineError::Internal(_) => RemoteErrorKind::Internal,
    }
}

async fn generate(engine: Arc<dyn Engine>, req: Request<PreprocessedRequest, EngineOutput>) {
    let Request {
        body,
        ctx,
        mut reply,
    } = req;
    if body.token_ids.is_empty() {
        let _ = reply
            .fail(
                RemoteErrorKind::BadRequest,
                "the prompt has no tokens".to_string(),
            )
            .await;
        return;
    }
    let mut stream = match engine.generate(body, ctx.cancellation().clone()) {
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
    let _ = reply.finish().await;
}

async fn send_file(files: Arc<ModelFiles>, req: Request<FileRequest, FileChunk>) {
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

async fn send_dump(kv: Option<KvHandle>, req: Request<KvDumpRequest, KvDump>) {
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
    let pieces: Vec<KvDump> = if dump.blocks.is_empty() {
        vec![dump]
    } else {
        dump.blocks
            .chunks(DUMP_PIECE)
            .map(|c| KvDump {
                last_event_id: dump.last_event_id,
                block_size: dump.block_size,
                blocks: c.to_vec(),
            })
            .collect()
    };
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
fn spawn_kv_publishers(
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
            let payload = match encode_event(&KvEventBatch { events: batch }) {
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
    drop(id);
    let load_task = tokio::spawn(async move {
        loop {
            let report = *load.borrow_and_update();
            for (g, v) in gauges.iter().zip([
                report.active_blocks,
                report.total_blocks,
                report.waiting_requests,
                report.running_requests,
                report.queued_prefill_tokens,
            ]) {
                g.set(v as f64);
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

/// The `generate` endpoint's discovery metadata: its role and the model card.
fn card_metadata(card: &ModelCard) -> serde_json::Value {
    let mut meta = serde_json::Map::new();
    meta.insert("role".into(), "worker".into());
    meta.insert(
        ModelCard::METADATA_KEY.into(),
        serde_json::to_value(card).unwrap_or_default(),
    );
    meta.into()
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot spawn the worker actor: {0}")]
    Spawn(String),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// A running worker: its actor and its two endpoints.
pub struct WorkerRole {
    actor: ActorRef<WorkerMsg>,
    generate: ServedEndpoint,
    files: ServedEndpoint,
    dump: Option<ServedEndpoint>,
    publishers: Vec<tokio::task::JoinHandle<()>>,
}

impl WorkerRole {
    /// Serves `engine` on `endpoint` (usually [`GENERATE`]) and the card's files on `model_files`, and publishes
    /// `card` (the `model_files` endpoint registers first, so a frontend that sees the card
    /// can fetch the files).
    pub async fn start(
        instance: &ComponentInstance,
        endpoint: EndpointName,
        engine: Arc<dyn Engine>,
        card: ModelCard,
        files: ModelFiles,
    ) -> Result<Self, WorkerError> {
        let kv = engine.kv();
        let actor = WorkerActor {
            engine,
            files: Arc::new(files),
        };
        let (actor, _join) = Actor::spawn(None, actor, ())
            .await
            .map_err(|e| WorkerError::Spawn(e.to_string()))?;
        let name = |s: &str| EndpointName::new(s).expect("endpoint names are valid constants");
        let result = async {
            let dump = match &kv {
                Some(_) => Some(
                    instance
                        .serve::<KvDumpRequest, KvDump, _>(
                            name(KV_DUMP_ENDPOINT),
                            actor.clone(),
                            serde_json::json!({ "role": "kv_dump" }),
                        )
                        .await?,
                ),
                None => None,
            };
            let files = instance
                .serve::<FileRequest, FileChunk, _>(
                    name(ModelCard::FILES_ENDPOINT),
                    actor.clone(),
                    serde_json::json!({ "role": "model_files" }),
                )
                .await?;
            let generate = instance
                .serve::<PreprocessedRequest, EngineOutput, _>(
                    endpoint,
                    actor.clone(),
                    card_metadata(&card),
                )
                .await?;
            Ok::<_, ServeError>((generate, files, dump))
        }
        .await;
        match result {
            Ok((generate, files, dump)) => Ok(Self {
                publishers: kv
                    .as_ref()
                    .map(|kv| spawn_kv_publishers(instance, kv))
                    .unwrap_or_default(),
                actor,
                generate,
                files,
                dump,
            }),
            Err(e) => {
                actor.stop(None);
                Err(e.into())
            }
        }
    }

    pub fn served(&self) -> &ServedEndpoint {
        &self.generate
    }

    /// Deregisters, drains open requests up to `grace`, then stops the actor.
    pub async fn shutdown(self, grace: Duration) -> DrainReport {
        let report = self.generate.shutdown(grace).await;
        self.files.shutdown(Duration::from_secs(1)).await;
        if let Some(d) = self.dump {
            d.shutdown(Duration::from_secs(1)).await;
        }
        for p in self.publishers {
            p.abort();
        }
        self.actor.stop(None);
        report
    }
}
