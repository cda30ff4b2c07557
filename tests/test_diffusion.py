"""Diffusion math against float64 numpy references written from the papers, not from the module.

The samplers are checked on Gaussian data x_0 ~ N(mu, s^2) per dimension, whose exact eps is
known in closed form: q(x_t) = N(sqrt(ab_t) mu, ab_t s^2 + 1 - ab_t), so
    eps*(x_t, t) = sqrt(1 - ab_t) (x_t - sqrt(ab_t) mu) / (ab_t s^2 + 1 - ab_t).
Every sampler update is then affine in x_t plus Gaussian noise, so the mean and standard
deviation of what a sampler returns follow from a scalar float64 recursion over its own
timesteps (ab = alpha_bar throughout).
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import diffusion as d

T = 1000
SHAPE = (2048, 4, 4, 1)  # 32,768 iid samples per run, through the image-shaped code path
N = math.prod(SHAPE)


# ----------------------------------------------------------------------------- References


def linear_betas(timesteps: int) -> np.ndarray:
    """Ho et al. 2020's linear betas 1e-4..0.02 at T = 1000, scaled by 1000 / T otherwise
    (Nichol & Dhariwal 2021, as openai/improved-diffusion does)."""
    scale = 1000.0 / timesteps
    return np.linspace(1e-4 * scale, 0.02 * scale, timesteps)


def posterior_by_conditioning(ab_prev, ab_t):
    """q(x_prev | x_t, x_0) by conditioning the joint Gaussian of (x_prev, x_t) given x_0,
    where x_prev = sqrt(ab_prev) x_0 + sqrt(1 - ab_prev) e and x_t = sqrt(a) x_prev +
    sqrt(1 - a) e' with a = ab_t / ab_prev. Returns (coef of x_0, coef of x_t, variance)."""
    a = ab_t / ab_prev
    var_prev = 1.0 - ab_prev  # Var(x_prev | x_0)
    var_t = a * var_prev + (1.0 - a)  # Var(x_t | x_0)
    gain = np.sqrt(a) * var_prev / var_t  # Cov(x_prev, x_t | x_0) / Var(x_t | x_0)
    return np.sqrt(ab_prev) * (1.0 - gain * np.sqrt(a)), gain, var_prev - gain**2 * var_t


def eps_affine(ab, mu, s):
    """eps*(x, t) = a_t x + b_t for x_0 ~ N(mu, s^2): returns (a [T], b [T])."""
    a = np.sqrt(1.0 - ab) / (ab * s**2 + 1.0 - ab)
    return a, -a * np.sqrt(ab) * mu


def ddpm_moments(betas, a, b, var_type):
    """Mean and std of DDPM's x_0 from x_T ~ N(0, 1) when eps = a_t x + b_t.
    x_{t-1} = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t) + sigma_t z  (Ho Eq. 11),
    sigma_t^2 = beta_t or beta~_t = (1 - ab_{t-1}) / (1 - ab_t) beta_t (Eqs. 6-7), z = 0 at t = 0."""
    alphas = 1.0 - betas
    ab = np.cumprod(alphas)
    m, v = 0.0, 1.0
    for t in range(len(betas) - 1, -1, -1):
        k = betas[t] / np.sqrt(1.0 - ab[t])
        c, off = (1.0 - k * a[t]) / np.sqrt(alphas[t]), -k * b[t] / np.sqrt(alphas[t])
        m, v = c * m + off, c**2 * v
        if t > 0:
            v += betas[t] if var_type == "fixed_large" else (1 - ab[t - 1]) / (1 - ab[t]) * betas[t]
    return m, math.sqrt(v)


def ddim_moments(ab, ts, eta, a, b, eta_min_t=0):
    """Mean and std of DDIM's x_0 over timesteps ts (descending) when eps = a_t x + b_t:
    x_prev = sqrt(ab_prev) (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)
             + sqrt(1 - ab_prev - sigma^2) eps + sigma z               (Song Eq. 12),
    sigma^2 = eta^2 (1 - ab_prev) / (1 - ab_t) (1 - ab_t / ab_prev)     (Eq. 16),
    with ab_prev = 1 after the last timestep, and eta 0 at steps from t < eta_min_t."""
    m, v = 0.0, 1.0
    for i, t in enumerate(ts):
        ab_prev = ab[ts[i + 1]] if i + 1 < len(ts) else 1.0
        e = eta if t >= eta_min_t else 0.0
        sigma2 = e**2 * (1 - ab_prev) / (1 - ab[t]) * (1 - ab[t] / ab_prev)
        p = np.sqrt(ab_prev / ab[t])
        q = np.sqrt(1 - ab_prev - sigma2) - p * np.sqrt(1 - ab[t])
        c, off = p + q * a[t], q * b[t]
        m, v = c * m + off, c**2 * v + sigma2
    return m, math.sqrt(v)


def ddim_steps_ref(timesteps: int, steps: int) -> np.ndarray:
    """`steps` evenly spaced timesteps from T - 1 down to 0."""
    return np.round(np.linspace(timesteps - 1, 0, steps)).astype(int)


def gaussian_eps_fn(ab, mu, s):
    """The exact eps*(x, t) for x_0 ~ N(mu, s^2), in JAX, from the reference ab (float64)."""
    sqrt_ab, sqrt_1m = (jnp.asarray(v, jnp.float32) for v in (np.sqrt(ab), np.sqrt(1 - ab)))
    var = jnp.asarray(ab * s**2 + 1 - ab, jnp.float32)
    return lambda x, t: d.batch_mul(sqrt_1m[t] / var[t],
                                    x - d.batch_mul(sqrt_ab[t], jnp.full_like(x, mu)))


def assert_moments(x, mean, std, n=N, z=5.0):
    """Sample mean and std within z standard errors of Gaussian N(mean, std^2) values."""
    x = np.asarray(x, np.float64)
    assert abs(x.mean() - mean) < z * std / math.sqrt(n), (x.mean(), mean)
    assert abs(x.std() - std) < z * std / math.sqrt(2 * n), (x.std(), std)


# ----------------------------------------------------------------------------- Schedules


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
    s = d.make_schedule(kind, T)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ac, rtol=1e-6)
    assert s.alphas_cumprod.dtype == jnp.float32


@pytest.mark.parametrize("kind", ["linear", "quadratic", "cosine"])
def test_posterior_matches_gaussian_conditioning(kind):
    """Ho et al. Eqs. 6-7 against conditioning the joint Gaussian of (x_{t-1}, x_t) | x_0."""
    betas = d.beta_schedule(kind, T)
    ab = np.cumprod(1 - betas)
    coef1, coef2, var = posterior_by_conditioning(np.append(1.0, ab[:-1]), ab)
    c = d.schedule_constants(betas)
    np.testing.assert_allclose(c["posterior_mean_coef1"], coef1, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(c["posterior_mean_coef2"], coef2, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(c["posterior_variance"], var, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(c["posterior_log_variance_clipped"][1:], np.log(var[1:]), rtol=1e-9)


def test_linear_at_T1000_is_unchanged_and_cosine_closed_form():
    np.testing.assert_allclose(d.beta_schedule("linear", T), np.linspace(1e-4, 0.02, T), rtol=1e-15)
    np.testing.assert_allclose(d.beta_schedule("quadratic", T)[[0, -1]], [1e-4, 0.02], rtol=1e-12)
    t = np.arange(T + 1) / T
    f = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    ac = np.cumprod(1 - d.beta_schedule("cosine", T))
    np.testing.assert_allclose(ac[:-5], (f[1:] / f[0])[:-5], rtol=1e-9)  # unclipped part


@pytest.mark.parametrize("kind", ["linear", "quadratic", "cosine"])
@pytest.mark.parametrize("timesteps", [50, 100, 200, 1000])
def test_forward_process_ends_near_standard_normal(kind, timesteps):
    """alpha_bar_T ~ 0 at every T, so sampling from N(0, I) starts where q(x_T) is. Unscaled
    linear betas gave alpha_bar_T = 0.60 at T = 50, 0.36 at 100 and 0.13 at 200."""
    betas = d.beta_schedule(kind, timesteps)
    assert np.prod(1 - betas) < 1e-3, np.prod(1 - betas)
    if kind != "cosine":  # the T = 1000 end points, scaled by 1000 / T
        np.testing.assert_allclose(betas[[0, -1]], np.array([1e-4, 0.02]) * 1000 / timesteps, rtol=1e-12)
    else:  # alpha_bar_t = f(t) / f(0), f(t) = cos^2((t / T + s) / (1 + s) pi / 2), s = 0.008
        f = np.cos((np.arange(timesteps + 1) / timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
        np.testing.assert_allclose(np.cumprod(1 - betas)[:-1], (f[1:] / f[0])[:-1], rtol=1e-9)
    d.check_schedule(kind, timesteps)
    assert d.make_schedule(kind, timesteps).num_timesteps == timesteps


def test_check_schedule_rejects_bad_schedules():
    with pytest.raises(ValueError, match=r"linear schedule with T=10: betas span \[0.01, 2\]"):
        d.check_schedule("linear", 10, 1e-4, 0.02)  # beta_end 0.02 * 1000 / 10 = 2
    with pytest.raises(ValueError, match="T=10"):
        d.make_schedule("linear", 10)
    # The old, unscaled T = 50 betas (1e-4..0.02 over 50 steps) end at alpha_bar_T = 0.60.
    with pytest.raises(ValueError, match=r"linear schedule with T=50 ends at alpha_bar_T = 0\.60"):
        d.check_schedule("linear", 50, 1e-4 * 50 / 1000, 0.02 * 50 / 1000)
    with pytest.raises(ValueError, match=r"alpha_bar_T = 4\.04e-05 > 1e-05"):
        d.check_schedule("linear", T, max_terminal_alpha_bar=1e-5)
    for msg in ("linear", "quadratic"):
        with pytest.raises(ValueError) as err:
            d.check_schedule(msg, 20)  # beta_end = 1.0, not < 1
        assert "\n" not in str(err.value) and "T=20" in str(err.value)


# ----------------------------------------------------------------------------- Single steps


def test_q_sample_moments():
    s = d.make_schedule("linear", T)
    n = 200_000
    x0 = jnp.full((n, 1), 0.7)
    t = jnp.full((n,), 400)
    xt = d.q_sample(s, x0, t, jax.random.normal(jax.random.key(0), (n, 1)))
    ab = np.cumprod(1 - linear_betas(T))[400]
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


def test_ddim_sigma_and_eta1_step_are_the_posterior():
    """sigma_t(eta)^2 / eta^2 between any t and t_prev is the variance of q(x_prev | x_t, x_0)
    (Song et al. Eq. 16), and at eta = 1 over consecutive steps the DDIM update without noise
    is the posterior mean: both against Gaussian conditioning in float64."""
    s = d.make_schedule("linear", T)
    ab = np.cumprod(1 - linear_betas(T))
    ts = ddim_steps_ref(T, 20)
    np.testing.assert_array_equal(d.ddim_timesteps(T, 20), ts)
    assert list(d.ddim_timesteps(T, T)) == list(range(T - 1, -1, -1))
    for t, t_prev, eta in [(np.arange(1, T), np.arange(T - 1), 1.0), (ts[:-1], ts[1:], 0.5)]:
        _, _, var = posterior_by_conditioning(ab[t_prev], ab[t])
        sigma = d.ddim_sigma(s, jnp.asarray(t), jnp.asarray(t_prev), eta)
        # float32 (1 - ab_t / ab_prev) loses ~3 digits at small t.
        np.testing.assert_allclose(np.asarray(sigma, np.float64) ** 2, eta**2 * var, rtol=2e-3)
    assert float(d.ddim_sigma(s, jnp.array([0]), jnp.array([-1]), 1.0)[0]) == 0.0
    t = np.arange(1, T)
    coef1, coef2, _ = posterior_by_conditioning(ab[t - 1], ab[t])
    rng = np.random.default_rng(2)
    x0, noise = rng.standard_normal((T - 1, 3)), rng.standard_normal((T - 1, 3))
    xt = np.sqrt(ab[t])[:, None] * x0 + np.sqrt(1 - ab[t])[:, None] * noise
    x_prev, _ = d.ddim_step(s, jnp.asarray(noise, jnp.float32), jnp.asarray(xt, jnp.float32),
                            jnp.asarray(t), jnp.asarray(t - 1), 1.0, jnp.zeros(xt.shape))
    np.testing.assert_allclose(x_prev, coef1[:, None] * x0 + coef2[:, None] * xt, atol=2e-4)


# ----------------------------------------------------------------------------- Samplers


MU, S = 0.3, 0.2  # the Gaussian data of the exact-score tests


@pytest.mark.parametrize("var_type,timesteps", [("fixed_small", 200), ("fixed_large", 50)])
def test_ddpm_matches_closed_form_on_gaussian_data(var_type, timesteps):
    betas = linear_betas(timesteps)
    ab = np.cumprod(1 - betas)
    sched = d.make_schedule("linear", timesteps)
    x = jax.jit(lambda k: d.ddpm_sample(gaussian_eps_fn(ab, MU, S), sched, k, SHAPE, var_type))(
        jax.random.key(0))
    chex.assert_shape(x, SHAPE)
    mean, std = ddpm_moments(betas, *eps_affine(ab, MU, S), var_type)
    # The exact score recovers the data, up to the discretisation (beta_t overshoots at T = 50).
    assert abs(mean - MU) < 1e-3 and abs(std - S) < 0.03
    assert_moments(x, mean, std)


@pytest.mark.parametrize("steps", [20, 50])
def test_ddim_matches_closed_form_on_gaussian_data(steps):
    ab = np.cumprod(1 - linear_betas(T))
    sched = d.make_schedule("linear", T)
    run = jax.jit(lambda k, eta: d.ddim_sample(gaussian_eps_fn(ab, MU, S), sched, k, SHAPE, steps, eta))
    a, b = eps_affine(ab, MU, S)
    stds = []
    for eta in (0.0, 0.5, 1.0):
        mean, std = ddim_moments(ab, ddim_steps_ref(T, steps), eta, a, b)
        assert_moments(run(jax.random.key(1), eta), mean, std)
        stds.append(std)
    assert max(stds) - min(stds) > 0.01  # eta matters at this step count: the test can see it


def test_ddim_with_a_noise_interval_matches_closed_form_on_gaussian_data():
    """eta = 1 only at steps from t >= eta_min_t, deterministic below: the moments of that
    mixed chain, which differ from both the eta = 0 and the eta = 1 chain's."""
    steps, min_t = 20, 100
    ab = np.cumprod(1 - linear_betas(T))
    sched = d.make_schedule("linear", T)
    x = jax.jit(lambda k: d.ddim_sample(gaussian_eps_fn(ab, MU, S), sched, k, SHAPE, steps,
                                        1.0, eta_min_t=min_t))(jax.random.key(2))
    a, b = eps_affine(ab, MU, S)
    ts = ddim_steps_ref(T, steps)
    mean, std = ddim_moments(ab, ts, 1.0, a, b, eta_min_t=min_t)
    assert_moments(x, mean, std)
    others = [ddim_moments(ab, ts, eta, a, b)[1] for eta in (0.0, 1.0)]
    assert min(abs(std - o) for o in others) > 0.004  # 0.1317 against 0.1266 and 0.1424


def test_ddpm_guidance_matches_closed_form():
    """Classifier-free guidance with exact conditional scores: eps = (1 + w) eps_c - w eps_null
    is affine in x, so the DDPM recursion still gives the output's moments, per label."""
    timesteps, w, null = 100, 2.0, 2
    mus, ss = np.array([-0.3, 0.5, 0.1]), np.array([0.2, 0.3, 0.6])  # labels 0, 1 and null
    betas = linear_betas(timesteps)
    ab = np.cumprod(1 - betas)
    sched = d.make_schedule("linear", timesteps)
    labels = jnp.arange(SHAPE[0]) % 2
    per_label = [gaussian_eps_fn(ab, m, s) for m, s in zip(mus, ss)]

    def eps_fn(x, t, y):
        return jax.lax.select_n(y[:, None, None, None] + jnp.zeros(x.shape, jnp.int32),
                                *(f(x, t) for f in per_label))

    x = jax.jit(lambda k: d.ddpm_sample(d.guided_eps_fn(eps_fn, labels, null, w), sched, k, SHAPE))(
        jax.random.key(2))
    a_n, b_n = eps_affine(ab, mus[null], ss[null])
    for c in (0, 1):
        a_c, b_c = eps_affine(ab, mus[c], ss[c])
        mean, std = ddpm_moments(betas, (1 + w) * a_c - w * a_n, (1 + w) * b_c - w * b_n, "fixed_small")
        assert_moments(np.asarray(x)[np.asarray(labels) == c], mean, std, n=N // 2)


def test_autoguidance_matches_closed_form():
    """Autoguidance with exact scores of two Gaussians (the model's N(MU, S^2) and a worse
    guide's, wider and off-centre): eps = (1 + w) eps - w eps_guide is affine in x, so DDIM's
    output moments follow from the same float64 recursion; w = 0 is the model alone."""
    steps, guide_mu, guide_s = 50, 0.1, 0.5
    ab = np.cumprod(1 - linear_betas(T))
    sched = d.make_schedule("linear", T)
    model, guide = gaussian_eps_fn(ab, MU, S), gaussian_eps_fn(ab, guide_mu, guide_s)
    run = jax.jit(lambda k, w: d.ddim_sample(d.autoguided_eps_fn(model, guide, w), sched, k,
                                             SHAPE, steps, 1.0))
    a_m, b_m = eps_affine(ab, MU, S)
    a_g, b_g = eps_affine(ab, guide_mu, guide_s)
    stds = []
    for w in (0.0, 1.0):
        mean, std = ddim_moments(ab, ddim_steps_ref(T, steps), 1.0, (1 + w) * a_m - w * a_g,
                                 (1 + w) * b_m - w * b_g)
        assert_moments(run(jax.random.key(3), w), mean, std)
        stds.append(std)
    assert stds[1] < stds[0] - 0.01  # pushing away from the wider guide narrows the samples


# Clipping x_0 to [-1, 1] makes the update nonlinear: the reference is a float64 numpy Monte
# Carlo of the same chain (Ho Eq. 7 with the clipped x_0 for DDPM; Song Eq. 12 with eps
# recomputed from the clipped x_0 for DDIM, as improved-diffusion does). Data N(0.6, 0.5^2)
# put 21% of x_0 above 1, so the clip changes the mean, the std and the mass at x = 1.
CLIP_MU, CLIP_S = 0.6, 0.5


def clipped_chain_mc(ab, ts, rng, n, eta=None):
    """Samples of the clipped chain over ts (descending): DDPM ancestral (fixed_small) when
    eta is None, else DDIM with that eta."""
    x = rng.standard_normal(n)
    a, b = eps_affine(ab, CLIP_MU, CLIP_S)
    for i, t in enumerate(ts):
        ab_prev = ab[ts[i + 1]] if i + 1 < len(ts) else 1.0
        eps = a[t] * x + b[t]
        x0 = np.clip((x - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t]), -1.0, 1.0)
        z = rng.standard_normal(n)
        if eta is None:  # consecutive steps: beta_t = 1 - ab_t / ab_{t-1}
            beta = 1 - ab[t] / ab_prev
            x = (np.sqrt(ab_prev) * beta / (1 - ab[t]) * x0
                 + np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab[t]) * x
                 + np.sqrt((1 - ab_prev) / (1 - ab[t]) * beta) * z)
        else:
            eps = (x - np.sqrt(ab[t]) * x0) / np.sqrt(1 - ab[t])
            sigma2 = eta**2 * (1 - ab_prev) / (1 - ab[t]) * (1 - ab[t] / ab_prev)
            x = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev - sigma2) * eps + np.sqrt(sigma2) * z
    return x


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_clip_x0_matches_monte_carlo(sampler):
    timesteps = 100
    ab = np.cumprod(1 - linear_betas(timesteps))
    sched = d.make_schedule("linear", timesteps)
    eps_fn = gaussian_eps_fn(ab, CLIP_MU, CLIP_S)
    if sampler == "ddpm":
        ts, eta = np.arange(timesteps - 1, -1, -1), None
        x = jax.jit(lambda k: d.ddpm_sample(eps_fn, sched, k, SHAPE, clip_x0=True))(jax.random.key(3))
    else:
        ts, eta = ddim_steps_ref(timesteps, 20), 0.5
        x = jax.jit(lambda k: d.ddim_sample(eps_fn, sched, k, SHAPE, 20, eta, clip_x0=True))(
            jax.random.key(3))
    x = np.asarray(x, np.float64).ravel()
    ref = clipped_chain_mc(ab, ts, np.random.default_rng(4), 4 * N, eta)
    assert x.min() >= -1 and x.max() <= 1  # the last step returns the clipped x_0
    for stat in (lambda v: v, lambda v: (v - v.mean()) ** 2, lambda v: v >= 1.0):
        got, want = stat(x), stat(ref)
        err = math.sqrt(got.var() / len(got) + want.var() / len(want))
        assert abs(got.mean() - want.mean()) < 5 * err, (got.mean(), want.mean(), err)
    assert 0.05 < np.mean(ref >= 1.0) < 0.5  # the clip bites


def test_trajectory_and_bad_steps():
    s = d.make_schedule("linear", 50)
    x, traj = d.ddim_sample(lambda x, t: jnp.zeros_like(x), s, jax.random.key(0), (2, 4, 4, 1),
                            steps=10, keep_trajectory=True)
    chex.assert_shape(traj, (10, 2, 4, 4, 1))
    np.testing.assert_array_equal(traj[-1], x)
    with pytest.raises(ValueError):
        d.ddim_timesteps(50, 51)


def test_training_loss_is_zero_for_the_exact_eps():
    """For a point mass at x_0 the exact eps is (x_t - sqrt(ab_t) x_0) / sqrt(1 - ab_t)."""
    ab = np.cumprod(1 - linear_betas(100))
    s = d.make_schedule("linear", 100)
    target = 0.3
    loss = d.training_losses(gaussian_eps_fn(ab, target, 0.0), s, jnp.full((16, 7, 7, 4), target),
                             jax.random.key(0))
    chex.assert_shape(loss, (16,))
    assert float(loss.max()) < 1e-4
    loss = d.training_losses(lambda x, t: jnp.zeros_like(x), s, jnp.zeros((4096, 2)), jax.random.key(0))
    assert abs(float(loss.mean()) - 1.0) < 0.05  # E||eps||^2 / dim = 1


# ----------------------------------------------------------------------------- DPM-Solver++(2M)


def half_log_snr_ref(ab):
    """lambda = log(alpha / sigma) with alpha = sqrt(ab), sigma = sqrt(1 - ab); +inf at ab = 1."""
    with np.errstate(divide="ignore"):
        return np.log(np.sqrt(ab)) - np.log(np.sqrt(1.0 - ab))


def dpmpp2m_update_ref(ab_t, ab_next, x_t, x0, x0_last=None, h_last=None):
    """Lu et al. 2022, Algorithm 2 (DPM-Solver++(2M)), one update from t to t_next:
    h = lambda_next - lambda_t, r = h_last / h,
    D = (1 + 1 / (2r)) x0 - 1 / (2r) x0_last (D = x0 without a previous step),
    x_next = (sigma_next / sigma_t) x_t - alpha_next (e^{-h} - 1) D."""
    h = half_log_snr_ref(ab_next) - half_log_snr_ref(ab_t)
    if x0_last is None:
        D = x0
    else:
        r = h_last / h
        D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_last
    return np.sqrt(1 - ab_next) / np.sqrt(1 - ab_t) * x_t - np.sqrt(ab_next) * (np.exp(-h) - 1) * D


def dpmpp2m_affine_ref(ab, ts, a, b):
    """DPM-Solver++(2M) over ts (descending, then the end at ab = 1) when eps = a_t x + b_t:
    every state is affine in x_T, so track x = k x_T + m. Second order wherever there is a
    previous step, except the steps into t = 0 and into the end (first order). Returns (k, m)."""
    x, x0_last, h_last = np.array([1.0, 0.0]), None, None
    for i, t in enumerate(ts):
        ab_next = ab[ts[i + 1]] if i + 1 < len(ts) else 1.0
        eps = a[t] * x + b[t] * np.array([0.0, 1.0])  # (slope, intercept) of eps
        x0 = (x - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t])
        if i + 1 == len(ts):
            return tuple(x0)  # sigma = 0: the update is x0
        first = x0_last is None or ts[i + 1] == 0
        x_new = dpmpp2m_update_ref(ab[t], ab_next, x, x0, None if first else x0_last, h_last)
        x0_last, h_last = x0, half_log_snr_ref(ab_next) - half_log_snr_ref(ab[t])
        x = x_new
    raise AssertionError("unreachable")


def ddim_affine_ref(ab, ts, a, b):
    """DDIM with eta = 0 (Song et al. Eq. 12) as (k, m) of x = k x_T + m."""
    k, m = 1.0, 0.0
    for i, t in enumerate(ts):
        ab_prev = ab[ts[i + 1]] if i + 1 < len(ts) else 1.0
        p = np.sqrt(ab_prev / ab[t])
        q = np.sqrt(1 - ab_prev) - p * np.sqrt(1 - ab[t])
        k, m = (p + q * a[t]) * k, (p + q * a[t]) * m + q * b[t]
    return k, m


def prior_sample(key, timesteps, shape):
    """The x_T every sampler draws from `key` (documented in ddim_sample / dpmpp2m_sample)."""
    return np.asarray(jax.random.normal(jax.random.fold_in(key, timesteps), shape), np.float64)


def test_dpmpp2m_step_matches_the_paper():
    """One update against Algorithm 2 in float64: second order in the middle, first order
    without a previous step (= DDIM, eta = 0), into t = 0, and to the end (= x_0)."""
    ab = np.cumprod(1 - linear_betas(T))
    s = d.make_schedule("linear", T)
    ts = ddim_steps_ref(T, 10)
    rng = np.random.default_rng(5)
    x_t, eps, x0_last = (rng.standard_normal((3, 8)) for _ in range(3))

    def run(t, t_next, h_last):
        f32 = lambda v: jnp.asarray(v, jnp.float32)
        full = lambda v: jnp.full((3,), v, jnp.int32)
        x_next, x0, h = d.dpmpp2m_step(s, f32(eps), f32(x_t), full(t), full(t_next), f32(x0_last),
                                       jnp.full((3,), h_last, jnp.float32))
        return np.asarray(x_next, np.float64), np.asarray(x0, np.float64), np.asarray(h, np.float64)

    lam = half_log_snr_ref(ab)
    for i in (2, 5):  # second order: t_last = ts[i - 1] > t = ts[i] > t_next = ts[i + 1] > 0
        t, t_next, h_last = ts[i], ts[i + 1], lam[ts[i]] - lam[ts[i - 1]]
        x0 = (x_t - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t])
        x_next, x0_got, h = run(t, t_next, h_last)
        np.testing.assert_allclose(x0_got, x0, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(h, lam[t_next] - lam[t], rtol=1e-5)
        want = dpmpp2m_update_ref(ab[t], ab[t_next], x_t, x0, x0_last, h_last)
        np.testing.assert_allclose(x_next, want, rtol=1e-4, atol=1e-5)
        first = dpmpp2m_update_ref(ab[t], ab[t_next], x_t, x0)
        assert np.abs(want - first).max() > 1e-2  # the second-order term is visible
        # First order (h_last = 0) is DDIM with eta = 0 (Song Eq. 12).
        ddim = np.sqrt(ab[t_next]) * x0 + np.sqrt(1 - ab[t_next]) * eps
        np.testing.assert_allclose(run(t, t_next, 0.0)[0], ddim, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(first, ddim, rtol=1e-9)
    t, h_last = ts[-2], lam[ts[-2]] - lam[ts[-3]]  # into t = 0: first order
    x0 = (x_t - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t])
    np.testing.assert_allclose(run(t, 0, h_last)[0], dpmpp2m_update_ref(ab[t], ab[0], x_t, x0),
                               rtol=1e-4, atol=1e-5)
    x0 = (x_t - np.sqrt(1 - ab[0]) * eps) / np.sqrt(ab[0])  # to the end: x_0
    np.testing.assert_allclose(run(0, -1, lam[0] - lam[ts[-2]])[0], x0, rtol=1e-4, atol=1e-5)


ODE_MU, ODE_S = 0.3, 1.0  # unit-variance data, like the scaled latents


def test_dpmpp2m_solves_the_probability_flow_ode_on_gaussian_data():
    """With the exact eps of N(mu, s^2) the probability-flow ODE maps x at time t to
    mu + s (x - sqrt(ab_t) mu) / sqrt(ab_t s^2 + 1 - ab_t); the deterministic samplers are
    affine maps of x_T, checked per sample against the float64 reference. DPM-Solver++(2M)
    lands on the data's mean and std, its error shrinks with the steps, and it is far closer
    to the exact ODE solution than DDIM with as many steps."""
    shape = (256, 4, 4, 1)
    ab = np.cumprod(1 - linear_betas(T))
    sched = d.make_schedule("linear", T)
    eps_fn = gaussian_eps_fn(ab, ODE_MU, ODE_S)
    a, b = eps_affine(ab, ODE_MU, ODE_S)
    key = jax.random.key(6)
    x_T = prior_sample(key, T, shape)
    errs = {}
    for steps in (10, 20):
        ts = ddim_steps_ref(T, steps)
        x = np.asarray(jax.jit(lambda k: d.dpmpp2m_sample(eps_fn, sched, k, shape, steps))(key), np.float64)
        k, m = dpmpp2m_affine_ref(ab, ts, a, b)
        np.testing.assert_allclose(x, k * x_T + m, atol=2e-5 * steps)
        sd_T = math.sqrt(ab[ts[0]] * ODE_S**2 + 1 - ab[ts[0]])
        exact = ODE_MU + ODE_S * (x_T - math.sqrt(ab[ts[0]]) * ODE_MU) / sd_T
        # x_T ~ N(0, 1), so the output has std k and mean m; the exact ODE gives the data's, up
        # to N(0, 1) not being q(x_T) exactly (ab_T = 4e-5 moves the mean by 2e-3).
        k_exact, m_exact = ODE_S / sd_T, ODE_MU - ODE_S * math.sqrt(ab[ts[0]]) * ODE_MU / sd_T
        assert abs(k_exact - ODE_S) < 1e-4 and abs(m_exact - ODE_MU) < 3e-3
        assert abs(m - m_exact) < 1e-3 and abs(k - k_exact) < {10: 0.1, 20: 0.01}[steps], (k, m)
        x_ddim = np.asarray(jax.jit(lambda k: d.ddim_sample(eps_fn, sched, k, shape, steps))(key), np.float64)
        k_ddim, m_ddim = ddim_affine_ref(ab, ts, a, b)
        np.testing.assert_allclose(x_ddim, k_ddim * x_T + m_ddim, atol=2e-5 * steps)
        errs[steps] = np.abs(x - exact).max(), np.abs(x_ddim - exact).max()
    # Max error over samples: DPM++ 0.25 and 1.7e-3 at 10 and 20 steps, DDIM 0.67 and 0.33.
    assert errs[20][0] < 0.1 * errs[10][0], errs
    assert errs[10][0] < 0.5 * errs[10][1] and errs[20][0] < 0.05 * errs[20][1], errs


def test_dpmpp2m_on_the_stiff_problem_matches_reference():
    """Data with s = 0.2, where x_0(lambda) changes fastest near t = 0: still the reference."""
    shape = (256, 4, 4, 1)
    ab = np.cumprod(1 - linear_betas(T))
    sched = d.make_schedule("linear", T)
    key = jax.random.key(7)
    x = jax.jit(lambda k: d.dpmpp2m_sample(gaussian_eps_fn(ab, MU, S), sched, k, shape, 15))(key)
    k, m = dpmpp2m_affine_ref(ab, ddim_steps_ref(T, 15), *eps_affine(ab, MU, S))
    np.testing.assert_allclose(np.asarray(x, np.float64), k * prior_sample(key, T, shape) + m, atol=3e-4)


def test_dpmpp2m_guidance_matches_closed_form():
    """Guided eps (1 + w) eps_c - w eps_null is affine in x: per label the output is the
    reference map of x_T. w is traced (one compile for every w), and w = 0 is conditional."""
    shape, steps, null = (256, 4, 4, 1), 20, 2
    mus, ss = np.array([-0.3, 0.5, 0.1]), np.array([0.8, 1.0, 1.2])  # labels 0, 1 and null
    ab = np.cumprod(1 - linear_betas(T))
    sched = d.make_schedule("linear", T)
    labels = jnp.arange(shape[0]) % 2
    per_label = [gaussian_eps_fn(ab, m, s) for m, s in zip(mus, ss)]

    def eps_fn(x, t, y):
        return jax.lax.select_n(y[:, None, None, None] + jnp.zeros(x.shape, jnp.int32),
                                *(f(x, t) for f in per_label))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def guided(key, w):
        return d.dpmpp2m_sample(d.guided_eps_fn(eps_fn, labels, null, w), sched, key, shape, steps)

    key = jax.random.key(8)
    x_T = prior_sample(key, T, shape)
    ts = ddim_steps_ref(T, steps)
    a_n, b_n = eps_affine(ab, mus[null], ss[null])
    for w in (2.0, 0.0):
        x = np.asarray(guided(key, jnp.float32(w)), np.float64)
        for c in (0, 1):
            a_c, b_c = eps_affine(ab, mus[c], ss[c])
            k, m = dpmpp2m_affine_ref(ab, ts, (1 + w) * a_c - w * a_n, (1 + w) * b_c - w * b_n)
            sel = np.asarray(labels) == c
            np.testing.assert_allclose(x[sel], k * x_T[sel] + m, atol=5e-4)
        if w == 0.0:
            cond = jax.jit(lambda k: d.dpmpp2m_sample(lambda x, t: eps_fn(x, t, labels), sched, k,
                                                      shape, steps))(key)
            np.testing.assert_allclose(x, np.asarray(cond, np.float64), atol=1e-5)


def test_dpmpp2m_trajectory_and_clip():
    s = d.make_schedule("linear", 50)
    x, traj = d.dpmpp2m_sample(lambda x, t: jnp.zeros_like(x), s, jax.random.key(0), (2, 4, 4, 1),
                               steps=10, clip_x0=True, keep_trajectory=True)
    chex.assert_shape(traj, (10, 2, 4, 4, 1))
    np.testing.assert_array_equal(traj[-1], x)
    assert float(jnp.abs(x).max()) <= 1.0  # the last step returns the clipped x_0
    with pytest.raises(ValueError):
        d.dpmpp2m_sample(lambda x, t: x, s, jax.random.key(0), (2, 1), steps=51)
