//! Agents: who owns which regions, how to reach a peer, and the transfer entry points.
//!
//! An agent registers regions, describes itself as [`AgentMetadata`], and moves bytes to and
//! from peers described the same way. Peers are resolved once per agent id and cached (a
//! peer's shared-memory mappings are made once per region; TCP connections are kept).
//!
//! Invariants: a transfer is checked whole (layouts, bounds, lengths, regions known) before a
//! byte moves; every transfer ends by its deadline; an agent that is dropped leaves the
//! process registry at once, so same-process peers see [`TransferError::PeerGone`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::region::Mapping;
use crate::tcp::{self, TcpPeer};
use crate::{Descriptor, Layout, Region, RegionId, TransferError};

/// An agent's id: random, unique per process start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AgentId(pub u64);

impl std::fmt::Display for AgentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Which backend to use for a peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// Same process: direct copy; same host: shared memory; else TCP.
    #[default]
    Auto,
    /// Shared memory even within one process (benchmarks, tests); other hosts: no route.
    Shm,
    /// TCP even on one host (what a cross-host deployment does; tests and benchmarks).
    Tcp,
}

/// The backend a transfer used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    Local,
    Shm,
    Tcp,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Local => "local",
            Backend::Shm => "shm",
            Backend::Tcp => "tcp",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// For logs and region names.
    pub name: String,
    /// Listen for TCP transfers here (port 0: any free port); `None`: no listener, so peers
    /// on other hosts cannot write to this agent.
    pub tcp_listen: Option<SocketAddr>,
    pub route: Route,
    /// TCP connections per peer; a transfer's writes are spread over them.
    pub tcp_connections: usize,
    /// Longest a transfer may take.
    pub timeout: Duration,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            name: "agent".into(),
            tcp_listen: None,
            route: Route::Auto,
            tcp_connections: 4,
            timeout: Duration::from_secs(10),
        }
    }
}

/// A registered region as peers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInfo {
    pub id: RegionId,
    pub len: u64,
    pub layout: Layout,
    /// The memfd in the owner's process, and its inode (a reused descriptor number is
    /// detected, never mapped).
    pub fd: i32,
    pub inode: u64,
}

/// Everything a peer needs to reach an agent. Serde: it travels through discovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMetadata {
    pub agent: AgentId,
    pub name: String,
    /// Kernel boot id and pid namespace: equal means shared memory can be mapped.
    pub host: String,
    pub pid: u32,
    pub tcp: Option<SocketAddr>,
    pub regions: Vec<RegionInfo>,
}

impl AgentMetadata {
    pub fn region(&self, id: RegionId) -> Result<&RegionInfo, TransferError> {
        self.regions
            .iter()
            .find(|r| r.id == id)
            .ok_or(TransferError::UnknownRegion(id))
    }
}

/// Where a write's bytes come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A range of one of this agent's regions (nobody may write it during the transfer).
    Region(Descriptor),
    /// Bytes the caller owns.
    Bytes(Bytes),
}

impl Source {
    fn len(&self) -> u64 {
        match self {
            Source::Region(d) => d.len,
            Source::Bytes(b) => b.len() as u64,
        }
    }
}

/// One write: `src` to `dst` in the peer's region.
#[derive(Debug, Clone)]
pub struct WriteOp {
    pub src: Source,
    pub dst: Descriptor,
}

/// What a completed transfer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferReport {
    pub bytes: u64,
    pub backend: Backend,
    pub elapsed: Duration,
}

pub(crate) struct AgentInner {
    pub(crate) id: AgentId,
    settings: AgentSettings,
    host: String,
    regions: RwLock<HashMap<RegionId, Arc<Region>>>,
    next_region: AtomicU32,
    tcp_addr: Option<SocketAddr>,
    peers: Mutex<HashMap<AgentId, Arc<Peer>>>,
    /// The TCP listener's thread (stopped when the agent goes).
    listener: Mutex<Option<tcp::Listener>>,
}

impl AgentInner {
    pub(crate) fn region(&self, id: RegionId) -> Result<Arc<Region>, TransferError> {
        self.regions
            .read()
            .expect("region table lock")
            .get(&id)
            .cloned()
            .ok_or(TransferError::UnknownRegion(id))
    }
}

fn registry() -> &'static Mutex<HashMap<AgentId, Weak<AgentInner>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<AgentId, Weak<AgentInner>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// This kernel boot and pid namespace: processes that share it can map each other's memfds.
fn host_identity() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let ns = std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    format!("{boot}/{ns}")
}

/// An agent: registered regions and the transfers between them and peers' regions. Dropping
/// it deregisters everything and stops its listener.
pub struct Agent {
    inner: Arc<AgentInner>,
}

impl Agent {
    /// Starts an agent (and its TCP listener thread, if asked for).
    pub fn start(settings: AgentSettings) -> Result<Self, TransferError> {
        let id = AgentId(rand::random());
        let listener = match settings.tcp_listen {
            Some(addr) => Some(std::net::TcpListener::bind(addr).map_err(|e| {
                TransferError::Io(format!("cannot listen for KV transfers on {addr}: {e}"))
            })?),
            None => None,
        };
        let tcp_addr = match &listener {
            Some(l) => Some(
                l.local_addr()
                    .map_err(|e| TransferError::Io(e.to_string()))?,
            ),
            None => None,
        };
        let inner = Arc::new(AgentInner {
            id,
            settings,
            host: host_identity(),
            regions: RwLock::default(),
            next_region: AtomicU32::new(1),
            tcp_addr,
            peers: Mutex::default(),
            listener: Mutex::new(None),
        });
        if let Some(listener) = listener {
            let serving = tcp::Listener::start(listener, Arc::downgrade(&inner)).map_err(|e| {
                TransferError::Io(format!("cannot start the KV transfer listener: {e}"))
            })?;
            *inner.listener.lock().expect("listener lock") = Some(serving);
        }
        registry()
            .lock()
            .expect("registry lock")
            .insert(id, Arc::downgrade(&inner));
        Ok(Self { inner })
    }

    pub fn id(&self) -> AgentId {
        self.inner.id
    }

    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.inner.tcp_addr
    }

    /// Registers `blocks` blocks of `layout` of zeroed host memory.
    pub fn register(&self, layout: Layout, blocks: usize) -> Result<Arc<Region>, TransferError> {
        let id = RegionId(self.inner.next_region.fetch_add(1, Ordering::Relaxed));
        let region = Arc::new(Region::create(id, layout, blocks * layout.block_bytes())?);
        self.inner
            .regions
            .write()
            .expect("region table lock")
            .insert(id, region.clone());
        Ok(region)
    }

    /// Deregisters a region: peers' later transfers to it fail with `UnknownRegion` (TCP,
    /// same process) or find its memory orphaned (shared memory: the caller's protocol must
    /// not hand out descriptors of a region it deregisters).
    pub fn deregister(&self, id: RegionId) -> bool {
        self.inner
            .regions
            .write()
            .expect("region table lock")
            .remove(&id)
            .is_some()
    }

    pub fn region(&self, id: RegionId) -> Result<Arc<Region>, TransferError> {
        self.inner.region(id)
    }

    pub fn metadata(&self) -> AgentMetadata {
        use std::os::unix::fs::MetadataExt;
        let mut regions: Vec<RegionInfo> = self
            .inner
            .regions
            .read()
            .expect("region table lock")
            .values()
            .map(|r| RegionInfo {
                id: r.id(),
                len: r.len() as u64,
                layout: r.layout(),
                fd: r.fd(),
                inode: std::fs::metadata(format!("/proc/self/fd/{}", r.fd()))
                    .map(|m| m.ino())
                    .unwrap_or(0),
            })
            .collect();
        regions.sort_by_key(|r| r.id);
        AgentMetadata {
            agent: self.inner.id,
            name: self.inner.settings.name.clone(),
            host: self.inner.host.clone(),
            pid: std::process::id(),
            tcp: self.inner.tcp_addr,
            regions,
        }
    }

    /// Forgets a cached peer (its mappings and connections), e.g. when it leaves discovery.
    pub fn forget(&self, peer: AgentId) {
        self.inner.peers.lock().expect("peers lock").remove(&peer);
    }

    fn peer(&self, meta: &AgentMetadata) -> Result<Arc<Peer>, TransferError> {
        let mut peers = self.inner.peers.lock().expect("peers lock");
        if let Some(p) = peers.get(&meta.agent) {
            if p.meta == *meta {
                return Ok(p.clone());
            }
        }
        let same_host = meta.host == self.inner.host;
        let same_process = same_host && meta.pid == std::process::id();
        let conn = match self.inner.settings.route {
            Route::Auto if same_process => Conn::Local,
            Route::Auto | Route::Shm if same_host => Conn::Shm(Mutex::default()),
            Route::Shm => {
                return Err(TransferError::NoRoute(format!(
                    "shared memory was asked for but agent {} ({}) is on another host",
                    meta.agent, meta.name
                )))
            }
            Route::Auto | Route::Tcp => match meta.tcp {
                Some(addr) => Conn::Tcp(TcpPeer::new(
                    addr,
                    self.inner.settings.tcp_connections,
                    self.inner.settings.timeout,
                )),
                None => {
                    return Err(TransferError::NoRoute(format!(
                        "agent {} ({}) has no TCP listener",
                        meta.agent, meta.name
                    )))
                }
            },
        };
        let peer = Arc::new(Peer {
            meta: meta.clone(),
            conn,
        });
        peers.insert(meta.agent, peer.clone());
        Ok(peer)
    }

    /// Checks a transfer whole against this agent's regions and the peer's metadata.
    fn check_local(&self, layout: &Layout, d: &Descriptor) -> Result<Arc<Region>, TransferError> {
        let r = self.inner.region(d.region)?;
        if r.layout() != *layout {
            return Err(TransferError::LayoutMismatch {
                local: *layout,
                remote: r.layout(),
            });
        }
        bounds(d, r.len() as u64)?;
        Ok(r)
    }

    /// Writes each op's source into the peer's destination range; all or an error (bytes of
    /// a failed transfer may have landed: the receiver releases the range, never caches it).
    pub async fn write(
        &self,
        peer: &AgentMetadata,
        layout: Layout,
        ops: Vec<WriteOp>,
    ) -> Result<TransferReport, TransferError> {
        let started = Instant::now();
        let mut bytes = 0;
        for op in &ops {
            check_remote(peer, &layout, &op.dst)?;
            if op.src.len() != op.dst.len {
                return Err(TransferError::LengthMismatch {
                    src: op.src.len(),
                    dst: op.dst.len,
                });
            }
            if let Source::Region(d) = &op.src {
                self.check_local(&layout, d)?;
            }
            bytes += op.dst.len;
        }
        let p = self.peer(peer)?;
        let backend = p.conn.backend();
        let run = async {
            match &p.conn {
                Conn::Local => {
                    let target = live_local(peer)?;
                    for op in &ops {
                        let dst = target.region(op.dst.region)?;
                        copy_into(&self.inner, &dst.mapping, &op.dst, &op.src)?;
                    }
                    Ok(())
                }
                Conn::Shm(maps) => {
                    alive(peer)?;
                    for op in &ops {
                        let dst = shm_map(maps, peer, op.dst.region)?;
                        copy_into(&self.inner, &dst, &op.dst, &op.src)?;
                    }
                    Ok(())
                }
                Conn::Tcp(t) => t.write(&self.inner, layout, &ops).await,
            }
        };
        self.finish(peer, run, bytes, backend, started).await
    }

    /// Runs a checked transfer to its deadline; a peer whose path failed is forgotten (its
    /// mappings and connections are made afresh next time).
    async fn finish(
        &self,
        peer: &AgentMetadata,
        run: impl std::future::Future<Output = Result<(), TransferError>>,
        bytes: u64,
        backend: Backend,
        started: Instant,
    ) -> Result<TransferReport, TransferError> {
        let timeout = self.inner.settings.timeout;
        match tokio::time::timeout(timeout, run).await {
            Ok(Ok(())) => Ok(TransferReport {
                bytes,
                backend,
                elapsed: started.elapsed(),
            }),
            Ok(Err(e)) => {
                if e.is_transient() {
                    self.forget(peer.agent);
                }
                Err(e)
            }
            Err(_) => {
                self.forget(peer.agent);
                Err(TransferError::Timeout(timeout))
            }
        }
    }

    /// Reads each pair's peer range (`.0`) into this agent's range (`.1`).
    pub async fn read(
        &self,
        peer: &AgentMetadata,
        layout: Layout,
        ops: Vec<(Descriptor, Descriptor)>,
    ) -> Result<TransferReport, TransferError> {
        let started = Instant::now();
        let mut bytes = 0;
        for (remote_d, local_d) in &ops {
            check_remote(peer, &layout, remote_d)?;
            self.check_local(&layout, local_d)?;
            if remote_d.len != local_d.len {
                return Err(TransferError::LengthMismatch {
                    src: remote_d.len,
                    dst: local_d.len,
                });
            }
            bytes += local_d.len;
        }
        let p = self.peer(peer)?;
        let backend = p.conn.backend();
        let run = async {
            match &p.conn {
                Conn::Local => {
                    let source = live_local(peer)?;
                    for (r, l) in &ops {
                        let src = source.region(r.region)?;
                        let dst = self.inner.region(l.region)?;
                        dst.mapping.copy_from(
                            l.offset as usize,
                            &src.mapping,
                            r.offset as usize,
                            l.len as usize,
                        )?;
                    }
                    Ok(())
                }
                Conn::Shm(maps) => {
                    alive(peer)?;
                    for (r, l) in &ops {
                        let src = shm_map(maps, peer, r.region)?;
                        let dst = self.inner.region(l.region)?;
                        dst.mapping.copy_from(
                            l.offset as usize,
                            &src,
                            r.offset as usize,
                            l.len as usize,
                        )?;
                    }
                    Ok(())
                }
                Conn::Tcp(t) => t.read(&self.inner, layout, &ops).await,
            }
        };
        self.finish(peer, run, bytes, backend, started).await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        registry()
            .lock()
            .expect("registry lock")
            .remove(&self.inner.id);
    }
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("id", &self.inner.id)
            .field("name", &self.inner.settings.name)
            .finish()
    }
}

/// A descriptor of the peer's: its region known, of `layout`, the range inside it.
fn check_remote(
    peer: &AgentMetadata,
    layout: &Layout,
    d: &Descriptor,
) -> Result<(), TransferError> {
    let remote = peer.region(d.region)?;
    if remote.layout != *layout {
        return Err(TransferError::LayoutMismatch {
            local: *layout,
            remote: remote.layout,
        });
    }
    bounds(d, remote.len)
}

fn bounds(d: &Descriptor, region_len: u64) -> Result<(), TransferError> {
    if d.offset
        .checked_add(d.len)
        .is_none_or(|end| end > region_len)
    {
        return Err(TransferError::OutOfBounds {
            offset: d.offset,
            len: d.len,
            region_len,
        });
    }
    Ok(())
}

fn copy_into(
    me: &AgentInner,
    dst: &Mapping,
    d: &Descriptor,
    src: &Source,
) -> Result<(), TransferError> {
    match src {
        Source::Bytes(b) => dst.copy_in(d.offset as usize, b),
        Source::Region(s) => {
            let src = me.region(s.region)?;
            dst.copy_from(
                d.offset as usize,
                &src.mapping,
                s.offset as usize,
                s.len as usize,
            )
        }
    }
}

/// A same-process peer, while it is registered.
fn live_local(peer: &AgentMetadata) -> Result<Arc<AgentInner>, TransferError> {
    registry()
        .lock()
        .expect("registry lock")
        .get(&peer.agent)
        .and_then(Weak::upgrade)
        .ok_or_else(|| {
            TransferError::PeerGone(format!(
                "agent {} ({}) is deregistered",
                peer.agent, peer.name
            ))
        })
}

/// A same-host peer's process still runs (a reused pid is not detected; its regions' inodes
/// would not match on the next mapping).
fn alive(peer: &AgentMetadata) -> Result<(), TransferError> {
    if std::path::Path::new(&format!("/proc/{}", peer.pid)).exists() {
        Ok(())
    } else {
        Err(TransferError::PeerGone(format!(
            "agent {} ({}): process {} has exited",
            peer.agent, peer.name, peer.pid
        )))
    }
}

fn shm_map(
    maps: &Mutex<HashMap<RegionId, Arc<Mapping>>>,
    peer: &AgentMetadata,
    id: RegionId,
) -> Result<Arc<Mapping>, TransferError> {
    use std::os::unix::fs::MetadataExt;
    if let Some(m) = maps.lock().expect("mappings lock").get(&id) {
        return Ok(m.clone());
    }
    let info = peer.region(id)?;
    let path = format!("/proc/{}/fd/{}", peer.pid, info.fd);
    let inode = std::fs::metadata(&path)
        .map_err(|e| TransferError::PeerGone(format!("{path}: {e}")))?
        .ino();
    if inode != info.inode {
        return Err(TransferError::UnknownRegion(id));
    }
    let m = Arc::new(Mapping::open(peer.pid, info.fd, info.len as usize)?);
    maps.lock().expect("mappings lock").insert(id, m.clone());
    Ok(m)
}

/// A resolved peer: how this agent reaches it.
struct Peer {
    meta: AgentMetadata,
    conn: Conn,
}

enum Conn {
    Local,
    /// The peer's regions, mapped once each.
    Shm(Mutex<HashMap<RegionId, Arc<Mapping>>>),
    Tcp(TcpPeer),
}

impl Conn {
    fn backend(&self) -> Backend {
        match self {
            Conn::Local => Backend::Local,
            Conn::Shm(_) => Backend::Shm,
            Conn::Tcp(_) => Backend::Tcp,
        }
    }
}
