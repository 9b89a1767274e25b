//! The statistics of the benchmark's alternating rounds: the mean of paired ratios, its
//! bootstrap interval, and whether an interval settles a target.

pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Resamples of the bootstrap: enough that the 2.5 % and 97.5 % points move by less
/// than the report's printed precision from one seed to another.
const RESAMPLES: usize = 4_000;

/// The 95 % percentile-bootstrap interval of the mean of `v` (NaN with fewer than two
/// values: one pair says nothing of the spread). Seeded, so a report's intervals
/// follow from its own runs alone.
pub fn bootstrap_mean_ci(v: &[f64]) -> [f64; 2] {
    if v.len() < 2 {
        return [f64::NAN; 2];
    }
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        // xorshift64*: far more than a resample index needs.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let n = v.len();
    let mut means: Vec<f64> = (0..RESAMPLES)
        .map(|_| (0..n).map(|_| v[(next() % n as u64) as usize]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    [nearest_rank(&means, 0.025), nearest_rank(&means, 0.975)]
}

fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Whether an interval settles a "at least `goal`" target: met (all of it at or above),
/// missed (all of it below), or too wide to judge (None; a NaN interval too).
pub fn judge(ci: [f64; 2], goal: f64) -> Option<bool> {
    if ci[0] >= goal {
        Some(true)
    } else if ci[1] < goal {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_holds_the_mean_within_the_values_and_is_reproducible() {
        let v = [0.90, 0.909, 0.944, 0.876, 0.947];
        let m = mean(&v);
        let [lo, hi] = bootstrap_mean_ci(&v);
        assert!(
            0.876 <= lo && lo < m && m < hi && hi <= 0.947,
            "{lo} {m} {hi}"
        );
        assert_eq!(bootstrap_mean_ci(&v), [lo, hi]);
    }

    #[test]
    fn one_value_has_no_interval_and_constant_values_a_point() {
        assert!(bootstrap_mean_ci(&[1.0]).iter().all(|x| x.is_nan()));
        assert_eq!(bootstrap_mean_ci(&[2.0; 6]), [2.0, 2.0]);
    }

    #[test]
    fn a_wider_spread_gives_a_wider_interval() {
        let narrow: Vec<f64> = (0..8).map(|i| 1.0 + 0.001 * i as f64).collect();
        let wide: Vec<f64> = (0..8).map(|i| 1.0 + 0.1 * i as f64).collect();
        let w = |ci: [f64; 2]| ci[1] - ci[0];
        assert!(w(bootstrap_mean_ci(&wide)) > 10.0 * w(bootstrap_mean_ci(&narrow)));
    }

    #[test]
    fn an_interval_settles_a_target_only_when_it_is_all_on_one_side() {
        assert_eq!(judge([0.96, 1.02], 0.95), Some(true));
        assert_eq!(judge([0.95, 1.02], 0.95), Some(true));
        assert_eq!(judge([0.90, 0.94], 0.95), Some(false));
        assert_eq!(judge([0.93, 0.99], 0.95), None);
        assert_eq!(judge([f64::NAN, f64::NAN], 0.95), None);
    }
}
