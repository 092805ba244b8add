//! Where services come from. A *source* runs as its own task and tells the agent what
//! it learns as `SourceUpdate`s: object changes one at a time, or whole views (a file
//! read); the agent applies them to the change tracker and decides when to sync. The
//! agent knows sources only through the `Source` trait, so a new feed is a new module
//! here, not a new branch in `agent`.
//!
//! What a source may say is also what it may *not* say: a source removes state only by
//! a deletion or a complete listing, and says a deletion only when it positively knows
//! the object is gone (a file with a malformed document adds and updates, and removes
//! nothing).

pub mod kubernetes;
pub mod manifests;
mod object_key;

use std::time::Instant;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::model::Problem;
pub use object_key::ObjectKey;

/// The Kubernetes objects the translation reads.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    /// Only this node's Node matters (its zone label, for topology).
    pub nodes: Vec<Node>,
}

/// One change of one kind of object.
#[derive(Debug)]
pub enum Change<K> {
    Applied(Box<K>),
    Deleted(Box<K>),
    /// A complete list, replacing everything of this kind.
    Relisted(Vec<K>),
}

/// A change of any kind of object the translation reads.
#[derive(Debug)]
pub enum ObjectChange {
    Service(Change<Service>),
    Slice(Change<EndpointSlice>),
    /// This node's Node.
    Node(Change<Node>),
}

/// What a source says.
#[derive(Debug)]
pub enum SourceEvent {
    /// One object (or one kind's complete list) changed.
    Changed(ObjectChange),
    /// Changes to apply together (one version of a file): no sync sees part of them.
    Changes {
        changes: Vec<ObjectChange>,
        /// What could not be read: all of the source's problems as of these changes,
        /// replacing what it said before (reported with the sync that follows).
        problems: Vec<Problem>,
    },
    /// The source's first view has been said in full: the agent's first sync waits for
    /// this from every source, so that a restart never programs services without
    /// their endpoints.
    Listed,
    /// Reading failed for now (the source retries); the programmed state stays.
    Trouble {
        /// What was being read (a resource, a file), for logs and metrics.
        what: String,
        error: String,
    },
}

/// An event and when it arrived (programming latency is measured from there).
#[derive(Debug)]
pub struct SourceUpdate {
    pub source: &'static str,
    pub event: SourceEvent,
    pub received: Instant,
}

/// Where a source's updates go.
#[derive(Clone)]
pub struct Updates {
    source: &'static str,
    tx: mpsc::Sender<SourceUpdate>,
}

impl Updates {
    pub fn new(source: &'static str, tx: mpsc::Sender<SourceUpdate>) -> Updates {
        Updates { source, tx }
    }

    fn update(&self, event: SourceEvent) -> SourceUpdate {
        SourceUpdate {
            source: self.source,
            event,
            received: Instant::now(),
        }
    }

    /// Sends one event; false once the agent stopped listening.
    pub async fn send(&self, event: SourceEvent) -> bool {
        self.tx.send(self.update(event)).await.is_ok()
    }

    /// `send` for a source running on a thread of its own.
    pub fn send_blocking(&self, event: SourceEvent) -> bool {
        self.tx.blocking_send(self.update(event)).is_ok()
    }

    /// Waits (on a source's own thread) until at most `queued` updates wait for the
    /// agent: a source reading a large file in pieces would otherwise parse far
    /// ahead and hold the whole file parsed in the queue.
    pub fn wait_until_queued_at_most(&self, queued: usize) {
        while !self.tx.is_closed() && self.tx.max_capacity() - self.tx.capacity() > queued {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// The agent stopped listening.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Told about the problems of each sync (beside logs and metrics), as Kubernetes
/// Events are.
pub trait ProblemReporter: Send {
    fn report(&mut self, problems: &[crate::model::Problem]);
}

/// A feed of Kubernetes objects.
pub trait Source: Send {
    /// For logs and metrics (`manifests`, `kubernetes`).
    fn name(&self) -> &'static str;

    /// Where this source reports problems of the objects it supplied, if anywhere.
    fn problem_reporter(&self) -> Option<Box<dyn ProblemReporter>> {
        None
    }

    /// Starts the source: it sends to `updates` until the agent stops listening.
    fn start(self: Box<Self>, updates: Updates) -> JoinHandle<()>;
}
