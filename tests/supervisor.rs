//! The root supervisor over both buses: roles start and stop while the process runs and the
//! frontend sees workers join and leave; bad commands get typed errors and change nothing.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use dynamo_actors::frontend::{Endpoint, FrontendSettings, ModelTable};
use dynamo_actors::supervisor::{
    RoleKind, RoleSpec, Started, SupervisorError, SupervisorHandle, WorkerSpec,
};
use dynamo_actors::worker::{EngineFactory, WorkerSettings};
use dynamo_engine::{EchoEngine, EchoSettings, Engine};
use dynamo_preprocessor::ModelFolder;
use dynamo_runtime::subject::{ComponentId, Namespace};
use serde_json::json;

const MODEL: &str = "tiny";

async fn until_instances(table: &ModelTable, n: usize, what: &str) {
    let mut changes = table.changes();
    tokio::time::timeout(Duration::from_secs(10), async {
        while table.get(MODEL).map_or(0, |e| e.instances.len()) != n {
            changes.changed().await.expect("the table lives");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

fn worker(folder: &ModelFolder) -> RoleSpec {
    let card = folder.files().card(MODEL, 16, 0).unwrap();
    let factory: EngineFactory = Arc::new(|| {
        Box::pin(async {
            Ok(Arc::new(EchoEngine::new(EchoSettings {
                delay_per_token: Duration::ZERO,
            })) as Arc<dyn Engine>)
        })
    });
    RoleSpec::Worker(Box::new(WorkerSpec::new(
        ComponentId::new("suptest", "backend").unwrap(),
        WorkerSettings::new(card, folder.files().clone()),
        factory,
    )))
}

async fn roles_start_and_stop_at_run_time(bus: Option<String>) {
    let (_dir, folder) = common::small_model();
    let (runtime, sup) = common::supervised(bus).await;
    let mut fs = FrontendSettings::new(Namespace::new("suptest").unwrap());
    fs.http_addr = Some("127.0.0.1:0".parse().unwrap());
    let Started::Frontend { addr, serving } = sup
        .start_role("frontend", RoleSpec::Frontend(Box::new(fs.clone())))
        .await
        .unwrap()
    else {
        panic!("not a frontend")
    };
    let table = serving.table().clone();

    sup.start_role("w1", worker(&folder)).await.unwrap();
    until_instances(&table, 1, "w1 joined").await;
    let Started::Worker { instance: w2 } = sup.start_role("w2", worker(&folder)).await.unwrap()
    else {
        panic!("not a worker")
    };
    until_instances(&table, 2, "w2 joined").await;
    assert!(table
        .get(MODEL)
        .unwrap()
        .instances
        .iter()
        .any(|w| w.instance == w2));

    // Bad commands: typed errors, nothing started or stopped.
    assert_eq!(
        sup.start_role("w2", worker(&folder)).await.err(),
        Some(SupervisorError::Duplicate("w2".into()))
    );
    assert_eq!(
        sup.stop_role("nobody", Duration::ZERO).await,
        Err(SupervisorError::UnknownRole("nobody".into()))
    );
    assert!(matches!(
        sup.start_role("two words", worker(&folder)).await,
        Err(SupervisorError::BadName(_))
    ));
    // A second frontend on the first one's port cannot bind: refused, nothing left behind.
    let mut clash = fs.clone();
    clash.http_addr = addr;
    assert!(matches!(
        sup.start_role("frontend2", RoleSpec::Frontend(Box::new(clash)))
            .await,
        Err(SupervisorError::Start { .. })
    ));
    let roles = sup.roles().await.unwrap();
    let names: Vec<(&str, RoleKind)> = roles.iter().map(|r| (r.name.as_str(), r.kind)).collect();
    assert_eq!(
        names,
        [
            ("frontend", RoleKind::Frontend),
            ("w1", RoleKind::Worker),
            ("w2", RoleKind::Worker)
        ]
    );
    assert_eq!(table.get(MODEL).unwrap().instances.len(), 2);

    // Stopping a worker at run time: the frontend sees it leave, and requests go to the other.
    sup.stop_role("w2", Duration::from_secs(1)).await.unwrap();
    until_instances(&table, 1, "w2 left").await;
    for _ in 0..4 {
        let body = json!({"model": MODEL, "prompt": "one two", "max_tokens": 2});
        let mut g = serving.start(Endpoint::Completions, &body).await.unwrap();
        assert_ne!(g.worker, w2, "routed to a stopped worker");
        while let Some(p) = g.next().await {
            p.expect("served by w1");
        }
    }

    // The runtime's shutdown token is the root of the tree: cancelling it (as SIGTERM does)
    // stops every role, workers drained and deregistered.
    runtime.shutdown_token().cancel();
    until_instances(&table, 0, "every worker left at shutdown").await;
    tokio::time::timeout(Duration::from_secs(10), sup.stopped())
        .await
        .expect("the supervisor stops");
    assert_eq!(sup.roles().await, Err(SupervisorError::Stopped));
    runtime.close().await;
}

on_both_buses!(
    supervisor_embedded_bus,
    supervisor_nats_bus,
    roles_start_and_stop_at_run_time
);

/// Polls the supervisor's health (a state with no event of its own) until it is unhealthy
/// because of the backend role.
async fn eventually_unhealthy(sup: &SupervisorHandle) {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (healthy, shown) = sup.health();
        let backend_down = shown["roles"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["role"] == "backend" && r["state"] != "serving");
        if !healthy && backend_down {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "never unhealthy: {shown}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A worker whose engine fails and then cannot be started again gives up (escalates); the
/// supervisor restarts the whole role with backoff, as a new instance that the frontend lists.
async fn a_failed_role_restarts(bus: Option<String>) {
    use dynamo_engine::{MockerEngine, MockerFaults, MockerSettings};
    use std::sync::atomic::{AtomicU32, Ordering};

    let (_dir, folder) = common::small_model();
    let (runtime, sup) = common::supervised(bus).await;
    let serving = common::frontend_role(&sup, "restart").await;
    // Engine starts: the first panics on its first step; the next five fail; then they work.
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let factory: EngineFactory = Arc::new(move || {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            if (1..=5).contains(&n) {
                return Err(format!("injected start failure {n}"));
            }
            let faults = MockerFaults {
                panic_at_step: (n == 0).then_some(1),
                ..Default::default()
            };
            let e = MockerEngine::start(MockerSettings {
                num_gpu_blocks: 64,
                block_size: 16,
                faults,
                ..Default::default()
            })
            .map_err(|e| e.to_string())?;
            Ok(Arc::new(e) as Arc<dyn Engine>)
        })
    });
    let mut ws = WorkerSettings::new(
        folder.files().card(MODEL, 16, 64).unwrap(),
        folder.files().clone(),
    );
    ws.restart_initial = Duration::from_millis(10);
    let spec = WorkerSpec::new(ComponentId::new("restart", "backend").unwrap(), ws, factory);
    let Started::Worker { instance: first } = sup
        .start_role("backend", RoleSpec::Worker(Box::new(spec)))
        .await
        .unwrap()
    else {
        panic!("not a worker")
    };
    let table = serving.table().clone();
    until_instances(&table, 1, "the first instance is listed").await;
    let body = json!({"model": MODEL, "prompt": "one two", "max_tokens": 2});
    // The request on the engine that fails waits for the role to come back and is answered
    // by its new instance.
    let request = {
        let (serving, body) = (serving.clone(), body.clone());
        tokio::spawn(async move {
            let mut g = serving.start(Endpoint::Completions, &body).await?;
            while let Some(p) = g.next().await {
                p?;
            }
            Ok::<_, dynamo_actors::frontend::ApiError>(g.worker)
        })
    };
    eventually_unhealthy(&sup).await;

    // The role comes back as a new instance (the supervisor's backoff is 500 ms).
    let mut changes = table.changes();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let listed: Vec<_> = table
                .get(MODEL)
                .map(|e| e.instances.iter().map(|a| a.instance).collect())
                .unwrap_or_default();
            if listed.len() == 1 && listed[0] != first {
                return;
            }
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("the restarted role's new instance is listed");
    let roles = sup.roles().await.unwrap();
    let backend = roles.iter().find(|r| r.name == "backend").unwrap();
    assert!(backend.running);
    let (healthy, shown) = sup.health();
    assert!(healthy, "healthy again: {shown}");
    assert_eq!(backend.restarts, 1);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        7,
        "1 + 5 failed + the new role's engine"
    );
    let served_by = request
        .await
        .unwrap()
        .expect("the request survives the role's restart");
    assert_ne!(served_by, first, "answered by the new instance");
    let mut g = serving.start(Endpoint::Completions, &body).await.unwrap();
    while let Some(p) = g.next().await {
        p.expect("the restarted role serves");
    }

    sup.shutdown(Duration::from_secs(1)).await;
    runtime.close().await;
}

on_both_buses!(
    role_restart_embedded_bus,
    role_restart_nats_bus,
    a_failed_role_restarts
);

/// The supervisor's mailbox is bounded: while it is busy starting a role, at most
/// `MAX_PENDING` commands wait and the rest are refused at once with `Busy`; the waiting ones
/// are answered once it is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_supervisor_mailbox_refuses_with_busy() {
    use dynamo_actors::supervisor::MAX_PENDING;

    let (_dir, folder) = common::small_model();
    let (runtime, sup) = common::supervised(None).await;
    // An engine that starts only when the test says so keeps the supervisor busy.
    let (entered_tx, entered) = tokio::sync::oneshot::channel::<()>();
    let (release, gate) = tokio::sync::oneshot::channel::<()>();
    let once = Arc::new(std::sync::Mutex::new(Some((entered_tx, gate))));
    let factory: EngineFactory = Arc::new(move || {
        let once = once.lock().unwrap().take();
        Box::pin(async move {
            if let Some((entered, gate)) = once {
                let _ = entered.send(());
                let _ = gate.await;
            }
            Ok(Arc::new(EchoEngine::new(EchoSettings {
                delay_per_token: Duration::ZERO,
            })) as Arc<dyn Engine>)
        })
    });
    let spec = RoleSpec::Worker(Box::new(WorkerSpec::new(
        ComponentId::new("busy", "backend").unwrap(),
        WorkerSettings::new(
            folder.files().card(MODEL, 16, 0).unwrap(),
            folder.files().clone(),
        ),
        factory,
    )));
    let starting = {
        let sup = sup.clone();
        tokio::spawn(async move { sup.start_role("slow", spec).await })
    };
    entered.await.unwrap();
    // The supervisor is inside the start; now more commands than its mailbox takes. Each
    // takes its place on its first poll; the gate opens after all have been polled.
    let asks = futures::future::join_all((0..MAX_PENDING + 20).map(|_| sup.roles()));
    let (results, _) = tokio::join!(asks, async {
        tokio::task::yield_now().await;
        let _ = release.send(());
    });
    starting.await.unwrap().expect("the slow role starts");
    let mut busy = 0;
    let mut answered = 0;
    for r in results {
        match r {
            Err(SupervisorError::Busy) => busy += 1,
            Ok(_) => answered += 1,
            Err(e) => panic!("{e}"),
        }
    }
    // The start command left the mailbox when the supervisor took it up.
    assert_eq!(answered, MAX_PENDING, "as many as may wait are answered");
    assert_eq!(busy, 20, "the rest are refused at once");
    sup.shutdown(Duration::from_secs(1)).await;
    runtime.close().await;
}
