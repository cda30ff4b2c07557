"""Consistency distillation: pure functions for a few-step student of a diffusion model.

The student f(z_t, t) = c_skip(t) z_t + c_out(t) x0_net(z_t, t) maps any point of the
teacher's probability-flow ODE to its end (Song et al. 2023). Latent consistency
distillation (Luo et al. 2023) trains it on a grid of `intervals` teacher timesteps
0 = t_0 < ... < t_N = T - 1: from z at t_{n+1}, one guided DDIM step of the teacher gives
z at t_n, and the student at t_{n+1} regresses on the target network at t_n.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import diffusion

Array = jax.Array
X0Fn = Callable[[Array, Array], Array]  # (z_t [B, ...], t [B] int) -> x_0 [B, ...]

SIGMA_DATA = 0.5  # the c_skip / c_out constants of LCM (diffusers' LCMScheduler)
TIME_SCALE = 10.0


def student_grid(num_timesteps: int, intervals: int) -> np.ndarray:
    """The teacher timesteps the student is trained on, ascending: intervals + 1 evenly
    spaced integers from 0 to T - 1 (LCM's skipping interval k is (T - 1) / intervals)."""
    if not 1 <= intervals <= num_timesteps - 1:
        raise ValueError(f"intervals must be in [1, {num_timesteps - 1}], got {intervals}")
    return np.round(np.linspace(0, num_timesteps - 1, intervals + 1)).astype(np.int32)


def sampling_times(grid: np.ndarray, steps: int, power: float = 1.0) -> np.ndarray:
    """The student's `steps` sampling times, descending from T - 1: step i at the first grid
    point at or above (T - 1)(1 - i / steps)^power. power = 1 is LCM's sampler (4 of 50
    intervals: 999, 759, 500, 260); power < 1 re-noises higher (0.5: 999, 879, 719, 500)."""
    intervals = len(grid) - 1
    if not 1 <= steps <= intervals:
        raise ValueError(f"a student of {intervals} intervals samples in 1 to {intervals} "
                         f"steps, got {steps}")
    if not 0 < power <= 1:
        raise ValueError(f"the sampling times' power must be in (0, 1], got {power}")
    frac = 1.0 - (1.0 - np.arange(steps) / steps) ** power  # 0 at the first step
    idx = intervals - np.floor(intervals * frac + 1e-9).astype(np.int64)
    for i in range(1, steps):  # rounding may meet the previous step: keep them distinct
        idx[i] = min(idx[i], idx[i - 1] - 1)
    return grid[idx]


def boundary_coefficients(t: Array) -> tuple[Array, Array]:
    """(c_skip, c_out) [B] at integer timesteps t: exactly (1, 0) at t = 0, so the student
    at the smallest time returns its input; c_skip < 1e-5 from t = 20."""
    s = jnp.asarray(t, jnp.float32) * TIME_SCALE
    c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
    c_out = s / jnp.sqrt(s**2 + SIGMA_DATA**2)
    return c_skip, c_out


def consistency_fn(x0_fn: X0Fn) -> X0Fn:
    """f(z, t) = c_skip(t) z + c_out(t) x0_fn(z, t): the student from its x_0 prediction."""
    def f(z: Array, t: Array) -> Array:
        c_skip, c_out = boundary_coefficients(t)
        return diffusion.batch_mul(c_skip, z) + diffusion.batch_mul(c_out, x0_fn(z, t))
    return f


def teacher_step(eps_fn: diffusion.EpsFn, sched: diffusion.Schedule, z: Array, t: Array,
                 t_prev: Array, clip_x0: bool = False) -> Array:
    """One deterministic DDIM step (eta = 0) of the (guided) teacher from t to t_prev."""
    eps = eps_fn(z, t)
    return diffusion.ddim_step(sched, eps, z, t, t_prev, 0.0, jnp.zeros_like(z), clip_x0)[0]


def interval_probs(intervals: int, low_noise_bias: float) -> np.ndarray:
    """P(grid interval n) proportional to exp(-low_noise_bias n / intervals): 0 is uniform
    (LCM); a bias b draws the lowest of N intervals e^(b (N - 1) / N) times as often as the
    highest."""
    w = np.exp(-low_noise_bias * np.arange(intervals) / intervals)
    return w / w.sum()


def distillation_pair(student: X0Fn, target: X0Fn, eps_fn: diffusion.EpsFn,
                      sched: diffusion.Schedule, grid: Array, x0: Array, key: Array,
                      clip_x0: bool = False, probs: Array | None = None) -> tuple[Array, Array]:
    """(f_student(z_{n+1}, t_{n+1}), f_target(z_n, t_n)): z_{n+1} ~ q(z | x0) at a random
    grid interval n (uniform, or drawn from probs), z_n its teacher step; the target carries
    no gradient."""
    n_key, z_key = jax.random.split(key)
    if probs is None:
        n = jax.random.randint(n_key, (x0.shape[0],), 0, grid.shape[0] - 1)
    else:
        n = jax.random.choice(n_key, grid.shape[0] - 1, (x0.shape[0],), p=probs)
    t_hi, t_lo = grid[n + 1], grid[n]
    z_hi = diffusion.q_sample(sched, x0, t_hi, jax.random.normal(z_key, x0.shape))
    z_lo = jax.lax.stop_gradient(teacher_step(eps_fn, sched, z_hi, t_hi, t_lo, clip_x0))
    want = jax.lax.stop_gradient(consistency_fn(target)(z_lo, t_lo))
    return consistency_fn(student)(z_hi, t_hi), want


def pseudo_huber(a: Array, b: Array) -> Array:
    """sqrt(||a - b||^2 + c^2) - c per example, c = 0.00054 sqrt(dim) (Song & Dhariwal 2023)."""
    c = 0.00054 * np.sqrt(np.prod(a.shape[1:]))
    return jnp.sqrt(jnp.sum(jnp.square(a - b), axis=tuple(range(1, a.ndim))) + c**2) - c


def sample(student: X0Fn, sched: diffusion.Schedule, key: Array, shape: tuple[int, ...],
           times: np.ndarray, gamma: float = 1.0) -> Array:
    """Multistep consistency sampling: x = f(noise, t_1), then for each later time t_i
    re-noise x to t_i and denoise again with f. gamma is the share of fresh noise in each
    re-noising: 1 is LCM's q_sample, 0 a deterministic DDIM step along the student's own
    noise estimate (TCD's gamma, Zheng et al. 2024, in DDIM's eta form)."""
    f = consistency_fn(student)
    batch = shape[0]
    z = jax.random.normal(jax.random.fold_in(key, sched.num_timesteps), shape)
    t_batch = jnp.full((batch,), times[0], jnp.int32)
    x = f(z, t_batch)
    for i, t in enumerate(times[1:], start=1):
        noise = jax.random.normal(jax.random.fold_in(key, i), shape)
        if gamma < 1:  # part of the noise is the student's own estimate at the previous time
            eps_hat = diffusion.predict_eps_from_xstart(sched, z, t_batch, x)
            noise = gamma * noise + np.sqrt(1.0 - gamma**2) * eps_hat
        t_batch = jnp.full((batch,), t, jnp.int32)
        z = diffusion.q_sample(sched, x, t_batch, noise)
        x = f(z, t_batch)
    return x
