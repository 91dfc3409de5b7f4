//! The TCP backend: transfers between hosts.
//!
//! Wire format (little-endian), client to server on one connection:
//! - `WRITE`: `1u8, region u32, offset u64, len u64, layout fingerprint u64`, then `len` bytes,
//!   which the server reads straight into its region;
//! - `FENCE`: `2u8, seq u64`: the server answers with the status of every frame since the last
//!   fence (`0u8, seq` or an error reply), so a transfer costs one round trip per connection,
//!   never one per block;
//! - `READ`: `3u8, region u32, offset u64, len u64, fingerprint u64`: the server answers `0u8`
//!   and `len` bytes, or an error reply.
//!
//! Error reply: `code u8 (1 unknown region, 2 out of bounds, 3 layout, 4 other, 5 agent gone), a u64, b u64,
//! c u64, message length u32, message`. A frame the server refuses is drained (up to
//! [`DRAIN_MAX`]) so the connection stays in step; past that the server closes it.
//!
//! Sockets are plain blocking ones on their own threads (the listener and one thread per
//! accepted connection; a transfer's connections each in a blocking task), like the raw
//! socket the benchmark compares against: no readiness polling between a frame's reads.
//!
//! A transfer's writes are cut into pieces (its bytes over the connections, between
//! [`MIN_PIECE`] and [`PIECE`] each) and spread over the
//! peer's connections, biggest first to the least loaded. A connection is taken out of its
//! slot for a transfer and put back only after a clean fence: one cut mid-frame (timeout,
//! error) is dropped, never reused.
// Sockets read into and write from registered regions through `Mapping::view*`; each unsafe
// block says why the range is exclusively this transfer's.
#![allow(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;

use crate::agent::AgentInner;
use crate::{Descriptor, Dtype, Layout, Region, RegionId, Source, TransferError, WriteOp};
const OP_WRITE: u8 = 1;
const OP_FENCE: u8 = 2;
const OP_READ: u8 = 3;
/// Largest piece one frame carries.
const PIECE: u64 = 4 << 20;
/// Smallest piece a write is cut into to spread it over connections.
const MIN_PIECE: u64 = 256 << 10;
/// Largest refused frame the server reads and discards to keep the connection.
const DRAIN_MAX: u64 = 64 << 20;
/// Connections a listener serves at once; more are closed on arrival.
const MAX_CONNECTIONS: usize = 256;

/// A refusal, as the server sends it.
struct Refusal {
    code: u8,
    a: u64,
    b: u64,
    c: u64,
    message: String,
}

impl Refusal {
    fn of(e: &TransferError) -> Self {
        let (code, a, b, c) = match e {
            TransferError::UnknownRegion(r) => (1, r.0 as u64, 0, 0),
            TransferError::OutOfBounds {
                offset,
                len,
                region_len,
            } => (2, *offset, *len, *region_len),
            TransferError::LayoutMismatch { local, .. } => (
                3,
                (local.layers as u64) << 32 | local.kv_heads as u64,
                (local.head_dim as u64) << 32 | local.block_size as u64,
                match local.dtype {
                    Dtype::F32 => 1,
                    Dtype::F16 => 2,
                    Dtype::Bf16 => 3,
                    Dtype::F8 => 4,
                },
            ),
            TransferError::PeerGone(_) => (5, 0, 0, 0),
            _ => (4, 0, 0, 0),
        };
        Self {
            code,
            a,
            b,
            c,
            message: e.to_string(),
        }
    }

    fn into_error(self, ours: Layout) -> TransferError {
        match self.code {
            1 => TransferError::UnknownRegion(RegionId(self.a as u32)),
            2 => TransferError::OutOfBounds {
                offset: self.a,
                len: self.b,
                region_len: self.c,
            },
            3 => TransferError::LayoutMismatch {
                local: ours,
                remote: Layout {
                    layers: (self.a >> 32) as u32,
                    kv_heads: self.a as u32,
                    head_dim: (self.b >> 32) as u32,
                    block_size: self.b as u32,
                    dtype: match self.c {
                        1 => Dtype::F32,
                        2 => Dtype::F16,
                        3 => Dtype::Bf16,
                        _ => Dtype::F8,
                    },
                },
            },
            5 => TransferError::PeerGone(self.message),
            _ => TransferError::Io(format!("the peer refused the transfer: {}", self.message)),
        }
    }

    fn send(&self, s: &mut TcpStream) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(29 + self.message.len());
        buf.push(self.code);
        for x in [self.a, self.b, self.c] {
            buf.extend_from_slice(&x.to_le_bytes());
        }
        buf.extend_from_slice(&(self.message.len() as u32).to_le_bytes());
        buf.extend_from_slice(self.message.as_bytes());
        s.write_all(&buf)
    }

    /// Reads the rest of a refusal whose code byte was read.
    fn recv(code: u8, s: &mut TcpStream) -> std::io::Result<Self> {
        let mut h = [0u8; 28];
        s.read_exact(&mut h)?;
        let word = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        let n = u32::from_le_bytes(h[24..28].try_into().expect("4 bytes")) as usize;
        let mut msg = vec![0u8; n.min(4096)];
        s.read_exact(&mut msg)?;
        Ok(Self {
            code,
            a: word(0),
            b: word(8),
            c: word(16),
            message: String::from_utf8_lossy(&msg).into_owned(),
        })
    }
}

fn header(op: u8, d: &Descriptor, fp: u64) -> [u8; 29] {
    let mut h = [0u8; 29];
    h[0] = op;
    h[1..5].copy_from_slice(&d.region.0.to_le_bytes());
    h[5..13].copy_from_slice(&d.offset.to_le_bytes());
    h[13..21].copy_from_slice(&d.len.to_le_bytes());
    h[21..29].copy_from_slice(&fp.to_le_bytes());
    h
}

/// A listener's thread: accepts connections until `stop` is set (the agent's drop sets it
/// and connects once to wake the accept).
pub(crate) struct Listener {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Listener {
    /// Serves `listener` (bound by the caller, which knows its address first).
    pub(crate) fn start(listener: TcpListener, agent: Weak<AgentInner>) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let open = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("kv-transfer-listen".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if flag.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                        open.fetch_sub(1, Ordering::AcqRel);
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let (agent, open) = (agent.clone(), open.clone());
                    let spawned = std::thread::Builder::new()
                        .name("kv-transfer-conn".into())
                        .spawn(move || {
                            let _ = connection(stream, agent);
                            open.fetch_sub(1, Ordering::AcqRel);
                        });
                    if spawned.is_err() {
                        // Out of threads: this connection is dropped (its peer sees it closed).
                        continue;
                    }
                }
            })?;
        Ok(Self { addr, stop })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept so the thread sees the flag and closes the listener.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// Checks a frame against the agent's regions: the region, its layout, the bounds.
fn admit(
    agent: &Weak<AgentInner>,
    d: &Descriptor,
    fp: u64,
) -> Result<Arc<crate::Region>, TransferError> {
    let agent = agent
        .upgrade()
        .ok_or_else(|| TransferError::PeerGone("the agent has stopped".into()))?;
    let region = agent.region(d.region)?;
    if region.layout().fingerprint() != fp {
        return Err(TransferError::LayoutMismatch {
            local: region.layout(),
            remote: region.layout(),
        });
    }
    if d.offset
        .checked_add(d.len)
        .is_none_or(|e| e > region.len() as u64)
    {
        return Err(TransferError::OutOfBounds {
            offset: d.offset,
            len: d.len,
            region_len: region.len() as u64,
        });
    }
    Ok(region)
}

fn connection(mut s: TcpStream, agent: Weak<AgentInner>) -> std::io::Result<()> {
    let mut refused: Option<TransferError> = None;
    loop {
        let mut op = [0u8; 1];
        if s.read_exact(&mut op).is_err() {
            return Ok(());
        }
        match op[0] {
            OP_WRITE | OP_READ => {
                let mut h = [0u8; 28];
                s.read_exact(&mut h)?;
                let d = Descriptor {
                    region: RegionId(u32::from_le_bytes(h[0..4].try_into().expect("4"))),
                    offset: u64::from_le_bytes(h[4..12].try_into().expect("8")),
                    len: u64::from_le_bytes(h[12..20].try_into().expect("8")),
                };
                let fp = u64::from_le_bytes(h[20..28].try_into().expect("8"));
                let admitted = admit(&agent, &d, fp);
                if op[0] == OP_READ {
                    match admitted {
                        Ok(region) => {
                            // SAFETY: a read's range belongs to the reader's transfer; the
                            // owner does not write it meanwhile (the protocol's contract).
                            let bytes =
                                unsafe { region.mapping.view(d.offset as usize, d.len as usize) }
                                    .expect("bounds were checked");
                            s.write_all(&[0])?;
                            s.write_all(bytes)?;
                        }
                        Err(e) => Refusal::of(&e).send(&mut s)?,
                    }
                    continue;
                }
                match admitted {
                    Ok(region) => {
                        // SAFETY: the writer was lent this range (a reservation) and nobody
                        // reads it until the transfer's fence is acknowledged.
                        let dst =
                            unsafe { region.mapping.view_mut(d.offset as usize, d.len as usize) }
                                .expect("bounds were checked");
                        s.read_exact(dst)?;
                    }
                    Err(e) => {
                        if d.len > DRAIN_MAX {
                            return Ok(());
                        }
                        std::io::copy(&mut (&mut s).take(d.len), &mut std::io::sink())?;
                        refused.get_or_insert(e);
                    }
                }
            }
            OP_FENCE => {
                let mut seq = [0u8; 8];
                s.read_exact(&mut seq)?;
                match refused.take() {
                    None => {
                        let mut ack = [0u8; 9];
                        ack[1..].copy_from_slice(&seq);
                        s.write_all(&ack)?;
                    }
                    Some(e) => Refusal::of(&e).send(&mut s)?,
                }
            }
            _ => return Ok(()),
        }
    }
}

/// A piece of a write: its bytes' source (owned handles, for a blocking task) and
/// destination.
struct Piece {
    src: PieceSrc,
    dst: Descriptor,
}

enum PieceSrc {
    Bytes(Bytes),
    Region(Arc<Region>, Descriptor),
}

fn io(e: std::io::Error) -> TransferError {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::ConnectionAborted
        | std::io::ErrorKind::BrokenPipe
        | std::io::ErrorKind::UnexpectedEof => TransferError::PeerGone(e.to_string()),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            TransferError::PeerGone(format!("the peer stopped answering: {e}"))
        }
        _ => TransferError::Io(e.to_string()),
    }
}

/// Connections to one peer (blocking sockets, used from blocking tasks).
pub(crate) struct TcpPeer {
    addr: SocketAddr,
    timeout: Duration,
    conns: Arc<Vec<Mutex<Option<TcpStream>>>>,
}

impl TcpPeer {
    pub(crate) fn new(addr: SocketAddr, connections: usize, timeout: Duration) -> Self {
        Self {
            addr,
            timeout,
            conns: Arc::new((0..connections.max(1)).map(|_| Mutex::new(None)).collect()),
        }
    }

    /// Runs `f` on connection `slot` in a blocking task; the connection goes back to its
    /// slot only if `f` succeeded (one cut mid-frame is never reused).
    async fn on_conn<T: Send + 'static>(
        &self,
        slot: usize,
        f: impl FnOnce(&mut TcpStream) -> Result<T, TransferError> + Send + 'static,
    ) -> Result<T, TransferError> {
        // Sockets give up a little after the transfer's deadline, which the caller enforces:
        // a blocked thread ends soon after its transfer was abandoned.
        let (conns, addr, timeout) = (
            self.conns.clone(),
            self.addr,
            self.timeout + Duration::from_secs(1),
        );
        tokio::task::spawn_blocking(move || {
            let taken = conns[slot].lock().unwrap_or_else(|p| p.into_inner()).take();
            let mut s = match taken {
                Some(s) => s,
                None => {
                    let s = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
                    let _ = s.set_nodelay(true);
                    s.set_read_timeout(Some(timeout)).map_err(io)?;
                    s.set_write_timeout(Some(timeout)).map_err(io)?;
                    s
                }
            };
            let out = f(&mut s)?;
            *conns[slot].lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
            Ok(out)
        })
        .await
        .map_err(|e| TransferError::Io(format!("a transfer task failed: {e}")))?
    }

    pub(crate) async fn write(
        &self,
        me: &AgentInner,
        layout: Layout,
        ops: &[WriteOp],
    ) -> Result<(), TransferError> {
        // Cut into pieces (so even one block uses every connection), then deal them out
        // biggest first to the least loaded connection.
        let total: u64 = ops.iter().map(|o| o.dst.len).sum();
        let piece = (total / self.conns.len() as u64).clamp(MIN_PIECE, PIECE);
        let mut pieces = Vec::new();
        for op in ops {
            let region = match &op.src {
                Source::Region(d) => Some(me.region(d.region)?),
                Source::Bytes(_) => None,
            };
            let mut done = 0;
            while done < op.dst.len {
                let n = (op.dst.len - done).min(piece);
                let dst = Descriptor {
                    region: op.dst.region,
                    offset: op.dst.offset + done,
                    len: n,
                };
                let src = match (&op.src, &region) {
                    (Source::Region(s), Some(r)) => PieceSrc::Region(
                        r.clone(),
                        Descriptor {
                            region: s.region,
                            offset: s.offset + done,
                            len: n,
                        },
                    ),
                    (Source::Bytes(b), _) => {
                        PieceSrc::Bytes(b.slice(done as usize..(done + n) as usize))
                    }
                    (Source::Region(s), None) => {
                        return Err(TransferError::UnknownRegion(s.region))
                    }
                };
                pieces.push(Piece { src, dst });
                done += n;
            }
        }
        pieces.sort_by_key(|p| std::cmp::Reverse(p.dst.len));
        let k = self.conns.len().min(pieces.len().max(1));
        let mut groups: Vec<(u64, Vec<Piece>)> = (0..k).map(|_| (0, Vec::new())).collect();
        for p in pieces {
            let g = groups
                .iter_mut()
                .min_by_key(|g| g.0)
                .expect("at least one group");
            g.0 += p.dst.len;
            g.1.push(p);
        }
        let fp = layout.fingerprint();
        let sends = groups.into_iter().enumerate().map(|(slot, (_, pieces))| {
            self.on_conn(slot, move |s| send_group(s, slot, fp, layout, &pieces))
        });
        for r in futures::future::join_all(sends).await {
            r?;
        }
        Ok(())
    }

    pub(crate) async fn read(
        &self,
        me: &AgentInner,
        layout: Layout,
        ops: &[(Descriptor, Descriptor)],
    ) -> Result<(), TransferError> {
        let k = self.conns.len().min(ops.len().max(1));
        let fp = layout.fingerprint();
        let mut groups: Vec<Vec<(Descriptor, Arc<Region>, Descriptor)>> = vec![Vec::new(); k];
        for (i, (r, l)) in ops.iter().enumerate() {
            groups[i % k].push((*r, me.region(l.region)?, *l));
        }
        let reads = groups
            .into_iter()
            .enumerate()
            .map(|(slot, mine)| self.on_conn(slot, move |s| read_group(s, fp, layout, &mine)));
        for r in futures::future::join_all(reads).await {
            r?;
        }
        Ok(())
    }
}

/// One connection's share of a write: frames, then a fence and its acknowledgement.
fn send_group(
    s: &mut TcpStream,
    slot: usize,
    fp: u64,
    layout: Layout,
    pieces: &[Piece],
) -> Result<(), TransferError> {
    let mut small = Vec::new();
    for p in pieces {
        let bytes: &[u8] = match &p.src {
            PieceSrc::Bytes(b) => b,
            PieceSrc::Region(region, d) => {
                // SAFETY: the caller lent this source range to the transfer (nobody writes
                // it until `write` returns).
                unsafe { region.mapping.view(d.offset as usize, d.len as usize) }?
            }
        };
        // Coalesce small frames into one send; large ones go straight from the source.
        small.extend_from_slice(&header(OP_WRITE, &p.dst, fp));
        if bytes.len() <= 64 << 10 {
            small.extend_from_slice(bytes);
            if small.len() >= 256 << 10 {
                s.write_all(&small).map_err(io)?;
                small.clear();
            }
        } else {
            s.write_all(&small).map_err(io)?;
            small.clear();
            s.write_all(bytes).map_err(io)?;
        }
    }
    small.push(OP_FENCE);
    small.extend_from_slice(&(slot as u64).to_le_bytes());
    s.write_all(&small).map_err(io)?;
    let mut status = [0u8; 1];
    s.read_exact(&mut status).map_err(io)?;
    if status[0] != 0 {
        let refusal = Refusal::recv(status[0], s).map_err(io)?;
        return Err(refusal.into_error(layout));
    }
    let mut seq = [0u8; 8];
    s.read_exact(&mut seq).map_err(io)?;
    Ok(())
}

/// One connection's share of a read: the requests, then each answer into its local range.
fn read_group(
    s: &mut TcpStream,
    fp: u64,
    layout: Layout,
    mine: &[(Descriptor, Arc<Region>, Descriptor)],
) -> Result<(), TransferError> {
    let mut frames = Vec::new();
    for (r, _, _) in mine {
        frames.extend_from_slice(&header(OP_READ, r, fp));
    }
    s.write_all(&frames).map_err(io)?;
    for (_, region, l) in mine {
        let mut status = [0u8; 1];
        s.read_exact(&mut status).map_err(io)?;
        if status[0] != 0 {
            // The rest of this connection's replies are not read: it is dropped.
            let refusal = Refusal::recv(status[0], s).map_err(io)?;
            return Err(refusal.into_error(layout));
        }
        // SAFETY: the caller lent this local range to the read (nobody reads or writes it
        // until `read` returns).
        let dst = unsafe { region.mapping.view_mut(l.offset as usize, l.len as usize) }?;
        s.read_exact(dst).map_err(io)?;
    }
    Ok(())
}
