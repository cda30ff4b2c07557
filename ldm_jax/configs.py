"""One ml_collections ConfigDict per stage, and presets that scale it.

Stages: `vae` (first stage), `ldm` (diffusion on VAE latents), `pixel` (the same diffusion
on 28x28 pixels, the baseline), `classifier` (the MNIST feature network for FID), and
`distill` / `distill_pixel` (few-step consistency students of the ldm / pixel model).
Presets: `smoke` (seconds, for tests/CI), `cpu-quick` (the real CPU configuration),
`full` (quality configuration for a GPU/TPU). Any field can be overridden from the CLI
with `--config.<section>.<field>=value`; `validate` runs before any work starts.
"""

from __future__ import annotations

import math

import ml_collections

from ldm_jax import data, diffusion, nets

STAGES = ("vae", "ldm", "pixel", "classifier", "distill", "distill_pixel")
PRESETS = ("smoke", "cpu-quick", "full")
DIFFUSION_STAGES = ("ldm", "pixel")
STUDENTS = {"distill": "ldm", "distill_pixel": "pixel"}  # student stage -> its teacher
SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
MNIST_TRAIN_IMAGES = data.MNIST_TRAIN_IMAGES


class ConfigError(ValueError):
    """An invalid configuration; the message is one line for the user."""


def _common(stage: str, preset: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = stage  # which model this config trains
    c.preset = preset  # the preset it was built from (informational)
    c.seed = 0  # seeds parameters, data order and every training key; in [0, 2**63)

    c.data = ml_collections.ConfigDict()
    c.data.source = "package"  # 'package' (shipped, MD5-verified IDX files) or 'tfds'
    c.data.dir = ""  # read IDX files from here instead of the package copy ('' = package)
    c.data.batch_size = 128  # global batch, split over all devices and processes
    c.data.max_examples = 0  # use only the first N training images (0 = all 60,000)
    c.data.holdout = 0  # never train on the last N training images: the validation split for choices

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-4  # peak learning rate of AdamW
    c.optim.warmup_steps = 100  # linear warmup from 0 to lr, then cosine decay to lr * final_lr_frac
    c.optim.final_lr_frac = 0.1  # end of the cosine decay, as a fraction of lr
    c.optim.weight_decay = 0.0  # AdamW decoupled weight decay
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.99  # Adam beta2
    c.optim.grad_clip = 1.0  # clip the global gradient norm to this (0 = off)
    c.optim.ema_decay = 0.999  # EMA of parameters, warmed up as min(decay, (1+s)/(10+s))

    c.train = ml_collections.ConfigDict()
    c.train.steps = 10_000  # optimizer steps in total
    c.train.log_every = 50  # write a metrics.jsonl line every this many steps
    c.train.ckpt_every = 1_000  # save a checkpoint every this many steps (and at the end)
    c.train.keep_checkpoints = 3  # how many recent checkpoints to keep
    c.train.max_minutes = 0.0  # stop cleanly after this wall-clock budget (0 = no budget)
    c.train.skip_nonfinite = False  # skip updates with a NaN/inf loss or gradient instead of stopping
    return c


def _diffusion(c: ml_collections.ConfigDict) -> None:
    """The ldm and pixel stages (full preset): schedule and recipe, U-Net, sampler."""
    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.timesteps = 1000  # T
    # The recipe below was chosen by the ablation in docs/results.md, "The diffusion recipe".
    c.diffusion.schedule = "cosine"  # beta schedule: linear | quadratic | cosine
    c.diffusion.beta_start = 1e-4  # beta_1 (linear, quadratic)
    c.diffusion.beta_end = 0.02  # beta_T (linear, quadratic)
    c.diffusion.var_type = "fixed_small"  # DDPM sampling variance: fixed_small (beta~) | fixed_large (beta)
    c.diffusion.clip_x0 = c.stage == "pixel"  # clip predicted x_0 to [-1, 1] (pixels only)
    c.diffusion.prediction = "v"  # what the U-Net predicts: eps | v (Salimans & Ho 2022) | x0
    c.diffusion.loss_weighting = "min_snr"  # uniform | min_snr (Min-SNR-gamma, Hang et al. 2023)
    c.diffusion.min_snr_gamma = 5.0  # gamma of min_snr
    # Off: no gain measured; the schedules here already end near alpha_bar_T = 0.
    c.diffusion.zero_terminal_snr = False  # rescale betas so alpha_bar_T = 0 (Lin et al. 2024; v or x0)

    _unet(c)
    _sampler(c)
    c.model.ch, c.model.num_res_blocks = 128, 2
    c.train.steps = 50_000
    if c.stage == "ldm":
        c.latent = ml_collections.ConfigDict()
        c.latent.posterior = "sample"  # encode training images as posterior 'mean' or a 'sample'
        c.optim.lr = 1e-3
        # Chosen on the holdout by Inception FID (docs/results.md, "Accelerators").
        c.sample.sampler, c.sample.steps, c.sample.eta = "ddim", 50, 1.0
        c.sample.guide_step, c.sample.guide_weight = 2_000, 1.0
    else:
        c.optim.lr = 5e-4
        c.model.ch_mult = (1, 2, 2)


def _unet(c: ml_collections.ConfigDict) -> None:
    """The denoiser's fields (full preset)."""
    c.model = ml_collections.ConfigDict()
    c.model.ch = 64  # base channels of the U-Net
    c.model.ch_mult = (1, 2)  # channel multiplier per level; a stride-2 conv between levels
    c.model.num_res_blocks = 2  # residual blocks per level
    c.model.heads = 4  # attention heads at the lowest resolution
    c.model.groups = 8  # GroupNorm groups
    # none | class (label embedding) | crossattn (spatial transformer on learned label
    # tokens) | text (spatial transformer on an encoded prompt, ldm_jax/text.py)
    c.model.conditioning = "none"
    c.model.num_classes = 10  # labels 0..9; label num_classes is the null label
    # Share of training labels replaced by the null label (CFG); for text, the share of
    # prompts replaced by the empty prompt.
    c.model.label_dropout = 0.1
    c.model.context_tokens = 4  # crossattn: learned tokens per label
    c.model.context_dim = 64  # crossattn: width of each token; text: width of the text encoder
    c.model.text_layers = 2  # text: transformer blocks of the text encoder (model.heads heads)
    # text: width of a convolution over the character embeddings (0 = none): a word gets the
    # same features wherever a template puts it (docs/results.md, "Conditioning and text").
    c.model.text_conv = 5
    # Compute dtype of the U-Net: float32 | bfloat16 (for GPU/TPU; parameters, gradients and
    # optimizer state stay float32, GroupNorm statistics and the loss are float32).
    c.model.dtype = "float32"


def _sampler(c: ml_collections.ConfigDict) -> None:
    """The default sampler of sample and pipeline, and its autoguidance."""
    c.sample = ml_collections.ConfigDict()
    # DPM-Solver++(2M)-20 beat DDIM-50 for every recipe (docs/results.md, "Samplers and guidance").
    c.sample.sampler = "dpmpp2m"  # default sampler of sample/pipeline: ddpm | ddim | dpmpp2m
    c.sample.steps = 20  # DDIM / DPM-Solver++ steps
    c.sample.eta = 0.0  # DDIM eta in [0, 1] (0 = deterministic, 1 = DDPM-like)
    # Autoguidance (Karras et al. 2024): eps = (1 + w) eps - w eps_guide, where the guide is
    # this run's own EMA weights at step guide_step (training keeps that checkpoint). It
    # needs no condition, so it guides unconditional samples too. 0: off.
    c.sample.guide_step = 0  # the earlier checkpoint that guides (0 = none kept)
    c.sample.guide_weight = 0.0  # w >= 0 (needs guide_step > 0)
    c.sample.guide_min_t = 0  # guide only at timesteps t >= this (a guidance interval; 0: every t)
    c.sample.eta_min_t = 0  # DDIM's eta only at steps from t >= this, eta 0 below (0: every step)


def _cpu_quick_diffusion(c: ml_collections.ConfigDict) -> None:
    """The diffusion stages at the README job's 2-core CPU budget."""
    # At a fixed wall clock, more and cheaper steps win (docs/results.md, "The diffusion recipe").
    c.model.ch, c.model.num_res_blocks, c.data.batch_size = 32, 1, 64
    # Stochastic DDIM-50 corrects an under-trained model (docs/results.md, "Samplers and guidance").
    c.sample.sampler, c.sample.steps, c.sample.eta = "ddim", 50, 1.0
    # Guides and weights chosen on the holdout (docs/results.md, "Chosen on the holdout"):
    # the LDM's w = 1.5 over two training seeds; the pixel model's step-200 guide is off.
    if c.stage == "ldm":
        c.model.ch_mult, c.optim.lr, c.train.steps = (1, 2), 4e-3, 7_000
        c.sample.guide_step, c.sample.guide_weight = 500, 1.5
        # Fresh noise only from t = 500: better Inception FID and strokes on three training
        # seeds, level recognisable share pooled (docs/results.md, "Samplers and guidance").
        c.sample.eta_min_t = 500
    else:  # 1,500 steps: the README job's VAE + LDM minutes (docs/results.md, "Cost")
        c.optim.lr, c.train.steps = 2e-3, 1_500
        c.sample.guide_step, c.sample.guide_weight = 200, 0.0


def _first_stage(c: ml_collections.ConfigDict) -> None:
    """The VAE stage (full preset): its networks, regulariser and loss."""
    c.model = ml_collections.ConfigDict()
    c.model.channels = (32, 64)  # encoder channels per level; each level halves 28 -> 14 -> 7
    c.model.latent_ch = 4  # latent channels c of the s x s x c latent
    c.model.num_res_blocks = 1  # residual blocks per level
    # The decoder's residual blocks per level (< 0: num_res_blocks); decoding runs once per
    # sample, so a deeper decoder costs the LDM nothing but VAE training time.
    c.model.decoder_res_blocks = -1
    c.model.groups = 8  # GroupNorm groups
    c.autoencoder = ml_collections.ConfigDict()
    c.autoencoder.reg = "kl"  # first-stage regulariser: kl (Gaussian posterior) | vq (codebook)
    # Decoder output: bernoulli (logits, cross-entropy; saturates to exact 0 and 255) |
    # gaussian (a mean under squared error; leaves a faint haze on the background) |
    # hurdle (P(pixel = 0), and a nonzero pixel's intensity: decodes 0 where 0 is likelier) |
    # hurdle_logit (as hurdle, with a logit-normal intensity decoded at its median).
    c.autoencoder.likelihood = "bernoulli"
    c.autoencoder.codebook_size = 256  # vq: number of codes
    c.autoencoder.codebook_decay = 0.99  # vq: EMA decay of code counts and sums
    c.autoencoder.dead_code_threshold = 1.0  # vq: restart codes used < this many times per batch (EMA)
    c.autoencoder.commitment_weight = 0.25  # vq: weight of ||z_e - sg(q)||^2
    c.loss = ml_collections.ConfigDict()
    c.loss.kl_weight = 1e-3  # beta of the KL term (kl only); reconstruction is a per-image sum of squares
    c.loss.l1_weight = 0.0  # weight of an L1 term on the image in [0, 1] (pulls to the median)
    c.loss.perceptual_weight = 0.0  # weight of the classifier-feature perceptual loss (0 = off)
    # Adversarial term of Esser et al. 2021 / Rombach et al. 2022: a patch discriminator
    # (hinge loss) and a generator loss -D(x_hat) scaled by the adaptive weight
    # ||grad L_rec|| / (||grad L_G|| + 1e-4) at the decoder's last layer, clipped to [0, 1e4].
    # Off here (not measured on `full`); `cpu-quick` turns it on, where its LDM won on the
    # holdout at 1.6x the VAE step (docs/results.md, "The first stage").
    c.loss.adversarial_weight = 0.0  # times the adaptive weight (0 = off: no discriminator at all)
    c.loss.adversarial_start = 10_000  # step from which the term (and the discriminator's training) is on
    c.loss.disc_channels = (32, 64)  # the discriminator's two convolutions' widths
    c.optim.lr = 1e-3
    c.optim.ema_decay = 0.99
    c.train.steps = 20_000


def _classifier(c: ml_collections.ConfigDict) -> None:
    """The MNIST CNN whose features the classifier FID uses."""
    c.model = ml_collections.ConfigDict()
    c.model.feature_dim = 128  # width of the penultimate layer (the FID features)
    c.optim.lr = 1e-3
    c.optim.ema_decay = 0.99
    c.optim.weight_decay = 1e-4
    c.train.steps = 6_000


def _distill(c: ml_collections.ConfigDict) -> None:
    """A consistency student (full preset); its U-Net, schedule and data are its teacher's."""
    c.distill = ml_collections.ConfigDict()
    c.distill.intervals = 50  # N: the grid of teacher timesteps, one DDIM step apart (LCM: 50)
    c.distill.target_ema = 0.95  # EMA decay of the target network (LCM); 0: the student, no gradient
    c.distill.guidance = 0.0  # class-conditional teachers: CFG weight w built into the target
    c.distill.autoguidance = -1.0  # autoguidance w built into the target; < 0: the teacher's own
    c.distill.guide_min_t = -1  # the target guides only at t >= it; < 0: the teacher's own
    c.distill.low_noise_bias = 0.0  # b: interval n drawn with p ~ exp(-b n / intervals); 0: uniform
    # weight_max > weight_min: the student takes its guidance weight w as an input (LCM), trained
    # on w ~ U[weight_min, weight_max]; w is CFG's for a class teacher, else autoguidance's.
    c.distill.weight_min, c.distill.weight_max = 0.0, 0.0
    # > 0: a patch discriminator judges the student's decoded x_0 against decoded data (ADD-style),
    # its term scaled by this times the adaptive weight; 0: off, no discriminator at all.
    c.distill.adversarial_weight = 0.0
    c.distill.adversarial_start = 0  # step from which the term (and the discriminator's training) is on
    c.distill.disc_channels = (32, 64)
    c.sample = ml_collections.ConfigDict()
    c.sample.steps = 4  # default sampling steps of sample and pipeline, in [1, intervals]
    c.sample.time_power = 1.0  # re-noise times ~ (T - 1)(1 - i / steps)^power; 1: LCM's
    c.sample.gamma = 1.0  # share of fresh noise in each re-noising; 1: LCM's, 0: deterministic
    c.sample.weight = -1.0  # a student that takes autoguidance's w: its default; < 0: the teacher's
    c.optim.lr, c.optim.warmup_steps = 1e-4, 100
    c.train.steps = 10_000


def _full(c: ml_collections.ConfigDict) -> None:
    """A GPU or TPU: the stage defaults, with a validation split."""
    _holdout(c)


def _cpu_quick(c: ml_collections.ConfigDict) -> None:
    """The README job: every stage sized for two CPU cores (docs/results.md, "Cost")."""
    _holdout(c)
    # A checkpoint costs about 0.5 s: rarer for the fast stages.
    c.train.log_every, c.train.ckpt_every = 25, 500 if c.stage in ("vae", "ldm") else 200
    if c.stage == "vae":  # full-resolution convolutions dominate the step
        c.model.channels, c.model.num_res_blocks, c.data.batch_size = (16, 32), 0, 64
        # 4,800 steps and the adversarial term at 0.5 from step 600: the best rFID on the holdout,
        # and the best LDM there over two seeds (docs/results.md, "The first stage").
        c.train.steps, c.optim.lr = 4_800, 3e-3
        c.loss.adversarial_weight, c.loss.adversarial_start = 0.5, 600
    elif c.stage == "classifier":
        c.train.steps = 3_000
    elif c.stage in STUDENTS:  # 500 steps, the lr and the times' power: chosen on the holdout
        c.data.batch_size, c.train.steps = 64, 500  # (docs/results.md, "Few-step sampling")
        c.optim.lr, c.sample.time_power = 8e-4, 0.6
        if c.stage == "distill":  # the target as measured: w = 2 at every t (results.md)
            c.distill.autoguidance, c.distill.guide_min_t = 2.0, 0
    else:
        _cpu_quick_diffusion(c)


def _smoke(c: ml_collections.ConfigDict) -> None:
    """Seconds per stage, for tests and CI."""
    c.data.batch_size, c.data.max_examples = 16, 512
    c.train.steps, c.train.log_every, c.train.ckpt_every = 6, 2, 3
    c.optim.warmup_steps = 1
    if c.stage == "vae":
        c.model.channels, c.model.groups, c.loss.adversarial_start = (8, 16), 4, 3
    elif c.stage in DIFFUSION_STAGES:
        c.model.ch, c.model.ch_mult, c.model.num_res_blocks = 16, (1, 2), 1
        c.model.heads, c.model.groups, c.diffusion.timesteps = 2, 4, 50
        _sampler(c)  # the plain default sampler: 6 steps keep no step-2,000 guide
        c.sample.steps = 5
    elif c.stage in STUDENTS:  # a smoke teacher has T = 50
        c.distill.intervals = 10


def _holdout(c: ml_collections.ConfigDict) -> None:
    """Defaults are chosen on the last 2,000 training images (docs/results.md, "Chosen on
    the holdout"); the classifier, which defines the FID features, trains on all."""
    c.data.holdout = 2_000 if c.stage != "classifier" else 0


STAGE_DEFAULTS = {"vae": _first_stage, "ldm": _diffusion, "pixel": _diffusion,
                  "classifier": _classifier, "distill": _distill, "distill_pixel": _distill}
PRESET_OVERRIDES = {"smoke": _smoke, "cpu-quick": _cpu_quick, "full": _full}


def get_config(stage: str, preset: str = "full") -> ml_collections.ConfigDict:
    """The config of one stage at one preset: the stage's defaults, then the preset's overrides."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    c = _common(stage, preset)
    STAGE_DEFAULTS[stage](c)
    PRESET_OVERRIDES[preset](c)
    return c


def union_config() -> ml_collections.ConfigDict:
    """Every field of every stage (full preset): the schema CLI overrides are parsed against."""
    u = ml_collections.ConfigDict()
    for stage in STAGES:
        _merge(u, get_config(stage))
    return u


def _merge(dst: ml_collections.ConfigDict, src: ml_collections.ConfigDict) -> None:
    for key, value in src.items():
        if isinstance(value, ml_collections.ConfigDict):
            if key not in dst:
                dst[key] = ml_collections.ConfigDict()
            _merge(dst[key], value)
        elif key not in dst:
            dst[key] = value


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> None:
    """Sets flat 'a.b' keys; a key this stage's config lacks is an error."""
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = config
        for p in parents:
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                raise ConfigError(f"unknown config key {path!r} for stage {config.stage!r}")
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"unknown config key {path!r} for stage {config.stage!r}")
        try:
            node[leaf] = value
        except TypeError as e:
            raise ConfigError(f"config key {path!r}: {e}") from None


def _leaves(node: ml_collections.ConfigDict, prefix: str = ""):
    """(dotted name, value) of every field, tuples included as they are."""
    for key, value in node.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _check_numbers(c: ml_collections.ConfigDict) -> None:
    """Every float finite, every integer an int64, also inside tuples."""
    for name, value in _leaves(c):
        for v in (value if isinstance(value, (tuple, list)) else (value,)):
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{name} must be finite, got {value}")
            if isinstance(v, int) and not -2**63 <= v < 2**63:
                raise ConfigError(f"{name}={value} is outside the int64 range")
    # numpy's Generator (data order) takes no negative seed; jax.random.key takes int64.
    if not 0 <= c.seed < 2**63:
        raise ConfigError(f"seed must be in [0, 2**63), got {c.seed}")


def _check_levels(name: str, levels) -> None:
    """A non-empty tuple of positive integers (channels or channel multipliers)."""
    if not isinstance(levels, (tuple, list)) or not levels or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in levels):
        raise ConfigError(f"{name} must be a non-empty tuple of positive integers, "
                          f"got {levels!r}")


def _check_disc_channels(name: str, channels) -> None:
    _check_levels(name, channels)
    if any(ch % nets.PatchDiscriminator.groups for ch in channels[1:]):
        raise ConfigError(f"{name} after the first must be multiples of "
                          f"{nets.PatchDiscriminator.groups} (GroupNorm), got {channels}")


def _check_at_least(fields: dict, low: int) -> None:
    for name, value in fields.items():
        if not value >= low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ConfigError with one line when the config cannot work."""
    if c.stage not in STAGES:
        raise ConfigError(f"unknown stage {c.stage!r}; choose one of {', '.join(STAGES)}")
    _check_numbers(c)
    if c.data.source not in ("package", "tfds"):
        raise ConfigError(f"data.source must be 'package' or 'tfds', got {c.data.source!r}")
    _check_training(c)
    if "model" in c and "groups" in c.model:
        _check_at_least({"model.groups": c.model.groups}, 1)
    if "model" in c and "num_res_blocks" in c.model:
        _check_at_least({"model.num_res_blocks": c.model.num_res_blocks}, 0)
    if c.stage == "classifier":
        _check_at_least({"model.feature_dim": c.model.feature_dim}, 1)
    if c.stage == "vae":
        _check_first_stage(c)
    if c.stage in DIFFUSION_STAGES:
        _check_diffusion(c)
        _check_unet(c)
        _check_sampling(c)
    if c.stage in STUDENTS:
        _check_distill(c)


def _check_distill(c: ml_collections.ConfigDict) -> None:
    """The student's grid, target network, guidance and default step count."""
    d = c.distill
    _check_at_least({"distill.intervals": d.intervals}, 1)
    if not 0.0 <= d.target_ema < 1.0:
        raise ConfigError(f"distill.target_ema must be in [0, 1), got {d.target_ema}")
    check_weight(d.guidance, "distill.guidance")
    check_weight(d.weight_min, "distill.weight_min")
    check_weight(d.weight_max, "distill.weight_max")
    if d.weight_max < d.weight_min:
        raise ConfigError(f"distill.weight_max={d.weight_max:g} is below distill.weight_min="
                          f"{d.weight_min:g}")
    if student_takes_weight(d) and c.sample.weight >= 0 and \
            not d.weight_min <= c.sample.weight <= d.weight_max:
        raise ConfigError(f"sample.weight={c.sample.weight:g} is outside [distill.weight_min, "
                          f"distill.weight_max] = [{d.weight_min:g}, {d.weight_max:g}]")
    if student_takes_weight(d) and d.guidance > 0:
        raise ConfigError("distill.guidance fixes the CFG weight, distill.weight_max > "
                          "weight_min makes it the student's input: set one")
    check_weight(d.adversarial_weight, "distill.adversarial_weight")
    _check_at_least({"distill.adversarial_start": d.adversarial_start}, 0)
    _check_disc_channels("distill.disc_channels", d.disc_channels)
    if not 0.0 <= d.low_noise_bias <= 20.0:  # e^20: every draw would be the lowest interval
        raise ConfigError(f"distill.low_noise_bias must be in [0, 20], got {d.low_noise_bias}")
    if not 1 <= c.sample.steps <= d.intervals:
        raise ConfigError(f"sample.steps must be in [1, distill.intervals={d.intervals}], "
                          f"got {c.sample.steps}")
    if not 0.0 < c.sample.time_power <= 1.0:
        raise ConfigError(f"sample.time_power must be in (0, 1], got {c.sample.time_power}")
    if not 0.0 <= c.sample.gamma <= 1.0:
        raise ConfigError(f"sample.gamma must be in [0, 1], got {c.sample.gamma}")


def _check_training(c: ml_collections.ConfigDict) -> None:
    """data, optim and train: sizes, rates and Adam's constants."""
    positive = {"optim.lr": c.optim.lr, "data.batch_size": c.data.batch_size,
                "train.steps": c.train.steps, "train.log_every": c.train.log_every,
                "train.ckpt_every": c.train.ckpt_every,
                "train.keep_checkpoints": c.train.keep_checkpoints}
    for name, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    if min(c.data.max_examples, c.data.holdout, c.train.max_minutes, c.optim.warmup_steps) < 0:
        raise ConfigError("data.max_examples, data.holdout, train.max_minutes and "
                          "optim.warmup_steps must be >= 0")
    if not 0.0 <= c.optim.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay must be in [0, 1), got {c.optim.ema_decay}")
    if c.data.max_examples and c.data.max_examples < c.data.batch_size:
        raise ConfigError(f"data.max_examples={c.data.max_examples} is smaller than one batch "
                          f"({c.data.batch_size})")
    if c.data.batch_size > MNIST_TRAIN_IMAGES:
        raise ConfigError(f"data.batch_size={c.data.batch_size} is larger than the "
                          f"{MNIST_TRAIN_IMAGES:,} training images")
    if c.data.holdout + c.data.batch_size > MNIST_TRAIN_IMAGES:
        raise ConfigError(f"data.holdout={c.data.holdout} leaves fewer than one batch of the "
                          f"{MNIST_TRAIN_IMAGES:,} training images")
    o = c.optim
    for name, value in (("optim.b1", o.b1), ("optim.b2", o.b2)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {value}")
    if not 0.0 <= o.final_lr_frac <= 1.0:
        raise ConfigError(f"optim.final_lr_frac must be in [0, 1], got {o.final_lr_frac}")
    _check_at_least({"optim.weight_decay": o.weight_decay, "optim.grad_clip": o.grad_clip}, 0)


def _check_first_stage(c: ml_collections.ConfigDict) -> None:
    """The VAE's channels, latent size, loss weights and regulariser."""
    _check_levels("model.channels", c.model.channels)
    _check_channels("model.channels", c.model.channels, c.model.groups)
    side = 28
    for _ in c.model.channels:
        side = -(-side // 2)
    dim = side * side * c.model.latent_ch
    if not 0 < dim < 784:
        raise ConfigError(f"latent {side}x{side}x{c.model.latent_ch} = {dim} dims must be "
                          "between 1 and 783 (smaller than the 784 pixels)")
    weights = ("kl_weight", "l1_weight", "perceptual_weight", "adversarial_weight")
    if min(c.loss[w] for w in weights) < 0:
        raise ConfigError(f"loss.{', loss.'.join(weights)} must be >= 0")
    if c.loss.adversarial_start < 0:
        raise ConfigError(f"loss.adversarial_start must be >= 0, got {c.loss.adversarial_start}")
    _check_disc_channels("loss.disc_channels", c.loss.disc_channels)
    ae = c.autoencoder
    if ae.reg not in ("kl", "vq"):
        raise ConfigError(f"autoencoder.reg must be kl or vq, got {ae.reg!r}")
    if ae.likelihood not in nets.LIKELIHOODS:
        raise ConfigError(f"autoencoder.likelihood must be {'|'.join(nets.LIKELIHOODS)}, "
                          f"got {ae.likelihood!r}")
    if ae.codebook_size < 2 or not 0.0 <= ae.codebook_decay < 1.0 \
            or ae.commitment_weight < 0 or ae.dead_code_threshold < 0:
        raise ConfigError("autoencoder needs codebook_size >= 2, codebook_decay in [0, 1), "
                          "commitment_weight >= 0 and dead_code_threshold >= 0")


def _check_diffusion(c: ml_collections.ConfigDict) -> None:
    """The schedule and the recipe (prediction, loss weighting)."""
    d = c.diffusion
    for name, enum in (("schedule", diffusion.BetaSchedule), ("var_type", diffusion.VarianceType)):
        names = [e.value for e in enum]
        if d[name] not in names:
            raise ConfigError(f"diffusion.{name} must be {'|'.join(names)}, got {d[name]!r}")
    if d.timesteps < 2 or not 0 < d.beta_start < d.beta_end < 1:
        raise ConfigError("diffusion needs timesteps >= 2 and 0 < beta_start < beta_end < 1")
    try:
        diffusion.check_recipe(d.prediction, d.zero_terminal_snr, d.loss_weighting,
                               d.min_snr_gamma)
        diffusion.check_schedule(d.schedule, d.timesteps, d.beta_start, d.beta_end,
                                 zero_terminal_snr=d.zero_terminal_snr)
    except ValueError as e:
        raise ConfigError(f"diffusion: {str(e).strip().splitlines()[0]}") from None


def _check_unet(c: ml_collections.ConfigDict) -> None:
    """Widths, heads and conditioning of the U-Net."""
    m = c.model
    _check_at_least({"model.ch": m.ch, "model.heads": m.heads,
                     "model.context_tokens": m.context_tokens,
                     "model.context_dim": m.context_dim,
                     "model.text_layers": m.text_layers}, 1)
    _check_at_least({"model.text_conv": m.text_conv}, 0)
    _check_levels("model.ch_mult", m.ch_mult)
    _check_channels("model.ch * ch_mult", [m.ch] + [m.ch * k for k in m.ch_mult], m.groups)
    # Widths that attention runs at: the lowest level (the middle block sees ch when
    # there are no residual blocks to widen it), and every level > 0 with crossattn.
    widths = {m.ch * m.ch_mult[-1]} | ({m.ch} if m.num_res_blocks == 0 else set())
    if m.conditioning in ("crossattn", "text"):
        widths |= {m.ch * k for k in m.ch_mult[1:]}
    if m.conditioning == "text":
        widths.add(m.context_dim)  # the text encoder's self-attention
    for width in sorted(widths):
        if width % m.heads:
            raise ConfigError(f"attention width {width} is not divisible by "
                              f"model.heads={m.heads}")
    if c.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype must be float32|bfloat16, got {c.model.dtype!r}")
    if c.model.conditioning not in ("none", "class", "crossattn", "text"):
        raise ConfigError("model.conditioning must be none|class|crossattn|text, got "
                          f"{c.model.conditioning!r}")
    if not 0.0 <= c.model.label_dropout < 1.0 or c.model.num_classes < 1:
        raise ConfigError("model.label_dropout must be in [0, 1) and model.num_classes >= 1")
    if c.stage == "ldm" and c.latent.posterior not in ("mean", "sample"):
        raise ConfigError(f"latent.posterior must be 'mean' or 'sample', got {c.latent.posterior!r}")


def check_eta(eta: float, name: str = "sample.eta") -> None:
    """DDIM eta in [0, 1]; the one rule for the config, `sample` and `evaluate` (refuses nan)."""
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {eta}")


def student_takes_weight(distill) -> bool:
    """Whether a student (its distill config section, or a stored dict of one) takes its
    guidance weight as an input."""
    return distill.get("weight_max", 0.0) > distill.get("weight_min", 0.0)


def check_weight(w: float, name: str) -> None:
    """A guidance weight: finite and >= 0 (refuses nan, which absl's bounds let through)."""
    if not 0.0 <= w < math.inf:
        raise ConfigError(f"{name} must be a finite number >= 0, got {w}")


def _check_sampling(c: ml_collections.ConfigDict) -> None:
    """The default sampler and its autoguidance."""
    d = c.diffusion
    if c.sample.sampler not in SAMPLERS or not 1 <= c.sample.steps <= d.timesteps:
        raise ConfigError(f"sample.sampler must be {'|'.join(SAMPLERS)} and "
                          "1 <= sample.steps <= timesteps")
    check_eta(c.sample.eta)
    if not 0 <= c.sample.guide_step < c.train.steps:
        raise ConfigError(f"sample.guide_step must be 0 (none) or an earlier step than "
                          f"train.steps={c.train.steps}, got {c.sample.guide_step}; set "
                          "sample.guide_step=0 and sample.guide_weight=0 for no autoguidance")
    check_weight(c.sample.guide_weight, "sample.guide_weight")
    for name in ("guide_min_t", "eta_min_t"):
        if not 0 <= c.sample[name] < d.timesteps:
            raise ConfigError(f"sample.{name} must be in [0, timesteps={d.timesteps}), got "
                              f"{c.sample[name]}")
    if c.sample.guide_weight > 0 and not c.sample.guide_step:
        raise ConfigError("sample.guide_weight > 0 needs sample.guide_step, the earlier "
                          "checkpoint that guides")
    if c.sample.eta_min_t and c.sample.sampler != "ddim":  # sample and pipeline would refuse it
        raise ConfigError(f"sample.eta_min_t={c.sample.eta_min_t} is for the ddim sampler, not "
                          f"{c.sample.sampler}; set sample.eta_min_t=0 with it")


def check_unet_input(c: ml_collections.ConfigDict, side: int, channels: int) -> None:
    """The U-Net needs its lowest level to keep at least 2x2 positions."""
    lowest = side
    for _ in range(len(c.model.ch_mult) - 1):
        lowest = -(-lowest // 2)
    if lowest < 2:
        raise ConfigError(f"a {side}x{side}x{channels} input shrinks to {lowest}x{lowest} over "
                          f"{len(c.model.ch_mult)} U-Net levels; use fewer entries in model.ch_mult")


def _check_channels(name: str, channels, groups: int) -> None:
    for ch in channels:
        if ch <= 0 or ch % groups:
            raise ConfigError(f"{name}: {ch} channels do not split into model.groups={groups} groups")
