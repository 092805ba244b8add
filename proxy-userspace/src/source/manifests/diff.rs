//! What changed between two versions of a manifests file. Each document is known by
//! the hash of its text: a document seen in the last version is not parsed again, so
//! one edit of a 100,000-service file parses one document. The objects of new
//! documents are said as applied (the tracker ignores those that did not really
//! change); an object no document defines any more is said as deleted, and only when
//! every document of the new version could be read (and the file is not empty,
//! unless that is allowed): a version with a bad document removes nothing.

use std::collections::{BTreeSet, HashMap};

use smallvec::SmallVec;

use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::{
    hash_of,
    parse::{parse_documents, place, split_documents},
};
use crate::{
    model::Problem,
    source::{Change, ObjectChange, ObjectKey, Objects},
};

/// An object as a file defines it: its kind and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum ObjectId {
    Service(ObjectKey),
    Slice(ObjectKey),
    Node(String),
}

impl ObjectId {
    fn deletion(&self) -> ObjectChange {
        let meta = |key: &ObjectKey| ObjectMeta {
            namespace: Some(key.namespace().to_owned()),
            name: Some(key.name().to_owned()),
            ..ObjectMeta::default()
        };
        match self {
            ObjectId::Service(key) => ObjectChange::Service(Change::Deleted(Box::new(Service {
                metadata: meta(key),
                ..Service::default()
            }))),
            ObjectId::Slice(key) => ObjectChange::Slice(Change::Deleted(Box::new(EndpointSlice {
                metadata: meta(key),
                ..EndpointSlice::default()
            }))),
            ObjectId::Node(name) => ObjectChange::Node(Change::Deleted(Box::new(Node {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..ObjectMeta::default()
                },
                ..Node::default()
            }))),
        }
    }
}

/// What one document defines: almost always one object, kept inline (a first read of
/// 200,000 documents made as many allocations of one id each).
type DocumentIds = SmallVec<[ObjectId; 1]>;

/// The objects of one parsed document, as ids and as changes to apply.
fn identify(objects: Objects) -> (DocumentIds, Vec<ObjectChange>) {
    let mut ids = DocumentIds::new();
    let mut changes = Vec::new();
    for service in objects.services {
        ids.push(ObjectId::Service(ObjectKey::of(
            &service.metadata.namespace,
            &service.metadata.name,
        )));
        changes.push(ObjectChange::Service(Change::Applied(Box::new(service))));
    }
    for slice in objects.slices {
        ids.push(ObjectId::Slice(ObjectKey::of(
            &slice.metadata.namespace,
            &slice.metadata.name,
        )));
        changes.push(ObjectChange::Slice(Change::Applied(Box::new(slice))));
    }
    for node in objects.nodes {
        ids.push(ObjectId::Node(
            node.metadata.name.clone().unwrap_or_default(),
        ));
        changes.push(ObjectChange::Node(Change::Applied(Box::new(node))));
    }
    (ids, changes)
}

/// The file as last applied.
#[derive(Default)]
pub struct FileView {
    /// The documents that were read, by the hash of their text, with what they define.
    documents: HashMap<u64, DocumentIds>,
    /// Objects of documents gone from a version that could not be read whole: still
    /// programmed, and deleted by the first complete version without them.
    kept: BTreeSet<ObjectId>,
}

/// How a new version is read.
pub struct Reading<'a> {
    pub origin: &'a str,
    /// An empty file removes everything (else it is refused as the truncation it
    /// likely is).
    pub allow_empty: bool,
    /// At most this many new documents are parsed and said at a time (memory: a
    /// first read of a large file is never held parsed all at once).
    pub piece: usize,
}

impl FileView {
    /// Takes in a new version of the file: `emit` receives the changes, in pieces
    /// (applied objects first, then deletions); what could not be read is returned.
    pub fn update(
        &mut self,
        text: &str,
        reading: &Reading<'_>,
        emit: &mut dyn FnMut(Vec<ObjectChange>),
    ) -> Vec<Problem> {
        let mut documents = split_documents(text);
        let mut problems = Vec::new();
        if documents.is_empty() && !reading.allow_empty {
            problems.push(Problem::error(
                reading.origin.to_owned(),
                "the file is empty: keeping the programmed services (an empty file removes them only with --allow-empty-manifests)",
            ));
        }
        // A writer that stopped mid-way (a full disk, a crash) leaves a file that ends
        // in the middle of a line: its last document may still parse, with fields or
        // endpoints missing, and the documents after the cut would be taken as gone.
        if !text.is_empty() && !text.ends_with('\n') {
            documents.pop();
            problems.push(Problem::error(
                place(documents.len(), reading.origin),
                "the file does not end with a newline: taken as cut short by a writer that stopped; its last document is not read and nothing is removed until the file ends with a newline",
            ));
        }
        let mut read: HashMap<u64, DocumentIds> = HashMap::new();
        // Where each object is defined (the first document that does).
        let mut defined: HashMap<ObjectId, usize> = HashMap::new();
        let mut fresh = Vec::new();
        for (index, document) in documents.iter().enumerate() {
            let hash = hash_of(document.as_bytes());
            // Taken out of the last version's documents: what stays there is what is
            // gone (a document present twice finds its ids in `read` the second time).
            let known = self
                .documents
                .remove(&hash)
                .or_else(|| read.get(&hash).cloned());
            match known {
                Some(ids) => {
                    for id in &ids {
                        defined.entry(id.clone()).or_insert(index);
                    }
                    read.insert(hash, ids);
                }
                None => fresh.push((index, hash, *document)),
            }
        }
        for piece in fresh.chunks(reading.piece.max(1)) {
            let texts: Vec<&str> = piece.iter().map(|(_, _, text)| *text).collect();
            let mut changes = Vec::new();
            for ((index, hash, _), parsed) in piece.iter().zip(parse_documents(&texts)) {
                let at = place(*index, reading.origin);
                let objects = match parsed {
                    Ok(objects) => objects,
                    Err(message) => {
                        problems.push(Problem::error(at, message));
                        continue;
                    }
                };
                let (ids, applied) = identify(objects);
                for (id, change) in ids.iter().zip(applied) {
                    match defined.get(id) {
                        Some(first) if first != index => problems.push(Problem::error(
                            at.clone(),
                            format!(
                                "{id:?} is also defined in document {}: skipped here",
                                first + 1
                            ),
                        )),
                        _ => {
                            defined.insert(id.clone(), *index);
                            changes.push(change);
                        }
                    }
                }
                read.insert(*hash, ids);
            }
            emit(changes);
        }
        // The last version's documents that this one no longer has, and what earlier
        // incomplete versions kept: their objects not defined any more are gone.
        let before = self
            .documents
            .values()
            .flatten()
            .chain(&self.kept)
            .filter(|id| !defined.contains_key(*id))
            .cloned()
            .collect::<BTreeSet<_>>();
        if problems.is_empty() {
            emit(before.iter().map(ObjectId::deletion).collect());
            self.kept.clear();
        } else {
            self.kept = before;
        }
        self.documents = read;
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, ip: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  clusterIP: {ip}\n  ports: [{{port: 80, protocol: TCP}}]\n")
    }

    /// (applied service names, deleted service names, problems) of one update.
    fn update(view: &mut FileView, documents: &[String]) -> (Vec<String>, Vec<String>, usize) {
        update_allowing_empty(view, documents, false)
    }

    fn update_allowing_empty(
        view: &mut FileView,
        documents: &[String],
        allow_empty: bool,
    ) -> (Vec<String>, Vec<String>, usize) {
        let text = documents.join("---\n");
        let (mut applied, mut deleted) = (Vec::new(), Vec::new());
        let reading = Reading {
            origin: "f",
            allow_empty,
            piece: 2,
        };
        let problems = view.update(&text, &reading, &mut |changes| {
            for change in changes {
                match change {
                    ObjectChange::Service(Change::Applied(s)) => {
                        applied.push(s.metadata.name.unwrap_or_default())
                    }
                    ObjectChange::Service(Change::Deleted(s)) => {
                        deleted.push(s.metadata.name.unwrap_or_default())
                    }
                    other => panic!("{other:?}"),
                }
            }
        });
        (applied, deleted, problems.len())
    }

    #[test]
    fn only_new_documents_are_parsed_and_only_what_is_gone_is_deleted() {
        let mut view = FileView::default();
        let (a, b, c) = (
            service("a", "10.96.0.1"),
            service("b", "10.96.0.2"),
            service("c", "10.96.0.3"),
        );
        let first = update(&mut view, &[a.clone(), b.clone(), c.clone()]);
        assert_eq!(first, (vec!["a".into(), "b".into(), "c".into()], vec![], 0));
        let b2 = service("b", "10.96.0.22");
        assert_eq!(
            update(&mut view, &[a.clone(), b2.clone()]),
            (vec!["b".into()], vec!["c".into()], 0)
        );
        assert_eq!(update(&mut view, &[a, b2]), (vec![], vec![], 0));
    }

    #[test]
    fn a_version_with_a_bad_document_deletes_nothing_until_a_good_one_comes() {
        let mut view = FileView::default();
        let (a, b) = (service("a", "10.96.0.1"), service("b", "10.96.0.2"));
        update(&mut view, &[a.clone(), b.clone()]);
        let broken = "apiVersion: v1\nkind: Service\n  metadata: [oops\n".to_owned();
        assert_eq!(
            update(&mut view, &[a.clone(), broken]),
            (vec![], vec![], 1),
            "b must stay while the file has a bad document"
        );
        assert_eq!(
            update(&mut view, std::slice::from_ref(&a)),
            (vec![], vec!["b".into()], 0)
        );
        assert_eq!(update(&mut view, &[]).2, 1, "an empty file is refused");
        assert_eq!(
            update_allowing_empty(&mut view, &["# nothing\n".to_owned()], true),
            (vec![], vec!["a".into()], 0),
            "unless allowed"
        );
    }

    #[test]
    fn a_file_cut_short_applies_nothing_of_its_last_document_and_removes_nothing() {
        let mut view = FileView::default();
        let (a, b) = (service("a", "10.96.0.1"), service("b", "10.96.0.2"));
        update(&mut view, &[a.clone(), b.clone()]);
        // Cut inside the ports line of a changed `a`: what remains of it parses.
        let a2 = service("a", "10.96.0.9");
        let cut = &a2[..a2.find("  ports").expect("ports") + 4];
        assert_eq!(update(&mut view, &[cut.to_owned()]), (vec![], vec![], 1));
        // Whole again: the new `a` is applied (and `b`, not seen in the cut version,
        // is said again, which changes nothing).
        let (applied, deleted, problems) = update(&mut view, &[a2, b]);
        assert_eq!((applied[0].as_str(), deleted, problems), ("a", vec![], 0));
    }

    #[test]
    fn a_reverted_document_is_applied_again() {
        let mut view = FileView::default();
        let (a, a2) = (service("a", "10.96.0.1"), service("a", "10.96.0.9"));
        let broken = "kind: Service\n  bad: [\n".to_owned();
        update(&mut view, std::slice::from_ref(&a));
        update(&mut view, &[a2, broken]);
        assert_eq!(update(&mut view, &[a]), (vec!["a".into()], vec![], 0));
    }

    #[test]
    fn an_object_defined_twice_is_an_error_and_the_first_definition_holds() {
        let mut view = FileView::default();
        let (a, a2) = (service("a", "10.96.0.1"), service("a", "10.96.0.9"));
        let (applied, deleted, problems) = update(&mut view, &[a, a2]);
        assert_eq!((applied, deleted, problems), (vec!["a".into()], vec![], 1));
    }
}
