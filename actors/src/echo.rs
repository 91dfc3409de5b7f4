//! The echo role: streams a request's text back `repeat` times. It exercises every part of the
//! runtime a real role uses (hosting, streaming, cancellation, discovery, graceful shutdown)
//! without a model.
//!
//! Each request runs in its own task so a slow stream never holds up the mailbox; the task
//! stops at the next chunk once the request is cancelled.

use std::time::Duration;

use dynamo_protocols::echo::{EchoChunk, EchoRequest, MAX_REPEAT};
use dynamo_runtime::rpc::RemoteErrorKind;
use dynamo_runtime::serve::{DrainReport, ServeError};
use dynamo_runtime::subject::EndpointName;
use dynamo_runtime::{ComponentInstance, Request, ServedEndpoint};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::Instrument;

/// The endpoint name the echo role serves.
pub const ENDPOINT: &str = "generate";

/// Messages of the echo actor (private to this module).
enum EchoMsg {
    Generate(Request<EchoRequest, EchoChunk>),
}

impl From<Request<EchoRequest, EchoChunk>> for EchoMsg {
    fn from(r: Request<EchoRequest, EchoChunk>) -> Self {
        EchoMsg::Generate(r)
    }
}

struct EchoActor;

impl Actor for EchoActor {
    type Msg = EchoMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        _args: (),
    ) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        _state: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        let EchoMsg::Generate(req) = msg;
        let span = req.ctx.span().clone();
        tokio::spawn(run(req).instrument(span));
        Ok(())
    }
}

async fn run(req: Request<EchoRequest, EchoChunk>) {
    let Request {
        body,
        ctx,
        mut reply,
    } = req;
    if body.repeat > MAX_REPEAT {
        let _ = reply
            .fail(
                RemoteErrorKind::BadRequest,
                format!("repeat {} is over the limit of {MAX_REPEAT}", body.repeat),
            )
            .await;
        return;
    }
    let cancel = ctx.cancellation();
    let chunk = |index| EchoChunk {
        index,
        text: body.text.clone(),
    };
    let Some(last) = body.repeat.checked_sub(1) else {
        let _ = reply.finish().await;
        return;
    };
    for index in 0..=last {
        if index > 0 && body.delay_ms > 0 {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(body.delay_ms)) => {}
            }
        }
        if index == last {
            break;
        }
        if reply.send(&chunk(index)).await.is_err() {
            return;
        }
    }
    // The last chunk also ends the stream: one message fewer.
    if let Err(e) = reply.finish_with(&chunk(last)).await {
        tracing::debug!(error = %e, "echo: could not finish");
    }
}

/// A running echo role: its actor and its served endpoint.
pub struct EchoRole {
    actor: ActorRef<EchoMsg>,
    served: ServedEndpoint,
}

/// Why the echo role could not start.
#[derive(Debug, thiserror::Error)]
pub enum EchoError {
    #[error("cannot spawn the echo actor: {0}")]
    Spawn(String),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

impl EchoRole {
    /// Spawns the actor and serves it on `ENDPOINT` of `instance`.
    pub async fn start(instance: &ComponentInstance) -> Result<Self, EchoError> {
        let (actor, _join) = Actor::spawn(None, EchoActor, ())
            .await
            .map_err(|e| EchoError::Spawn(e.to_string()))?;
        let endpoint =
            EndpointName::new(ENDPOINT).expect("the echo endpoint name is a valid constant");
        let served = instance
            .serve::<EchoRequest, EchoChunk, _>(
                endpoint,
                actor.clone(),
                serde_json::json!({ "role": "echo" }),
            )
            .await;
        match served {
            Ok(served) => Ok(Self { actor, served }),
            Err(e) => {
                actor.stop(None);
                Err(e.into())
            }
        }
    }

    pub fn served(&self) -> &ServedEndpoint {
        &self.served
    }

    /// Deregisters, drains open requests up to `grace`, then stops the actor.
    pub async fn shutdown(self, grace: Duration) -> DrainReport {
        let report = self.served.shutdown(grace).await;
        self.actor.stop(None);
        report
    }
}
