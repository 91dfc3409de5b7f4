//! The NATS service ("micro") protocol: `$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`, each also with
//! `.{service}` and `.{service}.{id}`, answered with the JSON documents of schema
//! `io.nats.micro.v1.*`, so `nats micro ls/info/stats` list every component instance.
//!
//! Written over [`Bus`] rather than with `async_nats::service` on purpose: that API binds to a
//! NATS client and answers each request with exactly one message, while our endpoints stream
//! many frames and must be listable on the embedded bus too (`dynamo-run ls` works the same on
//! both). The protocol is three small JSON documents; the counters are the endpoint's own.
//!
//! One instance of a component is one service: name `{namespace}-{component}`, id = the
//! instance id in hex; its endpoints are the ones it serves (subject = the load-balanced one,
//! queue group = the endpoint's).

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock, Weak};
use std::time::SystemTime;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};

use super::EndpointShared;
use crate::bus::{Bus, BusError, Message, Outgoing};
use crate::subject::{service_protocol_subjects, ComponentId, EndpointId, InstanceId, ServiceVerb};

/// The version every service reports: this crate's.
const VERSION: &str = env!("CARGO_PKG_VERSION");

pub(crate) struct ServiceResponder {
    name: String,
    id: String,
    metadata: Value,
    started: SystemTime,
    endpoints: RwLock<Vec<Arc<EndpointShared>>>,
    task: tokio::task::AbortHandle,
}

impl Drop for ServiceResponder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ServiceResponder {
    pub async fn start(
        bus: Arc<dyn Bus>,
        component: &ComponentId,
        id: InstanceId,
        extra: Value,
    ) -> Result<Arc<Self>, BusError> {
        let name = component.service_name();
        let id_hex = id.to_string();
        let mut subs = Vec::new();
        for (verb, subject) in service_protocol_subjects(&name, &id_hex) {
            let sub = bus.subscribe(subject.into(), None).await?;
            subs.push(sub.map(move |m| (verb, m)));
        }
        let mut metadata = json!({
            "namespace": component.namespace.as_str(),
            "component": component.component.as_str(),
            "instance_id": id_hex,
        });
        if let (Some(m), Value::Object(extra)) = (metadata.as_object_mut(), extra) {
            for (k, v) in extra {
                // The protocol's metadata is a map of strings.
                let v = match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                m.insert(k, Value::String(v));
            }
        }
        let responder = Arc::new_cyclic(|weak: &Weak<ServiceResponder>| {
            let weak = weak.clone();
            let bus = bus.clone();
            let mut merged = futures::stream::select_all(subs);
            let task = tokio::spawn(async move {
                while let Some((verb, msg)) = merged.next().await {
                    let Some(me) = weak.upgrade() else { break };
                    me.answer(&bus, verb, msg).await;
                }
            });
            ServiceResponder {
                name,
                id: id_hex,
                metadata,
                started: SystemTime::now(),
                endpoints: RwLock::new(Vec::new()),
                task: task.abort_handle(),
            }
        });
        Ok(responder)
    }

    /// Adds an endpoint; false if one with that name is already there.
    pub fn add_endpoint(&self, ep: Arc<EndpointShared>) -> bool {
        let mut eps = self.endpoints.write().unwrap_or_else(|p| p.into_inner());
        if eps.iter().any(|e| e.endpoint == ep.endpoint) {
            return false;
        }
        eps.push(ep);
        true
    }

    pub fn remove_endpoint(&self, ep: &EndpointId) {
        self.endpoints
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|e| e.endpoint != *ep);
    }

    async fn answer(&self, bus: &Arc<dyn Bus>, verb: ServiceVerb, msg: Message) {
        let Some(reply) = msg.reply else { return };
        let doc = self.document(verb);
        let payload = Bytes::from(doc.to_string());
        if let Err(e) = bus.publish(Outgoing::new(reply, payload)).await {
            tracing::debug!(error = %e, "could not answer a service-protocol request");
        }
    }

    fn document(&self, verb: ServiceVerb) -> Value {
        let mut doc = json!({
            "name": self.name,
            "id": self.id,
            "version": VERSION,
            "metadata": self.metadata,
        });
        let eps = self.endpoints.read().unwrap_or_else(|p| p.into_inner());
        let (kind, extra) = match verb {
            ServiceVerb::Ping => ("io.nats.micro.v1.ping_response", json!({})),
            ServiceVerb::Info => (
                "io.nats.micro.v1.info_response",
                json!({
                    "description": format!("dynamo component {}", self.name),
                    "endpoints": eps.iter().map(|e| json!({
                        "name": e.endpoint.endpoint.as_str(),
                        "subject": e.endpoint.subject().as_str(),
                        "queue_group": e.endpoint.queue_group().as_str(),
                        "metadata": {
                            "instance_subject": e.endpoint.instance_subject(e.instance).as_str(),
                        },
                    })).collect::<Vec<_>>(),
                }),
            ),
            ServiceVerb::Stats => (
                "io.nats.micro.v1.stats_response",
                json!({
                    "started": humantime::format_rfc3339_nanos(self.started).to_string(),
                    "endpoints": eps.iter().map(|e| {
                        let s = &e.stats;
                        let requests = s.requests.load(Ordering::Relaxed);
                        let ns = s.processing_ns.load(Ordering::Relaxed);
                        json!({
                            "name": e.endpoint.endpoint.as_str(),
                            "subject": e.endpoint.subject().as_str(),
                            "queue_group": e.endpoint.queue_group().as_str(),
                            "num_requests": requests,
                            "num_errors": s.errors.load(Ordering::Relaxed),
                            "last_error": *s.last_error.lock().unwrap_or_else(|p| p.into_inner()),
                            "processing_time": ns,
                            "average_processing_time": ns.checked_div(requests).unwrap_or(0),
                            "data": null,
                        })
                    }).collect::<Vec<_>>(),
                }),
            ),
        };
        if let (Some(d), Value::Object(extra)) = (doc.as_object_mut(), extra) {
            d.insert("type".into(), Value::String(kind.into()));
            d.extend(extra);
        }
        doc
    }
}
