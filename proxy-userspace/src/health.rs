//! The agent's health, as kube-proxy reports it (`pkg/proxy/healthcheck`), so that
//! the probes and load balancers set up for kube-proxy read it the same way:
//! - **the proxy is healthy** unless a change has waited longer than the timeout to
//!   be programmed (kube-proxy: twice its sync period, 60 s by default). Ours adds
//!   two causes kube-proxy has no equivalent for: the agent's loop stopped turning
//!   (a stuck loop queues nothing, so pending changes alone would not show it), and
//!   the pinned maps vanished (until they are restored);
//! - **the node is eligible** unless its Node object is being deleted (a deletion
//!   timestamp, or gone from the API) or carries the cluster autoscaler's
//!   `ToBeDeletedByClusterAutoscaler` taint (KEP-3836). Until the Node is seen, it
//!   is eligible, as in kube-proxy (and a manifests file without Node objects never
//!   makes it otherwise).
//!
//! `/healthz` answers 200 only when both hold, so load balancers drain a node the
//! autoscaler is about to remove; `/livez` (whether to restart the agent) follows
//! the proxy's health alone, and so does `serviceProxyHealthy` in the answers of
//! health-check node ports.

use std::{
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use k8s_openapi::api::core::v1::Node;

/// The taint the cluster autoscaler puts on a node before deleting it.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// How long a change may wait to be programmed: kube-proxy's default (twice its
/// default `syncPeriod` of 30 s).
pub const PENDING_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the agent's loop may go without a turn (it turns at least once a second).
const LOOP_STALL: Duration = Duration::from_secs(30);

/// Whether a Node object lets its node serve: not being deleted, not tainted for
/// deletion by the autoscaler.
pub fn node_eligible(node: &Node) -> bool {
    let tainted = node
        .spec
        .as_ref()
        .and_then(|spec| spec.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    node.metadata.deletion_timestamp.is_none() && !tainted
}

/// What the agent last told about itself.
#[derive(Clone, Copy, Debug)]
struct Observed {
    /// When the oldest change not yet programmed arrived.
    oldest_pending: Option<Instant>,
    /// The last sync's end (wall clock, for the answers' `lastUpdated`).
    last_synced: Option<SystemTime>,
    last_turn: Instant,
    pins_broken: bool,
    node_eligible: bool,
}

/// The answer of a health endpoint at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub proxy_healthy: bool,
    pub node_eligible: bool,
    /// Unix seconds: now when healthy (kube-proxy's compatible meaning: "recent"),
    /// else the last sync's (0: none yet).
    pub last_updated: u64,
    pub current_time: u64,
    /// Unix seconds of the last sync's end.
    pub last_synced: Option<u64>,
    /// How long the oldest change not yet programmed has waited.
    pub pending_for: Option<Duration>,
}

impl Verdict {
    /// `/healthz`: the proxy and its node.
    pub fn healthz(&self) -> bool {
        self.proxy_healthy && self.node_eligible
    }
}

/// The agent's health, shared between its loop and the HTTP endpoints.
pub struct Health {
    pending_timeout: Duration,
    observed: Mutex<Observed>,
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Health {
    pub fn new(pending_timeout: Duration) -> Health {
        Health {
            pending_timeout,
            observed: Mutex::new(Observed {
                oldest_pending: None,
                last_synced: None,
                last_turn: Instant::now(),
                pins_broken: false,
                node_eligible: true,
            }),
        }
    }

    fn update(&self, change: impl FnOnce(&mut Observed)) {
        change(&mut self.observed.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The agent's loop turned.
    pub fn turned(&self) {
        self.update(|o| o.last_turn = Instant::now());
    }

    /// When the oldest change not yet programmed arrived (`None`: all programmed).
    pub fn set_pending(&self, since: Option<Instant>) {
        self.update(|o| o.oldest_pending = since);
    }

    /// A sync ended.
    pub fn synced(&self) {
        self.update(|o| o.last_synced = Some(SystemTime::now()));
    }

    pub fn set_pins_broken(&self, broken: bool) {
        self.update(|o| o.pins_broken = broken);
    }

    /// Whether this changed what the node was.
    pub fn set_node_eligible(&self, eligible: bool) -> bool {
        let mut changed = false;
        self.update(|o| {
            changed = o.node_eligible != eligible;
            o.node_eligible = eligible;
        });
        changed
    }

    pub fn verdict(&self) -> Verdict {
        let observed = *self.observed.lock().unwrap_or_else(|e| e.into_inner());
        self.verdict_of(&observed, Instant::now(), SystemTime::now())
    }

    fn verdict_of(&self, observed: &Observed, now: Instant, wall: SystemTime) -> Verdict {
        let late = observed
            .oldest_pending
            .is_some_and(|since| now.saturating_duration_since(since) >= self.pending_timeout);
        let stalled = now.saturating_duration_since(observed.last_turn) > LOOP_STALL;
        let proxy_healthy = !late && !stalled && !observed.pins_broken;
        Verdict {
            proxy_healthy,
            node_eligible: observed.node_eligible,
            last_updated: if proxy_healthy {
                unix_seconds(wall)
            } else {
                observed.last_synced.map_or(0, unix_seconds)
            },
            current_time: unix_seconds(wall),
            last_synced: observed.last_synced.map(unix_seconds),
            pending_for: observed
                .oldest_pending
                .map(|since| now.saturating_duration_since(since)),
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{NodeSpec, Taint},
        apimachinery::pkg::apis::meta::v1::Time,
    };

    use super::*;

    fn observed(at: Instant) -> Observed {
        Observed {
            oldest_pending: None,
            last_synced: None,
            last_turn: at,
            pins_broken: false,
            node_eligible: true,
        }
    }

    #[test]
    fn a_change_waiting_past_the_timeout_makes_the_proxy_unhealthy() {
        let health = Health::new(Duration::from_secs(60));
        let start = Instant::now();
        let wall = SystemTime::now();
        let mut o = observed(start);
        o.oldest_pending = Some(start);
        let soon = start + Duration::from_secs(59);
        assert!(
            health
                .verdict_of(
                    &Observed {
                        last_turn: soon,
                        ..o
                    },
                    soon,
                    wall
                )
                .proxy_healthy
        );
        let late = start + Duration::from_secs(60);
        let verdict = health.verdict_of(
            &Observed {
                last_turn: late,
                ..o
            },
            late,
            wall,
        );
        assert!(!verdict.proxy_healthy && !verdict.healthz());
        assert_eq!(verdict.last_updated, 0, "never synced");
    }

    #[test]
    fn a_stalled_loop_or_vanished_maps_make_the_proxy_unhealthy() {
        let health = Health::new(Duration::from_secs(60));
        let start = Instant::now();
        let wall = SystemTime::now();
        let o = observed(start);
        assert!(health.verdict_of(&o, start, wall).proxy_healthy);
        let stalled = start + LOOP_STALL + Duration::from_secs(1);
        assert!(!health.verdict_of(&o, stalled, wall).proxy_healthy);
        let broken = Observed {
            pins_broken: true,
            ..o
        };
        assert!(!health.verdict_of(&broken, start, wall).proxy_healthy);
    }

    #[test]
    fn an_ineligible_node_fails_healthz_but_not_the_proxy() {
        let health = Health::new(Duration::from_secs(60));
        let start = Instant::now();
        let o = Observed {
            node_eligible: false,
            ..observed(start)
        };
        let verdict = health.verdict_of(&o, start, SystemTime::now());
        assert!(verdict.proxy_healthy && !verdict.healthz());
    }

    #[test]
    fn a_node_is_ineligible_when_tainted_for_deletion_or_being_deleted() {
        let mut node = Node::default();
        assert!(node_eligible(&node));
        node.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: "node.kubernetes.io/unschedulable".into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        assert!(node_eligible(&node), "other taints do not matter");
        if let Some(taints) = node.spec.as_mut().and_then(|s| s.taints.as_mut()) {
            taints.push(Taint {
                key: TO_BE_DELETED_TAINT.into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            });
        }
        assert!(!node_eligible(&node));
        let mut deleting = Node::default();
        deleting.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert!(!node_eligible(&deleting));
    }
}
