//! The agent's half of the address filter (`proxy_common::address_filter`): the data
//! path sends a packet on untouched when neither of its addresses has its bit set, so
//! a bit must be set before any map names its address, and stay set while anything
//! does.
//!
//! - Growing: the syncer adds a frontend's, its endpoints' and the node's addresses
//!   before it writes the maps that name them (`insert`).
//! - Shrinking: bits are never cleared one by one (a bit is shared, and a removed
//!   backend's flows live on in conntrack). Each conntrack collection rebuilds the set
//!   from what still names an address: the programmed frontends and backends, the
//!   node's addresses, and every conntrack entry (`rebuild`). The syncer does both,
//!   one after the other, so no frontend is programmed between the census and the
//!   write; a flow the data path opens meanwhile is to an address the programmed
//!   state names.

use std::path::Path;

use anyhow::Result;
use proxy_common::{
    address_filter_bit, address_filter_word, map_name, Addr, CtEntry, CtKey, ADDRESS_FILTER_READY,
    ADDRESS_FILTER_WORDS, CT_F_RELATED, CT_F_REPLY,
};

use crate::datapath::mmap::MappedArray;

/// A set of addresses as the filter holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressBits {
    words: Vec<u64>,
}

impl Default for AddressBits {
    fn default() -> AddressBits {
        AddressBits {
            words: vec![0; ADDRESS_FILTER_WORDS as usize],
        }
    }
}

impl AddressBits {
    /// Adds an address; returns the index of its word if that word changed.
    pub fn insert(&mut self, addr: &Addr) -> Option<usize> {
        let (word, mask) = address_filter_word(address_filter_bit(addr));
        let word = word as usize;
        let changed = self.words[word] & mask == 0;
        self.words[word] |= mask;
        changed.then_some(word)
    }

    /// The address of a conntrack entry's key that the data path tests for it: an
    /// original direction's destination (a frontend, or a node address for a
    /// NodePort), a reply's source (the backend). A related flow's entries are
    /// keyed by either end, so both count.
    pub fn insert_flow(&mut self, key: &CtKey, entry: &CtEntry) {
        if entry.flags & (CT_F_REPLY | CT_F_RELATED) != 0 {
            self.insert(&key.src);
        }
        if entry.flags & CT_F_REPLY == 0 {
            self.insert(&key.dst);
        }
    }

    /// How many bits are set.
    pub fn count(&self) -> u32 {
        self.words.iter().map(|word| word.count_ones()).sum()
    }
}

/// The filter in the map, and the agent's copy of it (the only writer).
pub struct AddressFilter {
    map: MappedArray<u64>,
    bits: AddressBits,
}

impl AddressFilter {
    pub fn open(pin_dir: &Path) -> Result<AddressFilter> {
        let map = MappedArray::<u64>::open(pin_dir, map_name::ADDRESS_FILTER)?;
        let bits = AddressBits {
            words: map.read(0, ADDRESS_FILTER_WORDS as usize)?,
        };
        Ok(AddressFilter { map, bits })
    }

    /// Adds the addresses; their bits are in the map when this returns.
    pub fn insert(&mut self, addrs: impl IntoIterator<Item = Addr>) -> Result<()> {
        let changed: Vec<usize> = addrs
            .into_iter()
            .filter_map(|addr| self.bits.insert(&addr))
            .collect();
        let (Some(first), Some(last)) = (changed.iter().min(), changed.iter().max()) else {
            return Ok(());
        };
        self.map.write(*first, &self.bits.words[*first..=*last])
    }

    /// Replaces the set with `bits`, which must hold every address any map names
    /// (see the module's comment), and marks the filter ready: from here on the
    /// data path trusts it.
    pub fn rebuild(&mut self, bits: AddressBits) -> Result<()> {
        // Word by word, each written whole: an address in both sets is never missing.
        self.map.write(0, &bits.words)?;
        self.bits = bits;
        self.map.write(ADDRESS_FILTER_READY as usize, &[1])
    }

    /// The share of bits set: the share of packets not ours that still take the
    /// full look-ups, per address tested.
    pub fn occupancy(&self) -> f64 {
        f64::from(self.bits.count()) / f64::from(ADDRESS_FILTER_WORDS * 64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::{CtEntry, CT_F_REPLY};

    fn addr(last: u8) -> Addr {
        Addr::from_v4_be(u32::from_be_bytes([10, 0, 0, last]))
    }

    fn key(src: u8, dst: u8) -> CtKey {
        CtKey {
            src: addr(src),
            dst: addr(dst),
            sport: 1,
            dport: 2,
            proto: 6,
            family: 4,
            _pad: [0; 2],
        }
    }

    fn holds(bits: &AddressBits, a: &Addr) -> bool {
        bits.clone().insert(a).is_none()
    }

    #[test]
    fn an_entry_counts_by_the_address_the_data_path_tests() {
        let entry = |flags| CtEntry {
            flags,
            ..CtEntry::default()
        };
        let mut bits = AddressBits::default();
        bits.insert_flow(&key(1, 2), &entry(0));
        assert!(holds(&bits, &addr(2)) && !holds(&bits, &addr(1)));
        let mut bits = AddressBits::default();
        bits.insert_flow(&key(3, 4), &entry(CT_F_REPLY));
        assert!(holds(&bits, &addr(3)) && !holds(&bits, &addr(4)));
        let mut bits = AddressBits::default();
        bits.insert_flow(&key(5, 6), &entry(CT_F_RELATED));
        assert!(holds(&bits, &addr(5)) && holds(&bits, &addr(6)));
    }

    #[test]
    fn an_insert_reports_only_a_changed_word() {
        let mut bits = AddressBits::default();
        assert!(bits.insert(&addr(7)).is_some());
        assert!(bits.insert(&addr(7)).is_none());
        assert_eq!(bits.count(), 1);
    }
}
