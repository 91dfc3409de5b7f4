//! Shared fixtures: a transport harness (local or a real nats-server) and a test actor.

use std::sync::Arc;
use std::time::Duration;

use dynamo_runtime::bus::{Bus, LocalBus, NatsBus, NatsSettings};
use dynamo_runtime::discovery::{DiscoverySettings, LocalDiscovery};
use dynamo_runtime::rpc::{RemoteErrorKind, RpcSettings};
use dynamo_runtime::subject::{ComponentId, DiscoveryFilter, EndpointName};
use dynamo_runtime::testing::NatsServer;
use dynamo_runtime::{Request, Runtime, RuntimeSettings, ServedEndpoint};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Generates one test per transport: `local::NAME` and `nats::NAME`, both running `NAME(h)`.
#[macro_export]
macro_rules! transport_suite {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let h = $crate::common::Harness::local().await;
                    super::$name(&h).await;
                    h.finish().await;
                }
            )*
        }
        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let h = $crate::common::Harness::nats().await;
                    super::$name(&h).await;
                    h.finish().await;
                }
            )*
        }
    };
}

pub fn settings() -> RuntimeSettings {
    RuntimeSettings {
        rpc: RpcSettings {
            heartbeat_interval: Duration::from_millis(100),
            heartbeat_timeout: Duration::from_millis(500),
            probe_after: Duration::from_millis(50),
            default_timeout: Duration::from_secs(20),
            max_inflight: 64,
            stream_window: 32,
        },
        discovery: DiscoverySettings {
            lease: Duration::from_secs(2),
            bucket: "dynamo-discovery".into(),
        },
        ..Default::default()
    }
}

/// One transport under test. Runtimes made from it behave like separate processes.
pub struct Harness {
    pub nats: Option<NatsServer>,
    local: Option<(LocalBus, LocalDiscovery)>,
    runtimes: std::sync::Mutex<Vec<Runtime>>,
}

impl Harness {
    pub async fn local() -> Self {
        Self {
            nats: None,
            local: Some((LocalBus::new(), LocalDiscovery::new())),
            runtimes: Default::default(),
        }
    }

    pub async fn nats() -> Self {
        let server = NatsServer::start().expect("start nats-server (run scripts/install-nats.sh)");
        Self {
            nats: Some(server),
            local: None,
            runtimes: Default::default(),
        }
    }

    /// A new bus connection (a new client on NATS, a handle on the shared in-process bus).
    pub async fn bus(&self) -> Arc<dyn Bus> {
        match (&self.local, &self.nats) {
            (Some((bus, _)), _) => Arc::new(bus.clone()),
            (None, Some(server)) => Arc::new(
                NatsBus::connect(&NatsSettings::new(server.url()))
                    .await
                    .expect("connect"),
            ),
            _ => unreachable!(),
        }
    }

    pub async fn runtime_with(&self, settings: RuntimeSettings) -> Runtime {
        let rt = match (&self.local, &self.nats) {
            (Some((bus, disc)), _) => {
                Runtime::with(Arc::new(bus.clone()), Arc::new(disc.handle()), settings).await
            }
            (None, Some(server)) => {
                Runtime::start(RuntimeSettings {
                    bus: Some(server.url()),
                    ..settings
                })
                .await
            }
            _ => unreachable!(),
        }
        .expect("runtime");
        self.runtimes.lock().unwrap().push(rt.clone());
        rt
    }

    pub async fn runtime(&self) -> Runtime {
        self.runtime_with(settings()).await
    }

    /// Closes every runtime and asserts a clean shutdown: nothing is left registered.
    pub async fn finish(self) {
        let rts: Vec<Runtime> = std::mem::take(&mut *self.runtimes.lock().unwrap());
        for rt in rts {
            rt.close().await;
        }
        let observer = self.runtime().await;
        let left = observer
            .discovery()
            .list(&DiscoveryFilter::all())
            .await
            .unwrap();
        assert!(
            left.is_empty(),
            "registrations left after shutdown: {left:?}"
        );
        observer.close().await;
    }
}

/// What the test actor is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum TestReq {
    /// Sends `text` `times` times, `delay_ms` apart.
    Echo {
        text: String,
        times: u32,
        delay_ms: u64,
    },
    /// Fails with a remote error.
    Fail { message: String },
    /// Sends nothing; waits for cancellation and reports it.
    Hang,
    /// Sends one response of `size` bytes.
    Big { size: usize },
    /// Sends one item, then drops the sender without finishing.
    Drop,
    /// Answers with the trace id and request id the handler saw, as `trace/id`.
    Whoami,
    /// Answers `text` once, with `finish_with` (one frame that is data and end).
    Unary { text: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestResp {
    pub index: u32,
    pub text: String,
}

/// Any other request type, to check that endpoints refuse what they do not take.
#[derive(Debug, Serialize, Deserialize)]
pub struct OtherReq {
    pub unexpected: Vec<u64>,
}

pub enum TestMsg {
    Req(Request<TestReq, TestResp>),
}

impl From<Request<TestReq, TestResp>> for TestMsg {
    fn from(r: Request<TestReq, TestResp>) -> Self {
        TestMsg::Req(r)
    }
}

/// Reports what handlers observed.
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    Cancelled,
    Finished,
}

pub struct TestActor;

impl Actor for TestActor {
    type Msg = TestMsg;
    type State = mpsc::UnboundedSender<Observed>;
    type Arguments = mpsc::UnboundedSender<Observed>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        observed: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let TestMsg::Req(Request {
            body,
            ctx,
            mut reply,
        }) = msg;
        let observed = observed.clone();
        tokio::spawn(async move {
            let cancel = ctx.cancellation().clone();
            match body {
                TestReq::Echo {
                    text,
                    times,
                    delay_ms,
                } => {
                    for index in 0..times {
                        if index > 0 && delay_ms > 0 {
                            tokio::select! {
                                _ = cancel.cancelled() => {
                                    let _ = observed.send(Observed::Cancelled);
                                    return;
                                }
                                _ = tokio::time::sleep(Duration::from_millis(delay_ms)) => {}
                            }
                        }
                        let item = TestResp {
                            index,
                            text: text.clone(),
                        };
                        if reply.send(&item).await.is_err() {
                            let _ = observed.send(Observed::Cancelled);
                            return;
                        }
                    }
                    let _ = reply.finish().await;
                    let _ = observed.send(Observed::Finished);
                }
                TestReq::Fail { message } => {
                    let _ = reply.fail(RemoteErrorKind::Internal, message).await;
                }
                TestReq::Hang => {
                    cancel.cancelled().await;
                    let _ = observed.send(Observed::Cancelled);
                }
                TestReq::Big { size } => {
                    let item = TestResp {
                        index: 0,
                        text: "x".repeat(size),
                    };
                    if reply.send(&item).await.is_ok() {
                        let _ = reply.finish().await;
                    }
                }
                TestReq::Whoami => {
                    let text = format!("{}/{}", ctx.trace_id, ctx.id);
                    if reply.send(&TestResp { index: 0, text }).await.is_ok() {
                        let _ = reply.finish().await;
                    }
                }
                TestReq::Unary { text } => {
                    let _ = reply.finish_with(&TestResp { index: 0, text }).await;
                }
                TestReq::Drop => {
                    let _ = reply
                        .send(&TestResp {
                            index: 0,
                            text: "partial".into(),
                        })
                        .await;
                    drop(reply);
                }
            }
        });
        Ok(())
    }
}

/// Spawns a test actor and returns it with the receiver of what its handlers observe.
pub async fn spawn_actor() -> (ActorRef<TestMsg>, mpsc::UnboundedReceiver<Observed>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (actor, _) = Actor::spawn(None, TestActor, tx)
        .await
        .expect("spawn actor");
    (actor, rx)
}

/// Serves a test actor on `test.{component}.generate` in `rt` (metadata `{"card": 1}`).
pub async fn serve_test_actor(
    rt: &Runtime,
    component: &str,
) -> (ServedEndpoint, mpsc::UnboundedReceiver<Observed>) {
    let comp = ComponentId::new("test", component).unwrap();
    let (actor, observed) = spawn_actor().await;
    let inst = rt
        .component(comp, serde_json::json!({"role": "test"}))
        .await
        .unwrap();
    let served = inst
        .serve::<TestReq, TestResp, _>(
            EndpointName::new("generate").unwrap(),
            actor,
            serde_json::json!({"card": 1}),
        )
        .await
        .unwrap();
    (served, observed)
}

/// Waits for the next observation, failing the test after `secs`.
pub async fn observe(rx: &mut mpsc::UnboundedReceiver<Observed>, secs: u64) -> Observed {
    tokio::time::timeout(Duration::from_secs(secs), rx.recv())
        .await
        .expect("handler observation in time")
        .expect("observer open")
}
