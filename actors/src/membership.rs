//! Membership: the one view of discovery that a process's roles read. One actor per (bus,
//! namespace) in a process watches discovery, parses each worker's model card and kind once,
//! and owns the table of live workers; the frontend's model table and the router's ingest
//! follow it instead of watching discovery themselves, so they cannot disagree.
//!
//! A member is an instance whose discovery metadata holds a valid [`ModelCard`] (a worker's
//! generate or prefill endpoint); other instances (routers, `kv_dump`, `model_files`) are not
//! members. An instance with a malformed card is counted, logged and left out.
//!
//! [`MembershipHandle::subscribe`] gives a [`MemberWatch`]: the current members as `Joined`
//! events, then every change, in discovery's order. Each subscriber has its own unbounded
//! queue: membership changes are few (joins and leaves of instances), and a subscriber that
//! falls behind must not lose a leave. The handle is shared: [`MembershipHandle::shared`]
//! returns the running membership of that bus and namespace, or starts it; it stops when the
//! last handle is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use dynamo_protocols::llm::{ModelCard, WorkerKind};
use dynamo_runtime::subject::{DiscoveryFilter, Namespace};
use dynamo_runtime::{DiscoveryEvent, EndpointId, InstanceId, Runtime};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{mpsc, oneshot};

/// A live worker instance as discovery announced it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub endpoint: EndpointId,
    pub instance: InstanceId,
    pub card: ModelCard,
    pub kind: WorkerKind,
}

/// A change of membership.
#[derive(Debug, Clone)]
pub enum MemberEvent {
    /// A member joined, or re-registered (possibly with another card).
    Joined(Arc<Member>),
    Left {
        endpoint: EndpointId,
        instance: InstanceId,
        /// It deregistered itself; `false`: it vanished (see `DiscoveryEvent::Left`).
        deregistered: bool,
    },
}

/// Why membership could not be followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("cannot watch discovery: {0}")]
    Watch(String),
    #[error("the membership actor has stopped")]
    Stopped,
}

/// Membership changes for one subscriber, current members first.
pub struct MemberWatch(mpsc::UnboundedReceiver<MemberEvent>);

impl MemberWatch {
    /// The next change; `None` once the membership has stopped.
    pub async fn next(&mut self) -> Option<MemberEvent> {
        self.0.recv().await
    }
}

enum Msg {
    Discovery(DiscoveryEvent),
    Subscribe(oneshot::Sender<MemberWatch>),
    List(oneshot::Sender<Vec<Arc<Member>>>),
}

struct MembershipActor {
    runtime: Runtime,
    namespace: Namespace,
}

struct State {
    members: HashMap<(EndpointId, InstanceId), Arc<Member>>,
    subscribers: Vec<mpsc::UnboundedSender<MemberEvent>>,
    forward: tokio::task::JoinHandle<()>,
}

impl State {
    fn tell(&mut self, ev: MemberEvent) {
        self.subscribers.retain(|s| s.send(ev.clone()).is_ok());
    }
}

/// Parses a discovery announcement into a member (`None`: not a worker, or a bad card).
fn member(info: &dynamo_runtime::InstanceInfo) -> Option<Member> {
    let raw = info.metadata.get(ModelCard::METADATA_KEY)?;
    let card = serde_json::from_value::<ModelCard>(raw.clone())
        .map_err(|e| e.to_string())
        .and_then(|c| c.check().map(|()| c));
    let card = match card {
        Ok(c) => c,
        Err(e) => {
            dynamo_runtime::telemetry::malformed(
                "model_card",
                &format_args!(
                    "instance {} of {} has an unusable model card: {e}",
                    info.instance, info.endpoint
                ),
            );
            return None;
        }
    };
    let kind = info
        .metadata
        .get(WorkerKind::METADATA_KEY)
        .and_then(|k| k.as_str())
        .and_then(|k| k.parse().ok())
        .unwrap_or_default();
    Some(Member {
        endpoint: info.endpoint.clone(),
        instance: info.instance,
        card,
        kind,
    })
}

impl Actor for MembershipActor {
    type Msg = Msg;
    type State = State;
    type Arguments = ();

    async fn pre_start(&self, myself: ActorRef<Msg>, _: ()) -> Result<State, ActorProcessingErr> {
        let mut watch = self
            .runtime
            .discovery()
            .watch(DiscoveryFilter::namespace(&self.namespace))
            .await?;
        let forward = tokio::spawn(async move {
            while let Some(ev) = watch.next().await {
                if myself.cast(Msg::Discovery(ev)).is_err() {
                    break;
                }
            }
        });
        Ok(State {
            members: HashMap::new(),
            subscribers: Vec::new(),
            forward,
        })
    }

    async fn post_stop(
        &self,
        _: ActorRef<Msg>,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        // The forwarder holds no request: it only relays discovery events.
        state.forward.abort();
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<Msg>,
        msg: Msg,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            Msg::Discovery(DiscoveryEvent::Joined(info)) => {
                let Some(m) = member(&info) else {
                    return Ok(());
                };
                let m = Arc::new(m);
                state
                    .members
                    .insert((m.endpoint.clone(), m.instance), m.clone());
                state.tell(MemberEvent::Joined(m));
            }
            Msg::Discovery(DiscoveryEvent::Left {
                endpoint,
                instance,
                deregistered,
            }) => {
                if state
                    .members
                    .remove(&(endpoint.clone(), instance))
                    .is_some()
                {
                    state.tell(MemberEvent::Left {
                        endpoint,
                        instance,
                        deregistered,
                    });
                }
            }
            Msg::Subscribe(reply) => {
                let (tx, rx) = mpsc::unbounded_channel();
                for m in state.members.values() {
                    let _ = tx.send(MemberEvent::Joined(m.clone()));
                }
                state.subscribers.push(tx);
                let _ = reply.send(MemberWatch(rx));
            }
            Msg::List(reply) => {
                let _ = reply.send(state.members.values().cloned().collect());
            }
        }
        Ok(())
    }
}

struct Inner {
    actor: ActorRef<Msg>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.actor.stop(None);
    }
}

/// The handle to a membership; cheap to clone. The actor stops with the last handle.
#[derive(Clone)]
pub struct MembershipHandle(Arc<Inner>);

type Registry = Mutex<HashMap<(usize, String), Weak<Inner>>>;

fn registry() -> &'static Registry {
    static REGISTRY: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

impl MembershipHandle {
    /// The membership of `namespace` on `runtime`'s bus in this process, started if none runs.
    pub async fn shared(runtime: &Runtime, namespace: &Namespace) -> Result<Self, MembershipError> {
        // The bus's address tells runtimes apart (tests run several in one process).
        let key = (
            Arc::as_ptr(runtime.bus()) as *const () as usize,
            namespace.as_str().to_string(),
        );
        if let Some(inner) = registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .and_then(Weak::upgrade)
        {
            return Ok(Self(inner));
        }
        let actor = MembershipActor {
            runtime: runtime.clone(),
            namespace: namespace.clone(),
        };
        let (actor, _) = Actor::spawn(None, actor, ())
            .await
            .map_err(|e| MembershipError::Watch(e.to_string()))?;
        let inner = Arc::new(Inner { actor });
        let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
        // Another caller may have started one meanwhile: keep the first, drop ours.
        if let Some(existing) = reg.get(&key).and_then(Weak::upgrade) {
            return Ok(Self(existing));
        }
        reg.retain(|_, w| w.strong_count() > 0);
        reg.insert(key, Arc::downgrade(&inner));
        Ok(Self(inner))
    }

    /// The current members (as `Joined` events), then every change.
    pub async fn subscribe(&self) -> Result<MemberWatch, MembershipError> {
        let (tx, rx) = oneshot::channel();
        self.0
            .actor
            .cast(Msg::Subscribe(tx))
            .map_err(|_| MembershipError::Stopped)?;
        rx.await.map_err(|_| MembershipError::Stopped)
    }

    /// The live members now.
    pub async fn members(&self) -> Result<Vec<Arc<Member>>, MembershipError> {
        let (tx, rx) = oneshot::channel();
        self.0
            .actor
            .cast(Msg::List(tx))
            .map_err(|_| MembershipError::Stopped)?;
        rx.await.map_err(|_| MembershipError::Stopped)
    }

    /// Whether both handles reach the same membership.
    pub fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The actor, for a supervisor to link.
    pub(crate) fn cell(&self) -> ractor::ActorCell {
        self.0.actor.get_cell()
    }
}
