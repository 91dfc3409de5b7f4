//! Guided decoding's cost per generated token (`scripts/bench-guided`): the native engine on
//! the `small` preset (SmolLM2-135M's layer shapes, random weights, a generated 4096-token
//! byte-level BPE vocabulary), decoding batches of 1 and 8 requests with and without a JSON
//! Schema (`response_format`; its first string is long enough that no guided request ends
//! before the unguided ones), through the scheduler as a worker runs it. Reports the mean
//! inter-token latency of each and the difference; the reference is the same run unguided.
//!
//! Usage: bench_guided [MODEL_DIR] (default target/bench-guided/small; written if missing).

use std::time::{Duration, Instant};

use dynamo_engine::native::random::RandomModel;
use dynamo_engine::native::{NativeEngine, NativeSettings};
use dynamo_engine::Engine;
use dynamo_protocols::llm::{Guided, PreprocessedRequest, SamplingOptions, StopConditions};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

const TOKENS: u32 = 48;

fn folder() -> std::path::PathBuf {
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("target/bench-guided/small"));
    if !dir.join("model.safetensors").is_file() {
        eprintln!(
            "writing the small preset with a tokenizer to {} ...",
            dir.display()
        );
        let settings = dynamo_preprocessor::make_model::MakeModelSettings::default();
        dynamo_preprocessor::make_model::make_model(&dir, &settings).expect("make_model");
        RandomModel::preset("small", settings.vocab_size)
            .and_then(|m| m.write(&dir, &mut |_, _| {}))
            .expect("write the small preset");
    }
    dir
}

fn request(i: usize, guided: Option<Guided>) -> PreprocessedRequest {
    PreprocessedRequest {
        token_ids: (0..64)
            .map(|j| ((i * 131 + j * 7) % 4000) as u32 + 10)
            .collect(),
        sampling: SamplingOptions {
            temperature: Some(1.0),
            seed: Some(i as u64),
            guided: guided.map(Box::new),
            ..Default::default()
        },
        stop: StopConditions {
            max_tokens: TOKENS,
            min_tokens: 0,
            stop_token_ids: vec![],
        },
        remote_prefill: None,
        peer_prefix: None,
        resumed_tokens: 0,
    }
}

/// Mean inter-token latency over a batch of `batch` requests decoded together, and the
/// tokens counted.
async fn itl(engine: &NativeEngine, batch: usize, guided: Option<Guided>) -> (Duration, u64) {
    let streams: Vec<_> = (0..batch)
        .map(|i| {
            engine
                .generate(request(i, guided.clone()), CancellationToken::new())
                .expect("generate")
        })
        .collect();
    let per = futures::future::join_all(streams.into_iter().map(|mut s| async move {
        let (mut gaps, mut n, mut last) = (Duration::ZERO, 0u64, None::<Instant>);
        while let Some(out) = s.next().await {
            let out = out.expect("a token");
            let now = Instant::now();
            if let Some(l) = last {
                gaps += now - l;
                n += out.token_ids.len() as u64;
            }
            last = Some(now);
        }
        (gaps, n)
    }))
    .await;
    let (gaps, n) = per
        .into_iter()
        .fold((Duration::ZERO, 0), |(g, n), (a, b)| (g + a, n + b));
    (gaps / n.max(1) as u32, n)
}

#[tokio::main]
async fn main() {
    let dir = folder();
    let engine = NativeEngine::start(
        NativeSettings {
            model_path: dir.clone(),
            num_gpu_blocks: Some(2048),
            ..Default::default()
        },
        &mut |_, _| {},
    )
    .expect("load the model");
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 200, "maxLength": 400},
            "priority": {"enum": ["low", "medium", "high"]},
            "tags": {"type": "array", "items": {"type": "string"}}
        },
        "required": ["title", "priority", "tags"]
    });
    let guided = Guided::JsonSchema {
        schema: schema.to_string(),
        strict: true,
    };
    // Warm up (weights paged in, threads started).
    let _ = itl(&engine, 1, None).await;
    println!(
        "# bench-guided: {} ({} tokens a request)",
        dir.display(),
        TOKENS
    );
    println!();
    println!("| batch | ITL unguided ms | ITL guided (JSON Schema) ms | added per token |");
    println!("|---:|---:|---:|---:|");
    for batch in [1, 8] {
        let mut best = (Duration::MAX, Duration::MAX);
        for _ in 0..3 {
            let (plain, _) = itl(&engine, batch, None).await;
            let (held, _) = itl(&engine, batch, Some(guided.clone())).await;
            best = (best.0.min(plain), best.1.min(held));
        }
        let (plain, held) = (best.0.as_secs_f64() * 1e3, best.1.as_secs_f64() * 1e3);
        println!(
            "| {batch} | {plain:.2} | {held:.2} | {:+.1}% |",
            (held / plain - 1.0) * 100.0
        );
    }
}
