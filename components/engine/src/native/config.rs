//! The model's shape, from a Hugging Face `config.json`: `LlamaForCausalLM`,
//! `MistralForCausalLM` and `Qwen2ForCausalLM` (the same decoder: grouped-query attention,
//! RoPE, RMSNorm, SwiGLU; Qwen2 adds biases to the q/k/v projections).

use serde::Deserialize;
use serde_json::Value;

use super::NativeError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

/// Llama-3 `rope_scaling` (`rope_type: llama3`): long wavelengths are slowed by `factor`,
/// short ones kept, the band between interpolated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3Scaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2).
    pub qkv_bias: bool,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
}

fn bad(msg: impl Into<String>) -> NativeError {
    NativeError::Config(msg.into())
}

impl ModelConfig {
    /// Parses and validates `config.json` text.
    pub fn parse(text: &str) -> Result<Self, NativeError> {
        let raw: Raw = serde_json::from_str(text).map_err(|e| bad(format!("config.json: {e}")))?;
        let arch_name = raw
            .architectures
            .first()
            .cloned()
            .ok_or_else(|| bad("config.json has no \"architectures\""))?;
        let arch = match arch_name.as_str() {
            "LlamaForCausalLM" => Arch::Llama,
            "MistralForCausalLM" => Arch::Mistral,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            other => {
                return Err(NativeError::Unsupported(format!(
                    "architecture {other}; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
                )))
            }
        };
        let need = |v: Option<usize>, name: &str| {
            v.filter(|&x| x > 0)
                .ok_or_else(|| bad(format!("config.json: {name} is missing or 0")))
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(bad(format!(
                "config.json: num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        let head_dim = match raw.head_dim {
            Some(d) if d > 0 => d,
            _ if hidden_size % num_heads == 0 => hidden_size / num_heads,
            _ => {
                return Err(bad(format!(
                    "config.json: hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}"
                )))
            }
        };
        if head_dim % 2 != 0 {
            return Err(bad(format!(
                "config.json: head_dim {head_dim} must be even for RoPE"
            )));
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(NativeError::Unsupported(format!(
                    "hidden_act {act:?} (only silu)"
                )));
            }
        }
        let rope_scaling = match &raw.rope_scaling {
            None | Some(Value::Null) => None,
            Some(v) => {
                let kind = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let num = |k: &str| v.get(k).and_then(Value::as_f64);
                match kind {
                    "llama3" => Some(Llama3Scaling {
                        factor: num("factor")
                            .ok_or_else(|| bad("rope_scaling.factor is missing"))?,
                        low_freq_factor: num("low_freq_factor").unwrap_or(1.0),
                        high_freq_factor: num("high_freq_factor").unwrap_or(4.0),
                        original_max_position_embeddings: num("original_max_position_embeddings")
                            .unwrap_or(8192.0),
                    }),
                    "default" => None,
                    other => {
                        return Err(NativeError::Unsupported(format!(
                            "rope_scaling type {other:?} (supported: llama3)"
                        )))
                    }
                }
            }
        };
        Ok(Self {
            arch,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6) as f32,
            rope_theta: raw.rope_theta.unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: raw.attention_bias.unwrap_or(arch == Arch::Qwen2),
        })
    }

    /// Inverse frequencies of RoPE (`head_dim / 2` of them), with Llama-3 scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf(2.0 * i as f64 / self.head_dim as f64);
                match self.rope_scaling {
                    None => f,
                    Some(s) => {
                        let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
                        let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / s.factor
                        } else {
                            let smooth = (s.original_max_position_embeddings / wavelen
                                - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * f / s.factor + smooth * f
                        }
                    }
                }
            })
            .collect()
    }

    /// Parameters in the weights (embeddings counted once when tied).
    pub fn parameters(&self) -> usize {
        let (h, i, kv) = (
            self.hidden_size,
            self.intermediate_size,
            self.num_kv_heads * self.head_dim,
        );
        let q = self.num_heads * self.head_dim;
        let bias = if self.qkv_bias { q + 2 * kv } else { 0 };
        let layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h + bias;
        let emb = self.vocab_size * h * if self.tie_word_embeddings { 1 } else { 2 };
        emb + self.num_layers * layer + h
    }
}
