//! A worker's capacity profile: what one worker of a given engine and model sustains, as
//! measured by `dynamo-run profile` and loaded by the planner.
//!
//! - `prefill`: time to first token against input length on an otherwise idle worker
//!   (points sorted by input length; linear interpolation between them, linear
//!   extrapolation past the last two).
//! - `decode`: inter-token latency against the batch (sequences decoding together) at a
//!   context length (points on a grid of batch x context; bilinear interpolation).
//!
//! A profile names the model and engine it was measured on; the planner refuses one of
//! another model (its figures would be wrong by any factor).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The profile format's version.
pub const PROFILE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub version: u32,
    /// The served model's name and the engine (`mocker`, `native`, ...).
    pub model: String,
    pub engine: String,
    /// What the engine was configured with (block size, KV blocks, speedup...), for people.
    #[serde(default)]
    pub settings: serde_json::Value,
    pub prefill: Vec<PrefillPoint>,
    pub decode: Vec<DecodePoint>,
}

/// Time to first token for a prompt of `isl` tokens on an idle worker.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrefillPoint {
    pub isl: u32,
    pub ttft_ms: f64,
}

/// Inter-token latency with `batch` sequences decoding, each at about `context` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DecodePoint {
    pub batch: u32,
    pub context: u32,
    pub itl_ms: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read the profile {path}: {reason}; run `dynamo-run profile` to make one")]
    Read { path: String, reason: String },
    #[error("the profile {path} is malformed: {reason}")]
    Malformed { path: String, reason: String },
    #[error("the profile was measured for model {found:?}, not {wanted:?}; profile this model")]
    OtherModel { found: String, wanted: String },
}

impl Profile {
    /// Reads and checks a profile file; `model`, when given, must be the profile's.
    pub fn load(path: &Path, model: Option<&str>) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|e| ProfileError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let p: Profile = serde_json::from_str(&text).map_err(|e| ProfileError::Malformed {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        p.check().map_err(|reason| ProfileError::Malformed {
            path: path.display().to_string(),
            reason,
        })?;
        if let Some(m) = model {
            if p.model != m {
                return Err(ProfileError::OtherModel {
                    found: p.model,
                    wanted: m.to_string(),
                });
            }
        }
        Ok(p)
    }

    /// What makes a profile usable: the version, points, positive finite figures, sorted
    /// prefill points, a full batch x context grid.
    pub fn check(&self) -> Result<(), String> {
        if self.version != PROFILE_VERSION {
            return Err(format!(
                "version {} (this build reads version {PROFILE_VERSION})",
                self.version
            ));
        }
        if self.prefill.is_empty() || self.decode.is_empty() {
            return Err("it needs prefill and decode points".into());
        }
        let bad = |v: f64| !(v.is_finite() && v > 0.0);
        if self.prefill.iter().any(|p| p.isl == 0 || bad(p.ttft_ms)) {
            return Err(
                "a prefill point has no input length or a latency that is not a positive number"
                    .into(),
            );
        }
        if self.prefill.windows(2).any(|w| w[0].isl >= w[1].isl) {
            return Err("prefill points must be sorted by input length, without repeats".into());
        }
        if self.decode.iter().any(|d| d.batch == 0 || bad(d.itl_ms)) {
            return Err(
                "a decode point has no batch or a latency that is not a positive number".into(),
            );
        }
        let (batches, contexts) = (self.batches(), self.contexts());
        if batches.len() * contexts.len() != self.decode.len() {
            return Err(format!(
                "decode points must cover a grid: {} batches x {} contexts, {} points",
                batches.len(),
                contexts.len(),
                self.decode.len()
            ));
        }
        Ok(())
    }

    fn batches(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.decode.iter().map(|d| d.batch).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    fn contexts(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.decode.iter().map(|d| d.context).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Time to first token for `isl` input tokens on an idle worker, milliseconds.
    pub fn ttft_ms(&self, isl: f64) -> f64 {
        let pts: Vec<(f64, f64)> = self
            .prefill
            .iter()
            .map(|p| (p.isl as f64, p.ttft_ms))
            .collect();
        interpolate(&pts, isl).max(0.0)
    }

    /// Inter-token latency with `batch` sequences at `context` tokens, milliseconds.
    pub fn itl_ms(&self, batch: f64, context: f64) -> f64 {
        let contexts = self.contexts();
        // ITL against batch at each measured context, then across contexts.
        let per_context: Vec<(f64, f64)> = contexts
            .iter()
            .map(|&c| {
                let mut pts: Vec<(f64, f64)> = self
                    .decode
                    .iter()
                    .filter(|d| d.context == c)
                    .map(|d| (d.batch as f64, d.itl_ms))
                    .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                (c as f64, interpolate(&pts, batch))
            })
            .collect();
        interpolate(&per_context, context).max(0.0)
    }

    /// The largest batch (at most the profile's largest) whose ITL at `context` meets
    /// `itl_target_ms`; `None` when even one sequence misses it.
    pub fn max_batch(&self, context: f64, itl_target_ms: f64) -> Option<f64> {
        let top = *self.batches().last()? as f64;
        if self.itl_ms(1.0, context) > itl_target_ms {
            return None;
        }
        // ITL grows with the batch: bisect.
        let (mut lo, mut hi) = (1.0f64, top);
        if self.itl_ms(hi, context) <= itl_target_ms {
            return Some(hi);
        }
        for _ in 0..40 {
            let mid = (lo + hi) / 2.0;
            if self.itl_ms(mid, context) <= itl_target_ms {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(lo)
    }
}

/// Piecewise-linear through `pts` (sorted by x), extrapolated linearly past either end (a
/// single point is a constant).
fn interpolate(pts: &[(f64, f64)], x: f64) -> f64 {
    match pts {
        [] => 0.0,
        [(_, y)] => *y,
        _ => {
            let i = pts
                .windows(2)
                .position(|w| x <= w[1].0)
                .unwrap_or(pts.len() - 2);
            let ((x0, y0), (x1, y1)) = (pts[i], pts[i + 1]);
            if x1 == x0 {
                return y0;
            }
            y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        }
    }
}

#[cfg(test)]
pub(crate) fn sample() -> Profile {
    // Prefill: 10 ms + 0.01 ms a token; decode: 5 ms + 0.1 ms a sequence + 0.001 ms a token
    // of context.
    let prefill = [128u32, 1024, 4096]
        .iter()
        .map(|&isl| PrefillPoint {
            isl,
            ttft_ms: 10.0 + 0.01 * isl as f64,
        })
        .collect();
    let mut decode = Vec::new();
    for batch in [1u32, 8, 64, 256] {
        for context in [512u32, 4096] {
            decode.push(DecodePoint {
                batch,
                context,
                itl_ms: 5.0 + 0.1 * batch as f64 + 0.001 * context as f64,
            });
        }
    }
    Profile {
        version: PROFILE_VERSION,
        model: "m".into(),
        engine: "mocker".into(),
        settings: serde_json::Value::Null,
        prefill,
        decode,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolates_between_and_past_the_points() {
        let p = sample();
        assert!((p.ttft_ms(128.0) - 11.28).abs() < 1e-9);
        assert!((p.ttft_ms(2048.0) - 30.48).abs() < 1e-9, "between points");
        assert!((p.ttft_ms(8192.0) - 91.92).abs() < 1e-9, "extrapolated");
        assert!((p.itl_ms(32.0, 2304.0) - (5.0 + 3.2 + 2.304)).abs() < 1e-9);
        // 5 + 0.1 b + 0.512 <= 20  =>  b <= 144.88
        let b = p.max_batch(512.0, 20.0).unwrap();
        assert!((b - 144.88).abs() < 1e-6, "{b}");
        assert_eq!(
            p.max_batch(512.0, 100.0),
            Some(256.0),
            "capped at the profile's batch"
        );
        assert_eq!(
            p.max_batch(512.0, 5.0),
            None,
            "one sequence misses the target"
        );
    }

    #[test]
    fn bad_profiles_are_refused_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.json");
        let missing = Profile::load(&dir.join("none.json"), None).unwrap_err();
        assert!(
            missing.to_string().contains("dynamo-run profile"),
            "{missing}"
        );
        std::fs::write(&path, "{not json").unwrap();
        assert!(matches!(
            Profile::load(&path, None),
            Err(ProfileError::Malformed { .. })
        ));
        std::fs::write(&path, serde_json::to_string(&sample()).unwrap()).unwrap();
        assert!(Profile::load(&path, Some("m")).is_ok());
        assert!(matches!(
            Profile::load(&path, Some("other")),
            Err(ProfileError::OtherModel { .. })
        ));
        let mut p = sample();
        p.prefill.swap(0, 1);
        assert!(p.check().unwrap_err().contains("sorted"));
        let mut p = sample();
        p.decode.pop();
        assert!(p.check().unwrap_err().contains("grid"));
        let mut p = sample();
        p.decode[0].itl_ms = f64::NAN;
        assert!(p.check().is_err());
        let mut p = sample();
        p.version = 9;
        assert!(p.check().unwrap_err().contains("version"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
