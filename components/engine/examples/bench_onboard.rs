//! Onboard against recompute on the native engine (`scripts/bench-onboard`): the `small` preset
//! (SmolLM2-135M's layer shapes, random weights, f32), one 2048-token prompt, greedy, one
//! output token, so the request's time is its time to first token:
//! - **recompute**: the prompt with nothing cached (the reference);
//! - **host**: the same prompt after its blocks were evicted from the device pool into the host
//!   tier, onboarded from host RAM;
//! - **disk**: evicted with no host tier straight to the disk tier (files in a temporary
//!   directory, so likely in the page cache), onboarded from disk;
//! - **disk after a restart**: a new engine on the same directory (rescanned, verified).
//!
//! Each onboarded run must give the recompute run's token; the table gives its time, the part
//! spent copying the blocks up (the engine's own onboard timer), and the ratio to recompute.
//!
//! Usage: bench_onboard [MODEL_DIR] (default target/bench-engine/small; written if missing).

use std::path::Path;
use std::time::Instant;

use dynamo_engine::native::random::RandomModel;
use dynamo_engine::native::{NativeEngine, NativeSettings};
use dynamo_engine::Engine;
use dynamo_protocols::kv::{StorageTier, TierReport};
use dynamo_protocols::llm::{PreprocessedRequest, SamplingOptions, StopConditions, TokenId};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

const PROMPT: usize = 2048;
const BS: usize = 16;

fn prompt(seed: u32) -> Vec<TokenId> {
    (0..PROMPT as u32)
        .map(|i| (i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % 4000 + 50)
        .collect()
}

/// Runs one greedy request of one token: (token, cached tokens, seconds).
async fn run(e: &NativeEngine, p: Vec<TokenId>) -> (TokenId, u32, f64) {
    let req = PreprocessedRequest {
        token_ids: p,
        sampling: SamplingOptions::default(),
        stop: StopConditions {
            max_tokens: 1,
            min_tokens: 0,
            stop_token_ids: vec![],
        },
        remote_prefill: None,
        peer_prefix: None,
        resumed_tokens: 0,
    };
    let t = Instant::now();
    let outs: Vec<_> = e
        .generate(req, CancellationToken::new())
        .unwrap()
        .map(|o| o.unwrap())
        .collect()
        .await;
    let secs = t.elapsed().as_secs_f64();
    let cached = outs.first().and_then(|o| o.cached_tokens).unwrap_or(0);
    (outs[0].token_ids[0], cached, secs)
}

fn tiers(e: &NativeEngine) -> TierReport {
    e.kv().unwrap().load().borrow().tiers.unwrap_or_default()
}

fn start(model: &Path, f: impl FnOnce(&mut NativeSettings)) -> NativeEngine {
    let mut s = NativeSettings {
        model_path: model.to_path_buf(),
        block_size: BS,
        // Two 2048-token prompts fill it: a third evicts the first.
        num_gpu_blocks: Some(2 * PROMPT / BS + 8),
        max_num_batched_tokens: PROMPT,
        ..Default::default()
    };
    f(&mut s);
    NativeEngine::start(s, &mut |_, _| {}).unwrap()
}

/// Three other 2048-token prompts: every block of the first one leaves the device pool.
async fn evict(e: &NativeEngine) {
    for seed in 2..5 {
        run(e, prompt(seed)).await;
    }
}

async fn stopped(e: NativeEngine) {
    let mut health = e.health().unwrap();
    drop(e);
    while health.changed().await.is_ok() {}
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = RandomModel::bench_small();
    let a = prompt(1);
    let mut rows: Vec<(String, f64, f64, TokenId, u32)> = Vec::new();

    // Recompute, then host.
    eprintln!("recompute and host tier ...");
    let e = start(&dir, |s| {
        s.host_kv_cache = 512 << 20;
    });
    run(&e, prompt(99)[..64].to_vec()).await; // threads warm
    let (want, _, recompute) = run(&e, a.clone()).await;
    let block_bytes = e.kv_layout().block_bytes();
    rows.push(("recompute".into(), recompute, 0.0, want, 0));
    evict(&e).await;
    let before = tiers(&e);
    let (tok, cached, secs) = run(&e, a.clone()).await;
    let copy = (tiers(&e).onboard_micros - before.onboard_micros) as f64 / 1e6;
    rows.push(("host RAM".into(), secs, copy, tok, cached));
    stopped(e).await;

    // Disk, with no host tier: evicted blocks go straight to the disk's filter (1 use).
    eprintln!("disk tier ...");
    let disk = tempfile::tempdir().unwrap();
    let with_disk = |s: &mut NativeSettings| {
        s.disk_kv_cache = 1 << 30;
        s.disk_kv_dir = Some(disk.path().to_path_buf());
        s.disk_min_uses = 1;
    };
    let e = start(&dir, with_disk);
    run(&e, prompt(99)[..64].to_vec()).await;
    run(&e, a.clone()).await;
    evict(&e).await;
    // Until the offloader has written every full block of the prompt.
    let hashes: Vec<_> = dynamo_kv::block_hashes(&a, BS)
        .into_iter()
        .map(|h| h.1)
        .collect();
    let mut load = e.kv().unwrap().load();
    loop {
        let dump = e.kv().unwrap().dump().await.unwrap();
        let on_disk = hashes.iter().all(|h| {
            dump.lower
                .iter()
                .any(|(t, _, b)| *t == StorageTier::Disk && b.block_hash == *h)
        });
        if on_disk {
            break;
        }
        load.changed().await.unwrap();
    }
    let before = tiers(&e);
    let (tok, cached, secs) = run(&e, a.clone()).await;
    let copy = (tiers(&e).onboard_micros - before.onboard_micros) as f64 / 1e6;
    rows.push(("disk (page cache)".into(), secs, copy, tok, cached));
    stopped(e).await;

    eprintln!("disk tier after a restart ...");
    let e = start(&dir, with_disk);
    run(&e, prompt(99)[..64].to_vec()).await;
    let recovered = tiers(&e).disk_recovered;
    let before = tiers(&e);
    let (tok, cached, secs) = run(&e, a.clone()).await;
    let copy = (tiers(&e).onboard_micros - before.onboard_micros) as f64 / 1e6;
    rows.push((
        format!("disk after a restart ({recovered} blocks recovered)"),
        secs,
        copy,
        tok,
        cached,
    ));

    println!(
        "# bench-onboard: a {PROMPT}-token prompt on the small preset (f32), blocks of {BS} tokens ({} KiB each)",
        block_bytes / 1024
    );
    println!();
    println!("| prefix from | time to first token ms | of which onboard copy ms | cached tokens | vs recompute | same token |");
    println!("|---|---:|---:|---:|---:|---|");
    for (label, secs, copy, tok, cached) in rows {
        println!(
            "| {label} | {:.1} | {:.1} | {cached} | {:.1}x | {} |",
            secs * 1e3,
            copy * 1e3,
            recompute / secs,
            if tok == want { "yes" } else { "NO" }
        );
    }
}
