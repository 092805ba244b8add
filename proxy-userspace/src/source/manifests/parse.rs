//! A manifests file's text into Kubernetes objects, one document at a time (a
//! malformed document is reported and skipped while the others load).
//!
//! YAML parsing dominates the cost of a large file (about 20 µs a document with
//! serde_yaml), so a document of a kind the translation reads is parsed once,
//! straight into its type, when its top-level `apiVersion` and `kind` lines say what
//! it is (the type's own deserializer checks both again); anything else goes through
//! a generic YAML value first. Documents are parsed on every CPU.

use std::thread;

use serde::Deserialize as _;

use crate::source::Objects;

/// The (apiVersion, kind) pairs the translation reads.
const READ_KINDS: [(&str, &str); 4] = [
    ("v1", "Service"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
    ("v1", "Node"),
    ("v1", "List"),
];

/// The documents of a file: the text between `---` markers, without those holding
/// nothing but blanks and comments.
pub fn split_documents(text: &str) -> Vec<&str> {
    let mut documents = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let content = line.trim_end_matches(['\n', '\r']);
        if content.trim_end() == "---" || content.starts_with("--- ") {
            documents.push(&text[start..offset]);
            start = offset + line.len();
        }
        offset += line.len();
    }
    documents.push(&text[start..]);
    documents.retain(|d| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    });
    documents
}

/// Where a problem of a document is reported: `document N of <file>`.
pub fn place(index: usize, origin: &str) -> String {
    format!("document {} of {origin}", index + 1)
}

/// Below this many documents (one edit, usually) threads cost more than they save.
const PARALLEL_FROM: usize = 64;

/// Parses documents on every CPU; each result is in its document's place.
pub fn parse_documents(documents: &[&str]) -> Vec<Result<Objects, String>> {
    if documents.len() < PARALLEL_FROM {
        return documents.iter().map(|d| parse_document(d)).collect();
    }
    let threads = thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = documents.len().div_ceil(threads).max(1);
    thread::scope(|scope| {
        let parts: Vec<_> = documents
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(|d| parse_document(d)).collect()))
            .collect();
        parts
            .into_iter()
            .flat_map(|part| {
                part.join()
                    .unwrap_or_else(|_| vec![Err("the parser failed".to_owned())])
            })
            .collect::<Vec<_>>()
    })
}

pub fn parse_document(document: &str) -> Result<Objects, String> {
    let mut objects = Objects::default();
    match top_level_kind(document) {
        Some(("v1", "Service")) => objects
            .services
            .push(serde_yaml::from_str(document).map_err(|e| format!("invalid Service: {e}"))?),
        Some(("discovery.k8s.io/v1", "EndpointSlice")) => objects.slices.push(
            serde_yaml::from_str(document).map_err(|e| format!("invalid EndpointSlice: {e}"))?,
        ),
        _ => {
            let value =
                serde_yaml::Value::deserialize(serde_yaml::Deserializer::from_str(document))
                    .map_err(|e| format!("not valid YAML: {e}"))?;
            add_value(value, &mut objects)?;
        }
    }
    Ok(objects)
}

/// `(apiVersion, kind)` when they are the document's first two lines (comments
/// aside), as kubectl, Helm and most generators write them; `None` sends the
/// document the generic way. Being first, they cannot sit inside a flow collection
/// or a multi-line scalar, and their values are plain words.
fn top_level_kind(document: &str) -> Option<(&str, &str)> {
    let mut lines = document
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'));
    let mut pair = || {
        let (key, value) = lines.next()?.split_once(": ")?;
        let value = value.trim();
        let plain = !value.is_empty()
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '/' | '-'));
        plain.then_some((key, value))
    };
    match (pair()?, pair()?) {
        (("apiVersion", version), ("kind", kind)) | (("kind", kind), ("apiVersion", version)) => {
            Some((version, kind))
        }
        _ => None,
    }
}

fn add_value(value: serde_yaml::Value, objects: &mut Objects) -> Result<(), String> {
    let field = |name: &str| {
        value
            .get(name)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_owned()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => objects
            .services
            .push(serde_yaml::from_value(value).map_err(|e| format!("invalid Service: {e}"))?),
        ("discovery.k8s.io/v1", "EndpointSlice") => objects.slices.push(
            serde_yaml::from_value(value).map_err(|e| format!("invalid EndpointSlice: {e}"))?,
        ),
        ("v1", "Node") => objects
            .nodes
            .push(serde_yaml::from_value(value).map_err(|e| format!("invalid Node: {e}"))?),
        ("v1", "List") => {
            let items = value
                .get("items")
                .and_then(|i| i.as_sequence())
                .cloned()
                .unwrap_or_default();
            for item in items {
                add_value(item, objects)?;
            }
        }
        (_, "") => return Err("no `kind` field: not a Kubernetes object".into()),
        // A kind the translation reads, misspelt or of another API version: reported,
        // which keeps the file's view partial (it removes nothing), never taken for
        // the absence of the object.
        (_, kind) if READ_KINDS.iter().any(|(_, k)| k.eq_ignore_ascii_case(kind)) => {
            let (expected_version, expected_kind) = READ_KINDS
                .iter()
                .find(|(_, k)| k.eq_ignore_ascii_case(kind))
                .copied()
                .unwrap_or_default();
            return Err(format!(
                "{api_version:?} {kind:?} is not read (expected apiVersion {expected_version:?}, kind {expected_kind:?})"
            ));
        }
        // Other kinds (Deployments, Pods…) commonly share a file with Services: not ours.
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_slices_of_the_text_between_markers() {
        let text = "# header\n---\na: 1\n--- # marker with a comment\nb: 2\n---\n\n# only a comment\n---\nc: 3";
        assert_eq!(split_documents(text), ["a: 1\n", "b: 2\n", "c: 3"]);
    }

    #[test]
    fn the_fast_path_and_the_generic_path_agree() {
        let block = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{port: 80, protocol: TCP}]\n";
        let flow = "{apiVersion: v1, kind: Service, metadata: {name: web, namespace: default}, spec: {clusterIP: 10.96.0.10, ports: [{port: 80, protocol: TCP}]}}";
        assert_eq!(top_level_kind(block), Some(("v1", "Service")));
        assert_eq!(top_level_kind(flow), None);
        let fast = parse_document(block).expect("block");
        let generic = parse_document(flow).expect("flow");
        assert_eq!(fast.services, generic.services);
    }

    #[test]
    fn only_the_first_two_lines_choose_the_fast_path() {
        // A line says `kind: Service`, but it continues a flow mapping: the document
        // has no kind, which the generic path reports.
        let text = "apiVersion: v1\nmetadata: {name: x,\nkind: Service\n  }\n";
        assert_eq!(top_level_kind(text), None);
        assert!(parse_document(text).is_err());
        // The first two lines say what the document is; the type checks the values.
        let text = "# a comment\nkind: Service\napiVersion: v2\nmetadata: {name: x}\n";
        assert_eq!(top_level_kind(text), Some(("v2", "Service")));
        assert!(parse_document(text).is_err(), "apiVersion v2 is not read");
    }
}
