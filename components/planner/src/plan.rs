//! The planner's interval loop without a bus or a clock: it takes what the frontends and the
//! pools' workers publish ([`Planner::observe_frontend`], [`Planner::observe_load`]), and
//! each interval ([`Planner::tick`]) turns the interval's figures into a prediction, the
//! replicas the profile says that load needs, and the policy's decision. The planner role
//! feeds it from the bus in real time; the simulator feeds it in virtual time.

use std::collections::HashMap;

use dynamo_protocols::kv::LoadReport;
use dynamo_protocols::planner::Latencies;
use dynamo_protocols::stats::FrontendStats;
use serde::{Deserialize, Serialize};

use crate::decide::{
    need, Decided, Load, Need, Policy, PolicySettings, Replicas, Targets, Unmeetable,
};
use crate::predict::{Predictor, PredictorKind};
use crate::profile::Profile;

/// What a planner plans for, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannerConfig {
    /// The model whose requests it watches (the pools serve it).
    pub model: String,
    pub targets: Targets,
    /// Seconds between decisions.
    pub interval_s: f64,
    pub predictor: PredictorKind,
    pub policy: PolicySettings,
    /// Intervals without frontend statistics after which the planner holds and warns.
    pub stale_after: u32,
}

/// Which pool a worker's load report belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolRole {
    /// Aggregated workers, or the decode pool.
    Main,
    Prefill,
}

/// One interval's outcome.
#[derive(Debug, Clone)]
pub struct Step {
    /// Interval number, from 1.
    pub interval: u64,
    pub observed: Load,
    pub predicted: Load,
    pub latency: Latencies,
    pub need: Result<Need, Unmeetable>,
    pub decided: Decided,
    /// Intervals in a row without frontend statistics (the decision held when at or past
    /// `stale_after`).
    pub stale: u32,
}

/// The interval's sums over the frontends' messages.
#[derive(Default)]
struct Acc {
    messages: u32,
    ended: u64,
    ok: u64,
    first_tokens: u64,
    input: u64,
    output: u64,
    cached: u64,
    ttft_n: u64,
    ttft_p50: f64,
    ttft_p99: f64,
    itl_n: u64,
    itl_p50: f64,
    itl_p99: f64,
}

struct WorkerLoad {
    waiting: u64,
    /// The interval its last report arrived in.
    seen: u64,
}

/// The planner's state across intervals (see the module).
pub struct Planner {
    cfg: PlannerConfig,
    profile: Profile,
    policy: Policy,
    rate: Predictor,
    isl: Predictor,
    osl: Predictor,
    cached: Predictor,
    acc: Acc,
    workers: HashMap<(PoolRole, u64), WorkerLoad>,
    interval: u64,
    silent: u32,
    ever_heard: bool,
}

/// A worker whose last report is older than this many intervals no longer counts.
const WORKER_STALE_INTERVALS: u64 = 3;

impl Planner {
    pub fn new(cfg: PlannerConfig, profile: Profile) -> Self {
        let p = cfg.predictor;
        Self {
            profile,
            policy: Policy::default(),
            rate: p.build(),
            isl: p.build(),
            osl: p.build(),
            cached: PredictorKind::MovingAverage { window: 3 }.build(),
            acc: Acc::default(),
            workers: HashMap::new(),
            interval: 0,
            silent: 0,
            ever_heard: false,
            cfg,
        }
    }

    pub fn config(&self) -> &PlannerConfig {
        &self.cfg
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// One frontend's statistics message (other models' figures are ignored).
    pub fn observe_frontend(&mut self, s: &FrontendStats) {
        let a = &mut self.acc;
        a.messages = a.messages.saturating_add(1);
        let Some(m) = s.models.get(&self.cfg.model) else {
            return;
        };
        // Saturating: many frontends' figures add up, and none may overflow the sum.
        a.ended = a.ended.saturating_add(m.requests);
        a.ok = a.ok.saturating_add(m.requests.saturating_sub(m.errors));
        a.first_tokens = a.first_tokens.saturating_add(m.ttft_ms.count);
        a.input = a.input.saturating_add(m.input_tokens);
        a.output = a.output.saturating_add(m.output_tokens);
        a.cached = a.cached.saturating_add(m.cached_tokens);
        // p50: the count-weighted mean of the frontends' medians; p99: the worst frontend's.
        if m.ttft_ms.count > 0 {
            a.ttft_p50 += m.ttft_ms.p50 * m.ttft_ms.count as f64;
            a.ttft_n = a.ttft_n.saturating_add(m.ttft_ms.count);
            a.ttft_p99 = a.ttft_p99.max(m.ttft_ms.p99);
        }
        if m.itl_ms.count > 0 {
            a.itl_p50 += m.itl_ms.p50 * m.itl_ms.count as f64;
            a.itl_n = a.itl_n.saturating_add(m.itl_ms.count);
            a.itl_p99 = a.itl_p99.max(m.itl_ms.p99);
        }
    }

    /// A worker's load report (its queue is the backlog correction).
    pub fn observe_load(&mut self, pool: PoolRole, worker: u64, r: &LoadReport) {
        self.workers.insert(
            (pool, worker),
            WorkerLoad {
                waiting: r.waiting_requests,
                seen: self.interval,
            },
        );
    }

    /// A worker left: its queue no longer counts.
    pub fn forget_worker(&mut self, worker: u64) {
        self.workers.retain(|(_, w), _| *w != worker);
    }

    /// Ends the interval (`elapsed_s` long) with `current` replicas running: the decision.
    pub fn tick(&mut self, elapsed_s: f64, current: Replicas) -> Step {
        self.interval += 1;
        let acc = std::mem::take(&mut self.acc);
        let elapsed = elapsed_s.max(1e-3);
        let now = self.interval;
        self.workers
            .retain(|_, w| now.saturating_sub(w.seen) <= WORKER_STALE_INTERVALS);
        let waiting = self
            .workers
            .values()
            .fold(0u64, |sum, w| sum.saturating_add(w.waiting));
        let observed = Load {
            // Requests that ended, or that started (first tokens) when more did: a burst
            // shows at once, not when its requests end.
            rate: acc.ended.max(acc.first_tokens) as f64 / elapsed,
            isl: if acc.ok > 0 {
                acc.input as f64 / acc.ok as f64
            } else {
                self.isl.predict()
            },
            osl: if acc.ok > 0 {
                acc.output as f64 / acc.ok as f64
            } else {
                self.osl.predict()
            },
            cached: if acc.input > 0 {
                acc.cached as f64 / acc.input as f64
            } else {
                self.cached.predict()
            },
            waiting: waiting as f64,
        };
        let latency = Latencies {
            ttft_p50: if acc.ttft_n > 0 {
                acc.ttft_p50 / acc.ttft_n as f64
            } else {
                0.0
            },
            ttft_p99: acc.ttft_p99,
            itl_p50: if acc.itl_n > 0 {
                acc.itl_p50 / acc.itl_n as f64
            } else {
                0.0
            },
            itl_p99: acc.itl_p99,
        };
        if acc.messages == 0 {
            self.silent += 1;
        } else {
            self.silent = 0;
            self.ever_heard = true;
            self.rate.observe(observed.rate);
            if acc.ok > 0 {
                self.isl.observe(observed.isl);
                self.osl.observe(observed.osl);
            }
            if acc.input > 0 {
                self.cached.observe(observed.cached);
            }
        }
        let predicted = Load {
            rate: self.rate.predict(),
            isl: self.isl.predict(),
            osl: self.osl.predict(),
            cached: self.cached.predict(),
            waiting: observed.waiting,
        };
        let need = need(
            &self.profile,
            self.cfg.targets,
            predicted,
            self.cfg.interval_s,
        );
        let stale = !self.ever_heard || self.silent >= self.cfg.stale_after.max(1);
        let decided = if stale {
            // No signal: keep what runs (within the pools' bounds).
            let s = &self.cfg.policy;
            let held = Replicas {
                main: current.main.clamp(s.main.min, s.main.max.max(s.main.min)),
                prefill: match s.pools {
                    crate::decide::Pools::Aggregated => 0,
                    crate::decide::Pools::Disaggregated => current
                        .prefill
                        .clamp(s.prefill.min, s.prefill.max.max(s.prefill.min)),
                },
            };
            Decided {
                replicas: held,
                wanted: held,
                reason: if self.ever_heard {
                    format!(
                        "hold: no frontend statistics for {} intervals (are the frontends running and publishing?)",
                        self.silent
                    )
                } else {
                    "hold: waiting for the first frontend statistics".into()
                },
                unmeetable: None,
            }
        } else {
            self.policy.decide(&self.cfg.policy, need.clone(), current)
        };
        Step {
            interval: self.interval,
            observed,
            predicted,
            latency,
            need,
            decided,
            stale: self.silent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{Limits, Pools};
    use crate::profile::sample;
    use dynamo_protocols::stats::{ModelStats, Percentiles};

    fn planner(stale_after: u32) -> Planner {
        Planner::new(
            PlannerConfig {
                model: "m".into(),
                targets: Targets {
                    ttft_ms: 200.0,
                    itl_ms: 20.0,
                },
                interval_s: 1.0,
                predictor: PredictorKind::Constant,
                policy: PolicySettings {
                    pools: Pools::Aggregated,
                    main: Limits { min: 1, max: 50 },
                    prefill: Limits { min: 0, max: 0 },
                    budget: 100,
                    down_after: 2,
                },
                stale_after,
            },
            sample(),
        )
    }

    /// `requests` requests of 1024 input and 100 output tokens ended in a 1 s interval.
    fn stats(model: &str, requests: u64) -> FrontendStats {
        let mut s = FrontendStats {
            interval_ms: 1000,
            ..Default::default()
        };
        s.models.insert(
            model.into(),
            ModelStats {
                requests,
                input_tokens: requests * 1024,
                output_tokens: requests * 100,
                ttft_ms: Percentiles {
                    count: requests,
                    p50: 30.0,
                    p99: 90.0,
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        s
    }

    fn one(r: u32) -> Replicas {
        Replicas {
            main: r,
            prefill: 0,
        }
    }

    /// The interval's requests become the rate the decision is sized for; two frontends add
    /// up; another model's requests do not count; waiting requests add workers.
    #[test]
    fn an_interval_of_statistics_sizes_the_pool() {
        let mut p = planner(3);
        p.observe_frontend(&stats("m", 50));
        p.observe_frontend(&stats("m", 50));
        p.observe_frontend(&stats("other", 10_000));
        let s = p.tick(1.0, one(1));
        assert_eq!(s.observed.rate, 100.0);
        assert_eq!((s.observed.isl, s.observed.osl), (1024.0, 100.0));
        assert_eq!(s.latency.ttft_p50, 30.0);
        assert_eq!(s.latency.ttft_p99, 90.0);
        let n = s.need.clone().unwrap();
        let wanted = n.aggregated.ceil() as u32;
        assert!(wanted > 1, "{n:?}");
        assert_eq!(s.decided.replicas, one(wanted), "{}", s.decided.reason);
        // Same load plus a queue: more workers.
        p.observe_frontend(&stats("m", 100));
        let report = LoadReport {
            waiting_requests: 200,
            ..Default::default()
        };
        p.observe_load(PoolRole::Main, 7, &report);
        let s2 = p.tick(1.0, s.decided.replicas);
        assert_eq!(s2.observed.waiting, 200.0);
        assert!(s2.decided.replicas.main > wanted, "{:?}", s2.decided);
        // The worker leaves: its queue no longer counts.
        p.forget_worker(7);
        p.observe_frontend(&stats("m", 100));
        assert_eq!(p.tick(1.0, s2.decided.replicas).observed.waiting, 0.0);
    }

    /// Before any statistics and after they stop, the planner holds what runs (at least the
    /// minimum) and says why; when they come back it decides again.
    #[test]
    fn silence_holds_the_last_decision() {
        let mut p = planner(2);
        let s = p.tick(1.0, one(0));
        assert_eq!(s.decided.replicas, one(1), "brought up to min");
        assert!(
            s.decided.reason.contains("waiting for the first"),
            "{}",
            s.decided.reason
        );
        p.observe_frontend(&stats("m", 100));
        let busy = p.tick(1.0, one(1)).decided.replicas;
        assert!(busy.main > 1);
        // One silent interval: still deciding (the predictors keep the last load).
        let s = p.tick(1.0, busy);
        assert_eq!(s.stale, 1);
        // Two: hold, even though an idle cluster would scale down.
        for _ in 0..4 {
            let s = p.tick(1.0, busy);
            assert_eq!(s.decided.replicas, busy, "{}", s.decided.reason);
            assert!(s.decided.reason.contains("no frontend statistics"));
        }
        // Statistics again (idle): the cooldown then scales down.
        let mut r = busy;
        for _ in 0..3 {
            p.observe_frontend(&stats("m", 0));
            r = p.tick(1.0, r).decided.replicas;
        }
        assert_eq!(r, one(1));
    }
}
