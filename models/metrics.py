"""Sample-quality metrics on features and class probabilities, in float64, following the ADM evaluator.

- ``fid_from_features`` / ``frechet_distance``: Fréchet distance of Gaussians fitted to two feature
  sets (unbiased covariance, as ADM and torch-fidelity).
- ``fid_interval``: FID with a seeded bootstrap interval over the first set's rows (its sampling
  noise; the second set, shared by every set scored against it, is held fixed).
- ``inception_score``: exp(E_x KL(p(y|x) || p(y))) per split, mean and std over splits, after a
  seeded shuffle (class-ordered samples make every split hold few classes and collapse IS).
- ``precision_recall``: Kynkäänniemi et al. 2019 k-NN manifolds (ADM's ManifoldEstimator, k = 3).
- ``class_accuracy``: how often argmax of a classifier's output is the label.

Inputs are numpy arrays or torch tensors (any float dtype); results are Python floats. Which
feature space the numbers live in (Inception or the proxy evalnet) is the caller's to report.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _float64(x: ArrayLike, name: str, dims: int) -> np.ndarray:
    array = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if array.ndim != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or inf values")
    return array


# -- FID -----------------------------------------------------------------------------------------


def feature_statistics(features_ND: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(mean_D, covariance_DD) with the unbiased (N - 1) covariance, as ADM and torch-fidelity."""
    features = _float64(features_ND, "features_ND", 2)
    if len(features) < 2:
        raise ValueError(f"FID needs at least 2 feature vectors per set, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def _psd_eigh(matrix_DD: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """eigh of a symmetric PSD matrix with rounding-negative eigenvalues set to 0; a matrix that
    is not PSD beyond rounding (relative 1e-6) is rejected by ``name``."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix_DD + matrix_DD.T) / 2)
    if eigenvalues.min(initial=0.0) < -1e-6 * max(np.abs(eigenvalues).max(initial=0.0), 1e-300):
        raise ValueError(f"{name} is not a covariance matrix (negative eigenvalue {eigenvalues.min():.3g})")
    return np.clip(eigenvalues, 0, None), eigenvectors


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """‖mu1 − mu2‖² + tr(sigma1 + sigma2 − 2·(sigma1·sigma2)^½), >= 0.

    tr((sigma1·sigma2)^½) is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix sigma1^½·sigma2·sigma1^½, which has the same eigenvalues. This avoids the
    pitfalls of ``scipy.linalg.sqrtm`` on the non-symmetric product that ADM and torch-fidelity work
    around (an imaginary part they discard, a non-finite result they retry with an eps·I offset):
    here the eigenvalues are real, and the tiny negative ones rounding gives singular covariances
    (fewer samples than dimensions) are clipped to 0. Covariances that are not PSD beyond rounding
    are rejected.
    """
    mu1, mu2 = _float64(mu1, "mu1", 1), _float64(mu2, "mu2", 1)
    sigma1, sigma2 = _float64(sigma1, "sigma1", 2), _float64(sigma2, "sigma2", 2)
    dim = len(mu1)
    if mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f"shapes differ: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    _psd_eigh(sigma2, "sigma2")
    eigenvalues1, eigenvectors1 = _psd_eigh(sigma1, "sigma1")
    root1 = (eigenvectors1 * np.sqrt(eigenvalues1)) @ eigenvectors1.T
    eigenvalues, _ = _psd_eigh(root1 @ sigma2 @ root1, "sigma1^1/2 sigma2 sigma1^1/2")
    trace_sqrt = np.sqrt(eigenvalues).sum()
    distance = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    return float(max(distance, 0.0))  # rounding can leave -1e-13 for identical statistics


def fid_from_features(features_a_ND: ArrayLike, features_b_MD: ArrayLike) -> float:
    """FID between two feature sets (sizes may differ; ADM uses 50k samples vs the reference set).

    With fewer vectors than dimensions in a set (e.g. 1,000 samples of 2048-d Inception features)
    the covariances are low-rank and the distance is computed from the centred samples instead:
    with sigma_a = AᵀA/(N-1) and sigma_b = BᵀB/(M-1), the non-zero eigenvalues of sigma_a·sigma_b
    are the squared singular values of A·Bᵀ/sqrt((N-1)(M-1)), so tr((sigma_a·sigma_b)^½) is that
    N x M matrix's nuclear norm. Same value as ``frechet_distance`` on the statistics (up to
    rounding), without D x D eigendecompositions (seconds each at D = 2048).
    """
    a = _float64(features_a_ND, "features_a_ND", 2)
    b = _float64(features_b_MD, "features_b_MD", 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} and {b.shape[1]}")
    if min(len(a), len(b)) >= a.shape[1]:
        return frechet_distance(*feature_statistics(a), *feature_statistics(b))
    if min(len(a), len(b)) < 2:
        raise ValueError(f"FID needs at least 2 feature vectors per set, got {len(a)} and {len(b)}")
    centred_a, centred_b = a - a.mean(axis=0), b - b.mean(axis=0)
    scale_a, scale_b = len(a) - 1, len(b) - 1
    cross = centred_a @ centred_b.T / np.sqrt(scale_a * scale_b)
    trace_sqrt = np.linalg.svd(cross, compute_uv=False).sum()
    distance = (
        ((a.mean(axis=0) - b.mean(axis=0)) ** 2).sum()
        + (centred_a**2).sum() / scale_a
        + (centred_b**2).sum() / scale_b
        - 2 * trace_sqrt
    )
    return float(max(distance, 0.0))


def fid_interval(
    features_a_ND: ArrayLike, features_b_MD: ArrayLike, resamples: int = 50, level: float = 0.9, seed: int = 0
) -> tuple[float, float, float]:
    """(fid, lo, hi): ``fid_from_features(a, b)`` and a ``level`` normal bootstrap interval around it.

    The rows of ``a`` (e.g. the generated samples) are drawn with replacement ``resamples`` times
    (seeded: the same inputs give the same interval); lo/hi = fid ∓ z·sd, sd the standard deviation
    of the resamples' FIDs, z the normal quantile of ``level`` (1.645 at 0.9), lo clamped at 0.
    Centred on the point estimate on purpose: resampled sets hold duplicates, which bias their FID
    upwards by about as much as FID's own small-sample bias, a shift every set of the same size
    shares; the spread is the sampling noise two sets of that size are compared under. ``b`` (the
    reference set) is held fixed. Costs ``resamples`` covariances of ``a`` and eigendecompositions
    of D x D (about 3 ms each at N = 1,000, D = 128 on one core).
    """
    a = _float64(features_a_ND, "features_a_ND", 2)
    b = _float64(features_b_MD, "features_b_MD", 2)
    if resamples < 2 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 2 and 0 < level < 1, got {resamples} and {level}")
    point = fid_from_features(a, b)
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(a), len(a)) for _ in range(resamples)]
    if min(len(a), len(b)) < a.shape[1]:  # low-rank covariances: the nuclear-norm route, row copies
        fids = [fid_from_features(a[rows], b) for rows in draws]
    else:  # b's square root once; a resample is a row-count weighting of a (no copies of a)
        mu_b, sigma_b = feature_statistics(b)
        eigenvalues_b, eigenvectors_b = _psd_eigh(sigma_b, "sigma_b")
        root_b = (eigenvectors_b * np.sqrt(eigenvalues_b)) @ eigenvectors_b.T
        fids = []
        for rows in draws:
            counts_N = np.bincount(rows, minlength=len(a)).astype(np.float64)
            mu = counts_N @ a / len(a)
            centred = a - mu
            sigma = (centred.T * counts_N) @ centred / (len(a) - 1)
            product = root_b @ sigma @ root_b  # same eigenvalues as sigma·sigma_b
            trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()
            distance = ((mu - mu_b) ** 2).sum() + np.trace(sigma) + np.trace(sigma_b) - 2 * trace_sqrt
            fids.append(max(distance, 0.0))
    half_width = NormalDist().inv_cdf((1 + level) / 2) * float(np.std(fids, ddof=1))
    return point, max(point - half_width, 0.0), point + half_width


# -- Inception Score -----------------------------------------------------------------------------


def inception_score(probs_NC: ArrayLike, splits: int = 10, shuffle_seed: int | None = 0) -> tuple[float, float]:
    """(mean, std) over ``splits`` of exp(mean_x KL(p(y|x) || p(y))), p(y) the split's mean.

    The rows are shuffled with ``shuffle_seed`` first (None keeps their order): samples generated
    class by class would otherwise give splits holding few classes, capping IS at their count.
    1 for a constant output; the number of classes C for confident, class-balanced predictions.
    """
    probs = _float64(probs_NC, "probs_NC", 2)
    if splits < 1 or len(probs) < splits:
        raise ValueError(f"need 1 <= splits <= N, got splits={splits} for N={len(probs)}")
    if (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1, atol=1e-3):
        raise ValueError("probs_NC rows must be probability vectors (apply softmax to logits first)")
    if shuffle_seed is not None:
        probs = probs[np.random.default_rng(shuffle_seed).permutation(len(probs))]
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        # 0·log 0 = 0: a zero probability contributes nothing (and log(0) is never taken).
        log_part = np.log(part, out=np.zeros_like(part), where=part > 0)
        log_marginal = np.log(marginal, out=np.zeros_like(marginal), where=marginal > 0)
        scores.append(np.exp((part * (log_part - log_marginal)).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# -- Precision / recall --------------------------------------------------------------------------


def _squared_distances(a_MD: torch.Tensor, b_ND: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances (M, N) in float64, clamped at 0 against rounding."""
    return (a_MD.square().sum(1)[:, None] - 2 * a_MD @ b_ND.T + b_ND.square().sum(1)[None, :]).clamp_min_(0)


def knn_radii(features_ND: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour in the set, itself excluded."""
    if not 1 <= k < len(features_ND):
        raise ValueError(f"k must be in [1, N - 1], got k={k} for N={len(features_ND)}")
    radii = []
    for start in range(0, len(features_ND), batch_size):
        distances = _squared_distances(features_ND[start : start + batch_size], features_ND)
        # Index k of the k+1 smallest: index 0 is the point itself (distance 0), as in ADM.
        radii.append(distances.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def precision_recall(
    real_features_ND: ArrayLike, fake_features_MD: ArrayLike, k: int = 3, batch_size: int = 1024
) -> tuple[float, float]:
    """(precision, recall) of Kynkäänniemi et al. with k-NN radii, as ADM's evaluator.

    precision: share of fake points within the k-NN ball of some real point (fidelity).
    recall: share of real points within the k-NN ball of some fake point (coverage).
    Distances are computed ``batch_size`` rows at a time: 10k x 10k features take
    ``batch_size`` x 10k x 8 bytes (80 MB) at once, never the full 800 MB matrix.
    """
    real = torch.from_numpy(_float64(real_features_ND, "real_features_ND", 2))
    fake = torch.from_numpy(_float64(fake_features_MD, "fake_features_MD", 2))
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: real {real.shape[1]}, fake {fake.shape[1]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    real_radii, fake_radii = knn_radii(real, k, batch_size), knn_radii(fake, k, batch_size)
    fake_in_real = torch.zeros(len(fake), dtype=torch.bool)
    real_in_fake = torch.zeros(len(real), dtype=torch.bool)
    for start in range(0, len(fake), batch_size):
        distances = _squared_distances(fake[start : start + batch_size], real)  # (fake rows, all real)
        fake_in_real[start : start + batch_size] = (distances <= real_radii[None, :]).any(dim=1)
        real_in_fake |= (distances <= fake_radii[start : start + batch_size, None]).any(dim=0)
    return float(fake_in_real.double().mean()), float(real_in_fake.double().mean())


# -- Class accuracy ------------------------------------------------------------------------------


def class_accuracy(scores_NC: ArrayLike, labels_N: ArrayLike) -> float:
    """Share of rows whose argmax (of logits or probabilities) is the label, in [0, 1]."""
    scores = torch.as_tensor(scores_NC).detach()
    labels = torch.as_tensor(labels_N).detach()
    if scores.dim() != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"expected scores (N, C) and labels (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}")
    if len(labels) == 0:
        raise ValueError("class_accuracy of an empty set")
    return float((scores.argmax(dim=1).cpu() == labels.cpu().long()).double().mean())
