"""Gaussian diffusion (Ho et al. 2020; DDIM, Song et al. 2021) as pure functions.

No Flax in here: the denoiser enters as `eps_fn(x_t, t) -> eps`, so one code path
serves latents [B, 7, 7, c] and pixels [B, 28, 28, 1]. Schedule constants are
computed once in float64 numpy and held as a pytree of float32 arrays; every
formula is a short function named after its term in the papers (names follow
openai/improved-diffusion). Samplers are one step function driven by `lax.scan`.
"""

from __future__ import annotations

import enum
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
EpsFn = Callable[[Array, Array], Array]  # (x_t [B, ...], t [B] int32) -> eps [B, ...]


class BetaSchedule(enum.Enum):
    LINEAR = "linear"  # Ho et al. 2020
    QUADRATIC = "quadratic"  # linear in sqrt(beta)
    COSINE = "cosine"  # Nichol & Dhariwal 2021, Eq. 17


class VarianceType(enum.Enum):
    FIXED_LARGE = "fixed_large"  # sigma_t^2 = beta_t
    FIXED_SMALL = "fixed_small"  # sigma_t^2 = beta~_t, the posterior variance


def beta_schedule(kind: str | BetaSchedule, timesteps: int, beta_start: float = 1e-4,
                  beta_end: float = 0.02, cosine_s: float = 0.008) -> np.ndarray:
    """float64 [T] betas."""
    kind = BetaSchedule(kind)
    if kind is BetaSchedule.LINEAR:
        return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)
    if kind is BetaSchedule.QUADRATIC:
        return np.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=np.float64) ** 2
    # Cosine: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), betas clipped at 0.999.
    steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    alpha_bar = np.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    return np.clip(1 - alpha_bar[1:] / alpha_bar[:-1], 0.0, 0.999)


class Schedule(NamedTuple):
    """Per-timestep constants, each float32 [T]; a pytree, so it passes through jit."""
    betas: Array
    alphas_cumprod: Array  # alpha_bar_t
    alphas_cumprod_prev: Array  # alpha_bar_{t-1}, with alpha_bar_{-1} = 1
    sqrt_alphas_cumprod: Array
    sqrt_one_minus_alphas_cumprod: Array
    sqrt_recip_alphas_cumprod: Array
    sqrt_recipm1_alphas_cumprod: Array
    posterior_variance: Array  # beta~_t, Eq. 7 of Ho et al.
    posterior_log_variance_clipped: Array
    posterior_mean_coef1: Array  # multiplies x_0
    posterior_mean_coef2: Array  # multiplies x_t

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def schedule_constants(betas: np.ndarray) -> dict[str, np.ndarray]:
    """All schedule constants in float64 numpy (what `make_schedule` casts to float32)."""
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return dict(
        betas=betas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
        posterior_variance=post_var,
        # beta~_0 = 0: log clipped to beta~_1, as in improved-diffusion.
        posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    )


def make_schedule(kind: str | BetaSchedule, timesteps: int, beta_start: float = 1e-4,
                  beta_end: float = 0.02) -> Schedule:
    consts = schedule_constants(beta_schedule(kind, timesteps, beta_start, beta_end))
    return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in consts.items()})


# Per-example scalar times per-example tensor, without hand broadcasting.
batch_mul = jax.vmap(lambda a, x: a * x)


def q_sample(sched: Schedule, x0: Array, t: Array, noise: Array) -> Array:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps  (Ho et al. Eq. 4).

    x0, noise: [B, ...]; t: [B] int.
    """
    return (batch_mul(sched.sqrt_alphas_cumprod[t], x0)
            + batch_mul(sched.sqrt_one_minus_alphas_cumprod[t], noise))


def predict_xstart_from_eps(sched: Schedule, x_t: Array, t: Array, eps: Array) -> Array:
    """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)  (Eq. 4 solved for x_0)."""
    return (batch_mul(sched.sqrt_recip_alphas_cumprod[t], x_t)
            - batch_mul(sched.sqrt_recipm1_alphas_cumprod[t], eps))


def predict_eps_from_xstart(sched: Schedule, x_t: Array, t: Array, x0: Array) -> Array:
    """The inverse of `predict_xstart_from_eps`."""
    return batch_mul(1.0 / sched.sqrt_recipm1_alphas_cumprod[t],
                     batch_mul(sched.sqrt_recip_alphas_cumprod[t], x_t) - x0)


def q_posterior_mean_variance(sched: Schedule, x0: Array, x_t: Array, t: Array):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)  (Ho et al. Eqs. 6-7)."""
    mean = (batch_mul(sched.posterior_mean_coef1[t], x0)
            + batch_mul(sched.posterior_mean_coef2[t], x_t))
    return mean, sched.posterior_variance[t], sched.posterior_log_variance_clipped[t]


def p_mean_variance(sched: Schedule, eps: Array, x_t: Array, t: Array,
                    var_type: VarianceType = VarianceType.FIXED_SMALL,
                    clip_x0: bool = False):
    """Mean, log-variance and predicted x_0 of p(x_{t-1} | x_t) given eps_theta(x_t, t)."""
    x0 = predict_xstart_from_eps(sched, x_t, t, eps)
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
    mean, _, log_var = q_posterior_mean_variance(sched, x0, x_t, t)
    if VarianceType(var_type) is VarianceType.FIXED_LARGE:
        # beta_t, with beta~_1 at t = 0 so the last step has a finite log-variance.
        log_var = jnp.log(jnp.append(sched.posterior_variance[1], sched.betas[1:]))[t]
    return mean, log_var, x0


def training_losses(eps_fn: EpsFn, sched: Schedule, x0: Array, key: Array) -> Array:
    """Simple loss ||eps - eps_theta(x_t, t)||^2, mean over non-batch dims  (Ho et al. Eq. 14).

    x0: [B, ...]; returns [B].
    """
    t_key, n_key = jax.random.split(key)
    t = jax.random.randint(t_key, (x0.shape[0],), 0, sched.num_timesteps)
    noise = jax.random.normal(n_key, x0.shape, x0.dtype)
    eps = eps_fn(q_sample(sched, x0, t, noise), t)
    return jnp.mean(jnp.square(noise - eps).reshape(x0.shape[0], -1), axis=1)


def _full(t: int | Array, batch: int) -> Array:
    return jnp.full((batch,), t, dtype=jnp.int32)


def ddpm_sample(eps_fn: EpsFn, sched: Schedule, key: Array, shape: tuple[int, ...],
                var_type: VarianceType = VarianceType.FIXED_SMALL, clip_x0: bool = False,
                keep_trajectory: bool = False):
    """Ancestral sampling over all T steps (Ho et al. Algorithm 2).

    Returns x_0 [B, ...], and with keep_trajectory the chain x_{T-1..0} [T, B, ...].
    """
    num_t = sched.num_timesteps
    x_init = jax.random.normal(jax.random.fold_in(key, num_t), shape)

    def step(x, t):
        t_batch = _full(t, shape[0])
        mean, log_var, _ = p_mean_variance(sched, eps_fn(x, t_batch), x, t_batch, var_type,
                                           clip_x0)
        noise = jax.random.normal(jax.random.fold_in(key, t), shape)
        x = mean + batch_mul(jnp.where(t > 0, jnp.exp(0.5 * log_var), 0.0), noise)
        return x, (x if keep_trajectory else None)

    x, traj = jax.lax.scan(step, x_init, jnp.arange(num_t - 1, -1, -1))
    return (x, traj) if keep_trajectory else x


def ddim_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """`steps` evenly spaced timesteps in [0, T-1], descending, always ending at 0."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"DDIM steps must be in [1, {num_timesteps}], got {steps}")
    return np.round(np.linspace(num_timesteps - 1, 0, steps)).astype(np.int32)


def ddim_sigma(sched: Schedule, t: Array, t_prev: Array, eta: float) -> Array:
    """sigma_t(eta) of Song et al. Eq. 16; eta = 1 over consecutive steps gives beta~_t.

    t_prev = -1 stands for the end of the chain (alpha_bar = 1).
    """
    ac = sched.alphas_cumprod[t]
    ac_prev = jnp.where(t_prev >= 0, sched.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
    return eta * jnp.sqrt((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev))


def ddim_step(sched: Schedule, eps: Array, x_t: Array, t: Array, t_prev: Array, eta: float,
              noise: Array, clip_x0: bool = False):
    """One DDIM update x_t -> x_{t_prev} (Song et al. Eq. 12). Returns (x_prev, x0_pred)."""
    x0 = predict_xstart_from_eps(sched, x_t, t, eps)
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = predict_eps_from_xstart(sched, x_t, t, x0)
    ac_prev = jnp.where(t_prev >= 0, sched.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
    sigma = ddim_sigma(sched, t, t_prev, eta)
    direction = jnp.sqrt(jnp.maximum(1 - ac_prev - sigma**2, 0.0))
    x_prev = (batch_mul(jnp.sqrt(ac_prev), x0) + batch_mul(direction, eps)
              + batch_mul(sigma, noise))
    return x_prev, x0


def ddim_sample(eps_fn: EpsFn, sched: Schedule, key: Array, shape: tuple[int, ...],
                steps: int, eta: float = 0.0, clip_x0: bool = False,
                keep_trajectory: bool = False):
    """DDIM over `steps` evenly spaced timesteps; eta = 0 is deterministic, 1 is DDPM-like."""
    ts = ddim_timesteps(sched.num_timesteps, steps)
    ts_prev = np.append(ts[1:], -1).astype(np.int32)
    x_init = jax.random.normal(jax.random.fold_in(key, sched.num_timesteps), shape)
    batch = shape[0]

    def step(x, i):
        t, t_prev = _full(ts_arr[i], batch), _full(ts_prev_arr[i], batch)
        noise = jax.random.normal(jax.random.fold_in(key, i), shape)
        x, _ = ddim_step(sched, eps_fn(x, t), x, t, t_prev, eta, noise, clip_x0)
        return x, (x if keep_trajectory else None)

    ts_arr, ts_prev_arr = jnp.asarray(ts), jnp.asarray(ts_prev)
    x, traj = jax.lax.scan(step, x_init, jnp.arange(steps))
    return (x, traj) if keep_trajectory else x


# ----------------------------------------------------------------------------- Guidance


def drop_labels(key: Array, labels: Array, p: float, null_label: int) -> Array:
    """Replaces each label by null_label with probability p (classifier-free guidance
    training, Ho & Salimans 2021): one model learns eps(x, t, c) and eps(x, t, null)."""
    return jnp.where(jax.random.uniform(key, labels.shape) < p, null_label, labels)


def guided_eps_fn(eps_fn: Callable[[Array, Array, Array], Array], labels: Array,
                  null_label: int, w: float | Array) -> EpsFn:
    """Classifier-free guidance: eps = (1 + w) * eps(x, t, c) - w * eps(x, t, null).

    w = 0 is plain conditional sampling (Ho & Salimans 2021, Eq. 6, whose w this is; some
    code writes the same thing with scale s = 1 + w). The conditional and unconditional
    passes run as one forward call on a doubled batch.
    """
    def guided(x: Array, t: Array) -> Array:
        b = x.shape[0]
        y = jnp.concatenate([labels, jnp.full_like(labels, null_label)])
        eps = eps_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), y)
        cond, uncond = eps[:b], eps[b:]
        return (1.0 + w) * cond - w * uncond
    return guided
