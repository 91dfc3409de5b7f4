//! [`RouteLease`]: one routed request's share of the accounting, released exactly once (on
//! drop), locally or, for a router component's lease, by publishing its end.

use std::sync::Arc;

use dynamo_protocols::kv::WorkerId;
use dynamo_protocols::router::{LeaseId, RouterEvent, RouterEventKind};

use crate::router::KvRouter;
use crate::sink::DecisionSink;

/// The router's accounting for one routed request; released when dropped (and the release
/// shared with the other routers), so it cannot leak.
pub struct RouteLease {
    pub(crate) inner: LeaseInner,
}

pub(crate) enum LeaseInner {
    /// Made by a router in this process.
    Local {
        router: Arc<KvRouter>,
        id: u64,
        worker: WorkerId,
        prefill_tokens: u64,
        blocks: u64,
        occupied: u64,
    },
    /// Made by a router component: its first token and end are published as events.
    Remote {
        sink: DecisionSink,
        lease: LeaseId,
        prefill_pending: bool,
    },
    Detached,
}

impl RouteLease {
    /// A lease a router component granted (`lease`), reported through `sink`.
    pub fn remote(sink: DecisionSink, lease: LeaseId) -> Self {
        Self {
            inner: LeaseInner::Remote {
                sink,
                lease,
                prefill_pending: true,
            },
        }
    }

    /// The first token came back: the prompt's prefill is done.
    pub fn prefill_done(&mut self) {
        match &mut self.inner {
            LeaseInner::Local {
                router,
                id,
                worker,
                prefill_tokens,
                ..
            } => {
                let tokens = std::mem::take(prefill_tokens);
                if tokens > 0 {
                    router.loads.update(worker, |acc| acc.settle(tokens, 0, 0));
                    router.publish(*id, RouterEventKind::PrefillDone);
                }
            }
            LeaseInner::Remote {
                sink,
                lease,
                prefill_pending,
            } => {
                if std::mem::take(prefill_pending) {
                    sink.send(RouterEvent {
                        lease: *lease,
                        kind: RouterEventKind::PrefillDone,
                    });
                }
            }
            LeaseInner::Detached => {}
        }
    }
}

impl Drop for RouteLease {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.inner, LeaseInner::Detached) {
            LeaseInner::Local {
                router,
                id,
                worker,
                prefill_tokens,
                blocks,
                occupied,
            } => {
                router
                    .loads
                    .update(&worker, |acc| acc.settle(prefill_tokens, blocks, occupied));
                router.publish(id, RouterEventKind::Finished);
            }
            LeaseInner::Remote { sink, lease, .. } => sink.send(RouterEvent {
                lease,
                kind: RouterEventKind::Finished,
            }),
            LeaseInner::Detached => {}
        }
    }
}
