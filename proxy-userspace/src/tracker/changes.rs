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
    /// One service's part: whether its internal and its external frontends find no
    /// endpoint here under a Local policy.
    pub(super) fn of(output: &ServiceOutput) -> NoLocalEndpoints {
        let without = |external: bool| {
            usize::from(output.claims.iter().any(|(_, frontend)| {
                frontend.external == external
                    && frontend.local_only
                    && frontend.endpoints.is_empty()
            }))
        };
        NoLocalEndpoints {
            internal: without(false),
            external: without(true),
        }
    }

    /// Kept up to date as services are re-translated, so that a sync never walks
    /// every service for it.
    pub(super) fn add(&mut self, part: NoLocalEndpoints) {
        self.internal += part.internal;
        self.external += part.external;
    }

    pub(super) fn remove(&mut self, part: NoLocalEndpoints) {
        self.internal -= part.internal;
        self.external -= part.external;
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
