//! Disaggregated serving in one process, over both buses, on the native engine (real KV
//! bytes through the transfer library): a decode worker whose prompts a prefill worker
//! computes answers token for token what an aggregated worker answers, for prompts that end
//! inside a block and on a block boundary, a prompt whose prefix the decode worker holds
//! already (only the rest moves), and concurrent requests; a frontend routing by KV plans the
//! prefill remotely and reports the prefill worker; a dead prefill worker means a local
//! prefill, or a failed request when so configured.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use dynamo_actors::frontend::{Endpoint, FrontendSettings, RouterMode};
use dynamo_actors::supervisor::{RoleSpec, Started, SupervisorHandle};
use dynamo_actors::worker::{EngineFactory, PrefillFallback, WorkerSettings};
use dynamo_engine::{Engine, NativeEngine, NativeSettings};
use dynamo_preprocessor::ModelFolder;
use dynamo_protocols::llm::{
    EngineOutput, PeerPrefix, PreprocessedRequest, RemotePrefill, SamplingOptions, StopConditions,
    TokenId, WorkerKind,
};
use dynamo_runtime::rpc::RpcError;
use dynamo_runtime::subject::{ComponentId, EndpointName, Namespace};
use dynamo_runtime::{CallOptions, InstanceId, Runtime, Target};

const NS: &str = "disagg";

fn native(dir: std::path::PathBuf) -> EngineFactory {
    native_with(dir, 0)
}

/// A native engine with a host KV tier of `host_kv_cache` bytes (0: none).
fn native_with(dir: std::path::PathBuf, host_kv_cache: usize) -> EngineFactory {
    Arc::new(move || {
        let dir = dir.clone();
        Box::pin(async move {
            let e = tokio::task::spawn_blocking(move || {
                NativeEngine::start(
                    NativeSettings {
                        model_path: dir,
                        block_size: 16,
                        num_gpu_blocks: Some(64),
                        threads: Some(1),
                        host_kv_cache,
                        ..Default::default()
                    },
                    &mut |_, _| {},
                )
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            Ok(Arc::new(e) as Arc<dyn Engine>)
        })
    })
}

async fn worker(
    sup: &SupervisorHandle,
    folder: &ModelFolder,
    dir: &std::path::Path,
    name: &str,
    kind: WorkerKind,
    fallback: PrefillFallback,
) -> InstanceId {
    let card = folder.files().card("tiny", 16, 4096).unwrap();
    let mut ws = WorkerSettings::new(card, folder.files().clone());
    ws.kind = kind;
    ws.disagg.fallback = fallback;
    ws.disagg.prefill_timeout = Duration::from_secs(20);
    if kind == WorkerKind::Prefill {
        ws.endpoint = EndpointName::new(WorkerKind::PREFILL_ENDPOINT).unwrap();
    }
    let spec = dynamo_actors::supervisor::WorkerSpec::new(
        ComponentId::new(NS, name).unwrap(),
        ws,
        native(dir.to_path_buf()),
    );
    start(sup, name, spec).await
}

async fn start(
    sup: &SupervisorHandle,
    name: &str,
    spec: dynamo_actors::supervisor::WorkerSpec,
) -> InstanceId {
    match sup
        .start_role(name, RoleSpec::Worker(Box::new(spec)))
        .await
        .unwrap()
    {
        Started::Worker { instance } => instance,
        _ => panic!("not a worker"),
    }
}

fn request(tokens: Vec<TokenId>, prefill: Option<InstanceId>) -> PreprocessedRequest {
    PreprocessedRequest {
        token_ids: tokens,
        sampling: SamplingOptions::default(),
        stop: StopConditions {
            max_tokens: 10,
            min_tokens: 10,
            stop_token_ids: vec![],
        },
        remote_prefill: prefill.map(|p| RemotePrefill {
            prefill_worker: p.as_u64(),
            endpoint: format!("{NS}.prefill.prefill"),
        }),
        peer_prefix: None,
        resumed_tokens: 0,
    }
}

async fn generate(
    runtime: &Runtime,
    component: &str,
    instance: InstanceId,
    req: PreprocessedRequest,
) -> Result<Vec<EngineOutput>, RpcError> {
    let target = Target::Instance(
        ComponentId::new(NS, component)
            .unwrap()
            .endpoint("generate")
            .unwrap(),
        instance,
    );
    runtime
        .client()
        .call::<_, EngineOutput>(target, &req, CallOptions::default())
        .await?
        .collect()
        .await
}

fn tokens(outs: &[EngineOutput]) -> Vec<TokenId> {
    outs.iter().flat_map(|o| o.token_ids.clone()).collect()
}

async fn disaggregated_output_is_token_identical(bus: Option<String>) {
    let (dir, folder) = common::native_model();
    let (runtime, sup) = common::supervised(bus).await;
    let local = PrefillFallback::Local;
    let prefill = worker(
        &sup,
        &folder,
        dir.path(),
        "prefill",
        WorkerKind::Prefill,
        local,
    )
    .await;
    let decode = worker(
        &sup,
        &folder,
        dir.path(),
        "decode",
        WorkerKind::Decode,
        local,
    )
    .await;
    let agg = worker(
        &sup,
        &folder,
        dir.path(),
        "agg",
        WorkerKind::Aggregated,
        local,
    )
    .await;
    let base: Vec<TokenId> = (0..200).map(|i| 100 + (i * 37) % 3000).collect();
    let cases: Vec<(&str, Vec<TokenId>)> = vec![
        ("ends inside a block", base[..21].to_vec()),
        ("ends on a block boundary", base[..48].to_vec()),
        // Its first 32 tokens were the decode worker's just before: only the rest moves.
        ("continues a cached prefix", base[..70].to_vec()),
        ("shorter than a block", base[100..110].to_vec()),
    ];
    for (what, prompt) in &cases {
        let want = generate(&runtime, "agg", agg, request(prompt.clone(), None))
            .await
            .unwrap();
        let got = generate(
            &runtime,
            "decode",
            decode,
            request(prompt.clone(), Some(prefill)),
        )
        .await
        .unwrap();
        assert_eq!(tokens(&got), tokens(&want), "{what}");
        assert_eq!(tokens(&got).len(), 10, "{what}");
        assert_eq!(
            got[0].prefill_worker,
            Some(prefill.as_u64()),
            "{what}: prefilled remotely (the last, partial block moves too)"
        );
        if *what == "continues a cached prefix" {
            assert_eq!(
                got[0].cached_tokens,
                Some(48),
                "the decode worker's own blocks count as cached"
            );
        }
    }
    // Seeded sampling with penalties: draws depend on (seed, position) and penalties on the
    // generated tokens, the first one (sampled by the prefill worker) included.
    let mut sampled = request(base[..40].to_vec(), None);
    sampled.sampling = SamplingOptions {
        temperature: Some(0.9),
        seed: Some(7),
        frequency_penalty: Some(0.7),
        presence_penalty: Some(0.3),
        ..Default::default()
    };
    let want = generate(&runtime, "agg", agg, sampled.clone())
        .await
        .unwrap();
    sampled.remote_prefill = request(vec![], Some(prefill)).remote_prefill;
    let got = generate(&runtime, "decode", decode, sampled).await.unwrap();
    assert_eq!(
        tokens(&got),
        tokens(&want),
        "seeded sampling with penalties"
    );
    assert_eq!(got[0].prefill_worker, Some(prefill.as_u64()));
    // Concurrent requests, each compared with the aggregated answer.
    let prompts: Vec<Vec<TokenId>> = [33usize, 47, 64, 90]
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            (0..n as u32)
                .map(|i| 500 + k as u32 * 700 + (i * 13) % 600)
                .collect()
        })
        .collect();
    let wants = futures::future::join_all(
        prompts
            .iter()
            .map(|p| generate(&runtime, "agg", agg, request(p.clone(), None))),
    )
    .await;
    let gots = futures::future::join_all(prompts.iter().map(|p| {
        generate(
            &runtime,
            "decode",
            decode,
            request(p.clone(), Some(prefill)),
        )
    }))
    .await;
    for (i, (want, got)) in wants.into_iter().zip(gots).enumerate() {
        let got = got.unwrap();
        assert_eq!(
            tokens(&got),
            tokens(&want.unwrap()),
            "concurrent request {i}"
        );
        assert_eq!(got[0].prefill_worker, Some(prefill.as_u64()));
    }

    // A frontend routing by KV plans the prefill on the prefill worker (threshold 1: every
    // prompt with an uncached token goes remote) and reports it.
    sup.stop_role("agg", Duration::from_secs(1)).await.unwrap();
    let mut fs = FrontendSettings::new(Namespace::new(NS).unwrap());
    fs.router_mode = RouterMode::Kv;
    fs.kv_router.disagg_min_remote_tokens = 1;
    let serving = match sup
        .start_role("frontend", RoleSpec::Frontend(Box::new(fs)))
        .await
    {
        Ok(Started::Frontend { serving, .. }) => serving,
        _ => panic!("no frontend"),
    };
    let table = serving.table().clone();
    let mut changes = table.changes();
    tokio::time::timeout(Duration::from_secs(20), async {
        while table.get("tiny").map_or(0, |e| e.instances.len()) != 1 {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("the frontend lists the decode worker");
    let body = serde_json::json!({
        "model": "tiny",
        "prompt": "a prompt long enough to fill a block or two of sixteen tokens each, to be prefilled elsewhere",
        "max_tokens": 4,
        "temperature": 0,
    });
    let router = serving.router().expect("kv mode routes in process").clone();
    common::eventually(
        "the frontend's router knows the prefill worker",
        Duration::from_secs(20),
        || router.prefill_workers("tiny") == 1,
    )
    .await;
    let mut gen = serving.start(Endpoint::Completions, &body).await.unwrap();
    assert_eq!(gen.prefill_worker, Some(prefill));
    assert_eq!(gen.worker, decode);
    while gen.next().await.is_some() {}

    sup.shutdown(Duration::from_secs(2)).await;
    runtime.close().await;
}

on_both_buses!(
    disaggregated_output_is_token_identical_embedded_bus,
    disaggregated_output_is_token_identical_nats_bus,
    disaggregated_output_is_token_identical
);

/// An aggregated worker that shares KV with its peers (`--kv-share`), with a host tier.
async fn sharing_worker(
    sup: &SupervisorHandle,
    folder: &ModelFolder,
    dir: &std::path::Path,
    name: &str,
    share: bool,
) -> InstanceId {
    let card = folder.files().card("tiny", 16, 4096).unwrap();
    let mut ws = WorkerSettings::new(card, folder.files().clone());
    ws.disagg.share = share;
    let spec = dynamo_actors::supervisor::WorkerSpec::new(
        ComponentId::new(NS, name).unwrap(),
        ws,
        native_with(dir.to_path_buf(), 64 << 20),
    );
    start(sup, name, spec).await
}

/// `tokens` to `worker`, told that `peer` (a component of the same name) holds `blocks` of
/// its blocks.
fn fetching(tokens: Vec<TokenId>, peer: (&str, InstanceId), blocks: u32) -> PreprocessedRequest {
    PreprocessedRequest {
        peer_prefix: Some(PeerPrefix {
            worker: peer.1.as_u64(),
            endpoint: format!("{NS}.{}.{}", peer.0, WorkerKind::KV_FETCH_ENDPOINT),
            blocks,
        }),
        ..request(tokens, None)
    }
}

/// Cluster-wide KV sharing on the native engine (real bytes through the transfer library): a
/// worker told that a peer holds its prompt's prefix fetches it, from the peer's device pool
/// or, once evicted there, its host tier, and answers token for token what the peer
/// answered, the fetched blocks counted as cached. A peer that is gone, does not share, or
/// holds nothing only means computing the prompt: same tokens, nothing cached.
async fn a_worker_fetches_a_prefix_a_peer_holds(bus: Option<String>) {
    let (dir, folder) = common::native_model();
    let (runtime, sup) = common::supervised(bus).await;
    let a = sharing_worker(&sup, &folder, dir.path(), "a", true).await;
    let b = sharing_worker(&sup, &folder, dir.path(), "b", true).await;
    let c = sharing_worker(&sup, &folder, dir.path(), "c", true).await;
    let plain = sharing_worker(&sup, &folder, dir.path(), "plain", false).await;
    let prompt: Vec<TokenId> = (0..70).map(|i| 100 + (i * 37) % 3000).collect();
    let want = generate(&runtime, "a", a, request(prompt.clone(), None))
        .await
        .unwrap();
    assert_eq!(want[0].cached_tokens, Some(0));
    // From a's device pool: its four full blocks move, the partial one is computed.
    let got = generate(&runtime, "b", b, fetching(prompt.clone(), ("a", a), 4))
        .await
        .unwrap();
    assert_eq!(
        tokens(&got),
        tokens(&want),
        "fetched from the peer's device"
    );
    assert_eq!(got[0].cached_tokens, Some(64));
    // Other prompts push a's blocks out of its 64-block pool into its host tier.
    for k in 0..5u32 {
        let other: Vec<TokenId> = (0..200).map(|i| 4000 + k * 300 + (i * 7) % 290).collect();
        generate(&runtime, "a", a, request(other, None))
            .await
            .unwrap();
    }
    let got = generate(&runtime, "c", c, fetching(prompt.clone(), ("a", a), 4))
        .await
        .unwrap();
    assert_eq!(
        tokens(&got),
        tokens(&want),
        "fetched from the peer's host tier"
    );
    assert_eq!(got[0].cached_tokens, Some(64));
    // Nothing to fetch: a peer that does not share, one that is gone, one that holds none of
    // the blocks; a worker that does not share itself. Computed, with the same answer (each
    // prompt new to the worker asked).
    let gone = InstanceId::new(a.as_u64() ^ 1);
    for (k, (what, peer, to)) in [
        ("a peer that does not share", ("plain", plain), ("c", c)),
        ("a peer that is gone", ("a", gone), ("c", c)),
        ("a peer that holds none", ("b", b), ("c", c)),
        ("a worker that does not share", ("a", a), ("plain", plain)),
    ]
    .into_iter()
    .enumerate()
    {
        let unseen: Vec<TokenId> = prompt.iter().map(|t| t + 1 + k as u32).collect();
        let want = generate(&runtime, "a", a, request(unseen.clone(), None))
            .await
            .unwrap();
        let got = generate(&runtime, to.0, to.1, fetching(unseen, peer, 4))
            .await
            .unwrap();
        assert_eq!(tokens(&got), tokens(&want), "{what}");
        assert_eq!(got[0].cached_tokens, Some(0), "{what}: computed");
    }
    // A fetch request that asks for nothing is refused with a typed error.
    let bad = dynamo_protocols::llm::KvFetchRequest {
        hashes: vec![],
        from: 0,
        target: None,
        write_within_ms: 1000,
    };
    let err = runtime
        .client()
        .call::<_, dynamo_protocols::llm::KvFetchReply>(
            Target::Instance(
                ComponentId::new(NS, "a")
                    .unwrap()
                    .endpoint(WorkerKind::KV_FETCH_ENDPOINT)
                    .unwrap(),
                a,
            ),
            &bad,
            CallOptions::default(),
        )
        .await
        .unwrap()
        .collect()
        .await;
    match err {
        Err(RpcError::Remote(e)) => {
            assert_eq!(
                e.kind,
                dynamo_runtime::rpc::RemoteErrorKind::BadRequest,
                "{e:?}"
            )
        }
        other => panic!("an empty fetch is a bad request, got {other:?}"),
    }
    sup.shutdown(Duration::from_secs(2)).await;
    runtime.close().await;
}

on_both_buses!(
    a_worker_fetches_a_prefix_a_peer_holds_embedded_bus,
    a_worker_fetches_a_prefix_a_peer_holds_nats_bus,
    a_worker_fetches_a_prefix_a_peer_holds
);

/// A prefill worker that is gone, or one whose KV layout differs: the decode worker prefills
/// locally by default (same tokens), or fails the request when configured to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_prefill_worker_means_local_prefill_or_a_failed_request() {
    let (dir, folder) = common::native_model();
    let (runtime, sup) = common::supervised(None).await;
    let decode = worker(
        &sup,
        &folder,
        dir.path(),
        "decode",
        WorkerKind::Decode,
        PrefillFallback::Local,
    )
    .await;
    let strict = worker(
        &sup,
        &folder,
        dir.path(),
        "strict",
        WorkerKind::Decode,
        PrefillFallback::Fail,
    )
    .await;
    // A prefill worker whose model has another KV layout (3 layers, not 2).
    let (other, other_folder) = common::native_model();
    let mut three = dynamo_engine::native::random::RandomModel::preset("tiny", 4096).unwrap();
    three.num_layers = 3;
    three.write(other.path(), &mut |_, _| {}).unwrap();
    let mismatched = worker(
        &sup,
        &other_folder,
        other.path(),
        "prefill",
        WorkerKind::Prefill,
        PrefillFallback::Local,
    )
    .await;
    let prompt: Vec<TokenId> = (1..40).collect();
    let gone = InstanceId::new(0xdead);
    let want = generate(&runtime, "decode", decode, request(prompt.clone(), None))
        .await
        .unwrap();
    let got = generate(
        &runtime,
        "decode",
        decode,
        request(prompt.clone(), Some(gone)),
    )
    .await
    .unwrap();
    assert_eq!(tokens(&got), tokens(&want));
    assert_eq!(got[0].prefill_worker, None);
    // Mismatched layouts: the transfer is refused whole, the decode worker prefills locally.
    let got = generate(
        &runtime,
        "decode",
        decode,
        request(prompt.clone(), Some(mismatched)),
    )
    .await
    .unwrap();
    assert_eq!(
        tokens(&got),
        tokens(&want),
        "nothing of the refused transfer is used"
    );
    assert_eq!(got[0].prefill_worker, None);
    match generate(&runtime, "strict", strict, request(prompt, Some(gone))).await {
        Err(RpcError::Remote(e)) => assert!(e.message.contains("remote prefill failed"), "{e:?}"),
        other => panic!("a strict decode worker prefilled locally: {other:?}"),
    }
    sup.shutdown(Duration::from_secs(2)).await;
    runtime.close().await;
}
