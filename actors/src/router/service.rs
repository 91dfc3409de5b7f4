//! The router as its own component: `{ns}.router.route` answers a [`RouteRequest`] (model,
//! prompt token ids, workers to avoid) with the worker to send it to and the lease the caller
//! reports the request's first token and end under. The component keeps its own index and
//! load accounting from the bus (`ingest`), and shares its decisions with the other routers.

use std::sync::Arc;
use std::time::Duration;

use dynamo_protocols::router::{
    RouteRequest, RouteResponse, RoutedPrefill, ROUTER_COMPONENT, ROUTE_ENDPOINT,
};
use dynamo_router::PrefillPlan;
use dynamo_runtime::rpc::RemoteErrorKind;
use dynamo_runtime::subject::{ComponentId, EndpointName, Namespace};
use dynamo_runtime::{ComponentInstance, Request, Runtime, ServedEndpoint};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::{start_ingest, KvRouter, KvRouterSettings, RouteError, RouterIngest};

struct RouteMsg(Request<RouteRequest, RouteResponse>);

impl From<Request<RouteRequest, RouteResponse>> for RouteMsg {
    fn from(r: Request<RouteRequest, RouteResponse>) -> Self {
        RouteMsg(r)
    }
}

struct RouteActor {
    router: Arc<KvRouter>,
}

impl Actor for RouteActor {
    type Msg = RouteMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        _args: (),
    ) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        RouteMsg(req): RouteMsg,
        _state: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        let Request { body, reply, .. } = req;
        // Routing is a few microseconds of CPU: decided in the actor, replied from a task.
        let decided =
            self.router
                .route_model_as(&body.model, &body.exclude, &body.token_ids, body.load_only);
        // Where the prompt is prefilled (a prefill worker, or the decode worker itself).
        let prefill = match &decided {
            Ok(d) if !body.load_only => {
                match self
                    .router
                    .plan_prefill(&body.model, d.worker, d.overlap, &body.token_ids)
                {
                    PrefillPlan::Remote {
                        worker,
                        endpoint,
                        lease,
                    } => Some(RoutedPrefill {
                        worker,
                        endpoint,
                        lease: self.router.detach(lease),
                    }),
                    PrefillPlan::Local(_) => None,
                }
            }
            _ => None,
        };
        let router = self.router.clone();
        tokio::spawn(async move {
            let _ = match decided {
                Ok(d) => {
                    let (worker, overlap) = (d.worker, d.overlap);
                    let peer =
                        d.peer
                            .map(|(worker, blocks)| dynamo_protocols::router::RoutedPeer {
                                worker,
                                blocks,
                            });
                    let lease = router.detach(d.lease);
                    reply
                        .finish_with(&RouteResponse {
                            worker,
                            overlap_device: overlap.device,
                            overlap_host: overlap.host,
                            overlap_disk: overlap.disk,
                            lease,
                            prefill,
                            peer,
                        })
                        .await
                }
                Err(e @ RouteError::AllBusy(_)) => {
                    reply
                        .fail(
                            RemoteErrorKind::Overloaded,
                            format!("{e} for model {}", body.model),
                        )
                        .await
                }
                Err(RouteError::NoWorkers) => {
                    reply
                        .fail(
                            RemoteErrorKind::Unavailable,
                            format!(
                                "no worker serving model {} is known to the router",
                                body.model
                            ),
                        )
                        .await
                }
            };
        });
        Ok(())
    }
}

/// A running router component.
pub struct RouterComponent {
    router: Arc<KvRouter>,
    ingest: RouterIngest,
    instance: ComponentInstance,
    served: ServedEndpoint,
    actor: ActorRef<RouteMsg>,
}

impl RouterComponent {
    /// Starts a router in `namespace`: its index follows the workers there, and it serves
    /// `{namespace}.router.route`.
    pub async fn start(
        runtime: &Runtime,
        namespace: Namespace,
        settings: KvRouterSettings,
    ) -> Result<Self, String> {
        crate::describe_metrics();
        let router = KvRouter::new(settings);
        let ingest = start_ingest(runtime, namespace.clone(), router.clone()).await?;
        let component =
            ComponentId::new(namespace.as_str(), ROUTER_COMPONENT).map_err(|e| e.to_string())?;
        let result = async {
            let instance = runtime
                .component(component, serde_json::json!({ "role": "router" }))
                .await
                .map_err(|e| e.to_string())?;
            let (actor, _) = Actor::spawn(
                None,
                RouteActor {
                    router: router.clone(),
                },
                (),
            )
            .await
            .map_err(|e| e.to_string())?;
            let served = instance
                .serve::<RouteRequest, RouteResponse, _>(
                    EndpointName::new(ROUTE_ENDPOINT).expect("valid endpoint name"),
                    actor.clone(),
                    serde_json::json!({ "role": "router" }),
                )
                .await;
            match served {
                Ok(s) => Ok((instance, s, actor)),
                Err(e) => {
                    actor.stop(None);
                    Err(e.to_string())
                }
            }
        }
        .await;
        match result {
            Ok((instance, served, actor)) => Ok(Self {
                router,
                ingest,
                instance,
                served,
                actor,
            }),
            Err(e) => {
                ingest.shutdown().await;
                Err(e)
            }
        }
    }

    pub fn router(&self) -> &Arc<KvRouter> {
        &self.router
    }

    pub fn instance(&self) -> &ComponentInstance {
        &self.instance
    }

    /// The actors a supervisor links to: the route actor and the event ingest.
    pub(crate) fn cells(&self) -> Vec<ractor::ActorCell> {
        vec![self.actor.get_cell(), self.ingest.cell()]
    }

    /// Deregisters and stops.
    pub async fn shutdown(self) {
        self.served.shutdown(Duration::from_secs(1)).await;
        self.actor.stop(None);
        self.ingest.shutdown().await;
    }
}
