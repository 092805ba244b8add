//! Kubernetes Events for objects the agent cannot program, so that `kubectl describe`
//! on the Service or EndpointSlice shows why (the log and `ebpf_proxy_sync_problems`
//! say it too). Each distinct problem is reported once per agent run, from a
//! background task: the API server being slow or gone never delays a sync. Only
//! `create` is used (no patching of event series), which is all RBAC grants.

use std::collections::BTreeSet;

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    chrono::Utc,
};
use kube::{api::PostParams, Api, Client};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::model::{Problem, Severity};

/// The `reportingController` of our events.
pub const REPORTING_CONTROLLER: &str = "ebpf-proxy.io/agent";
/// Distinct problems remembered; beyond this, old ones may be reported again.
const REMEMBERED: usize = 10_000;

pub struct EventReporter {
    tx: mpsc::Sender<Event>,
    reported: BTreeSet<(String, String)>,
    instance: String,
}

impl EventReporter {
    pub fn spawn(client: Client, node_name: &str) -> EventReporter {
        let (tx, mut rx) = mpsc::channel::<Event>(256);
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let namespace = event.metadata.namespace.clone().unwrap_or_default();
                let api: Api<Event> = Api::namespaced(client.clone(), &namespace);
                match api.create(&PostParams::default(), &event).await {
                    Ok(_) => debug!(note = ?event.note, "event reported"),
                    Err(e) => warn!("reporting an event failed: {e}"),
                }
            }
        });
        EventReporter {
            tx,
            reported: BTreeSet::new(),
            instance: format!("ebpf-proxy-{node_name}"),
        }
    }

    /// Reports the problems that name a Service or EndpointSlice and were not
    /// reported before. Returns how many were queued.
    pub fn report(&mut self, problems: &[Problem]) -> usize {
        let mut queued = 0;
        for problem in problems {
            let Some(regarding) = regarding(&problem.object) else {
                continue;
            };
            let key = (problem.object.clone(), problem.message.clone());
            if self.reported.contains(&key) {
                continue;
            }
            if self.reported.len() >= REMEMBERED {
                self.reported.clear();
            }
            let event = self.event(problem, regarding);
            // A full queue means the API server is not keeping up: drop, log stays.
            if self.tx.try_send(event).is_ok() {
                self.reported.insert(key);
                queued += 1;
            }
        }
        queued
    }

    fn event(&self, problem: &Problem, regarding: ObjectReference) -> Event {
        let (type_, reason) = match problem.severity {
            Severity::Error => ("Warning", "NotProgrammed"),
            Severity::Warning => ("Normal", "ProgrammedWithWarning"),
        };
        Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", regarding.name.clone().unwrap_or_default())),
                namespace: regarding.namespace.clone(),
                ..Default::default()
            },
            event_time: Some(MicroTime(Utc::now())),
            action: Some("Program".into()),
            reason: Some(reason.into()),
            note: Some(truncate(&problem.message, 1024)),
            type_: Some(type_.into()),
            regarding: Some(regarding),
            reporting_controller: Some(REPORTING_CONTROLLER.into()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        }
    }
}

/// The object a problem names (`Service ns/name`, `EndpointSlice ns/name`); other
/// problems (frontends, map limits) have no object to attach an event to.
fn regarding(object: &str) -> Option<ObjectReference> {
    let (kind, api_version, rest) = match object.strip_prefix("Service ") {
        Some(rest) => ("Service", "v1", rest),
        None => (
            "EndpointSlice",
            "discovery.k8s.io/v1",
            object.strip_prefix("EndpointSlice ")?,
        ),
    };
    let (namespace, name) = rest.split_once('/')?;
    if name.contains(' ') || namespace.contains(' ') {
        return None;
    }
    Some(ObjectReference {
        kind: Some(kind.into()),
        api_version: Some(api_version.into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        ..Default::default()
    })
}

/// The API server limits an event's note to 1 kB.
fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

impl crate::source::ProblemReporter for EventReporter {
    fn report(&mut self, problems: &[Problem]) {
        EventReporter::report(self, problems);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_services_and_slices_are_regarded() {
        let service = regarding("Service ns/web").expect("service");
        assert_eq!(
            (
                service.kind.as_deref(),
                service.namespace.as_deref(),
                service.name.as_deref()
            ),
            (Some("Service"), Some("ns"), Some("web"))
        );
        assert!(regarding("EndpointSlice ns/web-abc").is_some());
        assert!(regarding("EndpointSlice for ns/web").is_none());
        assert!(regarding("document 3 of f.yaml").is_none());
        assert!(regarding("TCP 10.96.0.1:80 (ns/web:http)").is_none());
    }
}
