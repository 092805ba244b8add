//! `namespace/name` of a Kubernetes object, as the change tracker keys everything by
//! it: one allocation, shared by every map that names the object (a clone is a
//! reference count), where a pair of `String`s cost two allocations per copy and the
//! tracker holds about seven copies per service.

use std::{cmp::Ordering, fmt, sync::Arc};

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ObjectKey {
    /// `namespace/name`.
    text: Arc<str>,
    /// Where the name starts in `text`.
    name_at: u32,
}

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> ObjectKey {
        ObjectKey {
            text: format!("{namespace}/{name}").into(),
            name_at: namespace.len() as u32 + 1,
        }
    }

    /// From an object's metadata fields: a missing namespace is `default`, as the API
    /// server would have it.
    pub fn of(namespace: &Option<String>, name: &Option<String>) -> ObjectKey {
        ObjectKey::new(
            namespace.as_deref().unwrap_or("default"),
            name.as_deref().unwrap_or("<unnamed>"),
        )
    }

    pub fn namespace(&self) -> &str {
        &self.text[..self.name_at as usize - 1]
    }

    pub fn name(&self) -> &str {
        &self.text[self.name_at as usize..]
    }
}

/// By namespace, then name (as the pair it replaces: "first by namespace/name" rules
/// depend on it, and `a-b/x` sorts after `a/x` only when compared field by field).
impl Ord for ObjectKey {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.namespace(), self.name()).cmp(&(other.namespace(), other.name()))
    }
}

impl PartialOrd for ObjectKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::ObjectKey;

    #[test]
    fn orders_by_namespace_then_name() {
        let (a, ab) = (ObjectKey::new("a", "x"), ObjectKey::new("a-b", "x"));
        assert!(a < ab, "as (\"a\", \"x\") < (\"a-b\", \"x\")");
        assert_eq!(ab.namespace(), "a-b");
        assert_eq!(ab.name(), "x");
        assert_eq!(ab.to_string(), "a-b/x");
        assert_eq!(
            ObjectKey::of(&None, &Some("s".into())).to_string(),
            "default/s"
        );
    }
}
