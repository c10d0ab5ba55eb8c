//! The counter-based hash behind seeds, synthetic weights and the race's uniforms: values that
//! are pure functions of (key, index), so any of them can be computed alone, in parallel, or on
//! a GPU (the `race_rows` kernel spells the same function), and come out the same.

/// SplitMix64's finalizer: a bijection of u64 that spreads every input bit over the output.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
