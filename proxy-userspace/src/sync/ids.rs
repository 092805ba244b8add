//! The small integer ids that index the per-service and per-backend arrays.

use std::collections::{BTreeMap, BTreeSet};

use proxy_common::Addr;

use crate::model::FrontendKey;

/// Ids with reuse.
#[derive(Debug)]
pub struct IdPool {
    limit: u32,
    next: u32,
    free: BTreeSet<u32>,
}

impl IdPool {
    pub fn with_used(limit: u32, used: &BTreeSet<u32>) -> IdPool {
        let next = used.last().map_or(0, |max| max + 1);
        let free = (0..next).filter(|id| !used.contains(id)).collect();
        IdPool { limit, next, free }
    }

    pub fn allocate(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        (self.next < self.limit).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    pub fn release(&mut self, id: u32) {
        self.free.insert(id);
    }
}

/// A backend as one frontend knows it: what a returning backend is recognised by.
pub type BackendIdentity = (FrontendKey, Addr, u16);

/// Backend ids, which key the connection counts (`CONN_COUNTS`) as well as the
/// slots. The id of a backend that leaves is *retired*, not freed, while conntrack
/// may still hold flows counted under it: a new backend given that id would start
/// from zeroed counts that those flows still decrement when they close (the
/// underflow an endpoint removed and re-added with a connection open used to
/// cause). A backend that returns to its frontend gets its retired id, and so its
/// counts, back, as IPVS takes a destination back out of its trash. Retired ids are
/// freed once a conntrack pass finds no flow that names them (`release_unreferenced`).
#[derive(Debug)]
pub struct BackendIds {
    pool: IdPool,
    /// Retired ids, with the backend they belonged to when known (not after a
    /// restart: the conntrack table names ids, not frontends).
    retired: BTreeMap<u32, Option<BackendIdentity>>,
}

/// An id for a backend, and whether its counts are to be zeroed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Assigned {
    /// A free id: whatever its counters hold belongs to nobody.
    Fresh(u32),
    /// This backend's own retired id: its counters count its open flows.
    Returning(u32),
}

impl BackendIds {
    /// `used`: ids in slots; `referenced`: ids conntrack entries name (the others
    /// among them are retired until their flows are gone).
    pub fn recover(limit: u32, used: &BTreeSet<u32>, referenced: &BTreeSet<u32>) -> BackendIds {
        let taken: BTreeSet<u32> = used.union(referenced).copied().collect();
        BackendIds {
            pool: IdPool::with_used(limit, &taken),
            retired: referenced.difference(used).map(|id| (*id, None)).collect(),
        }
    }

    pub fn assign(&mut self, identity: &BackendIdentity) -> Option<Assigned> {
        let returning = self
            .retired
            .iter()
            .find(|(_, known)| known.as_ref() == Some(identity))
            .map(|(id, _)| *id);
        if let Some(id) = returning {
            self.retired.remove(&id);
            return Some(Assigned::Returning(id));
        }
        if let Some(id) = self.pool.allocate() {
            return Some(Assigned::Fresh(id));
        }
        // Every id is in use or retired: take the longest-retired one. Its counts
        // are zeroed and may drift until its old flows end; reconciliation heals it.
        let (id, _) = self.retired.pop_first()?;
        Some(Assigned::Fresh(id))
    }

    /// The backend left its frontend (or the frontend went).
    pub fn retire(&mut self, id: u32, identity: BackendIdentity) {
        self.retired.insert(id, Some(identity));
    }

    /// Frees the retired ids that no conntrack entry names any more.
    pub fn release_unreferenced(&mut self, referenced: &BTreeSet<u32>) {
        let gone: Vec<u32> = self
            .retired
            .keys()
            .filter(|id| !referenced.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.retired.remove(&id);
            self.pool.release(id);
        }
    }
}
