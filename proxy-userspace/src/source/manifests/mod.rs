//! The manifests source: Kubernetes objects from a multi-document YAML file on disk,
//! the embedded default that needs no cluster. The file is re-read when its bytes
//! change, and only what changed is parsed and said (`diff`); a malformed document is
//! reported and skipped while the others still load (and then nothing is removed:
//! the malformed document may hold objects still in use).

mod diff;
mod parse;

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash as _, Hasher as _},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use tokio::task::JoinHandle;
use tracing::warn;

use super::{Objects, Source, SourceEvent, Updates};
use crate::model::Problem;
use diff::{FileView, Reading};
use parse::{place, split_documents};

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
        // Reading and parsing are blocking work (a large file takes seconds to parse
        // the first time): a thread of its own, not a task of the agent's runtime.
        tokio::task::spawn_blocking(move || self.follow(&updates))
    }
}

/// How long a changed file must stay the same before it is applied: a writer that
/// rewrites the file in place (not by rename) is caught mid-way by a reader, and a
/// half-written file would remove every service it did not reach yet.
const SETTLE: Duration = Duration::from_millis(100);

/// Documents parsed and said at a time on the first read (before it, the agent does
/// not sync, so the pieces are programmed together; after it, one version's changes
/// go in one event, so that no sync sees half of them).
const FIRST_READ_PIECE: usize = 2_000;

/// What one look at the file found.
enum Read {
    /// The same bytes as last applied.
    Unchanged,
    /// The same bytes as last applied, read again because the metadata changed (or
    /// might have missed a change): remembered with the new metadata.
    Same(Version),
    /// New bytes, stable for `SETTLE`.
    Changed(Vec<u8>, Version),
    /// New bytes still changing: looked at again on the next poll.
    Changing,
}

/// A version of the file as last applied: the hash of its bytes, and what its
/// metadata said when they were read.
#[derive(Clone, Copy)]
struct Version {
    hash: u64,
    stamp: Stamp,
    read_at: SystemTime,
}

/// What tells a file's versions apart without reading it: every write (and every
/// `utimes`, `chmod`…) moves its change time, which no writer can set back; a rename
/// over it changes its inode. A 100,000-service file is 66 MB: reading
/// and hashing it at every poll cost a tenth of a CPU and held 66 MB resident half
/// the time.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    device: u64,
    inode: u64,
    len: u64,
    changed_ns: i128,
}

/// A write within this long after a read may not have moved the timestamps the read
/// saw (file systems with coarse clocks): until a read is this much younger than the
/// file's last change, the file is read and hashed again at every poll.
const TIMESTAMP_GRANULARITY: Duration = Duration::from_secs(2);

impl Stamp {
    fn of(metadata: &std::fs::Metadata) -> Stamp {
        Stamp {
            device: metadata.dev(),
            inode: metadata.ino(),
            len: metadata.len(),
            changed_ns: i128::from(metadata.ctime()) * 1_000_000_000
                + i128::from(metadata.ctime_nsec()),
        }
    }
}

impl Version {
    /// Whether a file with this stamp is surely still this version.
    fn surely_is(&self, stamp: &Stamp) -> bool {
        let settled_before = self
            .read_at
            .checked_sub(TIMESTAMP_GRANULARITY)
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |t| t.as_nanos() as i128);
        *stamp == self.stamp && stamp.changed_ns < settled_before
    }
}

/// Tells a file's versions, and its documents, apart.
fn hash_of(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
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

    fn read(&self, last: Option<&Version>) -> std::io::Result<Read> {
        let metadata = std::fs::metadata(&self.path)?;
        // Only regular files: reading a FIFO would block until a writer comes.
        if !metadata.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        let stamp = Stamp::of(&metadata);
        if last.is_some_and(|last| last.surely_is(&stamp)) {
            return Ok(Read::Unchanged);
        }
        let read_at = SystemTime::now();
        let bytes = std::fs::read(&self.path)?;
        let hash = hash_of(&bytes);
        let version = Version {
            hash,
            stamp,
            read_at,
        };
        if last.is_some_and(|last| last.hash == hash) {
            return Ok(Read::Same(version));
        }
        std::thread::sleep(SETTLE);
        let again = std::fs::read(&self.path)?;
        Ok(if again == bytes {
            Read::Changed(bytes, version)
        } else {
            Read::Changing
        })
    }

    /// Says what a new version of the file changed; false once the agent stopped
    /// listening.
    fn say_changes(
        &self,
        view: &mut FileView,
        bytes: &[u8],
        first: bool,
        updates: &Updates,
        origin: &str,
    ) -> bool {
        let text = String::from_utf8_lossy(bytes);
        let reading = Reading {
            origin,
            allow_empty: self.allow_empty,
            piece: if first { FIRST_READ_PIECE } else { usize::MAX },
        };
        let mut listening = true;
        let mut batch = Vec::new();
        let problems = view.update(&text, &reading, &mut |changes| {
            if !first {
                batch.extend(changes);
            } else if listening && !changes.is_empty() {
                updates.wait_until_queued_at_most(1);
                listening = updates.send_blocking(SourceEvent::Changes {
                    changes,
                    problems: Vec::new(),
                });
            }
        });
        if !problems.is_empty() {
            warn!(
                path = %origin,
                unreadable = problems.len(),
                "part of the file could not be read: updating what was read, removing nothing"
            );
        }
        // A later version is said even when it changes nothing: its problems (none,
        // say, once a bad document was taken out) replace the last version's.
        if first && problems.is_empty() {
            return listening;
        }
        listening
            && updates.send_blocking(SourceEvent::Changes {
                changes: batch,
                problems,
            })
    }

    fn follow(self, updates: &Updates) {
        let origin = self.path.display().to_string();
        let mut view = FileView::default();
        let mut last = None;
        let mut unreadable_reported = false;
        let mut listed = false;
        while !updates.is_closed() {
            match self.read(last.as_ref()) {
                Ok(Read::Changed(bytes, version)) => {
                    unreadable_reported = false;
                    last = Some(version);
                    if !self.say_changes(&mut view, &bytes, !listed, updates, &origin) {
                        return;
                    }
                }
                Ok(Read::Same(version)) => last = Some(version),
                Ok(Read::Unchanged | Read::Changing) => {}
                Err(e) if !unreadable_reported => {
                    unreadable_reported = true;
                    warn!(path = %origin, "manifests unreadable ({e}); keeping the last programmed state");
                    let trouble = SourceEvent::Trouble {
                        what: origin.clone(),
                        error: e.to_string(),
                    };
                    if !updates.send_blocking(trouble) {
                        return;
                    }
                }
                Err(_) => {}
            }
            // After the first look, whatever it found: a file that vanished or is
            // being written leaves the pinned state as it is (nothing is said, so
            // nothing is synced or removed).
            if !listed {
                listed = true;
                if !updates.send_blocking(SourceEvent::Listed) {
                    return;
                }
            }
            std::thread::sleep(self.poll_interval);
        }
    }
}

/// Parses a whole file at once (tests, benchmarks, one-shot use): its objects and
/// what could not be read.
pub fn parse(text: &str, origin: &str) -> (Objects, Vec<Problem>) {
    let documents = split_documents(text);
    let mut objects = Objects::default();
    let mut problems = Vec::new();
    for (index, parsed) in parse::parse_documents(&documents).into_iter().enumerate() {
        match parsed {
            Ok(more) => {
                objects.services.extend(more.services);
                objects.slices.extend(more.slices);
                objects.nodes.extend(more.nodes);
            }
            Err(message) => problems.push(Problem::error(place(index, origin), message)),
        }
    }
    (objects, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_read_again_only_when_its_metadata_changed_or_may_have_missed_a_change() {
        let path = std::env::temp_dir().join(format!("epx-stamp-{}.yaml", std::process::id()));
        std::fs::write(&path, GOOD_SERVICE).expect("write");
        let source = ManifestsSource {
            path: path.clone(),
            poll_interval: Duration::from_millis(100),
            allow_empty: false,
        };
        let first = source.read(None);
        let (just_written, settled, changed) = match &first {
            Ok(Read::Changed(_, first)) => {
                // Just written: its timestamps may not show a write in the same tick.
                let just_written = source.read(Some(first));
                let settled = Version {
                    read_at: first.read_at + TIMESTAMP_GRANULARITY * 2,
                    ..*first
                };
                let unchanged = source.read(Some(&settled));
                // Rewritten in place, same length: the change time moved.
                std::fs::write(&path, GOOD_SERVICE.replace("10.96.0.10", "10.96.0.11"))
                    .expect("write");
                (just_written, unchanged, source.read(Some(&settled)))
            }
            _ => (first, Ok(Read::Changing), Ok(Read::Changing)),
        };
        let _ = std::fs::remove_file(&path);
        assert!(
            matches!(just_written, Ok(Read::Same(_))),
            "a first read is a change, and a second soon after reads again"
        );
        assert!(matches!(settled, Ok(Read::Unchanged)));
        assert!(matches!(changed, Ok(Read::Changed(_, _))));
    }

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
}
