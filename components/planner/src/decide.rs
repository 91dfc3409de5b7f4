//! The replica decision: from the predicted load and a worker's capacity profile, the
//! replicas per pool that meet the latency targets, then the policy (min/max, budget,
//! cooldown) that turns it into what to run.
//!
//! The model (per interval, `rate` requests a second of `isl` input tokens, `cached` of them
//! found cached, and `osl` output tokens):
//! - **Prefill.** One worker computes a prompt's uncached tokens in `t_p = ttft(isl x (1 -
//!   cached))` (the profile's time to first token on an idle worker). Requests queue for it;
//!   keeping a worker's prefill utilization at `rho <= 1 - t_p / ttft_target` keeps the
//!   queueing delay within the target (an M/M/1 bound: the response time is `t_p / (1 - rho)`).
//!   The prefill work is `rate x t_p` worker-seconds a second, so `rate x t_p / rho` workers.
//!   If `t_p` alone exceeds the target, no replica count meets it: the decision says so.
//! - **Decode.** At a context of `isl + osl / 2` the profile gives the largest batch `b`
//!   whose ITL meets the target; one worker then makes `b / itl(b)` tokens a second, and the
//!   load needs `rate x osl` a second: `rate x osl x itl(b) / b` workers.
//! - **Aggregated** workers do both: the sum (time shared). **Disaggregated** pools: each
//!   its own.
//! - **Backlog** (the load-based correction): requests waiting in the engines' queues now
//!   need `waiting x (t_p + osl x itl(b) / b)` worker-seconds; cleared within one interval,
//!   that adds its share of workers.
//!
//! Policy: scale up at once; scale down only after `down_after` intervals in a row that all
//! wanted fewer (then to the largest of them: never below what any of them wanted), so it
//! never oscillates; clamp to each pool's min and max, then to the budget (pools cut in
//! proportion).

use serde::{Deserialize, Serialize};

use crate::profile::Profile;

/// The latency targets, milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Targets {
    pub ttft_ms: f64,
    pub itl_ms: f64,
}

/// One interval's load, observed or predicted (the figures a decision publishes).
pub use dynamo_protocols::planner::LoadFigures as Load;

/// Fractional workers each kind of work needs (before rounding and policy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Need {
    /// Prefill workers and decode workers, each pool on its own (disaggregated).
    pub prefill: f64,
    pub decode: f64,
    /// Workers that do both (aggregated): more than the sum, because a prefill step also
    /// delays every decoding sequence's next token.
    pub aggregated: f64,
    /// Clearing the backlog within one interval.
    pub backlog: f64,
}

/// Why no replica count meets a target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum Unmeetable {
    #[error("TTFT target {target_ms} ms is below a prompt's {idle_ms:.1} ms on an idle worker")]
    Ttft { target_ms: f64, idle_ms: f64 },
    #[error("ITL target {target_ms} ms is below one sequence's {single_ms:.1} ms at context {context:.0}")]
    Itl {
        target_ms: f64,
        single_ms: f64,
        context: f64,
    },
}

/// The workers `load` needs under `targets` by `profile` (see the module).
pub fn need(
    profile: &Profile,
    targets: Targets,
    load: Load,
    interval_s: f64,
) -> Result<Need, Unmeetable> {
    let uncached = load.isl * (1.0 - load.cached.clamp(0.0, 1.0));
    let t_p = profile.ttft_ms(uncached.max(1.0)) / 1e3;
    let target = targets.ttft_ms / 1e3;
    if t_p >= target {
        return Err(Unmeetable::Ttft {
            target_ms: targets.ttft_ms,
            idle_ms: t_p * 1e3,
        });
    }
    let rho = 1.0 - t_p / target;
    let context = load.isl + load.osl / 2.0;
    let b = profile
        .max_batch(context, targets.itl_ms)
        .ok_or(Unmeetable::Itl {
            target_ms: targets.itl_ms,
            single_ms: profile.itl_ms(1.0, context),
            context,
        })?;
    let per_token = profile.itl_ms(b, context) / 1e3 / b;
    let work = t_p + load.osl * per_token;
    let prefill = load.rate * t_p / rho;
    let decode = load.rate * load.osl * per_token;
    Ok(Need {
        prefill,
        decode,
        aggregated: aggregated(
            profile,
            targets,
            load,
            t_p,
            rho,
            context,
            prefill.max(decode),
        ),
        backlog: load.waiting * work / interval_s.max(1e-3),
    })
}

/// The fewest aggregated workers (fractional) that hold both targets. With `n` workers each
/// spends `rho = rate x t_p / n` of its time in prefill (kept within the TTFT bound `rho_max`)
/// and decodes `b = rate x osl x itl_target / n` sequences at once (Little's law at the
/// target ITL); a prefill step delays the decoding sequences too, so their ITL is
/// `itl(b) / (1 - rho)`, which must stay within the target. Both fall as `n` grows.
fn aggregated(
    profile: &Profile,
    targets: Targets,
    load: Load,
    t_p: f64,
    rho_max: f64,
    context: f64,
    at_least: f64,
) -> f64 {
    if load.rate <= 0.0 {
        return 0.0;
    }
    let itl_target = targets.itl_ms / 1e3;
    let holds = |n: f64| {
        let rho = load.rate * t_p / n;
        let b = (load.rate * load.osl * itl_target / n).max(1.0);
        rho <= rho_max && rho < 1.0 && profile.itl_ms(b, context) / 1e3 / (1.0 - rho) <= itl_target
    };
    let mut hi = at_least.max(1e-6);
    let mut grown = 0;
    while !holds(hi) {
        hi *= 2.0;
        grown += 1;
        if grown > 60 {
            return hi;
        }
    }
    let mut lo = hi / 2.0;
    if grown == 0 {
        lo = at_least.max(1e-9) * 0.999;
        if holds(lo) {
            return lo;
        }
    }
    for _ in 0..50 {
        let mid = (lo + hi) / 2.0;
        if holds(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// A pool shrinks only to a count that holds the predicted load with this share to spare.
pub const DOWN_MARGIN: f64 = 0.1;

/// A pool's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub min: u32,
    pub max: u32,
}

/// What the planner runs: aggregated workers, or prefill and decode pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pools {
    Aggregated,
    Disaggregated,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicySettings {
    pub pools: Pools,
    /// Aggregated workers, or the decode pool.
    pub main: Limits,
    /// The prefill pool (disaggregated).
    pub prefill: Limits,
    /// Most workers in all pools together.
    pub budget: u32,
    /// Intervals in a row that must want fewer workers before a pool shrinks.
    pub down_after: u32,
}

/// Replicas per pool (`prefill` 0 when aggregated).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replicas {
    pub main: u32,
    pub prefill: u32,
}

/// The policy's memory: the intervals in a row that wanted fewer, and what they wanted.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    lower: Vec<Replicas>,
}

/// One decision: the replicas to run and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decided {
    pub replicas: Replicas,
    /// What the load alone asked for, before the policy.
    pub wanted: Replicas,
    pub reason: String,
    /// A target no replica count meets: run at max and alert.
    pub unmeetable: Option<Unmeetable>,
}

impl Policy {
    /// Decides from `need` (or an unmeetable target) with `current` replicas running.
    pub fn decide(
        &mut self,
        s: &PolicySettings,
        need: Result<Need, Unmeetable>,
        current: Replicas,
    ) -> Decided {
        // What the load asks for, and the same with the scale-down margin: a pool shrinks only
        // to a count that holds the load with DOWN_MARGIN to spare, so a load near a boundary
        // does not flip it back and forth.
        let (wanted, relaxed, unmeetable) = match need {
            Ok(n) => {
                let (main, prefill) = match s.pools {
                    Pools::Aggregated => (n.aggregated + n.backlog, 0.0),
                    Pools::Disaggregated => {
                        // The backlog is split by the share of each kind of work.
                        let total = (n.prefill + n.decode).max(1e-9);
                        (
                            n.decode + n.backlog * n.decode / total,
                            n.prefill + n.backlog * n.prefill / total,
                        )
                    }
                };
                let at = |f: f64| Replicas {
                    main: (main * f - 1e-9).ceil().max(0.0) as u32,
                    prefill: (prefill * f - 1e-9).ceil().max(0.0) as u32,
                };
                (at(1.0), at(1.0 + DOWN_MARGIN), None)
            }
            Err(u) => {
                let max = Replicas {
                    main: s.main.max,
                    prefill: if s.pools == Pools::Disaggregated {
                        s.prefill.max
                    } else {
                        0
                    },
                };
                (max, max, Some(u))
            }
        };
        let clamp = |r: Replicas| {
            let main = r.main.clamp(s.main.min, s.main.max.max(s.main.min));
            let prefill = match s.pools {
                Pools::Aggregated => 0,
                Pools::Disaggregated => r
                    .prefill
                    .clamp(s.prefill.min, s.prefill.max.max(s.prefill.min)),
            };
            budget(s.budget, Replicas { main, prefill })
        };
        let target = clamp(wanted);
        let lower = clamp(relaxed);
        let mut reason;
        let mut next = current;
        // Each pool: up at once; down after `down_after` intervals that all wanted fewer.
        let up = target.main > current.main || target.prefill > current.prefill;
        let down = lower.main < current.main || lower.prefill < current.prefill;
        if up {
            self.lower.clear();
            next.main = next.main.max(target.main);
            next.prefill = next.prefill.max(target.prefill);
            reason = format!(
                "scale up: the predicted load needs {} worker(s){}",
                target.main,
                if s.pools == Pools::Disaggregated {
                    format!(" and {} prefill worker(s)", target.prefill)
                } else {
                    String::new()
                }
            );
        } else if down {
            self.lower.push(lower);
            if self.lower.len() as u32 >= s.down_after.max(1) {
                let most = self
                    .lower
                    .iter()
                    .fold(Replicas::default(), |a, r| Replicas {
                        main: a.main.max(r.main),
                        prefill: a.prefill.max(r.prefill),
                    });
                next = Replicas {
                    main: current.main.min(most.main),
                    prefill: current.prefill.min(most.prefill),
                };
                reason = format!(
                    "scale down: {} intervals in a row needed at most {} worker(s)",
                    self.lower.len(),
                    most.main
                );
                self.lower.clear();
            } else {
                reason = format!(
                    "hold: fewer workers wanted for {} of {} intervals",
                    self.lower.len(),
                    s.down_after
                );
            }
        } else {
            self.lower.clear();
            reason = "hold: the load fits the workers running".into();
        }
        // A pool below its min (e.g. at start) comes up to it whatever the cooldown.
        next = Replicas {
            main: next.main.max(s.main.min),
            prefill: match s.pools {
                Pools::Aggregated => 0,
                Pools::Disaggregated => next.prefill.max(s.prefill.min),
            },
        };
        next = budget(s.budget, next);
        if let Some(u) = &unmeetable {
            reason = format!("{u}: running at max");
        }
        Decided {
            replicas: next,
            wanted,
            reason,
            unmeetable,
        }
    }
}

/// Cuts pools over `budget` workers in total, in proportion (each keeps at least one).
fn budget(budget: u32, r: Replicas) -> Replicas {
    let total = r.main + r.prefill;
    if total <= budget || total == 0 {
        return r;
    }
    if r.prefill == 0 {
        return Replicas {
            main: budget.max(1),
            prefill: 0,
        };
    }
    let main = ((r.main as f64 * budget as f64 / total as f64).round() as u32)
        .clamp(1, budget.saturating_sub(1).max(1));
    Replicas {
        main,
        prefill: budget.saturating_sub(main).max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::sample;

    fn agg(min: u32, max: u32) -> PolicySettings {
        PolicySettings {
            pools: Pools::Aggregated,
            main: Limits { min, max },
            prefill: Limits { min: 0, max: 0 },
            budget: 1000,
            down_after: 3,
        }
    }

    const T: Targets = Targets {
        ttft_ms: 200.0,
        itl_ms: 20.0,
    };

    #[test]
    fn need_grows_with_load_and_follows_the_model() {
        let p = sample();
        let load = Load {
            rate: 10.0,
            isl: 1024.0,
            osl: 100.0,
            cached: 0.0,
            waiting: 0.0,
        };
        let n = need(&p, T, load, 1.0).unwrap();
        // t_p = 10 + 10.24 = 20.24 ms, rho = 1 - 20.24/200.
        let t_p = 0.02024;
        assert!(
            (n.prefill - 10.0 * t_p / (1.0 - t_p / 0.2)).abs() < 1e-9,
            "{n:?}"
        );
        let double = need(&p, T, Load { rate: 20.0, ..load }, 1.0).unwrap();
        assert!((double.prefill - 2.0 * n.prefill).abs() < 1e-9);
        assert!((double.decode - 2.0 * n.decode).abs() < 1e-9);
        // Cached input is not computed again.
        let cached = need(
            &p,
            T,
            Load {
                cached: 0.9,
                ..load
            },
            1.0,
        )
        .unwrap();
        assert!(cached.prefill < n.prefill);
        // A backlog adds workers.
        let queued = need(
            &p,
            T,
            Load {
                waiting: 50.0,
                ..load
            },
            1.0,
        )
        .unwrap();
        assert!(queued.backlog > 0.0 && n.backlog == 0.0);
        // Aggregated workers: at least what either kind of work needs alone, and the least
        // count whose decoding ITL (slowed by the prefill steps) holds the target.
        let busy = Load {
            rate: 200.0,
            ..load
        };
        let nb = need(&p, T, busy, 1.0).unwrap();
        assert!(nb.aggregated >= nb.prefill.max(nb.decode), "{nb:?}");
        let t_p = p.ttft_ms(1024.0) / 1e3;
        let context = 1024.0 + 50.0;
        let itl = |n: f64| {
            let rho = 200.0 * t_p / n;
            let b = (200.0 * 100.0 * 0.020 / n).max(1.0);
            p.itl_ms(b, context) / (1.0 - rho)
        };
        assert!(itl(nb.aggregated) <= 20.0 + 1e-6, "{}", itl(nb.aggregated));
        assert!(
            itl(nb.aggregated * 0.98) > 20.0
                || 200.0 * t_p / (nb.aggregated * 0.98) > 1.0 - t_p / 0.2,
            "the least such count"
        );
        assert_eq!(
            need(&p, T, Load { rate: 0.0, ..load }, 1.0)
                .unwrap()
                .aggregated,
            0.0
        );
        // Targets below the idle worker's figures cannot be met.
        let tight = Targets { ttft_ms: 5.0, ..T };
        assert!(matches!(
            need(&p, tight, load, 1.0),
            Err(Unmeetable::Ttft { .. })
        ));
        let tight = Targets { itl_ms: 5.0, ..T };
        assert!(matches!(
            need(&p, tight, load, 1.0),
            Err(Unmeetable::Itl { .. })
        ));
    }

    fn need_of(workers: f64) -> Result<Need, Unmeetable> {
        Ok(Need {
            prefill: workers / 2.0,
            decode: workers / 2.0,
            aggregated: workers,
            backlog: 0.0,
        })
    }

    #[test]
    fn up_at_once_down_after_the_cooldown_never_below_what_the_window_wanted() {
        let s = agg(1, 10);
        let mut p = Policy::default();
        let d = p.decide(
            &s,
            need_of(4.2),
            Replicas {
                main: 1,
                prefill: 0,
            },
        );
        assert_eq!(d.replicas.main, 5, "{}", d.reason);
        assert!(d.reason.starts_with("scale up"));
        let mut cur = d.replicas;
        // Load drops: two intervals hold, the third scales down to the most any wanted with
        // the margin (3 x 1.1 needs 4).
        for (i, w) in [2.0, 3.0, 1.0].into_iter().enumerate() {
            let d = p.decide(&s, need_of(w), cur);
            if i < 2 {
                assert_eq!(d.replicas, cur, "{}", d.reason);
                assert!(d.reason.starts_with("hold"));
            } else {
                assert_eq!(d.replicas.main, 4, "{}", d.reason);
            }
            cur = d.replicas;
        }
        // Within the margin of the count running: no scale-down however long it lasts.
        let mut p = Policy::default();
        let five = Replicas {
            main: 5,
            prefill: 0,
        };
        for _ in 0..10 {
            let d = p.decide(&s, need_of(4.6), five);
            assert_eq!(d.replicas, five, "{}", d.reason);
        }
        // A blip up in the middle of a quiet spell resets the count.
        let mut p = Policy::default();
        let cur = Replicas {
            main: 5,
            prefill: 0,
        };
        p.decide(&s, need_of(1.0), cur);
        p.decide(&s, need_of(1.0), cur);
        assert_eq!(p.decide(&s, need_of(5.0), cur).replicas.main, 5);
        assert_eq!(p.decide(&s, need_of(1.0), cur).replicas.main, 5);
        // Bounds: never below min, never above max.
        let mut p = Policy::default();
        assert_eq!(
            p.decide(&s, need_of(0.0), Replicas::default())
                .replicas
                .main,
            1
        );
        assert_eq!(p.decide(&s, need_of(50.0), cur).replicas.main, 10);
    }

    #[test]
    fn unmeetable_targets_run_at_max_and_say_so() {
        let s = agg(1, 8);
        let mut p = Policy::default();
        let d = p.decide(
            &s,
            Err(Unmeetable::Ttft {
                target_ms: 1.0,
                idle_ms: 10.0,
            }),
            Replicas {
                main: 2,
                prefill: 0,
            },
        );
        assert_eq!(d.replicas.main, 8);
        assert!(
            d.unmeetable.is_some() && d.reason.contains("running at max"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn disaggregated_pools_and_the_budget() {
        let s = PolicySettings {
            pools: Pools::Disaggregated,
            main: Limits { min: 1, max: 20 },
            prefill: Limits { min: 1, max: 20 },
            budget: 10,
            down_after: 2,
        };
        let mut p = Policy::default();
        let n = Ok(Need {
            prefill: 3.5,
            decode: 1.5,
            aggregated: 5.0,
            backlog: 0.0,
        });
        let d = p.decide(
            &s,
            n,
            Replicas {
                main: 1,
                prefill: 1,
            },
        );
        assert_eq!(
            d.replicas,
            Replicas {
                main: 2,
                prefill: 4
            }
        );
        // Over the budget: cut in proportion, both pools keep a worker.
        let n = Ok(Need {
            prefill: 15.0,
            decode: 5.0,
            aggregated: 20.0,
            backlog: 0.0,
        });
        let d = p.decide(&s, n, d.replicas);
        assert_eq!(d.replicas.main + d.replicas.prefill, 10);
        assert!(d.replicas.prefill > d.replicas.main, "{:?}", d.replicas);
    }
}
