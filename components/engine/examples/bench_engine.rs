//! Native engine benchmark (`scripts/bench-engine`): the `small` preset (SmolLM2-135M's layer
//! shapes, random weights), f32, bf16 and f16 weights (each with its KV cache in the same type),
//! on the forward pass directly (no scheduler):
//! - prefill tokens/s of one 512-token prompt, next to the matmul floor: the step's FLOPs over
//!   the GEMM rate measured here with the same kernels;
//! - decode tokens/s at batch 1, 8 and 32 (each sequence 128 tokens in), next to the step's
//!   roofline: a decode step must stream every weight (and the batch's K/V) once, and do its
//!   FLOPs; weight bytes over the read bandwidth measured here bound batch-1 speed, FLOPs
//!   over the GEMM rate batch-32 speed.
//!
//! Targets: batch-1 decode at least 60% of the bandwidth floor; batch-32 decode throughput at
//! least 8x batch-1.
//!
//! Usage: bench_engine [MODEL_DIR] (default target/bench-engine/small; written if missing).

use std::time::Instant;

use dynamo_engine::native::kv::KvCache;
use dynamo_engine::native::model::SeqStep;
use dynamo_engine::native::ops::Linear;
use dynamo_engine::native::random::RandomModel;
use dynamo_engine::native::{Compute, KvDtype, Model};
use dynamo_kv::BlockId;
use rayon::prelude::*;

const BS: usize = 16;

/// Copy bandwidth with every core: bytes read + written per second over a 512 MiB buffer.
fn copy_bandwidth() -> f64 {
    let n = 64 << 20; // f64 elements: 512 MiB
    let src = vec![1.0f64; n];
    let mut dst = vec![0.0f64; n];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        dst.par_chunks_mut(1 << 20)
            .zip(src.par_chunks(1 << 20))
            .for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    2.0 * (n * 8) as f64 / best
}

/// Read bandwidth with every core: bytes per second summing a 512 MiB buffer (what a decode
/// step does with the weights), best of 12 passes.
fn read_bandwidth() -> f64 {
    let n = 128 << 20; // f32 elements: 512 MiB
    let src = vec![1.0f32; n];
    let sum = |c: &[f32]| {
        let mut acc = [0f32; 32];
        for x in c.chunks_exact(32) {
            for i in 0..32 {
                acc[i] += x[i];
            }
        }
        acc.iter().sum::<f32>()
    };
    let threads = rayon::current_num_threads();
    let mut best = f64::INFINITY;
    for pass in 0..12 {
        // Two shapes, the better one counts: 1 MiB tasks, and one contiguous run per thread;
        // both from inside the pool, as the forward pass runs.
        let chunk = if pass % 2 == 0 {
            1 << 18
        } else {
            n.div_ceil(threads)
        };
        let t = Instant::now();
        let s: f32 = rayon::scope(|_| src.par_chunks(chunk).map(sum).sum());
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (n * 4) as f64 / best
}

/// GEMM rate (FLOP/s) on the prefill shapes, with the engine's own f32 kernels.
fn gemm_rate() -> f64 {
    let (m, k, n) = (512, 576, 1536);
    let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.01).collect();
    let lin = Linear::new(n, k, w, None, Compute::F32);
    let x = vec![0.5f32; m * k];
    let mut y = vec![0f32; m * n];
    let mut best = f64::INFINITY;
    for _ in 0..10 {
        let t = Instant::now();
        lin.forward(&x, m, &mut y);
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (m * n * k) as f64 / best
}

/// FLOPs of a forward pass over `tokens` new tokens with `context` average attended
/// positions, and logits for `logit_rows` of them.
fn flops(m: &Model, tokens: usize, context: usize, logit_rows: usize) -> f64 {
    let c = m.config();
    let (h, hd) = (c.hidden_size, c.head_dim);
    let per_token_linear = 2.0
        * (c.num_layers
            * (h * (c.num_heads + 2 * c.num_kv_heads) * hd
                + c.num_heads * hd * h
                + 3 * h * c.intermediate_size)) as f64;
    let per_token_attn = 4.0 * (c.num_layers * c.num_heads * hd * context) as f64;
    tokens as f64 * (per_token_linear + per_token_attn)
        + logit_rows as f64 * 2.0 * (h * c.vocab_size) as f64
}

struct Seqs {
    cache: KvCache,
    tables: Vec<Vec<BlockId>>,
    lens: Vec<usize>,
}

fn seqs(m: &Model, n: usize, max_len: usize) -> Seqs {
    let per = max_len.div_ceil(BS);
    Seqs {
        cache: KvCache::new(m.kv_layout(BS), n * per),
        tables: (0..n)
            .map(|s| {
                (0..per)
                    .map(|b| BlockId::new((s * per + b) as u32))
                    .collect()
            })
            .collect(),
        lens: vec![0; n],
    }
}

fn step(m: &Model, s: &mut Seqs, tokens: &[Vec<u32>]) {
    let steps: Vec<SeqStep<'_>> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| SeqStep {
            tokens: t,
            start: s.lens[i],
            blocks: &s.tables[i],
            logits: true,
        })
        .collect();
    std::hint::black_box(m.forward(&mut s.cache, &steps));
    for (i, t) in tokens.iter().enumerate() {
        s.lens[i] += t.len();
    }
}

fn main() {
    let dir = RandomModel::bench_small();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    eprintln!("measuring read and copy bandwidth and the GEMM rate ...");
    let bw = copy_bandwidth();
    let read_bw = read_bandwidth();
    let gemm = gemm_rate();
    println!("# bench-engine on {cpu}, {cores} cores");
    println!();
    println!(
        "References measured in this run: read bandwidth {:.1} GB/s (summing 512 MiB on every core; the floor below), copy bandwidth {:.1} GB/s (bytes read + written), f32 GEMM {:.0} GFLOP/s (512x576x1536, the engine's kernel).",
        read_bw / 1e9,
        bw / 1e9,
        gemm / 1e9
    );
    println!();
    println!("| weights | workload | tokens/s | floor tokens/s | of floor | vs batch 1 |");
    println!("|---|---|---:|---:|---:|---:|");
    for (compute, kv) in [
        (Compute::F32, KvDtype::F32),
        (Compute::Bf16, KvDtype::Bf16),
        (Compute::F16, KvDtype::F16),
    ] {
        let label = format!("{}, KV {}", compute.name(), kv.name());
        eprintln!("loading ({label}) ...");
        let m = Model::load(&dir, compute, &mut |_, _| {})
            .unwrap()
            .with_kv_dtype(kv);
        // Prefill: one 512-token prompt.
        let prompt: Vec<u32> = (0..512).map(|i| (i * 7 + 3) % 4000).collect();
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let mut s = seqs(&m, 1, 512);
            let t = Instant::now();
            step(&m, &mut s, std::slice::from_ref(&prompt));
            best = best.min(t.elapsed().as_secs_f64());
        }
        let floor = flops(&m, 512, 256, 1) / gemm;
        println!(
            "| {label} | prefill 512 tokens | {:.0} | {:.0} (GEMM) | {:.0}% | |",
            512.0 / best,
            512.0 / floor,
            100.0 * floor / best
        );
        // Decode at batch 1, 8, 32: each sequence 128 tokens in, best of 3 x 16 steps. The floor of
        // a step is its roofline: the slower of reading every weight and the batch's K/V once
        // (at the read bandwidth) and its FLOPs (at the GEMM rate). At batch 1 that is the
        // weight stream; at batch 32 the FLOPs.
        let c = m.config();
        let context = 128 + 1 + 24; // attended positions, averaged over the timed steps
        let kv_bytes_per_seq =
            (context * c.num_layers * 2 * c.num_kv_heads * c.head_dim * kv.size()) as f64;
        let mut batch1 = 0.0;
        for batch in [1usize, 8, 32] {
            let bytes = m.weight_bytes() as f64 + batch as f64 * kv_bytes_per_seq;
            let (mem, compute) = (bytes / read_bw, flops(&m, batch, context, batch) / gemm);
            let (step_floor, bound) = if mem >= compute {
                (mem, "bandwidth")
            } else {
                (compute, "GEMM")
            };
            let (windows, steps) = (3, 16);
            let mut s = seqs(&m, batch, 128 + 8 + windows * steps);
            let prompts: Vec<Vec<u32>> = (0..batch)
                .map(|b| {
                    (0..128)
                        .map(|i| ((i + b * 13) * 7 + 3) as u32 % 4000)
                        .collect()
                })
                .collect();
            step(&m, &mut s, &prompts);
            let next: Vec<Vec<u32>> = (0..batch).map(|b| vec![(b * 31 % 4000) as u32]).collect();
            step(&m, &mut s, &next); // warm-up
                                     // The best of three windows of 16 steps (this shared VM's neighbours come and go).
            let mut best = f64::INFINITY;
            for _ in 0..windows {
                let t = Instant::now();
                for _ in 0..steps {
                    step(&m, &mut s, &next);
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            let rate = (batch * steps) as f64 / best;
            if batch == 1 {
                batch1 = rate;
            }
            let floor_rate = batch as f64 / step_floor;
            println!(
                "| {label} | decode batch {batch} | {:.1} | {:.1} ({bound}) | {:.0}% | {:.1}x |",
                rate,
                floor_rate,
                100.0 * rate / floor_rate,
                rate / batch1
            );
        }
        println!(
            "| {label} | weights read per step | {:.0} MiB | | | |",
            m.weight_bytes() as f64 / (1 << 20) as f64
        );
    }
}
