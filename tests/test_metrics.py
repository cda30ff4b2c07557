"""Tests for ldm_jax.metrics: FID against scipy, PRDC against brute-force NumPy."""

import numpy as np
import pytest

from ldm_jax import metrics

scipy_linalg = pytest.importorskip("scipy.linalg")


# ----------------------------------------------------------------------------
# References (float64 NumPy / SciPy)
# ----------------------------------------------------------------------------


def _fid_ref(mu1, s1, mu2, s2):
    covmean = scipy_linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def _prdc_ref(real, fake, k_pr, k_dc):
    real = np.asarray(real, np.float64)
    fake = np.asarray(fake, np.float64)

    def dists(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    d_rr, d_ff, d_rf = dists(real, real), dists(fake, fake), dists(real, fake)
    # k-th NN excluding self: index k of the sorted row (index 0 is self, 0).
    r_pr = np.sort(d_rr, axis=1)[:, k_pr]
    r_dc = np.sort(d_rr, axis=1)[:, k_dc]
    s_pr = np.sort(d_ff, axis=1)[:, k_pr]
    return {
        "precision": float((d_rf <= r_pr[:, None]).any(axis=0).mean()),
        "recall": float((d_rf <= s_pr[None, :]).any(axis=1).mean()),
        "density": float((d_rf <= r_dc[:, None]).sum() / (k_dc * fake.shape[0])),
        "coverage": float((d_rf <= r_dc[:, None]).any(axis=1).mean()),
    }


def _random_cov_feats(rng, n, d):
    """Correlated, anisotropic, non-zero-mean features."""
    mix = rng.normal(size=(d, d)) * np.linspace(0.1, 2.0, d)[None, :]
    return rng.normal(size=(n, d)) @ mix + rng.normal(size=d) * 3.0


# ----------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------


def test_feature_stats_matches_numpy():
    rng = np.random.default_rng(0)
    x = _random_cov_feats(rng, 500, 8).astype(np.float32)
    mu, sigma = metrics.feature_stats(x)
    assert mu.shape == (8,) and sigma.shape == (8, 8)
    assert sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)


def test_fid_self_is_zero():
    rng = np.random.default_rng(1)
    x = _random_cov_feats(rng, 2000, 64)
    _, sigma = metrics.feature_stats(x)
    fid = metrics.fid_from_features(x, x)
    assert abs(fid) <= 1e-6 * np.trace(sigma)


def test_fid_mean_shift_is_closed_form():
    rng = np.random.default_rng(2)
    x = _random_cov_feats(rng, 2000, 64)
    delta = rng.normal(size=64)
    fid = metrics.fid_from_features(x, x + delta)
    expected = float(delta @ delta)
    assert fid == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n1,n2", [(3000, 2500), (40, 3000), (30, 50)])
def test_frechet_distance_matches_scipy(n1, n2):
    """Full-rank and rank-deficient (N < D = 64) covariances."""
    rng = np.random.default_rng(n1 + n2)
    d = 64
    f1 = _random_cov_feats(rng, n1, d)
    f2 = _random_cov_feats(rng, n2, d) * 0.7 + 0.5
    mu1, s1 = metrics.feature_stats(f1)
    mu2, s2 = metrics.feature_stats(f2)
    if n1 < d:
        assert np.linalg.matrix_rank(s1) < d
    fid = metrics.frechet_distance(mu1, s1, mu2, s2)
    ref = _fid_ref(mu1, s1, mu2, s2)
    assert np.isfinite(fid)
    assert fid == pytest.approx(ref, rel=1e-6)


def test_frechet_distance_singular_no_nan():
    """Exactly rank-1 covariances with tiny negative eigenvalues from round-off."""
    rng = np.random.default_rng(3)
    v = rng.normal(size=(32, 1))
    s = v @ v.T  # rank 1; eigh returns ~-1e-15 eigenvalues
    fid = metrics.frechet_distance(np.zeros(32), s, np.zeros(32), s)
    assert np.isfinite(fid)
    assert abs(fid) <= 1e-6 * np.trace(s)
    # Orthogonal rank-1 covariances: sqrt(S1 S2) = 0, FID = tr S1 + tr S2.
    u = np.zeros((32, 1))
    u[0] = 1.0
    w = np.zeros((32, 1))
    w[1] = 2.0
    fid = metrics.frechet_distance(np.zeros(32), u @ u.T, np.ones(32), w @ w.T)
    assert fid == pytest.approx(32.0 + 1.0 + 4.0, rel=1e-6)


# ----------------------------------------------------------------------------
# Precision / recall / density / coverage
# ----------------------------------------------------------------------------


def test_prdc_identical_sets():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    out = metrics.prdc(x, x, block=64)
    ref = _prdc_ref(x, x, 3, 5)
    assert out["precision"] == 1.0
    assert out["recall"] == 1.0
    assert out["coverage"] == 1.0
    assert out["density"] >= 1.0
    assert out["density"] == pytest.approx(ref["density"], abs=1e-12)
    # No ties in continuous data: each ball holds its centre and k neighbours.
    assert out["density"] == pytest.approx((5 + 1) / 5, abs=1e-12)


@pytest.mark.parametrize(
    "case,block", [("shifted", 64), ("shifted", 1000), ("scaled", 64), ("heavy_tailed", 64)]
)
def test_prdc_matches_bruteforce(case, block):
    rng = np.random.default_rng({"shifted": 5, "scaled": 6, "heavy_tailed": 7}[case])
    real = rng.normal(size=(300, 16))
    if case == "shifted":
        fake = rng.normal(size=(250, 16)) + 0.5
    elif case == "scaled":
        fake = rng.normal(size=(250, 16)) * 0.6
    else:
        fake = rng.standard_t(df=3, size=(250, 16)) + 10.0 * (rng.random((250, 1)) < 0.1)
    real = real.astype(np.float32)
    fake = fake.astype(np.float32)
    out = metrics.prdc(real, fake, k_pr=3, k_dc=5, block=block)
    ref = _prdc_ref(real, fake, 3, 5)
    for key in ("precision", "recall", "density", "coverage"):
        assert out[key] == pytest.approx(ref[key], abs=1e-12), key
    # Non-trivial values, so the comparison means something.
    assert any(0.0 < out[key] < 1.0 for key in ("precision", "recall", "coverage"))
    assert out["density"] > 0.0

    p, r = metrics.precision_recall(real, fake, k=3, block=block)
    assert (p, r) == (out["precision"], out["recall"])
    d, c = metrics.density_coverage(real, fake, k=5, block=block)
    assert (d, c) == (out["density"], out["coverage"])


def test_prdc_disjoint_sets():
    rng = np.random.default_rng(8)
    real = rng.normal(size=(300, 16))
    fake = rng.normal(size=(250, 16)) + 100.0
    out = metrics.prdc(real, fake, block=64)
    assert out["precision"] == 0.0
    assert out["recall"] == 0.0
    assert out["coverage"] == 0.0
    assert out["density"] == 0.0


def test_knn_radii_exclude_self_and_bad_k():
    x = np.arange(10, dtype=np.float32)[:, None]  # points 0..9 on a line
    r2 = metrics.knn_sq_radii(x, (1, 2), block=4)
    np.testing.assert_array_equal(np.asarray(r2[1]), np.ones(10))
    # 2nd NN of an end point is 2 away, of an interior point 1 away.
    np.testing.assert_array_equal(np.asarray(r2[2]), [4] + [1] * 8 + [4])
    with pytest.raises(ValueError):
        metrics.knn_sq_radii(x, (10,))


def test_class_coverage_against_hand_values():
    """Recognisable share, histogram and KL(reference || smoothed samples), by hand."""
    probs = np.array([[0.95, 0.05, 0.0], [0.2, 0.7, 0.1], [0.05, 0.93, 0.02],
                      [0.91, 0.04, 0.05]])
    ref = np.array([0, 1, 2, 2])  # reference: 1/4, 1/4, 1/2
    out = metrics.class_coverage(probs, ref, threshold=0.9)
    assert out["recognisable"] == 0.75  # 0.7 is not > 0.9
    np.testing.assert_allclose(out["class_hist"], [0.5, 0.5, 0.0])
    smoothed = np.array([2.5, 2.5, 0.5]) / 5.5  # counts + 1/2 over 4 + 3/2
    want = 0.25 * np.log(0.25 / smoothed[0]) + 0.25 * np.log(0.25 / smoothed[1]) \
        + 0.5 * np.log(0.5 / smoothed[2])
    assert out["class_kl"] == pytest.approx(want, rel=1e-12)
    # Samples drawn with the reference's frequencies score ~0 (only the smoothing remains);
    # a missing class costs more than an uneven histogram.
    even = metrics.class_coverage(np.eye(3)[np.repeat([0, 1, 2, 2], 250)], ref)
    assert even["class_kl"] < 1e-3 and even["recognisable"] == 1.0
    assert out["class_kl"] > metrics.class_coverage(np.eye(3)[[0, 1, 2, 1]], ref)["class_kl"]
