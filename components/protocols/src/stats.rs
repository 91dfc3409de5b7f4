//! What the planner observes on the bus: each frontend's request statistics per interval
//! (topic [`STATS_TOPIC`] of the frontend component). Workers' engine figures ride on their
//! load reports ([`crate::kv::LoadReport`]: counters of steps, step time, batch, prefill and
//! decode tokens since the engine started; a reader takes the difference of two reports).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The event topic of frontend statistics (`dyn.ev.{ns}.frontend.stats.{instance}`).
pub const STATS_TOPIC: &str = "stats";

/// The component frontends publish their statistics under.
pub const FRONTEND_COMPONENT: &str = "frontend";

/// One frontend's requests over one interval, per model. Published every interval, also
/// when nothing happened (a planner must see idleness to scale down).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FrontendStats {
    /// When the interval ended (Unix milliseconds) and how long it was.
    pub at_ms: u64,
    pub interval_ms: u64,
    /// Requests in flight at the interval's end, all models.
    pub inflight: u64,
    pub models: BTreeMap<String, ModelStats>,
}

/// One model's requests that ended in an interval, and the latencies seen in it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelStats {
    /// Requests that ended: all, and those that failed (any status but 200).
    pub requests: u64,
    pub errors: u64,
    /// Prompt, generated and cached prompt tokens of the requests that ended well.
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    /// First tokens seen in the interval: time from arrival, milliseconds.
    pub ttft_ms: Percentiles,
    /// Later tokens seen in the interval: time since the stream's previous token, per token.
    pub itl_ms: Percentiles,
}

/// More requests or tokens than one frontend could end in one interval: a message that claims
/// more is corrupt (or forged) and is not used.
pub const MAX_PER_INTERVAL: u64 = 1 << 40;

impl FrontendStats {
    /// Whether every figure is one a frontend could have measured: counts in range (errors at
    /// most the requests, cached at most the input), latencies finite and not negative. A
    /// planner drops a message that is not.
    pub fn check(&self) -> Result<(), String> {
        for (model, m) in &self.models {
            m.check().map_err(|e| format!("model {model:?}: {e}"))?;
        }
        Ok(())
    }
}

impl ModelStats {
    fn check(&self) -> Result<(), String> {
        let counts = [
            ("requests", self.requests),
            ("input_tokens", self.input_tokens),
            ("output_tokens", self.output_tokens),
            ("ttft_ms.count", self.ttft_ms.count),
            ("itl_ms.count", self.itl_ms.count),
        ];
        if let Some((name, v)) = counts.iter().find(|(_, v)| *v > MAX_PER_INTERVAL) {
            return Err(format!("{name} {v} is more than an interval can hold"));
        }
        if self.errors > self.requests || self.cached_tokens > self.input_tokens {
            return Err("more errors than requests, or more cached than input tokens".into());
        }
        for (name, p) in [("ttft_ms", &self.ttft_ms), ("itl_ms", &self.itl_ms)] {
            let figures = [p.mean, p.p50, p.p90, p.p99, p.max];
            if figures.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return Err(format!("{name} holds a negative or non-finite latency"));
            }
        }
        Ok(())
    }

    /// Cached share of the prompt tokens of the requests that ended well (0 when none).
    pub fn cached_ratio(&self) -> f64 {
        match self.input_tokens {
            0 => 0.0,
            n => self.cached_tokens as f64 / n as f64,
        }
    }
}

/// A distribution's summary: how many samples, their mean and percentiles (0 when none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// Summarizes `samples` (sorted here); `count` may exceed their number when only a
    /// sample of a larger set was kept.
    pub fn of(samples: &mut [f64], count: u64) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Self {
            count: count.max(samples.len() as u64),
            mean: samples.iter().sum::<f64>() / samples.len() as f64,
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: samples[samples.len() - 1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_set() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let p = Percentiles::of(&mut v, 100);
        assert_eq!((p.p50, p.p90, p.p99, p.max), (51.0, 90.0, 99.0, 100.0));
        assert_eq!(p.mean, 50.5);
        assert_eq!(Percentiles::of(&mut [], 0), Percentiles::default());
        let p = Percentiles::of(&mut [7.0], 40);
        assert_eq!((p.count, p.p50, p.p99), (40, 7.0, 7.0));
    }

    #[test]
    fn implausible_statistics_are_refused() {
        let mut v: Vec<f64> = vec![3.0, 5.0];
        let good = ModelStats {
            requests: 4,
            errors: 1,
            input_tokens: 100,
            cached_tokens: 40,
            output_tokens: 20,
            ttft_ms: Percentiles::of(&mut v, 2),
            itl_ms: Percentiles::default(),
        };
        let of = |m: ModelStats| FrontendStats {
            models: [("tiny".to_string(), m)].into(),
            ..Default::default()
        };
        assert_eq!(of(good.clone()).check(), Ok(()));
        let mut bad = good.clone();
        bad.ttft_ms.p99 = f64::NAN;
        assert!(of(bad).check().unwrap_err().contains("ttft_ms"));
        let mut bad = good.clone();
        bad.requests = u64::MAX;
        assert!(of(bad).check().unwrap_err().contains("requests"));
        let mut bad = good.clone();
        bad.errors = 5;
        assert!(of(bad).check().is_err());
        let mut bad = good;
        bad.itl_ms.max = -1.0;
        assert!(of(bad).check().unwrap_err().contains("itl_ms"));
    }
}
