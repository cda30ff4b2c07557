"""Gaussian diffusion (Ho et al. 2020; DDIM, Song et al. 2021) as pure functions.

No Flax in here: the denoiser enters as `eps_fn(x_t, t) -> eps`, so one code path
serves latents [B, 7, 7, c] and pixels [B, 28, 28, 1]. Schedule constants are
computed once in float64 numpy and held as a pytree of float32 arrays; every
formula is a short function named after its term in the papers (names follow
openai/improved-diffusion). Samplers are one step function driven by `lax.scan`.

The modern recipe is a set of options, each off by default: a network predicting v
(Salimans & Ho 2022) or x_0 instead of eps, wrapped into an eps_fn by
`eps_fn_from_model` so every sampler and guidance take it unchanged; Min-SNR-gamma loss
weights (Hang et al. 2023); zero-terminal-SNR schedules (Lin et al. 2024); and the
DPM-Solver++(2M) sampler (Lu et al. 2022). Guidance: classifier-free (Ho & Salimans 2021)
for conditional models, and autoguidance by an earlier checkpoint of the same run (Karras et
al. 2024), which needs no condition.
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


class Prediction(enum.Enum):
    """What the network outputs, given x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps."""
    EPS = "eps"  # the noise eps (Ho et al. 2020)
    V = "v"  # v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0 (Salimans & Ho 2022, Sec. 4)
    X0 = "x0"  # the data x_0


class LossWeighting(enum.Enum):
    UNIFORM = "uniform"  # plain MSE to the target (Ho et al. Eq. 14 for eps)
    MIN_SNR = "min_snr"  # Min-SNR-gamma (Hang et al. 2023), see `min_snr_weight`


# check_schedule's default bound on alpha_bar_T. Sampling starts from N(0, I), which is
# q(x_T) only when alpha_bar_T -> 0: with alpha_bar_T <= 1e-2 the data keep at most 10% of
# the amplitude of x_T, and the prior term KL(q(x_T | x_0) || N(0, I)) is at most ~5e-3 nats
# per dimension for |x_0| <= 1. Every shipped schedule is far below it (linear at T = 1000:
# 4e-5); the unscaled linear betas at T = 50, 100, 200 (0.60, 0.36, 0.13) are far above.
MAX_TERMINAL_ALPHA_BAR = 1e-2


def beta_schedule(kind: str | BetaSchedule, timesteps: int, beta_start: float = 1e-4,
                  beta_end: float = 0.02, cosine_s: float = 0.008) -> np.ndarray:
    """float64 [T] betas.

    beta_start and beta_end are the linear/quadratic end points *at T = 1000*: for other T
    both are multiplied by 1000 / T (as openai/improved-diffusion does), so the forward
    process ends near N(0, I) whatever T is (sum of betas, hence log alpha_bar_T, about
    fixed). The cosine schedule is defined by alpha_bar(t/T) and needs no rescaling.
    `check_schedule` says whether the result is usable.
    """
    kind = BetaSchedule(kind)
    scale = 1000.0 / timesteps
    if kind is BetaSchedule.LINEAR:
        return np.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=np.float64)
    if kind is BetaSchedule.QUADRATIC:
        return np.linspace((scale * beta_start)**0.5, (scale * beta_end)**0.5, timesteps,
                           dtype=np.float64) ** 2
    # Cosine: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), betas clipped at 0.999.
    steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    alpha_bar = np.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    return np.clip(1 - alpha_bar[1:] / alpha_bar[:-1], 0.0, 0.999)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """float64 betas whose alpha_bar_T is exactly 0 (Lin et al. 2024, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", Algorithm 1).

    sqrt(alpha_bar_t) is shifted so its last value is 0, then scaled so its first value,
    sqrt(alpha_bar_1), is unchanged; betas are recovered from the ratios. beta_T comes out
    as 1: x_T is pure noise, so what sampling starts from, N(0, I), is exactly q(x_T).
    """
    sqrt_ab = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alpha_bar = sqrt_ab**2
    return 1.0 - np.append(alpha_bar[0], alpha_bar[1:] / alpha_bar[:-1])


def check_schedule(kind: str | BetaSchedule, timesteps: int, beta_start: float = 1e-4,
                   beta_end: float = 0.02,
                   max_terminal_alpha_bar: float = MAX_TERMINAL_ALPHA_BAR,
                   zero_terminal_snr: bool = False) -> None:
    """Raises ValueError (one line) unless every beta_t of `beta_schedule` is in (0, 1) and
    alpha_bar_T <= max_terminal_alpha_bar, i.e. unless x_T is close to N(0, I). With
    zero_terminal_snr the betas are then rescaled to alpha_bar_T = 0, which meets any bound."""
    kind = BetaSchedule(kind)
    if timesteps < 1:
        raise ValueError(f"{kind.value} schedule needs T >= 1, got T={timesteps}")
    betas = beta_schedule(kind, timesteps, beta_start, beta_end)
    if not np.all((betas > 0) & (betas < 1)):
        raise ValueError(
            f"{kind.value} schedule with T={timesteps}: betas span [{betas.min():.4g}, "
            f"{betas.max():.4g}], outside (0, 1) (beta_start={beta_start:g} and "
            f"beta_end={beta_end:g} are for T=1000 and scale by 1000/T)")
    if zero_terminal_snr:
        if timesteps < 2:
            raise ValueError(f"zero_terminal_snr needs T >= 2, got T={timesteps}")
        betas = rescale_zero_terminal_snr(betas)
    alpha_bar_T = float(np.prod(1.0 - betas))
    if alpha_bar_T > max_terminal_alpha_bar:
        raise ValueError(
            f"{kind.value} schedule with T={timesteps} ends at alpha_bar_T = {alpha_bar_T:.3g} "
            f"> {max_terminal_alpha_bar:g}: x_T is not close to the N(0, I) sampling starts from")


def check_recipe(prediction: str | Prediction, zero_terminal_snr: bool,
                 weighting: str | LossWeighting = LossWeighting.UNIFORM,
                 min_snr_gamma: float = 5.0) -> None:
    """Raises ValueError (one line) for an unknown option or a combination that cannot work.

    Zero terminal SNR needs prediction v or x0 (Lin et al. 2024, Sec. 3.2): at alpha_bar_T = 0,
    x_T is pure noise, the eps target is x_T itself, and x_0 = (x_T - sqrt(1 - alpha_bar_T) eps)
    / sqrt(alpha_bar_T) is 0 / 0, so an eps network says nothing about x_0 at the step where
    sampling starts.
    """
    for value, enum_type, name in ((prediction, Prediction, "prediction"),
                                   (weighting, LossWeighting, "loss_weighting")):
        try:
            enum_type(value)
        except ValueError:
            choices = "|".join(m.value for m in enum_type)
            raise ValueError(f"{name} must be {choices}, got {value!r}") from None
    if not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma!r}")
    if zero_terminal_snr and Prediction(prediction) is Prediction.EPS:
        raise ValueError("zero_terminal_snr needs prediction v or x0: at alpha_bar_T = 0 the eps "
                         "target is x_T itself and says nothing about x_0")


class Schedule(NamedTuple):
    """Per-timestep constants, each float32 [T]; a pytree, so it passes through jit.

    alpha_bar_t > 0 throughout: a zero-terminal-SNR alpha_bar_T = 0 is stored as
    `ZERO_SNR_ALPHA_BAR` (see `schedule_constants`), so every constant is finite.
    """
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


# What alpha_bar_T = 0 (zero terminal SNR) is stored as: diffusers' choice for its
# zero-SNR schedules (the smallest positive fp16 subnormal), or half of alpha_bar_{T-1}
# where that is smaller, so alpha_bar stays decreasing and beta_T in (0, 1). SNR_T is then
# <= 6e-8 (x_T keeps <= 2.4e-4 of x_0's amplitude) instead of 0, and sqrt(1 / alpha_bar_T)
# is finite, so eps <-> x_0 conversions give numbers, not inf - inf. What they cost: an
# x_0 recovered from eps at t = T (a v or x0 network through `eps_fn_from_model`) loses
# ~6e-8 / sqrt(alpha_bar_T) of |x_T| to float32 rounding (2.5e-4 at T = 50..100, 1.3e-3 at
# T = 1000), and the samplers pass it on times sqrt(alpha_bar_next): < 1e-5 |x_T| for DDPM
# and for 20 DDIM or DPM-Solver++ steps, all of it only for 1- or 2-step sampling.
ZERO_SNR_ALPHA_BAR = 2.0**-24


def schedule_constants(betas: np.ndarray) -> dict[str, np.ndarray]:
    """All schedule constants in float64 numpy (what `make_schedule` casts to float32).

    A zero alpha_bar_T (from `rescale_zero_terminal_snr`, T >= 2) is replaced by
    min(ZERO_SNR_ALPHA_BAR, alpha_bar_{T-1} / 2), and beta_T by the matching
    1 - alpha_bar_T / alpha_bar_{T-1}; any schedule with alpha_bar_T > 0 is untouched.
    """
    betas = np.asarray(betas, dtype=np.float64)
    ac = np.cumprod(1.0 - betas)
    if ac[-1] == 0.0 and len(ac) > 1:
        ac[-1] = min(ZERO_SNR_ALPHA_BAR, ac[-2] / 2)
        betas = np.append(betas[:-1], 1.0 - ac[-1] / ac[-2])
    alphas = 1.0 - betas
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
                  beta_end: float = 0.02, zero_terminal_snr: bool = False) -> Schedule:
    """The float32 constants of `beta_schedule`, after `check_schedule` accepts it; with
    zero_terminal_snr, of its `rescale_zero_terminal_snr` (then see `check_recipe`)."""
    check_schedule(kind, timesteps, beta_start, beta_end, zero_terminal_snr=zero_terminal_snr)
    betas = beta_schedule(kind, timesteps, beta_start, beta_end)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    consts = schedule_constants(betas)
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


def predict_v(sched: Schedule, x0: Array, t: Array, noise: Array) -> Array:
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0  (Salimans & Ho 2022, Sec. 4)."""
    return (batch_mul(sched.sqrt_alphas_cumprod[t], noise)
            - batch_mul(sched.sqrt_one_minus_alphas_cumprod[t], x0))


def predict_xstart_from_v(sched: Schedule, x_t: Array, t: Array, v: Array) -> Array:
    """x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v  (Salimans & Ho 2022, Sec. 4)."""
    return (batch_mul(sched.sqrt_alphas_cumprod[t], x_t)
            - batch_mul(sched.sqrt_one_minus_alphas_cumprod[t], v))


def predict_eps_from_v(sched: Schedule, x_t: Array, t: Array, v: Array) -> Array:
    """eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v: x_t and v are a rotation of
    (x_0, eps) by the angle phi_t with cos(phi_t) = sqrt(alpha_bar_t)  (ibid., App. D)."""
    return (batch_mul(sched.sqrt_one_minus_alphas_cumprod[t], x_t)
            + batch_mul(sched.sqrt_alphas_cumprod[t], v))


def model_output_to_eps_and_xstart(sched: Schedule, out: Array, x_t: Array, t: Array,
                                   prediction: str | Prediction = Prediction.EPS):
    """(eps, x_0) implied by a network output `out` [B, ...] at (x_t [B, ...], t [B]); the one
    place that knows what each prediction target means."""
    prediction = Prediction(prediction)
    if prediction is Prediction.EPS:
        return out, predict_xstart_from_eps(sched, x_t, t, out)
    if prediction is Prediction.V:
        return predict_eps_from_v(sched, x_t, t, out), predict_xstart_from_v(sched, x_t, t, out)
    return predict_eps_from_xstart(sched, x_t, t, out), out


def model_output_to_eps(sched: Schedule, out: Array, x_t: Array, t: Array,
                        prediction: str | Prediction = Prediction.EPS) -> Array:
    """The eps implied by a network output; see `model_output_to_eps_and_xstart`."""
    return model_output_to_eps_and_xstart(sched, out, x_t, t, prediction)[0]


def predict_xstart(sched: Schedule, out: Array, x_t: Array, t: Array,
                   prediction: str | Prediction = Prediction.EPS) -> Array:
    """The x_0 implied by a network output; see `model_output_to_eps_and_xstart`."""
    return model_output_to_eps_and_xstart(sched, out, x_t, t, prediction)[1]


def eps_fn_from_model(model_fn: Callable[..., Array], sched: Schedule,
                      prediction: str | Prediction = Prediction.EPS) -> Callable[..., Array]:
    """An eps_fn for the samplers from a network predicting `prediction`.

    model_fn(x_t, t, *args) -> out; the result takes the same arguments, so a conditional
    model_fn(x, t, y) gives what `guided_eps_fn` takes. For eps it is model_fn itself.
    eps is affine in the output for fixed (x_t, t) (eps = a_t x_t + b_t out, b_t != 0), so
    guiding eps with weight w, as `guided_eps_fn` does, is guiding the raw v or x_0 output
    with the same w: wrapping before or after guidance gives the same eps.
    """
    prediction = Prediction(prediction)
    if prediction is Prediction.EPS:
        return model_fn

    def eps_fn(x_t: Array, t: Array, *args) -> Array:
        return model_output_to_eps(sched, model_fn(x_t, t, *args), x_t, t, prediction)
    return eps_fn


def training_target(sched: Schedule, x0: Array, t: Array, noise: Array,
                    prediction: str | Prediction = Prediction.EPS) -> Array:
    """What a network predicting `prediction` regresses on for x_t = q_sample(x0, t, noise)."""
    prediction = Prediction(prediction)
    if prediction is Prediction.EPS:
        return noise
    if prediction is Prediction.V:
        return predict_v(sched, x0, t, noise)
    return x0


def signal_to_noise_ratio(sched: Schedule, t: Array) -> Array:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t), [B]  (Kingma et al. 2021, VDM)."""
    return jnp.square(sched.sqrt_alphas_cumprod[t] / sched.sqrt_one_minus_alphas_cumprod[t])


def min_snr_weight(sched: Schedule, t: Array, prediction: str | Prediction = Prediction.EPS,
                   gamma: float = 5.0) -> Array:
    """Min-SNR-gamma loss weight [B] (Hang et al. 2023, "Efficient Diffusion Training via
    Min-SNR Weighting Strategy"; gamma = 5 is the paper's default).

    The paper weights the x_0 loss ||x_0 - x_0_hat||^2 by min(SNR_t, gamma). Written for the
    target actually regressed on, using ||eps - eps_hat||^2 = SNR_t ||x_0 - x_0_hat||^2 and
    ||v - v_hat||^2 = (SNR_t + 1) ||x_0 - x_0_hat||^2, the same weight is
      eps: min(SNR_t, gamma) / SNR_t,  v: min(SNR_t, gamma) / (SNR_t + 1),  x0: min(SNR_t, gamma)
    (the paper's eps and v forms; its code's "min_snr", "vmin_snr"). At SNR_T ~ 0 (zero
    terminal SNR) the v and x0 weights vanish; the eps weight is written min(1, gamma / SNR_t)
    so it is 1 there rather than 0 / 0.
    """
    snr = signal_to_noise_ratio(sched, t)
    prediction = Prediction(prediction)
    if prediction is Prediction.EPS:
        return jnp.minimum(1.0, gamma / snr)
    clipped = jnp.minimum(snr, gamma)
    return clipped / (snr + 1.0) if prediction is Prediction.V else clipped


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


def training_losses(model_fn: Callable[[Array, Array], Array], sched: Schedule, x0: Array,
                    key: Array, *, prediction: str | Prediction = Prediction.EPS,
                    weighting: str | LossWeighting = LossWeighting.UNIFORM,
                    min_snr_gamma: float = 5.0) -> Array:
    """||target - model_fn(x_t, t)||^2, mean over non-batch dims, per example.

    With the defaults this is the simple loss ||eps - eps_theta(x_t, t)||^2 (Ho et al.
    Eq. 14). `prediction` picks the target (`training_target`); weighting "min_snr"
    multiplies each example by `min_snr_weight`. x0: [B, ...]; returns [B].
    """
    prediction, weighting = Prediction(prediction), LossWeighting(weighting)
    t_key, n_key = jax.random.split(key)
    # 1. the forward process: t ~ U{0..T-1}, x_t ~ q(x_t | x_0)  (Ho et al. Algorithm 1)
    t = jax.random.randint(t_key, (x0.shape[0],), 0, sched.num_timesteps)
    noise = jax.random.normal(n_key, x0.shape, x0.dtype)
    out = model_fn(q_sample(sched, x0, t, noise), t)
    # 2. squared error to the target, mean per example
    target = training_target(sched, x0, t, noise, prediction)
    loss = jnp.mean(jnp.square(target - out).reshape(x0.shape[0], -1), axis=1)
    # 3. per-timestep weight
    if weighting is LossWeighting.MIN_SNR:
        loss = loss * min_snr_weight(sched, t, prediction, min_snr_gamma)
    return loss


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
                keep_trajectory: bool = False, eta_min_t: int = 0):
    """DDIM over `steps` evenly spaced timesteps; eta = 0 is deterministic, 1 is DDPM-like.
    Steps from t < eta_min_t take eta = 0: fresh noise only at high noise (a noise interval,
    as EDM's S_tmin); 0 keeps eta at every step."""
    ts = ddim_timesteps(sched.num_timesteps, steps)
    ts_prev = np.append(ts[1:], -1).astype(np.int32)
    x_init = jax.random.normal(jax.random.fold_in(key, sched.num_timesteps), shape)
    batch = shape[0]

    def step(x, i):
        t, t_prev = _full(ts_arr[i], batch), _full(ts_prev_arr[i], batch)
        noise = jax.random.normal(jax.random.fold_in(key, i), shape)
        step_eta = jnp.where(t >= eta_min_t, eta, 0.0)
        x, _ = ddim_step(sched, eps_fn(x, t), x, t, t_prev, step_eta, noise, clip_x0)
        return x, (x if keep_trajectory else None)

    ts_arr, ts_prev_arr = jnp.asarray(ts), jnp.asarray(ts_prev)
    x, traj = jax.lax.scan(step, x_init, jnp.arange(steps))
    return (x, traj) if keep_trajectory else x


def half_log_snr(sched: Schedule, t: Array) -> Array:
    """lambda_t = log(alpha_t / sigma_t) = log(sqrt(alpha_bar_t) / sqrt(1 - alpha_bar_t)), [B]
    (Lu et al. 2022): the time variable of the DPM-Solvers, increasing as t decreases."""
    return jnp.log(sched.sqrt_alphas_cumprod[t]) - jnp.log(sched.sqrt_one_minus_alphas_cumprod[t])


def dpmpp2m_step(sched: Schedule, eps: Array, x_t: Array, t: Array, t_next: Array,
                 x0_last: Array, h_last: Array, clip_x0: bool = False):
    """One DPM-Solver++(2M) update x_t -> x_{t_next}  (Lu et al. 2022, "DPM-Solver++",
    Algorithm 2). Returns (x_next, x0_pred, h).

    With alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), h = lambda_{t_next} - lambda_t,
    r = h_last / h and x_0 the data prediction from eps = eps_theta(x_t, t) [B, ...]:
        D = (1 + 1 / (2r)) x_0 - 1 / (2r) x0_last
        x_next = (sigma_{t_next} / sigma_t) x_t - alpha_{t_next} (e^{-h} - 1) D.
    x0_last [B, ...] and h_last [B] are the previous step's x0_pred and h; h_last = 0 means
    none, and the update is first order (D = x_0: DDIM with eta = 0). t, t_next: [B] int;
    t_next = -1 is the end of the chain (alpha = 1, sigma = 0), where the update returns x_0.

    Lower order final: the steps into t = 0 and into the end are both first order. On DDIM's
    evenly spaced timesteps these two are long in lambda (linear schedule, T = 1000, 20
    steps: lambda 1.7 -> 4.6 -> inf, after steps of h = 0.3-0.7), so r ~ 0.2 and a second-order
    step into t = 0 multiplies x_0 - x0_last by 1 / (2r) ~ 2.2. On Gaussian data with the exact
    score that made DPM-Solver++(2M) worse than DDIM at 10-20 steps; with it first order, the
    error to the exact ODE solution is 0.25 vs DDIM's 0.67 at 10 steps and 1.7e-3 vs 0.33 at
    20 (unit-variance data; see tests/test_diffusion.py).
    """
    x0 = predict_xstart_from_eps(sched, x_t, t, eps)
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
    end = t_next < 0
    t_safe = jnp.maximum(t_next, 0)  # a valid index at the end; every use there is masked
    lam = half_log_snr(sched, t)
    h = jnp.where(end, 0.0, half_log_snr(sched, t_safe) - lam)
    sigma_ratio = jnp.where(end, 0.0, sched.sqrt_one_minus_alphas_cumprod[t_safe]
                            / sched.sqrt_one_minus_alphas_cumprod[t])
    alpha_next = jnp.where(end, 1.0, sched.sqrt_alphas_cumprod[t_safe])
    one_minus_exp = jnp.where(end, 1.0, -jnp.expm1(-h))  # 1 - e^{-h}; e^{-inf} = 0 at the end
    second_order = (h_last > 0) & (t_next > 0)
    half_inv_r = jnp.where(second_order, h / (2.0 * jnp.where(second_order, h_last, 1.0)), 0.0)
    d = x0 + batch_mul(half_inv_r, x0 - x0_last)
    x_next = batch_mul(sigma_ratio, x_t) + batch_mul(alpha_next * one_minus_exp, d)
    return x_next, x0, h


def dpmpp2m_sample(eps_fn: EpsFn, sched: Schedule, key: Array, shape: tuple[int, ...],
                   steps: int, clip_x0: bool = False, keep_trajectory: bool = False):
    """DPM-Solver++(2M) over DDIM's `steps` timesteps (`ddim_timesteps`), `steps` network
    evaluations; see `dpmpp2m_step`. Deterministic: `key` only draws x_T, the same x_T as
    `ddim_sample` with that key.

    Returns x_0 [B, ...], and with keep_trajectory every step's x [steps, B, ...].
    """
    ts = ddim_timesteps(sched.num_timesteps, steps)
    ts_next = np.append(ts[1:], -1).astype(np.int32)
    x_init = jax.random.normal(jax.random.fold_in(key, sched.num_timesteps), shape)
    batch = shape[0]

    def step(carry, i):
        x, x0_last, h_last = carry
        t, t_next = _full(ts_arr[i], batch), _full(ts_next_arr[i], batch)
        x, x0, h = dpmpp2m_step(sched, eps_fn(x, t), x, t, t_next, x0_last, h_last, clip_x0)
        return (x, x0, h), (x if keep_trajectory else None)

    ts_arr, ts_next_arr = jnp.asarray(ts), jnp.asarray(ts_next)
    init = (x_init, jnp.zeros_like(x_init), jnp.zeros((batch,), x_init.dtype))
    (x, _, _), traj = jax.lax.scan(step, init, jnp.arange(steps))
    return (x, traj) if keep_trajectory else x


# ----------------------------------------------------------------------------- Guidance


def drop_labels(key: Array, labels: Array, p: float, null_label: int) -> Array:
    """Replaces each label by null_label with probability p (classifier-free guidance
    training, Ho & Salimans 2021): one model learns eps(x, t, c) and eps(x, t, null)."""
    return jnp.where(jax.random.uniform(key, labels.shape) < p, null_label, labels)


def guided_eps_fn(eps_fn: Callable[[Array, Array, Array], Array], labels: Array,
                  null_label: int | Array, w: float | Array) -> EpsFn:
    """Classifier-free guidance: eps = (1 + w) * eps(x, t, c) - w * eps(x, t, null).

    labels: [B] class labels and null_label an int, or [B, L] prompt tokens and null_label
    the empty prompt's tokens [L].

    w = 0 is plain conditional sampling (Ho & Salimans 2021, Eq. 6, whose w this is; some
    code writes the same thing with scale s = 1 + w). The conditional and unconditional
    passes run as one forward call on a doubled batch. For a v or x_0 network, guide its
    `eps_fn_from_model` (or guide the raw output and wrap after: eps is affine in the output
    for fixed x_t, so both give the same eps). w may be traced.
    """
    def guided(x: Array, t: Array) -> Array:
        b = x.shape[0]
        y = jnp.concatenate([labels, jnp.broadcast_to(jnp.asarray(null_label, labels.dtype),
                                                      labels.shape)])
        eps = eps_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), y)
        cond, uncond = eps[:b], eps[b:]
        return (1.0 + w) * cond - w * uncond
    return guided


def autoguided_eps_fn(eps_fn: EpsFn, guide_eps_fn: EpsFn, w: float | Array,
                      min_t: int = 0) -> EpsFn:
    """Autoguidance (Karras et al. 2024): eps = (1 + w) * eps(x, t) - w * eps_guide(x, t).

    The guide is a weaker version of the same model (here the EMA weights of an earlier
    checkpoint of the same run); extrapolating away from its errors sharpens the samples
    without a condition, so it works for unconditional models, where classifier-free
    guidance cannot. The same w convention as `guided_eps_fn` (the paper's weight is 1 + w):
    w = 0 is the model alone. Both eps_fns take (x, t, *args) (a condition passes through
    to both, so classifier-free guidance can wrap the result); w may be traced.

    min_t > 0 guides only where t >= min_t, eps(x, t) alone below (a guidance interval,
    Kynkaanniemi et al. 2024); the guide runs only when some t in the batch needs it.
    """
    if not min_t:
        def guided(x: Array, t: Array, *args) -> Array:
            return (1.0 + w) * eps_fn(x, t, *args) - w * guide_eps_fn(x, t, *args)
        return guided

    def interval_guided(x: Array, t: Array, *args) -> Array:
        eps = eps_fn(x, t, *args)
        on = (t >= min_t).reshape(t.shape + (1,) * (eps.ndim - 1))  # w may be per example
        guide = jax.lax.cond(jnp.any(on), lambda: guide_eps_fn(x, t, *args), lambda: eps)
        w_t = jnp.where(on, w, 0.0)
        return (1.0 + w_t) * eps - w_t * guide
    return interval_guided
