//! Request traces: the Mooncake JSONL format (`timestamp` ms, `input_length`,
//! `output_length`, `hash_ids`: requests with equal leading hash ids share those prompt
//! blocks), and load curves that generate one (steady, diurnal sine, step, spikes, bursty).
//! `dynamo-run bench` and the simulator turn a trace into the same token prompts
//! ([`prompt`]), so a simulated run and a real one see the same prefixes.

use serde::{Deserialize, Serialize};

/// SplitMix64: the deterministic generator of prompts and arrivals.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `n` token ids in 260..3900 (inside any vocabulary of 4096 or more).
    pub fn tokens(&mut self, n: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(n);
        self.extend_tokens(&mut out, n);
        out
    }

    /// [`Rng::tokens`] appended to `out`.
    pub fn extend_tokens(&mut self, out: &mut Vec<u32>, n: usize) {
        out.extend((0..n).map(|_| 260 + (self.next_u64() % 3640) as u32));
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceRequest {
    /// Arrival, milliseconds from the trace's start.
    pub timestamp: f64,
    pub input_length: u32,
    pub output_length: u32,
    /// One id per prompt block; equal ids are equal blocks.
    pub hash_ids: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct TraceError {
    pub line: usize,
    pub reason: String,
}

/// Parses a Mooncake trace. A bad line is an error naming it, unless `skip` says to skip it
/// (then `skipped` hears of it).
pub fn parse_mooncake(
    text: &str,
    skip: bool,
    mut skipped: impl FnMut(TraceError),
) -> Result<Vec<TraceRequest>, TraceError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = (|| -> Result<TraceRequest, String> {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
            let num = |k: &str| {
                v.get(k)
                    .and_then(serde_json::Value::as_u64)
                    .ok_or_else(|| format!("missing or non-integer {k:?}"))
            };
            let input = num("input_length")?;
            let output = num("output_length")?.max(1);
            let ts = v
                .get("timestamp")
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(0.0);
            let hash_ids: Vec<u64> = v
                .get("hash_ids")
                .and_then(serde_json::Value::as_array)
                .ok_or("missing \"hash_ids\"")?
                .iter()
                .map(|h| h.as_u64().ok_or("hash ids must be integers"))
                .collect::<Result<_, _>>()?;
            Ok(TraceRequest {
                timestamp: ts.max(0.0),
                input_length: input.min(u32::MAX as u64) as u32,
                output_length: output.min(u32::MAX as u64) as u32,
                hash_ids,
            })
        })();
        match parsed {
            Ok(r) => out.push(r),
            Err(reason) => {
                let e = TraceError {
                    line: i + 1,
                    reason,
                };
                if !skip {
                    return Err(e);
                }
                skipped(e);
            }
        }
    }
    Ok(out)
}

/// Request number `index`'s prompt: each hash id becomes `block_size` tokens derived from it
/// (equal ids, equal blocks), then filler unique to the request up to `input_length`.
pub fn prompt(r: &TraceRequest, index: usize, block_size: usize, seed: u64) -> Vec<u32> {
    let bs = block_size.max(1);
    let input = r.input_length as usize;
    // Room for the last block's filler, and for the answer an engine appends to it.
    let mut p = Vec::with_capacity(input + bs + r.output_length as usize);
    for h in &r.hash_ids {
        if p.len() >= input {
            break;
        }
        Rng(*h ^ 0x5eed).extend_tokens(&mut p, bs);
    }
    let mut filler = Rng(index as u64 ^ seed);
    while p.len() < input {
        filler.extend_tokens(&mut p, bs);
    }
    p.truncate(input.max(1));
    p
}

/// Writes items as JSON lines (trace requests: Mooncake JSONL).
pub fn to_jsonl<T: Serialize>(items: &[T]) -> String {
    let mut s = String::new();
    for r in items {
        s.push_str(&serde_json::to_string(r).expect("plain data serializes"));
        s.push('\n');
    }
    s
}

/// A request rate over time (requests a second at second `t`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "shape", rename_all = "snake_case")]
pub enum LoadCurve {
    Steady {
        rate: f64,
    },
    /// `mean + amplitude x sin(2 pi t / period)`, never below zero.
    Diurnal {
        mean: f64,
        amplitude: f64,
        period_s: f64,
    },
    /// `base`, times `factor` from `at_s` to `until_s`.
    Step {
        base: f64,
        factor: f64,
        at_s: f64,
        until_s: f64,
    },
    /// `base`, times `factor` for `width_s` every `every_s`.
    Spikes {
        base: f64,
        factor: f64,
        every_s: f64,
        width_s: f64,
    },
    /// The planner's evaluation: `base` for the first quarter, `factor` x `base` for the
    /// second, `trough` x `base` for the third, `base` again for the last.
    Bursty {
        base: f64,
        factor: f64,
        trough: f64,
        duration_s: f64,
    },
}

impl LoadCurve {
    pub fn rate(&self, t: f64) -> f64 {
        match *self {
            LoadCurve::Steady { rate } => rate,
            LoadCurve::Diurnal {
                mean,
                amplitude,
                period_s,
            } => {
                (mean + amplitude * (std::f64::consts::TAU * t / period_s.max(1e-9)).sin()).max(0.0)
            }
            LoadCurve::Step {
                base,
                factor,
                at_s,
                until_s,
            } => {
                if t >= at_s && t < until_s {
                    base * factor
                } else {
                    base
                }
            }
            LoadCurve::Spikes {
                base,
                factor,
                every_s,
                width_s,
            } => {
                if t.rem_euclid(every_s.max(1e-9)) < width_s {
                    base * factor
                } else {
                    base
                }
            }
            LoadCurve::Bursty {
                base,
                factor,
                trough,
                duration_s,
            } => match ((t / duration_s.max(1e-9)) * 4.0).floor() as i64 {
                1 => base * factor,
                2 => base * trough,
                _ => base,
            },
        }
    }

    /// The highest rate the curve reaches (for thinning).
    fn peak(&self) -> f64 {
        match *self {
            LoadCurve::Steady { rate } => rate,
            LoadCurve::Diurnal {
                mean, amplitude, ..
            } => mean + amplitude.abs(),
            LoadCurve::Step { base, factor, .. } | LoadCurve::Spikes { base, factor, .. } => {
                base * factor.max(1.0)
            }
            LoadCurve::Bursty {
                base,
                factor,
                trough,
                ..
            } => base * factor.max(trough).max(1.0),
        }
    }

    /// Parses `steady:RATE`, `diurnal:MEAN,AMPLITUDE,PERIOD_S`, `step:BASE,FACTOR,AT_S,UNTIL_S`,
    /// `spikes:BASE,FACTOR,EVERY_S,WIDTH_S` or `bursty:BASE,FACTOR,TROUGH` (over the run).
    pub fn parse(s: &str, duration_s: f64) -> Result<Self, String> {
        let (name, args) = s.split_once(':').unwrap_or((s, ""));
        let nums: Vec<f64> = args
            .split(',')
            .filter(|a| !a.is_empty())
            .map(|a| a.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|_| format!("load curve {s:?}: the parameters are numbers"))?;
        if nums.iter().any(|n| !n.is_finite() || *n < 0.0) {
            return Err(format!("load curve {s:?}: parameters are numbers >= 0"));
        }
        let want = |n: usize, form: &str| -> Result<(), String> {
            if nums.len() == n {
                Ok(())
            } else {
                Err(format!("load curve {s:?}: expected {form}"))
            }
        };
        Ok(match name {
            "steady" => {
                want(1, "steady:RATE")?;
                LoadCurve::Steady { rate: nums[0] }
            }
            "diurnal" => {
                want(3, "diurnal:MEAN,AMPLITUDE,PERIOD_S")?;
                LoadCurve::Diurnal {
                    mean: nums[0],
                    amplitude: nums[1],
                    period_s: nums[2],
                }
            }
            "step" => {
                want(4, "step:BASE,FACTOR,AT_S,UNTIL_S")?;
                LoadCurve::Step {
                    base: nums[0],
                    factor: nums[1],
                    at_s: nums[2],
                    until_s: nums[3],
                }
            }
            "spikes" => {
                want(4, "spikes:BASE,FACTOR,EVERY_S,WIDTH_S")?;
                LoadCurve::Spikes {
                    base: nums[0],
                    factor: nums[1],
                    every_s: nums[2],
                    width_s: nums[3],
                }
            }
            "bursty" => {
                want(3, "bursty:BASE,FACTOR,TROUGH")?;
                LoadCurve::Bursty {
                    base: nums[0],
                    factor: nums[1],
                    trough: nums[2],
                    duration_s,
                }
            }
            _ => {
                return Err(format!(
                    "load curve {s:?}: expected steady, diurnal, step, spikes or bursty"
                ))
            }
        })
    }
}

/// The shape of generated requests: prompts of `isl` tokens whose first `prefix_blocks`
/// blocks are one of `groups` shared prefixes (a system prompt), the rest unique; `osl`
/// output tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shape {
    pub isl: u32,
    pub osl: u32,
    pub groups: u32,
    pub prefix_blocks: u32,
    pub block_size: u32,
}

/// Poisson arrivals at `curve`'s rate over `duration_s` (thinning), shaped by `shape`.
pub fn generate(curve: &LoadCurve, duration_s: f64, shape: &Shape, seed: u64) -> Vec<TraceRequest> {
    let mut rng = Rng(seed ^ 0x7ace);
    let peak = curve.peak();
    let mut out = Vec::new();
    if peak <= 0.0 {
        return out;
    }
    let blocks = shape.isl.div_ceil(shape.block_size.max(1)) as u64;
    let prefix = (shape.prefix_blocks as u64).min(blocks);
    let mut next_unique = 1u64 << 40;
    let mut t = 0.0;
    loop {
        t += -(1.0 - rng.unit()).ln() / peak;
        if t >= duration_s {
            break;
        }
        if rng.unit() * peak > curve.rate(t) {
            continue;
        }
        let group = rng.next_u64() % shape.groups.max(1) as u64;
        let mut hash_ids: Vec<u64> = (0..prefix).map(|b| group * 1_000_003 + b + 1).collect();
        for _ in prefix..blocks {
            hash_ids.push(next_unique);
            next_unique += 1;
        }
        out.push(TraceRequest {
            timestamp: t * 1e3,
            input_length: shape.isl,
            output_length: shape.osl.max(1),
            hash_ids,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mooncake_lines_parse_and_bad_ones_are_named() {
        let text = "{\"timestamp\": 5, \"input_length\": 100, \"output_length\": 7, \"hash_ids\": [1, 2]}\n\n{\"timestamp\": 9}\n";
        let e = parse_mooncake(text, false, |_| {}).unwrap_err();
        assert_eq!(e.line, 3);
        let mut skipped = 0;
        let r = parse_mooncake(text, true, |_| skipped += 1).unwrap();
        assert_eq!((r.len(), skipped), (1, 1));
        assert_eq!(r[0].hash_ids, vec![1, 2]);
        // Equal hash ids, equal blocks; the rest differs.
        let a = prompt(&r[0], 0, 16, 1);
        let mut other = r[0].clone();
        other.hash_ids = vec![1, 3];
        let b = prompt(&other, 1, 16, 1);
        assert_eq!(a.len(), 100);
        assert_eq!(a[..16], b[..16]);
        assert_ne!(a[16..32], b[16..32]);
        assert_eq!(parse_mooncake(&to_jsonl(&r), false, |_| {}).unwrap(), r);
    }

    #[test]
    fn curves_follow_their_shape_and_generation_their_rate() {
        let b = LoadCurve::parse("bursty:10,4,0.25", 400.0).unwrap();
        assert_eq!(
            (b.rate(50.0), b.rate(150.0), b.rate(250.0), b.rate(350.0)),
            (10.0, 40.0, 2.5, 10.0)
        );
        let shape = Shape {
            isl: 256,
            osl: 16,
            groups: 4,
            prefix_blocks: 2,
            block_size: 64,
        };
        let reqs = generate(&b, 400.0, &shape, 7);
        let in_burst = reqs
            .iter()
            .filter(|r| (100e3..200e3).contains(&r.timestamp))
            .count() as f64;
        assert!((in_burst / 100.0 - 40.0).abs() < 4.0, "{in_burst}");
        assert!(reqs.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));
        assert_eq!(reqs[0].hash_ids.len(), 4);
        for bad in ["", "steady", "steady:-1", "diurnal:1,2", "wave:3"] {
            assert!(LoadCurve::parse(bad, 10.0).is_err(), "{bad}");
        }
    }
}
