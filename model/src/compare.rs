//! How far a result is from its reference: the one measure the tests of every crate and the
//! GPU check use, so that a NaN can never pass as "close".

/// Largest absolute difference between two slices; infinite when their lengths differ or a
/// difference is NaN (`f32::max` would skip a NaN and report the rest as close).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .map(|d| if d.is_nan() { f32::INFINITY } else { d })
        .fold(0.0, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_and_length_mismatch_are_never_close() {
        assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.0, 2.5]), 0.5);
        assert_eq!(max_abs_diff(&[], &[]), 0.0);
        assert_eq!(max_abs_diff(&[1.0, f32::NAN], &[1.0, 2.0]), f32::INFINITY);
        assert_eq!(max_abs_diff(&[f32::NAN], &[f32::NAN]), f32::INFINITY);
        assert_eq!(max_abs_diff(&[1.0], &[1.0, 2.0]), f32::INFINITY);
    }
}
