//! The manifests source: Kubernetes objects from a multi-document YAML file on disk,
//! the embedded default that needs no cluster. The file is re-read when its bytes
//! change; each document is parsed on its own, so a malformed one is reported and
//! skipped while the others still load (and then nothing is removed: the malformed
//! document may hold objects still in use).

use std::{path::PathBuf, time::Duration};

use serde::Deserialize as _;
use tokio::task::JoinHandle;
use tracing::warn;

use super::{Objects, Source, SourceEvent, Updates};
use crate::model::Problem;

/// A manifests file, checked every `poll_interval`.
pub struct ManifestsSource {
    pub path: PathBuf,
    pub poll_interval: Duration,
    /// An empty file (nothing but blanks and comments) removes every service; without
    /// this it is refused as the likely truncation it is.
    pub allow_empty: bool,
}

impl Source for ManifestsSource {
    fn name(&self) -> &'static str {
        "manifests"
    }

    fn start(self: Box<Self>, updates: Updates) -> JoinHandle<()> {
        tokio::spawn(self.follow(updates))
    }
}

/// How long a changed file must stay the same before it is applied: a writer that
/// rewrites the file in place (not by rename) is caught mid-way by a reader, and a
/// half-written file would remove every service it did not reach yet.
const SETTLE: Duration = Duration::from_millis(100);

/// What one look at the file found.
enum Read {
    /// The same bytes as last applied.
    Unchanged,
    /// New bytes, stable for `SETTLE`.
    Changed(Vec<u8>),
    /// New bytes still changing: looked at again on the next poll.
    Changing,
}

impl ManifestsSource {
    /// Checks that the path names a file that can be read, before the agent starts:
    /// a mistyped path would otherwise give a "ready" agent without services.
    pub fn check(&self) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let metadata = std::fs::metadata(&self.path)
            .with_context(|| format!("manifests file {}", self.path.display()))?;
        anyhow::ensure!(
            metadata.is_file(),
            "manifests file {}: not a regular file",
            self.path.display()
        );
        Ok(())
    }

    async fn read(&self, last: Option<&Vec<u8>>) -> std::io::Result<Read> {
        // Only regular files: reading a FIFO would block until a writer comes.
        let regular = tokio::fs::metadata(&self.path).await?.is_file();
        if !regular {
            return Err(std::io::Error::other("not a regular file"));
        }
        let bytes = tokio::fs::read(&self.path).await?;
        if last == Some(&bytes) {
            return Ok(Read::Unchanged);
        }
        tokio::time::sleep(SETTLE).await;
        let again = tokio::fs::read(&self.path).await?;
        Ok(if again == bytes {
            Read::Changed(bytes)
        } else {
            Read::Changing
        })
    }

    /// What a new version of the file says.
    fn snapshot(&self, bytes: &[u8], origin: &str) -> SourceEvent {
        let text = String::from_utf8_lossy(bytes);
        let (objects, mut problems) = parse(&text, origin);
        if split_documents(&text).is_empty() && !self.allow_empty {
            problems.push(Problem::error(
                origin.to_owned(),
                "the file is empty: keeping the programmed services (an empty file removes them only with --allow-empty-manifests)",
            ));
        }
        SourceEvent::Snapshot {
            complete: problems.is_empty(),
            objects,
            problems,
        }
    }

    async fn follow(self, updates: Updates) {
        let origin = self.path.display().to_string();
        let mut last: Option<Vec<u8>> = None;
        let mut unreadable_reported = false;
        let mut ticker = tokio::time::interval(self.poll_interval);
        let mut listed = false;
        loop {
            ticker.tick().await;
            let event = match self.read(last.as_ref()).await {
                Ok(Read::Changed(bytes)) => {
                    unreadable_reported = false;
                    let event = self.snapshot(&bytes, &origin);
                    last = Some(bytes);
                    Some(event)
                }
                Ok(Read::Unchanged | Read::Changing) => None,
                Err(e) if !unreadable_reported => {
                    unreadable_reported = true;
                    warn!(path = %origin, "manifests unreadable ({e}); keeping the last programmed state");
                    Some(SourceEvent::Trouble {
                        what: origin.clone(),
                        error: e.to_string(),
                    })
                }
                Err(_) => None,
            };
            if let Some(event) = event {
                if !updates.send(event).await {
                    return;
                }
            }
            // After the first look, whatever it found: a file that vanished or is
            // being written leaves the pinned state as it is (nothing is said, so
            // nothing is synced or removed).
            if !listed {
                listed = true;
                if !updates.send(SourceEvent::Listed).await {
                    return;
                }
            }
        }
    }
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

/// The (apiVersion, kind) pairs the translation reads.
const READ_KINDS: [(&str, &str); 4] = [
    ("v1", "Service"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
    ("v1", "Node"),
    ("v1", "List"),
];

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
        // which keeps the file's snapshot partial (it removes nothing), never taken
        // for the absence of the object.
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

    #[test]
    fn a_kind_the_translation_reads_with_another_version_or_spelling_is_a_problem() {
        for (api_version, kind) in [
            ("v1beta1", "Service"),
            ("v1", "service"),
            ("discovery.k8s.io/v1beta1", "EndpointSlice"),
        ] {
            let text = GOOD_SERVICE
                .replace("apiVersion: v1", &format!("apiVersion: {api_version}"))
                .replace("kind: Service", &format!("kind: {kind}"));
            let (objects, problems) = parse(&text, "f");
            assert!(objects.services.is_empty());
            assert_eq!(problems.len(), 1, "{api_version} {kind}: {problems:?}");
            assert!(
                problems[0].message.contains("is not read"),
                "{}",
                problems[0]
            );
        }
    }

    #[test]
    fn an_empty_file_is_refused_unless_allowed() {
        let source = |allow_empty| ManifestsSource {
            path: "f".into(),
            poll_interval: Duration::from_secs(1),
            allow_empty,
        };
        for text in ["", "\n# only a comment\n---\n"] {
            match source(false).snapshot(text.as_bytes(), "f") {
                SourceEvent::Snapshot {
                    complete, problems, ..
                } => {
                    assert!(!complete, "an empty file must not remove anything");
                    assert!(problems[0].message.contains("empty"), "{problems:?}");
                }
                other => panic!("{other:?}"),
            }
            assert!(matches!(
                source(true).snapshot(text.as_bytes(), "f"),
                SourceEvent::Snapshot { complete: true, .. }
            ));
        }
    }
}
