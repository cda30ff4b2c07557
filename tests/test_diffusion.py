"""Diffusion math against float64 numpy and closed forms."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import diffusion as d

T = 1000


@pytest.mark.parametrize("kind", ["linear", "quadratic", "cosine"])
def test_schedule_identities_float64(kind):
    betas = d.beta_schedule(kind, T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert np.all(betas > 0) and np.all(betas < 1)
    c = d.schedule_constants(betas)
    ac = np.cumprod(1 - betas)
    np.testing.assert_allclose(c["alphas_cumprod"], ac, rtol=1e-12)
    np.testing.assert_allclose(c["alphas_cumprod_prev"][1:], ac[:-1], rtol=1e-12)
    assert c["alphas_cumprod_prev"][0] == 1.0
    np.testing.assert_allclose(c["sqrt_alphas_cumprod"] ** 2 + c["sqrt_one_minus_alphas_cumprod"] ** 2, 1, rtol=1e-12)
    # beta~_t = (1 - ab_{t-1}) / (1 - ab_t) * beta_t, and the posterior mean coefficients
    # sum to the right thing: for x_t = x_0 = x, mean = coef1 + coef2 (Eq. 7).
    np.testing.assert_allclose(c["posterior_variance"], (1 - c["alphas_cumprod_prev"]) / (1 - ac) * betas, rtol=1e-12)
    np.testing.assert_allclose(c["posterior_mean_coef1"], np.sqrt(c["alphas_cumprod_prev"]) * betas / (1 - ac), rtol=1e-12)
    s = d.make_schedule(kind, T)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ac, rtol=1e-6)
    assert s.alphas_cumprod.dtype == jnp.float32


def test_linear_and_cosine_closed_forms():
    np.testing.assert_allclose(d.beta_schedule("linear", T)[[0, -1]], [1e-4, 0.02])
    t = np.arange(T + 1) / T
    f = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    ac = np.cumprod(1 - d.beta_schedule("cosine", T))
    np.testing.assert_allclose(ac[:-5], (f[1:] / f[0])[:-5], rtol=1e-9)  # unclipped part


def test_q_sample_moments():
    s = d.make_schedule("linear", T)
    n = 200_000
    x0 = jnp.full((n, 1), 0.7)
    t = jnp.full((n,), 400)
    xt = d.q_sample(s, x0, t, jax.random.normal(jax.random.key(0), (n, 1)))
    ab = np.cumprod(1 - d.beta_schedule("linear", T))[400]
    assert abs(float(xt.mean()) - math.sqrt(ab) * 0.7) < 4 * math.sqrt((1 - ab) / n)
    assert abs(float(xt.var()) - (1 - ab)) < 0.01 * (1 - ab)


def test_xstart_eps_round_trip():
    s = d.make_schedule("cosine", T)
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    x0 = jax.random.normal(k1, (8, 7, 7, 4))
    eps = jax.random.normal(k2, x0.shape)
    t = jax.random.randint(k3, (8,), 0, T)
    xt = d.q_sample(s, x0, t, eps)
    np.testing.assert_allclose(d.predict_xstart_from_eps(s, xt, t, eps), x0, atol=2e-3)
    np.testing.assert_allclose(d.predict_eps_from_xstart(s, xt, t, x0), eps, atol=2e-3)


def test_ddim_eta1_all_steps_is_ddpm_posterior():
    """sigma_t(eta=1) over consecutive steps = beta~_t, and the DDIM mean = posterior mean."""
    s = d.make_schedule("linear", T)
    t = jnp.arange(1, T)
    sigma = d.ddim_sigma(s, t, t - 1, 1.0)
    # float32 (1 - ab_t / ab_{t-1}) loses ~3 digits at small t; the identity itself holds in float64.
    np.testing.assert_allclose(np.asarray(sigma) ** 2, np.asarray(s.posterior_variance[1:]), rtol=1e-3)
    c = d.schedule_constants(d.beta_schedule("linear", T))
    ac, ac_prev = c["alphas_cumprod"][1:], c["alphas_cumprod"][:-1]
    np.testing.assert_allclose((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev),
                               c["posterior_variance"][1:], rtol=1e-10)
    k1, k2 = jax.random.split(jax.random.key(2))
    x0 = jax.random.normal(k1, (T - 1, 3))
    xt = d.q_sample(s, x0, t, jax.random.normal(k2, x0.shape))
    eps = d.predict_eps_from_xstart(s, xt, t, x0)
    x_prev, _ = d.ddim_step(s, eps, xt, t, t - 1, 1.0, jnp.zeros_like(xt))
    mean, _, _ = d.q_posterior_mean_variance(s, x0, xt, t)
    np.testing.assert_allclose(x_prev, mean, atol=2e-4)
    assert list(d.ddim_timesteps(T, T)) == list(range(T - 1, -1, -1))


def _oracle(sched, target):
    """The exact eps for data that is a single point `target` [1, ...]."""
    return lambda x, t: d.batch_mul(1.0 / sched.sqrt_one_minus_alphas_cumprod[t],
                                    x - d.batch_mul(sched.sqrt_alphas_cumprod[t], jnp.broadcast_to(target, x.shape)))


@pytest.mark.parametrize("shape", [(4, 7, 7, 4), (4, 28, 28, 1)])
def test_samplers_recover_a_point_mass(shape):
    """With the exact score of a point mass, every sampler must land on that point,
    for latent- and pixel-shaped inputs through one code path."""
    s = d.make_schedule("linear", 200)
    target = jnp.linspace(-0.9, 0.9, math.prod(shape[1:])).reshape(1, *shape[1:])
    eps_fn = _oracle(s, target)
    key = jax.random.key(3)
    outs = [jax.jit(lambda k: d.ddpm_sample(eps_fn, s, k, shape))(key),
            jax.jit(lambda k: d.ddpm_sample(eps_fn, s, k, shape, "fixed_large"))(key),
            jax.jit(lambda k: d.ddim_sample(eps_fn, s, k, shape, steps=20))(key),
            jax.jit(lambda k: d.ddim_sample(eps_fn, s, k, shape, steps=50, eta=1.0))(key)]
    for x in outs:
        chex.assert_shape(x, shape)
        np.testing.assert_allclose(x, jnp.broadcast_to(target, shape), atol=2e-2)


def test_trajectory_and_bad_steps():
    s = d.make_schedule("linear", 50)
    x, traj = d.ddim_sample(lambda x, t: jnp.zeros_like(x), s, jax.random.key(0), (2, 4, 4, 1),
                            steps=10, keep_trajectory=True)
    chex.assert_shape(traj, (10, 2, 4, 4, 1))
    np.testing.assert_array_equal(traj[-1], x)
    with pytest.raises(ValueError):
        d.ddim_timesteps(50, 51)


def test_training_loss_is_zero_for_the_oracle():
    s = d.make_schedule("linear", 100)
    target = jnp.ones((1, 7, 7, 4)) * 0.3
    loss = d.training_losses(_oracle(s, target), s, jnp.broadcast_to(target, (16, 7, 7, 4)),
                             jax.random.key(0))
    chex.assert_shape(loss, (16,))
    assert float(loss.max()) < 1e-4
    loss = d.training_losses(lambda x, t: jnp.zeros_like(x), s, jnp.zeros((4096, 2)), jax.random.key(0))
    assert abs(float(loss.mean()) - 1.0) < 0.05  # E||eps||^2 / dim = 1
