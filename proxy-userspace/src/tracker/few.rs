//! A set of a few elements, usually one (the slices of a service, the claimants of a
//! frontend): sorted, with the first element inline. A `BTreeSet` allocates a whole
//! node (room for eleven elements, about 550 bytes for two-string keys) for its first
//! element, which at 100,000 services was a third of the agent's memory; a `Vec`, an
//! allocation per set.

use smallvec::SmallVec;

#[derive(Clone, Debug)]
pub struct Few<T>(SmallVec<[T; 1]>);

impl<T> Default for Few<T> {
    fn default() -> Self {
        Few(SmallVec::new())
    }
}

impl<T: Ord> Few<T> {
    pub fn insert(&mut self, value: T) {
        if let Err(at) = self.0.binary_search(&value) {
            self.0.insert(at, value);
        }
    }

    pub fn remove(&mut self, value: &T) {
        if let Ok(at) = self.0.binary_search(value) {
            self.0.remove(at);
        }
    }

    /// The smallest element.
    pub fn first(&self) -> Option<&T> {
        self.0.first()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }
}

impl<'a, T> IntoIterator for &'a Few<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::Few;

    #[test]
    fn stays_sorted_and_unique() {
        let mut few = Few::default();
        for value in [3, 1, 2, 3, 1] {
            few.insert(value);
        }
        assert_eq!(few.iter().copied().collect::<Vec<_>>(), [1, 2, 3]);
        few.remove(&1);
        few.remove(&7);
        assert_eq!(few.first(), Some(&2));
        few.remove(&2);
        few.remove(&3);
        assert!(few.is_empty());
    }
}
