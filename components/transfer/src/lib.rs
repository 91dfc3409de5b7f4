//! The KV transfer library: moves KV blocks between workers' memory with no bus in the data
//! path.
//!
//! - An [`Agent`] owns registered memory [`Region`]s (host memory now, a `memfd` each; device
//!   memory behind the `cuda` feature) and, optionally, a TCP listener.
//! - Its [`AgentMetadata`] (id, host identity, process, TCP address, regions with their
//!   [`Layout`]s) is plain serde data: it travels through discovery, never through this crate.
//! - A transfer is a list of [`WriteOp`]s (a source, local region bytes or owned bytes, and a
//!   destination [`Descriptor`] in a peer's region) or of reads, completing with a
//!   [`TransferReport`] or a typed [`TransferError`]; every transfer has a deadline.
//! - The backend is chosen per peer pair ([`Route::Auto`]): the same process copies directly;
//!   the same host (same kernel boot and pid namespace) maps the peer's memfd once and copies
//!   into it; anything else goes over TCP (several connections per peer, frames pipelined,
//!   one acknowledgement per connection per transfer, the receiver reading straight into its
//!   region).
//!
//! Safety of shared memory is a protocol matter: the receiver lends a range (a reservation)
//! to exactly one transfer until it completes or its deadline passes; this crate checks every
//! access against region bounds and layouts, and never registers anything as cached (that is
//! the engine's import, after a transfer succeeded).
// Unsafe code is denied except in `region` (shared mappings and raw copies), `tcp` (sockets
// reading into and writing from registered regions) and `cuda`, which say why at each block.
#![deny(unsafe_code)]

mod agent;
#[cfg(feature = "cuda")]
pub mod cuda;
mod layout;
mod region;
mod tcp;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use agent::{
    Agent, AgentId, AgentMetadata, AgentSettings, Backend, RegionInfo, Route, Source,
    TransferReport, WriteOp,
};
pub use layout::{Dtype, Layout};
pub use region::{Region, RegionId};

/// A byte range of a region: where a block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Descriptor {
    pub region: RegionId,
    pub offset: u64,
    pub len: u64,
}

/// Why a transfer did not happen; each variant is a decision for the caller. Nothing was
/// registered as cached on either side when a transfer fails (a partial write may have landed
/// in the destination range, which the caller must treat as garbage and release).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// The peers disagree on what a block is (do not retry: a configuration error).
    #[error("KV layouts differ: this side has {local}, the peer {remote}")]
    LayoutMismatch { local: Layout, remote: Layout },
    /// A descriptor reaches past its region (a bug or a stale descriptor; do not retry).
    #[error("a descriptor of {len} bytes at offset {offset} is outside its region of {region_len} bytes")]
    OutOfBounds {
        offset: u64,
        len: u64,
        region_len: u64,
    },
    /// The region is not (or no longer) registered on that agent.
    #[error("{0} is not registered")]
    UnknownRegion(RegionId),
    /// A region's memory is not the size its metadata says (stale metadata).
    #[error("the region holds {actual} bytes, its metadata says {expected}")]
    RegionSize { expected: u64, actual: u64 },
    /// Source and destination lengths differ.
    #[error("a {src}-byte source for a {dst}-byte destination")]
    LengthMismatch { src: u64, dst: u64 },
    /// The peer agent is gone (deregistered, its process exited, or unreachable): fall back.
    #[error("the peer is gone: {0}")]
    PeerGone(String),
    /// The transfer did not complete within its deadline: fall back.
    #[error("the transfer did not complete within {0:?}")]
    Timeout(Duration),
    /// No backend reaches the peer (e.g. TCP asked for and the peer has no listener).
    #[error("no route to the peer: {0}")]
    NoRoute(String),
    /// An I/O failure on this side (mapping, socket).
    #[error("i/o: {0}")]
    Io(String),
    /// Device memory was asked for where there is no usable CUDA driver or device.
    #[error("CUDA is unavailable: {0}")]
    CudaUnavailable(String),
}

impl TransferError {
    /// A failure of the path (peer, network, deadline) rather than of the request: the
    /// caller's fallback (local prefill) applies. The others are bugs or misconfiguration.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TransferError::PeerGone(_) | TransferError::Timeout(_) | TransferError::Io(_)
        )
    }

    /// A closed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            TransferError::LayoutMismatch { .. } => "layout_mismatch",
            TransferError::OutOfBounds { .. } => "out_of_bounds",
            TransferError::UnknownRegion(_) => "unknown_region",
            TransferError::RegionSize { .. } => "region_size",
            TransferError::LengthMismatch { .. } => "length_mismatch",
            TransferError::PeerGone(_) => "peer_gone",
            TransferError::Timeout(_) => "timeout",
            TransferError::NoRoute(_) => "no_route",
            TransferError::Io(_) => "io",
            TransferError::CudaUnavailable(_) => "cuda_unavailable",
        }
    }
}
