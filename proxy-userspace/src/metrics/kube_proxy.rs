//! kube-proxy's own metrics, with kube-proxy's names, types, buckets and labels (as
//! kube-proxy 1.36 exports them, `pkg/proxy/metrics`), beside ebpf-proxy's, so that
//! the dashboards and alerts written for kube-proxy keep working after the switch
//! (the usual "proxy is stale" alert compares `..._last_queued_timestamp_seconds`
//! with `..._last_timestamp_seconds`).
//!
//! kube-proxy runs one proxier per IP family and labels its sync metrics with it;
//! one sync here programs every family the node serves, so each of those families
//! gets the same figures. What only kube-proxy's modes have (iptables and nftables
//! rule counts and failures, the conntrack reconciler: the data path's own
//! conntrack needs none) is not exported; `README.md` lists the correspondences.

use std::{
    sync::atomic::AtomicU64,
    time::{SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use proxy_common::Family as IpFamily;

use super::{labels, Labels};
use crate::tracker::{NoLocalEndpoints, ObjectChanges};

type Histograms = Family<Labels, Histogram, fn() -> Histogram>;
type Timestamps = Family<Labels, Gauge<f64, AtomicU64>>;

/// kube-proxy's sync durations: 1 ms doubling to about 16 s.
fn sync_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// kube-proxy's network programming buckets: 0, 0.25 s, 0.5 s, every second to 59 s,
/// every 5 s to 115 s, every 30 s to 5 minutes.
fn programming_buckets() -> Histogram {
    let buckets = [0.0, 0.25, 0.5]
        .into_iter()
        .chain((1..=59).map(f64::from))
        .chain((0..12).map(|i| 60.0 + 5.0 * f64::from(i)))
        .chain((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    Histogram::new(buckets)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[derive(Clone)]
pub struct KubeProxyMetrics {
    sync_duration: Histograms,
    full_sync_duration: Histograms,
    partial_sync_duration: Histograms,
    last_synced: Timestamps,
    last_queued: Timestamps,
    network_programming: Histograms,
    endpoint_changes_pending: Gauge,
    endpoint_changes: Counter,
    service_changes_pending: Gauge,
    service_changes: Counter,
    no_local_endpoints: Family<Labels, Gauge>,
    healthz: Family<Labels, Counter>,
    livez: Family<Labels, Counter>,
    /// The families the node serves (those of its addresses), as kube-proxy's
    /// `ip_family` label names them: kube-proxy runs a proxier per family and labels
    /// each; one sync here programs every family, and each carries its figures.
    families: Vec<Labels>,
}

impl Default for KubeProxyMetrics {
    fn default() -> Self {
        let sync = || Histograms::new_with_constructor(sync_buckets as fn() -> Histogram);
        KubeProxyMetrics {
            sync_duration: sync(),
            full_sync_duration: sync(),
            partial_sync_duration: sync(),
            last_synced: Timestamps::default(),
            last_queued: Timestamps::default(),
            network_programming: Histograms::new_with_constructor(programming_buckets),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes: Counter::default(),
            no_local_endpoints: Family::default(),
            healthz: Family::default(),
            livez: Family::default(),
            families: vec![labels(&[("ip_family", IpFamily::V4.name())])],
        }
    }
}

impl KubeProxyMetrics {
    /// For a node of these families.
    pub fn for_families(families: impl IntoIterator<Item = IpFamily>) -> KubeProxyMetrics {
        KubeProxyMetrics {
            families: families
                .into_iter()
                .map(|family| labels(&[("ip_family", family.name())]))
                .collect(),
            ..KubeProxyMetrics::default()
        }
    }
}

impl KubeProxyMetrics {
    /// Changes arrived that wait for a sync (`pending`: all of them so far).
    pub fn queued(&self, pending: ObjectChanges) {
        let now = unix_now();
        for family in &self.families {
            self.last_queued.get_or_create(family).set(now);
        }
        self.endpoint_changes_pending.set(pending.slices as i64);
        self.service_changes_pending.set(pending.services as i64);
    }

    /// A sync ended: it took `seconds`, compared everything (`full`) or applied
    /// `applied`; `triggers` are the EndpointSlices' last-change trigger times it
    /// programmed; `no_local` what the services look like now.
    pub fn synced(
        &self,
        seconds: f64,
        full: bool,
        applied: ObjectChanges,
        triggers: &[SystemTime],
        no_local: NoLocalEndpoints,
    ) {
        let now = SystemTime::now();
        let unix = unix_now();
        for family in &self.families {
            self.sync_duration.get_or_create(family).observe(seconds);
            let kind = if full {
                &self.full_sync_duration
            } else {
                &self.partial_sync_duration
            };
            kind.get_or_create(family).observe(seconds);
            self.last_synced.get_or_create(family).set(unix);
            let programming = self.network_programming.get_or_create(family);
            for trigger in triggers {
                // A trigger time ahead of this node's clock (skew) counts as 0.
                let waited = now.duration_since(*trigger).unwrap_or_default();
                programming.observe(waited.as_secs_f64());
            }
            for (policy, count) in [
                ("internal", no_local.internal),
                ("external", no_local.external),
            ] {
                let mut with_policy = family.clone();
                with_policy.push(("traffic_policy".into(), policy.into()));
                self.no_local_endpoints
                    .get_or_create(&with_policy)
                    .set(count as i64);
            }
        }
        self.endpoint_changes.inc_by(applied.slices as u64);
        self.service_changes.inc_by(applied.services as u64);
        self.endpoint_changes_pending.set(0);
        self.service_changes_pending.set(0);
    }

    /// `/healthz` (`livez: false`) or `/livez` answered `code`.
    pub fn health_answered(&self, livez: bool, code: u16) {
        let family = if livez { &self.livez } else { &self.healthz };
        family
            .get_or_create(&labels(&[("code", &code.to_string())]))
            .inc();
    }

    /// Under kube-proxy's names (counters get their `_total` when encoded).
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("kubeproxy");
        registry.register(
            "sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            self.sync_duration.clone(),
        );
        registry.register(
            "sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            self.full_sync_duration.clone(),
        );
        registry.register(
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            self.partial_sync_duration.clone(),
        );
        registry.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            self.last_synced.clone(),
        );
        registry.register(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            self.last_queued.clone(),
        );
        registry.register(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            self.network_programming.clone(),
        );
        registry.register(
            "sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            self.endpoint_changes_pending.clone(),
        );
        registry.register(
            "sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            self.endpoint_changes.clone(),
        );
        registry.register(
            "sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            self.service_changes_pending.clone(),
        );
        registry.register(
            "sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            self.service_changes.clone(),
        );
        registry.register(
            "sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            self.no_local_endpoints.clone(),
        );
        registry.register(
            "proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            self.healthz.clone(),
        );
        registry.register(
            "proxy_livez",
            "Cumulative proxy livez HTTP status",
            self.livez.clone(),
        );
    }
}
