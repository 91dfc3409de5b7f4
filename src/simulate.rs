//! `dynamo-run simulate`: the cluster in virtual time ([`dynamo_simulator`]): the KV router,
//! mocker workers (the real scheduler, block pool and timing model) and, with `--profile`,
//! the planner, driven by a Mooncake trace or a generated load curve. Prints a summary, and
//! writes the report as JSON (`--output-json`) and its timeline as SVG (`--plot`).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use dynamo_actors::router::KvRouterSettings;
use dynamo_engine::MockerSettings;
use dynamo_planner::Targets;
use dynamo_simulator::{trace, LoadCurve, PlannerSim, Shape, SimConfig, Stepping};

use crate::settings::{self, Settings};

#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    /// A Mooncake JSONL trace (as `dynamo-run bench --workload trace:FILE` sends it).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Or a generated load: steady:RATE, diurnal:MEAN,AMPLITUDE,PERIOD_S,
    /// step:BASE,FACTOR,AT_S,UNTIL_S, spikes:BASE,FACTOR,EVERY_S,WIDTH_S or
    /// bursty:BASE,FACTOR,TROUGH (base, then x FACTOR, then x TROUGH, then base: quarters).
    #[arg(long)]
    load: Option<String>,
    /// Seconds of generated load.
    #[arg(long, default_value_t = 600.0)]
    duration: f64,
    /// Generated requests: prompt and output tokens, shared prefixes (groups, blocks each).
    #[arg(long, default_value_t = 512)]
    isl: u32,
    #[arg(long, default_value_t = 64)]
    osl: u32,
    #[arg(long, default_value_t = 16)]
    groups: u32,
    #[arg(long, default_value_t = 4)]
    prefix_blocks: u32,
    /// Write the generated trace here (Mooncake JSONL), to replay it against a real cluster.
    #[arg(long)]
    write_trace: Option<PathBuf>,
    /// Workers at the start (without --profile: all the run, static provisioning):
    /// aggregated, or the decode pool with --prefill-workers or a planner's --prefill-pool.
    #[arg(long, default_value_t = 1)]
    workers: u32,
    /// Prefill workers at the start: a disaggregated deployment (the router's conditional
    /// disaggregation sends long uncached prompts to them; their KV crosses to the decode
    /// worker in the mocker's simulated transfer time). With --profile give --prefill-pool
    /// too, and the planner scales both pools.
    #[arg(long, default_value_t = 0)]
    prefill_workers: u32,
    /// Seconds from a scale-up decision to the new worker serving.
    #[arg(long, default_value_t = 10.0)]
    startup_s: f64,
    /// Time from a request's arrival to its engine (HTTP, the frontend, the bus): it joins an
    /// engine step only after that.
    #[arg(long, default_value_t = 0.0)]
    overhead_ms: f64,
    /// Disaggregated: time of one message between two workers over the bus (a remote
    /// prefill's request to the prefill worker, and its answer back; each crossing takes
    /// it). Half a request/reply round trip: about 0.1 ms over NATS, 0.004 in process.
    #[arg(long, default_value_t = 0.0)]
    hop_ms: f64,
    /// Model the real-time mocker's timer tick (tokio: 1 ms; a step's outputs are seen
    /// where the timer wakes the worker, within the tick after the step's end) to compare
    /// with a real-time mocker cluster; 0, the default, models exact step times (an engine
    /// on a GPU).
    #[arg(long, default_value_t = 0.0)]
    timer_ms: f64,
    /// How engine steps become events: `each` (every step one event: the reference),
    /// `report` (a decode-only stretch one event, cut where a load report is due) or `batch`
    /// (a stretch one event until the batch changes: the fastest).
    #[arg(long, value_enum, default_value_t = Stepping::Batch)]
    stepping: Stepping,
    /// Seconds per point of the timeline.
    #[arg(long, default_value_t = 10.0)]
    window_s: f64,
    /// The mocker workers' KV cache and scheduler (as `dynamo-run out=mocker` takes them).
    #[arg(long)]
    num_gpu_blocks: Option<usize>,
    #[arg(long)]
    block_size: Option<usize>,
    #[arg(long)]
    max_num_seqs: Option<usize>,
    #[arg(long)]
    max_num_batched_tokens: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    output_json: Option<PathBuf>,
    /// One JSON line per request (trace index, arrival, TTFT, end-to-end, cached tokens, the
    /// worker), as `dynamo-run bench --requests-jsonl` writes them for a real cluster: to
    /// compare the two request by request.
    #[arg(long)]
    requests_jsonl: Option<PathBuf>,
    /// Send each request to the worker another run served it on (a `--requests-jsonl` file of
    /// `dynamo-run bench` or `simulate`; workers are matched in order of first use) instead
    /// of the router's choice: to compare the two runs' timing with the same routing. Static
    /// workers only.
    #[arg(long)]
    route_from: Option<PathBuf>,
    /// An SVG of the timeline (load, workers, TTFT against its target).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// The planner (with --profile; targets are also what SLA attainment counts).
    #[command(flatten)]
    planner: crate::PlannerArgs,
    /// The KV router, as a frontend or `dynamo-run router` takes it (conditional
    /// disaggregation included).
    #[command(flatten)]
    router: crate::RouterArgs,
}

pub fn run(a: &SimulateArgs) -> Result<()> {
    let d = MockerSettings::default();
    let mocker = MockerSettings {
        num_gpu_blocks: a.num_gpu_blocks.unwrap_or(d.num_gpu_blocks),
        block_size: a.block_size.unwrap_or(d.block_size),
        max_num_seqs: a.max_num_seqs.unwrap_or(d.max_num_seqs),
        max_num_batched_tokens: a.max_num_batched_tokens.unwrap_or(d.max_num_batched_tokens),
        ..d
    };
    mocker
        .validate()
        .map_err(|e| anyhow::anyhow!("mocker settings: {e}"))?;
    for (flag, ms) in [
        ("--overhead-ms", a.overhead_ms),
        ("--hop-ms", a.hop_ms),
        ("--timer-ms", a.timer_ms),
    ] {
        if !(ms.is_finite() && ms >= 0.0) {
            bail!("{flag} must be a number of milliseconds, 0 or more (got {ms})");
        }
    }
    let trace = match (&a.trace, &a.load) {
        (Some(path), None) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading trace {}", path.display()))?;
            trace::parse_mooncake(&text, false, |_| {})
                .map_err(|e| anyhow::anyhow!("trace {}: {e}", path.display()))?
        }
        (None, Some(curve)) => {
            if !a.duration.is_finite() || a.duration <= 0.0 {
                bail!("--duration must be positive");
            }
            let curve = LoadCurve::parse(curve, a.duration).map_err(|e| anyhow::anyhow!("--load: {e}"))?;
            let shape = Shape {
                isl: a.isl.max(1),
                osl: a.osl.max(1),
                groups: a.groups.max(1),
                prefix_blocks: a.prefix_blocks,
                block_size: mocker.block_size as u32,
            };
            trace::generate(&curve, a.duration, &shape, a.seed)
        }
        _ => bail!("give a trace (--trace FILE.jsonl) or a load curve (--load steady:RATE ...), one of them"),
    };
    if trace.is_empty() {
        bail!("the trace has no requests");
    }
    if let Some(path) = &a.write_trace {
        std::fs::write(path, trace::to_jsonl(&trace))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!(
            "trace of {} requests written to {}",
            trace.len(),
            path.display()
        );
    }
    let s: Settings = a.planner.settings();
    if s.prefill_pool.is_some() && s.profile.is_none() {
        bail!("--prefill-pool names the pool a planner scales: give --profile too, or --prefill-workers N for a static prefill pool");
    }
    let target = |flag: &str, v: Option<f64>| -> Result<f64> {
        match v {
            Some(t) if t.is_finite() && t > 0.0 => Ok(t),
            _ => bail!("{flag}: a positive number of milliseconds (SLA attainment counts it)"),
        }
    };
    let targets = Targets {
        ttft_ms: target("--ttft-target-ms", s.ttft_target_ms)?,
        itl_ms: target("--itl-target-ms", s.itl_target_ms)?,
    };
    let planner = match &s.profile {
        Some(_) => {
            let (config, profile) = settings::planner_core(&s)?;
            if !a.startup_s.is_finite() || a.startup_s < 0.0 {
                bail!("--startup-s must be >= 0");
            }
            Some(PlannerSim {
                config,
                profile,
                startup_s: a.startup_s,
            })
        }
        None => None,
    };
    let model = planner
        .as_ref()
        .map(|p| p.config.model.clone())
        .or(s.model_name.clone())
        .unwrap_or_else(|| "tiny".into());
    let workers = match &planner {
        Some(p) => a.workers.max(p.config.policy.main.min),
        None => a.workers,
    };
    if workers == 0 {
        bail!("--workers: at least 1 without a planner");
    }
    let prefill_workers = match &planner {
        Some(p) if p.config.policy.pools == dynamo_planner::Pools::Disaggregated => {
            a.prefill_workers.max(p.config.policy.prefill.min).max(1)
        }
        Some(_) if a.prefill_workers > 0 => {
            bail!("--prefill-workers with --profile: give --prefill-pool NAME too, so the planner scales the prefill pool")
        }
        _ => a.prefill_workers,
    };
    let router = settings::router_settings(&a.router.settings())?;
    if router.peer_credit > 0.0 {
        bail!("--kv-peer-credit: the simulated workers do not fetch blocks from each other; leave it at 0");
    }
    let routes = match &a.route_from {
        Some(path) => {
            if planner.is_some() || prefill_workers > 0 {
                bail!("--route-from: static aggregated workers only (no --profile, no --prefill-workers)");
            }
            Some(routes_from(path, trace.len(), workers as usize)?)
        }
        None => None,
    };
    let cfg = SimConfig {
        model,
        mocker,
        router: KvRouterSettings {
            seed: Some(a.seed),
            ..router
        },
        workers,
        prefill_workers,
        planner,
        targets,
        window_s: a.window_s,
        overhead_ms: a.overhead_ms,
        hop_ms: a.hop_ms,
        seed: a.seed,
        timer_ms: a.timer_ms,
        stepping: a.stepping,
        record_requests: a.requests_jsonl.is_some(),
        // A second core applies the index's events (the same results).
        index_thread: std::thread::available_parallelism().map_or(1, |n| n.get()) > 1,
        routes,
    };
    let span = trace.last().map(|r| r.timestamp / 1e3).unwrap_or(0.0);
    eprintln!(
        "simulating {} requests over {span:.0} s on {} worker(s){}{}",
        trace.len(),
        workers,
        match prefill_workers {
            0 => String::new(),
            n => format!(" decoding and {n} prefilling"),
        },
        if cfg.planner.is_some() {
            " with the planner"
        } else {
            " (static)"
        }
    );
    let mut shown = 0.0;
    let report = dynamo_simulator::simulate(&cfg, &trace, |t, end| {
        // About every tenth of the trace.
        if t >= shown {
            shown = t + end / 10.0;
            eprint!("\r  simulated {t:.0} / {end:.0} s");
            let _ = std::io::stderr().flush();
        }
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!();
    println!(
        "{} requests ({} failed) over {:.0} simulated s in {:.1} s ({:.0}x real time), {} steps",
        report.requests,
        report.failed,
        report.simulated_s,
        report.wall_s,
        report.speed,
        report.steps
    );
    println!(
        " TTFT ms: p50 {:.1} p90 {:.1} p99 {:.1}; ITL ms: p50 {:.1} p90 {:.1} p99 {:.1}; cached {:.1}%",
        report.ttft_ms.p50,
        report.ttft_ms.p90,
        report.ttft_ms.p99,
        report.itl_ms.p50,
        report.itl_ms.p90,
        report.itl_ms.p99,
        report.cached_ratio * 100.0
    );
    println!(
        " SLA (TTFT <= {} ms, mean ITL <= {} ms): {:.1}% of requests; {:.0} worker-seconds, peak {} workers, {} scaling decisions",
        report.ttft_target_ms,
        report.itl_target_ms,
        report.attainment * 100.0,
        report.worker_seconds,
        report.peak_workers,
        report.decisions.len()
    );
    if prefill_workers > 0 {
        println!(
            " {} of {} prompts prefilled on prefill workers, their KV moved to the decode worker",
            report.remote_prefills, report.requests
        );
    }
    if let Some(path) = &a.output_json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.requests_jsonl {
        std::fs::write(path, trace::to_jsonl(&report.request_records))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.plot {
        let title = format!(
            "{} requests, {}: {:.1}% within targets, {:.0} worker-seconds",
            report.requests,
            if cfg.planner.is_some() {
                "planner"
            } else {
                "static"
            },
            report.attainment * 100.0,
            report.worker_seconds
        );
        std::fs::write(path, dynamo_simulator::plot::svg(&report, &title))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Each request's worker (from 0) in a requests JSONL file, by trace index: the file's worker
/// ids numbered in order of first use (by index). Requests it lacks, or whose worker it does
/// not name (0), are left to the router.
fn routes_from(path: &Path, requests: usize, workers: usize) -> Result<Vec<Option<usize>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--route-from: reading {}", path.display()))?;
    let mut records = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let r: dynamo_simulator::RequestRecord = serde_json::from_str(line).with_context(|| {
            format!(
                "--route-from {} line {}: not a request record (write one with --requests-jsonl)",
                path.display(),
                n + 1
            )
        })?;
        records.push(r);
    }
    records.sort_by_key(|r| r.index);
    let mut slots: HashMap<u64, usize> = HashMap::new();
    let mut routes = vec![None; requests];
    for r in records
        .iter()
        .filter(|r| r.worker != 0 && r.index < requests)
    {
        let next = slots.len();
        let slot = *slots.entry(r.worker).or_insert(next);
        routes[r.index] = Some(slot);
    }
    if slots.len() > workers {
        bail!(
            "--route-from {}: its requests ran on {} workers; give --workers {}",
            path.display(),
            slots.len(),
            slots.len()
        );
    }
    if slots.is_empty() {
        bail!(
            "--route-from {}: no request names its worker",
            path.display()
        );
    }
    Ok(routes)
}
