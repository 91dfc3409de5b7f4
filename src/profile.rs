//! `dynamo-run profile --engine mocker|native ...`: measures what one worker sustains and
//! writes it as a capacity profile ([`dynamo_planner::Profile`]) the planner loads.
//!
//! The engine runs in this process with the launcher's engine flags (the same ones workers
//! take: profile with the settings the workers will run, the simulated speed included).
//! - **Prefill:** for each `--isl`, a prompt of that many new tokens (no prefix cached) and
//!   one output token, alone on the engine; the time to that token, the median of
//!   `--repeats` runs.
//! - **Decode:** for each `--contexts` x `--batches`, that many requests of that context
//!   submitted together, each generating `--decode-tokens` after the whole batch has its
//!   first token (plus as many as the batch's prefill steps, before it); a request's ITL is
//!   the mean gap between its tokens in that steady window; the point is the median across
//!   the batch.
//!
//! Times are wall-clock: a mocker at `--speedup-ratio S` yields a profile of that speed,
//! which is what a planner over such workers observes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use dynamo_engine::Engine;
use dynamo_planner::{DecodePoint, PrefillPoint, Profile, PROFILE_VERSION};
use dynamo_protocols::llm::{PreprocessedRequest, SamplingOptions, StopConditions, TokenId};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::launch::{LaunchSettings, Output};

#[derive(Args, Clone, Debug)]
pub struct ProfileArgs {
    /// The engine to profile: mocker or native.
    #[arg(long)]
    pub engine: String,
    /// Where to write the profile (JSON).
    #[arg(long)]
    pub out: PathBuf,
    /// Input lengths of the prefill points.
    #[arg(long, value_delimiter = ',', default_value = "128,512,1024,2048,4096")]
    pub isl: Vec<u32>,
    /// Batches of the decode grid.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    pub batches: Vec<u32>,
    /// Context lengths of the decode grid.
    #[arg(long, value_delimiter = ',', default_value = "512,2048")]
    pub contexts: Vec<u32>,
    /// Output tokens of each decode request.
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: u32,
    /// Runs of each prefill point (the median is kept).
    #[arg(long, default_value_t = 3)]
    pub repeats: u32,
}

/// Distinct prompts: each draws from its own stretch of the vocabulary, so nothing is cached.
struct Prompts {
    vocab: std::ops::Range<TokenId>,
    next: u64,
}

impl Prompts {
    fn take(&mut self, len: u32) -> Vec<TokenId> {
        let span = (self.vocab.end - self.vocab.start).max(1) as u64;
        self.next += 1;
        let seed = self.next.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (0..len as u64)
            .map(|i| {
                let x = (seed ^ i.wrapping_mul(0xbf58_476d_1ce4_e5b9))
                    .wrapping_mul(0x94d0_49bb_1331_11eb);
                self.vocab.start + ((x >> 17) % span) as TokenId
            })
            .collect()
    }
}

fn request(tokens: Vec<TokenId>, out: u32) -> PreprocessedRequest {
    PreprocessedRequest {
        token_ids: tokens,
        sampling: SamplingOptions::default(),
        stop: StopConditions {
            max_tokens: out,
            min_tokens: out,
            stop_token_ids: vec![],
        },
        remote_prefill: None,
        peer_prefix: None,
        resumed_tokens: 0,
    }
}

/// Runs one request; the times of its tokens since `start`.
async fn token_times(
    engine: &Arc<dyn Engine>,
    req: PreprocessedRequest,
    start: Instant,
) -> Result<Vec<Duration>> {
    let mut stream = engine
        .generate(req, CancellationToken::new())
        .map_err(|e| anyhow!("the engine refused a profiling request: {e}"))?;
    let mut times = Vec::new();
    while let Some(out) = stream.next().await {
        let out = out.map_err(|e| anyhow!("a profiling request failed: {e}"))?;
        let now = start.elapsed();
        times.extend(std::iter::repeat_n(now, out.token_ids.len()));
        if out.finish_reason.is_some() {
            break;
        }
    }
    Ok(times)
}

/// Steps it takes to prefill `b` prompts of `c` tokens at `per_step` tokens a step (the
/// requests generate that many tokens more, so each still decodes `--decode-tokens` once the
/// whole batch decodes together).
fn warmup(b: u32, c: u32, per_step: usize) -> u32 {
    (b as u64 * c as u64).div_ceil(per_step.max(1) as u64) as u32 + 1
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl ProfileArgs {
    /// The engine to profile, as the launcher's output.
    pub fn output(&self) -> Result<Output> {
        match self.engine.as_str() {
            "mocker" => Ok(Output::Mocker),
            "native" => Ok(Output::Native),
            other => bail!("--engine {other:?}: profile mocker or native"),
        }
    }
}

/// Profiles the engine `s` describes (its output: see [`ProfileArgs::output`]).
pub async fn run(args: &ProfileArgs, s: LaunchSettings) -> Result<()> {
    if args.isl.is_empty() || args.batches.is_empty() || args.contexts.is_empty() {
        bail!("--isl, --batches and --contexts each need at least one value");
    }
    if args.isl.contains(&0) || args.batches.contains(&0) || args.decode_tokens < 2 {
        bail!("input lengths and batches must be positive, --decode-tokens at least 2");
    }
    let (engine, vocab, model, block_size, blocks) = crate::launch::profile_engine(&s).await?;
    let capacity = block_size as u64 * blocks;
    for &c in &args.contexts {
        for &b in &args.batches {
            let out = args.decode_tokens + warmup(b, c, s.mocker.max_num_batched_tokens);
            let need = b as u64 * (c as u64 + out as u64 + block_size as u64);
            if need > capacity {
                bail!(
                    "the engine's KV cache holds {capacity} tokens; {b} requests at context {c} need about {need}: lower --batches or --contexts, or give the engine more blocks (--num-gpu-blocks)"
                );
            }
        }
    }
    let mut prompts = Prompts { vocab, next: 0 };
    let mut isl = args.isl.clone();
    isl.sort_unstable();
    isl.dedup();
    let mut prefill = Vec::new();
    for &n in &isl {
        let mut runs = Vec::new();
        for _ in 0..args.repeats.max(1) {
            let start = Instant::now();
            let t = token_times(&engine, request(prompts.take(n), 1), start).await?;
            let first = t
                .first()
                .ok_or_else(|| anyhow!("no token for a prompt of {n}"))?;
            runs.push(first.as_secs_f64() * 1e3);
        }
        let ttft_ms = median(runs);
        eprintln!("profile: prefill of {n} tokens: time to first token {ttft_ms:.2} ms");
        prefill.push(PrefillPoint { isl: n, ttft_ms });
    }
    let mut decode = Vec::new();
    for &c in &args.contexts {
        for &b in &args.batches {
            let start = Instant::now();
            let out = args.decode_tokens + warmup(b, c, s.mocker.max_num_batched_tokens);
            let runs = futures::future::try_join_all(
                (0..b).map(|_| token_times(&engine, request(prompts.take(c), out), start)),
            )
            .await?;
            // Steady decoding: after the last request's first token (before it, the batch is
            // still filling and steps carry other requests' prefills).
            let steady = runs.iter().filter_map(|t| t.first()).max().copied();
            let itls: Vec<f64> = runs
                .iter()
                .map(|t| t.iter().filter(|&&x| Some(x) > steady).collect::<Vec<_>>())
                .filter(|t| t.len() >= 2)
                .map(|t| (*t[t.len() - 1] - *t[0]).as_secs_f64() * 1e3 / (t.len() - 1) as f64)
                .collect();
            if itls.is_empty() {
                bail!("no request of batch {b} at context {c} produced two tokens");
            }
            let itl_ms = median(itls);
            eprintln!("profile: decode of {b} sequences at context {c}: {itl_ms:.2} ms a token");
            decode.push(DecodePoint {
                batch: b,
                context: c,
                itl_ms,
            });
        }
    }
    let profile = Profile {
        version: PROFILE_VERSION,
        model,
        engine: args.engine.clone(),
        settings: serde_json::json!({
            "block_size": block_size,
            "kv_blocks": blocks,
            "speedup_ratio": s.mocker.speedup_ratio,
            "max_num_seqs": s.mocker.max_num_seqs,
            "max_num_batched_tokens": s.mocker.max_num_batched_tokens,
        }),
        prefill,
        decode,
    };
    profile
        .check()
        .map_err(|e| anyhow!("the measured profile is unusable: {e}"))?;
    std::fs::write(&args.out, serde_json::to_string_pretty(&profile)? + "\n")
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("profile written to {}", args.out.display());
    Ok(())
}
