"""First-stage variants: the VQ codebook (straight-through, EMA, restarts), the perceptual
loss, and each variant trained, resumed and sampled through on the smoke preset."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import configs, data, features, nets, sample, stages, train


def _vq_state(codebook, sizes):
    codebook = jnp.asarray(codebook, jnp.float32)
    sizes = jnp.asarray(sizes, jnp.float32)
    return dict(codebook=codebook, cluster_size=sizes, embed_sum=codebook * sizes[:, None])


@pytest.mark.slow  # keeps the default run under 10 minutes on 2 cores
def test_straight_through_gradient_is_the_identity_and_reaches_the_encoder():
    vq = nets.VectorQuantizer(num_codes=8)
    z = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
    variables = vq.init(jax.random.key(1), z)
    w = jax.random.normal(jax.random.key(2), z.shape)
    grad = jax.grad(lambda z: jnp.sum(w * vq.apply(variables, z)[0]))(z)
    np.testing.assert_array_equal(grad, w)  # d(quantised)/dz = I

    c = configs.get_config("vae", "smoke")
    c.autoencoder.reg, c.autoencoder.commitment_weight = "vq", 0.0  # reconstruction only
    task = stages.TASKS["vae"](c, workdir=None)
    params, state = task.init(jax.random.key(0))
    grads = jax.jit(jax.grad(lambda p: task.loss_fn(p, state, task.get_batch(0),
                                                    jax.random.key(3))[0]))(params)
    enc = jax.tree.leaves(grads["encoder"])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in enc)
    assert max(float(jnp.max(jnp.abs(g))) for g in enc) > 0  # reconstruction reaches z_e


@pytest.mark.slow  # keeps the default run under 10 minutes on 2 cores
def test_ema_update_moves_codes_toward_their_assigned_vectors():
    decay, eps = 0.9, 1e-5
    codebook, sizes = np.array([[0.0, 0.0], [10.0, 10.0]]), np.array([5.0, 5.0])
    z = np.array([[1.0, 1.0], [1.2, 0.8], [9.0, 11.0]])
    index = nets.nearest_code(jnp.asarray(z, jnp.float32), jnp.asarray(codebook, jnp.float32))
    np.testing.assert_array_equal(index, [0, 0, 1])
    new, restarted = nets.ema_codebook_update(_vq_state(codebook, sizes), jnp.asarray(z, jnp.float32),
                                              index, jax.random.key(0), decay, dead_threshold=0.0)
    # float64 reference: N <- d N + (1 - d) n, m <- d m + (1 - d) sum z, e = m / smoothed N.
    counts = np.array([2.0, 1.0])
    n = decay * sizes + (1 - decay) * counts
    m = decay * codebook * sizes[:, None] + (1 - decay) * np.stack([z[:2].sum(0), z[2]])
    expected = m / ((n + eps) / (n.sum() + 2 * eps) * n.sum())[:, None]
    np.testing.assert_allclose(new["codebook"], expected, rtol=1e-5)
    np.testing.assert_allclose(new["cluster_size"], n, rtol=1e-6)
    assert int(restarted) == 0
    before = np.linalg.norm(codebook[0] - z[:2].mean(0))
    assert np.linalg.norm(np.asarray(new["codebook"][0]) - z[:2].mean(0)) < before


@pytest.mark.slow  # keeps the default run under 10 minutes on 2 cores
def test_dead_codes_restart_on_batch_vectors():
    codebook, sizes = np.array([[0.0, 0.0], [100.0, 100.0], [5.0, 5.0]]), np.array([5.0, 0.5, 5.0])
    z = jnp.asarray([[0.5, 0.0], [4.5, 5.0], [0.0, 0.5]])
    index = nets.nearest_code(z, jnp.asarray(codebook, jnp.float32))
    new, restarted = nets.ema_codebook_update(_vq_state(codebook, sizes), z, index,
                                              jax.random.key(0), 0.99, dead_threshold=1.0)
    assert int(restarted) == 1  # code 1 is unused and its EMA count is below the threshold
    assert any(np.allclose(new["codebook"][1], row) for row in np.asarray(z))
    assert float(new["cluster_size"][1]) == 1.0
    assert np.linalg.norm(np.asarray(new["codebook"][0])) < 1.0  # live codes only move by EMA


def test_codebook_usage():
    u = nets.codebook_usage(jnp.asarray([0, 1, 2, 3, 0, 1, 2, 3]), 8)
    assert float(u["perplexity"]) == pytest.approx(4.0) and float(u["codes_used"]) == 0.5


@pytest.mark.slow  # keeps the default run under 10 minutes on 2 cores
def test_perceptual_loss_is_zero_for_identical_images_and_positive_otherwise():
    images, _ = data.load_mnist("test")
    x = jnp.asarray(data.to_float(images[:8]))
    dist = jax.jit(features.perceptual_loss_fn())
    np.testing.assert_array_equal(dist(x, x), np.zeros(8))
    noisy = x + 0.3 * jax.random.normal(jax.random.key(0), x.shape)
    d = np.asarray(dist(x, noisy))
    assert d.shape == (8,) and np.all(d > 0)
    assert np.all(np.asarray(dist(x, jnp.roll(x, 3, axis=2))) > 0)
    g = jax.grad(lambda y: jnp.sum(dist(x, y)))(noisy)  # gradients flow to the images
    assert float(jnp.max(jnp.abs(g))) > 0


@pytest.mark.slow  # in `-m slow` to keep the default suite under 10 minutes on 2 cores
def test_vq_variant_trains_resumes_and_samples(tmp_path):
    """VQ end to end (the perceptual loss lowers its loss with either regulariser in
    test_train; plain KL is the smoke workdir every other test uses)."""
    c = configs.get_config("vae", "smoke")
    c.autoencoder.reg = "vq"
    full = train.train_and_evaluate(c, str(tmp_path / "a"))
    # The codebook lives in model_state: a resumed run must carry it.
    train.train_and_evaluate(c, str(tmp_path / "b"), stop_at_step=3)
    resumed = train.train_and_evaluate(c, str(tmp_path / "b"))
    chex.assert_trees_all_close(resumed.model_state, full.model_state, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(resumed.params, full.params, rtol=1e-5, atol=1e-6)
    last = json.loads((tmp_path / "a" / "vae" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"perplexity", "codes_used", "commit", "restarted"} <= set(last) and "kl" not in last
    assert 1.0 <= last["perplexity"] <= 256 and 0 < last["codes_used"] <= 1

    train.train_and_evaluate(configs.get_config("ldm", "smoke"), str(tmp_path / "a"))
    gen = sample.load_generator(str(tmp_path / "a"), "ldm")
    chex.assert_trees_all_equal(gen.vae_vars["vq"], full.model_state["vq"])  # decoder's codebook
    images = sample.generate(gen, 4, jax.random.key(0), "ddim", 3, progress=False)
    assert images.shape == (4, 28, 28) and images.dtype == np.uint8 and images.std() > 0
