use std::path::Path;

use dynamo_protocols::llm::{EngineOutput, SamplingOptions, StopConditions, TokenId};
use futures::future::join_all;
use futures::StreamExt;

use super::random::RandomModel;
use super::*;

fn tiny(dir: &Path) -> RandomModel {
    let m = RandomModel::preset("tiny", 512).unwrap();
    m.write(dir, &mut |_, _| {}).unwrap();
    m
}

fn engine(dir: &Path, f: impl FnOnce(&mut NativeSettings)) -> NativeEngine {
    let mut s = NativeSettings {
        model_path: dir.to_path_buf(),
        num_gpu_blocks: Some(256),
        threads: Some(2),
        ..Default::default()
    };
    f(&mut s);
    NativeEngine::start(s, &mut |_, _| {}).unwrap()
}

fn request(
    prompt: Vec<TokenId>,
    max_tokens: u32,
    sampling: SamplingOptions,
) -> PreprocessedRequest {
    PreprocessedRequest {
        token_ids: prompt,
        sampling,
        stop: StopConditions {
            max_tokens,
            min_tokens: 0,
            stop_token_ids: vec![],
        },
        remote_prefill: None,
        peer_prefix: None,
        resumed_tokens: 0,
    }
}

async fn run(e: &NativeEngine, req: PreprocessedRequest) -> (Vec<TokenId>, u32) {
    let outs: Vec<EngineOutput> = e
        .generate(req, CancellationToken::new())
        .unwrap()
        .map(|o| o.unwrap())
        .collect()
        .await;
    let cached = outs.first().and_then(|o| o.cached_tokens).unwrap_or(0);
    (outs.into_iter().flat_map(|o| o.token_ids).collect(), cached)
}

fn prompt(seed: u32, len: usize) -> Vec<TokenId> {
    (0..len as u32)
        .map(|i| (i * 31 + seed * 17) % 500 + 3)
        .collect()
}

fn greedy() -> SamplingOptions {
    SamplingOptions::default()
}

/// Greedy tokens are the same whether a request runs alone, batched with others, chunked,
/// from a cached prefix, or preempted and recomputed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batching_chunking_caching_and_preemption_do_not_change_greedy_tokens() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let prompts: Vec<Vec<TokenId>> = (0..4).map(|i| prompt(i, 40 + 7 * i as usize)).collect();
    let alone = engine(dir.path(), |_| {});
    let mut want = Vec::new();
    for p in &prompts {
        want.push(run(&alone, request(p.clone(), 12, greedy())).await.0);
    }
    assert!(want.iter().all(|t| t.len() == 12));
    assert!(
        want.windows(2).any(|w| w[0] != w[1]),
        "different prompts, different outputs"
    );

    // Batched: all at once.
    let batched = engine(dir.path(), |_| {});
    let got: Vec<_> = join_all(
        prompts
            .iter()
            .map(|p| run(&batched, request(p.clone(), 12, greedy()))),
    )
    .await;
    assert_eq!(
        got.iter().map(|g| g.0.clone()).collect::<Vec<_>>(),
        want,
        "batched"
    );

    // Chunked prefill: 8 tokens a step.
    let chunked = engine(dir.path(), |s| s.max_num_batched_tokens = 8);
    for (p, w) in prompts.iter().zip(&want) {
        assert_eq!(
            &run(&chunked, request(p.clone(), 12, greedy())).await.0,
            w,
            "chunked"
        );
    }

    // Prefix-cached: the same prompt again reuses its full blocks.
    let (again, cached) = run(&alone, request(prompts[3].clone(), 12, greedy())).await;
    assert!(cached >= 32, "cached {cached}");
    assert_eq!(again, want[3], "cached prefix");

    // Preempted: a pool too small for all four at once.
    let tight = engine(dir.path(), |s| s.num_gpu_blocks = Some(9));
    let got: Vec<_> = join_all(
        prompts
            .iter()
            .map(|p| run(&tight, request(p.clone(), 12, greedy()))),
    )
    .await;
    assert!(tight.preemptions() > 0, "the tight pool preempted");
    assert_eq!(
        got.iter().map(|g| g.0.clone()).collect::<Vec<_>>(),
        want,
        "preempted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_make_sampling_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let e = engine(dir.path(), |_| {});
    let opts = |seed| SamplingOptions {
        temperature: Some(1.5),
        top_p: Some(0.95),
        top_k: Some(50),
        seed: Some(seed),
        ..Default::default()
    };
    let p = prompt(9, 30);
    let a = run(&e, request(p.clone(), 16, opts(1))).await.0;
    let b = run(&e, request(p.clone(), 16, opts(1))).await.0;
    let c = run(&e, request(p.clone(), 16, opts(2))).await.0;
    assert_eq!(a, b, "same seed, same tokens");
    assert_ne!(a, c, "another seed, other tokens");
    // Penalties change greedy output (repetitions get costlier).
    let plain = run(&e, request(p.clone(), 24, greedy())).await.0;
    let penalized = run(
        &e,
        request(
            p.clone(),
            24,
            SamplingOptions {
                frequency_penalty: Some(2.0),
                presence_penalty: Some(2.0),
                ..Default::default()
            },
        ),
    )
    .await
    .0;
    let distinct = |t: &[TokenId]| t.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(
        distinct(&penalized) >= distinct(&plain),
        "{penalized:?} vs {plain:?}"
    );
}

/// Engine A computes a prompt; its blocks go to engine B, which continues from them and
/// produces what A alone produces. With each KV cache type; blocks of another type are
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_blocks_continue_decoding_on_another_engine() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let f32_bytes = engine(dir.path(), |_| {}).kv_layout().block_bytes();
    for kv in [KvDtype::F32, KvDtype::F16, KvDtype::Bf16] {
        let start = || engine(dir.path(), |s| s.kv_cache_dtype = Some(kv));
        let (a, b) = (start(), start());
        let p = prompt(5, 70);
        let want = run(&a, request(p.clone(), 10, greedy())).await.0;
        let hashes = crate::scheduler::prompt_hashes(&p, 16);
        assert_eq!(hashes.len(), 4);
        let blocks = a.export(hashes.clone()).await.unwrap();
        assert_eq!(blocks.blocks.len(), 4);
        assert_eq!(blocks.layout.dtype, kv.name());
        assert_eq!(blocks.layout.block_bytes(), blocks.blocks[0].data.len());
        assert_eq!(
            blocks.layout.block_bytes() * 4,
            f32_bytes * kv.size(),
            "{kv:?}"
        );
        assert_eq!(b.import(blocks.clone()).await.unwrap(), 4);
        let (got, cached) = run(&b, request(p.clone(), 10, greedy())).await;
        assert_eq!(cached, 64, "B reused the imported blocks ({kv:?})");
        assert_eq!(got, want, "{kv:?}");
        // Importing again writes nothing; a mismatched layout or type is refused.
        assert_eq!(b.import(blocks.clone()).await.unwrap(), 0);
        let mut wrong = blocks.clone();
        wrong.layout.head_dim += 1;
        assert!(matches!(b.import(wrong).await, Err(NativeError::Import(_))));
        let other = engine(dir.path(), |s| {
            s.kv_cache_dtype = Some(if kv == KvDtype::F32 {
                KvDtype::F16
            } else {
                KvDtype::F32
            })
        });
        assert!(
            matches!(other.import(blocks).await, Err(NativeError::Import(_))),
            "{kv:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_models_and_requests_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let start = |d: &Path| {
        NativeEngine::start(
            NativeSettings {
                model_path: d.to_path_buf(),
                num_gpu_blocks: Some(64),
                ..Default::default()
            },
            &mut |_, _| {},
        )
    };
    // A prompt beyond the context is refused; the engine keeps serving.
    let e = start(dir.path()).unwrap();
    let long = request(prompt(1, 4000), 200, greedy());
    let err = e.generate(long, CancellationToken::new()).err().unwrap();
    assert!(matches!(err, EngineError::BadRequest(m) if m.contains("context")));
    assert_eq!(
        run(&e, request(prompt(1, 10), 3, greedy())).await.0.len(),
        3
    );
    drop(e);

    let copy = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(dir.path().join(f), d.join(f)).unwrap();
        }
        d
    };
    // Truncated weights.
    let d = copy("truncated");
    let f = d.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert!(matches!(start(&d).err().unwrap(), NativeError::Weights(m) if m.contains("truncated")));
    // Garbage instead of a header.
    let d = copy("garbage");
    std::fs::write(
        d.join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fnot json",
    )
    .unwrap();
    assert!(matches!(start(&d).err().unwrap(), NativeError::Weights(_)));
    // A missing tensor is named.
    let d = copy("missing");
    let mut m = RandomModel::preset("tiny", 512).unwrap();
    m.num_layers = 1;
    m.write(&d, &mut |_, _| {}).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
    cfg["num_hidden_layers"] = 2.into();
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    assert_eq!(
        start(&d).err().unwrap(),
        NativeError::MissingTensor("model.layers.1.self_attn.q_proj.weight".into())
    );
    // Wrong shape.
    cfg["num_hidden_layers"] = 1.into();
    cfg["intermediate_size"] = 100.into();
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    assert!(matches!(start(&d).err().unwrap(), NativeError::Weights(m) if m.contains("shape")));
    // An unsupported architecture.
    cfg["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    assert!(
        matches!(start(&d).err().unwrap(), NativeError::Unsupported(m) if m.contains("GPT2LMHeadModel"))
    );
    // NaN weights.
    let d = dir.path().join("nan");
    let m = RandomModel::preset("tiny", 512).unwrap();
    m.write(&d, &mut |_, _| {}).unwrap();
    let mut tensors = m.tensors();
    tensors[3].2[5] = f32::NAN;
    weights::write_safetensors(&d.join("model.safetensors"), &tensors, weights::Dtype::F32)
        .unwrap();
    assert!(
        matches!(start(&d).err().unwrap(), NativeError::Weights(m) if m.contains("non-finite"))
    );
    // Finite weights that overflow: each request fails with an error, none hangs or crashes.
    let d = dir.path().join("overflow");
    m.write(&d, &mut |_, _| {}).unwrap();
    let mut tensors = m.tensors();
    for t in tensors
        .iter_mut()
        .filter(|t| t.0.ends_with("input_layernorm.weight"))
    {
        t.2.iter_mut().for_each(|x| *x = 3e38);
    }
    weights::write_safetensors(&d.join("model.safetensors"), &tensors, weights::Dtype::F32)
        .unwrap();
    let e = start(&d).unwrap();
    for _ in 0..2 {
        let mut s = e
            .generate(
                request(prompt(2, 20), 4, greedy()),
                CancellationToken::new(),
            )
            .unwrap();
        let first = s.next().await.unwrap();
        assert!(matches!(first, Err(EngineError::Internal(m)) if m.contains("non-finite")));
        assert!(s.next().await.is_none());
    }
}

/// The KV capability on the native engine: a bad transfer (wrong size, broken chain) caches
/// nothing; an unused reservation gives its blocks back; the eviction hook sees each evicted
/// block's real contents (the bytes an export would have given) before the block is reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_capability_checks_imports_releases_reservations_and_hooks_evictions() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let a = engine(dir.path(), |_| {});
    let b = engine(dir.path(), |s| s.num_gpu_blocks = Some(8));
    let (ka, kb) = (a.kv_capability().unwrap(), b.kv_capability().unwrap());
    assert_eq!(ka.block_bytes(), a.kv_layout().block_bytes());
    let p = prompt(9, 70);
    run(&a, request(p.clone(), 4, greedy())).await;
    let hashes = crate::scheduler::prompt_hashes(&p, 16);
    let blocks = ka.export(hashes.clone()).await.unwrap();
    assert_eq!(blocks.len(), 4);
    assert_eq!(blocks[1].parent, Some(blocks[0].hash));

    let load = || *b.kv().unwrap().load().borrow();
    // A truncated block: refused, nothing cached, the reservation's blocks back.
    let mut short = blocks.clone();
    short[2].data.pop();
    let r = kb.reserve(4).await.unwrap();
    let err = kb.import(r, short).await.unwrap_err();
    assert!(matches!(err, EngineError::BadRequest(_)), "{err:?}");
    // A chain with a hole (block 1 missing): refused.
    let holed = vec![blocks[0].clone(), blocks[2].clone()];
    let r = kb.reserve(2).await.unwrap();
    assert!(matches!(
        kb.import(r, holed).await,
        Err(EngineError::BadRequest(_))
    ));
    assert_eq!(
        kb.export(hashes.clone()).await.unwrap().len(),
        0,
        "nothing cached"
    );
    // More blocks than the pool holds cannot be reserved; a dropped reservation returns its
    // blocks (the worker's load shows them held, then free).
    assert!(matches!(
        kb.reserve(9).await,
        Err(EngineError::Overloaded(_))
    ));
    let r = kb.reserve(8).await.unwrap();
    assert_eq!(r.blocks(), 8);
    drop(r);
    let mut rx = b.kv().unwrap().load();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        rx.wait_for(|l| l.active_blocks == 0),
    )
    .await
    .expect("the reservation's blocks come back")
    .unwrap();
    assert_eq!(load().total_blocks, 8);

    // A good import: B continues from A's blocks.
    let r = kb.reserve(4).await.unwrap();
    assert_eq!(kb.import(r, blocks.clone()).await.unwrap(), 4);
    assert_eq!(run(&b, request(p.clone(), 4, greedy())).await.1, 64);

    // Eviction hook: a new prompt that needs the whole pool evicts A's four blocks, which the
    // hook receives with the contents export gave.
    let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let hook: crate::EvictionHook = std::sync::Arc::new(move |blk| {
        let _ = tx.send(blk);
    });
    kb.set_eviction_hook(Some(hook)).await.unwrap();
    run(&b, request(prompt(3, 120), 4, greedy())).await;
    let mut evicted = Vec::new();
    while let Ok(blk) = seen.try_recv() {
        evicted.push(blk);
    }
    let mut want = blocks.clone();
    want.sort_by_key(|b| b.hash.0);
    evicted.sort_by_key(|b| b.hash.0);
    evicted.retain(|e| want.iter().any(|w| w.hash == e.hash));
    assert_eq!(
        evicted, want,
        "each evicted block, with its contents, before reuse"
    );
}

/// With a host tier, a prefix the device pool evicted comes back from host RAM instead of
/// being recomputed: counted as cached, and the greedy output is the same as the first run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_evicted_to_the_host_tier_is_onboarded_with_identical_output() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    // 12 device blocks of 16 tokens: one 96-token prompt (6 blocks) and its output fit, a
    // second such prompt evicts the first's blocks.
    let e = engine(dir.path(), |s| {
        s.num_gpu_blocks = Some(12);
        s.block_size = 16;
        s.host_kv_cache = 1 << 20;
    });
    let a = prompt(1, 96);
    let (first, cached) = run(&e, request(a.clone(), 8, greedy())).await;
    assert_eq!(cached, 0);
    let (_, _) = run(&e, request(prompt(2, 96), 8, greedy())).await;
    let (_, _) = run(&e, request(prompt(3, 96), 8, greedy())).await;
    let load = *e.kv().unwrap().load().borrow();
    let tiers = load.tiers.expect("a host tier reports");
    assert!(tiers.offloaded_blocks >= 5, "{tiers:?}");
    let (again, cached) = run(&e, request(a, 8, greedy())).await;
    assert_eq!(again, first, "onboarded KV gives the same tokens");
    assert_eq!(
        cached, 80,
        "five full blocks back from the host tier (the sixth holds the last token)"
    );
    let mut load = e.kv().unwrap().load();
    load.wait_for(|l| l.tiers.is_some_and(|t| t.onboarded_blocks >= 5))
        .await
        .unwrap();
    // The dump lists the host tier's blocks under their tier.
    let dump = e.kv().unwrap().dump().await.unwrap();
    assert!(dump
        .lower
        .iter()
        .all(|(t, _, _)| *t == dynamo_protocols::kv::StorageTier::Host));
    assert!(!dump.lower.is_empty());
}

/// Drops `e` and waits for its thread to end (its disk tier's files written, its lock
/// released): the health watch's sender goes with the thread.
async fn stopped(e: NativeEngine) {
    let mut health = e.health().unwrap();
    drop(e);
    while health.changed().await.is_ok() {}
}

/// With a disk tier, a prefix three requests used goes host -> disk when the host tier is
/// full, survives a restart of the engine (rescanned, announced, onboarded with the same
/// greedy output); a corrupted block file is refused and its tokens recomputed, the output
/// still the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_on_disk_survives_a_restart_and_a_corrupted_block_is_recomputed() {
    let dir = tempfile::tempdir().unwrap();
    let disk = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let settings = |s: &mut NativeSettings| {
        s.num_gpu_blocks = Some(12);
        s.block_size = 16;
        s.disk_kv_cache = 1 << 20;
        s.disk_kv_dir = Some(disk.path().to_path_buf());
    };
    let probe = engine(dir.path(), settings);
    let block_bytes = probe.kv_layout().block_bytes();
    stopped(probe).await;
    let with_host = |s: &mut NativeSettings| {
        settings(s);
        // Two blocks of host RAM: an evicted prefix moves on to disk quickly.
        s.host_kv_cache = 2 * block_bytes;
    };
    let e = engine(dir.path(), with_host);
    let a = prompt(1, 96);
    let (first, _) = run(&e, request(a.clone(), 8, greedy())).await;
    for _ in 0..2 {
        let (again, cached) = run(&e, request(a.clone(), 8, greedy())).await;
        assert_eq!((again, cached), (first.clone(), 80));
    }
    // A one-off prompt's blocks are filtered out of the disk; A's (used three times) go in.
    for seed in 2..5 {
        run(&e, request(prompt(seed, 96), 8, greedy())).await;
    }
    let mut load = e.kv().unwrap().load();
    let t = load
        .wait_for(|l| l.tiers.is_some_and(|t| t.disk_offloaded_blocks >= 5))
        .await
        .unwrap()
        .tiers
        .unwrap();
    assert!(
        t.disk_filtered > 0,
        "one-off blocks stay off the disk: {t:?}"
    );
    assert_eq!(t.disk_blocks, t.disk_offloaded_blocks);
    stopped(e).await;

    // A restart: the disk tier is found again and A comes back from it.
    let e = engine(dir.path(), with_host);
    let dump = e.kv().unwrap().dump().await.unwrap();
    let hashes: Vec<_> = dynamo_kv::block_hashes(&a, 16)
        .into_iter()
        .map(|h| h.1)
        .collect();
    let on_disk = |dump: &dynamo_protocols::kv::KvDump, h| {
        dump.lower
            .iter()
            .any(|(t, _, b)| *t == dynamo_protocols::kv::StorageTier::Disk && b.block_hash == h)
    };
    assert!(
        hashes[..5].iter().all(|h| on_disk(&dump, *h)),
        "announced after the restart"
    );
    let (again, cached) = run(&e, request(a.clone(), 8, greedy())).await;
    assert_eq!(again, first, "KV read back from disk gives the same tokens");
    assert_eq!(cached, 80);
    let t = e.kv().unwrap().load().borrow().tiers.unwrap();
    assert!(
        t.disk_recovered >= 5 && t.disk_onboarded_blocks == 5,
        "{t:?}"
    );
    assert_eq!(t.disk_hit_tokens, 80);
    stopped(e).await;

    // One content byte of A's third block flipped: refused, and the rest recomputed.
    let file = disk.path().join(format!("{:016x}.kvb", hashes[2].0));
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();
    let e = engine(dir.path(), with_host);
    let (again, cached) = run(&e, request(a.clone(), 8, greedy())).await;
    assert_eq!(again, first, "a refused block is recomputed, never served");
    assert_eq!(
        cached, 32,
        "the two blocks before the corrupted one come from disk"
    );
    let t = e.kv().unwrap().load().borrow().tiers.unwrap();
    assert_eq!(t.disk_corrupt, 1, "{t:?}");
    assert!(!file.exists(), "the corrupted file is deleted");
    stopped(e).await;
}

/// A disk tier whose directory cannot be used: the engine serves without it, says so in
/// its report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_disk_directory_leaves_the_engine_serving() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let file = dir.path().join("config.json");
    let e = engine(dir.path(), |s| {
        s.disk_kv_cache = 1 << 20;
        s.disk_kv_dir = Some(file.join("kv"));
    });
    let (out, _) = run(&e, request(prompt(1, 20), 4, greedy())).await;
    assert_eq!(out.len(), 4);
    let t = e.kv().unwrap().load().borrow().tiers.unwrap();
    assert_eq!(t.disk_unusable, 1);
}

/// A model folder with a real tokenizer (512 tokens) for guided decoding.
fn tiny_with_tokenizer(dir: &Path) {
    let settings = dynamo_preprocessor::make_model::MakeModelSettings {
        vocab_size: 512,
        ..Default::default()
    };
    dynamo_preprocessor::make_model::make_model(dir, &settings).unwrap();
    tiny(dir);
}

fn guided(spec: dynamo_protocols::llm::Guided) -> SamplingOptions {
    SamplingOptions {
        guided: Some(Box::new(spec)),
        ..Default::default()
    }
}

/// Guided decoding on random weights: the output is what the grammar allows and the sequence
/// ends where the grammar is complete, even with no stop tokens; a request resumed mid-way
/// (migration) continues exactly; a spec that does not compile is the client's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guided_decoding_holds_output_to_the_grammar() {
    use dynamo_protocols::llm::Guided;
    let dir = tempfile::tempdir().unwrap();
    tiny_with_tokenizer(dir.path());
    let tokenizer = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    let e = engine(dir.path(), |_| {});
    let choices = vec!["alpha".to_string(), "beta gamma".to_string()];
    let (tokens, _) = run(
        &e,
        request(
            prompt(1, 20),
            50,
            guided(Guided::Choice {
                choices: choices.clone(),
            }),
        ),
    )
    .await;
    let text = tokenizer.decode(&tokens, true).unwrap();
    assert!(choices.contains(&text), "{text:?} from {tokens:?}");
    assert!(tokens.len() < 50, "ended at the grammar's end: {tokens:?}");
    let schema = serde_json::json!({"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "word": {"type": "string", "maxLength": 8}}, "required": ["n", "word"]});
    let spec = Guided::JsonSchema {
        schema: schema.to_string(),
        strict: true,
    };
    let (whole, _) = run(&e, request(prompt(2, 20), 80, guided(spec.clone()))).await;
    let text = tokenizer.decode(&whole, true).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(
        v["n"].as_u64().unwrap() <= 999 && v["word"].is_string(),
        "{text}"
    );
    assert_eq!(v.as_object().unwrap().len(), 2, "{text}");
    // Resumed after 3 tokens: the grammar catches up on them and the rest is the same.
    let mut p = prompt(2, 20);
    p.extend(&whole[..3]);
    let mut req = request(p, 80 - 3, guided(spec));
    req.resumed_tokens = 3;
    let (rest, _) = run(&e, req).await;
    assert_eq!(rest, whole[3..].to_vec());
    // A spec that does not compile: a BadRequest naming the problem.
    let bad = guided(Guided::Regex {
        pattern: "(open".into(),
    });
    let mut s = e
        .generate(request(prompt(3, 10), 5, bad), CancellationToken::new())
        .unwrap();
    match s.next().await {
        Some(Err(EngineError::BadRequest(m))) => assert!(m.contains("compile"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A folder without a tokenizer serves, and refuses guided requests clearly.
    let bare = tempfile::tempdir().unwrap();
    tiny(bare.path());
    let e = engine(bare.path(), |_| {});
    let mut s = e
        .generate(
            request(prompt(3, 10), 5, guided(Guided::JsonObject)),
            CancellationToken::new(),
        )
        .unwrap();
    match s.next().await {
        Some(Err(EngineError::BadRequest(m))) => assert!(m.contains("tokenizer.json"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// Unset, the weights' type is the checkpoint's and the KV cache's the weights'; either can be
/// set apart. The greedy tokens of an f16 checkpoint held in f16 with an f16 cache equal those
/// of the same checkpoint computed in f32 for this short run (f16 weights are exact in f32).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_checkpoint_is_held_in_its_own_type_unless_told() {
    let dir = tempfile::tempdir().unwrap();
    let m = RandomModel {
        dtype: weights::Dtype::F16,
        ..RandomModel::preset("tiny", 512).unwrap()
    };
    m.write(dir.path(), &mut |_, _| {}).unwrap();
    let auto = engine(dir.path(), |_| {});
    assert_eq!(auto.kv_layout().dtype, "f16");
    let wide = engine(dir.path(), |s| {
        s.compute = Some(Compute::F32);
    });
    assert_eq!(wide.kv_layout().dtype, "f32");
    let mixed = engine(dir.path(), |s| s.kv_cache_dtype = Some(KvDtype::Bf16));
    assert_eq!(mixed.kv_layout().dtype, "bf16");
    let p = prompt(9, 40);
    let (a, _) = run(&auto, request(p.clone(), 12, greedy())).await;
    let (b, _) = run(&wide, request(p, 12, greedy())).await;
    assert_eq!(a, b);
}
