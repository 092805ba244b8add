//! A Service as the tracker keeps it between translations: only the fields the
//! translation reads, serialized. A parsed `Service` takes about 2 KB (every optional
//! field of the API type has room in the struct); this takes about 200 bytes, which is
//! what lets one agent hold 100,000 services in a few tens of MB. It is decoded again
//! only when its service is re-translated (its endpoints or the node's zone changed).

use k8s_openapi::{
    api::core::v1::{LoadBalancerStatus, Service, ServiceStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::{
    source::ObjectKey,
    translate::{ANNOTATION_PREFIX, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredService(Box<[u8]>);

impl StoredService {
    pub fn new(service: &Service) -> StoredService {
        let kept = trimmed(service);
        // A k8s-openapi object always serializes; an empty encoding would decode to an
        // error, reported as that service's problem.
        StoredService(
            serde_json::to_vec(&kept)
                .unwrap_or_default()
                .into_boxed_slice(),
        )
    }

    /// The Service again, named by its key.
    pub fn decode(&self, key: &ObjectKey) -> Result<Service, String> {
        let mut service: Service =
            serde_json::from_slice(&self.0).map_err(|e| format!("stored form unreadable: {e}"))?;
        service.metadata.namespace = Some(key.namespace().to_owned());
        service.metadata.name = Some(key.name().to_owned());
        Ok(service)
    }
}

/// The Service without what the translation never reads: other labels and
/// annotations (kubectl's `last-applied-configuration` alone can be kilobytes),
/// managed fields, owner references, conditions, and its name (its key says it).
/// The spec is kept whole (its selector too: a service without one is reported when
/// it has no endpoints).
fn trimmed(service: &Service) -> Service {
    let metadata = &service.metadata;
    let labels = metadata.labels.as_ref().map(|labels| {
        labels
            .iter()
            .filter(|(k, _)| *k == LABEL_SERVICE_PROXY_NAME || *k == LABEL_HEADLESS)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    });
    let annotations = metadata.annotations.as_ref().map(|annotations| {
        annotations
            .iter()
            .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    });
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.clone());
    Service {
        metadata: ObjectMeta {
            labels,
            annotations,
            ..ObjectMeta::default()
        },
        spec: service.spec.clone(),
        status: ingress.map(|ingress| ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(ingress),
            }),
            ..ServiceStatus::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::Listen,
        translate::{service_output, NodeView},
    };

    fn service(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).expect("test service")
    }

    const FULL: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  uid: 0f3c
  resourceVersion: "77"
  labels: {app: web, service.kubernetes.io/service-proxy-name: other}
  annotations:
    ebpf-proxy.io/scheduler: lc
    kubectl.kubernetes.io/last-applied-configuration: '{"a very long": "text"}'
spec:
  type: LoadBalancer
  selector: {app: web}
  clusterIP: 10.96.0.7
  clusterIPs: [10.96.0.7]
  externalTrafficPolicy: Local
  healthCheckNodePort: 30999
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}]
status:
  loadBalancer: {ingress: [{ip: 198.18.100.7}]}
  conditions: [{type: Ready, status: "True", lastTransitionTime: "2026-01-01T00:00:00Z", reason: x, message: y}]
"#;

    #[test]
    fn keeps_what_the_translation_reads_and_drops_the_rest() {
        let original = service(FULL);
        let stored = StoredService::new(&original);
        let decoded = stored
            .decode(&ObjectKey::new("shop", "web"))
            .expect("decodes");
        assert_eq!(
            (
                decoded.metadata.namespace.as_deref(),
                decoded.metadata.name.as_deref()
            ),
            (Some("shop"), Some("web"))
        );
        let labels = decoded.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.len(), 1, "{labels:?}");
        let annotations = decoded.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(
            annotations.keys().collect::<Vec<_>>(),
            ["ebpf-proxy.io/scheduler"]
        );
        assert!(decoded.metadata.uid.is_none());
        assert!(decoded
            .status
            .as_ref()
            .expect("status")
            .conditions
            .is_none());
        // The translation of the kept form is the translation of the original (with
        // the proxy-name label off, so that the service is handled).
        let handled = |mut s: Service| {
            s.metadata.labels = None;
            s
        };
        let node = NodeView::default();
        let endpoints = [];
        let from_original = service_output(&handled(original), &endpoints, &node);
        let from_stored = service_output(&handled(decoded), &endpoints, &node);
        assert_eq!(from_original.claims, from_stored.claims);
        assert!(from_stored.claims.iter().any(
            |(key, _)| key.listen == Listen::Address("198.18.100.7".parse().expect("address"))
        ));
        assert!(stored.0.len() < 600, "{} bytes", stored.0.len());
    }

    #[test]
    fn equal_services_store_equal_bytes() {
        let mut changed_elsewhere = service(FULL);
        changed_elsewhere.metadata.resource_version = Some("78".into());
        assert_eq!(
            StoredService::new(&service(FULL)),
            StoredService::new(&changed_elsewhere),
            "a change the translation does not read is no change"
        );
    }
}
