//! Predictors of the next interval's value of a load signal (request rate, input and output
//! lengths) from the intervals seen so far.

use serde::{Deserialize, Serialize};

/// Which predictor, and its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PredictorKind {
    /// The last interval's value.
    Constant,
    /// The mean of the last `window` intervals.
    MovingAverage { window: usize },
    /// Holt's linear trend (double exponential smoothing): the level plus the trend, one
    /// interval ahead. `alpha` smooths the level, `beta` the trend (both in (0, 1]).
    Holt { alpha: f64, beta: f64 },
}

impl Default for PredictorKind {
    fn default() -> Self {
        PredictorKind::Holt {
            alpha: 0.5,
            beta: 0.3,
        }
    }
}

impl PredictorKind {
    /// Why the parameters cannot work, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        match *self {
            PredictorKind::Constant => Ok(()),
            PredictorKind::MovingAverage { window } if window > 0 => Ok(()),
            PredictorKind::MovingAverage { .. } => {
                Err("a moving average needs a window of 1 or more".into())
            }
            PredictorKind::Holt { alpha, beta }
                if alpha > 0.0 && alpha <= 1.0 && beta > 0.0 && beta <= 1.0 =>
            {
                Ok(())
            }
            PredictorKind::Holt { .. } => Err("Holt's alpha and beta must be in (0, 1]".into()),
        }
    }

    pub fn build(&self) -> Predictor {
        Predictor {
            kind: *self,
            history: Vec::new(),
            level: 0.0,
            trend: 0.0,
        }
    }
}

/// One signal's predictor (see [`PredictorKind`]).
#[derive(Debug, Clone)]
pub struct Predictor {
    kind: PredictorKind,
    history: Vec<f64>,
    level: f64,
    trend: f64,
}

impl Predictor {
    pub fn observe(&mut self, v: f64) {
        let v = if v.is_finite() { v.max(0.0) } else { 0.0 };
        match self.kind {
            PredictorKind::Holt { alpha, beta } => match self.history.len() {
                0 => self.level = v,
                1 => {
                    self.trend = v - self.level;
                    self.level = v;
                }
                _ => {
                    let last = self.level;
                    self.level = alpha * v + (1.0 - alpha) * (self.level + self.trend);
                    self.trend = beta * (self.level - last) + (1.0 - beta) * self.trend;
                }
            },
            PredictorKind::Constant | PredictorKind::MovingAverage { .. } => {}
        }
        self.history.push(v);
        let keep = match self.kind {
            PredictorKind::MovingAverage { window } => window,
            _ => 2,
        };
        if self.history.len() > keep {
            let extra = self.history.len() - keep;
            self.history.drain(..extra);
        }
    }

    /// The next interval's value (0 before any observation; never negative).
    pub fn predict(&self) -> f64 {
        let p = match self.kind {
            PredictorKind::Constant => self.history.last().copied().unwrap_or(0.0),
            PredictorKind::MovingAverage { .. } => match self.history.len() {
                0 => 0.0,
                n => self.history.iter().sum::<f64>() / n as f64,
            },
            PredictorKind::Holt { .. } => self.level + self.trend,
        };
        p.max(0.0)
    }
}

impl std::str::FromStr for PredictorKind {
    type Err = String;

    /// `constant`, `moving-average[:WINDOW]` (default 5) or `holt[:ALPHA,BETA]` (default
    /// 0.5,0.3).
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, args) = s.split_once(':').unwrap_or((s, ""));
        let nums = |n: usize| -> Result<Vec<f64>, String> {
            let v: Vec<f64> = args
                .split(',')
                .map(|a| a.trim().parse::<f64>())
                .collect::<Result<_, _>>()
                .map_err(|_| format!("predictor {s:?}: {args:?} is not {n} number(s)"))?;
            if v.len() != n {
                return Err(format!("predictor {s:?}: expected {n} number(s) after ':'"));
            }
            Ok(v)
        };
        let k = match (name, args.is_empty()) {
            ("constant", true) => PredictorKind::Constant,
            ("moving-average", true) => PredictorKind::MovingAverage { window: 5 },
            ("moving-average", false) => {
                let w = nums(1)?[0];
                if w.fract() != 0.0 || w < 1.0 {
                    return Err(format!(
                        "predictor {s:?}: the window is a whole number >= 1"
                    ));
                }
                PredictorKind::MovingAverage { window: w as usize }
            }
            ("holt", true) => PredictorKind::default(),
            ("holt", false) => {
                let v = nums(2)?;
                PredictorKind::Holt {
                    alpha: v[0],
                    beta: v[1],
                }
            }
            _ => {
                return Err(format!(
                "predictor {s:?}: expected constant, moving-average[:WINDOW] or holt[:ALPHA,BETA]"
            ))
            }
        };
        k.check().map_err(|e| format!("predictor {s:?}: {e}"))?;
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_predictor_follows_its_rule() {
        let feed = |k: PredictorKind, xs: &[f64]| {
            let mut p = k.build();
            for &x in xs {
                p.observe(x);
            }
            p.predict()
        };
        assert_eq!(feed(PredictorKind::Constant, &[1.0, 5.0, 3.0]), 3.0);
        assert_eq!(
            feed(PredictorKind::MovingAverage { window: 2 }, &[1.0, 5.0, 3.0]),
            4.0
        );
        // A linear ramp: Holt follows it one interval ahead.
        let ramp: Vec<f64> = (0..20).map(|i| 10.0 + 2.0 * i as f64).collect();
        let h = feed(PredictorKind::default(), &ramp);
        assert!((h - 50.0).abs() < 0.5, "{h}");
        // A falling ramp never predicts below zero.
        let down: Vec<f64> = (0..10).map(|i| 9.0 - i as f64).collect();
        assert!(feed(PredictorKind::default(), &down) >= 0.0);
        assert_eq!(feed(PredictorKind::Constant, &[]), 0.0);
        assert_eq!("holt".parse(), Ok(PredictorKind::default()));
        assert_eq!(
            "moving-average:3".parse(),
            Ok(PredictorKind::MovingAverage { window: 3 })
        );
        assert_eq!(
            "holt:0.2,0.1".parse(),
            Ok(PredictorKind::Holt {
                alpha: 0.2,
                beta: 0.1
            })
        );
        for bad in [
            "",
            "arima",
            "holt:2,0.1",
            "moving-average:0",
            "moving-average:x",
        ] {
            assert!(bad.parse::<PredictorKind>().is_err(), "{bad}");
        }
        assert!(PredictorKind::MovingAverage { window: 0 }.check().is_err());
        assert!(PredictorKind::Holt {
            alpha: 0.0,
            beta: 0.5
        }
        .check()
        .is_err());
    }
}
