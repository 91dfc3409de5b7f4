//! The native engine's logits against an independent reference forward pass
//! (`scripts/native-reference.py`, numpy in float64) on deterministic random checkpoints:
//! Llama with grouped-query attention, Qwen2 (q/k/v biases, tied embeddings), Llama-3 RoPE
//! scaling, sharded bf16 files, f16 files, weights held in bf16 and f16, and f16 and bf16 KV
//! caches (each with its stated tolerance).

mod common;

use std::path::Path;
use std::process::Command;

use dynamo_engine::native::config::Arch;
use dynamo_engine::native::random::RandomModel;
use dynamo_engine::native::weights::Dtype;
use dynamo_engine::native::{Compute, KvDtype, Model};

fn reference(dir: &Path, prompts: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let mut cmd = Command::new(common::python());
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/native-reference.py"))
        .arg(dir);
    for p in prompts {
        cmd.arg(p.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
    }
    let out = cmd.output().expect("run the reference");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference JSON")
}

/// Largest difference relative to the largest reference logit.
fn rel_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    got.iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

fn check(name: &str, m: &RandomModel, compute: Compute, tolerance: f32) {
    check_kv(name, m, compute, KvDtype::F32, tolerance)
}

fn check_kv(name: &str, m: &RandomModel, compute: Compute, kv: KvDtype, tolerance: f32) {
    let dir = tempfile::tempdir().unwrap();
    m.write(dir.path(), &mut |_, _| {}).unwrap();
    let model = Model::load(dir.path(), compute, &mut |_, _| {})
        .unwrap()
        .with_kv_dtype(kv);
    let prompts: Vec<Vec<u32>> = vec![
        vec![7],
        (0..19).map(|i| (i * 37 + 5) % 500).collect(),
        (0..70).map(|i| (i * 11 + 3) % 500).collect(),
    ];
    let want = reference(dir.path(), &prompts);
    for (p, w) in prompts.iter().zip(&want) {
        let got = model.last_logits(p);
        let e = rel_error(&got, w);
        eprintln!(
            "{name}, prompt of {}: relative error {e:.2e} (tolerance {tolerance:.0e})",
            p.len()
        );
        assert!(
            e <= tolerance,
            "{name}, prompt of {}: relative error {e}",
            p.len()
        );
    }
}

#[test]
fn logits_match_the_numpy_reference() {
    let base = RandomModel::preset("tiny", 512).unwrap();
    // f32: within 1e-4 relative.
    check("llama gqa", &base, Compute::F32, 1e-4);
    check(
        "qwen2",
        &RandomModel {
            arch: Arch::Qwen2,
            tie_word_embeddings: true,
            num_kv_heads: 1,
            ..base.clone()
        },
        Compute::F32,
        1e-4,
    );
    check(
        "llama3 rope scaling, mistral, sharded",
        &RandomModel {
            arch: Arch::Mistral,
            llama3_rope_scaling: true,
            shards: 3,
            ..base.clone()
        },
        Compute::F32,
        1e-4,
    );
    // Head dim 64 (the shape of SmolLM2 and Qwen2.5-0.5B): the vectorized attention kernel;
    // 2 x 180 gate/up features end in a zero-padded weight panel.
    let hd64 = RandomModel {
        hidden_size: 128,
        num_heads: 2,
        num_kv_heads: 1,
        intermediate_size: 180,
        ..base.clone()
    };
    check("head dim 64", &hd64, Compute::F32, 1e-4);
    // bf16 files are read exactly (the reference widens them the same way).
    check(
        "bf16 file",
        &RandomModel {
            dtype: Dtype::Bf16,
            ..base.clone()
        },
        Compute::F32,
        1e-4,
    );
    // f16 files held as f16 are read exactly too (widened in registers).
    let f16_file = RandomModel {
        dtype: Dtype::F16,
        ..base.clone()
    };
    check("f16 file, f16 weights", &f16_file, Compute::F16, 1e-4);
    // Holding f32 weights in bf16 rounds them (and, where the CPU has AMX, the activations
    // entering each matmul): close, not exact (measured: up to 5.0e-3).
    check("bf16 weights", &base, Compute::Bf16, 2e-2);
    // A half-precision KV cache rounds each cached K and V: f16 keeps 11 significant bits,
    // bf16 8 (measured: up to 2.3e-4 and 1.7e-3).
    check_kv("f16 KV cache", &base, Compute::F32, KvDtype::F16, 1e-3);
    check_kv("bf16 KV cache", &base, Compute::F32, KvDtype::Bf16, 5e-3);
    check_kv(
        "f16 weights and KV",
        &f16_file,
        Compute::F16,
        KvDtype::F16,
        1e-3,
    );
    // Head dim 64: the vectorized attention over half-precision rows.
    check_kv(
        "head dim 64, f16 KV cache",
        &hd64,
        Compute::F32,
        KvDtype::F16,
        1e-3,
    );
}
