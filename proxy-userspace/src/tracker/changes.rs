//! What the tracker counts for kube-proxy's metrics (`metrics::kube_proxy`): object
//! changes waiting for a sync, the EndpointSlices' trigger times (network
//! programming latency is measured from them), and the services whose Local traffic
//! policy finds no endpoint on this node.

use std::time::SystemTime;

use k8s_openapi::{api::discovery::v1::EndpointSlice, apimachinery::pkg::apis::meta::v1::Time};

use crate::translate::ServiceOutput;

/// Service and EndpointSlice changes: an object added, changed or removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObjectChanges {
    pub services: usize,
    pub slices: usize,
}

/// Services with a traffic policy `Local` whose endpoints are all on other nodes,
/// by the policy that found none (`internalTrafficPolicy`, `externalTrafficPolicy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoLocalEndpoints {
    pub internal: usize,
    pub external: usize,
}

impl NoLocalEndpoints {
    pub(super) fn count<'a>(outputs: impl Iterator<Item = &'a ServiceOutput>) -> NoLocalEndpoints {
        let mut count = NoLocalEndpoints::default();
        for output in outputs {
            let without = |external: bool| {
                output.claims.iter().any(|(_, frontend)| {
                    frontend.external == external
                        && frontend.local_only
                        && frontend.endpoints.is_empty()
                })
            };
            count.internal += usize::from(without(false));
            count.external += usize::from(without(true));
        }
        count
    }
}

/// Set by the EndpointSlice controller: when the change that led to this version of
/// the slice happened (a pod became ready, a service changed).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The slice's trigger time, if it has a readable one. Taken only from versions that
/// change what the tracker keeps (a version changing only annotations is no change).
pub(super) fn trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let text = slice
        .metadata
        .annotations
        .as_ref()?
        .get(TRIGGER_TIME_ANNOTATION)?;
    let time: Time = serde_json::from_value(serde_json::Value::String(text.clone())).ok()?;
    Some(time.0.into())
}
