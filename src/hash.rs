//! MurmurHash3 x86_32, the hash Unleash uses for sticky rollouts and variant
//! splits, written here so that hashing `"<groupId>:<value>"` streams over
//! the pieces without building the joined string (evaluation must not
//! allocate).

/// The seed of rollout buckets (Unleash's `normalizedValue`).
pub const ROLLOUT_SEED: u32 = 0;
/// The seed of variant splits (Unleash's `VARIANT_NORMALIZATION_SEED`).
pub const VARIANT_SEED: u32 = 86_028_157;

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

/// MurmurHash3 x86_32 of the concatenation of `parts`, with `seed`.
pub fn murmur3_32(parts: &[&[u8]], seed: u32) -> u32 {
    let mut h = seed;
    // Bytes of a 4-byte block split across two parts wait here.
    let mut carry: u32 = 0;
    let mut carry_len = 0u32;
    let mut total: usize = 0;
    for part in parts {
        total += part.len();
        let mut bytes = *part;
        if carry_len > 0 {
            while carry_len < 4 && !bytes.is_empty() {
                carry |= u32::from(bytes[0]) << (8 * carry_len);
                carry_len += 1;
                bytes = &bytes[1..];
            }
            if carry_len < 4 {
                continue;
            }
            h = mix_block(h, carry);
            carry = 0;
            carry_len = 0;
        }
        let mut blocks = bytes.chunks_exact(4);
        for block in &mut blocks {
            h = mix_block(
                h,
                u32::from_le_bytes([block[0], block[1], block[2], block[3]]),
            );
        }
        for &b in blocks.remainder() {
            carry |= u32::from(b) << (8 * carry_len);
            carry_len += 1;
        }
    }
    if carry_len > 0 {
        h ^= carry.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    }
    // The length is mixed in modulo 2^32, as the reference implementation does.
    h ^= total as u32;
    fmix(h)
}

/// Unleash's normalized hash: `murmur3("<group>:<value>", seed) % modulus + 1`,
/// a number from 1 to `modulus`. `modulus` must not be zero.
pub fn normalized(group: &str, value: &str, modulus: u64, seed: u32) -> u64 {
    u64::from(murmur3_32(
        &[group.as_bytes(), b":", value.as_bytes()],
        seed,
    )) % modulus
        + 1
}

fn mix_block(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks the hash of `input` (split at every position, so the streaming
    /// carry is exercised) against `expected`.
    fn check(input: &str, seed: u32, expected: u32) {
        let bytes = input.as_bytes();
        assert_eq!(
            murmur3_32(&[bytes], seed),
            expected,
            "{input:?} seed {seed}"
        );
        for i in 0..=bytes.len() {
            for j in i..=bytes.len() {
                let parts = [&bytes[..i], &bytes[i..j], &bytes[j..]];
                assert_eq!(
                    murmur3_32(&parts, seed),
                    expected,
                    "{input:?} split {i},{j}"
                );
            }
        }
    }

    #[test]
    fn reference_vectors() {
        check("", 0, 0);
        check("", 1, 0x514e_28b7);
        check("", 0xffff_ffff, 0x81f1_6f39);
        check("a", 0, 0x3c25_69b2);
        check("test", 0, 0xba6b_d213);
        check("Hello, world!", 0, 0xc036_3e43);
        check("Hello, world!", 1234, 0xfaf6_cdb3);
        check(
            "The quick brown fox jumps over the lazy dog",
            0,
            0x2e4f_f723,
        );
    }

    #[test]
    fn unleash_normalized_values() {
        // The values Unleash's SDKs pin in their own tests.
        assert_eq!(normalized("gr1", "123", 100, ROLLOUT_SEED), 73);
        assert_eq!(normalized("groupX", "999", 100, ROLLOUT_SEED), 25);
        // Variant hashing uses another seed, so the buckets differ.
        assert_ne!(
            normalized("gr1", "123", 100, VARIANT_SEED),
            normalized("gr1", "123", 100, ROLLOUT_SEED)
        );
    }
}
