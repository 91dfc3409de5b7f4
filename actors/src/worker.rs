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

use std::sync::Arc;
use std::time::Duration;

use dynamo_engine::{Engine, EngineError};
use dynamo_preprocessor::ModelFiles;
use dynamo_protocols::llm::{EngineOutput, FileChunk, FileRequest, ModelCard, PreprocessedRequest};
use dynamo_runtime::rpc::RemoteErrorKind;
use dynamo_runtime::serve::{DrainReport, ServeError};
use dynamo_runtime::subject::EndpointName;
use dynamo_runtime::{ComponentInstance, Request, ServedEndpoint};
use futures::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::Instrument;

/// The usual name of the endpoint that generates tokens.
pub const GENERATE: &str = "generate";

/// Size of one model-file chunk on the bus (well under the 1 MiB NATS default).
const FILE_CHUNK: usize = 256 * 1024;

pub enum WorkerMsg {
    Generate(Request<PreprocessedRequest, EngineOutput>),
    File(Request<FileRequest, FileChunk>),
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
        let actor = WorkerActor {
            engine,
            files: Arc::new(files),
        };
        let (actor, _join) = Actor::spawn(None, actor, ())
            .await
            .map_err(|e| WorkerError::Spawn(e.to_string()))?;
        let name = |s: &str| EndpointName::new(s).expect("endpoint names are valid constants");
        let result = async {
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
            Ok::<_, ServeError>((generate, files))
        }
        .await;
        match result {
            Ok((generate, files)) => Ok(Self {
                actor,
                generate,
                files,
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
        self.actor.stop(None);
        report
    }
}
