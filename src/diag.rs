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
    let instances = runtime.discovery().list(&DiscoveryFilter::all()).await?;
    println!("instances in discovery: {}", instances.len());
    for i in &instances {
        println!("  {}  {}  {}", i.endpoint, i.instance, i.metadata);
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
