//! `dynamo-run serve GRAPH.yaml`: starts a component graph ([`crate::graph`]).
//!
//! - Without a bus, every component runs in this process on the embedded bus (workers as
//!   instances, routers as router components, frontends on their HTTP ports).
//! - With `--bus nats://...` (or `bus:` in the graph), each component replica is its own
//!   `dynamo-run` child process, started in dependency order (each component's replicas ready
//!   before its dependents start), its output prefixed `[component.replica]`, restarted with
//!   exponential backoff (1 s doubling to 30 s) if it exits before it serves or soon after;
//!   one that served 10 s, or was serving when it got SIGKILL, restarts after 1 s.
//!   `--only NAME` starts just that component (a graph spread over machines).
//!
//! SIGTERM or SIGINT stops everything in reverse dependency order: each component's processes
//! get SIGTERM and up to the runtime's shutdown grace to drain, then SIGKILL.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dynamo_actors::supervisor::{RoleSpec, Started, SupervisorHandle};
use dynamo_runtime::bus::{AbortOnDrop, Outgoing};
use dynamo_runtime::discovery::ProcessId;
use dynamo_runtime::subject::{gone_subject, DiscoveryFilter, Namespace};
use dynamo_runtime::{DiscoveryEvent, InstanceId, Runtime};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::graph::{Component, Graph, Launch, Role};
use crate::launch::{self, Input};
use crate::scale::{EmbeddedPool, Pool, ProcessPool, Scaler};
use crate::settings;

/// Runs the graph in this process: every component replica is a role of this process's
/// supervisor, named `{component}` (or `{component}-{replica}` with several replicas).
pub async fn embedded(runtime: &Runtime, g: &Graph) -> Result<()> {
    let grace = runtime.settings().shutdown_grace;
    let sup = SupervisorHandle::start(runtime).await?;
    let mut scaler = None;
    let (frontends, models) = match start_embedded(runtime, &sup, g, &mut scaler).await {
        Ok(started) => started,
        Err(e) => {
            // Nothing half-started: what did start stops again.
            if let Some(s) = scaler {
                s.stop().await;
            }
            sup.shutdown(grace).await;
            return Err(e);
        }
    };
    dynamo_runtime::telemetry::mark_ready();
    println!(
        "ready: graph {} ({} components) on the embedded bus",
        g.file.display(),
        g.components.len()
    );
    std::io::stdout().flush()?;
    if let (Some(addr), Some((model, n))) = (frontends.first(), models.first()) {
        let base = format!("localhost:{}", addr.port());
        eprintln!(
            "try:\n  curl -s {base}/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], \"max_tokens\": 20}}'\n  curl -s {base}/health     # the {n} worker instance(s) serving {model}\n  curl -s {base}/metrics    # Prometheus series of every role in this process\nCtrl-C stops the graph."
        );
    }
    let signal = launch::wait_for_stop(runtime).await;
    eprintln!("{signal}: stopping in reverse dependency order");
    stop_embedded(&sup, g, scaler, grace).await;
    Ok(())
}

/// Stops the planners first (nothing scales while the graph stops), then the scaled pools
/// (draining), then the rest in reverse start order.
async fn stop_embedded(sup: &SupervisorHandle, g: &Graph, scaler: Option<Scaler>, grace: Duration) {
    for c in g.components.iter().filter(|c| c.role == Role::Planner) {
        let _ = sup.stop_role(&c.name, grace).await;
    }
    if let Some(s) = scaler {
        s.stop().await;
    }
    sup.shutdown(grace).await;
}

/// Starts the graph's roles in dependency order; returns the frontends' addresses and the
/// (model, worker instances) served.
async fn start_embedded(
    runtime: &Runtime,
    sup: &SupervisorHandle,
    g: &Graph,
    scaler: &mut Option<Scaler>,
) -> Result<(Vec<std::net::SocketAddr>, Vec<(String, usize)>)> {
    let mut frontends = Vec::new();
    let scaled = g.scaled();
    let mut pools = BTreeMap::new();
    let ns = Namespace::new(&g.namespace)?;
    // (model, instances) of the workers started so far: frontends are ready once they list them.
    let mut models: Vec<(String, usize)> = Vec::new();
    for c in &g.components {
        let role = |i: usize| {
            if c.replicas == 1 {
                c.name.clone()
            } else {
                format!("{}-{i}", c.name)
            }
        };
        // The component's settings, resolved directly: no command line in between.
        match c.launch(g) {
            Launch::Planner(p) => {
                // Its pools started before it (it depends on them): serve their scaling now.
                if scaler.is_none() {
                    *scaler = Some(
                        Scaler::start(runtime, &g.namespace, std::mem::take(&mut pools)).await?,
                    );
                }
                let settings = settings::planner_settings(&g.namespace, &p)
                    .with_context(|| format!("component {}", c.name))?;
                sup.start_role(&c.name, RoleSpec::Planner(Box::new(settings)))
                    .await
                    .map_err(|e| anyhow!("component {}: {e}", c.name))?;
                println!("[{}] planner started", c.name);
            }
            Launch::Router(r) => {
                let settings = settings::router_settings(&r)
                    .with_context(|| format!("component {}", c.name))?;
                for i in 0..c.replicas {
                    let spec = RoleSpec::Router {
                        namespace: ns.clone(),
                        settings: Box::new(settings.clone()),
                    };
                    sup.start_role(&role(i), spec)
                        .await
                        .map_err(|e| anyhow!("component {}: {e}", c.name))?;
                }
                println!("[{}] {} router(s) ready", c.name, c.replicas);
            }
            Launch::Process {
                input,
                output,
                settings,
            } => {
                let s = settings::resolve(input, output, &g.namespace, &settings)
                    .with_context(|| format!("component {}", c.name))?;
                if s.drop_bus_after.is_some() {
                    bail!("component {}: mocker_drop_bus_after_ms needs a bus (serve --bus nats://...): there is no connection to drop in one process", c.name);
                }
                match &s.input {
                    Input::Http => {
                        for i in 0..c.replicas {
                            let mut fs = launch::frontend_settings(&s, &ns);
                            fs.http_addr = Some(s.http_addr);
                            let Started::Frontend { addr, serving } = sup
                                .start_role(&role(i), RoleSpec::Frontend(Box::new(fs)))
                                .await?
                            else {
                                unreachable!("a frontend spec starts a frontend");
                            };
                            for (m, n) in &models {
                                launch::wait_model(serving.table(), Some(m), *n).await?;
                            }
                            let addr = addr.expect("an HTTP frontend");
                            println!("[{}] ready: {}://{addr}/v1", c.name, s.scheme());
                            frontends.push(addr);
                        }
                    }
                    Input::Endpoint(ep) if scaled.contains(&c.name) => {
                        let model = Arc::new(launch::WorkerModel::load(&s)?);
                        let mut pool = Pool::embedded(
                            &c.name,
                            EmbeddedPool {
                                sup: sup.clone(),
                                settings: s.clone(),
                                endpoint: ep.clone(),
                                model: model.clone(),
                                grace: runtime.settings().shutdown_grace,
                            },
                        );
                        pool.scale_to(c.replicas).await?;
                        pools.insert(c.name.clone(), pool);
                        println!(
                            "[{}] {} worker(s) of model {} ready (scaled by a planner)",
                            c.name, c.replicas, model.name
                        );
                        if c.role != Role::Prefill {
                            match models.iter_mut().find(|(m, _)| *m == model.name) {
                                Some((_, n)) => *n += c.replicas,
                                None => models.push((model.name.clone(), c.replicas)),
                            }
                        }
                    }
                    Input::Endpoint(ep) => {
                        let (w, model) =
                            launch::start_workers(sup, &s, ep, c.replicas, &c.name).await?;
                        println!("[{}] {} worker(s) of model {model} ready", c.name, w.len());
                        if c.role == Role::Prefill {
                            // Frontends never list prefill workers: nothing to wait for.
                            continue;
                        }
                        match models.iter_mut().find(|(m, _)| *m == model) {
                            Some((_, n)) => *n += w.len(),
                            None => models.push((model, w.len())),
                        }
                    }
                    other => bail!("component {}: unexpected input {other}", c.name),
                }
            }
        }
        std::io::stdout().flush()?;
    }
    Ok((frontends, models))
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// What a component's processes get in their environment besides this one's: the NATS
/// settings this supervisor connected with (from its `--config`, flags or environment), with
/// the component's own credentials instead of its when it has some
/// ([`crate::graph::ComponentNats`]).
pub(crate) use crate::graph::OwnEnv;

/// Serving this long after its ready line, a replica that exits is not crash-looping: it
/// restarts after the first delay.
const STABLE: Duration = Duration::from_secs(10);

/// A replica's command: its label in the output, its arguments, its own environment.
pub(crate) struct Child {
    pub label: String,
    pub args: Vec<String>,
    pub env: Arc<OwnEnv>,
}

/// One replica's supervision loop: run, forward output, restart with backoff until `stop`.
pub(crate) async fn supervise(
    child: Child,
    ready: mpsc::UnboundedSender<(String, String)>,
    stop: CancellationToken,
    shutting_down: CancellationToken,
    grace: Duration,
    reaper: Reaper,
) {
    let Child {
        label,
        args,
        env: own,
    } = child;
    let exe = std::env::current_exe().unwrap_or_else(|_| "dynamo-run".into());
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(&args);
        for var in &own.0 {
            cmd.env_remove(var);
        }
        let child = cmd
            .envs(own.1.iter().cloned())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group: a terminal's Ctrl-C reaches only this supervisor, which
            // stops the children in order.
            .process_group(0)
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                eprintln!("[{label}] cannot start: {e}");
                return;
            }
        };
        let pid = child.id().unwrap_or(0);
        let ready_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
        let forward = |stream: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>, out: bool| {
            let (label, ready, ready_at) = (label.clone(), ready.clone(), ready_at.clone());
            tokio::spawn(async move {
                let Some(s) = stream else { return };
                let mut lines = BufReader::new(s).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if out {
                        if line.starts_with("ready") {
                            if let Ok(mut at) = ready_at.lock() {
                                at.get_or_insert_with(Instant::now);
                            }
                            let _ = ready.send((label.clone(), line.clone()));
                        }
                        println!("[{label}] {line}");
                    } else {
                        eprintln!("[{label}] {line}");
                    }
                }
            })
        };
        let o = forward(child.stdout.take().map(|s| Box::new(s) as _), true);
        let e = forward(child.stderr.take().map(|s| Box::new(s) as _), false);
        let status = tokio::select! {
            s = child.wait() => Some(s),
            _ = stop.cancelled() => None,
        };
        match status {
            None => {
                signal(pid, nix::sys::signal::Signal::SIGTERM);
                if tokio::time::timeout(grace, child.wait()).await.is_err() {
                    eprintln!("[{label}] did not stop within {grace:?}: killing");
                    let _ = child.kill().await;
                }
                let _ = tokio::join!(o, e);
                return;
            }
            Some(status) => {
                // Callers streaming from the child hear of its death before anything else.
                if !shutting_down.is_cancelled() {
                    reaper.reap(&label, pid).await;
                }
                let _ = tokio::join!(o, e);
                let killed = status
                    .as_ref()
                    .is_ok_and(|s| std::os::unix::process::ExitStatusExt::signal(s) == Some(9));
                let status = status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string());
                if shutting_down.is_cancelled() {
                    eprintln!("[{label}] exited ({status}) during shutdown");
                    return;
                }
                // A crash loop is a replica that dies before it serves, or soon after. One
                // that was serving and got SIGKILL (an operator, the OOM killer), or that
                // served a while, restarts at once (after the first delay).
                let ready_for = ready_at.lock().ok().and_then(|at| at.map(|t| t.elapsed()));
                if started.elapsed() > Duration::from_secs(60)
                    || ready_for.is_some_and(|d| d >= STABLE || killed)
                {
                    backoff = Duration::from_secs(1);
                }
                eprintln!("[{label}] exited ({status}); restarting in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

struct Running {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What `serve` does when a child dies unasked: it knows at once (it is the parent), while
/// callers streaming from the child would need a probe after a silence. So it follows
/// discovery for the instances its children registered (entries name their host and
/// process), and on a death announces each of the child's instances gone
/// (`dyn.gone.{instance}`): open calls to them end at once and move. Their discovery entries
/// stay until their leases expire, as when no supervisor watches: the model stays listed while
/// the child restarts (new requests wait for a worker instead of getting a 404), and callers
/// route around the dead instance once a call to it fails.
/// Each child's registrations by pid: (discovery key, instance).
type Registrations = BTreeMap<u32, Vec<(String, InstanceId)>>;

#[derive(Clone)]
pub(crate) struct Reaper {
    runtime: Runtime,
    by_pid: Arc<Mutex<Registrations>>,
    _follow: Arc<AbortOnDrop>,
}

impl Reaper {
    async fn start(runtime: &Runtime, namespace: &str) -> Result<Self> {
        let ns = Namespace::new(namespace)?;
        let mut watch = runtime
            .discovery()
            .watch(DiscoveryFilter::namespace(&ns))
            .await
            .context("following discovery for the children's instances")?;
        let host = ProcessId::this().host;
        let by_pid: Arc<Mutex<Registrations>> = Arc::default();
        let map = by_pid.clone();
        let follow = tokio::spawn(async move {
            while let Some(event) = watch.next().await {
                let Ok(mut map) = map.lock() else { return };
                match event {
                    DiscoveryEvent::Joined(info) => {
                        let Some(p) = info.process.as_ref().filter(|p| p.host == host) else {
                            continue;
                        };
                        let key = info.key();
                        let mine = map.entry(p.pid).or_default();
                        mine.retain(|(k, _)| *k != key);
                        mine.push((key, info.instance));
                    }
                    DiscoveryEvent::Left {
                        endpoint, instance, ..
                    } => {
                        let key = endpoint.discovery_key(instance);
                        for mine in map.values_mut() {
                            mine.retain(|(k, _)| *k != key);
                        }
                        map.retain(|_, mine| !mine.is_empty());
                    }
                }
            }
        });
        Ok(Self {
            runtime: runtime.clone(),
            by_pid,
            _follow: Arc::new(AbortOnDrop(follow.abort_handle())),
        })
    }

    /// Child `pid` (`label`) died: its instances are gone.
    async fn reap(&self, label: &str, pid: u32) {
        let instances: std::collections::BTreeSet<InstanceId> = match self.by_pid.lock() {
            Ok(mut map) => map
                .remove(&pid)
                .into_iter()
                .flatten()
                .map(|(_, i)| i)
                .collect(),
            Err(_) => return,
        };
        if instances.is_empty() {
            return;
        }
        let bus = self.runtime.bus();
        for &i in &instances {
            let notice = Outgoing::new(gone_subject(i), bytes::Bytes::new());
            if let Err(e) = bus.publish(notice).await {
                eprintln!("[{label}] could not announce instance {i} gone: {e}");
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), bus.flush()).await;
        let shown: Vec<String> = instances.iter().map(|i| i.to_string()).collect();
        eprintln!(
            "[{label}] announced its instance(s) {} gone",
            shown.join(", ")
        );
    }
}

/// Runs the graph's components (or only `only`) as supervised child processes on `bus`.
pub async fn supervised(runtime: &Runtime, g: &Graph, bus: &str, only: Option<&str>) -> Result<()> {
    let grace = runtime.settings().shutdown_grace;
    let comps: Vec<&Component> = match only {
        Some(name) => vec![g.component(name).ok_or_else(|| {
            anyhow!("--only {name:?}: no such component in {}", g.file.display())
        })?],
        None => g.components.iter().collect(),
    };
    // Every component's environment resolves before anything starts: this process's NATS
    // settings, or its own credentials in place of this process's.
    let base = runtime.settings().nats.to_env();
    let mut own_env: BTreeMap<String, Arc<OwnEnv>> = BTreeMap::new();
    for c in &comps {
        let env = match &c.nats {
            Some(n) => {
                let (drop, own) = n.env(&c.name, |v| std::env::var(v).ok())?;
                let set = (base.iter())
                    .filter(|(k, _)| !drop.contains(&k.as_str()))
                    .cloned()
                    .chain(own)
                    .collect();
                (drop, set)
            }
            None => (Vec::new(), base.clone()),
        };
        own_env.insert(c.name.clone(), Arc::new(env));
    }
    let mut running: Vec<Running> = Vec::new();
    let shutting_down = CancellationToken::new();
    let reaper = Reaper::start(runtime, &g.namespace).await?;
    let processes: usize = comps.iter().map(|c| c.replicas).sum();
    let scaled = g.scaled();
    let shared = Arc::new(g.clone());
    let mut pools = BTreeMap::new();
    let mut scaler: Option<Scaler> = None;
    let result = async {
        for c in &comps {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let stop = CancellationToken::new();
            if c.role == Role::Planner && scaler.is_none() {
                scaler =
                    Some(Scaler::start(runtime, &g.namespace, std::mem::take(&mut pools)).await?);
            }
            let tasks = if scaled.contains(&c.name) {
                // A planner's pool: its replicas are the scaler's.
                let mut pool = Pool::processes(
                    &c.name,
                    ProcessPool {
                        component: (*c).clone(),
                        graph: shared.clone(),
                        bus: bus.to_string(),
                        grace,
                        shutting_down: shutting_down.clone(),
                        ready: tx.clone(),
                        reaper: reaper.clone(),
                        env: own_env[&c.name].clone(),
                    },
                );
                pool.scale_to(c.replicas).await?;
                pools.insert(c.name.clone(), pool);
                Vec::new()
            } else {
                (0..c.replicas)
                    .map(|r| {
                        tokio::spawn(supervise(
                            Child {
                                label: format!("{}.{r}", c.name),
                                args: c.args(g, Some(bus), r),
                                env: own_env[&c.name].clone(),
                            },
                            tx.clone(),
                            stop.clone(),
                            shutting_down.clone(),
                            grace,
                            reaper.clone(),
                        ))
                    })
                    .collect()
            };
            running.push(Running { stop, tasks });
            // Dependents start once every replica of this component is ready.
            let seen = Arc::new(Mutex::new(std::collections::HashSet::new()));
            let wait = async {
                while seen.lock().map(|s| s.len()).unwrap_or(0) < c.replicas {
                    match rx.recv().await {
                        Some((label, _)) => {
                            if let Ok(mut s) = seen.lock() {
                                s.insert(label);
                            }
                        }
                        None => break,
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::timeout(Duration::from_secs(120), wait) => {}
                s = launch::wait_for_stop(runtime) => bail!("{s} while starting {}", c.name),
            }
            let ready = seen.lock().map(|s| s.len()).unwrap_or(0);
            if ready < c.replicas {
                bail!(
                    "component {}: {ready} of {} replicas got ready within 120 s",
                    c.name,
                    c.replicas
                );
            }
        }
        // Pools whose planner runs elsewhere (`--only`): scaled from there.
        if scaler.is_none() && !pools.is_empty() {
            scaler = Some(Scaler::start(runtime, &g.namespace, std::mem::take(&mut pools)).await?);
        }
        Ok(())
    }
    .await;
    if result.is_ok() {
        dynamo_runtime::telemetry::mark_ready();
        println!(
            "ready: graph {} ({processes} processes) on {bus}",
            g.file.display()
        );
        std::io::stdout().flush()?;
        let signal = launch::wait_for_stop(runtime).await;
        eprintln!("{signal}: stopping in reverse dependency order");
    }
    shutting_down.cancel();
    for r in running.into_iter().rev() {
        r.stop.cancel();
        for t in r.tasks {
            let _ = t.await;
        }
    }
    // The pools last (workers), draining.
    if let Some(s) = scaler {
        s.stop().await;
    }
    for (_, p) in pools {
        p.stop().await;
    }
    result
}
