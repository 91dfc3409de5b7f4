//! Runtime diagnostics from the foundation: the echo role (`demo`, `serve-echo`, `call-echo`)
//! and `ls` (what discovery and the NATS service protocol show).

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use bytes::Bytes;
use dynamo_actors::echo::{EchoRole, ENDPOINT};
use dynamo_protocols::echo::{EchoChunk, EchoRequest};
use dynamo_runtime::bus::Headers;
use dynamo_runtime::subject::{service_query_subject, ComponentId, DiscoveryFilter, ServiceVerb};
use dynamo_runtime::{CallOptions, Runtime, Target};

pub async fn serve_echo(runtime: &Runtime, component: ComponentId) -> Result<()> {
    let instance = runtime.component(component, serde_json::json!({})).await?;
    let role = EchoRole::start(&instance).await?;
    let ep = role.served().endpoint().clone();
    dynamo_runtime::telemetry::mark_ready();
    println!("ready endpoint={ep} instance={}", instance.id());
    std::io::stdout().flush()?;
    let stop = runtime.shutdown_token();
    let signal = tokio::select! {
        s = dynamo_runtime::shutdown_signal() => s,
        _ = stop.cancelled() => "runtime shutdown",
    };
    let grace = runtime.settings().shutdown_grace;
    eprintln!("{signal}: draining open requests (up to {grace:?})");
    let report = role.shutdown(grace).await;
    eprintln!(
        "stopped: {} open at shutdown, {} cancelled",
        report.open_at_start, report.cancelled
    );
    Ok(())
}

pub async fn call_echo(
    runtime: &Runtime,
    component: &ComponentId,
    req: &EchoRequest,
    print: bool,
) -> Result<Vec<EchoChunk>> {
    let ep = component.endpoint(ENDPOINT)?;
    let mut stream = runtime
        .client()
        .call::<_, EchoChunk>(Target::Any(ep), req, CallOptions::default())
        .await?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if print {
            println!("  [{}] {}", chunk.index, chunk.text);
        }
        out.push(chunk);
    }
    Ok(out)
}

pub async fn demo(runtime: &Runtime, component: ComponentId, requests: u32) -> Result<()> {
    println!(
        "dynamo-run demo: runtime on the {} bus",
        runtime.bus().transport()
    );
    let instance = runtime
        .component(component.clone(), serde_json::json!({}))
        .await?;
    let role = EchoRole::start(&instance).await?;
    println!(
        "serving {} as instance {}",
        role.served().endpoint(),
        instance.id()
    );
    for i in 0..requests {
        let req = EchoRequest {
            text: format!("hello #{i} from the echo actor"),
            repeat: 3,
            delay_ms: 10,
        };
        let started = Instant::now();
        println!("request {i}: streaming {} chunks", req.repeat);
        let chunks = call_echo(runtime, &component, &req, true).await?;
        if chunks.len() != req.repeat as usize {
            bail!("expected {} chunks, got {}", req.repeat, chunks.len());
        }
        println!("request {i}: done in {:?}", started.elapsed());
    }
    ls(runtime).await?;
    let report = role.shutdown(Duration::from_secs(5)).await;
    println!(
        "shut down gracefully ({} requests open at shutdown)",
        report.open_at_start
    );
    Ok(())
}

pub async fn ls(runtime: &Runtime) -> Result<()> {
    use dynamo_protocols::kv::{LoadReport, LOAD_TOPIC};
    use dynamo_protocols::llm::ModelCard;
    let instances = runtime.discovery().list(&DiscoveryFilter::all()).await?;
    // Load reports come at least every second: listen for a little over one.
    let mut loads: std::collections::HashMap<String, LoadReport> = Default::default();
    let namespaces: std::collections::BTreeSet<String> = instances
        .iter()
        .map(|i| i.endpoint.component.namespace.to_string())
        .collect();
    for ns in namespaces {
        let ns = dynamo_runtime::subject::Namespace::new(&ns)?;
        let topic = dynamo_runtime::subject::Topic::new(LOAD_TOPIC)?;
        let mut sub = runtime
            .bus()
            .subscribe(ComponentId::namespace_event_pattern(&ns, &topic), None)
            .await?;
        let until = Instant::now() + Duration::from_millis(1200);
        while let Ok(Some(m)) = tokio::time::timeout_at(until.into(), sub.next()).await {
            if let Ok(l) = dynamo_runtime::serve::decode_event::<LoadReport>(&m.payload) {
                loads.insert(m.subject.last_token().to_string(), l);
            }
        }
    }
    println!("instances in discovery: {}", instances.len());
    for i in &instances {
        let card = i
            .metadata
            .get(ModelCard::METADATA_KEY)
            .and_then(|c| serde_json::from_value::<ModelCard>(c.clone()).ok());
        let model = card
            .map(|c| format!("  model={}", c.name))
            .unwrap_or_default();
        let load = loads
            .get(&i.instance.to_string())
            .filter(|_| !model.is_empty())
            .map(|l| {
                format!(
                    "  kv={}/{} running={} waiting={}",
                    l.active_blocks, l.total_blocks, l.running_requests, l.waiting_requests
                )
            })
            .unwrap_or_default();
        println!("  {}  {}{model}{load}", i.endpoint, i.instance);
    }
    let mut services = Vec::new();
    let bus = runtime.bus();
    match bus
        .request(
            service_query_subject(ServiceVerb::Info),
            Headers::new(),
            Bytes::new(),
            Duration::from_millis(500),
        )
        .await
    {
        Ok(mut replies) => {
            while let Ok(Some(m)) =
                tokio::time::timeout(Duration::from_millis(200), replies.next()).await
            {
                services.push(serde_json::from_slice::<serde_json::Value>(&m.payload)?);
            }
        }
        Err(dynamo_runtime::BusError::NoResponders { .. })
        | Err(dynamo_runtime::BusError::Timeout { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    println!("services answering $SRV.INFO: {}", services.len());
    for s in &services {
        let endpoints = s["endpoints"].as_array().cloned().unwrap_or_default();
        for e in endpoints {
            println!(
                "  {}  id={}  endpoint={}  subject={}",
                s["name"].as_str().unwrap_or("?"),
                s["id"].as_str().unwrap_or("?"),
                e["name"].as_str().unwrap_or("?"),
                e["subject"].as_str().unwrap_or("?"),
            );
        }
    }
    Ok(())
}

fn short(h: u64) -> String {
    format!("{:08x}", h >> 32)
}

/// The steps between two of a worker's load reports: count, mean batch and step time, tokens.
fn step_line(
    now: &dynamo_protocols::kv::StepCounters,
    was: &dynamo_protocols::kv::StepCounters,
) -> String {
    // A restarted engine counts from zero again.
    let was = if now.steps < was.steps {
        Default::default()
    } else {
        *was
    };
    let steps = now.steps - was.steps;
    if steps == 0 {
        return String::new();
    }
    format!(
        "; {steps} steps, batch {:.1}, step {:.2} ms, {} prefill + {} decode tokens",
        (now.batched - was.batched) as f64 / steps as f64,
        (now.busy_micros - was.busy_micros) as f64 / steps as f64 / 1e3,
        now.prefill_tokens - was.prefill_tokens,
        now.decode_tokens - was.decode_tokens
    )
}

/// `dynamo-run watch events|load|stats`: tails KV events, load reports or frontend statistics
/// of every component in the namespace, one readable line each, until SIGINT/SIGTERM.
pub async fn watch(runtime: &Runtime, namespace: &str, what: &str) -> Result<()> {
    use dynamo_protocols::kv::{
        KvEventBatch, KvEventData, LoadReport, KV_EVENTS_TOPIC, LOAD_TOPIC,
    };
    use dynamo_protocols::stats::{FrontendStats, STATS_TOPIC};
    use dynamo_runtime::serve::decode_event;
    use dynamo_runtime::subject::{Namespace, Topic};
    let topic = match what {
        "events" => KV_EVENTS_TOPIC,
        "load" => LOAD_TOPIC,
        "stats" => STATS_TOPIC,
        "planner" => dynamo_protocols::planner::DECISIONS_TOPIC,
        other => bail!(
            "watch {other:?}: use `watch events` (KV events), `watch load` (workers' load and steps), `watch stats` (frontends' request statistics) or `watch planner` (the planners' decisions)"
        ),
    };
    // Each worker's last step counters: a load line shows the steps since its last report.
    let mut last_steps: std::collections::HashMap<String, dynamo_protocols::kv::StepCounters> =
        Default::default();
    let ns = Namespace::new(namespace)?;
    let pattern = ComponentId::namespace_event_pattern(&ns, &Topic::new(topic)?);
    let mut sub = runtime.bus().subscribe(pattern.clone(), None).await?;
    eprintln!(
        "watching {pattern} on the {} bus (Ctrl-C stops)",
        runtime.bus().transport()
    );
    let stop = runtime.shutdown_token();
    loop {
        let m = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => return Ok(()) },
            _ = dynamo_runtime::shutdown_signal() => return Ok(()),
            _ = stop.cancelled() => return Ok(()),
        };
        let tokens: Vec<&str> = m.subject.as_str().split('.').collect();
        let (component, instance) = (
            tokens.get(3).copied().unwrap_or("?"),
            m.subject.last_token(),
        );
        let now = chrono::Utc::now().format("%H:%M:%S%.3f");
        let mut out = std::io::stdout().lock();
        if topic == LOAD_TOPIC {
            match decode_event::<LoadReport>(&m.payload) {
                Ok(l) => {
                    let steps = l
                        .steps
                        .map(|c| {
                            let was = last_steps
                                .insert(instance.to_string(), c)
                                .unwrap_or_default();
                            step_line(&c, &was)
                        })
                        .unwrap_or_default();
                    writeln!(
                        out,
                        "{now} {component} {instance} load: kv {}/{} blocks, {} running, {} waiting, {} prefill tokens queued{steps}",
                        l.active_blocks, l.total_blocks, l.running_requests, l.waiting_requests, l.queued_prefill_tokens
                    )?
                }
                Err(e) => writeln!(
                    out,
                    "{now} {component} {instance} malformed load report: {e}"
                )?,
            }
            continue;
        }
        if topic == dynamo_protocols::planner::DECISIONS_TOPIC {
            match decode_event::<dynamo_protocols::planner::PlannerDecision>(&m.payload) {
                Ok(d) => writeln!(out, "{now} {component} {instance} {d}")?,
                Err(e) => writeln!(out, "{now} {component} {instance} malformed decision: {e}")?,
            }
            continue;
        }
        if topic == STATS_TOPIC {
            match decode_event::<FrontendStats>(&m.payload) {
                Ok(st) => {
                    write!(
                        out,
                        "{now} {component} {instance} stats over {} ms: {} in flight",
                        st.interval_ms, st.inflight
                    )?;
                    for (model, ms) in &st.models {
                        write!(
                            out,
                            "; {model}: {} requests ({} failed), {} in / {} out tokens, {:.0}% cached, TTFT p50 {:.1} p99 {:.1} ms, ITL p50 {:.1} p99 {:.1} ms",
                            ms.requests,
                            ms.errors,
                            ms.input_tokens,
                            ms.output_tokens,
                            100.0 * ms.cached_ratio(),
                            ms.ttft_ms.p50,
                            ms.ttft_ms.p99,
                            ms.itl_ms.p50,
                            ms.itl_ms.p99
                        )?;
                    }
                    writeln!(out)?;
                }
                Err(e) => writeln!(
                    out,
                    "{now} {component} {instance} malformed statistics: {e}"
                )?,
            }
            continue;
        }
        match decode_event::<KvEventBatch>(&m.payload) {
            Ok(batch) => {
                for e in batch.events {
                    let tier = format!("{:?}", e.tier).to_lowercase();
                    let what = match &e.data {
                        KvEventData::Stored {
                            parent_hash,
                            blocks,
                        } => format!(
                            "stored {} block(s) {}..{} after {}",
                            blocks.len(),
                            blocks
                                .first()
                                .map(|b| short(b.block_hash.0))
                                .unwrap_or_default(),
                            blocks
                                .last()
                                .map(|b| short(b.block_hash.0))
                                .unwrap_or_default(),
                            parent_hash
                                .map(|p| short(p.0))
                                .unwrap_or_else(|| "root".into())
                        ),
                        KvEventData::Removed { block_hashes } => format!(
                            "removed {} block(s) {}",
                            block_hashes.len(),
                            block_hashes
                                .iter()
                                .take(4)
                                .map(|h| short(h.0))
                                .collect::<Vec<_>>()
                                .join(" ")
                        ),
                        KvEventData::Cleared => "cleared".to_string(),
                    };
                    writeln!(
                        out,
                        "{now} {component} {instance} #{} [{tier}] {what}",
                        e.event_id
                    )?;
                }
            }
            Err(e) => writeln!(
                out,
                "{now} {component} {instance} malformed KV event batch: {e}"
            )?,
        }
        out.flush()?;
    }
}
