"""FID, Inception Score, precision/recall and class accuracy on constructed cases with known answers."""

import numpy as np
import pytest
import torch

from models.metrics import (
    class_accuracy,
    feature_statistics,
    fid_from_features,
    fid_interval,
    frechet_distance,
    inception_score,
    precision_recall,
)


def gaussian(count: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, dim)) + shift


# -- FID ------------------------------------------------------------------------------------------


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_mean_shift():
    features = gaussian(500, 8, seed=0)
    assert fid_from_features(features, features) == pytest.approx(0, abs=1e-9)
    shifts = [0.0, 0.1, 0.3, 1.0, 3.0]
    fids = [fid_from_features(features, features + shift) for shift in shifts]
    assert fids == sorted(fids) and fids[0] < 1e-9
    # A pure mean shift s in every one of 8 dims adds exactly 8·s² (covariances are equal).
    assert fids[3] == pytest.approx(8.0, rel=1e-9)


def test_fid_between_independent_samples_is_small_and_grows_with_the_shift():
    base = gaussian(2000, 4, seed=1)
    near, far = gaussian(2000, 4, seed=2), gaussian(2000, 4, seed=3, shift=0.5)
    assert fid_from_features(base, near) < 0.05 < fid_from_features(base, far)


def test_fid_matches_hand_computed_values():
    # Diagonal Gaussians: |mu1 - mu2|² = 1 + 4; traces 5 + 13; 2·tr sqrt(diag(4, 36)) = 16.
    value = frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.array([1.0, 2.0]), np.diag([4.0, 9.0]))
    assert value == pytest.approx(7.0, abs=1e-12)
    # 1-d sets: means 1 and 3, unbiased variances 2 and 8: 4 + 2 + 8 - 2·sqrt(16) = 6.
    assert fid_from_features(np.array([[0.0], [2.0]]), np.array([[1.0], [5.0]])) == pytest.approx(6.0, abs=1e-12)
    # torch input, float32, gives the same (computed in float64).
    a = torch.tensor([[0.0], [2.0]])
    assert fid_from_features(a, torch.tensor([[1.0], [5.0]])) == pytest.approx(6.0, abs=1e-12)


def test_fid_matches_scipy_sqrtm_on_non_commuting_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    mu1, sigma1 = feature_statistics(gaussian(300, 6, seed=4) @ np.random.default_rng(5).normal(size=(6, 6)))
    mu2, sigma2 = feature_statistics(gaussian(300, 6, seed=6) @ np.random.default_rng(7).normal(size=(6, 6)))
    covmean = linalg.sqrtm(sigma1 @ sigma2).real  # the ADM / torch-fidelity route
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)


def test_fid_with_fewer_samples_than_dimensions_is_finite():
    few = gaussian(10, 32, seed=8)  # rank-deficient covariance: sqrtm's imaginary-part pitfall
    assert fid_from_features(few, few) == pytest.approx(0, abs=1e-8)
    assert np.isfinite(fid_from_features(few, gaussian(12, 32, seed=9)))


def test_fid_from_fewer_samples_than_dimensions_equals_the_statistics_route():
    # the sample (nuclear-norm) route used when N < D gives the D x D eigendecomposition's value (which
    # adds the square roots of rounding-level eigenvalues of the rank-deficient product: rel 1e-8)
    a, b = gaussian(20, 64, seed=1), gaussian(30, 64, seed=2, shift=0.3) * 1.5
    expected = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(b, a) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="feature dims differ"):
        fid_from_features(a, b[:, :32])


def test_fid_rejects_bad_inputs():
    with pytest.raises(ValueError, match="sigma2 is not a covariance"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -1.0]))
    with pytest.raises(ValueError, match="shapes differ"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_features(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="NaN"):
        fid_from_features(np.full((3, 2), np.nan), np.zeros((3, 2)))


def test_fid_interval_brackets_the_point_estimate_and_narrows_with_more_samples():
    reference = gaussian(400, 8, seed=0)
    widths = []
    for count in (100, 1600):
        samples = gaussian(count, 8, seed=1, shift=0.3)
        fid, lo, hi = fid_interval(samples, reference, resamples=50, seed=0)
        assert fid == fid_from_features(samples, reference)
        assert 0 <= lo < fid < hi
        assert fid_interval(samples, reference, resamples=50, seed=0) == (fid, lo, hi)  # seeded
        widths.append(hi - lo)
    # sampling noise falls as 1/sqrt(N): 16x the samples, about a quarter of the width
    assert widths[1] < widths[0] / 2


@pytest.mark.parametrize("count, dim", [(300, 8), (20, 64)])  # the statistics route and the N < D route
def test_fid_interval_is_the_spread_of_fid_over_rows_drawn_with_replacement(count, dim):
    samples, reference = gaussian(count, dim, seed=1, shift=0.2), gaussian(40 if dim > count else 200, dim, seed=2)
    rng = np.random.default_rng(7)  # the draws fid_interval makes with seed 7
    fids = [fid_from_features(samples[rng.integers(0, count, count)], reference) for _ in range(20)]
    fid, lo, hi = fid_interval(samples, reference, resamples=20, level=0.9, seed=7)
    half_width = 1.6448536269514722 * np.std(fids, ddof=1)
    assert hi - fid == pytest.approx(half_width, rel=1e-6)
    assert lo == pytest.approx(max(fid - half_width, 0), rel=1e-6, abs=1e-12)


def test_fid_intervals_of_one_distribution_overlap_and_a_shift_separates_them():
    reference = gaussian(500, 4, seed=0)
    first, second = (fid_interval(gaussian(500, 4, seed=s, shift=0.5), reference) for s in (1, 2))
    shifted = fid_interval(gaussian(500, 4, seed=3, shift=1.0), reference)
    assert first[1] <= second[2] and second[1] <= first[2]
    assert shifted[1] > max(first[2], second[2])
    with pytest.raises(ValueError, match="resamples >= 2"):
        fid_interval(reference, reference, resamples=1)


# -- Inception Score ------------------------------------------------------------------------------


def one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.eye(classes)[labels]


def test_inception_score_is_one_for_a_constant_output():
    probs = np.tile([0.7, 0.2, 0.1], (100, 1))
    mean, std = inception_score(probs, splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_is_the_class_count_for_confident_balanced_predictions():
    classes = 10
    interleaved = one_hot(np.arange(1000) % classes, classes)  # every split exactly balanced
    mean, std = inception_score(interleaved, splits=10, shuffle_seed=None)
    assert mean == pytest.approx(classes, rel=1e-12) and std == pytest.approx(0, abs=1e-9)
    # Random splits are only nearly balanced: exp(H) of a split's marginal is C·(1 - about (C-1)/2n).
    shuffled = one_hot(np.arange(10_000) % classes, classes)
    assert inception_score(shuffled, splits=10, shuffle_seed=0)[0] == pytest.approx(classes, rel=0.01)


def test_inception_score_shuffles_class_ordered_samples_before_splitting():
    classes = 10
    by_class = one_hot(np.repeat(np.arange(classes), 1000), classes)  # generated class by class
    collapsed, _ = inception_score(by_class, splits=10, shuffle_seed=None)
    assert collapsed == pytest.approx(1.0)  # each split holds one class: the pitfall
    assert inception_score(by_class, splits=10)[0] > 9.9
    assert inception_score(by_class, splits=10, shuffle_seed=0) == inception_score(by_class, splits=10, shuffle_seed=0)


def test_inception_score_rejects_logits_and_too_many_splits():
    with pytest.raises(ValueError, match="softmax"):
        inception_score(np.array([[2.0, -1.0], [0.5, 0.5]]), splits=1)
    with pytest.raises(ValueError, match="splits"):
        inception_score(one_hot(np.arange(4) % 2, 2), splits=5)


# -- Precision / recall ---------------------------------------------------------------------------


def clusters(modes: list[int], per_mode: int, seed: int, spread: float = 0.1) -> np.ndarray:
    """Tight 2-d Gaussian clusters at (10·m, 0) for each mode m."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(size=(per_mode, 2)) * spread + [10.0 * m, 0.0] for m in modes])


def test_precision_recall_of_identical_sets_is_one():
    real = clusters(list(range(5)), 40, seed=0)
    assert precision_recall(real, real.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero():
    real = clusters([0, 1, 2], 40, seed=0)
    assert precision_recall(real, real + 1000.0, k=3) == (0.0, 0.0)


def test_half_the_modes_gives_half_the_recall_and_full_precision():
    real = clusters(list(range(10)), 100, seed=1)
    fake = clusters([0, 2, 4, 6, 8], 100, seed=2)  # fresh samples of half the modes
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.95
    assert recall == pytest.approx(0.5, abs=0.03)
    # The blocked computation does not depend on the block size.
    assert precision_recall(real, fake, k=3, batch_size=37) == (precision, recall)


def test_precision_recall_rejects_bad_k_and_mismatched_dims():
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)
    with pytest.raises(ValueError, match="dims differ"):
        precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))


# -- Class accuracy -------------------------------------------------------------------------------


def test_class_accuracy_counts_argmax_hits():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [5.0, 4.0, 9.0], [0.1, 0.0, 0.2]])
    assert class_accuracy(logits, torch.tensor([0, 1, 0, 0])) == 0.5
    assert class_accuracy(logits.softmax(-1).numpy(), np.array([0, 1, 2, 2])) == 1.0
    with pytest.raises(ValueError, match="expected scores"):
        class_accuracy(logits, torch.tensor([0, 1]))
