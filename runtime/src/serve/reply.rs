//! What a hosted actor receives: the decoded request, its context and a typed reply stream.
//!
//! [`ReplySender`] numbers data-bearing frames and must end with [`ReplySender::finish`] or
//! [`ReplySender::fail`]; one dropped without either tells the caller `Internal` ("the handler
//! dropped the stream"), unless the request was cancelled, in which case nobody is listening.
//! While a request is open, a small task sends heartbeats when nothing else was sent for a
//! heartbeat interval, and cancels the request at its deadline.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::EndpointShared;
use crate::bus::{BusError, Outgoing};
use crate::rpc::wire::{self, Frame, FrameKind};
use crate::rpc::{RemoteError, RemoteErrorKind, RequestId};
use crate::subject::Subject;

/// A request delivered to a hosted actor.
pub struct Request<Req, Resp> {
    pub body: Req,
    pub ctx: RequestContext,
    pub reply: ReplySender<Resp>,
}

impl<Req: std::fmt::Debug, Resp> std::fmt::Debug for Request<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("body", &self.body)
            .field("id", &self.ctx.id)
            .finish()
    }
}

/// Id, deadline, trace and cancellation of one request.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub id: RequestId,
    pub deadline: Instant,
    /// The caller's trace id, or the request id when the caller sent none.
    pub trace_id: String,
    cancel: CancellationToken,
    span: tracing::Span,
}

impl RequestContext {
    /// Fires when the caller cancels, the deadline passes, or the endpoint shuts down past its
    /// grace period. Handlers stop their work when it does.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// The request's span (endpoint, request id, caller's trace id): instrument the handler's
    /// work with it so its logs carry the ids across tasks.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }
}

/// Why a reply could not be sent; every variant means "stop producing".
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error("request was cancelled")]
    Cancelled,
    #[error("response of {size} bytes exceeds the bus limit of {max} bytes; the caller was told")]
    TooLarge { size: usize, max: usize },
    #[error("cannot encode response: {0}")]
    Encode(String),
    #[error("bus failed: {0}")]
    Bus(BusError),
}

/// Shared between a request's [`ReplySender`], its heartbeat task and the endpoint's control
/// listener.
pub(super) struct Open {
    pub id: RequestId,
    pub reply: Subject,
    pub endpoint: Arc<EndpointShared>,
    pub cancel: CancellationToken,
    pub flow: Arc<super::Flow>,
    /// Data frames allowed beyond what the caller consumed (0: unlimited).
    pub window: u64,
    pub started: Instant,
    /// Milliseconds since `started` when the last frame went out.
    pub last_sent_ms: AtomicU64,
}

impl Open {
    /// Waits until the caller's window allows data frame `seq`; fails once cancelled.
    async fn credit_for(&self, seq: u64) -> Result<(), ReplyError> {
        if self.window == 0 {
            return Ok(());
        }
        loop {
            let granted = self.flow.credit.notified();
            if seq < self.flow.consumed.load(Ordering::Relaxed) + self.window {
                return Ok(());
            }
            tokio::select! {
                _ = granted => {}
                _ = self.cancel.cancelled() => return Err(ReplyError::Cancelled),
            }
        }
    }

    fn touch(&self) {
        self.last_sent_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    async fn publish(&self, seq: u64, kind: FrameKind) -> Result<(), ReplyError> {
        let frame = Frame {
            seq,
            from: self.endpoint.instance,
            kind,
        };
        let payload = wire::encode(&frame).map_err(|e| ReplyError::Encode(e.to_string()))?;
        self.touch();
        self.endpoint
            .bus
            .publish(Outgoing::new(self.reply.clone(), payload))
            .await
            .map_err(|e| match e {
                BusError::PayloadTooLarge { size, max } => ReplyError::TooLarge { size, max },
                other => ReplyError::Bus(other),
            })
    }
}

/// Sends the responses of one request, in order.
pub struct ReplySender<Resp> {
    open: Arc<Open>,
    seq: u64,
    ended: bool,
    _done: DropGuard,
    _resp: PhantomData<fn(Resp)>,
}

impl<Resp: Serialize> ReplySender<Resp> {
    /// Starts the heartbeat/deadline task and returns the sender and the context.
    pub(super) fn open(
        open: Arc<Open>,
        deadline: Instant,
        heartbeat: Duration,
        trace_id: String,
    ) -> (Self, RequestContext) {
        let done = CancellationToken::new();
        spawn_heartbeats(open.clone(), done.clone(), deadline, heartbeat);
        let span = tracing::info_span!(
            "request",
            endpoint = %open.endpoint.endpoint,
            id = %open.id,
            trace_id = %trace_id,
        );
        let ctx = RequestContext {
            id: open.id,
            deadline,
            trace_id,
            cancel: open.cancel.clone(),
            span,
        };
        let sender = Self {
            open,
            seq: 0,
            ended: false,
            _done: done.drop_guard(),
            _resp: PhantomData,
        };
        (sender, ctx)
    }

    /// Sends one response; waits while the caller's flow-control window is full. An error means
    /// the stream is over: stop producing.
    pub async fn send(&mut self, item: &Resp) -> Result<(), ReplyError> {
        self.publish_item(item, false).await?;
        self.seq += 1;
        Ok(())
    }

    /// Ends the stream successfully (or, when a shutdown cancelled it past its grace, tells
    /// the caller to go elsewhere: see [`super::Flow::handoff`]).
    pub async fn finish(mut self) -> Result<(), ReplyError> {
        if self.open.cancel.is_cancelled() && self.open.flow.handoff.load(Ordering::Relaxed) {
            return self.end_with(FrameKind::Error(handoff_error())).await;
        }
        self.end_with(FrameKind::End).await
    }

    /// Sends `item` as the last response and ends the stream, in one frame: a unary answer
    /// costs one message instead of two.
    pub async fn finish_with(mut self, item: &Resp) -> Result<(), ReplyError> {
        self.publish_item(item, true).await?;
        self.ended = true;
        self.open
            .endpoint
            .finish(self.open.id, self.open.started.elapsed(), false);
        Ok(())
    }

    /// Publishes a data frame (`last`: one that also ends the stream) once the window allows.
    /// One over the bus limit ends the stream with `ResponseTooLarge` for the caller instead.
    async fn publish_item(&mut self, item: &Resp, last: bool) -> Result<(), ReplyError> {
        if self.ended || self.open.cancel.is_cancelled() {
            return Err(ReplyError::Cancelled);
        }
        let body = wire::encode(item).map_err(|e| ReplyError::Encode(e.to_string()))?;
        self.open.credit_for(self.seq).await?;
        let kind = if last {
            FrameKind::Last(body)
        } else {
            FrameKind::Data(body)
        };
        match self.open.publish(self.seq, kind).await {
            Err(ReplyError::TooLarge { size, max }) => {
                self.end_with(FrameKind::Error(RemoteError::new(
                    RemoteErrorKind::ResponseTooLarge,
                    format!("a response of {size} bytes exceeds the bus limit of {max} bytes"),
                )))
                .await?;
                Err(ReplyError::TooLarge { size, max })
            }
            other => other,
        }
    }

    /// Ends the stream with an error the caller receives as `RpcError::Remote`.
    pub async fn fail(
        mut self,
        kind: RemoteErrorKind,
        message: impl Into<String>,
    ) -> Result<(), ReplyError> {
        self.end_with(FrameKind::Error(RemoteError::new(kind, message)))
            .await
    }

    async fn end_with(&mut self, kind: FrameKind) -> Result<(), ReplyError> {
        if self.ended {
            return Ok(());
        }
        self.ended = true;
        let failed = matches!(kind, FrameKind::Error(_));
        if let FrameKind::Error(e) = &kind {
            self.open.endpoint.stats.record_error(e);
        }
        let result = self.open.publish(self.seq, kind).await;
        self.open
            .endpoint
            .finish(self.open.id, self.open.started.elapsed(), failed);
        result
    }
}

impl<Resp> Drop for ReplySender<Resp> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let open = self.open.clone();
        let seq = self.seq;
        let cancelled = open.cancel.is_cancelled();
        if cancelled && open.flow.handoff.load(Ordering::Relaxed) {
            // The instance shuts down with the request open: the caller moves it elsewhere.
            // The request counts as open until the frame is out (the shutdown waits for it).
            let error = handoff_error();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = open.publish(seq, FrameKind::Error(error)).await;
                    open.endpoint.finish(open.id, open.started.elapsed(), false);
                });
                return;
            }
        }
        open.endpoint
            .finish(open.id, open.started.elapsed(), !cancelled);
        if cancelled {
            return;
        }
        let error = RemoteError::new(
            RemoteErrorKind::Internal,
            "the handler dropped the response stream without finishing it",
        );
        open.endpoint.stats.record_error(&error);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = open.publish(seq, FrameKind::Error(error)).await;
            });
        }
    }
}

/// What the caller of a request cancelled by a shutdown past its grace gets.
fn handoff_error() -> RemoteError {
    RemoteError::new(
        RemoteErrorKind::Unavailable,
        "the instance is shutting down and handed the request off",
    )
}

fn spawn_heartbeats(open: Arc<Open>, done: CancellationToken, deadline: Instant, every: Duration) {
    tokio::spawn(async move {
        let every_ms = every.as_millis() as u64;
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = done.cancelled() => break,
                _ = open.cancel.cancelled() => break,
                _ = tokio::time::sleep_until(deadline) => {
                    open.cancel.cancel();
                    break;
                }
                _ = tick.tick() => {
                    let since = (open.started.elapsed().as_millis() as u64)
                        .saturating_sub(open.last_sent_ms.load(Ordering::Relaxed));
                    if since + every_ms / 10 >= every_ms {
                        let _ = open.publish(0, FrameKind::Heartbeat).await;
                    }
                }
            }
        }
    });
}
