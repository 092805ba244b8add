//! The Internet checksum, in one place: incremental updates (RFC 1624) for programs
//! that write packet bytes directly (XDP), and the full sum of headers the data path
//! builds (IPIP outer headers, ICMP errors). Operands are the raw in-memory values of
//! header fields: the one's complement sum is byte-order independent as long as all
//! of them are.

#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    // Three folds take any sum of a few 16-bit words down to 16 bits.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum after a 32-bit field changed from `old` to `new`: HC' = ~(~HC + ~m + m').
#[inline(always)]
pub fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let not_old = !old;
    let sum = u64::from(!check)
        + u64::from(not_old >> 16)
        + u64::from(not_old & 0xffff)
        + u64::from(new >> 16)
        + u64::from(new & 0xffff);
    !fold(sum)
}

/// The checksum after a 128-bit field (an IPv6 address, in an L4 pseudo-header)
/// changed from `old` to `new`: the field's difference (`diff128`) added in.
#[inline(always)]
pub fn replace128(check: u16, old: &proxy_common::Addr, new: &proxy_common::Addr) -> u16 {
    !fold(u64::from(!check) + u64::from(diff128(old, new)))
}

/// The 32-bit one's complement difference a 128-bit field's change from `old` to
/// `new` makes to a sum (the kernel's `__wsum` as `bpf_l4_csum_replace` takes it).
#[inline(always)]
pub fn diff128(old: &proxy_common::Addr, new: &proxy_common::Addr) -> u32 {
    let mut sum: u64 = 0;
    for (old, new) in old.words.iter().zip(new.words.iter()) {
        sum += u64::from(!*old) + u64::from(*new);
    }
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum as u32
}

/// The checksum after a 16-bit field changed from `old` to `new`.
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    !fold(u64::from(!check) + u64::from(!old) + u64::from(new))
}

/// The checksum of `N` 16-bit words (raw memory order in and out).
#[inline(always)]
pub fn of_words<const N: usize>(words: &[u16; N]) -> u16 {
    let mut sum: u64 = 0;
    for word in words {
        sum += u64::from(*word);
    }
    !fold(sum)
}

/// The checksum of a sum of 16-bit words (raw memory order in and out).
#[inline(always)]
pub fn finish(sum: u64) -> u16 {
    !fold(sum)
}
