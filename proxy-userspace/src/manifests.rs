//! The manifests source: Kubernetes objects from multi-document YAML files on disk,
//! the embedded default that needs no cluster. Each document is parsed on its own, so
//! a malformed one is reported and skipped while the others still load.

use std::path::Path;

use anyhow::{Context as _, Result};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize as _;

use crate::model::Problem;

/// The Kubernetes objects the translation reads.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    /// Only this node's Node matters (its zone label, for topology).
    pub nodes: Vec<Node>,
}

/// Reads a manifests file. I/O errors are errors (the caller keeps its last good
/// state); bad documents inside a readable file are problems.
pub fn read(path: &Path) -> Result<(Objects, Vec<Problem>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading manifests {}", path.display()))?;
    Ok(parse(&text, &path.display().to_string()))
}

/// Splits on `---` document markers and parses each document on its own.
pub fn parse(text: &str, origin: &str) -> (Objects, Vec<Problem>) {
    let mut objects = Objects::default();
    let mut problems = Vec::new();
    for (index, document) in split_documents(text).into_iter().enumerate() {
        let place = format!("document {} of {origin}", index + 1);
        if let Err(message) = add_document(document, &mut objects) {
            problems.push(Problem::error(place, message));
        }
    }
    (objects, problems)
}

fn split_documents(text: &str) -> Vec<String> {
    let mut documents = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            documents.push(String::new());
        } else if let Some(current) = documents.last_mut() {
            current.push_str(line);
            current.push('\n');
        }
    }
    documents
        .into_iter()
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

fn add_document(document: String, objects: &mut Objects) -> Result<(), String> {
    let value = serde_yaml::Value::deserialize(serde_yaml::Deserializer::from_str(&document))
        .map_err(|e| format!("not valid YAML: {e}"))?;
    add_value(value, objects)
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
        // Other kinds (Deployments, Pods…) commonly share a file with Services: not ours.
        (_, "") => return Err("no `kind` field: not a Kubernetes object".into()),
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{port: 80, protocol: TCP}]\n";

    #[test]
    fn a_malformed_document_is_reported_and_the_others_load() {
        let text = format!("{GOOD_SERVICE}---\nkind: Service\n  bad: [indent\n---\n{GOOD_SERVICE}");
        let (objects, problems) = parse(&text, "test.yaml");
        assert_eq!(objects.services.len(), 2);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].object.contains("document 2 of test.yaml"),
            "{}",
            problems[0]
        );
        assert!(problems[0].message.contains("YAML"), "{}", problems[0]);
    }

    #[test]
    fn a_document_of_the_wrong_shape_names_the_kind() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: 7}\n";
        let (objects, problems) = parse(text, "f");
        assert!(objects.services.is_empty());
        assert!(
            problems[0].message.starts_with("invalid Service"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn other_kinds_and_lists_are_handled() {
        let text = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n---\napiVersion: v1\nkind: List\nitems:\n- {}",
            GOOD_SERVICE.replace('\n', "\n  ")
        );
        let (objects, problems) = parse(&text, "f");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(objects.services.len(), 1);
    }
}
