//! The frontend role: the OpenAI HTTP API in front of the workers.
//!
//! - [`models`]: the model watcher actor follows discovery and keeps the table of served
//!   models (card, preprocessor, live instances);
//! - [`serving`]: the request path shared by HTTP and the terminal inputs (`in=text`,
//!   `in=batch`): preprocess, admit, route, stream, account;
//! - `http`: the axum routes; `metrics`: the `dynamo_frontend_*` series.
//!
//! Routing in this role is the simple modes (round-robin, random, direct); the KV-aware
//! router is its own role.

mod anthropic;
pub mod auth;
mod http;
mod responses;
pub mod tls;
pub use http::{PREFILL_WORKER_HEADER, WORKER_HEADER};
pub mod metrics;
pub mod models;
pub mod serving;
pub mod stats;
pub mod status;

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use axum::serve::ListenerExt;
use dynamo_runtime::subject::Namespace;
use dynamo_runtime::{telemetry, Runtime};
use ractor::{Actor, ActorRef};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::membership::MembershipHandle;
use crate::router::{spawn_publisher, start_ingest, KvRouter, KvRouterSettings, RouterIngest};
use dynamo_protocols::router::{ROUTER_COMPONENT, ROUTE_ENDPOINT};
use dynamo_runtime::subject::ComponentId;
use serving::RemoteRouter;

pub use metrics::Endpoint;
pub use models::{ModelEntry, ModelTable, WorkerAddr};
pub use serving::{ApiError, Generation, Serving, DEFAULT_MIGRATION_LIMIT};

/// How the frontend picks a worker among a model's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouterMode {
    #[default]
    RoundRobin,
    Random,
    /// The request names the instance (`nvext.backend_instance_id`).
    Direct,
    /// KV-aware: least prefill work left after cached blocks, weighed against load.
    Kv,
    /// The least loaded worker (reported and routed blocks), ignoring cached prefixes.
    LeastLoaded,
}

impl RouterMode {
    /// Whether the mode needs the KV router's index and load tracking.
    pub fn uses_kv_router(self) -> bool {
        matches!(self, RouterMode::Kv | RouterMode::LeastLoaded)
    }
}

impl FromStr for RouterMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round-robin" => Ok(RouterMode::RoundRobin),
            "random" => Ok(RouterMode::Random),
            "direct" => Ok(RouterMode::Direct),
            "kv" => Ok(RouterMode::Kv),
            "least-loaded" => Ok(RouterMode::LeastLoaded),
            other => Err(format!(
                "unknown router mode {other:?}; expected kv, round-robin, random, least-loaded or direct"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct FrontendSettings {
    /// Where to serve HTTP; `None` for the terminal inputs.
    pub http_addr: Option<SocketAddr>,
    pub namespace: Namespace,
    pub router_mode: RouterMode,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// Requests in flight beyond this get 429 with `Retry-After`.
    pub max_inflight: usize,
    /// Times a streaming request may move to another worker when its worker dies or fails
    /// (see [`Generation`]); 0: never.
    pub migration_limit: u32,
    /// Settings of the KV router (modes `kv` and `least-loaded`).
    pub kv_router: KvRouterSettings,
    /// Modes `kv` and `least-loaded`: ask the router component `{namespace}.router` for each
    /// request's worker instead of routing in this process (requests are routed round-robin,
    /// with a warning and `dynamo_frontend_router_fallbacks_total`, while none answers).
    pub remote_router: bool,
    /// Publish request statistics for the planner this often (`None`: never).
    pub stats_interval: Option<std::time::Duration>,
    /// How tool calls and reasoning are read out of models' output.
    pub parsers: dynamo_preprocessor::tools::OutputParsers,
    /// API keys (none: the API is open).
    pub auth: auth::AuthSettings,
    /// HTTPS: the certificate chain and private key (PEM files).
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl FrontendSettings {
    pub fn new(namespace: Namespace) -> Self {
        Self {
            http_addr: None,
            namespace,
            router_mode: RouterMode::default(),
            max_body_bytes: 16 * 1024 * 1024,
            max_inflight: 1024,
            migration_limit: serving::DEFAULT_MIGRATION_LIMIT,
            kv_router: KvRouterSettings::default(),
            remote_router: false,
            stats_interval: Some(std::time::Duration::from_secs(1)),
            parsers: Default::default(),
            auth: Default::default(),
            tls: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("cannot listen on {addr}: {reason}; pick another --http-port")]
    Bind { addr: SocketAddr, reason: String },
    #[error("cannot start the model watcher: {0}")]
    Watcher(String),
    #[error("cannot install metrics: {0}")]
    Metrics(String),
    #[error("API keys: {0}")]
    Auth(String),
    #[error("HTTPS: {0}")]
    Tls(String),
}

/// A running frontend.
pub struct Frontend {
    membership: MembershipHandle,
    watcher: ActorRef<models::WatcherMsg>,
    /// With a remote router: the publisher of this frontend's requests' first tokens and ends.
    publisher: Option<crate::router::Publisher>,
    ingest: Option<RouterIngest>,
    serving: Arc<Serving>,
    addr: Option<SocketAddr>,
    stop: CancellationToken,
    server: Option<tokio::task::JoinHandle<()>>,
    tls: bool,
}

impl Frontend {
    pub async fn start(
        runtime: &Runtime,
        settings: FrontendSettings,
    ) -> Result<Self, FrontendError> {
        crate::describe_metrics();
        let table = Arc::new(ModelTable::default());
        let membership = MembershipHandle::shared(runtime, &settings.namespace)
            .await
            .map_err(|e| FrontendError::Watcher(e.to_string()))?;
        let watcher = models::ModelWatcher {
            runtime: runtime.clone(),
            membership: membership.clone(),
            table: table.clone(),
            parsers: settings.parsers,
        };
        let (watcher, _) = Actor::spawn(None, watcher, ())
            .await
            .map_err(|e| FrontendError::Watcher(e.to_string()))?;
        let mut remote = None;
        let mut publisher = None;
        let (router, ingest) = if settings.router_mode.uses_kv_router() && settings.remote_router {
            let endpoint = ComponentId::new(settings.namespace.as_str(), ROUTER_COMPONENT)
                .and_then(|c| c.endpoint(ROUTE_ENDPOINT))
                .map_err(|e| FrontendError::Watcher(e.to_string()))?;
            let (sink, p) = spawn_publisher(runtime, &settings.namespace, rand::random());
            publisher = Some(p);
            remote = Some(RemoteRouter { endpoint, sink });
            (None, None)
        } else if settings.router_mode.uses_kv_router() {
            let mut rs = settings.kv_router.clone();
            rs.load_only = settings.router_mode == RouterMode::LeastLoaded;
            let router = KvRouter::new(rs);
            let ingest = start_ingest(runtime, settings.namespace.clone(), router.clone())
                .await
                .map_err(FrontendError::Watcher)?;
            (Some(router), Some(ingest))
        } else {
            (None, None)
        };
        // Requests record statistics only when they are published.
        let every = settings.stats_interval.filter(|d| !d.is_zero());
        let window = every.map(|_| Arc::new(stats::StatsWindow::default()));
        let serving = Arc::new(
            Serving::new(
                runtime.clone(),
                table,
                settings.router_mode,
                settings.max_inflight,
                router,
                remote,
                window.clone(),
            )
            .with_migration_limit(settings.migration_limit),
        );
        let stop = CancellationToken::new();
        // The status page follows the bus only when there is a page to serve.
        let board = match settings.http_addr {
            Some(_) => Some(
                status::Board::start(runtime, &settings.namespace, stop.clone())
                    .map_err(FrontendError::Watcher)?,
            ),
            None => None,
        };
        if let (Some(every), Some(window)) = (every, window) {
            let s = Arc::downgrade(&serving);
            stats::spawn_publisher(
                runtime,
                &settings.namespace,
                window,
                move || s.upgrade().map(|s| s.inflight()),
                every,
                stop.clone(),
                board.clone(),
            )
            .map_err(FrontendError::Watcher)?;
        }
        let (addr, server) = match settings.http_addr {
            None => (None, None),
            Some(addr) => {
                let handle = telemetry::install_metrics(None)
                    .map_err(|e| FrontendError::Metrics(e.to_string()))?;
                let state = Arc::new(http::HttpState {
                    serving: serving.clone(),
                    max_body_bytes: settings.max_body_bytes,
                    render_metrics: Box::new(move || handle.render()),
                    status: board.clone().unwrap_or_default(),
                    membership: membership.clone(),
                    responses: Default::default(),
                });
                let listener = match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => l,
                    Err(e) => {
                        watcher.stop(None);
                        return Err(FrontendError::Bind {
                            addr,
                            reason: e.to_string(),
                        });
                    }
                };
                let local = listener.local_addr().unwrap_or(addr);
                let tls = match &settings.tls {
                    None => None,
                    Some((cert, key)) => match tls::config(cert, key) {
                        Ok(c) => Some(c),
                        Err(e) => {
                            watcher.stop(None);
                            return Err(FrontendError::Tls(e));
                        }
                    },
                };
                let mut app = http::router(state);
                if settings.auth.enabled() {
                    let keys = match auth::Auth::new(settings.auth.clone()) {
                        Ok(k) => k,
                        Err(e) => {
                            watcher.stop(None);
                            return Err(FrontendError::Auth(e));
                        }
                    };
                    keys.reload_on_sighup(stop.clone());
                    app = app.layer(axum::middleware::from_fn_with_state(keys, auth::check));
                }
                let stop = stop.clone();
                let server = tokio::spawn(async move {
                    let served = match tls {
                        Some(config) => {
                            axum::serve(tls::TlsListener::new(listener, config), app)
                                .with_graceful_shutdown(stop.cancelled_owned())
                                .await
                        }
                        None => {
                            let listener = listener.tap_io(|tcp| {
                                if let Err(e) = tcp.set_nodelay(true) {
                                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                                }
                            });
                            axum::serve(listener, app)
                                .with_graceful_shutdown(stop.cancelled_owned())
                                .await
                        }
                    };
                    if let Err(e) = served {
                        tracing::error!(error = %e, "HTTP server stopped");
                    }
                });
                tracing::info!(addr = %local, "OpenAI API listening");
                (Some(local), Some(server))
            }
        };
        Ok(Self {
            membership,
            watcher,
            publisher,
            ingest,
            serving,
            addr,
            stop,
            server,
            tls: settings.tls.is_some(),
        })
    }

    /// The actors a supervisor links to: the model watcher (and the embedded router's ingest).
    pub(crate) fn cells(&self) -> Vec<ractor::ActorCell> {
        let mut cells = vec![self.watcher.get_cell(), self.membership.cell()];
        cells.extend(self.ingest.as_ref().map(RouterIngest::cell));
        cells
    }

    /// The bound HTTP address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// `https` when serving TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    pub fn serving(&self) -> &Arc<Serving> {
        &self.serving
    }

    pub fn models(&self) -> &Arc<ModelTable> {
        self.serving.table()
    }

    /// Stops accepting connections, lets open responses finish, stops the watcher, then
    /// publishes the routing decisions still queued (the last requests' ends) and stops.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(s) = self.server.take() {
            let _ = s.await;
        }
        self.watcher.stop(None);
        if let Some(i) = self.ingest.take() {
            i.shutdown().await;
        }
        if let Some(p) = self.publisher.take() {
            p.close().await;
        }
    }
}
