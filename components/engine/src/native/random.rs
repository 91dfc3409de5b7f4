//! Deterministic random checkpoints in the Hugging Face layout (`config.json` shape keys and
//! safetensors weights), for tests and benchmarks: the `tiny` preset (2 layers, hidden 64,
//! grouped-query attention 4:2) and `small` (SmolLM2-135M's layer shapes: 30 layers, hidden
//! 576, 9:3 heads, intermediate 1536, tied embeddings). Variants cover Qwen2 (q/k/v biases),
//! Llama-3 RoPE scaling, bf16/f16 files and sharded files.
//!
//! Values are drawn per tensor from a seed and the tensor's name, scaled so activations keep
//! their size through the layers (projections `~ 1/sqrt(fan_in)`) and logits spread widely
//! (greedy choices are not near-ties).

use std::path::Path;

use serde_json::{json, Value};

use super::config::Arch;
use super::weights::{write_safetensors, Dtype, INDEX};
use super::NativeError;

#[derive(Debug, Clone, PartialEq)]
pub struct RandomModel {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub llama3_rope_scaling: bool,
    pub dtype: Dtype,
    pub shards: usize,
    pub seed: u64,
}

impl RandomModel {
    /// `tiny` or `small`.
    pub fn preset(name: &str, vocab_size: usize) -> Result<Self, NativeError> {
        let tiny = Self {
            arch: Arch::Llama,
            vocab_size,
            hidden_size: 64,
            intermediate_size: 176,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
            llama3_rope_scaling: false,
            dtype: Dtype::F32,
            shards: 1,
            seed: 0x7ea1,
        };
        match name {
            "tiny" => Ok(tiny),
            "small" => Ok(Self {
                hidden_size: 576,
                intermediate_size: 1536,
                num_layers: 30,
                num_heads: 9,
                num_kv_heads: 3,
                tie_word_embeddings: true,
                ..tiny
            }),
            other => Err(NativeError::Settings(format!(
                "unknown preset {other:?}; use tiny or small"
            ))),
        }
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// The shape keys of `config.json`.
    pub fn config_keys(&self) -> Value {
        let (archs, model_type) = match self.arch {
            Arch::Llama => ("LlamaForCausalLM", "llama"),
            Arch::Mistral => ("MistralForCausalLM", "mistral"),
            Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        };
        let mut v = json!({
            "architectures": [archs],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_theta": if self.arch == Arch::Qwen2 { 1_000_000.0 } else { 10_000.0 },
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": match self.dtype { Dtype::F32 => "float32", Dtype::F16 => "float16", Dtype::Bf16 => "bfloat16" },
        });
        if self.llama3_rope_scaling {
            v["rope_scaling"] = json!({
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            });
        }
        v
    }

    /// The tensors, by name, shape and values.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (
            self.num_heads * self.head_dim(),
            self.num_kv_heads * self.head_dim(),
        );
        let mut out = Vec::new();
        let mut add = |name: String, shape: Vec<usize>, kind: Kind| {
            let n: usize = shape.iter().product();
            let values = fill(self.seed, &name, n, kind);
            out.push((name, shape, values));
        };
        let proj = |fan_in: usize| Kind::Uniform(1.0 / (fan_in as f32).sqrt());
        add(
            "model.embed_tokens.weight".into(),
            vec![v, h],
            Kind::Uniform(1.0),
        );
        for l in 0..self.num_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            add(p("input_layernorm.weight"), vec![h], Kind::AroundOne);
            add(p("self_attn.q_proj.weight"), vec![q, h], proj(h));
            add(p("self_attn.k_proj.weight"), vec![kv, h], proj(h));
            add(p("self_attn.v_proj.weight"), vec![kv, h], proj(h));
            if self.arch == Arch::Qwen2 {
                add(p("self_attn.q_proj.bias"), vec![q], Kind::Uniform(0.5));
                add(p("self_attn.k_proj.bias"), vec![kv], Kind::Uniform(0.5));
                add(p("self_attn.v_proj.bias"), vec![kv], Kind::Uniform(0.5));
            }
            add(p("self_attn.o_proj.weight"), vec![h, q], proj(q));
            add(
                p("post_attention_layernorm.weight"),
                vec![h],
                Kind::AroundOne,
            );
            add(p("mlp.gate_proj.weight"), vec![i, h], proj(h));
            add(p("mlp.up_proj.weight"), vec![i, h], proj(h));
            add(p("mlp.down_proj.weight"), vec![h, i], proj(i));
        }
        add("model.norm.weight".into(), vec![h], Kind::AroundOne);
        if !self.tie_word_embeddings {
            add(
                "lm_head.weight".into(),
                vec![v, h],
                Kind::Uniform(4.0 / (h as f32).sqrt()),
            );
        }
        out
    }

    /// The benchmarks' model folder: the `small` preset with a 4096-token vocabulary, written
    /// to `std::env::args().nth(1)` or `target/bench-engine/small` unless it is there already.
    pub fn bench_small() -> std::path::PathBuf {
        let dir = std::env::args()
            .nth(1)
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from("target/bench-engine/small"));
        if !dir.join("model.safetensors").is_file() {
            eprintln!("writing the small preset to {} ...", dir.display());
            Self::preset("small", 4096)
                .and_then(|m| m.write(&dir, &mut |_, _| {}))
                .unwrap_or_else(|e| panic!("cannot write the small preset: {e}"));
        }
        dir
    }

    /// Writes `config.json` (merged into an existing one, keeping its other keys) and the
    /// weights into `dir`; `progress(tensors written, tensors)`.
    pub fn write(
        &self,
        dir: &Path,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(), NativeError> {
        let err = |p: &Path, e: &dyn std::fmt::Display| {
            NativeError::Weights(format!("{}: {e}", p.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| err(dir, &e))?;
        let cfg_path = dir.join("config.json");
        let mut config: Value = std::fs::read_to_string(&cfg_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_else(|| json!({}));
        let keys = self.config_keys();
        for (k, v) in keys.as_object().expect("an object") {
            config[k] = v.clone();
        }
        if !self.llama3_rope_scaling {
            if let Some(o) = config.as_object_mut() {
                o.remove("rope_scaling");
            }
        }
        let text = serde_json::to_string_pretty(&config).unwrap_or_default();
        std::fs::write(&cfg_path, text).map_err(|e| err(&cfg_path, &e))?;
        let tensors = self.tensors();
        let total = tensors.len();
        let shards = self.shards.clamp(1, total);
        let per = total.div_ceil(shards);
        let mut map = serde_json::Map::new();
        let mut done = 0;
        for (s, chunk) in tensors.chunks(per).enumerate() {
            let name = if shards == 1 {
                super::weights::SINGLE.to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", s + 1, shards)
            };
            write_safetensors(&dir.join(&name), chunk, self.dtype)?;
            for (t, _, _) in chunk {
                map.insert(t.clone(), Value::String(name.clone()));
            }
            done += chunk.len();
            progress(done, total);
        }
        if shards > 1 {
            let p = dir.join(INDEX);
            let index = json!({ "metadata": {}, "weight_map": map });
            std::fs::write(&p, serde_json::to_string_pretty(&index).unwrap_or_default())
                .map_err(|e| err(&p, &e))?;
            let _ = std::fs::remove_file(dir.join(super::weights::SINGLE));
        } else {
            let _ = std::fs::remove_file(dir.join(INDEX));
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Uniform(f32),
    AroundOne,
}

fn fill(seed: u64, name: &str, n: usize, kind: Kind) -> Vec<f32> {
    let mut state = seed ^ xxhash_rust::xxh3::xxh3_64(name.as_bytes());
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let u = (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            match kind {
                // Uniform on [-a, a] has standard deviation a / sqrt(3).
                Kind::Uniform(std) => u * std * 3f32.sqrt(),
                Kind::AroundOne => 1.0 + 0.1 * u,
            }
        })
        .collect()
}
