"""The modern recipe's options (prediction targets, Min-SNR-gamma, zero terminal SNR) against
float64 numpy written from the papers, not from the module.

Notation: ab = alpha_bar, x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, SNR_t = ab_t / (1 - ab_t),
v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0 (Salimans & Ho 2022). For Gaussian data
x_0 ~ N(mu, s^2) the exact (posterior-mean) predictions are affine in x_t:
    E[x_0 | x_t] = mu + s^2 sqrt(ab) (x_t - sqrt(ab) mu) / var,
    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / var,     var = ab s^2 + 1 - ab,
finite at ab = 0, so samplers with zero terminal SNR have exact float64 references too.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import diffusion as d

PREDICTIONS = ["eps", "v", "x0"]
SHAPE = (2048, 4, 4, 1)  # 32,768 iid samples per sampler run
N = math.prod(SHAPE)
MU, S = 0.3, 0.5  # the Gaussian data of the sampler tests


# ----------------------------------------------------------------------------- References


def linear_betas(timesteps: int) -> np.ndarray:
    """Ho et al.'s linear betas 1e-4..0.02 at T = 1000, scaled by 1000 / T."""
    return np.linspace(1e-4, 0.02, timesteps) * 1000.0 / timesteps


def zero_snr_alpha_bar(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, Sec. 3.1: sqrt(ab) shifted to end at 0, scaled to keep sqrt(ab_1)."""
    r = np.sqrt(np.cumprod(1 - betas))
    return ((r - r[-1]) * r[0] / (r[0] - r[-1])) ** 2


def target_ref(prediction, ab, x0, eps):
    return {"eps": eps, "v": np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0, "x0": x0}[prediction]


def min_snr_ref(prediction, ab, gamma):
    """Hang et al. 2023: min(SNR, gamma) on the x_0 loss; divided by SNR for eps, SNR + 1 for v."""
    snr = ab / (1 - ab)
    return {"eps": np.minimum(snr, gamma) / snr, "v": np.minimum(snr, gamma) / (snr + 1),
            "x0": np.minimum(snr, gamma)}[prediction]


def posterior_affine(ab, mu, s):
    """E[x_0 | x_t] = p x_t + q and E[eps | x_t] = a x_t + b, each [T]."""
    var = ab * s**2 + 1 - ab
    p, a = s**2 * np.sqrt(ab) / var, np.sqrt(1 - ab) / var
    return (p, mu - p * np.sqrt(ab) * mu), (a, -a * np.sqrt(ab) * mu)


def exact_model_fn(prediction, ab, mu, s):
    """The exact network output for N(mu, s^2) data, in JAX from float64 constants."""
    (p, q), (a, b) = posterior_affine(ab, mu, s)
    if prediction == "eps":
        k, c = a, b
    elif prediction == "x0":
        k, c = p, q
    else:  # v = sqrt(ab) E[eps] - sqrt(1 - ab) E[x_0], linear in the posterior means
        k, c = np.sqrt(ab) * a - np.sqrt(1 - ab) * p, np.sqrt(ab) * b - np.sqrt(1 - ab) * q
    k, c = jnp.asarray(k, jnp.float32), jnp.asarray(c, jnp.float32)
    return lambda x, t: d.batch_mul(k[t], x) + d.batch_mul(c[t], jnp.ones_like(x))


def sampler_moments_ref(sampler, ab, ts, mu, s):
    """Mean and std of a sampler's output from x_T ~ N(0, 1) with the exact model, over ts
    (descending; after the last, ab = 1). Every update is affine in x plus noise, written with
    the posterior means directly, so nothing divides by sqrt(ab) even where ab_T = 0:
      ddpm:    x_prev = c1 x0_hat + c2 x + sigma z, q(x_prev | x_t, x_0) by conditioning
      ddim:    x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev) eps_hat  (eta = 0)
      dpmpp2m: Lu et al. Algorithm 2 (first order for the first step, the step into t = 0 and
               the last), lambda = log(sqrt(ab) / sqrt(1 - ab)) = -inf at ab = 0."""
    (p, q), (a, b) = posterior_affine(ab, mu, s)
    k, m, var = 1.0, 0.0, 0.0  # x = k x_T + m + noise of variance var
    lam = lambda v: (np.log(np.sqrt(v)) - np.log(np.sqrt(1 - v))) if v < 1 else np.inf
    last = None  # (x0 as (k, m), h) of the previous DPM-Solver++ step
    for i, t in enumerate(ts):
        ab_prev = ab[ts[i + 1]] if i + 1 < len(ts) else 1.0
        x0 = np.array([p[t] * k, p[t] * m + q[t]])  # noise part handled via the slope below
        e = np.array([a[t] * k, a[t] * m + b[t]])
        if sampler == "ddpm":
            gain_prev = 1 - ab_prev
            alpha = ab[t] / ab_prev
            var_t = alpha * gain_prev + 1 - alpha
            g = np.sqrt(alpha) * gain_prev / var_t
            c1, c2, post = np.sqrt(ab_prev) * (1 - g * np.sqrt(alpha)), g, gain_prev - g**2 * var_t
            slope = c1 * p[t] + c2
            k, m, var = slope * k, c1 * (p[t] * m + q[t]) + c2 * m, slope**2 * var + post
        elif sampler == "ddim":
            slope = np.sqrt(ab_prev) * p[t] + np.sqrt(1 - ab_prev) * a[t]
            k, m = slope * k, np.sqrt(ab_prev) * x0[1] + np.sqrt(1 - ab_prev) * e[1]
        else:
            if i + 1 == len(ts):
                k, m = x0
                break
            with np.errstate(divide="ignore"):
                h = lam(ab_prev) - lam(ab[t])
            D = x0
            if last is not None and ts[i + 1] > 0:
                r = last[1] / h
                D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * last[0]
            coef, step = np.sqrt(1 - ab_prev) / np.sqrt(1 - ab[t]), -np.sqrt(ab_prev) * np.expm1(-h)
            k, m = coef * k + step * D[0], coef * m + step * D[1]
            last = (x0, h)
    return m, math.sqrt(k**2 + var)


def assert_moments(x, mean, std, n=N, z=5.0):
    x = np.asarray(x, np.float64)
    assert np.isfinite(x).all()
    assert abs(x.mean() - mean) < z * std / math.sqrt(n), (x.mean(), mean)
    assert abs(x.std() - std) < z * std / math.sqrt(2 * n), (x.std(), std)


# ----------------------------------------------------------------------------- Targets


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_targets_and_conversions_are_inverses(prediction, zero_snr):
    """training_target and the output -> (eps, x_0) conversion against float64, at every t
    including 0 and T - 1; eps_fn_from_model gives the eps the samplers use."""
    if zero_snr and prediction == "eps":
        with pytest.raises(ValueError, match="zero_terminal_snr needs prediction v or x0"):
            d.check_recipe(prediction, zero_snr)
        return
    timesteps = 1000
    betas = linear_betas(timesteps)
    ab = zero_snr_alpha_bar(betas) if zero_snr else np.cumprod(1 - betas)
    sched = d.make_schedule("linear", timesteps, zero_terminal_snr=zero_snr)
    rng = np.random.default_rng(0)
    t = np.concatenate([[0, timesteps - 1], rng.integers(0, timesteps, 62)])
    x0, eps = rng.standard_normal((2, 64, 3, 2))
    abt = ab[t][:, None, None]
    x_t = np.sqrt(abt) * x0 + np.sqrt(1 - abt) * eps
    want = target_ref(prediction, abt, x0, eps)
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    tj = jnp.asarray(t)
    # zero SNR: the module stores ab_T = 2^-24 or less, so targets and x_t move by < 1e-4.
    np.testing.assert_allclose(d.training_target(sched, f32(x0), tj, f32(eps), prediction), want,
                               rtol=1e-5, atol=1e-4 if zero_snr else 1e-6)
    eps_got, x0_got = d.model_output_to_eps_and_xstart(sched, f32(want), f32(x_t), tj, prediction)
    atol = {"eps": 2e-3, "v": 1e-4, "x0": 1e-4}[prediction]  # eps -> x_0: 1 / sqrt(ab_T) = 158
    np.testing.assert_allclose(eps_got, eps, atol=atol)
    np.testing.assert_allclose(x0_got, x0, atol=atol)
    np.testing.assert_allclose(d.predict_xstart(sched, f32(want), f32(x_t), tj, prediction), x0_got)
    eps_fn = d.eps_fn_from_model(lambda x, t_: f32(want), sched, prediction)
    np.testing.assert_allclose(eps_fn(f32(x_t), tj), eps_got, atol=1e-6)
    # The sampler path: eps -> x_0 at ab_T ~ 1e-9 loses ~6e-8 / sqrt(ab_T) of |x_t| to float32.
    x0_via_eps = d.predict_xstart_from_eps(sched, f32(x_t), tj, eps_fn(f32(x_t), tj))
    np.testing.assert_allclose(x0_via_eps, x0, atol=2e-2 if zero_snr else 2e-3)


def test_v_identities():
    """v = sqrt(ab) eps - sqrt(1 - ab) x_0 = (sqrt(ab) x_t - x_0) / sqrt(1 - ab), and (x_t, v)
    is a rotation of (x_0, eps): x_t^2 + v^2 = x_0^2 + eps^2."""
    timesteps = 200
    ab = np.cumprod(1 - linear_betas(timesteps))
    sched = d.make_schedule("linear", timesteps)
    rng = np.random.default_rng(1)
    t = np.arange(timesteps)
    x0, eps = rng.standard_normal((2, timesteps, 5))
    abt = ab[:, None]
    x_t = np.sqrt(abt) * x0 + np.sqrt(1 - abt) * eps
    v = np.asarray(d.predict_v(sched, jnp.asarray(x0, jnp.float32), jnp.asarray(t),
                               jnp.asarray(eps, jnp.float32)), np.float64)
    np.testing.assert_allclose(v, np.sqrt(abt) * eps - np.sqrt(1 - abt) * x0, atol=1e-6)
    np.testing.assert_allclose(v[1:], ((np.sqrt(abt) * x_t - x0) / np.sqrt(1 - abt))[1:], atol=1e-5)
    np.testing.assert_allclose(x_t**2 + v**2, x0**2 + eps**2, rtol=1e-5)
    np.testing.assert_allclose(d.predict_xstart_from_v(sched, jnp.asarray(x_t, jnp.float32),
                                                       jnp.asarray(t), jnp.asarray(v, jnp.float32)),
                               x0, atol=1e-5)


# ----------------------------------------------------------------------------- Losses


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_exact_output_gives_zero_loss(prediction):
    """For a point mass at c (s = 0) the exact output is known at every (x_t, t): its loss is 0
    under either weighting, and a mislabelled target is not."""
    timesteps, c = 100, 0.3
    ab = np.cumprod(1 - linear_betas(timesteps))
    sched = d.make_schedule("linear", timesteps)
    x0 = jnp.full((64, 7, 7, 4), c)
    model_fn = exact_model_fn(prediction, ab, c, 0.0)
    for weighting in ("uniform", "min_snr"):
        loss = d.training_losses(model_fn, sched, x0, jax.random.key(0), prediction=prediction,
                                 weighting=weighting)
        assert loss.shape == (64,) and float(loss.max()) < 1e-8, float(loss.max())
    wrong = {"eps": "v", "v": "x0", "x0": "eps"}[prediction]
    loss = d.training_losses(model_fn, sched, x0, jax.random.key(0), prediction=wrong)
    assert float(loss.mean()) > 0.01


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_loss_of_the_exact_model_on_gaussian_data(prediction):
    """With s > 0 the exact model's loss is the posterior variance of the target:
    Var(x_0 | x_t) = (1 - ab) s^2 / var, Var(eps | x_t) = ab s^2 / var, Var(v | x_t) = s^2 / var;
    its mean over uniform t, with the min-SNR weights, is what training_losses averages to."""
    timesteps, mu, s = 100, 0.3, 0.5
    ab = np.cumprod(1 - linear_betas(timesteps))
    sched = d.make_schedule("linear", timesteps)
    var = ab * s**2 + 1 - ab
    post = {"eps": ab * s**2 / var, "v": s**2 / var, "x0": (1 - ab) * s**2 / var}[prediction]
    x0 = mu + s * jax.random.normal(jax.random.key(1), (4096, 4, 4, 1))
    fn = jax.jit(lambda key, w: d.training_losses(exact_model_fn(prediction, ab, mu, s), sched, x0,
                                                  key, prediction=prediction, weighting=w),
                 static_argnums=1)
    for weighting, weight in (("uniform", 1.0), ("min_snr", min_snr_ref(prediction, ab, 5.0))):
        loss = np.asarray(fn(jax.random.key(2), weighting), np.float64)
        want = np.mean(weight * post)
        assert abs(loss.mean() - want) < 5 * loss.std() / math.sqrt(loss.size), (loss.mean(), want)


def test_default_loss_is_unchanged():
    """The default loss is Ho et al.'s simple loss, against a float64 numpy reference built
    from the paper (betas linear from 1e-4 to 0.02 at T = 1000, here T = 100 so x10):
    || eps - eps_theta(sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t) ||^2 averaged per example.
    Only the draws of t and eps (what 'same key' means) come from the code under test."""
    sched = d.make_schedule("linear", 100)
    x0 = jax.random.normal(jax.random.key(3), (8, 7, 7, 4))
    model_fn = lambda x, t: 0.5 * x + 0.01 * t[:, None, None, None]
    key = jax.random.key(4)
    t_key, n_key = jax.random.split(key)
    t = np.asarray(jax.random.randint(t_key, (8,), 0, 100))
    noise = np.asarray(jax.random.normal(n_key, x0.shape, x0.dtype), np.float64)
    alpha_bar = np.cumprod(1.0 - np.linspace(1e-3, 0.2, 100))  # 1e-4..0.02 x 1000/100
    ab = alpha_bar[t][:, None, None, None]
    x_t = np.sqrt(ab) * np.asarray(x0, np.float64) + np.sqrt(1.0 - ab) * noise
    eps = 0.5 * x_t + 0.01 * t[:, None, None, None]
    want = np.mean(np.square(noise - eps).reshape(8, -1), axis=1)
    got = d.training_losses(model_fn, sched, x0, key)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5)
    np.testing.assert_array_equal(
        d.training_losses(model_fn, sched, x0, key, prediction="eps", weighting="uniform"), got)
    assert d.eps_fn_from_model(model_fn, sched, "eps") is model_fn


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_min_snr_weights_match_float64(prediction):
    timesteps = 1000
    t = jnp.arange(timesteps)
    for kind in ("linear", "cosine"):
        ab = np.cumprod(1 - d.beta_schedule(kind, timesteps))
        sched = d.make_schedule(kind, timesteps)
        for gamma in (1.0, 5.0):
            got = np.asarray(d.min_snr_weight(sched, t, prediction, gamma), np.float64)
            np.testing.assert_allclose(got, min_snr_ref(prediction, ab, gamma), rtol=2e-5)
            assert np.any(got != 1.0)
    # Zero terminal SNR: finite; the eps weight is 1 where SNR ~ 0, v and x0 weights ~ 0.
    sched = d.make_schedule("linear", timesteps, zero_terminal_snr=True)
    w = np.asarray(d.min_snr_weight(sched, t, prediction, 5.0))
    assert np.isfinite(w).all()
    assert w[-1] == pytest.approx({"eps": 1.0, "v": 0.0, "x0": 0.0}[prediction], abs=1e-7)


# ----------------------------------------------------------------------------- Zero terminal SNR


@pytest.mark.parametrize("kind", ["linear", "quadratic", "cosine"])
@pytest.mark.parametrize("timesteps", [50, 1000])
def test_rescale_zero_terminal_snr(kind, timesteps):
    """Lin et al. 2024, Algorithm 1: ab_T = 0, sqrt(ab_1) unchanged, sqrt(ab_t) an affine map of
    the old one; and the float32 schedule built from it is finite and decreasing."""
    old = d.beta_schedule(kind, timesteps)
    betas = d.rescale_zero_terminal_snr(old)
    assert betas.dtype == np.float64 and betas.shape == (timesteps,)
    ab, ab_old = np.cumprod(1 - betas), np.cumprod(1 - old)
    assert ab[-1] == 0.0 and betas[-1] == 1.0
    assert np.all(betas[:-1] > 0) and np.all(betas[:-1] < 1)
    np.testing.assert_allclose(np.sqrt(ab[0]), np.sqrt(ab_old[0]), rtol=1e-12)
    scale = np.sqrt(ab[:-1]) / (np.sqrt(ab_old[:-1]) - np.sqrt(ab_old[-1]))
    np.testing.assert_allclose(scale, scale[0], rtol=1e-8)
    np.testing.assert_allclose(ab, zero_snr_alpha_bar(old), rtol=1e-9, atol=1e-300)
    sched = d.make_schedule(kind, timesteps, zero_terminal_snr=True)
    for name, value in sched._asdict().items():
        assert np.isfinite(np.asarray(value)).all(), name
    ac = np.asarray(sched.alphas_cumprod, np.float64)
    assert 0 < ac[-1] <= 2.0**-24 and ac[-1] < ac[-2] and np.all(np.diff(ac) < 0)
    np.testing.assert_allclose(ac[:-1], ab[:-1], rtol=1e-6)
    assert np.all(np.asarray(sched.betas) > 0) and np.all(np.asarray(sched.betas) < 1)


def test_check_schedule_and_recipe():
    # The unscaled T = 50 betas end at ab_T = 0.60: rejected, but fine once rescaled to 0.
    args = ("linear", 50, 1e-4 * 50 / 1000, 0.02 * 50 / 1000)
    with pytest.raises(ValueError, match="alpha_bar_T = 0.60"):
        d.check_schedule(*args)
    d.check_schedule(*args, zero_terminal_snr=True)
    assert d.make_schedule(*args, zero_terminal_snr=True).num_timesteps == 50
    with pytest.raises(ValueError, match="outside"):
        d.check_schedule("linear", 10, zero_terminal_snr=True)  # betas up to 2: still rejected
    for prediction in PREDICTIONS:
        d.check_recipe(prediction, False, "min_snr", 5.0)
    d.check_recipe("v", True)
    d.check_recipe("x0", True, "uniform")
    for args, match in [(("eps", True), "needs prediction v or x0"),
                        (("epsilon", False), r"prediction must be eps\|v\|x0, got 'epsilon'"),
                        (("v", False, "snr"), r"loss_weighting must be uniform\|min_snr"),
                        (("v", False, "min_snr", 0.0), "min_snr_gamma must be > 0")]:
        with pytest.raises(ValueError, match=match) as err:
            d.check_recipe(*args)
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- Samplers


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m"])
def test_samplers_with_v_prediction_and_zero_terminal_snr(sampler):
    """An exact v network on a zero-terminal-SNR schedule, through eps_fn_from_model: finite
    output with the moments of the float64 reference (which uses ab_T = 0 exactly), and near
    the data's. x_T is then exactly q(x_T), so only the discretisation separates them."""
    timesteps, steps = 100, 20
    ab = zero_snr_alpha_bar(linear_betas(timesteps))
    sched = d.make_schedule("linear", timesteps, zero_terminal_snr=True)
    eps_fn = d.eps_fn_from_model(exact_model_fn("v", ab, MU, S), sched, "v")
    if sampler == "ddpm":
        ts = np.arange(timesteps - 1, -1, -1)
        run = lambda k: d.ddpm_sample(eps_fn, sched, k, SHAPE)
    else:
        ts = np.round(np.linspace(timesteps - 1, 0, steps)).astype(int)
        fn = d.ddim_sample if sampler == "ddim" else d.dpmpp2m_sample
        run = lambda k: fn(eps_fn, sched, k, SHAPE, steps)
    x = jax.jit(run)(jax.random.key(5))
    mean, std = sampler_moments_ref(sampler, ab, ts, MU, S)
    # x_T ~ N(0, 1) is q(x_T) itself, so every step keeps E[x_t] = sqrt(ab_t) mu and the mean
    # is exact; the std is off by the discretisation (DDPM-100 0.468, DDIM-20 0.434, DPM++-20
    # 0.480 for s = 0.5).
    assert abs(mean - MU) < 1e-9
    assert abs(std - S) < {"ddpm": 0.04, "ddim": 0.08, "dpmpp2m": 0.03}[sampler]
    assert_moments(x, mean, std)
