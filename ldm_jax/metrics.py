"""Feature-space sample-quality metrics: FID and precision/recall/density/coverage.

All metrics work on 2-D feature arrays ``[N, D]`` (e.g. 10,000 x 128 features of
an MNIST classifier, or 10,000 x 2048 Inception pool features).

* FID (Heusel et al., 2017, "GANs Trained by a Two Time-Scale Update Rule
  Converge to a Local Nash Equilibrium"): Frechet distance between Gaussians
  fitted to the two feature sets.
* Improved precision / recall (Kynkaanniemi et al., 2019, "Improved Precision
  and Recall Metric for Assessing Generative Models"), k = 3.
* Density / coverage (Naeem et al., 2020, "Reliable Fidelity and Diversity
  Metrics for Generative Models"), k = 5.
* Class coverage (``class_coverage``, on a classifier's probabilities, not on
  features): the recognisable share and how far the samples' class histogram
  is from the reference labels' (mode coverage).

Precision
---------
* ``feature_stats`` computes mean and covariance in float64 NumPy.
* ``frechet_distance`` runs in JAX under the ``jax.enable_x64(True)`` context
  (jax's own context manager; ``jax.experimental.enable_x64`` is gone in
  jax 0.10), so the eigendecompositions are float64 regardless of the global
  ``jax_enable_x64`` flag. This matches a float64 ``scipy.linalg.sqrtm``
  reference to ~1e-12 relative (~1e-9 for rank-deficient covariances, where
  scipy's sqrtm of a singular matrix is itself approximate). ``x64=False``
  runs in float32 instead (1e-5 to 5e-4 relative error already at D=64; not
  for reported numbers).
* The k-NN metrics compute squared distances in float32 JAX (matmul at
  ``Precision.HIGHEST`` so GPUs do not silently use TF32/bf16) on data centred
  on the real-feature mean, to limit cancellation in ``|a|^2 + |b|^2 - 2ab``.
  Only points within float32 round-off of a ball boundary can be classified
  differently from a float64 computation (none in the tests, which compare
  exact counts). Identical real/fake sets reuse bitwise-identical distances,
  so exact ties (a point at exactly its neighbour's radius) are consistent.
"""

from __future__ import annotations

import functools
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# --------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------


def feature_stats(feats) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased (ddof=1) covariance of a feature set, in float64.

    Args:
      feats: Array  # [N, D], N >= 2; any float dtype, NumPy or JAX.

    Returns:
      mu: np.ndarray     # [D] float64
      sigma: np.ndarray  # [D, D] float64
    """
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"feats must be [N, D] with N >= 2, got {x.shape}")
    mu = x.mean(axis=0)
    xc = x - mu
    sigma = (xc.T @ xc) / (x.shape[0] - 1)
    sigma = 0.5 * (sigma + sigma.T)  # exactly symmetric
    return mu, sigma


def _psd_sqrt(s: Array) -> Array:
    """Symmetric PSD matrix square root via eigh; negative eigenvalues -> 0."""
    w, v = jnp.linalg.eigh(s)
    return (v * jnp.sqrt(jnp.clip(w, 0.0))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2, x64: bool = True) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID).

    d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) (Heusel et al., 2017).

    The trace term uses Tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i(A S2 A)) with
    A = S1^{1/2} (S1 S2 is similar to the symmetric PSD matrix A S2 A), so
    only symmetric ``jnp.linalg.eigh`` is needed: no complex sqrtm, no NaN for
    rank-deficient covariances (tiny negative eigenvalues are clipped to 0).

    Args:
      mu1: Array     # [D]
      sigma1: Array  # [D, D], symmetric PSD
      mu2: Array     # [D]
      sigma2: Array  # [D, D], symmetric PSD
      x64: compute in float64 inside ``jax.enable_x64(True)`` (default and
        recommended); False computes in float32.

    Returns:
      The squared Frechet distance as a Python float (not clipped at 0, so it
      may be ~-1e-12 * Tr(S) for identical statistics).
    """
    dtype = np.float64 if x64 else np.float32
    # Cast in NumPy so float64 inputs keep their precision until JAX sees them.
    args = [np.asarray(a, dtype=dtype) for a in (mu1, sigma1, mu2, sigma2)]
    with jax.enable_x64(x64):
        m1, s1, m2, s2 = (jnp.asarray(a) for a in args)
        s1 = 0.5 * (s1 + s1.T)
        s2 = 0.5 * (s2 + s2.T)
        a = _psd_sqrt(s1)
        m = a @ s2 @ a
        m = 0.5 * (m + m.T)
        tr_sqrt = jnp.sum(jnp.sqrt(jnp.clip(jnp.linalg.eigvalsh(m), 0.0)))
        diff = m1 - m2
        d = diff @ diff + jnp.trace(s1) + jnp.trace(s2) - 2.0 * tr_sqrt
        return float(d)


def fid_from_features(f1, f2, x64: bool = True) -> float:
    """FID between two feature sets (Heusel et al., 2017).

    Args:
      f1: Array  # [N1, D]
      f2: Array  # [N2, D]
    """
    mu1, s1 = feature_stats(f1)
    mu2, s2 = feature_stats(f2)
    return frechet_distance(mu1, s1, mu2, s2, x64=x64)


# --------------------------------------------------------------------------
# k-NN based metrics: precision / recall / density / coverage
# --------------------------------------------------------------------------


@jax.jit
def _sq_dists(a: Array, sq_a: Array, b: Array, sq_b: Array) -> Array:
    """Squared Euclidean distances of a block of rows against a full set.

    a: [B, D], sq_a: [B] = |a|^2, b: [N, D], sq_b: [N]  ->  [B, N], >= 0.
    """
    ab = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(sq_a[:, None] + sq_b[None, :] - 2.0 * ab, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_nn_block(d2: Array, offset: Array, k: int) -> Array:
    """k smallest squared distances per row, excluding each row's own point.

    d2: [B, N] distances of rows offset..offset+B-1 against the same set.
    Returns [B, k] ascending; column j is the (j+1)-th NN squared distance.
    """
    rows = offset + jnp.arange(d2.shape[0])
    self_mask = rows[:, None] == jnp.arange(d2.shape[1])[None, :]
    d2 = jnp.where(self_mask, jnp.inf, d2)
    neg, _ = jax.lax.top_k(-d2, k)
    return -neg


@jax.jit
def _cross_block(d2: Array, r2_pr: Array, r2_dc: Array, r2_fake: Array):
    """Ball-membership reductions for a block of reals against all fakes.

    d2: [B, M] squared distances real-block x fakes.
    r2_pr, r2_dc: [B] squared real radii (k_pr / k_dc); padded rows hold -1 so
      they contain no fake.
    r2_fake: [M] squared fake radii (k_pr).
    Returns:
      fake_in_pr: [M] bool, fake inside some k_pr real ball of this block.
      n_in_dc: [] int32, number of (real, fake) pairs with fake in k_dc ball.
      covered: [B] bool, real's k_dc ball contains some fake.
      recalled: [B] bool, real lies inside some fake's k_pr ball.
    """
    fake_in_pr = jnp.any(d2 <= r2_pr[:, None], axis=0)
    in_dc = d2 <= r2_dc[:, None]
    n_in_dc = jnp.sum(in_dc, dtype=jnp.int32)
    covered = jnp.any(in_dc, axis=1)
    recalled = jnp.any(d2 <= r2_fake[None, :], axis=1)
    return fake_in_pr, n_in_dc, covered, recalled


def _blocks(x: Array, block: int):
    """Yield (offset, n_valid, padded block [block, D]) over the rows of x."""
    n = x.shape[0]
    for start in range(0, n, block):
        blk = x[start : start + block]
        nv = blk.shape[0]
        if nv < block:  # pad so every call has the same shape (one compile)
            blk = jnp.pad(blk, ((0, block - nv), (0, 0)))
        yield start, nv, blk


def _pad_rows(v: Array, block: int, value) -> Array:
    return jnp.pad(v, (0, block - v.shape[0]), constant_values=value)


def knn_sq_radii(feats: Array, ks, block: int = 1000) -> Dict[int, Array]:
    """Squared distance of each point to its k-th nearest neighbour (self excluded).

    Args:
      feats: Array  # [N, D] float32 (already centred, ideally)
      ks: iterable of k values, each 1 <= k < N.
      block: rows per distance block; memory is O(block * N).

    Returns:
      {k: Array  # [N] float32 squared radii}
    """
    ks = sorted(set(int(k) for k in ks))
    n = feats.shape[0]
    if ks[0] < 1 or ks[-1] >= n:
        raise ValueError(f"need 1 <= k < N, got ks={ks}, N={n}")
    block = min(block, n)
    sq = jnp.sum(feats * feats, axis=1)
    out = []
    for start, nv, blk in _blocks(feats, block):
        sq_blk = jnp.sum(blk * blk, axis=1)
        d2 = _sq_dists(blk, sq_blk, feats, sq)
        out.append(_kth_nn_block(d2, jnp.int32(start), ks[-1])[:nv])
    kth = jnp.concatenate(out, axis=0)  # [N, k_max]
    return {k: kth[:, k - 1] for k in ks}


def prdc(real, fake, k_pr: int = 3, k_dc: int = 5, block: int = 1000) -> Dict[str, float]:
    """Precision, recall (Kynkaanniemi et al., 2019) and density, coverage (Naeem et al., 2020).

    With B(x, r) the closed ball (distance <= r), r_i the distance of real i to
    its k-th nearest other real and s_j that of fake j among fakes:
      precision = mean_j 1[exists i: fake_j in B(real_i, r_i^{k_pr})]
      recall    = mean_i 1[exists j: real_i in B(fake_j, s_j^{k_pr})]
      density   = 1/(k_dc M) sum_j sum_i 1[fake_j in B(real_i, r_i^{k_dc})]
      coverage  = mean_i 1[exists j: fake_j in B(real_i, r_i^{k_dc})]
    (Naeem et al.'s reference code uses strict <; identical sets give
    precision = recall = coverage = 1 here.)

    Distances are computed in float32 blocks of ``block`` rows (memory
    O(block * max(N, M))), after centring both sets on the real mean.

    Args:
      real: Array  # [N, D]
      fake: Array  # [M, D]
      k_pr: k for precision/recall radii.
      k_dc: k for density/coverage radii.
      block: rows per distance block.

    Returns:
      {"precision", "recall", "density", "coverage"} as Python floats.
    """
    return _prdc(real, fake, k_pr, k_dc, block, with_recall=True)


def _prdc(real, fake, k_pr: int, k_dc: int, block: int, with_recall: bool) -> Dict[str, float]:
    """Shared implementation; with_recall=False skips the fake k-NN pass (recall = nan)."""
    real = jnp.asarray(real, dtype=jnp.float32)
    fake = jnp.asarray(fake, dtype=jnp.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need [N, D] and [M, D], got {real.shape}, {fake.shape}")
    n, m = real.shape[0], fake.shape[0]
    center = jnp.mean(real, axis=0)
    real = real - center
    fake = fake - center

    r2 = knn_sq_radii(real, (k_pr, k_dc), block)
    if with_recall:
        s2 = knn_sq_radii(fake, (k_pr,), block)[k_pr]
    else:
        s2 = jnp.full((m,), -1.0, jnp.float32)  # empty fake balls

    block = min(block, n)
    sq_fake = jnp.sum(fake * fake, axis=1)
    fake_in_pr = jnp.zeros((m,), bool)
    n_in_dc = []
    covered, recalled = [], []
    for start, nv, blk in _blocks(real, block):
        sq_blk = jnp.sum(blk * blk, axis=1)
        d2 = _sq_dists(blk, sq_blk, fake, sq_fake)
        f_in, n_dc, cov, rec = _cross_block(
            d2,
            _pad_rows(r2[k_pr][start : start + nv], block, -1.0),
            _pad_rows(r2[k_dc][start : start + nv], block, -1.0),
            s2,
        )
        fake_in_pr = fake_in_pr | f_in
        n_in_dc.append(n_dc)
        covered.append(cov[:nv])
        recalled.append(rec[:nv])

    return {
        # Exact integer counts / sizes (a float32 mean would be off in the 8th digit).
        "precision": int(jnp.sum(fake_in_pr)) / m,
        "recall": int(jnp.sum(jnp.concatenate(recalled))) / n if with_recall else float("nan"),
        # int64 sum on the host: N * M can exceed int32.
        "density": int(np.sum(np.asarray(n_in_dc, dtype=np.int64))) / (k_dc * m),
        "coverage": int(jnp.sum(jnp.concatenate(covered))) / n,
    }


def precision_recall(real, fake, k: int = 3, block: int = 1000) -> Tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019).

    Args:
      real: Array  # [N, D]
      fake: Array  # [M, D]
    Returns:
      (precision, recall). See ``prdc`` for definitions.
    """
    r = prdc(real, fake, k_pr=k, k_dc=k, block=block)
    return r["precision"], r["recall"]


def density_coverage(real, fake, k: int = 5, block: int = 1000) -> Tuple[float, float]:
    """Density and coverage (Naeem et al., 2020).

    Args:
      real: Array  # [N, D]
      fake: Array  # [M, D]
    Returns:
      (density, coverage). See ``prdc`` for definitions.
    """
    r = _prdc(real, fake, k_pr=k, k_dc=k, block=block, with_recall=False)
    return r["density"], r["coverage"]


# --------------------------------------------------------------------------
# Class coverage
# --------------------------------------------------------------------------


RECOGNISABLE = 0.9  # a sample is "recognisable" when its top class probability exceeds this


def recognisable_share(probs, threshold: float = RECOGNISABLE) -> float:
    """The share of samples [N, K] whose top class probability exceeds ``threshold``."""
    return float(np.mean(np.asarray(probs).max(-1) > threshold))


def class_coverage(probs, ref_labels, threshold: float = RECOGNISABLE) -> Dict[str, object]:
    """From class probabilities [N, K] of the samples and the reference labels [M]:

    - recognisable: the share of samples whose top probability exceeds `threshold`;
    - class_hist: the share of samples whose top class is each class [K];
    - class_kl: KL(reference || samples) of the two label distributions in nats, the
      mode-covering direction: 0 when every class is drawn as often as in the reference,
      large when a class is missing. Sample counts get +0.5 each (Jeffreys), so a missing
      class costs a finite amount: about p_ref * log(p_ref * (N + K/2) / 0.5).

    float64 numpy throughout."""
    probs = np.asarray(probs, np.float64)
    k = probs.shape[1]
    counts = np.bincount(probs.argmax(1), minlength=k).astype(np.float64)
    ref = np.bincount(np.asarray(ref_labels), minlength=k).astype(np.float64)
    ref = ref / ref.sum()
    smoothed = (counts + 0.5) / (counts.sum() + 0.5 * k)
    nz = ref > 0
    return dict(recognisable=recognisable_share(probs, threshold),
                class_hist=(counts / counts.sum()).tolist(),
                class_kl=float(np.sum(ref[nz] * np.log(ref[nz] / smoothed[nz]))))


# --------------------------------------------------------------------------
# Pixel statistics
# --------------------------------------------------------------------------


def pixel_stats(images) -> Dict[str, float]:
    """Shares of uint8 pixels [N, 28, 28] that are exactly 0, in 1-15 (a faint background
    haze, which Inception features weigh heavily) and above 250 (saturated strokes)."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    return dict(zero=float(np.mean(x == 0)), haze=float(np.mean((x >= 1) & (x <= 15))),
                saturated=float(np.mean(x > 250)))
