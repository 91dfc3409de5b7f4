//! The root supervisor over both buses: roles start and stop while the process runs and the
//! frontend sees workers join and leave; bad commands get typed errors and change nothing.

use std::sync::Arc;
use std::time::Duration;

use dynamo_actors::frontend::{Endpoint, FrontendSettings, ModelTable};
use dynamo_actors::supervisor::{
    RoleKind, RoleSpec, Started, SupervisorError, SupervisorHandle, WorkerSpec,
};
use dynamo_actors::worker::{EngineFactory, WorkerSettings};
use dynamo_engine::{EchoEngine, EchoSettings, Engine};
use dynamo_preprocessor::make_model::{make_model, MakeModelSettings};
use dynamo_preprocessor::ModelFolder;
use dynamo_runtime::subject::{ComponentId, Namespace};
use dynamo_runtime::testing::NatsServer;
use dynamo_runtime::{Runtime, RuntimeSettings};
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
    let dir = tempfile::tempdir().unwrap();
    make_model(dir.path(), &MakeModelSettings::default()).unwrap();
    let folder = ModelFolder::load(dir.path()).unwrap();
    let runtime = Runtime::start(RuntimeSettings {
        bus,
        ..Default::default()
    })
    .await
    .unwrap();
    let sup = SupervisorHandle::start(&runtime).await.unwrap();
    let mut fs = FrontendSettings::new(Namespace::new("suptest").unwrap());
    fs.http_addr = Some("127.0.0.1:0".parse().unwrap());
    let Started::Frontend { addr, serving } = sup
        .start_role("frontend", RoleSpec::Frontend(fs.clone()))
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
        sup.start_role("frontend2", RoleSpec::Frontend(clash)).await,
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

    sup.shutdown(Duration::from_secs(1)).await;
    until_instances(&table, 0, "every worker left at shutdown").await;
    assert_eq!(sup.roles().await, Err(SupervisorError::Stopped));
    runtime.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisor_embedded_bus() {
    roles_start_and_stop_at_run_time(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisor_nats_bus() {
    let server = NatsServer::start().unwrap();
    roles_start_and_stop_at_run_time(Some(server.url())).await;
}
