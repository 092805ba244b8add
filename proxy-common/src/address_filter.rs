//! The address filter: a bit set over hashed addresses that every packet the data path
//! could have anything to do with names, by its destination (a frontend's address, a
//! node address answering NodePorts) or by its source (a backend, answering one of
//! its flows). Most packets on a node are neither; the filter sends them on after two
//! array reads, before a 40-byte conntrack key is hashed and looked up (Katran looks
//! its VIP up first for the same reason).
//!
//! A set bit may stand for an address that is not ours (two addresses share a bit, or
//! an address left since): such a packet takes the full look-ups, as before. A clear
//! bit must never stand for one that is: the agent sets an address's bit before any
//! map names it, and clears bits only by rebuilding the set from what the maps and
//! conntrack still name (`address_filter` in the agent).
//!
//! The array holds the bits, then one word, `ADDRESS_FILTER_READY`, that the agent
//! sets once it has filled them: until then (a map created by an agent upgrading from
//! a version without the filter) every packet is a candidate.

use crate::Addr;

/// 2^21 bits (256 KiB): at 10,000 services of 10 endpoints each, about 5% are set,
/// so about 10% of the packets that are not ours (two addresses tested) take the
/// full look-ups.
pub const ADDRESS_FILTER_BITS_LOG2: u32 = 21;
pub const ADDRESS_FILTER_WORDS: u32 = 1 << (ADDRESS_FILTER_BITS_LOG2 - 6);
/// The word after the bits: nonzero once the agent has filled them.
pub const ADDRESS_FILTER_READY: u32 = ADDRESS_FILTER_WORDS;
pub const ADDRESS_FILTER_ENTRIES: u32 = ADDRESS_FILTER_WORDS + 1;

/// The bit of an address, of either family (an IPv4 address and the IPv6 address
/// whose words fold to the same value share a bit: harmless, as any collision).
#[inline(always)]
pub fn address_filter_bit(addr: &Addr) -> u32 {
    let [a, b, c, d] = addr.words;
    // A 32-bit finaliser (lowbias32): every input bit moves the bits kept, so
    // addresses that differ in any octet spread over the whole set.
    let mut x = a ^ b.rotate_left(8) ^ c.rotate_left(16) ^ d.rotate_left(24);
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x >> (32 - ADDRESS_FILTER_BITS_LOG2)
}

/// The word holding a bit, and the bit's mask in it.
#[inline(always)]
pub const fn address_filter_word(bit: u32) -> (u32, u64) {
    (bit >> 6, 1 << (bit & 63))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_stay_in_the_set_and_spread_over_it() {
        // 10.96.x.y, as services number their addresses: neighbours differ in the
        // last octets only.
        let mut bits = [false; 1 << 12];
        let mut distinct = 0;
        for i in 0..4096u32 {
            let v4 = Addr::from_v4_be(u32::from_be_bytes([10, 96, (i >> 8) as u8, i as u8]));
            let bit = address_filter_bit(&v4);
            assert!(bit < 1 << ADDRESS_FILTER_BITS_LOG2);
            let bucket = (bit >> (ADDRESS_FILTER_BITS_LOG2 - 12)) as usize;
            if !bits[bucket] {
                bits[bucket] = true;
                distinct += 1;
            }
            let (word, _) = address_filter_word(bit);
            assert!(word < ADDRESS_FILTER_WORDS);
        }
        // 4,096 addresses into 4,096 buckets: a uniform hash fills about 63% of them
        // (1 - 1/e); a hash that ignored an octet would fill at most 256.
        assert!(distinct > 2400, "{distinct} buckets of 4096");
    }
}
