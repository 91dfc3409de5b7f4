//! The decoder (Llama, Mistral, Qwen2) and its batched forward pass over a paged KV cache.
//!
//! One step computes any mix of sequences, each a run of new tokens at positions
//! `start..start + len` (a prefill chunk, or one decode token): every projection runs once
//! over all the step's tokens (so a batch reads each weight once); attention runs per
//! (token, head), reading K/V of positions `0..=pos` through the sequence's block table.
//! Logits are computed only for the rows that sample.

use std::path::Path;

use dynamo_kv::BlockId;
use dynamo_protocols::llm::TokenId;
use rayon::prelude::*;

use super::config::ModelConfig;
use super::kv::{KvCache, KvDtype, KvLayout, LayerMut};
pub use super::ops::Compute;
use super::ops::{self, KvElem, Linear};
use super::weights::Weights;
use super::NativeError;

struct Layer {
    attn_norm: Vec<f32>,
    /// q, k and v projections stacked: `[q_dim + 2 kv_dim, hidden]`.
    qkv: Linear,
    o: Linear,
    mlp_norm: Vec<f32>,
    /// gate and up stacked: `[2 intermediate, hidden]`.
    gate_up: Linear,
    down: Linear,
}

pub struct Model {
    cfg: ModelConfig,
    embed: Vec<f32>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Linear,
    inv_freq: Vec<f64>,
    compute: Compute,
    kv_dtype: KvDtype,
}

/// One sequence's part of a step.
pub struct SeqStep<'a> {
    /// The tokens to compute, at positions `start..start + tokens.len()`.
    pub tokens: &'a [TokenId],
    pub start: usize,
    /// Block table covering at least `start + tokens.len()` positions.
    pub blocks: &'a [BlockId],
    /// Whether the last token's logits are wanted.
    pub logits: bool,
}

impl Model {
    /// Loads `dir`'s `config.json` and safetensors weights. `progress(done, total)` is called
    /// after each layer.
    pub fn load(
        dir: &Path,
        compute: Compute,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, NativeError> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| NativeError::Config(format!("{}: {e}", cfg_path.display())))?;
        let cfg = ModelConfig::parse(&text)?;
        let w = Weights::open(dir)?;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_dim, kv_dim, inter) = (
            cfg.num_heads * hd,
            cfg.num_kv_heads * hd,
            cfg.intermediate_size,
        );
        let embed = w.f32("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let mut qkv = w.f32(&p("self_attn.q_proj.weight"), &[q_dim, h])?;
            qkv.extend(w.f32(&p("self_attn.k_proj.weight"), &[kv_dim, h])?);
            qkv.extend(w.f32(&p("self_attn.v_proj.weight"), &[kv_dim, h])?);
            let bias = if cfg.qkv_bias {
                let mut b = w.f32(&p("self_attn.q_proj.bias"), &[q_dim])?;
                b.extend(w.f32(&p("self_attn.k_proj.bias"), &[kv_dim])?);
                b.extend(w.f32(&p("self_attn.v_proj.bias"), &[kv_dim])?);
                Some(b)
            } else {
                None
            };
            let mut gate_up = w.f32(&p("mlp.gate_proj.weight"), &[inter, h])?;
            gate_up.extend(w.f32(&p("mlp.up_proj.weight"), &[inter, h])?);
            layers.push(Layer {
                attn_norm: w.f32(&p("input_layernorm.weight"), &[h])?,
                qkv: Linear::new(q_dim + 2 * kv_dim, h, qkv, bias, compute),
                o: Linear::new(
                    h,
                    q_dim,
                    w.f32(&p("self_attn.o_proj.weight"), &[h, q_dim])?,
                    None,
                    compute,
                ),
                mlp_norm: w.f32(&p("post_attention_layernorm.weight"), &[h])?,
                gate_up: Linear::new(2 * inter, h, gate_up, None, compute),
                down: Linear::new(
                    h,
                    inter,
                    w.f32(&p("mlp.down_proj.weight"), &[h, inter])?,
                    None,
                    compute,
                ),
            });
            progress(i + 1, cfg.num_layers);
        }
        let head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            w.f32("lm_head.weight", &[cfg.vocab_size, h])?
        };
        Ok(Self {
            norm: w.f32("model.norm.weight", &[h])?,
            lm_head: Linear::new(cfg.vocab_size, h, head, None, compute),
            inv_freq: cfg.rope_inv_freq(),
            compute,
            kv_dtype: KvDtype::F32,
            embed,
            layers,
            cfg,
        })
    }

    /// The model with its KV cache (and [`Model::kv_layout`]) in `dtype`.
    pub fn with_kv_dtype(mut self, dtype: KvDtype) -> Self {
        self.kv_dtype = dtype;
        self
    }

    /// The type the weights are held in.
    pub fn compute(&self) -> Compute {
        self.compute
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Bytes of weights read per forward step (what a decode step streams from memory).
    pub fn weight_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.qkv.bytes() + l.o.bytes() + l.gate_up.bytes() + l.down.bytes())
            .sum::<usize>()
            + self.lm_head.bytes()
    }

    pub fn kv_layout(&self, block_size: usize) -> KvLayout {
        KvLayout {
            layers: self.cfg.num_layers,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            block_size,
            dtype: self.kv_dtype.name(),
        }
    }

    /// The logits after `tokens` (one sequence on a private cache): for scoring and checks.
    pub fn last_logits(&self, tokens: &[TokenId]) -> Vec<f32> {
        let bs = 16;
        let blocks: Vec<BlockId> = (0..tokens.len().div_ceil(bs) as u32)
            .map(BlockId::new)
            .collect();
        let mut cache = KvCache::new(self.kv_layout(bs), blocks.len());
        let step = SeqStep {
            tokens,
            start: 0,
            blocks: &blocks,
            logits: true,
        };
        self.forward(&mut cache, &[step]).pop().unwrap_or_default()
    }

    /// Runs one step; returns the logits of each sequence with `logits` set, in order.
    ///
    /// The whole step runs on a thread of the compute pool (one hand-off per step): each
    /// parallel operation is then forked from inside the pool, without the calling thread
    /// sleeping and waking around every one of them (measured: ~20% of a batch-1 step went to
    /// those wake-ups).
    pub fn forward(&self, cache: &mut KvCache, seqs: &[SeqStep<'_>]) -> Vec<Vec<f32>> {
        rayon::scope(|_| self.forward_in_pool(cache, seqs))
    }

    fn forward_in_pool(&self, cache: &mut KvCache, seqs: &[SeqStep<'_>]) -> Vec<Vec<f32>> {
        let c = &self.cfg;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (nh, nkv) = (c.num_heads, c.num_kv_heads);
        let (q_dim, kv_dim) = (nh * hd, nkv * hd);
        let bs = cache.layout().block_size;
        // Row r of the step: (sequence, position).
        let rows: Vec<(usize, usize)> = seqs
            .iter()
            .enumerate()
            .flat_map(|(s, q)| (0..q.tokens.len()).map(move |i| (s, q.start + i)))
            .collect();
        let n = rows.len();
        // Each sequence's cache rows (start of position t's K/V for kv head 0 in a layer; head
        // g is `g * bs * hd` further), shared by every layer and head.
        let cache_rows: Vec<Vec<usize>> = seqs
            .iter()
            .map(|q| {
                (0..q.start + q.tokens.len())
                    .map(|t| cache.offset(q.blocks[t / bs], t % bs))
                    .collect()
            })
            .collect();
        let tables: Vec<Vec<(f32, f32)>> = rows
            .iter()
            .map(|&(_, pos)| ops::rope_table(pos, &self.inv_freq))
            .collect();
        let mut x = vec![0f32; n * h];
        let mut r = 0;
        for q in seqs {
            for &t in q.tokens {
                let t = (t as usize).min(c.vocab_size - 1);
                x[r * h..(r + 1) * h].copy_from_slice(&self.embed[t * h..(t + 1) * h]);
                r += 1;
            }
        }
        let mut xn = vec![0f32; n * h];
        let mut qkv = vec![0f32; n * (q_dim + 2 * kv_dim)];
        let mut att = vec![0f32; n * q_dim];
        let mut proj = vec![0f32; n * h];
        let mut gu = vec![0f32; n * 2 * c.intermediate_size];
        let mut act = vec![0f32; n * c.intermediate_size];
        for (l, layer) in self.layers.iter().enumerate() {
            ops::rms_norm(&x, &layer.attn_norm, c.rms_norm_eps, &mut xn);
            layer.qkv.forward(&xn, n, &mut qkv);
            // RoPE on q and k, then k and v into the cache.
            let width = q_dim + 2 * kv_dim;
            // (Split only across many rows: waking the other threads for a decode step's few
            // rows costs more than the work.)
            qkv.par_chunks_mut(width)
                .zip(tables.par_iter())
                .with_min_len(32)
                .for_each(|(row, table)| {
                    for head in row[..q_dim + kv_dim].chunks_exact_mut(hd) {
                        ops::rope(head, table);
                    }
                });
            let step = AttentionStep {
                rows: &rows,
                cache_rows: &cache_rows,
                qkv: &qkv,
                bs,
            };
            match cache.layer_mut(l) {
                LayerMut::F32(k, v) => self.attention(&step, k, v, &mut att),
                LayerMut::F16(k, v) => self.attention(&step, k, v, &mut att),
                LayerMut::Bf16(k, v) => self.attention(&step, k, v, &mut att),
            }
            layer.o.forward(&att, n, &mut proj);
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += b;
            }
            ops::rms_norm(&x, &layer.mlp_norm, c.rms_norm_eps, &mut xn);
            layer.gate_up.forward(&xn, n, &mut gu);
            ops::silu_mul(&gu, c.intermediate_size, &mut act);
            layer.down.forward(&act, n, &mut proj);
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += b;
            }
        }
        // Logits for the last row of each sequence that wants them.
        let mut last = Vec::new();
        let mut end = 0;
        for q in seqs {
            end += q.tokens.len();
            if q.logits && !q.tokens.is_empty() {
                last.push(end - 1);
            }
        }
        if last.is_empty() {
            return Vec::new();
        }
        let mut sel = vec![0f32; last.len() * h];
        for (i, &row) in last.iter().enumerate() {
            sel[i * h..(i + 1) * h].copy_from_slice(&x[row * h..(row + 1) * h]);
        }
        let mut normed = vec![0f32; sel.len()];
        ops::rms_norm(&sel, &self.norm, c.rms_norm_eps, &mut normed);
        let mut logits = vec![0f32; last.len() * c.vocab_size];
        self.lm_head.forward(&normed, last.len(), &mut logits);
        logits
            .chunks_exact(c.vocab_size)
            .map(<[f32]>::to_vec)
            .collect()
    }

    /// One layer's attention for a step: the rows' new K and V (RoPE applied) into the cache
    /// (rounded to the cache's type), then each row's query heads over its cached positions.
    fn attention<E: KvElem>(
        &self,
        step: &AttentionStep<'_>,
        kc: &mut [E],
        vc: &mut [E],
        att: &mut [f32],
    ) {
        let c = &self.cfg;
        let hd = c.head_dim;
        let (nh, nkv) = (c.num_heads, c.num_kv_heads);
        let (q_dim, kv_dim) = (nh * hd, nkv * hd);
        let AttentionStep {
            rows,
            cache_rows,
            qkv,
            bs,
        } = *step;
        let scale = 1.0 / (hd as f32).sqrt();
        let n = rows.len();
        let width = q_dim + 2 * kv_dim;
        for (row, &(s, pos)) in qkv.chunks_exact(width).zip(rows) {
            let base = cache_rows[s][pos];
            for g in 0..nkv {
                let off = base + g * bs * hd;
                let (k, v) = (q_dim + g * hd, q_dim + kv_dim + g * hd);
                for (d, x) in kc[off..off + hd].iter_mut().zip(&row[k..k + hd]) {
                    *d = E::narrow(*x);
                }
                for (d, x) in vc[off..off + hd].iter_mut().zip(&row[v..v + hd]) {
                    *d = E::narrow(*x);
                }
            }
        }
        // Attention, one task per (row, kv head): the query heads sharing a kv head read
        // each cached K and V row once.
        let (kc, vc) = (&*kc, &*vc);
        let rep = nh / nkv;
        // Tasks of several (row, kv head) pairs, but at least two per thread so that a
        // decode step's few pairs still spread over the cores.
        let min_len = (n * nkv / (4 * rayon::current_num_threads())).clamp(1, 4);
        // Pair i's cached rows: its row's positions, at its kv head.
        let kv_rows = |i: usize| {
            let (s, pos) = rows[i / nkv];
            ops::KvRows {
                k: kc,
                v: vc,
                offsets: &cache_rows[s][..=pos],
                head: (i % nkv) * bs * hd,
            }
        };
        att.par_chunks_mut(rep * hd)
            .enumerate()
            .with_min_len(min_len)
            .for_each(|(i, out)| {
                let (row, g) = (i / nkv, i % nkv);
                let group = ops::GroupQuery {
                    q: &qkv[row * width + g * rep * hd..row * width + (g + 1) * rep * hd],
                    rep,
                    hd,
                    scale,
                };
                // The pair this thread most likely takes next, for prefetching.
                let next = (i + 1 < n * nkv).then(|| kv_rows(i + 1));
                ops::attend(group, kv_rows(i), out, next);
            });
    }
}

/// What a layer's attention needs of a step: each row's (sequence, position), each
/// sequence's cache offsets by position, the rows' q/k/v projections (RoPE applied).
#[derive(Clone, Copy)]
struct AttentionStep<'a> {
    rows: &'a [(usize, usize)],
    cache_rows: &'a [Vec<usize>],
    qkv: &'a [f32],
    bs: usize,
}
