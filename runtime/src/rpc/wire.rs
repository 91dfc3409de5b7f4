//! Wire types of the streaming RPC protocol (MessagePack via `rmp-serde`). Versioned: a
//! responder refuses an envelope whose `v` it does not know with a `BadRequest` frame.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::subject::InstanceId;

/// The protocol version this build speaks.
pub(crate) const PROTOCOL_VERSION: u8 = 1;

/// Identifies one request end to end (logs, cancellation, traces).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(uuid::Uuid);

impl RequestId {
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4())
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a caller publishes to an endpoint subject.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RequestEnvelope {
    pub v: u8,
    pub id: RequestId,
    /// Time left until the caller's deadline when it sent the request, in milliseconds
    /// (relative, so hosts need no synchronized clocks).
    pub timeout_ms: u64,
    /// How often the caller wants a heartbeat while nothing else is sent.
    pub heartbeat_ms: u64,
    /// Flow control: the responder keeps at most this many data frames beyond what the caller
    /// acknowledged in flight (0: no limit).
    #[serde(default)]
    pub window: u64,
    /// The endpoint-specific request, itself MessagePack.
    pub body: Bytes,
}

/// One frame of a response stream.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Frame {
    /// Sequence of data-bearing frames (`Data`, `Last`, `End`, `Error`), from 0; heartbeats carry 0
    /// and are not numbered.
    pub seq: u64,
    /// The instance answering, so the caller can direct a cancellation to it.
    pub from: InstanceId,
    pub kind: FrameKind,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum FrameKind {
    Data(Bytes),
    /// The last data frame, which is also the end.
    Last(Bytes),
    End,
    Error(RemoteError),
    Heartbeat,
}

/// What a caller sends to a responder's control subject.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Control {
    Cancel {
        id: RequestId,
    },
    /// The caller has consumed `consumed` data frames: the responder may send up to
    /// `consumed + window`.
    Ack {
        id: RequestId,
        consumed: u64,
    },
    /// Is request `id` still open there? Sent with the call's reply subject after a silence:
    /// a responder that has it answers with a heartbeat; one whose process is gone has no
    /// subscription left, so the bus answers "no responders" at once.
    Ping {
        id: RequestId,
    },
}

/// An error a responder reports, classified by what the caller should do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct RemoteError {
    pub kind: RemoteErrorKind,
    pub message: String,
}

impl RemoteError {
    pub fn new(kind: RemoteErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// The classes of remote failure (a closed set: metric labels and HTTP statuses come from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RemoteErrorKind {
    /// The request was malformed or of a type the endpoint does not take: do not retry.
    BadRequest,
    /// Too much work in flight at that instance: retry elsewhere or later.
    Overloaded,
    /// The instance is shutting down or its handler is gone: retry elsewhere.
    Unavailable,
    /// The responder's part of a frame was over the bus limit.
    ResponseTooLarge,
    /// The request's deadline passed at the responder.
    DeadlineExceeded,
    /// The handler failed.
    Internal,
    /// The worker's engine died with the request in flight (a panic, a crash): the worker
    /// deregisters and restarts it; the request is safe to migrate to another worker.
    WorkerFailed,
}

impl RemoteErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RemoteErrorKind::BadRequest => "bad_request",
            RemoteErrorKind::Overloaded => "overloaded",
            RemoteErrorKind::Unavailable => "unavailable",
            RemoteErrorKind::ResponseTooLarge => "response_too_large",
            RemoteErrorKind::DeadlineExceeded => "remote_deadline_exceeded",
            RemoteErrorKind::Internal => "internal",
            RemoteErrorKind::WorkerFailed => "worker_failed",
        }
    }
}

impl fmt::Display for RemoteErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Encodes `value` (named fields). The buffer starts at 128 bytes: a streamed token's frame
/// fits, where growing from empty took four reallocations per frame.
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, rmp_serde::encode::Error> {
    let mut buf = Vec::with_capacity(128);
    rmp_serde::encode::write_named(&mut buf, value)?;
    Ok(Bytes::from(buf))
}

pub(crate) fn decode<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // Whatever arrives from the bus, decoding returns an error or a value: never a panic,
        // never an allocation sized by a forged length prefix.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Frame>(&bytes);
            let _ = decode::<RequestEnvelope>(&bytes);
            let _ = decode::<Control>(&bytes);
        }

        #[test]
        fn frames_round_trip(seq in any::<u64>(), from in any::<u64>(), body in prop::collection::vec(any::<u8>(), 0..64)) {
            let frame = Frame { seq, from: InstanceId::new(from), kind: FrameKind::Data(Bytes::from(body.clone())) };
            let back: Frame = decode(&encode(&frame).unwrap()).unwrap();
            prop_assert_eq!(back.seq, seq);
            prop_assert_eq!(back.from, InstanceId::new(from));
            prop_assert!(matches!(back.kind, FrameKind::Data(b) if b[..] == body[..]));
        }
    }

    #[test]
    fn forged_length_prefixes_are_refused() {
        // A bin32 claiming 4 GiB, an array32 claiming 4 billion elements: errors, no allocation.
        let huge_bin = [0xc6, 0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        let huge_array = [0xdd, 0xff, 0xff, 0xff, 0xff, 0];
        assert!(decode::<RequestEnvelope>(&huge_bin).is_err());
        assert!(decode::<Frame>(&huge_array).is_err());
        assert!(decode::<Vec<u64>>(&huge_array).is_err());
    }
}
