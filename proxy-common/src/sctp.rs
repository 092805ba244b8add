//! SCTP as the data path translates it: the checksum update a port rewrite needs,
//! and the chunk that moves an association's conntrack entry.
//!
//! **The checksum.** SCTP's CRC32c covers the common header (ports included) and
//! every chunk, but not the IP addresses: an address rewrite leaves it alone, a port
//! rewrite changes it. Recomputing it would cost a pass over the whole packet (and
//! would silently "repair" a packet corrupted on the way, which the receiver must
//! drop). A CRC is linear over GF(2) instead: for two packets of the same length,
//! `crc(A) ^ crc(B) = crc0(A ^ B)`, the CRC without its initial and final inversions.
//! `A ^ B` is zero but for the changed port bytes at the start of the header, so
//! `crc0(A ^ B) = D(x) · x^(8·len) mod P`, where `D` is the XOR of the old and new
//! port bytes (the first four bytes of the packet, read as a reflected polynomial)
//! and `len` the SCTP packet's length. The update is therefore two multiplications
//! modulo P whatever the packet's size (`x^(8·len)` comes from two 256-entry tables
//! built at compile time), like RFC 1624's incremental Internet checksum, and a
//! corrupted packet stays corrupted.
//!
//! **Conntrack** (`next`). An association goes through TCP's states, moved by the
//! first chunk of each packet: INIT opens it half-open; the backend's INIT-ACK keeps
//! it half-open; only the backend's COOKIE-ACK establishes it, since the backend
//! sends one only for a COOKIE-ECHO that returns the cookie of its own INIT-ACK,
//! which a client spoofing its address never saw. (TCP establishes on the client's
//! ACK, because a backend resets a forged one; an SCTP backend silently discards a
//! packet with a wrong verification tag, so nothing would close an entry a forged
//! packet had established.) SHUTDOWN and SHUTDOWN-ACK are the FINs, ABORT and
//! SHUTDOWN-COMPLETE the resets. INIT, INIT-ACK and SHUTDOWN-COMPLETE are never
//! bundled, COOKIE-ECHO and COOKIE-ACK come first in theirs (RFC 9260 6.10), so the
//! first chunk decides every handshake step; an ABORT bundled behind DATA leaves the
//! entry to its idle timeout (netfilter walks every chunk; the data path reads one).

use crate::{CT_CLOSING, CT_ESTABLISHED, CT_F_FIN, CT_F_REPLY, CT_SYN_RECV, CT_SYN_SENT};

/// The common header (ports, verification tag, checksum) and one chunk header: the
/// least a packet the kernel's SCTP input accepts holds.
pub const MIN_PACKET_LEN: usize = 12 + 4;
/// Where the CRC32c sits in the common header (little-endian, as Linux stores it).
pub const CHECKSUM_OFFSET: usize = 8;
/// Where the first chunk's type sits.
pub const FIRST_CHUNK_OFFSET: usize = 12;

/// Chunk types that move an association's state (RFC 9260 3.2).
pub const CHUNK_INIT: u8 = 1;
pub const CHUNK_INIT_ACK: u8 = 2;
pub const CHUNK_ABORT: u8 = 6;
pub const CHUNK_SHUTDOWN: u8 = 7;
pub const CHUNK_SHUTDOWN_ACK: u8 = 8;
pub const CHUNK_COOKIE_ECHO: u8 = 10;
pub const CHUNK_COOKIE_ACK: u8 = 11;
pub const CHUNK_SHUTDOWN_COMPLETE: u8 = 14;

/// ABORT and SHUTDOWN-COMPLETE: the association is over (a reset, in TCP's terms).
#[inline(always)]
pub const fn ends_association(chunk: u8) -> bool {
    chunk == CHUNK_ABORT || chunk == CHUNK_SHUTDOWN_COMPLETE
}

/// The entry's (state, flags) after a packet whose first chunk is `chunk` travelled
/// in its direction (see the module's documentation); `peer_shutdown` says whether
/// the other direction already sent its SHUTDOWN (or SHUTDOWN-ACK), asked only when
/// this packet carries one. A pure function, as `tcp::next`.
#[inline(always)]
pub fn next(state: u8, flags: u8, chunk: u8, peer_shutdown: impl FnOnce() -> bool) -> (u8, u8) {
    let from_backend = flags & CT_F_REPLY != 0;
    match chunk {
        _ if ends_association(chunk) => (CT_CLOSING, flags),
        CHUNK_SHUTDOWN | CHUNK_SHUTDOWN_ACK => {
            if flags & CT_F_FIN != 0 {
                return (state, flags); // a retransmission
            }
            let state = if peer_shutdown() { CT_CLOSING } else { state };
            (state, flags | CT_F_FIN)
        }
        CHUNK_INIT_ACK if from_backend && state == CT_SYN_SENT => (CT_SYN_RECV, flags),
        CHUNK_COOKIE_ACK if from_backend && state == CT_SYN_RECV => (CT_ESTABLISHED, flags),
        // An association picked up mid-stream (its entry lost): the backend's answer
        // establishes it (a backend that does not know it answers with an ABORT).
        _ if from_backend && state == CT_SYN_SENT && chunk != CHUNK_INIT => (CT_ESTABLISHED, flags),
        _ => (state, flags),
    }
}

/// Whether a packet whose first chunk is `chunk` opens a new association on a closed
/// one's tuple: the client's INIT, as `tcp::reopens`.
#[inline(always)]
pub fn reopens(state: u8, flags: u8, chunk: u8) -> bool {
    state == CT_CLOSING && flags & CT_F_REPLY == 0 && chunk == CHUNK_INIT
}

/// CRC32c's polynomial, reflected: bit 31 is the coefficient of x^0.
const POLY: u32 = 0x82f6_3b78;
/// The polynomial 1 (x^0) in that representation.
const ONE: u32 = 1 << 31;

/// `a · b mod P`, without a data-dependent branch (each would double the paths the
/// verifier walks).
#[inline(always)]
const fn multiply(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut degree = 0;
    while degree < 32 {
        // The coefficient of x^degree in `a`, as an all-ones or all-zeros mask.
        let take = 0u32.wrapping_sub((a >> (31 - degree)) & 1);
        product ^= b & take;
        // b · x: a shift, reduced by P when x^31's coefficient moves out.
        b = (b >> 1) ^ (POLY & 0u32.wrapping_sub(b & 1));
        degree += 1;
    }
    product
}

/// `multiply` where packets are translated. In the data path, a global function: the
/// verifier checks it once, for any arguments, instead of its 32 unrolled steps again
/// at each of its calls on every path (63% of the SCTP pod program's verifier work).
/// Global only if the linker keeps it so (`--export`, in proxy-userspace's build.rs).
#[cfg(target_arch = "bpf")]
#[no_mangle]
#[inline(never)]
pub extern "C" fn crc32c_multiply(a: u32, b: u32) -> u32 {
    multiply(a, b)
}

#[cfg(not(target_arch = "bpf"))]
#[inline(always)]
fn crc32c_multiply(a: u32, b: u32) -> u32 {
    multiply(a, b)
}

/// `x^(8·step·i) mod P` for i in 0..256: powers of x for lengths in bytes.
const fn powers(step: u32) -> [u32; 256] {
    let mut x_8step = ONE;
    let mut bit = 0;
    while bit < 8 * step {
        x_8step = (x_8step >> 1) ^ (POLY & 0u32.wrapping_sub(x_8step & 1));
        bit += 1;
    }
    let mut table = [0; 256];
    let mut power = ONE;
    let mut i = 0;
    while i < 256 {
        table[i] = power;
        power = multiply(power, x_8step);
        i += 1;
    }
    table
}

/// `x^(8·l)` for the low byte of a length, and `x^(8·256·h)` for its high byte.
static X_POW_8_LOW: [u32; 256] = powers(1);
static X_POW_8_HIGH: [u32; 256] = powers(256);

/// What to XOR into the checksum (read little-endian) of a `len`-byte SCTP packet
/// whose first four bytes changed by `ports_xor` (old XOR new, in packet order).
#[inline(always)]
fn checksum_delta(ports_xor: [u8; 4], len: u16) -> u32 {
    let [low, high] = len.to_le_bytes();
    let x_pow = crc32c_multiply(
        X_POW_8_LOW[usize::from(low)],
        X_POW_8_HIGH[usize::from(high)],
    );
    crc32c_multiply(u32::from_le_bytes(ports_xor), x_pow)
}

/// The checksum field (as its four bytes) after the port at `port_offset` (0 for the
/// source, 2 for the destination) of a `len`-byte SCTP packet changed from `old` to
/// `new` (both as their two bytes in the packet).
#[inline(always)]
pub fn updated_checksum(
    checksum: [u8; 4],
    port_offset: usize,
    old: [u8; 2],
    new: [u8; 2],
    len: u16,
) -> [u8; 4] {
    let mut ports_xor = [0; 4];
    // Branch-free placement: the source port's change in bytes 0-1, the destination
    // port's in bytes 2-3 (`port_offset` is one of the two).
    let dst = (port_offset >> 1) & 1;
    ports_xor[2 * dst] = old[0] ^ new[0];
    ports_xor[2 * dst + 1] = old[1] ^ new[1];
    (u32::from_le_bytes(checksum) ^ checksum_delta(ports_xor, len)).to_le_bytes()
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// A packet of `len` pseudo-random bytes with a valid checksum.
    fn packet(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        let mut bytes: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        set_checksum(&mut bytes);
        bytes
    }

    /// The checksum as RFC 9260 appendix A computes it, by the `crc32c` crate.
    fn set_checksum(bytes: &mut [u8]) {
        bytes[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4].fill(0);
        let crc = crc32c::crc32c(bytes);
        bytes[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn the_reference_crc_is_crc32c() {
        // RFC 3720 B.4 / the usual check value of CRC-32C.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn the_incremental_update_equals_a_recomputation_at_every_length_class() {
        let lengths = (16..600)
            .chain([1499, 1500, 4095, 4096, 9000, 65_535 - 20])
            .chain((1..256).map(|h| h * 256))
            .chain((1..256).map(|h| h * 256 + 255));
        for (seed, len) in lengths.enumerate() {
            let original = packet(len, seed as u64 + 1);
            for (offset, new) in [(0, [0x1f, 0x90]), (2, [0xc3, 0x50]), (0, [0, 0])] {
                let mut expected = original.clone();
                expected[offset..offset + 2].copy_from_slice(&new);
                set_checksum(&mut expected);
                let checksum = original[8..12].try_into().expect("a slice of the packet");
                let old = original[offset..offset + 2]
                    .try_into()
                    .expect("a slice of the packet");
                let updated = updated_checksum(checksum, offset, old, new, len as u16);
                assert_eq!(updated, expected[8..12], "length {len}, port at {offset}");
            }
        }
    }

    #[test]
    fn a_corrupted_packet_stays_corrupted() {
        let mut bytes = packet(200, 7);
        bytes[100] ^= 0x40; // corrupted on the way, after its checksum was made
        let checksum = bytes[8..12].try_into().expect("a slice of the packet");
        let updated = updated_checksum(checksum, 2, [bytes[2], bytes[3]], [0, 80], 200);
        bytes[2..4].copy_from_slice(&[0, 80]);
        let mut recomputed = bytes.clone();
        set_checksum(&mut recomputed);
        assert_ne!(updated, recomputed[8..12], "the receiver must still see it");
        // Undo the corruption: the updated checksum is exactly right for the rest.
        bytes[100] ^= 0x40;
        set_checksum(&mut bytes);
        assert_eq!(updated, bytes[8..12]);
    }
}
