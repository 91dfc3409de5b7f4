//! Worker kinds over both buses: a prefill worker registers (with its kind) but frontends do
//! not list it, and it answers a prefill request with exactly the first token; a decode worker
//! is listed and takes requests prefilled elsewhere; an aggregated worker refuses those.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use dynamo_actors::frontend::ModelTable;
use dynamo_actors::membership::MembershipHandle;
use dynamo_actors::supervisor::{RoleSpec, Started, WorkerSpec};
use dynamo_actors::worker::{EngineFactory, WorkerSettings};
use dynamo_engine::{Engine, MockerEngine, MockerSettings};
use dynamo_preprocessor::ModelFolder;
use dynamo_protocols::llm::{
    EngineOutput, FinishReason, PrefillRequest, PreprocessedRequest, RemotePrefill,
    SamplingOptions, StopConditions, WorkerKind,
};
use dynamo_runtime::rpc::{RemoteErrorKind, RpcError};
use dynamo_runtime::subject::{ComponentId, DiscoveryFilter, EndpointName, Namespace};
use dynamo_runtime::{CallOptions, Target};

const MODEL: &str = "tiny";

fn spec(folder: &ModelFolder, component: &str, kind: WorkerKind) -> RoleSpec {
    let card = folder.files().card(MODEL, 16, 256).unwrap();
    let factory: EngineFactory = Arc::new(|| {
        Box::pin(async {
            let e = MockerEngine::start(MockerSettings {
                num_gpu_blocks: 256,
                block_size: 16,
                speedup_ratio: 100.0,
                ..Default::default()
            })
            .map_err(|e| e.to_string())?;
            Ok(Arc::new(e) as Arc<dyn Engine>)
        })
    });
    let mut ws = WorkerSettings::new(card, folder.files().clone());
    ws.kind = kind;
    if kind == WorkerKind::Prefill {
        ws.endpoint = EndpointName::new(WorkerKind::PREFILL_ENDPOINT).unwrap();
    }
    RoleSpec::Worker(Box::new(WorkerSpec::new(
        ComponentId::new("kinds", component).unwrap(),
        ws,
        factory,
    )))
}

/// A request, prefilled on prefill worker `remote` when set.
fn request(remote: Option<u64>) -> PreprocessedRequest {
    PreprocessedRequest {
        token_ids: (100..140).collect(),
        sampling: SamplingOptions::default(),
        stop: StopConditions {
            max_tokens: 8,
            min_tokens: 0,
            stop_token_ids: vec![],
        },
        remote_prefill: remote.map(|instance| RemotePrefill {
            prefill_worker: instance,
            endpoint: "kinds.prefill.prefill".into(),
        }),
        peer_prefix: None,
        resumed_tokens: 0,
    }
}

async fn listed(table: &ModelTable) -> Vec<u64> {
    let mut changes = table.changes();
    tokio::time::timeout(Duration::from_secs(10), async {
        while table.get(MODEL).is_none() {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("the model is listed");
    let mut ids: Vec<u64> = table
        .get(MODEL)
        .unwrap()
        .instances
        .iter()
        .map(|a| a.instance.as_u64())
        .collect();
    ids.sort();
    ids
}

async fn kinds(bus: Option<String>) {
    let (_dir, folder) = common::small_model();
    let (runtime, sup) = common::supervised(bus).await;
    let started = |s: Started| match s {
        Started::Worker { instance } => instance,
        _ => panic!("not a worker"),
    };
    let prefill = started(
        sup.start_role("prefill", spec(&folder, "prefill", WorkerKind::Prefill))
            .await
            .unwrap(),
    );
    let decode = started(
        sup.start_role("decode", spec(&folder, "decode", WorkerKind::Decode))
            .await
            .unwrap(),
    );
    let aggregated = started(
        sup.start_role("agg", spec(&folder, "agg", WorkerKind::Aggregated))
            .await
            .unwrap(),
    );
    // The prefill worker is in discovery with its kind...
    let infos = runtime
        .discovery()
        .list(&DiscoveryFilter::namespace(
            &Namespace::new("kinds").unwrap(),
        ))
        .await
        .unwrap();
    let prefill_info = infos
        .iter()
        .find(|i| i.instance == prefill && i.endpoint.endpoint.as_str() == "prefill")
        .expect("the prefill worker registered its prefill endpoint");
    assert_eq!(prefill_info.metadata["worker_kind"], "prefill");

    // ...but a frontend lists only the decode and aggregated workers.
    let serving = common::frontend_role(&sup, "kinds").await;
    let table = serving.table().clone();
    let mut changes = table.changes();
    tokio::time::timeout(Duration::from_secs(10), async {
        while table.get(MODEL).map_or(0, |e| e.instances.len()) < 2 {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("two workers listed");
    let mut expected = vec![decode.as_u64(), aggregated.as_u64()];
    expected.sort();
    assert_eq!(listed(&table).await, expected);

    // One membership per namespace in the process: the frontend and anyone else share it, and
    // it knows every worker with its kind (the frontend lists the two that generate).
    let ns = Namespace::new("kinds").unwrap();
    let m1 = MembershipHandle::shared(&runtime, &ns).await.unwrap();
    let m2 = MembershipHandle::shared(&runtime, &ns).await.unwrap();
    assert!(m1.same(&m2));
    let mut kinds: Vec<(u64, WorkerKind)> = m1
        .members()
        .await
        .unwrap()
        .iter()
        .map(|m| (m.instance.as_u64(), m.kind))
        .collect();
    kinds.sort_by_key(|k| k.0);
    let mut want = vec![
        (prefill.as_u64(), WorkerKind::Prefill),
        (decode.as_u64(), WorkerKind::Decode),
        (aggregated.as_u64(), WorkerKind::Aggregated),
    ];
    want.sort_by_key(|k| k.0);
    assert_eq!(kinds, want);

    let client = runtime.client().clone();
    let call = |component: &str, endpoint: &str, instance, req: serde_json::Value| {
        let target = Target::Instance(
            ComponentId::new("kinds", component)
                .unwrap()
                .endpoint(endpoint)
                .unwrap(),
            instance,
        );
        let client = client.clone();
        async move {
            client
                .call::<_, EngineOutput>(target, &req, CallOptions::default())
                .await?
                .collect()
                .await
        }
    };
    let prefill_request = |skip_blocks: u32| {
        serde_json::to_value(PrefillRequest {
            request: request(None),
            skip_blocks,
            target: None,
            write_within_ms: 10_000,
        })
        .unwrap()
    };
    let plain = |r: PreprocessedRequest| serde_json::to_value(r).unwrap();
    // A prefill request: the first token only, whatever max_tokens says.
    let outs = call("prefill", "prefill", prefill, prefill_request(0))
        .await
        .unwrap();
    let tokens: usize = outs.iter().map(|o| o.token_ids.len()).sum();
    assert_eq!(tokens, 1);
    assert_eq!(
        outs.last().unwrap().finish_reason,
        Some(FinishReason::Length)
    );

    // Prefilled elsewhere: the decode worker has the prefill worker compute the prompt
    // (a simulated transfer between mockers), says so in its first output, and decodes the
    // rest; the aggregated worker refuses such a request.
    let outs = call(
        "decode",
        "generate",
        decode,
        plain(request(Some(prefill.as_u64()))),
    )
    .await
    .unwrap();
    assert_eq!(outs.iter().map(|o| o.token_ids.len()).sum::<usize>(), 8);
    assert_eq!(outs[0].prefill_worker, Some(prefill.as_u64()));
    assert_eq!(
        outs.last().unwrap().finish_reason,
        Some(FinishReason::Length)
    );
    match call(
        "agg",
        "generate",
        aggregated,
        plain(request(Some(prefill.as_u64()))),
    )
    .await
    {
        Err(RpcError::Remote(e)) => assert_eq!(e.kind, RemoteErrorKind::BadRequest),
        other => panic!("an aggregated worker took a remote-prefill request: {other:?}"),
    }
    // A prefill request past the prompt's blocks, and a whole request on the prefill
    // endpoint: bad requests.
    match call("prefill", "prefill", prefill, prefill_request(99)).await {
        Err(RpcError::Remote(e)) => assert_eq!(e.kind, RemoteErrorKind::BadRequest),
        other => panic!("a prefill worker took skip_blocks past the prompt: {other:?}"),
    }
    match call("prefill", "prefill", prefill, plain(request(None))).await {
        Err(RpcError::Remote(e)) => assert_eq!(e.kind, RemoteErrorKind::BadRequest),
        other => panic!("a prefill worker took a generate request: {other:?}"),
    }
    // A decode worker whose prefill worker is gone prefills locally (the default fallback).
    let outs = call("decode", "generate", decode, plain(request(Some(12345))))
        .await
        .unwrap();
    assert_eq!(outs.iter().map(|o| o.token_ids.len()).sum::<usize>(), 8);
    assert_eq!(outs[0].prefill_worker, None);

    sup.shutdown(Duration::from_secs(1)).await;
    runtime.close().await;
}

on_both_buses!(worker_kinds_embedded_bus, worker_kinds_nats_bus, kinds);
