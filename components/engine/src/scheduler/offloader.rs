//! The KV offloader: the thread that owns the disk tier's writes, so file I/O never runs in an
//! engine step.
//!
//! Blocks leaving the host tier that pass the frequency filter are handed over through a
//! bounded queue ([`Offloader::offer`]; when it is full the block is dropped and counted).
//! The thread writes them ([`DiskTier::put`], whose LRU may delete older files) and reports
//! each change back ([`DiskChange`]s, as [`DiskEvent`]s) while it still holds the tier's lock,
//! then wakes the engine loop, which turns them into KV events in the worker's one event-id
//! sequence. Reading a block back (onboarding) happens on the engine thread, under the same
//! lock, after the pending reports are drained, so a block's events are always in order.
//!
//! A thread that dies (a bug) leaves the queue closed: later offers are dropped and counted,
//! and the engine keeps serving from the tiers it has.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use dynamo_kv::{DiskError, DiskSettings, DiskTier, TierBlock};
use dynamo_protocols::kv::{LocalBlockHash, SequenceHash};

/// Wakes the engine loop (it may be waiting for a request) to publish disk events.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// A change of the disk tier, reported by the offloader thread.
#[derive(Debug)]
pub(super) enum DiskEvent {
    Stored {
        parent: Option<SequenceHash>,
        hash: SequenceHash,
        local: LocalBlockHash,
        position: u32,
        bytes: u64,
    },
    Removed(Vec<SequenceHash>),
}

/// Why an offered block was not queued.
pub(super) enum NotQueued {
    Full,
    Closed,
}

pub(super) struct Offloader {
    tier: Arc<Mutex<DiskTier>>,
    queue: Option<SyncSender<TierBlock>>,
    done: Receiver<DiskEvent>,
    waker: Arc<Mutex<Option<Waker>>>,
    thread: Option<JoinHandle<()>>,
}

/// Locks `m`; its state is consistent between calls, so a panic elsewhere does not spoil it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Offloader {
    /// Opens the tier (rescanning its directory) and starts the thread with a queue of
    /// `queue` blocks.
    pub fn start(settings: DiskSettings, queue: usize) -> Result<Self, DiskError> {
        let dir = settings.dir.clone();
        let tier = Arc::new(Mutex::new(DiskTier::open(settings)?));
        let (tx, rx) = mpsc::sync_channel::<TierBlock>(queue.max(1));
        let (done_tx, done) = mpsc::channel();
        let waker: Arc<Mutex<Option<Waker>>> = Arc::default();
        let (t, w) = (tier.clone(), waker.clone());
        let thread = std::thread::Builder::new()
            .name("kv-offloader".into())
            .spawn(move || {
                let mut warned = false;
                for block in rx {
                    let mut tier = lock(&t);
                    match tier.put(&block) {
                        Ok(change) => {
                            if !change.evicted.is_empty() {
                                let _ = done_tx.send(DiskEvent::Removed(change.evicted));
                            }
                            if change.stored {
                                let _ = done_tx.send(DiskEvent::Stored {
                                    parent: block.parent,
                                    hash: block.hash,
                                    local: block.local,
                                    position: block.position,
                                    bytes: block.data.len() as u64,
                                });
                            }
                        }
                        Err(e) => {
                            // Counted by the tier; said once, not per block.
                            if !warned {
                                tracing::warn!(error = %e, "the disk KV tier cannot write; blocks are dropped (counted in dynamo_worker_kv_offload_dropped_total{{reason=\"write_error\"}}) until writes succeed again");
                                warned = true;
                            }
                        }
                    }
                    drop(tier);
                    if let Some(wake) = lock(&w).as_ref() {
                        wake();
                    }
                }
            })
            .map_err(|source| DiskError::Open { dir, source })?;
        Ok(Self {
            tier,
            queue: Some(tx),
            done,
            waker,
            thread: Some(thread),
        })
    }

    pub fn set_waker(&self, waker: Waker) {
        *lock(&self.waker) = Some(waker);
    }

    /// Queues `block` for the disk, or says why not.
    pub fn offer(&mut self, block: TierBlock) -> Result<(), NotQueued> {
        let Some(q) = &self.queue else {
            return Err(NotQueued::Closed);
        };
        match q.try_send(block) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(NotQueued::Full),
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!(
                    "the KV offloader thread is gone; the disk tier takes no more blocks"
                );
                self.queue = None;
                Err(NotQueued::Closed)
            }
        }
    }

    /// The tier, locked, with the changes the thread reported so far (see the module header).
    pub fn lock(&self) -> (MutexGuard<'_, DiskTier>, Vec<DiskEvent>) {
        let tier = lock(&self.tier);
        let events = self.done.try_iter().collect();
        (tier, events)
    }
}

impl Drop for Offloader {
    /// Closes the queue and waits for the thread to write what it holds, so a stopped worker
    /// leaves its disk tier complete for the next start.
    fn drop(&mut self) {
        self.queue = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
