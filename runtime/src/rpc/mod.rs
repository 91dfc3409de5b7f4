//! Streaming request/response over the bus.
//!
//! A caller sends one [`wire::RequestEnvelope`] (request id, time left until its deadline, the
//! heartbeat interval it wants, the encoded body) with a reply subject in its own multiplexed
//! inbox. The responder answers with ordered [`wire::Frame`]s: `Data`, then exactly one of `End`
//! or `Error`, or a `Last` that is data and end at once (a unary answer is one message); `Heartbeat`s while it works and has nothing else to say. Data-bearing frames are
//! numbered from 0, so a lost frame is noticed, never skipped silently.
//!
//! The caller ([`ResponseStream`]) turns every failure into one [`RpcError`] variant the caller
//! can act on: `NoResponders` (nobody serves it: fail or wait), `DeadlineExceeded`,
//! `PayloadTooLarge` (nothing was sent), `Disconnected` (the responder went silent past the
//! heartbeat deadline, or a probe after a shorter silence found it gone: migrate or retry), `Remote` (the responder said no, with a kind), and
//! `Protocol` (a lost frame). Anyone on the bus can publish to a call's inbox, so a frame that
//! does not decode, or that comes from another instance than the one answering, is dropped and
//! counted (`dynamo_bus_malformed_messages_total{kind="reply"}`), not taken as the stream's end.
//! Dropping a stream before its end cancels the request:
//! a control message reaches the responder, whose handler sees its cancellation token fire.
//!
//! Flow control: a stream has a window of `rpc.stream_window` data frames. The caller
//! acknowledges what it consumed (every half window, on the responder's control subject); the
//! responder's `send` waits while a whole window is unacknowledged. So a slow reader slows its
//! responder down and no frame is ever dropped for lack of buffer.

mod client;
pub(crate) mod wire;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use client::{CallOptions, RawResponseStream, ResponseStream, RpcClient, Target, TRACE_HEADER};
pub use wire::{RemoteError, RemoteErrorKind, RequestId};

use crate::bus::BusError;

/// Heartbeat and deadline settings of the RPC layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RpcSettings {
    /// How often a responder with nothing to send says it is alive.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How long a caller waits in silence before it declares the responder gone.
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// Silence after which a caller asks whether its responder still has the request
    /// (`Control::Ping` on the responder's control subject): at least this (20 ms), or 3x the stream's
    /// own recent gap between frames, doubling while the silence lasts (at most 250 ms apart).
    /// A responder whose process died has no subscription left, so the bus answers "no
    /// responders" at once and the call ends `Disconnected` within a few gaps, not after the
    /// heartbeat timeout. Zero: no probes.
    #[serde(with = "humantime_serde")]
    pub probe_after: Duration,
    /// The deadline of a request that sets none.
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    /// Requests one served endpoint runs at once; more are refused as `Overloaded`.
    pub max_inflight: usize,
    /// Flow control per stream: data frames a responder may send beyond what the caller has
    /// consumed. A caller that reads slowly slows its responder instead of losing frames.
    pub stream_window: u64,
}

impl Default for RpcSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(3),
            probe_after: Duration::from_millis(20),
            default_timeout: Duration::from_secs(600),
            max_inflight: 4096,
            stream_window: 256,
        }
    }
}

impl RpcSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_interval.is_zero() {
            return Err("rpc.heartbeat_interval must be above zero".into());
        }
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return Err(format!(
                "rpc.heartbeat_timeout ({:?}) must be longer than rpc.heartbeat_interval ({:?}); 3x is usual",
                self.heartbeat_timeout, self.heartbeat_interval
            ));
        }
        if self.stream_window < 2 {
            return Err("rpc.stream_window must be at least 2".into());
        }
        if self.max_inflight == 0 {
            return Err("rpc.max_inflight must be at least 1".into());
        }
        Ok(())
    }
}

/// Everything that can end a call, classified for the caller's decision.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// No instance serves the subject: fail, or wait for one to join.
    #[error("no responders for {subject}")]
    NoResponders { subject: String },
    /// The request's deadline passed before its last frame.
    #[error("deadline exceeded after {elapsed:?}")]
    DeadlineExceeded { elapsed: Duration },
    /// The request is larger than the bus accepts; nothing was sent.
    #[error("request of {size} bytes exceeds the bus limit of {max} bytes")]
    PayloadTooLarge { size: usize, max: usize },
    /// The responder went silent past the heartbeat deadline, or a probe after a silence
    /// found it gone from the bus (it died or lost the bus): safe to migrate the request to
    /// another instance.
    #[error("responder disconnected: silent for {silent_for:?}")]
    Disconnected { silent_for: Duration },
    /// The responder refused or failed the request.
    #[error("remote error ({}): {}", .0.kind, .0.message)]
    Remote(RemoteError),
    /// Frames were lost (or the reply inbox closed).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The request could not be encoded.
    #[error("cannot encode request: {0}")]
    Encode(String),
    /// The bus failed.
    #[error(transparent)]
    Bus(BusError),
}

impl From<BusError> for RpcError {
    fn from(e: BusError) -> Self {
        match e {
            BusError::PayloadTooLarge { size, max } => RpcError::PayloadTooLarge { size, max },
            BusError::NoResponders { subject } => RpcError::NoResponders { subject },
            other => RpcError::Bus(other),
        }
    }
}

impl RpcError {
    /// A closed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            RpcError::NoResponders { .. } => "no_responders",
            RpcError::DeadlineExceeded { .. } => "deadline_exceeded",
            RpcError::PayloadTooLarge { .. } => "payload_too_large",
            RpcError::Disconnected { .. } => "disconnected",
            RpcError::Remote(e) => e.kind.as_str(),
            RpcError::Protocol(_) => "protocol",
            RpcError::Encode(_) => "encode",
            RpcError::Bus(_) => "bus",
        }
    }
}
