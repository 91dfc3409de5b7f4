//! Picking the next token from logits: the request's `logit_bias`, OpenAI-style frequency and
//! presence penalties over the tokens generated so far, then greedy (temperature 0 or unset) or temperature, top-k and
//! top-p sampling. A request's `seed` makes its draws a function of (seed, position) alone, so
//! the same seed and request give the same output however requests are batched.

use dynamo_protocols::llm::{SamplingOptions, TokenId, TokenLogprob};

/// SplitMix64 step.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform draw in [0, 1) for `position` of a request seeded with `seed`.
pub fn uniform(seed: u64, position: usize) -> f64 {
    (mix(seed ^ mix(position as u64)) >> 11) as f64 / (1u64 << 53) as f64
}

/// Applies the request's `logit_bias`, then penalties for `generated` tokens, to `logits` in
/// place.
pub fn penalize(logits: &mut [f32], generated: &[TokenId], opts: &SamplingOptions) {
    for &(t, bias) in &opts.logit_bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += bias;
        }
    }
    let freq = opts.frequency_penalty.unwrap_or(0.0);
    let pres = opts.presence_penalty.unwrap_or(0.0);
    if (freq == 0.0 && pres == 0.0) || generated.is_empty() {
        return;
    }
    let mut counts: std::collections::HashMap<TokenId, u32> = Default::default();
    for &t in generated {
        *counts.entry(t).or_default() += 1;
    }
    for (t, c) in counts {
        if let Some(l) = logits.get_mut(t as usize) {
            *l -= freq * c as f32 + pres;
        }
    }
}

/// The next token; `draw` is a uniform number in [0, 1) (unused when greedy). A logit of
/// minus infinity bans its token (guided decoding). `None` when a logit is NaN or plus
/// infinity, or every token is banned.
pub fn sample(logits: &[f32], opts: &SamplingOptions, draw: f64) -> Option<TokenId> {
    let mut any_allowed = false;
    for &x in logits {
        if x.is_nan() || x == f32::INFINITY {
            return None;
        }
        any_allowed |= x.is_finite();
    }
    if !any_allowed {
        return None;
    }
    let temperature = opts.temperature.unwrap_or(0.0);
    if temperature <= 0.0 {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        return Some(best as TokenId);
    }
    // Candidates by descending logit; top-k cut.
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = opts
        .top_k
        .filter(|&k| k > 0)
        .map_or(logits.len(), |k| (k as usize).min(logits.len()));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        idx.truncate(k);
    }
    idx.sort_unstable_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    let max = logits[idx[0] as usize];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i as usize] - max) / temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    for p in &mut probs {
        *p /= total;
    }
    // Nucleus: the smallest prefix whose mass reaches top_p.
    let top_p = opts.top_p.unwrap_or(1.0).clamp(0.0, 1.0) as f64;
    let mut keep = probs.len();
    if top_p < 1.0 {
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= top_p {
                keep = i + 1;
                break;
            }
        }
    }
    let mass: f64 = probs[..keep].iter().sum();
    let mut r = draw * mass;
    for (i, p) in probs[..keep].iter().enumerate() {
        if r < *p {
            return Some(idx[i]);
        }
        r -= p;
    }
    Some(idx[keep - 1])
}

/// The log probability of `chosen` and of the `top` most likely tokens (most likely first,
/// ties by lower id, as greedy picks), under `logits` (after bias and penalties) at
/// temperature 1. Banned tokens (minus infinity) are never among the alternatives.
pub fn logprobs(logits: &[f32], chosen: TokenId, top: u32) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    let lp = |t: TokenId| (logits[t as usize] as f64 - lse) as f32;
    let k = (top as usize).min(logits.len());
    let mut best = Vec::new();
    if k > 0 {
        let order = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, order);
            idx.truncate(k);
        }
        idx.sort_unstable_by(order);
        best = idx
            .into_iter()
            .filter(|&t| logits[t as usize].is_finite())
            .map(|t| (t, lp(t)))
            .collect();
    }
    TokenLogprob {
        logprob: lp(chosen),
        top: best,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(t: f32) -> SamplingOptions {
        SamplingOptions {
            temperature: Some(t),
            ..Default::default()
        }
    }

    #[test]
    fn greedy_top_k_top_p_and_penalties() {
        let logits = [1.0, 3.0, 2.0, 0.5];
        assert_eq!(sample(&logits, &SamplingOptions::default(), 0.9), Some(1));
        // top_k 1 is greedy at any temperature.
        let k1 = SamplingOptions {
            top_k: Some(1),
            ..opts(5.0)
        };
        assert!((0..20).all(|i| sample(&logits, &k1, i as f64 / 20.0) == Some(1)));
        // A tiny top_p keeps only the most likely token.
        let p = SamplingOptions {
            top_p: Some(0.01),
            ..opts(1.0)
        };
        assert!((0..20).all(|i| sample(&logits, &p, i as f64 / 20.0) == Some(1)));
        // High temperature reaches every token across draws.
        let seen: std::collections::HashSet<_> = (0..100)
            .map(|i| sample(&logits, &opts(100.0), uniform(7, i)).unwrap())
            .collect();
        assert_eq!(seen.len(), 4);
        // A frequency penalty on token 1 makes 2 the greedy choice.
        let mut l = logits;
        let pen = SamplingOptions {
            frequency_penalty: Some(0.8),
            ..Default::default()
        };
        penalize(&mut l, &[1, 1], &pen);
        assert_eq!(sample(&l, &pen, 0.0), Some(2));
        // logit_bias: -100 bans the greedy token, +100 makes the least likely one win.
        for (bias, want) in [((1, -100.0), 2), ((3, 100.0), 3)] {
            let mut l = logits;
            let b = SamplingOptions {
                logit_bias: vec![bias],
                ..Default::default()
            };
            penalize(&mut l, &[], &b);
            assert_eq!(sample(&l, &b, 0.0), Some(want), "{bias:?}");
        }
        assert_eq!(
            sample(&[f32::NAN, 1.0], &SamplingOptions::default(), 0.0),
            None
        );
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_ranked_alternatives() {
        let logits = [1.0, 3.0, 2.0, 3.0];
        let greedy = sample(&logits, &SamplingOptions::default(), 0.0).unwrap();
        let lp = logprobs(&logits, greedy, 3);
        // Greedy takes the first of the tied best; it heads the alternatives.
        assert_eq!(greedy, 1);
        assert_eq!(lp.top[0], (1, lp.logprob));
        assert_eq!(
            lp.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![1, 3, 2]
        );
        let total: f64 = (0..4)
            .map(|t| (logprobs(&logits, t, 0).logprob as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        let want = 2.0 - (1f64.exp() + 2.0 * 3f64.exp() + 2f64.exp()).ln();
        assert!((logprobs(&logits, 2, 0).logprob as f64 - want).abs() < 1e-6);
        assert!(logprobs(&logits, 2, 0).top.is_empty());
        // More alternatives than the vocabulary: all of it.
        assert_eq!(logprobs(&logits, 0, 20).top.len(), 4);
    }
}
