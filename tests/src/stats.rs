//! The statistics of the benchmark's alternating rounds: the mean of paired ratios, its
//! bootstrap interval, and whether an interval settles a target.

pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Resamples of the bootstrap: enough that its outer points (the 0.1 % and 99.9 % of
/// five pairs' expanded interval) rest on a score of resamples each.
const RESAMPLES: usize = 20_000;

/// The 95 % interval of the mean of `v` from a bootstrap over its values (NaN with
/// fewer than two: one pair says nothing of the spread). The percentile interval of a
/// few values is too narrow (for five, it covers the mean about 85 % of the time, not
/// 95 %), so it is expanded as Hesterberg shows ("What teachers should know about the
/// bootstrap", 2015): its percentiles are those of a normal quantile widened to
/// Student's t with n − 1 degrees of freedom and by √(n / (n − 1)). Seeded, so a
/// report's intervals follow from its own runs alone.
pub fn bootstrap_mean_ci(v: &[f64]) -> [f64; 2] {
    let n = v.len();
    if n < 2 {
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
    let mut means: Vec<f64> = (0..RESAMPLES)
        .map(|_| (0..n).map(|_| v[(next() % n as u64) as usize]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let z = (n as f64 / (n - 1) as f64).sqrt() * t_975(n - 1);
    let tail = normal_cdf(-z);
    [nearest_rank(&means, tail), nearest_rank(&means, 1.0 - tail)]
}

fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Student's t 97.5 % quantile for `df` degrees of freedom (tables; 1.96 beyond 30).
fn t_975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    T.get(df.wrapping_sub(1)).copied().unwrap_or(1.96)
}

/// The standard normal distribution function (Abramowitz and Stegun 7.1.26, error
/// below 1.5e-7).
fn normal_cdf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs() / std::f64::consts::SQRT_2);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-(x * x) / 2.0).exp();
    if x >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
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
    fn five_pairs_get_an_interval_about_as_wide_as_students() {
        // Student's 95 % half-width for these five: 2.776 · s / √5.
        let v = [0.90, 0.93, 0.95, 0.97, 1.00];
        let m = mean(&v);
        let s = (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / 4.0).sqrt();
        let half = 2.776 * s / 5f64.sqrt();
        let [lo, hi] = bootstrap_mean_ci(&v);
        // The bootstrap of five values cannot reach beyond them; it must reach past the
        // plain percentile interval's ±1.75 s/√n.
        assert!(lo >= 0.90 && hi <= 1.00, "{lo} {hi}");
        assert!(
            m - lo > 0.8 * half.min(m - 0.90) && hi - m > 0.8 * half.min(1.00 - m),
            "{lo} {hi} ±{half}"
        );
        assert!((normal_cdf(1.96) - 0.975).abs() < 1e-4 && (normal_cdf(0.0) - 0.5).abs() < 1e-7);
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
